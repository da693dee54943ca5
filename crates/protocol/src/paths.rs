//! Where servers live: a private runtime directory, one subdirectory per
//! server name.
//!
//! ```text
//! $XDG_RUNTIME_DIR/autopoll/        (else /tmp/autopoll-$UID), mode 0700
//!   <name>/                         mode 0700
//!     requests                      the shared request FIFO, mode 0600: hello frames only
//!     lock                          flock(2)ed by the running server
//!     pid                           the running server's pid (for shell clients)
//!     clients/                      mode 0700: clients' private FIFO pairs
//! ```

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The runtime directory: `explicit` if given, else `$XDG_RUNTIME_DIR/autopoll`,
/// else `/tmp/autopoll-$UID`.
pub fn runtime_dir(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(x) if !x.is_empty() => PathBuf::from(x).join("autopoll"),
        // SAFETY: getuid cannot fail.
        _ => PathBuf::from(format!("/tmp/autopoll-{}", unsafe { libc::getuid() })),
    }
}

/// A server name: 1-64 of `[A-Za-z0-9_.-]`, not starting with a dot.
pub fn validate_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid server name {name:?}: use 1-64 letters, digits, `_`, `-` or `.`, not starting with `.`"
        ))
    }
}

/// The files of one named server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerPaths {
    /// The runtime directory.
    pub runtime: PathBuf,
    /// The server's name.
    pub name: String,
    /// `<runtime>/<name>`.
    pub dir: PathBuf,
}

impl ServerPaths {
    /// Paths of server `name` under `runtime` (nothing is created).
    pub fn new(runtime: &Path, name: &str) -> Result<ServerPaths, String> {
        validate_name(name)?;
        let runtime = if runtime.is_absolute() {
            runtime.to_path_buf()
        } else {
            std::env::current_dir()
                .map_err(|e| format!("cannot resolve {}: {e}", runtime.display()))?
                .join(runtime)
        };
        Ok(ServerPaths {
            dir: runtime.join(name),
            runtime,
            name: name.to_string(),
        })
    }

    /// The shared request FIFO.
    pub fn requests(&self) -> PathBuf {
        self.dir.join("requests")
    }

    /// The lock file.
    pub fn lock(&self) -> PathBuf {
        self.dir.join("lock")
    }

    /// The pid file.
    pub fn pid(&self) -> PathBuf {
        self.dir.join("pid")
    }

    /// The directory for clients' FIFO pairs.
    pub fn clients(&self) -> PathBuf {
        self.dir.join("clients")
    }

    /// Create (or check and tighten) the runtime dir, the server dir and the
    /// clients dir, each mode 0700 and ours.
    pub fn create_private(&self) -> io::Result<()> {
        if let Some(parent) = self.runtime.parent() {
            std::fs::create_dir_all(parent)?;
        }
        for d in [&self.runtime, &self.dir, &self.clients()] {
            ensure_private_dir(d)?;
        }
        Ok(())
    }
}

/// Make `path` a directory of ours with mode 0700: create it if missing;
/// refuse a symlink, a non-directory or someone else's; tighten a looser mode.
pub fn ensure_private_dir(path: &Path) -> io::Result<()> {
    let refuse = |why: String| {
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{}: {why}", path.display()),
        )
    };
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            match std::fs::DirBuilder::new().mode(0o700).create(path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    return ensure_private_dir(path);
                }
                Err(e) => return Err(e),
            }
            // The umask may have removed bits we want, never added: set exactly.
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
        }
        Err(e) => Err(e),
        Ok(md) => {
            if md.file_type().is_symlink() {
                return Err(refuse(
                    "is a symlink; refusing to use it as a runtime directory".into(),
                ));
            }
            if !md.is_dir() {
                return Err(refuse("exists and is not a directory".into()));
            }
            // SAFETY: geteuid cannot fail.
            let me = unsafe { libc::geteuid() };
            if md.uid() != me {
                return Err(refuse(format!(
                    "is owned by uid {}, not by us ({me})",
                    md.uid()
                )));
            }
            if md.mode() & 0o077 != 0 {
                log::warn!(
                    "{} had mode {:o}; setting 0700 so only you can reach the server",
                    path.display(),
                    md.mode() & 0o777
                );
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["default", "shard-1", "a.b_c", "X"] {
            validate_name(ok).unwrap();
        }
        for bad in ["", ".hidden", "a/b", "..", "sp ace", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn layout_and_private_modes() {
        let t = tempfile::tempdir().unwrap();
        let rt = t.path().join("run/autopoll");
        let p = ServerPaths::new(&rt, "default").unwrap();
        p.create_private().unwrap();
        for d in [&rt, &p.dir, &p.clients()] {
            let mode = std::fs::metadata(d).unwrap().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", d.display());
        }
        assert_eq!(p.requests(), rt.join("default/requests"));
        // A loosened dir is tightened again.
        std::fs::set_permissions(&p.dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        p.create_private().unwrap();
        assert_eq!(std::fs::metadata(&p.dir).unwrap().mode() & 0o777, 0o700);
    }

    #[test]
    fn symlinked_runtime_dir_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let real = t.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let p = ServerPaths::new(&link, "x").unwrap();
        assert!(p.create_private().is_err());
    }

    #[test]
    fn default_runtime_dir() {
        assert_eq!(runtime_dir(Some(Path::new("/x"))), PathBuf::from("/x"));
        let d = runtime_dir(None);
        assert!(d.ends_with("autopoll") || d.to_string_lossy().starts_with("/tmp/autopoll-"));
    }
}
