//! One server per name: an `flock(2)` on `<dir>/lock`, held for the
//! server's life and released by the kernel however the process ends, so a
//! server killed with -9 never blocks its successor.
//!
//! Neither `lock` nor `pid` is ever reached through a symlink: the lock is
//! opened with `O_NOFOLLOW` (a symlink there is refused with a message
//! saying so), and the pid file is written to a fresh temporary file
//! (`O_EXCL | O_NOFOLLOW`) renamed over `pid`, which replaces a planted
//! symlink instead of writing to its target.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The held lock; dropping it releases it.
#[derive(Debug)]
pub struct ServerLock {
    file: File,
    path: PathBuf,
}

/// Why the lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another live server holds it.
    #[error("a server named `{name}` is already running{}; stop it first or choose another --name", pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    Held {
        /// Server name.
        name: String,
        /// Its pid, from the pid file, when readable.
        pid: Option<u32>,
    },
    /// An OS error.
    #[error("lock {}: {source}", path.display())]
    Io {
        /// The lock file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

impl ServerLock {
    /// Take the lock at `path` without waiting. `pid_file` is read only to
    /// name the holder in the error.
    pub fn acquire(path: &Path, pid_file: &Path, name: &str) -> Result<ServerLock, LockError> {
        let io = |source| LockError::Io {
            path: path.to_path_buf(),
            source,
        };
        // A previous server may unlink the lock file as we open it; retry
        // until the inode we locked is the one at the path.
        for _ in 0..10 {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
                .open(path)
                .map_err(|e| {
                    if e.raw_os_error() == Some(libc::ELOOP) {
                        io(io::Error::other(
                            "is a symlink; refusing to follow it (remove it, then start again)",
                        ))
                    } else {
                        io(e)
                    }
                })?;
            // SAFETY: flock on a descriptor we own.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc != 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                    let pid = read_pid(pid_file);
                    return Err(LockError::Held {
                        name: name.to_string(),
                        pid,
                    });
                }
                return Err(io(e));
            }
            let held = file.metadata().map_err(io)?;
            match std::fs::metadata(path) {
                Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => {
                    return Ok(ServerLock {
                        file,
                        path: path.to_path_buf(),
                    });
                }
                _ => continue,
            }
        }
        Err(io(io::Error::other("the lock file kept changing under us")))
    }

    /// Record our pid in the lock file too (handy for `lsof`-less debugging).
    pub fn write_pid(&mut self) -> io::Result<()> {
        self.file.set_len(0)?;
        writeln!(self.file, "{}", std::process::id())
    }

    /// Unlink the lock file, then release the lock (clean shutdown).
    pub fn remove(self) {
        let _ = std::fs::remove_file(&self.path);
        drop(self.file);
    }
}

/// The pid in `path`, when it is a readable regular file (never followed
/// through a symlink).
fn read_pid(path: &Path) -> Option<u32> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    if !f.metadata().ok()?.is_file() {
        return None;
    }
    let mut s = String::new();
    io::Read::read_to_string(&mut io::Read::take(&mut f, 64), &mut s).ok()?;
    s.trim().parse().ok()
}

/// Write our pid to `path` without following a symlink there: a fresh
/// temporary file next to it, renamed over it.
pub fn write_pid_file(path: &Path) -> io::Result<()> {
    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}",
        path.file_name()
            .map_or("pid".into(), |n| n.to_string_lossy()),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp);
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        log::warn!(
            "event=pid_symlink_replaced path={}: a symlink was planted there; replacing it, not following it",
            path.display()
        );
    }
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(&tmp)?;
        writeln!(f, "{}", std::process::id())?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_symlink_at_pid_is_replaced_and_one_at_lock_refused() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("target");
        std::fs::write(&target, "precious\n").unwrap();
        let pid = d.path().join("pid");
        std::os::unix::fs::symlink(&target, &pid).unwrap();
        assert_eq!(read_pid(&pid), None);
        write_pid_file(&pid).unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious\n");
        assert!(
            !std::fs::symlink_metadata(&pid)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(read_pid(&pid), Some(std::process::id()));
        let lock = d.path().join("lock");
        std::os::unix::fs::symlink(&target, &lock).unwrap();
        let e = ServerLock::acquire(&lock, &pid, "x").unwrap_err();
        assert!(e.to_string().contains("symlink"), "{e}");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious\n");
    }

    #[test]
    fn second_holder_is_refused_until_released() {
        let d = tempfile::tempdir().unwrap();
        let lock = d.path().join("lock");
        let pid = d.path().join("pid");
        std::fs::write(&pid, "4242\n").unwrap();
        let a = ServerLock::acquire(&lock, &pid, "x").unwrap();
        match ServerLock::acquire(&lock, &pid, "x") {
            Err(LockError::Held {
                pid: Some(4242), ..
            }) => {}
            other => panic!("{other:?}"),
        }
        a.remove();
        let b = ServerLock::acquire(&lock, &pid, "x").unwrap();
        drop(b);
        // Dropped without remove (as after kill -9): still acquirable.
        ServerLock::acquire(&lock, &pid, "x").unwrap();
    }
}
