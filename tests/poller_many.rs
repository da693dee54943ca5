//! One `autopoll-poller --tokens-file` serving many conversations: the file
//! is followed while running, refused when unsafe, claims are fair between
//! conversations, idle pollers cost next to nothing while others work, and
//! a kill -9 loses nothing and answers nothing twice.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::{Conversation, Env, TIMEOUT, path_str, wait_until};

const DOCS: &str =
    "# Notes\n\n## Cache\n\nThe cache holds 512 entries and evicts the least recently used.\n";

fn setup(env: &Env, n: usize) -> (Vec<Conversation>, String) {
    let convs = (0..n).map(|_| env.conversation()).collect();
    let ctx = env.path("NOTES.md");
    std::fs::write(&ctx, DOCS).unwrap();
    (convs, path_str(&ctx).to_string())
}

/// Write the tokens file as an operator would: a private temp file renamed
/// into place (mode 0600).
fn write_tokens(path: &Path, convs: &[&Conversation]) {
    let mut text = String::from("# conversation token\n\n");
    for c in convs {
        text.push_str(&format!("{} {}\n", c.id, c.token_b));
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Unread questions to session b of `conv` that nobody ever claimed.
fn never_claimed(env: &Env, conv: &Conversation) -> i64 {
    env.bridge()
        .connection()
        .query_row(
            "SELECT count(*) FROM messages m
             WHERE m.conversation_id = ?1 AND m.to_session = 'b' AND m.read = 0
               AND NOT EXISTS (SELECT 1 FROM autopoll_claims c WHERE c.message_id = m.id)
               AND NOT EXISTS (SELECT 1 FROM autopoll_outcomes o WHERE o.message_id = m.id)",
            [&conv.id],
            |r| r.get(0),
        )
        .unwrap()
}

#[test]
fn one_poller_serves_16_conversations_and_follows_its_tokens_file() {
    let env = Env::new();
    let (convs, ctx) = setup(&env, 17);
    let _server = env.server("default", &["--context", &ctx]);
    let tokens = env.path("tokens");
    write_tokens(&tokens, &convs[..16].iter().collect::<Vec<_>>());
    let mut p = env.poller_tokens(&tokens, "default", &["--concurrency", "8"]);
    let mut ids = Vec::new();
    for (i, c) in convs[..16].iter().enumerate() {
        ids.extend(env.send_queries(c, &format!("c{i}"), 2, "how big is the cache?"));
    }
    env.expect_each_answered_once(&ids, TIMEOUT * 2);
    // A heartbeat for each conversation, in its own session_status row.
    wait_until("every conversation has a heartbeat", TIMEOUT, || {
        convs[..16]
            .iter()
            .all(|c| env.shard_status(c).as_deref() == Some("waiting"))
    });
    assert_eq!(env.shard_status(&convs[16]), None);

    // A 17th is added while running: served without a restart.
    write_tokens(&tokens, &convs.iter().collect::<Vec<_>>());
    wait_until("the 17th conversation is picked up", TIMEOUT, || {
        env.shard_status(&convs[16]).is_some()
    });
    ids.extend(env.send_queries(&convs[16], "c16", 3, "cache?"));
    env.expect_each_answered_once(&ids, TIMEOUT);

    // The first is removed: it says stopped and its questions stay unclaimed.
    write_tokens(&tokens, &convs[1..].iter().collect::<Vec<_>>());
    wait_until("the removed conversation says stopped", TIMEOUT, || {
        env.shard_status(&convs[0]).as_deref() == Some("stopped")
    });
    env.send_queries(&convs[0], "gone", 1, "cache?");
    ids.extend(env.send_queries(&convs[1], "after", 1, "cache?"));
    // Both questions were there for the same claim turn: had conversation 0
    // still been served, its question would have been claimed with this one.
    env.expect_each_answered_once(&ids, TIMEOUT);
    assert_eq!(
        never_claimed(&env, &convs[0]),
        1,
        "the removed conversation's question was claimed: {}",
        p.log()
    );
    assert!(p.alive(), "{}", p.log());
    let log = p.log();
    assert!(
        log.contains("event=conversation_added conversation=") && log.contains("served=true"),
        "{log}"
    );
    assert!(log.contains("event=conversation_removed"), "{log}");
    // Tokens stay out of the log.
    for c in &convs {
        assert!(!log.contains(&c.token_b), "a token in the log: {log}");
    }

    // SIGHUP reads the file again (it does not stop the poller).
    let reloads = log.matches("event=tokens_reloaded").count();
    p.signal(libc::SIGHUP);
    wait_until("SIGHUP reloads the tokens file", TIMEOUT, || {
        p.log().matches("event=tokens_reloaded").count() > reloads
    });
    assert!(p.alive(), "SIGHUP stopped the poller: {}", p.log());
    p.signal(libc::SIGTERM);
    assert_eq!(p.wait_exit(TIMEOUT), Some(0), "{}", p.log());
    for c in &convs[1..] {
        assert_eq!(env.shard_status(c).as_deref(), Some("stopped"));
    }
}

#[test]
fn a_tokens_file_others_can_read_or_with_a_bad_line_is_refused_with_exit_12() {
    let env = Env::new();
    let (convs, _) = setup(&env, 1);
    let tokens = env.path("tokens");
    write_tokens(&tokens, &[&convs[0]]);
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = env
        .cmd("autopoll-poller")
        .args(["--tokens-file", path_str(&tokens), "--name", "default"])
        .output()
        .unwrap();
    common::assert_one_line_error(&out, 12, "chmod 600");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("0644"), "{err}");

    std::fs::write(
        &tokens,
        format!("{} {}\nonly-one-field\n", convs[0].id, convs[0].token_b),
    )
    .unwrap();
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = env
        .cmd("autopoll-poller")
        .args(["--tokens-file", path_str(&tokens), "--name", "default"])
        .output()
        .unwrap();
    common::assert_one_line_error(&out, 12, "line 2");
}

#[test]
fn a_bad_tokens_file_while_running_or_a_bad_token_leaves_the_others_served() {
    let env = Env::new();
    let (convs, ctx) = setup(&env, 3);
    let _server = env.server("default", &["--context", &ctx]);
    let tokens = env.path("tokens");
    // The third conversation's line has a wrong token.
    let text = format!(
        "{} {}\n{} {}\n{} {}\n",
        convs[0].id,
        convs[0].token_b,
        convs[1].id,
        convs[1].token_b,
        convs[2].id,
        convs[2].token_a // session a's token is not session b's
    );
    std::fs::write(&tokens, text).unwrap();
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o600)).unwrap();
    let p = env.poller_tokens(&tokens, "default", &[]);
    let mut ids = env.send_queries(&convs[0], "c0", 2, "cache?");
    ids.extend(env.send_queries(&convs[1], "c1", 2, "cache?"));
    env.send_queries(&convs[2], "bad", 1, "cache?");
    env.expect_each_answered_once(&ids, TIMEOUT);
    assert_eq!(never_claimed(&env, &convs[2]), 1);
    assert_eq!(env.shard_status(&convs[2]), None);
    let log = p.log();
    let rejected = format!("event=token_rejected conversation={}", convs[2].id);
    assert_eq!(log.matches(&rejected).count(), 1, "{log}");

    // A broken file while running: its line is named, the set stays.
    std::fs::write(&tokens, "this line is wrong\n").unwrap();
    wait_until("the bad file is reported", TIMEOUT, || {
        p.log().contains("event=tokens_refused") && p.log().contains("line 1")
    });
    ids.extend(env.send_queries(&convs[1], "still", 1, "cache?"));
    env.expect_each_answered_once(&ids, TIMEOUT);
    // Made unsafe: refused too, with the fix named.
    let tmp = env.path("tokens.tmp");
    std::fs::write(&tmp, format!("{} {}\n", convs[0].id, convs[0].token_b)).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o640)).unwrap();
    std::fs::rename(&tmp, &tokens).unwrap();
    wait_until("the unsafe file is reported", TIMEOUT, || {
        p.log().contains("chmod 600")
    });
    ids.extend(env.send_queries(&convs[1], "again", 1, "cache?"));
    env.expect_each_answered_once(&ids, TIMEOUT);
    assert!(
        !p.log().contains("event=conversation_removed"),
        "{}",
        p.log()
    );
    // The same error is logged once, not on every event.
    assert_eq!(p.log().matches("chmod 600").count(), 1, "{}", p.log());
}

