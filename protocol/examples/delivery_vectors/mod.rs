//! `delivery.json` (spec §17.11, §14.2): delivery messages and a scripted exchange between a
//! sender's outbox and a receiver's inbox (default configuration, fixed stream id, virtual
//! clock), with every message each side emits, what the receiver delivers and acknowledges.

use veil_protocol::delivery::{
    Ack, DataOutcome, DeliveryConfig, DeliveryMessage, DeliveryOutput, Inbox, Outbox, StreamId, ACK_DELAY,
};

use super::*;

/// The sender's fixed stream id.
const STREAM: StreamId = *b"Veil-str";

#[derive(Serialize)]
pub(super) struct DeliveryFile {
    description: &'static str,
    spec: &'static str,
    generator: &'static str,
    pub(super) messages: Vec<DeliveryMessageJson>,
    exchange: Exchange,
}

/// One message with its fields and encoding (spec §9.2).
#[derive(Serialize, Clone)]
pub(super) struct DeliveryMessageJson {
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    channel: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ranges: Option<Vec<[u64; 2]>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<String>,
    /// `Stored` (spec §17.9): route handle, generation, first counter_lo, count.
    #[serde(skip_serializing_if = "Option::is_none")]
    route: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    generation: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    first: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    count: Option<u32>,
    pub(super) encoding: String,
}

#[derive(Serialize)]
struct ConfigJson {
    window_messages: usize,
    window_bytes: usize,
    max_channels: usize,
    reorder_bytes: usize,
    rto_us: u64,
    rto_max_us: u64,
    ack_delay_us: u64,
    ack_every: u64,
    ack_every_bytes: usize,
    custody_probe_us: u64,
}

#[derive(Serialize)]
struct Exchange {
    config: ConfigJson,
    stream: String,
    steps: Vec<Step>,
}

#[derive(Serialize)]
struct DeliveredJson {
    channel: u16,
    id: u64,
    payload: String,
}

#[derive(Serialize)]
struct ExpiredJson {
    channel: u16,
    id: u64,
    unconfirmed: bool,
}

/// One step of the script. `action` is one of:
/// - `connect` (`mode`): a new connection; the sender's `on_connected`, the receiver's too;
/// - `push` (`channel`, `payload`, optional `ttl_us`): the sender accepts a message, `id`;
/// - `transmit`: the sender's `poll_transmit` until it returns nothing (`sender`); the messages
///   at the indices `deliver` reach the receiver in that order (the others are lost), with one
///   `outcomes` entry each; then `delivered`: what the receiver hands to the application;
/// - `commit`: the receiving application commits everything delivered;
/// - `acks`: the receiver's `poll_ack` until it returns nothing (`receiver`); those at the
///   indices `deliver` reach the sender, with one `outcomes` entry each;
/// - `expire`: the sender drops the messages whose time to live passed (`expired`);
/// - `custody`: a relay's `Stored` names the packets that last carried the ids `id` to
///   `id + count - 1` of `channel` (spec §17.9); `held` of them go into custody;
/// - `transient`: the relay reports a packet dropped for a passing reason (spec §17.4 rule 5);
///   `count` messages in flight are brought forward.
///
/// `window` is the number of messages in the sender's window after the step.
#[derive(Serialize)]
struct Step {
    step: usize,
    time_us: u64,
    action: &'static str,
    note: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    mode: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    channel: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ttl_us: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    count: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    held: Option<usize>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    sender: Vec<DeliveryMessageJson>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    receiver: Vec<DeliveryMessageJson>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    deliver: Vec<usize>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    outcomes: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    delivered: Vec<DeliveredJson>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    expired: Vec<ExpiredJson>,
    window: usize,
}

fn encode(m: &Message<'_>) -> String {
    let mut buf = vec![0u8; m.encoded_len()];
    let n = m.encode(&mut buf).unwrap();
    assert_eq!(n, buf.len());
    hex::encode(buf)
}

fn ack_json(a: &Ack) -> DeliveryMessageJson {
    DeliveryMessageJson {
        kind: "Ack",
        channel: Some(a.channel()),
        id: None,
        next: Some(a.next()),
        ranges: Some(a.ranges().iter().map(|(s, c)| [s, c]).collect()),
        stream: None,
        payload: None,
        route: None,
        generation: None,
        first: None,
        count: None,
        encoding: encode(&Message::Ack(*a)),
    }
}

