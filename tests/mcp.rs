//! `autopoll mcp` end to end with real clients: the official MCP Python SDK
//! (pinned in tests/mcp-client/requirements.txt, installed by
//! scripts/install-test-deps.sh) drives it over stdio through
//! tests/fixtures/mcp_client.py; the Python bridge fixture
//! (crates/bridge/tests/data/python_bridge.py) reads what it wrote and
//! writes what it reads; a poller and a server (built-in engine) answer
//! `ask_shard`. A raw-pipe test sends what no SDK would: malformed lines,
//! unknown methods, every protocol version.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Conversation, Env, TIMEOUT, describe, mcp_python, path_str, wait_until};
use serde_json::{Value, json};

const DOCS: &str = "# Notes

## Cache
We decided to keep the LRU cache at 64 entries.
Memory on the shard host is tight.

## Transport
Questions travel over named pipes, one private pair per client.
";

fn python_bridge() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("crates/bridge/tests/data/python_bridge.py")
        .to_string_lossy()
        .into_owned()
}

/// Run the Python bridge fixture; its JSON output (it must succeed).
fn py(args: &[&str]) -> Value {
    let out = Command::new("python3")
        .arg(python_bridge())
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python_bridge {args:?}: {}",
        describe(&out)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Run `plan` with the MCP Python SDK against `autopoll mcp --db <env's db>`;
/// returns the client's report. The server's stderr (RUST_LOG=info) goes to
/// `mcp.log` in the test dir.
fn sdk(env: &Env, plan: Value) -> Value {
    let mut plan = plan;
    plan["stderr"] = json!(path_str(&env.path("mcp.log")));
    let out = Command::new(mcp_python())
        .arg(common::fixture("mcp_client.py"))
        .arg(plan.to_string())
        .arg("--")
        .arg("/usr/bin/env")
        .arg("RUST_LOG=info")
        .arg(env!("CARGO_BIN_EXE_autopoll"))
        .args(["mcp", "--db", &env.db_arg()])
        .current_dir(env.dir.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the MCP client failed: {}\n--- server log\n{}",
        describe(&out),
        mcp_log(env)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("client printed no JSON ({e}): {}", describe(&out)))
}

fn mcp_log(env: &Env) -> String {
    std::fs::read_to_string(env.path("mcp.log")).unwrap_or_default()
}

fn auth(conv: &Conversation, s: &str) -> Value {
    json!({
        "conversation_id": conv.id,
        "session_id": s,
        "token": if s == "a" { &conv.token_a } else { &conv.token_b },
    })
}

fn with(mut base: Value, extra: Value) -> Value {
    for (k, v) in extra.as_object().unwrap() {
        base[k] = v.clone();
    }
    base
}

fn call(tool: &str, args: Value) -> Value {
    json!({"op": "call", "tool": tool, "args": args})
}

fn step(report: &Value, i: usize) -> &Value {
    &report["steps"][i]
}

fn ok_text(report: &Value, i: usize) -> &str {
    let s = step(report, i);
    assert_eq!(s["is_error"], false, "step {i} failed: {s}");
    s["text"].as_str().unwrap()
}

/// A conversation, a context file, a server on it and a poller for session b.
fn shard(env: &Env) -> (Conversation, common::Server, common::Poller) {
    let conv = env.conversation();
    let ctx = env.path("NOTES.md");
    std::fs::write(&ctx, DOCS).unwrap();
    let server = env.server("default", &["--context", path_str(&ctx)]);
    let poller = env.poller(&conv, "default", &[]);
    wait_until("the poller reports for session b", TIMEOUT, || {
        env.shard_status(&conv).is_some()
    });
    (conv, server, poller)
}

#[test]
fn the_sdk_lists_the_python_servers_tools_with_their_limits_and_ask_shard() {
    let env = Env::new();
    let r = sdk(&env, json!({"steps": [{"op": "list"}, {"op": "ping"}]}));
    assert_eq!(r["initialize"]["server_name"], "autopoll");
    // The SDK offers its newest handshake version; we answer with it.
    assert_eq!(r["initialize"]["protocol_version"], "2025-11-25");
    let tools = step(&r, 0)["tools"].as_array().unwrap();
    let by_name = |n: &str| {
        tools
            .iter()
            .find(|t| t["name"] == n)
            .unwrap_or_else(|| panic!("{n} not listed"))
    };
    let names: Vec<&str> = tools.iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "create_conversation",
            "send_to_partner",
            "check_messages",
            "update_my_status",
            "check_partner_status",
            "ask_shard",
            "shard_status"
        ]
    );
    assert!(
        !names
            .iter()
            .any(|n| n.contains("yolo") || n.contains("execute"))
    );
    let required = |n: &str| by_name(n)["input_schema"]["required"].clone();
    let auth3 = ["conversation_id", "session_id", "token"];
    assert_eq!(
        required("create_conversation"),
        json!(["my_role", "partner_role"])
    );
    assert_eq!(
        required("send_to_partner"),
        json!([auth3[0], auth3[1], auth3[2], "message"])
    );
    assert_eq!(required("check_messages"), json!(auth3));
    assert_eq!(
        required("update_my_status"),
        json!([auth3[0], auth3[1], auth3[2], "status"])
    );
    assert_eq!(required("check_partner_status"), json!(auth3));
    assert_eq!(
        required("ask_shard"),
        json!([auth3[0], auth3[1], auth3[2], "question"])
    );
    let send = &by_name("send_to_partner")["input_schema"]["properties"];
    assert_eq!(send["message"]["maxLength"], 50_000);
    assert_eq!(send["files_involved"]["maxItems"], 20);
    assert_eq!(
        send["action_type"]["enum"],
        json!(["question", "info", "proposal", "blocked", "complete"])
    );
    assert_eq!(send["conversation_id"]["pattern"], "^conv_[a-f0-9]{16}$");
    assert_eq!(send["token"]["minLength"], 64);
    assert_eq!(send["token"]["maxLength"], 64);
    let create = &by_name("create_conversation")["input_schema"]["properties"];
    assert_eq!(
        (
            create["my_role"]["minLength"].clone(),
            create["my_role"]["maxLength"].clone()
        ),
        (json!(3), json!(100))
    );
    assert_eq!(
        by_name("update_my_status")["input_schema"]["properties"]["status"]["enum"],
        json!(["working", "waiting", "blocked", "complete"])
    );
    assert!(by_name("ask_shard")["input_schema"]["properties"]["timeout_secs"].is_object());
    for t in tools {
        assert_eq!(t["output_schema"]["type"], "object", "{t}");
    }
    assert_eq!(step(&r, 1)["ok"], true);
}

