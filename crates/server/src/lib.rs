//! # autopoll-server
//!
//! The persistent-instance server. One process keeps an engine warm and
//! answers any number of clients over FIFOs, so no process is forked per
//! question.
//!
//! Threads (all named):
//! - `main` (in [`run`]): holds the lock, reads hello frames from the shared
//!   request FIFO without ever waiting on one writer, vets the FIFO pair each
//!   names (module `hello`), spawns a session;
//! - `session-N`: one per client (module `session`);
//! - `worker-N`: `--workers` of them, fed by one bounded crossbeam channel;
//! - `context-watch`: re-reads changed context files when inotify says a
//!   context folder changed (debounced), and walks them all every
//!   `--reload-interval` as a safety net (module `ctxwatch`).
//!
//! Limits: the soft open-file limit is raised to the hard one at start, and
//! sessions are capped at what the descriptors left after a reserve allow
//! ([`limits`]), so a crowd gets `overloaded` refusals, never EMFILE. A
//! session silent for `--idle-timeout` is closed.
//!
//! Shutdown ([`Shutdown::trigger`], wired to SIGINT/SIGTERM by the binary):
//! stop accepting and remove the FIFO, let sessions finish in-flight
//! requests within `--grace`, remove the pid and lock files, return.
//!
//! Under systemd (`Type=notify`, [`ServerConfig::notify`]): `READY=1` once
//! the FIFO accepts hellos, `WATCHDOG=1` from the accept loop (which wakes at
//! least every half watchdog interval, so an idle server keeps pinging and a
//! hung one stops), `STOPPING=1` when shutdown begins.
#![deny(missing_docs)]

pub(crate) mod ctxwatch;
pub mod engine;
pub(crate) mod hello;
pub mod limits;
pub mod lock;
pub mod pool;
pub(crate) mod session;
pub mod stats;

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub use autopoll_protocol::Shutdown;
use autopoll_protocol::fifo::{self, FifoDir, FileId, Fill};
use autopoll_protocol::frame;
use autopoll_protocol::{
    DEFAULT_MAX_FRAME, ErrorCode, ErrorReply, MAX_HELLO, Notifier, NotifyConfig, Reply,
    ServerPaths, Stats,
};
use crossbeam_channel::Sender;

use crate::engine::Engine;
use crate::engine::builtin::BuiltinEngine;
use crate::lock::{LockError, ServerLock};
use crate::pool::Job;
use crate::stats::Counters;

/// Which engine answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The built-in context engine over `--context` paths.
    Builtin,
    /// A supervised external program (see [`engine::external`]).
    External(engine::wire::Kind),
}

/// Everything `autopoll-server` is told on its command line.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Server name (its directory under the runtime dir).
    pub name: String,
    /// The runtime directory.
    pub runtime_dir: PathBuf,
    /// The engine.
    pub backend: Backend,
    /// Context files and directories.
    pub contexts: Vec<PathBuf>,
    /// Worker threads.
    pub workers: usize,
    /// Longest a request may take, whatever the client asks.
    pub request_timeout: Duration,
    /// Frame cap.
    pub max_frame: usize,
    /// How long in-flight requests may take to finish after a stop signal.
    pub grace: Duration,
    /// How often all context files are walked for changes as a safety net
    /// besides inotify (zero: context changes are never picked up).
    pub reload_interval: Duration,
    /// Most client sessions at once.
    pub max_sessions: usize,
    /// A session that sends no frame for this long (with nothing in flight) is closed.
    pub idle_timeout: Duration,
    /// Questions queued for workers at most.
    pub queue: usize,
    /// External backends: the program and its arguments.
    pub command: Vec<String>,
    /// External backends: silence after which a question's instance is killed.
    pub watchdog: Duration,
    /// External backends: time between SIGTERM and SIGKILL.
    pub kill_grace: Duration,
    /// External backends: silence allowed before a fresh instance's first output.
    pub start_timeout: Duration,
    /// External backends: recycle an instance after this many answers.
    pub max_requests: Option<u64>,
    /// External backends: recycle an instance after this age.
    pub max_age: Option<Duration>,
    /// External backends: unplanned starts allowed per `restart_window`.
    pub restart_limit: u32,
    /// External backends: the crash-loop window.
    pub restart_window: Duration,
    /// External backends: a prompt template file instead of the built-in one.
    pub prompt_template: Option<PathBuf>,
    /// `claude` with no command after `--`: how autopoll runs Claude Code.
    pub claude: engine::external::claude::ClaudeOptions,
    /// `claude`: API retries the CLI may make per call.
    pub claude_retries: u32,
    /// systemd notification (`NOTIFY_SOCKET`, watchdog); none by default.
    pub notify: NotifyConfig,
}

