//! [`Store`] for [`PgBridge`]: the SQLite bridge's operations in
//! PostgreSQL's SQL, with the same checks, texts and audit rows.
//!
//! Claims across hosts: a claim is one statement ([`CLAIM_SQL`]) that locks
//! the unread rows it looks at with `FOR UPDATE OF m SKIP LOCKED` (another
//! poller's claim in progress is passed over, not waited on), upserts each
//! claim row guarded by `owner IS NULL OR lease_until_ms <= now`, and keeps
//! only the rows that upsert returned. The guard is what makes it exact
//! under READ COMMITTED: a claim committed by another poller after this
//! statement's snapshot is seen by the upsert (which reads the latest
//! row), so the message is dropped from this batch. Completing (one call
//! of the schema's `autopoll_complete` for a whole group of answers),
//! skipping and dead-lettering start with `DELETE FROM autopoll_claims ...
//! WHERE owner = me RETURNING`, which locks the claim row: a poller whose
//! lease was taken over deletes nothing and writes nothing. Hot statements
//! are prepared once per connection ([`PgBridge::prepared`]).

use std::time::Duration;

use postgres::GenericClient;
use serde_json::{Value, json};

use super::{PgBridge, pg_error};
use crate::audit::actions;
use crate::conversation::check_token;
use crate::error::{Error, Result};
use crate::shard::{self, Response};
use crate::status::status_of;
use crate::store::{Store, StoreKind};
use crate::{
    Answer, BridgeOptions, ClaimBatch, ClaimOptions, Claimed, Claimer, CompactReport,
    ConversationInfo, DeadLettered, FileSize, Message, NewConversation, PruneReport, Pruner, Sent,
    Session, SessionState, SessionStats, SessionStatus, UnseenDeadLetter, redact, token,
};

const MESSAGE_COLUMNS: &str = "m.id, m.conversation_id, m.from_session, m.to_session, m.message, \
     m.metadata::text, autopoll_pyts(m.timestamp), m.read";

fn from_row(r: &postgres::Row) -> Message {
    let metadata = match r.get::<_, Option<String>>(5) {
        None => json!({}),
        Some(s) => serde_json::from_str(&s).unwrap_or(Value::String(s)),
    };
    Message {
        id: r.get(0),
        conversation_id: r.get(1),
        from_session: r.get(2),
        to_session: r.get(3),
        message: r.get(4),
        metadata,
        timestamp: r.get(6),
        read: r.get(7),
        // PostgreSQL's text is always valid UTF-8 and never NULL here.
        unreadable: None,
    }
}

fn audit(
    c: &mut impl GenericClient,
    conversation: Option<&str>,
    session: Option<&str>,
    action: &str,
    details: &Value,
) -> Result<()> {
    c.execute(
        "INSERT INTO audit_log (conversation_id, session_id, action, details)
         VALUES ($1, $2, $3, $4::text::jsonb)",
        &[&conversation, &session, &action, &details.to_string()],
    )
    .map_err(|e| pg_error("cannot write the audit log", e))?;
    Ok(())
}

fn verify_on(
    c: &mut impl GenericClient,
    conversation: &str,
    session: Session,
    presented: &str,
) -> Result<()> {
    let row = c
        .query_opt(
            "SELECT session_a_token, session_b_token, autopoll_pyts(expires_at)
             FROM conversations WHERE id = $1",
            &[&conversation],
        )
        .map_err(|e| pg_error("cannot read the conversation", e))?
        .map(|r| (r.get(0), r.get(1), r.get(2)));
    check_token(conversation, session, presented, row)
}

/// Insert a message (redacted) and its `send_message` audit row.
fn insert(
    c: &mut impl GenericClient,
    conversation: &str,
    from: &str,
    to: &str,
    text: &str,
    metadata: &Value,
) -> Result<Sent> {
    let (text, mut redacted) = redact::redact_message(text);
    let mut metadata = metadata.clone();
    redacted |= redact::redact_json(&mut metadata);
    let row = c
        .query_one(
            "INSERT INTO messages (conversation_id, from_session, to_session, message, metadata)
             VALUES ($1, $2, $3, $4, $5::text::jsonb)
             RETURNING id, autopoll_pyts(timestamp)",
            &[&conversation, &from, &to, &text, &metadata.to_string()],
        )
        .map_err(|e| pg_error("cannot insert the message", e))?;
    audit(
        c,
        Some(conversation),
        Some(from),
        actions::SEND_MESSAGE,
        &json!({ "to": to, "message_length": text.chars().count(), "redacted": redacted }),
    )?;
    Ok(Sent {
        id: row.get(0),
        timestamp: row.get(1),
        redacted,
    })
}

/// A claim row we deleted: the message's routing and its attempts.
struct Held {
    conversation_id: String,
    from_session: String,
    to_session: String,
    attempts: u32,
}

