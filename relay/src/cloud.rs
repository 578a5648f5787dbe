//! The cloud role as a library (spec §16): accept gateway uplinks and direct device links,
//! terminate the devices' end-to-end sessions, and exchange messages with devices by node id.
//!
//! [`Cloud`] owns one [`Endpoint`] (with routing on) for every link and one
//! [`RoutedEndpoint`] for the end-to-end sessions. Each accepted link is sorted once, by who
//! its peer is: a gateway (fleet-CA certificate with role `gateway`, or an allowlist name
//! the configuration lists as a gateway) becomes a relay link, whose `Deliver` envelopes
//! carry end-to-end sessions (spec §16.4, §16.6); anyone else is a device connected directly,
//! whose link session is its end-to-end session (spec §16.1). Either way the application
//! sees the same [`NodeEvent`]s, addressed by node id.
//!
//! The `veil-relay cloud` process is this plus a sink (JSON lines) and a control socket;
//! a Rust service embeds it directly:
//!
//! ```no_run
//! use bytes::Bytes;
//! use veil_relay::cloud::{Cloud, CloudSettings};
//! use veil_transports::NodeEvent;
//! # async fn service(settings: CloudSettings) -> Result<(), Box<dyn std::error::Error>> {
//! let cloud = Cloud::start(settings).await?;
//! loop {
//!     match cloud.next_event().await? {
//!         NodeEvent::Message { node, channel, payload, .. } => {
//!             println!("{node} on {channel}: {} bytes", payload.len());
//!             // Answer on channel 1 (a command for the device).
//!             cloud.send(&node, 1, Bytes::from_static(b"ack")).await?;
//!         }
//!         NodeEvent::Connected { node, direct, .. } => println!("{node} connected (direct: {direct})"),
//!         NodeEvent::Closed { node, .. } => println!("{node} gone"),
//!         _ => {}
//!     }
//! }
//! # }
//! ```
//!
//! See also `relay/examples/cloud_service.rs`, a complete service with a device and a
//! gateway on loopback.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use veil_protocol::delivery::InboxState;
use veil_protocol::trust::{Authorized, CertRole, CertificateChain, NodeId, RoleSet};
use veil_protocol::StaticKeypair;
use veil_transports::{
    Authorizer, Connection, DeliveryOptions, Endpoint, EndpointLimits, Error as TransportError, NodeEvent, PeerRoles,
    RoutedEndpoint, RoutedHandshakeFailure, RoutedLimits, TrustState,
};

use crate::config::{Config, ConfigError};
use crate::metrics::{self as m, labels};
use crate::trustload::LoadedNode;

/// Which link peers are gateways (relays, spec §16.7).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelayRule {
    /// Allowlist names of gateways (allowlist mode).
    pub names: HashSet<String>,
}

impl RelayRule {
    /// Whether the peer (as the trust check saw it) is a gateway: a fleet-CA certificate
    /// with role `gateway`, or an allowlist entry named in [`RelayRule::names`].
    #[must_use]
    pub fn is_relay(&self, peer: Option<&Authorized>) -> bool {
        match peer {
            Some(Authorized::Certified(p)) => p.role == CertRole::Gateway,
            Some(Authorized::Listed { name, .. }) => self.names.contains(name),
            _ => false,
        }
    }
}

/// Everything a cloud needs to start.
#[derive(Clone)]
pub struct CloudSettings {
    /// The cloud's static key pair: its identity for links and end-to-end sessions alike.
    pub identity: StaticKeypair,
    /// Its certificate chain (fleet-CA mode).
    pub certificate_chain: Option<CertificateChain>,
    /// The node's trust state (allowlist or fleet CA), shared by links and end-to-end
    /// sessions.
    pub trust: TrustState,
    /// Which link peers are gateways.
    pub relays: RelayRule,
    /// TCP listener (gateway uplinks and devices).
    pub listen_tcp: Option<SocketAddr>,
    /// UDP listener.
    pub listen_udp: Option<SocketAddr>,
    /// Endpoint limits.
    pub limits: EndpointLimits,
    /// Protocol limits.
    pub protocol_limits: veil_protocol::Limits,
    /// End-to-end limits.
    pub routed_limits: RoutedLimits,
    /// Acknowledged delivery (spec §17) with devices, on by default with
    /// [`DeliveryOptions::auto_commit`]: a service that keeps messages durably turns
    /// `auto_commit` off and calls [`Cloud::commit`] once it holds them (the `veil-relay cloud`
    /// process does, after its sink). `None`: best effort only.
    pub delivery: Option<DeliveryOptions>,
    /// Where each device's stream stood when the service stopped (spec §17.7: e.g. rebuilt
    /// from its sink), so that nothing committed then is delivered again.
    pub restore: Vec<(NodeId, InboxState)>,
}

