//! `autopoll doctor` against real setups: a healthy one passes every check
//! with exit 0; each broken one (server stopped, token expired, FIFO dir mode
//! 0777, stale heartbeat, old unread query, unseen dead letter, orphaned
//! instance process) fails on the right line with a fixing command, and
//! where that command can be run as printed, running it makes the line pass.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Output;
use std::time::{Duration, SystemTime};

use autopoll_bridge::{ClaimOptions, Claimer, Session, clock, shard};
use common::{Conversation, Env, TIMEOUT, describe, path_str, wait_until};
use serde_json::Value;

const NAME: &str = "doc";

fn context(env: &Env) -> String {
    let p = env.path("NOTES.md");
    std::fs::write(&p, "# Notes\n\nThe cache holds 64 entries.\n").unwrap();
    path_str(&p).to_string()
}

/// `autopoll doctor ARGS` aimed at this test's runtime dir and server NAME;
/// with a conversation, also at the bridge with session b's token (as the
/// shard's env file would set them).
fn doctor_cmd(env: &Env, conv: Option<&Conversation>, args: &[&str]) -> Output {
    let mut c = env.cmd("autopoll");
    c.args(["doctor", "--name", NAME, "--runtime-dir"])
        .arg(env.runtime())
        .args(args);
    match conv {
        Some(conv) => {
            c.env("AUTOPOLL_CONVERSATION", &conv.id)
                .env("AUTOPOLL_TOKEN", &conv.token_b);
        }
        // No bridge at all: only the server-side checks run.
        None => {
            c.env_remove("AUTOPOLL_DB");
        }
    }
    c.output().unwrap()
}

/// Run `doctor --json`: exit code and the parsed report.
fn doctor(env: &Env, conv: Option<&Conversation>) -> (i32, Value) {
    let out = doctor_cmd(env, conv, &["--json"]);
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("doctor printed no JSON ({e}): {}", describe(&out)));
    let code = out.status.code().unwrap();
    // The exit code and "ok" always agree.
    assert_eq!(v["ok"], (code == 0), "{v:#}");
    assert!(code == 0 || code == 13, "{}", describe(&out));
    (code, v)
}

fn check<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name} in {report:#}"))
}

fn status<'a>(report: &'a Value, name: &str) -> &'a str {
    check(report, name)["status"].as_str().unwrap()
}

fn fix<'a>(report: &'a Value, name: &str) -> &'a str {
    check(report, name)["fix"]
        .as_str()
        .unwrap_or_else(|| panic!("{name} has no fix: {report:#}"))
}

fn assert_passes(report: &Value, names: &[&str]) {
    for n in names {
        assert_eq!(status(report, n), "pass", "{n}: {report:#}");
    }
}

/// Run a fix command exactly as printed, in sh.
fn run_fix(env: &Env, cmd: &str, vars: &[(&str, &str)]) {
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_autopoll"))
        .parent()
        .unwrap()
        .to_path_buf();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut c = std::process::Command::new("sh");
    c.args(["-c", cmd])
        .env("PATH", path)
        .current_dir(env.dir.path());
    for (k, v) in vars {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "fix {cmd:?} failed: {}",
        describe(&out)
    );
}

#[test]
fn a_healthy_setup_passes_every_check() {
    let env = Env::new();
    let conv = env.conversation();
    let _server = env.server(NAME, &["--context", &context(&env)]);
    let _poller = env.poller(&conv, NAME, &[]);
    wait_until("the poller's first heartbeat", TIMEOUT, || {
        env.shard_status(&conv).as_deref() == Some("waiting")
    });
    // A question answered on the way, so the queue has history.
    let ids = env.send_queries(&conv, "h", 1, "how big is the cache?");
    env.expect_each_answered_once(&ids, TIMEOUT);

    let (code, v) = doctor(&env, Some(&conv));
    assert_eq!(code, 0, "{v:#}");
    let checks = v["checks"].as_array().unwrap();
    let names: Vec<&str> = checks.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "bridge",
            "wal",
            "token",
            "server",
            "permissions",
            "heartbeat",
            "queue",
            "dead_letters",
            "children",
            "disk"
        ]
    );
    for c in checks {
        assert_eq!(c["status"], "pass", "{c:#}");
        assert!(c["fix"].is_null(), "{c:#}");
    }
    assert!(
        check(&v, "token")["detail"]
            .as_str()
            .unwrap()
            .contains("valid for session b"),
        "{v:#}"
    );

    // The text form: one PASS line per check, exit 0.
    let out = doctor_cmd(&env, Some(&conv), &[]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with("doctor:")).collect();
    assert_eq!(lines.len(), 10, "{text}");
    assert!(lines.iter().all(|l| l.starts_with("PASS ")), "{text}");
    // The token never shows.
    assert!(!text.contains(&conv.token_b) && !text.contains(&conv.token_a));
}

