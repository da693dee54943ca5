//! `autopoll-poller`: flags, logging, signals, then `autopoll_poller::run`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use autopoll_bridge::Session;
use autopoll_poller::{PollerConfig, PollerError};
use clap::{Parser, ValueEnum};

use crate::exit::{self, CliError};
use crate::logging;
use crate::target::Target;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum SessionArg {
    A,
    B,
}

/// `autopoll-poller`: answer a shard session's questions from the bridge.
#[derive(Debug, Parser)]
#[command(
    name = "autopoll-poller",
    version,
    about = "Claims queries from the SQLite bridge, answers them through autopoll-server",
    long_about = "Claims queries addressed to a shard session from the SQLite bridge, asks \
                  autopoll-server, and writes each answer back exactly once. It notices new \
                  messages within milliseconds (inotify on the bridge plus PRAGMA data_version), \
                  keeps up to --concurrency questions in flight, survives restarts of the server \
                  (status `blocked` meanwhile) and of itself (leases), and dead-letters a question \
                  after --max-attempts failures. It checks ten times a second that the bridge path \
                  still names the file it opened: when the file is replaced, deleted or its folder \
                  removed, it closes the connection (logging event=bridge_replaced or \
                  event=bridge_missing), reopens the file once a bridge is back at the path, and \
                  exits with code 14 when none is back within --missing-grace. It refuses a file \
                  that is not a bridge (exit 7), leaving it unchanged. SIGINT or SIGTERM: stop \
                  claiming, finish in-flight questions within --grace, release the rest, exit 0. \
                  With --tokens-file it serves every conversation listed there, one heartbeat \
                  and status each, and SIGHUP reads the file again (without it, SIGHUP stops \
                  the poller like SIGTERM).",
    after_help = exit::EXIT_CODES_HELP
)]
struct PollerCli {
    #[command(flatten)]
    verbosity: logging::Verbosity,
    /// The bridge: its SQLite file, or a PostgreSQL URL (postgres://USER@HOST:PORT/DBNAME;
    /// PG* variables fill in what it leaves out; sslmode as libpq reads it).
    #[arg(long, env = "AUTOPOLL_DB", value_name = "PATH|URL")]
    db: PathBuf,
    /// Conversation id (one conversation; for many, --tokens-file).
    #[arg(
        long,
        env = "AUTOPOLL_CONVERSATION",
        value_name = "ID",
        required_unless_present = "tokens_file"
    )]
    conversation: Option<String>,
    /// The shard session's token. Prefer the environment variable: a flag is visible in `ps`.
    #[arg(
        long,
        env = "AUTOPOLL_TOKEN",
        hide_env_values = true,
        value_name = "T",
        required_unless_present = "tokens_file"
    )]
    token: Option<String>,
    /// Serve many conversations: a file of `CONVERSATION_ID TOKEN` lines (blank lines and
    /// `#` comments allowed), mode 0600 and owned by you (else exit 12, saying the chmod or
    /// chown to run). Read again when it changes or on SIGHUP: conversations are added and
    /// removed without a restart; a bad line is logged with its number and the previous set
    /// stays in force. Claims are shared round robin between the conversations.
    #[arg(long, env = "AUTOPOLL_TOKENS_FILE", value_name = "FILE")]
    tokens_file: Option<PathBuf>,
    /// The session to answer for (the shard's side).
    #[arg(long, value_enum, default_value = "b")]
    session: SessionArg,
    #[command(flatten)]
    target: Target,
    /// Signed into every response as shard_id [default: autopoll:NAME].
    #[arg(long, value_name = "ID")]
    shard_id: Option<String>,
    /// Claim lease in seconds: a claim not finished or extended by then is taken over.
    #[arg(long, value_name = "SECS", default_value_t = 30.0, value_parser = crate::flags::positive_secs)]
    lease: f64,
    /// Failed attempts after which a question gets an error response (dead letter).
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    max_attempts: u32,
    /// The server's deadline per question, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 60.0, value_parser = crate::flags::positive_secs)]
    query_timeout: f64,
    /// Questions in flight to the server at once.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=1024))]
    concurrency: u16,
    /// Questions longer than this many bytes get an error response.
    #[arg(long, value_name = "BYTES", default_value_t = 256 * 1024)]
    max_question_bytes: usize,
    /// On SIGINT/SIGTERM, how long in-flight questions may take, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 10.0, value_parser = crate::flags::secs)]
    grace: f64,
    /// How long the bridge file may stay missing (or replaced by a file that is
    /// not a bridge) before the poller exits with code 14, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 60.0, value_parser = crate::flags::secs)]
    missing_grace: f64,
    /// How often the heartbeat in session_status is refreshed, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 10.0, value_parser = crate::flags::positive_secs)]
    heartbeat: f64,
    /// Prune finished history older than this as it goes (30s, 15m, 12h, 7d): the rules of
    /// `autopoll bridge prune`, a pass every --prune-interval in short transactions. Off by default.
    #[arg(long, value_name = "DURATION", value_parser = autopoll_bridge::prune::parse_duration)]
    retain: Option<Duration>,
    /// With --retain: seconds between prune passes.
    #[arg(long, value_name = "SECS", default_value_t = 60.0, value_parser = crate::flags::positive_secs, requires = "retain")]
    prune_interval: f64,
}

