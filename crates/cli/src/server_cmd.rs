//! `autopoll-server`: flags, logging, signals, then `autopoll_server::run`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use autopoll_server::{Backend, ServerConfig, ServerError};
use clap::{Parser, ValueEnum};

use crate::exit::{self, CliError};
use crate::logging;
use crate::target::Target;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum BackendArg {
    /// The built-in context engine: BM25 over passages of the --context files.
    Builtin,
    /// A long-lived program reading one JSON request per line, writing one JSON response per line.
    Jsonl,
    /// Claude Code in stream-json mode, kept warm. With no command after `--`, autopoll runs `claude` (or --claude-bin) itself: --model, read-only --tools, the instructions once as the system prompt.
    Claude,
    /// One process per question, the old way (prompt on stdin, or in an argument `{question}`).
    Spawn,
}

/// `autopoll-server`: keep one engine warm and answer questions over FIFOs.
#[derive(Debug, Parser)]
#[command(
    name = "autopoll-server",
    version,
    about = "The persistent-instance server: keeps an engine warm and answers over FIFOs",
    long_about = "The persistent-instance server. It keeps one engine warm and answers any number \
                  of clients (autopoll-poller, `autopoll ask`, scripts/ask.sh) over named pipes in \
                  a private runtime directory. SIGINT or SIGTERM stops it cleanly: it stops \
                  accepting, finishes in-flight questions within --grace, removes its FIFO and \
                  lock, and exits 0.",
    after_help = exit::EXIT_CODES_HELP
)]
struct ServerCli {
    #[command(flatten)]
    verbosity: logging::Verbosity,
    #[command(flatten)]
    target: Target,
    /// The engine that answers.
    #[arg(long, value_enum, default_value = "builtin")]
    backend: BackendArg,
    /// A context file, or a directory of text/markdown files (repeatable).
    #[arg(long = "context", value_name = "PATH")]
    contexts: Vec<PathBuf>,
    /// Worker threads answering in parallel.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=256))]
    workers: u16,
    /// Longest any request may take, in seconds (clients may ask for less).
    #[arg(long, value_name = "SECS", default_value_t = 60.0, value_parser = crate::flags::positive_secs)]
    request_timeout: f64,
    /// Largest frame accepted, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = autopoll_protocol::DEFAULT_MAX_FRAME)]
    max_frame_bytes: usize,
    /// On SIGINT/SIGTERM, how long in-flight requests may take to finish, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 10.0, value_parser = crate::flags::secs)]
    grace: f64,
    /// Changes to context files are noticed by inotify within ~0.1 s; this is the period, in seconds, of the full safety-net walk that also catches what inotify misses (a 1 s walk, or this if shorter, when inotify is unavailable; 0: never reload).
    #[arg(long, value_name = "SECS", default_value_t = 30.0, value_parser = crate::flags::secs)]
    reload_interval: f64,
    /// Most client sessions at once (fewer when the open-file limit allows fewer; more get `overloaded`).
    #[arg(long, value_name = "N", default_value_t = 256)]
    max_clients: usize,
    /// Close a client session that sends nothing for this many seconds with nothing in flight (clients reconnect on their next request).
    #[arg(long, value_name = "SECS", default_value_t = 60.0, value_parser = crate::flags::positive_secs)]
    idle_timeout: f64,
    /// External backends: seconds without any output before a question's instance is killed.
    #[arg(long, value_name = "SECS", default_value_t = 120.0, value_parser = crate::flags::positive_secs)]
    watchdog: f64,
    /// External backends: seconds between SIGTERM and SIGKILL of an instance's process group.
    #[arg(long, value_name = "SECS", default_value_t = 5.0, value_parser = crate::flags::secs)]
    kill_grace: f64,
    /// External backends: seconds a fresh instance may stay silent before its first output.
    #[arg(long, value_name = "SECS", default_value_t = 60.0, value_parser = crate::flags::positive_secs)]
    start_timeout: f64,
    /// External backends: recycle an instance after this many answers (0: never).
    #[arg(long, value_name = "N", default_value_t = 0)]
    max_requests: u64,
    /// External backends: recycle an instance after this many seconds (0: never).
    #[arg(long, value_name = "SECS", default_value_t = 0.0, value_parser = crate::flags::secs)]
    max_age: f64,
    /// External backends: unplanned starts allowed per --restart-window before an instance is down.
    #[arg(long, value_name = "N", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    restart_limit: u32,
    /// External backends: the crash-loop window, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 60.0, value_parser = crate::flags::positive_secs)]
    restart_window: f64,
    /// External backends: prompt template file ({files}, {question}, {context_version}, {example}).
    #[arg(long, value_name = "FILE")]
    prompt_template: Option<PathBuf>,
    /// claude: the Claude Code program autopoll runs (when no command follows `--`).
    #[arg(long, value_name = "PATH", default_value = "claude")]
    claude_bin: String,
    /// claude: the model (an alias such as haiku, sonnet, opus, or a full model name).
    #[arg(long, value_name = "NAME", default_value = autopoll_server::engine::external::claude::DEFAULT_MODEL)]
    model: String,
    /// claude: the built-in tools the model may use, comma-separated. Read-only by default: a shard answers untrusted questions (docs/BACKENDS.md).
    #[arg(long, value_name = "LIST", default_value = autopoll_server::engine::external::claude::DEFAULT_TOOLS)]
    tools: String,
    /// claude: API retries the CLI may make per call (CLAUDE_CODE_MAX_RETRIES); past them the question fails fast.
    #[arg(long, value_name = "N", default_value_t = autopoll_server::engine::external::claude::DEFAULT_RETRIES, value_parser = clap::value_parser!(u32).range(0..=20))]
    claude_retries: u32,
    /// claude: recycle an instance whose session history holds more than N input tokens (0: never).
    #[arg(long, value_name = "N", default_value_t = 0)]
    max_session_tokens: u64,
    /// External backends: the program to run and its arguments (claude: optional, and it then replaces autopoll's own command line).
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

/// `autopoll-server`'s main.
pub fn server_main() -> ExitCode {
    let cli = match ServerCli::try_parse() {
        Ok(c) => c,
        Err(e) => return exit::clap_exit(e),
    };
    logging::init(&cli.verbosity, log::LevelFilter::Info);
    exit::report("autopoll-server", serve(cli))
}

fn serve(cli: ServerCli) -> Result<(), CliError> {
    let shutdown = crate::flags::shutdown_on_signals()?;
    let mut config = ServerConfig::new(&cli.target.name, &cli.target.runtime());
    use autopoll_server::engine::wire::Kind;
    config.backend = match cli.backend {
        BackendArg::Builtin => Backend::Builtin,
        BackendArg::Jsonl => Backend::External(Kind::Jsonl),
        BackendArg::Claude => Backend::External(Kind::Claude),
        BackendArg::Spawn => Backend::External(Kind::Spawn),
    };
    let claude_flags = [
        ("--claude-bin", cli.claude_bin != "claude"),
        (
            "--model",
            cli.model != autopoll_server::engine::external::claude::DEFAULT_MODEL,
        ),
        (
            "--tools",
            cli.tools != autopoll_server::engine::external::claude::DEFAULT_TOOLS,
        ),
    ];
    if let Some((flag, _)) = claude_flags.iter().find(|(_, given)| *given) {
        if !matches!(cli.backend, BackendArg::Claude) {
            return Err(CliError::new(
                exit::CONFIG,
                format!("{flag} is for --backend claude"),
            ));
        }
        if !cli.command.is_empty() {
            return Err(CliError::new(
                exit::CONFIG,
                format!(
                    "{flag} has no effect with a command after `--`: that command replaces autopoll's own claude command line, so put the setting in it"
                ),
            ));
        }
    }
    if cli.max_session_tokens > 0 && !matches!(cli.backend, BackendArg::Claude) {
        return Err(CliError::new(
            exit::CONFIG,
            "--max-session-tokens is for --backend claude",
        ));
    }
    if cli.claude_retries != autopoll_server::engine::external::claude::DEFAULT_RETRIES
        && !matches!(cli.backend, BackendArg::Claude | BackendArg::Spawn)
    {
        return Err(CliError::new(
            exit::CONFIG,
            "--claude-retries is for --backend claude (and spawn running claude)",
        ));
    }
    config.claude = autopoll_server::engine::external::claude::ClaudeOptions {
        bin: cli.claude_bin,
        model: cli.model,
        tools: cli.tools,
        max_session_tokens: (cli.max_session_tokens > 0).then_some(cli.max_session_tokens),
    };
    config.claude_retries = cli.claude_retries;
    config.command = cli.command;
    config.watchdog = Duration::from_secs_f64(cli.watchdog);
    config.kill_grace = Duration::from_secs_f64(cli.kill_grace);
    config.start_timeout = Duration::from_secs_f64(cli.start_timeout);
    config.max_requests = (cli.max_requests > 0).then_some(cli.max_requests);
    config.max_age = (cli.max_age > 0.0).then(|| Duration::from_secs_f64(cli.max_age));
    config.restart_limit = cli.restart_limit;
    config.restart_window = Duration::from_secs_f64(cli.restart_window);
    config.prompt_template = cli.prompt_template;
    config.contexts = cli.contexts;
    config.workers = usize::from(cli.workers);
    config.request_timeout = Duration::from_secs_f64(cli.request_timeout);
    config.max_frame = cli.max_frame_bytes;
    config.grace = Duration::from_secs_f64(cli.grace);
    config.reload_interval = Duration::from_secs_f64(cli.reload_interval);
    config.max_sessions = cli.max_clients.max(1);
    config.idle_timeout = Duration::from_secs_f64(cli.idle_timeout);
    config.notify = autopoll_protocol::NotifyConfig::from_env();
    let name = config.name.clone();
    autopoll_server::run(config, shutdown, |ready| {
        let e = &ready.engine;
        println!(
            "autopoll-server: serving `{name}` at {} (engine {}: {} files, {} passages, context {})",
            ready.fifo.display(),
            e.name,
            e.files,
            e.passages,
            e.context_version
        );
    })
    .map_err(|e| {
        let code = match &e {
            ServerError::Lock(autopoll_server::lock::LockError::Held { .. }) => exit::ALREADY_RUNNING,
            ServerError::Config(_) => exit::CONFIG,
            _ => exit::FAILURE,
        };
        CliError::new(code, e.to_string())
    })?;
    println!("autopoll-server: stopped");
    Ok(())
}
