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

/// A dead-lettered question whose error response the asker has not read yet.
#[derive(Debug, Clone, Serialize)]
pub struct UnseenDeadLetter {
    /// The question's message id.
    pub message_id: i64,
    /// Its query_id (from the error response).
    pub query_id: String,
    /// The error response's message id (unread).
    pub response_id: i64,
    /// When it was dead-lettered.
    pub completed_at: String,
    /// Attempts it took.
    pub attempts: u32,
    /// Why (the last error).
    pub detail: Option<String>,
}

impl Bridge {
    /// Dead letters of questions to `session` of `conversation` whose error
    /// response (to the other session) is still unread, oldest first.
    pub fn unseen_dead_letters(
        &self,
        conversation: &str,
        session: Session,
    ) -> Result<Vec<UnseenDeadLetter>> {
        let map = self.map();
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT o.message_id, o.response_id, o.completed_at, o.attempts, o.detail, r.message
                 FROM autopoll_outcomes o JOIN messages r ON r.id = o.response_id
                 WHERE o.conversation_id = ?1 AND o.to_session = ?2
                   AND o.outcome = 'dead_letter' AND r.read = 0
                 ORDER BY o.message_id",
            )
            .map_err(&map)?;
        let rows = st
            .query_map(params![conversation, session.as_str()], |r| {
                let text: String = r.get(5)?;
                let query_id = crate::shard::Response::parse(&text)
                    .map(|resp| resp.query_id)
                    .unwrap_or_default();
                Ok(UnseenDeadLetter {
                    message_id: r.get(0)?,
                    response_id: r.get(1)?,
                    completed_at: r.get(2)?,
                    attempts: r.get(3)?,
                    detail: r.get(4)?,
                    query_id,
                })
            })
            .map_err(&map)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(&map)
    }

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
    use crate::{Answer, ClaimOptions, Claimer, SessionState, shard};

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

    #[test]
    fn unseen_dead_letters_are_those_whose_error_response_is_unread() {
        let mut f = Fixture::new();
        let conv = f.id().to_string();
        let q1 = f.send_a(&shard::query_text("q-1", "one?"));
        let q2 = f.send_a(&shard::query_text("q-2", "two?"));
        let q3 = f.send_a(&shard::query_text("q-3", "three?"));
        let me = Claimer::new("s").unwrap();
        f.bridge
            .claim(&me, &conv, Session::B, &ClaimOptions::default())
            .unwrap();
        assert!(
            f.bridge
                .unseen_dead_letters(&conv, Session::B)
                .unwrap()
                .is_empty()
        );
        f.bridge.dead_letter(&me, q1, "too hard").unwrap();
        f.bridge.dead_letter(&me, q2, "crashed").unwrap();
        f.bridge
            .complete(
                &me,
                &[Answer {
                    message_id: q3,
                    text: "fine".into(),
                }],
            )
            .unwrap();
        let unseen = f.bridge.unseen_dead_letters(&conv, Session::B).unwrap();
        let ids: Vec<(&str, i64)> = unseen
            .iter()
            .map(|d| (d.query_id.as_str(), d.message_id))
            .collect();
        assert_eq!(ids, [("q-1", q1), ("q-2", q2)]);
        assert_eq!(unseen[0].detail.as_deref(), Some("too hard"));
        // Session a reads its messages: the dead letters are seen.
        let ta = f.conv.session_a_token.clone();
        f.bridge.read_unread(&conv, Session::A, &ta).unwrap();
        assert!(
            f.bridge
                .unseen_dead_letters(&conv, Session::B)
                .unwrap()
                .is_empty()
        );
        assert!(
            f.bridge
                .unseen_dead_letters(&conv, Session::A)
                .unwrap()
                .is_empty()
        );
    }
}
