//! # autopoll-poller
//!
//! Claims queries addressed to a shard session from the SQLite bridge, asks
//! `autopoll-server` for answers, and writes the responses back, so that
//! every question is answered exactly once whatever crashes around it. One
//! poller serves one conversation (`--conversation/--token`) or many
//! ([`PollerConfig::tokens_file`], [`tokens`], [`members`]): one heartbeat
//! and status each, claims shared round robin between those with work.
//!
//! Threads (all named):
//! - `poller` (the caller of [`run`]): owns the one bridge connection and does
//!   every write: claims, completions (batched), lease extensions, dead
//!   letters, heartbeats, and with [`PollerConfig::retain`] one prune step
//!   per turn (`autopoll_bridge::prune`). It waits on one crossbeam channel
//!   of [`Event`]s. Before taking the write lock to claim, it looks with a
//!   read-only query (`Bridge::claimable`), so commits that do not concern
//!   it cost it a read and cost other writers nothing.
//! - `bridge-watch`: inotify on the bridge's directory ([`watch`]); sends
//!   `Wake` on a commit by anyone and when the file is replaced or removed,
//!   `Stop` on shutdown. It re-establishes its watch when the folder is
//!   removed and recreated.
//! - `checkpoint` (SQLite): copies the WAL back into the bridge file after
//!   the loop's commits, on its own connection, at most every
//!   [`checkpoint::PACE`], so the loop's commits do not pay for SQLite's
//!   automatic checkpoint ([`checkpoint`]).
//! - `tokens-watch` (with a tokens file): inotify on the file's folder and
//!   the SIGHUP pipe; sends `Reload`.
//! - `asker-N`: up to [`asker::MAX_LANES`] lanes, each with one server
//!   connection carrying its share of the `--concurrency` questions in
//!   flight at once ([`asker`]); sends `Results`, those of one read together.
//!
//! Under systemd (`Type=notify`, [`PollerConfig::notify`]): `READY=1` once
//! polling starts, `WATCHDOG=1` from the `poller` loop (which then wakes at
//! least every half watchdog interval), `STOPPING=1` on shutdown. A loop
//! stuck anywhere stops the pings, and systemd restarts the poller.
//!
//! A question is never marked read before its answer is committed: the
//! answer row, the read flag and the claim's removal go in one transaction,
//! and only while this poller still owns the claim (see `autopoll_bridge`).
//!
//! The bridge file is watched ([`conn`]): when its path names another file
//! or none, the connection is closed, questions in flight on it are
//! orphaned (their answers are never written into another file), and the
//! file is reopened, validated, once it is back; past
//! [`PollerConfig::missing_grace`] without it, [`run`] fails with
//! [`PollerError::BridgeGone`] so a supervisor restarts the poller.
#![deny(missing_docs)]

pub mod asker;
pub mod checkpoint;
pub mod conn;
pub mod fault;
pub mod hub;
pub mod members;
pub mod own;
pub mod quiet;
pub mod shm;
pub mod tokens;
pub mod watch;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use autopoll_bridge::shard::{self, Incoming, Response};
use autopoll_bridge::{
    Answer as BridgeAnswer, Bridge, BridgeOptions, ClaimOptions, Claimer, Error as BridgeError,
    Pruner, Session, Store, Target,
};
use autopoll_protocol::{
    Client, ClientError, ClientOptions, ErrorCode, Notifier, NotifyConfig, ServerPaths, Shutdown,
};
use crossbeam_channel::RecvTimeoutError;
use serde_json::Value;

use crate::asker::{AskJob, AskResult};
use crate::members::Member;

/// What the poller is told on its command line.
#[derive(Debug, Clone)]
pub struct PollerConfig {
    /// The bridge file.
    pub db: PathBuf,
    /// Conversation id (unused with [`PollerConfig::tokens_file`]).
    pub conversation: String,
    /// The session's token (unused with [`PollerConfig::tokens_file`]).
    pub token: String,
    /// Serve every conversation listed in this file ([`tokens`]) instead of
    /// `conversation`/`token`; it is read again when it changes.
    pub tokens_file: Option<PathBuf>,
    /// With `tokens_file`: SIGHUP also reads it again.
    pub hangup: Option<tokens::Hangup>,
    /// The session we answer for (usually `b`).
    pub session: Session,
    /// Which server to ask.
    pub server: ServerPaths,
    /// Signed into every response.
    pub shard_id: String,
    /// Claim lease.
    pub lease: Duration,
    /// Attempts before a question is dead-lettered.
    pub max_attempts: u32,
    /// The server's deadline per question.
    pub query_timeout: Duration,
    /// Questions in flight to the server at once.
    pub concurrency: usize,
    /// Questions longer than this (bytes) get an error response.
    pub max_question_bytes: usize,
    /// On shutdown, how long in-flight questions may take.
    pub grace: Duration,
    /// How often the heartbeat is refreshed.
    pub heartbeat: Duration,
    /// How often `PRAGMA data_version` is checked without an inotify wake.
    pub version_check: Duration,
    /// systemd notification (`NOTIFY_SOCKET`, watchdog); none by default.
    pub notify: NotifyConfig,
    /// How long the bridge file may stay missing (or not a bridge) before
    /// [`run`] gives up with [`PollerError::BridgeGone`].
    pub missing_grace: Duration,
    /// Prune finished history older than this as it goes
    /// ([`autopoll_bridge::prune`]); `None` (the default): never.
    pub retain: Option<Duration>,
    /// How often a prune pass starts when [`PollerConfig::retain`] is set.
    pub prune_interval: Duration,
    /// Rows per prune transaction (one step per loop turn, so claims and
    /// answers go in between).
    pub prune_batch: usize,
}

impl PollerConfig {
    /// Defaults for the rest.
    pub fn new(
        db: PathBuf,
        conversation: String,
        token: String,
        server: ServerPaths,
    ) -> PollerConfig {
        PollerConfig {
            db,
            conversation,
            token,
            tokens_file: None,
            hangup: None,
            session: Session::B,
            shard_id: format!("autopoll:{}", server.name),
            server,
            lease: Duration::from_secs(30),
            max_attempts: 3,
            query_timeout: Duration::from_secs(60),
            concurrency: 4,
            max_question_bytes: 256 * 1024,
            grace: Duration::from_secs(10),
            heartbeat: Duration::from_secs(10),
            version_check: Duration::from_millis(100),
            notify: NotifyConfig::default(),
            missing_grace: Duration::from_secs(60),
            retain: None,
            prune_interval: Duration::from_secs(60),
            prune_batch: 200,
        }
    }
}

/// Why the poller stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum PollerError {
    /// The bridge refused (bad token, expired, missing file, schema).
    #[error(transparent)]
    Bridge(#[from] BridgeError),
    /// Bad configuration.
    #[error("{0}")]
    Config(String),
    /// The tokens file is unsafe or malformed (at start; later ones keep
    /// the previous set).
    #[error(transparent)]
    Tokens(#[from] tokens::TokensError),
    /// An OS resource could not be set up.
    #[error("{0}")]
    Io(String),
    /// The bridge file stayed missing, or not a bridge, past the grace.
    #[error(
        "the bridge file {path} has been unusable for {secs:.0} s ({why}); giving up so a \
         supervisor restarts the poller. Put the bridge back at that path (or fix --db) and \
         start the poller again"
    )]
    BridgeGone {
        /// The bridge path.
        path: PathBuf,
        /// Seconds without a usable file.
        secs: f64,
        /// The last reason.
        why: String,
    },
}

/// Messages to the main loop.
pub enum Event {
    /// The bridge file or its folder changed in a way the watch could not
    /// confirm (maybe by us, maybe early; confirm with data_version).
    Wake,
    /// A commit (by anyone, us too) is visible in the bridge and left
    /// something to claim: confirmed by the watch thread. Claim.
    Changed,
    /// An asker finished questions.
    Results(Vec<AskResult>),
    /// Stop claiming, finish, release, return.
    Stop,
    /// The tokens file changed, or SIGHUP: read it again.
    Reload,
}

