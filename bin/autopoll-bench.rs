//! `autopoll-bench`: measure autopoll (see `--help`).
fn main() -> std::process::ExitCode {
    autopoll_cli::bench_main()
}
