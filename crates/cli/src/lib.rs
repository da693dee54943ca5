//! # autopoll-cli
//!
//! The front ends of autopoll's three binaries: flag parsing (clap), output
//! formatting, logging set-up and exit codes. Each binary under `bin/` is a
//! one-line `main` calling into this crate; the work itself lives in the
//! library crates (`autopoll-bridge`, `autopoll-protocol`, ...).
#![deny(missing_docs)]

mod ask_cmd;
mod bench_cmd;
pub(crate) mod bridge_cmd;
mod doctor_cmd;
pub mod exit;
mod flags;
pub mod logging;
mod mcp_cmd;
mod poller_cmd;
mod server_cmd;
mod table;
mod target;

pub use bench_cmd::bench_main;
pub use poller_cmd::poller_main;
pub use server_cmd::server_main;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::exit::CliError;

/// `autopoll`: bridge administration, asking a server directly, status.
#[derive(Debug, Parser)]
#[command(
    name = "autopoll",
    version,
    about = "Answer LLM agent queries from a SQLite bridge through a persistent instance",
    long_about = "autopoll lets agent sessions ask a long-lived memory shard questions through the \
                  shared SQLite bridge of the Python MCP bridge server, and get cited answers in \
                  milliseconds.\n\nThis command administers the bridge file, asks a running \
                  autopoll-server directly, shows its status, checks a whole setup (doctor), and serves agent sessions over MCP (mcp).",
    after_help = exit::EXIT_CODES_HELP
)]
struct Cli {
    #[command(flatten)]
    verbosity: logging::Verbosity,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Administer the SQLite bridge: conversations, messages, queues.
    #[command(after_help = exit::EXIT_CODES_HELP)]
    Bridge(bridge_cmd::BridgeArgs),
    /// Ask a running autopoll-server a question directly (over its FIFO).
    #[command(after_help = exit::EXIT_CODES_HELP)]
    Ask(ask_cmd::AskArgs),
    /// Show a running autopoll-server's statistics, and with --db the bridge's queues.
    #[command(after_help = exit::EXIT_CODES_HELP)]
    Status(ask_cmd::StatusArgs),
    /// Check a shard's setup: bridge, token, server, permissions, poller, queue, disk; print fixes.
    #[command(after_help = exit::EXIT_CODES_HELP)]
    Doctor(doctor_cmd::DoctorArgs),
    /// Serve MCP over stdio for agent sessions: the Python bridge server's tools plus ask_shard.
    ///
    /// One JSON-RPC message a line on stdin/stdout, logs on stderr. Add it to Claude Code with
    /// `claude mcp add autopoll -- autopoll mcp --db PATH`.
    #[command(after_help = exit::EXIT_CODES_HELP)]
    Mcp(mcp_cmd::McpArgs),
}

/// The `autopoll` binary's main: parse, run, map the result to an exit code.
pub fn autopoll_main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return exit::clap_exit(e),
    };
    logging::init(&cli.verbosity, log::LevelFilter::Warn);
    let result: Result<(), CliError> = match cli.command {
        Command::Bridge(args) => bridge_cmd::run(args),
        Command::Ask(args) => ask_cmd::ask(args),
        Command::Status(args) => ask_cmd::status(args),
        Command::Doctor(args) => doctor_cmd::run(args),
        Command::Mcp(args) => mcp_cmd::run(args),
    };
    exit::report("autopoll", result)
}
