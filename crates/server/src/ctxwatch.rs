//! Noticing context changes cheaply: inotify on every folder the context
//! walk descends into (a watch per folder; a new subfolder gets one as soon
//! as it appears) and on the folder of each context file named directly
//! (filtered to that name; that folder is watched only for names coming
//! and going, and each such file's own inode for its writes, so a busy
//! neighbour in the same folder, a bridge's WAL say, wakes nothing). An
//! idle server sleeps in poll(2); a burst of
//! events is debounced (quiet for [`QUIET`], at most [`MAX_DELAY`]) into one
//! reload of just the paths the events named (each re-stat'ed and, if
//! changed, re-read: [`Reload::Paths`]). The full stat walk
//! ([`Reload::Walk`]) stays as a safety net every
//! `--reload-interval` (it catches what inotify cannot see: network file
//! systems, the targets of symlinks), and becomes the only mechanism, at
//! [`FALLBACK`] or the interval if shorter, when inotify cannot be set up
//! (no instance, the watch limit reached). An event-queue overflow, or a
//! root folder itself moved or deleted, costs one extra walk.

use std::collections::{BTreeSet, HashMap};
use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use autopoll_protocol::fifo;

use crate::engine::context;

/// A burst of events ends after this much quiet...
pub const QUIET: Duration = Duration::from_millis(75);
/// ...or this long after its first event, whichever comes first.
pub const MAX_DELAY: Duration = Duration::from_secs(1);
/// Walk period while inotify cannot be used (or the safety-net interval, if shorter).
pub const FALLBACK: Duration = Duration::from_secs(1);

const MASK: u32 = libc::IN_MODIFY
    | libc::IN_CLOSE_WRITE
    | libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF
    | libc::IN_ONLYDIR;

/// The folder of files named directly (and nothing else): names coming
/// and going only; their writes are seen on the files' own watches
/// ([`FILE_MASK`]).
const NAMED_DIR_MASK: u32 = MASK & !(libc::IN_MODIFY | libc::IN_CLOSE_WRITE);

/// A file named directly: its writes (in place, by any path to it).
const FILE_MASK: u32 = libc::IN_MODIFY | libc::IN_CLOSE_WRITE;

/// A watched folder: where it is, and, for the folder of files named
/// directly, the only names that count there, each with the `--context`
/// path it stands for (`None`: any context file).
struct Dir {
    path: PathBuf,
    only: Option<HashMap<OsString, PathBuf>>,
}

/// What one read of the event queue said.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Drained {
    /// Something that can change the context happened.
    pub changed: bool,
    /// A folder appeared, moved or went: the watches need a resync.
    pub resync: bool,
    /// The kernel dropped events (`IN_Q_OVERFLOW`).
    pub overflow: bool,
    /// What changed cannot be told by path (overflow, a root folder
    /// itself moved or deleted): walk everything.
    pub walk: bool,
    /// The files and folders the events named (a watched folder joined
    /// with the entry's name; a file named directly, as given).
    pub paths: BTreeSet<PathBuf>,
}

impl Drained {
    fn merge(&mut self, o: Drained) {
        self.changed |= o.changed;
        self.resync |= o.resync;
        self.overflow |= o.overflow;
        self.walk |= o.walk;
        self.paths.extend(o.paths);
    }
}

/// What the `context-watch` thread asks the engine to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reload {
    /// Walk and re-stat every context file.
    Walk,
    /// Re-stat only these files and folders (and what is under them).
    Paths(Vec<PathBuf>),
}

/// Inotify watches over the context roots.
pub struct ContextWatch {
    fd: OwnedFd,
    roots: Vec<PathBuf>,
    dirs: HashMap<i32, Dir>,
    /// Watches on files named directly: the `--context` path each stands
    /// for.
    files: HashMap<i32, PathBuf>,
    /// Where events are read to, kept (zeroing 32 KB on every wake cost
    /// more than the read).
    buf: Vec<u64>,
}

