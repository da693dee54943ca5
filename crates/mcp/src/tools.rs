//! The tools themselves: argument checks (each failure a message that says
//! what to fix), the bridge operation (through `autopoll_bridge`, so every
//! row, audit entry, timestamp and redaction is the one the Python server
//! writes), and the result: a text whose lines are the ones agents already
//! parse, plus `structuredContent` with the same facts.
//!
//! A tool failure is a result with `isError: true`, never a JSON-RPC error:
//! the model reads it and can fix its call. Wrong or expired tokens start
//! with `Authentication failed:` as on the Python server, other failures
//! with `Error:`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use autopoll_bridge::shard::{self, Response};
use autopoll_bridge::{
    BridgeOptions, Error as BridgeError, Message, Session, SessionState, Store, Target,
};
use serde_json::{Map, Value, json};

use crate::schema;
use crate::waiter::{self, Hub, Wait, Waited};

/// What every tool call needs.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// The bridge file.
    pub db: PathBuf,
    /// Wakes `ask_shard` waiters.
    pub hub: Arc<Hub>,
}

/// A tool's result, as `tools/call` returns it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ToolResult {
    /// The text content.
    pub text: String,
    /// `structuredContent`, if any.
    pub structured: Option<Value>,
    /// `isError`.
    pub is_error: bool,
    /// Messages this call marked read, to be made unread again when the
    /// call was cancelled and its result is never sent ([`undo`]).
    pub undo: Option<Undo>,
}

/// Messages a call marked read: what [`undo`] needs to unmark them.
#[derive(Debug, Clone, PartialEq)]
pub struct Undo {
    /// Their conversation.
    pub conversation: String,
    /// The reader's session.
    pub session: Session,
    /// The reader's token.
    pub token: String,
    /// The message ids.
    pub ids: Vec<i64>,
}

/// A call was cancelled after it had marked messages read: make them unread
/// again, so they are not lost (the client ignores the result of a call it
/// cancelled, and we send none). Returns how many were unmarked.
pub fn undo(ctx: &Ctx, u: &Undo) -> usize {
    let res = open(&ctx.db).map_err(|_| ()).and_then(|mut b| {
        b.unmark_read(&u.conversation, u.session, &u.token, &u.ids)
            .map_err(|e| {
                log::warn!(
                    "event=unmark_failed ids={:?} reason={:?}",
                    u.ids,
                    e.to_string()
                )
            })
    });
    match res {
        Ok(n) => {
            log::info!(
                "event=unmarked_after_cancel count={n} conversation={}",
                u.conversation
            );
            n
        }
        Err(()) => 0,
    }
}

impl ToolResult {
    fn ok(text: String, structured: Value) -> ToolResult {
        ToolResult {
            text,
            structured: Some(structured),
            ..ToolResult::default()
        }
    }

    fn error(text: String) -> ToolResult {
        ToolResult {
            text,
            is_error: true,
            ..ToolResult::default()
        }
    }

    /// The `tools/call` result object.
    pub fn to_value(&self) -> Value {
        let mut v = json!({
            "content": [{ "type": "text", "text": self.text }],
            "isError": self.is_error,
        });
        if let Some(s) = &self.structured {
            v["structuredContent"] = s.clone();
        }
        v
    }
}

/// Why a call failed, as the model will read it.
#[derive(Debug)]
enum Fail {
    /// Bad arguments or another failure: `Error: ...`.
    Error(String),
    /// Wrong or expired token: `Authentication failed: ...`.
    Auth(String),
}

impl Fail {
    /// The message without its `Error:` or `Authentication failed:` prefix.
    fn message(&self) -> &str {
        match self {
            Fail::Error(m) | Fail::Auth(m) => m,
        }
    }

    fn into_result(self) -> ToolResult {
        match self {
            Fail::Error(m) => ToolResult::error(format!("Error: {m}")),
            Fail::Auth(m) => ToolResult::error(format!("Authentication failed: {m}")),
        }
    }
}

