//! Claims: how consumers (pollers) take unread messages so that each is
//! answered exactly once, across any number of processes and crashes.
//!
//! A claim is a row in `autopoll_claims`: an owner, a lease (expiry in Unix
//! milliseconds) and an attempt count. A message is claimable while it is
//! unread and nobody holds a live lease on it. Claiming bumps the attempt
//! count; once it has reached `max_attempts`, the message is dead-lettered
//! (answered with an error response) instead of claimed again, so a question
//! that kills its consumer cannot loop forever.
//!
//! Finishing a message (answer, skip or dead letter) deletes its claim, marks
//! it read and writes one `autopoll_outcomes` row, all in one transaction and
//! only while the caller still owns the claim. An owner whose lease expired
//! and was taken over finishes nothing: its calls change 0 rows.
//!
//! Claims go in row id order (arrival order), not timestamp order: another
//! writer's clock or format (local time, a zone suffix, garbage) must not
//! make a question wait behind newer ones. A row whose text cannot be read
//! (not UTF-8, a BLOB, NULL) is dead-lettered on the spot, alone, so it
//! cannot fail the batch it is in.
//!
//! An answer that carries a [`Answer::repeat_key`] is remembered in
//! `autopoll_answers` (one row per conversation, session and query id), so
//! that a query repeating an answered query_id gets the stored answer again
//! ([`Bridge::earlier_answer`]) without asking the engine.

use std::collections::HashMap;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, ToSql, params};
use serde_json::json;

use crate::error::{Error, Result};
use crate::message::{self, MESSAGE_COLUMNS, Message};
use crate::rows::MultiRow;
use crate::shard::{self, Response};
use crate::{Bridge, Session, audit, clock, token};

/// Who holds claims: a unique owner token and the shard id answers are signed with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimer {
    owner: String,
    shard_id: String,
}

impl Claimer {
    /// A new claimer for `shard_id`, with an owner token unique to this
    /// process and call (`<shard_id>/<pid>/<random>`).
    pub fn new(shard_id: &str) -> Result<Claimer> {
        Ok(Claimer {
            owner: format!(
                "{shard_id}/{}/{}",
                std::process::id(),
                token::random_hex(4)?
            ),
            shard_id: shard_id.to_string(),
        })
    }

    /// The owner token stored in claims.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The shard id.
    pub fn shard_id(&self) -> &str {
        &self.shard_id
    }
}

/// How to claim.
#[derive(Debug, Clone, Copy)]
pub struct ClaimOptions {
    /// Claim at most this many messages.
    pub limit: usize,
    /// Lease length: the claim is ours until then unless extended.
    pub lease: Duration,
    /// A message already attempted this many times is dead-lettered instead.
    pub max_attempts: u32,
}

impl ClaimOptions {
    /// Refuse options no claim can use (the same check on every store).
    pub(crate) fn check(&self) -> Result<()> {
        if self.max_attempts == 0 {
            return Err(Error::Invalid("max_attempts must be at least 1".into()));
        }
        Ok(())
    }
}

impl Default for ClaimOptions {
    fn default() -> Self {
        ClaimOptions {
            limit: 64,
            lease: Duration::from_secs(30),
            max_attempts: 3,
        }
    }
}

/// A message we now hold.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// The message.
    pub message: Message,
    /// Attempts including this one (1 on first claim).
    pub attempts: u32,
    /// Lease expiry, Unix milliseconds.
    pub lease_until_ms: i64,
}

/// A message that failed `max_attempts` times and got an error response.
#[derive(Debug, Clone)]
pub struct DeadLettered {
    /// The question's row id.
    pub message_id: i64,
    /// Its query id.
    pub query_id: String,
    /// Attempts it had.
    pub attempts: u32,
    /// The error response's row id.
    pub response_id: i64,
    /// The last failure recorded, if any.
    pub last_error: Option<String>,
}

/// What one claim call did.
#[derive(Debug, Default)]
pub struct ClaimBatch {
    /// Newly held messages, oldest first.
    pub claimed: Vec<Claimed>,
    /// Messages dead-lettered instead of claimed.
    pub dead_lettered: Vec<DeadLettered>,
}

/// An answer to a claimed message.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The question's row id.
    pub message_id: i64,
    /// The response message's text (a [`Response`] as JSON, normally).
    pub text: String,
    /// The question's query id as a repeat key ([`shard::Query::repeat_key`]):
    /// given for a real answer, so a later query with the same id gets this
    /// answer again. `None` for error responses and repeats themselves.
    pub repeat_key: Option<String>,
}

impl Answer {
    /// An answer that is not remembered for repeats.
    pub fn new(message_id: i64, text: impl Into<String>) -> Answer {
        Answer {
            message_id,
            text: text.into(),
            repeat_key: None,
        }
    }
}

struct Held {
    conversation_id: String,
    from_session: String,
    to_session: String,
    attempts: u32,
}

/// The claim row of `message_id` if `owner` holds it, with its message's routing.
fn held(conn: &Connection, message_id: i64, owner: &str) -> rusqlite::Result<Option<Held>> {
    conn.prepare_cached(
        "SELECT m.conversation_id, m.from_session, m.to_session, c.attempts
         FROM autopoll_claims c JOIN messages m ON m.id = c.message_id
         WHERE c.message_id = ?1 AND c.owner = ?2",
    )?
    .query_row(params![message_id, owner], |r| {
        Ok(Held {
            conversation_id: r.get(0)?,
            from_session: r.get(1)?,
            to_session: r.get(2)?,
            attempts: r.get(3)?,
        })
    })
    .optional()
}

/// Mark read, drop the claim, record the outcome.
#[allow(clippy::too_many_arguments)]
fn finish(
    conn: &Connection,
    message_id: i64,
    h: &Held,
    outcome: &str,
    response_id: Option<i64>,
    owner: &str,
    detail: Option<&str>,
) -> rusqlite::Result<()> {
    message::mark_read(conn, [message_id])?;
    conn.prepare_cached("DELETE FROM autopoll_claims WHERE message_id = ?1")?
        .execute([message_id])?;
    conn.prepare_cached(
        "INSERT INTO autopoll_outcomes
         (message_id, conversation_id, to_session, outcome, response_id, attempts, owner, detail, completed_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(params![
        message_id,
        h.conversation_id,
        h.to_session,
        outcome,
        response_id,
        h.attempts,
        owner,
        detail,
        clock::now_string()
    ])?;
    Ok(())
}

/// Send the answer back to the asker.
fn reply(conn: &Connection, h: &Held, text: &str) -> rusqlite::Result<i64> {
    let sent = message::insert(
        conn,
        &h.conversation_id,
        &h.to_session,
        &h.from_session,
        text,
        &shard::response_metadata(),
    )?;
    Ok(sent.id)
}

fn dead_letter_held(
    conn: &Connection,
    claimer: &Claimer,
    msg: &Message,
    h: &Held,
    error: &str,
    last_error: Option<&str>,
) -> rusqlite::Result<DeadLettered> {
    let (query_id, raw) = shard::reply_id_of(msg);
    let text = Response::failure(&query_id, &claimer.shard_id, error, h.attempts)
        .to_text_raw_id(raw.as_deref());
    let response_id = reply(conn, h, &text)?;
    finish(
        conn,
        msg.id,
        h,
        "dead_letter",
        Some(response_id),
        &claimer.owner,
        Some(error),
    )?;
    audit::write(
        conn,
        Some(&h.conversation_id),
        Some(&h.to_session),
        audit::actions::DEAD_LETTER,
        &json!({ "message_id": msg.id, "query_id": query_id, "attempts": h.attempts, "error": error }),
    )?;
    // Callers log the event with its reason (the poller: `event=dead_lettered`).
    log::debug!(
        "dead-lettered conversation={} message_id={} query_id={query_id} attempts={}",
        h.conversation_id,
        msg.id,
        h.attempts
    );
    Ok(DeadLettered {
        message_id: msg.id,
        query_id,
        attempts: h.attempts,
        response_id,
        last_error: last_error.map(str::to_string),
    })
}

/// The look of [`claimable_on`] for `n` conversations (`?1` session, `?2`
/// now in ms, `?3`.. the conversation ids). One EXISTS per conversation,
/// each stopping at its first claimable row on the unread index: the cost
/// is the conversations asked about plus the live claims at the head of
/// each queue, not the backlog (a DISTINCT over every unread row cost
/// milliseconds per look with 20,000 queued, and it ran on every commit).
fn claimable_sql(n: usize) -> String {
    let marks = (0..n)
        .map(|i| format!("(?{})", i + 3))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "WITH wanted(cid) AS (VALUES {marks})
         SELECT cid FROM wanted WHERE EXISTS (
           SELECT 1 FROM messages m LEFT JOIN autopoll_claims c ON c.message_id = m.id
           WHERE m.conversation_id = wanted.cid AND m.to_session = ?1 AND m.read = 0
             AND (c.owner IS NULL OR c.lease_until_ms <= ?2))"
    )
}

/// [`claimable_sql`] for one conversation (`?1` session, `?2` now in ms,
/// `?3` the conversation id).
const CLAIMABLE_ONE_SQL: &str = "SELECT EXISTS (
       SELECT 1 FROM messages m LEFT JOIN autopoll_claims c ON c.message_id = m.id
       WHERE m.conversation_id = ?3 AND m.to_session = ?1 AND m.read = 0
         AND (c.owner IS NULL OR c.lease_until_ms <= ?2))";

