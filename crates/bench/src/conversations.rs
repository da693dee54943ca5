//! Many conversations on one bridge (issue 12): pickup-to-answer at 1 / 4 /
//! 16 / 64 conversations, with a poller per conversation and with one
//! poller holding them all (`--tokens-file`); the CPU the idle pollers use
//! while another conversation is asked; and a same-run reference, the
//! *minimal shard*: a claim commit, a FIFO round trip to the real server and
//! an answer commit, written here with nothing else, so pickup is reported
//! as a ratio to the least a bridge shard can do on this machine.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use autopoll_bridge::{Bridge, NewConversation, Session, shard};
use rusqlite::{Connection, params};
use serde_json::{Value, json};

use crate::{Daemon, Options, Report, Res, World, e, pct, procs, sorted, synthetic_context};

const QUESTION: &str = "what about sokalo rekato in the transport section?";

/// The step: every figure of this module.
pub fn step(opts: &Options, r: &mut Report) -> Res<()> {
    let (counts, n): (&[usize], usize) = if opts.quick {
        (&[1, 4], 20)
    } else {
        (&[1, 4, 16, 64], 300)
    };
    let idle_at = if opts.quick { 4 } else { 16 };
    let most = counts.iter().copied().max().unwrap_or(1).max(idle_at);
    let w = World::new(opts)?;
    let mut convs = vec![w.conv.clone()];
    {
        let mut b = Bridge::open(w.db()).map_err(e("bridge"))?;
        while convs.len() < most {
            convs.push(
                b.create_conversation("coordinator", "shard", Duration::from_secs(24 * 3600))
                    .map_err(e("conversation"))?,
            );
        }
    }
    let ctx = w.dir.path().join("ctx.md");
    std::fs::write(&ctx, synthetic_context(1 << 20, 2)).map_err(e("context"))?;
    let _s = w.server(
        "mc",
        &[
            "--context",
            ctx.to_str().unwrap_or_default(),
            "--max-clients",
            "1024",
        ],
    )?;

    let minimal = minimal_shard(&w, &convs[0], n)?;
    let (m50, m99) = (pct(&minimal, 0.5), pct(&minimal, 0.99));
    r.row(
        "Minimal shard (claim commit + FIFO ask + answer commit) p50 / p99",
        format!("{m50:.2} / {m99:.2} ms"),
        "written in the bench: nothing else".into(),
        "-",
        None,
    );
    let mut rows = Vec::new();
    let mut one_p50 = None;
    for &k in counts {
        for mode in [Mode::Separate, Mode::One] {
            if k == 1 && mode == Mode::One {
                // One conversation is the same poller either way.
                continue;
            }
            let pollers = start(&w, &convs[..k], mode)?;
            wait_alive(&w, &convs[..k])?;
            let mut b = Bridge::open(w.db()).map_err(e("bridge"))?;
            let ro = crate::read_only(&w.db())?;
            // Every conversation is asked twice first: a poller's first
            // questions open its server sessions and prepare its
            // statements, which is start-up, not pickup.
            for i in 0..(2 * k).max(10) {
                ask(&mut b, &ro, &convs[i % k], &format!("warm-{k}-{i}"))?;
            }
            let cpu0 = cpu(&pollers);
            let mut lat = Vec::with_capacity(n);
            for i in 0..n {
                let took = ask(&mut b, &ro, &convs[i % k], &format!("{mode:?}-{k}-{i}"))?;
                lat.push(took.as_secs_f64() * 1e6);
            }
            let cpu = cpu(&pollers) - cpu0;
            // Clock ticks are 10 ms: per question, over all n (rough in --quick).
            let cpu_ms = cpu * 1000.0 / n as f64;
            let lat = sorted(lat);
            let (p50, p99) = (pct(&lat, 0.5), pct(&lat, 0.99));
            if k == 1 {
                one_p50 = Some(p50);
            }
            let base = one_p50.unwrap_or(p50);
            let (target, met) = match k {
                1 => (
                    "p50 <= 2x minimal shard, p99 <= 5 ms".to_string(),
                    p50 <= 2.0 * m50 && p99 <= 5.0,
                ),
                16 => ("p50 <= 2x one conversation".into(), p50 <= 2.0 * base),
                64 => ("p50 <= 3x one conversation".into(), p50 <= 3.0 * base),
                _ => ("-".into(), true),
            };
            r.row(
                &format!("Pickup, {k} conversation(s), {} p50 / p99", mode.label()),
                format!("{p50:.2} / {p99:.2} ms"),
                format!(
                    "{:.1}x minimal shard; {:.1}x one conversation; pollers' CPU {cpu_ms:.2} ms/question",
                    p50 / m50,
                    p50 / base
                ),
                &target,
                (k == 1 || k == 16 || k == 64).then_some(met),
            );
            rows.push(
                json!({"conversations": k, "mode": mode.label(), "p50_ms": p50, "p99_ms": p99,
                "vs_minimal": p50 / m50, "vs_one": p50 / base, "pollers_cpu_ms_per_question": cpu_ms}),
            );
            if k == 1 {
                let py = python_coordinator(opts, &w, &convs[0], n)?;
                let (q50, q90, q99) = (pct(&py, 0.5), pct(&py, 0.9), pct(&py, 0.99));
                r.row(
                    "Pickup from a Python coordinator (sqlite3 module, the bridge server's writes) p50 / p90 / p99",
                    format!("{q50:.2} / {q90:.2} / {q99:.2} ms"),
                    format!("the same poller from our Rust harness: p50 {p50:.2} ms, p99 {p99:.2} ms"),
                    "-",
                    None,
                );
                r.json.insert(
                    "python_coordinator".into(),
                    json!({"samples": py.len(), "p50_ms": q50, "p90_ms": q90, "p99_ms": q99}),
                );
            }
            drop(pollers);
        }
    }
    let window = Duration::from_secs(if opts.quick { 2 } else { 10 });
    let idle = idle_cpu(&w, &convs[..idle_at], window)?;
    r.row(
        &format!(
            "Idle CPU of {} pollers while another conversation is asked (one of them leads the hub / the busy one does)",
            idle_at - 1
        ),
        format!(
            "{:.2}% / {:.2}% of one core over {:.1} s",
            idle.idle_leads, idle.busy_leads, idle.secs
        ),
        format!(
            "quiet bridge: {} pollers {:.3}%, one poller holding {idle_at} {:.3}%",
            idle_at, idle.quiet, idle.quiet_one
        ),
        "<= 1% at 16",
        (idle_at == 16).then_some(idle.idle_leads <= 1.0),
    );
    r.json.insert(
        "conversations".into(),
        json!({"samples": n, "minimal_shard": {"p50_ms": m50, "p99_ms": m99},
            "pickup": Value::Array(rows),
            "idle": {"pollers": idle_at - 1, "cpu_percent_while_other_asked": idle.idle_leads,
                     "cpu_percent_while_other_asked_busy_leads": idle.busy_leads, "seconds": idle.secs,
                     "quiet_separate_cpu_percent": idle.quiet, "quiet_one_poller_cpu_percent": idle.quiet_one}}),
    );
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A poller per conversation.
    Separate,
    /// One poller with a tokens file.
    One,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Separate => "a poller each",
            Mode::One => "one poller",
        }
    }
}

