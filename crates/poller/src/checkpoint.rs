//! The `checkpoint` thread: copies the WAL back into the bridge file after
//! the poller's commits, on a connection of its own, so the main loop's
//! commits do not pay for it.
//!
//! SQLite's automatic checkpoint runs inside the commit that crosses 1,000
//! WAL pages: in a backlog drain it was about a tenth of the main thread
//! (copying pages into the file and its `fsync`), and the main thread is
//! the one that limits the drain. So the poller's own connection checkpoints
//! automatically only past [`SAFETY_PAGES`] (a safety net, should this
//! thread fall behind or fail), and after its claims and answer commits
//! pokes this thread ([`Checkpointer::committed`]): after each, or while
//! the thread has a look due by itself anyway, after every
//! [`POKE_EVERY`]th (a poke is a cross-core wake-up, which cost the loop
//! about 20 us of a sequential pickup each time). The thread reads
//! how many WAL frames are not yet copied back ([`crate::shm`], one `pread`)
//! and runs a `PASSIVE` checkpoint when [`BATCH_FRAMES`] are waiting (at
//! most every [`PACE`]), or [`QUIET`] after a poke with fewer waiting. A
//! checkpoint after every commit, as this thread first did, was one per
//! question with a poller per conversation: 64 pollers asked in turn made
//! hundreds a second, each with its `fsync`, and doubled the pickup. A
//! passive checkpoint takes no lock a writer or reader waits for: it copies
//! what no reader still needs, and the next commit starts the WAL over once
//! all of it is copied.
//!
//! The thread opens only the file the main loop has open, and lets go of it
//! as soon as the loop closes its connection or the path names another file
//! ([`crate::watch::FileGate`]): SQLite finds the `-wal` and `-shm` by name,
//! and a connection on the old file beside one on the new would share them.
//! The loop opens a new file only once this thread holds no other. A thread
//! that cannot open or checkpoint says so once and keeps trying at the next
//! poke; the safety net keeps the WAL bounded meanwhile.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};

use crate::conn::{self, FileId};
use crate::shm::WalIndex;
use crate::watch::FileGate;

/// At most one checkpoint per this long while commits go on.
pub const PACE: Duration = Duration::from_millis(100);

/// Frames waiting that make a checkpoint due at once (SQLite's own
/// automatic checkpoint starts at 1,000 pages).
pub const BATCH_FRAMES: u32 = 1_000;

/// With fewer frames waiting, how long after a poke they are copied (once
/// per this long while commits go on; none when another process's
/// checkpoint copied them meanwhile).
pub const QUIET: Duration = Duration::from_secs(1);

/// With a file held and nothing to do, how often the thread looks at the
/// gate itself (the loop pokes it whenever the gate moves).
const GATE_SAFETY: Duration = Duration::from_secs(5);

/// The poller's own connection still checkpoints automatically past this
/// many WAL pages (SQLite's default is 1,000).
pub const SAFETY_PAGES: i64 = 10_000;

/// While the thread has a look due by itself ([`QUIET`]), only every this
/// many commits pokes it: enough to copy a backlog past [`BATCH_FRAMES`]
/// soon after it forms (a commit writes a few frames a question).
pub const POKE_EVERY: u32 = 16;

/// The main loop's handle on the checkpoint thread.
pub struct Checkpointer {
    poke: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
    /// Set by the thread while it has a look due by itself.
    armed: Arc<AtomicBool>,
    /// Commits not poked for since the last poke.
    unpoked: AtomicU32,
}

impl Checkpointer {
    /// Start the thread for the bridge file at `path`, following `gate`.
    pub fn start(path: &Path, gate: Arc<FileGate>) -> std::io::Result<Checkpointer> {
        let (tx, rx) = crossbeam_channel::bounded::<()>(1);
        let path = path.to_path_buf();
        let armed = Arc::new(AtomicBool::new(false));
        let flag = armed.clone();
        let thread = std::thread::Builder::new()
            .name("checkpoint".into())
            .spawn(move || run(&rx, &path, &gate, &flag))?;
        Ok(Checkpointer {
            poke: Some(tx),
            thread: Some(thread),
            armed,
            unpoked: AtomicU32::new(0),
        })
    }

    /// The loop committed: look soon (or, while the thread has a look due
    /// anyway, at every [`POKE_EVERY`]th commit). Never blocks.
    pub fn committed(&self) {
        if self.armed.load(Relaxed) && self.unpoked.fetch_add(1, Relaxed) + 1 < POKE_EVERY {
            return;
        }
        self.unpoked.store(0, Relaxed);
        self.poke_now();
    }

    /// The loop closed its connection or opened another file: the thread
    /// looks at the gate at once. Never blocks.
    pub fn gate_moved(&self) {
        self.poke_now();
    }

    fn poke_now(&self) {
        if let Some(tx) = &self.poke
            && let Err(TrySendError::Disconnected(())) = tx.try_send(())
        {
            log::debug!("the checkpoint thread is gone");
        }
    }

