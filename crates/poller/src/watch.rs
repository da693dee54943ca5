//! Noticing bridge changes cheaply: inotify on the bridge's directory,
//! filtered to the database file and its WAL. Every commit by any process
//! writes the WAL, so a commit wakes the poller within microseconds; when
//! nothing happens, the thread sleeps in poll(2). The thread confirms a wake
//! by reading the WAL index's header ([`crate::shm`], or `PRAGMA
//! data_version` where there is none); the main loop also checks
//! `data_version` (which ignores our own commits) on a timer, so a missed
//! event (network file systems) costs at most one timer period. The same watch, on other names and events
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

use std::sync::atomic::{AtomicBool, Ordering};

use crate::Event;
use crate::conn::FileId;
use crate::hub::Hub;
use crate::shm::{Stamp, WalIndex};

/// While the folder is not watched, how often to try again.
pub const REWATCH: Duration = Duration::from_millis(100);

/// While another process holds the WAL write lock (its commit is on its
/// way), when to look again at `step` ([`BUSY_STEPS`] of them; the last
/// repeats for as long as the lock is held): three looks 20 us apart, then
/// the loop's own schedule from its second step on (40, 80 ... 5000 us,
/// [`crate::RECHECK`]). A commit shows tens of microseconds after its first
/// page is written, so the first looks are close together (each is a
/// `fcntl` and a `pread`).
fn busy_recheck(step: usize) -> Duration {
    match step.checked_sub(BUSY_FIRST) {
        None => Duration::from_micros(20),
        Some(k) => crate::RECHECK[(k + 1).min(crate::RECHECK.len() - 1)],
    }
}

/// The close looks that open [`busy_recheck`]'s schedule.
const BUSY_FIRST: usize = 3;

/// The steps of [`busy_recheck`]'s schedule.
const BUSY_STEPS: usize = BUSY_FIRST + crate::RECHECK.len() - 1;

const MASK: u32 = libc::IN_MODIFY
    | libc::IN_CREATE
    | libc::IN_MOVED_TO
    | libc::IN_CLOSE_WRITE
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF;

/// While another poller watches the bridge for this one ([`crate::hub`]):
/// only the file being created, renamed or removed, not its writes.
const FOLLOWER_MASK: u32 = MASK & !(libc::IN_MODIFY | libc::IN_CLOSE_WRITE);

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
    /// Where events are read to, kept: zeroing 4 KB on every read was a
    /// third of an idle poller's instructions per foreign commit.
    buf: Vec<u8>,
    /// The loop's write flag, whose [`crate::quiet::Quiet`] changes this
    /// watch's mask around the loop's writes (the bridge's watch only).
    quiet: Option<std::sync::Arc<WriteFlag>>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        // The descriptor closes with us: the loop must not use it.
        if let Some(w) = &self.quiet {
            w.quiet.forget_folder();
        }
    }
}

