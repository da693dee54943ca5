//! End-to-end test harness: a temp dir per test, the real binaries spawned
//! with a clean environment, and `wait_until` instead of sleeps. Failure
//! messages print the child's stderr.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Long enough for a loaded 2-core CI machine; tests never assert wall time.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// Poll `cond` until it holds or `timeout` passes; panics naming `what`.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting until {what}"
        );
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// One test's world: a private temp dir with a bridge path in it.
pub struct Env {
    pub dir: tempfile::TempDir,
    /// The bridge is this PostgreSQL database instead of `bridge.db`.
    pub pg: Option<String>,
}

impl Env {
    pub fn new() -> Env {
        Env {
            dir: tempfile::Builder::new()
                .prefix("autopoll-e2e-")
                .tempdir()
                .unwrap(),
            pg: None,
        }
    }

    /// A world whose bridge is a fresh database on the process's private
    /// PostgreSQL cluster (`autopoll_bridge::pg::cluster`); fails loudly
    /// when PostgreSQL cannot start.
    pub fn postgres() -> Env {
        let cluster =
            autopoll_bridge::pg::cluster::Cluster::shared().unwrap_or_else(|e| panic!("{e}"));
        Env::on_postgres(cluster.database().unwrap_or_else(|e| panic!("{e}")))
    }

    /// A world whose bridge is the PostgreSQL database at `url`.
    pub fn on_postgres(url: String) -> Env {
        Env {
            pg: Some(url),
            ..Env::new()
        }
    }

    /// What `--db` (AUTOPOLL_DB) is: the file's path, or the URL.
    pub fn db_arg(&self) -> String {
        match &self.pg {
            Some(url) => url.clone(),
            None => self.db().to_string_lossy().into_owned(),
        }
    }

    /// The bridge through the store layer (either database).
    pub fn store(&self) -> Box<dyn autopoll_bridge::Store> {
        autopoll_bridge::Target::parse(&self.db_arg())
            .open(autopoll_bridge::BridgeOptions::default())
            .unwrap()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn db(&self) -> PathBuf {
        self.path("bridge.db")
    }

    /// A command for binary `bin` with no AUTOPOLL_* variables from the
    /// outer environment, and AUTOPOLL_DB pointing at this test's bridge.
    pub fn cmd(&self, bin: &str) -> Command {
        let exe = match bin {
            "autopoll" => env!("CARGO_BIN_EXE_autopoll"),
            "autopoll-server" => env!("CARGO_BIN_EXE_autopoll-server"),
            "autopoll-poller" => env!("CARGO_BIN_EXE_autopoll-poller"),
            other => panic!("unknown binary {other}"),
        };
        let mut c = Command::new(exe);
        for (k, _) in std::env::vars() {
            if k.starts_with("AUTOPOLL_") || k == "RUST_LOG" {
                c.env_remove(k);
            }
        }
        c.env("AUTOPOLL_DB", self.db_arg())
            .current_dir(self.dir.path());
        c.stdin(Stdio::null());
        c
    }

    /// Run `autopoll ARGS`, returning its output whatever the exit code.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd("autopoll").args(args).output().unwrap()
    }

    /// Run `autopoll ARGS`, which must succeed; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "autopoll {args:?} failed: {}",
            describe(&out)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Run `autopoll ARGS --json`, which must succeed; returns parsed stdout.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        let s = self.ok(&a);
        serde_json::from_str(&s).unwrap_or_else(|e| panic!("{args:?} printed no JSON ({e}): {s}"))
    }

    /// `bridge init` then `bridge create`; returns the conversation.
    pub fn conversation(&self) -> Conversation {
        self.create_conversation(&[])
    }

    /// Like [`Env::conversation`], with `--ttl-hours HOURS` (short ones to
    /// test expiry).
    pub fn conversation_with_ttl(&self, hours: &str) -> Conversation {
        self.create_conversation(&["--ttl-hours", hours])
    }

    fn create_conversation(&self, extra: &[&str]) -> Conversation {
        self.ok(&["bridge", "init"]);
        let mut a = vec![
            "bridge",
            "create",
            "--role-a",
            "coordinator",
            "--role-b",
            "shard",
        ];
        a.extend_from_slice(extra);
        let v = self.json(&a);
        Conversation {
            id: v["conversation_id"].as_str().unwrap().into(),
            token_a: v["session_a_token"].as_str().unwrap().into(),
            token_b: v["session_b_token"].as_str().unwrap().into(),
        }
    }
}

