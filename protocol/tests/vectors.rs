//! The spec test vectors (spec §14, `spec/vectors/*.json`) are reproduced byte for byte, and
//! checked against an implementation that is not ours.
//!
//! Each vector is replayed twice:
//! - through [`Connection`], from the recorded inputs only (keys, ephemerals, psk, indices,
//!   times and the application's actions): every packet must come out identical;
//! - through snow alone and the spec's rules: the handshake bodies, the handshake hash and
//!   the transport keys come from snow's `HandshakeState`, each transport packet is opened
//!   with snow's cipher under `REKEY^epoch(k)` and the full counter as nonce, and headers and
//!   message framing are rebuilt from the spec's tables. This is what shows that Veil's
//!   transport layer is real Noise.
//!
//! Regenerate the files with
//! `cargo run -p veil-protocol --example gen_vectors --features dangerous-testing`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::Bytes;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use serde_json::Value;
use snow::resolvers::CryptoResolver;
use veil_protocol::message::Message;
use veil_protocol::payload::HandshakePayload;
use veil_protocol::{
    wire, CloseReason, Config, Connection, Decision, Event, Mode, Pattern, Psk, PublicKey, Role, StaticKeypair, Suite,
    Timestamp,
};

const I2R: &str = "initiator_to_responder";
const R2I: &str = "responder_to_initiator";

fn load(name: &str) -> Value {
    let path = format!("{}/../spec/vectors/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn vectors(file: &Value) -> &[Value] {
    file["vectors"].as_array().expect("a `vectors` array")
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_else(|| panic!("string field `{key}` in {v}"))
}

fn n(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("integer field `{key}` in {v}"))
}

