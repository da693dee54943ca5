//! # autopoll-protocol
//!
//! Typed frames and the FIFO transport shared by `autopoll-server` and its
//! clients (the poller, `autopoll ask`). This crate starts small: the wire
//! version both sides agree on. Frames and the transport land with the
//! server (issue 3).
#![deny(missing_docs)]

/// Version of the frame protocol, exchanged in the hello frame.
pub const PROTOCOL_VERSION: u32 = 1;
