//! The bridge in a real PostgreSQL (issue 15): the real binaries with
//! `--db postgres://...` against a private cluster this test process
//! starts (`autopoll_bridge::pg::cluster`; Debian's `postgresql` package,
//! which `.ci/run` installs). Without PostgreSQL these tests fail, loudly,
//! with the command that installs it; they never skip.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use autopoll_bridge::pg::cluster::Cluster;
use autopoll_bridge::{Session, Store};
use common::{Conversation, Env, TIMEOUT, describe, path_str, seed, wait_until};
use serde_json::Value;

const DOCS: &str = "# Notes

## Cache
We decided to keep the LRU cache at 64 entries.
Memory on the shard host is tight.
";

fn setup(env: &Env) -> (Conversation, String) {
    let conv = env.conversation();
    let ctx = env.path("NOTES.md");
    std::fs::write(&ctx, DOCS).unwrap();
    (conv, path_str(&ctx).to_string())
}

fn send_queries(store: &mut dyn Store, conv: &Conversation, prefix: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let qid = format!("q-{prefix}-{i}");
            let text = autopoll_bridge::shard::query_text(&qid, "how big is the cache?");
            // A restart of the server may refuse a send: try again.
            wait_until("the query is sent", TIMEOUT, || {
                store
                    .send(&conv.id, Session::A, &conv.token_a, &text, None)
                    .is_ok()
            });
            qid
        })
        .collect()
}

/// Responses to session a (left unread), by query id.
fn responses(store: &mut dyn Store, conv: &Conversation) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let Ok(msgs) = store.peek_unread(&conv.id, Session::A, after, 1000) else {
            return out;
        };
        if msgs.is_empty() {
            return out;
        }
        for m in msgs {
            after = m.id;
            let v: Value = serde_json::from_str(&m.message).unwrap();
            out.push((v["query_id"].as_str().unwrap_or("").to_string(), v));
        }
    }
}

fn expect_each_answered_once(env: &Env, conv: &Conversation, ids: &[String], timeout: Duration) {
    let mut store = env.store();
    wait_until(&format!("{} responses", ids.len()), timeout, || {
        responses(store.as_mut(), conv).len() >= ids.len()
    });
    let got = responses(store.as_mut(), conv);
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for (q, v) in &got {
        assert!(v["error"].is_null(), "an error answer: {v}");
        *counts.entry(q.as_str()).or_default() += 1;
    }
    for id in ids {
        assert_eq!(
            counts.get(id.as_str()),
            Some(&1),
            "{id} answered {:?} times",
            counts.get(id.as_str())
        );
    }
    assert_eq!(got.len(), ids.len(), "responses to unknown queries");
    let left = store.peek_unread(&conv.id, Session::B, 0, 10).unwrap();
    assert!(left.is_empty(), "questions left unread: {left:?}");
}

#[test]
fn bridge_commands_work_on_postgres_and_say_what_they_did() {
    let env = Env::postgres();
    let out = env.ok(&["bridge", "init"]);
    let v = autopoll_bridge::pg::schema::current();
    assert!(
        out.contains(&format!("PostgreSQL, autopoll schema v{v}: created")),
        "{out}"
    );
    let out = env.ok(&["bridge", "init"]);
    assert!(out.contains("already current"), "{out}");
    let conv = env.conversation();
    let a = conv.auth("a");
    let mut args: Vec<&str> = vec!["bridge", "send", "--query"];
    args.extend(a.iter().map(String::as_str));
    args.push("how big is the cache?");
    let qid = env.ok(&args);
    assert!(qid.trim().starts_with("q-"), "{qid}");
    let st = env.json(&["bridge", "status"]);
    let b = st
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["session"] == "b")
        .unwrap();
    assert_eq!(b["unread"], 1, "{st}");
    // The shard reads it (as check_messages would).
    let bb = conv.auth("b");
    let mut args: Vec<&str> = vec!["bridge", "read"];
    args.extend(bb.iter().map(String::as_str));
    let msgs = env.json(&args);
    assert_eq!(msgs.as_array().unwrap().len(), 1, "{msgs}");
    assert!(msgs[0]["message"].as_str().unwrap().contains(qid.trim()));
    // Retention: the message read above goes, nothing unread ever does
    // (the shortest retention is a second: let one pass).
    std::thread::sleep(Duration::from_millis(1100));
    let dry = env.json(&["bridge", "prune", "--older-than", "1s", "--dry-run"]);
    assert!(dry["report"]["messages"].as_u64().unwrap() >= 1, "{dry}");
    let r = env.json(&["bridge", "prune", "--older-than", "1s"]);
    assert_eq!(r["report"]["messages"], dry["report"]["messages"], "{r}");
    assert!(r["bytes_after"].as_u64().unwrap() > 0, "{r}");
    // The password is never printed.
    let url = env
        .pg
        .clone()
        .unwrap()
        .replace("autopoll@", "autopoll:s3cret@");
    let out = env
        .cmd("autopoll")
        .args(["bridge", "status", "--db", &url])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    assert!(!describe(&out).contains("s3cret"));
}