pub struct Conversation {
    pub id: String,
    pub token_a: String,
    pub token_b: String,
}

impl Conversation {
    /// `--conversation ID --session S --token T` for session `s`.
    pub fn auth(&self, s: &str) -> Vec<String> {
        let token = if s == "a" {
            &self.token_a
        } else {
            &self.token_b
        };
        vec![
            "--conversation".into(),
            self.id.clone(),
            "--session".into(),
            s.into(),
            "--token".into(),
            token.clone(),
        ]
    }
}

/// Join fixed args and owned args into one `Vec<&str>`.
pub fn args<'a>(head: &[&'a str], tail: &'a [String]) -> Vec<&'a str> {
    head.iter()
        .copied()
        .chain(tail.iter().map(String::as_str))
        .collect()
}

/// Exit code, stdout and stderr, for assertion messages.
pub fn describe(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// An error must be exactly one line on stderr, with no panic or backtrace.
pub fn assert_one_line_error(out: &Output, code: i32, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{}", describe(out));
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "want one line: {}",
        describe(out)
    );
    assert!(
        err.contains(needle),
        "stderr lacks {needle:?}: {}",
        describe(out)
    );
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{}",
        describe(out)
    );
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A running `autopoll-server`, killed (-9) and reaped on drop.
pub struct Server {
    pub child: std::process::Child,
    pub name: String,
    pub runtime: PathBuf,
    stderr_path: PathBuf,
}

impl Env {
    /// The runtime dir for this test's servers.
    pub fn runtime(&self) -> PathBuf {
        self.path("rt")
    }

    /// Start `autopoll-server --name NAME` with `args`, in this test's runtime
    /// dir, and wait until it answers `stats`.
    pub fn server(&self, name: &str, args: &[&str]) -> Server {
        self.server_env(name, args, &[])
    }

    /// [`Env::server`] with extra environment variables (the server's
    /// external instances inherit them); an empty value removes the
    /// variable.
    pub fn server_env(&self, name: &str, args: &[&str], vars: &[(&str, String)]) -> Server {
        self.server_with(name, args, |c| {
            for (k, v) in vars {
                if v.is_empty() {
                    c.env_remove(k);
                } else {
                    c.env(k, v);
                }
            }
        })
    }

    /// [`Env::server`] with `setup` applied to the command before it is
    /// spawned (extra variables, a `pre_exec` hook).
    pub fn server_with(
        &self,
        name: &str,
        args: &[&str],
        setup: impl FnOnce(&mut Command),
    ) -> Server {
        let stderr_path = self.path(&format!("server-{name}-{}.log", std::process::id()));
        let err = std::fs::File::create(&stderr_path).unwrap();
        let mut cmd = self.cmd("autopoll-server");
        cmd.args(["--name", name, "--runtime-dir", path_str(&self.runtime())])
            .args(args);
        setup(&mut cmd);
        let child = cmd.stdout(Stdio::null()).stderr(err).spawn().unwrap();
        let s = Server {
            child,
            name: name.into(),
            runtime: self.runtime(),
            stderr_path,
        };
        wait_until("the server answers", TIMEOUT, || {
            assert!(!s.exited(), "server exited early: {}", s.stderr());
            s.client().is_ok()
        });
        s
    }

