//! `veil-relay soak`: the fault-injection run of issue 6 against real processes.
//!
//! A fleet is provisioned in a temporary directory as for the demo; the cloud and the gateway
//! run as child processes of a `veil-relay` binary ([`SoakOptions::exe`], normally the current
//! executable) from configuration files written here, the gateway with a spool (spec §17.9)
//! and its uplink through a [`ChaosProxy`]. Simulated devices (in this process, with delivery,
//! spec §17) link to the gateway, some over UDP through a seeded [`LossyProxy`], and each sends
//! numbered readings on one channel at a steady rate. Meanwhile a seeded schedule injects
//! faults: uplink cuts, stalls and byte corruption, an uplink outage, `kill -9` of the gateway
//! and of the cloud, each restarted on the same configuration, spool and sink.
//!
//! At the end the devices stop sending, the run waits (bounded) until the sink holds every
//! accepted reading, and [`check`] reads the sink: each reading must be there exactly once,
//! in order per device and channel, with the content it was sent with. Delivery retransmits
//! what a full spool refused (`Unreachable { SpoolFull }`, spec §17.9), so a refusal is
//! counted but is no loss; devices send without a time to live, so nothing may expire.

use std::collections::HashMap;
use std::fmt;
use std::io::{Read, Seek, SeekFrom};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::task::JoinSet;
use veil_protocol::routing::RouteReason;
use veil_protocol::trust::{NodeId, RoleSet};
use veil_protocol::{Limits, PublicKey};
use veil_transports::chaos::{ChaosConfig, ChaosProxy, StreamFaults};
use veil_transports::fault::{Direction, LinkFaults, LossyProxy, ProxyConfig};
use veil_transports::{Authorizer, DeliveryOptions, Endpoint, NodeEvent, PeerRoles, RoutedEndpoint, Transport};

use crate::demo::{self, Fleet};
use crate::keyfile::{self, KeyKind};
use crate::metrics::{
    sample, sample_sum, scrape, ROUTING_DROPS, SPOOL_APPENDED, SPOOL_REFUSED, SPOOL_REPLAYED, UPLINK_UP,
};
use crate::sink::SinkLine;
use crate::trustload::DeviceFiles;

/// The channel the readings go on.
pub const CHANNEL: u16 = 3;
/// Bytes of a reading: send time (Unix µs), device, sequence number, 16 bytes derived from them.
pub const READING_LEN: usize = 32;

/// Which faults a run injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(clippy::struct_excessive_bools)]
pub struct Faults {
    /// Uplink noise: cuts, stalls and byte corruption at seeded moments.
    pub uplink_noise: bool,
    /// An uplink outage of this long (`None`: none).
    pub outage: Option<Duration>,
    /// `kill -9` of the gateway and a restart.
    pub kill_gateway: bool,
    /// `kill -9` of the cloud and a restart.
    pub kill_cloud: bool,
    /// Loss, reordering and duplication on the UDP devices' links.
    pub udp_loss: bool,
}

impl Faults {
    /// No fault at all.
    pub const NONE: Self =
        Self { uplink_noise: false, outage: None, kill_gateway: false, kill_cloud: false, udp_loss: false };
    /// The whole mix (the default of `veil-relay soak`).
    pub const ALL: Self = Self {
        uplink_noise: true,
        outage: Some(Duration::from_secs(4)),
        kill_gateway: true,
        kill_cloud: true,
        udp_loss: true,
    };
}

/// What a run does.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    /// The `veil-relay` binary that runs the cloud and the gateway.
    pub exe: PathBuf,
    /// Simulated devices.
    pub devices: usize,
    /// Every N-th device links over UDP (0: all over TCP).
    pub udp_every: usize,
    /// How long the devices send.
    pub duration: Duration,
    /// Readings per second per device.
    pub rate: f64,
    /// Seed of the fault schedule, the proxies and the readings' content.
    pub seed: u64,
    /// The faults.
    pub faults: Faults,
    /// When the faults happen, as fractions of `duration` (a kill or outage each); `None`
    /// lets the seed place them.
    pub at: Option<[f64; 3]>,
    /// `spool.max_bytes` of the gateway.
    pub spool_max_bytes: u64,
    /// `spool.max_bytes_per_device` of the gateway.
    pub spool_max_bytes_per_device: u64,
    /// End-to-end idle timeout of the devices: how soon they notice a cloud that died (it
    /// must exceed the uplink outage, which a session must live through).
    pub session_idle: Duration,
    /// How long the end waits for the sink to hold every accepted reading.
    pub drain: Duration,
    /// Print the schedule's events as they happen.
    pub verbose: bool,
    /// Keep the run's directory (logs, sink, spool) even when the run passes.
    pub keep: bool,
}

impl SoakOptions {
    /// The defaults of `veil-relay soak` with `exe` running the roles.
    #[must_use]
    pub fn new(exe: PathBuf) -> Self {
        Self {
            exe,
            devices: 100,
            udp_every: 5,
            duration: Duration::from_secs(60),
            rate: 5.0,
            seed: 1,
            faults: Faults::ALL,
            at: None,
            spool_max_bytes: 64 << 20,
            spool_max_bytes_per_device: 1 << 20,
            session_idle: Duration::from_secs(8),
            drain: Duration::from_secs(90),
            verbose: false,
            keep: false,
        }
    }
}

