//! Hellos on the shared `requests` FIFO: reading them without ever waiting
//! on one writer, and vetting the FIFO pair each one names.
//!
//! **Reading.** Any process of the user can write to `requests`, and a pipe
//! does not say who wrote what. An honest client writes its whole hello,
//! newline included, in one `write(2)` of at most `PIPE_BUF` bytes, which the
//! kernel never interleaves with other writes. A slow or hostile writer
//! (half a hello then silence, a byte at a time) leaves bytes without a
//! newline in front of the next honest hello, in the same "line". So
//! [`HelloStream`] never waits for a line to complete, keeps only the last
//! `MAX_HELLO` bytes of an unfinished one, and [`parse`] takes a line that
//! is not a hello as a whole for garbage followed by a hello: it decodes the
//! suffixes starting at the last `{` characters. An honest hello is always
//! such a suffix, so a partial writer can spoil only its own bytes.
//!
//! **Vetting** ([`vet`]). Each path must name an entry directly in the
//! server's `clients/` folder (looked up through a held descriptor of that
//! folder, see [`FifoDir`]), be a FIFO, owned by us, private, not a symlink;
//! the two must be distinct, neither may be the shared `requests` FIFO, and
//! neither may belong to a live session. A refused hello gets an `invalid`
//! error only when its reply FIFO passed every check (so the error cannot
//! land in someone else's stream); otherwise it is dropped and logged.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Component, Path, PathBuf};

use autopoll_protocol::fifo::{FifoDir, FileId, Fill};
use autopoll_protocol::{Hello, MAX_HELLO, Request, frame};

/// How many suffixes of a spoiled line are tried as a hello.
const SUFFIX_TRIES: usize = 16;

/// Reads the shared FIFO into lines, never waiting and never holding more
/// than `MAX_HELLO` bytes of an unfinished line.
pub(crate) struct HelloStream {
    file: File,
    partial: Vec<u8>,
    chunk: Vec<u8>,
}

impl HelloStream {
    pub(crate) fn new(file: File) -> HelloStream {
        HelloStream {
            file,
            partial: Vec::with_capacity(MAX_HELLO),
            chunk: vec![0; 64 * 1024],
        }
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// One non-blocking read; complete lines (without their newline, each
    /// at most `MAX_HELLO - 1` bytes: the tail of a longer one) go to `out`.
    pub(crate) fn fill(&mut self, out: &mut Vec<Vec<u8>>) -> io::Result<Fill> {
        let n = loop {
            match (&self.file).read(&mut self.chunk) {
                Ok(0) => return Ok(Fill::Eof),
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Fill::WouldBlock),
                Err(e) => return Err(e),
            }
        };
        let keep = MAX_HELLO - 1;
        let mut rest = &self.chunk[..n];
        while !rest.is_empty() {
            match rest.iter().position(|&b| b == b'\n') {
                Some(pos) => {
                    self.partial.extend_from_slice(&rest[..pos]);
                    let start = self.partial.len().saturating_sub(keep);
                    out.push(self.partial[start..].to_vec());
                    self.partial.clear();
                    rest = &rest[pos + 1..];
                }
                None => {
                    self.partial.extend_from_slice(rest);
                    rest = &[];
                }
            }
            if self.partial.len() > keep {
                let drop = self.partial.len() - keep;
                self.partial.drain(..drop);
            }
        }
        Ok(Fill::Data(n))
    }

    /// Bytes of an unfinished line held (for tests and logs).
    #[cfg(test)]
    pub(crate) fn pending(&self) -> usize {
        self.partial.len()
    }
}

/// A line from the shared FIFO as a hello. `Ok((hello, junk))`: `junk` is
/// how many bytes of someone's unfinished frame came before it.
pub(crate) fn parse(line: &[u8]) -> Result<(Hello, usize), String> {
    let whole = match frame::decode::<Request>(line) {
        Ok(Request::Hello(h)) => return Ok((h, 0)),
        Ok(_) => "only hello frames belong on the shared FIFO".to_string(),
        Err(e) => e.to_string(),
    };
    let starts = line
        .iter()
        .enumerate()
        .rev()
        .filter(|&(i, &b)| b == b'{' && i > 0)
        .map(|(i, _)| i)
        .take(SUFFIX_TRIES);
    for i in starts {
        if let Ok(Request::Hello(h)) = frame::decode::<Request>(&line[i..]) {
            return Ok((h, i));
        }
    }
    Err(whole)
}

/// A hello whose pair passed every check: the entries' names in `clients/`
/// and their identities (registered as in use until the session ends).
#[derive(Debug)]
pub(crate) struct Vetted {
    pub(crate) hello: Hello,
    pub(crate) request: OsString,
    pub(crate) reply: OsString,
    pub(crate) ids: [FileId; 2],
}

/// Why a hello was refused, and where (if anywhere) that may be said.
#[derive(Debug)]
pub(crate) struct Refused {
    pub(crate) hello: Hello,
    pub(crate) reason: String,
    /// The reply FIFO, when it passed every check of its own.
    pub(crate) reply_to: Option<(OsString, FileId)>,
}

/// What [`vet`] compares against.
pub(crate) struct Rules<'a> {
    /// The server's `clients/` folder, held open.
    pub(crate) clients: &'a FifoDir,
    /// Its canonical path.
    pub(crate) clients_canon: &'a Path,
    /// The shared `requests` FIFO's path and identity.
    pub(crate) requests: &'a Path,
    pub(crate) requests_id: FileId,
    /// FIFOs held by live sessions.
    pub(crate) in_use: &'a HashSet<FileId>,
}