    /// Stop the thread and wait for it (a checkpoint in progress is
    /// bounded by its busy timeout).
    pub fn stop(mut self) {
        self.poke = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// This thread's connection and the file it is on.
struct Held {
    conn: rusqlite::Connection,
    id: FileId,
    /// The file's WAL index, once there is one: how many frames wait.
    wal: Option<WalIndex>,
}

impl Held {
    /// WAL frames not yet copied back (None: cannot tell).
    fn backlog(&mut self, path: &Path) -> Option<u32> {
        if self.wal.is_none() {
            self.wal = WalIndex::open(path);
        }
        self.wal.as_ref()?.backlog()
    }
}

/// Keep `held` only on the file the loop has open and the path names; open
/// it when allowed. Whether a connection is there to use.
fn gated(path: &Path, gate: &FileGate, held: &mut Option<Held>) -> bool {
    let at_path = match conn::look(path) {
        conn::Seen::File(sig) => Some(sig.id),
        conn::Seen::Missing(_) => None,
    };
    let mut g = gate.lock();
    let ok = at_path.is_some() && g.allowed == at_path;
    if !ok || held.as_ref().is_some_and(|h| Some(h.id) != at_path) {
        // Closed under the lock: the loop opens no other file meanwhile.
        *held = None;
        g.checkpointer = None;
        return false;
    }
    let Some(id) = at_path else {
        return false;
    };
    if held.is_none() {
        // Read-write but never create: the file is the loop's, and checked.
        let opened = rusqlite::Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .and_then(|c| {
            c.busy_timeout(Duration::from_millis(100))?;
            Ok(c)
        });
        match opened {
            Ok(c) => {
                *held = Some(Held {
                    conn: c,
                    id,
                    wal: None,
                });
                g.checkpointer = Some(id);
            }
            Err(e) => {
                log::debug!("checkpoint thread: cannot open {}: {e}", path.display());
                return false;
            }
        }
    }
    true
}

fn run(rx: &Receiver<()>, path: &Path, gate: &FileGate, armed: &AtomicBool) {
    let mut held: Option<Held> = None;
    let mut last: Option<Instant> = None;
    let mut failing: Option<String> = None;
    // A few frames wait: copy them then (QUIET).
    let mut due: Option<Instant> = None;
    loop {
        // Block until poked or due; with a file held, look at the gate now
        // and then too (the loop pokes when it closes or opens another
        // file, this is the safety net).
        let wait = match (due, held.is_some()) {
            (Some(t), _) => t.saturating_duration_since(Instant::now()),
            (None, true) => GATE_SAFETY,
            (None, false) => Duration::from_secs(3600),
        };
        // With a look due by itself, most pokes can wait (POKE_EVERY).
        armed.store(due.is_some(), Relaxed);
        let poked = match rx.recv_timeout(wait) {
            Ok(()) => true,
            Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let quiet_over = due.is_some_and(|t| Instant::now() >= t);
        if !poked && !quiet_over {
            if held.is_some() {
                gated(path, gate, &mut held);
            }
            continue;
        }
        // Pokes that came meanwhile are this look's too.
        while rx.try_recv().is_ok() {}
        if !gated(path, gate, &mut held) {
            due = None;
            continue;
        }
        let Some(h) = held.as_mut() else {
            continue;
        };
        match h.backlog(path) {
            Some(0) => {
                // Copied already (by another process's checkpoint).
                due = None;
                continue;
            }
            Some(n) if n < BATCH_FRAMES && !quiet_over => {
                due.get_or_insert_with(|| Instant::now() + QUIET);
                continue;
            }
            _ => {}
        }
        due = None;
        if let Some(t) = last {
            let left = (t + PACE).saturating_duration_since(Instant::now());
            // The gate may have moved while we slept: look again, right
            // before the checkpoint, as when there is no sleep.
            if !left.is_zero() {
                std::thread::sleep(left);
                if !gated(path, gate, &mut held) {
                    continue;
                }
            }
        }
        let Some(h) = held.as_ref() else {
            continue;
        };
        last = Some(Instant::now());
        let done = h.conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
            ))
        });
        match done {
            Ok((_busy, log_frames, copied)) => {
                log::trace!("checkpoint: {copied} of {log_frames} WAL frames copied");
                if failing.take().is_some() {
                    log::info!("event=checkpoint_recovered path={}", path.display());
                }
            }
            Err(e) => {
                let msg = e.to_string();
                if failing.as_deref() != Some(msg.as_str()) {
                    log::warn!(
                        "event=checkpoint_failed path={} reason={msg:?}: the poller's own commits checkpoint past {SAFETY_PAGES} WAL pages meanwhile",
                        path.display()
                    );
                    failing = Some(msg);
                }
                // Start over with a fresh connection at the next poke.
                held = None;
                gate.lock().checkpointer = None;
            }
        }
    }
    drop(held);
    gate.lock().checkpointer = None;
}
