//! A device and a cloud service, both in memory: a real Noise handshake, telemetry, a
//! ping, a command, a re-handshake and an authenticated close, printing every packet that
//! crosses the wire.
//!
//! ```sh
//! cargo run -p veil-protocol --example pair
//! cargo run -p veil-protocol --example pair -- --pattern xx --suite aesgcm --mode datagram
//! ```
//!
//! Flags: `--pattern ik|xx|kk|ikpsk2|xxpsk3` (default `ik`), `--suite chacha|aesgcm`
//! (default `chacha`), `--mode stream|datagram|both` (default `both`).
//!
//! Randomness: `veil-protocol` never draws randomness by itself; every key pair and
//! connection takes the caller's RNG. This example passes the operating system's
//! (`rand::rngs::OsRng`); device firmware passes its hardware RNG (any
//! `rand_core::CryptoRngCore`). Nothing secret is printed: public keys are abbreviated and
//! packets are shown by type and size only.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::sync::Arc;

use bytes::Bytes;
use rand::rngs::OsRng;
use veil_protocol::message::Message;
use veil_protocol::wire::{self, Packet};
use veil_protocol::{
    CloseReason, Config, Connection, ConnectionError, Decision, Duration, Event, Mode, Pattern, Psk, PublicKey, Role,
    StaticKeypair, Suite, Timestamp,
};

/// Bytes TCP framing adds in front of every packet in stream mode (spec §3.1).
const LENGTH_PREFIX: usize = 2;
/// Size of one telemetry reading.
const READING_LEN: usize = 32;
/// Telemetry channel (device → cloud) and command channel (cloud → device).
const TELEMETRY: u16 = 1;
const COMMANDS: u16 = 2;

struct Options {
    pattern: Pattern,
    suite: Suite,
    modes: Vec<Mode>,
}

fn parse_args() -> Result<Options, String> {
    let mut o =
        Options { pattern: Pattern::IK, suite: Suite::ChaChaPolyBlake2s, modes: vec![Mode::Stream, Mode::Datagram] };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match (flag.as_str(), value.to_ascii_lowercase().as_str()) {
            ("--pattern", v) => {
                o.pattern = Pattern::ALL
                    .into_iter()
                    .find(|p| p.noise_name().eq_ignore_ascii_case(v))
                    .ok_or_else(|| format!("unknown pattern {v}"))?;
            }
            ("--suite", "chacha" | "chachapoly") => o.suite = Suite::ChaChaPolyBlake2s,
            ("--suite", "aesgcm" | "aes") => o.suite = Suite::AesGcmSha256,
            ("--mode", "stream") => o.modes = vec![Mode::Stream],
            ("--mode", "datagram") => o.modes = vec![Mode::Datagram],
            ("--mode", "both") => o.modes = vec![Mode::Stream, Mode::Datagram],
            (f, v) => return Err(format!("unknown option {f} {v}")),
        }
    }
    Ok(o)
}

/// First bytes of a public key, enough to recognise it.
fn short(k: &PublicKey) -> String {
    k.as_bytes()[..4].iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    }) + "…"
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Device,
    Cloud,
}

impl Side {
    const fn name(self) -> &'static str {
        match self {
            Self::Device => "device",
            Self::Cloud => "cloud",
        }
    }
}

/// One packet seen on the wire.
struct Seen {
    len: usize,
    handshake: bool,
    data: u64,
}

/// The sizes the summary needs, from one run.
#[derive(Default)]
struct Summary {
    handshake_bytes: usize,
    handshake_packets: usize,
    confirm_bytes: usize,
    single_reading: usize,
    batch: Option<(usize, u64)>,
    ping: usize,
    rehandshake_bytes: usize,
    close_bytes: usize,
}

