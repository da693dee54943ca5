//! # autopoll-bench
//!
//! Measures what autopoll claims, with the real binaries (next to this one
//! in the target directory), a real bridge file and real FIFOs, and pairs
//! each speed figure with a reference measured in the same run on the same
//! machine. Prints a table and writes the same figures as JSON.
//!
//! Figures: IPC round trip (vs a raw pipe ping-pong), pickup-to-answer
//! latency through the bridge, backlog drain, persistent vs per-question
//! process, idle cost, endurance, the built-in engine, and the real Claude
//! Code CLI against a fake API (warm vs per-process, request size and input
//! tokens per question with autopoll's defaults vs the CLI's), the
//! built-in engine's answer quality against a BM25 baseline,
//! `ask_shard` through `autopoll mcp` vs a client polling `check_messages`,
//! many conversations on one bridge against a minimal shard
//! (`conversations`), and the bridge in PostgreSQL against SQLite
//! (`postgres`).
#![deny(missing_docs)]

mod claude;
mod context;
mod conversations;
mod mcp;
mod postgres;
pub mod procs;
pub mod quality;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use autopoll_bridge::{Bridge, Session, shard};
use autopoll_protocol::{Client, ClientOptions, ServerPaths};
use serde_json::{Value, json};

/// How much to measure.
#[derive(Debug, Clone)]
pub struct Options {
    /// Seconds instead of minutes: smaller counts, shorter waits.
    pub quick: bool,
    /// Where the autopoll binaries are.
    pub bin_dir: PathBuf,
    /// tests/fixtures of the source tree (for the persistent-vs-spawn figure).
    pub fixtures: PathBuf,
    /// Run only these measurements (empty: all).
    pub only: Vec<String>,
    /// The Claude Code CLI for the `claude` figures.
    pub claude_bin: PathBuf,
    /// Print more: each question the quality step's engine or baseline
    /// does not answer at rank 1.
    pub verbose: bool,
}

/// One line of the table.
#[derive(Debug, Clone)]
pub struct Row {
    /// What was measured.
    pub metric: String,
    /// The figure.
    pub value: String,
    /// The reference measured in the same run, if any.
    pub reference: String,
    /// The target.
    pub target: String,
    /// `met`, `MISSED`, or `-`.
    pub verdict: &'static str,
}

/// Everything measured.
#[derive(Debug, Default)]
pub struct Report {
    /// The table.
    pub rows: Vec<Row>,
    /// The same figures, and more, as JSON sections.
    pub json: serde_json::Map<String, Value>,
}

impl Report {
    fn row(
        &mut self,
        metric: &str,
        value: String,
        reference: String,
        target: &str,
        met: Option<bool>,
    ) {
        self.rows.push(Row {
            metric: metric.into(),
            value,
            reference,
            target: target.into(),
            verdict: match met {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "-",
            },
        });
    }

    /// The table as text.
    pub fn table(&self) -> String {
        let w = |f: fn(&Row) -> &str, h: &str| {
            self.rows
                .iter()
                .map(|r| f(r).chars().count())
                .max()
                .unwrap_or(0)
                .max(h.len())
        };
        let (a, b, c, d) = (
            w(|r| &r.metric, "metric"),
            w(|r| &r.value, "value"),
            w(|r| &r.reference, "same-run reference"),
            w(|r| &r.target, "target"),
        );
        let mut s = format!(
            "{:<a$}  {:<b$}  {:<c$}  {:<d$}  verdict\n",
            "metric", "value", "same-run reference", "target"
        );
        for r in &self.rows {
            s.push_str(&format!(
                "{:<a$}  {:<b$}  {:<c$}  {:<d$}  {}\n",
                r.metric, r.value, r.reference, r.target, r.verdict
            ));
        }
        s
    }
}

/// Percentile (0..=1) of sorted microseconds, in milliseconds.
fn pct(sorted_us: &[f64], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted_us.len() as f64 - 1.0) * p).round() as usize;
    sorted_us[i] / 1000.0
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

type Res<T> = Result<T, String>;

fn e<E: std::fmt::Display>(what: &str) -> impl Fn(E) -> String + '_ {
    move |err| format!("{what}: {err}")
}

/// A child process killed (-9) and reaped on drop.
struct Daemon {
    child: Child,
    /// Where its stderr goes, and what it is (for [`Daemon::exited`]).
    log: Option<(PathBuf, String)>,
}

impl Daemon {
    fn new(child: Child) -> Daemon {
        Daemon { child, log: None }
    }

