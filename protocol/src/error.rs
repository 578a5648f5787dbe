//! Error types, one `#[non_exhaustive]` enum per layer, linked upward with `From`.
//!
//! Errors are detailed here, for local logs. What goes on the wire is coarse
//! (spec §10): a peer learns at most a [`RejectReason`]
//! or a [`CloseReason`], never why a decryption failed.

use core::fmt;

use crate::message::CloseReason;
use crate::replay::ReplayError;
use crate::wire::RejectReason;

/// A packet, payload or message could not be parsed (spec §4.4, §5.3, §9).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input was empty.
    Empty,
    /// The input ended before a complete header or body.
    Truncated,
    /// The input is longer than the configured maximum packet length.
    TooLong,
    /// The first byte names no packet type of this version.
    UnknownPacketType(u8),
    /// The packet type is not valid in this carrier mode (for example transport flags in
    /// datagram mode).
    WrongMode,
    /// The handshake names a protocol version this implementation does not speak.
    UnsupportedVersion(u8),
    /// The handshake names an unknown Noise pattern code.
    UnsupportedPattern(u8),
    /// The handshake names an unknown cipher suite code.
    UnsupportedSuite(u8),
    /// A handshake payload did not decode, or violated a rule of spec §5.3.
    MalformedPayload,
    /// A message inside a transport frame did not decode (spec §9).
    MalformedMessage,
    /// A message kind that is reserved or unknown in this version (spec §9.2).
    UnknownMessageKind(u8),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => f.write_str("empty packet"),
            Self::Truncated => f.write_str("truncated packet"),
            Self::TooLong => f.write_str("packet longer than the configured maximum"),
            Self::UnknownPacketType(t) => write!(f, "unknown packet type {t:#04x}"),
            Self::WrongMode => f.write_str("packet type not valid in this carrier mode"),
            Self::UnsupportedVersion(v) => write!(f, "unsupported protocol version {v}"),
            Self::UnsupportedPattern(p) => write!(f, "unsupported handshake pattern code {p}"),
            Self::UnsupportedSuite(s) => write!(f, "unsupported cipher suite code {s}"),
            Self::MalformedPayload => f.write_str("malformed handshake payload"),
            Self::MalformedMessage => f.write_str("malformed message"),
            Self::UnknownMessageKind(k) => write!(f, "unknown or reserved message kind {k:#04x}"),
        }
    }
}

impl core::error::Error for DecodeError {}

/// Why the application denied a peer (spec §5.5, §15.9). It picks the REJECT reason a
/// stream-mode responder sends ([`DenyReason::reject_reason`]) and the local close reason
/// ([`DenyReason::close_reason`]); the trust layer maps its errors here with
/// [`TrustError::deny_reason`](crate::trust::TrustError::deny_reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum DenyReason {
    /// Not allowed: not listed, wrong role, no time to check validity, or any policy of the
    /// application's own.
    #[default]
    Unauthorized,
    /// The peer's certificate, an issuer above it, or its key is revoked (spec §15.5).
    Revoked,
    /// The peer's certificate chain is missing, malformed, unverifiable, bound to another
    /// key, or not valid now (spec §15.9).
    BadCertificate,
}

impl DenyReason {
    /// The REJECT reason a stream-mode responder sends (spec §5.8).
    #[must_use]
    pub const fn reject_reason(self) -> RejectReason {
        match self {
            Self::Unauthorized => RejectReason::Unauthorized,
            Self::Revoked => RejectReason::Revoked,
            Self::BadCertificate => RejectReason::BadCertificate,
        }
    }

    /// The local close reason of the denied connection (spec §9.3).
    #[must_use]
    pub const fn close_reason(self) -> CloseReason {
        match self {
            Self::Unauthorized => CloseReason::Unauthorized,
            Self::Revoked => CloseReason::Revoked,
            Self::BadCertificate => CloseReason::BadCertificate,
        }
    }
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Unauthorized => "unauthorized",
            Self::Revoked => "revoked",
            Self::BadCertificate => "bad certificate",
        })
    }
}