impl ServerConfig {
    /// Defaults for `name` under `runtime_dir`.
    pub fn new(name: &str, runtime_dir: &Path) -> ServerConfig {
        ServerConfig {
            name: name.to_string(),
            runtime_dir: runtime_dir.to_path_buf(),
            backend: Backend::Builtin,
            contexts: Vec::new(),
            workers: 2,
            request_timeout: Duration::from_secs(60),
            max_frame: DEFAULT_MAX_FRAME,
            grace: Duration::from_secs(10),
            reload_interval: Duration::from_secs(30),
            max_sessions: 256,
            idle_timeout: Duration::from_secs(60),
            queue: 1_024,
            command: Vec::new(),
            watchdog: Duration::from_secs(120),
            kill_grace: Duration::from_secs(5),
            start_timeout: Duration::from_secs(60),
            max_requests: None,
            max_age: None,
            restart_limit: 5,
            restart_window: Duration::from_secs(60),
            prompt_template: None,
            claude: engine::external::claude::ClaudeOptions::default(),
            claude_retries: engine::external::claude::DEFAULT_RETRIES,
            notify: NotifyConfig::default(),
        }
    }
}

/// Why the server could not start (or stopped with an error).
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Bad configuration (name, context).
    #[error("{0}")]
    Config(String),
    /// Another server of that name is running.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// An OS error.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ServerError {
    let path = path.to_path_buf();
    move |source| ServerError::Io { op, path, source }
}

/// What the server shows once it serves.
#[derive(Debug, Clone)]
pub struct Ready {
    /// The shared request FIFO clients write hellos to.
    pub fifo: PathBuf,
    /// The engine's description.
    pub engine: autopoll_protocol::EngineInfo,
}

/// State shared by the accept loop, sessions and `stats`.
pub(crate) struct Shared {
    pub(crate) config: ServerConfig,
    pub(crate) name: String,
    pub(crate) counters: Arc<Counters>,
    pub(crate) engine: Arc<dyn Engine>,
    pub(crate) jobs: Sender<Job>,
    pub(crate) shutdown: Shutdown,
    grace_deadline: Mutex<Option<Instant>>,
    live: (Mutex<usize>, Condvar),
    /// The `clients/` folder, held open: sessions open their FIFOs in it.
    pub(crate) clients: FifoDir,
    /// The FIFOs of live sessions (a hello naming one is refused).
    in_use: Mutex<HashSet<FileId>>,
}

