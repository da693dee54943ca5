//! The fault suite. Every case runs a short subset by default (CI), and the
//! full counts of issue 6 with AUTOPOLL_FAULT_FULL=1 (scripts/fault-suite.sh,
//! release build). Each case prints one `FIGURE` line with what it measured.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use autopoll_protocol::{ClientError, fifo, frame};
use common::{Env, TIMEOUT, children_of, fixture, path_str, wait_until};
use serde_json::Value;

fn full() -> bool {
    std::env::var("AUTOPOLL_FAULT_FULL").as_deref() == Ok("1")
}

/// A 16 MiB tmpfs (needs root), unmounted when dropped; `fill` takes all
/// its free space with one file.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(env: &Env, name: &str) -> SmallDisk {
        let mnt = env.path(name);
        std::fs::create_dir(&mnt).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
            .arg(&mnt)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "this test needs to mount a tmpfs (root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallDisk(mnt)
    }

    fn fill(&self, file: impl AsRef<std::path::Path>) {
        use std::io::Write;
        let mut f = std::fs::File::create(file).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// `small` by default, `big` in the full suite.
fn n(small: usize, big: usize) -> usize {
    if full() { big } else { small }
}

fn figure(name: &str, text: String) {
    println!("FIGURE {name}: {text}");
}

fn setup(env: &Env) -> (common::Conversation, String) {
    let conv = env.conversation();
    let ctx = env.path("NOTES.md");
    std::fs::write(
        &ctx,
        "# Notes\n\n## Cache\nWe kept the cache at 64 entries.\nMemory is tight.\n",
    )
    .unwrap();
    (conv, path_str(&ctx).to_string())
}

/// Exactly-once check that also counts: (answered once, lost, twice).
fn tally(env: &Env, ids: &[String]) -> (usize, usize, usize) {
    let mut counts: HashMap<String, usize> = HashMap::new();
    for (q, _) in env.responses() {
        *counts.entry(q).or_default() += 1;
    }
    let once = ids.iter().filter(|i| counts.get(*i) == Some(&1)).count();
    let lost = ids.iter().filter(|i| !counts.contains_key(*i)).count();
    let twice = counts.values().filter(|&&c| c > 1).count();
    (once, lost, twice)
}

fn integrity(env: &Env) -> String {
    env.bridge()
        .connection()
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap()
}

fn finish(env: &Env, conv: &common::Conversation, ids: &[String], name: &str, extra: String) {
    let _p = env.poller(conv, "default", &["--lease", "0.5", "--concurrency", "8"]);
    wait_until("every question answered", TIMEOUT * 4, || {
        env.responses().len() >= ids.len()
    });
    std::thread::sleep(Duration::from_millis(300)); // a straggling second answer would show now
    let (once, lost, twice) = tally(env, ids);
    figure(
        name,
        format!(
            "{} questions: {once} answered once, {lost} lost, {twice} answered twice; {extra}",
            ids.len()
        ),
    );
    assert_eq!((lost, twice), (0, 0));
    assert_eq!(once, ids.len());
}

#[test]
fn poller_kill_9_at_random_moments() {
    let env = Env::new();
    let (conv, ctx) = setup(&env);
    let _s = env.server("default", &["--context", &ctx]);
    let ids = env.send_queries(&conv, "rnd", n(200, 1_000), "cache?");
    let trials = n(8, 200);
    let mut s = common::seed();
    let mut bad = 0;
    for _ in 0..trials {
        let mut p = env.poller(&conv, "default", &["--lease", "0.5", "--concurrency", "4"]);
        std::thread::sleep(Duration::from_millis(common::rng(&mut s) % 60));
        p.kill9();
        if integrity(&env) != "ok" {
            bad += 1;
        }
    }
    assert_eq!(bad, 0, "integrity_check failed after {bad} kills");
    finish(
        &env,
        &conv,
        &ids,
        "poller kill -9 at random moments",
        format!("{trials} kills, integrity_check ok every time"),
    );
}

#[test]
fn poller_killed_at_each_point_of_a_question() {
    let env = Env::new();
    let (conv, ctx) = setup(&env);
    let _s = env.server("default", &["--context", &ctx]);
    let ids = env.send_queries(&conv, "pt", n(100, 1_000), "cache?");
    let per_point = n(2, 50);
    let mut s = common::seed();
    let mut died = HashMap::new();
    for point in ["after_claim", "after_send", "after_reply", "before_commit"] {
        for _ in 0..per_point {
            let after = (1 + common::rng(&mut s) % 8).to_string();
            let mut p = env
                .cmd("autopoll-poller")
                .env("AUTOPOLL_CONVERSATION", &conv.id)
                .env("AUTOPOLL_TOKEN", &conv.token_b)
                .env("AUTOPOLL_RUNTIME_DIR", env.runtime())
                .env("AUTOPOLL_FAULT_KILL_AT", point)
                .env("AUTOPOLL_FAULT_AFTER", &after)
                .args(["-q", "--lease", "0.5", "--concurrency", "2"])
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            // It kills itself at the point (or runs out of questions first).
            let deadline = Instant::now() + TIMEOUT;
            let status = loop {
                if let Some(st) = p.try_wait().unwrap() {
                    break Some(st);
                }
                if Instant::now() > deadline || env.responses().len() >= ids.len() {
                    let _ = p.kill();
                    let _ = p.wait();
                    break None;
                }
                std::thread::sleep(Duration::from_millis(5));
            };
            use std::os::unix::process::ExitStatusExt;
            if status.and_then(|s| s.signal()) == Some(libc::SIGKILL) {
                *died.entry(point).or_insert(0) += 1;
            }
            assert_eq!(integrity(&env), "ok");
        }
    }
    for point in ["after_claim", "after_send", "after_reply", "before_commit"] {
        assert!(
            died.get(point).copied().unwrap_or(0) > 0,
            "no poller died at {point}: {died:?}"
        );
    }
    finish(
        &env,
        &conv,
        &ids,
        "poller kill -9 at each point",
        format!("deaths per point {died:?}, integrity_check ok every time"),
    );
}

#[test]
fn an_answer_group_killed_before_its_commit_is_answered_exactly_once_after_restart() {
    let env = Env::new();
    let (conv, ctx) = setup(&env);
    let _s = env.server("default", &["--context", &ctx]);
    let mut ids = Vec::new();
    let mut grouped = 0;
    for trial in 0..10 {
        ids.extend(env.send_queries(&conv, &format!("grp{trial}"), 16, "cache?"));
        let log = env.path(&format!("poller-{trial}.log"));
        let mut p = env
            .cmd("autopoll-poller")
            .env("AUTOPOLL_CONVERSATION", &conv.id)
            .env("AUTOPOLL_TOKEN", &conv.token_b)
            .env("AUTOPOLL_RUNTIME_DIR", env.runtime())
            .env("AUTOPOLL_FAULT_KILL_AT", "before_commit")
            .env("RUST_LOG", "debug")
            .args(["--lease", "0.5", "--concurrency", "16"])
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + TIMEOUT;
        let status = loop {
            if let Some(st) = p.try_wait().unwrap() {
                break Some(st);
            }
            if Instant::now() > deadline {
                let _ = p.kill();
                let _ = p.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            status.and_then(|s| s.signal()),
            Some(libc::SIGKILL),
            "the poller dies at its first commit of answers"
        );
        assert_eq!(integrity(&env), "ok");
        // The group it died with.
        let text = std::fs::read_to_string(&log).unwrap();
        let count: usize = text
            .lines()
            .filter_map(|l| l.split("event=answers_commit count=").nth(1))
            .filter_map(|c| c.split_whitespace().next()?.parse().ok())
            .next_back()
            .unwrap_or_else(|| panic!("no answers_commit line in {text}"));
        if count >= 2 {
            grouped += 1;
            if grouped >= 2 {
                break;
            }
        }
    }
    assert!(
        grouped > 0,
        "no poller died holding a group of two or more answers"
    );
    finish(
        &env,
        &conv,
        &ids,
        "answer group killed before its commit",
        format!("{grouped} kills with a group of 2+ answers, integrity_check ok every time"),
    );
}

#[test]
fn server_kill_9_during_a_run() {
    let env = Env::new();
    let (conv, ctx) = setup(&env);
    let ids = env.send_queries(&conv, "srv", n(300, 1_000), "cache?");
    let _p = env.poller(&conv, "default", &["--lease", "1", "--concurrency", "4"]);
    let trials = n(4, 200);
    let mut s = common::seed();
    for _ in 0..trials {
        let server = env.server("default", &["--context", &ctx]);
        std::thread::sleep(Duration::from_millis(common::rng(&mut s) % 40));
        drop(server); // kill -9
    }
    let server = env.server("default", &["--context", &ctx]);
    finish(
        &env,
        &conv,
        &ids,
        "server kill -9",
        format!("{trials} kills"),
    );
    let z = children_of(server.pid())
        .iter()
        .filter(|(_, st)| *st == 'Z')
        .count();
    assert_eq!(z, 0);
}

#[test]
fn engine_instance_kill_9_during_a_run() {
    let env = Env::new();
    let (conv, ctx) = setup(&env);
    let s = env.server(
        "default",
        // Deliberate kills, not a crash loop: keep the breaker out of the way.
        &[
            "--backend",
            "jsonl",
            "--context",
            &ctx,
            "--workers",
            "2",
            "--restart-limit",
            "1000",
            "--",
            "python3",
            &fixture("jsonl_backend.py"),
        ],
    );
    let ids = env.send_queries(&conv, "inst", n(200, 1_000), "cache?");
    let _p = env.poller(
        &conv,
        "default",
        &["--lease", "1", "--concurrency", "4", "--max-attempts", "50"],
    );
    let trials = n(6, 200);
    let mut seedv = common::seed();
    let mut c = s.client().unwrap();
    for _ in 0..trials {
        let pids: Vec<u32> = c
            .stats(TIMEOUT)
            .unwrap()
            .instances
            .iter()
            .filter_map(|w| w.pid)
            .collect();
        if let Some(&pid) = pids.get((common::rng(&mut seedv) % 2) as usize) {
            // SAFETY: signalling a process of our test.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(20 + common::rng(&mut seedv) % 60));
    }
    let _q = env.poller(&conv, "default", &["--lease", "1"]);
    wait_until("every question answered", TIMEOUT * 4, || {
        env.responses().len() >= ids.len()
    });
    let (once, lost, twice) = tally(&env, &ids);
    wait_until("exactly two live instances, no zombie", TIMEOUT, || {
        let kids = children_of(s.pid());
        kids.len() == 2 && kids.iter().all(|(_, st)| *st != 'Z')
    });
    let errors = env
        .responses()
        .iter()
        .filter(|(_, v)| v.get("error").is_some())
        .count();
    figure(
        "engine instance kill -9",
        format!(
            "{trials} kills; {} questions: {once} answered once ({errors} with an error after retries), {lost} lost, {twice} twice; 0 zombies, 2 instances",
            ids.len()
        ),
    );
    assert_eq!((lost, twice, once), (0, 0, ids.len()));
}

#[test]
fn a_stopped_server_or_none_never_hangs_a_client() {
    let env = Env::new();
    let (_, ctx) = setup(&env);
    // No server at all.
    let calls = n(200, 1_000);
    let paths = autopoll_protocol::ServerPaths::new(&env.runtime(), "nobody-here").unwrap();
    let t = Instant::now();
    let mut worst = Duration::ZERO;
    for _ in 0..calls {
        let s = Instant::now();
        let e = autopoll_protocol::Client::connect(&paths, &Default::default()).unwrap_err();
        assert!(matches!(e, ClientError::NoServer { .. }), "{e}");
        worst = worst.max(s.elapsed());
    }
    figure(
        "no server",
        format!(
            "{calls} calls, 0 hangs, all NoServer; slowest {worst:?}, total {:?}",
            t.elapsed()
        ),
    );
    // A SIGSTOPped server: each client gets its error at its own timeout.
    let s = env.server("default", &["--context", &ctx]);
    let mut live = s.client().unwrap();
    s.signal(libc::SIGSTOP);
    let clients = n(20, 200);
    let timeout = Duration::from_millis(200);
    let threads: Vec<_> = (0..clients)
        .map(|i| {
            let paths = s.paths();
            std::thread::spawn(move || {
                let start = Instant::now();
                let opts = autopoll_protocol::ClientOptions {
                    connect_timeout: timeout,
                    ..Default::default()
                };
                let r = if i % 2 == 0 {
                    autopoll_protocol::Client::connect(&paths, &opts).map(|_| ())
                } else {
                    Err(ClientError::ServerGone)
                };
                (r.is_err(), start.elapsed())
            })
        })
        .collect();
    let mut slowest = Duration::ZERO;
    for t in threads {
        let (failed, took) = t.join().unwrap();
        assert!(failed);
        slowest = slowest.max(took);
    }
    let e = live.ask("cache", timeout).unwrap_err();
    assert!(matches!(e, ClientError::Timeout { .. }), "{e}");
    s.signal(libc::SIGCONT);
    figure(
        "stopped server",
        format!(
            "{clients} connecting clients and 1 connected: every one got its timeout error; slowest {slowest:?} for a {timeout:?} timeout"
        ),
    );
}

/// A raw session: the handshake by hand, so any bytes can be sent.
fn raw_session(s: &common::Server) -> (std::fs::File, fifo::FrameReader) {
    let clients = s.paths().clients();
    let req = clients.join(format!("raw-{}.req", std::process::id()));
    let rep = clients.join(format!("raw-{}.rep", std::process::id()));
    let _ = std::fs::remove_file(&req);
    let _ = std::fs::remove_file(&rep);
    fifo::mkfifo(&req, 0o600).unwrap();
    fifo::mkfifo(&rep, 0o600).unwrap();
    let r = fifo::open_fifo(&rep, false).unwrap();
    let shared = fifo::open_fifo(&s.paths().requests(), true).unwrap();
    let hello = format!(
        "{{\"type\":\"hello\",\"version\":1,\"request_fifo\":{req:?},\"reply_fifo\":{rep:?}}}\n"
    );
    fifo::write_all(&shared, hello.as_bytes(), Instant::now() + TIMEOUT).unwrap();
    let mut reader = fifo::FrameReader::new(r, 2 << 20);
    let welcome = reader
        .read_frame(Some(Instant::now() + TIMEOUT))
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&welcome).contains("welcome"));
    let w = fifo::open_fifo(&req, true).unwrap();
    let _ = std::fs::remove_file(&req);
    let _ = std::fs::remove_file(&rep);
    (w, reader)
}

fn raw_call(w: &std::fs::File, r: &mut fifo::FrameReader, bytes: &[u8]) -> Value {
    fifo::write_all(w, bytes, Instant::now() + TIMEOUT).unwrap();
    let line = r
        .read_frame(Some(Instant::now() + TIMEOUT))
        .unwrap()
        .unwrap();
    serde_json::from_slice(&line).unwrap()
}

#[test]
fn payload_edges_round_trip_or_get_a_clear_error() {
    let env = Env::new();
    let (_, ctx) = setup(&env);
    let s = env.server("default", &["--context", &ctx]);
    let mut c = s.client().unwrap();
    let overhead = frame::encode(&autopoll_protocol::Request::Echo(autopoll_protocol::Echo {
        id: 1,
        payload: String::new(),
    }))
    .len();
    let mut ok = 0;
    for frame_len in [overhead, 4095, 4096, 4097, 65_535, 65_536, 65_537, 1 << 20] {
        let p = "y".repeat(frame_len.saturating_sub(overhead));
        assert_eq!(
            c.echo(&p, TIMEOUT).unwrap(),
            p,
            "frame of {frame_len} bytes"
        );
        ok += 1;
    }
    let nul = "a\0b\0".repeat(1000);
    assert_eq!(c.echo(&nul, TIMEOUT).unwrap(), nul);
    ok += 1;
    let over = c.echo(&"z".repeat(1 << 20), TIMEOUT).unwrap_err();
    assert!(matches!(over, ClientError::TooLarge(_)), "{over}");
    let (w, mut r) = raw_session(&s);
    let mut big = br#"{"type":"echo","id":1,"payload":""#.to_vec();
    big.extend(std::iter::repeat_n(b'q', 1 << 20));
    big.extend_from_slice(b"\"}\n");
    let v = raw_call(&w, &mut r, &big);
    assert_eq!(
        (v["type"].as_str(), v["code"].as_str()),
        (Some("error"), Some("too_large")),
        "{v}"
    );
    let v = raw_call(
        &w,
        &mut r,
        b"{\"type\":\"echo\",\"id\":2,\"payload\":\"\xff\xfe\"}\n",
    );
    assert_eq!(v["code"], "bad_frame", "{v}");
    assert!(v["message"].as_str().unwrap().contains("UTF-8"));
    let v = raw_call(
        &w,
        &mut r,
        b"{\"type\":\"echo\",\"id\":3,\"payload\":\"raw\x00nul\"}\n",
    );
    assert_eq!(v["code"], "bad_frame", "{v}");
    let v = raw_call(
        &w,
        &mut r,
        b"{\"type\":\"echo\",\"id\":4,\"payload\":\"fine\"}\n",
    );
    assert_eq!(v["payload"], "fine", "the session survives bad frames");
    figure(
        "payload edges",
        format!(
            "{ok} sizes/contents round-tripped identically (0 .. 1 MiB, NUL escapes); over the cap, invalid UTF-8 and raw NUL bytes: clear errors, session kept"
        ),
    );
}

#[test]
fn random_frames_do_not_stop_the_server_and_memory_stays_bounded() {
    let env = Env::new();
    let (_, ctx) = setup(&env);
    let s = env.server("default", &["--context", &ctx]);
    let frames = n(1_000, 10_000);
    let rss = |pid: i32| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .unwrap()
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap()
    };
    let before = rss(s.pid());
    let mut seedv = common::seed();
    let shared = fifo::open_fifo(&s.paths().requests(), true).unwrap();
    let (w, mut r) = raw_session(&s);
    for i in 0..frames {
        let len = (common::rng(&mut seedv) % 3000) as usize;
        let mut f: Vec<u8> = (0..len).map(|_| common::rng(&mut seedv) as u8).collect();
        f.retain(|&b| b != b'\n');
        f.push(b'\n');
        if i % 2 == 0 {
            fifo::write_all(&shared, &f[..f.len().min(4000)], Instant::now() + TIMEOUT).unwrap();
        } else {
            let v = raw_call(&w, &mut r, &f);
            assert_eq!(v["type"], "error", "{v}");
        }
    }
    let mut c = s.client().unwrap();
    assert!(c.ask("cache", TIMEOUT).unwrap().found);
    let after = rss(s.pid());
    figure(
        "random frames",
        format!(
            "{frames} random frames (half on the shared FIFO, half in a session): server answering, RSS {before} -> {after} KiB"
        ),
    );
    assert!(
        after < before + 20_000,
        "RSS grew from {before} to {after} KiB"
    );
}

