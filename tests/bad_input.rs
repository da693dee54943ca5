//! Bad input and hostile neighbours (issue 11), end to end with the real
//! binaries: rows other writers can leave in the bridge file that autopoll
//! must survive without stalling a conversation. Poison rows (not UTF-8, a
//! BLOB, NULL) between good queries; queries as Python's `json.dumps`
//! writes them (lone surrogates, NULs); query ids that are not strings;
//! repeated query ids; timestamps in every form, garbage and the future.
//! Rows meant to come from Python are written by python3 with the Python
//! bridge's own code (`crates/bridge/tests/data/python_bridge.py`).
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use autopoll_bridge::{Session, shard};
use common::{Conversation, Env, TIMEOUT, describe, path_str, wait_until};
use serde_json::Value;

const DOCS: &str = "# Notes

## Cache
We decided to keep the LRU cache at 64 entries.

## Transport
Questions travel over named pipes, one private pair per client.
";

fn context(env: &Env) -> String {
    let p = env.path("NOTES.md");
    std::fs::write(&p, DOCS).unwrap();
    path_str(&p).to_string()
}

fn python_bridge() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("crates/bridge/tests/data/python_bridge.py")
        .to_string_lossy()
        .into_owned()
}

/// Run python3 `code` with the Python bridge's module importable as `pb`
/// and `args` in `sys.argv[1:]`; its output, whatever the exit code.
fn python(code: &str, args: &[&str]) -> std::process::Output {
    let dir = Path::new(&python_bridge())
        .parent()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let prelude =
        format!("import sys, os, json\nsys.path.insert(0, {dir:?})\nimport python_bridge as pb\n");
    Command::new("python3")
        .arg("-c")
        .arg(format!("{prelude}{code}"))
        .args(args)
        .output()
        .expect("python3 is needed for these tests (it is part of the machine image)")
}

/// The Python bridge's `check_messages` for `session`: its output as JSON.
fn python_check(env: &Env, conv: &Conversation, session: &str) -> Result<Value, String> {
    let token = if session == "a" {
        &conv.token_a
    } else {
        &conv.token_b
    };
    let out = Command::new("python3")
        .arg(python_bridge())
        .args(["check", path_str(&env.db()), &conv.id, session, token])
        .output()
        .unwrap();
    if !out.status.success() {
        return Err(describe(&out));
    }
    Ok(serde_json::from_slice(&out.stdout).unwrap())
}

/// Insert a message to session b as a hostile neighbour could: `message`
/// and `timestamp` are SQL expressions. Returns the row id.
fn insert_raw(env: &Env, conv: &Conversation, message_sql: &str, timestamp_sql: &str) -> i64 {
    let b = env.bridge();
    b.connection()
        .execute(
            &format!(
                "INSERT INTO messages (conversation_id, from_session, to_session, message, metadata, timestamp)
                 VALUES (?1, 'a', 'b', {message_sql}, '{{\"action_type\":\"question\"}}', {timestamp_sql})"
            ),
            [&conv.id],
        )
        .unwrap();
    b.connection().last_insert_rowid()
}

fn now_sql() -> &'static str {
    "strftime('%Y-%m-%dT%H:%M:%f', 'now')"
}

/// Responses by query id: how many each got, and the last one's JSON.
fn by_query_id(env: &Env) -> std::collections::HashMap<String, (usize, Value)> {
    let mut m = std::collections::HashMap::new();
    for (q, v) in env.responses() {
        let e = m.entry(q).or_insert((0, Value::Null));
        e.0 += 1;
        e.1 = v;
    }
    m
}

fn outcome(env: &Env, id: i64) -> Option<String> {
    env.bridge().outcome(id).unwrap().map(|o| o.0)
}

/// Server-side count of questions asked (echo and stats do not count).
fn engine_requests(server: &common::Server) -> u64 {
    server
        .client()
        .unwrap()
        .stats(Duration::from_secs(5))
        .unwrap()
        .requests
}

