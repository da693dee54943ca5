//! The loop's own commits as the WAL index shows them, so the watch thread
//! can tell a header moved by them alone from one moved by someone else.
//!
//! The watch confirms every wake by reading the WAL index header
//! ([`crate::shm`]); when it moved, it looks for new work with a read
//! transaction (and, since the header moved, SQLite reads every page it
//! needs again). After the loop's own claim or answer commit there is never
//! any: that was two read transactions a question for nothing, on the core
//! the loop and the server share.
//!
//! Two SQLite hooks on the loop's connection record each of its commits
//! on the hot path (claims and answer commits, while
//! [`WriteFlag::active`]): the commit hook, which runs while the write lock
//! is held and before any frame is written, reads the header (its frame
//! count `mxFrame` and the WAL's salt); the WAL hook, right after the
//! commit, gets the frame count the commit left. Nobody else can commit
//! while the lock is held, so the commit took the WAL from the first count
//! to the second. Back-to-back commits of the loop with nobody else's in
//! between (the second starting where the first ended) make one run.
//!
//! A move of the header from `a` to `b` is the loop's alone when both have
//! the run's salt, `a`'s count is within the run and `b`'s is its end
//! ([`OwnCommits::explains`]). Anything else (a commit by another process
//! before, between or after, a WAL started over, a release or a dead
//! letter outside the hot path, a header the hooks could not read) is
//! looked at as before. A wrong "ours" could only come from two headers
//! with the same salt and counts, which another WAL cannot have (its salt
//! is new); a wrong "not ours" costs one look.
//!
//! The WAL hook replaces SQLite's automatic checkpoint (which is a WAL hook
//! too): it checkpoints, as that one did, once the WAL holds
//! [`crate::checkpoint::SAFETY_PAGES`] frames.

use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::shm::{Stamp, WalIndex};
use crate::watch::WriteFlag;

/// Where in a header copy SQLite keeps `mxFrame` (a native-endian `u32`).
const MX_FRAME: usize = 16;
/// Where it keeps the WAL's two salts (8 bytes).
const SALT: std::ops::Range<usize> = 32..40;

/// The WAL's salt and its frame count.
type Frames = ([u8; 8], u32);

/// The WAL's salt and frame count a header shows.
fn frames(h: &[u8]) -> Frames {
    let mut salt = [0u8; 8];
    salt.copy_from_slice(&h[SALT]);
    let mx = u32::from_ne_bytes([
        h[MX_FRAME],
        h[MX_FRAME + 1],
        h[MX_FRAME + 2],
        h[MX_FRAME + 3],
    ]);
    (salt, mx)
}

/// Back-to-back commits of the loop: the WAL went from `from` frames to
/// `to` frames under `salt`, and nobody else committed in between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    salt: [u8; 8],
    from: u32,
    to: u32,
}

/// The loop's latest run of commits, shared with the watch thread.
#[derive(Debug, Default)]
pub struct OwnCommits {
    run: Mutex<Option<Run>>,
}

impl OwnCommits {
    /// Whether the header moving from `before` to `now` is the loop's own
    /// commits' doing alone.
    pub fn explains(&self, before: &Stamp, now: &Stamp) -> bool {
        let (Stamp::Header(a), Stamp::Header(b)) = (before, now) else {
            return false;
        };
        let Some(run) = self.run.lock().ok().and_then(|r| *r) else {
            return false;
        };
        let ((sa, ma), (sb, mb)) = (frames(a), frames(b));
        sa == run.salt && sb == run.salt && run.from <= ma && ma <= run.to && mb == run.to
    }

    /// A commit of the loop took the WAL from `start` (salt and frames) to
    /// `end` frames; `None`: a commit that cannot be vouched for.
    fn record(&self, commit: Option<(Frames, u32)>) {
        let Ok(mut run) = self.run.lock() else {
            return;
        };
        *run = match commit {
            // A WAL that started over counts from zero under a new salt:
            // the start read before it says nothing about the end.
            Some(((salt, from), to)) if to > from => match *run {
                Some(r) if r.salt == salt && r.to == from => Some(Run { to, ..r }),
                _ => Some(Run { salt, from, to }),
            },
            _ => None,
        };
    }
}