    /// Spawn `cmd` (`what` names it) with stdout discarded and stderr
    /// kept in `log`, so that one that stops early can say why.
    fn spawn(cmd: &mut Command, what: &str, log: PathBuf) -> Res<Daemon> {
        let err = std::fs::File::create(&log).map_err(e("log file"))?;
        let child = cmd
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .map_err(e(what))?;
        Ok(Daemon {
            child,
            log: Some((log, what.to_string())),
        })
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The last lines it wrote to its log, joined with ` | `.
    fn said(&self) -> String {
        let text = self
            .log
            .as_ref()
            .and_then(|(p, _)| std::fs::read_to_string(p).ok())
            .unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(5).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }

    /// If it has stopped with a failure: what it is, how it ended, and
    /// what it said last.
    fn exited(&mut self) -> Option<String> {
        let status = self.child.try_wait().ok().flatten()?;
        if status.success() {
            return None;
        }
        let what = self.log.as_ref().map_or("a process", |(_, w)| w.as_str());
        Some(format!("{what} exited ({status}): {}", self.said()))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // One that died during the step says so (the step's own error,
        // such as "no answer within 30 s", would not tell why).
        if let Some(why) = self.exited() {
            eprintln!("autopoll-bench: {why}");
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh log file name under `dir` for a process called `name`.
fn log_path(dir: &Path, name: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    dir.join(format!("{name}-{n}.log"))
}

/// A private world: temp dir, runtime dir, bridge, conversation.
struct World {
    dir: tempfile::TempDir,
    bin: PathBuf,
    conv: autopoll_bridge::NewConversation,
}

impl World {
    fn new(opts: &Options) -> Res<World> {
        let dir = tempfile::Builder::new()
            .prefix("autopoll-bench-")
            .tempdir()
            .map_err(e("temp dir"))?;
        let mut b = Bridge::open_or_create(dir.path().join("bridge.db")).map_err(e("bridge"))?;
        let conv = b
            .create_conversation("coordinator", "shard", Duration::from_secs(24 * 3600))
            .map_err(e("conversation"))?;
        Ok(World {
            dir,
            bin: opts.bin_dir.clone(),
            conv,
        })
    }

    fn db(&self) -> PathBuf {
        self.dir.path().join("bridge.db")
    }

    fn runtime(&self) -> PathBuf {
        self.dir.path().join("rt")
    }

    fn paths(&self, name: &str) -> ServerPaths {
        ServerPaths::new(&self.runtime(), name).unwrap_or_else(|e| panic!("{e}"))
    }

    fn server(&self, name: &str, args: &[&str]) -> Res<Daemon> {
        self.server_env(name, args, &[])
    }

    fn server_env(&self, name: &str, args: &[&str], vars: &[(String, String)]) -> Res<Daemon> {
        // Its errors (-q leaves only those) go to a file, so that a server
        // that cannot start says why instead of being waited for.
        let log = self.dir.path().join(format!("server-{name}.log"));
        let mut d = Daemon::spawn(
            Command::new(self.bin.join("autopoll-server"))
                .args(["-q", "--name", name, "--runtime-dir"])
                .arg(self.runtime())
                .args(args)
                .envs(vars.iter().map(|(k, v)| (k, v))),
            &format!("autopoll-server `{name}`"),
            log,
        )?;
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.client(name).is_err() {
            if let Ok(Some(status)) = d.child.try_wait() {
                let said = d.said();
                // Reported here; not again when dropped.
                d.log = None;
                return Err(format!(
                    "autopoll-server `{name}` exited ({status}) before serving: {said}"
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the server did not come up within 120 s; it said: {}",
                    d.said()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(d)
    }

    fn poller(&self, name: &str, args: &[&str]) -> Res<Daemon> {
        Daemon::spawn(
            Command::new(self.bin.join("autopoll-poller"))
                .args(["-q", "--name", name, "--runtime-dir"])
                .arg(self.runtime())
                .arg("--db")
                .arg(self.db())
                .args(["--conversation", &self.conv.conversation_id])
                .env("AUTOPOLL_TOKEN", &self.conv.session_b_token)
                .args(args),
            &format!("autopoll-poller `{name}`"),
            log_path(self.dir.path(), "poller"),
        )
    }

    fn client(&self, name: &str) -> Res<Client> {
        Client::connect(
            &self.paths(name),
            &ClientOptions {
                connect_timeout: Duration::from_secs(5),
                client_name: "bench".into(),
                ..ClientOptions::default()
            },
        )
        .map_err(|e| e.to_string())
    }

    /// Queue `n` queries from session a in one transaction-per-query loop.
    fn queue(&self, b: &mut Bridge, prefix: &str, n: usize, question: &str) -> Res<()> {
        for i in 0..n {
            let text = shard::query_text(&format!("q-{prefix}-{i}"), question);
            b.send(
                &self.conv.conversation_id,
                Session::A,
                &self.conv.session_a_token,
                &text,
                None,
            )
            .map_err(e("send"))?;
        }
        Ok(())
    }
}

/// Send `text` from session a, then wait (checking every `poll`) until a
/// response row to session a is committed after it: the pickup-to-answer
/// time, measured from the committed question to the committed answer.
fn ask_through_bridge(
    w: &World,
    b: &mut Bridge,
    ro: &rusqlite::Connection,
    text: &str,
    poll: Duration,
    limit: Duration,
) -> Res<Duration> {
    // Timed from before the send, its commit included: the poller can take
    // the question and answer it between the send's commit and its return
    // here (this thread preempted on a busy machine), which timed from
    // after the send read as a pickup of microseconds.
    let t = Instant::now();
    let sent = b
        .send(
            &w.conv.conversation_id,
            Session::A,
            &w.conv.session_a_token,
            text,
            None,
        )
        .map_err(e("send"))?;
    loop {
        let answered = ro
            .query_row(
                "SELECT id FROM messages WHERE to_session = 'a' AND id > ?1 LIMIT 1",
                [sent.id],
                |r| r.get::<_, i64>(0),
            )
            .is_ok();
        if answered {
            return Ok(t.elapsed());
        }
        if t.elapsed() > limit {
            return Err(format!("no answer within {limit:?}"));
        }
        std::thread::sleep(poll);
    }
}

/// Responses to session a, counted as they come: each look reads only the
/// rows above the last one seen (a range of the integer key), so polling a
/// 20,000-question drain every few ms costs the harness next to nothing
/// instead of a scan of the whole table per look, which took CPU from the
/// poller it measures on a 2-core machine.
struct Responses {
    count: i64,
    above: i64,
}

impl Responses {
    fn new() -> Responses {
        Responses { count: 0, above: 0 }
    }

    /// The count so far (read-only connection); unchanged on an error.
    fn count(&mut self, ro: &rusqlite::Connection) -> i64 {
        if let Ok((n, top)) = ro.query_row(
            "SELECT count(*), max(id) FROM messages WHERE id > ?1 AND to_session = 'a'",
            [self.above],
            |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Option<i64>>(1)?)),
        ) && let Some(top) = top
        {
            self.count += n;
            self.above = top;
        }
        self.count
    }
}

fn read_only(db: &Path) -> Res<rusqlite::Connection> {
    rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(e("read-only bridge"))
}

/// Synthetic markdown: headings and paragraphs over a Zipf-like vocabulary,
/// deterministic. About `bytes` long.
pub fn synthetic_context(bytes: usize, seed: u64) -> String {
    let vocab: Vec<String> = (0..20_000)
        .map(|i| {
            let syll = ["ka", "lo", "mi", "re", "tu", "sa", "ne", "po", "vi", "da"];
            let mut w = String::new();
            let mut x = i + 7;
            while x > 0 {
                w.push_str(syll[x % 10]);
                x /= 10;
            }
            w
        })
        .collect();
    let mut s = seed | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let mut out = String::with_capacity(bytes + 1024);
    let mut section = 0;
    while out.len() < bytes {
        section += 1;
        out.push_str(&format!(
            "\n## Section {section} {}\n\n",
            vocab[(next() % 2000) as usize]
        ));
        for _ in 0..(3 + next() % 4) {
            for line in 0..(2 + next() % 5) {
                let words = 8 + next() % 6;
                for k in 0..words {
                    // Zipf-ish: square a uniform draw so low ids dominate.
                    let u = (next() % 10_000) as f64 / 10_000.0;
                    let id = ((u * u) * vocab.len() as f64) as usize;
                    if k > 0 {
                        out.push(' ');
                    }
                    out.push_str(&vocab[id.min(vocab.len() - 1)]);
                }
                out.push_str(if line % 3 == 2 { ".\n" } else { "\n" });
            }
            out.push('\n');
        }
    }
    out
}

fn ipc(opts: &Options, r: &mut Report) -> Res<()> {
    let n = if opts.quick { 500 } else { 5_000 };
    let w = World::new(opts)?;
    let ctx = w.dir.path().join("ctx.md");
    std::fs::write(&ctx, synthetic_context(20_000, 1)).map_err(e("context"))?;
    let _s = w.server("ipc", &["--context", ctx.to_str().unwrap_or_default()])?;
    let mut c = w.client("ipc")?;
    let payload: String = "x".repeat(200);
    let question: String = "what did we decide about sokalo and mire in the transport section "
        .repeat(4)[..200]
        .to_string();
    let t = Duration::from_secs(10);
    for _ in 0..(n / 10) {
        c.echo(&payload, t).map_err(e("echo"))?;
    }
    let mut echo = Vec::with_capacity(n);
    let mut ask = Vec::with_capacity(n);
    // The reply quotes passages: more bytes come back than the 200 sent.
    let reply_bytes = {
        let a = c.ask(&question, t).map_err(e("ask"))?;
        autopoll_protocol::frame::encode(&autopoll_protocol::Reply::Answer(a)).len()
    };
    for _ in 0..n {
        let s = Instant::now();
        c.echo(&payload, t).map_err(e("echo"))?;
        echo.push(s.elapsed().as_secs_f64() * 1e6);
        let s = Instant::now();
        c.ask(&question, t).map_err(e("ask"))?;
        ask.push(s.elapsed().as_secs_f64() * 1e6);
    }
    // The reference: two processes ping-ponging 200 bytes over a pipe pair.
    let mut child = Command::new(std::env::current_exe().map_err(e("current exe"))?)
        .arg("__pingpong")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(e("ping-pong child"))?;
    let mut to = child.stdin.take().ok_or("no stdin")?;
    let mut from = child.stdout.take().ok_or("no stdout")?;
    let msg = [b'p'; 200];
    let mut back = [0u8; 200];
    let mut raw = Vec::with_capacity(n);
    for i in 0..(n + n / 10) {
        let s = Instant::now();
        to.write_all(&msg).map_err(e("ping"))?;
        from.read_exact(&mut back).map_err(e("pong"))?;
        if i >= n / 10 {
            raw.push(s.elapsed().as_secs_f64() * 1e6);
        }
    }
    drop(to);
    let _ = child.wait();
    let (raw, echo, ask) = (sorted(raw), sorted(echo), sorted(ask));
    let ratio = pct(&ask, 0.5) / pct(&raw, 0.5);
    let echo_ratio = pct(&echo, 0.5) / pct(&raw, 0.5);
    r.row(
        "IPC ask round trip p50 / p99",
        format!("{:.3} / {:.3} ms", pct(&ask, 0.5), pct(&ask, 0.99)),
        format!(
            "raw pipe {:.3} / {:.3} ms; ratio {ratio:.2}x (reply {reply_bytes} B vs 200 B)",
            pct(&raw, 0.5),
            pct(&raw, 0.99)
        ),
        "p50 <= 2x raw",
        Some(ratio <= 2.0),
    );
    r.row(
        "IPC echo round trip p50 (transport only)",
        format!("{:.3} ms", pct(&echo, 0.5)),
        format!("ratio {echo_ratio:.2}x raw"),
        "-",
        None,
    );
    r.json.insert(
        "ipc".into(),
        json!({
            "samples": n, "bytes": 200, "ask_reply_bytes": reply_bytes,
            "ask_p50_ms": pct(&ask, 0.5), "ask_p99_ms": pct(&ask, 0.99),
            "echo_p50_ms": pct(&echo, 0.5), "echo_p99_ms": pct(&echo, 0.99),
            "raw_p50_ms": pct(&raw, 0.5), "raw_p99_ms": pct(&raw, 0.99),
            "ask_ratio": ratio, "echo_ratio": echo_ratio,
        }),
    );
    Ok(())
}

/// The child side of the raw ping-pong.
pub fn pingpong_child() {
    let mut buf = [0u8; 200];
    let (mut i, mut o) = (std::io::stdin().lock(), std::io::stdout().lock());
    while i.read_exact(&mut buf).is_ok() {
        if o.write_all(&buf).and_then(|_| o.flush()).is_err() {
            break;
        }
    }
}

fn pickup(opts: &Options, r: &mut Report) -> Res<()> {
    let n = if opts.quick { 100 } else { 1_000 };
    let w = World::new(opts)?;
    let ctx = w.dir.path().join("ctx.md");
    std::fs::write(&ctx, synthetic_context(1 << 20, 2)).map_err(e("context"))?;
    let _s = w.server("pk", &["--context", ctx.to_str().unwrap_or_default()])?;
    let _p = w.poller("pk", &[])?;
    let mut b = Bridge::open(w.db()).map_err(e("bridge"))?;
    let ro = read_only(&w.db())?;
    std::thread::sleep(Duration::from_millis(300));
    let mut lat = Vec::with_capacity(n);
    for i in 0..(n + 20) {
        let text = shard::query_text(
            &format!("q-pk-{i}"),
            "what about sokalo rekato in the transport section?",
        );
        let took = ask_through_bridge(
            &w,
            &mut b,
            &ro,
            &text,
            Duration::from_micros(50),
            Duration::from_secs(30),
        )?;
        if i >= 20 {
            lat.push(took.as_secs_f64() * 1e6);
        }
    }
    let lat = sorted(lat);
    let (p50, p99) = (pct(&lat, 0.5), pct(&lat, 0.99));
    r.row(
        "Pickup-to-answer via bridge p50 / p99",
        format!("{p50:.2} / {p99:.2} ms"),
        "old shard: 5 s polling (p50 2.5 s) + a process per question".into(),
        "p50 <= 3 ms, p99 <= 15 ms",
        Some(p50 <= 3.0 && p99 <= 15.0),
    );
    r.json.insert("pickup".into(), json!({"queries": n, "context_bytes": 1 << 20, "p50_ms": p50, "p99_ms": p99, "max_ms": pct(&lat, 1.0)}));
    Ok(())
}

/// The old design measured the same way as `pickup`: a Python loop polling
/// every 5 s, marking read first, spawning a process per question.
fn old_design(opts: &Options, r: &mut Report) -> Res<()> {
    if opts.quick {
        return Ok(());
    }
    let n = 10;
    let w = World::new(opts)?;
    let fx = opts.fixtures.join("jsonl_backend.py");
    let old = opts.fixtures.join("old_shard.py");
    let child = Command::new("python3")
        .arg(&old)
        .arg(w.db())
        .arg(&w.conv.conversation_id)
        .arg("b")
        .args([
            "python3",
            fx.to_str().unwrap_or_default(),
            "--once",
            "--start-delay",
            "0.05",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(e("old shard"))?;
    let _old = Daemon::new(child);
    let mut b = Bridge::open(w.db()).map_err(e("bridge"))?;
    let ro = read_only(&w.db())?;
    let mut lat = Vec::new();
    for i in 0..n {
        let text = shard::query_text(&format!("q-old-{i}"), "what about the cache?");
        let took = ask_through_bridge(
            &w,
            &mut b,
            &ro,
            &text,
            Duration::from_millis(5),
            Duration::from_secs(60),
        )?;
        lat.push(took.as_secs_f64() * 1e6);
        // Arrive at a random point of its 5 s cycle, as a coordinator would.
        std::thread::sleep(Duration::from_millis(700 * (i as u64 % 7)));
    }
    let lat = sorted(lat);
    r.row(
        "Old design: 5 s polling + process per question",
        format!(
            "pickup-to-answer p50 {:.0} ms, max {:.0} ms",
            pct(&lat, 0.5),
            pct(&lat, 1.0)
        ),
        format!("{n} questions, same harness as the pickup figure"),
        "(reference)",
        None,
    );
    r.json.insert(
        "old_design".into(),
        json!({"queries": n, "p50_ms": pct(&lat, 0.5), "max_ms": pct(&lat, 1.0)}),
    );
    Ok(())
}

fn drain(opts: &Options, r: &mut Report) -> Res<()> {
    let n = if opts.quick { 2_000 } else { 20_000 };
    let w = World::new(opts)?;
    let ctx = w.dir.path().join("ctx.md");
    std::fs::write(&ctx, synthetic_context(1 << 20, 3)).map_err(e("context"))?;
    let s = w.server(
        "dr",
        &[
            "--context",
            ctx.to_str().unwrap_or_default(),
            "--workers",
            "2",
        ],
    )?;
    let mut b = Bridge::open(w.db()).map_err(e("bridge"))?;
    w.queue(&mut b, "dr", n, "what about sokalo rekato?")?;
    let ro = read_only(&w.db())?;
    let mut seen = Responses::new();
    let s0 = procs::cpu_secs(s.pid());
    let t = Instant::now();
    let p = w.poller("dr", &["--concurrency", "64"])?;
    let deadline = t + Duration::from_secs(600);
    while seen.count(&ro) < n as i64 {
        if Instant::now() > deadline {
            return Err("backlog not drained within 600 s".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let secs = t.elapsed().as_secs_f64();
    let qps = n as f64 / secs;
    // CPU per question, which a busy machine changes less than the wall
    // time (the poller's start-up included).
    let per_q = |cpu: f64| cpu * 1e6 / n as f64;
    let poller_us = per_q(procs::cpu_secs(p.pid()));
    let server_us = per_q(procs::cpu_secs(s.pid()) - s0);
    r.row(
        "Backlog drain",
        format!("{n} in {secs:.2} s = {qps:.0} q/s"),
        format!(
            "poller start-up included; CPU a question: poller {poller_us:.0} us, server {server_us:.0} us"
        ),
        ">= 25,000 q/s (issue 12)",
        Some(qps >= 25_000.0),
    );
    r.json.insert(
        "drain".into(),
        json!({"queries": n, "seconds": secs, "qps": qps, "poller_cpu_us_per_query": poller_us, "server_cpu_us_per_query": server_us}),
    );
    Ok(())
}

fn persistent_vs_spawn(opts: &Options, r: &mut Report) -> Res<()> {
    let (np, ns) = if opts.quick { (20, 5) } else { (200, 30) };
    let w = World::new(opts)?;
    let ctx = w.dir.path().join("ctx.md");
    std::fs::write(&ctx, "line one\nline two\n").map_err(e("context"))?;
    let fx = opts.fixtures.join("jsonl_backend.py");
    let fx = fx.to_str().unwrap_or_default();
    let c = ctx.to_str().unwrap_or_default();
    let common = ["--context", c, "--workers", "1", "--start-timeout", "30"];
    let _j = w.server(
        "pers",
        &[
            &common[..],
            &[
                "--backend",
                "jsonl",
                "--",
                "python3",
                fx,
                "--start-delay",
                "0.05",
            ],
        ]
        .concat(),
    )?;
    let _sp = w.server(
        "spawn",
        &[
            &common[..],
            &[
                "--backend",
                "spawn",
                "--",
                "python3",
                fx,
                "--once",
                "--start-delay",
                "0.05",
            ],
        ]
        .concat(),
    )?;
    let time = |name: &str, n: usize| -> Res<Vec<f64>> {
        let mut c = w.client(name)?;
        c.ask("warm up", Duration::from_secs(30))
            .map_err(e("ask"))?;
        let mut v = Vec::new();
        for i in 0..n {
            let s = Instant::now();
            c.ask(&format!("question {i}"), Duration::from_secs(30))
                .map_err(e("ask"))?;
            v.push(s.elapsed().as_secs_f64() * 1e6);
        }
        Ok(sorted(v))
    };
    let p = time("pers", np)?;
    let s = time("spawn", ns)?;
    let ratio = pct(&s, 0.5) / pct(&p, 0.5);
    r.row(
        "Persistent (jsonl) vs per-question (spawn) p50",
        format!(
            "{:.2} ms vs {:.1} ms = {ratio:.0}x",
            pct(&p, 0.5),
            pct(&s, 0.5)
        ),
        "same fixture worker, 50 ms start-up + python".into(),
        ">= 50x",
        Some(ratio >= 50.0),
    );
    r.json.insert(
        "persistent_vs_spawn".into(),
        json!({"persistent_p50_ms": pct(&p, 0.5), "persistent_p99_ms": pct(&p, 0.99), "spawn_p50_ms": pct(&s, 0.5), "spawn_p99_ms": pct(&s, 0.99), "ratio": ratio, "startup_delay_ms": 50}),
    );
    Ok(())
}

fn idle(opts: &Options, r: &mut Report) -> Res<()> {
    let secs = if opts.quick { 3.0 } else { 30.0 };
    let w = World::new(opts)?;
    let ctx = w.dir.path().join("ctx.md");
    std::fs::write(&ctx, synthetic_context(100_000, 4)).map_err(e("context"))?;
    let s = w.server("idle", &["--context", ctx.to_str().unwrap_or_default()])?;
    let p = w.poller("idle", &[])?;
    std::thread::sleep(Duration::from_secs(1));
    let (s0, p0, t0) = (
        procs::cpu_secs(s.pid()),
        procs::cpu_secs(p.pid()),
        Instant::now(),
    );
    std::thread::sleep(Duration::from_secs_f64(secs));
    let wall = t0.elapsed().as_secs_f64();
    let used = procs::cpu_secs(s.pid()) - s0 + procs::cpu_secs(p.pid()) - p0;
    let share = used / wall * 100.0;
    let (rs, rp) = (procs::rss_kib(s.pid()), procs::rss_kib(p.pid()));
    r.row(
        "Idle CPU, server + poller",
        format!("{share:.3}% of one core over {wall:.0} s"),
        format!(
            "RSS server {:.1} MiB, poller {:.1} MiB",
            rs as f64 / 1024.0,
            rp as f64 / 1024.0
        ),
        "<= 0.5%",
        Some(share <= 0.5),
    );
    r.json.insert("idle".into(), json!({"seconds": wall, "cpu_seconds": used, "cpu_percent": share, "server_rss_kib": rs, "poller_rss_kib": rp}));
    Ok(())
}

fn endurance(opts: &Options, r: &mut Report) -> Res<()> {
    let (total, batch) = if opts.quick {
        (4_000, 1_000)
    } else {
        (100_000, 5_000)
    };
    let w = World::new(opts)?;
    let ctx = w.dir.path().join("ctx.md");
    std::fs::write(&ctx, synthetic_context(1 << 20, 5)).map_err(e("context"))?;
    let s = w.server(
        "end",
        &[
            "--context",
            ctx.to_str().unwrap_or_default(),
            "--workers",
            "2",
        ],
    )?;
    // --heartbeat 1: the poller's idle health-check connection (one more
    // server session) opens during the warm-up, not in the middle.
    let p = w.poller("end", &["--concurrency", "32", "--heartbeat", "1"])?;
    let mut b = Bridge::open(w.db()).map_err(e("bridge"))?;
    let ro = read_only(&w.db())?;
    let mut seen = Responses::new();
    let wal = w.dir.path().join("bridge.db-wal");
    let mut wal_max = 0u64;
    let mut start: Option<(procs::Snapshot, procs::Snapshot)> = None;
    let mut series: Vec<Value> = Vec::new();
    let t = Instant::now();
    let mut done = 0usize;
    while done < total {
        if done == batch {
            std::thread::sleep(Duration::from_millis(1_500)); // idle: the health check connects
        }
        w.queue(
            &mut b,
            &format!("e{done}"),
            batch,
            "what about sokalo rekato?",
        )?;
        done += batch;
        let deadline = Instant::now() + Duration::from_secs(600);
        while seen.count(&ro) < done as i64 {
            if Instant::now() > deadline {
                return Err(format!("endurance stalled at {} answers", seen.count(&ro)));
            }
            wal_max = wal_max.max(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0));
            std::thread::sleep(Duration::from_millis(20));
        }
        series.push(json!({"answered": done, "server_rss_kib": procs::rss_kib(s.pid()), "poller_rss_kib": procs::rss_kib(p.pid())}));
        if start.is_none() && done >= 2 * batch {
            // After two warm-up batches (and an idle moment between them):
            // caches, pools and connections have their working size.
            start = Some((procs::snapshot(s.pid()), procs::snapshot(p.pid())));
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let (s0, p0) = start.ok_or("no batches")?;
    let (s1, p1) = (procs::snapshot(s.pid()), procs::snapshot(p.pid()));
    let growth = |a: u64, b: u64| (b as f64 - a as f64) / a.max(1) as f64 * 100.0;
    let (gs, gp) = (
        growth(s0.rss_kib, s1.rss_kib),
        growth(p0.rss_kib, p1.rss_kib),
    );
    // The second half alone: growth that has stopped shows as ~0 here.
    let mid = &series[series.len() / 2];
    let gp_half = growth(mid["poller_rss_kib"].as_u64().unwrap_or(0), p1.rss_kib);
    let gs_half = growth(mid["server_rss_kib"].as_u64().unwrap_or(0), s1.rss_kib);
    let flat = s0.fds == s1.fds
        && p0.fds == p1.fds
        && s0.threads == s1.threads
        && p0.threads == p1.threads
        && s1.children == s0.children;
    let zombies = s1.zombies + p1.zombies;
    let ok = gs <= 5.0 && gp <= 5.0 && flat && zombies == 0 && wal_max <= 64 << 20;
    r.row(
        "Endurance",
        format!(
            "{total} questions in {secs:.0} s; RSS {gs:+.1}% server, {gp:+.1}% poller (second half {gs_half:+.1}% / {gp_half:+.1}%); WAL max {:.1} MiB",
            wal_max as f64 / 1048576.0
        ),
        format!("fds {}->{} / {}->{}, threads {}->{} / {}->{}, zombies {zombies}", s0.fds, s1.fds, p0.fds, p1.fds, s0.threads, s1.threads, p0.threads, p1.threads),
        "RSS <= +5%, rest flat, 0 zombies, WAL <= 64 MiB",
        Some(ok),
    );
    r.json.insert(
        "endurance".into(),
        json!({"questions": total, "seconds": secs, "server_start": s0.json(), "server_end": s1.json(), "poller_start": p0.json(), "poller_end": p1.json(), "server_rss_growth_percent": gs, "poller_rss_growth_percent": gp, "server_rss_growth_second_half_percent": gs_half, "poller_rss_growth_second_half_percent": gp_half, "rss_by_batch": series, "wal_max_bytes": wal_max, "flat": flat}),
    );
    Ok(())
}

/// Logical size of the bridge (pages in use or free, WAL included): what
/// the file grows to once checkpointed.
fn bridge_bytes(ro: &rusqlite::Connection) -> Res<u64> {
    ro.query_row(
        "SELECT (SELECT page_count FROM pragma_page_count) * (SELECT page_size FROM pragma_page_size)",
        [],
        |r| r.get(0),
    )
    .map_err(e("page count"))
}

/// One retention run: `rounds` of `per_round` questions through server and
/// poller (`poller_args`), the coordinator reading each round's responses,
/// a pause of `pause` between rounds. Returns (bytes after the first round,
/// bytes at the end, messages left).
fn growth_run(
    opts: &Options,
    poller_args: &[&str],
    rounds: usize,
    per_round: usize,
    pause: Duration,
) -> Res<(u64, u64, i64)> {
    let w = World::new(opts)?;
    let ctx = w.dir.path().join("ctx.md");
    std::fs::write(&ctx, synthetic_context(1 << 20, 9)).map_err(e("context"))?;
    let _s = w.server("ret", &["--context", ctx.to_str().unwrap_or_default()])?;
    let _p = w.poller("ret", poller_args)?;
    let mut b = Bridge::open(w.db()).map_err(e("bridge"))?;
    let ro = read_only(&w.db())?;
    let conv = w.conv.conversation_id.clone();
    let mut first = 0;
    for round in 0..rounds {
        w.queue(
            &mut b,
            &format!("r{round}"),
            per_round,
            "what about sokalo rekato?",
        )?;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let (to_b, to_a): (i64, i64) = ro
                .query_row(
                    "SELECT (SELECT count(*) FROM messages WHERE conversation_id = ?1 AND to_session = 'b' AND read = 0),
                            (SELECT count(*) FROM messages WHERE conversation_id = ?1 AND to_session = 'a' AND read = 0)",
                    [&conv],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .map_err(e("counts"))?;
            if to_b == 0 && to_a >= per_round as i64 {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("round {round} not answered within 120 s"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        b.read_unread(&conv, Session::A, &w.conv.session_a_token)
            .map_err(e("read"))?;
        if round == 0 {
            first = bridge_bytes(&ro)?;
        }
        std::thread::sleep(pause);
    }
    let last = bridge_bytes(&ro)?;
    let left: i64 = ro
        .query_row("SELECT count(*) FROM messages", [], |r| r.get(0))
        .map_err(e("messages"))?;
    Ok((first, last, left))
}

fn retention(opts: &Options, r: &mut Report) -> Res<()> {
    let (rounds, per_round, pause) = if opts.quick {
        (4, 200, Duration::from_millis(1_200))
    } else {
        // 200,000 questions, the figure for the file size.
        (20, 10_000, Duration::from_millis(1_500))
    };
    let (f0, l0, m0) = growth_run(opts, &["--concurrency", "8"], rounds, per_round, pause)?;
    let (f1, l1, m1) = growth_run(
        opts,
        &[
            "--concurrency",
            "8",
            "--retain",
            "1s",
            "--prune-interval",
            "0.2",
        ],
        rounds,
        per_round,
        pause,
    )?;
    let n = ((rounds - 1) * per_round) as f64;
    let per_q = |first: u64, last: u64| (last as f64 - first as f64) / n;
    let (without, with) = (per_q(f0, l0), per_q(f1, l1));
    r.row(
        &format!(
            "Bridge growth per question ({} questions after the first {per_round})",
            (rounds - 1) * per_round
        ),
        format!(
            "{without:.0} B without retention; {with:.0} B with --retain 1s; file after {} questions {:.1} MiB vs {:.1} MiB",
            rounds * per_round,
            l0 as f64 / 1_048_576.0,
            l1 as f64 / 1_048_576.0
        ),
        format!(
            "file {:.1} -> {:.1} MiB vs {:.1} -> {:.1} MiB; messages left {m0} vs {m1}",
            f0 as f64 / 1_048_576.0,
            l0 as f64 / 1_048_576.0,
            f1 as f64 / 1_048_576.0,
            l1 as f64 / 1_048_576.0
        ),
        "bounded with --retain",
        Some(with < without / 10.0),
    );
    r.json.insert(
        "retention".into(),
        json!({"rounds": rounds, "per_round": per_round,
               "bytes_per_question_without": without, "bytes_per_question_with": with,
               "bytes": {"without": [f0, l0], "with": [f1, l1]},
               "messages_left": {"without": m0, "with": m1}}),
    );
    Ok(())
}

fn engine(opts: &Options, r: &mut Report) -> Res<()> {
    use autopoll_server::engine::builtin::BuiltinEngine;
    let big = if opts.quick { 5 << 20 } else { 50 << 20 };
    let n = if opts.quick { 200 } else { 1_000 };
    let dir = tempfile::tempdir().map_err(e("temp dir"))?;
    let questions: Vec<String> = {
        let text = synthetic_context(200_000, 99);
        let words: Vec<&str> = text
            .split_whitespace()
            .filter(|w| w.len() > 4 && !w.contains('#'))
            .collect();
        (0..n)
            .map(|i| {
                format!(
                    "what did we decide about {} and {}?",
                    words[(i * 7) % words.len()],
                    words[(i * 13 + 5) % words.len()]
                )
            })
            .collect()
    };
    let mut out = serde_json::Map::new();
    for (label, bytes) in [
        ("1 MB", 1usize << 20),
        (if opts.quick { "5 MB" } else { "50 MB" }, big),
    ] {
        let f = dir.path().join(format!("ctx-{bytes}.md"));
        std::fs::write(&f, synthetic_context(bytes, 6)).map_err(e("context"))?;
        let t = Instant::now();
        let eng = BuiltinEngine::load(std::slice::from_ref(&f))?;
        let index_secs = t.elapsed().as_secs_f64();
        for q in questions.iter().take(20) {
            eng.answer_now(q);
        }
        let mut lat = Vec::with_capacity(n);
        for q in &questions {
            let t = Instant::now();
            eng.answer_now(q);
            lat.push(t.elapsed().as_secs_f64() * 1e6);
        }
        let lat = sorted(lat);
        let passages = eng.index().passages();
        if bytes == big {
            r.row(
                &format!("Engine index {label}"),
                format!("{index_secs:.2} s ({passages} passages)"),
                "-".into(),
                if opts.quick {
                    "(50 MB: <= 1 s)"
                } else {
                    "<= 1 s"
                },
                (!opts.quick).then_some(index_secs <= 1.0),
            );
        }
        r.row(
            &format!("Engine query p50 on {label}"),
            format!("{:.3} ms (p99 {:.3})", pct(&lat, 0.5), pct(&lat, 0.99)),
            "-".into(),
            "<= 1 ms",
            Some(pct(&lat, 0.5) <= 1.0),
        );
        out.insert(label.into(), json!({"bytes": bytes, "index_seconds": index_secs, "passages": passages, "query_p50_ms": pct(&lat, 0.5), "query_p99_ms": pct(&lat, 0.99)}));
    }
    r.json.insert("engine".into(), Value::Object(out));
    Ok(())
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    json!({"cpu": cpu, "cores": cores, "kernel": kernel})
}

/// One measurement: it adds its rows (and JSON) to the report.
type Step = fn(&Options, &mut Report) -> Res<()>;

/// Every measurement, by the name `--only` takes, in the order they run.
const STEPS: &[(&str, Step)] = &[
    ("ipc", ipc),
    ("pickup", pickup),
    ("old_design", old_design),
    ("drain", drain),
    ("persistent_vs_spawn", persistent_vs_spawn),
    ("idle", idle),
    ("endurance", endurance),
    ("engine", engine),
    ("retention", retention),
    ("claude", claude::claude),
    ("quality", quality::quality),
    ("mcp", mcp::mcp),
    ("conversations", conversations::step),
    ("context", context::step),
    ("postgres", postgres::step),
];

/// The names `--only` takes ([`run`] runs them in this order).
pub fn step_names() -> impl Iterator<Item = &'static str> {
    STEPS.iter().map(|(name, _)| *name)
}

/// Run every measurement; a failing one is reported in its row, not fatal.
pub fn run(opts: &Options) -> Report {
    let mut r = Report::default();
    r.json.insert(
        "mode".into(),
        json!(if opts.quick { "quick" } else { "full" }),
    );
    r.json.insert("machine".into(), machine());
    for &(name, step) in STEPS {
        if !opts.only.is_empty() && !opts.only.iter().any(|o| o == name) {
            continue;
        }
        eprintln!("bench: {name} ...");
        if let Err(err) = step(opts, &mut r) {
            r.row(name, format!("FAILED: {err}"), "-".into(), "-", Some(false));
            r.json.insert(name.into(), json!({"error": err}));
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_daemon_that_died_says_how_and_what_it_wrote_last() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = Daemon::spawn(
            Command::new("sh").args([
                "-c",
                "echo starting >&2; echo 'cannot open the bridge' >&2; exit 3",
            ]),
            "autopoll-poller `t`",
            log_path(dir.path(), "poller"),
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let why = loop {
            if let Some(why) = d.exited() {
                break why;
            }
            assert!(Instant::now() < deadline, "sh did not exit");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(
            why.starts_with("autopoll-poller `t` exited (exit status: 3)"),
            "{why}"
        );
        assert!(why.ends_with("starting | cannot open the bridge"), "{why}");
        // A clean exit is not reported.
        let mut ok = Daemon::spawn(
            &mut Command::new("true"),
            "true",
            log_path(dir.path(), "true"),
        )
        .unwrap();
        let _ = ok.child.wait();
        assert_eq!(ok.exited(), None);
    }
}
