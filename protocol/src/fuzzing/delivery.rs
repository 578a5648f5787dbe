//! Fuzz entry point of the delivery layer (spec §17): an honest [`Outbox`] and [`Inbox`] over a
//! path the fuzzer drops, duplicates and reorders, with reconnects, restarts from saved state,
//! lost inboxes, and arbitrary peer messages decoded from the input.

use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::format;
use alloc::vec::Vec;

use bytes::Bytes;

use crate::delivery::{
    Ack, DataOutcome, DeliveryConfig, DeliveryMessage, DeliveryOutput, Inbox, InboxState, Outbox, OutboxState,
    RECEIVE_WINDOW,
};
use crate::error::DeliveryError;
use crate::message::{Message, Messages};
use crate::params::Mode;
use crate::time::{Duration, Timestamp};

/// At most this many operations are read from one input.
const MAX_OPS: usize = 256;
/// Channels the honest sender uses; the receiver holds as many.
const CHANNELS: u8 = 4;
/// Largest honest payload.
const MAX_LEN: usize = 64;
/// Rounds the final healing may take.
const HEAL_ROUNDS: usize = 400;
const MODES: [Mode; 3] = [Mode::Stream, Mode::Datagram, Mode::Routed];
/// The honest sender's stream id.
const STREAM: [u8; 8] = *b"honest!!";

/// Operation codes (`op % 16`) of [`delivery`].
pub mod op {
    /// `push(a % 4, b % 65 bytes, ttl c > 200 ? (c − 200) × 100 ms)`.
    pub const PUSH: u8 = 0;
    /// Drain the outbox into packets (`a`: budget `a × 8`, 0 = unlimited).
    pub const TRANSMIT: u8 = 1;
    /// Deliver packet `a` to the receiver (front in stream mode); `b & 1`: keep a copy.
    pub const TO_RECEIVER: u8 = 2;
    /// Drop packet `a` on its way to the receiver (datagram and routed modes).
    pub const DROP_TO_RECEIVER: u8 = 3;
    /// The receiver's due acknowledgements into packets.
    pub const ACKS: u8 = 4;
    /// Deliver packet `a` to the sender; `b & 1`: keep a copy.
    pub const TO_SENDER: u8 = 5;
    /// Drop packet `a` on its way to the sender.
    pub const DROP_TO_SENDER: u8 = 6;
    /// `a & 1`: commit everything delivered; else `commit(b % 4, c)`.
    pub const COMMIT: u8 = 7;
    /// The clock moves `a × 256 + b` ms; then `expire`.
    pub const ADVANCE: u8 = 8;
    /// The clock moves to the next timeout of either side; `expire`; transmit.
    pub const TIMEOUT: u8 = 9;
    /// A new connection in mode `a % 3` (stream, datagram, routed).
    pub const RECONNECT: u8 = 10;
    /// The receiver restarts from its saved (committed) state.
    pub const RESTART_RECEIVER: u8 = 11;
    /// The sender restarts from its saved state.
    pub const RESTART_SENDER: u8 = 12;
    /// The next message of the input's message section goes to the side it is for.
    pub const INJECT: u8 = 13;
    /// `a % 3`: 0 the sender's connection ends (`on_disconnected`), 1 `on_route_back`, 2
    /// `on_custody(b % 4, c..c + 8)`.
    pub const ROUTE: u8 = 14;
    /// The receiver loses its inbox (no saved state).
    pub const LOSE_INBOX: u8 = 15;
}

type Packet = Vec<DeliveryOutput>;

struct Harness<'a> {
    config: DeliveryConfig,
    now: Timestamp,
    mode: Mode,
    out: Outbox,
    inbox: Inbox,
    to_receiver: VecDeque<Packet>,
    to_sender: VecDeque<Vec<Ack>>,
    pool: Messages<'a>,
    pushed: BTreeMap<(u16, u64), Bytes>,
    expired: BTreeSet<(u16, u64)>,
    expired_unconfirmed: BTreeSet<(u16, u64)>,
    /// The application: committed and uncommitted messages of the current epoch (the
    /// inbox's stream since it last started over), and the last id it holds per channel.
    sink: Vec<(u16, u64)>,
    pending: Vec<(u16, u64)>,
    last: BTreeMap<u16, u64>,
    /// The inbox read something the honest sender did not send, or lost its state.
    inbox_tainted: bool,
    /// The outbox read an acknowledgement the honest receiver did not send.
    outbox_tainted: bool,
    /// Largest payload the inbox was handed.
    largest: usize,
}

