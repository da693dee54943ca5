//! One thread per client session: after the handshake on the client's
//! private FIFO pair, it reads request frames, queues questions for the
//! worker pool, and writes replies (answers as workers finish them, errors
//! at each request's deadline). It polls the request FIFO, its own waker
//! (rung by workers) and the server's shutdown waker: no busy loop, and
//! every wait is bounded by the next deadline.
//!
//! A session with nothing in flight that receives no complete frame for
//! `--idle-timeout` is closed: it sends an `error` frame with a null `id`
//! and code `timeout` (the idle notice), then closes both FIFOs. A partial
//! frame does not count as activity, so a client trickling bytes cannot hold
//! a session either.

use std::collections::HashMap;
use std::fs::File;
use std::sync::Arc;
use std::time::{Duration, Instant};

use autopoll_protocol::fifo::{self, FifoError, FileId, Fill, FrameReader, Waker};
use autopoll_protocol::frame::{self, FrameError};
use autopoll_protocol::{
    Answer, Echo, ErrorCode, ErrorReply, PROTOCOL_VERSION, Reply, Request, Welcome,
};
use crossbeam_channel::TrySendError;

use crate::Shared;
use crate::hello::Vetted;
use crate::pool::{Job, Outcome};

/// How long the client has to open its side of the pair.
pub(crate) const HANDSHAKE: Duration = Duration::from_secs(5);
/// How long a reply may wait for the client to read it before the session is dropped.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Questions one session may have in flight.
const MAX_IN_FLIGHT: usize = 4_096;
/// Longest idle poll, so flags are re-checked now and then.
const IDLE_POLL: Duration = Duration::from_secs(60);

/// Why a session ended early.
#[derive(Debug)]
pub(crate) enum End {
    Handshake(FifoError),
    ClientGone,
    ClientStuck,
    Io(String),
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Handshake(e) => write!(f, "handshake failed: {e}"),
            End::ClientGone => f.write_str("client closed its reply FIFO"),
            End::ClientStuck => write!(f, "client did not read a reply for {REPLY_TIMEOUT:?}"),
            End::Io(e) => f.write_str(e),
        }
    }
}

fn send(out: &File, reply: &Reply) -> Result<(), End> {
    send_bytes(out, &frame::encode(reply))
}

/// Write encoded frames (one or several, so replies that are ready
/// together go in one write).
fn send_bytes(out: &File, bytes: &[u8]) -> Result<(), End> {
    fifo::write_all(out, bytes, Instant::now() + REPLY_TIMEOUT).map_err(|e| match e {
        FifoError::Closed => End::ClientGone,
        FifoError::Timeout => End::ClientStuck,
        other => End::Io(other.to_string()),
    })
}

fn error(id: Option<u64>, code: ErrorCode, message: impl Into<String>) -> Reply {
    Reply::Error(ErrorReply {
        id,
        code,
        message: message.into(),
    })
}

/// The reply for a finished question, counted in the stats.
fn reply_for(
    shared: &Shared,
    id: u64,
    result: Result<crate::engine::EngineAnswer, crate::engine::EngineError>,
    received: Instant,
) -> Reply {
    let reply = match result {
        Ok(a) => Reply::Answer(Answer {
            id,
            answer: a.answer,
            sources: a.sources,
            found: a.found,
            context_version: a.context_version,
            engine: shared.engine.name().to_string(),
            elapsed_ms: received.elapsed().as_secs_f64() * 1000.0,
            invalid_sources: a.invalid_sources,
            backend: a.meta,
        }),
        Err(e) => error(Some(id), e.code, e.message),
    };
    shared
        .counters
        .finished(received.elapsed(), matches!(reply, Reply::Error(_)));
    reply
}

struct Pending {
    deadline: Instant,
    received: Instant,
}