#[test]
fn a_stopped_server_fails_the_server_line_with_the_command_to_start_it() {
    let env = Env::new();
    let conv = env.conversation();
    let mut server = env.server(NAME, &["--context", &context(&env)]);
    server.signal(libc::SIGTERM);
    assert_eq!(server.wait_exit(TIMEOUT), Some(0));

    let (code, v) = doctor(&env, Some(&conv));
    assert_eq!(code, 13);
    assert_eq!(status(&v, "server"), "fail", "{v:#}");
    let f = fix(&v, "server");
    assert!(
        f.contains(&format!("autopoll-server --name {NAME}")) || f.contains("autopoll-server@doc"),
        "{f}"
    );
    assert_eq!(status(&v, "children"), "skip", "{v:#}");
    assert_passes(&v, &["bridge", "wal", "token", "permissions", "disk"]);

    // The text form: the FAIL line, then the fix under it.
    let out = doctor_cmd(&env, Some(&conv), &[]);
    assert_eq!(out.status.code(), Some(13), "{}", describe(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.starts_with("FAIL server: "))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(lines[at + 1].starts_with("  fix: "), "{text}");
    assert!(lines[at + 1].contains("autopoll-server"), "{text}");
}

#[test]
fn an_expired_token_fails_the_token_line_and_the_printed_renew_fixes_it() {
    let env = Env::new();
    let conv = env.conversation_with_ttl("0.0001");
    wait_until("the conversation expires", TIMEOUT, || {
        env.bridge().conversation(&conv.id).unwrap().expired
    });
    let (code, v) = doctor(&env, Some(&conv));
    assert_eq!(code, 13);
    assert_eq!(status(&v, "token"), "fail", "{v:#}");
    assert!(
        check(&v, "token")["detail"]
            .as_str()
            .unwrap()
            .contains("expired"),
        "{v:#}"
    );
    let f = fix(&v, "token").to_string();
    assert!(f.starts_with("autopoll bridge renew --db "), "{f}");
    assert!(f.contains(&format!("--conversation {}", conv.id)), "{f}");
    assert!(
        !f.contains(&conv.token_b),
        "the token must not be printed: {f}"
    );
    assert_passes(&v, &["bridge", "wal"]);

    run_fix(&env, &f, &[("AUTOPOLL_TOKEN", &conv.token_b)]);
    let (_, v) = doctor(&env, Some(&conv));
    assert_eq!(status(&v, "token"), "pass", "{v:#}");
}

#[test]
fn a_fifo_dir_of_mode_0777_fails_permissions_and_the_printed_chmod_fixes_it() {
    let env = Env::new();
    let server = env.server(NAME, &["--context", &context(&env)]);
    let dir = server.paths().dir;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();

    // No bridge given: only the server-side checks run.
    let (code, v) = doctor(&env, None);
    assert_eq!(code, 13);
    assert_eq!(status(&v, "permissions"), "fail", "{v:#}");
    let detail = check(&v, "permissions")["detail"].as_str().unwrap();
    assert!(
        detail.contains(path_str(&dir)) && detail.contains("0777"),
        "{detail}"
    );
    let f = fix(&v, "permissions").to_string();
    assert_eq!(f, format!("chmod 700 {}", path_str(&dir)));
    assert_passes(&v, &["server", "children"]);
    assert_eq!(status(&v, "bridge"), "skip", "{v:#}");

    run_fix(&env, &f, &[]);
    let (code, v) = doctor(&env, None);
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(status(&v, "permissions"), "pass");
}

#[test]
fn a_stale_heartbeat_fails_the_heartbeat_line_with_the_poller_command() {
    let env = Env::new();
    let conv = env.conversation();
    // A poller that ran ten minutes ago and is gone.
    let then = clock::format(clock::from_system(
        SystemTime::now() - Duration::from_secs(600),
    ));
    env.bridge()
        .connection()
        .execute(
            "INSERT INTO session_status (conversation_id, session_id, status, last_heartbeat)
             VALUES (?1, 'b', 'waiting', ?2)",
            [&conv.id, &then],
        )
        .unwrap();
    let _server = env.server(NAME, &["--context", &context(&env)]);

    let (code, v) = doctor(&env, Some(&conv));
    assert_eq!(code, 13);
    assert_eq!(status(&v, "heartbeat"), "fail", "{v:#}");
    let detail = check(&v, "heartbeat")["detail"].as_str().unwrap();
    assert!(detail.contains("10m0"), "{detail}");
    let f = fix(&v, "heartbeat");
    assert!(
        f.starts_with("autopoll-poller --db ") || f.contains("autopoll-poller@doc"),
        "{f}"
    );
    assert_passes(&v, &["bridge", "token", "server", "queue", "permissions"]);

    // Once a poller runs, the line passes.
    let _poller = env.poller(&conv, NAME, &[]);
    wait_until("a fresh heartbeat passes", TIMEOUT, || {
        status(&doctor(&env, Some(&conv)).1, "heartbeat") == "pass"
    });
}

#[test]
fn an_old_unread_query_fails_the_queue_line_until_a_poller_answers_it() {
    let env = Env::new();
    let conv = env.conversation();
    let old = clock::format(clock::from_system(
        SystemTime::now() - Duration::from_secs(300),
    ));
    env.bridge()
        .connection()
        .execute(
            "INSERT INTO messages (conversation_id, from_session, to_session, message, metadata, timestamp, read)
             VALUES (?1, 'a', 'b', ?2, '{\"action_type\":\"question\"}', ?3, 0)",
            [
                conv.id.as_str(),
                &shard::query_text("q-old", "how big is the cache?"),
                &old,
            ],
        )
        .unwrap();
    let _server = env.server(NAME, &["--context", &context(&env)]);

    let (code, v) = doctor(&env, Some(&conv));
    assert_eq!(code, 13);
    assert_eq!(status(&v, "queue"), "fail", "{v:#}");
    let detail = check(&v, "queue")["detail"].as_str().unwrap();
    assert!(detail.starts_with("1 unread to session b"), "{detail}");
    assert!(detail.contains("5m0"), "{detail}");
    assert!(fix(&v, "queue").contains("autopoll-poller"), "{v:#}");
    assert_passes(&v, &["bridge", "token", "server", "dead_letters"]);

    let _poller = env.poller(&conv, NAME, &[]);
    env.expect_each_answered_once(&["q-old".to_string()], TIMEOUT);
    let (code, v) = doctor(&env, Some(&conv));
    assert_eq!(status(&v, "queue"), "pass", "{v:#}");
    assert_eq!(code, 0, "{v:#}");
}

#[test]
fn an_unseen_dead_letter_fails_until_the_asker_reads_it() {
    let env = Env::new();
    let conv = env.conversation();
    let _server = env.server(NAME, &["--context", &context(&env)]);
    let ids = env.send_queries(&conv, "dl", 1, "what?");
    let mut b = env.bridge();
    let me = Claimer::new("test").unwrap();
    let batch = b
        .claim(&me, &conv.id, Session::B, &ClaimOptions::default())
        .unwrap();
    b.dead_letter(&me, batch.claimed[0].message.id, "it broke the engine")
        .unwrap();

    let (code, v) = doctor(&env, Some(&conv));
    assert_eq!(code, 13);
    assert_eq!(status(&v, "dead_letters"), "fail", "{v:#}");
    let detail = check(&v, "dead_letters")["detail"].as_str().unwrap();
    assert!(
        detail.contains(&ids[0]) && detail.contains("it broke the engine"),
        "{detail}"
    );
    let f = fix(&v, "dead_letters");
    assert!(f.starts_with("autopoll bridge read --db "), "{f}");
    assert!(f.contains("--session a"), "{f}");

    // Session a reads its messages (the command, with its token).
    let out = env.run(&common::args(&["bridge", "read"], &conv.auth("a")));
    assert!(out.status.success(), "{}", describe(&out));
    let (_, v) = doctor(&env, Some(&conv));
    assert_eq!(status(&v, "dead_letters"), "pass", "{v:#}");
}

#[test]
fn an_instance_process_outside_the_servers_tree_is_an_orphan() {
    let env = Env::new();
    let server = env.server(NAME, &["--context", &context(&env)]);
    let dir = server.paths().dir;
    // What a killed server's instance looks like: its environment names the
    // server's directory, and its parent is gone (reparented).
    let out = std::process::Command::new("sh")
        .args(["-c", "sleep 120 >/dev/null 2>&1 </dev/null & echo $!"])
        .env("AUTOPOLL_SERVER_DIR", &dir)
        .output()
        .unwrap();
    let orphan: i32 = String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    struct Reap(i32);
    impl Drop for Reap {
        fn drop(&mut self) {
            // SAFETY: the sleep this test started, by pid.
            unsafe { libc::kill(self.0, libc::SIGKILL) };
        }
    }
    let _reap = Reap(orphan);

    let (code, v) = doctor(&env, None);
    assert_eq!(code, 13);
    assert_eq!(status(&v, "children"), "fail", "{v:#}");
    assert!(
        check(&v, "children")["detail"]
            .as_str()
            .unwrap()
            .contains(&orphan.to_string()),
        "{v:#}"
    );
    let f = fix(&v, "children").to_string();
    assert_eq!(f, format!("kill {orphan}"));
    assert_passes(&v, &["server", "permissions"]);

    run_fix(&env, &f, &[]);
    wait_until("the orphan is gone", TIMEOUT, || !common::alive(orphan));
    let (code, v) = doctor(&env, None);
    assert_eq!(status(&v, "children"), "pass", "{v:#}");
    assert_eq!(code, 0, "{v:#}");
}

#[test]
fn live_instances_of_an_external_backend_are_not_orphans() {
    let env = Env::new();
    let ctx = context(&env);
    let server = env.server(
        NAME,
        &[
            "--backend",
            "jsonl",
            "--workers",
            "1",
            "--context",
            &ctx,
            "--",
            "python3",
            &common::fixture("jsonl_backend.py"),
        ],
    );
    // Once it has answered, the instance is up (past any wrapper scripts).
    let mut c = server.client().unwrap();
    c.ask("what is on line one?", TIMEOUT).unwrap();
    let stats = c.stats(TIMEOUT).unwrap();
    let pid = stats.instances[0].pid.unwrap();
    // The server tells its instance where it belongs.
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let want = format!("AUTOPOLL_SERVER_DIR={}", path_str(&server.paths().dir));
    assert!(
        environ.split(|b| *b == 0).any(|kv| kv == want.as_bytes()),
        "instance {pid} lacks {want}"
    );
    let (code, v) = doctor(&env, None);
    assert_eq!(code, 0, "{v:#}");
    let detail = check(&v, "children")["detail"].as_str().unwrap();
    assert!(detail.contains("1 instances running"), "{detail}");
}

#[test]
fn a_token_expiring_under_a_running_poller_is_fixed_by_the_printed_renew() {
    let env = Env::new();
    let conv = env.conversation();
    let _server = env.server(NAME, &["--context", &context(&env)]);
    let p = env.poller(&conv, NAME, &["--heartbeat", "0.2"]);
    wait_until("the poller's first heartbeat", TIMEOUT, || {
        env.shard_status(&conv).is_some()
    });
    // The conversation expires while the poller runs.
    let past = clock::format(clock::from_system(
        SystemTime::now() - Duration::from_secs(60),
    ));
    env.bridge()
        .connection()
        .execute(
            "UPDATE conversations SET expires_at = ?1 WHERE id = ?2",
            [&past, &conv.id],
        )
        .unwrap();
    wait_until("the poller notices", TIMEOUT, || {
        p.log().contains("event=token_rejected")
    });
    // Questions are still answered (sent as the Python side would, by SQL:
    // an expired token cannot send).
    env.bridge()
        .connection()
        .execute(
            "INSERT INTO messages (conversation_id, from_session, to_session, message, metadata, timestamp, read)
             VALUES (?1, 'a', 'b', ?2, NULL, ?3, 0)",
            [
                conv.id.as_str(),
                &shard::query_text("q-late", "how big is the cache?"),
                &clock::now_string(),
            ],
        )
        .unwrap();
    env.expect_each_answered_once(&["q-late".to_string()], TIMEOUT);

    let (code, v) = doctor(&env, Some(&conv));
    assert_eq!(code, 13);
    assert_eq!(status(&v, "token"), "fail", "{v:#}");
    let f = fix(&v, "token").to_string();
    run_fix(&env, &f, &[("AUTOPOLL_TOKEN", &conv.token_b)]);
    // Heartbeats resume by themselves; everything passes.
    let before = env
        .bridge()
        .session_status(&conv.id, Session::B)
        .unwrap()
        .unwrap()
        .last_heartbeat;
    wait_until("a new heartbeat after the renewal", TIMEOUT, || {
        env.bridge()
            .session_status(&conv.id, Session::B)
            .unwrap()
            .unwrap()
            .last_heartbeat
            != before
    });
    let (code, v) = doctor(&env, Some(&conv));
    assert_eq!(code, 0, "{v:#}");
}

/// Regression: doctor passed a token valid for the *other* session (swapped
/// tokens in an env file), though the poller refuses to start with it.
#[test]
fn the_coordinators_token_fails_the_token_line() {
    let env = Env::new();
    let conv = env.conversation();
    let swapped = Conversation {
        id: conv.id.clone(),
        token_a: conv.token_a.clone(),
        token_b: conv.token_a.clone(),
    };
    let (code, report) = doctor(&env, Some(&swapped));
    assert_eq!(code, 13);
    assert_eq!(status(&report, "token"), "fail", "{report:#}");
    assert!(
        check(&report, "token")["detail"]
            .as_str()
            .unwrap()
            .contains("session a's token"),
        "{report:#}"
    );
    assert!(fix(&report, "token").contains("AUTOPOLL_TOKEN"));
}
