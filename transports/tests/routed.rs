//! End-to-end sessions through a relay (spec §16) with [`RoutedEndpoint`], on loopback: a
//! device and a cloud service reach each other through a tiny relay written here from the
//! spec's procedure (§16.3, §16.4) over real TCP and UDP links. The relay announces each
//! attached node to the others and turns every `Forward` into a `Deliver` on the destination's
//! link, labelled with the sender's node (or, when a test says so, with another node's).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod util;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Mutex;
use util::*;
use veil_protocol::routing::{RouteReason, RouteTable, RoutingMessage};
use veil_protocol::trust::{Allowlist, Authorized, NodeId, RoleSet, Trust};
use veil_protocol::{CloseReason, PublicKey, Timestamp};
use veil_transports::{
    Authorizer, Connection, Endpoint, EndpointLimits, Error, NodeEvent, PeerRoles, Received, RoutedEndpoint,
    RoutedLimits, TimeSource, Transport, TrustState, Via,
};

const RELAY: u64 = 100;
const CLOUD: u64 = 101;
const DEVICE: u64 = 102;
const SPOOFER: u64 = 103;
const DIRECT_DEVICE: u64 = 104;
/// The relay's handle tables take the time only to quarantine withdrawn handles; a fixed
/// time keeps every withdrawn handle out of use, which is all these tests need.
const T0: Timestamp = Timestamp::from_millis(0);

fn node_of(key: &PublicKey) -> NodeId {
    NodeId::from_public_key(key)
}

// ---------------------------------------------------------------------------------------
// The relay

struct Peer {
    /// Which accepted link this is (a node that reconnects gets a new one).
    id: u64,
    link: Connection,
    /// spec §16.3: the handles the relay announced on this link.
    table: RouteTable,
}

#[derive(Default)]
struct RelayState {
    peers: HashMap<NodeId, Peer>,
    /// Every routed packet passed on, for the plaintext scan.
    passed: Vec<Bytes>,
    /// A dishonest relay: envelopes from `.0` are labelled as coming from `.1`.
    relabel: Option<(NodeId, NodeId)>,
}

struct TestRelay {
    endpoint: Endpoint,
    key: PublicKey,
    state: Arc<Mutex<RelayState>>,
}

impl TestRelay {
    async fn start() -> Self {
        Self::with_limits(open_limits()).await
    }

    async fn with_limits(limits: EndpointLimits) -> Self {
        let endpoint = Endpoint::builder(keypair(RELAY))
            .authorizer(Authorizer::allow_all())
            .routing(true)
            .limits(limits)
            .listen_tcp(localhost())
            .bind_udp(localhost())
            .bind()
            .await
            .unwrap();
        let state = Arc::new(Mutex::new(RelayState::default()));
        tokio::spawn(accept_loop(endpoint.clone(), Arc::clone(&state)));
        Self { key: endpoint.public_key(), endpoint, state }
    }

    fn node(&self) -> NodeId {
        node_of(&self.key)
    }

    fn addr(&self, transport: Transport) -> SocketAddr {
        match transport {
            Transport::Tcp => self.endpoint.local_tcp_addr().unwrap(),
            Transport::Udp => self.endpoint.local_udp_addr().unwrap(),
        }
    }

    /// Sends `msg` to `to` on its link.
    async fn send_to(&self, to: NodeId, msg: RoutingMessage) {
        let s = self.state.lock().await;
        s.peers[&to].link.send_routing(msg).await.unwrap();
    }

    /// The handle under which `about` was announced to `to`.
    async fn handle(&self, to: NodeId, about: NodeId) -> u32 {
        self.state.lock().await.peers[&to].table.route_of(&about).unwrap()
    }
}

async fn accept_loop(endpoint: Endpoint, state: Arc<Mutex<RelayState>>) {
    for id in 0..64 {
        let Ok(link) = endpoint.accept().await else { return };
        attach(&state, id, link.clone()).await;
        tokio::spawn(serve(Arc::clone(&state), id, link));
    }
}

/// spec §16.3: the new node learns every attached node, and they learn it.
async fn attach(state: &Mutex<RelayState>, id: u64, link: Connection) {
    let node = node_of(&link.remote_static());
    let mut s = state.lock().await;
    let mut table = RouteTable::new(64, false);
    let others: Vec<NodeId> = s.peers.keys().filter(|n| **n != node).copied().collect();
    for other in others {
        let a = table.announce(other, T0).unwrap();
        link.send_routing(RoutingMessage::Route { route: a.route, node: other }).await.unwrap();
        let p = s.peers.get_mut(&other).unwrap();
        let a = p.table.announce(node, T0).unwrap();
        if a.new {
            let _ = p.link.send_routing(RoutingMessage::Route { route: a.route, node }).await;
        }
    }
    s.peers.insert(node, Peer { id, link, table });
}

