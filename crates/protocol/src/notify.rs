//! systemd's notify protocol (`sd_notify(3)`), for `Type=notify` units with
//! `WatchdogSec=`: one datagram per message on the socket named by
//! `NOTIFY_SOCKET` (a path, or `@name` in Linux's abstract namespace).
//!
//! - [`NotifyConfig::from_env`] reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and
//!   `WATCHDOG_PID` (the binaries call it; the libraries take the config).
//! - [`Notifier`] sends `READY=1`, `WATCHDOG=1`, `STATUS=...` and
//!   `STOPPING=1`. With no `NOTIFY_SOCKET` it does nothing. It never blocks
//!   (the socket is non-blocking) and never fails its caller: a send that does
//!   not go through is logged (once as a warning, then at debug level).
//!
//! Watchdog pings come only from a main loop, once per iteration, so a loop
//! that hangs (or a process that is stopped) stops pinging and systemd kills
//! and restarts it. [`Notifier::wake_within`] tells the loop how long it may
//! sleep so pings keep flowing while idle: half the watchdog interval.
//! [`Notifier::watchdog`] sends at most one ping per quarter interval, so a
//! busy loop does not flood the socket.

use std::ffi::OsString;
use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::{Duration, Instant};

/// Where to notify and how often the watchdog wants a ping. Plain data,
/// read from the environment once by a binary.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NotifyConfig {
    /// The value of `NOTIFY_SOCKET`: an absolute path, or `@` and an abstract name.
    pub socket: Option<OsString>,
    /// The watchdog interval (`WATCHDOG_USEC`), when it applies to this process.
    pub watchdog: Option<Duration>,
}

impl NotifyConfig {
    /// Read `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` (the watchdog
    /// applies only when `WATCHDOG_PID` is unset or is our pid).
    pub fn from_env() -> NotifyConfig {
        NotifyConfig::from_vars(
            std::env::var_os("NOTIFY_SOCKET"),
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
            std::process::id(),
        )
    }

    /// The same from given values (for tests).
    pub fn from_vars(
        socket: Option<OsString>,
        watchdog_usec: Option<&str>,
        watchdog_pid: Option<&str>,
        my_pid: u32,
    ) -> NotifyConfig {
        let socket = socket.filter(|s| !s.is_empty());
        let for_us = watchdog_pid.is_none_or(|p| p.trim().parse::<u32>().ok() == Some(my_pid));
        let watchdog = watchdog_usec
            .and_then(|u| u.trim().parse::<u64>().ok())
            .filter(|&u| u > 0 && for_us && socket.is_some())
            .map(Duration::from_micros);
        NotifyConfig { socket, watchdog }
    }
}

/// Sends notifications to systemd (or to whoever set `NOTIFY_SOCKET`).
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    watchdog: Option<Duration>,
    last_ping: Option<Instant>,
    warned: bool,
}

fn address(socket: &OsString) -> io::Result<SocketAddr> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = socket.as_bytes();
    match bytes.first() {
        Some(b'@') => {
            #[cfg(target_os = "linux")]
            {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(&bytes[1..])
            }
            #[cfg(not(target_os = "linux"))]
            {
                Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "abstract socket names exist only on Linux",
                ))
            }
        }
        Some(b'/') => SocketAddr::from_pathname(socket),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "NOTIFY_SOCKET is neither an absolute path nor an @abstract name",
        )),
    }
}

impl Notifier {
    /// A notifier that does nothing.
    pub fn disabled() -> Notifier {
        Notifier {
            target: None,
            watchdog: None,
            last_ping: None,
            warned: false,
        }
    }

    /// A notifier for `config`. Never fails: a socket that cannot be set up
    /// is logged and notifications are dropped.
    pub fn new(config: &NotifyConfig) -> Notifier {
        let Some(socket) = &config.socket else {
            return Notifier::disabled();
        };
        let target = address(socket).and_then(|addr| {
            let sock = UnixDatagram::unbound()?;
            sock.set_nonblocking(true)?;
            Ok((sock, addr))
        });
        match target {
            Ok(t) => Notifier {
                target: Some(t),
                watchdog: config.watchdog,
                last_ping: None,
                warned: false,
            },
            Err(e) => {
                log::warn!(
                    "event=notify_unavailable socket={:?} reason={:?}",
                    socket,
                    e.to_string()
                );
                Notifier::disabled()
            }
        }
    }

