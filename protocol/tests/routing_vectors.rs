//! `spec/vectors/routing.json` (spec §16.10) beyond its routed handshakes (which
//! `vectors.rs` replays with every other handshake vector):
//!
//! - each routing message's encoding is rebuilt from the spec's layout (§9.2: kind, postcard
//!   varints, raw node id, length-prefixed packet) and decodes back to its fields;
//! - the relayed message: node ids from the spec's formula (§15.2), every handshake run by snow
//!   alone from the recorded inputs (same bytes, same hash, same keys), each hop's link packet
//!   opened with snow's cipher and its envelope checked against §16.4, the end-to-end packet
//!   opened with the end-to-end key, and every packet rebuilt through [`Connection`].
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;

use bytes::Bytes;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use serde_json::Value;
use snow::resolvers::CryptoResolver;
use veil_protocol::message::Message;
use veil_protocol::routing::{RouteReason, RoutingMessage};
use veil_protocol::trust::NodeId;
use veil_protocol::{Config, Connection, Decision, Event, Mode, Role, StaticKeypair, Timestamp};

fn load() -> Value {
    let path = format!("{}/../spec/vectors/routing.json", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_else(|| panic!("string field `{key}` in {v}"))
}

fn n(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("integer field `{key}` in {v}"))
}

fn bytes(v: &Value, key: &str) -> Vec<u8> {
    hex::decode(s(v, key)).unwrap_or_else(|e| panic!("hex field `{key}`: {e}"))
}

fn key32(v: &Value, key: &str) -> [u8; 32] {
    bytes(v, key).try_into().unwrap_or_else(|_| panic!("`{key}` is not 32 bytes"))
}

fn list<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v[key].as_array().unwrap_or_else(|| panic!("array field `{key}` in {v}"))
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// spec §9.2, §16: a routing message from its fields, by the spec's layout.
fn spec_encoding(m: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    let kind = match s(m, "kind") {
        "Forward" => 0x06,
        "Deliver" => 0x07,
        "Route" => 0x0c,
        "Withdraw" => 0x0d,
        "Unreachable" => 0x0e,
        k => panic!("kind {k}"),
    };
    out.push(kind);
    varint(n(m, "route"), &mut out);
    match kind {
        0x06 | 0x07 => {
            let p = bytes(m, "packet");
            varint(p.len() as u64, &mut out);
            out.extend_from_slice(&p);
        }
        0x0c => out.extend_from_slice(&bytes(m, "node")),
        _ => out.push(u8::try_from(n(m, "reason")).unwrap()),
    }
    out
}

#[test]
fn routing_messages_are_encoded_as_the_spec_lays_them_out() {
    let file = load();
    let messages = list(&file, "messages");
    let mut kinds = std::collections::BTreeSet::new();
    for m in messages {
        let enc = bytes(m, "encoding");
        assert_eq!(hex::encode(spec_encoding(m)), s(m, "encoding"), "{m}");
        let (decoded, rest) = Message::decode(&enc).unwrap();
        assert!(rest.is_empty());
        let route = u32::try_from(n(m, "route")).unwrap();
        let expected = match s(m, "kind") {
            "Forward" => RoutingMessage::Forward { route, packet: Bytes::from(bytes(m, "packet")) },
            "Deliver" => RoutingMessage::Deliver { route, packet: Bytes::from(bytes(m, "packet")) },
            "Route" => RoutingMessage::Route { route, node: NodeId(bytes(m, "node").try_into().unwrap()) },
            "Withdraw" => RoutingMessage::Withdraw {
                route,
                reason: RouteReason::from_code(u8::try_from(n(m, "reason")).unwrap()),
            },
            _ => RoutingMessage::Unreachable {
                route,
                reason: RouteReason::from_code(u8::try_from(n(m, "reason")).unwrap()),
            },
        };
        assert_eq!(decoded, expected.message(), "{m}");
        kinds.insert(s(m, "kind"));
    }
    assert_eq!(kinds.len(), 5, "every routing message has a vector");
    // Multi-byte handles and lengths appear.
    assert!(messages.iter().any(|m| n(m, "route") >= 128));
}

// ---------------------------------------------------------------------------------------
// snow alone

struct NoRandomness;

