//! The gateway role (spec §16): accepts devices over TCP and UDP, keeps one uplink to the
//! cloud, and passes end-to-end envelopes between them without being able to read them.
//!
//! One [`veil_transports::Endpoint`] (with routing on) serves both directions: it accepts
//! device links and connects the uplink. A single task owns the forwarding state
//! ([`veil_protocol::relay::Relay`], sans-IO) and the table of live links; one task per link
//! reads it, and the uplink task reconnects with exponential backoff and full jitter. The
//! gateway holds its own static key and its link sessions' keys, and nothing of any
//! end-to-end session (spec §16.6 "What the relay holds").
//!
//! Revocation lists the cloud pushes over the uplink are applied by the endpoint's trust
//! state (devices now revoked are closed, spec §15.8), withdrawn from the cloud with reason
//! `Revoked`, and pushed on to every attached device.
//!
//! With a spool ([`GatewaySettings::spool`], `[spool]`; spec §17.9) the gateway takes custody
//! of device packets while its uplink is down: it stores them durably (on a thread of its
//! own, in batches: one commit per batch), acknowledges them with `Stored`, answers what does
//! not fit with `Unreachable { SpoolFull }`, and replays them to the cloud, oldest first,
//! once the uplink is back; newer packets of a device with packets in the spool queue behind
//! them. Stored packets expire after the spool's ttl; a revoked device's are dropped.

mod spooler;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Config, ConfigError};
use crate::metrics::{self as m, labels};
use crate::spool::{Appended, FullReason, SpoolConfig, SpoolError};
use crate::trustload::LoadedNode;
use bytes::Bytes;
use rand::Rng;
use spooler::{Answer, Done, Pending, Spooler, REPLAY_IDLE, REPLAY_RETRY};
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use veil_protocol::relay::{LinkId, LinkKind, Relay, RelayLimits, Verdict};
use veil_protocol::routing::{RouteReason, RoutingError, RoutingMessage};
use veil_protocol::trust::{CertificateChain, NodeId};
use veil_protocol::{CloseReason, PublicKey, StaticKeypair, Suite};
use veil_transports::{
    Authorizer, Clock, Connection, Endpoint, EndpointLimits, Error as TransportError, Received, Transport, TrySendError,
};

/// Everything a gateway needs to start.
#[derive(Clone)]
pub struct GatewaySettings {
    /// The gateway's static key pair (its identity on both sides).
    pub identity: StaticKeypair,
    /// Its certificate chain (fleet-CA mode).
    pub certificate_chain: Option<CertificateChain>,
    /// Who may connect and whom the uplink accepts (allowlist or fleet CA).
    pub authorizer: Authorizer,
    /// Device links over TCP.
    pub listen_tcp: Option<SocketAddr>,
    /// Device links over UDP.
    pub listen_udp: Option<SocketAddr>,
    /// The cloud's address.
    pub uplink: SocketAddr,
    /// The uplink's carrier.
    pub uplink_transport: Transport,
    /// The cloud's static key (the uplink is pinned to it).
    pub cloud_key: PublicKey,
    /// The cipher suite the uplink offers (the gateway connects nothing else).
    pub uplink_suite: Suite,
    /// First reconnect delay; doubles up to `backoff_max`, with full jitter.
    pub backoff_initial: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// Endpoint limits (connections, handshakes, queues, timeouts).
    pub limits: EndpointLimits,
    /// Protocol limits (timeouts, packet sizes).
    pub protocol_limits: veil_protocol::Limits,
    /// Forwarding-state bounds.
    pub relay_limits: RelayLimits,
    /// An audit tap: a copy of every end-to-end packet the gateway passes on (shared
    /// buffers, no copy of the bytes) is offered here and dropped if the tap is full. It
    /// shows what the gateway sees of device traffic: opaque routed packets (spec §16.6).
    /// The `demo` uses it to check that no payload is readable at the gateway.
    pub tap: Option<mpsc::Sender<Bytes>>,
    /// The spool (spec §17.9): `None`, packets for the cloud are dropped while the uplink is
    /// down (`Unreachable { UplinkDown }`).
    pub spool: Option<SpoolConfig>,
}

impl std::fmt::Debug for GatewaySettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The identity stays out of logs.
        f.debug_struct("GatewaySettings")
            .field("listen_tcp", &self.listen_tcp)
            .field("listen_udp", &self.listen_udp)
            .field("uplink", &self.uplink)
            .field("uplink_transport", &self.uplink_transport)
            .field("uplink_suite", &self.uplink_suite)
            .field("cloud_key", &self.cloud_key)
            .finish_non_exhaustive()
    }
}

impl GatewaySettings {
    /// Settings with the defaults: TCP uplink, backoff 200 ms to 30 s, default limits.
    #[must_use]
    pub fn new(identity: StaticKeypair, authorizer: Authorizer, uplink: SocketAddr, cloud_key: PublicKey) -> Self {
        Self {
            identity,
            certificate_chain: None,
            authorizer,
            listen_tcp: None,
            listen_udp: None,
            uplink,
            uplink_transport: Transport::Tcp,
            cloud_key,
            uplink_suite: Suite::ChaChaPolyBlake2s,
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            limits: EndpointLimits::default(),
            protocol_limits: veil_protocol::Limits::default(),
            relay_limits: RelayLimits::default(),
            tap: None,
            spool: None,
        }
    }

