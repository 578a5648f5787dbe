//! Delivery (spec §17) across connections: a model-checked simulation of an [`Outbox`] and an
//! [`Inbox`] over lossy, duplicating, reordering paths with reconnects and restarts of both
//! sides (a seeded property test), the layer driven through two real [`Connection`]s, and the
//! scenarios of spec §17 that involve both halves.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod util;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, RngAlgorithm, RngSeed, TestCaseError, TestRunner};
use rand::Rng;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use util::*;
use veil_protocol::delivery::{
    Ack, DataOutcome, DeliveryConfig, DeliveryMessage, DeliveryOutput, Inbox, InboxState, Outbox, OutboxState,
    ACK_DELAY, RECEIVE_WINDOW,
};
use veil_protocol::{DeliveryError, Duration, Event, Mode, Pattern, Suite, Timestamp};

const MODES: [Mode; 3] = [Mode::Stream, Mode::Datagram, Mode::Routed];

// ---------------------------------------------------------------------------------------
// Simulation
// ---------------------------------------------------------------------------------------

/// Largest payload the simulation pushes.
const MAX_LEN: usize = 64;
/// Channels the simulation uses (the receiver holds as many).
const CHANNELS: u8 = 4;

/// A small configuration, so that every bound is reached.
fn sim_config() -> DeliveryConfig {
    DeliveryConfig {
        window_messages: 24,
        window_bytes: 1_000,
        max_channels: usize::from(CHANNELS),
        reorder_bytes: 200,
        ..DeliveryConfig::default()
    }
}

#[derive(Debug, Clone)]
enum Op {
    Push { channel: u8, len: u8, ttl_100ms: Option<u8> },
    Transmit,
    ToReceiver(u8),
    ToSender(u8),
    Acks,
    Commit,
    Advance(u16),
    Timeout,
    Reconnect(u8),
    RestartReceiver,
    RestartSender,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        10 => (0..CHANNELS, 0..=MAX_LEN as u8, prop::option::weighted(0.05, 1..100u8))
            .prop_map(|(channel, len, ttl_100ms)| Op::Push { channel, len, ttl_100ms }),
        5 => Just(Op::Transmit),
        6 => (1..8u8).prop_map(Op::ToReceiver),
        4 => (1..8u8).prop_map(Op::ToSender),
        4 => Just(Op::Acks),
        2 => Just(Op::Commit),
        2 => (1..3_000u16).prop_map(Op::Advance),
        2 => Just(Op::Timeout),
        1 => (0..3u8).prop_map(Op::Reconnect),
        1 => Just(Op::RestartReceiver),
        1 => Just(Op::RestartSender),
    ]
}

/// The path's behaviour for one case (lossy modes only; stream mode loses nothing).
#[derive(Debug, Clone, Copy)]
struct PathParams {
    seed: u64,
    loss_pct: u32,
    dup_pct: u32,
    reorder: bool,
}

fn path() -> impl Strategy<Value = PathParams> {
    (any::<u64>(), 0..40u32, 0..20u32, any::<bool>()).prop_map(|(seed, loss_pct, dup_pct, reorder)| PathParams {
        seed,
        loss_pct,
        dup_pct,
        reorder,
    })
}

type Packet = Vec<DeliveryOutput>;

struct Sim {
    config: DeliveryConfig,
    now: Timestamp,
    mode: Mode,
    out: Outbox,
    inbox: Inbox,
    to_receiver: VecDeque<Packet>,
    to_sender: VecDeque<Vec<Ack>>,
    rng: ChaCha20Rng,
    path: PathParams,
    lossy_path: bool,
    /// Every message pushed, by (channel, id).
    pushed: BTreeMap<(u16, u64), Bytes>,
    expired: BTreeSet<(u16, u64)>,
    expired_unconfirmed: BTreeSet<(u16, u64)>,
    /// What the application committed (its durable sink) and what it holds uncommitted.
    sink: Vec<(u16, u64, Bytes)>,
    pending: Vec<(u16, u64, Bytes)>,
    /// The last id the application holds per channel (sink and pending).
    last: BTreeMap<u16, u64>,
    serial: u32,
}