fn b(v: &Value, key: &str) -> bool {
    v[key].as_bool().unwrap_or_else(|| panic!("boolean field `{key}` in {v}"))
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

fn pattern_of(v: &Value) -> Pattern {
    let name = s(v, "pattern");
    Pattern::ALL.into_iter().find(|p| p.noise_name() == name).unwrap_or_else(|| panic!("pattern {name}"))
}

fn suite_of(v: &Value) -> Suite {
    let name = s(v, "suite");
    Suite::ALL.into_iter().find(|x| x.noise_name() == name).unwrap_or_else(|| panic!("suite {name}"))
}

fn mode_of(v: &Value) -> Mode {
    match s(v, "mode") {
        "stream" => Mode::Stream,
        "datagram" => Mode::Datagram,
        "routed" => Mode::Routed,
        m => panic!("mode {m}"),
    }
}

// ---------------------------------------------------------------------------------------
// The spec's tables, written out independently of the crate (spec §4.2, §4.3, §5.2).

const fn spec_pattern_code(p: Pattern) -> u8 {
    match p {
        Pattern::IK => 1,
        Pattern::XX => 2,
        Pattern::KK => 3,
        Pattern::IKpsk2 => 4,
        Pattern::XXpsk3 => 5,
        _ => panic!("a pattern the vectors do not know"),
    }
}

const fn spec_suite_code(s: Suite) -> u8 {
    match s {
        Suite::ChaChaPolyBlake2s => 1,
        Suite::AesGcmSha256 => 2,
        _ => panic!("a suite the vectors do not know"),
    }
}

const fn spec_mode_code(m: Mode) -> u8 {
    match m {
        Mode::Stream => 1,
        Mode::Datagram => 2,
        Mode::Routed => 3,
        _ => panic!("a mode the vectors do not know"),
    }
}

/// The expected header of the k-th handshake packet (spec §4.2).
fn spec_handshake_header(k: usize, mode: Mode, pattern: Pattern, suite: Suite, i_idx: u32, r_idx: u32) -> Vec<u8> {
    // Routed mode (spec §16.2) has the datagram handshake layouts.
    let dgram = mode != Mode::Stream;
    let mut h = match k {
        0 => vec![0x01, 0x01, (spec_pattern_code(pattern) << 4) | spec_suite_code(suite)],
        1 => vec![0x02],
        _ => vec![0x03],
    };
    if dgram {
        match k {
            0 => h.extend_from_slice(&i_idx.to_be_bytes()),
            1 => {
                h.extend_from_slice(&i_idx.to_be_bytes());
                h.extend_from_slice(&r_idx.to_be_bytes());
            }
            _ => h.extend_from_slice(&r_idx.to_be_bytes()),
        }
    }
    h
}

/// The expected transport header (spec §4.2, §6.2; generation 0 in the vectors).
fn spec_transport_header(mode: Mode, receiver_index: u32, counter: u64, epoch_advance: bool) -> Vec<u8> {
    match mode {
        Mode::Stream => vec![if epoch_advance { 0x12 } else { 0x10 }],
        // spec §16.2: type and counter, no index.
        Mode::Routed => {
            let mut h = vec![0x10];
            h.extend_from_slice(&(counter as u32 & 0x00ff_ffff).to_be_bytes()[1..]);
            h
        }
        _ => {
            let mut h = vec![0x10];
            h.extend_from_slice(&receiver_index.to_be_bytes());
            h.extend_from_slice(&(counter as u32 & 0x00ff_ffff).to_be_bytes()[1..]);
            h
        }
    }
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// The plaintext framing of spec §9.1/§9.2: kind byte, then LEB128 varints and
/// length-prefixed bytes (postcard).
fn spec_plaintext(messages: &[Value]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in messages {
        match s(m, "kind") {
            "Data" => {
                out.push(0x01);
                varint(n(m, "channel"), &mut out);
                varint(n(m, "id"), &mut out);
                let p = bytes(m, "payload");
                varint(p.len() as u64, &mut out);
                out.extend_from_slice(&p);
            }
            "Ping" => {
                out.push(0x03);
                varint(n(m, "id"), &mut out);
            }
            "Pong" => {
                out.push(0x04);
                varint(n(m, "id"), &mut out);
            }
            "Close" => {
                out.push(0x05);
                varint(n(m, "reason"), &mut out);
            }
            k => panic!("message kind {k}"),
        }
    }
    out
}

/// spec §5.3: the payload every vector's handshake messages carry (version 1, nothing else).
const MIN_PAYLOAD: [u8; 4] = [0x01, 0x00, 0x00, 0x00];

fn x25519_public(secret: [u8; 32]) -> [u8; 32] {
    x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(secret)).to_bytes()
}

/// Common checks of a vector's inputs: public keys and the prologue (spec §5.2).
fn check_inputs(v: &Value) {
    let (pattern, suite, mode) = (pattern_of(v), suite_of(v), mode_of(v));
    assert_eq!(s(v, "noise_protocol"), format!("Noise_{}_{}", pattern.noise_name(), suite.noise_name()));
    for side in ["initiator", "responder"] {
        let p = &v[side];
        assert_eq!(x25519_public(key32(p, "static_secret")), key32(p, "static_public"), "{side} static");
        assert_eq!(x25519_public(key32(p, "ephemeral_secret")), key32(p, "ephemeral_public"), "{side} ephemeral");
    }
    let mut prologue = b"Veil-v1".to_vec();
    prologue.push(spec_mode_code(mode));
    prologue.extend(spec_handshake_header(0, mode, pattern, suite, idx(v, "initiator"), idx(v, "responder")));
    assert_eq!(bytes(v, "prologue"), prologue, "prologue");
    let needs_psk = matches!(pattern, Pattern::IKpsk2 | Pattern::XXpsk3);
    assert_eq!(v["psk"].is_string(), needs_psk, "psk present iff the pattern has one");
}

fn idx(v: &Value, side: &str) -> u32 {
    u32::try_from(n(&v[side], "index")).unwrap()
}

// ---------------------------------------------------------------------------------------
// snow alone.

struct NoRandomness;

impl snow::types::Random for NoRandomness {
    fn try_fill_bytes(&mut self, _: &mut [u8]) -> Result<(), snow::Error> {
        // With fixed ephemeral keys a handshake must not need any randomness.
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

struct SnowResult {
    hash: Vec<u8>,
    k1: [u8; 32],
    k2: [u8; 32],
}

/// Runs the vector's handshake in snow from its inputs. With `recorded` (the bodies of the
/// recorded packets, without Veil's headers), every message snow writes must equal the
/// recorded one, and is read from the recorded bytes.
fn snow_handshake(v: &Value, recorded: Option<&[Vec<u8>]>) -> SnowResult {
    let pattern = pattern_of(v);
    let params: snow::params::NoiseParams = s(v, "noise_protocol").parse().unwrap();
    let prologue = bytes(v, "prologue");
    let psk = v["psk"].as_str().map(|_| key32(v, "psk"));
    let build = |initiator: bool| {
        let (me, peer) =
            if initiator { (&v["initiator"], &v["responder"]) } else { (&v["responder"], &v["initiator"]) };
        let secret = key32(me, "static_secret");
        let eph = key32(me, "ephemeral_secret");
        let peer_pub = key32(peer, "static_public");
        let mut bld = snow::Builder::with_resolver(params.clone(), Box::new(SnowOnly))
            .prologue(&prologue)
            .unwrap()
            .local_private_key(&secret)
            .unwrap()
            .fixed_ephemeral_key_for_testing_only(&eph);
        let knows_peer = match pattern {
            Pattern::IK | Pattern::IKpsk2 => initiator,
            Pattern::KK => true,
            _ => false,
        };
        if knows_peer {
            bld = bld.remote_public_key(&peer_pub).unwrap();
        }
        if let Some(psk) = &psk {
            let pos = if pattern == Pattern::IKpsk2 { 2 } else { 3 };
            bld = bld.psk(pos, psk).unwrap();
        }
        if initiator {
            bld.build_initiator().unwrap()
        } else {
            bld.build_responder().unwrap()
        }
    };
    let mut i = build(true);
    let mut r = build(false);
    let mut out = vec![0u8; 2048];
    let mut read = vec![0u8; 2048];
    let count = if matches!(pattern, Pattern::XX | Pattern::XXpsk3) { 3 } else { 2 };
    if let Some(rec) = recorded {
        assert_eq!(rec.len(), count, "handshake message count");
    }
    for k in 0..count {
        let (w, rd) = if k % 2 == 0 { (&mut i, &mut r) } else { (&mut r, &mut i) };
        let len = w.write_message(&MIN_PAYLOAD, &mut out).unwrap();
        let body = match recorded {
            Some(rec) => {
                assert_eq!(hex::encode(&out[..len]), hex::encode(&rec[k]), "handshake message {k}: snow's bytes");
                rec[k].clone()
            }
            None => out[..len].to_vec(),
        };
        let m = rd.read_message(&body, &mut read).expect("snow reads the message");
        assert_eq!(&read[..m], &MIN_PAYLOAD);
    }
    assert!(i.is_handshake_finished() && r.is_handshake_finished());
    assert_eq!(i.get_handshake_hash(), r.get_handshake_hash());
    let hash = i.get_handshake_hash().to_vec();
    let (k1, k2) = i.dangerously_get_raw_split();
    assert_eq!(r.dangerously_get_raw_split(), (k1, k2));
    SnowResult { hash, k1, k2 }
}

/// Checks one transport packet against snow's keys and the spec's framing; returns its
/// counter.
fn check_transport_packet(v: &Value, keys: &SnowResult, p: &Value) -> u64 {
    let (suite, mode) = (suite_of(v), mode_of(v));
    let packet = bytes(p, "packet");
    let counter = n(p, "counter");
    let epoch = counter >> 20;
    assert_eq!(n(p, "epoch"), epoch);
    assert_eq!(n(p, "length"), packet.len() as u64);
    let advance = b(p, "epoch_advance");
    if advance {
        assert_eq!(mode, Mode::Stream, "the epoch-advance flag exists in stream mode only");
        assert_eq!(counter & 0xf_ffff, 0, "an epoch advance starts an epoch");
    }
    let (key, receiver) = match s(p, "direction") {
        I2R => (&keys.k1, idx(v, "responder")),
        R2I => (&keys.k2, idx(v, "initiator")),
        d => panic!("direction {d}"),
    };
    let header = spec_transport_header(mode, receiver, counter, advance);
    assert_eq!(hex::encode(&packet[..header.len()]), hex::encode(&header), "transport header");
    let choice = match suite {
        Suite::ChaChaPolyBlake2s => snow::params::CipherChoice::ChaChaPoly,
        _ => snow::params::CipherChoice::AESGCM,
    };
    let mut cipher = snow::resolvers::DefaultResolver.resolve_cipher(&choice).unwrap();
    cipher.set(key);
    for _ in 0..epoch {
        cipher.rekey();
    }
    let mut plain = vec![0u8; packet.len()];
    let len = cipher
        .decrypt(counter, &header, &packet[header.len()..], &mut plain)
        .unwrap_or_else(|_| panic!("snow cannot open packet {counter} {}", s(p, "direction")));
    let messages = list(p, "messages");
    assert_eq!(hex::encode(&plain[..len]), s(p, "plaintext"), "plaintext of packet {counter}");
    assert_eq!(hex::encode(spec_plaintext(messages)), s(p, "plaintext"), "framing of packet {counter}");
    counter
}

// ---------------------------------------------------------------------------------------
// Our Connection, driven from the recorded inputs.

struct Pair {
    i: Connection,
    r: Connection,
    now: Timestamp,
    buf: Vec<u8>,
    wire: Vec<(&'static str, Vec<u8>)>,
    i_events: Vec<Event>,
    r_events: Vec<Event>,
}

impl Pair {
    fn new(v: &Value) -> Self {
        let (pattern, suite, mode) = (pattern_of(v), suite_of(v), mode_of(v));
        // Any RNG will do: with fixed ephemerals no byte may depend on it (the generator
        // used another seed).
        let mut rng = ChaCha20Rng::seed_from_u64(0xdead_beef);
        let i_id = StaticKeypair::from_secret_bytes(key32(&v["initiator"], "static_secret"));
        let r_id = StaticKeypair::from_secret_bytes(key32(&v["responder"], "static_secret"));
        let (i_pub, r_pub) = (*i_id.public(), *r_id.public());
        let psk = v["psk"].as_str().map(|_| key32(v, "psk"));
        let mut ci = Config::new(i_id, mode);
        ci.pattern = pattern;
        ci.suite = suite;
        ci.psk = psk.map(Psk::new);
        let mut cr = Config::new(r_id, mode);
        cr.psk = psk.map(Psk::new);
        let now = Timestamp::from_micros(n(v, "start_time_us"));
        let i_remote: Option<PublicKey> = pattern.initiator_knows_responder().then_some(r_pub);
        let r_remote: Option<PublicKey> = pattern.responder_knows_initiator().then_some(i_pub);
        let i = Connection::new_with_fixed_ephemeral_for_testing_only(
            Arc::new(ci),
            Role::Initiator,
            i_remote,
            now,
            &mut rng,
            key32(&v["initiator"], "ephemeral_secret"),
            idx(v, "initiator"),
        )
        .unwrap();
        let r = Connection::new_with_fixed_ephemeral_for_testing_only(
            Arc::new(cr),
            Role::Responder,
            r_remote,
            now,
            &mut rng,
            key32(&v["responder"], "ephemeral_secret"),
            idx(v, "responder"),
        )
        .unwrap();
        Self { i, r, now, buf: vec![0u8; 65_535], wire: Vec::new(), i_events: Vec::new(), r_events: Vec::new() }
    }

    fn sender(&mut self, dir: &str) -> &mut Connection {
        if dir == I2R {
            &mut self.i
        } else {
            &mut self.r
        }
    }

    fn deliver(&mut self, dir: &str, packet: &[u8]) {
        let now = self.now;
        let (conn, events) =
            if dir == I2R { (&mut self.r, &mut self.r_events) } else { (&mut self.i, &mut self.i_events) };
        conn.handle_input(now, packet).unwrap_or_else(|e| panic!("{dir} packet refused: {e:?}"));
        while let Some(ev) = conn.poll_event() {
            if let Event::AuthorizationRequired { .. } = ev {
                conn.authorize(now, Decision::allow()).unwrap();
            } else {
                events.push(ev);
            }
        }
    }

    /// Each packet is delivered as soon as it is polled; initiator first, until quiet.
    fn pump(&mut self) {
        for _ in 0..16 {
            let mut moved = false;
            for dir in [I2R, R2I] {
                loop {
                    let now = self.now;
                    let mut buf = std::mem::take(&mut self.buf);
                    let got = self.sender(dir).poll_transmit(now, &mut buf).unwrap().map(|n| buf[..n].to_vec());
                    self.buf = buf;
                    let Some(packet) = got else { break };
                    self.deliver(dir, &packet);
                    self.wire.push((dir, packet));
                    moved = true;
                }
            }
            if !moved {
                return;
            }
        }
        panic!("the pair did not settle");
    }

    fn received_events(&self, dir: &str) -> &[Event] {
        if dir == I2R {
            &self.r_events
        } else {
            &self.i_events
        }
    }

    /// Queues what the application did before `p` was sent; returns the messages a receiver
    /// must see (pings are answered, not shown).
    fn queue(&mut self, dir: &str, p: &Value) -> Vec<Value> {
        let now = self.now;
        let mut shown = Vec::new();
        for m in list(p, "messages") {
            let c = self.sender(dir);
            match s(m, "kind") {
                "Data" => {
                    let ch = u16::try_from(n(m, "channel")).unwrap();
                    let id = c.send(ch, Bytes::from(bytes(m, "payload"))).unwrap();
                    assert_eq!(id, n(m, "id"), "message id");
                    shown.push(m.clone());
                }
                "Ping" => c.ping(u32::try_from(n(m, "id")).unwrap()).unwrap(),
                // Queued by the sender itself when it read the ping.
                "Pong" => shown.push(m.clone()),
                "Close" => {
                    c.close(now, CloseReason::from_code(u16::try_from(n(m, "reason")).unwrap()));
                    shown.push(m.clone());
                }
                k => panic!("message kind {k}"),
            }
        }
        shown
    }
}

/// The messages a receiver's events show, in the vectors' JSON form.
fn shown(events: &[Event]) -> Vec<Value> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Message { channel, id, payload } => Some(serde_json::json!({
                "kind": "Data", "channel": channel, "id": id, "payload": hex::encode(payload)
            })),
            Event::Pong { id } => Some(serde_json::json!({ "kind": "Pong", "id": id })),
            Event::Closed(c) if c.by_peer => Some(serde_json::json!({ "kind": "Close", "reason": c.reason.code() })),
            _ => None,
        })
        .collect()
}

fn header_len(ty: u8, mode: Mode) -> usize {
    match (ty, mode) {
        (0x01, Mode::Stream) => 3,
        (0x01, _) => 7,
        (0x02, Mode::Stream) => 1,
        (0x02, _) => 9,
        (_, Mode::Stream) => 1,
        _ => 5,
    }
}

fn all_combinations() -> BTreeSet<(u8, u8, u8)> {
    let mut all = BTreeSet::new();
    for p in Pattern::ALL {
        for s in Suite::ALL {
            for m in [Mode::Stream, Mode::Datagram] {
                all.insert((spec_pattern_code(p), spec_suite_code(s), spec_mode_code(m)));
            }
        }
    }
    all
}

fn combination(v: &Value) -> (u8, u8, u8) {
    (spec_pattern_code(pattern_of(v)), spec_suite_code(suite_of(v)), spec_mode_code(mode_of(v)))
}

// ---------------------------------------------------------------------------------------

#[test]
fn handshake_vectors_cover_every_pattern_suite_and_mode() {
    let file = load("handshakes.json");
    let got: Vec<_> = vectors(&file).iter().map(combination).collect();
    assert_eq!(got.len(), 20);
    assert_eq!(got.into_iter().collect::<BTreeSet<_>>(), all_combinations());
}

/// The handshake vectors of `handshakes.json` and the routed ones of `routing.json` (spec §16.10).
fn handshake_vectors() -> Vec<Value> {
    let mut all = vectors(&load("handshakes.json")).to_vec();
    all.extend(list(&load("routing.json"), "handshakes").iter().cloned());
    all
}

#[test]
fn routed_handshake_vectors_cover_every_pattern_and_suite() {
    let file = load("routing.json");
    let got: BTreeSet<_> = list(&file, "handshakes").iter().map(combination).collect();
    let want: BTreeSet<_> = all_combinations().into_iter().filter(|c| c.2 == 1).map(|(p, s, _)| (p, s, 3)).collect();
    assert_eq!(list(&file, "handshakes").len(), 10);
    assert_eq!(got, want);
}

#[test]
fn handshake_vectors_are_reproduced_byte_for_byte() {
    for v in &handshake_vectors() {
        let name = s(v, "name");
        let mut pair = Pair::new(v);
        // Data the vector shows in the first transport packets was queued before the handshake.
        let transport = list(v, "transport_packets");
        let mut expect_i = Vec::new();
        let mut expect_r = Vec::new();
        for p in transport {
            assert_eq!(s(p, "trigger"), "handshake", "{name}");
            let dir = s(p, "direction");
            let shown = pair.queue(dir, p);
            if dir == I2R {
                expect_r.extend(shown)
            } else {
                expect_i.extend(shown)
            }
        }
        pair.pump();
        let recorded: Vec<(&str, String)> = list(v, "handshake_packets")
            .iter()
            .chain(transport)
            .map(|p| (s(p, "direction"), s(p, "packet").to_owned()))
            .collect();
        let ours: Vec<(&str, String)> = pair.wire.iter().map(|(d, p)| (*d, hex::encode(p))).collect();
        assert_eq!(ours, recorded, "{name}: packets on the wire");
        for p in list(v, "handshake_packets") {
            assert_eq!(n(p, "length"), bytes(p, "packet").len() as u64, "{name}: length");
        }
        for p in transport {
            assert_eq!(n(p, "time_us"), n(v, "start_time_us"), "{name}: sent at the handshake's time");
        }
        let hash = bytes(v, "handshake_hash");
        assert_eq!(pair.i.handshake_hash().map(|h| h.to_vec()), Some(hash.clone()), "{name}: hash");
        assert_eq!(pair.r.handshake_hash().map(|h| h.to_vec()), Some(hash), "{name}: hash");
        assert!(pair.i.is_connected() && pair.r.is_connected(), "{name}");
        assert_eq!(shown(&pair.r_events), expect_r, "{name}: the responder's messages");
        assert_eq!(shown(&pair.i_events), expect_i, "{name}: the initiator's messages");
    }
}

#[test]
fn handshake_vectors_are_noise_as_snow_runs_it() {
    for v in &handshake_vectors() {
        let name = s(v, "name");
        check_inputs(v);
        let (pattern, suite, mode) = (pattern_of(v), suite_of(v), mode_of(v));
        let (i_idx, r_idx) = (idx(v, "initiator"), idx(v, "responder"));
        let mut bodies = Vec::new();
        for (k, p) in list(v, "handshake_packets").iter().enumerate() {
            let packet = bytes(p, "packet");
            let header = spec_handshake_header(k, mode, pattern, suite, i_idx, r_idx);
            assert_eq!(s(p, "direction"), if k % 2 == 0 { I2R } else { R2I }, "{name}");
            assert_eq!(s(p, "packet_type"), ["HANDSHAKE_INIT", "HANDSHAKE_RESP", "HANDSHAKE_FINAL"][k.min(2)]);
            assert_eq!(bytes(p, "header"), header, "{name}: header of message {k}");
            assert_eq!(&packet[..header.len()], &header[..], "{name}: header of message {k}");
            assert_eq!(header.len(), header_len(packet[0], mode));
            assert_eq!(bytes(p, "payload"), MIN_PAYLOAD, "{name}");
            // Every pattern's first two messages start with the sender's ephemeral key.
            if k < 2 {
                let side = if k == 0 { "initiator" } else { "responder" };
                assert_eq!(&packet[header.len()..header.len() + 32], &key32(&v[side], "ephemeral_public"), "{name}");
            }
            bodies.push(packet[header.len()..].to_vec());
        }
        let keys = snow_handshake(v, Some(&bodies));
        assert_eq!(keys.hash, bytes(v, "handshake_hash"), "{name}: snow's handshake hash");
        assert_eq!(keys.k1, key32(&v["transport_keys"], "initiator_to_responder"), "{name}");
        assert_eq!(keys.k2, key32(&v["transport_keys"], "responder_to_initiator"), "{name}");
        let mut seen = BTreeSet::new();
        for p in list(v, "transport_packets") {
            let c = check_transport_packet(v, &keys, p);
            assert!(seen.insert((s(p, "direction"), c)), "{name}: a counter repeats");
        }
        assert!(seen.iter().any(|(d, _)| *d == I2R) && seen.iter().any(|(d, _)| *d == R2I), "{name}: both ways");
    }
}

#[test]
fn transport_vectors_cover_both_suites_and_modes() {
    let file = load("transport.json");
    let got: BTreeSet<_> = vectors(&file).iter().map(|v| (combination(v).1, combination(v).2)).collect();
    assert_eq!(got, [(1, 1), (1, 2), (2, 1), (2, 2)].into_iter().collect());
    let handshakes = load("handshakes.json");
    for v in vectors(&file) {
        // The session is that of a handshake vector: same inputs, same hash and keys.
        let h = vectors(&handshakes)
            .iter()
            .find(|h| s(h, "name") == s(v, "handshake_vector"))
            .unwrap_or_else(|| panic!("{}: no handshake vector {}", s(v, "name"), s(v, "handshake_vector")));
        for key in [
            "pattern",
            "suite",
            "mode",
            "initiator",
            "responder",
            "psk",
            "prologue",
            "handshake_hash",
            "transport_keys",
        ] {
            assert_eq!(h[key], v[key], "{}: {key}", s(v, "name"));
        }
        let packets = list(v, "packets");
        let epochs: BTreeSet<u64> = packets.iter().map(|p| n(p, "epoch")).collect();
        assert!(epochs.len() >= 3, "{}: epochs 0, 1 and 2 appear", s(v, "name"));
        assert!(packets.iter().any(|p| p["set_send_counter"].is_u64()), "a counter jump");
        if mode_of(v) == Mode::Stream {
            assert!(packets.iter().any(|p| b(p, "epoch_advance")), "a time-based epoch advance (flag 0x02)");
        }
    }
}

#[test]
fn transport_vectors_are_reproduced_byte_for_byte() {
    for v in vectors(&load("transport.json")) {
        let name = s(v, "name");
        let mut pair = Pair::new(v);
        pair.pump();
        let hash = bytes(v, "handshake_hash");
        assert_eq!(pair.i.handshake_hash().map(|h| h.to_vec()), Some(hash), "{name}: hash");
        let packets = list(v, "packets");
        let during: Vec<_> = packets.iter().take_while(|p| s(p, "trigger") == "handshake").collect();
        let ours: Vec<_> = pair.wire.iter().filter(|(_, p)| p[0] >= wire::TYPE_TRANSPORT).collect();
        assert_eq!(ours.len(), during.len(), "{name}: transport packets sent as the handshake completed");
        for ((dir, packet), p) in ours.iter().zip(&during) {
            assert_eq!((*dir, hex::encode(packet)), (s(p, "direction"), s(p, "packet").to_owned()), "{name}");
            assert!(list(p, "messages").is_empty());
        }
        for p in &packets[during.len()..] {
            assert_eq!(s(p, "trigger"), "application", "{name}");
            let dir = s(p, "direction");
            let counter = n(p, "counter");
            pair.now = Timestamp::from_micros(n(p, "time_us"));
            if let Some(c) = p["set_send_counter"].as_u64() {
                pair.sender(dir).session_mut().unwrap().set_send_counter_for_testing_only(c);
            }
            let expect = pair.queue(dir, p);
            let now = pair.now;
            let mut buf = std::mem::take(&mut pair.buf);
            let len = pair.sender(dir).poll_transmit(now, &mut buf).unwrap().expect("a packet");
            let packet = buf[..len].to_vec();
            assert_eq!(pair.sender(dir).poll_transmit(now, &mut buf).unwrap(), None, "{name}: one packet");
            pair.buf = buf;
            assert_eq!(hex::encode(&packet), s(p, "packet"), "{name}: packet {dir} {counter}");
            if let Some(session) = pair.sender(dir).session() {
                assert_eq!(session.send_counter(), counter + 1, "{name}: counter");
            }
            if b(p, "received") {
                let before = pair.received_events(dir).len();
                pair.deliver(dir, &packet);
                assert_eq!(shown(&pair.received_events(dir)[before..]), expect, "{name}: delivered {counter}");
            } else {
                // Stream counters are implicit: a receiver that did not skip cannot open it.
                let receiver = if dir == I2R { &mut pair.r } else { &mut pair.i };
                assert!(receiver.handle_input(now, &packet).is_err(), "{name}: packet {counter} was accepted");
            }
        }
    }
}

#[test]
fn transport_vectors_open_with_snow_keys_and_noise_nonces() {
    for v in vectors(&load("transport.json")) {
        let name = s(v, "name");
        check_inputs(v);
        assert_eq!(n(v, "epoch_bits"), 20);
        assert_eq!(n(v, "rekey_after_time_us"), 120_000_000);
        let keys = snow_handshake(v, None);
        assert_eq!(keys.hash, bytes(v, "handshake_hash"), "{name}: snow's handshake hash");
        assert_eq!(keys.k1, key32(&v["transport_keys"], "initiator_to_responder"), "{name}");
        assert_eq!(keys.k2, key32(&v["transport_keys"], "responder_to_initiator"), "{name}");
        let mut last: [Option<(u64, u64)>; 2] = [None, None];
        for p in list(v, "packets") {
            let c = check_transport_packet(v, &keys, p);
            let slot = usize::from(s(p, "direction") == R2I);
            let t = n(p, "time_us");
            if let Some((prev, prev_t)) = last[slot] {
                assert!(c > prev, "{name}: counters only grow");
                let jumped = p["set_send_counter"].as_u64() == Some(c);
                let by_time = t - prev_t >= n(v, "rekey_after_time_us");
                if mode_of(v) == Mode::Stream {
                    // spec §6.2: without the flag a stream counter is the next one.
                    assert!(c == prev + 1 || jumped || b(p, "epoch_advance"), "{name}: counter {c}");
                }
                if c != prev + 1 && !jumped {
                    assert!(by_time && c & 0xf_ffff == 0, "{name}: counter {c} skips without cause");
                }
            } else {
                assert_eq!(c, 0, "{name}: counters start at 0");
            }
            last[slot] = Some((c, t));
        }
    }
}

#[test]
fn malformed_vectors_yield_exactly_the_recorded_error() {
    let file = load("malformed.json");
    let cases = vectors(&file);
    let mut functions = BTreeSet::new();
    let mut kinds = BTreeSet::new();
    for c in cases {
        let what = s(c, "description");
        let mut input = bytes(c, "input");
        if c["pad"].is_object() {
            let pad = &c["pad"];
            let byte = bytes(pad, "byte");
            assert_eq!(byte.len(), 1);
            input.resize(usize::try_from(n(pad, "to_length")).unwrap(), byte[0]);
        }
        let function = s(c, "function");
        let got = match function {
            "wire::parse" => {
                let max = usize::try_from(n(c, "max_packet_len")).unwrap();
                wire::parse(mode_of(c), max, &input).map(|_| ()).map_err(|e| format!("{e:?}"))
            }
            "HandshakePayload::decode" => HandshakePayload::decode(&input).map(|_| ()).map_err(|e| format!("{e:?}")),
            "Message::decode" => {
                if let Some(&k) = input.first() {
                    kinds.insert(k);
                }
                Message::decode(&input).map(|_| ()).map_err(|e| format!("{e:?}"))
            }
            f => panic!("unknown function {f}"),
        };
        assert_eq!(got, Err(s(c, "error").to_owned()), "{function}: {what}");
        functions.insert(function);
    }
    assert_eq!(functions.len(), 3, "every decoder has vectors");
    for k in [0x02, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0c, 0x0d, 0x0e, 0x80] {
        assert!(kinds.contains(&k), "reserved kind {k:#04x} has a vector");
    }
}

/// `cookies.json` (spec §5.7.4): the cookie recomputed from the spec's formula with BLAKE2s
/// directly, the two packets rebuilt from the spec's layouts, and the exchange replayed through
/// the implementation: the endpoint's checker writes the COOKIE_REPLY, the initiator answers
/// with the INIT_COOKIE, and the responder's RESP to it is the plain handshake's RESP.
#[test]
fn cookie_vectors_are_reproduced_byte_for_byte() {
    use blake2::digest::consts::U16;
    use blake2::digest::{KeyInit, Mac};
    use std::net::{IpAddr, SocketAddr};
    use veil_protocol::cookie::{CookieChecker, CookieStatus, Verdict};

    let handshakes = load("handshakes.json");
    let file = load("cookies.json");
    assert!(vectors(&file).len() >= 3);
    let mut families = BTreeSet::new();
    for v in vectors(&file) {
        let name = s(v, "name");
        let secret = key32(v, "secret");
        let source: SocketAddr = s(v, "source").parse().unwrap();
        let init = bytes(v, "init");
        // The address as 16 bytes (IPv4-mapped) and the port, by the spec's words.
        let ip16 = match source.ip() {
            IpAddr::V4(a) => {
                let mut b = [0u8; 16];
                b[10..12].copy_from_slice(&[0xff, 0xff]);
                b[12..].copy_from_slice(&a.octets());
                b
            }
            IpAddr::V6(a) => a.octets(),
        };
        families.insert(source.is_ipv4());
        let mut source_bytes = ip16.to_vec();
        source_bytes.extend_from_slice(&source.port().to_be_bytes());
        assert_eq!(bytes(v, "source_bytes"), source_bytes, "{name}");
        let mut mac_input = b"Veil-v1 cookie".to_vec();
        mac_input.extend_from_slice(&source_bytes);
        mac_input.extend_from_slice(&init);
        assert_eq!(bytes(v, "mac_input"), mac_input, "{name}");
        let mut mac = <blake2::Blake2sMac<U16> as KeyInit>::new_from_slice(&secret).unwrap();
        mac.update(&mac_input);
        let cookie: [u8; 16] = mac.finalize().into_bytes().into();
        assert_eq!(bytes(v, "cookie"), cookie, "{name}");
        let mut reply = vec![0x05];
        reply.extend_from_slice(&init[3..7]);
        reply.extend_from_slice(&cookie);
        assert_eq!(bytes(v, "cookie_reply"), reply, "{name}");
        assert!(reply.len() < init.len(), "{name}: the reply amplifies");
        let mut init_cookie = vec![0x06];
        init_cookie.extend_from_slice(&cookie);
        init_cookie.extend_from_slice(&init);
        assert_eq!(bytes(v, "init_cookie"), init_cookie, "{name}");

        // Through the implementation, from the handshake vector's inputs.
        let hv = vectors(&handshakes)
            .iter()
            .find(|h| s(h, "name") == s(v, "handshake_vector"))
            .unwrap_or_else(|| panic!("{name}: no handshake vector"));
        let packets = list(hv, "handshake_packets");
        assert_eq!(s(&packets[0], "packet"), s(v, "init"), "{name}: the INIT is the handshake vector's");
        assert_eq!(s(&packets[1], "packet"), s(v, "resp"), "{name}: the RESP is the handshake vector's");
        let mut pair = Pair::new(hv);
        let now = Timestamp::from_micros(n(v, "time_us"));
        pair.now = now;
        let poll = |pair: &mut Pair, dir: &str| {
            let mut buf = std::mem::take(&mut pair.buf);
            let n = pair.sender(dir).poll_transmit(now, &mut buf).unwrap().expect("a packet");
            let p = buf[..n].to_vec();
            pair.buf = buf;
            p
        };
        assert_eq!(poll(&mut pair, I2R), init, "{name}");
        let mut endpoint =
            Config::new(StaticKeypair::from_secret_bytes(key32(&hv["responder"], "static_secret")), Mode::Datagram);
        endpoint.psk = hv["psk"].as_str().map(|_| Psk::new(key32(hv, "psk")));
        let mut checker =
            CookieChecker::with_secret_for_testing_only(secret, now, veil_protocol::Duration::from_secs(120));
        let mut out = [0u8; 64];
        let got = checker.verdict(now, &source, &init, true, &endpoint, &mut out);
        assert_eq!(got, Verdict::CookieReply { len: reply.len(), cookie: CookieStatus::Absent }, "{name}");
        assert_eq!(&out[..reply.len()], &reply[..], "{name}");
        pair.deliver(R2I, &reply);
        assert_eq!(poll(&mut pair, I2R), init_cookie, "{name}");
        let got = checker.verdict(now, &source, &init_cookie, true, &endpoint, &mut out);
        assert_eq!(got, Verdict::Proceed { init: &init[..], cookie: CookieStatus::Valid }, "{name}");
        pair.deliver(I2R, &init_cookie);
        assert_eq!(hex::encode(poll(&mut pair, R2I)), s(v, "resp"), "{name}");
    }
    assert_eq!(families.len(), 2, "IPv4 and IPv6 sources both have a vector");
}
