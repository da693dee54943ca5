//! What the external backends read and write: one request line per
//! question, and the event lines that come back, turned into
//! [`Event`]s. The shapes are documented in docs/BACKENDS.md.

use serde_json::{Value, json};

use super::citations;

/// Which protocol the instance speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One JSON request per line in, one JSON response per line out.
    Jsonl,
    /// Claude Code's stream-json mode.
    Claude,
    /// One process per question (the old way).
    Spawn,
}

impl Kind {
    /// The engine name.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Jsonl => "jsonl",
            Kind::Claude => "claude",
            Kind::Spawn => "spawn",
        }
    }
}

/// An answer as the backend gave it, before citations are checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Raw {
    /// The answer text.
    pub answer: String,
    /// Cited ranges, as given (or as found in the text).
    pub sources: Vec<String>,
    /// Backend facts to pass on (claude: session_id, duration_ms, cost, usage).
    pub meta: Option<Value>,
    /// Cost of this answer, USD, where reported.
    pub cost_usd: Option<f64>,
}

/// One line from the instance, understood.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Still working (any event that is not the end of this question).
    Progress,
    /// The answer.
    Done(Raw),
    /// The backend reports failure.
    Failed(String),
    /// Not the protocol: logged, and counted as a sign of life.
    Garbage(String),
}

/// The request line for `question` (newline included).
pub fn request(
    kind: Kind,
    id: u64,
    question: &str,
    prompt: &str,
    files: &[String],
    version: &str,
) -> Vec<u8> {
    let v = match kind {
        Kind::Jsonl => json!({
            "id": id,
            "question": question,
            "prompt": prompt,
            "context_files": files,
            "context_version": version,
        }),
        Kind::Claude => json!({
            "type": "user",
            "message": { "role": "user", "content": prompt },
        }),
        // Spawn writes the bare prompt text; see `spawn_input`.
        Kind::Spawn => Value::String(prompt.to_string()),
    };
    let mut line = v.to_string().into_bytes();
    line.push(b'\n');
    line
}

