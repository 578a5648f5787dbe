//! Device → cloud through a gateway against device → cloud directly (issue 5), in one run on
//! loopback, and the bytes on the wire per relayed message at each hop.
//!
//! One process holds a fleet provisioned with veil-relay's tooling (`demo::provision`): the
//! cloud (`veil_relay::cloud::Cloud`) and the gateway (`veil_relay::gateway::Gateway`) started
//! from their configuration files as the `veil-relay` roles start them, fleet-CA certificates,
//! IK, the default `25519_ChaChaPoly_BLAKE2s` suite, Veil built with `ring`, everything on one
//! tokio runtime with 2 workers (the machine's cores).
//!
//! - **relayed**: a device linked to the gateway over TCP ([`SimDevice`], the demo's device)
//!   with an end-to-end session with the cloud through it (spec §16): each message is sealed
//!   end to end, travels as a `Forward` on the device's link, and as a `Deliver` on the
//!   gateway's uplink.
//! - **direct**: a device of the same fleet linked to the cloud's TCP listener itself (spec
//!   §16.1, direct shape: the link session is the end-to-end session).
//!
//! Each path runs twice (issue 6): **best effort** (the device's end-to-end endpoint without
//! spec §17; the cloud, which runs delivery, takes such a sender's messages best effort and
//! acknowledges nothing) and **acked** (the device with acknowledged delivery, auto-commit,
//! as `demo::SimDevice` ships: the cloud acknowledges, the device keeps each message until
//! then). Ratios: relayed ÷ direct for both (issue 5's target), and acked ÷ best effort on
//! the relayed path (issue 6: what the acknowledgements cost).
//!
//! All send through `RoutedEndpoint::send` on channel 0; one transfer is `count` messages,
//! timed until the cloud application (`Cloud::next_event`) has them all. Routed sessions may
//! lose packets (spec §16.2): a gateway whose uplink queue is full drops the envelope and
//! answers `Unreachable { Congested }` (spec §16.4), and nothing resends it. So the sender keeps
//! at most [`window`] messages in flight (sent and not yet at the cloud), the same window for
//! both subjects, as an application with end-to-end acknowledgements would; a lost message
//! fails the benchmark rather than being counted. (At 64 B the window also slows the direct
//! path, which would run faster without it: the ratio compares one application on both paths.
//! 64 messages of 64 B are about one end-to-end packet, so at the default window each round
//! waits for the previous one to reach the cloud, and the ratio measures the relayed path's
//! extra hop of latency; from `VEIL_RELAY_WINDOW=128` it measures throughput.)
//!
//! criterion times `iter_custom` batches (one iteration = one message, batches of at most
//! [`messages`]); the ratio relayed ÷ direct comes from an interleaved measurement
//! (`veil_benches::timing`). The target: relayed ≥ 0.6× direct.
//!
//! Then, with devices of their own and one message at a time (each waits until the cloud has
//! the previous one, so that no two share a packet), the bytes each hop puts on the wire per
//! 32-byte message: the link connections' `bytes_sent` (plus the 2-byte TCP length prefix per
//! packet), against spec §12.6 (78 B per TCP hop, 46 B of overhead; target ≤ 48 B).
//!
//! `cargo bench -p veil-benches --bench relay`; figures go to `benches/RESULTS.md`.
//! `VEIL_RELAY_WINDOW` overrides the window (messages). `VEIL_RELAY_BATCH=n` (n > 1) sends
//! with `RoutedEndpoint::send_many`, n messages per call (within the window), on every path.
//! `VEIL_RELAY_UPLINK_SUITE=25519_AESGCM_SHA256` gives the gateway's uplink AES-GCM
//! (`uplink.suite`); the devices' links and end-to-end sessions stay ChaChaPoly.

use std::any::Any;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput};
use tokio::runtime::Runtime;
use tokio::sync::watch;
use veil_benches::net::{self, NetError};
use veil_benches::relay::{DirectDevice, Received, RelayFleet, SimDevice, Tally};
use veil_benches::timing::{self, Plan};
use veil_benches::VEIL_BUILD;
use veil_protocol::trust::NodeId;
use veil_protocol::Suite;
use veil_relay::cloud::Cloud;
use veil_relay::gateway::Gateway;
use veil_transports::{Connection, DeliveryOptions, RoutedEndpoint, Transport};