/// Why a run could not be carried out (as opposed to a run whose check failed).
#[derive(Debug, thiserror::Error)]
pub enum SoakError {
    /// Provisioning, a file, a port.
    #[error("setup: {0}")]
    Setup(String),
    /// A role process did not start.
    #[error("{0} did not start: {1}")]
    Start(&'static str, String),
}

// ---------------------------------------------------------------------------------------
// Readings

/// Bytes 16..32 of a reading: a function of the seed, the device and the sequence number,
/// so that a payload damaged or swapped anywhere on the way shows.
fn filler(seed: u64, device: u32, seq: u64) -> [u8; 16] {
    let mut x = seed ^ (u64::from(device) << 40) ^ seq.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut out = [0; 16];
    for chunk in out.chunks_mut(8) {
        // splitmix64
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        chunk.copy_from_slice(&(z ^ (z >> 31)).to_be_bytes());
    }
    out
}

fn unix_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// Reading `seq` of `device`, stamped `sent_us` (Unix µs).
#[must_use]
pub fn reading(seed: u64, device: u32, seq: u64, sent_us: u64) -> Bytes {
    let mut b = BytesMut::with_capacity(READING_LEN);
    b.put_u64(sent_us);
    b.put_u32(device);
    b.put_u32(u32::try_from(seq).unwrap_or(u32::MAX));
    b.put_slice(&filler(seed, device, seq));
    b.freeze()
}

/// Whether `payload` is reading `seq` of `device` (any send time); its send time if so.
#[must_use]
pub fn check_reading(seed: u64, device: u32, seq: u64, payload: &[u8]) -> Option<u64> {
    if payload.len() != READING_LEN {
        return None;
    }
    let sent = u64::from_be_bytes(payload[0..8].try_into().ok()?);
    let dev = u32::from_be_bytes(payload[8..12].try_into().ok()?);
    let s = u32::from_be_bytes(payload[12..16].try_into().ok()?);
    (dev == device && u64::from(s) == seq && payload[16..] == filler(seed, device, seq)).then_some(sent)
}

// ---------------------------------------------------------------------------------------
// The check

/// What one device had accepted for sending (its `send` returned `Ok`): readings `0..accepted`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    /// The device's node id as the sink writes it (hex).
    pub node: String,
    /// Its index (in the readings).
    pub index: u32,
    /// Readings accepted.
    pub accepted: u64,
}

/// The verdict of [`check`] on a sink.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Readings accepted by the devices.
    pub sent: u64,
    /// Distinct readings in the sink with the right content.
    pub delivered: u64,
    /// Lines repeating a `(device, channel, id)` already written.
    pub duplicated: u64,
    /// Accepted readings not in the sink.
    pub lost: u64,
    /// Lines whose id is below one already written for the device (out of order).
    pub reordered: u64,
    /// Lines whose payload is not the reading their id names.
    pub mismatched: u64,
    /// Lines from an unknown device, on another channel, or with an id never accepted.
    pub unexpected: u64,
    /// Latencies (sink receive time minus send time) of the delivered readings, sorted.
    pub latencies: Vec<Duration>,
    /// A few of the problems, for the report.
    pub examples: Vec<String>,
}

impl Verdict {
    /// No loss, duplicate, reordering, damage or stray line.
    #[must_use]
    pub fn passed(&self) -> bool {
        self.sent == self.delivered
            && self.duplicated == 0
            && self.lost == 0
            && self.reordered == 0
            && self.mismatched == 0
            && self.unexpected == 0
    }

    /// The `q`-quantile of the latencies.
    #[must_use]
    pub fn latency(&self, q: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
        let i = ((self.latencies.len() - 1) as f64 * q).round() as usize;
        self.latencies[i.min(self.latencies.len() - 1)]
    }

    fn note(&mut self, s: String) {
        if self.examples.len() < 10 {
            self.examples.push(s);
        }
    }
}

/// Checks the sink's message lines (in file order) against what the devices accepted: each
/// accepted reading exactly once, in order per device, with its content.
#[must_use]
pub fn check(seed: u64, sent: &[Sent], lines: &[SinkLine]) -> Verdict {
    let mut v = Verdict { sent: sent.iter().map(|s| s.accepted).sum(), ..Verdict::default() };
    let by_node: HashMap<&str, &Sent> = sent.iter().map(|s| (s.node.as_str(), s)).collect();
    // Per device: which ids were seen, and the highest.
    let mut seen: HashMap<&str, (Vec<bool>, Option<u64>)> = HashMap::new();
    for l in lines {
        let Some(s) = by_node.get(l.device.as_str()) else {
            v.unexpected += 1;
            v.note(format!("a line from an unknown device {}", l.device));
            continue;
        };
        if l.channel != CHANNEL || l.id >= s.accepted {
            v.unexpected += 1;
            v.note(format!("device {} channel {} id {}: never sent", s.index, l.channel, l.id));
            continue;
        }
        let (ids, highest) = seen
            .entry(s.node.as_str())
            .or_insert_with(|| (vec![false; usize::try_from(s.accepted).unwrap_or(0)], None));
        let Ok(i) = usize::try_from(l.id) else { continue };
        if ids[i] {
            v.duplicated += 1;
            v.note(format!("device {} id {}: written again", s.index, l.id));
            continue;
        }
        if highest.is_some_and(|h| l.id < h) {
            v.reordered += 1;
            v.note(format!("device {} id {}: after id {}", s.index, l.id, highest.unwrap_or(0)));
        }
        *highest = Some(highest.map_or(l.id, |h| h.max(l.id)));
        let Some(sent_us) = check_reading(seed, s.index, l.id, &l.payload) else {
            v.mismatched += 1;
            v.note(format!("device {} id {}: payload is not the reading sent", s.index, l.id));
            continue;
        };
        ids[i] = true;
        v.delivered += 1;
        v.latencies.push(Duration::from_micros(l.received_at_ms.saturating_mul(1_000).saturating_sub(sent_us)));
    }
    for s in sent {
        let got = seen.get(s.node.as_str()).map_or(0, |(ids, _)| ids.iter().filter(|b| **b).count() as u64);
        let missing = s.accepted - got.min(s.accepted);
        if missing > 0 {
            v.lost += missing;
            let first = seen.get(s.node.as_str()).and_then(|(ids, _)| ids.iter().position(|b| !*b)).unwrap_or(0);
            v.note(format!("device {}: {missing} of {} readings missing (first: id {first})", s.index, s.accepted));
        }
    }
    v.latencies.sort_unstable();
    v
}

// ---------------------------------------------------------------------------------------
// The report

