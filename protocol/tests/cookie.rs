//! The cookie challenge of datagram mode (spec §5.7.4) between real connections: a
//! responder endpoint that demands cookies (a `CookieChecker` in front of its responder
//! connection, as the transports run it), the initiator's answer to COOKIE_REPLY, forged
//! replies, the bound on replies acted on, expiry and the timers.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod util;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use util::*;
use veil_protocol::config::HANDSHAKE_TIMEOUT;
use veil_protocol::cookie::{CookieChecker, CookieStatus, Verdict, COOKIE_SECRET_LIFETIME, MAX_COOKIE_REPLIES};
use veil_protocol::wire::{self, RejectReason, COOKIE_LEN, COOKIE_REPLY_LEN, INIT_COOKIE_PREFIX_LEN};
use veil_protocol::{ConnectionError, DecodeError, Duration, HandshakeError, Mode, Pattern, Suite, Timestamp};

const INITIATOR_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)), 40_000);

/// The responder's endpoint: the stateless check in front of the responder connection.
struct Gate {
    checker: CookieChecker,
    demand: bool,
    /// The responder connection has read its INIT (later packets go straight to it).
    started: bool,
    replies: usize,
    invalid: usize,
}

impl Gate {
    fn new(pair: &Pair, lifetime: Duration) -> Self {
        let checker = CookieChecker::new(pair.now, lifetime, &mut ChaCha20Rng::seed_from_u64(99));
        Self { checker, demand: true, started: false, replies: 0, invalid: 0 }
    }

    /// Delivers one datagram from `from` to the responder side, as an endpoint would.
    fn deliver(&mut self, pair: &mut Pair, from: SocketAddr, p: &[u8]) {
        let first = matches!(p[0], wire::TYPE_HANDSHAKE_INIT | wire::TYPE_HANDSHAKE_INIT_COOKIE);
        if !first || self.started {
            let _ = pair.deliver_to_b(p);
            return;
        }
        let mut out = [0u8; 64];
        let verdict = self.checker.verdict(pair.now, &from, p, self.demand, &pair.b_config, &mut out);
        match verdict {
            Verdict::Proceed { init, .. } => {
                self.started = true;
                let init = init.to_vec();
                let _ = pair.deliver_to_b(&init);
            }
            Verdict::CookieReply { len, cookie } => {
                assert!(len < p.len(), "reply larger than its INIT");
                self.replies += 1;
                self.invalid += usize::from(cookie == CookieStatus::Invalid);
                pair.to_a.push_back(out[..len].to_vec());
            }
            v => panic!("unexpected verdict {v:?}"),
        }
    }

    /// Exchanges packets until nothing moves (bounded), every initiator packet passing the gate.
    fn drive(&mut self, pair: &mut Pair) {
        for _ in 0..100 {
            pair.events();
            pair.flush();
            if pair.to_a.is_empty() && pair.to_b.is_empty() {
                return;
            }
            while let Some(p) = pair.to_b.pop_front() {
                self.deliver(pair, INITIATOR_ADDR, &p);
            }
            while let Some(p) = pair.to_a.pop_front() {
                let _ = pair.deliver_to_a(&p);
            }
        }
        panic!("did not settle");
    }
}

fn datagram_pair(pattern: Pattern, suite: Suite) -> Pair {
    Pair::new(pattern, suite, Mode::Datagram)
}

/// The initiator's first packet (its INIT), taken out of flight.
fn take_init(pair: &mut Pair) -> Vec<u8> {
    pair.flush();
    let init = pair.to_b.pop_front().unwrap();
    assert_eq!(init[0], wire::TYPE_HANDSHAKE_INIT);
    assert!(pair.to_b.is_empty());
    init
}

fn cookie_reply(index: u32, cookie: [u8; COOKIE_LEN]) -> Vec<u8> {
    let mut r = vec![0u8; COOKIE_REPLY_LEN];
    wire::encode_cookie_reply(index, &cookie, &mut r).unwrap();
    r
}

fn index_of(init: &[u8]) -> u32 {
    u32::from_be_bytes(init[3..7].try_into().unwrap())
}