#[test]
fn create_send_check_and_status_through_the_sdk_share_rows_with_the_python_bridge() {
    let env = Env::new();
    env.ok(&["bridge", "init"]);
    let db = path_str(&env.db()).to_string();
    let r = sdk(
        &env,
        json!({"steps": [
            call("create_conversation", json!({"my_role": "coordinator", "partner_role": "memory_shard"})),
            call("send_to_partner", json!({
                "conversation_id": "$0.structured.conversation_id", "session_id": "a",
                "token": "$0.structured.token", "message": "What about the cache? password=hunter2",
                "action_type": "question", "files_involved": ["NOTES.md", "src/lib.rs"]})),
            call("update_my_status", json!({
                "conversation_id": "$0.structured.conversation_id", "session_id": "a",
                "token": "$0.structured.token", "status": "waiting"})),
        ]}),
    );
    let text = ok_text(&r, 0);
    let s = &step(&r, 0)["structured"];
    let conv = Conversation {
        id: s["conversation_id"].as_str().unwrap().into(),
        token_a: s["token"].as_str().unwrap().into(),
        token_b: s["partner_token"].as_str().unwrap().into(),
    };
    for line in [
        format!("Conversation ID: {}", conv.id),
        format!("Your token (keep secret): {}", conv.token_a),
        format!("Partner token (share securely): {}", conv.token_b),
        format!("Expires: {}", s["expires_at"].as_str().unwrap()),
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line:?} not a line of {text}"
        );
    }
    assert!(ok_text(&r, 1).starts_with("Message sent to partner session"));
    assert!(ok_text(&r, 1).contains("redacted"), "{}", ok_text(&r, 1));
    assert_eq!(step(&r, 1)["structured"]["redacted"], true);
    assert_eq!(ok_text(&r, 2), "Status updated: waiting");

    // The Python bridge reads what autopoll mcp wrote, with its own token check.
    let got = py(&["check", &db, &conv.id, "b", &conv.token_b]);
    let m = &got.as_array().unwrap()[0];
    assert_eq!(got.as_array().unwrap().len(), 1, "{got}");
    assert_eq!(m["from"], "a");
    assert_eq!(m["message"], "What about the cache? PASSWORD_REDACTED");
    assert_eq!(
        m["metadata"],
        json!({"action_type": "question", "files_involved": ["NOTES.md", "src/lib.rs"]})
    );
    let ts = m["timestamp"].as_str().unwrap();
    assert!(
        autopoll_bridge::clock::parse(ts).is_ok() && !ts.ends_with('Z'),
        "{ts}"
    );
    let partner = py(&["partner", &db, &conv.id, "b", &conv.token_b]);
    assert_eq!(
        (partner["status"].clone(), partner["alive"].clone()),
        (json!("waiting"), json!(true))
    );
    // The rows: the audit actions and details the Python server writes.
    let b = env.bridge();
    let audit: Vec<(String, String)> = b
        .connection()
        .prepare("SELECT action, details FROM audit_log WHERE conversation_id = ?1 ORDER BY id")
        .unwrap()
        .query_map([&conv.id], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let actions: Vec<&str> = audit.iter().map(|(a, _)| a.as_str()).collect();
    assert_eq!(
        actions,
        ["create_conversation", "send_message", "get_messages"],
        "{audit:?}"
    );
    let d: Value = serde_json::from_str(&audit[0].1).unwrap();
    assert_eq!(d, json!({"roles": ["coordinator", "memory_shard"]}));
    let d: Value = serde_json::from_str(&audit[1].1).unwrap();
    assert_eq!(
        d,
        json!({"to": "b", "message_length": "What about the cache? PASSWORD_REDACTED".len(), "redacted": true})
    );

    // autopoll mcp reads what the Python bridge wrote.
    py(&[
        "send",
        &db,
        &conv.id,
        "b",
        &conv.token_b,
        "The cache holds 64 entries.",
        "info",
    ]);
    py(&["status", &db, &conv.id, "b", &conv.token_b, "working"]);
    let a = auth(&conv, "a");
    let r = sdk(
        &env,
        json!({"steps": [
            call("check_messages", a.clone()),
            call("check_messages", a.clone()),
            call("check_partner_status", a.clone()),
        ]}),
    );
    let text = ok_text(&r, 0);
    assert!(text.starts_with("1 new message(s):"), "{text}");
    for line in [
        "From: Session b",
        "Type: info",
        "Message:",
        "The cache holds 64 entries.",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line:?} not a line of {text}"
        );
    }
    assert!(text.lines().any(|l| l.starts_with("Time: 20")), "{text}");
    assert!(text.lines().any(|l| l == "=".repeat(60)), "{text}");
    let msgs = &step(&r, 0)["structured"]["messages"];
    assert_eq!(msgs[0]["from"], "b");
    assert_eq!(msgs[0]["metadata"]["action_type"], "info");
    assert_eq!(ok_text(&r, 1), "No new messages");
    let text = ok_text(&r, 2);
    for line in ["Partner Session B", "Status: working", "Alive: True"] {
        assert!(
            text.lines().any(|l| l == line),
            "{line:?} not a line of {text}"
        );
    }
    assert_eq!(step(&r, 2)["structured"]["alive"], true);
}