impl ContextWatch {
    /// Watch everything under `roots`. Fails when inotify is unavailable or
    /// a watch cannot be added for a reason other than the folder going away.
    pub fn new(roots: &[PathBuf]) -> io::Result<ContextWatch> {
        // SAFETY: plain syscall; the fd is owned below.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut w = ContextWatch {
            // SAFETY: fresh descriptor we own.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            roots: roots.to_vec(),
            dirs: HashMap::new(),
            files: HashMap::new(),
            buf: vec![0u64; 4096],
        };
        w.sync()?;
        Ok(w)
    }

    /// The descriptor to poll for events.
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Number of folders watched.
    pub fn watched(&self) -> usize {
        self.dirs.len()
    }

    /// Add a watch for every folder now under the roots (adding one twice
    /// is harmless: inotify hands back the same descriptor).
    pub fn sync(&mut self) -> io::Result<()> {
        let targets = context::watch_targets(&self.roots);
        // A folder walked as a whole hears every write; one holding only
        // files named directly, names coming and going.
        let whole: std::collections::HashSet<PathBuf> = targets
            .iter()
            .filter(|(_, only)| only.is_none())
            .map(|(p, _)| p.clone())
            .collect();
        for (path, only) in targets {
            let mask = if whole.contains(&path) {
                MASK
            } else {
                NAMED_DIR_MASK
            };
            let Some(wd) = self.add(&path, mask)? else {
                continue;
            };
            if let Some((_, root)) = &only
                && mask == NAMED_DIR_MASK
                && let Some(fwd) = self.add(root, FILE_MASK)?
            {
                self.files.insert(fwd, root.clone());
            }
            let d = self.dirs.entry(wd).or_insert_with(|| Dir {
                path: path.clone(),
                only: Some(HashMap::new()),
            });
            d.path = path;
            match (only, &mut d.only) {
                (None, o) => *o = None,
                (Some((name, root)), Some(map)) => {
                    map.insert(name, root);
                }
                (Some(_), None) => {}
            }
        }
        Ok(())
    }

    /// An inotify watch on `path` for `mask` (None: the path is gone or
    /// not what it was since the walk; the next event or walk sorts it out).
    fn add(&self, path: &std::path::Path, mask: u32) -> io::Result<Option<i32>> {
        let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
        // SAFETY: valid fd and NUL-terminated path.
        let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), mask) };
        if wd >= 0 {
            return Ok(Some(wd));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENOENT | libc::ENOTDIR | libc::EACCES) => Ok(None),
            _ => Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
        }
    }

    /// Read every pending event.
    pub fn drain(&mut self) -> Drained {
        let mut out = Drained::default();
        // Room for many events; aligned for the kernel's structs.
        let mut buf = std::mem::take(&mut self.buf);
        let header = std::mem::size_of::<libc::inotify_event>();
        loop {
            let len = buf.len() * 8;
            // SAFETY: reading into a valid buffer from our non-blocking fd.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), len) };
            if n <= 0 {
                self.buf = buf;
                return out;
            }
            // SAFETY: u64 storage viewed as bytes, within its length.
            let bytes: &[u8] = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast(), len) };
            let n = n as usize;
            let mut off = 0;
            while off + header <= n {
                // SAFETY: the kernel wrote whole events; read the header unaligned.
                let ev: libc::inotify_event =
                    unsafe { std::ptr::read_unaligned(bytes[off..].as_ptr().cast()) };
                let name_start = off + header;
                let name_end = (name_start + ev.len as usize).min(n);
                let name = &bytes[name_start..name_end];
                let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
                out.merge(self.event(ev.wd, ev.mask, OsStr::from_bytes(name)));
                off = name_end;
            }
        }
    }

    fn event(&mut self, wd: i32, mask: u32, name: &OsStr) -> Drained {
        let mut out = Drained::default();
        if mask & libc::IN_Q_OVERFLOW != 0 {
            out.overflow = true;
            out.changed = true;
            out.resync = true;
            return out;
        }
        if let Some(root) = self.files.get(&wd) {
            out.changed = true;
            out.paths.insert(root.clone());
            if mask & libc::IN_IGNORED != 0 {
                // The inode went (replaced or removed): watch what is there
                // now.
                self.files.remove(&wd);
                out.resync = true;
            }
            return out;
        }
        if mask & libc::IN_IGNORED != 0 {
            // The folder went (or we removed the watch): forget it.
            if let Some(dir) = self.dirs.remove(&wd) {
                self.gone(&dir, &mut out);
            }
            return out;
        }
        if mask & (libc::IN_DELETE_SELF | libc::IN_MOVE_SELF) != 0 {
            let dir = if mask & libc::IN_MOVE_SELF != 0 {
                let dir = self.dirs.remove(&wd);
                if dir.is_some() {
                    // Where it went is unknown: drop it; a resync re-adds it
                    // if it is still under a root.
                    // SAFETY: removing a watch of ours.
                    unsafe { libc::inotify_rm_watch(self.fd.as_raw_fd(), wd) };
                }
                dir
            } else {
                self.dirs.remove(&wd)
            };
            if let Some(dir) = dir {
                self.gone(&dir, &mut out);
            }
            out.resync = true;
            return out;
        }
        let Some(dir) = self.dirs.get(&wd) else {
            return out;
        };
        let is_dir = mask & libc::IN_ISDIR != 0;
        match &dir.only {
            Some(names) => {
                if let Some(root) = names.get(name) {
                    out.changed = true;
                    out.paths.insert(root.clone());
                    // A new file at the name: its own watch.
                    out.resync |= mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0;
                }
            }
            None => {
                if context::relevant_name(name, is_dir) {
                    out.changed = true;
                    out.paths.insert(dir.path.join(name));
                }
            }
        }
        out.resync |= out.changed
            && is_dir
            && dir.only.is_none()
            && mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0;
        out
    }

    /// A watched folder moved or went: what was under it changed. A root
    /// (or the folder of files named directly) means a walk; a folder below
    /// a root is named by its parent's event too, and is re-read by path.
    fn gone(&self, dir: &Dir, out: &mut Drained) {
        out.changed = true;
        match &dir.only {
            Some(names) => out.paths.extend(names.values().cloned()),
            None if self.roots.contains(&dir.path) => out.walk = true,
            None => {
                out.paths.insert(dir.path.clone());
            }
        }
    }
}

