//! Crash points for the fault suite: with `AUTOPOLL_FAULT_KILL_AT=<point>`
//! (and optionally `AUTOPOLL_FAULT_AFTER=<n>`, default 1) in its environment,
//! the poller sends itself SIGKILL the n-th time it reaches that point,
//! exactly as `kill -9` from outside would land there. Points:
//! `after_claim`, `after_send` (the question is written to the server),
//! `after_reply` (the answer is back, not yet written), `before_commit`
//! (the answer transaction is about to run). Without the variable each
//! point is one relaxed atomic load.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

struct Armed {
    point: String,
    after: u64,
    hits: AtomicU64,
}

fn armed() -> Option<&'static Armed> {
    static A: OnceLock<Option<Armed>> = OnceLock::new();
    A.get_or_init(|| {
        let point = std::env::var("AUTOPOLL_FAULT_KILL_AT").ok()?;
        let after = std::env::var("AUTOPOLL_FAULT_AFTER")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(1);
        log::warn!(
            "event=fault_armed point={point} after={after}: this poller will kill itself there"
        );
        Some(Armed {
            point,
            after,
            hits: AtomicU64::new(0),
        })
    })
    .as_ref()
}

/// Reached `name`: die here if the fault suite asked for it.
pub fn point(name: &str) {
    if let Some(a) = armed()
        && a.point == name
        && a.hits.fetch_add(1, Ordering::SeqCst) + 1 == a.after
    {
        // SAFETY: signalling ourselves.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}
