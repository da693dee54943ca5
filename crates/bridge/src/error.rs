//! The bridge's typed error: every failure a caller may want to tell apart.

use std::path::PathBuf;

/// What went wrong in a bridge operation.
///
/// Messages are written for the person at the terminal: each says what failed
/// and, where there is one, what to type to fix it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The token does not match the one stored for that session.
    #[error("invalid session token for conversation {conversation} session {session}{hint}")]
    InvalidToken {
        /// Conversation id.
        conversation: String,
        /// Session name (`a` or `b`).
        session: String,
        /// What is wrong with it, empty or starting with "; ".
        hint: String,
    },
    /// The conversation's `expires_at` has passed.
    #[error(
        "conversation {conversation} expired at {expires_at} UTC; renew it with \
         `autopoll bridge renew --conversation {conversation} --token TOKEN`"
    )]
    Expired {
        /// Conversation id.
        conversation: String,
        /// Its expiry, in the bridge's timestamp shape.
        expires_at: String,
    },
    /// A file, conversation or message does not exist.
    #[error("{what} not found{hint}")]
    NotFound {
        /// What was looked for.
        what: String,
        /// Extra advice, empty or starting with "; ".
        hint: String,
    },
    /// Another connection held the write lock past the busy timeout.
    #[error(
        "bridge database is busy: another process held its write lock for more than {timeout_ms} ms"
    )]
    Busy {
        /// The busy timeout that passed.
        timeout_ms: u64,
    },
    /// The file's tables do not have a column autopoll (or the Python server) needs.
    #[error(
        "bridge schema mismatch in {path}: table `{table}` lacks column `{column}` \
         (is this a bridge file of the Python MCP bridge server?); autopoll left it unchanged"
    )]
    SchemaMismatch {
        /// The database file.
        path: PathBuf,
        /// The table missing a column.
        table: String,
        /// The missing column.
        column: String,
    },
    /// A SQLite file that holds tables, none of them the bridge's: someone
    /// else's database. Nothing was written to it.
    #[error(
        "{path} is not a bridge file: it is a SQLite database of something else (tables: {tables}); \
         autopoll left it unchanged. Point --db (AUTOPOLL_DB) at the bridge file the Python server \
         uses, or make a new bridge: `autopoll bridge init --db {suggestion}`"
    )]
    NotABridge {
        /// The database file.
        path: PathBuf,
        /// Its tables, comma-separated (at most a few).
        tables: String,
        /// A path beside it where a new bridge could go, quoted for a shell.
        suggestion: String,
    },
    /// A file that is not a SQLite database at all. Nothing was written to it.
    #[error(
        "{path} is not a SQLite database (file is not a database); autopoll left it unchanged. \
         Point --db (AUTOPOLL_DB) at the bridge file the Python server uses, or make a new bridge: \
         `autopoll bridge init --db {suggestion}`"
    )]
    NotADatabase {
        /// The file.
        path: PathBuf,
        /// A path beside it where a new bridge could go, quoted for a shell.
        suggestion: String,
    },
    /// A send went over the configured rate limit.
    #[error(
        "rate limit: session {session} of {conversation} sent {count} messages in the last {window}, limit {limit}"
    )]
    RateLimited {
        /// Conversation id.
        conversation: String,
        /// Sending session.
        session: String,
        /// Window name (minute, hour, day).
        window: &'static str,
        /// Messages counted in the window.
        count: u64,
        /// The limit.
        limit: u32,
    },
    /// The caller passed something the bridge refuses (too long, bad id, bad JSON).
    #[error("{0}")]
    Invalid(String),
    /// A file-system operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Any other SQLite failure (corruption, full disk, ...).
    #[error("SQLite: {0}")]
    Sqlite(#[source] rusqlite::Error),
    /// A PostgreSQL failure: what was being done, the server's or the
    /// connection's reason, and what to do about it.
    #[error("PostgreSQL: {message}")]
    Postgres {
        /// The whole message.
        message: String,
        /// True when a retry may pass (connection lost, server restarting,
        /// a timeout or a serialization failure).
        transient: bool,
    },
}

/// Shorthand for bridge results.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn not_found(what: impl Into<String>) -> Self {
        Error::NotFound {
            what: what.into(),
            hint: String::new(),
        }
    }

    /// True when the file is not a bridge (someone else's database, not
    /// SQLite, or a schema mismatch): autopoll refused it without writing.
    pub fn is_not_a_bridge(&self) -> bool {
        matches!(
            self,
            Error::NotABridge { .. } | Error::NotADatabase { .. } | Error::SchemaMismatch { .. }
        )
    }

    /// True for failures that may pass when retried later (lock contention).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::Busy { .. }
                | Error::Postgres {
                    transient: true,
                    ..
                }
        )
    }
}

/// Map a SQLite error, turning lock contention into [`Error::Busy`].
pub(crate) fn sql(timeout_ms: u64) -> impl Fn(rusqlite::Error) -> Error {
    move |e| {
        if let rusqlite::Error::SqliteFailure(f, _) = &e
            && matches!(
                f.code,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            )
        {
            return Error::Busy { timeout_ms };
        }
        Error::Sqlite(e)
    }
}

/// Quote for a POSIX shell when needed (for commands printed in messages).
pub fn sh_quote(s: &str) -> String {
    let safe = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-:@%+=,".contains(&b));
    if safe {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Where a new bridge could go beside `path` (for "make a new one" hints):
/// `bridge.db` in the same folder, or `bridge-new.db` when that is `path`.
pub fn new_bridge_suggestion(path: &std::path::Path) -> String {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let name = if path.file_name().is_some_and(|n| n == "bridge.db") {
        "bridge-new.db"
    } else {
        "bridge.db"
    };
    let p = match dir {
        Some(d) => d.join(name),
        None => std::path::PathBuf::from(name),
    };
    sh_quote(&p.to_string_lossy())
}
