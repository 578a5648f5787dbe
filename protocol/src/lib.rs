//! # veil-protocol
//!
//! The sans-IO core of Veil, a Noise-based secure transport for IoT devices, gateways
//! and cloud services. `no_std` + `alloc`; never does IO, never reads a clock, never
//! draws randomness by itself. The normative description is `spec/protocol.md`; code
//! cites its sections as `spec §N`.
//!
//! Layers implemented here: packet framing and headers ([`wire`]), Noise handshakes
//! ([`handshake`]), transport sessions with rekeying and replay protection
//! ([`session`], [`replay`]), messages ([`message`]), the per-peer driver
//! ([`Connection`]) and exactly-once, in-order delivery across connections ([`delivery`]).
//!
//! ```
//! use std::sync::Arc;
//! use veil_protocol::{Config, Connection, Decision, Event, Mode, Role, StaticKeypair, Timestamp};
//! use bytes::Bytes;
//!
//! let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
//! # use rand_core::SeedableRng;
//! let server_id = StaticKeypair::generate(&mut rng);
//! let server_pub = *server_id.public();
//! let client = Arc::new(Config::new(StaticKeypair::generate(&mut rng), Mode::Stream));
//! let server = Arc::new(Config::new(server_id, Mode::Stream));
//! let now = Timestamp::ZERO;
//!
//! // IK: the client knows the server's static key.
//! let mut c = Connection::new(client, Role::Initiator, Some(server_pub), now, &mut rng)?;
//! let mut s = Connection::new(server, Role::Responder, None, now, &mut rng)?;
//! c.send(1, Bytes::from_static(b"temperature=21.5"))?;
//!
//! let mut buf = vec![0u8; 65_535];
//! for _ in 0..10 {
//!     while let Some(n) = c.poll_transmit(now, &mut buf)? {
//!         let _ = s.handle_input(now, &buf[..n]);
//!     }
//!     while let Some(n) = s.poll_transmit(now, &mut buf)? {
//!         let _ = c.handle_input(now, &buf[..n]);
//!     }
//!     while let Some(ev) = s.poll_event() {
//!         match ev {
//!             // The responder decides who may connect before any data is accepted.
//!             Event::AuthorizationRequired { .. } => s.authorize(now, Decision::allow())?,
//!             Event::Message { channel, payload, .. } => {
//!                 assert_eq!((channel, &payload[..]), (1, &b"temperature=21.5"[..]));
//!                 return Ok(());
//!             }
//!             _ => {}
//!         }
//!     }
//! }
//! panic!("message not delivered");
//! # Ok::<(), veil_protocol::ConnectionError>(())
//! ```
#![cfg_attr(not(feature = "std"), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod config;
pub mod connection;
pub mod cookie;
pub mod crypto;
pub mod delivery;
#[cfg(feature = "std")]
pub mod dh_cache;
pub mod error;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod handshake;
pub mod message;
pub mod params;
pub mod payload;
pub mod relay;
pub mod replay;
pub mod routing;
pub mod session;
pub mod time;
pub mod trust;
pub mod wire;

pub use config::{Config, Limits};
pub use connection::{Closed, Connection, ConnectionStats, Decision, Event};
pub use crypto::{Psk, PublicKey, StaticKeypair, X25519_IMPLEMENTATION};
#[cfg(feature = "std")]
pub use dh_cache::StaticDhCache;
pub use error::{ConnectionError, DecodeError, DeliveryError, DenyReason, HandshakeError, SessionError};
pub use message::CloseReason;
pub use params::{Mode, Pattern, Suite, PROTOCOL_VERSION};
pub use session::{Role, Session};
pub use time::{Duration, Timestamp};
