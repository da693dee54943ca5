//! External engines: supervised long-lived model processes (`jsonl`,
//! `claude`) or one process per question (`spawn`).
//!
//! Each instance has its own supervisor thread (`instance-N`), which owns the
//! child from spawn to reap:
//! - started when the server starts (warm), in its own process group, with
//!   `PR_SET_PDEATHSIG` so it dies with the server even after `kill -9`;
//! - fed one question at a time; every output line resets a watchdog; when
//!   the watchdog (or the request's deadline) fires, the whole group gets
//!   SIGTERM, then SIGKILL after `--kill-grace`, is reaped, and a fresh
//!   instance starts; the question gets an error reply;
//! - replaced at once after a question killed it (watchdog, deadline, exit
//!   after it started answering); restarted after it exits on its own (while
//!   idle, before saying anything about a question, or failing to start) with
//!   backoff (0.1 s doubling to 5 s) and at most
//!   `--restart-limit` such starts per `--restart-window`: beyond that the
//!   instance is reported down instead of spinning;
//! - recycled (stdin closed, then the same escalation) after
//!   `--max-requests` answers or `--max-age`;
//! - its stderr is logged line by line with the worker id by a
//!   `instance-N-stderr` thread.
//!
//! The server's pool workers hand questions over a bounded channel and wait
//! for the reply until the request's deadline. The context files (for the
//! prompt, the context version and checking citations) come from a
//! [`BuiltinEngine`] used as a catalog.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, BufRead, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use autopoll_protocol::fifo::{self, FifoError, FrameReader};
use autopoll_protocol::frame::FrameError;
use autopoll_protocol::{EngineInfo, ErrorCode, Shutdown, WorkerInfo};
use crossbeam_channel::{Receiver, RecvTimeoutError, SendTimeoutError, Sender};

use super::builtin::BuiltinEngine;
use super::citations::{self, FileLines};
use super::prompt::Prompt;
use super::wire::{self, Event, Kind, Raw};
use super::{Engine, EngineAnswer, EngineError};

/// Longest line read from an instance.
const MAX_LINE: usize = 16 << 20;
/// Most output a `spawn` process may print.
const MAX_SPAWN_OUTPUT: usize = 16 << 20;

