//! The [`Endpoint`]: sockets, limits and the accept queue shared by all connections.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use veil_protocol::dh_cache::CacheStats;
use veil_protocol::trust::{CertificateChain, RevocationUpdate, RoleSet, TrustError};
use veil_protocol::{Config, Mode, Pattern, Psk, PublicKey, StaticDhCache, StaticKeypair, Suite, Timestamp};

use crate::clock::Clock;
use crate::config::{Authorizer, EndpointLimits, Transport, MAX_DATAGRAM_SIZE};
use crate::connection::Connection;
use crate::error::Error;
use crate::limiter::RateLimiter;
use crate::trust::TrustState;
use crate::{tcp, udp};

/// Failures kept for slow [`Endpoint::handshake_failures`] subscribers before the oldest
/// are dropped (they then see `Lagged`).
const FAILURE_BACKLOG: usize = 256;

/// A revocation list a peer pushed over a session (`RevocationPush`, spec §15.8), and what
/// applying it to the endpoint's trust state gave. A gateway passes accepted lists on to its
/// devices with [`Connection::push_revocation_list`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ReceivedRevocationList {
    /// The peer that pushed it.
    pub remote_static: PublicKey,
    /// The connection it came over ([`Connection::id`]).
    pub connection: u64,
    /// The list as received (verified only if `result` is `Ok`).
    pub list: Bytes,
    /// The update, or why the list was refused ([`Error::Trust`]: the current list stays in
    /// force) or not applied ([`Error::NoTrust`]).
    pub result: Result<RevocationUpdate, Error>,
}

/// An inbound peer that never became a [`Connection`]: refused by a limit, or whose
/// handshake failed (garbage, oversized frame, silence, denial…).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HandshakeFailure {
    /// Where the peer's packets came from.
    pub remote_addr: SocketAddr,
    /// The carrier.
    pub transport: Transport,
    /// What went wrong.
    pub error: Error,
}

/// Endpoint counters (a snapshot).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct EndpointStats {
    /// Live connections (including those still handshaking).
    pub connections: usize,
    /// Inbound handshakes in progress.
    pub handshakes: usize,
    /// Inbound connections handed to `accept`.
    pub accepted: u64,
    /// Inbound handshakes that failed (including timeouts and denials).
    pub handshake_failures: u64,
    /// Inbound peers refused by the per-address rate limit.
    pub refused_rate_limited: u64,
    /// Inbound peers refused by `max_connections` or `max_handshakes`.
    pub refused_busy: u64,
    /// UDP datagrams dropped before reaching a connection (unknown index, malformed,
    /// oversized, or the connection's queue was full).
    pub datagrams_dropped: u64,
    /// UDP: `COOKIE_REPLY`s sent, each in place of a handshake for an initiator that had not
    /// proven its address (spec §5.7.4).
    pub cookies_sent: u64,
    /// UDP: INITs that carried a cookie which did not verify (another address or port,
    /// expired, altered, forged), answered with a fresh `COOKIE_REPLY`.
    pub cookies_refused: u64,
    /// UDP: INITs whose cookie verified (the address was proven).
    pub cookies_accepted: u64,
    /// Routing messages (spec §16) dropped because this endpoint does not route
    /// ([`EndpointBuilder::routing`] off, spec §16.7).
    pub routing_dropped: u64,
    /// The static-static DH cache's counters (all zero without one,
    /// [`EndpointLimits::static_dh_cache`](crate::EndpointLimits::static_dh_cache)).
    pub static_dh_cache: CacheStats,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    connections: AtomicUsize,
    handshakes: AtomicUsize,
    pub(crate) accepted: AtomicU64,
    handshake_failures: AtomicU64,
    refused_rate_limited: AtomicU64,
    refused_busy: AtomicU64,
    pub(crate) datagrams_dropped: AtomicU64,
    pub(crate) cookies_sent: AtomicU64,
    pub(crate) cookies_refused: AtomicU64,
    pub(crate) cookies_accepted: AtomicU64,
    pub(crate) routing_dropped: AtomicU64,
}

