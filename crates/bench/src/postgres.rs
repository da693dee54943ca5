//! `--only postgres` (issue 15): the bridge in PostgreSQL over loopback
//! against the same harness on a SQLite file, in the same run.
//!
//! - pickup-to-answer p50/p99, one question at a time, on both stores;
//! - backlog drain with 1 and 3 pollers on PostgreSQL, 1 on SQLite;
//! - what one `kill -9` of a poller holding questions costs (the longest
//!   pickup of a steady stream while it happens, lease 2 s, a second
//!   poller running), and what one PostgreSQL restart costs (the longest
//!   pickup of a steady stream across a fast-shutdown restart).
//!
//! The cluster is a private one (`autopoll_bridge::pg::cluster`: Debian's
//! binaries, initdb in a temp folder, fsync off): the figures are of
//! autopoll over PostgreSQL's protocol, not of a durable server's disk.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use autopoll_bridge::pg::cluster::Cluster;
use autopoll_bridge::pg::listen::{Listener, Queues};
use autopoll_bridge::{BridgeOptions, NewConversation, Session, Store, Target, shard};
use serde_json::json;

use crate::{Daemon, Options, Report, Res, e, pct, sorted, synthetic_context};

/// A bridge (either store), a context, a server; pollers on demand.
struct Rig {
    dir: tempfile::TempDir,
    db: String,
    bin: std::path::PathBuf,
    conv: NewConversation,
    _server: Daemon,
}

