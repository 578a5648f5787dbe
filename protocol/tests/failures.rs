//! Failure paths of the connection driver, each checked against the rule of the spec that
//! defines it (spec §4.3, §5, §7, §9, §10): wrong keys, denials, downgrades, negotiation
//! REJECTs, timers, limits, retransmission and protocol violations.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod util;

use std::cell::RefCell;
use std::rc::Rc;

use bytes::Bytes;
use util::*;
use veil_protocol::message::{KIND_DATA, KIND_FLOW_REPORT, KIND_FORWARD};
use veil_protocol::wire::{InitHeader, RejectReason, TYPE_HANDSHAKE_FINAL, TYPE_HANDSHAKE_INIT, TYPE_HANDSHAKE_REJECT};
use veil_protocol::{
    CloseReason, Closed, Connection, ConnectionError, Decision, DecodeError, DenyReason, Duration, Event,
    HandshakeError, Limits, Mode, Pattern, SessionError, Suite, Timestamp,
};

const MODES: [Mode; 2] = [Mode::Stream, Mode::Datagram];

/// Packets seen in flight, with their direction.
type Log = Rc<RefCell<Vec<(Dir, Vec<u8>)>>>;

/// A hook that records every packet in flight, per direction, and passes it on.
fn recorder() -> (Hook, Log) {
    let log = Rc::new(RefCell::new(Vec::new()));
    let l = Rc::clone(&log);
    let hook: Hook = Box::new(move |d, p| {
        l.borrow_mut().push((d, p.clone()));
        vec![p]
    });
    (hook, log)
}

fn packets(log: &Log, dir: Dir) -> Vec<Vec<u8>> {
    log.borrow().iter().filter(|(d, _)| *d == dir).map(|(_, p)| p.clone()).collect()
}

fn handshake_error(c: Option<&Closed>) -> Option<HandshakeError> {
    match c {
        Some(Closed { error: Some(ConnectionError::Handshake(e)), .. }) => Some(e.clone()),
        _ => None,
    }
}

fn assert_nobody_connected(pair: &Pair, what: &str) {
    assert!(connected_hashes(&pair.a_events).is_empty(), "{what}: initiator connected: {:?}", pair.a_events);
    assert!(connected_hashes(&pair.b_events).is_empty(), "{what}: responder connected: {:?}", pair.b_events);
    assert!(!pair.a.is_connected() && !pair.b.is_connected(), "{what}");
}

/// A connected pair.
fn connected(pattern: Pattern, suite: Suite, mode: Mode) -> Pair {
    let mut pair = Pair::new(pattern, suite, mode);
    pair.drive();
    assert!(pair.connected(), "{pattern:?} {suite:?} {mode:?}: {:?} / {:?}", pair.a_errors, pair.b_errors);
    pair
}

/// Seals `plaintext` with the sender's session directly, bypassing its message encoder: the
/// only way to put bytes a correct peer never sends inside an authenticated packet.
fn seal_raw(conn: &mut Connection, now: Timestamp, plaintext: &[u8]) -> Vec<u8> {
    let s = conn.session_mut().unwrap();
    let h = s.header_len();
    let mut buf = vec![0u8; h + plaintext.len() + 16];
    buf[h..h + plaintext.len()].copy_from_slice(plaintext);
    let n = s.seal(now, &mut buf, plaintext.len()).unwrap();
    buf.truncate(n);
    buf
}

// ---------------------------------------------------------------------------------------------
// Authentication: wrong key, denial, psk (spec §5.4, §5.5, §10 #8, #10)
// ---------------------------------------------------------------------------------------------

#[test]
fn wrong_responder_key_fails_and_nobody_connects() {
    for pattern in [Pattern::IK, Pattern::KK, Pattern::IKpsk2] {
        for suite in Suite::ALL {
            for mode in MODES {
                let what = format!("{pattern:?} {suite:?} {mode:?}");
                let mut s = Setup::new(pattern, suite, mode);
                s.a_expects = Some(*keypair(9).public());
                let mut pair = Pair::with(s);
                pair.drive();
                // The responder cannot read INIT (es/ss use a key it does not hold) and keeps
                // nothing (spec §10 #8).
                assert!(pair.b.is_closed(), "{what}");
                assert_eq!(handshake_error(closed(&pair.b_events)), Some(HandshakeError::Crypto), "{what}");
                match mode {
                    // spec §10 #8: a stream responder answers REJECT(Malformed) and closes; the
                    // initiator fails at once.
                    Mode::Stream => {
                        assert!(pair.a.is_closed(), "{what}");
                        assert_eq!(
                            handshake_error(closed(&pair.a_events)),
                            Some(HandshakeError::Rejected(RejectReason::Malformed)),
                            "{what}"
                        );
                    }
                    // Datagram responders stay silent: the initiator times out (spec §5.7.3).
                    _ => {
                        assert_eq!(pair.b.stats().packets_sent, 0, "{what}");
                        pair.advance(Duration::from_secs(11));
                        assert_eq!(handshake_error(closed(&pair.a_events)), Some(HandshakeError::Timeout), "{what}");
                    }
                }
                assert_nobody_connected(&pair, &what);
            }
        }
    }
}

