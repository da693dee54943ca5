//! The `spawn` backend: one process per question, as the old shard ran
//! `claude -p`. The prompt goes to stdin (closed after it), or into any
//! argument holding `{question}`. The whole stdout is the answer, unless it
//! is a JSON object: a `jsonl` response (`answer`/`error`), or a Claude Code
//! `--output-format json` result (`result`, `is_error`, cost). A non-zero
//! exit is an `engine` error that keeps what the process said.

use std::time::Instant;

use autopoll_protocol::fifo::{self, FifoError};
use autopoll_protocol::frame::FrameError;

use super::super::EngineError;
use super::super::citations;
use super::process::{self, Spec};
use super::wire::{self, Event, Raw};
use super::{ExternalConfig, Job, Slot, failed, timeout};

/// Most output a `spawn` process may print.
const MAX_SPAWN_OUTPUT: usize = 16 << 20;

/// Run one process for `job` and read its answer.
pub(super) fn ask(
    worker: usize,
    cfg: &ExternalConfig,
    slot: &Slot,
    env: &[(String, String)],
    job: &Job,
) -> Result<Raw, EngineError> {
    let as_arg = cfg.command.iter().skip(1).any(|a| a.contains("{question}"));
    let argv: Vec<String> = cfg
        .command
        .iter()
        .enumerate()
        .map(|(i, a)| {
            if i > 0 && a.contains("{question}") {
                a.replace("{question}", &job.prompt)
            } else {
                a.clone()
            }
        })
        .collect();
    let spec = Spec {
        argv: &argv,
        env,
        server_dir: &cfg.server_dir,
        version: &job.version,
    };
    let mut run = process::spawn(worker, &spec, slot)
        .map_err(|e| failed(format!("cannot start {:?}: {e}", cfg.command[0])))?;
    slot.set(|w| w.pid = Some(run.pid as u32));
    let start = Instant::now();
    let first = cfg.start_timeout.max(cfg.watchdog);
    let mut result: Result<(), EngineError> = Ok(());
    if let Some(stdin) = run.stdin.take()
        && !as_arg
        && let Err(e) = fifo::write_all(
            &stdin,
            job.prompt.as_bytes(),
            (start + first).min(job.deadline),
        )
        && !matches!(e, FifoError::Closed)
    {
        result = Err(timeout(format!(
            "the process did not read its question: {e}"
        )));
    }
    let mut out = Vec::new();
    let mut quiet_until = start + first;
    while result.is_ok() {
        match run.out.read_frame(Some(quiet_until.min(job.deadline))) {
            Ok(Some(line)) => {
                quiet_until = Instant::now() + cfg.watchdog;
                out.extend_from_slice(&line);
                out.push(b'\n');
                if out.len() > MAX_SPAWN_OUTPUT {
                    result = Err(failed("the process printed more than 16 MiB".into()));
                }
            }
            Ok(None) => break,
            Err(FifoError::Frame(FrameError::Truncated(_))) => {
                out.extend_from_slice(&run.out.take_pending());
                break;
            }
            Err(FifoError::Timeout) => {
                result = Err(timeout(if Instant::now() >= job.deadline {
                    "the request's deadline passed; the process was killed".into()
                } else {
                    format!(
                        "no output for {:?} (watchdog); the process was killed",
                        cfg.watchdog
                    )
                }));
            }
            Err(e) => result = Err(failed(format!("reading from the process: {e}"))),
        }
    }
    // Give it `kill_grace` to exit on its own once its output is done.
    let polite = result.is_ok();
    let stderr = run.stderr.clone();
    let how = process::stop_running(run, cfg.kill_grace, slot, polite);
    slot.set(|w| w.pid = None);
    result?;
    let parsed = output(&out);
    if how != "exit 0" {
        // Keep what it said: a JSON error result, or its last words.
        let said = match &parsed {
            Event::Failed(m) => format!(": {m}"),
            Event::Done(r) if !r.answer.is_empty() => {
                format!(": {}", last_chars(&r.answer, 500))
            }
            _ => String::new(),
        };
        return Err(failed(format!(
            "the process ended with {how}{said}{}",
            stderr.suffix()
        )));
    }
    match parsed {
        Event::Done(raw) => Ok(raw),
        Event::Failed(m) => Err(failed(m)),
        _ => Err(failed(format!(
            "the process printed no answer{}",
            stderr.suffix()
        ))),
    }
}

fn last_chars(s: &str, n: usize) -> String {
    let count = s.chars().count();
    s.chars().skip(count.saturating_sub(n)).collect()
}

/// What a `spawn` process printed, all of it: a `jsonl` response object or
/// a Claude Code JSON result if it printed one, else the text itself.
pub fn output(stdout: &[u8]) -> Event {
    let text = String::from_utf8_lossy(stdout);
    let trimmed = text.trim();
    if trimmed.starts_with('{')
        && let Ok(obj) = wire::object(trimmed.as_bytes())
    {
        if let Some(e) = super::claude::one_shot(&obj) {
            return e;
        }
        if let Some(e @ (Event::Done(_) | Event::Failed(_))) = super::jsonl::response(0, &obj) {
            return e;
        }
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
    fn output_is_text_a_response_object_or_a_claude_result() {
        assert!(
            matches!(output(b"plain answer NOTES.md:2\n"), Event::Done(r) if r.answer == "plain answer NOTES.md:2" && r.sources == vec!["NOTES.md:2"])
        );
        assert!(
            matches!(output(br#"{"answer":"x","sources":["A.md:1"]}"#), Event::Done(r) if r.sources == vec!["A.md:1"])
        );
        assert!(matches!(output(br#"{"error":"nope"}"#), Event::Failed(_)));
        let ok = br#"{"type":"result","subtype":"success","is_error":false,"result":"It is in A.md:3-4","session_id":"s","total_cost_usd":0.031,"usage":{"input_tokens":9}}"#;
        match output(ok) {
            Event::Done(r) => {
                assert_eq!(r.answer, "It is in A.md:3-4");
                assert_eq!(r.sources, vec!["A.md:3-4"]);
                assert_eq!(r.cost_usd, Some(0.031));
                assert_eq!(r.meta.unwrap()["session_id"], "s");
            }
            other => panic!("{other:?}"),
        }
        let err = br#"{"type":"result","subtype":"success","is_error":true,"api_error_status":500,"result":"API Error: 500 boom"}"#;
        assert!(matches!(output(err), Event::Failed(m) if m.contains("API error 500")));
    }
}
