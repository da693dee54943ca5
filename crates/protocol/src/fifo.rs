//! FIFO primitives with a bound on every blocking call.
//!
//! Every descriptor is opened `O_NONBLOCK | O_CLOEXEC | O_NOFOLLOW`; waiting
//! happens only in `poll(2)` with a deadline. Opening a FIFO for writing when
//! nobody reads it fails at once with ENXIO, which clients report as "no
//! server". A reader sees EOF (POLLHUP, then `read` = 0) when the last writer
//! goes, and handles it without spinning; a writer whose reader went gets
//! EPIPE (Rust ignores SIGPIPE), reported as [`FifoError::Closed`].
//!
//! [`FifoDir`] holds a directory open (the server's `clients/`), so a name
//! checked and opened in it is resolved with `fstatat`/`openat` relative to
//! that descriptor: a FIFO a client names can only ever be an entry directly
//! in that folder, never a file reached through a symlink.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::frame::FrameError;

/// What can go wrong on a FIFO.
#[derive(Debug, thiserror::Error)]
pub enum FifoError {
    /// Opening for writing found no reader (ENXIO).
    #[error("nobody is reading {}", path.display())]
    NoReader {
        /// The FIFO.
        path: PathBuf,
    },
    /// The path does not exist.
    #[error("{} does not exist", path.display())]
    Missing {
        /// The path.
        path: PathBuf,
    },
    /// A path fails the safety checks (not a FIFO, a symlink, someone else's, not private).
    #[error("refusing {}: {reason}", path.display())]
    Unsafe {
        /// The path.
        path: PathBuf,
        /// Which check failed.
        reason: String,
    },
    /// The deadline passed.
    #[error("timed out")]
    Timeout,
    /// The peer is gone (EOF on read, EPIPE or POLLERR on write).
    #[error("the other side closed the pipe")]
    Closed,
    /// A frame could not be read (too large, truncated).
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// Any other OS error.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path ("" when none).
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

fn io_err(op: &'static str, path: &Path, source: io::Error) -> FifoError {
    FifoError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn cstring(path: &Path) -> Result<CString, FifoError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| FifoError::Unsafe {
        path: path.to_path_buf(),
        reason: "path contains a NUL byte".into(),
    })
}

/// Create a FIFO with `mode` (e.g. 0o600), regardless of the umask's effect
/// on group/other bits being stricter.
pub fn mkfifo(path: &Path, mode: u32) -> Result<(), FifoError> {
    let c = cstring(path)?;
    // SAFETY: c is a valid NUL-terminated path.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), mode as libc::mode_t) };
    if rc != 0 {
        return Err(io_err(
            "cannot create FIFO",
            path,
            io::Error::last_os_error(),
        ));
    }
    // mkfifo applies the umask; set the exact mode.
    // SAFETY: as above.
    let rc = unsafe { libc::chmod(c.as_ptr(), mode as libc::mode_t) };
    if rc != 0 {
        return Err(io_err(
            "cannot chmod FIFO",
            path,
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Open a FIFO without blocking: for writing (`ENXIO` → [`FifoError::NoReader`])
/// or for reading (always immediate). Never follows a symlink.
pub fn open_fifo(path: &Path, write: bool) -> Result<File, FifoError> {
    let c = cstring(path)?;
    let access = if write {
        libc::O_WRONLY
    } else {
        libc::O_RDONLY
    };
    let flags = access | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOFOLLOW;
    // SAFETY: c is a valid path; the returned fd is owned below.
    let fd = unsafe { libc::open(c.as_ptr(), flags) };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::ENXIO) => FifoError::NoReader {
                path: path.to_path_buf(),
            },
            Some(libc::ENOENT) => FifoError::Missing {
                path: path.to_path_buf(),
            },
            Some(libc::ELOOP) => FifoError::Unsafe {
                path: path.to_path_buf(),
                reason: "is a symlink".into(),
            },
            _ => io_err("cannot open", path, e),
        });
    }
    // SAFETY: fd is a fresh descriptor we own.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let md = file
        .metadata()
        .map_err(|e| io_err("cannot stat", path, e))?;
    if !md.file_type().is_fifo() {
        return Err(FifoError::Unsafe {
            path: path.to_path_buf(),
            reason: "is not a FIFO".into(),
        });
    }
    Ok(file)
}

