//! Server counters and a latency window for `stats` replies.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How many recent latencies the percentiles are computed over.
const WINDOW: usize = 4_096;

/// Counters shared by sessions and workers.
#[derive(Debug)]
pub struct Counters {
    started: Instant,
    requests: AtomicU64,
    errors: AtomicU64,
    in_flight: AtomicU64,
    sessions: AtomicU64,
    latencies_us: Mutex<VecDeque<u64>>,
}

impl Counters {
    /// Fresh counters; uptime starts now.
    pub fn new() -> Counters {
        Counters {
            started: Instant::now(),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            sessions: AtomicU64::new(0),
            latencies_us: Mutex::new(VecDeque::with_capacity(WINDOW)),
        }
    }

    /// A request got its reply (an answer or an error).
    pub fn finished(&self, latency: Duration, error: bool) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if error {
            self.errors.fetch_add(1, Ordering::Relaxed);
        } else {
            let mut w = match self.latencies_us.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            if w.len() == WINDOW {
                w.pop_front();
            }
            w.push_back(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX));
        }
    }

    /// A request that never got to a worker failed (bad frame, overload).
    pub fn rejected(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Work was queued (+1) or left the queue/worker (-1).
    pub fn in_flight(&self, delta: i64) {
        if delta >= 0 {
            self.in_flight.fetch_add(delta as u64, Ordering::Relaxed);
        } else {
            let _ = self
                .in_flight
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                    Some(v.saturating_sub(delta.unsigned_abs()))
                });
        }
    }

    /// A session opened (+1) or closed (-1).
    pub fn session(&self, opened: bool) {
        if opened {
            self.sessions.fetch_add(1, Ordering::Relaxed);
        } else {
            let _ = self
                .sessions
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                    Some(v.saturating_sub(1))
                });
        }
    }

    /// Open sessions.
    pub fn sessions(&self) -> u64 {
        self.sessions.load(Ordering::Relaxed)
    }

    /// Snapshot: (uptime, requests, errors, in flight, sessions, p50 ms, p99 ms).
    pub fn snapshot(&self) -> Snapshot {
        let mut lat: Vec<u64> = match self.latencies_us.lock() {
            Ok(g) => g.iter().copied().collect(),
            Err(p) => p.into_inner().iter().copied().collect(),
        };
        lat.sort_unstable();
        let pct = |p: f64| -> f64 {
            if lat.is_empty() {
                return 0.0;
            }
            let i = ((lat.len() as f64 - 1.0) * p).round() as usize;
            lat[i] as f64 / 1000.0
        };
        Snapshot {
            uptime: self.started.elapsed(),
            requests: self.requests.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            sessions: self.sessions.load(Ordering::Relaxed),
            p50_ms: pct(0.50),
            p99_ms: pct(0.99),
        }
    }
}

impl Default for Counters {
    fn default() -> Self {
        Counters::new()
    }
}

/// A point-in-time view of [`Counters`].
#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    /// Time since start.
    pub uptime: Duration,
    /// Requests replied to.
    pub requests: u64,
    /// Of which errors.
    pub errors: u64,
    /// In the queue or a worker now.
    pub in_flight: u64,
    /// Open sessions.
    pub sessions: u64,
    /// Median answer latency, ms.
    pub p50_ms: f64,
    /// 99th percentile answer latency, ms.
    pub p99_ms: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_counts() {
        let c = Counters::new();
        for ms in 1..=100 {
            c.finished(Duration::from_millis(ms), false);
        }
        c.finished(Duration::from_millis(1), true);
        c.rejected();
        c.in_flight(2);
        c.in_flight(-3);
        let s = c.snapshot();
        assert_eq!((s.requests, s.errors, s.in_flight), (102, 2, 0));
        assert!((s.p50_ms - 50.0).abs() <= 1.0, "{}", s.p50_ms);
        assert!((s.p99_ms - 99.0).abs() <= 1.0, "{}", s.p99_ms);
    }
}