/// The shared part of the poison tests: good queries around `poison`
/// (SQL expressions for `message`) are each answered exactly once, every
/// poison row is dead-lettered once with an error response, claims never
/// fail, the heartbeat goes on, and the Python side reads the file after.
fn poison_rows_between_good_queries(env: &Env, conv: &Conversation, poison: &[&str]) {
    let server = env.server("default", &["--context", &context(env)]);
    let mut good = env.send_queries(conv, "before", 3, "how big is the cache?");
    let bad: Vec<i64> = poison
        .iter()
        .map(|sql| insert_raw(env, conv, sql, now_sql()))
        .collect();
    good.extend(env.send_queries(conv, "after", 3, "how big is the cache?"));
    // Before autopoll gets to it, such a row is as bad for Python's reader:
    // its check_messages fails and marks nothing.
    if poison.iter().any(|p| p.contains("AS TEXT")) {
        let err = python_check(env, conv, "b").unwrap_err();
        assert!(err.contains("UTF-8") || err.contains("decode"), "{err}");
    }

    let mut p = env.poller(
        conv,
        "default",
        &["--heartbeat", "0.2", "--concurrency", "2"],
    );
    wait_until("every good query answered", TIMEOUT, || {
        let got = by_query_id(env);
        good.iter().all(|q| got.contains_key(q))
    });
    wait_until("every poison row finished", TIMEOUT, || {
        bad.iter().all(|&id| outcome(env, id).is_some())
    });
    let got = by_query_id(env);
    for q in &good {
        let (n, v) = &got[q];
        assert_eq!(*n, 1, "{q} answered {n} times");
        assert!(v["answer"].as_str().unwrap().contains("64 entries"), "{v}");
        assert!(v.get("error").is_none(), "{v}");
    }
    for &id in &bad {
        assert_eq!(outcome(env, id).as_deref(), Some("dead_letter"));
        assert!(env.bridge().message(id).unwrap().read);
        let (n, v) = &got[&format!("msg-{id}")];
        assert_eq!(*n, 1, "message {id}: {n} error responses");
        let e = v["error"].as_str().unwrap();
        assert!(e.contains(&format!("message {id} cannot be read")), "{e}");
    }
    assert_eq!(got.len(), good.len() + bad.len(), "{got:?}");
    let log = p.log();
    assert!(!log.contains("claim_failed"), "{log}");
    for &id in &bad {
        assert_eq!(
            log.matches(&format!("event=dead_lettered message_id={id} "))
                .count(),
            1,
            "{log}"
        );
    }
    // The heartbeat is not stuck: it keeps moving and says waiting.
    let hb = || {
        env.bridge()
            .session_status(&conv.id, Session::B)
            .unwrap()
            .map(|s| (s.status, s.last_heartbeat))
    };
    let first = hb().unwrap().1;
    wait_until("a newer heartbeat, status waiting", TIMEOUT, || {
        hb().is_some_and(|(s, t)| s == "waiting" && t != first)
    });
    assert!(p.alive(), "{}", p.log());
    // A question sent now is answered too: the queue is not stuck.
    let later = env.send_queries(conv, "later", 1, "how big is the cache?");
    wait_until("the later query answered", TIMEOUT, || {
        by_query_id(env).contains_key(&later[0])
    });
    assert_eq!(engine_requests(&server), good.len() as u64 + 1);

    // The Python side's own reader works on the file afterwards: nothing
    // unreadable is left unread to b, and our error responses to a are text.
    assert_eq!(python_check(env, conv, "b").unwrap(), Value::Array(vec![]));
    let to_a = python_check(env, conv, "a").unwrap();
    assert_eq!(to_a.as_array().unwrap().len(), good.len() + bad.len() + 1);
    // And the rows are still there, unchanged (only marked read).
    let kinds: Vec<String> = bad
        .iter()
        .map(|id| {
            env.bridge()
                .connection()
                .query_row(
                    "SELECT typeof(message) FROM messages WHERE id = ?1",
                    [id],
                    |r| r.get(0),
                )
                .unwrap()
        })
        .collect();
    assert!(
        kinds
            .iter()
            .all(|k| k == "text" || k == "blob" || k == "null"),
        "{kinds:?}"
    );
    // Status reads the file without error.
    let out = env.run(&["bridge", "status"]);
    assert!(out.status.success(), "{}", describe(&out));
}

#[test]
fn poison_rows_invalid_utf8_and_blob_are_dead_lettered_alone_and_the_queue_goes_on() {
    let env = Env::new();
    let conv = env.conversation();
    poison_rows_between_good_queries(
        &env,
        &conv,
        &[
            "CAST(X'7B22FF7D' AS TEXT)",
            "X'7B2274797065223A227175657279227D00FF'",
        ],
    );
}

