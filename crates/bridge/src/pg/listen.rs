//! Wake-ups from PostgreSQL: `LISTEN autopoll_messages` on a connection of
//! its own. The trigger of [`super::schema`] sends `CONVERSATION SESSION`
//! on every new message, so a listener with a [`Queues`] filter is woken
//! only for the queues it serves (no herd across conversations, unlike
//! inotify on a SQLite file).
//!
//! Every wait is bounded ([`Listener::wait`] takes a timeout). [`spawn`]
//! runs a listener in a named thread that reconnects with backoff when the
//! connection is lost (the server restarted, the network went away) and
//! wakes its owner once after every (re)connect, since notifications sent
//! while nobody listened are gone: the owner then looks for work itself.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use postgres::Client;
use postgres::fallible_iterator::FallibleIterator;

use super::{STATEMENT_TIMEOUT, config, pg_error, session};
use crate::Session;
use crate::error::Result;

/// The channel the trigger notifies.
pub const CHANNEL: &str = "autopoll_messages";

/// The queues a listener wakes for, shared with its owner so a re-read
/// tokens file changes them in place. `None` in [`Listener::connect`]:
/// every queue.
#[derive(Debug, Clone, Default)]
pub struct Queues(Arc<Mutex<HashSet<String>>>);

impl Queues {
    /// Wake for messages to `session` of each of `conversations` (only).
    pub fn set(&self, conversations: &[&str], session: Session) {
        let mut q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *q = conversations
            .iter()
            .map(|c| format!("{c} {}", session.as_str()))
            .collect();
    }

    fn has(&self, payload: &str) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(payload)
    }
}

/// A connection that listens for new messages.
pub struct Listener {
    client: Client,
    queues: Option<Queues>,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("filtered", &self.queues.is_some())
            .finish()
    }
}

impl Listener {
    /// Connect to `url` and listen for new messages to `queues` (`None`:
    /// to every queue).
    pub fn connect(url: &str, queues: Option<Queues>) -> Result<Listener> {
        let cfg = config(url)?;
        let mut client = session(&cfg, STATEMENT_TIMEOUT)?;
        client
            .batch_execute(&format!("LISTEN {CHANNEL}"))
            .map_err(|e| pg_error("cannot LISTEN for new messages", e))?;
        Ok(Listener { client, queues })
    }

    /// Wait up to `timeout` for a new message to one of our queues.
    /// Returns the conversations woken (empty: the time passed). Others'
    /// notifications are read and dropped on the way.
    pub fn wait(&mut self, timeout: Duration) -> Result<Vec<String>> {
        let deadline = Instant::now() + timeout;
        let mut woken: Vec<String> = Vec::new();
        let take = |payload: &str, woken: &mut Vec<String>| {
            let wanted = self.queues.as_ref().is_none_or(|q| q.has(payload));
            if wanted
                && let Some((conv, _)) = payload.rsplit_once(' ')
                && !woken.iter().any(|w| w == conv)
            {
                woken.push(conv.to_string());
            }
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut notes = self.client.notifications();
            let first = notes
                .timeout_iter(left)
                .next()
                .map_err(|e| pg_error("lost the LISTEN connection", e))?;
            let Some(n) = first else {
                return Ok(woken);
            };
            take(n.payload(), &mut woken);
            // What else has already arrived, without waiting (a zero
            // timeout would cost a timer tick, a millisecond).
            let mut more = notes.iter();
            while let Some(n) = more
                .next()
                .map_err(|e| pg_error("lost the LISTEN connection", e))?
            {
                take(n.payload(), &mut woken);
            }
            if !woken.is_empty() || Instant::now() >= deadline {
                return Ok(woken);
            }
        }
    }
}

/// First and longest pause between reconnects.
pub const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));

/// Run a listener in a thread named `name`: `wake(conversations)` for each
/// batch of notifications to our queues, and `wake(vec![])` after every
/// connect (look for work: notifications sent meanwhile are lost). Ends
/// when `stopped()` is true (checked at least every 200 ms) or `wake`
/// returns false.
pub fn spawn(
    name: &str,
    url: String,
    queues: Option<Queues>,
    mut wake: impl FnMut(Vec<String>) -> bool + Send + 'static,
    stopped: impl Fn() -> bool + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let mut pause = BACKOFF.0;
            let mut down_logged = false;
            while !stopped() {
                let mut l = match Listener::connect(&url, queues.clone()) {
                    Ok(l) => l,
                    Err(e) => {
                        if !down_logged {
                            log::warn!("event=pg_listen_down: {e}; retrying with backoff");
                            down_logged = true;
                        }
                        sleep_unless(pause, &stopped);
                        pause = (pause * 2).min(BACKOFF.1);
                        continue;
                    }
                };
                if down_logged {
                    log::info!("event=pg_listen_up");
                    down_logged = false;
                }
                pause = BACKOFF.0;
                if !wake(Vec::new()) {
                    return;
                }
                while !stopped() {
                    match l.wait(Duration::from_millis(200)) {
                        Ok(w) if w.is_empty() => {}
                        Ok(w) => {
                            if !wake(w) {
                                return;
                            }
                        }
                        Err(e) => {
                            log::warn!("event=pg_listen_lost: {e}; reconnecting");
                            down_logged = true;
                            break;
                        }
                    }
                }
            }
        })
}

fn sleep_unless(d: Duration, stopped: &impl Fn() -> bool) {
    let until = Instant::now() + d;
    while !stopped() {
        let now = Instant::now();
        if now >= until {
            return;
        }
        std::thread::sleep((until - now).min(Duration::from_millis(50)));
    }
}
