//! Askers: a few `asker-N` threads (lanes), each keeping one connection to
//! the server with many questions in flight on it at once (the protocol
//! matches replies by id, so the server answers them in any order). The
//! main loop hands each new question to the next lane and rings that lane's
//! waker once per claim; the lane writes everything it was given in one
//! write, reads replies as they come, and sends the results of one read
//! back on the main loop's event channel together. Every wait is a poll(2)
//! on the lane's waker and its reply FIFO, bounded by the nearest
//! question's deadline: no spinning, and far fewer thread hand-offs and
//! system calls per question than one thread and one connection per
//! question in flight.
//!
//! What can go wrong, per question, as when each had its own connection:
//! - a connection the server closed while idle (its idle notice, or a
//!   closed pipe with nothing outstanding) never read what was sent on it:
//!   those questions go once more on a fresh connection;
//! - a connection that closes with questions outstanding makes them
//!   [`ClientError::Lost`] (the server died while answering; the attempt
//!   counts);
//! - a question with no reply by its deadline (the server's own plus
//!   [`MARGIN`]) fails with a timeout, and the others go on;
//! - anything else that breaks the connection fails the questions
//!   outstanding on it with that error, and the next question connects
//!   afresh.

use std::collections::HashMap;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use autopoll_protocol::fifo::{self, Waker};
use autopoll_protocol::{Answer, Client, ClientError, ClientOptions, Reply, ServerPaths};
use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};

use crate::Event;

/// A question for an asker.
pub struct AskJob {
    /// The bridge connection it was claimed on (handed back in the result).
    pub generation: u64,
    /// The bridge message it came from.
    pub message_id: i64,
    /// The question text.
    pub question: String,
    /// The server's deadline for it.
    pub server_timeout: Duration,
}

/// What an asker got.
pub struct AskResult {
    /// The job's [`AskJob::generation`].
    pub generation: u64,
    /// The bridge message.
    pub message_id: i64,
    /// The answer, or why not.
    pub outcome: Result<Answer, ClientError>,
}

/// Extra time we wait beyond the server's deadline before calling the server silent.
pub const MARGIN: Duration = Duration::from_secs(2);

/// Lanes at most. Two keep both cores busy with the built-in engine (the
/// server answers a session's questions on its session thread) and one
/// busy lane cannot hold up the other's replies; more only add hand-offs.
pub const MAX_LANES: usize = 2;

/// The main loop's side of the askers.
pub struct Askers {
    lanes: Vec<Lane>,
    next: usize,
}

struct Lane {
    jobs: Sender<AskJob>,
    waker: Arc<Waker>,
    /// Given work since the last [`Askers::wake`].
    due: bool,
    thread: JoinHandle<()>,
}

impl Askers {
    /// Start `count` lanes (at least one), each able to queue `capacity`
    /// questions, connecting to the server at `paths`.
    pub fn start(
        count: usize,
        capacity: usize,
        events: &Sender<Event>,
        paths: &ServerPaths,
        connect_timeout: Duration,
    ) -> std::io::Result<Askers> {
        let mut lanes = Vec::new();
        for i in 0..count.max(1) {
            let (tx, rx) = crossbeam_channel::bounded::<AskJob>(capacity.max(1));
            let waker = Arc::new(Waker::new()?);
            let (w, events, paths) = (waker.clone(), events.clone(), paths.clone());
            let thread = std::thread::Builder::new()
                .name(format!("asker-{i}"))
                .spawn(move || run(rx, w, events, paths, connect_timeout))?;
            lanes.push(Lane {
                jobs: tx,
                waker,
                due: false,
                thread,
            });
        }
        Ok(Askers { lanes, next: 0 })
    }

    /// Hand `job` to the next lane (woken by [`Askers::wake`]). Gives the
    /// job back only when every lane's queue is full.
    pub fn submit(&mut self, job: AskJob) -> Result<(), AskJob> {
        let n = self.lanes.len();
        let mut job = job;
        for k in 0..n {
            let i = (self.next + k) % n;
            match self.lanes[i].jobs.try_send(job) {
                Ok(()) => {
                    self.lanes[i].due = true;
                    self.next = (i + 1) % n;
                    return Ok(());
                }
                Err(TrySendError::Full(j) | TrySendError::Disconnected(j)) => job = j,
            }
        }
        Err(job)
    }

    /// Wake the lanes that were given work since the last call.
    pub fn wake(&mut self) {
        for l in &mut self.lanes {
            if std::mem::take(&mut l.due) {
                l.waker.wake();
            }
        }
    }