/// A sensor reading, and a bulk chunk (a routed packet must fit one link packet: 16 KiB does).
const SIZES: [usize; 2] = [64, 16 * 1024];
/// The target for relayed ÷ direct.
const TARGET: f64 = 0.6;
/// Longest a transfer may take before the benchmark gives up (a lost message, not a slow one).
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(30);
/// The interleaved measurement under `cargo bench`.
const BENCH_PLAN: Plan = Plan { rounds: 15, batch: Duration::from_millis(60) };
/// Messages per device in the bytes-per-hop measurement: their ids stay below 128, so the
/// Data framing is the 4 B of spec §12.6.
const HOP_MESSAGES: u64 = 100;
/// The reading of spec §12.6.
const HOP_PAYLOAD: usize = 32;
/// A channel no other message used, so that message ids start at 0.
const HOP_CHANNEL: u16 = 9;

/// Messages per transfer (and the largest criterion batch).
fn messages(size: usize) -> u64 {
    if size <= 64 {
        4_096
    } else {
        256
    }
}

/// Messages in flight at most: 64 by default (the links' default send queue, so that the
/// gateway's uplink queue cannot overflow), or `VEIL_RELAY_WINDOW`.
fn window() -> u64 {
    std::env::var("VEIL_RELAY_WINDOW").ok().and_then(|w| w.parse().ok()).filter(|w| *w > 0).unwrap_or(64)
}

/// Messages per `send_many` call; 1 (the default): `send`, one message per call.
fn batch() -> u64 {
    std::env::var("VEIL_RELAY_BATCH").ok().and_then(|w| w.parse().ok()).filter(|w| *w > 0).unwrap_or(1)
}

/// The gateway uplink's suite: `uplink.suite`'s default (ChaChaPoly), or the Noise suite name in
/// `VEIL_RELAY_UPLINK_SUITE` (`25519_AESGCM_SHA256`, as servers with AES instructions use). The
/// devices keep ChaChaPoly on every path.
fn uplink_suite() -> Suite {
    let name = std::env::var("VEIL_RELAY_UPLINK_SUITE").unwrap_or_default();
    Suite::ALL.into_iter().find(|s| s.noise_name() == name).unwrap_or(Suite::ChaChaPolyBlake2s)
}

/// One way from a device to the cloud application.
struct Subject {
    name: &'static str,
    routed: RoutedEndpoint,
    cloud: NodeId,
    received: watch::Receiver<Received>,
    /// What the cloud should have from this device after the last transfer.
    expected: Received,
    /// The device's link (its stats).
    link: Connection,
    /// Keeps the device's endpoints.
    _device: Box<dyn Any + Send>,
}

impl Subject {
    fn relayed(name: &'static str, d: SimDevice, tally: &Tally) -> Self {
        let received = tally.watch(d.routed.node_id());
        Self {
            name,
            routed: d.routed.clone(),
            cloud: d.cloud,
            received,
            expected: Received::default(),
            link: d.link.clone(),
            _device: Box::new(d),
        }
    }

    fn direct(name: &'static str, d: DirectDevice, tally: &Tally) -> Self {
        let received = tally.watch(d.routed.node_id());
        Self {
            name,
            routed: d.routed.clone(),
            cloud: d.cloud,
            received,
            expected: Received::default(),
            link: d.link.clone(),
            _device: Box::new(d),
        }
    }

