//! systemd's notify protocol, end to end: the real binaries run with a
//! `NOTIFY_SOCKET` of the test's own (a path for the server, an abstract
//! `@name` for the poller) and a short `WATCHDOG_USEC`. They must say
//! `READY=1`, keep sending `WATCHDOG=1` while idle, send nothing at all while
//! SIGSTOPped (a hung loop stops the pings), resume after SIGCONT, and say
//! `STOPPING=1` on SIGTERM.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::{Env, TIMEOUT, path_str, wait_until};

/// 200 ms: pings every 100 ms at most while idle.
const WATCHDOG_USEC: &str = "200000";

/// A notify socket of the test's own.
struct Listener {
    sock: UnixDatagram,
    /// The value for NOTIFY_SOCKET.
    name: String,
    seen: Vec<String>,
}

impl Listener {
    fn at_path(env: &Env) -> Listener {
        let path = env.path("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        Listener {
            sock,
            name: path_str(&path).to_string(),
            seen: Vec::new(),
        }
    }

    fn abstract_name() -> Listener {
        use std::os::linux::net::SocketAddrExt;
        let name = format!(
            "autopoll-notify-e2e-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        );
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        Listener {
            sock: UnixDatagram::bind_addr(&addr).unwrap(),
            name: format!("@{name}"),
            seen: Vec::new(),
        }
    }

    /// The next datagram within `timeout`, if any.
    fn recv(&mut self, timeout: Duration) -> Option<String> {
        self.sock.set_nonblocking(false).unwrap();
        self.sock.set_read_timeout(Some(timeout)).unwrap();
        let mut buf = [0u8; 4096];
        match self.sock.recv(&mut buf) {
            Ok(n) => {
                let m = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.seen.push(m.clone());
                Some(m)
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                None
            }
            Err(e) => panic!("recv on the notify socket: {e}"),
        }
    }

    /// Wait (bounded) for a datagram containing the line `line`.
    fn expect(&mut self, line: &str, what: &str) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no {line} from {what} within {TIMEOUT:?}; got {:?}",
                self.seen
            );
            if let Some(m) = self.recv(left)
                && m.lines().any(|l| l == line)
            {
                return m;
            }
        }
    }

    /// Take whatever is queued, without waiting.
    fn drain(&mut self) -> Vec<String> {
        self.sock.set_nonblocking(true).unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.sock.recv(&mut buf) {
            out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        out
    }
}

/// Whether every thread of `pid` is stopped (state `T`).
fn all_threads_stopped(pid: i32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .and_then(|(_, r)| r.split_whitespace().next().map(str::to_string))
            })
            .is_some_and(|st| st == "T")
    })
}