/// The rows a claim takes (`?1` conversation, `?2` session, `?3` now in
/// ms, `?4` limit), in arrival order. The order is the
/// `autopoll_messages_unread_fifo` index's own, so SQLite reads the rows it
/// returns (and the live claims before them), never sorting the backlog.
fn claim_sql() -> String {
    format!(
        "SELECT {cols}, COALESCE(c.attempts, 0), c.last_error
             FROM messages m LEFT JOIN autopoll_claims c ON c.message_id = m.id
             WHERE m.conversation_id = ?1 AND m.to_session = ?2 AND m.read = 0
               AND (c.owner IS NULL OR c.lease_until_ms <= ?3)
             ORDER BY m.id ASC
             LIMIT ?4",
        cols = MESSAGE_COLUMNS
            .split(", ")
            .map(|c| format!("m.{c}"))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// [`Bridge::claimable`] on any connection to a bridge file (a read-only
/// one will do: the poller's watch thread looks with its own).
pub fn claimable_on(
    conn: &Connection,
    conversations: &[&str],
    session: Session,
) -> rusqlite::Result<Vec<String>> {
    if conversations.is_empty() {
        return Ok(Vec::new());
    }
    let now_ms = clock::unix_ms();
    if let [one] = conversations {
        // One conversation (a poller per conversation, on every commit by
        // anyone): a plain EXISTS, without the VALUES table of the general
        // look (a third of its cost).
        let found: bool = conn
            .prepare_cached(CLAIMABLE_ONE_SQL)?
            .query_row(params![session.as_str(), now_ms, one], |r| r.get(0))?;
        return Ok(if found {
            vec![one.to_string()]
        } else {
            Vec::new()
        });
    }
    let mut stmt = conn.prepare_cached(&claimable_sql(conversations.len()))?;
    let session = session.as_str();
    let mut params: Vec<&dyn rusqlite::ToSql> = vec![&session, &now_ms];
    params.extend(conversations.iter().map(|c| c as &dyn rusqlite::ToSql));
    let found: std::collections::HashSet<String> = stmt
        .query_map(params.as_slice(), |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(conversations
        .iter()
        .filter(|c| found.contains(**c))
        .map(|c| c.to_string())
        .collect())
}

/// What [`new_claimable_on`] found among the messages added since a look.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewWork {
    /// The highest message id seen: the next look starts after it.
    pub last_id: i64,
    /// The conversations and sessions with a new message to claim.
    pub claimable: Vec<(String, Session)>,
}

/// The rows [`new_claimable_on`] reads at most; past them it says "cannot
/// tell" and the caller looks at every conversation instead.
pub const NEW_WORK_ROWS: usize = 256;

/// The highest message id on `conn` now (0 for none): where a run of
/// [`new_claimable_on`] starts, read before a full [`claimable_on`].
pub fn last_message_id(conn: &Connection) -> rusqlite::Result<i64> {
    conn.prepare_cached("SELECT COALESCE(MAX(id), 0) FROM messages")?
        .query_row([], |r| r.get(0))
}

/// The messages added after id `after` that are claimable now, by
/// conversation and session: a look that costs the rows committed since,
/// not the conversations watched (a hub leader runs one per commit, where
/// [`claimable_on`] over 64 conversations was half its CPU). Message ids
/// only grow (`AUTOINCREMENT`, and SQLite's writers are serialized), so a
/// row never appears behind `after`. It sees only new rows: a claim
/// released or a lease run out makes old rows claimable again, which only
/// [`claimable_on`] sees. None when more than [`NEW_WORK_ROWS`] came.
pub fn new_claimable_on(conn: &Connection, after: i64) -> rusqlite::Result<Option<NewWork>> {
    let now_ms = clock::unix_ms();
    let mut stmt = conn.prepare_cached(
        "SELECT m.id, m.conversation_id, m.to_session,
                m.read = 0 AND (c.owner IS NULL OR c.lease_until_ms <= ?2)
           FROM messages m LEFT JOIN autopoll_claims c ON c.message_id = m.id
          WHERE m.id > ?1 ORDER BY m.id LIMIT ?3",
    )?;
    let mut work = NewWork {
        last_id: after,
        claimable: Vec::new(),
    };
    let mut rows = stmt.query(params![after, now_ms, NEW_WORK_ROWS as i64 + 1])?;
    let mut n = 0;
    while let Some(r) = rows.next()? {
        n += 1;
        if n > NEW_WORK_ROWS {
            return Ok(None);
        }
        work.last_id = work.last_id.max(r.get(0)?);
        if !r.get::<_, bool>(3)? {
            continue;
        }
        let Ok(session) = r
            .get_ref(2)?
            .as_str()
            .unwrap_or_default()
            .parse::<Session>()
        else {
            continue;
        };
        let conversation: String = r.get(1)?;
        if !work
            .claimable
            .iter()
            .any(|(c, s)| *s == session && *c == conversation)
        {
            work.claimable.push((conversation, session));
        }
    }
    Ok(Some(work))
}

/// The body of a claim, inside the caller's write transaction.
fn claim_on(
    tx: &Connection,
    map: &dyn Fn(rusqlite::Error) -> Error,
    claimer: &Claimer,
    conversation: &str,
    session: Session,
    opts: &ClaimOptions,
    now_ms: i64,
) -> Result<ClaimBatch> {
    let rows: Vec<(Message, u32, Option<String>)> = {
        let mut stmt = tx.prepare_cached(&claim_sql()).map_err(&map)?;
        stmt.query_map(
            params![conversation, session.as_str(), now_ms, opts.limit as i64],
            |r| Ok((message::from_row(r)?, r.get(8)?, r.get(9)?)),
        )
        .map_err(&map)?
        .collect::<rusqlite::Result<_>>()
        .map_err(&map)?
    };
    let lease_ms = i64::try_from(opts.lease.as_millis()).unwrap_or(i64::MAX);
    let lease_until_ms = now_ms.saturating_add(lease_ms);
    let now = clock::now_string();
    let mut batch = ClaimBatch::default();
    for (msg, attempts, last_error) in rows {
        if let Some(why) = &msg.unreadable {
            // Nothing can answer it and retrying cannot help: finish it
            // now, alone, so the rest of the batch goes on.
            let h = Held {
                conversation_id: msg.conversation_id.clone(),
                from_session: msg.from_session.clone(),
                to_session: msg.to_session.clone(),
                attempts: attempts + 1,
            };
            let error = format!(
                "message {} cannot be read: {why}; autopoll marked it read without answering it",
                msg.id
            );
            let d = dead_letter_held(tx, claimer, &msg, &h, &error, Some(&error)).map_err(&map)?;
            batch.dead_lettered.push(d);
            continue;
        }
        if attempts >= opts.max_attempts {
            let h = Held {
                conversation_id: msg.conversation_id.clone(),
                from_session: msg.from_session.clone(),
                to_session: msg.to_session.clone(),
                attempts,
            };
            let error = format!(
                "dead-lettered after {attempts} attempts{}",
                last_error
                    .as_deref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            );
            let d = dead_letter_held(tx, claimer, &msg, &h, &error, last_error.as_deref())
                .map_err(&map)?;
            batch.dead_lettered.push(d);
            continue;
        }
        tx.prepare_cached(
            "INSERT INTO autopoll_claims
                 (message_id, conversation_id, to_session, owner, lease_until_ms, attempts,
                  first_claimed_at, last_claimed_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, 1, ?6, ?6)
                 ON CONFLICT(message_id) DO UPDATE SET
                   owner = excluded.owner,
                   lease_until_ms = excluded.lease_until_ms,
                   attempts = autopoll_claims.attempts + 1,
                   last_claimed_at = excluded.last_claimed_at",
        )
        .and_then(|mut s| {
            s.execute(params![
                msg.id,
                msg.conversation_id,
                msg.to_session,
                claimer.owner,
                lease_until_ms,
                now
            ])
        })
        .map_err(&map)?;
        batch.claimed.push(Claimed {
            message: msg,
            attempts: attempts + 1,
            lease_until_ms,
        });
    }
    if !batch.claimed.is_empty() {
        let ids: Vec<i64> = batch.claimed.iter().map(|c| c.message.id).collect();
        audit::write(
            tx,
            Some(conversation),
            Some(session.as_str()),
            audit::actions::CLAIM,
            &json!({ "owner": claimer.owner, "message_ids": ids }),
        )
        .map_err(&map)?;
    }
    Ok(batch)
}

/// The details of one `autopoll_complete` audit row: the group's answers
/// of one conversation and session, in the group's order.
#[derive(Default)]
struct CompleteAudit {
    message_ids: Vec<i64>,
    response_ids: Vec<i64>,
    attempts: Vec<u32>,
}

static INSERT_OUTCOMES: MultiRow = MultiRow::new(
    "INSERT INTO autopoll_outcomes
     (message_id, conversation_id, to_session, outcome, response_id, attempts, owner, detail, completed_at)",
    "(?, ?, ?, 'answered', ?, ?, ?, NULL, ?)",
    "",
);

static INSERT_ANSWERS: MultiRow = MultiRow::new(
    "INSERT INTO autopoll_answers
     (conversation_id, to_session, query_id, message_id, response_id, answered_at)",
    "(?, ?, ?, ?, ?, ?)",
    // The first answer stays the one repeats get (also within one group).
    "ON CONFLICT DO NOTHING",
);

/// The body of [`Bridge::complete`], inside the caller's write transaction,
/// as a few statements for the whole group: one look at which claims are
/// still ours, the responses and their `send_message` audit rows
/// ([`message::insert_many`]), one update marking the questions read, one
/// delete of the claims, the outcome rows, one `autopoll_complete` audit
/// row per conversation and session, and the stored answers of repeat keys.
/// Multi-row inserts go a chunk at a time ([`crate::rows`]).
fn complete_on(
    conn: &Connection,
    claimer: &Claimer,
    answers: &[Answer],
) -> rusqlite::Result<Vec<Option<i64>>> {
    let mut out = vec![None; answers.len()];
    if answers.is_empty() {
        return Ok(out);
    }
    let asked = serde_json::to_string(&answers.iter().map(|a| a.message_id).collect::<Vec<_>>())
        .expect("a list of integers serializes");
    let mut held: HashMap<i64, Held> = conn
        .prepare_cached(
            "SELECT c.message_id, m.conversation_id, m.from_session, m.to_session, c.attempts
             FROM autopoll_claims c JOIN messages m ON m.id = c.message_id
             WHERE c.message_id IN (SELECT value FROM json_each(?2)) AND c.owner = ?1",
        )?
        .query_map(params![claimer.owner, asked], |r| {
            Ok((
                r.get(0)?,
                Held {
                    conversation_id: r.get(1)?,
                    from_session: r.get(2)?,
                    to_session: r.get(3)?,
                    attempts: r.get(4)?,
                },
            ))
        })?
        .collect::<rusqlite::Result<_>>()?;
    // In input order; an id given twice is answered by its first answer
    // only (the claim is gone by the second, as one by one).
    let mut owned: Vec<(usize, &Answer, Held)> = Vec::with_capacity(held.len());
    for (i, a) in answers.iter().enumerate() {
        match held.remove(&a.message_id) {
            Some(h) => owned.push((i, a, h)),
            None => log::warn!(
                "event=stale_complete message_id={} owner={}: claim lost (lease expired and taken over, or finished)",
                a.message_id,
                claimer.owner
            ),
        }
    }
    if owned.is_empty() {
        return Ok(out);
    }
    let msgs: Vec<message::Outgoing<'_>> = owned
        .iter()
        .map(|(_, a, h)| message::Outgoing {
            conversation: &h.conversation_id,
            from: &h.to_session,
            to: &h.from_session,
            text: &a.text,
        })
        .collect();
    let response_ids = message::insert_many(conn, &msgs, &shard::response_metadata())?;
    let ids = serde_json::to_string(
        &owned
            .iter()
            .map(|(_, a, _)| a.message_id)
            .collect::<Vec<_>>(),
    )
    .expect("a list of integers serializes");
    conn.prepare_cached(
        "UPDATE messages SET read = 1 WHERE id IN (SELECT value FROM json_each(?1))",
    )?
    .execute([&ids])?;
    conn.prepare_cached(
        "DELETE FROM autopoll_claims WHERE message_id IN (SELECT value FROM json_each(?1))",
    )?
    .execute([&ids])?;
    let now = clock::now_string();
    let rows: Vec<Vec<&dyn ToSql>> = owned
        .iter()
        .zip(&response_ids)
        .map(|((_, a, h), rid)| {
            vec![
                &a.message_id as &dyn ToSql,
                &h.conversation_id,
                &h.to_session,
                rid,
                &h.attempts,
                &claimer.owner,
                &now,
            ]
        })
        .collect();
    INSERT_OUTCOMES.execute(conn, &rows)?;
    // One audit row per conversation and session of the group, in the
    // order they first appear.
    let mut audits: Vec<(&Held, CompleteAudit)> = Vec::new();
    for ((_, a, h), &rid) in owned.iter().zip(&response_ids) {
        let k = match audits.iter().position(|(first, _)| {
            first.conversation_id == h.conversation_id && first.to_session == h.to_session
        }) {
            Some(k) => k,
            None => {
                audits.push((h, CompleteAudit::default()));
                audits.len() - 1
            }
        };
        let d = &mut audits[k].1;
        d.message_ids.push(a.message_id);
        d.response_ids.push(rid);
        d.attempts.push(h.attempts);
    }
    for (h, d) in audits {
        audit::write(
            conn,
            Some(&h.conversation_id),
            Some(&h.to_session),
            audit::actions::COMPLETE,
            &json!({ "message_ids": d.message_ids, "response_ids": d.response_ids, "attempts": d.attempts }),
        )?;
    }
    let rows: Vec<Vec<&dyn ToSql>> = owned
        .iter()
        .zip(&response_ids)
        .filter_map(|((_, a, h), rid)| {
            let key = a.repeat_key.as_ref()?;
            Some(vec![
                &h.conversation_id as &dyn ToSql,
                &h.to_session,
                key,
                &a.message_id,
                rid,
                &now,
            ])
        })
        .collect();
    INSERT_ANSWERS.execute(conn, &rows)?;
    for ((i, ..), rid) in owned.iter().zip(response_ids) {
        out[*i] = Some(rid);
    }
    Ok(out)
}

impl Bridge {
    /// Claim up to `opts.limit` unread messages to `session` of `conversation`
    /// that nobody holds (never claimed, released, or lease expired), oldest
    /// first. Those already attempted `max_attempts` times are dead-lettered
    /// instead. The caller is expected to have checked its token with
    /// [`Bridge::verify`].
    pub fn claim(
        &mut self,
        claimer: &Claimer,
        conversation: &str,
        session: Session,
        opts: &ClaimOptions,
    ) -> Result<ClaimBatch> {
        opts.check()?;
        let (tx, map) = self.immediate()?;
        let batch = claim_on(
            &tx,
            &map,
            claimer,
            conversation,
            session,
            opts,
            clock::unix_ms(),
        )?;
        tx.commit().map_err(&map)?;
        Ok(batch)
    }

    /// [`Bridge::claim`] for several conversations in one transaction: up to
    /// `limit` messages of each `(conversation, limit)`, in the order given.
    /// The results come back in the same order. `opts.limit` is ignored.
    pub fn claim_many(
        &mut self,
        claimer: &Claimer,
        wanted: &[(&str, usize)],
        session: Session,
        opts: &ClaimOptions,
    ) -> Result<Vec<ClaimBatch>> {
        opts.check()?;
        let (tx, map) = self.immediate()?;
        let now_ms = clock::unix_ms();
        let mut out = Vec::with_capacity(wanted.len());
        for (conversation, limit) in wanted {
            let o = ClaimOptions {
                limit: *limit,
                ..*opts
            };
            out.push(claim_on(
                &tx,
                &map,
                claimer,
                conversation,
                session,
                &o,
                now_ms,
            )?);
        }
        tx.commit().map_err(&map)?;
        Ok(out)
    }

    /// Which of `conversations` have a message to `session` that a claim
    /// would take now (unread, and unclaimed or with an expired lease), with
    /// a read-only query: no write lock, so a poller can look without
    /// getting in the way of writers. The order of `conversations` is kept.
    pub fn claimable(&self, conversations: &[&str], session: Session) -> Result<Vec<String>> {
        claimable_on(&self.conn, conversations, session).map_err(self.map())
    }

    /// Push the leases of our claims on `ids` to now + `lease`. Returns how
    /// many we still held.
    pub fn extend(&mut self, claimer: &Claimer, ids: &[i64], lease: Duration) -> Result<usize> {
        let until =
            clock::unix_ms().saturating_add(i64::try_from(lease.as_millis()).unwrap_or(i64::MAX));
        let (tx, map) = self.immediate()?;
        let mut n = 0;
        for id in ids {
            n += tx
                .prepare_cached(
                    "UPDATE autopoll_claims SET lease_until_ms = ?1 WHERE message_id = ?2 AND owner = ?3",
                )
                .and_then(|mut s| s.execute(params![until, id, claimer.owner]))
                .map_err(&map)?;
        }
        tx.commit().map_err(&map)?;
        Ok(n)
    }

    /// Give claims back unanswered, keeping their attempt counts (or, with
    /// `refund_attempt`, taking this attempt back: for failures that were not
    /// the question's fault, such as a missing server). `error` is kept as the
    /// last failure, shown in a later dead letter. Returns how many we held.
    pub fn release(
        &mut self,
        claimer: &Claimer,
        ids: &[i64],
        error: Option<&str>,
        refund_attempt: bool,
    ) -> Result<usize> {
        let (tx, map) = self.immediate()?;
        let mut n = 0;
        for id in ids {
            n += tx
                .prepare_cached(
                    "UPDATE autopoll_claims SET owner = NULL, lease_until_ms = NULL,
                       last_error = COALESCE(?1, last_error),
                       attempts = MAX(attempts - ?2, 0)
                     WHERE message_id = ?3 AND owner = ?4",
                )
                .and_then(|mut s| {
                    s.execute(params![error, i64::from(refund_attempt), id, claimer.owner])
                })
                .map_err(&map)?;
        }
        if n > 0 {
            audit::write(
                &tx,
                None,
                None,
                audit::actions::RELEASE,
                &json!({ "owner": claimer.owner, "count": n, "error": error, "refund_attempt": refund_attempt }),
            )
            .map_err(&map)?;
        }
        tx.commit().map_err(&map)?;
        Ok(n)
    }

    /// Release every claim `claimer` holds (on shutdown). Returns how many.
    pub fn release_all(&mut self, claimer: &Claimer, error: Option<&str>) -> Result<usize> {
        let ids = self.held_by(claimer)?;
        self.release(claimer, &ids, error, false)
    }

    /// Message ids `claimer` holds a claim on (live or expired, not taken over).
    pub fn held_by(&self, claimer: &Claimer) -> Result<Vec<i64>> {
        let map = self.map();
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT message_id FROM autopoll_claims WHERE owner = ?1 ORDER BY message_id",
            )
            .map_err(&map)?;
        stmt.query_map([&claimer.owner], |r| r.get(0))
            .map_err(&map)?
            .collect::<rusqlite::Result<_>>()
            .map_err(&map)
    }

    /// Answer claimed messages, all in one transaction. For each answer, only
    /// if we still own its claim: insert the response (to the asker, metadata
    /// `{"action_type":"response"}`, redacted), mark the question read, drop
    /// the claim, record the outcome. Returns, per answer, the response's row
    /// id, or `None` when the claim was no longer ours (nothing written).
    ///
    /// Set-based: a handful of statements for the whole group (see
    /// `complete_on`), not a handful per answer.
    pub fn complete(&mut self, claimer: &Claimer, answers: &[Answer]) -> Result<Vec<Option<i64>>> {
        let (tx, map) = self.immediate()?;
        let out = complete_on(&tx, claimer, answers).map_err(&map)?;
        tx.commit().map_err(&map)?;
        Ok(out)
    }

    /// Mark claimed messages read without answering (they are not questions).
    /// Returns how many we still held.
    pub fn skip(&mut self, claimer: &Claimer, ids: &[i64], reason: &str) -> Result<usize> {
        let (tx, map) = self.immediate()?;
        let mut n = 0;
        for &id in ids {
            let Some(h) = held(&tx, id, &claimer.owner).map_err(&map)? else {
                continue;
            };
            finish(&tx, id, &h, "skipped", None, &claimer.owner, Some(reason)).map_err(&map)?;
            audit::write(
                &tx,
                Some(&h.conversation_id),
                Some(&h.to_session),
                audit::actions::SKIP,
                &json!({ "message_id": id, "reason": reason }),
            )
            .map_err(&map)?;
            n += 1;
        }
        tx.commit().map_err(&map)?;
        Ok(n)
    }

    /// Dead-letter a message we hold now (a failure that retrying cannot fix):
    /// answer it with an error response and mark it read. `None` when the
    /// claim was no longer ours.
    pub fn dead_letter(
        &mut self,
        claimer: &Claimer,
        message_id: i64,
        error: &str,
    ) -> Result<Option<DeadLettered>> {
        let (tx, map) = self.immediate()?;
        let Some(h) = held(&tx, message_id, &claimer.owner).map_err(&map)? else {
            return Ok(None);
        };
        let msg = tx
            .prepare_cached(&format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = ?1"
            ))
            .and_then(|mut s| s.query_row([message_id], message::from_row))
            .map_err(&map)?;
        let d = dead_letter_held(&tx, claimer, &msg, &h, error, Some(error)).map_err(&map)?;
        tx.commit().map_err(&map)?;
        Ok(Some(d))
    }

    /// The answer given earlier to query id `repeat_key` (a
    /// [`shard::Query::repeat_key`]) asked of `session` in `conversation`:
    /// `(question's message id, response text)`. One indexed lookup and one
    /// read by row id. `None` when it was never answered (or only with an
    /// error, or the response row is gone).
    pub fn earlier_answer(
        &self,
        conversation: &str,
        session: Session,
        repeat_key: &str,
    ) -> Result<Option<(i64, String)>> {
        self.conn
            .prepare_cached(
                "SELECT a.message_id, r.message FROM autopoll_answers a
                 JOIN messages r ON r.id = a.response_id
                 WHERE a.conversation_id = ?1 AND a.to_session = ?2 AND a.query_id = ?3",
            )
            .and_then(|mut s| {
                s.query_row(params![conversation, session.as_str(), repeat_key], |r| {
                    Ok((r.get(0)?, message::text_lossy(r.get_ref(1)?).0))
                })
                .optional()
            })
            .map_err(self.map())
    }

    /// [`Bridge::earlier_answer`] for several repeat keys in one statement
    /// (the keys go in as one JSON array): those found, by key.
    pub fn earlier_answers(
        &self,
        conversation: &str,
        session: Session,
        keys: &[&str],
    ) -> Result<std::collections::HashMap<String, (i64, String)>> {
        if keys.is_empty() {
            return Ok(std::collections::HashMap::new());
        }
        let list = serde_json::to_string(keys).unwrap_or_else(|_| "[]".into());
        self.conn
            .prepare_cached(
                "SELECT a.query_id, a.message_id, r.message FROM autopoll_answers a
                 JOIN messages r ON r.id = a.response_id
                 WHERE a.conversation_id = ?1 AND a.to_session = ?2
                   AND a.query_id IN (SELECT value FROM json_each(?3))",
            )
            .and_then(|mut s| {
                s.query_map(params![conversation, session.as_str(), list], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        (r.get(1)?, message::text_lossy(r.get_ref(2)?).0),
                    ))
                })?
                .collect()
            })
            .map_err(self.map())
    }

    /// The outcome recorded for a message, if it is finished:
    /// `(outcome, response_id, attempts)`.
    pub fn outcome(&self, message_id: i64) -> Result<Option<(String, Option<i64>, u32)>> {
        self.conn
            .query_row(
                "SELECT outcome, response_id, attempts FROM autopoll_outcomes WHERE message_id = ?1",
                [message_id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(self.map())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::testutil::Fixture;

    use serde_json::Value;

    fn response_json(msg: &Message) -> Value {
        serde_json::from_str(&msg.message).unwrap_or(Value::Null)
    }

    fn opts(limit: usize, lease_ms: u64, max_attempts: u32) -> ClaimOptions {
        ClaimOptions {
            limit,
            lease: Duration::from_millis(lease_ms),
            max_attempts,
        }
    }

    fn answer(id: i64, text: &str) -> Answer {
        Answer::new(id, text)
    }

    #[test]
    fn claim_complete_writes_answer_marks_read_and_records_outcome() {
        let mut f = Fixture::new();
        let q = f.send_a(&shard::query_text("q-1", "what?"));
        let me = Claimer::new("shard-1").unwrap();
        let conv = f.id().to_string();
        let b = f
            .bridge
            .claim(&me, &conv, Session::B, &opts(10, 30_000, 3))
            .unwrap();
        assert_eq!(b.claimed.len(), 1);
        assert_eq!(b.claimed[0].attempts, 1);
        // Held: a second claimer sees nothing.
        let other = Claimer::new("shard-2").unwrap();
        assert!(
            f.bridge
                .claim(&other, &conv, Session::B, &opts(10, 30_000, 3))
                .unwrap()
                .claimed
                .is_empty()
        );
        let text = Response {
            answer: "because".into(),
            ..Response::failure("q-1", "shard-1", "", 1)
        }
        .to_text();
        let ids = f.bridge.complete(&me, &[answer(q, &text)]).unwrap();
        let rid = ids[0].expect("answered");
        let resp = f.bridge.message(rid).unwrap();
        assert_eq!(
            (resp.from_session.as_str(), resp.to_session.as_str()),
            ("b", "a")
        );
        assert_eq!(resp.metadata, json!({"action_type": "response"}));
        assert_eq!(response_json(&resp)["query_id"], "q-1");
        assert!(f.bridge.message(q).unwrap().read);
        assert_eq!(
            f.bridge.outcome(q).unwrap(),
            Some(("answered".into(), Some(rid), 1))
        );
        assert!(f.bridge.held_by(&me).unwrap().is_empty());
        // Completing again changes nothing.
        assert_eq!(
            f.bridge.complete(&me, &[answer(q, &text)]).unwrap(),
            vec![None]
        );
    }

    #[test]
    fn stale_owner_complete_changes_nothing() {
        let mut f = Fixture::new();
        let q = f.send_a("plain question");
        let conv = f.id().to_string();
        let stale = Claimer::new("s").unwrap();
        let fresh = Claimer::new("s").unwrap();
        // A zero lease expires at once: the message is claimable again.
        assert_eq!(
            f.bridge
                .claim(&stale, &conv, Session::B, &opts(1, 0, 5))
                .unwrap()
                .claimed
                .len(),
            1
        );
        let b = f
            .bridge
            .claim(&fresh, &conv, Session::B, &opts(1, 60_000, 5))
            .unwrap();
        assert_eq!(b.claimed.len(), 1);
        assert_eq!(b.claimed[0].attempts, 2);
        let before: i64 = f
            .bridge
            .connection()
            .query_row("SELECT count(*) FROM messages", [], |r| r.get(0))
            .unwrap();
        assert_eq!(
            f.bridge.complete(&stale, &[answer(q, "late")]).unwrap(),
            vec![None]
        );
        assert_eq!(
            f.bridge
                .extend(&stale, &[q], Duration::from_secs(60))
                .unwrap(),
            0
        );
        assert_eq!(f.bridge.release(&stale, &[q], None, false).unwrap(), 0);
        assert_eq!(f.bridge.skip(&stale, &[q], "x").unwrap(), 0);
        assert!(f.bridge.dead_letter(&stale, q, "x").unwrap().is_none());
        let after: i64 = f
            .bridge
            .connection()
            .query_row("SELECT count(*) FROM messages", [], |r| r.get(0))
            .unwrap();
        assert_eq!(before, after);
        assert!(!f.bridge.message(q).unwrap().read);
        assert!(f.bridge.complete(&fresh, &[answer(q, "on time")]).unwrap()[0].is_some());
    }

    /// `(action, details)` of the audit rows with `action`, oldest first.
    fn audits(f: &Fixture, action: &str) -> Vec<Value> {
        let conn = f.bridge.connection();
        let mut stmt = conn
            .prepare("SELECT details FROM audit_log WHERE action = ?1 ORDER BY id")
            .unwrap();
        stmt.query_map([action], |r| r.get::<_, String>(0))
            .unwrap()
            .map(|d| serde_json::from_str(&d.unwrap()).unwrap())
            .collect()
    }

    #[test]
    fn a_group_of_owned_stale_and_finished_claims_writes_the_owned_ones_in_input_order() {
        let mut f = Fixture::new();
        let conv = f.id().to_string();
        let qs: Vec<i64> = (0..6)
            .map(|i| f.send_a(&shard::query_text(&format!("q-{i}"), "what?")))
            .collect();
        let me = Claimer::new("s").unwrap();
        let other = Claimer::new("s").unwrap();
        // qs[0..4] ours, qs[4..6] another owner's.
        f.bridge
            .claim(&me, &conv, Session::B, &opts(4, 60_000, 3))
            .unwrap();
        f.bridge
            .claim(&other, &conv, Session::B, &opts(2, 60_000, 3))
            .unwrap();
        // qs[1] already finished (answered by us in an earlier group).
        let first = f.bridge.complete(&me, &[answer(qs[1], "earlier")]).unwrap()[0].unwrap();
        let audits_before = audits(&f, audit::actions::COMPLETE).len();
        // Out of id order, with a stale one, a finished one, an id given
        // twice and an id nobody claimed.
        let batch = [
            answer(qs[3], "three"),
            answer(qs[4], "stale four"),
            answer(qs[1], "finished one"),
            answer(qs[0], "zero"),
            answer(qs[3], "three again"),
            answer(999_999, "nobody's"),
            answer(qs[2], "two"),
        ];
        let ids = f.bridge.complete(&me, &batch).unwrap();
        assert_eq!(ids.len(), batch.len());
        let written: Vec<usize> = (0..ids.len()).filter(|&i| ids[i].is_some()).collect();
        assert_eq!(written, vec![0, 3, 6], "{ids:?}");
        let rids: Vec<i64> = written.iter().map(|&i| ids[i].unwrap()).collect();
        assert!(
            rids.windows(2).all(|w| w[0] < w[1]),
            "responses are inserted in input order: {rids:?}"
        );
        for (&i, &rid) in written.iter().zip(&rids) {
            let r = f.bridge.message(rid).unwrap();
            assert_eq!(r.message, batch[i].text);
            assert_eq!((r.from_session.as_str(), r.to_session.as_str()), ("b", "a"));
            assert_eq!(r.metadata, json!({ "action_type": "response" }));
            assert!(!r.read);
            let q = batch[i].message_id;
            assert!(f.bridge.message(q).unwrap().read);
            assert_eq!(
                f.bridge.outcome(q).unwrap(),
                Some(("answered".into(), Some(rid), 1))
            );
        }
        // Nothing of the others changed: the stale one is still the other
        // owner's, the finished one keeps its first answer.
        assert!(!f.bridge.message(qs[4]).unwrap().read);
        assert_eq!(f.bridge.outcome(qs[4]).unwrap(), None);
        assert_eq!(f.bridge.held_by(&other).unwrap(), vec![qs[4], qs[5]]);
        assert!(f.bridge.held_by(&me).unwrap().is_empty());
        assert_eq!(
            f.bridge.outcome(qs[1]).unwrap(),
            Some(("answered".into(), Some(first), 1))
        );
        let responses: i64 = f
            .bridge
            .connection()
            .query_row(
                "SELECT count(*) FROM messages WHERE to_session = 'a'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(responses, 4, "one earlier, three now");
        // One send_message row per response, as the Python server writes;
        // one autopoll_complete row for the group.
        let sends = audits(&f, audit::actions::SEND_MESSAGE);
        assert_eq!(sends.len(), 4 + qs.len());
        assert_eq!(
            sends[sends.len() - 1],
            json!({ "to": "a", "message_length": 3, "redacted": false })
        );
        let completes = audits(&f, audit::actions::COMPLETE);
        assert_eq!(completes.len(), audits_before + 1);
        assert_eq!(
            completes[audits_before],
            json!({
                "message_ids": [qs[3], qs[0], qs[2]],
                "response_ids": rids,
                "attempts": [1, 1, 1],
            })
        );
        // A group with nothing of ours writes nothing, not even audit.
        let none = f
            .bridge
            .complete(&me, &[answer(qs[5], "x"), answer(qs[3], "y")])
            .unwrap();
        assert_eq!(none, vec![None, None]);
        assert_eq!(
            audits(&f, audit::actions::COMPLETE).len(),
            audits_before + 1
        );
        assert_eq!(f.bridge.complete(&me, &[]).unwrap(), vec![]);
    }

    #[test]
    fn a_group_across_conversations_writes_one_complete_audit_row_per_conversation() {
        let mut f = Fixture::new();
        let one = f.id().to_string();
        let c2 = f
            .bridge
            .create_conversation("x", "y", crate::DEFAULT_TTL)
            .unwrap();
        let two = c2.conversation_id.clone();
        let a1 = f.send_a("q1");
        let b1 = f
            .bridge
            .send(&two, Session::A, &c2.session_a_token, "q2", None)
            .unwrap()
            .id;
        let a2 = f.send_a("q3");
        let me = Claimer::new("s").unwrap();
        f.bridge
            .claim_many(
                &me,
                &[(one.as_str(), 5), (two.as_str(), 5)],
                Session::B,
                &opts(5, 60_000, 3),
            )
            .unwrap();
        let ids = f
            .bridge
            .complete(&me, &[answer(a1, "r1"), answer(b1, "r2"), answer(a2, "r3")])
            .unwrap();
        let rids: Vec<i64> = ids.iter().map(|r| r.unwrap()).collect();
        assert_eq!(f.bridge.message(rids[1]).unwrap().conversation_id, two);
        let rows: Vec<(String, String, String)> = {
            let conn = f.bridge.connection();
            let mut stmt = conn
                .prepare(
                    "SELECT conversation_id, session_id, details FROM audit_log
                     WHERE action = 'autopoll_complete' ORDER BY id",
                )
                .unwrap();
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap()
        };
        let got: Vec<(&str, &str, Value)> = rows
            .iter()
            .map(|(c, s, d)| (c.as_str(), s.as_str(), serde_json::from_str(d).unwrap()))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    one.as_str(),
                    "b",
                    json!({"message_ids": [a1, a2], "response_ids": [rids[0], rids[2]], "attempts": [1, 1]})
                ),
                (
                    two.as_str(),
                    "b",
                    json!({"message_ids": [b1], "response_ids": [rids[1]], "attempts": [1]})
                ),
            ]
        );
    }

    #[test]
    fn a_group_with_two_answers_to_one_repeat_key_keeps_the_first() {
        let mut f = Fixture::new();
        let conv = f.id().to_string();
        let qs: Vec<i64> = (0..4)
            .map(|_| f.send_a(&shard::query_text("q-same", "what?")))
            .collect();
        let me = Claimer::new("s").unwrap();
        f.bridge
            .claim(&me, &conv, Session::B, &opts(4, 60_000, 3))
            .unwrap();
        let keyed = |id: i64, text: &str, key: Option<&str>| Answer {
            message_id: id,
            text: text.into(),
            repeat_key: key.map(str::to_string),
        };
        // An error answer (no key) first, then two with one key, then another key.
        let ids = f
            .bridge
            .complete(
                &me,
                &[
                    keyed(qs[2], "error", None),
                    keyed(qs[1], "first", Some("q-same")),
                    keyed(qs[0], "second", Some("q-same")),
                    keyed(qs[3], "other", Some("q-other")),
                ],
            )
            .unwrap();
        assert!(ids.iter().all(Option::is_some), "{ids:?}");
        assert_eq!(
            f.bridge
                .earlier_answer(&conv, Session::B, "q-same")
                .unwrap(),
            Some((qs[1], "first".to_string()))
        );
        assert_eq!(
            f.bridge
                .earlier_answer(&conv, Session::B, "q-other")
                .unwrap(),
            Some((qs[3], "other".to_string()))
        );
        let stored: i64 = f
            .bridge
            .connection()
            .query_row("SELECT count(*) FROM autopoll_answers", [], |r| r.get(0))
            .unwrap();
        assert_eq!(stored, 2);
    }

    #[test]
    fn a_group_larger_than_any_chunk_is_written_whole_in_input_order() {
        let mut f = Fixture::new();
        let conv = f.id().to_string();
        let n = crate::rows::CHUNKS[0] * 2 + 13;
        let qs: Vec<i64> = (0..n)
            .map(|i| f.send_a(&shard::query_text(&format!("q-{i}"), "what?")))
            .collect();
        let me = Claimer::new("s").unwrap();
        let b = f
            .bridge
            .claim(&me, &conv, Session::B, &opts(n, 60_000, 3))
            .unwrap();
        assert_eq!(b.claimed.len(), n);
        assert!(b.claimed.iter().all(|c| c.attempts == 1));
        assert_eq!(f.bridge.held_by(&me).unwrap(), qs);
        // Reversed, every other one with a repeat key; one secret to redact.
        let batch: Vec<Answer> = qs
            .iter()
            .rev()
            .enumerate()
            .map(|(i, &q)| Answer {
                message_id: q,
                text: if i == 40 {
                    "AKIAIOSFODNN7EXAMPLE".into()
                } else {
                    format!("answer to {q}")
                },
                repeat_key: (i % 2 == 0).then(|| format!("q-{q}")),
            })
            .collect();
        let ids = f.bridge.complete(&me, &batch).unwrap();
        let rids: Vec<i64> = ids.iter().map(|r| r.unwrap()).collect();
        assert!(rids.windows(2).all(|w| w[0] < w[1]), "{rids:?}");
        for (i, (a, rid)) in batch.iter().zip(&rids).enumerate() {
            let text = f.bridge.message(*rid).unwrap().message;
            if i == 40 {
                assert_eq!(text, "AWS_KEY_REDACTED");
            } else {
                assert_eq!(text, a.text);
            }
            assert_eq!(
                f.bridge.outcome(a.message_id).unwrap(),
                Some(("answered".into(), Some(*rid), 1))
            );
            let earlier = f
                .bridge
                .earlier_answer(&conv, Session::B, &format!("q-{}", a.message_id))
                .unwrap();
            assert_eq!(earlier.is_some(), i % 2 == 0, "{i}");
        }
        assert!(f.bridge.held_by(&me).unwrap().is_empty());
        let sends = audits(&f, audit::actions::SEND_MESSAGE);
        assert_eq!(sends[n + 40]["redacted"], json!(true));
        let completes = audits(&f, audit::actions::COMPLETE);
        assert_eq!(completes.len(), 1);
        assert_eq!(completes[0]["response_ids"], json!(rids));
        // The claim batch is one audit row too.
        let claims = audits(&f, audit::actions::CLAIM);
        assert_eq!(claims.len(), 1);
        assert_eq!(claims[0]["message_ids"], json!(qs));
        // Taking over a whole expired batch bumps every attempt count.
        let qs2: Vec<i64> = (0..n)
            .map(|i| f.send_a(&shard::query_text(&format!("r-{i}"), "what?")))
            .collect();
        f.bridge
            .claim(&me, &conv, Session::B, &opts(n, 0, 5))
            .unwrap();
        let other = Claimer::new("s").unwrap();
        let again = f
            .bridge
            .claim(&other, &conv, Session::B, &opts(n, 60_000, 5))
            .unwrap();
        assert_eq!(again.claimed.len(), n);
        assert!(again.claimed.iter().all(|c| c.attempts == 2));
        assert_eq!(f.bridge.held_by(&other).unwrap(), qs2);
        let attempts: Vec<u32> = {
            let conn = f.bridge.connection();
            let mut stmt = conn
                .prepare("SELECT attempts FROM autopoll_claims ORDER BY message_id")
                .unwrap();
            stmt.query_map([], |r| r.get(0))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap()
        };
        assert_eq!(attempts, vec![2; n]);
    }

    #[test]
    fn a_group_commit_with_one_stale_claim_writes_the_others_and_not_the_stale_one() {
        let mut f = Fixture::new();
        let conv = f.id().to_string();
        let qs: Vec<i64> = (0..5)
            .map(|i| f.send_a(&shard::query_text(&format!("q-{i}"), "what?")))
            .collect();
        let me = Claimer::new("s").unwrap();
        let other = Claimer::new("s").unwrap();
        // Ours, on a lease that ends at once; the third is taken over.
        let b = f
            .bridge
            .claim(&me, &conv, Session::B, &opts(5, 0, 5))
            .unwrap();
        assert_eq!(b.claimed.len(), 5);
        assert_eq!(
            f.bridge
                .extend(&me, &[qs[0], qs[1], qs[3], qs[4]], Duration::from_secs(60))
                .unwrap(),
            4
        );
        let taken = f
            .bridge
            .claim(&other, &conv, Session::B, &opts(5, 60_000, 5))
            .unwrap();
        assert_eq!(
            taken
                .claimed
                .iter()
                .map(|c| c.message.id)
                .collect::<Vec<_>>(),
            vec![qs[2]]
        );
        let batch: Vec<Answer> = qs.iter().map(|q| answer(*q, &format!("a{q}"))).collect();
        let ids = f.bridge.complete(&me, &batch).unwrap();
        assert_eq!(ids.len(), 5);
        for (i, (q, rid)) in qs.iter().zip(&ids).enumerate() {
            if i == 2 {
                assert_eq!(*rid, None, "the stale one is not written");
                assert!(!f.bridge.message(*q).unwrap().read);
                assert_eq!(f.bridge.outcome(*q).unwrap(), None);
            } else {
                let rid = rid.expect("the others are written");
                assert_eq!(f.bridge.message(rid).unwrap().message, format!("a{q}"));
                assert!(f.bridge.message(*q).unwrap().read);
                assert_eq!(
                    f.bridge.outcome(*q).unwrap(),
                    Some(("answered".into(), Some(rid), 1))
                );
            }
        }
        let responses: i64 = f
            .bridge
            .connection()
            .query_row(
                "SELECT count(*) FROM messages WHERE from_session = 'b'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(
            responses, 4,
            "one response per answer, none for the stale claim"
        );
        // The new owner still answers its claim.
        assert!(f.bridge.complete(&other, &[answer(qs[2], "mine")]).unwrap()[0].is_some());
    }

    #[test]
    fn claims_and_looks_read_only_what_they_take_not_the_whole_backlog() {
        let mut f = Fixture::new();
        f.send_a("one");
        let c = f.bridge.connection();
        let plan = |sql: &str, n: usize| -> String {
            let mut st = c.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let args: Vec<String> = (0..n).map(|i| i.to_string()).collect();
            let rows = st
                .query_map(rusqlite::params_from_iter(args.iter()), |r| {
                    r.get::<_, String>(3)
                })
                .unwrap();
            rows.map(|r| r.unwrap()).collect::<Vec<_>>().join("; ")
        };
        let claim = plan(&claim_sql(), 4);
        assert!(claim.contains("autopoll_messages_unread_fifo"), "{claim}");
        assert!(
            !claim.contains("TEMP B-TREE"),
            "a claim must not sort the backlog: {claim}"
        );
        let look = plan(&claimable_sql(3), 5);
        assert!(look.contains("autopoll_messages_unread"), "{look}");
        assert!(
            !look.contains("TEMP B-TREE") && !look.contains("SCAN m"),
            "{look}"
        );
        let one = plan(CLAIMABLE_ONE_SQL, 3);
        assert!(one.contains("autopoll_messages_unread"), "{one}");
        assert!(
            !one.contains("TEMP B-TREE") && !one.contains("SCAN m"),
            "{one}"
        );
    }

    #[test]
    fn extend_keeps_a_slow_claim_ours() {
        let mut f = Fixture::new();
        let q = f.send_a("slow one");
        let conv = f.id().to_string();
        let me = Claimer::new("s").unwrap();
        f.bridge
            .claim(&me, &conv, Session::B, &opts(1, 0, 5))
            .unwrap();
        assert_eq!(
            f.bridge.extend(&me, &[q], Duration::from_secs(60)).unwrap(),
            1
        );
        let other = Claimer::new("s").unwrap();
        assert!(
            f.bridge
                .claim(&other, &conv, Session::B, &opts(1, 60_000, 5))
                .unwrap()
                .claimed
                .is_empty()
        );
    }

    #[test]
    fn release_keeps_attempts_and_refund_takes_one_back() {
        let mut f = Fixture::new();
        let q = f.send_a("q");
        let conv = f.id().to_string();
        let me = Claimer::new("s").unwrap();
        let o = opts(1, 60_000, 5);
        f.bridge.claim(&me, &conv, Session::B, &o).unwrap();
        assert_eq!(
            f.bridge
                .release(&me, &[q], Some("engine down"), true)
                .unwrap(),
            1
        );
        assert_eq!(
            f.bridge.claim(&me, &conv, Session::B, &o).unwrap().claimed[0].attempts,
            1
        );
        assert_eq!(f.bridge.release_all(&me, Some("timeout")).unwrap(), 1);
        assert_eq!(
            f.bridge.claim(&me, &conv, Session::B, &o).unwrap().claimed[0].attempts,
            2
        );
    }

    #[test]
    fn dead_letter_after_exactly_max_attempts() {
        let mut f = Fixture::new();
        let q = f.send_a(&shard::query_text("q-poison", "crash me"));
        let conv = f.id().to_string();
        let max = 3;
        for attempt in 1..=max {
            let me = Claimer::new("s").unwrap();
            let b = f
                .bridge
                .claim(&me, &conv, Session::B, &opts(5, 60_000, max))
                .unwrap();
            assert_eq!(b.claimed.len(), 1, "attempt {attempt}");
            assert_eq!(b.claimed[0].attempts, attempt);
            f.bridge
                .release(&me, &[q], Some("worker crashed"), false)
                .unwrap();
        }
        let me = Claimer::new("s").unwrap();
        let b = f
            .bridge
            .claim(&me, &conv, Session::B, &opts(5, 60_000, max))
            .unwrap();
        assert!(b.claimed.is_empty());
        assert_eq!(b.dead_lettered.len(), 1);
        let d = &b.dead_lettered[0];
        assert_eq!(
            (d.message_id, d.query_id.as_str(), d.attempts),
            (q, "q-poison", max)
        );
        let r = response_json(&f.bridge.message(d.response_id).unwrap());
        assert_eq!(r["query_id"], "q-poison");
        assert_eq!(r["error"], "dead-lettered after 3 attempts: worker crashed");
        assert!(f.bridge.message(q).unwrap().read);
        assert_eq!(f.bridge.outcome(q).unwrap().unwrap().0, "dead_letter");
        // Nothing left to claim or dead-letter again.
        let b = f
            .bridge
            .claim(&me, &conv, Session::B, &opts(5, 60_000, max))
            .unwrap();
        assert!(b.claimed.is_empty() && b.dead_lettered.is_empty());
    }

    #[test]
    fn explicit_dead_letter_and_skip() {
        let mut f = Fixture::new();
        let q = f.send_a(&shard::query_text("q-big", "x"));
        let info = f.send_a(r#"{"type":"info","text":"fyi"}"#);
        let conv = f.id().to_string();
        let me = Claimer::new("s").unwrap();
        assert_eq!(
            f.bridge
                .claim(&me, &conv, Session::B, &opts(5, 60_000, 3))
                .unwrap()
                .claimed
                .len(),
            2
        );
        let d = f
            .bridge
            .dead_letter(&me, q, "question too large")
            .unwrap()
            .unwrap();
        assert_eq!(d.attempts, 1);
        assert_eq!(f.bridge.skip(&me, &[info], "type info").unwrap(), 1);
        assert!(f.bridge.message(info).unwrap().read);
        assert_eq!(f.bridge.outcome(info).unwrap().unwrap().0, "skipped");
        // Only the dead letter produced a message to a.
        let ta = f.conv.session_a_token.clone();
        let to_a = f.bridge.read_unread(&conv, Session::A, &ta).unwrap();
        assert_eq!(to_a.len(), 1);
        assert_eq!(response_json(&to_a[0])["error"], "question too large");
    }

    #[test]
    fn claims_are_per_conversation_and_session() {
        let mut f = Fixture::new();
        f.send_a("for b");
        let conv = f.id().to_string();
        let me = Claimer::new("s").unwrap();
        assert!(
            f.bridge
                .claim(&me, &conv, Session::A, &opts(5, 60_000, 3))
                .unwrap()
                .claimed
                .is_empty()
        );
        let c2 = f
            .bridge
            .create_conversation("x", "y", crate::DEFAULT_TTL)
            .unwrap();
        assert!(
            f.bridge
                .claim(&me, &c2.conversation_id, Session::B, &opts(5, 60_000, 3))
                .unwrap()
                .claimed
                .is_empty()
        );
        assert_eq!(
            f.bridge
                .claim(&me, &conv, Session::B, &opts(5, 60_000, 3))
                .unwrap()
                .claimed
                .len(),
            1
        );
    }

    #[test]
    fn claimable_looks_without_the_write_lock_and_claim_many_takes_each_share() {
        let mut f = Fixture::new();
        let conv = f.id().to_string();
        let c2 = f
            .bridge
            .create_conversation("x", "y", crate::DEFAULT_TTL)
            .unwrap();
        let c3 = f
            .bridge
            .create_conversation("x", "y", crate::DEFAULT_TTL)
            .unwrap();
        let two = c2.conversation_id.as_str();
        let three = c3.conversation_id.as_str();
        let me = Claimer::new("s").unwrap();
        let all = [conv.as_str(), two, three];
        assert!(f.bridge.claimable(&all, Session::B).unwrap().is_empty());
        for _ in 0..3 {
            f.send_a("q");
        }
        for _ in 0..2 {
            f.bridge
                .send(two, Session::A, &c2.session_a_token, "q2", None)
                .unwrap();
        }
        // Another writer holds the write lock: the look still answers.
        let other = Connection::open(f.path()).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        assert_eq!(
            f.bridge.claimable(&all, Session::B).unwrap(),
            vec![conv.clone(), two.to_string()]
        );
        assert!(f.bridge.claimable(&all, Session::A).unwrap().is_empty());
        other.execute_batch("ROLLBACK").unwrap();
        let got = f
            .bridge
            .claim_many(
                &me,
                &[(conv.as_str(), 1), (two, 5), (three, 5)],
                Session::B,
                &opts(99, 60_000, 3),
            )
            .unwrap();
        let counts: Vec<usize> = got.iter().map(|b| b.claimed.len()).collect();
        assert_eq!(counts, vec![1, 2, 0]);
        // What is held is no longer claimable; the rest of `conv` still is.
        assert_eq!(
            f.bridge.claimable(&all, Session::B).unwrap(),
            vec![conv.clone()]
        );
        // One conversation at a time (its own statement) says the same.
        let one = |c: &str, s: Session| f.bridge.claimable(&[c], s).unwrap();
        assert_eq!(one(&conv, Session::B), vec![conv.clone()]);
        assert!(one(two, Session::B).is_empty(), "both held");
        assert!(one(three, Session::B).is_empty(), "nothing sent");
        assert!(one(&conv, Session::A).is_empty(), "nothing to session a");
        assert!(one("conv_0000000000000000", Session::B).is_empty());
    }

    #[test]
    fn new_claimable_sees_only_rows_after_the_mark_and_what_is_claimable_of_them() {
        let mut f = Fixture::new();
        let conv = f.id().to_string();
        let c2 = f
            .bridge
            .create_conversation("x", "y", crate::DEFAULT_TTL)
            .unwrap();
        let old = f.send_a("before the mark");
        let mark = last_message_id(f.bridge.connection()).unwrap();
        assert_eq!(mark, old);
        let none = new_claimable_on(f.bridge.connection(), mark)
            .unwrap()
            .unwrap();
        assert_eq!(
            none,
            NewWork {
                last_id: mark,
                claimable: vec![]
            },
            "nothing new: the row before the mark is not reported"
        );
        let q1 = f.send_a("new");
        let q2 = f.send_a("new too");
        let q3 = f
            .bridge
            .send(
                &c2.conversation_id,
                Session::A,
                &c2.session_a_token,
                "q",
                None,
            )
            .unwrap()
            .id;
        // One of the new ones is claimed already: c2's only message.
        let me = Claimer::new("s").unwrap();
        f.bridge
            .claim(&me, &c2.conversation_id, Session::B, &opts(5, 60_000, 3))
            .unwrap();
        let w = new_claimable_on(f.bridge.connection(), mark)
            .unwrap()
            .unwrap();
        assert_eq!(w.last_id, q3.max(q2).max(q1));
        assert_eq!(w.claimable, vec![(conv.clone(), Session::B)]);
        // From the new mark on, nothing: the next look costs nothing.
        let again = new_claimable_on(f.bridge.connection(), w.last_id)
            .unwrap()
            .unwrap();
        assert!(again.claimable.is_empty());
        // More rows than it reads: it cannot tell.
        for i in 0..=NEW_WORK_ROWS {
            f.send_a(&format!("q{i}"));
        }
        assert_eq!(
            new_claimable_on(f.bridge.connection(), w.last_id).unwrap(),
            None
        );
    }

    #[test]
    fn answers_are_redacted() {
        let mut f = Fixture::new();
        let q = f.send_a("q");
        let conv = f.id().to_string();
        let me = Claimer::new("s").unwrap();
        f.bridge
            .claim(&me, &conv, Session::B, &opts(5, 60_000, 3))
            .unwrap();
        let rid = f
            .bridge
            .complete(&me, &[answer(q, "the key is AKIAIOSFODNN7EXAMPLE")])
            .unwrap()[0]
            .unwrap();
        assert_eq!(
            f.bridge.message(rid).unwrap().message,
            "the key is AWS_KEY_REDACTED"
        );
    }

    /// Insert a row as another writer could: `message` and `timestamp` as
    /// given SQL expressions.
    fn insert_raw(f: &Fixture, message_sql: &str, timestamp_sql: &str) -> i64 {
        f.bridge
            .connection()
            .execute(
                &format!(
                    "INSERT INTO messages (conversation_id, from_session, to_session, message, metadata, timestamp)
                     VALUES (?1, 'a', 'b', {message_sql}, '{{}}', {timestamp_sql})"
                ),
                [f.id()],
            )
            .unwrap();
        f.bridge.connection().last_insert_rowid()
    }

    #[test]
    fn an_unreadable_row_is_dead_lettered_alone_and_the_batch_goes_on() {
        let mut f = Fixture::new();
        let good1 = f.send_a(&shard::query_text("q-1", "one?"));
        // Invalid UTF-8 that still reads, lossily, as a query with an id.
        let bad_utf8 = insert_raw(
            &f,
            "CAST(X'7B2274797065223A227175657279222C2271756572795F6964223A22712D626164222C227175657374696F6E223A2278FF227D' AS TEXT)",
            "'2025-01-01T00:00:00'",
        );
        let blob = insert_raw(&f, "X'00FF'", "'2025-01-01T00:00:00'");
        let good2 = f.send_a(&shard::query_text("q-2", "two?"));
        let conv = f.id().to_string();
        let me = Claimer::new("s").unwrap();
        let b = f
            .bridge
            .claim(&me, &conv, Session::B, &opts(10, 60_000, 3))
            .unwrap();
        let claimed: Vec<i64> = b.claimed.iter().map(|c| c.message.id).collect();
        assert_eq!(claimed, vec![good1, good2]);
        let dead: Vec<(i64, &str)> = b
            .dead_lettered
            .iter()
            .map(|d| (d.message_id, d.query_id.as_str()))
            .collect();
        let blob_id = format!("msg-{blob}");
        assert_eq!(dead, vec![(bad_utf8, "q-bad"), (blob, blob_id.as_str())]);
        for d in &b.dead_lettered {
            let r = response_json(&f.bridge.message(d.response_id).unwrap());
            let e = r["error"].as_str().unwrap();
            assert!(e.contains("cannot be read"), "{e}");
            assert_eq!(
                f.bridge.outcome(d.message_id).unwrap().unwrap().0,
                "dead_letter"
            );
            assert!(f.bridge.message(d.message_id).unwrap().read);
        }
        assert!(
            b.dead_lettered[0]
                .last_error
                .as_deref()
                .unwrap()
                .contains("not valid UTF-8")
        );
        assert!(
            b.dead_lettered[1]
                .last_error
                .as_deref()
                .unwrap()
                .contains("BLOB")
        );
        // The rows themselves are left as they were, only marked read.
        let kind: String = f
            .bridge
            .connection()
            .query_row(
                "SELECT typeof(message) FROM messages WHERE id = ?1",
                [blob],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(kind, "blob");
        // Nothing is dead-lettered twice.
        let again = f
            .bridge
            .claim(&me, &conv, Session::B, &opts(10, 60_000, 3))
            .unwrap();
        assert!(again.claimed.is_empty() && again.dead_lettered.is_empty());
    }

    #[test]
    fn a_null_message_on_a_file_without_not_null_is_dead_lettered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loose.db");
        // A hand-made or older file: the same columns, no NOT NULL.
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute_batch(
                "CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, conversation_id TEXT,
                 from_session TEXT, to_session TEXT, message TEXT, metadata TEXT, timestamp TEXT,
                 read INTEGER DEFAULT 0)",
            )
            .unwrap();
        let mut b = Bridge::open_or_create(&path).unwrap();
        let c = b.create_conversation("x", "y", crate::DEFAULT_TTL).unwrap();
        let conv = c.conversation_id.clone();
        b.connection()
            .execute(
                "INSERT INTO messages (conversation_id, from_session, to_session, message, timestamp)
                 VALUES (?1, 'a', 'b', NULL, NULL)",
                [&conv],
            )
            .unwrap();
        let null_id = b.connection().last_insert_rowid();
        let good = b
            .send(
                &conv,
                Session::A,
                &c.session_a_token,
                "plain question",
                None,
            )
            .unwrap()
            .id;
        let me = Claimer::new("s").unwrap();
        let batch = b
            .claim(&me, &conv, Session::B, &opts(10, 60_000, 3))
            .unwrap();
        assert_eq!(batch.claimed.len(), 1);
        assert_eq!(batch.claimed[0].message.id, good);
        assert_eq!(batch.dead_lettered.len(), 1);
        assert_eq!(batch.dead_lettered[0].message_id, null_id);
        assert!(
            batch.dead_lettered[0]
                .last_error
                .as_deref()
                .unwrap()
                .contains("NULL")
        );
        // Stats do not fail on the NULL timestamp either.
        b.stats(Some(&conv)).unwrap();
    }

    /// A writer on local time stamps its rows hours ahead; a later question
    /// with an ordinary stamp must not wait behind it, nor it behind them.
    #[test]
    fn claims_go_in_arrival_order_whatever_the_timestamps() {
        let mut f = Fixture::new();
        let future = insert_raw(&f, "'future'", "'2999-01-01T00:00:00'");
        let garbage = insert_raw(&f, "'garbage stamp'", "'not a time'");
        let zoned = insert_raw(&f, "'zoned'", "'2025-01-01T00:00:00+00:00'");
        let epoch = insert_raw(&f, "'epoch'", "1763681892");
        let normal = f.send_a("normal");
        let conv = f.id().to_string();
        let me = Claimer::new("s").unwrap();
        let b = f
            .bridge
            .claim(&me, &conv, Session::B, &opts(10, 60_000, 3))
            .unwrap();
        let ids: Vec<i64> = b.claimed.iter().map(|c| c.message.id).collect();
        assert_eq!(ids, vec![future, garbage, zoned, epoch, normal]);
        let st = f.bridge.stats(Some(&conv)).unwrap();
        let sb = st.iter().find(|s| s.session == "b").unwrap();
        assert_eq!((sb.unread, sb.unknown_age), (5, 2));
        assert!(sb.oldest_unread_age_secs.is_some());
    }

    #[test]
    fn an_answered_query_id_is_found_again_and_errors_are_not() {
        let mut f = Fixture::new();
        let conv = f.id().to_string();
        let q1 = f.send_a(&shard::query_text("q-r", "what?"));
        let q2 = f.send_a(&shard::query_text("q-e", "what?"));
        let me = Claimer::new("s").unwrap();
        f.bridge
            .claim(&me, &conv, Session::B, &opts(10, 60_000, 3))
            .unwrap();
        let text = r#"{"type":"response","query_id":"q-r","answer":"42"}"#;
        f.bridge
            .complete(
                &me,
                &[Answer {
                    message_id: q1,
                    text: text.into(),
                    repeat_key: Some("q-r".into()),
                }],
            )
            .unwrap();
        f.bridge.dead_letter(&me, q2, "engine down").unwrap();
        assert_eq!(
            f.bridge.earlier_answer(&conv, Session::B, "q-r").unwrap(),
            Some((q1, text.to_string()))
        );
        assert_eq!(
            f.bridge.earlier_answer(&conv, Session::B, "q-e").unwrap(),
            None
        );
        assert_eq!(
            f.bridge.earlier_answer(&conv, Session::A, "q-r").unwrap(),
            None
        );
        // Several keys in one look: the same answers, by key.
        let found = f
            .bridge
            .earlier_answers(&conv, Session::B, &["q-missing", "q-r", "q-e"])
            .unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found["q-r"], (q1, text.to_string()));
        assert!(
            f.bridge
                .earlier_answers(&conv, Session::A, &["q-r"])
                .unwrap()
                .is_empty()
        );
        // The lookup uses the primary key, not a scan.
        let plan: String = f
            .bridge
            .connection()
            .query_row(
                "EXPLAIN QUERY PLAN SELECT response_id FROM autopoll_answers
                 WHERE conversation_id = 'c' AND to_session = 'b' AND query_id = 'q'",
                [],
                |r| r.get(3),
            )
            .unwrap();
        assert!(
            plan.contains("USING INDEX") || plan.contains("PRIMARY KEY"),
            "{plan}"
        );
    }

    /// Two connections on two threads race to claim and answer 2,000
    /// messages: each is claimed by exactly one and answered exactly once.
    #[test]
    fn racing_claimers_claim_each_message_exactly_once() {
        let mut f = Fixture::new();
        let conv = f.id().to_string();
        let ta = f.conv.session_a_token.clone();
        {
            // Send in one go through a second connection for speed.
            let tx = f.bridge.conn.transaction().unwrap();
            for i in 0..2_000 {
                message::insert(
                    &tx,
                    &conv,
                    "a",
                    "b",
                    &shard::query_text(&format!("q-{i}"), "?"),
                    &json!({}),
                )
                .unwrap();
            }
            tx.commit().unwrap();
        }
        let _ = ta;
        let path = f.path();
        let start = std::sync::Arc::new(std::sync::Barrier::new(2));
        let workers: Vec<_> = (0..2)
            .map(|w| {
                let path = path.clone();
                let conv = conv.clone();
                let start = start.clone();
                std::thread::Builder::new()
                    .name(format!("claimer-{w}"))
                    .spawn(move || {
                        let mut b = Bridge::open(&path).unwrap();
                        let me = Claimer::new(&format!("w{w}")).unwrap();
                        let mut mine = Vec::new();
                        start.wait();
                        loop {
                            let batch = b
                                .claim(&me, &conv, Session::B, &opts(7, 60_000, 3))
                                .unwrap();
                            if batch.claimed.is_empty() {
                                break;
                            }
                            // "Answer" outside the transaction, as a poller
                            // does, so the other thread gets the lock.
                            std::thread::sleep(Duration::from_millis(1));
                            let answers: Vec<Answer> = batch
                                .claimed
                                .iter()
                                .map(|c| answer(c.message.id, &format!("w{w}")))
                                .collect();
                            let done = b.complete(&me, &answers).unwrap();
                            assert!(done.iter().all(Option::is_some));
                            mine.extend(batch.claimed.iter().map(|c| c.message.id));
                        }
                        mine
                    })
                    .unwrap()
            })
            .collect();
        let results: Vec<Vec<i64>> = workers.into_iter().map(|h| h.join().unwrap()).collect();
        let all: Vec<i64> = results.iter().flatten().copied().collect();
        let unique: HashSet<i64> = all.iter().copied().collect();
        assert_eq!(all.len(), 2_000, "claimed {} times", all.len());
        assert_eq!(unique.len(), 2_000);
        assert!(
            results.iter().all(|r| !r.is_empty()),
            "both threads should have won some"
        );
        let (responses, outcomes, unread): (i64, i64, i64) = f
            .bridge
            .connection()
            .query_row(
                "SELECT (SELECT count(*) FROM messages WHERE to_session = 'a'),
                        (SELECT count(*) FROM autopoll_outcomes WHERE outcome = 'answered'),
                        (SELECT count(*) FROM messages WHERE to_session = 'b' AND read = 0)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!((responses, outcomes, unread), (2_000, 2_000, 0));
    }
}
