//! `--backend claude` and `--backend spawn` against the real Claude Code CLI
//! (`@anthropic-ai/claude-code`, pinned in tests/claude-cli/package-lock.json
//! and installed by scripts/install-test-deps.sh with `npm ci`), talking to
//! our fake Anthropic Messages API (tests/fixtures/fake_anthropic.py) on
//! 127.0.0.1. When the CLI cannot be installed these tests fail; they never
//! skip.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use autopoll_protocol::{ClientError, ErrorCode};
use common::{
    Env, KillOnDrop, TIMEOUT, alive, children_of, claude_bin, fixture, path_str, wait_until,
};
use serde_json::{Value, json};

/// At most two of these tests run their CLIs at once: each CLI instance is
/// a 400 MB native program that takes most of a core to start, and a 2-core
/// CI machine running all of them in parallel starves the servers under test.
static FREE_SLOTS: std::sync::Mutex<usize> = std::sync::Mutex::new(2);
static SLOT_FREED: std::sync::Condvar = std::sync::Condvar::new();

struct CliSlot;

fn cli_slot() -> CliSlot {
    let mut free = FREE_SLOTS.lock().unwrap_or_else(|p| p.into_inner());
    while *free == 0 {
        free = SLOT_FREED.wait(free).unwrap_or_else(|p| p.into_inner());
    }
    *free -= 1;
    CliSlot
}

impl Drop for CliSlot {
    fn drop(&mut self) {
        *FREE_SLOTS.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        SLOT_FREED.notify_one();
    }
}

/// Our fake Anthropic Messages API, killed on drop.
struct FakeApi {
    _child: KillOnDrop,
    url: String,
    log: PathBuf,
    control: PathBuf,
}

impl FakeApi {
    fn start(env: &Env) -> FakeApi {
        let port_file = env.path("api.port");
        let log = env.path("api.log");
        let control = env.path("api.control.json");
        let child = Command::new("python3")
            .arg(fixture("fake_anthropic.py"))
            .args(["--port-file", path_str(&port_file)])
            .args(["--log", path_str(&log)])
            .args(["--control", path_str(&control)])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(env.path("api.stderr")).unwrap())
            .spawn()
            .unwrap();
        let child = KillOnDrop(child);
        wait_until("the fake API listens", TIMEOUT, || port_file.exists());
        let port = std::fs::read_to_string(&port_file).unwrap();
        FakeApi {
            _child: child,
            url: format!("http://127.0.0.1:{}", port.trim()),
            log,
            control,
        }
    }

    /// The fault mode for the next `count` calls (None: until changed).
    fn mode(&self, mode: &str, count: Option<u32>) {
        let v = match count {
            Some(n) => json!({"mode": mode, "count": n}),
            None => json!({"mode": mode}),
        };
        let tmp = self.control.with_extension("tmp");
        std::fs::write(&tmp, v.to_string()).unwrap();
        std::fs::rename(&tmp, &self.control).unwrap();
    }

    /// Every `POST /v1/messages` received, in order.
    fn calls(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|r| {
                r["path"].as_str().unwrap_or("").starts_with("/v1/messages")
                    && !r["path"].as_str().unwrap_or("").contains("count_tokens")
            })
            .collect()
    }

    /// The environment the CLI needs: this API, a key, a private HOME, and
    /// no traffic anywhere else.
    fn vars(&self, env: &Env) -> Vec<(&'static str, String)> {
        let home = env.path("home");
        let tmp = env.path("tmp");
        std::fs::create_dir_all(&home).unwrap();
        std::fs::create_dir_all(&tmp).unwrap();
        vec![
            // The CLI keeps a socket and a scratch folder under TMPDIR.
            ("TMPDIR", path_str(&tmp).to_string()),
            ("ANTHROPIC_BASE_URL", self.url.clone()),
            ("ANTHROPIC_API_KEY", "sk-ant-test-not-a-real-key".into()),
            ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1".into()),
            ("HOME", path_str(&home).to_string()),
            // Nothing of the machine's own Claude setup may leak in.
            (
                "CLAUDE_CONFIG_DIR",
                path_str(&home.join(".claude")).to_string(),
            ),
            ("ANTHROPIC_AUTH_TOKEN", String::new()),
            ("CLAUDE_CODE_OAUTH_TOKEN", String::new()),
            ("CLAUDE_CODE_USE_BEDROCK", String::new()),
            ("CLAUDE_CODE_USE_VERTEX", String::new()),
            ("ANTHROPIC_MODEL", String::new()),
            ("API_TIMEOUT_MS", String::new()),
            ("CLAUDE_CODE_MAX_RETRIES", String::new()),
            ("HTTP_PROXY", String::new()),
            ("HTTPS_PROXY", String::new()),
            ("http_proxy", String::new()),
            ("https_proxy", String::new()),
            ("ALL_PROXY", String::new()),
        ]
    }
}

