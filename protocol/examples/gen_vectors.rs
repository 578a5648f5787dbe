//! Generates Veil's test vectors (spec §14) into `spec/vectors/`:
//!
//! - `handshakes.json`: every pattern × suite × mode, from fixed static and ephemeral keys,
//!   psk and indices: each handshake packet, the handshake hash, the raw transport keys and
//!   the first transport packet each way;
//! - `transport.json`: a sequence of transport packets per mode and suite, crossing an epoch
//!   boundary by message count and another by time (`REKEY_AFTER_TIME`);
//! - `malformed.json`: inputs to the decoders with the error each must yield;
//! - `cookies.json`, `trust.json`: the cookie challenge and the trust layer (spec §5.7.4, §15);
//! - `routing.json`: routed-mode handshakes, routing messages and a relayed message (spec §16);
//! - `certificate_handshakes.json`: handshakes carrying certificate chains (spec §5.4.1, §15.4);
//! - `delivery.json`: delivery messages and a scripted sender/receiver exchange (spec §17).
//!
//! Everything is derived from fixed inputs (the ephemeral keys come from
//! `Connection::new_with_fixed_ephemeral_for_testing_only`, time from a virtual clock), so
//! two runs write identical files. Before writing, every transport packet is checked
//! against keys derived by snow alone.
//!
//! ```text
//! cargo run -p veil-protocol --example gen_vectors --features dangerous-testing            # write
//! cargo run -p veil-protocol --example gen_vectors --features dangerous-testing -- --check # CI
//! ```
//!
//! The normal mode also drops every packet, plaintext and malformed input into
//! `fuzz/corpus/decode/` as seeds (named by a 64-bit FNV-1a hash of the content).
// A generator: any failure is a bug to stop on, with the message saying where.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use bytes::Bytes;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use serde::Serialize;
use snow::resolvers::CryptoResolver;
use veil_protocol::message::Message;
use veil_protocol::payload::HandshakePayload;
use veil_protocol::wire;
use veil_protocol::{
    CloseReason, Config, Connection, Decision, DecodeError, Duration, Event, Mode, Pattern, Psk, Role, StaticKeypair,
    Suite, Timestamp,
};

#[path = "trust_vectors/mod.rs"]
mod trust_vectors;

#[path = "cookie_vectors/mod.rs"]
mod cookie_vectors;

#[path = "routing_vectors/mod.rs"]
mod routing_vectors;

#[path = "certificate_vectors/mod.rs"]
mod certificate_vectors;

#[path = "delivery_vectors/mod.rs"]
mod delivery_vectors;

/// Fixed inputs of one side.
struct Party {
    static_secret: [u8; 32],
    ephemeral_secret: [u8; 32],
    index: u32,
}

const INITIATOR: Party = Party { static_secret: [0x01; 32], ephemeral_secret: [0x03; 32], index: 0x1122_3344 };
const RESPONDER: Party = Party { static_secret: [0x02; 32], ephemeral_secret: [0x04; 32], index: 0xa1b2_c3d4 };
/// The pre-shared key of the psk patterns.
const PSK: [u8; 32] = [0x05; 32];
/// Seeds the RNG handed to `Connection`; with fixed ephemerals no output depends on it.
const RNG_SEED: u64 = 0x5645_494c;
/// Virtual time of the handshake.
const T0: Timestamp = Timestamp::from_micros(1_000_000);
/// The gap that retires every epoch key by time: just past `REKEY_AFTER_TIME` (120 s).
const TIME_GAP: Duration = Duration::from_secs(121);

const I2R: &str = "initiator_to_responder";
const R2I: &str = "responder_to_initiator";
const GENERATOR: &str = "cargo run -p veil-protocol --example gen_vectors --features dangerous-testing";

// ---------------------------------------------------------------------------------------
// JSON layout (field order is declaration order, so the files are stable).

#[derive(Serialize)]
struct VectorFile<T> {
    description: &'static str,
    spec: &'static str,
    generator: &'static str,
    vectors: Vec<T>,
}

#[derive(Serialize)]
struct PartyJson {
    static_secret: String,
    static_public: String,
    ephemeral_secret: String,
    ephemeral_public: String,
    index: u32,
}

#[derive(Serialize)]
struct TransportKeys {
    initiator_to_responder: String,
    responder_to_initiator: String,
}

#[derive(Serialize)]
struct HandshakePacket {
    direction: &'static str,
    packet_type: &'static str,
    length: usize,
    header: String,
    payload: String,
    packet: String,
}

#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "kind")]
enum MessageJson {
    Data { channel: u16, id: u64, payload: String },
    Ping { id: u32 },
    Pong { id: u32 },
    Close { reason: u16 },
}

#[derive(Serialize)]
struct TransportPacket {
    direction: &'static str,
    /// What made the sender emit it: `handshake` (sent as the handshake completes) or
    /// `application` (the messages were queued, then one packet polled).
    trigger: &'static str,
    time_us: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    set_send_counter: Option<u64>,
    counter: u64,
    epoch: u64,
    epoch_advance: bool,
    messages: Vec<MessageJson>,
    plaintext: String,
    length: usize,
    packet: String,
    received: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<&'static str>,
}

#[derive(Serialize)]
struct HandshakeVector {
    name: String,
    pattern: &'static str,
    suite: &'static str,
    mode: &'static str,
    noise_protocol: String,
    initiator: PartyJson,
    responder: PartyJson,
    psk: Option<String>,
    start_time_us: u64,
    prologue: String,
    handshake_packets: Vec<HandshakePacket>,
    handshake_hash: String,
    transport_keys: TransportKeys,
    transport_packets: Vec<TransportPacket>,
}

#[derive(Serialize)]
struct TransportVector {
    name: String,
    /// The vector of `handshakes.json` with the same inputs (its session is this one's).
    handshake_vector: String,
    pattern: &'static str,
    suite: &'static str,
    mode: &'static str,
    noise_protocol: String,
    initiator: PartyJson,
    responder: PartyJson,
    psk: Option<String>,
    start_time_us: u64,
    prologue: String,
    rekey_after_time_us: u64,
    epoch_bits: u32,
    handshake_hash: String,
    transport_keys: TransportKeys,
    packets: Vec<TransportPacket>,
}

#[derive(Serialize)]
struct Pad {
    byte: String,
    to_length: usize,
}

#[derive(Serialize)]
struct MalformedCase {
    function: &'static str,
    description: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    mode: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_packet_len: Option<usize>,
    input: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pad: Option<Pad>,
    error: String,
}

// ---------------------------------------------------------------------------------------
// Names.

const fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Stream => "stream",
        Mode::Routed => "routed",
        _ => "datagram",
    }
}

