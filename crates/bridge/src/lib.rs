//! # autopoll-bridge
//!
//! The SQLite bridge that agent sessions share with the Python MCP bridge
//! server, and autopoll's claim/lease tables on top of it.
//!
//! A [`Bridge`] is one connection to one bridge file. Every connection runs in
//! WAL mode with a busy timeout, and every read-then-write runs in a
//! `BEGIN IMMEDIATE` transaction, so any number of processes (ours and the
//! Python server) may use the file at once.
//!
//! The four shared tables keep the Python server's exact format (see
//! [`schema`]). Consumers that must answer each question exactly once use
//! [claims](Bridge::claim): a claim is a lease with an owner and an attempt
//! count, and [completing](Bridge::complete) it inserts the answer, marks the
//! question read and drops the claim in one transaction, only while the caller
//! still owns it.
#![deny(missing_docs)]

mod audit;
mod claim;
pub mod clock;
mod conversation;
pub mod error;
mod message;
pub mod pg;
pub mod prune;
pub mod pyjson;
pub mod redact;
mod rows;
pub mod schema;
pub mod shard;
mod stats;
mod status;
pub mod store;
pub mod token;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags, Transaction, TransactionBehavior};

pub use audit::actions;
pub use claim::{
    Answer, ClaimBatch, ClaimOptions, Claimed, Claimer, DeadLettered, NEW_WORK_ROWS, NewWork,
    claimable_on, last_message_id, new_claimable_on,
};
pub use conversation::{ConversationInfo, NewConversation};
pub use error::{Error, Result};
pub use message::{Message, Sent};
pub use prune::{CompactReport, FileSize, PruneReport, Pruner};
pub use stats::{SessionStats, UnseenDeadLetter};
pub use status::{PartnerStatus, SessionState, SessionStatus};
pub use store::{Store, StoreKind, Target};

/// The Python server's conversation lifetime.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3 * 3600);
/// The Python server's busy timeout, which we use too.
pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest message text the Python server accepts.
pub const MAX_MESSAGE_CHARS: usize = 50_000;
/// A partner counts as alive while its heartbeat is younger than this.
pub const ALIVE_SECS: f64 = 120.0;

/// Prepared statements kept per connection (more than every statement the
/// poller and the CLI use, so none is parsed twice).
pub const STATEMENT_CACHE: usize = 128;

/// One of the two sessions of a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Session {
    /// The session that created the conversation (a coordinator, usually).
    A,
    /// The other session (a shard, usually).
    B,
}

impl Session {
    /// `"a"` or `"b"`, as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Session::A => "a",
            Session::B => "b",
        }
    }

    /// The partner session.
    pub fn other(self) -> Session {
        match self {
            Session::A => Session::B,
            Session::B => Session::A,
        }
    }
}

impl std::fmt::Display for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Session {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "a" | "A" => Ok(Session::A),
            "b" | "B" => Ok(Session::B),
            _ => Err(Error::Invalid(format!(
                "session must be `a` or `b`, not {s:?}"
            ))),
        }
    }
}

/// Optional per-(conversation, session) send limits, counted from the
/// `messages` table so they hold across processes. Off by default: a shard
/// answering a backlog must not be throttled to the Python server's 10/minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Sends allowed in any 60 s.
    pub per_minute: u32,
    /// Sends allowed in any hour.
    pub per_hour: u32,
    /// Sends allowed in any day.
    pub per_day: u32,
}

impl RateLimit {
    /// The Python server's limits: 10/minute, 100/hour, 500/day.
    pub const PYTHON_DEFAULT: RateLimit = RateLimit {
        per_minute: 10,
        per_hour: 100,
        per_day: 500,
    };
}

/// How a [`Bridge`] connection behaves.
#[derive(Debug, Clone)]
pub struct BridgeOptions {
    /// Create the file (and tables) when it does not exist. When false, a
    /// missing file is [`Error::NotFound`].
    pub create: bool,
    /// Open a file that holds tables but none of the bridge's, adding the
    /// bridge's tables to it (`bridge init --force`). When false, such a
    /// file is refused untouched with [`Error::NotABridge`].
    pub allow_foreign: bool,
    /// How long to wait for another writer's lock before [`Error::Busy`].
    pub busy_timeout: Duration,
    /// Send limits, `None` for none.
    pub rate_limit: Option<RateLimit>,
    /// Longest message text [`Bridge::send`] accepts.
    pub max_message_chars: usize,
}

