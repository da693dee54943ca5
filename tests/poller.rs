//! `autopoll-poller` end to end: real bridge file, real server, real
//! poller processes, killed and stopped at awkward moments. Every test ends
//! by checking that each question got exactly one answer.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use autopoll_bridge::{Session, shard};
use common::{Env, TIMEOUT, args, assert_one_line_error, describe, path_str, wait_until};

const DOCS: &str = "# Notes

## Cache
We decided to keep the LRU cache at 64 entries.
Memory on the shard host is tight.

## Transport
Questions travel over named pipes, one private pair per client.
";

fn setup(env: &Env) -> (common::Conversation, String) {
    let conv = env.conversation();
    let ctx = env.path("NOTES.md");
    std::fs::write(&ctx, DOCS).unwrap();
    (conv, path_str(&ctx).to_string())
}

#[test]
fn a_thousand_queries_each_get_exactly_one_response_and_bridge_ask_round_trips() {
    let env = Env::new();
    let (conv, ctx) = setup(&env);
    let _server = env.server("default", &["--context", &ctx]);
    let ids = env.send_queries(&conv, "k", 1_000, "how big is the cache?");
    let mut p = env.poller(&conv, "default", &["--concurrency", "8"]);
    let got = env.expect_each_answered_once(&ids, TIMEOUT * 2);
    let (_, first) = &got[0];
    // The Python shape plus our fields.
    for k in [
        "type",
        "query_id",
        "answer",
        "sources",
        "shard_id",
        "llm_type",
        "response_time_sec",
        "context_version",
        "attempts",
        "found",
    ] {
        assert!(first.get(k).is_some(), "{k} missing from {first}");
    }
    assert_eq!(first["type"], "response");
    assert_eq!(first["llm_type"], "builtin");
    assert_eq!(first["attempts"], 1);
    assert!(first["answer"].as_str().unwrap().contains("64 entries"));
    assert!(first["sources"][0].as_str().unwrap().contains("NOTES.md:"));
    // Metadata and audit as the Python side writes them.
    let b = env.bridge();
    let meta: String = b
        .connection()
        .query_row(
            "SELECT metadata FROM messages WHERE to_session = 'a' LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(meta, r#"{"action_type":"response"}"#);
    let unread: i64 = b
        .connection()
        .query_row(
            "SELECT count(*) FROM messages WHERE to_session = 'b' AND read = 0",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(unread, 0);

    // A coordinator's `autopoll bridge ask` round trip through the poller.
    let out = env.run(&args(
        &[
            "bridge",
            "ask",
            "--json",
            "--timeout",
            "30",
            "what travels over named pipes?",
        ],
        &conv.auth("a"),
    ));
    assert!(out.status.success(), "{}", describe(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["answer"].as_str().unwrap().contains("private pair"),
        "{v}"
    );
    assert!(p.alive(), "{}", p.log());
    assert!(p.log().contains("event=query_answered"), "{}", p.log());
}

/// The askers pipeline: 16 questions in flight go over at most two server
/// sessions (the lanes), not one connection each.
#[test]
fn a_poller_asks_over_at_most_two_connections_whatever_its_concurrency() {
    let env = Env::new();
    let (conv, ctx) = setup(&env);
    let server = env.server("default", &["--context", &ctx]);
    let ids = env.send_queries(&conv, "k", 300, "how big is the cache?");
    let _p = env.poller(&conv, "default", &["--concurrency", "16"]);
    env.expect_each_answered_once(&ids, TIMEOUT * 2);
    let st = server.client().unwrap().stats(TIMEOUT).unwrap();
    // Two lanes, the poller's health probe, and this client.
    assert!(st.sessions <= 4, "{} sessions open", st.sessions);
    assert_eq!(st.requests, 300);
}

/// The WAL's frames committed (`mxFrame`) and copied back into the file
/// (`nBackfill`), from the WAL index (SQLite's documented `-shm` layout,
/// native byte order).
fn wal_frames(db: &Path) -> (u32, u32) {
    let shm = std::fs::read(format!("{}-shm", db.display())).unwrap_or_default();
    let word = |at: usize| {
        shm.get(at..at + 4)
            .map_or(0, |b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    };
    (word(16), word(96))
}

/// The poller's commits are copied back into the bridge file by its
/// checkpoint thread (its own connection checkpoints only past 10,000 WAL
/// pages): after a run of answers the WAL is all checkpointed, although no
/// commit crossed SQLite's automatic threshold.
#[test]
fn the_checkpoint_thread_copies_the_pollers_commits_back_into_the_file() {
    let env = Env::new();
    let (conv, ctx) = setup(&env);
    let _server = env.server("default", &["--context", &ctx]);
    let _p = env.poller(&conv, "default", &["--concurrency", "8"]);
    let ids = env.send_queries(&conv, "k", 400, "how big is the cache?");
    env.expect_each_answered_once(&ids, TIMEOUT * 2);
    wait_until("the WAL is checkpointed", TIMEOUT, || {
        let (committed, copied) = wal_frames(&env.db());
        committed > 0 && copied == committed
    });
}

#[test]
fn plain_text_other_types_bad_and_oversized_questions() {
    let env = Env::new();
    let (conv, ctx) = setup(&env);
    let _server = env.server("default", &["--context", &ctx]);
    let mut b = env.bridge();
    let send = |b: &mut autopoll_bridge::Bridge, text: &str| {
        b.send(&conv.id, Session::A, &conv.token_a, text, None)
            .unwrap()
            .id
    };
    let plain = send(&mut b, "what is in the cache?");
    let info = send(&mut b, r#"{"type":"info","text":"fyi"}"#);
    let bad = send(&mut b, r#"{"type":"query","query_id":"q-bad"}"#);
    let big = send(&mut b, &shard::query_text("q-big", &"cache ".repeat(100)));
    let _p = env.poller(&conv, "default", &["--max-question-bytes", "200"]);
    wait_until("three responses", TIMEOUT, || env.responses().len() >= 3);
    wait_until("the info message is read", TIMEOUT, || {
        env.bridge().message(info).unwrap().read
    });
    let got = env.responses();
    assert_eq!(got.len(), 3, "{got:?}");
    let by = |q: &str| {
        got.iter()
            .find(|(id, _)| id == q)
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    assert!(
        by(&format!("msg-{plain}"))["answer"]
            .as_str()
            .unwrap()
            .contains("64 entries")
    );
    assert!(
        by("q-bad")["error"]
            .as_str()
            .unwrap()
            .contains("no `question`")
    );
    assert!(
        by("q-big")["error"]
            .as_str()
            .unwrap()
            .contains("at most 200")
    );
    assert!(by("q-big")["answer"].as_str().unwrap().is_empty());
    for id in [plain, info, bad, big] {
        assert!(env.bridge().message(id).unwrap().read);
    }
    assert_eq!(env.bridge().outcome(info).unwrap().unwrap().0, "skipped");
}

#[test]
fn poller_killed_9_at_random_moments_loses_nothing_and_answers_nothing_twice() {
    let env = Env::new();
    let (conv, ctx) = setup(&env);
    let _server = env.server("default", &["--context", &ctx]);
    let ids = env.send_queries(&conv, "kill", 1_000, "cache?");
    let mut s = common::seed();
    for trial in 0..6 {
        let mut p = env.poller(&conv, "default", &["--lease", "1", "--concurrency", "4"]);
        let ms = 5 + common::rng(&mut s) % 150;
        std::thread::sleep(Duration::from_millis(ms));
        p.kill9();
        let integrity: String = env
            .bridge()
            .connection()
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(integrity, "ok", "trial {trial}");
    }
    let _last = env.poller(&conv, "default", &["--lease", "1"]);
    env.expect_each_answered_once(&ids, TIMEOUT * 2);
    wait_until("no claim is left owned", TIMEOUT, || {
        env.owned_claims() == 0
    });
}

#[test]
fn server_killed_and_restarted_mid_run_the_poller_recovers_by_itself() {
    let env = Env::new();
    let (conv, ctx) = setup(&env);
    let server = env.server("default", &["--context", &ctx]);
    let mut p = env.poller(&conv, "default", &["--concurrency", "4"]);
    let first = env.send_queries(&conv, "before", 300, "cache?");
    wait_until("some answers", TIMEOUT, || !env.responses().is_empty());
    drop(server); // kill -9
    let second = env.send_queries(&conv, "during", 200, "cache?");
    wait_until("the poller reports blocked", TIMEOUT, || {
        env.shard_status(&conv).as_deref() == Some("blocked")
    });
    let _server = env.server("default", &["--context", &ctx]);
    let all: Vec<String> = first.into_iter().chain(second).collect();
    env.expect_each_answered_once(&all, TIMEOUT * 2);
    assert!(p.alive(), "the poller should have survived: {}", p.log());
    let log = p.log();
    // Logged once per state change, never per retry: every server_down has
    // its server_up. (Under heavy load a slow handshake with the new server
    // can be a second, real, brief outage; hence not exactly one.)
    let (downs, ups) = (
        log.matches("event=server_down").count(),
        log.matches("event=server_up").count(),
    );
    assert!(
        (1..=3).contains(&downs) && downs == ups,
        "downs {downs}, ups {ups}: {log}"
    );
    wait_until("status back to waiting", TIMEOUT, || {
        env.shard_status(&conv).as_deref() == Some("waiting")
    });
}

#[test]
fn another_process_holding_the_write_lock_for_3s_costs_nothing() {
    let env = Env::new();
    let (conv, ctx) = setup(&env);
    let _server = env.server("default", &["--context", &ctx]);
    let mut p = env.poller(&conv, "default", &[]);
    let mut ids = env.send_queries(&conv, "pre", 50, "cache?");
    let holder = rusqlite::Connection::open(env.db()).unwrap();
    holder.execute_batch("BEGIN IMMEDIATE").unwrap();
    // Queue more while the lock is held, from a thread that waits for it too.
    let db = env.db();
    let (cid, ta) = (conv.id.clone(), conv.token_a.clone());
    let sender = std::thread::spawn(move || {
        let mut b = autopoll_bridge::Bridge::open(&db).unwrap();
        (0..50)
            .map(|i| {
                let qid = format!("q-locked-{i}");
                b.send(
                    &cid,
                    Session::A,
                    &ta,
                    &shard::query_text(&qid, "cache?"),
                    None,
                )
                .unwrap();
                qid
            })
            .collect::<Vec<_>>()
    });
    std::thread::sleep(Duration::from_secs(3));
    holder.execute_batch("COMMIT").unwrap();
    ids.extend(sender.join().unwrap());
    env.expect_each_answered_once(&ids, TIMEOUT);
    assert!(p.alive(), "{}", p.log());
}

/// A poller stopped past its lease (SIGSTOP) while holding a question: a
/// second poller answers it; the first, continued, writes nothing.
#[test]
fn a_stale_poller_writes_no_second_answer() {
    let env = Env::new();
    let (conv, ctx) = setup(&env);
    let server = env.server("default", &["--context", &ctx]);
    server.signal(libc::SIGSTOP); // the first poller's question will hang
    let mut a = env.poller(
        &conv,
        "default",
        &[
            "--lease",
            "1",
            "--shard-id",
            "first",
            "--query-timeout",
            "20",
        ],
    );
    let ids = env.send_queries(&conv, "stale", 1, "cache?");
    wait_until("the first poller claims it", TIMEOUT, || {
        env.owned_claims() == 1
    });
    env.stop_outside_a_transaction(&a);
    std::thread::sleep(Duration::from_millis(1_500)); // past the 1 s lease
    server.signal(libc::SIGCONT); // it now answers the first poller's request into its pipe
    let _b = env.poller(&conv, "default", &["--lease", "10", "--shard-id", "second"]);
    let got = env.expect_each_answered_once(&ids, TIMEOUT);
    assert_eq!(got[0].1["shard_id"], "second");
    assert_eq!(got[0].1["attempts"], 2);
    a.signal(libc::SIGCONT);
    wait_until(
        "the first poller notices it lost the claim",
        TIMEOUT,
        || {
            let log = a.log();
            log.contains("event=stale") || log.contains("event=lease_lost")
        },
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(env.responses().len(), 1, "a second answer was written");
    assert!(a.alive());
}

/// A question that kills its consumer every time: after exactly
/// --max-attempts claims it gets an error response instead of a fourth try.
#[test]
fn a_poison_question_is_dead_lettered_after_exactly_max_attempts() {
    let env = Env::new();
    let (conv, ctx) = setup(&env);
    let server = env.server("default", &["--context", &ctx]);
    server.signal(libc::SIGSTOP); // every attempt hangs until we kill the poller
    let ids = env.send_queries(&conv, "poison", 1, "cache?");
    let attempts = || -> i64 {
        env.bridge()
            .connection()
            .query_row(
                "SELECT COALESCE(MAX(attempts), 0) FROM autopoll_claims WHERE owner IS NOT NULL",
                [],
                |r| r.get(0),
            )
            .unwrap()
    };
    for attempt in 1..=3 {
        let mut p = env.poller(&conv, "default", &["--lease", "0.3", "--max-attempts", "3"]);
        wait_until(&format!("attempt {attempt} is claimed"), TIMEOUT, || {
            attempts() == attempt
        });
        p.kill9();
    }
    server.signal(libc::SIGCONT);
    let _p = env.poller(&conv, "default", &["--lease", "0.3", "--max-attempts", "3"]);
    let got = env.expect_each_answered_once(&ids, TIMEOUT);
    let r = &got[0].1;
    assert_eq!(r["attempts"], 3, "{r}");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .starts_with("dead-lettered after 3 attempts"),
        "{r}"
    );
    let st = env.bridge().stats(Some(&conv.id)).unwrap();
    assert_eq!(
        st.iter().find(|s| s.session == "b").unwrap().dead_lettered,
        1
    );
}

#[test]
fn sigterm_with_questions_in_flight_exits_0_and_leaves_nothing_claimed() {
    let env = Env::new();
    let (conv, ctx) = setup(&env);
    let server = env.server("default", &["--context", &ctx]);
    server.signal(libc::SIGSTOP);
    let ids = env.send_queries(&conv, "term", 4, "cache?");
    let mut p = env.poller(&conv, "default", &["--grace", "0.3", "--concurrency", "4"]);
    wait_until("questions in flight", TIMEOUT, || env.owned_claims() == 4);
    p.signal(libc::SIGTERM);
    assert_eq!(p.wait_exit(TIMEOUT), Some(0), "{}", p.log());
    assert_eq!(env.owned_claims(), 0, "{}", p.log());
    assert!(env.responses().is_empty());
    server.signal(libc::SIGCONT);
    let _p2 = env.poller(&conv, "default", &[]);
    let got = env.expect_each_answered_once(&ids, TIMEOUT);
    // Released with the attempt refunded: the stop was not the questions' fault.
    assert!(got.iter().all(|(_, v)| v["attempts"] == 1), "{got:?}");
}

#[test]
fn two_pollers_share_the_work_without_duplicates() {
    let env = Env::new();
    let (conv, ctx) = setup(&env);
    let _server = env.server("default", &["--context", &ctx, "--workers", "2"]);
    let _a = env.poller(
        &conv,
        "default",
        &["--shard-id", "one", "--concurrency", "2"],
    );
    let _b = env.poller(
        &conv,
        "default",
        &["--shard-id", "two", "--concurrency", "2"],
    );
    std::thread::sleep(Duration::from_millis(200));
    let ids = env.send_queries(&conv, "pair", 500, "cache?");
    let got = env.expect_each_answered_once(&ids, TIMEOUT * 2);
    for shard in ["one", "two"] {
        let n = got.iter().filter(|(_, v)| v["shard_id"] == shard).count();
        assert!(n > 0, "poller {shard} answered nothing");
    }
}

#[test]
fn heartbeat_is_blocked_without_a_server_and_waiting_once_it_is_up() {
    let env = Env::new();
    let (conv, ctx) = setup(&env);
    let mut p = env.poller(&conv, "default", &["--heartbeat", "0.2"]);
    wait_until("status blocked", TIMEOUT, || {
        env.shard_status(&conv).as_deref() == Some("blocked")
    });
    assert!(p.log().contains("event=server_down"), "{}", p.log());
    let ids = env.send_queries(&conv, "late", 3, "cache?");
    std::thread::sleep(Duration::from_millis(200));
    assert!(env.responses().is_empty());
    let _server = env.server("default", &["--context", &ctx]);
    env.expect_each_answered_once(&ids, TIMEOUT);
    wait_until("status waiting", TIMEOUT, || {
        env.shard_status(&conv).as_deref() == Some("waiting")
    });
    let st = env
        .bridge()
        .partner_status(&conv.id, Session::A, &conv.token_a)
        .unwrap();
    assert_eq!(st.status, "waiting");
    assert!(st.alive);
    assert!(p.alive());
}

#[test]
fn wrong_or_expired_token_refuses_to_start_saying_how_to_renew() {
    let env = Env::new();
    let (conv, _) = setup(&env);
    let bad = common::Conversation {
        id: conv.id.clone(),
        token_a: conv.token_a.clone(),
        token_b: conv.token_a.clone(),
    };
    let mut p = env.poller(&bad, "default", &[]);
    assert_eq!(p.wait_exit(TIMEOUT), Some(3));
    assert!(p.log().contains("autopoll bridge renew"), "{}", p.log());
    let expired = env.conversation_with_ttl("0.0001");
    let t = Instant::now();
    wait_until("expiry", TIMEOUT, || {
        t.elapsed() > Duration::from_millis(400)
    });
    let out = env
        .cmd("autopoll-poller")
        .env("AUTOPOLL_CONVERSATION", &expired.id)
        .env("AUTOPOLL_TOKEN", &expired.token_b)
        .output()
        .unwrap();
    assert_one_line_error(&out, 3, "autopoll bridge renew");
}

#[test]
fn status_shows_the_bridge_side_too() {
    let env = Env::new();
    let (conv, ctx) = setup(&env);
    let _server = env.server("default", &["--context", &ctx]);
    let _p = env.poller(&conv, "default", &[]);
    let ids = env.send_queries(&conv, "st", 5, "cache?");
    env.expect_each_answered_once(&ids, TIMEOUT);
    let out = env
        .at("default", &["status", "--json"])
        .env("AUTOPOLL_DB", env.db())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["server"]["requests"], 5);
    let b = v["bridge"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["session"] == "b")
        .unwrap()
        .clone();
    assert_eq!(b["answered"], 5);
    assert_eq!(b["unread"], 0);
    assert!(b["heartbeat_age_secs"].as_f64().is_some());
    let text = String::from_utf8(
        env.at("default", &["status"])
            .env("AUTOPOLL_DB", env.db())
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(
        text.contains("ANSWERED") && text.contains("requests   5 answered"),
        "{text}"
    );
}

#[test]
fn poller_help_lists_every_flag() {
    let env = Env::new();
    let out = env.cmd("autopoll-poller").arg("--help").output().unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--db",
        "AUTOPOLL_DB",
        "--conversation",
        "AUTOPOLL_CONVERSATION",
        "--token",
        "AUTOPOLL_TOKEN",
        "--session",
        "--name",
        "--runtime-dir",
        "--shard-id",
        "--lease",
        "--max-attempts",
        "--query-timeout",
        "--concurrency",
        "--max-question-bytes",
        "--grace",
        "--heartbeat",
        "--missing-grace",
        "Exit codes:",
        " 14  autopoll-poller: the bridge file stayed missing",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
}

/// Regression: after a full batch the poller must claim the rest of a
/// backlog by itself. (It once waited for another writer's commit or its
/// 1 s rescan between batches.) Watched through a read-only connection,
/// which cannot wake it.
#[test]
fn a_backlog_drains_without_outside_wakeups() {
    let env = Env::new();
    let (conv, ctx) = setup(&env);
    let _server = env.server("default", &["--context", &ctx]);
    let ids = env.send_queries(&conv, "backlog", 100, "cache?");
    let _p = env.poller(&conv, "default", &["--concurrency", "1", "--lease", "120"]);
    let ro =
        rusqlite::Connection::open_with_flags(env.db(), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    // 100 batches through 1 s rescans would need 100 s; the bound is 30 s.
    wait_until("the backlog is answered", TIMEOUT, || {
        ro.query_row(
            "SELECT count(*) FROM messages WHERE to_session = 'a'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .unwrap()
            == 100
    });
    env.expect_each_answered_once(&ids, TIMEOUT);
}

/// Regression: with its server gone and a question waiting, the poller
/// spun at 100% CPU (it woke at once to claim, though it would not claim).
/// A sleeping poller uses next to no CPU time, whatever the machine's load.
#[test]
fn the_poller_does_not_spin_while_its_server_is_down() {
    let env = Env::new();
    let (conv, _) = setup(&env);
    let p = env.poller(&conv, "default", &["--heartbeat", "0.5"]);
    env.send_queries(&conv, "idle", 2, "cache?");
    wait_until("status blocked", TIMEOUT, || {
        env.shard_status(&conv).as_deref() == Some("blocked")
    });
    let before = common::cpu_ticks(p.pid());
    std::thread::sleep(Duration::from_secs(2));
    let used = common::cpu_ticks(p.pid()) - before;
    // 2 s of spinning is ~200 ticks; probes and heartbeats need a few.
    assert!(
        used < 40,
        "the poller used {used} ticks of CPU in 2 s while waiting: {}",
        p.log()
    );
}

/// The server took the question and died with it: the attempt counts (a
/// question that kills its server every time must end as a dead letter).
#[test]
fn a_question_lost_with_its_server_counts_an_attempt() {
    let env = Env::new();
    let (conv, ctx) = setup(&env);
    let server = env.server("default", &["--context", &ctx]);
    let _p = env.poller(&conv, "default", &["--concurrency", "1"]);
    let warm = env.send_queries(&conv, "warm", 1, "cache?");
    env.expect_each_answered_once(&warm, TIMEOUT); // the asker is connected now
    server.signal(libc::SIGSTOP);
    let ids = env.send_queries(&conv, "lost", 1, "cache?");
    wait_until("the question is in flight", TIMEOUT, || {
        env.owned_claims() == 1
    });
    std::thread::sleep(Duration::from_millis(200)); // its request is in the pipe
    drop(server); // kill -9 while stopped: the request dies with it
    let _server = env.server("default", &["--context", &ctx]);
    let all: Vec<String> = warm.into_iter().chain(ids).collect();
    let got = env.expect_each_answered_once(&all, TIMEOUT);
    let lost = &got.iter().find(|(q, _)| q == "q-lost-0").unwrap().1;
    assert_eq!(lost["attempts"], 2, "{lost}");
}

/// Regression: with its token expired while running, the poller retried
/// the heartbeat on every loop (the status change looked urgent), spinning.
/// It must keep answering, quietly, and resume heartbeats after a renewal.
#[test]
fn an_expired_token_while_running_neither_spins_nor_stops_answers() {
    let env = Env::new();
    let (_, ctx) = setup(&env);
    let s = env.server("default", &["--context", &ctx]);
    let conv = env.conversation_with_ttl("0.0003");
    let p = env.poller(&conv, "default", &["--heartbeat", "0.5"]);
    let first = env.send_queries(&conv, "before", 1, "cache?");
    env.expect_each_answered_once(&first, TIMEOUT);
    // ~1 s TTL: wait for the poller to notice the expiry.
    wait_until("the token is rejected", TIMEOUT, || {
        p.log().contains("event=token_rejected")
    });
    // Questions already queued by the coordinator are still answered; the
    // status changes this brings (working, then waiting) cannot be written.
    let b = env.bridge();
    let qid = "q-after-expiry";
    b.connection()
        .execute(
            "INSERT INTO messages (conversation_id, from_session, to_session, message, metadata, timestamp) VALUES (?1, 'a', 'b', ?2, '{}', ?3)",
            rusqlite::params![conv.id, shard::query_text(qid, "cache?"), autopoll_bridge::clock::now_string()],
        )
        .unwrap();
    wait_until("the queued question is answered", TIMEOUT, || {
        env.responses().iter().any(|(q, _)| q == qid)
    });
    // Then the server goes too: `blocked` is wanted, and cannot be written.
    drop(s);
    wait_until("the poller sees the server down", TIMEOUT, || {
        p.log().contains("event=server_down")
    });
    let before = common::cpu_ticks(p.pid());
    std::thread::sleep(Duration::from_secs(2));
    let used = common::cpu_ticks(p.pid()) - before;
    assert!(
        used < 40,
        "spinning with an expired token: {used} ticks in 2 s"
    );
}

/// A consistent copy of the bridge at `to` (what a backup tool makes).
fn backup(env: &Env, to: &std::path::Path) {
    let b = env.bridge();
    b.connection()
        .execute("VACUUM INTO ?1", [path_str(to)])
        .unwrap();
}

/// Send queries `q-PREFIX-i` from session a into the bridge at `db`.
fn send_into(
    db: &std::path::Path,
    conv: &common::Conversation,
    prefix: &str,
    n: usize,
) -> Vec<String> {
    let mut b = autopoll_bridge::Bridge::open(db).unwrap();
    (0..n)
        .map(|i| {
            let qid = format!("q-{prefix}-{i}");
            let text = shard::query_text(&qid, "how big is the cache?");
            b.send(&conv.id, Session::A, &conv.token_a, &text, None)
                .unwrap();
            qid
        })
        .collect()
}

/// query_ids of the responses in the bridge at `db`, and how many
/// questions to b are marked read.
fn answered_in(db: &std::path::Path) -> (Vec<String>, i64) {
    let b = autopoll_bridge::Bridge::open(db).unwrap();
    let c = b.connection();
    let mut st = c
        .prepare("SELECT message FROM messages WHERE to_session = 'a' ORDER BY id")
        .unwrap();
    let ids = st
        .query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .map(|m| {
            let v: serde_json::Value = serde_json::from_str(&m.unwrap()).unwrap();
            v["query_id"].as_str().unwrap_or("").to_string()
        })
        .collect();
    let read = c
        .query_row(
            "SELECT count(*) FROM messages WHERE to_session = 'b' AND read = 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    (ids, read)
}

fn count(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

/// The bridge `mv`ed over while questions are in flight (the server is
/// stopped with SIGSTOP so they stay there): the new file's queued queries
/// are each answered once in it; the answers to the old file's questions
/// are dropped, not written into the new file (whose ids are other
/// messages); in the old file those questions stay unread and claimed, and a
/// poller on it answers each once after the leases.
#[test]
fn bridge_replaced_by_mv_mid_question_answers_the_new_file_and_loses_nothing_of_the_old() {
    let env = Env::new();
    let (conv, ctx) = setup(&env);
    let new = env.path("new.db");
    backup(&env, &new); // the same conversation, none of the old file's messages
    let b_ids = send_into(&new, &conv, "new", 3);
    let server = env.server("default", &["--context", &ctx]);
    let mut p = env.poller(&conv, "default", &["--lease", "2", "--concurrency", "4"]);
    wait_until("the poller polls", TIMEOUT, || {
        p.log().contains("event=polling")
    });
    server.signal(libc::SIGSTOP);
    let a_ids = send_into(&env.db(), &conv, "old", 3);
    wait_until("the old questions are in flight", TIMEOUT, || {
        count(&p.log(), "event=query_claimed") == 3
    });
    let old = env.path("old.db");
    std::fs::hard_link(env.db(), &old).unwrap(); // keep the old file reachable for the checks
    std::fs::rename(&new, env.db()).unwrap();
    wait_until("the poller notices", TIMEOUT, || {
        p.log().contains("event=bridge_replaced")
    });
    server.signal(libc::SIGCONT);
    wait_until("the old answers are dropped", TIMEOUT, || {
        count(&p.log(), "event=answer_dropped") == 3
    });
    // Each new question answered once, no answer of an old one in the new file.
    let got = env.expect_each_answered_once(&b_ids, TIMEOUT);
    assert!(got.iter().all(|(q, _)| q.starts_with("q-new-")), "{got:?}");
    assert!(p.log().contains("event=bridge_reopened"), "{}", p.log());
    assert_eq!(count(&p.log(), "event=bridge_replaced"), 1, "{}", p.log());
    // The old file: nothing marked read, nothing answered.
    let (ids, read) = answered_in(&old);
    assert_eq!((ids.len(), read), (0, 0), "{ids:?}");
    // A poller on the old file answers each of its questions exactly once.
    let mut p2 = env.poller(&conv, "default", &["--db", path_str(&old)]);
    wait_until("the old questions are answered", TIMEOUT, || {
        answered_in(&old).0.len() >= a_ids.len()
    });
    std::thread::sleep(Duration::from_millis(300)); // a straggling second answer would show now
    let (mut ids, read) = answered_in(&old);
    ids.sort();
    let mut want = a_ids.clone();
    want.sort();
    assert_eq!(ids, want, "{}", p2.log());
    assert_eq!(read, 3);
    let (s1, s2) = (p.child.try_wait().unwrap(), p2.child.try_wait().unwrap());
    assert!(
        s1.is_none() && s2.is_none(),
        "a poller exited: {s1:?} {s2:?}\n{}\n{}",
        p.log(),
        p2.log()
    );
    // And the new file still holds exactly its own answers.
    env.expect_each_answered_once(&b_ids, TIMEOUT);
}

/// Deleted, then restored from a backup holding a query: answered after
/// the restore, and the heartbeat is written into the restored file.
#[test]
fn bridge_deleted_then_restored_answers_after_the_restore() {
    let env = Env::new();
    let (conv, ctx) = setup(&env);
    let _server = env.server("default", &["--context", &ctx]);
    let mut p = env.poller(&conv, "default", &[]);
    let first = env.send_queries(&conv, "before", 1, "how big is the cache?");
    env.expect_each_answered_once(&first, TIMEOUT);
    let saved = env.path("backup.db");
    backup(&env, &saved);
    let later = send_into(&saved, &conv, "restored", 1);
    std::fs::remove_file(env.db()).unwrap();
    wait_until("the poller sees it missing", TIMEOUT, || {
        p.log().contains("event=bridge_missing")
    });
    assert!(
        p.log().contains("reason=\"the file is gone\""),
        "{}",
        p.log()
    );
    std::fs::rename(&saved, env.db()).unwrap();
    let mut want = first.clone();
    want.extend(later);
    env.expect_each_answered_once(&want, TIMEOUT);
    let log = p.log();
    assert_eq!(count(&log, "event=bridge_missing"), 1, "{log}");
    let reopened = log.find("event=bridge_reopened").expect("reopened");
    assert!(log[reopened..].contains("event=status"), "{log}");
    wait_until("a heartbeat in the restored file", TIMEOUT, || {
        env.shard_status(&conv).as_deref() == Some("waiting")
    });
    assert!(p.alive());
}

/// The bridge's folder removed: the poller exits with code 14 after
/// --missing-grace (so systemd restarts it). Before that, a folder
/// recreated with a bridge in it within the grace is watched again and used.
#[test]
fn bridge_folder_removed_exits_14_after_missing_grace_and_a_recreated_one_is_watched_again() {
    let env = Env::new();
    let (conv, ctx) = setup(&env);
    let _server = env.server("default", &["--context", &ctx]);
    let dir = env.path("shard");
    std::fs::create_dir(&dir).unwrap();
    let db = dir.join("bridge.db");
    backup(&env, &db);
    let mut p = env.poller(
        &conv,
        "default",
        &["--db", path_str(&db), "--missing-grace", "5"],
    );
    wait_until("the poller polls", TIMEOUT, || {
        p.log().contains("event=polling")
    });

    // Removed and recreated within the grace: used again.
    let keep = env.path("keep.db");
    autopoll_bridge::Bridge::open(&db)
        .unwrap()
        .connection()
        .execute("VACUUM INTO ?1", [path_str(&keep)])
        .unwrap();
    let ids = send_into(&keep, &conv, "back", 1);
    // Regression: the watch thread used to reopen its connection in the
    // middle of the removal and so create a -wal in the folder (ENOTEMPTY).
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        let left: Vec<_> = std::fs::read_dir(&dir)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        panic!(
            "rm -r of the bridge's folder: {e}; left: {left:?}\n{}",
            p.log()
        );
    }
    wait_until("the poller sees the folder gone", TIMEOUT, || {
        p.log().contains("reason=\"its folder is gone\"")
    });
    std::fs::create_dir(&dir).unwrap();
    std::fs::rename(&keep, &db).unwrap();
    wait_until("answered in the recreated folder", TIMEOUT, || {
        answered_in(&db).0 == ids
    });
    assert!(p.log().contains("event=watch_restored"), "{}", p.log());

    // Removed for good: exit 14 once the grace has passed.
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(p.wait_exit(TIMEOUT), Some(14), "{}", p.log());
    let log = p.log();
    assert!(log.contains("event=bridge_gone"), "{log}");
    assert!(log.contains("giving up so a supervisor restarts"), "{log}");
    // Logged once per state change: a closed connection twice, and perhaps
    // "the file is gone" between the folder's return and the file's.
    assert_eq!(count(&log, "connection closed"), 2, "{log}");
    // Between two reopens, each reason is logged at most once.
    for stretch in log.split("event=bridge_reopened") {
        let reasons: Vec<&str> = stretch
            .lines()
            .filter(|l| l.contains("event=bridge_missing"))
            .filter_map(|l| l.split("reason=\"").nth(1)?.split('"').next())
            .collect();
        let mut unique = reasons.clone();
        unique.dedup();
        assert_eq!(unique, reasons, "a state logged twice: {log}");
    }
}

/// A replacement that is not a bridge is refused (and left unchanged) and
/// waited out like a missing file; a bridge put back in its place is used.
#[test]
fn bridge_replaced_by_a_foreign_file_is_refused_untouched_then_a_bridge_is_used() {
    let env = Env::new();
    let (conv, ctx) = setup(&env);
    let _server = env.server("default", &["--context", &ctx]);
    let mut p = env.poller(&conv, "default", &[]);
    wait_until("the poller polls", TIMEOUT, || {
        p.log().contains("event=polling")
    });
    let good = env.path("good.db");
    backup(&env, &good);
    let ids = send_into(&good, &conv, "good", 1);
    let theirs = env.path("theirs.db");
    rusqlite::Connection::open(&theirs)
        .unwrap()
        .execute_batch("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
        .unwrap();
    let bytes = std::fs::read(&theirs).unwrap();
    std::fs::rename(&theirs, env.db()).unwrap();
    wait_until("the foreign file is refused", TIMEOUT, || {
        p.log().contains("event=bridge_refused")
    });
    assert!(p.log().contains("is not a bridge file"), "{}", p.log());
    std::thread::sleep(Duration::from_millis(1_500)); // retried once a second: logged once
    assert_eq!(count(&p.log(), "event=bridge_refused"), 1, "{}", p.log());
    assert_eq!(
        std::fs::read(env.db()).unwrap(),
        bytes,
        "the refused file was changed"
    );
    std::fs::rename(&good, env.db()).unwrap();
    env.expect_each_answered_once(&ids, TIMEOUT);
    assert!(p.alive());
}
