//! The `jsonl` wire protocol: one JSON request per line in, one JSON
//! response per line out (docs/BACKENDS.md has the shapes). The `spawn`
//! backend reads the same response object.

use serde_json::{Map, Value, json};

use super::super::citations;
use super::wire::{self, Event, Question, Raw, Wire};

/// A `jsonl` instance's protocol (stateless).
#[derive(Debug, Default)]
pub struct Jsonl;

impl Wire for Jsonl {
    fn request(&mut self, q: &Question<'_>) -> Vec<u8> {
        wire::line(&json!({
            "id": q.id,
            "question": q.question,
            "prompt": q.prompt,
            "context_files": q.files,
            "context_version": q.version,
        }))
    }

    fn event(&mut self, id: u64, line: &[u8]) -> Event {
        match wire::object(line) {
            Ok(obj) => response(id, &obj).unwrap_or(Event::Progress),
            Err(sample) => Event::Garbage(sample),
        }
    }
}

/// A response object for question `id` (`None`: not an answer to it, such
/// as a progress line or an older question's answer).
pub fn response(id: u64, obj: &Map<String, Value>) -> Option<Event> {
    let same = match obj.get("id") {
        None | Some(Value::Null) => true,
        Some(v) => v.as_u64() == Some(id) || v.as_str() == Some(&id.to_string()),
    };
    if !same || !(obj.contains_key("answer") || obj.contains_key("error")) {
        return None;
    }
    if let Some(e) = obj.get("error").filter(|e| !e.is_null()) {
        return Some(Event::Failed(
            e.as_str().map_or_else(|| e.to_string(), str::to_string),
        ));
    }
    let answer = obj
        .get("answer")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let mut sources = wire::str_list(obj.get("sources"));
    if sources.is_empty() {
        sources = citations::extract(&answer);
    }
    Some(Event::Done(Raw {
        answer,
        sources,
        meta: None,
        cost_usd: obj.get("cost_usd").and_then(Value::as_f64),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_request_and_responses() {
        let files = ["A.md".to_string()];
        let q = Question {
            id: 7,
            question: "why?",
            prompt: "PROMPT",
            files: &files,
            version: "v1",
        };
        let line = Jsonl.request(&q);
        let v: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(
            v,
            json!({"id": 7, "question": "why?", "prompt": "PROMPT", "context_files": ["A.md"], "context_version": "v1"})
        );
        assert_eq!(*line.last().unwrap(), b'\n');
        let mut w = Jsonl;
        let done = w.event(
            7,
            br#"{"id":7,"answer":"see A.md:1-2","sources":["A.md:1-2"]}"#,
        );
        assert!(matches!(done, Event::Done(r) if r.sources == vec!["A.md:1-2"]));
        // Sources found in the text when the list is missing.
        assert!(
            matches!(w.event(7, br#"{"id":7,"answer":"see A.md:3-4"}"#), Event::Done(r) if r.sources == vec!["A.md:3-4"])
        );
        assert_eq!(
            w.event(7, br#"{"id":7,"error":"boom"}"#),
            Event::Failed("boom".into())
        );
        assert_eq!(w.event(7, br#"{"id":6,"answer":"old"}"#), Event::Progress);
        assert_eq!(w.event(7, br#"{"type":"progress"}"#), Event::Progress);
        assert!(matches!(w.event(7, b"not json"), Event::Garbage(_)));
    }
}
