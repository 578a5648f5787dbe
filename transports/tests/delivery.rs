//! Acknowledged delivery (spec §17) through [`RoutedEndpoint`]: a device sends 2 000 messages
//! on two channels to a cloud while its link is cut several times at random points (a seeded
//! TCP chaos proxy) or loses packets (the seeded lossy UDP proxy). The cloud receives every
//! message exactly once, in order per channel, byte for byte; the device's window never
//! exceeds its bound and `send` waits instead of failing. Shapes: through a relay over TCP
//! (end-to-end sessions survive the cuts, routes come and go), through a relay over lossy UDP,
//! and a direct TCP link (each cut is a new connection: the window goes again, spec §17.4
//! rule 2). `VEIL_TEST_SEED` shifts the seeds.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod util;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use tokio::sync::Mutex;
use util::*;
use veil_protocol::delivery::DeliveryConfig;
use veil_protocol::routing::{RouteReason, RouteTable, RoutingMessage};
use veil_protocol::trust::NodeId;
use veil_protocol::{CloseReason, PublicKey, Timestamp};
use veil_transports::chaos::{ChaosConfig, ChaosProxy};
use veil_transports::fault::{Direction, LinkFaults, LossyProxy, ProxyConfig};
use veil_transports::{
    Authorizer, Connection, DeliveryOptions, Endpoint, NodeEvent, Received, RoutedEndpoint, Transport,
};

const RELAY: u64 = 200;
const CLOUD: u64 = 201;
const DEVICE: u64 = 202;
const T0: Timestamp = Timestamp::from_millis(0);
const PER_CHANNEL: u64 = 1_000;
const CHANNELS: [u16; 2] = [1, 9];
const WINDOW: usize = 64;
const CUTS: usize = 5;