/// The FIFO opened must be the one vetted (and registered as in use).
fn same(opened: Result<(File, fifo::FileId), FifoError>, want: fifo::FileId) -> Result<File, End> {
    match opened {
        Ok((f, got)) if got == want => Ok(f),
        Ok(_) => Err(End::Handshake(FifoError::Unsafe {
            path: Default::default(),
            reason: "a client FIFO was replaced after its hello was checked".into(),
        })),
        Err(e) => Err(End::Handshake(e)),
    }
}

/// Run one session to its end.
/// Unmarks a session's FIFOs as in use when dropped (unless disarmed).
struct Release<'a> {
    shared: &'a Shared,
    ids: Option<[FileId; 2]>,
}

impl<'a> Release<'a> {
    fn new(shared: &'a Shared, ids: [FileId; 2]) -> Self {
        Release {
            shared,
            ids: Some(ids),
        }
    }

    fn disarm(&mut self) {
        self.ids = None;
    }
}

impl Drop for Release<'_> {
    fn drop(&mut self) {
        if let Some(ids) = self.ids.take() {
            self.shared.release_fifos(ids);
        }
    }
}

pub(crate) fn run(shared: &Arc<Shared>, vetted: Vetted, n: u64) -> Result<(), End> {
    let handshake_deadline = Instant::now() + HANDSHAKE;
    // The FIFOs stay marked in use until this session stops holding them,
    // and no longer: released while still open (a FIFO's inode number can
    // be given to a new FIFO as soon as the last descriptor closes, and a
    // stale mark would refuse that innocent client's hello). The guard
    // declared last is dropped first, before the descriptors.
    let mut early = Release::new(shared, vetted.ids);
    let input = same(
        shared.clients.open_checked(&vetted.request, false),
        vetted.ids[0],
    )?;
    let mut reader = FrameReader::new(input, shared.config.max_frame);
    let out = same(
        shared
            .clients
            .open_checked_write_until(&vetted.reply, handshake_deadline),
        vetted.ids[1],
    )?;
    let _release = Release::new(shared, vetted.ids);
    early.disarm();
    let hello = vetted.hello;
    if hello.version != PROTOCOL_VERSION {
        send(
            &out,
            &error(
                None,
                ErrorCode::VersionMismatch,
                format!(
                    "protocol version {} is not supported; this server speaks version {PROTOCOL_VERSION}",
                    hello.version
                ),
            ),
        )?;
        return Ok(());
    }
    if shared.shutdown.is_triggered() {
        send(
            &out,
            &error(None, ErrorCode::ShuttingDown, "the server is stopping"),
        )?;
        return Ok(());
    }
    send(
        &out,
        &Reply::Welcome(Welcome {
            version: PROTOCOL_VERSION,
            server: shared.name.clone(),
            pid: std::process::id(),
            engine: shared.engine.name().to_string(),
            max_frame_bytes: shared.config.max_frame,
            idle_timeout_ms: Some(
                u64::try_from(shared.config.idle_timeout.as_millis()).unwrap_or(u64::MAX),
            ),
        }),
    )?;
    log::debug!("event=session_opened session={n} client={:?}", hello.client);

    let waker = Arc::new(Waker::new().map_err(|e| End::Io(format!("waker: {e}")))?);
    let (tx, rx) = crossbeam_channel::unbounded::<Outcome>();
    let mut pending: HashMap<u64, Pending> = HashMap::new();
    let mut input_open = true;
    let mut stopping = false;
    let mut grace = None;
    let idle = shared.config.idle_timeout;
    // The last complete frame received or reply sent.
    let mut last_active = Instant::now();
    let result = loop {
        if !stopping && shared.shutdown.is_triggered() {
            stopping = true;
            // Our own clock if we see the stop before main sets the deadline.
            grace = Some(
                shared
                    .grace_deadline()
                    .unwrap_or_else(|| Instant::now() + shared.config.grace),
            );
        }
        if (stopping || !input_open) && pending.is_empty() {
            break Ok(());
        }
        if let Some(g) = grace
            && Instant::now() >= g
        {
            // Grace is over: tell the client what will not be answered.
            for (id, _) in pending.drain() {
                shared.counters.finished(Duration::ZERO, true);
                let _ = send(
                    &out,
                    &error(
                        Some(id),
                        ErrorCode::ShuttingDown,
                        "the server stopped before answering",
                    ),
                );
            }
            break Ok(());
        }
        let next = pending.values().map(|p| p.deadline).min();
        let idle_at = (pending.is_empty() && input_open && !stopping).then(|| last_active + idle);
        let deadline = [next, grace, idle_at, Some(Instant::now() + IDLE_POLL)]
            .into_iter()
            .flatten()
            .min();
        // [waker, reply, input?, shutdown?]. The reply FIFO is watched for
        // POLLERR: the client is gone, even before it opened its request
        // FIFO (a FIFO never written to reports no POLLHUP).
        let mut fds = vec![
            fifo::pollfd(waker.fd(), libc::POLLIN),
            fifo::pollfd(std::os::fd::AsRawFd::as_raw_fd(&out), 0),
        ];
        let input_at = fds.len();
        if input_open {
            fds.push(fifo::pollfd(reader.fd(), libc::POLLIN));
        }
        if !stopping {
            fds.push(fifo::pollfd(shared.shutdown.fd(), libc::POLLIN));
        }
        if let Err(e) = fifo::poll(&mut fds, deadline) {
            break Err(End::Io(format!("poll: {e}")));
        }
        if fds[0].revents != 0 {
            waker.drain();
        }
        if fds[1].revents & (libc::POLLERR | libc::POLLHUP) != 0 {
            break Err(End::ClientGone);
        }

        // Finished work first, so answers go out before anything else; all
        // replies of this turn are written together.
        let mut outbuf: Vec<u8> = Vec::new();
        while let Ok(o) = rx.try_recv() {
            let Some(p) = pending.remove(&o.id) else {
                continue; // already timed out
            };
            let reply = reply_for(shared, o.id, o.result, p.received);
            log::trace!(
                "session={n} id={} engine_ms={:.3}",
                o.id,
                o.engine_time.as_secs_f64() * 1000.0
            );
            outbuf.extend_from_slice(&frame::encode(&reply));
            last_active = Instant::now();
        }

        if input_open && fds[input_at].revents != 0 {
            match reader.fill() {
                Ok(Fill::Data(_)) | Ok(Fill::WouldBlock) => {}
                Ok(Fill::Eof) => input_open = false,
                Err(e) => {
                    log::debug!("session={n}: reading requests: {e}");
                    input_open = false;
                }
            }
            let mut frames = Vec::new();
            while let Some(item) = reader.next_buffered() {
                frames.push(item);
            }
            if !input_open && reader.pending() > 0 {
                frames.push(Err(FrameError::Truncated(reader.pending())));
            }
            if !frames.is_empty() {
                last_active = Instant::now();
            }
            for item in frames {
                let reply = handle(
                    shared,
                    item,
                    &mut pending,
                    stopping,
                    &tx,
                    &waker,
                    &mut input_open,
                );
                if let Some(r) = reply {
                    outbuf.extend_from_slice(&frame::encode(&r));
                }
            }
        }
        if !outbuf.is_empty()
            && let Err(e) = send_bytes(&out, &outbuf)
        {
            break Err(e);
        }

        let now = Instant::now();
        let expired: Vec<u64> = pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        let mut failed = None;
        for id in expired {
            pending.remove(&id);
            shared.counters.finished(Duration::ZERO, true);
            log::warn!("event=request_timeout session={n} id={id}");
            last_active = Instant::now();
            if let Err(e) = send(
                &out,
                &error(
                    Some(id),
                    ErrorCode::Timeout,
                    "no answer within the request's timeout",
                ),
            ) {
                failed = Some(e);
                break;
            }
        }
        if let Some(e) = failed {
            break Err(e);
        }

        if pending.is_empty()
            && input_open
            && !stopping
            && Instant::now().duration_since(last_active) >= idle
        {
            // Not a wait on the client: a full pipe means it is not reading.
            let notice = error(
                None,
                ErrorCode::Timeout,
                format!(
                    "session closed: no request for {} s (the server's --idle-timeout); connect again",
                    idle.as_secs_f64()
                ),
            );
            let _ = fifo::write_all(
                &out,
                &frame::encode(&notice),
                Instant::now() + Duration::from_millis(50),
            );
            log::debug!("event=session_idle session={n} client={:?}", hello.client);
            break Ok(());
        }
    };
    // Work still queued for a vanished client keeps its in-flight count until
    // a worker drops it; nothing else to undo.
    log::debug!("event=session_closed session={n}");
    result
}

