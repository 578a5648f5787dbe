//! Deterministic in-memory pair harness: two connections, a virtual clock, and a
//! hook on every packet in flight to drop, duplicate, reorder or tamper with it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::VecDeque;
use std::sync::Arc;

use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use veil_protocol::{
    Closed, Config, Connection, ConnectionError, Decision, Duration, Event, Mode, Pattern, Psk, PublicKey, Role,
    StaticKeypair, Suite, Timestamp,
};

/// Which way a packet travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Initiator to responder.
    AtoB,
    /// Responder to initiator.
    BtoA,
}

/// What the hook does with a packet: the packets to put in flight instead (empty drops it).
pub type Hook = Box<dyn FnMut(Dir, Vec<u8>) -> Vec<Vec<u8>>>;

pub struct Pair {
    pub a: Connection,
    pub b: Connection,
    pub now: Timestamp,
    pub rng: ChaCha20Rng,
    pub a_events: Vec<Event>,
    pub b_events: Vec<Event>,
    pub a_errors: Vec<ConnectionError>,
    pub b_errors: Vec<ConnectionError>,
    /// Packets in flight, per direction, in delivery order.
    pub to_b: VecDeque<Vec<u8>>,
    pub to_a: VecDeque<Vec<u8>>,
    pub hook: Option<Hook>,
    /// Answer authorization requests automatically with this decision.
    pub decide_a: Option<Decision>,
    pub decide_b: Option<Decision>,
    pub a_key: PublicKey,
    pub b_key: PublicKey,
    pub buf: Vec<u8>,
    /// The configurations the two sides were built with (see [`Pair::fresh_responder`]).
    pub a_config: Arc<Config>,
    pub b_config: Arc<Config>,
}

pub fn keypair(seed: u8) -> StaticKeypair {
    StaticKeypair::from_secret_bytes([seed; 32])
}

pub struct Setup {
    pub pattern: Pattern,
    pub suite: Suite,
    pub mode: Mode,
    pub a_psk: Option<[u8; 32]>,
    pub b_psk: Option<[u8; 32]>,
    /// The responder key the initiator expects (defaults to the real one).
    pub a_expects: Option<PublicKey>,
    pub seed: u64,
    pub limits: veil_protocol::Limits,
}

impl Setup {
    pub fn new(pattern: Pattern, suite: Suite, mode: Mode) -> Self {
        let psk = pattern_needs_psk(pattern).then_some([0x42; 32]);
        Self { pattern, suite, mode, a_psk: psk, b_psk: psk, a_expects: None, seed: 1, limits: Default::default() }
    }
}

pub fn pattern_needs_psk(p: Pattern) -> bool {
    matches!(p, Pattern::IKpsk2 | Pattern::XXpsk3)
}

impl Pair {
    pub fn new(pattern: Pattern, suite: Suite, mode: Mode) -> Self {
        Self::with(Setup::new(pattern, suite, mode))
    }

    pub fn with(s: Setup) -> Self {
        Self::with_configs(s, |_| {}, |_| {})
    }

    /// Like [`Pair::with`], letting the caller edit each side's configuration (accept
    /// lists, limits…) before the connections are built.
    pub fn with_configs(s: Setup, edit_a: impl FnOnce(&mut Config), edit_b: impl FnOnce(&mut Config)) -> Self {
        let mut rng = ChaCha20Rng::seed_from_u64(s.seed);
        let a_id = keypair(1);
        let b_id = keypair(2);
        let a_key = *a_id.public();
        let b_key = *b_id.public();
        let mut ca = Config::new(a_id, s.mode);
        ca.pattern = s.pattern;
        ca.suite = s.suite;
        ca.psk = s.a_psk.map(Psk::new);
        ca.limits = s.limits;
        let mut cb = Config::new(b_id, s.mode);
        cb.psk = s.b_psk.map(Psk::new);
        cb.limits = s.limits;
        edit_a(&mut ca);
        edit_b(&mut cb);
        let (ca, cb) = (Arc::new(ca), Arc::new(cb));
        let now = Timestamp::from_millis(1_000);
        let a_remote = if s.pattern.initiator_knows_responder() { Some(s.a_expects.unwrap_or(b_key)) } else { None };
        let b_remote = if s.pattern.responder_knows_initiator() { Some(a_key) } else { None };
        let a = Connection::new(Arc::clone(&ca), Role::Initiator, a_remote, now, &mut rng).unwrap();
        let b = Connection::new(Arc::clone(&cb), Role::Responder, b_remote, now, &mut rng).unwrap();
        Self {
            a,
            b,
            now,
            rng,
            a_events: Vec::new(),
            b_events: Vec::new(),
            a_errors: Vec::new(),
            b_errors: Vec::new(),
            to_b: VecDeque::new(),
            to_a: VecDeque::new(),
            hook: None,
            decide_a: Some(Decision::allow()),
            decide_b: Some(Decision::allow()),
            a_key,
            b_key,
            buf: vec![0u8; 65_535],
            a_config: ca,
            b_config: cb,
        }
    }

    /// Replaces the responder by a fresh one with the same configuration, as a datagram
    /// endpoint does for the next INIT once a broken one failed its connection (spec §10.3).
    /// Events and errors recorded so far are kept.
    pub fn fresh_responder(&mut self) {
        let pattern = self.a_config.pattern;
        let b_remote = if pattern.responder_knows_initiator() { Some(self.a_key) } else { None };
        self.b =
            Connection::new(Arc::clone(&self.b_config), Role::Responder, b_remote, self.now, &mut self.rng).unwrap();
    }

