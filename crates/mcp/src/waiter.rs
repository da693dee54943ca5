//! The `ask_shard` waiter: one `bridge-watch` thread (the poller's inotify
//! [`Watch`] on the bridge's folder) bumps a generation counter on every
//! commit to the file; a waiting `ask_shard` sleeps on a condition variable
//! until the generation moves, its deadline passes, it is cancelled, or a
//! slow safety-net period ([`SAFETY_NET`]) passes (for file systems where
//! inotify misses writes). Each wake is confirmed with `PRAGMA
//! data_version` before the unread messages are looked at, and followed by
//! a few quick looks ([`SETTLE_FIRST`]: a commit's WAL write is seen before
//! the commit is visible), so an idle wait costs no queries and no CPU.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use autopoll_bridge::shard::Response;
use autopoll_bridge::{Message, Session, Store, Target};
use autopoll_poller::watch::{Notice, Watch};
use autopoll_protocol::Shutdown;

/// With a working watch, how often a waiter looks at the bridge anyway.
pub const SAFETY_NET: Duration = Duration::from_secs(2);

/// Without a watch (inotify unavailable), how often a waiter looks.
pub const NO_WATCH_PERIOD: Duration = Duration::from_millis(100);

/// Messages looked at per query while scanning for the response.
const PEEK_BATCH: usize = 256;

/// Wakes waiters when the bridge file changes.
#[derive(Debug)]
pub struct Hub {
    generation: Mutex<u64>,
    changed: Condvar,
    watched: AtomicBool,
}

impl Default for Hub {
    fn default() -> Hub {
        Hub::new()
    }
}

impl Hub {
    fn new() -> Hub {
        Hub {
            generation: Mutex::new(0),
            changed: Condvar::new(),
            watched: AtomicBool::new(false),
        }
    }