/// End our claim on `message_id` (locking it): `None` when we do not hold it.
fn take_held(c: &mut impl GenericClient, message_id: i64, owner: &str) -> Result<Option<Held>> {
    // The message first, then its claim: a claim's order (no lock cycle).
    c.execute(
        "SELECT 1 FROM messages WHERE id = $1 FOR UPDATE",
        &[&message_id],
    )
    .map_err(|e| pg_error("cannot lock the message", e))?;
    let row = c
        .query_opt(
            "DELETE FROM autopoll_claims c USING messages m
             WHERE c.message_id = $1 AND c.owner = $2 AND m.id = c.message_id
             RETURNING m.conversation_id, m.from_session, m.to_session, c.attempts",
            &[&message_id, &owner],
        )
        .map_err(|e| pg_error("cannot end the claim", e))?;
    Ok(row.map(|r| Held {
        conversation_id: r.get(0),
        from_session: r.get(1),
        to_session: r.get(2),
        attempts: r.get::<_, i32>(3).max(0) as u32,
    }))
}

/// Mark read and record the outcome (the claim row is already gone).
fn finish(
    c: &mut impl GenericClient,
    message_id: i64,
    h: &Held,
    outcome: &str,
    response_id: Option<i64>,
    owner: &str,
    detail: Option<&str>,
) -> Result<()> {
    c.execute(
        "UPDATE messages SET read = true WHERE id = $1",
        &[&message_id],
    )
    .map_err(|e| pg_error("cannot mark the question read", e))?;
    c.execute(
        "INSERT INTO autopoll_outcomes
         (message_id, conversation_id, to_session, outcome, response_id, attempts, owner, detail)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        &[
            &message_id,
            &h.conversation_id,
            &h.to_session,
            &outcome,
            &response_id,
            &(h.attempts as i32),
            &owner,
            &detail,
        ],
    )
    .map_err(|e| pg_error("cannot record the outcome", e))?;
    Ok(())
}

fn reply(c: &mut impl GenericClient, h: &Held, text: &str) -> Result<i64> {
    Ok(insert(
        c,
        &h.conversation_id,
        &h.to_session,
        &h.from_session,
        text,
        &shard::response_metadata(),
    )?
    .id)
}

fn dead_letter_held(
    c: &mut impl GenericClient,
    claimer: &Claimer,
    msg: &Message,
    h: &Held,
    error: &str,
    last_error: Option<&str>,
) -> Result<DeadLettered> {
    let (query_id, raw) = shard::reply_id_of(msg);
    let text = Response::failure(&query_id, claimer.shard_id(), error, h.attempts)
        .to_text_raw_id(raw.as_deref());
    let response_id = reply(c, h, &text)?;
    finish(
        c,
        msg.id,
        h,
        "dead_letter",
        Some(response_id),
        claimer.owner(),
        Some(error),
    )?;
    audit(
        c,
        Some(&h.conversation_id),
        Some(&h.to_session),
        actions::DEAD_LETTER,
        &json!({ "message_id": msg.id, "query_id": query_id, "attempts": h.attempts, "error": error }),
    )?;
    Ok(DeadLettered {
        message_id: msg.id,
        query_id,
        attempts: h.attempts,
        response_id,
        last_error: last_error.map(str::to_string),
    })
}

/// One claim in one statement: lock the candidates (`SKIP LOCKED`),
/// upsert the claims guarded by the lease, audit, and return every
/// candidate with what happened to it. `$1` conversation, `$2` session,
/// `$3` limit, `$4` owner, `$5` lease ms, `$6` max attempts.
const CLAIM_SQL: &str = "WITH cand AS (
    SELECT m.id, COALESCE(c.attempts, 0) AS attempts, c.last_error
    FROM messages m LEFT JOIN autopoll_claims c ON c.message_id = m.id
    WHERE m.conversation_id = $1 AND m.to_session = $2 AND NOT m.read
      AND (c.owner IS NULL OR c.lease_until_ms <= autopoll_now_ms())
    ORDER BY m.id LIMIT $3
    FOR UPDATE OF m SKIP LOCKED),
  up AS (
    INSERT INTO autopoll_claims (message_id, conversation_id, to_session, owner,
        lease_until_ms, attempts, first_claimed_at, last_claimed_at)
    SELECT cand.id, $1, $2, $4, autopoll_now_ms() + $5, 1, clock_timestamp(), clock_timestamp()
    FROM cand WHERE cand.attempts < $6
    ON CONFLICT (message_id) DO UPDATE SET
        owner = excluded.owner, lease_until_ms = excluded.lease_until_ms,
        attempts = autopoll_claims.attempts + 1, last_claimed_at = excluded.last_claimed_at
    WHERE autopoll_claims.owner IS NULL OR autopoll_claims.lease_until_ms <= autopoll_now_ms()
    RETURNING message_id, attempts, lease_until_ms),
  aud AS (
    INSERT INTO audit_log (conversation_id, session_id, action, details)
    SELECT $1, $2, 'autopoll_claim',
           jsonb_build_object('owner', $4::text, 'message_ids', jsonb_agg(message_id ORDER BY message_id))
    FROM up HAVING count(*) > 0)
  SELECT m.id, m.conversation_id, m.from_session, m.to_session, m.message,
         m.metadata::text, autopoll_pyts(m.timestamp), m.read,
         cand.attempts, cand.last_error, up.attempts, up.lease_until_ms
  FROM cand JOIN messages m ON m.id = cand.id LEFT JOIN up ON up.message_id = cand.id
  ORDER BY m.id";