/// After a wake that `PRAGMA data_version` does not confirm yet (the WAL is
/// written before the commit shows in the shared index), when to look again:
/// tens of microseconds first, so a pickup does not wait a millisecond for
/// nothing, then less often; about 10 ms in all, after which the timer takes
/// over. The first look is at 40 us, not sooner: a commit of a few pages
/// takes that long to write on a busy machine, and every look before it is
/// a wake-up of every poller watching the file (the herd of separate
/// pollers: 15, 15, 30 us before cost about two more wake-ups per commit).
pub(crate) const RECHECK: [Duration; 9] = [
    Duration::from_micros(40),
    Duration::from_micros(40),
    Duration::from_micros(80),
    Duration::from_micros(160),
    Duration::from_micros(320),
    Duration::from_micros(640),
    Duration::from_micros(1250),
    Duration::from_micros(2500),
    Duration::from_micros(5000),
];

/// How often a poller whose bridge another poller watches for it
/// ([`hub`]) checks `PRAGMA data_version` itself.
pub const FOLLOWER_VERSION_CHECK: Duration = Duration::from_secs(1);

/// Group commit: answers that arrive while others are still being asked
/// wait at most this long for company, so one transaction writes many of
/// them (a commit costs about as much as ten answers in it). An answer with
/// nothing else in flight is written at once (a lone question's pickup
/// pays nothing for this).
pub const GROUP_WINDOW: Duration = Duration::from_millis(1);

/// Largest answer text written back (the Python side takes 50,000 characters per message).
const MAX_ANSWER_CHARS: usize = 45_000;

struct InFlight {
    /// The connection it was claimed on (see [`conn`]).
    generation: u64,
    /// Its conversation.
    conversation: String,
    query_id: String,
    /// The query id's exact JSON text when `query_id` lost something.
    query_id_raw: Option<String>,
    /// Remembered with the answer, so a later query with this id repeats it.
    repeat_key: Option<String>,
    /// A repeat of a query id that is itself in flight here: answered with
    /// that one's answer when it comes (released if it fails).
    waiting_on: Option<i64>,
    attempts: u32,
    lease_until: Instant,
    claimed_at: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServerState {
    Up,
    Down {
        next_probe: Instant,
        backoff: Duration,
    },
}

struct Poller {
    cfg: PollerConfig,
    /// `None` while the file is missing or refused (see [`conn`]).
    bridge: Option<Box<dyn Store>>,
    /// On PostgreSQL: the queues the `pg-listen` thread wakes us for (and
    /// no file to watch: [`Poller::watch_file`] does nothing).
    pg_queues: Option<autopoll_bridge::pg::listen::Queues>,
    /// The device and inode of the file `bridge` is on.
    file_id: Option<conn::FileId>,
    /// Counts connections opened; tags questions with the one they came from.
    generation: u64,
    /// Without a connection since...
    gone: Option<conn::Gone>,
    /// Questions in flight on a closed connection: (generation, message id)
    /// to query id. Their answers are dropped.
    orphans: HashMap<(u64, i64), String>,
    claimer: Claimer,
    askers: asker::Askers,
    /// The checkpoint thread (SQLite only).
    ckpt: Option<checkpoint::Checkpointer>,
    in_flight: HashMap<i64, InFlight>,
    answers: Vec<(BridgeAnswer, String, Duration)>,
    server: ServerState,
    /// The conversations served, in the tokens file's order.
    members: Vec<Member>,
    /// The served conversations as the watch thread sees them.
    served: watch::Served,
    /// The watch thread saw something to claim (the next claim skips its
    /// own read-only look when one conversation is served).
    work_seen: bool,
    /// Where the next claim turn starts in `members` (round robin).
    next_turn: usize,
    /// The last tokens file error, logged once until a read works.
    tokens_error: Option<String>,
    data_version: i64,
    flush_after: Instant,
    /// When the oldest answer in `answers` arrived (group commit).
    answers_since: Option<Instant>,
    /// Shutting down: answers are written without waiting for company.
    stopping: bool,
    next_health: Instant,
    probe_client: Option<Client>,
    /// No claims before this (the server said it is overloaded).
    claims_paused_until: Instant,
    /// After a failed lease extension, the next try.
    extend_retry_at: Option<Instant>,
    /// The last claim failure, logged once until claims work again.
    last_claim_error: Option<String>,
    /// The prune pass under way, and the connection generation it is on.
    pruner: Option<(u64, Pruner)>,
    /// When the next prune step (or pass) is due.
    next_prune: Instant,
    /// Pruning is failing (logged once until it works again).
    prune_failing: bool,
}

impl Poller {
    /// With `--retain`: one prune step when one is due. A pass is a few
    /// short transactions, one per loop turn; then it waits for the
    /// interval. A pass on a connection that has since been replaced is
    /// dropped.
    fn prune_tick(&mut self) {
        let Some(retain) = self.cfg.retain else {
            return;
        };
        let now = Instant::now();
        if now < self.next_prune {
            return;
        }
        let generation = self.generation;
        let Some(b) = self.bridge.as_mut() else {
            return;
        };
        let mut pruner = match self.pruner.take() {
            Some((g, p)) if g == generation => p,
            _ => Pruner::new(retain, self.cfg.prune_batch, false),
        };
        match b.prune_step(&mut pruner) {
            Ok(false) => {
                self.pruner = Some((generation, pruner));
                self.next_prune = now;
            }
            Ok(true) => {
                if std::mem::take(&mut self.prune_failing) {
                    log::info!("event=prune_recovered");
                }
                let r = pruner.report();
                let line = format!(
                    "event=pruned messages={} outcomes={} claims={} answers={} audit_rows={} \
                     kept_live_claim={} kept_for_repeats={} kept_bad_time={} cutoff={}",
                    r.messages,
                    r.outcomes,
                    r.claims,
                    r.answers,
                    r.audit_rows,
                    r.kept_live_claim,
                    r.kept_for_repeats,
                    r.kept_bad_time,
                    r.cutoff
                );
                if r.total() > 0 {
                    log::info!("{line}");
                } else {
                    log::debug!("{line}");
                }
                self.next_prune = now + self.cfg.prune_interval;
            }
            Err(e) => {
                if !self.prune_failing {
                    log::warn!(
                        "event=bridge_error op=prune reason={:?}: retrying in {:.0} s",
                        e.to_string(),
                        self.cfg.prune_interval.as_secs_f64()
                    );
                    self.prune_failing = true;
                }
                self.next_prune = now + self.cfg.prune_interval;
            }
        }
    }
}

fn truncate_chars(s: &mut String, max: usize) {
    if let Some((cut, _)) = s.char_indices().nth(max) {
        s.truncate(cut);
        s.push_str("\n[answer truncated by autopoll]");
    }
}

impl Poller {
    fn log_server_down(&mut self, why: &str) {
        if self.server == ServerState::Up {
            log::warn!(
                "event=server_down server={} reason={why:?}: holding questions until it is back",
                self.cfg.server.name
            );
            self.server = ServerState::Down {
                next_probe: Instant::now() + Duration::from_millis(100),
                backoff: Duration::from_millis(100),
            };
        }
    }

