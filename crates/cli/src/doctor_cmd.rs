//! `autopoll doctor`: checks a shard's setup, one line per check (`PASS`,
//! `FAIL` or `SKIP`, the check's name and what was found) and, under each
//! failure, the command that fixes it. Exit 0 only when no check failed;
//! `--json` for scripts.
//!
//! Checks, in order (those whose inputs are missing are skipped):
//! `bridge` (opens, schema compatible), `wal`, `token` (valid, time left),
//! `server` (answers `stats`; same version and protocol as this binary),
//! `permissions` (runtime, server and clients dirs 0700 and ours; the
//! request FIFO 0600 and ours), `heartbeat` (the served session's heartbeat
//! fresh and not `blocked`), `queue` (no unread message to it older than
//! `--max-wait`), `dead_letters` (no dead letter whose error response is still
//! unread), `children` (no zombie children of the server, no instance
//! processes of it outside its process tree), `disk` (free space where the
//! bridge lives).

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use autopoll_bridge::{
    Bridge, BridgeOptions, Error as BridgeError, Session, Store, Target as DbTarget,
};
use autopoll_protocol::{Client, ClientError, ClientOptions, ErrorCode, PROTOCOL_VERSION, Stats};
use clap::{Args, ValueEnum};
use serde::Serialize;

use crate::exit::{self, CliError};
use crate::table;
use crate::target::Target;

/// `autopoll doctor`.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    #[command(flatten)]
    target: Target,
    /// The bridge: its SQLite file (bridge, WAL, queue and disk checks) or a PostgreSQL URL
    /// (bridge, privileges, clock and queue checks).
    #[arg(long, env = "AUTOPOLL_DB", value_name = "PATH|URL")]
    db: Option<PathBuf>,
    /// The conversation the shard serves (token, heartbeat, queue, dead-letter checks).
    #[arg(long, env = "AUTOPOLL_CONVERSATION", value_name = "ID")]
    conversation: Option<String>,
    /// A session token of that conversation. Prefer the environment variable.
    #[arg(long, env = "AUTOPOLL_TOKEN", hide_env_values = true, value_name = "T")]
    token: Option<String>,
    /// The tokens file of a poller serving many conversations (`autopoll-poller
    /// --tokens-file`): the file itself is checked, and the token, heartbeat, queue and
    /// dead-letter checks run for each conversation in it (instead of --conversation).
    #[arg(long, env = "AUTOPOLL_TOKENS_FILE", value_name = "FILE")]
    tokens_file: Option<PathBuf>,
    /// The session the poller answers for.
    #[arg(long, value_enum, default_value = "b")]
    session: SessionArg,
    /// Fail when an unread message to the session has waited longer than this, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 60.0, value_parser = crate::flags::positive_secs)]
    max_wait: f64,
    /// Fail when the session's heartbeat is older than this, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 120.0, value_parser = crate::flags::positive_secs)]
    heartbeat_max: f64,
    /// Seconds to wait for the server's answer.
    #[arg(long, value_name = "SECS", default_value_t = 3.0, value_parser = crate::flags::positive_secs)]
    timeout: f64,
    /// Print {"ok": bool, "checks": [{"name","status","detail","fix"}]}.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum SessionArg {
    A,
    B,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Status {
    Pass,
    Fail,
    Skip,
}

/// One check's result.
#[derive(Debug, Clone, Serialize)]
struct Check {
    name: &'static str,
    status: Status,
    detail: String,
    fix: Option<String>,
}

impl Check {
    fn pass(name: &'static str, detail: impl Into<String>) -> Check {
        Check {
            name,
            status: Status::Pass,
            detail: detail.into(),
            fix: None,
        }
    }

    fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name,
            status: Status::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    fn skip(name: &'static str, detail: impl Into<String>) -> Check {
        Check {
            name,
            status: Status::Skip,
            detail: detail.into(),
            fix: None,
        }
    }
}

/// Disk space below which the `disk` check fails.
const MIN_FREE_BYTES: u64 = 100 << 20;