/// How external instances are run and supervised.
#[derive(Debug, Clone)]
pub struct ExternalConfig {
    /// The protocol.
    pub kind: Kind,
    /// Program and arguments (`--` ...). For `spawn`, an argument containing
    /// `{question}` gets the prompt; otherwise the prompt goes to stdin.
    pub command: Vec<String>,
    /// Instances (one per server worker).
    pub workers: usize,
    /// Silence after which a question's instance is killed.
    pub watchdog: Duration,
    /// Between SIGTERM and SIGKILL.
    pub kill_grace: Duration,
    /// Silence allowed before the first output of a fresh instance.
    pub start_timeout: Duration,
    /// Recycle after this many answers.
    pub max_requests: Option<u64>,
    /// Recycle after this age.
    pub max_age: Option<Duration>,
    /// Unplanned starts allowed per window before the instance is down.
    pub restart_limit: u32,
    /// The window for `restart_limit`.
    pub restart_window: Duration,
    /// The prompt template.
    pub prompt: Prompt,
    /// The server's directory, given to every instance as
    /// `AUTOPOLL_SERVER_DIR` so `autopoll doctor` can tell its processes
    /// (and orphans of an earlier run) from others.
    pub server_dir: PathBuf,
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

fn kill_group(pgid: i32, sig: i32) {
    if pgid > 0 {
        // SAFETY: signalling a process group we created.
        unsafe { libc::kill(-pgid, sig) };
    }
}

fn set_nonblocking(fd: &impl AsRawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A live child with its pipes.
struct Running {
    child: Child,
    pid: i32,
    stdin: Option<File>,
    out: FrameReader,
    started: Instant,
    served: u64,
}

/// Spawn `command` in its own process group, dying with its parent thread's
/// process; stderr is logged line by line.
fn spawn(
    worker: usize,
    cfg: &ExternalConfig,
    slot: &Slot,
    replace: Option<&str>,
) -> io::Result<Running> {
    let (prog, args) = cfg
        .command
        .split_first()
        .ok_or_else(|| io::Error::other("no command given after --"))?;
    let mut cmd = Command::new(prog);
    for a in args {
        match replace {
            Some(q) if a.contains("{question}") => cmd.arg(a.replace("{question}", q)),
            _ => cmd.arg(a),
        };
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("AUTOPOLL_WORKER", worker.to_string())
        // systemd's notify variables are the server's alone.
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .process_group(0);
    if !cfg.server_dir.as_os_str().is_empty() {
        cmd.env("AUTOPOLL_SERVER_DIR", &cfg.server_dir);
    }
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let pid = i32::try_from(child.id()).unwrap_or(0);
    slot.pgid.store(pid, Ordering::SeqCst);
    let stdin = child.stdin.take().map(|s| File::from(OwnedFd::from(s)));
    let stdout = File::from(OwnedFd::from(
        child
            .stdout
            .take()
            .ok_or_else(|| io::Error::other("no stdout"))?,
    ));
    let nonblocking = stdin
        .as_ref()
        .map_or(Ok(()), set_nonblocking)
        .and_then(|()| set_nonblocking(&stdout));
    if let Err(e) = nonblocking {
        kill_group(pid, libc::SIGKILL);
        let _ = child.wait();
        slot.pgid.store(0, Ordering::SeqCst);
        return Err(e);
    }
    if let Some(err) = child.stderr.take() {
        let spawned = std::thread::Builder::new()
            .name(format!("instance-{worker}-stderr"))
            .spawn(move || {
                let mut r = io::BufReader::new(err);
                let mut line = Vec::new();
                loop {
                    line.clear();
                    match r.by_ref().take(8_192).read_until(b'\n', &mut line) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => log::info!(
                            "worker={worker} pid={pid} stderr: {}",
                            String::from_utf8_lossy(&line).trim_end()
                        ),
                    }
                }
            });
        if let Err(e) = spawned {
            log::warn!("worker={worker}: cannot start the stderr logger: {e}");
        }
    }
    Ok(Running {
        child,
        pid,
        stdin,
        out: FrameReader::new(stdout, MAX_LINE),
        started: Instant::now(),
        served: 0,
    })
}

/// End a child: close stdin (a polite program exits), then SIGTERM to the
/// group, SIGKILL after `grace`, reap, and SIGKILL whatever is left of the
/// group. Returns how it ended.
fn stop_running(mut run: Running, grace: Duration, slot: &Slot, polite: bool) -> String {
    let wait_for = |child: &mut Child, d: Duration| -> Option<std::process::ExitStatus> {
        let until = Instant::now() + d;
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            if Instant::now() >= until {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    drop(run.stdin.take());
    let mut status = if polite {
        wait_for(&mut run.child, grace)
    } else {
        run.child.try_wait().ok().flatten()
    };
    if status.is_none() {
        kill_group(run.pid, libc::SIGTERM);
        status = wait_for(&mut run.child, grace);
    }
    if status.is_none() {
        kill_group(run.pid, libc::SIGKILL);
        status = wait_for(&mut run.child, Duration::from_secs(5));
    }
    kill_group(run.pid, libc::SIGKILL); // stragglers in the group
    slot.pgid.store(0, Ordering::SeqCst);
    if status.is_none() {
        // SIGKILLed and still there: stuck in the kernel (a hung mount).
        // Reap it whenever it goes, without holding up this instance.
        let mut child = run.child;
        let pid = run.pid;
        log::error!(
            "event=instance_stuck pid={pid}: not gone 5 s after SIGKILL; a reaper thread waits for it"
        );
        let _ = std::thread::Builder::new()
            .name(format!("reaper-{pid}"))
            .spawn(move || {
                let _ = child.wait();
            });
        return "stuck after SIGKILL".into();
    }
    match status {
        Some(st) => match (st.code(), st.signal()) {
            (Some(c), _) => format!("exit {c}"),
            (None, Some(s)) => format!("signal {s}"),
            _ => "ended".into(),
        },
        None => "unknown".into(),
    }
}

struct Breaker {
    starts: VecDeque<Instant>,
    limit: u32,
    window: Duration,
}

impl Breaker {
    /// `Err(until)` when `limit` unplanned starts happened within the window.
    fn allow(&mut self, now: Instant) -> Result<(), Instant> {
        while self
            .starts
            .front()
            .is_some_and(|t| now.duration_since(*t) >= self.window)
        {
            self.starts.pop_front();
        }
        if (self.starts.len() as u32) < self.limit {
            Ok(())
        } else {
            Err(self.starts.front().map_or(now, |t| *t + self.window))
        }
    }

    fn record(&mut self, now: Instant) {
        self.starts.push_back(now);
    }
}

/// Sleep until `until` or the stop button; true if stopped.
fn wait_stop(stop: &Shutdown, until: Instant) -> bool {
    let mut fds = [fifo::pollfd(stop.fd(), libc::POLLIN)];
    let _ = fifo::poll(&mut fds, Some(until));
    stop.is_triggered()
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

/// Log output that is not the protocol, at most every 10 s per instance.
fn note_garbage(last: &mut Option<Instant>, worker: usize, sample: &str) {
    let now = Instant::now();
    if last.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10)) {
        log::warn!("worker={worker} printed something that is not the protocol: {sample:?}");
        *last = Some(now);
    }
}

/// What became of the instance during a question.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Still running, ready for the next question.
    Alive,
    /// Killed by the watchdog or the deadline.
    Killed,
    /// Exited after starting to answer.
    Died,
    /// Exited without a word for this question: it was probably already
    /// dying (crash after its previous answer); worth one retry.
    Silent,
}

struct Instance {
    worker: usize,
    cfg: Arc<ExternalConfig>,
    slot: Arc<Slot>,
    stop: Shutdown,
    run: Option<Running>,
    breaker: Breaker,
    failures: u32,
    started_once: bool,
    garbage_logged: Option<Instant>,
}

impl Instance {
    /// Start the child if there is none and the breaker allows. Returns
    /// whether one is running.
    fn ensure(&mut self, unplanned: bool) -> bool {
        if self.run.is_some() {
            return true;
        }
        if self.stop.is_triggered() {
            return false; // never start an instance once shutdown has begun
        }
        let now = Instant::now();
        if unplanned {
            if let Err(until) = self.breaker.allow(now) {
                let msg = format!(
                    "crash loop: {} unplanned starts within {:?}; down until the window passes",
                    self.cfg.restart_limit, self.cfg.restart_window
                );
                let was = self.slot.get().state;
                if was != "down" {
                    log::error!("event=instance_down worker={} reason={msg:?}", self.worker);
                }
                self.slot.set(|w| {
                    w.state = "down".into();
                    w.pid = None;
                    w.last_error = Some(msg);
                });
                wait_stop(&self.stop, until.min(now + Duration::from_secs(1)));
                return false;
            }
            if self.failures > 0 {
                let backoff = Duration::from_millis(100)
                    .saturating_mul(1 << self.failures.saturating_sub(1).min(6))
                    .min(Duration::from_secs(5));
                if wait_stop(&self.stop, now + backoff) {
                    return false;
                }
            }
            self.breaker.record(Instant::now());
        }
        match spawn(self.worker, &self.cfg, &self.slot, None) {
            Ok(r) => {
                log::info!(
                    "event=instance_started worker={} pid={} restart={}",
                    self.worker,
                    r.pid,
                    self.started_once
                );
                let restarted = self.started_once;
                self.slot.set(|w| {
                    w.pid = Some(r.pid as u32);
                    w.state = "idle".into();
                    if restarted {
                        w.restarts += 1;
                    }
                });
                self.started_once = true;
                self.run = Some(r);
                true
            }
            Err(e) => {
                self.failures += 1;
                log::error!(
                    "event=instance_start_failed worker={} reason={:?}",
                    self.worker,
                    e.to_string()
                );
                self.slot.set(|w| {
                    w.state = "down".into();
                    w.last_error = Some(format!("cannot start {:?}: {e}", self.cfg.command[0]));
                });
                false
            }
        }
    }

    /// End the current child (if any), logging why.
    fn end(&mut self, why: &str, polite: bool) {
        if let Some(r) = self.run.take() {
            let pid = r.pid;
            let how = stop_running(r, self.cfg.kill_grace, &self.slot, polite);
            log::info!(
                "event=instance_stopped worker={} pid={pid} reason={why:?} how={how:?}",
                self.worker
            );
            self.slot.set(|w| {
                w.pid = None;
                w.state = "restarting".into();
            });
        }
    }

    /// Ask the running instance.
    fn ask(&mut self, job: &Job) -> (Result<Raw, EngineError>, Fate) {
        let kind = self.cfg.kind;
        let watchdog = self.cfg.watchdog;
        let Some(run) = self.run.as_mut() else {
            return (Err(failed("no instance is running".into())), Fate::Silent);
        };
        let first = if run.served == 0 {
            self.cfg.start_timeout.max(watchdog)
        } else {
            watchdog
        };
        let line = wire::request(
            kind,
            job.id,
            &job.question,
            &job.prompt,
            &job.files,
            &job.version,
        );
        let start = Instant::now();
        if let Some(stdin) = &run.stdin
            && let Err(e) = fifo::write_all(stdin, &line, (start + first).min(job.deadline))
        {
            return match e {
                FifoError::Timeout => (
                    Err(timeout(format!(
                        "the instance did not take the question within {first:?}; killed and replaced"
                    ))),
                    Fate::Killed,
                ),
                _ => (
                    Err(failed(
                        "the instance exited before taking the question".into(),
                    )),
                    Fate::Silent,
                ),
            };
        }
        let mut quiet_until = start + first;
        let mut allowed = first;
        let mut heard = false;
        loop {
            let d = quiet_until.min(job.deadline);
            match run.out.read_frame(Some(d)) {
                Ok(Some(line)) => {
                    quiet_until = Instant::now() + watchdog;
                    allowed = watchdog;
                    heard = true;
                    match wire::event(kind, job.id, &line) {
                        Event::Progress => {}
                        Event::Done(raw) => return (Ok(raw), Fate::Alive),
                        Event::Failed(m) => return (Err(failed(m)), Fate::Alive),
                        Event::Garbage(g) => {
                            note_garbage(&mut self.garbage_logged, self.worker, &g)
                        }
                    }
                }
                Ok(None) => {
                    let fate = if heard { Fate::Died } else { Fate::Silent };
                    return (
                        Err(failed("the instance exited while answering".into())),
                        fate,
                    );
                }
                Err(FifoError::Timeout) => {
                    let why = if Instant::now() >= job.deadline {
                        "the request's deadline passed".to_string()
                    } else {
                        format!("no output for {:.1} s (watchdog)", allowed.as_secs_f64())
                    };
                    return (
                        Err(timeout(format!(
                            "{why}; the instance was killed and replaced"
                        ))),
                        Fate::Killed,
                    );
                }
                Err(FifoError::Frame(FrameError::TooLarge { .. })) => {
                    let worker = self.worker;
                    log::warn!("worker={worker} printed a line over 16 MiB; skipped");
                }
                Err(FifoError::Frame(FrameError::Truncated(_))) => {
                    return (
                        Err(failed("the instance exited in the middle of a line".into())),
                        Fate::Died,
                    );
                }
                Err(e) => {
                    return (
                        Err(failed(format!("reading from the instance: {e}"))),
                        Fate::Died,
                    );
                }
            }
        }
    }

    /// One process for one question.
    fn ask_spawn(&mut self, job: &Job) -> Result<Raw, EngineError> {
        let as_arg = self
            .cfg
            .command
            .iter()
            .skip(1)
            .any(|a| a.contains("{question}"));
        let mut run = spawn(
            self.worker,
            &self.cfg,
            &self.slot,
            as_arg.then_some(job.prompt.as_str()),
        )
        .map_err(|e| failed(format!("cannot start {:?}: {e}", self.cfg.command[0])))?;
        self.slot.set(|w| w.pid = Some(run.pid as u32));
        let start = Instant::now();
        let first = self.cfg.start_timeout.max(self.cfg.watchdog);
        let mut result: Result<(), EngineError> = Ok(());
        if let Some(stdin) = run.stdin.take()
            && !as_arg
            && let Err(e) = fifo::write_all(
                &stdin,
                job.prompt.as_bytes(),
                (start + first).min(job.deadline),
            )
            && !matches!(e, FifoError::Closed)
        {
            result = Err(timeout(format!(
                "the process did not read its question: {e}"
            )));
        }
        let mut out = Vec::new();
        let mut quiet_until = start + first;
        while result.is_ok() {
            match run.out.read_frame(Some(quiet_until.min(job.deadline))) {
                Ok(Some(line)) => {
                    quiet_until = Instant::now() + self.cfg.watchdog;
                    out.extend_from_slice(&line);
                    out.push(b'\n');
                    if out.len() > MAX_SPAWN_OUTPUT {
                        result = Err(failed("the process printed more than 16 MiB".into()));
                    }
                }
                Ok(None) => break,
                Err(FifoError::Frame(FrameError::Truncated(_))) => {
                    out.extend_from_slice(&run.out.take_pending());
                    break;
                }
                Err(FifoError::Timeout) => {
                    result = Err(timeout(if Instant::now() >= job.deadline {
                        "the request's deadline passed; the process was killed".into()
                    } else {
                        format!(
                            "no output for {:?} (watchdog); the process was killed",
                            self.cfg.watchdog
                        )
                    }));
                }
                Err(e) => result = Err(failed(format!("reading from the process: {e}"))),
            }
        }
        // Give it `kill_grace` to exit on its own once its output is done.
        let polite = result.is_ok();
        let how = stop_running(run, self.cfg.kill_grace, &self.slot, polite);
        self.slot.set(|w| w.pid = None);
        result?;
        if how != "exit 0" {
            return Err(failed(format!("the process ended with {how}")));
        }
        match wire::spawn_output(&out) {
            Event::Done(raw) => Ok(raw),
            Event::Failed(m) => Err(failed(m)),
            _ => Err(failed("the process printed no answer".into())),
        }
    }

    fn main(mut self, jobs: Receiver<Job>) {
        let spawn_mode = self.cfg.kind == Kind::Spawn;
        if spawn_mode {
            self.slot.set(|w| w.state = "idle".into());
        }
        let mut unplanned = false;
        loop {
            if self.stop.is_triggered() {
                self.end("server stopping", false);
                self.slot.set(|w| w.state = "stopped".into());
                // Nobody will take what is still queued: answer it now, so no
                // pool worker waits out its deadline (and stalls shutdown).
                while let Ok(job) = jobs.try_recv() {
                    let _ = job.reply.send(Err(EngineError {
                        code: ErrorCode::ShuttingDown,
                        message: "the server is stopping".into(),
                    }));
                }
                return;
            }
            if !spawn_mode && !self.ensure(unplanned) {
                // A failed or refused start: the next try goes through
                // backoff and the breaker.
                unplanned = true;
                continue;
            }
            unplanned = false;
            let young = self
                .run
                .as_ref()
                .is_some_and(|r| r.started.elapsed() < Duration::from_secs(5));
            let tick = if young {
                Duration::from_millis(100)
            } else {
                Duration::from_secs(1)
            };
            let job = match jobs.recv_timeout(tick) {
                Ok(j) => j,
                Err(RecvTimeoutError::Timeout) => {
                    if self.stop.is_triggered() {
                        continue;
                    }
                    if let Some(r) = self.run.as_mut()
                        && let Ok(Some(st)) = r.child.try_wait()
                    {
                        let msg = format!("exited while idle ({st})");
                        log::warn!(
                            "event=instance_exited worker={} pid={} status={st:?}",
                            self.worker,
                            r.pid
                        );
                        self.slot.set(|w| w.last_error = Some(msg.clone()));
                        self.failures += 1;
                        self.end(&msg, false);
                        unplanned = true;
                    } else if let Some(r) = &self.run
                        && self.cfg.max_age.is_some_and(|a| r.started.elapsed() >= a)
                    {
                        self.end("max age reached", true);
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.stop.trigger();
                    continue;
                }
            };
            if Instant::now() >= job.deadline {
                let _ = job.reply.send(Err(EngineError {
                    code: ErrorCode::Overloaded,
                    message: "the request waited past its deadline".into(),
                }));
                continue;
            }
            // An instance that died since its last question is replaced first.
            if let Some(r) = self.run.as_mut()
                && let Ok(Some(st)) = r.child.try_wait()
            {
                log::warn!(
                    "event=instance_exited worker={} pid={} status={st:?}",
                    self.worker,
                    r.pid
                );
                self.failures += 1;
                self.end("exited while idle", false);
                if !self.ensure(true) {
                    let err = self.slot.get().last_error.unwrap_or_default();
                    let _ = job
                        .reply
                        .send(Err(failed(format!("no instance available: {err}"))));
                    continue;
                }
            }
            self.slot.set(|w| w.state = "busy".into());
            let (mut result, mut fate) = if spawn_mode {
                (self.ask_spawn(&job), Fate::Alive)
            } else {
                self.ask(&job)
            };
            if fate == Fate::Silent && Instant::now() < job.deadline && !self.stop.is_triggered() {
                // It died without a word about this question: probably it was
                // already dying, or it cannot start properly. That is crash-loop
                // evidence (backoff, breaker); asking is read-only, so one more
                // try on a fresh instance.
                self.failures += 1;
                self.end("exited before answering", false);
                if self.ensure(true) {
                    (result, fate) = self.ask(&job);
                }
            }
            match &result {
                Ok(raw) => {
                    self.failures = 0;
                    if let Some(r) = self.run.as_mut() {
                        r.served += 1;
                    }
                    self.slot.set(|w| {
                        w.served += 1;
                        if let Some(c) = raw.cost_usd {
                            *w.cost_usd.get_or_insert(0.0) += c;
                        }
                    });
                }
                Err(e) => {
                    log::warn!(
                        "event=question_failed worker={} reason={:?}",
                        self.worker,
                        e.message
                    );
                    self.slot.set(|w| w.last_error = Some(e.message.clone()));
                }
            }
            let _ = job.reply.send(result);
            if fate != Fate::Alive {
                // The question's doing (a hang, a crash on this input): replace
                // the instance at once. The poller's attempts deal with a
                // question that keeps doing it. Exits while idle, exits
                // before saying anything, and failed starts count towards the
                // crash-loop breaker.
                self.end("watchdog, deadline or exit during a question", false);
                if fate == Fate::Silent {
                    self.failures += 1;
                    unplanned = true;
                }
                continue;
            }
            self.slot.set(|w| w.state = "idle".into());
            if let Some(r) = &self.run {
                let by_count = self.cfg.max_requests.is_some_and(|m| r.served >= m);
                let by_age = self.cfg.max_age.is_some_and(|a| r.started.elapsed() >= a);
                if by_count || by_age {
                    self.end(
                        if by_count {
                            "max requests reached"
                        } else {
                            "max age reached"
                        },
                        true,
                    );
                }
            }
        }
    }
}

/// The program `name` resolves to (as exec would: a path, or a search of
/// `PATH`), if it exists and is executable.
fn find_program(name: &str) -> Result<std::path::PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let ok = |p: &std::path::Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if name.contains('/') {
        let p = std::path::PathBuf::from(name);
        return if ok(&p) {
            Ok(p)
        } else {
            Err(format!("cannot run {name:?}: not an executable file"))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| ok(p))
        .ok_or_else(|| format!("cannot run {name:?}: not found in PATH"))
}

impl ExternalEngine {
    /// Start `cfg.workers` instances (warm). Fails at once when the command
    /// cannot be started at all.
    pub fn start(cfg: ExternalConfig, catalog: BuiltinEngine) -> Result<ExternalEngine, String> {
        if cfg.command.is_empty() {
            return Err(format!(
                "--backend {} needs the command after `--`, e.g. `autopoll-server --backend {} -- ./my-model`",
                cfg.kind.name(),
                cfg.kind.name()
            ));
        }
        // A command that cannot run is a configuration error, not a crash loop.
        find_program(&cfg.command[0])?;
        let stop = Shutdown::new().map_err(|e| e.to_string())?;
        let (tx, rx) = crossbeam_channel::bounded::<Job>(cfg.workers.max(1));
        let cfg = Arc::new(cfg);
        let mut slots = Vec::new();
        let mut threads = Vec::new();
        for worker in 0..cfg.workers.max(1) {
            let slot = Arc::new(Slot::default());
            slot.set(|w| {
                w.worker = worker;
                w.state = "starting".into();
            });
            let inst = Instance {
                worker,
                cfg: cfg.clone(),
                slot: slot.clone(),
                stop: stop.clone(),
                run: None,
                breaker: Breaker {
                    starts: VecDeque::new(),
                    limit: cfg.restart_limit.max(1),
                    window: cfg.restart_window,
                },
                failures: 0,
                started_once: false,
                garbage_logged: None,
            };
            let jobs = rx.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("instance-{worker}"))
                    .spawn(move || inst.main(jobs))
                    .map_err(|e| format!("cannot start instance threads: {e}"))?,
            );
            slots.push(slot);
        }
        Ok(ExternalEngine {
            kind: cfg.kind,
            catalog: Arc::new(catalog),
            jobs: tx,
            slots,
            threads: Mutex::new(threads),
            stop,
            kill_grace: cfg.kill_grace,
            next_id: AtomicU64::new(1),
            prompt: cfg.prompt.clone(),
        })
    }

    fn files(&self) -> (Vec<FileLines>, String) {
        let index = self.catalog.index();
        let files = index
            .files()
            .iter()
            .map(|f| FileLines {
                display: f.display.clone(),
                lines: f.lines,
            })
            .collect();
        (files, index.version().to_string())
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
        let (files, version) = self.files();
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
        Ok(EngineAnswer {
            found: !sources.is_empty(),
            answer: raw.answer,
            sources,
            invalid_sources,
            context_version: version,
            meta: raw.meta,
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
