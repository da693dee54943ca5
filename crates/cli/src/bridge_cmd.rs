//! `autopoll bridge ...`: administer the bridge (a SQLite file or a
//! PostgreSQL database, see `autopoll_bridge::store`) from a shell.

use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use autopoll_bridge::shard::{self, Response};
use autopoll_bridge::{Bridge, BridgeOptions, Session, SessionStats, Store, Target};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Value, json};

use crate::exit::{self, CliError};
use crate::table;

/// Arguments of `autopoll bridge`.
#[derive(Debug, Args)]
pub struct BridgeArgs {
    #[command(subcommand)]
    cmd: BridgeCmd,
}

/// Options every bridge subcommand takes.
#[derive(Debug, Clone, Args)]
struct Common {
    /// The bridge: its SQLite file, or a PostgreSQL URL
    /// (postgres://USER@HOST:PORT/DBNAME; PG* variables fill in what it leaves out).
    #[arg(long, env = "AUTOPOLL_DB", value_name = "PATH|URL")]
    db: PathBuf,
    /// Print machine-readable JSON on stdout instead of text.
    #[arg(long)]
    json: bool,
}

/// Which side of a conversation, and its token.
#[derive(Debug, Clone, Args)]
struct Auth {
    /// Conversation id (`conv_` + 16 hex digits).
    #[arg(long, env = "AUTOPOLL_CONVERSATION", value_name = "ID")]
    conversation: String,
    /// Your session in the conversation.
    #[arg(long, env = "AUTOPOLL_SESSION", value_enum)]
    session: SessionArg,
    /// Your session's token (64 hex). Prefer the environment variable: a flag is visible in `ps`.
    #[arg(
        long,
        env = "AUTOPOLL_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    token: String,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum SessionArg {
    A,
    B,
}

impl From<SessionArg> for Session {
    fn from(s: SessionArg) -> Self {
        match s {
            SessionArg::A => Session::A,
            SessionArg::B => Session::B,
        }
    }
}