/// Quote for a POSIX shell when needed.
fn sh(s: &str) -> String {
    let safe = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-:@%+=,".contains(&b));
    if safe {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn shp(p: &Path) -> String {
    sh(&p.to_string_lossy())
}

/// What the checks share: the inputs, and the fixing commands built from them.
struct Ctx<'a> {
    args: &'a DoctorArgs,
    /// The conversation checked (from --conversation, or a tokens file line).
    conversation: Option<&'a str>,
    /// Its token.
    token: Option<&'a str>,
    session: Session,
    /// Whether the systemd user units are installed (fixes then use systemctl).
    units: bool,
}

impl Ctx<'_> {
    fn name(&self) -> &str {
        &self.args.target.name
    }

    /// ` --runtime-dir DIR` when one was given explicitly.
    fn runtime_flag(&self) -> String {
        self.args
            .target
            .runtime_dir
            .as_deref()
            .map(|d| format!(" --runtime-dir {}", shp(d)))
            .unwrap_or_default()
    }

    fn use_systemctl(&self) -> bool {
        self.units && self.args.target.runtime_dir.is_none()
    }

    fn db_flag(&self) -> String {
        self.args
            .db
            .as_deref()
            .map(|d| format!(" --db {}", shp(d)))
            .unwrap_or_default()
    }

    fn conv_flag(&self) -> String {
        self.conversation
            .map(|c| format!(" --conversation {}", sh(c)))
            .unwrap_or_default()
    }

    fn start_server(&self) -> String {
        if self.use_systemctl() {
            format!("systemctl --user restart autopoll-server@{}", self.name())
        } else {
            format!(
                "autopoll-server --name {}{} --context PATH",
                sh(self.name()),
                self.runtime_flag()
            )
        }
    }

    fn start_poller(&self) -> String {
        if self.use_systemctl() {
            format!("systemctl --user restart autopoll-poller@{}", self.name())
        } else {
            format!(
                "autopoll-poller{}{} --session {} --name {}{}   (AUTOPOLL_TOKEN: session {}'s token)",
                self.db_flag(),
                self.conv_flag(),
                self.session,
                sh(self.name()),
                self.runtime_flag(),
                self.session
            )
        }
    }
}

fn units_installed() -> bool {
    let dir = match std::env::var_os("XDG_CONFIG_HOME") {
        Some(x) if !x.is_empty() => PathBuf::from(x),
        _ => match std::env::var_os("HOME") {
            Some(h) => PathBuf::from(h).join(".config"),
            None => return false,
        },
    };
    dir.join("systemd/user/autopoll-server@.service").exists()
}

/// Run `autopoll doctor`.
pub fn run(args: DoctorArgs) -> Result<(), CliError> {
    let paths = args.target.paths()?;
    let ctx = Ctx {
        conversation: args.conversation.as_deref(),
        token: args.token.as_deref(),
        session: match args.session {
            SessionArg::A => Session::A,
            SessionArg::B => Session::B,
        },
        units: units_installed(),
        args: &args,
    };
    let mut checks = Vec::new();

    // The bridge, then everything that reads it.
    let mut bridge = match &args.db {
        None => {
            checks.push(Check::skip("bridge", "no --db (AUTOPOLL_DB) given"));
            None
        }
        Some(db) => {
            let (check, bridge) = check_bridge(db);
            checks.push(check);
            bridge
        }
    };
    let why_no_bridge = if args.db.is_none() {
        "no --db given"
    } else {
        "the bridge did not open"
    };
    match bridge.as_mut() {
        Some(b) => match b.as_sqlite() {
            Some(sq) => checks.push(check_wal(&ctx, sq)),
            None => checks.extend(check_postgres(b.as_mut())),
        },
        None => checks.push(Check::skip("wal", why_no_bridge)),
    }
    // With a tokens file: each conversation in it (checked after the server).
    let entries = match &args.tokens_file {
        None => None,
        Some(f) => match autopoll_poller::tokens::load(f) {
            Ok(es) => {
                checks.push(Check::pass(
                    "tokens_file",
                    format!(
                        "{} lists {} conversation(s), mode 0600, yours",
                        f.display(),
                        es.len()
                    ),
                ));
                Some(es)
            }
            Err(e) => {
                let fix = match &e {
                    autopoll_poller::tokens::TokensError::Mode { .. } => format!("chmod 600 {}", shp(f)),
                    autopoll_poller::tokens::TokensError::Owner { me, .. } => {
                        format!("chown {me} {}   (as root)", shp(f))
                    }
                    _ => "write one `CONVERSATION_ID TOKEN` a line (# comments and blank lines allowed)".into(),
                };
                checks.push(Check::fail("tokens_file", e.to_string(), fix));
                Some(Vec::new())
            }
        },
    };
    let conv_ok = if entries.is_some() {
        false
    } else {
        match (bridge.as_mut(), &args.conversation) {
            (Some(b), Some(conv)) => {
                let (check, found) = check_token(&ctx, b.as_mut(), conv);
                checks.push(check);
                found
            }
            (None, _) => {
                checks.push(Check::skip("token", why_no_bridge));
                false
            }
            (_, None) => {
                checks.push(Check::skip(
                    "token",
                    "no --conversation (AUTOPOLL_CONVERSATION) given",
                ));
                false
            }
        }
    };

    // The server.
    let (check, stats) = check_server(&ctx, &paths);
    checks.push(check);
    checks.push(check_permissions(&paths));

    // The served session, through the bridge.
    if let Some(entries) = &entries {
        for en in entries {
            let cx = Ctx {
                conversation: Some(&en.conversation),
                token: Some(&en.token),
                ..ctx
            };
            let tag = |mut c: Check| {
                c.detail = format!("conversation {}: {}", en.conversation, c.detail);
                c
            };
            match bridge.as_mut() {
                Some(b) => {
                    let b = b.as_mut();
                    let (check, found) = check_token(&cx, b, &en.conversation);
                    checks.push(tag(check));
                    if found {
                        checks.push(tag(check_heartbeat(&cx, b, &en.conversation)));
                        checks.push(tag(check_queue(&cx, b, &en.conversation)));
                        checks.push(tag(check_dead_letters(&cx, b, &en.conversation)));
                    }
                }
                None => checks.push(tag(Check::skip("token", why_no_bridge))),
            }
        }
    } else {
        let no_bridge = bridge.is_none();
        match (bridge.as_mut(), &args.conversation) {
            (Some(b), Some(conv)) if conv_ok => {
                let b = b.as_mut();
                checks.push(check_heartbeat(&ctx, b, conv));
                checks.push(check_queue(&ctx, b, conv));
                checks.push(check_dead_letters(&ctx, b, conv));
            }
            _ => {
                let why = if no_bridge {
                    why_no_bridge
                } else if args.conversation.is_none() {
                    "no --conversation given"
                } else {
                    "the conversation was not found"
                };
                for name in ["heartbeat", "queue", "dead_letters"] {
                    checks.push(Check::skip(name, why));
                }
            }
        }
    }

    match &stats {
        Some(s) => checks.push(check_children(&paths, s)),
        None => checks.push(Check::skip("children", "the server did not answer")),
    }
    match &args.db {
        Some(db) if DbTarget::from_path(db).file().is_none() => checks.push(Check::skip(
            "disk",
            "the bridge is in PostgreSQL: its disk is the database server's (check it there)",
        )),
        Some(db) => checks.push(check_disk(db)),
        None => checks.push(Check::skip("disk", "no --db given")),
    }

    let failed = checks.iter().filter(|c| c.status == Status::Fail).count();
    let skipped = checks.iter().filter(|c| c.status == Status::Skip).count();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "ok": failed == 0,
                "checks": checks,
            }))
            .unwrap_or_default()
        );
    } else {
        for c in &checks {
            let tag = match c.status {
                Status::Pass => "PASS",
                Status::Fail => "FAIL",
                Status::Skip => "SKIP",
            };
            println!("{tag} {}: {}", c.name, c.detail.replace('\n', " "));
            if let Some(fix) = &c.fix {
                println!("  fix: {fix}");
            }
        }
        let run = checks.len() - skipped;
        if failed == 0 {
            println!("doctor: all {run} checks run are fine ({skipped} skipped)");
        } else {
            println!("doctor: {failed} of {run} checks run found a problem ({skipped} skipped)");
        }
    }
    if failed == 0 {
        Ok(())
    } else {
        Err(CliError::new(
            exit::DOCTOR,
            format!("{failed} check(s) failed; each FAIL line is followed by its fix"),
        ))
    }
}

