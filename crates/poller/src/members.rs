//! The conversations one poller serves: one with `--conversation/--token`,
//! any number with `--tokens-file` ([`crate::tokens`]). Each has its own
//! token, heartbeat and status in `session_status`; a token refused for one
//! is reported for that one (logged once, its heartbeat stops) and does not
//! stop the others. A new tokens file is applied as a difference: added
//! conversations are checked and served at once, removed ones get a
//! `stopped` heartbeat and no more claims (questions of theirs already in
//! flight are still answered), a changed token replaces the old one.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use autopoll_bridge::{Error as BridgeError, SessionState, Store};

use crate::{Poller, ServerState, live, tokens};

/// One served conversation.
pub(crate) struct Member {
    /// The conversation id.
    pub(crate) conversation: String,
    /// Its served session's token.
    pub(crate) token: String,
    /// The status last written.
    pub(crate) status: Option<SessionState>,
    /// When the heartbeat is due.
    pub(crate) next_heartbeat: Instant,
    /// When the status was last written.
    pub(crate) last_status_write: Instant,
    /// Heartbeats are failing (logged once until one works again).
    pub(crate) heartbeat_failing: bool,
    /// The token was rejected (logged once until it works again).
    pub(crate) token_warned: bool,
    /// The token does not open the conversation (wrong token, or no such
    /// conversation): not served until the tokens file changes.
    pub(crate) refused: Option<String>,
}

impl Member {
    /// A member to serve, heartbeat due now.
    pub(crate) fn new(conversation: String, token: String) -> Member {
        let now = Instant::now();
        Member {
            conversation,
            token,
            status: None,
            next_heartbeat: now,
            last_status_write: now,
            heartbeat_failing: false,
            token_warned: false,
            refused: None,
        }
    }

    /// Whether its questions are claimed.
    pub(crate) fn served(&self) -> bool {
        self.refused.is_none()
    }

    /// After a new connection: write the status again at once.
    pub(crate) fn reset(&mut self, now: Instant) {
        self.status = None;
        self.heartbeat_failing = false;
        self.next_heartbeat = now;
    }
}

/// Check a member's token on `b`: a wrong token or a missing conversation
/// makes it refused (logged once); an expired one is still served (its
/// heartbeats are refused and say so), as with `--conversation`.
pub(crate) fn check(b: &mut dyn Store, m: &mut Member, session: autopoll_bridge::Session) {
    match b.verify(&m.conversation, session, &m.token) {
        Ok(()) | Err(BridgeError::Expired { .. }) => m.refused = None,
        Err(e @ (BridgeError::InvalidToken { .. } | BridgeError::NotFound { .. })) => {
            let why = e.to_string();
            if m.refused.as_deref() != Some(why.as_str()) {
                log::error!(
                    "event=token_rejected conversation={} reason={why:?}: not serving this \
                     conversation until its line in the tokens file is fixed; the others go on",
                    m.conversation
                );
            }
            m.refused = Some(why);
        }
        // The bridge is busy or failing: served, and its heartbeat tells.
        Err(e) => log::warn!(
            "event=bridge_error op=verify conversation={} reason={:?}: serving it meanwhile",
            m.conversation,
            e.to_string()
        ),
    }
}

impl Poller {
    /// The status `conversation` should show.
    pub(crate) fn wanted_status(&self, conversation: &str) -> SessionState {
        if matches!(self.server, ServerState::Down { .. }) {
            SessionState::Blocked
        } else if self
            .in_flight
            .values()
            .any(|f| f.conversation == conversation)
        {
            SessionState::Working
        } else {
            SessionState::Waiting
        }
    }

    /// The earliest time a heartbeat or status write is due (None: none is).
    pub(crate) fn heartbeat_due(&self) -> Option<Instant> {
        self.bridge.as_ref()?;
        self.members
            .iter()
            .filter(|m| m.served())
            .map(|m| {
                let mut t = m.next_heartbeat;
                if m.status != Some(self.wanted_status(&m.conversation)) && !m.heartbeat_failing {
                    t = t.min(m.last_status_write + Duration::from_secs(1));
                }
                t
            })
            .min()
    }