fn pattern_name(p: Pattern) -> &'static str {
    p.noise_name()
}

fn suite_name(s: Suite) -> &'static str {
    match s {
        Suite::ChaChaPolyBlake2s => "ChaChaPoly_BLAKE2s",
        _ => "AESGCM_SHA256",
    }
}

fn vector_name(p: Pattern, s: Suite, m: Mode) -> String {
    format!("{}_{}_{}", pattern_name(p), suite_name(s), mode_name(m))
}

fn noise_protocol(p: Pattern, s: Suite) -> String {
    format!("Noise_{}_{}", p.noise_name(), s.noise_name())
}

const fn needs_psk(p: Pattern) -> bool {
    matches!(p, Pattern::IKpsk2 | Pattern::XXpsk3)
}

fn public_of(secret: [u8; 32]) -> [u8; 32] {
    *StaticKeypair::from_secret_bytes(secret).public().as_bytes()
}

fn party_json(p: &Party) -> PartyJson {
    PartyJson {
        static_secret: hex::encode(p.static_secret),
        static_public: hex::encode(public_of(p.static_secret)),
        ephemeral_secret: hex::encode(p.ephemeral_secret),
        ephemeral_public: hex::encode(public_of(p.ephemeral_secret)),
        index: p.index,
    }
}

// ---------------------------------------------------------------------------------------
// Driving two connections on a virtual clock.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Dir {
    I2R,
    R2I,
}

impl Dir {
    const fn name(self) -> &'static str {
        match self {
            Self::I2R => I2R,
            Self::R2I => R2I,
        }
    }
}

/// What the application asks of the sender before one packet is polled.
#[derive(Clone, Debug)]
enum Act {
    Data(u16, &'static [u8]),
    Ping(u32),
    /// The receiver answers a ping by itself: nothing to queue.
    ExpectPong(u32),
    Close(CloseReason),
}

struct Pair {
    i: Connection,
    r: Connection,
    now: Timestamp,
    buf: Vec<u8>,
    /// Every packet put on the wire, in order.
    wire: Vec<(Dir, Vec<u8>)>,
    i_events: Vec<Event>,
    r_events: Vec<Event>,
}

impl Pair {
    fn new(pattern: Pattern, suite: Suite, mode: Mode) -> Self {
        let mut rng = ChaCha20Rng::seed_from_u64(RNG_SEED);
        let i_id = StaticKeypair::from_secret_bytes(INITIATOR.static_secret);
        let r_id = StaticKeypair::from_secret_bytes(RESPONDER.static_secret);
        let (i_pub, r_pub) = (*i_id.public(), *r_id.public());
        let psk = needs_psk(pattern).then_some(PSK);
        let mut ci = Config::new(i_id, mode);
        ci.pattern = pattern;
        ci.suite = suite;
        ci.psk = psk.map(Psk::new);
        let mut cr = Config::new(r_id, mode);
        cr.psk = psk.map(Psk::new);
        let i = Connection::new_with_fixed_ephemeral_for_testing_only(
            Arc::new(ci),
            Role::Initiator,
            pattern.initiator_knows_responder().then_some(r_pub),
            T0,
            &mut rng,
            INITIATOR.ephemeral_secret,
            INITIATOR.index,
        )
        .expect("initiator");
        let r = Connection::new_with_fixed_ephemeral_for_testing_only(
            Arc::new(cr),
            Role::Responder,
            pattern.responder_knows_initiator().then_some(i_pub),
            T0,
            &mut rng,
            RESPONDER.ephemeral_secret,
            RESPONDER.index,
        )
        .expect("responder");
        Self { i, r, now: T0, buf: vec![0u8; 65_535], wire: Vec::new(), i_events: Vec::new(), r_events: Vec::new() }
    }

    fn sender(&mut self, d: Dir) -> &mut Connection {
        match d {
            Dir::I2R => &mut self.i,
            Dir::R2I => &mut self.r,
        }
    }

    /// Hands `packet` to the receiving side, answers authorization requests with "allow"
    /// and keeps every other event.
    fn deliver(&mut self, d: Dir, packet: &[u8]) {
        let now = self.now;
        let (conn, events) = match d {
            Dir::I2R => (&mut self.r, &mut self.r_events),
            Dir::R2I => (&mut self.i, &mut self.i_events),
        };
        conn.handle_input(now, packet).unwrap_or_else(|e| panic!("{d:?} packet refused: {e:?}"));
        while let Some(ev) = conn.poll_event() {
            if let Event::AuthorizationRequired { .. } = ev {
                conn.authorize(now, Decision::allow()).expect("authorize");
            } else {
                events.push(ev);
            }
        }
    }

    /// Moves packets both ways, each delivered as soon as it is polled, until quiet.
    fn pump(&mut self) {
        for _ in 0..16 {
            let mut moved = false;
            for d in [Dir::I2R, Dir::R2I] {
                loop {
                    let now = self.now;
                    let mut buf = core::mem::take(&mut self.buf);
                    let n = self.sender(d).poll_transmit(now, &mut buf).expect("poll_transmit");
                    let packet = n.map(|n| buf[..n].to_vec());
                    self.buf = buf;
                    let Some(packet) = packet else { break };
                    self.deliver(d, &packet);
                    self.wire.push((d, packet));
                    moved = true;
                }
            }
            if !moved {
                return;
            }
        }
        panic!("the pair did not settle");
    }

    /// Queues `acts` on one side, polls exactly one packet, and delivers it if `deliver`.
    /// `acts` are listed in packet order: pings and pongs travel ahead of data (spec §6.4).
    fn step(&mut self, d: Dir, acts: &[Act], deliver: bool) -> (Vec<u8>, Vec<MessageJson>) {
        let now = self.now;
        let mut msgs = Vec::new();
        for a in acts {
            let c = self.sender(d);
            match *a {
                Act::Data(channel, payload) => {
                    let id = c.send(channel, Bytes::from_static(payload)).expect("send");
                    msgs.push(MessageJson::Data { channel, id, payload: hex::encode(payload) });
                }
                Act::Ping(id) => {
                    c.ping(id).expect("ping");
                    msgs.push(MessageJson::Ping { id });
                }
                Act::ExpectPong(id) => msgs.push(MessageJson::Pong { id }),
                Act::Close(reason) => {
                    c.close(now, reason);
                    msgs.push(MessageJson::Close { reason: reason.code() });
                }
            }
        }
        let mut buf = core::mem::take(&mut self.buf);
        let n = self.sender(d).poll_transmit(now, &mut buf).expect("poll_transmit").expect("a packet");
        let packet = buf[..n].to_vec();
        assert_eq!(self.sender(d).poll_transmit(now, &mut buf).expect("poll_transmit"), None, "one packet per step");
        self.buf = buf;
        if deliver {
            let before = self.received_events(d).len();
            self.deliver(d, &packet);
            let got = delivered(&self.received_events(d)[before..]);
            let expected: Vec<_> = msgs.iter().filter(|m| !matches!(m, MessageJson::Ping { .. })).cloned().collect();
            assert_eq!(got, expected, "{d:?}: the receiver saw other messages");
        }
        self.wire.push((d, packet.clone()));
        (packet, msgs)
    }

