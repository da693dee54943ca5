//! External backends end to end: the real server supervising a fixture
//! program of ours (tests/fixtures/jsonl_backend.py) that speaks the jsonl
//! protocol. Claude Code itself is tested in tests/claude_cli.rs, for real.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use autopoll_protocol::{ClientError, ErrorCode};
use common::{Env, TIMEOUT, alive, children_of, describe, fixture, path_str, wait_until};

fn notes(env: &Env) -> String {
    let p = env.path("NOTES.md");
    std::fs::write(&p, "line one\nline two\nline three\n").unwrap();
    path_str(&p).to_string()
}

fn jsonl(env: &Env, name: &str, flags: &[&str], fixture_args: &[&str]) -> common::Server {
    let ctx = notes(env);
    let mut args: Vec<String> = vec!["--backend".into(), "jsonl".into(), "--context".into(), ctx];
    args.extend(flags.iter().map(|s| s.to_string()));
    args.push("--".into());
    args.push("python3".into());
    args.push(fixture("jsonl_backend.py"));
    args.extend(fixture_args.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let s = env.server(name, &refs);
    // "serving" comes before the instance threads have started their
    // children: wait until each instance has a pid (or is down).
    wait_until("every instance started", TIMEOUT, || {
        let st = s.client().unwrap().stats(TIMEOUT).unwrap();
        !st.instances.is_empty()
            && st
                .instances
                .iter()
                .all(|w| w.pid.is_some() || w.state == "down")
    });
    s
}

fn instance_pids(s: &common::Server) -> Vec<u32> {
    s.client()
        .unwrap()
        .stats(TIMEOUT)
        .unwrap()
        .instances
        .iter()
        .filter_map(|w| w.pid)
        .collect()
}

fn pid_in(answer: &str) -> String {
    answer.split_whitespace().nth(1).unwrap().to_string()
}

#[test]
fn jsonl_answers_with_checked_citations() {
    let env = Env::new();
    let s = jsonl(&env, "j", &["--workers", "2"], &[]);
    let a = s
        .client()
        .unwrap()
        .ask("what is on line one?", TIMEOUT)
        .unwrap();
    assert!(
        a.answer.contains("answers: what is on line one?"),
        "{}",
        a.answer
    );
    assert_eq!(a.engine, "jsonl");
    assert_eq!(a.sources.len(), 1);
    assert!(a.sources[0].ends_with("NOTES.md:1-2"), "{:?}", a.sources);
    assert_eq!(
        a.invalid_sources.len(),
        1,
        "the made-up range is not passed on as true"
    );
    assert!(a.invalid_sources[0].ends_with("NOTES.md:9999-10000"));
    assert!(a.found);
    // Warm: both instances started with the server; the answer came from one of them.
    let pids = instance_pids(&s);
    assert_eq!(pids.len(), 2);
    assert!(pids.iter().any(|p| p.to_string() == pid_in(&a.answer)));
    // Its stderr is in the server's log, with the worker id.
    assert!(
        s.stderr().contains("stderr: jsonl fixture started"),
        "{}",
        s.stderr()
    );
    assert!(s.stderr().contains("worker=0 pid="));
}

/// A hung instance: the question fails at the watchdog, the instance is
/// replaced, the next question is answered; after 200 hangs the server has
/// exactly --workers children and no zombie.
#[test]
fn hung_instances_are_killed_and_replaced_leaving_no_zombies() {
    let env = Env::new();
    let s = jsonl(
        &env,
        "h",
        &["--workers", "2", "--watchdog", "0.1", "--kill-grace", "0.1"],
        &[],
    );
    let mut c = s.client().unwrap();
    let before = instance_pids(&s);
    let e = c.ask("[hang] forever", TIMEOUT).unwrap_err();
    match &e {
        ClientError::Server(r) => {
            assert_eq!(r.code, ErrorCode::Timeout);
            assert!(
                r.message.contains("watchdog") && r.message.contains("killed and replaced"),
                "{}",
                r.message
            );
        }
        other => panic!("expected a timeout reply, got {other}"),
    }
    assert!(
        c.ask("next one", TIMEOUT)
            .unwrap()
            .answer
            .contains("answers: next one")
    );
    wait_until("the hung instance is replaced", TIMEOUT, || {
        let now = instance_pids(&s);
        now.len() == 2 && now != before
    });
    // SIGTERM ignored: the group still goes, by SIGKILL after the grace.
    let e = c.ask("[hang-hard] stubborn", TIMEOUT).unwrap_err();
    assert!(
        matches!(&e, ClientError::Server(r) if r.code == ErrorCode::Timeout),
        "{e}"
    );
    // The reply goes out first; the kill escalates in the background.
    wait_until("SIGKILL after the grace", TIMEOUT, || {
        s.stderr().contains("how=\"signal 9\"")
    });
    // 200 hangs over two clients.
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let mut c = s.client().unwrap();
            std::thread::spawn(move || {
                for i in 0..100 {
                    let e = c.ask(&format!("[hang] {i}"), TIMEOUT).unwrap_err();
                    assert!(
                        matches!(&e, ClientError::Server(r) if r.code == ErrorCode::Timeout),
                        "{e}"
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(c.ask("still here?", TIMEOUT).unwrap().found);
    // The error reply goes out before the kill: wait for the last
    // replacement too, then count children.
    wait_until(
        "202 replacements and exactly two live children",
        TIMEOUT,
        || {
            let restarts: u64 = c
                .stats(TIMEOUT)
                .unwrap()
                .instances
                .iter()
                .map(|w| w.restarts)
                .sum();
            let kids = children_of(s.pid());
            restarts == 202 && kids.len() == 2 && kids.iter().all(|(_, st)| *st != 'Z')
        },
    );
    let st = c.stats(TIMEOUT).unwrap();
    let restarts: u64 = st.instances.iter().map(|w| w.restarts).sum();
    assert_eq!(restarts, 202, "one replacement per hang (2 + 200), no more");
    assert!(
        st.instances.iter().all(|w| w.state != "down"),
        "hangs are not a crash loop"
    );
}

#[test]
fn slow_answers_with_progress_and_slow_starts_are_not_killed() {
    let env = Env::new();
    let s = jsonl(
        &env,
        "slow",
        &[
            "--workers",
            "1",
            "--watchdog",
            "0.35",
            "--start-timeout",
            "10",
        ],
        &["--start-delay", "1"],
    );
    let mut c = s.client().unwrap();
    // The first question waits out the slow start (1 s > watchdog).
    let first = c.ask("first", TIMEOUT).unwrap();
    // 0.6 s of work with output every 0.1 s: the watchdog keeps resetting.
    let slow = c.ask("[slow] please", TIMEOUT).unwrap();
    assert_eq!(pid_in(&first.answer), pid_in(&slow.answer), "no restart");
}

#[test]
fn garbage_output_is_logged_and_skipped() {
    let env = Env::new();
    let s = jsonl(&env, "g", &["--workers", "1"], &["--garbage"]);
    let mut c = s.client().unwrap();
    for q in ["one", "two"] {
        assert!(c.ask(q, TIMEOUT).unwrap().answer.contains(q));
    }
    assert!(s.stderr().contains("not the protocol"), "{}", s.stderr());
    assert_eq!(c.stats(TIMEOUT).unwrap().instances[0].restarts, 0);
}

#[test]
fn an_instance_that_crashes_is_restarted_and_an_error_answer_keeps_it() {
    let env = Env::new();
    // The fixture exits after 3 responses (error responses count).
    let s = jsonl(&env, "cr", &["--workers", "1"], &["--crash-after", "3"]);
    let mut c = s.client().unwrap();
    let first: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|q| pid_in(&c.ask(q, TIMEOUT).unwrap().answer))
        .collect();
    assert!(first.iter().all(|p| *p == first[0]), "{first:?}");
    let d = c.ask("d", TIMEOUT).unwrap(); // the old one exited: a fresh instance answers
    assert_ne!(pid_in(&d.answer), first[0]);
    let e = c.ask("[error] now", TIMEOUT).unwrap_err();
    assert!(
        matches!(&e, ClientError::Server(r) if r.code == ErrorCode::Engine && r.message.contains("asked to fail")),
        "{e}"
    );
    let f = c.ask("f", TIMEOUT).unwrap();
    assert_eq!(
        pid_in(&d.answer),
        pid_in(&f.answer),
        "an error answer does not cost the instance"
    );
    let e = c.ask("[crash] mid-question", TIMEOUT).unwrap_err();
    assert!(
        matches!(&e, ClientError::Server(r) if r.code == ErrorCode::Engine),
        "{e}"
    );
    assert!(c.ask("g", TIMEOUT).is_ok());
}

#[test]
fn a_crash_loop_stops_at_the_breaker_and_status_says_so() {
    let env = Env::new();
    let s = jsonl(
        &env,
        "loop",
        &[
            "--workers",
            "1",
            "--restart-limit",
            "3",
            "--restart-window",
            "60",
        ],
        &["--exit-at-start"],
    );
    let mut c = s.client().unwrap();
    wait_until("the engine is reported down", TIMEOUT, || {
        c.stats(TIMEOUT).unwrap().engine.down
    });
    let st = c.stats(TIMEOUT).unwrap();
    assert_eq!(st.instances[0].state, "down");
    assert!(
        st.instances[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("crash loop")
    );
    let starts = s.stderr().matches("event=instance_started").count();
    assert_eq!(starts, 4, "the first start and 3 restarts: {}", s.stderr());
    let e = c.ask("anyone?", TIMEOUT).unwrap_err();
    assert!(e.to_string().contains("engine is down"), "{e}");
    // Not spinning: no further starts while down.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(s.stderr().matches("event=instance_started").count(), starts);
    let out = env.at("loop", &["status"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("(DOWN)") && text.contains("crash loop"),
        "{}",
        describe(&out)
    );
}

#[test]
fn max_requests_recycles_on_schedule() {
    let env = Env::new();
    let s = jsonl(&env, "rec", &["--workers", "1", "--max-requests", "3"], &[]);
    let mut c = s.client().unwrap();
    let pids: Vec<String> = (0..7)
        .map(|i| pid_in(&c.ask(&format!("q{i}"), TIMEOUT).unwrap().answer))
        .collect();
    assert!(pids[0] == pids[1] && pids[1] == pids[2], "{pids:?}");
    assert!(
        pids[3] != pids[2] && pids[3] == pids[4] && pids[4] == pids[5],
        "{pids:?}"
    );
    assert!(pids[6] != pids[5], "{pids:?}");
    let st = c.stats(TIMEOUT).unwrap();
    assert_eq!((st.instances[0].served, st.instances[0].restarts), (7, 2));
    assert!(s.stderr().contains("reason=\"max requests reached\""));
}

#[test]
fn sigterm_or_kill_9_of_the_server_leaves_no_child_behind() {
    let env = Env::new();
    let mut s = jsonl(&env, "t", &["--workers", "3"], &[]);
    let pids = instance_pids(&s);
    assert_eq!(pids.len(), 3);
    s.signal(libc::SIGTERM);
    assert_eq!(s.wait_exit(TIMEOUT), Some(0), "{}", s.stderr());
    for p in &pids {
        assert!(!alive(*p as i32), "instance {p} outlived the server");
    }
    // kill -9: the instances die with it (PR_SET_PDEATHSIG).
    let mut s = jsonl(&env, "k", &["--workers", "2"], &[]);
    let pids = instance_pids(&s);
    s.signal(libc::SIGKILL);
    s.wait_exit(TIMEOUT);
    wait_until("the instances die with the server", TIMEOUT, || {
        pids.iter().all(|p| !alive(*p as i32))
    });
}

#[test]
fn spawn_runs_one_reaped_process_per_question() {
    let env = Env::new();
    let ctx = notes(&env);
    let s = env.server(
        "sp",
        &[
            "--backend",
            "spawn",
            "--context",
            &ctx,
            "--workers",
            "2",
            "--watchdog",
            "5",
            "--start-timeout",
            "5",
            "--kill-grace",
            "0.1",
            "--",
            "python3",
            &fixture("jsonl_backend.py"),
            "--once",
        ],
    );
    let mut c = s.client().unwrap();
    let mut seen = std::collections::HashSet::new();
    for i in 0..10 {
        let a = c.ask(&format!("question {i}"), TIMEOUT).unwrap();
        assert!(a.answer.contains(&format!("question {i}")), "{}", a.answer);
        assert!(a.sources[0].ends_with("NOTES.md:1-2"));
        seen.insert(pid_in(&a.answer));
    }
    assert_eq!(seen.len(), 10, "a new process each time");
    let e = c.ask("[hang] x", TIMEOUT).unwrap_err();
    assert!(
        matches!(&e, ClientError::Server(r) if r.code == ErrorCode::Timeout),
        "{e}"
    );
    let e = c.ask("[error] x", TIMEOUT).unwrap_err();
    assert!(
        matches!(&e, ClientError::Server(r) if r.code == ErrorCode::Engine),
        "{e}"
    );
    wait_until("no child left", TIMEOUT, || children_of(s.pid()).is_empty());
}

#[test]
fn bad_backend_configuration_is_refused() {
    let env = Env::new();
    let ctx = notes(&env);
    let rt = env.runtime();
    for (args, needle) in [
        (
            vec!["--backend", "jsonl", "--context", &ctx],
            "needs the command after `--`",
        ),
        (
            vec![
                "--backend",
                "jsonl",
                "--context",
                &ctx,
                "--",
                "no-such-program-xyz",
            ],
            "not found in PATH",
        ),
        (vec!["--context", &ctx, "--", "python3"], "needs --backend"),
    ] {
        let out = env
            .cmd("autopoll-server")
            .args(["-q", "--runtime-dir", path_str(&rt)])
            .args(&args)
            .output()
            .unwrap();
        common::assert_one_line_error(&out, 12, needle);
    }
}

#[test]
fn max_age_recycles_an_idle_instance() {
    let env = Env::new();
    let s = jsonl(&env, "age", &["--workers", "1", "--max-age", "0.5"], &[]);
    let first = instance_pids(&s);
    wait_until("the instance is recycled by age", TIMEOUT, || {
        let now = instance_pids(&s);
        now.len() == 1 && now != first
    });
    assert!(
        s.stderr().contains("reason=\"max age reached\""),
        "{}",
        s.stderr()
    );
    assert!(
        s.client()
            .unwrap()
            .ask("still answering?", TIMEOUT)
            .unwrap()
            .found
    );
}

#[test]
fn workers_answer_in_parallel() {
    let env = Env::new();
    let s = jsonl(&env, "par", &["--workers", "2"], &[]);
    // Two slow questions (0.6 s each, with progress) at once: both instances busy together.
    let askers: Vec<_> = (0..2)
        .map(|i| {
            let mut c = s.client().unwrap();
            std::thread::spawn(move || c.ask(&format!("[slow] {i}"), TIMEOUT).unwrap())
        })
        .collect();
    let mut c = s.client().unwrap();
    wait_until("both instances busy at the same time", TIMEOUT, || {
        c.stats(TIMEOUT)
            .unwrap()
            .instances
            .iter()
            .filter(|w| w.state == "busy")
            .count()
            == 2
    });
    let pids: std::collections::HashSet<String> = askers
        .into_iter()
        .map(|t| pid_in(&t.join().unwrap().answer))
        .collect();
    assert_eq!(pids.len(), 2, "answered by two different instances");
}

/// Regression: a question queued behind an instance being recycled (one that
/// ignores SIGTERM and stdin closing) was never answered at shutdown; its pool
/// worker waited out the question's deadline and the server took ~60 s to
/// exit. Also: no instance may start once shutdown has begun.
#[test]
fn shutdown_is_not_held_up_by_a_question_queued_behind_a_recycle() {
    let env = Env::new();
    let mut s = jsonl(
        &env,
        "stub",
        &[
            "--workers",
            "1",
            "--max-requests",
            "1",
            "--grace",
            "1",
            "--kill-grace",
            "1.5",
        ],
        &["--stubborn"],
    );
    s.client().unwrap().ask("first", TIMEOUT).unwrap(); // then the recycle starts
    let mut late = s.client().unwrap();
    let queued = std::thread::spawn(move || late.ask("queued behind the recycle", TIMEOUT));
    std::thread::sleep(Duration::from_millis(300));
    s.signal(libc::SIGTERM);
    // Bounded by the grace and the kill grace, not by the question's 60 s deadline.
    assert_eq!(s.wait_exit(TIMEOUT), Some(0), "{}", s.stderr());
    let _ = queued.join().unwrap();
    let log = s.stderr();
    let after_stop = &log[log.find("event=stopping").unwrap()..];
    assert!(
        !after_stop.contains("event=instance_started"),
        "an instance started during shutdown: {log}"
    );
}

/// Regression: a backend that dies soon after starting, with questions
/// waiting, was restarted without backoff and never tripped the breaker
/// (each death looked like the question's fault).
#[test]
fn an_instance_that_dies_on_every_question_trips_the_breaker() {
    let env = Env::new();
    let ctx = notes(&env);
    let s = env.server(
        "dies",
        &[
            "--backend",
            "jsonl",
            "--context",
            &ctx,
            "--workers",
            "1",
            "--restart-limit",
            "3",
            "--restart-window",
            "60",
            "--",
            "sh",
            "-c",
            "sleep 0.3; exit 1",
        ],
    );
    let mut c = s.client().unwrap();
    wait_until("the engine is reported down", TIMEOUT, || {
        let _ = c.ask("anyone?", TIMEOUT); // keep questions coming, as a poller would
        c.stats(TIMEOUT).unwrap().engine.down
    });
    let e = c.ask("now?", TIMEOUT).unwrap_err();
    assert!(e.to_string().contains("engine is down"), "{e}");
    assert!(s.stderr().contains("event=instance_down"), "{}", s.stderr());
}

/// A child that floods progress lines never lets a read time out: the
/// deadline still ends the question and the instance is replaced, instead
/// of staying busy for ever (regression: deadlines were checked only when a
/// read timed out).
#[test]
fn a_child_flooding_progress_is_still_bounded_by_the_deadline() {
    let env = Env::new();
    let ctx = notes(&env);
    let s = env.server(
        "flood",
        &[
            "--backend",
            "jsonl",
            "--context",
            &ctx,
            "--workers",
            "1",
            "--request-timeout",
            "3",
            "--kill-grace",
            "1",
            "--",
            "sh",
            "-c",
            r#"read line; exec yes '{"type":"progress"}'"#,
        ],
    );
    wait_until("the instance runs", TIMEOUT, || {
        instance_pids(&s).len() == 1
    });
    let first = instance_pids(&s)[0];
    let e = s
        .client()
        .unwrap()
        .ask("flood me", Duration::from_secs(20))
        .unwrap_err();
    assert!(
        matches!(&e, ClientError::Server(r) if r.code == ErrorCode::Timeout),
        "{e}"
    );
    // Not busy for ever: the flooding child was killed and replaced.
    wait_until("the flooding instance is replaced", TIMEOUT, || {
        let st = s.client().unwrap().stats(TIMEOUT).unwrap();
        let w = &st.instances[0];
        w.state == "idle" && w.pid.is_some_and(|p| p != first)
    });
    assert!(!alive(first as i32));
}
