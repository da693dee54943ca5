//! Exit codes shared by the three binaries, and how errors reach the user:
//! one line on stderr, never a panic or a backtrace.

use std::process::ExitCode;

use autopoll_bridge::Error as BridgeError;

/// Success.
pub const OK: u8 = 0;
/// Any other failure (I/O, SQLite, an error answer from the shard).
pub const FAILURE: u8 = 1;
/// Bad command-line usage (clap's own code).
pub const USAGE: u8 = 2;
/// Wrong token, or the conversation has expired.
pub const AUTH: u8 = 3;
/// The bridge file, conversation or message does not exist.
pub const NOT_FOUND: u8 = 4;
/// No answer (or reply) within the timeout.
pub const TIMEOUT: u8 = 5;
/// The bridge stayed locked by another writer past the busy timeout.
pub const BUSY: u8 = 6;
/// The file is not a bridge (someone else's SQLite file, not SQLite, or a
/// schema mismatch); it was left unchanged.
pub const SCHEMA: u8 = 7;
/// A configured send rate limit was hit.
pub const RATE_LIMITED: u8 = 8;
/// Invalid input (too long a message, bad metadata, bad id).
pub const INVALID: u8 = 9;
/// No server is running under that name (or it went away mid-request).
pub const NO_SERVER: u8 = 10;
/// `autopoll-server`: a server of that name is already running.
pub const ALREADY_RUNNING: u8 = 11;
/// Bad configuration: `autopoll-server`'s context missing or unreadable, bad
/// flag values; `autopoll-poller`'s `--tokens-file` unsafe (group/other
/// bits, another owner) or malformed.
pub const CONFIG: u8 = 12;
/// `autopoll doctor`: at least one check failed.
pub const DOCTOR: u8 = 13;
/// `autopoll-poller`: its bridge file stayed missing (or replaced by something
/// that is not a bridge) past `--missing-grace`; a supervisor should restart it.
pub const BRIDGE_GONE: u8 = 14;

/// The table printed under every `--help`.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success
  1  failure (I/O, SQLite, the shard answered with an error)
  2  usage error
  3  invalid token or expired conversation
  4  bridge file, conversation or message not found
  5  timed out waiting for an answer
  6  bridge busy (locked by another writer past the busy timeout)
  7  not a bridge file (another program's SQLite file, not SQLite, or a schema
     mismatch); it was left unchanged
  8  rate limited
  9  invalid input
 10  no server running under that name
 11  a server of that name is already running
 12  bad configuration (server: context missing or unreadable; poller: the
     --tokens-file is not 0600 and yours, or has a bad line)
 13  autopoll doctor found a problem (each FAIL line says how to fix it)
 14  autopoll-poller: the bridge file stayed missing or not a bridge past
     --missing-grace (restart it once the file is back)";

/// A failure to report: an exit code and a one-line message.
#[derive(Debug)]
pub struct CliError {
    /// Exit code.
    pub code: u8,
    /// What to print after `<program>: `.
    pub message: String,
}

impl CliError {
    /// A failure with `code`.
    pub fn new(code: u8, message: impl Into<String>) -> CliError {
        CliError {
            code,
            message: message.into(),
        }
    }
}

impl From<BridgeError> for CliError {
    fn from(e: BridgeError) -> Self {
        let code = match &e {
            BridgeError::InvalidToken { .. } | BridgeError::Expired { .. } => AUTH,
            BridgeError::NotFound { .. } => NOT_FOUND,
            BridgeError::Busy { .. } => BUSY,
            BridgeError::SchemaMismatch { .. }
            | BridgeError::NotABridge { .. }
            | BridgeError::NotADatabase { .. } => SCHEMA,
            BridgeError::RateLimited { .. } => RATE_LIMITED,
            BridgeError::Invalid(_) => INVALID,
            BridgeError::Io { .. } | BridgeError::Sqlite(_) | BridgeError::Postgres { .. } => {
                FAILURE
            }
            // The enum may grow; anything new is a plain failure until mapped.
            #[allow(unreachable_patterns)]
            _ => FAILURE,
        };
        CliError::new(code, e.to_string())
    }
}

impl From<autopoll_protocol::ClientError> for CliError {
    fn from(e: autopoll_protocol::ClientError) -> Self {
        use autopoll_protocol::{ClientError as C, ErrorCode as E};
        let code = match &e {
            C::NoServer { .. } | C::ServerGone | C::Lost => NO_SERVER,
            C::Timeout { .. } => TIMEOUT,
            C::TooLarge(_) => INVALID,
            C::Server(r) => match r.code {
                E::Timeout => TIMEOUT,
                E::TooLarge | E::Invalid | E::BadFrame => INVALID,
                E::ShuttingDown => NO_SERVER,
                _ => FAILURE,
            },
            C::Protocol(_) | C::Fifo(_) => FAILURE,
        };
        CliError::new(code, e.to_string())
    }
}

/// Print the error (if any) and turn the result into the process exit code.
pub fn report(program: &str, result: Result<(), CliError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::from(OK),
        Err(e) => {
            // One line: newlines inside messages would break log scraping.
            eprintln!("{program}: {}", e.message.replace('\n', " "));
            ExitCode::from(e.code)
        }
    }
}

/// For a missing flag that also comes from the environment, how to set it
/// (clap names only the flag).
fn missing_hints(message: &str) -> Vec<String> {
    let missing = message
        .split("Usage:")
        .next()
        .unwrap_or(message)
        .to_string();
    [
        (
            "--token",
            "hint: set AUTOPOLL_TOKEN to your session's token (`autopoll bridge create` printed both); \
             prefer it to --token, which shows in `ps`",
        ),
        (
            "--conversation",
            "hint: set AUTOPOLL_CONVERSATION to the conversation id (conv_ + 16 hex; `autopoll bridge status` lists them)",
        ),
        (
            "--db",
            "hint: set AUTOPOLL_DB to the bridge file (`autopoll bridge init --db PATH` creates one)",
        ),
        (
            "--session",
            "hint: set AUTOPOLL_SESSION to a or b (a created the conversation)",
        ),
    ]
    .iter()
    .filter(|(flag, _)| missing.contains(&format!("{flag} <")))
    .map(|(_, hint)| hint.to_string())
    .collect()
}

/// Print clap's message (help, version or usage error) and exit with its
/// code; a missing flag gets a hint naming its environment variable.
pub fn clap_exit(e: clap::Error) -> ExitCode {
    let _ = e.print();
    if e.kind() == clap::error::ErrorKind::MissingRequiredArgument {
        for line in missing_hints(&e.to_string()) {
            eprintln!("{line}");
        }
    }
    if e.use_stderr() {
        ExitCode::from(USAGE)
    } else {
        ExitCode::from(OK)
    }
}