#[derive(Debug, Subcommand)]
enum BridgeCmd {
    /// Create the bridge file and its tables (idempotent; an existing file is checked and kept).
    ///
    /// A file that is someone else's SQLite database (tables, none of them the
    /// bridge's) is refused unchanged unless --force.
    Init {
        #[command(flatten)]
        common: Common,
        /// Add the bridge's tables to a SQLite file that holds other tables
        /// (and switch it to WAL). Without it such a file is left alone.
        #[arg(long)]
        force: bool,
    },
    /// Create a conversation; prints its id and both sessions' tokens.
    Create {
        #[command(flatten)]
        common: Common,
        /// Role of session a (the creator, usually the coordinator).
        #[arg(long, value_name = "ROLE")]
        role_a: String,
        /// Role of session b (usually the shard).
        #[arg(long, value_name = "ROLE")]
        role_b: String,
        /// Lifetime of the tokens in hours (the Python server uses 3).
        #[arg(long, value_name = "H", default_value_t = 3.0, value_parser = hours)]
        ttl_hours: f64,
    },
    /// Send a message (or, with --query, a query object) to the other session.
    Send {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        auth: Auth,
        /// Wrap the text as {"type":"query","query_id":..,"question":TEXT} and print the query_id.
        #[arg(long)]
        query: bool,
        /// The query_id to use with --query (default: a new q-<12 hex>).
        #[arg(long, requires = "query", value_name = "ID")]
        query_id: Option<String>,
        /// metadata.action_type (default: question with --query, info otherwise).
        #[arg(long, value_name = "TYPE", value_parser = ["question", "info", "proposal", "blocked", "complete", "response"])]
        action_type: Option<String>,
        /// The text, or `-` to read it from stdin.
        #[arg(value_name = "TEXT|-")]
        text: String,
    },
    /// Read your unread messages and mark them read (as the Python check_messages does).
    Read {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        auth: Auth,
    },
    /// Send a query and wait for the response with its query_id; prints answer and sources.
    Ask {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        auth: Auth,
        /// Seconds to wait for the answer before exiting with code 5 (the query stays queued).
        #[arg(long, value_name = "SECS", default_value_t = 60.0, value_parser = crate::flags::secs)]
        timeout: f64,
        /// The question, or `-` to read it from stdin.
        #[arg(value_name = "QUESTION|-")]
        question: String,
    },
    /// Queue state per conversation and session: unread, claimed, answered, dead letters, heartbeats.
    Status {
        #[command(flatten)]
        common: Common,
        /// Only this conversation.
        #[arg(long, env = "AUTOPOLL_CONVERSATION", value_name = "ID")]
        conversation: Option<String>,
    },
    /// Delete finished history older than a cutoff: read messages, their claims and outcomes,
    /// stored answers, audit rows. Never an unread message or one under a live claim.
    ///
    /// Then checkpoints the WAL and, when the file is in incremental auto-vacuum mode (bridges
    /// made by this autopoll are), gives the freed pages back to the file system. --vacuum runs
    /// one full VACUUM on a file that is not (it holds the write lock while it rewrites the file).
    Prune {
        #[command(flatten)]
        common: Common,
        /// Remove what is older than this: a whole number and a unit, 30s, 15m, 12h, 7d.
        #[arg(long, value_name = "DURATION", value_parser = autopoll_bridge::prune::parse_duration)]
        older_than: Duration,
        /// Count what would be removed; open the file read-only and change nothing.
        #[arg(long, conflicts_with = "vacuum")]
        dry_run: bool,
        /// When the file is not in incremental auto-vacuum mode, run one full VACUUM (which also
        /// switches it to that mode). Takes the write lock for as long as it rewrites the file.
        #[arg(long)]
        vacuum: bool,
    },
    /// Copy a SQLite bridge file into an empty PostgreSQL bridge: conversations and tokens, every
    /// message (unread ones stay unread), status, claims (released, attempts kept), outcomes,
    /// stored answers, audit rows. One transaction: all or nothing; a second copy is refused.
    ///
    /// Stop the pollers and coordinators on the file first: what they write after the copy's
    /// snapshot stays in the file. Then point every --db at the URL.
    Copy {
        /// The SQLite bridge file (opened read-only).
        #[arg(long, value_name = "FILE")]
        from: PathBuf,
        /// The PostgreSQL bridge (postgres://USER@HOST:PORT/DBNAME); its schema is made if missing.
        #[arg(long, value_name = "URL")]
        to: String,
        /// Print machine-readable JSON on stdout instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Extend a conversation's expiry to now + TTL (either session's token; works after expiry).
    Renew {
        #[command(flatten)]
        common: Common,
        /// Conversation id.
        #[arg(long, env = "AUTOPOLL_CONVERSATION", value_name = "ID")]
        conversation: String,
        /// Either session's token.
        #[arg(
            long,
            env = "AUTOPOLL_TOKEN",
            hide_env_values = true,
            value_name = "TOKEN"
        )]
        token: String,
        /// New lifetime in hours from now.
        #[arg(long, value_name = "H", default_value_t = 3.0, value_parser = hours)]
        ttl_hours: f64,
    },
}

fn hours(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(h) if h.is_finite() && h > 0.0 && h <= 24.0 * 365.0 => Ok(h),
        _ => Err(format!("{s:?} is not a number of hours in (0, 8760]")),
    }
}

fn hours_to_duration(h: f64) -> Duration {
    Duration::from_secs_f64(h * 3600.0)
}

/// Text from the argument, or stdin when it is `-`.
fn text_or_stdin(arg: String) -> Result<String, CliError> {
    if arg != "-" {
        return Ok(arg);
    }
    let mut s = String::new();
    std::io::stdin()
        .read_to_string(&mut s)
        .map_err(|e| CliError::new(exit::FAILURE, format!("reading stdin: {e}")))?;
    Ok(s.trim_end_matches('\n').to_string())
}

fn print_json(v: &impl serde::Serialize) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| "null".into())
    );
}

fn target(common: &Common) -> Target {
    Target::from_path(&common.db)
}

fn open(common: &Common) -> Result<Box<dyn Store>, CliError> {
    Ok(target(common).open(BridgeOptions::default())?)
}

