//! The bridge's schema: the four tables shared with the Python server, created
//! with its exact DDL, and autopoll's own tables beside them.
//!
//! The four shared tables are never altered. Our state (claims, leases,
//! attempts, outcomes, answers kept for repeated query ids) lives in
//! `autopoll_*` tables. Two partial indexes on `messages`, only over unread
//! rows, keep claim scans cheap on a file with a long history:
//! `autopoll_messages_unread` and `autopoll_messages_unread_fifo` (rows in
//! row id order per conversation and session, so a claim, which goes in
//! arrival order, reads only the rows it takes instead of sorting the
//! whole backlog). An index does not change the table's definition, and
//! the Python server's statements work unchanged.
//!
//! Before anything is written, a file is [classified](classify) with reads
//! only: a file that holds tables but not the bridge's, or that is not SQLite
//! at all, is refused untouched (no tables added, no switch to WAL).

use std::path::Path;

use rusqlite::Connection;

use crate::error::{Error, Result};

/// Version of autopoll's own tables, stored in `autopoll_meta`.
pub const SCHEMA_VERSION: i64 = 1;

/// The Python server's DDL, statement for statement.
pub const SHARED_DDL: &str = "
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    session_a_role TEXT NOT NULL,
    session_b_role TEXT NOT NULL,
    session_a_token TEXT NOT NULL,
    session_b_token TEXT NOT NULL,
    created_at TEXT NOT NULL,
    expires_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id TEXT NOT NULL,
    from_session TEXT NOT NULL,
    to_session TEXT NOT NULL,
    message TEXT NOT NULL,
    metadata TEXT,
    timestamp TEXT NOT NULL,
    read INTEGER DEFAULT 0,
    FOREIGN KEY (conversation_id) REFERENCES conversations(id)
);
CREATE TABLE IF NOT EXISTS session_status (
    conversation_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    status TEXT NOT NULL,
    last_heartbeat TEXT NOT NULL,
    PRIMARY KEY (conversation_id, session_id)
);
CREATE TABLE IF NOT EXISTS audit_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id TEXT,
    session_id TEXT,
    action TEXT NOT NULL,
    details TEXT,
    timestamp TEXT NOT NULL
);
";

/// autopoll's own tables and index.
pub const OWN_DDL: &str = "
CREATE TABLE IF NOT EXISTS autopoll_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- One row per message some consumer has claimed at least once and not finished.
-- owner/lease_until_ms are NULL when released; attempts survive releases.
CREATE TABLE IF NOT EXISTS autopoll_claims (
    message_id INTEGER PRIMARY KEY,
    conversation_id TEXT NOT NULL,
    to_session TEXT NOT NULL,
    owner TEXT,
    lease_until_ms INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    first_claimed_at TEXT NOT NULL,
    last_claimed_at TEXT NOT NULL,
    last_error TEXT
);
-- One row per finished message: at most one, enforced by the primary key.
CREATE TABLE IF NOT EXISTS autopoll_outcomes (
    message_id INTEGER PRIMARY KEY,
    conversation_id TEXT NOT NULL,
    to_session TEXT NOT NULL,
    outcome TEXT NOT NULL CHECK (outcome IN ('answered', 'dead_letter', 'skipped')),
    response_id INTEGER,
    attempts INTEGER NOT NULL,
    owner TEXT,
    detail TEXT,
    completed_at TEXT NOT NULL
);
-- One row per query id answered (not with an error) in a conversation's
-- session: what a repeat of that query id gets again, without the engine.
CREATE TABLE IF NOT EXISTS autopoll_answers (
    conversation_id TEXT NOT NULL,
    to_session TEXT NOT NULL,
    query_id TEXT NOT NULL,
    message_id INTEGER NOT NULL,
    response_id INTEGER NOT NULL,
    answered_at TEXT NOT NULL,
    PRIMARY KEY (conversation_id, to_session, query_id)
);
CREATE INDEX IF NOT EXISTS autopoll_outcomes_by_session
    ON autopoll_outcomes (conversation_id, to_session, outcome);