#[test]
fn responder_denial_leaves_no_session_on_either_side() {
    for pattern in Pattern::ALL {
        for mode in MODES {
            let what = format!("{pattern:?} {mode:?}");
            let (hook, log) = recorder();
            let mut pair = Pair::new(pattern, Suite::ChaChaPolyBlake2s, mode);
            pair.hook = Some(hook);
            pair.decide_b = Some(Decision::deny());
            pair.a.send(1, Bytes::from_static(b"must not arrive")).unwrap();
            pair.drive();
            // The responder asked, was told no, and closed without a session (spec §5.5).
            assert!(
                pair.b_events.iter().any(
                    |e| matches!(e, Event::AuthorizationRequired { remote_static, .. } if *remote_static == pair.a_key)
                ),
                "{what}"
            );
            assert!(pair.b.is_closed(), "{what}");
            let c = closed(&pair.b_events).unwrap();
            assert_eq!(c.reason, CloseReason::Unauthorized, "{what}");
            assert_eq!(handshake_error(Some(c)), Some(HandshakeError::Denied(DenyReason::Unauthorized)), "{what}");
            assert!(connected_hashes(&pair.b_events).is_empty(), "{what}");
            assert!(pair.b_messages().is_empty(), "{what}");
            assert_eq!(pair.b.session().map(|s| s.local_index()), None, "{what}: responder kept a session");
            // Nothing is accepted afterwards, not even a copy of the initiator's packets.
            let first = packets(&log, Dir::AtoB)[0].clone();
            assert_eq!(pair.b.handle_input(pair.now, &first), Err(ConnectionError::Closed), "{what}");
            let from_b = packets(&log, Dir::BtoA);
            match mode {
                Mode::Stream => {
                    // spec §5.5: REJECT(Unauthorized), then close; the initiator fails with it,
                    // XX included (it is already Connected after FINAL, spec §5.7.1).
                    assert_eq!(from_b.last().unwrap(), &vec![TYPE_HANDSHAKE_REJECT, 0x06], "{what}");
                    assert!(pair.a.is_closed(), "{what}");
                    assert_eq!(
                        handshake_error(closed(&pair.a_events)),
                        Some(HandshakeError::Rejected(RejectReason::Unauthorized)),
                        "{what}"
                    );
                }
                _ => {
                    // No oracle: the denial sends nothing (spec §5.5, §11.9); the initiator's
                    // handshake times out.
                    let expected_from_b = usize::from(pattern.message_count() == 3);
                    assert_eq!(from_b.len(), expected_from_b, "{what}: only an XX RESP leaves the responder");
                    pair.advance(Duration::from_secs(11));
                    assert!(pair.a.is_closed(), "{what}");
                    assert_eq!(handshake_error(closed(&pair.a_events)), Some(HandshakeError::Timeout), "{what}");
                }
            }
            if pattern.message_count() == 2 {
                assert!(connected_hashes(&pair.a_events).is_empty(), "{what}");
            }
            assert!(pair.b_messages().is_empty(), "{what}");
        }
    }
}

#[test]
fn xx_initiator_denying_the_responder_abandons_the_handshake() {
    for pattern in [Pattern::XX, Pattern::XXpsk3] {
        for mode in MODES {
            let what = format!("{pattern:?} {mode:?}");
            let mut pair = Pair::new(pattern, Suite::ChaChaPolyBlake2s, mode);
            pair.decide_a = Some(Decision::deny());
            pair.drive();
            assert!(
                pair.a_events.iter().any(
                    |e| matches!(e, Event::AuthorizationRequired { remote_static, .. } if *remote_static == pair.b_key)
                ),
                "{what}"
            );
            assert!(pair.a.is_closed(), "{what}");
            let c = closed(&pair.a_events).unwrap();
            assert_eq!((c.reason, c.by_peer), (CloseReason::Unauthorized, false), "{what}");
            assert_eq!(handshake_error(Some(c)), Some(HandshakeError::Denied(DenyReason::Unauthorized)), "{what}");
            // spec §5.5: the denying initiator sends nothing after INIT.
            assert_eq!(pair.a.stats().packets_sent, 1, "{what}");
            pair.advance(Duration::from_secs(11));
            assert!(pair.b.is_closed(), "{what}");
            assert_eq!(handshake_error(closed(&pair.b_events)), Some(HandshakeError::Timeout), "{what}");
            assert_nobody_connected(&pair, &what);
        }
    }
}

