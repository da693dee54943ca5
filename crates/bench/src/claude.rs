//! The `claude` figures: the real Claude Code CLI against our fake
//! Anthropic Messages API (tests/fixtures/fake_anthropic.py) on 127.0.0.1.
//!
//! - warm (`--backend claude`, autopoll's own command line) vs one process
//!   per question (`--backend spawn -- claude -p --output-format json`):
//!   wall time per question, p50, and the ratio;
//! - request bytes and input tokens per question with autopoll's defaults
//!   (haiku, three reading tools, the instructions once as the system
//!   prompt) vs the command line the docs gave before (the CLI's default
//!   tools and system prompt, the whole prompt in every message).
//!
//! The fake API answers at once, so the times are the CLI's and autopoll's
//! own overhead, not a model's.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{Daemon, Options, Report, Res, World, e, pct, sorted};

/// The fake API, with its request log.
struct Api {
    _d: Daemon,
    url: String,
    log: std::path::PathBuf,
}

fn start_api(w: &World, fixtures: &Path) -> Res<Api> {
    let port = w.dir.path().join("api.port");
    let log = w.dir.path().join("api.log");
    let child = Command::new("python3")
        .arg(fixtures.join("fake_anthropic.py"))
        .arg("--port-file")
        .arg(&port)
        .arg("--log")
        .arg(&log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(e("python3 fake_anthropic.py"))?;
    let d = Daemon::new(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !port.exists() {
        if Instant::now() > deadline {
            return Err("the fake API did not start within 30 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let p = std::fs::read_to_string(&port).map_err(e("port file"))?;
    Ok(Api {
        _d: d,
        url: format!("http://127.0.0.1:{}", p.trim()),
        log,
    })
}

impl Api {
    /// (calls, body bytes) of `POST /v1/messages` so far.
    fn totals(&self) -> (u64, u64) {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let mut n = 0;
        let mut bytes = 0;
        for l in text.lines() {
            let Ok(v) = serde_json::from_str::<Value>(l) else {
                continue;
            };
            let path = v["path"].as_str().unwrap_or("");
            if path.starts_with("/v1/messages") && !path.contains("count_tokens") {
                n += 1;
                bytes += v["body_bytes"].as_u64().unwrap_or(0);
            }
        }
        (n, bytes)
    }

    fn vars(&self, w: &World) -> Vec<(String, String)> {
        let home = w.dir.path().join("home");
        let tmp = w.dir.path().join("tmp");
        let _ = std::fs::create_dir_all(&home);
        let _ = std::fs::create_dir_all(&tmp);
        vec![
            ("TMPDIR".into(), tmp.to_string_lossy().into_owned()),
            ("ANTHROPIC_BASE_URL".into(), self.url.clone()),
            ("ANTHROPIC_API_KEY".into(), "sk-ant-bench-not-a-key".into()),
            (
                "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC".into(),
                "1".into(),
            ),
            ("HOME".into(), home.to_string_lossy().into_owned()),
        ]
    }
}

/// One configuration's figures over `n` questions.
struct Run {
    wall_ms: Vec<f64>,
    bytes_per_q: f64,
    calls_per_q: f64,
    input_tokens_per_q: f64,
}

fn input_tokens(meta: Option<&Value>) -> u64 {
    let Some(u) = meta.and_then(|m| m.get("usage")) else {
        return 0;
    };
    let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
    n("input_tokens") + n("cache_read_input_tokens") + n("cache_creation_input_tokens")
}

fn measure(w: &World, api: &Api, name: &str, n: usize) -> Res<Run> {
    let mut c = w.client(name)?;
    let limit = Duration::from_secs(120);
    c.ask("Warm up: what is in the notes?", limit)
        .map_err(e("ask"))?;
    let (calls0, bytes0) = api.totals();
    let mut wall = Vec::new();
    let mut tokens = 0;
    for i in 0..n {
        let q = match i % 3 {
            0 => "How many entries does the cache hold?",
            1 => "Which database did we choose for the bridge?",
            _ => "When do releases happen?",
        };
        let s = Instant::now();
        let a = c.ask(q, limit).map_err(e("ask"))?;
        wall.push(s.elapsed().as_secs_f64() * 1e6);
        tokens += input_tokens(a.backend.as_ref());
    }
    let (calls1, bytes1) = api.totals();
    let nf = n as f64;
    Ok(Run {
        wall_ms: sorted(wall),
        bytes_per_q: (bytes1 - bytes0) as f64 / nf,
        calls_per_q: (calls1 - calls0) as f64 / nf,
        input_tokens_per_q: tokens as f64 / nf,
    })
}

/// The figures.
/// Whether `bin` names an executable: a path that exists, or a bare name
/// found in `PATH`.
fn findable(bin: &std::path::Path) -> bool {
    if bin.components().count() > 1 {
        return bin.is_file();
    }
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
}

pub(super) fn claude(opts: &Options, r: &mut Report) -> Res<()> {
    if !findable(&opts.claude_bin) {
        return Err(format!(
            "no Claude Code CLI at {:?}: run scripts/install-test-deps.sh claude (the pinned \
             version, in tests/claude-cli), or pass --claude-bin PATH",
            opts.claude_bin
        ));
    }
    let (nw, ns) = if opts.quick { (3, 2) } else { (20, 8) };
    let w = World::new(opts)?;
    let ctx = w.dir.path().join("ctx");
    std::fs::create_dir_all(&ctx).map_err(e("context"))?;
    std::fs::write(
        ctx.join("NOTES.md"),
        "# Notes\nThe cache holds 64 entries.\nWe chose SQLite for the bridge.\nReleases happen on Fridays.\n",
    )
    .map_err(e("context"))?;
    let api = start_api(&w, &opts.fixtures)?;
    let vars = api.vars(&w);
    let bin = opts.claude_bin.to_string_lossy().into_owned();
    let c = ctx.to_string_lossy().into_owned();
    let common = [
        "--context",
        c.as_str(),
        "--workers",
        "1",
        "--request-timeout",
        "120",
    ];
    let after = {
        let args = [&common[..], &["--backend", "claude", "--claude-bin", &bin]].concat();
        let _s = w.server_env("after", &args, &vars)?;
        measure(&w, &api, "after", nw)?
    };
    let before = {
        // The command line docs/BACKENDS.md gave before: the CLI's default
        // model, system prompt and tools; the whole prompt in every message.
        let args = [
            &common[..],
            &[
                "--backend",
                "claude",
                "--",
                &bin,
                "-p",
                "--input-format",
                "stream-json",
                "--output-format",
                "stream-json",
                "--verbose",
                "--allowedTools",
                "Read,Grep,Glob",
            ],
        ]
        .concat();
        let _s = w.server_env("before", &args, &vars)?;
        measure(&w, &api, "before", nw)?
    };
    let spawn = {
        let args = [
            &common[..],
            &[
                "--backend",
                "spawn",
                "--",
                &bin,
                "-p",
                "--output-format",
                "json",
                "--model",
                "haiku",
                "--tools",
                "Read,Grep,Glob",
                "--no-session-persistence",
            ],
        ]
        .concat();
        let _s = w.server_env("spawn", &args, &vars)?;
        measure(&w, &api, "spawn", ns)?
    };
    let warm = pct(&after.wall_ms, 0.5);
    let cold = pct(&spawn.wall_ms, 0.5);
    r.row(
        "Claude Code warm (claude) vs per-process (spawn) p50",
        format!("{warm:.0} ms vs {cold:.0} ms = {:.1}x", cold / warm),
        "same CLI, same fake API, one run".into(),
        "-",
        None,
    );
    let tok_ratio = before.input_tokens_per_q / after.input_tokens_per_q.max(1.0);
    r.row(
        "Claude input tokens per question (defaults vs before)",
        format!(
            "{:.0} vs {:.0} = {tok_ratio:.1}x fewer",
            after.input_tokens_per_q, before.input_tokens_per_q
        ),
        "the CLI's default tools and per-question instructions, same run".into(),
        ">= 3x fewer",
        Some(tok_ratio >= 3.0),
    );
    r.row(
        "Claude request bytes per question (defaults vs before)",
        format!(
            "{:.0} KB vs {:.0} KB ({:.1} vs {:.1} API calls)",
            after.bytes_per_q / 1024.0,
            before.bytes_per_q / 1024.0,
            after.calls_per_q,
            before.calls_per_q
        ),
        "same run".into(),
        "-",
        None,
    );
    let side = |x: &Run| {
        json!({
            "wall_p50_ms": pct(&x.wall_ms, 0.5),
            "wall_p99_ms": pct(&x.wall_ms, 0.99),
            "request_bytes_per_question": x.bytes_per_q,
            "api_calls_per_question": x.calls_per_q,
            "input_tokens_per_question": x.input_tokens_per_q,
            "questions": x.wall_ms.len(),
        })
    };
    r.json.insert(
        "claude".into(),
        json!({
            "cli": bin,
            "warm_defaults": side(&after),
            "warm_before": side(&before),
            "spawn": side(&spawn),
            "warm_vs_spawn_ratio": cold / warm,
            "input_tokens_ratio": tok_ratio,
        }),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::findable;
    use std::path::Path;

    #[test]
    fn a_cli_is_found_by_path_or_in_path_and_a_missing_one_is_not() {
        assert!(findable(Path::new("/bin/sh")));
        assert!(findable(Path::new("sh")), "sh is in PATH");
        assert!(!findable(Path::new("/nonexistent/claude")));
        assert!(!findable(Path::new("no-such-program-autopoll")));
    }
}