fn poller(w: &World, args: &[&str], envs: &[(&str, &str)]) -> Res<Daemon> {
    Daemon::spawn(
        Command::new(w.bin.join("autopoll-poller"))
            .args(["-q", "--name", "mc", "--runtime-dir"])
            .arg(w.runtime())
            .arg("--db")
            .arg(w.db())
            .args(args)
            .envs(envs.iter().copied()),
        "autopoll-poller",
        crate::log_path(w.dir.path(), "poller"),
    )
}

/// The CPU time of all of `ps`, seconds (to the nanosecond).
fn cpu(ps: &[Daemon]) -> f64 {
    ps.iter().map(|p| procs::cpu_secs_exact(p.pid())).sum()
}

/// A poller for conversation `c` alone.
fn separate(w: &World, c: &NewConversation) -> Res<Daemon> {
    poller(
        w,
        &["--conversation", &c.conversation_id, "--concurrency", "2"],
        &[("AUTOPOLL_TOKEN", &c.session_b_token)],
    )
}

fn start(w: &World, convs: &[NewConversation], mode: Mode) -> Res<Vec<Daemon>> {
    match mode {
        Mode::Separate => convs.iter().map(|c| separate(w, c)).collect(),
        Mode::One => {
            let path = w.dir.path().join("tokens");
            write_tokens(&path, convs)?;
            let p = path.to_str().unwrap_or_default();
            Ok(vec![poller(
                w,
                &["--tokens-file", p, "--concurrency", "8"],
                &[],
            )?])
        }
    }
}