fn check_bridge(db: &Path) -> (Check, Option<Box<dyn Store>>) {
    let opts = BridgeOptions {
        busy_timeout: Duration::from_secs(3),
        ..BridgeOptions::default()
    };
    let target = DbTarget::from_path(db);
    if let DbTarget::Postgres(url) = &target {
        let shown = target.shown();
        return match target.open(opts) {
            Ok(b) => (
                Check::pass(
                    "bridge",
                    format!(
                        "PostgreSQL {shown} answers; autopoll schema v{}",
                        autopoll_bridge::pg::schema::current()
                    ),
                ),
                Some(b),
            ),
            Err(e) => {
                let fix = match &e {
                    BridgeError::NotFound { .. } => {
                        format!("autopoll bridge init --db {}", shp(Path::new(&shown)))
                    }
                    _ => format!(
                        "check the URL (host, port, user, database) and that the server accepts this host: \
                         psql {} -c 'select 1'",
                        shp(Path::new(&autopoll_bridge::pg::redact_url(url)))
                    ),
                };
                (Check::fail("bridge", e.to_string(), fix), None)
            }
        };
    }
    match Bridge::open_with(db, opts) {
        Ok(b) => (
            Check::pass(
                "bridge",
                format!("{} opens; schema compatible", db.display()),
            ),
            Some(Box::new(b)),
        ),
        Err(e) => {
            let fix = match &e {
                BridgeError::NotFound { .. } => {
                    format!("autopoll bridge init --db {}", shp(db))
                }
                BridgeError::SchemaMismatch { .. } => format!(
                    "point --db (AUTOPOLL_DB) at the bridge file the Python server uses; or make a new one: autopoll bridge init --db {}",
                    autopoll_bridge::error::new_bridge_suggestion(db)
                ),
                BridgeError::NotABridge { .. } | BridgeError::NotADatabase { .. } => format!(
                    "it was left unchanged; point --db (AUTOPOLL_DB) at the bridge file the Python server uses, or make a new one: autopoll bridge init --db {}",
                    autopoll_bridge::error::new_bridge_suggestion(db)
                ),
                BridgeError::Busy { .. } => format!(
                    "another process holds the write lock: find it with `fuser {}` and stop it",
                    shp(db)
                ),
                _ => format!(
                    "check that {} is readable and writable by you: ls -l {}",
                    shp(db),
                    shp(db.parent().unwrap_or(Path::new(".")))
                ),
            };
            (Check::fail("bridge", e.to_string(), fix), None)
        }
    }
}