/// Identity of a file, to detect a swap between check and open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    /// The identity of an open file.
    pub fn of(file: &File) -> io::Result<FileId> {
        let md = file.metadata()?;
        Ok(FileId {
            dev: md.dev(),
            ino: md.ino(),
        })
    }
}

/// The checks a server makes before opening a FIFO a client named: an
/// absolute path; not a symlink; a FIFO; owned by our effective uid; no
/// permissions for group or others. Returns its identity, to compare with
/// the descriptor after opening (see [`open_checked`]).
pub fn check_client_fifo(path: &Path) -> Result<FileId, FifoError> {
    let unsafe_ = |reason: String| FifoError::Unsafe {
        path: path.to_path_buf(),
        reason,
    };
    if !path.is_absolute() {
        return Err(unsafe_("not an absolute path".into()));
    }
    let md = match std::fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(FifoError::Missing {
                path: path.to_path_buf(),
            });
        }
        Err(e) => return Err(io_err("cannot stat", path, e)),
    };
    check_stat(path, md.mode(), md.uid())?;
    Ok(FileId {
        dev: md.dev(),
        ino: md.ino(),
    })
}

/// [`check_client_fifo`], then open it and make sure the descriptor is the
/// file that was checked.
pub fn open_checked(path: &Path, write: bool) -> Result<File, FifoError> {
    let id = check_client_fifo(path)?;
    let f = open_fifo(path, write)?;
    if FileId::of(&f).map_err(|e| io_err("cannot stat", path, e))? != id {
        return Err(FifoError::Unsafe {
            path: path.to_path_buf(),
            reason: "was replaced between check and open".into(),
        });
    }
    Ok(f)
}

/// Like [`open_checked`] for writing, retrying while nobody reads yet
/// (ENXIO) until `deadline`.
pub fn open_checked_write_until(path: &Path, deadline: Instant) -> Result<File, FifoError> {
    let mut pause = Duration::from_micros(200);
    loop {
        match open_checked(path, true) {
            Err(FifoError::NoReader { .. }) if Instant::now() < deadline => {
                std::thread::sleep(pause.min(deadline.saturating_duration_since(Instant::now())));
                pause = (pause * 2).min(Duration::from_millis(20));
            }
            Err(FifoError::NoReader { .. }) => return Err(FifoError::Timeout),
            other => return other,
        }
    }
}

impl FileId {
    /// The identity of the file at `path` itself (a symlink is not followed).
    pub fn of_path(path: &Path) -> io::Result<FileId> {
        let md = std::fs::symlink_metadata(path)?;
        Ok(FileId {
            dev: md.dev(),
            ino: md.ino(),
        })
    }
}

/// The checks on a client FIFO's `lstat` data: not a symlink, a FIFO, ours,
/// private.
fn check_stat(path: &Path, mode: u32, uid: u32) -> Result<(), FifoError> {
    let unsafe_ = |reason: String| FifoError::Unsafe {
        path: path.to_path_buf(),
        reason,
    };
    match mode & libc::S_IFMT {
        libc::S_IFLNK => return Err(unsafe_("is a symlink".into())),
        libc::S_IFIFO => {}
        _ => return Err(unsafe_("is not a FIFO".into())),
    }
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    if uid != me {
        return Err(unsafe_(format!("is owned by uid {uid}, not {me}")));
    }
    if mode & 0o077 != 0 {
        return Err(unsafe_(format!(
            "has mode {:o}; a client FIFO must be private (0600)",
            mode & 0o777
        )));
    }
    Ok(())
}

fn open_error(path: &Path, e: io::Error) -> FifoError {
    match e.raw_os_error() {
        Some(libc::ENXIO) => FifoError::NoReader {
            path: path.to_path_buf(),
        },
        Some(libc::ENOENT) => FifoError::Missing {
            path: path.to_path_buf(),
        },
        Some(libc::ELOOP) => FifoError::Unsafe {
            path: path.to_path_buf(),
            reason: "is a symlink".into(),
        },
        _ => io_err("cannot open", path, e),
    }
}

