//! Entry points for the cargo-fuzz targets in `fuzz/` (feature `fuzzing`). Each takes
//! arbitrary bytes and panics only when an invariant of the protocol is broken.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

use alloc::collections::BTreeSet;
use alloc::sync::Arc;
use alloc::vec;
use alloc::vec::Vec;

use bytes::Bytes;
use rand_core::SeedableRng;

use crate::config::Config;
use crate::connection::{Connection, Decision, Event};
use crate::crypto::StaticKeypair;
use crate::message::Messages;
use crate::params::{Mode, Pattern, Suite};
use crate::payload::HandshakePayload;
use crate::replay::ReplayWindow;
use crate::session::Role;
use crate::time::Timestamp;
use crate::wire;

/// Parses `data` as a packet in both modes, as a handshake payload, and as transport
/// plaintext. Nothing may panic.
pub fn decode(data: &[u8]) {
    for mode in [Mode::Stream, Mode::Datagram] {
        let _ = wire::parse(mode, wire::MAX_PACKET_LEN, data);
    }
    let _ = wire::datagram_receiver_index(data);
    if let Ok(p) = HandshakePayload::decode(data) {
        // Canonical: what decodes re-encodes to the same bytes.
        let mut buf = vec![0u8; data.len() + 8];
        let n = p.encode(&mut buf).unwrap();
        assert_eq!(&buf[..n], data);
    }
    for m in Messages::new(data) {
        let Ok(m) = m else { break };
        let mut buf = vec![0u8; m.encoded_len()];
        assert_eq!(m.encode(&mut buf).unwrap(), m.encoded_len());
    }
}

fn config(seed: u8, mode: Mode, pattern: Pattern, suite: Suite) -> Arc<Config> {
    let mut c = Config::new(StaticKeypair::from_secret_bytes([seed; 32]), mode);
    c.pattern = pattern;
    c.suite = suite;
    c.psk = Some(crate::crypto::Psk::new([7; 32]));
    Arc::new(c)
}

fn pick(selector: u8) -> (Mode, Pattern, Suite) {
    let mode = if selector & 1 == 0 { Mode::Stream } else { Mode::Datagram };
    let pattern = Pattern::ALL[usize::from(selector >> 1) % Pattern::ALL.len()];
    let suite = Suite::ALL[usize::from(selector >> 4) % Suite::ALL.len()];
    (mode, pattern, suite)
}

struct Pair {
    a: Connection,
    b: Connection,
    now: Timestamp,
    buf: Vec<u8>,
}

impl Pair {
    fn new(mode: Mode, pattern: Pattern, suite: Suite) -> Self {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        let ca = config(1, mode, pattern, suite);
        let cb = config(2, mode, pattern, suite);
        let now = Timestamp::from_millis(1);
        let a_remote = pattern.initiator_knows_responder().then(|| *cb.public_key());
        let b_remote = pattern.responder_knows_initiator().then(|| *ca.public_key());
        let a = Connection::new(ca, Role::Initiator, a_remote, now, &mut rng).unwrap();
        let b = Connection::new(cb, Role::Responder, b_remote, now, &mut rng).unwrap();
        Self { a, b, now, buf: vec![0u8; wire::MAX_PACKET_LEN] }
    }

    /// Packets `a` wants to send.
    fn out_a(&mut self) -> Vec<Vec<u8>> {
        let mut v = Vec::new();
        while let Ok(Some(n)) = self.a.poll_transmit(self.now, &mut self.buf) {
            v.push(self.buf[..n].to_vec());
        }
        v
    }

    fn out_b(&mut self) -> Vec<Vec<u8>> {
        let mut v = Vec::new();
        while let Ok(Some(n)) = self.b.poll_transmit(self.now, &mut self.buf) {
            v.push(self.buf[..n].to_vec());
        }
        v
    }

    fn decide(&mut self) {
        for c in [&mut self.a, &mut self.b] {
            while let Some(e) = c.poll_event() {
                if let Event::AuthorizationRequired { .. } = e {
                    let _ = c.authorize(self.now, Decision::allow());
                }
            }
        }
    }

    fn drive(&mut self) {
        for _ in 0..16 {
            self.decide();
            let to_b = self.out_a();
            let to_a = self.out_b();
            if to_a.is_empty() && to_b.is_empty() {
                return;
            }
            for p in to_b {
                let _ = self.b.handle_input(self.now, &p);
            }
            for p in to_a {
                let _ = self.a.handle_input(self.now, &p);
            }
        }
    }
}