/// The shared part: READY came; pings flow; SIGSTOP silences them (checked
/// for a full second, five watchdog intervals); SIGCONT brings them back.
fn pings_stop_while_stopped(l: &mut Listener, pid: i32, what: &str) {
    // Several pings in a row while idle (the loop wakes by itself).
    for _ in 0..3 {
        l.expect("WATCHDOG=1", what);
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    wait_until(&format!("{what} is stopped"), TIMEOUT, || {
        all_threads_stopped(pid)
    });
    // Datagrams are queued synchronously by send(2): whatever was sent
    // before the stop is here now; anything later would be a bug.
    l.drain();
    let silent_for = Duration::from_secs(1);
    let got = l.recv(silent_for);
    assert_eq!(got, None, "{what} sent something while SIGSTOPped");
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    l.expect("WATCHDOG=1", what);
}

#[test]
fn server_says_ready_pings_its_watchdog_and_goes_quiet_when_stopped() {
    let env = Env::new();
    std::fs::write(
        env.path("NOTES.md"),
        "# Notes\nThe cache holds 64 entries.\n",
    )
    .unwrap();
    let mut l = Listener::at_path(&env);
    let log = std::fs::File::create(env.path("server.log")).unwrap();
    let mut child = env
        .cmd("autopoll-server")
        .args(["--name", "nfy", "--runtime-dir"])
        .arg(env.runtime())
        .args(["--context", path_str(&env.path("NOTES.md"))])
        .env("NOTIFY_SOCKET", &l.name)
        .env("WATCHDOG_USEC", WATCHDOG_USEC)
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let ready = l.expect("READY=1", "autopoll-server");
    assert!(ready.contains("STATUS=serving `nfy`"), "{ready}");
    // READY means serving: a client gets in at once.
    let paths = autopoll_protocol::ServerPaths::new(&env.runtime(), "nfy").unwrap();
    autopoll_protocol::Client::connect(&paths, &Default::default()).unwrap();

    pings_stop_while_stopped(&mut l, pid, "autopoll-server");

    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    l.expect("STOPPING=1", "autopoll-server");
    let st = child.wait().unwrap();
    assert_eq!(
        st.code(),
        Some(0),
        "{}",
        std::fs::read_to_string(env.path("server.log")).unwrap()
    );
}

#[test]
fn poller_says_ready_pings_its_watchdog_and_goes_quiet_when_stopped() {
    let env = Env::new();
    let conv = env.conversation();
    let mut l = Listener::abstract_name();
    // No server is needed for the poller's own loop to run (it shows `blocked`).
    let mut child = env
        .cmd("autopoll-poller")
        .env("AUTOPOLL_CONVERSATION", &conv.id)
        .env("AUTOPOLL_TOKEN", &conv.token_b)
        .env("AUTOPOLL_RUNTIME_DIR", env.runtime())
        .env("NOTIFY_SOCKET", &l.name)
        .env("WATCHDOG_USEC", WATCHDOG_USEC)
        .args(["--name", "nfy"])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(env.path("poller.log")).unwrap())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let ready = l.expect("READY=1", "autopoll-poller");
    assert!(ready.contains("STATUS=answering session b"), "{ready}");

    pings_stop_while_stopped(&mut l, pid, "autopoll-poller");

    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    l.expect("STOPPING=1", "autopoll-poller");
    let st = child.wait().unwrap();
    assert_eq!(
        st.code(),
        Some(0),
        "{}",
        std::fs::read_to_string(env.path("poller.log")).unwrap()
    );
}

#[test]
fn without_a_watchdog_only_ready_and_stopping_are_sent_and_instances_do_not_inherit_the_socket() {
    let env = Env::new();
    std::fs::write(env.path("NOTES.md"), "# Notes\nSome text.\n").unwrap();
    let mut l = Listener::at_path(&env);
    let mut child = env
        .cmd("autopoll-server")
        .args(["--name", "nowd", "--runtime-dir"])
        .arg(env.runtime())
        .args(["--context", path_str(&env.path("NOTES.md"))])
        .args(["--backend", "jsonl", "--", "python3"])
        .arg(common::fixture("jsonl_backend.py"))
        .env("NOTIFY_SOCKET", &l.name)
        // A watchdog meant for another process is not ours.
        .env("WATCHDOG_USEC", WATCHDOG_USEC)
        .env("WATCHDOG_PID", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    l.expect("READY=1", "autopoll-server");
    // The instance has none of systemd's variables (checked once it has
    // answered, so it is past any wrapper script).
    let paths = autopoll_protocol::ServerPaths::new(&env.runtime(), "nowd").unwrap();
    let mut c = autopoll_protocol::Client::connect(&paths, &Default::default()).unwrap();
    c.ask("what is on line one?", TIMEOUT).unwrap();
    let stats = c.stats(TIMEOUT).unwrap();
    let pid = stats.instances[0].pid.unwrap();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let vars: Vec<&[u8]> = environ.split(|b| *b == 0).collect();
    assert!(vars.iter().any(|kv| kv.starts_with(b"AUTOPOLL_WORKER=")));
    for v in ["NOTIFY_SOCKET=", "WATCHDOG_USEC=", "WATCHDOG_PID="] {
        assert!(
            !vars.iter().any(|kv| kv.starts_with(v.as_bytes())),
            "the instance inherited {v}"
        );
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    l.expect("STOPPING=1", "autopoll-server");
    assert_eq!(child.wait().unwrap().code(), Some(0));
    let rest = l.drain();
    let all: Vec<String> = l.seen.iter().cloned().chain(rest).collect();
    assert!(
        all.iter().all(|m| !m.contains("WATCHDOG=1")),
        "pinged without a watchdog of its own: {all:?}"
    );
}
