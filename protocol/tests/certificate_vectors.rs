//! Reproduces `spec/vectors/certificate_handshakes.json` (spec §5.3, §5.4.1, §5.5, §15.4) byte
//! for byte with the implementation, and checks it independently: each payload against an
//! encoding written from spec §5.3 by hand, each Noise message against snow run alone with
//! those payloads, and each chain against the trust store.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;

use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use serde_json::Value;
use snow::resolvers::CryptoResolver;
use veil_protocol::trust::{CaPublicKey, RoleSet, TrustStore, UnixTime};
use veil_protocol::{Config, Connection, Decision, Event, Mode, Pattern, Role, StaticKeypair, Suite, Timestamp};

fn file() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../spec/vectors/certificate_handshakes.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn h(v: &Value) -> Vec<u8> {
    hex::decode(v.as_str().unwrap()).unwrap()
}

fn h32(v: &Value) -> [u8; 32] {
    h(v).try_into().unwrap()
}

fn pattern_of(v: &Value) -> Pattern {
    match v["pattern"].as_str().unwrap() {
        "IK" => Pattern::IK,
        "XX" => Pattern::XX,
        other => panic!("pattern {other}"),
    }
}

fn mode_of(v: &Value) -> Mode {
    match v["mode"].as_str().unwrap() {
        "stream" => Mode::Stream,
        "datagram" => Mode::Datagram,
        other => panic!("mode {other}"),
    }
}

/// spec §5.3 by hand: `max_version` 1, `capabilities` 0 (varint), `max_packet_len` None,
/// then `certificate`: 0 for None, or 1, a varint length and the bytes.
fn spec_payload(certificate: Option<&[u8]>) -> Vec<u8> {
    let mut out = vec![0x01, 0x00, 0x00];
    match certificate {
        None => out.push(0x00),
        Some(c) => {
            out.push(0x01);
            let mut n = c.len();
            while n >= 0x80 {
                out.push(u8::try_from(n & 0x7f).unwrap() | 0x80);
                n >>= 7;
            }
            out.push(u8::try_from(n).unwrap());
            out.extend_from_slice(c);
        }
    }
    out
}

fn header_len(ty: u8, mode: Mode) -> usize {
    match (ty, mode) {
        (0x01, Mode::Stream) => 3,
        (0x01, _) => 7,
        (0x02, Mode::Stream) | (0x03, Mode::Stream) => 1,
        (0x02, _) => 9,
        (0x03, _) => 5,
        other => panic!("not a handshake packet: {other:?}"),
    }
}

fn connection(v: &Value, side: &str, role: Role, rng: &mut ChaCha20Rng) -> Connection {
    let pattern = pattern_of(v);
    let s = &v[side];
    let mut config = Config::new(StaticKeypair::from_secret_bytes(h32(&s["static_secret"])), mode_of(v));
    config.pattern = pattern;
    config.suite = Suite::ChaChaPolyBlake2s;
    config.certificate_chain = Some(h(&s["certificate_chain"]));
    config.authorize_responder = role == Role::Initiator && v["initiator_authorizes_responder"].as_bool().unwrap();
    let remote = (role == Role::Initiator && pattern.initiator_knows_responder())
        .then(|| StaticKeypair::from_secret_bytes(h32(&v["responder"]["static_secret"])).public().to_owned());
    let index = u32::try_from(s["index"].as_u64().unwrap()).unwrap();
    let now = Timestamp::from_micros(v["start_time_us"].as_u64().unwrap());
    Connection::new_with_fixed_ephemeral_for_testing_only(
        Arc::new(config),
        role,
        remote,
        now,
        rng,
        h32(&s["ephemeral_secret"]),
        index,
    )
    .unwrap()
}

#[test]
fn certificate_handshakes_are_reproduced_byte_for_byte() {
    let f = file();
    let vectors = f["vectors"].as_array().unwrap();
    assert_eq!(vectors.len(), 4, "IK and XX, both modes");
    for v in vectors {
        let name = v["name"].as_str().unwrap();
        let now = Timestamp::from_micros(v["start_time_us"].as_u64().unwrap());
        // Any RNG: with fixed ephemerals no byte depends on it.
        let mut rng = ChaCha20Rng::seed_from_u64(99);
        let mut conns = [
            connection(v, "initiator", Role::Initiator, &mut rng),
            connection(v, "responder", Role::Responder, &mut rng),
        ];
        let mut buf = vec![0u8; 65_535];
        let mut handshake = Vec::new();
        let mut requests = Vec::new();
        for _ in 0..16 {
            let mut moved = false;
            for from in [0usize, 1] {
                while let Some(n) = conns[from].poll_transmit(now, &mut buf).unwrap() {
                    let p = buf[..n].to_vec();
                    moved = true;
                    conns[1 - from].handle_input(now, &p).unwrap();
                    if p[0] < 0x10 {
                        handshake.push(p);
                    }
                    while let Some(ev) = conns[1 - from].poll_event() {
                        if let Event::AuthorizationRequired { certificate, .. } = ev {
                            let side = if from == 1 { "initiator" } else { "responder" };
                            requests.push((side, handshake.len() - 1, certificate.unwrap_or_default()));
                            conns[1 - from].authorize(now, Decision::allow()).unwrap();
                        }
                    }
                }
            }
            if !moved {
                break;
            }
        }
        let recorded: Vec<Vec<u8>> =
            v["handshake_packets"].as_array().unwrap().iter().map(|p| h(&p["packet"])).collect();
        assert_eq!(handshake, recorded, "{name}: handshake packets");
        let recorded_requests: Vec<(&str, usize, Vec<u8>)> = v["authorization_requests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let after = usize::try_from(r["after_packet"].as_u64().unwrap()).unwrap();
                (r["side"].as_str().unwrap(), after, h(&r["certificate"]))
            })
            .collect();
        assert_eq!(requests, recorded_requests, "{name}: authorization requests");
        assert_eq!(conns[0].handshake_hash().map(|x| x.to_vec()), Some(h(&v["handshake_hash"])), "{name}");
        assert!(conns[0].is_connected() && conns[1].is_connected(), "{name}");
    }
}