    /// Sends `count` copies of `payload` on `channel` with at most `window` in flight and
    /// waits until the cloud has them all; returns the time taken.
    async fn transfer(&mut self, count: u64, payload: Bytes, channel: u16, window: u64) -> Result<Duration, NetError> {
        let (routed, cloud, mut rx, base) = (self.routed.clone(), self.cloud, self.received.clone(), self.expected);
        let size = payload.len() as u64;
        let name = self.name;
        let task = tokio::spawn(async move {
            let start = Instant::now();
            let batch = batch().min(window);
            let run = async {
                let mut i = 0;
                while i < count {
                    let n = batch.min(count - i);
                    if i + n > window {
                        // At most `window` sent and not yet at the cloud.
                        let _ = rx.wait_for(|r| r.messages + window >= base.messages + i + n).await;
                    }
                    if n == 1 {
                        routed.send(&cloud, channel, payload.clone()).await?;
                    } else {
                        routed.send_many(&cloud, channel, (0..n).map(|_| payload.clone())).await?;
                    }
                    i += n;
                }
                let _ = rx.wait_for(|r| r.messages >= base.messages + count).await;
                Ok::<_, NetError>(())
            };
            match tokio::time::timeout(TRANSFER_TIMEOUT, run).await {
                Ok(r) => r?,
                Err(_) => {
                    let got = rx.borrow().messages - base.messages;
                    return Err(NetError::Broken(format!("{name}: the cloud has {got} of {count} messages")));
                }
            }
            let elapsed = start.elapsed();
            let r = *rx.borrow();
            if r.bytes - base.bytes != count * size || r.messages != base.messages + count {
                return Err(NetError::Broken(format!("{name}: the cloud got {r:?}, expected {count} × {size} B more")));
            }
            Ok(elapsed)
        });
        let elapsed = task.await??;
        self.expected.messages += count;
        self.expected.bytes += count * size;
        Ok(elapsed)
    }
}

/// The throughput subjects, in [`Rig::subjects`] order.
const RELAYED: usize = 0;
const DIRECT: usize = 1;
const RELAYED_ACKED: usize = 2;
const DIRECT_ACKED: usize = 3;
/// Which subjects are relayed (they have an uplink hop).
const IS_RELAYED: [bool; 4] = [true, false, true, false];
/// The ratios printed: (name, numerator, denominator, target).
const RATIOS: [(&str, usize, usize, Option<f64>); 3] = [
    ("relayed ÷ direct, best effort", RELAYED, DIRECT, Some(TARGET)),
    ("relayed ÷ direct, acked", RELAYED_ACKED, DIRECT_ACKED, Some(TARGET)),
    ("relayed acked ÷ relayed best effort", RELAYED_ACKED, RELAYED, None),
];

/// The delivery options of the acked subjects: the demo device's (auto-commit).
fn acked() -> Option<DeliveryOptions> {
    Some(DeliveryOptions { auto_commit: true, ..DeliveryOptions::default() })
}

/// The fleet, the roles and the devices, for the whole run.
struct Rig {
    rt: Runtime,
    cloud: Arc<Cloud>,
    gateway: Option<Gateway>,
    /// Throughput: relayed, direct, relayed acked, direct acked.
    subjects: Vec<Subject>,
    /// Bytes per hop: relayed over TCP, relayed over UDP, direct.
    hop_subjects: Vec<(Subject, Transport, bool)>,
    _fleet: RelayFleet,
}

