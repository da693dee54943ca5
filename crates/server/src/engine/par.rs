//! Work spread over the cores, consumed in order: [`map_ordered`] runs
//! `work(0..n)` on a few named scoped threads (`index-N`) and hands the
//! results to `consume` on the calling thread strictly in index order, with
//! at most [`WINDOW`] results per thread waiting, so memory stays bounded
//! however uneven the work. No runtime, no pool: `std::thread::scope`.
//!
//! With one thread (or one item) everything runs on the calling thread, in
//! the same order: the sequential reference the parallel path must equal.

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};

/// Results a worker may run ahead of the consumer, per thread.
pub const WINDOW: usize = 4;

/// Threads to use for indexing: the cores there are, at most 8.
pub fn threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 8)
}

struct Shared<R> {
    ready: BTreeMap<usize, std::thread::Result<R>>,
    /// Results consumed so far: workers may start item `i` only while
    /// `i < consumed + window`.
    consumed: usize,
}

/// Run `work(i)` for `i` in `0..n` on up to `threads` threads, calling
/// `consume(i, result)` on this thread in order of `i`. A panic in `work`
/// is re-raised here once the items before it are consumed.
pub fn map_ordered<R: Send>(
    n: usize,
    threads: usize,
    work: impl Fn(usize) -> R + Sync,
    mut consume: impl FnMut(usize, R),
) {
    let threads = threads.min(n);
    if threads <= 1 {
        for i in 0..n {
            consume(i, work(i));
        }
        return;
    }
    let window = WINDOW * threads;
    let next = AtomicUsize::new(0);
    let shared = Mutex::new(Shared {
        ready: BTreeMap::new(),
        consumed: 0,
    });
    let cv = Condvar::new();
    let lock = || shared.lock().unwrap_or_else(PoisonError::into_inner);
    std::thread::scope(|s| {
        for t in 0..threads {
            let (next, cv, work, lock) = (&next, &cv, &work, &lock);
            let spawned = std::thread::Builder::new()
                .name(format!("index-{t}"))
                .spawn_scoped(s, move || {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            return;
                        }
                        {
                            let mut g = lock();
                            while i >= g.consumed + window {
                                g = cv.wait(g).unwrap_or_else(PoisonError::into_inner);
                            }
                        }
                        let r = catch_unwind(AssertUnwindSafe(|| work(i)));
                        lock().ready.insert(i, r);
                        cv.notify_all();
                    }
                });
            if spawned.is_err() {
                // No thread to be had: the ones started (or this thread,
                // below) do the work.
                log::debug!("could not start indexing thread {t}");
            }
        }
        for i in 0..n {
            let r = {
                let mut g = lock();
                loop {
                    if let Some(r) = g.ready.remove(&i) {
                        break r;
                    }
                    // Nobody took it (no thread could be started): do it here.
                    if next.load(Ordering::Relaxed) <= i
                        && next
                            .compare_exchange(i, i + 1, Ordering::Relaxed, Ordering::Relaxed)
                            .is_ok()
                    {
                        drop(g);
                        let r = catch_unwind(AssertUnwindSafe(|| work(i)));
                        g = lock();
                        break r;
                    }
                    g = cv.wait(g).unwrap_or_else(PoisonError::into_inner);
                }
            };
            lock().consumed = i + 1;
            cv.notify_all();
            match r {
                Ok(r) => consume(i, r),
                Err(p) => {
                    // Let the workers run out rather than wait on us.
                    lock().consumed = usize::MAX / 2;
                    next.store(n, Ordering::Relaxed);
                    cv.notify_all();
                    resume_unwind(p);
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_arrive_in_order_whatever_the_thread_count() {
        for threads in [1, 2, 3, 8] {
            let mut got = Vec::new();
            map_ordered(
                100,
                threads,
                |i| {
                    // Uneven work: later items finish first.
                    let spin = (100 - i) * 200;
                    (0..spin).fold(i, |a, b| a.wrapping_add(b % 3))
                        - (0..spin).map(|b| b % 3).sum::<usize>()
                },
                |i, r| got.push((i, r)),
            );
            assert_eq!(
                got,
                (0..100).map(|i| (i, i)).collect::<Vec<_>>(),
                "{threads} threads"
            );
        }
        let mut none = 0;
        map_ordered(0, 4, |i| i, |_, _| none += 1);
        assert_eq!(none, 0);
    }

    #[test]
    fn a_panic_in_the_work_reaches_the_caller() {
        let r = std::panic::catch_unwind(|| {
            map_ordered(50, 2, |i| assert!(i != 17, "boom"), |_, _| {});
        });
        assert!(r.is_err());
    }
}