fn check_wal(ctx: &Ctx<'_>, b: &Bridge) -> Check {
    match b.journal_mode() {
        Ok(m) if m.eq_ignore_ascii_case("wal") => Check::pass("wal", "journal_mode=wal"),
        Ok(m) => Check::fail(
            "wal",
            format!("journal_mode={m}: readers and writers block each other"),
            format!(
                "stop every process using the file, then: autopoll bridge init{} (every autopoll open switches it to WAL)",
                ctx.db_flag()
            ),
        ),
        Err(e) => Check::fail(
            "wal",
            format!("cannot read the journal mode: {e}"),
            format!("autopoll bridge init{}", ctx.db_flag()),
        ),
    }
}

/// PostgreSQL's own checks: privileges on the bridge's tables, and the
/// clock skew between this host and the server (leases and heartbeat ages
/// use the server's clock; a host far off shows wrong ages in `status`).
fn check_postgres(b: &mut dyn Store) -> Vec<Check> {
    let Some(pg) = b.as_postgres() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    match pg.missing_privileges() {
        Ok(m) if m.is_empty() => out.push(Check::pass(
            "privileges",
            "SELECT, INSERT, UPDATE, DELETE on every bridge table",
        )),
        Ok(m) => {
            let list: Vec<String> = m
                .iter()
                .map(|(t, p)| format!("{t} ({})", p.join(", ")))
                .collect();
            out.push(Check::fail(
                "privileges",
                format!("this user lacks privileges on: {}", list.join("; ")),
                "as the database's owner: GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO THIS_USER; \
                 GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO THIS_USER",
            ));
        }
        Err(e) => out.push(Check::fail(
            "privileges",
            e.to_string(),
            "check the URL's user",
        )),
    }
    match pg.clock_skew_secs() {
        Ok(s) if s.abs() <= CLOCK_SKEW_MAX => out.push(Check::pass(
            "clock",
            format!("this host's clock is {:+.3} s from the server's", -s),
        )),
        Ok(s) => out.push(Check::fail(
            "clock",
            format!(
                "this host's clock is {:+.1} s from the database server's (limit {CLOCK_SKEW_MAX} s): \
                 heartbeat ages and queue ages shown here are off by as much",
                -s
            ),
            "keep every host's clock in sync (systemd-timesyncd or chrony), then run doctor again",
        )),
        Err(e) => out.push(Check::fail("clock", e.to_string(), "check the connection")),
    }
    out
}

/// Largest clock difference between a host and the PostgreSQL server that
/// `doctor` passes.
const CLOCK_SKEW_MAX: f64 = 2.0;

/// Returns the check and whether the conversation exists.
fn check_token(ctx: &Ctx<'_>, b: &mut dyn Store, conv: &str) -> (Check, bool) {
    let info = match b.conversation(conv) {
        Ok(i) => i,
        Err(BridgeError::NotFound { .. }) => {
            return (
                Check::fail(
                    "token",
                    format!("conversation {conv} is not in the bridge"),
                    format!(
                        "autopoll bridge create{} --role-a coordinator --role-b shard   (then use its id and tokens)",
                        ctx.db_flag()
                    ),
                ),
                false,
            );
        }
        Err(e) => {
            return (
                Check::fail(
                    "token",
                    format!("cannot read conversation {conv}: {e}"),
                    format!("autopoll bridge status{}{}", ctx.db_flag(), ctx.conv_flag()),
                ),
                false,
            );
        }
    };
    let left = autopoll_bridge::clock::parse(&info.expires_at)
        .map(|t| autopoll_bridge::clock::seconds_between(autopoll_bridge::clock::now(), t))
        .ok();
    let renew = format!(
        "autopoll bridge renew{}{} --token \"$AUTOPOLL_TOKEN\"",
        ctx.db_flag(),
        ctx.conv_flag()
    );
    let Some(token) = ctx.token else {
        let detail = format!(
            "no --token (AUTOPOLL_TOKEN) given; the conversation {} at {}",
            if info.expired { "expired" } else { "expires" },
            info.expires_at
        );
        return (Check::skip("token", detail), true);
    };
    let which = [Session::A, Session::B].into_iter().find(|s| {
        matches!(
            b.verify(conv, *s, token),
            Ok(()) | Err(BridgeError::Expired { .. })
        )
    });
    let check = match which {
        None => Check::fail(
            "token",
            format!("the token is neither session's token of {conv}"),
            "set AUTOPOLL_TOKEN to the token `autopoll bridge create` printed for this conversation (session b's for the shard)",
        ),
        Some(_) if info.expired => Check::fail(
            "token",
            format!(
                "the conversation expired {} ago (at {}); the poller's heartbeats are refused",
                table::age(left.map(|l| -l)),
                info.expires_at
            ),
            renew,
        ),
        Some(s) if s != ctx.session => Check::fail(
            "token",
            format!(
                "this is session {s}'s token ({}), but the poller answers for session {}",
                info.role(s),
                ctx.session
            ),
            "set AUTOPOLL_TOKEN to the token `autopoll bridge create` printed for the shard's session (session b's unless --session says otherwise)",
        ),
        Some(s) => {
            let detail = format!(
                "valid for session {s} ({}); expires in {} (at {} UTC)",
                info.role(s),
                table::age(left),
                info.expires_at
            );
            Check::pass("token", detail)
        }
    };
    (check, true)
}

