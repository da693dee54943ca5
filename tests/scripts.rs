//! The shell scripts a newcomer runs first: `scripts/up.sh` (a shard in
//! tmux) and `scripts/demo.sh`, with the debug binaries (AUTOPOLL_BIN_DIR)
//! and a private tmux server (TMUX_TMPDIR) per test.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{Env, describe};

fn script(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

fn bin_dir() -> String {
    Path::new(env!("CARGO_BIN_EXE_autopoll"))
        .parent()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// `scripts/up.sh ARGS` in the test's directory, its own tmux server and runtime dir.
fn up(env: &Env, args: &[&str]) -> Output {
    let tmux = env.path("tmux");
    std::fs::create_dir_all(&tmux).unwrap();
    let mut c = Command::new(script("up.sh"));
    for (k, _) in std::env::vars() {
        if k.starts_with("AUTOPOLL_") || k == "TMUX" {
            c.env_remove(k);
        }
    }
    c.args(args)
        .current_dir(env.dir.path())
        .env("AUTOPOLL_BIN_DIR", bin_dir())
        .env("AUTOPOLL_RUNTIME_DIR", env.runtime())
        .env("TMUX_TMPDIR", &tmux)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Ends the test's tmux server (and the shard in it).
struct Tmux(std::path::PathBuf);

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .arg("kill-server")
            .env("TMUX_TMPDIR", &self.0)
            .env_remove("TMUX")
            .output();
    }
}

#[test]
fn up_sh_refuses_a_context_that_does_not_exist() {
    let env = Env::new();
    let _t = Tmux(env.path("tmux"));
    let out = up(&env, &["--context", "/nonexistent/dir/NOTES.md"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/dir/NOTES.md does not exist"),
        "{err}"
    );
    assert!(!env.path("autopoll-bridge.db").exists());
}

#[test]
fn up_sh_fails_with_the_server_s_own_words_when_the_server_dies() {
    let env = Env::new();
    let _t = Tmux(env.path("tmux"));
    std::fs::create_dir_all(env.path("empty")).unwrap();
    let out = up(&env, &["--context", "empty"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the server did not start"), "{err}");
    assert!(err.contains("no text or markdown files"), "{err}");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("shard running"),
        "{}",
        describe(&out)
    );
}

#[test]
fn up_sh_starts_a_shard_and_keeps_the_token_off_command_lines() {
    let env = Env::new();
    let _t = Tmux(env.path("tmux"));
    std::fs::write(
        env.path("NOTES.md"),
        "# Notes\nThe cache holds 64 entries.\n",
    )
    .unwrap();
    let out = up(&env, &["--context", "NOTES.md", "--name", "up"]);
    assert!(out.status.success(), "{}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("shard running"), "{text}");
    // The coordinator's token is printed for the user; the shard's is not,
    // and no process carries it on its command line.
    let db = env.path("autopoll-bridge.db");
    let b = autopoll_bridge::Bridge::open(&db).unwrap();
    let shard_token: String = b
        .connection()
        .query_row("SELECT session_b_token FROM conversations", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert!(!text.contains(&shard_token), "{text}");
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            assert!(
                !String::from_utf8_lossy(&cmd).contains(&shard_token),
                "pid {:?} has the shard token on its command line",
                e.file_name()
            );
        }
    }
    // The shard answers.
    let ask = env
        .at("up", &["ask", "How many entries does the cache hold?"])
        .output()
        .unwrap();
    assert!(ask.status.success(), "{}", describe(&ask));
    assert!(String::from_utf8_lossy(&ask.stdout).contains("64"));
}

#[test]
fn up_sh_with_a_tokens_file_serves_every_conversation_in_it() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let _t = Tmux(env.path("tmux"));
    std::fs::write(
        env.path("NOTES.md"),
        "# Notes\nThe cache holds 64 entries.\n",
    )
    .unwrap();
    let convs = [env.conversation(), env.conversation()];
    let tokens = env.path("tokens");
    let text: String = convs
        .iter()
        .map(|c| format!("{} {}\n", c.id, c.token_b))
        .collect();
    std::fs::write(&tokens, format!("# shards\n{text}")).unwrap();
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o600)).unwrap();
    let db = env.db();
    let out = up(
        &env,
        &[
            "--db",
            common::path_str(&db),
            "--tokens-file",
            "tokens",
            "--context",
            "NOTES.md",
            "--name",
            "upmany",
        ],
    );
    assert!(out.status.success(), "{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("2 conversation(s)"), "{stdout}");
    // up.sh waited for both heartbeats; both are answered.
    for c in &convs {
        assert_eq!(env.shard_status(c).as_deref(), Some("waiting"));
        let ids = env.send_queries(c, &c.id, 1, "How many entries does the cache hold?");
        assert!(!ids.is_empty());
    }
    common::wait_until("both answered", common::TIMEOUT, || {
        env.responses().len() == 2
    });
}

#[test]
fn demo_sh_reports_what_was_answered_without_terminal_codes_in_a_pipe() {
    let env = Env::new();
    let out = Command::new(script("demo.sh"))
        .env("AUTOPOLL_BIN_DIR", bin_dir())
        .env("TMPDIR", env.dir.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains('\u{1b}'), "ANSI codes in a pipe:\n{text}");
    assert!(text.contains("203 answered"), "{text}");
}
