//! Routing and end-to-end sessions (spec §16) through an in-memory network: devices, a gateway
//! (relay) and a cloud service, each a set of sans-IO connections on a virtual clock. The
//! gateway's relay logic is written here from the spec's procedure (§16.4) on top of the
//! crate's routing tables; a seeded "chaos" hook at the gateway drops, duplicates and reorders
//! the envelopes it passes on. The end-to-end sessions run in routed mode (§16.2) for every
//! pattern and suite; the overhead figures of §12.6 are measured on real packets.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use veil_protocol::error::HandshakeError;
use veil_protocol::message::Message;
use veil_protocol::routing::{
    check_route_peer, DemuxLimits, E2eDemux, PeerRoutes, RouteReason, RouteTable, RoutedEvent, RoutingMessage, Slot,
    MAX_ROUTES, UNREACHABLE_INTERVAL,
};
use veil_protocol::trust::NodeId;
use veil_protocol::{
    wire, CloseReason, Config, Connection, ConnectionError, Decision, DecodeError, Duration, Event, Mode, Pattern, Psk,
    PublicKey, Role, StaticKeypair, Suite, Timestamp,
};

const PSK: [u8; 32] = [0x42; 32];
const GATEWAY_SEED: u8 = 2;
const CLOUD_SEED: u8 = 3;
const T0: Timestamp = Timestamp::from_millis(1_000);
/// The routed sessions' packet limit: a stream link's plaintext minus the largest envelope
/// would do; a smaller one exercises the rule of spec §16.2.
const E2E_MAX_PACKET: usize = 4_096;

fn keypair(seed: u8) -> StaticKeypair {
    StaticKeypair::from_secret_bytes([seed; 32])
}

fn node_of(key: &PublicKey) -> NodeId {
    NodeId::from_public_key(key)
}

fn device_seed(i: usize) -> u8 {
    10 + u8::try_from(i).unwrap()
}

type LinkId = usize;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Owner {
    Device(usize),
    Gateway(usize),
    Cloud,
}

struct End {
    conn: Connection,
    owner: Owner,
    inbox: VecDeque<Vec<u8>>,
}

/// Decides whether a link packet (sending end, bytes) is delivered.
type LinkFilter = Box<dyn FnMut(usize, &[u8]) -> bool>;

struct Link {
    /// `ends[0]` initiated the link.
    ends: [End; 2],
    /// Drops a link packet (datagram-link tests) when it returns `false`: (from end, bytes).
    filter: Option<LinkFilter>,
}

/// One link packet put on the wire.
#[derive(Clone, Debug)]
struct Hop {
    link: LinkId,
    from: Owner,
    packet: Vec<u8>,
}

/// What the gateway's chaos hook does to the envelopes it passes on.
#[derive(Clone, Copy, Default)]
struct Chaos {
    drop: f64,
    duplicate: f64,
    reorder: f64,
}

struct Gateway {
    uplink: Option<LinkId>,
    cloud: NodeId,
    /// spec §16.3: the handles the gateway announced, per link.
    announced: BTreeMap<LinkId, RouteTable>,
    /// Attached devices and the link each is on.
    attached: BTreeMap<NodeId, LinkId>,
    allowed: Vec<PublicKey>,
    /// Unreachable notices sent: (link, handle, reason).
    notices: Vec<(LinkId, u32, RouteReason)>,
    /// Every routed packet the gateway passed on (for the plaintext scan).
    relayed: Vec<Vec<u8>>,
    /// Envelopes held back by the chaos hook (reordering).
    held: VecDeque<(LinkId, RoutingMessage)>,
    chaos: Chaos,
    dropped: usize,
    duplicated: usize,
    reordered: usize,
    /// A malicious relay: label every envelope from device link `.0` with device `.1`'s handle.
    relabel: Option<(LinkId, NodeId)>,
}

struct Device {
    id: NodeId,
    cloud_key: PublicKey,
    cloud: NodeId,
    link: Option<LinkId>,
    routes: PeerRoutes,
    e2e: Option<Connection>,
    e2e_config: Arc<Config>,
    received: Vec<(u16, u64, Vec<u8>)>,
    unreachable: Vec<(u32, RouteReason)>,
    e2e_closed: Vec<CloseReason>,
    connected: usize,
}

struct Cloud {
    id: NodeId,
    e2e_config: Arc<Config>,
    /// spec §16.3: the handles each gateway announced on its uplink.
    routes: BTreeMap<LinkId, PeerRoutes>,
    /// spec §16.6: the most recent route to each node.
    best: BTreeMap<NodeId, (LinkId, u32)>,
    /// spec §16.6: the end-to-end connections per peer node.
    e2e: E2eDemux,
    /// Provisioned device keys (KK needs the initiator's key in advance).
    device_keys: BTreeMap<NodeId, PublicKey>,
    received: Vec<(NodeId, u16, u64, Vec<u8>)>,
    connected: Vec<NodeId>,
    denied: Vec<NodeId>,
    /// Envelopes the cloud dropped for an unknown handle.
    unknown_routes: usize,
}

struct Net {
    now: Timestamp,
    rng: ChaCha20Rng,
    pattern: Pattern,
    links: Vec<Link>,
    gateways: Vec<Gateway>,
    devices: Vec<Device>,
    cloud: Cloud,
    log: Vec<Hop>,
    buf: Vec<u8>,
}

fn e2e_config(seed: u8, pattern: Pattern, suite: Suite) -> Config {
    let mut c = Config::new(keypair(seed), Mode::Routed);
    c.pattern = pattern;
    c.suite = suite;
    c.psk = matches!(pattern, Pattern::IKpsk2 | Pattern::XXpsk3).then(|| Psk::new(PSK));
    c.limits.max_packet_len = E2E_MAX_PACKET;
    c
}

impl Net {
    /// `devices` devices, one gateway, the cloud; end-to-end sessions use `pattern`/`suite`.
    fn new(devices: usize, pattern: Pattern, suite: Suite) -> Self {
        let cloud_key = *keypair(CLOUD_SEED).public();
        let mut device_keys = BTreeMap::new();
        let devs = (0..devices)
            .map(|i| {
                let key = *keypair(device_seed(i)).public();
                device_keys.insert(node_of(&key), key);
                Device {
                    id: node_of(&key),
                    cloud_key,
                    cloud: node_of(&cloud_key),
                    link: None,
                    routes: PeerRoutes::new(16),
                    e2e: None,
                    e2e_config: Arc::new(e2e_config(device_seed(i), pattern, suite)),
                    received: Vec::new(),
                    unreachable: Vec::new(),
                    e2e_closed: Vec::new(),
                    connected: 0,
                }
            })
            .collect();
        Self {
            now: T0,
            rng: ChaCha20Rng::seed_from_u64(7),
            pattern,
            links: Vec::new(),
            gateways: Vec::new(),
            devices: devs,
            cloud: Cloud {
                id: node_of(&cloud_key),
                e2e_config: Arc::new(e2e_config(CLOUD_SEED, pattern, suite)),
                routes: BTreeMap::new(),
                best: BTreeMap::new(),
                e2e: E2eDemux::new(DemuxLimits::default()),
                device_keys,
                received: Vec::new(),
                connected: Vec::new(),
                denied: Vec::new(),
                unknown_routes: 0,
            },
            log: Vec::new(),
            buf: vec![0u8; 65_535],
        }
    }

