//! `autopoll-bench`: flags, then `autopoll_bench::run`; prints the table and
//! writes the JSON.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use crate::exit;

/// `autopoll-bench`.
#[derive(Debug, Parser)]
#[command(
    name = "autopoll-bench",
    version,
    about = "Measure autopoll with the real binaries: IPC, pickup latency, backlog drain, persistent vs per-question, idle cost, endurance, engine, context cost, answer quality, MCP, many conversations",
    long_about = "Measures autopoll with the real binaries (looked up next to this one), a real bridge \
                  and real FIFOs, pairing each speed figure with a reference measured in the same run. \
                  Prints a table and writes the same figures as JSON. Build in release mode first; \
                  scripts/bench.sh does both. Exit 0 when every measurement ran (targets missed are \
                  reported, not failures), 1 when one could not run."
)]
struct BenchCli {
    /// Seconds instead of minutes: smaller counts, shorter waits (a smoke test).
    #[arg(long)]
    quick: bool,
    /// Where to write the JSON.
    #[arg(long, value_name = "FILE", default_value = "bench-results/bench.json")]
    json_out: PathBuf,
    /// tests/fixtures of the source tree (for the persistent-vs-spawn figure).
    #[arg(long, value_name = "DIR")]
    fixtures: Option<PathBuf>,
    /// Run only this measurement (repeatable)
    #[arg(long, value_name = "NAME",
          value_parser = clap::builder::PossibleValuesParser::new(autopoll_bench::step_names()))]
    only: Vec<String>,
    /// The Claude Code CLI for the claude figures (default: the pinned one that
    /// scripts/install-test-deps.sh installs in tests/claude-cli, else `claude` from PATH).
    #[arg(long, value_name = "PATH")]
    claude_bin: Option<PathBuf>,
    /// Print more on stderr: the quality step lists every question not
    /// answered at rank 1 (the JSON has them all either way).
    #[arg(short, long)]
    verbose: bool,
}

/// `autopoll-bench`'s main.
pub fn bench_main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("__pingpong") {
        autopoll_bench::pingpong_child();
        return ExitCode::SUCCESS;
    }
    let cli = match BenchCli::try_parse() {
        Ok(c) => c,
        Err(e) => return exit::clap_exit(e),
    };
    let bin_dir = match std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.to_path_buf()))
    {
        Some(d) => d,
        None => {
            eprintln!("autopoll-bench: cannot find its own directory");
            return ExitCode::from(exit::FAILURE);
        }
    };
    let fixtures = cli
        .fixtures
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures"));
    let claude_bin = cli.claude_bin.unwrap_or_else(|| {
        let pinned = fixtures.join("../claude-cli/node_modules/.bin/claude");
        if pinned.exists() {
            pinned
        } else {
            PathBuf::from("claude")
        }
    });
    let opts = autopoll_bench::Options {
        quick: cli.quick,
        bin_dir,
        fixtures,
        only: cli.only,
        claude_bin,
        verbose: cli.verbose,
    };
    let report = autopoll_bench::run(&opts);
    print!("{}", report.table());
    let json = serde_json::Value::Object(report.json.clone());
    if let Some(dir) = cli.json_out.parent()
        && !dir.as_os_str().is_empty()
    {
        let _ = std::fs::create_dir_all(dir);
    }
    match std::fs::write(
        &cli.json_out,
        serde_json::to_string_pretty(&json).unwrap_or_default(),
    ) {
        Ok(()) => eprintln!("bench: figures written to {}", cli.json_out.display()),
        Err(e) => eprintln!(
            "autopoll-bench: cannot write {}: {e}",
            cli.json_out.display()
        ),
    }
    if report.rows.iter().any(|r| r.value.starts_with("FAILED")) {
        ExitCode::from(exit::FAILURE)
    } else {
        ExitCode::SUCCESS
    }
}
