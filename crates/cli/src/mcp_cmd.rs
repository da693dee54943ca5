//! `autopoll mcp`: the MCP server over stdio (see `autopoll_mcp`). Thin:
//! flags, then `autopoll_mcp::run` on stdin/stdout.

use std::path::PathBuf;

use clap::Args;

use crate::exit::{self, CliError};

/// Where the Python bridge server keeps its file by default.
pub const PYTHON_DEFAULT_DB: &str = "/tmp/claude_bridge_secure.db";

/// Arguments of `autopoll mcp`.
#[derive(Debug, Args)]
pub struct McpArgs {
    /// The bridge's SQLite file (created with its tables when missing, as the Python server does),
    /// or a PostgreSQL URL (postgres://USER@HOST:PORT/DBNAME; its schema made when missing).
    #[arg(long, env = "AUTOPOLL_DB", value_name = "PATH|URL", default_value = PYTHON_DEFAULT_DB)]
    db: PathBuf,
    /// Most tool calls running at once (each waiting ask_shard is one).
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..=1024))]
    max_calls: u16,
}

/// Serve MCP on stdin/stdout until stdin closes.
pub fn run(args: McpArgs) -> Result<(), CliError> {
    let mut cfg = autopoll_mcp::McpConfig::new(args.db);
    cfg.max_in_flight = usize::from(args.max_calls);
    autopoll_mcp::run(&cfg, std::io::stdin(), std::io::stdout()).map_err(|e| match e {
        autopoll_mcp::McpError::Bridge(b) => CliError::from(b),
        autopoll_mcp::McpError::Io(m) => CliError::new(exit::FAILURE, m),
    })
}
