//! Veil transports: the tokio drivers around the sans-IO [`veil-protocol`] core.
//!
//! **Status: empty placeholder.** Nothing here works yet, so nothing is exported. The drivers land
//! with the transports issue:
//!
//! - **TCP**: one frame = `u16` big-endian length + bytes (Noise's 65 535-byte limit), framed with
//!   tokio-util's `LengthDelimitedCodec`.
//! - **UDP**: one Veil packet per datagram; one socket serves every peer.
//! - **In-memory** pipes for tests and examples.
//!
//! This crate will be the only place in Veil that owns sockets and reads the clock: it converts
//! `tokio::time::Instant` into the protocol's `Timestamp` and feeds the core through its
//! `handle_*` / `poll_*` methods. Until then, drive `veil-protocol` directly (see its
//! `pair` example).
//!
//! [`veil-protocol`]: https://example.invalid/veil
#![forbid(unsafe_code)]