/// What every task of an endpoint shares.
#[derive(Debug)]
pub(crate) struct EndpointShared {
    pub(crate) clock: Clock,
    pub(crate) stream_config: Arc<Config>,
    pub(crate) datagram_config: Arc<Config>,
    /// spec §5.4: a KK responder accepts exactly this initiator.
    pub(crate) kk_initiator: Option<PublicKey>,
    pub(crate) authorizer: Authorizer,
    pub(crate) limits: EndpointLimits,
    /// spec §16.7: routing messages reach the application ([`Connection::recv_any`]) or are
    /// dropped and counted.
    pub(crate) routing: bool,
    pub(crate) counters: Counters,
    rate: RateLimiter,
    failures: broadcast::Sender<HandshakeFailure>,
    /// Revocation lists pushed by peers, for the application (spec §15.8).
    pub(crate) revocations: broadcast::Sender<ReceivedRevocationList>,
    /// Cancelled by [`Endpoint::close`]: every connection closes with `ShuttingDown`.
    pub(crate) shutdown: CancellationToken,
    pub(crate) accept_tx: mpsc::Sender<Connection>,
    pub(crate) udp: Option<Arc<udp::UdpShared>>,
    next_id: AtomicU64,
}

/// Which counter a [`Slot`] holds.
#[derive(Debug, Clone, Copy)]
enum SlotKind {
    Connection,
    Handshake,
}

/// One unit of `max_connections` or `max_handshakes`, given back on drop.
#[derive(Debug)]
pub(crate) struct Slot {
    ep: Arc<EndpointShared>,
    kind: SlotKind,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.ep.counter(self.kind).fetch_sub(1, Ordering::AcqRel);
    }
}

/// The slots an admitted inbound peer holds.
#[derive(Debug)]
pub(crate) struct Admission {
    pub(crate) connection: Slot,
    pub(crate) handshake: Slot,
}

impl EndpointShared {
    fn counter(&self, kind: SlotKind) -> &AtomicUsize {
        match kind {
            SlotKind::Connection => &self.counters.connections,
            SlotKind::Handshake => &self.counters.handshakes,
        }
    }

    fn try_slot(self: &Arc<Self>, kind: SlotKind, max: usize) -> Option<Slot> {
        self.counter(kind)
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| Slot { ep: Arc::clone(self), kind })
    }

    /// A slot for an outbound connection.
    pub(crate) fn connection_slot(self: &Arc<Self>) -> Result<Slot, Error> {
        self.try_slot(SlotKind::Connection, self.limits.max_connections).ok_or(Error::TooManyConnections)
    }

    /// Admission control for a new inbound peer, cheapest check first. The peer has proven
    /// its address (a TCP connection, or a UDP INIT with a valid cookie).
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr, now: Timestamp) -> Result<Admission, Error> {
        if !self.rate.allow(ip, now) {
            return Err(Error::RateLimited);
        }
        self.slots()
    }

    /// Admission control for a UDP INIT from an address that has not proven itself: only
    /// from the upper half of the address's bucket (spec §5.7.4). `RateLimited` here means
    /// "ask for a cookie", not "refuse".
    pub(crate) fn admit_unproven(self: &Arc<Self>, ip: IpAddr, now: Timestamp) -> Result<Admission, Error> {
        if !self.rate.allow_unproven(ip, now) {
            return Err(Error::RateLimited);
        }
        self.slots()
    }

    /// spec §5.7.4: whether every new UDP initiator must prove its address first (configured,
    /// or inbound handshakes at the threshold).
    pub(crate) fn demands_cookies(&self) -> bool {
        let threshold = self.limits.cookie_threshold.min(self.limits.max_handshakes);
        self.limits.require_cookie || self.counters.handshakes.load(Ordering::Acquire) >= threshold
    }

    fn slots(self: &Arc<Self>) -> Result<Admission, Error> {
        let handshake =
            self.try_slot(SlotKind::Handshake, self.limits.max_handshakes).ok_or(Error::TooManyHandshakes)?;
        let connection = self.connection_slot()?;
        Ok(Admission { connection, handshake })
    }

    /// Counts and publishes an inbound peer that was refused or failed its handshake.
    pub(crate) fn report_failure(&self, remote_addr: SocketAddr, transport: Transport, error: Error) {
        let c = match error {
            Error::RateLimited => &self.counters.refused_rate_limited,
            Error::TooManyConnections | Error::TooManyHandshakes => &self.counters.refused_busy,
            _ => &self.counters.handshake_failures,
        };
        c.fetch_add(1, Ordering::Relaxed);
        // No subscriber is fine: the counters keep the record.
        let _ = self.failures.send(HandshakeFailure { remote_addr, transport, error });
    }

    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// Builds an [`Endpoint`]. Start with [`Endpoint::builder`].
