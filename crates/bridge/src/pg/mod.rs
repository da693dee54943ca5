//! The bridge in PostgreSQL: [`PgBridge`], one blocking connection
//! (the `postgres` crate's client; no async in our code) to a database that
//! pollers and coordinators on several hosts share.
//!
//! - `--db postgres://USER[:PASSWORD]@HOST[:PORT]/DBNAME[?sslmode=..]` (or
//!   `postgresql://`); what the URL leaves out comes from the usual `PG*`
//!   variables (`PGHOST`, `PGPORT`, `PGUSER`, `PGPASSWORD`, `PGDATABASE`,
//!   `PGSSLMODE`, `PGSSLROOTCERT`, `PGCONNECT_TIMEOUT`, `PGAPPNAME`), then
//!   libpq's defaults (localhost, 5432, the user's name, `sslmode=prefer`);
//!   TLS as [`tls`] says.
//! - Every call is bounded: a connect timeout ([`CONNECT_TIMEOUT`] unless
//!   the URL or `PGCONNECT_TIMEOUT` says otherwise), TCP keepalives and a
//!   TCP user timeout (a silent peer fails the call instead of hanging it),
//!   and per session `statement_timeout`, `lock_timeout` and
//!   `idle_in_transaction_session_timeout`.
//! - The schema ([`schema`]) is created by `autopoll bridge init` and
//!   migrated forward in one transaction; opening a database without it
//!   fails with the command that makes it.
//! - Claims (`ops.rs`): `FOR UPDATE SKIP LOCKED` over unread messages, and a
//!   claim upsert guarded by the lease, so two pollers on two hosts never
//!   hold one message; completing deletes the claim only while the caller
//!   owns it, in the transaction that writes the answer.
//! - Wake-ups: a trigger sends `NOTIFY autopoll_messages` with
//!   `CONVERSATION SESSION` as payload on every new message; [`Listener`]
//!   waits for those on a connection of its own.

pub mod cluster;
pub mod copy;
pub mod listen;
mod ops;
mod prune;
pub mod schema;
pub mod tls;

use std::time::Duration;

use postgres::config::SslMode;
use postgres::{Client, Config, NoTls};

use crate::error::{Error, Result};
use crate::{BridgeOptions, ms};

pub use listen::Listener;

/// Connect timeout when neither the URL nor `PGCONNECT_TIMEOUT` gives one.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Beyond the connect timeout, how long the start-up handshake (TLS,
/// authentication, the session's settings) may take.
pub const HANDSHAKE_SLACK: Duration = Duration::from_secs(10);
/// A connection whose peer stops acknowledging for this long fails.
pub const TCP_USER_TIMEOUT: Duration = Duration::from_secs(20);
/// The longest one statement may run (a bound on every call).
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(15);

/// One connection to a bridge in PostgreSQL.
pub struct PgBridge {
    client: Client,
    /// Statements prepared on `client`, by their SQL (emptied on reconnect).
    stmts: std::collections::HashMap<&'static str, postgres::Statement>,
    cfg: Settings,
    shown: String,
    opts: BridgeOptions,
}

impl std::fmt::Debug for PgBridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgBridge").field("db", &self.shown).finish()
    }
}

/// The URL with its password (if any) replaced by `***`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    // The userinfo ends at the last `@` (a password may hold `/`, `?`, `@`).
    let rest = match rest.rsplit_once('@') {
        Some((userinfo, after)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{after}"),
            None => format!("{userinfo}@{after}"),
        },
        None => rest.to_string(),
    };
    // And a password given as a parameter.
    let masked = match rest.split_once('?') {
        Some((base, query)) => {
            let q: Vec<String> = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some(("password", _)) => "password=***".to_string(),
                    _ => kv.to_string(),
                })
                .collect();
            format!("{base}?{}", q.join("&"))
        }
        None => rest,
    };
    format!("{scheme}://{masked}")
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// How to connect: the driver's settings and the TLS connector
/// ([`tls`]) that `sslmode` asks for.
#[derive(Clone)]
pub struct Settings {
    /// The driver's settings (host, port, user, timeouts, ...).
    pub cfg: Config,
    /// What `sslmode` asked for.
    pub mode: tls::Mode,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
}

