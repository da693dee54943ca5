//! One bridge watch for all of a user's pollers on one host: a hub.
//!
//! inotify cannot tell which conversation a commit is for, so without this
//! every poller process on a bridge file wakes for every commit by anyone
//! and looks for work it rarely has: sixteen pollers, one per conversation,
//! took most of a core while one conversation was busy. With the hub, the
//! first poller on a file becomes its **leader**: its watch thread (the one
//! it has anyway) confirms each commit and runs one read-only look for the
//! conversations of every poller that joined, then wakes only the pollers
//! that have something to claim. The others, **followers**, watch the
//! folder only for the bridge file being created, renamed or removed, and
//! sleep until the leader wakes them.
//!
//! The hub is a `SOCK_SEQPACKET` socket in Linux's abstract namespace, named
//! after the user and the bridge file's device and inode
//! (`autopoll/hub/1/UID/DEV:INO`): no file to clean up, the name goes with
//! its last holder, and a leader's death (a crash, `kill -9`) is a hang-up on
//! every follower's socket at once. The followers then elect the next leader
//! among themselves (the first to bind the name wins; the rest join it).
//!
//! Messages, one per packet:
//! - follower to leader: `{"v":1,"session":"b","conversations":[...]}`,
//!   the whole set it serves (sent again when it changes);
//! - leader to follower: `w`, "look for work now"; one is sent right after a
//!   subscription is taken, so a commit between a follower's own last look
//!   and its joining cannot be missed.
//!
//! Nothing rests on the hub for correctness: a follower's loop still looks
//! for work on its own once a second (a leader that is stopped, or a
//! stranger holding the name, costs at most that), a peer of another user
//! is refused on both sides (`SO_PEERCRED`), and a poller that cannot join
//! or lead watches the file itself, as every poller did before.

use std::collections::HashSet;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use autopoll_bridge::Session;
use autopoll_protocol::fifo;

use crate::conn::FileId;

/// The largest subscription message (a poller serving thousands of
/// conversations): past it the poller watches for itself.
pub const MAX_MESSAGE: usize = 256 * 1024;

/// While neither leading nor following, how soon to try again: quickly at
/// first (a leader that just bound its name listens a moment later), then
/// once a second.
const RETRY: [Duration; 5] = [
    Duration::from_millis(1),
    Duration::from_millis(5),
    Duration::from_millis(20),
    Duration::from_millis(100),
    Duration::from_secs(1),
];

/// What this poller is in the hub of its bridge file.
enum Role {
    /// Not in one (no file yet, or between tries): it watches for itself.
    Alone,
    /// It holds the name: it watches the file for everyone.
    Leader {
        listener: OwnedFd,
        followers: Vec<Follower>,
        /// When the handover counts last started again.
        since: Instant,
    },
    /// It joined a leader, which wakes it.
    Follower {
        sock: OwnedFd,
        /// The set last sent to the leader.
        sent: Vec<String>,
        /// The leader named it the next one.
        heir: bool,
    },
}

/// A poller that joined this leader.
struct Follower {
    sock: OwnedFd,
    /// What it serves (none until its first message).
    session: Option<Session>,
    conversations: HashSet<String>,
    /// Wake-ups with work sent to it since the leader last had work of
    /// its own (see [`HANDOVER_WAKES`]).
    woken: u32,
}

/// A leader with no work of its own that has woken one follower this many
/// times with work hands the hub over to it: reading every commit costs
/// a poller that has work nothing more, one that has none a share of a core.
pub const HANDOVER_WAKES: u32 = 64;

/// The counts behind a handover start again this often (a trickle is not
/// a busy follower).
const HANDOVER_WINDOW: Duration = Duration::from_secs(10);

/// After its leader goes, how long a follower not named heir waits before
/// trying to lead (it watches the file itself meanwhile): the heir binds
/// the name first.
const HEIR_HEAD_START: Duration = Duration::from_millis(20);

