//! Audit rows: the Python server's action names, and autopoll's own.

use rusqlite::{Connection, params};
use serde_json::Value;

use crate::clock;

/// Action names written to `audit_log.action`.
pub mod actions {
    /// Python: a conversation was created.
    pub const CREATE_CONVERSATION: &str = "create_conversation";
    /// Python: a message was sent (also written for every answer autopoll sends).
    pub const SEND_MESSAGE: &str = "send_message";
    /// Python: unread messages were read and marked.
    pub const GET_MESSAGES: &str = "get_messages";
    /// autopoll: a conversation's expiry was pushed back.
    pub const RENEW: &str = "autopoll_renew";
    /// autopoll: a consumer claimed messages.
    pub const CLAIM: &str = "autopoll_claim";
    /// autopoll: claimed messages were answered (SQLite: one row per group
    /// of answers and conversation, `{"message_ids", "response_ids",
    /// "attempts"}` lists; PostgreSQL: one row per answer).
    pub const COMPLETE: &str = "autopoll_complete";
    /// autopoll: claims were given back unanswered.
    pub const RELEASE: &str = "autopoll_release";
    /// autopoll: a message failed too often and got an error answer.
    pub const DEAD_LETTER: &str = "autopoll_dead_letter";
    /// autopoll: a claimed message was marked read without an answer (not a question).
    pub const SKIP: &str = "autopoll_skip";
    /// autopoll: a session's status changed (heartbeats that keep it are not logged).
    pub const STATUS_CHANGE: &str = "autopoll_status_change";
}

pub(crate) fn write(
    conn: &Connection,
    conversation: Option<&str>,
    session: Option<&str>,
    action: &str,
    details: &Value,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO audit_log (conversation_id, session_id, action, details, timestamp)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![
        conversation,
        session,
        action,
        details.to_string(),
        clock::now_string()
    ])?;
    Ok(())
}
