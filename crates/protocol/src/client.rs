//! The client side: the FIFO handshake, then requests and replies matched
//! by id, each call bounded by a deadline.
//!
//! Handshake (see docs/PROTOCOL.md):
//! 1. make a private FIFO pair in the server's `clients/` directory;
//! 2. open the reply FIFO for reading (non-blocking, immediate);
//! 3. open the shared `requests` FIFO for writing: ENXIO means no server;
//! 4. write one `hello` frame (at most `PIPE_BUF` bytes, so atomic) naming the pair;
//! 5. read the `welcome` on the reply FIFO (bounded);
//! 6. open the request FIFO for writing (the server already reads it);
//! 7. unlink both names: the open descriptors are all that is needed.
//!
//! Pipelining: [`Client::send_asks`] writes several questions in one go and
//! [`Client::read_replies`] takes whatever replies have arrived, in any
//! order; the caller polls [`Client::reply_fd`] and matches replies by id.
//!
//! Idle sessions: the server closes a session that sends nothing for its
//! `--idle-timeout` (the welcome's `idle_timeout_ms`). A [`Client`] whose
//! connection sat idle for half of that, with nothing outstanding, connects
//! afresh before its next request; one whose request meets a closed session
//! (EPIPE, or the server's idle notice) reconnects and sends it once more,
//! which is safe because a closed session never reads it. Callers see no
//! error for either.

use std::fs::File;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::fifo::{self, FifoError, FrameReader};
use crate::frame::{
    self, Answer, AskRequest, Echo, ErrorCode, ErrorReply, FrameError, Hello, Reply, Request,
    Stats, StatsRequest, Welcome,
};
use crate::paths::ServerPaths;
use crate::{DEFAULT_MAX_FRAME, MAX_HELLO, PROTOCOL_VERSION};

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No server is running under that name.
    #[error(
        "no server `{name}` running at {dir}: {reason}; start one with `autopoll-server --name {name} --context PATH` (PATH: the files or folders it answers from)"
    )]
    NoServer {
        /// Server name.
        name: String,
        /// Its directory.
        dir: PathBuf,
        /// What showed it.
        reason: String,
    },
    /// The deadline passed.
    #[error("{what}: no reply within {:.1} s (is the server hung or overloaded?)", after.as_secs_f64())]
    Timeout {
        /// What was waited for.
        what: &'static str,
        /// The time allowed.
        after: Duration,
    },
    /// The server closed the connection before our request reached it
    /// (it stopped or crashed earlier).
    #[error("the server closed the connection")]
    ServerGone,
    /// The server took our request, then closed the connection without
    /// replying (it stopped or crashed while answering).
    #[error("the server closed the connection while answering")]
    Lost,
    /// The request would exceed the frame cap.
    #[error("request too large: {0}")]
    TooLarge(FrameError),
    /// The server answered with an error.
    #[error("server error ({code:?}): {message}", code = .0.code, message = .0.message)]
    Server(ErrorReply),
    /// The server sent something that is not the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A local failure (creating FIFOs, ...).
    #[error(transparent)]
    Fifo(FifoError),
}

impl ClientError {
    /// True for "nobody is serving": no server, or it went away.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            ClientError::NoServer { .. } | ClientError::ServerGone | ClientError::Lost
        )
    }
}

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// How long the handshake may take.
    pub connect_timeout: Duration,
    /// Frame cap for what we send and accept.
    pub max_frame: usize,
    /// Our name in the server's logs.
    pub client_name: String,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(5),
            max_frame: DEFAULT_MAX_FRAME,
            client_name: "autopoll-client".into(),
        }
    }
}

/// Removes the client's FIFO names when the handshake ends, however it ends.
struct Names(Vec<PathBuf>);

