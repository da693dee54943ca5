//! Conversations: create, renew, verify a session token, list, show.

use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use serde_json::json;

use crate::error::{Error, Result};
use crate::{Bridge, Session, audit, clock, token};

/// A conversation just created: its id and both sessions' tokens.
#[derive(Clone, Serialize)]
pub struct NewConversation {
    /// `conv_` + 16 hex digits.
    pub conversation_id: String,
    /// Session `a`'s token (64 hex).
    pub session_a_token: String,
    /// Session `b`'s token (64 hex).
    pub session_b_token: String,
    /// When both tokens stop working, in the bridge's timestamp shape.
    pub expires_at: String,
}

impl std::fmt::Debug for NewConversation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewConversation")
            .field("conversation_id", &self.conversation_id)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// A conversation as listed: everything but the tokens.
#[derive(Debug, Clone, Serialize)]
pub struct ConversationInfo {
    /// Conversation id.
    pub id: String,
    /// Role of session `a`.
    pub session_a_role: String,
    /// Role of session `b`.
    pub session_b_role: String,
    /// Creation time.
    pub created_at: String,
    /// Expiry time.
    pub expires_at: String,
    /// True when `expires_at` has passed.
    pub expired: bool,
}

impl ConversationInfo {
    /// The role of `session`.
    pub fn role(&self, session: Session) -> &str {
        match session {
            Session::A => &self.session_a_role,
            Session::B => &self.session_b_role,
        }
    }
}

/// Roles are 1 to 100 characters (the Python server's rule).
pub(crate) fn check_roles(role_a: &str, role_b: &str) -> Result<()> {
    for role in [role_a, role_b] {
        if role.trim().is_empty() || role.chars().count() > 100 {
            return Err(Error::Invalid(format!(
                "a role must be 1 to 100 characters, got {role:?}"
            )));
        }
    }
    Ok(())
}

/// Which session `presented` is the token of (for `renew`, which takes either).
pub(crate) fn session_of_token(
    conversation: &str,
    presented: &str,
    ta: &str,
    tb: &str,
) -> Result<Session> {
    if token::tokens_equal(presented, ta) {
        Ok(Session::A)
    } else if token::tokens_equal(presented, tb) {
        Ok(Session::B)
    } else {
        Err(Error::InvalidToken {
            conversation: conversation.to_string(),
            session: "a or b".into(),
            hint: "; it is neither session's token: use one that `autopoll bridge create` printed (in AUTOPOLL_TOKEN)".into(),
        })
    }
}

pub(crate) fn is_expired(expires_at: &str) -> Result<bool> {
    Ok(clock::now() >= clock::parse(expires_at)?)
}

/// Why a presented token is not `session`'s, for the error message: the
/// other session's token, not a token's shape, or simply another one.
fn token_hint(presented: &str, session: Session, others: &str) -> String {
    let other = session.other();
    if token::tokens_equal(presented, others) {
        return format!(
            "; that is session {other}'s token: give session {session}'s token, or use --session {other}"
        );
    }
    let n = presented.chars().count();
    if n != 64
        || !presented
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return format!(
            "; a token is 64 lowercase hex characters and this one is {n} characters{}: check AUTOPOLL_TOKEN or --token",
            if presented.trim() != presented {
                " with spaces around it"
            } else {
                ""
            }
        );
    }
    format!(
        "; it is not this conversation's token for session {session}: use the one `autopoll bridge create` printed for session {session}, in AUTOPOLL_TOKEN"
    )
}