#[test]
fn many_clients_with_100kb_frames_never_tear_or_misroute() {
    let env = Env::new();
    let (_, ctx) = setup(&env);
    let s = env.server("default", &["--context", &ctx]);
    let per = n(50, 1_000);
    let threads: Vec<_> = (0..16)
        .map(|c| {
            let mut client = s.client().unwrap();
            std::thread::spawn(move || {
                let mut bad = 0;
                for r in 0..per {
                    let p = format!("{c}:{r}:{}", "w".repeat(100_000));
                    if client.echo(&p, TIMEOUT).unwrap() != p {
                        bad += 1;
                    }
                }
                bad
            })
        })
        .collect();
    let bad: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    figure(
        "16 clients x 100 KB",
        format!("{} requests: {bad} torn or misrouted", 16 * per),
    );
    assert_eq!(bad, 0);
}

#[test]
fn a_writer_holding_the_lock_costs_no_error_and_no_question() {
    let env = Env::new();
    let (conv, ctx) = setup(&env);
    let _s = env.server("default", &["--context", &ctx]);
    let p = env.poller(&conv, "default", &["--concurrency", "8"]);
    let total = n(300, 10_000);
    let (hold, every) = if full() { (2.0, 10.0) } else { (1.0, 2.0) };
    let db = env.db();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let st = stop.clone();
    let locker = std::thread::spawn(move || {
        let c = rusqlite::Connection::open(&db).unwrap();
        let mut held = 0;
        while !st.load(std::sync::atomic::Ordering::Relaxed) {
            c.execute_batch("BEGIN IMMEDIATE").unwrap();
            std::thread::sleep(Duration::from_secs_f64(hold));
            c.execute_batch("COMMIT").unwrap();
            held += 1;
            std::thread::sleep(Duration::from_secs_f64(every - hold));
        }
        held
    });
    // Questions arrive over about three lock cycles, so several lock
    // periods fall in the middle of the run.
    let mut ids = Vec::with_capacity(total);
    for part in 0..10 {
        ids.extend(env.send_queries(&conv, &format!("lock{part}"), total / 10, "cache?"));
        std::thread::sleep(Duration::from_secs_f64(every * 0.3));
    }
    wait_until("every question answered", TIMEOUT * 20, || {
        env.responses().len() >= ids.len()
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let held = locker.join().unwrap();
    let (once, lost, twice) = tally(&env, &ids);
    let busy = p.log().matches("busy").count();
    figure(
        "write lock held",
        format!(
            "{hold} s of every {every} s ({held} times) during {total} questions: {once} once, {lost} lost, {twice} twice, {busy} busy errors"
        ),
    );
    assert!(
        held >= 2,
        "the lock was held only {held} time(s) during the run"
    );
    assert_eq!((once, lost, twice, busy), (total, 0, 0, 0), "{}", p.log());
}

#[test]
fn a_full_disk_answers_nothing_without_a_commit_and_recovers() {
    // A small tmpfs holds the bridge; a filler file takes the rest.
    let env = Env::new();
    let disk = SmallDisk::mount(&env, "small-disk");
    let mnt = disk.0.clone();
    let db = mnt.join("bridge.db");
    let (ctx_conv, ctx) = {
        let ctx = env.path("NOTES.md");
        std::fs::write(&ctx, "# Notes\nWe kept the cache at 64 entries.\n").unwrap();
        let mut b = autopoll_bridge::Bridge::open_or_create(&db).unwrap();
        let c = b
            .create_conversation("a", "b", Duration::from_secs(3600))
            .unwrap();
        (c, path_str(&ctx).to_string())
    };
    let conv = common::Conversation {
        id: ctx_conv.conversation_id.clone(),
        token_a: ctx_conv.session_a_token.clone(),
        token_b: ctx_conv.session_b_token.clone(),
    };
    let mut b = autopoll_bridge::Bridge::open(&db).unwrap();
    let total = n(100, 300);
    let ids: Vec<String> = (0..total)
        .map(|i| {
            let q = format!("q-disk-{i}");
            b.send(
                &conv.id,
                autopoll_bridge::Session::A,
                &conv.token_a,
                &autopoll_bridge::shard::query_text(&q, "cache?"),
                None,
            )
            .unwrap();
            q
        })
        .collect();
    drop(b);
    // The inspecting connection maps the shared-memory index now: a new
    // connection could not grow it once the disk is full.
    let ro = rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    let _: i64 = ro
        .query_row("SELECT count(*) FROM messages", [], |r| r.get(0))
        .unwrap();
    // Fill the disk.
    let filler = mnt.join("filler");
    disk.fill(&filler);
    let _s = env.server("default", &["--context", &ctx]);
    let p = Command::new(env!("CARGO_BIN_EXE_autopoll-poller"))
        .args([
            "--db",
            path_str(&db),
            "--conversation",
            &conv.id,
            "--runtime-dir",
            path_str(&env.runtime()),
            "--lease",
            "1",
        ])
        .env("AUTOPOLL_TOKEN", &conv.token_b)
        .stderr(std::fs::File::create(env.path("poller-disk.log")).unwrap())
        .spawn()
        .unwrap();
    let pid = p.id() as i32;
    let _p = common::KillOnDrop(p);
    std::thread::sleep(Duration::from_millis(500));
    let ticks0 = common::cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(2));
    let ticks = common::cpu_ticks(pid) - ticks0;
    // While full: anything marked read has its answer (same transaction).
    let check = || -> (i64, i64) {
        let read: i64 = ro
            .query_row(
                "SELECT count(*) FROM messages WHERE to_session='b' AND read=1",
                [],
                |r| r.get(0),
            )
            .unwrap();
        let answered: i64 = ro
            .query_row(
                "SELECT count(*) FROM messages WHERE to_session='a'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        (read, answered)
    };
    let (read_full, answered_full) = check();
    assert_eq!(
        read_full, answered_full,
        "a question was marked read without its answer"
    );
    std::fs::remove_file(&filler).unwrap();
    wait_until("all answered once space returns", TIMEOUT * 2, || {
        check().1 >= total as i64
    });
    let mut st = ro
        .prepare("SELECT message FROM messages WHERE to_session='a'")
        .unwrap();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for m in st.query_map([], |r| r.get::<_, String>(0)).unwrap() {
        let v: Value = serde_json::from_str(&m.unwrap()).unwrap();
        *counts
            .entry(v["query_id"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    let once = ids.iter().filter(|i| counts.get(*i) == Some(&1)).count();
    let log = std::fs::read_to_string(env.path("poller-disk.log")).unwrap_or_default();
    let failures_logged = log.matches("event=claim_failed").count();
    figure(
        "full disk",
        format!(
            "while full: {answered_full} answered, {read_full} read (equal), poller CPU {ticks} ticks in 2 s, claim failure logged {failures_logged} time(s); after space returned: {once}/{total} answered once"
        ),
    );
    assert_eq!(once, total);
    // Regression: it once spun on its own failed writes (tens of thousands of log lines).
    assert!(
        ticks < 40,
        "the poller spun while the disk was full: {ticks} ticks"
    );
    assert!(
        failures_logged <= 2,
        "{failures_logged} claim_failed lines: {log}"
    );
}

#[test]
fn another_user_cannot_reach_the_server() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let (_, ctx) = setup(&env);
    // A world-traversable parent, so only autopoll's own modes stand in the way.
    let base = tempfile::Builder::new()
        .prefix("autopoll-user-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let rt = base.path().join("rt");
    let out = env
        .cmd("autopoll-server")
        .args(["-q", "--runtime-dir", path_str(&rt), "--context", &ctx])
        .spawn()
        .unwrap();
    let _srv = common::KillOnDrop(out);
    let paths = autopoll_protocol::ServerPaths::new(&rt, "default").unwrap();
    wait_until("server up", TIMEOUT, || paths.requests().exists());
    let as_nobody = |script: &str| {
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--",
                "sh",
                "-c",
                script,
            ])
            .output()
            .unwrap()
    };
    let fifo_path = paths.requests();
    let r1 = as_nobody(&format!("exec 3>'{}'", fifo_path.display()));
    assert!(!r1.status.success());
    let e1 = String::from_utf8_lossy(&r1.stderr).to_string();
    assert!(e1.contains("Permission denied"), "{e1}");
    // Even with the directories opened up by mistake, the FIFO itself is 0600.
    for d in [rt.clone(), paths.dir.clone()] {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let r2 = as_nobody(&format!("exec 3<>'{}'", fifo_path.display()));
    assert!(!r2.status.success());
    assert!(String::from_utf8_lossy(&r2.stderr).contains("Permission denied"));
    figure("another user", "uid 65534 gets 'Permission denied' on the runtime dir (0700), and on the FIFO itself (0600) even with the dirs opened to 0755".into());
}

/// Regression: with a question in flight and the bridge's disk full, failed
/// lease extensions left the lease's wake time in the past and the poller
/// spun (~80% CPU) until space returned.
#[test]
fn a_full_disk_with_a_question_in_flight_does_not_spin_the_poller() {
    let env = Env::new();
    let disk = SmallDisk::mount(&env, "small-disk-2");
    let mnt = disk.0.clone();
    let db = mnt.join("bridge.db");
    let ctx = env.path("NOTES.md");
    std::fs::write(&ctx, "# Notes\nWe kept the cache at 64 entries.\n").unwrap();
    let mut b = autopoll_bridge::Bridge::open_or_create(&db).unwrap();
    let c = b
        .create_conversation("a", "b", Duration::from_secs(3600))
        .unwrap();
    let ro = rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    let _: i64 = ro
        .query_row("SELECT count(*) FROM messages", [], |r| r.get(0))
        .unwrap();
    // The question hangs in the backend, so its lease needs extending.
    let _s = env.server(
        "default",
        &[
            "--backend",
            "jsonl",
            "--context",
            path_str(&ctx),
            "--workers",
            "1",
            "--watchdog",
            "60",
            "--",
            "python3",
            &fixture("jsonl_backend.py"),
        ],
    );
    let p = Command::new(env!("CARGO_BIN_EXE_autopoll-poller"))
        .args([
            "-q",
            "--db",
            path_str(&db),
            "--conversation",
            &c.conversation_id,
            "--runtime-dir",
            path_str(&env.runtime()),
            "--lease",
            "2",
        ])
        .env("AUTOPOLL_TOKEN", &c.session_b_token)
        .spawn()
        .unwrap();
    let pid = p.id() as i32;
    let _p = common::KillOnDrop(p);
    b.send(
        &c.conversation_id,
        autopoll_bridge::Session::A,
        &c.session_a_token,
        &autopoll_bridge::shard::query_text("q-hang", "[hang] forever"),
        None,
    )
    .unwrap();
    drop(b);
    wait_until("the question is in flight", TIMEOUT, || {
        ro.query_row(
            "SELECT count(*) FROM autopoll_claims WHERE owner IS NOT NULL",
            [],
            |r| r.get::<_, i64>(0),
        )
        .unwrap()
            == 1
    });
    disk.fill(mnt.join("filler"));
    std::thread::sleep(Duration::from_millis(1_500)); // past the first failed extension
    let ticks0 = common::cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(2));
    let ticks = common::cpu_ticks(pid) - ticks0;
    figure(
        "full disk, question in flight",
        format!("poller CPU {ticks} ticks in 2 s while lease extensions fail"),
    );
    assert!(
        ticks < 40,
        "the poller spun while its leases could not be extended: {ticks} ticks"
    );
}
