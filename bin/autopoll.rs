//! `autopoll`: bridge administration, asking directly, status.
fn main() -> std::process::ExitCode {
    autopoll_cli::autopoll_main()
}
