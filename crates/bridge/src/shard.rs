//! The memory-shard convention on top of messages: a coordinator sends a
//! `{"type":"query","query_id":..,"question":..}` object, the shard answers
//! with a `{"type":"response",...}` object carrying the same `query_id`.
//!
//! Fields of the Python shards are kept and never renamed; autopoll adds its
//! own (`error`, `context_version`, `attempts`, `repeat`) beside them.
//!
//! Messages are parsed as Python writes JSON ([`crate::pyjson`]): lone
//! surrogate escapes, raw NULs and `NaN` do not turn a query into plain
//! text. A `query_id` that Rust cannot hold exactly (a lone surrogate) is
//! kept as its escaped text ([`Query::query_id_raw`]) and written back as
//! such, so the asker's id matches. A `query_id` that is a number is
//! answered under its decimal string (`42` → `"42"`); `null`, an empty
//! string or none at all under `msg-<row id>`; an object, array or boolean
//! gets an error response under `msg-<row id>`.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::Message;
use crate::error::Result;

/// What a message addressed to a shard asks of it.
#[derive(Clone, PartialEq)]
pub enum Incoming {
    /// A question to answer (a query object, or plain text).
    Query(Query),
    /// A query object that cannot be answered as it stands (no question);
    /// it gets an error response.
    BadQuery {
        /// The query id to answer under.
        query_id: String,
        /// The query id's exact JSON text when `query_id` lost something
        /// (see [`Query::query_id_raw`]).
        query_id_raw: Option<String>,
        /// What is wrong, for the error response.
        reason: String,
    },
    /// A JSON message of another type (info, response, ...): not a question.
    Other {
        /// Its `type` field, or `(none)`.
        kind: String,
    },
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Incoming::Query(q) => q.fmt(f),
            Incoming::BadQuery {
                query_id, reason, ..
            } => f
                .debug_struct("BadQuery")
                .field("query_id", query_id)
                .field("reason", reason)
                .finish(),
            Incoming::Other { kind } => f.debug_struct("Other").field("kind", kind).finish(),
        }
    }
}

/// A question and the id to answer it under.
#[derive(Clone, PartialEq)]
pub struct Query {
    /// The coordinator's `query_id`, or `msg-<row id>` for plain text (with
    /// U+FFFD for a lone surrogate; for logs and display).
    pub query_id: String,
    /// The exact JSON string body of the `query_id` (Python's escaping,
    /// e.g. `q-\udce9`), when `query_id` could not hold it exactly (a lone
    /// surrogate). Responses carry this text, so the asker's id matches.
    pub query_id_raw: Option<String>,
    /// The key repeats are recognised by: the id as Python's `json.dumps`
    /// escapes it (canonical, exact). `None` for `msg-<row id>` ids, which
    /// never repeat.
    pub repeat_key: Option<String>,
    /// The question text.
    pub question: String,
    /// True when the message was plain text rather than a query object.
    pub plain_text: bool,
}

impl std::fmt::Debug for Query {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Query")
            .field("query_id", &self.query_id)
            .field("query_id_raw", &self.query_id_raw)
            .field("question_len", &self.question.len())
            .field("plain_text", &self.plain_text)
            .finish()
    }
}

/// The query id used for a message that carries none.
pub fn fallback_query_id(message_id: i64) -> String {
    format!("msg-{message_id}")
}

/// Parse a message text leniently (as Python writes JSON) into a JSON value.
pub fn parse_lenient(text: &str) -> Option<Value> {
    serde_json::from_str(&crate::pyjson::sanitize(text)).ok()
}

/// The query id of a query object: `(display, raw, repeat_key)`, or the
/// reason it cannot be one. `Ok(None)` when it has none (answered under
/// `msg-<row id>`).
type Id = (String, Option<String>, Option<String>);

fn query_id_in(text: &str, obj: &Map<String, Value>) -> std::result::Result<Option<Id>, String> {
    use crate::pyjson;
    match obj.get("query_id") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => {
            let units = pyjson::top_level_string(text, "query_id")
                .and_then(pyjson::decode_units)
                .unwrap_or_else(|| s.encode_utf16().collect());
            let key = pyjson::python_escape(&units);
            let raw = pyjson::has_lone_surrogate(&units).then(|| key.clone());
            Ok(Some((s.clone(), raw, Some(key))))
        }
        Some(Value::Number(n)) => {
            let id = n.to_string();
            Ok(Some((id.clone(), None, Some(id))))
        }
        Some(other) => {
            let kind = match other {
                Value::Object(_) => "an object",
                Value::Array(_) => "an array",
                _ => "a boolean",
            };
            Err(format!(
                "the query's `query_id` is {kind}; it must be a string (a number is answered under its decimal string)"
            ))
        }
    }
}