#[test]
fn cookie_round_trip_completes_every_datagram_pattern_with_the_handshake_unchanged() {
    for pattern in Pattern::ALL {
        for suite in Suite::ALL {
            // The same seeds without and with a cookie challenge: same keys, same handshake.
            let mut plain = datagram_pair(pattern, suite);
            plain.drive();
            assert!(plain.connected(), "{pattern:?} {suite:?} without cookies");

            let mut pair = datagram_pair(pattern, suite);
            let mut gate = Gate::new(&pair, COOKIE_SECRET_LIFETIME);
            let init = take_init(&mut pair);
            gate.deliver(&mut pair, INITIATOR_ADDR, &init);
            assert_eq!(gate.replies, 1);
            assert!(!gate.started, "an unproven address got a responder");
            let reply = pair.to_a.pop_front().unwrap();
            pair.deliver_to_a(&reply).unwrap();
            pair.flush();
            let again = pair.to_b.front().unwrap().clone();
            // spec §5.7.4: the same INIT, byte for byte, behind the cookie.
            assert_eq!(again[0], wire::TYPE_HANDSHAKE_INIT_COOKIE);
            assert_eq!(&again[1..INIT_COOKIE_PREFIX_LEN], &reply[5..]);
            assert_eq!(&again[INIT_COOKIE_PREFIX_LEN..], &init[..]);
            gate.drive(&mut pair);
            assert!(gate.started && pair.connected(), "{pattern:?} {suite:?} with a cookie");
            assert_eq!(gate.replies, 1);
            // spec §5.2: the prologue does not see the cookie; both sides agree, and on the same
            // hash as without the challenge.
            let hashes = connected_hashes(&pair.a_events);
            assert_eq!(hashes, connected_hashes(&pair.b_events));
            assert_eq!(hashes, connected_hashes(&plain.a_events), "{pattern:?} {suite:?}");
        }
    }
}

#[test]
fn cookie_from_another_address_is_challenged_again() {
    let mut pair = datagram_pair(Pattern::IK, Suite::ChaChaPolyBlake2s);
    let mut gate = Gate::new(&pair, COOKIE_SECRET_LIFETIME);
    let init = take_init(&mut pair);
    gate.deliver(&mut pair, INITIATOR_ADDR, &init);
    let reply = pair.to_a.pop_front().unwrap();
    pair.deliver_to_a(&reply).unwrap();
    pair.flush();
    let with_cookie = pair.to_b.pop_front().unwrap();
    // A spoofer that copied the INIT_COOKIE and sends it from elsewhere gets a reply, no responder.
    let elsewhere = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 8)), 40_000);
    gate.deliver(&mut pair, elsewhere, &with_cookie);
    assert!(!gate.started);
    assert_eq!((gate.replies, gate.invalid), (2, 1));
    pair.to_a.clear();
    // From the initiator's own address it works.
    gate.deliver(&mut pair, INITIATOR_ADDR, &with_cookie);
    assert!(gate.started);
    gate.drive(&mut pair);
    assert!(pair.connected());
}

#[test]
fn expired_cookie_gets_a_fresh_challenge_and_the_handshake_completes() {
    let mut pair = datagram_pair(Pattern::XX, Suite::ChaChaPolyBlake2s);
    let lifetime = Duration::from_millis(100);
    let mut gate = Gate::new(&pair, lifetime);
    let init = take_init(&mut pair);
    gate.deliver(&mut pair, INITIATOR_ADDR, &init);
    let reply = pair.to_a.pop_front().unwrap();
    // The reply is delayed by two secret lifetimes: its cookie has expired on arrival.
    pair.now = pair.now + Duration::from_millis(200);
    pair.deliver_to_a(&reply).unwrap();
    pair.flush();
    let stale = pair.to_b.pop_front().unwrap();
    gate.deliver(&mut pair, INITIATOR_ADDR, &stale);
    assert_eq!((gate.replies, gate.invalid, gate.started), (2, 1, false));
    gate.drive(&mut pair);
    assert!(pair.connected());
    assert_eq!(gate.replies, 2);
}

#[test]
fn forged_cookie_reply_for_another_index_changes_nothing() {
    let mut pair = datagram_pair(Pattern::IK, Suite::ChaChaPolyBlake2s);
    let init = take_init(&mut pair);
    let forged = cookie_reply(index_of(&init) ^ 1, [7; COOKIE_LEN]);
    assert_eq!(pair.deliver_to_a(&forged), Err(ConnectionError::Handshake(HandshakeError::UnknownIndex)));
    pair.flush();
    assert!(pair.to_b.is_empty(), "a forged reply made the initiator send");
    // The genuine handshake is unaffected.
    pair.to_b.push_back(init);
    pair.drive();
    assert!(pair.connected());
}