/// `messages.message` is NOT NULL in the Python DDL, but a hand-made or
/// older file may lack the constraint (autopoll checks columns, not
/// constraints): a NULL there must not stall the queue either.
#[test]
fn a_null_message_on_a_file_without_not_null_is_dead_lettered_alone() {
    let env = Env::new();
    rusqlite::Connection::open(env.db())
        .unwrap()
        .execute_batch(
            "CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, conversation_id TEXT,
             from_session TEXT, to_session TEXT, message TEXT, metadata TEXT, timestamp TEXT,
             read INTEGER DEFAULT 0)",
        )
        .unwrap();
    let conv = env.conversation();
    poison_rows_between_good_queries(&env, &conv, &["NULL", "CAST(X'FF' AS TEXT)", "X'00'"]);
}

/// Rows written by python3's `json.dumps`, as a real coordinator writes
/// them: a query_id and question holding lone surrogates (`os.fsdecode`
/// of a Latin-1 file name), NULs (escaped by json.dumps, and raw in
/// hand-made JSON), a number id, `NaN` in an extra field, and an object id.
/// Python reads the responses and compares the query ids exactly.
#[test]
fn queries_as_python_writes_them_keep_their_query_id() {
    let env = Env::new();
    let conv = env.conversation();
    let server = env.server("default", &["--context", &context(&env)]);
    let send = r#"
db, conv, token = sys.argv[1:4]
fs = os.fsdecode(b"caf\xe9")
assert fs == "caf\udce9"
queries = [
    {"type": "query", "query_id": "q-" + fs, "question": "how big is the cache in " + fs + "?"},
    {"type": "query", "query_id": "q-nul\x00", "question": "how big\x00 is the cache?"},
    {"type": "query", "query_id": "q-nan", "question": "how big is the cache?", "score": float("nan")},
    {"type": "query", "query_id": 42, "question": "how big is the cache?"},
]
ids = [pb.send(db, conv, "a", token, json.dumps(q))["id"] for q in queries]
# Hand-made JSON with a raw NUL inside a string (json.loads(strict=False) reads it).
ids.append(pb.send(db, conv, "a", token, '{"type": "query", "query_id": "q-raw-nul", "question": "how big is the\x00 cache?"}')["id"])
ids.append(pb.send(db, conv, "a", token, json.dumps({"type": "query", "query_id": {"id": 1}, "question": "cache?"}))["id"])
print(json.dumps(ids))
"#;
    let out = python(send, &[path_str(&env.db()), &conv.id, &conv.token_a]);
    assert!(out.status.success(), "{}", describe(&out));
    let ids: Vec<i64> = serde_json::from_slice(&out.stdout).unwrap();
    let _p = env.poller(&conv, "default", &[]);
    wait_until("six responses", TIMEOUT, || env.responses().len() >= 6);
    // Let a second answer to any of them show, were there one.
    wait_until("every query finished", TIMEOUT, || {
        ids.iter().all(|&id| outcome(&env, id).is_some())
    });

    // Python reads the responses and matches them to what it sent, exactly.
    let verify = r#"
db, conv, token = sys.argv[1:4]
fs = os.fsdecode(b"caf\xe9")
resps = [json.loads(m["message"]) for m in pb.check(db, conv, "a", token)]
def find(qid):
    return [r for r in resps if r["query_id"] == qid and type(r["query_id"]) == type(qid)]
out = {}
for name, qid in [("surrogate", "q-" + fs), ("nul", "q-nul\x00"), ("nan", "q-nan"), ("number", "42"), ("raw_nul", "q-raw-nul")]:
    got = find(qid)
    out[name] = {"count": len(got), "answer": got[0]["answer"] if got else None, "error": got[0].get("error") if got else None}
out["all"] = [r["query_id"] if isinstance(r["query_id"], str) else repr(r["query_id"]) for r in resps]
out["errors"] = [r.get("error") for r in resps if r.get("error")]
print(json.dumps(out))
"#;
    let out = python(verify, &[path_str(&env.db()), &conv.id, &conv.token_a]);
    assert!(out.status.success(), "{}", describe(&out));
    let v = shard::parse_lenient(&String::from_utf8_lossy(&out.stdout)).unwrap();
    for name in ["surrogate", "nul", "nan", "number", "raw_nul"] {
        assert_eq!(v[name]["count"], 1, "{name}: {v:#}");
        assert!(v[name]["error"].is_null(), "{name}: {v:#}");
        assert!(
            v[name]["answer"].as_str().unwrap().contains("64 entries"),
            "{name}: {v:#}"
        );
    }
    // The object id: an error response under msg-N, naming the problem.
    let obj = ids[5];
    let errors = v["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{v:#}");
    assert!(
        errors[0]
            .as_str()
            .unwrap()
            .contains("`query_id` is an object"),
        "{v:#}"
    );
    assert!(
        v["all"]
            .as_array()
            .unwrap()
            .contains(&Value::String(format!("msg-{obj}"))),
        "{v:#}"
    );
    assert_eq!(outcome(&env, obj).as_deref(), Some("dead_letter"));
    assert_eq!(engine_requests(&server), 5);
}