/// What a turn of the hub asks of the watch thread.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Turn {
    /// Look for work now (a follower woken by its leader).
    pub look: bool,
    /// The role changed: look for work (wake-ups may have been missed
    /// meanwhile), and set the folder watch's events for the new role.
    pub changed: bool,
}

/// This poller's place in the hub of the bridge file it has open.
pub struct Hub {
    uid: u32,
    session: Session,
    /// The file the hub is for (the one the poller's loop has open).
    key: Option<FileId>,
    role: Role,
    next_try: Instant,
    tries: usize,
    /// Reused receive buffer (a leader's; grown on first use).
    buf: Vec<u8>,
    /// A stranger's socket (another user) was refused: said once.
    warned: bool,
}

impl Hub {
    /// Not in a hub yet; [`Hub::set_key`] says for which file.
    pub fn new(session: Session) -> Hub {
        Hub {
            // SAFETY: getuid cannot fail.
            uid: unsafe { libc::getuid() },
            session,
            key: None,
            role: Role::Alone,
            next_try: Instant::now(),
            tries: 0,
            buf: Vec::new(),
            warned: false,
        }
    }

    /// Whether another poller watches the file for this one.
    pub fn following(&self) -> bool {
        matches!(self.role, Role::Follower { .. })
    }

    /// Whether this poller watches the file for others.
    pub fn leading(&self) -> bool {
        matches!(self.role, Role::Leader { .. })
    }

    /// How many pollers joined and said what they serve (a leader's).
    pub fn followers(&self) -> usize {
        match &self.role {
            Role::Leader { followers, .. } => {
                followers.iter().filter(|f| f.session.is_some()).count()
            }
            _ => 0,
        }
    }

    /// The file the poller has open now (None: none). A new file leaves the
    /// old file's hub; whether the role changed.
    pub fn set_key(&mut self, key: Option<FileId>) -> bool {
        if self.key == key {
            return false;
        }
        self.key = key;
        self.tries = 0;
        self.next_try = Instant::now();
        let was_alone = matches!(self.role, Role::Alone);
        if !was_alone {
            log::debug!("event=hub_left reason=\"another bridge file at the path\"");
        }
        self.role = Role::Alone;
        !was_alone
    }

    /// When [`Hub::turn`] should run next without an event: a try to join
    /// or lead, while alone with a file.
    pub fn due(&self) -> Option<Instant> {
        match (&self.role, self.key) {
            (Role::Alone, Some(_)) => Some(self.next_try),
            _ => None,
        }
    }

    /// The descriptors to poll, appended to `fds`.
    pub fn pollfds(&self, fds: &mut Vec<libc::pollfd>) {
        match &self.role {
            Role::Alone => {}
            Role::Leader {
                listener,
                followers,
                ..
            } => {
                fds.push(fifo::pollfd(listener.as_raw_fd(), libc::POLLIN));
                for f in followers {
                    fds.push(fifo::pollfd(f.sock.as_raw_fd(), libc::POLLIN));
                }
            }
            Role::Follower { sock, .. } => {
                fds.push(fifo::pollfd(sock.as_raw_fd(), libc::POLLIN));
            }
        }
    }