#[derive(Debug)]
pub struct EndpointBuilder {
    config: Config,
    limits: EndpointLimits,
    authorizer: Authorizer,
    kk_initiator: Option<PublicKey>,
    tcp: Option<SocketAddr>,
    udp: Option<SocketAddr>,
    routing: bool,
    /// The local chain, or why it cannot be used (reported by `bind`).
    chain: Option<Result<Vec<u8>, TrustError>>,
}

impl EndpointBuilder {
    /// Starts from a protocol configuration. Its `mode` is ignored: TCP connections use
    /// stream mode and UDP connections datagram mode.
    #[must_use]
    pub fn from_config(config: Config) -> Self {
        Self {
            config,
            limits: EndpointLimits::default(),
            authorizer: Authorizer::default(),
            kk_initiator: None,
            tcp: None,
            udp: None,
            routing: false,
            chain: None,
        }
    }

    /// This node's certificate chain (spec §15.4), sent in its handshakes where spec §5.4.1
    /// says. Its leaf must certify this endpoint's static key ([`EndpointBuilder::bind`]
    /// checks).
    #[must_use]
    pub fn certificate_chain(mut self, chain: &CertificateChain) -> Self {
        // Public keys: no need for a constant-time comparison.
        let bound = chain.leaf().body().public_key == *self.config.public_key().as_bytes();
        self.chain = Some(if bound { chain.encode() } else { Err(TrustError::KeyMismatch) });
        self
    }

    /// Hands routing messages (spec §16: `Route`, `Withdraw`, `Forward`, `Deliver`,
    /// `Unreachable`) to the application through [`Connection::recv_any`]. Off by default:
    /// a node that does not route drops them and counts them
    /// ([`EndpointStats::routing_dropped`], spec §16.7).
    #[must_use]
    pub fn routing(mut self, on: bool) -> Self {
        self.routing = on;
        self
    }

    /// The handshake pattern this endpoint uses when it connects (default IK). As a
    /// responder it accepts every pattern of its configuration.
    #[must_use]
    pub fn pattern(mut self, pattern: Pattern) -> Self {
        self.config.pattern = pattern;
        self
    }

    /// The cipher suite this endpoint offers when it connects.
    #[must_use]
    pub fn suite(mut self, suite: Suite) -> Self {
        self.config.suite = suite;
        self
    }

    /// The pre-shared key of the `psk` patterns.
    #[must_use]
    pub fn psk(mut self, psk: Psk) -> Self {
        self.config.psk = Some(psk);
        self
    }

    /// spec §5.4: the one initiator a KK responder accepts.
    #[must_use]
    pub fn kk_initiator(mut self, key: PublicKey) -> Self {
        self.kk_initiator = Some(key);
        self
    }

    /// The protocol's timers and limits (spec §7.7).
    #[must_use]
    pub fn protocol_limits(mut self, limits: veil_protocol::Limits) -> Self {
        self.config.limits = limits;
        self
    }

    /// The largest packet accepted, hence the largest TCP frame (spec §3.3; 128..=65 535).
    /// A frame announcing more is refused before anything is allocated for it.
    #[must_use]
    pub fn max_packet_len(mut self, len: usize) -> Self {
        self.config.limits.max_packet_len = len;
        self
    }