/// One conversation's claim ([`CLAIM_SQL`], prepared as `st`), then the
/// dead letters of what failed too often, in the caller's transaction.
fn claim_one(
    c: &mut impl GenericClient,
    st: &postgres::Statement,
    claimer: &Claimer,
    conversation: &str,
    session: Session,
    limit: usize,
    opts: &ClaimOptions,
) -> Result<ClaimBatch> {
    let lease_ms = i64::try_from(opts.lease.as_millis()).unwrap_or(i64::MAX / 2);
    let rows = c
        .query(
            st,
            &[
                &conversation,
                &session.as_str(),
                &(limit as i64),
                &claimer.owner(),
                &lease_ms,
                &(opts.max_attempts as i32),
            ],
        )
        .map_err(|e| pg_error("cannot claim questions", e))?;
    let mut batch = ClaimBatch::default();
    let mut exhausted = Vec::new();
    for r in rows {
        let msg = from_row(&r);
        let before = r.get::<_, i32>(8).max(0) as u32;
        match (r.get::<_, Option<i32>>(10), r.get::<_, Option<i64>>(11)) {
            (Some(attempts), Some(until)) => batch.claimed.push(Claimed {
                message: msg,
                attempts: attempts.max(0) as u32,
                lease_until_ms: until,
            }),
            _ if before >= opts.max_attempts => {
                exhausted.push((msg, before, r.get::<_, Option<String>>(9)))
            }
            // Another poller's claim committed after our snapshot.
            _ => {}
        }
    }
    for (msg, attempts, last_error) in exhausted {
        if let Some(d) = dead_letter_exhausted(c, claimer, &msg, attempts, last_error)? {
            batch.dead_lettered.push(d);
        }
    }
    Ok(batch)
}

/// Dead-letter a message that failed `attempts` times, if nobody holds it
/// now (a claim of another poller since our look keeps it alive).
fn dead_letter_exhausted(
    c: &mut impl GenericClient,
    claimer: &Claimer,
    msg: &Message,
    attempts: u32,
    last_error: Option<String>,
) -> Result<Option<DeadLettered>> {
    let Some(h) = c
        .query_opt(
            "DELETE FROM autopoll_claims
             WHERE message_id = $1 AND (owner IS NULL OR lease_until_ms <= autopoll_now_ms())
             RETURNING attempts",
            &[&msg.id],
        )
        .map_err(|e| pg_error("cannot take the message to dead-letter it", e))?
    else {
        return Ok(None);
    };
    let held = Held {
        conversation_id: msg.conversation_id.clone(),
        from_session: msg.from_session.clone(),
        to_session: msg.to_session.clone(),
        attempts: h.get::<_, i32>(0).max(0) as u32,
    };
    let error = format!(
        "dead-lettered after {attempts} attempts{}",
        last_error
            .as_deref()
            .map(|e| format!(": {e}"))
            .unwrap_or_default()
    );
    dead_letter_held(c, claimer, msg, &held, &error, last_error.as_deref()).map(Some)
}

fn info_from_row(r: &postgres::Row) -> ConversationInfo {
    let expires_at: String = r.get(4);
    ConversationInfo {
        id: r.get(0),
        session_a_role: r.get(1),
        session_b_role: r.get(2),
        created_at: r.get(3),
        expired: crate::conversation::is_expired(&expires_at).unwrap_or(true),
        expires_at,
    }
}

const INFO_COLUMNS: &str =
    "id, session_a_role, session_b_role, autopoll_pyts(created_at), autopoll_pyts(expires_at)";