#[test]
fn psk_mismatch_fails_the_handshake() {
    for pattern in [Pattern::IKpsk2, Pattern::XXpsk3] {
        for suite in Suite::ALL {
            for mode in MODES {
                let what = format!("{pattern:?} {suite:?} {mode:?}");
                let mut s = Setup::new(pattern, suite, mode);
                s.a_psk = Some([1; 32]);
                s.b_psk = Some([2; 32]);
                let mut pair = Pair::with(s);
                pair.a.send(1, Bytes::from_static(b"secret")).unwrap();
                pair.drive();
                pair.advance(Duration::from_secs(11));
                // Whoever reads the first message mixing the psk fails: the initiator on RESP
                // (IKpsk2), the responder on FINAL (XXpsk3).
                assert!(pair.a.is_closed() && pair.b.is_closed(), "{what}");
                assert!(connected_hashes(&pair.b_events).is_empty(), "{what}");
                assert!(pair.b_messages().is_empty(), "{what}");
                let (reader_errors, reader_events) = match pattern {
                    Pattern::IKpsk2 => (&pair.a_errors, &pair.a_events),
                    _ => (&pair.b_errors, &pair.b_events),
                };
                assert!(
                    reader_errors.contains(&ConnectionError::Handshake(HandshakeError::Crypto)),
                    "{what}: {reader_errors:?}"
                );
                let a_err = handshake_error(closed(&pair.a_events));
                let b_err = handshake_error(closed(&pair.b_events));
                match (pattern, mode) {
                    (Pattern::IKpsk2, Mode::Stream) => {
                        assert_eq!(a_err, Some(HandshakeError::Crypto), "{what}");
                        assert_eq!(b_err, Some(HandshakeError::Timeout), "{what}");
                    }
                    (Pattern::XXpsk3, Mode::Stream) => {
                        assert_eq!(handshake_error(closed(reader_events)), Some(HandshakeError::Crypto), "{what}");
                        assert_eq!(a_err, Some(HandshakeError::Rejected(RejectReason::Malformed)), "{what}");
                    }
                    // Datagram: the broken message is dropped and the handshake waits for a
                    // genuine one until its timeout (spec §10 #8, §10.3).
                    _ => {
                        assert_eq!(a_err, Some(HandshakeError::Timeout), "{what}");
                        assert_eq!(b_err, Some(HandshakeError::Timeout), "{what}");
                    }
                }
                if pattern == Pattern::IKpsk2 {
                    assert_nobody_connected(&pair, &what);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Negotiation: downgrade, unknown codes, accept lists (spec §4.3, §5.2, §5.8, §11.7)
// ---------------------------------------------------------------------------------------------

#[test]
fn altering_any_bit_of_the_init_header_never_connects() {
    let mut cases = 0;
    for pattern in Pattern::ALL {
        for mode in MODES {
            let hlen = InitHeader::len(mode);
            for bit in 0..hlen * 8 {
                let what = format!("{pattern:?} {mode:?} bit {bit}");
                let mut pair = Pair::new(pattern, Suite::ChaChaPolyBlake2s, mode);
                // The attacker rewrites every copy of INIT (retransmissions are byte-identical).
                let mut init: Option<Vec<u8>> = None;
                pair.hook = Some(Box::new(move |d, p| {
                    if d == Dir::AtoB && init.get_or_insert_with(|| p.clone()) == &p {
                        vec![flip_bit(&p, bit)]
                    } else {
                        vec![p]
                    }
                }));
                pair.drive();
                pair.advance(Duration::from_secs(11));
                assert_nobody_connected(&pair, &what);
                assert!(pair.a.is_closed() && pair.b.is_closed(), "{what}");
                assert!(!pair.a_errors.is_empty() || !pair.b_errors.is_empty(), "{what}: nothing was refused");
                cases += 1;
            }
        }
    }
    assert_eq!(cases, 5 * (3 + 7) * 8);
}

/// Rewrites the INIT header byte at `at` to `value`, records the responder's answer.
fn negotiate(
    mode: Mode,
    at: usize,
    value: u8,
    edit_b: impl FnOnce(&mut veil_protocol::Config),
) -> (Pair, Vec<Vec<u8>>) {
    let (mut rec, log) = recorder();
    let s = Setup::new(Pattern::IK, Suite::ChaChaPolyBlake2s, mode);
    let mut pair = Pair::with_configs(s, |_| {}, edit_b);
    pair.hook = Some(Box::new(move |d, mut p| {
        if d == Dir::AtoB && p[0] == TYPE_HANDSHAKE_INIT {
            p[at] = value;
        }
        rec(d, p)
    }));
    pair.drive();
    let from_b = packets(&log, Dir::BtoA);
    (pair, from_b)
}

fn expected_reject(pair: &Pair, mode: Mode, reason: RejectReason) -> Vec<u8> {
    match mode {
        Mode::Stream => vec![TYPE_HANDSHAKE_REJECT, reason.code()],
        // spec §4.2: a datagram REJECT names the initiator's index from INIT.
        _ => {
            let mut r = vec![TYPE_HANDSHAKE_REJECT];
            r.extend_from_slice(&pair.a.local_index().to_be_bytes());
            r.push(reason.code());
            r
        }
    }
}

fn assert_rejected(pair: &Pair, from_b: &[Vec<u8>], mode: Mode, reason: RejectReason, b_error: HandshakeError) {
    let what = format!("{mode:?} {reason:?}");
    assert_eq!(pair.b_errors, vec![ConnectionError::Handshake(b_error)], "{what}");
    assert!(pair.b.is_closed(), "{what}: the responder keeps no state");
    assert_eq!(from_b, &[expected_reject(pair, mode, reason)][..], "{what}");
    // The initiator takes the REJECT as a failed handshake (spec §5.8).
    assert!(pair.a.is_closed(), "{what}");
    assert_eq!(handshake_error(closed(&pair.a_events)), Some(HandshakeError::Rejected(reason)), "{what}");
    assert_nobody_connected(pair, &what);
}

#[test]
fn unknown_version_pattern_or_suite_is_a_typed_error_and_a_reject() {
    for mode in MODES {
        for v in [0u8, 2, 0x7f, 0xff] {
            let (pair, from_b) = negotiate(mode, 1, v, |_| {});
            let e = HandshakeError::Decode(DecodeError::UnsupportedVersion(v));
            assert_rejected(&pair, &from_b, mode, RejectReason::UnsupportedVersion, e);
        }
        for p in [0u8, 6, 7, 15] {
            let (pair, from_b) = negotiate(mode, 2, p << 4 | Suite::ChaChaPolyBlake2s.code(), |_| {});
            let e = HandshakeError::Decode(DecodeError::UnsupportedPattern(p));
            assert_rejected(&pair, &from_b, mode, RejectReason::UnsupportedPattern, e);
        }
        for s in [0u8, 3, 9, 15] {
            let (pair, from_b) = negotiate(mode, 2, Pattern::IK.code() << 4 | s, |_| {});
            let e = HandshakeError::Decode(DecodeError::UnsupportedSuite(s));
            assert_rejected(&pair, &from_b, mode, RejectReason::UnsupportedSuite, e);
        }
    }
}

#[test]
fn pattern_or_suite_outside_the_accept_lists_is_rejected() {
    for mode in MODES {
        // Unchanged header (byte 1 stays the version); only the responder's policy differs.
        let v = veil_protocol::PROTOCOL_VERSION;
        let (pair, from_b) = negotiate(mode, 1, v, |c| c.accept_patterns = vec![Pattern::XX, Pattern::KK]);
        assert_rejected(&pair, &from_b, mode, RejectReason::UnsupportedPattern, HandshakeError::NotAccepted);
        let (pair, from_b) = negotiate(mode, 1, v, |c| c.accept_suites = vec![Suite::AesGcmSha256]);
        assert_rejected(&pair, &from_b, mode, RejectReason::UnsupportedSuite, HandshakeError::NotAccepted);
        // Both unacceptable: the pattern is named.
        let (pair, from_b) = negotiate(mode, 1, v, |c| {
            c.accept_patterns = vec![Pattern::XX];
            c.accept_suites = vec![Suite::AesGcmSha256];
        });
        assert_rejected(&pair, &from_b, mode, RejectReason::UnsupportedPattern, HandshakeError::NotAccepted);
    }
}

// ---------------------------------------------------------------------------------------------
// Timers (spec §5.7, §7.4, §7.5, §7.6)
// ---------------------------------------------------------------------------------------------

#[test]
fn handshake_times_out_against_a_silent_peer() {
    for mode in MODES {
        let (mut rec, log) = recorder();
        let mut pair = Pair::new(Pattern::IK, Suite::ChaChaPolyBlake2s, mode);
        // Everything is recorded, nothing arrives.
        pair.hook = Some(Box::new(move |d, p| {
            rec(d, p);
            vec![]
        }));
        let start = pair.now;
        pair.drive();
        pair.advance(Duration::from_micros(10_000_000 - 1));
        assert!(!pair.a.is_closed(), "{mode:?}: closed before HANDSHAKE_TIMEOUT");
        pair.advance(Duration::from_micros(1));
        assert_eq!(pair.now, start + Duration::from_secs(10));
        assert!(pair.a.is_closed(), "{mode:?}");
        let c = closed(&pair.a_events).unwrap();
        assert_eq!(handshake_error(Some(c)), Some(HandshakeError::Timeout), "{mode:?}");
        assert!(!c.by_peer);
        // spec §5.7.2: within HANDSHAKE_TIMEOUT a datagram initiator sends INIT at t = 0, 1, 3
        // and 7 s, byte-identical; stream mode never retransmits.
        let sent = packets(&log, Dir::AtoB);
        let expected = if mode == Mode::Datagram { 4 } else { 1 };
        assert_eq!(sent.len(), expected, "{mode:?}");
        assert!(sent.iter().all(|p| *p == sent[0]), "{mode:?}: retransmissions differ");
        assert_eq!(pair.a.poll_timeout(), None);
    }
}

#[test]
fn idle_timeout_closes_a_connection_that_hears_nothing() {
    for mode in MODES {
        let mut pair = connected(Pattern::IK, Suite::ChaChaPolyBlake2s, mode);
        pair.hook = Some(Box::new(|_, _| vec![]));
        pair.advance(Duration::from_secs(59));
        assert!(pair.connected(), "{mode:?}: keepalives are lost, but IDLE_TIMEOUT has not passed");
        pair.advance(Duration::from_secs(2));
        for (conn, events) in [(&mut pair.a, &pair.a_events), (&mut pair.b, &pair.b_events)] {
            assert!(conn.is_closed(), "{mode:?}");
            assert_eq!(
                closed(events),
                Some(&Closed { reason: CloseReason::IdleTimeout, by_peer: false, error: None }),
                "{mode:?}"
            );
            // spec §7.5: closing on idle sends nothing.
            assert_eq!(conn.poll_transmit(pair.now, &mut pair.buf), Ok(None));
        }
    }
}

/// `Connection::abandon` (spec §17.4 rule 6): a local close, as the idle timeout's: `Closed`
/// with the reason and `by_peer: false`, queued data dropped, nothing sent, no timer left;
/// the peer hears nothing. A second call changes nothing.
#[test]
fn abandon_closes_locally_and_sends_nothing() {
    for mode in MODES {
        let mut pair = connected(Pattern::IK, Suite::ChaChaPolyBlake2s, mode);
        pair.a.send(1, bytes::Bytes::from_static(b"never sent")).unwrap();
        pair.a.abandon(pair.now, CloseReason::IdleTimeout);
        pair.a.abandon(pair.now, CloseReason::Normal);
        assert!(pair.a.is_closed(), "{mode:?}");
        assert_eq!(pair.a.poll_transmit(pair.now, &mut pair.buf), Ok(None), "{mode:?}");
        assert_eq!(pair.a.poll_timeout(), None, "{mode:?}");
        pair.events();
        assert_eq!(
            closed(&pair.a_events),
            Some(&Closed { reason: CloseReason::IdleTimeout, by_peer: false, error: None }),
            "{mode:?}"
        );
        pair.drive();
        assert!(pair.b.is_connected() && closed(&pair.b_events).is_none(), "{mode:?}: the peer heard nothing");
        assert!(pair.b_messages().is_empty(), "{mode:?}");
    }
}

#[test]
fn keepalives_keep_an_idle_connection_up() {
    for mode in MODES {
        let mut pair = connected(Pattern::IK, Suite::ChaChaPolyBlake2s, mode);
        let (a0, b0) = (pair.a.stats().packets_sent, pair.b.stats().packets_sent);
        pair.advance(Duration::from_secs(600));
        assert!(pair.connected(), "{mode:?}: {:?}", pair.a_events.last());
        // One empty packet per KEEPALIVE_INTERVAL (15 s) at most, and no data.
        for (sent, before) in [(pair.a.stats().packets_sent, a0), (pair.b.stats().packets_sent, b0)] {
            let keepalives = sent - before;
            assert!((30..=41).contains(&keepalives), "{mode:?}: {keepalives} keepalives in 10 min");
        }
        assert!(pair.a_messages().is_empty() && pair.b_messages().is_empty());
        assert!(pair.a_errors.is_empty() && pair.b_errors.is_empty(), "{:?} {:?}", pair.a_errors, pair.b_errors);
        // Still usable.
        pair.a.send(3, Bytes::from_static(b"still here")).unwrap();
        pair.drive();
        assert_eq!(pair.b_messages(), vec![(3, 0, b"still here".to_vec())]);
    }
}

#[test]
fn authenticated_close_with_reason_reaches_the_peer() {
    for pattern in [Pattern::IK, Pattern::XX] {
        for mode in MODES {
            for (closer_is_a, reason) in
                [(true, CloseReason::ShuttingDown), (false, CloseReason::Normal), (true, CloseReason::Unknown(999))]
            {
                let what = format!("{pattern:?} {mode:?} {closer_is_a} {reason:?}");
                let mut pair = connected(pattern, Suite::ChaChaPolyBlake2s, mode);
                let now = pair.now;
                let closer = if closer_is_a { &mut pair.a } else { &mut pair.b };
                // Queued data leaves before the Close (spec §7.6).
                closer.send(4, Bytes::from_static(b"last words")).unwrap();
                closer.close(now, reason);
                assert_eq!(closer.send(4, Bytes::from_static(b"too late")), Err(ConnectionError::Closed));
                pair.drive();
                let (mine, theirs, their_msgs) = if closer_is_a {
                    (&pair.a_events, &pair.b_events, pair.b_messages())
                } else {
                    (&pair.b_events, &pair.a_events, pair.a_messages())
                };
                assert_eq!(their_msgs, vec![(4, 0, b"last words".to_vec())], "{what}");
                assert_eq!(closed(theirs), Some(&Closed { reason, by_peer: true, error: None }), "{what}");
                assert_eq!(closed(mine), Some(&Closed { reason, by_peer: false, error: None }), "{what}");
                assert!(pair.a.is_closed() && pair.b.is_closed(), "{what}");
                assert!(matches!(theirs.last(), Some(Event::Closed(_))), "{what}: events after Closed");
            }
        }
    }
}

#[test]
fn session_expires_at_reject_after_time_without_rehandshake() {
    for mode in MODES {
        let mut s = Setup::new(Pattern::IK, Suite::ChaChaPolyBlake2s, mode);
        s.limits = Limits {
            reject_after_time: Duration::from_secs(40),
            rehandshake_after_time: Duration::from_secs(86_400),
            ..Limits::default()
        };
        let mut pair = Pair::with(s);
        pair.drive();
        assert!(pair.connected());
        let established = pair.a.session().unwrap().established_at();
        assert_eq!(established, pair.b.session().unwrap().established_at());
        for i in 0..39u64 {
            pair.a.send(1, Bytes::from(i.to_be_bytes().to_vec())).unwrap();
            pair.advance(Duration::from_secs(1));
        }
        pair.advance((established + Duration::from_micros(40_000_000 - 1)) - pair.now);
        assert!(pair.connected(), "{mode:?}: expired early");
        assert_eq!(pair.b_messages().len(), 39);
        pair.advance(Duration::from_micros(1));
        for (conn, events) in [(&pair.a, &pair.a_events), (&pair.b, &pair.b_events)] {
            assert!(conn.is_closed(), "{mode:?}");
            assert_eq!(
                closed(events),
                Some(&Closed {
                    reason: CloseReason::SessionExpired,
                    by_peer: false,
                    error: Some(ConnectionError::Session(SessionError::Expired)),
                }),
                "{mode:?}"
            );
        }
        assert_eq!(pair.a.stats().rehandshakes, 0);
    }
}

#[cfg(feature = "dangerous-testing")]
#[test]
fn counter_exhaustion_closes_with_too_many_messages() {
    use veil_protocol::session::REJECT_AFTER_MESSAGES;
    for mode in MODES {
        for suite in Suite::ALL {
            let what = format!("{mode:?} {suite:?}");
            let mut pair = connected(Pattern::IK, suite, mode);
            let before = pair.a.stats().packets_sent;
            pair.a.session_mut().unwrap().set_send_counter_for_testing_only(REJECT_AFTER_MESSAGES - 2);
            // The receiver cannot follow a jump of 2^60 (its packets fail to authenticate);
            // this test is about the sender.
            pair.hook = Some(Box::new(|d, p| if d == Dir::AtoB { vec![] } else { vec![p] }));
            for i in 0..2u8 {
                pair.a.send(1, Bytes::from(vec![i])).unwrap();
                pair.drive();
                assert!(pair.a.is_connected(), "{what}: counter {i}");
            }
            assert_eq!(pair.a.session().unwrap().send_counter(), REJECT_AFTER_MESSAGES);
            pair.a.send(1, Bytes::from_static(b"one too many")).unwrap();
            pair.drive();
            assert!(pair.a.is_closed(), "{what}");
            assert_eq!(
                closed(&pair.a_events),
                Some(&Closed {
                    reason: CloseReason::TooManyMessages,
                    by_peer: false,
                    error: Some(ConnectionError::Session(SessionError::CounterExhausted)),
                }),
                "{what}"
            );
            assert_eq!(pair.a.stats().packets_sent - before, 2, "{what}: a counter at or above 2^60 was used");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Datagram retransmission (spec §5.7.2)
// ---------------------------------------------------------------------------------------------

/// Drops the `nth` packet (0-based) of type `ty` travelling in `dir`, and records everything.
fn drop_nth(dir: Dir, ty: u8, nth: usize) -> (Hook, Log) {
    let (mut rec, log) = recorder();
    let mut seen = 0;
    let hook: Hook = Box::new(move |d, p| {
        if d == dir && p[0] == ty {
            seen += 1;
            if seen - 1 == nth {
                return vec![];
            }
        }
        rec(d, p)
    });
    (hook, log)
}

#[test]
fn datagram_initiator_resends_a_lost_init() {
    for pattern in Pattern::ALL {
        let mut pair = Pair::new(pattern, Suite::ChaChaPolyBlake2s, Mode::Datagram);
        let start = pair.now;
        let (hook, log) = drop_nth(Dir::AtoB, TYPE_HANDSHAKE_INIT, 0);
        pair.hook = Some(hook);
        pair.drive();
        assert!(!pair.connected());
        pair.advance(Duration::from_millis(999));
        assert!(!pair.connected(), "{pattern:?}: resent before the RTO");
        pair.advance(Duration::from_millis(1));
        assert!(pair.connected(), "{pattern:?}: {:?} {:?}", pair.a_errors, pair.b_errors);
        assert_eq!(pair.now, start + Duration::from_secs(1));
        let inits: Vec<_> = packets(&log, Dir::AtoB).into_iter().filter(|p| p[0] == TYPE_HANDSHAKE_INIT).collect();
        assert_eq!(inits.len(), 1, "{pattern:?}");
        assert!(pair.a_errors.is_empty() && pair.b_errors.is_empty(), "{pattern:?}");
    }
}

#[test]
fn datagram_responder_resends_its_cached_resp_for_a_duplicate_init() {
    for pattern in Pattern::ALL {
        let mut pair = Pair::new(pattern, Suite::ChaChaPolyBlake2s, Mode::Datagram);
        let (hook, log) = drop_nth(Dir::BtoA, veil_protocol::wire::TYPE_HANDSHAKE_RESP, 0);
        pair.hook = Some(hook);
        pair.drive();
        assert!(!pair.connected());
        pair.advance(Duration::from_secs(1));
        assert!(pair.connected(), "{pattern:?}: {:?} {:?}", pair.a_errors, pair.b_errors);
        let inits: Vec<_> = packets(&log, Dir::AtoB).into_iter().filter(|p| p[0] == TYPE_HANDSHAKE_INIT).collect();
        assert_eq!(inits.len(), 2, "{pattern:?}");
        assert_eq!(inits[0], inits[1], "{pattern:?}: INIT retransmission must be byte-identical");
        // The second RESP the initiator saw is the responder's cached one: the first was lost
        // and no second handshake was started.
        let resps: Vec<_> = packets(&log, Dir::BtoA).into_iter().filter(|p| p[0] == 0x02).collect();
        assert_eq!(resps.len(), 1, "{pattern:?}");
        assert_eq!(pair.a.handshake_hash(), pair.b.handshake_hash());
        pair.a.send(1, Bytes::from_static(b"ok")).unwrap();
        pair.drive();
        assert_eq!(pair.b_messages().len(), 1);
    }
}

#[test]
fn datagram_xx_initiator_resends_final_until_confirmed() {
    for pattern in [Pattern::XX, Pattern::XXpsk3] {
        let mut pair = Pair::new(pattern, Suite::ChaChaPolyBlake2s, Mode::Datagram);
        let (hook, log) = drop_nth(Dir::AtoB, TYPE_HANDSHAKE_FINAL, 0);
        pair.hook = Some(hook);
        pair.drive();
        // The XX initiator is Connected once it wrote FINAL (spec §5.7.1); the responder is not.
        assert!(pair.a.is_connected() && !pair.b.is_connected(), "{pattern:?}");
        pair.advance(Duration::from_secs(1));
        assert!(pair.connected(), "{pattern:?}: {:?} {:?}", pair.a_errors, pair.b_errors);
        // Confirmation stops the retransmissions.
        pair.advance(Duration::from_secs(30));
        let finals = packets(&log, Dir::AtoB).into_iter().filter(|p| p[0] == TYPE_HANDSHAKE_FINAL).count();
        assert_eq!(finals, 1, "{pattern:?}: FINAL resent after confirmation");
        assert!(pair.a_errors.is_empty() && pair.b_errors.is_empty(), "{:?} {:?}", pair.a_errors, pair.b_errors);
    }
}

// ---------------------------------------------------------------------------------------------
// Sizes and backpressure
// ---------------------------------------------------------------------------------------------

#[test]
fn message_larger_than_the_peers_packet_limit_is_refused() {
    for mode in MODES {
        let s = Setup::new(Pattern::IK, Suite::ChaChaPolyBlake2s, mode);
        // The responder accepts at most 200-byte packets and says so in its payload (spec §5.3).
        let mut pair = Pair::with_configs(s, |_| {}, |c| c.limits.max_packet_len = 200);
        pair.drive();
        assert!(pair.connected());
        let max = pair.a.max_message_payload();
        assert!(max < 200 && max > 150, "{mode:?}: {max}");
        assert_eq!(pair.a.send(1, Bytes::from(vec![7u8; max + 1])), Err(ConnectionError::MessageTooLarge));
        pair.a.send(1, Bytes::from(vec![7u8; max])).unwrap();
        // The other direction keeps the default limit.
        assert!(pair.b.max_message_payload() > 60_000);
        pair.drive();
        assert_eq!(pair.b_messages(), vec![(1, 0, vec![7u8; max])], "{mode:?}");
        assert!(pair.b_errors.is_empty(), "{:?}", pair.b_errors);
    }
}

#[test]
fn send_queue_bound_applies_backpressure_until_drained() {
    for mode in MODES {
        let s = Setup::new(Pattern::IK, Suite::ChaChaPolyBlake2s, mode);
        let mut pair = Pair::with_configs(s, |c| c.limits.send_queue_bytes = 1_000, |_| {});
        // Before the connection is confirmed nothing drains.
        pair.a.send(1, Bytes::from(vec![1u8; 400])).unwrap();
        pair.a.send(1, Bytes::from(vec![2u8; 600])).unwrap();
        assert_eq!(pair.a.queued_bytes(), 1_000);
        assert_eq!(pair.a.send(1, Bytes::from(vec![3u8; 1])), Err(ConnectionError::QueueFull));
        assert_eq!(pair.a.queued_bytes(), 1_000, "a refused message must not count");
        pair.drive();
        assert!(pair.connected());
        assert_eq!(pair.a.queued_bytes(), 0);
        // Accepted again, and the refused message did not consume an id.
        assert_eq!(pair.a.send(1, Bytes::from(vec![3u8; 1])), Ok(2));
        // A message larger than the bound goes alone into an empty queue (never stuck).
        pair.drive();
        assert_eq!(pair.a.send(2, Bytes::from(vec![4u8; 5_000])), Ok(0));
        assert_eq!(pair.a.send(2, Bytes::from(vec![5u8; 1])), Err(ConnectionError::QueueFull));
        pair.drive();
        let got: Vec<_> = pair.b_messages().into_iter().map(|(c, id, p)| (c, id, p.len())).collect();
        assert_eq!(got, vec![(1, 0, 400), (1, 1, 600), (1, 2, 1), (2, 0, 5_000)], "{mode:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Protocol violations inside authenticated packets (spec §9.1, §9.2, §10 #22, #23)
// ---------------------------------------------------------------------------------------------

#[test]
fn malformed_or_reserved_messages_close_with_protocol_violation() {
    let valid_data = [KIND_DATA, 1, 0, 2, b'h', b'i'];
    let cases: Vec<(Vec<u8>, DecodeError)> = vec![
        (vec![KIND_FLOW_REPORT, 0], DecodeError::UnknownMessageKind(KIND_FLOW_REPORT)),
        // spec §9.2: an envelope without a packet is malformed (routing kinds are defined).
        (vec![KIND_FORWARD, 0, 0], DecodeError::MalformedMessage),
        (vec![0x80, 0], DecodeError::UnknownMessageKind(0x80)),
        (vec![0x00], DecodeError::UnknownMessageKind(0)),
        // A valid message followed by a reserved one: the packet is refused as a whole.
        ([&valid_data[..], &[KIND_FLOW_REPORT, 0]].concat(), DecodeError::UnknownMessageKind(KIND_FLOW_REPORT)),
        // Data whose payload length claims more bytes than present.
        (vec![KIND_DATA, 1, 1, 9, 0], DecodeError::MalformedMessage),
        // A truncated ping after a valid message.
        ([&valid_data[..], &[0x03]].concat(), DecodeError::MalformedMessage),
    ];
    for mode in MODES {
        for (plaintext, error) in &cases {
            let what = format!("{mode:?} {plaintext:02x?}");
            let mut pair = connected(Pattern::IK, Suite::ChaChaPolyBlake2s, mode);
            let now = pair.now;
            let packet = seal_raw(&mut pair.a, now, plaintext);
            assert_eq!(pair.deliver_to_b(&packet), Err(ConnectionError::Decode(*error)), "{what}");
            assert!(pair.b_messages().is_empty(), "{what}: part of a refused packet was delivered");
            pair.drive();
            assert!(pair.b.is_closed(), "{what}");
            assert_eq!(
                closed(&pair.b_events).map(|c| (c.reason, c.by_peer)),
                Some((CloseReason::ProtocolViolation, false))
            );
            // The violator hears an authenticated Close(ProtocolViolation).
            assert_eq!(
                closed(&pair.a_events),
                Some(&Closed { reason: CloseReason::ProtocolViolation, by_peer: true, error: None }),
                "{what}"
            );
        }
    }
    // Control: the valid message alone is delivered, so the refusals above are about the
    // reserved/malformed bytes and not about sealing by hand.
    for mode in MODES {
        let mut pair = connected(Pattern::IK, Suite::ChaChaPolyBlake2s, mode);
        let now = pair.now;
        let packet = seal_raw(&mut pair.a, now, &valid_data);
        pair.deliver_to_b(&packet).unwrap();
        assert_eq!(pair.b_messages(), vec![(1, 0, b"hi".to_vec())]);
    }
}

#[test]
fn data_queued_before_the_handshake_that_exceeds_the_peer_limit_is_reported_not_stuck() {
    // spec §3.3: the peer's limit is known only after the handshake. A message queued before
    // that does not fit it is taken off the queue with `Event::Unsent`; the rest flows.
    for mode in [Mode::Stream, Mode::Datagram] {
        let s = Setup::new(Pattern::IK, Suite::ChaChaPolyBlake2s, mode);
        let mut pair = Pair::with_configs(s, |_| {}, |b| b.limits.max_packet_len = 256);
        pair.a.send(3, Bytes::from(vec![7u8; 1_000])).unwrap();
        pair.a.send(3, Bytes::from_static(b"small")).unwrap();
        pair.drive();
        assert!(pair.connected(), "{mode:?}");
        let unsent: Vec<_> = pair
            .a_events
            .iter()
            .filter_map(|e| match e {
                Event::Unsent { channel, id, len } => Some((*channel, *id, *len)),
                _ => None,
            })
            .collect();
        assert_eq!(unsent, vec![(3, 0, 1_000)], "{mode:?}");
        assert_eq!(pair.b_messages(), vec![(3, 1, b"small".to_vec())], "{mode:?}");
        // Nothing is left behind: new messages keep flowing.
        pair.a.send(3, Bytes::from_static(b"after")).unwrap();
        pair.drive();
        assert_eq!(pair.b_messages().len(), 2, "{mode:?}");
    }
}
