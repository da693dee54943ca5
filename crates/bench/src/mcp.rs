//! The `mcp` figures: `ask_shard` through `autopoll mcp` (JSON-RPC over the
//! child's stdio, spoken here as an agent client would), with a poller and
//! a server running, client-measured from writing the `tools/call` line to
//! reading its reply; against the same question asked the way agents do
//! today: `send_to_partner`, then `check_messages` once a second (the
//! first a second after the send) until the answer with the question's
//! `query_id` shows up. The reference counts no model time: a real agent
//! spends a model turn on every one of those calls.

use std::io::{BufRead, BufReader, Write};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{Daemon, Options, Report, Res, World, e, pct, sorted, synthetic_context};

/// How long one reply may take before the step fails.
const REPLY: Duration = Duration::from_secs(60);

/// `autopoll mcp` on pipes.
struct Mcp {
    _d: Daemon,
    stdin: ChildStdin,
    lines: Receiver<String>,
    next_id: u64,
}

impl Mcp {
    fn start(w: &World) -> Res<Mcp> {
        let mut child = Command::new(w.bin.join("autopoll"))
            .args(["-q", "mcp", "--db"])
            .arg(w.db())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(e("autopoll mcp"))?;
        let stdin = child.stdin.take().ok_or("no stdin")?;
        let out = child.stdout.take().ok_or("no stdout")?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("bench-mcp-read".into())
            .spawn(move || {
                for l in BufReader::new(out).lines() {
                    let Ok(l) = l else { return };
                    if tx.send(l).is_err() {
                        return;
                    }
                }
            })
            .map_err(e("reader thread"))?;
        let mut m = Mcp {
            _d: Daemon::new(child),
            stdin,
            lines,
            next_id: 0,
        };
        m.request(
            "initialize",
            json!({"protocolVersion": "2025-06-18", "capabilities": {},
                   "clientInfo": {"name": "autopoll-bench", "version": "0"}}),
        )?;
        m.write(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))?;
        Ok(m)
    }

    fn write(&mut self, v: &Value) -> Res<()> {
        let mut line = v.to_string();
        line.push('\n');
        self.stdin
            .write_all(line.as_bytes())
            .and_then(|()| self.stdin.flush())
            .map_err(e("write to autopoll mcp"))
    }

    fn request(&mut self, method: &str, params: Value) -> Res<Value> {
        self.next_id += 1;
        let id = self.next_id;
        self.write(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))?;
        loop {
            let l = self
                .lines
                .recv_timeout(REPLY)
                .map_err(|_| format!("no reply to {method} within {REPLY:?}"))?;
            let v: Value = serde_json::from_str(&l).map_err(e("reply"))?;
            if v["id"] == id {
                if v.get("error").is_some() {
                    return Err(format!("{method}: {}", v["error"]));
                }
                return Ok(v["result"].clone());
            }
        }
    }

    /// A tool call that must succeed; its structured content.
    fn tool(&mut self, name: &str, args: Value) -> Res<Value> {
        let r = self.request("tools/call", json!({"name": name, "arguments": args}))?;
        if r["isError"] == true {
            return Err(format!("{name}: {}", r["content"][0]["text"]));
        }
        Ok(r["structuredContent"].clone())
    }
}

/// The `mcp` step.
pub fn mcp(opts: &Options, r: &mut Report) -> Res<()> {
    let (n, n_ref) = if opts.quick { (30, 3) } else { (300, 20) };
    let w = World::new(opts)?;
    let ctx = w.dir.path().join("ctx.md");
    std::fs::write(&ctx, synthetic_context(200_000, 3)).map_err(e("context"))?;
    let _s = w.server("mcp", &["--context", ctx.to_str().unwrap_or_default()])?;
    let _p = w.poller("mcp", &[])?;
    let mut m = Mcp::start(&w)?;
    let auth = json!({
        "conversation_id": w.conv.conversation_id,
        "session_id": "a",
        "token": w.conv.session_a_token,
    });
    let with = |extra: Value| {
        let mut a = auth.clone();
        for (k, v) in extra.as_object().into_iter().flatten() {
            a[k] = v.clone();
        }
        a
    };
    let question = "what about sokalo rekato in the transport section?";
    // Warm up (the first answer loads the index).
    for _ in 0..3 {
        m.tool(
            "ask_shard",
            with(json!({"question": question, "timeout_secs": 60})),
        )?;
    }
    let mut lat = Vec::with_capacity(n);
    let mut server_ms = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let s = m.tool(
            "ask_shard",
            with(json!({"question": question, "timeout_secs": 60})),
        )?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
        server_ms.push(s["elapsed_ms"].as_f64().unwrap_or(f64::NAN) * 1000.0);
    }
    // The reference: send, then check_messages every second.
    let mut ref_lat = Vec::with_capacity(n_ref);
    let mut ref_calls = 0u64;
    for i in 0..n_ref {
        let qid = format!("q-bench-ref-{i}");
        let t = Instant::now();
        m.tool(
            "send_to_partner",
            with(json!({
                "message": autopoll_bridge::shard::query_text(&qid, question),
                "action_type": "question",
            })),
        )?;
        ref_calls += 1;
        loop {
            std::thread::sleep(Duration::from_secs(1));
            let got = m.tool("check_messages", auth.clone())?;
            ref_calls += 1;
            let found = got["messages"].as_array().into_iter().flatten().any(|msg| {
                autopoll_bridge::shard::Response::parse(msg["message"].as_str().unwrap_or(""))
                    .is_some_and(|r| r.query_id == qid)
            });
            if found {
                break;
            }
            if t.elapsed() > REPLY {
                return Err(format!(
                    "no answer to {qid} by check_messages within {REPLY:?}"
                ));
            }
        }
        ref_lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let (lat, server_ms, ref_lat) = (sorted(lat), sorted(server_ms), sorted(ref_lat));
    let (p50, p99) = (pct(&lat, 0.5), pct(&lat, 0.99));
    let (rp50, rp99) = (pct(&ref_lat, 0.5), pct(&ref_lat, 0.99));
    let calls_per_q = ref_calls as f64 / n_ref as f64;
    r.row(
        "ask_shard via autopoll mcp p50 / p99 (1 tool call)",
        format!("{p50:.2} / {p99:.2} ms"),
        format!(
            "send_to_partner + check_messages each 1 s: {rp50:.0} / {rp99:.0} ms, {calls_per_q:.1} tool calls"
        ),
        "one call, p50 under a tenth of the polling client's",
        Some(p50 * 10.0 < rp50),
    );
    r.json.insert(
        "mcp".into(),
        json!({
            "questions": n,
            "context_bytes": 200_000,
            "p50_ms": p50,
            "p99_ms": p99,
            "max_ms": pct(&lat, 1.0),
            "server_elapsed_p50_ms": pct(&server_ms, 0.5),
            "reference": {
                "questions": n_ref,
                "p50_ms": rp50,
                "p99_ms": rp99,
                "tool_calls_per_question": calls_per_q,
                "check_interval_s": 1,
            },
        }),
    );
    Ok(())
}