#[test]
fn ask_shard_returns_the_cited_answer_in_one_call_and_marks_only_its_response_read() {
    let env = Env::new();
    let (conv, _server, _poller) = shard(&env);
    let db = path_str(&env.db()).to_string();
    // An unread message for session a that ask_shard must leave alone.
    py(&[
        "send",
        &db,
        &conv.id,
        "b",
        &conv.token_b,
        "unrelated note",
        "info",
    ]);
    let a = auth(&conv, "a");
    let r = sdk(
        &env,
        json!({"steps": [
            call("ask_shard", with(a.clone(), json!({"question": "How big is the LRU cache?", "timeout_secs": 30}))),
            call("shard_status", a.clone()),
            call("check_messages", a.clone()),
        ]}),
    );
    let text = ok_text(&r, 0);
    let s = &step(&r, 0)["structured"];
    assert!(s["answer"].as_str().unwrap().contains("64 entries"), "{s}");
    assert!(text.contains("64 entries"), "{text}");
    let sources = s["sources"].as_array().unwrap();
    assert!(!sources.is_empty(), "{s}");
    for src in sources {
        let src = src.as_str().unwrap();
        assert!(src.contains("NOTES.md:"), "{src}");
        assert!(text.lines().any(|l| l == src), "{src} not a line of {text}");
    }
    let qid = s["query_id"].as_str().unwrap();
    assert!(
        text.lines().any(|l| l == format!("query_id: {qid}")),
        "{text}"
    );
    assert!(
        s["context_version"].as_str().is_some_and(|v| !v.is_empty()),
        "{s}"
    );
    assert!(s["elapsed_ms"].as_f64().unwrap() > 0.0);
    // shard_status: the poller's heartbeat, nothing queued, a recent answer.
    let st = &step(&r, 1)["structured"];
    assert_eq!(st["alive"], true, "{st}");
    assert_eq!(st["queue_depth"], 0, "{st}");
    assert!(st["last_answer_at"].is_string(), "{st}");
    assert!(ok_text(&r, 1).contains("Alive: True"));
    // Only the response was marked read: the note is still there.
    let text = ok_text(&r, 2);
    assert!(text.starts_with("1 new message(s):"), "{text}");
    assert!(
        text.contains("unrelated note") && !text.contains(qid),
        "{text}"
    );
    // The query and its response are ordinary rows.
    let b = env.bridge();
    let (qmeta, read): (String, i64) = b
        .connection()
        .query_row(
            "SELECT metadata, read FROM messages WHERE to_session = 'b' AND message LIKE ?1",
            [format!("%{qid}%")],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&qmeta).unwrap()["action_type"],
        "question"
    );
    assert_eq!(read, 1);
}