impl Shared {
    pub(crate) fn grace_deadline(&self) -> Option<Instant> {
        *self
            .grace_deadline
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn session_started(&self, ids: [FileId; 2]) {
        *self.live.0.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.in_use
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(ids);
    }

    /// The session no longer holds these FIFOs (called while it still
    /// does, just before it closes them).
    pub(crate) fn release_fifos(&self, ids: [FileId; 2]) {
        let mut in_use = self.in_use.lock().unwrap_or_else(|p| p.into_inner());
        for id in ids {
            in_use.remove(&id);
        }
    }

    fn session_ended(&self) {
        let mut n = self.live.0.lock().unwrap_or_else(|p| p.into_inner());
        *n = n.saturating_sub(1);
        self.live.1.notify_all();
    }

    /// Wait until no session is left or `deadline`; returns how many remain.
    fn wait_sessions(&self, deadline: Instant) -> usize {
        let mut n = self.live.0.lock().unwrap_or_else(|p| p.into_inner());
        while *n > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            n = match self.live.1.wait_timeout(n, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        *n
    }
}

pub(crate) fn stats_reply(shared: &Shared, id: u64) -> Stats {
    let s = shared.counters.snapshot();
    let instances = shared.engine.instances();
    Stats {
        id,
        server: shared.name.clone(),
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        protocol: autopoll_protocol::PROTOCOL_VERSION,
        uptime_secs: s.uptime.as_secs_f64(),
        requests: s.requests,
        errors: s.errors,
        in_flight: s.in_flight,
        sessions: s.sessions,
        latency_p50_ms: s.p50_ms,
        latency_p99_ms: s.p99_ms,
        workers: shared.config.workers,
        engine: shared.engine.info(),
        cost_usd: instances
            .iter()
            .filter_map(|w| w.cost_usd)
            .reduce(|a, b| a + b),
        instances,
    }
}

/// Build the configured engine (external instances start here, warm).
pub fn build_engine(config: &ServerConfig) -> Result<Arc<dyn Engine>, ServerError> {
    let catalog = BuiltinEngine::load(&config.contexts).map_err(ServerError::Config)?;
    match config.backend {
        Backend::Builtin => {
            if !config.command.is_empty() {
                return Err(ServerError::Config(
                    "a command after `--` needs --backend jsonl, claude or spawn".into(),
                ));
            }
            Ok(Arc::new(catalog))
        }
        Backend::External(kind) => {
            use engine::prompt::Prompt;
            // autopoll's own `claude` command line: the template is the
            // session's system prompt; otherwise one whole prompt per question.
            let managed = kind == engine::wire::Kind::Claude && config.command.is_empty();
            let template = config.prompt_template.as_deref();
            let (prompt, system_prompt) = if managed {
                (Prompt::load(None), Prompt::load_system(template))
            } else {
                (Prompt::load(template), Prompt::load_system(None))
            };
            let prompt = prompt.map_err(ServerError::Config)?;
            let system_prompt = system_prompt.map_err(ServerError::Config)?;
            let cfg = engine::external::ExternalConfig {
                kind,
                command: config.command.clone(),
                workers: config.workers,
                watchdog: config.watchdog,
                kill_grace: config.kill_grace,
                start_timeout: config.start_timeout,
                max_requests: config.max_requests,
                max_age: config.max_age,
                restart_limit: config.restart_limit,
                restart_window: config.restart_window,
                prompt,
                system_prompt,
                claude: config.claude.clone(),
                claude_retries: config.claude_retries,
                context_dirs: context_dirs(&config.contexts),
                // Absolute, as `autopoll doctor` compares it.
                server_dir: ServerPaths::new(&config.runtime_dir, &config.name)
                    .map(|p| p.dir)
                    .map_err(ServerError::Config)?,
            };
            let e = engine::external::ExternalEngine::start(cfg, catalog)
                .map_err(ServerError::Config)?;
            Ok(Arc::new(e))
        }
    }
}

/// The folders of the `--context` roots, absolute and without repeats: a
/// directory itself, a file's parent.
fn context_dirs(roots: &[PathBuf]) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    for r in roots {
        let Ok(abs) = std::fs::canonicalize(r) else {
            continue;
        };
        let dir = if abs.is_dir() {
            abs
        } else {
            match abs.parent() {
                Some(p) => p.to_path_buf(),
                None => continue,
            }
        };
        if !out.contains(&dir) {
            out.push(dir);
        }
    }
    out
}

/// Client FIFO names older than this are leftovers of crashed clients. Live
/// ones exist only during a handshake (milliseconds): clients unlink them as
/// soon as both sides hold descriptors.
const CLIENT_LEFTOVER_AGE: Duration = Duration::from_secs(600);

/// Remove leftovers from the clients directory. Never anything young: a
/// client may be in the middle of its handshake (also right after a restart).
fn sweep_clients(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > CLIENT_LEFTOVER_AGE);
        if old {
            log::debug!("removing leftover client FIFO {}", e.path().display());
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Logs bad hellos, each with what was wrong and which client sent it: up to
/// [`BAD_HELLO_BURST`] lines per 10 s, then one summary of how many more were
/// dropped, so a flood of junk cannot flood the log.
struct BadHelloLog {
    suppressed: u64,
    window: Option<Instant>,
    logged: u32,
}

/// Bad hellos logged in full per 10 s window.
const BAD_HELLO_BURST: u32 = 20;

impl BadHelloLog {
    fn note(&mut self, why: &str) {
        let now = Instant::now();
        if self
            .window
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10))
        {
            self.window = Some(now);
            self.logged = 0;
        }
        if self.logged >= BAD_HELLO_BURST {
            self.suppressed += 1;
            return;
        }
        self.logged += 1;
        if self.suppressed > 0 {
            log::warn!(
                "event=bad_hello reason={why:?} (and {} more not logged)",
                std::mem::take(&mut self.suppressed)
            );
        } else {
            log::warn!("event=bad_hello reason={why:?}");
        }
    }
}

