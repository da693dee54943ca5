//! # autopoll-mcp
//!
//! `autopoll mcp`: an MCP server over stdio for agent sessions on the
//! bridge file. It offers the Python bridge server's five tools with the
//! same names, arguments, limits and rows (so it is a drop-in on the same
//! file with the same tokens), minus its command-execution tools, plus
//! `ask_shard` (send a query and wait for its cited answer in one call) and
//! `shard_status`.
//!
//! Threads (all named, all blocking; no async runtime):
//! - `mcp` (the caller of [`run`]): the dispatcher. It reads lines from
//!   one channel and answers `initialize`, `ping`, `tools/list`
//!   and errors itself, so they are answered while tool calls run; it hands
//!   each `tools/call` to a worker and applies `notifications/cancelled`.
//! - `mcp-stdin`: reads stdin one line at a time ([`jsonrpc::read_line`],
//!   capped) and sends the lines to `mcp`; its end of input ends the server.
//! - `mcp-stdout`: the only writer of stdout, one JSON message a line,
//!   flushed each time. Logs go to stderr only.
//! - `tool-N`: one per `tools/call` in flight (at most
//!   [`McpConfig::max_in_flight`]), each with its own bridge connection.
//! - `bridge-watch`: inotify on the bridge's folder ([`waiter`]); wakes the
//!   `ask_shard` calls that wait for their answer.
#![deny(missing_docs)]

pub mod jsonrpc;
pub mod schema;
pub mod tools;
pub mod waiter;