impl Rig {
    fn start() -> Result<Self, NetError> {
        let rt = net::runtime()?;
        let fleet = RelayFleet::provision(7)?;
        let files = (0..fleet.devices()).map(|i| fleet.device(i)).collect::<Result<Vec<_>, _>>()?;
        let (cloud, gateway, subjects, hop_subjects) = rt.block_on(async {
            let cloud = Arc::new(Cloud::start(fleet.cloud_settings(64)?).await.map_err(broken)?);
            let tally = Tally::spawn(Arc::clone(&cloud));
            let cloud_addr = cloud.local_tcp_addr().ok_or_else(|| broken("the cloud has no TCP listener"))?;
            let config = fleet.write_gateway_config(cloud_addr, net::localhost(), 16)?;
            let mut settings = fleet.gateway_settings(&config)?;
            settings.uplink_suite = uplink_suite();
            let gateway = Gateway::start(settings).await.map_err(broken)?;
            let gw_tcp = gateway.local_tcp_addr().ok_or_else(|| broken("the gateway has no TCP listener"))?;
            let gw_udp = gateway.local_udp_addr().ok_or_else(|| broken("the gateway has no UDP socket"))?;
            let (gw_key, cloud_key) = (fleet.gateway_key, fleet.cloud_key);
            let sim = |i: usize, transport: Transport| {
                let addr: SocketAddr = if transport == Transport::Tcp { gw_tcp } else { gw_udp };
                SimDevice::connect(&files[i], transport, addr, gw_key, cloud_key)
            };
            let best_effort =
                |i: usize| SimDevice::connect_with(&files[i], Transport::Tcp, gw_tcp, gw_key, cloud_key, None);
            let subjects = vec![
                Subject::relayed("relayed", best_effort(0).await?, &tally),
                Subject::direct("direct", DirectDevice::connect(&files[1], cloud_addr, cloud_key, None).await?, &tally),
                Subject::relayed("relayed-acked", sim(5, Transport::Tcp).await?, &tally),
                Subject::direct(
                    "direct-acked",
                    DirectDevice::connect(&files[6], cloud_addr, cloud_key, acked()).await?,
                    &tally,
                ),
            ];
            let hop_subjects = vec![
                (
                    Subject::relayed("relayed, TCP device link", sim(2, Transport::Tcp).await?, &tally),
                    Transport::Tcp,
                    true,
                ),
                (
                    Subject::relayed("relayed, UDP device link", sim(3, Transport::Udp).await?, &tally),
                    Transport::Udp,
                    true,
                ),
                (
                    Subject::direct(
                        "direct, TCP",
                        DirectDevice::connect(&files[4], cloud_addr, cloud_key, None).await?,
                        &tally,
                    ),
                    Transport::Tcp,
                    false,
                ),
            ];
            Ok::<_, NetError>((cloud, gateway, subjects, hop_subjects))
        })?;
        Ok(Self { rt, cloud, gateway: Some(gateway), subjects, hop_subjects, _fleet: fleet })
    }

    fn transfer(&mut self, subject: usize, count: u64, payload: &Bytes, window: u64) -> Duration {
        let s = &mut self.subjects[subject];
        match self.rt.block_on(s.transfer(count, payload.clone(), 0, window)) {
            Ok(d) => d,
            Err(e) => {
                let gw = self.gateway.as_ref().map(Gateway::stats);
                panic!("{} transfer failed: {e}; gateway {gw:?}", s.name)
            }
        }
    }

    fn shutdown(mut self) {
        let (gateway, cloud) = (self.gateway.take(), Arc::clone(&self.cloud));
        self.rt.block_on(async move {
            if let Some(g) = gateway {
                g.shutdown(Duration::from_secs(2)).await;
            }
            cloud.shutdown(Duration::from_secs(2)).await;
        });
    }
}

fn broken(e: impl std::fmt::Display) -> NetError {
    NetError::Broken(e.to_string())
}

fn throughput(c: &mut Criterion, rig: &mut Rig) {
    let window = window();
    for size in SIZES {
        let payload = Bytes::from(vec![0xa5; size]);
        let batch = messages(size);
        let mut group = c.benchmark_group(format!("relay-{size}B"));
        group.throughput(if size <= 64 { Throughput::Elements(1) } else { Throughput::Bytes(size as u64) });
        for i in 0..rig.subjects.len() {
            let name = format!("{}-{VEIL_BUILD}", rig.subjects[i].name);
            group.bench_function(BenchmarkId::new(name, format!("window-{window}")), |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    let mut left = iters;
                    while left > 0 {
                        let n = left.min(batch);
                        total += rig.transfer(i, n, &payload, window);
                        left -= n;
                    }
                    total
                });
            });
        }
        group.finish();
    }
}

