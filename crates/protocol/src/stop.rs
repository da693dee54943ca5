//! A stop button shared by signal handlers and every thread that waits in
//! poll(2): once triggered, its descriptor stays readable, so all pollers
//! wake and stay woken.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::fifo::Waker;

/// The stop button.
#[derive(Clone, Debug)]
pub struct Shutdown {
    inner: Arc<(AtomicBool, Waker)>,
}

impl Shutdown {
    /// A new, untriggered stop button.
    pub fn new() -> io::Result<Shutdown> {
        Ok(Shutdown {
            inner: Arc::new((AtomicBool::new(false), Waker::new()?)),
        })
    }

    /// Ask everyone to stop (safe to call from ctrlc's handler thread).
    pub fn trigger(&self) {
        self.inner.0.store(true, Ordering::SeqCst);
        self.inner.1.wake();
    }

    /// Whether a stop was asked for.
    pub fn is_triggered(&self) -> bool {
        self.inner.0.load(Ordering::SeqCst)
    }

    /// The descriptor to include in poll(2) for POLLIN.
    pub fn fd(&self) -> std::os::fd::RawFd {
        self.inner.1.fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fifo;
    use std::time::{Duration, Instant};

    #[test]
    fn stays_readable_once_triggered() {
        let s = Shutdown::new().unwrap();
        let mut fds = [fifo::pollfd(s.fd(), libc::POLLIN)];
        assert_eq!(
            fifo::poll(&mut fds, Some(Instant::now() + Duration::from_millis(5))).unwrap(),
            0
        );
        s.clone().trigger();
        assert!(s.is_triggered());
        for _ in 0..3 {
            assert_eq!(
                fifo::poll(&mut fds, Some(Instant::now() + Duration::from_secs(5))).unwrap(),
                1
            );
        }
    }
}
