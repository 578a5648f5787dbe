//! Fuzz entry point of the end-to-end demultiplexer (spec §16.6): a cloud's [`E2eDemux`] fed
//! routed packets from a few node ids, as a relay that drops, repeats, reorders, mislabels and
//! forges them would hand them over, while genuine routed-mode initiators (devices) follow the
//! protocol on the other side.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::sync::Arc;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;

use bytes::{Bytes, BytesMut};
use rand_core::SeedableRng;

use super::{Input, PSK, T0};
use crate::config::Config;
use crate::connection::{Connection, ConnectionStats, Decision, Event};
use crate::crypto::{Psk, PublicKey, StaticKeypair};
use crate::params::{Mode, Pattern, Suite};
use crate::routing::{DemuxError, DemuxLimits, E2eDemux, RoutedEvent, Slot};
use crate::session::Role;
use crate::time::{Duration, Timestamp};
use crate::trust::NodeId;
use crate::wire::{self, Packet, MAX_PACKET_LEN, TYPE_HANDSHAKE_INIT};

/// Devices with a static key; their node ids are labels `0..DEVICES`.
const DEVICES: usize = 3;
/// Labels a packet can arrive under: the devices' node ids and one node nobody holds a key of.
const LABELS: usize = DEVICES + 1;
/// Small bounds, so that every limit is reached. `MAX_PEERS` exceeds the number of keyless
/// labels, so a full table always holds a device.
const MAX_PEERS: usize = 3;
const INIT_BURST: u32 = 2;
const INIT_INTERVAL: Duration = Duration::from_secs(1);
/// At most this many operations are read from one input.
const MAX_OPS: usize = 48;
/// Packets kept in flight per direction (the oldest go first).
const MAX_FLIGHTS: usize = 32;
/// Rounds of a lossless exchange ([`op::PUMP`]) before it gives up.
const PUMP_ROUNDS: usize = 16;
/// Events drained from one node at a time before the harness calls it endless.
const MAX_EVENTS: usize = 256;
/// Static secret keys: the cloud's is `[CLOUD_SEED; 32]`, device `i`'s `[DEVICE_SEED + i; 32]`.
const CLOUD_SEED: u8 = 0x30;
const DEVICE_SEED: u8 = 0x31;
/// The patterns a device picks from (KK needs a responder that knows the initiator's key in
/// advance, which a demultiplexer keyed by node id does not).
const DEVICE_PATTERNS: [Pattern; 4] = [Pattern::IK, Pattern::XX, Pattern::IKpsk2, Pattern::XXpsk3];

/// Operation codes of [`demux`](super::demux): an opcode byte (modulo 11) and its arguments. A
/// *label* byte names one of four node ids (modulo 4): devices 0–2 and a node without a key.
/// An *index* byte names a packet in flight: below `0x80` counted from the oldest, else
/// `index & 0x7f` counted from the newest (both modulo the packets in flight).
pub mod op {
    /// `device, config`: the device (modulo 3) restarts: a new routed initiator, pattern
    /// IK/XX/IKpsk2/XXpsk3 by `config & 3`, suite by bit 2; its INIT goes in flight.
    pub const START: u8 = 0;
    /// `index, label`: delivers device packet `index` to the cloud under its device's node
    /// id (`label < 0x80`) or under label `label & 0x7f` (which may be another node's: the
    /// relay lies).
    pub const DELIVER_UP: u8 = 1;
    /// `index, kind, position: u16, value`: delivers a modified copy of a device packet under
    /// its device's node id (kind 0: xor a byte, 1: truncate, 2: append a byte).
    pub const MUTATE_UP: u8 = 2;
    /// `label, chunk`: arbitrary bytes under `label`.
    pub const GARBAGE: u8 = 3;
    /// `label, decision`: drains the node's events; an authorization request is allowed
    /// (`decision % 3 == 0`), denied (1) or left for [`AUTHORIZE`] (2).
    pub const EVENTS: u8 = 4;
    /// `label, flags`: `authorize` on the node's candidate (bit 0 clear) or current
    /// connection, allow (bit 1 clear) or deny, whether or not anything asked for it.
    pub const AUTHORIZE: u8 = 5;
    /// `label`: the cloud's packets to the node go in flight.
    pub const TRANSMIT: u8 = 6;
    /// `index, target`: delivers cloud packet `index` to the device of its node
    /// (`target < 0x80`) or to device `target & 0x7f` (the relay misroutes).
    pub const DELIVER_DOWN: u8 = 7;
    /// `u16`: the clock advances by that many times 10 ms; every timer runs.
    pub const ADVANCE: u8 = 8;
    /// `who`: bit 0 clear: device `who >> 1` sends a data message; set: the cloud sends one
    /// to label `who >> 1` on its current connection.
    pub const SEND: u8 = 9;
    /// A lossless exchange between the cloud and every device, authorizations allowed.
    pub const PUMP: u8 = 10;
    pub(super) const COUNT: u8 = 11;
}