impl std::fmt::Debug for CloudSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloudSettings")
            .field("public_key", self.identity.public())
            .field("listen_tcp", &self.listen_tcp)
            .field("listen_udp", &self.listen_udp)
            .finish_non_exhaustive()
    }
}

impl CloudSettings {
    /// Settings with default limits and no listener.
    #[must_use]
    pub fn new(identity: StaticKeypair, trust: TrustState) -> Self {
        Self {
            identity,
            certificate_chain: None,
            trust,
            relays: RelayRule::default(),
            listen_tcp: None,
            listen_udp: None,
            limits: EndpointLimits::default(),
            protocol_limits: veil_protocol::Limits::default(),
            routed_limits: RoutedLimits::default(),
            delivery: Some(DeliveryOptions { auto_commit: true, ..DeliveryOptions::default() }),
            restore: Vec::new(),
        }
    }

    /// Settings from a cloud's configuration and its loaded files.
    ///
    /// # Errors
    /// None today; kept for configuration checks to come.
    pub fn from_node(node: &LoadedNode, config: &Config) -> Result<Self, ConfigError> {
        let mut s = Self::new(node.identity.clone(), node.trust.clone());
        s.certificate_chain.clone_from(&node.certificate_chain);
        s.relays = RelayRule { names: config.trust.gateways.iter().cloned().collect() };
        s.listen_tcp = config.listen.tcp;
        s.listen_udp = config.listen.udp;
        s.limits = node.limits.clone();
        s.protocol_limits = node.protocol_limits;
        s.routed_limits.static_dh_cache = config.limits.static_dh_cache;
        Ok(s)
    }
}