impl PgBridge {
    fn tx(&mut self) -> Result<postgres::Transaction<'_>> {
        self.conn()?
            .transaction()
            .map_err(|e| pg_error("cannot begin a transaction", e))
    }

    fn set_read(
        &mut self,
        conversation: &str,
        session: Session,
        token: &str,
        ids: &[i64],
        read: bool,
    ) -> Result<usize> {
        let mut tx = self.tx()?;
        verify_on(&mut tx, conversation, session, token)?;
        let n = tx
            .execute(
                "UPDATE messages SET read = $4
                 WHERE id = ANY($1) AND conversation_id = $2 AND to_session = $3 AND read <> $4",
                &[&ids, &conversation, &session.as_str(), &read],
            )
            .map_err(|e| pg_error("cannot set the read flags", e))? as usize;
        if read {
            audit(
                &mut tx,
                Some(conversation),
                Some(session.as_str()),
                actions::GET_MESSAGES,
                &json!({ "count": n }),
            )?;
        }
        commit(tx)?;
        Ok(n)
    }

    fn put_status(
        &mut self,
        conversation: &str,
        session: Session,
        token: &str,
        state: SessionState,
        audit_change: bool,
    ) -> Result<String> {
        let host = hostname();
        let mut tx = self.tx()?;
        verify_on(&mut tx, conversation, session, token)?;
        let old: Option<String> = tx
            .query_opt(
                "SELECT status FROM session_status WHERE conversation_id = $1 AND session_id = $2
                 FOR UPDATE",
                &[&conversation, &session.as_str()],
            )
            .map_err(|e| pg_error("cannot read the session's status", e))?
            .map(|r| r.get(0));
        let now: String = tx
            .query_one(
                "INSERT INTO session_status (conversation_id, session_id, status, last_heartbeat, host)
                 VALUES ($1, $2, $3, clock_timestamp(), $4)
                 ON CONFLICT (conversation_id, session_id) DO UPDATE SET
                   status = excluded.status, last_heartbeat = excluded.last_heartbeat,
                   host = excluded.host
                 RETURNING autopoll_pyts(last_heartbeat)",
                &[&conversation, &session.as_str(), &state.as_str(), &host],
            )
            .map_err(|e| pg_error("cannot write the session's status", e))?
            .get(0);
        if audit_change && old.as_deref() != Some(state.as_str()) {
            audit(
                &mut tx,
                Some(conversation),
                Some(session.as_str()),
                actions::STATUS_CHANGE,
                &json!({ "from": old, "to": state.as_str(), "host": host }),
            )?;
        }
        commit(tx)?;
        Ok(now)
    }
}

fn commit(tx: postgres::Transaction<'_>) -> Result<()> {
    tx.commit()
        .map_err(|e| pg_error("cannot commit the transaction", e))
}

/// This host's name, as heartbeats record it.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into())
}

impl Store for PgBridge {
    fn kind(&self) -> StoreKind {
        StoreKind::Postgres
    }

    fn location(&self) -> String {
        self.shown.clone()
    }

    fn options(&self) -> &BridgeOptions {
        &self.opts
    }

    fn data_version(&mut self) -> Result<Option<i64>> {
        Ok(None)
    }

    fn as_postgres(&mut self) -> Option<&mut PgBridge> {
        Some(self)
    }

    fn create_conversation(
        &mut self,
        role_a: &str,
        role_b: &str,
        ttl: Duration,
    ) -> Result<NewConversation> {
        crate::conversation::check_roles(role_a, role_b)?;
        let id = token::conversation_id()?;
        let ta = token::session_token()?;
        let tb = token::session_token()?;
        let secs = ttl.as_secs_f64();
        let mut tx = self.tx()?;
        let expires_at: String = tx
            .query_one(
                "INSERT INTO conversations
                 (id, session_a_role, session_b_role, session_a_token, session_b_token, expires_at)
                 VALUES ($1, $2, $3, $4, $5, clock_timestamp() + make_interval(secs => $6))
                 RETURNING autopoll_pyts(expires_at)",
                &[&id, &role_a, &role_b, &ta, &tb, &secs],
            )
            .map_err(|e| pg_error("cannot create the conversation", e))?
            .get(0);
        audit(
            &mut tx,
            Some(&id),
            None,
            actions::CREATE_CONVERSATION,
            &json!({ "roles": [role_a, role_b] }),
        )?;
        commit(tx)?;
        log::info!("event=conversation_created conversation={id} expires_at={expires_at}");
        Ok(NewConversation {
            conversation_id: id,
            session_a_token: ta,
            session_b_token: tb,
            expires_at,
        })
    }

    fn verify(&mut self, conversation: &str, session: Session, token: &str) -> Result<()> {
        verify_on(self.conn()?, conversation, session, token)
    }

    fn renew(&mut self, conversation: &str, presented: &str, ttl: Duration) -> Result<String> {
        let mut tx = self.tx()?;
        let row = tx
            .query_opt(
                "SELECT session_a_token, session_b_token FROM conversations WHERE id = $1 FOR UPDATE",
                &[&conversation],
            )
            .map_err(|e| pg_error("cannot read the conversation", e))?;
        let Some(row) = row else {
            return Err(Error::not_found(format!("conversation {conversation}")));
        };
        let session = crate::conversation::session_of_token(
            conversation,
            presented,
            &row.get::<_, String>(0),
            &row.get::<_, String>(1),
        )?;
        let expires_at: String = tx
            .query_one(
                "UPDATE conversations SET expires_at = clock_timestamp() + make_interval(secs => $2)
                 WHERE id = $1 RETURNING autopoll_pyts(expires_at)",
                &[&conversation, &ttl.as_secs_f64()],
            )
            .map_err(|e| pg_error("cannot renew the conversation", e))?
            .get(0);
        audit(
            &mut tx,
            Some(conversation),
            Some(session.as_str()),
            actions::RENEW,
            &json!({ "expires_at": expires_at }),
        )?;
        commit(tx)?;
        log::info!(
            "event=conversation_renewed conversation={conversation} expires_at={expires_at}"
        );
        Ok(expires_at)
    }