/// Install the two hooks on `conn` (the loop's connection to `db`), with
/// `writing` telling the hot path's commits apart and
/// [`crate::checkpoint::SAFETY_PAGES`] as the automatic checkpoint's
/// threshold. Without a WAL index to read (not in WAL mode) nothing is
/// installed and the automatic checkpoint stays as the caller set it.
pub fn install(
    conn: &mut rusqlite::Connection,
    db: &Path,
    writing: Arc<WriteFlag>,
    own: Arc<OwnCommits>,
) {
    // The loop's writes, unheard by the folder watch, are checked against
    // this index and these commits afterwards (crate::quiet).
    writing.quiet.set_index(WalIndex::open(db), own.clone());
    let Some(idx) = WalIndex::open(db) else {
        return;
    };
    let start: Arc<Mutex<Option<Frames>>> = Arc::default();
    let at_commit = start.clone();
    let hooked = conn.commit_hook(Some(move || {
        // The write lock is held: nobody else can move the header now.
        let seen = match idx.stamp() {
            Stamp::Header(h) if writing.active() => Some(frames(&h)),
            _ => None,
        };
        if let Ok(mut s) = at_commit.lock() {
            *s = seen;
        }
        false
    }));
    if let Err(e) = hooked {
        log::debug!("commit_hook: {e}");
        return;
    }
    let result = conn.wal_hook(Some(move |wal: &mut rusqlite::hooks::Wal, pages| {
        let begun = start.lock().ok().and_then(|mut s| s.take());
        own.record(begun.map(|b| (b, u32::try_from(pages).unwrap_or(0))));
        if i64::from(pages) >= crate::checkpoint::SAFETY_PAGES {
            // As SQLite's own automatic checkpoint: passive, errors ignored.
            let _ = wal.checkpoint();
        }
        Ok(())
    }));
    if let Err(e) = result {
        log::debug!("wal_hook: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(salt: u8, mx: u32) -> Stamp {
        let mut h = [0u8; 48];
        h[12] = 1;
        h[MX_FRAME..MX_FRAME + 4].copy_from_slice(&mx.to_ne_bytes());
        h[SALT].fill(salt);
        Stamp::Header(h)
    }

    #[test]
    fn a_run_of_the_loops_commits_explains_a_move_within_it_and_nothing_else() {
        let own = OwnCommits::default();
        assert!(!own.explains(&header(1, 10), &header(1, 13)), "no run yet");
        own.record(Some((([1; 8], 10), 13)));
        assert!(own.explains(&header(1, 10), &header(1, 13)));
        // The next commit starts where that one ended: one run.
        own.record(Some((([1; 8], 13), 20)));
        assert!(own.explains(&header(1, 10), &header(1, 20)));
        assert!(own.explains(&header(1, 13), &header(1, 20)));
        assert!(!own.explains(&header(1, 10), &header(1, 13)), "not its end");
        assert!(
            !own.explains(&header(1, 9), &header(1, 20)),
            "someone before"
        );
        assert!(
            !own.explains(&header(1, 13), &header(1, 21)),
            "someone after"
        );
        assert!(!own.explains(&header(2, 13), &header(2, 20)), "another WAL");
        assert!(!own.explains(&Stamp::Busy, &header(1, 20)));
        // Someone else committed in between: a new run starts.
        own.record(Some((([1; 8], 25), 30)));
        assert!(!own.explains(&header(1, 13), &header(1, 30)));
        assert!(own.explains(&header(1, 25), &header(1, 30)));
        // The WAL started over during the commit, or a commit nobody
        // vouched for: no run.
        own.record(Some((([1; 8], 30), 4)));
        assert!(!own.explains(&header(1, 25), &header(1, 30)));
        own.record(Some((([1; 8], 4), 9)));
        own.record(None);
        assert!(!own.explains(&header(1, 4), &header(1, 9)));
    }

    #[test]
    fn the_hooks_record_the_hot_paths_commits_and_not_others_or_anyone_elses() {
        let dir = tempfile::tempdir().unwrap();
        let (db, mut conn) = crate::shm::wal_file(dir.path());
        let other = rusqlite::Connection::open(&db).unwrap();
        let idx = WalIndex::open(&db).unwrap();
        let (writing, own) = (
            Arc::new(WriteFlag::default()),
            Arc::new(OwnCommits::default()),
        );
        install(&mut conn, &db, writing.clone(), own.clone());
        let insert = |c: &rusqlite::Connection| c.execute("INSERT INTO t VALUES (1)", []).unwrap();

        let mut before = idx.stamp();
        for _ in 0..3 {
            let _w = crate::watch::Writing::start(&writing);
            insert(&conn);
        }
        let now = idx.stamp();
        assert!(own.explains(&before, &now), "three commits of the hot path");
        before = now;
        insert(&other);
        let now = idx.stamp();
        assert!(!own.explains(&before, &now), "another connection's commit");
        before = now;
        {
            let _w = crate::watch::Writing::start(&writing);
            insert(&conn);
        }
        let now = idx.stamp();
        assert!(own.explains(&before, &now));
        before = now;
        insert(&conn);
        let now = idx.stamp();
        assert!(
            !own.explains(&before, &now),
            "a commit outside the hot path"
        );
    }
}