/// Returns the check and the server's stats when it answered.
fn check_server(ctx: &Ctx<'_>, paths: &autopoll_protocol::ServerPaths) -> (Check, Option<Stats>) {
    let timeout = Duration::from_secs_f64(ctx.args.timeout);
    let started = Instant::now();
    let opts = ClientOptions {
        connect_timeout: timeout,
        client_name: "autopoll-doctor".into(),
        ..ClientOptions::default()
    };
    let result = Client::connect(paths, &opts).and_then(|mut c| {
        let left = timeout
            .saturating_sub(started.elapsed())
            .max(Duration::from_millis(100));
        c.stats(left)
    });
    let ours = env!("CARGO_PKG_VERSION");
    match result {
        Ok(s) if s.version != ours || s.protocol != PROTOCOL_VERSION => {
            let detail = format!(
                "server `{}` (pid {}) runs autopoll {} protocol {}; this is autopoll {ours} protocol {PROTOCOL_VERSION}",
                s.server, s.pid, s.version, s.protocol
            );
            (Check::fail("server", detail, ctx.start_server()), Some(s))
        }
        Ok(s) => {
            let detail = format!(
                "`{}` answers: pid {}, autopoll {}, protocol {}, up {}, {} requests, engine {}{}",
                s.server,
                s.pid,
                s.version,
                s.protocol,
                table::age(Some(s.uptime_secs)),
                s.requests,
                s.engine.name,
                if s.engine.down { " (DOWN)" } else { "" }
            );
            if s.engine.down {
                // Why the instances are down (a CLI that cannot start says so
                // on stderr; the server keeps the last lines).
                let why: Vec<String> = s
                    .instances
                    .iter()
                    .filter_map(|w| {
                        w.last_error
                            .as_ref()
                            .map(|e| format!("worker {}: {e}", w.worker))
                    })
                    .collect();
                let detail = if why.is_empty() {
                    detail
                } else {
                    format!("{detail}; {}", why.join("; "))
                };
                (Check::fail("server", detail, ctx.start_server()), Some(s))
            } else {
                (Check::pass("server", detail), Some(s))
            }
        }
        Err(e) => {
            let detail = match &e {
                ClientError::Server(r) if r.code == ErrorCode::VersionMismatch => {
                    format!(
                        "server `{}` speaks another protocol: {}",
                        ctx.name(),
                        r.message
                    )
                }
                ClientError::Timeout { .. } => format!(
                    "server `{}` did not answer within {:.1} s: hung or overloaded ({e})",
                    ctx.name(),
                    timeout.as_secs_f64()
                ),
                _ => format!("server `{}` is not answering: {e}", ctx.name()),
            };
            (Check::fail("server", detail, ctx.start_server()), None)
        }
    }
}