/// Decide what a message asks.
pub fn classify(msg: &Message) -> Incoming {
    let text = msg.message.trim();
    let obj = match parse_lenient(text) {
        Some(Value::Object(obj)) => obj,
        // Plain text (or a bare JSON scalar) is a question as it stands.
        _ => {
            return Incoming::Query(Query {
                query_id: fallback_query_id(msg.id),
                query_id_raw: None,
                repeat_key: None,
                question: msg.message.clone(),
                plain_text: true,
            });
        }
    };
    let kind = obj.get("type").and_then(Value::as_str).unwrap_or("(none)");
    if kind != "query" {
        return Incoming::Other {
            kind: kind.to_string(),
        };
    }
    let (query_id, query_id_raw, repeat_key) = match query_id_in(text, &obj) {
        Ok(Some(id)) => id,
        Ok(None) => (fallback_query_id(msg.id), None, None),
        Err(reason) => {
            return Incoming::BadQuery {
                query_id: fallback_query_id(msg.id),
                query_id_raw: None,
                reason,
            };
        }
    };
    match obj.get("question").and_then(Value::as_str) {
        Some(q) if !q.trim().is_empty() => Incoming::Query(Query {
            query_id,
            query_id_raw,
            repeat_key,
            question: q.to_string(),
            plain_text: false,
        }),
        _ => Incoming::BadQuery {
            query_id,
            query_id_raw,
            reason: "the query has no `question` text".into(),
        },
    }
}

/// The query id a message will be answered under (for dead letters).
pub fn query_id_of(msg: &Message) -> String {
    reply_id_of(msg).0
}

/// The query id a message will be answered under, with its exact JSON text
/// when the id lost something ([`Query::query_id_raw`]).
pub fn reply_id_of(msg: &Message) -> (String, Option<String>) {
    match classify(msg) {
        Incoming::Query(q) => (q.query_id, q.query_id_raw),
        Incoming::BadQuery {
            query_id,
            query_id_raw,
            ..
        } => (query_id, query_id_raw),
        Incoming::Other { .. } => (fallback_query_id(msg.id), None),
    }
}

/// A new query id: `q-` and 12 hex digits.
pub fn new_query_id() -> Result<String> {
    Ok(format!("q-{}", crate::token::random_hex(6)?))
}

/// The message text of a query object.
pub fn query_text(query_id: &str, question: &str) -> String {
    serde_json::json!({ "type": "query", "query_id": query_id, "question": question }).to_string()
}