    fn probe(&mut self) {
        let ServerState::Down {
            next_probe,
            backoff,
        } = self.server
        else {
            return;
        };
        if Instant::now() < next_probe {
            return;
        }
        let opts = ClientOptions {
            connect_timeout: Duration::from_secs(1),
            client_name: "autopoll-poller-probe".into(),
            ..ClientOptions::default()
        };
        match Client::connect(&self.cfg.server, &opts) {
            Ok(c) => {
                log::info!("event=server_up server={}: resuming", self.cfg.server.name);
                self.server = ServerState::Up;
                self.probe_client = Some(c);
                self.next_health = Instant::now() + self.cfg.heartbeat;
            }
            Err(e) => {
                log::debug!("server probe failed: {e}");
                let backoff = (backoff * 2).min(Duration::from_secs(5));
                self.server = ServerState::Down {
                    next_probe: Instant::now() + backoff,
                    backoff,
                };
            }
        }
    }

    /// Claim what fits, fairly across the conversations served; returns
    /// whether more may be waiting (a conversation filled its share, or
    /// there was no free slot to try).
    ///
    /// First a read-only look ([`Bridge::claimable`]): with nothing to
    /// claim, the write lock is not taken at all, so a poller that is woken
    /// by others' commits costs them nothing. Then the free slots are shared
    /// round robin between the conversations that have work (each gets
    /// `room / n`, the remainder going to the next ones in turn), all in one
    /// write transaction: a conversation with a deep backlog cannot keep
    /// another's single question waiting.
    fn claim(&mut self) -> bool {
        let busy = self.in_flight.len() + self.orphans.len();
        let room = self.cfg.concurrency.saturating_sub(busy);
        if room == 0 {
            return true;
        }
        let session = self.cfg.session;
        let served: Vec<(usize, &str)> = self
            .members
            .iter()
            .enumerate()
            .filter(|(_, m)| m.served())
            .map(|(i, m)| (i, m.conversation.as_str()))
            .collect();
        let names: Vec<&str> = served.iter().map(|(_, c)| *c).collect();
        // The watch thread just saw work: no second look.
        let seen = std::mem::take(&mut self.work_seen);
        let ready = match live(&mut self.bridge).and_then(|b| {
            if seen && names.len() == 1 {
                Ok(vec![names[0].to_string()])
            } else {
                b.claimable(&names, session)
            }
        }) {
            Ok(r) => r,
            Err(e) => {
                self.claim_failed(e);
                return true;
            }
        };
        if ready.is_empty() {
            // (A failing claim counts as recovered only once a claim works.)
            return false;
        }
        // Round robin: start at the first ready conversation at or after next_turn.
        let n = self.members.len().max(1);
        let start = self.next_turn % n;
        let mut order: Vec<(usize, String)> = ready
            .into_iter()
            .filter_map(|c| served.iter().find(|(_, s)| *s == c).map(|(i, _)| (*i, c)))
            .collect();
        order.sort_by_key(|(i, _)| (i + n - start) % n);
        let (base, extra) = (room / order.len(), room % order.len());
        let shares: Vec<(usize, String, usize)> = order
            .into_iter()
            .enumerate()
            .map(|(j, (i, c))| (i, c, base + usize::from(j < extra)))
            .filter(|(_, _, limit)| *limit > 0)
            .collect();
        // The next turn starts after the last one given the larger share.
        let last_big = if extra > 0 {
            extra - 1
        } else {
            shares.len() - 1
        };
        if let Some((i, _, _)) = shares.get(last_big) {
            self.next_turn = i + 1;
        }
        let wanted: Vec<(&str, usize)> = shares
            .iter()
            .map(|(_, c, limit)| (c.as_str(), *limit))
            .collect();
        let opts = ClaimOptions {
            limit: room,
            lease: self.cfg.lease,
            max_attempts: self.cfg.max_attempts,
        };
        let claimed = {
            let _w = watch::Writing::start(&self.served.writing);
            live(&mut self.bridge)
                .and_then(|b| b.claim_many(&self.claimer, &wanted, session, &opts))
        };
        let batches = match claimed {
            Ok(b) => b,
            Err(e) => {
                self.claim_failed(e);
                return true;
            }
        };
        if self.last_claim_error.take().is_some() {
            log::info!("event=claim_recovered");
        }
        if let Some(c) = &self.ckpt {
            c.committed();
        }
        let mut more = false;
        let shares: Vec<(String, usize)> = shares.into_iter().map(|(_, c, l)| (c, l)).collect();
        for ((conversation, limit), batch) in shares.into_iter().zip(batches) {
            more |= batch.claimed.len() + batch.dead_lettered.len() >= limit;
            self.take_batch(&conversation, batch);
        }
        more
    }

    /// A failed look or claim: pause claims for a second, log once.
    fn claim_failed(&mut self, e: BridgeError) {
        // A failed write (disk full, I/O error) still touches the
        // WAL, and that wakes us: without a pause this would spin.
        // On a full disk even reads spin inside SQLite (it cannot
        // update the WAL index), so everything backs off to 1 s.
        self.claims_paused_until = Instant::now() + Duration::from_secs(1);
        let msg = e.to_string();
        if self.last_claim_error.as_deref() != Some(msg.as_str()) {
            log::warn!("event=claim_failed reason={msg:?}: retrying every second");
            self.last_claim_error = Some(msg);
        }
    }

    /// Start on what one conversation's claim brought.
    fn take_batch(&mut self, conversation: &str, batch: autopoll_bridge::ClaimBatch) {
        for d in &batch.dead_lettered {
            log::warn!(
                "event=dead_lettered message_id={} query_id={} attempts={} reason={:?} conversation={conversation}",
                d.message_id,
                d.query_id,
                d.attempts,
                d.last_error.as_deref().unwrap_or("attempts exhausted")
            );
        }
        if !batch.claimed.is_empty() {
            fault::point("after_claim");
        }
        let now = Instant::now();
        let mut skip = Vec::new();
        let claimed: Vec<(i64, u32, Incoming)> = batch
            .claimed
            .into_iter()
            .map(|c| (c.message.id, c.attempts, shard::classify(&c.message)))
            .collect();
        // Stored answers for the batch's query ids, in one look.
        let keys: Vec<&str> = claimed
            .iter()
            .filter_map(|(_, _, i)| match i {
                Incoming::Query(q) => q.repeat_key.as_deref(),
                _ => None,
            })
            .collect();
        let earlier = if keys.is_empty() {
            HashMap::new()
        } else {
            let session = self.cfg.session;
            match live(&mut self.bridge)
                .and_then(|b| b.earlier_answers(conversation, session, &keys))
            {
                Ok(found) => found,
                Err(e) => {
                    log::warn!(
                        "event=bridge_error op=earlier_answer count={} reason={:?}: asking the engine",
                        keys.len(),
                        e.to_string()
                    );
                    HashMap::new()
                }
            }
        };
        for (id, attempts, incoming) in claimed {
            match incoming {
                Incoming::Query(q) => {
                    log::info!(
                        "event=query_claimed message_id={id} query_id={} attempt={} plain_text={} conversation={conversation}",
                        q.query_id,
                        attempts,
                        q.plain_text
                    );
                    if self.answer_repeat(conversation, id, &q, attempts, now, &earlier) {
                        continue;
                    }
                    if q.question.len() > self.cfg.max_question_bytes {
                        let why = format!(
                            "the question is {} bytes; this shard takes at most {}",
                            q.question.len(),
                            self.cfg.max_question_bytes
                        );
                        self.dead_letter(id, &q.query_id, &why);
                        continue;
                    }
                    self.in_flight.insert(
                        id,
                        InFlight {
                            generation: self.generation,
                            conversation: conversation.to_string(),
                            query_id: q.query_id,
                            query_id_raw: q.query_id_raw,
                            repeat_key: q.repeat_key,
                            waiting_on: None,
                            attempts,
                            lease_until: now + self.cfg.lease,
                            claimed_at: now,
                        },
                    );
                    let job = AskJob {
                        generation: self.generation,
                        message_id: id,
                        question: q.question,
                        server_timeout: self.cfg.query_timeout,
                    };
                    // Never block the main loop: the askers' queues hold as
                    // many as may be in flight, so this only fails if old
                    // jobs are still queued (a connection was replaced).
                    if self.askers.submit(job).is_err() {
                        log::warn!(
                            "event=no_asker message_id={id} query_id={} reason=\"every asker's queue is full\": releasing it",
                            self.in_flight.get(&id).map_or("", |f| f.query_id.as_str()),
                        );
                        self.release(id, "no asker free", true);
                    }
                }
                Incoming::BadQuery {
                    query_id, reason, ..
                } => self.dead_letter(id, &query_id, &reason),
                Incoming::Other { kind } => {
                    log::info!("event=skipped message_id={id} type={kind:?}: not a question");
                    skip.push(id);
                }
            }
        }
        // One wake per lane given work: its questions go in one write.
        self.askers.wake();
        if !skip.is_empty()
            && let Err(e) =
                live(&mut self.bridge).and_then(|b| b.skip(&self.claimer, &skip, "not a query"))
        {
            log::warn!(
                "event=bridge_error op=skip count={} reason={:?}: retried later",
                skip.len(),
                e.to_string()
            );
        }
    }

