//! `spec/vectors/certificate_handshakes.json` (spec §5.3, §5.4.1, §5.5, §15.4): handshakes of
//! nodes configured with certificate chains, from fixed keys — where each chain travels, the
//! exact payload of every handshake message, and the authorization requests each side sees
//! (the initiator decides about the responder too, `authorize_responder`).

use std::sync::Arc;

use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use serde::Serialize;
use veil_protocol::payload::HandshakePayload;
use veil_protocol::trust::{CaSigningKey, CertRole, Certificate, CertificateBody, CertificateChain};
use veil_protocol::wire::{self, HANDSHAKE_PAYLOAD_MAX};
use veil_protocol::{Config, Connection, Decision, Event, Mode, Pattern, Role, StaticKeypair, Suite, Timestamp};

const CA_SEED: [u8; 32] = [0xca; 32];
const INITIATOR_STATIC: [u8; 32] = [0x01; 32];
const INITIATOR_EPHEMERAL: [u8; 32] = [0x03; 32];
const INITIATOR_INDEX: u32 = 0x1122_3344;
const RESPONDER_STATIC: [u8; 32] = [0x02; 32];
const RESPONDER_EPHEMERAL: [u8; 32] = [0x04; 32];
const RESPONDER_INDEX: u32 = 0xa1b2_c3d4;
const T0: Timestamp = Timestamp::from_micros(1_000_000);
/// Validity of the certificates (Unix time).
const NOT_BEFORE: u64 = 1_700_000_000;
const NOT_AFTER: u64 = 1_900_000_000;

#[derive(Serialize)]
pub struct File {
    description: &'static str,
    spec: &'static str,
    generator: &'static str,
    ca_seed: String,
    ca_public: String,
    vectors: Vec<Vector>,
}

#[derive(Serialize)]
struct Side {
    static_secret: String,
    static_public: String,
    ephemeral_secret: String,
    index: u32,
    certificate_chain: String,
}

#[derive(Serialize)]
struct Packet {
    direction: &'static str,
    packet_type: &'static str,
    payload: String,
    packet: String,
}

#[derive(Serialize)]
struct Request {
    /// The side that is asked to decide.
    side: &'static str,
    /// The handshake packet (0-based) after which it is asked.
    after_packet: usize,
    /// The certificate bytes the request carries: the peer's chain.
    certificate: String,
}

#[derive(Serialize)]
struct Vector {
    name: String,
    pattern: String,
    suite: &'static str,
    mode: &'static str,
    noise_protocol: String,
    start_time_us: u64,
    initiator: Side,
    responder: Side,
    initiator_authorizes_responder: bool,
    handshake_packets: Vec<Packet>,
    authorization_requests: Vec<Request>,
    handshake_hash: String,
}

fn chain_for(ca: &CaSigningKey, key: &StaticKeypair, name: &str, role: CertRole, serial: u64) -> Vec<u8> {
    let body =
        CertificateBody::new(*key.public().as_bytes(), name, role, NOT_BEFORE, NOT_AFTER, serial, ca.issuer_id());
    CertificateChain::new(vec![Certificate::sign(body, ca).unwrap()]).unwrap().encode().unwrap()
}

fn side(secret: [u8; 32], eph: [u8; 32], index: u32, chain: &[u8]) -> Side {
    Side {
        static_secret: hex::encode(secret),
        static_public: hex::encode(StaticKeypair::from_secret_bytes(secret).public().as_bytes()),
        ephemeral_secret: hex::encode(eph),
        index,
        certificate_chain: hex::encode(chain),
    }
}

/// The payload a node with `chain` sends in handshake message `k` of `pattern` (spec §5.3,
/// §5.4.1): the chain everywhere but XX/XXpsk3 message 1.
fn payload(pattern: Pattern, k: usize, chain: &[u8]) -> Vec<u8> {
    let xx_first = k == 0 && matches!(pattern, Pattern::XX | Pattern::XXpsk3);
    let p = HandshakePayload { certificate: (!xx_first).then(|| chain.to_vec()), ..HandshakePayload::default() };
    let mut buf = [0u8; HANDSHAKE_PAYLOAD_MAX];
    let n = p.encode(&mut buf).unwrap();
    buf[..n].to_vec()
}

