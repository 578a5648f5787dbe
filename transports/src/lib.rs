//! # veil-transports
//!
//! The tokio drivers around the sans-IO [`veil_protocol`] core: the only part of Veil
//! that owns sockets and reads the clock (spec §3).
//!
//! An [`Endpoint`] listens on TCP and/or UDP and connects out. [`Endpoint::accept`]
//! yields a [`Connection`] only once its handshake has completed, the peer's static key
//! has passed the [`Authorizer`] (spec §5.5) and the session is confirmed (spec §5.7).
//! A `Connection` sends and receives messages ([`Connection::send`],
//! [`Connection::recv`]) concurrently, closes with a reason ([`Connection::close`]) and
//! exposes the peer's key, the handshake hash and traffic counters.
//!
//! ```
//! use bytes::Bytes;
//! use veil_protocol::{CloseReason, StaticKeypair};
//! use veil_transports::{Authorizer, Endpoint};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut rng = rand::rngs::OsRng;
//! let server_id = StaticKeypair::generate(&mut rng);
//! let client_id = StaticKeypair::generate(&mut rng);
//! let client_key = *client_id.public();
//!
//! // The server accepts only the client it knows.
//! let server = Endpoint::builder(server_id)
//!     .authorizer(Authorizer::allowlist([client_key]))
//!     .listen_tcp("127.0.0.1:0".parse()?)
//!     .bind()
//!     .await?;
//! let client = Endpoint::builder(client_id).bind().await?;
//!
//! // IK (the default): the client knows the server's static key in advance.
//! let addr = server.local_tcp_addr().expect("listening");
//! let (to_server, from_client) =
//!     tokio::try_join!(client.connect_tcp(addr, Some(server.public_key())), server.accept())?;
//! assert_eq!(from_client.remote_static(), client_key);
//! assert_eq!(to_server.handshake_hash(), from_client.handshake_hash());
//!
//! to_server.send(Bytes::from_static(b"temperature=21.5")).await?;
//! let msg = from_client.recv().await?;
//! assert_eq!(msg.payload, "temperature=21.5");
//!
//! to_server.close(CloseReason::Normal).await?;
//! assert!(from_client.recv().await.unwrap_err().is_closed());
//! # Ok(())
//! # }
//! ```
//!
//! ## Carriers
//!
//! - **TCP** (stream mode, spec §3.1): frames are a `u16` big-endian length and the
//!   packet, read with tokio-util's `LengthDelimitedCodec`; a frame longer than
//!   `max_packet_len` is refused before anything is allocated for it. Each connection is
//!   one task; reads and writes proceed concurrently, and under load queued messages share
//!   one frame (spec §6.4) and frames share one write.
//! - **UDP** (datagram mode, spec §3.2): one socket per endpoint. A socket task
//!   demultiplexes datagrams by the receiver's session index; `HANDSHAKE_INIT` creates a
//!   responder. The core retransmits handshake packets with backoff and keeps the replay
//!   window. A peer that moves is followed once a packet from its new address
//!   authenticates, never before. Messages larger than one datagram
//!   ([`EndpointLimits::datagram_size`]) are refused with [`Error::MessageTooLarge`].
//!
//! ## Limits
//!
//! [`EndpointLimits`]: maximum connections, maximum concurrent inbound handshakes, a
//! per-address handshake rate (token bucket), bounded queues everywhere (a slow peer
//! makes `send` wait, it never grows a buffer; a peer that stops reading altogether is
//! dropped with [`Error::WriteStalled`] after [`EndpointLimits::write_stall_timeout`]).
//! From the protocol's [`veil_protocol::Limits`]:
//! the maximum packet (= frame) length and the handshake timeout that drops a silent peer.
//! Inbound peers that never become a `Connection` are counted in [`Endpoint::stats`] and
//! reported with a typed error through [`Endpoint::handshake_failures`].
//!
//! ## Handshake floods (UDP)
//!
//! Anyone can send a UDP INIT from a forged address. Under load — inbound handshakes in
//! progress at [`EndpointLimits::cookie_threshold`], or always with
//! [`EndpointLimits::require_cookie`], or for one source whose rate bucket is below half — the
//! socket task answers a new INIT with a 21-byte `COOKIE_REPLY` (spec §5.7.4) computed from a
//! rotating secret, the source address and the INIT, and keeps nothing. The initiator's core
//! sends its INIT again behind the cookie; only then does the endpoint spend Diffie-Hellman work
//! and memory on it. Memory per unauthenticated peer, measured by `tests/flood.rs`
//! (spec §13.1): **0 bytes** until its cookie verifies; then one pending handshake of
//! ≈ 9.5 KiB (9734 B, IK, ChaChaPoly), at most `max_handshakes` of them, each for at most the
//! handshake timeout. [`EndpointStats`] counts the cookies sent, refused and accepted.
//!
//! ## Trust (spec §15)
//!
//! [`Authorizer::trust`] checks every peer against a [`TrustState`]: an allowlist, or fleet-CA
//! certificate chains with revocation lists (`veil_protocol::trust`). A node sends its own chain
//! ([`EndpointBuilder::certificate_chain`]) in its encrypted handshake payloads (never in XX
//! message 1, never in a re-handshake), and with a trust authorizer it checks the responders it
//! connects to as well as the initiators that reach it. Roles are chosen per endpoint and
//! direction ([`PeerRoles`]: a gateway accepts devices and expects a cloud upstream) or per
//! connect call ([`Endpoint::connect_expecting`]); a cloud that takes gateway uplinks and devices
//! on separate ports runs one endpoint per port over one shared `TrustState`. A refused peer gets
//! the mapped reason: over TCP the initiator sees `REJECT(Revoked | BadCertificate |
//! Unauthorized)` ([`Error::reject_reason`]); over UDP the responder stays silent and reports
//! the reason through [`Endpoint::handshake_failures`] ([`Error::deny_reason`]).
//!
//! Live sessions follow the trust state: [`Endpoint::update_revocation_list`] (or a list a peer
//! pushed, [`Connection::push_revocation_list`], published by [`Endpoint::revocation_lists`])
//! makes every connection re-check its peer on its own task and close with `Revoked` (or
//! `BadCertificate`, `Unauthorized`) if it now fails — well within the second spec §15.8
//! allows; a list that does not verify is refused with [`Error::Trust`], logged, and the
//! current one kept. A connection also re-checks when its peer's chain expires. Time comes from
//! the system clock on gateways and cloud ([`TimeSource::SystemClock`], which sends `TimeSync`
//! to device peers), or is learned by a device from `TimeSync` of a peer verified as gateway or
//! cloud ([`TimeSource::Learned`], spec §15.7).
//!
//! ## End-to-end through relays (spec §16)
//!
//! A device behind a gateway holds two sessions: a link session with the gateway (a
//! [`Connection`] from an endpoint built with [`EndpointBuilder::routing`]) and, inside its
//! `Forward`/`Deliver` envelopes, an end-to-end session with the cloud in routed mode (spec
//! §16.2) that the gateway cannot read. A [`RoutedEndpoint`] runs those end-to-end sessions for
//! a device or a cloud service: hand it relay links ([`RoutedEndpoint::add_relay_link`]) and,
//! on a cloud, devices that connect directly ([`RoutedEndpoint::add_direct`], spec §16.1); then
//! [`RoutedEndpoint::connect`] to a node by its static key, [`RoutedEndpoint::send`] to it by
//! node id, and read [`NodeEvent`]s. It learns routes from the relays' announcements, checks
//! that every end-to-end peer's key is the node its route names (spec §16.6), authorizes peers
//! with its own [`Authorizer`], and keeps sessions across route changes: a link that drops and
//! comes back, or a device that moves to another gateway, keeps its session and its counters.
//! The gateway side (a relay) is `veil-relay`.
//!
//! ## Time
//!
//! Each endpoint reads `tokio::time::Instant` and hands the core
//! [`Timestamp`](veil_protocol::Timestamp)s in microseconds since the endpoint started;
//! the core's `poll_timeout` deadlines become `tokio::time::sleep_until`. Nothing else in
//! Veil reads a clock.
//!
//! Each connection logs in its own `tracing` span (`veil_conn`: id, transport, peer
//! address, role). Keys, hashes and payloads are never logged.
//!
//! ## Fault injection (feature `fault-injection`)
//!
//! `veil_transports::fault` holds test support: `LossyProxy`, a seeded user-space UDP
//! proxy with per-direction loss, reordering, duplication, delay, jitter and corruption,
//! and counters of what it did. It is off by default; this crate's own tests turn it on
//! through a dev-dependency on itself, and other crates' fault-injection suites enable it
//! in their `[dev-dependencies]`. `veil_transports::chaos` holds its TCP counterpart,
//! `ChaosProxy`: connections cut at random points, corrupted bytes, stalls and delays, and
//! commands that cut every connection or take the link down for a while.
#![forbid(unsafe_code)]

#[cfg(feature = "fault-injection")]
pub mod chaos;
mod clock;
mod config;
mod connection;
mod driver;
mod endpoint;
mod error;
#[cfg(feature = "fault-injection")]
pub mod fault;
mod limiter;
pub mod routed;
mod tcp;
mod trust;
mod udp;

pub use clock::Clock;
pub use config::{AuthRequest, Authorizer, EndpointLimits, Transport, DEFAULT_DATAGRAM_SIZE, MAX_DATAGRAM_SIZE};
pub use connection::{Connection, Message, Received, TrySendError};
pub use endpoint::{Endpoint, EndpointBuilder, EndpointStats, HandshakeFailure, ReceivedRevocationList};
pub use error::Error;
pub use routed::{
    DeliveryOptions, NodeEvent, RoutedBuilder, RoutedEndpoint, RoutedHandshakeFailure, RoutedLimits, RoutedStats, Via,
};
pub use trust::{PeerRoles, TimeSource, TrustState};
