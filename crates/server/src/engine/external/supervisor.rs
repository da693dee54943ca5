//! One supervisor thread per instance (`instance-N`): it owns the child
//! from spawn to reap, feeds it one question at a time through its
//! [`Wire`], and decides when to start, keep, replace, recycle or give up on
//! it (the rules are in the module doc of [`super`] and docs/BACKENDS.md).

use std::collections::VecDeque;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use autopoll_protocol::fifo::{self, FifoError};
use autopoll_protocol::frame::FrameError;
use autopoll_protocol::{ErrorCode, Shutdown};
use crossbeam_channel::{Receiver, RecvTimeoutError};

use super::super::EngineError;
use super::super::builtin::BuiltinEngine;
use super::super::citations::FileLines;
use super::process::{self, Running, Spec};
use super::wire::{Event, Kind, Question, Raw, Wire};
use super::{ExternalConfig, Job, Slot, claude, failed, jsonl, spawn, timeout};

/// How a failed start's error begins.
const START_FAILED: &str = "the instance failed to start: ";

/// An error that describes starting, not answering.
fn is_start_problem(e: &str) -> bool {
    e.starts_with(START_FAILED) || e.starts_with("crash loop")
}

pub(super) struct Breaker {
    starts: VecDeque<Instant>,
    limit: u32,
    window: Duration,
}