fn fail(msg: String) -> TestCaseError {
    TestCaseError::fail(msg)
}

impl Sim {
    fn new(path: PathParams, mode: Mode) -> Self {
        let config = sim_config();
        let now = Timestamp::from_millis(1_000);
        let mut out = Outbox::new(config, path.seed.to_le_bytes()).unwrap();
        out.on_connected(mode, now);
        Self {
            config,
            now,
            mode,
            out,
            inbox: Inbox::new(config).unwrap(),
            to_receiver: VecDeque::new(),
            to_sender: VecDeque::new(),
            rng: ChaCha20Rng::seed_from_u64(path.seed),
            path,
            lossy_path: true,
            pushed: BTreeMap::new(),
            expired: BTreeSet::new(),
            expired_unconfirmed: BTreeSet::new(),
            sink: Vec::new(),
            pending: Vec::new(),
            last: BTreeMap::new(),
            serial: 0,
        }
    }

    /// Puts a packet in flight: lost or duplicated in datagram and routed modes.
    fn send<T: Clone>(rng: &mut ChaCha20Rng, lossy: bool, p: PathParams, queue: &mut VecDeque<T>, packet: T) {
        if lossy && rng.gen_range(0..100) < p.loss_pct {
            return;
        }
        if lossy && rng.gen_range(0..100) < p.dup_pct {
            queue.push_back(packet.clone());
        }
        queue.push_back(packet);
    }

    fn take<T>(rng: &mut ChaCha20Rng, reorder: bool, queue: &mut VecDeque<T>) -> Option<T> {
        if reorder && !queue.is_empty() {
            let i = rng.gen_range(0..queue.len());
            return queue.remove(i);
        }
        queue.pop_front()
    }

    fn lossy(&self) -> bool {
        self.mode.is_lossy() && self.lossy_path
    }

    fn push(&mut self, channel: u16, len: usize, ttl: Option<Duration>) {
        self.serial += 1;
        let mut payload = self.serial.to_le_bytes().to_vec();
        payload.resize(len.max(4), channel as u8);
        let payload = Bytes::from(payload);
        match self.out.push(channel, payload.clone(), self.now, ttl) {
            Ok(id) => {
                assert!(self.pushed.insert((channel, id), payload).is_none(), "id {id} of {channel} assigned twice");
            }
            Err(DeliveryError::WindowFull) => {}
            Err(e) => panic!("push: {e:?}"),
        }
    }

    /// Drains the outbox into packets: a Stream or Skip always shares a packet with what
    /// follows it (as `Connection` packs them, spec §17.2); otherwise packets end at random.
    fn transmit(&mut self) {
        let mut packet = Vec::new();
        for _ in 0..10_000 {
            let Some(o) = self.out.poll_transmit(self.now, usize::MAX) else { break };
            let glued = matches!(o, DeliveryOutput::Message(_));
            packet.push(o);
            if !glued && (packet.len() >= 6 || self.rng.gen_bool(0.5)) {
                let lossy = self.lossy();
                Self::send(&mut self.rng, lossy, self.path, &mut self.to_receiver, std::mem::take(&mut packet));
            }
        }
        if !packet.is_empty() {
            let lossy = self.lossy();
            Self::send(&mut self.rng, lossy, self.path, &mut self.to_receiver, packet);
        }
    }