/// What one read of the pending events saw ([`Watch::drain`]).
#[derive(Debug, Clone, Copy)]
struct Drained {
    /// An event concerned the watched files or the folder.
    relevant: bool,
    /// All of those were plain writes (`IN_MODIFY`, `IN_CLOSE_WRITE`).
    writes_only: bool,
    /// One was a write to the `-wal`: a commit in WAL mode always writes
    /// there; a write to the bridge file alone is a checkpoint then.
    wal_written: bool,
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
            buf: vec![0; 4096],
            quiet: None,
        };
        w.add()?;
        Ok(w)
    }

    /// Watch the folder now at the path (dropping an older watch).
    fn add(&mut self) -> io::Result<()> {
        let meta = std::fs::metadata(&self.dir)?;
        let c = CString::new(self.dir.as_os_str().as_bytes()).map_err(io::Error::other)?;
        let wd = match &self.quiet {
            Some(w) => w.quiet.add(self.fd.as_raw_fd(), &c, self.mask),
            // SAFETY: valid fd and NUL-terminated path.
            None => unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), self.mask) },
        };
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

    /// Listen for `mask` from now on (same folder, same watch).
    fn set_mask(&mut self, mask: u32) {
        if self.mask != mask {
            self.mask = mask;
            if self.watched.is_some() {
                let _ = self.add();
            }
        }
    }

    /// Whether the watched folder is still the one at the path.
    fn current(&self) -> bool {
        match (self.watched, std::fs::metadata(&self.dir)) {
            (Some((_, id)), Ok(m)) => id == (m.dev(), m.ino()),
            _ => false,
        }
    }

    /// Read pending events: whether one concerns the watched files (or the
    /// folder itself, whose watch is then dropped), and whether all of those
    /// were plain writes (`IN_MODIFY`: a commit, or a checkpoint), not a
    /// file created, renamed, removed or the folder lost.
    fn drain(&mut self) -> Drained {
        let mut buf = std::mem::take(&mut self.buf);
        let seen = self.drain_into(&mut buf);
        self.buf = buf;
        seen
    }

    /// [`Watch::drain`] with the buffer taken out of `self`.
    fn drain_into(&mut self, buf: &mut [u8]) -> Drained {
        let mut d = Drained {
            relevant: false,
            writes_only: true,
            wal_written: false,
        };
        loop {
            // SAFETY: reading into a valid buffer from our non-blocking fd.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                return d;
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
                if let Some(i) = self.names.iter().position(|w| w.as_slice() == name) {
                    d.relevant = true;
                    d.writes_only &= ev.mask & !(libc::IN_MODIFY | libc::IN_CLOSE_WRITE) == 0;
                    // names[1] is the -wal (Watch::file).
                    d.wal_written |= i == 1 && ev.mask & libc::IN_MODIFY != 0;
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
                    if let Some(w) = &self.quiet {
                        w.quiet.forget_folder();
                    }
                    d.relevant = true;
                    d.writes_only = false;
                }
                off = name_end;
            }
        }
    }

    /// Run until `stop` is readable: send [`Event::Changed`] once a commit
    /// by anyone is visible in `db` and leaves something to claim for one of
    /// `served`'s conversations (confirmed with `PRAGMA data_version`, then
    /// [`autopoll_bridge::new_claimable_on`] over the rows added since the
    /// last look, or [`autopoll_bridge::claimable_on`] over every
    /// conversation at most [`FULL_LOOK`] later, on a read-only connection of this
    /// thread's own: the poller's loop wakes once per commit that concerns
    /// it, not once per page written nor for other conversations' traffic,
    /// and never before the commit shows), [`Event::Wake`] for what cannot
    /// be confirmed (a file created, renamed or removed; no connection), and
    /// [`Event::Stop`] when told to stop.
    ///
    /// The WAL is written before the commit shows in the shared index, so
    /// a write seen before its commit is looked at again after 40, 40, 80,
    /// 160 ... microseconds (`RECHECK` in lib.rs, about 10 ms in all), in
    /// this thread, with nothing sent meanwhile. A look reads the WAL
    /// index's header ([`crate::shm`]) once the connection has one.
    pub fn run(mut self, stop_fd: RawFd, db: &Path, served: Served, events: Sender<Event>) {
        // Sleeps of tens of microseconds mean what they say (the default
        // timer slack is 50 us); this thread only.
        // SAFETY: plain prctl on the calling thread.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1_000 as libc::c_ulong) };
        let following = served.following.clone();
        let mut hub = Hub::new(served.session);
        let mut confirm = Confirm::new(db, served);
        let _ = confirm.moved();
        let mut next_check = Instant::now() + Duration::from_secs(1);
        // A write not yet visible as a commit: (when to look again, step).
        let mut recheck: Option<(Instant, usize)> = None;
        // Whether `recheck` waits for the loop's write to end.
        let mut deferring = false;
        let mut fds = Vec::with_capacity(4);
        let watching = confirm.served.watching.clone();
        let writing = confirm.served.writing.clone();
        // From now on the loop's writes change this watch's mask (quiet.rs).
        self.quiet = Some(writing.clone());
        if self.watched.is_some() {
            let _ = self.add();
        }
        let mut quiet_on = false;
        loop {
            // The loop may be waiting to open another file (FileGate).
            confirm.release_if_gate_moved();
            let on = self.watched.is_some() && confirm.wal_mode() && !hub.following();
            watching.store(on, Ordering::Relaxed);
            if on != quiet_on {
                writing.quiet.enable(on);
                quiet_on = on;
            }
            if hub.set_key(confirm.served.gate.allowed())
                && !self.hub_changed(&hub, &following, &events)
            {
                return;
            }
            let now = Instant::now();
            if self.watched.is_none() || now >= next_check {
                next_check = now + Duration::from_secs(1);
                if !self.current() && self.add().is_ok() {
                    log::info!("event=watch_restored dir={}", self.dir.display());
                    confirm.reset();
                    if events.send(Event::Wake).is_err() {
                        return;
                    }
                }
            }
            let mut until = if self.watched.is_some() {
                next_check
            } else {
                Instant::now() + REWATCH
            };
            if let Some((t, _)) = recheck {
                until = until.min(t);
            }
            if let Some(t) = hub.due() {
                until = until.min(t);
            }
            if let Some(t) = confirm.full_due() {
                until = until.min(t);
            }
            // While a commit is awaited, its further page writes do not wake
            // us (one wake per page would be a dozen per commit): the
            // schedule does, and drains them.
            let inotify = if recheck.is_some() {
                -1
            } else {
                self.fd.as_raw_fd()
            };
            // The end of the loop's write, while one is awaited; or the
            // loop, after a write the folder did not hear, telling us to
            // look (quiet.rs).
            let done = writing.done_fd();
            fds.clear();
            fds.push(fifo::pollfd(inotify, libc::POLLIN));
            fds.push(fifo::pollfd(stop_fd, libc::POLLIN));
            fds.push(fifo::pollfd(done, libc::POLLIN));
            hub.pollfds(&mut fds);
            if ppoll(&mut fds, until).is_err() {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            if fds[1].revents != 0 {
                let _ = events.send(Event::Stop);
                return;
            }
            let turn = match confirm.served.conversations.lock() {
                Ok(mine) => hub.turn(&fds[3..], &mine),
                Err(_) => crate::hub::Turn::default(),
            };
            if turn.changed && !self.hub_changed(&hub, &following, &events) {
                return;
            }
            // Woken by the leader: it saw a commit with work for us.
            if turn.look && events.send(Event::Changed).is_err() {
                return;
            }
            let ended = fds[2].revents != 0;
            if ended {
                writing.drain_done();
            }
            let mut look = ended || recheck.is_some_and(|(t, _)| Instant::now() >= t);
            if look || fds[0].revents != 0 {
                let d = self.drain();
                if d.relevant && !d.writes_only {
                    // Another file at the path, or none: the loop finds out.
                    // The connection is not dropped here but by the gate
                    // (release_stale, on the path's inode): a fresh one
                    // opened mid `rm -r` would create a -wal in a folder
                    // being removed.
                    confirm.release_stale();
                    recheck = None;
                    if events.send(Event::Wake).is_err() {
                        return;
                    }
                    continue;
                }
                // The loop's own pages (Served::writing): look when it is
                // done, told by the loop (on the timer's last step, 5 ms, as
                // a safety net) or on the timer, less often while it stays
                // writing (a BEGIN waiting out another writer's lock takes
                // long).
                let wait = match writing.await_end() {
                    Awaiting::Over => None,
                    Awaiting::Told => Some(crate::RECHECK.len() - 1),
                    Awaiting::Timer => Some(match recheck {
                        Some((_, s)) if deferring => (s + 1).min(crate::RECHECK.len() - 1),
                        _ => 0,
                    }),
                };
                if let Some(step) = wait {
                    deferring = true;
                    recheck = Some((Instant::now() + crate::RECHECK[step], step));
                    continue;
                }
                deferring = false;
                // In WAL mode a write to the bridge file alone is a
                // checkpoint, never a commit: looking at it would start a
                // recheck schedule that holds back the next real commit.
                look |= d.relevant && (d.wal_written || !confirm.wal_mode());
            }
            if !look {
                if confirm.full_due().is_some_and(|t| Instant::now() >= t) {
                    match self.look_for_work(&mut hub, &mut confirm, &following, &events) {
                        Err(()) => return,
                        Ok(Some(ev)) => {
                            if events.send(ev).is_err() {
                                return;
                            }
                        }
                        Ok(None) => {}
                    }
                }
                continue;
            }
            // Asked after the drain above and before the header is read: a
            // commit whose writes were drained is in the header by then, or
            // its writer (another process) still holds the WAL write lock.
            let busy = confirm.writer_active();
            let ev = match confirm.moved() {
                Some(true) => {
                    // The header may show an earlier commit than the one
                    // being made: look again within microseconds. The
                    // writes still queued are not drained here: they may
                    // be the start of another process's commit, which
                    // would then wake nobody (a pickup ~100 ms late, at
                    // the loop's own data_version timer).
                    recheck = (busy == Some(true)).then(|| (Instant::now() + busy_recheck(0), 0));
                    match self.look_for_work(&mut hub, &mut confirm, &following, &events) {
                        Err(()) => return,
                        Ok(Some(ev)) => ev,
                        // Nothing for us: the loop sleeps on.
                        Ok(None) => continue,
                    }
                }
                Some(false) if busy == Some(false) => {
                    // No commit is on its way: the writes were this
                    // process's own, a checkpoint's or a rollback's.
                    recheck = None;
                    continue;
                }
                Some(false) if busy == Some(true) => {
                    // Another process is writing: look again soon, and for
                    // as long as it holds the lock (a long write
                    // transaction costs a look every few ms, no more).
                    let step = recheck.map_or(0, |(_, s)| (s + 1).min(BUSY_STEPS - 1));
                    recheck = Some((Instant::now() + busy_recheck(step), step));
                    continue;
                }
                Some(false) => {
                    // Cannot tell whether a commit is on its way (no WAL
                    // index): look again less and less often.
                    let step = recheck.map_or(0, |(_, s)| s + 1);
                    recheck = crate::RECHECK
                        .get(step)
                        .map(|d| (Instant::now() + *d, step));
                    continue;
                }
                None => {
                    recheck = None;
                    hub.wake_all();
                    Event::Wake
                }
            };
            if events.send(ev).is_err() {
                return;
            }
        }
    }

    /// A commit showed (or a full look is owed, [`FULL_LOOK`]): wake the
    /// followers with something to claim, and say what this poller's loop
    /// should hear (None: nothing for it). Err when the loop is gone.
    fn look_for_work(
        &mut self,
        hub: &mut Hub,
        confirm: &mut Confirm,
        following: &AtomicBool,
        events: &Sender<Event>,
    ) -> Result<Option<Event>, ()> {
        let new = confirm.new_work();
        let handed_over = hub.after_commit(|session, names| match &new {
            Some(new) => Some(
                names
                    .iter()
                    .filter(|n| new.iter().any(|(c, s)| *s == session && c == *n))
                    .map(|n| n.to_string())
                    .collect(),
            ),
            None => confirm.claimable(session, names),
        });
        if handed_over && !self.hub_changed(hub, following, events) {
            return Err(());
        }
        let own = match &new {
            Some(new) => confirm.serves_any(new),
            None => confirm.work(),
        };
        if own == Some(true) {
            hub.own_work();
        }
        Ok(match own {
            Some(true) => Some(Event::Changed),
            Some(false) => None,
            None => Some(Event::Wake),
        })
    }

    /// The hub role changed: listen for writes unless another poller
    /// watches for us, tell the loop, and have it look for work (wake-ups
    /// may have been missed meanwhile). False when the loop is gone.
    fn hub_changed(&mut self, hub: &Hub, following: &AtomicBool, events: &Sender<Event>) -> bool {
        let f = hub.following();
        following.store(f, Ordering::Relaxed);
        self.set_mask(if f { FOLLOWER_MASK } else { MASK });
        log::info!(
            "event=hub role={}",
            if f {
                "follower"
            } else if hub.leading() {
                "leader"
            } else {
                "alone"
            }
        );
        events.send(Event::Wake).is_ok()
    }

    /// For other files (the tokens file): send `make()` for each burst of
    /// relevant events, and also when `hangup` (a SIGHUP,
    /// [`crate::tokens::Hangup`]) becomes readable; [`Event::Stop`] when told
    /// to stop.
    pub fn run_files(
        self,
        stop_fd: RawFd,
        hangup: Option<crate::tokens::Hangup>,
        events: Sender<Event>,
        make: fn() -> Event,
    ) {
        self.run_loop(stop_fd, hangup.as_ref(), |n| match n {
            Notice::Changed => events.send(make()).is_ok(),
            Notice::Stop => {
                let _ = events.send(Event::Stop);
                false
            }
        });
    }
}

