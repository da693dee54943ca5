//! Noticing bridge changes cheaply: inotify on the bridge's directory,
//! filtered to the database file and its WAL. Every commit by any process
//! writes the WAL, so a commit wakes the poller within microseconds; when
//! nothing happens, the thread sleeps in poll(2). The main loop confirms a
//! wake with `PRAGMA data_version` (which ignores our own commits) and also
//! checks it on a timer, so a missed event (network file systems) costs at
//! most one timer period.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, Instant};

use autopoll_protocol::fifo;
use crossbeam_channel::Sender;

use crate::Event;

/// An inotify watch on the directory holding the bridge file.
pub struct Watch {
    fd: OwnedFd,
    names: Vec<Vec<u8>>,
}

impl Watch {
    /// Watch the directory of `db` for writes to `db`, `db-wal`, and for
    /// those files being created or renamed into place.
    pub fn new(db: &Path) -> io::Result<Watch> {
        let dir = match db.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => std::env::current_dir()?,
        };
        let file = db
            .file_name()
            .ok_or_else(|| io::Error::other("the bridge path has no file name"))?
            .as_bytes()
            .to_vec();
        let mut wal = file.clone();
        wal.extend_from_slice(b"-wal");
        // SAFETY: plain syscall; the fd is owned below.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let c = CString::new(dir.as_os_str().as_bytes()).map_err(io::Error::other)?;
        let mask = libc::IN_MODIFY | libc::IN_CREATE | libc::IN_MOVED_TO | libc::IN_CLOSE_WRITE;
        // SAFETY: valid fd and NUL-terminated path.
        if unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c.as_ptr(), mask) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Watch {
            fd,
            names: vec![file, wal],
        })
    }

    /// Read pending events; true if one concerns the bridge.
    fn drain(&self) -> bool {
        let mut buf = [0u8; 4096];
        let mut relevant = false;
        loop {
            // SAFETY: reading into a valid buffer from our non-blocking fd.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                return relevant;
            }
            let n = n as usize;
            let mut off = 0;
            let header = std::mem::size_of::<libc::inotify_event>();
            while off + header <= n {
                // SAFETY: the kernel wrote whole events; read the header unaligned.
                let ev: libc::inotify_event =
                    unsafe { std::ptr::read_unaligned(buf[off..].as_ptr().cast()) };
                let name_start = off + header;
                let name_end = (name_start + ev.len as usize).min(n);
                let name = &buf[name_start..name_end];
                let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
                if self.names.iter().any(|w| w.as_slice() == name) {
                    relevant = true;
                }
                off = name_end;
            }
        }
    }

    /// Run until `stop` is readable: send [`Event::Wake`] for each burst of
    /// relevant events and [`Event::Stop`] when told to stop.
    pub fn run(self, stop_fd: std::os::fd::RawFd, events: Sender<Event>) {
        loop {
            let mut fds = [
                fifo::pollfd(self.fd.as_raw_fd(), libc::POLLIN),
                fifo::pollfd(stop_fd, libc::POLLIN),
            ];
            if fifo::poll(&mut fds, Some(Instant::now() + Duration::from_secs(60))).is_err() {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            if fds[1].revents != 0 {
                let _ = events.send(Event::Stop);
                return;
            }
            if fds[0].revents != 0 && self.drain() && events.send(Event::Wake).is_err() {
                return;
            }
        }
    }
}
