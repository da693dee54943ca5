//! The tokens file of a poller that serves many conversations
//! (`autopoll-poller --tokens-file FILE`), and the SIGHUP that asks for it to
//! be read again.
//!
//! One line per conversation, `CONVERSATION_ID TOKEN` (separated by spaces
//! or tabs); blank lines and lines starting with `#` are ignored. The file
//! holds tokens, so it is refused unless it belongs to the user running the
//! poller and has no group or other permission bits (`chmod 600`). It is
//! read once at start, and again whenever it is written, replaced, removed
//! or chmod-ed (inotify on its folder, [`crate::watch`]) or on SIGHUP
//! ([`Hangup`]). A file that cannot be used (a bad line, a bad mode, gone)
//! leaves the previous set of conversations in force; the error names the
//! line and the fix.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};

/// Largest tokens file read (a line per conversation; 1 MiB is thousands).
pub const MAX_BYTES: u64 = 1024 * 1024;

/// One conversation to serve, with its session's token.
#[derive(Clone, PartialEq, Eq)]
pub struct Entry {
    /// The conversation id.
    pub conversation: String,
    /// The served session's token.
    pub token: String,
}

impl fmt::Debug for Entry {
    // The token stays out of logs and panics.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("conversation", &self.conversation)
            .field("token", &"<hidden>")
            .finish()
    }
}

/// Why a tokens file was not used.
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    /// It cannot be opened or read.
    #[error(
        "cannot read the tokens file {path}: {source}; give a file with one `CONVERSATION_ID TOKEN` a line"
    )]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// Group or others may read it.
    #[error(
        "the tokens file {path} has mode {mode:04o}, but it holds tokens: group and others must \
         have no access. Run `chmod 600 {path}`"
    )]
    Mode {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Somebody else owns it.
    #[error(
        "the tokens file {path} belongs to uid {owner}, not to this user (uid {me}); run \
         `chown {me} {path}` (as root), or use a file of your own"
    )]
    Owner {
        /// The file.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// Our uid.
        me: u32,
    },
    /// A line is not `CONVERSATION_ID TOKEN`.
    #[error("the tokens file {path}, line {line}: {why}")]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong and how to write it.
        why: String,
    },
}

/// Read and check the tokens file at `path`.
pub fn load(path: &Path) -> Result<Vec<Entry>, TokensError> {
    let io_err = |source| TokensError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io_err)?;
    // The checks are on the file opened, not on whatever the path names later.
    let meta = file.metadata().map_err(io_err)?;
    if !meta.is_file() {
        return Err(io_err(io::Error::other("not a regular file")));
    }
    // SAFETY: plain syscall without arguments.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(TokensError::Owner {
            path: path.to_path_buf(),
            owner: meta.uid(),
            me,
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(TokensError::Mode {
            path: path.to_path_buf(),
            mode,
        });
    }
    if meta.len() > MAX_BYTES {
        return Err(io_err(io::Error::other(format!(
            "it is {} bytes; at most {MAX_BYTES} are read",
            meta.len()
        ))));
    }
    let mut text = String::new();
    file.take(MAX_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(io_err)?;
    parse(path, &text)
}

/// Parse the text of a tokens file (`path` only names it in errors).
pub fn parse(path: &Path, text: &str) -> Result<Vec<Entry>, TokensError> {
    let bad = |line: usize, why: String| TokensError::Line {
        path: path.to_path_buf(),
        line,
        why,
    };
    let mut out: Vec<Entry> = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let t = raw.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = t.split_whitespace().collect();
        let [conversation, token] = fields.as_slice() else {
            return Err(bad(
                line,
                format!(
                    "expected `CONVERSATION_ID TOKEN` (two fields), found {} field{}; a comment \
                     line starts with #",
                    fields.len(),
                    if fields.len() == 1 { "" } else { "s" }
                ),
            ));
        };
        if let Some(c) = conversation
            .chars()
            .chain(token.chars())
            .find(|c| c.is_control())
        {
            return Err(bad(
                line,
                format!("a control character ({c:?}); write plain text"),
            ));
        }
        if let Some(first) = seen.insert(conversation.to_string(), line) {
            return Err(bad(
                line,
                format!(
                    "conversation {conversation} is already on line {first}; keep one line per conversation"
                ),
            ));
        }
        out.push(Entry {
            conversation: conversation.to_string(),
            token: token.to_string(),
        });
    }
    Ok(out)
}

