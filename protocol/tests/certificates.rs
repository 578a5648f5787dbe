//! Certificates in handshakes and typed denials (spec §5.3, §5.4.1, §5.5, §5.8, §15.4, §15.9):
//! where each side's chain travels, who is asked to decide, and what a denial sends and
//! reports.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod util;

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use util::*;
use veil_protocol::payload::HandshakePayload;
use veil_protocol::trust::{CaSigningKey, CertRole, Certificate, CertificateBody, CertificateChain, MAX_CHAIN_LEN};
use veil_protocol::wire::{InitHeader, RejectReason, HANDSHAKE_PAYLOAD_MAX, TYPE_HANDSHAKE_REJECT};
use veil_protocol::{
    Closed, Config, Connection, ConnectionError, Decision, DecodeError, DenyReason, Duration, Event, HandshakeError,
    Mode, Pattern, PublicKey, Role, Suite, Timestamp, PROTOCOL_VERSION,
};

const MODES: [Mode; 2] = [Mode::Stream, Mode::Datagram];
const REASONS: [DenyReason; 3] = [DenyReason::Unauthorized, DenyReason::Revoked, DenyReason::BadCertificate];

type Log = Rc<RefCell<Vec<(Dir, Vec<u8>)>>>;

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

/// A one-certificate chain for `key` signed by a fixed CA.
fn chain_for(key: &PublicKey, name: &str, role: CertRole) -> Vec<u8> {
    let ca = CaSigningKey::from_seed([0xca; 32]);
    let body = CertificateBody::new(*key.as_bytes(), name, role, 1_700_000_000, 1_900_000_000, 7, ca.issuer_id());
    CertificateChain::new(vec![Certificate::sign(body, &ca).unwrap()]).unwrap().encode().unwrap()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn certificate_asked(events: &[Event]) -> Vec<Option<Vec<u8>>> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::AuthorizationRequired { certificate, .. } => Some(certificate.clone()),
            _ => None,
        })
        .collect()
}

fn handshake_error(c: Option<&Closed>) -> Option<HandshakeError> {
    match c {
        Some(Closed { error: Some(ConnectionError::Handshake(e)), .. }) => Some(e.clone()),
        _ => None,
    }
}

/// A pair where both sides hold a chain and the initiator decides about the responder too.
fn certified_pair(pattern: Pattern, mode: Mode) -> (Pair, Vec<u8>, Vec<u8>) {
    let a_chain = chain_for(keypair(1).public(), "device-1", CertRole::Device);
    let b_chain = chain_for(keypair(2).public(), "gateway-1", CertRole::Gateway);
    let (ac, bc) = (a_chain.clone(), b_chain.clone());
    let pair = Pair::with_configs(
        Setup::new(pattern, Suite::ChaChaPolyBlake2s, mode),
        move |a| {
            a.certificate_chain = Some(ac);
            a.authorize_responder = true;
        },
        move |b| b.certificate_chain = Some(bc),
    );
    (pair, a_chain, b_chain)
}

#[test]
fn each_side_hands_its_chain_to_the_deciding_peer_and_never_in_cleartext() {
    for pattern in Pattern::ALL {
        for mode in MODES {
            let what = format!("{pattern:?} {mode:?}");
            let (mut pair, a_chain, b_chain) = certified_pair(pattern, mode);
            let (hook, log) = recorder();
            pair.hook = Some(hook);
            pair.drive();
            assert!(pair.connected(), "{what}: {:?} / {:?}", pair.a_errors, pair.b_errors);
            // spec §5.4.1: the responder sees the initiator's chain (IK/KK message 1, XX message
            // 3), the initiator the responder's (message 2), once each.
            assert_eq!(certificate_asked(&pair.b_events), vec![Some(a_chain.clone())], "{what}");
            assert_eq!(certificate_asked(&pair.a_events), vec![Some(b_chain.clone())], "{what}");
            // Every handshake message that carries a chain is encrypted: no packet shows one,
            // in particular not XX/XXpsk3 message 1 (spec §5.3).
            for (dir, p) in log.borrow().iter() {
                assert!(!contains(p, &a_chain) && !contains(p, &b_chain), "{what}: {dir:?} packet shows a chain");
            }
            // The leaf's name is not visible either (the chain could have been re-framed).
            for (_, p) in log.borrow().iter() {
                assert!(!contains(p, b"device-1") && !contains(p, b"gateway-1"), "{what}");
            }
        }
    }
}