    fn list_conversations(&mut self) -> Result<Vec<ConversationInfo>> {
        Ok(self
            .conn()?
            .query(
                &format!("SELECT {INFO_COLUMNS} FROM conversations ORDER BY created_at DESC, id"),
                &[],
            )
            .map_err(|e| pg_error("cannot list conversations", e))?
            .iter()
            .map(info_from_row)
            .collect())
    }

    fn conversation(&mut self, conversation: &str) -> Result<ConversationInfo> {
        self.conn()?
            .query_opt(
                &format!("SELECT {INFO_COLUMNS} FROM conversations WHERE id = $1"),
                &[&conversation],
            )
            .map_err(|e| pg_error("cannot read the conversation", e))?
            .map(|r| info_from_row(&r))
            .ok_or_else(|| Error::not_found(format!("conversation {conversation}")))
    }

    fn send(
        &mut self,
        conversation: &str,
        from: Session,
        token: &str,
        text: &str,
        metadata: Option<&Value>,
    ) -> Result<Sent> {
        let metadata = &crate::message::checked_send(&self.opts, text, metadata)?;
        let rate = self.opts.rate_limit;
        let mut tx = self.tx()?;
        verify_on(&mut tx, conversation, from, token)?;
        if let Some(limit) = rate {
            for (window, secs, max) in [
                ("minute", 60.0f64, limit.per_minute),
                ("hour", 3_600.0, limit.per_hour),
                ("day", 86_400.0, limit.per_day),
            ] {
                let count: i64 = tx
                    .query_one(
                        "SELECT count(*) FROM messages WHERE conversation_id = $1
                         AND from_session = $2
                         AND timestamp >= clock_timestamp() - make_interval(secs => $3)",
                        &[&conversation, &from.as_str(), &secs],
                    )
                    .map_err(|e| pg_error("cannot count recent sends", e))?
                    .get(0);
                if count >= i64::from(max) {
                    return Err(Error::RateLimited {
                        conversation: conversation.to_string(),
                        session: from.to_string(),
                        window,
                        count: count as u64,
                        limit: max,
                    });
                }
            }
        }
        let sent = insert(
            &mut tx,
            conversation,
            from.as_str(),
            from.other().as_str(),
            text,
            metadata,
        )?;
        commit(tx)?;
        Ok(sent)
    }

    fn read_unread(
        &mut self,
        conversation: &str,
        session: Session,
        token: &str,
    ) -> Result<Vec<Message>> {
        let mut tx = self.tx()?;
        verify_on(&mut tx, conversation, session, token)?;
        let msgs: Vec<Message> = tx
            .query(
                &format!(
                    "UPDATE messages m SET read = true
                     WHERE m.conversation_id = $1 AND m.to_session = $2 AND NOT m.read
                     RETURNING {MESSAGE_COLUMNS}"
                ),
                &[&conversation, &session.as_str()],
            )
            .map_err(|e| pg_error("cannot read the unread messages", e))?
            .iter()
            .map(from_row)
            .collect();
        let mut msgs = msgs;
        msgs.sort_by(|a, b| (&a.timestamp, a.id).cmp(&(&b.timestamp, b.id)));
        audit(
            &mut tx,
            Some(conversation),
            Some(session.as_str()),
            actions::GET_MESSAGES,
            &json!({ "count": msgs.len() }),
        )?;
        commit(tx)?;
        Ok(msgs)
    }

    fn peek_unread(
        &mut self,
        conversation: &str,
        session: Session,
        after_id: i64,
        limit: usize,
    ) -> Result<Vec<Message>> {
        Ok(self
            .conn()?
            .query(
                &format!(
                    "SELECT {MESSAGE_COLUMNS} FROM messages m
                     WHERE m.conversation_id = $1 AND m.to_session = $2 AND NOT m.read AND m.id > $3
                     ORDER BY m.id LIMIT $4"
                ),
                &[&conversation, &session.as_str(), &after_id, &(limit as i64)],
            )
            .map_err(|e| pg_error("cannot look at unread messages", e))?
            .iter()
            .map(from_row)
            .collect())
    }

    fn mark_read(
        &mut self,
        conversation: &str,
        session: Session,
        token: &str,
        ids: &[i64],
    ) -> Result<usize> {
        self.set_read(conversation, session, token, ids, true)
    }

