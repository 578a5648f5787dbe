//! Configuration of a Veil endpoint: identity, accepted patterns and suites, and the
//! timers and limits of spec §7.7.

use alloc::vec::Vec;

use crate::crypto::{Psk, PublicKey, StaticKeypair};
use crate::params::{Mode, Pattern, Suite};
use crate::time::Duration;
use crate::trust::{CertificateChain, TrustError};
use crate::wire::{MAX_PACKET_LEN, MIN_PACKET_LEN};

/// spec §7.7: default `REKEY_AFTER_TIME`.
pub const REKEY_AFTER_TIME: Duration = Duration::from_secs(120);
/// spec §7.7: default `REHANDSHAKE_AFTER_TIME`.
pub const REHANDSHAKE_AFTER_TIME: Duration = Duration::from_secs(3_600);
/// spec §7.7: default `REJECT_AFTER_TIME` (twice the re-handshake interval).
pub const REJECT_AFTER_TIME: Duration = Duration::from_secs(7_200);
/// spec §7.7: default `KEEPALIVE_INTERVAL`.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
/// spec §7.7: default `IDLE_TIMEOUT`.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// spec §7.7: default `HANDSHAKE_TIMEOUT`.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// spec §7.7: initial handshake retransmission timeout (datagram mode).
pub const HANDSHAKE_RTO: Duration = Duration::from_secs(1);
/// spec §7.7: retransmission timeout cap (datagram mode).
pub const HANDSHAKE_RTO_MAX: Duration = Duration::from_secs(8);
/// spec §7.7: how long a replaced key or session is still accepted (datagram mode).
pub const KEY_OVERLAP: Duration = Duration::from_secs(10);
/// Default bound on bytes queued by `send` and not yet sealed (backpressure).
pub const SEND_QUEUE_BYTES: usize = 256 * 1024;

/// Timers and limits (spec §7.7). Defaults are the spec's constants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// A sending key older than this is replaced by the next epoch's (spec §7.1).
    pub rekey_after_time: Duration,
    /// The initiator starts a new handshake after this (spec §7.3).
    pub rehandshake_after_time: Duration,
    /// A session older than this refuses to send or receive (spec §7.4).
    pub reject_after_time: Duration,
    /// Send an empty packet when nothing was sent for this long (spec §7.5).
    pub keepalive_interval: Duration,
    /// Close when nothing authenticated arrived for this long (spec §7.5).
    pub idle_timeout: Duration,
    /// Fail a handshake that has not completed after this (spec §5.7).
    pub handshake_timeout: Duration,
    /// First retransmission timeout of handshake packets (datagram mode, spec §5.7).
    pub handshake_rto: Duration,
    /// Retransmission timeout cap (spec §5.7).
    pub handshake_rto_max: Duration,
    /// Overlap during which a replaced key or session is still accepted (spec §7.2).
    pub key_overlap: Duration,
    /// Largest packet this side accepts, announced in the handshake (spec §3.3).
    pub max_packet_len: usize,
    /// Bound on queued, unsent application bytes; `send` fails with `QueueFull` above it.
    pub send_queue_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            rekey_after_time: REKEY_AFTER_TIME,
            rehandshake_after_time: REHANDSHAKE_AFTER_TIME,
            reject_after_time: REJECT_AFTER_TIME,
            keepalive_interval: KEEPALIVE_INTERVAL,
            idle_timeout: IDLE_TIMEOUT,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            handshake_rto: HANDSHAKE_RTO,
            handshake_rto_max: HANDSHAKE_RTO_MAX,
            key_overlap: KEY_OVERLAP,
            max_packet_len: MAX_PACKET_LEN,
            send_queue_bytes: SEND_QUEUE_BYTES,
        }
    }
}

impl Limits {
    /// The idle timeout in force: `idle_timeout`, but never longer than
    /// (`MAX_EPOCH_JUMP` − 1) × `rekey_after_time` (spec §7.5). A peer that keeps sending
    /// through a loss moves one epoch ahead per `rekey_after_time`; a receiver that has
    /// heard nothing for longer could no longer place its counters (spec §6.3), so the
    /// connection ends instead of lingering unable to authenticate anything.
    #[must_use]
    pub const fn effective_idle_timeout(&self) -> Duration {
        let cap = self.rekey_after_time.as_micros().saturating_mul(crate::session::MAX_EPOCH_JUMP - 1);
        let idle = self.idle_timeout.as_micros();
        Duration::from_micros(if idle < cap { idle } else { cap })
    }