/// A coordinator retrying a send repeats its query_id: the second gets the
/// stored answer flagged `"repeat": true`, and the engine is asked once.
/// Also when both copies are queued before the poller starts (the second
/// waits for the first one's answer).
#[test]
fn a_repeated_query_id_gets_the_stored_answer_again_without_the_engine() {
    let env = Env::new();
    let conv = env.conversation();
    let server = env.server("default", &["--context", &context(&env)]);
    let mut b = env.bridge();
    let mut send = |qid: &str, question: &str| {
        b.send(
            &conv.id,
            Session::A,
            &conv.token_a,
            &shard::query_text(qid, question),
            None,
        )
        .unwrap()
        .id
    };
    // Two copies queued together, before any poller runs.
    let twin1 = send("q-twin", "what travels over named pipes?");
    let twin2 = send("q-twin", "what travels over named pipes?");
    let _p = env.poller(&conv, "default", &["--concurrency", "4"]);
    wait_until("both twins finished", TIMEOUT, || {
        outcome(&env, twin1).is_some() && outcome(&env, twin2).is_some()
    });
    assert_eq!(engine_requests(&server), 1);

    let first = send("q-rep", "how big is the cache?");
    wait_until("the first answer", TIMEOUT, || {
        outcome(&env, first).is_some()
    });
    assert_eq!(engine_requests(&server), 2);
    let again = send("q-rep", "how big is the cache?");
    wait_until("the repeat answered", TIMEOUT, || {
        outcome(&env, again).is_some()
    });
    assert_eq!(engine_requests(&server), 2, "the engine was asked again");
    // An error is not remembered: a query id whose first try got an error
    // response is asked again when it comes back.
    let bad = send("q-bad", " ");
    wait_until("the bad one finished", TIMEOUT, || {
        outcome(&env, bad).is_some()
    });
    let retry = send("q-bad", "how big is the cache?");
    wait_until("the retry answered", TIMEOUT, || {
        outcome(&env, retry).is_some()
    });
    assert_eq!(engine_requests(&server), 3);

    let responses: Vec<Value> = env.responses().into_iter().map(|(_, v)| v).collect();
    let of = |q: &str| -> Vec<&Value> { responses.iter().filter(|r| r["query_id"] == q).collect() };
    let retried = of("q-bad");
    assert_eq!(retried.len(), 2, "{responses:#?}");
    assert!(retried[0]["error"].is_string() && retried[1]["error"].is_null());
    assert!(retried[1].get("repeat").is_none());
    for q in ["q-twin", "q-rep"] {
        let rs = of(q);
        assert_eq!(rs.len(), 2, "{q}: {responses:#?}");
        assert!(rs[0].get("repeat").is_none(), "{:#}", rs[0]);
        assert_eq!(rs[1]["repeat"], true, "{:#}", rs[1]);
        assert_eq!(rs[0]["answer"], rs[1]["answer"]);
        assert!(rs[1]["answer"].as_str().unwrap().len() > 10);
        assert_eq!(rs[0]["sources"], rs[1]["sources"]);
    }
    assert_eq!(outcome(&env, again).as_deref(), Some("answered"));
}

