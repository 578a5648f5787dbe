//! `routing.json` (spec §16.10, §14.2): routing and end-to-end sessions from fixed inputs.
//!
//! - `handshakes`: every pattern × suite in routed mode, exactly as `handshakes.json`;
//! - `messages`: each routing message and its encoding;
//! - `relayed`: one 32-byte Data message from a device to the cloud through a gateway over two
//!   stream links, every link and end-to-end handshake from fixed keys, and the packet of each
//!   hop, checked against snow's keys before it is written.

use veil_protocol::routing::{RouteReason, RoutingMessage};
use veil_protocol::trust::NodeId;

use super::*;

#[derive(Serialize)]
pub(super) struct RoutingFile {
    description: &'static str,
    spec: &'static str,
    generator: &'static str,
    pub(super) handshakes: Vec<HandshakeVector>,
    messages: Vec<RoutingMessageJson>,
    pub(super) relayed: Relayed,
}

#[derive(Serialize)]
struct RoutingMessageJson {
    kind: &'static str,
    route: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    packet: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<u8>,
    pub(super) encoding: String,
}

#[derive(Serialize)]
struct NodeJson {
    name: &'static str,
    static_secret: String,
    static_public: String,
    node_id: String,
}

/// One session of the relayed scenario: its inputs, handshake and keys.
#[derive(Serialize)]
struct SessionJson {
    name: &'static str,
    pattern: &'static str,
    suite: &'static str,
    mode: &'static str,
    noise_protocol: String,
    initiator: PartyJson,
    responder: PartyJson,
    prologue: String,
    handshake_packets: Vec<HandshakePacket>,
    handshake_hash: String,
    transport_keys: TransportKeys,
}

#[derive(Serialize)]
struct RouteJson {
    link: &'static str,
    route: u32,
    node: String,
}

#[derive(Serialize)]
struct DataJson {
    channel: u16,
    id: u64,
    payload: String,
}

#[derive(Serialize)]
struct E2ePacketJson {
    direction: &'static str,
    counter: u64,
    plaintext: String,
    packet: String,
}

#[derive(Serialize)]
pub(super) struct HopJson {
    link: &'static str,
    direction: &'static str,
    counter: u64,
    plaintext: String,
    pub(super) packet: String,
    framed_length: usize,
    overhead: usize,
}

#[derive(Serialize)]
pub(super) struct Relayed {
    nodes: Vec<NodeJson>,
    links: Vec<SessionJson>,
    end_to_end: SessionJson,
    routes: Vec<RouteJson>,
    message: DataJson,
    end_to_end_packet: E2ePacketJson,
    pub(super) hops: Vec<HopJson>,
}

// Fixed inputs of the relayed scenario: one static key per node, one ephemeral per handshake.
const DEVICE_LINK: Party = Party { static_secret: [0x11; 32], ephemeral_secret: [0x12; 32], index: 0 };
const DEVICE_E2E: Party = Party { static_secret: [0x11; 32], ephemeral_secret: [0x13; 32], index: 0x0d0d_0001 };
const GATEWAY_DOWN: Party = Party { static_secret: [0x21; 32], ephemeral_secret: [0x22; 32], index: 0 };
const GATEWAY_UP: Party = Party { static_secret: [0x21; 32], ephemeral_secret: [0x23; 32], index: 0 };
const CLOUD_LINK: Party = Party { static_secret: [0x31; 32], ephemeral_secret: [0x32; 32], index: 0 };
const CLOUD_E2E: Party = Party { static_secret: [0x31; 32], ephemeral_secret: [0x33; 32], index: 0x0c0c_0001 };
const PAYLOAD: [u8; 32] = *b"temperature=21.5C;humidity=40.0%";

const LINK_DOWN: &str = "device_gateway";
const LINK_UP: &str = "gateway_cloud";
const DEVICE_TO_CLOUD: &str = "device_to_cloud";