/// A directory held open by descriptor: names are checked and opened in it
/// with `fstatat`/`openat`, so they can only be its own entries.
#[derive(Debug)]
pub struct FifoDir {
    fd: OwnedFd,
    path: PathBuf,
}

impl FifoDir {
    /// Open directory `path` (itself not a symlink).
    pub fn open(path: &Path) -> Result<FifoDir, FifoError> {
        let c = cstring(path)?;
        let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC | libc::O_NOFOLLOW;
        // SAFETY: c is a valid path; the returned fd is owned below.
        let fd = unsafe { libc::open(c.as_ptr(), flags) };
        if fd < 0 {
            return Err(open_error(path, io::Error::last_os_error()));
        }
        Ok(FifoDir {
            // SAFETY: fd is a fresh descriptor we own.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            path: path.to_path_buf(),
        })
    }

    /// The directory's path (for messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn name_c(&self, name: &OsStr) -> Result<(CString, PathBuf), FifoError> {
        let full = self.path.join(name);
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes == b"." || bytes == b".." || bytes.contains(&b'/') {
            return Err(FifoError::Unsafe {
                path: full,
                reason: "is not a plain file name".into(),
            });
        }
        Ok((cstring(Path::new(name))?, full))
    }

    /// [`check_client_fifo`]'s checks on entry `name` of this directory
    /// (`fstatat` without following a symlink); returns its identity.
    pub fn check(&self, name: &OsStr) -> Result<FileId, FifoError> {
        let (c, full) = self.name_c(name)?;
        // SAFETY: an all-zero stat is a valid out-parameter.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid dirfd, NUL-terminated name, valid out-pointer.
        let rc = unsafe {
            libc::fstatat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::NotFound {
                return Err(FifoError::Missing { path: full });
            }
            return Err(io_err("cannot stat", &full, e));
        }
        check_stat(&full, st.st_mode, st.st_uid)?;
        Ok(FileId {
            dev: st.st_dev,
            ino: st.st_ino,
        })
    }

    /// Check entry `name`, open it without blocking (never following a
    /// symlink), and make sure the descriptor is the file that was checked.
    pub fn open_checked(&self, name: &OsStr, write: bool) -> Result<(File, FileId), FifoError> {
        let id = self.check(name)?;
        let (c, full) = self.name_c(name)?;
        let access = if write {
            libc::O_WRONLY
        } else {
            libc::O_RDONLY
        };
        let flags = access | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOFOLLOW;
        // SAFETY: valid dirfd and name; the returned fd is owned below.
        let fd = unsafe { libc::openat(self.fd.as_raw_fd(), c.as_ptr(), flags) };
        if fd < 0 {
            return Err(open_error(&full, io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh descriptor we own.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        if FileId::of(&file).map_err(|e| io_err("cannot stat", &full, e))? != id {
            return Err(FifoError::Unsafe {
                path: full,
                reason: "was replaced between check and open".into(),
            });
        }
        Ok((file, id))
    }

    /// [`FifoDir::open_checked`] for writing, retrying while nobody reads
    /// yet (ENXIO) until `deadline`.
    pub fn open_checked_write_until(
        &self,
        name: &OsStr,
        deadline: Instant,
    ) -> Result<(File, FileId), FifoError> {
        let mut pause = Duration::from_micros(200);
        loop {
            match self.open_checked(name, true) {
                Err(FifoError::NoReader { .. }) if Instant::now() < deadline => {
                    std::thread::sleep(
                        pause.min(deadline.saturating_duration_since(Instant::now())),
                    );
                    pause = (pause * 2).min(Duration::from_millis(20));
                }
                Err(FifoError::NoReader { .. }) => return Err(FifoError::Timeout),
                other => return other,
            }
        }
    }
}

/// Milliseconds until `deadline` for poll(2), rounded up; -1 for none.
fn poll_timeout(deadline: Option<Instant>) -> libc::c_int {
    match deadline {
        None => -1,
        Some(d) => {
            let left = d.saturating_duration_since(Instant::now());
            let ms = left.as_micros().div_ceil(1000);
            libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX)
        }
    }
}

/// poll(2) until an event or `deadline`; retries on EINTR. Returns the
/// number of descriptors with events (0 on timeout).
pub fn poll(fds: &mut [libc::pollfd], deadline: Option<Instant>) -> io::Result<usize> {
    loop {
        for f in fds.iter_mut() {
            f.revents = 0;
        }
        let timeout = poll_timeout(deadline);
        // SAFETY: fds is a valid slice of pollfd for its length.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if rc >= 0 {
            return Ok(rc as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(0);
        }
    }
}

/// A pollfd for `fd` and `events`.
pub fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

/// Write all of `buf` to a non-blocking pipe before `deadline`.
pub fn write_all(mut file: &File, mut buf: &[u8], deadline: Instant) -> Result<(), FifoError> {
    while !buf.is_empty() {
        match file.write(buf) {
            Ok(0) => return Err(FifoError::Closed),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let mut fds = [pollfd(file.as_raw_fd(), libc::POLLOUT)];
                if poll(&mut fds, Some(deadline)).map_err(|e| io_err("poll", Path::new(""), e))?
                    == 0
                {
                    return Err(FifoError::Timeout);
                }
                if fds[0].revents & (libc::POLLERR | libc::POLLHUP) != 0
                    && fds[0].revents & libc::POLLOUT == 0
                {
                    return Err(FifoError::Closed);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Err(FifoError::Closed),
            Err(e) => return Err(io_err("write", Path::new(""), e)),
        }
    }
    Ok(())
}

/// What one non-blocking read did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// Bytes arrived.
    Data(usize),
    /// Nothing to read right now.
    WouldBlock,
    /// The writer side is gone and the pipe is drained.
    Eof,
}

/// Splits a byte stream into newline-ended frames of at most `max` bytes
/// (newline included). An oversized frame is discarded up to its newline and
/// reported once as [`FrameError::TooLarge`]; memory stays bounded by `max`.
#[derive(Debug)]
pub struct FrameReader {
    file: File,
    buf: Vec<u8>,
    /// Bytes of `buf` already searched for a newline.
    scanned: usize,
    max: usize,
    discarding: bool,
    chunk: Vec<u8>,
}

impl FrameReader {
    /// Read frames from a non-blocking `file`.
    pub fn new(file: File, max: usize) -> FrameReader {
        FrameReader {
            file,
            buf: Vec::new(),
            scanned: 0,
            max: max.max(2),
            discarding: false,
            chunk: vec![0; 64 * 1024],
        }
    }

    /// The descriptor, for polling alongside others.
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// The next complete frame already buffered (without its newline), if any.
    pub fn next_buffered(&mut self) -> Option<Result<Vec<u8>, FrameError>> {
        if let Some(pos) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
            let end = self.scanned + pos;
            let line: Vec<u8> = self.buf.drain(..=end).take(end).collect();
            self.scanned = 0;
            if self.discarding || line.len() + 1 > self.max {
                self.discarding = false;
                return Some(Err(FrameError::TooLarge { limit: self.max }));
            }
            return Some(Ok(line));
        }
        self.scanned = self.buf.len();
        if self.buf.len() >= self.max {
            // No newline within the cap: drop what we have, keep dropping
            // until the newline, then report once.
            self.discarding = true;
            self.buf.clear();
            self.scanned = 0;
        }
        None
    }

    /// One non-blocking read into the buffer.
    pub fn fill(&mut self) -> io::Result<Fill> {
        loop {
            match (&self.file).read(&mut self.chunk) {
                Ok(0) => return Ok(Fill::Eof),
                Ok(n) => {
                    self.buf.extend_from_slice(&self.chunk[..n]);
                    return Ok(Fill::Data(n));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Fill::WouldBlock),
                Err(e) => return Err(e),
            }
        }
    }

    /// Take the bytes buffered without a newline (after EOF: the last,
    /// unterminated line). Empty while discarding an oversized line.
    pub fn take_pending(&mut self) -> Vec<u8> {
        self.scanned = 0;
        if self.discarding {
            self.discarding = false;
            self.buf.clear();
            return Vec::new();
        }
        std::mem::take(&mut self.buf)
    }

    /// Bytes buffered without a newline yet (0 when discarding).
    pub fn pending(&self) -> usize {
        if self.discarding { 1 } else { self.buf.len() }
    }

    /// Wait for the next frame until `deadline`. `Ok(None)` is a clean EOF
    /// (the writer closed between frames).
    pub fn read_frame(&mut self, deadline: Option<Instant>) -> Result<Option<Vec<u8>>, FifoError> {
        loop {
            if let Some(r) = self.next_buffered() {
                return r.map(Some).map_err(FifoError::from);
            }
            let mut fds = [pollfd(self.fd(), libc::POLLIN)];
            if poll(&mut fds, deadline).map_err(|e| io_err("poll", Path::new(""), e))? == 0 {
                return Err(FifoError::Timeout);
            }
            match self.fill().map_err(|e| io_err("read", Path::new(""), e))? {
                Fill::Data(_) | Fill::WouldBlock => {}
                Fill::Eof => {
                    if let Some(r) = self.next_buffered() {
                        return r.map(Some).map_err(FifoError::from);
                    }
                    let pending = self.pending();
                    return if pending == 0 {
                        Ok(None)
                    } else {
                        Err(FrameError::Truncated(pending).into())
                    };
                }
            }
        }
    }
}