impl snow::types::Random for NoRandomness {
    fn try_fill_bytes(&mut self, _: &mut [u8]) -> Result<(), snow::Error> {
        Err(snow::Error::Rng)
    }
}

struct SnowOnly;

impl CryptoResolver for SnowOnly {
    fn resolve_rng(&self) -> Option<Box<dyn snow::types::Random>> {
        Some(Box::new(NoRandomness))
    }
    fn resolve_dh(&self, c: &snow::params::DHChoice) -> Option<Box<dyn snow::types::Dh>> {
        snow::resolvers::DefaultResolver.resolve_dh(c)
    }
    fn resolve_hash(&self, c: &snow::params::HashChoice) -> Option<Box<dyn snow::types::Hash>> {
        snow::resolvers::DefaultResolver.resolve_hash(c)
    }
    fn resolve_cipher(&self, c: &snow::params::CipherChoice) -> Option<Box<dyn snow::types::Cipher>> {
        snow::resolvers::DefaultResolver.resolve_cipher(c)
    }
}

const MIN_PAYLOAD: [u8; 4] = [0x01, 0x00, 0x00, 0x00];

fn header_len(ty: u8, mode: Mode) -> usize {
    match (ty, mode) {
        (0x01, Mode::Stream) => 3,
        (0x01, _) => 7,
        (0x02, Mode::Stream) => 1,
        (0x02, _) => 9,
        _ => 1,
    }
}

fn mode_of(v: &Value) -> Mode {
    match s(v, "mode") {
        "stream" => Mode::Stream,
        "routed" => Mode::Routed,
        m => panic!("mode {m}"),
    }
}

/// The session's IK handshake run by snow from the recorded inputs: every message equals the
/// recorded body; returns (k1, k2).
fn snow_session(v: &Value) -> ([u8; 32], [u8; 32]) {
    assert_eq!(s(v, "noise_protocol"), "Noise_IK_25519_ChaChaPoly_BLAKE2s");
    let params: snow::params::NoiseParams = s(v, "noise_protocol").parse().unwrap();
    let mode = mode_of(v);
    let packets = list(v, "handshake_packets");
    // spec §5.2: "Veil-v1" || mode || INIT header.
    let init = bytes(&packets[0], "packet");
    let mut prologue = b"Veil-v1".to_vec();
    prologue.push(match mode {
        Mode::Stream => 1,
        _ => 3,
    });
    prologue.extend_from_slice(&init[..header_len(0x01, mode)]);
    assert_eq!(hex::encode(&prologue), s(v, "prologue"));
    let (i_s, i_e) = (key32(&v["initiator"], "static_secret"), key32(&v["initiator"], "ephemeral_secret"));
    let (r_s, r_e) = (key32(&v["responder"], "static_secret"), key32(&v["responder"], "ephemeral_secret"));
    let r_pub = key32(&v["responder"], "static_public");
    let builder = || snow::Builder::with_resolver(params.clone(), Box::new(SnowOnly)).prologue(&prologue).unwrap();
    // IK: the initiator knows the responder's static key.
    let mut i = builder()
        .local_private_key(&i_s)
        .unwrap()
        .fixed_ephemeral_key_for_testing_only(&i_e)
        .remote_public_key(&r_pub)
        .unwrap()
        .build_initiator()
        .unwrap();
    let mut r = builder()
        .local_private_key(&r_s)
        .unwrap()
        .fixed_ephemeral_key_for_testing_only(&r_e)
        .build_responder()
        .unwrap();
    assert_eq!(packets.len(), 2);
    let mut out = [0u8; 1024];
    let mut read = [0u8; 1024];
    for (k, p) in packets.iter().enumerate() {
        let packet = bytes(p, "packet");
        let body = &packet[header_len(packet[0], mode)..];
        let (w, rd) = if k == 0 { (&mut i, &mut r) } else { (&mut r, &mut i) };
        let len = w.write_message(&MIN_PAYLOAD, &mut out).unwrap();
        assert_eq!(hex::encode(&out[..len]), hex::encode(body), "{}: message {k}", s(v, "name"));
        let m = rd.read_message(body, &mut read).unwrap();
        assert_eq!(&read[..m], &MIN_PAYLOAD);
    }
    assert_eq!(hex::encode(i.get_handshake_hash()), s(v, "handshake_hash"));
    let (k1, k2) = i.dangerously_get_raw_split();
    assert_eq!(hex::encode(k1), s(&v["transport_keys"], "initiator_to_responder"));
    assert_eq!(hex::encode(k2), s(&v["transport_keys"], "responder_to_initiator"));
    (k1, k2)
}