type R<T> = Result<T, Fail>;

fn bad(msg: impl Into<String>) -> Fail {
    Fail::Error(msg.into())
}

impl From<BridgeError> for Fail {
    fn from(e: BridgeError) -> Fail {
        match e {
            BridgeError::InvalidToken {
                conversation,
                session,
                ..
            } => Fail::Auth(format!(
                "Invalid session token for conversation {conversation} session {session}: give the \
                 token create_conversation returned for that session (\"Your token\" for a, \
                 \"Partner token\" for b)"
            )),
            BridgeError::Expired {
                conversation,
                expires_at,
            } => Fail::Auth(format!(
                "Invalid session token: conversation {conversation} expired at {expires_at} UTC; \
                 create a new one with create_conversation, or renew it from a shell with \
                 `autopoll bridge renew --conversation {conversation} --token TOKEN`"
            )),
            BridgeError::NotFound { what, .. } if what.starts_with("conversation ") => {
                Fail::Auth(format!(
                    "Invalid session token: {what} is not in this bridge file; use the \
                     conversation_id that create_conversation returned (on the same bridge file)"
                ))
            }
            BridgeError::NotFound { what, .. } => Fail::Error(format!(
                "{what} not found in this bridge file; use the conversation_id that \
                 create_conversation returned (on the same bridge file)"
            )),
            e => Fail::Error(e.to_string()),
        }
    }
}

/// The arguments of one call.
struct Args<'a>(&'a Map<String, Value>);

impl<'a> Args<'a> {
    fn opt(&self, name: &str) -> Option<&'a Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    fn string(&self, name: &str) -> R<&'a str> {
        match self.opt(name) {
            Some(Value::String(s)) => Ok(s),
            Some(other) => Err(bad(format!(
                "`{name}` must be a string, not {}",
                kind(other)
            ))),
            None => Err(bad(format!("`{name}` is required"))),
        }
    }

    fn opt_string(&self, name: &str) -> R<Option<&'a str>> {
        match self.opt(name) {
            None => Ok(None),
            Some(_) => self.string(name).map(Some),
        }
    }

    fn conversation(&self) -> R<&'a str> {
        let c = self.string("conversation_id")?;
        if !autopoll_bridge::token::is_conversation_id(c) {
            return Err(bad(format!(
                "`conversation_id` must be `conv_` and 16 lowercase hex digits (pattern {}), as \
                 create_conversation returned it; got {:?}",
                schema::CONVERSATION_PATTERN,
                clip(c, 40)
            )));
        }
        Ok(c)
    }

    fn session(&self) -> R<Session> {
        match self.string("session_id")? {
            "a" => Ok(Session::A),
            "b" => Ok(Session::B),
            other => Err(bad(format!(
                "`session_id` must be \"a\" or \"b\", not {:?}",
                clip(other, 20)
            ))),
        }
    }

    fn token(&self) -> R<&'a str> {
        let t = self.string("token")?;
        let n = t.chars().count();
        if n != 64 {
            return Err(bad(format!(
                "`token` must be exactly 64 characters (the token create_conversation returned); \
                 this one is {n}{}",
                if t.trim() != t {
                    ", with spaces around it"
                } else {
                    ""
                }
            )));
        }
        Ok(t)
    }

    fn auth(&self) -> R<(&'a str, Session, &'a str)> {
        Ok((self.conversation()?, self.session()?, self.token()?))
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}...", s.chars().take(n).collect::<String>())
    }
}

fn open(db: &Path) -> R<Box<dyn Store>> {
    Target::from_path(db)
        .open(BridgeOptions::default())
        .map_err(|e| bad(format!("cannot open the bridge: {e}")))
}