/// `autopoll-poller`'s main.
pub fn poller_main() -> ExitCode {
    let cli = match PollerCli::try_parse() {
        Ok(c) => c,
        Err(e) => return exit::clap_exit(e),
    };
    logging::init(&cli.verbosity, log::LevelFilter::Info);
    exit::report("autopoll-poller", poll(cli))
}

fn poll(cli: PollerCli) -> Result<(), CliError> {
    let shutdown = crate::flags::shutdown_on_signals()?;
    let paths = cli.target.paths()?;
    let mut cfg = PollerConfig::new(
        cli.db,
        cli.conversation.unwrap_or_default(),
        cli.token.unwrap_or_default(),
        paths,
    );
    if let Some(f) = cli.tokens_file {
        if !cfg.conversation.is_empty() {
            log::warn!(
                "event=ignored flag=--conversation: --tokens-file names the conversations served"
            );
        }
        // SIGHUP reads the file again instead of stopping the poller.
        let hangup = autopoll_poller::tokens::Hangup::install().map_err(|e| {
            CliError::new(
                exit::FAILURE,
                format!("cannot install the SIGHUP handler: {e}"),
            )
        })?;
        cfg.tokens_file = Some(f);
        cfg.hangup = Some(hangup);
    }
    cfg.session = match cli.session {
        SessionArg::A => Session::A,
        SessionArg::B => Session::B,
    };
    if let Some(id) = cli.shard_id {
        cfg.shard_id = id;
    }
    cfg.lease = Duration::from_secs_f64(cli.lease);
    cfg.max_attempts = cli.max_attempts;
    cfg.query_timeout = Duration::from_secs_f64(cli.query_timeout);
    cfg.concurrency = usize::from(cli.concurrency);
    cfg.max_question_bytes = cli.max_question_bytes;
    cfg.grace = Duration::from_secs_f64(cli.grace);
    cfg.heartbeat = Duration::from_secs_f64(cli.heartbeat);
    cfg.missing_grace = Duration::from_secs_f64(cli.missing_grace);
    cfg.retain = cli.retain;
    cfg.prune_interval = Duration::from_secs_f64(cli.prune_interval);
    cfg.notify = autopoll_protocol::NotifyConfig::from_env();
    autopoll_poller::run(cfg, shutdown).map_err(|e| match e {
        PollerError::Bridge(b @ autopoll_bridge::Error::InvalidToken { .. }) => CliError::new(
            exit::AUTH,
            format!(
                "{b}: give the shard session's token (AUTOPOLL_TOKEN); `autopoll bridge create` printed it, \
                 and `autopoll bridge renew` extends an expired one"
            ),
        ),
        PollerError::Bridge(b) => CliError::from(b),
        PollerError::Config(m) => CliError::new(exit::USAGE, m),
        e @ PollerError::Tokens(_) => CliError::new(exit::CONFIG, e.to_string()),
        PollerError::Io(m) => CliError::new(exit::FAILURE, m),
        e @ PollerError::BridgeGone { .. } => CliError::new(exit::BRIDGE_GONE, e.to_string()),
    })
}
