//! `autopoll-server` against same-user clients that misbehave (issue 11,
//! item 7), end to end with the real binary: rogue hellos naming FIFOs
//! that are not theirs, crowds of silent clients, slow writers on the shared
//! FIFO, a low descriptor limit, a symlink planted at `pid` or `lock`. In
//! every case a normal client must still be served within its timeout.

#![allow(clippy::unwrap_used)]

mod common;

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use autopoll_protocol::fifo::{self, FrameReader};
use autopoll_protocol::{ClientError, ErrorCode};
use common::{Env, Server, TIMEOUT, describe, path_str, wait_until};

fn notes(env: &Env) -> String {
    let p = env.path("NOTES.md");
    std::fs::write(
        &p,
        "# Notes\n\n## Cache decision\nWe keep the LRU cache at 64 entries.\n",
    )
    .unwrap();
    path_str(&p).to_string()
}

/// A normal client connects and gets an answer, within its timeout.
fn served(s: &Server) {
    let mut c = s
        .client()
        .unwrap_or_else(|e| panic!("connect: {e}\n{}", s.stderr()));
    let a = c
        .ask("cache", TIMEOUT)
        .unwrap_or_else(|e| panic!("ask: {e}\n{}", s.stderr()));
    assert!(a.found, "{a:?}");
}

fn hello_bytes(req: &Path, rep: &Path) -> Vec<u8> {
    format!(
        "{{\"type\":\"hello\",\"version\":1,\"client\":\"rogue\",\"request_fifo\":{:?},\"reply_fifo\":{:?}}}\n",
        path_str(req),
        path_str(rep)
    )
    .into_bytes()
}

/// Write `bytes` to the server's shared FIFO in one write.
fn to_requests(s: &Server, bytes: &[u8]) {
    let w = fifo::open_fifo(&s.paths().requests(), true).unwrap();
    fifo::write_all(&w, bytes, Instant::now() + TIMEOUT).unwrap();
}

/// A client that does the handshake by hand and keeps its FIFO names (a
/// "live client's pair" that can be named in another hello).
struct RawClient {
    req_path: PathBuf,
    rep_path: PathBuf,
    rep: FrameReader,
    req: Option<File>,
}

impl RawClient {
    /// Make the pair in `dir` and open the reply FIFO for reading.
    fn pair(dir: &Path, tag: &str) -> RawClient {
        let req_path = dir.join(format!("{tag}.req"));
        let rep_path = dir.join(format!("{tag}.rep"));
        fifo::mkfifo(&req_path, 0o600).unwrap();
        fifo::mkfifo(&rep_path, 0o600).unwrap();
        let rep = FrameReader::new(fifo::open_fifo(&rep_path, false).unwrap(), 1 << 20);
        RawClient {
            req_path,
            rep_path,
            rep,
            req: None,
        }
    }

    /// Send our hello, read the welcome, open the request FIFO.
    fn connect(s: &Server, tag: &str) -> RawClient {
        let mut c = RawClient::pair(&s.paths().clients(), tag);
        to_requests(s, &hello_bytes(&c.req_path, &c.rep_path));
        let w = c.frame(TIMEOUT).expect("a welcome");
        assert_eq!(w["type"], "welcome", "{w}");
        c.req = Some(fifo::open_fifo(&c.req_path, true).unwrap());
        c
    }

    /// The next reply frame within `wait`, as JSON (None: EOF).
    fn frame(&mut self, wait: Duration) -> Option<serde_json::Value> {
        let line = self.rep.read_frame(Some(Instant::now() + wait)).unwrap()?;
        Some(serde_json::from_slice(&line).unwrap())
    }

    /// Nothing is waiting on the reply FIFO right now.
    fn nothing_buffered(&mut self) -> bool {
        matches!(
            self.rep
                .read_frame(Some(Instant::now() + Duration::from_millis(1))),
            Err(fifo::FifoError::Timeout)
        )
    }

    fn echo(&mut self, id: u64, payload: &str) -> serde_json::Value {
        let req = format!("{{\"type\":\"echo\",\"id\":{id},\"payload\":{payload:?}}}\n");
        fifo::write_all(
            self.req.as_ref().unwrap(),
            req.as_bytes(),
            Instant::now() + TIMEOUT,
        )
        .unwrap();
        self.frame(TIMEOUT).expect("an echo reply")
    }
}