/// Run tool `name` (which must be one of [`schema::TOOL_NAMES`]).
pub fn call(ctx: &Ctx, name: &str, args: &Map<String, Value>, cancel: &AtomicBool) -> ToolResult {
    let a = Args(args);
    let r = match name {
        "create_conversation" => create(ctx, &a),
        "send_to_partner" => send(ctx, &a),
        "check_messages" => check(ctx, &a),
        "update_my_status" => status(ctx, &a),
        "check_partner_status" => partner(ctx, &a),
        "ask_shard" => ask(ctx, &a, cancel),
        "shard_status" => shard_status(ctx, &a),
        other => Err(bad(format!("unknown tool {other:?}"))),
    };
    r.unwrap_or_else(Fail::into_result)
}

fn create(ctx: &Ctx, a: &Args<'_>) -> R<ToolResult> {
    let mine = a.string("my_role")?;
    let partner = a.string("partner_role")?;
    for (name, role) in [("my_role", mine), ("partner_role", partner)] {
        let n = role.chars().count();
        if n < schema::ROLE_CHARS.0 || n > schema::ROLE_CHARS.1 {
            return Err(bad(format!(
                "`{name}` must be {} to {} characters; {:?} is {n}",
                schema::ROLE_CHARS.0,
                schema::ROLE_CHARS.1,
                clip(role, 40)
            )));
        }
    }
    let mut b = open(&ctx.db)?;
    let c = b.create_conversation(mine, partner, autopoll_bridge::DEFAULT_TTL)?;
    let text = format!(
        "Conversation created\n\
         Conversation ID: {id}\n\
         Your session: a ({mine})\n\
         Your token (keep secret): {ta}\n\
         Partner session: b ({partner})\n\
         Partner token (share securely): {tb}\n\
         Expires: {exp}\n\n\
         Give the partner its conversation ID and partner token; for an autopoll memory shard: \
         AUTOPOLL_CONVERSATION={id} AUTOPOLL_TOKEN=<partner token> autopoll-poller --db ...",
        id = c.conversation_id,
        ta = c.session_a_token,
        tb = c.session_b_token,
        exp = c.expires_at,
    );
    Ok(ToolResult::ok(
        text,
        json!({
            "conversation_id": c.conversation_id,
            "session_id": "a",
            "token": c.session_a_token,
            "partner_session_id": "b",
            "partner_token": c.session_b_token,
            "my_role": mine,
            "partner_role": partner,
            "expires_at": c.expires_at,
        }),
    ))
}

fn send(ctx: &Ctx, a: &Args<'_>) -> R<ToolResult> {
    let (conv, session, token) = a.auth()?;
    let message = a.string("message")?;
    let n = message.chars().count();
    if n > autopoll_bridge::MAX_MESSAGE_CHARS {
        return Err(bad(format!(
            "`message` is {n} characters; the bridge takes at most {}: shorten it or send it in parts",
            autopoll_bridge::MAX_MESSAGE_CHARS
        )));
    }
    let action = a.opt_string("action_type")?.unwrap_or("info");
    if !schema::ACTION_TYPES.contains(&action) {
        return Err(bad(format!(
            "`action_type` must be one of {}, not {:?}",
            schema::ACTION_TYPES.join(", "),
            clip(action, 30)
        )));
    }
    let files: Vec<&str> = match a.opt("files_involved") {
        None => Vec::new(),
        Some(Value::Array(items)) => {
            if items.len() > schema::MAX_FILES {
                return Err(bad(format!(
                    "`files_involved` lists {} files; at most {}",
                    items.len(),
                    schema::MAX_FILES
                )));
            }
            items
                .iter()
                .map(|f| {
                    f.as_str().ok_or_else(|| {
                        bad(format!(
                            "`files_involved` must hold strings (file paths), not {}",
                            kind(f)
                        ))
                    })
                })
                .collect::<R<_>>()?
        }
        Some(other) => {
            return Err(bad(format!(
                "`files_involved` must be an array of strings, not {}",
                kind(other)
            )));
        }
    };
    let meta = json!({ "action_type": action, "files_involved": files });
    let mut b = open(&ctx.db)?;
    let sent = b.send(conv, session, token, message, Some(&meta))?;
    let mut text = "Message sent to partner session".to_string();
    if sent.redacted {
        text.push_str("\nSecrets were redacted from the message before it was stored");
    }
    Ok(ToolResult::ok(
        text,
        json!({
            "message_id": sent.id,
            "to_session": session.other().as_str(),
            "timestamp": sent.timestamp,
            "redacted": sent.redacted,
        }),
    ))
}

