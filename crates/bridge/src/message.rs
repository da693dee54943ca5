//! Messages: send (with redaction, metadata, an audit row), read-and-mark
//! unread ones atomically as the Python server does, and peek without marking.

use rusqlite::types::ValueRef;
use rusqlite::{Connection, OptionalExtension, ToSql, params};
use serde::Serialize;
use serde_json::{Value, json};

use crate::conversation::verify_on;
use crate::error::{Error, Result};
use crate::rows::MultiRow;
use crate::{Bridge, RateLimit, Session, audit, clock, redact};

/// A row of `messages`.
#[derive(Clone, Serialize)]
pub struct Message {
    /// Row id (increasing).
    pub id: i64,
    /// Conversation id.
    pub conversation_id: String,
    /// Sending session.
    pub from_session: String,
    /// Receiving session.
    pub to_session: String,
    /// The text (already redacted when it was stored).
    pub message: String,
    /// Metadata as JSON (`{}` when the row has none; a string when it is not JSON).
    pub metadata: Value,
    /// When it was stored.
    pub timestamp: String,
    /// Whether the receiver has read it.
    pub read: bool,
    /// Why the row's `message` could not be read as text as it stands (not
    /// valid UTF-8, a BLOB, NULL), if so; `message` then holds a lossy
    /// decoding (U+FFFD for what is not UTF-8, empty for NULL). A consumer
    /// dead-letters such a row instead of answering it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unreadable: Option<String>,
}

/// Question text stays out of logs: Debug shows its length only.
impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Message")
            .field("id", &self.id)
            .field("conversation_id", &self.conversation_id)
            .field("from_session", &self.from_session)
            .field("to_session", &self.to_session)
            .field("message_len", &self.message.len())
            .field("timestamp", &self.timestamp)
            .field("read", &self.read)
            .field("unreadable", &self.unreadable)
            .finish()
    }
}

impl Message {
    /// The `action_type` of its metadata, if any.
    pub fn action_type(&self) -> Option<&str> {
        self.metadata.get("action_type").and_then(Value::as_str)
    }
}

/// The result of a send.
#[derive(Debug, Clone, Serialize)]
pub struct Sent {
    /// The new row's id.
    pub id: i64,
    /// Its timestamp.
    pub timestamp: String,
    /// Whether a secret was redacted from the text or metadata.
    pub redacted: bool,
}

pub(crate) const MESSAGE_COLUMNS: &str =
    "id, conversation_id, from_session, to_session, message, metadata, timestamp, read";

/// A column as text however it is stored: `(text, None)` for valid UTF-8
/// text or a number (as SQLite prints it), else a lossy decoding and what was
/// wrong with it. Rows come from other writers too; one bad value must not
/// make the whole row, or the batch it is in, unreadable.
pub(crate) fn text_lossy(v: ValueRef<'_>) -> (String, Option<String>) {
    match v {
        ValueRef::Text(b) => match std::str::from_utf8(b) {
            Ok(s) => (s.to_string(), None),
            Err(e) => (
                String::from_utf8_lossy(b).into_owned(),
                Some(format!(
                    "not valid UTF-8 text ({} bytes, first bad byte at {})",
                    b.len(),
                    e.valid_up_to()
                )),
            ),
        },
        ValueRef::Blob(b) => (
            String::from_utf8_lossy(b).into_owned(),
            Some(format!("a BLOB of {} bytes, not text", b.len())),
        ),
        ValueRef::Null => (String::new(), Some("NULL, not text".into())),
        ValueRef::Integer(i) => (i.to_string(), None),
        ValueRef::Real(f) => (f.to_string(), None),
    }
}

pub(crate) fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Message> {
    let metadata = match r.get_ref(5)? {
        ValueRef::Null => json!({}),
        v => {
            let (s, _) = text_lossy(v);
            serde_json::from_str(&s).unwrap_or(Value::String(s))
        }
    };
    let (message, problem) = text_lossy(r.get_ref(4)?);
    Ok(Message {
        id: r.get(0)?,
        conversation_id: text_lossy(r.get_ref(1)?).0,
        from_session: text_lossy(r.get_ref(2)?).0,
        to_session: text_lossy(r.get_ref(3)?).0,
        message,
        metadata,
        timestamp: text_lossy(r.get_ref(6)?).0,
        read: r.get::<_, Option<i64>>(7).ok().flatten().unwrap_or(0) != 0,
        unreadable: problem.map(|p| format!("the message is {p}")),
    })
}