#[test]
fn rogue_hellos_are_refused_and_a_normal_client_is_still_served() {
    let env = Env::new();
    let ctx = notes(&env);
    let s = env.server("default", &["--context", &ctx]);
    let clients = s.paths().clients();
    let requests = s.paths().requests();

    // A live client that keeps its pair's names.
    let mut victim = RawClient::connect(&s, "victim");
    assert_eq!(victim.echo(1, "before")["payload"], "before");

    // 1. The server's own requests FIFO as both request and reply FIFO.
    to_requests(&s, &hello_bytes(&requests, &requests));
    // 2. The live client's pair.
    to_requests(&s, &hello_bytes(&victim.req_path, &victim.rep_path));
    // 3. Paths outside clients/ (real, private FIFOs of ours), with a reader
    //    on the reply side that must never hear from the server.
    let mut outside = RawClient::pair(env.dir.path(), "outside");
    to_requests(&s, &hello_bytes(&outside.req_path, &outside.rep_path));
    // 4. A request FIFO outside clients/ with a good reply FIFO: told why.
    let mut told = RawClient::pair(&clients, "told");
    to_requests(&s, &hello_bytes(&outside.req_path, &told.rep_path));
    // 5. A symlink in clients/ to a FIFO in clients/.
    let mut linked = RawClient::pair(&clients, "linked");
    let link = clients.join("link.rep");
    std::os::unix::fs::symlink(&linked.rep_path, &link).unwrap();
    to_requests(&s, &hello_bytes(&linked.req_path, &link));
    // 6. One FIFO as both.
    let mut same = RawClient::pair(&clients, "same");
    to_requests(&s, &hello_bytes(&same.rep_path, &same.rep_path));

    // Hellos are taken in order: once these are served, all of the above
    // were handled. Many, so a session stealing hellos would show.
    for _ in 0..30 {
        served(&s);
    }

    // The victim's stream holds nothing it did not ask for, and works.
    assert!(
        victim.nothing_buffered(),
        "a frame leaked into the victim's pair"
    );
    assert_eq!(victim.echo(2, "after")["payload"], "after");
    assert_eq!(victim.echo(3, "again")["payload"], "again");
    // No reply ever goes to a FIFO outside clients/ or through a symlink.
    assert!(outside.nothing_buffered());
    assert!(linked.nothing_buffered());
    // Where a reply is safe, it says what is wrong.
    let e = told.frame(TIMEOUT).expect("an error reply");
    assert_eq!(e["type"], "error", "{e}");
    assert_eq!(e["code"], "invalid", "{e}");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("not directly in the server's clients folder"),
        "{e}"
    );
    let e = same.frame(TIMEOUT).expect("an error reply");
    assert_eq!(e["code"], "invalid", "{e}");
    assert!(
        e["message"].as_str().unwrap().contains("the same FIFO"),
        "{e}"
    );
    // Only the victim and our observer have sessions: no rogue one lives.
    let mut c = s.client().unwrap();
    assert_eq!(c.stats(TIMEOUT).unwrap().sessions, 2, "{}", s.stderr());
    let log = s.stderr();
    for why in [
        "shared `requests` FIFO",
        "belongs to a live session",
        "not directly in the server's clients folder",
        "symlink",
    ] {
        assert!(log.contains(why), "log lacks {why:?}:\n{log}");
    }
}

#[test]
fn three_hundred_idle_clients_do_not_lock_out_a_new_one() {
    let env = Env::new();
    let ctx = notes(&env);
    let s = env.server(
        "default",
        &[
            "--context",
            &ctx,
            "--idle-timeout",
            "1",
            "--max-clients",
            "256",
            "-v",
        ],
    );
    let mut idle = Vec::new();
    let mut refused = 0;
    for _ in 0..300 {
        match s.client() {
            Ok(c) => idle.push(c),
            Err(ClientError::Server(e)) if e.code == ErrorCode::Overloaded => refused += 1,
            Err(e) => panic!("a connect failed otherwise: {e}\n{}", s.stderr()),
        }
    }
    println!("{} connected, {refused} refused as overloaded", idle.len());
    // The silent crowd is closed for idleness; a new client gets in.
    wait_until("a new client is served", TIMEOUT, || {
        s.client()
            .is_ok_and(|mut c| c.ask("cache", TIMEOUT).is_ok())
    });
    served(&s);
    assert!(s.stderr().contains("event=session_idle"), "{}", s.stderr());
    // A client whose session was closed for idleness just asks again.
    for c in idle.iter_mut().take(5) {
        assert!(c.ask("cache", TIMEOUT).unwrap().found);
    }
}