    fn add_gateway(&mut self, seed: u8) -> usize {
        // The gateway's static key is `keypair(seed)`; `attach` and `uplink` derive it from its number.
        assert_eq!(seed, GATEWAY_SEED + u8::try_from(self.gateways.len()).unwrap() * 40);
        let allowed = (0..self.devices.len()).map(|i| *keypair(device_seed(i)).public()).collect();
        self.gateways.push(Gateway {
            uplink: None,
            cloud: self.cloud.id,
            announced: BTreeMap::new(),
            attached: BTreeMap::new(),
            allowed,
            notices: Vec::new(),
            relayed: Vec::new(),
            held: VecDeque::new(),
            chaos: Chaos::default(),
            dropped: 0,
            duplicated: 0,
            reordered: 0,
            relabel: None,
        });
        self.gateways.len() - 1
    }

    /// Opens a link (IK): `a` initiates towards `b`, whose static key is `b_key`.
    fn open_link(&mut self, a: Owner, a_seed: u8, b: Owner, b_seed: u8, mode: Mode) -> LinkId {
        let ca = Arc::new(Config::new(keypair(a_seed), mode));
        let cb = Arc::new(Config::new(keypair(b_seed), mode));
        let b_key = *keypair(b_seed).public();
        let ia = Connection::new(ca, Role::Initiator, Some(b_key), self.now, &mut self.rng).unwrap();
        let ib = Connection::new(cb, Role::Responder, None, self.now, &mut self.rng).unwrap();
        self.links.push(Link {
            ends: [
                End { conn: ia, owner: a, inbox: VecDeque::new() },
                End { conn: ib, owner: b, inbox: VecDeque::new() },
            ],
            filter: None,
        });
        let id = self.links.len() - 1;
        match a {
            Owner::Device(d) => self.devices[d].link = Some(id),
            Owner::Gateway(g) if b == Owner::Cloud => {
                self.gateways[g].uplink = Some(id);
                self.cloud.routes.insert(id, PeerRoutes::new(MAX_ROUTES));
            }
            _ => {}
        }
        id
    }

    /// Device `d` connects to gateway `g` over `mode`.
    fn attach(&mut self, d: usize, g: usize, mode: Mode) -> LinkId {
        self.open_link(
            Owner::Device(d),
            device_seed(d),
            Owner::Gateway(g),
            GATEWAY_SEED + u8::try_from(g).unwrap() * 40,
            mode,
        )
    }

    /// Gateway `g` connects its uplink to the cloud (TCP: stream mode).
    fn uplink(&mut self, g: usize) -> LinkId {
        self.open_link(
            Owner::Gateway(g),
            GATEWAY_SEED + u8::try_from(g).unwrap() * 40,
            Owner::Cloud,
            CLOUD_SEED,
            Mode::Stream,
        )
    }

    /// Device `d` connects straight to the cloud (spec §16.1: no routing layer).
    fn direct(&mut self, d: usize) -> LinkId {
        self.open_link(Owner::Device(d), device_seed(d), Owner::Cloud, CLOUD_SEED, Mode::Stream)
    }

    fn end_of(&self, link: LinkId, owner: Owner) -> usize {
        usize::from(self.links[link].ends[1].owner == owner)
    }

    fn send_on(&mut self, link: LinkId, owner: Owner, m: RoutingMessage) -> Result<(), ConnectionError> {
        let e = self.end_of(link, owner);
        self.links[link].ends[e].conn.send_routing(m)
    }

    /// The node id of the authenticated peer of `owner` on `link`.
    fn peer_node(&self, link: LinkId, owner: Owner) -> Option<NodeId> {
        let e = self.end_of(link, owner);
        self.links[link].ends[e].conn.remote_static().map(node_of)
    }

    // -----------------------------------------------------------------------------------
    // Moving packets

    /// Moves everything until nothing moves (bounded).
    fn pump(&mut self) {
        for _ in 0..500 {
            let mut moved = self.e2e_transmit();
            moved |= self.release_held();
            for l in 0..self.links.len() {
                for e in 0..2 {
                    while let Some(n) = self.links[l].ends[e].conn.poll_transmit(self.now, &mut self.buf).unwrap() {
                        moved = true;
                        let p = self.buf[..n].to_vec();
                        let keep = match self.links[l].filter.as_mut() {
                            Some(f) => f(e, &p),
                            None => true,
                        };
                        self.log.push(Hop { link: l, from: self.links[l].ends[e].owner, packet: p.clone() });
                        if keep {
                            self.links[l].ends[1 - e].inbox.push_back(p);
                        }
                    }
                }
            }
            for l in 0..self.links.len() {
                for e in 0..2 {
                    while let Some(p) = self.links[l].ends[e].inbox.pop_front() {
                        moved = true;
                        let now = self.now;
                        let _ = self.links[l].ends[e].conn.handle_input_owned(now, BytesMut::from(&p[..]));
                        self.link_events(l, e);
                    }
                }
            }
            moved |= self.route_repeats();
            if !moved {
                return;
            }
        }
        panic!("the network did not settle");
    }

    /// Advances the clock to `now + d`, firing every timer on the way.
    fn advance(&mut self, d: Duration) {
        let end = self.now + d;
        for _ in 0..100_000 {
            self.pump();
            let next = self.next_deadline();
            let t = match next {
                Some(t) if t <= end => t.max(self.now),
                _ => end,
            };
            self.now = t;
            self.fire_timers();
            self.pump();
            if t >= end {
                return;
            }
        }
        panic!("timers did not settle");
    }

    fn next_deadline(&self) -> Option<Timestamp> {
        let links = self.links.iter().flat_map(|l| l.ends.iter().filter_map(|e| e.conn.poll_timeout()));
        let devices = self.devices.iter().filter_map(|d| d.e2e.as_ref().and_then(Connection::poll_timeout));
        let tables = self.gateways.iter().flat_map(|g| g.announced.values().filter_map(RouteTable::next_timeout));
        links.chain(devices).chain(self.cloud.e2e.poll_timeout()).chain(tables).min()
    }