/// Timestamps in every form another writer may use, garbage, and the
/// future: every row is claimed and answered, status and doctor show
/// unknown age instead of failing, and a future stamp does not make its
/// question wait behind newer ones.
#[test]
fn timestamps_in_every_form_are_claimed_and_answered_and_status_does_not_fail() {
    let env = Env::new();
    let conv = env.conversation();
    let forms = [
        "strftime('%Y-%m-%dT%H:%M:%f', 'now')",
        "strftime('%Y-%m-%d %H:%M:%f', 'now')",
        "strftime('%Y-%m-%dT%H:%M:%S', 'now')",
        "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')",
        "strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')",
        "CAST(strftime('%s', 'now') AS INTEGER)",
        "CAST(strftime('%s', 'now') AS REAL) + 0.25",
        "'not a time at all'",
        "X'FF00'",
        "strftime('%Y-%m-%dT%H:%M:%f', 'now', '+5 hours')",
    ];
    // The future-stamped one first, then the rest: claimed in arrival order.
    let future = insert_raw(
        &env,
        &conv,
        &format!(
            "'{}'",
            shard::query_text("q-future", "how big is the cache?")
        ),
        forms[9],
    );
    let mut ids = vec![("q-future".to_string(), future)];
    for (i, ts) in forms[..9].iter().enumerate() {
        let qid = format!("q-ts-{i}");
        let text = shard::query_text(&qid, "how big is the cache?");
        ids.push((qid, insert_raw(&env, &conv, &format!("'{text}'"), ts)));
    }

    // Before any poller: status and doctor read the queue, with unknown ages.
    let out = env
        .at("default", &["status", "--db", path_str(&env.db())])
        .output()
        .unwrap();
    // No server runs: exit 10, but the bridge part is printed, not exit 9.
    assert_eq!(out.status.code(), Some(10), "{}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("unknown age"), "{}", describe(&out));
    let v = env.json(&["bridge", "status", "--conversation", &conv.id]);
    let b = v
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["session"] == "b")
        .unwrap();
    assert_eq!(b["unread"], 10, "{v:#}");
    // Garbage, the BLOB and the future one.
    assert_eq!(b["unknown_age"], 3, "{v:#}");
    assert!(b["oldest_unread_age_secs"].as_f64().is_some(), "{v:#}");
    let server = env.server("default", &["--context", &context(&env)]);
    let out = env
        .cmd("autopoll")
        .args(["doctor", "--json", "--name", "default", "--runtime-dir"])
        .arg(env.runtime())
        .env("AUTOPOLL_CONVERSATION", &conv.id)
        .env("AUTOPOLL_TOKEN", &conv.token_b)
        .output()
        .unwrap();
    let d: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", describe(&out)));
    let queue = d["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "queue")
        .unwrap();
    assert_eq!(queue["status"], "pass", "{d:#}");
    assert!(
        queue["detail"]
            .as_str()
            .unwrap()
            .contains("3 of unknown age"),
        "{d:#}"
    );

    // One at a time, so the order of answers is the order of claims.
    let _p = env.poller(&conv, "default", &["--concurrency", "1"]);
    let qids: Vec<String> = ids.iter().map(|(q, _)| q.clone()).collect();
    let got = env.expect_each_answered_once(&qids, TIMEOUT);
    let order: Vec<&str> = got.iter().map(|(q, _)| q.as_str()).collect();
    assert_eq!(order, qids.iter().map(String::as_str).collect::<Vec<_>>());
    for (_, v) in &got {
        assert!(v["answer"].as_str().unwrap().contains("64 entries"), "{v}");
    }
    assert_eq!(engine_requests(&server), 10);
    let out = env
        .at(
            "default",
            &["status", "--db", path_str(&env.db()), "--json"],
        )
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
}

/// Garbage written by another program in a heartbeat or an expiry: status
/// and doctor show it as unknown instead of failing as a whole.
#[test]
fn garbage_heartbeat_and_expiry_timestamps_do_not_fail_status_or_doctor() {
    let env = Env::new();
    let conv = env.conversation();
    let other = env.conversation();
    {
        let b = env.bridge();
        b.connection()
            .execute(
                "INSERT OR REPLACE INTO session_status (conversation_id, session_id, status, last_heartbeat)
                 VALUES (?1, 'b', 'waiting', 'yesterday-ish')",
                [&conv.id],
            )
            .unwrap();
        b.connection()
            .execute(
                "UPDATE conversations SET expires_at = 'never' WHERE id = ?1",
                [&other.id],
            )
            .unwrap();
    }
    let out = env.run(&["bridge", "status", "--json"]);
    assert!(out.status.success(), "{}", describe(&out));
    let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
    let b = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["conversation_id"] == conv.id.as_str() && r["session"] == "b")
        .unwrap();
    assert_eq!(b["alive"], false, "{b}");
    assert!(b["heartbeat_age_secs"].is_null(), "{b}");
    let o = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["conversation_id"] == other.id.as_str())
        .unwrap();
    assert_eq!(o["expired"], true, "{o}");
    let out = env.run(&["bridge", "status"]);
    assert!(out.status.success(), "{}", describe(&out));
    let out = env
        .cmd("autopoll")
        .args(["doctor", "--json", "--name", "none", "--runtime-dir"])
        .arg(env.runtime())
        .env("AUTOPOLL_CONVERSATION", &conv.id)
        .env("AUTOPOLL_TOKEN", &conv.token_b)
        .output()
        .unwrap();
    let v: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", describe(&out)));
    let hb = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "heartbeat")
        .unwrap();
    assert_eq!(hb["status"], "fail", "{hb}");
    assert!(
        hb["detail"].as_str().unwrap().contains("nobody can read"),
        "{hb}"
    );
}