impl Watch {
    /// Run until `stop` is readable or `notify` returns false: call
    /// `notify(Notice::Changed)` for each burst of relevant events (and when
    /// a lost watch is restored), `notify(Notice::Stop)` once when told to
    /// stop. The caller confirms a change itself (`PRAGMA data_version`);
    /// used by `autopoll mcp`'s `ask_shard` waiter.
    pub fn run_with(self, stop_fd: RawFd, notify: impl FnMut(Notice) -> bool) {
        self.run_loop(stop_fd, None, notify);
    }

    /// The loop of [`Watch::run_with`] and [`Watch::run_files`]: a readable
    /// `hangup` (SIGHUP) counts as a change too.
    fn run_loop(
        mut self,
        stop_fd: RawFd,
        hangup: Option<&crate::tokens::Hangup>,
        mut notify: impl FnMut(Notice) -> bool,
    ) {
        let mut next_check = Instant::now() + Duration::from_secs(1);
        loop {
            let now = Instant::now();
            if self.watched.is_none() || now >= next_check {
                next_check = now + Duration::from_secs(1);
                if !self.current() && self.add().is_ok() {
                    log::info!("event=watch_restored dir={}", self.dir.display());
                    if !notify(Notice::Changed) {
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
                fifo::pollfd(hangup.map_or(-1, |h| h.fd()), libc::POLLIN),
            ];
            if fifo::poll(&mut fds, Some(until)).is_err() {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            if fds[1].revents != 0 {
                notify(Notice::Stop);
                return;
            }
            let mut changed = false;
            if fds[2].revents != 0
                && let Some(h) = hangup
            {
                h.drain();
                log::info!("event=sighup: reading the tokens file again");
                changed = true;
            }
            if fds[0].revents != 0 && self.drain().relevant {
                changed = true;
            }
            if changed && !notify(Notice::Changed) {
                return;
            }
        }
    }
}

/// What [`Watch::run_with`] tells its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    /// The bridge file (or its WAL, or its folder) changed: maybe a commit
    /// by anyone, ourselves included (confirm with `PRAGMA data_version`).
    Changed,
    /// The stop descriptor became readable.
    Stop,
}

/// Whether the bridge's content changed: `PRAGMA data_version` on a
/// read-only connection of the watch thread's own (it moves on any commit
/// by another connection, the poller's own included).
struct Confirm {
    path: PathBuf,
    conn: Option<rusqlite::Connection>,
    seen: Option<i64>,
    served: Served,
    /// The WAL index of the file `conn` has open, and its header at the last
    /// look ([`crate::shm`]): while there, a look is one `pread` instead of a
    /// `stat` and a read transaction. Closed whenever `conn` is.
    wal: Option<(WalIndex, Stamp)>,
    /// The gate's generation at the last full check, and when the next one
    /// is due anyway.
    gate_seen: u64,
    next_gate_check: Instant,
    /// Where the next look at new messages starts ([`Confirm::new_work`]);
    /// None until a full look set it, and whenever `conn` is closed.
    after: Option<i64>,
    /// When the next full look is due.
    next_full: Instant,
    /// A commit was looked at with new rows only: a full look is owed by
    /// `next_full` (the commit may have released a claim).
    full_owed: bool,
}

/// How often a look covers every conversation served or followed, not
/// only the messages added since the last one
/// ([`autopoll_bridge::new_claimable_on`]): a
/// claim released (a poller stopping, an ask that failed) or a lease run
/// out shows no new row, and is found at most this late. It is found
/// sooner by the follower itself when the leader is slow (its own look
/// once a second).
pub const FULL_LOOK: Duration = Duration::from_millis(100);

/// How often the watch checks, with a `stat`, that the path still names the
/// file its connection has open, when nothing else made it look.
const GATE_CHECK: Duration = Duration::from_millis(100);

/// The conversations a poller serves and its session, shared with the
/// watch thread (the poller's loop updates them when its tokens file
/// changes).
#[derive(Clone, Debug)]
pub struct Served {
    /// The session answered for.
    pub session: autopoll_bridge::Session,
    /// The conversation ids claimed for.
    pub conversations: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// Which bridge file the watch thread may have open.
    pub gate: std::sync::Arc<FileGate>,
    /// Whether another poller watches the bridge for this one
    /// ([`crate::hub`]): the loop's own look at `data_version` may then be
    /// rarer.
    pub following: std::sync::Arc<AtomicBool>,
    /// Whether this thread watches the file itself and confirms commits
    /// from its WAL index (the folder watched, a connection open, the file
    /// in WAL mode): every commit reaches the loop as an event, so its own
    /// look at `data_version` is only a safety net and may be rarer too.
    pub watching: std::sync::Arc<AtomicBool>,
    /// Whether the loop is in one of its write transactions of the hot path
    /// (a claim, an answer commit: [`Writing`]). Nobody else can commit
    /// while it holds the write lock, so the page writes that wake this
    /// thread meanwhile are the loop's own: the thread drains them, stops
    /// listening and looks once the write is over, instead of waking once
    /// a page (each such wake-up also cost the writing thread a cross-core
    /// wake inside its `pwrite`). Where it can, the loop keeps its pages
    /// from being heard at all ([`crate::quiet`]) and rings only when
    /// someone else may have written meanwhile.
    pub writing: std::sync::Arc<WriteFlag>,
    /// The loop's own commits on the hot path ([`crate::own`]): a header
    /// moved by them alone is not looked at.
    pub own: std::sync::Arc<crate::own::OwnCommits>,
}

/// The loop's write transactions of the hot path as the watch thread sees
/// them ([`Served::writing`]): whether one is under way, and, when the
/// watch was woken by its pages, a wake-up when it ends. The watch used to
/// look again on a timer instead (40, 40, 80 ... us), three or four
/// wake-ups for each claim and answer commit, on the core the loop was
/// writing from.
#[derive(Debug)]
pub struct WriteFlag {
    writing: AtomicBool,
    /// The watch waits for the write under way to end.
    awaited: AtomicBool,
    /// Rung when an awaited write ends (None: no pipe could be made, and
    /// the watch looks again on its timer), or when one the folder did not
    /// hear may have let another's commit go unheard.
    done: Option<fifo::Waker>,
    /// The folder's `IN_MODIFY` off while the loop writes ([`crate::quiet`]).
    pub quiet: crate::quiet::Quiet,
}

impl Default for WriteFlag {
    fn default() -> WriteFlag {
        WriteFlag {
            writing: AtomicBool::new(false),
            awaited: AtomicBool::new(false),
            done: fifo::Waker::new().ok(),
            quiet: crate::quiet::Quiet::default(),
        }
    }
}

/// What [`WriteFlag::await_end`] arranged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Awaiting {
    /// The end of the write rings [`WriteFlag::done_fd`].
    Told,
    /// No pipe: look again on a timer.
    Timer,
    /// The write is already over: look now.
    Over,
}

impl WriteFlag {
    /// Whether a write transaction of the loop is under way.
    pub fn active(&self) -> bool {
        self.writing.load(Ordering::SeqCst)
    }