    fn unmark_read(
        &mut self,
        conversation: &str,
        session: Session,
        token: &str,
        ids: &[i64],
    ) -> Result<usize> {
        self.set_read(conversation, session, token, ids, false)
    }

    fn message(&mut self, id: i64) -> Result<Message> {
        self.conn()?
            .query_opt(
                &format!("SELECT {MESSAGE_COLUMNS} FROM messages m WHERE m.id = $1"),
                &[&id],
            )
            .map_err(|e| pg_error("cannot read the message", e))?
            .map(|r| from_row(&r))
            .ok_or_else(|| Error::not_found(format!("message {id}")))
    }

    fn claim_many(
        &mut self,
        claimer: &Claimer,
        wanted: &[(&str, usize)],
        session: Session,
        opts: &ClaimOptions,
    ) -> Result<Vec<ClaimBatch>> {
        opts.check()?;
        // All conversations in one transaction, as on SQLite: a failure
        // part way leaves no claim behind that the caller does not know of.
        let st = self.prepared(CLAIM_SQL)?;
        let mut tx = self.tx()?;
        let mut out = Vec::with_capacity(wanted.len());
        for (conversation, limit) in wanted {
            out.push(claim_one(
                &mut tx,
                &st,
                claimer,
                conversation,
                session,
                *limit,
                opts,
            )?);
        }
        commit(tx)?;
        Ok(out)
    }