    fn fire_timers(&mut self) {
        let now = self.now;
        for l in 0..self.links.len() {
            for e in 0..2 {
                self.links[l].ends[e].conn.handle_timeout(now);
                self.link_events(l, e);
            }
        }
        for d in 0..self.devices.len() {
            if let Some(c) = self.devices[d].e2e.as_mut() {
                c.handle_timeout(now);
            }
            self.device_e2e_events(d);
        }
        self.cloud.e2e.handle_timeout(now);
        let nodes: Vec<NodeId> = self.cloud.e2e.nodes().collect();
        for n in nodes {
            self.cloud_e2e_events(n);
        }
    }

    /// spec §16.3: repeats of unused announcements on datagram links.
    fn route_repeats(&mut self) -> bool {
        let mut moved = false;
        for g in 0..self.gateways.len() {
            let links: Vec<LinkId> = self.gateways[g].announced.keys().copied().collect();
            for l in links {
                while let Some((route, node)) =
                    self.gateways[g].announced.get_mut(&l).and_then(|t| t.poll_repeat(self.now))
                {
                    let _ = self.send_on(l, Owner::Gateway(g), RoutingMessage::Route { route, node });
                    moved = true;
                }
            }
        }
        moved
    }

    // -----------------------------------------------------------------------------------
    // Link events

    fn link_events(&mut self, l: LinkId, e: usize) {
        while let Some(ev) = self.links[l].ends[e].conn.poll_event() {
            let owner = self.links[l].ends[e].owner;
            match ev {
                Event::AuthorizationRequired { remote_static, .. } => {
                    let ok = match owner {
                        Owner::Gateway(g) => self.gateways[g].allowed.contains(&remote_static),
                        _ => true,
                    };
                    let d = if ok { Decision::allow() } else { Decision::deny() };
                    let _ = self.links[l].ends[e].conn.authorize(self.now, d);
                }
                Event::Connected { .. } => self.on_link_connected(l, owner),
                Event::Routing(m) => self.on_routing(l, owner, m),
                // Direct device ↔ cloud (spec §16.1): messages arrive in the link session.
                Event::Message { channel, id, payload } if owner == Owner::Cloud => {
                    let from = self.peer_node(l, owner).unwrap();
                    self.cloud.received.push((from, channel, id, payload.to_vec()));
                }
                Event::Closed(_) => self.on_link_closed(l, owner),
                _ => {}
            }
        }
    }

    fn on_link_connected(&mut self, l: LinkId, owner: Owner) {
        let Owner::Gateway(g) = owner else { return };
        let now = self.now;
        if self.gateways[g].uplink == Some(l) {
            // spec §16.3: announce every attached device on the new uplink.
            let lossy = false;
            self.gateways[g].announced.insert(l, RouteTable::new(MAX_ROUTES, lossy));
            let attached: Vec<NodeId> = self.gateways[g].attached.keys().copied().collect();
            for n in attached {
                self.announce(g, l, n);
            }
            // The cloud is reachable again: tell the devices (spec §16.5 is for the down case).
            let _ = now;
        } else {
            let device = self.peer_node(l, owner).unwrap();
            let mode = self.links[l].ends[self.end_of(l, owner)].conn.session().map_or(Mode::Stream, |s| s.mode());
            self.gateways[g].announced.insert(l, RouteTable::new(16, mode.is_lossy()));
            self.gateways[g].attached.insert(device, l);
            let cloud = self.gateways[g].cloud;
            self.announce(g, l, cloud);
            if let Some(up) = self.gateways[g].uplink.filter(|u| self.links[*u].ends[0].conn.is_connected()) {
                self.announce(g, up, device);
            }
        }
    }

    fn announce(&mut self, g: usize, l: LinkId, node: NodeId) {
        let now = self.now;
        let a = self.gateways[g].announced.get_mut(&l).unwrap().announce(node, now).unwrap();
        if a.new {
            self.send_on(l, Owner::Gateway(g), RoutingMessage::Route { route: a.route, node }).unwrap();
        }
    }

    fn on_link_closed(&mut self, l: LinkId, owner: Owner) {
        match owner {
            Owner::Gateway(g) => {
                if self.gateways[g].uplink == Some(l) {
                    self.gateways[g].announced.remove(&l);
                    // spec §16.5: tell every attached device that its cloud is unreachable now.
                    let devices: Vec<(NodeId, LinkId)> =
                        self.gateways[g].attached.iter().map(|(n, l)| (*n, *l)).collect();
                    let cloud = self.gateways[g].cloud;
                    for (_, dl) in devices {
                        let route = self.gateways[g].announced.get(&dl).and_then(|t| t.route_of(&cloud));
                        if let Some(route) = route {
                            self.notice(g, dl, route, RouteReason::UplinkDown);
                        }
                    }
                } else if let Some(device) = self.gateways[g].attached.iter().find(|(_, dl)| **dl == l).map(|(n, _)| *n)
                {
                    self.gateways[g].attached.remove(&device);
                    self.gateways[g].announced.remove(&l);
                    if let Some(up) = self.gateways[g].uplink {
                        let now = self.now;
                        if let Some(route) =
                            self.gateways[g].announced.get_mut(&up).and_then(|t| t.withdraw(&device, now))
                        {
                            let _ = self.send_on(
                                up,
                                Owner::Gateway(g),
                                RoutingMessage::Withdraw { route, reason: RouteReason::Detached },
                            );
                        }
                    }
                }
            }
            Owner::Cloud => {
                // The link that announced these routes is gone (spec §16.6).
                if let Some(t) = self.cloud.routes.get_mut(&l) {
                    t.clear();
                }
                self.cloud.best.retain(|_, (bl, _)| *bl != l);
            }
            Owner::Device(_) => {}
        }
    }

    fn notice(&mut self, g: usize, l: LinkId, route: u32, reason: RouteReason) {
        let now = self.now;
        let allowed = self.gateways[g].announced.get_mut(&l).is_none_or(|t| t.allow_notice(route, now));
        if allowed && self.send_on(l, Owner::Gateway(g), RoutingMessage::Unreachable { route, reason }).is_ok() {
            self.gateways[g].notices.push((l, route, reason));
        }
    }