    fn carry_to_receiver(&mut self, n: u8) -> Result<(), TestCaseError> {
        for _ in 0..n {
            let reorder = self.lossy() && self.path.reorder;
            let Some(packet) = Self::take(&mut self.rng, reorder, &mut self.to_receiver) else { break };
            for m in packet {
                match m {
                    DeliveryOutput::Message(DeliveryMessage::Stream { stream }) => {
                        self.inbox.on_stream(stream, self.now);
                    }
                    DeliveryOutput::Message(DeliveryMessage::Skip { channel, next }) => {
                        self.inbox.on_skip(channel, next, self.now);
                    }
                    DeliveryOutput::Data { channel, id, payload } => {
                        match self.inbox.on_data(channel, id, payload, self.mode, self.now) {
                            Ok(DataOutcome::Dropped(DeliveryError::NoStream)) => {
                                return Err(fail(format!("Data {channel}/{id} before any Stream on the connection")));
                            }
                            Ok(_) => {}
                            Err(e) => return Err(fail(format!("honest sender's Data {channel}/{id}: {e:?}"))),
                        }
                    }
                    other => return Err(fail(format!("unexpected output {other:?}"))),
                }
            }
            self.deliver()?;
        }
        Ok(())
    }

    /// The application takes what the inbox hands over, checking every rule of §17.
    fn deliver(&mut self) -> Result<(), TestCaseError> {
        while let Some((channel, id, payload)) = self.inbox.poll_deliver() {
            let Some(sent) = self.pushed.get(&(channel, id)) else {
                return Err(fail(format!("delivered {channel}/{id}, never pushed")));
            };
            prop_assert_eq!(sent, &payload, "payload of {}/{}", channel, id);
            prop_assert!(!self.expired.contains(&(channel, id)), "{}/{} expired before any transmission", channel, id);
            let from = self.last.get(&channel).map_or(0, |l| l + 1);
            prop_assert!(id >= from, "{}/{} delivered again or out of order (expected ≥ {})", channel, id, from);
            // In order: whatever lies between was dropped by its sender (expired).
            for gap in from..id {
                let k = (channel, gap);
                prop_assert!(
                    self.expired.contains(&k) || self.expired_unconfirmed.contains(&k),
                    "{}/{} skipped over, not expired",
                    channel,
                    gap
                );
            }
            self.last.insert(channel, id);
            self.pending.push((channel, id, payload));
        }
        Ok(())
    }

    fn acks(&mut self) {
        let mut packet = Vec::new();
        while let Some(a) = self.inbox.poll_ack(self.now) {
            packet.push(a);
            if packet.len() >= 3 {
                let lossy = self.lossy();
                Self::send(&mut self.rng, lossy, self.path, &mut self.to_sender, std::mem::take(&mut packet));
            }
        }
        if !packet.is_empty() {
            let lossy = self.lossy();
            Self::send(&mut self.rng, lossy, self.path, &mut self.to_sender, packet);
        }
    }

    fn carry_to_sender(&mut self, n: u8) -> Result<(), TestCaseError> {
        for _ in 0..n {
            let reorder = self.lossy() && self.path.reorder;
            let Some(packet) = Self::take(&mut self.rng, reorder, &mut self.to_sender) else { break };
            for a in packet {
                if let Err(e) = self.out.on_ack(&a, self.now) {
                    return Err(fail(format!("{a:?} from an honest receiver: {e:?}")));
                }
            }
        }
        Ok(())
    }

    fn commit(&mut self) {
        self.sink.append(&mut self.pending);
        self.inbox.commit_delivered(self.now);
    }

    fn expire(&mut self) {
        for e in self.out.expire(self.now) {
            let set = if e.unconfirmed { &mut self.expired_unconfirmed } else { &mut self.expired };
            set.insert((e.channel, e.id));
        }
    }

    fn timeout(&mut self) {
        let next = [self.out.poll_timeout(), self.inbox.poll_timeout()].into_iter().flatten().min();
        self.now = next.map_or(self.now + ACK_DELAY, |t| t.max(self.now));
        self.expire();
    }

    fn reconnect(&mut self, mode: Mode) {
        // The old connection's packets are gone with it.
        self.to_receiver.clear();
        self.to_sender.clear();
        self.mode = mode;
        self.out.on_connected(mode, self.now);
        self.inbox.on_connected();
    }