fn chacha_open(key: &[u8; 32], counter: u64, header_len: usize, packet: &[u8]) -> Vec<u8> {
    let mut c = snow::resolvers::DefaultResolver.resolve_cipher(&snow::params::CipherChoice::ChaChaPoly).unwrap();
    c.set(key);
    let mut out = vec![0u8; packet.len()];
    let n = c.decrypt(counter, &packet[..header_len], &packet[header_len..], &mut out).expect("snow opens the packet");
    out.truncate(n);
    out
}

// ---------------------------------------------------------------------------------------
// Our Connection

/// A connected IK pair rebuilt from the vector's inputs; its handshake packets must be the
/// recorded ones.
fn connection_pair(v: &Value) -> (Connection, Connection) {
    let mode = mode_of(v);
    let mut rng = ChaCha20Rng::seed_from_u64(99);
    let now = Timestamp::from_millis(1_000);
    let side = |p: &Value| {
        (
            StaticKeypair::from_secret_bytes(key32(p, "static_secret")),
            key32(p, "ephemeral_secret"),
            u32::try_from(n(p, "index")).unwrap(),
        )
    };
    let (i_id, i_eph, i_idx) = side(&v["initiator"]);
    let (r_id, r_eph, r_idx) = side(&v["responder"]);
    let r_pub = *r_id.public();
    let mut i = Connection::new_with_fixed_ephemeral_for_testing_only(
        Arc::new(Config::new(i_id, mode)),
        Role::Initiator,
        Some(r_pub),
        now,
        &mut rng,
        i_eph,
        i_idx,
    )
    .unwrap();
    let mut r = Connection::new_with_fixed_ephemeral_for_testing_only(
        Arc::new(Config::new(r_id, mode)),
        Role::Responder,
        None,
        now,
        &mut rng,
        r_eph,
        r_idx,
    )
    .unwrap();
    let mut buf = vec![0u8; 4096];
    let mut handshake = Vec::new();
    for _ in 0..8 {
        let mut moved = false;
        for dir in 0..2 {
            let (from, to) = if dir == 0 { (&mut i, &mut r) } else { (&mut r, &mut i) };
            while let Some(len) = from.poll_transmit(now, &mut buf).unwrap() {
                moved = true;
                if buf[0] < 0x10 {
                    handshake.push(hex::encode(&buf[..len]));
                }
                to.handle_input(now, &buf[..len]).unwrap();
                while let Some(ev) = to.poll_event() {
                    if let Event::AuthorizationRequired { .. } = ev {
                        to.authorize(now, Decision::allow()).unwrap();
                    }
                }
            }
        }
        if !moved {
            break;
        }
    }
    assert!(i.is_connected() && r.is_connected(), "{}", s(v, "name"));
    let recorded: Vec<&str> = list(v, "handshake_packets").iter().map(|p| s(p, "packet")).collect();
    assert_eq!(handshake, recorded, "{}: handshake packets", s(v, "name"));
    (i, r)
}

/// The next packet `c` sends after its counter was set to `counter`.
fn next_packet(c: &mut Connection, counter: u64) -> Vec<u8> {
    c.session_mut().unwrap().set_send_counter_for_testing_only(counter);
    let mut buf = vec![0u8; 4096];
    let len = c.poll_transmit(Timestamp::from_millis(1_000), &mut buf).unwrap().expect("a packet");
    buf.truncate(len);
    buf
}