async fn serve(state: Arc<Mutex<RelayState>>, id: u64, link: Connection) {
    let node = node_of(&link.remote_static());
    for _ in 0..1_000_000 {
        match link.recv_any().await {
            Ok(Received::Routing(RoutingMessage::Forward { route, packet })) => {
                forward(&state, id, node, route, packet).await;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    // spec §16.3: a node whose link closed is withdrawn everywhere (reason Detached).
    let mut s = state.lock().await;
    if s.peers.get(&node).is_some_and(|p| p.id == id) {
        s.peers.remove(&node);
        for p in s.peers.values_mut() {
            if let Some(route) = p.table.withdraw(&node, T0) {
                let _ = p.link.send_routing(RoutingMessage::Withdraw { route, reason: RouteReason::Detached }).await;
            }
        }
    }
}

/// spec §16.4: `Forward { route }` from `node` becomes `Deliver { route' }` on the link of
/// the node `route` names; `route'` is the sender's handle there. The source is the link's,
/// unless the test made the relay lie.
async fn forward(state: &Mutex<RelayState>, id: u64, node: NodeId, route: u32, packet: Bytes) {
    let mut s = state.lock().await;
    let Some(src) = s.peers.get_mut(&node).filter(|p| p.id == id) else { return };
    let dst = match src.table.on_forward(route) {
        Ok(dst) => dst,
        Err(_) => {
            let msg = RoutingMessage::Unreachable { route, reason: RouteReason::UnknownRoute };
            let _ = src.link.send_routing(msg).await;
            return;
        }
    };
    let label = s.relabel.filter(|(from, _)| *from == node).map_or(node, |(_, claimed)| claimed);
    s.passed.push(packet.clone());
    let Some(d) = s.peers.get_mut(&dst) else { return };
    let a = d.table.announce(label, T0).unwrap();
    if a.new {
        let _ = d.link.send_routing(RoutingMessage::Route { route: a.route, node: label }).await;
    }
    let _ = d.link.send_routing(RoutingMessage::Deliver { route: a.route, packet }).await;
}

// ---------------------------------------------------------------------------------------
// Nodes

struct Node {
    key: PublicKey,
    links: Endpoint,
    routed: RoutedEndpoint,
    /// Every event read so far.
    log: Vec<NodeEvent>,
}

impl Node {
    fn id(&self) -> NodeId {
        node_of(&self.key)
    }

    /// Reads events until one matches (bounded in count and time).
    async fn until(&mut self, what: &str, mut f: impl FnMut(&NodeEvent) -> bool) -> NodeEvent {
        for _ in 0..256 {
            let e = within(self.routed.next_event()).await.unwrap();
            self.log.push(e.clone());
            if f(&e) {
                return e;
            }
        }
        panic!("no {what} in {:?}", self.log);
    }

    /// The next data message, its channel, id, payload and path.
    async fn message(&mut self) -> (NodeId, u16, u64, Bytes, Via) {
        match self.until("message", |e| matches!(e, NodeEvent::Message { .. })).await {
            NodeEvent::Message { node, channel, id, payload, via, .. } => (node, channel, id, payload, via),
            _ => unreachable!("matched above"),
        }
    }

    fn connected_events(&self) -> usize {
        self.log.iter().filter(|e| matches!(e, NodeEvent::Connected { .. })).count()
    }

    /// A link to the relay over `transport`, handed to the routed endpoint.
    async fn attach(&self, relay: &TestRelay, transport: Transport) -> Connection {
        let link = within(self.links.connect(transport, relay.addr(transport), Some(relay.key))).await.unwrap();
        self.routed.add_relay_link(link.clone());
        link
    }
}

/// The cloud: its links endpoint also listens for direct devices (allowlist `devices`), and its
/// end-to-end peers must be in `devices` too.
async fn cloud(devices: &[PublicKey]) -> Node {
    let links = Endpoint::builder(keypair(CLOUD))
        .authorizer(Authorizer::allowlist(devices.iter().copied()))
        .routing(true)
        .limits(open_limits())
        .listen_tcp(localhost())
        .bind()
        .await
        .unwrap();
    let routed = RoutedEndpoint::builder(keypair(CLOUD))
        .authorizer(Authorizer::allowlist(devices.iter().copied()))
        .build()
        .unwrap();
    Node { key: links.public_key(), links, routed, log: Vec::new() }
}

/// A device; `handshake_timeout` shortens its end-to-end handshakes.
async fn device(seed: u64, handshake_timeout: Option<Duration>) -> Node {
    let links = Endpoint::builder(keypair(seed))
        .routing(true)
        .limits(open_limits())
        .bind_udp(localhost())
        .bind()
        .await
        .unwrap();
    let mut b = RoutedEndpoint::builder(keypair(seed));
    if let Some(t) = handshake_timeout {
        b = b.protocol_limits(veil_protocol::Limits { handshake_timeout: t.into(), ..Default::default() });
    }
    Node { key: links.public_key(), links, routed: b.build().unwrap(), log: Vec::new() }
}

/// A relay with the cloud attached over TCP and one device over `transport`, the device's
/// end-to-end session to the cloud up.
async fn network(transport: Transport) -> (TestRelay, Node, Node, Connection) {
    let relay = TestRelay::start().await;
    let dev = device(DEVICE, None).await;
    let mut cloud = cloud(&[dev.key]).await;
    cloud.attach(&relay, Transport::Tcp).await;
    let link = dev.attach(&relay, transport).await;
    let node = within(dev.routed.connect(cloud.key)).await.unwrap();
    assert_eq!(node, cloud.id());
    let dev_id = dev.id();
    cloud
        .until("device connected", |e| matches!(e, NodeEvent::Connected { node, direct: false, .. } if *node == dev_id))
        .await;
    (relay, cloud, dev, link)
}

// ---------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_and_cloud_talk_through_a_relay_that_never_sees_the_plaintext() {
    init_tracing();
    let marker = b"MARKER-4c1d-end-to-end-only";
    for transport in [Transport::Tcp, Transport::Udp] {
        let (relay, mut cloud, mut dev, _link) = network(transport).await;
        let (cloud_id, dev_id) = (cloud.id(), dev.id());
        for i in 0..3u8 {
            let mut p = marker.to_vec();
            p.push(b'0' + i);
            within(dev.routed.send(&cloud_id, 1, Bytes::from(p))).await.unwrap();
        }
        for i in 0..3u64 {
            let (from, channel, id, payload, via) = cloud.message().await;
            assert_eq!((from, channel, id, via), (dev_id, 1, i, Via::Relay(relay.node())), "{transport}");
            assert!(payload.starts_with(marker), "{transport}");
        }
        within(cloud.routed.send(&dev_id, 7, Bytes::from_static(marker))).await.unwrap();
        let (from, channel, id, payload, via) = dev.message().await;
        assert_eq!((from, channel, id, via), (cloud_id, 7, 0, Via::Relay(relay.node())), "{transport}");
        assert_eq!(&payload[..], marker);

        // The relay passed every packet, and none of them carries the plaintext.
        let passed = relay.state.lock().await.passed.clone();
        assert!(passed.len() >= 6, "{transport}: {} packets", passed.len());
        let contains = |hay: &[u8]| hay.windows(marker.len()).any(|w| w == marker);
        assert!(passed.iter().all(|p| !contains(p)), "{transport}: the relay saw the plaintext");

        let (d, c) = (dev.routed.stats(), cloud.routed.stats());
        assert_eq!((d.sessions, c.sessions), (1, 1), "{transport}");
        assert_eq!((d.messages_out, d.messages_in, c.messages_in, c.messages_out), (3, 1, 3, 1), "{transport}");
        // The INIT, then the three messages (queued together, they may share a packet).
        assert!(d.envelopes_out >= 2 && c.envelopes_in >= 2, "{transport}: {d:?} {c:?}");
        assert_eq!(d.handshakes_started, 1, "{transport}");
        assert_eq!((c.node_mismatch, c.denied, c.dropped_unknown_route), (0, 0, 0), "{transport}");

        // Typed errors: no session with a node nobody connected to; too large for the route.
        let stranger = node_of(keypair(999).public());
        assert!(matches!(cloud.routed.send(&stranger, 0, Bytes::from_static(b"?")).await, Err(Error::NoSession)));
        let huge = Bytes::from(vec![0u8; 70_000]);
        match dev.routed.send(&cloud_id, 1, huge).await {
            Err(Error::MessageTooLarge { max, .. }) if transport == Transport::Udp => assert!(max < 1_232, "{max}"),
            Err(Error::MessageTooLarge { .. }) => {}
            other => panic!("{transport}: {other:?}"),
        }
        dev.routed.close();
        cloud.routed.close();
        assert!(matches!(dev.routed.send(&cloud_id, 1, Bytes::from_static(b"late")).await, Err(Error::EndpointClosed)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_labelled_as_another_node_is_denied_and_the_honest_device_is_unaffected() {
    init_tracing();
    let (relay, mut cloud, mut honest, _link) = network(Transport::Tcp).await;
    let (cloud_id, honest_id) = (cloud.id(), honest.id());
    let spoofer = device(SPOOFER, Some(Duration::from_secs(2))).await;
    spoofer.attach(&relay, Transport::Udp).await;
    // The relay labels the spoofer's envelopes with the honest device's node (spec §16.6).
    relay.state.lock().await.relabel = Some((spoofer.id(), honest_id));
    let attempt = spoofer.routed.connect(cloud.key);
    let result = within(attempt).await;
    assert!(matches!(&result, Err(e) if e.is_handshake_timeout()), "{result:?}");
    // The cloud denied every INIT on the node-id check; the authorizer never saw them.
    let c = cloud.routed.stats();
    assert!(c.node_mismatch >= 1, "{c:?}");
    assert_eq!((c.denied, c.sessions), (0, 1), "{c:?}");

    // The honest device's session is untouched, both ways.
    within(honest.routed.send(&cloud_id, 1, Bytes::from_static(b"still me"))).await.unwrap();
    let (from, _, id, payload, _) = cloud.message().await;
    assert_eq!((from, id, &payload[..]), (honest_id, 0, &b"still me"[..]));
    within(cloud.routed.send(&honest_id, 1, Bytes::from_static(b"hello again"))).await.unwrap();
    let (from, _, _, payload, _) = honest.message().await;
    assert_eq!((from, &payload[..]), (cloud_id, &b"hello again"[..]));
    assert_eq!(cloud.connected_events(), 1, "{:?}", cloud.log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_end_to_end_peer_the_authorizer_refuses_gets_no_session() {
    init_tracing();
    let relay = TestRelay::start().await;
    let dev = device(DEVICE, Some(Duration::from_secs(2))).await;
    // The cloud allows another key only.
    let cloud = cloud(&[*keypair(DIRECT_DEVICE).public()]).await;
    cloud.attach(&relay, Transport::Tcp).await;
    dev.attach(&relay, Transport::Tcp).await;
    let result = within(dev.routed.connect(cloud.key)).await;
    assert!(matches!(&result, Err(e) if e.is_handshake_timeout()), "{result:?}");
    let c = cloud.routed.stats();
    assert!(c.denied >= 1 && c.handshakes_failed >= 1, "{c:?}");
    assert_eq!((c.sessions, c.node_mismatch), (0, 0), "{c:?}");
    // Nothing was reported to the cloud's application.
    cloud.routed.close();
    for _ in 0..16 {
        match within(cloud.routed.next_event()).await {
            Ok(e) => assert!(!matches!(e, NodeEvent::Connected { .. } | NodeEvent::Message { .. }), "{e:?}"),
            Err(e) => {
                assert!(matches!(e, Error::EndpointClosed));
                return;
            }
        }
    }
    panic!("events never ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_device_and_a_relayed_one_reach_the_same_cloud() {
    init_tracing();
    let relay = TestRelay::start().await;
    let mut relayed = device(DEVICE, None).await;
    let mut direct = device(DIRECT_DEVICE, None).await;
    let mut cloud = cloud(&[relayed.key, direct.key]).await;
    cloud.attach(&relay, Transport::Tcp).await;
    relayed.attach(&relay, Transport::Udp).await;
    // Direct shape (spec §16.1): the device's link peer is the cloud itself.
    let addr = cloud.links.local_tcp_addr().unwrap();
    let (to_cloud, from_device) =
        within(async { tokio::try_join!(direct.links.connect_tcp(addr, Some(cloud.key)), cloud.links.accept()) })
            .await
            .unwrap();
    direct.routed.add_direct(to_cloud);
    cloud.routed.add_direct(from_device);
    let cloud_id = cloud.id();
    assert_eq!(within(direct.routed.connect(cloud.key)).await.unwrap(), cloud_id);
    assert_eq!(within(relayed.routed.connect(cloud.key)).await.unwrap(), cloud_id);

    within(direct.routed.send(&cloud_id, 1, Bytes::from_static(b"by wire"))).await.unwrap();
    within(relayed.routed.send(&cloud_id, 1, Bytes::from_static(b"by gateway"))).await.unwrap();
    let mut got = HashMap::new();
    for _ in 0..2 {
        let (from, _, _, payload, via) = cloud.message().await;
        got.insert(from, (payload, via));
    }
    assert_eq!(got[&direct.id()], (Bytes::from_static(b"by wire"), Via::Direct));
    assert_eq!(got[&relayed.id()], (Bytes::from_static(b"by gateway"), Via::Relay(relay.node())));
    let connected: Vec<(NodeId, bool)> = cloud
        .log
        .iter()
        .filter_map(|e| match e {
            NodeEvent::Connected { node, direct, .. } => Some((*node, *direct)),
            _ => None,
        })
        .collect();
    assert!(connected.contains(&(direct.id(), true)) && connected.contains(&(relayed.id(), false)), "{connected:?}");

    // Replies take the same paths back.
    within(cloud.routed.send(&direct.id(), 2, Bytes::from_static(b"ack wire"))).await.unwrap();
    let (from, channel, _, payload, via) = direct.message().await;
    assert_eq!((from, channel, &payload[..], via), (cloud_id, 2, &b"ack wire"[..], Via::Direct));
    within(cloud.routed.send(&relayed.id(), 2, Bytes::from_static(b"ack gateway"))).await.unwrap();
    let (from, _, _, payload, via) = relayed.message().await;
    assert_eq!((from, &payload[..], via), (cloud_id, &b"ack gateway"[..], Via::Relay(relay.node())));
    let c = cloud.routed.stats();
    assert_eq!((c.direct_links, c.relay_links, c.sessions), (1, 1, 1), "{c:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_survives_when_the_relay_link_drops_and_comes_back() {
    init_tracing();
    for transport in [Transport::Tcp, Transport::Udp] {
        let (relay, mut cloud, mut dev, link) = network(transport).await;
        let (cloud_id, dev_id) = (cloud.id(), dev.id());
        for p in [&b"before 0"[..], b"before 1"] {
            within(dev.routed.send(&cloud_id, 1, Bytes::from_static(p))).await.unwrap();
            cloud.message().await;
        }
        within(cloud.routed.send(&dev_id, 1, Bytes::from_static(b"reply 0"))).await.unwrap();
        dev.message().await;

        // The device's link to the relay goes away: both ends lose their route (spec §16.6).
        within(link.close(CloseReason::Normal)).await.unwrap();
        let lost = |who: NodeId| move |e: &NodeEvent| matches!(e, NodeEvent::RouteChanged { node, relay: None } if *node == who);
        dev.until("route lost", lost(cloud_id)).await;
        cloud.until("route withdrawn", lost(dev_id)).await;
        let r = dev.routed.send(&cloud_id, 1, Bytes::from_static(b"into the void")).await;
        assert!(matches!(r, Err(Error::NoRoute)), "{transport}: {r:?}");

        // A new link announces the same node: the same session goes on.
        dev.attach(&relay, transport).await;
        let back = |who: NodeId, via: NodeId| move |e: &NodeEvent| matches!(e, NodeEvent::RouteChanged { node, relay: Some(r) } if *node == who && *r == via);
        dev.until("route back", back(cloud_id, relay.node())).await;
        cloud.until("route announced again", back(dev_id, relay.node())).await;
        within(dev.routed.send(&cloud_id, 1, Bytes::from_static(b"after"))).await.unwrap();
        let (from, _, id, payload, _) = cloud.message().await;
        // Message ids continue: no new session was made.
        assert_eq!((from, id, &payload[..]), (dev_id, 2, &b"after"[..]), "{transport}");
        within(cloud.routed.send(&dev_id, 1, Bytes::from_static(b"reply 1"))).await.unwrap();
        let (_, _, id, payload, _) = dev.message().await;
        assert_eq!((id, &payload[..]), (1, &b"reply 1"[..]), "{transport}");
        assert_eq!((dev.connected_events(), cloud.connected_events()), (1, 1), "{transport}");
        let (d, c) = (dev.routed.stats(), cloud.routed.stats());
        assert_eq!((d.handshakes_started, d.sessions, c.sessions), (1, 1, 1), "{transport}: {d:?} {c:?}");
        assert_eq!(d.relay_links, 1, "{transport}: the closed link is gone");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_notices_become_events_and_unknown_handles_are_dropped() {
    init_tracing();
    let (relay, cloud, mut dev, _link) = network(Transport::Tcp).await;
    let (cloud_id, dev_id) = (cloud.id(), dev.id());
    // spec §16.5: the relay tells the device its cloud is unreachable.
    let route = relay.handle(dev_id, cloud_id).await;
    relay.send_to(dev_id, RoutingMessage::Unreachable { route, reason: RouteReason::UplinkDown }).await;
    let e = dev.until("notice", |e| matches!(e, NodeEvent::Unreachable { .. })).await;
    match e {
        NodeEvent::Unreachable { node, relay: from, reason } => {
            assert_eq!((node, from, reason), (cloud_id, relay.node(), RouteReason::UplinkDown));
        }
        _ => unreachable!("matched above"),
    }
    // Handles the relay never announced: dropped and counted (spec §16.4, §16.7).
    relay.send_to(dev_id, RoutingMessage::Unreachable { route: 77, reason: RouteReason::Detached }).await;
    relay.send_to(dev_id, RoutingMessage::Deliver { route: 78, packet: Bytes::from_static(&[0x10; 24]) }).await;
    relay.send_to(dev_id, RoutingMessage::Withdraw { route: 79, reason: RouteReason::Detached }).await;
    // An endpoint is no relay: a Forward to it is dropped.
    relay.send_to(dev_id, RoutingMessage::Forward { route, packet: Bytes::from_static(&[1]) }).await;
    let routed = dev.routed.clone();
    eventually("drops counted", || {
        let s = routed.stats();
        s.dropped_unknown_route == 3 && s.dropped_not_a_relay == 1
    })
    .await;
    // The session goes on.
    within(dev.routed.send(&cloud_id, 1, Bytes::from_static(b"fine"))).await.unwrap();
    let s = dev.routed.stats();
    assert_eq!((s.unreachable, s.sessions), (1, 1), "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_larger_than_every_queue_waits_for_a_slow_reader_and_arrives_whole_and_in_order() {
    init_tracing();
    const N: u64 = 3_000;
    // Small queues, packets and socket buffers everywhere: together they hold far fewer than
    // N messages (about a third), so a cloud that does not read stops the device's sends (backpressure through
    // the cloud's actor, its link, the relay and the device's link).
    let mut small = open_limits();
    small.send_queue = 4;
    small.recv_queue = 4;
    small.tcp_send_buffer = Some(4_096);
    small.tcp_recv_buffer = Some(4_096);
    let relay = TestRelay::with_limits(small.clone()).await;
    let links = Endpoint::builder(keypair(DEVICE)).routing(true).limits(small.clone()).bind().await.unwrap();
    let limits =
        RoutedLimits { link_queue: 1, event_queue: 4, input_queue: 4, max_routed_packet: 1_200, ..Default::default() };
    let protocol = veil_protocol::Limits { send_queue_bytes: 16 * 1024, ..Default::default() };
    let routed = RoutedEndpoint::builder(keypair(DEVICE)).limits(limits).protocol_limits(protocol).build().unwrap();
    let dev = Node { key: links.public_key(), links, routed, log: Vec::new() };
    let links = Endpoint::builder(keypair(CLOUD)).routing(true).limits(small).bind().await.unwrap();
    let routed = RoutedEndpoint::builder(keypair(CLOUD))
        .authorizer(Authorizer::allowlist([dev.key]))
        .limits(limits)
        .build()
        .unwrap();
    let mut cloud = Node { key: links.public_key(), links, routed, log: Vec::new() };
    cloud.attach(&relay, Transport::Tcp).await;
    dev.attach(&relay, Transport::Tcp).await;
    let cloud_id = within(dev.routed.connect(cloud.key)).await.unwrap();
    let sender = dev.routed.clone();
    let sending = tokio::spawn(async move {
        for i in 0..N {
            let payload = Bytes::from(format!("reading {i:05} {}", "x".repeat(200)));
            sender.send(&cloud_id, 3, payload).await.unwrap();
        }
    });
    // The cloud reads nothing until the device's sends stop moving.
    let mut last = u64::MAX;
    for _ in 0..200 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = dev.routed.stats().messages_out;
        if now == last {
            break;
        }
        last = now;
    }
    let stuck = dev.routed.stats();
    assert!(stuck.messages_out < N, "the device sent everything to a cloud that does not read: {stuck:?}");
    // What stopped it: its relay link's queue was full, so its session's queue filled, so its
    // send waited.
    assert!(stuck.link_stalls > 0 && stuck.sends_waited > 0, "{stuck:?}");
    for i in 0..N {
        let (_, channel, id, payload, _) = cloud.message().await;
        assert_eq!((channel, id), (3, i));
        assert!(payload.starts_with(format!("reading {i:05}").as_bytes()));
    }
    within(sending).await.unwrap();
    let (d, c) = (dev.routed.stats(), cloud.routed.stats());
    println!("stalled at {} messages; device: {d:?}\ncloud: {c:?}", stuck.messages_out);
    assert_eq!((d.messages_out, c.messages_in, c.dropped_refused, c.dropped_no_session), (N, N, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_to_end_sessions_follow_the_trust_state() {
    init_tracing();
    let relay = TestRelay::start().await;
    let mut dev = device(DEVICE, None).await;
    let mut list = Allowlist::new();
    list.insert(dev.key, "sensor-1").unwrap();
    let trust = TrustState::allowlist(list, TimeSource::SystemClock, []);
    let links = Endpoint::builder(keypair(CLOUD)).routing(true).limits(open_limits()).bind().await.unwrap();
    let routed = RoutedEndpoint::builder(keypair(CLOUD))
        .authorizer(Authorizer::trust(trust.clone(), PeerRoles::new(RoleSet::DEVICE, RoleSet::NONE)))
        .build()
        .unwrap();
    let mut cloud = Node { key: links.public_key(), links, routed, log: Vec::new() };
    cloud.attach(&relay, Transport::Tcp).await;
    dev.attach(&relay, Transport::Tcp).await;
    let cloud_id = within(dev.routed.connect(cloud.key)).await.unwrap();
    let dev_id = dev.id();
    // The trust check names the peer.
    match cloud.until("connected", |e| matches!(e, NodeEvent::Connected { .. })).await {
        NodeEvent::Connected { node, direct: false, peer: Some(Authorized::Listed { name, .. }), .. } => {
            assert_eq!((node, name.as_str()), (dev_id, "sensor-1"));
        }
        other => panic!("{other:?}"),
    }
    // The session took a message, so the device's next sends go without waiting for an
    // answer: the end of the session must still turn them back into errors.
    within(dev.routed.send(&cloud_id, 1, Bytes::from_static(b"while allowed"))).await.unwrap();
    let (from, _, _, _, _) = cloud.message().await;
    assert_eq!(from, dev_id);
    // spec §15.8: the device leaves the allowlist; its live end-to-end session closes.
    trust.replace(Trust::Allowlist(Allowlist::new())).unwrap();
    let closed = cloud.until("closed", |e| matches!(e, NodeEvent::Closed { .. })).await;
    assert!(
        matches!(&closed, NodeEvent::Closed { node, direct: false, outcome: Error::Closed { reason: CloseReason::Unauthorized, by_peer: false } } if *node == dev_id),
        "{closed:?}"
    );
    let closed = dev.until("closed", |e| matches!(e, NodeEvent::Closed { .. })).await;
    assert!(
        matches!(&closed, NodeEvent::Closed { node, outcome: Error::Closed { reason: CloseReason::Unauthorized, by_peer: true }, .. } if *node == cloud_id),
        "{closed:?}"
    );
    assert_eq!((cloud.routed.stats().sessions, dev.routed.stats().sessions), (0, 0));
    let r = dev.routed.send(&cloud_id, 1, Bytes::from_static(b"still there?")).await;
    assert!(matches!(r, Err(Error::NoSession)), "{r:?}");
    assert_eq!(dev.routed.stats().sends_refused, 0);
}

/// spec §11.11: the end-to-end sessions share the static-static DH cache idea with links. A
/// device that comes back with a new session (here a restarted device, with an empty cache of
/// its own) costs the cloud one X25519 less: the cloud's cache hits, and the session works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_comes_back_hits_the_clouds_end_to_end_dh_cache() {
    init_tracing();
    let (relay, mut cloud, dev, _link) = network(Transport::Tcp).await;
    let first = cloud.routed.stats().static_dh_cache;
    assert_eq!(first.hits, 0, "{first:?}");
    assert!(first.misses >= 1, "the first IK computed DH(s, rs): {first:?}");
    assert!(dev.routed.stats().static_dh_cache.misses >= 1);
    dev.routed.close();

    // The device restarts: same key, new endpoints, new end-to-end session.
    let again = device(DEVICE, None).await;
    again.attach(&relay, Transport::Tcp).await;
    let cloud_id = within(again.routed.connect(cloud.key)).await.unwrap();
    within(again.routed.send(&cloud_id, 1, Bytes::from_static(b"back"))).await.unwrap();
    let (from, _, _, payload, _) = cloud.message().await;
    assert_eq!((from, &payload[..]), (again.id(), &b"back"[..]));
    let later = cloud.routed.stats().static_dh_cache;
    // The ss of the new IK came from the cache (its es, with the new ephemeral, cannot).
    assert_eq!((later.hits, later.inserts), (first.hits + 1, first.inserts), "{later:?}");
    // Off: nothing is cached.
    let off = RoutedEndpoint::builder(keypair(DEVICE))
        .limits(RoutedLimits { static_dh_cache: 0, ..RoutedLimits::default() })
        .build()
        .unwrap();
    assert_eq!(off.stats().static_dh_cache, Default::default());
}

/// `send_many` hands a burst to the endpoint in groups: every message arrives, in order, and a
/// refusal is reported for the burst.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_many_delivers_a_burst_in_order() {
    init_tracing();
    let (_relay, mut cloud, dev, _link) = network(Transport::Tcp).await;
    let cloud_id = cloud.id();
    let burst: Vec<Bytes> = (0..200u32).map(|i| Bytes::from(i.to_be_bytes().to_vec())).collect();
    within(dev.routed.send_many(&cloud_id, 4, burst.clone())).await.unwrap();
    for want in &burst {
        let (from, channel, _, payload, _) = cloud.message().await;
        assert_eq!((from, channel, &payload), (dev.id(), 4, want));
    }
    assert_eq!(dev.routed.stats().messages_out, 200);
    // To a node without a session: refused, as `send` is.
    let stranger = node_of(keypair(0x5157).public());
    let r = within(dev.routed.send_many(&stranger, 4, burst[..3].to_vec())).await;
    assert!(matches!(r, Err(Error::NoSession)), "{r:?}");
    assert_eq!(dev.routed.stats().messages_out, 200);
}

/// Without delivery, once a node's session took a message, `send` hands the next ones to the
/// endpoint without waiting for its answer. Whatever happens to the route meanwhile, every
/// message is accounted for, once: queued in the session (`messages_out`), given back as a
/// `Refused` event (its route went while it waited for its turn), or refused by `send` with
/// an error. The relay link drops and comes back twice while the device sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_best_effort_send_is_queued_given_back_or_refused_while_the_route_flaps() {
    init_tracing();
    const N: u64 = 4_000;
    let (relay, cloud, dev, mut link) = network(Transport::Tcp).await;
    let cloud_id = cloud.id();
    let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let given_back = Arc::new(std::sync::atomic::AtomicU64::new(0));
    // Both ends' events are read (an endpoint whose events pile up waits): the cloud's
    // messages, the device's refused sends.
    for (routed, count) in
        [(cloud.routed.clone(), Arc::clone(&received)), (dev.routed.clone(), Arc::clone(&given_back))]
    {
        tokio::spawn(async move {
            while let Ok(e) = routed.next_event().await {
                if matches!(e, NodeEvent::Message { .. } | NodeEvent::Refused { channel: 2, .. }) {
                    count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        });
    }
    let sender = dev.routed.clone();
    let sending = tokio::spawn(async move {
        let mut refused = 0u64;
        for i in 0..N {
            match sender.send(&cloud_id, 2, Bytes::from(i.to_be_bytes().to_vec())).await {
                Ok(()) => {}
                Err(Error::NoRoute) => refused += 1,
                Err(e) => panic!("message {i}: {e}"),
            }
            if i % 100 == 99 {
                // Spread the sends over the flaps below.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        refused
    });
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(8)).await;
        within(link.close(CloseReason::Normal)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(4)).await;
        link = dev.attach(&relay, Transport::Tcp).await;
    }
    let refused = within(sending).await.unwrap();
    let given_back = || given_back.load(std::sync::atomic::Ordering::Relaxed);
    let accounted = || dev.routed.stats().messages_out + given_back() + refused;
    eventually("every send accounted for", || accounted() >= N).await;
    let s = dev.routed.stats();
    println!("refused {refused}; device {s:?}; cloud got {}", received.load(std::sync::atomic::Ordering::Relaxed));
    assert_eq!(accounted(), N, "a message was counted twice: {s:?}");
    assert_eq!(s.sends_refused, given_back(), "{s:?}");
    assert!(received.load(std::sync::atomic::Ordering::Relaxed) <= s.messages_out);
    // The session lived through the flaps.
    assert_eq!((s.sessions, s.handshakes_started), (1, 1), "{s:?}");
}
