//! Frames: one enum per direction, encoded as one line of JSON each.
//!
//! Every frame is a JSON object with a `type` field, serialised on one line
//! and ended by `\n` (JSON escapes newlines inside strings, so a frame never
//! contains a raw newline). A frame longer than the cap (default 1 MiB,
//! newline included) is refused. Decoding tells apart invalid UTF-8, invalid
//! JSON and an unknown frame type, and the hello's version is checked
//! separately, so a version mismatch is never reported as garbage.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Client → server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// The only frame on the shared request FIFO: names the client's private FIFO pair.
    Hello(Hello),
    /// Ask the engine a question.
    Ask(AskRequest),
    /// Ask for the server's statistics.
    Stats(StatsRequest),
    /// Echo a payload back (for checking the transport end to end).
    Echo(Echo),
    /// The client is done; the server closes the session.
    Bye,
}

/// First frame of a session, on the shared FIFO; at most `PIPE_BUF` bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// The client's protocol version.
    pub version: u32,
    /// A name for logs (`autopoll-ask`, `poller`, `ask.sh`).
    #[serde(default)]
    pub client: String,
    /// Absolute path of the FIFO the client writes requests to.
    pub request_fifo: PathBuf,
    /// Absolute path of the FIFO the client reads replies from.
    pub reply_fifo: PathBuf,
}

/// A question.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct AskRequest {
    /// Chosen by the client, echoed in the reply.
    pub id: u64,
    /// The question text.
    pub question: String,
    /// The client's own deadline; the server answers (or errs) within
    /// `min(timeout_ms, --request-timeout)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

impl std::fmt::Debug for AskRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AskRequest")
            .field("id", &self.id)
            .field("question_len", &self.question.len())
            .field("timeout_ms", &self.timeout_ms)
            .finish()
    }
}

/// Ask for statistics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsRequest {
    /// Echoed in the reply.
    pub id: u64,
}

/// A payload sent and returned unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Echo {
    /// Echoed in the reply.
    pub id: u64,
    /// Any text.
    pub payload: String,
}

/// Server → client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    /// The handshake succeeded; requests may follow.
    Welcome(Welcome),
    /// An answer to an [`AskRequest`].
    Answer(Answer),
    /// Statistics.
    Stats(Stats),
    /// An [`Echo`] returned.
    Echo(Echo),
    /// A request (or the session) failed; see `code`.
    Error(ErrorReply),
}

impl Reply {
    /// The request id this reply answers, if any.
    pub fn id(&self) -> Option<u64> {
        match self {
            Reply::Welcome(_) => None,
            Reply::Answer(a) => Some(a.id),
            Reply::Stats(s) => Some(s.id),
            Reply::Echo(e) => Some(e.id),
            Reply::Error(e) => e.id,
        }
    }
}

/// Handshake accepted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// The server's protocol version.
    pub version: u32,
    /// The server's name.
    pub server: String,
    /// The server's pid.
    pub pid: u32,
    /// The engine answering (`builtin`, ...).
    pub engine: String,
    /// The largest frame the server accepts.
    pub max_frame_bytes: usize,
    /// The server closes a session that sends no frame for this long
    /// (`--idle-timeout`); a client should connect afresh before reusing a
    /// connection idle for about half of it. Absent from older servers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_ms: Option<u64>,
}

/// An answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    /// The request's id.
    pub id: u64,
    /// The answer text.
    pub answer: String,
    /// Cited ranges, `FILE:START-END`.
    pub sources: Vec<String>,
    /// False when nothing relevant was found (the answer says so).
    pub found: bool,
    /// Content hash of the context answered from.
    pub context_version: String,
    /// The engine that answered.
    pub engine: String,
    /// Time the server spent, milliseconds.
    pub elapsed_ms: f64,
    /// Citations that did not check out against the context (external engines).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub invalid_sources: Vec<String>,
    /// Facts the backend reported (claude: session_id, duration_ms, total_cost_usd, usage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<serde_json::Value>,
}

/// Server statistics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// The request's id.
    pub id: u64,
    /// Server name.
    pub server: String,
    /// Server pid.
    pub pid: u32,
    /// autopoll version.
    pub version: String,
    /// Protocol version.
    pub protocol: u32,
    /// Seconds since start.
    pub uptime_secs: f64,
    /// Requests answered (successfully or not) since start.
    pub requests: u64,
    /// Requests that got an error reply.
    pub errors: u64,
    /// Requests being worked on now.
    pub in_flight: u64,
    /// Open client sessions.
    pub sessions: u64,
    /// Median latency over the recent window, milliseconds.
    pub latency_p50_ms: f64,
    /// 99th percentile latency over the recent window, milliseconds.
    pub latency_p99_ms: f64,
    /// Worker threads.
    pub workers: usize,
    /// The engine.
    pub engine: EngineInfo,
    /// Per engine instance (external backends); empty for the built-in engine.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub instances: Vec<WorkerInfo>,
    /// What the engine's answers cost since start, USD, where the backend
    /// reports cost (the sum over instances, replaced ones included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
}

/// What the engine holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct EngineInfo {
    /// Engine name.
    pub name: String,
    /// Content hash of the context.
    pub context_version: String,
    /// Context files.
    pub files: usize,
    /// Indexed passages.
    pub passages: usize,
    /// Context bytes.
    pub bytes: u64,
    /// When the context was last (re)loaded, UTC.
    pub loaded_at: String,
    /// Reloads done since start.
    pub reloads: u64,
    /// The last reload failure, if the latest attempt failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reload_error: Option<String>,
    /// True when the engine cannot answer (external backend down).
    #[serde(default)]
    pub down: bool,
}