    /// Moves everything each side wants to send into flight (through the hook).
    pub fn flush(&mut self) {
        loop {
            let mut moved = false;
            while let Some(n) = self.a.poll_transmit(self.now, &mut self.buf).unwrap() {
                let p = self.buf[..n].to_vec();
                let out = match self.hook.as_mut() {
                    Some(h) => h(Dir::AtoB, p),
                    None => vec![p],
                };
                self.to_b.extend(out);
                moved = true;
            }
            while let Some(n) = self.b.poll_transmit(self.now, &mut self.buf).unwrap() {
                let p = self.buf[..n].to_vec();
                let out = match self.hook.as_mut() {
                    Some(h) => h(Dir::BtoA, p),
                    None => vec![p],
                };
                self.to_a.extend(out);
                moved = true;
            }
            if !moved {
                break;
            }
        }
    }

    /// Delivers one packet to the given side and handles its events.
    pub fn deliver_to_b(&mut self, p: &[u8]) -> Result<(), ConnectionError> {
        // B takes its packets by value (`handle_input_owned`), A by reference: every test
        // runs both entry points, which must behave alike.
        let r = self.b.handle_input_owned(self.now, bytes::BytesMut::from(p));
        if let Err(e) = &r {
            self.b_errors.push(e.clone());
        }
        self.events();
        r
    }

    pub fn deliver_to_a(&mut self, p: &[u8]) -> Result<(), ConnectionError> {
        let r = self.a.handle_input(self.now, p);
        if let Err(e) = &r {
            self.a_errors.push(e.clone());
        }
        self.events();
        r
    }

    /// Drains events, answering authorization requests as configured.
    pub fn events(&mut self) {
        while let Some(e) = self.a.poll_event() {
            if let (Event::AuthorizationRequired { .. }, Some(d)) = (&e, self.decide_a.clone()) {
                let _ = self.a.authorize(self.now, d);
            }
            self.a_events.push(e);
        }
        while let Some(e) = self.b.poll_event() {
            if let (Event::AuthorizationRequired { .. }, Some(d)) = (&e, self.decide_b.clone()) {
                let _ = self.b.authorize(self.now, d);
            }
            self.b_events.push(e);
        }
    }

    /// Exchanges packets until nothing moves (bounded).
    pub fn drive(&mut self) {
        for _ in 0..1_000 {
            self.events();
            self.flush();
            if self.to_a.is_empty() && self.to_b.is_empty() {
                self.events();
                self.flush();
                if self.to_a.is_empty() && self.to_b.is_empty() {
                    return;
                }
            }
            while let Some(p) = self.to_b.pop_front() {
                let _ = self.deliver_to_b(&p);
            }
            while let Some(p) = self.to_a.pop_front() {
                let _ = self.deliver_to_a(&p);
            }
        }
        panic!("pair did not settle in 1000 rounds");
    }

    /// Advances the virtual clock, firing timers on both sides, and drives.
    pub fn advance(&mut self, d: Duration) {
        let end = self.now + d;
        for _ in 0..100_000 {
            let next = [self.a.poll_timeout(), self.b.poll_timeout()].into_iter().flatten().min();
            match next {
                Some(t) if t <= end => {
                    self.now = t.max(self.now);
                    self.a.handle_timeout(self.now);
                    self.b.handle_timeout(self.now);
                    self.drive();
                    // A handled deadline must move on: one still due now is a busy loop.
                    for (side, c) in [("a", &self.a), ("b", &self.b)] {
                        if let Some(due) = c.poll_timeout() {
                            assert!(due > self.now, "{side}: timer still due after handle_timeout at {:?}", self.now);
                        }
                    }
                }
                _ => {
                    self.now = end;
                    self.a.handle_timeout(self.now);
                    self.b.handle_timeout(self.now);
                    self.drive();
                    return;
                }
            }
        }
        panic!("timers did not settle");
    }

    pub fn connected(&self) -> bool {
        self.a.is_connected() && self.b.is_connected()
    }

    pub fn a_messages(&self) -> Vec<(u16, u64, Vec<u8>)> {
        messages(&self.a_events)
    }

    pub fn b_messages(&self) -> Vec<(u16, u64, Vec<u8>)> {
        messages(&self.b_events)
    }
}

pub fn messages(events: &[Event]) -> Vec<(u16, u64, Vec<u8>)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Message { channel, id, payload } => Some((*channel, *id, payload.to_vec())),
            _ => None,
        })
        .collect()
}

pub fn all_combinations() -> Vec<(Pattern, Suite, Mode)> {
    let mut v = Vec::new();
    for p in Pattern::ALL {
        for s in Suite::ALL {
            for m in [Mode::Stream, Mode::Datagram] {
                v.push((p, s, m));
            }
        }
    }
    v
}

/// The `Closed` event among `events`, if any.
pub fn closed(events: &[Event]) -> Option<&Closed> {
    events.iter().find_map(|e| match e {
        Event::Closed(c) => Some(c),
        _ => None,
    })
}

/// The handshake hashes of the `Connected` events among `events`, in order.
pub fn connected_hashes(events: &[Event]) -> Vec<[u8; 32]> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Connected { handshake_hash, .. } => Some(*handshake_hash),
            _ => None,
        })
        .collect()
}

/// `p` with bit `bit` (0 = most significant bit of byte 0) inverted.
pub fn flip_bit(p: &[u8], bit: usize) -> Vec<u8> {
    let mut q = p.to_vec();
    q[bit / 8] ^= 0x80 >> (bit % 8);
    q
}