    fn on_routing(&mut self, l: LinkId, owner: Owner, m: RoutingMessage) {
        match owner {
            // spec §16.7: endpoints send no announcements or deliveries to a relay.
            Owner::Gateway(g) => {
                if let RoutingMessage::Forward { route, packet } = m {
                    self.relay_forward(g, l, route, packet);
                }
            }
            Owner::Device(d) => match m {
                RoutingMessage::Route { route, node } => {
                    self.devices[d].routes.learn(route, node).unwrap();
                    self.maybe_start_e2e(d);
                }
                RoutingMessage::Withdraw { route, .. } => {
                    self.devices[d].routes.forget(route);
                }
                RoutingMessage::Unreachable { route, reason } => self.devices[d].unreachable.push((route, reason)),
                RoutingMessage::Deliver { route, packet } => {
                    let dev = &mut self.devices[d];
                    // spec §16.4, §16.6: the packet comes from the node of the route.
                    if dev.routes.resolve(route) == Ok(dev.cloud) {
                        if let Some(c) = dev.e2e.as_mut() {
                            let _ = c.handle_input_owned(self.now, BytesMut::from(&packet[..]));
                        }
                        self.device_e2e_events(d);
                    }
                }
                _ => {}
            },
            Owner::Cloud => match m {
                RoutingMessage::Route { route, node } => {
                    if let Some(t) = self.cloud.routes.get_mut(&l) {
                        t.learn(route, node).unwrap();
                        // spec §16.6: the most recent announcement wins.
                        self.cloud.best.insert(node, (l, route));
                    }
                }
                RoutingMessage::Withdraw { route, .. } => {
                    if let Some(node) = self.cloud.routes.get_mut(&l).and_then(|t| t.forget(route)) {
                        if self.cloud.best.get(&node) == Some(&(l, route)) {
                            self.cloud.best.remove(&node);
                        }
                    }
                }
                RoutingMessage::Deliver { route, packet } => {
                    match self.cloud.routes.get(&l).map(|t| t.resolve(route)) {
                        Some(Ok(node)) => self.cloud_input(node, packet),
                        _ => self.cloud.unknown_routes += 1,
                    }
                }
                _ => {}
            },
        }
    }

    /// spec §16.4: the relay's procedure for a `Forward` arriving on link `l`.
    fn relay_forward(&mut self, g: usize, l: LinkId, route: u32, packet: Bytes) {
        let now = self.now;
        let Some(dst) = self.gateways[g].announced.get_mut(&l).map(|t| t.on_forward(route)) else { return };
        let Ok(dst) = dst else {
            return self.notice(g, l, route, RouteReason::UnknownRoute);
        };
        // The source is the link's authenticated peer, never the envelope's word.
        let mut src = self.peer_node(l, Owner::Gateway(g)).unwrap();
        if let Some((from, fake)) = self.gateways[g].relabel {
            if from == l {
                src = fake;
            }
        }
        let gw = &self.gateways[g];
        let out = if dst == gw.cloud {
            match gw.uplink.filter(|u| self.links[*u].ends[0].conn.is_connected()) {
                Some(u) => u,
                None => return self.notice(g, l, route, RouteReason::UplinkDown),
            }
        } else if gw.uplink == Some(l) {
            match gw.attached.get(&dst).copied() {
                Some(dl) => dl,
                None => return self.notice(g, l, route, RouteReason::Detached),
            }
        } else {
            // Policy (spec §16.4 step 2): devices reach the cloud only.
            return self.notice(g, l, route, RouteReason::NotAllowed);
        };
        let Some(table) = self.gateways[g].announced.get_mut(&out) else {
            return self.notice(g, l, route, RouteReason::Detached);
        };
        let Ok(a) = table.announce(src, now) else {
            return self.notice(g, l, route, RouteReason::Congested);
        };
        if a.new || table.needs_announcement(a.route) {
            let _ = self.send_on(out, Owner::Gateway(g), RoutingMessage::Route { route: a.route, node: src });
        }
        self.gateways[g].relayed.push(packet.to_vec());
        let msg = RoutingMessage::Deliver { route: a.route, packet };
        let chaos = self.gateways[g].chaos;
        if self.rng.gen_bool(chaos.drop) {
            self.gateways[g].dropped += 1;
            return;
        }
        if self.rng.gen_bool(chaos.reorder) {
            self.gateways[g].reordered += 1;
            self.gateways[g].held.push_back((out, msg));
            return;
        }
        if self.rng.gen_bool(chaos.duplicate) {
            self.gateways[g].duplicated += 1;
            let _ = self.send_on(out, Owner::Gateway(g), msg.clone());
        }
        match self.send_on(out, Owner::Gateway(g), msg) {
            Ok(()) => {}
            Err(ConnectionError::MessageTooLarge) => self.notice(g, l, route, RouteReason::TooLarge),
            Err(_) => self.notice(g, l, route, RouteReason::Congested),
        }
    }

    /// Lets held (reordered) envelopes go, some of them, in random order.
    fn release_held(&mut self) -> bool {
        let mut moved = false;
        for g in 0..self.gateways.len() {
            let mut keep = VecDeque::new();
            while let Some((out, msg)) = self.gateways[g].held.pop_front() {
                if self.rng.gen_bool(0.5) {
                    keep.push_back((out, msg));
                } else {
                    let _ = self.send_on(out, Owner::Gateway(g), msg);
                    moved = true;
                }
            }
            self.gateways[g].held = keep;
        }
        moved
    }

    // -----------------------------------------------------------------------------------
    // End-to-end sessions

    fn maybe_start_e2e(&mut self, d: usize) {
        let dev = &self.devices[d];
        if dev.e2e.is_some() || dev.routes.route_of(&dev.cloud).is_none() {
            return;
        }
        // spec §16.6: with IK/KK/IKpsk2 the responder's key is known, and its node id is the route's.
        let remote = self.pattern.initiator_knows_responder().then_some(dev.cloud_key);
        let c = Connection::new(Arc::clone(&dev.e2e_config), Role::Initiator, remote, self.now, &mut self.rng).unwrap();
        self.devices[d].e2e = Some(c);
    }

    /// Restarts device `d`'s end-to-end state (it lost it): a new initiator, same keys.
    fn restart_e2e(&mut self, d: usize) {
        self.devices[d].e2e = None;
        self.maybe_start_e2e(d);
    }

    fn device_e2e_events(&mut self, d: usize) {
        let now = self.now;
        let dev = &mut self.devices[d];
        let Some(c) = dev.e2e.as_mut() else { return };
        while let Some(ev) = c.poll_event() {
            match ev {
                Event::AuthorizationRequired { remote_static, .. } => {
                    // spec §16.6: the end-to-end peer must be the node the route names.
                    let ok = check_route_peer(&remote_static, &dev.cloud).is_ok();
                    let _ = c.authorize(now, if ok { Decision::allow() } else { Decision::deny() });
                }
                Event::Connected { .. } => dev.connected += 1,
                Event::Message { channel, id, payload } => dev.received.push((channel, id, payload.to_vec())),
                Event::Closed(cl) => dev.e2e_closed.push(cl.reason),
                _ => {}
            }
        }
        if c.is_closed() {
            dev.e2e = None;
        }
    }