/// Serve until `shutdown` is triggered. `on_ready` is called once the FIFO
/// is accepting hellos.
pub fn run(
    config: ServerConfig,
    shutdown: Shutdown,
    on_ready: impl FnOnce(&Ready),
) -> Result<(), ServerError> {
    if config.workers == 0 {
        return Err(ServerError::Config("--workers must be at least 1".into()));
    }
    if config.max_frame < MAX_HELLO {
        return Err(ServerError::Config(format!(
            "--max-frame-bytes must be at least {MAX_HELLO}"
        )));
    }
    if config.idle_timeout.is_zero() {
        return Err(ServerError::Config(
            "--idle-timeout must be more than 0".into(),
        ));
    }
    let fd_limit =
        limits::raise_nofile().map_err(io_err("cannot read the open-file limit", Path::new("")))?;
    let paths = ServerPaths::new(&config.runtime_dir, &config.name).map_err(ServerError::Config)?;
    paths
        .create_private()
        .map_err(io_err("cannot create runtime directory", &paths.dir))?;
    let mut lock = ServerLock::acquire(&paths.lock(), &paths.pid(), &config.name)?;
    // From here on, whatever happens, the lock, the pid file and the
    // folders this run made go when it returns (a failed start too).
    let result = lock
        .write_pid()
        .map_err(io_err("cannot write", &paths.lock()))
        .and_then(|()| serve_locked(config, shutdown, on_ready, &paths, fd_limit));
    let _ = std::fs::remove_file(paths.pid());
    lock.remove();
    // Empty folders only: anything still in them belongs to someone.
    let _ = std::fs::remove_dir(paths.clients());
    let _ = std::fs::remove_dir(&paths.dir);
    if result.is_ok() {
        log::info!("event=stopped");
    }
    result
}