/// Insert a message row and its `send_message` audit row (the caller has
/// verified the sender and holds a transaction). Text and metadata are redacted.
pub(crate) fn insert(
    conn: &Connection,
    conversation: &str,
    from: &str,
    to: &str,
    text: &str,
    metadata: &Value,
) -> rusqlite::Result<Sent> {
    let (text, mut redacted) = redact::redact_message(text);
    let mut metadata = metadata.clone();
    redacted |= redact::redact_json(&mut metadata);
    let timestamp = clock::now_string();
    conn.prepare_cached(
        "INSERT INTO messages (conversation_id, from_session, to_session, message, metadata, timestamp)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![conversation, from, to, text, metadata.to_string(), timestamp])?;
    let id = conn.last_insert_rowid();
    audit::write(
        conn,
        Some(conversation),
        Some(from),
        audit::actions::SEND_MESSAGE,
        &json!({ "to": to, "message_length": text.chars().count(), "redacted": redacted }),
    )?;
    Ok(Sent {
        id,
        timestamp,
        redacted,
    })
}

/// One message of [`insert_many`].
pub(crate) struct Outgoing<'a> {
    pub(crate) conversation: &'a str,
    pub(crate) from: &'a str,
    pub(crate) to: &'a str,
    pub(crate) text: &'a str,
}

static INSERT_MESSAGES: MultiRow = MultiRow::new(
    "INSERT INTO messages (conversation_id, from_session, to_session, message, metadata, timestamp)",
    "(?, ?, ?, ?, ?, ?)",
    "RETURNING id",
);

static INSERT_AUDIT: MultiRow = MultiRow::new(
    "INSERT INTO audit_log (conversation_id, session_id, action, details, timestamp)",
    "(?, ?, ?, ?, ?)",
    "",
);

