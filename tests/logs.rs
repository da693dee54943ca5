//! Log lines tell a question's story: with a real server (a jsonl instance
//! that crashes on some questions) and a real poller, `grep query_id=q-...`
//! over the poller's log gives one `event=... key=value` line per step:
//! claimed, retried, answered or dead-lettered; the server's log has one line
//! per instance restart. Question text and tokens stay out of logs at info.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Env, TIMEOUT, fixture, path_str, wait_until};

/// The `event=` names of the lines mentioning `needle`, in order.
fn events(log: &str, needle: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains(needle))
        .map(|l| {
            let (_, rest) = l
                .split_once("event=")
                .unwrap_or_else(|| panic!("a line about {needle} without event=: {l}"));
            rest.split_whitespace().next().unwrap().to_string()
        })
        .collect()
}

/// `key=value` of `key` in `line`.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

#[test]
fn grep_query_id_tells_what_happened_to_each_question() {
    let env = Env::new();
    let conv = env.conversation();
    let notes = env.path("NOTES.md");
    std::fs::write(&notes, "# Notes\nThe cache holds 64 entries.\n").unwrap();
    let server = env.server(
        "logs",
        &[
            "--backend",
            "jsonl",
            "--workers",
            "1",
            "--context",
            path_str(&notes),
            "--",
            "python3",
            &fixture("jsonl_backend.py"),
        ],
    );
    let p = env.poller(&conv, "logs", &["--max-attempts", "2"]);
    let ok = env.send_queries(&conv, "fine", 1, "how big is the secret-sauce cache?");
    let bad = env.send_queries(&conv, "boom", 1, "[crash] the secret-sauce question");
    let got = env.expect_each_answered_once(&[ok.clone(), bad.clone()].concat(), TIMEOUT);
    let failed = &got.iter().find(|(q, _)| q == &bad[0]).unwrap().1;
    assert!(failed["error"].is_string(), "{failed}");

    // Logged right after the commit: wait for the lines, not for time.
    wait_until("both outcomes are logged", TIMEOUT, || {
        let l = p.log();
        l.contains("event=dead_lettered") && l.contains("event=query_answered")
    });
    let log = p.log();
    let ok_id = format!("query_id={}", ok[0]);
    let bad_id = format!("query_id={}", bad[0]);
    assert_eq!(
        events(&log, &format!("{ok_id} ")),
        ["query_claimed", "query_answered"],
        "{log}"
    );
    assert_eq!(
        events(&log, &format!("{bad_id} ")),
        [
            "query_claimed",
            "query_retry",
            "query_claimed",
            "dead_lettered"
        ],
        "{log}"
    );
    for l in log.lines().filter(|l| l.contains(&bad_id)) {
        assert!(field(l, "message_id").is_some(), "{l}");
    }
    let claims: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&bad_id) && l.contains("event=query_claimed"))
        .map(|l| field(l, "attempt").unwrap())
        .collect();
    assert_eq!(claims, ["1", "2"], "{log}");

    // The server: the crashes and restarts of the instance, one line each.
    let slog = server.stderr();
    assert!(
        slog.lines().any(|l| l.contains("event=instance_started")
            && field(l, "restart") == Some("true")
            && field(l, "worker") == Some("0")
            && field(l, "pid").is_some()),
        "{slog}"
    );

    // No question text, no token.
    for (who, text) in [("poller", &log), ("server", &slog)] {
        assert!(
            !text.contains("secret-sauce"),
            "{who} logged a question: {text}"
        );
        assert!(
            !text.contains(&conv.token_b) && !text.contains(&conv.token_a),
            "{who} logged a token"
        );
    }
}