/// Run a bridge subcommand.
pub fn run(args: BridgeArgs) -> Result<(), CliError> {
    match args.cmd {
        BridgeCmd::Init { common, force } => {
            if let Target::Postgres(url) = target(&common) {
                return init_postgres(&common, &url);
            }
            let b = Bridge::open_with(
                &common.db,
                BridgeOptions {
                    create: true,
                    allow_foreign: force,
                    ..BridgeOptions::default()
                },
            )
            .map_err(|e| match e {
                e @ autopoll_bridge::Error::NotABridge { .. } => CliError::new(
                    exit::SCHEMA,
                    format!(
                        "{e}; or, if you really mean to add the bridge's tables to it: \
                         `autopoll bridge init --force --db {}`",
                        autopoll_bridge::error::sh_quote(&common.db.to_string_lossy())
                    ),
                ),
                e => e.into(),
            })?;
            let mode = b.journal_mode()?;
            if common.json {
                print_json(&json!({
                    "db": common.db,
                    "journal_mode": mode,
                    "schema_version": autopoll_bridge::schema::SCHEMA_VERSION,
                }));
            } else {
                println!(
                    "bridge ready at {} (journal {mode}, autopoll schema v{})",
                    common.db.display(),
                    autopoll_bridge::schema::SCHEMA_VERSION
                );
            }
            Ok(())
        }
        BridgeCmd::Create {
            common,
            role_a,
            role_b,
            ttl_hours,
        } => {
            let mut b = target(&common).open(BridgeOptions {
                create: true,
                ..BridgeOptions::default()
            })?;
            let c = b.create_conversation(&role_a, &role_b, hours_to_duration(ttl_hours))?;
            if common.json {
                print_json(&c);
            } else {
                println!("conversation_id  {}", c.conversation_id);
                println!("session_a_token  {}", c.session_a_token);
                println!("session_b_token  {}", c.session_b_token);
                println!("expires_at       {} UTC", c.expires_at);
            }
            Ok(())
        }
        BridgeCmd::Send {
            common,
            auth,
            query,
            query_id,
            action_type,
            text,
        } => {
            let text = text_or_stdin(text)?;
            if query && text.trim().is_empty() {
                // The shard would only dead-letter it; say so now, as `ask` does.
                return Err(CliError::new(
                    exit::INVALID,
                    "the question is empty: give it as the last argument, or `-` to read it from stdin",
                ));
            }
            let mut b = open(&common)?;
            let (body, qid) = if query {
                let qid = match query_id {
                    Some(id) => id,
                    None => shard::new_query_id()?,
                };
                (shard::query_text(&qid, &text), Some(qid))
            } else {
                (text, None)
            };
            let action =
                action_type.unwrap_or_else(|| if query { "question" } else { "info" }.into());
            let meta = json!({ "action_type": action, "files_involved": [] });
            let session = Session::from(auth.session);
            let sent = b.send(&auth.conversation, session, &auth.token, &body, Some(&meta))?;
            if sent.redacted {
                eprintln!("autopoll: secrets were redacted from the message before it was stored");
            }
            if common.json {
                print_json(&json!({
                    "message_id": sent.id,
                    "query_id": qid,
                    "to_session": session.other().as_str(),
                    "timestamp": sent.timestamp,
                    "redacted": sent.redacted,
                }));
            } else {
                match qid {
                    Some(q) => println!("{q}"),
                    None => println!("{}", sent.id),
                }
            }
            Ok(())
        }
        BridgeCmd::Read { common, auth } => {
            let mut b = open(&common)?;
            let msgs = b.read_unread(&auth.conversation, auth.session.into(), &auth.token)?;
            if common.json {
                // The Python check_messages shape.
                let out: Vec<Value> = msgs
                    .iter()
                    .map(|m| {
                        json!({
                            "id": m.id,
                            "from": m.from_session,
                            "message": m.message,
                            "metadata": m.metadata,
                            "timestamp": m.timestamp,
                        })
                    })
                    .collect();
                print_json(&out);
            } else if msgs.is_empty() {
                eprintln!("no unread messages");
            } else {
                for m in &msgs {
                    println!(
                        "--- #{} from {} at {} ({})",
                        m.id,
                        m.from_session,
                        m.timestamp,
                        m.action_type().unwrap_or("-")
                    );
                    println!("{}", m.message);
                }
            }
            Ok(())
        }
        BridgeCmd::Ask {
            common,
            auth,
            timeout,
            question,
        } => ask(&common, &auth, Duration::from_secs_f64(timeout), question),
        BridgeCmd::Status {
            common,
            conversation,
        } => {
            let mut b = open(&common)?;
            let stats = b.stats(conversation.as_deref())?;
            if common.json {
                print_json(&stats);
            } else if stats.is_empty() {
                eprintln!(
                    "no conversations in {}; create one with `autopoll bridge create`",
                    target(&common).shown()
                );
            } else {
                print!("{}", status_table(&stats));
            }
            Ok(())
        }
        BridgeCmd::Prune {
            common,
            older_than,
            dry_run,
            vacuum,
        } => prune(&common, older_than, dry_run, vacuum),
        BridgeCmd::Copy { from, to, json } => copy(&from, &to, json),
        BridgeCmd::Renew {
            common,
            conversation,
            token,
            ttl_hours,
        } => {
            let mut b = open(&common)?;
            let exp = b.renew(&conversation, &token, hours_to_duration(ttl_hours))?;
            if common.json {
                print_json(&json!({ "conversation_id": conversation, "expires_at": exp }));
            } else {
                println!("{conversation} now expires at {exp} UTC");
            }
            Ok(())
        }
    }
}