fn output_json(o: &DeliveryOutput) -> DeliveryMessageJson {
    let blank = |kind, encoding| DeliveryMessageJson {
        kind,
        channel: None,
        id: None,
        next: None,
        ranges: None,
        stream: None,
        payload: None,
        route: None,
        generation: None,
        first: None,
        count: None,
        encoding,
    };
    match o {
        DeliveryOutput::Message(m) => match *m {
            DeliveryMessage::Stream { stream } => {
                DeliveryMessageJson { stream: Some(hex::encode(stream)), ..blank("Stream", encode(&m.message())) }
            }
            DeliveryMessage::Skip { channel, next } => {
                DeliveryMessageJson { channel: Some(channel), next: Some(next), ..blank("Skip", encode(&m.message())) }
            }
            DeliveryMessage::Ack(a) => ack_json(&a),
            _ => unreachable!("no other delivery message"),
        },
        DeliveryOutput::Data { channel, id, payload } => DeliveryMessageJson {
            channel: Some(*channel),
            id: Some(*id),
            payload: Some(hex::encode(payload)),
            ..blank("Data", encode(&Message::Data { channel: *channel, id: *id, payload }))
        },
    }
}

/// spec §17.9: a gateway's custody acknowledgement, with its fields and encoding.
fn stored_json(route: u32, generation: u8, first: u32, count: u32) -> DeliveryMessageJson {
    DeliveryMessageJson {
        kind: "Stored",
        channel: None,
        id: None,
        next: None,
        ranges: None,
        stream: None,
        payload: None,
        route: Some(route),
        generation: Some(generation),
        first: Some(first),
        count: Some(count),
        encoding: encode(&Message::Stored { route, generation, first, count }),
    }
}

/// spec §17.11: each message kind with its fields; Ack without ranges, with one, with 16;
/// `Stored` with a small range and with the largest (wrapping past 2^24).
fn messages() -> Vec<DeliveryMessageJson> {
    let sixteen: Vec<(u64, u64)> = (0..16u64).map(|i| (1 + i % 3, 1 + 4 * i)).collect();
    let acks = [
        Ack::cumulative(1, 300),
        Ack::new(7, 1_000_000, &[(2, 3)]).unwrap(),
        Ack::new(300, (1 << 35) + 5, &sixteen).unwrap(),
    ];
    let mut out: Vec<DeliveryMessageJson> = acks.iter().map(ack_json).collect();
    out.push(output_json(&DeliveryOutput::Message(DeliveryMessage::Stream { stream: STREAM })));
    for (channel, next) in [(1, 4), (65_535, u64::MAX - 1024)] {
        out.push(output_json(&DeliveryOutput::Message(DeliveryMessage::Skip { channel, next })));
    }
    out.push(stored_json(0, 0, 5, 3));
    out.push(stored_json(300, 1, (1 << 24) - 2, 1 << 24));
    out
}

struct Script {
    out: Outbox,
    inbox: Inbox,
    now: Timestamp,
    mode: Mode,
    steps: Vec<Step>,
}

fn step(action: &'static str, note: &'static str) -> Step {
    Step {
        step: 0,
        time_us: 0,
        action,
        note,
        mode: None,
        channel: None,
        payload: None,
        ttl_us: None,
        id: None,
        count: None,
        held: None,
        sender: Vec::new(),
        receiver: Vec::new(),
        deliver: Vec::new(),
        outcomes: Vec::new(),
        delivered: Vec::new(),
        expired: Vec::new(),
        window: 0,
    }
}

impl Script {
    fn record(&mut self, mut s: Step) {
        s.step = self.steps.len() + 1;
        s.time_us = self.now.as_micros();
        s.window = self.out.window_len();
        self.steps.push(s);
    }

    fn connect(&mut self, mode: Mode, note: &'static str) {
        self.mode = mode;
        self.out.on_connected(mode, self.now);
        self.inbox.on_connected();
        self.record(Step { mode: Some(mode_name(mode)), ..step("connect", note) });
    }

    fn push(&mut self, channel: u16, payload: &'static [u8], ttl: Option<Duration>, note: &'static str) {
        let id = self.out.push(channel, Bytes::from_static(payload), self.now, ttl).unwrap();
        self.record(Step {
            channel: Some(channel),
            payload: Some(hex::encode(payload)),
            ttl_us: ttl.map(Duration::as_micros),
            id: Some(id),
            ..step("push", note)
        });
    }