    /// The current generation.
    pub fn generation(&self) -> u64 {
        *self.generation.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wake every waiter (a change, a cancellation, shutdown).
    pub fn poke(&self) {
        let mut g = self.generation.lock().unwrap_or_else(|p| p.into_inner());
        *g = g.wrapping_add(1);
        self.changed.notify_all();
    }

    /// Wait until the generation differs from `seen` or `until` passes
    /// (bounded by the safety-net period). Returns the generation then.
    pub fn wait(&self, seen: u64, until: Instant) -> u64 {
        let period = if self.watched.load(Ordering::Relaxed) {
            SAFETY_NET
        } else {
            NO_WATCH_PERIOD
        };
        let until = until.min(Instant::now() + period);
        let mut g = self.generation.lock().unwrap_or_else(|p| p.into_inner());
        while *g == seen {
            let now = Instant::now();
            if now >= until {
                break;
            }
            g = self
                .changed
                .wait_timeout(g, until - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        *g
    }
}

/// The watch thread and its hub; stopping it is triggering `stop`.
pub struct Watcher {
    /// The hub waiters wait on.
    pub hub: Arc<Hub>,
    stop: Shutdown,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watcher {
    /// Start watching the bridge: inotify on the folder of a SQLite file
    /// (when inotify cannot watch it, the waiters fall back to looking
    /// every [`NO_WATCH_PERIOD`], logged once), or `LISTEN` on PostgreSQL
    /// (a `pg-listen` thread that reconnects with backoff).
    pub fn start(target: &Target) -> std::io::Result<Watcher> {
        let hub = Arc::new(Hub::new());
        let stop = Shutdown::new()?;
        let db = match target {
            Target::File(p) => p.clone(),
            Target::Postgres(url) => {
                hub.watched.store(true, Ordering::Relaxed);
                let (h, s) = (hub.clone(), stop.clone());
                let thread = autopoll_bridge::pg::listen::spawn(
                    "pg-listen",
                    url.clone(),
                    None,
                    move |_| {
                        h.poke();
                        true
                    },
                    move || s.is_triggered(),
                )?;
                return Ok(Watcher {
                    hub,
                    stop,
                    thread: Some(thread),
                });
            }
        };
        let db = db.as_path();
        let thread = match Watch::new(db) {
            Ok(watch) => {
                hub.watched.store(true, Ordering::Relaxed);
                let (h, fd) = (hub.clone(), stop.fd());
                Some(
                    std::thread::Builder::new()
                        .name("bridge-watch".into())
                        .spawn(move || {
                            watch.run_with(fd, |n| {
                                h.poke();
                                n == Notice::Changed
                            })
                        })?,
                )
            }
            Err(e) => {
                log::warn!(
                    "event=watch_unavailable db={}: {e}; ask_shard looks every {} ms instead",
                    db.display(),
                    NO_WATCH_PERIOD.as_millis()
                );
                None
            }
        };
        Ok(Watcher { hub, stop, thread })
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.trigger();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How a wait ended.
#[derive(Debug)]
pub enum Waited {
    /// The response arrived (and is now marked read).
    Answered {
        /// Its message row.
        message: Box<Message>,
        /// The parsed response.
        response: Box<Response>,
        /// Whether this wait marked it read (false: another reader, a
        /// `check_messages`, had taken it between our look and our mark).
        newly_read: bool,
    },
    /// The deadline passed.
    TimedOut,
    /// The client cancelled the call.
    Cancelled,
}

/// What to wait for.
pub struct Wait<'a> {
    /// The conversation.
    pub conversation: &'a str,
    /// The asking session (the response is addressed to it).
    pub session: Session,
    /// Its token (to mark the response read).
    pub token: &'a str,
    /// The query's id.
    pub query_id: &'a str,
    /// The query's message id: the response has a higher one.
    pub after_id: i64,
    /// When to give up.
    pub deadline: Instant,
    /// Set by `notifications/cancelled` (then the hub is poked).
    pub cancelled: &'a AtomicBool,
}

/// Wait for the response to `w.query_id`; mark only it read.
pub fn wait_for_response(
    bridge: &mut dyn Store,
    hub: &Hub,
    w: &Wait<'_>,
) -> autopoll_bridge::Result<Waited> {
    let mut after = w.after_id;
    let mut seen_version = None;
    let mut settle: Option<Duration> = None;
    loop {
        // The generation first: a commit after this point moves it, so the
        // wait below cannot sleep through a change we did not look at.
        let generation = hub.generation();
        if w.cancelled.load(Ordering::SeqCst) {
            return Ok(Waited::Cancelled);
        }
        // None (PostgreSQL, or a busy SQLite file): look every turn; turns
        // come from the watch's wake-ups and the safety net.
        let version = match bridge.data_version() {
            Ok(v) => v,
            Err(e) if e.is_transient() => None,
            Err(e) => return Err(e),
        };
        if version.is_none() || version != seen_version {
            // On PostgreSQL ids are taken at insert and rows show at commit,
            // out of id order across writers: a response with a lower id can
            // appear after a higher one was seen. Look from the query every
            // time (an asker's unread set is small); SQLite's single writer
            // keeps ids in commit order, so it goes on from the last seen.
            if bridge.kind() == autopoll_bridge::StoreKind::Postgres {
                after = w.after_id;
            }
            match look(bridge, w, &mut after)? {
                Looked::Found(found) => return Ok(found),
                // Seen only once looked at whole: a look that failed for a
                // moment is done again on the next turn, not skipped until
                // the next commit.
                Looked::Nothing => seen_version = version,
                Looked::Retry => settle = Some(SETTLE_FIRST),
            }
        }
        let now = Instant::now();
        if now >= w.deadline {
            return Ok(Waited::TimedOut);
        }
        let until = settle.map_or(w.deadline, |d| (now + d).min(w.deadline));
        settle = if hub.wait(generation, until) != generation {
            Some(SETTLE_FIRST)
        } else {
            settle.map(|d| d * 2).filter(|d| *d <= SETTLE_LAST)
        };
    }
}

/// After a wake, look again this soon, then at doubling intervals up to
/// [`SETTLE_LAST`]: inotify reports a commit's write to the WAL, and the
/// commit becomes visible (`data_version` moves) only when the writer
/// updates the WAL index in `-shm` a moment later, through shared memory,
/// which inotify does not see. Without these looks a wake that came just
/// before the commit was visible would leave the answer to the safety net.
pub const SETTLE_FIRST: Duration = Duration::from_millis(1);

/// The last settle interval (1 + 2 + ... + 64 ms: seven looks in 127 ms).
pub const SETTLE_LAST: Duration = Duration::from_millis(64);

/// What one look found.
enum Looked {
    /// The response (marked read).
    Found(Waited),
    /// Not there yet.
    Nothing,
    /// The bridge was busy: look again soon.
    Retry,
}

/// Scan the unread messages above `after` for the response; mark it read.
fn look(bridge: &mut dyn Store, w: &Wait<'_>, after: &mut i64) -> autopoll_bridge::Result<Looked> {
    loop {
        let msgs = match bridge.peek_unread(w.conversation, w.session, *after, PEEK_BATCH) {
            Ok(m) => m,
            Err(e) if e.is_transient() => return Ok(Looked::Retry),
            Err(e) => return Err(e),
        };
        let full = msgs.len() == PEEK_BATCH;
        for m in msgs {
            *after = (*after).max(m.id);
            let Some(r) = Response::parse(&m.message) else {
                continue;
            };
            if r.query_id != w.query_id {
                continue;
            }
            let n = bridge.mark_read(w.conversation, w.session, w.token, &[m.id])?;
            return Ok(Looked::Found(Waited::Answered {
                message: Box::new(m),
                response: Box::new(r),
                newly_read: n == 1,
            }));
        }
        if !full {
            return Ok(Looked::Nothing);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poke_wakes_a_waiter_before_its_deadline() {
        let hub = Arc::new(Hub::new());
        hub.watched.store(true, Ordering::Relaxed);
        let g = hub.generation();
        let h = hub.clone();
        let t = std::thread::spawn(move || h.wait(g, Instant::now() + Duration::from_secs(600)));
        // The waiter may not be waiting yet: poke until it returns.
        while !t.is_finished() {
            hub.poke();
            std::thread::yield_now();
        }
        assert_ne!(t.join().unwrap(), g);
    }

    #[test]
    fn a_wait_ends_at_its_deadline() {
        let hub = Hub::new();
        let g = hub.generation();
        assert_eq!(hub.wait(g, Instant::now() + Duration::from_millis(5)), g);
    }
}