    /// Events of the side that receives packets travelling in direction `d`.
    fn received_events(&self, d: Dir) -> &[Event] {
        match d {
            Dir::I2R => &self.r_events,
            Dir::R2I => &self.i_events,
        }
    }
}

/// The messages a receiver's events show (a ping shows nothing: it is answered).
fn delivered(events: &[Event]) -> Vec<MessageJson> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Message { channel, id, payload } => {
                Some(MessageJson::Data { channel: *channel, id: *id, payload: hex::encode(payload) })
            }
            Event::Pong { id } => Some(MessageJson::Pong { id: *id }),
            Event::Closed(c) if c.by_peer => Some(MessageJson::Close { reason: c.reason.code() }),
            _ => None,
        })
        .collect()
}

/// The plaintext a packet carrying `msgs` must hold (spec §9.1).
fn plaintext_of(msgs: &[MessageJson]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in msgs {
        let payload;
        let msg = match m {
            MessageJson::Data { channel, id, payload: p } => {
                payload = hex::decode(p).unwrap();
                Message::Data { channel: *channel, id: *id, payload: &payload }
            }
            MessageJson::Ping { id } => Message::Ping { id: *id },
            MessageJson::Pong { id } => Message::Pong { id: *id },
            MessageJson::Close { reason } => Message::Close { reason: CloseReason::from_code(*reason) },
        };
        let mut buf = vec![0u8; msg.encoded_len()];
        let n = msg.encode(&mut buf).unwrap();
        out.extend_from_slice(&buf[..n]);
    }
    out
}

// ---------------------------------------------------------------------------------------
// The snow mirror: the same handshake run by snow alone, for the transport keys and to
// check every packet before it is written.

struct NoRandomness;

impl snow::types::Random for NoRandomness {
    fn try_fill_bytes(&mut self, _: &mut [u8]) -> Result<(), snow::Error> {
        // With fixed ephemeral keys nothing in a handshake may be random.
        Err(snow::Error::Rng)
    }
}

struct MirrorResolver;

impl CryptoResolver for MirrorResolver {
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

struct Mirror {
    hash: [u8; 32],
    k1: [u8; 32],
    k2: [u8; 32],
}

/// Runs the handshake with snow alone from the fixed inputs and `prologue`; every message
/// carries Veil's minimal payload. Checks each body against the recorded packets.
fn mirror(pattern: Pattern, suite: Suite, prologue: &[u8], bodies: &[Vec<u8>]) -> Mirror {
    mirror_parties(pattern, suite, prologue, bodies, &INITIATOR, &RESPONDER)
}

/// [`mirror`] between any two parties.
fn mirror_parties(
    pattern: Pattern,
    suite: Suite,
    prologue: &[u8],
    bodies: &[Vec<u8>],
    initiator: &Party,
    responder: &Party,
) -> Mirror {
    let params: snow::params::NoiseParams = noise_protocol(pattern, suite).parse().unwrap();
    let build = |me: &Party, peer: &Party, initiator: bool| {
        let mut b = snow::Builder::with_resolver(params.clone(), Box::new(MirrorResolver))
            .prologue(prologue)
            .unwrap()
            .local_private_key(&me.static_secret)
            .unwrap()
            .fixed_ephemeral_key_for_testing_only(&me.ephemeral_secret);
        let knows_peer =
            if initiator { pattern.initiator_knows_responder() } else { pattern.responder_knows_initiator() };
        let peer_public = public_of(peer.static_secret);
        if knows_peer {
            b = b.remote_public_key(&peer_public).unwrap();
        }
        if let Some(pos) = pattern.psk_position() {
            b = b.psk(pos, &PSK).unwrap();
        }
        if initiator {
            b.build_initiator().unwrap()
        } else {
            b.build_responder().unwrap()
        }
    };
    let mut i = build(initiator, responder, true);
    let mut r = build(responder, initiator, false);
    let payload = min_payload();
    let mut out = vec![0u8; 1024];
    let mut read = vec![0u8; 1024];
    assert_eq!(bodies.len(), pattern.message_count());
    for (k, body) in bodies.iter().enumerate() {
        let (w, rd) = if k % 2 == 0 { (&mut i, &mut r) } else { (&mut r, &mut i) };
        let n = w.write_message(&payload, &mut out).unwrap();
        assert_eq!(&out[..n], &body[..], "handshake message {k}: snow wrote other bytes");
        let m = rd.read_message(body, &mut read).unwrap();
        assert_eq!(&read[..m], &payload[..]);
    }
    assert!(i.is_handshake_finished() && r.is_handshake_finished());
    let hash: [u8; 32] = i.get_handshake_hash().try_into().unwrap();
    assert_eq!(i.get_handshake_hash(), r.get_handshake_hash());
    let (k1, k2) = i.dangerously_get_raw_split();
    Mirror { hash, k1, k2 }
}

/// Veil's handshake payload as every vector sends it (spec §5.3: version 1, nothing else).
fn min_payload() -> Vec<u8> {
    let mut buf = [0u8; 64];
    let n = HandshakePayload::default().encode(&mut buf).unwrap();
    buf[..n].to_vec()
}

/// Opens a transport packet with snow's cipher: key `REKEY^epoch(k)`, nonce = the full
/// counter, associated data = the header (spec §6.1, §6.2).
fn snow_open(suite: Suite, mode: Mode, key: &[u8; 32], counter: u64, packet: &[u8]) -> Vec<u8> {
    let choice = match suite {
        Suite::ChaChaPolyBlake2s => snow::params::CipherChoice::ChaChaPoly,
        _ => snow::params::CipherChoice::AESGCM,
    };
    let mut c = snow::resolvers::DefaultResolver.resolve_cipher(&choice).unwrap();
    c.set(key);
    for _ in 0..counter >> 20 {
        c.rekey();
    }
    let hlen = wire::transport_header_len(mode);
    let mut out = vec![0u8; packet.len()];
    let n = c.decrypt(counter, &packet[..hlen], &packet[hlen..], &mut out).expect("snow cannot open the packet");
    out.truncate(n);
    out
}

/// The snow-derived keys of one session, to check packets before they are written.
struct Keys<'a> {
    suite: Suite,
    mode: Mode,
    m: &'a Mirror,
}