    /// spec §16.6: hands a routed packet from `node` to its end-to-end connections.
    fn cloud_input(&mut self, node: NodeId, packet: Bytes) {
        let now = self.now;
        let cfg = Arc::clone(&self.cloud.e2e_config);
        // KK: the responder needs the initiator's key in advance.
        let remote =
            if self.pattern.responder_knows_initiator() { self.cloud.device_keys.get(&node).copied() } else { None };
        let rng = &mut self.rng;
        let new_responder = || Connection::new(cfg, Role::Responder, remote, now, rng);
        let _ = self.cloud.e2e.handle_input(now, node, BytesMut::from(&packet[..]), new_responder);
        self.cloud_e2e_events(node);
    }

    fn cloud_e2e_events(&mut self, node: NodeId) {
        let now = self.now;
        let cloud = &mut self.cloud;
        for _ in 0..10_000 {
            let Some(ev) = cloud.e2e.poll_event(now, &node) else { return };
            match ev {
                // spec §16.6: the demultiplexer denied a key that is not the route's node.
                RoutedEvent::NodeMismatch { .. } => cloud.denied.push(node),
                RoutedEvent::Event { slot, event } => match event {
                    Event::AuthorizationRequired { remote_static, .. } => {
                        // The node-id check already passed; this is the cloud's own policy.
                        assert!(check_route_peer(&remote_static, &node).is_ok());
                        cloud.e2e.authorize(now, &node, slot, Decision::allow()).unwrap();
                    }
                    Event::Connected { .. } => cloud.connected.push(node),
                    Event::Message { channel, id, payload } => {
                        cloud.received.push((node, channel, id, payload.to_vec()));
                    }
                    _ => {}
                },
                _ => {}
            }
        }
        panic!("endless events");
    }

    /// Wraps every pending end-to-end packet into a `Forward` on its route.
    fn e2e_transmit(&mut self) -> bool {
        let mut moved = false;
        let now = self.now;
        for d in 0..self.devices.len() {
            loop {
                let dev = &mut self.devices[d];
                let Some(c) = dev.e2e.as_mut() else { break };
                let Some(n) = c.poll_transmit(now, &mut self.buf).unwrap() else { break };
                moved = true;
                let packet = Bytes::copy_from_slice(&self.buf[..n]);
                if let (Some(l), Some(route)) = (dev.link, dev.routes.route_of(&dev.cloud)) {
                    let _ = self.send_on(l, Owner::Device(d), RoutingMessage::Forward { route, packet });
                }
            }
        }
        let nodes: Vec<NodeId> = self.cloud.e2e.nodes().collect();
        for node in nodes {
            while let Some(n) = self.cloud.e2e.poll_transmit(now, &node, &mut self.buf).unwrap() {
                let packet = Bytes::copy_from_slice(&self.buf[..n]);
                moved = true;
                if let Some(&(l, route)) = self.cloud.best.get(&node) {
                    let _ = self.send_on(l, Owner::Cloud, RoutingMessage::Forward { route, packet });
                }
            }
        }
        moved
    }

    fn device_send(&mut self, d: usize, payload: &[u8]) -> bool {
        self.devices[d].e2e.as_mut().is_some_and(|c| c.send(1, Bytes::copy_from_slice(payload)).is_ok())
    }

    fn cloud_send(&mut self, node: NodeId, payload: &[u8]) -> bool {
        let c = self.cloud.e2e.connection_mut(&node, Slot::Current);
        c.is_some_and(|c| c.send(2, Bytes::copy_from_slice(payload)).is_ok())
    }

    fn e2e_connected(&self, d: usize) -> bool {
        let node = self.devices[d].id;
        self.devices[d].e2e.as_ref().is_some_and(Connection::is_connected)
            && self.cloud.e2e.connection(&node, Slot::Current).is_some_and(Connection::is_connected)
    }

    /// Runs the clock in steps until device `d`'s end-to-end session is up both ways.
    fn until_connected(&mut self, d: usize, limit: Duration) -> bool {
        let end = self.now + limit;
        while self.now < end {
            if self.e2e_connected(d) {
                return true;
            }
            self.advance(Duration::from_millis(250));
        }
        self.e2e_connected(d)
    }
}

/// One gateway, its uplink and `n` devices attached over `mode`, everything connected.
fn network(n: usize, pattern: Pattern, suite: Suite, mode: Mode) -> Net {
    let mut net = Net::new(n, pattern, suite);
    let g = net.add_gateway(GATEWAY_SEED);
    net.uplink(g);
    net.advance(Duration::from_millis(10));
    for d in 0..n {
        net.attach(d, g, mode);
    }
    net.advance(Duration::from_millis(10));
    net
}

fn payload_of(prefix: &str, i: usize) -> Vec<u8> {
    format!("{prefix}-{i:04}").into_bytes()
}

// ---------------------------------------------------------------------------------------
// Tests

#[test]
fn every_pattern_and_suite_runs_end_to_end_through_a_relay_that_drops_reorders_and_duplicates() {
    for pattern in Pattern::ALL {
        for suite in Suite::ALL {
            let name = format!("{pattern} {suite}");
            let mut net = network(2, pattern, suite, Mode::Stream);
            net.gateways[0].chaos = Chaos { drop: 0.2, duplicate: 0.2, reorder: 0.2 };
            for d in 0..2 {
                assert!(net.until_connected(d, Duration::from_secs(20)), "{name}: device {d} never connected");
            }
            // Traffic under chaos: every delivered message was sent, and none twice.
            let mut sent_up = Vec::new();
            let mut sent_down = Vec::new();
            for i in 0..40 {
                for d in 0..2 {
                    let up = payload_of(&format!("up{d}"), i);
                    if net.device_send(d, &up) {
                        sent_up.push((net.devices[d].id, up));
                    }
                    let down = payload_of(&format!("down{d}"), i);
                    let node = net.devices[d].id;
                    if net.cloud_send(node, &down) {
                        sent_down.push((d, down));
                    }
                }
                net.advance(Duration::from_millis(100));
            }
            let g = &net.gateways[0];
            assert!(g.dropped > 0 && g.duplicated > 0 && g.reordered > 0, "{name}: the chaos did nothing");
            let got_up: Vec<(NodeId, Vec<u8>)> =
                net.cloud.received.iter().map(|(n, _, _, p)| (*n, p.clone())).collect();
            for m in &got_up {
                assert!(sent_up.contains(m), "{name}: the cloud got a message nobody sent: {m:?}");
                assert_eq!(got_up.iter().filter(|x| *x == m).count(), 1, "{name}: delivered twice: {m:?}");
            }
            for d in 0..2 {
                let got: Vec<&Vec<u8>> = net.devices[d].received.iter().map(|(_, _, p)| p).collect();
                for p in &got {
                    assert!(sent_down.contains(&(d, (*p).clone())), "{name}: device {d} got an unsent message");
                    assert_eq!(got.iter().filter(|x| **x == *p).count(), 1, "{name}: device {d}: delivered twice");
                }
            }
            assert!(got_up.len() < sent_up.len(), "{name}: nothing was lost under 20 % drops?");
            assert!(got_up.len() > sent_up.len() / 3, "{name}: too little arrived: {}/{}", got_up.len(), sent_up.len());
            // The chaos stops: everything sent from now on arrives, exactly once, in both directions.
            net.gateways[0].chaos = Chaos::default();
            net.advance(Duration::from_secs(1));
            let before_up = net.cloud.received.len();
            let before_down: Vec<usize> = (0..2).map(|d| net.devices[d].received.len()).collect();
            for d in 0..2 {
                assert!(net.device_send(d, b"final up"), "{name}");
                let node = net.devices[d].id;
                assert!(net.cloud_send(node, b"final down"), "{name}");
            }
            net.advance(Duration::from_millis(100));
            let ups: Vec<_> = net.cloud.received[before_up..].iter().map(|(n, _, _, p)| (*n, p.clone())).collect();
            for (d, before) in before_down.iter().enumerate() {
                assert!(ups.contains(&(net.devices[d].id, b"final up".to_vec())), "{name}: device {d}'s last message");
                let downs = &net.devices[d].received[*before..];
                assert_eq!(downs.len(), 1, "{name}: device {d}");
                assert_eq!(downs[0].2, b"final down", "{name}: device {d}");
            }
            assert_eq!(ups.len(), 2, "{name}");
            assert!(net.cloud.denied.is_empty(), "{name}: a genuine device was denied");
        }
    }
}