    /// Close the queues and wake the lanes: each finishes what it has in
    /// flight (bounded by the questions' deadlines), then ends. Returns
    /// the threads.
    pub fn close(self) -> Vec<JoinHandle<()>> {
        self.lanes
            .into_iter()
            .map(|l| {
                drop(l.jobs);
                l.waker.wake();
                l.thread
            })
            .collect()
    }
}

/// A question sent on the lane's current connection.
struct Asked {
    job: AskJob,
    deadline: Instant,
    /// Already sent once on a connection that turned out closed.
    retried: bool,
}

struct LaneState {
    client: Option<Client>,
    paths: ServerPaths,
    opts: ClientOptions,
    /// By request id, on the current connection.
    asked: HashMap<u64, Asked>,
    /// Results not yet sent to the main loop.
    done: Vec<AskResult>,
}

/// The same error again, for each question a failure concerns.
fn dup(e: &ClientError) -> ClientError {
    match e {
        ClientError::NoServer { name, dir, reason } => ClientError::NoServer {
            name: name.clone(),
            dir: dir.clone(),
            reason: reason.clone(),
        },
        ClientError::Timeout { what, after } => ClientError::Timeout {
            what,
            after: *after,
        },
        ClientError::ServerGone => ClientError::ServerGone,
        ClientError::Lost => ClientError::Lost,
        ClientError::TooLarge(f) => ClientError::TooLarge(f.clone()),
        ClientError::Server(r) => ClientError::Server(r.clone()),
        ClientError::Protocol(s) => ClientError::Protocol(s.clone()),
        ClientError::Fifo(f) => ClientError::Protocol(f.to_string()),
    }
}

impl LaneState {
    fn finish(&mut self, job: AskJob, outcome: Result<Answer, ClientError>) {
        self.done.push(AskResult {
            generation: job.generation,
            message_id: job.message_id,
            outcome,
        });
    }

    /// Drop the connection; what was outstanding on it fails with `e`.
    fn drop_connection(&mut self, e: &ClientError) {
        self.client = None;
        let asked: Vec<Asked> = self.asked.drain().map(|(_, a)| a).collect();
        for a in asked {
            self.finish(a.job, Err(dup(e)));
        }
    }

    /// Send `jobs` (with whether each was sent once already) in one write,
    /// connecting first if need be.
    fn send(&mut self, jobs: Vec<(AskJob, bool)>) {
        if self.client.is_none() {
            match Client::connect(&self.paths, &self.opts) {
                Ok(c) => self.client = Some(c),
                Err(e) => {
                    for (job, _) in jobs {
                        self.finish(job, Err(dup(&e)));
                    }
                    return;
                }
            }
        }
        let Some(client) = self.client.as_mut() else {
            return;
        };
        let questions: Vec<(&str, Duration)> = jobs
            .iter()
            .map(|(j, _)| (j.question.as_str(), j.server_timeout))
            .collect();
        match client.send_asks(&questions) {
            Ok(ids) => {
                let now = Instant::now();
                for ((job, retried), id) in jobs.into_iter().zip(ids) {
                    match id {
                        Ok(id) => {
                            crate::fault::point("after_send");
                            let deadline = now + job.server_timeout + MARGIN;
                            self.asked.insert(
                                id,
                                Asked {
                                    job,
                                    deadline,
                                    retried,
                                },
                            );
                        }
                        Err(e) => self.finish(job, Err(ClientError::TooLarge(e))),
                    }
                }
            }
            Err(ClientError::ServerGone) => {
                // Not delivered (the session was closed under us). Replies
                // the server wrote before it closed are still in the pipe:
                // take them first; what is outstanding after that is lost
                // with the session. These go once more on a fresh
                // connection.
                self.read_all();
                self.drop_connection(&ClientError::Lost);
                let (again, given_up): (Vec<_>, Vec<_>) = jobs.into_iter().partition(|(_, r)| !r);
                for (job, _) in given_up {
                    self.finish(job, Err(ClientError::ServerGone));
                }
                if !again.is_empty() {
                    self.send(again.into_iter().map(|(j, _)| (j, true)).collect());
                }
            }
            Err(e) => {
                // A write that cannot finish (the server does not read) or
                // fails: nothing more goes on this connection.
                self.drop_connection(&e);
                for (job, _) in jobs {
                    self.finish(job, Err(dup(&e)));
                }
            }
        }
    }

