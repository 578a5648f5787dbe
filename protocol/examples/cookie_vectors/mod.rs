//! `cookies.json` (spec §5.7.4, §14.2): the cookie challenge from fixed inputs. For a datagram
//! handshake vector of `handshakes.json`, the responder's endpoint (a cookie checker with a
//! fixed secret, demanding cookies) answers the INIT with a COOKIE_REPLY, the initiator sends
//! its INIT_COOKIE, and the responder's RESP to it is that vector's RESP: the cookie changes
//! nothing in the handshake. Plus the malformed cookie packets of `malformed.json`.

use std::net::SocketAddr;

use veil_protocol::cookie::{address_bytes, compute_cookie, CookieChecker, CookieStatus, Verdict, COOKIE_LABEL};

use super::*;

/// The responder endpoint's cookie secret (public test data).
const COOKIE_SECRET: [u8; 32] = [0x06; 32];

#[derive(Serialize)]
pub(super) struct CookieVector {
    pub(super) name: String,
    /// The `handshakes.json` vector whose INIT is challenged.
    pub(super) handshake_vector: String,
    pub(super) secret: String,
    pub(super) source: String,
    pub(super) source_bytes: String,
    pub(super) time_us: u64,
    pub(super) init: String,
    pub(super) mac_input: String,
    pub(super) cookie: String,
    pub(super) cookie_reply: String,
    pub(super) init_cookie: String,
    pub(super) resp: String,
}

/// The next packet `d`'s sender puts on the wire (it must have one).
fn poll(pair: &mut Pair, d: Dir) -> Vec<u8> {
    let now = pair.now;
    let mut buf = std::mem::take(&mut pair.buf);
    let n = pair.sender(d).poll_transmit(now, &mut buf).unwrap().expect("a packet");
    let p = buf[..n].to_vec();
    pair.buf = buf;
    p
}

fn cookie_vector(pattern: Pattern, suite: Suite, source: SocketAddr, hs: &[HandshakeVector]) -> CookieVector {
    let mode = Mode::Datagram;
    let name = vector_name(pattern, suite, mode);
    let plain = hs.iter().find(|v| v.name == name).expect("the handshake vector");
    let mut pair = Pair::new(pattern, suite, mode);
    let init = poll(&mut pair, Dir::I2R);
    assert_eq!(hex::encode(&init), plain.handshake_packets[0].packet, "{name}: INIT");

    let mut endpoint = Config::new(StaticKeypair::from_secret_bytes(RESPONDER.static_secret), mode);
    endpoint.psk = needs_psk(pattern).then(|| Psk::new(PSK));
    let mut checker = CookieChecker::with_secret_for_testing_only(COOKIE_SECRET, T0, Duration::from_secs(120));
    let mut out = [0u8; 64];
    let Verdict::CookieReply { len, cookie: CookieStatus::Absent } =
        checker.verdict(T0, &source, &init, true, &endpoint, &mut out)
    else {
        panic!("{name}: no COOKIE_REPLY");
    };
    let reply = out[..len].to_vec();
    // The spec's formula, spelled out.
    let mut mac_input = COOKIE_LABEL.to_vec();
    mac_input.extend_from_slice(&address_bytes(&source));
    mac_input.extend_from_slice(&init);
    let cookie = compute_cookie(&COOKIE_SECRET, &source, &init);
    let mut expected_reply = vec![wire::TYPE_COOKIE_REPLY];
    expected_reply.extend_from_slice(&init[3..7]);
    expected_reply.extend_from_slice(&cookie);
    assert_eq!(reply, expected_reply, "{name}: COOKIE_REPLY");
    assert!(reply.len() < init.len(), "{name}: the reply amplifies");

    pair.deliver(Dir::R2I, &reply);
    let init_cookie = poll(&mut pair, Dir::I2R);
    let mut expected = vec![wire::TYPE_HANDSHAKE_INIT_COOKIE];
    expected.extend_from_slice(&cookie);
    expected.extend_from_slice(&init);
    assert_eq!(init_cookie, expected, "{name}: INIT_COOKIE");
    assert_eq!(
        checker.verdict(T0, &source, &init_cookie, true, &endpoint, &mut out),
        Verdict::Proceed { init: &init[..], cookie: CookieStatus::Valid },
        "{name}: the cookie does not verify"
    );
    pair.deliver(Dir::I2R, &init_cookie);
    let resp = poll(&mut pair, Dir::R2I);
    assert_eq!(hex::encode(&resp), plain.handshake_packets[1].packet, "{name}: RESP differs from the plain handshake");
    pair.deliver(Dir::R2I, &resp);
    pair.pump();
    assert!(pair.i.is_connected() && pair.r.is_connected(), "{name}: not connected");
    assert_eq!(hex::encode(pair.i.handshake_hash().unwrap()), plain.handshake_hash, "{name}: hash");
    CookieVector {
        name: format!("{name}_cookie"),
        handshake_vector: name,
        secret: hex::encode(COOKIE_SECRET),
        source: source.to_string(),
        source_bytes: hex::encode(address_bytes(&source)),
        time_us: T0.as_micros(),
        init: hex::encode(&init),
        mac_input: hex::encode(&mac_input),
        cookie: hex::encode(cookie),
        cookie_reply: hex::encode(&reply),
        init_cookie: hex::encode(&init_cookie),
        resp: hex::encode(&resp),
    }
}