    /// Settings from a gateway's configuration and its loaded files.
    ///
    /// # Errors
    /// [`ConfigError`] naming the key: the configuration is not a gateway's (no `[uplink]`).
    pub fn from_node(node: &LoadedNode, config: &Config) -> Result<Self, ConfigError> {
        let (Some(uplink), Some(cloud_key)) = (&config.uplink, node.cloud_key) else {
            return Err(ConfigError::File { key: "uplink".into(), message: "a gateway needs [uplink]".into() });
        };
        let authorizer = Authorizer::trust(node.trust.clone(), node.peer_roles);
        let mut s = Self::new(node.identity.clone(), authorizer, uplink.address, cloud_key);
        s.certificate_chain.clone_from(&node.certificate_chain);
        s.listen_tcp = config.listen.tcp;
        s.listen_udp = config.listen.udp;
        s.uplink_transport = uplink.transport;
        s.uplink_suite = uplink.suite;
        s.backoff_initial = uplink.backoff_initial();
        s.backoff_max = uplink.backoff_max();
        s.limits = node.limits.clone();
        s.protocol_limits = node.protocol_limits;
        s.spool = config.spool.as_ref().map(crate::config::SpoolConfig::spool_config);
        Ok(s)
    }
}

/// Why a gateway could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    /// The endpoint could not be bound (address in use, bad certificate chain, …).
    #[error("cannot start the gateway endpoint: {0}")]
    Bind(#[source] TransportError),
    /// Neither a TCP nor a UDP device listener is configured.
    #[error("no device listener: configure listen.tcp and/or listen.udp")]
    NoListener,
    /// The spool could not be opened.
    #[error("cannot open the spool: {0}")]
    Spool(#[source] SpoolError),
}

/// Gateway counters (a snapshot).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct GatewayStats {
    /// Devices attached now.
    pub attached: u64,
    /// Whether the uplink is up.
    pub uplink_up: bool,
    /// Uplink connections made (the first one included).
    pub uplink_connects: u64,
    /// Envelopes passed on.
    pub forwarded: u64,
    /// Bytes of end-to-end packets passed on.
    pub forwarded_bytes: u64,
    /// Envelopes dropped (any reason; the relay's stats have the reasons).
    pub dropped: u64,
    /// Data messages from devices (a gateway carries only envelopes): dropped.
    pub data_dropped: u64,
    /// Packets stored in the spool (spec §17.9).
    pub spool_appended: u64,
    /// Stored packets replayed to the cloud.
    pub spool_replayed: u64,
    /// Packets the spool did not take (answered `SpoolFull`).
    pub spool_refused: u64,
    /// Packets in the spool now.
    pub spool_packets: u64,
}

#[derive(Debug, Default)]
struct Counters {
    attached: AtomicU64,
    uplink_up: AtomicBool,
    uplink_connects: AtomicU64,
    forwarded: AtomicU64,
    forwarded_bytes: AtomicU64,
    dropped: AtomicU64,
    data_dropped: AtomicU64,
    spool_appended: AtomicU64,
    spool_replayed: AtomicU64,
    spool_refused: AtomicU64,
    spool_packets: AtomicU64,
}

/// What the link tasks tell the forwarding task.
enum Input {
    Up {
        link: LinkId,
        conn: Connection,
        kind: LinkKind,
    },
    Routing {
        link: LinkId,
        msg: RoutingMessage,
    },
    Down {
        link: LinkId,
        revoked: bool,
    },
    /// A revocation list the uplink pushed and the trust state accepted: on to the devices.
    Revocations {
        connection: u64,
        list: Bytes,
    },
    /// Graceful shutdown: tell every device, then close the links.
    Drain,
}

/// A running gateway.
#[derive(Debug)]
pub struct Gateway {
    endpoint: Endpoint,
    counters: Arc<Counters>,
    stop: CancellationToken,
    inputs: mpsc::Sender<Input>,
    tasks: JoinSet<()>,
    uplink: Arc<std::sync::Mutex<Option<Connection>>>,
}

/// Queue between the link tasks and the forwarding task.
const INPUT_QUEUE: usize = 4_096;