/// One external engine instance (`--backend jsonl|claude|spawn`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct WorkerInfo {
    /// Worker index.
    pub worker: usize,
    /// Child pid, if running.
    pub pid: Option<u32>,
    /// State (`starting`, `idle`, `busy`, `down`).
    pub state: String,
    /// Questions answered.
    pub served: u64,
    /// Restarts.
    pub restarts: u64,
    /// Last error.
    pub last_error: Option<String>,
    /// What this worker's answers cost so far, USD (each answer's own cost,
    /// summed over every process the worker ran), where the backend reports it.
    pub cost_usd: Option<f64>,
}

/// A failure, as data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// The request's id, when the failure belongs to one.
    pub id: Option<u64>,
    /// What kind of failure.
    pub code: ErrorCode,
    /// A sentence a person can act on.
    pub message: String,
}

/// Kinds of failure a server reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame was not valid UTF-8 JSON of a known type.
    BadFrame,
    /// The frame exceeded the size cap.
    TooLarge,
    /// The hello's protocol version is not the server's.
    VersionMismatch,
    /// The request did not finish within its timeout.
    Timeout,
    /// The engine failed to answer.
    Engine,
    /// The server is stopping and takes no new requests.
    ShuttingDown,
    /// The request is well-formed but not acceptable (empty question, frame out of place).
    Invalid,
    /// Too many requests queued; try again.
    Overloaded,
}

/// Why bytes could not be decoded as a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The frame exceeded the cap.
    #[error("frame of more than {limit} bytes (the cap)")]
    TooLarge {
        /// The cap.
        limit: usize,
    },
    /// Not UTF-8.
    #[error("frame is not valid UTF-8 (at byte {at})")]
    Utf8 {
        /// Offset of the first bad byte.
        at: usize,
    },
    /// Not a JSON object of a known frame type.
    #[error("frame is not a valid message: {0}")]
    Decode(String),
    /// The peer closed in the middle of a frame.
    #[error("connection closed in the middle of a frame ({0} bytes without a newline)")]
    Truncated(usize),
}

/// Encode a frame as one JSON line, `\n` included.
pub fn encode<T: Serialize>(frame: &T) -> Vec<u8> {
    // Frames are plain data (strings, numbers, maps): serialising cannot fail.
    let mut v = serde_json::to_vec(frame).unwrap_or_else(|_| b"{}".to_vec());
    v.push(b'\n');
    v
}

/// Encode, refusing a frame over `max` bytes.
pub fn encode_capped<T: Serialize>(frame: &T, max: usize) -> Result<Vec<u8>, FrameError> {
    let v = encode(frame);
    if v.len() > max {
        return Err(FrameError::TooLarge { limit: max });
    }
    Ok(v)
}

/// Decode one line (without its newline).
pub fn decode<T: for<'de> Deserialize<'de>>(line: &[u8]) -> Result<T, FrameError> {
    let text = std::str::from_utf8(line).map_err(|e| FrameError::Utf8 {
        at: e.valid_up_to(),
    })?;
    serde_json::from_str(text).map_err(|e| FrameError::Decode(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_are_one_line() {
        let frames = vec![
            Request::Hello(Hello {
                version: 1,
                client: "t".into(),
                request_fifo: "/r".into(),
                reply_fifo: "/w".into(),
            }),
            Request::Ask(AskRequest {
                id: 7,
                question: "line one\nline two \"quoted\" \u{1F600}".into(),
                timeout_ms: Some(5),
            }),
            Request::Stats(StatsRequest { id: 1 }),
            Request::Echo(Echo {
                id: 2,
                payload: "\0nul".into(),
            }),
            Request::Bye,
        ];
        for f in frames {
            let bytes = encode(&f);
            assert_eq!(bytes.iter().filter(|&&b| b == b'\n').count(), 1);
            assert_eq!(*bytes.last().unwrap(), b'\n');
            let back: Request = decode(&bytes[..bytes.len() - 1]).unwrap();
            assert_eq!(back, f);
        }
    }

    #[test]
    fn wire_shape_is_tagged_snake_case() {
        let v: serde_json::Value = serde_json::from_slice(&encode(&Request::Ask(AskRequest {
            id: 3,
            question: "q".into(),
            timeout_ms: None,
        })))
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type": "ask", "id": 3, "question": "q"})
        );
        let e = Reply::Error(ErrorReply {
            id: None,
            code: ErrorCode::VersionMismatch,
            message: "m".into(),
        });
        let v: serde_json::Value = serde_json::from_slice(&encode(&e)).unwrap();
        assert_eq!(v["code"], "version_mismatch");
        assert_eq!(e.id(), None);
    }

    #[test]
    fn decode_errors_are_told_apart() {
        assert!(matches!(
            decode::<Request>(b"\xff\xfe"),
            Err(FrameError::Utf8 { at: 0 })
        ));
        assert!(matches!(
            decode::<Request>(b"{\"type\":\"ask\""),
            Err(FrameError::Decode(_))
        ));
        assert!(matches!(
            decode::<Request>(b"{\"type\":\"dance\"}"),
            Err(FrameError::Decode(_))
        ));
        assert!(matches!(decode::<Request>(b""), Err(FrameError::Decode(_))));
    }

    #[test]
    fn capped_encoding_refuses_big_frames() {
        let big = Request::Echo(Echo {
            id: 1,
            payload: "x".repeat(100),
        });
        assert!(matches!(
            encode_capped(&big, 50),
            Err(FrameError::TooLarge { limit: 50 })
        ));
        assert!(encode_capped(&big, 200).is_ok());
    }

    #[test]
    fn unknown_fields_are_ignored_for_forward_compatibility() {
        let r: Request = decode(br#"{"type":"stats","id":4,"future":true}"#).unwrap();
        assert_eq!(r, Request::Stats(StatsRequest { id: 4 }));
    }
}