#[test]
fn forged_cookie_reply_costs_one_round_trip() {
    let mut pair = datagram_pair(Pattern::IK, Suite::ChaChaPolyBlake2s);
    let mut gate = Gate::new(&pair, COOKIE_SECRET_LIFETIME);
    let init = take_init(&mut pair);
    // An on-path attacker answers first, with the right index and a worthless cookie.
    pair.deliver_to_a(&cookie_reply(index_of(&init), [0xee; COOKIE_LEN])).unwrap();
    gate.deliver(&mut pair, INITIATOR_ADDR, &init);
    gate.drive(&mut pair);
    // The worthless cookie was answered with a genuine one, and that one worked.
    assert!(pair.connected());
    assert_eq!(gate.invalid, 1);
    // Both replies were acted on (the genuine one answers the plain INIT, another the bogus
    // cookie), so a second RESP arrives late: a duplicate, dropped.
    assert!(
        pair.a_errors.iter().all(|e| *e == ConnectionError::Handshake(HandshakeError::UnexpectedPacket)),
        "{:?}",
        pair.a_errors
    );
}

#[test]
fn at_most_three_cookie_replies_are_acted_on_and_the_timeout_does_not_move() {
    let mut pair = datagram_pair(Pattern::IK, Suite::ChaChaPolyBlake2s);
    let created = pair.now;
    let init = take_init(&mut pair);
    for n in 0..MAX_COOKIE_REPLIES {
        pair.now = created + Duration::from_secs(3 * u64::from(n) + 1);
        let cookie = [n; COOKIE_LEN];
        pair.deliver_to_a(&cookie_reply(index_of(&init), cookie)).unwrap();
        pair.flush();
        let sent = pair.to_b.pop_front().unwrap();
        assert!(pair.to_b.is_empty());
        assert_eq!(&sent[1..INIT_COOKIE_PREFIX_LEN], &cookie[..], "the latest cookie replaces the earlier one");
        assert_eq!(&sent[INIT_COOKIE_PREFIX_LEN..], &init[..]);
    }
    let fourth = cookie_reply(index_of(&init), [9; COOKIE_LEN]);
    assert_eq!(pair.deliver_to_a(&fourth), Err(ConnectionError::Handshake(HandshakeError::UnexpectedPacket)));
    pair.flush();
    assert!(pair.to_b.is_empty(), "a fourth reply was acted on");
    // Still counted from the creation: the handshake fails at HANDSHAKE_TIMEOUT, not later.
    let deadline = created + HANDSHAKE_TIMEOUT;
    assert_eq!(pair.a.poll_timeout().map(|t| t <= deadline), Some(true));
    pair.now = Timestamp::from_micros(deadline.as_micros() - 1);
    pair.a.handle_timeout(pair.now);
    assert!(!pair.a.is_closed());
    pair.now = deadline;
    pair.a.handle_timeout(pair.now);
    pair.events();
    let closed = closed(&pair.a_events).expect("closed at the handshake timeout");
    assert_eq!(closed.error, Some(ConnectionError::Handshake(HandshakeError::Timeout)));
}

#[test]
fn init_cookie_is_retransmitted_on_a_restarted_schedule() {
    let mut pair = datagram_pair(Pattern::KK, Suite::AesGcmSha256);
    let created = pair.now;
    let init = take_init(&mut pair);
    // The reply comes just before the first INIT retransmission would have.
    pair.now = created + Duration::from_millis(900);
    pair.deliver_to_a(&cookie_reply(index_of(&init), [3; COOKIE_LEN])).unwrap();
    pair.flush();
    let first = pair.to_b.pop_front().unwrap();
    // The old schedule (t = 1 s) is gone: the next send is HANDSHAKE_RTO after the reply.
    assert_eq!(pair.a.poll_timeout(), Some(pair.now + Duration::from_secs(1)));
    pair.now = pair.now + Duration::from_secs(1);
    pair.a.handle_timeout(pair.now);
    pair.flush();
    assert_eq!(pair.to_b.pop_front().as_ref(), Some(&first), "the INIT_COOKIE is what is repeated");
}