use std::collections::HashMap;
use std::io::{BufReader, Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use serde_json::{Map, Value, json};

use crate::jsonrpc::{Id, Incoming, Line};
use crate::tools::Ctx;

/// The server's name in `initialize`.
pub const SERVER_NAME: &str = "autopoll";

/// What `autopoll mcp` is told on its command line.
#[derive(Debug, Clone)]
pub struct McpConfig {
    /// The bridge file (created with its tables when missing, as the
    /// Python server does).
    pub db: PathBuf,
    /// Most `tools/call`s running at once; more get an error result.
    pub max_in_flight: usize,
}

impl McpConfig {
    /// A config for `db` with the default limits.
    pub fn new(db: impl Into<PathBuf>) -> McpConfig {
        McpConfig {
            db: db.into(),
            max_in_flight: 64,
        }
    }
}

/// Why the server could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum McpError {
    /// The bridge file could not be opened or created.
    #[error("{0}")]
    Bridge(#[from] autopoll_bridge::Error),
    /// A thread or a pipe could not be set up.
    #[error("{0}")]
    Io(String),
}

/// How long, once stdin has closed, running tool calls get to finish
/// (waiting `ask_shard`s are cancelled at once; a bridge lock wait is
/// bounded by the 10 s busy timeout).
const DRAIN: Duration = Duration::from_secs(15);

/// Replies queued for stdout at most; past that a sender waits.
const OUT_QUEUE: usize = 256;

/// How long a reply may wait for room while the client reads nothing, before
/// the server gives up on the client and stops.
const STALLED: Duration = Duration::from_secs(10);

/// After the drain, how long the replies still queued get to be written.
const WRITER_DRAIN: Duration = Duration::from_secs(5);

/// Whether the protocol version spoken on this connection has
/// `outputSchema` and `structuredContent` (2025-06-18 and later).
fn has_structured(version: &str) -> bool {
    version >= "2025-06-18"
}

/// The calls running, by request id: (stop waiting, send no reply).
type InFlight = HashMap<String, (Arc<AtomicBool>, Arc<AtomicBool>)>;

struct Server {
    ctx: Ctx,
    cfg: McpConfig,
    out: Sender<Value>,
    /// Told (for the drain at exit) each time a call has ended.
    done_tx: Sender<()>,
    /// Calls running, by request id: (stop waiting, send no reply). A call
    /// leaves it before its reply is sent, so a client that sends its next
    /// call on reading a reply finds the slot (and the id) free.
    in_flight: Arc<Mutex<InFlight>>,
    version: &'static str,
    next_worker: u64,
}

/// Serve MCP on `input`/`output` until `input` ends. Returns once every
/// reply has been written.
pub fn run(
    cfg: &McpConfig,
    input: impl Read + Send + 'static,
    output: impl Write + Send + 'static,
) -> Result<(), McpError> {
    let target = autopoll_bridge::Target::from_path(&cfg.db);
    let bridge = target.open(autopoll_bridge::BridgeOptions {
        create: true,
        ..autopoll_bridge::BridgeOptions::default()
    })?;
    drop(bridge);
    let watcher = waiter::Watcher::start(&target)
        .map_err(|e| McpError::Io(format!("cannot start the bridge watch: {e}")))?;
    // Bounded: a client that stops reading its replies holds us up (and
    // then stops us, past STALLED) instead of growing our memory.
    let (out_tx, out_rx) = crossbeam_channel::bounded::<Value>(OUT_QUEUE);
    let (writer_done_tx, writer_done) = crossbeam_channel::bounded::<()>(1);
    let writer = std::thread::Builder::new()
        .name("mcp-stdout".into())
        .spawn(move || {
            write_loop(output, out_rx);
            let _ = writer_done_tx.send(());
        })
        .map_err(|e| McpError::Io(format!("cannot start the writer thread: {e}")))?;
    let (line_tx, line_rx) = crossbeam_channel::bounded::<Line>(64);
    std::thread::Builder::new()
        .name("mcp-stdin".into())
        .spawn(move || read_loop(input, line_tx))
        .map_err(|e| McpError::Io(format!("cannot start the reader thread: {e}")))?;
    let (done_tx, done_rx) = crossbeam_channel::unbounded::<()>();
    log::info!(
        "event=mcp_started db={} tools={}",
        target.shown(),
        schema::TOOL_NAMES.len()
    );
    let mut s = Server {
        ctx: Ctx {
            db: cfg.db.clone(),
            hub: watcher.hub.clone(),
        },
        cfg: cfg.clone(),
        out: out_tx,
        done_tx,
        in_flight: Arc::new(Mutex::new(HashMap::new())),
        version: schema::LATEST,
        next_worker: 0,
    };
    s.serve(&line_rx);
    // Input ended: stop waiting calls (they reply "cancelled"), let the
    // others finish and reply (bounded).
    for (stop, _) in s.calls().values() {
        stop.store(true, Ordering::SeqCst);
    }
    watcher.hub.poke();
    let deadline = Instant::now() + DRAIN;
    while !s.calls().is_empty() {
        if done_rx.recv_deadline(deadline).is_err() {
            log::warn!(
                "event=mcp_exit_with_calls_running count={}",
                s.calls().len()
            );
            break;
        }
    }
    drop(s);
    // The writer ends once every reply is written and every worker is gone;
    // a client that does not read them is not waited for past WRITER_DRAIN
    // (the process exits, and the writer with it).
    match writer_done.recv_timeout(WRITER_DRAIN) {
        Ok(()) | Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
            let _ = writer.join();
        }
        Err(crossbeam_channel::RecvTimeoutError::Timeout) => log::warn!(
            "event=mcp_exit_unwritten: the client read no replies for {} s; exiting without them",
            WRITER_DRAIN.as_secs()
        ),
    }
    drop(watcher);
    log::info!("event=mcp_stopped");
    Ok(())
}

fn read_loop(input: impl Read, lines: Sender<Line>) {
    let mut r = BufReader::with_capacity(64 * 1024, input);
    loop {
        let line = match jsonrpc::read_line(&mut r) {
            Ok(l) => l,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::warn!("event=stdin_error: {e}");
                Line::Eof
            }
        };
        let eof = matches!(line, Line::Eof);
        if lines.send(line).is_err() || eof {
            return;
        }
    }
}

fn write_loop(output: impl Write, rx: Receiver<Value>) {
    let mut w = std::io::BufWriter::new(output);
    for v in rx {
        // serde_json escapes newlines inside strings: one message, one line.
        let mut line = v.to_string();
        line.push('\n');
        if let Err(e) = w.write_all(line.as_bytes()).and_then(|()| w.flush()) {
            log::warn!("event=stdout_closed: {e}; stopping");
            return;
        }
    }
}