/// [`run`] once the lock is held.
fn serve_locked(
    config: ServerConfig,
    shutdown: Shutdown,
    on_ready: impl FnOnce(&Ready),
    paths: &ServerPaths,
    fd_limit: u64,
) -> Result<(), ServerError> {
    let engine = build_engine(&config)?;

    // A server killed with -9 leaves its FIFO and client FIFOs behind.
    let requests = paths.requests();
    match std::fs::remove_file(&requests) {
        Ok(()) => log::info!("event=stale_fifo_replaced path={}", requests.display()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("cannot remove stale FIFO", &requests)(e)),
    }
    sweep_clients(&paths.clients());
    fifo::mkfifo(&requests, 0o600).map_err(|e| ServerError::Config(e.to_string()))?;
    let shared_reader =
        fifo::open_fifo(&requests, false).map_err(|e| ServerError::Config(e.to_string()))?;
    let requests_id = FileId::of(&shared_reader).map_err(io_err("cannot stat", &requests))?;
    // Our own writer keeps the FIFO from reporting EOF between clients.
    let keepalive =
        fifo::open_fifo(&requests, true).map_err(|e| ServerError::Config(e.to_string()))?;
    let clients_dir =
        FifoDir::open(&paths.clients()).map_err(|e| ServerError::Config(e.to_string()))?;
    let clients_canon = std::fs::canonicalize(paths.clients())
        .map_err(io_err("cannot resolve", &paths.clients()))?;
    lock::write_pid_file(&paths.pid()).map_err(io_err("cannot write", &paths.pid()))?;

    let counters = Arc::new(Counters::new());
    let (jobs_tx, jobs_rx) = crossbeam_channel::bounded::<Job>(config.queue.max(1));
    let workers = pool::start(config.workers, jobs_rx, engine.clone(), counters.clone())
        .map_err(io_err("cannot start worker threads", Path::new("")))?;
    let shared = Arc::new(Shared {
        name: config.name.clone(),
        counters,
        engine: engine.clone(),
        jobs: jobs_tx,
        shutdown: shutdown.clone(),
        grace_deadline: Mutex::new(None),
        live: (Mutex::new(0), Condvar::new()),
        clients: clients_dir,
        in_use: Mutex::new(HashSet::new()),
        config,
    });

    let reloader = if shared.config.reload_interval.is_zero() {
        None
    } else {
        let engine = engine.clone();
        let sd = shutdown.clone();
        let every = shared.config.reload_interval;
        let roots = shared.config.contexts.clone();
        Some(
            std::thread::Builder::new()
                .name("context-watch".into())
                .spawn(move || {
                    ctxwatch::run(&roots, every, sd.fd(), |what| match what {
                        ctxwatch::Reload::Walk => engine.reload_if_changed(),
                        ctxwatch::Reload::Paths(p) => engine.reload_paths(&p),
                    });
                })
                .map_err(io_err("cannot start context-watch thread", Path::new("")))?,
        )
    };

    on_ready(&Ready {
        fifo: requests.clone(),
        engine: engine.info(),
    });
    let mut notifier = Notifier::new(&shared.config.notify);
    notifier.ready(&format!(
        "serving `{}` at {} ({} engine)",
        shared.name,
        requests.display(),
        engine.name()
    ));
    // Idle, the accept loop still turns often enough to keep the watchdog fed.
    let idle_wait = notifier
        .wake_within()
        .map_or(Duration::from_secs(60), |w| w.min(Duration::from_secs(60)));
    log::info!(
        "event=serving name={} fifo={} workers={} engine={}",
        shared.name,
        requests.display(),
        shared.config.workers,
        engine.name()
    );

    // Sessions fit in the descriptors left now, less a reserve.
    let open_now = limits::open_fds().unwrap_or(32);
    let fd_cap = limits::session_capacity(fd_limit, open_now);
    let max_sessions = (shared.config.max_sessions as u64).min(fd_cap).max(1);
    if fd_cap < shared.config.max_sessions as u64 {
        log::warn!(
            "event=fd_limit open_files_limit={fd_limit} open={open_now} sessions_max={max_sessions}: \
             fewer than --max-clients {}; raise the limit (LimitNOFILE=, ulimit -n) for more",
            shared.config.max_sessions
        );
    }
    let limit_note = if max_sessions < shared.config.max_sessions as u64 {
        format!("the open-file limit ({fd_limit}) allows {max_sessions}")
    } else {
        format!("--max-clients {max_sessions}")
    };

    let mut stream = hello::HelloStream::new(shared_reader);
    let mut lines = Vec::new();
    let mut bad = BadHelloLog {
        suppressed: 0,
        window: None,
        logged: 0,
    };
    let session_ids = AtomicU64::new(0);
    let mut next_sweep = Instant::now() + Duration::from_secs(60);
    while !shutdown.is_triggered() {
        // Only this loop pings: if it hangs, the pings stop and systemd
        // (WatchdogSec=) kills and restarts the server.
        notifier.watchdog();
        if Instant::now() >= next_sweep {
            sweep_clients(&paths.clients());
            next_sweep = Instant::now() + Duration::from_secs(60);
        }
        let mut fds = [
            fifo::pollfd(stream.fd(), libc::POLLIN),
            fifo::pollfd(shutdown.fd(), libc::POLLIN),
        ];
        if let Err(e) = fifo::poll(&mut fds, Some(Instant::now() + idle_wait)) {
            log::error!("poll on {}: {e}", requests.display());
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        if fds[1].revents != 0 {
            break;
        }
        if fds[0].revents == 0 {
            continue;
        }
        match stream.fill(&mut lines) {
            Ok(Fill::Data(_)) | Ok(Fill::WouldBlock) => {}
            Ok(Fill::Eof) => {
                // Cannot happen while we hold a writer; never spin on it.
                log::error!("unexpected EOF on {}", requests.display());
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => {
                log::error!("reading {}: {e}", requests.display());
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        for line in lines.drain(..) {
            let hello = match hello::parse(&line) {
                Ok((h, 0)) => h,
                Ok((h, junk)) => {
                    bad.note(&format!(
                        "{junk} bytes of an unfinished frame came before the hello of client {:?} \
                         (a writer sent part of a frame); the hello was read",
                        h.client
                    ));
                    h
                }
                Err(e) => {
                    bad.note(&e);
                    continue;
                }
            };
            let vetted = {
                let in_use = shared.in_use.lock().unwrap_or_else(|p| p.into_inner());
                hello::vet(
                    hello,
                    &hello::Rules {
                        clients: &shared.clients,
                        clients_canon: &clients_canon,
                        requests: &requests,
                        requests_id,
                        in_use: &in_use,
                    },
                )
            };
            let vetted = match vetted {
                Ok(v) => v,
                Err(r) => {
                    bad.note(&format!(
                        "hello of client {:?} refused: {}{}",
                        r.hello.client,
                        r.reason,
                        if r.reply_to.is_some() {
                            " (told the client)"
                        } else {
                            ""
                        }
                    ));
                    if let Some((name, id)) = &r.reply_to {
                        refuse(&shared.clients, name, *id, ErrorCode::Invalid, &r.reason);
                    }
                    continue;
                }
            };
            if shared.counters.sessions() >= max_sessions {
                log::warn!("event=session_refused reason=\"{max_sessions} sessions already open\"");
                let (name, id) = (&vetted.reply, vetted.ids[1]);
                let msg = format!(
                    "the server already has {max_sessions} sessions open ({limit_note}); try again shortly"
                );
                refuse(&shared.clients, name, id, ErrorCode::Overloaded, &msg);
                continue;
            }
            let n = session_ids.fetch_add(1, Ordering::Relaxed) + 1;
            let s = shared.clone();
            let ids = vetted.ids;
            s.session_started(ids);
            s.counters.session(true);
            let spawned = std::thread::Builder::new()
                .name(format!("session-{n}"))
                .spawn(move || {
                    if let Err(e) = session::run(&s, vetted, n) {
                        log::info!("event=session_ended session={n} reason={:?}", e.to_string());
                    }
                    s.counters.session(false);
                    s.session_ended();
                });
            if let Err(e) = spawned {
                log::error!("cannot start a session thread: {e}");
                shared.counters.session(false);
                shared.release_fifos(ids);
                shared.session_ended();
            }
        }
    }

    // Stop accepting: new clients find no FIFO and report "no server".
    notifier.stopping("stopping: finishing in-flight questions");
    log::info!(
        "event=stopping name={} grace_secs={}",
        shared.name,
        shared.config.grace.as_secs_f64()
    );
    let _ = std::fs::remove_file(&requests);
    drop(stream);
    drop(keepalive);
    let deadline = Instant::now() + shared.config.grace;
    *shared
        .grace_deadline
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = Some(deadline);
    let left = shared.wait_sessions(deadline + Duration::from_millis(500));
    if left > 0 {
        log::warn!("event=stop_timeout sessions_left={left}");
    }
    if let Some(r) = reloader {
        let _ = r.join();
    }
    engine.shutdown();
    let all_done = left == 0;
    // How long a worker may still need: an external instance's kill grace.
    let worker_grace = shared.config.kill_grace + Duration::from_secs(2);
    drop(shared);
    if all_done {
        // Every job sender is gone: workers finish their current job and
        // exit. Bounded all the same: a worker still in an engine call past
        // this is left to the process exit.
        let until = Instant::now() + worker_grace;
        while workers.iter().any(|w| !w.is_finished()) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        for w in workers {
            if w.is_finished() {
                let _ = w.join();
            } else {
                log::warn!(
                    "event=stop_timeout worker={:?}: still in the engine; not waited for",
                    w.thread().name()
                );
            }
        }
    }
    Ok(())
}

/// Tell a client no, without a session thread: open its reply FIFO (an
/// entry of `clients/` that passed every check, still the same file), write
/// one error frame, close. Never waits more than 50 ms.
fn refuse(clients: &FifoDir, reply: &std::ffi::OsStr, id: FileId, code: ErrorCode, message: &str) {
    let Ok((out, got)) = clients.open_checked(reply, true) else {
        return;
    };
    if got != id {
        return;
    }
    let reply = Reply::Error(ErrorReply {
        id: None,
        code,
        message: message.to_string(),
    });
    let _ = fifo::write_all(
        &out,
        &frame::encode(&reply),
        Instant::now() + Duration::from_millis(50),
    );
}
