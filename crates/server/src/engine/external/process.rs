//! Child processes of the external backends: started in their own process
//! group with `PR_SET_PDEATHSIG`, non-blocking pipes, stderr logged line by
//! line (the last lines kept for error messages), and ended with the
//! SIGTERM-then-SIGKILL escalation and a reap.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, BufRead, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use autopoll_protocol::fifo::FrameReader;

use super::Slot;

/// Longest line read from an instance.
pub const MAX_LINE: usize = 16 << 20;
/// Stderr lines kept for error messages.
const TAIL_LINES: usize = 6;
/// Longest stderr line kept for error messages, in characters.
const TAIL_LINE_CHARS: usize = 300;

/// The last few lines a child wrote to stderr, and whether its stderr has
/// closed.
#[derive(Debug, Clone, Default)]
pub struct StderrTail(Arc<(Mutex<VecDeque<String>>, AtomicBool)>);

impl StderrTail {
    fn push(&self, line: &str) {
        let line = line.trim();
        if line.is_empty() {
            return;
        }
        let mut q = self.0.0.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() == TAIL_LINES {
            q.pop_front();
        }
        q.push_back(line.chars().take(TAIL_LINE_CHARS).collect());
    }

    fn close(&self) {
        self.0.1.store(true, Ordering::SeqCst);
    }

    /// `"; stderr: a | b"`, or nothing when it wrote nothing. For a child
    /// that has exited, waits (at most half a second) until its last
    /// lines have been read.
    pub fn suffix(&self) -> String {
        let until = Instant::now() + Duration::from_millis(500);
        while !self.0.1.load(Ordering::SeqCst) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.now()
    }

    /// The same, without waiting (the child may still be running).
    pub fn now(&self) -> String {
        let q = self.0.0.lock().unwrap_or_else(|p| p.into_inner());
        if q.is_empty() {
            String::new()
        } else {
            let v: Vec<&str> = q.iter().map(String::as_str).collect();
            format!("; stderr: {}", v.join(" | "))
        }
    }
}

/// A live child with its pipes.
pub struct Running {
    /// The child.
    pub child: Child,
    /// Its pid (and process group id).
    pub pid: i32,
    /// Its stdin (non-blocking), until closed.
    pub stdin: Option<File>,
    /// Its stdout, as lines.
    pub out: FrameReader,
    /// When it started.
    pub started: Instant,
    /// Questions it answered.
    pub served: u64,
    /// The context version it was started with.
    pub version: String,
    /// What it last wrote on stderr.
    pub stderr: StderrTail,
}

/// Signal a process group we created.
pub fn kill_group(pgid: i32, sig: i32) {
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

/// What to run.
pub struct Spec<'a> {
    /// Program and arguments.
    pub argv: &'a [String],
    /// Variables added to the server's environment.
    pub env: &'a [(String, String)],
    /// `AUTOPOLL_SERVER_DIR` (empty: not set).
    pub server_dir: &'a Path,
    /// The context version now.
    pub version: &'a str,
}

/// Spawn in its own process group, dying with the server; stderr is logged
/// line by line with the worker id, and its tail kept.
pub fn spawn(worker: usize, spec: &Spec<'_>, slot: &Slot) -> io::Result<Running> {
    let (prog, args) = spec
        .argv
        .split_first()
        .ok_or_else(|| io::Error::other("no command given after --"))?;
    let mut cmd = Command::new(prog);
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("AUTOPOLL_WORKER", worker.to_string())
        // systemd's notify variables are the server's alone.
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .process_group(0);
    for (k, v) in spec.env {
        cmd.env(k, v);
    }
    if !spec.server_dir.as_os_str().is_empty() {
        cmd.env("AUTOPOLL_SERVER_DIR", spec.server_dir);
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
    let tail = StderrTail::default();
    if let Some(err) = child.stderr.take() {
        let keep = tail.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("instance-{worker}-stderr"))
            .spawn(move || {
                let mut r = io::BufReader::new(err);
                let mut line = Vec::new();
                loop {
                    line.clear();
                    match r.by_ref().take(8_192).read_until(b'\n', &mut line) {
                        Ok(0) | Err(_) => {
                            keep.close();
                            break;
                        }
                        Ok(_) => {
                            let text = String::from_utf8_lossy(&line);
                            log::info!("worker={worker} pid={pid} stderr: {}", text.trim_end());
                            keep.push(&text);
                        }
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
        version: spec.version.to_string(),
        stderr: tail,
    })
}

/// End a child: close stdin (a polite program exits), then SIGTERM to the
/// group, SIGKILL after `grace`, reap, and SIGKILL whatever is left of the
/// group. Returns how it ended.
pub fn stop_running(mut run: Running, grace: Duration, slot: &Slot, polite: bool) -> String {
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
    let Some(st) = status else {
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
    };
    describe(st)
}

/// `exit N` or `signal N`.
pub fn describe(st: std::process::ExitStatus) -> String {
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => "ended".into(),
    }
}

/// The program `name` resolves to (as exec would: a path, or a search of
/// `PATH`), if it exists and is executable.
pub fn find_program(name: &str) -> Result<std::path::PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let ok = |p: &Path| {
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