fn check_permissions(paths: &autopoll_protocol::ServerPaths) -> Check {
    if !paths.runtime.exists() {
        return Check::skip(
            "permissions",
            format!(
                "{} does not exist yet (no server has run there)",
                paths.runtime.display()
            ),
        );
    }
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    let mut problems = Vec::new();
    let mut chmod700 = Vec::new();
    let mut chmod600 = Vec::new();
    let mut foreign = Vec::new();
    let mut checked = 0;
    let requests = paths.requests();
    let clients = paths.clients();
    let items: [(&Path, bool); 4] = [
        (&paths.runtime, true),
        (&paths.dir, true),
        (&clients, true),
        (&requests, false),
    ];
    for (p, is_dir) in items {
        let md = match std::fs::symlink_metadata(p) {
            Ok(m) => m,
            Err(_) => continue,
        };
        checked += 1;
        let mode = md.mode() & 0o777;
        let ft = md.file_type();
        if ft.is_symlink() {
            problems.push(format!("{} is a symlink", p.display()));
            foreign.push(p.to_path_buf());
            continue;
        }
        if md.uid() != me {
            problems.push(format!(
                "{} is owned by uid {}, not you ({me})",
                p.display(),
                md.uid()
            ));
            foreign.push(p.to_path_buf());
            continue;
        }
        if is_dir && !ft.is_dir() {
            problems.push(format!("{} is not a directory", p.display()));
            foreign.push(p.to_path_buf());
        } else if !is_dir && !ft.is_fifo() {
            problems.push(format!("{} is not a FIFO", p.display()));
            foreign.push(p.to_path_buf());
        } else if mode & 0o077 != 0 {
            problems.push(format!(
                "{} has mode {mode:04o} (want {})",
                p.display(),
                if is_dir { "0700" } else { "0600" }
            ));
            if is_dir {
                chmod700.push(shp(p));
            } else {
                chmod600.push(shp(p));
            }
        }
    }
    if problems.is_empty() {
        return Check::pass(
            "permissions",
            format!(
                "{} paths under {} private (dirs 0700, FIFO 0600, yours)",
                checked,
                paths.runtime.display()
            ),
        );
    }
    let mut fixes = Vec::new();
    if !chmod700.is_empty() {
        fixes.push(format!("chmod 700 {}", chmod700.join(" ")));
    }
    if !chmod600.is_empty() {
        fixes.push(format!("chmod 600 {}", chmod600.join(" ")));
    }
    for p in foreign {
        fixes.push(format!(
            "rm -rf {}   (as its owner; then restart the server)",
            shp(&p)
        ));
    }
    Check::fail(
        "permissions",
        format!(
            "{}: other users could reach the server",
            problems.join("; ")
        ),
        fixes.join(" && "),
    )
}

fn check_heartbeat(ctx: &Ctx<'_>, b: &mut dyn Store, conv: &str) -> Check {
    let max = ctx.args.heartbeat_max;
    match b.session_status(conv, ctx.session) {
        Ok(None) => Check::fail(
            "heartbeat",
            format!(
                "session {} never sent a heartbeat: no poller has served it",
                ctx.session
            ),
            ctx.start_poller(),
        ),
        Ok(Some(s)) if s.age_secs.is_none() => Check::fail(
            "heartbeat",
            format!(
                "session {}'s last heartbeat has a timestamp nobody can read ({:?}): its poller is not autopoll's, or gone",
                ctx.session, s.last_heartbeat
            ),
            ctx.start_poller(),
        ),
        Ok(Some(s)) if s.age_secs.is_some_and(|a| a > max) => Check::fail(
            "heartbeat",
            format!(
                "session {}'s last heartbeat ({}) is {} old (limit {}): its poller is gone or stuck",
                ctx.session,
                s.status,
                table::age(s.age_secs),
                table::age(Some(max))
            ),
            ctx.start_poller(),
        ),
        Ok(Some(s)) if s.status == "stopped" => Check::fail(
            "heartbeat",
            format!(
                "session {}'s poller stopped {} ago (a clean stop): nothing serves it",
                ctx.session,
                table::age(s.age_secs)
            ),
            ctx.start_poller(),
        ),
        Ok(Some(s)) if s.status == "blocked" => Check::fail(
            "heartbeat",
            format!(
                "session {}'s poller is alive ({} ago) but blocked: it cannot reach server `{}`",
                ctx.session,
                table::age(s.age_secs),
                ctx.name()
            ),
            ctx.start_server(),
        ),
        Ok(Some(s)) => Check::pass(
            "heartbeat",
            format!(
                "session {} is `{}`, heartbeat {} ago",
                ctx.session,
                s.status,
                table::age(s.age_secs)
            ),
        ),
        Err(e) => Check::fail(
            "heartbeat",
            format!("cannot read session_status: {e}"),
            format!("autopoll bridge status{}{}", ctx.db_flag(), ctx.conv_flag()),
        ),
    }
}