#[test]
fn a_deep_backlog_in_one_conversation_does_not_hold_up_anothers_question() {
    let env = Env::new();
    let (convs, ctx) = setup(&env, 2);
    let _server = env.server("default", &["--context", &ctx]);
    let busy = env.send_queries(&convs[0], "busy", 200, "cache?");
    let single = env.send_queries(&convs[1], "single", 1, "cache?");
    let tokens = env.path("tokens");
    write_tokens(&tokens, &[&convs[0], &convs[1]]);
    let _p = env.poller_tokens(&tokens, "default", &["--concurrency", "2"]);
    let all: Vec<String> = busy.iter().chain(&single).cloned().collect();
    env.expect_each_answered_once(&all, TIMEOUT * 2);
    // Answer rows are committed in order: count the busy conversation's
    // answers committed before the single question's.
    let b = env.bridge();
    let ids: Vec<(String, i64)> = b
        .connection()
        .prepare("SELECT conversation_id, id FROM messages WHERE to_session = 'a' ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let at = ids.iter().position(|(c, _)| *c == convs[1].id).unwrap();
    assert!(
        at <= 4,
        "the single question was answered after {at} of the backlog's 200 answers"
    );
}

#[test]
fn sixteen_idle_pollers_use_almost_no_cpu_while_another_conversation_is_busy() {
    let env = Env::new();
    let (convs, ctx) = setup(&env, 17);
    let _server = env.server("default", &["--context", &ctx]);
    let idle: Vec<common::Poller> = convs[1..]
        .iter()
        .map(|c| env.poller(c, "default", &[]))
        .collect();
    let _busy = env.poller(&convs[0], "default", &["--concurrency", "4"]);
    wait_until("every poller has a heartbeat", TIMEOUT, || {
        convs
            .iter()
            .all(|c| env.shard_status(c).as_deref() == Some("waiting"))
    });
    let ticks =
        |ps: &[common::Poller]| -> u64 { ps.iter().map(|p| common::cpu_ticks(p.pid())).sum() };
    // The main thread alone (its tid is the pid): the claim loop.
    let loop_ticks =
        |ps: &[common::Poller]| -> u64 { ps.iter().map(|p| thread_ticks(p.pid(), p.pid())).sum() };
    // Quiet bridge: timers only.
    let before = ticks(&idle);
    std::thread::sleep(Duration::from_secs(2));
    let quiet = ticks(&idle) - before;
    // Busy neighbour: 300 questions asked and answered in another conversation.
    let (before, loops_before) = (ticks(&idle), loop_ticks(&idle));
    let busy0 = common::cpu_ticks(_busy.pid());
    let ids = env.send_queries(&convs[0], "busy", 300, "cache?");
    env.expect_each_answered_once(&ids, TIMEOUT * 2);
    let herd = ticks(&idle) - before;
    let loops = loop_ticks(&idle) - loops_before;
    let busy = common::cpu_ticks(_busy.pid()) - busy0;
    eprintln!(
        "idle ticks: quiet {quiet}, while busy {herd} (their loops {loops}); busy poller {busy}"
    );
    // 16 pollers spinning for 2 s would be ~3,200 ticks.
    assert!(
        quiet < 60,
        "16 idle pollers used {quiet} ticks in 2 quiet seconds"
    );
    // Their claim loops sleep through the neighbour's commits: the watch
    // thread looks read-only and wakes a loop only for its own work (the
    // loops' timers and heartbeats stay, a few ticks in all).
    assert!(
        loops < 40,
        "the idle pollers' loops used {loops} ticks while 300 questions were answered elsewhere: {}",
        idle[0].log()
    );
    // Only one of them, the hub's leader, reads every commit (and looks
    // for all of them at once); the others sleep until it wakes them. All
    // sixteen together use less than the one doing the work (without the
    // hub: 179 ticks against 67).
    assert!(
        herd < busy + 30,
        "16 idle pollers used {herd} ticks while the busy one used {busy}"
    );
}

/// The hub role a poller's log names last (`event=hub role=...`).
fn last_role(p: &common::Poller) -> Option<String> {
    let log = p.log();
    let at = log.rfind("event=hub role=")?;
    log[at + "event=hub role=".len()..]
        .split_whitespace()
        .next()
        .map(str::to_string)
}

#[test]
fn a_killed_hub_leader_is_replaced_and_every_conversation_is_still_answered() {
    let env = Env::new();
    let (convs, ctx) = setup(&env, 4);
    let _server = env.server("default", &["--context", &ctx]);
    let mut pollers = Vec::new();
    for c in &convs {
        pollers.push(env.poller(c, "default", &[]));
        wait_until("the poller has a heartbeat", TIMEOUT, || {
            env.shard_status(c).as_deref() == Some("waiting")
        });
    }
    wait_until("the first poller leads, the others follow", TIMEOUT, || {
        last_role(&pollers[0]).as_deref() == Some("leader")
            && pollers[1..]
                .iter()
                .all(|p| last_role(p).as_deref() == Some("follower"))
    });
    // Followers hear of their questions from the leader. (Each check
    // covers every answer so far: nothing is answered twice.)
    let mut ids = Vec::new();
    for (i, c) in convs.iter().enumerate() {
        ids.extend(env.send_queries(c, &format!("before-{i}"), 5, "cache?"));
        env.expect_each_answered_once(&ids, TIMEOUT);
    }
    pollers[0].kill9();
    wait_until(
        "one of the others leads and the rest follow it",
        TIMEOUT,
        || {
            let roles: Vec<Option<String>> = pollers[1..].iter().map(last_role).collect();
            let count = |role: &str| roles.iter().filter(|r| r.as_deref() == Some(role)).count();
            count("leader") == 1 && count("follower") == 2
        },
    );
    for (i, c) in convs[1..].iter().enumerate() {
        ids.extend(env.send_queries(c, &format!("after-{i}"), 5, "cache?"));
        env.expect_each_answered_once(&ids, TIMEOUT);
    }
    // A poller started again for the first conversation joins the new hub.
    let again = env.poller(&convs[0], "default", &[]);
    wait_until("the new poller follows", TIMEOUT, || {
        last_role(&again).as_deref() == Some("follower")
    });
    ids.extend(env.send_queries(&convs[0], "again", 5, "cache?"));
    env.expect_each_answered_once(&ids, TIMEOUT);
}

#[test]
fn the_many_conversation_poller_killed_9_loses_nothing_and_answers_nothing_twice() {
    let env = Env::new();
    let (convs, ctx) = setup(&env, 8);
    let _server = env.server("default", &["--context", &ctx]);
    let mut ids = Vec::new();
    for (i, c) in convs.iter().enumerate() {
        ids.extend(env.send_queries(c, &format!("k{i}"), 100, "cache?"));
    }
    let tokens = env.path("tokens");
    write_tokens(&tokens, &convs.iter().collect::<Vec<_>>());
    let mut s = common::seed();
    for trial in 0..5 {
        let mut p = env.poller_tokens(&tokens, "default", &["--lease", "1", "--concurrency", "6"]);
        // Claims in flight: wait for some, then a random moment more.
        wait_until("claims are in flight", TIMEOUT, || {
            env.owned_claims() > 0 || env.responses().len() == ids.len()
        });
        std::thread::sleep(Duration::from_millis(common::rng(&mut s) % 100));
        p.kill9();
        let integrity: String = env
            .bridge()
            .connection()
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(integrity, "ok", "trial {trial}");
    }
    let _last = env.poller_tokens(&tokens, "default", &["--lease", "1"]);
    env.expect_each_answered_once(&ids, TIMEOUT * 2);
    wait_until("no claim is left owned", TIMEOUT, || {
        env.owned_claims() == 0
    });
}

/// CPU ticks (user + system) of thread `tid` of process `pid`.
fn thread_ticks(pid: i32, tid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).unwrap();
    let rest = stat.rsplit_once(')').unwrap().1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn doctor_with_the_tokens_file_checks_each_conversation_and_the_file() {
    let env = Env::new();
    let (convs, ctx) = setup(&env, 2);
    let _server = env.server("default", &["--context", &ctx]);
    let tokens = env.path("tokens");
    write_tokens(&tokens, &[&convs[0], &convs[1]]);
    let _p = env.poller_tokens(&tokens, "default", &[]);
    wait_until("both heartbeats", TIMEOUT, || {
        convs
            .iter()
            .all(|c| env.shard_status(c).as_deref() == Some("waiting"))
    });
    let doctor = |f: &Path| {
        let out = env
            .cmd("autopoll")
            .args(["doctor", "--json", "--name", "default", "--runtime-dir"])
            .arg(env.runtime())
            .args(["--tokens-file", path_str(f)])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("no JSON ({e}): {}", common::describe(&out)));
        (out.status.code(), v)
    };
    let (code, v) = doctor(&tokens);
    let checks = v["checks"].as_array().unwrap();
    assert_eq!(code, Some(0), "{v:#}");
    for c in &convs {
        for name in ["token", "heartbeat", "queue", "dead_letters"] {
            let found = checks.iter().any(|k| {
                k["name"] == name
                    && k["status"] == "pass"
                    && k["detail"]
                        .as_str()
                        .unwrap()
                        .starts_with(&format!("conversation {}:", c.id))
            });
            assert!(found, "no passing {name} for {}: {v:#}", c.id);
        }
    }
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, v) = doctor(&tokens);
    assert_eq!(code, Some(13), "{v:#}");
    let tf = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "tokens_file")
        .unwrap();
    assert_eq!(tf["status"], "fail", "{v:#}");
    assert!(
        tf["fix"].as_str().unwrap().starts_with("chmod 600"),
        "{v:#}"
    );
}
