//! `autopoll bridge ...` end to end: the real binary on a real bridge file.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Read;
use std::process::Stdio;
use std::time::Duration;

use autopoll_bridge::shard::{self, Response};
use autopoll_bridge::{Answer, Bridge, ClaimOptions, Claimer, Session};
use common::{Env, TIMEOUT, args, assert_one_line_error, describe, path_str, wait_until};
use serde_json::Value;

#[test]
fn send_query_then_read_from_the_other_session_returns_the_query_object() {
    let env = Env::new();
    let c = env.conversation();
    let qid = env.ok(&args(
        &["bridge", "send", "--query", "What did we decide?"],
        &c.auth("a"),
    ));
    let qid = qid.trim();
    assert!(qid.starts_with("q-"), "{qid}");
    let msgs = env.json(&args(&["bridge", "read"], &c.auth("b")));
    let msgs = msgs.as_array().unwrap();
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0]["from"], "a");
    assert_eq!(msgs[0]["metadata"]["action_type"], "question");
    let q: Value = serde_json::from_str(msgs[0]["message"].as_str().unwrap()).unwrap();
    assert_eq!(q["type"], "query");
    assert_eq!(q["query_id"], qid);
    assert_eq!(q["question"], "What did we decide?");
    // Read marks read: nothing the second time.
    assert!(
        env.json(&args(&["bridge", "read"], &c.auth("b")))
            .as_array()
            .unwrap()
            .is_empty()
    );
}

#[test]
fn send_with_explicit_query_id_from_stdin() {
    let env = Env::new();
    let c = env.conversation();
    let mut child = env
        .cmd("autopoll")
        .args(args(
            &["bridge", "send", "--query", "--query-id", "q-42", "-"],
            &c.auth("a"),
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"from stdin?\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "q-42");
    let msgs = env.json(&args(&["bridge", "read"], &c.auth("b")));
    let q: Value = serde_json::from_str(msgs[0]["message"].as_str().unwrap()).unwrap();
    assert_eq!(
        (q["query_id"].as_str(), q["question"].as_str()),
        (Some("q-42"), Some("from stdin?"))
    );
}

#[test]
fn wrong_token_is_one_line_and_exit_3() {
    let env = Env::new();
    let c = env.conversation();
    let mut a = c.auth("b");
    a[5] = c.token_a.clone();
    let out = env.run(&args(&["bridge", "read"], &a));
    assert_one_line_error(&out, 3, "invalid session token");
}

#[test]
fn expired_conversation_is_exit_3_until_renewed() {
    let env = Env::new();
    env.ok(&["bridge", "init"]);
    // 0.0001 h = 0.36 s
    let v = env.json(&[
        "bridge",
        "create",
        "--role-a",
        "x",
        "--role-b",
        "y",
        "--ttl-hours",
        "0.0001",
    ]);
    let id = v["conversation_id"].as_str().unwrap();
    let ta = v["session_a_token"].as_str().unwrap();
    let send = [
        "bridge",
        "send",
        "--conversation",
        id,
        "--session",
        "a",
        "--token",
        ta,
        "hi",
    ];
    wait_until("the conversation expires", TIMEOUT, || {
        env.run(&send).status.code() == Some(3)
    });
    let out = env.run(&send);
    assert_one_line_error(&out, 3, "autopoll bridge renew");
    let renewed = env.json(&["bridge", "renew", "--conversation", id, "--token", ta]);
    assert!(renewed["expires_at"].as_str().unwrap() > v["expires_at"].as_str().unwrap());
    env.ok(&send);
}

#[test]
fn missing_file_is_one_line_and_exit_4() {
    let env = Env::new();
    let c = env.conversation();
    let out = env.run(&args(
        &["bridge", "read", "--db", "no-such.db"],
        &c.auth("b"),
    ));
    assert_one_line_error(&out, 4, "autopoll bridge init");
    assert!(!env.path("no-such.db").exists());
    let out = env.run(&["bridge", "status", "--db", "no-such.db"]);
    assert_one_line_error(&out, 4, "not found");
}

#[test]
fn a_file_whose_conversations_table_lacks_columns_is_a_schema_mismatch_exit_7() {
    let env = Env::new();
    let db = env.path("other.db");
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute_batch("CREATE TABLE conversations (id TEXT PRIMARY KEY, name TEXT)")
        .unwrap();
    let out = env.run(&["bridge", "status", "--db", db.to_str().unwrap()]);
    assert_one_line_error(&out, 7, "`conversations` lacks column `session_a_role`");
}

#[test]
fn ask_times_out_with_exit_5_and_the_query_stays_queued() {
    let env = Env::new();
    let c = env.conversation();
    let out = env.run(&args(
        &["bridge", "ask", "--timeout", "0.2", "anyone there?"],
        &c.auth("a"),
    ));
    assert_one_line_error(&out, 5, "stays queued");
    let st = env.json(&["bridge", "status"]);
    let b = st
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["session"] == "b")
        .unwrap();
    assert_eq!(b["unread"], 1, "{st}");
}

/// A shard built on the bridge crate answers while `bridge ask` waits.
#[test]
fn ask_prints_the_answer_with_its_query_id() {
    let env = Env::new();
    let c = env.conversation();
    // Another message to a that is not the answer: ask must leave it unread.
    env.ok(&args(&["bridge", "send", "unrelated note"], &c.auth("b")));
    let child = env
        .cmd("autopoll")
        .args(args(
            &[
                "bridge",
                "ask",
                "--json",
                "--timeout",
                "30",
                "what is the plan?",
            ],
            &c.auth("a"),
        ))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut shard = Bridge::open(env.db()).unwrap();
    let me = Claimer::new("test-shard").unwrap();
    let mut claimed = Vec::new();
    wait_until("the query arrives", TIMEOUT, || {
        claimed = shard
            .claim(&me, &c.id, Session::B, &ClaimOptions::default())
            .unwrap()
            .claimed;
        !claimed.is_empty()
    });
    let shard::Incoming::Query(q) = shard::classify(&claimed[0].message) else {
        panic!("not a query: {:?}", claimed[0].message);
    };
    assert_eq!(q.question, "what is the plan?");
    let response = Response {
        answer: "ship it".into(),
        sources: vec!["PLAN.md:3-9".into()],
        error: None,
        ..Response::failure(&q.query_id, "test-shard", "", 1)
    };
    shard
        .complete(
            &me,
            &[Answer::new(claimed[0].message.id, response.to_text())],
        )
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["query_id"], q.query_id.as_str());
    assert_eq!(v["answer"], "ship it");
    assert_eq!(v["sources"][0], "PLAN.md:3-9");
    assert!(v["elapsed_ms"].as_f64().unwrap() >= 0.0);
    // The unrelated note is still unread for a.
    let left = env.json(&args(&["bridge", "read"], &c.auth("a")));
    assert_eq!(left.as_array().unwrap().len(), 1, "{left}");
    assert_eq!(left[0]["message"], "unrelated note");
}