/// The files of a message's metadata.
fn files_of(m: &Message) -> Vec<String> {
    m.metadata
        .get("files_involved")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|f| f.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// The Python server's `check_messages` text.
pub fn messages_text(msgs: &[Message]) -> String {
    if msgs.is_empty() {
        return "No new messages".into();
    }
    let mut s = format!("{} new message(s):\n", msgs.len());
    for m in msgs {
        s.push('\n');
        s.push_str(&format!("From: Session {}\n", m.from_session));
        s.push_str(&format!("Time: {}\n", m.timestamp));
        if let Some(t) = m.action_type() {
            s.push_str(&format!("Type: {t}\n"));
        }
        s.push_str("\nMessage:\n");
        s.push_str(&m.message);
        s.push('\n');
        let files = files_of(m);
        if !files.is_empty() {
            s.push_str(&format!("Files: {}\n", files.join(", ")));
        }
        s.push_str(&"=".repeat(60));
        s.push('\n');
    }
    s
}

fn check(ctx: &Ctx, a: &Args<'_>) -> R<ToolResult> {
    let (conv, session, token) = a.auth()?;
    let mut b = open(&ctx.db)?;
    let msgs = b.read_unread(conv, session, token)?;
    let list: Vec<Value> = msgs
        .iter()
        .map(|m| {
            json!({
                "id": m.id,
                "from": m.from_session,
                "message": m.message,
                "metadata": m.metadata,
                "timestamp": m.timestamp,
                "action_type": m.action_type(),
                "files_involved": files_of(m),
            })
        })
        .collect();
    let mut r = ToolResult::ok(
        messages_text(&msgs),
        json!({ "count": msgs.len(), "messages": list }),
    );
    if !msgs.is_empty() {
        r.undo = Some(Undo {
            conversation: conv.into(),
            session,
            token: token.into(),
            ids: msgs.iter().map(|m| m.id).collect(),
        });
    }
    Ok(r)
}

fn status(ctx: &Ctx, a: &Args<'_>) -> R<ToolResult> {
    let (conv, session, token) = a.auth()?;
    let st = a.string("status")?;
    if !schema::STATUSES.contains(&st) {
        return Err(bad(format!(
            "`status` must be one of {}, not {:?}",
            schema::STATUSES.join(", "),
            clip(st, 30)
        )));
    }
    let state: SessionState = st.parse()?;
    let mut b = open(&ctx.db)?;
    let at = b.update_status(conv, session, token, state)?;
    Ok(ToolResult::ok(
        format!("Status updated: {st}"),
        json!({ "status": st, "last_heartbeat": at }),
    ))
}

fn py_bool(b: bool) -> &'static str {
    if b { "True" } else { "False" }
}

fn partner(ctx: &Ctx, a: &Args<'_>) -> R<ToolResult> {
    let (conv, session, token) = a.auth()?;
    let mut b = open(&ctx.db)?;
    let p = b.partner_status(conv, session, token)?;
    let other = session.other().as_str().to_ascii_uppercase();
    let text = match (&p.last_heartbeat, p.age_seconds) {
        (Some(hb), age) => format!(
            "Partner Session {other}\nStatus: {}\nLast heartbeat: {hb}\nAge: {}s\nAlive: {}",
            p.status,
            age.map_or("unknown".into(), |a| a.to_string()),
            py_bool(p.alive)
        ),
        (None, _) => format!(
            "Partner Session {other}\nStatus: {}\nLast heartbeat: Never\nAge: N/As\nAlive: {}",
            p.status,
            py_bool(p.alive)
        ),
    };
    Ok(ToolResult::ok(
        text,
        json!({
            "partner_session": session.other().as_str(),
            "status": p.status,
            "last_heartbeat": p.last_heartbeat,
            "age_seconds": p.age_seconds,
            "alive": p.alive,
        }),
    ))
}