    /// Ask to be woken when the write under way ends. Either the loop's
    /// [`Writing`] sees the request when it ends (and rings), or this sees
    /// the write already over: both flags are sequentially consistent.
    fn await_end(&self) -> Awaiting {
        if self.done.is_none() {
            return if self.active() {
                Awaiting::Timer
            } else {
                Awaiting::Over
            };
        }
        self.awaited.store(true, Ordering::SeqCst);
        if self.active() {
            Awaiting::Told
        } else {
            self.awaited.store(false, Ordering::SeqCst);
            Awaiting::Over
        }
    }

    /// The descriptor [`WriteFlag::await_end`]'s wake-up makes readable (-1: none).
    pub(crate) fn done_fd(&self) -> RawFd {
        self.done.as_ref().map_or(-1, |w| w.fd())
    }

    /// Consume the wake-ups of writes that ended.
    pub(crate) fn drain_done(&self) {
        if let Some(w) = &self.done {
            w.drain();
        }
    }
}

/// Marks [`Served::writing`] for as long as it lives, with the folder's
/// writes unheard meanwhile when that can be done ([`crate::quiet`]).
pub struct Writing<'a> {
    flag: &'a WriteFlag,
    /// The WAL index header before the folder stopped listening.
    hushed: Option<Stamp>,
}