    fn restart_receiver(&mut self) {
        // The application loses what it had not committed; the inbox comes back from the
        // state saved with its sink (spec §17.7).
        self.pending.clear();
        self.last.clear();
        for (c, id, _) in &self.sink {
            self.last.insert(*c, *id);
        }
        let saved = self.inbox.export().to_bytes();
        self.inbox = Inbox::from_state(self.config, &InboxState::from_bytes(&saved).unwrap()).unwrap();
        self.reconnect(self.mode);
    }

    fn restart_sender(&mut self) {
        let saved = self.out.export(self.now).to_bytes();
        self.out = Outbox::from_state(self.config, &OutboxState::from_bytes(&saved).unwrap(), self.now).unwrap();
        self.reconnect(self.mode);
    }

    fn check_bounds(&self) -> Result<(), TestCaseError> {
        let c = &self.config;
        prop_assert!(self.out.window_len() <= c.window_messages);
        prop_assert!(self.out.window_bytes() <= c.window_bytes);
        prop_assert!(self.inbox.channel_count() <= c.max_channels);
        // spec §17.5: the buffer bound, plus the next id of each channel, always taken.
        prop_assert!(
            self.inbox.held_bytes() <= c.reorder_bytes + c.max_channels * MAX_LEN,
            "held {}",
            self.inbox.held_bytes()
        );
        prop_assert!(self.inbox.held_messages() as u64 <= c.max_channels as u64 * RECEIVE_WINDOW);
        Ok(())
    }

    fn run(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Push { channel, len, ttl_100ms } => {
                self.push(
                    u16::from(channel),
                    usize::from(len),
                    ttl_100ms.map(|t| Duration::from_millis(100 * u64::from(t))),
                );
            }
            Op::Transmit => self.transmit(),
            Op::ToReceiver(n) => self.carry_to_receiver(n)?,
            Op::ToSender(n) => self.carry_to_sender(n)?,
            Op::Acks => self.acks(),
            Op::Commit => self.commit(),
            Op::Advance(ms) => {
                self.now = self.now + Duration::from_millis(u64::from(ms));
                self.expire();
            }
            Op::Timeout => {
                self.timeout();
                self.transmit();
            }
            Op::Reconnect(m) => self.reconnect(MODES[usize::from(m) % 3]),
            Op::RestartReceiver => self.restart_receiver(),
            Op::RestartSender => self.restart_sender(),
        }
        self.check_bounds()
    }

    /// The path heals: nothing is lost any more; run until the window is empty.
    fn heal(&mut self) -> Result<(), TestCaseError> {
        self.lossy_path = false;
        for _ in 0..2_000 {
            self.transmit();
            self.carry_to_receiver(u8::MAX)?;
            self.commit();
            self.acks();
            self.carry_to_sender(u8::MAX)?;
            self.check_bounds()?;
            if self.out.window_len() == 0 && self.to_receiver.is_empty() && self.to_sender.is_empty() {
                return Ok(());
            }
            if self.to_receiver.is_empty() && self.to_sender.is_empty() {
                self.timeout();
            }
        }
        Err(fail(format!("window not empty after healing: {} messages", self.out.window_len())))
    }

    fn check_complete(&self) -> Result<(), TestCaseError> {
        let sunk: BTreeSet<(u16, u64)> = self.sink.iter().map(|(c, id, _)| (*c, *id)).collect();
        prop_assert_eq!(sunk.len(), self.sink.len(), "a message committed twice");
        for key in self.pushed.keys() {
            if self.expired_unconfirmed.contains(key) {
                continue;
            }
            if self.expired.contains(key) {
                prop_assert!(!sunk.contains(key), "{:?} expired untransmitted, yet delivered", key);
            } else {
                prop_assert!(sunk.contains(key), "{:?} pushed, never delivered", key);
            }
        }
        Ok(())
    }
}