impl Drop for Names {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// What one [`Client::read_replies`] found.
#[derive(Debug, Default)]
pub struct Replies {
    /// Replies to requests (each carries its request's id), in arrival order.
    pub replies: Vec<Reply>,
    /// Errors without an id other than the idle notice: the server could not
    /// tell which request they concern (a frame it could not read).
    pub unattributed: Vec<ErrorReply>,
    /// The server closed the session for idleness (its idle notice) and so
    /// never read what is outstanding: that may be sent again on a fresh
    /// connection.
    pub idle_closed: bool,
    /// The server closed its side of the connection (end of file).
    pub closed: bool,
}

/// A session with a server.
#[derive(Debug)]
pub struct Client {
    req: File,
    reader: FrameReader,
    welcome: Welcome,
    next_id: u64,
    max_frame: usize,
    /// Where and how to connect again (after an idle close).
    paths: ServerPaths,
    opts: ClientOptions,
    /// The end of the last exchange (connect, send, or a wait that ended).
    last_used: Instant,
    /// Requests sent whose wait has not ended yet.
    unanswered: usize,
    /// The server's idle notice arrived: the session is closed.
    closed_idle: bool,
}

fn map_read(what: &'static str, after: Duration) -> impl Fn(FifoError) -> ClientError {
    move |e| match e {
        FifoError::Timeout => ClientError::Timeout { what, after },
        FifoError::Closed => ClientError::ServerGone,
        FifoError::Frame(f) => ClientError::Protocol(f.to_string()),
        other => ClientError::Fifo(other),
    }
}

impl Client {
    /// Connect to the server at `paths`.
    pub fn connect(paths: &ServerPaths, opts: &ClientOptions) -> Result<Client, ClientError> {
        let started = Instant::now();
        let deadline = started + opts.connect_timeout;
        let no_server = |reason: &str| ClientError::NoServer {
            name: paths.name.clone(),
            dir: paths.dir.clone(),
            reason: reason.into(),
        };
        if std::fs::symlink_metadata(paths.requests()).is_err() {
            return Err(no_server("its request FIFO does not exist"));
        }
        let tag = format!(
            "{}-{}",
            std::process::id(),
            crate::client::random_tag().map_err(ClientError::Fifo)?
        );
        let req_path = paths.clients().join(format!("{tag}.req"));
        let rep_path = paths.clients().join(format!("{tag}.rep"));
        let mut names = Names(Vec::new());
        for p in [&req_path, &rep_path] {
            match fifo::mkfifo(p, 0o600) {
                Ok(()) => names.0.push(p.clone()),
                Err(FifoError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    return Err(no_server("its clients directory does not exist"));
                }
                Err(e) => return Err(ClientError::Fifo(e)),
            }
        }
        let rep = fifo::open_fifo(&rep_path, false).map_err(ClientError::Fifo)?;
        let shared = match fifo::open_fifo(&paths.requests(), true) {
            Ok(f) => f,
            Err(FifoError::NoReader { .. }) => {
                return Err(no_server(
                    "nobody reads its request FIFO (a server killed without cleanup left it)",
                ));
            }
            Err(FifoError::Missing { .. }) => {
                return Err(no_server("its request FIFO does not exist"));
            }
            Err(e) => return Err(ClientError::Fifo(e)),
        };
        let hello = frame::encode(&Request::Hello(Hello {
            version: PROTOCOL_VERSION,
            client: opts.client_name.clone(),
            request_fifo: req_path.clone(),
            reply_fifo: rep_path.clone(),
        }));
        if hello.len() > MAX_HELLO {
            return Err(ClientError::Protocol(format!(
                "hello frame of {} bytes exceeds PIPE_BUF ({MAX_HELLO}); use a shorter runtime dir",
                hello.len()
            )));
        }
        fifo::write_all(&shared, &hello, deadline).map_err(|e| match e {
            FifoError::Timeout => ClientError::Timeout {
                what: "sending hello",
                after: opts.connect_timeout,
            },
            FifoError::Closed => no_server("the server closed its request FIFO"),
            other => ClientError::Fifo(other),
        })?;
        drop(shared);
        let mut reader = FrameReader::new(rep, opts.max_frame);
        let line = reader
            .read_frame(Some(deadline))
            .map_err(map_read("waiting for welcome", opts.connect_timeout))?
            .ok_or(ClientError::ServerGone)?;
        let welcome = match frame::decode::<Reply>(&line) {
            Ok(Reply::Welcome(w)) => w,
            Ok(Reply::Error(e)) => return Err(ClientError::Server(e)),
            Ok(other) => {
                return Err(ClientError::Protocol(format!(
                    "expected welcome, got {other:?}"
                )));
            }
            Err(e) => return Err(ClientError::Protocol(e.to_string())),
        };
        let req = fifo::open_fifo(&req_path, true).map_err(|e| match e {
            FifoError::NoReader { .. } => ClientError::ServerGone,
            other => ClientError::Fifo(other),
        })?;
        drop(names);
        log::debug!(
            "connected to server {} (pid {}, engine {}) in {:?}",
            welcome.server,
            welcome.pid,
            welcome.engine,
            started.elapsed()
        );
        Ok(Client {
            req,
            reader,
            max_frame: welcome.max_frame_bytes.min(opts.max_frame),
            welcome,
            next_id: 1,
            paths: paths.clone(),
            opts: opts.clone(),
            last_used: Instant::now(),
            unanswered: 0,
            closed_idle: false,
        })
    }

