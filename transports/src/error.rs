//! The transports' error type: one enum, `thiserror`-derived, that wraps the core's
//! [`ConnectionError`] and adds what only a driver can see (sockets, framing, limits).

use std::io;
use std::sync::Arc;

use veil_protocol::trust::TrustError;
use veil_protocol::wire::RejectReason;
use veil_protocol::{CloseReason, ConnectionError, DeliveryError, DenyReason, HandshakeError};

use crate::config::Transport;

/// Everything that can go wrong in an [`Endpoint`](crate::Endpoint) or a
/// [`Connection`](crate::Connection).
///
/// `Clone` so that a connection's outcome can be handed to every handle and to
/// [`Endpoint::handshake_failures`](crate::Endpoint::handshake_failures) subscribers.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A socket operation failed.
    #[error("i/o error: {0}")]
    Io(Arc<io::Error>),
    /// The protocol core refused a packet or ended the connection (handshake failure,
    /// timeout, authentication failure, denied peer…).
    #[error("protocol error: {0}")]
    Protocol(#[from] ConnectionError),
    /// spec §3.1: a TCP frame announced a length above `max_packet_len`; refused before
    /// anything was allocated for it.
    #[error("frame longer than the maximum of {max} bytes")]
    FrameTooLarge {
        /// The configured maximum packet length.
        max: usize,
    },
    /// spec §3.1: a TCP frame of length zero.
    #[error("frame of length zero")]
    EmptyFrame,
    /// The message does not fit in one packet to this peer (for UDP: one datagram of the
    /// configured size).
    #[error("message of {len} bytes exceeds the maximum of {max} bytes")]
    MessageTooLarge {
        /// The message length.
        len: usize,
        /// The largest message this connection can carry.
        max: usize,
    },
    /// The connection ended in an orderly way: an authenticated `Close` was sent or
    /// received, or the core closed it locally (for example `IdleTimeout`).
    #[error("connection closed ({reason}, {})", if *by_peer { "by the peer" } else { "locally" })]
    Closed {
        /// The close reason (spec §9.3).
        reason: CloseReason,
        /// Whether the peer sent the `Close`.
        by_peer: bool,
    },
    /// The peer closed the TCP stream without closing the session first.
    #[error("the carrier was closed before the session")]
    CarrierClosed,
    /// The peer stopped reading: data waited to be written for
    /// [`EndpointLimits::write_stall_timeout`](crate::EndpointLimits::write_stall_timeout)
    /// while the carrier took none of it. The connection is dropped without a `Close`,
    /// which could not get through either.
    #[error("the peer stopped reading: nothing could be written within the stall timeout")]
    WriteStalled,
    /// The TCP connection could not be set up within the handshake timeout.
    #[error("connect timed out")]
    ConnectTimeout,
    /// The peer's address exceeded its handshake rate (token bucket).
    #[error("handshake rate limit exceeded for this address")]
    RateLimited,
    /// The endpoint already serves its maximum number of connections.
    #[error("too many connections")]
    TooManyConnections,
    /// The endpoint already runs its maximum number of concurrent handshakes.
    #[error("too many concurrent handshakes")]
    TooManyHandshakes,
    /// The endpoint has no socket for this transport (see
    /// [`EndpointBuilder::listen_tcp`](crate::EndpointBuilder::listen_tcp) and
    /// [`EndpointBuilder::bind_udp`](crate::EndpointBuilder::bind_udp)).
    #[error("the endpoint has no {0} socket")]
    NotBound(Transport),
    /// The endpoint was closed, or its driver task is gone.
    #[error("endpoint closed")]
    EndpointClosed,
    /// A trust operation was refused (spec §15.9): a revocation list that does not verify, is
    /// stale or malformed (the current one stays in force), or a certificate chain that does
    /// not fit this endpoint.
    #[error("trust: {0}")]
    Trust(#[from] TrustError),
    /// The endpoint has no trust state (see [`Authorizer::trust`](crate::Authorizer::trust)).
    #[error("the endpoint has no trust state")]
    NoTrust,
    /// spec §16.6: no link reaches the node: no relay link announces it and no direct link
    /// goes to it ([`RoutedEndpoint`](crate::RoutedEndpoint)).
    #[error("no route to the node")]
    NoRoute,
    /// There is no established end-to-end session with the node (connect first, or it has
    /// closed) ([`RoutedEndpoint`](crate::RoutedEndpoint)).
    #[error("no end-to-end session with the node")]
    NoSession,
    /// The delivery layer refused a message (spec §17.10): e.g.
    /// [`DeliveryError::IdsExhausted`], or a send with a time to live on an endpoint without
    /// delivery ([`DeliveryError::NoStream`]).
    #[error("delivery: {0}")]
    Delivery(DeliveryError),
}

impl Error {
    /// Whether the handshake did not complete within its timeout (a silent peer).
    #[must_use]
    pub fn is_handshake_timeout(&self) -> bool {
        matches!(self, Self::Protocol(ConnectionError::Handshake(HandshakeError::Timeout)))
    }

    /// The reason of a REJECT that ended the handshake (spec §5.8), as the initiator saw it.
    #[must_use]
    pub const fn reject_reason(&self) -> Option<RejectReason> {
        match self {
            Self::Protocol(ConnectionError::Handshake(HandshakeError::Rejected(r))) => Some(*r),
            _ => None,
        }
    }

    /// The reason this side denied the peer (spec §5.5), if that ended the handshake.
    #[must_use]
    pub const fn deny_reason(&self) -> Option<DenyReason> {
        match self {
            Self::Protocol(ConnectionError::Handshake(HandshakeError::Denied(r))) => Some(*r),
            _ => None,
        }
    }

    /// Whether the connection ended in an orderly `Close` (either side).
    #[must_use]
    pub const fn is_closed(&self) -> bool {
        matches!(self, Self::Closed { .. })
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Self::Io(Arc::new(e))
    }
}
