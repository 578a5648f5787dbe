//! Endpoint configuration: transport-level limits and the authorization callback.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use veil_protocol::trust::{Authorized, NodeId, RoleSet};
use veil_protocol::{Decision, PublicKey, Role};

use crate::trust::{PeerRoles, TrustState};

/// The carrier a connection runs over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// TCP, stream mode (spec §3.1).
    Tcp,
    /// UDP, datagram mode (spec §3.2).
    Udp,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        })
    }
}

/// IPv6 minimum MTU (1280) minus the IPv6 (40) and UDP (8) headers: a datagram of this
/// size crosses any IPv6 path without fragmentation (the same choice as QUIC and DNS).
pub const DEFAULT_DATAGRAM_SIZE: usize = 1_232;
/// The largest UDP payload over IPv4 (65 535 − 20 − 8).
pub const MAX_DATAGRAM_SIZE: usize = 65_507;

/// Limits an endpoint enforces on top of the protocol's own (which live in
/// [`veil_protocol::Limits`]: `max_packet_len` is the maximum TCP frame, and
/// `handshake_timeout` drops a silent peer).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EndpointLimits {
    /// Live connections (both directions, both transports). Inbound connections above it
    /// are refused with `REJECT(Busy)`; `connect` fails with
    /// [`Error::TooManyConnections`](crate::Error::TooManyConnections).
    pub max_connections: usize,
    /// Inbound handshakes in progress. Above it new peers get `REJECT(Busy)`.
    pub max_handshakes: usize,
    /// Sustained inbound handshakes per second allowed from one IP address (token bucket).
    pub handshake_rate_per_ip: f64,
    /// Bucket size of the per-address rate limit (handshakes allowed in a burst).
    ///
    /// UDP (spec §5.7.4): an INIT from an address that has not proven it receives there
    /// (no valid cookie) may only take a token while the bucket is at least half full;
    /// below that the source is asked for a cookie. A spoofer therefore cannot empty the
    /// bucket of the address it impersonates. TCP peers have proven their address.
    pub handshake_burst_per_ip: u32,
    /// UDP (spec §5.7.4): inbound handshakes in progress from which on every new INIT is
    /// answered with a stateless cookie challenge (`COOKIE_REPLY`) instead of Diffie-Hellman
    /// work, until the initiator sends its INIT back with the cookie. Values above
    /// `max_handshakes` act as `max_handshakes`. Default 128 (one eighth of the default
    /// `max_handshakes`).
    pub cookie_threshold: usize,
    /// UDP: demand a cookie from every initiator, whatever the load (one more round trip
    /// per handshake). Default `false`.
    pub require_cookie: bool,
    /// UDP: how long a cookie secret is current; the previous one is still accepted, so a
    /// cookie is valid for one to two of these. Default 120 s (spec §7.7
    /// `COOKIE_SECRET_LIFETIME`).
    pub cookie_secret_lifetime: Duration,
    /// Largest UDP datagram sent or accepted (clamped to 128..=65 507). A message that
    /// does not fit in one datagram is refused with
    /// [`Error::MessageTooLarge`](crate::Error::MessageTooLarge).
    pub datagram_size: usize,
    /// Messages a connection's `send` may queue ahead of its driver before it waits.
    pub send_queue: usize,
    /// Received messages held for `recv` before the driver stops reading (TCP) or drops
    /// datagrams (UDP).
    pub recv_queue: usize,
    /// Datagrams queued from the UDP socket to one connection before further ones are
    /// dropped.
    pub datagram_queue: usize,
    /// Established inbound connections waiting for `accept`.
    pub accept_queue: usize,
    /// How long a closing connection may take to flush its last packets and to hand the
    /// application the messages that arrived before the close; whatever is left then is
    /// dropped. Also bounds how long [`Connection::close`](crate::Connection::close) waits
    /// for queued messages to get through.
    pub close_linger: Duration,
    /// How long a connection may have packets waiting to be written while its carrier
    /// takes none of them (a TCP peer that stopped reading, whose window stays shut)
    /// before it is dropped with [`Error::WriteStalled`](crate::Error::WriteStalled).
    /// A peer that reads slowly resets it with every write. The idle timeout cannot catch
    /// such a peer when it still sends (keepalives). Default 60 s, like the idle timeout.
    pub write_stall_timeout: Duration,
    /// The TCP listen backlog.
    pub tcp_backlog: u32,
    /// Kernel send buffer of TCP sockets (`SO_SNDBUF`); `None` keeps the kernel's
    /// autotuning. Smaller buffers bound per-connection memory and make backpressure
    /// reach `send` sooner.
    pub tcp_send_buffer: Option<u32>,
    /// Kernel receive buffer of TCP sockets (`SO_RCVBUF`); `None` keeps autotuning.
    pub tcp_recv_buffer: Option<u32>,
    /// Entries of the endpoint's static-static Diffie-Hellman cache
    /// ([`veil_protocol::StaticDhCache`]): IK, IKpsk2 and KK handshakes with a peer whose
    /// result is held skip one X25519 on this side (spec §11.11). About 130 B per entry,
    /// allocated as peers arrive: ≈ 0.5 MiB at most for the default 4 096. `0` turns the
    /// cache off. Ignored when the protocol configuration given to
    /// [`EndpointBuilder::from_config`](crate::EndpointBuilder::from_config) already has a
    /// cache.
    pub static_dh_cache: usize,
}