    /// A query whose id was already answered in this conversation gets that
    /// answer again, flagged `"repeat": true`, without asking the engine; one
    /// whose id is being answered here right now waits for that answer.
    /// Returns whether `id` was taken care of.
    fn answer_repeat(
        &mut self,
        conversation: &str,
        id: i64,
        q: &shard::Query,
        attempts: u32,
        now: Instant,
        earlier: &HashMap<String, (i64, String)>,
    ) -> bool {
        let Some(key) = q.repeat_key.as_deref() else {
            return false;
        };
        let mut entry = InFlight {
            generation: self.generation,
            conversation: conversation.to_string(),
            query_id: q.query_id.clone(),
            query_id_raw: q.query_id_raw.clone(),
            repeat_key: None,
            waiting_on: None,
            attempts,
            lease_until: now + self.cfg.lease,
            claimed_at: now,
        };
        let asking = self
            .in_flight
            .iter()
            .find(|(_, f)| {
                f.waiting_on.is_none()
                    && f.conversation == conversation
                    && f.repeat_key.as_deref() == Some(key)
            })
            .map(|(other, _)| *other);
        if let Some(other) = asking {
            log::info!(
                "event=query_repeat message_id={id} query_id={} first_message_id={other}: waiting for its answer",
                q.query_id
            );
            entry.waiting_on = Some(other);
            self.in_flight.insert(id, entry);
            return true;
        }
        let Some(text) = earlier.get(key).and_then(|(first, text)| {
            log::info!(
                "event=query_repeat message_id={id} query_id={} first_message_id={first}: sending the stored answer again",
                q.query_id
            );
            shard::repeat_text(text)
        }) else {
            return false;
        };
        self.in_flight.insert(id, entry);
        self.answers.push((
            BridgeAnswer::new(id, text),
            q.query_id.clone(),
            Duration::ZERO,
        ));
        true
    }

    /// The repeats waiting on `first`: answered with `text` (its answer's
    /// text), or, with `None` (it failed), released to be claimed again.
    fn settle_waiters(&mut self, first: i64, text: Option<&str>) {
        let waiters: Vec<i64> = self
            .in_flight
            .iter()
            .filter(|(_, f)| f.waiting_on == Some(first))
            .map(|(id, _)| *id)
            .collect();
        for w in waiters {
            match text.and_then(shard::repeat_text) {
                Some(t) => {
                    let qid = self
                        .in_flight
                        .get(&w)
                        .map_or(String::new(), |f| f.query_id.clone());
                    self.answers
                        .push((BridgeAnswer::new(w, t), qid, Duration::ZERO));
                }
                None => self.release(w, "the query it repeats was not answered", true),
            }
        }
    }

    fn dead_letter(&mut self, id: i64, query_id: &str, why: &str) {
        self.in_flight.remove(&id);
        self.settle_waiters(id, None);
        match live(&mut self.bridge).and_then(|b| b.dead_letter(&self.claimer, id, why)) {
            Ok(Some(d)) => log::warn!(
                "event=dead_lettered message_id={id} query_id={query_id} attempts={} reason={why:?}",
                d.attempts
            ),
            Ok(None) => log::warn!(
                "event=stale message_id={id} query_id={query_id}: claim lost before dead-lettering"
            ),
            Err(e) => {
                log::warn!(
                    "event=bridge_error op=dead_letter message_id={id} query_id={query_id} reason={:?}: lease expiry retries it",
                    e.to_string()
                )
            }
        }
    }

    fn release(&mut self, id: i64, error: &str, refund: bool) {
        let (q, attempt) = self
            .in_flight
            .remove(&id)
            .map_or((String::new(), 0), |f| (f.query_id, f.attempts));
        self.settle_waiters(id, None);
        match live(&mut self.bridge)
            .and_then(|b| b.release(&self.claimer, &[id], Some(error), refund))
        {
            Ok(0) => log::warn!(
                "event=stale message_id={id} query_id={q}: the claim was already taken over"
            ),
            Ok(_) => log::info!(
                "event=query_retry message_id={id} query_id={q} attempt={attempt} refund={refund} reason={error:?}"
            ),
            Err(e) => {
                log::warn!(
                    "event=bridge_error op=release message_id={id} query_id={q} reason={:?}: its lease will expire instead",
                    e.to_string()
                )
            }
        }
    }

    /// While idle and believed up, check now and then that the server still
    /// answers, so an idle poller shows `blocked` when its server is gone.
    fn health_check(&mut self) {
        if self.server != ServerState::Up
            || !self.in_flight.is_empty()
            || Instant::now() < self.next_health
        {
            return;
        }
        self.next_health = Instant::now() + self.cfg.heartbeat;
        let t = Duration::from_secs(1);
        let result = match self.probe_client.as_mut() {
            Some(c) => c.echo("ping", t).map(|_| ()),
            None => Err(ClientError::ServerGone),
        };
        if result.is_ok() {
            return;
        }
        // Maybe only our probe connection was stale: one fresh connection.
        let opts = ClientOptions {
            connect_timeout: t,
            client_name: "autopoll-poller-health".into(),
            ..ClientOptions::default()
        };
        match Client::connect(&self.cfg.server, &opts) {
            Ok(c) => self.probe_client = Some(c),
            Err(e) => {
                self.probe_client = None;
                self.log_server_down(&e.to_string());
            }
        }
    }