    /// How long a handshake may take; a silent peer is dropped after it (spec §5.7).
    #[must_use]
    pub fn handshake_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.config.limits.handshake_timeout = timeout.into();
        self
    }

    /// The endpoint's own limits.
    #[must_use]
    pub fn limits(mut self, limits: EndpointLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Who may connect (spec §5.5). Without one, every peer that needs a decision is denied.
    #[must_use]
    pub fn authorizer(mut self, authorizer: Authorizer) -> Self {
        self.authorizer = authorizer;
        self
    }

    /// Listens for TCP connections on `addr` (port 0 picks a free port).
    #[must_use]
    pub fn listen_tcp(mut self, addr: SocketAddr) -> Self {
        self.tcp = Some(addr);
        self
    }

    /// Binds the endpoint's UDP socket to `addr`. It accepts inbound handshakes and
    /// carries every outbound UDP connection.
    #[must_use]
    pub fn bind_udp(mut self, addr: SocketAddr) -> Self {
        self.udp = Some(addr);
        self
    }

    /// Opens the sockets and starts the endpoint's tasks. Needs a tokio runtime.
    ///
    /// # Errors
    /// [`Error::Io`] if a socket cannot be bound; [`Error::Trust`] if the certificate chain
    /// does not certify this endpoint's key (`KeyMismatch`) or is too long.
    pub async fn bind(mut self) -> Result<Endpoint, Error> {
        if let Some(chain) = self.chain.take() {
            self.config.certificate_chain = Some(chain?);
        }
        if self.authorizer.trust_state().is_some() {
            // spec §5.5: with a trust check, initiators check the responder's certificate too.
            self.config.authorize_responder = true;
        }
        if self.config.static_dh_cache.is_none() && self.limits.static_dh_cache > 0 {
            // One cache for the endpoint: TCP and UDP connections share it (same identity).
            self.config.static_dh_cache = Some(Arc::new(StaticDhCache::new(self.limits.static_dh_cache)));
        }
        let mut stream = self.config.clone();
        stream.mode = Mode::Stream;
        let mut datagram = self.config;
        datagram.mode = Mode::Datagram;
        let datagram_size = self.limits.datagram_size.clamp(veil_protocol::wire::MIN_PACKET_LEN, MAX_DATAGRAM_SIZE);
        datagram.limits.max_packet_len = datagram.limits.packet_len().min(datagram_size);

        let listener = match self.tcp {
            Some(addr) => Some(tcp::listen(addr, &self.limits)?),
            None => None,
        };
        let udp = match self.udp {
            Some(addr) => Some(Arc::new(udp::UdpShared::bind(addr).await?)),
            None => None,
        };
        let tcp_addr = listener.as_ref().map(tokio::net::TcpListener::local_addr).transpose()?;
        let udp_addr = udp.as_ref().map(|u| u.socket.local_addr()).transpose()?;

        let (accept_tx, accept_rx) = mpsc::channel(self.limits.accept_queue.max(1));
        let shared = Arc::new(EndpointShared {
            clock: Clock::new(),
            stream_config: Arc::new(stream),
            datagram_config: Arc::new(datagram),
            kk_initiator: self.kk_initiator,
            authorizer: self.authorizer,
            routing: self.routing,
            rate: RateLimiter::new(self.limits.handshake_rate_per_ip, self.limits.handshake_burst_per_ip),
            limits: self.limits,
            counters: Counters::default(),
            failures: broadcast::channel(FAILURE_BACKLOG).0,
            revocations: broadcast::channel(FAILURE_BACKLOG).0,
            shutdown: CancellationToken::new(),
            accept_tx,
            udp: udp.clone(),
            next_id: AtomicU64::new(1),
        });
        let listening = CancellationToken::new();
        if let Some(listener) = listener {
            let span = tracing::info_span!("veil_tcp_listener", addr = ?tcp_addr);
            tokio::spawn(tcp::accept_loop(Arc::clone(&shared), listener, listening.clone()).instrument(span));
        }
        if let Some(udp) = udp {
            let span = tracing::info_span!("veil_udp_socket", addr = ?udp_addr);
            tokio::spawn(udp::socket_loop(Arc::clone(&shared), udp, listening.clone()).instrument(span));
        }
        Ok(Endpoint {
            inner: Arc::new(EndpointHandle {
                shared,
                accept_rx: tokio::sync::Mutex::new(accept_rx),
                listening,
                tcp_addr,
                udp_addr,
            }),
        })
    }
}

