//! Re-handshakes under loss, duplication and odd limits (spec §5.9, §7.3).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod util;

use std::cell::RefCell;
use std::rc::Rc;

use bytes::Bytes;
use util::*;
use veil_protocol::{Decision, Duration, Mode, Pattern, Psk, Suite};

/// Loses every transport packet of the first re-handshake's generation (G set) sent in
/// direction `dir` while the returned switch is on (spec §6.2).
fn lose_new_generation(pair: &mut Pair, dir: Dir) -> Rc<RefCell<bool>> {
    let on = Rc::new(RefCell::new(true));
    let on2 = Rc::clone(&on);
    pair.hook = Some(Box::new(move |d, pkt: Vec<u8>| {
        if d == dir && pkt[0] & 0xFC == 0x10 && pkt[0] & 0x01 != 0 && *on2.borrow() {
            vec![]
        } else {
            vec![pkt]
        }
    }));
    on
}

#[test]
fn a_tampered_final_does_not_stop_the_genuine_one() {
    for p in [Pattern::XX, Pattern::XXpsk3] {
        let mut pair = Pair::new(p, Suite::ChaChaPolyBlake2s, Mode::Datagram);
        pair.hook = Some(Box::new(|d, p: Vec<u8>| {
            if d == Dir::AtoB && p[0] == 0x03 {
                let mut t = p.clone();
                let n = t.len();
                t[n - 1] ^= 1;
                vec![t, p]
            } else {
                vec![p]
            }
        }));
        pair.drive();
        assert!(pair.connected(), "{p:?}: {:?}", pair.b_errors);
    }
}

#[test]
fn an_abandoned_rehandshake_is_retried_and_succeeds() {
    let mut pair = Pair::new(Pattern::IK, Suite::ChaChaPolyBlake2s, Mode::Datagram);
    pair.drive();
    let drop_b = Rc::new(RefCell::new(true));
    let d2 = Rc::clone(&drop_b);
    pair.hook = Some(Box::new(move |d, p: Vec<u8>| if d == Dir::BtoA && *d2.borrow() { vec![] } else { vec![p] }));
    pair.a.start_rehandshake(pair.now).unwrap();
    pair.drive();
    pair.advance(Duration::from_secs(11));
    assert_eq!(pair.a.stats().rehandshakes, 0);
    *drop_b.borrow_mut() = false;
    for _ in 0..6 {
        pair.a.send(1, Bytes::from_static(b"x")).unwrap();
        pair.advance(Duration::from_secs(5));
    }
    assert!(pair.connected());
    assert_eq!(pair.a.stats().rehandshakes, 1, "{:?}", pair.a.stats());
    assert_eq!(pair.b.stats().rehandshakes, 1, "{:?}", pair.b.stats());
    assert_eq!(pair.a.handshake_hash(), pair.b.handshake_hash());
    assert_eq!(pair.b_messages().len(), 6);
}

#[test]
fn a_lost_final_in_an_xx_rehandshake_is_repeated() {
    for p in [Pattern::XX, Pattern::XXpsk3] {
        let mut pair = Pair::new(p, Suite::ChaChaPolyBlake2s, Mode::Datagram);
        pair.drive();
        let count = Rc::new(RefCell::new(0u32));
        let c2 = Rc::clone(&count);
        // The initiator's second packet after starting carries FINAL: lose it.
        pair.hook = Some(Box::new(move |d, p: Vec<u8>| {
            if d == Dir::AtoB {
                *c2.borrow_mut() += 1;
                if *c2.borrow() == 2 {
                    return vec![];
                }
            }
            vec![p]
        }));
        pair.a.start_rehandshake(pair.now).unwrap();
        pair.drive();
        for _ in 0..5 {
            pair.a.send(1, Bytes::from_static(b"up")).unwrap();
            pair.b.send(1, Bytes::from_static(b"down")).unwrap();
            pair.advance(Duration::from_secs(2));
        }
        assert!(pair.connected(), "{p:?}");
        assert_eq!((pair.a.stats().rehandshakes, pair.b.stats().rehandshakes), (1, 1), "{p:?}");
        assert_eq!(pair.a.handshake_hash(), pair.b.handshake_hash());
        assert_eq!(pair.b_messages().len(), 5, "{p:?}");
        assert_eq!(pair.a_messages().len(), 5, "{p:?}");
    }
}