struct Run {
    mode: Mode,
    pattern: Pattern,
    now: Timestamp,
    device: Connection,
    cloud: Connection,
    device_key: PublicKey,
    cloud_key: PublicKey,
    buf: Vec<u8>,
    /// Packet number on the wire.
    seq: usize,
    /// Handshake messages seen inside transport packets since `start_rehandshake`.
    inner_handshakes: usize,
    /// Packets of the current step.
    step: Vec<Seen>,
    /// The generation of the last transport packet each side (device, cloud) sent.
    last_generation: [Option<bool>; 2],
}

impl Run {
    fn new(
        o: &Options,
        mode: Mode,
        device_id: &StaticKeypair,
        cloud_id: &StaticKeypair,
        psk: &Psk,
    ) -> Result<Self, ConnectionError> {
        let (device_key, cloud_key) = (*device_id.public(), *cloud_id.public());
        let mut dc = Config::new(device_id.clone(), mode);
        dc.pattern = o.pattern;
        dc.suite = o.suite;
        let mut cc = Config::new(cloud_id.clone(), mode);
        if o.pattern.psk_position().is_some() {
            dc.psk = Some(psk.clone());
            cc.psk = Some(psk.clone());
        }
        let now = Timestamp::from_millis(1_000);
        // IK/KK/IKpsk2: the device was provisioned with the cloud's key; KK: and vice versa.
        let to_cloud = o.pattern.initiator_knows_responder().then_some(cloud_key);
        let to_device = o.pattern.responder_knows_initiator().then_some(device_key);
        // The RNG is read once per connection (a 32-byte seed); firmware passes its hardware RNG.
        let device = Connection::new(Arc::new(dc), Role::Initiator, to_cloud, now, &mut OsRng)?;
        let cloud = Connection::new(Arc::new(cc), Role::Responder, to_device, now, &mut OsRng)?;
        Ok(Self {
            mode,
            pattern: o.pattern,
            now,
            device,
            cloud,
            device_key,
            cloud_key,
            buf: vec![0u8; wire::MAX_PACKET_LEN],
            seq: 0,
            inner_handshakes: 0,
            step: Vec::new(),
            last_generation: [None; 2],
        })
    }

    fn conn(&mut self, side: Side) -> &mut Connection {
        match side {
            Side::Device => &mut self.device,
            Side::Cloud => &mut self.cloud,
        }
    }

    /// Starts a step of the scenario: a heading, then its packets.
    fn step(&mut self, title: &str) {
        println!("  -- {title}");
        self.step.clear();
        self.now = self.now + Duration::from_millis(50);
        self.device.handle_timeout(self.now);
        self.cloud.handle_timeout(self.now);
    }

    /// Delivers packets both ways until neither side has anything to send.
    fn flush(&mut self) -> Result<(), ConnectionError> {
        loop {
            let a = self.transmit(Side::Device)?;
            let b = self.transmit(Side::Cloud)?;
            if !a && !b {
                return Ok(());
            }
        }
    }

    /// Sends everything `from` has queued, one packet at a time, to the other side.
    fn transmit(&mut self, from: Side) -> Result<bool, ConnectionError> {
        let to = if from == Side::Device { Side::Cloud } else { Side::Device };
        let mut moved = false;
        loop {
            let now = self.now;
            let mut buf = std::mem::take(&mut self.buf);
            let sent_before = self.conn(from).stats().messages_sent;
            let Some(n) = self.conn(from).poll_transmit(now, &mut buf)? else {
                self.buf = buf;
                return Ok(moved);
            };
            moved = true;
            let data = self.conn(from).stats().messages_sent - sent_before;
            let packet = buf[..n].to_vec();
            self.buf = buf;
            let result = self.conn(to).handle_input(now, &packet);
            let events = self.events(to);
            self.print_packet(from, &packet, data, &events);
            if let Err(e) = result {
                println!("       ! {} refused the packet: {e}", to.name());
            }
            self.report_events(to, events)?;
            // An authorization decision may have produced more; the sender may have its own
            // (e.g. Closed once its Close was sent).
            self.settle(to)?;
            self.settle(from)?;
        }
    }