#[derive(Debug)]
struct EndpointHandle {
    shared: Arc<EndpointShared>,
    accept_rx: tokio::sync::Mutex<mpsc::Receiver<Connection>>,
    /// Cancelled when the last `Endpoint` handle is dropped: stop accepting.
    listening: CancellationToken,
    tcp_addr: Option<SocketAddr>,
    udp_addr: Option<SocketAddr>,
}

impl Drop for EndpointHandle {
    fn drop(&mut self) {
        self.listening.cancel();
    }
}

/// A Veil node on the network: listens on TCP and/or UDP, accepts authenticated
/// connections and connects out.
///
/// Cheap to clone. Dropping the last clone stops accepting; established connections
/// go on until they close. [`Endpoint::close`] ends them all.
#[derive(Debug, Clone)]
pub struct Endpoint {
    inner: Arc<EndpointHandle>,
}

impl Endpoint {
    /// A builder for an endpoint with this identity and Veil's defaults (IK,
    /// ChaChaPoly/BLAKE2s, spec timers).
    #[must_use]
    pub fn builder(identity: StaticKeypair) -> EndpointBuilder {
        EndpointBuilder::from_config(Config::new(identity, Mode::Stream))
    }

    /// The next inbound connection: handshake complete, peer authorized and confirmed.
    /// Peers that fail or are denied never show up here (see
    /// [`Endpoint::handshake_failures`]).
    ///
    /// # Errors
    /// [`Error::EndpointClosed`] after [`Endpoint::close`].
    pub async fn accept(&self) -> Result<Connection, Error> {
        let mut rx = self.inner.accept_rx.lock().await;
        tokio::select! {
            c = rx.recv() => c.ok_or(Error::EndpointClosed),
            () = self.inner.shared.shutdown.cancelled() => Err(Error::EndpointClosed),
        }
    }

    /// Connects over TCP. `remote_static` is the peer's key when the pattern needs it in
    /// advance (IK, KK, IKpsk2); `None` for XX. Returns once the session is established.
    ///
    /// # Errors
    /// [`Error::Io`], [`Error::ConnectTimeout`], [`Error::Protocol`] for a failed or
    /// rejected handshake, [`Error::TooManyConnections`].
    pub async fn connect_tcp(&self, addr: SocketAddr, remote_static: Option<PublicKey>) -> Result<Connection, Error> {
        tcp::connect(&self.inner.shared, addr, remote_static, None).await
    }

    /// Connects over UDP through the endpoint's socket (see
    /// [`EndpointBuilder::bind_udp`]). Handshake packets are retransmitted with backoff.
    ///
    /// # Errors
    /// [`Error::NotBound`] without a UDP socket; otherwise as [`Endpoint::connect_tcp`].
    pub async fn connect_udp(&self, addr: SocketAddr, remote_static: Option<PublicKey>) -> Result<Connection, Error> {
        udp::connect(&self.inner.shared, addr, remote_static, None).await
    }

    /// Connects over `transport`.
    ///
    /// # Errors
    /// As [`Endpoint::connect_tcp`] and [`Endpoint::connect_udp`].
    pub async fn connect(
        &self,
        transport: Transport,
        addr: SocketAddr,
        remote_static: Option<PublicKey>,
    ) -> Result<Connection, Error> {
        match transport {
            Transport::Tcp => self.connect_tcp(addr, remote_static).await,
            Transport::Udp => self.connect_udp(addr, remote_static).await,
        }
    }

    /// Connects over `transport`, expecting a peer certified with one of `expected` roles
    /// (spec §15.6) instead of the authorizer's [`PeerRoles::outbound`]. For example a
    /// gateway's uplink expects `RoleSet::CLOUD`; a device expects `RoleSet::UPSTREAM`.
    ///
    /// [`PeerRoles::outbound`]: crate::PeerRoles::outbound
    ///
    /// # Errors
    /// As [`Endpoint::connect`]; a responder that fails the check is denied
    /// ([`Error::deny_reason`]).
    pub async fn connect_expecting(
        &self,
        transport: Transport,
        addr: SocketAddr,
        remote_static: Option<PublicKey>,
        expected: RoleSet,
    ) -> Result<Connection, Error> {
        let ep = &self.inner.shared;
        match transport {
            Transport::Tcp => tcp::connect(ep, addr, remote_static, Some(expected)).await,
            Transport::Udp => udp::connect(ep, addr, remote_static, Some(expected)).await,
        }
    }