/// The text of a request's system prompt.
fn system_text(call: &Value) -> String {
    match &call["body"]["system"] {
        Value::String(s) => s.clone(),
        Value::Array(a) => a
            .iter()
            .filter_map(|b| b["text"].as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// The user messages' text of a request (tool results left out).
fn user_texts(call: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for m in call["body"]["messages"].as_array().into_iter().flatten() {
        if m["role"] != "user" {
            continue;
        }
        match &m["content"] {
            Value::String(s) => out.push(s.clone()),
            Value::Array(a) => {
                for b in a {
                    if b["type"] == "text" {
                        out.push(b["text"].as_str().unwrap_or("").to_string());
                    }
                }
            }
            _ => {}
        }
    }
    out
}

fn tool_names(call: &Value) -> BTreeSet<String> {
    call["body"]["tools"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["name"].as_str().map(String::from))
        .collect()
}

/// A context folder with one notes file, under the server's working
/// directory.
fn context(env: &Env) -> String {
    notes_in(&env.path("ctx"))
}

fn notes_in(dir: &std::path::Path) -> String {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("NOTES.md"),
        "# Notes\nThe cache holds 64 entries.\nWe chose SQLite for the bridge.\nReleases happen on Fridays.\n",
    )
    .unwrap();
    path_str(dir).to_string()
}

struct Shard {
    api: FakeApi,
    server: common::Server,
}

fn shard(env: &Env, extra: &[&str]) -> Shard {
    shard_over(env, &context(env), extra)
}

fn shard_over(env: &Env, ctx: &str, extra: &[&str]) -> Shard {
    let api = FakeApi::start(env);
    let mut args = vec![
        "--backend",
        "claude",
        "--claude-bin",
        claude_bin(),
        "--context",
        ctx,
        "--workers",
        "1",
        "--request-timeout",
        "120",
        "-v",
    ];
    args.extend_from_slice(extra);
    let server = env.server_env("cc", &args, &api.vars(env));
    wait_ready(&server);
    Shard { api, server }
}

/// Until every instance has answered its start-up handshake.
fn wait_ready(s: &common::Server) {
    wait_until("the claude instances are ready", TIMEOUT, || {
        let st = s.client().unwrap().stats(TIMEOUT).unwrap();
        st.instances.iter().all(|w| w.state == "idle")
    });
}

fn instance_pid(s: &common::Server) -> u32 {
    s.client().unwrap().stats(TIMEOUT).unwrap().instances[0]
        .pid
        .unwrap()
}

const FORBIDDEN: [&str; 9] = [
    "Bash",
    "Write",
    "Edit",
    "NotebookEdit",
    "WebFetch",
    "WebSearch",
    "Task",
    "Agent",
    "MultiEdit",
];

#[test]
fn claude_answers_with_haiku_read_only_tools_short_messages_and_true_cost() {
    let _slot = cli_slot();
    let env = Env::new();
    let sh = shard(&env, &[]);
    let ask = |q: &str| sh.server.client().unwrap().ask(q, TIMEOUT).unwrap();
    let a = ask("How many entries does the cache hold?");
    assert!(a.answer.contains("64"), "{}", a.answer);
    assert!(
        a.sources.iter().any(|s| s.contains("NOTES.md:")),
        "{:?} / {}",
        a.sources,
        a.answer
    );
    let b = ask("Which database did we choose for the bridge?");
    let c = ask("When do releases happen?");
    let metas: Vec<Value> = [&a, &b, &c]
        .iter()
        .map(|x| x.backend.clone().unwrap())
        .collect();
    // One warm session, and each question's own cost.
    let sid = metas[0]["session_id"].as_str().unwrap();
    assert!(sid.len() >= 32, "{}", metas[0]);
    let mut sum = 0.0;
    for m in &metas {
        assert_eq!(m["session_id"], sid, "{m}");
        let cost = m["cost_usd"].as_f64().unwrap();
        assert!(cost > 0.0, "{m}");
        assert!(m["usage"]["input_tokens"].as_u64().unwrap() > 0, "{m}");
        assert!(m["num_turns"].as_u64().unwrap() >= 1, "{m}");
        assert!(m["duration_ms"].is_number(), "{m}");
        sum += cost;
    }
    let total = metas[2]["total_cost_usd"].as_f64().unwrap();
    assert!((sum - total).abs() < 1e-9, "{sum} vs running total {total}");
    let st = sh.server.client().unwrap().stats(TIMEOUT).unwrap();
    let w = &st.instances[0];
    assert_eq!((w.served, w.restarts), (3, 0));
    assert!((w.cost_usd.unwrap() - total).abs() < 1e-9, "{w:?}");
    assert!((st.cost_usd.unwrap() - total).abs() < 1e-9, "{st:?}");

    // What reached the API: haiku, reading tools only, instructions once in
    // the system prompt, each question a short user message.
    let calls = sh.api.calls();
    assert!(calls.len() >= 3, "{} calls", calls.len());
    for call in &calls {
        let model = call["body"]["model"].as_str().unwrap_or("");
        assert!(model.contains("haiku"), "model {model}");
        let tools = tool_names(call);
        for t in FORBIDDEN {
            assert!(!tools.contains(t), "{t} offered: {tools:?}");
        }
        assert!(tools.contains("Read"), "{tools:?}");
        let sys = system_text(call);
        assert!(sys.contains("You are a memory shard"), "{sys}");
        assert!(sys.contains("NOTES.md (4 lines)"), "{sys}");
        for u in user_texts(call) {
            assert!(
                !u.contains("You are a memory shard"),
                "instructions resent: {u}"
            );
        }
    }
    let last = calls.last().unwrap();
    let questions: Vec<String> = user_texts(last)
        .into_iter()
        .filter(|u| u.contains("(context version"))
        .collect();
    assert_eq!(questions.len(), 3, "{questions:?}");
    assert!(
        questions[2].starts_with("When do releases happen?"),
        "{questions:?}"
    );
    assert!(questions[2].len() < 200, "{}", questions[2]);

    // `autopoll ask --json` carries the backend facts too.
    let out = env
        .at("cc", &["ask", "--json", "When do releases happen?"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::describe(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["backend"]["session_id"], sid, "{v}");
    assert!(v["backend"]["cost_usd"].as_f64().unwrap() > 0.0, "{v}");

    // Through the bridge: the response row keeps them.
    let conv = env.conversation();
    let _p = env.poller(&conv, "cc", &["--query-timeout", "120"]);
    let ids = env.send_queries(&conv, "cc", 1, "How many entries does the cache hold?");
    let got = env.expect_each_answered_once(&ids, TIMEOUT);
    let r = &got[0].1;
    assert_eq!(r["llm_type"], "claude");
    assert_eq!(r["backend"]["session_id"], sid, "{r}");
    assert!(r["backend"]["cost_usd"].as_f64().unwrap() > 0.0, "{r}");
    assert!(r["answer"].as_str().unwrap().contains("64"), "{r}");
}

fn engine_error(s: &common::Server, q: &str) -> String {
    match s.client().unwrap().ask(q, Duration::from_secs(90)) {
        Err(ClientError::Server(r)) => {
            assert_eq!(r.code, ErrorCode::Engine, "{}", r.message);
            r.message
        }
        other => panic!("expected an engine error, got {other:?}"),
    }
}

#[test]
fn persistent_api_errors_fail_fast_naming_the_status_and_keep_the_instance() {
    let _slot = cli_slot();
    let env = Env::new();
    let sh = shard(&env, &["--claude-retries", "2"]);
    let pid = instance_pid(&sh.server);
    for (mode, status) in [
        ("500", "500 (api_error)"),
        ("429", "429 (rate_limit_error)"),
    ] {
        sh.api.mode(mode, None);
        let before = sh.api.calls().len();
        let msg = engine_error(&sh.server, "How many entries does the cache hold?");
        assert!(msg.contains(&format!("API error {status}")), "{msg}");
        assert!(msg.contains("after 3 attempts"), "{msg}");
        // The CLI's own retries were bounded by --claude-retries.
        let calls = sh.api.calls().len() - before;
        assert_eq!(calls, 3, "{mode}: {calls} API calls");
        assert_eq!(instance_pid(&sh.server), pid, "instance replaced");
    }
    sh.api.mode("ok", None);
    let a = sh
        .server
        .client()
        .unwrap()
        .ask("How many entries does the cache hold?", TIMEOUT)
        .unwrap();
    assert!(a.answer.contains("64"), "{}", a.answer);
    assert_eq!(instance_pid(&sh.server), pid);
    let st = sh.server.client().unwrap().stats(TIMEOUT).unwrap();
    assert_eq!(st.instances[0].restarts, 0);
}

#[test]
fn transient_api_errors_are_retried_and_counted() {
    let _slot = cli_slot();
    let env = Env::new();
    let sh = shard(&env, &["--claude-retries", "2"]);
    for mode in ["500", "529", "429"] {
        sh.api.mode(mode, Some(1));
        let a = sh
            .server
            .client()
            .unwrap()
            .ask("How many entries does the cache hold?", TIMEOUT)
            .unwrap();
        assert!(a.answer.contains("64"), "{mode}: {}", a.answer);
        let m = a.backend.unwrap();
        assert!(m["api_retries"].as_u64().unwrap() >= 1, "{mode}: {m}");
    }
}

#[test]
fn a_hung_api_or_bad_json_ends_the_question_and_the_shard_recovers() {
    let _slot = cli_slot();
    let env = Env::new();
    let sh = shard(&env, &["--watchdog", "5", "--claude-retries", "0"]);
    let pid = instance_pid(&sh.server);
    sh.api.mode("hang", None);
    match sh.server.client().unwrap().ask(
        "How many entries does the cache hold?",
        Duration::from_secs(90),
    ) {
        Err(ClientError::Server(r)) => {
            assert_eq!(r.code, ErrorCode::Timeout, "{}", r.message);
            assert!(r.message.contains("watchdog"), "{}", r.message);
        }
        other => panic!("{other:?}"),
    }
    // A hang is the question's doing: that instance was replaced.
    wait_ready(&sh.server);
    let replaced = instance_pid(&sh.server);
    assert_ne!(replaced, pid);
    assert!(!alive(pid as i32), "the hung CLI {pid} is still alive");
    sh.api.mode("badjson", None);
    let msg = engine_error(&sh.server, "How many entries does the cache hold?");
    eprintln!("badjson: {msg}");
    assert!(msg.to_lowercase().contains("api"), "{msg}");
    // An error the CLI reports is not a dead instance.
    assert_eq!(instance_pid(&sh.server), replaced);
    sh.api.mode("ok", None);
    let a = sh
        .server
        .client()
        .unwrap()
        .ask("How many entries does the cache hold?", TIMEOUT)
        .unwrap();
    assert!(a.answer.contains("64"), "{}", a.answer);
    assert_eq!(instance_pid(&sh.server), replaced);
}

#[test]
fn a_context_change_recycles_the_session_so_the_next_answer_reads_new_files() {
    let _slot = cli_slot();
    let env = Env::new();
    let sh = shard(&env, &[]);
    let a = sh
        .server
        .client()
        .unwrap()
        .ask("When do releases happen?", TIMEOUT)
        .unwrap();
    let old_version = a.context_version.clone();
    let old_pid = instance_pid(&sh.server);
    let notes = env.path("ctx/NOTES.md");
    let mut text = std::fs::read_to_string(&notes).unwrap();
    text.push_str("Releases moved to Tuesdays in March.\n");
    std::fs::write(&notes, text).unwrap();
    wait_until(
        "the instance is recycled for the new context",
        TIMEOUT,
        || {
            let st = sh.server.client().unwrap().stats(TIMEOUT).unwrap();
            st.engine.context_version != old_version
                && st.instances[0].pid.is_some_and(|p| p != old_pid)
                && st.instances[0].state == "idle"
        },
    );
    let b = sh
        .server
        .client()
        .unwrap()
        .ask("When do releases happen now?", TIMEOUT)
        .unwrap();
    assert_ne!(b.context_version, old_version);
    let meta = b.backend.unwrap();
    assert_ne!(meta["session_id"], a.backend.unwrap()["session_id"]);
    let last = sh.api.calls().pop().unwrap();
    let sys = system_text(&last);
    assert!(sys.contains("NOTES.md (5 lines)"), "{sys}");
    assert!(sys.contains(&b.context_version), "{sys}");
}

#[test]
fn max_session_tokens_recycles_a_grown_session() {
    let _slot = cli_slot();
    let env = Env::new();
    let sh = shard(&env, &["--max-session-tokens", "10"]);
    let first = instance_pid(&sh.server);
    sh.server
        .client()
        .unwrap()
        .ask("When do releases happen?", TIMEOUT)
        .unwrap();
    wait_until("a fresh instance after the grown session", TIMEOUT, || {
        let st = sh.server.client().unwrap().stats(TIMEOUT).unwrap();
        st.instances[0].pid.is_some_and(|p| p != first) && st.instances[0].state == "idle"
    });
    assert!(
        sh.server.stderr().contains("--max-session-tokens 10"),
        "{}",
        sh.server.stderr()
    );
}

#[test]
fn kill_9_of_the_cli_and_sigterm_of_the_server_leave_nothing_behind() {
    let _slot = cli_slot();
    let env = Env::new();
    let mut sh = shard(&env, &[]);
    let pid = instance_pid(&sh.server);
    // SAFETY: killing the CLI instance our server started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    wait_until("a new instance", TIMEOUT, || {
        let st = sh.server.client().unwrap().stats(TIMEOUT).unwrap();
        st.instances[0].pid.is_some_and(|p| p != pid) && st.instances[0].state == "idle"
    });
    let a = sh
        .server
        .client()
        .unwrap()
        .ask("How many entries does the cache hold?", TIMEOUT)
        .unwrap();
    assert!(a.answer.contains("64"), "{}", a.answer);
    let kids: Vec<i32> = children_of(sh.server.pid())
        .into_iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(kids.len(), 1, "{kids:?}");
    sh.server.signal(libc::SIGTERM);
    assert_eq!(
        sh.server.wait_exit(TIMEOUT),
        Some(0),
        "{}",
        sh.server.stderr()
    );
    for k in kids {
        assert!(!alive(k), "instance {k} outlived the server");
    }
    // No system prompt file is left in the server's directory.
    let dir = env.runtime().join("cc");
    let left: Vec<_> = std::fs::read_dir(&dir)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        !left
            .iter()
            .any(|n| n.to_string_lossy().contains("system-prompt")),
        "{left:?}"
    );
}

/// Start a claude server that cannot start its instance (`args` after the
/// common ones); wait until the crash-loop breaker trips; its reason.
fn tripped(
    env: &Env,
    name: &str,
    args: &[&str],
    vars: &[(&str, String)],
) -> (common::Server, String) {
    let ctx = context(env);
    let mut all = vec![
        "--backend",
        "claude",
        "--context",
        &ctx,
        "--workers",
        "1",
        "--restart-limit",
        "2",
        "--restart-window",
        "600",
    ];
    all.extend_from_slice(args);
    let s = env.server_env(name, &all, vars);
    wait_until("the breaker trips", TIMEOUT, || {
        let st = s.client().unwrap().stats(TIMEOUT).unwrap();
        st.engine.down
            && st.instances[0]
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("crash loop"))
    });
    let why = s.client().unwrap().stats(TIMEOUT).unwrap().instances[0]
        .last_error
        .clone()
        .unwrap();
    (s, why)
}

