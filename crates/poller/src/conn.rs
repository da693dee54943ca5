//! Which file the poller's bridge connection is on, and what to do when the
//! path stops naming it.
//!
//! A SQLite connection follows the file it opened, not its path: after a
//! `mv` over the bridge, a restore from backup or an `rm`, an old connection
//! keeps reading and writing a file nobody else sees any more (and its
//! `-wal`/`-shm`, still at the old names, would be paired with the new file).
//! So the poller remembers the device and inode of the file it opened and
//! compares them with `stat(path)` on every wake of its loop (inotify, the
//! `data_version` timer, heartbeats: at least ten times a second).
//!
//! The rule for questions and answers across a switch: **an answer is only
//! ever written through the connection its question was claimed on, and only
//! while the path still names that connection's file.** The moment the path
//! names another file (or none), the old connection is closed; questions in
//! flight on it become orphans: their answers, when they come, are dropped
//! (logged `event=answer_dropped`), never written into the new file, whose
//! message ids mean other messages. Their claims stay in the old file with
//! their leases, so wherever that file turns up again (moved back, restored),
//! they are unread and claimable once the lease runs out. Nothing is marked
//! read without its answer, so nothing is lost; nothing is written twice.
//!
//! Reopening waits until the file at the path has kept the same inode, size
//! and modification time for [`SETTLE`] (a `cp` still writing is not opened
//! half-copied), then validates it like any open (a file that is not a
//! bridge, or lacks our conversation, is refused and waited out like a
//! missing one).

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// How long a reappeared file must stay unchanged before it is opened.
pub const SETTLE: Duration = Duration::from_millis(200);

/// After a failed reopen of an unchanged file, the next try.
pub const RETRY: Duration = Duration::from_secs(1);

/// A file's identity: device and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    /// `st_dev`.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
}

/// A file's identity plus what changes while it is being written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sig {
    /// Device and inode.
    pub id: FileId,
    size: u64,
    mtime_ns: i128,
}

/// What `stat(path)` says now.
#[derive(Debug)]
pub enum Seen {
    /// A file is there.
    File(Sig),
    /// Nothing is there (the file or its folder is gone).
    Missing(String),
}

/// `stat` the bridge path.
pub fn look(path: &Path) -> Seen {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Seen::File(Sig {
            id: FileId {
                dev: m.dev(),
                ino: m.ino(),
            },
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        }),
        Ok(_) => Seen::Missing("the path is not a regular file".into()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let folder = path
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .is_some_and(|d| !d.exists());
            Seen::Missing(if folder {
                "its folder is gone".into()
            } else {
                "the file is gone".into()
            })
        }
        Err(e) => Seen::Missing(format!("cannot stat it: {e}")),
    }
}

/// Why the poller has no connection, logged once per change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Why {
    /// Nothing at the path.
    Missing(String),
    /// A file is there, but it was refused (not a bridge, no such conversation, ...).
    Refused(String),
}

/// The time without a connection.
#[derive(Debug)]
pub struct Gone {
    /// Since when.
    pub since: Instant,
    /// The last reason logged.
    pub why: Option<Why>,
    /// A file seen at the path, and when it was first seen like that.
    candidate: Option<(Sig, Instant)>,
    /// The file last refused, and when to try it again even if unchanged.
    refused: Option<(Sig, Instant)>,
}

impl Gone {
    /// Gone since now.
    pub fn new() -> Gone {
        Gone {
            since: Instant::now(),
            why: None,
            candidate: None,
            refused: None,
        }
    }

    /// Note a new reason; true when it differs from the last one (log it).
    pub fn note(&mut self, why: Why) -> bool {
        if self.why.as_ref() == Some(&why) {
            return false;
        }
        self.why = Some(why);
        true
    }

    /// Given what is at the path now, whether to try opening it.
    pub fn ready(&mut self, seen: &Seen, now: Instant) -> bool {
        let Seen::File(sig) = seen else {
            self.candidate = None;
            return false;
        };
        if let Some((r, again)) = self.refused
            && r == *sig
            && now < again
        {
            return false;
        }
        match self.candidate {
            Some((c, at)) if c == *sig => now >= at + SETTLE,
            _ => {
                self.candidate = Some((*sig, now));
                false
            }
        }
    }

    /// Opening `sig` failed: try again when it changes, or after [`RETRY`].
    pub fn refused(&mut self, sig: Sig, now: Instant) {
        self.refused = Some((sig, now + RETRY));
    }
}

impl Default for Gone {
    fn default() -> Self {
        Gone::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn look_tells_a_file_from_a_missing_one_and_a_missing_folder() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("bridge.db");
        assert!(matches!(look(&db), Seen::Missing(w) if w == "the file is gone"));
        std::fs::write(&db, b"x").unwrap();
        let Seen::File(a) = look(&db) else {
            panic!("a file is there")
        };
        // mv over it: another inode.
        let other = dir.path().join("new.db");
        std::fs::write(&other, b"x").unwrap();
        std::fs::rename(&other, &db).unwrap();
        let Seen::File(b) = look(&db) else {
            panic!("a file is there")
        };
        assert_ne!(a.id, b.id);
        let gone = dir.path().join("sub").join("bridge.db");
        assert!(matches!(look(&gone), Seen::Missing(w) if w == "its folder is gone"));
    }

    #[test]
    fn a_file_is_opened_only_once_it_has_settled_and_a_refused_one_is_not_retried_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("bridge.db");
        let mut g = Gone::new();
        let t0 = Instant::now();
        assert!(!g.ready(&look(&db), t0));
        std::fs::write(&db, b"part").unwrap();
        let first = look(&db);
        assert!(!g.ready(&first, t0), "first sight: wait");
        assert!(!g.ready(&first, t0 + SETTLE / 2));
        // Still being written: the wait starts over.
        std::fs::write(&db, b"partly copied").unwrap();
        let grown = look(&db);
        assert!(!g.ready(&grown, t0 + SETTLE));
        assert!(g.ready(&grown, t0 + SETTLE * 2 + Duration::from_millis(1)));
        let Seen::File(sig) = grown else { panic!() };
        let t1 = t0 + SETTLE * 3;
        g.refused(sig, t1);
        assert!(!g.ready(&grown, t1 + RETRY / 2), "unchanged and refused");
        assert!(g.ready(&grown, t1 + RETRY));
        assert!(g.note(Why::Missing("x".into())));
        assert!(!g.note(Why::Missing("x".into())), "logged once");
        assert!(g.note(Why::Refused("y".into())));
    }
}