/// A shard's answer, as stored in the response message's text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// Always `"response"`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The question's `query_id`.
    pub query_id: String,
    /// The answer text (empty when `error` is set).
    pub answer: String,
    /// Cited context ranges, `FILE:START-END` or `FILE:LINE`.
    #[serde(default)]
    pub sources: Vec<String>,
    /// Which shard answered.
    #[serde(default)]
    pub shard_id: String,
    /// What produced the answer (`builtin`, `claude`, ...).
    #[serde(default)]
    pub llm_type: String,
    /// Seconds from pickup to answer.
    #[serde(default)]
    pub response_time_sec: f64,
    /// autopoll: why no answer could be given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// autopoll: content hash or version of the context answered from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_version: Option<String>,
    /// autopoll: how many times the question was attempted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// autopoll: `true` when this is a stored answer sent again, because
    /// the query_id had already been answered in this conversation (the
    /// engine was not asked).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub repeat: bool,
    /// Any other fields, kept as they came.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Response {
    /// An error response: no answer, `error` set.
    pub fn failure(query_id: &str, shard_id: &str, error: &str, attempts: u32) -> Response {
        Response {
            kind: "response".into(),
            query_id: query_id.into(),
            answer: String::new(),
            sources: Vec::new(),
            shard_id: shard_id.into(),
            llm_type: "autopoll".into(),
            response_time_sec: 0.0,
            error: Some(error.into()),
            context_version: None,
            attempts: Some(attempts),
            repeat: false,
            extra: Map::new(),
        }
    }

    /// Parse a message text as a response; `None` if it is not one. Read
    /// leniently, as Python writes JSON (a lone-surrogate `query_id` comes
    /// back with U+FFFD in it).
    ///
    /// Other shards on the bridge write looser shapes: a field that is
    /// `null` or of another type (`"sources": null`, `"answer": null` with
    /// an `error`, `"response_time_sec": "0.4"`) is read as its default (or
    /// its value as text) rather than making the whole response unreadable;
    /// only `"type": "response"` and a string `query_id` are required.
    pub fn parse(text: &str) -> Option<Response> {
        let text = crate::pyjson::sanitize(text);
        if let Ok(r) = serde_json::from_str::<Response>(&text) {
            return (r.kind == "response").then_some(r);
        }
        let Value::Object(mut m) = serde_json::from_str::<Value>(&text).ok()? else {
            return None;
        };
        if m.get("type").and_then(Value::as_str) != Some("response") {
            return None;
        }
        let query_id = m.remove("query_id")?.as_str()?.to_string();
        let mut text_of = |k: &str| -> Option<String> {
            match m.remove(k)? {
                Value::Null => None,
                Value::String(s) => Some(s),
                other => Some(other.to_string()),
            }
        };
        let answer = text_of("answer").unwrap_or_default();
        let shard_id = text_of("shard_id").unwrap_or_default();
        let llm_type = text_of("llm_type").unwrap_or_default();
        let error = text_of("error");
        let context_version = text_of("context_version");
        let response_time_sec = match m.remove("response_time_sec") {
            Some(Value::Number(n)) => n.as_f64().unwrap_or(0.0),
            Some(Value::String(s)) => s.trim().parse().unwrap_or(0.0),
            _ => 0.0,
        };
        let sources = match m.remove("sources") {
            Some(Value::Array(a)) => a
                .into_iter()
                .filter_map(|v| match v {
                    Value::String(s) => Some(s),
                    Value::Null => None,
                    other => Some(other.to_string()),
                })
                .collect(),
            Some(Value::String(s)) => vec![s],
            _ => Vec::new(),
        };
        let attempts = m
            .remove("attempts")
            .and_then(|v| v.as_u64())
            .and_then(|n| u32::try_from(n).ok());
        let repeat = m
            .remove("repeat")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        m.remove("type");
        Some(Response {
            kind: "response".into(),
            query_id,
            answer,
            sources,
            shard_id,
            llm_type,
            response_time_sec,
            error,
            context_version,
            attempts,
            repeat,
            extra: m,
        })
    }

    /// The message text.
    pub fn to_text(&self) -> String {
        // Serialising a struct of strings, numbers and a JSON map cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The message text, with `query_id` written as `raw` (a JSON string
    /// body, [`Query::query_id_raw`]) when given, so an id Rust strings
    /// cannot hold goes back exactly as the asker wrote it.
    pub fn to_text_raw_id(&self, raw: Option<&str>) -> String {
        let text = self.to_text();
        match raw {
            None => text,
            Some(raw) => {
                // `type` comes first and is "response", so the first
                // `"query_id":` is the field itself.
                let ours = format!(
                    "\"query_id\":{}",
                    serde_json::to_string(&self.query_id).unwrap_or_default()
                );
                text.replacen(&ours, &format!("\"query_id\":\"{raw}\""), 1)
            }
        }
    }
}

/// The text of a repeat: an earlier response's text with `"repeat":true`
/// added (the rest, the query_id's exact escaping included, unchanged).
/// `None` when `earlier` is not a JSON object's text.
pub fn repeat_text(earlier: &str) -> Option<String> {
    let body = earlier.trim_end().strip_suffix('}')?.trim_end();
    if !earlier.trim_start().starts_with('{') {
        return None;
    }
    let sep = if body.ends_with('{') { "" } else { "," };
    Some(format!("{body}{sep}\"repeat\":true}}"))
}

