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
    /// Age of the oldest unread message whose timestamp can be read, seconds.
    pub oldest_unread_age_secs: Option<f64>,
    /// Unread messages of unknown age: their timestamp cannot be read, or
    /// lies in the future (a writer on local time, a wrong clock).
    pub unknown_age: u64,
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
    /// The host of the last heartbeat, where the store keeps it (PostgreSQL).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
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

/// A timestamp this far ahead of our clock is taken as wrong, not as skew
/// between two processes' reads of the same clock.
const FUTURE_SLACK_SECS: f64 = 1.0;

/// The age of the oldest of `stamps` that can be read and is not in the
/// future, and how many are of unknown age.
fn oldest_age(stamps: &[String], now: clock::Timestamp) -> (Option<f64>, u64) {
    let mut oldest: Option<f64> = None;
    let mut unknown = 0;
    for t in stamps {
        match clock::parse(t).map(|t| clock::seconds_between(t, now)) {
            Ok(age) if age >= -FUTURE_SLACK_SECS => {
                let age = age.max(0.0);
                oldest = Some(oldest.map_or(age, |o: f64| o.max(age)));
            }
            _ => unknown += 1,
        }
    }
    (oldest, unknown)
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
                // Every unread timestamp is parsed (the partial index holds
                // only unread rows): other writers' forms do not sort as
                // text, and one unreadable stamp must not fail the rest.
                let stamps: Vec<String> = self
                    .conn
                    .prepare_cached(
                        "SELECT timestamp FROM messages
                         WHERE conversation_id = ?1 AND to_session = ?2 AND read = 0",
                    )
                    .and_then(|mut st| {
                        st.query_map(params![c.id, s.as_str()], |r| {
                            Ok(crate::message::text_lossy(r.get_ref(0)?).0)
                        })?
                        .collect()
                    })
                    .map_err(&map)?;
                let unread = stamps.len() as u64;
                let (oldest_unread_age_secs, unknown_age) = oldest_age(&stamps, now);
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
                    unknown_age,
                    status: hb.as_ref().map(|h| h.status.clone()),
                    heartbeat_age_secs: hb.as_ref().and_then(|h| h.age_secs),
                    alive: hb.as_ref().is_some_and(|h| h.alive),
                    expires_at: c.expires_at.clone(),
                    expired: c.expired,
                    host: None,
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
        f.bridge.complete(&me, &[Answer::new(ids[0], "a")]).unwrap();
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
    fn unreadable_and_future_timestamps_are_of_unknown_age() {
        let now = clock::parse("2025-11-20T12:00:00").unwrap();
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let (age, unknown) = oldest_age(
            &s(&[
                "2025-11-20T11:59:00",
                "2025-11-20 11:58:00.5Z",
                "2025-11-20T13:57:00+02:00",
                "1763639820",
                "garbage",
                "2025-11-20T13:00:00",
            ]),
            now,
        );
        // 1763639820 is 2025-11-20T11:57:00Z, the oldest readable one.
        assert_eq!((age, unknown), (Some(180.0), 2));
        assert_eq!(oldest_age(&s(&["x"]), now), (None, 1));
        assert_eq!(oldest_age(&[], now), (None, 0));
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
        f.bridge.complete(&me, &[Answer::new(q3, "fine")]).unwrap();
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