#[test]
fn relayed_32_byte_message_costs_46_bytes_per_tcp_hop_and_23_direct() {
    // spec §12.6: measured on the real packets of each hop.
    let mut net = network(1, Pattern::IK, Suite::ChaChaPolyBlake2s, Mode::Stream);
    assert!(net.until_connected(0, Duration::from_secs(5)));
    net.pump();
    let start = net.log.len();
    let payload = [0x5a; 32];
    assert!(net.device_send(0, &payload));
    net.pump();
    let hops: Vec<Hop> = net.log[start..].to_vec();
    assert_eq!(hops.len(), 2, "one packet per hop: {hops:?}");
    let (dev_link, uplink) = (net.devices[0].link.unwrap(), net.gateways[0].uplink.unwrap());
    assert_eq!((hops[0].link, hops[0].from), (dev_link, Owner::Device(0)));
    assert_eq!((hops[1].link, hops[1].from), (uplink, Owner::Gateway(0)));
    for h in &hops {
        let framed = h.packet.len() + 2;
        println!("hop {:?} -> link {}: {} B on the wire, {} B overhead", h.from, h.link, framed, framed - 32);
        assert_eq!(framed, 78, "{h:?}");
        assert_eq!(framed - payload.len(), 46);
    }
    assert!(net.cloud.received.iter().any(|(_, _, _, p)| p[..] == payload));
    // The relay passed the end-to-end packet on byte for byte: 4-B header + 36 + 16-B tag.
    assert_eq!(net.gateways[0].relayed.last().map(Vec::len), Some(56));

    // A UDP device link (datagram mode): 24 B per link packet instead of 19.
    let mut net = network(1, Pattern::IK, Suite::ChaChaPolyBlake2s, Mode::Datagram);
    assert!(net.until_connected(0, Duration::from_secs(5)));
    net.pump();
    let start = net.log.len();
    assert!(net.device_send(0, &payload));
    net.pump();
    let sizes: Vec<usize> = net.log[start..].iter().map(|h| h.packet.len()).collect();
    println!("UDP device link: {} B (overhead {}), TCP uplink: {} B framed", sizes[0], sizes[0] - 32, sizes[1] + 2);
    assert_eq!(sizes, [83, 76]);

    // Direct device → cloud (spec §16.1): no envelope, no end-to-end session.
    let mut net = Net::new(1, Pattern::IK, Suite::ChaChaPolyBlake2s);
    let l = net.direct(0);
    net.advance(Duration::from_millis(10));
    net.pump();
    let start = net.log.len();
    let e = net.end_of(l, Owner::Device(0));
    net.links[l].ends[e].conn.send(1, Bytes::copy_from_slice(&payload)).unwrap();
    net.pump();
    let hops = &net.log[start..];
    assert_eq!(hops.len(), 1);
    println!("direct: {} B on the wire, {} B overhead", hops[0].packet.len() + 2, hops[0].packet.len() + 2 - 32);
    assert_eq!(hops[0].packet.len() + 2, 55);
    assert_eq!(net.cloud.received, [(net.devices[0].id, 1, 0, payload.to_vec())]);
}

#[test]
fn the_gateway_never_sees_plaintext_or_end_to_end_keys() {
    let marker = b"MARKER-7f3a9c-not-for-the-gateway";
    let mut net = network(2, Pattern::XX, Suite::AesGcmSha256, Mode::Stream);
    for d in 0..2 {
        assert!(net.until_connected(d, Duration::from_secs(5)));
        assert!(net.device_send(d, marker));
        let node = net.devices[d].id;
        assert!(net.cloud_send(node, marker));
    }
    net.advance(Duration::from_millis(100));
    assert_eq!(net.cloud.received.iter().filter(|m| m.3 == marker).count(), 2);
    assert!(net.devices.iter().all(|d| d.received.iter().any(|m| m.2 == marker)));
    let contains = |hay: &[u8]| hay.windows(marker.len()).any(|w| w == marker);
    let g = &net.gateways[0];
    assert!(!g.relayed.is_empty());
    for p in &g.relayed {
        assert!(!contains(p), "a relayed packet carries the plaintext");
    }
    // Nor does anything the gateway's connections decrypted: their events carry envelopes only.
    for h in &net.log {
        assert!(!contains(&h.packet), "a link packet carries the plaintext in clear");
    }
}

#[test]
fn a_relay_that_relabels_a_device_cannot_make_the_cloud_accept_it_as_another() {
    // A malicious gateway labels device 1's envelopes with device 0's handle (spec §16.6).
    for pattern in Pattern::ALL {
        let mut net = network(2, pattern, Suite::ChaChaPolyBlake2s, Mode::Stream);
        for d in 0..2 {
            assert!(net.until_connected(d, Duration::from_secs(5)), "{pattern}");
        }
        let (victim, spoofer) = (net.devices[0].id, net.devices[1].id);
        let l1 = net.devices[1].link.unwrap();
        net.gateways[0].relabel = Some((l1, victim));
        // Device 1's packets of its own, established session reach device 0's connections,
        // whose keys they fail: accepted neither as device 0's nor as its own.
        assert!(net.device_send(1, b"spoofed"));
        net.advance(Duration::from_millis(100));
        assert!(
            !net.cloud.received.iter().any(|(_, _, _, p)| p == b"spoofed"),
            "{pattern}: a relabelled packet was accepted"
        );
        // A new handshake of device 1 under device 0's id never connects.
        net.restart_e2e(1);
        net.advance(Duration::from_secs(12));
        assert!(!net.e2e_connected(1), "{pattern}: the relabelled device connected");
        assert_eq!(net.cloud.connected, [victim, spoofer], "{pattern}: a session formed under a false id");
        // A responder that learns the initiator's key from INIT denies it on the node-id check.
        if matches!(pattern, Pattern::IK | Pattern::IKpsk2) {
            assert!(net.cloud.denied.contains(&victim), "{pattern}: no denial recorded");
        }
        // Device 0's own session is untouched.
        assert!(net.device_send(0, b"genuine"));
        net.advance(Duration::from_millis(100));
        assert!(net.cloud.received.iter().any(|(n, _, _, p)| *n == victim && p == b"genuine"), "{pattern}");
    }
}

