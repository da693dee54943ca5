//! Where the built-in engine's memory goes: a counting global allocator
//! around the system one, over the bench's synthetic context.
//!
//! `cargo run --release -p autopoll-bench --example memprobe -- BYTES DIR`
//! writes a synthetic context of about BYTES (in ~100 KB files, 100 a
//! folder) to DIR, which must not exist yet. Then
//! `memprobe 0 DIR [THREADS] [EDITS]` loads it on THREADS threads (2),
//! prints the heap (current and peak, as a ratio to the context's bytes),
//! VmRSS and VmHWM, the live allocations by size, and the same figures
//! after each of EDITS (3) one-line edits applied with `reload_paths`.
//! A tool for finding what to shrink; `autopoll-bench --only context`
//! gives the figures the goals are judged on.

use std::alloc::{GlobalAlloc, Layout, System};
use std::error::Error;
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

struct Counting;

static CUR: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// Live allocations and their bytes, by the bit length of their size.
static COUNT: [AtomicUsize; 64] = [const { AtomicUsize::new(0) }; 64];
static BYTES: [AtomicUsize; 64] = [const { AtomicUsize::new(0) }; 64];

fn bucket(n: usize) -> usize {
    (usize::BITS - n.max(1).leading_zeros()) as usize
}

fn live(n: usize, more: bool) {
    let (c, b) = (&COUNT[bucket(n)], &BYTES[bucket(n)]);
    if more {
        c.fetch_add(1, Relaxed);
        b.fetch_add(n, Relaxed);
    } else {
        c.fetch_sub(1, Relaxed);
        b.fetch_sub(n, Relaxed);
    }
}

fn grow(n: usize) {
    let c = CUR.fetch_add(n, Relaxed) + n;
    PEAK.fetch_max(c, Relaxed);
}

// SAFETY: every call is passed on to `System` unchanged; the counters are
// atomics and allocate nothing.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        grow(l.size());
        live(l.size(), true);
        // SAFETY: as the caller promised for `l`.
        unsafe { System.alloc(l) }
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        CUR.fetch_sub(l.size(), Relaxed);
        live(l.size(), false);
        // SAFETY: `p` came from `System` with layout `l`.
        unsafe { System.dealloc(p, l) }
    }

    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        if n > l.size() {
            grow(n - l.size());
        } else {
            CUR.fetch_sub(l.size() - n, Relaxed);
        }
        live(l.size(), false);
        live(n, true);
        // SAFETY: `p` came from `System` with layout `l`.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn mib(x: usize) -> f64 {
    x as f64 / (1 << 20) as f64
}

/// VmRSS and VmHWM, MiB.
fn rss() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0u64)
            / 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn report(what: &str, ctx: usize) {
    let (r, h) = rss();
    let (cur, peak) = (CUR.load(Relaxed), PEAK.load(Relaxed));
    println!(
        "{what:24} heap {:7.1} MiB ({:.2}x), peak {:7.1} MiB ({:.2}x) | VmRSS {r} MiB, VmHWM {h} MiB ({:.2}x)",
        mib(cur),
        cur as f64 / ctx as f64,
        mib(peak),
        peak as f64 / ctx as f64,
        h as f64 * (1 << 20) as f64 / ctx as f64
    );
}

fn histogram() {
    for i in 0..64 {
        let n = COUNT[i].load(Relaxed);
        if n > 0 {
            println!(
                "  size <= {:>10}: {n:>9} live, {:8.1} MiB",
                1usize << i,
                mib(BYTES[i].load(Relaxed))
            );
        }
    }
}

fn write_context(bytes: usize, dir: &std::path::Path) -> Result<(), Box<dyn Error>> {
    let text = autopoll_bench::synthetic_context(bytes, 0x5eed ^ bytes as u64);
    let mut rest = text.as_str();
    let mut n = 0usize;
    while !rest.is_empty() {
        let cut = match rest.get(100_000..).and_then(|t| t.find("\n\n")) {
            Some(i) => 100_000 + i + 2,
            None => rest.len(),
        };
        let (body, tail) = rest.split_at(cut);
        rest = tail;
        let sub = dir.join(format!("d{:03}", n / 100));
        std::fs::create_dir_all(&sub)?;
        std::fs::write(
            sub.join(format!("note-{n:05}.md")),
            format!("# Note {n}\n{body}"),
        )?;
        n += 1;
    }
    println!("wrote {n} files to {}", dir.display());
    Ok(())
}

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(bytes), Some(dir)) = (args.first(), args.get(1)) else {
        return Err("usage: memprobe BYTES DIR (write) | memprobe 0 DIR [THREADS] [EDITS]".into());
    };
    let dir = std::path::PathBuf::from(dir);
    let bytes: usize = bytes.parse()?;
    if bytes > 0 {
        if dir.exists() {
            return Err(format!("{} exists: give a new folder to write to", dir.display()).into());
        }
        return write_context(bytes, &dir);
    }
    let mut files = Vec::new();
    for sub in std::fs::read_dir(&dir)? {
        for f in std::fs::read_dir(sub?.path())? {
            files.push(f?.path());
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(format!("no files under {}", dir.display()).into());
    }
    let mut ctx = 0usize;
    for f in &files {
        ctx += std::fs::metadata(f)?.len() as usize;
    }
    let threads: usize = args.get(2).map_or(Ok(2), |t| t.parse())?;
    let edits: usize = args.get(3).map_or(Ok(3), |t| t.parse())?;
    report("start", ctx);
    let t = std::time::Instant::now();
    let engine = autopoll_server::engine::builtin::BuiltinEngine::load_with(
        std::slice::from_ref(&dir),
        threads,
    )?;
    report(&format!("loaded ({:.2} s)", t.elapsed().as_secs_f64()), ctx);
    histogram();
    for round in 0..edits {
        PEAK.store(CUR.load(Relaxed), Relaxed);
        let f = &files[(files.len() / 2 + round * 7) % files.len()];
        let mut h = std::fs::OpenOptions::new().append(true).open(f)?;
        writeln!(h, "An edit, round {round}: okapi{round}.")?;
        drop(h);
        let t = std::time::Instant::now();
        if !engine.reload_paths(std::slice::from_ref(f)) {
            return Err(format!("edit {round} of {} was not taken", f.display()).into());
        }
        let ms = t.elapsed().as_secs_f64() * 1e3;
        report(&format!("edit {round} ({ms:.0} ms)"), ctx);
    }
    Ok(())
}