#[test]
fn an_idle_session_gets_the_idle_notice_and_the_library_reconnects() {
    let env = Env::new();
    let ctx = notes(&env);
    let s = env.server("default", &["--context", &ctx, "--idle-timeout", "0.5"]);
    // A hand-made client sees the notice, then EOF.
    let mut raw = RawClient::connect(&s, "raw");
    let notice = raw.frame(TIMEOUT).expect("the idle notice");
    assert_eq!(notice["type"], "error", "{notice}");
    assert_eq!(notice["code"], "timeout", "{notice}");
    assert!(notice["id"].is_null(), "{notice}");
    assert!(
        notice["message"]
            .as_str()
            .unwrap()
            .contains("--idle-timeout"),
        "{notice}"
    );
    assert!(raw.frame(TIMEOUT).is_none(), "EOF after the notice");
    // The library's client: the welcome says the timeout, and a client idle
    // past it is answered all the same.
    let mut c = s.client().unwrap();
    assert_eq!(c.welcome().idle_timeout_ms, Some(500));
    c.stats(TIMEOUT).unwrap();
    // Idle past the timeout (the server closes the session meanwhile).
    std::thread::sleep(Duration::from_millis(1_500));
    assert!(c.ask("cache", TIMEOUT).unwrap().found);
    assert!(c.echo("x", TIMEOUT).is_ok());
}

/// Write `bytes` one at a time to the shared FIFO until `stop`.
fn trickle(
    requests: PathBuf,
    bytes: Vec<u8>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let w = fifo::open_fifo(&requests, true).unwrap();
        'outer: while !stop.load(Ordering::Relaxed) {
            for b in &bytes {
                if stop.load(Ordering::Relaxed) {
                    break 'outer;
                }
                fifo::write_all(&w, &[*b], Instant::now() + TIMEOUT).unwrap();
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    })
}

#[test]
fn slowloris_on_the_shared_fifo_does_not_fail_other_clients() {
    let env = Env::new();
    let ctx = notes(&env);
    let s = env.server("default", &["--context", &ctx]);
    let clients = s.paths().clients();
    // Half a hello, then silence (the writer stays open).
    let half = fifo::open_fifo(&s.paths().requests(), true).unwrap();
    let h = hello_bytes(&clients.join("slow.req"), &clients.join("slow.rep"));
    fifo::write_all(&half, &h[..h.len() / 2], Instant::now() + TIMEOUT).unwrap();
    for _ in 0..20 {
        served(&s);
    }
    // Several writers, a byte at a time, all the while.
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|i| {
            let h = hello_bytes(
                &clients.join(format!("drip{i}.req")),
                &clients.join(format!("drip{i}.rep")),
            );
            trickle(s.paths().requests(), h, stop.clone())
        })
        .collect();
    for _ in 0..50 {
        served(&s);
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    drop(half);
    served(&s);
}

