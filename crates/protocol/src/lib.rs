//! # autopoll-protocol
//!
//! Typed frames and the FIFO transport shared by `autopoll-server` and its
//! clients (the poller, `autopoll ask`, `scripts/ask.sh`).
//!
//! - [`frame`]: one enum per direction ([`Request`], [`Reply`]),
//!   newline-delimited JSON with a size cap.
//! - [`fifo`]: non-blocking FIFO primitives with deadlines: open (ENXIO means
//!   "no server"), poll, buffered frame reading, bounded writes, the checks a
//!   server makes on FIFO paths a client names.
//! - [`paths`]: the private runtime directory and a server's files in it.
//! - [`client`]: the client side of the handshake and request/reply matching.
//! - [`notify`]: systemd's `NOTIFY_SOCKET` protocol (ready, watchdog, stopping).
//!
//! The wire format is documented for other languages in `docs/PROTOCOL.md`.
#![deny(missing_docs)]

pub mod client;
pub mod fifo;
pub mod frame;
pub mod notify;
pub mod paths;
pub mod stop;

pub use client::{Client, ClientError, ClientOptions, Replies};
pub use frame::{
    Answer, AskRequest, Echo, EngineInfo, ErrorCode, ErrorReply, FrameError, Hello, Reply, Request,
    Stats, StatsRequest, Welcome, WorkerInfo,
};
pub use notify::{Notifier, NotifyConfig};
pub use paths::{ServerPaths, runtime_dir};
pub use stop::Shutdown;

/// Version of the frame protocol, exchanged in the hello frame.
pub const PROTOCOL_VERSION: u32 = 1;

/// Default cap on one frame, newline included: 1 MiB.
pub const DEFAULT_MAX_FRAME: usize = 1 << 20;

/// Hello frames must fit one atomic pipe write (POSIX `PIPE_BUF`, 4096 on Linux).
pub const MAX_HELLO: usize = libc::PIPE_BUF;
