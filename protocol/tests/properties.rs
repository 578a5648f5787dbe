//! Property tests of the protocol's invariants (spec §6, §7, §8, §10), each named after the
//! invariant it checks. Deterministic: every runner has a fixed ChaCha seed and no failure
//! persistence, and time is the pair harness's virtual clock.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod util;

use std::cell::RefCell;
use std::collections::{BTreeMap, HashSet};
use std::rc::Rc;

use bytes::Bytes;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config as ProptestConfig, RngAlgorithm, RngSeed, TestCaseError, TestRunner};
use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use util::*;
use veil_protocol::replay::ReplayError;
use veil_protocol::session::{reconstruct_counter, EPOCH_BITS, REJECT_AFTER_MESSAGES};
use veil_protocol::wire::{TYPE_HANDSHAKE_FINAL, TYPE_HANDSHAKE_INIT, TYPE_HANDSHAKE_RESP};
use veil_protocol::{
    CloseReason, Closed, Connection, ConnectionError, Duration, Limits, Mode, Pattern, SessionError, Suite, Timestamp,
};

const MODES: [Mode; 2] = [Mode::Stream, Mode::Datagram];

/// A runner with a fixed seed: the same cases on every run and every machine.
fn runner(cases: u32, seed: u64) -> TestRunner {
    TestRunner::new(ProptestConfig {
        cases,
        failure_persistence: None,
        rng_algorithm: RngAlgorithm::ChaCha,
        rng_seed: RngSeed::Fixed(seed),
        max_shrink_iters: 512,
        ..ProptestConfig::default()
    })
}

/// Runs `test` on `cases` values of `strategy`; a failure panics with proptest's minimal case.
fn check<S: Strategy>(cases: u32, seed: u64, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>) {
    if let Err(e) = runner(cases, seed).run(&strategy, test) {
        panic!("{e}");
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    A,
    B,
}

impl Side {
    fn other(self) -> Self {
        match self {
            Self::A => Self::B,
            Self::B => Self::A,
        }
    }
}

fn conn(pair: &mut Pair, s: Side) -> &mut Connection {
    match s {
        Side::A => &mut pair.a,
        Side::B => &mut pair.b,
    }
}

/// The next packet `from` wants to send, if any.
fn poll(pair: &mut Pair, from: Side) -> Option<Vec<u8>> {
    let now = pair.now;
    let Pair { a, b, buf, .. } = pair;
    let c = if from == Side::A { a } else { b };
    c.poll_transmit(now, buf).unwrap().map(|n| buf[..n].to_vec())
}

fn poll_all(pair: &mut Pair, from: Side) -> Vec<Vec<u8>> {
    std::iter::from_fn(|| poll(pair, from)).collect()
}

fn deliver(pair: &mut Pair, to: Side, p: &[u8]) -> Result<(), ConnectionError> {
    match to {
        Side::A => pair.deliver_to_a(p),
        Side::B => pair.deliver_to_b(p),
    }
}

fn errors(pair: &Pair, s: Side) -> usize {
    match s {
        Side::A => pair.a_errors.len(),
        Side::B => pair.b_errors.len(),
    }
}

/// Messages delivered to `s` since its events were last cleared.
fn received(pair: &Pair, s: Side) -> Vec<(u16, u64, Vec<u8>)> {
    match s {
        Side::A => pair.a_messages(),
        Side::B => pair.b_messages(),
    }
}

fn clear_events(pair: &mut Pair) {
    pair.a_events.clear();
    pair.b_events.clear();
}

/// Connected IK pairs, one per mode × suite, reused across the cases of a property.
fn connected_pairs() -> Vec<Pair> {
    let mut v = Vec::new();
    for mode in MODES {
        for suite in Suite::ALL {
            let mut pair = Pair::new(Pattern::IK, suite, mode);
            pair.drive();
            assert!(pair.connected());
            clear_events(&mut pair);
            v.push(pair);
        }
    }
    v
}

/// Queues `payload` on `from` and returns the one packet carrying it.
fn send_one(pair: &mut Pair, from: Side, payload: &[u8]) -> Vec<u8> {
    conn(pair, from).send(5, Bytes::copy_from_slice(payload)).unwrap();
    let p = poll(pair, from).expect("a packet");
    assert_eq!(poll(pair, from), None, "one message, one packet");
    p
}

// ---------------------------------------------------------------------------------------------
// Payloads and transport packets
// ---------------------------------------------------------------------------------------------

#[test]
fn any_payload_size_round_trips() {
    let pairs = RefCell::new(connected_pairs());
    let strategy = (0..4usize, any::<bool>(), 0u8..3, any::<u32>(), any::<u8>());
    check(96, 1, strategy, |(which, to_a, size_kind, raw, fill)| {
        let mut pairs = pairs.borrow_mut();
        let pair = &mut pairs[which];
        let (from, to) = if to_a { (Side::B, Side::A) } else { (Side::A, Side::B) };
        let max = conn(pair, from).max_message_payload();
        let raw = raw as usize;
        let len = match size_kind {
            0 => raw % 65,
            1 => max - raw % 65,
            _ => raw % (max + 1),
        };
        let payload: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(fill).wrapping_add(fill)).collect();
        prop_assert_eq!(
            conn(pair, from).send(1, Bytes::from(vec![0u8; max + 1])),
            Err(ConnectionError::MessageTooLarge)
        );
        conn(pair, from).send(2, Bytes::from(payload.clone())).unwrap();
        pair.drive();
        let got = received(pair, to);
        clear_events(pair);
        prop_assert_eq!(got.len(), 1);
        prop_assert_eq!(got[0].0, 2);
        prop_assert!(got[0].2 == payload, "payload of {} bytes changed", len);
        prop_assert!(pair.a_errors.is_empty() && pair.b_errors.is_empty());
        Ok(())
    });
}

