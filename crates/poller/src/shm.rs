//! A look at the bridge's WAL index without SQLite: the header at the start
//! of the `-shm` file, read with one `pread`. SQLite rewrites that header on
//! every commit (by any process), so comparing it with the last copy seen
//! tells whether something was committed: one system call, no read
//! transaction, no lock. The watch thread uses it to tell a commit from a
//! page written in the middle of one (and from a checkpoint), which it used
//! to ask `PRAGMA data_version` for, with a `stat`, a read transaction and
//! its `fcntl` locks on each look; an idle poller does such a look several
//! times for every commit by others.
//!
//! The layout is SQLite's documented WAL-index format
//! (<https://www.sqlite.org/walformat.html>): two copies of a 48-byte
//! header, the writer updating the second first and the first last; a reader
//! takes the header only when both copies agree. A header that is being
//! written reads as [`Stamp::Busy`] and is looked at again a moment later.
//! `pread` sees the same page cache as SQLite's shared mapping of the file,
//! and, unlike a mapping of our own, cannot fault when another process
//! truncates the file (it reads short instead: `Busy`).
//!
//! Whether another process is in the middle of a commit is told by SQLite's
//! WAL write lock: a POSIX record lock on byte 120 of the same file
//! (`WAL_WRITE_LOCK` after the 120 bytes of `UNIX_SHM_BASE`), held from a
//! write transaction's start to its end, so its frames are written while it
//! is held and the header is rewritten before it is let go
//! ([`WalIndex::writer_active`]).
//!
//! The file is opened while a SQLite connection of this process has the same
//! bridge open, and closed with it (`Confirm` in [`crate::watch`]), so it is
//! the WAL index of the file that connection reads. Without a `-shm` file (a
//! bridge not in WAL mode, or a writer in exclusive locking mode) the caller
//! falls back to `PRAGMA data_version`.

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// The bytes of one header copy.
const HEADER: usize = 48;

/// Where SQLite's unix VFS locks the WAL for writing in the `-shm` file:
/// `UNIX_SHM_BASE` (`(22 + SQLITE_SHM_NLOCK) * 4`) plus `WAL_WRITE_LOCK` (0).
const WRITE_LOCK_BYTE: libc::off_t = 120;

/// What a look at the header saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stamp {
    /// A consistent header (both copies equal, initialised).
    Header([u8; HEADER]),
    /// Being written right now, not initialised, or unreadable: look again.
    Busy,
}

/// A bridge's `-shm` file, open for reading its header.
pub struct WalIndex {
    file: std::fs::File,
}

impl WalIndex {
    /// Open the WAL index of `db` (`db` + `-shm`). `None` when there is no
    /// such file or it does not hold a header yet.
    pub fn open(db: &Path) -> Option<WalIndex> {
        let mut name = db.as_os_str().to_os_string();
        name.push("-shm");
        let file = std::fs::File::open(&name).ok()?;
        let w = WalIndex { file };
        matches!(w.stamp(), Stamp::Header(_)).then_some(w)
    }

    /// The WAL frames not yet copied back into the bridge file: the
    /// header's `mxFrame` (offset 16) less the checkpoint's `nBackfill`
    /// (offset 96, just after the two header copies), both native-endian
    /// `u32`s. None while the header is being written or unreadable.
    pub fn backlog(&self) -> Option<u32> {
        let mut b = [0u8; 2 * HEADER + 4];
        match self.file.read_at(&mut b, 0) {
            Ok(n) if n == b.len() => {}
            _ => return None,
        }
        if !consistent(&b[..2 * HEADER]) {
            return None;
        }
        let word = |o: usize| u32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        Some(word(16).saturating_sub(word(2 * HEADER)))
    }

    /// Whether a connection of another process holds the WAL write lock
    /// now: it is in a write transaction, and its commit (if it makes one)
    /// has not shown in the header yet. Locks of this process are not seen
    /// (POSIX record locks do not conflict with their own process's).
    /// None when the lock cannot be asked about.
    pub fn writer_active(&self) -> Option<bool> {
        // SAFETY: a zeroed flock is a valid value of the plain C struct.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = libc::F_WRLCK as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        fl.l_start = WRITE_LOCK_BYTE;
        fl.l_len = 1;
        // SAFETY: F_GETLK on our own open descriptor, with a valid flock.
        let r = unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_GETLK, &mut fl) };
        (r == 0).then_some(fl.l_type != libc::F_UNLCK as libc::c_short)
    }

    /// Read the header now.
    pub fn stamp(&self) -> Stamp {
        let mut both = [0u8; 2 * HEADER];
        match self.file.read_at(&mut both, 0) {
            Ok(n) if n == both.len() => {}
            _ => return Stamp::Busy,
        }
        if !consistent(&both) {
            return Stamp::Busy;
        }
        let mut h = [0u8; HEADER];
        h.copy_from_slice(&both[..HEADER]);
        Stamp::Header(h)
    }
}