/// [`insert`] for many messages with the same metadata, set-based: the
/// same rows (each message, then its `send_message` audit row, redacted
/// alike, each message with its own timestamp) in a few multi-row
/// statements. Returns the new row ids in the order of `msgs`.
pub(crate) fn insert_many(
    conn: &Connection,
    msgs: &[Outgoing<'_>],
    metadata: &Value,
) -> rusqlite::Result<Vec<i64>> {
    let mut metadata = metadata.clone();
    let meta_redacted = redact::redact_json(&mut metadata);
    let metadata = metadata.to_string();
    struct Row {
        text: String,
        timestamp: String,
        details: String,
    }
    let rows: Vec<Row> = msgs
        .iter()
        .map(|m| {
            let (text, redacted) = redact::redact_message(m.text);
            let details = json!({
                "to": m.to,
                "message_length": text.chars().count(),
                "redacted": redacted | meta_redacted,
            })
            .to_string();
            Row {
                text,
                timestamp: clock::now_string(),
                details,
            }
        })
        .collect();
    let params: Vec<Vec<&dyn ToSql>> = msgs
        .iter()
        .zip(&rows)
        .map(|(m, r)| {
            vec![
                &m.conversation as &dyn ToSql,
                &m.from,
                &m.to,
                &r.text,
                &metadata,
                &r.timestamp,
            ]
        })
        .collect();
    let ids = INSERT_MESSAGES.returning_ids(conn, &params)?;
    let action = audit::actions::SEND_MESSAGE;
    let params: Vec<Vec<&dyn ToSql>> = msgs
        .iter()
        .zip(&rows)
        .map(|(m, r)| {
            vec![
                &m.conversation as &dyn ToSql,
                &m.from,
                &action,
                &r.details,
                &r.timestamp,
            ]
        })
        .collect();
    INSERT_AUDIT.execute(conn, &params)?;
    Ok(ids)
}

fn check_rate(
    conn: &Connection,
    limit: &RateLimit,
    conversation: &str,
    from: Session,
) -> Result<()> {
    let now = clock::now();
    let windows = [
        ("minute", 60u64, limit.per_minute),
        ("hour", 3_600, limit.per_hour),
        ("day", 86_400, limit.per_day),
    ];
    for (window, secs, max) in windows {
        let since = clock::format(now - time::Duration::seconds(secs as i64));
        let count: u64 = conn
            .query_row(
                "SELECT count(*) FROM messages
                 WHERE conversation_id = ?1 AND from_session = ?2 AND timestamp >= ?3",
                params![conversation, from.as_str(), since],
                |r| r.get(0),
            )
            .map_err(Error::Sqlite)?;
        if count >= u64::from(max) {
            return Err(Error::RateLimited {
                conversation: conversation.to_string(),
                session: from.to_string(),
                window,
                count,
                limit: max,
            });
        }
    }
    Ok(())
}

/// A send's text and metadata checked as both stores take them: the text
/// within the length limit, the metadata an object (by default
/// `{"action_type": "info", "files_involved": []}`). Returns the metadata.
pub(crate) fn checked_send(
    opts: &crate::BridgeOptions,
    text: &str,
    metadata: Option<&Value>,
) -> Result<Value> {
    let chars = text.chars().count();
    if chars > opts.max_message_chars {
        return Err(Error::Invalid(format!(
            "message is {chars} characters; the bridge takes at most {}",
            opts.max_message_chars
        )));
    }
    let metadata = metadata
        .cloned()
        .unwrap_or_else(|| json!({ "action_type": "info", "files_involved": [] }));
    if !metadata.is_object() {
        return Err(Error::Invalid("metadata must be a JSON object".into()));
    }
    Ok(metadata)
}

impl Bridge {
    /// Send `text` from `from` to the other session. The token must be
    /// `from`'s. `metadata` defaults to `{"action_type": "info", "files_involved": []}`.
    pub fn send(
        &mut self,
        conversation: &str,
        from: Session,
        token: &str,
        text: &str,
        metadata: Option<&Value>,
    ) -> Result<Sent> {
        let metadata = &checked_send(&self.opts, text, metadata)?;
        let rate = self.opts.rate_limit;
        let (tx, map) = self.immediate()?;
        verify_on(&tx, conversation, from, token)?;
        if let Some(limit) = rate {
            check_rate(&tx, &limit, conversation, from)?;
        }
        let sent = insert(
            &tx,
            conversation,
            from.as_str(),
            from.other().as_str(),
            text,
            metadata,
        )
        .map_err(&map)?;
        tx.commit().map_err(&map)?;
        log::debug!(
            "event=message_sent conversation={conversation} from={from} id={} redacted={}",
            sent.id,
            sent.redacted
        );
        Ok(sent)
    }

    /// Read every unread message addressed to `session` and mark them read, in
    /// one `BEGIN IMMEDIATE` transaction (the Python `check_messages`). Ordered
    /// by timestamp. This takes messages that a poller may hold claims on too,
    /// exactly as the Python server would.
    pub fn read_unread(
        &mut self,
        conversation: &str,
        session: Session,
        token: &str,
    ) -> Result<Vec<Message>> {
        let (tx, map) = self.immediate()?;
        verify_on(&tx, conversation, session, token)?;
        let msgs = {
            let mut stmt = tx
                .prepare_cached(&format!(
                    "SELECT {MESSAGE_COLUMNS} FROM messages
                     WHERE conversation_id = ?1 AND to_session = ?2 AND read = 0
                     ORDER BY timestamp ASC, id ASC"
                ))
                .map_err(&map)?;
            stmt.query_map(params![conversation, session.as_str()], from_row)
                .map_err(&map)?
                .collect::<rusqlite::Result<Vec<_>>>()
                .map_err(&map)?
        };
        mark_read(&tx, msgs.iter().map(|m| m.id)).map_err(&map)?;
        audit::write(
            &tx,
            Some(conversation),
            Some(session.as_str()),
            audit::actions::GET_MESSAGES,
            &json!({ "count": msgs.len() }),
        )
        .map_err(&map)?;
        tx.commit().map_err(&map)?;
        Ok(msgs
            .into_iter()
            .map(|mut m| {
                m.read = true;
                m
            })
            .collect())
    }

    /// Unread messages to `session` with id above `after_id`, oldest first, at
    /// most `limit`, without marking them (for waiting on one answer).
    pub fn peek_unread(
        &self,
        conversation: &str,
        session: Session,
        after_id: i64,
        limit: usize,
    ) -> Result<Vec<Message>> {
        let map = self.map();
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages
                 WHERE conversation_id = ?1 AND to_session = ?2 AND read = 0 AND id > ?3
                 ORDER BY id ASC LIMIT ?4"
            ))
            .map_err(&map)?;
        stmt.query_map(
            params![conversation, session.as_str(), after_id, limit as i64],
            from_row,
        )
        .map_err(&map)?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(&map)
    }

    /// Mark the given messages to `session` read (audited as `get_messages`).
    /// Returns how many were unread and are now read.
    pub fn mark_read(
        &mut self,
        conversation: &str,
        session: Session,
        token: &str,
        ids: &[i64],
    ) -> Result<usize> {
        self.set_read(conversation, session, token, ids, true)
    }

    /// Undo [`Bridge::mark_read`] for messages a reader took but could not
    /// deliver (an MCP call cancelled after it committed): they are unread
    /// again, so the next `check_messages` returns them. Only messages to
    /// `session` that are read now; returns how many changed (not audited:
    /// the Python server has no such action).
    pub fn unmark_read(
        &mut self,
        conversation: &str,
        session: Session,
        token: &str,
        ids: &[i64],
    ) -> Result<usize> {
        self.set_read(conversation, session, token, ids, false)
    }

    /// Set `read` on the given messages to `session` (those not so already),
    /// in one transaction; marking read is audited as `get_messages`.
    fn set_read(
        &mut self,
        conversation: &str,
        session: Session,
        token: &str,
        ids: &[i64],
        read: bool,
    ) -> Result<usize> {
        let (tx, map) = self.immediate()?;
        verify_on(&tx, conversation, session, token)?;
        let (to, from) = if read { (1, 0) } else { (0, 1) };
        let mut n = 0;
        for id in ids {
            n += tx
                .prepare_cached(
                    "UPDATE messages SET read = ?4
                     WHERE id = ?1 AND conversation_id = ?2 AND to_session = ?3 AND read = ?5",
                )
                .and_then(|mut s| s.execute(params![id, conversation, session.as_str(), to, from]))
                .map_err(&map)?;
        }
        if read {
            audit::write(
                &tx,
                Some(conversation),
                Some(session.as_str()),
                audit::actions::GET_MESSAGES,
                &json!({ "count": n }),
            )
            .map_err(&map)?;
        }
        tx.commit().map_err(&map)?;
        Ok(n)
    }

    /// One message by id.
    pub fn message(&self, id: i64) -> Result<Message> {
        let map = self.map();
        self.conn
            .prepare_cached(&format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = ?1"
            ))
            .and_then(|mut s| s.query_row([id], from_row).optional())
            .map_err(&map)?
            .ok_or_else(|| Error::not_found(format!("message {id}")))
    }
}