std::thread_local! {
    static CONFIGS: RefCell<BTreeMap<u8, Arc<Config>>> = const { RefCell::new(BTreeMap::new()) };
}

/// Configuration `key` (0: the cloud; else device `(key - 1) % 8`, pattern and suite from
/// `(key - 1) / 8`), built once per thread.
fn config_for(key: u8) -> Arc<Config> {
    CONFIGS.with(|c| {
        let mut map = c.borrow_mut();
        if let Some(cfg) = map.get(&key) {
            return Arc::clone(cfg);
        }
        let cfg = if key == 0 {
            let mut cfg = Config::new(StaticKeypair::from_secret_bytes([CLOUD_SEED; 32]), Mode::Routed);
            cfg.psk = Some(Psk::new(PSK));
            cfg
        } else {
            let (dev, kind) = ((key - 1) % 8, (key - 1) / 8);
            let mut cfg = Config::new(StaticKeypair::from_secret_bytes([DEVICE_SEED + dev; 32]), Mode::Routed);
            cfg.pattern = DEVICE_PATTERNS[usize::from(kind & 3)];
            cfg.suite = Suite::ALL[usize::from(kind >> 2) % Suite::ALL.len()];
            cfg.psk = Some(Psk::new(PSK));
            cfg
        };
        let cfg = Arc::new(cfg);
        map.insert(key, Arc::clone(&cfg));
        cfg
    })
}

fn cloud_config() -> Arc<Config> {
    config_for(0)
}

fn device_config(dev: usize, kind: u8) -> Arc<Config> {
    let dev = u8::try_from(dev).unwrap_or(0);
    config_for(1 + dev + 8 * (kind & 7))
}

fn cloud_key() -> PublicKey {
    *cloud_config().public_key()
}

/// The node id of `label`: device `label`'s, or (label 3) one nobody holds a key of.
fn label_node(label: usize) -> NodeId {
    if label < DEVICES {
        NodeId::from_public_key(device_config(label, 0).public_key())
    } else {
        NodeId([0xee; 16])
    }
}

/// What can be seen of a connection from outside; refused packets must not change it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Snap {
    index: u32,
    connected: bool,
    closed: bool,
    /// `packets_dropped` zeroed: counting a refused packet is all it may do.
    stats: ConnectionStats,
    timeout: Option<Timestamp>,
}

impl Snap {
    fn of(c: &Connection) -> Self {
        let stats = ConnectionStats { packets_dropped: 0, ..c.stats() };
        Self {
            index: c.local_index(),
            connected: c.is_connected(),
            closed: c.is_closed(),
            stats,
            timeout: c.poll_timeout(),
        }
    }
}

type Snapshot = BTreeMap<NodeId, [Option<Snap>; 2]>;

/// A packet in flight: from device `end` (up) or to label `end` (down).
struct Flight {
    end: usize,
    packet: Vec<u8>,
    /// Delivered at least once (a lossless exchange delivers only the others).
    delivered: bool,
}

/// The packet in flight an index byte names (see [`op`]); `len > 0`.
fn pick(index: u8, len: usize) -> usize {
    let i = usize::from(index & 0x7f) % len;
    if index < 0x80 {
        i
    } else {
        len - 1 - i
    }
}