impl Gateway {
    /// Binds the device listeners and starts the forwarding and uplink tasks.
    ///
    /// # Errors
    /// [`GatewayError`].
    pub async fn start(settings: GatewaySettings) -> Result<Self, GatewayError> {
        if settings.listen_tcp.is_none() && settings.listen_udp.is_none() {
            return Err(GatewayError::NoListener);
        }
        let mut b = Endpoint::builder(settings.identity.clone())
            .authorizer(settings.authorizer.clone())
            .protocol_limits(settings.protocol_limits)
            .limits(settings.limits.clone())
            .suite(settings.uplink_suite)
            .routing(true);
        if let Some(chain) = &settings.certificate_chain {
            b = b.certificate_chain(chain);
        }
        if let Some(a) = settings.listen_tcp {
            b = b.listen_tcp(a);
        }
        match settings.listen_udp {
            Some(a) => b = b.bind_udp(a),
            // A UDP uplink needs a socket even without UDP devices: any local port.
            None if settings.uplink_transport == Transport::Udp => {
                let any: std::net::IpAddr = if settings.uplink.is_ipv4() {
                    std::net::Ipv4Addr::UNSPECIFIED.into()
                } else {
                    std::net::Ipv6Addr::UNSPECIFIED.into()
                };
                b = b.bind_udp(SocketAddr::new(any, 0));
            }
            None => {}
        }
        let cloud = NodeId::from_public_key(&settings.cloud_key);
        let mut relay = Relay::new(settings.relay_limits);
        let (spooler, spool_answers) = match settings.spool.clone() {
            Some(config) => {
                let (spooler, answers, sources) = spooler::start(config).await.map_err(GatewayError::Spool)?;
                // spec §17.9: what a restarted gateway holds goes out first, and its devices'
                // newer packets queue behind it.
                relay.set_custody(true);
                for source in &sources {
                    relay.set_spooling(*source, cloud, true);
                }
                tracing::info!(packets = spooler.stats.entries, devices = sources.len(), "spool open");
                #[allow(clippy::cast_precision_loss)]
                {
                    metrics::gauge!(m::SPOOL_PACKETS).set(spooler.stats.entries as f64);
                    metrics::gauge!(m::SPOOL_BYTES).set(spooler.stats.bytes as f64);
                }
                (Some(spooler), Some(answers))
            }
            None => (None, None),
        };
        let endpoint = b.bind().await.map_err(GatewayError::Bind)?;
        let counters = Arc::new(Counters::default());
        if let Some(sp) = &spooler {
            counters.spool_packets.store(sp.stats.entries, Ordering::Relaxed);
        }
        let stop = CancellationToken::new();
        let (tx, rx) = mpsc::channel(INPUT_QUEUE);
        let next_link = Arc::new(AtomicU64::new(1));
        let uplink = Arc::new(std::sync::Mutex::new(None));
        let mut tasks = JoinSet::new();
        let forwarder = Forwarder {
            relay,
            links: HashMap::new(),
            clock: Clock::new(),
            counters: Arc::clone(&counters),
            draining: false,
            tap: settings.tap.clone(),
            uplink: Arc::clone(&uplink),
            cloud,
            spooler,
            replay_at: None,
            expire_at: None,
            backlogs: HashMap::new(),
        };
        tasks.spawn(forwarder.run(rx, spool_answers, stop.clone()).instrument(tracing::info_span!("veil_gateway")));
        tasks.spawn(accept_loop(
            endpoint.clone(),
            tx.clone(),
            Arc::clone(&next_link),
            Arc::clone(&counters),
            stop.clone(),
        ));
        tasks.spawn(uplink_loop(
            endpoint.clone(),
            settings,
            tx.clone(),
            next_link,
            Arc::clone(&counters),
            stop.clone(),
        ));
        tasks.spawn(revocation_loop(endpoint.revocation_lists(), tx.clone(), stop.clone()));
        tasks.spawn(count_handshake_failures(endpoint.handshake_failures(), stop.clone()));
        Ok(Self { endpoint, counters, stop, inputs: tx, tasks, uplink })
    }

    /// The TCP address devices connect to.
    #[must_use]
    pub fn local_tcp_addr(&self) -> Option<SocketAddr> {
        self.endpoint.local_tcp_addr()
    }

    /// The UDP address devices connect to.
    #[must_use]
    pub fn local_udp_addr(&self) -> Option<SocketAddr> {
        self.endpoint.local_udp_addr()
    }

    /// The gateway's endpoint (its stats, trust state, revocation updates).
    #[must_use]
    pub const fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Counters.
    #[must_use]
    pub fn stats(&self) -> GatewayStats {
        let c = &self.counters;
        GatewayStats {
            attached: c.attached.load(Ordering::Relaxed),
            uplink_up: c.uplink_up.load(Ordering::Relaxed),
            uplink_connects: c.uplink_connects.load(Ordering::Relaxed),
            forwarded: c.forwarded.load(Ordering::Relaxed),
            forwarded_bytes: c.forwarded_bytes.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            data_dropped: c.data_dropped.load(Ordering::Relaxed),
            spool_appended: c.spool_appended.load(Ordering::Relaxed),
            spool_replayed: c.spool_replayed.load(Ordering::Relaxed),
            spool_refused: c.spool_refused.load(Ordering::Relaxed),
            spool_packets: c.spool_packets.load(Ordering::Relaxed),
        }
    }

    /// The current uplink's counters (bytes on the wire), if it is up.
    #[must_use]
    pub fn uplink_stats(&self) -> Option<veil_protocol::ConnectionStats> {
        let up = self.uplink.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        up.as_ref().filter(|c| !c.is_closed()).map(Connection::stats)
    }

    /// The current uplink's cipher suite (`uplink.suite`), if it is up.
    #[must_use]
    pub fn uplink_suite(&self) -> Option<Suite> {
        let up = self.uplink.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        up.as_ref().filter(|c| !c.is_closed()).and_then(Connection::suite)
    }

