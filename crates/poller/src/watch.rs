//! Noticing bridge changes cheaply: inotify on the bridge's directory,
//! filtered to the database file and its WAL. Every commit by any process
//! writes the WAL, so a commit wakes the poller within microseconds; when
//! nothing happens, the thread sleeps in poll(2). The main loop confirms a
//! wake with `PRAGMA data_version` (which ignores our own commits) and also
//! checks it on a timer, so a missed event (network file systems) costs at
//! most one timer period. The same watch, on other names and events
//! ([`Watch::file`], [`TOKENS_MASK`]), follows the `--tokens-file`.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use autopoll_protocol::fifo;
use crossbeam_channel::Sender;

use crate::Event;

/// While the folder is not watched, how often to try again.
pub const REWATCH: Duration = Duration::from_millis(100);

const MASK: u32 = libc::IN_MODIFY
    | libc::IN_CREATE
    | libc::IN_MOVED_TO
    | libc::IN_CLOSE_WRITE
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF;

/// What the tokens file's watch listens for: written and closed, renamed
/// in or out, created, removed, chmod-ed (a partial write is not read: the
/// close comes after it).
pub const TOKENS_MASK: u32 = libc::IN_CLOSE_WRITE
    | libc::IN_CREATE
    | libc::IN_MOVED_TO
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_ATTRIB
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF;

/// An inotify watch on the directory holding the bridge file (or another
/// file: [`Watch::file`]).
pub struct Watch {
    fd: OwnedFd,
    names: Vec<Vec<u8>>,
    dir: PathBuf,
    mask: u32,
    /// The watch descriptor and the folder's (dev, ino), while watched.
    watched: Option<(i32, (u64, u64))>,
}

impl Watch {
    /// Watch the directory of `db` for writes to `db`, `db-wal`, and for
    /// those files being created or renamed into place.
    pub fn new(db: &Path) -> io::Result<Watch> {
        Watch::file(db, true, MASK)
    }

    /// Watch the directory of `path` for `mask` events on `path` (and on
    /// `path-wal` with `wal`).
    pub fn file(db: &Path, wal: bool, mask: u32) -> io::Result<Watch> {
        let dir = match db.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => std::env::current_dir()?,
        };
        let file = db
            .file_name()
            .ok_or_else(|| io::Error::other("the bridge path has no file name"))?
            .as_bytes()
            .to_vec();
        let mut names = vec![file.clone()];
        if wal {
            let mut w = file;
            w.extend_from_slice(b"-wal");
            names.push(w);
        }
        // SAFETY: plain syscall; the fd is owned below.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut w = Watch {
            fd,
            names,
            dir,
            mask,
            watched: None,
        };
        w.add()?;
        Ok(w)
    }

    /// Watch the folder now at the path (dropping an older watch).
    fn add(&mut self) -> io::Result<()> {
        let meta = std::fs::metadata(&self.dir)?;
        let c = CString::new(self.dir.as_os_str().as_bytes()).map_err(io::Error::other)?;
        // SAFETY: valid fd and NUL-terminated path.
        let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), self.mask) };
        if wd < 0 {
            return Err(io::Error::last_os_error());
        }
        if let Some((old, _)) = self.watched
            && old != wd
        {
            // SAFETY: removing a watch of ours; an already dropped one just fails.
            unsafe { libc::inotify_rm_watch(self.fd.as_raw_fd(), old) };
        }
        self.watched = Some((wd, (meta.dev(), meta.ino())));
        Ok(())
    }

    /// Whether the watched folder is still the one at the path.
    fn current(&self) -> bool {
        match (self.watched, std::fs::metadata(&self.dir)) {
            (Some((_, id)), Ok(m)) => id == (m.dev(), m.ino()),
            _ => false,
        }
    }

    /// Read pending events; true if one concerns the bridge (or the folder
    /// itself, whose watch is then dropped).
    fn drain(&mut self) -> bool {
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
                let gone = libc::IN_IGNORED | libc::IN_DELETE_SELF | libc::IN_MOVE_SELF;
                if ev.mask & gone != 0 && self.watched.is_some_and(|(wd, _)| wd == ev.wd) {
                    log::info!(
                        "event=watch_lost dir={}: the bridge's folder was removed or renamed",
                        self.dir.display()
                    );
                    if ev.mask & libc::IN_IGNORED == 0 {
                        // SAFETY: removing a watch of ours.
                        unsafe { libc::inotify_rm_watch(self.fd.as_raw_fd(), ev.wd) };
                    }
                    self.watched = None;
                    relevant = true;
                }
                off = name_end;
            }
        }
    }

    /// Run until `stop` is readable: send [`Event::Wake`] for each burst of
    /// relevant events and [`Event::Stop`] when told to stop.
    pub fn run(self, stop_fd: RawFd, events: Sender<Event>) {
        self.run_with(stop_fd, None, events, || Event::Wake);
    }

    /// Like [`Watch::run`], sending `make()` for each burst, and also when
    /// `hangup` (a SIGHUP, [`crate::tokens::Hangup`]) becomes readable.
    pub fn run_with(
        mut self,
        stop_fd: RawFd,
        hangup: Option<crate::tokens::Hangup>,
        events: Sender<Event>,
        make: fn() -> Event,
    ) {
        let mut next_check = Instant::now() + Duration::from_secs(1);
        loop {
            let now = Instant::now();
            if self.watched.is_none() || now >= next_check {
                next_check = now + Duration::from_secs(1);
                if !self.current() && self.add().is_ok() {
                    log::info!("event=watch_restored dir={}", self.dir.display());
                    if events.send(make()).is_err() {
                        return;
                    }
                }
            }
            let until = if self.watched.is_some() {
                next_check
            } else {
                Instant::now() + REWATCH
            };
            let mut fds = [
                fifo::pollfd(self.fd.as_raw_fd(), libc::POLLIN),
                fifo::pollfd(stop_fd, libc::POLLIN),
                fifo::pollfd(hangup.as_ref().map_or(-1, |h| h.fd()), libc::POLLIN),
            ];
            if fifo::poll(&mut fds, Some(until)).is_err() {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            if fds[1].revents != 0 {
                let _ = events.send(Event::Stop);
                return;
            }
            let mut send = false;
            if fds[2].revents != 0
                && let Some(h) = &hangup
            {
                h.drain();
                log::info!("event=sighup: reading the tokens file again");
                send = true;
            }
            if fds[0].revents != 0 && self.drain() {
                send = true;
            }
            if send && events.send(make()).is_err() {
                return;
            }
        }
    }
}