/// The write end of the SIGHUP pipe, for the signal handler (-1: none).
static HANGUP_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_hangup(_: libc::c_int) {
    let fd = HANGUP_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let b = b"h";
        // SAFETY: write(2) is async-signal-safe; a full pipe just drops the byte
        // (a reload is already pending then).
        unsafe { libc::write(fd, b.as_ptr().cast(), 1) };
    }
}

/// SIGHUP as a readable descriptor: after [`Hangup::install`], each SIGHUP
/// makes [`Hangup::fd`] readable until [`Hangup::drain`]. It replaces any
/// earlier SIGHUP disposition (so SIGHUP no longer stops the process).
#[derive(Clone, Debug)]
pub struct Hangup {
    read: Arc<OwnedFd>,
}

impl Hangup {
    /// Install the SIGHUP handler (once per process).
    pub fn install() -> io::Result<Hangup> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: valid array of two descriptors.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh descriptors we own; the write end lives for the process.
        let read = unsafe { OwnedFd::from_raw_fd(fds[0]) };
        let old = HANGUP_FD.swap(fds[1], Ordering::SeqCst);
        if old >= 0 {
            // SAFETY: our own earlier write end.
            unsafe { libc::close(old) };
        }
        // SAFETY: a zeroed sigaction with a handler that only calls write(2).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_hangup as *const () as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(libc::SIGHUP, &sa, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(Hangup {
            read: Arc::new(read),
        })
    }

    /// The descriptor to poll for POLLIN.
    pub fn fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }

    /// Empty the pipe (after it was readable).
    pub fn drain(&self) {
        let mut buf = [0u8; 64];
        // SAFETY: reading into a valid buffer from our non-blocking fd.
        while unsafe { libc::read(self.fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn p() -> &'static Path {
        Path::new("/t/tokens")
    }

    #[test]
    fn lines_comments_and_blanks() {
        let got = parse(p(), "# shards\n\nconv_a  tok1\n\tconv_b\ttok2  \n").unwrap();
        assert_eq!(
            got,
            vec![
                Entry {
                    conversation: "conv_a".into(),
                    token: "tok1".into()
                },
                Entry {
                    conversation: "conv_b".into(),
                    token: "tok2".into()
                }
            ]
        );
        assert!(parse(p(), "").unwrap().is_empty());
    }

    #[test]
    fn a_bad_line_is_named_by_number() {
        let e = parse(p(), "a t\n# c\nb\n").unwrap_err().to_string();
        assert!(
            e.contains("line 3") && e.contains("CONVERSATION_ID TOKEN"),
            "{e}"
        );
        let e = parse(p(), "a t x\n").unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("3 fields"), "{e}");
        let e = parse(p(), "a t\na u\n").unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("line 1"), "{e}");
    }

    #[test]
    fn group_or_other_bits_are_refused_with_the_chmod_fix() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("tokens");
        std::fs::write(&f, "a t\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load(&f).unwrap_err();
        assert!(matches!(e, TokensError::Mode { mode: 0o644, .. }), "{e}");
        assert!(e.to_string().contains("chmod 600"), "{e}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(load(&f).unwrap().len(), 1);
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(load(&f).unwrap().len(), 1);
    }

    #[test]
    fn the_token_is_not_in_debug_output() {
        let e = Entry {
            conversation: "c".into(),
            token: "sekrit".into(),
        };
        assert!(!format!("{e:?}").contains("sekrit"));
    }
}