CREATE INDEX IF NOT EXISTS autopoll_messages_unread
    ON messages (conversation_id, to_session, timestamp) WHERE read = 0;
CREATE INDEX IF NOT EXISTS autopoll_messages_unread_fifo
    ON messages (conversation_id, to_session) WHERE read = 0;
";

/// Columns each shared table must have, as the Python server and autopoll use them.
pub const REQUIRED_COLUMNS: &[(&str, &[&str])] = &[
    (
        "conversations",
        &[
            "id",
            "session_a_role",
            "session_b_role",
            "session_a_token",
            "session_b_token",
            "created_at",
            "expires_at",
        ],
    ),
    (
        "messages",
        &[
            "id",
            "conversation_id",
            "from_session",
            "to_session",
            "message",
            "metadata",
            "timestamp",
            "read",
        ],
    ),
    (
        "session_status",
        &["conversation_id", "session_id", "status", "last_heartbeat"],
    ),
    (
        "audit_log",
        &[
            "id",
            "conversation_id",
            "session_id",
            "action",
            "details",
            "timestamp",
        ],
    ),
    ("autopoll_meta", &["key", "value"]),
    (
        "autopoll_claims",
        &[
            "message_id",
            "conversation_id",
            "to_session",
            "owner",
            "lease_until_ms",
            "attempts",
            "first_claimed_at",
            "last_claimed_at",
            "last_error",
        ],
    ),
    (
        "autopoll_outcomes",
        &[
            "message_id",
            "conversation_id",
            "to_session",
            "outcome",
            "response_id",
            "attempts",
            "owner",
            "detail",
            "completed_at",
        ],
    ),
    (
        "autopoll_answers",
        &[
            "conversation_id",
            "to_session",
            "query_id",
            "message_id",
            "response_id",
            "answered_at",
        ],
    ),
];

/// What a file holds, as far as autopoll cares (see [`classify`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileKind {
    /// No tables at all (a new or zero-length file).
    Empty,
    /// At least one of the four shared tables, each present one with the
    /// columns the bridge needs.
    Bridge,
    /// Tables, none of them the bridge's: someone else's database.
    Foreign(Vec<String>),
}

/// Classify the database behind `conn` with reads only: [`FileKind`], or
/// [`Error::SchemaMismatch`] when a shared table lacks a column, or
/// [`Error::NotADatabase`] when the file is not SQLite.
pub fn classify(conn: &Connection, path: &Path, timeout_ms: u64) -> Result<FileKind> {
    let map = crate::error::sql(timeout_ms);
    let not_db = |e: rusqlite::Error| match &e {
        rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::NotADatabase => {
            Error::NotADatabase {
                path: path.to_path_buf(),
                suggestion: crate::error::new_bridge_suggestion(path),
            }
        }
        _ => map(e),
    };
    let mut stmt = conn
        .prepare(
            "SELECT name FROM sqlite_master WHERE type = 'table' \
             AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name",
        )
        .map_err(not_db)?;
    let tables: Vec<String> = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .and_then(|rows| rows.collect())
        .map_err(not_db)?;
    if tables.is_empty() {
        return Ok(FileKind::Empty);
    }
    let shared: Vec<(&str, &[&str])> = REQUIRED_COLUMNS[..4]
        .iter()
        .filter(|(t, _)| tables.iter().any(|have| have == t))
        .copied()
        .collect();
    if shared.is_empty() {
        return Ok(FileKind::Foreign(tables));
    }
    check_columns(conn, path, &shared)?;
    Ok(FileKind::Bridge)
}

/// Open `path` read-only and [`classify`] it. Writes nothing (a file in
/// rollback-journal mode stays byte for byte as it was; no `-wal` or `-shm`
/// appears beside it).
pub fn inspect(path: &Path, timeout_ms: u64) -> Result<FileKind> {
    let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
        | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX
        | rusqlite::OpenFlags::SQLITE_OPEN_URI;
    let conn = Connection::open_with_flags(path, flags).map_err(|e| match e {
        rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::CannotOpen => {
            Error::Io {
                op: "cannot open bridge file",
                path: path.to_path_buf(),
                source: std::io::Error::from_raw_os_error(f.extended_code & 0xff),
            }
        }
        e => crate::error::sql(timeout_ms)(e),
    })?;
    conn.busy_timeout(std::time::Duration::from_millis(timeout_ms))
        .map_err(crate::error::sql(timeout_ms))?;
    classify(&conn, path, timeout_ms)
}