    /// Write the heartbeats (and status changes) that are due, one short
    /// transaction per conversation; `force`: all of them now.
    pub(crate) fn heartbeat(&mut self, force: bool) {
        if self.bridge.is_none() {
            return;
        }
        for i in 0..self.members.len() {
            if !self.members[i].served() {
                continue;
            }
            let want = self.wanted_status(&self.members[i].conversation);
            let (session, every) = (self.cfg.session, self.cfg.heartbeat);
            let m = &mut self.members[i];
            let now = Instant::now();
            let due = now >= m.next_heartbeat;
            let changed = Some(want) != m.status;
            // Blocked and unblocked show at once; working/waiting flips are
            // written at most once a second, so a busy poller does not spend a
            // transaction per question on its status.
            let urgent = changed
                && (want == SessionState::Blocked
                    || m.status == Some(SessionState::Blocked)
                    || m.status.is_none());
            let settled = changed && now >= m.last_status_write + Duration::from_secs(1);
            if !(force || due || urgent || settled) {
                continue;
            }
            // A failing bridge is retried on its timer, however urgent the change.
            if m.heartbeat_failing && !due {
                continue;
            }
            match live(&mut self.bridge)
                .and_then(|b| b.heartbeat(&m.conversation, session, &m.token, want))
            {
                Ok(()) => {
                    if let Some(c) = &self.ckpt {
                        c.committed();
                    }
                    if changed {
                        log::info!(
                            "event=status status={} conversation={}",
                            want.as_str(),
                            m.conversation
                        );
                    }
                    m.status = Some(want);
                    m.last_status_write = now;
                    if std::mem::take(&mut m.heartbeat_failing) {
                        log::info!("event=heartbeat_recovered conversation={}", m.conversation);
                    }
                    m.token_warned = false;
                    m.next_heartbeat = now + every;
                }
                Err(e @ (BridgeError::Expired { .. } | BridgeError::InvalidToken { .. })) => {
                    if !m.token_warned {
                        log::error!(
                            "event=token_rejected conversation={} reason={:?}: heartbeats stop; \
                             questions are still answered",
                            m.conversation,
                            e.to_string()
                        );
                        m.token_warned = true;
                    }
                    // Retried on the heartbeat timer only (a renewal brings it back).
                    m.heartbeat_failing = true;
                    m.next_heartbeat = Instant::now() + every;
                }
                Err(e) => {
                    if !m.heartbeat_failing {
                        log::warn!(
                            "event=heartbeat_failed conversation={} reason={:?}: retrying every second",
                            m.conversation,
                            e.to_string()
                        );
                        m.heartbeat_failing = true;
                    }
                    m.next_heartbeat = Instant::now() + Duration::from_secs(1);
                }
            }
        }
    }

    /// Say `stopped` for a conversation no longer served, so it does not
    /// look alive for two more minutes.
    pub(crate) fn say_stopped(&mut self, m: &Member) {
        if !m.served() {
            return;
        }
        let Some(b) = self.bridge.as_mut() else {
            return;
        };
        match b.heartbeat(
            &m.conversation,
            self.cfg.session,
            &m.token,
            SessionState::Stopped,
        ) {
            Ok(()) => log::info!(
                "event=status status=stopped conversation={}",
                m.conversation
            ),
            Err(e) => log::warn!(
                "event=heartbeat_failed conversation={} reason={:?}: the session looks alive \
                 until its heartbeat ages out",
                m.conversation,
                e.to_string()
            ),
        }
    }

    /// Read the tokens file again and apply the difference. A file that
    /// cannot be used keeps the current set (its error is logged once).
    pub(crate) fn reload_tokens(&mut self) {
        let Some(path) = self.cfg.tokens_file.clone() else {
            return;
        };
        let entries = match tokens::load(&path) {
            Ok(e) => e,
            Err(e) => {
                let msg = e.to_string();
                if self.tokens_error.as_deref() != Some(msg.as_str()) {
                    log::error!(
                        "event=tokens_refused reason={msg:?}: keeping the previous {} conversation(s)",
                        self.members.len()
                    );
                    self.tokens_error = Some(msg);
                }
                return;
            }
        };
        self.tokens_error = None;
        let mut old: HashMap<String, Member> = self
            .members
            .drain(..)
            .map(|m| (m.conversation.clone(), m))
            .collect();
        let (mut added, mut changed) = (0, 0);
        let now = Instant::now();
        for e in entries {
            let m = match old.remove(&e.conversation) {
                Some(m) if m.token == e.token => m,
                Some(mut m) => {
                    changed += 1;
                    log::info!(
                        "event=token_changed conversation={}: using the new token",
                        m.conversation
                    );
                    m.token = e.token;
                    m.refused = None;
                    m.token_warned = false;
                    m.reset(now);
                    if let Some(b) = self.bridge.as_mut() {
                        check(b.as_mut(), &mut m, self.cfg.session);
                    }
                    m
                }
                None => {
                    added += 1;
                    let mut m = Member::new(e.conversation, e.token);
                    if let Some(b) = self.bridge.as_mut() {
                        check(b.as_mut(), &mut m, self.cfg.session);
                    }
                    log::info!(
                        "event=conversation_added conversation={} served={}",
                        m.conversation,
                        m.served()
                    );
                    m
                }
            };
            self.members.push(m);
        }
        let removed: Vec<Member> = old.into_values().collect();
        for m in &removed {
            log::info!(
                "event=conversation_removed conversation={}: no new claims; questions in flight are still answered",
                m.conversation
            );
            self.say_stopped(m);
        }
        log::info!(
            "event=tokens_reloaded conversations={} added={added} removed={} changed={changed}",
            self.members.len(),
            removed.len()
        );
        self.next_turn = 0;
        if let Ok(mut names) = self.served.conversations.lock() {
            *names = crate::served_names(&self.members);
        }
        if let Some(q) = &self.pg_queues {
            let names = crate::served_names(&self.members);
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            q.set(&names, self.cfg.session);
        }
    }
}