impl Default for BridgeOptions {
    fn default() -> Self {
        BridgeOptions {
            create: false,
            allow_foreign: false,
            busy_timeout: DEFAULT_BUSY_TIMEOUT,
            rate_limit: None,
            max_message_chars: MAX_MESSAGE_CHARS,
        }
    }
}

/// One connection to a bridge file.
pub struct Bridge {
    conn: Connection,
    path: PathBuf,
    opts: BridgeOptions,
}

impl std::fmt::Debug for Bridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bridge").field("path", &self.path).finish()
    }
}

/// Why SQLite could not open `path`, as the user can fix it: a folder that
/// does not exist, or the operating system's own reason (SQLite's code says
/// only "cannot open").
fn cannot_open(path: &Path) -> Error {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !parent.is_dir() {
        let dir = error::sh_quote(&parent.to_string_lossy());
        return Error::NotFound {
            what: format!("folder {}", parent.display()),
            hint: format!(
                " (for the bridge file {}); create it with `mkdir -p {dir}`, or give another --db",
                path.display()
            ),
        };
    }
    let source = if path.exists() {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .err()
    } else {
        // Nothing is created to find out: a folder we may not write in.
        std::fs::metadata(parent)
            .ok()
            .filter(|m| m.permissions().readonly())
            .map(|_| std::io::Error::from(std::io::ErrorKind::PermissionDenied))
    }
    .unwrap_or_else(|| {
        std::io::Error::other(
            "SQLite cannot open it (check the folder's permissions and free space)",
        )
    });
    Error::Io {
        op: "cannot open bridge file",
        path: path.to_path_buf(),
        source,
    }
}