    /// Reports `side`'s events until it has none left.
    fn settle(&mut self, side: Side) -> Result<(), ConnectionError> {
        loop {
            let events = self.events(side);
            if events.is_empty() {
                return Ok(());
            }
            self.report_events(side, events)?;
        }
    }

    fn events(&mut self, side: Side) -> Vec<Event> {
        std::iter::from_fn(|| self.conn(side).poll_event()).collect()
    }

    fn report_events(&mut self, side: Side, events: Vec<Event>) -> Result<(), ConnectionError> {
        let who = side.name();
        for e in events {
            match e {
                Event::AuthorizationRequired { remote_static, .. } => {
                    // The application decides who may connect: here, the expected peer only.
                    let expected = if side == Side::Cloud { self.device_key } else { self.cloud_key };
                    let ok = remote_static.ct_eq(&expected);
                    let verdict = if ok { "allows (expected key)" } else { "refuses" };
                    println!("       {who}: {verdict} peer {}", short(&remote_static));
                    let now = self.now;
                    self.conn(side).authorize(now, if ok { Decision::allow() } else { Decision::deny() })?;
                }
                Event::Connected { remote_static, .. } => {
                    println!("       {who}: connected to {}", short(&remote_static));
                }
                Event::Rehandshaked { .. } => println!("       {who}: now sending on the new session"),
                Event::Closed(c) => {
                    let by = if c.by_peer { "by peer" } else { "locally" };
                    println!("       {who}: closed {by} ({})", c.reason);
                }
                // Messages and pongs are shown with the packet that carried them.
                _ => {}
            }
        }
        Ok(())
    }

    fn print_packet(&mut self, from: Side, p: &[u8], data: u64, events: &[Event]) {
        self.seq += 1;
        let arrow = if from == Side::Device { "device → cloud" } else { "cloud → device" };
        let framed = match self.mode {
            Mode::Stream => format!("{:>5}", p.len() + LENGTH_PREFIX),
            _ => "    -".to_owned(),
        };
        let (kind, what, handshake) = self.describe(from, p, data, events);
        println!("  {:>2}  {arrow}  {kind:<15} {:>5} {framed}  {what}", self.seq, p.len());
        self.step.push(Seen { len: p.len(), handshake, data });
    }

