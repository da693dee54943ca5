//! Write the engine step's synthetic markdown context to a file, to profile
//! the index build outside the bench:
//! `cargo run --release -p autopoll-bench --example synthetic -- BYTES FILE`
//! (the engine step's 50 MB context is `52428800`, seed 6), then e.g.
//! `valgrind --tool=callgrind target/release/examples/ask --threads 1 --context FILE`.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(bytes), Some(path)) = (args.first().and_then(|b| b.parse().ok()), args.get(1)) else {
        eprintln!("usage: synthetic BYTES FILE (e.g. synthetic 52428800 /tmp/ctx.md)");
        return ExitCode::from(2);
    };
    match std::fs::write(path, autopoll_bench::synthetic_context(bytes, 6)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("synthetic: cannot write {path}: {e}");
            ExitCode::from(1)
        }
    }
}