#[test]
fn an_unreachable_or_empty_database_fails_with_the_fix() {
    // Nothing listens on this port: a clear error, soon (connect timeout).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let env = Env::on_postgres(format!("postgres://autopoll:pw@127.0.0.1:{port}/x"));
    let out = env.run(&["bridge", "status"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let err = describe(&out);
    assert!(
        err.contains("cannot connect to 127.0.0.1:") && err.contains("is PostgreSQL running"),
        "{err}"
    );
    assert!(!err.contains(":pw@"), "{err}");
    // A database without the schema: make it with `bridge init`.
    let env = Env::postgres();
    let out = env.run(&["bridge", "status"]);
    assert!(!out.status.success());
    assert!(
        describe(&out).contains("autopoll bridge init --db"),
        "{}",
        describe(&out)
    );
    // sslmode=require against a server without TLS fails; the verify
    // modes without a CA certificate say where to put one.
    let url = format!("{}?sslmode=require", env.pg.clone().unwrap());
    let out = env
        .cmd("autopoll")
        .args(["bridge", "status", "--db", &url])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        describe(&out).contains("cannot connect"),
        "{}",
        describe(&out)
    );
    let url = format!("{}?sslmode=verify-full", env.pg.clone().unwrap());
    let out = env
        .cmd("autopoll")
        .env("HOME", env.dir.path())
        .env_remove("PGSSLROOTCERT")
        .args(["bridge", "status", "--db", &url])
        .output()
        .unwrap();
    assert!(
        describe(&out).contains("sslrootcert=FILE"),
        "{}",
        describe(&out)
    );
}

/// Whether the session behind `store` is encrypted (pg_stat_ssl).
fn encrypted(store: &mut dyn Store) -> bool {
    store
        .as_postgres()
        .unwrap()
        .client()
        .unwrap()
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .unwrap()
        .get(0)
}

#[test]
fn tls_per_sslmode_encrypts_and_checks_the_certificate() {
    common::pg_cluster();
    let cluster = Cluster::start_with(autopoll_bridge::pg::cluster::Listen {
        ssl: true,
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let url = cluster.database().unwrap();
    let root = cluster.ssl_cert().unwrap();
    let root = path_str(&root).to_string();
    let open = |u: &str| {
        autopoll_bridge::Target::parse(u).open(autopoll_bridge::BridgeOptions {
            create: true,
            ..Default::default()
        })
    };
    // disable: plain; prefer (the default) and require: encrypted.
    assert!(!encrypted(
        open(&format!("{url}?sslmode=disable")).unwrap().as_mut()
    ));
    assert!(encrypted(open(&url).unwrap().as_mut()));
    assert!(encrypted(
        open(&format!("{url}?sslmode=require")).unwrap().as_mut()
    ));
    // verify-full: the certificate names localhost and 127.0.0.1.
    let full = format!("{url}?sslmode=verify-full&sslrootcert={root}");
    assert!(encrypted(open(&full).unwrap().as_mut()));
    let by_name = full.replace("127.0.0.1", "localhost");
    assert!(encrypted(open(&by_name).unwrap().as_mut()));
    // Another CA: refused, saying why.
    let other = Cluster::start_with(autopoll_bridge::pg::cluster::Listen {
        ssl: true,
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let wrong = other.ssl_cert().unwrap();
    let bad = format!("{url}?sslmode=verify-ca&sslrootcert={}", path_str(&wrong));
    let err = open(&bad)
        .err()
        .expect("a foreign CA must be refused")
        .to_string();
    assert!(err.contains("cannot connect"), "{err}");
    // The binaries take the same URLs: a poller over TLS answers.
    let env = Env::on_postgres(full.clone());
    let (conv, ctx) = setup(&env);
    let _server = env.server("default", &["--context", &ctx]);
    let _p = env.poller(&conv, "default", &[]);
    let a = conv.auth("a");
    let mut args: Vec<&str> = vec!["bridge", "ask", "--timeout", "30"];
    args.extend(a.iter().map(String::as_str));
    args.push("how big is the LRU cache?");
    let out = env.ok(&args);
    assert!(out.contains("64 entries"), "{out}");
}

#[test]
fn pollers_answer_each_query_once_through_kills_on_postgres() {
    let env = Env::postgres();
    let (conv, ctx) = setup(&env);
    let _server = env.server("default", &["--context", &ctx]);
    let mut store = env.store();
    let mut all = send_queries(store.as_mut(), &conv, "k", 300);
    let mut s = seed();
    let mut pollers: Vec<_> = (0..2)
        .map(|_| env.poller(&conv, "default", &["--concurrency", "4", "--lease", "2"]))
        .collect();
    // Kill one at a random moment while the others work, three times,
    // sending more questions each time.
    for round in 0..3 {
        let before = responses(store.as_mut(), &conv).len();
        wait_until("more answers", TIMEOUT, || {
            responses(store.as_mut(), &conv).len() > before
        });
        let victim = (common::rng(&mut s) % pollers.len() as u64) as usize;
        pollers[victim].kill9();
        pollers[victim] = env.poller(&conv, "default", &["--concurrency", "4", "--lease", "2"]);
        all.extend(send_queries(
            store.as_mut(),
            &conv,
            &format!("r{round}"),
            20,
        ));
    }
    expect_each_answered_once(&env, &conv, &all, TIMEOUT * 4);
    // The heartbeat names the host.
    let st = store.stats(Some(&conv.id)).unwrap();
    let b = st.iter().find(|x| x.session == "b").unwrap();
    assert!(b.host.as_deref().is_some_and(|h| !h.is_empty()), "{b:?}");
    let table = env.ok(&["bridge", "status"]);
    assert!(
        table.contains("HOST") && table.contains(b.host.as_deref().unwrap()),
        "{table}"
    );
    for p in &mut pollers {
        assert!(p.alive(), "a poller died: {}", p.log());
    }
}

#[test]
fn a_postgres_restart_mid_run_loses_nothing_and_answers_none_twice() {
    // A cluster of its own: the restart must not disturb the other tests.
    common::pg_cluster();
    let mut cluster = Cluster::start().unwrap_or_else(|e| panic!("{e}"));
    let env = Env::on_postgres(cluster.database().unwrap());
    let (conv, ctx) = setup(&env);
    let _server = env.server("default", &["--context", &ctx]);
    let mut p = env.poller(&conv, "default", &["--concurrency", "4", "--lease", "2"]);
    let mut ids = {
        let mut store = env.store();
        send_queries(store.as_mut(), &conv, "before", 100)
    };
    {
        let mut store = env.store();
        wait_until("some answers", TIMEOUT, || {
            !responses(store.as_mut(), &conv).is_empty()
        });
    }
    cluster.restart().unwrap_or_else(|e| panic!("{e}"));
    {
        let mut store = env.store();
        ids.extend(send_queries(store.as_mut(), &conv, "after", 100));
    }
    expect_each_answered_once(&env, &conv, &ids, TIMEOUT * 4);
    assert!(p.alive(), "the poller died: {}", p.log());
    let log = p.log();
    assert!(
        log.contains("event=pg_listen_lost") || log.contains("event=pg_reconnected"),
        "{log}"
    );
}

#[test]
fn bridge_ask_is_answered_through_postgres() {
    let env = Env::postgres();
    let (conv, ctx) = setup(&env);
    let _server = env.server("default", &["--context", &ctx]);
    let _p = env.poller(&conv, "default", &[]);
    let a = conv.auth("a");
    let mut args: Vec<&str> = vec!["bridge", "ask", "--timeout", "30"];
    args.extend(a.iter().map(String::as_str));
    args.push("how big is the LRU cache?");
    let out = env.ok(&args);
    assert!(out.contains("64 entries"), "{out}");
    assert!(out.contains("NOTES.md:"), "{out}");
}

#[test]
fn bridge_copy_moves_unread_and_claimed_messages_once_and_pollers_finish_them() {
    // A SQLite bridge with history: an answered question, a claimed one (a
    // poller holds it), unread ones, and a Python-shaped file's rows.
    let file = Env::new();
    let (conv, ctx) = setup(&file);
    let mut sq = file.store();
    let done = send_queries(sq.as_mut(), &conv, "done", 1);
    let me = autopoll_bridge::Claimer::new("old-shard").unwrap();
    let o = autopoll_bridge::ClaimOptions {
        limit: 1,
        lease: Duration::from_secs(600),
        max_attempts: 3,
    };
    let b = sq.claim(&me, &conv.id, Session::B, &o).unwrap();
    let text = serde_json::json!({"type": "response", "query_id": "q-done-0", "answer": "old"})
        .to_string();
    let mut a = autopoll_bridge::Answer::new(b.claimed[0].message.id, text);
    a.repeat_key = Some("q-done-0".into());
    sq.complete(&me, &[a]).unwrap();
    let held = send_queries(sq.as_mut(), &conv, "held", 1);
    let held_claim = sq.claim(&me, &conv.id, Session::B, &o).unwrap();
    assert_eq!(held_claim.claimed.len(), 1);
    let unread = send_queries(sq.as_mut(), &conv, "unread", 5);
    drop(sq);

    let pg = Env::postgres();
    let db = path_str(&file.db()).to_string();
    let url = pg.pg.clone().unwrap();
    let out = pg.json(&["bridge", "copy", "--from", &db, "--to", &url]);
    let c = &out["copied"];
    assert_eq!(c["conversations"], 1, "{out}");
    assert_eq!(c["messages"], 8, "{out}");
    // Unread: the held question, the five, and the answer the coordinator has not read.
    assert_eq!(c["unread"], 7, "{out}");
    assert_eq!(
        (c["claims"].as_u64(), c["claims_released"].as_u64()),
        (Some(1), Some(1)),
        "{out}"
    );
    assert_eq!(c["answers"], 1, "{out}");
    // A second copy is refused: nothing is ever in PostgreSQL twice.
    let again = pg.run(&["bridge", "copy", "--from", &db, "--to", &url]);
    assert!(!again.status.success());
    assert!(
        describe(&again).contains("copy into an empty database"),
        "{}",
        describe(&again)
    );

    // The same tokens work; a poller on PostgreSQL answers what was left,
    // the released claim included (attempt 2), and nothing twice.
    let _server = pg.server("default", &["--context", &ctx]);
    let _p = pg.poller(&conv, "default", &[]);
    let mut want: Vec<String> = held.clone();
    want.extend(unread.iter().cloned());
    let mut store = pg.store();
    wait_until("the copied questions answered", TIMEOUT * 2, || {
        responses(store.as_mut(), &conv).len() > want.len()
    });
    let got = responses(store.as_mut(), &conv);
    let mut counts: HashMap<String, usize> = HashMap::new();
    for (q, _) in &got {
        *counts.entry(q.clone()).or_default() += 1;
    }
    for q in want.iter().chain(done.iter()) {
        assert_eq!(counts.get(q), Some(&1), "{q}: {got:?}");
    }
    let held_resp = got.iter().find(|(q, _)| q == &held[0]).unwrap();
    assert_eq!(held_resp.1["attempts"], 2, "{}", held_resp.1);
    // A repeat of the query answered in the file gets the stored answer.
    let text = autopoll_bridge::shard::query_text("q-done-0", "again?");
    store
        .send(&conv.id, Session::A, &conv.token_a, &text, None)
        .unwrap();
    wait_until("the repeat answered", TIMEOUT, || {
        responses(store.as_mut(), &conv)
            .iter()
            .filter(|(q, _)| q == "q-done-0")
            .count()
            == 2
    });
    let rep = responses(store.as_mut(), &conv);
    let last = rep.iter().rev().find(|(q, _)| q == "q-done-0").unwrap();
    assert_eq!(last.1["answer"], "old", "{}", last.1);
    let left = store.peek_unread(&conv.id, Session::B, 0, 10).unwrap();
    assert!(left.is_empty(), "{left:?}");
}

/// `autopoll doctor --json` for session b of `conv` against server `default`.
fn doctor(env: &Env, conv: &Conversation, db: &str) -> Value {
    let out = env
        .cmd("autopoll")
        .args(["doctor", "--json", "--name", "default", "--runtime-dir"])
        .arg(env.runtime())
        .args(["--db", db])
        .env("AUTOPOLL_CONVERSATION", &conv.id)
        .env("AUTOPOLL_TOKEN", &conv.token_b)
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("doctor printed no JSON ({e}): {}", describe(&out)))
}

fn check<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name} in {report:#}"))
}

#[test]
fn doctor_checks_postgres_connection_privileges_and_clock() {
    let env = Env::postgres();
    let (conv, ctx) = setup(&env);
    let _server = env.server("default", &["--context", &ctx]);
    let _p = env.poller(&conv, "default", &[]);
    let url = env.pg.clone().unwrap();
    wait_until("the poller's heartbeat", TIMEOUT, || {
        env.store()
            .session_status(&conv.id, Session::B)
            .unwrap()
            .is_some()
    });
    let r = doctor(&env, &conv, &url);
    for name in [
        "bridge",
        "privileges",
        "clock",
        "token",
        "heartbeat",
        "queue",
    ] {
        assert_eq!(check(&r, name)["status"], "pass", "{name}: {r:#}");
    }
    assert!(
        check(&r, "bridge")["detail"]
            .as_str()
            .unwrap()
            .contains("PostgreSQL"),
        "{r:#}"
    );
    assert_eq!(check(&r, "disk")["status"], "skip", "{r:#}");
    // A user who may connect but not touch the tables: told what to grant.
    let mut admin = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    admin
        .batch_execute("DROP ROLE IF EXISTS autopoll_nopriv; CREATE ROLE autopoll_nopriv LOGIN")
        .unwrap();
    let weak = url.replace("autopoll@", "autopoll_nopriv@");
    let r = doctor(&env, &conv, &weak);
    let b = check(&r, "bridge");
    assert_eq!(b["status"], "fail", "{r:#}");
    assert!(b["detail"].as_str().unwrap().contains("GRANT"), "{r:#}");
    assert_eq!(r["ok"], false);
}

/// A shard host's namespace and the database's address as it sees it.
type ShardHost = (String, String);

/// Network namespaces made for one test, removed when dropped.
struct Hosts {
    names: Vec<String>,
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", n])
                .status();
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A database host and `n` shard hosts as network namespaces, each shard
/// host joined to the database host by its own veth pair: 10.213.I.1 on
/// the database side, 10.213.I.2 on host I. The addresses exist inside
/// the namespaces only. Returns the namespaces and, per shard host, the
/// database's address as that host sees it.
fn make_hosts(n: usize) -> Result<(Hosts, String, Vec<ShardHost>), String> {
    let tag = std::process::id() % 100_000;
    let db = format!("ap{tag}-db");
    let mut hosts = Hosts { names: Vec::new() };
    ip(&["netns", "add", &db])?;
    hosts.names.push(db.clone());
    ip(&["netns", "exec", &db, "ip", "link", "set", "lo", "up"])?;
    let mut out = Vec::new();
    for i in 1..=n {
        let h = format!("ap{tag}-h{i}");
        ip(&["netns", "add", &h])?;
        hosts.names.push(h.clone());
        let (a, b) = (format!("ap{tag}d{i}"), format!("ap{tag}h{i}"));
        ip(&["link", "add", &a, "type", "veth", "peer", "name", &b])?;
        ip(&["link", "set", &a, "netns", &db])?;
        ip(&["link", "set", &b, "netns", &h])?;
        let (da, ha) = (format!("10.213.{i}.1/24"), format!("10.213.{i}.2/24"));
        ip(&["netns", "exec", &db, "ip", "addr", "add", &da, "dev", &a])?;
        ip(&["netns", "exec", &db, "ip", "link", "set", &a, "up"])?;
        ip(&["netns", "exec", &h, "ip", "addr", "add", &ha, "dev", &b])?;
        ip(&["netns", "exec", &h, "ip", "link", "set", &b, "up"])?;
        ip(&["netns", "exec", &h, "ip", "link", "set", "lo", "up"])?;
        out.push((h, format!("10.213.{i}.1")));
    }
    Ok((hosts, db, out))
}

#[test]
fn pollers_on_three_hosts_share_one_postgres_through_kills_and_a_restart() {
    common::pg_cluster();
    let made = make_hosts(3);
    let (_hosts, mut cluster, shard_hosts) = match made {
        Ok((hosts, db, shard_hosts)) => {
            let listen = autopoll_bridge::pg::cluster::Listen {
                netns: Some(db),
                addresses: Some("*".into()),
                hba: vec!["host all all 10.213.0.0/16 trust".into()],
                ssl: false,
            };
            let c = Cluster::start_with(listen).unwrap_or_else(|e| panic!("{e}"));
            (Some(hosts), c, Some(shard_hosts))
        }
        Err(why) => {
            eprintln!(
                "MULTI-HOST: network namespaces cannot be made here ({why}); \
                 RUNNING THE SAME CASE OVER LOOPBACK INSTEAD"
            );
            (
                None,
                Cluster::start().unwrap_or_else(|e| panic!("{e}")),
                None,
            )
        }
    };
    // The test itself (the coordinator) reaches the database through its
    // Unix socket (shared file system); the pollers through their hosts'
    // networks.
    let local = cluster.database().unwrap_or_else(|e| panic!("{e}"));
    let dbname = local.rsplit('/').next().unwrap().to_string();
    let env = Env::on_postgres(local);
    let (conv, ctx) = setup(&env);
    let _server = env.server("default", &["--context", &ctx]);
    let poller_args = ["--concurrency", "4", "--lease", "2"];
    let port = cluster.port;
    let start = |i: usize| match &shard_hosts {
        Some(hs) => {
            let (ns, addr) = &hs[i];
            let url = format!("postgres://autopoll@{addr}:{port}/{dbname}");
            env.poller_in(ns, &url, &conv, "default", &poller_args)
        }
        None => env.poller(&conv, "default", &poller_args),
    };
    let mut pollers: Vec<_> = (0..3).map(start).collect();
    let mut s = seed();
    let mut ids = Vec::new();
    for round in 0..10 {
        let mut store = env.store();
        ids.extend(send_queries(
            store.as_mut(),
            &conv,
            &format!("m{round}"),
            100,
        ));
        drop(store);
        // A kill at a random moment: after a random short while.
        std::thread::sleep(Duration::from_millis(common::rng(&mut s) % 150));
        let victim = (common::rng(&mut s) % 3) as usize;
        pollers[victim].kill9();
        pollers[victim] = start(victim);
        if round == 5 {
            cluster.restart().unwrap_or_else(|e| panic!("{e}"));
        }
    }
    expect_each_answered_once(&env, &conv, &ids, TIMEOUT * 6);
    for p in &mut pollers {
        assert!(p.alive(), "a poller died: {}", p.log());
    }
    if shard_hosts.is_some() {
        // Each host's poller did answer over its own network.
        let answered: usize = pollers
            .iter()
            .filter(|p| p.log().contains("event=query_answered"))
            .count();
        assert!(answered >= 1, "no poller answered");
    }
}

#[test]
fn an_older_schema_is_refused_until_init_migrates_it_forward() {
    let env = Env::postgres();
    let url = env.pg.clone().unwrap();
    // A database at schema version 1, as an older autopoll left it.
    let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    c.batch_execute(autopoll_bridge::pg::schema::MIGRATIONS[0])
        .unwrap();
    c.execute(
        "INSERT INTO autopoll_meta (key, value) VALUES ($1, '1')",
        &[&autopoll_bridge::pg::schema::VERSION_KEY],
    )
    .unwrap();
    let out = env.run(&["bridge", "status"]);
    assert!(!out.status.success());
    assert!(
        describe(&out).contains("migrate it with `autopoll bridge init --db"),
        "{}",
        describe(&out)
    );
    let out = env.ok(&["bridge", "init"]);
    assert!(out.contains("migrated from v1"), "{out}");
    env.ok(&["bridge", "status"]);
    // A newer schema than ours is refused, never downgraded.
    c.execute(
        "UPDATE autopoll_meta SET value = '999' WHERE key = $1",
        &[&autopoll_bridge::pg::schema::VERSION_KEY],
    )
    .unwrap();
    let out = env.run(&["bridge", "init"]);
    assert!(
        describe(&out).contains("newer than this autopoll"),
        "{}",
        describe(&out)
    );
}

#[test]
fn an_answer_committed_after_a_later_id_is_still_found_by_bridge_ask() {
    // Ids are taken at insert, rows show at commit: with two writers a
    // lower id can appear after a higher one. The waiter must not skip it
    // (regression: it kept a cursor past the higher id and timed out).
    let env = Env::postgres();
    let conv = env.conversation();
    let a = conv.auth("a");
    let mut args: Vec<String> = vec![
        "bridge".into(),
        "ask".into(),
        "--timeout".into(),
        "30".into(),
    ];
    args.extend(a.iter().cloned());
    args.push("is the late answer found?".into());
    let ask = env
        .cmd("autopoll")
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut store = env.store();
    let mut qid = String::new();
    wait_until("the query is sent", TIMEOUT, || {
        let q = store.peek_unread(&conv.id, Session::B, 0, 10).unwrap();
        if let Some(m) = q.first() {
            let v: Value = serde_json::from_str(&m.message).unwrap();
            qid = v["query_id"].as_str().unwrap().to_string();
        }
        !qid.is_empty()
    });
    let url = env.pg.clone().unwrap();
    let mut w1 = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let mut w2 = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let insert =
        "INSERT INTO messages (conversation_id, from_session, to_session, message, metadata)
                  VALUES ($1, 'b', 'a', $2, '{\"action_type\": \"response\"}'::jsonb)";
    let answer =
        serde_json::json!({"type": "response", "query_id": qid, "answer": "the late answer"})
            .to_string();
    let other =
        serde_json::json!({"type": "response", "query_id": "q-someone-else", "answer": "x"})
            .to_string();
    // Writer 1 takes the lower id and holds its commit.
    let mut t1 = w1.transaction().unwrap();
    t1.execute(insert, &[&conv.id, &answer]).unwrap();
    // Writer 2 takes a higher id and commits first; the waiter sees it.
    w2.execute(insert, &[&conv.id, &other]).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    t1.commit().unwrap();
    let out = ask.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("the late answer"),
        "{}",
        describe(&out)
    );
}