pub(crate) fn mark_read(
    conn: &Connection,
    ids: impl IntoIterator<Item = i64>,
) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare_cached("UPDATE messages SET read = 1 WHERE id = ?1")?;
    for id in ids {
        stmt.execute([id])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::Fixture;
    use crate::{BridgeOptions, DEFAULT_TTL};

    #[test]
    fn send_then_read_marks_read_once() {
        let mut f = Fixture::new();
        let id = f.send_a("hello b");
        let conv = f.id().to_string();
        let tb = f.conv.session_b_token.clone();
        let got = f.bridge.read_unread(&conv, Session::B, &tb).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].id, id);
        assert_eq!(got[0].message, "hello b");
        assert_eq!(got[0].from_session, "a");
        assert_eq!(got[0].action_type(), Some("info"));
        assert!(
            f.bridge
                .read_unread(&conv, Session::B, &tb)
                .unwrap()
                .is_empty()
        );
        // a has nothing: messages go to the other session only.
        let ta = f.conv.session_a_token.clone();
        assert!(
            f.bridge
                .read_unread(&conv, Session::A, &ta)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn send_redacts_text_and_metadata_and_audits() {
        let mut f = Fixture::new();
        let conv = f.id().to_string();
        let ta = f.conv.session_a_token.clone();
        let meta = json!({"action_type": "question", "files_involved": ["AKIAIOSFODNN7EXAMPLE"]});
        let sent = f
            .bridge
            .send(&conv, Session::A, &ta, "my password=hunter2", Some(&meta))
            .unwrap();
        assert!(sent.redacted);
        let m = f.bridge.message(sent.id).unwrap();
        assert_eq!(m.message, "my PASSWORD_REDACTED");
        assert_eq!(m.metadata["files_involved"][0], "AWS_KEY_REDACTED");
        let details: String = f
            .bridge
            .connection()
            .query_row(
                "SELECT details FROM audit_log WHERE action = 'send_message'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        let d: Value = serde_json::from_str(&details).unwrap();
        assert_eq!(
            d,
            json!({"to": "b", "message_length": 20, "redacted": true})
        );
    }

    #[test]
    fn send_checks_token_length_and_metadata() {
        let mut f = Fixture::new();
        let conv = f.id().to_string();
        let tb = f.conv.session_b_token.clone();
        let ta = f.conv.session_a_token.clone();
        // b's token cannot send as a
        assert!(matches!(
            f.bridge.send(&conv, Session::A, &tb, "x", None),
            Err(Error::InvalidToken { .. })
        ));
        let long = "x".repeat(MAX + 1);
        assert!(matches!(
            f.bridge.send(&conv, Session::A, &ta, &long, None),
            Err(Error::Invalid(_))
        ));
        f.bridge
            .send(&conv, Session::A, &ta, &"x".repeat(MAX), None)
            .unwrap();
        assert!(matches!(
            f.bridge
                .send(&conv, Session::A, &ta, "x", Some(&json!([1]))),
            Err(Error::Invalid(_))
        ));
    }
    const MAX: usize = crate::MAX_MESSAGE_CHARS;

    #[test]
    fn rate_limit_is_off_by_default_and_enforced_when_set() {
        let mut f = Fixture::new();
        for _ in 0..30 {
            f.send_a("burst");
        }
        let mut limited = Bridge::open_with(
            f.path(),
            BridgeOptions {
                rate_limit: Some(RateLimit {
                    per_minute: 3,
                    per_hour: 100,
                    per_day: 500,
                }),
                ..BridgeOptions::default()
            },
        )
        .unwrap();
        let c = limited.create_conversation("a", "b", DEFAULT_TTL).unwrap();
        for _ in 0..3 {
            limited
                .send(
                    &c.conversation_id,
                    Session::A,
                    &c.session_a_token,
                    "x",
                    None,
                )
                .unwrap();
        }
        let e = limited
            .send(
                &c.conversation_id,
                Session::A,
                &c.session_a_token,
                "x",
                None,
            )
            .unwrap_err();
        assert!(
            matches!(
                e,
                Error::RateLimited {
                    window: "minute",
                    ..
                }
            ),
            "{e}"
        );
        // b's budget is separate.
        limited
            .send(
                &c.conversation_id,
                Session::B,
                &c.session_b_token,
                "x",
                None,
            )
            .unwrap();
    }

    #[test]
    fn peek_does_not_mark_and_mark_read_marks_only_given() {
        let mut f = Fixture::new();
        let m1 = f.send_a("one");
        let m2 = f.send_a("two");
        let conv = f.id().to_string();
        let tb = f.conv.session_b_token.clone();
        let peek = f.bridge.peek_unread(&conv, Session::B, 0, 10).unwrap();
        assert_eq!(peek.iter().map(|m| m.id).collect::<Vec<_>>(), vec![m1, m2]);
        assert_eq!(
            f.bridge
                .peek_unread(&conv, Session::B, m1, 10)
                .unwrap()
                .len(),
            1
        );
        assert_eq!(
            f.bridge.mark_read(&conv, Session::B, &tb, &[m2]).unwrap(),
            1
        );
        assert_eq!(
            f.bridge.mark_read(&conv, Session::B, &tb, &[m2]).unwrap(),
            0
        );
        let rest = f.bridge.read_unread(&conv, Session::B, &tb).unwrap();
        assert_eq!(rest.iter().map(|m| m.id).collect::<Vec<_>>(), vec![m1]);
    }

    #[test]
    fn busy_writer_past_timeout_is_a_busy_error() {
        let mut f = Fixture::new();
        let mut quick = Bridge::open_with(
            f.path(),
            BridgeOptions {
                busy_timeout: std::time::Duration::from_millis(50),
                ..BridgeOptions::default()
            },
        )
        .unwrap();
        // Another connection holds the write lock.
        let holder = rusqlite::Connection::open(f.path()).unwrap();
        holder.execute_batch("BEGIN IMMEDIATE").unwrap();
        let conv = f.id().to_string();
        let ta = f.conv.session_a_token.clone();
        let e = quick.send(&conv, Session::A, &ta, "x", None).unwrap_err();
        assert!(matches!(e, Error::Busy { timeout_ms: 50 }), "{e}");
        assert!(e.is_transient());
        holder.execute_batch("ROLLBACK").unwrap();
        quick.send(&conv, Session::A, &ta, "x", None).unwrap();
        let _ = f.send_a("still fine");
    }
}