    /// The packet type from its cleartext header, and what it carried. Transport packets are
    /// described from what is observable: data messages the sender's counters say it packed,
    /// and what the receiver made of the rest.
    fn describe(&mut self, from: Side, p: &[u8], data: u64, events: &[Event]) -> (String, String, bool) {
        let parsed = wire::parse(self.mode, wire::MAX_PACKET_LEN, p);
        match parsed {
            Ok(Packet::Init { header, .. }) => {
                let idx = header.sender_index.map(|i| format!(", index {i:08x}")).unwrap_or_default();
                ("INIT".into(), format!("{} {} in clear{idx}", header.pattern, header.suite), true)
            }
            Ok(Packet::Resp { .. }) => ("RESP".into(), "Noise message 2".into(), true),
            Ok(Packet::Final { .. }) => ("FINAL".into(), "Noise message 3".into(), true),
            Ok(Packet::Reject { reason, .. }) => ("REJECT".into(), format!("{reason}"), true),
            Ok(Packet::Transport(h, _)) => {
                let kind = match h.counter_lo {
                    Some(c) => format!("TRANSPORT g{} #{c}", u8::from(h.generation)),
                    None => format!("TRANSPORT g{}", u8::from(h.generation)),
                };
                let overhead = wire::transport_overhead(self.mode);
                let plain = p.len().saturating_sub(overhead);
                let mut parts = Vec::new();
                let mut rest = plain;
                let mut sizes = Vec::new();
                for e in events {
                    match e {
                        Event::Message { channel, id, payload } => {
                            rest -= Message::Data { channel: *channel, id: *id, payload }.encoded_len();
                            sizes.push(payload.len());
                        }
                        Event::Pong { id } => {
                            rest -= Message::Pong { id: *id }.encoded_len();
                            parts.push("pong".to_owned());
                        }
                        Event::Closed(c) if c.by_peer => {
                            rest -= Message::Close { reason: c.reason }.encoded_len();
                            parts.push(format!("close ({})", c.reason));
                        }
                        _ => {}
                    }
                }
                if data > 0 {
                    let all_same = sizes.windows(2).all(|w| w[0] == w[1]);
                    let s = if data == 1 { "" } else { "s" };
                    let sz = match sizes.first() {
                        Some(n) if all_same && data > 1 => format!(" ({data} × {n} B)"),
                        Some(n) if all_same => format!(" ({n} B)"),
                        _ => String::new(),
                    };
                    parts.insert(0, format!("{data} data message{s}{sz}"));
                }
                // What the receiver did not surface as an event: a re-handshake message
                // (tens of bytes) or a ping (a few bytes).
                let handshake = rest >= wire::DH_LEN;
                if handshake {
                    // The message is a kind byte, a varint length and the whole handshake packet.
                    let inner_len = if rest - 2 < 0x80 { rest - 2 } else { rest - 3 };
                    self.inner_handshakes += 1;
                    let inner = ["INIT", "RESP", "FINAL"].get(self.inner_handshakes - 1).copied().unwrap_or("?");
                    parts.push(format!("re-handshake {inner} inside ({inner_len} B)"));
                } else if rest > 0 {
                    parts.push("ping".to_owned());
                }
                let slot = &mut self.last_generation[from as usize];
                let first_on_keys = *slot != Some(h.generation);
                *slot = Some(h.generation);
                if parts.is_empty() {
                    let connects = events.iter().any(|e| matches!(e, Event::Connected { .. }));
                    let switches = events.iter().any(|e| matches!(e, Event::Rehandshaked { .. }));
                    parts.push(
                        if connects {
                            "empty: proves the keys, the peer is now connected"
                        } else if switches {
                            "empty: first on the new keys, the peer switches too"
                        } else if first_on_keys {
                            "empty: first on these keys (acknowledges the handshake)"
                        } else {
                            "empty (keepalive)"
                        }
                        .to_owned(),
                    );
                }
                (kind, parts.join(" + "), handshake)
            }
            Ok(_) => ("OTHER".into(), String::new(), false),
            Err(e) => ("?".into(), format!("unparsable: {e}"), false),
        }
    }

    fn bytes(&self, s: &Seen) -> usize {
        s.len + if self.mode == Mode::Stream { LENGTH_PREFIX } else { 0 }
    }
}