impl Keys<'_> {
    /// Opens `packet` with snow's keys and describes it.
    fn packet(
        &self,
        d: Dir,
        trigger: &'static str,
        time: Timestamp,
        counter: u64,
        (packet, messages): (Vec<u8>, Vec<MessageJson>),
        received: bool,
    ) -> TransportPacket {
        let key = if d == Dir::I2R { &self.m.k1 } else { &self.m.k2 };
        let plaintext = plaintext_of(&messages);
        assert_eq!(snow_open(self.suite, self.mode, key, counter, &packet), plaintext, "{d:?} counter {counter}");
        TransportPacket {
            direction: d.name(),
            trigger,
            time_us: time.as_micros(),
            set_send_counter: None,
            counter,
            epoch: counter >> 20,
            epoch_advance: self.mode == Mode::Stream && packet[0] & wire::FLAG_EPOCH_ADVANCE != 0,
            messages,
            plaintext: hex::encode(&plaintext),
            length: packet.len(),
            packet: hex::encode(&packet),
            received,
            note: None,
        }
    }
}

const fn header_len(ty: u8, mode: Mode) -> usize {
    match (ty, mode) {
        (wire::TYPE_HANDSHAKE_INIT, Mode::Stream) => 3,
        (wire::TYPE_HANDSHAKE_INIT, _) => 7,
        (wire::TYPE_HANDSHAKE_RESP, Mode::Stream) => 1,
        (wire::TYPE_HANDSHAKE_RESP, _) => 9,
        (_, Mode::Stream) => 1,
        _ => 5,
    }
}

const fn type_name(ty: u8) -> &'static str {
    match ty {
        wire::TYPE_HANDSHAKE_INIT => "HANDSHAKE_INIT",
        wire::TYPE_HANDSHAKE_RESP => "HANDSHAKE_RESP",
        _ => "HANDSHAKE_FINAL",
    }
}

fn prologue(mode: Mode, init: &[u8]) -> Vec<u8> {
    let mut p = b"Veil-v1".to_vec();
    p.push(mode.code());
    p.extend_from_slice(&init[..header_len(wire::TYPE_HANDSHAKE_INIT, mode)]);
    p
}

/// The transport packets sent while the handshake was pumped, with the next counter of
/// each direction (i→r, r→i). `queued[k]` was queued on that side before the handshake and
/// rides in its first packet; any other packet is empty.
fn handshake_transport(
    pair: &Pair,
    keys: &Keys<'_>,
    queued: [Option<MessageJson>; 2],
) -> (Vec<TransportPacket>, [u64; 2]) {
    let mut next = [0u64; 2];
    let mut out = Vec::new();
    for (d, p) in pair.wire.iter().filter(|(_, p)| p[0] >= wire::TYPE_TRANSPORT) {
        let slot = usize::from(*d == Dir::R2I);
        let msgs = if next[slot] == 0 { queued[slot].iter().cloned().collect() } else { vec![] };
        out.push(keys.packet(*d, "handshake", T0, next[slot], (p.clone(), msgs), true));
        next[slot] += 1;
    }
    (out, next)
}

/// Splits the wire log into handshake packets and the rest.
fn handshake_part(wire_log: &[(Dir, Vec<u8>)]) -> Vec<(Dir, Vec<u8>)> {
    wire_log.iter().filter(|(_, p)| p[0] < wire::TYPE_TRANSPORT).cloned().collect()
}

// ---------------------------------------------------------------------------------------
// The three files.

const FIRST_I: &[u8] = b"first data from the initiator";
const FIRST_R: &[u8] = b"first data from the responder";

fn handshake_vector(pattern: Pattern, suite: Suite, mode: Mode) -> HandshakeVector {
    let mut pair = Pair::new(pattern, suite, mode);
    // Data queued before the handshake leaves with each side's first transport packet.
    pair.i.send(1, Bytes::from_static(FIRST_I)).unwrap();
    pair.r.send(2, Bytes::from_static(FIRST_R)).unwrap();
    pair.pump();
    assert!(pair.i.is_connected() && pair.r.is_connected(), "{pattern:?} {suite:?} {mode:?}");
    let hash = *pair.i.handshake_hash().unwrap();
    assert_eq!(Some(&hash), pair.r.handshake_hash());
    let hs = handshake_part(&pair.wire);
    let pro = prologue(mode, &hs[0].1);
    let bodies: Vec<Vec<u8>> = hs.iter().map(|(_, p)| p[header_len(p[0], mode)..].to_vec()).collect();
    let m = mirror(pattern, suite, &pro, &bodies);
    assert_eq!(m.hash, hash, "snow's handshake hash differs");
    let keys = Keys { suite, mode, m: &m };
    let payload = min_payload();
    let handshake_packets = hs
        .iter()
        .map(|(d, p)| HandshakePacket {
            direction: d.name(),
            packet_type: type_name(p[0]),
            length: p.len(),
            header: hex::encode(&p[..header_len(p[0], mode)]),
            payload: hex::encode(&payload),
            packet: hex::encode(p),
        })
        .collect();
    let first_i = MessageJson::Data { channel: 1, id: 0, payload: hex::encode(FIRST_I) };
    let first_r = MessageJson::Data { channel: 2, id: 0, payload: hex::encode(FIRST_R) };
    let (transport_packets, _) = handshake_transport(&pair, &keys, [Some(first_i.clone()), Some(first_r.clone())]);
    assert_eq!(delivered(&pair.r_events), vec![first_i]);
    assert_eq!(delivered(&pair.i_events), vec![first_r]);
    HandshakeVector {
        name: vector_name(pattern, suite, mode),
        pattern: pattern_name(pattern),
        suite: suite.noise_name(),
        mode: mode_name(mode),
        noise_protocol: noise_protocol(pattern, suite),
        initiator: party_json(&INITIATOR),
        responder: party_json(&RESPONDER),
        psk: needs_psk(pattern).then(|| hex::encode(PSK)),
        start_time_us: T0.as_micros(),
        prologue: hex::encode(&pro),
        handshake_packets,
        handshake_hash: hex::encode(hash),
        transport_keys: TransportKeys {
            initiator_to_responder: hex::encode(m.k1),
            responder_to_initiator: hex::encode(m.k2),
        },
        transport_packets,
    }
}

const NOTE_STREAM_SKIP: &str =
    "stream receivers never skip counters: only the keys (not a Connection) can open this packet";