/// Two IK connections between `i` and `r` in `mode`, from the fixed inputs.
fn ik_pair(i: &Party, r: &Party, mode: Mode) -> (Connection, Connection) {
    let mut rng = ChaCha20Rng::seed_from_u64(RNG_SEED);
    let r_pub = *StaticKeypair::from_secret_bytes(r.static_secret).public();
    let ci = Arc::new(Config::new(StaticKeypair::from_secret_bytes(i.static_secret), mode));
    let cr = Arc::new(Config::new(StaticKeypair::from_secret_bytes(r.static_secret), mode));
    let a = Connection::new_with_fixed_ephemeral_for_testing_only(
        ci,
        Role::Initiator,
        Some(r_pub),
        T0,
        &mut rng,
        i.ephemeral_secret,
        i.index,
    )
    .expect("initiator");
    let b = Connection::new_with_fixed_ephemeral_for_testing_only(
        cr,
        Role::Responder,
        None,
        T0,
        &mut rng,
        r.ephemeral_secret,
        r.index,
    )
    .expect("responder");
    (a, b)
}

/// One endpoint of the scenario's plumbing.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum At {
    /// Link `k`, end `e` (0 = initiator).
    Link(usize, usize),
    /// The end-to-end session, end `e` (0 = device).
    E2e(usize),
}

struct Scenario {
    links: [[Connection; 2]; 2],
    e2e: [Connection; 2],
    /// Every link packet on the wire: (link, sending end, counter if transport, bytes).
    wire: Vec<(usize, usize, Option<u64>, Vec<u8>)>,
    /// Every end-to-end packet: (sending end, bytes).
    e2e_wire: Vec<(usize, Vec<u8>)>,
    /// Handles announced: (link, route, node).
    routes: Vec<(usize, u32, NodeId)>,
    received: Vec<(u16, u64, Vec<u8>)>,
    buf: Vec<u8>,
}

impl Scenario {
    fn conn(&mut self, at: At) -> &mut Connection {
        match at {
            At::Link(k, e) => &mut self.links[k][e],
            At::E2e(e) => &mut self.e2e[e],
        }
    }

    /// The route handle `link`'s end `e` uses for `node` (device and cloud learned it from the
    /// gateway's announcements; the gateway announced it itself).
    fn route(&self, link: usize, node: NodeId) -> u32 {
        self.routes.iter().find(|(l, _, n)| *l == link && *n == node).map(|r| r.1).expect("an announced route")
    }

    /// Moves every packet until nothing moves. The gateway is end 1 of link 0 and end 0 of
    /// link 1; it relays as spec §16.4 says.
    fn pump(&mut self, device: NodeId, cloud: NodeId) {
        for _ in 0..64 {
            let mut moved = false;
            for e in 0..2 {
                let mut buf = std::mem::take(&mut self.buf);
                while let Some(n) = self.e2e[e].poll_transmit(T0, &mut buf).expect("e2e poll") {
                    moved = true;
                    let packet = Bytes::copy_from_slice(&buf[..n]);
                    self.e2e_wire.push((e, buf[..n].to_vec()));
                    let (link, end, to) = if e == 0 { (0, 0, cloud) } else { (1, 1, device) };
                    let route = self.route(link, to);
                    self.links[link][end].send_routing(RoutingMessage::Forward { route, packet }).expect("forward");
                }
                self.buf = buf;
            }
            for k in 0..2 {
                for e in 0..2 {
                    let mut buf = std::mem::take(&mut self.buf);
                    while let Some(n) = self.links[k][e].poll_transmit(T0, &mut buf).expect("link poll") {
                        moved = true;
                        let p = buf[..n].to_vec();
                        let counter = (p[0] >= wire::TYPE_TRANSPORT)
                            .then(|| self.links[k][e].session().expect("a session").send_counter() - 1);
                        self.wire.push((k, e, counter, p.clone()));
                        self.links[k][1 - e].handle_input(T0, &p).expect("link packet accepted");
                        self.events(At::Link(k, 1 - e), device, cloud);
                    }
                    self.buf = buf;
                }
            }
            if !moved {
                return;
            }
        }
        panic!("the relayed scenario did not settle");
    }