#[test]
fn any_single_bit_flip_in_a_transport_packet_is_rejected_and_state_unchanged() {
    let pairs = RefCell::new(connected_pairs());
    let strategy = (0..4usize, any::<bool>(), prop::collection::vec(any::<u8>(), 0..48), any::<Index>());
    check(512, 2, strategy, |(which, to_a, payload, bit)| {
        let mut pairs = pairs.borrow_mut();
        let pair = &mut pairs[which];
        let (from, to) = if to_a { (Side::B, Side::A) } else { (Side::A, Side::B) };
        let genuine = send_one(pair, from, &payload);
        let bad = flip_bit(&genuine, bit.index(genuine.len() * 8));
        prop_assert!(deliver(pair, to, &bad).is_err(), "a flipped packet was accepted");
        // spec §10.1: a refused packet changes nothing: the genuine one still opens, once.
        prop_assert!(conn(pair, to).is_connected());
        prop_assert!(received(pair, to).is_empty());
        prop_assert_eq!(deliver(pair, to, &genuine), Ok(()));
        let got = received(pair, to);
        prop_assert_eq!(got.len(), 1);
        prop_assert!(got[0].2 == payload);
        pair.drive();
        clear_events(pair);
        Ok(())
    });
}

#[test]
fn truncation_of_a_transport_packet_at_any_length_is_rejected() {
    let pairs = RefCell::new(connected_pairs());
    let strategy = (0..4usize, any::<bool>(), prop::collection::vec(any::<u8>(), 0..48), any::<Index>());
    check(256, 3, strategy, |(which, to_a, payload, cut)| {
        let mut pairs = pairs.borrow_mut();
        let pair = &mut pairs[which];
        let (from, to) = if to_a { (Side::B, Side::A) } else { (Side::A, Side::B) };
        let genuine = send_one(pair, from, &payload);
        let short = &genuine[..cut.index(genuine.len())];
        prop_assert!(deliver(pair, to, short).is_err(), "a truncated packet was accepted");
        prop_assert_eq!(deliver(pair, to, &genuine), Ok(()));
        prop_assert_eq!(received(pair, to).len(), 1);
        pair.drive();
        clear_events(pair);
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// Handshake messages
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Mutation {
    /// Invert one bit (chosen among the message's bits).
    Flip(Index),
    /// Keep only a strict prefix.
    Truncate(Index),
}

/// Runs a handshake whose message `k` is altered in flight, then checks spec §10: the altered
/// message is refused (or, for what is unauthenticated by design, the next message fails);
/// nobody is Connected with a transcript the peer does not share; a stream connection fails
/// closed; and in datagram mode the genuine message, arriving next, still completes the
/// handshake when the altered one was dropped silently.
fn altered_handshake(pattern: Pattern, suite: Suite, mode: Mode, k: usize, m: Mutation) -> Result<(), TestCaseError> {
    let mut pair = Pair::new(pattern, suite, mode);
    let types = [TYPE_HANDSHAKE_INIT, TYPE_HANDSHAKE_RESP, TYPE_HANDSHAKE_FINAL];
    let side = |i: usize| if i.is_multiple_of(2) { Side::A } else { Side::B };
    let mut genuine = Vec::new();
    for (i, ty) in types.iter().enumerate().take(k + 1) {
        let p = poll(&mut pair, side(i)).expect("handshake packet");
        prop_assert_eq!(p[0], *ty);
        if i < k {
            prop_assert_eq!(deliver(&mut pair, side(i).other(), &p), Ok(()));
        } else {
            genuine = p;
        }
    }
    let (s, r) = (side(k), side(k).other());
    let (bad, index_only) = match m {
        Mutation::Flip(bit) => {
            let bit = bit.index(genuine.len() * 8);
            // spec §4.2, §11.7: the responder's index in a datagram RESP (bytes 5..9) is not
            // bound into the handshake; changing it misdirects the initiator's packets.
            (flip_bit(&genuine, bit), mode == Mode::Datagram && k == 1 && (40..72).contains(&bit))
        }
        Mutation::Truncate(cut) => (genuine[..cut.index(genuine.len())].to_vec(), false),
    };
    let refused = deliver(&mut pair, r, &bad).is_err();
    let answers = poll_all(&mut pair, r);
    let before = errors(&pair, s);
    for p in &answers {
        let _ = deliver(&mut pair, s, p);
    }
    let answer_refused = errors(&pair, s) > before;
    if mode == Mode::Datagram {
        if r == Side::B && k == 0 && pair.b.is_closed() {
            // A datagram endpoint keeps nothing for a broken INIT and takes the next as new.
            pair.fresh_responder();
        }
        let _ = deliver(&mut pair, r, &genuine);
    }
    pair.drive();
    if mode == Mode::Datagram && refused && answers.is_empty() {
        prop_assert!(pair.connected(), "genuine packet did not complete: {:?} / {:?}", pair.a_errors, pair.b_errors);
        prop_assert_eq!(pair.a.handshake_hash(), pair.b.handshake_hash());
        pair.a.send(1, Bytes::from_static(b"after")).unwrap();
        pair.drive();
        prop_assert_eq!(pair.b_messages(), vec![(1, 0, b"after".to_vec())]);
    }
    pair.advance(Duration::from_secs(11));
    if index_only {
        // Transport packets (IK, KK) or FINAL (XX) now carry the wrong index.
        let misdirected = |e: &ConnectionError| {
            matches!(
                e,
                ConnectionError::Session(SessionError::WrongSession)
                    | ConnectionError::Handshake(veil_protocol::HandshakeError::UnknownIndex)
            )
        };
        prop_assert!(pair.b_errors.iter().any(misdirected), "misdirected packets must be refused: {:?}", pair.b_errors);
        prop_assert!(connected_hashes(&pair.b_events).is_empty());
    } else {
        prop_assert!(refused || answer_refused, "the altered message was accepted and so was the answer to it");
    }
    // Safety: two Connected parties share one transcript.
    let (ha, hb) = (connected_hashes(&pair.a_events), connected_hashes(&pair.b_events));
    for x in &ha {
        for y in &hb {
            prop_assert_eq!(x, y);
        }
        if let Some(h) = pair.b.handshake_hash() {
            prop_assert_eq!(x, h);
        }
    }
    if mode == Mode::Stream {
        let r_events = if r == Side::A { &pair.a_events } else { &pair.b_events };
        prop_assert!(connected_hashes(r_events).is_empty(), "stream receiver connected after an altered message");
        prop_assert!(pair.a.is_closed() && pair.b.is_closed(), "stream handshake did not fail closed");
    }
    Ok(())
}

fn handshake_messages() -> Vec<(Pattern, Suite, Mode, usize)> {
    let mut v = Vec::new();
    for (p, s, m) in all_combinations() {
        for k in 0..p.message_count() {
            v.push((p, s, m, k));
        }
    }
    v
}

#[test]
fn any_single_bit_flip_in_a_handshake_message_is_rejected() {
    let messages = handshake_messages();
    assert_eq!(messages.len(), 48);
    for (seed, (p, s, m, k)) in messages.into_iter().enumerate() {
        check(6, 100 + seed as u64, any::<Index>(), |bit| altered_handshake(p, s, m, k, Mutation::Flip(bit)));
    }
}

#[test]
fn truncation_of_a_handshake_message_at_any_length_is_rejected() {
    for (seed, (p, s, m, k)) in handshake_messages().into_iter().enumerate() {
        check(3, 200 + seed as u64, any::<Index>(), |cut| altered_handshake(p, s, m, k, Mutation::Truncate(cut)));
    }
}

// ---------------------------------------------------------------------------------------------
// Replay, reordering, rekeying (spec §6.3, §7.1–§7.3, §8)
// ---------------------------------------------------------------------------------------------

#[test]
fn replays_are_rejected() {
    let pairs = RefCell::new(connected_pairs());
    let strategy = (0..4usize, 1..12usize).prop_flat_map(|(which, n)| (Just(which), Just(n), 0..n, 0..n));
    check(128, 4, strategy, |(which, n, replayed, at)| {
        let mut pairs = pairs.borrow_mut();
        let pair = &mut pairs[which];
        let mode = pair.a.session().unwrap().mode();
        let at = at.max(replayed);
        let packets: Vec<_> = (0..n).map(|i| send_one(pair, Side::A, &[i as u8])).collect();
        for (i, p) in packets.iter().enumerate() {
            prop_assert_eq!(pair.deliver_to_b(p), Ok(()));
            if i == at {
                let r = pair.deliver_to_b(&packets[replayed]);
                match mode {
                    Mode::Datagram => prop_assert!(
                        matches!(r, Err(ConnectionError::Session(SessionError::Replay(ReplayError::Duplicate)))),
                        "{:?}",
                        r
                    ),
                    // Stream counters are implicit: a repeat is opened with the next counter
                    // and fails authentication (spec §8).
                    _ => prop_assert_eq!(r, Err(ConnectionError::Session(SessionError::Authentication))),
                }
            }
        }
        let got: Vec<_> = pair.b_messages().into_iter().map(|m| m.2).collect();
        let want: Vec<_> = (0..n).map(|i| vec![i as u8]).collect();
        prop_assert_eq!(got, want);
        pair.drive();
        clear_events(pair);
        Ok(())
    });
}

#[test]
fn replayed_handshake_packets_change_nothing_once_connected() {
    for (p, s, m) in all_combinations() {
        let log = Rc::new(RefCell::new(Vec::new()));
        let l = Rc::clone(&log);
        let mut pair = Pair::new(p, s, m);
        pair.hook = Some(Box::new(move |d, pk| {
            if pk[0] < 0x10 {
                l.borrow_mut().push((d, pk.clone()));
            }
            vec![pk]
        }));
        pair.drive();
        pair.hook = None;
        assert!(pair.connected());
        let hashes = (connected_hashes(&pair.a_events), connected_hashes(&pair.b_events));
        for (d, pk) in log.borrow().iter() {
            let r = if *d == Dir::AtoB { pair.deliver_to_b(pk) } else { pair.deliver_to_a(pk) };
            assert!(r.is_err(), "{p:?} {s:?} {m:?}: replayed handshake packet accepted");
            pair.drive();
        }
        assert!(pair.connected(), "{p:?} {s:?} {m:?}");
        assert_eq!((connected_hashes(&pair.a_events), connected_hashes(&pair.b_events)), hashes);
        pair.a.send(1, Bytes::from_static(b"still")).unwrap();
        pair.drive();
        assert_eq!(pair.b_messages(), vec![(1, 0, b"still".to_vec())], "{p:?} {s:?} {m:?}");
    }
}

/// Delivers every packet in flight in a shuffled order, with duplicates, until nothing moves.
fn drive_shuffled(pair: &mut Pair, rng: &mut ChaCha20Rng, dup_percent: u32) {
    for _ in 0..200 {
        if !shuffle_round(pair, rng, dup_percent) {
            return;
        }
    }
    panic!("shuffled pair did not settle");
}

/// One round: everything both sides want to send goes in flight, then each side receives its
/// packets in a random order, some of them twice. Returns whether anything moved.
fn shuffle_round(pair: &mut Pair, rng: &mut ChaCha20Rng, dup_percent: u32) -> bool {
    pair.events();
    pair.flush();
    if pair.to_a.is_empty() && pair.to_b.is_empty() {
        return false;
    }
    {
        for to in [Side::B, Side::A] {
            let queue = if to == Side::B { &mut pair.to_b } else { &mut pair.to_a };
            let mut batch: Vec<(Vec<u8>, bool)> = queue.drain(..).map(|p| (p, false)).collect();
            let dups: Vec<_> =
                batch.iter().filter(|_| rng.gen_range(0..100) < dup_percent).map(|(p, _)| (p.clone(), true)).collect();
            batch.extend(dups);
            batch.shuffle(rng);
            // A duplicate that happens to come first is the genuine delivery; the later copy
            // is the replay.
            let mut seen = HashSet::new();
            for (p, _) in batch {
                let first = seen.insert(p.clone());
                let r = deliver(pair, to, &p);
                if !first {
                    assert!(
                        matches!(r, Err(ConnectionError::Session(SessionError::Replay(_)))),
                        "a duplicate was not refused as a replay: {r:?}"
                    );
                }
            }
        }
    }
    true
}

fn assert_each_once(got: &[(u16, u64, Vec<u8>)], sent: &[Vec<u8>]) -> Result<(), TestCaseError> {
    let mut count: BTreeMap<&[u8], usize> = BTreeMap::new();
    for (_, _, p) in got {
        *count.entry(p.as_slice()).or_default() += 1;
    }
    for p in sent {
        prop_assert_eq!(count.get(p.as_slice()).copied(), Some(1), "message {:?} not delivered exactly once", p);
    }
    prop_assert_eq!(got.len(), sent.len());
    Ok(())
}

#[test]
fn reordering_inside_the_window_is_accepted_exactly_once() {
    let pairs = RefCell::new(connected_pairs());
    let strategy = (prop::sample::select(vec![2usize, 3]), 1..64usize).prop_flat_map(|(which, n)| {
        (Just(which), Just((0..n).collect::<Vec<_>>()).prop_shuffle(), prop::collection::vec(0..n, 0..8))
    });
    check(128, 5, strategy, |(which, order, dups)| {
        let mut pairs = pairs.borrow_mut();
        let pair = &mut pairs[which];
        prop_assert_eq!(pair.a.session().unwrap().mode(), Mode::Datagram);
        let payloads: Vec<Vec<u8>> = (0..order.len()).map(|i| (i as u32).to_be_bytes().to_vec()).collect();
        let packets: Vec<_> = payloads.iter().map(|p| send_one(pair, Side::A, p)).collect();
        for &i in &order {
            prop_assert_eq!(pair.deliver_to_b(&packets[i]), Ok(()));
        }
        for &i in &dups {
            let r = pair.deliver_to_b(&packets[i]);
            prop_assert!(matches!(r, Err(ConnectionError::Session(SessionError::Replay(_)))), "{:?}", r);
        }
        assert_each_once(&pair.b_messages(), &payloads)?;
        pair.drive();
        clear_events(pair);
        Ok(())
    });
}

/// Patterns whose datagram re-handshake is checked under reordering: all of them. The side
/// that finishes a re-handshake first keeps the new session pending until the peer's first
/// packet on it, so nothing sent on either session is lost (spec §7.3).
const REORDERED_REHANDSHAKE_PATTERNS: [Pattern; 5] =
    [Pattern::IK, Pattern::KK, Pattern::IKpsk2, Pattern::XX, Pattern::XXpsk3];

#[test]
fn rekey_under_reordering_loses_nothing() {
    let strategy = (
        prop::sample::select(vec![Pattern::IK, Pattern::KK, Pattern::IKpsk2, Pattern::XX, Pattern::XXpsk3]),
        prop::sample::select(Suite::ALL.to_vec()),
        prop::collection::vec((1u64..8, 2usize..16, any::<bool>()), 1..4),
        any::<u64>(),
        0u32..30,
    );
    check(24, 6, strategy, |(pattern, suite, batches, seed, dup_percent)| {
        let mut s = Setup::new(pattern, suite, Mode::Datagram);
        s.limits = Limits { rekey_after_time: Duration::from_secs(2), ..Limits::default() };
        let mut pair = Pair::with(s);
        pair.drive();
        prop_assert!(pair.connected());
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let mut sent_ab = Vec::new();
        let mut sent_ba = Vec::new();
        let mut epoch = 0u64;
        for (b, (before_boundary, n, time_rekey)) in batches.into_iter().enumerate() {
            if time_rekey {
                // The sending key is older than REKEY_AFTER_TIME: the next packet jumps to the
                // next epoch (spec §7.1).
                pair.advance(Duration::from_secs(3));
            }
            // Jump close to the next epoch boundary so that the batch straddles it.
            let session = pair.a.session_mut().unwrap();
            let next_boundary = ((session.send_counter() >> EPOCH_BITS) + 1) << EPOCH_BITS;
            session.set_send_counter_for_testing_only(next_boundary - before_boundary.min(n as u64 - 1));
            epoch = epoch.max(next_boundary >> EPOCH_BITS);
            for i in 0..n {
                let up = format!("ab {b} {i}").into_bytes();
                let down = format!("ba {b} {i}").into_bytes();
                pair.a.send(1, Bytes::from(up.clone())).unwrap();
                pair.b.send(2, Bytes::from(down.clone())).unwrap();
                sent_ab.push(up);
                sent_ba.push(down);
                // One message per packet, so that packets of both epochs are in flight.
                pair.flush();
            }
            drive_shuffled(&mut pair, &mut rng, dup_percent);
        }
        prop_assert!(pair.b.session().unwrap().stats().recv_rekeys >= epoch, "{:?}", pair.b.stats());
        if !REORDERED_REHANDSHAKE_PATTERNS.contains(&pattern) {
            return Ok(());
        }
        // A full re-handshake with traffic in both directions, reordered and duplicated.
        let h1 = *pair.a.handshake_hash().unwrap();
        pair.a.start_rehandshake(pair.now).unwrap();
        // The applications keep sending in every round, so that data is queued at the moment
        // each side switches sessions and travels next to the last handshake packets.
        for i in 0..8 {
            let up = format!("rh ab {i}").into_bytes();
            let down = format!("rh ba {i}").into_bytes();
            pair.a.send(1, Bytes::from(up.clone())).unwrap();
            pair.b.send(2, Bytes::from(down.clone())).unwrap();
            sent_ab.push(up);
            sent_ba.push(down);
            shuffle_round(&mut pair, &mut rng, dup_percent);
        }
        drive_shuffled(&mut pair, &mut rng, dup_percent);
        pair.advance(Duration::from_secs(1));
        prop_assert!(pair.connected());
        prop_assert_ne!(&h1, pair.a.handshake_hash().unwrap(), "no re-handshake happened");
        prop_assert_eq!(pair.a.handshake_hash(), pair.b.handshake_hash());
        assert_each_once(&pair.b_messages(), &sent_ab)?;
        assert_each_once(&pair.a_messages(), &sent_ba)?;
        let unexpected: Vec<_> = pair
            .a_errors
            .iter()
            .chain(&pair.b_errors)
            .filter(|e| !matches!(e, ConnectionError::Session(SessionError::Replay(_))))
            .collect();
        prop_assert!(unexpected.is_empty(), "{:?}", unexpected);
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// Limits (spec §7.4) and counter reconstruction (spec §6.3)
// ---------------------------------------------------------------------------------------------

#[test]
fn counter_exhaustion_and_reject_after_limits_hold() {
    // Sender side of REJECT_AFTER_MESSAGES: from any counter below 2^60, exactly the counters
    // below 2^60 are used, then the session refuses and the connection closes.
    let strategy = (prop::sample::select(MODES.to_vec()), prop::sample::select(Suite::ALL.to_vec()), 1u64..6);
    check(12, 7, strategy, |(mode, suite, left)| {
        let mut pair = Pair::new(Pattern::IK, suite, mode);
        pair.drive();
        pair.hook = Some(Box::new(|d, p| if d == Dir::AtoB { vec![] } else { vec![p] }));
        let now = pair.now;
        let session = pair.a.session_mut().unwrap();
        session.set_send_counter_for_testing_only(REJECT_AFTER_MESSAGES - left);
        let mut buf = vec![0u8; 64];
        for _ in 0..left - 1 {
            prop_assert!(session.seal(now, &mut buf, 0).is_ok());
        }
        prop_assert_eq!(session.send_counter(), REJECT_AFTER_MESSAGES - 1);
        let before = pair.a.stats().packets_sent;
        for i in 0..3u8 {
            let _ = pair.a.send(1, Bytes::from(vec![i]));
            pair.drive();
        }
        prop_assert_eq!(pair.a.stats().packets_sent - before, 1, "counter 2^60 - 1 is the last one used");
        prop_assert_eq!(
            closed(&pair.a_events),
            Some(&Closed {
                reason: CloseReason::TooManyMessages,
                by_peer: false,
                error: Some(ConnectionError::Session(SessionError::CounterExhausted)),
            })
        );
        Ok(())
    });

    // REJECT_AFTER_TIME: a session seals and opens until exactly `established + limit`, then
    // refuses both, and the connection closes with SessionExpired at that instant.
    let strategy = (prop::sample::select(MODES.to_vec()), 5u64..200);
    check(16, 8, strategy, |(mode, limit_s)| {
        let mut s = Setup::new(Pattern::IK, Suite::ChaChaPolyBlake2s, mode);
        s.limits = Limits {
            reject_after_time: Duration::from_secs(limit_s),
            rehandshake_after_time: Duration::from_secs(1_000_000),
            ..Limits::default()
        };
        let mut pair = Pair::with(s);
        pair.drive();
        let est = pair.a.session().unwrap().established_at();
        let end = est + Duration::from_secs(limit_s);
        let last = Timestamp::from_micros(end.as_micros() - 1);
        // Session level, without moving the connections' clocks.
        let sa = pair.a.session_mut().unwrap();
        prop_assert!(!sa.is_expired(last) && sa.is_expired(end));
        let mut buf = vec![0u8; 64];
        let h = sa.header_len();
        buf[h] = veil_protocol::message::KIND_PING;
        buf[h + 1] = 1;
        prop_assert_eq!(sa.seal(end, &mut buf, 2), Err(SessionError::Expired));
        let n = sa.seal(last, &mut buf, 2).unwrap();
        let packet = buf[..n].to_vec();
        let sb = pair.b.session_mut().unwrap();
        prop_assert_eq!(sb.open(end, &mut packet.clone()), Err(SessionError::Expired));
        prop_assert!(sb.open(last, &mut packet.clone()).is_ok());
        // Connection level.
        pair.advance(last - pair.now);
        prop_assert!(pair.connected());
        pair.advance(Duration::from_micros(1));
        prop_assert_eq!(pair.now, end);
        for events in [&pair.a_events, &pair.b_events] {
            prop_assert_eq!(
                closed(events),
                Some(&Closed {
                    reason: CloseReason::SessionExpired,
                    by_peer: false,
                    error: Some(ConnectionError::Session(SessionError::Expired)),
                })
            );
        }
        Ok(())
    });
}

/// The trivially correct model of spec §6.3: scan every counter congruent to `lo` near
/// `expected` and keep the one in `[expected - 2^23, expected + 2^23)`; a negative one stands
/// for the non-negative counter 2^24 above it.
fn reconstruct_model(lo: u32, expected: u64) -> u64 {
    let m: i128 = 1 << 24;
    let lo = i128::from(lo) & (m - 1);
    let e = i128::from(expected);
    let k0 = e / m;
    let hits: Vec<i128> =
        (k0 - 2..=k0 + 2).map(|k| k * m + lo).filter(|&c| c >= e - (1 << 23) && c < e + (1 << 23)).collect();
    assert_eq!(hits.len(), 1, "exactly one candidate lies in the window");
    let c = if hits[0] < 0 { hits[0] + m } else { hits[0] };
    u64::try_from(c).unwrap()
}

#[test]
fn truncated_counter_reconstruction_matches_the_model() {
    let half = 1i64 << 23;
    // The window's bounds are where an off-by-one would hide: bias towards them.
    let delta = prop_oneof![-half..half, Just(-half), Just(half - 1), -half..-half + 4, half - 4..half];
    let near = (0..=REJECT_AFTER_MESSAGES, delta);
    check(4_096, 9, near, |(expected, delta)| {
        let Some(truth) = expected.checked_add_signed(delta) else { return Ok(()) };
        let lo = (truth & 0xff_ffff) as u32;
        prop_assert_eq!(reconstruct_counter(lo, expected), reconstruct_model(lo, expected));
        // A counter inside the window is recovered exactly (when it is not negative).
        prop_assert_eq!(reconstruct_counter(lo, expected), truth);
        Ok(())
    });
    let any_lo = (prop_oneof![0..(1u64 << 26), 0..=REJECT_AFTER_MESSAGES], any::<u32>());
    check(4_096, 10, any_lo, |(expected, lo)| {
        prop_assert_eq!(reconstruct_counter(lo, expected), reconstruct_model(lo, expected));
        Ok(())
    });
    // Edges: the window's bounds, and counters near zero.
    for expected in [0u64, 1, (1 << 23) - 1, 1 << 23, (1 << 23) + 1, 1 << 24, REJECT_AFTER_MESSAGES] {
        for lo in [0u32, 1, (1 << 23) - 1, 1 << 23, (1 << 23) + 1, (1 << 24) - 1] {
            assert_eq!(reconstruct_counter(lo, expected), reconstruct_model(lo, expected), "{expected} {lo}");
        }
    }
}