fn transport_vector(suite: Suite, mode: Mode) -> TransportVector {
    let pattern = Pattern::IK;
    let mut pair = Pair::new(pattern, suite, mode);
    pair.pump();
    let hs = handshake_part(&pair.wire);
    let pro = prologue(mode, &hs[0].1);
    let bodies: Vec<Vec<u8>> = hs.iter().map(|(_, p)| p[header_len(p[0], mode)..].to_vec()).collect();
    let m = mirror(pattern, suite, &pro, &bodies);
    assert_eq!(Some(&m.hash), pair.i.handshake_hash(), "snow's handshake hash differs");
    let keys = Keys { suite, mode, m: &m };
    let mut packets = Vec::new();

    // The IK initiator confirms the session with a packet as soon as it read RESP (and a
    // datagram responder may answer it at once, spec §5.7).
    let (first, mut counters) = handshake_transport(&pair, &keys, [None, None]);
    assert_eq!(first[0].direction, I2R);
    packets.extend(first);

    let stream = mode == Mode::Stream;
    let mut send = |pair: &mut Pair, d: Dir, acts: &[Act], jump: Option<u64>, expect_counter: Option<u64>| {
        let slot = usize::from(d == Dir::R2I);
        if let Some(c) = jump {
            pair.sender(d).session_mut().unwrap().set_send_counter_for_testing_only(c);
            counters[slot] = c;
        }
        // Only the initiator's counter jumps; a stream receiver cannot follow it.
        let deliver = !(stream && d == Dir::I2R && counters[0] >= (1 << 20) - 2);
        let counter = expect_counter.unwrap_or(counters[slot]);
        let out = pair.step(d, acts, deliver);
        if let Some(s) = pair.sender(d).session() {
            assert_eq!(s.send_counter(), counter + 1, "{d:?}");
        }
        counters[slot] = counter + 1;
        let mut p = keys.packet(d, "application", pair.now, counter, out, deliver);
        p.set_send_counter = jump;
        if !deliver {
            p.note = Some(NOTE_STREAM_SKIP);
        }
        p
    };

    packets.push(send(&mut pair, Dir::R2I, &[Act::Data(7, b"sensor-config v3")], None, None));
    packets.push(send(&mut pair, Dir::I2R, &[Act::Data(1, b"temperature=21.5")], None, None));
    packets.push(send(
        &mut pair,
        Dir::I2R,
        &[Act::Ping(9), Act::Data(1, b"humidity=40"), Act::Data(3, b"")],
        None,
        None,
    ));
    packets.push(send(&mut pair, Dir::R2I, &[Act::ExpectPong(9)], None, None));
    // Message-count rekey (spec §7.1): jump close to the end of epoch 0 and cross it.
    packets.push(send(&mut pair, Dir::I2R, &[Act::Data(1, b"two before the boundary")], Some((1 << 20) - 2), None));
    packets.push(send(&mut pair, Dir::I2R, &[Act::Data(1, b"last of epoch 0")], None, None));
    packets.push(send(&mut pair, Dir::I2R, &[Act::Data(1, b"first of epoch 1")], None, None));
    packets.push(send(&mut pair, Dir::I2R, &[Act::Data(1, &[0xa5; 64])], None, None));
    // Time rekey (spec §7.1): both sending keys are older than REKEY_AFTER_TIME now. The
    // sender jumps to the first counter of the next epoch (flag 0x02 in stream mode).
    pair.now = T0 + TIME_GAP;
    packets.push(send(&mut pair, Dir::I2R, &[Act::Data(1, b"after 121 s")], None, Some(2 << 20)));
    packets.push(send(&mut pair, Dir::I2R, &[Act::Data(1, b"same epoch")], None, None));
    let mut p = send(&mut pair, Dir::R2I, &[Act::Data(7, b"reply after 121 s")], None, Some(1 << 20));
    p.note = Some("the responder's epoch-0 key is older than REKEY_AFTER_TIME: it starts epoch 1");
    packets.push(p);
    packets.push(send(&mut pair, Dir::I2R, &[Act::Close(CloseReason::Normal)], None, None));
    assert!(pair.i.is_closed());
    if stream {
        let advances: Vec<u64> = packets.iter().filter(|p| p.epoch_advance).map(|p| p.counter).collect();
        assert_eq!(advances, [2 << 20, 1 << 20], "one time-based advance each way");
    } else {
        assert!(pair.r.is_closed(), "the datagram responder read the close");
    }

    TransportVector {
        name: format!("{}_{}_{}_transport", pattern_name(pattern), suite_name(suite), mode_name(mode)),
        handshake_vector: vector_name(pattern, suite, mode),
        pattern: pattern_name(pattern),
        suite: suite.noise_name(),
        mode: mode_name(mode),
        noise_protocol: noise_protocol(pattern, suite),
        initiator: party_json(&INITIATOR),
        responder: party_json(&RESPONDER),
        psk: None,
        start_time_us: T0.as_micros(),
        prologue: hex::encode(&pro),
        rekey_after_time_us: veil_protocol::config::REKEY_AFTER_TIME.as_micros(),
        epoch_bits: veil_protocol::session::EPOCH_BITS,
        handshake_hash: hex::encode(m.hash),
        transport_keys: TransportKeys {
            initiator_to_responder: hex::encode(m.k1),
            responder_to_initiator: hex::encode(m.k2),
        },
        packets,
    }
}

/// What a malformed input is fed to.
#[derive(Clone, Copy)]
enum Target {
    Parse(Mode, usize),
    Payload,
    Message,
}