    /// `autopoll ARGS` aimed at server `name` in this test's runtime dir.
    pub fn at(&self, name: &str, args: &[&str]) -> Command {
        let mut c = self.cmd("autopoll");
        c.args(args)
            .env_remove("AUTOPOLL_DB")
            .env("AUTOPOLL_NAME", name)
            .env("AUTOPOLL_RUNTIME_DIR", self.runtime());
        c
    }
}

impl Server {
    /// Exited (a zombie not yet reaped, or gone), checked without reaping.
    fn exited(&self) -> bool {
        match std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())) {
            Ok(s) => {
                s.rsplit(')')
                    .next()
                    .and_then(|r| r.split_whitespace().next())
                    == Some("Z")
            }
            Err(_) => true,
        }
    }

    pub fn paths(&self) -> autopoll_protocol::ServerPaths {
        autopoll_protocol::ServerPaths::new(&self.runtime, &self.name).unwrap()
    }

    /// A protocol client connected to this server.
    pub fn client(&self) -> Result<autopoll_protocol::Client, autopoll_protocol::ClientError> {
        autopoll_protocol::Client::connect(
            &self.paths(),
            &autopoll_protocol::ClientOptions {
                connect_timeout: Duration::from_secs(5),
                client_name: "e2e".into(),
                ..Default::default()
            },
        )
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: sending a signal to our own child.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// Wait for the server to exit (bounded); returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let path = self.stderr_path.clone();
        wait_child_exit(&mut self.child, timeout, "server", || {
            std::fs::read_to_string(&path).unwrap_or_default()
        })
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `autopoll-poller`, killed (-9) and reaped on drop.
pub struct Poller {
    pub child: std::process::Child,
    log: PathBuf,
}

impl Env {
    /// Start `autopoll-poller` for session b of `conv` against server `name`.
    pub fn poller(&self, conv: &Conversation, name: &str, args: &[&str]) -> Poller {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = self.path(&format!("poller-{n}.log"));
        let child = self
            .cmd("autopoll-poller")
            .env("AUTOPOLL_CONVERSATION", &conv.id)
            .env("AUTOPOLL_TOKEN", &conv.token_b)
            .env("AUTOPOLL_RUNTIME_DIR", self.runtime())
            .env("RUST_LOG", "info")
            .args(["--name", name])
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Poller { child, log }
    }

    /// [`Env::poller`] inside network namespace `netns` (`ip netns exec`,
    /// which execs: the child is the poller itself), with `--db db`.
    pub fn poller_in(
        &self,
        netns: &str,
        db: &str,
        conv: &Conversation,
        name: &str,
        args: &[&str],
    ) -> Poller {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = self.path(&format!("poller-{netns}-{n}.log"));
        let mut c = Command::new("ip");
        c.args([
            "netns",
            "exec",
            netns,
            env!("CARGO_BIN_EXE_autopoll-poller"),
        ]);
        for (k, _) in std::env::vars() {
            if k.starts_with("AUTOPOLL_") || k == "RUST_LOG" {
                c.env_remove(k);
            }
        }
        let child = c
            .env("AUTOPOLL_DB", db)
            .env("AUTOPOLL_CONVERSATION", &conv.id)
            .env("AUTOPOLL_TOKEN", &conv.token_b)
            .env("AUTOPOLL_RUNTIME_DIR", self.runtime())
            .env("RUST_LOG", "info")
            .current_dir(self.dir.path())
            .args(["--name", name])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Poller { child, log }
    }

    /// Start `autopoll-poller --tokens-file FILE` (many conversations)
    /// against server `name`.
    pub fn poller_tokens(&self, tokens: &Path, name: &str, args: &[&str]) -> Poller {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = self.path(&format!("poller-many-{n}.log"));
        let child = self
            .cmd("autopoll-poller")
            .env("AUTOPOLL_RUNTIME_DIR", self.runtime())
            .env("RUST_LOG", "info")
            .args(["--name", name, "--tokens-file", path_str(tokens)])
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Poller { child, log }
    }

    /// Stop `p` with SIGSTOP at a moment it holds no write lock on the
    /// bridge (a poller frozen inside a transaction would make every other
    /// writer wait out its busy timeout): stop it, try the lock briefly, and
    /// if it is held let the poller run a moment and try again.
    pub fn stop_outside_a_transaction(&self, p: &Poller) {
        let conn = rusqlite::Connection::open(self.db()).unwrap();
        conn.busy_timeout(Duration::from_millis(200)).unwrap();
        wait_until(
            "the poller is stopped outside a transaction",
            TIMEOUT,
            || {
                p.signal(libc::SIGSTOP);
                if conn.execute_batch("BEGIN IMMEDIATE; ROLLBACK;").is_ok() {
                    return true;
                }
                p.signal(libc::SIGCONT);
                std::thread::sleep(Duration::from_millis(20));
                false
            },
        );
    }

    /// Open the bridge with the library (as a coordinator or an inspector would).
    pub fn bridge(&self) -> autopoll_bridge::Bridge {
        autopoll_bridge::Bridge::open(self.db()).unwrap()
    }

    /// Send `n` queries from session a (query ids `q-<prefix>-<i>`); returns the ids.
    pub fn send_queries(
        &self,
        conv: &Conversation,
        prefix: &str,
        n: usize,
        question: &str,
    ) -> Vec<String> {
        let mut b = self.bridge();
        (0..n)
            .map(|i| {
                let qid = format!("q-{prefix}-{i}");
                let text = autopoll_bridge::shard::query_text(&qid, question);
                b.send(
                    &conv.id,
                    autopoll_bridge::Session::A,
                    &conv.token_a,
                    &text,
                    None,
                )
                .unwrap();
                qid
            })
            .collect()
    }

    /// Every response to session a: (query_id, full JSON).
    pub fn responses(&self) -> Vec<(String, Value)> {
        let b = self.bridge();
        let mut st = b
            .connection()
            .prepare("SELECT message FROM messages WHERE to_session = 'a' ORDER BY id")
            .unwrap();
        st.query_map([], |r| r.get::<_, String>(0))
            .unwrap()
            .map(|m| {
                // Read as a Python coordinator would (json.loads): a query id
                // with a lone surrogate is written back escaped, as it came.
                let m = m.unwrap();
                let v = autopoll_bridge::shard::parse_lenient(&m)
                    .unwrap_or_else(|| panic!("a response that is not JSON: {m:?}"));
                (v["query_id"].as_str().unwrap_or("").to_string(), v)
            })
            .collect()
    }

    /// Wait until `n` responses exist, then check each id got exactly one.
    pub fn expect_each_answered_once(
        &self,
        ids: &[String],
        timeout: Duration,
    ) -> Vec<(String, Value)> {
        wait_until(&format!("{} responses", ids.len()), timeout, || {
            self.responses().len() >= ids.len()
        });
        let got = self.responses();
        let mut counts = std::collections::HashMap::new();
        for (q, _) in &got {
            *counts.entry(q.clone()).or_insert(0) += 1;
        }
        for id in ids {
            assert_eq!(
                counts.get(id),
                Some(&1),
                "{id} answered {:?} times",
                counts.get(id)
            );
        }
        assert_eq!(got.len(), ids.len(), "responses to unknown queries");
        got
    }

    /// Rows of autopoll_claims still owned by someone.
    pub fn owned_claims(&self) -> i64 {
        self.bridge()
            .connection()
            .query_row(
                "SELECT count(*) FROM autopoll_claims WHERE owner IS NOT NULL",
                [],
                |r| r.get(0),
            )
            .unwrap()
    }

    /// session_status of session b, if any.
    pub fn shard_status(&self, conv: &Conversation) -> Option<String> {
        self.store()
            .session_status(&conv.id, autopoll_bridge::Session::B)
            .unwrap()
            .map(|s| s.status)
    }
}

impl Poller {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid(), sig) };
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let path = self.log.clone();
        wait_child_exit(&mut self.child, timeout, "poller", || {
            std::fs::read_to_string(&path).unwrap_or_default()
        })
    }

    /// kill -9 and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Direct children of `pid`, with their state letter (`Z` = zombie), from /proc.
