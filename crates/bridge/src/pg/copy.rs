//! `autopoll bridge copy --from FILE.db --to postgres://...`: move a SQLite
//! bridge into PostgreSQL, in one PostgreSQL transaction (all or nothing).
//!
//! - The file is opened read-only and read in one read transaction (a
//!   snapshot: writers may go on, and what they write after it stays in the
//!   file, which the report says).
//! - Everything is copied with its row ids: conversations and tokens,
//!   every message with its read flag, session status, claims, outcomes,
//!   stored answers and the audit log. Claims arrive released (no owner,
//!   attempts kept): their pollers were on the file, and will never
//!   complete them in PostgreSQL.
//! - The target must hold no conversations or messages yet: a second copy
//!   is refused, so no message is ever in PostgreSQL twice.
//! - Times the file holds in other writers' forms are read leniently
//!   ([`crate::clock::parse`]); one that cannot be read becomes the copy's
//!   time and is counted. A message whose conversation is not in the file
//!   cannot be stored (PostgreSQL enforces the reference SQLite did not):
//!   it is left out and counted, with its id, so nothing goes missing
//!   unsaid.

use std::path::Path;

use rusqlite::OpenFlags;
use rusqlite::types::ValueRef;
use serde::Serialize;
use serde_json::Value;

use super::{PgBridge, pg_error};
use crate::error::{Error, Result};
use crate::message::text_lossy;
use crate::{BridgeOptions, clock};

/// What a copy moved.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct CopyReport {
    /// Conversations (with both tokens).
    pub conversations: u64,
    /// Messages, all of them.
    pub messages: u64,
    /// Of those, unread.
    pub unread: u64,
    /// Claims, copied released (attempts kept).
    pub claims: u64,
    /// Of those, held by a poller at the time of the copy.
    pub claims_released: u64,
    /// Outcomes of finished questions.
    pub outcomes: u64,
    /// Stored answers for repeated query ids.
    pub answers: u64,
    /// Session status rows (heartbeats).
    pub statuses: u64,
    /// Audit rows.
    pub audit_rows: u64,
    /// Times that could not be read and became the copy's time.
    pub times_fixed: u64,
    /// Ids of messages left out: their conversation is not in the file.
    pub orphans_skipped: Vec<i64>,
}

fn text(v: ValueRef<'_>) -> String {
    text_lossy(v).0
}

fn opt_text(v: ValueRef<'_>) -> Option<String> {
    match v {
        ValueRef::Null => None,
        v => Some(text(v)),
    }
}

/// A time in the file as the bridge's canonical text, or `None` (counted).
fn time(v: ValueRef<'_>, fixed: &mut u64) -> String {
    match clock::parse(&text(v)) {
        Ok(t) => clock::format(t),
        Err(_) => {
            *fixed += 1;
            clock::now_string()
        }
    }
}

/// A JSON column as JSON text for `jsonb`: an object as it is, anything
/// else as a JSON string.
fn json_text(v: ValueRef<'_>) -> Option<String> {
    let s = opt_text(v)?;
    Some(match serde_json::from_str::<Value>(&s) {
        Ok(j) => j.to_string(),
        Err(_) => Value::String(s).to_string(),
    })
}

const TS: &str = "::text::timestamp AT TIME ZONE 'UTC'";