    /// Replace this connection by a fresh one (ids keep counting up).
    fn reconnect(&mut self) -> Result<(), ClientError> {
        let next_id = self.next_id;
        let fresh = Client::connect(&self.paths, &self.opts)?;
        *self = fresh;
        self.next_id = next_id;
        Ok(())
    }

    /// Whether the server may be about to close this idle connection.
    fn stale(&self) -> bool {
        self.unanswered == 0
            && (self.closed_idle
                || self
                    .welcome
                    .idle_timeout_ms
                    .is_some_and(|ms| self.last_used.elapsed() >= Duration::from_millis(ms) / 2))
    }

    /// What the server said in its welcome.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    fn id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Send `req` (carrying `id`) and wait for the reply with that id until
    /// `timeout`. Replies to earlier, timed-out requests are dropped.
    pub fn call(
        &mut self,
        req: &Request,
        id: u64,
        timeout: Duration,
    ) -> Result<Reply, ClientError> {
        let deadline = Instant::now() + timeout;
        self.send(req, deadline)?;
        match self.wait(id, deadline, timeout) {
            // Closed for idleness before it read our request: once more.
            Err(ClientError::ServerGone) if self.closed_idle => {
                self.send(req, deadline)?;
                self.wait(id, deadline, timeout)
            }
            other => other,
        }
    }

    fn send(&mut self, req: &Request, deadline: Instant) -> Result<(), ClientError> {
        let bytes = frame::encode_capped(req, self.max_frame).map_err(ClientError::TooLarge)?;
        self.send_bytes(&bytes, 1, deadline)
    }

    /// Write `count` encoded frames in one go (reconnecting first when the
    /// connection went stale, or once when it meets a closed session with
    /// nothing outstanding: such a session never read them).
    fn send_bytes(
        &mut self,
        bytes: &[u8],
        count: usize,
        deadline: Instant,
    ) -> Result<(), ClientError> {
        if self.stale() {
            self.reconnect()?;
        }
        let after = deadline.saturating_duration_since(Instant::now());
        let mut sent = fifo::write_all(&self.req, bytes, deadline);
        if matches!(sent, Err(FifoError::Closed)) && self.unanswered == 0 {
            // The server closed this session (idle, or it restarted): it
            // never read the request, so a fresh connection may carry it.
            log::debug!("session closed by the server; connecting again");
            self.reconnect()?;
            sent = fifo::write_all(&self.req, bytes, deadline);
        }
        sent.map_err(map_read("sending request", after))?;
        self.unanswered += count;
        self.last_used = Instant::now();
        Ok(())
    }