#[test]
fn an_end_to_end_key_other_than_the_link_key_is_denied() {
    // spec §16.6: the device authenticates its link with one key and its session with another.
    let mut net = network(1, Pattern::IK, Suite::ChaChaPolyBlake2s, Mode::Stream);
    // The session the genuine key made when the route arrived.
    assert!(net.until_connected(0, Duration::from_secs(5)));
    assert_eq!(net.cloud.connected.len(), 1);
    net.devices[0].e2e = None;
    net.devices[0].e2e_config = Arc::new(e2e_config(99, Pattern::IK, Suite::ChaChaPolyBlake2s));
    net.restart_e2e(0);
    assert!(!net.until_connected(0, Duration::from_secs(12)));
    // Every INIT (the first and its retransmissions) is denied on the node-id check.
    assert!(!net.cloud.denied.is_empty());
    assert!(net.cloud.denied.iter().all(|n| *n == net.devices[0].id));
    assert_eq!(net.cloud.connected.len(), 1, "no session formed under the other key");
}

#[test]
fn unknown_routes_unreachable_destinations_and_a_lost_uplink_get_notices() {
    let mut net = network(1, Pattern::IK, Suite::ChaChaPolyBlake2s, Mode::Stream);
    assert!(net.until_connected(0, Duration::from_secs(5)));
    let l = net.devices[0].link.unwrap();
    // A handle the gateway never announced.
    for _ in 0..5 {
        net.send_on(
            l,
            Owner::Device(0),
            RoutingMessage::Forward { route: 99, packet: Bytes::from_static(&[0x10; 20]) },
        )
        .unwrap();
    }
    net.pump();
    // spec §16.5: one notice per handle and second, however many envelopes.
    assert_eq!(net.devices[0].unreachable, [(99, RouteReason::UnknownRoute)]);
    net.advance(UNREACHABLE_INTERVAL);
    net.send_on(l, Owner::Device(0), RoutingMessage::Forward { route: 99, packet: Bytes::from_static(&[1]) }).unwrap();
    net.pump();
    assert_eq!(net.devices[0].unreachable.len(), 2);
    // The link goes on (a routing failure is not a protocol violation, spec §16.7).
    assert!(net.links[l].ends[0].conn.is_connected());
    assert!(net.device_send(0, b"still fine"));
    net.pump();
    assert!(net.cloud.received.iter().any(|m| m.3 == b"still fine"));

    // The uplink goes down: the device is told its cloud is unreachable, unprompted.
    let up = net.gateways[0].uplink.unwrap();
    net.links[up].ends[0].conn.close(net.now, CloseReason::ShuttingDown);
    net.advance(Duration::from_millis(10));
    let cloud_route = net.devices[0].routes.route_of(&net.devices[0].cloud).unwrap();
    assert!(
        net.devices[0].unreachable.contains(&(cloud_route, RouteReason::UplinkDown)),
        "{:?}",
        net.devices[0].unreachable
    );
    // And again when it tries (after the notice interval).
    net.advance(UNREACHABLE_INTERVAL);
    let before = net.devices[0].unreachable.len();
    assert!(net.device_send(0, b"into the void"));
    net.pump();
    assert_eq!(net.devices[0].unreachable[before..], [(cloud_route, RouteReason::UplinkDown)]);

    // The cloud sends to a device the gateway has no link to: Detached.
    let mut net = network(2, Pattern::IK, Suite::ChaChaPolyBlake2s, Mode::Stream);
    assert!(net.until_connected(1, Duration::from_secs(5)));
    let gone = net.devices[1].id;
    let l1 = net.devices[1].link.unwrap();
    let route_on_uplink = net.cloud.best[&gone].1;
    net.links[l1].ends[0].conn.close(net.now, CloseReason::ShuttingDown);
    net.advance(Duration::from_millis(10));
    // spec §16.3: the gateway withdrew the device's route on the uplink.
    assert!(!net.cloud.best.contains_key(&gone));
    let up = net.gateways[0].uplink.unwrap();
    net.send_on(up, Owner::Cloud, RoutingMessage::Forward { route: route_on_uplink, packet: Bytes::from_static(&[1]) })
        .unwrap();
    net.pump();
    assert_eq!(net.gateways[0].notices.last(), Some(&(up, route_on_uplink, RouteReason::UnknownRoute)));
}

#[test]
fn a_device_that_moves_to_another_gateway_keeps_its_end_to_end_session() {
    let mut net = network(1, Pattern::IK, Suite::ChaChaPolyBlake2s, Mode::Stream);
    assert!(net.until_connected(0, Duration::from_secs(5)));
    assert!(net.device_send(0, b"via gateway 0"));
    net.pump();
    let g2 = net.add_gateway(GATEWAY_SEED + 40);
    net.uplink(g2);
    net.advance(Duration::from_millis(10));
    // The device roams: its old link closes, a new one opens through the second gateway.
    let old = net.devices[0].link.unwrap();
    net.links[old].ends[0].conn.close(net.now, CloseReason::Normal);
    net.devices[0].routes.clear();
    net.attach(0, g2, Mode::Datagram);
    net.advance(Duration::from_millis(50));
    let node = net.devices[0].id;
    assert_eq!(net.cloud.best[&node].0, net.gateways[g2].uplink.unwrap(), "routes follow the device");
    assert_eq!(net.cloud.connected, [node], "one end-to-end handshake, no second one");
    assert!(net.device_send(0, b"via gateway 1"));
    assert!(net.cloud_send(node, b"to the new place"));
    net.advance(Duration::from_millis(100));
    let up: Vec<&[u8]> = net.cloud.received.iter().map(|m| &m.3[..]).collect();
    assert_eq!(up, [&b"via gateway 0"[..], b"via gateway 1"]);
    assert_eq!(net.devices[0].received.last().map(|m| &m.2[..]), Some(&b"to the new place"[..]));
}