impl<'a> Writing<'a> {
    /// The loop starts a write transaction.
    pub fn start(flag: &'a WriteFlag) -> Writing<'a> {
        // Only with a pipe to ring the watch when it must look after.
        let hushed = flag.done.as_ref().and_then(|_| flag.quiet.hush());
        flag.writing.store(true, Ordering::SeqCst);
        Writing { flag, hushed }
    }
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        let f = self.flag;
        let look = self.hushed.as_ref().is_some_and(|h| f.quiet.restore(h));
        f.writing.store(false, Ordering::SeqCst);
        if (f.awaited.swap(false, Ordering::SeqCst) || look)
            && let Some(w) = &f.done
        {
            w.wake();
        }
    }
}

/// Which bridge file (inode) the watch thread may open, and which it has
/// open. SQLite finds a file's `-wal` and `-shm` by name: two connections of
/// one process on two files that had the same path (the bridge replaced by
/// `mv`) share the `-shm`, and the second to open it truncates it under the
/// first, whose next read of it is a SIGBUS. So the watch opens only the
/// file the poller's loop has open ([`FileGate::allow`]), lets go of it as
/// soon as the path names another, and the loop opens a new file only once
/// the watch holds no other ([`FileGate::clear_to_open`]).
#[derive(Debug, Default)]
pub struct FileGate {
    state: std::sync::Mutex<GateState>,
    /// Bumped by every [`FileGate::allow`]: the watch re-checks the gate
    /// when it moved.
    generation: std::sync::atomic::AtomicU64,
}

#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct GateState {
    /// The file the loop has open.
    pub(crate) allowed: Option<FileId>,
    /// The file the watch thread has open.
    held: Option<FileId>,
    /// The file the checkpoint thread has open ([`crate::checkpoint`]).
    pub(crate) checkpointer: Option<FileId>,
}

impl FileGate {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The loop has `id` open now (None: none, it closed its connection).
    pub fn allow(&self, id: Option<FileId>) {
        self.lock().allowed = id;
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// The file the loop has open.
    pub fn allowed(&self) -> Option<FileId> {
        self.lock().allowed
    }

    /// Whether the loop may open `id`: neither the watch nor the
    /// checkpoint thread holds another file.
    pub fn clear_to_open(&self, id: FileId) -> bool {
        let g = self.lock();
        g.held.is_none_or(|h| h == id) && g.checkpointer.is_none_or(|h| h == id)
    }
}

impl Confirm {
    fn new(path: &Path, served: Served) -> Confirm {
        Confirm {
            path: path.to_path_buf(),
            conn: None,
            seen: None,
            served,
            wal: None,
            gate_seen: 0,
            next_gate_check: Instant::now(),
            after: None,
            next_full: Instant::now(),
            full_owed: false,
        }
    }

    /// At a commit: the conversations and sessions with a new message to
    /// claim, from the rows added since the last look; None when every
    /// conversation must be looked at ([`Confirm::work`],
    /// [`Confirm::claimable`]): the first look on a connection, one every
    /// [`FULL_LOOK`], and whenever the new rows cannot tell.
    fn new_work(&mut self) -> Option<Vec<(String, autopoll_bridge::Session)>> {
        let conn = self.conn.as_ref()?;
        let now = Instant::now();
        if let Some(after) = self.after
            && now < self.next_full
            && let Ok(Some(w)) = autopoll_bridge::new_claimable_on(conn, after)
        {
            self.after = Some(w.last_id);
            self.full_owed = true;
            return Some(w.claimable);
        }
        // A full look follows: new rows are counted from before it (a row
        // added meanwhile is seen twice, never missed).
        self.after = autopoll_bridge::last_message_id(conn).ok();
        self.next_full = now + FULL_LOOK;
        self.full_owed = false;
        None
    }