fn write_tokens(path: &Path, convs: &[NewConversation]) -> Res<()> {
    let text: String = convs
        .iter()
        .map(|c| format!("{} {}\n", c.conversation_id, c.session_b_token))
        .collect();
    std::fs::write(path, text).map_err(e("tokens file"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(e("tokens file"))
}

/// Until every conversation's poller has written a live heartbeat.
fn wait_alive(w: &World, convs: &[NewConversation]) -> Res<()> {
    let b = Bridge::open(w.db()).map_err(e("bridge"))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let alive = convs.iter().all(|c| {
            b.session_status(&c.conversation_id, Session::B)
                .ok()
                .flatten()
                .is_some_and(|s| s.alive)
        });
        if alive {
            // Their startup writes settle.
            std::thread::sleep(Duration::from_millis(300));
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err("the pollers did not all start within 60 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Send a query to `conv` from session a; wait (checking every 50 us, as
/// `pickup` does) until its answer is committed. Timed from before the
/// send, so the question's own commit is included (in the minimal shard's
/// figure too).
fn ask(b: &mut Bridge, ro: &Connection, conv: &NewConversation, qid: &str) -> Res<Duration> {
    let text = shard::query_text(qid, QUESTION);
    // Timed from before the send: a poller can take the question and
    // answer it between the send's commit and its return to us (on a busy
    // machine this thread is preempted there), which timed from after the
    // send counted as a pickup of a few microseconds.
    let t = Instant::now();
    let sent = b
        .send(
            &conv.conversation_id,
            Session::A,
            &conv.session_a_token,
            &text,
            None,
        )
        .map_err(e("send"))?;
    let mut st = ro
        .prepare_cached(
            "SELECT id FROM messages WHERE conversation_id = ?1 AND to_session = 'a' AND id > ?2 LIMIT 1",
        )
        .map_err(e("query"))?;
    loop {
        if st
            .query_row(params![conv.conversation_id, sent.id], |r| {
                r.get::<_, i64>(0)
            })
            .is_ok()
        {
            return Ok(t.elapsed());
        }
        if t.elapsed() > Duration::from_secs(30) {
            return Err(format!("no answer to {qid} within 30 s"));
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// The reference: `n` questions, each answered by the least a shard can do,
/// timed from the question's send (its commit included) to the answer's
/// commit.
fn minimal_shard(w: &World, conv: &NewConversation, n: usize) -> Res<Vec<f64>> {
    let mut b = Bridge::open(w.db()).map_err(e("bridge"))?;
    let mut db = Connection::open(w.db()).map_err(e("shard connection"))?;
    db.busy_timeout(Duration::from_secs(10))
        .map_err(e("busy timeout"))?;
    // As every bridge connection is set up (WAL is the file's already).
    db.execute_batch("PRAGMA synchronous=NORMAL;")
        .map_err(e("synchronous"))?;
    let mut client = w.client("mc")?;
    let t = Duration::from_secs(10);
    let mut lat = Vec::with_capacity(n);
    for i in 0..(n + 10) {
        let text = shard::query_text(&format!("q-min-{i}"), QUESTION);
        // Timed from before the send, as the pollers' pickups are.
        let start = Instant::now();
        b.send(
            &conv.conversation_id,
            Session::A,
            &conv.session_a_token,
            &text,
            None,
        )
        .map_err(e("send"))?;
        // Claim commit.
        let tx = db
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(e("claim"))?;
        // Statements prepared once, as a shard that runs for weeks would.
        let id: i64 = tx
            .prepare_cached(
                "SELECT id FROM messages WHERE conversation_id = ?1 AND to_session = 'b' AND read = 0
                 ORDER BY id LIMIT 1",
            )
            .and_then(|mut st| st.query_row([&conv.conversation_id], |r| r.get(0)))
            .map_err(e("claim select"))?;
        cached(
            &tx,
            "INSERT INTO autopoll_claims (message_id, conversation_id, to_session, owner,
               lease_until_ms, attempts, first_claimed_at, last_claimed_at)
             VALUES (?1, ?2, 'b', 'minimal', 0, 1, '', '')",
            params![id, conv.conversation_id],
        )
        .map_err(e("claim insert"))?;
        tx.commit().map_err(e("claim commit"))?;
        // FIFO round trip to the real server.
        let a = client.ask(QUESTION, t).map_err(e("ask"))?;
        // Answer commit.
        let tx = db
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(e("answer"))?;
        cached(
            &tx,
            "INSERT INTO messages (conversation_id, from_session, to_session, message, metadata, timestamp)
             VALUES (?1, 'b', 'a', ?2, '{}', '')",
            params![conv.conversation_id, a.answer],
        )
        .map_err(e("answer insert"))?;
        cached(
            &tx,
            "UPDATE messages SET read = 1 WHERE id = ?1",
            params![id],
        )
        .map_err(e("mark read"))?;
        cached(
            &tx,
            "DELETE FROM autopoll_claims WHERE message_id = ?1",
            params![id],
        )
        .map_err(e("claim delete"))?;
        tx.commit().map_err(e("answer commit"))?;
        if i >= 10 {
            lat.push(start.elapsed().as_secs_f64() * 1e6);
        }
    }
    Ok(sorted(lat))
}

/// `n` questions to `conv` from `tests/fixtures/py_coordinator.py`: sent
/// as the Python bridge server writes them, with Python's own SQLite, so
/// the poller meets the commit pattern of the real coordinator (which once
/// hid one wake in ten from it). Microseconds, sorted.
fn python_coordinator(
    opts: &Options,
    w: &World,
    conv: &NewConversation,
    n: usize,
) -> Res<Vec<f64>> {
    let out = Command::new("python3")
        .arg(opts.fixtures.join("py_coordinator.py"))
        .arg(w.db())
        .arg(&conv.conversation_id)
        .arg(&conv.session_a_token)
        .arg(n.to_string())
        .stdin(Stdio::null())
        .output()
        .map_err(e("python3 py_coordinator.py"))?;
    if !out.status.success() {
        return Err(format!(
            "py_coordinator.py failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let us: Vec<f64> =
        serde_json::from_slice(&out.stdout).map_err(e("py_coordinator.py output"))?;
    Ok(sorted(us))
}

/// Run `sql` on a statement prepared once per connection.
fn cached(tx: &Connection, sql: &str, p: &[&dyn rusqlite::ToSql]) -> rusqlite::Result<usize> {
    tx.prepare_cached(sql)?.execute(p)
}

/// A poller per conversation, `convs[leader]`'s started (and alive) before
/// the others, so it leads their hub ([`autopoll_poller::hub`]); in
/// `convs` order.
fn separate_led_by(w: &World, convs: &[NewConversation], leader: usize) -> Res<Vec<Daemon>> {
    let first = separate(w, &convs[leader])?;
    wait_alive(w, &convs[leader..=leader])?;
    let mut all = Vec::with_capacity(convs.len());
    for (i, c) in convs.iter().enumerate() {
        if i != leader {
            all.push(separate(w, c)?);
        }
    }
    all.insert(leader, first);
    wait_alive(w, convs)?;
    Ok(all)
}

/// The CPU of all of `pollers` but the first while the first conversation
/// is asked one question after another for `window`, as a share of a core
/// (clock ticks are 10 ms: the window must be seconds); and the seconds.
fn busy_neighbour(
    w: &World,
    convs: &[NewConversation],
    pollers: &[Daemon],
    window: Duration,
) -> Res<(f64, f64)> {
    let mut b = Bridge::open(w.db()).map_err(e("bridge"))?;
    let ro = crate::read_only(&w.db())?;
    let (c0, t0) = (cpu(&pollers[1..]), Instant::now());
    let mut i = 0;
    while t0.elapsed() < window {
        ask(
            &mut b,
            &ro,
            &convs[0],
            &format!("idle-{}-{i}", pollers.len()),
        )?;
        i += 1;
    }
    let secs = t0.elapsed().as_secs_f64();
    Ok(((cpu(&pollers[1..]) - c0) / secs * 100.0, secs))
}

/// The idle pollers' CPU: a poller per conversation, the first
/// conversation asked for `window` while the others wait, once with an
/// idle poller leading the hub (the worst case: it reads every commit for
/// all) and once with the busy one leading; then the quiet cost of all of
/// them, and of one poller holding all.
fn idle_cpu(w: &World, convs: &[NewConversation], window: Duration) -> Res<Idle> {
    let quiet_secs = window.as_secs_f64();
    let pollers = separate_led_by(w, convs, convs.len() - 1)?;
    let (idle_leads, secs) = busy_neighbour(w, convs, &pollers, window)?;
    let (c0, t0) = (cpu(&pollers), Instant::now());
    std::thread::sleep(Duration::from_secs_f64(quiet_secs));
    let quiet = (cpu(&pollers) - c0) / t0.elapsed().as_secs_f64() * 100.0;
    drop(pollers);
    let pollers = separate_led_by(w, convs, 0)?;
    let (busy_leads, _) = busy_neighbour(w, convs, &pollers, window)?;
    drop(pollers);
    let one = start(w, convs, Mode::One)?;
    wait_alive(w, convs)?;
    let (c0, t0) = (cpu(&one), Instant::now());
    std::thread::sleep(Duration::from_secs_f64(quiet_secs));
    let quiet_one = (cpu(&one) - c0) / t0.elapsed().as_secs_f64() * 100.0;
    Ok(Idle {
        idle_leads,
        busy_leads,
        secs,
        quiet,
        quiet_one,
    })
}

/// What [`idle_cpu`] measured, in % of one core.
struct Idle {
    /// The idle pollers while another conversation is asked, one of them
    /// leading the hub.
    idle_leads: f64,
    /// The same with the busy poller leading.
    busy_leads: f64,
    /// The length of the busy window.
    secs: f64,
    /// All pollers on a quiet bridge.
    quiet: f64,
    /// One poller holding all the conversations, quiet.
    quiet_one: f64,
}
