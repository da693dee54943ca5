//! The memory-shard convention on top of messages: a coordinator sends a
//! `{"type":"query","query_id":..,"question":..}` object, the shard answers
//! with a `{"type":"response",...}` object carrying the same `query_id`.
//!
//! Fields of the Python shards are kept and never renamed; autopoll adds its
//! own (`error`, `context_version`, `attempts`) beside them.

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
            Incoming::BadQuery { query_id, reason } => f
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
    /// The coordinator's `query_id`, or `msg-<row id>` for plain text.
    pub query_id: String,
    /// The question text.
    pub question: String,
    /// True when the message was plain text rather than a query object.
    pub plain_text: bool,
}

impl std::fmt::Debug for Query {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Query")
            .field("query_id", &self.query_id)
            .field("question_len", &self.question.len())
            .field("plain_text", &self.plain_text)
            .finish()
    }
}

/// The query id used for a message that carries none.
pub fn fallback_query_id(message_id: i64) -> String {
    format!("msg-{message_id}")
}

/// Decide what a message asks.
pub fn classify(msg: &Message) -> Incoming {
    let obj = match serde_json::from_str::<Value>(msg.message.trim()) {
        Ok(Value::Object(obj)) => obj,
        // Plain text (or a bare JSON scalar) is a question as it stands.
        _ => {
            return Incoming::Query(Query {
                query_id: fallback_query_id(msg.id),
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
    let query_id = match obj.get("query_id") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => fallback_query_id(msg.id),
    };
    match obj.get("question").and_then(Value::as_str) {
        Some(q) if !q.trim().is_empty() => Incoming::Query(Query {
            query_id,
            question: q.to_string(),
            plain_text: false,
        }),
        _ => Incoming::BadQuery {
            query_id,
            reason: "the query has no `question` text".into(),
        },
    }
}

/// The query id a message will be answered under (for dead letters).
pub fn query_id_of(msg: &Message) -> String {
    match classify(msg) {
        Incoming::Query(q) => q.query_id,
        Incoming::BadQuery { query_id, .. } => query_id,
        Incoming::Other { .. } => fallback_query_id(msg.id),
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
            extra: Map::new(),
        }
    }

    /// Parse a message text as a response; `None` if it is not one.
    pub fn parse(text: &str) -> Option<Response> {
        serde_json::from_str::<Response>(text)
            .ok()
            .filter(|r| r.kind == "response")
    }

    /// The message text.
    pub fn to_text(&self) -> String {
        // Serialising a struct of strings, numbers and a JSON map cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
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
}