impl<'a> Harness<'a> {
    fn untainted(&self) -> bool {
        !self.inbox_tainted && !self.outbox_tainted
    }

    fn push(&mut self, channel: u16, len: usize, ttl: Option<Duration>) {
        let serial = self.pushed.len() as u32;
        let mut payload = serial.to_le_bytes().to_vec();
        payload.resize(len.max(4), channel as u8);
        let payload = Bytes::from(payload);
        match self.out.push(channel, payload.clone(), self.now, ttl) {
            Ok(id) => assert!(self.pushed.insert((channel, id), payload).is_none(), "id {channel}/{id} twice"),
            Err(DeliveryError::WindowFull) => {}
            Err(e) => panic!("push: {e:?}"),
        }
    }

    fn transmit(&mut self, budget: usize) {
        let mut packet = Vec::new();
        for _ in 0..4_096 {
            let Some(o) = self.out.poll_transmit(self.now, budget) else { break };
            if let DeliveryOutput::Data { id, .. } = &o {
                // spec §17.2: ids stay below the limit.
                assert!(*id < crate::delivery::ID_LIMIT);
            }
            let glued = matches!(o, DeliveryOutput::Message(_));
            packet.push(o);
            if !glued && packet.len() >= 3 {
                self.to_receiver.push_back(core::mem::take(&mut packet));
            }
        }
        if !packet.is_empty() {
            self.to_receiver.push_back(packet);
        }
    }

    fn pick<T: Clone>(queue: &mut VecDeque<T>, lossy: bool, a: u8, keep: bool) -> Option<T> {
        if queue.is_empty() {
            return None;
        }
        // Stream mode: in order, once.
        if !lossy {
            return queue.pop_front();
        }
        let i = usize::from(a) % queue.len();
        if keep {
            return queue.get(i).cloned();
        }
        queue.remove(i)
    }

    fn receive(&mut self, m: DeliveryOutput, honest: bool) {
        match m {
            DeliveryOutput::Message(DeliveryMessage::Stream { stream }) => {
                if self.inbox.on_stream(stream, self.now) {
                    self.new_epoch();
                }
            }
            DeliveryOutput::Message(DeliveryMessage::Skip { channel, next }) => {
                self.inbox.on_skip(channel, next, self.now);
            }
            DeliveryOutput::Data { channel, id, payload } => {
                self.largest = self.largest.max(payload.len());
                let r = self.inbox.on_data(channel, id, payload, self.mode, self.now);
                if honest && self.untainted() {
                    // spec §17.2, §17.4: an honest sender's Data always follows its Stream and
                    // stays in the window.
                    assert!(
                        matches!(r, Ok(DataOutcome::Delivered | DataOutcome::Buffered | DataOutcome::Duplicate))
                            || r == Ok(DataOutcome::Dropped(DeliveryError::ReceiverFull)),
                        "honest Data {channel}/{id} in {:?}: {r:?}",
                        self.mode
                    );
                }
            }
            DeliveryOutput::Message(DeliveryMessage::Ack(_)) => unreachable!("acks go to the sender"),
        }
        self.deliver();
    }

    fn new_epoch(&mut self) {
        self.sink.clear();
        self.pending.clear();
        self.last.clear();
    }