impl Server {
    fn send(&self, v: Value) -> bool {
        match self.out.send_timeout(v, STALLED) {
            Ok(()) => true,
            Err(crossbeam_channel::SendTimeoutError::Timeout(_)) => {
                log::error!(
                    "event=client_stalled: the client read none of our replies for {} s; stopping",
                    STALLED.as_secs()
                );
                false
            }
            Err(crossbeam_channel::SendTimeoutError::Disconnected(_)) => false,
        }
    }

    fn calls(&self) -> std::sync::MutexGuard<'_, InFlight> {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Handle lines until the input ends or the output is gone.
    fn serve(&mut self, lines: &Receiver<Line>) {
        // The reader thread ends (and the channel closes) at end of input.
        while let Ok(line) = lines.recv() {
            let keep = match line {
                Line::Eof => false,
                Line::Text(t) => self.handle(jsonrpc::classify(&t)),
                Line::TooLong(n) => self.send(jsonrpc::error(
                    &Value::Null,
                    jsonrpc::PARSE_ERROR,
                    &format!(
                        "parse error: a line of {n} bytes is over the {} byte limit",
                        jsonrpc::MAX_LINE
                    ),
                )),
                Line::NotUtf8 => self.send(jsonrpc::error(
                    &Value::Null,
                    jsonrpc::PARSE_ERROR,
                    "parse error: the line is not UTF-8",
                )),
            };
            if !keep {
                return;
            }
        }
    }

    /// Handle one message; false when the output is gone.
    fn handle(&mut self, m: Incoming) -> bool {
        match m {
            Incoming::Empty | Incoming::Response => true,
            Incoming::Invalid(reply) => {
                log::warn!(
                    "event=bad_message code={}",
                    reply["error"]["code"].as_i64().unwrap_or(0)
                );
                self.send(reply)
            }
            Incoming::Notification { method, params } => {
                self.notification(&method, &params);
                true
            }
            Incoming::Request { id, method, params } => self.request(id, &method, params),
        }
    }

    fn notification(&mut self, method: &str, params: &Value) {
        match method {
            "notifications/cancelled" => {
                let key = params.get("requestId").map(Value::to_string);
                let calls = self.calls();
                match key.and_then(|k| calls.get(&k)) {
                    Some((stop, silent)) => {
                        log::info!("event=call_cancelled request_id={}", params["requestId"]);
                        silent.store(true, Ordering::SeqCst);
                        stop.store(true, Ordering::SeqCst);
                        self.ctx.hub.poke();
                    }
                    None => log::debug!("cancellation of a request not in flight"),
                }
            }
            "notifications/initialized" => log::debug!("event=client_initialized"),
            other => log::debug!("ignored notification {other}"),
        }
    }

    fn request(&mut self, id: Id, method: &str, params: Value) -> bool {
        match method {
            "initialize" => {
                let Some(requested) = params.get("protocolVersion").and_then(Value::as_str) else {
                    return self.send(jsonrpc::error(
                        &id,
                        jsonrpc::INVALID_PARAMS,
                        "initialize needs params.protocolVersion (a string such as \"2025-06-18\")",
                    ));
                };
                self.version = schema::negotiate(Some(requested));
                log::info!(
                    "event=initialize requested={requested} answered={} client={}",
                    self.version,
                    params["clientInfo"]["name"].as_str().unwrap_or("?")
                );
                self.send(jsonrpc::result(
                    &id,
                    json!({
                        "protocolVersion": self.version,
                        "capabilities": { "tools": { "listChanged": false } },
                        "serverInfo": {
                            "name": SERVER_NAME,
                            "title": "autopoll memory shard bridge",
                            "version": env!("CARGO_PKG_VERSION"),
                        },
                        "instructions": "Ask your memory shard with ask_shard: one call returns its cited \
                                         answer. The bridge tools (create_conversation, send_to_partner, \
                                         check_messages, update_my_status, check_partner_status) are those \
                                         of the Python bridge server, on the same file with the same tokens.",
                    }),
                ))
            }
            "ping" => self.send(jsonrpc::result(&id, json!({}))),
            "tools/list" => {
                let mut list = schema::tools();
                if !has_structured(self.version) {
                    for t in &mut list {
                        if let Some(o) = t.as_object_mut() {
                            o.remove("outputSchema");
                            o.remove("title");
                        }
                    }
                }
                self.send(jsonrpc::result(&id, json!({ "tools": list })))
            }
            "tools/call" => self.call(id, params),
            _ => self.send(jsonrpc::error(
                &id,
                jsonrpc::METHOD_NOT_FOUND,
                &format!(
                    "method not found: {method:?}; this server offers initialize, ping, tools/list, tools/call"
                ),
            )),
        }
    }

