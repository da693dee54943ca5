//! The loop's own writes, unheard: around each write transaction of the hot
//! path (a claim, an answer commit: [`crate::watch::Writing`]) the watch
//! thread's folder watch stops listening for `IN_MODIFY`, so the pages the
//! loop writes wake nobody.
//!
//! Each wake-up was dear on both sides: inside the writer's `pwrite` the
//! kernel wakes the thread blocked on the inotify descriptor (a cross-core
//! wake), and the watch thread then runs only to find the write was the
//! loop's own ([`crate::own`]); two of those per commit, two commits per
//! question. With the mask changed instead (one `inotify_add_watch` each
//! way) neither happens.
//!
//! Nothing anyone else writes may go unheard for it. While the loop holds
//! the WAL write lock nobody else can write the WAL, so what is not heard
//! is what another process writes just before the loop has the lock (its
//! `BEGIN IMMEDIATE` waiting out that writer) or just after the loop lets
//! it go and before the mask is back. So, with the header of the WAL index
//! read before the mask changes, after it is back the loop asks whether
//! another process holds the write lock, and reads the header again: the
//! watch is rung (as when it awaits the end of a write) unless nobody holds
//! the lock and the header is unchanged or moved by the loop's own commits
//! alone ([`crate::own::OwnCommits::explains`]). A writer that takes the
//! lock after that question writes with the mask back, and is heard.
//!
//! In use only while the watch thread watches the bridge itself in WAL
//! mode (not as a hub follower) and the loop's connection has a WAL index
//! to read; otherwise every write is heard, as before.

use std::ffi::CString;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use crate::own::OwnCommits;
use crate::shm::{Stamp, WalIndex};

/// The folder watch as the watch thread set it up.
#[derive(Debug)]
struct Folder {
    fd: RawFd,
    dir: CString,
    mask: u32,
    wd: i32,
}

#[derive(Default)]
struct State {
    /// The watch thread's folder watch, while it has one.
    folder: Option<Folder>,
    /// Whether the watch thread confirms commits from the WAL index itself.
    enabled: bool,
    /// The WAL index of the file the loop writes, and its commits.
    index: Option<(WalIndex, Arc<OwnCommits>)>,
}

/// Shared by the watch thread (its folder watch) and the loop (its writes).
#[derive(Default)]
pub struct Quiet {
    state: Mutex<State>,
}

impl std::fmt::Debug for Quiet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.lock();
        f.debug_struct("Quiet")
            .field("folder", &s.folder)
            .field("enabled", &s.enabled)
            .field("index", &s.index.is_some())
            .finish()
    }
}

/// `inotify_add_watch` on `dir` with `mask`: the watch descriptor, or -1.
fn add_watch(fd: RawFd, dir: &CString, mask: u32) -> i32 {
    // SAFETY: plain syscall with a NUL-terminated path.
    unsafe { libc::inotify_add_watch(fd, dir.as_ptr(), mask) }
}

impl Folder {
    /// Give the watch `mask`. False when the path is another folder now (a
    /// new watch was made there: removed again, not ours to keep) or the
    /// call failed.
    fn remask(&self, mask: u32) -> bool {
        let wd = add_watch(self.fd, &self.dir, mask);
        if wd >= 0 && wd != self.wd {
            // SAFETY: removing the watch just made on our descriptor.
            unsafe { libc::inotify_rm_watch(self.fd, wd) };
        }
        wd == self.wd
    }
}

impl Quiet {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The watch thread adds (or replaces) its watch of `dir` on the
    /// inotify descriptor `fd` with `mask`, here, so that the loop never
    /// puts back a mask older than this one. Returns the watch descriptor
    /// (-1 and errno set on failure).
    pub(crate) fn add(&self, fd: RawFd, dir: &CString, mask: u32) -> i32 {
        let mut s = self.lock();
        let wd = add_watch(fd, dir, mask);
        s.folder = (wd >= 0).then(|| Folder {
            fd,
            dir: dir.clone(),
            mask,
            wd,
        });
        wd
    }

    /// The watch thread has no folder watch (lost, or the thread is ending).
    pub(crate) fn forget_folder(&self) {
        self.lock().folder = None;
    }

    /// The watch thread watches the bridge itself and confirms commits from
    /// its WAL index (or no longer does).
    pub(crate) fn enable(&self, on: bool) {
        self.lock().enabled = on;
    }

    /// The loop's connection to the bridge: its WAL index (None: not in WAL
    /// mode) and the record of its commits.
    pub(crate) fn set_index(&self, index: Option<WalIndex>, own: Arc<OwnCommits>) {
        self.lock().index = index.map(|i| (i, own));
    }

    /// Before one of the loop's writes: the header now, then the folder's
    /// `IN_MODIFY` off. None when not in use (nothing was changed).
    pub(crate) fn hush(&self) -> Option<Stamp> {
        let mut s = self.lock();
        if !s.enabled {
            return None;
        }
        let before = match &s.index {
            Some((idx, _)) => idx.stamp(),
            None => return None,
        };
        if before == Stamp::Busy {
            return None;
        }
        let f = s.folder.as_ref()?;
        if f.remask(f.mask & !libc::IN_MODIFY) {
            return Some(before);
        }
        // The watch thread sees to another folder at the path.
        s.folder = None;
        None
    }