/// Take `sslmode` and `sslrootcert` out of a URL's query (the driver knows
/// only three of libpq's five modes, and no root certificates).
fn split_tls_params(url: &str) -> (String, Option<String>, Option<String>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_string(), None, None);
    };
    let (mut mode, mut root, mut rest) = (None, None, Vec::new());
    for kv in query.split('&').filter(|kv| !kv.is_empty()) {
        match kv.split_once('=') {
            Some(("sslmode", v)) => mode = Some(percent_decode(v)),
            Some(("sslrootcert", v)) => root = Some(percent_decode(v)),
            _ => rest.push(kv),
        }
    }
    let url = if rest.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    (url, mode, root)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(hex) = std::str::from_utf8(&b[i + 1..i + 3])
            && let Ok(v) = u8::from_str_radix(hex, 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The connection settings for `url`, completed from the `PG*` variables
/// and bounded by our timeouts.
pub fn config(url: &str) -> Result<Settings> {
    let (plain, mode, root) = split_tls_params(url);
    let mut cfg: Config = plain.parse().map_err(|e| {
        Error::Invalid(format!(
            "--db {}: not a PostgreSQL URL ({e}); the shape is postgres://USER@HOST:PORT/DBNAME",
            redact_url(url)
        ))
    })?;
    if cfg.get_hosts().is_empty() {
        cfg.host(&env("PGHOST").unwrap_or_else(|| "localhost".into()));
    }
    if cfg.get_ports().is_empty()
        && let Some(p) = env("PGPORT")
    {
        let port = p
            .parse()
            .map_err(|_| Error::Invalid(format!("PGPORT={p:?} is not a port number")))?;
        cfg.port(port);
    }
    if cfg.get_user().is_none() {
        let user = env("PGUSER")
            .or_else(|| env("USER"))
            .unwrap_or_else(|| "postgres".into());
        cfg.user(&user);
    }
    if cfg.get_password().is_none()
        && let Some(p) = env("PGPASSWORD")
    {
        cfg.password(p);
    }
    if cfg.get_dbname().is_none()
        && let Some(d) = env("PGDATABASE")
    {
        cfg.dbname(&d);
    }
    // libpq's default is prefer: TLS when the server offers it.
    let mode = tls::Mode::parse(
        &mode
            .or_else(|| env("PGSSLMODE"))
            .unwrap_or_else(|| "prefer".into()),
    )?;
    let connector = tls::connector(mode, tls::root_cert(root))?;
    cfg.ssl_mode(match mode {
        tls::Mode::Disable => SslMode::Disable,
        tls::Mode::Prefer => SslMode::Prefer,
        _ => SslMode::Require,
    });
    if cfg.get_connect_timeout().is_none() {
        let t = env("PGCONNECT_TIMEOUT")
            .and_then(|s| s.parse::<u64>().ok())
            .filter(|&s| s > 0)
            .map(Duration::from_secs)
            .unwrap_or(CONNECT_TIMEOUT);
        cfg.connect_timeout(t);
    }
    if cfg.get_application_name().is_none() {
        cfg.application_name(&env("PGAPPNAME").unwrap_or_else(|| "autopoll".into()));
    }
    cfg.keepalives(true)
        .keepalives_idle(Duration::from_secs(5))
        .keepalives_interval(Duration::from_secs(2))
        .keepalives_retries(3)
        .tcp_user_timeout(TCP_USER_TIMEOUT);
    Ok(Settings {
        cfg,
        mode,
        tls: connector,
    })
}

/// Where `cfg` points, for messages: `HOST:PORT/DBNAME as USER`.
fn describe(cfg: &Config) -> String {
    let host = match cfg.get_hosts().first() {
        Some(postgres::config::Host::Tcp(h)) => h.clone(),
        Some(postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    format!(
        "{host}:{port}/{} as {}",
        cfg.get_dbname().unwrap_or(cfg.get_user().unwrap_or("?")),
        cfg.get_user().unwrap_or("?")
    )
}

/// Open a bounded session (timeouts set), without the schema check.
pub(crate) fn session(s: &Settings, statement_timeout: Duration) -> Result<Client> {
    let cfg = &s.cfg;
    // The driver's connect timeout covers the TCP connect only, not the
    // start-up handshake: a server that accepts and then says nothing would
    // hold us. So the connect runs in a thread of its own, waited for with
    // a deadline (on a timeout the thread is left to end with its socket).
    let limit = cfg
        .get_connect_timeout()
        .copied()
        .unwrap_or(CONNECT_TIMEOUT)
        + HANDSHAKE_SLACK;
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let s2 = s.clone();
    std::thread::Builder::new()
        .name("pg-connect".into())
        .spawn(move || {
            let r = match &s2.tls {
                None => s2.cfg.connect(NoTls),
                Some(t) => s2.cfg.connect(t.clone()),
            };
            let _ = tx.send(r);
        })
        .map_err(|e| Error::Postgres {
            message: format!("cannot start a connect thread: {e}"),
            transient: true,
        })?;
    let connected = rx.recv_timeout(limit).map_err(|_| Error::Postgres {
        message: format!(
            "cannot connect to {}: no answer to the start-up handshake within {} s \
             (is the server stopped, or overloaded?); retried later",
            describe(cfg),
            limit.as_secs()
        ),
        transient: true,
    })?;
    let mut client =
        connected.map_err(|e| pg_error(&format!("cannot connect to {}", describe(cfg)), e))?;
    let st = ms(statement_timeout).max(1);
    client
        .batch_execute(&format!(
            "SET statement_timeout = {st}; SET lock_timeout = {st}; \
             SET idle_in_transaction_session_timeout = {}; SET TIME ZONE 'UTC'",
            st.saturating_mul(4)
        ))
        .map_err(|e| pg_error("cannot set the session's timeouts", e))?;
    Ok(client)
}

pub(crate) fn statement_timeout(opts: &BridgeOptions) -> Duration {
    STATEMENT_TIMEOUT.max(opts.busy_timeout)
}

/// Whether an I/O error (a refused, reset or timed-out connection) is
/// behind `e`.
fn io_cause(e: &postgres::Error) -> bool {
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        if inner.is::<std::io::Error>() {
            return true;
        }
        src = inner.source();
    }
    // The driver's own connect timeout carries no source.
    e.to_string().contains("timed out")
}

/// Turn a driver error into a bridge error that says what to do.
pub(crate) fn pg_error(op: &str, e: postgres::Error) -> Error {
    use postgres::error::SqlState;
    let code = e.code().cloned();
    let db = e.as_db_error().map(|d| d.message().to_string());
    let detail = db.clone().unwrap_or_else(|| {
        let mut s = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(inner) = src {
            s.push_str(": ");
            s.push_str(&inner.to_string());
            src = inner.source();
        }
        s
    });
    let (hint, transient) = match &code {
        Some(c)
            if *c == SqlState::INVALID_PASSWORD
                || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION =>
        {
            (
                "; check the user and password in --db or PGUSER/PGPASSWORD, and pg_hba.conf on the server",
                false,
            )
        }
        Some(c) if *c == SqlState::INVALID_CATALOG_NAME => (
            "; create the database first (`createdb NAME`, or CREATE DATABASE as a superuser), then `autopoll bridge init --db URL`",
            false,
        ),
        Some(c) if *c == SqlState::UNDEFINED_TABLE || *c == SqlState::UNDEFINED_FUNCTION => (
            "; the database has no bridge schema: make it with `autopoll bridge init --db URL`",
            false,
        ),
        Some(c) if *c == SqlState::INSUFFICIENT_PRIVILEGE => (
            "; the user lacks a privilege on the bridge's tables: GRANT SELECT, INSERT, UPDATE, DELETE on them (docs/OPERATIONS.md)",
            false,
        ),
        Some(c)
            if *c == SqlState::QUERY_CANCELED
                || *c == SqlState::LOCK_NOT_AVAILABLE
                || *c == SqlState::T_R_SERIALIZATION_FAILURE
                || *c == SqlState::T_R_DEADLOCK_DETECTED
                || *c == SqlState::ADMIN_SHUTDOWN
                || *c == SqlState::CRASH_SHUTDOWN
                || *c == SqlState::CANNOT_CONNECT_NOW =>
        {
            ("; retried later", true)
        }
        // Out of connections or resources, connection trouble reported by
        // the server, an idle transaction cut off: may pass later.
        Some(c)
            if c.code().starts_with("53")
                || c.code().starts_with("08")
                || c.code() == "25P03"
                || c.code() == "57P01"
                || c.code() == "57P02" =>
        {
            ("; retried later", true)
        }
        Some(_) => ("", false),
        None if detail.contains("server does not support TLS") => (
            "; the server does not offer TLS: turn ssl on in its postgresql.conf, or use sslmode=prefer",
            false,
        ),
        None if detail.contains("certificate") || detail.contains("TLS handshake") => (
            "; the server's TLS certificate was not accepted: give the CA that signed it as \
             sslrootcert=FILE (or PGSSLROOTCERT), and the host name the certificate names",
            false,
        ),
        // No server error: the connection failed or closed ...
        None if e.is_closed() || io_cause(&e) => (
            "; is PostgreSQL running and reachable there? (check --db, PGHOST/PGPORT, and the server's listen_addresses)",
            true,
        ),
        // ... or something on our side (a value the driver cannot send).
        None => ("", false),
    };
    Error::Postgres {
        message: format!("{op}: {detail}{hint}"),
        transient,
    }
}

impl PgBridge {
    /// Connect to the bridge at `url`. With `opts.create` the schema is
    /// created (or migrated) first; without, a database lacking it is
    /// refused with the `bridge init` command that makes it.
    pub fn connect(url: &str, opts: BridgeOptions) -> Result<PgBridge> {
        let cfg = config(url)?;
        let mut client = session(&cfg, statement_timeout(&opts))?;
        let shown = redact_url(url);
        if opts.create {
            schema::ensure(&mut client)?;
        } else {
            schema::check(&mut client, &shown)?;
        }
        Ok(PgBridge {
            client,
            stmts: std::collections::HashMap::new(),
            cfg,
            shown,
            opts,
        })
    }

    /// The connection, opened again first when it was lost (the server
    /// restarted, the network went away). The call that found it lost
    /// failed with a transient error; a transaction cut off that way was
    /// rolled back by the server or committed whole, and every write of
    /// ours is guarded (a claim by its lease, an answer by the claim's
    /// owner), so retrying never answers twice.
    pub(crate) fn conn(&mut self) -> Result<&mut Client> {
        if self.client.is_closed() {
            let client = session(&self.cfg, statement_timeout(&self.opts))?;
            log::info!("event=pg_reconnected db={}", self.shown);
            self.client = client;
            self.stmts.clear();
        }
        Ok(&mut self.client)
    }

    /// `sql` prepared once per connection (a hot statement then costs one
    /// round trip, not two).
    pub(crate) fn prepared(&mut self, sql: &'static str) -> Result<postgres::Statement> {
        self.conn()?;
        if let Some(s) = self.stmts.get(sql) {
            return Ok(s.clone());
        }
        let s = self
            .client
            .prepare(sql)
            .map_err(|e| pg_error("cannot prepare a statement", e))?;
        self.stmts.insert(sql, s.clone());
        Ok(s)
    }

    /// The raw client, for tests and `doctor` (reconnected when lost).
    pub fn client(&mut self) -> Result<&mut Client> {
        self.conn()
    }

    /// The bridge tables this user may not read and write: `(table,
    /// missing privileges)`; empty when all is well.
    pub fn missing_privileges(&mut self) -> Result<Vec<(String, Vec<String>)>> {
        let tables = [
            "conversations",
            "messages",
            "session_status",
            "audit_log",
            "autopoll_meta",
            "autopoll_claims",
            "autopoll_outcomes",
            "autopoll_answers",
        ];
        let mut out = Vec::new();
        for t in tables {
            let mut missing = Vec::new();
            for p in ["SELECT", "INSERT", "UPDATE", "DELETE"] {
                let ok: bool = self
                    .conn()?
                    .query_one("SELECT has_table_privilege($1, $2)", &[&t, &p])
                    .map_err(|e| pg_error("cannot check privileges", e))?
                    .get(0);
                if !ok {
                    missing.push(p.to_string());
                }
            }
            if !missing.is_empty() {
                out.push((t.to_string(), missing));
            }
        }
        // New rows take ids from the identity sequences; answers go through
        // autopoll_complete.
        for t in ["messages", "audit_log"] {
            let ok: bool = self
                .conn()?
                .query_one(
                    "SELECT has_sequence_privilege(pg_get_serial_sequence($1, 'id'), 'USAGE')",
                    &[&t],
                )
                .map_err(|e| pg_error("cannot check privileges", e))?
                .get(0);
            if !ok {
                out.push((format!("{t}'s id sequence"), vec!["USAGE".into()]));
            }
        }
        let ok: bool = self
            .conn()?
            .query_one(
                "SELECT has_function_privilege(
                   'autopoll_complete(text, bigint[], text[], boolean[], text[], jsonb)', 'EXECUTE')",
                &[],
            )
            .map_err(|e| pg_error("cannot check privileges", e))?
            .get(0);
        if !ok {
            out.push(("autopoll_complete()".into(), vec!["EXECUTE".into()]));
        }
        Ok(out)
    }

    /// The server's version string (`SHOW server_version`).
    pub fn server_version(&mut self) -> Result<String> {
        Ok(self
            .conn()?
            .query_one("SHOW server_version", &[])
            .map_err(|e| pg_error("cannot read the server's version", e))?
            .get(0))
    }

    /// Seconds the database server's clock is ahead of ours (negative:
    /// behind), measured over one round trip.
    pub fn clock_skew_secs(&mut self) -> Result<f64> {
        let before = crate::clock::unix_ms();
        let row = self
            .conn()?
            .query_one("SELECT autopoll_now_ms()", &[])
            .map_err(|e| pg_error("cannot read the server's clock", e))?;
        let after = crate::clock::unix_ms();
        let server: i64 = row.get(0);
        Ok((server as f64 - (before + after) as f64 / 2.0) / 1000.0)
    }
}