fn push_flight(list: &mut Vec<Flight>, end: usize, packet: Vec<u8>) {
    if list.len() >= MAX_FLIGHTS {
        list.remove(0);
    }
    list.push(Flight { end, packet, delivered: false });
}

struct Harness {
    now: Timestamp,
    rng: rand_chacha::ChaCha20Rng,
    demux: E2eDemux,
    /// Each device's current instance.
    devices: [Option<Connection>; DEVICES],
    up: Vec<Flight>,
    down: Vec<Flight>,
    /// Data payloads sent by each device (to the device sending) and by the cloud (to the
    /// label it sent to).
    sent_up: BTreeMap<Vec<u8>, usize>,
    sent_down: BTreeMap<Vec<u8>, usize>,
    /// Payloads delivered so far, at either end.
    delivered: BTreeSet<Vec<u8>>,
    /// Cloud connections seen Connected: (label, local index).
    connected: BTreeSet<(usize, u32)>,
    /// When each label's INITs made a new candidate (the allowance's model).
    inits: [Vec<Timestamp>; LABELS],
    seq: u16,
    buf: Vec<u8>,
}

/// spec §16.6: drives an [`E2eDemux`] (a cloud accepting routed sessions; at most 3 nodes, 2
/// new handshakes per node at once, refilled one a second) with operations (see [`op`]),
/// then checks that a genuine device can still connect and exchange data.
///
/// Invariants: no panic; at most `max_peers` nodes; an authorization request, a `Connected`
/// and data reach the application only for a key whose node id is the node's (a relay that
/// labels a device's packets with another node's id gets `NodeMismatch`, then the
/// connection's `Closed`); data only from a connection that was seen Connected, only what the
/// node's device sent, at most once (likewise for data the cloud sends); a packet the demux
/// refuses changes nothing observable (a refused INIT may add its node without connections,
/// or evict one node without connections to make room); a forged non-INIT packet is always
/// refused; the application's answer reaches only a request the demux checked and passed on
/// (late, early and blind answers included); the cloud sends only RESP, REJECT and transport
/// packets in routed layouts; new candidates per node never exceed the allowance (at most
/// `burst + ⌊t / interval⌋` in any time `t`), an INIT from a node that made no candidate for
/// `burst × interval` is never `InitLimited`, and `TooManyPeers` only comes while every held
/// node has a connection or made a candidate within that time. At the end, after the
/// allowance refilled, a genuine IK device that follows the protocol losslessly connects and
/// a message passes each way.
pub fn demux(data: &[u8]) {
    let mut input = Input(data);
    let mut h = Harness::new();
    for _ in 0..MAX_OPS {
        let Some(opcode) = input.byte() else { break };
        h.step(opcode, &mut input);
        assert!(h.demux.len() <= MAX_PEERS, "{} nodes held", h.demux.len());
    }
    h.final_check();
}

impl Harness {
    fn new() -> Self {
        let limits = DemuxLimits { max_peers: MAX_PEERS, init_burst: INIT_BURST, init_interval: INIT_INTERVAL };
        Self {
            now: T0,
            rng: rand_chacha::ChaCha20Rng::seed_from_u64(0xde),
            demux: E2eDemux::new(limits),
            devices: [None, None, None],
            up: Vec::new(),
            down: Vec::new(),
            sent_up: BTreeMap::new(),
            sent_down: BTreeMap::new(),
            delivered: BTreeSet::new(),
            connected: BTreeSet::new(),
            inits: Default::default(),
            seq: 0,
            buf: vec![0u8; MAX_PACKET_LEN],
        }
    }