#[test]
fn data_packed_behind_a_stale_rehandshake_message_is_delivered() {
    let mut pair = Pair::new(Pattern::IK, Suite::ChaChaPolyBlake2s, Mode::Datagram);
    pair.drive();
    pair.a.start_rehandshake(pair.now).unwrap();
    let mut buf = vec![0u8; 2000];
    let n = pair.a.poll_transmit(pair.now, &mut buf).unwrap().unwrap();
    let init1 = buf[..n].to_vec();
    pair.deliver_to_b(&init1).unwrap();
    let n = pair.b.poll_transmit(pair.now, &mut buf).unwrap().unwrap();
    let resp1 = buf[..n].to_vec();
    // The INIT is retransmitted; the responder answers the repeat with RESP again, and
    // queued data shares that packet.
    pair.now = pair.now + Duration::from_millis(1000);
    pair.a.handle_timeout(pair.now);
    let n = pair.a.poll_transmit(pair.now, &mut buf).unwrap().unwrap();
    let init2 = buf[..n].to_vec();
    pair.b.send(7, Bytes::from_static(b"packed-after-resp")).unwrap();
    pair.deliver_to_b(&init2).unwrap();
    let n = pair.b.poll_transmit(pair.now, &mut buf).unwrap().unwrap();
    let resp2 = buf[..n].to_vec();
    pair.deliver_to_a(&resp1).unwrap();
    // The repeated RESP is stale by now, but the packet stands and its data is delivered.
    pair.deliver_to_a(&resp2).unwrap();
    assert_eq!(pair.a_messages(), vec![(7, 0, b"packed-after-resp".to_vec())]);
    assert_eq!(pair.a.stats().handshake_messages_ignored, 1);
    pair.drive();
    assert_eq!(pair.a.stats().rehandshakes, 1);
}

#[test]
fn a_per_initiator_psk_is_kept_for_rehandshakes() {
    for mode in [Mode::Stream, Mode::Datagram] {
        let mut s = Setup::new(Pattern::IKpsk2, Suite::ChaChaPolyBlake2s, mode);
        s.a_psk = Some([9u8; 32]);
        s.b_psk = None;
        let mut pair = Pair::with(s);
        pair.decide_b = Some(Decision::Allow { psk: Some(Psk::new([9u8; 32])) });
        pair.drive();
        assert!(pair.connected());
        pair.a.start_rehandshake(pair.now).unwrap();
        pair.drive();
        assert_eq!((pair.a.stats().rehandshakes, pair.b.stats().rehandshakes), (1, 1), "{mode:?} {:?}", pair.b_errors);
        assert!(pair.connected());
    }
}

#[test]
fn a_rehandshake_that_cannot_fit_the_peer_limit_is_abandoned_not_stuck() {
    let mut s = Setup::new(Pattern::IK, Suite::ChaChaPolyBlake2s, Mode::Datagram);
    s.limits.max_packet_len = 128;
    let mut pair = Pair::with(s);
    pair.drive();
    assert!(pair.connected());
    pair.a.start_rehandshake(pair.now).unwrap();
    pair.a.send(1, Bytes::from_static(b"still flows")).unwrap();
    pair.drive();
    assert_eq!(pair.b_messages(), vec![(1, 0, b"still flows".to_vec())]);
    assert_eq!(pair.a.stats().rehandshakes, 0);
    assert!(pair.connected());
}

