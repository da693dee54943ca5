//! Compatibility with the Python MCP bridge server's file format, both ways:
//! a file the Python side made (checked in under tests/data, built by
//! `python_bridge.py make-fixture`) works with every bridge operation, and a
//! file we create is read and written by the Python side's own statements
//! (the same script, run with python3) with identical tables.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use autopoll_bridge::shard::{self, Incoming};
use autopoll_bridge::{
    Answer, Bridge, ClaimOptions, Claimer, DEFAULT_TTL, Error, Session, SessionState,
};
use serde_json::{Value, json};

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

/// Run the Python side's operation; returns its JSON output, or Err(stderr)
/// when it exits non-zero.
fn py(args: &[&str]) -> Result<Value, String> {
    let out = Command::new("python3")
        .arg(data("python_bridge.py"))
        .args(args)
        .output()
        .expect("python3 is needed for the compatibility tests (it is part of the machine image)");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(serde_json::from_slice(&out.stdout).expect("python_bridge.py prints JSON"))
}

fn fixture_copy(dir: &Path) -> (PathBuf, Value) {
    let db = dir.join("python-bridge.db");
    std::fs::copy(data("python-bridge.db"), &db).unwrap();
    let info: Value =
        serde_json::from_str(&std::fs::read_to_string(data("python-bridge.db.json")).unwrap())
            .unwrap();
    (db, info)
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap()
}

#[test]
fn python_made_file_works_with_every_operation() {
    let dir = tempfile::tempdir().unwrap();
    let (db, info) = fixture_copy(dir.path());
    let mut b = Bridge::open(&db).unwrap();
    assert_eq!(b.journal_mode().unwrap(), "wal");
    let live = &info["live"];
    let (conv, ta, tb) = (
        s(&live["conversation_id"]),
        s(&live["session_a_token"]),
        s(&live["session_b_token"]),
    );

    // Tokens and expiry of Python-made conversations.
    b.verify(conv, Session::A, ta).unwrap();
    b.verify(conv, Session::B, tb).unwrap();
    let old = &info["expired"];
    let e = b
        .verify(
            s(&old["conversation_id"]),
            Session::A,
            s(&old["session_a_token"]),
        )
        .unwrap_err();
    assert!(matches!(e, Error::Expired { .. }), "{e}");
    assert_eq!(b.list_conversations().unwrap().len(), 2);

    // Stats on Python rows (timestamps with microseconds).
    let st = b.stats(Some(conv)).unwrap();
    let sb = st.iter().find(|x| x.session == "b").unwrap();
    assert_eq!(sb.unread, 3);
    assert_eq!(sb.status.as_deref(), Some("waiting"));
    assert!(sb.oldest_unread_age_secs.unwrap() >= 0.0);

    // Claims over Python-written messages: query object, plain text, info.
    let me = Claimer::new("compat").unwrap();
    let batch = b
        .claim(&me, conv, Session::B, &ClaimOptions::default())
        .unwrap();
    assert_eq!(batch.claimed.len(), 3);
    let kinds: Vec<Incoming> = batch
        .claimed
        .iter()
        .map(|c| shard::classify(&c.message))
        .collect();
    assert!(matches!(&kinds[0], Incoming::Query(q) if q.query_id == "q-1" && !q.plain_text));
    assert!(matches!(&kinds[1], Incoming::Query(q) if q.plain_text));
    assert!(matches!(&kinds[2], Incoming::Other { kind } if kind == "info"));
    assert_eq!(batch.claimed[0].message.action_type(), Some("question"));
    let ids: Vec<i64> = batch.claimed.iter().map(|c| c.message.id).collect();
    let done = b
        .complete(
            &me,
            &[
                Answer {
                    message_id: ids[0],
                    text: shard::Response {
                        answer: "we kept it".into(),
                        ..shard::Response::failure("q-1", "compat", "", 1)
                    }
                    .to_text(),
                    repeat_key: Some("q-1".into()),
                },
                Answer::new(ids[1], "plain answer"),
            ],
        )
        .unwrap();
    assert!(done.iter().all(Option::is_some));
    assert_eq!(b.skip(&me, &ids[2..], "type info").unwrap(), 1);

    // Send, read-and-mark, heartbeat, partner status, renew.
    b.send(conv, Session::A, ta, "a follow-up", None).unwrap();
    let to_a = b.read_unread(conv, Session::A, ta).unwrap();
    let texts: Vec<&str> = to_a.iter().map(|m| m.message.as_str()).collect();
    assert_eq!(texts[0], "hello coordinator");
    assert_eq!(texts.len(), 3, "{texts:?}");
    b.heartbeat(conv, Session::A, ta, SessionState::Working)
        .unwrap();
    assert_eq!(
        b.partner_status(conv, Session::B, tb).unwrap().status,
        "working"
    );
    b.renew(
        s(&old["conversation_id"]),
        s(&old["session_b_token"]),
        DEFAULT_TTL,
    )
    .unwrap();
    b.verify(
        s(&old["conversation_id"]),
        Session::A,
        s(&old["session_a_token"]),
    )
    .unwrap();

    // And the Python side still reads the file we wrote to.
    let msgs = py(&["check", db.to_str().unwrap(), conv, "b", tb]).unwrap();
    assert_eq!(msgs.as_array().unwrap().len(), 1, "{msgs}");
    assert_eq!(msgs[0]["message"], "a follow-up");
}