    fn step(&mut self, opcode: u8, input: &mut Input<'_>) {
        match opcode % op::COUNT {
            op::START => {
                let dev = usize::from(input.byte().unwrap_or(0)) % DEVICES;
                let kind = input.byte().unwrap_or(0);
                self.start(dev, kind);
            }
            op::DELIVER_UP => {
                let (i, label) = (input.byte().unwrap_or(0), input.byte().unwrap_or(0));
                if self.up.is_empty() {
                    return;
                }
                let i = pick(i, self.up.len());
                let own = self.up[i].end;
                let label = if label < 0x80 { own } else { usize::from(label & 0x7f) % LABELS };
                self.up[i].delivered = true;
                let packet = self.up[i].packet.clone();
                self.deliver_up(label, &packet);
            }
            op::MUTATE_UP => {
                let (i, kind, pos, value) =
                    (input.byte().unwrap_or(0), input.byte().unwrap_or(0), input.u16(), input.byte().unwrap_or(0));
                if self.up.is_empty() {
                    return;
                }
                let f = &self.up[pick(i, self.up.len())];
                let (label, mut forged) = (f.end, f.packet.clone());
                let pos = usize::from(pos) % forged.len().max(1);
                match kind % 3 {
                    0 => {
                        if let Some(b) = forged.get_mut(pos) {
                            *b ^= value.max(1);
                        }
                    }
                    1 => forged.truncate(pos),
                    _ => forged.push(value),
                }
                if forged != f.packet {
                    self.deliver_up(label, &forged);
                }
            }
            op::GARBAGE => {
                let label = usize::from(input.byte().unwrap_or(0)) % LABELS;
                let bytes = input.chunk().unwrap_or_default().to_vec();
                self.deliver_up(label, &bytes);
            }
            op::EVENTS => {
                let label = usize::from(input.byte().unwrap_or(0)) % LABELS;
                let decision = input.byte().unwrap_or(0);
                self.events(label, decision);
            }
            op::AUTHORIZE => {
                let label = usize::from(input.byte().unwrap_or(0)) % LABELS;
                let flags = input.byte().unwrap_or(0);
                let slot = if flags & 1 == 0 { Slot::Candidate } else { Slot::Current };
                let decision = if flags & 2 == 0 { Decision::allow() } else { Decision::deny() };
                let _ = self.demux.authorize(self.now, &label_node(label), slot, decision);
            }
            op::TRANSMIT => {
                let label = usize::from(input.byte().unwrap_or(0)) % LABELS;
                self.transmit(label);
            }
            op::DELIVER_DOWN => {
                let (i, target) = (input.byte().unwrap_or(0), input.byte().unwrap_or(0));
                if self.down.is_empty() {
                    return;
                }
                let i = pick(i, self.down.len());
                let dev = if target < 0x80 { self.down[i].end } else { usize::from(target & 0x7f) % DEVICES };
                self.down[i].delivered = true;
                let packet = self.down[i].packet.clone();
                if dev < DEVICES {
                    self.deliver_down(dev, &packet);
                }
            }
            op::ADVANCE => {
                let ms = u64::from(input.u16()) * 10;
                self.advance(Duration::from_millis(ms));
            }
            op::SEND => {
                let who = input.byte().unwrap_or(0);
                self.send(who);
            }
            _ => self.pump(),
        }
    }

    /// Device `dev` restarts with a new initiator; its INIT goes in flight.
    fn start(&mut self, dev: usize, kind: u8) {
        let cfg = device_config(dev, kind);
        let remote = cfg.pattern.initiator_knows_responder().then(cloud_key);
        let c = Connection::new(cfg, Role::Initiator, remote, self.now, &mut self.rng).unwrap();
        self.devices[dev] = Some(c);
        self.drain_device(dev);
    }

    /// The clock moves on; every timer runs.
    fn advance(&mut self, by: Duration) {
        self.now = self.now + by;
        self.demux.handle_timeout(self.now);
        for dev in 0..DEVICES {
            if let Some(c) = self.devices[dev].as_mut() {
                c.handle_timeout(self.now);
            }
            self.drain_device(dev);
        }
    }

    fn send(&mut self, who: u8) {
        self.seq = self.seq.wrapping_add(1);
        let [lo, hi] = self.seq.to_le_bytes();
        if who & 1 == 0 {
            let dev = usize::from(who >> 1) % DEVICES;
            let payload = vec![b'u', u8::try_from(dev).unwrap_or(0), lo, hi];
            let Some(c) = self.devices[dev].as_mut() else { return };
            if c.send(1, Bytes::from(payload.clone())).is_ok() {
                self.sent_up.insert(payload, dev);
            }
            self.drain_device(dev);
        } else {
            let label = usize::from(who >> 1) % LABELS;
            let payload = vec![b'd', u8::try_from(label).unwrap_or(0), lo, hi];
            let Some(c) = self.demux.connection_mut(&label_node(label), Slot::Current) else { return };
            if c.send(2, Bytes::from(payload.clone())).is_ok() {
                self.sent_down.insert(payload, label);
            }
        }
    }