/// Why a cloud could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CloudError {
    /// The link endpoint could not be bound.
    #[error("cannot start the cloud endpoint: {0}")]
    Bind(#[source] TransportError),
    /// The end-to-end endpoint could not be built (a bad certificate chain).
    #[error("cannot start the end-to-end endpoint: {0}")]
    Routed(#[source] TransportError),
    /// Neither a TCP nor a UDP listener is configured.
    #[error("no listener: configure listen.tcp and/or listen.udp")]
    NoListener,
}

/// A running cloud endpoint. Cheap to share behind an `Arc`; its methods take `&self`.
#[derive(Debug)]
pub struct Cloud {
    endpoint: Endpoint,
    routed: RoutedEndpoint,
    /// Live links, and whether each is a relay's.
    links: Links,
    stop: CancellationToken,
    tasks: Mutex<JoinSet<()>>,
}

type Links = Arc<Mutex<Vec<(Connection, bool)>>>;

impl Cloud {
    /// Binds the listeners and starts accepting links.
    ///
    /// # Errors
    /// [`CloudError`].
    pub async fn start(settings: CloudSettings) -> Result<Self, CloudError> {
        if settings.listen_tcp.is_none() && settings.listen_udp.is_none() {
            return Err(CloudError::NoListener);
        }
        let link_roles = PeerRoles::for_node(CertRole::Cloud);
        let mut b = Endpoint::builder(settings.identity.clone())
            .authorizer(Authorizer::trust(settings.trust.clone(), link_roles))
            .protocol_limits(settings.protocol_limits)
            .limits(settings.limits.clone())
            .routing(true);
        if let Some(chain) = &settings.certificate_chain {
            b = b.certificate_chain(chain);
        }
        if let Some(a) = settings.listen_tcp {
            b = b.listen_tcp(a);
        }
        if let Some(a) = settings.listen_udp {
            b = b.bind_udp(a);
        }
        let endpoint = b.bind().await.map_err(CloudError::Bind)?;
        // End-to-end peers are devices (spec §16.6); the cloud starts no end-to-end session.
        let e2e_roles = PeerRoles::new(RoleSet::DEVICE, RoleSet::NONE);
        let mut rb = RoutedEndpoint::builder(settings.identity.clone())
            .authorizer(Authorizer::trust(settings.trust.clone(), e2e_roles))
            .protocol_limits(settings.protocol_limits)
            .limits(settings.routed_limits);
        if let Some(chain) = &settings.certificate_chain {
            rb = rb.certificate_chain(chain);
        }
        if let Some(d) = settings.delivery {
            rb = rb.delivery(d);
            for (node, state) in settings.restore {
                rb = rb.restore_inbox(node, state);
            }
        }
        let routed = rb.build().map_err(CloudError::Routed)?;
        let stop = CancellationToken::new();
        let links = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = JoinSet::new();
        tasks.spawn(accept_loop(endpoint.clone(), routed.clone(), settings.relays, Arc::clone(&links), stop.clone()));
        tasks.spawn(crate::gateway::count_handshake_failures(endpoint.handshake_failures(), stop.clone()));
        tasks.spawn(count_e2e_handshake_failures(routed.handshake_failures(), stop.clone()));
        tasks.spawn(link_gauges(Arc::clone(&links), routed.clone(), stop.clone()));
        Ok(Self { endpoint, routed, links, stop, tasks: Mutex::new(tasks) })
    }

    /// The TCP address.
    #[must_use]
    pub fn local_tcp_addr(&self) -> Option<SocketAddr> {
        self.endpoint.local_tcp_addr()
    }

    /// The UDP address.
    #[must_use]
    pub fn local_udp_addr(&self) -> Option<SocketAddr> {
        self.endpoint.local_udp_addr()
    }

    /// The cloud's node id (what devices route to, spec §15.2).
    #[must_use]
    pub fn node_id(&self) -> NodeId {
        self.routed.node_id()
    }

    /// The next event: sessions up and down, messages, unreachable notices (see
    /// [`NodeEvent`]). Read it continuously: while nobody does, the end-to-end sessions wait.
    ///
    /// # Errors
    /// [`TransportError::EndpointClosed`] after [`Cloud::shutdown`].
    pub async fn next_event(&self) -> Result<NodeEvent, TransportError> {
        let ev = self.routed.next_event().await?;
        match &ev {
            NodeEvent::Message { payload, via, .. } => {
                let hop = if matches!(via, veil_transports::Via::Direct) { labels::DEVICE } else { labels::UPLINK };
                metrics::counter!(m::MESSAGES, labels::DIRECTION => labels::IN, labels::HOP => hop).increment(1);
                metrics::counter!(m::BYTES, labels::DIRECTION => labels::IN, labels::HOP => hop)
                    .increment(payload.len() as u64);
            }
            NodeEvent::Connected { direct: true, .. } => {
                metrics::counter!(m::HANDSHAKES, labels::OUTCOME => labels::ACCEPTED, labels::REASON => labels::DEVICE)
                    .increment(1);
            }
            NodeEvent::Connected { direct: false, .. } => {
                metrics::counter!(m::E2E_HANDSHAKES, labels::OUTCOME => labels::ACCEPTED, labels::REASON => labels::RELAYED)
                    .increment(1);
            }
            _ => {}
        }
        Ok(ev)
    }

    /// Queues a message for a device (see [`RoutedEndpoint::send`]). With delivery it goes
    /// into the device's outbox (spec §17.7): it waits there for the device to connect and
    /// acknowledge it.
    ///
    /// # Errors
    /// As [`RoutedEndpoint::send`]: no session, no route, too large, closed.
    pub async fn send(&self, node: &NodeId, channel: u16, payload: Bytes) -> Result<(), TransportError> {
        let len = payload.len() as u64;
        self.routed.send(node, channel, payload).await?;
        count_out(len);
        Ok(())
    }

    /// With delivery: queues a command for a device that is dropped, and reported as
    /// [`NodeEvent::Expired`], if the device has not acknowledged it `ttl` from now
    /// (spec §17.6, §17.7). Returns its id on its channel.
    ///
    /// # Errors
    /// As [`RoutedEndpoint::send_with_ttl`].
    pub async fn send_with_ttl(
        &self,
        node: &NodeId,
        channel: u16,
        payload: Bytes,
        ttl: Duration,
    ) -> Result<u64, TransportError> {
        let len = payload.len() as u64;
        let id = self.routed.send_with_ttl(node, channel, payload, Some(ttl)).await?;
        count_out(len);
        Ok(id)
    }

    /// With delivery and without `auto_commit`: the service holds every message of `channel`
    /// from `node` up to `through` (spec §17.7); the device is told, and frees them.
    pub fn commit(&self, node: &NodeId, channel: u16, through: u64) {
        self.routed.commit(node, channel, through);
    }

    /// The end-to-end endpoint (stats, connect).
    #[must_use]
    pub const fn routed(&self) -> &RoutedEndpoint {
        &self.routed
    }

    /// The link endpoint (stats, trust state, revocation updates).
    #[must_use]
    pub const fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Pushes a revocation list to every live link (gateways pass it on to their devices,
    /// spec §15.8). Returns how many links took it.
    pub async fn push_revocation_list(&self, list: Bytes) -> usize {
        let links: Vec<Connection> =
            self.links.lock().unwrap_or_else(PoisonError::into_inner).iter().map(|(c, _)| c.clone()).collect();
        let mut n = 0;
        for l in links {
            if l.push_revocation_list(list.clone()).await.is_ok() {
                n += 1;
            }
        }
        n
    }

    /// Graceful drain: closes every end-to-end session and link with `ShuttingDown` and waits
    /// (at most `grace`) for the tasks.
    pub async fn shutdown(&self, grace: Duration) {
        self.stop.cancel();
        self.routed.close();
        let links = std::mem::take(&mut *self.links.lock().unwrap_or_else(PoisonError::into_inner));
        let _ = tokio::time::timeout(grace, async {
            for (l, _) in links {
                let _ = l.close(veil_protocol::CloseReason::ShuttingDown).await;
            }
        })
        .await;
        self.endpoint.close();
        let mut tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(PoisonError::into_inner));
        let _ = tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
        tasks.abort_all();
    }
}

fn count_out(len: u64) {
    metrics::counter!(m::MESSAGES, labels::DIRECTION => labels::OUT, labels::HOP => labels::DEVICE).increment(1);
    metrics::counter!(m::BYTES, labels::DIRECTION => labels::OUT, labels::HOP => labels::DEVICE).increment(len);
}

impl Drop for Cloud {
    fn drop(&mut self) {
        self.stop.cancel();
        self.routed.close();
    }
}

async fn accept_loop(ep: Endpoint, routed: RoutedEndpoint, relays: RelayRule, links: Links, stop: CancellationToken) {
    loop {
        let conn = tokio::select! {
            () = stop.cancelled() => return,
            c = ep.accept() => c,
        };
        let Ok(conn) = conn else { return };
        let relay = relays.is_relay(conn.peer());
        let node = NodeId::from_public_key(&conn.remote_static());
        tracing::info!(%node, relay, transport = %conn.transport(), "link accepted");
        {
            let mut l = links.lock().unwrap_or_else(PoisonError::into_inner);
            // Links that ended are pruned here, so the list stays as long as the live links.
            l.retain(|(c, _)| !c.is_closed());
            l.push((conn.clone(), relay));
        }
        if relay {
            routed.add_relay_link(conn);
        } else {
            routed.add_direct(conn);
        }
    }
}

/// Once a second: the live links by kind ([`m::CONNECTIONS`]), and the list pruned of links
/// that ended; the end-to-end endpoint's drop and delivery counters ([`m::E2E_DROPS`],
/// [`m::E2E_DELIVERY`]).
async fn link_gauges(links: Links, routed: RoutedEndpoint, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (mut gateways, mut devices) = (0u32, 0u32);
        {
            let mut l = links.lock().unwrap_or_else(PoisonError::into_inner);
            l.retain(|(c, _)| !c.is_closed());
            for (_, relay) in l.iter() {
                if *relay {
                    gateways += 1;
                } else {
                    devices += 1;
                }
            }
        }
        metrics::gauge!(m::CONNECTIONS, labels::ROLE => labels::GATEWAY).set(f64::from(gateways));
        metrics::gauge!(m::CONNECTIONS, labels::ROLE => labels::DEVICE).set(f64::from(devices));
        let s = routed.stats();
        absolute_by(
            m::E2E_DROPS,
            labels::REASON,
            &[
                ("no_route", s.dropped_no_route),
                ("no_session", s.dropped_no_session),
                ("unknown_route", s.dropped_unknown_route),
                ("refused", s.dropped_refused),
                ("init_limited", s.dropped_init_limited),
                ("too_many_peers", s.dropped_too_many_peers),
                ("too_large", s.dropped_too_large),
                ("table_full", s.dropped_table_full),
                ("link_messages", s.dropped_link_messages),
                ("not_a_relay", s.dropped_not_a_relay),
            ],
        );
        absolute_by(
            m::E2E_DELIVERY,
            "event",
            &[
                ("retransmission", s.retransmissions),
                ("duplicate", s.duplicates_dropped),
                ("route_back", s.routes_back),
                ("route_back_timeout", s.route_back_timeouts),
                ("ack_request", s.ack_requests),
                ("custody_lost", s.custody_lost),
            ],
        );
    }
}