#[test]
fn the_chain_makes_the_handshake_messages_that_carry_it_longer_and_only_those() {
    for pattern in Pattern::ALL {
        let what = format!("{pattern:?}");
        let sizes = |with: bool| {
            let (mut pair, _, _) = certified_pair(pattern, Mode::Stream);
            if !with {
                pair = Pair::with_configs(
                    Setup::new(pattern, Suite::ChaChaPolyBlake2s, Mode::Stream),
                    |a| a.authorize_responder = true,
                    |_| {},
                );
            }
            let (hook, log) = recorder();
            pair.hook = Some(hook);
            pair.drive();
            assert!(pair.connected(), "{what}");
            let hs = |d| packets(&log, d).into_iter().filter(|p| p[0] < 0x10).map(|p| p.len()).collect::<Vec<_>>();
            (hs(Dir::AtoB), hs(Dir::BtoA))
        };
        let (with_a, with_b) = sizes(true);
        let (without_a, without_b) = sizes(false);
        let chain_len = chain_for(keypair(1).public(), "device-1", CertRole::Device).len();
        // postcard: Some tag (already counted as None's 0 byte) + length varint (2 B) + chain.
        let grown = chain_len + 2;
        let xx = matches!(pattern, Pattern::XX | Pattern::XXpsk3);
        let expect_a: Vec<usize> =
            without_a.iter().enumerate().map(|(i, n)| if xx && i == 0 { *n } else { n + grown }).collect();
        let expect_b: Vec<usize> = without_b
            .iter()
            .map(|n| n + chain_for(keypair(2).public(), "gateway-1", CertRole::Gateway).len() + 2)
            .collect();
        assert_eq!(with_a, expect_a, "{what}: initiator's handshake packets");
        assert_eq!(with_b, expect_b, "{what}: responder's handshake packets");
    }
}

#[test]
fn re_handshakes_carry_no_chain_and_ask_for_no_decision() {
    for pattern in Pattern::ALL {
        for mode in MODES {
            let what = format!("{pattern:?} {mode:?}");
            // Bytes each side sends for one re-handshake, with and without chains configured.
            let rehandshake_bytes = |with_chains: bool| {
                let (mut pair, _, _) = certified_pair(pattern, mode);
                if !with_chains {
                    pair = Pair::with_configs(
                        Setup::new(pattern, Suite::ChaChaPolyBlake2s, mode),
                        |a| a.authorize_responder = true,
                        |_| {},
                    );
                }
                pair.drive();
                assert!(pair.connected(), "{what}");
                let asked = (certificate_asked(&pair.a_events).len(), certificate_asked(&pair.b_events).len());
                let before = (pair.a.stats().bytes_sent, pair.b.stats().bytes_sent);
                pair.a.start_rehandshake(pair.now).unwrap();
                pair.drive();
                pair.advance(Duration::from_millis(10));
                assert_eq!(pair.a.stats().rehandshakes, 1, "{what}");
                assert_eq!(
                    (certificate_asked(&pair.a_events).len(), certificate_asked(&pair.b_events).len()),
                    asked,
                    "{what}: a re-handshake ran a decision"
                );
                (pair.a.stats().bytes_sent - before.0, pair.b.stats().bytes_sent - before.1)
            };
            // spec §5.4.1: the chains change nothing in a re-handshake.
            assert_eq!(rehandshake_bytes(true), rehandshake_bytes(false), "{what}");
        }
    }
}