impl Rig {
    fn new(opts: &Options, db: String) -> Res<Rig> {
        let dir = tempfile::Builder::new()
            .prefix("autopoll-bench-pg-")
            .tempdir()
            .map_err(e("temp dir"))?;
        let db = if db.is_empty() {
            dir.path().join("bridge.db").to_string_lossy().into_owned()
        } else {
            db
        };
        let mut s = Target::parse(&db)
            .open(BridgeOptions {
                create: true,
                ..BridgeOptions::default()
            })
            .map_err(e("bridge"))?;
        let conv = s
            .create_conversation("coordinator", "shard", Duration::from_secs(24 * 3600))
            .map_err(e("conversation"))?;
        let ctx = dir.path().join("ctx.md");
        std::fs::write(&ctx, synthetic_context(1 << 20, 7)).map_err(e("context"))?;
        let rt = dir.path().join("rt");
        let child = Command::new(opts.bin_dir.join("autopoll-server"))
            .args(["-q", "--name", "pg", "--runtime-dir"])
            .arg(&rt)
            .arg("--context")
            .arg(&ctx)
            .args(["--workers", "2"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(e("autopoll-server"))?;
        let server = Daemon::new(child);
        let paths = autopoll_protocol::ServerPaths::new(&rt, "pg").map_err(e("paths"))?;
        let deadline = Instant::now() + Duration::from_secs(120);
        while autopoll_protocol::Client::connect(
            &paths,
            &autopoll_protocol::ClientOptions {
                connect_timeout: Duration::from_secs(5),
                ..autopoll_protocol::ClientOptions::default()
            },
        )
        .is_err()
        {
            if Instant::now() > deadline {
                return Err("the server did not come up within 120 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Rig {
            dir,
            db,
            bin: opts.bin_dir.clone(),
            conv,
            _server: server,
        })
    }

    fn store(&self) -> Res<Box<dyn Store>> {
        Target::parse(&self.db)
            .open(BridgeOptions::default())
            .map_err(e("bridge"))
    }

    fn poller(&self, args: &[&str]) -> Res<Daemon> {
        Daemon::spawn(
            Command::new(self.bin.join("autopoll-poller"))
                .args(["-q", "--name", "pg", "--runtime-dir"])
                .arg(self.dir.path().join("rt"))
                .args([
                    "--db",
                    &self.db,
                    "--conversation",
                    &self.conv.conversation_id,
                ])
                .env("AUTOPOLL_TOKEN", &self.conv.session_b_token)
                .args(args),
            "autopoll-poller (PostgreSQL)",
            crate::log_path(self.dir.path(), "poller"),
        )
    }

    fn send(&self, s: &mut dyn Store, qid: &str) -> Res<i64> {
        let text = shard::query_text(qid, "what about sokalo rekato in the transport section?");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match s.send(
                &self.conv.conversation_id,
                Session::A,
                &self.conv.session_a_token,
                &text,
                None,
            ) {
                Ok(sent) => return Ok(sent.id),
                // A restarting server refuses for a moment.
                Err(err) if err.is_transient() && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(err) => return Err(format!("send: {err}")),
            }
        }
    }

    /// Time from the send to the answer's row being visible. On SQLite
    /// the harness looks every 50 µs (a read costs microseconds there); on
    /// PostgreSQL it waits for the answer's NOTIFY and then looks, so its
    /// own looks do not load the server (each is a round trip). Timed from
    /// before the send (its commit included): a poller can answer between
    /// the send's commit and its return here.
    fn ask(&self, s: &mut dyn Store, l: Option<&mut Listener>, qid: &str) -> Res<Duration> {
        let t = Instant::now();
        let id = self.send(s, qid)?;
        let mut l = l;
        loop {
            match s.peek_unread(&self.conv.conversation_id, Session::A, id, 1) {
                Ok(v) if !v.is_empty() => return Ok(t.elapsed()),
                Ok(_) | Err(_) if t.elapsed() < Duration::from_secs(120) => {
                    match l.as_deref_mut() {
                        Some(l) => {
                            let _ = l.wait(Duration::from_millis(20));
                        }
                        None => std::thread::sleep(Duration::from_micros(50)),
                    }
                }
                _ => return Err(format!("no answer to {qid} within 120 s")),
            }
        }
    }

    /// A listener for the coordinator's session (PostgreSQL only).
    fn listener(&self) -> Res<Option<Listener>> {
        if !autopoll_bridge::store::is_postgres_url(&self.db) {
            return Ok(None);
        }
        let q = Queues::default();
        q.set(&[self.conv.conversation_id.as_str()], Session::A);
        Listener::connect(&self.db, Some(q))
            .map(Some)
            .map_err(e("LISTEN"))
    }

    fn answered(&self, s: &mut dyn Store) -> usize {
        s.stats(Some(&self.conv.conversation_id))
            .ok()
            .and_then(|st| st.into_iter().find(|x| x.session == "b"))
            .map_or(0, |b| b.answered as usize)
    }
}

fn pickup(rig: &Rig, n: usize) -> Res<(f64, f64)> {
    let _p = rig.poller(&[])?;
    let mut s = rig.store()?;
    let mut l = rig.listener()?;
    let mut lat = Vec::with_capacity(n);
    for i in 0..(n + 20) {
        let took = rig.ask(s.as_mut(), l.as_mut(), &format!("q-pu-{i}"))?;
        if i >= 20 {
            lat.push(took.as_secs_f64() * 1e6);
        }
    }
    let lat = sorted(lat);
    Ok((pct(&lat, 0.5), pct(&lat, 0.99)))
}

fn drain(rig: &Rig, n: usize, pollers: usize) -> Res<f64> {
    let mut s = rig.store()?;
    for i in 0..n {
        rig.send(s.as_mut(), &format!("q-dr-{pollers}-{i}"))?;
    }
    let before = rig.answered(s.as_mut());
    let t = Instant::now();
    let _ps: Vec<Daemon> = (0..pollers)
        .map(|_| rig.poller(&["--concurrency", "32"]))
        .collect::<Res<_>>()?;
    let deadline = t + Duration::from_secs(600);
    while rig.answered(s.as_mut()) < before + n {
        if Instant::now() > deadline {
            return Err("backlog not drained within 600 s".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// The longest pickup of a steady stream (one question every 10 ms, each
/// waited for) while `disturb` runs once at the stream's middle.
fn worst_pickup(rig: &Rig, n: usize, disturb: &mut dyn FnMut() -> Res<()>) -> Res<(f64, f64)> {
    let mut s = rig.store()?;
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        if i == n / 2 {
            disturb()?;
        }
        // A new listener each time: the restart drops the old connection.
        let mut l = rig.listener().ok().flatten();
        let took = rig.ask(s.as_mut(), l.as_mut(), &format!("q-w-{i}"))?;
        lat.push(took.as_secs_f64() * 1e6);
        std::thread::sleep(Duration::from_millis(10));
    }
    let lat = sorted(lat);
    Ok((pct(&lat, 0.5), pct(&lat, 1.0)))
}

/// The `postgres` step.
pub fn step(opts: &Options, r: &mut Report) -> Res<()> {
    let (n_pick, n_drain, n_stream) = if opts.quick {
        (100, 1_000, 40)
    } else {
        (1_000, 5_000, 200)
    };
    let mut cluster = Cluster::start().map_err(e("PostgreSQL"))?;
    let pg = |c: &Cluster| c.database().map_err(e("CREATE DATABASE"));

    let sq = Rig::new(opts, String::new())?;
    let (sq50, sq99) = pickup(&sq, n_pick)?;
    let pgr = Rig::new(opts, pg(&cluster)?)?;
    let (pg50, pg99) = pickup(&pgr, n_pick)?;
    r.row(
        "PostgreSQL: pickup-to-answer p50 / p99 (loopback)",
        format!("{pg50:.2} / {pg99:.2} ms"),
        format!("SQLite, same harness: {sq50:.2} / {sq99:.2} ms"),
        "-",
        None,
    );
    drop(pgr);
    drop(sq);

    let sq = Rig::new(opts, String::new())?;
    let sq_qps = drain(&sq, n_drain, 1)?;
    drop(sq);
    let one = Rig::new(opts, pg(&cluster)?)?;
    let pg1 = drain(&one, n_drain, 1)?;
    drop(one);
    let three = Rig::new(opts, pg(&cluster)?)?;
    let pg3 = drain(&three, n_drain, 3)?;
    drop(three);
    r.row(
        "PostgreSQL: backlog drain, 1 / 3 pollers",
        format!("{pg1:.0} / {pg3:.0} q/s ({n_drain} queued)"),
        format!("SQLite, 1 poller, same harness: {sq_qps:.0} q/s"),
        "-",
        None,
    );

    // kill -9 of a poller: two pollers with 2 s leases; one is killed
    // mid-stream (whatever it holds waits for its lease).
    let k = Rig::new(opts, pg(&cluster)?)?;
    let mut a = Some(k.poller(&["--lease", "2"])?);
    let _b = k.poller(&["--lease", "2"])?;
    std::thread::sleep(Duration::from_millis(300));
    let (k50, kmax) = worst_pickup(&k, n_stream, &mut || {
        if let Some(mut d) = a.take() {
            let _ = d.child.kill();
            let _ = d.child.wait();
        }
        Ok(())
    })?;
    drop(k);
    // A PostgreSQL restart (fast shutdown, start again) mid-stream.
    let rs = Rig::new(opts, pg(&cluster)?)?;
    let _p = rs.poller(&[])?;
    std::thread::sleep(Duration::from_millis(300));
    let mut restart_secs = 0.0;
    let (r50, rmax) = worst_pickup(&rs, n_stream, &mut || {
        let t = Instant::now();
        cluster.restart().map_err(e("restart"))?;
        restart_secs = t.elapsed().as_secs_f64();
        Ok(())
    })?;
    drop(rs);
    r.row(
        "PostgreSQL: one kill -9 of a poller (lease 2 s, 2 pollers)",
        format!("longest pickup {kmax:.0} ms"),
        format!("p50 of the same stream {k50:.2} ms"),
        "-",
        None,
    );
    r.row(
        "PostgreSQL: one server restart",
        format!("longest pickup {rmax:.0} ms"),
        format!("p50 {r50:.2} ms; the restart itself took {restart_secs:.2} s"),
        "-",
        None,
    );
    r.json.insert(
        "postgres".into(),
        json!({
            "pickup": {"queries": n_pick, "pg_p50_ms": pg50, "pg_p99_ms": pg99, "sqlite_p50_ms": sq50, "sqlite_p99_ms": sq99},
            "drain": {"queued": n_drain, "pg_1_qps": pg1, "pg_3_qps": pg3, "sqlite_1_qps": sq_qps},
            "kill9": {"stream": n_stream, "lease_secs": 2, "p50_ms": k50, "max_ms": kmax},
            "restart": {"stream": n_stream, "p50_ms": r50, "max_ms": rmax, "restart_secs": restart_secs},
        }),
    );
    Ok(())
}