/// `bridge copy`: a SQLite file into PostgreSQL.
fn copy(from: &std::path::Path, to: &str, json_out: bool) -> Result<(), CliError> {
    if !autopoll_bridge::store::is_postgres_url(to) {
        return Err(CliError::new(
            exit::INVALID,
            format!("--to {to:?} is not a PostgreSQL URL; give postgres://USER@HOST:PORT/DBNAME"),
        ));
    }
    let r = autopoll_bridge::pg::copy::copy(from, to)?;
    let shown = autopoll_bridge::pg::redact_url(to);
    if json_out {
        print_json(&json!({ "from": from, "to": shown, "copied": r }));
        return Ok(());
    }
    println!("copied {} into {shown}:", from.display());
    println!("conversations {} (with their tokens)", r.conversations);
    println!("messages      {} ({} unread)", r.messages, r.unread);
    println!(
        "claims        {} ({} held by a poller at the time: released, attempts kept)",
        r.claims, r.claims_released
    );
    println!("outcomes      {}", r.outcomes);
    println!(
        "answers       {} (stored for repeated query ids)",
        r.answers
    );
    println!("statuses      {}", r.statuses);
    println!("audit rows    {}", r.audit_rows);
    if r.times_fixed > 0 {
        println!(
            "note          {} time(s) autopoll could not read became the copy's time",
            r.times_fixed
        );
    }
    if !r.orphans_skipped.is_empty() {
        println!(
            "note          {} message(s) left out: their conversation is not in the file (ids {:?})",
            r.orphans_skipped.len(),
            r.orphans_skipped
        );
    }
    println!(
        "next          point every --db (AUTOPOLL_DB) at the URL; what was written to the file after \
         the copy began stays in the file"
    );
    Ok(())
}

/// `bridge init` on PostgreSQL: create or migrate the schema.
fn init_postgres(common: &Common, url: &str) -> Result<(), CliError> {
    let before = autopoll_bridge::pg::schema::init(url)?;
    let now = autopoll_bridge::pg::schema::current();
    let shown = autopoll_bridge::pg::redact_url(url);
    let what = match before {
        0 => "created".to_string(),
        v if v == now => "already current".to_string(),
        v => format!("migrated from v{v}"),
    };
    if common.json {
        print_json(&json!({ "db": shown, "schema_version": now, "schema_before": before }));
    } else {
        println!("bridge ready at {shown} (PostgreSQL, autopoll schema v{now}: {what})");
    }
    Ok(())
}