    /// Handle what [`Hub::pollfds`] polled (`fds`, in that order), try to
    /// join or lead when due, and send the set `mine` serves again if it
    /// changed.
    pub fn turn(&mut self, fds: &[libc::pollfd], mine: &[String]) -> Turn {
        let mut t = Turn::default();
        match &mut self.role {
            Role::Alone => {}
            Role::Leader {
                listener,
                followers,
                ..
            } => {
                if fds.first().is_some_and(|f| f.revents != 0) {
                    accept_all(listener.as_raw_fd(), self.uid, followers, &mut self.warned);
                }
                let mut gone = Vec::new();
                for (i, f) in followers.iter_mut().enumerate() {
                    if fds.get(i + 1).is_some_and(|p| p.revents != 0)
                        && !read_subscriptions(f, &mut self.buf)
                    {
                        gone.push(i);
                    }
                }
                for i in gone.into_iter().rev() {
                    followers.swap_remove(i);
                }
            }
            Role::Follower { sock, heir, .. } => {
                if fds.first().is_some_and(|f| f.revents != 0) {
                    let got = drain_wakes(sock.as_raw_fd());
                    t.look = got.wakes > 0;
                    *heir |= got.heir;
                    if got.gone {
                        // The heir binds the name first; the others join it.
                        self.tries = 0;
                        self.next_try = Instant::now()
                            + if *heir {
                                Duration::ZERO
                            } else {
                                HEIR_HEAD_START
                            };
                        self.role = Role::Alone;
                        t.changed = true;
                    }
                }
            }
        }
        if let Role::Follower { sock, sent, .. } = &mut self.role
            && sent.as_slice() != mine
        {
            let msg = subscription(self.session, mine);
            match msg.filter(|m| send(sock.as_raw_fd(), m).is_ok()) {
                Some(_) => *sent = mine.to_vec(),
                None => {
                    self.role = Role::Alone;
                    self.next_try = Instant::now() + RETRY[RETRY.len() - 1];
                    t.changed = true;
                }
            }
        }
        if matches!(self.role, Role::Alone)
            && let Some(key) = self.key
            && Instant::now() >= self.next_try
        {
            self.next_try = Instant::now() + RETRY[self.tries.min(RETRY.len() - 1)];
            self.tries += 1;
            if let Some(role) = self.try_join_or_lead(key, mine) {
                self.role = role;
                self.tries = 0;
                t.changed = true;
            }
        }
        t
    }

    /// The leader's own conversations had work at a commit: it stays
    /// leader (the handover counts start again).
    pub fn own_work(&mut self) {
        if let Role::Leader {
            followers, since, ..
        } = &mut self.role
        {
            restart_counts(followers, since);
        }
    }

    /// After a commit: `look(session, conversations)` says which of the
    /// joined pollers' conversations have something to claim (None: cannot
    /// tell); wake the followers with any. A leader's only. True when it
    /// handed the hub over ([`HANDOVER_WAKES`]): the role changed.
    pub fn after_commit(
        &mut self,
        mut look: impl FnMut(Session, &[&str]) -> Option<Vec<String>>,
    ) -> bool {
        let Role::Leader {
            followers, since, ..
        } = &mut self.role
        else {
            return false;
        };
        if followers.is_empty() {
            return false;
        }
        if since.elapsed() >= HANDOVER_WINDOW {
            restart_counts(followers, since);
        }
        let mut heir = None;
        for session in [Session::A, Session::B] {
            let mut names: Vec<&str> = followers
                .iter()
                .filter(|f| f.session == Some(session))
                .flat_map(|f| f.conversations.iter().map(String::as_str))
                .collect();
            if names.is_empty() {
                continue;
            }
            names.sort_unstable();
            names.dedup();
            let found: Option<HashSet<String>> =
                look(session, &names).map(|v| v.into_iter().collect());
            for (i, f) in followers.iter_mut().enumerate() {
                if f.session != Some(session) {
                    continue;
                }
                let wake = match &found {
                    Some(found) => f.conversations.iter().any(|c| found.contains(c)),
                    None => true,
                };
                if wake {
                    // A full socket already holds a wake; a dead one is
                    // seen as a hang-up at the next poll.
                    let _ = send(f.sock.as_raw_fd(), b"w");
                    if found.is_some() {
                        f.woken += 1;
                        if f.woken >= HANDOVER_WAKES {
                            heir = Some(i);
                        }
                    }
                }
            }
        }
        let Some(i) = heir else {
            return false;
        };
        // Name the heir, then let go: every follower sees the hang-up, the
        // heir leads, the others (this poller too) join it.
        if send(followers[i].sock.as_raw_fd(), b"L").is_err() {
            return false;
        }
        log::debug!("event=hub_handover woken={}", followers[i].woken);
        self.role = Role::Alone;
        self.tries = 0;
        self.next_try = Instant::now() + HEIR_HEAD_START;
        true
    }

