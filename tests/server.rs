//! `autopoll-server`, `autopoll ask`, `autopoll status` and `scripts/ask.sh`
//! end to end: the real binaries, real FIFOs, a real context on disk.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use autopoll_protocol::fifo;
use common::{Env, TIMEOUT, assert_one_line_error, describe, path_str, wait_until};
use serde_json::Value;

const NOTES: &str = "# Session notes

## Cache decision
We decided to keep the LRU cache at 64 entries.
The reason: memory on the shard host is tight.
Revisit in March.

## Transport
Questions travel over named pipes, one private pair per client.
Hello frames go on the shared FIFO only.
Replies never interleave.
";

fn notes(env: &Env) -> String {
    let p = env.path("NOTES.md");
    std::fs::write(&p, NOTES).unwrap();
    path_str(&p).to_string()
}

fn line_range(source: &str) -> (usize, usize) {
    let (_, r) = source.rsplit_once(':').unwrap();
    // The built-in engine's best line is cited `FILE:LINE`.
    let (a, b) = r.split_once('-').unwrap_or((r, r));
    (a.parse().unwrap(), b.parse().unwrap())
}

#[test]
fn ask_cites_the_line_range_holding_the_answer_and_status_counts_it() {
    let env = Env::new();
    let ctx = notes(&env);
    let _s = env.server("default", &["--context", &ctx]);
    let out = env
        .at(
            "default",
            &["ask", "--json", "how", "big", "is", "the", "cache?"],
        )
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["found"], true);
    let top = v["sources"][0].as_str().unwrap();
    assert!(top.starts_with(&ctx), "{top}");
    let (a, b) = line_range(top);
    let line = NOTES
        .lines()
        .position(|l| l.contains("64 entries"))
        .unwrap()
        + 1;
    assert!((a..=b).contains(&line), "{top} should hold line {line}");
    assert!(v["answer"].as_str().unwrap().contains("64 entries"));
    assert!(
        v["context_version"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );
    assert!(v["elapsed_ms"].as_f64().unwrap() >= 0.0);

    // Text mode prints the answer then the sources.
    let out = env
        .at("default", &["ask", "how do replies travel?"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("private pair") && text.contains("\nsources:\n  "),
        "{text}"
    );

    // Nothing relevant: said plainly.
    let out = env
        .at("default", &["ask", "--json", "zebra", "xylophone"])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["found"], false);
    assert!(
        v["answer"]
            .as_str()
            .unwrap()
            .starts_with("Nothing in the context matches")
    );

    let st: Value = serde_json::from_slice(
        &env.at("default", &["status", "--json"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let st = &st["server"];
    assert_eq!(st["requests"], 3);
    assert_eq!(st["errors"], 0);
    assert_eq!(st["engine"]["name"], "builtin");
    assert_eq!(st["engine"]["files"], 1);
    assert!(st["latency_p99_ms"].as_f64().unwrap() > 0.0);
}

#[test]
fn editing_the_context_changes_the_answer_without_restart() {
    let env = Env::new();
    let ctx = notes(&env);
    let s = env.server("default", &["--context", &ctx, "--reload-interval", "0.05"]);
    let mut c = s.client().unwrap();
    let before = c.ask("cache entries decided", TIMEOUT).unwrap();
    assert!(before.answer.contains("64 entries"));
    std::fs::write(&ctx, NOTES.replace("64 entries", "4096 entries")).unwrap();
    let mut after = before.clone();
    wait_until("the server reloads the edited file", TIMEOUT, || {
        after = c.ask("cache entries decided", TIMEOUT).unwrap();
        after.answer.contains("4096 entries")
    });
    assert_ne!(after.context_version, before.context_version);
    // A broken edit keeps the old index and reports why.
    std::fs::write(&ctx, b"\xff\xfe not text").unwrap();
    wait_until("the failed reload is reported", TIMEOUT, || {
        c.stats(TIMEOUT).unwrap().engine.last_reload_error.is_some()
    });
    assert!(
        c.ask("cache entries decided", TIMEOUT)
            .unwrap()
            .answer
            .contains("4096 entries")
    );
}

/// The safety-net walk is an hour away in these tests: whatever is picked
/// up is picked up by the inotify watcher.
const NO_WALK: &str = "3600";

#[test]
fn context_edits_additions_removals_and_new_subfolders_are_noticed_without_a_walk() {
    let env = Env::new();
    let dir = env.path("ctx");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("NOTES.md"), NOTES).unwrap();
    std::fs::write(
        dir.join("keep.md"),
        "# Keep\nThe lighthouse keeper logs tides.\n",
    )
    .unwrap();
    let s = env.server(
        "default",
        &["--context", path_str(&dir), "--reload-interval", NO_WALK],
    );
    let mut c = s.client().unwrap();
    let mut ask = |q: &str| c.ask(q, TIMEOUT).unwrap();
    assert!(ask("cache entries decided").answer.contains("64 entries"));

    // An edit: the new text is found, the old text is gone.
    std::fs::write(
        dir.join("NOTES.md"),
        NOTES.replace("64 entries", "4096 entries"),
    )
    .unwrap();
    wait_until("the edited file is re-indexed", TIMEOUT, || {
        ask("cache entries decided").answer.contains("4096 entries")
    });
    assert!(!ask("cache entries decided").answer.contains("64 entries"));

    // A file added, written the way editors do (a temporary, renamed in).
    std::fs::write(dir.join(".tmp-added"), "# Added\nThe walrus quorum met.\n").unwrap();
    std::fs::rename(dir.join(".tmp-added"), dir.join("added.md")).unwrap();
    wait_until("the added file is indexed", TIMEOUT, || {
        ask("walrus quorum")
            .sources
            .iter()
            .any(|s| s.contains("added.md"))
    });

    // A file removed.
    std::fs::remove_file(dir.join("keep.md")).unwrap();
    wait_until("the removed file is dropped", TIMEOUT, || {
        !ask("lighthouse keeper tides").found
    });

    // Files in new subfolders, one nested right away (before its folder
    // could have been watched), and a later edit inside it.
    std::fs::create_dir_all(dir.join("sub/deeper")).unwrap();
    std::fs::write(
        dir.join("sub/deeper/far.md"),
        "# Far\nThe narwhal ledger.\n",
    )
    .unwrap();
    wait_until("the file in a new subfolder is indexed", TIMEOUT, || {
        ask("narwhal ledger")
            .sources
            .iter()
            .any(|s| s.contains("sub/deeper/far.md"))
    });
    std::fs::write(dir.join("sub/deeper/far.md"), "# Far\nThe okapi ledger.\n").unwrap();
    wait_until("an edit in the new subfolder is noticed", TIMEOUT, || {
        ask("okapi").found
    });
    assert!(!ask("narwhal").found);
    let st = c.stats(TIMEOUT).unwrap();
    assert_eq!(st.engine.files, 3, "NOTES.md, added.md, sub/deeper/far.md");
}

/// Folders moved in and out whole (one rename each: inotify names only the
/// folder) are walked alone and their files added or dropped; the walk of
/// everything is an hour away.
#[test]
fn a_folder_moved_into_or_out_of_the_context_is_noticed_by_its_name() {
    let env = Env::new();
    let dir = env.path("ctx");
    let outside = env.path("outside");
    std::fs::create_dir_all(dir.join("keep")).unwrap();
    std::fs::create_dir_all(outside.join("incoming/deeper")).unwrap();
    std::fs::write(dir.join("keep/NOTES.md"), NOTES).unwrap();
    std::fs::write(
        outside.join("incoming/deeper/far.md"),
        "# Far\nThe axolotl registry.\n",
    )
    .unwrap();
    let s = env.server(
        "default",
        &["--context", path_str(&dir), "--reload-interval", NO_WALK],
    );
    let mut c = s.client().unwrap();
    assert!(!c.ask("axolotl registry", TIMEOUT).unwrap().found);
    std::fs::rename(outside.join("incoming"), dir.join("incoming")).unwrap();
    wait_until("the moved-in folder's file is indexed", TIMEOUT, || {
        c.ask("axolotl registry", TIMEOUT)
            .unwrap()
            .sources
            .iter()
            .any(|s| s.contains("incoming/deeper/far.md"))
    });
    // Its files are watched from now on.
    std::fs::write(
        dir.join("incoming/deeper/far.md"),
        "# Far\nThe tapir registry.\n",
    )
    .unwrap();
    wait_until(
        "an edit inside the moved-in folder is noticed",
        TIMEOUT,
        || c.ask("tapir", TIMEOUT).unwrap().found,
    );
    std::fs::rename(dir.join("keep"), outside.join("keep")).unwrap();
    wait_until("the moved-out folder's file is dropped", TIMEOUT, || {
        !c.ask("cache entries decided", TIMEOUT).unwrap().found
    });
    let st = c.stats(TIMEOUT).unwrap();
    assert_eq!(st.engine.files, 1, "only incoming/deeper/far.md");
    assert!(st.engine.last_reload_error.is_none());
}

#[test]
fn a_context_file_named_directly_is_watched_through_its_folder() {
    let env = Env::new();
    let ctx = notes(&env);
    let s = env.server(
        "default",
        &["--context", &ctx, "--reload-interval", NO_WALK],
    );
    let mut c = s.client().unwrap();
    // Editors save by renaming a new file over the old one.
    let tmp = format!("{ctx}.swp");
    std::fs::write(&tmp, NOTES.replace("64 entries", "77 entries")).unwrap();
    std::fs::rename(&tmp, &ctx).unwrap();
    wait_until("the replaced file is re-indexed", TIMEOUT, || {
        c.ask("cache entries decided", TIMEOUT)
            .unwrap()
            .answer
            .contains("77 entries")
    });
}

/// Issue 12: the idle server re-walked and re-stat'ed the whole context
/// every second, comparing paths pairwise (F^2): ~20 % of a core at 2,000
/// files. Watched by inotify, an idle server does nothing.
#[test]
fn an_idle_server_over_5000_context_files_uses_no_cpu() {
    let env = Env::new();
    let dir = env.path("many");
    for i in 0..5_000 {
        let sub = dir.join(format!("d{:02}", i % 50));
        if i < 50 {
            std::fs::create_dir_all(&sub).unwrap();
        }
        std::fs::write(
            sub.join(format!("f{i:04}.md")),
            format!("# Note {i}\nitem{i} shared words\n"),
        )
        .unwrap();
    }
    // The default --reload-interval.
    let s = env.server("default", &["--context", path_str(&dir)]);
    let pid = s.pid();
    std::thread::sleep(Duration::from_millis(500));
    let ticks0 = common::cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(4));
    let ticks = common::cpu_ticks(pid) - ticks0;
    // 100 ticks a second: 10 in 4 s is 2.5 % of a core.
    assert!(ticks <= 10, "idle server used {ticks} CPU ticks in 4 s");
    // And it still notices an edit.
    let mut c = s.client().unwrap();
    std::fs::write(dir.join("d07/f0007.md"), "# Note 7\nthe capybara item\n").unwrap();
    wait_until("the edit is noticed", TIMEOUT, || {
        c.ask("capybara", TIMEOUT).unwrap().found
    });
}

/// A server over 16 topics of five lines each: the keyword `kw{c}marker`
/// is on line `2 + 5 * c` only.
fn topics_server(env: &Env) -> common::Server {
    let body: String = (0..16)
        .map(|c| format!("## Topic {c}\nThe keyword kw{c}marker belongs to topic {c} only.\nMore text.\nEven more.\n\n"))
        .collect();
    let ctx = env.path("topics.md");
    std::fs::write(&ctx, &body).unwrap();
    env.server("default", &["--context", path_str(&ctx), "--workers", "2"])
}

/// 16 clients x 200 requests of ~100 KB each, alternating echo and ask:
/// every reply is the one for its own request.
#[test]
fn sixteen_clients_with_100kb_frames_get_their_own_replies() {
    let env = Env::new();
    let s = topics_server(&env);
    let filler = "zzfill ".repeat(100_000 / 7);
    let threads: Vec<_> = (0..16)
        .map(|c| {
            let mut client = s.client().unwrap();
            let filler = filler.clone();
            std::thread::Builder::new()
                .name(format!("client-{c}"))
                .spawn(move || {
                    for r in 0..200 {
                        if r % 2 == 0 {
                            let payload = format!("client {c} request {r} {filler}");
                            let got = client.echo(&payload, TIMEOUT).unwrap();
                            assert!(
                                got == payload,
                                "client {c} request {r}: echo came back different"
                            );
                        } else {
                            let q = format!("kw{c}marker {filler}");
                            let a = client.ask(&q, TIMEOUT).unwrap();
                            let line = 2 + 5 * c;
                            let (lo, hi) = line_range(&a.sources[0]);
                            assert!(
                                (lo..=hi).contains(&line),
                                "client {c} request {r}: got {:?}",
                                a.sources
                            );
                        }
                    }
                })
                .unwrap()
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let st = s.client().unwrap().stats(TIMEOUT).unwrap();
    assert_eq!(st.requests, 16 * 100);
    assert_eq!(st.errors, 0);
}

/// 64 questions written in one go on one session (pipelining, as the
/// poller's askers do), one of them too large to send: the other 63 each
/// get their own answer, matched by id, and the large one fails alone.
#[test]
fn pipelined_questions_on_one_session_each_get_their_own_answer() {
    let env = Env::new();
    let s = topics_server(&env);
    let mut client = s.client().unwrap();
    let too_large = "kw3marker ".repeat(autopoll_protocol::DEFAULT_MAX_FRAME / 5);
    let texts: Vec<String> = (0..64)
        .map(|i| {
            if i == 40 {
                too_large.clone()
            } else {
                format!("which topic has kw{}marker?", i % 16)
            }
        })
        .collect();
    let questions: Vec<(&str, Duration)> = texts.iter().map(|t| (t.as_str(), TIMEOUT)).collect();
    let ids = client.send_asks(&questions).unwrap();
    assert!(
        matches!(ids[40], Err(autopoll_protocol::FrameError::TooLarge { .. })),
        "{:?}",
        ids[40]
    );
    let mut want: std::collections::HashMap<u64, usize> = ids
        .iter()
        .enumerate()
        .filter_map(|(i, id)| id.as_ref().ok().map(|id| (*id, i)))
        .collect();
    assert_eq!(want.len(), 63);
    let deadline = Instant::now() + TIMEOUT;
    while !want.is_empty() {
        let mut fds = [fifo::pollfd(client.reply_fd(), libc::POLLIN)];
        assert!(
            fifo::poll(&mut fds, Some(deadline)).unwrap() > 0,
            "{} answers missing",
            want.len()
        );
        let got = client.read_replies().unwrap();
        assert!(!got.closed && !got.idle_closed && got.unattributed.is_empty());
        for reply in got.replies {
            let id = reply.id().unwrap();
            let i = want
                .remove(&id)
                .unwrap_or_else(|| panic!("reply to {id} twice or unasked"));
            let autopoll_protocol::Reply::Answer(a) = reply else {
                panic!("question {i}: {reply:?}");
            };
            let line = 2 + 5 * (i % 16);
            let (lo, hi) = line_range(&a.sources[0]);
            assert!(
                (lo..=hi).contains(&line),
                "question {i}: got {:?}",
                a.sources
            );
        }
    }
    let st = client.stats(TIMEOUT).unwrap();
    assert_eq!((st.requests, st.errors), (63, 0));
}

#[test]
fn a_client_killed_mid_request_does_not_disturb_the_others() {
    let env = Env::new();
    let ctx = notes(&env);
    let s = env.server("default", &["--context", &ctx]);
    let mut steady = s.client().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/half_frame.sh");
    let mut half = Command::new("sh")
        .arg(&fixture)
        .arg(&s.runtime)
        .arg("default")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(half.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "connected");
    assert!(steady.ask("cache", TIMEOUT).unwrap().found);
    assert_eq!(steady.stats(TIMEOUT).unwrap().sessions, 2);
    half.kill().unwrap();
    half.wait().unwrap();
    wait_until("the dead client's session ends", TIMEOUT, || {
        steady.stats(TIMEOUT).unwrap().sessions == 1
    });
    assert!(steady.ask("transport replies", TIMEOUT).unwrap().found);
    // The dead client's half frame may be read (and counted as a failed
    // request) or dropped with its session, depending on which of its two
    // FIFOs the kernel reports closed first; the two real asks both worked.
    let st = steady.stats(TIMEOUT).unwrap();
    assert!(st.errors <= 1, "{st:?}");
    assert_eq!(st.requests - st.errors, 2, "{st:?}");
}

#[test]
fn garbage_on_the_shared_fifo_does_not_stop_the_server_or_write_files() {
    let env = Env::new();
    let ctx = notes(&env);
    let s = env.server("default", &["--context", &ctx]);
    let victim = env.path("victim.txt");
    std::fs::write(&victim, "untouched").unwrap();
    let link = s.paths().clients().join("evil.rep");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    let reg = s.paths().clients().join("regular.req");
    std::fs::write(&reg, "").unwrap();
    let w = fifo::open_fifo(&s.paths().requests(), true).unwrap();
    let deadline = Instant::now() + TIMEOUT;
    let mut junk: Vec<Vec<u8>> = vec![
        b"\xff\xfe\x00garbage\n".to_vec(),
        b"{\"type\":\"ask\",\"id\":1,\"question\":\"not here\"}\n".to_vec(),
        b"{\"type\":\"hello\"\n".to_vec(),
        vec![b'x'; 10_000],
        b"\n".to_vec(),
    ];
    for (req, rep) in [
        (reg.clone(), link.clone()),
        (Path::new("relative").to_path_buf(), link.clone()),
        (reg.clone(), victim.clone()),
    ] {
        junk.push(
            format!(
                "{{\"type\":\"hello\",\"version\":1,\"request_fifo\":{:?},\"reply_fifo\":{:?}}}\n",
                req, rep
            )
            .into_bytes(),
        );
    }
    let mut seed = 7u64;
    for _ in 0..2_000 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let len = (seed >> 33) as usize % 200;
        let mut frame: Vec<u8> = (0..len).map(|i| (seed >> (i % 56)) as u8).collect();
        frame.push(b'\n');
        junk.push(frame);
    }
    for j in &junk {
        fifo::write_all(&w, j, deadline).unwrap();
    }
    drop(w);
    let mut c = s.client().unwrap();
    assert!(c.ask("cache", TIMEOUT).unwrap().found);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
    assert!(s.stderr().contains("event=bad_hello"), "{}", s.stderr());
}

#[test]
fn oversized_and_malformed_requests_get_error_replies() {
    let env = Env::new();
    let ctx = notes(&env);
    let s = env.server("default", &["--context", &ctx, "--max-frame-bytes", "8192"]);
    let mut c = s.client().unwrap();
    assert_eq!(c.welcome().max_frame_bytes, 8192);
    // The client refuses to send over the cap itself...
    let e = c.ask(&"x".repeat(10_000), TIMEOUT).unwrap_err();
    assert!(e.to_string().contains("too large"), "{e}");
    // ...and `autopoll ask` reports it with exit 9.
    let out = env
        .at("default", &["ask", &"y".repeat(10_000)])
        .output()
        .unwrap();
    assert_one_line_error(&out, 9, "too large");
    // Just under the cap passes.
    assert!(c.ask(&"cache ".repeat(1_300), TIMEOUT).is_ok());
    // An empty question is refused as invalid, and the session lives on.
    let e = c.ask("   ", TIMEOUT).unwrap_err();
    assert!(e.to_string().contains("empty"), "{e}");
    assert!(c.ask("cache", TIMEOUT).unwrap().found);
}

#[test]
fn no_server_stale_fifo_and_stopped_server_all_fail_within_the_timeout() {
    let env = Env::new();
    // Nothing at all.
    let t = Instant::now();
    let out = env
        .at("default", &["ask", "--timeout", "2", "hello"])
        .output()
        .unwrap();
    assert_one_line_error(&out, 10, "no server `default`");
    assert!(t.elapsed() < Duration::from_secs(2) + TIMEOUT);
    // A server killed with -9 leaves its FIFO: ENXIO, reported at once.
    let ctx = notes(&env);
    let mut s = env.server("default", &["--context", &ctx]);
    s.signal(libc::SIGKILL);
    s.wait_exit(TIMEOUT);
    assert!(s.paths().requests().exists(), "the stale FIFO stays behind");
    let out = env
        .at("default", &["ask", "--timeout", "2", "hello"])
        .output()
        .unwrap();
    assert_one_line_error(&out, 10, "nobody reads its request FIFO");
    let out = env.at("default", &["status"]).output().unwrap();
    assert_one_line_error(&out, 10, "no server");
    // A stopped (hung) server: the client gives up at its timeout with exit 5.
    let s2 = env.server("default", &["--context", &ctx]);
    s2.signal(libc::SIGSTOP);
    let out = env
        .at("default", &["ask", "--timeout", "0.5", "hello"])
        .output()
        .unwrap();
    assert_one_line_error(&out, 5, "no reply within 0.5 s");
    s2.signal(libc::SIGCONT);
}

#[test]
fn sigterm_exits_0_and_removes_fifo_lock_and_pid() {
    let env = Env::new();
    let ctx = notes(&env);
    let mut s = env.server("default", &["--context", &ctx]);
    let mut idle = s.client().unwrap();
    s.signal(libc::SIGTERM);
    assert_eq!(s.wait_exit(TIMEOUT), Some(0), "{}", s.stderr());
    for f in [s.paths().requests(), s.paths().lock(), s.paths().pid()] {
        assert!(!f.exists(), "{} left behind", f.display());
    }
    // An idle session learns the server is gone.
    assert!(idle.ask("cache", TIMEOUT).unwrap_err().is_unavailable());
    // SIGINT too.
    let mut s = env.server("default", &["--context", &ctx]);
    s.signal(libc::SIGINT);
    assert_eq!(s.wait_exit(TIMEOUT), Some(0), "{}", s.stderr());
}

#[test]
fn second_server_of_a_name_is_refused_and_a_restart_after_kill_9_works() {
    let env = Env::new();
    let ctx = notes(&env);
    let mut first = env.server("shard", &["--context", &ctx]);
    let out = env
        .cmd("autopoll-server")
        .args([
            "--name",
            "shard",
            "--runtime-dir",
            path_str(&env.runtime()),
            "--context",
            &ctx,
        ])
        .output()
        .unwrap();
    assert_one_line_error(&out, 11, &format!("already running (pid {})", first.pid()));
    // Another name runs beside it.
    let _other = env.server("other", &["--context", &ctx]);
    first.signal(libc::SIGKILL);
    first.wait_exit(TIMEOUT);
    let second = env.server("shard", &["--context", &ctx]);
    assert!(
        second
            .client()
            .unwrap()
            .ask("cache", TIMEOUT)
            .unwrap()
            .found
    );
    assert!(
        second.stderr().contains("event=stale_fifo_replaced"),
        "{}",
        second.stderr()
    );
}

#[test]
fn bad_context_is_a_config_error() {
    let env = Env::new();
    let out = env
        .cmd("autopoll-server")
        .args([
            "--runtime-dir",
            path_str(&env.runtime()),
            "--context",
            "/no/such/file.md",
        ])
        .output()
        .unwrap();
    assert_one_line_error(&out, 12, "/no/such/file.md");
    let out = env
        .cmd("autopoll-server")
        .args(["--runtime-dir", path_str(&env.runtime())])
        .output()
        .unwrap();
    assert_one_line_error(&out, 12, "--context");
}

#[test]
fn runtime_dirs_and_fifos_are_private() {
    use std::os::unix::fs::MetadataExt;
    let env = Env::new();
    let ctx = notes(&env);
    let s = env.server("default", &["--context", &ctx]);
    for d in [s.runtime.clone(), s.paths().dir, s.paths().clients()] {
        assert_eq!(
            std::fs::metadata(&d).unwrap().mode() & 0o777,
            0o700,
            "{}",
            d.display()
        );
    }
    assert_eq!(
        std::fs::metadata(s.paths().requests()).unwrap().mode() & 0o777,
        0o600
    );
}

fn ask_sh(env: &Env, args: &[&str], stdin: Option<&str>) -> std::process::Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/ask.sh");
    let mut c = Command::new("sh");
    c.arg(script)
        .args(args)
        .env("AUTOPOLL_RUNTIME_DIR", env.runtime())
        .env_remove("AUTOPOLL_NAME")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    child.wait_with_output().unwrap()
}

#[test]
fn ask_sh_works_with_an_argument_and_with_stdin() {
    let env = Env::new();
    let ctx = notes(&env);
    let _s = env.server("default", &["--context", &ctx]);
    let out = ask_sh(&env, &["how big is the cache?"], None);
    assert!(out.status.success(), "{}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("64 entries") && text.contains("sources:\n  ") && text.contains("NOTES.md:"),
        "{text}"
    );
    let out = ask_sh(&env, &[], Some("how do \"replies\" travel?\nover\tpipes\n"));
    assert!(out.status.success(), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("private pair"));
    // Named server that does not exist: exit 10.
    let out = ask_sh(&env, &["--name", "nope", "x"], None);
    assert_eq!(out.status.code(), Some(10), "{}", describe(&out));
}

#[test]
fn server_help_lists_every_flag_and_the_exit_codes() {
    let env = Env::new();
    let out = env.cmd("autopoll-server").arg("--help").output().unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--name",
        "--runtime-dir",
        "--backend",
        "--context",
        "--workers",
        "--request-timeout",
        "--max-frame-bytes",
        "--grace",
        "--reload-interval",
        "--max-clients",
        "--idle-timeout",
        "Exit codes:",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
}

/// Regression: a client that dies after the welcome but before opening its
/// request FIFO used to leave its session (thread, descriptors, a
/// --max-clients slot) behind for good.
#[test]
fn a_client_vanishing_mid_handshake_gives_its_session_back() {
    let env = Env::new();
    let ctx = notes(&env);
    let s = env.server("default", &["--context", &ctx, "--max-clients", "3"]);
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/half_frame.sh");
    for _ in 0..5 {
        let out = Command::new("sh")
            .arg(&fixture)
            .arg(&s.runtime)
            .arg("default")
            .arg("--vanish")
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "vanished",
            "{}",
            describe(&out)
        );
    }
    let mut c = s.client().unwrap();
    wait_until("only our own session is left", TIMEOUT, || {
        c.stats(TIMEOUT).unwrap().sessions == 1
    });
    assert!(c.ask("cache", TIMEOUT).unwrap().found);
}
