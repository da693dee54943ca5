//! The worker pool: `--workers` named threads taking jobs from one bounded
//! crossbeam channel, asking the engine, and handing each outcome back to
//! the job's session (its channel, then a wake-up of its poll).

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use autopoll_protocol::ErrorCode;
use autopoll_protocol::fifo::Waker;
use crossbeam_channel::{Receiver, Sender};

use crate::engine::{Engine, EngineAnswer, EngineError};
use crate::stats::Counters;

/// One question on its way to a worker.
pub struct Job {
    /// The request id.
    pub id: u64,
    /// The question.
    pub question: String,
    /// Give up after this.
    pub deadline: Instant,
    /// Where the outcome goes.
    pub reply: Sender<Outcome>,
    /// Wakes the session's poll.
    pub waker: Arc<Waker>,
}

/// What a worker produced for a job.
pub struct Outcome {
    /// The request id.
    pub id: u64,
    /// The answer or why not.
    pub result: Result<EngineAnswer, EngineError>,
    /// Time spent in the engine.
    pub engine_time: Duration,
}

/// Start `n` workers on `jobs`.
pub fn start(
    n: usize,
    jobs: Receiver<Job>,
    engine: Arc<dyn Engine>,
    counters: Arc<Counters>,
) -> std::io::Result<Vec<JoinHandle<()>>> {
    (0..n)
        .map(|i| {
            let jobs = jobs.clone();
            let engine = engine.clone();
            let counters = counters.clone();
            std::thread::Builder::new()
                .name(format!("worker-{i}"))
                .spawn(move || {
                    // Ends when every sender (the sessions and the server) is gone.
                    for job in jobs.iter() {
                        let t = Instant::now();
                        let result = if t >= job.deadline {
                            // Waiting is the server's load, not the question's fault.
                            Err(EngineError {
                                code: ErrorCode::Overloaded,
                                message: "the request waited in the queue past its deadline".into(),
                            })
                        } else {
                            // A panicking engine costs one error reply, not a worker.
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                engine.answer(&job.question, job.deadline)
                            }))
                            .unwrap_or_else(|_| {
                                log::error!("event=engine_panic worker={i}");
                                Err(EngineError {
                                    code: ErrorCode::Engine,
                                    message: "the engine panicked on this question".into(),
                                })
                            })
                        };
                        counters.in_flight(-1);
                        let _ = job.reply.send(Outcome {
                            id: job.id,
                            result,
                            engine_time: t.elapsed(),
                        });
                        job.waker.wake();
                    }
                })
        })
        .collect()
}