fn ask(ctx: &Ctx, a: &Args<'_>, cancel: &AtomicBool) -> R<ToolResult> {
    let (conv, session, token) = a.auth()?;
    let question = a.string("question")?;
    if question.trim().is_empty() {
        return Err(bad(
            "`question` is empty: give the question to ask the shard",
        ));
    }
    let chars = question.chars().count();
    if chars > schema::MAX_QUESTION_CHARS {
        return Err(bad(format!(
            "`question` is {chars} characters; ask_shard takes at most {}: shorten it",
            schema::MAX_QUESTION_CHARS
        )));
    }
    let timeout = match a.opt("timeout_secs") {
        None => schema::ASK_TIMEOUT_SECS.0,
        Some(v) => match v.as_f64() {
            Some(t) if t > 0.0 && t <= schema::ASK_TIMEOUT_SECS.1 => t,
            _ => {
                return Err(bad(format!(
                    "`timeout_secs` must be a number of seconds above 0 and at most {}, not {}",
                    schema::ASK_TIMEOUT_SECS.1,
                    clip(&v.to_string(), 30)
                )));
            }
        },
    };
    let qid = shard::new_query_id()?;
    let text = shard::query_text(&qid, question);
    let n = text.chars().count();
    if n > autopoll_bridge::MAX_MESSAGE_CHARS {
        return Err(bad(format!(
            "the question makes a {n}-character query message; the bridge takes at most {}: shorten it",
            autopoll_bridge::MAX_MESSAGE_CHARS
        )));
    }
    let mut b = open(&ctx.db)?;
    let started = Instant::now();
    let meta = json!({ "action_type": "question", "files_involved": [] });
    let sent = b.send(conv, session, token, &text, Some(&meta))?;
    log::info!(
        "event=query_sent query_id={qid} message_id={} conversation={conv}",
        sent.id
    );
    let w = Wait {
        conversation: conv,
        session,
        token,
        query_id: &qid,
        after_id: sent.id,
        deadline: started + Duration::from_secs_f64(timeout),
        cancelled: cancel,
    };
    let other = session.other();
    // From here on the question is queued: every failure names its query_id.
    let waited = waiter::wait_for_response(b.as_mut(), &ctx.hub, &w).map_err(|e| {
        bad(format!(
            "{}. The question stays queued as query_id {qid} (message {}); check_messages \
             returns its response",
            Fail::from(e).message(),
            sent.id
        ))
    })?;
    match waited {
        Waited::Answered {
            message,
            response,
            newly_read,
        } => {
            let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
            log::info!("event=answer_received query_id={qid} elapsed_ms={elapsed_ms:.1}");
            let mut r = answer_result(&response, sent.id, message.id, elapsed_ms);
            if newly_read {
                r.undo = Some(Undo {
                    conversation: conv.into(),
                    session,
                    token: token.into(),
                    ids: vec![message.id],
                });
            } else {
                // Another reader (a check_messages) took it first.
                r.text.push_str(
                    "already_read: true (another check_messages call read this answer too)\n",
                );
                if let Some(st) = r.structured.as_mut() {
                    st["already_read"] = json!(true);
                }
            }
            Ok(r)
        }
        Waited::TimedOut => {
            log::info!("event=ask_timed_out query_id={qid} message_id={}", sent.id);
            Err(bad(format!(
                "no answer to query_id {qid} within {timeout} s. The question stays queued \
                 (message {} to session {other}); when the shard answers, check_messages returns the \
                 response with \"query_id\": \"{qid}\". Is a poller answering session {other}? \
                 shard_status shows its heartbeat and queue.",
                sent.id
            )))
        }
        Waited::Cancelled => {
            log::info!("event=ask_cancelled query_id={qid} message_id={}", sent.id);
            Err(bad(format!(
                "cancelled; the question stays queued as query_id {qid} and check_messages finds its answer"
            )))
        }
    }
}