    /// Graceful drain (SIGTERM): stops taking devices, lets every device link and the uplink
    /// send what they have queued, closes them with `ShuttingDown`, and waits (at most
    /// `grace`) for the tasks to end.
    pub async fn shutdown(mut self, grace: Duration) {
        let _ = self.inputs.send(Input::Drain).await;
        let _ = tokio::time::timeout(grace, async {
            // The forwarding task ends once every link it knew has closed.
            while self.counters.attached.load(Ordering::Relaxed) > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        self.stop.cancel();
        self.endpoint.close();
        let _ = tokio::time::timeout(grace, async { while self.tasks.join_next().await.is_some() {} }).await;
        self.tasks.abort_all();
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Inputs the forwarder takes per wake-up.
const FORWARD_BATCH: usize = 64;

/// The forwarding task: owns the relay state and the links.
struct Forwarder {
    relay: Relay,
    links: HashMap<LinkId, (Connection, LinkKind)>,
    clock: Clock,
    counters: Arc<Counters>,
    draining: bool,
    tap: Option<mpsc::Sender<Bytes>>,
    uplink: Arc<std::sync::Mutex<Option<Connection>>>,
    /// The cloud's node id (the uplink is pinned to its key): what the spool stores for.
    cloud: NodeId,
    /// The spool, when configured (spec §17.9).
    spooler: Option<Spooler>,
    /// When to try the replay again (the uplink's queue or table was full).
    replay_at: Option<tokio::time::Instant>,
    /// When expiry runs next (while the spool holds packets).
    expire_at: Option<tokio::time::Instant>,
    /// Announcements and withdrawals waiting for room in their link's queue, per link (see
    /// [`Backlog`]).
    backlogs: HashMap<LinkId, Arc<std::sync::Mutex<Backlog>>>,
}

/// Announcements and withdrawals (spec §16.4.1: they must arrive, in order) that found their
/// link's queue full: a new uplink is told every attached device's route at once, far more
/// than a connection's queue holds. A task sends them in order as the queue frees; while it
/// runs, later ones queue behind them. Beyond [`MAX_BACKLOG`] the link is closed as before.
#[derive(Debug, Default)]
struct Backlog {
    queue: std::collections::VecDeque<RoutingMessage>,
    /// A task is sending the queue.
    active: bool,
}

/// Announcements and withdrawals held for one link at most.
const MAX_BACKLOG: usize = 1 << 17;

/// Sends a link's backlog in order, waiting for room; ends when it is empty or the link is.
async fn send_backlog(conn: Connection, backlog: Arc<std::sync::Mutex<Backlog>>) {
    loop {
        let next = {
            let mut b = backlog.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let next = b.queue.pop_front();
            if next.is_none() {
                b.active = false;
            }
            next
        };
        let Some(msg) = next else { return };
        if conn.send_routing(msg).await.is_err() {
            // The link ended: its peer starts over with a fresh table.
            let mut b = backlog.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            b.queue.clear();
            b.active = false;
            return;
        }
    }
}

impl Forwarder {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Input>,
        mut spool: Option<mpsc::Receiver<Answer>>,
        stop: CancellationToken,
    ) {
        loop {
            let deadline = self.relay.poll_timeout().map(|t| self.clock.instant(t));
            let spool_timer = match (self.replay_at, self.expire_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            tokio::select! {
                () = stop.cancelled() => break,
                input = rx.recv() => match input {
                    Some(input) => {
                        self.on_input(input);
                        // What else is queued goes in the same turn (at most FORWARD_BATCH): the
                        // envelopes share the uplink's wake-ups and packets, and the bookkeeping
                        // below runs once per batch.
                        for _ in 1..FORWARD_BATCH {
                            let Ok(input) = rx.try_recv() else { break };
                            self.on_input(input);
                        }
                    }
                    None => break,
                },
                answer = recv_answer(&mut spool) => match answer {
                    Some(a) => self.on_spool(a),
                    None => {
                        tracing::error!("the spool thread ended; custody stops");
                        spool = None;
                        self.spooler = None;
                        self.relay.set_custody(false);
                    }
                },
                () = sleep_until(deadline) => self.relay.handle_timeout(self.clock.now()),
                () = sleep_until(spool_timer) => self.on_spool_timer(),
            }
            self.flush();
            self.spool_work();
            let attached = self.links.values().filter(|(_, k)| *k == LinkKind::Device).count();
            self.counters.attached.store(attached as u64, Ordering::Relaxed);
            #[allow(clippy::cast_precision_loss)]
            {
                metrics::gauge!(m::QUEUE_DEPTH, labels::QUEUE => "forwarder_input").set(rx.len() as f64);
                metrics::gauge!(m::QUEUE_DEPTH, labels::QUEUE => "relay_output").set(self.relay.queued() as f64);
            }
        }
    }

    fn on_input(&mut self, input: Input) {
        let now = self.clock.now();
        match input {
            Input::Up { link, conn, kind } => {
                if self.draining {
                    let conn = conn.clone();
                    tokio::spawn(async move { conn.close(CloseReason::ShuttingDown).await });
                    return;
                }
                let peer = NodeId::from_public_key(&conn.remote_static());
                let lossy = conn.transport() == Transport::Udp;
                // spec §16.4.1: a node attaching again replaces its older link, which is closed.
                let older = self.relay.link_of(&peer).filter(|l| *l != link);
                match self.relay.link_up(now, link, peer, kind, lossy, conn.max_envelope_len()) {
                    Ok(()) => {
                        tracing::info!(link, %peer, ?kind, transport = %conn.transport(), "link up");
                        if kind == LinkKind::Uplink {
                            *self.uplink.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(conn.clone());
                        }
                        if let Some((old, old_kind)) = older.and_then(|l| self.links.remove(&l)) {
                            tracing::info!(link = older, %peer, "older link of the node replaced");
                            metrics::gauge!(m::CONNECTIONS, labels::ROLE => role_label(old_kind), labels::TRANSPORT => old.transport().to_string()).decrement(1.0);
                            tokio::spawn(async move { old.close(CloseReason::Normal).await });
                        }
                        metrics::gauge!(m::CONNECTIONS, labels::ROLE => role_label(kind), labels::TRANSPORT => conn.transport().to_string()).increment(1.0);
                        self.links.insert(link, (conn, kind));
                    }
                    Err(e) => {
                        tracing::warn!(link, %peer, error = %e, "link refused by the relay");
                        tokio::spawn(async move { conn.close(CloseReason::InternalError).await });
                    }
                }
            }
            Input::Routing { link, msg } => self.on_routing(now, link, msg),
            Input::Down { link, revoked } => {
                self.backlogs.remove(&link);
                let Some((conn, kind)) = self.links.remove(&link) else { return };
                metrics::gauge!(m::CONNECTIONS, labels::ROLE => role_label(kind), labels::TRANSPORT => conn.transport().to_string()).decrement(1.0);
                let peer = NodeId::from_public_key(&conn.remote_static());
                if revoked {
                    self.relay.revoke(now, &peer);
                    // spec §17.9: a revoked device's stored packets are dropped.
                    if let Some(sp) = &mut self.spooler {
                        let n = sp.drop_source(peer);
                        if n > 0 {
                            metrics::counter!(m::SPOOL_DROPPED, labels::REASON => "revoked").increment(n as u64);
                        }
                    }
                }
                self.relay.link_down(now, link);
                tracing::info!(link, %peer, revoked, "link down");
            }
            Input::Revocations { connection, list } => {
                // Only lists from the cloud go on (spec §15.8).
                let from_uplink = self.links.values().any(|(c, k)| *k == LinkKind::Uplink && c.id() == connection);
                if !from_uplink {
                    return;
                }
                for (conn, kind) in self.links.values() {
                    if *kind == LinkKind::Device {
                        let conn = conn.clone();
                        let list = list.clone();
                        tokio::spawn(async move {
                            if let Err(e) = conn.push_revocation_list(list).await {
                                tracing::debug!(error = %e, "revocation list not pushed to a device");
                            }
                        });
                    }
                }
            }
            Input::Drain => {
                self.draining = true;
                for (conn, _) in self.links.values() {
                    let conn = conn.clone();
                    tokio::spawn(async move { conn.close(CloseReason::ShuttingDown).await });
                }
            }
        }
    }

    fn on_routing(&mut self, now: veil_protocol::Timestamp, link: LinkId, msg: RoutingMessage) {
        let route = msg.route();
        if let RoutingMessage::Forward { packet, .. } = &msg {
            let hop = match self.links.get(&link) {
                Some((_, LinkKind::Uplink)) => labels::UPLINK,
                _ => labels::DEVICE,
            };
            metrics::counter!(m::BYTES, labels::DIRECTION => labels::IN, labels::HOP => hop)
                .increment(packet.len() as u64);
        }
        let verdict = self.relay.on_routing(now, link, msg);
        // A `Route` the relay made for this envelope must leave before it (spec §16.3).
        self.flush();
        match verdict {
            Verdict::Forward { link: out, msg } => {
                let len = match &msg {
                    RoutingMessage::Deliver { packet, .. } => packet.len() as u64,
                    _ => 0,
                };
                let out_kind = self.links.get(&out).map(|(_, k)| *k);
                let Some((conn, _)) = self.links.get(&out) else {
                    self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                // Announcements still waiting for the link would arrive after this envelope,
                // which may name one of them (spec §16.3): the link counts as full.
                let sent = if self.backlogged(out) {
                    Err(TrySendError::Full(msg))
                } else {
                    if let (Some(tap), RoutingMessage::Deliver { packet, .. }) = (&self.tap, &msg) {
                        let _ = tap.try_send(packet.clone());
                    }
                    conn.try_send_routing(msg)
                };
                match sent {
                    Ok(()) => {
                        self.counters.forwarded.fetch_add(1, Ordering::Relaxed);
                        self.counters.forwarded_bytes.fetch_add(len, Ordering::Relaxed);
                        metrics::counter!(m::FORWARDED).increment(1);
                        let hop = if out_kind == Some(LinkKind::Uplink) { labels::UPLINK } else { labels::DEVICE };
                        metrics::counter!(m::BYTES, labels::DIRECTION => labels::OUT, labels::HOP => hop)
                            .increment(len);
                    }
                    Err(TrySendError::Full(_)) => {
                        self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!(m::ROUTING_DROPS, labels::REASON => "congested").increment(1);
                        self.relay.congested(now, link, route);
                    }
                    Err(e) => {
                        self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!(m::ROUTING_DROPS, labels::REASON => "link_closed").increment(1);
                        tracing::debug!(error = ?e, "envelope not passed on");
                    }
                }
            }
            Verdict::Dropped(reason) => {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(m::ROUTING_DROPS, labels::REASON => drop_label(&reason)).increment(1);
                tracing::debug!(link, route, %reason, "envelope dropped");
            }
            Verdict::Spool { link, source, destination, route, generation, counter_lo, packet } => {
                let p = Pending { link, route, generation, counter_lo, source, destination, packet };
                let refused = match &mut self.spooler {
                    Some(sp) => sp.push(p).is_err(),
                    None => true,
                };
                if refused {
                    self.refuse(now, link, route, "queue");
                }
            }
            _ => {}
        }
    }

    /// A packet the spool did not take: counted, answered `SpoolFull` (rate limited).
    fn refuse(&mut self, now: veil_protocol::Timestamp, link: LinkId, route: u32, reason: &'static str) {
        self.counters.spool_refused.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::SPOOL_REFUSED, labels::REASON => reason).increment(1);
        self.relay.spool_full(now, link, route);
    }

    /// Starts what the spool can do now: the next append, the next replay batch.
    fn spool_work(&mut self) {
        let Some(sp) = &mut self.spooler else { return };
        sp.maybe_append();
        // spec §17.9: replay once the uplink is Connected again to the node the packets are for.
        let up = self.relay.uplink().is_some_and(|(_, c)| c == self.cloud);
        if up && !sp.replaying && sp.stats.entries > 0 && self.replay_at.is_none() {
            sp.peek(self.cloud);
        }
        if sp.stats.entries > 0 && self.expire_at.is_none() {
            self.expire_at = Some(tokio::time::Instant::now() + sp.expire_every);
        }
    }

    fn on_spool_timer(&mut self) {
        let now = tokio::time::Instant::now();
        if self.replay_at.is_some_and(|t| t <= now) {
            self.replay_at = None;
        }
        if self.expire_at.is_some_and(|t| t <= now) {
            self.expire_at = None;
            if let Some(sp) = &mut self.spooler {
                sp.expire();
            }
        }
    }

    fn on_spool(&mut self, answer: Answer) {
        let now = self.clock.now();
        let Answer { done, stats, emptied } = answer;
        match done {
            Done::Appended { batch, outcomes } => {
                if let Some(sp) = &mut self.spooler {
                    sp.appended(&batch);
                }
                match outcomes {
                    Ok(outcomes) => {
                        for (p, outcome) in batch.iter().zip(outcomes) {
                            match outcome {
                                Appended::Stored { .. } => {
                                    self.counters.spool_appended.fetch_add(1, Ordering::Relaxed);
                                    metrics::counter!(m::SPOOL_APPENDED).increment(1);
                                    // Durable now: the custody notice may go (spec §17.9).
                                    self.relay.stored(now, p.link, p.route, p.generation, p.counter_lo);
                                }
                                Appended::Full(FullReason::Total) => self.refuse(now, p.link, p.route, "total"),
                                Appended::Full(FullReason::Source) => self.refuse(now, p.link, p.route, "per_device"),
                                Appended::BadSize => self.refuse(now, p.link, p.route, "bad_size"),
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, packets = batch.len(), "spool append failed");
                        for p in &batch {
                            self.refuse(now, p.link, p.route, "storage");
                        }
                    }
                }
            }
            // Entries, but none for this cloud (stored for another one, spec §17.9: they wait
            // for their ttl): look again later rather than at once.
            Done::Peeked(Ok(entries)) if entries.is_empty() => {
                self.stop_replay(false);
                self.replay_at = Some(tokio::time::Instant::now() + REPLAY_IDLE);
            }
            Done::Peeked(Ok(entries)) => self.replay(now, entries),
            Done::Peeked(Err(e)) => {
                tracing::warn!(error = %e, "spool read failed");
                self.stop_replay(false);
                self.replay_at = Some(tokio::time::Instant::now() + REPLAY_IDLE);
            }
            Done::Removed(r) => {
                self.stop_replay(false);
                if let Err(e) = r {
                    // The entries stay and go out again, not before a while: the cloud drops
                    // the repeats (spec §6.3).
                    tracing::warn!(error = %e, "spool remove failed");
                    self.replay_at = Some(tokio::time::Instant::now() + REPLAY_IDLE);
                }
            }
            Done::Expired(r) => {
                if let Some(sp) = &mut self.spooler {
                    sp.expiring = false;
                }
                match r {
                    Ok(n) => {
                        if n > 0 {
                            tracing::info!(packets = n, "spooled packets expired");
                        }
                        metrics::counter!(m::SPOOL_EXPIRED).increment(n);
                    }
                    Err(e) => tracing::warn!(error = %e, "spool expiry failed"),
                }
            }
            Done::Dropped(r) => match r {
                Ok(n) => metrics::counter!(m::SPOOL_DROPPED, labels::REASON => "revoked").increment(n),
                Err(e) => tracing::warn!(error = %e, "spool drop of a revoked device failed"),
            },
        }
        let Some(sp) = &mut self.spooler else { return };
        sp.stats = stats;
        self.counters.spool_packets.store(stats.entries, Ordering::Relaxed);
        #[allow(clippy::cast_precision_loss)]
        {
            metrics::gauge!(m::SPOOL_PACKETS).set(stats.entries as f64);
            metrics::gauge!(m::SPOOL_BYTES).set(stats.bytes as f64);
        }
        // spec §17.9, order: a device with nothing stored and nothing waiting for the disk
        // is forwarded directly again.
        for source in emptied {
            if !sp.is_outstanding(&source) {
                self.relay.set_spooling(source, self.cloud, false);
            }
        }
        if stats.entries == 0 {
            self.expire_at = None;
        }
    }

    fn stop_replay(&mut self, retry: bool) {
        if let Some(sp) = &mut self.spooler {
            sp.replaying = false;
        }
        if retry {
            self.replay_at = Some(tokio::time::Instant::now() + REPLAY_RETRY);
        }
    }

    /// Sends a batch of stored packets, oldest first, as `Deliver`s on the uplink (spec §17.9),
    /// and removes those it took.
    fn replay(&mut self, now: veil_protocol::Timestamp, entries: Vec<crate::spool::Entry>) {
        let mut gone = Vec::new();
        let mut sources = Vec::new();
        let mut retry = false;
        let mut replayed = 0u64;
        for e in entries {
            match self.relay.replay(now, e.source, e.destination, e.packet) {
                Ok((out, msg)) => {
                    // The `Route` announcing the source goes first (spec §16.4 step 4).
                    self.flush();
                    let Some((conn, _)) = self.links.get(&out) else {
                        retry = true;
                        break;
                    };
                    // The `Route` is still in the link's backlog: the cloud would drop a
                    // `Deliver` that overtakes it, and the entry would be gone. Later.
                    if self.backlogged(out) {
                        retry = true;
                        break;
                    }
                    if let (Some(tap), RoutingMessage::Deliver { packet, .. }) = (&self.tap, &msg) {
                        let _ = tap.try_send(packet.clone());
                    }
                    match conn.try_send_routing(msg) {
                        Ok(()) => {
                            replayed += 1;
                            gone.push(e.seq);
                            sources.push(e.source);
                        }
                        // Full: later. Closed: its end is on the way, and with it UplinkDown.
                        Err(_) => {
                            retry = true;
                            break;
                        }
                    }
                }
                Err(RouteReason::UplinkDown) => break,
                Err(RouteReason::Congested) => {
                    retry = true;
                    break;
                }
                Err(reason) => {
                    // It can never go (the policy changed, or it no longer fits the uplink).
                    let label = drop_label(&RoutingError::Unreachable(reason));
                    metrics::counter!(m::SPOOL_DROPPED, labels::REASON => label).increment(1);
                    gone.push(e.seq);
                    sources.push(e.source);
                }
            }
        }
        self.counters.spool_replayed.fetch_add(replayed, Ordering::Relaxed);
        metrics::counter!(m::SPOOL_REPLAYED).increment(replayed);
        metrics::counter!(m::FORWARDED).increment(replayed);
        if gone.is_empty() {
            self.stop_replay(retry);
            return;
        }
        if retry {
            self.replay_at = Some(tokio::time::Instant::now() + REPLAY_RETRY);
        }
        sources.sort_unstable();
        sources.dedup();
        if let Some(sp) = &mut self.spooler {
            sp.remove(gone, sources);
        }
    }

    /// Whether announcements wait in `link`'s backlog (see [`Backlog`]).
    fn backlogged(&self, link: LinkId) -> bool {
        self.backlogs.get(&link).is_some_and(|b| b.lock().unwrap_or_else(std::sync::PoisonError::into_inner).active)
    }

    /// Sends what the relay queued: announcements, withdrawals, notices.
    fn flush(&mut self) {
        while let Some((link, msg)) = self.relay.poll_output() {
            let Some((conn, _)) = self.links.get(&link) else { continue };
            match &msg {
                RoutingMessage::Route { .. } => {
                    metrics::counter!(m::ROUTE_ANNOUNCEMENTS, labels::KIND => labels::ROUTE).increment(1);
                }
                RoutingMessage::Withdraw { .. } => {
                    metrics::counter!(m::ROUTE_ANNOUNCEMENTS, labels::KIND => labels::WITHDRAW).increment(1);
                }
                _ => {}
            }
            let must_arrive = matches!(msg, RoutingMessage::Route { .. } | RoutingMessage::Withdraw { .. });
            let msg = if must_arrive {
                // Behind what is already waiting for this link, in order.
                let backlog = self.backlogs.entry(link).or_default();
                let mut b = backlog.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if b.active {
                    if b.queue.len() < MAX_BACKLOG {
                        b.queue.push_back(msg);
                        continue;
                    }
                    // The peer's view of the routes would be wrong from now on: the link
                    // goes (spec §16.4.1); the peer reconnects with a fresh table.
                    tracing::warn!(link, "announcement backlog full; closing the link");
                    let conn = conn.clone();
                    tokio::spawn(async move { conn.close(CloseReason::InternalError).await });
                    continue;
                }
                match conn.try_send_routing(msg) {
                    Ok(()) => continue,
                    Err(TrySendError::Full(msg)) => {
                        b.queue.push_back(msg);
                        b.active = true;
                        tokio::spawn(send_backlog(conn.clone(), Arc::clone(backlog)));
                        continue;
                    }
                    Err(e) => {
                        tracing::debug!(link, error = ?e, "announcement for a link that ended");
                        continue;
                    }
                }
            } else {
                msg
            };
            if let Err(e) = conn.try_send_routing(msg) {
                tracing::debug!(link, error = ?e, "notice not queued");
            }
        }
    }
}

const fn role_label(kind: LinkKind) -> &'static str {
    match kind {
        LinkKind::Device => labels::DEVICE,
        LinkKind::Uplink => labels::CLOUD,
    }
}

/// The metrics label of a routing drop (a fixed vocabulary, spec §16.5, §16.8).
#[must_use]
pub const fn drop_label(e: &RoutingError) -> &'static str {
    match e {
        RoutingError::UnknownRoute(_) => "unknown_route",
        RoutingError::NotARelay => "not_a_relay",
        RoutingError::TableFull => "table_full",
        RoutingError::NodeMismatch => "node_mismatch",
        RoutingError::Unreachable(r) => match r {
            RouteReason::UnknownRoute => "unknown_route",
            RouteReason::Detached => "detached",
            RouteReason::UplinkDown => "uplink_down",
            RouteReason::NotAllowed => "not_allowed",
            RouteReason::Congested => "congested",
            RouteReason::TooLarge => "too_large",
            RouteReason::Revoked => "revoked",
            RouteReason::ShuttingDown => "shutting_down",
            RouteReason::SpoolFull => "spool_full",
            _ => "other",
        },
        _ => "other",
    }
}

async fn recv_answer(rx: &mut Option<mpsc::Receiver<Answer>>) -> Option<Answer> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Reads one link until it ends.
async fn read_link(link: LinkId, conn: Connection, tx: mpsc::Sender<Input>, counters: Arc<Counters>) {
    let revoked = loop {
        match conn.recv_any().await {
            Ok(Received::Routing(msg)) => {
                if tx.send(Input::Routing { link, msg }).await.is_err() {
                    return;
                }
            }
            Ok(_) => {
                counters.data_dropped.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::debug!(link, error = %e, "link ended");
                break matches!(e, TransportError::Closed { reason: CloseReason::Revoked, .. });
            }
        }
    };
    let _ = tx.send(Input::Down { link, revoked }).await;
}

async fn accept_loop(
    ep: Endpoint,
    tx: mpsc::Sender<Input>,
    next: Arc<AtomicU64>,
    counters: Arc<Counters>,
    stop: CancellationToken,
) {
    loop {
        let conn = tokio::select! {
            () = stop.cancelled() => return,
            c = ep.accept() => c,
        };
        let Ok(conn) = conn else { return };
        let link = next.fetch_add(1, Ordering::Relaxed);
        if tx.send(Input::Up { link, conn: conn.clone(), kind: LinkKind::Device }).await.is_err() {
            return;
        }
        tokio::spawn(read_link(link, conn, tx.clone(), Arc::clone(&counters)));
    }
}

/// Keeps the uplink up: connect, read until it ends, wait (exponential backoff with full
/// jitter), again.
async fn uplink_loop(
    ep: Endpoint,
    s: GatewaySettings,
    tx: mpsc::Sender<Input>,
    next: Arc<AtomicU64>,
    counters: Arc<Counters>,
    stop: CancellationToken,
) {
    let mut delay = s.backoff_initial;
    loop {
        let attempt = ep.connect(s.uplink_transport, s.uplink, Some(s.cloud_key));
        let conn = tokio::select! {
            () = stop.cancelled() => return,
            c = attempt => c,
        };
        match conn {
            Ok(conn) => {
                delay = s.backoff_initial;
                let link = next.fetch_add(1, Ordering::Relaxed);
                if counters.uplink_connects.fetch_add(1, Ordering::Relaxed) > 0 {
                    metrics::counter!(m::UPLINK_RECONNECTS).increment(1);
                }
                counters.uplink_up.store(true, Ordering::Relaxed);
                metrics::gauge!(m::UPLINK_UP).set(1.0);
                let suite = conn.suite().map_or("unknown", Suite::noise_name);
                tracing::info!(link, addr = %s.uplink, suite, "uplink connected");
                if tx.send(Input::Up { link, conn: conn.clone(), kind: LinkKind::Uplink }).await.is_err() {
                    return;
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = read_link(link, conn.clone(), tx.clone(), Arc::clone(&counters)) => {}
                }
                counters.uplink_up.store(false, Ordering::Relaxed);
                metrics::gauge!(m::UPLINK_UP).set(0.0);
                // The drain closed it (`ShuttingDown`, locally): the gateway is going away, so
                // the uplink is not reconnected (`stop` is cancelled only once the devices left).
                let drained = matches!(
                    conn.closed().await,
                    TransportError::Closed { reason: CloseReason::ShuttingDown, by_peer: false }
                );
                if stop.is_cancelled() || drained {
                    return;
                }
                tracing::warn!(addr = %s.uplink, "uplink lost; reconnecting");
            }
            Err(e) => tracing::warn!(addr = %s.uplink, error = %e, retry_in = ?delay, "uplink connect failed"),
        }
        // Full jitter: a fleet of gateways that lost the cloud together does not come back
        // in lockstep.
        let wait = rand::thread_rng().gen_range(Duration::ZERO..=delay);
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        delay = (delay * 2).min(s.backoff_max);
    }
}

/// Counts refused and failed inbound handshakes by reason ([`m::HANDSHAKES`]).
pub(crate) async fn count_handshake_failures(
    rx: broadcast::Receiver<veil_transports::HandshakeFailure>,
    stop: CancellationToken,
) {
    crate::metrics::count_each(rx, stop, |f| {
        let (outcome, reason) = match f.error.deny_reason() {
            Some(r) => (labels::REFUSED, deny_label(r)),
            None => (labels::FAILED, failure_label(&f.error)),
        };
        metrics::counter!(m::HANDSHAKES, labels::OUTCOME => outcome, labels::REASON => reason).increment(1);
    })
    .await;
}

pub(crate) const fn deny_label(r: veil_protocol::DenyReason) -> &'static str {
    use veil_protocol::DenyReason as R;
    match r {
        R::Revoked => "revoked",
        R::BadCertificate => "bad_certificate",
        R::Unauthorized => "unauthorized",
        _ => "other",
    }
}

pub(crate) fn failure_label(e: &TransportError) -> &'static str {
    match e {
        TransportError::RateLimited => "rate_limited",
        TransportError::TooManyConnections | TransportError::TooManyHandshakes => "busy",
        TransportError::ConnectTimeout => "timeout",
        e if e.is_handshake_timeout() => "timeout",
        TransportError::Io(_) | TransportError::CarrierClosed => "io",
        TransportError::Protocol(_) => "protocol",
        _ => "other",
    }
}

/// Revocation lists pushed by the cloud and accepted by the trust state go on to the devices.
async fn revocation_loop(
    mut rx: broadcast::Receiver<veil_transports::ReceivedRevocationList>,
    tx: mpsc::Sender<Input>,
    stop: CancellationToken,
) {
    loop {
        let r = tokio::select! {
            () = stop.cancelled() => return,
            r = rx.recv() => r,
        };
        match r {
            Ok(r) if r.result.is_ok() => {
                if tx.send(Input::Revocations { connection: r.connection, list: r.list }).await.is_err() {
                    return;
                }
            }
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}