/// snow alone, with no randomness (the ephemerals are fixed).
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

#[test]
fn certificate_handshakes_follow_spec_5_3_and_5_4_1_independently() {
    let f = file();
    let anchor = CaPublicKey::from_bytes(&h32(&f["ca_public"])).unwrap();
    let store = TrustStore::new([anchor]).unwrap();
    for v in f["vectors"].as_array().unwrap() {
        let name = v["name"].as_str().unwrap();
        let (pattern, mode) = (pattern_of(v), mode_of(v));
        let chains = [h(&v["initiator"]["certificate_chain"]), h(&v["responder"]["certificate_chain"])];
        // Each chain certifies its side's static key with the expected role.
        for (k, (side, roles)) in [("initiator", RoleSet::DEVICE), ("responder", RoleSet::GATEWAY)].iter().enumerate() {
            let key = StaticKeypair::from_secret_bytes(h32(&v[*side]["static_secret"]));
            let t = Some(UnixTime::from_secs(1_800_000_000));
            assert!(store.verify(key.public(), Some(&chains[k]), t, *roles).is_ok(), "{name}: {side}'s chain");
        }
        // spec §5.3, §5.4.1: the sender's chain in every message but XX message 1.
        let packets = v["handshake_packets"].as_array().unwrap();
        let payloads: Vec<Vec<u8>> = packets.iter().map(|p| h(&p["payload"])).collect();
        for (k, payload) in payloads.iter().enumerate() {
            let chain = (k != 0 || pattern != Pattern::XX).then(|| chains[k % 2].as_slice());
            assert_eq!(payload, &spec_payload(chain), "{name}: payload of message {k}");
        }
        // XX message 1 is e and the payload in clear: no chain in it.
        if pattern == Pattern::XX {
            let init = h(&packets[0]["packet"]);
            assert_eq!(&init[init.len() - 4..], &spec_payload(None)[..], "{name}");
        }
        // snow alone, given the payloads, writes the recorded Noise messages.
        let params: snow::params::NoiseParams = v["noise_protocol"].as_str().unwrap().parse().unwrap();
        let init = h(&packets[0]["packet"]);
        let mut prologue = b"Veil-v1".to_vec();
        prologue.push(if mode == Mode::Stream { 0x01 } else { 0x02 });
        prologue.extend_from_slice(&init[..header_len(0x01, mode)]);
        let responder_public = *StaticKeypair::from_secret_bytes(h32(&v["responder"]["static_secret"])).public();
        let build = |side: &str, initiator: bool| {
            let (secret, eph) = (h32(&v[side]["static_secret"]), h32(&v[side]["ephemeral_secret"]));
            let mut b = snow::Builder::with_resolver(params.clone(), Box::new(SnowOnly))
                .prologue(&prologue)
                .unwrap()
                .local_private_key(&secret)
                .unwrap()
                .fixed_ephemeral_key_for_testing_only(&eph);
            if initiator && pattern == Pattern::IK {
                b = b.remote_public_key(responder_public.as_bytes()).unwrap();
            }
            if initiator {
                b.build_initiator().unwrap()
            } else {
                b.build_responder().unwrap()
            }
        };
        let mut hs = [build("initiator", true), build("responder", false)];
        let mut out = vec![0u8; 2_048];
        let mut read = vec![0u8; 2_048];
        for (k, p) in packets.iter().enumerate() {
            let packet = h(&p["packet"]);
            let body = &packet[header_len(packet[0], mode)..];
            let (w, r) = (k % 2, 1 - k % 2);
            let n = hs[w].write_message(&payloads[k], &mut out).unwrap();
            assert_eq!(&out[..n], body, "{name}: Noise message {k}");
            let m = hs[r].read_message(body, &mut read).unwrap();
            assert_eq!(&read[..m], &payloads[k][..], "{name}: message {k} decrypts to its payload");
        }
        assert_eq!(hs[0].get_handshake_hash(), &h(&v["handshake_hash"])[..], "{name}: handshake hash");
    }
}
