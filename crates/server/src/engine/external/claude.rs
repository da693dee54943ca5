//! The `claude` wire protocol: Claude Code in stream-json mode
//! (`claude -p --input-format stream-json --output-format stream-json
//! --verbose`), kept warm, one user message per question.
//!
//! - **Start-up**: the CLI prints nothing until it is spoken to, so the
//!   supervisor sends an `initialize` control request; its
//!   `control_response` is the instance's readiness (no API call is made).
//! - **Per question**: one short user message (the question and the context
//!   version). With autopoll's own command line ([`command`]) the
//!   instructions and the file list are the session's system prompt, given
//!   once; with an explicit command after `--` the whole prompt travels in
//!   each message, as before.
//! - **The answer** is the turn's `result` event. Its `total_cost_usd` is the
//!   session's running total, so a question's cost is the difference from
//!   the previous result; `usage`, `duration_ms` and `num_turns` are per turn.
//! - **API failures**: the CLI retries on its own (`CLAUDE_CODE_MAX_RETRIES`,
//!   set from `--claude-retries`), printing `system`/`api_retry` events.
//!   Those are counted and do not reset the watchdog; a final error result
//!   becomes an `engine` error naming the API status, and past the budget
//!   the turn is interrupted (a control request) so the instance is kept.
//! - **History**: each `assistant` event's usage tells how many input tokens
//!   the session's history holds, for `--max-session-tokens`.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value, json};

use super::super::citations;
use super::wire::{self, Event, Question, Raw, Wire};

/// The tools a shard may use by default: reading only. A shard answers
/// questions from other agents, which must never run commands, write files
/// or reach the network through it.
pub const DEFAULT_TOOLS: &str = "Read,Grep,Glob";
/// The model by default: the small fast one.
pub const DEFAULT_MODEL: &str = "haiku";
/// API retries the CLI may make per call by default (its own default is 10,
/// about three minutes of backoff).
pub const DEFAULT_RETRIES: u32 = 2;
/// Model round trips one question may take (the CLI has no limit of its
/// own in `-p` mode): a model that keeps calling tools ends with an error.
pub const MAX_TURNS: u32 = 20;

/// How autopoll runs Claude Code itself (`--backend claude` with no command
/// after `--`).
#[derive(Debug, Clone)]
pub struct ClaudeOptions {
    /// The `claude` program (searched in `PATH` when it has no `/`).
    pub bin: String,
    /// `--model`.
    pub model: String,
    /// `--tools`.
    pub tools: String,
    /// Recycle an instance whose history holds more input tokens than this.
    pub max_session_tokens: Option<u64>,
}

impl Default for ClaudeOptions {
    fn default() -> Self {
        ClaudeOptions {
            bin: "claude".into(),
            model: DEFAULT_MODEL.into(),
            tools: DEFAULT_TOOLS.into(),
            max_session_tokens: None,
        }
    }
}