#[test]
fn the_replaced_session_stays_open_while_the_initiator_awaits_the_responder() {
    // The initiator's new-generation packets are lost for 16 s (longer than the overlap):
    // it keeps repeating its confirmation, its timers do not spin, and the responder's
    // data (sent on the new session, or the old one until confirmed) keeps arriving.
    let mut pair = Pair::new(Pattern::IK, Suite::ChaChaPolyBlake2s, Mode::Datagram);
    pair.drive();
    let drop_new = lose_new_generation(&mut pair, Dir::AtoB);
    pair.a.start_rehandshake(pair.now).unwrap();
    pair.drive();
    for i in 0..8u64 {
        pair.b.send(1, Bytes::from(format!("down {i}"))).unwrap();
        pair.advance(Duration::from_secs(2));
    }
    assert!(pair.connected());
    assert_eq!(pair.a_messages().len(), 8, "{:?}", pair.a_errors);
    *drop_new.borrow_mut() = false;
    for _ in 0..5 {
        pair.a.send(1, Bytes::from_static(b"up")).unwrap();
        pair.b.send(1, Bytes::from_static(b"down")).unwrap();
        pair.advance(Duration::from_secs(2));
    }
    assert!(pair.connected());
    assert_eq!((pair.a.stats().rehandshakes, pair.b.stats().rehandshakes), (1, 1));
    assert_eq!(pair.a.handshake_hash(), pair.b.handshake_hash());
    assert_eq!(pair.a_messages().len(), 13);
    assert_eq!(pair.b_messages().len(), 5);
}

#[test]
fn a_second_rehandshake_waits_for_the_pending_one() {
    // XX: the initiator's new session stays pending while the responder's new packets are
    // lost; asking for another re-handshake then must not start a second one on the same
    // generation.
    let mut pair = Pair::new(Pattern::XX, Suite::ChaChaPolyBlake2s, Mode::Datagram);
    pair.drive();
    let drop_new = lose_new_generation(&mut pair, Dir::BtoA);
    pair.a.start_rehandshake(pair.now).unwrap();
    pair.drive();
    pair.a.send(1, Bytes::from_static(b"up")).unwrap();
    pair.advance(Duration::from_secs(1));
    let sent_before = pair.a.stats().packets_sent;
    pair.a.start_rehandshake(pair.now).unwrap();
    pair.drive();
    assert_eq!(pair.a.stats().packets_sent, sent_before, "a second re-handshake was started");
    *drop_new.borrow_mut() = false;
    for _ in 0..5 {
        pair.a.send(1, Bytes::from_static(b"up")).unwrap();
        pair.b.send(1, Bytes::from_static(b"down")).unwrap();
        pair.advance(Duration::from_secs(2));
    }
    assert!(pair.connected());
    assert_eq!((pair.a.stats().rehandshakes, pair.b.stats().rehandshakes), (1, 1));
    assert_eq!(pair.a.handshake_hash(), pair.b.handshake_hash());
    assert_eq!(pair.b_messages().len(), 6);
    assert_eq!(pair.a_messages().len(), 5);
}

#[test]
fn a_switch_survives_loss_longer_than_the_handshake_timeout() {
    // spec §5.9.4: once a side has completed the new session it never gives it up by
    // timeout. The side that completed first keeps it pending, the other keeps sending
    // in it, and when the loss ends the pending session is promoted.
    for (p, dir) in [(Pattern::IK, Dir::AtoB), (Pattern::KK, Dir::AtoB), (Pattern::XX, Dir::BtoA)] {
        let mut pair = Pair::new(p, Suite::ChaChaPolyBlake2s, Mode::Datagram);
        pair.drive();
        // Lose every new-generation packet from the side that switches at once.
        let drop_new = lose_new_generation(&mut pair, dir);
        let old_hash = *pair.a.handshake_hash().unwrap();
        pair.a.start_rehandshake(pair.now).unwrap();
        pair.drive();
        pair.advance(Duration::from_secs(25));
        // The side still pending exports the old hash until the new session is proven.
        let pending_side = if dir == Dir::AtoB { &pair.b } else { &pair.a };
        assert_eq!(pending_side.handshake_hash(), Some(&old_hash), "{p:?}");
        *drop_new.borrow_mut() = false;
        for _ in 0..5 {
            pair.a.send(1, Bytes::from_static(b"up")).unwrap();
            pair.b.send(1, Bytes::from_static(b"down")).unwrap();
            pair.advance(Duration::from_secs(2));
        }
        assert!(pair.connected(), "{p:?}");
        assert_eq!((pair.a.stats().rehandshakes, pair.b.stats().rehandshakes), (1, 1), "{p:?}");
        assert_eq!(pair.a.handshake_hash(), pair.b.handshake_hash(), "{p:?}");
        assert_ne!(pair.a.handshake_hash(), Some(&old_hash), "{p:?}");
        assert_eq!((pair.a_messages().len(), pair.b_messages().len()), (5, 5), "{p:?}");
    }
}

