//! Entry points for the cargo-fuzz targets in `fuzz/` (feature `fuzzing`).
//!
//! Each entry point takes the fuzzer's bytes and panics only when an invariant of the
//! protocol is broken: a panic or arithmetic overflow anywhere below it, forged data
//! accepted, a rejected packet that changed state (a genuine packet no longer works
//! afterwards), a non-canonical re-encoding, or a replay window that disagrees with its
//! model. The byte layout each one reads is documented on it; [`seed_corpus`] writes
//! inputs in those layouts from real handshakes and packets.
//!
//! Everything is deterministic (fixed static keys, seeded RNGs, a virtual clock), so an
//! input replays identically. X25519 dominates the cost of anything that handshakes
//! (about 0.1 ms per operation under coverage instrumentation), so static keys,
//! configurations and handshake transcripts are computed once per thread, and [`session`]
//! reuses an established pair between inputs for as long as the inputs leave it in a
//! known state (see there).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

#[cfg(not(feature = "std"))]
extern crate std;

mod delivery;
mod demux;
mod relay;
mod routing;
mod trust;
pub use delivery::{delivery, op as delivery_op};
pub use demux::{demux, op as demux_op};
pub use relay::{relay, relay_ops, RelayOp};
pub use routing::routing;
pub use trust::{certificate, revocation_list};

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;

use bytes::Bytes;
use rand_core::SeedableRng;

use crate::config::Config;
use crate::connection::{Closed, Connection, Decision, Event};
use crate::crypto::{Psk, PublicKey, StaticKeypair};
use crate::error::DecodeError;
use crate::message::{self, CloseReason, Message};
use crate::params::{Mode, Pattern, Suite, PROTOCOL_VERSION};
use crate::payload::HandshakePayload;
use crate::replay::{ReplayError, ReplayWindow, REPLAY_WINDOW};
use crate::session::{reconstruct_counter, Role, COUNTER_LO_BITS, REJECT_AFTER_MESSAGES};
use crate::time::{Duration, Timestamp};
use crate::wire::{
    self, InitHeader, Packet, RejectReason, HANDSHAKE_PAYLOAD_MAX, MAX_PACKET_LEN, MIN_PACKET_LEN, TAG_LEN,
    TYPE_HANDSHAKE_INIT, TYPE_HANDSHAKE_REJECT, TYPE_HANDSHAKE_RESP, TYPE_TRANSPORT,
};

/// The initiator's static secret key is `[1; 32]`, the responder's `[2; 32]`.
const INITIATOR_SEED: u8 = 1;
const RESPONDER_SEED: u8 = 2;
/// Both sides hold this psk (used by IKpsk2 and XXpsk3).
const PSK: [u8; 32] = [7; 32];
/// The responder announces a smaller packet limit than the initiator, so that both forms of
/// the handshake payload occur and `TooLong` is reachable with small inputs.
const RESPONDER_MAX_PACKET_LEN: usize = 1_400;
/// The virtual time at which every pair starts.
const T0: Timestamp = Timestamp::from_millis(1_000);
/// At most this many packets (responder) or operations (session) are read from one input.
const MAX_STEPS: usize = 64;
/// `Pair::flush` gives up (and fails) after this many rounds without the peers going quiet.
const FLUSH_ROUNDS: usize = 64;

// ---------------------------------------------------------------------------------------
// Input decoding
// ---------------------------------------------------------------------------------------

/// A cursor over the fuzzer's bytes. Every byte string is a valid input: reads past the
/// end give zeros or fewer bytes.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    fn u16(&mut self) -> u16 {
        let lo = self.byte().unwrap_or(0);
        let hi = self.byte().unwrap_or(0);
        u16::from_le_bytes([lo, hi])
    }

    fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }

    /// A chunk: a little-endian u16 length, then that many bytes (fewer at the end).
    fn chunk(&mut self) -> Option<&'a [u8]> {
        if self.0.is_empty() {
            return None;
        }
        let n = self.u16();
        Some(self.take(usize::from(n)))
    }
}

/// Appends `bytes` as a chunk (see `Input::chunk`).
fn push_chunk(out: &mut Vec<u8>, bytes: &[u8]) {
    let n = u16::try_from(bytes.len()).expect("chunk longer than 65535 bytes");
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Selector bit: routed mode (spec §16.2), whatever bit 0 says. Bit 6 was ignored before
/// routed mode was fuzzed, and no committed input sets it, so every older input keeps its
/// meaning.
pub const SELECTOR_ROUTED: u8 = 0x40;

/// Mode, pattern and suite, named by a selector byte: bit 0 = mode (0 stream, 1 datagram),
/// bits 1–3 = index into [`Pattern::ALL`] (modulo its length), bit 4 = index into
/// [`Suite::ALL`], bit 6 ([`SELECTOR_ROUTED`]) = routed mode instead of bit 0's. Bits 5 and
/// 7 are left to the targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Params {
    mode: Mode,
    pattern: Pattern,
    suite: Suite,
}

impl Params {
    fn from_selector(s: u8) -> Self {
        let mode = if s & SELECTOR_ROUTED != 0 {
            Mode::Routed
        } else if s & 1 == 0 {
            Mode::Stream
        } else {
            Mode::Datagram
        };
        Self {
            mode,
            pattern: Pattern::ALL[usize::from((s >> 1) & 0x07) % Pattern::ALL.len()],
            suite: Suite::ALL[usize::from((s >> 4) & 0x01) % Suite::ALL.len()],
        }
    }

    /// The canonical selector of these parameters (bits 5 and 7 clear; bit 0 clear in routed
    /// mode).
    fn selector(self) -> u8 {
        let m = match self.mode {
            Mode::Stream => 0,
            Mode::Datagram => 1,
            Mode::Routed => SELECTOR_ROUTED,
        };
        let p = Pattern::ALL.iter().position(|&x| x == self.pattern).unwrap_or(0);
        let s = Suite::ALL.iter().position(|&x| x == self.suite).unwrap_or(0);
        m | (u8::try_from(p).unwrap_or(0) << 1) | (u8::try_from(s).unwrap_or(0) << 4)
    }

    fn all() -> impl Iterator<Item = Self> {
        [Mode::Stream, Mode::Datagram, Mode::Routed].into_iter().flat_map(|mode| {
            Pattern::ALL
                .into_iter()
                .flat_map(move |pattern| Suite::ALL.into_iter().map(move |suite| Self { mode, pattern, suite }))
        })
    }

    fn name(self) -> String {
        let mode = match self.mode {
            Mode::Stream => "stream",
            Mode::Datagram => "datagram",
            Mode::Routed => "routed",
        };
        let suite = match self.suite {
            Suite::ChaChaPolyBlake2s => "chachapoly",
            Suite::AesGcmSha256 => "aesgcm",
        };
        format!("{}-{}-{mode}", self.pattern.noise_name().to_ascii_lowercase(), suite)
    }
}

// ---------------------------------------------------------------------------------------
// Deterministic endpoints, cached per thread
// ---------------------------------------------------------------------------------------

std::thread_local! {
    static CONFIGS: RefCell<BTreeMap<(u8, u8), Arc<Config>>> = const { RefCell::new(BTreeMap::new()) };
    static TRANSCRIPTS: RefCell<BTreeMap<u8, Arc<Transcript>>> = const { RefCell::new(BTreeMap::new()) };
    static PAIRS: RefCell<BTreeMap<u8, Pair>> = const { RefCell::new(BTreeMap::new()) };
}

const fn side(role: Role) -> usize {
    match role {
        Role::Initiator => 0,
        Role::Responder => 1,
    }
}

/// The configuration of one side (initiator or responder) for `p`.
fn config(role: Role, p: Params) -> Arc<Config> {
    let key = (u8::try_from(side(role)).unwrap_or(0), p.selector());
    CONFIGS.with(|c| {
        let mut map = c.borrow_mut();
        if let Some(cfg) = map.get(&key) {
            return Arc::clone(cfg);
        }
        let seed = if role == Role::Initiator { INITIATOR_SEED } else { RESPONDER_SEED };
        let mut cfg = Config::new(StaticKeypair::from_secret_bytes([seed; 32]), p.mode);
        cfg.pattern = p.pattern;
        cfg.suite = p.suite;
        cfg.psk = Some(Psk::new(PSK));
        if role == Role::Responder {
            cfg.limits.max_packet_len = RESPONDER_MAX_PACKET_LEN;
        }
        let cfg = Arc::new(cfg);
        map.insert(key, Arc::clone(&cfg));
        cfg
    })
}

fn public_key(role: Role) -> PublicKey {
    *config(role, Params::from_selector(0)).public_key()
}

/// A fresh connection for `role`. Its RNG is seeded by role only, so a rebuilt responder
/// writes byte-identical packets to the one in the transcript.
fn connection(role: Role, p: Params) -> Connection {
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(10 + side(role) as u64);
    let remote = match role {
        Role::Initiator => p.pattern.initiator_knows_responder().then(|| public_key(Role::Responder)),
        // Only a KK responder uses it; the others learn the key from the handshake.
        Role::Responder => Some(public_key(Role::Initiator)),
    };
    Connection::new(config(role, p), role, remote, T0, &mut rng).unwrap()
}

/// Two connected endpoints: `c[0]` the initiator, `c[1]` the responder.
struct Pair {
    c: [Connection; 2],
    now: Timestamp,
    buf: Vec<u8>,
    /// Every packet `flush` moved: (sending side, bytes).
    log: Option<Vec<(usize, Vec<u8>)>>,
}

impl Pair {
    fn new(p: Params) -> Self {
        Self {
            c: [connection(Role::Initiator, p), connection(Role::Responder, p)],
            now: T0,
            buf: vec![0u8; MAX_PACKET_LEN],
            log: None,
        }
    }