    /// Take the replies that have arrived.
    fn read(&mut self) {
        let Some(client) = self.client.as_mut() else {
            return;
        };
        let got = match client.read_replies() {
            Ok(g) => g,
            Err(e) => {
                log::warn!(
                    "event=server_reply_unreadable reason={:?}: reconnecting",
                    e.to_string()
                );
                self.drop_connection(&e);
                return;
            }
        };
        for reply in got.replies {
            let Some(a) = reply.id().and_then(|id| self.asked.remove(&id)) else {
                log::debug!("dropping a late reply to request {:?}", reply.id());
                continue;
            };
            let outcome = match reply {
                Reply::Answer(ans) => Ok(ans),
                Reply::Error(e) => Err(ClientError::Server(e)),
                other => Err(ClientError::Protocol(format!(
                    "expected answer, got {other:?}"
                ))),
            };
            self.finish(a.job, outcome);
        }
        if let Some(e) = got.unattributed.into_iter().next() {
            // An error that names no request. With one question in flight it
            // is that one's (as when each question had its own connection);
            // with more, nobody can tell whose: the connection is dropped and
            // they go again later, not counted against any of them.
            if self.asked.len() == 1 {
                let id = *self.asked.keys().next().unwrap_or(&0);
                if let Some(a) = self.asked.remove(&id) {
                    self.finish(a.job, Err(ClientError::Server(e)));
                }
            } else {
                log::warn!(
                    "event=server_error code={:?} message={:?} in_flight={}: it names no question; reconnecting",
                    e.code,
                    e.message,
                    self.asked.len()
                );
                self.drop_connection(&ClientError::Protocol(format!(
                    "the server sent an error for no question in particular: {}",
                    e.message
                )));
                return;
            }
        }
        if got.idle_closed {
            // The server closed the session as idle: it read none of what is
            // outstanding, which goes once more on a fresh connection.
            self.client = None;
            let again: Vec<(AskJob, bool)> = self
                .asked
                .drain()
                .map(|(_, a)| (a.job, a.retried))
                .collect();
            let (again, given_up): (Vec<_>, Vec<_>) = again.into_iter().partition(|(_, r)| !r);
            for (job, _) in given_up {
                self.finish(job, Err(ClientError::ServerGone));
            }
            if !again.is_empty() {
                self.send(again.into_iter().map(|(j, _)| (j, true)).collect());
            }
        } else if got.closed {
            // The server took these and went away.
            self.drop_connection(&ClientError::Lost);
        }
    }

    /// Take every reply already in the pipe (until a read brings none, or
    /// the connection is gone).
    fn read_all(&mut self) {
        loop {
            let before = self.asked.len();
            self.read();
            if self.client.is_none() || self.asked.is_empty() || self.asked.len() == before {
                return;
            }
        }
    }

    /// Fail the questions whose deadline passed without a reply.
    fn expire(&mut self, now: Instant) {
        let late: Vec<u64> = self
            .asked
            .iter()
            .filter(|(_, a)| a.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            if let Some(a) = self.asked.remove(&id) {
                let after = a.job.server_timeout + MARGIN;
                self.finish(
                    a.job,
                    Err(ClientError::Timeout {
                        what: "waiting for reply",
                        after,
                    }),
                );
            }
        }
    }
}

/// Run one lane until its queue closes and nothing is in flight on it (or
/// the main loop is gone).
fn run(
    jobs: Receiver<AskJob>,
    waker: Arc<Waker>,
    events: Sender<Event>,
    paths: ServerPaths,
    connect_timeout: Duration,
) {
    let mut l = LaneState {
        client: None,
        paths,
        opts: ClientOptions {
            connect_timeout,
            client_name: "autopoll-poller".into(),
            ..ClientOptions::default()
        },
        asked: HashMap::new(),
        done: Vec::new(),
    };
    let mut open = true;
    loop {
        let mut fresh = Vec::new();
        while open {
            match jobs.try_recv() {
                Ok(j) => fresh.push((j, false)),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => open = false,
            }
        }
        if !fresh.is_empty() {
            l.send(fresh);
        }
        if !l.done.is_empty()
            && events
                .send(Event::Results(std::mem::take(&mut l.done)))
                .is_err()
        {
            return;
        }
        if !open && l.asked.is_empty() {
            return;
        }
        let deadline = l.asked.values().map(|a| a.deadline).min();
        let mut fds = vec![fifo::pollfd(waker.fd(), libc::POLLIN)];
        if let Some(c) = &l.client {
            fds.push(fifo::pollfd(c.reply_fd(), libc::POLLIN));
        }
        if let Err(e) = fifo::poll(&mut fds, deadline) {
            // Not seen in practice (poll fails only on bad arguments or no
            // memory): give up this connection rather than spin.
            l.drop_connection(&ClientError::Protocol(format!("poll: {e}")));
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        if fds[0].revents != 0 {
            waker.drain();
        }
        if fds.get(1).is_some_and(|f| f.revents != 0) {
            l.read();
        }
        l.expire(Instant::now());
    }
}