pub fn children_of(pid: i32) -> Vec<(i32, char)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...; comm may hold spaces, so split after ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let mut f = rest.split_whitespace();
        let state = f.next().and_then(|s| s.chars().next()).unwrap_or('?');
        let ppid: i32 = f.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        if ppid == pid {
            out.push((child, state));
        }
    }
    out
}

/// Whether a process exists (and is not a zombie).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            s.rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next())
                != Some("Z")
        }
        Err(_) => false,
    }
}

/// A test fixture program's path.
pub fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

/// CPU time (user + system) a process has used, in clock ticks.
pub fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = stat.rsplit_once(')').unwrap().1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After "(comm)": state=0 ppid=1 ... utime=11 stime=12.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// A random seed from the clock, printed so a failing run can be replayed.
pub fn seed() -> u64 {
    let s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    println!("seed {s}");
    s
}

/// xorshift64: the next pseudo-random number from `s`.
pub fn rng(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// Wait (bounded) for `child` to exit; its exit code. Panics with what
/// `log` returns when it does not.
pub fn wait_child_exit(
    child: &mut std::process::Child,
    timeout: Duration,
    who: &str,
    log: impl Fn() -> String,
) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code();
        }
        assert!(
            Instant::now() < deadline,
            "{who} did not exit within {timeout:?}: {}",
            log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A child process killed (-9) and reaped when dropped.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The pinned Claude Code CLI (tests/claude-cli/package-lock.json),
/// installed by scripts/install-test-deps.sh once per test process. Panics
/// with npm's message when it cannot be installed: the tests that need the
/// real CLI fail, they never skip.
pub fn claude_bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| install("claude", "the pinned Claude Code CLI"))
}