    /// When a full look is owed ([`Confirm::new_work`]).
    fn full_due(&self) -> Option<Instant> {
        (self.full_owed && self.conn.is_some()).then_some(self.next_full)
    }

    /// Whether a served conversation has something to claim (None: cannot
    /// tell, so the loop should look itself).
    fn work(&mut self) -> Option<bool> {
        let names: Vec<String> = self.served.conversations.lock().ok()?.clone();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        match autopoll_bridge::claimable_on(self.conn.as_ref()?, &refs, self.served.session) {
            Ok(found) => Some(!found.is_empty()),
            Err(_) => None,
        }
    }

    /// Whether one of `new` is a conversation this poller serves, in its
    /// session (None: cannot tell).
    fn serves_any(&self, new: &[(String, autopoll_bridge::Session)]) -> Option<bool> {
        let mine = self.served.conversations.lock().ok()?;
        Some(
            new.iter()
                .any(|(c, s)| *s == self.served.session && mine.contains(c)),
        )
    }

    /// Which of `names` (in `session`) have something to claim, on this
    /// thread's connection (None: cannot tell).
    fn claimable(&self, session: autopoll_bridge::Session, names: &[&str]) -> Option<Vec<String>> {
        autopoll_bridge::claimable_on(self.conn.as_ref()?, names, session).ok()
    }

    /// Forget the connection (the file at the path may be another one now).
    fn reset(&mut self) {
        let mut g = self.served.gate.lock();
        self.wal = None;
        self.conn = None;
        self.seen = None;
        self.after = None;
        self.full_owed = false;
        g.held = None;
    }

    /// Let go of a connection the loop no longer allows (it closed its own,
    /// or the path names another file), without opening one.
    fn release_stale(&mut self) {
        if self.conn.is_some() {
            self.next_gate_check = Instant::now() + GATE_CHECK;
            self.gate_seen = self
                .served
                .gate
                .generation
                .load(std::sync::atomic::Ordering::SeqCst);
            self.gated();
        }
    }

    /// [`Confirm::release_stale`] when the loop changed the gate since the
    /// last check, or [`GATE_CHECK`] after it; otherwise nothing (not even
    /// a `stat`: this runs on every wake).
    fn release_if_gate_moved(&mut self) {
        let generation = self
            .served
            .gate
            .generation
            .load(std::sync::atomic::Ordering::SeqCst);
        if generation != self.gate_seen || Instant::now() >= self.next_gate_check {
            self.release_stale();
        }
    }

    /// Keep a connection only on the file the loop has open, and only while
    /// the path still names it ([`FileGate`]); open one when allowed.
    /// Whether a connection is there to use.
    fn gated(&mut self) -> bool {
        let at_path = match crate::conn::look(&self.path) {
            crate::conn::Seen::File(sig) => Some(sig.id),
            crate::conn::Seen::Missing(_) => None,
        };
        let mut g = self.served.gate.lock();
        let ok = at_path.is_some() && g.allowed == at_path;
        if !ok || (self.conn.is_some() && g.held != at_path) {
            // Closed under the lock: the loop opens no other file meanwhile.
            self.wal = None;
            self.conn = None;
            self.seen = None;
            self.after = None;
            self.full_owed = false;
            g.held = None;
            return false;
        }
        if self.conn.is_none() {
            let c = rusqlite::Connection::open_with_flags(
                &self.path,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
                    | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
            );
            // Bounded: a checkpoint or recovery holding the index is waited
            // out briefly; past that the loop is woken unconfirmed.
            // One plan per statement: the look binds the time, which moves
            // on every wake, and SQLite (built with STAT4) would otherwise
            // compile it again each time (most of an idle poller's cost
            // per commit by others).
            let ready = c.and_then(|c| {
                c.busy_timeout(Duration::from_millis(50))?;
                c.set_db_config(
                    rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
                    true,
                )?;
                Ok(c)
            });
            match ready {
                Ok(c) => {
                    self.conn = Some(c);
                    g.held = at_path;
                }
                Err(_) => return false,
            }
        }
        true
    }

    /// Whether another process is in a write transaction on the file
    /// ([`WalIndex::writer_active`]); None without the WAL index.
    fn writer_active(&self) -> Option<bool> {
        self.conn.as_ref()?;
        self.wal.as_ref()?.0.writer_active()
    }

    /// Whether the file is known to be in WAL mode: this thread reads its
    /// WAL index.
    fn wal_mode(&self) -> bool {
        self.wal.is_some()
    }