impl Default for EndpointLimits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            max_handshakes: 1_024,
            handshake_rate_per_ip: 50.0,
            handshake_burst_per_ip: 100,
            cookie_threshold: 128,
            require_cookie: false,
            cookie_secret_lifetime: Duration::from_secs(120),
            datagram_size: DEFAULT_DATAGRAM_SIZE,
            send_queue: 64,
            recv_queue: 64,
            datagram_queue: 256,
            accept_queue: 128,
            close_linger: Duration::from_secs(2),
            write_stall_timeout: Duration::from_secs(60),
            tcp_backlog: 1_024,
            tcp_send_buffer: None,
            tcp_recv_buffer: None,
            static_dh_cache: 4_096,
        }
    }
}

/// What the authorization callback is told about a peer (spec §5.5).
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct AuthRequest<'a> {
    /// The peer's authenticated static key.
    pub remote_static: &'a PublicKey,
    /// The certificate chain the peer sent, if any (spec §15.4).
    pub certificate: Option<&'a [u8]>,
    /// Where the peer's packets come from (not authenticated).
    pub remote_addr: SocketAddr,
    /// The carrier.
    pub transport: Transport,
    /// This side's role: responders decide about every initiator; an XX initiator (and,
    /// with a trust authorizer, any initiator) decides about the responder it reached.
    pub role: Role,
    /// The certificate roles expected from this peer (spec §15.6): the authorizer's
    /// [`PeerRoles`] for this direction, or what the connect call named; empty for a
    /// callback authorizer unless the connect call named some.
    pub expected_roles: RoleSet,
    /// For an end-to-end peer reached through a relay ([`RoutedEndpoint`](crate::RoutedEndpoint),
    /// spec §16.6): the relay's node id. `remote_addr` and `transport` are then those of the
    /// link to that relay, and the peer's key has already been checked against the node id its
    /// route names. `None` for a link peer.
    pub relay: Option<NodeId>,
}

type AuthorizeFn = dyn Fn(&AuthRequest<'_>) -> Decision + Send + Sync;

/// The authorization decision (spec §5.5): called once per handshake, as soon as the
/// peer's static key is known, before any message is accepted. It runs on the
/// connection's task, so it must not block.
///
/// Either a callback ([`Authorizer::new`]) or a trust check ([`Authorizer::trust`]).
/// An endpoint without one denies every peer it has to decide about.
#[derive(Clone)]
pub struct Authorizer(Kind);

#[derive(Clone)]
enum Kind {
    Callback(Arc<AuthorizeFn>),
    Trust { state: TrustState, roles: PeerRoles },
}

impl Authorizer {
    /// Wraps a callback.
    pub fn new(f: impl Fn(&AuthRequest<'_>) -> Decision + Send + Sync + 'static) -> Self {
        Self(Kind::Callback(Arc::new(f)))
    }

    /// Checks every peer against `state` (spec §15.6): allowlist or fleet-CA certificates,
    /// with revocation and validity at the state's time, expecting `roles` (spec §15.6) from
    /// peers by direction. A failure denies the peer with the mapped reason (spec §15.9): a
    /// stream-mode initiator sees `REJECT(Revoked)`, `REJECT(BadCertificate)` or
    /// `REJECT(Unauthorized)`.
    ///
    /// With it an endpoint also:
    /// - checks the responders it connects to, IK and KK included (their certificate arrives
    ///   in message 2; in allowlist mode their key must be listed);
    /// - re-checks every live connection whenever `state` changes (a revocation list
    ///   accepted, a time learned) and when the peer's certificate expires, and closes each
    ///   one that now fails with the mapped close reason (`Revoked` within a second of the
    ///   update, spec §15.8);
    /// - applies revocation lists that peers push (`RevocationPush`), and follows the
    ///   `TimeSync` policy of spec §15.7 (see [`TimeSource`](crate::TimeSource)).
    #[must_use]
    pub fn trust(state: TrustState, roles: PeerRoles) -> Self {
        Self(Kind::Trust { state, roles })
    }

    /// Allows every peer that completes the handshake (for tests and open services).
    #[must_use]
    pub fn allow_all() -> Self {
        Self::new(|_| Decision::allow())
    }

    /// Denies every peer.
    #[must_use]
    pub fn deny_all() -> Self {
        Self::new(|_| Decision::deny())
    }

    /// Allows exactly the listed static keys.
    pub fn allowlist(keys: impl IntoIterator<Item = PublicKey>) -> Self {
        // Public keys are not secret: a hash lookup's timing reveals nothing worth hiding.
        let keys: HashSet<PublicKey> = keys.into_iter().collect();
        Self::new(move |req| if keys.contains(req.remote_static) { Decision::allow() } else { Decision::deny() })
    }

    /// The trust state of an [`Authorizer::trust`].
    #[must_use]
    pub fn trust_state(&self) -> Option<&TrustState> {
        match &self.0 {
            Kind::Trust { state, .. } => Some(state),
            Kind::Callback(_) => None,
        }
    }

    /// The roles of an [`Authorizer::trust`].
    #[must_use]
    pub fn roles(&self) -> Option<PeerRoles> {
        match &self.0 {
            Kind::Trust { roles, .. } => Some(*roles),
            Kind::Callback(_) => None,
        }
    }

    /// The decision, and who the peer is when a trust check allowed it.
    pub(crate) fn decide(&self, req: &AuthRequest<'_>) -> (Decision, Option<Authorized>) {
        match &self.0 {
            Kind::Callback(f) => (f(req), None),
            Kind::Trust { state, .. } => match state.check(req.remote_static, req.certificate, req.expected_roles) {
                Ok(peer) => (Decision::allow(), Some(peer)),
                Err(e) => {
                    // The error is detailed locally (spec §15.9); the peer learns the coarse reason.
                    tracing::info!(remote = ?req.remote_static, error = %e, "peer refused by trust check");
                    (Decision::Deny(e.deny_reason()), None)
                }
            },
        }
    }
}

impl Default for Authorizer {
    fn default() -> Self {
        Self::deny_all()
    }
}

impl fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Authorizer(..)")
    }
}
