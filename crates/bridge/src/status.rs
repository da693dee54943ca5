//! Session heartbeats (`session_status`) and partner liveness.

use std::str::FromStr;

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use serde_json::json;

use crate::conversation::verify_on;
use crate::error::{Error, Result};
use crate::{ALIVE_SECS, Bridge, Session, audit, clock};

/// The statuses the Python server accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    /// Busy with something (a poller with questions in flight).
    Working,
    /// Idle, ready for messages.
    Waiting,
    /// Cannot make progress (a poller whose server is unreachable).
    Blocked,
    /// Done.
    Complete,
    /// Written by autopoll-poller as it stops cleanly, so nobody takes it
    /// for alive until its heartbeat ages out. Not a status the Python
    /// server's `update_my_status` accepts (it only reads it back).
    Stopped,
}

impl SessionState {
    /// As stored.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Working => "working",
            SessionState::Waiting => "waiting",
            SessionState::Blocked => "blocked",
            SessionState::Complete => "complete",
            SessionState::Stopped => "stopped",
        }
    }
}

impl FromStr for SessionState {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "working" => SessionState::Working,
            "waiting" => SessionState::Waiting,
            "blocked" => SessionState::Blocked,
            "complete" => SessionState::Complete,
            _ => {
                return Err(Error::Invalid(format!(
                    "status must be working, waiting, blocked or complete, not {s:?}"
                )));
            }
        })
    }
}

/// A session's last heartbeat.
#[derive(Debug, Clone, Serialize)]
pub struct SessionStatus {
    /// The status text as stored.
    pub status: String,
    /// When it was written.
    pub last_heartbeat: String,
    /// Seconds since then.
    pub age_secs: Option<f64>,
    /// Younger than 120 s.
    pub alive: bool,
}

/// What `check_partner_status` reports, in the Python server's shape.
#[derive(Debug, Clone, Serialize)]
pub struct PartnerStatus {
    /// The partner's status, or `unknown` when it never sent a heartbeat.
    pub status: String,
    /// Its last heartbeat.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_heartbeat: Option<String>,
    /// Whole seconds since then.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub age_seconds: Option<i64>,
    /// Younger than 120 s.
    pub alive: bool,
}