fn vet_one(which: &str, path: &Path, rules: &Rules) -> Result<(OsString, FileId), String> {
    let shown = path.display();
    if path == rules.requests || FileId::of_path(path).is_ok_and(|id| id == rules.requests_id) {
        return Err(format!(
            "{which} {shown} is the server's shared `requests` FIFO; name a FIFO of your own in {}",
            rules.clients_canon.display()
        ));
    }
    if !path.is_absolute() {
        return Err(format!("{which} {shown} is not an absolute path"));
    }
    let name = match path.components().next_back() {
        Some(Component::Normal(n))
            if path
                .as_os_str()
                .as_encoded_bytes()
                .ends_with(n.as_encoded_bytes()) =>
        {
            n.to_os_string()
        }
        _ => return Err(format!("{which} {shown} does not end in a file name")),
    };
    let parent = path.parent().unwrap_or(Path::new("/"));
    let in_clients = std::fs::canonicalize(parent).is_ok_and(|p| p == rules.clients_canon);
    if !in_clients {
        return Err(format!(
            "{which} {shown} is not directly in the server's clients folder {}",
            rules.clients_canon.display()
        ));
    }
    let id = rules
        .clients
        .check(&name)
        .map_err(|e| format!("{which}: {e}"))?;
    if id == rules.requests_id {
        return Err(format!(
            "{which} {shown} is a link to the server's shared `requests` FIFO"
        ));
    }
    if rules.in_use.contains(&id) {
        return Err(format!(
            "{which} {shown} belongs to a live session; make a new pair for each connection"
        ));
    }
    Ok((name, id))
}

/// Check the pair a hello names (module docs).
pub(crate) fn vet(hello: Hello, rules: &Rules) -> Result<Vetted, Box<Refused>> {
    let refuse = |hello: Hello, reason: String, reply_to| {
        Err(Box::new(Refused {
            hello,
            reason,
            reply_to,
        }))
    };
    let reply = match vet_one("reply_fifo", &hello.reply_fifo, rules) {
        Ok(r) => r,
        Err(why) => return refuse(hello, why, None),
    };
    let request = match vet_one("request_fifo", &hello.request_fifo, rules) {
        Ok(r) => r,
        Err(why) => return refuse(hello, why, Some(reply)),
    };
    if request.1 == reply.1 {
        let why = format!(
            "request_fifo and reply_fifo are the same FIFO ({}); name two distinct FIFOs",
            PathBuf::from(&hello.reply_fifo).display()
        );
        return refuse(hello, why, Some(reply));
    }
    Ok(Vetted {
        hello,
        ids: [request.1, reply.1],
        request: request.0,
        reply: reply.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use autopoll_protocol::fifo;

    fn hello_line(req: &str, rep: &str) -> Vec<u8> {
        let mut v = frame::encode(&Request::Hello(Hello {
            version: 1,
            client: "t".into(),
            request_fifo: req.into(),
            reply_fifo: rep.into(),
        }));
        v.pop();
        v
    }

    #[test]
    fn a_hello_behind_junk_is_recovered() {
        let h = hello_line("/c/a.req", "/c/a.rep");
        assert_eq!(parse(&h).unwrap().1, 0);
        for junk in [
            &b"{\"type\":\"hel"[..],
            b"{",
            b"{\"type\":\"hello\",\"version\":1,\"request_fifo\":\"/x\",\"reply_fifo\":",
            b"{\"a\":\"",
            b"\xff\xfe{{{",
        ] {
            let mut line = junk.to_vec();
            line.extend_from_slice(&h);
            let (got, at) = parse(&line).unwrap_or_else(|e| panic!("{junk:?}: {e}"));
            assert_eq!(got.request_fifo, PathBuf::from("/c/a.req"));
            assert_eq!(at, junk.len());
        }
        assert!(parse(b"{\"type\":\"bye\"}").is_err());
        assert!(parse(b"garbage").is_err());
    }

    #[test]
    fn the_stream_keeps_at_most_a_hello_of_an_unfinished_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        fifo::mkfifo(&p, 0o600).unwrap();
        let mut s = HelloStream::new(fifo::open_fifo(&p, false).unwrap());
        let w = fifo::open_fifo(&p, true).unwrap();
        let soon = std::time::Instant::now() + std::time::Duration::from_secs(10);
        fifo::write_all(&w, &vec![b'x'; 3 * MAX_HELLO], soon).unwrap();
        let mut lines = Vec::new();
        while s.pending() < MAX_HELLO - 1 {
            s.fill(&mut lines).unwrap();
        }
        assert!(lines.is_empty());
        assert_eq!(s.pending(), MAX_HELLO - 1);
        let mut h = hello_line("/c/a.req", "/c/a.rep");
        h.push(b'\n');
        fifo::write_all(&w, &h, soon).unwrap();
        while lines.is_empty() {
            s.fill(&mut lines).unwrap();
        }
        assert_eq!(lines[0].len(), MAX_HELLO - 1);
        assert_eq!(
            parse(&lines[0]).unwrap().0.reply_fifo,
            PathBuf::from("/c/a.rep")
        );
        assert_eq!(s.pending(), 0);
    }
}