fn str_list(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Understand one line of output for question `id`.
pub fn event(kind: Kind, id: u64, line: &[u8]) -> Event {
    let text = String::from_utf8_lossy(line);
    let Ok(Value::Object(obj)) = serde_json::from_str::<Value>(text.trim()) else {
        return Event::Garbage(text.chars().take(200).collect());
    };
    match kind {
        Kind::Jsonl | Kind::Spawn => {
            let same = match obj.get("id") {
                None | Some(Value::Null) => true,
                Some(v) => v.as_u64() == Some(id) || v.as_str() == Some(&id.to_string()),
            };
            let is_answer = obj.contains_key("answer") || obj.contains_key("error");
            if !same || !is_answer {
                return Event::Progress;
            }
            if let Some(e) = obj.get("error").filter(|e| !e.is_null()) {
                return Event::Failed(e.as_str().map_or_else(|| e.to_string(), str::to_string));
            }
            let answer = obj
                .get("answer")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            let mut sources = str_list(obj.get("sources"));
            if sources.is_empty() {
                sources = citations::extract(&answer);
            }
            Event::Done(Raw {
                answer,
                sources,
                meta: None,
                cost_usd: obj.get("cost_usd").and_then(Value::as_f64),
            })
        }
        Kind::Claude => {
            if obj.get("type").and_then(Value::as_str) != Some("result") {
                return Event::Progress; // system, assistant, user, stream events, anything new
            }
            let subtype = obj.get("subtype").and_then(Value::as_str).unwrap_or("");
            let is_error = obj
                .get("is_error")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let result = obj
                .get("result")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            if is_error || subtype != "success" {
                let detail = if result.is_empty() {
                    obj.get("errors").map(Value::to_string).unwrap_or_default()
                } else {
                    result
                };
                return Event::Failed(format!(
                    "claude reported {subtype:?} (is_error={is_error}): {detail}"
                ));
            }
            let meta = json!({
                "session_id": obj.get("session_id"),
                "duration_ms": obj.get("duration_ms"),
                "total_cost_usd": obj.get("total_cost_usd"),
                "usage": obj.get("usage"),
            });
            Event::Done(Raw {
                sources: citations::extract(&result),
                answer: result,
                meta: Some(meta),
                cost_usd: obj.get("total_cost_usd").and_then(Value::as_f64),
            })
        }
    }
}

/// What a `spawn` process printed, all of it: a jsonl response object if it
/// printed one, else the text itself is the answer.
pub fn spawn_output(stdout: &[u8]) -> Event {
    let text = String::from_utf8_lossy(stdout);
    let trimmed = text.trim();
    if trimmed.starts_with('{')
        && let e @ (Event::Done(_) | Event::Failed(_)) = event(Kind::Spawn, 0, trimmed.as_bytes())
    {
        return e;
    }
    Event::Done(Raw {
        answer: trimmed.to_string(),
        sources: citations::extract(trimmed),
        meta: None,
        cost_usd: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_request_and_responses() {
        let line = request(Kind::Jsonl, 7, "why?", "PROMPT", &["A.md".into()], "v1");
        let v: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(
            v,
            json!({"id": 7, "question": "why?", "prompt": "PROMPT", "context_files": ["A.md"], "context_version": "v1"})
        );
        assert_eq!(*line.last().unwrap(), b'\n');
        let done = event(
            Kind::Jsonl,
            7,
            br#"{"id":7,"answer":"see A.md:1-2","sources":["A.md:1-2"]}"#,
        );
        assert!(matches!(done, Event::Done(r) if r.sources == vec!["A.md:1-2"]));
        // Sources found in the text when the list is missing.
        assert!(
            matches!(event(Kind::Jsonl, 7, br#"{"id":7,"answer":"see A.md:3-4"}"#), Event::Done(r) if r.sources == vec!["A.md:3-4"])
        );
        assert_eq!(
            event(Kind::Jsonl, 7, br#"{"id":7,"error":"boom"}"#),
            Event::Failed("boom".into())
        );
        assert_eq!(
            event(Kind::Jsonl, 7, br#"{"id":6,"answer":"old"}"#),
            Event::Progress
        );
        assert_eq!(
            event(Kind::Jsonl, 7, br#"{"type":"progress"}"#),
            Event::Progress
        );
        assert!(matches!(
            event(Kind::Jsonl, 7, b"not json"),
            Event::Garbage(_)
        ));
    }

    #[test]
    fn claude_stream_json_events() {
        let line = request(Kind::Claude, 1, "q", "the prompt", &[], "v");
        let v: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(
            v,
            json!({"type": "user", "message": {"role": "user", "content": "the prompt"}})
        );
        for e in [
            r#"{"type":"system","subtype":"init","session_id":"s1"}"#,
            r#"{"type":"assistant","message":{"content":[{"type":"text","text":"thinking"}]}}"#,
            r#"{"type":"rate_limit_event","x":1}"#,
        ] {
            assert_eq!(event(Kind::Claude, 1, e.as_bytes()), Event::Progress);
        }
        let ok = br#"{"type":"result","subtype":"success","is_error":false,"result":"It is 64 (NOTES.md:3-4).","session_id":"s1","duration_ms":1200,"total_cost_usd":0.0123,"usage":{"input_tokens":10}}"#;
        match event(Kind::Claude, 1, ok) {
            Event::Done(r) => {
                assert_eq!(r.answer, "It is 64 (NOTES.md:3-4).");
                assert_eq!(r.sources, vec!["NOTES.md:3-4"]);
                assert_eq!(r.cost_usd, Some(0.0123));
                let m = r.meta.unwrap();
                assert_eq!(
                    (m["session_id"].as_str(), m["duration_ms"].as_u64()),
                    (Some("s1"), Some(1200))
                );
            }
            other => panic!("{other:?}"),
        }
        let err = br#"{"type":"result","subtype":"error_max_turns","is_error":true,"result":""}"#;
        assert!(
            matches!(event(Kind::Claude, 1, err), Event::Failed(m) if m.contains("error_max_turns"))
        );
    }

    #[test]
    fn spawn_output_is_text_or_a_response_object() {
        assert!(
            matches!(spawn_output(b"plain answer NOTES.md:2\n"), Event::Done(r) if r.answer == "plain answer NOTES.md:2" && r.sources == vec!["NOTES.md:2"])
        );
        assert!(
            matches!(spawn_output(br#"{"answer":"x","sources":["A.md:1"]}"#), Event::Done(r) if r.sources == vec!["A.md:1"])
        );
        assert!(matches!(
            spawn_output(br#"{"error":"nope"}"#),
            Event::Failed(_)
        ));
    }
}