#[test]
fn a_cli_that_cannot_start_trips_the_breaker_and_status_says_why() {
    let _slot = cli_slot();
    let env = Env::new();
    let api = FakeApi::start(&env);
    // Without --verbose the CLI refuses stream-json output and exits.
    let (s, why) = tripped(
        &env,
        "bad",
        &[
            "--",
            claude_bin(),
            "-p",
            "--input-format",
            "stream-json",
            "--output-format",
            "stream-json",
        ],
        &api.vars(&env),
    );
    assert!(why.contains("--verbose"), "{why}");
    let msg = engine_error(&s, "anything?");
    assert!(msg.contains("--verbose"), "{msg}");
    let out = env.at("bad", &["status"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("down") && text.contains("--verbose"),
        "{text}"
    );
    let doc = env
        .cmd("autopoll")
        .args([
            "doctor",
            "--name",
            "bad",
            "--runtime-dir",
            path_str(&env.runtime()),
        ])
        .env_remove("AUTOPOLL_DB")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&doc.stdout);
    assert!(text.contains("--verbose"), "{text}");
    assert!(
        api.calls().is_empty(),
        "a CLI that cannot start called the API"
    );
}

#[test]
fn spawn_parses_the_cli_json_result_and_keeps_its_error_message() {
    let _slot = cli_slot();
    let env = Env::new();
    let api = FakeApi::start(&env);
    let ctx = context(&env);
    let s = env.server_env(
        "sp",
        &[
            "--backend",
            "spawn",
            "--context",
            &ctx,
            "--workers",
            "1",
            "--",
            claude_bin(),
            "-p",
            "--output-format",
            "json",
            "--model",
            "haiku",
            "--tools",
            "Read,Grep,Glob",
            "--no-session-persistence",
        ],
        &api.vars(&env),
    );
    let a = s
        .client()
        .unwrap()
        .ask("How many entries does the cache hold?", TIMEOUT)
        .unwrap();
    assert!(a.answer.contains("64"), "{}", a.answer);
    assert!(!a.answer.trim_start().starts_with('{'), "{}", a.answer);
    let m = a.backend.unwrap();
    assert!(m["cost_usd"].as_f64().unwrap() > 0.0, "{m}");
    api.mode("500", None);
    let msg = engine_error(&s, "How many entries does the cache hold?");
    assert!(msg.contains("API error 500"), "{msg}");
}