#[test]
fn ask_reports_an_error_answer_with_exit_1() {
    let env = Env::new();
    let c = env.conversation();
    let mut child = env
        .cmd("autopoll")
        .args(args(
            &["bridge", "ask", "--timeout", "30", "poison"],
            &c.auth("a"),
        ))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut shard = Bridge::open(env.db()).unwrap();
    let me = Claimer::new("s").unwrap();
    let mut n = 0;
    wait_until("the query arrives", TIMEOUT, || {
        let b = shard
            .claim(&me, &c.id, Session::B, &ClaimOptions::default())
            .unwrap();
        n = b.claimed.len();
        if let Some(cl) = b.claimed.first() {
            shard
                .dead_letter(&me, cl.message.id, "engine exploded")
                .unwrap();
        }
        n > 0
    });
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("engine exploded"), "{err}");
}

#[test]
fn status_shows_each_session_of_each_conversation() {
    let env = Env::new();
    let c = env.conversation();
    for q in ["one", "two"] {
        env.ok(&args(&["bridge", "send", "--query", q], &c.auth("a")));
    }
    let text = env.ok(&["bridge", "status"]);
    let header = text.lines().next().unwrap();
    for col in [
        "CONVERSATION",
        "SESSION",
        "UNREAD",
        "CLAIMED",
        "ANSWERED",
        "DEAD",
        "OLDEST",
        "HEARTBEAT",
        "ALIVE",
    ] {
        assert!(header.contains(col), "{header}");
    }
    let b_line = text.lines().find(|l| l.contains(" b ")).unwrap();
    let cells: Vec<&str> = b_line.split_whitespace().collect();
    assert_eq!(&cells[..4], &[c.id.as_str(), "b", "shard", "2"], "{text}");
    let st = env.json(&["bridge", "status", "--conversation", &c.id]);
    assert_eq!(st.as_array().unwrap().len(), 2);
}