/// A responder fed arbitrary bytes as the first handshake message, and (for XX) an
/// honest first exchange followed by arbitrary bytes as the third message.
pub fn responder(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else { return };
    let (mode, pattern, suite) = pick(selector);
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(2);
    let cb = config(2, mode, pattern, suite);
    let remote = pattern.responder_knows_initiator().then(|| *StaticKeypair::from_secret_bytes([1; 32]).public());
    let now = Timestamp::from_millis(1);
    let mut b = Connection::new(cb, Role::Responder, remote, now, &mut rng).unwrap();
    let _ = b.handle_input(now, rest);
    let mut buf = vec![0u8; wire::MAX_PACKET_LEN];
    while let Ok(Some(_)) = b.poll_transmit(now, &mut buf) {}
    while let Some(e) = b.poll_event() {
        assert!(!matches!(e, Event::Connected { .. } | Event::Message { .. }), "forged first message accepted");
        if let Event::AuthorizationRequired { .. } = e {
            // Only a genuine key can get here, which random bytes cannot produce.
            let _ = b.authorize(now, Decision::allow());
        }
    }
    // Third message: honest first two, then the fuzzer's bytes.
    let mut pair = Pair::new(mode, Pattern::XX, suite);
    let m1 = pair.out_a();
    for p in &m1 {
        let _ = pair.b.handle_input(pair.now, p);
    }
    let m2 = pair.out_b();
    for p in &m2 {
        let _ = pair.a.handle_input(pair.now, p);
    }
    pair.decide();
    let _ = pair.b.handle_input(pair.now, rest);
    while let Some(e) = pair.b.poll_event() {
        assert!(!matches!(e, Event::Message { .. }), "data accepted from a forged handshake");
    }
}

/// An established session in either mode fed arbitrary packets: each is refused or
/// accepted, nothing panics, and afterwards a genuine packet still gets through.
pub fn session(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else { return };
    let (mode, pattern, suite) = pick(selector);
    let mut pair = Pair::new(mode, pattern, suite);
    pair.drive();
    assert!(pair.a.is_connected() && pair.b.is_connected());
    // Split the rest into packets at 0xff 0xfe markers so the fuzzer can send several.
    for chunk in rest.split(|&b| b == 0xfe) {
        let _ = pair.b.handle_input(pair.now, chunk);
        if pair.b.is_closed() {
            return;
        }
    }
    let _ = pair.out_b();
    while pair.b.poll_event().is_some() {}
    pair.a.send(1, Bytes::from_static(b"genuine")).unwrap();
    let packets = pair.out_a();
    let mut got = false;
    for p in packets {
        pair.b.handle_input(pair.now, &p).unwrap();
    }
    while let Some(e) = pair.b.poll_event() {
        if let Event::Message { payload, .. } = e {
            assert_eq!(&payload[..], b"genuine");
            got = true;
        }
    }
    assert!(got, "a genuine packet was refused after fuzz input");
}

/// The replay window against a `BTreeSet` model on an arbitrary counter sequence.
pub fn replay_window(data: &[u8]) {
    let mut w = ReplayWindow::new();
    let mut seen = BTreeSet::new();
    let mut highest: Option<u64> = None;
    let mut base = 0u64;
    for chunk in data.chunks(3) {
        let (op, delta) = match chunk {
            [op, a, b] => (*op, u64::from(u16::from_le_bytes([*a, *b]))),
            _ => break,
        };
        let c = match op % 4 {
            0 => base.saturating_add(delta),
            1 => base.saturating_sub(delta),
            2 => base.saturating_add(delta << 8),
            _ => u64::MAX - delta,
        };
        let model_ok = !seen.contains(&c) && highest.is_none_or(|h| c > h || h - c < crate::replay::REPLAY_WINDOW);
        assert_eq!(w.check(c).is_ok(), model_ok, "check({c})");
        if op & 0x80 == 0 {
            assert_eq!(w.commit(c).is_ok(), model_ok);
            if model_ok {
                seen.insert(c);
                highest = Some(highest.map_or(c, |h| h.max(c)));
                base = highest.unwrap_or(0);
            }
        }
    }
}
