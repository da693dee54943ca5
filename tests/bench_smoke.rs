//! The quick benchmark as a smoke test: every measurement runs and reports
//! a figure. Speed is not asserted here (debug build, shared machine); the
//! figures are for scripts/bench.sh in release mode.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

#[test]
fn a_missing_claude_cli_is_named_with_its_fix_instead_of_waited_for() {
    // It used to wait 120 s for a server that had exited at once with a
    // clear message the bench threw away.
    let env = common::Env::new();
    let out = Command::new(env!("CARGO_BIN_EXE_autopoll-bench"))
        .args(["--quick", "--only", "claude", "--json-out"])
        .arg(env.path("bench.json"))
        .args([
            "--fixtures",
            &format!("{}/tests/fixtures", env!("CARGO_MANIFEST_DIR")),
        ])
        .arg("--claude-bin")
        .arg(env.path("no-such-claude"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", common::describe(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("no Claude Code CLI")
            && table.contains("scripts/install-test-deps.sh claude"),
        "{}",
        common::describe(&out)
    );
}

#[test]
fn the_quick_bench_measures_everything() {
    let env = common::Env::new();
    // The postgres step starts a cluster of Debian's PostgreSQL.
    common::ensure_postgres();
    let json = env.path("bench.json");
    let out = Command::new(env!("CARGO_BIN_EXE_autopoll-bench"))
        .args(["--quick", "--json-out", common::path_str(&json)])
        .args([
            "--fixtures",
            &format!("{}/tests/fixtures", env!("CARGO_MANIFEST_DIR")),
        ])
        .args(["--claude-bin", common::claude_bin()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::describe(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    for metric in [
        "IPC ask round trip",
        "Pickup-to-answer",
        "Backlog drain",
        "Persistent (jsonl) vs per-question",
        "Idle CPU",
        "Endurance",
        "Engine index",
        "Engine query",
        "Bridge growth per question",
        "Claude Code warm (claude) vs per-process (spawn)",
        "Claude input tokens per question",
        "Quality hit@1 / hit@3 / MRR, check half",
        "ask_shard via autopoll mcp",
        "Minimal shard (claim commit + FIFO ask + answer commit)",
        "Pickup, 4 conversation(s), a poller each",
        "Pickup, 4 conversation(s), one poller",
        "Idle CPU of 3 pollers while another conversation is asked",
        "Context index",
        "Server memory",
        "Context one-line edit",
        "Idle CPU, server over",
        "PostgreSQL: pickup-to-answer",
        "PostgreSQL: backlog drain, 1 / 3 pollers",
        "PostgreSQL: one kill -9 of a poller",
        "PostgreSQL: one server restart",
    ] {
        assert!(table.contains(metric), "{metric} missing:\n{table}");
    }
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for section in [
        "ipc",
        "pickup",
        "drain",
        "persistent_vs_spawn",
        "idle",
        "endurance",
        "engine",
        "retention",
        "claude",
        "quality",
        "mcp",
        "conversations",
        "context",
        "postgres",
    ] {
        assert!(
            v.get(section).is_some_and(|s| s.get("error").is_none()),
            "{section}: {}",
            v[section]
        );
    }
    assert_eq!(v["mode"], "quick");
    assert!(v["pickup"]["p50_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(v["endurance"]["server_end"]["zombies"], 0);
    assert!(v["mcp"]["p50_ms"].as_f64().unwrap() > 0.0);
    assert!(
        v["mcp"]["reference"]["tool_calls_per_question"]
            .as_f64()
            .unwrap()
            >= 2.0
    );
    // Many conversations: 1 (one poller either way), then 4 with a poller
    // each and with one poller holding all four.
    let rows = v["conversations"]["pickup"].as_array().unwrap();
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert!(rows.iter().all(|r| r["p50_ms"].as_f64().unwrap() > 0.0));
    assert!(
        v["conversations"]["minimal_shard"]["p50_ms"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    // The same poller asked from Python (tests/fixtures/py_coordinator.py).
    let py = &v["python_coordinator"];
    assert_eq!(py["samples"].as_u64(), Some(20), "{py}");
    assert!(py["p99_ms"].as_f64().unwrap() >= py["p50_ms"].as_f64().unwrap());
}

/// The answer-quality step alone, as `cargo test` runs it: it builds the
/// corpus, asks every question of the engine and of the BM25 baseline, and
/// prints hit@1, hit@3, MRR and latency for both halves. No threshold: the
/// figures are for docs/PERFORMANCE.md.
#[test]
fn the_quality_bench_scores_the_engine_and_the_baseline_on_both_halves() {
    let env = common::Env::new();
    let json = env.path("bench.json");
    let out = Command::new(env!("CARGO_BIN_EXE_autopoll-bench"))
        .args(["--quick", "--only", "quality", "-v", "--json-out"])
        .arg(&json)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::describe(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    println!("{table}");
    for row in [
        "Quality hit@1 / hit@3 / MRR, tune half",
        "Quality hit@1 / hit@3 / MRR, check half",
        "Quality hit@1 / hit@3 / MRR, reworded",
        "Quality hit@1 / hit@3 / MRR, literal",
        "Quality query latency p50 / p99",
        "Quality corpus and questions",
    ] {
        assert!(table.contains(row), "{row} missing:\n{table}");
    }
    assert!(!table.contains("FAILED"), "{table}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let q = &v["quality"];
    let results = q["results"].as_array().unwrap();
    let broken = q["broken"].as_array().unwrap().len();
    assert_eq!(
        results.len() + broken,
        q["questions"].as_u64().unwrap() as usize
    );
    for half in ["tune", "check", "reworded", "literal", "all"] {
        for who in ["engine", "baseline"] {
            let s = &q["scores"][half][who];
            for k in ["hit_at_1", "hit_at_3", "mrr"] {
                let x = s[k].as_f64().unwrap_or(-1.0);
                assert!((0.0..=1.0).contains(&x), "{half} {who} {k}: {s}");
            }
            assert!(s["hit_at_1"].as_f64() <= s["hit_at_3"].as_f64(), "{s}");
        }
    }
    let halves = q["scores"]["tune"]["engine"]["questions"].as_u64().unwrap()
        + q["scores"]["check"]["engine"]["questions"]
            .as_u64()
            .unwrap();
    assert_eq!(halves as usize, results.len());
    assert!(q["latency"]["engine_p50_ms"].as_f64().unwrap() > 0.0);
    assert!(q["latency"]["baseline_p50_ms"].as_f64().unwrap() > 0.0);
    // -v lists every question the engine did not answer first, as the JSON does.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let listed = stderr
        .lines()
        .filter(|l| l.starts_with("bench: quality: engine "))
        .count();
    let not_first = results
        .iter()
        .filter(|r| r["engine_rank"].as_u64() != Some(1))
        .count();
    assert_eq!(listed, not_first, "{stderr}");
}