/// IK (the default), XX (the smallest INIT) and KK, from an IPv4 and an IPv6 source.
pub(super) fn cookie_vectors(hs: &[HandshakeVector]) -> Vec<CookieVector> {
    let v4: SocketAddr = "192.0.2.1:51820".parse().unwrap();
    let v6: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
    vec![
        cookie_vector(Pattern::IK, Suite::ChaChaPolyBlake2s, v4, hs),
        cookie_vector(Pattern::XX, Suite::ChaChaPolyBlake2s, v6, hs),
        cookie_vector(Pattern::KK, Suite::AesGcmSha256, v4, hs),
    ]
}

/// Malformed cookie packets (spec §4.4 step 4).
pub(super) fn malformed_cases() -> Vec<Case> {
    use DecodeError as E;
    use Mode::{Datagram as D, Stream as S};
    let parse = |m: Mode| Target::Parse(m, wire::MAX_PACKET_LEN);
    let reply = |len: usize| {
        let mut v = vec![wire::TYPE_COOKIE_REPLY, 0x11, 0x22, 0x33, 0x44];
        v.resize(len, 0xc0);
        v
    };
    let init_cookie = |init: &[u8]| {
        let mut v = vec![wire::TYPE_HANDSHAKE_INIT_COOKIE];
        v.extend_from_slice(&[0xc0; wire::COOKIE_LEN]);
        v.extend_from_slice(init);
        v
    };
    vec![
        (parse(S), reply(21), None, E::WrongMode, "COOKIE_REPLY in stream mode"),
        (parse(S), init_cookie(&[0x01, 0x01, 0x11]), None, E::WrongMode, "INIT_COOKIE in stream mode"),
        (parse(D), reply(20), None, E::Truncated, "COOKIE_REPLY one byte short"),
        (parse(D), reply(22), None, E::TooLong, "COOKIE_REPLY one byte long"),
        (parse(D), vec![wire::TYPE_COOKIE_REPLY], None, E::Truncated, "COOKIE_REPLY type alone"),
        (
            parse(D),
            init_cookie(&[0x01, 0x01, 0x11, 0, 0, 0]),
            None,
            E::Truncated,
            "INIT_COOKIE whose INIT has 3 index bytes",
        ),
        (
            parse(D),
            init_cookie(&[0x02, 0, 0, 0, 1, 0, 0, 0, 2]),
            None,
            E::UnknownPacketType(0x02),
            "INIT_COOKIE carrying a RESP",
        ),
        (
            parse(D),
            init_cookie(&[0x06, 0x01, 0x11, 0, 0, 0, 1]),
            None,
            E::UnknownPacketType(0x06),
            "INIT_COOKIE inside an INIT_COOKIE",
        ),
        (
            parse(D),
            init_cookie(&[0x01, 0x02, 0x11, 0, 0, 0, 1]),
            None,
            E::UnsupportedVersion(2),
            "INIT_COOKIE whose INIT has version 2",
        ),
        (
            parse(D),
            init_cookie(&[0x01, 0x01, 0x61, 0, 0, 0, 1]),
            None,
            E::UnsupportedPattern(6),
            "INIT_COOKIE whose INIT has pattern 6",
        ),
    ]
}