    fn deliver(&mut self) {
        while let Some((channel, id, payload)) = self.inbox.poll_deliver() {
            // Whatever the peer sent: ids of a channel strictly increase within an epoch.
            let from = self.last.get(&channel).map_or(0, |l| l + 1);
            assert!(id >= from, "{channel}/{id} delivered again or out of order (expected ≥ {from})");
            if !self.inbox_tainted {
                let sent = self.pushed.get(&(channel, id));
                assert_eq!(sent, Some(&payload), "{channel}/{id}: not what the sender pushed");
                assert!(!self.expired.contains(&(channel, id)), "{channel}/{id} expired untransmitted");
                if !self.outbox_tainted {
                    for gap in from..id {
                        let k = (channel, gap);
                        assert!(
                            self.expired.contains(&k) || self.expired_unconfirmed.contains(&k),
                            "{channel}/{gap} skipped over, not expired"
                        );
                    }
                }
            }
            self.last.insert(channel, id);
            self.pending.push((channel, id));
        }
    }

    fn acks(&mut self) {
        let mut packet = Vec::new();
        for _ in 0..4_096 {
            let Some(a) = self.inbox.poll_ack(self.now) else { break };
            packet.push(a);
        }
        if !packet.is_empty() {
            self.to_sender.push_back(packet);
        }
    }

    fn on_acks(&mut self, packet: Vec<Ack>) {
        for a in packet {
            let r = self.out.on_ack(&a, self.now);
            if self.untainted() {
                assert!(r.is_ok(), "{a:?} from the honest receiver: {r:?}");
            }
        }
    }

    fn commit_all(&mut self) {
        self.sink.append(&mut self.pending);
        self.inbox.commit_delivered(self.now);
    }

    fn expire(&mut self) {
        for e in self.out.expire(self.now) {
            assert!(self.pushed.contains_key(&(e.channel, e.id)));
            let set = if e.unconfirmed { &mut self.expired_unconfirmed } else { &mut self.expired };
            assert!(set.insert((e.channel, e.id)), "{}/{} expired twice", e.channel, e.id);
        }
    }

    fn reconnect(&mut self, mode: Mode) {
        self.to_receiver.clear();
        self.to_sender.clear();
        self.mode = mode;
        self.out.on_connected(mode, self.now);
        self.inbox.on_connected();
    }

    fn restart_receiver(&mut self) {
        self.pending.clear();
        self.last.clear();
        for &(c, id) in &self.sink {
            self.last.insert(c, id);
        }
        let saved = InboxState::from_bytes(&self.inbox.export().to_bytes()).unwrap();
        assert_eq!(saved, self.inbox.export());
        self.inbox = Inbox::from_state(self.config, &saved).unwrap();
        self.reconnect(self.mode);
    }

    fn restart_sender(&mut self) {
        let state = self.out.export(self.now);
        let saved = OutboxState::from_bytes(&state.to_bytes()).unwrap();
        assert_eq!(saved, state);
        self.out = Outbox::from_state(self.config, &saved, self.now).unwrap();
        self.reconnect(self.mode);
    }

    /// A message of the input's message section, to the side it is for.
    fn inject(&mut self) {
        let Some(Ok(m)) = self.pool.next() else { return };
        match m {
            Message::Ack(a) => {
                self.outbox_tainted = true;
                // AckBeyondSent closes the connection: a new one follows.
                if self.out.on_ack(&a, self.now).is_err() {
                    self.reconnect(self.mode);
                }
            }
            Message::Stream { stream } => {
                self.inbox_tainted |= stream != STREAM;
                self.receive(DeliveryOutput::Message(DeliveryMessage::Stream { stream }), false);
            }
            Message::Skip { channel, next } => {
                self.inbox_tainted = true;
                self.receive(DeliveryOutput::Message(DeliveryMessage::Skip { channel, next }), false);
            }
            Message::Data { channel, id, payload } => {
                self.inbox_tainted = true;
                let d = DeliveryOutput::Data { channel, id, payload: Bytes::copy_from_slice(payload) };
                if self.inbox.stream_read() || self.mode != Mode::Stream {
                    self.receive(d, false);
                }
            }
            _ => {}
        }
    }