#[test]
fn every_pushed_message_is_delivered_once_in_order_over_any_path() {
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        rng_algorithm: RngAlgorithm::ChaCha,
        rng_seed: RngSeed::Fixed(0x17),
        max_shrink_iters: 2_000,
        ..ProptestConfig::default()
    });
    let strategy = (path(), 0..3usize, prop::collection::vec(op(), 1..400));
    let result = runner.run(&strategy, |(p, mode, ops)| {
        let mut sim = Sim::new(p, MODES[mode]);
        for op in &ops {
            sim.run(op)?;
        }
        sim.heal()?;
        sim.check_complete()
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

// ---------------------------------------------------------------------------------------
// Scenarios of spec §17 across both halves
// ---------------------------------------------------------------------------------------

const T0: Timestamp = Timestamp::from_millis(1_000);

/// Hands everything the outbox emits to the inbox (a perfect path) and returns what the
/// application gets.
fn exchange(out: &mut Outbox, inbox: &mut Inbox, mode: Mode, now: Timestamp) -> Vec<(u16, u64)> {
    let mut got = Vec::new();
    for _ in 0..10_000 {
        let Some(o) = out.poll_transmit(now, usize::MAX) else { break };
        match o {
            DeliveryOutput::Message(DeliveryMessage::Stream { stream }) => {
                inbox.on_stream(stream, now);
            }
            DeliveryOutput::Message(DeliveryMessage::Skip { channel, next }) => {
                inbox.on_skip(channel, next, now);
            }
            DeliveryOutput::Data { channel, id, payload } => {
                inbox.on_data(channel, id, payload, mode, now).unwrap();
            }
            other => panic!("{other:?}"),
        }
        got.extend(std::iter::from_fn(|| inbox.poll_deliver()).map(|(c, id, _)| (c, id)));
    }
    inbox.commit_delivered(now);
    let later = now + ACK_DELAY;
    while let Some(a) = inbox.poll_ack(later) {
        out.on_ack(&a, later).unwrap();
    }
    got
}

#[test]
fn a_receiver_that_lost_its_inbox_catches_up_by_skip() {
    for mode in MODES {
        let config = DeliveryConfig::default();
        let mut out = Outbox::new(config, [1; 8]).unwrap();
        let mut inbox = Inbox::new(config).unwrap();
        out.on_connected(mode, T0);
        let mut pushed = 0;
        for _ in 0..10_000 {
            if pushed == 3000 {
                break;
            }
            if out.push(0, Bytes::from_static(b"old"), T0, None).is_ok() {
                pushed += 1;
            } else {
                assert!(!exchange(&mut out, &mut inbox, mode, T0).is_empty());
            }
        }
        exchange(&mut out, &mut inbox, mode, T0);
        assert_eq!(out.window_len(), 0);
        // Power loss without saved state: the new inbox knows nothing of the stream.
        let mut inbox = Inbox::new(config).unwrap();
        out.push(0, Bytes::from_static(b"new"), T0, None).unwrap();
        out.on_connected(mode, T0);
        // Without the Skip, id 3000 would be far beyond the new inbox's window (spec §17.2).
        let got = exchange(&mut out, &mut inbox, mode, T0);
        assert_eq!(got, [(0, 3000)], "{mode:?}");
        assert_eq!((out.window_len(), inbox.next(0), inbox.committed(0)), (0, 3001, 3001));
    }
}

#[test]
fn a_sender_that_restarted_without_state_resets_the_inbox() {
    let config = DeliveryConfig::default();
    let mut out = Outbox::new(config, [1; 8]).unwrap();
    let mut inbox = Inbox::new(config).unwrap();
    out.on_connected(Mode::Stream, T0);
    for _ in 0..5 {
        out.push(3, Bytes::from_static(b"a"), T0, None).unwrap();
    }
    assert_eq!(exchange(&mut out, &mut inbox, Mode::Stream, T0).len(), 5);
    // A new stream starts at 0 again: delivered, not taken for duplicates.
    let mut out = Outbox::new(config, [2; 8]).unwrap();
    out.on_connected(Mode::Stream, T0);
    out.push(3, Bytes::from_static(b"b"), T0, None).unwrap();
    assert_eq!(exchange(&mut out, &mut inbox, Mode::Stream, T0), [(3, 0)]);
    assert_eq!(inbox.stats().stream_resets, 1);
}

#[test]
fn a_full_receiver_drops_and_the_retransmission_gets_in() {
    for mode in MODES {
        let config = DeliveryConfig { reorder_bytes: 20, ..DeliveryConfig::default() };
        let mut out = Outbox::new(config, [1; 8]).unwrap();
        let mut inbox = Inbox::new(config).unwrap();
        out.on_connected(mode, T0);
        for _ in 0..4 {
            out.push(0, Bytes::from_static(b"0123456789"), T0, None).unwrap();
        }
        // The inbox always takes id 0 (the next one) and holds 1 (20 bytes held, the bound); 2
        // and 3 exceed it while the application has not drained.
        let mut outcomes = Vec::new();
        while let Some(o) = out.poll_transmit(T0, usize::MAX) {
            match o {
                DeliveryOutput::Message(DeliveryMessage::Stream { stream }) => {
                    inbox.on_stream(stream, T0);
                }
                DeliveryOutput::Data { channel, id, payload } => {
                    outcomes.push(inbox.on_data(channel, id, payload, mode, T0).unwrap());
                }
                other => panic!("{other:?}"),
            }
        }
        let full = DataOutcome::Dropped(DeliveryError::ReceiverFull);
        assert_eq!(outcomes, [DataOutcome::Delivered, DataOutcome::Delivered, full, full], "{mode:?}");
        assert_eq!(std::iter::from_fn(|| inbox.poll_deliver()).count(), 2);
        inbox.commit_delivered(T0);
        let later = T0 + ACK_DELAY;
        while let Some(a) = inbox.poll_ack(later) {
            out.on_ack(&a, later).unwrap();
        }
        assert_eq!(out.window_len(), 2, "2 and 3 were not acknowledged");
        // Nothing is lost: they go again at their timeout.
        let at = out.poll_timeout().unwrap();
        assert_eq!(exchange(&mut out, &mut inbox, mode, at), [(0, 2), (0, 3)]);
        assert_eq!(out.window_len(), 0);
    }
}

#[test]
fn expiry_reaches_the_receiver_as_a_skip() {
    for mode in MODES {
        let config = DeliveryConfig::default();
        let mut out = Outbox::new(config, [1; 8]).unwrap();
        let mut inbox = Inbox::new(config).unwrap();
        // A command for an offline device: ids 0–1 expire before any connection, 2 does not.
        out.push(9, Bytes::from_static(b"a"), T0, Some(Duration::from_secs(30))).unwrap();
        out.push(9, Bytes::from_static(b"b"), T0, Some(Duration::from_secs(30))).unwrap();
        out.push(9, Bytes::from_static(b"c"), T0, None).unwrap();
        let late = T0 + Duration::from_secs(31);
        let expired = out.expire(late);
        assert_eq!(expired.iter().map(|e| (e.id, e.unconfirmed)).collect::<Vec<_>>(), [(0, false), (1, false)]);
        out.on_connected(mode, late);
        assert_eq!(exchange(&mut out, &mut inbox, mode, late), [(9, 2)], "{mode:?}");
        assert_eq!(out.window_len(), 0);
    }
}

// ---------------------------------------------------------------------------------------
// Through real connections
// ---------------------------------------------------------------------------------------

/// One endpoint pair's delivery state: A sends with an outbox, B receives with an inbox.
struct Ends {
    out: Outbox,
    inbox: Inbox,
    /// What B's application committed, in order.
    sink: Vec<(u16, u64, Bytes)>,
    mode: Mode,
}

impl Ends {
    /// Moves everything between the delivery layer and the connections once; whether
    /// anything moved.
    fn step(&mut self, pair: &mut Pair) -> bool {
        let mut moved = false;
        let now = pair.now;
        if pair.connected() {
            let room = pair.a_config.limits.send_queue_bytes.saturating_sub(pair.a.queued_bytes());
            while let Some(o) = self.out.poll_transmit(now, room.min(pair.a.max_message_payload())) {
                match o {
                    DeliveryOutput::Message(m) => pair.a.send_delivery(m).unwrap(),
                    DeliveryOutput::Data { channel, id, payload } => pair.a.send_data(channel, id, payload).unwrap(),
                }
                moved = true;
            }
        }
        for e in std::mem::take(&mut pair.b_events) {
            match e {
                Event::Delivery(DeliveryMessage::Stream { stream }) => {
                    self.inbox.on_stream(stream, now);
                }
                Event::Delivery(DeliveryMessage::Skip { channel, next }) => {
                    self.inbox.on_skip(channel, next, now);
                }
                Event::Message { channel, id, payload } => {
                    let r = self.inbox.on_data(channel, id, payload, self.mode, now);
                    assert!(
                        matches!(r, Ok(DataOutcome::Delivered | DataOutcome::Buffered | DataOutcome::Duplicate)),
                        "{r:?}"
                    );
                }
                _ => {}
            }
            moved = true;
        }
        while let Some(d) = self.inbox.poll_deliver() {
            self.sink.push(d);
        }
        self.inbox.commit_delivered(now);
        if pair.connected() {
            while let Some(a) = self.inbox.poll_ack(now) {
                pair.b.send_delivery(DeliveryMessage::Ack(a)).unwrap();
                moved = true;
            }
        }
        for e in std::mem::take(&mut pair.a_events) {
            if let Event::Delivery(DeliveryMessage::Ack(a)) = e {
                self.out.on_ack(&a, now).unwrap();
                moved = true;
            }
        }
        moved
    }

    /// Runs `pair` until the outbox is empty (bounded), firing every timer.
    fn run(&mut self, pair: &mut Pair) {
        for _ in 0..5_000 {
            pair.drive();
            while self.step(pair) {
                pair.drive();
            }
            if self.out.window_len() == 0 {
                return;
            }
            let next =
                [self.out.poll_timeout(), self.inbox.poll_timeout(), pair.a.poll_timeout(), pair.b.poll_timeout()]
                    .into_iter()
                    .flatten()
                    .min()
                    .unwrap_or(pair.now + ACK_DELAY);
            let d = next.saturating_since(pair.now).max(Duration::from_millis(1));
            pair.advance(d);
        }
        panic!("{} messages never acknowledged", self.out.window_len());
    }
}

#[test]
fn delivery_through_connections_survives_loss_and_a_new_connection() {
    let config = DeliveryConfig::default();
    let mut ends = Ends {
        out: Outbox::new(config, [0xd0; 8]).unwrap(),
        inbox: Inbox::new(config).unwrap(),
        sink: Vec::new(),
        mode: Mode::Datagram,
    };
    let mut pair = Pair::new(Pattern::IK, Suite::ChaChaPolyBlake2s, Mode::Datagram);
    pair.drive();
    assert!(pair.connected());
    // A seeded path that loses a third of the transport packets and duplicates some.
    let mut rng = ChaCha20Rng::seed_from_u64(9);
    pair.hook = Some(Box::new(move |_, p| match rng.gen_range(0..10) {
        0..=2 => vec![],
        3 => vec![p.clone(), p],
        _ => vec![p],
    }));
    ends.out.on_connected(Mode::Datagram, pair.now);
    ends.inbox.on_connected();
    let mut expected = Vec::new();
    for i in 0..120u32 {
        let channel = (i % 3) as u16;
        let payload = Bytes::from(format!("reading {i}"));
        let id = ends.out.push(channel, payload.clone(), pair.now, None).unwrap();
        expected.push((channel, id, payload));
    }
    ends.run(&mut pair);
    // The connection goes; a new one (stream mode this time) continues with the same state.
    let mut pair = Pair::new(Pattern::IK, Suite::ChaChaPolyBlake2s, Mode::Stream);
    pair.drive();
    ends.mode = Mode::Stream;
    ends.out.on_connected(Mode::Stream, pair.now);
    ends.inbox.on_connected();
    for i in 120..150u32 {
        let payload = Bytes::from(format!("reading {i}"));
        let id = ends.out.push(7, payload.clone(), pair.now, None).unwrap();
        expected.push((7, id, payload));
    }
    ends.run(&mut pair);
    let mut per_channel: BTreeMap<u16, Vec<(u16, u64, Bytes)>> = BTreeMap::new();
    for m in expected {
        per_channel.entry(m.0).or_default().push(m);
    }
    let mut got: BTreeMap<u16, Vec<(u16, u64, Bytes)>> = BTreeMap::new();
    for m in ends.sink {
        got.entry(m.0).or_default().push(m);
    }
    assert_eq!(got, per_channel, "every message once, in order per channel");
    assert!(ends.out.stats().retransmitted > 0, "the lossy path made retransmissions");
}

#[test]
fn a_stream_shares_its_packet_with_the_data_after_it() {
    for mode in [Mode::Stream, Mode::Datagram] {
        let mut pair = Pair::new(Pattern::IK, Suite::ChaChaPolyBlake2s, mode);
        pair.drive();
        assert!(pair.connected());
        pair.b_events.clear();
        // Fill the first packet up to 12 bytes short of full: room for the Stream (9 bytes) but
        // not for it and the 14-byte Data after it.
        let room = pair.a.max_message_payload() + 17;
        let mut len = room - 12 - 6;
        let data_len = |len: usize| {
            veil_protocol::message::Message::Data { channel: 0, id: 0, payload: &vec![0; len] }.encoded_len()
        };
        while data_len(len) < room - 12 {
            len += 1;
        }
        pair.a.send_data(0, 0, Bytes::from(vec![0u8; len])).unwrap();
        pair.a.send_delivery(DeliveryMessage::Stream { stream: [5; 8] }).unwrap();
        pair.a.send_data(0, 1, Bytes::from_static(b"0123456789")).unwrap();
        let mut per_packet = Vec::new();
        while let Some(n) = pair.a.poll_transmit(pair.now, &mut pair.buf).unwrap() {
            let p = pair.buf[..n].to_vec();
            pair.deliver_to_b(&p).unwrap();
            per_packet.push(std::mem::take(&mut pair.b_events));
        }
        assert_eq!(per_packet.len(), 2, "{mode:?}");
        assert!(matches!(per_packet[0][..], [Event::Message { id: 0, .. }]), "{:?}", per_packet[0]);
        assert!(
            matches!(
                per_packet[1][..],
                [Event::Delivery(DeliveryMessage::Stream { .. }), Event::Message { id: 1, .. }]
            ),
            "{:?}",
            per_packet[1]
        );
        // Acks leave ahead of queued data.
        pair.a.send_data(0, 2, Bytes::from_static(b"x")).unwrap();
        pair.a.send_delivery(DeliveryMessage::Ack(Ack::new(4, 10, &[(1, 2)]).unwrap())).unwrap();
        pair.drive();
        let ack = Ack::new(4, 10, &[(1, 2)]).unwrap();
        assert!(
            matches!(pair.b_events[..], [Event::Delivery(DeliveryMessage::Ack(a)), Event::Message { id: 2, .. }] if a == ack)
        );
    }
}
