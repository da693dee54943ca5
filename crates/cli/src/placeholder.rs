//! `autopoll-server` and `autopoll-poller` until their issues land: they
//! parse `--help`/`--version` and otherwise say plainly that they are not
//! implemented yet.

use std::process::ExitCode;

use clap::Parser;

use crate::exit;

#[derive(Debug, Parser)]
#[command(
    name = "autopoll-server",
    version,
    about = "The persistent-instance server (NOT IMPLEMENTED YET: lands with issue 3)",
    after_help = exit::EXIT_CODES_HELP
)]
struct ServerCli {}

#[derive(Debug, Parser)]
#[command(
    name = "autopoll-poller",
    version,
    about = "The bridge poller (NOT IMPLEMENTED YET: lands with issue 4)",
    after_help = exit::EXIT_CODES_HELP
)]
struct PollerCli {}

fn placeholder<P: Parser>(name: &str, issue: u32) -> ExitCode {
    if let Err(e) = P::try_parse() {
        return exit::clap_exit(e);
    }
    eprintln!("{name}: not implemented yet (it lands with issue {issue}); see `{name} --help`");
    ExitCode::from(exit::FAILURE)
}

/// `autopoll-server`'s main.
pub fn server_main() -> ExitCode {
    placeholder::<ServerCli>("autopoll-server", 3)
}

/// `autopoll-poller`'s main.
pub fn poller_main() -> ExitCode {
    placeholder::<PollerCli>("autopoll-poller", 4)
}
