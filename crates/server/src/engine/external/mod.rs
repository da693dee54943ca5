//! External engines: supervised long-lived model processes (`jsonl`,
//! `claude`) or one process per question (`spawn`).
//!
//! Layout: this file holds the configuration and the [`Engine`] the server
//! calls; `supervisor` runs one thread per instance; `process` starts
//! and ends children; each wire protocol is its own module ([`jsonl`],
//! [`claude`], `spawn`) behind the [`wire::Wire`] trait.
//!
//! Each instance has its own supervisor thread (`instance-N`), which owns the
//! child from spawn to reap:
//! - started when the server starts (warm), in its own process group, with
//!   `PR_SET_PDEATHSIG` so it dies with the server even after `kill -9`;
//!   where the protocol has a start-up handshake (claude) it is `starting`
//!   until the instance answers it, and a start that fails keeps the last
//!   lines of its stderr for the error reply and `status`;
//! - fed one question at a time; every output line but API-retry notices
//!   resets a watchdog; when the watchdog (or the request's deadline) fires,
//!   the whole group gets SIGTERM, then SIGKILL after `--kill-grace`, is
//!   reaped, and a fresh instance starts; the question gets an error reply;
//! - replaced at once after a question killed it (watchdog, deadline, exit
//!   after it started answering); restarted after it exits on its own (while
//!   idle, before saying anything about a question, or failing to start) with
//!   backoff (0.1 s doubling to 5 s) and at most
//!   `--restart-limit` such starts per `--restart-window`: beyond that the
//!   instance is reported down instead of spinning;
//! - recycled (stdin closed, then the same escalation) after
//!   `--max-requests` answers, `--max-age`, `--max-session-tokens` (claude),
//!   and for claude after the context changed (between questions, never
//!   in the middle of one), so the next answer reads the new files;
//! - its stderr is logged line by line with the worker id by a
//!   `instance-N-stderr` thread.
//!
//! The server's pool workers hand questions over a bounded channel and wait
//! for the reply until the request's deadline. The context files (for the
//! prompt, the context version and checking citations) come from a
//! [`BuiltinEngine`] used as a catalog.

pub mod claude;
pub mod jsonl;
mod process;
mod spawn;
mod supervisor;
pub mod wire;

use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use autopoll_protocol::{EngineInfo, ErrorCode, Shutdown, WorkerInfo};
use crossbeam_channel::{SendTimeoutError, Sender};

use super::builtin::BuiltinEngine;
use super::citations;
use super::prompt::Prompt;
use super::{Engine, EngineAnswer, EngineError};
use process::kill_group;
use supervisor::{Instance, files_of};
use wire::{Kind, Raw};

/// How external instances are run and supervised.
#[derive(Debug, Clone)]
pub struct ExternalConfig {
    /// The protocol.
    pub kind: Kind,
    /// Program and arguments (`--` ...). For `spawn`, an argument containing
    /// `{question}` gets the prompt; otherwise the prompt goes to stdin.
    /// Empty for `claude`: autopoll runs `claude` with its own arguments.
    pub command: Vec<String>,
    /// Instances (one per server worker).
    pub workers: usize,
    /// Silence after which a question's instance is killed.
    pub watchdog: Duration,
    /// Between SIGTERM and SIGKILL.
    pub kill_grace: Duration,
    /// Silence allowed before the first output of a fresh instance (and
    /// the bound on its start-up handshake).
    pub start_timeout: Duration,
    /// Recycle after this many answers.
    pub max_requests: Option<u64>,
    /// Recycle after this age.
    pub max_age: Option<Duration>,
    /// Unplanned starts allowed per window before the instance is down.
    pub restart_limit: u32,
    /// The window for `restart_limit`.
    pub restart_window: Duration,
    /// The prompt template (one whole prompt per question).
    pub prompt: Prompt,
    /// The system prompt template (`claude` with autopoll's command line).
    pub system_prompt: Prompt,
    /// How autopoll runs `claude` (no command after `--`).
    pub claude: claude::ClaudeOptions,
    /// The folders the context lives in (absolute), which `claude` is
    /// allowed to read (`--add-dir`).
    pub context_dirs: Vec<PathBuf>,
    /// API retries the `claude` CLI may make per call
    /// (`CLAUDE_CODE_MAX_RETRIES`); past them a question fails.
    pub claude_retries: u32,
    /// The server's directory, given to every instance as
    /// `AUTOPOLL_SERVER_DIR` so `autopoll doctor` can tell its processes
    /// (and orphans of an earlier run) from others.
    pub server_dir: PathBuf,
}