    fn check_bounds(&self) {
        let c = &self.config;
        assert!(self.out.window_len() <= c.window_messages);
        assert!(self.out.window_bytes() <= c.window_bytes);
        assert!(self.inbox.channel_count() <= c.max_channels);
        // spec §17.5: the reorder bound, plus one message per channel always taken.
        assert!(
            self.inbox.held_bytes() <= c.reorder_bytes + c.max_channels * self.largest,
            "held {} bytes",
            self.inbox.held_bytes()
        );
        assert!(self.inbox.held_messages() as u64 <= c.max_channels as u64 * RECEIVE_WINDOW);
    }

    fn run(&mut self, op: [u8; 4]) {
        let [code, a, b, c] = op;
        let lossy = self.mode.is_lossy();
        match code % 16 {
            op::PUSH => {
                let ttl = (c > 200).then(|| Duration::from_millis(100 * u64::from(c - 200)));
                self.push(u16::from(a % CHANNELS), usize::from(b) % (MAX_LEN + 1), ttl);
            }
            op::TRANSMIT => self.transmit(if a == 0 { usize::MAX } else { usize::from(a) * 8 }),
            op::TO_RECEIVER => {
                if let Some(p) = Self::pick(&mut self.to_receiver, lossy, a, b & 1 == 1) {
                    for m in p {
                        self.receive(m, true);
                    }
                }
            }
            op::DROP_TO_RECEIVER => {
                if lossy {
                    let _ = Self::pick(&mut self.to_receiver, lossy, a, false);
                }
            }
            op::ACKS => self.acks(),
            op::TO_SENDER => {
                if let Some(p) = Self::pick(&mut self.to_sender, lossy, a, b & 1 == 1) {
                    self.on_acks(p);
                }
            }
            op::DROP_TO_SENDER => {
                if lossy {
                    let _ = Self::pick(&mut self.to_sender, lossy, a, false);
                }
            }
            op::COMMIT => {
                if a & 1 == 1 {
                    self.commit_all();
                } else {
                    // A partial commit: the sink takes what it covers.
                    let channel = u16::from(b % CHANNELS);
                    let through = u64::from(c);
                    let (done, rest): (Vec<_>, Vec<_>) =
                        self.pending.iter().partition(|(ch, id)| *ch == channel && *id <= through);
                    self.sink.extend(done);
                    self.pending = rest;
                    self.inbox.commit(channel, through, self.now);
                }
            }
            op::ADVANCE => {
                self.now = self.now + Duration::from_millis(u64::from(a) * 256 + u64::from(b));
                self.expire();
            }
            op::TIMEOUT => {
                let next = [self.out.poll_timeout(), self.inbox.poll_timeout()].into_iter().flatten().min();
                if let Some(t) = next {
                    self.now = self.now.max(t);
                }
                self.expire();
                self.transmit(usize::MAX);
            }
            op::RECONNECT => self.reconnect(MODES[usize::from(a) % 3]),
            op::RESTART_RECEIVER => self.restart_receiver(),
            op::RESTART_SENDER => self.restart_sender(),
            op::INJECT => self.inject(),
            op::ROUTE => match a % 3 {
                0 => {
                    self.out.on_disconnected();
                    self.to_receiver.clear();
                    self.to_sender.clear();
                }
                1 => self.out.on_route_back(self.now),
                _ => {
                    let first = u64::from(c);
                    let _ = self.out.on_custody(u16::from(b % CHANNELS), first..first + 8, self.now);
                }
            },
            _ => {
                // LOSE_INBOX: a restart without saved state (outside the guarantee, spec §17.7).
                self.inbox = Inbox::new(self.config).unwrap();
                self.inbox_tainted = true;
                self.new_epoch();
                self.reconnect(self.mode);
            }
        }
        self.check_bounds();
    }