/// Whether the two header copies in `both` agree and say the index is
/// initialised (isInit, the byte at offset 12): a header not being written.
fn consistent(both: &[u8]) -> bool {
    let (a, b) = both.split_at(HEADER);
    a == b && a[12] != 0
}

/// For tests: a fresh WAL-mode file `b.db` in `dir` with a table `t (x)`,
/// and its connection.
#[cfg(test)]
pub(crate) fn wal_file(dir: &Path) -> (std::path::PathBuf, rusqlite::Connection) {
    let db = dir.join("b.db");
    let w = rusqlite::Connection::open(&db).unwrap();
    w.pragma_update(None, "journal_mode", "WAL").unwrap();
    w.execute_batch("CREATE TABLE t (x INTEGER)").unwrap();
    (db, w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_moves_on_a_commit_by_another_connection_and_not_on_a_read() {
        let dir = tempfile::tempdir().unwrap();
        let (db, w) = wal_file(dir.path());
        w.execute("INSERT INTO t VALUES (1)", []).unwrap();
        let r =
            rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .unwrap();
        let n: i64 = r
            .query_row("SELECT count(*) FROM t", [], |x| x.get(0))
            .unwrap();
        assert_eq!(n, 1);
        let idx = WalIndex::open(&db).expect("a WAL bridge has a -shm file");
        let before = idx.stamp();
        assert!(matches!(before, Stamp::Header(_)), "{before:?}");
        let _: i64 = r
            .query_row("SELECT count(*) FROM t", [], |x| x.get(0))
            .unwrap();
        assert_eq!(idx.stamp(), before, "a read changes nothing");
        w.execute("INSERT INTO t VALUES (2)", []).unwrap();
        let after = idx.stamp();
        assert!(matches!(after, Stamp::Header(_)));
        assert_ne!(after, before, "a commit rewrites the header");
        w.execute("INSERT INTO t VALUES (3)", []).unwrap();
        assert_ne!(idx.stamp(), after, "and every commit does");
    }

    #[test]
    fn the_backlog_counts_the_frames_a_checkpoint_has_not_copied() {
        let dir = tempfile::tempdir().unwrap();
        let (db, w) = wal_file(dir.path());
        w.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        let idx = WalIndex::open(&db).unwrap();
        let first = idx.backlog().unwrap();
        assert!(first > 0, "the CREATE is in the WAL");
        for i in 0..5 {
            w.execute("INSERT INTO t VALUES (?1)", [i]).unwrap();
        }
        let more = idx.backlog().unwrap();
        assert!(more >= first + 5, "{first} then {more}");
        let (_, log, copied): (i64, i64, i64) = w
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap();
        assert_eq!((log, copied), (i64::from(more), i64::from(more)));
        assert_eq!(idx.backlog(), Some(0), "all copied");
    }

    /// Run by [`another_process_in_a_write_transaction_is_seen_and_ours_is_not`]
    /// as a child: a write transaction on `AUTOPOLL_TEST_HOLD` until stdin
    /// closes, then its commit.
    #[test]
    #[ignore = "a helper process of another test"]
    fn hold_a_write_transaction() {
        let Some(db) = std::env::var_os("AUTOPOLL_TEST_HOLD") else {
            return;
        };
        let mut c = rusqlite::Connection::open(db).unwrap();
        let tx = c
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .unwrap();
        tx.execute("INSERT INTO t VALUES (42)", []).unwrap();
        println!("holding");
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut std::io::stdin(), &mut rest);
        tx.commit().unwrap();
    }

    #[test]
    fn another_process_in_a_write_transaction_is_seen_and_ours_is_not() {
        use std::io::BufRead;
        let dir = tempfile::tempdir().unwrap();
        let (db, mut w) = wal_file(dir.path());
        let idx = WalIndex::open(&db).unwrap();
        assert_eq!(idx.writer_active(), Some(false), "nobody writes");
        {
            let tx = w
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .unwrap();
            tx.execute("INSERT INTO t VALUES (1)", []).unwrap();
            assert_eq!(
                idx.writer_active(),
                Some(false),
                "this process's own write lock does not count"
            );
            tx.commit().unwrap();
        }
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "shm::tests::hold_a_write_transaction",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("AUTOPOLL_TEST_HOLD", &db)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        while !line.contains("holding") {
            line.clear();
            assert!(
                out.read_line(&mut line).unwrap() > 0,
                "the helper ended before holding its transaction"
            );
        }
        let before = idx.stamp();
        assert_eq!(idx.writer_active(), Some(true), "the helper holds the lock");
        assert_eq!(idx.stamp(), before, "and has not committed");
        drop(child.stdin.take());
        assert!(child.wait().unwrap().success());
        assert_eq!(idx.writer_active(), Some(false), "let go at its commit");
        assert_ne!(idx.stamp(), before, "which the header shows");
    }

    #[test]
    fn no_shm_file_means_no_mapping() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("rollback.db");
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute_batch("CREATE TABLE t (x INTEGER);").unwrap();
        assert!(WalIndex::open(&db).is_none());
    }
}