    fn snapshot(&self) -> Snapshot {
        self.demux
            .nodes()
            .map(|n| {
                let snap = |slot| self.demux.connection(&n, slot).map(Snap::of);
                (n, [snap(Slot::Current), snap(Slot::Candidate)])
            })
            .collect()
    }

    /// Whether `label` made no new candidate within the time a whole allowance takes to refill.
    fn quiet(&self, label: usize) -> bool {
        let refill = Duration::from_micros(INIT_INTERVAL.as_micros() * u64::from(INIT_BURST));
        self.inits[label].last().is_none_or(|t| self.now.saturating_since(*t) >= refill)
    }

    /// Hands `packet` to the demux as coming from `label`'s node.
    fn deliver_up(&mut self, label: usize, packet: &[u8]) {
        let node = label_node(label);
        let before = self.snapshot();
        let now = self.now;
        let mut made = false;
        let rng = &mut self.rng;
        let r = self.demux.handle_input(now, node, BytesMut::from(packet), || {
            made = true;
            Connection::new(cloud_config(), Role::Responder, None, now, rng)
        });
        let init = packet.first() == Some(&TYPE_HANDSHAKE_INIT);
        if made {
            assert!(init, "a new candidate for a packet that is not an INIT");
            self.check_allowance(label);
        }
        match &r {
            Err(DemuxError::InitLimited) => {
                assert!(init && !made);
                assert!(!self.quiet(label), "an INIT was limited after a full refill");
            }
            Err(DemuxError::TooManyPeers) => {
                assert!(init && !made);
                assert!(before.len() >= MAX_PEERS && !before.contains_key(&node), "TooManyPeers with room");
                // spec §16.6: a node without connections whose allowance is full makes room.
                for (n, slots) in &before {
                    let label = (0..LABELS).find(|l| label_node(*l) == *n).unwrap();
                    assert!(
                        slots.iter().any(Option::is_some) || !self.quiet(label),
                        "TooManyPeers while an idle node could make room"
                    );
                }
            }
            _ => {}
        }
        if r.is_err() {
            // spec §10.1, §16.6: a refused packet changes nothing; an INIT may have made room
            // for itself, or been read by a new candidate that then could not use it.
            self.check_unchanged(&before, node, init);
        } else if !init && !self.up.iter().any(|f| f.end == label && f.packet == packet) {
            // Not a genuine packet of this node. A forged INIT can be a valid XX message 1
            // (unauthenticated, spec §11.6); nothing else passes without the keys, except
            // another device's genuine FINAL for the candidate that device's INIT made under
            // this label (the NodeMismatch follows).
            let final_of_another =
                packet.first() == Some(&wire::TYPE_HANDSHAKE_FINAL) && self.up.iter().any(|f| f.packet == packet);
            assert!(final_of_another, "a forged {:#04x} packet was accepted under label {label}", packet[0]);
        }
    }

    /// spec §16.6 (the SHOULD on INITs per source node), as a token bucket of `INIT_BURST`
    /// refilled every `INIT_INTERVAL`: between any two new candidates at `a` and `b`, at most
    /// `INIT_BURST + ⌊(b − a) / INIT_INTERVAL⌋` of them.
    fn check_allowance(&mut self, label: usize) {
        let now = self.now;
        let list = &mut self.inits[label];
        list.push(now);
        let n = list.len();
        for (i, t) in list.iter().enumerate() {
            let count = u64::try_from(n - i).unwrap_or(u64::MAX);
            let earned = now.saturating_since(*t).as_micros() / INIT_INTERVAL.as_micros();
            assert!(count <= u64::from(INIT_BURST) + earned, "{count} new handshakes in {earned} intervals");
        }
    }