/// Turn a [`FileKind`] into the refusal the options call for, if any.
pub(crate) fn refuse(kind: FileKind, path: &Path, create: bool, allow_foreign: bool) -> Result<()> {
    match kind {
        FileKind::Bridge => Ok(()),
        FileKind::Empty if create => Ok(()),
        FileKind::Empty => Err(Error::NotFound {
            what: format!("bridge tables in {} (the file is empty)", path.display()),
            hint: format!(
                "; autopoll left it unchanged; create them with `autopoll bridge init --db {}`",
                crate::error::sh_quote(&path.to_string_lossy())
            ),
        }),
        FileKind::Foreign(_) if allow_foreign => Ok(()),
        FileKind::Foreign(tables) => {
            let mut list = tables
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ");
            if tables.len() > 5 {
                list.push_str(&format!(" and {} more", tables.len() - 5));
            }
            Err(Error::NotABridge {
                path: path.to_path_buf(),
                tables: list,
                suggestion: crate::error::new_bridge_suggestion(path),
            })
        }
    }
}

/// Create what is missing, then check every required column is there.
pub(crate) fn ensure(conn: &mut Connection, path: &Path, timeout_ms: u64) -> Result<()> {
    let map = crate::error::sql(timeout_ms);
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(&map)?;
    tx.execute_batch(SHARED_DDL).map_err(&map)?;
    // Check the shared tables before adding our index to one of them, so a
    // foreign file fails with the missing column, not an index error.
    check_columns(&tx, path, &REQUIRED_COLUMNS[..4])?;
    tx.execute_batch(OWN_DDL).map_err(&map)?;
    check_columns(&tx, path, &REQUIRED_COLUMNS[4..])?;
    tx.execute(
        "INSERT INTO autopoll_meta (key, value) VALUES ('schema_version', ?1)
         ON CONFLICT(key) DO NOTHING",
        [SCHEMA_VERSION.to_string()],
    )
    .map_err(&map)?;
    let version: String = tx
        .query_row(
            "SELECT value FROM autopoll_meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .map_err(&map)?;
    if version.parse::<i64>().ok() != Some(SCHEMA_VERSION) {
        return Err(Error::Invalid(format!(
            "{} holds autopoll tables of schema version {version}; this autopoll knows version {SCHEMA_VERSION}",
            path.display()
        )));
    }
    tx.commit().map_err(&map)?;
    Ok(())
}

fn check_columns(conn: &Connection, path: &Path, tables: &[(&str, &[&str])]) -> Result<()> {
    for (table, required) in tables {
        let cols = table_columns(conn, table).map_err(Error::Sqlite)?;
        for col in *required {
            if !cols.iter().any(|c| c == col) {
                return Err(Error::SchemaMismatch {
                    path: path.to_path_buf(),
                    table: (*table).to_string(),
                    column: (*col).to_string(),
                });
            }
        }
    }
    Ok(())
}

/// Column names of `table`, in order.
pub fn table_columns(conn: &Connection, table: &str) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare("SELECT name FROM pragma_table_info(?1)")?;
    let rows = stmt.query_map([table], |r| r.get::<_, String>(0))?;
    rows.collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Bridge, BridgeOptions};

    fn foreign(dir: &Path) -> std::path::PathBuf {
        let db = dir.join("theirs.db");
        let c = Connection::open(&db).unwrap();
        c.execute_batch(
            "CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL);
             INSERT INTO invoices (total) VALUES (12.5), (99.0);",
        )
        .unwrap();
        db
    }

    fn beside(db: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(db.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_foreign_file_is_refused_byte_for_byte_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let db = foreign(dir.path());
        let before = std::fs::read(&db).unwrap();
        for create in [false, true] {
            let opts = BridgeOptions {
                create,
                ..BridgeOptions::default()
            };
            let e = Bridge::open_with(&db, opts).unwrap_err();
            assert!(matches!(e, Error::NotABridge { .. }), "{e}");
            let msg = e.to_string();
            assert!(
                msg.contains("theirs.db") && msg.contains("invoices"),
                "{msg}"
            );
            assert!(msg.contains("autopoll bridge init --db"), "{msg}");
            assert!(e.is_not_a_bridge());
        }
        assert_eq!(std::fs::read(&db).unwrap(), before);
        assert_eq!(beside(&db), vec!["theirs.db".to_string()]);
        assert_eq!(
            inspect(&db, 100).unwrap(),
            FileKind::Foreign(vec!["invoices".into()])
        );
    }

    #[test]
    fn allow_foreign_adds_the_bridge_tables() {
        let dir = tempfile::tempdir().unwrap();
        let db = foreign(dir.path());
        let opts = BridgeOptions {
            create: true,
            allow_foreign: true,
            ..BridgeOptions::default()
        };
        let b = Bridge::open_with(&db, opts).unwrap();
        assert_eq!(b.journal_mode().unwrap(), "wal");
        drop(b);
        assert_eq!(inspect(&db, 100).unwrap(), FileKind::Bridge);
    }

    #[test]
    fn an_empty_file_is_not_found_and_left_alone_unless_creating() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("empty.db");
        std::fs::write(&db, b"").unwrap();
        let e = Bridge::open(&db).unwrap_err();
        assert!(matches!(e, Error::NotFound { .. }), "{e}");
        assert!(e.to_string().contains("autopoll bridge init --db"), "{e}");
        assert_eq!(std::fs::metadata(&db).unwrap().len(), 0);
        assert_eq!(beside(&db), vec!["empty.db".to_string()]);
        Bridge::open_or_create(&db).unwrap();
        assert_eq!(inspect(&db, 100).unwrap(), FileKind::Bridge);
    }

    #[test]
    fn a_file_that_is_not_sqlite_is_named_and_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("notes.txt");
        let text =
            "this is not a database, it is a long enough text file to have a header\n".repeat(20);
        std::fs::write(&db, &text).unwrap();
        for opts in [
            BridgeOptions::default(),
            BridgeOptions {
                create: true,
                allow_foreign: true,
                ..BridgeOptions::default()
            },
        ] {
            let e = Bridge::open_with(&db, opts).unwrap_err();
            assert!(matches!(e, Error::NotADatabase { .. }), "{e}");
            assert!(e.to_string().contains("notes.txt"), "{e}");
            assert!(e.to_string().contains("not a database"), "{e}");
        }
        assert_eq!(std::fs::read_to_string(&db).unwrap(), text);
        assert_eq!(beside(&db), vec!["notes.txt".to_string()]);
    }

    #[test]
    fn a_bridge_in_wal_mode_opens_after_the_read_only_look() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("bridge.db");
        let mut b = Bridge::open_or_create(&db).unwrap();
        b.create_conversation("c", "s", crate::DEFAULT_TTL).unwrap();
        // Still open: the -wal and -shm exist; a second opener classifies it.
        let b2 = Bridge::open(&db).unwrap();
        assert_eq!(b2.list_conversations().unwrap().len(), 1);
        drop((b, b2));
        // Closed (no -wal or -shm left): still a bridge.
        assert_eq!(inspect(&db, 100).unwrap(), FileKind::Bridge);
        Bridge::open(&db).unwrap();
    }

    #[test]
    fn a_file_with_only_the_python_tables_is_a_bridge() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("py.db");
        let c = Connection::open(&db).unwrap();
        c.execute_batch(SHARED_DDL).unwrap();
        drop(c);
        assert_eq!(inspect(&db, 100).unwrap(), FileKind::Bridge);
        Bridge::open(&db).unwrap();
    }
}