#[test]
fn a_file_we_create_has_exactly_the_python_tables() {
    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("ours.db");
    Bridge::open_or_create(&ours).unwrap();
    let theirs = dir.path().join("theirs.db");
    let their_schema = py(&["schema", theirs.to_str().unwrap()]).unwrap();
    let our_schema = py(&["schema", ours.to_str().unwrap()]).unwrap();
    assert_eq!(our_schema, their_schema);
    // The same CREATE TABLE text, whitespace aside.
    let sql = |p: &Path| -> Vec<(String, String)> {
        let c = rusqlite::Connection::open(p).unwrap();
        let mut st = c
            .prepare(
                "SELECT name, sql FROM sqlite_master WHERE type = 'table'
                 AND name IN ('conversations','messages','session_status','audit_log') ORDER BY name",
            )
            .unwrap();
        st.query_map([], |r| {
            let sql: String = r.get(1)?;
            Ok((
                r.get(0)?,
                sql.split_whitespace().collect::<Vec<_>>().join(" "),
            ))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect()
    };
    let (a, b) = (sql(&ours), sql(&theirs));
    assert_eq!(a.len(), 4);
    assert_eq!(a, b);
}

#[test]
fn python_side_operates_on_a_file_we_create() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bridge.db");
    let dbs = db.to_str().unwrap();
    let mut b = Bridge::open_or_create(&db).unwrap();
    let c = b
        .create_conversation("coordinator", "shard", DEFAULT_TTL)
        .unwrap();
    let conv = c.conversation_id.as_str();
    let qid = shard::new_query_id().unwrap();
    let meta = json!({"action_type": "question", "files_involved": []});
    b.send(
        conv,
        Session::A,
        &c.session_a_token,
        &shard::query_text(&qid, "why?"),
        Some(&meta),
    )
    .unwrap();
    b.heartbeat(conv, Session::A, &c.session_a_token, SessionState::Waiting)
        .unwrap();

    // Python verifies our tokens, reads our message, sees our heartbeat.
    let msgs = py(&["check", dbs, conv, "b", &c.session_b_token]).unwrap();
    assert_eq!(msgs.as_array().unwrap().len(), 1);
    let q: Value = serde_json::from_str(s(&msgs[0]["message"])).unwrap();
    assert_eq!(q["query_id"], qid.as_str());
    assert_eq!(msgs[0]["metadata"], meta);
    let p = py(&["partner", dbs, conv, "b", &c.session_b_token]).unwrap();
    assert_eq!(
        (p["status"].as_str(), p["alive"].as_bool()),
        (Some("waiting"), Some(true))
    );
    // Python rejects a wrong token on our file.
    let err = py(&["check", dbs, conv, "b", &c.session_a_token]).unwrap_err();
    assert!(err.contains("Invalid session token"), "{err}");

    // Python answers; we read it, ordered with our own rows by timestamp.
    let answer = json!({"type": "response", "query_id": qid, "answer": "because",
        "sources": ["NOTES.md:1-2"], "shard_id": "py", "llm_type": "claude", "response_time_sec": 31.5});
    py(&[
        "send",
        dbs,
        conv,
        "b",
        &c.session_b_token,
        &answer.to_string(),
        "info",
    ])
    .unwrap();
    py(&["status", dbs, conv, "b", &c.session_b_token, "complete"]).unwrap();
    let got = b.read_unread(conv, Session::A, &c.session_a_token).unwrap();
    assert_eq!(got.len(), 1);
    let r = shard::Response::parse(&got[0].message).unwrap();
    assert_eq!(
        (r.query_id.as_str(), r.answer.as_str()),
        (qid.as_str(), "because")
    );
    assert_eq!(
        b.partner_status(conv, Session::A, &c.session_a_token)
            .unwrap()
            .status,
        "complete"
    );
    // Python and our timestamps interleave in text order.
    let ts: Vec<String> = b
        .connection()
        .prepare("SELECT timestamp FROM messages ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let mut sorted = ts.clone();
    sorted.sort();
    assert_eq!(ts, sorted);
}

#[test]
fn missing_column_is_a_schema_mismatch_naming_table_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("foreign.db");
    let c = rusqlite::Connection::open(&db).unwrap();
    c.execute_batch(
        "CREATE TABLE messages (id INTEGER PRIMARY KEY, conversation_id TEXT, from_session TEXT,
         to_session TEXT, message TEXT, timestamp TEXT, read INTEGER)",
    )
    .unwrap();
    drop(c);
    let e = Bridge::open(&db).unwrap_err();
    match &e {
        Error::SchemaMismatch { table, column, .. } => {
            assert_eq!((table.as_str(), column.as_str()), ("messages", "metadata"));
        }
        other => panic!("expected a schema mismatch, got {other}"),
    }
    assert!(
        e.to_string().contains("`messages` lacks column `metadata`"),
        "{e}"
    );
}

#[test]
fn missing_file_is_not_found_and_not_created() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("nope.db");
    let e = Bridge::open(&db).unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e}");
    assert!(e.to_string().contains("autopoll bridge init"), "{e}");
    assert!(!db.exists());
}

#[test]
fn two_processes_worth_of_connections_share_the_file_under_contention() {
    // A second connection holds the write lock for a while; our operation
    // waits (busy timeout) instead of failing.
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bridge.db");
    let mut b = Bridge::open_or_create(&db).unwrap();
    let c = b.create_conversation("a", "b", DEFAULT_TTL).unwrap();
    let holder = rusqlite::Connection::open(&db).unwrap();
    holder.execute_batch("BEGIN IMMEDIATE").unwrap();
    let releaser = std::thread::Builder::new()
        .name("lock-holder".into())
        .spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            holder.execute_batch("COMMIT").unwrap();
        })
        .unwrap();
    b.send(
        &c.conversation_id,
        Session::A,
        &c.session_a_token,
        "waited",
        None,
    )
    .unwrap();
    releaser.join().unwrap();
}
