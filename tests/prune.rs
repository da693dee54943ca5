//! Retention end to end: `autopoll bridge prune` on a file the Python
//! server made (which the Python side must still read and write afterwards),
//! and `autopoll-poller --retain` keeping a busy bridge's row counts bounded.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::process::Command;

use autopoll_bridge::{Answer, Bridge, ClaimOptions, Claimer, Session, shard};
use common::{Env, TIMEOUT, args, describe, path_str, wait_until};
use serde_json::Value;

const OLD: &str = "2020-01-01T00:00:00.000001";

const DOCS: &str = "# Notes

## Cache
We decided to keep the LRU cache at 64 entries.
";

fn python_bridge() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("crates/bridge/tests/data/python_bridge.py")
}

/// The Python side's operation on the test's bridge; its JSON output.
fn py(env: &Env, a: &[&str]) -> Value {
    let out = Command::new("python3")
        .arg(python_bridge())
        .arg(a[0])
        .arg(env.db())
        .args(&a[1..])
        .output()
        .expect("python3 runs the Python bridge code");
    assert!(out.status.success(), "python {a:?}: {}", describe(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn count(b: &Bridge, sql: &str) -> i64 {
    b.connection().query_row(sql, [], |r| r.get(0)).unwrap()
}

fn exists(b: &Bridge, id: i64) -> bool {
    count(b, &format!("SELECT count(*) FROM messages WHERE id = {id}")) == 1
}

#[test]
fn prune_removes_old_history_keeps_the_rest_and_python_still_works_on_the_file() {
    let env = Env::new();
    // The Python server makes the file (so it is not in incremental mode).
    let conv = py(&env, &["create", "coordinator", "shard"]);
    let (id, ta) = (
        conv["conversation_id"].as_str().unwrap().to_string(),
        conv["session_a_token"].as_str().unwrap().to_string(),
    );
    let tb = conv["session_b_token"].as_str().unwrap().to_string();
    let mut b = env.bridge();
    let send = |b: &mut Bridge, text: &str| b.send(&id, Session::A, &ta, text, None).unwrap().id;
    let q_old = send(&mut b, &shard::query_text("q-old", "old?"));
    let q_young = send(&mut b, &shard::query_text("q-young", "young?"));
    // Bulk: old questions the Python side read, so there is something to give back.
    let bulk: Vec<i64> = (0..300)
        .map(|i| send(&mut b, &format!("{i} {}", "x".repeat(2000))))
        .collect();
    let me = Claimer::new("test-shard").unwrap();
    let claimed = b
        .claim(
            &me,
            &id,
            Session::B,
            &ClaimOptions {
                limit: 2,
                ..ClaimOptions::default()
            },
        )
        .unwrap();
    let answers: Vec<Answer> = claimed
        .claimed
        .iter()
        .map(|c| Answer {
            repeat_key: Some(format!("k-{}", c.message.id)),
            ..Answer::new(c.message.id, format!("answer to {}", c.message.id))
        })
        .collect();
    let r = b.complete(&me, &answers).unwrap();
    let (r_old, r_young) = (r[0].unwrap(), r[1].unwrap());
    b.read_unread(&id, Session::A, &ta).unwrap();
    let bulk_list = bulk
        .iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(",");
    // Old and unread; old, claimed live and read by hand; read, with a time
    // nobody can read.
    let q_unread = send(&mut b, "never read");
    let q_live = send(&mut b, "claimed");
    let q_bad = send(&mut b, "bad time");
    let live = b
        .claim(
            &me,
            &id,
            Session::B,
            &ClaimOptions {
                limit: 1000,
                ..ClaimOptions::default()
            },
        )
        .unwrap();
    assert_eq!(live.claimed.len(), 3 + bulk.len());
    b.release(&me, &bulk, None, true).unwrap();
    b.release(&me, &[q_bad], None, true).unwrap();
    b.connection()
        .execute_batch(&format!(
            "UPDATE autopoll_claims SET lease_until_ms = 1 WHERE message_id = {q_unread};
             UPDATE messages SET read = 1 WHERE id IN ({q_live}, {q_bad}, {bulk_list});
             UPDATE messages SET timestamp = '{OLD}'
                 WHERE id IN ({q_old}, {r_old}, {q_unread}, {q_live}, {bulk_list});
             UPDATE messages SET timestamp = '1999-99-99 garbage' WHERE id = {q_bad};
             UPDATE autopoll_answers SET answered_at = '{OLD}' WHERE message_id = {q_old};
             UPDATE audit_log SET timestamp = '{OLD}';"
        ))
        .unwrap();
    let q_fresh = send(&mut b, "fresh, unread, with a young audit row");
    drop(b);

    // --dry-run: byte-identical file, the counts of the real run.
    let db = env.db();
    let before = std::fs::read(&db).unwrap();
    let dry = env.json(&["bridge", "prune", "--older-than", "1h", "--dry-run"]);
    assert_eq!(
        std::fs::read(&db).unwrap(),
        before,
        "--dry-run changed the file"
    );

    let out = env.json(&["bridge", "prune", "--older-than", "1h", "--vacuum"]);
    let rep = &out["report"];
    for k in [
        "messages",
        "outcomes",
        "claims",
        "answers",
        "audit_rows",
        "kept_live_claim",
        "kept_bad_time",
    ] {
        assert_eq!(dry["report"][k], rep[k], "{k}: dry {dry} real {out}");
    }
    assert_eq!(rep["messages"], 2 + bulk.len() as u64, "{out}");
    assert_eq!(rep["outcomes"], 1, "{out}");
    assert_eq!(rep["answers"], 1, "{out}");
    // The bulk's released claims go with their messages.
    assert_eq!(rep["claims"], bulk.len() as u64, "{out}");
    assert_eq!(rep["kept_live_claim"], 1, "{out}");
    assert_eq!(rep["kept_bad_time"], 1, "{out}");
    assert_eq!(out["compact"]["auto_vacuum"], "none", "{out}");
    assert_eq!(out["compact"]["vacuum"], "full", "{out}");
    let (bb, ba) = (
        out["bytes_before"].as_u64().unwrap(),
        out["bytes_after"].as_u64().unwrap(),
    );
    assert!(ba < bb / 2, "{out}");

    let b = env.bridge();
    assert!(!exists(&b, q_old) && !exists(&b, r_old));
    assert!(bulk.iter().all(|&m| !exists(&b, m)));
    for m in [q_young, r_young, q_unread, q_live, q_bad, q_fresh] {
        assert!(exists(&b, m), "message {m} was pruned");
    }
    assert_eq!(count(&b, "SELECT count(*) FROM audit_log"), 1);
    assert_eq!(
        count(&b, "SELECT count(*) FROM autopoll_outcomes"),
        1,
        "q_young's outcome stays"
    );
    assert_eq!(
        b.earlier_answer(&id, Session::B, &format!("k-{q_young}"))
            .unwrap()
            .map(|a| a.1),
        Some(format!("answer to {q_young}"))
    );
    drop(b);

    // The Python server still works on the file: a new conversation, a
    // send, and a check that sees the unread messages prune kept.
    let sent = py(&env, &["send", &id, "a", &ta, "after the prune"]);
    let got = py(&env, &["check", &id, "b", &tb]);
    let ids: Vec<i64> = got
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_i64().unwrap())
        .collect();
    for m in [q_unread, q_fresh, sent["id"].as_i64().unwrap()] {
        assert!(ids.contains(&m), "{m} not in {got}");
    }
    let c2 = py(&env, &["create", "x-role", "y-role"]);
    py(
        &env,
        &[
            "send",
            c2["conversation_id"].as_str().unwrap(),
            "a",
            c2["session_a_token"].as_str().unwrap(),
            "hello",
        ],
    );
    // And autopoll on the file after the Python side.
    let st = env.json(&["bridge", "status"]);
    assert_eq!(st.as_array().unwrap().len(), 4, "{st}");
}

#[test]
fn prune_refuses_a_missing_file_and_bad_durations() {
    let env = Env::new();
    let out = env.run(&["bridge", "prune", "--older-than", "1d", "--dry-run"]);
    assert_eq!(out.status.code(), Some(4), "{}", describe(&out));
    assert!(!env.db().exists());
    for bad in ["7", "1w", "0s", "-3d"] {
        let out = env.run(&["bridge", "prune", "--older-than", bad]);
        assert_eq!(out.status.code(), Some(2), "{bad}: {}", describe(&out));
    }
}

/// Responses to session a for `qids`, each once; marks them read as a
/// coordinator would.
fn wait_answered(env: &Env, c: &common::Conversation, qids: &[String]) -> Vec<Value> {
    wait_until("answers to this round", TIMEOUT, || {
        let got = env.responses();
        qids.iter().all(|q| got.iter().any(|(id, _)| id == q))
    });
    let got = env.responses();
    let mut out = Vec::new();
    for q in qids {
        let these: Vec<&Value> = got.iter().filter(|(id, _)| id == q).map(|r| &r.1).collect();
        assert_eq!(these.len(), 1, "{q} answered {} times", these.len());
        out.push(these[0].clone());
    }
    env.ok(&args(&["bridge", "read"], &c.auth("a")));
    out
}

#[test]
fn a_poller_with_retain_keeps_the_row_counts_bounded_while_questions_flow() {
    let env = Env::new();
    let c = env.conversation();
    let ctx = env.path("NOTES.md");
    std::fs::write(&ctx, DOCS).unwrap();
    let _server = env.server("default", &["--context", path_str(&ctx)]);
    let p = env.poller(
        &c,
        "default",
        &["--retain", "1s", "--prune-interval", "0.2"],
    );
    let per_round = 10;
    let rounds = 8;
    let mut pages_after_two = 0;
    let mut last = (0, 0, 0);
    for round in 0..rounds {
        let qids = env.send_queries(&c, &format!("r{round}"), per_round, "how big is the cache?");
        wait_answered(&env, &c, &qids);
        // Everything before this round is pruned once it is a second old:
        // this round's questions and responses and little else remain.
        wait_until(
            &format!("round {round}'s predecessors pruned"),
            TIMEOUT,
            || {
                let b = env.bridge();
                last = (
                    count(&b, "SELECT count(*) FROM messages"),
                    count(&b, "SELECT count(*) FROM autopoll_outcomes"),
                    count(&b, "SELECT count(*) FROM audit_log"),
                );
                last.0 <= 2 * per_round as i64
                    && last.1 <= per_round as i64
                    && last.2 <= 6 * per_round as i64
            },
        );
        eprintln!("round {round}: rows (messages, outcomes, audit) {last:?}");
        if round == 1 {
            pages_after_two = count(&env.bridge(), "PRAGMA page_count");
        }
    }
    let b = env.bridge();
    let sent = count(
        &b,
        "SELECT seq FROM sqlite_sequence WHERE name = 'messages'",
    );
    assert!(
        sent >= (2 * per_round * rounds) as i64,
        "ids show {sent} messages written in all"
    );
    let pages = count(&b, "PRAGMA page_count");
    // Freed pages are reused: the file does not grow round after round.
    assert!(
        pages <= pages_after_two + 8,
        "{pages} pages after {rounds} rounds, {pages_after_two} after 2; rows now {last:?}"
    );
    let log = p.log();
    assert!(log.contains("event=pruned"), "{log}");
}

#[test]
fn a_repeat_of_a_recent_query_id_is_still_answered_as_a_repeat_after_a_prune() {
    let env = Env::new();
    let c = env.conversation();
    let ctx = env.path("NOTES.md");
    std::fs::write(&ctx, DOCS).unwrap();
    let _server = env.server("default", &["--context", path_str(&ctx)]);
    let _p = env.poller(&c, "default", &[]);
    let first = env.send_queries(&c, "rep", 1, "how big is the cache?");
    let a1 = wait_answered(&env, &c, &first).remove(0);
    // The question and its response look old; the stored answer is recent.
    let b = env.bridge();
    b.connection()
        .execute_batch(&format!("UPDATE messages SET timestamp = '{OLD}'"))
        .unwrap();
    drop(b);
    let out = env.json(&["bridge", "prune", "--older-than", "1h"]);
    assert_eq!(out["report"]["messages"], 1, "{out}");
    assert_eq!(out["report"]["kept_for_repeats"], 1, "{out}");
    assert_eq!(out["report"]["answers"], 0, "{out}");
    let again = env.send_queries(&c, "rep", 1, "how big is the cache?");
    wait_until("the repeat's answer", TIMEOUT, || {
        env.responses()
            .iter()
            .filter(|(q, _)| q == &again[0])
            .count()
            == 2
    });
    let got = env.responses();
    let a2 = &got.iter().rev().find(|(q, _)| q == &again[0]).unwrap().1;
    assert_eq!(a2["repeat"], true, "{a2}");
    assert_eq!(a2["answer"], a1["answer"]);
}

#[test]
fn a_question_a_poller_holds_while_its_server_is_stopped_is_never_pruned() {
    let env = Env::new();
    let c = env.conversation();
    let ctx = env.path("NOTES.md");
    std::fs::write(&ctx, DOCS).unwrap();
    let server = env.server("default", &["--context", path_str(&ctx)]);
    let _p = env.poller(&c, "default", &["--lease", "2"]);
    server.signal(libc::SIGSTOP);
    let held = env.send_queries(&c, "held", 1, "how big is the cache?");
    wait_until("the poller claims it", TIMEOUT, || env.owned_claims() == 1);
    // Someone reads it by hand meanwhile, and it looks old.
    let read = env.json(&args(&["bridge", "read"], &c.auth("b")));
    assert_eq!(read.as_array().unwrap().len(), 1, "{read}");
    let backdate = || {
        env.bridge()
            .connection()
            .execute_batch(&format!(
                "UPDATE messages SET timestamp = '{OLD}'; UPDATE audit_log SET timestamp = '{OLD}';"
            ))
            .unwrap();
    };
    backdate();
    // Past the first lease, the poller has extended it: still live.
    let lease = || {
        count(
            &env.bridge(),
            "SELECT lease_until_ms FROM autopoll_claims WHERE owner IS NOT NULL",
        )
    };
    let first = lease();
    let now_ms = || {
        count(
            &env.bridge(),
            "SELECT CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)",
        )
    };
    wait_until(
        "the first lease has run out and been extended",
        TIMEOUT,
        || now_ms() > first && lease() > first,
    );
    let out = env.json(&["bridge", "prune", "--older-than", "1h"]);
    server.signal(libc::SIGCONT);
    assert_eq!(out["report"]["kept_live_claim"], 1, "{out}");
    assert_eq!(out["report"]["messages"], 0, "{out}");
    // Answered once the server runs again; then it can go.
    wait_answered(&env, &c, &held);
    backdate();
    let out = env.json(&["bridge", "prune", "--older-than", "1h"]);
    assert_eq!(out["report"]["messages"], 1, "the question: {out}");
    assert_eq!(out["report"]["kept_for_repeats"], 1, "its response: {out}");
    assert_eq!(
        count(
            &env.bridge(),
            "SELECT count(*) FROM messages WHERE to_session = 'b'"
        ),
        0
    );
}