/// The result of an answered `ask_shard`.
fn answer_result(r: &Response, message_id: i64, response_id: i64, elapsed_ms: f64) -> ToolResult {
    let mut text = String::new();
    if let Some(e) = &r.error {
        text.push_str(&format!(
            "Error: the shard could not answer query_id {}: {e}\n",
            r.query_id
        ));
    } else {
        text.push_str(&r.answer);
        text.push('\n');
    }
    if !r.sources.is_empty() {
        text.push_str("\nSources:\n");
        for s in &r.sources {
            text.push_str(s);
            text.push('\n');
        }
    }
    text.push_str(&format!("\nquery_id: {}\n", r.query_id));
    if let Some(v) = &r.context_version {
        text.push_str(&format!("context_version: {v}\n"));
    }
    text.push_str(&format!("elapsed_ms: {elapsed_ms:.1}\n"));
    let mut s = json!({
        "query_id": r.query_id,
        "answer": r.answer,
        "sources": r.sources,
        "context_version": r.context_version,
        "elapsed_ms": elapsed_ms,
        "shard_id": r.shard_id,
        "llm_type": r.llm_type,
        "message_id": message_id,
        "response_id": response_id,
    });
    if let Some(e) = &r.error {
        s["error"] = json!(e);
    }
    ToolResult {
        text,
        structured: Some(s),
        is_error: r.error.is_some(),
        undo: None,
    }
}

