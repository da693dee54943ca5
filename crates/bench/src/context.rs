//! The `context` step: what the built-in engine's context costs the server
//! (issue 12). Index time and memory against context size (10 / 50 / 200 MB
//! of markdown in ~100 KB files), the CPU and the delay of a one-line edit
//! at each size, and idle CPU against the number of files (500 / 2,000 /
//! 20,000 small markdown files, plus the cost of an edit among 20,000).
//!
//! Same-run references: the same index built on one thread and the raw
//! read of the same files; an idle server over a one-file context; the
//! cost of the full safety-net walk (a server with `--reload-interval 1`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{Report, Res, World, e, procs, synthetic_context};

const MB: usize = 1 << 20;

/// Peak and current resident memory of `pid`, KiB (`VmHWM`, `VmRSS`).
fn hwm_rss_kib(pid: i32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Write about `bytes` of synthetic markdown under `dir` as files of about
/// `per_file` bytes (cut at paragraph ends), `per_dir` files a folder, and
/// at most `max_files` files. Returns the files written.
fn write_context(
    dir: &Path,
    bytes: usize,
    per_file: usize,
    per_dir: usize,
    max_files: usize,
) -> Res<Vec<PathBuf>> {
    let text = synthetic_context(bytes, 0x5eed ^ bytes as u64);
    let mut files = Vec::new();
    let mut rest = text.as_str();
    while !rest.is_empty() && files.len() < max_files {
        let cut = if rest.len() <= per_file {
            rest.len()
        } else {
            rest[per_file..]
                .find("\n\n")
                .map_or(rest.len(), |i| per_file + i + 2)
        };
        let (body, tail) = rest.split_at(cut);
        rest = tail;
        let n = files.len();
        let sub = dir.join(format!("d{:03}", n / per_dir));
        if n % per_dir == 0 {
            std::fs::create_dir_all(&sub).map_err(e("context folder"))?;
        }
        let f = sub.join(format!("note-{n:05}.md"));
        std::fs::write(&f, format!("# Note {n}\n{body}")).map_err(e("context file"))?;
        files.push(f);
    }
    Ok(files)
}

/// Append one line to `file`; wait until `stats` shows a new context
/// version. Returns (server CPU seconds used, seconds until it showed).
fn one_line_edit(
    pid: i32,
    client: &mut autopoll_protocol::Client,
    file: &Path,
    round: usize,
) -> Res<(f64, f64)> {
    let t = Duration::from_secs(10);
    let before = client.stats(t).map_err(e("stats"))?.engine.context_version;
    let c0 = procs::cpu_secs(pid);
    let t0 = Instant::now();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(file)
        .map_err(e("open for the edit"))?;
    std::io::Write::write_all(
        &mut f,
        format!("An edit, round {round}: okapi{round}.\n").as_bytes(),
    )
    .map_err(e("edit"))?;
    drop(f);
    let shown = loop {
        let v = client.stats(t).map_err(e("stats"))?.engine.context_version;
        if v != before {
            break t0.elapsed();
        }
        if t0.elapsed() > Duration::from_secs(30) {
            return Err("no new context version within 30 s of an edit".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    // Let anything after the swap finish (freeing the old index).
    std::thread::sleep(Duration::from_millis(300));
    Ok((procs::cpu_secs(pid) - c0, shown.as_secs_f64()))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// CPU share of one core used by `pid` over `secs`.
fn idle_share(pid: i32, secs: f64) -> f64 {
    let c0 = procs::cpu_secs(pid);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    (procs::cpu_secs(pid) - c0) / t0.elapsed().as_secs_f64() * 100.0
}

/// Index time, memory and edit cost against context size.
fn sizes(
    opts: &super::Options,
    r: &mut Report,
    out: &mut serde_json::Map<String, Value>,
) -> Res<()> {
    use autopoll_server::engine::builtin::BuiltinEngine;
    let sizes: &[usize] = if opts.quick {
        &[MB / 2, 2 * MB]
    } else {
        &[10 * MB, 50 * MB, 200 * MB]
    };
    let threads = autopoll_server::engine::par::threads();
    for &bytes in sizes {
        let label = format!("{} MB", bytes as f64 / MB as f64);
        let w = World::new(opts)?;
        let dir = w.dir.path().join("ctx");
        let files = write_context(&dir, bytes, 100_000, 100, usize::MAX)?;
        let ctx_bytes: u64 = files
            .iter()
            .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
            .sum();
        // References: the raw read, and one thread.
        let t = Instant::now();
        let mut read = 0usize;
        for f in &files {
            read += std::fs::read(f).map_err(e("read"))?.len();
        }
        let raw_secs = t.elapsed().as_secs_f64();
        let me = std::process::id() as i32;
        let (t, c) = (Instant::now(), procs::cpu_secs(me));
        let one = BuiltinEngine::load_with(std::slice::from_ref(&dir), 1)?;
        let (seq_secs, seq_cpu) = (t.elapsed().as_secs_f64(), procs::cpu_secs(me) - c);
        let (t, c) = (Instant::now(), procs::cpu_secs(me));
        let all = BuiltinEngine::load_with(std::slice::from_ref(&dir), threads)?;
        let (par_secs, par_cpu) = (t.elapsed().as_secs_f64(), procs::cpu_secs(me) - c);
        let same = one.index().version() == all.index().version()
            && one.index().passages() == all.index().passages();
        drop((one, all));

        // The server: start-up (index included), memory, edits.
        let t = Instant::now();
        let s = w.server("ctx", &["--context", &dir.to_string_lossy()])?;
        let start_secs = t.elapsed().as_secs_f64();
        let (hwm, rss) = hwm_rss_kib(s.pid());
        let mut c = w.client("ctx")?;
        let mut cpu = Vec::new();
        let mut shown = Vec::new();
        for round in 0..3 {
            let (u, d) = one_line_edit(s.pid(), &mut c, &files[files.len() / 2 + round], round)?;
            cpu.push(u);
            shown.push(d);
        }
        // The peak again: an edit holds the old index and the new at once.
        let (hwm_edit, _) = hwm_rss_kib(s.pid());
        let (cpu_med, shown_med) = (median(cpu.clone()), median(shown.clone()));
        let cpu_max = cpu.iter().copied().fold(0.0, f64::max);
        let shown_max = shown.iter().copied().fold(0.0, f64::max);
        let big = bytes >= 50 * MB;
        r.row(
            &format!("Context index {label} ({} files)", files.len()),
            format!("{par_secs:.2} s on {threads} threads ({par_cpu:.2} CPU s)"),
            format!(
                "1 thread {seq_secs:.2} s ({seq_cpu:.2} CPU s); raw read {raw_secs:.2} s; server up in {start_secs:.2} s{}",
                if same { "" } else { "; INDEX DIFFERS" }
            ),
            if bytes == 50 * MB { "<= 1 s" } else { "-" },
            (bytes == 50 * MB).then_some(par_secs <= 1.0 && same).or((!same).then_some(false)),
        );
        let ratio = rss as f64 * 1024.0 / ctx_bytes as f64;
        let hwm_ratio = hwm as f64 * 1024.0 / ctx_bytes as f64;
        let edit_ratio = hwm_edit as f64 * 1024.0 / ctx_bytes as f64;
        r.row(
            &format!("Server memory, {label} context"),
            format!(
                "VmRSS {:.0} MiB ({ratio:.2}x), VmHWM {:.0} MiB ({hwm_ratio:.2}x), after 3 edits {:.0} MiB ({edit_ratio:.2}x)",
                rss as f64 / 1024.0,
                hwm as f64 / 1024.0,
                hwm_edit as f64 / 1024.0
            ),
            format!("context {:.0} MiB on disk", ctx_bytes as f64 / MB as f64),
            if bytes == 200 * MB {
                "<= 2x, also at the peak"
            } else {
                "-"
            },
            (bytes == 200 * MB).then_some(ratio <= 2.0 && edit_ratio <= 2.0),
        );
        r.row(
            &format!("Context one-line edit, {label}"),
            format!(
                "{cpu_med:.3} CPU s (max {cpu_max:.3}); new version in {:.0} ms (max {:.0})",
                shown_med * 1e3,
                shown_max * 1e3
            ),
            format!("full index build {seq_secs:.2} s"),
            if big { "<= 0.2 CPU s, <= 1 s" } else { "-" },
            big.then_some(cpu_max <= 0.2 && shown_max <= 1.0),
        );
        out.insert(
            label,
            json!({"bytes": ctx_bytes, "files": files.len(), "read_bytes": read,
                "threads": threads, "index_seconds": par_secs, "index_seconds_1_thread": seq_secs, "index_cpu_seconds": par_cpu, "index_cpu_seconds_1_thread": seq_cpu,
                "raw_read_seconds": raw_secs, "same_index": same, "server_start_seconds": start_secs,
                "vm_rss_kib": rss, "vm_hwm_kib": hwm, "vm_hwm_kib_after_edits": hwm_edit, "edit_cpu_seconds": cpu, "edit_shown_seconds": shown}),
        );
    }
    Ok(())
}

/// Idle CPU against file count, and an edit among the most files.
fn idle(
    opts: &super::Options,
    r: &mut Report,
    out: &mut serde_json::Map<String, Value>,
) -> Res<()> {
    let counts: &[usize] = if opts.quick {
        &[100, 500]
    } else {
        &[500, 2_000, 20_000]
    };
    let secs = if opts.quick { 1.5 } else { 10.0 };
    let w = World::new(opts)?;
    let one = w.dir.path().join("one.md");
    std::fs::write(&one, synthetic_context(2_000, 1)).map_err(e("context"))?;
    let s = w.server("one", &["--context", &one.to_string_lossy()])?;
    std::thread::sleep(Duration::from_millis(500));
    let reference = idle_share(s.pid(), secs);
    drop(s);
    let mut rows = serde_json::Map::new();
    for &n in counts {
        let dir = w.dir.path().join(format!("many-{n}"));
        // Generously sized, then cut at exactly `n` files of ~1.4 KB.
        let files = write_context(&dir, n * 2_000, 1_400, 100, n)?;
        let name = format!("idle{n}");
        let s = w.server(&name, &["--context", &dir.to_string_lossy()])?;
        std::thread::sleep(Duration::from_millis(500));
        let share = idle_share(s.pid(), secs);
        let last = n == *counts.last().unwrap_or(&0);
        r.row(
            &format!("Idle CPU, server over {} small files", files.len()),
            format!("{share:.3}% of one core over {secs:.0} s"),
            format!("one-file context {reference:.3}%"),
            if last && !opts.quick { "<= 0.5%" } else { "-" },
            (last && !opts.quick).then_some(share <= 0.5),
        );
        let mut entry = json!({"files": files.len(), "cpu_percent": share});
        if last {
            let mut c = w.client(&name)?;
            let mut cpu = Vec::new();
            let mut shown = Vec::new();
            for round in 0..3 {
                let (u, d) = one_line_edit(s.pid(), &mut c, &files[n / 3 + round], round)?;
                cpu.push(u);
                shown.push(d);
            }
            drop(s);
            // The safety-net walk's cost: a server walking every second.
            let name = format!("walk{n}");
            let s = w.server(
                &name,
                &[
                    "--context",
                    &dir.to_string_lossy(),
                    "--reload-interval",
                    "1",
                ],
            )?;
            std::thread::sleep(Duration::from_millis(500));
            let walk_share = idle_share(s.pid(), secs);
            r.row(
                &format!("Context one-line edit, {} small files", files.len()),
                format!(
                    "{:.3} CPU s; new version in {:.0} ms",
                    median(cpu.clone()),
                    median(shown.clone()) * 1e3
                ),
                format!(
                    "one full walk {:.3} CPU s (--reload-interval 1: {walk_share:.1}% of a core)",
                    walk_share / 100.0
                ),
                "-",
                None,
            );
            entry["edit_cpu_seconds"] = json!(cpu);
            entry["edit_shown_seconds"] = json!(shown);
            entry["walk_cpu_percent_at_1s"] = json!(walk_share);
        }
        rows.insert(n.to_string(), entry);
    }
    out.insert("idle_reference_cpu_percent".into(), json!(reference));
    out.insert("idle".into(), Value::Object(rows));
    Ok(())
}

/// The `context` step.
pub fn step(opts: &super::Options, r: &mut Report) -> Res<()> {
    let mut out = serde_json::Map::new();
    sizes(opts, r, &mut out)?;
    idle(opts, r, &mut out)?;
    r.json.insert("context".into(), Value::Object(out));
    Ok(())
}