/// Sets counter `name` to each value, labelled `key` = its label: counts kept elsewhere (the
/// routed endpoint's statistics) exported as they stand.
fn absolute_by(name: &'static str, key: &'static str, values: &[(&'static str, u64)]) {
    for &(label, n) in values {
        metrics::counter!(name, key => label).absolute(n);
    }
}

/// The labels of a failed end-to-end handshake ([`m::E2E_HANDSHAKES`]): `refused` when this
/// cloud denied the device (its trust check, or the node-id check of spec §16.6), else
/// `failed` (the device refused the cloud, a timeout, a broken handshake).
fn e2e_failure_labels(node_mismatch: bool, error: &TransportError) -> (&'static str, &'static str) {
    if node_mismatch {
        return (labels::REFUSED, labels::NODE_MISMATCH);
    }
    if let Some(r) = error.deny_reason() {
        return (labels::REFUSED, crate::gateway::deny_label(r));
    }
    if error.reject_reason().is_some() {
        return (labels::FAILED, "rejected");
    }
    (labels::FAILED, crate::gateway::failure_label(error))
}

/// Counts failed end-to-end handshakes by outcome and reason ([`m::E2E_HANDSHAKES`]).
async fn count_e2e_handshake_failures(
    rx: tokio::sync::broadcast::Receiver<RoutedHandshakeFailure>,
    stop: CancellationToken,
) {
    crate::metrics::count_each(rx, stop, |f| {
        let (outcome, reason) = e2e_failure_labels(f.node_mismatch, &f.error);
        tracing::debug!(node = %f.node, outcome, reason, "end-to-end handshake ended");
        metrics::counter!(m::E2E_HANDSHAKES, labels::OUTCOME => outcome, labels::REASON => reason).increment(1);
    })
    .await;
}

#[cfg(test)]
mod tests {
    use veil_protocol::wire::RejectReason;
    use veil_protocol::{ConnectionError, DenyReason, HandshakeError};

    use super::*;

    #[test]
    fn e2e_failures_are_labelled_by_who_ended_them_and_why() {
        let denied = |r| TransportError::Protocol(ConnectionError::Handshake(HandshakeError::Denied(r)));
        assert_eq!(e2e_failure_labels(false, &denied(DenyReason::Revoked)), ("refused", "revoked"));
        assert_eq!(e2e_failure_labels(false, &denied(DenyReason::Unauthorized)), ("refused", "unauthorized"));
        assert_eq!(e2e_failure_labels(false, &denied(DenyReason::BadCertificate)), ("refused", "bad_certificate"));
        // The node-id check denies with a reason of its own; the mismatch is what counts.
        assert_eq!(e2e_failure_labels(true, &denied(DenyReason::Unauthorized)), ("refused", "node_mismatch"));
        let rejected =
            TransportError::Protocol(ConnectionError::Handshake(HandshakeError::Rejected(RejectReason::Unauthorized)));
        assert_eq!(e2e_failure_labels(false, &rejected), ("failed", "rejected"));
        let timeout = TransportError::Protocol(ConnectionError::Handshake(HandshakeError::Timeout));
        assert_eq!(e2e_failure_labels(false, &timeout), ("failed", "timeout"));
    }
}
