//! `autopoll-poller`: claims queries from the bridge and answers them through the server.
fn main() -> std::process::ExitCode {
    autopoll_cli::poller_main()
}
