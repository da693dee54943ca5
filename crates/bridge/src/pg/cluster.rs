//! A private, throwaway PostgreSQL cluster for tests and the bench: Debian's
//! server binaries (`postgresql` package), `initdb` in a temp folder, one
//! `postgres` on 127.0.0.1 at a free port, trust authentication for the
//! user `autopoll`, no fsync. Nothing listens beyond loopback.
//!
//! - [`Cluster::shared`]: one cluster per process, started on first use;
//!   or, when `AUTOPOLL_TEST_PG` holds an admin URL (`.ci/run` starts a
//!   cluster with `scripts/pg-test-cluster.sh` and sets it), that server.
//! - [`Cluster::database`]: a fresh database per test.
//! - The server is started from a thread that lives as long as the
//!   process, with `setpriv --pdeathsig INT`, so it shuts down when the
//!   test process ends, however it ends. Old folders of clusters whose
//!   server is gone are removed at the next start.
//! - As root (initdb refuses root) the cluster runs as the `postgres` user
//!   the Debian package creates.
//!
//! When the binaries are missing, [`Cluster::start`] fails with the
//! command that installs them: tests fail loudly, they never skip.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long a new cluster may take to accept connections.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Where a cluster's server listens (see [`Cluster::start_with`]).
#[derive(Debug, Clone, Default)]
pub struct Listen {
    /// Run the server inside this network namespace (`ip netns exec`);
    /// `None`: the caller's.
    pub netns: Option<String>,
    /// `listen_addresses` (default `127.0.0.1`).
    pub addresses: Option<String>,
    /// Extra `pg_hba.conf` lines (e.g. trust for a private range).
    pub hba: Vec<String>,
    /// Serve TLS too, with a self-signed certificate made for the cluster
    /// (`openssl req`; CN and names `localhost`, `127.0.0.1`), which
    /// [`Cluster::ssl_cert`] gives clients as their root certificate.
    pub ssl: bool,
}

/// A running cluster (or the server `AUTOPOLL_TEST_PG` names).
#[derive(Debug)]
pub struct Cluster {
    /// `postgres://autopoll@127.0.0.1:PORT/` (add a database name).
    pub base_url: String,
    /// Its port.
    pub port: u16,
    /// Its data folder (None for an outside server).
    pub data: Option<PathBuf>,
    child: Option<Mutex<Child>>,
    bin: PathBuf,
    listen: Listen,
}

fn pg_bin_dir() -> Result<PathBuf, String> {
    if let Ok(d) = std::env::var("AUTOPOLL_PG_BIN") {
        return Ok(PathBuf::from(d));
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, p)| p).ok_or_else(|| {
        "PostgreSQL's server binaries were not found (no /usr/lib/postgresql/*/bin/initdb); \
         install Debian's postgresql package: `scripts/install-test-deps.sh postgres` \
         (or set AUTOPOLL_PG_BIN to the folder holding initdb and postgres)"
            .to_string()
    })
}

fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("no free port: {e}"))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The command `bin` run as the cluster's owner.
fn as_owner(bin: &Path, pdeathsig: bool) -> Command {
    let mut c = Command::new("setpriv");
    if is_root() {
        c.args(["--reuid=postgres", "--regid=postgres", "--clear-groups"]);
    }
    if pdeathsig {
        c.arg("--pdeathsig=INT");
    }
    c.arg(bin);
    c
}