    /// After the write that [`Quiet::hush`] began: the mask back, then
    /// whether the watch must look (see the module doc).
    pub(crate) fn restore(&self, before: &Stamp) -> bool {
        let mut s = self.lock();
        // None: the watch thread re-made or lost its watch meanwhile.
        let back = s.folder.as_ref().is_some_and(|f| f.remask(f.mask));
        if !back {
            s.folder = None;
            return true;
        }
        let Some((idx, own)) = &s.index else {
            return true;
        };
        // The lock first, then the header: a writer that let the lock go
        // before the question has its commit in the header by then.
        if idx.writer_active() != Some(false) {
            return true;
        }
        let now = idx.stamp();
        !(now == *before || own.explains(before, &now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::watch::{WriteFlag, Writing};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    /// An inotify descriptor watching `dir` for writes, through `q`.
    fn watch(q: &Quiet, dir: &std::path::Path) -> (OwnedFd, i32) {
        // SAFETY: plain syscall; the fd is owned below.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let c = CString::new(dir.to_str().unwrap()).unwrap();
        let wd = q.add(fd.as_raw_fd(), &c, libc::IN_MODIFY | libc::IN_CREATE);
        assert!(wd >= 0);
        (fd, wd)
    }

    /// Whether events are waiting on `fd` (and read them).
    fn heard(fd: &OwnedFd) -> bool {
        let mut buf = [0u8; 4096];
        let mut any = false;
        // SAFETY: reading into a valid buffer from our non-blocking fd.
        while unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {
            any = true;
        }
        any
    }

    /// Whether the watch was rung (and take the ring).
    fn rung(w: &WriteFlag) -> bool {
        let mut fds = [autopoll_protocol::fifo::pollfd(w.done_fd(), libc::POLLIN)];
        let r = autopoll_protocol::fifo::poll(&mut fds, Some(std::time::Instant::now())).unwrap();
        w.drain_done();
        r > 0
    }

    #[test]
    fn the_loops_own_writes_are_unheard_and_anyone_elses_make_it_look() {
        let dir = tempfile::tempdir().unwrap();
        let (db, mut conn) = crate::shm::wal_file(dir.path());
        let other = rusqlite::Connection::open(&db).unwrap();
        let writing = Arc::new(WriteFlag::default());
        let own = Arc::new(OwnCommits::default());
        crate::own::install(&mut conn, &db, writing.clone(), own.clone());
        let q = &writing.quiet;
        let (fd, _) = watch(q, dir.path());
        let insert = |c: &rusqlite::Connection| c.execute("INSERT INTO t VALUES (1)", []).unwrap();
        let write = |with: &[&rusqlite::Connection]| {
            let _w = Writing::start(&writing);
            for c in with {
                insert(c);
            }
        };
        heard(&fd);

        // Not enabled (the watch thread does not confirm commits itself):
        // heard as before, and nobody is rung.
        write(&[&conn]);
        assert!(heard(&fd));
        assert!(!rung(&writing));

        q.enable(true);
        // The loop's own commits: not heard, nothing to look at.
        write(&[&conn]);
        write(&[&conn, &conn]);
        assert!(!heard(&fd), "the loop's own pages woke the watch");
        assert!(!rung(&writing));
        // No commit at all (a failed write): nothing to look at either.
        write(&[]);
        assert!(!rung(&writing));
        // Another connection's commit while the mask is off (as one just
        // before the loop has the lock, or just after it let it go, would
        // be): unheard, so the watch is told to look.
        write(&[&other]);
        assert!(!heard(&fd));
        assert!(rung(&writing), "another's commit went unnoticed");
        // Before the loop's own, or after it.
        write(&[&other, &conn]);
        assert!(rung(&writing));
        write(&[&conn, &other]);
        assert!(rung(&writing));
        // With the mask back, writes are heard again.
        insert(&other);
        assert!(heard(&fd));
    }

    #[test]
    fn a_folder_replaced_at_the_path_is_left_to_the_watch_thread() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("d");
        std::fs::create_dir(&dir).unwrap();
        let (db, _conn) = crate::shm::wal_file(&dir);
        let q = Quiet::default();
        let (fd, _) = watch(&q, &dir);
        q.set_index(WalIndex::open(&db), Arc::new(OwnCommits::default()));
        q.enable(true);
        std::fs::rename(&dir, base.path().join("old")).unwrap();
        std::fs::create_dir(&dir).unwrap();
        // The path is another folder now: the mask is not touched, no
        // watch of the new folder is left behind.
        assert_eq!(q.hush(), None);
        assert!(q.lock().folder.is_none());
        heard(&fd); // the removed watch's IN_IGNORED
        std::fs::write(dir.join("x"), b"x").unwrap();
        assert!(!heard(&fd), "a watch of the new folder was left");
    }
}