    /// A perfect path until the window is empty; then every pushed message that did not
    /// expire was committed exactly once.
    fn heal(&mut self) {
        self.reconnect(self.mode);
        for _ in 0..HEAL_ROUNDS {
            self.transmit(usize::MAX);
            while let Some(p) = self.to_receiver.pop_front() {
                for m in p {
                    self.receive(m, true);
                }
            }
            self.commit_all();
            self.acks();
            while let Some(p) = self.to_sender.pop_front() {
                self.on_acks(p);
            }
            self.check_bounds();
            if self.out.window_len() == 0 {
                let sunk: BTreeSet<(u16, u64)> = self.sink.iter().copied().collect();
                assert_eq!(sunk.len(), self.sink.len(), "a message committed twice");
                for key in self.pushed.keys() {
                    let expired = self.expired.contains(key) || self.expired_unconfirmed.contains(key);
                    assert!(expired || sunk.contains(key), "{key:?} pushed, never delivered");
                }
                return;
            }
            let next = [self.out.poll_timeout(), self.inbox.poll_timeout()].into_iter().flatten().min();
            let next = next.unwrap_or_else(|| panic!("{} messages stuck without a timer", self.out.window_len()));
            self.now = self.now.max(next);
            self.expire();
        }
        panic!("{}", format!("window not empty after healing: {} messages", self.out.window_len()));
    }
}

/// The delivery layer (spec §17) under arbitrary operations and peer messages.
///
/// Input: a selector byte (`% 3`: the first connection's mode; bit 2: `reorder_bytes` 0, so
/// that only the next id of each channel is ever taken; bit 3: `ack_every` 1), an operation
/// count `n`, `n` 4-byte operations `[op, a, b, c]` ([`op`], at most 256), then a message
/// section: messages (spec §9) that [`op::INJECT`] hands, one by one, to the side they are for
/// (an `Ack` to the outbox, a `Stream`, `Skip` or Data to the inbox).
///
/// Invariants: nothing panics; the window, the receiver's channels and held bytes stay within
/// the configuration (held bytes: `reorder_bytes` plus one message per channel); ids of a
/// channel reach the application strictly increasing between two resets of the inbox,
/// whatever the peer sends; while the inbox read only the honest sender, every message it hands
/// over is what that sender pushed (never one that expired untransmitted), and while neither
/// side read forged messages, an id is skipped over only if it expired, the honest receiver's
/// acknowledgements are never refused, and the honest sender's Data is never out of window or
/// before its Stream. Then, if nothing was forged, a perfect path empties the window and every
/// pushed message that did not expire was committed exactly once.
pub fn delivery(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else { return };
    let Some((&n, rest)) = rest.split_first() else { return };
    let n = usize::from(n).min(MAX_OPS).min(rest.len() / 4);
    let (ops, messages) = rest.split_at(n * 4);
    let config = DeliveryConfig {
        window_messages: 8,
        window_bytes: 300,
        max_channels: usize::from(CHANNELS),
        reorder_bytes: if selector & 4 != 0 { 0 } else { 128 },
        ack_every: if selector & 8 != 0 { 1 } else { crate::delivery::ACK_EVERY },
        ..DeliveryConfig::default()
    };
    let now = Timestamp::from_millis(1_000);
    let mode = MODES[usize::from(selector) % 3];
    let mut out = Outbox::new(config, STREAM).unwrap();
    out.on_connected(mode, now);
    let mut h = Harness {
        config,
        now,
        mode,
        out,
        inbox: Inbox::new(config).unwrap(),
        to_receiver: VecDeque::new(),
        to_sender: VecDeque::new(),
        pool: Messages::new(messages),
        pushed: BTreeMap::new(),
        expired: BTreeSet::new(),
        expired_unconfirmed: BTreeSet::new(),
        sink: Vec::new(),
        pending: Vec::new(),
        last: BTreeMap::new(),
        inbox_tainted: false,
        outbox_tainted: false,
        largest: MAX_LEN,
    };
    for op in ops.chunks_exact(4) {
        h.run([op[0], op[1], op[2], op[3]]);
    }
    if h.untainted() {
        h.heal();
    }
}

