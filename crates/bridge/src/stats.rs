//! Queue statistics per conversation and session, for `autopoll bridge status`.

use rusqlite::params;
use serde::Serialize;

use crate::error::Result;
use crate::status::read_status;
use crate::{Bridge, Session, clock};

/// The state of one session's inbox.
#[derive(Debug, Clone, Serialize)]
pub struct SessionStats {
    /// Conversation id.
    pub conversation_id: String,
    /// `a` or `b`.
    pub session: String,
    /// The session's role.
    pub role: String,
    /// Messages to it not yet read.
    pub unread: u64,
    /// Of those, held under a live claim.
    pub claimed: u64,
    /// Questions answered through claims.
    pub answered: u64,
    /// Questions dead-lettered (error response after too many attempts).
    pub dead_lettered: u64,
    /// Non-questions marked read by a consumer.
    pub skipped: u64,
    /// Age of the oldest unread message, seconds.
    pub oldest_unread_age_secs: Option<f64>,
    /// The session's status, if it sent a heartbeat.
    pub status: Option<String>,
    /// Seconds since its last heartbeat.
    pub heartbeat_age_secs: Option<f64>,
    /// Heartbeat under 120 s old.
    pub alive: bool,
    /// The conversation's expiry.
    pub expires_at: String,
    /// Whether it has expired.
    pub expired: bool,
}

impl Bridge {
    /// Statistics for both sessions of one conversation, or of all.
    pub fn stats(&self, conversation: Option<&str>) -> Result<Vec<SessionStats>> {
        let convs = match conversation {
            Some(id) => vec![self.conversation(id)?],
            None => self.list_conversations()?,
        };
        let map = self.map();
        let now = clock::now();
        let now_ms = clock::unix_ms();
        let mut out = Vec::with_capacity(convs.len() * 2);
        for c in convs {
            for s in [Session::A, Session::B] {
                let (unread, oldest): (u64, Option<String>) = self
                    .conn
                    .prepare_cached(
                        "SELECT count(*), MIN(timestamp) FROM messages
                         WHERE conversation_id = ?1 AND to_session = ?2 AND read = 0",
                    )
                    .and_then(|mut st| {
                        st.query_row(params![c.id, s.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))
                    })
                    .map_err(&map)?;
                let claimed: u64 = self
                    .conn
                    .prepare_cached(
                        "SELECT count(*) FROM autopoll_claims c JOIN messages m ON m.id = c.message_id
                         WHERE c.conversation_id = ?1 AND c.to_session = ?2 AND c.owner IS NOT NULL
                           AND c.lease_until_ms > ?3 AND m.read = 0",
                    )
                    .and_then(|mut st| st.query_row(params![c.id, s.as_str(), now_ms], |r| r.get(0)))
                    .map_err(&map)?;
                let mut answered = 0;
                let mut dead_lettered = 0;
                let mut skipped = 0;
                {
                    let mut st = self
                        .conn
                        .prepare_cached(
                            "SELECT outcome, count(*) FROM autopoll_outcomes
                             WHERE conversation_id = ?1 AND to_session = ?2 GROUP BY outcome",
                        )
                        .map_err(&map)?;
                    let rows = st
                        .query_map(params![c.id, s.as_str()], |r| {
                            Ok((r.get::<_, String>(0)?, r.get::<_, u64>(1)?))
                        })
                        .map_err(&map)?;
                    for row in rows {
                        let (outcome, n) = row.map_err(&map)?;
                        match outcome.as_str() {
                            "answered" => answered = n,
                            "dead_letter" => dead_lettered = n,
                            _ => skipped = n,
                        }
                    }
                }
                let oldest_unread_age_secs = oldest
                    .map(|t| clock::parse(&t).map(|t| clock::seconds_between(t, now)))
                    .transpose()?;
                let hb = read_status(&self.conn, &c.id, s.as_str())?;
                out.push(SessionStats {
                    conversation_id: c.id.clone(),
                    session: s.to_string(),
                    role: c.role(s).to_string(),
                    unread,
                    claimed,
                    answered,
                    dead_lettered,
                    skipped,
                    oldest_unread_age_secs,
                    status: hb.as_ref().map(|h| h.status.clone()),
                    heartbeat_age_secs: hb.as_ref().map(|h| h.age_secs),
                    alive: hb.as_ref().is_some_and(|h| h.alive),
                    expires_at: c.expires_at.clone(),
                    expired: c.expired,
                });
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::Fixture;
    use crate::{Answer, ClaimOptions, Claimer, SessionState};

    #[test]
    fn stats_count_each_state() {
        let mut f = Fixture::new();
        let conv = f.id().to_string();
        let ids: Vec<i64> = (0..5).map(|i| f.send_a(&format!("q{i}"))).collect();
        let me = Claimer::new("s").unwrap();
        let o = ClaimOptions {
            limit: 3,
            ..ClaimOptions::default()
        };
        f.bridge.claim(&me, &conv, Session::B, &o).unwrap();
        f.bridge
            .complete(
                &me,
                &[Answer {
                    message_id: ids[0],
                    text: "a".into(),
                }],
            )
            .unwrap();
        f.bridge.dead_letter(&me, ids[1], "bad").unwrap();
        let tb = f.conv.session_b_token.clone();
        f.bridge
            .heartbeat(&conv, Session::B, &tb, SessionState::Working)
            .unwrap();
        let st = f.bridge.stats(Some(&conv)).unwrap();
        assert_eq!(st.len(), 2);
        let b = st.iter().find(|s| s.session == "b").unwrap();
        assert_eq!(
            (b.unread, b.claimed, b.answered, b.dead_lettered, b.skipped),
            (3, 1, 1, 1, 0)
        );
        assert_eq!(b.role, "shard");
        assert!(b.oldest_unread_age_secs.is_some());
        assert_eq!(b.status.as_deref(), Some("working"));
        assert!(b.alive && !b.expired);
        let a = st.iter().find(|s| s.session == "a").unwrap();
        // a has the answer and the dead letter's error response unread.
        assert_eq!((a.unread, a.claimed, a.answered), (2, 0, 0));
        assert!(!a.alive);
        assert_eq!(f.bridge.stats(None).unwrap().len(), 2);
    }
}