/// Check `token` against `session` of `conversation` and its expiry, on `conn`.
pub(crate) fn verify_on(
    conn: &Connection,
    conversation: &str,
    session: Session,
    presented: &str,
) -> Result<()> {
    let row: Option<(String, String, String)> = conn
        .prepare_cached(
            "SELECT session_a_token, session_b_token, expires_at FROM conversations WHERE id = ?1",
        )
        .and_then(|mut s| {
            s.query_row([conversation], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .optional()
        })
        .map_err(Error::Sqlite)?;
    check_token(conversation, session, presented, row)
}

/// The token check on a conversation's stored `(session_a_token,
/// session_b_token, expires_at)` row, whichever store it came from.
pub(crate) fn check_token(
    conversation: &str,
    session: Session,
    presented: &str,
    row: Option<(String, String, String)>,
) -> Result<()> {
    let Some((ta, tb, expires_at)) = row else {
        return Err(Error::NotFound {
            what: format!("conversation {conversation}"),
            hint: "; list conversations with `autopoll bridge status`".into(),
        });
    };
    let (stored, others) = match session {
        Session::A => (ta, tb),
        Session::B => (tb, ta),
    };
    if !token::tokens_equal(presented, &stored) {
        return Err(Error::InvalidToken {
            conversation: conversation.to_string(),
            session: session.to_string(),
            hint: token_hint(presented, session, &others),
        });
    }
    if is_expired(&expires_at)? {
        return Err(Error::Expired {
            conversation: conversation.to_string(),
            expires_at,
        });
    }
    Ok(())
}

fn info_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(ConversationInfo, String)> {
    let expires_at: String = r.get(4)?;
    Ok((
        ConversationInfo {
            id: r.get(0)?,
            session_a_role: r.get(1)?,
            session_b_role: r.get(2)?,
            created_at: r.get(3)?,
            expires_at: expires_at.clone(),
            expired: false,
        },
        expires_at,
    ))
}

fn finish(pair: (ConversationInfo, String)) -> Result<ConversationInfo> {
    let (mut info, exp) = pair;
    // An expiry nobody can read (a foreign writer's garbage) is shown as
    // expired, not as a failure of the whole listing; a token check on such
    // a conversation still fails with the parse error.
    info.expired = is_expired(&exp).unwrap_or(true);
    Ok(info)
}

impl Bridge {
    /// Create a conversation between two roles; tokens from the OS CSPRNG.
    pub fn create_conversation(
        &mut self,
        role_a: &str,
        role_b: &str,
        ttl: Duration,
    ) -> Result<NewConversation> {
        check_roles(role_a, role_b)?;
        let id = token::conversation_id()?;
        let ta = token::session_token()?;
        let tb = token::session_token()?;
        let created = clock::now();
        let expires_at = clock::format(clock::add(created, ttl));
        let (tx, map) = self.immediate()?;
        tx.execute(
            "INSERT INTO conversations
             (id, session_a_role, session_b_role, session_a_token, session_b_token, created_at, expires_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![id, role_a, role_b, ta, tb, clock::format(created), expires_at],
        )
        .map_err(&map)?;
        audit::write(
            &tx,
            Some(&id),
            None,
            audit::actions::CREATE_CONVERSATION,
            &json!({ "roles": [role_a, role_b] }),
        )
        .map_err(&map)?;
        tx.commit().map_err(&map)?;
        log::info!("event=conversation_created conversation={id} expires_at={expires_at}");
        Ok(NewConversation {
            conversation_id: id,
            session_a_token: ta,
            session_b_token: tb,
            expires_at,
        })
    }

    /// Check a session token: it must match in constant time, and the
    /// conversation must not have expired.
    pub fn verify(&self, conversation: &str, session: Session, token: &str) -> Result<()> {
        verify_on(&self.conn, conversation, session, token)
    }

    /// Push a conversation's expiry to now + `ttl`. Either session's token
    /// works, also after expiry (that is what renewing is for). Returns the new
    /// `expires_at`.
    pub fn renew(&mut self, conversation: &str, token: &str, ttl: Duration) -> Result<String> {
        let (tx, map) = self.immediate()?;
        let row: Option<(String, String)> = tx
            .query_row(
                "SELECT session_a_token, session_b_token FROM conversations WHERE id = ?1",
                [conversation],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(&map)?;
        let Some((ta, tb)) = row else {
            return Err(Error::not_found(format!("conversation {conversation}")));
        };
        let session = session_of_token(conversation, token, &ta, &tb)?;
        let expires_at = clock::format(clock::add(clock::now(), ttl));
        tx.execute(
            "UPDATE conversations SET expires_at = ?1 WHERE id = ?2",
            params![expires_at, conversation],
        )
        .map_err(&map)?;
        audit::write(
            &tx,
            Some(conversation),
            Some(session.as_str()),
            audit::actions::RENEW,
            &json!({ "expires_at": expires_at }),
        )
        .map_err(&map)?;
        tx.commit().map_err(&map)?;
        log::info!(
            "event=conversation_renewed conversation={conversation} expires_at={expires_at}"
        );
        Ok(expires_at)
    }

    /// All conversations, newest first, without tokens.
    pub fn list_conversations(&self) -> Result<Vec<ConversationInfo>> {
        let map = self.map();
        let mut stmt = self
            .conn
            .prepare(
                "SELECT id, session_a_role, session_b_role, created_at, expires_at
                 FROM conversations ORDER BY created_at DESC, id",
            )
            .map_err(&map)?;
        let rows = stmt
            .query_map([], info_from_row)
            .map_err(&map)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(&map)?;
        rows.into_iter().map(finish).collect()
    }

    /// One conversation, without tokens.
    pub fn conversation(&self, conversation: &str) -> Result<ConversationInfo> {
        let map = self.map();
        let row = self
            .conn
            .query_row(
                "SELECT id, session_a_role, session_b_role, created_at, expires_at
                 FROM conversations WHERE id = ?1",
                [conversation],
                info_from_row,
            )
            .optional()
            .map_err(&map)?;
        match row {
            Some(pair) => finish(pair),
            None => Err(Error::not_found(format!("conversation {conversation}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DEFAULT_TTL;
    use crate::testutil::Fixture;

    #[test]
    fn verify_accepts_right_token_and_rejects_wrong_ones() {
        let f = Fixture::new();
        let c = &f.conv;
        f.bridge
            .verify(f.id(), Session::A, &c.session_a_token)
            .unwrap();
        f.bridge
            .verify(f.id(), Session::B, &c.session_b_token)
            .unwrap();
        // a's token is not b's
        let e = f
            .bridge
            .verify(f.id(), Session::B, &c.session_a_token)
            .unwrap_err();
        assert!(matches!(e, Error::InvalidToken { .. }), "{e}");
        let e = f
            .bridge
            .verify(f.id(), Session::A, &"0".repeat(64))
            .unwrap_err();
        assert!(matches!(e, Error::InvalidToken { .. }), "{e}");
        let e = f
            .bridge
            .verify("conv_0000000000000000", Session::A, &c.session_a_token)
            .unwrap_err();
        assert!(matches!(e, Error::NotFound { .. }), "{e}");
    }

    #[test]
    fn expiry_then_renew() {
        let mut f = Fixture::new();
        let c = f
            .bridge
            .create_conversation("x", "y", Duration::ZERO)
            .unwrap();
        let e = f
            .bridge
            .verify(&c.conversation_id, Session::A, &c.session_a_token)
            .unwrap_err();
        assert!(matches!(e, Error::Expired { .. }), "{e}");
        assert!(e.to_string().contains("autopoll bridge renew"), "{e}");
        // A wrong token is told as wrong, not as expired.
        let e = f
            .bridge
            .verify(&c.conversation_id, Session::A, &c.session_b_token)
            .unwrap_err();
        assert!(matches!(e, Error::InvalidToken { .. }), "{e}");
        // Renew with b's token, after expiry.
        let e = f
            .bridge
            .renew(&c.conversation_id, &"f".repeat(64), DEFAULT_TTL);
        assert!(matches!(e, Err(Error::InvalidToken { .. })));
        let new_exp = f
            .bridge
            .renew(
                &c.conversation_id,
                &c.session_b_token,
                Duration::from_secs(60),
            )
            .unwrap();
        assert!(new_exp > c.expires_at);
        f.bridge
            .verify(&c.conversation_id, Session::A, &c.session_a_token)
            .unwrap();
        assert!(!f.bridge.conversation(&c.conversation_id).unwrap().expired);
    }

    #[test]
    fn list_and_show_hide_tokens() {
        let f = Fixture::new();
        let list = f.bridge.list_conversations().unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].id, f.conv.conversation_id);
        assert_eq!(list[0].role(Session::B), "shard");
        let shown = serde_json::to_string(&f.bridge.conversation(f.id()).unwrap()).unwrap();
        assert!(!shown.contains(&f.conv.session_a_token));
        assert!(matches!(
            f.bridge.conversation("conv_ffffffffffffffff"),
            Err(Error::NotFound { .. })
        ));
    }

    #[test]
    fn create_writes_python_shaped_row_and_audit() {
        let f = Fixture::new();
        let (created, expires): (String, String) = f
            .bridge
            .connection()
            .query_row(
                "SELECT created_at, expires_at FROM conversations WHERE id = ?1",
                [f.id()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        let span = clock::seconds_between(
            clock::parse(&created).unwrap(),
            clock::parse(&expires).unwrap(),
        );
        assert!((span - 3.0 * 3600.0).abs() < 1e-6, "{span}");
        let details: String = f
            .bridge
            .connection()
            .query_row(
                "SELECT details FROM audit_log WHERE action = 'create_conversation'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(details, r#"{"roles":["coordinator","shard"]}"#);
    }

    #[test]
    fn roles_are_checked() {
        let mut f = Fixture::new();
        assert!(matches!(
            f.bridge.create_conversation("", "b", DEFAULT_TTL),
            Err(Error::Invalid(_))
        ));
    }
}