    /// A refused packet changed nothing observable. `init`: it was an INIT the demux took as
    /// a new handshake, whose node may now be held (without connections), and for which one
    /// node without connections may have been evicted.
    fn check_unchanged(&self, before: &Snapshot, node: NodeId, init: bool) {
        let after = self.snapshot();
        if !init {
            assert_eq!(&after, before, "a refused packet changed the demux");
            return;
        }
        let mut evicted = 0;
        for (n, b) in before {
            match after.get(n) {
                Some(a) => assert_eq!(a, b, "a refused INIT changed a connection"),
                None => {
                    assert!(b.iter().all(Option::is_none), "a node with connections was evicted");
                    assert!(!before.contains_key(&node), "evicted a node although the INIT's node was held");
                    evicted += 1;
                }
            }
        }
        assert!(evicted <= 1, "a refused INIT evicted {evicted} nodes");
        for (n, a) in &after {
            if !before.contains_key(n) {
                assert_eq!(*n, node, "a refused INIT added another node");
                assert!(a.iter().all(Option::is_none), "a refused INIT left a connection");
            }
        }
    }

    /// Drains `label`'s events, checking each; `decision % 3`: allow, deny, or leave requests.
    fn events(&mut self, label: usize, decision: u8) {
        let node = label_node(label);
        let mut denied: Vec<Slot> = Vec::new();
        for _ in 0..MAX_EVENTS {
            let Some(e) = self.demux.poll_event(self.now, &node) else { break };
            let (slot, event) = match e {
                RoutedEvent::NodeMismatch { slot } => {
                    denied.push(slot);
                    continue;
                }
                RoutedEvent::Event { slot, event } => (slot, event),
            };
            match event {
                Event::AuthorizationRequired { remote_static, .. } => {
                    // spec §16.6: only a key whose node id is the node's reaches the application.
                    assert_eq!(NodeId::from_public_key(&remote_static), node, "an unchecked key was offered");
                    let d = match decision % 3 {
                        0 => Decision::allow(),
                        1 => Decision::deny(),
                        _ => continue,
                    };
                    let _ = self.demux.authorize(self.now, &node, slot, d);
                }
                Event::Connected { remote_static, .. } => {
                    assert_eq!(
                        NodeId::from_public_key(&remote_static),
                        node,
                        "connected to a key that is not the node's (spec §16.6)"
                    );
                    assert!(!denied.contains(&slot), "a denied connection connected");
                    let c = self.demux.connection(&node, Slot::Current).expect("the Connected connection is current");
                    // Unless it ended since (a timer ran before the events were polled).
                    assert!(c.is_connected() || c.is_closed(), "Connected, but it is not");
                    self.connected.insert((label, c.local_index()));
                }
                Event::Message { payload, .. } => {
                    let c = self.demux.connection(&node, slot).expect("data from a connection that is gone");
                    assert!(self.connected.contains(&(label, c.local_index())), "data before Connected");
                    assert_eq!(self.sent_up.get(&payload[..]), Some(&label), "data the node never sent");
                    assert!(self.delivered.insert(payload.to_vec()), "data delivered twice");
                }
                Event::Closed(_) => denied.retain(|s| *s != slot),
                _ => {}
            }
        }
        assert!(denied.is_empty(), "a NodeMismatch without the connection's Closed");
    }

    /// The cloud's packets to `label` go in flight; returns how many.
    fn transmit(&mut self, label: usize) -> usize {
        let node = label_node(label);
        let mut n = 0;
        for _ in 0..MAX_EVENTS {
            let Ok(Some(len)) = self.demux.poll_transmit(self.now, &node, &mut self.buf) else { break };
            let packet = self.buf[..len].to_vec();
            // spec §16.2: a responder sends RESP, REJECT and transport packets, routed layouts.
            match wire::parse(Mode::Routed, MAX_PACKET_LEN, &packet) {
                Ok(Packet::Resp { .. } | Packet::Reject { .. } | Packet::Transport(..)) => {}
                other => panic!("the cloud sent {other:?}"),
            }
            push_flight(&mut self.down, label, packet);
            n += 1;
        }
        n
    }