    /// Some(true): a commit by someone else than the loop's hot path
    /// showed since the last look; Some(false): none did; None: cannot tell
    /// (no file, not SQLite, busy, just opened, the file at the path not
    /// the loop's).
    ///
    /// With the WAL index open, a look reads its header (one `pread`); a
    /// header moved by the loop's own claims and answer commits alone
    /// ([`crate::own`]) has nothing new to look at. A header caught while
    /// it is being written is confirmed the slow way, with `PRAGMA
    /// data_version`, which counts the loop's commits too.
    fn moved(&mut self) -> Option<bool> {
        if self.conn.is_some()
            && let Some((idx, last)) = self.wal.as_mut()
        {
            let now = idx.stamp();
            if let Stamp::Header(_) = now {
                let before = std::mem::replace(last, now);
                return Some(now != before && !self.served.own.explains(&before, &now));
            }
        }
        if !self.gated() {
            return None;
        }
        let version = |c: &rusqlite::Connection| {
            c.prepare_cached("PRAGMA data_version")
                .and_then(|mut s| s.query_row([], |r| r.get::<_, i64>(0)))
        };
        let mut v = version(self.conn.as_ref()?);
        if let Ok(first) = v {
            // Our connection has the WAL index open now: read its header
            // from here on. A commit after this header shows at the next
            // look; one before it, in data_version read again.
            let idx = match self.wal.take() {
                Some((idx, _)) => Some(idx),
                None => WalIndex::open(&self.path),
            };
            if let Some(idx) = idx
                && let now @ Stamp::Header(_) = idx.stamp()
            {
                self.wal = Some((idx, now));
                v = version(self.conn.as_ref()?).or(Ok(first));
            }
        }
        match v {
            Ok(v) => {
                let before = self.seen.replace(v);
                before.map(|b| b != v)
            }
            Err(_) => {
                self.reset();
                None
            }
        }
    }
}

/// poll(2) with microsecond precision (ppoll), until `deadline`.
fn ppoll(fds: &mut [libc::pollfd], deadline: Instant) -> io::Result<usize> {
    let d = deadline.saturating_duration_since(Instant::now());
    let ts = libc::timespec {
        tv_sec: d.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(d.subsec_nanos() as i32),
    };
    // SAFETY: valid pollfd slice, timespec and a null signal mask.
    let rc = unsafe {
        libc::ppoll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            &ts,
            std::ptr::null(),
        )
    };
    if rc >= 0 {
        return Ok(rc as usize);
    }
    let e = io::Error::last_os_error();
    if e.kind() == io::ErrorKind::Interrupted {
        return Ok(0);
    }
    Err(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    use autopoll_bridge::{Bridge, Session};

    fn served(db: &Path, conversation: &str) -> Served {
        let s = Served {
            session: Session::B,
            conversations: std::sync::Arc::new(std::sync::Mutex::new(vec![
                conversation.to_string(),
            ])),
            gate: std::sync::Arc::new(FileGate::default()),
            following: Default::default(),
            watching: Default::default(),
            writing: Default::default(),
            own: Default::default(),
        };
        match crate::conn::look(db) {
            crate::conn::Seen::File(sig) => s.gate.allow(Some(sig.id)),
            crate::conn::Seen::Missing(why) => panic!("no bridge: {why}"),
        }
        s
    }

    /// A fresh bridge `bridge.db` in `dir`, a connection to it and a
    /// conversation in it.
    fn bridge_with_conversation(
        dir: &Path,
    ) -> (std::path::PathBuf, Bridge, autopoll_bridge::NewConversation) {
        let db = dir.join("bridge.db");
        let mut b = Bridge::open_or_create(&db).unwrap();
        let conv = b
            .create_conversation("c", "s", Duration::from_secs(3600))
            .unwrap();
        (db, b, conv)
    }

    #[test]
    fn a_commit_on_its_way_is_looked_at_after_three_close_steps_then_the_loops_schedule() {
        let us: Vec<u128> = (0..BUSY_STEPS + 2)
            .map(|k| busy_recheck(k.min(BUSY_STEPS - 1)).as_micros())
            .collect();
        assert_eq!(
            us,
            [
                20, 20, 20, 40, 80, 160, 320, 640, 1250, 2500, 5000, 5000, 5000
            ]
        );
    }

    #[test]
    fn commits_by_another_connection_are_seen_through_the_wal_index_and_reads_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let (db, mut writer, mine) = bridge_with_conversation(dir.path());
        let other = writer
            .create_conversation("c", "s", Duration::from_secs(3600))
            .unwrap();
        let mut confirm = Confirm::new(&db, served(&db, &mine.conversation_id));
        assert_eq!(
            confirm.moved(),
            None,
            "the first look has nothing to compare"
        );
        assert!(
            confirm.wal.is_some(),
            "after its first read the watch looks at the WAL index"
        );
        assert_eq!(confirm.moved(), Some(false));
        // Another conversation's question: a commit, but no work for us.
        writer
            .send(
                &other.conversation_id,
                Session::A,
                &other.session_a_token,
                "not for us",
                None,
            )
            .unwrap();
        assert_eq!(confirm.moved(), Some(true), "a commit by anyone shows");
        assert_eq!(confirm.work(), Some(false));
        assert_eq!(confirm.moved(), Some(false), "once");
        // Reading changes nothing.
        let _ = writer.claimable(&[mine.conversation_id.as_str()], Session::B);
        assert_eq!(confirm.moved(), Some(false));
        writer
            .send(
                &mine.conversation_id,
                Session::A,
                &mine.session_a_token,
                "for us",
                None,
            )
            .unwrap();
        assert_eq!(confirm.moved(), Some(true));
        assert_eq!(confirm.work(), Some(true));
        assert!(confirm.wal.is_some(), "still on the cheap path");
        // The loop lets go of the file: so does the watch, WAL index included.
        confirm.served.gate.allow(None);
        confirm.release_if_gate_moved();
        assert!(confirm.conn.is_none() && confirm.wal.is_none());
    }