    fn events(&mut self, at: At, device: NodeId, cloud: NodeId) {
        while let Some(ev) = self.conn(at).poll_event() {
            match (at, ev) {
                (_, Event::AuthorizationRequired { .. }) => {
                    self.conn(at).authorize(T0, Decision::allow()).expect("allow")
                }
                (At::Link(0, 1), Event::Connected { .. }) => {
                    // spec §16.3: the gateway announces the cloud to the device...
                    self.routes.push((0, 0, cloud));
                    let m = RoutingMessage::Route { route: 0, node: cloud };
                    self.links[0][1].send_routing(m).expect("route");
                    // ...and the device on its uplink.
                    self.routes.push((1, 0, device));
                    let m = RoutingMessage::Route { route: 0, node: device };
                    self.links[1][0].send_routing(m).expect("route");
                }
                (At::Link(0, 1), Event::Routing(RoutingMessage::Forward { route, packet })) => {
                    assert_eq!(route, self.route(0, cloud));
                    let route = self.route(1, device);
                    self.links[1][0].send_routing(RoutingMessage::Deliver { route, packet }).expect("deliver");
                }
                (At::Link(1, 0), Event::Routing(RoutingMessage::Forward { route, packet })) => {
                    assert_eq!(route, self.route(1, device));
                    let route = self.route(0, cloud);
                    self.links[0][1].send_routing(RoutingMessage::Deliver { route, packet }).expect("deliver");
                }
                (At::Link(0, 0), Event::Routing(RoutingMessage::Deliver { packet, .. })) => {
                    self.e2e[0].handle_input(T0, &packet).expect("e2e packet accepted by the device");
                    self.events(At::E2e(0), device, cloud);
                }
                (At::Link(1, 1), Event::Routing(RoutingMessage::Deliver { packet, .. })) => {
                    self.e2e[1].handle_input(T0, &packet).expect("e2e packet accepted by the cloud");
                    self.events(At::E2e(1), device, cloud);
                }
                (At::E2e(1), Event::Message { channel, id, payload }) => {
                    self.received.push((channel, id, payload.to_vec()))
                }
                (_, Event::Closed(c)) => panic!("{at:?} closed: {c:?}"),
                _ => {}
            }
        }
    }
}

fn session_json(
    name: &'static str,
    mode: Mode,
    i: &Party,
    r: &Party,
    packets: &[(usize, Vec<u8>)],
) -> (SessionJson, Mirror) {
    let (pattern, suite) = (Pattern::IK, Suite::ChaChaPolyBlake2s);
    let pro = prologue(mode, &packets[0].1);
    let bodies: Vec<Vec<u8>> = packets.iter().map(|(_, p)| p[header_len(p[0], mode)..].to_vec()).collect();
    let m = mirror_parties(pattern, suite, &pro, &bodies, i, r);
    let payload = min_payload();
    let json = SessionJson {
        name,
        pattern: pattern_name(pattern),
        suite: suite.noise_name(),
        mode: mode_name(mode),
        noise_protocol: noise_protocol(pattern, suite),
        initiator: party_json(i),
        responder: party_json(r),
        prologue: hex::encode(&pro),
        handshake_packets: packets
            .iter()
            .map(|(e, p)| HandshakePacket {
                direction: if *e == 0 { I2R } else { R2I },
                packet_type: type_name(p[0]),
                length: p.len(),
                header: hex::encode(&p[..header_len(p[0], mode)]),
                payload: hex::encode(&payload),
                packet: hex::encode(p),
            })
            .collect(),
        handshake_hash: hex::encode(m.hash),
        transport_keys: TransportKeys {
            initiator_to_responder: hex::encode(m.k1),
            responder_to_initiator: hex::encode(m.k2),
        },
    };
    (json, m)
}