    fn on_result(&mut self, r: AskResult) {
        let Some(f) = self
            .in_flight
            .get(&r.message_id)
            .filter(|f| f.generation == r.generation)
        else {
            if let Some(q) = self.orphans.remove(&(r.generation, r.message_id)) {
                log::warn!(
                    "event=answer_dropped message_id={} query_id={q} reason=\"its bridge file was replaced or removed\": \
                     not written to the file now at the path; the question stays unread in the old file",
                    r.message_id
                );
            }
            return;
        };
        let (query_id, attempts, claimed_at) = (f.query_id.clone(), f.attempts, f.claimed_at);
        let (raw, repeat_key) = (f.query_id_raw.clone(), f.repeat_key.clone());
        match r.outcome {
            Ok(a) => {
                fault::point("after_reply");
                let took = claimed_at.elapsed();
                let mut extra = serde_json::Map::new();
                extra.insert("found".into(), Value::Bool(a.found));
                if !a.invalid_sources.is_empty() {
                    extra.insert("invalid_sources".into(), a.invalid_sources.into());
                }
                if let Some(meta) = a.backend {
                    extra.insert("backend".into(), meta);
                }
                let mut answer = a.answer;
                truncate_chars(&mut answer, MAX_ANSWER_CHARS);
                let resp = Response {
                    kind: "response".into(),
                    query_id: query_id.clone(),
                    answer,
                    sources: a.sources,
                    shard_id: self.cfg.shard_id.clone(),
                    llm_type: a.engine,
                    response_time_sec: took.as_secs_f64(),
                    error: None,
                    context_version: Some(a.context_version),
                    attempts: Some(attempts),
                    repeat: false,
                    extra,
                };
                let text = resp.to_text_raw_id(raw.as_deref());
                self.answers.push((
                    BridgeAnswer {
                        message_id: r.message_id,
                        text: text.clone(),
                        repeat_key,
                    },
                    query_id,
                    took,
                ));
                self.settle_waiters(r.message_id, Some(&text));
            }
            Err(ClientError::Server(e)) => match e.code {
                ErrorCode::TooLarge | ErrorCode::Invalid | ErrorCode::BadFrame => {
                    self.dead_letter(r.message_id, &query_id, &e.message)
                }
                ErrorCode::Timeout | ErrorCode::Engine => {
                    if attempts >= self.cfg.max_attempts {
                        let why = format!("failed {attempts} times; last: {}", e.message);
                        self.dead_letter(r.message_id, &query_id, &why);
                    } else {
                        self.release(r.message_id, &e.message, false);
                    }
                }
                ErrorCode::Overloaded => {
                    // Not the question's fault; give the server a moment.
                    self.release(r.message_id, &e.message, true);
                    self.claims_paused_until = Instant::now() + Duration::from_millis(250);
                }
                ErrorCode::ShuttingDown | ErrorCode::VersionMismatch => {
                    self.release(r.message_id, &e.message, true);
                    self.log_server_down(&e.message);
                }
            },
            Err(ClientError::TooLarge(e)) => {
                self.dead_letter(r.message_id, &query_id, &e.to_string())
            }
            Err(ClientError::Lost) => {
                // The server took the question and died with it: maybe the
                // question's doing, so the attempt counts (a question that
                // kills the server every time is dead-lettered).
                if attempts >= self.cfg.max_attempts {
                    let why = format!("the server went away while answering, {attempts} times");
                    self.dead_letter(r.message_id, &query_id, &why);
                } else {
                    self.release(r.message_id, "the server went away while answering", false);
                }
                self.log_server_down("the server went away while answering");
            }
            Err(e) => {
                // No server, server gone, silent past its deadline, transport
                // trouble: not the question's fault.
                self.release(r.message_id, &e.to_string(), true);
                self.log_server_down(&e.to_string());
            }
        }
    }

    /// Group commit: when the gathered answers are to be written. At once
    /// when nothing else is being asked (no answer could join them), when
    /// they fill three quarters of the slots (bigger groups mean fewer
    /// commits; the quarter still being asked keeps the server busy
    /// meanwhile), or when stopping; otherwise [`GROUP_WINDOW`] after the
    /// first of them arrived. `None`: no answers.
    fn group_due(&mut self) -> Option<Instant> {
        if self.answers.is_empty() {
            self.answers_since = None;
            return None;
        }
        let since = *self.answers_since.get_or_insert_with(Instant::now);
        let asking = self.in_flight.len().saturating_sub(self.answers.len());
        if self.stopping || asking == 0 || self.answers.len() * 4 >= self.cfg.concurrency * 3 {
            return Some(since);
        }
        Some(since + GROUP_WINDOW)
    }

    /// Write gathered answers in one transaction. Their questions stay in
    /// flight (leases extended) until the commit succeeds.
    fn flush(&mut self) {
        if self.answers.is_empty() || Instant::now() < self.flush_after {
            return;
        }
        if self.group_due().is_some_and(|t| Instant::now() < t) {
            return;
        }
        let batch: Vec<BridgeAnswer> = self.answers.iter().map(|(a, _, _)| a.clone()).collect();
        log::debug!("event=answers_commit count={}", batch.len());
        fault::point("before_commit");
        let done = {
            let _w = watch::Writing::start(&self.served.writing);
            live(&mut self.bridge).and_then(|b| b.complete(&self.claimer, &batch))
        };
        match done {
            Ok(ids) => {
                self.answers_since = None;
                if let Some(c) = &self.ckpt {
                    c.committed();
                }
                for ((a, qid, took), rid) in self.answers.drain(..).zip(ids) {
                    self.in_flight.remove(&a.message_id);
                    match rid {
                        Some(rid) => log::info!(
                            "event=query_answered message_id={} query_id={qid} response_id={rid} ms={:.2}",
                            a.message_id,
                            took.as_secs_f64() * 1000.0
                        ),
                        None => log::warn!(
                            "event=stale message_id={} query_id={qid}: another poller took it over; our answer is dropped",
                            a.message_id
                        ),
                    }
                }
            }
            Err(e) => {
                log::warn!(
                    "event=bridge_error op=complete count={} reason={:?}: retrying in 0.5 s",
                    batch.len(),
                    e.to_string()
                );
                self.flush_after = Instant::now() + Duration::from_millis(500);
            }
        }
    }

    fn extend_leases(&mut self) {
        let now = Instant::now();
        if self.extend_retry_at.is_some_and(|t| now < t) {
            return;
        }
        self.extend_retry_at = None;
        let half = self.cfg.lease / 2;
        let due: Vec<i64> = self
            .in_flight
            .iter()
            .filter(|(_, f)| f.lease_until.saturating_duration_since(now) < half)
            .map(|(id, _)| *id)
            .collect();
        if due.is_empty() {
            return;
        }
        match live(&mut self.bridge).and_then(|b| b.extend(&self.claimer, &due, self.cfg.lease)) {
            Ok(n) => {
                if n < due.len() {
                    log::warn!(
                        "event=lease_lost count={}: another poller took over",
                        due.len() - n
                    );
                }
                for id in due {
                    if let Some(f) = self.in_flight.get_mut(&id) {
                        f.lease_until = now + self.cfg.lease;
                    }
                }
            }
            Err(e) => {
                log::warn!(
                    "event=bridge_error op=extend count={} reason={:?}: retrying in 1 s",
                    due.len(),
                    e.to_string()
                );
                self.extend_retry_at = Some(now + Duration::from_secs(1));
            }
        }
    }

    /// How often the loop checks `PRAGMA data_version` itself. While the
    /// bridge refuses writes, once a second only; likewise while another
    /// poller watches the file for us (the hub), or our own watch thread
    /// confirms every commit from the WAL index: their wake-ups are the
    /// fast path, this the safety net.
    fn version_every(&self) -> Duration {
        use std::sync::atomic::Ordering::Relaxed;
        if self.last_claim_error.is_some() {
            Duration::from_secs(1)
        } else if self.served.following.load(Relaxed) || self.served.watching.load(Relaxed) {
            self.cfg.version_check.max(FOLLOWER_VERSION_CHECK)
        } else {
            self.cfg.version_check
        }
    }

    fn changed(&mut self) -> bool {
        let Some(b) = self.bridge.as_mut() else {
            return false;
        };
        match b.data_version() {
            Ok(Some(v)) if v != self.data_version => {
                self.data_version = v;
                true
            }
            // PostgreSQL: wake-ups come from LISTEN (Event::Changed).
            Ok(_) => false,
            Err(_) => true,
        }
    }