/// A handshake failed (spec §5, §10).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The packet did not parse.
    Decode(DecodeError),
    /// A handshake message failed authentication or key agreement. Coarse on purpose.
    Crypto,
    /// A packet arrived that the handshake does not expect in its current state.
    UnexpectedPacket,
    /// The peer's index does not match this handshake (datagram mode).
    UnknownIndex,
    /// The peer refused the handshake with an (unauthenticated) reason.
    Rejected(RejectReason),
    /// The local authorization decision denied the peer (spec §5.5), for this reason.
    Denied(DenyReason),
    /// The handshake did not complete in time (spec §5.7).
    Timeout,
    /// A re-handshake presented a different static key than the established peer (spec §5.9).
    PeerKeyChanged,
    /// The pattern or suite offered by the peer is not enabled locally.
    NotAccepted,
    /// The local configuration cannot run this handshake (missing key or psk).
    Config(&'static str),
    /// A caller-provided buffer is too small.
    BufferTooSmall,
    /// A handshake payload exceeded `HANDSHAKE_PAYLOAD_MAX` (spec §3.3).
    PayloadTooLarge,
    /// The random number generator failed.
    Rng,
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Decode(e) => write!(f, "handshake decode error: {e}"),
            Self::Crypto => f.write_str("handshake message failed authentication"),
            Self::UnexpectedPacket => f.write_str("unexpected packet during handshake"),
            Self::UnknownIndex => f.write_str("handshake packet for an unknown session index"),
            Self::Rejected(r) => write!(f, "handshake rejected by peer (unauthenticated): {r}"),
            Self::Denied(r) => write!(f, "peer denied by local authorization: {r}"),
            Self::Timeout => f.write_str("handshake timed out"),
            Self::PeerKeyChanged => f.write_str("peer static key changed on re-handshake"),
            Self::NotAccepted => f.write_str("pattern or suite not accepted by local policy"),
            Self::Config(what) => write!(f, "handshake configuration error: {what}"),
            Self::BufferTooSmall => f.write_str("buffer too small"),
            Self::PayloadTooLarge => f.write_str("handshake payload too large"),
            Self::Rng => f.write_str("random number generator failed"),
        }
    }
}

impl core::error::Error for HandshakeError {}

impl From<DecodeError> for HandshakeError {
    fn from(e: DecodeError) -> Self {
        Self::Decode(e)
    }
}

/// A transport packet was refused, or could not be produced (spec §6–§8, §10).
///
/// Every receive-side error leaves the session exactly as it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionError {
    /// The packet did not parse.
    Decode(DecodeError),
    /// The counter was already received or is older than the replay window (spec §8).
    Replay(ReplayError),
    /// The packet failed authentication. Coarse on purpose.
    Authentication,
    /// The counter lies too many epochs ahead (spec §6.3, `MAX_EPOCH_JUMP`).
    EpochJumpTooLarge,
    /// The session is older than `REJECT_AFTER_TIME` (spec §7.4).
    Expired,
    /// The send counter reached `REJECT_AFTER_MESSAGES` (spec §7.4).
    CounterExhausted,
    /// A caller-provided buffer is too small.
    BufferTooSmall,
    /// The plaintext does not fit in one packet of the negotiated maximum size.
    TooLarge,
    /// The packet belongs to a different session index or generation.
    WrongSession,
}

impl fmt::Display for SessionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Decode(e) => write!(f, "transport decode error: {e}"),
            Self::Replay(e) => write!(f, "replay protection: {e}"),
            Self::Authentication => f.write_str("transport packet failed authentication"),
            Self::EpochJumpTooLarge => f.write_str("counter too far ahead"),
            Self::Expired => f.write_str("session expired"),
            Self::CounterExhausted => f.write_str("message counter exhausted"),
            Self::BufferTooSmall => f.write_str("buffer too small"),
            Self::TooLarge => f.write_str("plaintext larger than the maximum packet"),
            Self::WrongSession => f.write_str("packet for another session"),
        }
    }
}

impl core::error::Error for SessionError {}

impl From<DecodeError> for SessionError {
    fn from(e: DecodeError) -> Self {
        Self::Decode(e)
    }
}

impl From<ReplayError> for SessionError {
    fn from(e: ReplayError) -> Self {
        Self::Replay(e)
    }
}