#[test]
fn the_relayed_message_is_reproduced_at_every_hop() {
    let file = load();
    let r = &file["relayed"];
    // spec §15.2: node ids.
    let mut ids = std::collections::BTreeMap::new();
    for node in list(r, "nodes") {
        let key = StaticKeypair::from_secret_bytes(key32(node, "static_secret"));
        assert_eq!(hex::encode(key.public().as_bytes()), s(node, "static_public"));
        let id = NodeId::from_public_key(key.public());
        assert_eq!(hex::encode(id.0), s(node, "node_id"));
        ids.insert(s(node, "name"), s(node, "node_id").to_owned());
    }
    let links = list(r, "links");
    let e2e = &r["end_to_end"];
    // The same static key on every layer (spec §16.1): the device's link key is its e2e key.
    assert_eq!(links[0]["initiator"]["static_secret"], e2e["initiator"]["static_secret"]);
    assert_eq!(links[1]["responder"]["static_secret"], e2e["responder"]["static_secret"]);
    // spec §16.3: the gateway announced the cloud to the device and the device to the cloud.
    let routes = list(r, "routes");
    let route_on = |link: &str| routes.iter().find(|x| s(x, "link") == link).unwrap();
    assert_eq!(s(route_on("device_gateway"), "node"), ids["cloud"]);
    assert_eq!(s(route_on("gateway_cloud"), "node"), ids["device"]);

    // The end-to-end packet: routed header (spec §16.2) and a Data message under the e2e key.
    let (e2e_k1, _) = snow_session(e2e);
    let ep = &r["end_to_end_packet"];
    let e2e_packet = bytes(ep, "packet");
    let counter = n(ep, "counter");
    assert_eq!(e2e_packet[..4], [0x10, (counter >> 16) as u8, (counter >> 8) as u8, counter as u8]);
    let plain = chacha_open(&e2e_k1, counter, 4, &e2e_packet);
    assert_eq!(hex::encode(&plain), s(ep, "plaintext"));
    let msg = &r["message"];
    let payload = bytes(msg, "payload");
    assert_eq!(payload.len(), 32);
    let mut data = vec![0x01];
    varint(n(msg, "channel"), &mut data);
    varint(n(msg, "id"), &mut data);
    varint(payload.len() as u64, &mut data);
    data.extend_from_slice(&payload);
    assert_eq!(plain, data);
    let (mut dev, _cloud) = connection_pair(e2e);
    dev.send(u16::try_from(n(msg, "channel")).unwrap(), Bytes::from(payload.clone())).unwrap();
    assert_eq!(hex::encode(next_packet(&mut dev, counter)), s(ep, "packet"), "end-to-end packet");

    // Each hop: the link packet carries the envelope around the same end-to-end packet.
    let hops = list(r, "hops");
    assert_eq!(hops.len(), 2);
    for (k, hop) in hops.iter().enumerate() {
        let link = &links[k];
        assert_eq!(s(hop, "link"), s(link, "name"));
        let (k1, _) = snow_session(link);
        let packet = bytes(hop, "packet");
        let counter = n(hop, "counter");
        assert_eq!(packet[0], 0x10, "stream transport header, generation 0");
        let plain = chacha_open(&k1, counter, 1, &packet);
        assert_eq!(hex::encode(&plain), s(hop, "plaintext"));
        // spec §16.4: Forward on the device's link, Deliver on the uplink, one-byte handle and
        // length, the end-to-end packet unchanged.
        let route = u8::try_from(n(route_on(s(hop, "link")), "route")).unwrap();
        let kind = if k == 0 { 0x06 } else { 0x07 };
        assert_eq!(plain[..3], [kind, route, u8::try_from(e2e_packet.len()).unwrap()]);
        assert_eq!(plain[3..], e2e_packet[..]);
        // spec §12.6: 46 bytes of overhead at each hop over TCP.
        assert_eq!(n(hop, "framed_length"), packet.len() as u64 + 2);
        assert_eq!(n(hop, "overhead"), packet.len() as u64 + 2 - 32);
        assert_eq!(n(hop, "overhead"), 46);
        // Rebuilt through the implementation.
        let (mut a, _b) = connection_pair(link);
        let env = if k == 0 {
            RoutingMessage::Forward { route: u32::from(route), packet: Bytes::from(e2e_packet.clone()) }
        } else {
            RoutingMessage::Deliver { route: u32::from(route), packet: Bytes::from(e2e_packet.clone()) }
        };
        a.send_routing(env).unwrap();
        assert_eq!(hex::encode(next_packet(&mut a, counter)), s(hop, "packet"), "hop {k}");
    }
}