impl Bridge {
    /// Open an existing bridge file (creating autopoll's own tables if needed).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path, BridgeOptions::default())
    }

    /// Open a bridge file, creating it when it does not exist.
    pub fn open_or_create(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(
            path,
            BridgeOptions {
                create: true,
                ..BridgeOptions::default()
            },
        )
    }

    /// Open with explicit options.
    ///
    /// An existing file is first opened read-only and classified
    /// ([`schema::classify`]): an empty one is refused unless `create`, someone
    /// else's database unless `allow_foreign`, a non-SQLite file or a schema
    /// mismatch always, and all of these before anything is written.
    pub fn open_with(path: impl AsRef<Path>, opts: BridgeOptions) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let timeout_ms = ms(opts.busy_timeout);
        let map = error::sql(timeout_ms);
        let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI;
        let exists = path.exists();
        if opts.create {
            flags |= OpenFlags::SQLITE_OPEN_CREATE;
        } else if !exists {
            return Err(Error::NotFound {
                what: format!("bridge file {}", path.display()),
                hint: format!(
                    "; create it with `autopoll bridge init --db {}`",
                    error::sh_quote(&path.to_string_lossy())
                ),
            });
        }
        if exists {
            schema::refuse(
                schema::inspect(&path, timeout_ms)?,
                &path,
                opts.create,
                opts.allow_foreign,
            )?;
        }
        let mut conn = Connection::open_with_flags(&path, flags).map_err(|e| match e {
            rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::CannotOpen => {
                cannot_open(&path)
            }
            e => map(e),
        })?;
        conn.busy_timeout(opts.busy_timeout).map_err(&map)?;
        // Every statement a poller runs on its way (claims, answers, audit,
        // heartbeats, leases, prune) stays prepared: with rusqlite's default
        // 16 they pushed each other out and were parsed again on every
        // question (a third of the poller's CPU in the drain bench).
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        // One plan per statement whatever values are bound: without this,
        // SQLite (built with STAT4) recompiled the claim lookups on every
        // new message id (half the poller's CPU in the drain bench).
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)
            .map_err(&map)?;
        // Again on the connection that will write: the file may have been
        // replaced since the read-only look. Still nothing written.
        let kind = schema::classify(&conn, &path, timeout_ms)?;
        let fresh = kind == schema::FileKind::Empty;
        schema::refuse(kind, &path, opts.create, opts.allow_foreign)?;
        if fresh {
            // Only possible before the first table: lets `bridge prune`
            // give freed pages back with an incremental vacuum.
            conn.execute_batch("PRAGMA auto_vacuum=INCREMENTAL;")
                .map_err(&map)?;
        }
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(&map)?;
        if !mode.eq_ignore_ascii_case("wal") {
            log::warn!(
                "bridge {} is in journal mode {mode}, not WAL",
                path.display()
            );
        }
        // WAL + NORMAL: a committed transaction survives any process crash;
        // only a power loss may roll back the last few commits.
        conn.execute_batch("PRAGMA synchronous=NORMAL;")
            .map_err(&map)?;
        schema::ensure(&mut conn, &path, timeout_ms)?;
        Ok(Bridge { conn, path, opts })
    }

    /// The file this connection is on.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The options this connection was opened with.
    pub fn options(&self) -> &BridgeOptions {
        &self.opts
    }

    /// The raw connection, for read-only inspection (tests, `doctor`).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// The connection, to install hooks on (the poller's own-commit record).
    pub fn connection_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }

    /// `PRAGMA data_version`: changes whenever another connection commits to
    /// the file. Cheap enough to check every few milliseconds.
    pub fn data_version(&self) -> Result<i64> {
        // Cached: a poller asks this on every wake.
        self.conn
            .prepare_cached("PRAGMA data_version")
            .and_then(|mut s| s.query_row([], |r| r.get(0)))
            .map_err(self.map())
    }

    /// `PRAGMA wal_checkpoint(TRUNCATE)`: copy every committed transaction
    /// from the WAL into the database file and empty the WAL. Returns false
    /// when another connection's read kept it from finishing.
    ///
    /// Called before closing a connection whose file was replaced or deleted
    /// under it: SQLite finds the `-wal` and `-shm` by name, so left full
    /// they would be read as part of whatever file is put at the path next.
    pub fn checkpoint_truncate(&self) -> Result<bool> {
        let busy: i64 = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
            .map_err(self.map())?;
        Ok(busy == 0)
    }

    /// The journal mode the file is in (`wal` normally).
    pub fn journal_mode(&self) -> Result<String> {
        self.conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .map_err(self.map())
    }

    pub(crate) fn map(&self) -> impl Fn(rusqlite::Error) -> Error + use<> {
        error::sql(ms(self.opts.busy_timeout))
    }

    /// Begin a `BEGIN IMMEDIATE` transaction, returning it and an error mapper.
    pub(crate) fn immediate(
        &mut self,
    ) -> Result<(Transaction<'_>, impl Fn(rusqlite::Error) -> Error + use<>)> {
        let map = self.map();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&map)?;
        Ok((tx, map))
    }
}

pub(crate) fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
pub(crate) mod testutil {
    use super::*;

    /// A bridge on a fresh file in a temp dir, with one conversation.
    pub struct Fixture {
        pub dir: tempfile::TempDir,
        pub bridge: Bridge,
        pub conv: NewConversation,
    }

    impl Fixture {
        pub fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let mut bridge = Bridge::open_or_create(dir.path().join("bridge.db")).unwrap();
            let conv = bridge
                .create_conversation("coordinator", "shard", DEFAULT_TTL)
                .unwrap();
            Fixture { dir, bridge, conv }
        }

        pub fn path(&self) -> PathBuf {
            self.dir.path().join("bridge.db")
        }

        pub fn id(&self) -> &str {
            &self.conv.conversation_id
        }

        /// Send `text` from session a to b.
        pub fn send_a(&mut self, text: &str) -> i64 {
            let id = self.conv.conversation_id.clone();
            let tok = self.conv.session_a_token.clone();
            self.bridge
                .send(&id, Session::A, &tok, text, None)
                .unwrap()
                .id
        }
    }
}