fn relayed() -> Relayed {
    let device_pub = *StaticKeypair::from_secret_bytes(DEVICE_LINK.static_secret).public();
    let cloud_pub = *StaticKeypair::from_secret_bytes(CLOUD_LINK.static_secret).public();
    let (device, cloud) = (NodeId::from_public_key(&device_pub), NodeId::from_public_key(&cloud_pub));
    let (l0i, l0r) = ik_pair(&DEVICE_LINK, &GATEWAY_DOWN, Mode::Stream);
    let (l1i, l1r) = ik_pair(&GATEWAY_UP, &CLOUD_LINK, Mode::Stream);
    let (ei, er) = ik_pair(&DEVICE_E2E, &CLOUD_E2E, Mode::Routed);
    let mut sc = Scenario {
        links: [[l0i, l0r], [l1i, l1r]],
        e2e: [ei, er],
        wire: Vec::new(),
        e2e_wire: Vec::new(),
        routes: Vec::new(),
        received: Vec::new(),
        buf: vec![0u8; 65_535],
    };
    // The uplink comes up first, then the device's link; the gateway announces on the
    // device's Connected; the device's end-to-end INIT waits in its queue until the route is
    // known (its first Forward is sent by `pump` once the announcement arrived).
    let e2e_init_held = {
        let mut buf = vec![0u8; 2048];
        let n = sc.e2e[0].poll_transmit(T0, &mut buf).expect("poll").expect("the INIT");
        buf[..n].to_vec()
    };
    sc.pump(device, cloud);
    assert_eq!(sc.routes.len(), 2, "announcements");
    sc.e2e_wire.push((0, e2e_init_held.clone()));
    let route = sc.route(0, cloud);
    sc.links[0][0].send_routing(RoutingMessage::Forward { route, packet: Bytes::from(e2e_init_held) }).expect("fwd");
    sc.pump(device, cloud);
    assert!(sc.e2e[0].is_connected() && sc.e2e[1].is_connected(), "the end-to-end session");

    // The measured message.
    let before = sc.wire.len();
    let before_e2e = sc.e2e_wire.len();
    let id = sc.e2e[0].send(1, Bytes::from_static(&PAYLOAD)).expect("send");
    sc.pump(device, cloud);
    assert_eq!(sc.received, [(1, id, PAYLOAD.to_vec())]);
    let hops: Vec<_> = sc.wire[before..].to_vec();
    assert_eq!(hops.len(), 2, "one packet per hop");
    assert_eq!(sc.e2e_wire.len(), before_e2e + 1);
    let e2e_packet = sc.e2e_wire[before_e2e].1.clone();

    // Handshakes, checked against snow.
    let hs = |k: usize| -> Vec<(usize, Vec<u8>)> {
        sc.wire.iter().filter(|(l, _, c, _)| *l == k && c.is_none()).map(|(_, e, _, p)| (*e, p.clone())).collect()
    };
    let (down, down_keys) = session_json(LINK_DOWN, Mode::Stream, &DEVICE_LINK, &GATEWAY_DOWN, &hs(0));
    let (up, up_keys) = session_json(LINK_UP, Mode::Stream, &GATEWAY_UP, &CLOUD_LINK, &hs(1));
    let e2e_hs: Vec<(usize, Vec<u8>)> =
        sc.e2e_wire.iter().filter(|(_, p)| p[0] < wire::TYPE_TRANSPORT).cloned().collect();
    let (e2e, e2e_keys) = session_json(DEVICE_TO_CLOUD, Mode::Routed, &DEVICE_E2E, &CLOUD_E2E, &e2e_hs);

    // The end-to-end packet: routed header, then the Data message under the e2e key.
    let e2e_counter = sc.e2e[0].session().expect("session").send_counter() - 1;
    let data = Message::Data { channel: 1, id, payload: &PAYLOAD };
    let mut data_bytes = vec![0u8; data.encoded_len()];
    data.encode(&mut data_bytes).expect("encode");
    let opened = snow_open(Suite::ChaChaPolyBlake2s, Mode::Routed, &e2e_keys.k1, e2e_counter, &e2e_packet);
    assert_eq!(opened, data_bytes, "snow opens the end-to-end packet");
    assert_eq!(e2e_packet.len(), 4 + data_bytes.len() + 16);

    let mut hop_json = Vec::new();
    for (k, e, counter, packet) in &hops {
        let counter = counter.expect("a transport packet");
        let (link, keys, kind) = if *k == 0 { (LINK_DOWN, &down_keys, 0x06) } else { (LINK_UP, &up_keys, 0x07) };
        let key = if *e == 0 { &keys.k1 } else { &keys.k2 };
        let plaintext = snow_open(Suite::ChaChaPolyBlake2s, Mode::Stream, key, counter, packet);
        // spec §16.4: kind, the route handle, the packet length, the end-to-end packet unchanged.
        let route = u8::try_from(sc.route(*k, if *k == 0 { cloud } else { device })).expect("a small handle");
        let mut expect = vec![kind, route, u8::try_from(e2e_packet.len()).expect("short")];
        expect.extend_from_slice(&e2e_packet);
        assert_eq!(plaintext, expect, "hop {k}: the envelope");
        hop_json.push(HopJson {
            link,
            direction: if *e == 0 { I2R } else { R2I },
            counter,
            plaintext: hex::encode(&plaintext),
            packet: hex::encode(packet),
            framed_length: packet.len() + 2,
            overhead: packet.len() + 2 - PAYLOAD.len(),
        });
    }
    let node = |name: &'static str, secret: [u8; 32]| {
        let public = *StaticKeypair::from_secret_bytes(secret).public();
        NodeJson {
            name,
            static_secret: hex::encode(secret),
            static_public: hex::encode(public.as_bytes()),
            node_id: hex::encode(NodeId::from_public_key(&public).0),
        }
    };
    Relayed {
        nodes: vec![
            node("device", DEVICE_LINK.static_secret),
            node("gateway", GATEWAY_DOWN.static_secret),
            node("cloud", CLOUD_LINK.static_secret),
        ],
        links: vec![down, up],
        end_to_end: e2e,
        routes: sc
            .routes
            .iter()
            .map(|(l, route, n)| RouteJson {
                link: if *l == 0 { LINK_DOWN } else { LINK_UP },
                route: *route,
                node: hex::encode(n.0),
            })
            .collect(),
        message: DataJson { channel: 1, id, payload: hex::encode(PAYLOAD) },
        end_to_end_packet: E2ePacketJson {
            direction: I2R,
            counter: e2e_counter,
            plaintext: hex::encode(&data_bytes),
            packet: hex::encode(&e2e_packet),
        },
        hops: hop_json,
    }
}