/// Rows per prune transaction: small enough that the Python server and
/// pollers never wait long for the write lock.
const PRUNE_BATCH: usize = 500;

fn prune(
    common: &Common,
    older_than: Duration,
    dry_run: bool,
    vacuum: bool,
) -> Result<(), CliError> {
    if dry_run {
        let (before, r) = match target(common) {
            // Opened read-only: a dry run writes nothing, not even our tables.
            Target::File(path) => (
                prune_file_bytes(&path),
                autopoll_bridge::prune::dry_run(&path, older_than)?,
            ),
            Target::Postgres(_) => {
                let mut b = open(common)?;
                (b.file_size()?.bytes, b.prune_dry_run(older_than)?)
            }
        };
        if common.json {
            print_json(&json!({ "report": r, "bytes_before": before }));
        } else {
            print!("{}", prune_text(&r, "would remove"));
            println!("file        {} (unchanged: dry run)", table::bytes(before));
        }
        return Ok(());
    }
    let mut b = open(common)?;
    let before = b.file_size()?;
    let r = b.prune(older_than, PRUNE_BATCH)?;
    let c = b.compact(vacuum)?;
    let after = b.file_size()?;
    if common.json {
        print_json(&json!({
            "report": r,
            "bytes_before": before.bytes,
            "bytes_after": after.bytes,
            "free_bytes_before": before.free_bytes,
            "free_bytes_after": after.free_bytes,
            "compact": c,
        }));
    } else {
        print!("{}", prune_text(&r, "removed"));
        println!(
            "file        {} -> {} ({} free inside; vacuum: {})",
            table::bytes(before.bytes),
            table::bytes(after.bytes),
            table::bytes(after.free_bytes),
            c.vacuum
        );
        if c.vacuum == "none" && after.free_bytes > 0 {
            println!(
                "note        the file is not in incremental auto-vacuum mode: its free pages are \
                 reused by new rows but not given back; `--vacuum` once rewrites it (holding the \
                 write lock meanwhile) and switches it to that mode"
            );
        }
        if !c.checkpointed {
            println!(
                "note        a reader kept the WAL checkpoint from finishing; the next one will"
            );
        }
    }
    Ok(())
}

