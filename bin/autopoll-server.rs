//! `autopoll-server`: the persistent-instance server.
fn main() -> std::process::ExitCode {
    autopoll_cli::server_main()
}
