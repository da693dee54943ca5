//! The quick benchmark as a smoke test: every measurement runs and reports
//! a figure. Speed is not asserted here (debug build, shared machine); the
//! figures are for scripts/bench.sh in release mode.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

#[test]
fn the_quick_bench_measures_everything() {
    let env = common::Env::new();
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
        "Context index",
        "Server memory",
        "Context one-line edit",
        "Idle CPU, server over",
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
        "context",
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
}