    /// The trust state of the endpoint's [`Authorizer::trust`](crate::Authorizer::trust).
    #[must_use]
    pub fn trust_state(&self) -> Option<&TrustState> {
        self.inner.shared.authorizer.trust_state()
    }

    /// Applies a revocation list (spec §15.5, §15.8): verified against the trust anchors and
    /// the held epoch; if accepted, every live connection whose peer is now revoked closes
    /// with reason `Revoked` (within a second; each connection re-checks on its own task).
    /// The list is shared with every endpoint built with the same [`TrustState`].
    ///
    /// # Errors
    /// [`Error::NoTrust`] without a trust state; [`Error::Trust`] for a list that does not
    /// verify (`BadSignature`, `UnknownIssuer`), is stale (`StaleRevocationList`) or
    /// malformed: the current list stays in force, and the reason is logged.
    pub fn update_revocation_list(&self, list: &[u8]) -> Result<RevocationUpdate, Error> {
        let state = self.trust_state().ok_or(Error::NoTrust)?;
        Ok(state.update_revocation_list(list)?)
    }

    /// Subscribes to the revocation lists peers push over sessions (spec §15.8). With a
    /// trust state each is applied before it is published (see
    /// [`ReceivedRevocationList::result`]). Only lists after the call are seen.
    #[must_use]
    pub fn revocation_lists(&self) -> broadcast::Receiver<ReceivedRevocationList> {
        self.inner.shared.revocations.subscribe()
    }

    /// Stops accepting and closes every connection with `ShuttingDown`.
    pub fn close(&self) {
        self.inner.listening.cancel();
        self.inner.shared.shutdown.cancel();
    }

    /// The TCP listening address, if listening.
    #[must_use]
    pub fn local_tcp_addr(&self) -> Option<SocketAddr> {
        self.inner.tcp_addr
    }

    /// The UDP socket's address, if bound.
    #[must_use]
    pub fn local_udp_addr(&self) -> Option<SocketAddr> {
        self.inner.udp_addr
    }

    /// This endpoint's static public key.
    #[must_use]
    pub fn public_key(&self) -> PublicKey {
        *self.inner.shared.stream_config.public_key()
    }

    /// Counters.
    #[must_use]
    pub fn stats(&self) -> EndpointStats {
        let c = &self.inner.shared.counters;
        EndpointStats {
            connections: c.connections.load(Ordering::Acquire),
            handshakes: c.handshakes.load(Ordering::Acquire),
            accepted: c.accepted.load(Ordering::Relaxed),
            handshake_failures: c.handshake_failures.load(Ordering::Relaxed),
            refused_rate_limited: c.refused_rate_limited.load(Ordering::Relaxed),
            refused_busy: c.refused_busy.load(Ordering::Relaxed),
            datagrams_dropped: c.datagrams_dropped.load(Ordering::Relaxed),
            cookies_sent: c.cookies_sent.load(Ordering::Relaxed),
            cookies_refused: c.cookies_refused.load(Ordering::Relaxed),
            cookies_accepted: c.cookies_accepted.load(Ordering::Relaxed),
            routing_dropped: c.routing_dropped.load(Ordering::Relaxed),
            static_dh_cache: self
                .inner
                .shared
                .stream_config
                .static_dh_cache
                .as_ref()
                .map(|cache| cache.stats())
                .unwrap_or_default(),
        }
    }

    /// Subscribes to inbound failures: peers refused by a limit or whose handshake failed,
    /// with a typed error each. Only failures after the call are seen.
    #[must_use]
    pub fn handshake_failures(&self) -> broadcast::Receiver<HandshakeFailure> {
        self.inner.shared.failures.subscribe()
    }
}