#[test]
fn a_connected_xx_responder_drops_repeated_finals_and_answers_nothing() {
    // spec §5.7.2: its transport packets stop the repeats; a copy of FINAL gets no answer.
    for p in [Pattern::XX, Pattern::XXpsk3] {
        let mut pair = Pair::new(p, Suite::ChaChaPolyBlake2s, Mode::Datagram);
        let finals = Rc::new(RefCell::new(Vec::new()));
        let f2 = Rc::clone(&finals);
        pair.hook = Some(Box::new(move |d, pkt: Vec<u8>| {
            if d == Dir::AtoB && pkt[0] == 0x03 {
                f2.borrow_mut().push(pkt.clone());
            }
            vec![pkt]
        }));
        pair.drive();
        assert!(pair.connected());
        let fin = finals.borrow()[0].clone();
        let sent = pair.b.stats().packets_sent;
        assert!(pair.deliver_to_b(&fin).is_err(), "{p:?}");
        let mut buf = vec![0u8; 2048];
        assert_eq!(pair.b.poll_transmit(pair.now, &mut buf).unwrap(), None, "{p:?}");
        assert_eq!(pair.b.stats().packets_sent, sent);
        assert!(pair.connected());
    }
}

#[test]
fn a_rehandshake_due_before_the_xx_handshake_completes_waits_for_it() {
    // spec §5.7.1, §5.7.2, §7.3: an XX/XXpsk3 initiator whose FINAL was lost keeps repeating
    // it even when a re-handshake falls due meanwhile; the re-handshake starts once the
    // responder's first packet has completed the handshake.
    for p in [Pattern::XX, Pattern::XXpsk3] {
        let mut setup = Setup::new(p, Suite::ChaChaPolyBlake2s, Mode::Datagram);
        setup.limits.rehandshake_after_time = Duration::from_millis(300);
        let mut pair = Pair::with(setup);
        let finals = Rc::new(RefCell::new(0u32));
        let f2 = Rc::clone(&finals);
        // Lose the first FINAL (cleartext type 0x03); its repeat comes after HANDSHAKE_RTO (1 s),
        // well after the re-handshake is due.
        pair.hook = Some(Box::new(move |d, p: Vec<u8>| {
            if d == Dir::AtoB && p[0] == 0x03 {
                *f2.borrow_mut() += 1;
                if *f2.borrow() == 1 {
                    return vec![];
                }
            }
            vec![p]
        }));
        pair.drive();
        assert!(pair.a.is_connected() && !pair.b.is_connected(), "{p:?}");
        pair.advance(Duration::from_secs(3));
        assert!(pair.connected(), "{p:?}: responder {:?}", closed(&pair.b_events));
        assert_eq!(*finals.borrow(), 2, "{p:?}: FINAL was repeated once");
        assert_eq!(connected_hashes(&pair.b_events).len(), 1, "{p:?}");
        // The deferred re-handshake ran once the handshake was complete.
        assert!(pair.a.stats().rehandshakes >= 1, "{p:?}: {:?}", pair.a.stats());
        assert_eq!(pair.a.handshake_hash(), pair.b.handshake_hash(), "{p:?}");
        pair.a.send(1, Bytes::from_static(b"after")).unwrap();
        pair.drive();
        assert_eq!(pair.b_messages().last().map(|m| m.2.clone()), Some(b"after".to_vec()), "{p:?}");
    }
}