    /// Moves packets both ways, in order and without loss, until neither side has anything
    /// to send; authorization requests are allowed. Events go to `events[side]`.
    fn flush(&mut self, events: &mut [Vec<Event>; 2]) {
        for _ in 0..FLUSH_ROUNDS {
            let mut moved = false;
            for s in 0..2 {
                while let Ok(Some(n)) = self.c[s].poll_transmit(self.now, &mut self.buf) {
                    moved = true;
                    let packet = self.buf[..n].to_vec();
                    let _ = self.c[1 - s].handle_input(self.now, &packet);
                    if let Some(log) = self.log.as_mut() {
                        log.push((s, packet));
                    }
                    self.take_events(1 - s, &mut events[1 - s]);
                }
                self.take_events(s, &mut events[s]);
            }
            if !moved {
                return;
            }
        }
        panic!("the peers never stop answering each other: an endless exchange");
    }

    fn take_events(&mut self, s: usize, out: &mut Vec<Event>) {
        while let Some(e) = self.c[s].poll_event() {
            if matches!(e, Event::AuthorizationRequired { .. }) {
                let _ = self.c[s].authorize(self.now, Decision::allow());
            }
            out.push(e);
        }
    }

    /// `c[s]` sends one data message through its queue; the peer must receive exactly it.
    fn probe(&mut self, s: usize, payload: &'static [u8]) -> bool {
        if self.c[s].send(PROBE_CHANNEL, Bytes::from_static(payload)).is_err() {
            return false;
        }
        let mut events = [Vec::new(), Vec::new()];
        self.flush(&mut events);
        let got: Vec<&Bytes> = events[1 - s]
            .iter()
            .filter_map(|e| match e {
                Event::Message { channel, payload, .. } => {
                    assert_eq!(*channel, PROBE_CHANNEL, "data appeared from nowhere");
                    Some(payload)
                }
                _ => None,
            })
            .collect();
        for p in &got {
            assert_eq!(&p[..], payload, "the probe arrived altered");
        }
        assert!(got.len() <= 1, "the probe was delivered twice");
        got.len() == 1
    }

    /// Runs the handshake and one data message each way ("warm-up"). Counters 0 and 1 are
    /// then used in both directions, so the transport packets of a [`Transcript`] (and of
    /// the seed corpus) are replays for this pair, never genuine.
    fn established(p: Params) -> Self {
        let mut pair = Self::new(p);
        let mut events = [Vec::new(), Vec::new()];
        pair.flush(&mut events);
        assert!(pair.c[0].is_connected() && pair.c[1].is_connected(), "{p:?}: the handshake failed");
        for _ in 0..2 {
            assert!(pair.probe(0, b"warm-up a->b") && pair.probe(1, b"warm-up b->a"), "{p:?}: warm-up failed");
        }
        pair
    }
}

const PROBE_CHANNEL: u16 = 0xbeef;

/// Every packet of a complete, lossless handshake and first message for some `Params`.
struct Transcript {
    /// Initiator → responder: INIT, (XX: FINAL,) the confirmation or first transport
    /// packet(s), then one data packet.
    a_to_b: Vec<Vec<u8>>,
    /// Responder → initiator: RESP, (XX: its confirmation packet.)
    b_to_a: Vec<Vec<u8>>,
}

fn transcript(p: Params) -> Arc<Transcript> {
    if let Some(t) = TRANSCRIPTS.with(|t| t.borrow().get(&p.selector()).cloned()) {
        return t;
    }
    let mut pair = Pair::new(p);
    pair.log = Some(Vec::new());
    let mut events = [Vec::new(), Vec::new()];
    pair.flush(&mut events);
    assert!(pair.c[0].is_connected() && pair.c[1].is_connected(), "{p:?}: the handshake failed");
    assert!(pair.probe(0, b"hello"), "{p:?}: first message lost");
    let log = pair.log.take().unwrap_or_default();
    let pick = |s: usize| log.iter().filter(|(from, _)| *from == s).map(|(_, b)| b.clone()).collect::<Vec<_>>();
    let t = Arc::new(Transcript { a_to_b: pick(0), b_to_a: pick(1) });
    TRANSCRIPTS.with(|m| m.borrow_mut().insert(p.selector(), Arc::clone(&t)));
    t
}

// ---------------------------------------------------------------------------------------
// decode
// ---------------------------------------------------------------------------------------

/// Decodes `data` as a packet in both modes (with two packet limits), as a handshake
/// payload and as a transport plaintext (a sequence of messages).
///
/// Checks that every accepted packet splits exactly as spec §4.2 lays it out and that its
/// header re-encodes to the received bytes; that the length limit is applied first; that a
/// datagram's receiver index is read the same way by [`wire::datagram_receiver_index`];
/// that decoded payloads and messages re-encode canonically (no longer than the input, and
/// decoding back to the same value), with `encoded_len` exact; and that
/// [`message::validate`] agrees with message-by-message decoding.
pub fn decode(data: &[u8]) {
    for mode in [Mode::Stream, Mode::Datagram, Mode::Routed] {
        let full = wire::parse(mode, MAX_PACKET_LEN, data);
        let small = wire::parse(mode, MIN_PACKET_LEN, data);
        // spec §4.4 step 1: the length is checked before anything else.
        if data.is_empty() {
            assert_eq!(full, Err(DecodeError::Empty));
        } else if data.len() > MAX_PACKET_LEN {
            assert_eq!(full, Err(DecodeError::TooLong));
        } else if data.len() > MIN_PACKET_LEN {
            assert_eq!(small, Err(DecodeError::TooLong));
        } else {
            assert_eq!(full, small);
        }
        if let Ok(packet) = full {
            check_packet(mode, data, packet);
        }
    }

    cookie_check(data);

    if let Ok(p) = HandshakePayload::decode(data) {
        assert!(p.max_version != 0 && data.len() <= HANDSHAKE_PAYLOAD_MAX);
        assert!(p.max_packet_len.is_none_or(|m| usize::from(m) >= MIN_PACKET_LEN));
        let mut buf = [0u8; HANDSHAKE_PAYLOAD_MAX];
        let n = p.encode(&mut buf).unwrap();
        // postcard accepts over-long varints and spec §1.1 only binds senders to the
        // canonical form, so the input may be longer than its re-encoding, never shorter.
        assert!(n <= data.len(), "re-encoding is longer than the input");
        assert_eq!(HandshakePayload::decode(&buf[..n]).as_ref(), Ok(&p));
    }

    let mut rest = data;
    let mut count = 0;
    let mut valid = true;
    while !rest.is_empty() {
        let Ok((m, tail)) = Message::decode(rest) else {
            valid = false;
            break;
        };
        let consumed = rest.len() - tail.len();
        let len = m.encoded_len();
        assert!(len <= consumed, "{m:?}: encoded_len {len} > {consumed} bytes read");
        let mut buf = vec![0u8; len];
        assert_eq!(m.encode(&mut buf), Ok(len), "{m:?}");
        assert_eq!(Message::decode(&buf), Ok((m, &[][..])));
        assert!(m.encode(&mut buf[..len - 1]).is_err(), "{m:?} encoded into a short buffer");
        if let Message::Close { reason } = m {
            assert_eq!(CloseReason::from_code(reason.code()), reason);
        }
        count += 1;
        rest = tail;
    }
    assert_eq!(message::validate(data).ok(), valid.then_some(count));
}

