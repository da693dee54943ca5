//! Traps a newcomer fell into, each with the message that names the fix
//! (issue 11): one regression test per trap.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Env, args, describe};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn no_server_says_how_to_start_one_that_works_and_says_it_once() {
    let env = Env::new();
    let out = env.at("nope", &["ask", "anything?"]).output().unwrap();
    assert_eq!(out.status.code(), Some(10), "{}", describe(&out));
    assert!(
        stderr(&out).contains("autopoll-server --name nope --context PATH"),
        "{}",
        describe(&out)
    );
    let out = env.at("nope", &["status"]).output().unwrap();
    assert_eq!(out.status.code(), Some(10), "{}", describe(&out));
    let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert_eq!(all.matches("no server `nope`").count(), 1, "{all}");
    assert!(all.contains("NOT RUNNING"), "{all}");
}

#[test]
fn an_external_backend_without_context_is_told_what_context_is_for() {
    let env = Env::new();
    let out = env
        .cmd("autopoll-server")
        .args(["--runtime-dir", common::path_str(&env.runtime())])
        .args(["--backend", "jsonl", "--", "cat"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(12), "{}", describe(&out));
    let err = stderr(&out);
    assert!(err.contains("--context PATH"), "{err}");
    assert!(!err.contains("builtin"), "{err}");
}

#[test]
fn an_empty_query_is_refused_by_send_as_by_ask() {
    let env = Env::new();
    let conv = env.conversation();
    let auth = conv.auth("a");
    for cmd in [
        &["bridge", "send", "--query", ""][..],
        &["bridge", "ask", ""],
    ] {
        let out = env.run(&args(cmd, &auth));
        assert_eq!(out.status.code(), Some(9), "{cmd:?}: {}", describe(&out));
        assert!(
            stderr(&out).contains("the question is empty"),
            "{}",
            describe(&out)
        );
    }
    // Nothing was queued.
    let v = env.json(&["bridge", "status"]);
    assert!(
        v.as_array().unwrap().iter().all(|r| r["unread"] == 0),
        "{v}"
    );
}

#[test]
fn a_missing_or_wrong_token_says_what_to_do() {
    let env = Env::new();
    let conv = env.conversation();
    let base = [
        "bridge",
        "send",
        "--conversation",
        &conv.id,
        "--session",
        "a",
    ];
    let out = env.run(&[&base[..], &["hello"]].concat());
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(
        stderr(&out).contains("set AUTOPOLL_TOKEN"),
        "{}",
        describe(&out)
    );
    let cases = [
        (conv.token_b.clone(), "that is session b's token"),
        (format!("{} ", conv.token_a), "64 lowercase hex characters"),
        (
            "0".repeat(64),
            "not this conversation's token for session a",
        ),
    ];
    for (token, hint) in cases {
        let out = env.run(&[&base[..], &["--token", &token, "hello"]].concat());
        assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
        let err = stderr(&out);
        assert!(err.contains("invalid session token"), "{err}");
        assert!(err.contains(hint), "{hint}: {err}");
        assert!(
            !err.contains(&conv.token_a) && !err.contains(&conv.token_b),
            "{err}"
        );
    }
}

#[test]
fn a_failed_start_and_a_clean_stop_leave_nothing_in_the_runtime_dir() {
    let env = Env::new();
    let rt = common::path_str(&env.runtime()).to_string();
    // A start that fails after taking the lock (no such context file).
    let out = env
        .cmd("autopoll-server")
        .args([
            "--runtime-dir",
            &rt,
            "--name",
            "s",
            "--context",
            "missing.md",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(12), "{}", describe(&out));
    assert!(!env.runtime().join("s/lock").exists(), "lock left behind");
    assert!(
        !env.runtime().join("s").exists(),
        "server folder left behind"
    );
    // A clean stop.
    std::fs::write(env.path("NOTES.md"), "# Notes\nsome text\n").unwrap();
    let mut s = env.server("s", &["--context", "NOTES.md"]);
    s.client()
        .unwrap()
        .ask("some text?", common::TIMEOUT)
        .unwrap();
    s.signal(libc::SIGTERM);
    assert_eq!(s.wait_exit(common::TIMEOUT), Some(0), "{}", s.stderr());
    assert!(
        !env.runtime().join("s/clients").exists(),
        "clients/ left behind"
    );
    assert!(
        !env.runtime().join("s").exists(),
        "server folder left behind"
    );
    // And the next start works as ever.
    let _again = env.server("s", &["--context", "NOTES.md"]);
}

#[test]
fn a_cleanly_stopped_poller_is_not_shown_alive_and_doctor_says_so() {
    let env = Env::new();
    std::fs::write(env.path("NOTES.md"), "# Notes\nsome text\n").unwrap();
    let _s = env.server("st", &["--context", "NOTES.md"]);
    let conv = env.conversation();
    let mut p = env.poller(&conv, "st", &[]);
    let alive = |env: &Env| -> (bool, String) {
        let v = env.json(&["bridge", "status", "--conversation", &conv.id]);
        let b = v
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["session"] == "b")
            .cloned()
            .unwrap();
        (
            b["alive"].as_bool().unwrap(),
            b["status"].as_str().unwrap_or("").to_string(),
        )
    };
    common::wait_until("the poller's heartbeat", common::TIMEOUT, || alive(&env).0);
    p.signal(libc::SIGTERM);
    assert_eq!(p.wait_exit(common::TIMEOUT), Some(0), "{}", p.log());
    assert_eq!(alive(&env), (false, "stopped".to_string()));
    let out = env
        .cmd("autopoll")
        .args(["doctor", "--json", "--name", "st", "--runtime-dir"])
        .arg(env.runtime())
        .env("AUTOPOLL_CONVERSATION", &conv.id)
        .env("AUTOPOLL_TOKEN", &conv.token_b)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(13), "{}", describe(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let hb = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "heartbeat")
        .cloned()
        .unwrap();
    assert_eq!(hb["status"], "fail", "{hb}");
    assert!(hb["detail"].as_str().unwrap().contains("stopped"), "{hb}");
}

#[test]
fn a_bridge_in_a_folder_that_does_not_exist_says_to_create_the_folder() {
    let env = Env::new();
    let db = env.path("no/such/folder/bridge.db");
    let out = env.run(&["bridge", "init", "--db", common::path_str(&db)]);
    assert_eq!(out.status.code(), Some(4), "{}", describe(&out));
    let err = stderr(&out);
    assert!(err.contains("mkdir -p"), "{err}");
    assert!(!err.contains("os error 14"), "{err}");
    assert!(!env.path("no").exists());
}