    /// `max_packet_len` clamped to the protocol's bounds.
    #[must_use]
    pub fn packet_len(&self) -> usize {
        self.max_packet_len.clamp(MIN_PACKET_LEN, MAX_PACKET_LEN)
    }
}

/// Configuration shared by all connections of an endpoint.
#[derive(Clone, Debug)]
pub struct Config {
    /// This node's identity.
    pub identity: StaticKeypair,
    /// Carrier mode.
    pub mode: Mode,
    /// Pattern an initiator uses.
    pub pattern: Pattern,
    /// Suite an initiator uses.
    pub suite: Suite,
    /// Patterns a responder accepts.
    pub accept_patterns: Vec<Pattern>,
    /// Suites a responder accepts.
    pub accept_suites: Vec<Suite>,
    /// Pre-shared key for the psk patterns. An IKpsk2 responder may instead supply one
    /// per initiator with its authorization decision.
    pub psk: Option<Psk>,
    /// Timers and limits.
    pub limits: Limits,
    /// This node's certificate chain (spec §15.4, the encoding of
    /// [`CertificateChain`]), sent in the `certificate` field of its handshake payloads
    /// where spec §5.4.1 puts it: never in XX/XXpsk3 message 1, never in a re-handshake.
    /// At most [`MAX_CHAIN_LEN`](crate::trust::MAX_CHAIN_LEN) bytes. `None` in allowlist mode.
    pub certificate_chain: Option<Vec<u8>>,
    /// An IK, IKpsk2 or KK initiator also asks for an authorization decision about the
    /// responder, after reading message 2 and before its session starts (spec §5.5), so that
    /// it can check the certificate the responder sent there. XX/XXpsk3 initiators always
    /// decide. Default `false`: the responder's key, known in advance, is the trust.
    pub authorize_responder: bool,
    /// The endpoint's cache of static-static X25519 results (`ss` of IK, IKpsk2 and KK; see
    /// [`StaticDhCache`](crate::StaticDhCache)), shared by every connection built with this
    /// configuration and its clones. `None` (the default): every handshake computes `ss`.
    /// Saves one X25519 per side and handshake with a peer met before; bounded, ≈ 130 B per
    /// entry. `std` only.
    #[cfg(feature = "std")]
    pub static_dh_cache: Option<alloc::sync::Arc<crate::dh_cache::StaticDhCache>>,
}

impl Config {
    /// A configuration with Veil's defaults: IK, ChaChaPoly/BLAKE2s, every pattern and
    /// suite accepted, spec timers.
    #[must_use]
    pub fn new(identity: StaticKeypair, mode: Mode) -> Self {
        Self {
            identity,
            mode,
            pattern: Pattern::IK,
            suite: Suite::ChaChaPolyBlake2s,
            accept_patterns: Pattern::ALL.to_vec(),
            accept_suites: Suite::ALL.to_vec(),
            psk: None,
            limits: Limits::default(),
            certificate_chain: None,
            authorize_responder: false,
            #[cfg(feature = "std")]
            static_dh_cache: None,
        }
    }

    /// Sets this node's certificate chain (spec §15.4).
    ///
    /// # Errors
    /// [`TrustError::TooLong`] if its encoding exceeds
    /// [`MAX_CHAIN_LEN`](crate::trust::MAX_CHAIN_LEN).
    pub fn set_certificate_chain(&mut self, chain: &CertificateChain) -> Result<(), TrustError> {
        self.certificate_chain = Some(chain.encode()?);
        Ok(())
    }

    /// The static public key.
    #[must_use]
    pub const fn public_key(&self) -> &PublicKey {
        self.identity.public()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_timeout_is_cut_to_what_counter_reconstruction_can_follow() {
        let defaults = Limits::default();
        assert_eq!(defaults.effective_idle_timeout(), IDLE_TIMEOUT);
        let fast_rekey = Limits { rekey_after_time: Duration::from_millis(100), ..Limits::default() };
        assert_eq!(fast_rekey.effective_idle_timeout(), Duration::from_millis(700));
        let short_idle = Limits { idle_timeout: Duration::from_millis(300), ..fast_rekey };
        assert_eq!(short_idle.effective_idle_timeout(), Duration::from_millis(300));
    }
}