    /// Device `dev`'s instance reads `packet`.
    fn deliver_down(&mut self, dev: usize, packet: &[u8]) {
        if let Some(c) = self.devices[dev].as_mut() {
            let _ = c.handle_input(self.now, packet);
        }
        self.drain_device(dev);
    }

    /// Device `dev`'s events (checked) and packets (in flight).
    fn drain_device(&mut self, dev: usize) {
        let Some(c) = self.devices[dev].as_mut() else { return };
        for _ in 0..MAX_EVENTS {
            let Some(e) = c.poll_event() else { break };
            match e {
                Event::AuthorizationRequired { remote_static, .. } => {
                    assert_eq!(remote_static, cloud_key(), "a device authenticated someone else");
                    let _ = c.authorize(self.now, Decision::allow());
                }
                Event::Connected { remote_static, .. } => {
                    assert_eq!(remote_static, cloud_key(), "a device connected to someone else");
                }
                Event::Message { payload, .. } => {
                    assert_eq!(self.sent_down.get(&payload[..]), Some(&dev), "a device got data not sent to it");
                    assert!(self.delivered.insert(payload.to_vec()), "data delivered twice");
                }
                _ => {}
            }
        }
        for _ in 0..MAX_EVENTS {
            let Ok(Some(len)) = c.poll_transmit(self.now, &mut self.buf) else { break };
            push_flight(&mut self.up, dev, self.buf[..len].to_vec());
        }
    }

    /// Delivers every packet not yet delivered, both ways and under the right labels, with
    /// every authorization allowed, until nothing moves (bounded).
    fn pump(&mut self) {
        for _ in 0..PUMP_ROUNDS {
            let mut moved = false;
            for label in 0..DEVICES {
                self.events(label, 0);
                self.transmit(label);
            }
            for i in 0..self.down.len() {
                if !self.down[i].delivered {
                    self.down[i].delivered = true;
                    moved = true;
                    let (dev, packet) = (self.down[i].end, self.down[i].packet.clone());
                    if dev < DEVICES {
                        self.deliver_down(dev, &packet);
                    }
                }
            }
            let mut i = 0;
            while i < self.up.len() {
                if !self.up[i].delivered {
                    self.up[i].delivered = true;
                    moved = true;
                    let (dev, packet) = (self.up[i].end, self.up[i].packet.clone());
                    self.deliver_up(dev, &packet);
                }
                i += 1;
            }
            if !moved {
                return;
            }
        }
    }

    /// spec §16.6: whatever happened before, once the allowance has refilled a genuine IK
    /// device connects through a lossless relay and a message passes each way.
    fn final_check(&mut self) {
        self.advance(Duration::from_micros(INIT_INTERVAL.as_micros() * u64::from(INIT_BURST)));
        for label in 0..LABELS {
            self.events(label, 0);
        }
        // A device the table holds, or any if there is room (a full table holds a device).
        let held: Vec<NodeId> = self.demux.nodes().collect();
        let dev = (0..DEVICES)
            .find(|d| held.len() < MAX_PEERS || held.contains(&label_node(*d)))
            .expect("a full table holds a device");
        for f in self.up.iter_mut().chain(self.down.iter_mut()) {
            f.delivered = true;
        }
        self.start(dev, 0);
        self.pump();
        let node = label_node(dev);
        let device_up = self.devices[dev].as_ref().is_some_and(Connection::is_connected);
        let cloud_up = self.demux.connection(&node, Slot::Current).is_some_and(Connection::is_connected);
        assert!(device_up && cloud_up, "a genuine device did not connect (device {device_up}, cloud {cloud_up})");
        let (delivered, up, down) = (self.delivered.len(), self.sent_up.len(), self.sent_down.len());
        self.send(u8::try_from(dev).unwrap_or(0) << 1);
        self.send((u8::try_from(dev).unwrap_or(0) << 1) | 1);
        assert_eq!((self.sent_up.len(), self.sent_down.len()), (up + 1, down + 1), "could not send on the new session");
        self.pump();
        assert_eq!(self.delivered.len(), delivered + 2, "a message was lost on the new session");
    }
}