/// Metadata of every response message.
pub fn response_metadata() -> Value {
    serde_json::json!({ "action_type": "response" })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: i64, text: &str) -> Message {
        Message {
            id,
            conversation_id: "conv_0000000000000000".into(),
            from_session: "a".into(),
            to_session: "b".into(),
            message: text.into(),
            metadata: serde_json::json!({}),
            timestamp: "2025-01-01T00:00:00".into(),
            read: false,
            unreadable: None,
        }
    }

    #[test]
    fn classifies_queries_text_and_other_types() {
        let q = classify(&msg(
            1,
            r#"{"type":"query","query_id":"q-42","question":"What?"}"#,
        ));
        assert_eq!(
            q,
            Incoming::Query(Query {
                query_id: "q-42".into(),
                query_id_raw: None,
                repeat_key: Some("q-42".into()),
                question: "What?".into(),
                plain_text: false
            })
        );
        let t = classify(&msg(7, "what did we decide?"));
        assert!(
            matches!(t, Incoming::Query(Query { ref query_id, plain_text: true, .. }) if query_id == "msg-7")
        );
        assert!(matches!(
            classify(&msg(8, "42")),
            Incoming::Query(Query {
                plain_text: true,
                ..
            })
        ));
        assert_eq!(
            classify(&msg(2, r#"{"type":"info","text":"fyi"}"#)),
            Incoming::Other {
                kind: "info".into()
            }
        );
        assert!(matches!(
            classify(&msg(3, r#"{"type":"query","query_id":"q-1"}"#)),
            Incoming::BadQuery { ref query_id, .. } if query_id == "q-1"
        ));
        // A query with no id is answered under msg-<id>.
        assert_eq!(
            query_id_of(&msg(9, r#"{"type":"query","question":"x"}"#)),
            "msg-9"
        );
    }

    /// What `json.dumps` writes for ids and questions holding lone
    /// surrogates (file names from `os.fsdecode`) and NULs.
    #[test]
    fn python_json_keeps_its_query_id() {
        let q = |text: &str| match classify(&msg(5, text)) {
            Incoming::Query(q) => q,
            other => panic!("{text}: {other:?}"),
        };
        let a = q(
            r#"{"type": "query", "query_id": "q-caf\udce9", "question": "what is in caf\udce9.md?"}"#,
        );
        assert!(!a.plain_text);
        assert_eq!(a.query_id, "q-caf\u{fffd}");
        assert_eq!(a.query_id_raw.as_deref(), Some(r"q-caf\udce9"));
        assert_eq!(a.repeat_key.as_deref(), Some(r"q-caf\udce9"));
        assert_eq!(a.question, "what is in caf\u{fffd}.md?");
        // Only the id decides the raw form; the question may lose its surrogate.
        let b = q(r#"{"type": "query", "query_id": "q-1", "question": "caf\udce9?"}"#);
        assert_eq!((b.query_id.as_str(), b.query_id_raw), ("q-1", None));
        // Two ids differing only in their surrogate are different ids.
        let c = q(r#"{"type": "query", "query_id": "q-caf\udcea", "question": "x"}"#);
        assert_ne!(a.repeat_key, c.repeat_key);
        // A NUL, escaped (json.dumps) or raw (hand-made JSON).
        let d = q(r#"{"type": "query", "query_id": "q-\u0000", "question": "a\u0000b"}"#);
        assert_eq!((d.query_id.as_str(), d.question.as_str()), ("q-\0", "a\0b"));
        let e = q("{\"type\": \"query\", \"query_id\": \"q-\0\", \"question\": \"a\0b\"}");
        assert_eq!((e.query_id.as_str(), e.question.as_str()), ("q-\0", "a\0b"));
        assert_eq!(d.repeat_key, e.repeat_key);
        assert_eq!(d.query_id_raw, None);
        // Numbers are answered under their decimal string, the same id as the string.
        let n = q(r#"{"type": "query", "query_id": 42, "question": "x"}"#);
        assert_eq!(n.query_id, "42");
        assert_eq!(
            n.repeat_key,
            q(r#"{"type":"query","query_id":"42","question":"x"}"#).repeat_key
        );
        // null, "" and none: msg-<id>, never a repeat.
        for t in [
            r#"{"type":"query","query_id":null,"question":"x"}"#,
            r#"{"type":"query","query_id":"","question":"x"}"#,
        ] {
            let f = q(t);
            assert_eq!((f.query_id.as_str(), f.repeat_key), ("msg-5", None));
        }
    }

    #[test]
    fn a_query_id_that_is_not_a_string_gets_an_error_under_msg_id() {
        for (t, kind) in [
            (
                r#"{"type":"query","query_id":{"id":1},"question":"x"}"#,
                "an object",
            ),
            (
                r#"{"type":"query","query_id":[1],"question":"x"}"#,
                "an array",
            ),
            (
                r#"{"type":"query","query_id":true,"question":"x"}"#,
                "a boolean",
            ),
        ] {
            match classify(&msg(9, t)) {
                Incoming::BadQuery {
                    query_id, reason, ..
                } => {
                    assert_eq!(query_id, "msg-9");
                    assert!(
                        reason.contains(kind) && reason.contains("query_id"),
                        "{reason}"
                    );
                }
                other => panic!("{t}: {other:?}"),
            }
        }
    }

    #[test]
    fn raw_ids_are_written_back_exactly_and_repeats_add_a_flag() {
        let mut r = Response::failure("q-caf\u{fffd}", "s", "", 1);
        r.error = None;
        let text = r.to_text_raw_id(Some(r"q-caf\udce9"));
        assert!(text.contains(r#""query_id":"q-caf\udce9""#), "{text}");
        // Read back leniently; the rest is intact.
        assert_eq!(Response::parse(&text).unwrap().shard_id, "s");
        assert_eq!(r.to_text_raw_id(None), r.to_text());
        let rep = repeat_text(&text).unwrap();
        let v: Value = parse_lenient(&rep).unwrap();
        assert_eq!(v["repeat"], true);
        assert!(rep.contains(r#""query_id":"q-caf\udce9""#));
        assert!(Response::parse(&rep).unwrap().repeat);
        assert!(!Response::parse(&text).unwrap().repeat);
        assert_eq!(repeat_text("{}").as_deref(), Some(r#"{"repeat":true}"#));
        assert!(repeat_text("plain").is_none());
    }

    #[test]
    fn response_round_trip_keeps_python_fields_and_extras() {
        let text = r#"{"type":"response","query_id":"q-42","answer":"A","sources":["F.md:1-3"],"shard_id":"s","llm_type":"claude","response_time_sec":0.42,"x":1}"#;
        let r = Response::parse(text).unwrap();
        assert_eq!(r.sources, vec!["F.md:1-3"]);
        assert_eq!(r.extra["x"], 1);
        let back: Value = serde_json::from_str(&r.to_text()).unwrap();
        for k in [
            "type",
            "query_id",
            "answer",
            "sources",
            "shard_id",
            "llm_type",
            "response_time_sec",
            "x",
        ] {
            assert!(back.get(k).is_some(), "{k} lost");
        }
        assert!(back.get("error").is_none());
        assert!(Response::parse(r#"{"type":"query","query_id":"q"}"#).is_none());
        assert!(Response::parse("plain").is_none());
    }

    #[test]
    fn failure_has_error_and_every_python_field() {
        let v: Value =
            serde_json::from_str(&Response::failure("q-1", "s1", "boom", 3).to_text()).unwrap();
        assert_eq!(v["type"], "response");
        assert_eq!(v["error"], "boom");
        assert_eq!(v["attempts"], 3);
        assert_eq!(v["answer"], "");
        assert!(v["sources"].as_array().unwrap().is_empty());
    }

    #[test]
    fn query_text_round_trips() {
        let id = new_query_id().unwrap();
        assert!(id.starts_with("q-") && id.len() == 14);
        let t = query_text(&id, "why \"quotes\"?");
        assert!(
            matches!(classify(&msg(1, &t)), Incoming::Query(q) if q.query_id == id && q.question == "why \"quotes\"?")
        );
    }

    #[test]
    fn a_response_with_null_or_odd_fields_is_still_read() {
        for (text, answer, sources, error) in [
            (
                r#"{"type":"response","query_id":"q-1","answer":"a","llm_type":null}"#,
                "a",
                0,
                None,
            ),
            (
                r#"{"type":"response","query_id":"q-1","answer":"a","sources":null}"#,
                "a",
                0,
                None,
            ),
            (
                r#"{"type":"response","query_id":"q-1","answer":null,"error":"engine down"}"#,
                "",
                0,
                Some("engine down"),
            ),
            (
                r#"{"type":"response","query_id":"q-1","answer":"a","response_time_sec":"0.4","sources":["F:1-2",null]}"#,
                "a",
                1,
                None,
            ),
        ] {
            let r = Response::parse(text).unwrap_or_else(|| panic!("unread: {text}"));
            assert_eq!(r.query_id, "q-1");
            assert_eq!(r.answer, answer, "{text}");
            assert_eq!(r.sources.len(), sources, "{text}");
            assert_eq!(r.error.as_deref(), error, "{text}");
        }
        assert!(Response::parse(r#"{"type":"query","query_id":"q-1","question":"x"}"#).is_none());
        assert!(Response::parse(r#"{"type":"response","query_id":7}"#).is_none());
        assert!(Response::parse("not json").is_none());
    }
}