/// One malformed input: target, input, optional (fill byte, length) to pad it to, the
/// error it must yield, and a description.
type Case = (Target, Vec<u8>, Option<(u8, usize)>, DecodeError, &'static str);

fn malformed_cases() -> Vec<MalformedCase> {
    use DecodeError as E;
    use Mode::{Datagram as D, Routed as R, Stream as S};
    const MAX: usize = wire::MAX_PACKET_LEN;
    let parse = |m: Mode| Target::Parse(m, MAX);
    let tag = [0u8; 16];
    let with_tag = |head: &[u8], extra: usize| {
        let mut v = head.to_vec();
        v.extend_from_slice(&tag[..16 - extra.min(16)]);
        v
    };
    let cases: Vec<Case> = vec![
        (parse(S), vec![], None, E::Empty, "empty packet"),
        (parse(D), vec![], None, E::Empty, "empty packet"),
        (parse(S), vec![0x01, 0x01], None, E::Truncated, "HANDSHAKE_INIT header cut after the version"),
        (parse(D), vec![0x01, 0x01, 0x11], None, E::Truncated, "datagram HANDSHAKE_INIT without a sender index"),
        (parse(D), vec![0x01, 0x01, 0x11, 0, 0, 0], None, E::Truncated, "datagram HANDSHAKE_INIT with 3 index bytes"),
        (parse(D), vec![0x02, 0, 0, 0, 1, 0, 0, 0], None, E::Truncated, "datagram HANDSHAKE_RESP cut in its indices"),
        (parse(D), vec![0x03, 0, 0, 1], None, E::Truncated, "datagram HANDSHAKE_FINAL cut in its index"),
        (parse(S), vec![0x04], None, E::Truncated, "HANDSHAKE_REJECT without a reason"),
        (parse(S), vec![0x04, 0x01, 0x00], None, E::TooLong, "HANDSHAKE_REJECT with a trailing byte"),
        (parse(D), vec![0x04, 0, 0, 0, 1], None, E::Truncated, "datagram HANDSHAKE_REJECT without a reason"),
        (parse(S), with_tag(&[0x10], 1), None, E::Truncated, "stream transport one byte short of header + tag"),
        (
            parse(D),
            with_tag(&[0x10, 0, 0, 0, 1, 0, 0, 5], 1),
            None,
            E::Truncated,
            "datagram transport one byte short of header + tag",
        ),
        (parse(D), vec![0x10, 0, 0, 0, 1, 0, 0], None, E::Truncated, "datagram transport header cut"),
        (parse(S), vec![0x00], None, E::UnknownPacketType(0x00), "packet type 0x00"),
        (parse(S), vec![0x07, 0x00], None, E::UnknownPacketType(0x07), "first unassigned handshake-range type"),
        (parse(D), vec![0x0f, 0x00], None, E::UnknownPacketType(0x0f), "packet type 0x0f"),
        (parse(S), with_tag(&[0x14], 0), None, E::UnknownPacketType(0x14), "transport type with flag bit 2"),
        (parse(D), vec![0x20; 30], None, E::UnknownPacketType(0x20), "packet type 0x20"),
        (parse(S), vec![0xff, 0x01, 0x11], None, E::UnknownPacketType(0xff), "packet type 0xff"),
        (parse(S), vec![0x01, 0x02, 0x11], None, E::UnsupportedVersion(2), "protocol version 2"),
        (parse(D), vec![0x01, 0x00, 0x11, 0, 0, 0, 1], None, E::UnsupportedVersion(0), "protocol version 0"),
        (
            parse(S),
            vec![0x01, 0x02, 0x00],
            None,
            E::UnsupportedVersion(2),
            "the version is checked before pattern and suite (spec §4.3)",
        ),
        (parse(S), vec![0x01, 0x01, 0x01], None, E::UnsupportedPattern(0), "pattern code 0"),
        (parse(D), vec![0x01, 0x01, 0x61, 0, 0, 0, 1], None, E::UnsupportedPattern(6), "pattern code 6"),
        (parse(S), vec![0x01, 0x01, 0xf1], None, E::UnsupportedPattern(15), "pattern code 15"),
        (parse(S), vec![0x01, 0x01, 0x00], None, E::UnsupportedPattern(0), "the pattern is checked before the suite"),
        (parse(S), vec![0x01, 0x01, 0x10], None, E::UnsupportedSuite(0), "suite code 0"),
        (parse(D), vec![0x01, 0x01, 0x13, 0, 0, 0, 1], None, E::UnsupportedSuite(3), "suite code 3"),
        (parse(S), vec![0x01, 0x01, 0x5f], None, E::UnsupportedSuite(15), "suite code 15"),
        (
            parse(D),
            with_tag(&[0x12, 0, 0, 0, 1, 0, 0, 0], 0),
            None,
            E::WrongMode,
            "datagram transport with the epoch-advance flag (spec §6.2)",
        ),
        (parse(D), with_tag(&[0x13, 0, 0, 0, 1, 0, 0, 0], 0), None, E::WrongMode, "datagram transport with both flags"),
        (parse(S), vec![0x10], Some((0x00, MAX + 1)), E::TooLong, "one byte above 65535"),
        (parse(D), vec![0x01, 0x01, 0x11], Some((0x00, MAX + 1)), E::TooLong, "length is checked before the header"),
        (
            Target::Parse(S, 128),
            vec![0x10],
            Some((0x00, 129)),
            E::TooLong,
            "one byte above a configured max_packet_len of 128",
        ),
        (
            Target::Parse(D, 1_000_000),
            vec![0x10],
            Some((0x00, MAX + 1)),
            E::TooLong,
            "a max_packet_len above 65535 is capped at 65535",
        ),
        (Target::Payload, vec![], None, E::MalformedPayload, "empty payload"),
        (Target::Payload, vec![0x01, 0x00, 0x00], None, E::MalformedPayload, "truncated payload"),
        (Target::Payload, vec![0x01, 0x00, 0x00, 0x00, 0x00], None, E::MalformedPayload, "trailing byte"),
        (Target::Payload, vec![0x00, 0x00, 0x00, 0x00], None, E::MalformedPayload, "max_version 0"),
        (Target::Payload, vec![0x01, 0x00, 0x01, 0x7f, 0x00], None, E::MalformedPayload, "max_packet_len 127"),
        (Target::Payload, vec![0x01, 0x00, 0x01, 0x00, 0x00], None, E::MalformedPayload, "max_packet_len 0"),
        (Target::Payload, vec![0x01, 0x00, 0x02, 0x00], None, E::MalformedPayload, "Option tag 2"),
        (
            Target::Payload,
            vec![0x01, 0x00, 0x00, 0x01, 0x7f, 0x01],
            None,
            E::MalformedPayload,
            "certificate length beyond the input",
        ),
        (
            Target::Payload,
            vec![0x01, 0xff, 0xff, 0xff, 0xff, 0x7f, 0x00, 0x00],
            None,
            E::MalformedPayload,
            "capabilities varint above u32",
        ),
        (
            Target::Payload,
            vec![0x01, 0x00, 0x00, 0x01, 0xfd, 0x07],
            Some((0x00, 1_025)),
            E::MalformedPayload,
            "1025 bytes: above HANDSHAKE_PAYLOAD_MAX",
        ),
        (Target::Message, vec![], None, E::Truncated, "empty input"),
        (Target::Message, vec![0x00, 0x00], None, E::UnknownMessageKind(0x00), "kind 0x00"),
        (Target::Message, vec![0x02, 0x00], None, E::MalformedMessage, "Ack without its next"),
        (Target::Message, vec![0x08, 0x80], None, E::MalformedMessage, "RevocationPush with a truncated length"),
        (Target::Message, vec![0x09, 0x00], None, E::UnknownMessageKind(0x09), "reserved kind FlowReport"),
        (Target::Message, vec![0x0a], None, E::MalformedMessage, "TimeSync without a body"),
        (Target::Message, vec![0x12], None, E::UnknownMessageKind(0x12), "first unassigned kind"),
        (Target::Message, vec![0x80, 0x01, 0x02], None, E::UnknownMessageKind(0x80), "extension kind 0x80"),
        (Target::Message, vec![0xff], None, E::UnknownMessageKind(0xff), "kind 0xff"),
        (Target::Message, vec![0x01], None, E::MalformedMessage, "Data without a body"),
        (Target::Message, vec![0x01, 0x01, 0x01, 0x09, 0x00], None, E::MalformedMessage, "Data payload cut short"),
        (Target::Message, vec![0x01, 0xff, 0xff, 0x04, 0x00, 0x00], None, E::MalformedMessage, "Data channel > u16"),
        (
            Target::Message,
            vec![0x01, 0x01, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0x00],
            None,
            E::MalformedMessage,
            "Data id > u64",
        ),
        (Target::Message, vec![0x03], None, E::MalformedMessage, "Ping without an id"),
        (Target::Message, vec![0x03, 0x80], None, E::MalformedMessage, "Ping id varint cut"),
        (Target::Message, vec![0x04, 0xff, 0xff, 0xff, 0xff, 0x1f], None, E::MalformedMessage, "Pong id > u32"),
        (Target::Message, vec![0x05], None, E::MalformedMessage, "Close without a reason"),
        (Target::Message, vec![0x05, 0xff, 0xff, 0x07], None, E::MalformedMessage, "Close reason > u16"),
        (Target::Message, vec![0x0b, 0x05, 0x01], None, E::MalformedMessage, "Handshake packet cut short"),
        // spec §16.2: routed mode.
        (
            parse(R),
            with_tag(&[0x10, 0, 0, 5], 1),
            None,
            E::Truncated,
            "routed transport one byte short of header + tag",
        ),
        (parse(R), vec![0x10, 0, 0], None, E::Truncated, "routed transport header cut"),
        (parse(R), with_tag(&[0x12, 0, 0, 0], 0), None, E::WrongMode, "routed transport with the epoch-advance flag"),
        (parse(R), vec![0x01, 0x01, 0x11, 0, 0, 0], None, E::Truncated, "routed HANDSHAKE_INIT with 3 index bytes"),
        (parse(R), vec![0x03, 0, 0, 1], None, E::Truncated, "routed HANDSHAKE_FINAL cut in its index"),
        (
            parse(R),
            [&[0x05, 0, 0, 0, 1][..], &[0xc0; 16]].concat(),
            None,
            E::WrongMode,
            "COOKIE_REPLY in routed mode (no cookies through relays)",
        ),
        // spec §9.2, §16: routing messages.
        (Target::Message, vec![0x06], None, E::MalformedMessage, "Forward without a body"),
        (Target::Message, vec![0x06, 0x00, 0x00], None, E::MalformedMessage, "Forward with an empty packet"),
        (Target::Message, vec![0x07, 0x01, 0x02, 0x10], None, E::MalformedMessage, "Deliver packet cut short"),
        (Target::Message, vec![0x07, 0x00, 0x00], None, E::MalformedMessage, "Deliver with an empty packet"),
        (
            Target::Message,
            vec![0x06, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x01, 0x10],
            None,
            E::MalformedMessage,
            "Forward route > u32",
        ),
        (
            Target::Message,
            [&[0x0c, 0x01][..], &[0xab; 15]].concat(),
            None,
            E::MalformedMessage,
            "Route node id cut short (15 of 16 bytes)",
        ),
        (Target::Message, vec![0x0d, 0x01], None, E::MalformedMessage, "Withdraw without a reason"),
        (Target::Message, vec![0x0e, 0x80], None, E::MalformedMessage, "Unreachable route varint cut"),
    ];
    cases
        .into_iter()
        .chain(cookie_vectors::malformed_cases())
        .chain(delivery_vectors::malformed_cases())
        .map(|(target, input, pad, expected, description)| {
            let mut full = input.clone();
            if let Some((b, len)) = pad {
                full.resize(len, b);
            }
            let got = match target {
                Target::Parse(m, max) => wire::parse(m, max, &full).err(),
                Target::Payload => HandshakePayload::decode(&full).err(),
                Target::Message => Message::decode(&full).err(),
            };
            assert_eq!(got, Some(expected), "{description}");
            let (function, mode, max_packet_len) = match target {
                Target::Parse(m, max) => ("wire::parse", Some(mode_name(m)), Some(max)),
                Target::Payload => ("HandshakePayload::decode", None, None),
                Target::Message => ("Message::decode", None, None),
            };
            MalformedCase {
                function,
                description,
                mode,
                max_packet_len,
                input: hex::encode(&input),
                pad: pad.map(|(b, to_length)| Pad { byte: hex::encode([b]), to_length }),
                error: format!("{expected:?}"),
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Output.

struct Output {
    files: Vec<(&'static str, String)>,
    /// Fuzz seeds: packets, plaintexts and (unpadded) malformed inputs.
    seeds: Vec<Vec<u8>>,
    /// Fuzz seeds of the trust targets (spec §15.12): `(target, input)`.
    trust_seeds: Vec<(&'static str, Vec<u8>)>,
}

fn to_json<T: Serialize>(v: &T) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap();
    s.push('\n');
    s
}

fn generate() -> Output {
    let mut seeds: Vec<Vec<u8>> = Vec::new();
    let mut seed_hex = |h: &str| seeds.push(hex::decode(h).unwrap());
    let mut hs = Vec::new();
    for pattern in Pattern::ALL {
        for suite in Suite::ALL {
            for mode in [Mode::Stream, Mode::Datagram] {
                hs.push(handshake_vector(pattern, suite, mode));
            }
        }
    }
    let mut tr = Vec::new();
    for suite in Suite::ALL {
        for mode in [Mode::Stream, Mode::Datagram] {
            tr.push(transport_vector(suite, mode));
        }
    }
    let malformed = malformed_cases();
    let cookies = cookie_vectors::cookie_vectors(&hs);
    for v in &cookies {
        seed_hex(&v.cookie_reply);
        seed_hex(&v.init_cookie);
    }
    for v in &hs {
        v.handshake_packets.iter().for_each(|p| seed_hex(&p.packet));
        v.transport_packets.iter().for_each(|p| {
            seed_hex(&p.packet);
            seed_hex(&p.plaintext);
        });
        v.handshake_packets.iter().take(1).for_each(|p| seed_hex(&p.payload));
    }
    for v in &tr {
        v.packets.iter().for_each(|p| {
            seed_hex(&p.packet);
            seed_hex(&p.plaintext);
        });
    }
    malformed.iter().filter(|c| c.pad.is_none()).for_each(|c| seed_hex(&c.input));
    let routing = routing_vectors::generate();
    for v in &routing.handshakes {
        v.handshake_packets.iter().for_each(|p| seed_hex(&p.packet));
        v.transport_packets.iter().for_each(|p| {
            seed_hex(&p.packet);
            seed_hex(&p.plaintext);
        });
    }
    routing.relayed.hops.iter().for_each(|h| seed_hex(&h.packet));
    let delivery = delivery_vectors::generate();
    delivery.messages.iter().for_each(|m| seed_hex(&m.encoding));
    seeds.retain(|s| !s.is_empty());

    let hs = VectorFile {
        description: "Veil handshakes: every pattern x suite x mode from fixed keys. Packets are listed in wire \
                      order; `payload` is each handshake message's plaintext payload; transport keys are Noise \
                      Split() (k1 encrypts initiator to responder); each transport packet's nonce is its counter \
                      and its associated data its header.",
        spec: "spec/protocol.md §14",
        generator: GENERATOR,
        vectors: hs,
    };
    let tr = VectorFile {
        description: "Veil transport packets after an IK handshake, per suite and mode: message packing, an epoch \
                      boundary crossed by count (the sender's counter is set to 2^20 - 2 first) and epochs \
                      retired by time (the virtual clock jumps 121 s; no timers run in between). A packet of \
                      counter c is sealed with REKEY^(c >> epoch_bits)(k), nonce c, associated data = its header.",
        spec: "spec/protocol.md §14",
        generator: GENERATOR,
        vectors: tr,
    };
    let mf = VectorFile {
        description: "Malformed inputs and the error each decoder must return (the Rust Debug form of \
                      veil_protocol::DecodeError). With `pad`, the input is extended with `byte` up to `to_length`.",
        spec: "spec/protocol.md §14",
        generator: GENERATOR,
        vectors: malformed,
    };
    let cookies = VectorFile {
        description: "Veil's cookie challenge (datagram mode): for a datagram vector of handshakes.json, the \
                      responder's endpoint (cookie secret `secret`, demanding cookies, at `time_us`) answers the \
                      INIT from `source` with `cookie_reply`; `cookie` = keyed BLAKE2s-128(secret, mac_input), \
                      mac_input = \"Veil-v1 cookie\" || source_bytes (IPv6 or IPv4-mapped address, port) || INIT; \
                      the initiator then sends `init_cookie` (0x06 || cookie || INIT) and the responder answers \
                      it with `resp`, the RESP of the handshake vector: the cookie changes nothing in the handshake.",
        spec: "spec/protocol.md §5.7.4, §14",
        generator: GENERATOR,
        vectors: cookies,
    };
    let mut trust_seeds = Vec::new();
    let trust = trust_vectors::generate(&mut trust_seeds);
    Output {
        files: vec![
            ("handshakes.json", to_json(&hs)),
            ("transport.json", to_json(&tr)),
            ("malformed.json", to_json(&mf)),
            ("cookies.json", to_json(&cookies)),
            ("trust.json", to_json(&trust)),
            ("routing.json", to_json(&routing)),
            ("certificate_handshakes.json", to_json(&certificate_vectors::generate(GENERATOR))),
            ("delivery.json", to_json(&delivery)),
        ],
        seeds,
        trust_seeds,
    }
}

/// 64-bit FNV-1a: a stable, dependency-free name for corpus files.
fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

fn shorten(line: &str) -> String {
    let t = line.trim();
    if t.chars().count() > 160 {
        format!("{}…", t.chars().take(160).collect::<String>())
    } else {
        t.to_owned()
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root").to_path_buf()
}

fn main() -> ExitCode {
    let check = match std::env::args().nth(1).as_deref() {
        None => false,
        Some("--check") => true,
        Some(other) => {
            eprintln!("usage: gen_vectors [--check]   (unknown argument {other:?})");
            return ExitCode::from(2);
        }
    };
    let out = generate();
    let dir = repo_root().join("spec").join("vectors");
    if check {
        let mut stale = Vec::new();
        for (name, text) in &out.files {
            let path = dir.join(name);
            match std::fs::read_to_string(&path) {
                Ok(on_disk) if on_disk == *text => {}
                Ok(on_disk) => {
                    let pad = || std::iter::repeat("");
                    let (line, (committed, generated)) = on_disk
                        .lines()
                        .chain(pad())
                        .zip(text.lines().chain(pad()))
                        .enumerate()
                        .find(|(_, (a, b))| a != b)
                        .unwrap_or((0, ("", "")));
                    stale.push(format!(
                        "{} differs from what the code generates; first at line {}:\n  committed: {}\n  generated: {}",
                        path.display(),
                        line + 1,
                        shorten(committed),
                        shorten(generated),
                    ));
                }
                Err(e) => stale.push(format!("{} cannot be read: {e}", path.display())),
            }
        }
        if stale.is_empty() {
            println!("spec vectors are fresh ({} files)", out.files.len());
            return ExitCode::SUCCESS;
        }
        for s in &stale {
            eprintln!("error: {s}");
        }
        eprintln!("the protocol's output changed: if that is intended, regenerate with `{GENERATOR}` and commit");
        return ExitCode::FAILURE;
    }
    std::fs::create_dir_all(&dir).expect("create spec/vectors");
    for (name, text) in &out.files {
        std::fs::write(dir.join(name), text).expect("write a vector file");
        println!("wrote {}", dir.join(name).display());
    }
    let corpus = repo_root().join("fuzz").join("corpus").join("decode");
    std::fs::create_dir_all(&corpus).expect("create fuzz/corpus/decode");
    let mut written = 0;
    for s in &out.seeds {
        let path = corpus.join(format!("{:016x}", fnv1a(s)));
        if !path.exists() {
            std::fs::write(&path, s).expect("write a corpus file");
            written += 1;
        }
    }
    println!("fuzz/corpus/decode: {written} new seeds ({} distinct inputs in the vectors)", {
        let mut names: Vec<u64> = out.seeds.iter().map(|s| fnv1a(s)).collect();
        names.sort_unstable();
        names.dedup();
        names.len()
    });
    let mut written = 0;
    for (target, s) in &out.trust_seeds {
        let dir = repo_root().join("fuzz").join("corpus").join(target);
        std::fs::create_dir_all(&dir).expect("create a trust corpus directory");
        let path = dir.join(format!("{:016x}", fnv1a(s)));
        if !path.exists() {
            std::fs::write(&path, s).expect("write a corpus file");
            written += 1;
        }
    }
    println!("fuzz/corpus/certificate, fuzz/corpus/revocation_list: {written} new seeds");
    ExitCode::SUCCESS
}