/// The [`demux`] seeds: `(file name, input)`.
pub(super) fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    use op::*;
    // Two devices connect and exchange data; the relay replays, mislabels and alters packets;
    // device 1 restarts (a new candidate replaces its session); time passes.
    let sessions: &[&[u8]] = &[
        &[START, 0, 0], // IK
        &[START, 1, 7], // XXpsk3, AES-GCM
        &[PUMP],
        &[SEND, 0, SEND, 1, SEND, 2, SEND, 3, PUMP],
        &[DELIVER_UP, 0, 0],    // a late repeat of device 0's INIT
        &[DELIVER_UP, 1, 0x80], // device 1's XXpsk3 INIT under device 0's node id
        &[DELIVER_UP, 0, 0x81], // device 0's IK INIT under device 1's: NodeMismatch
        &[EVENTS, 1, 0],
        &[MUTATE_UP, 2, 0, 9, 0, 0x40], // a bit flip
        &[MUTATE_UP, 3, 1, 7, 0, 0],    // a truncation
        &[ADVANCE, 100, 0],             // 1 s: device 1's node may start one more
        &[START, 1, 4],                 // device 1 restarts: IK, AES-GCM
        &[DELIVER_UP, 0x80, 0],
        &[EVENTS, 1, 2],    // the decision waits
        &[AUTHORIZE, 1, 0], // and comes
        &[TRANSMIT, 1, DELIVER_DOWN, 0x80, 0, PUMP],
        &[ADVANCE, 0x2c, 0x01], // 3 s
        &[SEND, 2, PUMP],
    ];
    // INIT floods: the allowance, the node bound, garbage under the keyless node.
    let mut flood = Vec::new();
    for k in 0..4 {
        flood.extend([START, 2, 4 * (k & 1), DELIVER_UP, 0x80, 0]);
    }
    flood.extend([START, 0, 2, DELIVER_UP, 0x80, 0x83, EVENTS, 3, 0]);
    flood.extend([START, 1, 0, DELIVER_UP, 0x80, 0, EVENTS, 0, 1]);
    flood.extend([GARBAGE, 3, 4, 0, 0x10, 0, 0, 1]);
    flood.extend([ADVANCE, 100, 0, START, 2, 0, DELIVER_UP, 0x80, 0, PUMP]);
    vec![("seed-sessions", sessions.concat()), ("seed-init-flood", flood)]
}

/// Inputs that found bugs; `fuzz/corpus/demux/regression-*` holds the same bytes.
#[cfg(all(test, feature = "std"))]
pub(super) const REGRESSIONS: [(&str, &[u8]); 2] = {
    use op::*;
    [
        // The application polled device 0's request and answered late; meanwhile device 1's
        // INIT, labelled with device 0's node id, replaced the candidate. The answer reached
        // the new candidate, unchecked, and device 1 connected as device 0 (spec §16.6).
        (
            "regression-late-answer-replaced-candidate",
            &[
                START,
                0,
                0,
                DELIVER_UP,
                0,
                0,
                EVENTS,
                0,
                2,
                START,
                1,
                0,
                DELIVER_UP,
                1,
                0x80,
                AUTHORIZE,
                0,
                0,
                TRANSMIT,
                0,
                DELIVER_DOWN,
                0,
                0x81,
                DELIVER_UP,
                2,
                0x80,
                EVENTS,
                0,
                0,
            ],
        ),
        // The application answered a request it had not polled (device 0's INIT under device
        // 1's node id): the demux reported NodeMismatch, then the Connected of the same
        // connection.
        (
            "regression-unpolled-answer",
            &[
                START,
                0,
                0,
                DELIVER_UP,
                0,
                0x81,
                AUTHORIZE,
                1,
                0,
                TRANSMIT,
                1,
                DELIVER_DOWN,
                0,
                0x80,
                DELIVER_UP,
                1,
                0x81,
                EVENTS,
                1,
                0,
            ],
        ),
    ]
};

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;

    #[test]
    fn an_answer_reaches_only_the_request_the_demux_checked() {
        for (name, input) in REGRESSIONS {
            demux(input);
            let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/demux").join(name);
            assert_eq!(std::fs::read(&file).ok().as_deref(), Some(input), "{} differs", file.display());
        }
    }
}
