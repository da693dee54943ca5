//! The bridge's schema: the four tables shared with the Python server, created
//! with its exact DDL, and autopoll's own tables beside them.
//!
//! The four shared tables are never altered. Our state (claims, leases,
//! attempts, outcomes, answers kept for repeated query ids) lives in
//! `autopoll_*` tables. One partial index on
//! `messages` (`autopoll_messages_unread`, only over unread rows) keeps claim
//! scans cheap on a file with a long history; an index does not change the
//! table's definition, and the Python server's statements work unchanged.

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