/// The cookie challenge (spec §5.7.4) on `data` as a datagram from a fixed address, under a
/// fixed secret: nothing panics; a COOKIE_REPLY is smaller than the datagram that caused it and
/// carries that INIT's index; sending the INIT back with that cookie proves the address, and
/// from another address it does not; a REJECT is the 6-byte datagram REJECT of spec §5.8; an
/// INIT goes on unchanged, without its INIT_COOKIE prefix.
fn cookie_check(data: &[u8]) {
    use crate::cookie::{CookieChecker, CookieStatus, Verdict};
    use core::net::{IpAddr, Ipv4Addr, SocketAddr};
    if !matches!(data.first(), Some(&TYPE_HANDSHAKE_INIT | &wire::TYPE_HANDSHAKE_INIT_COOKIE)) {
        return;
    }
    thread_local! {
        static COOKIE_CONFIG: Arc<Config> = {
            let mut c = Config::new(StaticKeypair::from_secret_bytes([RESPONDER_SEED; 32]), Mode::Datagram);
            c.limits.max_packet_len = RESPONDER_MAX_PACKET_LEN;
            c.accept_patterns.retain(|p| *p != Pattern::KK);
            Arc::new(c)
        };
    }
    let config = COOKIE_CONFIG.with(Arc::clone);
    let src = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 51_820);
    let other = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 51_821);
    let mut checker =
        CookieChecker::new(T0, crate::cookie::COOKIE_SECRET_LIFETIME, &mut rand_chacha::ChaCha20Rng::seed_from_u64(3));
    for demand in [false, true] {
        let mut out = [0u8; 64];
        match checker.verdict(T0, &src, data, demand, &config, &mut out) {
            Verdict::Proceed { init, cookie } => {
                assert!(data.ends_with(init), "the INIT handed on is not the datagram's");
                assert_eq!(init.first(), Some(&TYPE_HANDSHAKE_INIT));
                assert!(!demand || cookie == CookieStatus::Valid, "an unproven address went on under demand");
                let wrapped = data.first() == Some(&wire::TYPE_HANDSHAKE_INIT_COOKIE);
                assert_eq!(init.len() + usize::from(wrapped) * wire::INIT_COOKIE_PREFIX_LEN, data.len());
            }
            Verdict::CookieReply { len, cookie } => {
                assert!(demand, "a COOKIE_REPLY without demand");
                assert!(len < data.len(), "COOKIE_REPLY of {len} B for a {} B datagram", data.len());
                assert_ne!(cookie, CookieStatus::Valid);
                let Ok(Packet::CookieReply { receiver_index, cookie }) =
                    wire::parse(Mode::Datagram, MAX_PACKET_LEN, &out[..len])
                else {
                    panic!("the COOKIE_REPLY does not parse");
                };
                let init = match wire::parse(Mode::Datagram, MAX_PACKET_LEN, data) {
                    Ok(Packet::Init { .. }) => data,
                    Ok(Packet::InitCookie { init, .. }) => init,
                    other => panic!("a COOKIE_REPLY for {other:?}"),
                };
                assert_eq!(receiver_index, be32(&init[3..]));
                let mut back = vec![0u8; wire::INIT_COOKIE_PREFIX_LEN + init.len()];
                wire::encode_init_cookie(&cookie, init, &mut back).unwrap();
                let mut out2 = [0u8; 64];
                assert_eq!(
                    checker.verdict(T0, &src, &back, true, &config, &mut out2),
                    Verdict::Proceed { init, cookie: CookieStatus::Valid },
                    "the cookie does not prove the address it was made for"
                );
                assert!(
                    matches!(
                        checker.verdict(T0, &other, &back, true, &config, &mut out2),
                        Verdict::CookieReply { cookie: CookieStatus::Invalid, .. }
                    ),
                    "a cookie proved another port"
                );
            }
            Verdict::Reject { len, .. } => {
                assert!(demand, "a stateless REJECT without demand");
                assert_eq!(len, 6);
                assert_eq!(out[0], TYPE_HANDSHAKE_REJECT);
                assert!(len < data.len());
            }
            Verdict::Drop(_) => {}
        }
    }
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// spec §4.2: the layout of each packet type, checked against a parsed packet.
fn check_packet(mode: Mode, data: &[u8], packet: Packet<'_>) {
    // Handshake packets have the datagram layouts in routed mode too (spec §16.2).
    let dg = mode.has_indices();
    let receiver_index = match packet {
        Packet::Init { header, header_bytes, body } => {
            let hlen = InitHeader::len(mode);
            assert_eq!(header_bytes, &data[..hlen]);
            assert_eq!(body, &data[hlen..]);
            assert_eq!(header.version, PROTOCOL_VERSION);
            assert_eq!(header.sender_index.is_some(), dg);
            let mut h = [0u8; 7];
            let n = header.encode(mode, &mut h).unwrap();
            assert_eq!(&h[..n], header_bytes, "INIT header does not re-encode to its bytes");
            None
        }
        Packet::Resp { receiver_index, sender_index, body } => {
            if dg {
                assert_eq!((receiver_index, sender_index), (Some(be32(&data[1..])), Some(be32(&data[5..]))));
                assert_eq!(body, &data[9..]);
            } else {
                assert_eq!((receiver_index, sender_index, body), (None, None, &data[1..]));
            }
            receiver_index
        }
        Packet::Final { receiver_index, body } => {
            if dg {
                assert_eq!((receiver_index, body), (Some(be32(&data[1..])), &data[5..]));
            } else {
                assert_eq!((receiver_index, body), (None, &data[1..]));
            }
            receiver_index
        }
        Packet::Reject { receiver_index, reason } => {
            assert_eq!(data.len(), if dg { 6 } else { 2 }, "REJECT is exactly its header");
            assert_eq!(Some(&reason.code()), data.last());
            assert_eq!(RejectReason::from_code(reason.code()), reason);
            assert_eq!(receiver_index, dg.then(|| be32(&data[1..])));
            receiver_index
        }
        Packet::CookieReply { receiver_index, cookie } => {
            assert_eq!(mode, Mode::Datagram, "COOKIE_REPLY accepted outside datagram mode");
            assert_eq!(data.len(), wire::COOKIE_REPLY_LEN, "COOKIE_REPLY is exactly its layout");
            assert_eq!(receiver_index, be32(&data[1..]));
            assert_eq!(&cookie[..], &data[5..]);
            let mut buf = [0u8; wire::COOKIE_REPLY_LEN];
            wire::encode_cookie_reply(receiver_index, &cookie, &mut buf).unwrap();
            assert_eq!(&buf[..], data, "COOKIE_REPLY does not re-encode to its bytes");
            Some(receiver_index)
        }
        Packet::InitCookie { cookie, init, header, header_bytes, body } => {
            assert_eq!(mode, Mode::Datagram, "INIT_COOKIE accepted outside datagram mode");
            let p = wire::INIT_COOKIE_PREFIX_LEN;
            assert_eq!((&cookie[..], init), (&data[1..p], &data[p..]));
            assert_eq!(wire::parse(mode, MAX_PACKET_LEN, init), Ok(Packet::Init { header, header_bytes, body }));
            let mut buf = vec![0u8; data.len()];
            assert_eq!(wire::encode_init_cookie(&cookie, init, &mut buf), Ok(data.len()));
            assert_eq!(buf, data, "INIT_COOKIE does not re-encode to its bytes");
            None
        }
        Packet::Transport(h, bytes) => {
            let hlen = wire::transport_header_len(mode);
            assert_eq!(bytes, data);
            assert!(data.len() >= hlen + TAG_LEN);
            // spec §16.2: routed transport headers have a counter and no index.
            assert_eq!(h.receiver_index.is_some(), mode == Mode::Datagram);
            assert_eq!(h.counter_lo.is_some(), mode.is_lossy());
            assert!(!(mode.is_lossy() && h.epoch_advance), "epoch-advance flag accepted in {mode:?} mode");
            assert!(h.counter_lo.is_none_or(|c| c < 1 << COUNTER_LO_BITS));
            let mut buf = [0u8; 8];
            let n = h.encode(mode, &mut buf).unwrap();
            assert_eq!(&buf[..n], &data[..hlen], "transport header does not re-encode to its bytes");
            h.receiver_index
        }
    };
    match mode {
        Mode::Datagram => {
            if let Some(i) = receiver_index {
                assert_eq!(wire::datagram_receiver_index(data), Some(i), "demultiplexing disagrees with parsing");
            }
        }
        // spec §16.6: a routed endpoint reads the index of RESP, FINAL and REJECT only.
        Mode::Routed => {
            let handshake = matches!(packet, Packet::Resp { .. } | Packet::Final { .. } | Packet::Reject { .. });
            let want = if handshake { receiver_index } else { None };
            assert_eq!(wire::routed_receiver_index(data), want, "demultiplexing disagrees with parsing");
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------
// responder
// ---------------------------------------------------------------------------------------

/// Selector bit of [`responder`]: fuzz the third handshake message instead of the first.
pub const RESPONDER_THIRD: u8 = 0x20;

/// A responder fed arbitrary packets.
///
/// Input: a selector byte (bit 0 mode, bits 1–3 pattern, bit 4 suite, bit 5 =
/// [`RESPONDER_THIRD`], bit 6 = [`SELECTOR_ROUTED`]), then up to 64 packets, each a
/// little-endian u16 length and its bytes.
///
/// - First-message mode (bit 5 clear): a fresh responder reads the packets from the start;
///   the pattern and suite come from the INIT header the input carries (the selector picks
///   the mode). Replaying a whole transcript from the seed corpus completes a session.
/// - Third-message mode (bit 5 set; the pattern becomes XX or XXpsk3): the responder first
///   reads a genuine INIT and answers, then reads the packets in place of FINAL.
///
/// Invariants: only the initiator's real static key is ever authenticated, and only from
/// its genuine messages; no `Connected` or data before that; in datagram and routed mode an
/// injected packet never ends a handshake in progress and is answered with nothing but the
/// negotiation REJECTs of spec §4.3, REJECT(Malformed) for an INIT longer than
/// `max_packet_len` (spec §10.2 #5), or a byte-identical resend of RESP (spec §5.7.2,
/// §10.1), and every packet sent has the mode's layout (routed: datagram handshake layouts,
/// no COOKIE_REPLY, a 4-byte transport header, spec §16.2); and after any number of forged
/// FINALs the genuine FINAL still completes the handshake (a failed decrypt changes no
/// state).
pub fn responder(data: &[u8]) {
    let mut input = Input(data);
    let Some(selector) = input.byte() else { return };
    let p = Params::from_selector(selector);
    if selector & RESPONDER_THIRD == 0 {
        responder_first(p, input);
    } else {
        responder_third(p, input);
    }
}

/// What a fuzzed responder did so far.
#[derive(Default)]
struct Watch {
    /// It read a valid INIT (it answered RESP or asked for a decision).
    started: bool,
    /// It authenticated the initiator's static key.
    authenticated: bool,
    connected: bool,
    closed: bool,
}

impl Watch {
    /// Drains the responder's packets and events after `packet`, checking each.
    fn observe(&mut self, b: &mut Connection, mode: Mode, packet: &[u8], genuine: &[&[u8]], resp: Option<&[u8]>) {
        let mut buf = vec![0u8; MAX_PACKET_LEN];
        loop {
            let mut progress = false;
            while let Ok(Some(n)) = b.poll_transmit(T0, &mut buf) {
                progress = true;
                self.check_output(mode, &buf[..n], resp, packet.len());
            }
            while let Some(e) = b.poll_event() {
                progress = true;
                match e {
                    Event::AuthorizationRequired { remote_static, .. } => {
                        assert_eq!(remote_static, public_key(Role::Initiator), "authenticated a key nobody holds");
                        assert!(genuine.contains(&packet), "authenticated a packet the initiator never sent");
                        self.started = true;
                        self.authenticated = true;
                        let _ = b.authorize(T0, Decision::allow());
                    }
                    Event::Connected { remote_static, .. } => {
                        assert!(self.authenticated, "connected without authenticating the initiator");
                        assert_eq!(remote_static, public_key(Role::Initiator));
                        self.connected = true;
                    }
                    Event::Message { .. } => assert!(self.connected, "data accepted before the session was confirmed"),
                    Event::Closed(c) => {
                        self.closed = true;
                        // spec §10.1: in datagram mode anyone can inject a packet, so one that
                        // fails a check is dropped and a pending handshake goes on.
                        assert!(
                            mode == Mode::Stream || !self.started,
                            "an injected datagram ended a handshake in progress: {c:?}"
                        );
                    }
                    _ => {}
                }
            }
            if !progress {
                return;
            }
        }
    }

    /// `read` is the length of the packet the responder was given last.
    fn check_output(&mut self, mode: Mode, out: &[u8], resp: Option<&[u8]>, read: usize) {
        // spec §4.2, §16.2: whatever it sends has its own mode's layout.
        let parsed = wire::parse(mode, MAX_PACKET_LEN, out);
        assert!(parsed.is_ok(), "the responder sent a packet its mode does not parse: {parsed:?}");
        match out.first().copied() {
            Some(TYPE_HANDSHAKE_RESP) => {
                self.started = true;
                if let (Some(r), false) = (resp, self.authenticated) {
                    assert_eq!(out, r, "the responder resent something other than its RESP");
                }
            }
            Some(TYPE_HANDSHAKE_REJECT) => {
                // spec §10.2: in datagram mode only the negotiation REJECTs of §4.3 are sent,
                // and Malformed for an INIT longer than `max_packet_len` (#5).
                let reason = RejectReason::from_code(out.last().copied().unwrap_or(0));
                assert!(
                    mode == Mode::Stream
                        || matches!(
                            reason,
                            RejectReason::UnsupportedVersion
                                | RejectReason::UnsupportedPattern
                                | RejectReason::UnsupportedSuite
                        )
                        || (reason == RejectReason::Malformed && read > RESPONDER_MAX_PACKET_LEN),
                    "datagram responder answered with REJECT({reason}) to a {read}-byte packet"
                );
            }
            Some(t) if t & !0x03 == TYPE_TRANSPORT => {
                assert!(self.authenticated, "transport packet sent before the handshake completed");
            }
            t => panic!("the responder sent a packet of type {t:?}"),
        }
    }
}

fn responder_first(p: Params, mut input: Input<'_>) {
    let mut b = connection(Role::Responder, p);
    let mut watch = Watch::default();
    // The genuine initiator packets for the pattern and suite the INIT names.
    let mut genuine = Vec::new();
    for _ in 0..MAX_STEPS {
        let Some(packet) = input.chunk() else { break };
        if genuine.is_empty() && packet.first() == Some(&TYPE_HANDSHAKE_INIT) {
            if let Ok(Packet::Init { header, .. }) = wire::parse(p.mode, MAX_PACKET_LEN, packet) {
                genuine = transcript(Params { pattern: header.pattern, suite: header.suite, ..p }).a_to_b.clone();
            }
        }
        let _ = b.handle_input(T0, packet);
        let g: Vec<&[u8]> = genuine.iter().map(Vec::as_slice).collect();
        watch.observe(&mut b, p.mode, packet, &g, None);
    }
}

fn responder_third(p: Params, mut input: Input<'_>) {
    let pattern = if p.pattern.psk_position().is_some() { Pattern::XXpsk3 } else { Pattern::XX };
    let p = Params { pattern, ..p };
    let t = transcript(p);
    let (init, resp, fin) = (&t.a_to_b[0], &t.b_to_a[0], &t.a_to_b[1]);
    let mut b = connection(Role::Responder, p);
    b.handle_input(T0, init).unwrap();
    let mut buf = vec![0u8; MAX_PACKET_LEN];
    let n = b.poll_transmit(T0, &mut buf).unwrap().unwrap();
    assert_eq!(&buf[..n], &resp[..], "a rebuilt responder answered differently: not deterministic");
    assert!(b.poll_transmit(T0, &mut buf).unwrap().is_none() && b.poll_event().is_none());

    let mut watch = Watch { started: true, ..Watch::default() };
    let genuine: Vec<&[u8]> = t.a_to_b[1..].iter().map(Vec::as_slice).collect();
    for _ in 0..MAX_STEPS {
        let Some(packet) = input.chunk() else { break };
        let _ = b.handle_input(T0, packet);
        watch.observe(&mut b, p.mode, packet, &genuine, Some(resp));
    }
    if p.mode.is_lossy() && !watch.authenticated {
        // spec §10.1: the forged packets changed nothing, so the genuine FINAL still works.
        let r = b.handle_input(T0, fin);
        assert!(r.is_ok(), "{p:?}: genuine FINAL refused after forged packets: {r:?}");
        watch.observe(&mut b, p.mode, fin, &genuine, Some(resp));
        assert!(watch.connected, "{p:?}: the handshake did not complete after forged packets");
    }
}

// ---------------------------------------------------------------------------------------
// session
// ---------------------------------------------------------------------------------------

/// Operation codes of the [`session`] and [`session_lifetime`] scripts: the low nibble of
/// an opcode byte (values above [`op::CLOSE`] wrap around); bit 4 ([`op::B_TO_A`]) sends
/// from the responder instead of the initiator. Operations marked *lifetime* are read but
/// ignored by [`session`].
pub mod op {
    /// `chunk`: arbitrary bytes delivered as a packet.
    pub const RAW: u8 = 0;
    /// `chunk`: the sender seals these bytes as a plaintext into a genuine packet, kept in
    /// flight. [`session_lifetime`](super::session_lifetime) takes them as they are (any message sequence, valid or
    /// not); [`session`](super::session) keeps their longest prefix of valid Data, Ping and Pong messages.
    pub const SEAL: u8 = 1;
    /// `channel: u8, chunk`: the sender seals one Data message with this payload.
    pub const SEAL_DATA: u8 = 2;
    /// `index: u8`: delivers in-flight packet `index` (modulo their number) unchanged.
    pub const DELIVER: u8 = 3;
    /// `index: u8, kind: u8, position: u16, value: u8`: delivers a modified copy of an
    /// in-flight packet (kind 0: xor a byte, 1: truncate, 2: append a byte, 3: the header
    /// of another packet).
    pub const DELIVER_MUTATED: u8 = 4;
    /// *Lifetime.* `u16`: the clock advances by that many times 10 ms.
    pub const ADVANCE: u8 = 5;
    /// Both sides run their timers.
    pub const TIMEOUT: u8 = 6;
    /// *Lifetime.* Everything in flight is delivered, then the initiator re-handshakes (once
    /// per input: later ones only deliver).
    pub const REHANDSHAKE: u8 = 7;
    /// `id: u8`: the sender queues a ping.
    pub const PING: u8 = 8;
    /// Everything in flight is delivered in order, then queued packets are exchanged.
    pub const SETTLE: u8 = 9;
    /// *Lifetime.* `reason: u8`: the sender closes; then as [`SETTLE`].
    pub const CLOSE: u8 = 10;
    /// Direction bit: the responder sends.
    pub const B_TO_A: u8 = 0x10;
    pub(super) const COUNT: u8 = 11;
}

/// After this many packets in one direction the cached pair is rebuilt, far below the
/// first epoch change (2^20) and the counter reconstruction half-width (2^23).
const SESSION_COUNTER_LIMIT: u64 = 1 << 16;

/// An established session in any mode (stream, datagram, routed), pattern and suite, fed a
/// script of packets:
/// arbitrary bytes, and genuine packets (with fuzzer-chosen Data, Ping and Pong messages)
/// delivered unchanged, modified, repeated or out of order.
///
/// Input: a selector byte (bit 0 mode, bits 1–3 pattern, bit 4 suite, bit 6 routed mode:
/// [`SELECTOR_ROUTED`]), then operations (see [`op`]). Packets sealed by a side stay in flight until the script delivers them. At
/// the end everything still in flight is delivered in order and each side sends one data
/// message through its queue.
///
/// Invariants (spec §6, §8, §9, §10): a modified or arbitrary packet is never
/// authenticated and never yields an event; a genuine packet is authenticated exactly when
/// the model says so (stream: it is next in order; datagram and routed: not seen before and
/// inside the replay window) and yields exactly the events its plaintext calls for; every
/// sealed packet has its mode's transport header (routed: 4 bytes, the counter's low bits
/// and no receiver index, spec §16.2); a refused packet
/// leaves the connection open and changes nothing, so every genuine packet still in flight,
/// and a new one each way, is delivered at the end; the peers never answer each other
/// forever.
///
/// An established pair is cached per selector and reused by the next input: a script
/// leaves it as a fresh one except for counter values, and refers only to packets it sealed
/// itself, so it behaves the same on either. A clean script runs in about 0.1 ms where a
/// new pair costs a handshake (1–2 ms under coverage instrumentation); everything that
/// would spoil the pair is left to [`session_lifetime`].
pub fn session(data: &[u8]) {
    run_session(data, false);
}

/// [`session`] with the rest of a session's life: the clock (time-based rekeying, key
/// overlap, expiry), timers (keepalive, idle), a re-handshake (generation switch, previous
/// session), close, and arbitrary authenticated plaintexts (malformed messages, Close,
/// re-handshake messages). Same input layout and operations.
///
/// Once the clock moved, a re-handshake or close happened, or an authenticated plaintext
/// carried a re-handshake, close or malformed message, the exact model no longer applies:
/// then forged packets must still yield no event, and data may only come from genuine
/// packets, each delivering a prefix of its Data messages. Such a script spoils the
/// cached pair, so most inputs pay for a new handshake: this target runs ten to twenty
/// times slower than [`session`].
pub fn session_lifetime(data: &[u8]) {
    run_session(data, true);
}

fn run_session(data: &[u8], lifetime: bool) {
    let mut input = Input(data);
    let Some(selector) = input.byte() else { return };
    let p = Params::from_selector(selector);
    let key = p.selector();
    let pair = PAIRS.with(|m| m.borrow_mut().remove(&key)).unwrap_or_else(|| Pair::established(p));
    let mut run = SessionRun::new(p, pair, lifetime);
    for _ in 0..MAX_STEPS {
        let Some(opcode) = input.byte() else { break };
        run.step(opcode, &mut input);
    }
    run.settle();
    for s in 0..2 {
        if !run.both_connected() {
            break;
        }
        let ok = run.pair.probe(s, if s == 0 { b"probe a->b" } else { b"probe b->a" });
        assert!(ok || !run.exact, "{p:?}: a genuine message was lost after the script");
    }
    assert!(lifetime || run.exact, "{p:?}: a packets-only script left the exact model");
    let counters_ok = run.pair.c.iter().all(|c| c.session().is_some_and(|s| s.send_counter() < SESSION_COUNTER_LIMIT));
    if run.exact && run.both_connected() && counters_ok {
        PAIRS.with(|m| m.borrow_mut().insert(key, run.pair));
    }
}

/// A packet sealed by the script, in flight.
struct Flight {
    packet: Vec<u8>,
    plaintext: Vec<u8>,
    counter: u64,
    accepted: bool,
}

/// One direction of the script: the packets in flight and the receiver's model.
#[derive(Default)]
struct Lane {
    flights: Vec<Flight>,
    /// Stream mode: the receiver's next expected counter.
    expected: u64,
    /// Datagram mode: the highest counter the receiver accepted from this script.
    highest: Option<u64>,
}

struct SessionRun {
    p: Params,
    pair: Pair,
    /// `lanes[s]`: packets sent by side `s`.
    lanes: [Lane; 2],
    /// Lifetime operations and arbitrary plaintexts are allowed ([`session_lifetime`]).
    lifetime: bool,
    /// The exact model applies (see [`session_lifetime`]).
    exact: bool,
    /// The script ran its (only) re-handshake.
    rehandshaked: bool,
    next_id: u64,
}

impl SessionRun {
    fn new(p: Params, pair: Pair, lifetime: bool) -> Self {
        let lanes = [Lane::default(), Lane::default()];
        let mut run = Self { p, pair, lanes, lifetime, exact: true, rehandshaked: false, next_id: 0 };
        run.sync_model();
        run
    }

    fn both_connected(&self) -> bool {
        self.pair.c.iter().all(Connection::is_connected)
    }

    /// After a lossless exchange, each receiver expects the sender's next counter.
    fn sync_model(&mut self) {
        for s in 0..2 {
            let next = self.pair.c[s].session().map_or(0, crate::session::Session::send_counter);
            self.lanes[s].expected = next;
            self.lanes[s].highest = None;
        }
    }

    fn step(&mut self, opcode: u8, input: &mut Input<'_>) {
        let s = usize::from(opcode & op::B_TO_A != 0);
        match (opcode & 0x0f) % op::COUNT {
            op::RAW => {
                let bytes = input.chunk().unwrap_or_default();
                self.deliver(s, bytes, None);
            }
            op::SEAL => {
                let mut plaintext = input.chunk().unwrap_or_default();
                if !self.lifetime {
                    plaintext = &plaintext[..plain_prefix(plaintext)];
                }
                self.seal(s, plaintext);
            }
            op::SEAL_DATA => {
                let channel = u16::from(input.byte().unwrap_or(0));
                let payload = input.chunk().unwrap_or_default();
                let m = Message::Data { channel, id: self.next_id, payload };
                self.next_id += 1;
                let mut plaintext = vec![0u8; m.encoded_len()];
                let n = m.encode(&mut plaintext).unwrap();
                plaintext.truncate(n);
                self.seal(s, &plaintext);
            }
            op::DELIVER => {
                let i = usize::from(input.byte().unwrap_or(0));
                if !self.lanes[s].flights.is_empty() {
                    let i = i % self.lanes[s].flights.len();
                    let packet = self.lanes[s].flights[i].packet.clone();
                    self.deliver(s, &packet, Some(i));
                }
            }
            op::DELIVER_MUTATED => {
                let (i, kind, pos, value) =
                    (usize::from(input.byte().unwrap_or(0)), input.byte().unwrap_or(0), input.u16(), input.byte());
                let flights = &self.lanes[s].flights;
                if flights.is_empty() {
                    return;
                }
                let original = &flights[i % flights.len()].packet;
                let mut forged = original.clone();
                let pos = usize::from(pos) % original.len();
                match kind % 4 {
                    0 => forged[pos] ^= value.unwrap_or(0).max(1),
                    1 => forged.truncate(pos),
                    2 => forged.push(value.unwrap_or(0)),
                    _ => {
                        let other = &flights[usize::from(value.unwrap_or(0)) % flights.len()].packet;
                        let hlen = wire::transport_header_len(self.p.mode);
                        forged[..hlen].copy_from_slice(&other[..hlen]);
                    }
                }
                if forged != *original {
                    self.deliver(s, &forged, None);
                }
            }
            op::ADVANCE => {
                let ms = u64::from(input.u16()) * 10;
                if self.lifetime {
                    self.exact = false;
                    self.pair.now = self.pair.now + Duration::from_millis(ms);
                }
            }
            op::TIMEOUT => {
                // At the start time no timer is due: the exact model still holds.
                for c in &mut self.pair.c {
                    c.handle_timeout(self.pair.now);
                }
                self.drain_unsolicited();
            }
            op::REHANDSHAKE => {
                self.settle();
                // A handshake costs a hundred times more than everything else in a script.
                if self.lifetime && !self.rehandshaked {
                    self.rehandshaked = true;
                    self.exact = false;
                    if self.pair.c[0].start_rehandshake(self.pair.now).is_ok() {
                        self.flush();
                    }
                }
            }
            op::PING => {
                let id = u32::from(input.byte().unwrap_or(0));
                let _ = self.pair.c[s].ping(id);
            }
            op::SETTLE => self.settle(),
            _ => {
                let reason = CloseReason::from_code(u16::from(input.byte().unwrap_or(0)));
                if self.lifetime {
                    self.exact = false;
                    self.pair.c[s].close(self.pair.now, reason);
                }
                self.settle();
            }
        }
    }

    /// Side `s` seals `plaintext` directly with its session (bypassing its queue).
    fn seal(&mut self, s: usize, plaintext: &[u8]) {
        let now = self.pair.now;
        let Some(session) = self.pair.c[s].session_mut() else { return };
        let hlen = session.header_len();
        let before = session.send_counter();
        let mut buf = vec![0u8; hlen + plaintext.len() + TAG_LEN];
        buf[hlen..hlen + plaintext.len()].copy_from_slice(plaintext);
        if let Ok(n) = session.seal(now, &mut buf, plaintext.len()) {
            buf.truncate(n);
            // The counter used: the next one, or the next epoch's first after a time-based
            // rekey (spec §7.1).
            let counter = session.send_counter() - 1;
            assert!(counter >= before, "{:?}: the send counter went back", self.p);
            self.check_sealed(s, &buf, counter);
            self.lanes[s].flights.push(Flight { packet: buf, plaintext: plaintext.to_vec(), counter, accepted: false });
        }
    }

    /// spec §4.2, §6.1, §16.2: a sealed packet has its mode's transport header: the low
    /// 24 bits of its counter in datagram and routed mode, the receiver's index only in
    /// datagram mode (routed packets are told apart by their route, spec §16.6).
    fn check_sealed(&self, s: usize, packet: &[u8], counter: u64) {
        let mode = self.p.mode;
        let Ok(Packet::Transport(h, _)) = wire::parse(mode, MAX_PACKET_LEN, packet) else {
            panic!("{:?}: a sealed packet does not parse as a transport packet", self.p);
        };
        // spec §4.2, §16.2: 1, 8 and 4 header bytes.
        let hlen = match mode {
            Mode::Stream => 1,
            Mode::Datagram => 8,
            Mode::Routed => 4,
        };
        let mut head = [0u8; 8];
        assert_eq!(h.encode(mode, &mut head), Ok(hlen), "{:?}: header length", self.p);
        assert_eq!(&head[..hlen], &packet[..hlen], "{:?}: the header does not re-encode to its bytes", self.p);
        let lo = u32::try_from(counter & ((1 << COUNTER_LO_BITS) - 1)).unwrap_or(0);
        assert_eq!(h.counter_lo, mode.is_lossy().then_some(lo), "{:?}: counter {counter} sealed as {h:?}", self.p);
        assert_eq!(h.receiver_index.is_some(), mode == Mode::Datagram, "{:?}: sealed {h:?}", self.p);
        if mode == Mode::Routed {
            assert_eq!(wire::routed_receiver_index(packet), None, "a routed transport packet names an index");
        }
        // A re-handshake gives the receiver a new index.
        if !self.rehandshaked {
            if let Some(i) = h.receiver_index {
                assert_eq!(i, self.pair.c[1 - s].local_index(), "{:?}: sealed for another index", self.p);
            }
        }
    }

    /// Whether the receiver of lane `s` must authenticate flight `i` now (exact model).
    fn model_accepts(&self, s: usize, i: usize) -> bool {
        let lane = &self.lanes[s];
        let f = &lane.flights[i];
        if f.accepted {
            return false;
        }
        match self.p.mode {
            // spec §6.2: counters are implicit, so only the next packet in order opens.
            Mode::Stream => f.counter == lane.expected,
            // spec §8: new, and not REPLAY_WINDOW or more below the highest.
            Mode::Datagram | Mode::Routed => {
                lane.highest.is_none_or(|h| f.counter > h || h - f.counter < REPLAY_WINDOW)
            }
        }
    }

    fn packets_opened(&self, side: usize) -> Option<u64> {
        self.pair.c[side].session().map(|s| s.stats().packets_received)
    }

    /// Delivers a packet sent by side `s`: flight `genuine`, or forged/arbitrary bytes.
    fn deliver(&mut self, s: usize, packet: &[u8], genuine: Option<usize>) {
        let r = 1 - s;
        let now = self.pair.now;
        let was_closed = self.pair.c[r].is_closed();
        let before = self.packets_opened(r);
        let result = self.pair.c[r].handle_input(now, packet);
        let mut events = Vec::new();
        self.pair.take_events(r, &mut events);
        // A Close from the peer ends the session at once, its counters with it; only an
        // authenticated packet can carry one.
        let closed_by_peer = events.iter().any(|e| matches!(e, Event::Closed(c) if c.by_peer));
        let opened = closed_by_peer || matches!((before, self.packets_opened(r)), (Some(b), Some(a)) if a > b);
        if was_closed {
            assert!(result.is_err() && events.is_empty(), "a closed connection took a packet");
            return;
        }
        let Some(i) = genuine else {
            assert!(
                !events.iter().any(|e| matches!(e, Event::Message { .. })),
                "{:?}: forged or arbitrary packet delivered data: {events:?}",
                self.p
            );
            if self.exact {
                assert!(!opened, "{:?}: a forged or arbitrary packet was authenticated", self.p);
                assert!(events.is_empty(), "{:?}: a refused packet raised {events:?}", self.p);
                assert!(!self.pair.c[r].is_closed(), "{:?}: a refused packet closed the connection", self.p);
            }
            return;
        };
        let plaintext = self.lanes[s].flights[i].plaintext.clone();
        let data = data_messages(&plaintext);
        let delivered: Vec<(u16, u64, &[u8])> = events
            .iter()
            .filter_map(|e| match e {
                Event::Message { channel, id, payload } => Some((*channel, *id, &payload[..])),
                _ => None,
            })
            .collect();
        assert!(data.starts_with(&delivered), "{:?}: delivered {delivered:?}, but the packet carried {data:?}", self.p);
        if !self.exact {
            if opened {
                self.lanes[s].flights[i].accepted = true;
            }
            return;
        }
        let model = self.model_accepts(s, i);
        assert_eq!(opened, model, "{:?}: flight {i} of side {s}: authenticated={opened}, model={model}", self.p);
        if !opened {
            assert!(events.is_empty(), "{:?}: a refused packet raised {events:?}", self.p);
            assert!(!self.pair.c[r].is_closed(), "{:?}: a refused packet closed the connection", self.p);
            return;
        }
        let counter = self.lanes[s].flights[i].counter;
        let lane = &mut self.lanes[s];
        lane.flights[i].accepted = true;
        lane.expected = counter + 1;
        lane.highest = lane.highest.max(Some(counter));
        match expected_events(&plaintext) {
            Some(expected) => {
                assert_eq!(events, expected, "{:?}: events of an authenticated packet", self.p);
                assert_eq!(result.is_ok(), message::validate(&plaintext).is_ok());
                if message::validate(&plaintext).is_err() || self.pair.c[r].is_closed() {
                    // The receiver closes (now or with its next packet).
                    self.exact = false;
                }
            }
            // A re-handshake message: what follows depends on its content.
            None => self.exact = false,
        }
    }

    /// Delivers every genuine packet still in flight, in order, then lets both sides send
    /// what they queued. In the exact model, every one must be accepted.
    fn settle(&mut self) {
        for s in 0..2 {
            for i in 0..self.lanes[s].flights.len() {
                if self.lanes[s].flights[i].accepted {
                    continue;
                }
                let packet = self.lanes[s].flights[i].packet.clone();
                self.deliver(s, &packet, Some(i));
                if self.exact {
                    assert!(
                        self.lanes[s].flights[i].accepted || self.pair.c[1 - s].is_closed(),
                        "{:?}: a genuine packet was refused after the script's packets",
                        self.p
                    );
                }
            }
        }
        self.flush();
        if self.exact {
            self.sync_model();
        }
    }

    /// Exchanges queued packets (pongs, closes, re-handshake messages).
    fn flush(&mut self) {
        let mut events = [Vec::new(), Vec::new()];
        self.pair.flush(&mut events);
        self.check_unsolicited(&events);
    }

    fn drain_unsolicited(&mut self) {
        let mut events = [Vec::new(), Vec::new()];
        for (s, out) in events.iter_mut().enumerate() {
            self.pair.take_events(s, out);
        }
        self.check_unsolicited(&events);
    }

    /// Events that no sealed packet explains: never data; in the exact model only pongs.
    fn check_unsolicited(&self, events: &[Vec<Event>; 2]) {
        for e in events.iter().flatten() {
            assert!(!matches!(e, Event::Message { .. }), "{:?}: data appeared from nowhere: {e:?}", self.p);
            if self.exact {
                assert!(matches!(e, Event::Pong { .. }), "{:?}: unexpected {e:?}", self.p);
            }
        }
    }
}

/// The length of the longest prefix of `plaintext` made of whole Data, Ping and Pong
/// messages (as received: over-long varints stay over-long).
fn plain_prefix(plaintext: &[u8]) -> usize {
    let mut rest = plaintext;
    while let Ok((m, tail)) = Message::decode(rest) {
        if !matches!(m, Message::Data { .. } | Message::Ping { .. } | Message::Pong { .. }) {
            break;
        }
        rest = tail;
    }
    plaintext.len() - rest.len()
}

/// The Data messages in a plaintext, as (channel, id, payload).
fn data_messages(plaintext: &[u8]) -> Vec<(u16, u64, &[u8])> {
    if message::validate(plaintext).is_err() {
        return Vec::new();
    }
    message::Messages::new(plaintext)
        .filter_map(|m| match m {
            Ok(Message::Data { channel, id, payload }) => Some((channel, id, payload)),
            _ => None,
        })
        .collect()
}

/// The events an authenticated plaintext raises (spec §9), or `None` if it carries a
/// re-handshake message, whose effect depends on the handshake state.
fn expected_events(plaintext: &[u8]) -> Option<Vec<Event>> {
    let mut events = Vec::new();
    if message::validate(plaintext).is_err() {
        // spec §9.1: nothing of a malformed plaintext is delivered.
        return Some(events);
    }
    for m in message::Messages::new(plaintext).flatten() {
        match m {
            Message::Data { channel, id, payload } => {
                events.push(Event::Message { channel, id, payload: Bytes::copy_from_slice(payload) });
            }
            Message::Ping { .. } => {}
            Message::Pong { id } => events.push(Event::Pong { id }),
            Message::RevocationPush { list } => {
                events.push(Event::RevocationList { list: Bytes::copy_from_slice(list) });
            }
            Message::TimeSync { unix_time } => events.push(Event::TimeSync { unix_time }),
            Message::Close { reason } => {
                events.push(Event::Closed(Closed { reason, by_peer: true, error: None }));
                break;
            }
            // spec §16.7: routing messages are reported as they are.
            Message::Forward { .. }
            | Message::Deliver { .. }
            | Message::Route { .. }
            | Message::Withdraw { .. }
            | Message::Unreachable { .. }
            | Message::Stored { .. } => {
                let buf = Bytes::copy_from_slice(plaintext);
                if let Some(r) = crate::routing::RoutingMessage::from_message(&m, &buf) {
                    events.push(Event::Routing(r));
                }
            }
            // spec §17: delivery messages are reported as they are.
            Message::Ack(_) | Message::Stream { .. } | Message::Skip { .. } => {
                if let Some(d) = crate::delivery::DeliveryMessage::from_message(&m) {
                    events.push(Event::Delivery(d));
                }
            }
            Message::Handshake { .. } => return None,
        }
    }
    Some(events)
}

// ---------------------------------------------------------------------------------------
// replay_window
// ---------------------------------------------------------------------------------------

/// The replay window against a `BTreeSet` model (spec §8), and datagram counter
/// reconstruction against the formula of spec §6.3.1.
///
/// Input: 3-byte operations `[op, lo, hi]`; `delta = u16::from_le_bytes([lo, hi])`. The low
/// three bits of `op` pick the counter relative to the highest committed one `h` (0 before
/// any): `h + delta`, `h − delta`, `h + (delta << 8)`, `u64::MAX − delta`,
/// `h − REPLAY_WINDOW + delta`, `delta << 40`, `h + 2^23 − delta`, `h − 2^23 + delta`
/// (saturating). Bit 7 set: only `check`; clear: `check` then `commit`. Bit 6 set: then
/// `compact`, which must change no answer.
pub fn replay_window(data: &[u8]) {
    let mut w = ReplayWindow::new();
    let mut seen = BTreeSet::new();
    let mut highest: Option<u64> = None;
    for chunk in data.chunks_exact(3) {
        let (op, delta) = (chunk[0], u64::from(u16::from_le_bytes([chunk[1], chunk[2]])));
        let h = highest.unwrap_or(0);
        let c = match op & 0x07 {
            0 => h.saturating_add(delta),
            1 => h.saturating_sub(delta),
            2 => h.saturating_add(delta << 8),
            3 => u64::MAX - delta,
            4 => h.saturating_sub(REPLAY_WINDOW).saturating_add(delta),
            5 => delta << 40,
            6 => h.saturating_add(1 << 23).saturating_sub(delta),
            _ => h.saturating_sub(1 << 23).saturating_add(delta),
        };
        // Too old wins over duplicate: below the window, seen and unseen look the same.
        let model = match highest {
            Some(h) if c <= h && h - c >= REPLAY_WINDOW => Err(ReplayError::TooOld),
            _ if seen.contains(&c) => Err(ReplayError::Duplicate),
            _ => Ok(()),
        };
        assert_eq!(w.check(c), model, "check({c}) with highest {highest:?}");
        check_reconstruction(c, w.expected());
        if op & 0x80 == 0 {
            assert_eq!(w.commit(c), model, "commit({c}) with highest {highest:?}");
            if model.is_ok() {
                seen.insert(c);
                highest = highest.max(Some(c));
            }
        }
        if op & 0x40 != 0 {
            w.compact();
        }
        assert_eq!(w.highest(), highest);
        assert_eq!(w.expected(), highest.map_or(0, |h| h.saturating_add(1)));
    }
}

/// spec §6.3.1: `ĉ = x + ((lo − x + 2^23) mod 2^24) − 2^23`, for the low bits of `c`.
fn check_reconstruction(c: u64, x: u64) {
    if x >= REJECT_AFTER_MESSAGES {
        // Counters never get there (spec §7.4).
        return;
    }
    let lo = c & ((1 << COUNTER_LO_BITS) - 1);
    let (x128, half, span) = (i128::from(x), 1i128 << (COUNTER_LO_BITS - 1), 1i128 << COUNTER_LO_BITS);
    let spec = x128 + (i128::from(lo) - x128 + half).rem_euclid(span) - half;
    let got = reconstruct_counter(u32::try_from(lo).unwrap_or(0), x);
    // A negative ĉ is too old; the implementation is free to return anything the window
    // or the AEAD then refuses.
    if spec >= 0 {
        assert_eq!(i128::from(got), spec, "reconstruct_counter({lo:#x}, {x})");
    }
}

// ---------------------------------------------------------------------------------------
// Seed corpus
// ---------------------------------------------------------------------------------------

/// The seed corpus of every target, built from real handshakes: `(target, file name,
/// input)`. `fuzz/corpus/<target>/` holds these (written by the ignored test
/// `write_seed_corpus`), plus whatever other sources add.
#[must_use]
pub fn seed_corpus() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    seed_decode(&mut out);
    seed_responder(&mut out);
    seed_session(&mut out);
    seed_replay_window(&mut out);
    seed_routing(&mut out);
    seed_relay(&mut out);
    out.extend(demux::seeds().into_iter().map(|(name, input)| ("demux", name.into(), input)));
    out.extend(delivery::seeds().into_iter().map(|(name, input)| ("delivery", name.into(), input)));
    out
}

fn seed_relay(out: &mut Seeds) {
    let ops = |list: &[[u8; 4]]| -> Vec<u8> { list.iter().flatten().copied().collect() };
    // Layout: `relay::RelayOp::decode`. Devices 1 and 2 on links 1 and 2 (2 over datagrams),
    // then the uplink to node 0 on link 0; traffic both ways; a re-attach; the uplink drops
    // and returns; a detach and a revocation.
    let big = 60 << 2; // max_message 300
    let session = [
        [0, 1, 1, big],
        [0, 2, 2, big | 2],
        [0, 0, 0, big | 1],
        [7, 0, 0, 0],
        [3, 1, 0, 40],
        [3, 0, 0, 56],
        [3, 0, 1, 200],
        [6, 0, 0xe8, 0x03],
        [3, 2, 0, 20],
        [0, 3, 1, big],
        [3, 1, 0, 30],
        [3, 3, 0, 30],
        [1, 0, 0, 0],
        [3, 3, 0, 30],
        [0, 4, 0, big],
        [3, 3, 0, 30],
        [1, 3, 0, 0],
        [2, 2, 0, 0],
        [7, 0, 0, 0],
    ];
    out.push(("relay", "seed-session".into(), ops(&session)));
    // Every step's drop: unknown handle, made-up handle, uplink down, table full, too large;
    // messages only relays send; congestion; time for the rate limit and repeats.
    let drops = [
        [0, 1, 1, 2],
        [3, 1, 5, 10],
        [3, 1, 0xf3, 10],
        [0, 0, 0, 1 | 2],
        [0, 2, 2, 2],
        [0, 3, 3, 2],
        [0, 4, 4, 2],
        [0, 5, 5, 2],
        [3, 5, 0, 10],
        [3, 1, 0, 200],
        [4, 1, 0, 0],
        [4, 1, 1, 0],
        [4, 0, 2, 0],
        [4, 0, 3, 0],
        [5, 1, 0, 0],
        [5, 1, 0, 0],
        [1, 0, 0, 0],
        [3, 1, 0, 10],
        [6, 0, 0x10, 0x27],
        [3, 1, 0, 10],
        [7, 0, 0, 0],
    ];
    out.push(("relay", "seed-drops".into(), ops(&drops)));
}

fn seed_routing(out: &mut Seeds) {
    let ops = |list: &[[u8; 4]]| -> Vec<u8> { list.iter().flatten().copied().collect() };
    // Fill the table, overflow it, churn, let time pass, repeat announcements, use them.
    let mut fill: Vec<[u8; 4]> = (0..10).map(|i| [0, i, 0, 0]).collect();
    fill.extend([[4, 0, 0, 0], [3, 0, 10, 0], [4, 0, 0, 0], [2, 0, 0, 0], [2, 3, 0, 0], [3, 0, 20, 0], [4, 0, 0, 0]]);
    out.push(("routing", "seed-fill-and-repeat".into(), ops(&fill)));
    let mut churn = Vec::new();
    for i in 0..12u8 {
        churn.extend([[0, i, 0, 0], [1, i, 0, 0], [5, i, 0, 0], [5, i, 0, 0]]);
    }
    churn.extend([[3, 0, 255, 255], [0, 1, 0, 0], [0, 2, 0, 0]]);
    out.push(("routing", "seed-churn".into(), ops(&churn)));
    let peer: Vec<[u8; 4]> =
        (0..12u8).map(|i| [6, i, i / 2, 0]).chain([[7, 3, 0, 0], [6, 3, 9, 0], [7, 99, 0, 0]]).collect();
    out.push(("routing", "seed-peer-routes".into(), ops(&peer)));
    // Routing messages after the operations (a multiple of 4 bytes of no-ops would do too).
    let node = crate::trust::NodeId([0xab; 16]);
    let msgs = [
        Message::Forward { route: 0, packet: &[0x10, 0, 0, 1, 0xee] },
        Message::Deliver { route: 300, packet: &[0x01; 20] },
        Message::Route { route: 2, node },
        Message::Withdraw { route: 2, reason: crate::routing::RouteReason::Detached },
        Message::Unreachable { route: 0, reason: crate::routing::RouteReason::UplinkDown },
        Message::Stored { route: 0, generation: 1, first: 7, count: 3 },
    ];
    let mut all = Vec::new();
    for m in &msgs {
        let mut buf = vec![0u8; m.encoded_len()];
        m.encode(&mut buf).unwrap();
        all.extend_from_slice(&buf);
    }
    out.push(("routing", "seed-messages".into(), all.clone()));
    out.push(("decode", "seed-routing-messages".into(), all));
}

type Seeds = Vec<(&'static str, String, Vec<u8>)>;

fn seed_decode(out: &mut Seeds) {
    // spec/vectors (gen_vectors) adds every handshake and transport packet of every pattern,
    // suite and mode; two transcripts keep this corpus useful on its own.
    let some = [
        Params { mode: Mode::Stream, pattern: Pattern::IK, suite: Suite::ChaChaPolyBlake2s },
        Params { mode: Mode::Datagram, pattern: Pattern::XXpsk3, suite: Suite::AesGcmSha256 },
    ];
    for p in some {
        let t = transcript(p);
        for (dir, packets) in [("a", &t.a_to_b), ("b", &t.b_to_a)] {
            for (i, packet) in packets.iter().enumerate() {
                out.push(("decode", format!("seed-{}-{dir}{i}", p.name()), packet.clone()));
            }
        }
    }
    let payloads = [
        HandshakePayload::default(),
        HandshakePayload { max_packet_len: Some(1_400), capabilities: 0x8000_0001, ..HandshakePayload::default() },
        HandshakePayload { certificate: Some(vec![0xce; 40]), ..HandshakePayload::default() },
    ];
    for (i, p) in payloads.iter().enumerate() {
        let mut buf = [0u8; HANDSHAKE_PAYLOAD_MAX];
        let n = p.encode(&mut buf).unwrap();
        out.push(("decode", format!("seed-payload-{i}"), buf[..n].to_vec()));
    }
    let messages = [
        Message::Data { channel: 1, id: 0, payload: b"temperature=21.5" },
        Message::Data { channel: 300, id: 1 << 40, payload: &[] },
        Message::Ping { id: 7 },
        Message::Pong { id: u32::MAX },
        Message::Close { reason: CloseReason::ProtocolViolation },
        Message::Handshake { packet: &[TYPE_HANDSHAKE_REJECT, 0x02] },
        // spec §17: delivery messages.
        Message::Ack(crate::delivery::Ack::new(3, 1_000, &[(1, 4), (2, 1)]).unwrap()),
        Message::Stream { stream: *b"stream!!" },
        Message::Skip { channel: 3, next: 1 << 33 },
        Message::Stored { route: 4, generation: 0, first: (1 << 24) - 1, count: 2 },
    ];
    let mut all = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let mut buf = vec![0u8; m.encoded_len()];
        let n = m.encode(&mut buf).unwrap();
        all.extend_from_slice(&buf[..n]);
        out.push(("decode", format!("seed-message-{i}"), buf[..n].to_vec()));
    }
    out.push(("decode", "seed-messages-all".into(), all));
    out.push(("decode", "seed-reject-stream".into(), vec![TYPE_HANDSHAKE_REJECT, 0x03]));
    out.push(("decode", "seed-reject-datagram".into(), vec![TYPE_HANDSHAKE_REJECT, 0, 0, 0, 9, 0x06]));
    let mut reply = vec![wire::TYPE_COOKIE_REPLY, 1, 2, 3, 4];
    reply.extend_from_slice(&[0xc0; wire::COOKIE_LEN]);
    out.push(("decode", "seed-cookie-reply".into(), reply));
    for p in Params::all().filter(|p| p.mode == Mode::Datagram) {
        let init = &transcript(p).a_to_b[0];
        let mut wrapped = vec![0u8; wire::INIT_COOKIE_PREFIX_LEN + init.len()];
        wire::encode_init_cookie(&[0x5a; wire::COOKIE_LEN], init, &mut wrapped).unwrap();
        out.push(("decode", format!("seed-{}-init-cookie", p.name()), wrapped));
    }
}

/// The routed-mode parameters the seed corpus covers: the default deployment (IK), the
/// three-message pattern with a psk (its FINAL is fuzzed too) and KK. The fuzzer reaches
/// the others by flipping selector bits; a unit test runs every one.
const ROUTED_SEEDS: [(Pattern, Suite); 3] = [
    (Pattern::IK, Suite::ChaChaPolyBlake2s),
    (Pattern::XXpsk3, Suite::AesGcmSha256),
    (Pattern::KK, Suite::AesGcmSha256),
];

/// Every stream and datagram combination, and the routed ones of [`ROUTED_SEEDS`].
fn seed_params() -> impl Iterator<Item = Params> {
    Params::all().filter(|p| p.mode != Mode::Routed || ROUTED_SEEDS.contains(&(p.pattern, p.suite)))
}

fn seed_responder(out: &mut Seeds) {
    for p in seed_params() {
        responder_seeds(p, out);
    }
    // INITs refused by negotiation (spec §4.3): version, pattern, suite.
    for (mode, name) in [(0u8, "stream"), (1, "datagram"), (SELECTOR_ROUTED, "routed")] {
        for (what, header) in [("version", [1u8, 2, 0x11]), ("pattern", [1, 1, 0x71]), ("suite", [1, 1, 0x13])] {
            let mut packet = header.to_vec();
            packet.extend_from_slice(&[0u8; 68]);
            let mut input = vec![mode];
            push_chunk(&mut input, &packet);
            out.push(("responder", format!("seed-unsupported-{what}-{name}"), input));
        }
    }
}

/// The [`responder`] seeds of `p`.
fn responder_seeds(p: Params, out: &mut Seeds) {
    let t = transcript(p);
    // The whole initiator side of a handshake and first message.
    let mut input = vec![p.selector()];
    for packet in &t.a_to_b {
        push_chunk(&mut input, packet);
    }
    out.push(("responder", format!("seed-{}-transcript", p.name()), input));
    if matches!(p.pattern, Pattern::XX | Pattern::XXpsk3) {
        let (init, fin) = (&t.a_to_b[0], &t.a_to_b[1]);
        let mut input = vec![p.selector() | RESPONDER_THIRD];
        push_chunk(&mut input, fin);
        out.push(("responder", format!("seed-{}-final", p.name()), input));
        // A forged FINAL, a repeated INIT (answered with RESP in datagram and routed
        // mode), FINAL.
        let mut forged = fin.clone();
        if let Some(last) = forged.last_mut() {
            *last ^= 1;
        }
        let mut input = vec![p.selector() | RESPONDER_THIRD];
        for packet in [&forged, init, fin] {
            push_chunk(&mut input, packet);
        }
        out.push(("responder", format!("seed-{}-forged-final", p.name()), input));
    }
}

/// Builds a [`session`] script.
struct Script(Vec<u8>);

impl Script {
    fn new(p: Params) -> Self {
        Self(vec![p.selector()])
    }
    fn op(&mut self, opcode: u8, from_b: bool) -> &mut Self {
        self.0.push(opcode | if from_b { op::B_TO_A } else { 0 });
        self
    }
    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    fn chunk(&mut self, b: &[u8]) -> &mut Self {
        push_chunk(&mut self.0, b);
        self
    }
}

fn seed_session(out: &mut Seeds) {
    for p in seed_params() {
        session_seeds(p, out);
    }
}

/// The [`session`] and [`session_lifetime`] seeds of `p`.
fn session_seeds(p: Params, out: &mut Seeds) {
    let mut ping_data = Vec::new();
    for m in [Message::Ping { id: 9 }, Message::Data { channel: 2, id: 5, payload: b"x" }] {
        let mut buf = vec![0u8; m.encoded_len()];
        let n = m.encode(&mut buf).unwrap();
        ping_data.extend_from_slice(&buf[..n]);
    }
    let t = transcript(p);
    // Only packets flow: the exact model holds throughout.
    let mut s = Script::new(p);
    s.op(op::SEAL_DATA, false).bytes(&[1]).chunk(b"reading 1");
    s.op(op::SEAL_DATA, false).bytes(&[1]).chunk(b"reading 2");
    s.op(op::SEAL, true).chunk(&ping_data);
    s.op(op::DELIVER, false).bytes(&[1]); // out of order
    s.op(op::DELIVER_MUTATED, false).bytes(&[0, 0, 3, 0, 0x40]);
    s.op(op::DELIVER, false).bytes(&[0]);
    s.op(op::DELIVER, false).bytes(&[0]); // replay
    s.op(op::DELIVER_MUTATED, true).bytes(&[0, 1, 20, 0, 0]);
    s.op(op::RAW, false).chunk(t.a_to_b.last().map_or(&[][..], Vec::as_slice));
    s.op(op::RAW, false).chunk(&t.a_to_b[0]); // a repeated INIT
    s.op(op::PING, true).bytes(&[4]);
    s.op(op::SETTLE, false);
    s.op(op::SEAL_DATA, true).bytes(&[1]).chunk(b"after settling");
    out.push(("session", format!("seed-{}-packets", p.name()), s.0.clone()));
    out.push(("session_lifetime", format!("seed-{}-packets", p.name()), s.0));
    // Time, timers, re-handshake and close.
    let mut s = Script::new(p);
    s.op(op::SEAL_DATA, false).bytes(&[3]).chunk(b"before");
    s.op(op::ADVANCE, false).bytes(&13_000u16.to_le_bytes()); // past REKEY_AFTER_TIME
    s.op(op::SEAL_DATA, false).bytes(&[3]).chunk(b"next epoch");
    s.op(op::DELIVER, false).bytes(&[1]);
    s.op(op::DELIVER, false).bytes(&[0]);
    s.op(op::TIMEOUT, false);
    s.op(op::REHANDSHAKE, false);
    s.op(op::SEAL_DATA, true).bytes(&[4]).chunk(b"new session");
    s.op(op::DELIVER, true).bytes(&[0]);
    s.op(op::CLOSE, true).bytes(&[5]);
    out.push(("session_lifetime", format!("seed-{}-lifetime", p.name()), s.0));
    // An authenticated plaintext that is not a valid message sequence (spec §9.1).
    let mut s = Script::new(p);
    s.op(op::SEAL, false).chunk(&[message::KIND_PING, 0x80]);
    s.op(op::DELIVER, false).bytes(&[0]);
    out.push(("session_lifetime", format!("seed-{}-malformed", p.name()), s.0));
    // The peer's authenticated Close (spec §7.6), with a reason this version does not know.
    let mut s = Script::new(p);
    s.op(op::SEAL, true).chunk(&[message::KIND_CLOSE, 0x5b]);
    s.op(op::DELIVER, true).bytes(&[0]);
    out.push(("session_lifetime", format!("seed-{}-peer-close", p.name()), s.0));
}

fn seed_replay_window(out: &mut Seeds) {
    let ops = |list: &[(u8, u16)]| -> Vec<u8> {
        list.iter().flat_map(|&(op, delta)| [op, delta.to_le_bytes()[0], delta.to_le_bytes()[1]]).collect()
    };
    let in_order: Vec<(u8, u16)> = (0..64).map(|_| (0, 1)).collect();
    out.push(("replay_window", "seed-in-order".into(), ops(&in_order)));
    out.push((
        "replay_window",
        "seed-reordered".into(),
        ops(&[(0, 5), (1, 3), (0, 9), (1, 2), (1, 2), (0, 100), (1, 6)]),
    ));
    out.push((
        "replay_window",
        "seed-window-edge".into(),
        ops(&[(0, 9000), (4, 0), (4, 1), (0x84, 0), (0, 1), (4, 1)]),
    ));
    out.push(("replay_window", "seed-jumps".into(), ops(&[(2, 40), (2, 0xffff), (1, 8191), (1, 8192), (5, 3)])));
    out.push(("replay_window", "seed-top".into(), ops(&[(3, 2), (3, 0), (3, 1), (3, 0), (1, 8193)])));
    out.push(("replay_window", "seed-reconstruction".into(), ops(&[(0, 1000), (6, 0), (7, 0), (6, 1), (7, 1)])));
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;

    #[test]
    fn every_seed_passes_its_target() {
        for (target, name, input) in seed_corpus() {
            match target {
                "decode" => decode(&input),
                "responder" => responder(&input),
                "session" => session(&input),
                "session_lifetime" => session_lifetime(&input),
                "replay_window" => replay_window(&input),
                "routing" => routing(&input),
                "relay" => relay(&input),
                "demux" => demux(&input),
                "delivery" => delivery(&input),
                t => panic!("unknown target {t} for {name}"),
            }
        }
    }

    /// A genuine FINAL altered after its encrypted `s` (which still decrypts) was dropped,
    /// but left the responder's handshake cipher re-keyed, so the genuine FINAL failed too:
    /// one injected datagram killed the handshake (snow rolls back only the hash and
    /// chaining key; `Connection::restore_responder` now rebuilds the rest).
    #[test]
    fn final_altered_after_its_static_key_does_not_break_the_handshake() {
        for (mode, pattern, suite) in [
            (Mode::Datagram, Pattern::XX, Suite::ChaChaPolyBlake2s),
            (Mode::Datagram, Pattern::XXpsk3, Suite::AesGcmSha256),
            (Mode::Routed, Pattern::XX, Suite::AesGcmSha256),
        ] {
            let p = Params { mode, pattern, suite };
            let fin = transcript(p).a_to_b[1].clone();
            // Datagram (and routed) FINAL: 5-byte header, encrypted s (48 bytes), encrypted
            // payload.
            for at in [5 + 48, fin.len() - 1] {
                let mut forged = fin.clone();
                forged[at] ^= 0x01;
                let mut input = vec![p.selector() | RESPONDER_THIRD];
                push_chunk(&mut input, &forged);
                push_chunk(&mut input, &forged);
                responder(&input);
            }
        }
    }

    #[test]
    fn selectors_round_trip() {
        for p in Params::all() {
            assert_eq!(Params::from_selector(p.selector()), p);
        }
        assert_eq!(Params::all().count(), 30);
        // Bits 5 and 7 belong to the targets; bit 6 makes any selector routed.
        for s in 0..=u8::MAX {
            let p = Params::from_selector(s);
            assert_eq!(p.mode == Mode::Routed, s & SELECTOR_ROUTED != 0);
            assert_eq!(Params::from_selector(s & !0xa0), p);
        }
    }

    /// The seed corpus holds routed-mode inputs for three combinations only: the others pass
    /// the same scripts (their oracles hold in routed mode for every pattern and suite).
    #[test]
    fn every_routed_combination_passes_the_seed_scripts() {
        let mut seeds = Vec::new();
        for p in Params::all().filter(|p| p.mode == Mode::Routed) {
            responder_seeds(p, &mut seeds);
            session_seeds(p, &mut seeds);
        }
        assert_eq!(seeds.iter().filter(|(t, _, _)| *t == "session").count(), 10);
        for (target, name, input) in seeds {
            assert!(name.ends_with("-routed") || name.contains("-routed-"), "{name}");
            assert_ne!(input[0] & SELECTOR_ROUTED, 0, "{name}");
            match target {
                "responder" => responder(&input),
                "session" => session(&input),
                _ => session_lifetime(&input),
            }
        }
    }

    /// Rewrites the `seed-*` files of `fuzz/corpus/<target>/`:
    /// `cargo test -p veil-protocol --features fuzzing --lib -- --ignored write_seed_corpus`
    #[test]
    #[ignore = "writes into fuzz/corpus"]
    fn write_seed_corpus() {
        use std::path::Path;
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
        let seeds = seed_corpus();
        let targets: BTreeSet<&str> = seeds.iter().map(|(t, _, _)| *t).collect();
        for target in targets {
            let dir = root.join(target);
            std::fs::create_dir_all(&dir).unwrap();
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("seed-")) {
                    std::fs::remove_file(path).unwrap();
                }
            }
        }
        for (target, name, input) in seeds {
            std::fs::write(root.join(target).join(name), input).unwrap();
        }
    }
}