    /// On every wake: is the path still our file? If not, close the
    /// connection; while there is none, reopen when a bridge is back.
    /// Returns true when a connection was (re)opened (claim at once), and
    /// fails when the file has been gone longer than the grace.
    fn watch_file(&mut self) -> Result<bool, PollerError> {
        if self.pg_queues.is_some() {
            return Ok(false);
        }
        let seen = conn::look(&self.cfg.db);
        if self.bridge.is_some() {
            match &seen {
                conn::Seen::File(sig) if Some(sig.id) == self.file_id => return Ok(false),
                conn::Seen::File(sig) => {
                    let (old, n) = (self.file_id.map_or(0, |f| f.ino), self.in_flight.len());
                    self.close(conn::Why::Refused(String::new()));
                    log::warn!(
                        "event=bridge_replaced path={} old_inode={old} new_inode={} in_flight={n}: \
                         old connection closed; the new file is opened once it proves a bridge",
                        self.cfg.db.display(),
                        sig.id.ino,
                    );
                }
                conn::Seen::Missing(why) => {
                    let n = self.in_flight.len();
                    self.close(conn::Why::Missing(why.clone()));
                    log::warn!(
                        "event=bridge_missing path={} reason={why:?} in_flight={n}: connection closed; \
                         waiting for the file to come back (exit {} s from now if it does not)",
                        self.cfg.db.display(),
                        self.cfg.missing_grace.as_secs_f64()
                    );
                }
            }
        }
        self.reopen(&seen)
    }

    /// Close the connection; everything in flight on it becomes an orphan.
    fn close(&mut self, why: conn::Why) {
        for (id, f) in self.in_flight.drain() {
            self.orphans.insert((f.generation, id), f.query_id);
        }
        self.answers_since = None;
        for (a, qid, _) in self.answers.drain(..) {
            log::warn!(
                "event=answer_dropped message_id={} query_id={qid} reason=\"its bridge file was replaced or removed before the answer's commit\": \
                 the question stays unread in the old file",
                a.message_id
            );
        }
        // The -wal and -shm are found by name: emptied now, they cannot be
        // read as part of the next file at the path (and the old file, if it
        // lives on elsewhere, holds all its commits itself).
        if let Some(b) = self.bridge.take().and_then(|b| b.into_sqlite()) {
            match b.checkpoint_truncate() {
                Ok(true) => {}
                Ok(false) => log::warn!(
                    "event=checkpoint_incomplete path={}: another process is reading the old file; \
                     its -wal beside the path may still hold old pages (see docs/OPERATIONS.md)",
                    self.cfg.db.display()
                ),
                Err(e) => log::warn!(
                    "event=checkpoint_failed path={} reason={:?}",
                    self.cfg.db.display(),
                    e.to_string()
                ),
            }
        }
        self.file_id = None;
        self.served.gate.allow(None);
        // The checkpoint thread lets go of the old file at once.
        if let Some(c) = &self.ckpt {
            c.gate_moved();
        }
        for m in &mut self.members {
            m.status = None;
        }
        let mut gone = conn::Gone::new();
        gone.note(why);
        self.gone = Some(gone);
    }