    fn call(&mut self, id: Id, params: Value) -> bool {
        let Some(name) = params.get("name").and_then(Value::as_str) else {
            return self.send(jsonrpc::error(
                &id,
                jsonrpc::INVALID_PARAMS,
                "tools/call needs params.name, the tool's name (see tools/list)",
            ));
        };
        let Some(tool) = schema::TOOL_NAMES.iter().find(|t| **t == name).copied() else {
            return self.send(jsonrpc::error(
                &id,
                jsonrpc::INVALID_PARAMS,
                &format!(
                    "Unknown tool: {name:?}; the tools are {}",
                    schema::TOOL_NAMES.join(", ")
                ),
            ));
        };
        let key = id.to_string();
        if self.calls().contains_key(&key) {
            return self.send(jsonrpc::error(
                &id,
                jsonrpc::INVALID_REQUEST,
                &format!(
                    "request id {key} is already in use by a call still running; use a new id"
                ),
            ));
        }
        let args = match params.get("arguments") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(m)) => m.clone(),
            Some(other) => {
                let r = tools::ToolResult {
                    text: format!(
                        "Error: the arguments must be a JSON object of the tool's parameters, not {other}"
                    ),
                    is_error: true,
                    ..tools::ToolResult::default()
                };
                return self.send(jsonrpc::result(&id, r.to_value()));
            }
        };
        let running = self.calls().len();
        if running >= self.cfg.max_in_flight {
            let r = tools::ToolResult {
                text: format!(
                    "Error: {} tool calls are already running, the most this server runs at once; \
                     wait for one to finish and call again",
                    running
                ),
                is_error: true,
                ..tools::ToolResult::default()
            };
            return self.send(jsonrpc::result(&id, r.to_value()));
        }
        let cancel = Arc::new(AtomicBool::new(false));
        let silent = Arc::new(AtomicBool::new(false));
        self.calls()
            .insert(key.clone(), (cancel.clone(), silent.clone()));
        let (ctx, out, done) = (self.ctx.clone(), self.out.clone(), self.done_tx.clone());
        let calls = self.in_flight.clone();
        let key_again = key.clone();
        let id_again = id.clone();
        let structured = has_structured(self.version);
        self.next_worker += 1;
        let spawned = std::thread::Builder::new()
            .name(format!("tool-{}", self.next_worker))
            .spawn(move || {
                let started = Instant::now();
                // A bug in a tool must not leave its call without a reply.
                let mut r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    tools::call(&ctx, tool, &args, &cancel)
                }))
                .unwrap_or_else(|_| tools::ToolResult {
                    text: format!("Error: {tool} failed inside autopoll mcp (a bug; its log on stderr says where)"),
                    is_error: true,
                    ..tools::ToolResult::default()
                });
                log::debug!(
                    "event=tool_done tool={tool} error={} ms={:.1}",
                    r.is_error,
                    started.elapsed().as_secs_f64() * 1000.0
                );
                if !structured {
                    r.structured = None;
                }
                calls.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
                // A cancelled call gets no reply (the client has moved on);
                // what it marked read is made unread again, so nothing is
                // lost (check_messages returns it).
                if silent.load(Ordering::SeqCst) {
                    if let Some(u) = &r.undo {
                        tools::undo(&ctx, u);
                    }
                } else {
                    let _ = out.send_timeout(jsonrpc::result(&id, r.to_value()), STALLED);
                }
                let _ = done.send(());
            });
        if let Err(e) = spawned {
            self.calls().remove(&key_again);
            return self.send(jsonrpc::error(
                &id_again,
                jsonrpc::INTERNAL_ERROR,
                &format!("cannot start a thread for the call: {e}; try again"),
            ));
        }
        true
    }
}