    /// `deliver` picks, from the emitted messages, the indices handed over, in order.
    fn transmit(&mut self, deliver: impl Fn(&[DeliveryOutput]) -> Vec<usize>, note: &'static str) {
        let sent: Vec<DeliveryOutput> = std::iter::from_fn(|| self.out.poll_transmit(self.now, usize::MAX)).collect();
        let order = deliver(&sent);
        let mut outcomes = Vec::new();
        for &i in &order {
            outcomes.push(match sent[i].clone() {
                DeliveryOutput::Message(DeliveryMessage::Stream { stream }) => {
                    if self.inbox.on_stream(stream, self.now) { "StartedOver" } else { "Same" }.to_owned()
                }
                DeliveryOutput::Message(DeliveryMessage::Skip { channel, next }) => {
                    if self.inbox.on_skip(channel, next, self.now) { "Moved" } else { "Unchanged" }.to_owned()
                }
                DeliveryOutput::Data { channel, id, payload } => {
                    let o: DataOutcome = self.inbox.on_data(channel, id, payload, self.mode, self.now).unwrap();
                    format!("{o:?}")
                }
                other => panic!("{other:?}"),
            });
        }
        let delivered = std::iter::from_fn(|| self.inbox.poll_deliver())
            .map(|(channel, id, p)| DeliveredJson { channel, id, payload: hex::encode(p) })
            .collect();
        let sender = sent.iter().map(output_json).collect();
        self.record(Step { sender, deliver: order, outcomes, delivered, ..step("transmit", note) });
    }

    fn commit(&mut self, note: &'static str) {
        self.inbox.commit_delivered(self.now);
        self.record(step("commit", note));
    }

    fn acks(&mut self, deliver: impl Fn(&[Ack]) -> Vec<usize>, note: &'static str) {
        let acks: Vec<Ack> = std::iter::from_fn(|| self.inbox.poll_ack(self.now)).collect();
        let order = deliver(&acks);
        let outcomes =
            order.iter().map(|&i| format!("Freed({})", self.out.on_ack(&acks[i], self.now).unwrap())).collect();
        let receiver = acks.iter().map(ack_json).collect();
        self.record(Step { receiver, deliver: order, outcomes, ..step("acks", note) });
    }

    fn custody(&mut self, channel: u16, first: u64, count: u64, note: &'static str) {
        let held = self.out.on_custody(channel, first..first + count, self.now);
        self.record(Step {
            channel: Some(channel),
            id: Some(first),
            count: Some(count),
            held: Some(held),
            ..step("custody", note)
        });
    }

    fn transient(&mut self, note: &'static str) {
        let n = self.out.on_transient_drop(self.now);
        self.record(Step { count: Some(n as u64), ..step("transient", note) });
    }

    fn expire(&mut self, note: &'static str) {
        let expired = self
            .out
            .expire(self.now)
            .into_iter()
            .map(|e| ExpiredJson { channel: e.channel, id: e.id, unconfirmed: e.unconfirmed })
            .collect();
        self.record(Step { expired, ..step("expire", note) });
    }
}

fn all<T>(v: &[T]) -> Vec<usize> {
    (0..v.len()).collect()
}

fn data_index(sent: &[DeliveryOutput], ch: u16, want: u64) -> usize {
    sent.iter()
        .position(|o| matches!(o, DeliveryOutput::Data { channel, id, .. } if *channel == ch && *id == want))
        .expect("the message was sent")
}