    /// Wake every follower: something changed that cannot be confirmed (a
    /// leader's only).
    pub fn wake_all(&mut self) {
        if let Role::Leader { followers, .. } = &self.role {
            for f in followers {
                let _ = send(f.sock.as_raw_fd(), b"w");
            }
        }
    }

    /// Join the hub of `key` if it has a leader of ours, else lead it.
    fn try_join_or_lead(&mut self, key: FileId, mine: &[String]) -> Option<Role> {
        let addr = address(self.uid, key);
        let msg = subscription(self.session, mine)?;
        match connect(&addr) {
            Ok(sock) => {
                match peer_uid(sock.as_raw_fd()) {
                    Ok(uid) if uid == self.uid => {}
                    Ok(uid) => {
                        if !self.warned {
                            self.warned = true;
                            log::warn!(
                                "event=hub_refused peer_uid={uid}: another user's process holds this bridge's hub name; this poller watches the file itself"
                            );
                        }
                        return None;
                    }
                    Err(_) => return None,
                }
                send(sock.as_raw_fd(), &msg).ok()?;
                log::debug!("event=hub_joined dev={} ino={}", key.dev, key.ino);
                Some(Role::Follower {
                    sock,
                    sent: mine.to_vec(),
                    heir: false,
                })
            }
            // Nobody listens there: lead (or lose the race to bind and
            // join the winner at the next try).
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                let listener = listen(&addr).ok()?;
                log::debug!("event=hub_leading dev={} ino={}", key.dev, key.ino);
                Some(Role::Leader {
                    listener,
                    followers: Vec::new(),
                    since: Instant::now(),
                })
            }
            Err(_) => None,
        }
    }
}

/// Start the handover counts again: every follower's wakes, and the window.
fn restart_counts(followers: &mut [Follower], since: &mut Instant) {
    for f in followers.iter_mut() {
        f.woken = 0;
    }
    *since = Instant::now();
}

/// The hub's name for `uid` and `key`, in the abstract namespace (no
/// leading NUL here: [`sockaddr`] adds it).
fn address(uid: u32, key: FileId) -> Vec<u8> {
    format!("autopoll/hub/1/{uid}/{}:{}", key.dev, key.ino).into_bytes()
}

/// The message that says what `session` and `conversations` a poller
/// serves; None when too big to send.
fn subscription(session: Session, conversations: &[String]) -> Option<Vec<u8>> {
    let msg = serde_json::json!({
        "v": 1,
        "session": session.as_str(),
        "conversations": conversations,
    })
    .to_string()
    .into_bytes();
    (msg.len() <= MAX_MESSAGE).then_some(msg)
}