fn messages() -> Vec<RoutingMessageJson> {
    let node = NodeId(*b"\x5e\xed\x1d\x00node-id-16-b");
    let packet = [0x10, 0x00, 0x00, 0x07, 0xaa, 0xbb];
    let long = [0x11u8; 130];
    let all = [
        RoutingMessage::Forward { route: 0, packet: Bytes::copy_from_slice(&packet) },
        RoutingMessage::Forward { route: 300, packet: Bytes::copy_from_slice(&long) },
        RoutingMessage::Deliver { route: 5, packet: Bytes::copy_from_slice(&packet) },
        RoutingMessage::Route { route: 0, node },
        RoutingMessage::Route { route: 16_384, node },
        RoutingMessage::Withdraw { route: 1, reason: RouteReason::Detached },
        RoutingMessage::Unreachable { route: 0, reason: RouteReason::UplinkDown },
        RoutingMessage::Unreachable { route: 127, reason: RouteReason::Unknown(200) },
    ];
    all.iter()
        .map(|r| {
            let m = r.message();
            let mut buf = vec![0u8; m.encoded_len()];
            let n = m.encode(&mut buf).expect("encode");
            assert_eq!(n, buf.len());
            assert_eq!(Message::decode(&buf), Ok((m, &[][..])));
            let (kind, packet, node, reason) = match r {
                RoutingMessage::Forward { packet, .. } => ("Forward", Some(hex::encode(packet)), None, None),
                RoutingMessage::Deliver { packet, .. } => ("Deliver", Some(hex::encode(packet)), None, None),
                RoutingMessage::Route { node, .. } => ("Route", None, Some(hex::encode(node.0)), None),
                RoutingMessage::Withdraw { reason, .. } => ("Withdraw", None, None, Some(reason.code())),
                RoutingMessage::Unreachable { reason, .. } => ("Unreachable", None, None, Some(reason.code())),
                _ => unreachable!("every routing message is listed"),
            };
            RoutingMessageJson { kind, route: r.route(), packet, node, reason, encoding: hex::encode(&buf) }
        })
        .collect()
}

pub(super) fn generate() -> RoutingFile {
    let mut handshakes = Vec::new();
    for pattern in Pattern::ALL {
        for suite in Suite::ALL {
            handshakes.push(handshake_vector(pattern, suite, Mode::Routed));
        }
    }
    RoutingFile {
        description: "Veil routing and end-to-end sessions (spec §16): `handshakes` in routed mode (the format of \
                      handshakes.json; transport headers are type || counter_lo, no index); `messages`: routing \
                      messages and their encodings (spec §9.2); `relayed`: a 32-byte Data message from a device \
                      to the cloud through a gateway over two stream links, with every handshake, the routes the \
                      gateway announced, the end-to-end packet and each hop's link packet (overhead = bytes on \
                      the wire with the 2-byte TCP length prefix, minus the 32-byte payload). Malformed routing \
                      messages are in malformed.json.",
        spec: "spec/protocol.md §16, §14",
        generator: GENERATOR,
        handshakes,
        messages: messages(),
        relayed: relayed(),
    }
}