impl ExternalConfig {
    /// Instances keep what they read (claude): recycle them when the
    /// context changes.
    fn recycle_on_reload(&self) -> bool {
        self.kind == Kind::Claude
    }
}

struct Job {
    id: u64,
    prompt: String,
    question: String,
    files: Vec<String>,
    version: String,
    deadline: Instant,
    reply: Sender<Result<Raw, EngineError>>,
}

/// What one instance is doing, for `stats`, and its process group for shutdown.
#[derive(Default)]
struct Slot {
    info: Mutex<WorkerInfo>,
    pgid: AtomicI32,
}

impl Slot {
    fn set(&self, f: impl FnOnce(&mut WorkerInfo)) {
        f(&mut self.info.lock().unwrap_or_else(|p| p.into_inner()));
    }

    fn get(&self) -> WorkerInfo {
        self.info.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Running, or about to take a question.
    fn healthy(&self) -> bool {
        matches!(self.get().state.as_str(), "idle" | "busy")
    }
}

fn timeout(msg: String) -> EngineError {
    EngineError {
        code: ErrorCode::Timeout,
        message: msg,
    }
}

fn failed(msg: String) -> EngineError {
    EngineError {
        code: ErrorCode::Engine,
        message: msg,
    }
}

/// The engine behind `--backend jsonl|claude|spawn`.
pub struct ExternalEngine {
    kind: Kind,
    catalog: Arc<BuiltinEngine>,
    jobs: Sender<Job>,
    slots: Vec<Arc<Slot>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    stop: Shutdown,
    kill_grace: Duration,
    next_id: AtomicU64,
    prompt: Prompt,
}

impl std::fmt::Debug for ExternalEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExternalEngine")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl ExternalEngine {
    /// Start `cfg.workers` instances (warm). Fails at once when the command
    /// cannot be started at all.
    pub fn start(cfg: ExternalConfig, catalog: BuiltinEngine) -> Result<ExternalEngine, String> {
        let program = match cfg.command.first() {
            Some(p) => p.clone(),
            None if cfg.kind == Kind::Claude => cfg.claude.bin.clone(),
            None => {
                return Err(format!(
                    "--backend {} needs the command after `--`, e.g. `autopoll-server --backend {} -- ./my-model`",
                    cfg.kind.name(),
                    cfg.kind.name()
                ));
            }
        };
        // A command that cannot run is a configuration error, not a crash loop.
        process::find_program(&program).map_err(|e| {
            if cfg.kind == Kind::Claude && cfg.command.is_empty() {
                format!(
                    "{e}; install Claude Code (npm install -g @anthropic-ai/claude-code) or give its path with --claude-bin"
                )
            } else {
                e
            }
        })?;
        let stop = Shutdown::new().map_err(|e| e.to_string())?;
        let (tx, rx) = crossbeam_channel::bounded::<Job>(cfg.workers.max(1));
        let cfg = Arc::new(cfg);
        let catalog = Arc::new(catalog);
        let slots: Vec<Arc<Slot>> = (0..cfg.workers.max(1))
            .map(|worker| {
                let slot = Arc::new(Slot::default());
                slot.set(|w| {
                    w.worker = worker;
                    w.state = "starting".into();
                });
                slot
            })
            .collect();
        let peers: Arc<[Arc<Slot>]> = slots.clone().into();
        let mut threads = Vec::new();
        for (worker, slot) in slots.iter().enumerate() {
            let inst = Instance::new(
                worker,
                cfg.clone(),
                catalog.clone(),
                slot.clone(),
                peers.clone(),
                stop.clone(),
            );
            let jobs = rx.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("instance-{worker}"))
                    .spawn(move || inst.main(jobs))
                    .map_err(|e| format!("cannot start instance threads: {e}"))?,
            );
        }
        Ok(ExternalEngine {
            kind: cfg.kind,
            catalog,
            jobs: tx,
            slots,
            threads: Mutex::new(threads),
            stop,
            kill_grace: cfg.kill_grace,
            next_id: AtomicU64::new(1),
            prompt: cfg.prompt.clone(),
        })
    }

    fn all_down(&self) -> bool {
        self.slots.iter().all(|s| s.get().state == "down")
    }
}