/// What a run measured.
#[derive(Debug, Clone)]
pub struct SoakReport {
    /// The seed.
    pub seed: u64,
    /// Devices, and how many of them linked over UDP.
    pub devices: usize,
    /// Devices over UDP.
    pub udp_devices: usize,
    /// The schedule as it ran: (seconds since the start, what).
    pub events: Vec<(f64, String)>,
    /// The check of the sink.
    pub verdict: Verdict,
    /// Packets the gateway's spool refused (all its runs), each sent again by its device.
    pub refused: u64,
    /// Packets stored in the spool (all the gateway's runs).
    pub spooled: u64,
    /// Packets replayed from the spool.
    pub replayed: u64,
    /// `Unreachable { SpoolFull }` notices the devices received.
    pub spool_full_notices: u64,
    /// Messages the devices reported expired (must be 0: no time to live is set).
    pub expired: u64,
    /// Delivery retransmissions by the devices.
    pub retransmissions: u64,
    /// Sends that waited for room in the window (backpressure).
    pub window_waits: u64,
    /// Routes the devices were announced again after an `Unreachable` (spec §17.4 rule 4:
    /// what was in flight went again at once).
    pub routes_back: u64,
    /// Acknowledgement requests the devices sent for messages in custody (spec §17.9).
    pub ack_requests: u64,
    /// Messages in the gateway's custody that the devices found lost (spec §17.9: a later one
    /// was acknowledged) and sent again.
    pub custody_lost: u64,
    /// End-to-end sessions with the cloud that ended and were opened again (a cloud restart,
    /// or an idle timeout while the uplink was down).
    pub sessions_closed: u64,
    /// Of them, sessions the devices ended because nothing came back within the route-back
    /// timeout after the uplink's return (spec §17.4 rule 6: the cloud had restarted).
    pub route_back_timeouts: u64,
    /// Device packets for the cloud the gateway dropped (all its runs): its uplink queue
    /// full (`Congested`), and the uplink down with no spool room (`UplinkDown`); the devices
    /// send them again.
    pub gateway_drops: (u64, u64),
    /// Datagrams the UDP proxy dropped, sent twice, and reordered (both directions).
    pub udp_faults: (u64, u64, u64),
    /// How long the end waited for the sink to hold everything.
    pub drain: Duration,
    /// Whether the drain ended because everything was there (not the bound).
    pub drained: bool,
    /// The run's directory was kept here (a failed run).
    pub kept: Option<PathBuf>,
}

impl SoakReport {
    /// Every check held.
    #[must_use]
    pub fn passed(&self) -> bool {
        self.verdict.passed() && self.expired == 0 && self.drained
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl fmt::Display for SoakReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = &self.verdict;
        writeln!(f, "soak: seed {}, {} devices ({} over UDP)", self.seed, self.devices, self.udp_devices)?;
        for (t, e) in &self.events {
            writeln!(f, "  {t:7.2} s  {e}")?;
        }
        writeln!(
            f,
            "sent {}  delivered {}  duplicated {}  lost {}  reordered {}  mismatched {}  unexpected {}",
            v.sent, v.delivered, v.duplicated, v.lost, v.reordered, v.mismatched, v.unexpected
        )?;
        writeln!(
            f,
            "refused {} (spool full, each sent again by its device; {} notices)  expired {}",
            self.refused, self.spool_full_notices, self.expired
        )?;
        writeln!(
            f,
            "spool: stored {}, replayed {}; devices: {} retransmissions, {} sends waited for the window",
            self.spooled, self.replayed, self.retransmissions, self.window_waits
        )?;
        writeln!(
            f,
            "gateway dropped {} (uplink queue full) and {} (uplink down); devices: {} routes back, {} \
             acknowledgement requests, {} custody messages found lost, {} end-to-end sessions ended and opened \
             again ({} after a route back without an answer)",
            self.gateway_drops.0,
            self.gateway_drops.1,
            self.routes_back,
            self.ack_requests,
            self.custody_lost,
            self.sessions_closed,
            self.route_back_timeouts
        )?;
        writeln!(
            f,
            "UDP links: {} datagrams lost, {} duplicated, {} reordered by the proxy",
            self.udp_faults.0, self.udp_faults.1, self.udp_faults.2
        )?;
        writeln!(
            f,
            "latency (send to sink): p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
            ms(v.latency(0.5)),
            ms(v.latency(0.99)),
            ms(v.latencies.last().copied().unwrap_or_default())
        )?;
        writeln!(
            f,
            "drain: {:.1} s{}",
            self.drain.as_secs_f64(),
            if self.drained { "" } else { " (bound reached: readings still missing)" }
        )?;
        for e in &v.examples {
            writeln!(f, "  problem: {e}")?;
        }
        if let Some(k) = &self.kept {
            writeln!(f, "files kept in {}", k.display())?;
        }
        write!(f, "result: {}", if self.passed() { "PASS" } else { "FAIL" })
    }
}

// ---------------------------------------------------------------------------------------
// Processes

fn free_tcp() -> Result<SocketAddr, SoakError> {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(|e| SoakError::Setup(format!("a port: {e}")))
}

fn free_udp() -> Result<SocketAddr, SoakError> {
    UdpSocket::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(|e| SoakError::Setup(format!("a port: {e}")))
}

fn toml_path(p: &Path) -> String {
    // A string of TOML: Debug quoting escapes quotes and backslashes as TOML's basic strings do.
    format!("{:?}", p.display().to_string())
}

/// A role process (`cloud` or `gateway`), killed with SIGKILL and reaped on drop.
struct RoleProc {
    name: &'static str,
    exe: PathBuf,
    config: PathBuf,
    dir: PathBuf,
    child: Option<Child>,
    /// What tells that it is up: its listener accepts.
    ready: SocketAddr,
}