fn shard_status(ctx: &Ctx, a: &Args<'_>) -> R<ToolResult> {
    let (conv, session, token) = a.auth()?;
    let mut b = open(&ctx.db)?;
    b.verify(conv, session, token)?;
    let other = session.other();
    let stats = b.stats(Some(conv))?;
    let of = |s: Session| stats.iter().find(|x| x.session == s.as_str());
    let p = of(other);
    let me = of(session);
    let last = b.last_response_at(conv, other)?;
    let last_age = last
        .as_deref()
        .and_then(|t| autopoll_bridge::clock::parse(t).ok())
        .map(|t| {
            autopoll_bridge::clock::seconds_between(t, autopoll_bridge::clock::now()).max(0.0)
        });
    let depth = p.map_or(0, |p| p.unread);
    let alive = p.is_some_and(|p| p.alive);
    let age = |a: Option<f64>| a.map_or("-".to_string(), |a| format!("{a:.0}s"));
    let text = format!(
        "Shard: session {o}\n\
         Queue depth: {depth} unread message(s) to session {o} ({} claimed by a poller)\n\
         Oldest waiting: {}\n\
         Status: {}\n\
         Heartbeat age: {}\n\
         Alive: {}\n\
         Last answer: {}\n\
         Answered: {}, dead-lettered: {}\n\
         Unread for you: {}",
        p.map_or(0, |p| p.claimed),
        age(p.and_then(|p| p.oldest_unread_age_secs)),
        p.and_then(|p| p.status.clone())
            .unwrap_or_else(|| "unknown (no heartbeat)".into()),
        age(p.and_then(|p| p.heartbeat_age_secs)),
        py_bool(alive),
        match (&last, last_age) {
            (Some(t), Some(a)) => format!("{t} ({a:.0}s ago)"),
            (Some(t), None) => t.clone(),
            _ => "never".into(),
        },
        p.map_or(0, |p| p.answered),
        p.map_or(0, |p| p.dead_lettered),
        me.map_or(0, |m| m.unread),
        o = other.as_str(),
    );
    Ok(ToolResult::ok(
        text,
        json!({
            "partner_session": other.as_str(),
            "queue_depth": depth,
            "claimed": p.map_or(0, |p| p.claimed),
            "answered": p.map_or(0, |p| p.answered),
            "dead_lettered": p.map_or(0, |p| p.dead_lettered),
            "oldest_unread_age_secs": p.and_then(|p| p.oldest_unread_age_secs),
            "status": p.and_then(|p| p.status.clone()),
            "heartbeat_age_secs": p.and_then(|p| p.heartbeat_age_secs),
            "alive": alive,
            "last_answer_at": last,
            "last_answer_age_secs": last_age,
            "unread_for_me": me.map_or(0, |m| m.unread),
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(dir: &tempfile::TempDir) -> Ctx {
        let db = dir.path().join("bridge.db");
        autopoll_bridge::Bridge::open_or_create(&db).unwrap();
        Ctx {
            db,
            hub: Arc::new(crate::waiter::Hub::default()),
        }
    }

    fn run(ctx: &Ctx, name: &str, args: Value) -> ToolResult {
        let no = AtomicBool::new(false);
        call(ctx, name, args.as_object().unwrap(), &no)
    }

    #[test]
    fn create_send_check_round_trip_keeps_the_python_lines() {
        let dir = tempfile::tempdir().unwrap();
        let c = ctx(&dir);
        let r = run(
            &c,
            "create_conversation",
            json!({"my_role": "coordinator", "partner_role": "shard"}),
        );
        assert!(!r.is_error, "{r:?}");
        let s = r.structured.clone().unwrap();
        let (id, ta, tb) = (
            s["conversation_id"].as_str().unwrap(),
            s["token"].as_str().unwrap(),
            s["partner_token"].as_str().unwrap(),
        );
        assert!(r.text.contains(&format!("Conversation ID: {id}\n")));
        assert!(
            r.text
                .contains(&format!("Your token (keep secret): {ta}\n"))
        );
        assert!(
            r.text
                .contains(&format!("Partner token (share securely): {tb}\n"))
        );
        let r = run(
            &c,
            "send_to_partner",
            json!({"conversation_id": id, "session_id": "a", "token": ta,
            "message": "hi, api_key=abc123", "action_type": "proposal", "files_involved": ["x.rs", "y.rs"]}),
        );
        assert!(!r.is_error, "{r:?}");
        assert!(r.text.contains("redacted"), "{}", r.text);
        let r = run(
            &c,
            "check_messages",
            json!({"conversation_id": id, "session_id": "b", "token": tb}),
        );
        assert!(r.text.starts_with("1 new message(s):\n"), "{}", r.text);
        for line in [
            "From: Session a\n",
            "Type: proposal\n",
            "\nMessage:\nhi, ",
            "Files: x.rs, y.rs\n",
        ] {
            assert!(r.text.contains(line), "{line:?} in {}", r.text);
        }
        assert!(r.text.ends_with(&format!("{}\n", "=".repeat(60))));
        let r = run(
            &c,
            "check_messages",
            json!({"conversation_id": id, "session_id": "b", "token": tb}),
        );
        assert_eq!(r.text, "No new messages");
    }

    #[test]
    fn bad_arguments_and_tokens_say_what_to_fix() {
        let dir = tempfile::tempdir().unwrap();
        let c = ctx(&dir);
        let r = run(
            &c,
            "create_conversation",
            json!({"my_role": "ab", "partner_role": "shard"}),
        );
        assert!(
            r.is_error && r.text.contains("`my_role` must be 3 to 100 characters"),
            "{r:?}"
        );
        let r = run(&c, "create_conversation", json!({"my_role": "coord"}));
        assert!(
            r.is_error && r.text.contains("`partner_role` is required"),
            "{r:?}"
        );
        let s = run(
            &c,
            "create_conversation",
            json!({"my_role": "coord", "partner_role": "shard"}),
        )
        .structured
        .unwrap();
        let id = s["conversation_id"].as_str().unwrap();
        let ta = s["token"].as_str().unwrap();
        let tb = s["partner_token"].as_str().unwrap();
        let r = run(
            &c,
            "check_messages",
            json!({"conversation_id": "conv_x", "session_id": "a", "token": ta}),
        );
        assert!(
            r.is_error && r.text.contains("`conversation_id` must be"),
            "{r:?}"
        );
        let r = run(
            &c,
            "check_messages",
            json!({"conversation_id": id, "session_id": "c", "token": ta}),
        );
        assert!(
            r.is_error && r.text.contains("`session_id` must be"),
            "{r:?}"
        );
        let r = run(
            &c,
            "check_messages",
            json!({"conversation_id": id, "session_id": "a", "token": "short"}),
        );
        assert!(
            r.is_error && r.text.contains("exactly 64 characters"),
            "{r:?}"
        );
        let r = run(
            &c,
            "check_messages",
            json!({"conversation_id": id, "session_id": "a", "token": tb}),
        );
        assert!(
            r.is_error && r.text.starts_with("Authentication failed: "),
            "{r:?}"
        );
        let r = run(
            &c,
            "send_to_partner",
            json!({"conversation_id": id, "session_id": "a", "token": ta,
            "message": "x".repeat(50_001)}),
        );
        assert!(r.is_error && r.text.contains("at most 50000"), "{r:?}");
        let r = run(
            &c,
            "send_to_partner",
            json!({"conversation_id": id, "session_id": "a", "token": ta,
            "message": "x", "action_type": "execute"}),
        );
        assert!(
            r.is_error && r.text.contains("`action_type` must be one of"),
            "{r:?}"
        );
        let r = run(
            &c,
            "send_to_partner",
            json!({"conversation_id": id, "session_id": "a", "token": ta,
            "message": "x", "files_involved": vec!["f"; 21]}),
        );
        assert!(r.is_error && r.text.contains("at most 20"), "{r:?}");
        let r = run(
            &c,
            "update_my_status",
            json!({"conversation_id": id, "session_id": "a", "token": ta,
            "status": "sleeping"}),
        );
        assert!(
            r.is_error && r.text.contains("`status` must be one of"),
            "{r:?}"
        );
        let r = run(
            &c,
            "ask_shard",
            json!({"conversation_id": id, "session_id": "a", "token": ta,
            "question": "q", "timeout_secs": -1}),
        );
        assert!(
            r.is_error && r.text.contains("`timeout_secs` must be"),
            "{r:?}"
        );
    }

    #[test]
    fn ask_times_out_with_the_query_id_and_leaves_the_query_queued() {
        let dir = tempfile::tempdir().unwrap();
        let c = ctx(&dir);
        let s = run(
            &c,
            "create_conversation",
            json!({"my_role": "coord", "partner_role": "shard"}),
        )
        .structured
        .unwrap();
        let (id, ta, tb) = (
            s["conversation_id"].as_str().unwrap(),
            s["token"].as_str().unwrap(),
            s["partner_token"].as_str().unwrap(),
        );
        let r = run(
            &c,
            "ask_shard",
            json!({"conversation_id": id, "session_id": "a", "token": ta,
            "question": "where?", "timeout_secs": 0.05}),
        );
        assert!(r.is_error, "{r:?}");
        let qid = r
            .text
            .split("query_id ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap();
        assert!(qid.starts_with("q-"), "{}", r.text);
        let q = run(
            &c,
            "check_messages",
            json!({"conversation_id": id, "session_id": "b", "token": tb}),
        );
        assert!(
            q.text.contains(&format!("\"query_id\":\"{qid}\"")),
            "{}",
            q.text
        );
    }
}
