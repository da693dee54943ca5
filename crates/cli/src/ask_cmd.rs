//! `autopoll ask` and `autopoll status`: talk to a running server directly.

use std::io::Read;
use std::time::{Duration, Instant};

use autopoll_protocol::{Client, ClientOptions, Stats};
use clap::Args;
use serde_json::json;

use crate::exit::{self, CliError};
use crate::table;
use crate::target::Target;

/// `autopoll ask`.
#[derive(Debug, Args)]
pub struct AskArgs {
    #[command(flatten)]
    target: Target,
    /// Seconds to wait for the answer, connecting included.
    #[arg(long, value_name = "SECS", default_value_t = 30.0, value_parser = crate::flags::positive_secs)]
    timeout: f64,
    /// Print a JSON object: answer, sources, found, context_version, engine, elapsed_ms.
    #[arg(long)]
    json: bool,
    /// The question (several words are joined); read from stdin when absent.
    #[arg(value_name = "QUESTION")]
    question: Vec<String>,
}

/// `autopoll status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    target: Target,
    /// Also show the bridge's queues (unread, claimed, answered, dead letters, heartbeats):
    /// its SQLite file or PostgreSQL URL.
    #[arg(long, env = "AUTOPOLL_DB", value_name = "PATH|URL")]
    db: Option<std::path::PathBuf>,
    /// With --db: only this conversation.
    #[arg(long, env = "AUTOPOLL_CONVERSATION", value_name = "ID")]
    conversation: Option<String>,
    /// Seconds to wait for the server.
    #[arg(long, value_name = "SECS", default_value_t = 5.0, value_parser = crate::flags::positive_secs)]
    timeout: f64,
    /// Print the statistics as JSON.
    #[arg(long)]
    json: bool,
}

fn connect(target: &Target, timeout: Duration, client: &str) -> Result<Client, CliError> {
    let paths = target.paths()?;
    let opts = ClientOptions {
        connect_timeout: timeout,
        client_name: client.into(),
        ..ClientOptions::default()
    };
    Ok(Client::connect(&paths, &opts)?)
}

/// Run `autopoll ask`.
pub fn ask(args: AskArgs) -> Result<(), CliError> {
    let question = if args.question.is_empty() {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| CliError::new(exit::FAILURE, format!("reading stdin: {e}")))?;
        s
    } else {
        args.question.join(" ")
    };
    if question.trim().is_empty() {
        return Err(CliError::new(exit::INVALID, "the question is empty"));
    }
    let timeout = Duration::from_secs_f64(args.timeout);
    let started = Instant::now();
    let mut client = connect(&args.target, timeout, "autopoll-ask")?;
    let left = timeout
        .saturating_sub(started.elapsed())
        .max(Duration::from_millis(1));
    let a = client.ask(question.trim_end_matches('\n'), left)?;
    let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
    if args.json {
        println!(
            "{}",
            json!({
                "answer": a.answer,
                "sources": a.sources,
                "found": a.found,
                "context_version": a.context_version,
                "engine": a.engine,
                "elapsed_ms": elapsed_ms,
                "server_ms": a.elapsed_ms,
                "invalid_sources": a.invalid_sources,
                "backend": a.backend,
            })
        );
    } else {
        println!("{}", a.answer);
        if !a.sources.is_empty() {
            println!();
            println!("sources:");
            for s in &a.sources {
                println!("  {s}");
            }
        }
        eprintln!(
            "({elapsed_ms:.1} ms; server `{}` [{}], context {})",
            args.target.name, a.engine, a.context_version
        );
    }
    Ok(())
}

fn print_stats(s: &Stats, fifo: &std::path::Path) {
    let e = &s.engine;
    println!(
        "server     {} (pid {}, autopoll {}, protocol {})",
        s.server, s.pid, s.version, s.protocol
    );
    println!("fifo       {}", fifo.display());
    println!("uptime     {}", table::age(Some(s.uptime_secs)));
    println!(
        "requests   {} answered, {} errors, {} in flight, {} sessions, {} workers",
        s.requests, s.errors, s.in_flight, s.sessions, s.workers
    );
    println!(
        "latency    p50 {:.2} ms, p99 {:.2} ms",
        s.latency_p50_ms, s.latency_p99_ms
    );
    println!(
        "engine     {}{}: {} files, {} passages, {}, context {}",
        e.name,
        if e.down { " (DOWN)" } else { "" },
        e.files,
        e.passages,
        table::bytes(e.bytes),
        e.context_version
    );
    println!("loaded     {} ({} reloads)", e.loaded_at, e.reloads);
    if let Some(c) = s.cost_usd {
        println!("cost       ${c:.4} since start (all workers, failed turns included)");
    }
    if let Some(err) = &e.last_reload_error {
        println!("reload     FAILED, kept the previous index: {err}");
    }
    for w in &s.instances {
        println!(
            "worker {:<3} pid {:<8} {:<10} served {:<6} restarts {:<4}{}{}",
            w.worker,
            w.pid.map_or_else(|| "-".into(), |p| p.to_string()),
            w.state,
            w.served,
            w.restarts,
            w.cost_usd
                .map(|c| format!(" cost ${c:.4}"))
                .unwrap_or_default(),
            w.last_error
                .as_deref()
                .map(|e| format!("  last error: {e}"))
                .unwrap_or_default(),
        );
    }
}

/// Run `autopoll status`: the server's statistics, and with `--db` the
/// bridge's queues. Exit 10 when the server is not running (the bridge part
/// is still shown).
pub fn status(args: StatusArgs) -> Result<(), CliError> {
    let timeout = Duration::from_secs_f64(args.timeout);
    let server =
        connect(&args.target, timeout, "autopoll-status").and_then(|mut c| Ok(c.stats(timeout)?));
    let bridge = match &args.db {
        Some(db) => Some(
            autopoll_bridge::Target::from_path(db)
                .open(autopoll_bridge::BridgeOptions::default())?
                .stats(args.conversation.as_deref())?,
        ),
        None => None,
    };
    if args.json {
        let (s, err) = match &server {
            Ok(s) => (serde_json::to_value(s).unwrap_or_default(), None),
            Err(e) => (serde_json::Value::Null, Some(e.message.clone())),
        };
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({ "server": s, "server_error": err, "bridge": bridge })
            )
            .unwrap_or_default()
        );
    } else {
        match &server {
            Ok(s) => print_stats(s, &args.target.paths()?.requests()),
            // The reason goes to stderr once, with the exit code.
            Err(_) => println!("server     NOT RUNNING"),
        }
        if let Some(rows) = &bridge {
            println!();
            if rows.is_empty() {
                println!("bridge     no conversations");
            } else {
                print!("{}", crate::bridge_cmd::status_table(rows));
            }
        }
    }
    server.map(|_| ())
}