    #[test]
    fn the_loops_own_commits_are_not_looked_at_and_anyone_elses_around_them_are() {
        let dir = tempfile::tempdir().unwrap();
        // The coordinator's connection, and the loop's with its hooks.
        let (db, mut coordinator, conv) = bridge_with_conversation(dir.path());
        let mut looped = Bridge::open(&db).unwrap();
        let s = served(&db, &conv.conversation_id);
        crate::own::install(
            looped.connection_mut(),
            &db,
            s.writing.clone(),
            s.own.clone(),
        );
        let writing = s.writing.clone();
        let mut confirm = Confirm::new(&db, s);
        let _ = confirm.moved();
        assert_eq!(confirm.moved(), Some(false));
        let send = |b: &mut Bridge| {
            b.send(
                &conv.conversation_id,
                Session::A,
                &conv.session_a_token,
                "a question",
                None,
            )
            .unwrap()
        };
        // The loop's commits on the hot path, one after another: not a move.
        for _ in 0..2 {
            let _w = Writing::start(&writing);
            send(&mut looped);
        }
        assert_eq!(confirm.moved(), Some(false), "the loop's own commits");
        // Someone else's commit just before the loop's: still seen.
        send(&mut coordinator);
        {
            let _w = Writing::start(&writing);
            send(&mut looped);
        }
        assert_eq!(confirm.moved(), Some(true), "a commit before the loop's");
        // ... and just after it.
        {
            let _w = Writing::start(&writing);
            send(&mut looped);
        }
        send(&mut coordinator);
        assert_eq!(confirm.moved(), Some(true), "a commit after the loop's");
        // Between two of the loop's.
        {
            let _w = Writing::start(&writing);
            send(&mut looped);
        }
        send(&mut coordinator);
        {
            let _w = Writing::start(&writing);
            send(&mut looped);
        }
        assert_eq!(confirm.moved(), Some(true), "a commit between the loop's");
        // A commit of the loop outside the hot path (a release, say) is
        // looked at like anyone's.
        send(&mut looped);
        assert_eq!(confirm.moved(), Some(true), "off the hot path");
        assert_eq!(confirm.moved(), Some(false));
    }

    /// Whether `fd` is readable now.
    fn readable(fd: RawFd) -> bool {
        let mut fds = [fifo::pollfd(fd, libc::POLLIN)];
        fifo::poll(&mut fds, Some(Instant::now())).unwrap();
        fds[0].revents != 0
    }

    #[test]
    fn the_end_of_an_awaited_write_rings_and_an_unawaited_one_does_not() {
        let flag = WriteFlag::default();
        assert!(flag.done_fd() >= 0);
        // Not writing: nothing to wait for.
        assert_eq!(flag.await_end(), Awaiting::Over);
        {
            let _w = Writing::start(&flag);
            assert!(flag.active());
        }
        assert!(!readable(flag.done_fd()), "nobody waited for that write");
        let w = Writing::start(&flag);
        assert_eq!(flag.await_end(), Awaiting::Told);
        assert!(!readable(flag.done_fd()), "still writing");
        drop(w);
        assert!(!flag.active());
        assert!(readable(flag.done_fd()), "the awaited write ended");
        flag.drain_done();
        assert!(!readable(flag.done_fd()));
        // Once per request: the next write is not awaited.
        drop(Writing::start(&flag));
        assert!(!readable(flag.done_fd()));
    }

    #[test]
    fn a_write_ending_while_the_watch_asks_is_never_missed() {
        // The loop's thread writes and ends writes as fast as it can; the
        // watch's side asks each time: every Told is followed by a ring.
        let flag = std::sync::Arc::new(WriteFlag::default());
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let writer = {
            let (flag, stop) = (flag.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let w = Writing::start(&flag);
                    // A write of a few hundred nanoseconds.
                    for _ in 0..200 {
                        std::hint::spin_loop();
                    }
                    drop(w);
                }
            })
        };
        let mut told = 0;
        let deadline = Instant::now() + Duration::from_secs(30);
        while told < 500 && Instant::now() < deadline {
            if flag.await_end() == Awaiting::Told {
                told += 1;
                // Rung within the writer's next few writes at the latest.
                let mut fds = [fifo::pollfd(flag.done_fd(), libc::POLLIN)];
                fifo::poll(&mut fds, Some(Instant::now() + Duration::from_secs(10))).unwrap();
                assert!(fds[0].revents != 0, "a Told without a ring");
                flag.drain_done();
            }
        }
        stop.store(true, Ordering::SeqCst);
        writer.join().unwrap();
        assert_eq!(told, 500, "the writer was caught writing too rarely");
    }

    #[test]
    fn without_a_pipe_the_loops_writes_stay_heard() {
        // Nothing could ring the watch after a write it did not hear.
        let dir = tempfile::tempdir().unwrap();
        let (db, conn) = crate::shm::wal_file(dir.path());
        let flag = WriteFlag {
            writing: AtomicBool::new(false),
            awaited: AtomicBool::new(false),
            done: None,
            quiet: crate::quiet::Quiet::default(),
        };
        let mut w = Watch::new(&db).unwrap();
        let c = CString::new(dir.path().as_os_str().as_bytes()).unwrap();
        assert!(flag.quiet.add(w.fd.as_raw_fd(), &c, w.mask) >= 0);
        flag.quiet.set_index(
            WalIndex::open(&db),
            std::sync::Arc::new(crate::own::OwnCommits::default()),
        );
        flag.quiet.enable(true);
        w.drain();
        {
            let _w = Writing::start(&flag);
            conn.execute("INSERT INTO t VALUES (1)", []).unwrap();
        }
        assert!(
            w.drain().wal_written,
            "the write went unheard with no pipe to ring"
        );
    }

    #[test]
    fn without_a_pipe_the_watch_falls_back_to_its_timer() {
        let flag = WriteFlag {
            writing: AtomicBool::new(false),
            awaited: AtomicBool::new(false),
            done: None,
            quiet: crate::quiet::Quiet::default(),
        };
        assert_eq!(flag.await_end(), Awaiting::Over);
        let _w = Writing::start(&flag);
        assert_eq!(flag.await_end(), Awaiting::Timer);
        assert_eq!(flag.done_fd(), -1);
    }
}