    fn claimable(&mut self, conversations: &[&str], session: Session) -> Result<Vec<String>> {
        if conversations.is_empty() {
            return Ok(Vec::new());
        }
        let list: Vec<&str> = conversations.to_vec();
        let st = self.prepared(
            "SELECT cid FROM unnest($1::text[]) AS w(cid) WHERE EXISTS (
               SELECT 1 FROM messages m LEFT JOIN autopoll_claims c ON c.message_id = m.id
               WHERE m.conversation_id = w.cid AND m.to_session = $2 AND NOT m.read
                 AND (c.owner IS NULL OR c.lease_until_ms <= autopoll_now_ms()))",
        )?;
        let found: std::collections::HashSet<String> = self
            .client
            .query(&st, &[&list, &session.as_str()])
            .map_err(|e| pg_error("cannot look for work", e))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        Ok(conversations
            .iter()
            .filter(|c| found.contains(**c))
            .map(|c| c.to_string())
            .collect())
    }

    fn extend(&mut self, claimer: &Claimer, ids: &[i64], lease: Duration) -> Result<usize> {
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX / 2);
        Ok(self
            .conn()?
            .execute(
                "UPDATE autopoll_claims SET lease_until_ms = autopoll_now_ms() + $1
                 WHERE message_id = ANY($2) AND owner = $3",
                &[&lease_ms, &ids, &claimer.owner()],
            )
            .map_err(|e| pg_error("cannot extend the leases", e))? as usize)
    }

    fn release(
        &mut self,
        claimer: &Claimer,
        ids: &[i64],
        error: Option<&str>,
        refund_attempt: bool,
    ) -> Result<usize> {
        let mut tx = self.tx()?;
        let n = tx
            .execute(
                "UPDATE autopoll_claims SET owner = NULL, lease_until_ms = NULL,
                   last_error = COALESCE($1, last_error),
                   attempts = GREATEST(attempts - $2, 0)
                 WHERE message_id = ANY($3) AND owner = $4",
                &[&error, &i32::from(refund_attempt), &ids, &claimer.owner()],
            )
            .map_err(|e| pg_error("cannot release the claims", e))? as usize;
        if n > 0 {
            audit(
                &mut tx,
                None,
                None,
                actions::RELEASE,
                &json!({ "owner": claimer.owner(), "count": n, "error": error, "refund_attempt": refund_attempt }),
            )?;
        }
        commit(tx)?;
        Ok(n)
    }

    fn held_by(&mut self, claimer: &Claimer) -> Result<Vec<i64>> {
        Ok(self
            .conn()?
            .query(
                "SELECT message_id FROM autopoll_claims WHERE owner = $1 ORDER BY message_id",
                &[&claimer.owner()],
            )
            .map_err(|e| pg_error("cannot list our claims", e))?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    fn complete(&mut self, claimer: &Claimer, answers: &[Answer]) -> Result<Vec<Option<i64>>> {
        if answers.is_empty() {
            return Ok(Vec::new());
        }
        let mut mids = Vec::with_capacity(answers.len());
        let mut bodies = Vec::with_capacity(answers.len());
        let mut redacted = Vec::with_capacity(answers.len());
        let mut keys: Vec<Option<&str>> = Vec::with_capacity(answers.len());
        for a in answers {
            let (text, r) = redact::redact_message(&a.text);
            mids.push(a.message_id);
            bodies.push(text);
            redacted.push(r);
            keys.push(a.repeat_key.as_deref());
        }
        let meta = shard::response_metadata().to_string();
        let st = self.prepared(
            "SELECT mid, rid FROM autopoll_complete($1, $2, $3, $4, $5, $6::text::jsonb)",
        )?;
        // One statement: every answer, or none, is written.
        let rows = self
            .client
            .query(
                &st,
                &[&claimer.owner(), &mids, &bodies, &redacted, &keys, &meta],
            )
            .map_err(|e| pg_error("cannot write the answers", e))?;
        // One row per answer, in the order given.
        let got: Vec<Option<i64>> = rows.iter().map(|r| r.get(1)).collect();
        if got.len() != answers.len() {
            return Err(Error::Invalid(format!(
                "autopoll_complete returned {} rows for {} answers",
                got.len(),
                answers.len()
            )));
        }
        Ok(answers
            .iter()
            .zip(got)
            .map(|(a, rid)| {
                if rid.is_none() {
                    log::warn!(
                        "event=stale_complete message_id={} owner={}: claim lost (lease expired and taken over, or finished)",
                        a.message_id,
                        claimer.owner()
                    );
                }
                rid
            })
            .collect())
    }

    fn skip(&mut self, claimer: &Claimer, ids: &[i64], reason: &str) -> Result<usize> {
        let mut tx = self.tx()?;
        let mut n = 0;
        for &id in ids {
            let Some(h) = take_held(&mut tx, id, claimer.owner())? else {
                continue;
            };
            finish(
                &mut tx,
                id,
                &h,
                "skipped",
                None,
                claimer.owner(),
                Some(reason),
            )?;
            audit(
                &mut tx,
                Some(&h.conversation_id),
                Some(&h.to_session),
                actions::SKIP,
                &json!({ "message_id": id, "reason": reason }),
            )?;
            n += 1;
        }
        commit(tx)?;
        Ok(n)
    }

    fn dead_letter(
        &mut self,
        claimer: &Claimer,
        message_id: i64,
        error: &str,
    ) -> Result<Option<DeadLettered>> {
        let mut tx = self.tx()?;
        let Some(h) = take_held(&mut tx, message_id, claimer.owner())? else {
            return Ok(None);
        };
        let msg = tx
            .query_one(
                &format!("SELECT {MESSAGE_COLUMNS} FROM messages m WHERE m.id = $1"),
                &[&message_id],
            )
            .map(|r| from_row(&r))
            .map_err(|e| pg_error("cannot read the message", e))?;
        let d = dead_letter_held(&mut tx, claimer, &msg, &h, error, Some(error))?;
        commit(tx)?;
        Ok(Some(d))
    }

    fn earlier_answer(
        &mut self,
        conversation: &str,
        session: Session,
        repeat_key: &str,
    ) -> Result<Option<(i64, String)>> {
        Ok(self
            .conn()?
            .query_opt(
                "SELECT a.message_id, r.message FROM autopoll_answers a
                 JOIN messages r ON r.id = a.response_id
                 WHERE a.conversation_id = $1 AND a.to_session = $2 AND a.query_id = $3",
                &[&conversation, &session.as_str(), &repeat_key],
            )
            .map_err(|e| pg_error("cannot look up an earlier answer", e))?
            .map(|r| (r.get(0), r.get(1))))
    }

    fn outcome(&mut self, message_id: i64) -> Result<Option<(String, Option<i64>, u32)>> {
        Ok(self
            .conn()?
            .query_opt(
                "SELECT outcome, response_id, attempts FROM autopoll_outcomes WHERE message_id = $1",
                &[&message_id],
            )
            .map_err(|e| pg_error("cannot read the outcome", e))?
            .map(|r| (r.get(0), r.get(1), r.get::<_, i32>(2).max(0) as u32)))
    }

    fn heartbeat(
        &mut self,
        conversation: &str,
        session: Session,
        token: &str,
        state: SessionState,
    ) -> Result<()> {
        self.put_status(conversation, session, token, state, true)
            .map(|_| ())
    }

    fn update_status(
        &mut self,
        conversation: &str,
        session: Session,
        token: &str,
        state: SessionState,
    ) -> Result<String> {
        self.put_status(conversation, session, token, state, false)
    }

    fn session_status(
        &mut self,
        conversation: &str,
        session: Session,
    ) -> Result<Option<SessionStatus>> {
        Ok(self
            .conn()?
            .query_opt(
                "SELECT status, autopoll_pyts(last_heartbeat) FROM session_status
                 WHERE conversation_id = $1 AND session_id = $2",
                &[&conversation, &session.as_str()],
            )
            .map_err(|e| pg_error("cannot read the session's status", e))?
            .map(|r| status_of(r.get(0), r.get(1))))
    }

    fn stats(&mut self, conversation: Option<&str>) -> Result<Vec<SessionStats>> {
        let convs = match conversation {
            Some(id) => vec![self.conversation(id)?],
            None => self.list_conversations()?,
        };
        let mut out = Vec::with_capacity(convs.len() * 2);
        for c in convs {
            for s in [Session::A, Session::B] {
                let r = self
                    .conn()?
                    .query_one(
                        "SELECT
                           (SELECT count(*) FROM messages
                             WHERE conversation_id = $1 AND to_session = $2 AND NOT read),
                           (SELECT extract(epoch FROM clock_timestamp() - min(timestamp))::float8
                             FROM messages WHERE conversation_id = $1 AND to_session = $2 AND NOT read),
                           (SELECT count(*) FROM autopoll_claims c JOIN messages m ON m.id = c.message_id
                             WHERE c.conversation_id = $1 AND c.to_session = $2 AND c.owner IS NOT NULL
                               AND c.lease_until_ms > autopoll_now_ms() AND NOT m.read),
                           (SELECT count(*) FILTER (WHERE outcome = 'answered') FROM autopoll_outcomes
                             WHERE conversation_id = $1 AND to_session = $2),
                           (SELECT count(*) FILTER (WHERE outcome = 'dead_letter') FROM autopoll_outcomes
                             WHERE conversation_id = $1 AND to_session = $2),
                           (SELECT count(*) FILTER (WHERE outcome = 'skipped') FROM autopoll_outcomes
                             WHERE conversation_id = $1 AND to_session = $2)",
                        &[&c.id, &s.as_str()],
                    )
                    .map_err(|e| pg_error("cannot count the queue", e))?;
                let hb = self.session_status(&c.id, s)?;
                let host = self.heartbeat_host(&c.id, s)?;
                let n = |i: usize| r.get::<_, i64>(i).max(0) as u64;
                out.push(SessionStats {
                    conversation_id: c.id.clone(),
                    session: s.to_string(),
                    role: c.role(s).to_string(),
                    unread: n(0),
                    claimed: n(2),
                    answered: n(3),
                    dead_lettered: n(4),
                    skipped: n(5),
                    oldest_unread_age_secs: r.get::<_, Option<f64>>(1).map(|a| a.max(0.0)),
                    unknown_age: 0,
                    status: hb.as_ref().map(|h| h.status.clone()),
                    heartbeat_age_secs: hb.as_ref().and_then(|h| h.age_secs),
                    alive: hb.as_ref().is_some_and(|h| h.alive),
                    expires_at: c.expires_at.clone(),
                    expired: c.expired,
                    host,
                });
            }
        }
        Ok(out)
    }

    fn last_response_at(&mut self, conversation: &str, from: Session) -> Result<Option<String>> {
        Ok(self
            .conn()?
            .query_one(
                "SELECT autopoll_pyts(max(timestamp)) FROM messages
                 WHERE conversation_id = $1 AND from_session = $2
                   AND metadata->>'action_type' = 'response'",
                &[&conversation, &from.as_str()],
            )
            .map_err(|e| pg_error("cannot read the last response's time", e))?
            .get(0))
    }

    fn unseen_dead_letters(
        &mut self,
        conversation: &str,
        session: Session,
    ) -> Result<Vec<UnseenDeadLetter>> {
        Ok(self
            .conn()?
            .query(
                "SELECT o.message_id, o.response_id, autopoll_pyts(o.completed_at), o.attempts,
                        o.detail, r.message
                 FROM autopoll_outcomes o JOIN messages r ON r.id = o.response_id
                 WHERE o.conversation_id = $1 AND o.to_session = $2
                   AND o.outcome = 'dead_letter' AND NOT r.read
                 ORDER BY o.message_id",
                &[&conversation, &session.as_str()],
            )
            .map_err(|e| pg_error("cannot list dead letters", e))?
            .iter()
            .map(|r| UnseenDeadLetter {
                message_id: r.get(0),
                response_id: r.get::<_, Option<i64>>(1).unwrap_or(0),
                completed_at: r.get(2),
                attempts: r.get::<_, i32>(3).max(0) as u32,
                detail: r.get(4),
                query_id: Response::parse(&r.get::<_, String>(5))
                    .map(|x| x.query_id)
                    .unwrap_or_default(),
            })
            .collect())
    }

    fn prune_step(&mut self, pruner: &mut Pruner) -> Result<bool> {
        self.prune_step_pg(pruner)
    }

    fn prune_dry_run(&mut self, older_than: Duration) -> Result<PruneReport> {
        self.prune_dry_pg(older_than)
    }

    fn compact(&mut self, full: bool) -> Result<CompactReport> {
        self.compact_pg(full)
    }

    fn file_size(&mut self) -> Result<FileSize> {
        self.file_size_pg()
    }

    fn heartbeat_host(&mut self, conversation: &str, session: Session) -> Result<Option<String>> {
        Ok(self
            .conn()?
            .query_opt(
                "SELECT host FROM session_status WHERE conversation_id = $1 AND session_id = $2",
                &[&conversation, &session.as_str()],
            )
            .map_err(|e| pg_error("cannot read the session's status", e))?
            .and_then(|r| r.get(0)))
    }
}