fn sockaddr(name: &[u8]) -> (libc::sockaddr_un, libc::socklen_t) {
    // SAFETY: sockaddr_un is plain data; all zeroes is valid.
    let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let n = name.len().min(sa.sun_path.len() - 1);
    for (d, s) in sa.sun_path[1..=n].iter_mut().zip(name) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + 1 + n;
    (sa, len as libc::socklen_t)
}

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the descriptor is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor of ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A new socket given to `call` (`connect` or `bind`) with the address
/// `name`.
fn addressed(
    name: &[u8],
    call: unsafe extern "C" fn(libc::c_int, *const libc::sockaddr, libc::socklen_t) -> libc::c_int,
) -> io::Result<OwnedFd> {
    let sock = socket()?;
    let (sa, len) = sockaddr(name);
    // SAFETY: valid socket and address.
    let rc = unsafe {
        call(
            sock.as_raw_fd(),
            (&sa as *const libc::sockaddr_un).cast(),
            len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

/// A socket connected to `name`. A non-blocking connect of a unix socket
/// completes at once or fails (EAGAIN: the leader's backlog is full; tried
/// again later).
fn connect(name: &[u8]) -> io::Result<OwnedFd> {
    addressed(name, libc::connect)
}

fn listen(name: &[u8]) -> io::Result<OwnedFd> {
    let sock = addressed(name, libc::bind)?;
    // SAFETY: a bound socket of ours.
    if unsafe { libc::listen(sock.as_raw_fd(), 128) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

/// The user id of the process at the other end of `fd`.
fn peer_uid(fd: RawFd) -> io::Result<u32> {
    // SAFETY: ucred is plain data.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: valid socket, buffer and length.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// Send one packet without blocking.
fn send(fd: RawFd, msg: &[u8]) -> io::Result<()> {
    // SAFETY: valid socket and buffer; MSG_NOSIGNAL: a gone peer is an
    // error, not a SIGPIPE.
    let n = unsafe {
        libc::send(
            fd,
            msg.as_ptr().cast(),
            msg.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Take the joiners waiting at `listener`, refusing other users'.
fn accept_all(listener: RawFd, uid: u32, followers: &mut Vec<Follower>, warned: &mut bool) {
    loop {
        // SAFETY: a listening socket of ours; the peer address is not wanted.
        let fd = unsafe {
            libc::accept4(
                listener,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            return;
        }
        // SAFETY: a fresh descriptor of ours.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        match peer_uid(sock.as_raw_fd()) {
            Ok(u) if u == uid => followers.push(Follower {
                sock,
                session: None,
                conversations: HashSet::new(),
                woken: 0,
            }),
            Ok(u) => {
                if !*warned {
                    *warned = true;
                    log::warn!(
                        "event=hub_refused peer_uid={u}: a process of another user tried to join this bridge's hub"
                    );
                }
            }
            Err(_) => {}
        }
    }
}

/// Read a follower's pending messages; false when it is gone or spoke
/// nonsense (dropped: it watches for itself once it sees the hang-up).
fn read_subscriptions(f: &mut Follower, buf: &mut Vec<u8>) -> bool {
    if buf.len() < MAX_MESSAGE + 1 {
        buf.resize(MAX_MESSAGE + 1, 0);
    }
    loop {
        // SAFETY: valid socket and buffer.
        let n = unsafe {
            libc::recv(
                f.sock.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n == 0 {
            return false;
        }
        if n < 0 {
            let e = io::Error::last_os_error();
            return e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted;
        }
        let Some((session, conversations)) = parse(&buf[..n as usize]) else {
            return false;
        };
        f.session = Some(session);
        f.conversations = conversations;
        // Taken: the follower looks once, so a commit before this cannot
        // be missed.
        let _ = send(f.sock.as_raw_fd(), b"w");
    }
}

/// A subscription message: the session and the conversations.
fn parse(msg: &[u8]) -> Option<(Session, HashSet<String>)> {
    let v: serde_json::Value = serde_json::from_slice(msg).ok()?;
    if v.get("v")?.as_u64()? != 1 {
        return None;
    }
    let session = match v.get("session")?.as_str()? {
        "a" => Session::A,
        "b" => Session::B,
        _ => return None,
    };
    let conversations = v
        .get("conversations")?
        .as_array()?
        .iter()
        .map(|c| c.as_str().map(str::to_string))
        .collect::<Option<HashSet<String>>>()?;
    Some((session, conversations))
}

/// What a follower found on its socket.
struct Wakes {
    /// Wake-ups (`w`).
    wakes: usize,
    /// Named the next leader (`L`).
    heir: bool,
    /// The leader is gone (end of file, or an error).
    gone: bool,
}

/// Read a follower's pending messages from its leader.
fn drain_wakes(fd: RawFd) -> Wakes {
    let mut got = Wakes {
        wakes: 0,
        heir: false,
        gone: false,
    };
    let mut buf = [0u8; 16];
    loop {
        // SAFETY: valid socket and buffer.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n == 0 {
            got.gone = true;
            return got;
        }
        if n < 0 {
            let e = io::Error::last_os_error();
            got.gone = !matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            );
            return got;
        }
        match buf[0] {
            b'L' => got.heir = true,
            _ => got.wakes += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file key no other test (or poller) uses.
    fn key() -> FileId {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        FileId {
            dev: u64::from(std::process::id()),
            ino: 1_000_000 + N.fetch_add(1, std::sync::atomic::Ordering::SeqCst),
        }
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// One turn of `h` after waiting up to `wait` for its descriptors.
    fn turn(h: &mut Hub, mine: &[String], wait: Duration) -> Turn {
        let mut fds = Vec::new();
        h.pollfds(&mut fds);
        if !fds.is_empty() {
            fifo::poll(&mut fds, Some(Instant::now() + wait)).unwrap();
        }
        h.turn(&fds, mine)
    }

    /// A hub of session b on file `k`, after its first turn (which joins
    /// or founds the hub) with conversations `mine`; and that turn.
    fn joined(k: FileId, mine: &[String]) -> (Hub, Turn) {
        let mut h = Hub::new(Session::B);
        h.set_key(Some(k));
        let t = turn(&mut h, mine, Duration::ZERO);
        (h, t)
    }

    /// Turns of `h` until `done` or 5 s; what they asked, or'd together.
    fn until(h: &mut Hub, mine: &[String], done: impl Fn(&Hub, Turn) -> bool) -> Turn {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut all = Turn::default();
        loop {
            let t = turn(h, mine, Duration::from_millis(20));
            all.look |= t.look;
            all.changed |= t.changed;
            if done(h, all) {
                return all;
            }
            assert!(Instant::now() < deadline, "the hub did not settle");
        }
    }

    #[test]
    fn the_first_poller_leads_the_next_follow_and_only_those_with_work_are_woken() {
        let k = key();
        let (a, b, c) = (names(&["a1"]), names(&["b1", "b2"]), names(&["c1"]));
        let (mut lead, t) = joined(k, &a);
        assert!(t.changed);
        assert!(lead.leading());
        let (mut fb, tb) = joined(k, &b);
        assert!(tb.changed && fb.following());
        let (mut fc, tc) = joined(k, &c);
        assert!(tc.changed && fc.following());
        // The leader takes both subscriptions and wakes each once.
        until(&mut lead, &a, |h, _| h.followers() == 2);
        for _ in 0..3 {
            turn(&mut lead, &a, Duration::from_millis(10));
        }
        assert!(
            turn(&mut fb, &b, Duration::from_secs(1)).look,
            "joined: look once"
        );
        assert!(turn(&mut fc, &c, Duration::from_secs(1)).look);
        // A commit with work for b2 only.
        let mut asked = Vec::new();
        lead.after_commit(|s, n| {
            asked.push((s, n.iter().map(|x| x.to_string()).collect::<Vec<_>>()));
            Some(vec!["b2".to_string()])
        });
        assert_eq!(
            asked,
            vec![(Session::B, names(&["b1", "b2", "c1"]))],
            "one look for all of them"
        );
        assert!(turn(&mut fb, &b, Duration::from_secs(1)).look);
        assert!(
            !turn(&mut fc, &c, Duration::from_millis(50)).look,
            "c has nothing"
        );
        // Cannot tell: everyone looks.
        lead.after_commit(|_, _| None);
        assert!(turn(&mut fb, &b, Duration::from_secs(1)).look);
        assert!(turn(&mut fc, &c, Duration::from_secs(1)).look);
    }

    #[test]
    fn when_the_leader_goes_one_follower_leads_and_the_other_joins_it() {
        let k = key();
        let (a, b, c) = (names(&["a"]), names(&["b"]), names(&["c"]));
        let (lead, _) = joined(k, &a);
        let (mut fb, _) = joined(k, &b);
        let (mut fc, _) = joined(k, &c);
        assert!(fb.following() && fc.following());
        drop(lead);
        let tb = until(&mut fb, &b, |h, _| !h.following());
        assert!(tb.changed, "a hang-up is a change: look for work");
        until(&mut fb, &b, |h, _| h.leading());
        until(&mut fc, &c, |h, _| h.following());
        until(&mut fb, &b, |h, _| h.followers() == 1);
        // And the new leader's wake-ups reach the other.
        turn(&mut fc, &c, Duration::from_millis(100));
        fb.after_commit(|_, _| Some(vec!["c".to_string()]));
        assert!(turn(&mut fc, &c, Duration::from_secs(1)).look);
    }

    #[test]
    fn a_follower_speaking_nonsense_is_dropped_and_a_changed_set_is_sent_again() {
        let k = key();
        let (mut lead, _) = joined(k, &names(&["a"]));
        let rogue = connect(&address(lead.uid, k)).unwrap();
        send(rogue.as_raw_fd(), b"{not json").unwrap();
        // Taken, then dropped: its end sees the hang-up.
        let mut fds = [fifo::pollfd(rogue.as_raw_fd(), libc::POLLIN)];
        let deadline = Instant::now() + Duration::from_secs(5);
        while fds[0].revents & libc::POLLHUP == 0 {
            turn(&mut lead, &names(&["a"]), Duration::from_millis(20));
            fifo::poll(&mut fds, Some(Instant::now())).unwrap();
            assert!(Instant::now() < deadline, "the rogue was not dropped");
        }
        assert_eq!(lead.followers(), 0);
        let mut f = Hub::new(Session::A);
        f.set_key(Some(k));
        turn(&mut f, &names(&["x"]), Duration::ZERO);
        until(&mut lead, &names(&["a"]), |h, _| h.followers() == 1);
        // Its set grows (a tokens file re-read): sent again, and used.
        turn(&mut f, &names(&["x", "y"]), Duration::from_millis(100));
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            turn(&mut lead, &names(&["a"]), Duration::from_millis(20));
            let mut seen = Vec::new();
            lead.after_commit(|s, n| {
                seen = n.iter().map(|x| x.to_string()).collect();
                assert_eq!(s, Session::A);
                Some(Vec::new())
            });
            if seen == names(&["x", "y"]) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the new set never reached the leader: {seen:?}"
            );
        }
        // Another file at the path: the follower leaves this hub.
        assert!(f.set_key(Some(key())));
        assert!(!f.following());
    }

    #[test]
    fn a_leader_without_work_hands_the_hub_to_the_follower_it_keeps_waking() {
        let k = key();
        let (a, b, c) = (names(&["a"]), names(&["b"]), names(&["c"]));
        let (mut lead, _) = joined(k, &a);
        let (mut fb, _) = joined(k, &b);
        let (mut fc, _) = joined(k, &c);
        until(&mut lead, &a, |h, _| h.followers() == 2);
        // Work of its own now and then keeps it leader.
        for i in 0..2 * HANDOVER_WAKES {
            if i % (HANDOVER_WAKES / 2) == 0 {
                lead.own_work();
            }
            assert!(!lead.after_commit(|_, _| Some(vec!["b".to_string()])));
            if i % 16 == 0 {
                turn(&mut fb, &b, Duration::ZERO);
            }
        }
        lead.own_work();
        let handed = (0..HANDOVER_WAKES)
            .filter(|_| lead.after_commit(|_, _| Some(vec!["b".to_string()])))
            .count();
        assert_eq!(
            handed, 1,
            "handed over once, at the {HANDOVER_WAKES}th wake"
        );
        assert!(!lead.leading());
        until(&mut fb, &b, |h, _| h.leading());
        until(&mut fc, &c, |h, _| h.following());
        until(&mut lead, &a, |h, _| h.following());
        until(&mut fb, &b, |h, _| h.followers() == 2);
    }
}
