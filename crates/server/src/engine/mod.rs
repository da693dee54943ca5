//! Engines: what answers a question. The server holds one behind the
//! [`Engine`] trait; this issue brings the built-in context engine.

pub mod builtin;
pub mod citations;
pub mod context;
pub mod external;
pub mod index;
mod interner;
pub mod lines;
pub mod par;
mod postings;
pub mod prompt;
pub mod related;
pub mod text;
pub use external::wire;

use std::time::Instant;

use autopoll_protocol::{EngineInfo, ErrorCode, WorkerInfo};

/// An engine's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineAnswer {
    /// The answer text.
    pub answer: String,
    /// Cited ranges, `FILE:START-END`.
    pub sources: Vec<String>,
    /// Cited ranges that did not check out against the context.
    pub invalid_sources: Vec<String>,
    /// False when nothing relevant was found.
    pub found: bool,
    /// Content hash of the context answered from.
    pub context_version: String,
    /// Backend facts to pass on (claude: session_id, duration_ms, total_cost_usd, usage).
    pub meta: Option<serde_json::Value>,
}

/// Why an engine could not answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct EngineError {
    /// `Engine` or `Timeout` usually.
    pub code: ErrorCode,
    /// For the person reading the error reply.
    pub message: String,
}

/// Something that answers questions. Shared by all worker threads.
pub trait Engine: Send + Sync {
    /// A short name (`builtin`, `jsonl`, `claude`, `spawn`).
    fn name(&self) -> &str;
    /// Answer `question`, giving up at `deadline`.
    fn answer(&self, question: &str, deadline: Instant) -> Result<EngineAnswer, EngineError>;
    /// What the engine holds, for `stats`.
    fn info(&self) -> EngineInfo;
    /// True when answering takes microseconds and never blocks (the
    /// built-in engine): sessions then answer in their own thread instead of
    /// handing the question to the worker pool and back.
    fn is_inline(&self) -> bool {
        false
    }
    /// Per-instance state (external backends).
    fn instances(&self) -> Vec<WorkerInfo> {
        Vec::new()
    }
    /// Re-read context files that changed on disk, walking all of them.
    /// Called by the `context-watch` thread as a safety net, and when
    /// inotify cannot say what changed.
    fn reload_if_changed(&self) {}
    /// Re-read only these context paths (files or folders, as inotify
    /// named them). Called by the `context-watch` thread after events.
    fn reload_paths(&self, paths: &[std::path::PathBuf]) {
        let _ = paths;
        self.reload_if_changed();
    }
    /// Stop (external backends end their child processes). Called once.
    fn shutdown(&self) {}
}