fn prune_file_bytes(db: &std::path::Path) -> u64 {
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    [db.to_path_buf(), PathBuf::from(wal)]
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

fn prune_text(r: &autopoll_bridge::PruneReport, verb: &str) -> String {
    format!(
        "{verb} what is older than {} UTC:\n\
         messages    {} (read questions, read responses, other read messages)\n\
         outcomes    {}\n\
         claims      {}\n\
         answers     {} (stored answers for repeated query ids)\n\
         audit rows  {}\n\
         kept        {} under a live claim, {} kept for repeats, {} with a time autopoll cannot read\n",
        r.cutoff,
        r.messages,
        r.outcomes,
        r.claims,
        r.answers,
        r.audit_rows,
        r.kept_live_claim,
        r.kept_for_repeats,
        r.kept_bad_time,
    )
}

/// The age of the oldest unread message, and how many are of unknown age
/// (a timestamp autopoll cannot read, or one in the future).
pub(crate) fn oldest_cell(s: &SessionStats) -> String {
    match (s.oldest_unread_age_secs, s.unknown_age) {
        (age, 0) => table::age(age),
        (None, n) => format!("unknown age ({n})"),
        (age, n) => format!("{} +{n} unknown age", table::age(age)),
    }
}

pub(crate) fn status_table(stats: &[SessionStats]) -> String {
    // PostgreSQL keeps the host of each heartbeat: shown when there is one.
    let hosts = stats.iter().any(|s| s.host.is_some());
    let rows: Vec<Vec<String>> = stats
        .iter()
        .map(|s| {
            let mut row = vec![
                if s.expired {
                    format!("{} (expired)", s.conversation_id)
                } else {
                    s.conversation_id.clone()
                },
                s.session.clone(),
                s.role.clone(),
                s.unread.to_string(),
                s.claimed.to_string(),
                s.answered.to_string(),
                s.dead_lettered.to_string(),
                oldest_cell(s),
                s.status.clone().unwrap_or_else(|| "-".into()),
                table::age(s.heartbeat_age_secs),
                if s.alive { "yes" } else { "no" }.into(),
            ];
            if hosts {
                row.push(s.host.clone().unwrap_or_else(|| "-".into()));
            }
            row
        })
        .collect();
    let mut head = vec![
        "CONVERSATION",
        "SESSION",
        "ROLE",
        "UNREAD",
        "CLAIMED",
        "ANSWERED",
        "DEAD",
        "OLDEST",
        "STATUS",
        "HEARTBEAT",
        "ALIVE",
    ];
    if hosts {
        head.push("HOST");
    }
    table::render(&head, rows.as_slice())
}

/// Send a query, then wait for the response carrying its query_id. Only that
/// response is marked read; other messages stay unread for their readers.
fn ask(common: &Common, auth: &Auth, timeout: Duration, question: String) -> Result<(), CliError> {
    let question = text_or_stdin(question)?;
    if question.trim().is_empty() {
        return Err(CliError::new(exit::INVALID, "the question is empty"));
    }
    let mut b = open(common)?;
    let session = Session::from(auth.session);
    let qid = shard::new_query_id()?;
    let meta = json!({ "action_type": "question", "files_involved": [] });
    let started = Instant::now();
    let sent = b.send(
        &auth.conversation,
        session,
        &auth.token,
        &shard::query_text(&qid, &question),
        Some(&meta),
    )?;
    log::info!("event=query_sent query_id={qid} message_id={}", sent.id);
    // The same waiter as `autopoll mcp`'s ask_shard: woken by the bridge
    // watch, confirmed by data_version; only the response is marked read.
    let watcher = autopoll_mcp::waiter::Watcher::start(&target(common))
        .map_err(|e| CliError::new(exit::FAILURE, format!("cannot watch the bridge: {e}")))?;
    let never = std::sync::atomic::AtomicBool::new(false);
    let w = autopoll_mcp::waiter::Wait {
        conversation: &auth.conversation,
        session,
        token: &auth.token,
        query_id: &qid,
        after_id: sent.id,
        deadline: started + timeout,
        cancelled: &never,
    };
    match autopoll_mcp::waiter::wait_for_response(b.as_mut(), &watcher.hub, &w)? {
        autopoll_mcp::waiter::Waited::Answered { response, .. } => {
            print_answer(common.json, &response, started.elapsed())
        }
        autopoll_mcp::waiter::Waited::TimedOut | autopoll_mcp::waiter::Waited::Cancelled => {
            let other = session.other();
            Err(CliError::new(
                exit::TIMEOUT,
                format!(
                    "no answer to {qid} within {:.1} s; the query stays queued as message {} for session {other}. \
                     Is a poller answering session {other} of {}? Check with `autopoll bridge status --conversation {}`",
                    timeout.as_secs_f64(),
                    sent.id,
                    auth.conversation,
                    auth.conversation
                ),
            ))
        }
    }
}

fn print_answer(json_out: bool, r: &Response, elapsed: Duration) -> Result<(), CliError> {
    let elapsed_ms = elapsed.as_secs_f64() * 1000.0;
    if json_out {
        print_json(&json!({
            "query_id": r.query_id,
            "answer": r.answer,
            "sources": r.sources,
            "error": r.error,
            "elapsed_ms": elapsed_ms,
            "response": r,
        }));
    } else {
        if !r.answer.is_empty() {
            println!("{}", r.answer);
        }
        if !r.sources.is_empty() {
            println!();
            println!("sources:");
            for s in &r.sources {
                println!("  {s}");
            }
        }
        eprintln!(
            "({} answered in {elapsed_ms:.1} ms by {} [{}])",
            r.query_id,
            if r.shard_id.is_empty() {
                "?"
            } else {
                &r.shard_id
            },
            if r.llm_type.is_empty() {
                "?"
            } else {
                &r.llm_type
            },
        );
    }
    match &r.error {
        Some(e) => Err(CliError::new(
            exit::FAILURE,
            format!("the shard answered {} with an error: {e}", r.query_id),
        )),
        None => Ok(()),
    }
}