#[test]
fn without_authorize_responder_a_two_message_initiator_is_not_asked() {
    for pattern in [Pattern::IK, Pattern::IKpsk2, Pattern::KK] {
        for mode in MODES {
            let mut pair = Pair::with_configs(
                Setup::new(pattern, Suite::ChaChaPolyBlake2s, mode),
                |_| {},
                |b| b.certificate_chain = Some(chain_for(keypair(2).public(), "gateway-1", CertRole::Gateway)),
            );
            pair.decide_a = None;
            pair.drive();
            assert!(pair.connected(), "{pattern:?} {mode:?}");
            assert!(certificate_asked(&pair.a_events).is_empty(), "{pattern:?} {mode:?}");
        }
    }
}

#[test]
fn a_responder_denial_sends_the_mapped_reject_and_closes_with_the_mapped_reason() {
    for reason in REASONS {
        for pattern in Pattern::ALL {
            for mode in MODES {
                let what = format!("{reason:?} {pattern:?} {mode:?}");
                let (mut pair, _, _) = certified_pair(pattern, mode);
                let (hook, log) = recorder();
                pair.hook = Some(hook);
                pair.decide_b = Some(Decision::Deny(reason));
                pair.drive();
                let c = closed(&pair.b_events).unwrap();
                assert_eq!((c.reason, c.by_peer), (reason.close_reason(), false), "{what}");
                assert_eq!(handshake_error(Some(c)), Some(HandshakeError::Denied(reason)), "{what}");
                let from_b = packets(&log, Dir::BtoA);
                match mode {
                    Mode::Stream => {
                        // spec §5.5, §5.8, §15.9: the REJECT names the reason, and the initiator
                        // reports it (XX included: it accepts REJECT after FINAL, §5.7.1).
                        let code = reason.reject_reason().code();
                        assert_eq!(from_b.last().unwrap(), &vec![TYPE_HANDSHAKE_REJECT, code], "{what}");
                        assert_eq!(
                            handshake_error(closed(&pair.a_events)),
                            Some(HandshakeError::Rejected(reason.reject_reason())),
                            "{what}"
                        );
                    }
                    _ => {
                        // No oracle in datagram mode (spec §11.9): nothing after the denial.
                        assert!(from_b.iter().all(|p| p[0] != TYPE_HANDSHAKE_REJECT), "{what}");
                        pair.advance(Duration::from_secs(11));
                        assert_eq!(handshake_error(closed(&pair.a_events)), Some(HandshakeError::Timeout), "{what}");
                    }
                }
                assert!(!pair.b.is_connected() && pair.b.session().is_none(), "{what}");
            }
        }
    }
}

#[test]
fn reject_codes_of_the_deny_reasons_are_the_spec_values() {
    // spec §5.8: 0x06 Unauthorized, 0x07 Revoked, 0x08 BadCertificate; §9.3: 3, 4, 9.
    let codes: Vec<(u8, u16)> = REASONS.iter().map(|r| (r.reject_reason().code(), r.close_reason().code())).collect();
    assert_eq!(codes, vec![(0x06, 3), (0x07, 4), (0x08, 9)]);
    assert_eq!(RejectReason::from_code(0x07), RejectReason::Revoked);
    assert!(matches!(Decision::deny(), Decision::Deny(DenyReason::Unauthorized)));
}