/// autopoll's own command line for Claude Code, with the session's system
/// prompt in `system_prompt_file`. Each of `dirs` (the context's folders)
/// is given with `--add-dir`: the CLI lets its tools read only below its
/// working directory and those.
pub fn command(opts: &ClaudeOptions, system_prompt_file: &Path, dirs: &[PathBuf]) -> Vec<String> {
    let mut c: Vec<String> = [
        opts.bin.as_str(),
        "-p",
        "--input-format",
        "stream-json",
        "--output-format",
        "stream-json",
        "--verbose",
        "--model",
        &opts.model,
        "--no-session-persistence",
        "--max-turns",
        &MAX_TURNS.to_string(),
        // No MCP servers from the user's configuration: they could add tools
        // beyond --tools.
        "--strict-mcp-config",
        "--system-prompt-file",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    c.push(system_prompt_file.to_string_lossy().into_owned());
    for d in dirs {
        c.push("--add-dir".into());
        c.push(d.to_string_lossy().into_owned());
    }
    // Last: --tools takes a variable number of values.
    c.push("--tools".into());
    c.push(opts.tools.clone());
    c
}

/// The environment a `claude` instance gets on top of the server's: the
/// retry budget, and no traffic but the API calls.
pub fn environment(retries: u32) -> Vec<(String, String)> {
    let mut env = vec![("CLAUDE_CODE_MAX_RETRIES".to_string(), retries.to_string())];
    for (k, v) in [
        ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1"),
        ("DISABLE_AUTOUPDATER", "1"),
    ] {
        if std::env::var_os(k).is_none() {
            env.push((k.into(), v.into()));
        }
    }
    env
}

/// One Claude Code session's protocol state.
#[derive(Debug)]
pub struct Claude {
    /// The instructions are in the system prompt: send only the question.
    short_messages: bool,
    /// API retries allowed per question before giving up on it.
    retry_budget: u32,
    /// The session's running total cost at the previous result.
    last_total: f64,
    /// Retries seen in the current turn (for `api_retries`), those of the
    /// current API call (the budget is per call, as the CLI's own), and the
    /// last one's description.
    retries: u32,
    call_retries: u32,
    last_retry: Option<String>,
    /// Results still to come from interrupted turns: not this question's.
    stale: u32,
    /// Input tokens of the latest API call (the history's size).
    history: Option<u64>,
    /// Spent since the last `take_cost`: every result's share of the
    /// running total, failed and interrupted turns included.
    unbilled: f64,
    model: Option<String>,
    next_control: u64,
}

impl Claude {
    /// State for a fresh session. `short_messages`: the instructions are in
    /// the system prompt (autopoll's own command line).
    pub fn new(short_messages: bool, retry_budget: u32) -> Claude {
        Claude {
            short_messages,
            retry_budget,
            last_total: 0.0,
            retries: 0,
            call_retries: 0,
            last_retry: None,
            stale: 0,
            history: None,
            unbilled: 0.0,
            model: None,
            next_control: 1,
        }
    }

    fn control(&mut self, subtype: &str) -> Vec<u8> {
        let id = format!("autopoll-{subtype}-{}", self.next_control);
        self.next_control += 1;
        wire::line(&json!({
            "type": "control_request",
            "request_id": id,
            "request": { "subtype": subtype },
        }))
    }

    fn result(&mut self, obj: &Map<String, Value>) -> Event {
        let total = obj.get("total_cost_usd").and_then(Value::as_f64);
        let cost = total.map(|t| {
            let c = if t >= self.last_total {
                t - self.last_total
            } else {
                t
            };
            self.last_total = t;
            self.unbilled += c;
            c
        });
        let retries = std::mem::take(&mut self.retries);
        let call_retries = std::mem::take(&mut self.call_retries);
        let last_retry = self.last_retry.take();
        if self.stale > 0 {
            // The end of a turn we gave up on: nobody waits for it.
            self.stale -= 1;
            return Event::Progress;
        }
        let subtype = obj.get("subtype").and_then(Value::as_str).unwrap_or("");
        let is_error = obj
            .get("is_error")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let text = obj
            .get("result")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if is_error || subtype != "success" {
            return Event::Failed(failure(obj, subtype, &text, call_retries, last_retry));
        }
        let meta = json!({
            "session_id": obj.get("session_id"),
            "model": self.model,
            "cost_usd": cost,
            "total_cost_usd": total,
            "usage": obj.get("usage"),
            "duration_ms": obj.get("duration_ms"),
            "num_turns": obj.get("num_turns"),
            "api_retries": retries,
        });
        Event::Done(Raw {
            sources: citations::extract(&text),
            answer: text,
            meta: Some(meta),
            cost_usd: cost,
        })
    }

    fn retry(&mut self, obj: &Map<String, Value>) -> Event {
        self.retries += 1;
        self.call_retries += 1;
        let status = obj
            .get("error_status")
            .or_else(|| obj.get("status"))
            .and_then(Value::as_u64);
        let kind = obj.get("error").and_then(|e| {
            e.as_str()
                .map(str::to_string)
                .or_else(|| Some(e.to_string()))
        });
        let what = match (status, kind) {
            (Some(s), Some(k)) => format!("API error {s} ({k})"),
            (Some(s), None) => format!("API error {s}"),
            (None, Some(k)) => format!("API error ({k})"),
            (None, None) => "API error".to_string(),
        };
        self.last_retry = Some(what.clone());
        // The CLI numbers the retries of each call; count them ourselves too
        // in case it does not.
        let attempt = obj
            .get("attempt")
            .and_then(Value::as_u64)
            .map_or(self.call_retries, |a| a as u32);
        if attempt > self.retry_budget {
            Event::GiveUp(format!(
                "{what} after {} attempts; the turn was interrupted",
                attempt + 1
            ))
        } else {
            Event::Retry(what)
        }
    }
}

/// Why the session cannot call the API, when the answer to `initialize`
/// shows it has no credentials at all (every question would fail with
/// "Not logged in").
fn no_credentials(init: &Value) -> Option<String> {
    let acct = init.get("response")?.get("account")?;
    let s = |k: &str| acct.get(k).and_then(Value::as_str);
    let none = s("apiProvider") == Some("firstParty")
        && s("tokenSource").is_none_or(|t| t == "none")
        && s("apiKeySource").is_none_or(|k| k == "none");
    none.then(|| {
        "Claude Code has no credentials: set ANTHROPIC_API_KEY (or ANTHROPIC_AUTH_TOKEN) in the server's environment, or log in once with `claude` as the user the server runs as".to_string()
    })
}

/// The message for an error result.
fn failure(
    obj: &Map<String, Value>,
    subtype: &str,
    text: &str,
    retries: u32,
    last_retry: Option<String>,
) -> String {
    let detail = if text.is_empty() {
        obj.get("errors").map(Value::to_string).unwrap_or_default()
    } else {
        text.chars().take(500).collect()
    };
    let attempts = retries + 1;
    let plural = if attempts == 1 { "" } else { "s" };
    match obj.get("api_error_status").and_then(Value::as_u64) {
        Some(status) => {
            let kind = obj
                .get("api_error_type")
                .and_then(Value::as_str)
                .map(str::to_string)
                .or_else(|| error_kind(text))
                .map(|k| format!(" ({k})"))
                .unwrap_or_default();
            format!("API error {status}{kind} after {attempts} attempt{plural}: {detail}")
        }
        None if retries > 0 => format!(
            "{} after {attempts} attempt{plural}: {detail}",
            last_retry.unwrap_or_else(|| "API error".into())
        ),
        None if subtype.is_empty() || subtype == "success" => {
            format!("claude reported an error: {detail}")
        }
        None => format!("claude reported an error ({subtype}): {detail}"),
    }
}

/// The API's error type (`api_error`, `rate_limit_error`, ...) where the
/// result text quotes the error body.
fn error_kind(text: &str) -> Option<String> {
    let at = text.find("\"type\":\"")?;
    let rest = &text[at + 8..];
    let mut kinds = Vec::new();
    let mut s = rest;
    // The body is {"type":"error","error":{"type":"api_error",...}}: the
    // first type that is not "error".
    loop {
        let end = s.find('"')?;
        let k = &s[..end];
        if k != "error" {
            kinds.push(k.to_string());
            break;
        }
        let next = s[end..].find("\"type\":\"")?;
        s = &s[end + next + 8..];
    }
    kinds.pop()
}

impl Wire for Claude {
    fn hello(&mut self) -> Option<Vec<u8>> {
        Some(self.control("initialize"))
    }

    fn request(&mut self, q: &Question<'_>) -> Vec<u8> {
        self.retries = 0;
        self.call_retries = 0;
        self.last_retry = None;
        let content = if self.short_messages {
            format!("{}\n\n(context version {})", q.question, q.version)
        } else {
            q.prompt.to_string()
        };
        wire::line(&json!({
            "type": "user",
            "message": { "role": "user", "content": content },
            "parent_tool_use_id": null,
            "session_id": "",
        }))
    }

    fn event(&mut self, _id: u64, line: &[u8]) -> Event {
        let obj = match wire::object(line) {
            Ok(o) => o,
            Err(sample) => return Event::Garbage(sample),
        };
        let subtype = obj.get("subtype").and_then(Value::as_str);
        match obj.get("type").and_then(Value::as_str) {
            Some("result") => self.result(&obj),
            Some("system") if subtype == Some("api_retry") => self.retry(&obj),
            Some("system") if subtype == Some("init") => {
                self.model = obj.get("model").and_then(Value::as_str).map(String::from);
                Event::Progress
            }
            Some("control_response") => {
                let r = obj.get("response").cloned().unwrap_or_default();
                let for_init = r
                    .get("request_id")
                    .and_then(Value::as_str)
                    .is_some_and(|id| id.starts_with("autopoll-initialize-"));
                match r.get("subtype").and_then(Value::as_str) {
                    Some("success") if for_init => match no_credentials(&r) {
                        Some(why) => Event::Failed(why),
                        None => Event::Ready,
                    },
                    Some("error") if for_init => Event::Failed(format!(
                        "claude refused to start the session: {}",
                        r.get("error").map(Value::to_string).unwrap_or_default()
                    )),
                    _ => Event::Progress,
                }
            }
            Some("assistant") => {
                // The CLI's own stand-in for a failed call carries no usage
                // and ends no retry series.
                let synthetic = obj.contains_key("is_api_error_message")
                    || obj
                        .get("message")
                        .and_then(|m| m.get("model"))
                        .and_then(Value::as_str)
                        == Some("<synthetic>");
                if synthetic {
                    return Event::Progress;
                }
                // A call that answered: the next retries are a new call's.
                self.call_retries = 0;
                if let Some(u) = obj.get("message").and_then(|m| m.get("usage")) {
                    let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
                    self.history = Some(
                        n("input_tokens")
                            + n("cache_read_input_tokens")
                            + n("cache_creation_input_tokens"),
                    );
                }
                Event::Progress
            }
            // user (tool results), stream events, anything new.
            _ => Event::Progress,
        }
    }

    fn interrupt(&mut self) -> Option<Vec<u8>> {
        self.stale += 1;
        Some(self.control("interrupt"))
    }

    fn history_tokens(&self) -> Option<u64> {
        self.history
    }

    fn take_cost(&mut self) -> Option<f64> {
        Some(std::mem::take(&mut self.unbilled))
    }
}

/// A `claude -p --output-format json` result (the `spawn` backend), if
/// `obj` is one.
pub fn one_shot(obj: &Map<String, Value>) -> Option<Event> {
    if obj.get("type").and_then(Value::as_str) != Some("result") {
        return None;
    }
    Some(Claude::new(true, u32::MAX).result(obj))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(c: &mut Claude, line: &str) -> Event {
        c.event(1, line.as_bytes())
    }

    #[test]
    fn short_messages_carry_the_question_and_the_version() {
        let files = ["A.md".to_string()];
        let q = Question {
            id: 1,
            question: "why?",
            prompt: "LONG PROMPT",
            files: &files,
            version: "sha256:ab",
        };
        let v: Value = serde_json::from_slice(&Claude::new(true, 2).request(&q)).unwrap();
        assert_eq!(v["type"], "user");
        assert_eq!(
            v["message"]["content"],
            "why?\n\n(context version sha256:ab)"
        );
        let v: Value = serde_json::from_slice(&Claude::new(false, 2).request(&q)).unwrap();
        assert_eq!(v["message"]["content"], "LONG PROMPT");
    }

    #[test]
    fn readiness_is_the_answer_to_initialize() {
        let mut c = Claude::new(true, 2);
        let hello: Value = serde_json::from_slice(&c.hello().unwrap()).unwrap();
        assert_eq!(hello["request"]["subtype"], "initialize");
        let id = hello["request_id"].as_str().unwrap();
        let resp = json!({"type":"control_response","response":{"subtype":"success","request_id":id,"response":{}}});
        assert_eq!(ev(&mut c, &resp.to_string()), Event::Ready);
        let mut c = Claude::new(true, 2);
        let id =
            serde_json::from_slice::<Value>(&c.hello().unwrap()).unwrap()["request_id"].clone();
        let unauth = json!({"type":"control_response","response":{"subtype":"success","request_id":id,
            "response":{"account":{"tokenSource":"none","apiProvider":"firstParty"}}}});
        assert!(
            matches!(ev(&mut c, &unauth.to_string()), Event::Failed(m) if m.contains("ANTHROPIC_API_KEY"))
        );
        let keyed = json!({"type":"control_response","response":{"subtype":"success","request_id":id,
            "response":{"account":{"tokenSource":"none","apiKeySource":"ANTHROPIC_API_KEY","apiProvider":"firstParty"}}}});
        assert_eq!(ev(&mut c, &keyed.to_string()), Event::Ready);
        let other =
            json!({"type":"control_response","response":{"subtype":"success","request_id":"x"}});
        assert_eq!(ev(&mut c, &other.to_string()), Event::Progress);
    }

    #[test]
    fn cost_per_question_is_the_difference_of_the_running_total() {
        let mut c = Claude::new(true, 2);
        let r = |total: f64| {
            format!(
                r#"{{"type":"result","subtype":"success","is_error":false,"result":"see A.md:1-2","session_id":"s1","duration_ms":5,"num_turns":2,"total_cost_usd":{total},"usage":{{"input_tokens":10}}}}"#
            )
        };
        let mut costs = Vec::new();
        for total in [0.305, 0.505, 0.706] {
            match ev(&mut c, &r(total)) {
                Event::Done(raw) => {
                    assert_eq!(raw.sources, vec!["A.md:1-2"]);
                    let m = raw.meta.unwrap();
                    assert_eq!(m["total_cost_usd"], total);
                    assert_eq!(m["num_turns"], 2);
                    costs.push(raw.cost_usd.unwrap());
                }
                other => panic!("{other:?}"),
            }
        }
        for (got, want) in costs.iter().zip([0.305, 0.2, 0.201]) {
            assert!((got - want).abs() < 1e-9, "{costs:?}");
        }
    }

    #[test]
    fn retries_are_counted_and_an_error_result_names_the_api_status() {
        let mut c = Claude::new(true, 2);
        let retry = r#"{"type":"system","subtype":"api_retry","attempt":1,"max_retries":2,"retry_delay_ms":500,"error_status":500,"error":"server_error"}"#;
        assert!(matches!(ev(&mut c, retry), Event::Retry(m) if m.contains("500")));
        assert!(matches!(ev(&mut c, retry), Event::Retry(_)));
        let err = r#"{"type":"result","subtype":"success","is_error":true,"api_error_status":500,"api_error_type":"api_error","result":"API Error: 500 Internal server error.","total_cost_usd":0}"#;
        match ev(&mut c, err) {
            Event::Failed(m) => {
                assert!(
                    m.starts_with("API error 500 (api_error) after 3 attempts"),
                    "{m}"
                )
            }
            other => panic!("{other:?}"),
        }
        // Past the budget: give up, interrupt, and skip that turn's result.
        let nth = |n: u32| {
            format!(
                r#"{{"type":"system","subtype":"api_retry","attempt":{n},"max_retries":9,"error_status":500,"error":"server_error"}}"#
            )
        };
        for n in 1..=2 {
            assert!(matches!(ev(&mut c, &nth(n)), Event::Retry(_)));
        }
        assert!(matches!(ev(&mut c, &nth(3)), Event::GiveUp(m) if m.contains("after 4 attempts")));
        let int: Value = serde_json::from_slice(&c.interrupt().unwrap()).unwrap();
        assert_eq!(int["request"]["subtype"], "interrupt");
        let ended = r#"{"type":"result","subtype":"error_during_execution","is_error":true,"result":"","total_cost_usd":0}"#;
        assert_eq!(ev(&mut c, ended), Event::Progress);
        let ok = r#"{"type":"result","subtype":"success","is_error":false,"result":"fine","total_cost_usd":0.01}"#;
        assert!(matches!(ev(&mut c, ok), Event::Done(_)));
    }

    #[test]
    fn the_retry_budget_is_per_api_call() {
        let mut c = Claude::new(true, 1);
        let retry = r#"{"type":"system","subtype":"api_retry","attempt":1,"max_retries":1,"error_status":500,"error":"server_error"}"#;
        let answered = r#"{"type":"assistant","message":{"model":"claude-haiku-5-5","usage":{"input_tokens":5}}}"#;
        let synthetic = r#"{"type":"assistant","message":{"model":"<synthetic>","usage":{"input_tokens":0}},"is_api_error_message":true}"#;
        // One retry on the first call, one on the second: within budget.
        assert!(matches!(ev(&mut c, retry), Event::Retry(_)));
        ev(&mut c, answered);
        assert!(matches!(ev(&mut c, retry), Event::Retry(_)));
        // Two on one call (a CLI that ignores its budget): give up.
        let second = r#"{"type":"system","subtype":"api_retry","attempt":2,"max_retries":5,"error_status":500,"error":"server_error"}"#;
        assert!(matches!(ev(&mut c, second), Event::GiveUp(m) if m.contains("after 3 attempts")));
        // A synthetic error message does not start a new series.
        let mut c = Claude::new(true, 2);
        ev(&mut c, retry);
        ev(&mut c, retry);
        ev(&mut c, synthetic);
        let err = r#"{"type":"result","subtype":"success","is_error":true,"api_error_status":500,"api_error_type":"api_error","result":"API Error: 500"}"#;
        assert!(matches!(ev(&mut c, err), Event::Failed(m) if m.contains("after 3 attempts")),);
        assert_eq!(c.history_tokens(), None);
    }

    #[test]
    fn history_size_comes_from_the_latest_assistant_usage() {
        let mut c = Claude::new(true, 2);
        assert_eq!(c.history_tokens(), None);
        ev(
            &mut c,
            r#"{"type":"assistant","message":{"usage":{"input_tokens":100,"cache_read_input_tokens":900,"cache_creation_input_tokens":24}}}"#,
        );
        assert_eq!(c.history_tokens(), Some(1024));
    }

    #[test]
    fn one_shot_json_results() {
        let obj = |s: &str| match serde_json::from_str::<Value>(s).unwrap() {
            Value::Object(o) => o,
            _ => unreachable!(),
        };
        assert!(one_shot(&obj(r#"{"answer":"x"}"#)).is_none());
        match one_shot(&obj(
            r#"{"type":"result","subtype":"success","is_error":false,"result":"It is A.md:2","total_cost_usd":0.02}"#,
        )) {
            Some(Event::Done(r)) => {
                assert_eq!(
                    (r.answer.as_str(), r.cost_usd),
                    ("It is A.md:2", Some(0.02))
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn autopoll_s_command_line_restricts_tools_and_model() {
        let c = command(
            &ClaudeOptions::default(),
            Path::new("/run/x/system.md"),
            &[PathBuf::from("/srv/notes")],
        );
        let s = c.join(" ");
        assert!(s.starts_with("claude -p --input-format stream-json --output-format stream-json --verbose --model haiku"), "{s}");
        assert!(s.ends_with("--tools Read,Grep,Glob"), "{s}");
        assert!(s.contains("--system-prompt-file /run/x/system.md"), "{s}");
        assert!(s.contains("--no-session-persistence"), "{s}");
        assert!(s.contains("--add-dir /srv/notes"), "{s}");
        assert!(s.contains("--max-turns 20"), "{s}");
    }
}