impl RoleProc {
    fn spawn(&mut self) -> Result<(), SoakError> {
        let open = |ext: &str| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.join(format!("{}.{ext}", self.name)))
                .map_err(|e| SoakError::Setup(e.to_string()))
        };
        let child = Command::new(&self.exe)
            .arg(self.name)
            .arg("--config")
            .arg(&self.config)
            .current_dir(&self.dir)
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::from(open("stdout")?))
            .stderr(Stdio::from(open("log")?))
            .spawn()
            .map_err(|e| SoakError::Start(self.name, format!("{}: {e}", self.exe.display())))?;
        self.child = Some(child);
        Ok(())
    }

    /// Starts it and waits (at most 20 s) until its listener accepts.
    async fn start(&mut self) -> Result<(), SoakError> {
        self.spawn()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                return Err(SoakError::Start(self.name, format!("exited ({status}); see {}", self.log().display())));
            }
            if tokio::net::TcpStream::connect(self.ready).await.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(SoakError::Start(self.name, "not listening within 20 s".into()));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGKILL, and a start on the same configuration (ports, spool, sink).
    async fn restart(&mut self) -> Result<(), SoakError> {
        self.kill();
        let mut last = None;
        for _ in 0..3 {
            match self.start().await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        Err(last.unwrap_or(SoakError::Start(self.name, "no attempt".into())))
    }

    fn log(&self) -> PathBuf {
        self.dir.join(format!("{}.log", self.name))
    }
}

