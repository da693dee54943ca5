//! Wake-ups from PostgreSQL: `LISTEN autopoll_messages` on a connection of
//! its own. The trigger of [`super::schema`] sends `CONVERSATION SESSION`
//! on every new message, so a listener is woken only for the queues it
//! names (no herd across conversations, unlike inotify on a SQLite file).
//!
//! Every wait is bounded ([`Listener::wait`] takes a timeout); a lost
//! connection is an error the caller answers by reconnecting with backoff
//! and then looking for work once, since notifications sent while nobody
//! listened are gone.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use postgres::Client;
use postgres::fallible_iterator::FallibleIterator;

use super::{STATEMENT_TIMEOUT, config, pg_error, session};
use crate::Session;
use crate::error::Result;

/// The channel the trigger notifies.
pub const CHANNEL: &str = "autopoll_messages";

/// A connection that listens for new messages to some queues.
pub struct Listener {
    client: Client,
    wanted: HashSet<String>,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("queues", &self.wanted.len())
            .finish()
    }
}

impl Listener {
    /// Connect to `url` and listen for messages to `session` of each of
    /// `conversations`.
    pub fn connect(url: &str, conversations: &[&str], session: Session) -> Result<Listener> {
        let cfg = config(url)?;
        let mut client = session_client(&cfg)?;
        client
            .batch_execute(&format!("LISTEN {CHANNEL}"))
            .map_err(|e| pg_error("cannot LISTEN for new messages", e))?;
        let mut l = Listener {
            client,
            wanted: HashSet::new(),
        };
        l.set_queues(conversations, session);
        Ok(l)
    }

    /// Listen for these queues from now on (a tokens file was re-read).
    pub fn set_queues(&mut self, conversations: &[&str], session: Session) {
        self.wanted = conversations
            .iter()
            .map(|c| format!("{c} {}", session.as_str()))
            .collect();
    }

    /// Wait up to `timeout` for a new message to one of our queues.
    /// Returns the conversations woken (empty: the time passed). Others'
    /// notifications are read and dropped on the way.
    pub fn wait(&mut self, timeout: Duration) -> Result<Vec<String>> {
        let deadline = Instant::now() + timeout;
        let mut woken = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut notes = self.client.notifications();
            let mut it = notes.timeout_iter(if woken.is_empty() {
                left
            } else {
                Duration::ZERO
            });
            let next = it
                .next()
                .map_err(|e| pg_error("lost the LISTEN connection", e))?;
            match next {
                Some(n) => {
                    if self.wanted.contains(n.payload())
                        && let Some((conv, _)) = n.payload().rsplit_once(' ')
                        && !woken.iter().any(|w| w == conv)
                    {
                        woken.push(conv.to_string());
                    }
                }
                None => return Ok(woken),
            }
            if woken.is_empty() && Instant::now() >= deadline {
                return Ok(woken);
            }
        }
    }

    /// True while the connection is up (checked with a bounded round trip).
    pub fn is_alive(&mut self) -> bool {
        self.client.is_valid(Duration::from_secs(5)).is_ok()
    }
}

fn session_client(cfg: &postgres::Config) -> Result<Client> {
    session(cfg, STATEMENT_TIMEOUT)
}