/// Keep `reload` in step with the files under `roots` until `stop_fd` is
/// readable: on inotify events (debounced) for the paths they named, and by
/// a full walk every `safety_net`. Runs on its own thread (`context-watch`).
pub fn run(roots: &[PathBuf], safety_net: Duration, stop_fd: RawFd, reload: impl Fn(Reload)) {
    let stopped = |deadline: Instant| -> bool {
        let mut fds = [fifo::pollfd(stop_fd, libc::POLLIN)];
        let _ = fifo::poll(&mut fds, Some(deadline));
        fds[0].revents != 0
    };
    let fallback = FALLBACK.min(safety_net);
    let mut failing = false;
    let mut watch = start(roots, fallback, &mut failing);
    let mut next_walk = Instant::now() + safety_net;
    loop {
        let Some(w) = watch.as_mut() else {
            // No inotify: the old way, a walk every `fallback`.
            if stopped(Instant::now() + fallback) {
                return;
            }
            reload(Reload::Walk);
            if Instant::now() >= next_walk {
                next_walk = Instant::now() + safety_net;
                watch = start(roots, fallback, &mut failing);
            }
            continue;
        };
        let mut fds = [
            fifo::pollfd(w.fd(), libc::POLLIN),
            fifo::pollfd(stop_fd, libc::POLLIN),
        ];
        if fifo::poll(&mut fds, Some(next_walk)).is_err() {
            if stopped(Instant::now() + Duration::from_millis(100)) {
                return;
            }
            continue;
        }
        if fds[1].revents != 0 {
            return;
        }
        let mut what = Drained::default();
        if fds[0].revents != 0 {
            what = w.drain();
            if what.changed {
                // Debounce: wait for the writer to finish.
                let first = Instant::now();
                loop {
                    let mut fds = [
                        fifo::pollfd(w.fd(), libc::POLLIN),
                        fifo::pollfd(stop_fd, libc::POLLIN),
                    ];
                    let quiet_until = (Instant::now() + QUIET).min(first + MAX_DELAY);
                    let _ = fifo::poll(&mut fds, Some(quiet_until));
                    if fds[1].revents != 0 {
                        return;
                    }
                    if fds[0].revents == 0 || Instant::now() >= first + MAX_DELAY {
                        break;
                    }
                    what.merge(w.drain());
                }
            }
        }
        let walk_due = Instant::now() >= next_walk;
        if what.overflow {
            log::warn!("event=context_watch_overflow: events were lost, walking the context");
        }
        if (what.resync || walk_due)
            && let Err(e) = w.sync()
        {
            log::warn!(
                "event=context_watch_failed reason={:?}: walking the context every {fallback:?} instead",
                e.to_string()
            );
            failing = true;
            watch = None;
        }
        if walk_due || what.walk || what.overflow {
            if walk_due {
                next_walk = Instant::now() + safety_net;
            }
            reload(Reload::Walk);
        } else if what.changed {
            reload(Reload::Paths(what.paths.into_iter().collect()));
        }
    }
}