impl Drop for RoleProc {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Ports {
    cloud_tcp: SocketAddr,
    cloud_metrics: SocketAddr,
    gw_tcp: SocketAddr,
    gw_udp: SocketAddr,
    gw_metrics: SocketAddr,
}

/// The roles' keepalive: below the devices' idle timeouts (5 s on links, `session_idle` on
/// end-to-end sessions), so that a quiet moment of the cloud or the gateway does not look like
/// a dead peer to a device (spec §7.5).
const SOAK_KEEPALIVE_MS: u64 = 2_000;

fn write_configs(
    fleet: &Fleet,
    opts: &SoakOptions,
    ports: &Ports,
    uplink: SocketAddr,
) -> Result<(PathBuf, PathBuf), SoakError> {
    let d = &fleet.dir;
    let ca = toml_path(&fleet.ca_pub);
    let crl = toml_path(&d.join("ca").join(crate::tooling::CA_CRL));
    let cloud = format!(
        "role = \"cloud\"\n\n[node]\nkey = {key}\ncertificate = {cert}\n\n[trust]\nmode = \"ca\"\nca = {ca}\ncrl = {crl}\n\n\
         [listen]\ntcp = \"{tcp}\"\n\n[limits]\nkeepalive_ms = {keepalive}\n\n[sink]\nkind = \"file\"\npath = {sink}\n\n[metrics]\nlisten = \"{metrics}\"\n\n\
         [log]\nlevel = \"warn\"\n",
        key = toml_path(&d.join("cloud.key")),
        cert = toml_path(&d.join("cloud.cert")),
        tcp = ports.cloud_tcp,
        sink = toml_path(&d.join("messages.jsonl")),
        metrics = ports.cloud_metrics,
        keepalive = SOAK_KEEPALIVE_MS,
    );
    let gateway = format!(
        "role = \"gateway\"\n\n[node]\nkey = {key}\ncertificate = {cert}\n\n[trust]\nmode = \"ca\"\nca = {ca}\ncrl = {crl}\n\n\
         [listen]\ntcp = \"{tcp}\"\nudp = \"{udp}\"\n\n\
         [uplink]\naddress = \"{uplink}\"\ncloud_key = {cloud_key}\nbackoff_initial_ms = 50\nbackoff_max_ms = 500\n\n\
         [limits]\nkeepalive_ms = {keepalive}\n\n\
         [spool]\npath = {spool}\nmax_bytes = {max}\nmax_bytes_per_device = {per}\n\n\
         [metrics]\nlisten = \"{metrics}\"\n\n[log]\nlevel = \"warn\"\n",
        key = toml_path(&d.join("gateway.key")),
        cert = toml_path(&d.join("gateway.cert")),
        tcp = ports.gw_tcp,
        udp = ports.gw_udp,
        cloud_key = toml_path(&fleet.cloud_pub),
        spool = toml_path(&d.join("spool.redb")),
        max = opts.spool_max_bytes,
        per = opts.spool_max_bytes_per_device,
        metrics = ports.gw_metrics,
        keepalive = SOAK_KEEPALIVE_MS,
    );
    let (c, g) = (d.join("cloud-soak.toml"), d.join("gateway-soak.toml"));
    std::fs::write(&c, cloud).map_err(|e| SoakError::Setup(e.to_string()))?;
    std::fs::write(&g, gateway).map_err(|e| SoakError::Setup(e.to_string()))?;
    Ok((c, g))
}

// ---------------------------------------------------------------------------------------
// Devices

/// What the devices count together.
#[derive(Debug, Default)]
struct DeviceCounters {
    spool_full: AtomicU64,
    expired: AtomicU64,
    /// End-to-end sessions with the cloud that ended (each opened again).
    sessions_closed: AtomicU64,
}

struct Device {
    index: u32,
    files: DeviceFiles,
    transport: Transport,
    gateway: SocketAddr,
    gateway_key: PublicKey,
    cloud_key: PublicKey,
    link_limits: Limits,
    session_limits: Limits,
}

/// A running device: its end-to-end endpoint and the number of readings it had accepted.
struct Running {
    routed: RoutedEndpoint,
    endpoint: Endpoint,
    accepted: Arc<AtomicU64>,
    /// A `send` is under way (it may still be accepted).
    busy: Arc<AtomicBool>,
    tasks: JoinSet<()>,
}

impl Device {
    async fn start(
        self,
        seed: u64,
        interval: Duration,
        sending: Arc<AtomicBool>,
        counters: Arc<DeviceCounters>,
    ) -> Result<Running, veil_transports::Error> {
        let roles = PeerRoles::new(RoleSet::NONE, RoleSet::UPSTREAM);
        let mut b = Endpoint::builder(self.files.identity.clone())
            .authorizer(Authorizer::trust(self.files.trust.clone(), roles))
            .certificate_chain(&self.files.certificate_chain)
            .protocol_limits(self.link_limits)
            .routing(true);
        if self.transport == Transport::Udp {
            b = b.bind_udp(SocketAddr::from(([127, 0, 0, 1], 0)));
        }
        let endpoint = b.bind().await?;
        let routed = RoutedEndpoint::builder(self.files.identity.clone())
            .authorizer(Authorizer::trust(self.files.trust.clone(), PeerRoles::new(RoleSet::NONE, RoleSet::CLOUD)))
            .certificate_chain(&self.files.certificate_chain)
            .protocol_limits(self.session_limits)
            .delivery(DeliveryOptions { auto_commit: true, ..DeliveryOptions::default() })
            .build()?;
        let cloud = NodeId::from_public_key(&self.cloud_key);
        let accepted = Arc::new(AtomicU64::new(0));
        let busy = Arc::new(AtomicBool::new(false));
        let mut tasks = JoinSet::new();
        // The link: linked again whenever it ends (a gateway restart), with a short pause.
        {
            let (endpoint, routed) = (endpoint.clone(), routed.clone());
            let (transport, gateway, key) = (self.transport, self.gateway, self.gateway_key);
            tasks.spawn(async move {
                loop {
                    match endpoint.connect_expecting(transport, gateway, Some(key), RoleSet::GATEWAY).await {
                        Ok(link) => {
                            routed.add_relay_link(link.clone());
                            let _ = link.closed().await;
                        }
                        Err(veil_transports::Error::EndpointClosed) => return,
                        Err(e) => tracing::debug!(error = %e, "device link failed"),
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
        }
        // The session: opened, and opened again whenever it ends (a cloud restart).
        {
            let routed = routed.clone();
            let cloud_key = self.cloud_key;
            tasks.spawn(async move {
                let mut connect = true;
                loop {
                    if connect {
                        match tokio::time::timeout(Duration::from_secs(15), routed.connect(cloud_key)).await {
                            Ok(Ok(_)) => connect = false,
                            Ok(Err(veil_transports::Error::EndpointClosed)) => return,
                            _ => {
                                tokio::time::sleep(Duration::from_millis(200)).await;
                                continue;
                            }
                        }
                    }
                    match tokio::time::timeout(Duration::from_millis(500), routed.next_event()).await {
                        Err(_) => {}
                        Ok(Err(_)) => return,
                        Ok(Ok(NodeEvent::Closed { node, outcome, .. })) if node == cloud => {
                            tracing::debug!(%node, %outcome, "end-to-end session closed, opening another");
                            counters.sessions_closed.fetch_add(1, Ordering::Relaxed);
                            connect = true;
                        }
                        Ok(Ok(NodeEvent::Unreachable { reason: RouteReason::SpoolFull, .. })) => {
                            counters.spool_full.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Ok(NodeEvent::Expired { .. })) => {
                            counters.expired.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Ok(_)) => {}
                    }
                }
            });
        }
        // The readings. `send` waits while the window is full (backpressure); it returns once
        // the reading has its id, and only then is it counted as accepted.
        {
            let (routed, accepted, busy) = (routed.clone(), Arc::clone(&accepted), Arc::clone(&busy));
            let index = self.index;
            tasks.spawn(async move {
                let mut tick = tokio::time::interval(interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                // Spread the devices over the interval.
                let phase = interval.mul_f64(f64::from(index % 97) / 97.0);
                tokio::time::sleep(phase).await;
                let mut seq = 0u64;
                while sending.load(Ordering::SeqCst) {
                    tick.tick().await;
                    busy.store(true, Ordering::SeqCst);
                    if !sending.load(Ordering::SeqCst) {
                        busy.store(false, Ordering::SeqCst);
                        break;
                    }
                    let sent = routed.send(&cloud, CHANNEL, reading(seed, index, seq, unix_us())).await;
                    busy.store(false, Ordering::SeqCst);
                    match sent {
                        Ok(()) => {
                            seq += 1;
                            accepted.store(seq, Ordering::Relaxed);
                        }
                        Err(veil_transports::Error::EndpointClosed) => return,
                        Err(e) => tracing::warn!(device = index, error = %e, "send refused"),
                    }
                }
            });
        }
        Ok(Running { routed, endpoint, accepted, busy, tasks })
    }
}

// ---------------------------------------------------------------------------------------
// The sink, followed

/// Reads the sink as it grows (complete lines only) and counts, per device, the distinct
/// readings it holds.
struct Follow {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
    index: HashMap<String, usize>,
    have: Vec<std::collections::HashSet<u64>>,
}

impl Follow {
    fn new(path: PathBuf, nodes: &[String]) -> Self {
        let index = nodes.iter().enumerate().map(|(i, n)| (n.clone(), i)).collect();
        Self { path, offset: 0, partial: Vec::new(), index, have: vec![Default::default(); nodes.len()] }
    }

    fn poll(&mut self) {
        let Ok(mut f) = std::fs::File::open(&self.path) else { return };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut buf = Vec::new();
        let Ok(n) = f.read_to_end(&mut buf) else { return };
        self.offset += n as u64;
        self.partial.extend_from_slice(&buf);
        let Some(end) = self.partial.iter().rposition(|b| *b == b'\n') else { return };
        let complete: Vec<u8> = self.partial.drain(..=end).collect();
        for line in complete.split(|b| *b == b'\n') {
            if let Some(l) = SinkLine::parse(line) {
                if let Some(&i) = self.index.get(&l.device) {
                    self.have[i].insert(l.id);
                }
            }
        }
    }

    /// Devices whose sink count is below what they accepted.
    fn missing(&self, accepted: &[u64]) -> usize {
        self.have.iter().zip(accepted).filter(|(h, a)| (h.len() as u64) < **a).count()
    }
}

// ---------------------------------------------------------------------------------------
// The schedule

#[derive(Debug, Clone, Copy, PartialEq)]
enum Action {
    Cut,
    Stall,
    Corrupt,
    Outage(Duration),
    KillGateway,
    KillCloud,
}

/// The seeded schedule: (seconds since the start, action), in time order.
fn schedule(opts: &SoakOptions, rng: &mut StdRng) -> Vec<(f64, Action)> {
    let d = opts.duration.as_secs_f64();
    let mut majors = Vec::new();
    if let Some(o) = opts.faults.outage {
        majors.push(Action::Outage(o));
    }
    if opts.faults.kill_gateway {
        majors.push(Action::KillGateway);
    }
    if opts.faults.kill_cloud {
        majors.push(Action::KillCloud);
    }
    // The major events in a seeded order, in slots spread over the run.
    for i in (1..majors.len()).rev() {
        majors.swap(i, rng.gen_range(0..=i));
    }
    let mut out = Vec::new();
    let n = majors.len();
    for (i, a) in majors.into_iter().enumerate() {
        #[allow(clippy::cast_precision_loss)]
        let slot = opts
            .at
            .map_or_else(|| (i as f64 + 0.5 + rng.gen_range(-0.2..0.2)) / n as f64 * 0.8 + 0.05, |at| at[i.min(2)]);
        out.push((slot * d, a));
    }
    if opts.faults.uplink_noise {
        let mut t = rng.gen_range(1.0..3.0);
        while t < d * 0.9 {
            let a = match rng.gen_range(0..3) {
                0 => Action::Cut,
                1 => Action::Stall,
                _ => Action::Corrupt,
            };
            out.push((t, a));
            t += rng.gen_range(2.0..5.0);
        }
    }
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

// ---------------------------------------------------------------------------------------
// The run

/// Gateway counters, added up across its restarts.
#[derive(Debug, Default, Clone, Copy)]
struct GatewayTotals {
    refused: f64,
    appended: f64,
    replayed: f64,
    /// Device packets for the cloud dropped: the uplink's queue full, or the uplink down
    /// (with no room to store).
    congested: f64,
    uplink_down: f64,
}

async fn gateway_counts(metrics: SocketAddr) -> Option<GatewayTotals> {
    let body = scrape(metrics).await?;
    let drops = |reason| sample(&body, ROUTING_DROPS, &[("reason", reason)]).unwrap_or(0.0);
    Some(GatewayTotals {
        refused: sample_sum(&body, SPOOL_REFUSED),
        appended: sample_sum(&body, SPOOL_APPENDED),
        replayed: sample_sum(&body, SPOOL_REPLAYED),
        congested: drops("congested"),
        uplink_down: drops("uplink_down"),
    })
}

fn add(a: GatewayTotals, b: GatewayTotals) -> GatewayTotals {
    GatewayTotals {
        refused: a.refused + b.refused,
        appended: a.appended + b.appended,
        replayed: a.replayed + b.replayed,
        congested: a.congested + b.congested,
        uplink_down: a.uplink_down + b.uplink_down,
    }
}

#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn count(x: f64) -> u64 {
    x.max(0.0) as u64
}

/// Runs the soak; the report says whether every check held.
///
/// # Errors
/// The run could not be set up or a role did not start ([`SoakError`]); a failed check is a
/// report that did not pass.
#[allow(clippy::too_many_lines)]
pub async fn run(opts: &SoakOptions) -> Result<SoakReport, SoakError> {
    if opts.devices == 0 || !opts.rate.is_finite() || opts.rate <= 0.0 {
        return Err(SoakError::Setup("at least one device and a rate above 0".into()));
    }
    let tmp = tempfile::Builder::new().prefix("veil-soak-").tempdir().map_err(|e| SoakError::Setup(e.to_string()))?;
    let fleet = demo::provision(tmp.path(), opts.devices).map_err(|e| SoakError::Setup(e.to_string()))?;
    let read_pub = |p: &Path| {
        keyfile::read_key(p, KeyKind::NodePublic).map(|k| PublicKey(*k)).map_err(|e| SoakError::Setup(e.to_string()))
    };
    let (cloud_key, gateway_key) = (read_pub(&fleet.cloud_pub)?, read_pub(&fleet.gateway_pub)?);
    let mut rng = StdRng::seed_from_u64(opts.seed);

    // The cloud, the uplink proxy, the gateway (first starts: new ports if one was taken).
    let mut attempt = 0;
    let (mut cloud, proxy, mut gateway, ports) = loop {
        attempt += 1;
        let ports = Ports {
            cloud_tcp: free_tcp()?,
            cloud_metrics: free_tcp()?,
            gw_tcp: free_tcp()?,
            gw_udp: free_udp()?,
            gw_metrics: free_tcp()?,
        };
        let proxy =
            ChaosProxy::start(SocketAddr::from(([127, 0, 0, 1], 0)), ports.cloud_tcp, ChaosConfig::new(opts.seed))
                .await
                .map_err(|e| SoakError::Setup(format!("uplink proxy: {e}")))?;
        let (cloud_config, gw_config) = write_configs(&fleet, opts, &ports, proxy.local_addr())?;
        let dir = fleet.dir.clone();
        let mut cloud = RoleProc {
            name: "cloud",
            exe: opts.exe.clone(),
            config: cloud_config,
            dir: dir.clone(),
            child: None,
            ready: ports.cloud_tcp,
        };
        let mut gateway = RoleProc {
            name: "gateway",
            exe: opts.exe.clone(),
            config: gw_config,
            dir,
            child: None,
            ready: ports.gw_tcp,
        };
        let started = match cloud.start().await {
            Ok(()) => gateway.start().await,
            Err(e) => Err(e),
        };
        match started {
            Ok(()) => break (cloud, proxy, gateway, ports),
            Err(e) if attempt >= 3 => return Err(e),
            Err(_) => drop(proxy.shutdown().await),
        }
    };
    // The gateway's uplink is up before the devices come.
    let up = Instant::now();
    while scrape(ports.gw_metrics).await.and_then(|b| sample(&b, UPLINK_UP, &[])) != Some(1.0) {
        if up.elapsed() > Duration::from_secs(20) {
            return Err(SoakError::Start("gateway", "its uplink did not come up within 20 s".into()));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    // UDP devices through the lossy proxy.
    let udp_faults = if opts.faults.udp_loss {
        LinkFaults::new().loss(0.03).reorder(0.05).reorder_delay(Duration::from_millis(20)).duplicate(0.03)
    } else {
        LinkFaults::new()
    };
    let lossy = LossyProxy::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        ports.gw_udp,
        ProxyConfig::symmetric(opts.seed, udp_faults).max_clients(opts.devices.max(16)),
    )
    .await
    .map_err(|e| SoakError::Setup(format!("UDP proxy: {e}")))?;

    let link_limits = Limits {
        keepalive_interval: Duration::from_secs(1).into(),
        idle_timeout: Duration::from_secs(5).into(),
        ..Limits::default()
    };
    let session_limits = Limits {
        keepalive_interval: Duration::from_secs(1).into(),
        idle_timeout: opts.session_idle.into(),
        ..Limits::default()
    };
    let sending = Arc::new(AtomicBool::new(true));
    let counters = Arc::new(DeviceCounters::default());
    let interval = Duration::from_secs_f64(1.0 / opts.rate);
    let mut devices = Vec::with_capacity(opts.devices);
    let mut nodes = Vec::with_capacity(opts.devices);
    let mut udp_devices = 0;
    let t0 = Instant::now();
    for (i, (key, cert)) in fleet.devices.iter().enumerate() {
        let files = DeviceFiles::load(key, cert, &fleet.ca_pub).map_err(|e| SoakError::Setup(e.to_string()))?;
        nodes.push(NodeId::from_public_key(files.identity.public()).to_string());
        let udp = opts.udp_every > 0 && i % opts.udp_every == opts.udp_every - 1;
        udp_devices += usize::from(udp);
        let d = Device {
            index: u32::try_from(i).unwrap_or(u32::MAX),
            files,
            transport: if udp { Transport::Udp } else { Transport::Tcp },
            gateway: if udp { lossy.local_addr() } else { ports.gw_tcp },
            gateway_key,
            cloud_key,
            link_limits,
            session_limits,
        };
        let r = d
            .start(opts.seed, interval, Arc::clone(&sending), Arc::clone(&counters))
            .await
            .map_err(|e| SoakError::Setup(format!("device {i}: {e}")))?;
        devices.push(r);
    }

    // The schedule.
    let plan = schedule(opts, &mut rng);
    let mut events = Vec::new();
    let mut totals = GatewayTotals::default();
    let log = |events: &mut Vec<(f64, String)>, what: String| {
        let t = t0.elapsed().as_secs_f64();
        if opts.verbose {
            println!("  {t:7.2} s  {what}");
        }
        events.push((t, what));
    };
    let end = tokio::time::Instant::from_std(t0) + opts.duration;
    for (at, action) in plan {
        tokio::time::sleep_until(tokio::time::Instant::from_std(t0) + Duration::from_secs_f64(at)).await;
        if tokio::time::Instant::now() >= end {
            break;
        }
        match action {
            Action::Cut => {
                proxy.cut_all();
                log(&mut events, "uplink cut".into());
            }
            Action::Stall | Action::Corrupt => {
                let (faults, what, hold) = if action == Action::Stall {
                    (StreamFaults::new().stall(0.2, Duration::from_millis(400)), "uplink stalls", 2_000u32)
                } else {
                    (StreamFaults::new().corrupt(0.05), "uplink byte corruption", 1_000)
                };
                let set = |f| {
                    proxy.set_faults(Direction::ToServer, f).and_then(|()| proxy.set_faults(Direction::ToClient, f))
                };
                set(faults).map_err(|e| SoakError::Setup(e.to_string()))?;
                log(&mut events, format!("{what} for {:.1} s", f64::from(hold) / 1e3));
                tokio::time::sleep(Duration::from_millis(u64::from(hold))).await;
                set(StreamFaults::new()).map_err(|e| SoakError::Setup(e.to_string()))?;
            }
            Action::Outage(d) => {
                proxy.set_down(true);
                log(&mut events, format!("uplink outage of {:.1} s begins", d.as_secs_f64()));
                tokio::time::sleep(d).await;
                proxy.set_down(false);
                log(&mut events, "uplink outage ends".into());
            }
            Action::KillGateway => {
                if let Some(c) = gateway_counts(ports.gw_metrics).await {
                    totals = add(totals, c);
                }
                gateway.restart().await?;
                log(&mut events, "gateway killed (SIGKILL) and restarted".into());
            }
            Action::KillCloud => {
                cloud.restart().await?;
                log(&mut events, "cloud killed (SIGKILL) and restarted".into());
            }
        }
    }
    tokio::time::sleep_until(end).await;
    sending.store(false, Ordering::SeqCst);
    log(&mut events, "devices stop sending".into());

    // Drain: wait until the sink holds every accepted reading (bounded).
    let drain_start = Instant::now();
    let mut follow = Follow::new(fleet.dir.join("messages.jsonl"), &nodes);
    // A send blocked on a full window finishes once the window moves; give it the drain.
    let accepted = |devices: &[Running]| devices.iter().map(|d| d.accepted.load(Ordering::Relaxed)).collect::<Vec<_>>();
    let drained = loop {
        // No send still under way (it could yet be accepted), and every accepted reading in.
        let idle = devices.iter().all(|d| !d.busy.load(Ordering::SeqCst));
        follow.poll();
        if idle && follow.missing(&accepted(&devices)) == 0 {
            break true;
        }
        if drain_start.elapsed() > opts.drain {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let drain = drain_start.elapsed();
    log(&mut events, format!("sink complete after {:.1} s", drain.as_secs_f64()));
    // Anything written twice would show within the acknowledgement delays: wait past them.
    tokio::time::sleep(Duration::from_secs(1)).await;

    if let Some(c) = gateway_counts(ports.gw_metrics).await {
        totals = add(totals, c);
    }
    let accepted = accepted(&devices);
    let (mut retransmissions, mut window_waits, mut routes_back, mut ack_requests) = (0, 0, 0, 0);
    let (mut custody_lost, mut route_back_timeouts) = (0, 0);
    for d in &mut devices {
        let s = d.routed.stats();
        retransmissions += s.retransmissions;
        window_waits += s.window_waits;
        routes_back += s.routes_back;
        ack_requests += s.ack_requests;
        custody_lost += s.custody_lost;
        route_back_timeouts += s.route_back_timeouts;
        d.routed.close();
        d.endpoint.close();
        d.tasks.abort_all();
    }
    let sent: Vec<Sent> = nodes
        .iter()
        .zip(&accepted)
        .enumerate()
        .map(|(i, (n, a))| Sent { node: n.clone(), index: u32::try_from(i).unwrap_or(u32::MAX), accepted: *a })
        .collect();
    let lines =
        crate::sink::read_lines(&fleet.dir.join("messages.jsonl")).map_err(|e| SoakError::Setup(e.to_string()))?;
    let verdict = check(opts.seed, &sent, &lines);
    gateway.kill();
    cloud.kill();
    let _ = proxy.shutdown().await;
    let u = lossy.shutdown().await;
    let udp_faults = (
        u.to_server.lost + u.to_client.lost,
        u.to_server.duplicated + u.to_client.duplicated,
        u.to_server.reordered + u.to_client.reordered,
    );
    let mut report = SoakReport {
        seed: opts.seed,
        devices: opts.devices,
        udp_devices,
        events,
        verdict,
        refused: count(totals.refused),
        spooled: count(totals.appended),
        replayed: count(totals.replayed),
        spool_full_notices: counters.spool_full.load(Ordering::Relaxed),
        expired: counters.expired.load(Ordering::Relaxed),
        retransmissions,
        window_waits,
        routes_back,
        ack_requests,
        custody_lost,
        route_back_timeouts,
        sessions_closed: counters.sessions_closed.load(Ordering::Relaxed),
        gateway_drops: (count(totals.congested), count(totals.uplink_down)),
        udp_faults,
        drain,
        drained,
        kept: None,
    };
    if !report.passed() || opts.keep {
        // Keep the logs, the sink and the spool of a failed run.
        report.kept = Some(tmp.keep());
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(node: &str, id: u64, payload: Bytes) -> SinkLine {
        SinkLine {
            device: node.into(),
            stream: Some("00".into()),
            channel: CHANNEL,
            id,
            via: "relay".into(),
            relay: None,
            received_at_ms: 2_000,
            payload: payload.to_vec(),
        }
    }

    fn sent() -> Vec<Sent> {
        vec![Sent { node: "a".into(), index: 0, accepted: 3 }, Sent { node: "b".into(), index: 1, accepted: 2 }]
    }

    fn good() -> Vec<SinkLine> {
        let mut v = Vec::new();
        for id in 0..3 {
            v.push(line("a", id, reading(9, 0, id, 1_000_000)));
        }
        for id in 0..2 {
            v.push(line("b", id, reading(9, 1, id, 1_500_000)));
        }
        v
    }

    #[test]
    fn a_complete_sink_passes_with_its_latencies() {
        let v = check(9, &sent(), &good());
        assert!(v.passed(), "{v:?}");
        assert_eq!((v.sent, v.delivered), (5, 5));
        assert_eq!(v.latency(0.0), Duration::from_millis(500));
        assert_eq!(v.latency(1.0), Duration::from_secs(1));
    }

    #[test]
    fn the_check_catches_loss_duplicates_reordering_and_damage() {
        let mut lost = good();
        lost.remove(1);
        let v = check(9, &sent(), &lost);
        assert!(!v.passed());
        assert_eq!((v.lost, v.duplicated, v.reordered), (1, 0, 0), "{v:?}");

        let mut dup = good();
        dup.push(line("a", 2, reading(9, 0, 2, 1_000_000)));
        let v = check(9, &sent(), &dup);
        assert_eq!((v.lost, v.duplicated, v.delivered), (0, 1, 5), "{v:?}");
        assert!(!v.passed());

        let mut reordered = good();
        reordered.swap(0, 1);
        let v = check(9, &sent(), &reordered);
        assert_eq!((v.lost, v.reordered), (0, 1), "{v:?}");
        assert!(!v.passed());

        let mut damaged = good();
        damaged[4].payload[20] ^= 1;
        let v = check(9, &sent(), &damaged);
        assert_eq!((v.mismatched, v.lost), (1, 1), "{v:?}");
        // Another device's reading under this id, or another seed's, is damage too.
        let mut swapped = good();
        swapped[3].payload = reading(9, 0, 0, 1).to_vec();
        assert_eq!(check(9, &sent(), &swapped).mismatched, 1);
        assert_eq!(check(10, &sent(), &good()).mismatched, 5);

        let mut stray = good();
        stray.push(line("a", 3, reading(9, 0, 3, 1)));
        stray.push(line("c", 0, reading(9, 2, 0, 1)));
        let v = check(9, &sent(), &stray);
        assert_eq!(v.unexpected, 2);
        assert!(!v.passed());
    }

    #[test]
    fn the_schedule_is_seeded() {
        let opts = SoakOptions::new(PathBuf::from("veil-relay"));
        let a = schedule(&opts, &mut StdRng::seed_from_u64(5));
        let b = schedule(&opts, &mut StdRng::seed_from_u64(5));
        assert_eq!(a, b);
        assert_ne!(a, schedule(&opts, &mut StdRng::seed_from_u64(6)));
        let majors = a.iter().filter(|(_, x)| matches!(x, Action::Outage(_) | Action::KillCloud | Action::KillGateway));
        assert_eq!(majors.count(), 3);
        assert!(a.iter().all(|(t, _)| *t > 0.0 && *t < 60.0));
    }
}