    /// Wait for the reply to request `id`.
    fn wait(
        &mut self,
        id: u64,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Reply, ClientError> {
        let r = self.wait_reply(id, deadline, timeout);
        self.unanswered = self.unanswered.saturating_sub(1);
        self.last_used = Instant::now();
        r
    }

    fn wait_reply(
        &mut self,
        id: u64,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Reply, ClientError> {
        // The server has our request: a closed connection now means it went
        // away while answering.
        let lost = |e: ClientError| match e {
            ClientError::ServerGone => ClientError::Lost,
            other => other,
        };
        loop {
            let line = self
                .reader
                .read_frame(Some(deadline))
                .map_err(map_read("waiting for reply", timeout))
                .map_err(lost)?
                .ok_or(ClientError::Lost)?;
            let reply: Reply =
                frame::decode(&line).map_err(|e| ClientError::Protocol(e.to_string()))?;
            match reply.id() {
                Some(got) if got == id => return Ok(reply),
                None => {
                    if let Reply::Error(e) = reply {
                        if e.code == ErrorCode::Timeout {
                            // The idle notice: the session closed before
                            // reading our request, which was not delivered.
                            log::debug!("the server closed the session: {}", e.message);
                            self.closed_idle = true;
                            return Err(ClientError::ServerGone);
                        }
                        return Err(ClientError::Server(e));
                    }
                }
                Some(other) => log::debug!("dropping late reply to request {other}"),
            }
        }
    }

    /// Send a question without waiting; returns its id for [`Client::wait_answer`].
    pub fn send_ask(
        &mut self,
        question: &str,
        server_timeout: Duration,
    ) -> Result<u64, ClientError> {
        let id = self.id();
        let req = Request::Ask(AskRequest {
            id,
            question: question.to_string(),
            timeout_ms: Some(u64::try_from(server_timeout.as_millis()).unwrap_or(u64::MAX)),
        });
        self.send(&req, Instant::now() + server_timeout)?;
        Ok(id)
    }

    /// Send several questions in one write without waiting (pipelining: the
    /// server answers them in any order, each reply carrying its id; read
    /// them with [`Client::read_replies`]). Per question, its id, or why it
    /// could not be sent (too large for the frame cap; the others go on).
    /// The write is bounded by the shortest of their deadlines.
    pub fn send_asks(
        &mut self,
        questions: &[(&str, Duration)],
    ) -> Result<Vec<Result<u64, FrameError>>, ClientError> {
        let mut bytes = Vec::new();
        let mut ids = Vec::with_capacity(questions.len());
        let mut shortest: Option<Duration> = None;
        for (question, server_timeout) in questions {
            let id = self.id();
            let req = Request::Ask(AskRequest {
                id,
                question: (*question).to_string(),
                timeout_ms: Some(u64::try_from(server_timeout.as_millis()).unwrap_or(u64::MAX)),
            });
            match frame::encode_capped(&req, self.max_frame) {
                Ok(b) => {
                    bytes.extend_from_slice(&b);
                    shortest = Some(shortest.map_or(*server_timeout, |s| s.min(*server_timeout)));
                    ids.push(Ok(id));
                }
                Err(e) => ids.push(Err(e)),
            }
        }
        if let Some(t) = shortest {
            let count = ids.iter().filter(|r| r.is_ok()).count();
            self.send_bytes(&bytes, count, Instant::now() + t)?;
        }
        Ok(ids)
    }

    /// The reply FIFO's descriptor, to poll for `POLLIN` beside others
    /// before [`Client::read_replies`].
    pub fn reply_fd(&self) -> std::os::fd::RawFd {
        self.reader.fd()
    }

    /// Read what the reply FIFO holds now (one non-blocking read) and decode
    /// every complete frame in it.
    pub fn read_replies(&mut self) -> Result<Replies, ClientError> {
        let fill = self
            .reader
            .fill()
            .map_err(|e| ClientError::Protocol(format!("reading replies: {e}")))?;
        let mut got = Replies::default();
        while let Some(item) = self.reader.next_buffered() {
            let line = item.map_err(|e| ClientError::Protocol(e.to_string()))?;
            let reply: Reply =
                frame::decode(&line).map_err(|e| ClientError::Protocol(e.to_string()))?;
            match (reply.id(), reply) {
                (Some(_), reply) => {
                    self.unanswered = self.unanswered.saturating_sub(1);
                    got.replies.push(reply);
                }
                (None, Reply::Error(e)) if e.code == ErrorCode::Timeout => {
                    log::debug!("the server closed the session: {}", e.message);
                    self.closed_idle = true;
                    got.idle_closed = true;
                }
                (None, Reply::Error(e)) => got.unattributed.push(e),
                (None, other) => {
                    return Err(ClientError::Protocol(format!(
                        "expected a reply to a request, got {other:?}"
                    )));
                }
            }
        }
        if fill == fifo::Fill::Eof {
            got.closed = true;
        }
        self.last_used = Instant::now();
        Ok(got)
    }

    /// Wait up to `wait` for the answer to question `id`.
    pub fn wait_answer(&mut self, id: u64, wait: Duration) -> Result<Answer, ClientError> {
        match self.wait(id, Instant::now() + wait, wait)? {
            Reply::Answer(a) => Ok(a),
            Reply::Error(e) => Err(ClientError::Server(e)),
            other => Err(ClientError::Protocol(format!(
                "expected answer, got {other:?}"
            ))),
        }
    }

    /// Ask a question; the server gets `timeout` as its deadline too.
    pub fn ask(&mut self, question: &str, timeout: Duration) -> Result<Answer, ClientError> {
        self.ask_within(question, timeout, timeout)
    }

    /// Ask with the server's deadline `server_timeout` and our own `wait`
    /// (longer, so the server's `timeout` error normally arrives first and a
    /// silent server is told apart from a slow question).
    pub fn ask_within(
        &mut self,
        question: &str,
        server_timeout: Duration,
        wait: Duration,
    ) -> Result<Answer, ClientError> {
        let id = self.send_ask(question, server_timeout)?;
        match self.wait_answer(id, wait) {
            // Closed for idleness before it read the question: once more.
            Err(ClientError::ServerGone) if self.closed_idle => {
                let id = self.send_ask(question, server_timeout)?;
                self.wait_answer(id, wait)
            }
            other => other,
        }
    }

    /// The server's statistics.
    pub fn stats(&mut self, timeout: Duration) -> Result<Stats, ClientError> {
        let id = self.id();
        match self.call(&Request::Stats(StatsRequest { id }), id, timeout)? {
            Reply::Stats(s) => Ok(s),
            Reply::Error(e) => Err(ClientError::Server(e)),
            other => Err(ClientError::Protocol(format!(
                "expected stats, got {other:?}"
            ))),
        }
    }

    /// Send a payload and get it back.
    pub fn echo(&mut self, payload: &str, timeout: Duration) -> Result<String, ClientError> {
        let id = self.id();
        let req = Request::Echo(Echo {
            id,
            payload: payload.to_string(),
        });
        match self.call(&req, id, timeout)? {
            Reply::Echo(e) => Ok(e.payload),
            Reply::Error(e) => Err(ClientError::Server(e)),
            other => Err(ClientError::Protocol(format!(
                "expected echo, got {other:?}"
            ))),
        }
    }
}

/// 8 random hex digits for unique FIFO names.
pub(crate) fn random_tag() -> Result<String, FifoError> {
    let mut b = [0u8; 4];
    getrandom::fill(&mut b).map_err(|e| FifoError::Io {
        op: "random",
        path: PathBuf::new(),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}