/// Set up the watches, or say why not (once, until it works again).
fn start(roots: &[PathBuf], fallback: Duration, failing: &mut bool) -> Option<ContextWatch> {
    match ContextWatch::new(roots) {
        Ok(w) => {
            if std::mem::take(failing) {
                log::info!("event=context_watch_restored folders={}", w.watched());
            } else {
                log::debug!("event=context_watch_started folders={}", w.watched());
            }
            Some(w)
        }
        Err(e) => {
            if !std::mem::replace(failing, true) {
                log::warn!(
                    "event=context_watch_failed reason={:?}: walking the context every {fallback:?} instead",
                    e.to_string()
                );
            }
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_files_and_new_folders_count_other_names_do_not() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().to_path_buf();
        std::fs::create_dir(root.join("target")).unwrap();
        let mut w = ContextWatch::new(std::slice::from_ref(&root)).unwrap();
        assert_eq!(w.watched(), 1, "target/ is not watched");
        assert_eq!(w.drain(), Drained::default());

        std::fs::write(root.join("a.md"), "x").unwrap();
        let got = w.drain();
        assert!(got.changed && !got.walk, "{got:?}");
        assert_eq!(got.paths, BTreeSet::from([root.join("a.md")]));
        // Editor droppings, other kinds of file, skipped folders: nothing.
        std::fs::write(root.join(".a.md.swp"), "x").unwrap();
        std::fs::write(root.join("main.rs"), "x").unwrap();
        std::fs::write(root.join("target/x.md"), "x").unwrap();
        std::fs::create_dir(root.join("node_modules")).unwrap();
        assert_eq!(w.drain(), Drained::default());

        // A new folder asks for a resync, after which its files count.
        std::fs::create_dir(root.join("sub")).unwrap();
        let got = w.drain();
        assert!(got.changed && got.resync, "{got:?}");
        assert_eq!(got.paths, BTreeSet::from([root.join("sub")]));
        w.sync().unwrap();
        assert_eq!(w.watched(), 2);
        std::fs::write(root.join("sub/b.txt"), "x").unwrap();
        assert!(w.drain().changed);
        // Removing it: the file, then the folder and its watch.
        std::fs::remove_file(root.join("sub/b.txt")).unwrap();
        std::fs::remove_dir(root.join("sub")).unwrap();
        let got = w.drain();
        assert!(got.changed && !got.walk, "{got:?}");
        assert_eq!(
            got.paths,
            BTreeSet::from([root.join("sub"), root.join("sub/b.txt")])
        );
        assert_eq!(w.watched(), 1);
        // The root itself going: nothing to name, a walk.
        drop(d);
        assert!(w.drain().walk);
    }

    #[test]
    fn a_file_named_directly_counts_alone_in_its_folder() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("NOTES.md");
        std::fs::write(&file, "x").unwrap();
        let mut w = ContextWatch::new(std::slice::from_ref(&file)).unwrap();
        std::fs::write(d.path().join("other.md"), "x").unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        assert_eq!(w.drain(), Drained::default());
        // Replaced by a rename, as editors save.
        std::fs::write(d.path().join("NOTES.md.tmp"), "y").unwrap();
        assert_eq!(w.drain(), Drained::default());
        std::fs::rename(d.path().join("NOTES.md.tmp"), &file).unwrap();
        let got = w.drain();
        assert!(got.changed && !got.walk, "{got:?}");
        assert_eq!(got.paths, BTreeSet::from([file.clone()]));
        w.sync().unwrap();
        // Written in place (truncated, then the new text): seen on the
        // file's own watch, the new inode's after the rename.
        std::fs::write(&file, "z").unwrap();
        let got = w.drain();
        assert!(got.changed && !got.walk, "{got:?}");
        assert_eq!(got.paths, BTreeSet::from([file.clone()]));
    }

    #[test]
    fn writes_to_a_neighbour_of_a_file_named_directly_do_not_wake_the_watch() {
        use std::io::Write;
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("ctx.md");
        std::fs::write(&file, "x").unwrap();
        // A bridge in the same folder, its WAL written all the time.
        let mut wal = std::fs::File::create(d.path().join("bridge.db-wal")).unwrap();
        let w = ContextWatch::new(std::slice::from_ref(&file)).unwrap();
        for _ in 0..100 {
            wal.write_all(&[0u8; 4096]).unwrap();
        }
        drop(wal);
        let mut fds = [fifo::pollfd(w.fd(), libc::POLLIN)];
        fifo::poll(&mut fds, Some(Instant::now())).unwrap();
        assert_eq!(fds[0].revents, 0, "the WAL's writes woke the context watch");
        let mut w = w;
        // The file's own write still does.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&file)
            .unwrap()
            .write_all(b"more")
            .unwrap();
        assert_eq!(w.drain().paths, BTreeSet::from([file.clone()]));
    }

    #[test]
    fn a_burst_of_writes_is_debounced_and_the_thread_stops_when_told() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().to_path_buf();
        let stop = autopoll_protocol::Shutdown::new().unwrap();
        let reloads = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let t = {
            let (root, stop, reloads) = (root.clone(), stop.clone(), reloads.clone());
            std::thread::spawn(move || {
                run(&[root], Duration::from_secs(3600), stop.fd(), |_| {
                    reloads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                });
            })
        };
        // Let the watches be set up.
        std::thread::sleep(Duration::from_millis(200));
        for i in 0..20 {
            std::fs::write(root.join("a.md"), format!("{i}")).unwrap();
            std::thread::sleep(Duration::from_millis(5));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while reloads.load(std::sync::atomic::Ordering::SeqCst) == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(QUIET * 4);
        // Undebounced, 20 writes 5 ms apart would be about 20 reloads.
        let n = reloads.load(std::sync::atomic::Ordering::SeqCst);
        assert!((1..=5).contains(&n), "{n} reloads");
        stop.trigger();
        t.join().unwrap();
    }
}