/// Handle one decoded-or-not frame; returns an immediate reply, if any.
#[allow(clippy::too_many_arguments)]
fn handle(
    shared: &Arc<Shared>,
    item: Result<Vec<u8>, FrameError>,
    pending: &mut HashMap<u64, Pending>,
    stopping: bool,
    tx: &crossbeam_channel::Sender<Outcome>,
    waker: &Arc<Waker>,
    input_open: &mut bool,
) -> Option<Reply> {
    let line = match item {
        Ok(l) => l,
        Err(e) => {
            shared.counters.rejected();
            let code = if matches!(e, FrameError::TooLarge { .. }) {
                ErrorCode::TooLarge
            } else {
                ErrorCode::BadFrame
            };
            return Some(error(None, code, e.to_string()));
        }
    };
    let req: Request = match frame::decode(&line) {
        Ok(r) => r,
        Err(e) => {
            shared.counters.rejected();
            return Some(error(None, ErrorCode::BadFrame, e.to_string()));
        }
    };
    match req {
        Request::Ask(a) => {
            let id = a.id;
            let refuse = |code, msg: &str| {
                shared.counters.rejected();
                Some(error(Some(id), code, msg))
            };
            if stopping {
                return refuse(ErrorCode::ShuttingDown, "the server is stopping");
            }
            if a.question.trim().is_empty() {
                return refuse(ErrorCode::Invalid, "the question is empty");
            }
            if pending.contains_key(&id) {
                return refuse(
                    ErrorCode::Invalid,
                    "a request with this id is already in flight",
                );
            }
            if pending.len() >= MAX_IN_FLIGHT {
                return refuse(
                    ErrorCode::Overloaded,
                    "too many requests in flight on this session",
                );
            }
            let limit = shared.config.request_timeout;
            let timeout = a
                .timeout_ms
                .map_or(limit, |ms| Duration::from_millis(ms).min(limit));
            let now = Instant::now();
            let deadline = now + timeout;
            if shared.engine.is_inline() {
                // Microseconds of work: a hop to the pool and back would cost more.
                let result = shared.engine.answer(&a.question, deadline);
                return Some(reply_for(shared, id, result, now));
            }
            shared.counters.in_flight(1);
            let job = Job {
                id,
                question: a.question,
                deadline,
                reply: tx.clone(),
                waker: waker.clone(),
            };
            match shared.jobs.try_send(job) {
                Ok(()) => {
                    pending.insert(
                        id,
                        Pending {
                            deadline,
                            received: now,
                        },
                    );
                    None
                }
                Err(TrySendError::Full(_)) => {
                    shared.counters.in_flight(-1);
                    refuse(
                        ErrorCode::Overloaded,
                        "the server's queue is full; try again shortly",
                    )
                }
                Err(TrySendError::Disconnected(_)) => {
                    shared.counters.in_flight(-1);
                    refuse(ErrorCode::ShuttingDown, "the server is stopping")
                }
            }
        }
        Request::Stats(s) => Some(Reply::Stats(crate::stats_reply(shared, s.id))),
        Request::Echo(e) => Some(Reply::Echo(Echo {
            id: e.id,
            payload: e.payload,
        })),
        Request::Hello(_) => {
            shared.counters.rejected();
            Some(error(
                None,
                ErrorCode::Invalid,
                "hello belongs on the shared request FIFO, not in a session",
            ))
        }
        Request::Bye => {
            *input_open = false;
            None
        }
    }
}