/// A self-pipe: another thread calls [`Waker::wake`] to make a `poll` that
/// includes [`Waker::fd`] return. Cheap, and no thread ever spins.
#[derive(Debug)]
pub struct Waker {
    read: OwnedFd,
    write: OwnedFd,
}

impl Waker {
    /// A new non-blocking pipe pair.
    pub fn new() -> io::Result<Waker> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: fds has room for two descriptors.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 returned two fresh descriptors we now own.
        Ok(unsafe {
            Waker {
                read: OwnedFd::from_raw_fd(fds[0]),
                write: OwnedFd::from_raw_fd(fds[1]),
            }
        })
    }

    /// Make the poller wake (never blocks; a full pipe already means "awake").
    pub fn wake(&self) {
        let b = [1u8];
        // SAFETY: writing one byte from a valid buffer to our own fd.
        let _ = unsafe { libc::write(self.write.as_raw_fd(), b.as_ptr().cast(), 1) };
    }

    /// Consume pending wake-ups.
    pub fn drain(&self) {
        let mut buf = [0u8; 256];
        // SAFETY: reading into a valid buffer from our own non-blocking fd.
        while unsafe { libc::read(self.read.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {
        }
    }

    /// The descriptor to poll for POLLIN.
    pub fn fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{self, Echo, Reply, Request};

    fn pair(dir: &Path) -> (File, FrameReader, PathBuf) {
        let p = dir.join("f");
        mkfifo(&p, 0o600).unwrap();
        let r = open_fifo(&p, false).unwrap();
        let w = open_fifo(&p, true).unwrap();
        (w, FrameReader::new(r, crate::DEFAULT_MAX_FRAME), p)
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    /// Round trips at the sizes around the pipe's atomic limit and buffer,
    /// with a writer thread so frames larger than the pipe buffer flow.
    #[test]
    fn round_trips_at_edge_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let (w, mut r, _) = pair(dir.path());
        // Payload sizes chosen so the *frame* hits each size.
        let overhead = frame::encode(&Request::Echo(Echo {
            id: 1,
            payload: String::new(),
        }))
        .len();
        let sizes = [0usize, 1, 4095, 4096, 4097, 65_535, 65_536, 1 << 20];
        let payloads: Vec<String> = sizes
            .iter()
            .map(|&s| "x".repeat(s.saturating_sub(overhead)))
            .collect();
        let expect = payloads.clone();
        let writer = std::thread::spawn(move || {
            for p in payloads {
                let bytes = frame::encode(&Request::Echo(Echo { id: 1, payload: p }));
                write_all(&w, &bytes, soon()).unwrap();
            }
        });
        for (i, p) in expect.iter().enumerate() {
            let line = r.read_frame(Some(soon())).unwrap().unwrap();
            let got: Request = frame::decode(&line).unwrap();
            assert_eq!(
                got,
                Request::Echo(Echo {
                    id: 1,
                    payload: p.clone()
                }),
                "size {}",
                sizes[i]
            );
            if sizes[i] >= overhead {
                assert_eq!(line.len() + 1, sizes[i]);
            }
        }
        writer.join().unwrap();
        // Writer gone: clean EOF.
        assert!(r.read_frame(Some(soon())).unwrap().is_none());
    }

    #[test]
    fn over_the_cap_is_an_error_and_the_stream_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        mkfifo(&p, 0o600).unwrap();
        let mut r = FrameReader::new(open_fifo(&p, false).unwrap(), 100);
        let w = open_fifo(&p, true).unwrap();
        let writer = std::thread::spawn(move || {
            write_all(&w, &[b'a'; 500], soon()).unwrap();
            write_all(&w, b"\n{\"type\":\"bye\"}\n", soon()).unwrap();
            write_all(&w, &[b'b'; 99], soon()).unwrap(); // exactly 100 with newline
            write_all(&w, b"\n", soon()).unwrap();
        });
        assert!(matches!(
            r.read_frame(Some(soon())),
            Err(FifoError::Frame(FrameError::TooLarge { limit: 100 }))
        ));
        let line = r.read_frame(Some(soon())).unwrap().unwrap();
        assert_eq!(frame::decode::<Request>(&line).unwrap(), Request::Bye);
        assert_eq!(r.read_frame(Some(soon())).unwrap().unwrap().len(), 99);
        writer.join().unwrap();
    }

    #[test]
    fn truncated_frame_and_invalid_utf8_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let (w, mut r, _) = pair(dir.path());
        write_all(&w, b"\xff\xfe\n{\"type\":", soon()).unwrap();
        drop(w);
        let line = r.read_frame(Some(soon())).unwrap().unwrap();
        assert!(matches!(
            frame::decode::<Request>(&line),
            Err(FrameError::Utf8 { .. })
        ));
        assert!(matches!(
            r.read_frame(Some(soon())),
            Err(FifoError::Frame(FrameError::Truncated(8)))
        ));
    }

    #[test]
    fn read_times_out_without_data() {
        let dir = tempfile::tempdir().unwrap();
        let (_w, mut r, _) = pair(dir.path());
        let t = Instant::now();
        assert!(matches!(
            r.read_frame(Some(Instant::now() + Duration::from_millis(20))),
            Err(FifoError::Timeout)
        ));
        assert!(t.elapsed() >= Duration::from_millis(20));
    }

    #[test]
    fn open_for_writing_without_reader_is_no_reader() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        mkfifo(&p, 0o600).unwrap();
        assert!(matches!(
            open_fifo(&p, true),
            Err(FifoError::NoReader { .. })
        ));
        assert!(matches!(
            open_fifo(&dir.path().join("none"), true),
            Err(FifoError::Missing { .. })
        ));
        assert!(matches!(
            open_checked_write_until(&p, Instant::now() + Duration::from_millis(10)),
            Err(FifoError::Timeout)
        ));
    }

    #[test]
    fn writing_to_a_gone_reader_is_closed_not_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let (w, r, _) = pair(dir.path());
        drop(r);
        assert!(matches!(
            write_all(&w, b"x\n", soon()),
            Err(FifoError::Closed)
        ));
    }

    #[test]
    fn writing_to_a_stalled_reader_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let (w, _r, _) = pair(dir.path());
        let big = vec![b'x'; 1 << 20];
        assert!(matches!(
            write_all(&w, &big, Instant::now() + Duration::from_millis(30)),
            Err(FifoError::Timeout)
        ));
    }

    #[test]
    fn client_fifo_checks() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("ok");
        mkfifo(&fifo, 0o600).unwrap();
        check_client_fifo(&fifo).unwrap();
        // Not absolute.
        assert!(matches!(
            check_client_fifo(Path::new("rel")),
            Err(FifoError::Unsafe { .. })
        ));
        // A regular file.
        let file = dir.path().join("file");
        std::fs::write(&file, "x").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = check_client_fifo(&file).unwrap_err();
        assert!(e.to_string().contains("not a FIFO"), "{e}");
        // A symlink to a FIFO.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&fifo, &link).unwrap();
        let e = check_client_fifo(&link).unwrap_err();
        assert!(e.to_string().contains("symlink"), "{e}");
        assert!(matches!(
            open_fifo(&link, false),
            Err(FifoError::Unsafe { .. })
        ));
        // World-writable FIFO.
        let open = dir.path().join("open");
        mkfifo(&open, 0o622).unwrap();
        assert!(
            check_client_fifo(&open)
                .unwrap_err()
                .to_string()
                .contains("private")
        );
        // Missing.
        assert!(matches!(
            check_client_fifo(&dir.path().join("gone")),
            Err(FifoError::Missing { .. })
        ));
        // open_checked on the good one.
        open_checked(&fifo, false).unwrap();
    }

    #[test]
    fn fifo_dir_opens_only_its_own_plain_entries() {
        use std::ffi::OsStr;
        let dir = tempfile::tempdir().unwrap();
        let inner = dir.path().join("clients");
        std::fs::create_dir(&inner).unwrap();
        mkfifo(&inner.join("a"), 0o600).unwrap();
        mkfifo(&dir.path().join("outside"), 0o600).unwrap();
        std::os::unix::fs::symlink(dir.path().join("outside"), inner.join("link")).unwrap();
        let d = FifoDir::open(&inner).unwrap();
        let id = d.check(OsStr::new("a")).unwrap();
        let (_f, got) = d.open_checked(OsStr::new("a"), false).unwrap();
        assert_eq!(got, id);
        for bad in ["../outside", "..", ".", "", "x/y"] {
            let e = d.check(OsStr::new(bad)).unwrap_err();
            assert!(e.to_string().contains("plain file name"), "{bad}: {e}");
        }
        let e = d.check(OsStr::new("link")).unwrap_err();
        assert!(e.to_string().contains("symlink"), "{e}");
        assert!(matches!(
            d.open_checked(OsStr::new("gone"), false),
            Err(FifoError::Missing { .. })
        ));
        // A symlinked directory itself is refused.
        std::os::unix::fs::symlink(&inner, dir.path().join("dirlink")).unwrap();
        assert!(FifoDir::open(&dir.path().join("dirlink")).is_err());
    }

    #[test]
    fn waker_wakes_poll() {
        let w = Waker::new().unwrap();
        let mut fds = [pollfd(w.fd(), libc::POLLIN)];
        assert_eq!(
            poll(&mut fds, Some(Instant::now() + Duration::from_millis(5))).unwrap(),
            0
        );
        w.wake();
        w.wake();
        assert_eq!(poll(&mut fds, Some(soon())).unwrap(), 1);
        w.drain();
        assert_eq!(
            poll(&mut fds, Some(Instant::now() + Duration::from_millis(5))).unwrap(),
            0
        );
    }

    /// No panic on any input: random bytes, with and without newlines, fed
    /// through the reader and the decoders.
    #[test]
    fn random_bytes_never_panic() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        mkfifo(&p, 0o600).unwrap();
        let mut r = FrameReader::new(open_fifo(&p, false).unwrap(), 4096);
        let w = open_fifo(&p, true).unwrap();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut frames = 0;
        for round in 0..2_000 {
            let len = (next() % 300) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| (next() & 0xff) as u8).collect();
            // Sometimes a JSON-ish prefix, to reach deeper into serde.
            if round % 3 == 0 {
                let mut j = br#"{"type":"ask","id":"#.to_vec();
                j.extend_from_slice(&bytes);
                bytes = j;
            }
            bytes.push(b'\n');
            write_all(&w, &bytes, soon()).unwrap();
            while let Some(item) = r.next_buffered().or_else(|| {
                let _ = r.fill();
                r.next_buffered()
            }) {
                frames += 1;
                if let Ok(line) = item {
                    let _ = frame::decode::<Request>(&line);
                    let _ = frame::decode::<Reply>(&line);
                }
            }
        }
        assert!(frames >= 2_000, "{frames}");
    }
}
