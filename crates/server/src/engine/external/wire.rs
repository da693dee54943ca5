//! What every external wire protocol shares: the [`Kind`] of backend, the
//! [`Raw`] answer before citations are checked, the [`Event`]s a line of
//! output turns into, and the [`Wire`] trait each protocol implements in its
//! own module (`jsonl`, `claude`, `spawn`). The supervisor speaks only this
//! trait, so a new backend is one new file.

use serde_json::Value;

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
    /// Backend facts to pass on (claude: session_id, cost_usd, usage, ...).
    pub meta: Option<Value>,
    /// Cost of this answer alone, USD, where reported.
    pub cost_usd: Option<f64>,
}

/// One line from the instance, understood.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The instance answered its start-up handshake: it can take questions.
    Ready,
    /// Still working (any event that is not the end of this question).
    /// Resets the watchdog.
    Progress,
    /// The backend is retrying a failed API call on its own. Counted; does
    /// not reset the watchdog (a dead API must not look like a live model).
    Retry(String),
    /// The backend retried past its budget: give up on this question now,
    /// interrupt the turn (see [`Wire::interrupt`]) and keep the instance.
    GiveUp(String),
    /// The answer.
    Done(Raw),
    /// The backend reports failure; the instance is kept.
    Failed(String),
    /// Not the protocol: logged, and counted as a sign of life.
    Garbage(String),
}

/// One question as the wire sees it.
#[derive(Debug, Clone, Copy)]
pub struct Question<'a> {
    /// The request id (unique per engine).
    pub id: u64,
    /// The question as asked.
    pub question: &'a str,
    /// The full prompt (template filled in), for protocols that send it.
    pub prompt: &'a str,
    /// Context file paths as cited.
    pub files: &'a [String],
    /// The context version.
    pub version: &'a str,
}

/// One running instance's protocol state. A fresh one is made for every
/// process the supervisor starts.
pub trait Wire: Send {
    /// A line to write right after start whose answer ([`Event::Ready`])
    /// says the instance is up. `None`: ready as soon as it runs.
    fn hello(&mut self) -> Option<Vec<u8>> {
        None
    }
    /// The request line for a question (newline included).
    fn request(&mut self, q: &Question<'_>) -> Vec<u8>;
    /// Understand one line of output while question `id` is open.
    fn event(&mut self, id: u64, line: &[u8]) -> Event;
    /// A line that ends the current turn early (after [`Event::GiveUp`]).
    /// `None`: the protocol cannot, and the instance is replaced instead.
    fn interrupt(&mut self) -> Option<Vec<u8>> {
        None
    }
    /// What the instance spent since the last call, failed and interrupted
    /// turns included, where the protocol tracks it (`None`: use the
    /// answer's own `cost_usd`).
    fn take_cost(&mut self) -> Option<f64> {
        None
    }
    /// Input tokens the instance's history holds now, where known (for
    /// `--max-session-tokens`).
    fn history_tokens(&self) -> Option<u64> {
        None
    }
}

/// The strings of a JSON array (non-strings skipped).
pub fn str_list(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// A line parsed as a JSON object, or a sample of it for
/// [`Event::Garbage`].
pub fn object(line: &[u8]) -> Result<serde_json::Map<String, Value>, String> {
    let text = String::from_utf8_lossy(line);
    match serde_json::from_str::<Value>(text.trim()) {
        Ok(Value::Object(obj)) => Ok(obj),
        _ => Err(text.chars().take(200).collect()),
    }
}

/// A JSON value plus a newline, as one protocol line.
pub fn line(v: &Value) -> Vec<u8> {
    let mut l = v.to_string().into_bytes();
    l.push(b'\n');
    l
}