pub(crate) fn read_status(
    conn: &Connection,
    conversation: &str,
    session: &str,
) -> Result<Option<SessionStatus>> {
    let row: Option<(String, String)> = conn
        .prepare_cached(
            "SELECT status, last_heartbeat FROM session_status
             WHERE conversation_id = ?1 AND session_id = ?2",
        )
        .and_then(|mut s| {
            s.query_row(params![conversation, session], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()
        })
        .map_err(Error::Sqlite)?;
    row.map(|(status, last_heartbeat)| Ok(status_of(status, last_heartbeat)))
        .transpose()
}

/// A stored `(status, last_heartbeat)` pair as a [`SessionStatus`], whichever
/// store it came from.
pub(crate) fn status_of(status: String, last_heartbeat: String) -> SessionStatus {
    // A heartbeat nobody can read (garbage from another writer) has no
    // age and is not alive; it does not make the whole status fail.
    let age_secs = clock::parse(&last_heartbeat)
        .ok()
        .map(|t| clock::seconds_between(t, clock::now()));
    // A poller that said it stopped is not alive, however fresh.
    let stopped = status == SessionState::Stopped.as_str();
    SessionStatus {
        status,
        last_heartbeat,
        age_secs,
        alive: age_secs.is_some_and(|a| a < ALIVE_SECS) && !stopped,
    }
}

/// What a session is told of its partner, from the partner's status row.
pub(crate) fn partner_of(status: Option<SessionStatus>) -> PartnerStatus {
    match status {
        Some(s) => PartnerStatus {
            status: s.status,
            last_heartbeat: Some(s.last_heartbeat),
            age_seconds: s.age_secs.map(|a| a as i64),
            alive: s.alive,
        },
        None => PartnerStatus {
            status: "unknown".into(),
            last_heartbeat: None,
            age_seconds: None,
            alive: false,
        },
    }
}

impl Bridge {
    /// Upsert `session`'s status with a fresh heartbeat (the Python
    /// `update_my_status`). A change of status is audited; a heartbeat that
    /// keeps the status is not, so a long-running poller does not fill the log.
    pub fn heartbeat(
        &mut self,
        conversation: &str,
        session: Session,
        token: &str,
        state: SessionState,
    ) -> Result<()> {
        let (tx, map) = self.immediate()?;
        verify_on(&tx, conversation, session, token)?;
        let old: Option<String> = tx
            .prepare_cached(
                "SELECT status FROM session_status WHERE conversation_id = ?1 AND session_id = ?2",
            )
            .and_then(|mut s| {
                s.query_row(params![conversation, session.as_str()], |r| r.get(0))
                    .optional()
            })
            .map_err(&map)?;
        tx.prepare_cached(
            "INSERT OR REPLACE INTO session_status (conversation_id, session_id, status, last_heartbeat)
             VALUES (?1, ?2, ?3, ?4)",
        )
        .and_then(|mut s| {
            s.execute(params![
                conversation,
                session.as_str(),
                state.as_str(),
                clock::now_string()
            ])
        })
        .map_err(&map)?;
        if old.as_deref() != Some(state.as_str()) {
            audit::write(
                &tx,
                Some(conversation),
                Some(session.as_str()),
                audit::actions::STATUS_CHANGE,
                &json!({ "from": old, "to": state.as_str() }),
            )
            .map_err(&map)?;
        }
        tx.commit().map_err(&map)?;
        Ok(())
    }

    /// The Python server's `update_my_status`, row for row: verify the
    /// token, upsert `session_status` with a fresh heartbeat, nothing else
    /// (no audit row: the Python server writes none). `autopoll mcp` uses
    /// it; the poller uses [`Bridge::heartbeat`], which audits changes.
    pub fn update_status(
        &mut self,
        conversation: &str,
        session: Session,
        token: &str,
        state: SessionState,
    ) -> Result<String> {
        let (tx, map) = self.immediate()?;
        verify_on(&tx, conversation, session, token)?;
        let now = clock::now_string();
        tx.prepare_cached(
            "INSERT OR REPLACE INTO session_status (conversation_id, session_id, status, last_heartbeat)
             VALUES (?1, ?2, ?3, ?4)",
        )
        .and_then(|mut s| s.execute(params![conversation, session.as_str(), state.as_str(), now]))
        .map_err(&map)?;
        tx.commit().map_err(&map)?;
        Ok(now)
    }

    /// When `from` last sent a response (a message whose metadata's
    /// `action_type` is `response`) in `conversation`, if ever.
    pub fn last_response_at(&self, conversation: &str, from: Session) -> Result<Option<String>> {
        self.conn
            .prepare_cached(
                "SELECT max(timestamp) FROM messages
                 WHERE conversation_id = ?1 AND from_session = ?2
                   AND CASE WHEN json_valid(metadata)
                       THEN json_extract(metadata, '$.action_type') END = 'response'",
            )
            .and_then(|mut s| s.query_row(params![conversation, from.as_str()], |r| r.get(0)))
            .map_err(self.map())
    }

    /// A session's last heartbeat, if it ever sent one (no token needed: this
    /// reveals no message content).
    pub fn session_status(
        &self,
        conversation: &str,
        session: Session,
    ) -> Result<Option<SessionStatus>> {
        read_status(&self.conn, conversation, session.as_str())
    }

    /// The partner of `session`: its status and whether it is alive (heartbeat
    /// under 120 s), as the Python `check_partner_status` reports it.
    pub fn partner_status(
        &self,
        conversation: &str,
        session: Session,
        token: &str,
    ) -> Result<PartnerStatus> {
        verify_on(&self.conn, conversation, session, token)?;
        Ok(partner_of(
            self.session_status(conversation, session.other())?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::Fixture;

    #[test]
    fn heartbeat_and_partner_status() {
        let mut f = Fixture::new();
        let conv = f.id().to_string();
        let (ta, tb) = (
            f.conv.session_a_token.clone(),
            f.conv.session_b_token.clone(),
        );
        let p = f.bridge.partner_status(&conv, Session::A, &ta).unwrap();
        assert_eq!((p.status.as_str(), p.alive), ("unknown", false));
        f.bridge
            .heartbeat(&conv, Session::B, &tb, SessionState::Waiting)
            .unwrap();
        let p = f.bridge.partner_status(&conv, Session::A, &ta).unwrap();
        assert_eq!((p.status.as_str(), p.alive), ("waiting", true));
        assert_eq!(p.age_seconds, Some(0));
        // Wrong token for the heartbeat.
        assert!(matches!(
            f.bridge
                .heartbeat(&conv, Session::B, &ta, SessionState::Working),
            Err(Error::InvalidToken { .. })
        ));
    }

    #[test]
    fn old_heartbeat_is_not_alive() {
        let mut f = Fixture::new();
        let conv = f.id().to_string();
        f.bridge
            .connection()
            .execute(
                "INSERT INTO session_status VALUES (?1, 'b', 'working', '2020-01-01T00:00:00')",
                [&conv],
            )
            .unwrap();
        let s = f.bridge.session_status(&conv, Session::B).unwrap().unwrap();
        assert!(!s.alive);
        assert!(s.age_secs.unwrap() > ALIVE_SECS);
        let ta = f.conv.session_a_token.clone();
        assert!(
            !f.bridge
                .partner_status(&conv, Session::A, &ta)
                .unwrap()
                .alive
        );
        let _ = &mut f;
    }

    #[test]
    fn only_status_changes_are_audited() {
        let mut f = Fixture::new();
        let conv = f.id().to_string();
        let tb = f.conv.session_b_token.clone();
        for s in [
            SessionState::Waiting,
            SessionState::Waiting,
            SessionState::Working,
            SessionState::Working,
        ] {
            f.bridge.heartbeat(&conv, Session::B, &tb, s).unwrap();
        }
        let n: i64 = f
            .bridge
            .connection()
            .query_row(
                "SELECT count(*) FROM audit_log WHERE action = 'autopoll_status_change'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, 2);
    }

    #[test]
    fn update_status_writes_no_audit_row_and_last_response_at_reads_responses() {
        let mut f = Fixture::new();
        let conv = f.id().to_string();
        let (ta, tb) = (
            f.conv.session_a_token.clone(),
            f.conv.session_b_token.clone(),
        );
        let before: i64 = f
            .bridge
            .connection()
            .query_row("SELECT count(*) FROM audit_log", [], |r| r.get(0))
            .unwrap();
        let at = f
            .bridge
            .update_status(&conv, Session::B, &tb, SessionState::Working)
            .unwrap();
        let s = f.bridge.session_status(&conv, Session::B).unwrap().unwrap();
        assert_eq!(
            (s.status.as_str(), s.last_heartbeat.as_str()),
            ("working", at.as_str())
        );
        let after: i64 = f
            .bridge
            .connection()
            .query_row("SELECT count(*) FROM audit_log", [], |r| r.get(0))
            .unwrap();
        assert_eq!(before, after);
        assert!(
            f.bridge
                .update_status(&conv, Session::B, &ta, SessionState::Working)
                .is_err()
        );
        assert_eq!(f.bridge.last_response_at(&conv, Session::B).unwrap(), None);
        f.bridge.send(&conv, Session::B, &tb, "fyi", None).unwrap();
        f.bridge
            .connection()
            .execute(
                "INSERT INTO messages (conversation_id, from_session, to_session, message, metadata, timestamp)
                 VALUES (?1, 'b', 'a', 'x', 'not json', '2030-01-01T00:00:00')",
                [&conv],
            )
            .unwrap();
        assert_eq!(f.bridge.last_response_at(&conv, Session::B).unwrap(), None);
        let sent = f
            .bridge
            .send(
                &conv,
                Session::B,
                &tb,
                "{}",
                Some(&crate::shard::response_metadata()),
            )
            .unwrap();
        assert_eq!(
            f.bridge.last_response_at(&conv, Session::B).unwrap(),
            Some(sent.timestamp)
        );
    }

    #[test]
    fn status_names() {
        for s in ["working", "waiting", "blocked", "complete"] {
            assert_eq!(s.parse::<SessionState>().unwrap().as_str(), s);
        }
        assert!("sleeping".parse::<SessionState>().is_err());
    }
}
