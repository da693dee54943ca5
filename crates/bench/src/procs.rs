//! Reading a process's resources from /proc: CPU time, resident memory,
//! open descriptors, threads, children (and zombies among them).

/// Clock ticks per second (for CPU time from /proc/PID/stat).
pub fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = s.rsplit_once(')')?.1;
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// User + system CPU seconds used so far.
pub fn cpu_secs(pid: i32) -> f64 {
    stat_fields(pid)
        .and_then(|f| Some(f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?))
        .unwrap_or(0.0)
        / ticks_per_sec()
}

/// CPU time of all of `pid`'s live threads, seconds, to the nanosecond
/// (the scheduler's own sums in `/proc/PID/task/*/schedstat`), where
/// [`cpu_secs`] counts 10 ms clock ticks: for processes that wake for
/// microseconds at a time. Falls back to [`cpu_secs`] without schedstat.
pub fn cpu_secs_exact(pid: i32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return cpu_secs(pid);
    };
    let mut ns = 0u64;
    for t in tasks.flatten() {
        let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) else {
            return cpu_secs(pid);
        };
        match s
            .split_whitespace()
            .next()
            .and_then(|f| f.parse::<u64>().ok())
        {
            Some(n) => ns += n,
            None => return cpu_secs(pid),
        }
    }
    ns as f64 / 1e9
}

/// Resident memory, KiB.
pub fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Open file descriptors.
pub fn fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Threads.
pub fn threads(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Direct children, and how many of them are zombies.
pub fn children(pid: i32) -> (usize, usize) {
    let mut n = 0;
    let mut z = 0;
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Ok(child) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if let Some(f) = stat_fields(child)
                && f.get(1).and_then(|p| p.parse::<i32>().ok()) == Some(pid)
            {
                n += 1;
                if f.first().map(String::as_str) == Some("Z") {
                    z += 1;
                }
            }
        }
    }
    (n, z)
}

/// A snapshot of one process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Snapshot {
    /// Resident memory, KiB.
    pub rss_kib: u64,
    /// Open descriptors.
    pub fds: usize,
    /// Threads.
    pub threads: usize,
    /// Children.
    pub children: usize,
    /// Zombie children.
    pub zombies: usize,
}

/// Take a snapshot of `pid`.
pub fn snapshot(pid: i32) -> Snapshot {
    let (children, zombies) = children(pid);
    Snapshot {
        rss_kib: rss_kib(pid),
        fds: fds(pid),
        threads: threads(pid),
        children,
        zombies,
    }
}

impl Snapshot {
    /// As JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "rss_kib": self.rss_kib, "fds": self.fds, "threads": self.threads,
            "children": self.children, "zombies": self.zombies,
        })
    }
}
