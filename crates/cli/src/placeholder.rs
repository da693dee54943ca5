//! `autopoll-poller` until its issue lands: it parses `--help`/`--version`
//! and otherwise says plainly that it is not implemented yet.

use std::process::ExitCode;

use clap::Parser;

use crate::exit;

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

/// `autopoll-poller`'s main.
pub fn poller_main() -> ExitCode {
    placeholder::<PollerCli>("autopoll-poller", 4)
}