#[test]
fn an_ask_shard_timeout_leaves_the_query_queued_and_check_messages_finds_the_late_answer() {
    let env = Env::new();
    let conv = env.conversation();
    let a = auth(&conv, "a");
    let r = sdk(
        &env,
        json!({"steps": [
            call("ask_shard", with(a.clone(), json!({"question": "How big is the LRU cache?", "timeout_secs": 0.5}))),
            call("shard_status", a.clone()),
        ]}),
    );
    let s = step(&r, 0);
    assert_eq!(s["is_error"], true, "{s}");
    let text = s["text"].as_str().unwrap();
    let qid = text
        .split("query_id ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .unwrap_or_else(|| panic!("no query_id in {text}"));
    assert!(qid.starts_with("q-"), "{text}");
    assert!(text.contains("check_messages"), "{text}");
    assert_eq!(step(&r, 1)["structured"]["queue_depth"], 1);
    assert_eq!(step(&r, 1)["structured"]["alive"], false);
    // The shard comes up late and answers the queued question.
    let ctx = env.path("NOTES.md");
    std::fs::write(&ctx, DOCS).unwrap();
    let _server = env.server("default", &["--context", path_str(&ctx)]);
    let _poller = env.poller(&conv, "default", &[]);
    wait_until("the late answer is written", TIMEOUT, || {
        env.responses().iter().any(|(q, _)| q == qid)
    });
    let r = sdk(&env, json!({"steps": [call("check_messages", a)]}));
    let text = ok_text(&r, 0);
    assert!(text.contains(&format!("\"query_id\":\"{qid}\"")), "{text}");
    assert!(text.contains("Type: response"), "{text}");
    assert!(text.contains("64 entries"), "{text}");
}

#[test]
fn a_cancelled_ask_shard_stops_waiting_and_the_server_goes_on() {
    let env = Env::new();
    let conv = env.conversation();
    let a = auth(&conv, "a");
    let r = sdk(
        &env,
        json!({"steps": [
            {"op": "call", "tool": "ask_shard", "cancel_after": 1.0,
             "args": with(a.clone(), json!({"question": "Anyone there?", "timeout_secs": 600}))},
            {"op": "ping"},
            call("shard_status", a.clone()),
        ]}),
    );
    assert_eq!(step(&r, 0)["cancelled"], true, "{r}");
    assert_eq!(step(&r, 1)["ok"], true);
    assert_eq!(step(&r, 2)["structured"]["queue_depth"], 1);
    // The waiting call ended on the cancellation, not at its 600 s timeout
    // (the client has already closed the server and we are here).
    let log = mcp_log(&env);
    assert!(log.contains("event=call_cancelled"), "{log}");
    assert!(log.contains("event=ask_cancelled"), "{log}");
    assert!(!log.contains("event=ask_timed_out"), "{log}");
    // The question stays queued for the shard.
    let unread: i64 = env
        .bridge()
        .connection()
        .query_row(
            "SELECT count(*) FROM messages WHERE to_session = 'b' AND read = 0",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(unread, 1);
}

#[test]
fn bad_arguments_and_wrong_tokens_are_tool_errors_that_say_what_to_fix() {
    let env = Env::new();
    let conv = env.conversation();
    let a = auth(&conv, "a");
    let cases: Vec<(Value, &str)> = vec![
        (
            call(
                "create_conversation",
                json!({"my_role": "ab", "partner_role": "shard"}),
            ),
            "`my_role` must be 3 to 100 characters",
        ),
        (
            call("create_conversation", json!({"my_role": "coordinator"})),
            "`partner_role` is required",
        ),
        (
            call(
                "send_to_partner",
                with(a.clone(), json!({"message": "x".repeat(50_001)})),
            ),
            "at most 50000",
        ),
        (
            call(
                "send_to_partner",
                with(
                    a.clone(),
                    json!({"message": "x", "action_type": "execute_command"}),
                ),
            ),
            "`action_type` must be one of",
        ),
        (
            call(
                "send_to_partner",
                with(
                    a.clone(),
                    json!({"message": "x", "files_involved": vec!["f"; 21]}),
                ),
            ),
            "at most 20",
        ),
        (
            call("send_to_partner", with(a.clone(), json!({"message": 42}))),
            "`message` must be a string",
        ),
        (
            call(
                "check_messages",
                with(a.clone(), json!({"conversation_id": "conv_123"})),
            ),
            "`conversation_id` must be `conv_`",
        ),
        (
            call(
                "check_messages",
                with(a.clone(), json!({"session_id": "c"})),
            ),
            "`session_id` must be \"a\" or \"b\"",
        ),
        (
            call("check_messages", with(a.clone(), json!({"token": "abc"}))),
            "exactly 64 characters",
        ),
        (
            call(
                "check_messages",
                with(a.clone(), json!({"token": conv.token_b})),
            ),
            "Authentication failed: Invalid session token",
        ),
        (
            call(
                "check_messages",
                with(
                    a.clone(),
                    json!({"conversation_id": "conv_0123456789abcdef"}),
                ),
            ),
            "is not in this bridge file",
        ),
        (
            call(
                "update_my_status",
                with(a.clone(), json!({"status": "asleep"})),
            ),
            "`status` must be one of working, waiting, blocked, complete",
        ),
        (
            call("ask_shard", with(a.clone(), json!({"question": "  "}))),
            "`question` is empty",
        ),
        (
            call(
                "ask_shard",
                with(a.clone(), json!({"question": "q", "timeout_secs": "soon"})),
            ),
            "`timeout_secs` must be a number",
        ),
        (
            call(
                "shard_status",
                with(a.clone(), json!({"token": "f".repeat(64)})),
            ),
            "Authentication failed",
        ),
    ];
    let mut steps: Vec<Value> = cases.iter().map(|(c, _)| c.clone()).collect();
    steps.push(
        json!({"op": "call_raw_error", "tool": "execute_command", "args": {"command": "id"}}),
    );
    steps.push(call("check_messages", a.clone()));
    let r = sdk(&env, json!({ "steps": steps }));
    for (i, (c, want)) in cases.iter().enumerate() {
        let s = step(&r, i);
        assert_eq!(s["is_error"], true, "{c} gave {s}");
        let text = s["text"].as_str().unwrap();
        assert!(text.contains(want), "{c}: want {want:?} in {text}");
        assert!(
            text.starts_with("Error: ") || text.starts_with("Authentication failed: "),
            "{text}"
        );
    }
    let n = cases.len();
    assert_eq!(step(&r, n)["error_code"], -32602, "{}", step(&r, n));
    // The server lived through all of it.
    assert_eq!(ok_text(&r, n + 1), "No new messages");
    // Nothing was sent by the failed calls.
    let sent: i64 = env
        .bridge()
        .connection()
        .query_row("SELECT count(*) FROM messages", [], |r| r.get(0))
        .unwrap();
    assert_eq!(sent, 0);
}

/// `autopoll mcp` on raw pipes: what we write, line by line, and what it answers.
struct Raw {
    child: common::KillOnDrop,
    stdin: Option<std::process::ChildStdin>,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Raw {
    fn start(env: &Env) -> Raw {
        Raw::start_with(env, &[])
    }

    fn start_with(env: &Env, extra: &[&str]) -> Raw {
        let mut child = env
            .cmd("autopoll")
            .args(["mcp", "--db", &env.db_arg()])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(env.path("raw.log")).unwrap())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { return };
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        Raw {
            child: common::KillOnDrop(child),
            stdin,
            lines,
        }
    }

    fn write(&mut self, line: &str) {
        let w = self.stdin.as_mut().unwrap();
        w.write_all(line.as_bytes()).unwrap();
        w.write_all(b"\n").unwrap();
        w.flush().unwrap();
    }

    /// The next message it writes (bounded wait); each must be one JSON line.
    fn next(&mut self) -> Value {
        let l = self
            .lines
            .recv_timeout(TIMEOUT)
            .unwrap_or_else(|e| panic!("no reply from autopoll mcp: {e}"));
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("not one JSON line ({e}): {l:?}"))
    }

    fn ask(&mut self, line: &str) -> Value {
        self.write(line);
        self.next()
    }
}

#[test]
fn raw_lines_malformed_messages_unknown_methods_and_protocol_versions() {
    let env = Env::new();
    let conv = env.conversation();
    let mut raw = Raw::start(&env);
    // Version negotiation: each version clients send is answered as asked,
    // anything else with our newest.
    for (asked, answered) in [
        ("2024-11-05", "2024-11-05"),
        ("2025-03-26", "2025-03-26"),
        ("2025-06-18", "2025-06-18"),
        ("2025-11-25", "2025-11-25"),
        ("2099-01-01", "2025-11-25"),
    ] {
        let r = raw.ask(&json!({"jsonrpc": "2.0", "id": asked, "method": "initialize",
            "params": {"protocolVersion": asked, "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}}).to_string());
        assert_eq!(r["id"], asked);
        assert_eq!(r["result"]["protocolVersion"], answered, "{r}");
        assert!(r["result"]["capabilities"]["tools"].is_object(), "{r}");
    }
    raw.write(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#);
    let code = |v: &Value| v["error"]["code"].as_i64().unwrap_or(0);
    let r = raw.ask("this is not json");
    assert_eq!((code(&r), r["id"].clone()), (-32700, Value::Null), "{r}");
    let r = raw.ask(r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"#);
    assert_eq!(code(&r), -32700, "{r}");
    let r = raw.ask("[]");
    assert_eq!(code(&r), -32600, "{r}");
    let r = raw.ask(r#"{"jsonrpc":"1.0","id":8,"method":"ping"}"#);
    assert_eq!((code(&r), r["id"].clone()), (-32600, json!(8)), "{r}");
    let r = raw.ask(r#"{"jsonrpc":"2.0","id":9}"#);
    assert_eq!(code(&r), -32600, "{r}");
    let r = raw.ask(r#"{"jsonrpc":"2.0","id":10,"method":"resources/list"}"#);
    assert_eq!((code(&r), r["id"].clone()), (-32601, json!(10)), "{r}");
    let r = raw.ask(r#"{"jsonrpc":"2.0","id":11,"method":"server/discover","params":{}}"#);
    assert_eq!(code(&r), -32601, "{r}");
    let r = raw.ask(r#"{"jsonrpc":"2.0","id":12,"method":"tools/call","params":{}}"#);
    assert_eq!(code(&r), -32602, "{r}");
    let r = raw.ask(r#"{"jsonrpc":"2.0","id":13,"method":"initialize","params":{}}"#);
    assert_eq!(code(&r), -32602, "{r}");
    let r = raw.ask(r#"{"jsonrpc":"2.0","id":14,"method":"tools/call","params":{"name":"check_messages","arguments":[1]}}"#);
    assert_eq!(r["result"]["isError"], true, "{r}");
    // An unknown notification and a stray response get no reply; the ping after them does.
    raw.write(r#"{"jsonrpc":"2.0","method":"notifications/whatever"}"#);
    raw.write(r#"{"jsonrpc":"2.0","id":"x","result":{}}"#);
    let r = raw.ask(r#"{"jsonrpc":"2.0","id":15,"method":"ping"}"#);
    assert_eq!(r, json!({"jsonrpc": "2.0", "id": 15, "result": {}}));
    // Under 2024-11-05 (the last initialize above was answered 2025-11-25;
    // a new one switches) tools carry no outputSchema.
    raw.ask(&json!({"jsonrpc": "2.0", "id": 16, "method": "initialize",
        "params": {"protocolVersion": "2024-11-05", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}}).to_string());
    let r = raw.ask(r#"{"jsonrpc":"2.0","id":17,"method":"tools/list"}"#);
    let tools = r["result"]["tools"].as_array().unwrap();
    assert_eq!(tools.len(), 7);
    assert!(tools.iter().all(|t| t.get("outputSchema").is_none()), "{r}");
    // A tool call still works after all that, with a string id.
    let r = raw.ask(
        &json!({"jsonrpc": "2.0", "id": "c1", "method": "tools/call",
        "params": {"name": "check_messages", "arguments": auth(&conv, "a")}})
        .to_string(),
    );
    assert_eq!(r["id"], "c1");
    assert_eq!(r["result"]["content"][0]["text"], "No new messages", "{r}");
    assert!(r["result"].get("structuredContent").is_none(), "{r}");
    // End of input ends the server cleanly.
    raw.stdin.take();
    let code = common::wait_child_exit(&mut raw.child.0, TIMEOUT, "autopoll mcp", || {
        std::fs::read_to_string(env.path("raw.log")).unwrap_or_default()
    });
    assert_eq!(code, Some(0));
}

/// Voluntary context switches of every thread of `pid` (each wake-up from a
/// sleep is one).
fn wakeups(pid: u32) -> u64 {
    let mut n = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        n += status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    n
}

#[test]
fn a_waiting_ask_shard_sleeps_until_the_answer_is_committed() {
    let env = Env::new();
    let conv = env.conversation();
    let mut raw = Raw::start(&env);
    raw.ask(&json!({"jsonrpc": "2.0", "id": 0, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}}).to_string());
    raw.write(
        &json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
        "name": "ask_shard", "arguments": with(auth(&conv, "a"), json!({"question": "cache?", "timeout_secs": 600}))}})
        .to_string(),
    );
    let b = env.bridge();
    let query = || -> Option<(i64, String)> {
        b.connection()
            .query_row(
                "SELECT id, message FROM messages WHERE to_session = 'b'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .ok()
    };
    wait_until("the query is in the bridge", TIMEOUT, || query().is_some());
    let (_, text) = query().unwrap();
    let q: Value = serde_json::from_str(&text).unwrap();
    let qid = q["query_id"].as_str().unwrap().to_string();
    // Waiting: no polling loop. A 5 ms loop would wake ~400 times in 2 s;
    // the watch's 1 s folder check and the waiter's 2 s safety net a few.
    let pid = raw.child.0.id();
    let before = wakeups(pid);
    std::thread::sleep(Duration::from_secs(2));
    let woke = wakeups(pid) - before;
    assert!(
        woke < 40,
        "autopoll mcp woke {woke} times in 2 s while waiting"
    );
    // Another query's response first: not ours, left unread.
    let mut w = env.bridge();
    let other = r#"{"type":"response","query_id":"q-someone-else","answer":"no","sources":[]}"#;
    w.send(
        &conv.id,
        autopoll_bridge::Session::B,
        &conv.token_b,
        other,
        Some(&autopoll_bridge::shard::response_metadata()),
    )
    .unwrap();
    let ours = json!({"type": "response", "query_id": qid, "answer": "64 entries",
        "sources": ["NOTES.md:4-4"], "context_version": "v1"})
    .to_string();
    w.send(
        &conv.id,
        autopoll_bridge::Session::B,
        &conv.token_b,
        &ours,
        Some(&autopoll_bridge::shard::response_metadata()),
    )
    .unwrap();
    let r = raw.next();
    assert_eq!(r["id"], 1, "{r}");
    let s = &r["result"]["structuredContent"];
    assert_eq!(
        (
            s["answer"].clone(),
            s["sources"].clone(),
            s["context_version"].clone()
        ),
        (json!("64 entries"), json!(["NOTES.md:4-4"]), json!("v1")),
        "{r}"
    );
    let unread: Vec<String> = b
        .connection()
        .prepare("SELECT message FROM messages WHERE to_session = 'a' AND read = 0")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(unread, [other.to_string()]);
}

#[test]
fn a_file_that_is_not_a_bridge_is_refused_before_serving_and_left_unchanged() {
    let env = Env::new();
    let other = env.path("other.db");
    let c = rusqlite::Connection::open(&other).unwrap();
    c.execute_batch("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT);")
        .unwrap();
    drop(c);
    let before = std::fs::read(&other).unwrap();
    let out = env
        .cmd("autopoll")
        .args(["mcp", "--db", path_str(&other)])
        .output()
        .unwrap();
    common::assert_one_line_error(&out, 7, "is not a bridge file");
    assert!(out.stdout.is_empty(), "{}", describe(&out));
    assert_eq!(std::fs::read(&other).unwrap(), before);
}

#[test]
fn while_an_ask_shard_waits_ping_is_answered_the_call_limit_holds_and_a_cancel_stops_it() {
    let env = Env::new();
    let conv = env.conversation();
    let mut raw = Raw::start_with(&env, &["--max-calls", "1"]);
    raw.ask(&json!({"jsonrpc": "2.0", "id": 0, "method": "initialize",
        "params": {"protocolVersion": "2025-03-26", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}}).to_string());
    let ask = |id: &str| {
        json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {
            "name": "ask_shard", "arguments": with(auth(&conv, "a"), json!({"question": "cache?", "timeout_secs": 600}))}})
        .to_string()
    };
    raw.write(&ask("wait-1"));
    let log = || std::fs::read_to_string(env.path("raw.log")).unwrap_or_default();
    wait_until("the first ask_shard waits", TIMEOUT, || {
        log().contains("event=query_sent")
    });
    // Answered at once while the call waits.
    let r = raw.ask(r#"{"jsonrpc":"2.0","id":"p","method":"ping"}"#);
    assert_eq!(r, json!({"jsonrpc": "2.0", "id": "p", "result": {}}));
    // One call at a time: the second is refused with a result saying why.
    let r = raw.ask(&ask("wait-2"));
    assert_eq!(r["id"], "wait-2");
    assert_eq!(r["result"]["isError"], true, "{r}");
    assert!(
        r["result"]["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("already running"),
        "{r}"
    );
    // The same id twice while it runs is a protocol error.
    let r = raw.ask(&ask("wait-1"));
    assert_eq!(r["error"]["code"], -32600, "{r}");
    // Cancelled: it stops waiting and sends no reply; the next reply is the ping's.
    raw.write(r#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":"wait-1","reason":"user"}}"#);
    wait_until("the cancelled call ends", TIMEOUT, || {
        log().contains("event=ask_cancelled")
    });
    let r = raw.ask(r#"{"jsonrpc":"2.0","id":"p2","method":"ping"}"#);
    assert_eq!(r["id"], "p2", "a reply to the cancelled call came: {r}");
    // Its slot is free again (the cancelled call sends nothing to wait for:
    // ask until the limit no longer refuses).
    let status = json!({"jsonrpc": "2.0", "id": "c", "method": "tools/call",
        "params": {"name": "shard_status", "arguments": auth(&conv, "a")}})
    .to_string();
    let mut r = Value::Null;
    wait_until("the cancelled call's slot is free", TIMEOUT, || {
        r = raw.ask(&status);
        r["result"]["isError"] == false
    });
    assert_eq!(
        r["result"]["content"][0]["text"]
            .as_str()
            .unwrap()
            .lines()
            .nth(1),
        Some("Queue depth: 1 unread message(s) to session b (0 claimed by a poller)"),
        "{r}"
    );
}

/// Regression: a call used to leave the running set only after its reply
/// was written, so a client sending its next call on reading the reply
/// could be refused by the limit (or told its id was in use).
#[test]
fn a_call_sent_on_reading_the_previous_reply_is_never_refused_by_the_limit() {
    let env = Env::new();
    let conv = env.conversation();
    let mut raw = Raw::start_with(&env, &["--max-calls", "1"]);
    for i in 0..100 {
        let r = raw.ask(
            &json!({"jsonrpc": "2.0", "id": "same", "method": "tools/call",
            "params": {"name": "check_partner_status", "arguments": auth(&conv, "a")}})
            .to_string(),
        );
        assert_eq!(r["result"]["isError"], false, "call {i}: {r}");
    }
}

/// Regression: a cancel used to silence any running call, also one that
/// had already marked its messages read: they were read and never
/// delivered. Now what a cancelled call marked is unread again. The call is
/// held behind another connection's write lock while the cancel comes.
#[test]
fn a_cancelled_check_messages_leaves_its_messages_unread() {
    let env = Env::new();
    let conv = env.conversation();
    let mut raw = Raw::start(&env);
    raw.ask(&json!({"jsonrpc": "2.0", "id": 0, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}}).to_string());
    let r = raw.ask(&json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
        "name": "send_to_partner", "arguments": with(auth(&conv, "a"), json!({"message": "important message"}))}})
    .to_string());
    assert_eq!(r["result"]["isError"], false, "{r}");
    let lock = rusqlite::Connection::open(env.db()).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    raw.write(
        &json!({"jsonrpc": "2.0", "id": "chk", "method": "tools/call", "params": {
        "name": "check_messages", "arguments": auth(&conv, "b")}})
        .to_string(),
    );
    // Lines are handled in order: the call is running when the cancel comes.
    raw.write(
        r#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":"chk"}}"#,
    );
    let log = || std::fs::read_to_string(env.path("raw.log")).unwrap_or_default();
    wait_until("the cancel is applied", TIMEOUT, || {
        log().contains("event=call_cancelled")
    });
    lock.execute_batch("COMMIT").unwrap();
    wait_until("the cancelled call unmarks its message", TIMEOUT, || {
        log().contains("event=unmarked_after_cancel count=1")
    });
    // No reply for the cancelled call; the next check_messages has the message.
    let r = raw.ask(
        &json!({"jsonrpc": "2.0", "id": "again", "method": "tools/call", "params": {
        "name": "check_messages", "arguments": auth(&conv, "b")}})
        .to_string(),
    );
    assert_eq!(r["id"], "again", "a reply to the cancelled call came: {r}");
    let text = r["result"]["content"][0]["text"].as_str().unwrap();
    assert!(text.contains("important message"), "{text}");
}

/// Regression: replies had an unbounded queue and an unbounded final
/// join, so a client that sent requests and read nothing grew the process
/// without limit and, once its stdin closed, left it running for ever.
#[test]
fn a_client_that_reads_no_replies_cannot_keep_the_server_alive() {
    let env = Env::new();
    let mut child = common::KillOnDrop(
        env.cmd("autopoll")
            .args(["mcp", "--db", &env.db_arg()])
            .env("RUST_LOG", "info")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(env.path("stalled.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    // Its stdout stays open and is never read: the pipe and the queue fill.
    let _unread = child.0.stdout.take().unwrap();
    let mut w = child.0.stdin.take().unwrap();
    let list = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#;
    let mut wrote = 0;
    for _ in 0..3000 {
        if w.write_all(list.as_bytes())
            .and_then(|()| w.write_all(b"\n"))
            .is_err()
        {
            break;
        }
        wrote += 1;
    }
    assert!(wrote > 300, "{wrote}");
    drop(w);
    wait_until("autopoll mcp stops", Duration::from_secs(60), || {
        child.0.try_wait().unwrap().is_some()
    });
    let log = std::fs::read_to_string(env.path("stalled.log")).unwrap_or_default();
    assert!(log.contains("event=client_stalled"), "{log}");
}

#[test]
fn the_sdk_asks_the_shard_and_trades_messages_through_a_postgres_bridge() {
    let env = Env::postgres();
    let (conv, _server, _poller) = shard(&env);
    let a = auth(&conv, "a");
    let b = auth(&conv, "b");
    let r = sdk(
        &env,
        json!({"steps": [
            call("ask_shard", with(a.clone(), json!({"question": "How big is the LRU cache?", "timeout_secs": 30}))),
            call("send_to_partner", with(b.clone(), json!({"message": "a note for a", "action_type": "info"}))),
            call("check_messages", a.clone()),
            call("shard_status", a.clone()),
            call("create_conversation", json!({"my_role": "coordinator", "partner_role": "shard"})),
        ]}),
    );
    let s = &step(&r, 0)["structured"];
    assert!(s["answer"].as_str().unwrap().contains("64 entries"), "{s}");
    assert!(
        s["sources"][0].as_str().unwrap().contains("NOTES.md:"),
        "{s}"
    );
    ok_text(&r, 1);
    // Only the note: ask_shard marked its own response read.
    let text = ok_text(&r, 2);
    assert!(
        text.starts_with("1 new message(s):") && text.contains("a note for a"),
        "{r:#}"
    );
    assert_eq!(step(&r, 3)["structured"]["alive"], true, "{r:#}");
    assert!(ok_text(&r, 4).contains("conv_"), "{r:#}");
    // The rows are in PostgreSQL.
    let mut store = env.store();
    assert_eq!(store.list_conversations().unwrap().len(), 2);
}