    /// Whether `NOTIFY_SOCKET` was set (and usable).
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// The watchdog interval, when systemd wants pings.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
    }

    /// The longest a main loop may sleep between iterations so that pings
    /// arrive in time: half the watchdog interval (`None`: no watchdog).
    pub fn wake_within(&self) -> Option<Duration> {
        self.watchdog.map(|w| (w / 2).max(Duration::from_millis(1)))
    }

    /// Send one message (several `KEY=value` lines). Errors are logged, not returned.
    pub fn notify(&mut self, message: &str) {
        let Some((sock, addr)) = &self.target else {
            return;
        };
        if let Err(e) = sock.send_to_addr(message.as_bytes(), addr) {
            if self.warned {
                log::debug!("notify failed: {e}");
            } else {
                log::warn!(
                    "event=notify_failed reason={:?}: systemd may not see this process's state",
                    e.to_string()
                );
                self.warned = true;
            }
        }
    }

    /// `READY=1` with a status line.
    pub fn ready(&mut self, status: &str) {
        self.notify(&format!("READY=1\nSTATUS={}", one_line(status)));
        self.last_ping = Some(Instant::now());
    }

    /// `STATUS=...`: a line `systemctl status` shows.
    pub fn status(&mut self, status: &str) {
        self.notify(&format!("STATUS={}", one_line(status)));
    }

    /// `STOPPING=1` with a status line.
    pub fn stopping(&mut self, status: &str) {
        self.notify(&format!("STOPPING=1\nSTATUS={}", one_line(status)));
    }

    /// `WATCHDOG=1`, at most once per quarter of the watchdog interval.
    /// Call it once per main-loop iteration; nothing happens without a watchdog.
    pub fn watchdog(&mut self) {
        let Some(every) = self.watchdog else {
            return;
        };
        let now = Instant::now();
        if self
            .last_ping
            .is_some_and(|t| now.duration_since(t) < every / 4)
        {
            return;
        }
        self.last_ping = Some(now);
        self.notify("WATCHDOG=1");
    }
}

fn one_line(s: &str) -> String {
    s.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recv_all(sock: &UnixDatagram) -> Vec<String> {
        sock.set_nonblocking(true).unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = sock.recv(&mut buf) {
            out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        out
    }

    #[test]
    fn config_from_vars() {
        let s = Some(OsString::from("/run/x"));
        let c = NotifyConfig::from_vars(s.clone(), Some("30000000"), None, 7);
        assert_eq!(c.watchdog, Some(Duration::from_secs(30)));
        // WATCHDOG_PID names another process: not our watchdog.
        let c = NotifyConfig::from_vars(s.clone(), Some("30000000"), Some("8"), 7);
        assert_eq!(c.watchdog, None);
        let c = NotifyConfig::from_vars(s.clone(), Some("30000000"), Some("7"), 7);
        assert_eq!(c.watchdog, Some(Duration::from_secs(30)));
        // No socket, no watchdog; junk is ignored.
        assert_eq!(
            NotifyConfig::from_vars(None, Some("1000"), None, 7),
            NotifyConfig::default()
        );
        assert_eq!(
            NotifyConfig::from_vars(Some("".into()), None, None, 7),
            NotifyConfig::default()
        );
        assert_eq!(
            NotifyConfig::from_vars(s, Some("soon"), None, 7).watchdog,
            None
        );
    }

    #[test]
    fn unset_socket_is_a_no_op() {
        let mut n = Notifier::new(&NotifyConfig::default());
        assert!(!n.enabled());
        assert_eq!(n.wake_within(), None);
        n.ready("x");
        n.watchdog();
        n.stopping("y");
    }

    #[test]
    fn sends_to_a_path_and_rate_limits_pings() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        let cfg = NotifyConfig {
            socket: Some(path.clone().into_os_string()),
            watchdog: Some(Duration::from_secs(3600)),
        };
        let mut n = Notifier::new(&cfg);
        assert!(n.enabled());
        assert_eq!(n.wake_within(), Some(Duration::from_secs(1800)));
        n.ready("serving\nnow");
        // Just after READY, a ping within a quarter interval is not sent.
        n.watchdog();
        n.status("busy");
        n.stopping("bye");
        assert_eq!(
            recv_all(&sock),
            [
                "READY=1\nSTATUS=serving now",
                "STATUS=busy",
                "STOPPING=1\nSTATUS=bye"
            ]
        );
        // With a tiny interval every call past a quarter of it pings.
        let mut n = Notifier::new(&NotifyConfig {
            watchdog: Some(Duration::from_millis(4)),
            ..cfg
        });
        n.watchdog();
        n.watchdog();
        std::thread::sleep(Duration::from_millis(2));
        n.watchdog();
        let got = recv_all(&sock);
        assert_eq!(got.first().map(String::as_str), Some("WATCHDOG=1"));
        assert!(got.len() >= 2 && got.len() <= 3, "{got:?}");
        assert!(got.iter().all(|m| m == "WATCHDOG=1"));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn sends_to_an_abstract_name() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("autopoll-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let sock = UnixDatagram::bind_addr(&addr).unwrap();
        let mut n = Notifier::new(&NotifyConfig {
            socket: Some(format!("@{name}").into()),
            watchdog: None,
        });
        n.ready("up");
        n.watchdog(); // no watchdog configured: nothing
        assert_eq!(recv_all(&sock), ["READY=1\nSTATUS=up"]);
    }

    #[test]
    fn a_missing_or_bad_socket_never_fails_the_caller() {
        let mut n = Notifier::new(&NotifyConfig {
            socket: Some("/nonexistent/autopoll/notify".into()),
            watchdog: Some(Duration::from_millis(1)),
        });
        n.ready("x");
        n.watchdog();
        let mut n = Notifier::new(&NotifyConfig {
            socket: Some("relative/path".into()),
            watchdog: None,
        });
        assert!(!n.enabled());
        n.ready("x");
    }
}