/// An error from the [`Connection`](crate::Connection) driver.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectionError {
    /// The input did not parse.
    Decode(DecodeError),
    /// The handshake failed; the connection is closed.
    Handshake(HandshakeError),
    /// A transport packet was refused; the session is unchanged.
    Session(SessionError),
    /// The operation needs an established session.
    NotConnected,
    /// The connection is closed.
    Closed,
    /// The send queue is full; retry after `poll_transmit` drained it (backpressure).
    QueueFull,
    /// The message is larger than one packet can carry.
    MessageTooLarge,
    /// `authorize` was called while no decision was pending.
    NoDecisionPending,
    /// A caller-provided buffer is too small for the next packet.
    BufferTooSmall,
}

impl fmt::Display for ConnectionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Decode(e) => write!(f, "{e}"),
            Self::Handshake(e) => write!(f, "{e}"),
            Self::Session(e) => write!(f, "{e}"),
            Self::NotConnected => f.write_str("connection not established"),
            Self::Closed => f.write_str("connection closed"),
            Self::QueueFull => f.write_str("send queue full"),
            Self::MessageTooLarge => f.write_str("message larger than one packet"),
            Self::NoDecisionPending => f.write_str("no authorization decision pending"),
            Self::BufferTooSmall => f.write_str("buffer too small for the next packet"),
        }
    }
}

impl core::error::Error for ConnectionError {}

impl From<DecodeError> for ConnectionError {
    fn from(e: DecodeError) -> Self {
        Self::Decode(e)
    }
}

impl From<HandshakeError> for ConnectionError {
    fn from(e: HandshakeError) -> Self {
        Self::Handshake(e)
    }
}

impl From<SessionError> for ConnectionError {
    fn from(e: SessionError) -> Self {
        Self::Session(e)
    }
}

/// The delivery layer refused an operation or a peer's message (spec §17.10). Local: the only
/// wire effect is the close reason of the errors that close the connection
/// ([`DeliveryError::closes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeliveryError {
    /// `push` with the window full (spec §17.4): refused, the caller waits for
    /// acknowledgements (backpressure).
    WindowFull,
    /// The channel's next id would reach 2^64 − 1024 (spec §17.2): refused.
    IdsExhausted,
    /// An `Ack` names an id the sender never assigned (spec §17.3): the peer is broken, close
    /// with ProtocolViolation.
    AckBeyondSent,
    /// A Data at or beyond `next + RECEIVE_WINDOW` (spec §17.5). Returned as an error (close
    /// with ProtocolViolation) in stream mode; in datagram and routed modes the Data is
    /// dropped and counted ([`DataOutcome::Dropped`](crate::delivery::DataOutcome::Dropped)).
    OutOfWindow,
    /// A Data beyond the receiver's channel or buffer bound (spec §17.5): dropped without an
    /// acknowledgement, counted; the sender retransmits it later.
    ReceiverFull,
    /// A payload larger than the whole window (`window_bytes`): it could never be accepted.
    MessageTooLarge,
    /// A Data handed to an inbox that follows no stream yet: delivery is not in use on the
    /// connection (spec §17: no `Stream` read), so the Data is best effort, not the inbox's.
    NoStream,
    /// A [`DeliveryConfig`](crate::delivery::DeliveryConfig) outside its bounds.
    Config(&'static str),
    /// Saved delivery state (spec §17.8) that does not decode or breaks an invariant or a
    /// bound of the configuration it is imported into.
    State(&'static str),
}

impl DeliveryError {
    /// Whether the error ends the connection (with ProtocolViolation, spec §17.10). Only
    /// [`DeliveryError::AckBeyondSent`] and [`DeliveryError::OutOfWindow`] ever come from a
    /// peer's message as errors.
    #[must_use]
    pub const fn closes(self) -> bool {
        matches!(self, Self::AckBeyondSent | Self::OutOfWindow)
    }
}

impl fmt::Display for DeliveryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::WindowFull => f.write_str("delivery window full"),
            Self::IdsExhausted => f.write_str("message ids of the channel exhausted"),
            Self::AckBeyondSent => f.write_str("acknowledgement of an id never sent"),
            Self::OutOfWindow => f.write_str("data beyond the receive window"),
            Self::ReceiverFull => f.write_str("receiver bound reached"),
            Self::MessageTooLarge => f.write_str("message larger than the delivery window"),
            Self::NoStream => f.write_str("data without a delivery stream"),
            Self::Config(what) => write!(f, "delivery configuration error: {what}"),
            Self::State(what) => write!(f, "invalid saved delivery state: {what}"),
        }
    }
}

impl core::error::Error for DeliveryError {}