/// Remove folders of earlier clusters whose server is no longer running.
fn reap_old(root: &Path) {
    let Ok(rd) = std::fs::read_dir(root) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with("autopoll-pg-") {
            continue;
        }
        let pid_file = e.path().join("data/postmaster.pid");
        let alive = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.lines().next()?.trim().parse::<u32>().ok())
            .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        let age_ok = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|a| a > Duration::from_secs(60));
        if !alive && age_ok {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

impl Cluster {
    /// The process's cluster, started on first use (see the module doc).
    pub fn shared() -> Result<&'static Cluster, String> {
        static SHARED: OnceLock<Result<Cluster, String>> = OnceLock::new();
        SHARED
            .get_or_init(|| {
                if let Ok(url) = std::env::var("AUTOPOLL_TEST_PG") {
                    return Cluster::outside(&url);
                }
                // Started from a thread that never ends, so the server's
                // parent-death signal fires only when the process ends.
                let (tx, rx) = std::sync::mpsc::channel();
                std::thread::Builder::new()
                    .name("pg-cluster".into())
                    .spawn(move || {
                        let _ = tx.send(Cluster::start());
                        loop {
                            std::thread::park();
                        }
                    })
                    .map_err(|e| format!("cannot start the pg-cluster thread: {e}"))?;
                rx.recv_timeout(START_TIMEOUT + Duration::from_secs(30))
                    .map_err(|_| "the PostgreSQL test cluster did not start in time".to_string())?
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    fn outside(url: &str) -> Result<Cluster, String> {
        let cfg: postgres::Config = url
            .parse()
            .map_err(|e| format!("AUTOPOLL_TEST_PG={url:?} is not a PostgreSQL URL: {e}"))?;
        let port = cfg.get_ports().first().copied().unwrap_or(5432);
        let base = url.rsplit_once('/').map(|(b, _)| b).unwrap_or(url);
        Ok(Cluster {
            base_url: format!("{base}/"),
            port,
            data: None,
            child: None,
            bin: PathBuf::new(),
            listen: Listen::default(),
        })
    }

    /// Start a new cluster in a new folder under the temp dir, on loopback.
    pub fn start() -> Result<Cluster, String> {
        Cluster::start_with(Listen::default())
    }

    /// [`Cluster::start`], listening as `listen` says. The server's Unix
    /// socket is in the cluster's folder, and [`Cluster::base_url`] uses
    /// it when the server runs in another network namespace (the file
    /// system is shared; the network is not).
    pub fn start_with(listen: Listen) -> Result<Cluster, String> {
        let bin = pg_bin_dir()?;
        let root = std::env::temp_dir();
        reap_old(&root);
        let dir = tempdir_in(&root)?;
        let data = dir.join("data");
        std::fs::create_dir(&data).map_err(|e| format!("mkdir {}: {e}", data.display()))?;
        if is_root() {
            let st = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .status()
                .map_err(|e| format!("chown: {e}"))?;
            if !st.success() {
                return Err(format!(
                    "cannot give {} to the postgres user (is Debian's postgresql package installed? \
                     `scripts/install-test-deps.sh postgres`)",
                    dir.display()
                ));
            }
        }
        let out = as_owner(&bin.join("initdb"), false)
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "autopoll",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--locale=C",
            ])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run initdb (setpriv {}): {e}", bin.display()))?;
        if !out.status.success() {
            return Err(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        if listen.ssl {
            // A CA of the cluster's own, and a server certificate it signs
            // (a self-signed CA used as the server's certificate is
            // refused by certificate checkers).
            let run = |args: &[&str]| -> Result<(), String> {
                let out = Command::new("openssl")
                    .args(args)
                    .current_dir(&dir)
                    .stdin(Stdio::null())
                    .output()
                    .map_err(|e| format!("cannot run openssl for the test certificate: {e}"))?;
                if out.status.success() {
                    Ok(())
                } else {
                    Err(format!(
                        "openssl {} failed: {}",
                        args.first().unwrap_or(&""),
                        String::from_utf8_lossy(&out.stderr).trim()
                    ))
                }
            };
            run(&[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=autopoll test CA",
                "-keyout",
                "ca.key",
                "-out",
                "root.crt",
            ])?;
            run(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                "/CN=localhost",
                "-keyout",
                "data/server.key",
                "-out",
                "server.csr",
            ])?;
            std::fs::write(
                dir.join("server.ext"),
                "basicConstraints=CA:FALSE\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
            )
            .map_err(|e| format!("server.ext: {e}"))?;
            run(&[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "root.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                "server.ext",
                "-out",
                "data/server.crt",
            ])?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(
                data.join("server.key"),
                std::fs::Permissions::from_mode(0o600),
            )
            .map_err(|e| format!("server.key: {e}"))?;
            if is_root() {
                let _ = Command::new("chown")
                    .args(["postgres:postgres"])
                    .arg(data.join("server.key"))
                    .arg(data.join("server.crt"))
                    .status();
            }
        }
        if !listen.hba.is_empty() {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(data.join("pg_hba.conf"))
                .map_err(|e| format!("pg_hba.conf: {e}"))?;
            for l in &listen.hba {
                writeln!(f, "{l}").map_err(|e| format!("pg_hba.conf: {e}"))?;
            }
        }
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port()?;
            let child = spawn_server(&bin, &dir, &data, port, &listen)?;
            let base_url = match &listen.netns {
                None => format!("postgres://autopoll@127.0.0.1:{port}/"),
                Some(_) => format!(
                    "postgres://autopoll@{}:{port}/",
                    dir.to_string_lossy().replace('/', "%2F")
                ),
            };
            let mut c = Cluster {
                base_url,
                port,
                data: Some(data.clone()),
                child: Some(Mutex::new(child)),
                bin: bin.clone(),
                listen: listen.clone(),
            };
            match c.wait_ready() {
                Ok(()) => return Ok(c),
                Err(e) => {
                    last = e;
                    c.kill();
                }
            }
        }
        Err(format!(
            "the PostgreSQL test cluster did not start: {last}; its log: {}",
            std::fs::read_to_string(dir.join("server.log")).unwrap_or_default()
        ))
    }

    /// Stop the server and start it again on the same data and port (a
    /// PostgreSQL restart, as an operator's would be). The server is a
    /// child of the calling thread from then on.
    pub fn restart(&mut self) -> Result<(), String> {
        let data = self.data.clone().ok_or("not a cluster of ours")?;
        let dir = data.parent().ok_or("no folder")?.to_path_buf();
        self.stop();
        let child = spawn_server(&self.bin, &dir, &data, self.port, &self.listen)?;
        self.child = Some(Mutex::new(child));
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(ch) = &self.child
                && let Ok(Some(st)) = ch
                    .lock()
                    .map_err(|_| ())
                    .and_then(|mut c| c.try_wait().map_err(|_| ()))
            {
                return Err(format!("postgres exited ({st})"));
            }
            match self.admin() {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// With [`Listen::ssl`]: the server's certificate, to give clients as
    /// `sslrootcert`.
    pub fn ssl_cert(&self) -> Option<PathBuf> {
        if !self.listen.ssl {
            return None;
        }
        Some(self.data.as_ref()?.parent()?.join("root.crt"))
    }

    /// A connection to the `postgres` database as the cluster's superuser.
    pub fn admin(&self) -> Result<postgres::Client, String> {
        let mut cfg: postgres::Config = format!("{}postgres", self.base_url)
            .parse()
            .map_err(|e| format!("{e}"))?;
        cfg.connect_timeout(Duration::from_secs(5));
        cfg.connect(postgres::NoTls)
            .map_err(|e| format!("cannot connect to the test cluster: {e}"))
    }

    /// A new empty database; returns its URL.
    pub fn database(&self) -> Result<String, String> {
        static N: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "t{}_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            crate::clock::unix_ms() % 1_000_000
        );
        let mut admin = self.admin()?;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .map_err(|e| format!("CREATE DATABASE {name}: {e}"))?;
        Ok(format!("{}{name}", self.base_url))
    }

    /// Stop the server now (SIGINT: a fast shutdown) and wait for it.
    pub fn stop(&self) {
        if let Some(ch) = &self.child
            && let Ok(mut c) = ch.lock()
        {
            signal(c.id(), 2);
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn kill(&mut self) {
        if let Some(ch) = self.child.take()
            && let Ok(mut c) = ch.into_inner()
        {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn_server(
    bin: &Path,
    dir: &Path,
    data: &Path,
    port: u16,
    listen: &Listen,
) -> Result<Child, String> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("server.log"))
        .map_err(|e| format!("server.log: {e}"))?;
    let mut c = match &listen.netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "setpriv"]);
            if is_root() {
                c.args(["--reuid=postgres", "--regid=postgres", "--clear-groups"]);
            }
            c.arg("--pdeathsig=INT").arg(bin.join("postgres"));
            c
        }
        None => as_owner(&bin.join("postgres"), true),
    };
    let addresses = listen.addresses.as_deref().unwrap_or("127.0.0.1");
    if listen.ssl {
        c.args(["-c", "ssl=on"]);
    }
    c.arg("-D")
        .arg(data)
        .args(["-p", &port.to_string(), "-k"])
        .arg(dir)
        .args([
            "-c",
            &format!("listen_addresses={addresses}"),
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "max_connections=300",
            "-c",
            "shared_buffers=64MB",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start postgres: {e}"))
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) with a pid we spawned; errors are ignored (it is gone).
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

fn tempdir_in(root: &Path) -> Result<PathBuf, String> {
    for i in 0..100u32 {
        let p = root.join(format!(
            "autopoll-pg-{}-{}-{i}",
            std::process::id(),
            crate::clock::unix_ms()
        ));
        match std::fs::create_dir(&p) {
            Ok(()) => return Ok(p),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(format!("mkdir {}: {e}", p.display())),
        }
    }
    Err("cannot make a folder for the test cluster".into())
}