fn check_queue(ctx: &Ctx<'_>, b: &mut dyn Store, conv: &str) -> Check {
    let rows = match b.stats(Some(conv)) {
        Ok(r) => r,
        Err(e) => {
            return Check::fail(
                "queue",
                format!("cannot read the queue: {e}"),
                format!("autopoll bridge status{}{}", ctx.db_flag(), ctx.conv_flag()),
            );
        }
    };
    let Some(s) = rows.iter().find(|r| r.session == ctx.session.as_str()) else {
        return Check::skip("queue", "no such session");
    };
    let max = ctx.args.max_wait;
    // Rows whose timestamp cannot be read (or lies in the future) have no
    // age to judge; they are named, not failed on.
    let unknown = match s.unknown_age {
        0 => String::new(),
        n => format!(" ({n} of unknown age: a timestamp autopoll cannot read, or in the future)"),
    };
    match s.oldest_unread_age_secs {
        Some(age) if age > max => Check::fail(
            "queue",
            format!(
                "{} unread to session {} ({} claimed); the oldest has waited {} (limit {}){unknown}",
                s.unread,
                ctx.session,
                s.claimed,
                table::age(Some(age)),
                table::age(Some(max))
            ),
            ctx.start_poller(),
        ),
        Some(age) => Check::pass(
            "queue",
            format!(
                "{} unread to session {}, the oldest {} old{unknown}",
                s.unread,
                ctx.session,
                table::age(Some(age))
            ),
        ),
        None if s.unread > 0 => Check::pass(
            "queue",
            format!(
                "{} unread to session {}, {} claimed, all of unknown age (a timestamp autopoll cannot read, or in the future)",
                s.unread, ctx.session, s.claimed
            ),
        ),
        None => Check::pass(
            "queue",
            format!(
                "nothing waiting for session {} ({} answered, {} dead letters so far)",
                ctx.session, s.answered, s.dead_lettered
            ),
        ),
    }
}

fn check_dead_letters(ctx: &Ctx<'_>, b: &mut dyn Store, conv: &str) -> Check {
    match b.unseen_dead_letters(conv, ctx.session) {
        Ok(d) if d.is_empty() => {
            Check::pass("dead_letters", "no dead letter waits unread for the asker")
        }
        Ok(d) => {
            let list: Vec<String> = d
                .iter()
                .take(5)
                .map(|x| {
                    format!(
                        "{} (message {}, {} attempts: {})",
                        if x.query_id.is_empty() {
                            "?"
                        } else {
                            &x.query_id
                        },
                        x.message_id,
                        x.attempts,
                        x.detail.as_deref().unwrap_or("-")
                    )
                })
                .collect();
            let more = if d.len() > 5 {
                format!(" and {} more", d.len() - 5)
            } else {
                String::new()
            };
            Check::fail(
                "dead_letters",
                format!(
                    "{} question(s) failed for good and session {} has not read the error: {}{more}",
                    d.len(),
                    ctx.session.other(),
                    list.join(", ")
                ),
                format!(
                    "autopoll bridge read{}{} --session {} --token <session {}'s token>   (marks all its unread messages read)",
                    ctx.db_flag(),
                    ctx.conv_flag(),
                    ctx.session.other(),
                    ctx.session.other()
                ),
            )
        }
        Err(e) => Check::fail(
            "dead_letters",
            format!("cannot read the outcomes: {e}"),
            format!("autopoll bridge status{}{}", ctx.db_flag(), ctx.conv_flag()),
        ),
    }
}

/// `(state, ppid)` of a process, from /proc.
fn proc_stat(pid: i32) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // pid (comm) state ppid ...; comm may hold spaces and parentheses.
    let rest = stat.rsplit_once(')')?.1;
    let mut f = rest.split_whitespace();
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    Some((state, ppid))
}

fn all_pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Zombie children of `parent`.
fn zombies_of(parent: i32) -> Vec<i32> {
    all_pids()
        .into_iter()
        .filter(|&p| proc_stat(p).is_some_and(|(st, pp)| st == 'Z' && pp == parent))
        .collect()
}

/// Whether `ancestor` is `pid` or one of its ancestors.
fn descends_from(mut pid: i32, ancestor: i32) -> bool {
    for _ in 0..128 {
        if pid == ancestor {
            return true;
        }
        match proc_stat(pid) {
            Some((_, pp)) if pp > 0 && pp != pid => pid = pp,
            _ => return false,
        }
    }
    false
}