/// The ratios, timed interleaved.
fn ratios(rig: &mut Rig, plan: Plan) {
    let plan = if plan.is_measuring() { BENCH_PLAN } else { plan };
    let window = window();
    for size in SIZES {
        let payload = Bytes::from(vec![0xa5; size]);
        let count = if plan.is_measuring() { messages(size) } else { 8 };
        let n = rig.subjects.len();
        let rounds = {
            let rig = std::cell::RefCell::new(&mut *rig);
            let mut ops: Vec<Box<dyn FnMut() + '_>> = (0..n)
                .map(|i| {
                    let (rig, payload) = (&rig, payload.clone());
                    Box::new(move || {
                        rig.borrow_mut().transfer(i, count, &payload, window);
                    }) as Box<dyn FnMut()>
                })
                .collect();
            let mut refs: Vec<&mut dyn FnMut()> = ops.iter_mut().map(|o| &mut **o as &mut dyn FnMut()).collect();
            timing::interleave(plan, &mut refs)
        };
        if !plan.is_measuring() {
            continue;
        }
        println!(
            "\nDevice -> cloud, {size} B messages, {count} per transfer, at most {window} in flight, uplink {}, \
             interleaved over {} rounds of ~{} ms per subject; rates in each subject's fastest round, (m …) the \
             median of the per-round ratios:",
            uplink_suite(),
            plan.rounds,
            plan.batch.as_millis()
        );
        for (i, s) in rig.subjects.iter().enumerate() {
            let per_s = count as f64 * 1e9 / rounds.best_ns(i);
            println!(
                "  {:<13} {:>9.0} msg/s  {:>8.1} MB/s  (median {:.0} msg/s)",
                s.name,
                per_s,
                per_s * size as f64 / 1e6,
                count as f64 * 1e9 / rounds.median_ns(i)
            );
        }
        for (name, num, den, target) in RATIOS {
            let best = rounds.best_ns(den) / rounds.best_ns(num);
            let median = rounds.median_of(|r| r[den] / r[num]);
            let verdict = match target {
                Some(t) if best >= t => format!(", target ≥ {t} met"),
                Some(t) => format!(", target ≥ {t} MISSED"),
                None => String::new(),
            };
            println!("  {name} {best:.3} (m {median:.3}){verdict}");
        }
        cpu_per_message(rig, size, count, &payload, window);
    }
    if let Some(g) = rig.gateway.as_ref().filter(|_| plan.is_measuring()) {
        let s = g.stats();
        println!("  gateway: {} envelopes passed on, {} dropped", s.forwarded, s.dropped);
    }
}

/// CPU time per message of each subject (every thread of the process: device, gateway and
/// cloud share the runtime), and how many cores were busy: tells a path that waits from one
/// that computes.
fn cpu_per_message(rig: &mut Rig, size: usize, count: u64, payload: &Bytes, window: u64) {
    const TRANSFERS: u64 = 8;
    let mut per_message = Vec::new();
    for i in 0..rig.subjects.len() {
        let cpu = || match net::process_cpu_ns() {
            Ok(ns) => ns,
            Err(e) => panic!("CPU time: {e}"),
        };
        let uplink = |rig: &Rig| rig.gateway.as_ref().and_then(Gateway::uplink_stats).map_or(0, |s| s.packets_sent);
        let (link0, up0) = (rig.subjects[i].link.stats().packets_sent, uplink(rig));
        let (cpu0, start) = (cpu(), Instant::now());
        for _ in 0..TRANSFERS {
            rig.transfer(i, count, payload, window);
        }
        let (cpu_ns, wall) = ((cpu() - cpu0) as f64, start.elapsed().as_nanos() as f64);
        let n = (TRANSFERS * count) as f64;
        let (link, up) = (rig.subjects[i].link.stats().packets_sent - link0, uplink(rig) - up0);
        per_message.push(cpu_ns / n);
        let mut line = format!(
            "  {:<13} CPU {:>6.2} µs/message ({:.2} cores busy over {TRANSFERS} transfers); messages per packet: \
             device link {:.1}",
            rig.subjects[i].name,
            cpu_ns / n / 1e3,
            cpu_ns / wall,
            n / link.max(1) as f64
        );
        if IS_RELAYED.get(i).copied().unwrap_or(false) {
            line += &format!(", uplink {:.1}", n / up.max(1) as f64);
        }
        println!("{line}");
    }
    for (name, num, den, _) in RATIOS {
        if let (Some(a), Some(b)) = (per_message.get(num), per_message.get(den)) {
            println!("  CPU per message, {name}: {:.2}× ({size} B)", a / b);
        }
    }
}