#[test]
fn a_restarted_device_replaces_its_end_to_end_session() {
    let mut net = network(1, Pattern::IK, Suite::ChaChaPolyBlake2s, Mode::Stream);
    assert!(net.until_connected(0, Duration::from_secs(5)));
    let node = net.devices[0].id;
    let first = net.cloud.e2e.connection(&node, Slot::Current).unwrap().local_index();
    net.restart_e2e(0);
    assert!(net.until_connected(0, Duration::from_secs(5)));
    let current = net.cloud.e2e.connection(&node, Slot::Current).unwrap();
    assert_ne!(current.local_index(), first, "the new session replaced the old");
    assert!(net.cloud.e2e.connection(&node, Slot::Candidate).is_none());
    assert_eq!(net.cloud.connected, [node, node]);
    assert!(net.device_send(0, b"after restart"));
    assert!(net.cloud_send(node, b"welcome back"));
    net.advance(Duration::from_millis(100));
    assert!(net.cloud.received.iter().any(|m| m.3 == b"after restart"));
    assert_eq!(net.devices[0].received.last().map(|m| &m.2[..]), Some(&b"welcome back"[..]));
}

#[test]
fn lost_announcements_on_a_datagram_link_are_repeated() {
    let mut net = Net::new(1, Pattern::IK, Suite::ChaChaPolyBlake2s);
    let g = net.add_gateway(GATEWAY_SEED);
    net.uplink(g);
    net.advance(Duration::from_millis(10));
    let l = net.attach(0, g, Mode::Datagram);
    // Every gateway → device transport packet of the first 1.5 s is lost: the Route with it.
    let lost = std::rc::Rc::new(std::cell::Cell::new(0usize));
    let counter = std::rc::Rc::clone(&lost);
    let start = net.now;
    let clock = std::rc::Rc::new(std::cell::Cell::new(start));
    let seen = std::rc::Rc::clone(&clock);
    net.links[l].filter = Some(Box::new(move |from, p: &[u8]| {
        let transport = p[0] & 0xfe == wire::TYPE_TRANSPORT;
        if from == 1 && transport && seen.get() < start + Duration::from_millis(1_500) {
            counter.set(counter.get() + 1);
            return false;
        }
        true
    }));
    for _ in 0..40 {
        clock.set(net.now);
        net.advance(Duration::from_millis(100));
        if net.devices[0].routes.route_of(&net.devices[0].cloud).is_some() {
            break;
        }
    }
    assert!(lost.get() > 0, "nothing was lost");
    assert!(net.devices[0].routes.route_of(&net.devices[0].cloud).is_some(), "the route never arrived");
    assert!(net.until_connected(0, Duration::from_secs(10)));
}

#[test]
fn malformed_envelopes_close_the_link_and_routing_policy_only_drops() {
    let mut net = network(1, Pattern::IK, Suite::ChaChaPolyBlake2s, Mode::Stream);
    assert!(net.until_connected(0, Duration::from_secs(5)));
    let l = net.devices[0].link.unwrap();
    // An empty envelope is refused at the sender already (spec §9.2).
    assert_eq!(
        net.send_on(l, Owner::Device(0), RoutingMessage::Forward { route: 0, packet: Bytes::new() }),
        Err(ConnectionError::Decode(DecodeError::MalformedMessage))
    );
    // An envelope larger than one packet to the peer: refused locally.
    let big = Bytes::from(vec![0u8; 70_000]);
    assert_eq!(
        net.send_on(l, Owner::Device(0), RoutingMessage::Forward { route: 0, packet: big }),
        Err(ConnectionError::MessageTooLarge)
    );
    // A device that sends a Deliver (relays only, spec §16.7): dropped by the gateway; link fine.
    net.send_on(l, Owner::Device(0), RoutingMessage::Deliver { route: 0, packet: Bytes::from_static(&[1]) }).unwrap();
    net.pump();
    assert!(net.links[l].ends[1].conn.is_connected());
    // A genuinely malformed envelope inside an authenticated packet: the link closes with
    // ProtocolViolation (spec §9.1), as for any malformed message.
    let mut plain = vec![0u8; 64];
    let n = Message::Forward { route: 0, packet: &[7; 5] }.encode(&mut plain).unwrap();
    plain.truncate(n - 2);
    let e = net.end_of(l, Owner::Device(0));
    let session = net.links[l].ends[e].conn.session_mut().unwrap();
    let mut buf = vec![0u8; 128];
    buf[1..=plain.len()].copy_from_slice(&plain);
    let len = session.seal(net.now, &mut buf, plain.len()).unwrap();
    let r = net.links[l].ends[1].conn.handle_input(net.now, &buf[..len]);
    assert_eq!(r, Err(ConnectionError::Decode(DecodeError::MalformedMessage)));
    let before = net.log.len();
    net.pump();
    assert!(net.log[before..].iter().any(|h| h.from == Owner::Gateway(0) && h.link == l), "no Close sent");
    assert!(net.links[l].ends[1].conn.is_closed(), "the gateway kept the link");
    assert!(net.links[l].ends[0].conn.is_closed(), "the device did not get the Close");
}

#[test]
fn a_routed_packet_is_never_accepted_in_another_mode() {
    // spec §5.2, §16.2: the mode byte of the prologue separates routed from datagram sessions.
    let cfg = |seed: u8, mode: Mode| Arc::new(Config::new(keypair(seed), mode));
    let mut rng = ChaCha20Rng::seed_from_u64(3);
    let b_key = *keypair(2).public();
    let mut routed = Connection::new(cfg(1, Mode::Routed), Role::Initiator, Some(b_key), T0, &mut rng).unwrap();
    let mut buf = vec![0u8; 2048];
    let n = routed.poll_transmit(T0, &mut buf).unwrap().unwrap();
    // The INIT has the datagram layout, so a datagram responder parses it, but cannot read it.
    let mut dgram = Connection::new(cfg(2, Mode::Datagram), Role::Responder, None, T0, &mut rng).unwrap();
    assert_eq!(dgram.handle_input(T0, &buf[..n]), Err(ConnectionError::Handshake(HandshakeError::Crypto)));
    let mut same = Connection::new(cfg(2, Mode::Routed), Role::Responder, None, T0, &mut rng).unwrap();
    assert_eq!(same.handle_input(T0, &buf[..n]), Ok(()));
    assert!(matches!(same.poll_event(), Some(Event::AuthorizationRequired { .. })));
    // A routed transport header is not a datagram one.
    let mut t = vec![0x10, 0, 0, 1];
    t.extend_from_slice(&[0u8; 16]);
    assert!(
        matches!(wire::parse(Mode::Routed, 65_535, &t), Ok(wire::Packet::Transport(h, _)) if h.receiver_index.is_none())
    );
    assert_eq!(wire::parse(Mode::Datagram, 65_535, &t[..19]), Err(DecodeError::Truncated));
}