/// Processes whose environment has `AUTOPOLL_SERVER_DIR=dir` (instances of
/// that server and their children). Only our own processes' environments
/// are readable, which is what we want.
fn instance_processes(dir: &Path) -> Vec<i32> {
    let want = format!("AUTOPOLL_SERVER_DIR={}", dir.display());
    let me = std::process::id() as i32;
    all_pids()
        .into_iter()
        .filter(|&p| p != me)
        .filter(|&p| {
            std::fs::read(format!("/proc/{p}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == want.as_bytes()))
        })
        .filter(|&p| proc_stat(p).is_some_and(|(st, _)| st != 'Z'))
        .collect()
}

fn check_children(paths: &autopoll_protocol::ServerPaths, s: &Stats) -> Check {
    let server = i32::try_from(s.pid).unwrap_or(0);
    // Orphans: processes of this server's instances (by AUTOPOLL_SERVER_DIR)
    // outside the server's process tree (left by an earlier run), and listed
    // instance pids the server is not the parent of.
    let orphans_now = || {
        let mut o: Vec<i32> = instance_processes(&paths.dir)
            .into_iter()
            .filter(|&p| !descends_from(p, server))
            .collect();
        for w in &s.instances {
            if let Some(pid) = w.pid.and_then(|p| i32::try_from(p).ok())
                && proc_stat(pid).is_some_and(|(st, pp)| st != 'Z' && pp != server)
                && !o.contains(&pid)
            {
                o.push(pid);
            }
        }
        o
    };
    // A child that just exited is a zombie until the server reaps it (within
    // a second), and a starting instance may run through wrappers (a shim
    // script forking helpers that outlive their parent): only what is still
    // there after a short while counts.
    let mut zombies = zombies_of(server);
    let mut orphans = orphans_now();
    let until = Instant::now() + Duration::from_secs(2);
    while !(zombies.is_empty() && orphans.is_empty()) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
        let z = zombies_of(server);
        zombies.retain(|p| z.contains(p));
        let o = orphans_now();
        orphans.retain(|p| o.contains(p));
    }
    orphans.sort_unstable();
    if zombies.is_empty() && orphans.is_empty() {
        let live = s.instances.iter().filter(|w| w.pid.is_some()).count();
        return Check::pass(
            "children",
            format!(
                "no zombie children of pid {server}, no orphaned instances ({live} instances running)"
            ),
        );
    }
    let mut detail = Vec::new();
    let mut fix = Vec::new();
    if !zombies.is_empty() {
        detail.push(format!(
            "zombie children of server pid {server}: {zombies:?} (it is not reaping them)"
        ));
        fix.push(format!(
            "systemctl --user restart autopoll-server@{}   (or: kill {server}, then start it again)",
            paths.name
        ));
    }
    if !orphans.is_empty() {
        detail.push(format!(
            "instance processes outside server pid {server}'s tree: {orphans:?}"
        ));
        let list: Vec<String> = orphans.iter().map(i32::to_string).collect();
        fix.push(format!("kill {}", list.join(" ")));
    }
    Check::fail("children", detail.join("; "), fix.join(" && "))
}

fn check_disk(db: &Path) -> Check {
    let dir = match db.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return Check::fail(
            "disk",
            "the bridge path holds a NUL byte",
            "give a usable --db",
        );
    };
    // SAFETY: statvfs only writes into the struct we pass.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid C string; st is a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        let e = std::io::Error::last_os_error();
        return Check::fail(
            "disk",
            format!("statvfs {}: {e}", dir.display()),
            format!("ls -ld {}", shp(&dir)),
        );
    }
    let frsize = st.f_frsize as u64;
    let avail = (st.f_bavail as u64).saturating_mul(frsize);
    let total = (st.f_blocks as u64).saturating_mul(frsize);
    let size_of = |p: PathBuf| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    let used = size_of(db.to_path_buf()) + size_of(PathBuf::from(wal));
    // Room for the file to double (a checkpoint, a VACUUM) and a margin.
    let need = MIN_FREE_BYTES.max(used.saturating_mul(2));
    let pct = if total > 0 {
        avail as f64 * 100.0 / total as f64
    } else {
        0.0
    };
    let detail = format!(
        "{} free ({pct:.0}%) on the bridge's filesystem ({}); the bridge uses {}",
        mib(avail),
        dir.display(),
        mib(used)
    );
    if avail < need {
        Check::fail(
            "disk",
            format!("{detail}; want at least {}", mib(need)),
            format!(
                "free space on {}: see `du -xsh {}/* | sort -h`",
                shp(&dir),
                shp(&dir)
            ),
        )
    } else {
        Check::pass("disk", detail)
    }
}

fn mib(b: u64) -> String {
    if b >= 10 << 30 {
        format!("{:.0} GiB", b as f64 / (1u64 << 30) as f64)
    } else if b >= 1 << 30 {
        format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_for_the_shell() {
        assert_eq!(sh("/tmp/a-b_c.db"), "/tmp/a-b_c.db");
        assert_eq!(sh("/tmp/my dir/x"), "'/tmp/my dir/x'");
        assert_eq!(sh("it's"), r"'it'\''s'");
        assert_eq!(sh(""), "''");
    }

    #[test]
    fn an_unreaped_child_is_a_zombie_until_waited_for() {
        let me = std::process::id() as i32;
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !zombies_of(me).contains(&pid) {
            assert!(Instant::now() < deadline, "{pid} never became a zombie");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(descends_from(pid, me));
        child.wait().unwrap();
        assert!(!zombies_of(me).contains(&pid));
    }

    #[test]
    fn disk_reports_free_space_of_the_bridge_directory() {
        let dir = tempfile::tempdir().unwrap();
        let c = check_disk(&dir.path().join("bridge.db"));
        assert!(c.detail.contains("free"), "{c:?}");
        assert!(
            c.detail.contains(&dir.path().display().to_string()),
            "{c:?}"
        );
    }
}