fn seed(base: u64) -> u64 {
    let shift = std::env::var("VEIL_TEST_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    let seed = base.wrapping_add(shift);
    eprintln!("seed {seed}");
    seed
}

fn node_of(key: &PublicKey) -> NodeId {
    NodeId::from_public_key(key)
}

fn payload(channel: u16, id: u64) -> Bytes {
    Bytes::from(format!("channel {channel} message {id} {}", "x".repeat((id % 97) as usize)))
}

// ---------------------------------------------------------------------------------------
// A minimal relay (spec §16.3, §16.4), as in tests/routed.rs.

struct Peer {
    id: u64,
    link: Connection,
    table: RouteTable,
}

type Peers = Arc<Mutex<HashMap<NodeId, Peer>>>;

/// A stand-in for a gateway's spool (spec §17.9): while it is on for a destination (whose
/// uplink is "down"), routed TRANSPORT packets for it are kept (source, packet) and their
/// custody acknowledged with `Stored`.
#[derive(Default)]
struct SpoolState {
    held: Option<(NodeId, Vec<(NodeId, Bytes)>)>,
    /// Envelopes for this node are dropped (its link loses everything toward it).
    drop_to: Option<NodeId>,
}

type Spool = Arc<Mutex<SpoolState>>;

async fn relay() -> (Endpoint, Peers) {
    let (endpoint, peers, _) = spooling_relay().await;
    (endpoint, peers)
}

async fn spooling_relay() -> (Endpoint, Peers, Spool) {
    let endpoint = Endpoint::builder(keypair(RELAY))
        .authorizer(Authorizer::allow_all())
        .routing(true)
        .limits(open_limits())
        .listen_tcp(localhost())
        .bind_udp(localhost())
        .bind()
        .await
        .unwrap();
    let peers: Peers = Arc::default();
    let spool: Spool = Arc::default();
    let (ep, p, sp) = (endpoint.clone(), Arc::clone(&peers), Arc::clone(&spool));
    tokio::spawn(async move {
        for id in 0..256 {
            let Ok(link) = ep.accept().await else { return };
            attach(&p, id, link.clone()).await;
            tokio::spawn(serve(Arc::clone(&p), Arc::clone(&sp), id, link));
        }
    });
    (endpoint, peers, spool)
}

/// Turns the spool off and passes on what it holds, oldest first (spec §17.9 replay).
async fn replay(peers: &Peers, spool: &Spool) -> usize {
    let Some((dst, held)) = spool.lock().await.held.take() else { return 0 };
    let mut s = peers.lock().await;
    for (src, packet) in &held {
        let d = s.get_mut(&dst).unwrap();
        let a = d.table.announce(*src, T0).unwrap();
        if a.new {
            d.link.send_routing(RoutingMessage::Route { route: a.route, node: *src }).await.unwrap();
        }
        d.link.send_routing(RoutingMessage::Deliver { route: a.route, packet: packet.clone() }).await.unwrap();
    }
    held.len()
}

async fn attach(peers: &Mutex<HashMap<NodeId, Peer>>, id: u64, link: Connection) {
    let node = node_of(&link.remote_static());
    let mut s = peers.lock().await;
    let mut table = RouteTable::new(64, false);
    let others: Vec<NodeId> = s.keys().filter(|n| **n != node).copied().collect();
    for other in others {
        let a = table.announce(other, T0).unwrap();
        let _ = link.send_routing(RoutingMessage::Route { route: a.route, node: other }).await;
        let p = s.get_mut(&other).unwrap();
        let a = p.table.announce(node, T0).unwrap();
        if a.new {
            let _ = p.link.send_routing(RoutingMessage::Route { route: a.route, node }).await;
        }
    }
    s.insert(node, Peer { id, link, table });
}

async fn serve(peers: Peers, spool: Spool, id: u64, link: Connection) {
    let node = node_of(&link.remote_static());
    for _ in 0..10_000_000 {
        match link.recv_any().await {
            Ok(Received::Routing(RoutingMessage::Forward { route, packet })) => {
                let mut s = peers.lock().await;
                let Some(src) = s.get_mut(&node).filter(|p| p.id == id) else { continue };
                let Ok(dst) = src.table.on_forward(route) else {
                    let msg = RoutingMessage::Unreachable { route, reason: RouteReason::UnknownRoute };
                    let _ = src.link.try_send_routing(msg);
                    continue;
                };
                let mut sp = spool.lock().await;
                if sp.drop_to == Some(dst) {
                    continue;
                }
                if let Some((_, held)) = sp.held.as_mut().filter(|(down, _)| *down == dst) {
                    // spec §17.9: TRANSPORT packets only (0x10/0x11), custody by counter.
                    if packet.len() > 4 && packet[0] & 0xfe == 0x10 {
                        let first = u32::from_be_bytes([0, packet[1], packet[2], packet[3]]);
                        let stored = RoutingMessage::Stored { route, generation: packet[0] & 1, first, count: 1 };
                        held.push((node, packet));
                        let _ = src.link.send_routing(stored).await;
                        continue;
                    }
                }
                drop(sp);
                let Some(d) = s.get_mut(&dst) else { continue };
                let a = d.table.announce(node, T0).unwrap();
                if a.new {
                    let _ = d.link.send_routing(RoutingMessage::Route { route: a.route, node }).await;
                }
                // A full link drops the envelope, like a lost packet (spec §16.4 step 5).
                let _ = d.link.try_send_routing(RoutingMessage::Deliver { route: a.route, packet });
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    let mut s = peers.lock().await;
    if s.get(&node).is_some_and(|p| p.id == id) {
        s.remove(&node);
        for p in s.values_mut() {
            if let Some(route) = p.table.withdraw(&node, T0) {
                let _ = p.link.send_routing(RoutingMessage::Withdraw { route, reason: RouteReason::Detached }).await;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The run

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// Device -> chaos proxy (TCP) -> relay -> cloud.
    RelayTcpCuts,
    /// Device -> lossy proxy (UDP, 10 % loss, reordering) -> relay -> cloud.
    RelayUdpLossy,
    /// Device -> chaos proxy (TCP) -> cloud, a direct link.
    DirectTcpCuts,
}

fn options(auto_commit: bool) -> DeliveryOptions {
    DeliveryOptions {
        // Shorter timers than the spec's defaults keep the lossy run short.
        config: DeliveryConfig {
            window_messages: WINDOW,
            rto: Duration::from_millis(200).into(),
            rto_max: Duration::from_secs(2).into(),
            ..DeliveryConfig::default()
        },
        auto_commit,
        ..DeliveryOptions::default()
    }
}

async fn run(shape: Shape, base_seed: u64) {
    init_tracing();
    let seed = seed(base_seed);
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let (relay_ep, _peers) = relay().await;
    let relay_key = relay_ep.public_key();
    let device_key = *keypair(DEVICE).public();

    // The cloud: a links endpoint (relay uplink, or direct devices) and a routed endpoint
    // that commits each message only once the test has checked it.
    let cloud_links = Endpoint::builder(keypair(CLOUD))
        .authorizer(Authorizer::allowlist([device_key, relay_key]))
        .routing(true)
        .limits(open_limits())
        .listen_tcp(localhost())
        .bind()
        .await
        .unwrap();
    let cloud = RoutedEndpoint::builder(keypair(CLOUD))
        .authorizer(Authorizer::allowlist([device_key]))
        .delivery(options(false))
        .build()
        .unwrap();
    let cloud_key = cloud.public_key();
    let device_links = Endpoint::builder(keypair(DEVICE))
        .routing(true)
        .limits(open_limits())
        .bind_udp(localhost())
        .bind()
        .await
        .unwrap();
    let device = RoutedEndpoint::builder(keypair(DEVICE)).delivery(options(true)).build().unwrap();

    // Where the device's link goes, through which proxy.
    let (transport, upstream) = match shape {
        Shape::RelayTcpCuts => (Transport::Tcp, relay_ep.local_tcp_addr().unwrap()),
        Shape::RelayUdpLossy => (Transport::Udp, relay_ep.local_udp_addr().unwrap()),
        Shape::DirectTcpCuts => (Transport::Tcp, cloud_links.local_tcp_addr().unwrap()),
    };
    let (chaos, lossy) = match shape {
        Shape::RelayUdpLossy => {
            // Faults start once the session is up: this relay announces routes once, where a
            // real one repeats them on datagram links (spec §16.3).
            let p = LossyProxy::start(localhost(), upstream, ProxyConfig::new(seed)).await.unwrap();
            (None, Some(p))
        }
        _ => (Some(Arc::new(ChaosProxy::start(localhost(), upstream, ChaosConfig::new(seed)).await.unwrap())), None),
    };
    let proxy_addr: SocketAddr =
        chaos.as_ref().map_or_else(|| lossy.as_ref().unwrap().local_addr(), |c| c.local_addr());
    let direct = shape == Shape::DirectTcpCuts;
    let peer_key = if direct { cloud_key } else { relay_key };

    if direct {
        // The cloud takes every device link it accepts as a direct link.
        let (links, routed) = (cloud_links.clone(), cloud.clone());
        tokio::spawn(async move {
            for _ in 0..64 {
                let Ok(link) = links.accept().await else { return };
                routed.add_direct(link);
            }
        });
    } else {
        let uplink = within(cloud_links.connect(Transport::Tcp, relay_ep.local_tcp_addr().unwrap(), Some(relay_key)))
            .await
            .unwrap();
        cloud.add_relay_link(uplink);
    }

    // The device keeps a link up: after every cut it connects again (bounded).
    let (dl, dr) = (device_links.clone(), device.clone());
    let reconnects = Arc::new(AtomicU64::new(0));
    let rc = Arc::clone(&reconnects);
    let keeper = tokio::spawn(async move {
        for _ in 0..64 {
            let mut link = None;
            for _ in 0..200 {
                match tokio::time::timeout(STEP, dl.connect(transport, proxy_addr, Some(peer_key))).await {
                    Ok(Ok(l)) => {
                        link = Some(l);
                        break;
                    }
                    _ => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
            let link = link.expect("the device reconnects");
            rc.fetch_add(1, Ordering::Relaxed);
            if direct {
                dr.add_direct(link.clone());
            } else {
                dr.add_relay_link(link.clone());
            }
            let _ = link.closed().await;
        }
    });

    let cloud_node = within(device.connect(cloud_key)).await.unwrap();
    assert_eq!(cloud_node, node_of(&cloud_key));
    let device_node = node_of(keypair(DEVICE).public());
    if let Some(p) = &lossy {
        let faults = LinkFaults::new().loss(0.1).reorder(0.1).delay(Duration::from_millis(2));
        for d in [Direction::ToServer, Direction::ToClient] {
            p.set_faults(d, faults).unwrap();
        }
    }

    // The device sends on both channels, interleaved; every send succeeds (it waits).
    let sender = {
        let device = device.clone();
        tokio::spawn(async move {
            for id in 0..PER_CHANNEL {
                for channel in CHANNELS {
                    tokio::time::timeout(
                        Duration::from_secs(60),
                        device.send(&cloud_node, channel, payload(channel, id)),
                    )
                    .await
                    .expect("send waits, bounded")
                    .expect("send never fails");
                }
            }
        })
    };

    // Cuts at random points of the stream (TCP shapes).
    let received = Arc::new(AtomicU64::new(0));
    let mut points: Vec<u64> = (0..CUTS).map(|_| 100 + rng.next_u64() % (2 * PER_CHANNEL - 300)).collect();
    points.sort_unstable();
    let cutter = chaos.clone().map(|proxy| {
        let received = Arc::clone(&received);
        tokio::spawn(async move {
            for at in points {
                for _ in 0..6_000 {
                    if received.load(Ordering::Relaxed) >= at {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                proxy.cut_all();
            }
        })
    });

    // The cloud: each message exactly once, in order per channel, byte for byte.
    let mut next: HashMap<u16, u64> = CHANNELS.iter().map(|c| (*c, 0)).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while next.values().any(|n| *n < PER_CHANNEL) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let e = tokio::time::timeout(left, cloud.next_event())
            .await
            .unwrap_or_else(|_| panic!("{shape:?}: stuck at {next:?}, device {:?}", device.stats()))
            .unwrap();
        if let NodeEvent::Message { node, channel, id, payload: p, stream, .. } = e {
            assert_eq!(node, device_node);
            assert!(stream.is_some(), "{shape:?}: a message taken best effort");
            let n = next.get_mut(&channel).unwrap_or_else(|| panic!("unknown channel {channel}"));
            assert_eq!(id, *n, "{shape:?}: channel {channel} out of order or duplicated");
            assert_eq!(p, payload(channel, id), "{shape:?}: content");
            *n += 1;
            cloud.commit(&node, channel, id);
            received.fetch_add(1, Ordering::Relaxed);
        }
    }
    within(sender).await.unwrap();
    if let Some(c) = cutter {
        within(c).await.unwrap();
    }
    // Nothing more comes: no message twice, even after the last acks.
    tokio::time::sleep(Duration::from_millis(300)).await;
    while let Ok(Ok(e)) = tokio::time::timeout(Duration::from_millis(50), cloud.next_event()).await {
        assert!(!matches!(e, NodeEvent::Message { .. }), "{shape:?}: a message after the last: {e:?}");
    }

    // Every message acknowledged: the device's outbox is empty (bounded wait for the last Ack).
    let acked = tokio::time::Instant::now() + Duration::from_secs(10);
    while device.stats().acknowledged < device.stats().messages_out && tokio::time::Instant::now() < acked {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (d, c) = (device.stats(), cloud.stats());
    assert_eq!(d.acknowledged, d.messages_out, "{shape:?}: not every message acknowledged");
    eprintln!("{shape:?}: reconnects {}, device {d:?}, cloud {c:?}", reconnects.load(Ordering::Relaxed));
    assert!(d.window_peak <= WINDOW, "{shape:?}: window {} above {WINDOW}", d.window_peak);
    assert!(d.window_waits > 0, "{shape:?}: send never waited for the window");
    assert_eq!(d.expired, 0);
    match shape {
        Shape::RelayUdpLossy => {
            assert!(d.retransmissions > 0, "{shape:?}: nothing lost?");
            let stats = lossy.unwrap().shutdown().await;
            assert!(stats.to_server.lost + stats.to_client.lost > 0, "{stats:?}");
        }
        _ => {
            let stats = chaos.unwrap().stats();
            assert!(reconnects.load(Ordering::Relaxed) > CUTS as u64 / 2, "{shape:?}: {stats:?}");
        }
    }
    keeper.abort();
    device.close();
    cloud.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_once_and_in_order_through_a_relay_link_cut_several_times() {
    run(Shape::RelayTcpCuts, 11).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_once_and_in_order_through_a_relay_over_lossy_udp() {
    run(Shape::RelayUdpLossy, 12).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_once_and_in_order_over_a_direct_link_cut_several_times() {
    run(Shape::DirectTcpCuts, 13).await;
}

/// spec §17.6, §17.7: a command for a node that never connects waits in the outbox until
/// its time to live ends, then is reported as expired (never transmitted), in id order; a
/// message without a time to live stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_for_an_absent_node_expires_and_is_reported() {
    init_tracing();
    let cloud = RoutedEndpoint::builder(keypair(CLOUD)).delivery(options(false)).build().unwrap();
    let absent = node_of(keypair(DEVICE).public());
    let start = tokio::time::Instant::now();
    for i in 0..3u64 {
        let id =
            within(cloud.send_with_ttl(&absent, 4, payload(4, i), Some(Duration::from_millis(200)))).await.unwrap();
        assert_eq!(id, i);
    }
    // Another channel, no time to live: it stays in the window.
    assert_eq!(within(cloud.send_with_ttl(&absent, 5, payload(5, 0), None)).await.unwrap(), 0);
    for i in 0..3u64 {
        match within(cloud.next_event()).await.unwrap() {
            NodeEvent::Expired { node, channel, id, payload: p, unconfirmed } => {
                assert_eq!((node, channel, id, unconfirmed), (absent, 4, i, false));
                assert_eq!(p, payload(4, i));
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(start.elapsed() >= Duration::from_millis(200));
    assert!(tokio::time::timeout(Duration::from_millis(300), cloud.next_event()).await.is_err());
    let s = cloud.stats();
    assert_eq!((s.expired, s.window_peak, s.acknowledged), (3, 4, 0));
    // Without delivery there is no time to live to give.
    let plain = RoutedEndpoint::builder(keypair(CLOUD)).build().unwrap();
    assert!(matches!(
        plain.send_with_ttl(&absent, 4, payload(4, 0), None).await,
        Err(veil_transports::Error::Delivery(_))
    ));
    cloud.close();
    plain.close();
}

/// Reads the cloud's messages on channel 3 up to id `upto`, each in order, byte for byte.
async fn expect_on_3(cloud: &RoutedEndpoint, upto: u64, next: &mut u64) {
    while *next < upto {
        if let NodeEvent::Message { channel, id, payload: p, .. } = within(cloud.next_event()).await.unwrap() {
            assert_eq!((channel, id), (3, *next));
            assert_eq!(p, payload(3, id));
            *next += 1;
        }
    }
}

/// A cloud and a device with delivery on, each with a TCP link to a spooling stand-in relay,
/// and the device's end-to-end session with the cloud up. The cloud's link endpoint also
/// listens for the device's direct link.
struct Pair {
    /// Keeps the stand-in relay's endpoint.
    _relay: Endpoint,
    peers: Peers,
    spool: Spool,
    cloud_links: Endpoint,
    cloud: RoutedEndpoint,
    device_links: Endpoint,
    device: RoutedEndpoint,
    cloud_node: NodeId,
}

impl Pair {
    /// Message 0 of channel 3 reaches the cloud and its acknowledgement the device.
    async fn first_message_acknowledged(&self, next: &mut u64) {
        within(self.device.send(&self.cloud_node, 3, payload(3, 0))).await.unwrap();
        expect_on_3(&self.cloud, 1, next).await;
        eventually("the first message acknowledged", || self.device.stats().acknowledged == 1).await;
    }
}

async fn pair(device_options: DeliveryOptions) -> Pair {
    let (relay, peers, spool) = spooling_relay().await;
    let relay_key = relay.public_key();
    let relay_addr = relay.local_tcp_addr().unwrap();
    let device_key = *keypair(DEVICE).public();
    let cloud_links = Endpoint::builder(keypair(CLOUD))
        .authorizer(Authorizer::allowlist([relay_key, device_key]))
        .routing(true)
        .listen_tcp(localhost())
        .bind()
        .await
        .unwrap();
    let cloud = RoutedEndpoint::builder(keypair(CLOUD))
        .authorizer(Authorizer::allowlist([device_key]))
        .delivery(options(true))
        .build()
        .unwrap();
    cloud.add_relay_link(within(cloud_links.connect(Transport::Tcp, relay_addr, Some(relay_key))).await.unwrap());
    let device_links = Endpoint::builder(keypair(DEVICE)).routing(true).bind().await.unwrap();
    let device = RoutedEndpoint::builder(keypair(DEVICE)).delivery(device_options).build().unwrap();
    device.add_relay_link(within(device_links.connect(Transport::Tcp, relay_addr, Some(relay_key))).await.unwrap());
    let cloud_node = within(device.connect(cloud.public_key())).await.unwrap();
    Pair { _relay: relay, peers, spool, cloud_links, cloud, device_links, device, cloud_node }
}

/// spec §17.9: Data whose packets a relay holds in custody is not retransmitted while the
/// relay keeps it (here far longer than the retransmission timeout), and reaches the cloud,
/// once, in order, when the relay passes the packets on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_in_a_relays_custody_is_not_retransmitted_and_arrives_on_replay() {
    init_tracing();
    let p = pair(options(true)).await;
    let Pair { peers, spool, cloud, device, cloud_node, .. } = &p;

    let mut next = 0u64;
    for i in 0..5 {
        within(device.send(cloud_node, 3, payload(3, i))).await.unwrap();
    }
    expect_on_3(cloud, 5, &mut next).await;

    // The uplink is "down": the relay spools and acknowledges custody.
    spool.lock().await.held = Some((*cloud_node, Vec::new()));
    let before = device.stats();
    for i in 5..25 {
        within(device.send(cloud_node, 3, payload(3, i))).await.unwrap();
    }
    // Ten retransmission timeouts (200 ms) go by; nothing is sent again, nothing arrives.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = device.stats();
    assert!(during.custody >= 20, "{during:?}");
    assert_eq!(during.retransmissions, before.retransmissions, "{during:?}");
    assert!(tokio::time::timeout(Duration::from_millis(100), cloud.next_event()).await.is_err());

    // The uplink is back: the relay replays; every message arrives once, in order, and the
    // acknowledgements free the device's window (a send after it goes straight through).
    assert!(replay(peers, spool).await >= 1);
    expect_on_3(cloud, 25, &mut next).await;
    within(device.send(cloud_node, 3, payload(3, 25))).await.unwrap();
    expect_on_3(cloud, 26, &mut next).await;
    assert_eq!(device.stats().retransmissions, before.retransmissions);
    assert_eq!(cloud.stats().duplicates_dropped, 0);
    device.close();
    cloud.close();
}

/// spec §17.9: the cloud's Acks of Data in a relay's custody are lost on their way back.
/// Custody stops the retransmissions that would repair that, so the device asks for the
/// acknowledgements (a `Stream` alone) once `custody_probe` passes without one, and the
/// answer frees its window, long before the custody would end (300 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_ack_of_data_in_custody_is_asked_for_again() {
    init_tracing();
    let mut opts = options(true);
    opts.config.custody_probe = Duration::from_millis(500).into();
    let p = pair(opts).await;
    let Pair { peers, spool, cloud, device, cloud_node, .. } = &p;
    let device_node = node_of(keypair(DEVICE).public());
    let mut next = 0u64;
    p.first_message_acknowledged(&mut next).await;

    spool.lock().await.held = Some((*cloud_node, Vec::new()));
    for i in 1..21 {
        within(device.send(cloud_node, 3, payload(3, i))).await.unwrap();
    }
    eventually("every message in custody", || device.stats().custody >= 20).await;
    // The replay reaches the cloud, but nothing gets back to the device.
    spool.lock().await.drop_to = Some(device_node);
    assert!(replay(peers, spool).await >= 1);
    expect_on_3(cloud, 21, &mut next).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = device.stats();
    assert_eq!(before.acknowledged, 1, "the Acks of 1..21 were lost: {before:?}");
    spool.lock().await.drop_to = None;
    // The device asks; the cloud's answer frees the 20 messages. No Data is sent again.
    eventually("the window freed by the answer to a request", || device.stats().acknowledged == 21).await;
    let after = device.stats();
    assert!(after.ack_requests >= 1, "{after:?}");
    assert_eq!(after.retransmissions, before.retransmissions, "{after:?}");
    assert_eq!(cloud.stats().duplicates_dropped, 0);
    device.close();
    cloud.close();
}

/// spec §17.1, §17.2: a node reachable both through a relay and by a direct link. Delivery
/// follows the direct link while it is up (what the routed session brings meanwhile is not
/// delivered a second time), and moves back to the routed session, which stayed up, when the
/// direct link goes: every message arrives once, in order, and sending never stalls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_moves_between_a_direct_link_and_a_routed_session_that_stays_up() {
    init_tracing();
    let p = pair(options(true)).await;
    let Pair { cloud_links, cloud, device_links, device, cloud_node, .. } = &p;
    let mut next = 0u64;
    let mut sent = 0u64;
    let mut send = |n: u64| {
        let (device, from) = (device.clone(), sent);
        sent += n;
        async move {
            for i in from..from + n {
                within(device.send(cloud_node, 3, payload(3, i))).await.unwrap();
            }
        }
    };
    send(10).await;
    expect_on_3(cloud, 10, &mut next).await;

    // A direct link comes up next to the routed session; delivery moves to it.
    let cloud_addr = cloud_links.local_tcp_addr().unwrap();
    let cloud_key = cloud.public_key();
    let (to_cloud, from_device) = within(async {
        tokio::try_join!(device_links.connect(Transport::Tcp, cloud_addr, Some(cloud_key)), cloud_links.accept())
    })
    .await
    .unwrap();
    device.add_direct(to_cloud.clone());
    cloud.add_direct(from_device);
    send(2 * WINDOW as u64).await;
    expect_on_3(cloud, 10 + 2 * WINDOW as u64, &mut next).await;

    // The direct link goes; the routed session is still up and takes over at once.
    within(to_cloud.close(veil_protocol::CloseReason::Normal)).await.unwrap();
    send(2 * WINDOW as u64).await;
    expect_on_3(cloud, 10 + 4 * WINDOW as u64, &mut next).await;
    eventually("every message acknowledged", || device.stats().acknowledged == sent).await;
    // The window went again on the routed session (spec §17.4 rule 2): what the cloud had
    // already took it as duplicates, and nothing more reaches the application.
    let extra = tokio::time::timeout(Duration::from_millis(200), async {
        loop {
            if let NodeEvent::Message { channel, id, .. } = cloud.next_event().await.unwrap() {
                return (channel, id);
            }
        }
    });
    assert!(extra.await.is_err(), "a message delivered twice");
    device.close();
    cloud.close();
}

/// With delivery, `send_many` puts a burst larger than the window into the outbox as the
/// window frees: every message reaches the cloud once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_many_with_delivery_waits_for_the_window() {
    init_tracing();
    let p = pair(options(true)).await;
    let Pair { cloud, device, cloud_node, .. } = &p;
    let n = 3 * WINDOW as u64;
    let sender = {
        let (device, cloud_node) = (device.clone(), *cloud_node);
        tokio::spawn(async move { device.send_many(&cloud_node, 3, (0..n).map(|i| payload(3, i))).await })
    };
    let mut next = 0;
    expect_on_3(cloud, n, &mut next).await;
    within(sender).await.unwrap().unwrap();
    eventually("every message acknowledged", || device.stats().acknowledged == n).await;
    assert!(device.stats().window_waits > 0, "the burst waited for the window");
    device.close();
    cloud.close();
}

/// spec §17.4 rule 5: a relay drops a device's packets without a word for a while, so the
/// device's timeout backs off (0.2, 0.4, 0.8, 1.6 s, next 3.2 s); then it says
/// `Unreachable { Congested }`: the message goes again one `rto` (0.2 s) after the notice,
/// seconds before its backed-off timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_congested_notice_brings_a_backed_off_retransmission_forward() {
    init_tracing();
    let mut opts = options(true);
    opts.config.rto_max = Duration::from_secs(30).into();
    let p = pair(opts).await;
    let Pair { peers, spool, cloud, device, cloud_node, .. } = &p;
    let mut next = 0u64;
    p.first_message_acknowledged(&mut next).await;

    spool.lock().await.drop_to = Some(*cloud_node);
    within(device.send(cloud_node, 3, payload(3, 1))).await.unwrap();
    eventually("four retransmissions dropped", || device.stats().retransmissions >= 4).await;
    spool.lock().await.drop_to = None;
    let before = device.stats().retransmissions;
    // The relay's notice, on the device's link, naming the cloud's handle there.
    {
        let s = peers.lock().await;
        let d = &s[&node_of(keypair(DEVICE).public())];
        let route = d.table.route_of(cloud_node).unwrap();
        d.link.send_routing(RoutingMessage::Unreachable { route, reason: RouteReason::Congested }).await.unwrap();
    }
    let noticed = std::time::Instant::now();
    expect_on_3(cloud, 2, &mut next).await;
    let waited = noticed.elapsed();
    // The backed-off timeout had at least 1.6 s to go (3.2 s after a transmission at most
    // 1.6 s old); rule 5 makes it 0.2 s.
    assert!(waited < Duration::from_millis(1_500), "waited {waited:?}");
    assert_eq!(device.stats().retransmissions, before + 1);
    assert_eq!(device.stats().unreachable, 1);
    device.close();
    cloud.close();
}

/// spec §17.4 rule 6: the cloud restarts while its route is gone (its link to the relay
/// drops, the relay withdraws it), so the device's end-to-end session outlives the cloud's
/// keys. When the new cloud attaches and the route comes back, what the device sends (again)
/// in the old session is dropped unread; `route_back_timeout` after the route's return with
/// a message in the window, or after the first send since, with nothing authenticated, the
/// device ends the session (as an idle timeout would, 60 s later here), opens another, and
/// the message reaches the new cloud.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_that_restarted_during_an_outage_is_reached_again_after_the_route_back_timeout() {
    cloud_restarts_during_an_outage(true).await;
}

/// The same, with the message sent only after the route came back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_that_restarted_is_reached_again_when_the_first_send_after_the_route_back_goes_unanswered() {
    cloud_restarts_during_an_outage(false).await;
}

async fn cloud_restarts_during_an_outage(send_during_the_outage: bool) {
    init_tracing();
    let mut opts = options(true);
    opts.route_back_timeout = Duration::from_millis(500);
    let Pair { _relay, peers, cloud_links, cloud, device, device_links: _device_links, cloud_node, .. } =
        pair(opts).await;
    // The cloud goes away with its keys; the relay withdraws its route.
    cloud.close();
    cloud_links.close();
    drop((cloud, cloud_links));
    eventually("the relay dropped the cloud", || peers.try_lock().is_ok_and(|s| !s.contains_key(&cloud_node))).await;
    if send_during_the_outage {
        within(device.send(&cloud_node, 3, payload(3, 0))).await.unwrap();
    }
    assert_eq!(device.stats().sessions, 1, "the end-to-end session outlives the route");

    // The same cloud key, a new process: no session, no delivery state.
    let relay_key = _relay.public_key();
    let cloud_links = Endpoint::builder(keypair(CLOUD))
        .authorizer(Authorizer::allowlist([relay_key]))
        .routing(true)
        .bind()
        .await
        .unwrap();
    let cloud = RoutedEndpoint::builder(keypair(CLOUD))
        .authorizer(Authorizer::allowlist([*keypair(DEVICE).public()]))
        .delivery(options(true))
        .build()
        .unwrap();
    let relay_addr = _relay.local_tcp_addr().unwrap();
    cloud.add_relay_link(within(cloud_links.connect(Transport::Tcp, relay_addr, Some(relay_key))).await.unwrap());
    let back = std::time::Instant::now();
    eventually("the route came back", || device.stats().routes_back == 1).await;
    if !send_during_the_outage {
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(device.stats().route_back_timeouts, 0, "nothing to answer yet");
        within(device.send(&cloud_node, 3, payload(3, 0))).await.unwrap();
    }

    // The old session ends within route_back_timeout; the application opens another.
    loop {
        match within(device.next_event()).await.unwrap() {
            NodeEvent::Closed { node, outcome, .. } if node == cloud_node => {
                assert!(
                    matches!(
                        outcome,
                        veil_transports::Error::Closed { reason: CloseReason::IdleTimeout, by_peer: false }
                    ),
                    "{outcome}"
                );
                break;
            }
            _ => {}
        }
    }
    assert_eq!(device.stats().route_back_timeouts, 1);
    within(device.connect(cloud.public_key())).await.unwrap();
    let mut next = 0;
    expect_on_3(&cloud, 1, &mut next).await;
    let waited = back.elapsed();
    assert!(waited < Duration::from_secs(5), "waited {waited:?} (the idle timeout is 60 s)");
    eventually("message 0 acknowledged by the new cloud", || device.stats().acknowledged == 1).await;
    device.close();
    cloud.close();
}

/// spec §17.4 rule 6, the other way: after an outage the cloud kept its session, so it
/// acknowledges what the device sends again when the route comes back, and the session stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_back_to_a_cloud_that_kept_its_session_keeps_the_session() {
    init_tracing();
    let mut opts = options(true);
    opts.route_back_timeout = Duration::from_millis(300);
    let p = pair(opts).await;
    let Pair { peers, cloud, device, cloud_node, .. } = &p;
    let mut next = 0u64;
    p.first_message_acknowledged(&mut next).await;
    // The relay's uplink "goes down": it says so and drops what the device sends.
    let route = {
        let s = peers.lock().await;
        let d = &s[&node_of(keypair(DEVICE).public())];
        let route = d.table.route_of(cloud_node).unwrap();
        d.link.send_routing(RoutingMessage::Unreachable { route, reason: RouteReason::UplinkDown }).await.unwrap();
        route
    };
    eventually("the notice read", || device.stats().unreachable == 1).await;
    p.spool.lock().await.drop_to = Some(*cloud_node);
    within(device.send(cloud_node, 3, payload(3, 1))).await.unwrap();
    // Back: the same route announced again; the message goes again and is acknowledged.
    p.spool.lock().await.drop_to = None;
    {
        let s = peers.lock().await;
        let d = &s[&node_of(keypair(DEVICE).public())];
        d.link.send_routing(RoutingMessage::Route { route, node: *cloud_node }).await.unwrap();
    }
    expect_on_3(cloud, 2, &mut next).await;
    eventually("message 1 acknowledged", || device.stats().acknowledged == 2).await;
    assert_eq!(device.stats().routes_back, 1);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let stats = device.stats();
    assert_eq!((stats.route_back_timeouts, stats.sessions), (0, 1));
    device.close();
    cloud.close();
}