/// The scenario, once per mode.
fn run(
    o: &Options,
    mode: Mode,
    device_id: &StaticKeypair,
    cloud_id: &StaticKeypair,
    psk: &Psk,
) -> Result<Summary, ConnectionError> {
    let mut r = Run::new(o, mode, device_id, cloud_id, psk)?;
    let mut sum = Summary::default();
    let carrier = match mode {
        Mode::Stream => "stream mode (TCP: 2-byte length prefix per packet, shown as 'framed')",
        _ => "datagram mode (UDP: one packet per datagram; g = generation, # = counter)",
    };
    println!("\n== {carrier}");
    println!("   #  direction       type             bytes framed  contents");

    r.step(&format!("handshake ({}, {} messages)", r.pattern, r.pattern.message_count()));
    r.flush()?;
    for s in &r.step {
        if s.handshake {
            sum.handshake_bytes += r.bytes(s);
            sum.handshake_packets += 1;
        } else {
            // The empty packets that confirm the keys (and, in datagram mode, answer that).
            sum.confirm_bytes += r.bytes(s);
        }
    }

    r.step("5 sensor readings: 1 sent alone, then 4 queued together share one packet");
    let reading = |i: u8| Bytes::from(vec![i; READING_LEN]);
    r.device.send(TELEMETRY, reading(0))?;
    r.flush()?;
    for i in 1..5 {
        r.device.send(TELEMETRY, reading(i))?;
    }
    r.flush()?;
    sum.single_reading = r.step.first().map_or(0, |s| r.bytes(s));
    sum.batch = r.step.get(1).map(|s| (r.bytes(s), s.data));

    r.step("ping from the device, pong from the cloud");
    r.device.ping(1)?;
    r.flush()?;
    sum.ping = r.step.first().map_or(0, |s| r.bytes(s));

    r.step("command from the cloud to the device");
    r.cloud.send(COMMANDS, Bytes::from_static(b"set interval=30s"))?;
    r.flush()?;

    r.step("re-handshake (new keys, forward secrecy) while a reading is in flight");
    r.inner_handshakes = 0;
    r.device.start_rehandshake(r.now)?;
    r.device.send(TELEMETRY, reading(5))?;
    r.flush()?;
    // Everything this step added to the wire beyond what the reading alone costs.
    let total: usize = r.step.iter().map(|s| r.bytes(s)).sum();
    sum.rehandshake_bytes = total.saturating_sub(sum.single_reading);

    r.step("authenticated close");
    r.device.close(r.now, CloseReason::Normal);
    r.flush()?;
    sum.close_bytes = r.step.first().map_or(0, |s| r.bytes(s));
    if !(r.device.is_closed() && r.cloud.is_closed()) {
        println!("  ! both sides should be closed");
    }
    Ok(sum)
}

fn main() -> ExitCode {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}\nusage: pair [--pattern ik|xx|kk|ikpsk2|xxpsk3] [--suite chacha|aesgcm] [--mode stream|datagram|both]");
            return ExitCode::from(2);
        }
    };
    let device_id = StaticKeypair::generate(&mut OsRng);
    let cloud_id = StaticKeypair::generate(&mut OsRng);
    let mut psk_bytes = [0u8; 32];
    rand::RngCore::fill_bytes(&mut OsRng, &mut psk_bytes);
    let psk = Psk::new(psk_bytes);
    println!("Veil pair: device (initiator) ⇄ cloud (responder), in memory; RNG: OS (firmware: its hardware RNG)");
    println!(
        "Noise_{}_{}; device key {}, cloud key {}{}",
        o.pattern,
        o.suite,
        short(device_id.public()),
        short(cloud_id.public()),
        if o.pattern.psk_position().is_some() { "; shared psk (random, not shown)" } else { "" }
    );
    let mut rows = Vec::new();
    for &mode in &o.modes {
        match run(&o, mode, &device_id, &cloud_id, &psk) {
            Ok(s) => rows.push((mode, s)),
            Err(e) => {
                eprintln!("{mode:?}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    println!("\n== summary (bytes on the carrier; stream figures include the 2-byte length prefix)");
    println!(
        "   mode       handshake      confirm   1 reading (32 B)   4 readings, 1 packet   ping  re-handshake  close"
    );
    for (mode, s) in rows {
        let (batch, n) = s.batch.unwrap_or((0, 1));
        let n = usize::try_from(n.max(1)).unwrap_or(1);
        println!(
            "   {:<9} {:>4} B ({} pkts) {:>5} B {:>6} B (+{} B) {:>7} B (+{:.1} B each) {:>4} B {:>8} B {:>6} B",
            format!("{mode:?}").to_lowercase(),
            s.handshake_bytes,
            s.handshake_packets,
            s.confirm_bytes,
            s.single_reading,
            s.single_reading.saturating_sub(READING_LEN),
            batch,
            batch.saturating_sub(n * READING_LEN) as f64 / n as f64,
            s.ping,
            s.rehandshake_bytes,
            s.close_bytes,
        );
    }
    println!("   overhead: per packet header + 16 B tag (stream 1 B + 2 B prefix, datagram 8 B); per message 4 B");
    println!("   (kind, channel, id, length); queued messages share a packet. UDP/IP headers not counted.");
    ExitCode::SUCCESS
}