#[test]
fn an_initiator_denying_the_responder_sends_nothing_more_and_closes_with_the_mapped_reason() {
    for reason in REASONS {
        for pattern in Pattern::ALL {
            for mode in MODES {
                let what = format!("{reason:?} {pattern:?} {mode:?}");
                let (mut pair, _, b_chain) = certified_pair(pattern, mode);
                pair.decide_a = Some(Decision::Deny(reason));
                pair.drive();
                assert_eq!(certificate_asked(&pair.a_events), vec![Some(b_chain)], "{what}");
                let c = closed(&pair.a_events).unwrap();
                assert_eq!((c.reason, c.by_peer), (reason.close_reason(), false), "{what}");
                assert_eq!(handshake_error(Some(c)), Some(HandshakeError::Denied(reason)), "{what}");
                // spec §5.5: the denying initiator sends nothing after INIT.
                assert_eq!(pair.a.stats().packets_sent, 1, "{what}");
                pair.advance(Duration::from_secs(11));
                assert!(pair.b.is_closed(), "{what}");
                assert_eq!(handshake_error(closed(&pair.b_events)), Some(HandshakeError::Timeout), "{what}");
                assert!(connected_hashes(&pair.a_events).is_empty() && connected_hashes(&pair.b_events).is_empty());
            }
        }
    }
}

#[test]
fn a_chain_longer_than_a_handshake_payload_allows_is_a_configuration_error() {
    let mut config = Config::new(keypair(1), Mode::Stream);
    config.certificate_chain = Some(vec![0; MAX_CHAIN_LEN + 1]);
    let mut rng = ChaCha20Rng::seed_from_u64(3);
    let r = Connection::new(Arc::new(config), Role::Initiator, Some(*keypair(2).public()), Timestamp::ZERO, &mut rng);
    assert!(matches!(r, Err(ConnectionError::Handshake(HandshakeError::Config(_)))), "{r:?}");
    // The longest allowed chain fits every handshake message.
    for pattern in Pattern::ALL {
        let chain = vec![0x5a; MAX_CHAIN_LEN];
        let c2 = chain.clone();
        let mut pair = Pair::with_configs(
            Setup::new(pattern, Suite::ChaChaPolyBlake2s, Mode::Stream),
            move |a| a.certificate_chain = Some(chain),
            move |b| b.certificate_chain = Some(c2),
        );
        pair.drive();
        assert!(pair.connected(), "{pattern:?}: {:?} / {:?}", pair.a_errors, pair.b_errors);
    }
}

/// An XX INIT built by hand with a certificate in its cleartext payload (spec §5.3 forbids it).
fn xx_init_with_certificate(mode: Mode) -> Vec<u8> {
    let header = InitHeader {
        version: PROTOCOL_VERSION,
        pattern: Pattern::XX,
        suite: Suite::ChaChaPolyBlake2s,
        sender_index: (mode == Mode::Datagram).then_some(9),
    };
    let mut packet = vec![0u8; 7];
    let hlen = header.encode(mode, &mut packet).unwrap();
    packet.truncate(hlen);
    // XX message 1 is `e` and the payload in clear (spec §5.4.1): no Noise needed to write one.
    packet.extend_from_slice(keypair(9).public().as_bytes());
    let payload = HandshakePayload { certificate: Some(vec![1, 2, 3]), ..HandshakePayload::default() };
    let mut plain = [0u8; HANDSHAKE_PAYLOAD_MAX];
    let n = payload.encode(&mut plain).unwrap();
    packet.extend_from_slice(&plain[..n]);
    packet
}

#[test]
fn a_certificate_in_xx_message_1_is_a_malformed_payload() {
    for mode in MODES {
        let mut pair = Pair::new(Pattern::XX, Suite::ChaChaPolyBlake2s, mode);
        let init = xx_init_with_certificate(mode);
        let r = pair.deliver_to_b(&init);
        assert_eq!(
            r,
            Err(ConnectionError::Handshake(HandshakeError::Decode(DecodeError::MalformedPayload))),
            "{mode:?}"
        );
        assert!(certificate_asked(&pair.b_events).is_empty());
        let mut buf = vec![0u8; 2_048];
        let answer = pair.b.poll_transmit(pair.now, &mut buf).unwrap().map(|n| buf[..n].to_vec());
        match mode {
            // spec §5.8: a stream responder says Malformed, whichever check failed.
            Mode::Stream => assert_eq!(answer, Some(vec![TYPE_HANDSHAKE_REJECT, RejectReason::Malformed.code()])),
            _ => assert_eq!(answer, None),
        }
    }
}