/// Copy the SQLite bridge at `from` into the PostgreSQL bridge at `to`
/// (its schema is created when missing).
pub fn copy(from: &Path, to: &str) -> Result<CopyReport> {
    let timeout_ms = crate::ms(crate::DEFAULT_BUSY_TIMEOUT);
    let map = crate::error::sql(timeout_ms);
    if !from.exists() {
        return Err(Error::not_found(format!("bridge file {}", from.display())));
    }
    crate::schema::refuse(
        crate::schema::inspect(from, timeout_ms)?,
        from,
        false,
        false,
    )?;
    let mut src = rusqlite::Connection::open_with_flags(
        from,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(&map)?;
    src.busy_timeout(crate::DEFAULT_BUSY_TIMEOUT)
        .map_err(&map)?;
    let has =
        |t: &str| -> bool { crate::schema::table_columns(&src, t).is_ok_and(|c| !c.is_empty()) };
    let (has_claims, has_outcomes, has_answers) = (
        has("autopoll_claims"),
        has("autopoll_outcomes"),
        has("autopoll_answers"),
    );
    let snap = src.transaction().map_err(&map)?;
    let mut pg = PgBridge::connect(
        to,
        BridgeOptions {
            create: true,
            ..BridgeOptions::default()
        },
    )?;
    let shown = pg.shown.clone();
    let c = pg.conn()?;
    let mut tx = c
        .transaction()
        .map_err(|e| pg_error("cannot begin the copy", e))?;
    let r = tx
        .query_one(
            "SELECT (SELECT count(*) FROM conversations), (SELECT count(*) FROM messages)",
            &[],
        )
        .map_err(|e| pg_error("cannot look at the target", e))?;
    let (nc, nm): (i64, i64) = (r.get(0), r.get(1));
    if nc > 0 || nm > 0 {
        return Err(Error::Invalid(format!(
            "{shown} already holds {nc} conversation(s) and {nm} message(s); copy into an empty \
             database (a second copy would put messages in twice): `createdb NEW` and \
             `autopoll bridge copy --from {} --to postgres://.../NEW`",
            crate::error::sh_quote(&from.to_string_lossy())
        )));
    }
    let mut rep = CopyReport::default();
    let pgerr = |what: &'static str| move |e| pg_error(what, e);

    let mut convs = std::collections::HashSet::new();
    {
        let mut st = snap
            .prepare(
                "SELECT id, session_a_role, session_b_role, session_a_token, session_b_token,
                        created_at, expires_at FROM conversations",
            )
            .map_err(&map)?;
        let mut rows = st.query([]).map_err(&map)?;
        let ins = tx
            .prepare(&format!(
                "INSERT INTO conversations (id, session_a_role, session_b_role, session_a_token,
                   session_b_token, created_at, expires_at)
                 VALUES ($1, $2, $3, $4, $5, $6{TS}, $7{TS})"
            ))
            .map_err(pgerr("cannot prepare the copy"))?;
        while let Some(row) = rows.next().map_err(&map)? {
            let id = text(row.get_ref(0).map_err(&map)?);
            let vals: Vec<String> = (1..5)
                .map(|i| row.get_ref(i).map(text))
                .collect::<rusqlite::Result<_>>()
                .map_err(&map)?;
            let created = time(row.get_ref(5).map_err(&map)?, &mut rep.times_fixed);
            let expires = time(row.get_ref(6).map_err(&map)?, &mut rep.times_fixed);
            tx.execute(
                &ins,
                &[
                    &id, &vals[0], &vals[1], &vals[2], &vals[3], &created, &expires,
                ],
            )
            .map_err(pgerr("cannot copy a conversation"))?;
            convs.insert(id);
            rep.conversations += 1;
        }
    }
    {
        let mut st = snap
            .prepare(
                "SELECT id, conversation_id, from_session, to_session, message, metadata,
                        timestamp, read FROM messages ORDER BY id",
            )
            .map_err(&map)?;
        let mut rows = st.query([]).map_err(&map)?;
        let ins = tx
            .prepare(&format!(
                "INSERT INTO messages (id, conversation_id, from_session, to_session, message,
                   metadata, timestamp, read)
                 VALUES ($1, $2, $3, $4, $5, $6::text::jsonb, $7{TS}, $8)"
            ))
            .map_err(pgerr("cannot prepare the copy"))?;
        while let Some(row) = rows.next().map_err(&map)? {
            let id: i64 = row.get(0).map_err(&map)?;
            let conv = text(row.get_ref(1).map_err(&map)?);
            if !convs.contains(&conv) {
                rep.orphans_skipped.push(id);
                continue;
            }
            let from_s = text(row.get_ref(2).map_err(&map)?);
            let to_s = text(row.get_ref(3).map_err(&map)?);
            let body = text(row.get_ref(4).map_err(&map)?);
            let meta = json_text(row.get_ref(5).map_err(&map)?);
            let ts = time(row.get_ref(6).map_err(&map)?, &mut rep.times_fixed);
            let read = row.get::<_, Option<i64>>(7).ok().flatten().unwrap_or(0) == 1;
            tx.execute(
                &ins,
                &[&id, &conv, &from_s, &to_s, &body, &meta, &ts, &read],
            )
            .map_err(pgerr("cannot copy a message"))?;
            rep.messages += 1;
            rep.unread += u64::from(!read);
        }
    }
    {
        let mut st = snap
            .prepare(
                "SELECT conversation_id, session_id, status, last_heartbeat FROM session_status",
            )
            .map_err(&map)?;
        let mut rows = st.query([]).map_err(&map)?;
        while let Some(row) = rows.next().map_err(&map)? {
            let vals: Vec<String> = (0..3)
                .map(|i| row.get_ref(i).map(text))
                .collect::<rusqlite::Result<_>>()
                .map_err(&map)?;
            let hb = time(row.get_ref(3).map_err(&map)?, &mut rep.times_fixed);
            tx.execute(
                &format!(
                    "INSERT INTO session_status (conversation_id, session_id, status, last_heartbeat)
                     VALUES ($1, $2, $3, $4{TS})"
                ),
                &[&vals[0], &vals[1], &vals[2], &hb],
            )
            .map_err(pgerr("cannot copy a session status"))?;
            rep.statuses += 1;
        }
    }
    if has_claims {
        let mut st = snap
            .prepare(
                "SELECT c.message_id, c.conversation_id, c.to_session, c.owner, c.attempts,
                        c.first_claimed_at, c.last_claimed_at, c.last_error
                 FROM autopoll_claims c JOIN messages m ON m.id = c.message_id",
            )
            .map_err(&map)?;
        let mut rows = st.query([]).map_err(&map)?;
        while let Some(row) = rows.next().map_err(&map)? {
            let id: i64 = row.get(0).map_err(&map)?;
            if rep.orphans_skipped.contains(&id) {
                continue;
            }
            let conv = text(row.get_ref(1).map_err(&map)?);
            let to_s = text(row.get_ref(2).map_err(&map)?);
            let held = !matches!(row.get_ref(3).map_err(&map)?, ValueRef::Null);
            let attempts: i64 = row.get(4).map_err(&map)?;
            let first = time(row.get_ref(5).map_err(&map)?, &mut rep.times_fixed);
            let last = time(row.get_ref(6).map_err(&map)?, &mut rep.times_fixed);
            let err = opt_text(row.get_ref(7).map_err(&map)?);
            tx.execute(
                &format!(
                    "INSERT INTO autopoll_claims (message_id, conversation_id, to_session, owner,
                       lease_until_ms, attempts, first_claimed_at, last_claimed_at, last_error)
                     VALUES ($1, $2, $3, NULL, NULL, $4, $5{TS}, $6{TS}, $7)"
                ),
                &[&id, &conv, &to_s, &(attempts as i32), &first, &last, &err],
            )
            .map_err(pgerr("cannot copy a claim"))?;
            rep.claims += 1;
            rep.claims_released += u64::from(held);
        }
    }
    if has_outcomes {
        let mut st = snap
            .prepare(
                "SELECT message_id, conversation_id, to_session, outcome, response_id, attempts,
                        owner, detail, completed_at FROM autopoll_outcomes",
            )
            .map_err(&map)?;
        let mut rows = st.query([]).map_err(&map)?;
        while let Some(row) = rows.next().map_err(&map)? {
            let id: i64 = row.get(0).map_err(&map)?;
            let conv = text(row.get_ref(1).map_err(&map)?);
            let to_s = text(row.get_ref(2).map_err(&map)?);
            let outcome = text(row.get_ref(3).map_err(&map)?);
            let rid: Option<i64> = row.get(4).map_err(&map)?;
            let attempts: i64 = row.get(5).map_err(&map)?;
            let owner = opt_text(row.get_ref(6).map_err(&map)?);
            let detail = opt_text(row.get_ref(7).map_err(&map)?);
            let at = time(row.get_ref(8).map_err(&map)?, &mut rep.times_fixed);
            tx.execute(
                &format!(
                    "INSERT INTO autopoll_outcomes (message_id, conversation_id, to_session, outcome,
                       response_id, attempts, owner, detail, completed_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9{TS})"
                ),
                &[&id, &conv, &to_s, &outcome, &rid, &(attempts as i32), &owner, &detail, &at],
            )
            .map_err(pgerr("cannot copy an outcome"))?;
            rep.outcomes += 1;
        }
    }
    if has_answers {
        let mut st = snap
            .prepare(
                "SELECT conversation_id, to_session, query_id, message_id, response_id, answered_at
                 FROM autopoll_answers",
            )
            .map_err(&map)?;
        let mut rows = st.query([]).map_err(&map)?;
        while let Some(row) = rows.next().map_err(&map)? {
            let vals: Vec<String> = (0..3)
                .map(|i| row.get_ref(i).map(text))
                .collect::<rusqlite::Result<_>>()
                .map_err(&map)?;
            let mid: i64 = row.get(3).map_err(&map)?;
            let rid: i64 = row.get(4).map_err(&map)?;
            let at = time(row.get_ref(5).map_err(&map)?, &mut rep.times_fixed);
            tx.execute(
                &format!(
                    "INSERT INTO autopoll_answers (conversation_id, to_session, query_id,
                       message_id, response_id, answered_at)
                     VALUES ($1, $2, $3, $4, $5, $6{TS})"
                ),
                &[&vals[0], &vals[1], &vals[2], &mid, &rid, &at],
            )
            .map_err(pgerr("cannot copy a stored answer"))?;
            rep.answers += 1;
        }
    }
    {
        let mut st = snap
            .prepare(
                "SELECT id, conversation_id, session_id, action, details, timestamp
                 FROM audit_log ORDER BY id",
            )
            .map_err(&map)?;
        let mut rows = st.query([]).map_err(&map)?;
        let ins = tx
            .prepare(&format!(
                "INSERT INTO audit_log (id, conversation_id, session_id, action, details, timestamp)
                 VALUES ($1, $2, $3, $4, $5::text::jsonb, $6{TS})"
            ))
            .map_err(pgerr("cannot prepare the copy"))?;
        while let Some(row) = rows.next().map_err(&map)? {
            let id: i64 = row.get(0).map_err(&map)?;
            let conv = opt_text(row.get_ref(1).map_err(&map)?);
            let sess = opt_text(row.get_ref(2).map_err(&map)?);
            let action = text(row.get_ref(3).map_err(&map)?);
            let details = json_text(row.get_ref(4).map_err(&map)?);
            let ts = time(row.get_ref(5).map_err(&map)?, &mut rep.times_fixed);
            tx.execute(&ins, &[&id, &conv, &sess, &action, &details, &ts])
                .map_err(pgerr("cannot copy an audit row"))?;
            rep.audit_rows += 1;
        }
    }
    // New rows continue after the copied ids.
    tx.batch_execute(
        "SELECT setval(pg_get_serial_sequence('messages', 'id'),
                       GREATEST((SELECT max(id) FROM messages), 1));
         SELECT setval(pg_get_serial_sequence('audit_log', 'id'),
                       GREATEST((SELECT max(id) FROM audit_log), 1));",
    )
    .map_err(pgerr("cannot move the id sequences past the copied rows"))?;
    tx.commit()
        .map_err(pgerr("cannot commit the copy (nothing was copied)"))?;
    drop(snap);
    Ok(rep)
}