impl Engine for ExternalEngine {
    fn name(&self) -> &str {
        self.kind.name()
    }

    fn answer(&self, question: &str, deadline: Instant) -> Result<EngineAnswer, EngineError> {
        if self.all_down() {
            let why = self
                .slots
                .first()
                .and_then(|s| s.get().last_error)
                .unwrap_or_default();
            return Err(failed(format!(
                "the {} engine is down: {why}",
                self.kind.name()
            )));
        }
        let (files, version) = files_of(&self.catalog);
        let (tx, rx) = crossbeam_channel::bounded(1);
        let job = Job {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            prompt: self.prompt.render(question, &files, &version),
            question: question.to_string(),
            files: files.iter().map(|f| f.display.clone()).collect(),
            version: version.clone(),
            deadline,
            reply: tx,
        };
        match self.jobs.send_deadline(job, deadline) {
            Ok(()) => {}
            Err(SendTimeoutError::Timeout(_)) => {
                return Err(EngineError {
                    code: ErrorCode::Overloaded,
                    message: "every instance stayed busy until the deadline".into(),
                });
            }
            Err(SendTimeoutError::Disconnected(_)) => {
                return Err(EngineError {
                    code: ErrorCode::ShuttingDown,
                    message: "the engine is stopping".into(),
                });
            }
        }
        // The instance answers, or errs, by the deadline plus its kill grace.
        let raw = match rx.recv_deadline(deadline + self.kill_grace + Duration::from_secs(1)) {
            Ok(r) => r?,
            Err(_) => return Err(timeout("no reply from the instance".into())),
        };
        let (sources, invalid_sources) = citations::check(&raw.sources, &files);
        let mut meta = raw.meta;
        if meta.is_none() && raw.cost_usd.is_some() {
            meta = Some(serde_json::json!({ "cost_usd": raw.cost_usd }));
        }
        Ok(EngineAnswer {
            found: !sources.is_empty(),
            answer: raw.answer,
            sources,
            invalid_sources,
            context_version: version,
            meta,
        })
    }

    fn info(&self) -> EngineInfo {
        let mut i = self.catalog.info();
        i.name = self.kind.name().into();
        i.down = self.all_down();
        i
    }

    fn instances(&self) -> Vec<WorkerInfo> {
        self.slots.iter().map(|s| s.get()).collect()
    }

    fn reload_if_changed(&self) {
        self.catalog.reload();
    }

    fn reload_paths(&self, paths: &[std::path::PathBuf]) {
        self.catalog.reload_paths(paths);
    }

    fn shutdown(&self) {
        self.stop.trigger();
        // Busy instances: end their children now, so readers see EOF.
        for s in &self.slots {
            kill_group(s.pgid.load(Ordering::SeqCst), libc::SIGTERM);
        }
        let mut threads =
            std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        let deadline = Instant::now() + self.kill_grace + Duration::from_secs(2);
        while threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        for s in &self.slots {
            kill_group(s.pgid.load(Ordering::SeqCst), libc::SIGKILL);
        }
        for t in threads.drain(..) {
            if t.is_finished() {
                let _ = t.join();
            } else {
                log::warn!("an instance thread did not stop in time");
            }
        }
    }
}