#[test]
fn cookie_reply_outside_the_waiting_window_is_unexpected() {
    // Established initiator.
    let mut pair = datagram_pair(Pattern::IK, Suite::ChaChaPolyBlake2s);
    pair.drive();
    assert!(pair.connected());
    let reply = cookie_reply(pair.a.local_index(), [1; COOKIE_LEN]);
    assert_eq!(pair.deliver_to_a(&reply), Err(ConnectionError::Handshake(HandshakeError::UnexpectedPacket)));
    // A responder never accepts one.
    let reply = cookie_reply(pair.b.local_index(), [1; COOKIE_LEN]);
    assert_eq!(pair.deliver_to_b(&reply), Err(ConnectionError::Handshake(HandshakeError::UnexpectedPacket)));
    pair.flush();
    assert!(pair.to_a.is_empty() && pair.to_b.is_empty());
    assert!(pair.connected());
    // An XX initiator that has read RESP is past the window too.
    let mut xx = datagram_pair(Pattern::XX, Suite::ChaChaPolyBlake2s);
    xx.flush();
    let init = xx.to_b.pop_front().unwrap();
    xx.deliver_to_b(&init).unwrap();
    xx.flush();
    let resp = xx.to_a.pop_front().unwrap();
    xx.deliver_to_a(&resp).unwrap();
    let reply = cookie_reply(index_of(&init), [1; COOKIE_LEN]);
    assert_eq!(xx.deliver_to_a(&reply), Err(ConnectionError::Handshake(HandshakeError::UnexpectedPacket)));
}

#[test]
fn cookie_packets_in_stream_mode_are_the_wrong_mode() {
    let mut pair = Pair::new(Pattern::IK, Suite::ChaChaPolyBlake2s, Mode::Stream);
    pair.flush();
    let reply = cookie_reply(0, [1; COOKIE_LEN]);
    assert_eq!(pair.deliver_to_a(&reply), Err(ConnectionError::Decode(DecodeError::WrongMode)));
}

#[test]
fn duplicate_init_cookie_is_answered_from_the_responders_cache() {
    let mut pair = datagram_pair(Pattern::IK, Suite::ChaChaPolyBlake2s);
    let mut gate = Gate::new(&pair, COOKIE_SECRET_LIFETIME);
    let init = take_init(&mut pair);
    gate.deliver(&mut pair, INITIATOR_ADDR, &init);
    let reply = pair.to_a.pop_front().unwrap();
    pair.deliver_to_a(&reply).unwrap();
    pair.flush();
    let with_cookie = pair.to_b.pop_front().unwrap();
    gate.deliver(&mut pair, INITIATOR_ADDR, &with_cookie);
    pair.flush();
    let resp = pair.to_a.pop_front().unwrap();
    assert_eq!(resp[0], wire::TYPE_HANDSHAKE_RESP);
    // A copy of the INIT_COOKIE, of the plain INIT, or the INIT behind another cookie: the
    // cached RESP again, byte for byte (no new handshake work).
    let mut other_cookie = with_cookie.clone();
    other_cookie[1] ^= 0xff;
    for copy in [&with_cookie, &init, &other_cookie] {
        pair.deliver_to_b(copy).unwrap();
        pair.flush();
        assert_eq!(pair.to_a.pop_front().as_ref(), Some(&resp));
        assert!(pair.to_a.is_empty());
    }
}

#[test]
fn init_cookie_with_an_unknown_version_inside_gets_the_reject() {
    let mut pair = datagram_pair(Pattern::IK, Suite::ChaChaPolyBlake2s);
    let mut init = take_init(&mut pair);
    init[1] = 9;
    let mut p = vec![0u8; INIT_COOKIE_PREFIX_LEN + init.len()];
    wire::encode_init_cookie(&[0; COOKIE_LEN], &init, &mut p).unwrap();
    assert_eq!(
        pair.deliver_to_b(&p),
        Err(ConnectionError::Handshake(HandshakeError::Decode(DecodeError::UnsupportedVersion(9))))
    );
    pair.flush();
    let reject = pair.to_a.pop_front().unwrap();
    let mut expected = vec![wire::TYPE_HANDSHAKE_REJECT];
    expected.extend_from_slice(&init[3..7]);
    expected.push(RejectReason::UnsupportedVersion.code());
    assert_eq!(reject, expected);
}