/// Bytes on the wire per 32-B message at each hop: the hop devices on a fresh channel (message
/// ids from 0, as spec §12.6 counts), then the throughput devices on the channel they used,
/// whose message ids are by now large (their Data framing is longer, spec §12.4).
fn hop_bytes(rig: &mut Rig, plan: Plan) {
    let count = if plan.is_measuring() { HOP_MESSAGES } else { 4 };
    let Rig { rt, gateway, hop_subjects, subjects, .. } = rig;
    let mut lines = Vec::new();
    for (s, transport, relayed) in hop_subjects.iter_mut() {
        lines.push(hop_line(rt, gateway.as_ref(), s, *transport, *relayed, HOP_CHANNEL, count));
    }
    for (s, relayed) in subjects.iter_mut().zip(IS_RELAYED) {
        lines.push(hop_line(rt, gateway.as_ref(), s, Transport::Tcp, relayed, 0, count));
    }
    if !plan.is_measuring() {
        return;
    }
    println!(
        "\nBytes on the wire per {HOP_PAYLOAD}-B message, one message at a time ({count} per device), link packets \
         plus the 2-B TCP length prefix; spec §12.6 (message ids below 128): 78 B per TCP hop (46 B overhead, target \
         ≤ 48 B), 83 B on a UDP device link (51 B), direct 55 B (23 B):"
    );
    for l in lines {
        println!("{l}");
    }
}

/// Sends `count` 32-B messages from `s` on `channel`, one at a time, and describes the bytes
/// its link (and, relayed, the gateway's uplink) put on the wire per message.
fn hop_line(
    rt: &Runtime,
    gateway: Option<&Gateway>,
    s: &mut Subject,
    transport: Transport,
    relayed: bool,
    channel: u16,
    count: u64,
) -> String {
    let payload = Bytes::from(vec![0x5a; HOP_PAYLOAD]);
    let uplink = || gateway.and_then(Gateway::uplink_stats);
    let prefix = if transport == Transport::Tcp { 2 } else { 0 };
    // Every message a subject sent went on `channel` or on HOP_CHANNEL, never both.
    let first_id = if channel == HOP_CHANNEL { 0 } else { s.expected.messages };
    let (link0, up0) = (s.link.stats(), uplink());
    for _ in 0..count {
        // One at a time: each message waits until the cloud has the previous one.
        if let Err(e) = rt.block_on(s.transfer(1, payload.clone(), channel, 1)) {
            panic!("{}: {e}", s.name);
        }
    }
    let (link1, up1) = (s.link.stats(), uplink());
    let per = |bytes: u64, packets: u64, prefix: u64| (bytes + prefix * packets) as f64 / count as f64;
    let hop1 = per(link1.bytes_sent - link0.bytes_sent, link1.packets_sent - link0.packets_sent, prefix);
    let packets1 = (link1.packets_sent - link0.packets_sent) as f64 / count as f64;
    let mut line = format!(
        "  {:<26} ids {first_id}–{}: device link {hop1:>5.1} B ({:>4.1} B overhead, {packets1:.2} packets/message)",
        s.name,
        first_id + count - 1,
        hop1 - HOP_PAYLOAD as f64
    );
    if relayed {
        match (up0, up1) {
            (Some(u0), Some(u1)) => {
                let hop2 = per(u1.bytes_sent - u0.bytes_sent, u1.packets_sent - u0.packets_sent, 2);
                let packets2 = (u1.packets_sent - u0.packets_sent) as f64 / count as f64;
                line += &format!(
                    " | uplink (TCP) {hop2:>5.1} B ({:>4.1} B overhead, {packets2:.2} packets/message)",
                    hop2 - HOP_PAYLOAD as f64
                );
            }
            _ => line += " | uplink down",
        }
    }
    line
}

fn config() -> Criterion {
    Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3)).sample_size(10)
}

fn main() {
    let mut rig = match Rig::start() {
        Ok(r) => r,
        Err(e) => panic!("setup failed: {e}"),
    };
    let mut c = config().configure_from_args();
    throughput(&mut c, &mut rig);
    c.final_summary();
    // `None` for `--list` and profiler runs: criterion's part only.
    if let Some(plan) = Plan::from_args() {
        ratios(&mut rig, plan);
        hop_bytes(&mut rig, plan);
    }
    rig.shutdown();
}