/// Run scripts/install-test-deps.sh WHAT; its stdout, trimmed (the
/// installed program's path). Panics with the script's message when it
/// fails: the tests that need the outside program fail, they never skip.
fn install(what: &str, label: &str) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/install-test-deps.sh");
    let out = Command::new(script)
        .arg(what)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "installing {label} failed (these tests need it and do not skip):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The venv python with the pinned MCP Python SDK
/// (tests/mcp-client/requirements.txt), installed by
/// scripts/install-test-deps.sh once per test process. Panics with pip's
/// message when it cannot be installed: the tests that need the real SDK
/// fail, they never skip.
pub fn mcp_python() -> &'static str {
    static PY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PY.get_or_init(|| install("mcp", "the pinned MCP Python SDK"))
}

/// The process's PostgreSQL test cluster (or the server AUTOPOLL_TEST_PG
/// names), after scripts/install-test-deps.sh has made sure Debian's
/// server binaries are there. Panics with the reason when PostgreSQL
/// cannot be installed or started: these tests fail, they never skip.
pub fn pg_cluster() -> &'static autopoll_bridge::pg::cluster::Cluster {
    ensure_postgres();
    autopoll_bridge::pg::cluster::Cluster::shared().unwrap_or_else(|e| panic!("{e}"))
}

/// Make sure Debian's PostgreSQL server binaries are installed
/// (scripts/install-test-deps.sh postgres, once per test process; nothing
/// to do when AUTOPOLL_TEST_PG names a server). Panics with the reason.
pub fn ensure_postgres() {
    static INSTALLED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    INSTALLED.get_or_init(|| {
        if std::env::var_os("AUTOPOLL_TEST_PG").is_none() {
            install("postgres", "PostgreSQL");
        }
    });
}