/// Seed inputs of [`delivery`]: `(name, input)`.
pub(super) fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    use op::*;
    let input = |selector: u8, ops: &[[u8; 4]], messages: &[Message<'_>]| {
        let mut v = alloc::vec![selector, ops.len() as u8];
        v.extend(ops.iter().flatten());
        for m in messages {
            let mut buf = alloc::vec![0u8; m.encoded_len()];
            let k = m.encode(&mut buf).unwrap();
            v.extend_from_slice(&buf[..k]);
        }
        v
    };
    let exchange = [
        [PUSH, 0, 10, 0],
        [PUSH, 1, 20, 0],
        [PUSH, 0, 30, 0],
        [TRANSMIT, 0, 0, 0],
        [DROP_TO_RECEIVER, 0, 0, 0],
        [TO_RECEIVER, 1, 0, 0],
        [TO_RECEIVER, 0, 1, 0],
        [COMMIT, 1, 0, 0],
        [ADVANCE, 0, 30, 0],
        [ACKS, 0, 0, 0],
        [TO_SENDER, 0, 1, 0],
        [TO_SENDER, 0, 0, 0],
        [TIMEOUT, 0, 0, 0],
        [TO_RECEIVER, 0, 0, 0],
        [COMMIT, 1, 0, 0],
        [TIMEOUT, 0, 0, 0],
        [ACKS, 0, 0, 0],
        [TO_SENDER, 0, 0, 0],
    ];
    let restarts = [
        [PUSH, 2, 40, 0],
        [PUSH, 2, 40, 210],
        [PUSH, 3, 64, 0],
        [TRANSMIT, 0, 0, 0],
        [TO_RECEIVER, 0, 0, 0],
        [COMMIT, 0, 2, 0],
        [RESTART_RECEIVER, 0, 0, 0],
        [ADVANCE, 8, 0, 0],
        [RESTART_SENDER, 0, 0, 0],
        [TRANSMIT, 0, 0, 0],
        [TO_RECEIVER, 0, 0, 0],
        [RECONNECT, 1, 0, 0],
        [PUSH, 1, 5, 0],
        [TRANSMIT, 4, 0, 0],
        [ROUTE, 0, 0, 0],
        [RECONNECT, 2, 0, 0],
        [ROUTE, 1, 0, 0],
        [TRANSMIT, 0, 0, 0],
        [ROUTE, 2, 1, 0],
        [TIMEOUT, 0, 0, 0],
        [TRANSMIT, 0, 0, 0],
        [TO_RECEIVER, 0, 0, 0],
        [ACKS, 0, 0, 0],
        [TO_SENDER, 0, 0, 0],
    ];
    let mut full: Vec<[u8; 4]> = (0..8).map(|i| [PUSH, i % 4, 60, 0]).collect();
    full.extend([[TRANSMIT, 0, 0, 0], [TO_RECEIVER, 2, 0, 0], [TO_RECEIVER, 0, 0, 0], [TO_RECEIVER, 0, 0, 0]]);
    let forged = [
        Message::Ack(Ack::new(0, 1, &[(1, 2)]).unwrap()),
        Message::Stream { stream: *b"another!" },
        Message::Skip { channel: 1, next: 5000 },
        Message::Data { channel: 9, id: 3, payload: b"forged" },
        Message::Data { channel: 1, id: 5000, payload: b"at the skip" },
        Message::Ack(Ack::cumulative(3, 99)),
    ];
    let mut inject: Vec<[u8; 4]> = alloc::vec![[PUSH, 0, 8, 0], [TRANSMIT, 0, 0, 0], [TO_RECEIVER, 0, 0, 0]];
    inject.extend([[INJECT, 0, 0, 0]; 6]);
    inject.extend([[LOSE_INBOX, 0, 0, 0], [TRANSMIT, 0, 0, 0], [TO_RECEIVER, 0, 0, 0], [ACKS, 0, 0, 0]]);
    alloc::vec![
        ("seed-exchange-datagram", input(1, &exchange, &[])),
        ("seed-exchange-stream", input(0, &exchange, &[])),
        ("seed-restarts-routed", input(2 | 8, &restarts, &[])),
        ("seed-receiver-full", input(1 | 4, &full, &[])),
        ("seed-forged", input(1, &inject, &forged)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_run_and_exercise_the_layer() {
        for (name, input) in seeds() {
            delivery(&input);
            assert!(input.len() > 2, "{name}");
        }
    }
}