#[test]
fn init_is_idempotent_and_keeps_data() {
    let env = Env::new();
    let c = env.conversation();
    env.ok(&args(&["bridge", "send", "kept"], &c.auth("a")));
    let v = env.json(&["bridge", "init"]);
    assert_eq!(v["journal_mode"], "wal");
    let msgs = env.json(&args(&["bridge", "read"], &c.auth("b")));
    assert_eq!(msgs[0]["message"], "kept");
}

#[test]
fn usage_errors_exit_2_and_help_lists_exit_codes() {
    let env = Env::new();
    let out = env.run(&["bridge", "send", "--session", "c", "x"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let help = env.ok(&["bridge", "--help"]);
    assert!(help.contains("Exit codes:"), "{help}");
    for sub in ["init", "create", "send", "read", "ask", "status", "renew"] {
        assert!(help.contains(sub), "{sub} missing from help");
    }
}

#[test]
fn busy_timeout_is_waited_out_not_failed() {
    let env = Env::new();
    let c = env.conversation();
    let holder = rusqlite::Connection::open(env.db()).unwrap();
    holder.execute_batch("BEGIN IMMEDIATE").unwrap();
    let child = env
        .cmd("autopoll")
        .args(args(&["bridge", "send", "during a lock"], &c.auth("a")))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    holder.execute_batch("COMMIT").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", describe(&out));
}

/// Someone else's SQLite file, in rollback-journal mode, with a table and rows.
fn their_database(env: &Env) -> std::path::PathBuf {
    let db = env.path("their-app.db");
    let c = rusqlite::Connection::open(&db).unwrap();
    c.execute_batch(
        "PRAGMA journal_mode=DELETE;
         CREATE TABLE invoices (id INTEGER PRIMARY KEY, customer TEXT, total REAL);
         INSERT INTO invoices (customer, total) VALUES ('acme', 12.5), ('globex', 99.0);",
    )
    .unwrap();
    let mode: String = c
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "delete");
    db
}

/// Every file in the test's folder whose name starts with `prefix`.
fn files_like(env: &Env, prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(env.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect();
    v.sort();
    v
}

#[test]
fn a_foreign_sqlite_file_is_never_changed_by_any_command_or_the_poller() {
    let env = Env::new();
    let conv = env.conversation(); // a real bridge too, for tokens that look right
    let db = their_database(&env);
    let before = std::fs::read(&db).unwrap();
    let d = path_str(&db);
    let auth = conv.auth("a");
    let runs: Vec<(&str, Vec<&str>)> = vec![
        ("bridge status", vec!["bridge", "status", "--db", d]),
        (
            "bridge status --json",
            vec!["bridge", "status", "--json", "--db", d],
        ),
        ("bridge read", args(&["bridge", "read", "--db", d], &auth)),
        (
            "bridge send",
            args(&["bridge", "send", "--db", d, "hello"], &auth),
        ),
        (
            "bridge send --query",
            args(&["bridge", "send", "--query", "--db", d, "hello?"], &auth),
        ),
        (
            "bridge ask",
            args(
                &["bridge", "ask", "--timeout", "0.1", "--db", d, "hi?"],
                &auth,
            ),
        ),
        (
            "bridge renew",
            vec![
                "bridge",
                "renew",
                "--db",
                d,
                "--conversation",
                &conv.id,
                "--token",
                &conv.token_a,
            ],
        ),
        (
            "bridge create",
            vec![
                "bridge", "create", "--db", d, "--role-a", "x", "--role-b", "y",
            ],
        ),
        ("bridge init", vec!["bridge", "init", "--db", d]),
    ];
    for (what, a) in &runs {
        let out = env.run(a);
        assert_one_line_error(&out, 7, "is not a bridge file");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(d) && err.contains("invoices"), "{what}: {err}");
        assert!(err.contains("autopoll bridge init --db"), "{what}: {err}");
        if *what == "bridge init" {
            assert!(err.contains("--force"), "{what}: {err}");
        }
        assert_eq!(
            std::fs::read(&db).unwrap(),
            before,
            "{what} changed the file"
        );
        assert_eq!(files_like(&env, "their-app"), ["their-app.db"], "{what}");
    }

    // `autopoll status --db` (no server either: the bridge refusal wins).
    let out = env.at("nobody", &["status", "--db", d]).output().unwrap();
    assert_one_line_error(&out, 7, "is not a bridge file");
    // doctor: the bridge line fails naming the file, and blames no permissions.
    let out = env
        .cmd("autopoll")
        .args(["doctor", "--name", "nobody", "--runtime-dir"])
        .arg(env.runtime())
        .args(["--db", d, "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(13), "{}", describe(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let bridge = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "bridge")
        .unwrap();
    assert_eq!(bridge["status"], "fail", "{v:#}");
    assert!(bridge["detail"].as_str().unwrap().contains(d), "{v:#}");
    assert!(
        bridge["fix"]
            .as_str()
            .unwrap()
            .contains("autopoll bridge init --db"),
        "{v:#}"
    );
    assert!(
        !bridge["fix"].as_str().unwrap().contains("writable"),
        "{v:#}"
    );
    // A poller start is refused with the named exit code.
    let mut p = env.poller(&conv, "nobody", &["--db", d]);
    assert_eq!(p.wait_exit(TIMEOUT), Some(7), "{}", p.log());
    assert!(p.log().contains("is not a bridge file"), "{}", p.log());
    assert_eq!(
        std::fs::read(&db).unwrap(),
        before,
        "doctor/status/poller changed it"
    );
    assert_eq!(files_like(&env, "their-app"), ["their-app.db"]);

    // With --force, init does add the tables (and keeps theirs).
    env.ok(&["bridge", "init", "--force", "--db", d]);
    env.ok(&["bridge", "status", "--db", d]);
    let c = rusqlite::Connection::open(&db).unwrap();
    let n: i64 = c
        .query_row("SELECT count(*) FROM invoices", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 2);
}

#[test]
fn an_empty_or_missing_path_is_not_created_by_status_or_doctor() {
    let env = Env::new();
    let empty = env.path("empty.db");
    std::fs::write(&empty, b"").unwrap();
    for name in ["empty.db", "missing.db"] {
        let p = env.path(name);
        let d = path_str(&p);
        let out = env.run(&["bridge", "status", "--db", d]);
        assert_one_line_error(&out, 4, "autopoll bridge init --db");
        let out = env.at("nobody", &["status", "--db", d]).output().unwrap();
        assert_one_line_error(&out, 4, "autopoll bridge init --db");
        let out = env
            .cmd("autopoll")
            .args(["doctor", "--name", "nobody", "--runtime-dir"])
            .arg(env.runtime())
            .args(["--db", d])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("FAIL bridge") && text.contains(d),
            "{}",
            describe(&out)
        );
        assert!(
            text.contains(&format!("fix: autopoll bridge init --db {d}")),
            "{text}"
        );
    }
    assert!(!env.path("missing.db").exists());
    assert_eq!(std::fs::metadata(&empty).unwrap().len(), 0);
    assert_eq!(files_like(&env, "empty"), ["empty.db"]);
    assert_eq!(files_like(&env, "missing"), Vec::<String>::new());
}

#[test]
fn a_file_that_is_not_sqlite_is_named_and_doctor_blames_no_permissions() {
    let env = Env::new();
    let p = env.path("notes.db");
    let text = "not a database at all, just some notes someone saved here\n".repeat(40);
    std::fs::write(&p, &text).unwrap();
    let d = path_str(&p);
    let out = env.run(&["bridge", "status", "--db", d]);
    assert_one_line_error(&out, 7, "is not a SQLite database");
    assert!(String::from_utf8_lossy(&out.stderr).contains(d));
    let out = env
        .cmd("autopoll")
        .args(["doctor", "--name", "nobody", "--runtime-dir"])
        .arg(env.runtime())
        .args(["--db", d])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    let line = report
        .lines()
        .find(|l| l.starts_with("FAIL bridge"))
        .unwrap();
    assert!(
        line.contains(d) && line.contains("not a SQLite database"),
        "{report}"
    );
    assert!(!report.contains("readable and writable"), "{report}");
    assert_eq!(std::fs::read_to_string(&p).unwrap(), text);
    assert_eq!(files_like(&env, "notes"), ["notes.db"]);
}