    fn reopen(&mut self, seen: &conn::Seen) -> Result<bool, PollerError> {
        let Some(gone) = self.gone.as_mut() else {
            return Ok(false);
        };
        let now = Instant::now();
        let db = self.cfg.db.display().to_string();
        if let conn::Seen::Missing(why) = seen
            && gone.note(conn::Why::Missing(why.clone()))
        {
            log::warn!("event=bridge_missing path={db} reason={why:?}: waiting for it");
        }
        if gone.ready(seen, now) {
            let conn::Seen::File(sig) = seen else {
                return Ok(false);
            };
            // Not while the watch thread still has the old file open: the
            // two would share the -shm by name (watch::FileGate). It lets go
            // on its next wake; the timers bring us back here.
            if !self.served.gate.clear_to_open(sig.id) {
                log::debug!("waiting for the watch thread to close the old file");
                return Ok(false);
            }
            match open_checked(&self.cfg.db, &self.members, self.cfg.session, sig.id) {
                Ok((mut b, version)) => {
                    record_own_commits(&mut b, &self.cfg.db, &self.served);
                    self.served.gate.allow(Some(sig.id));
                    let after = gone.since.elapsed();
                    self.gone = None;
                    self.generation += 1;
                    self.file_id = Some(sig.id);
                    self.data_version = version;
                    self.bridge = Some(Box::new(b));
                    for m in &mut self.members {
                        m.reset(now);
                    }
                    self.last_claim_error = None;
                    self.extend_retry_at = None;
                    self.flush_after = now;
                    log::info!(
                        "event=bridge_reopened path={db} inode={} after_secs={:.1} orphans={}",
                        sig.id.ino,
                        after.as_secs_f64(),
                        self.orphans.len()
                    );
                    // Claims of ours in this file from an earlier connection
                    // (the same file moved back, a backup taken while we held
                    // them): their answers were dropped, so free them now
                    // rather than after their leases.
                    let held = live(&mut self.bridge)
                        .and_then(|b| b.held_by(&self.claimer))
                        .unwrap_or_default();
                    if !held.is_empty() {
                        let r = live(&mut self.bridge).and_then(|b| {
                            b.release(
                                &self.claimer,
                                &held,
                                Some("the poller reopened the bridge file"),
                                true,
                            )
                        });
                        log::info!(
                            "event=released count={} reason=\"held from an earlier connection to this file\" ok={}",
                            held.len(),
                            r.is_ok()
                        );
                    }
                    return Ok(true);
                }
                Err(e) => {
                    let why = e.to_string();
                    if gone.note(conn::Why::Refused(why.clone())) {
                        log::error!(
                            "event=bridge_refused path={db} reason={why:?}: not using it; \
                             waiting for a bridge at that path"
                        );
                    }
                    gone.refused(*sig, now);
                }
            }
        }
        let gone_for = gone.since.elapsed();
        if gone_for >= self.cfg.missing_grace {
            let why = match &gone.why {
                Some(conn::Why::Missing(w)) => w.clone(),
                Some(conn::Why::Refused(w)) if !w.is_empty() => format!("refused: {w}"),
                _ => "replaced by a file not opened yet".into(),
            };
            log::error!(
                "event=bridge_gone path={db} secs={:.1} reason={why:?}: exiting",
                gone_for.as_secs_f64()
            );
            return Err(PollerError::BridgeGone {
                path: self.cfg.db.clone(),
                secs: gone_for.as_secs_f64(),
                why,
            });
        }
        Ok(false)
    }
}

/// Open the file at the path, check it is still `id` and that our
/// conversation and token are in it (with many: one of them, or the file
/// would be someone else's bridge).
fn open_checked(
    db: &std::path::Path,
    members: &[Member],
    session: Session,
    id: conn::FileId,
) -> Result<(Bridge, i64), BridgeError> {
    let b = Bridge::open_with(db, BridgeOptions::default())?;
    match conn::look(db) {
        conn::Seen::File(sig) if sig.id == id => {}
        _ => {
            return Err(BridgeError::Invalid(
                "the file changed again while it was being opened".into(),
            ));
        }
    }
    let mut first_error = None;
    for m in members {
        match b.verify(&m.conversation, session, &m.token) {
            Ok(()) | Err(BridgeError::Expired { .. }) => {
                first_error = None;
                break;
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    let v = b.data_version()?;
    tune(&b);
    Ok((b, v))
}

/// The poller's own SQLite connection checkpoints only as a safety net:
/// the checkpoint thread does it after its commits ([`checkpoint`]).
fn tune(b: &Bridge) {
    if let Err(e) =
        b.connection()
            .pragma_update(None, "wal_autocheckpoint", checkpoint::SAFETY_PAGES)
    {
        log::debug!("wal_autocheckpoint: {e}");
    }
}

/// The loop's connection `b` to `db` records its hot-path commits for the
/// watch thread of `served` ([`own`]).
fn record_own_commits(b: &mut Bridge, db: &std::path::Path, served: &watch::Served) {
    own::install(
        b.connection_mut(),
        db,
        served.writing.clone(),
        served.own.clone(),
    );
}

/// Open the bridge; a PostgreSQL server that cannot be reached yet (down,
/// restarting, the network not up) is waited for with backoff, up to
/// `grace`, as a missing file is later on. Other failures (a wrong
/// password, no schema) are returned at once.
fn open_waiting(
    target: &Target,
    grace: Duration,
    shutdown: &Shutdown,
) -> Result<Box<dyn Store>, PollerError> {
    let since = Instant::now();
    let mut pause = Duration::from_millis(100);
    let mut logged = false;
    loop {
        match target.open(BridgeOptions::default()) {
            Ok(b) => {
                if logged {
                    log::info!(
                        "event=bridge_reachable db={} after_secs={:.1}",
                        target.shown(),
                        since.elapsed().as_secs_f64()
                    );
                }
                return Ok(b);
            }
            Err(e) if e.is_transient() && target.file().is_none() => {
                if since.elapsed() >= grace || shutdown.is_triggered() {
                    return Err(e.into());
                }
                if !logged {
                    log::warn!(
                        "event=bridge_unreachable db={} reason={:?}: retrying with backoff for up to {} s",
                        target.shown(),
                        e.to_string(),
                        grace.as_secs()
                    );
                    logged = true;
                }
                std::thread::sleep(pause.min(grace.saturating_sub(since.elapsed())));
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The ids of the conversations whose questions are claimed.
fn served_names(members: &[Member]) -> Vec<String> {
    members
        .iter()
        .filter(|m| m.served())
        .map(|m| m.conversation.clone())
        .collect()
}

/// The open connection, or an error saying there is none.
fn live(b: &mut Option<Box<dyn Store>>) -> Result<&mut (dyn Store + 'static), BridgeError> {
    b.as_deref_mut().ok_or_else(|| BridgeError::NotFound {
        what: "a bridge connection".into(),
        hint: " (closed: the file was replaced or removed)".into(),
    })
}

/// Check the token, then poll until `shutdown`; returns after releasing
/// whatever is left unanswered.
pub fn run(cfg: PollerConfig, shutdown: Shutdown) -> Result<(), PollerError> {
    if cfg.concurrency == 0 || cfg.max_attempts == 0 {
        return Err(PollerError::Config(
            "--concurrency and --max-attempts must be at least 1".into(),
        ));
    }
    let target = Target::from_path(&cfg.db);
    let pg_url = match &target {
        Target::Postgres(url) => Some(url.clone()),
        Target::File(_) => None,
    };
    let file_id = match (&pg_url, conn::look(&cfg.db)) {
        (None, conn::Seen::File(sig)) => Some(sig.id),
        _ => None,
    };
    let mut bridge = open_waiting(&target, cfg.missing_grace, &shutdown)?;
    if let Some(b) = bridge.as_sqlite() {
        tune(b);
    }
    let members = match &cfg.tokens_file {
        // One conversation: a wrong token is fatal, as it always was.
        None => {
            bridge.verify(&cfg.conversation, cfg.session, &cfg.token)?;
            vec![Member::new(cfg.conversation.clone(), cfg.token.clone())]
        }
        // Many: one conversation's bad token is reported for it alone.
        Some(path) => {
            let mut ms: Vec<Member> = tokens::load(path)?
                .into_iter()
                .map(|e| Member::new(e.conversation, e.token))
                .collect();
            for m in &mut ms {
                members::check(bridge.as_mut(), m, cfg.session);
            }
            ms
        }
    };
    let claimer = Claimer::new(&cfg.shard_id)?;
    let (events_tx, events) = crossbeam_channel::unbounded::<Event>();

    let served = watch::Served {
        session: cfg.session,
        conversations: std::sync::Arc::new(std::sync::Mutex::new(served_names(&members))),
        gate: std::sync::Arc::new(watch::FileGate::default()),
        following: Default::default(),
        watching: Default::default(),
        writing: Default::default(),
        own: Default::default(),
    };
    if let Some(b) = bridge.as_sqlite() {
        record_own_commits(b, &cfg.db, &served);
    }
    served.gate.allow(file_id);
    let pg_queues = pg_url.as_ref().map(|_| {
        let q = autopoll_bridge::pg::listen::Queues::default();
        let names = served_names(&members);
        q.set(
            &names.iter().map(String::as_str).collect::<Vec<_>>(),
            cfg.session,
        );
        q
    });
    let stop_fd = shutdown.fd();
    let watcher = match &pg_url {
        // PostgreSQL: LISTEN, woken only for our queues; a reconnect wakes
        // us too (notifications sent meanwhile are lost: look for work).
        Some(url) => {
            let (tx, stop) = (events_tx.clone(), shutdown.clone());
            autopoll_bridge::pg::listen::spawn(
                "pg-listen",
                url.clone(),
                pg_queues.clone(),
                move |_| tx.send(Event::Changed).is_ok(),
                move || stop.is_triggered(),
            )
            .map_err(|e| PollerError::Io(format!("cannot start the listen thread: {e}")))?
        }
        None => {
            let watch = watch::Watch::new(&cfg.db)
                .map_err(|e| PollerError::Io(format!("inotify on {}: {e}", cfg.db.display())))?;
            let tx = events_tx.clone();
            let db = cfg.db.clone();
            let served_tx = served.clone();
            std::thread::Builder::new()
                .name("bridge-watch".into())
                .spawn(move || watch.run(stop_fd, &db, served_tx, tx))
                .map_err(|e| PollerError::Io(format!("cannot start the watch thread: {e}")))?
        }
    };
    let tokens_watcher = match &cfg.tokens_file {
        Some(path) => {
            let w = watch::Watch::file(path, false, watch::TOKENS_MASK).map_err(|e| {
                PollerError::Io(format!("inotify on the folder of {}: {e}", path.display()))
            })?;
            let (tx, hangup) = (events_tx.clone(), cfg.hangup.clone());
            Some(
                std::thread::Builder::new()
                    .name("tokens-watch".into())
                    .spawn(move || w.run_files(stop_fd, hangup, tx, || Event::Reload))
                    .map_err(|e| PollerError::Io(format!("cannot start the watch thread: {e}")))?,
            )
        }
        None => None,
    };
    let askers = asker::Askers::start(
        cfg.concurrency.min(asker::MAX_LANES),
        cfg.concurrency,
        &events_tx,
        &cfg.server,
        Duration::from_secs(5),
    )
    .map_err(|e| PollerError::Io(format!("cannot start asker threads: {e}")))?;
    drop(events_tx);

    let ckpt = match &pg_url {
        None => Some(
            checkpoint::Checkpointer::start(&cfg.db, served.gate.clone())
                .map_err(|e| PollerError::Io(format!("cannot start the checkpoint thread: {e}")))?,
        ),
        Some(_) => None,
    };
    let data_version = bridge.data_version()?.unwrap_or(0);
    let mut p = Poller {
        bridge: Some(bridge),
        pg_queues,
        file_id,
        generation: 1,
        gone: None,
        orphans: HashMap::new(),
        claimer,
        askers,
        ckpt,
        in_flight: HashMap::new(),
        answers: Vec::new(),
        server: ServerState::Up,
        members,
        served,
        work_seen: false,
        next_turn: 0,
        tokens_error: None,
        data_version,
        flush_after: Instant::now(),
        answers_since: None,
        stopping: false,
        next_health: Instant::now() + cfg.heartbeat,
        probe_client: None,
        claims_paused_until: Instant::now(),
        extend_retry_at: None,
        last_claim_error: None,
        pruner: None,
        next_prune: Instant::now(),
        prune_failing: false,
        cfg,
    };
    let what = match &p.cfg.tokens_file {
        None => p.cfg.conversation.clone(),
        Some(f) => format!(
            "{} conversations (of {}: {} served)",
            p.members.len(),
            f.display(),
            p.members.iter().filter(|m| m.served()).count()
        ),
    };
    log::info!(
        "event=polling conversation={} conversations={} session={} server={} owner={} concurrency={}",
        if p.cfg.tokens_file.is_some() {
            "-"
        } else {
            p.cfg.conversation.as_str()
        },
        p.members.len(),
        p.cfg.session,
        p.cfg.server.name,
        p.claimer.owner(),
        p.cfg.concurrency
    );
    let mut notifier = Notifier::new(&p.cfg.notify);
    notifier.ready(&format!(
        "answering session {} of {what} through server `{}`",
        p.cfg.session, p.cfg.server.name
    ));
    let rescan_every = (p.cfg.lease / 2).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut next_rescan = Instant::now();
    let mut next_version = Instant::now() + p.cfg.version_check;
    let mut want_claim = true;
    let mut stop_at: Option<Instant> = None;
    // A pending re-check of data_version after an early wake: (when, step
    // of RECHECK).
    let mut recheck: Option<(Instant, usize)> = None;
    loop {
        // Only this loop pings: if it hangs, the pings stop and systemd
        // (WatchdogSec=) kills and restarts the poller.
        notifier.watchdog();
        let now = Instant::now();
        if let Some(deadline) = stop_at
            && (p.in_flight.is_empty() || now >= deadline)
        {
            break;
        }
        p.probe();
        if stop_at.is_none()
            && p.bridge.is_some()
            && p.server == ServerState::Up
            && want_claim
            && now >= p.claims_paused_until
        {
            want_claim = p.claim();
        }
        p.extend_leases();
        p.health_check();
        p.heartbeat(false);

        let mut wake = next_version.min(next_rescan);
        // Without a connection there is no heartbeat to write (the timers
        // above bring the file check round ten times a second).
        if let Some(t) = p.heartbeat_due() {
            wake = wake.min(t);
        }
        // The health check runs only while the server is up and idle; a
        // stale time from before would wake us at once, forever.
        if p.server == ServerState::Up && p.in_flight.is_empty() {
            wake = wake.min(p.next_health);
        }
        if let ServerState::Down { next_probe, .. } = p.server {
            wake = wake.min(next_probe);
        }
        if let Some(d) = stop_at {
            wake = wake.min(d);
        }
        if let Some(w) = notifier.wake_within() {
            wake = wake.min(now + w);
        }
        if want_claim && p.claims_paused_until > now {
            wake = wake.min(p.claims_paused_until);
        }
        if let Some(t) = p.extend_retry_at {
            wake = wake.min(t);
        }
        if let Some((t, _)) = recheck {
            wake = wake.min(t);
        }
        if let Some(t) = p.group_due() {
            wake = wake.min(t.max(p.flush_after));
        }
        if p.cfg.retain.is_some() && p.bridge.is_some() && stop_at.is_none() {
            wake = wake.min(p.next_prune);
        }
        if let Some(lease) = p.in_flight.values().map(|f| f.lease_until).min() {
            // A failed extension is retried at extend_retry_at, not before:
            // the lease time stays in the past meanwhile and must not spin us.
            let due = lease - p.cfg.lease / 2;
            wake = wake.min(p.extend_retry_at.map_or(due, |r| due.max(r)));
        }
        // Wake at once only when a claim can actually happen now; otherwise
        // (server down, stopping, paused, full) the timers above decide.
        if want_claim
            && stop_at.is_none()
            && p.bridge.is_some()
            && p.server == ServerState::Up
            && now >= p.claims_paused_until
            && p.in_flight.len() < p.cfg.concurrency
        {
            wake = now;
        }
        let first = match events.recv_timeout(wake.saturating_duration_since(Instant::now())) {
            Ok(ev) => Some(ev),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        // Take everything already queued, so answers are written in one batch.
        let mut evs: Vec<Event> = first.into_iter().collect();
        evs.extend(events.try_iter());
        let mut woke = false;
        for ev in evs {
            match ev {
                Event::Wake => woke = true,
                Event::Changed => {
                    want_claim = true;
                    p.work_seen = true;
                }
                Event::Reload => {
                    if stop_at.is_none() {
                        p.reload_tokens();
                        want_claim = true;
                    }
                }
                Event::Results(rs) => {
                    for r in rs {
                        p.on_result(r);
                    }
                }
                Event::Stop => {
                    if stop_at.is_none() {
                        notifier.stopping("stopping: finishing in-flight questions");
                        log::info!(
                            "event=stopping in_flight={} grace_secs={}",
                            p.in_flight.len(),
                            p.cfg.grace.as_secs_f64()
                        );
                        stop_at = Some(Instant::now() + p.cfg.grace);
                        p.stopping = true;
                    }
                }
            }
        }
        // Before any write: is the path still our file?
        if p.watch_file()? {
            want_claim = true;
            recheck = None;
        }
        p.flush();
        if stop_at.is_none() {
            p.prune_tick();
        }
        let now = Instant::now();
        let recheck_due = recheck.is_some_and(|(t, _)| now >= t);
        // While the bridge refuses writes, our own failing attempts touch the
        // WAL and wake us: only the 1 s timer counts then.
        let woke = woke && p.last_claim_error.is_none();
        if woke || recheck_due || now >= next_version {
            next_version = now + p.version_every();
            if p.changed() {
                want_claim = true;
                recheck = None;
            } else if woke && p.last_claim_error.is_none() {
                // The WAL is written before the commit shows in the shared
                // index: a wake may come a moment early. Look again within
                // microseconds, then less and less often (RECHECK).
                recheck = Some((now + RECHECK[0], 0));
            } else if let Some((_, step)) = recheck.filter(|_| recheck_due) {
                recheck = RECHECK.get(step + 1).map(|d| (now + *d, step + 1));
            }
        }
        if now >= next_rescan {
            next_rescan = now + rescan_every;
            want_claim = true;
            // The claim looks at the file anyway: the version check starts
            // over with it, so a follower (both once a second) wakes once
            // a second, not twice.
            next_version = next_version.max(now + p.version_every());
        }
        p.heartbeat(false);
    }

    // Release what is still unanswered, so others need not wait for leases.
    // (Without a connection, orphans' claims keep their leases in the old file.)
    if p.bridge.is_some()
        && p.pg_queues.is_none()
        && !matches!(conn::look(&p.cfg.db), conn::Seen::File(s) if Some(s.id) == p.file_id)
    {
        p.close(conn::Why::Missing("checked at shutdown".into()));
    }
    p.stopping = true;
    p.flush();
    let left: Vec<i64> = p.in_flight.keys().copied().collect();
    if !left.is_empty() && p.bridge.is_some() {
        log::warn!(
            "event=released count={} reason=\"shutdown before answers came\"",
            left.len()
        );
        if let Err(e) = live(&mut p.bridge).and_then(|b| {
            b.release(
                &p.claimer,
                &left,
                Some("poller stopped before the answer came"),
                true,
            )
        }) {
            log::warn!(
                "event=bridge_error op=release count={} reason={:?}: their leases will expire",
                left.len(),
                e.to_string()
            );
        }
    }
    if let Some(b) = p.bridge.as_mut() {
        let held = b.held_by(&p.claimer).unwrap_or_default();
        if !held.is_empty() {
            let _ = b.release(&p.claimer, &held, Some("poller stopped"), true);
        }
        // Say so, or the sessions would look alive for two more minutes.
        for m in std::mem::take(&mut p.members) {
            p.say_stopped(&m);
        }
    }
    let askers = p.askers.close();
    if let Some(c) = p.ckpt.take() {
        c.stop();
    }
    shutdown.trigger();
    let _ = watcher.join();
    if let Some(w) = tokens_watcher {
        let _ = w.join();
    }
    // Askers finish what they have in flight (bounded by the query
    // timeout); those still busy are not waited for.
    for a in askers {
        if a.is_finished() {
            let _ = a.join();
        }
    }
    log::info!("event=stopped");
    Ok(())
}