/// spec §17.11: the scripted exchange.
fn exchange() -> Exchange {
    let config = DeliveryConfig::default();
    let mut s = Script {
        out: Outbox::new(config, STREAM).unwrap(),
        inbox: Inbox::new(config).unwrap(),
        now: T0,
        mode: Mode::Datagram,
        steps: Vec::new(),
    };
    s.connect(Mode::Datagram, "a datagram connection: the sender queues its Stream");
    s.push(1, b"a0", None, "");
    s.push(1, b"a1", None, "");
    s.push(1, b"a2", None, "");
    s.push(2, b"b0", None, "");
    s.transmit(
        |sent| {
            // 1/0 is lost; 1/2 overtakes 1/1; every Stream arrives.
            let lost = data_index(sent, 1, 0);
            let mut order: Vec<usize> = (0..sent.len()).filter(|&i| i != lost).collect();
            let a = order.iter().position(|&i| i == data_index(sent, 1, 1)).unwrap();
            let b = order.iter().position(|&i| i == data_index(sent, 1, 2)).unwrap();
            order.swap(a, b);
            order
        },
        "until an Ack arrives, a Stream goes in front of every Data (datagram mode); Data 1/0 is lost and 1/2 \
         arrives before 1/1: both wait above the gap",
    );
    s.commit("the application commits what it was given (2/0)");
    s.now = s.now + ACK_DELAY;
    s.acks(all, "channel 1 names the buffered 1/1 and 1/2 in its ranges; channel 2 acknowledges 2/0");
    s.now = T0 + DELIVERY_RTO_SECS;
    s.transmit(
        |sent| {
            let i = data_index(sent, 1, 0);
            vec![i, i]
        },
        "the retransmission timeout: only 1/0 goes again (1/1 and 1/2 are marked received); it arrives twice",
    );
    s.commit("");
    s.now = s.now + ACK_DELAY;
    s.acks(all, "");
    s.push(1, b"a3", Some(Duration::from_millis(500)), "a message with a time to live of 500 ms");
    s.push(1, b"a4", None, "");
    s.push(2, b"b1", None, "");
    s.now = s.now + Duration::from_millis(600);
    s.expire("1/3 expires before it was ever sent: expired, not unconfirmed");
    s.connect(Mode::Stream, "a new connection, in stream mode: the Stream, then a Skip per channel above id 0");
    s.transmit(all, "the receiver's next of channel 1 moves past the expired 1/3");
    s.commit("");
    s.now = s.now + ACK_DELAY;
    s.acks(all, "");
    s.connect(Mode::Routed, "a routed connection, through a relay with a spool");
    s.transmit(all, "");
    s.now = s.now + ACK_DELAY;
    s.acks(all, "they confirm the Stream and the Skips");
    s.push(2, b"b2", None, "");
    s.transmit(all, "the relay's uplink is down: it spools the packet, then replays it once the uplink is back");
    s.custody(2, 2, 1, "the relay's Stored for that packet: 2/2 is in custody");
    let stored = s.now;
    s.commit("");
    s.now = s.now + ACK_DELAY;
    s.acks(|_| Vec::new(), "the Ack is lost on its way back");
    s.now = stored + DELIVERY_RTO_SECS;
    s.transmit(all, "custody: 2/2 is not retransmitted at its timeout");
    s.now = stored + config.custody_probe;
    s.transmit(all, "CUSTODY_PROBE after the Stored, with no Ack of channel 2 read: a Stream alone asks for one");
    s.acks(all, "the answer frees 2/2");
    s.push(2, b"b3", None, "");
    let b3_sent = s.now;
    s.transmit(|_| Vec::new(), "the relay spools 2/3, then loses it (its uplink took the replay and failed)");
    s.custody(2, 3, 1, "the Stored for 2/3");
    s.push(2, b"b4", None, "");
    s.transmit(all, "2/4 passes the relay, which keeps a source's packets in order: 2/3 cannot still be in its spool");
    s.now = s.now + ACK_DELAY;
    s.acks(all, "2/4 is named received, 2/3 is not: the custody of 2/3 ends");
    s.now = b3_sent + DELIVERY_RTO_SECS;
    s.transmit(all, "2/3 goes again at its retransmission timeout, not after CUSTODY_TIMEOUT");
    s.commit("");
    s.now = s.now + ACK_DELAY;
    s.acks(all, "");
    s.push(2, b"b5", None, "");
    let b5_sent = s.now;
    s.transmit(|_| Vec::new(), "a relay with a full uplink queue drops it");
    s.now = b5_sent + DELIVERY_RTO_SECS;
    s.transmit(|_| Vec::new(), "its retransmission timeout: dropped again; the next one is 2 s away");
    s.now = s.now + Duration::from_millis(500);
    s.transient("the relay says Unreachable { Congested }: 2/5 is due one rto (1 s) from now, not 1.5 s later");
    s.now = s.now + DELIVERY_RTO_SECS;
    s.transmit(all, "");
    s.commit("");
    s.now = s.now + ACK_DELAY;
    s.acks(all, "");
    Exchange {
        config: ConfigJson {
            window_messages: config.window_messages,
            window_bytes: config.window_bytes,
            max_channels: config.max_channels,
            reorder_bytes: config.reorder_bytes,
            rto_us: config.rto.as_micros(),
            rto_max_us: config.rto_max.as_micros(),
            ack_delay_us: config.ack_delay.as_micros(),
            ack_every: config.ack_every,
            ack_every_bytes: config.ack_every_bytes,
            custody_probe_us: config.custody_probe.as_micros(),
        },
        stream: hex::encode(STREAM),
        steps: s.steps,
    }
}

/// `DELIVERY_RTO` (1 s) after the first transmission.
const DELIVERY_RTO_SECS: Duration = Duration::from_secs(1);