fn vector(pattern: Pattern, mode: Mode) -> Vector {
    let suite = Suite::ChaChaPolyBlake2s;
    let ca = CaSigningKey::from_seed(CA_SEED);
    let i_id = StaticKeypair::from_secret_bytes(INITIATOR_STATIC);
    let r_id = StaticKeypair::from_secret_bytes(RESPONDER_STATIC);
    let i_chain = chain_for(&ca, &i_id, "device-1", CertRole::Device, 1);
    let r_chain = chain_for(&ca, &r_id, "gateway-1", CertRole::Gateway, 2);
    let r_pub = *r_id.public();
    let mut ci = Config::new(i_id, mode);
    ci.pattern = pattern;
    ci.suite = suite;
    ci.certificate_chain = Some(i_chain.clone());
    ci.authorize_responder = true;
    let mut cr = Config::new(r_id, mode);
    cr.certificate_chain = Some(r_chain.clone());
    let mut rng = ChaCha20Rng::seed_from_u64(0x5645_494c);
    let mut conns = [
        Connection::new_with_fixed_ephemeral_for_testing_only(
            Arc::new(ci),
            Role::Initiator,
            pattern.initiator_knows_responder().then_some(r_pub),
            T0,
            &mut rng,
            INITIATOR_EPHEMERAL,
            INITIATOR_INDEX,
        )
        .unwrap(),
        Connection::new_with_fixed_ephemeral_for_testing_only(
            Arc::new(cr),
            Role::Responder,
            None,
            T0,
            &mut rng,
            RESPONDER_EPHEMERAL,
            RESPONDER_INDEX,
        )
        .unwrap(),
    ];
    let mut buf = vec![0u8; wire::MAX_PACKET_LEN];
    let mut packets = Vec::new();
    let mut requests = Vec::new();
    // Each packet is delivered as soon as it is polled, initiator first, until quiet.
    for _ in 0..16 {
        let mut moved = false;
        for from in [0usize, 1] {
            while let Some(n) = conns[from].poll_transmit(T0, &mut buf).unwrap() {
                let packet = buf[..n].to_vec();
                moved = true;
                let to = 1 - from;
                conns[to].handle_input(T0, &packet).unwrap();
                if packet[0] < wire::TYPE_TRANSPORT {
                    let k = packets.len();
                    let (chain, direction) = if from == 0 {
                        (&i_chain, "initiator_to_responder")
                    } else {
                        (&r_chain, "responder_to_initiator")
                    };
                    packets.push(Packet {
                        direction,
                        packet_type: ["HANDSHAKE_INIT", "HANDSHAKE_RESP", "HANDSHAKE_FINAL"][k.min(2)],
                        payload: hex::encode(payload(pattern, k, chain)),
                        packet: hex::encode(&packet),
                    });
                }
                while let Some(ev) = conns[to].poll_event() {
                    if let Event::AuthorizationRequired { certificate, .. } = ev {
                        requests.push(Request {
                            side: if to == 0 { "initiator" } else { "responder" },
                            after_packet: packets.len() - 1,
                            certificate: hex::encode(certificate.unwrap_or_default()),
                        });
                        conns[to].authorize(T0, Decision::allow()).unwrap();
                    }
                }
            }
        }
        if !moved {
            break;
        }
    }
    assert!(conns[0].is_connected() && conns[1].is_connected(), "{pattern:?} {mode:?}");
    let hash = *conns[0].handshake_hash().unwrap();
    assert_eq!(Some(&hash), conns[1].handshake_hash());
    let mode_name = if mode == Mode::Stream { "stream" } else { "datagram" };
    Vector {
        name: format!("{pattern}_{}_{mode_name}_with_certificates", suite.noise_name()),
        pattern: pattern.to_string(),
        suite: suite.noise_name(),
        mode: mode_name,
        noise_protocol: format!("Noise_{}_{}", pattern.noise_name(), suite.noise_name()),
        start_time_us: T0.as_micros(),
        initiator: side(INITIATOR_STATIC, INITIATOR_EPHEMERAL, INITIATOR_INDEX, &i_chain),
        responder: side(RESPONDER_STATIC, RESPONDER_EPHEMERAL, RESPONDER_INDEX, &r_chain),
        initiator_authorizes_responder: true,
        handshake_packets: packets,
        authorization_requests: requests,
        handshake_hash: hex::encode(hash),
    }
}

/// The file.
pub fn generate(generator: &'static str) -> File {
    let ca = CaSigningKey::from_seed(CA_SEED);
    let mut vectors = Vec::new();
    for pattern in [Pattern::IK, Pattern::XX] {
        for mode in [Mode::Stream, Mode::Datagram] {
            vectors.push(vector(pattern, mode));
        }
    }
    File {
        description: "Veil handshakes of nodes with certificate chains (one certificate each, signed by the CA of \
                      `ca_seed`): every handshake packet with its payload plaintext (the `certificate` field carries \
                      the sender's chain except in XX message 1), and the authorization requests each side gets \
                      with the certificate bytes they carry. The initiator also decides about the responder \
                      (`authorize_responder`). Ephemeral keys and indices are fixed; every request is allowed.",
        spec: "spec/protocol.md §5.3, §5.4.1, §5.5, §15.4",
        generator,
        ca_seed: hex::encode(CA_SEED),
        ca_public: hex::encode(ca.verifying_key().to_bytes()),
        vectors,
    }
}