#[test]
fn retry_events_do_not_feed_the_watchdog() {
    let _slot = cli_slot();
    let env = Env::new();
    // A generous retry budget: only the watchdog can end this question.
    let sh = shard(&env, &["--claude-retries", "10", "--watchdog", "2.5"]);
    sh.api.mode("500", None);
    match sh.server.client().unwrap().ask(
        "How many entries does the cache hold?",
        Duration::from_secs(90),
    ) {
        Err(ClientError::Server(r)) => {
            assert_eq!(r.code, ErrorCode::Timeout, "{}", r.message);
            assert!(r.message.contains("watchdog"), "{}", r.message);
            // The CLI announces each retry as the call fails, then waits
            // about 0.5, 1.1, 2.2, 4.3 s: by 2.5 s three were announced (at
            // about 0, 0.5 and 1.6 s). Had they fed the watchdog, the fourth
            // (about 3.8 s in) would have come before it fired, and been
            // counted.
            let n: u32 = r
                .message
                .split(" after ")
                .nth(1)
                .and_then(|t| t.split(' ').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no retry count in {:?}", r.message));
            assert!((1..=3).contains(&n), "{n} retries: {}", r.message);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn past_the_retry_budget_the_turn_is_interrupted_and_the_instance_kept() {
    let _slot = cli_slot();
    let env = Env::new();
    let api = FakeApi::start(&env);
    let ctx = context(&env);
    // The CLI is told (by the command's own environment) to retry more
    // than autopoll's budget allows: autopoll gives up and interrupts.
    let s = env.server_env(
        "int",
        &[
            "--backend",
            "claude",
            "--context",
            &ctx,
            "--workers",
            "1",
            "--claude-retries",
            "1",
            "--",
            "env",
            "CLAUDE_CODE_MAX_RETRIES=8",
            claude_bin(),
            "-p",
            "--input-format",
            "stream-json",
            "--output-format",
            "stream-json",
            "--verbose",
            "--model",
            "haiku",
            "--tools",
            "Read,Grep,Glob",
        ],
        &api.vars(&env),
    );
    wait_ready(&s);
    let pid = instance_pid(&s);
    api.mode("500", None);
    let msg = engine_error(&s, "How many entries does the cache hold?");
    assert!(msg.contains("API error 500"), "{msg}");
    assert!(msg.contains("interrupted"), "{msg}");
    api.mode("ok", None);
    // The interrupted turn's end is not taken for the next answers.
    for q in [
        "How many entries does the cache hold?",
        "When do releases happen?",
    ] {
        let a = s.client().unwrap().ask(q, TIMEOUT).unwrap();
        let want = if q.contains("cache") { "64" } else { "Fridays" };
        assert!(a.answer.contains(want), "{q}: {}", a.answer);
    }
    assert_eq!(instance_pid(&s), pid, "the instance was replaced");
}

#[test]
fn context_outside_the_working_directory_is_readable() {
    let _slot = cli_slot();
    let env = Env::new();
    let elsewhere = tempfile::tempdir().unwrap();
    let ctx = notes_in(&elsewhere.path().join("notes"));
    let sh = shard_over(&env, &ctx, &[]);
    let a = sh
        .server
        .client()
        .unwrap()
        .ask("How many entries does the cache hold?", TIMEOUT)
        .unwrap();
    assert!(a.answer.contains("64"), "{}", a.answer);
    assert!(!a.answer.contains("Could not read"), "{}", a.answer);
    // The Read really ran on the file outside the working directory.
    let calls = sh.api.calls();
    let results: Vec<String> = calls
        .iter()
        .flat_map(|c| {
            c["body"]["messages"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .flat_map(|m| m["content"].as_array().cloned().unwrap_or_default())
        .filter(|b| b["type"] == "tool_result")
        .map(|b| b.to_string())
        .collect();
    assert!(
        results
            .iter()
            .any(|r| r.contains("The cache holds 64 entries")),
        "{results:?}"
    );
    assert!(
        results.iter().all(|r| !r.contains("\"is_error\":true")),
        "{results:?}"
    );
}

#[test]
fn a_cli_without_credentials_is_down_and_says_how_to_give_it_a_key() {
    let _slot = cli_slot();
    let env = Env::new();
    let api = FakeApi::start(&env);
    let mut vars: Vec<(&str, String)> = api
        .vars(&env)
        .into_iter()
        .filter(|(k, _)| *k != "ANTHROPIC_API_KEY")
        .collect();
    // The harness's environment may hold a real key: make sure it is not seen.
    vars.push(("ANTHROPIC_API_KEY", String::new()));
    let (s, why) = tripped(&env, "nokey", &["--claude-bin", claude_bin()], &vars);
    assert!(
        why.contains("no credentials") && why.contains("ANTHROPIC_API_KEY"),
        "{why}"
    );
    let msg = engine_error(&s, "anything?");
    assert!(msg.contains("ANTHROPIC_API_KEY"), "{msg}");
    assert!(
        api.calls().is_empty(),
        "a CLI without credentials called the API"
    );
}

/// A script standing in front of the real CLI: its first `fails` starts
/// exit (after `delay` seconds) with a message on stderr, the later ones
/// exec the CLI.
fn flaky_cli(env: &Env, fails: u32, delay: u32) -> String {
    let counter = env.path("starts");
    let script = env.path("flaky-claude.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nn=$(cat {c} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {c}\n\
             if [ $n -le {fails} ]; then sleep {delay}; echo \"flaky: start $n refused\" >&2; exit 1; fi\n\
             exec {cli} \"$@\"\n",
            c = path_str(&counter),
            cli = claude_bin(),
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    path_str(&script).to_string()
}

#[test]
fn a_question_while_no_instance_can_start_fails_at_once_with_the_reason() {
    let _slot = cli_slot();
    let env = Env::new();
    let api = FakeApi::start(&env);
    let ctx = context(&env);
    // Each start takes a second to fail, so the question arrives while
    // the instance is still starting.
    let bin = flaky_cli(&env, 1000, 1);
    let s = env.server_env(
        "never",
        &[
            "--backend",
            "claude",
            "--claude-bin",
            &bin,
            "--context",
            &ctx,
            "--workers",
            "1",
            "--request-timeout",
            "120",
        ],
        &api.vars(&env),
    );
    // Whatever the breaker is doing, the asker hears why, long before its
    // 120 s deadline (regression: questions waited out their deadline).
    match s
        .client()
        .unwrap()
        .ask("anything?", Duration::from_secs(120))
    {
        Err(ClientError::Server(r)) => {
            assert_eq!(r.code, ErrorCode::Engine, "{}", r.message);
            assert!(r.message.contains("flaky: start"), "{}", r.message);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_instance_that_starts_after_failures_is_idle_with_no_stale_error() {
    let _slot = cli_slot();
    let env = Env::new();
    let api = FakeApi::start(&env);
    let ctx = context(&env);
    let bin = flaky_cli(&env, 2, 0);
    let s = env.server_env(
        "flaky",
        &[
            "--backend",
            "claude",
            "--claude-bin",
            &bin,
            "--context",
            &ctx,
            "--workers",
            "1",
        ],
        &api.vars(&env),
    );
    wait_ready(&s);
    let st = s.client().unwrap().stats(TIMEOUT).unwrap();
    let w = &st.instances[0];
    assert_eq!(w.state, "idle");
    assert_eq!(w.last_error, None, "{w:?}");
    assert!(!st.engine.down);
    let a = s
        .client()
        .unwrap()
        .ask("How many entries does the cache hold?", TIMEOUT)
        .unwrap();
    assert!(a.answer.contains("64"), "{}", a.answer);
}

/// The real Claude Code CLI with `autopoll mcp` in its `--mcp-config`: the
/// fake API answers the question by calling `mcp__autopoll__ask_shard`,
/// `autopoll mcp` asks the shard (a poller and a server with the built-in
/// engine) and returns the cited answer, which the CLI hands back to the
/// model and the model into its result.
#[test]
fn claude_code_asks_the_shard_through_autopoll_mcp_and_gets_the_cited_answer() {
    let _slot = cli_slot();
    let env = Env::new();
    let conv = env.conversation();
    let ctx = context(&env);
    let _server = env.server("mem", &["--context", &ctx]);
    let _poller = env.poller(&conv, "mem", &[]);
    let api = FakeApi::start(&env);
    let config = env.path("mcp.json");
    std::fs::write(
        &config,
        json!({"mcpServers": {"autopoll": {
            "command": env!("CARGO_BIN_EXE_autopoll"),
            "args": ["mcp", "--db", path_str(&env.db())],
            "env": {"RUST_LOG": "info"}
        }}})
        .to_string(),
    )
    .unwrap();
    let prompt = format!(
        "Ask the memory shard.\nconversation_id: {}\nsession_id: a\ntoken: {}\n\
         Question: How many entries does the cache hold?",
        conv.id, conv.token_a
    );
    let mut cmd = Command::new(claude_bin());
    cmd.args(["-p", &prompt, "--output-format", "json", "--model", "haiku"])
        .args(["--mcp-config", path_str(&config), "--strict-mcp-config"])
        .args(["--allowedTools", "mcp__autopoll__ask_shard"])
        .arg("--no-session-persistence")
        .current_dir(env.dir.path())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(env.path("cli.out")).unwrap())
        .stderr(std::fs::File::create(env.path("cli.err")).unwrap());
    for (k, v) in api.vars(&env) {
        if v.is_empty() {
            cmd.env_remove(k);
        } else {
            cmd.env(k, v);
        }
    }
    let mut child = cmd.spawn().unwrap();
    let read = |name: &str| std::fs::read_to_string(env.path(name)).unwrap_or_default();
    let code = common::wait_child_exit(&mut child, TIMEOUT * 4, "claude", || {
        format!("{}\n{}", read("cli.out"), read("cli.err"))
    });
    let out = read("cli.out");
    assert_eq!(code, Some(0), "{out}\n{}", read("cli.err"));
    let result: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let text = result["result"].as_str().unwrap_or_default();
    // The shard's answer and its citation came back through the tool.
    assert!(text.starts_with("The memory shard answered:"), "{result}");
    assert!(text.contains("64 entries"), "{result}");
    assert!(text.contains("NOTES.md:1-4"), "{result}");
    // Claude Code 2.1 hands the model a tool's structuredContent (JSON)
    // when there is one, else its text: either way the query_id is there.
    assert!(
        text.contains("\"query_id\":\"q-") || text.contains("query_id: q-"),
        "{result}"
    );
    // What the CLI sent: the MCP tool offered, then its result.
    let calls = api.calls();
    assert!(
        calls
            .iter()
            .any(|c| tool_names(c).contains("mcp__autopoll__ask_shard")),
        "the CLI never offered the MCP tool: {:?}",
        calls.iter().map(tool_names).collect::<Vec<_>>()
    );
    // ... and sent the shard's answer back to the model as the tool's result.
    let results: Vec<String> = calls
        .iter()
        .flat_map(|c| {
            c["body"]["messages"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .flat_map(|m| m["content"].as_array().cloned().unwrap_or_default())
        .filter(|b| b["type"] == "tool_result")
        .map(|b| b["content"].to_string())
        .collect();
    assert!(
        results.iter().any(|r| r.contains("64 entries")),
        "no tool result carried the answer: {results:?}"
    );
    // The question went through the bridge as a query and was answered once.
    let got = env.responses();
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].1["answer"].as_str().unwrap().contains("64 entries"));
}