pub(super) fn generate() -> DeliveryFile {
    let exchange = exchange();
    let last = exchange.steps.last().expect("steps");
    assert_eq!(last.window, 0, "the exchange ends with everything acknowledged");
    DeliveryFile {
        description:
            "Veil delivery (spec §17): `messages`: Ack, Stream, Skip and Stored with their fields and encodings \
                      (spec §9.2); `exchange`: a sender (outbox) and a receiver (inbox) with the default \
                      configuration and a fixed stream id, driven by a fixed script on a virtual clock. Each step \
                      lists what the sender emits (`sender`, by poll_transmit until empty), what the receiver \
                      emits (`receiver`, by poll_ack until empty), the indices of those messages that reach the \
                      other side in that order (`deliver`; the others are lost), the result of each \
                      (`outcomes`), what the receiver hands to its application (`delivered`), the messages the \
                      sender dropped by their time to live (`expired`) and the sender's window size after the \
                      step. Malformed delivery messages are in malformed.json.",
        spec: "spec/protocol.md §17, §14",
        generator: GENERATOR,
        messages: messages(),
        exchange,
    }
}

/// spec §17.3, §17.2, §17.6, §17.9: malformed delivery messages for `malformed.json`.
pub(super) fn malformed_cases() -> Vec<Case> {
    use DecodeError as E;
    let mut seventeen = vec![0x02, 0x01, 0x00, 0x11];
    seventeen.extend([0x01, 0x01].repeat(17));
    vec![
        (
            Target::Message,
            vec![0x02, 0x01, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0x00],
            None,
            E::MalformedMessage,
            "Ack next > u64",
        ),
        (Target::Message, vec![0x02, 0x01, 0x00], None, E::MalformedMessage, "Ack without its range count"),
        (Target::Message, vec![0x02, 0x01, 0x00, 0x01, 0x01], None, E::MalformedMessage, "Ack range pair cut short"),
        (Target::Message, vec![0x02, 0x01, 0x00, 0x01, 0x00, 0x01], None, E::MalformedMessage, "Ack range with skip 0"),
        (
            Target::Message,
            vec![0x02, 0x01, 0x00, 0x01, 0x01, 0x00],
            None,
            E::MalformedMessage,
            "Ack range with count 0",
        ),
        (Target::Message, seventeen, None, E::MalformedMessage, "Ack with 17 range pairs"),
        (
            Target::Message,
            vec![0x02, 0x01, 0x00, 0x01, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 0x01],
            None,
            E::MalformedMessage,
            "Ack range whose skip + count overflows u64",
        ),
        (
            Target::Message,
            vec![0x02, 0x01, 0x00, 0x01, 0x01, 0x80, 0x08],
            None,
            E::MalformedMessage,
            "Ack range naming id next + 1024 (beyond the receive window)",
        ),
        (
            Target::Message,
            vec![0x02, 0x01, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 0x01, 0x01, 0x01],
            None,
            E::MalformedMessage,
            "Ack range naming an id beyond 2^64 - 1 (next = 2^64 - 1)",
        ),
        (Target::Message, vec![0x0f], None, E::MalformedMessage, "Stream without its id"),
        (
            Target::Message,
            vec![0x0f, 1, 2, 3, 4, 5, 6, 7],
            None,
            E::MalformedMessage,
            "Stream id cut short (7 of 8 bytes)",
        ),
        (Target::Message, vec![0x10, 0x01], None, E::MalformedMessage, "Skip without its next"),
        (
            Target::Message,
            vec![0x10, 0x01, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02],
            None,
            E::MalformedMessage,
            "Skip next > u64",
        ),
        (Target::Message, vec![0x11, 0x00, 0x02, 0x00, 0x01], None, E::MalformedMessage, "Stored generation 2"),
        (
            Target::Message,
            vec![0x11, 0x00, 0x00, 0x80, 0x80, 0x80, 0x08, 0x01],
            None,
            E::MalformedMessage,
            "Stored first = 2^24",
        ),
        (Target::Message, vec![0x11, 0x00, 0x00, 0x00, 0x00], None, E::MalformedMessage, "Stored count 0"),
        (
            Target::Message,
            vec![0x11, 0x00, 0x00, 0x00, 0x81, 0x80, 0x80, 0x08],
            None,
            E::MalformedMessage,
            "Stored count = 2^24 + 1",
        ),
        (Target::Message, vec![0x11, 0x00, 0x00, 0x00], None, E::MalformedMessage, "Stored without its count"),
    ]
}