#[test]
fn at_an_fd_limit_of_256_a_crowd_gets_overloaded_and_the_server_lives() {
    let env = Env::new();
    let ctx = notes(&env);
    let mut s = env.server_with(
        "default",
        &["--context", &ctx, "--max-clients", "1000"],
        |c| {
            // SAFETY: setrlimit is async-signal-safe; nothing else runs here.
            unsafe {
                c.pre_exec(|| {
                    let r = libc::rlimit {
                        rlim_cur: 256,
                        rlim_max: 256,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        },
    );
    let mut crowd = Vec::new();
    let mut refusals = Vec::new();
    for _ in 0..150 {
        match s.client() {
            Ok(c) => crowd.push(c),
            Err(ClientError::Server(e)) => refusals.push(e),
            Err(e) => panic!("a connect failed otherwise: {e}\n{}", s.stderr()),
        }
    }
    assert!(!refusals.is_empty(), "150 sessions fit in 256 descriptors?");
    for e in &refusals {
        assert_eq!(e.code, ErrorCode::Overloaded, "{e:?}");
        assert!(e.message.contains("open-file limit"), "{e:?}");
    }
    // The connected ones all work.
    for c in crowd.iter_mut() {
        assert!(c.echo("x", TIMEOUT).is_ok(), "{}", s.stderr());
    }
    assert!(s.child.try_wait().unwrap().is_none(), "{}", s.stderr());
    let log = s.stderr();
    assert!(log.contains("event=fd_limit"), "{log}");
    assert!(!log.contains("Too many open files"), "{log}");
    // Once they leave, a normal client gets in.
    let held = crowd.len();
    drop(crowd);
    wait_until("the crowd's sessions end", TIMEOUT, || {
        s.client()
            .is_ok_and(|mut c| c.stats(TIMEOUT).is_ok_and(|st| st.sessions == 1))
    });
    served(&s);
    println!("{held} sessions held, {} refused", refusals.len());
    s.signal(libc::SIGTERM);
    assert_eq!(s.wait_exit(TIMEOUT), Some(0), "{}", s.stderr());
}

#[test]
fn a_symlink_planted_at_pid_is_not_followed() {
    let env = Env::new();
    let ctx = notes(&env);
    let dir = env.runtime().join("default");
    std::fs::create_dir_all(&dir).unwrap();
    let target = env.path("precious.txt");
    std::fs::write(&target, "precious\n").unwrap();
    std::os::unix::fs::symlink(&target, dir.join("pid")).unwrap();
    let mut s = env.server("default", &["--context", &ctx]);
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious\n");
    let md = std::fs::symlink_metadata(dir.join("pid")).unwrap();
    assert!(md.file_type().is_file());
    assert_eq!(
        std::fs::read_to_string(dir.join("pid")).unwrap().trim(),
        s.pid().to_string()
    );
    served(&s);
    s.signal(libc::SIGTERM);
    assert_eq!(s.wait_exit(TIMEOUT), Some(0), "{}", s.stderr());
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious\n");
}

#[test]
fn a_symlink_planted_at_lock_is_refused_not_followed() {
    let env = Env::new();
    let ctx = notes(&env);
    let dir = env.runtime().join("default");
    std::fs::create_dir_all(&dir).unwrap();
    let target = env.path("precious.txt");
    std::fs::write(&target, "precious\n").unwrap();
    std::os::unix::fs::symlink(&target, dir.join("lock")).unwrap();
    let out = env
        .cmd("autopoll-server")
        .args([
            "--name",
            "default",
            "--runtime-dir",
            path_str(&env.runtime()),
        ])
        .args(["--context", &ctx])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("symlink"),
        "{}",
        describe(&out)
    );
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious\n");
}

/// The poller's connections sit idle longer than the server's idle timeout
/// between questions; it must keep answering, with no error and no
/// "server down" episode.
#[test]
fn a_poller_idle_past_the_idle_timeout_keeps_answering() {
    let env = Env::new();
    let ctx = notes(&env);
    let conv = env.conversation();
    let s = env.server(
        "default",
        &["--context", &ctx, "--idle-timeout", "0.5", "-v"],
    );
    let p = env.poller(&conv, "default", &[]);
    let first = env.send_queries(&conv, "first", 1, "What about the cache?");
    env.expect_each_answered_once(&first, TIMEOUT);
    wait_until(
        "the poller's asker session is closed as idle",
        TIMEOUT,
        || {
            s.stderr()
                .lines()
                .any(|l| l.contains("event=session_idle") && l.contains("\"autopoll-poller\""))
        },
    );
    let mut ids = first.clone();
    ids.extend(env.send_queries(&conv, "second", 3, "What about the cache?"));
    let got = env.expect_each_answered_once(&ids, TIMEOUT);
    for (q, v) in &got {
        assert!(v["error"].is_null(), "{q}: {v}");
    }
    let log = p.log();
    assert!(!log.contains("server_down"), "{log}");
}

/// Clients one after another, each a fresh pair of FIFOs: a FIFO's inode
/// number is handed to the next FIFO as soon as the last descriptor of the
/// old one closes, and a session that unmarked its FIFOs only after closing
/// them made the server refuse that innocent next hello as "in use" (the
/// client then timed out waiting for its welcome). Regression test.
#[test]
fn clients_in_quick_succession_are_never_taken_for_live_sessions() {
    let env = Env::new();
    let ctx = notes(&env);
    let s = env.server("seq", &["--context", &ctx]);
    for i in 0..400 {
        let mut c = s
            .client()
            .unwrap_or_else(|e| panic!("client {i}: {e}\n{}", s.stderr()));
        c.stats(TIMEOUT)
            .unwrap_or_else(|e| panic!("client {i}: {e}\n{}", s.stderr()));
    }
    assert!(!s.stderr().contains("in use"), "{}", s.stderr());
}