impl Breaker {
    pub(super) fn new(limit: u32, window: Duration) -> Breaker {
        Breaker {
            starts: VecDeque::new(),
            limit: limit.max(1),
            window,
        }
    }

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

pub(super) struct Instance {
    pub(super) worker: usize,
    pub(super) cfg: Arc<ExternalConfig>,
    pub(super) catalog: Arc<BuiltinEngine>,
    pub(super) slot: Arc<Slot>,
    /// Every instance's slot (this one's included): a question is refused at
    /// once only when no instance can take it.
    peers: Arc<[Arc<Slot>]>,
    pub(super) stop: Shutdown,
    pub(super) breaker: Breaker,
    run: Option<Running>,
    wire: Option<Box<dyn Wire>>,
    failures: u32,
    started_once: bool,
    garbage_logged: Option<Instant>,
}

/// The context files and version, as the prompt and the citations see them.
pub(super) fn files_of(catalog: &BuiltinEngine) -> (Vec<FileLines>, String) {
    let index = catalog.index();
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

impl Instance {
    pub(super) fn new(
        worker: usize,
        cfg: Arc<ExternalConfig>,
        catalog: Arc<BuiltinEngine>,
        slot: Arc<Slot>,
        peers: Arc<[Arc<Slot>]>,
        stop: Shutdown,
    ) -> Instance {
        Instance {
            worker,
            breaker: Breaker::new(cfg.restart_limit, cfg.restart_window),
            cfg,
            catalog,
            slot,
            peers,
            stop,
            run: None,
            wire: None,
            failures: 0,
            started_once: false,
            garbage_logged: None,
        }
    }

    /// autopoll runs `claude` with its own command line (no command after `--`).
    fn managed_claude(&self) -> bool {
        self.cfg.kind == Kind::Claude && self.cfg.command.is_empty()
    }

    /// Variables added for the child: Claude Code's retry budget and
    /// traffic settings for `claude`, and for `spawn` too (where the program
    /// is usually `claude -p`).
    fn env(&self) -> Vec<(String, String)> {
        match self.cfg.kind {
            Kind::Claude | Kind::Spawn => claude::environment(self.cfg.claude_retries),
            Kind::Jsonl => Vec::new(),
        }
    }

    /// Where the session's system prompt goes: the server's private
    /// directory (one server per directory, so one file per worker).
    fn system_prompt_path(&self) -> PathBuf {
        if self.cfg.server_dir.as_os_str().is_empty() {
            std::env::temp_dir().join(format!(
                "autopoll-{}-instance-{}.system-prompt.md",
                std::process::id(),
                self.worker
            ))
        } else {
            self.cfg
                .server_dir
                .join(format!("instance-{}.system-prompt.md", self.worker))
        }
    }

    /// Write the session's system prompt for `claude`; its path.
    fn write_system_prompt(&self, files: &[FileLines], version: &str) -> std::io::Result<PathBuf> {
        let path = self.system_prompt_path();
        let root = std::env::current_dir().unwrap_or_default();
        let text = self
            .cfg
            .system_prompt
            .render_system(files, version, &root.to_string_lossy());
        let tmp = path.with_extension("tmp");
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(path)
    }

    fn new_wire(&self) -> Box<dyn Wire> {
        match self.cfg.kind {
            Kind::Claude => Box::new(claude::Claude::new(
                self.managed_claude(),
                self.cfg.claude_retries,
            )),
            Kind::Jsonl | Kind::Spawn => Box::new(jsonl::Jsonl),
        }
    }

    /// Start the child and wait for its readiness.
    fn start(&mut self) -> Result<(), String> {
        let (files, version) = files_of(&self.catalog);
        let argv = if self.managed_claude() {
            let prompt = self
                .write_system_prompt(&files, &version)
                .map_err(|e| format!("cannot write the system prompt file: {e}"))?;
            claude::command(&self.cfg.claude, &prompt, &self.cfg.context_dirs)
        } else {
            self.cfg.command.clone()
        };
        let env = self.env();
        let spec = Spec {
            argv: &argv,
            env: &env,
            server_dir: &self.cfg.server_dir,
            version: &version,
        };
        let mut r = process::spawn(self.worker, &spec, &self.slot)
            .map_err(|e| format!("cannot start {:?}: {e}", argv[0]))?;
        let mut wire = self.new_wire();
        self.slot.set(|w| {
            w.pid = Some(r.pid as u32);
            w.state = "starting".into();
        });
        if let Some(hello) = wire.hello()
            && let Err(e) = self.await_ready(&mut r, wire.as_mut(), &hello)
        {
            let tail = r.stderr.clone();
            let how = process::stop_running(r, self.cfg.kill_grace, &self.slot, false);
            self.slot.set(|w| w.pid = None);
            return Err(format!("{e} ({how}){}", tail.suffix()));
        }
        log::info!(
            "event=instance_started worker={} pid={} restart={}",
            self.worker,
            r.pid,
            self.started_once
        );
        self.run = Some(r);
        self.wire = Some(wire);
        Ok(())
    }

    /// Send the start-up handshake and read until the instance says it is
    /// ready, within `--start-timeout`, or the stop button.
    fn await_ready(
        &self,
        r: &mut Running,
        wire: &mut dyn Wire,
        hello: &[u8],
    ) -> Result<(), String> {
        let deadline = Instant::now() + self.cfg.start_timeout;
        if let Some(stdin) = &r.stdin
            && let Err(e) = fifo::write_all(stdin, hello, deadline)
        {
            return Err(match e {
                FifoError::Timeout => "it did not read its start-up handshake".into(),
                _ => "it exited while starting".into(),
            });
        }
        loop {
            if self.stop.is_triggered() {
                return Err("the server is stopping".into());
            }
            let slice = (Instant::now() + Duration::from_millis(200)).min(deadline);
            match r.out.read_frame(Some(slice)) {
                Ok(Some(line)) => match wire.event(0, &line) {
                    Event::Ready => return Ok(()),
                    Event::Failed(m) => return Err(m),
                    // A child that talks fast enough never lets the read
                    // time out: the bound is checked after every line.
                    _ if Instant::now() >= deadline => {
                        return Err(format!(
                            "it did not become ready within {:.0} s (--start-timeout)",
                            self.cfg.start_timeout.as_secs_f64()
                        ));
                    }
                    _ => {}
                },
                Ok(None) | Err(FifoError::Frame(FrameError::Truncated(_))) => {
                    return Err("it exited while starting".into());
                }
                Err(FifoError::Timeout) if Instant::now() < deadline => {}
                Err(FifoError::Timeout) => {
                    return Err(format!(
                        "it did not become ready within {:.0} s (--start-timeout)",
                        self.cfg.start_timeout.as_secs_f64()
                    ));
                }
                Err(FifoError::Frame(FrameError::TooLarge { .. })) => {}
                Err(e) => return Err(format!("reading from it: {e}")),
            }
        }
    }

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
                let last = self.slot.get().last_error;
                let tripped = last.as_deref().is_some_and(|l| l.starts_with("crash loop"));
                if !tripped {
                    let mut msg = format!(
                        "crash loop: {} unplanned starts within {:?}; down until the window passes",
                        self.cfg.restart_limit, self.cfg.restart_window
                    );
                    if let Some(l) = last {
                        msg.push_str("; last failure: ");
                        msg.push_str(&l);
                    }
                    log::error!("event=instance_down worker={} reason={msg:?}", self.worker);
                    self.slot.set(|w| {
                        w.state = "down".into();
                        w.pid = None;
                        w.last_error = Some(msg);
                    });
                }
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
        match self.start() {
            Ok(()) => {
                let restarted = self.started_once;
                self.slot.set(|w| {
                    w.state = "idle".into();
                    if restarted {
                        w.restarts += 1;
                    }
                    // A start problem is over once a start works.
                    if w.last_error.as_deref().is_some_and(is_start_problem) {
                        w.last_error = None;
                    }
                });
                self.started_once = true;
                true
            }
            Err(_) if self.stop.is_triggered() => {
                self.slot.set(|w| {
                    w.state = "stopped".into();
                    w.pid = None;
                });
                false
            }
            Err(e) => {
                self.failures += 1;
                log::error!(
                    "event=instance_start_failed worker={} reason={e:?}",
                    self.worker
                );
                // Not `down` yet: that is the breaker's word, after
                // --restart-limit such starts.
                self.slot.set(|w| {
                    w.state = "restarting".into();
                    w.pid = None;
                    w.last_error = Some(format!("{START_FAILED}{e}"));
                });
                false
            }
        }
    }

    /// End the current child (if any), logging why.
    fn end(&mut self, why: &str, polite: bool) {
        self.wire = None;
        if let Some(r) = self.run.take() {
            let pid = r.pid;
            let how = process::stop_running(r, self.cfg.kill_grace, &self.slot, polite);
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
        let watchdog = self.cfg.watchdog;
        let (Some(run), Some(wire)) = (self.run.as_mut(), self.wire.as_mut()) else {
            return (Err(failed("no instance is running".into())), Fate::Silent);
        };
        let first = if run.served == 0 {
            self.cfg.start_timeout.max(watchdog)
        } else {
            watchdog
        };
        let line = wire.request(&Question {
            id: job.id,
            question: &job.question,
            prompt: &job.prompt,
            files: &job.files,
            version: &job.version,
        });
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
                    Err(failed(format!(
                        "the instance exited before taking the question{}",
                        run.stderr.suffix()
                    ))),
                    Fate::Silent,
                ),
            };
        }
        let mut quiet_until = start + first;
        let mut allowed = first;
        let mut heard = false;
        let mut retries: Vec<String> = Vec::new();
        // After giving up on a turn: the result of the interrupt must come
        // by then, or the instance is replaced.
        let mut gave_up: Option<(String, Instant)> = None;
        loop {
            let d = match &gave_up {
                Some((_, until)) => *until,
                None => quiet_until.min(job.deadline),
            };
            match run.out.read_frame(Some(d)) {
                Ok(Some(line)) => {
                    let ev = wire.event(job.id, &line);
                    if !matches!(ev, Event::Retry(_) | Event::GiveUp(_)) {
                        quiet_until = Instant::now() + watchdog;
                        allowed = watchdog;
                    }
                    let now = Instant::now();
                    let over = match &gave_up {
                        Some((_, until)) => now >= *until,
                        None => now >= job.deadline || now >= quiet_until,
                    };
                    heard = true;
                    if let Some((msg, _)) = &gave_up {
                        // Waiting for the interrupted turn to end: its result
                        // is swallowed by the wire (Progress); anything that
                        // says the turn is over will do.
                        if let Event::Done(_) | Event::Failed(_) = ev {
                            return (Err(failed(msg.clone())), Fate::Alive);
                        }
                        if wire_idle_after_interrupt(&line) {
                            return (Err(failed(msg.clone())), Fate::Alive);
                        }
                        if over {
                            return (
                                Err(failed(format!(
                                    "{msg}; it did not stop, so it was replaced"
                                ))),
                                Fate::Killed,
                            );
                        }
                        continue;
                    }
                    // A child that talks fast enough never lets the read time
                    // out: the deadline (and the watchdog, which only
                    // progress moves) is checked after every line.
                    let ends_it =
                        matches!(ev, Event::Done(_) | Event::Failed(_) | Event::GiveUp(_));
                    if over && !ends_it {
                        let why = if Instant::now() >= job.deadline {
                            "the request's deadline passed".to_string()
                        } else {
                            format!("no progress for {:.1} s (watchdog)", allowed.as_secs_f64())
                        };
                        return (
                            Err(timeout(format!(
                                "{why}; the instance was killed and replaced"
                            ))),
                            Fate::Killed,
                        );
                    }
                    match ev {
                        Event::Progress | Event::Ready => {}
                        Event::Retry(what) => {
                            log::warn!(
                                "event=api_retry worker={} attempt={} what={what:?}",
                                self.worker,
                                retries.len() + 1
                            );
                            retries.push(what);
                        }
                        Event::GiveUp(msg) => {
                            log::warn!("event=api_give_up worker={} what={msg:?}", self.worker);
                            let Some(int) = wire.interrupt() else {
                                return (Err(failed(msg)), Fate::Killed);
                            };
                            // The pool worker waits until the deadline plus
                            // the kill grace: answer by then.
                            let now = Instant::now();
                            let until = (now + self.cfg.kill_grace.max(Duration::from_secs(5)))
                                .min(job.deadline + self.cfg.kill_grace)
                                .max(now + Duration::from_millis(500));
                            if let Some(stdin) = &run.stdin
                                && fifo::write_all(stdin, &int, until).is_err()
                            {
                                return (Err(failed(msg)), Fate::Killed);
                            }
                            gave_up = Some((msg, until));
                        }
                        Event::Done(raw) => return (Ok(raw), Fate::Alive),
                        Event::Failed(m) => return (Err(failed(m)), Fate::Alive),
                        Event::Garbage(g) => {
                            note_garbage(&mut self.garbage_logged, self.worker, &g)
                        }
                    }
                }
                Ok(None) => {
                    let fate = if heard { Fate::Died } else { Fate::Silent };
                    let code = run
                        .child
                        .try_wait()
                        .ok()
                        .flatten()
                        .map(|st| format!(" ({})", process::describe(st)))
                        .unwrap_or_default();
                    return (
                        Err(failed(format!(
                            "the instance exited while answering{code}{}",
                            run.stderr.suffix()
                        ))),
                        fate,
                    );
                }
                Err(FifoError::Timeout) => {
                    if let Some((msg, _)) = gave_up {
                        return (
                            Err(failed(format!(
                                "{msg}; it did not stop, so it was replaced"
                            ))),
                            Fate::Killed,
                        );
                    }
                    let why = if Instant::now() >= job.deadline {
                        "the request's deadline passed".to_string()
                    } else {
                        format!("no output for {:.1} s (watchdog)", allowed.as_secs_f64())
                    };
                    let retried = retries
                        .last()
                        .map(|r| format!(" after {} API retries ({r})", retries.len()))
                        .unwrap_or_default();
                    return (
                        Err(timeout(format!(
                            "{why}{retried}; the instance was killed and replaced"
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

    /// Why the running instance should be recycled before its next
    /// question, if it should.
    /// `for_question`: a question waits for it. While idle, a session that
    /// has read nothing is recycled at most every 30 s, so a context that
    /// changes all the time does not restart the CLI every second.
    fn stale(&self, for_question: bool) -> Option<String> {
        let r = self.run.as_ref()?;
        let changed = self.cfg.recycle_on_reload() && r.version != self.catalog.index().version();
        let worth_it =
            for_question || r.served > 0 || r.started.elapsed() >= Duration::from_secs(30);
        if changed && worth_it {
            return Some("the context changed".into());
        }
        if self.cfg.max_age.is_some_and(|a| r.started.elapsed() >= a) {
            return Some("max age reached".into());
        }
        None
    }

    pub(super) fn main(mut self, jobs: Receiver<Job>) {
        let spawn_mode = self.cfg.kind == Kind::Spawn;
        if spawn_mode {
            self.slot.set(|w| w.state = "idle".into());
        }
        let mut unplanned = false;
        loop {
            if self.stop.is_triggered() {
                self.end("server stopping", false);
                self.slot.set(|w| w.state = "stopped".into());
                if self.managed_claude() {
                    let _ = std::fs::remove_file(self.system_prompt_path());
                }
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
                // backoff and the breaker. Questions waiting meanwhile get
                // the reason now, unless another instance can answer them.
                unplanned = true;
                if !self.peers.iter().any(|p| p.healthy()) {
                    let why = self.slot.get().last_error.unwrap_or_default();
                    while let Ok(job) = jobs.try_recv() {
                        let _ = job
                            .reply
                            .send(Err(failed(format!("no instance available: {why}"))));
                    }
                }
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
                        let msg = format!(
                            "exited while idle ({}){}",
                            process::describe(st),
                            r.stderr.suffix()
                        );
                        log::warn!(
                            "event=instance_exited worker={} pid={} status={st:?}",
                            self.worker,
                            r.pid
                        );
                        self.slot.set(|w| w.last_error = Some(msg.clone()));
                        self.failures += 1;
                        self.end(&msg, false);
                        unplanned = true;
                    } else if let Some(why) = self.stale(false) {
                        // Recycled while idle, so the next question does not
                        // wait for the start.
                        self.end(&why, true);
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
            // An instance that died since its last question is replaced
            // first, and one that is stale (context changed) is recycled.
            if let Some(r) = self.run.as_mut()
                && let Ok(Some(st)) = r.child.try_wait()
            {
                log::warn!(
                    "event=instance_exited worker={} pid={} status={st:?}",
                    self.worker,
                    r.pid
                );
                let msg = format!(
                    "exited while idle ({}){}",
                    process::describe(st),
                    r.stderr.suffix()
                );
                self.slot.set(|w| w.last_error = Some(msg));
                self.failures += 1;
                self.end("exited while idle", false);
                if !self.ensure(true) {
                    let err = self.slot.get().last_error.unwrap_or_default();
                    let _ = job
                        .reply
                        .send(Err(failed(format!("no instance available: {err}"))));
                    continue;
                }
            } else if let Some(why) = self.stale(true) {
                self.end(&why, true);
                if !self.ensure(false) {
                    let err = self.slot.get().last_error.unwrap_or_default();
                    let _ = job
                        .reply
                        .send(Err(failed(format!("no instance available: {err}"))));
                    unplanned = true;
                    continue;
                }
            }
            if Instant::now() >= job.deadline {
                // Replacing the instance took it: do not ask a fresh,
                // healthy instance with no time left (it would be killed).
                let _ = job.reply.send(Err(timeout(
                    "the request's deadline passed while a fresh instance started".into(),
                )));
                continue;
            }
            self.slot.set(|w| w.state = "busy".into());
            let (mut result, mut fate) = if spawn_mode {
                let env = self.env();
                (
                    spawn::ask(self.worker, &self.cfg, &self.slot, &env, &job),
                    Fate::Alive,
                )
            } else {
                self.ask(&job)
            };
            // Whether this question's crash was already counted.
            let mut counted = false;
            if fate == Fate::Silent && Instant::now() < job.deadline && !self.stop.is_triggered() {
                // It died without a word about this question: probably it was
                // already dying, or it cannot start properly. That is crash-loop
                // evidence (backoff, breaker); asking is read-only, so one more
                // try on a fresh instance.
                self.failures += 1;
                counted = true;
                self.end("exited before answering", false);
                if self.ensure(true) {
                    if Instant::now() >= job.deadline {
                        result = Err(timeout(
                            "the request's deadline passed while a fresh instance started".into(),
                        ));
                        fate = Fate::Alive;
                    } else {
                        self.slot.set(|w| w.state = "busy".into());
                        (result, fate) = self.ask(&job);
                        counted = false;
                    }
                }
            }
            // What the instance spent on this question, whatever came of
            // it (a failed turn costs too).
            let spent = self
                .wire
                .as_mut()
                .and_then(|w| w.take_cost())
                .or_else(|| result.as_ref().ok().and_then(|r| r.cost_usd));
            if let Some(c) = spent {
                self.slot.set(|w| *w.cost_usd.get_or_insert(0.0) += c);
            }
            match &result {
                Ok(_) => {
                    self.failures = 0;
                    if let Some(r) = self.run.as_mut() {
                        r.served += 1;
                    }
                    self.slot.set(|w| w.served += 1);
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
                    if !counted {
                        self.failures += 1;
                    }
                    unplanned = true;
                }
                continue;
            }
            self.slot.set(|w| w.state = "idle".into());
            self.recycle_after_answer();
        }
    }

    /// Recycle on schedule: `--max-requests`, `--max-age`,
    /// `--max-session-tokens`.
    fn recycle_after_answer(&mut self) {
        let Some(r) = &self.run else {
            return;
        };
        let history = self.wire.as_ref().and_then(|w| w.history_tokens());
        let why = if self.cfg.max_requests.is_some_and(|m| r.served >= m) {
            Some("max requests reached".to_string())
        } else if self.cfg.max_age.is_some_and(|a| r.started.elapsed() >= a) {
            Some("max age reached".to_string())
        } else {
            match (self.cfg.claude.max_session_tokens, history) {
                (Some(max), Some(h)) if h > max => Some(format!(
                    "the session's history holds {h} input tokens (--max-session-tokens {max})"
                )),
                _ => None,
            }
        };
        if let Some(why) = why {
            self.end(&why, true);
        }
    }
}

/// A line that shows an interrupted turn is over without a result (the
/// control response to the interrupt).
fn wire_idle_after_interrupt(line: &[u8]) -> bool {
    let text = String::from_utf8_lossy(line);
    text.contains("\"control_response\"") && text.contains("autopoll-interrupt-")
}
