//! Descriptor budget: the server raises its soft `RLIMIT_NOFILE` to the hard
//! limit at start, then works out how many sessions fit in what is left
//! after a reserve, so it refuses clients with `overloaded` before `open`
//! or `pipe` can fail with EMFILE.
//!
//! A session holds [`FDS_PER_SESSION`] descriptors (its request and reply
//! FIFOs, its waker's two ends). Everything else the server opens after
//! start is short-lived or bounded (a refusal's reply FIFO, a context file
//! being re-read, an external instance being replaced), and lives in the
//! reserve.

use std::io;

/// Descriptors one session holds for its whole life.
pub const FDS_PER_SESSION: u64 = 4;
/// Descriptors kept free for everything that is not a session, at most.
const RESERVE_MAX: u64 = 64;

/// The soft and hard `RLIMIT_NOFILE`.
pub fn nofile() -> io::Result<(u64, u64)> {
    // SAFETY: an all-zero rlimit is a valid out-parameter.
    let mut r: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: valid resource and out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((r.rlim_cur, r.rlim_max))
}

/// Raise the soft `RLIMIT_NOFILE` to the hard limit (or, when that is
/// unlimited, to the kernel's `fs.nr_open`). Returns the soft limit in force.
pub fn raise_nofile() -> io::Result<u64> {
    let (soft, hard) = nofile()?;
    if soft >= hard {
        return Ok(soft);
    }
    let mut want = hard;
    if hard == libc::RLIM_INFINITY {
        want = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1 << 20);
    }
    let r = libc::rlimit {
        rlim_cur: want,
        rlim_max: hard,
    };
    // SAFETY: valid resource and a fully initialised rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
        let e = io::Error::last_os_error();
        log::warn!("cannot raise the open-file limit from {soft} to {want}: {e}");
        return Ok(soft);
    }
    Ok(want)
}

/// Descriptors open in this process now (from `/proc/self/fd`).
pub fn open_fds() -> io::Result<u64> {
    // Minus the one read_dir itself holds.
    Ok((std::fs::read_dir("/proc/self/fd")?.count() as u64).saturating_sub(1))
}

/// How many sessions fit under `limit` with `open` descriptors in use: what
/// is left after a reserve of a quarter of the limit (at most 64).
pub fn session_capacity(limit: u64, open: u64) -> u64 {
    let reserve = (limit / 4).min(RESERVE_MAX);
    limit.saturating_sub(open).saturating_sub(reserve) / FDS_PER_SESSION
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_keeps_a_reserve() {
        assert_eq!(session_capacity(256, 16), (256 - 16 - 64) / 4);
        assert_eq!(session_capacity(1024, 16), (1024 - 16 - 64) / 4);
        assert_eq!(session_capacity(64, 12), (64 - 12 - 16) / 4);
        assert_eq!(session_capacity(16, 20), 0);
    }

    #[test]
    fn raising_never_lowers_and_counting_works() {
        let (soft, hard) = nofile().unwrap();
        let now = raise_nofile().unwrap();
        assert!(now >= soft && (now <= hard || hard == libc::RLIM_INFINITY));
        assert!(open_fds().unwrap() >= 3);
    }
}
