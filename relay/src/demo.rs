//! `veil-relay demo`: Veil's main job on loopback, in one process.
//!
//! A fleet CA, a cloud, a gateway and simulated devices (default 50) are provisioned in a
//! temporary directory with the same tooling an operator uses (`ca init`, `keygen`, `cert
//! issue`) and started from configuration files like the real roles. Every device links to
//! the gateway (one in five over UDP, the rest over TCP), opens an end-to-end session with the
//! cloud through it (spec §16), and sends 32-byte readings; the cloud answers each device with
//! one command. The closing summary gives the devices connected, messages sent and delivered,
//! end-to-end latency (p50/p99), bytes on the wire per message on each hop, and the result
//! of two checks on the gateway:
//!
//! - every end-to-end packet it passed on (its audit tap) is scanned for the readings'
//!   plaintext marker, which must never appear;
//! - every end-to-end handshake it passed on (the devices' INITs) is offered to a routed
//!   responder holding the gateway's own static key, which must fail to open it: the gateway
//!   cannot take the cloud's place in the key exchange, so no key it holds opens a payload.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use veil_protocol::trust::{CertRole, NodeId, RoleSet};
use veil_protocol::wire::TYPE_HANDSHAKE_INIT;
use veil_protocol::{Mode, PublicKey, Role, Suite, Timestamp};
use veil_transports::{Authorizer, DeliveryOptions, Endpoint, NodeEvent, PeerRoles, RoutedEndpoint, Transport};

use crate::cloud::{Cloud, CloudSettings};
use crate::config::Config;
use crate::gateway::{Gateway, GatewaySettings};
use crate::keyfile::{self, KeyKind};
use crate::tooling::{self, IssueRequest};
use crate::trustload::{DeviceFiles, LoadedNode};

/// The plaintext marker every reading carries; it must never appear in what the gateway sees.
pub const MARKER: &[u8] = b"VEIL-DEMO-PLAINTEXT";
/// Size of a reading.
pub const READING_LEN: usize = 32;

/// What to run.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Simulated devices.
    pub devices: usize,
    /// How long the devices send.
    pub duration: Duration,
    /// Readings per second per device.
    pub rate: f64,
    /// Every `udp_every`-th device links over UDP (0: none).
    pub udp_every: usize,
    /// Live progress on standard error (hidden when it is not a terminal).
    pub progress: bool,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self { devices: 50, duration: Duration::from_secs(5), rate: 20.0, udp_every: 5, progress: true }
    }
}

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DemoError {
    /// Provisioning (keys, certificates, configuration files) failed.
    #[error("provisioning: {0}")]
    Provision(String),
    /// A role did not start.
    #[error("start: {0}")]
    Start(String),
}

/// The closing summary.
#[derive(Debug, Clone, Default)]
pub struct DemoReport {
    /// Devices simulated.
    pub devices: usize,
    /// Devices over UDP links.
    pub udp_devices: usize,
    /// Devices whose end-to-end session came up.
    pub connected: usize,
    /// Readings sent (queued by the devices).
    pub sent: u64,
    /// Readings the cloud delivered.
    pub delivered: u64,
    /// Readings delivered twice (must be 0).
    pub duplicates: u64,
    /// Commands the cloud sent, and the devices received.
    pub commands_sent: u64,
    /// Commands received by devices.
    pub commands_received: u64,
    /// End-to-end latency percentiles (device send to cloud delivery).
    pub latency_p50: Duration,
    /// 99th percentile.
    pub latency_p99: Duration,
    /// Largest.
    pub latency_max: Duration,
    /// Readings per second delivered during the run.
    pub throughput: f64,
    /// Wire bytes per reading on the device links (device → gateway), handshakes excluded.
    pub device_hop_bytes: f64,
    /// Wire bytes per reading on the uplink (gateway → cloud), handshakes excluded.
    pub uplink_hop_bytes: f64,
    /// The uplink's cipher suite at the end (the gateway's `uplink.suite`; `None` if the
    /// uplink was down).
    pub uplink_suite: Option<Suite>,
    /// End-to-end packets the gateway passed on (its audit tap).
    pub gateway_packets: u64,
    /// Of them, packets containing the plaintext marker (must be 0).
    pub marker_leaks: u64,
    /// End-to-end INITs offered to a responder with the gateway's key.
    pub inits_tried: u64,
    /// Of them, INITs it could open (must be 0).
    pub inits_opened: u64,
}

impl DemoReport {
    /// Whether every check passed: all devices connected, every reading delivered once, every
    /// command received, nothing readable at the gateway.
    #[must_use]
    pub fn passed(&self) -> bool {
        self.connected == self.devices
            && self.delivered == self.sent
            && self.duplicates == 0
            && self.commands_received == self.commands_sent
            && self.marker_leaks == 0
            && self.inits_opened == 0
            && self.inits_tried > 0
            && self.gateway_packets > 0
    }
}

impl std::fmt::Display for DemoReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ok = |b: bool| if b { "ok" } else { "FAILED" };
        writeln!(
            f,
            "devices connected   {}/{} ({} over UDP, the rest over TCP)",
            self.connected, self.devices, self.udp_devices
        )?;
        writeln!(
            f,
            "readings            {} sent, {} delivered, {} duplicated ({:.0}/s)",
            self.sent, self.delivered, self.duplicates, self.throughput
        )?;
        writeln!(
            f,
            "commands            {} sent by the cloud, {} received",
            self.commands_sent, self.commands_received
        )?;
        writeln!(
            f,
            "latency end to end  p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            ms(self.latency_p50),
            ms(self.latency_p99),
            ms(self.latency_max)
        )?;
        writeln!(
            f,
            "wire bytes/reading  device -> gateway {:.1} B, gateway -> cloud {:.1} B ({READING_LEN} B payload; \
             uplink {})",
            self.device_hop_bytes,
            self.uplink_hop_bytes,
            self.uplink_suite.map_or("down", Suite::noise_name)
        )?;
        writeln!(
            f,
            "gateway sees        {} end-to-end packets, {} with plaintext: {}",
            self.gateway_packets,
            self.marker_leaks,
            ok(self.marker_leaks == 0 && self.gateway_packets > 0)
        )?;
        writeln!(
            f,
            "gateway's key       opened {} of {} device handshakes: {}",
            self.inits_opened,
            self.inits_tried,
            ok(self.inits_opened == 0 && self.inits_tried > 0)
        )?;
        write!(f, "result              {}", if self.passed() { "PASS" } else { "FAIL" })
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The files of a provisioned fleet.
#[derive(Debug, Clone)]
pub struct Fleet {
    /// The directory holding everything.
    pub dir: PathBuf,
    /// The CA's public key.
    pub ca_pub: PathBuf,
    /// The cloud's public key file.
    pub cloud_pub: PathBuf,
    /// The gateway's public key file.
    pub gateway_pub: PathBuf,
    /// The cloud's configuration (listening on `127.0.0.1:0`).
    pub cloud_config: PathBuf,
    /// Each device's secret key and certificate.
    pub devices: Vec<(PathBuf, PathBuf)>,
}

/// Provisions a fleet in `dir`: a CA, cloud, gateway and `devices` devices, each with a key
/// pair and a certificate of its role, and the cloud's configuration.
///
/// # Errors
/// [`DemoError::Provision`].
pub fn provision(dir: &Path, devices: usize) -> Result<Fleet, DemoError> {
    let p = |e: tooling::ToolError| DemoError::Provision(e.to_string());
    let ca = dir.join("ca");
    tooling::ca_init(&ca, false).map_err(p)?;
    let issue = |name: &str, role: CertRole| -> Result<(PathBuf, PathBuf), DemoError> {
        let key = dir.join(format!("{name}.key"));
        tooling::keygen(&key, false).map_err(p)?;
        let cert = dir.join(format!("{name}.cert"));
        tooling::cert_issue(IssueRequest {
            ca: ca.clone(),
            key: dir.join(format!("{name}.key.pub")),
            name: name.to_owned(),
            role,
            groups: Vec::new(),
            not_before: None,
            days: 1,
            out: cert.clone(),
            force: false,
        })
        .map_err(p)?;
        Ok((key, cert))
    };
    issue("cloud", CertRole::Cloud)?;
    issue("gateway", CertRole::Gateway)?;
    let devices = (0..devices).map(|i| issue(&format!("device-{i:04}"), CertRole::Device)).collect::<Result<_, _>>()?;
    let cloud_config = dir.join("cloud.toml");
    let text = "role = \"cloud\"\n\n[node]\nkey = \"cloud.key\"\ncertificate = \"cloud.cert\"\n\n\
                [trust]\nmode = \"ca\"\nca = \"ca/ca.pub\"\ncrl = \"ca/ca.crl\"\n\n\
                [listen]\ntcp = \"127.0.0.1:0\"\n\n[sink]\nkind = \"file\"\npath = \"messages.jsonl\"\n";
    std::fs::write(&cloud_config, text)
        .map_err(|e| DemoError::Provision(format!("{}: {e}", cloud_config.display())))?;
    Ok(Fleet {
        dir: dir.to_owned(),
        ca_pub: ca.join(tooling::CA_PUB),
        cloud_pub: dir.join("cloud.key.pub"),
        gateway_pub: dir.join("gateway.key.pub"),
        cloud_config,
        devices,
    })
}

/// Writes the gateway's configuration: devices on `127.0.0.1:0` (TCP and UDP), its uplink to
/// `cloud` over TCP with AES-GCM (`uplink.suite`: both ends are servers).
///
/// # Errors
/// [`DemoError::Provision`].
pub fn write_gateway_config(fleet: &Fleet, cloud: SocketAddr) -> Result<PathBuf, DemoError> {
    let path = fleet.dir.join("gateway.toml");
    let text = format!(
        "role = \"gateway\"\n\n[node]\nkey = \"gateway.key\"\ncertificate = \"gateway.cert\"\n\n\
         [trust]\nmode = \"ca\"\nca = \"ca/ca.pub\"\ncrl = \"ca/ca.crl\"\n\n\
         [listen]\ntcp = \"127.0.0.1:0\"\nudp = \"127.0.0.1:0\"\n\n\
         [uplink]\naddress = \"{cloud}\"\ncloud_key = \"cloud.key.pub\"\nsuite = \"25519_AESGCM_SHA256\"\n\
         backoff_initial_ms = 50\nbackoff_max_ms = 1000\n"
    );
    std::fs::write(&path, text).map_err(|e| DemoError::Provision(format!("{}: {e}", path.display())))?;
    Ok(path)
}

fn load(path: &Path) -> Result<(Config, LoadedNode), DemoError> {
    let config = Config::load(path).map_err(|e| DemoError::Start(e.to_string()))?;
    config.check().map_err(|e| DemoError::Start(e.to_string()))?;
    let node = LoadedNode::load(&config).map_err(|e| DemoError::Start(e.to_string()))?;
    Ok((config, node))
}

fn read_public(path: &Path) -> Result<PublicKey, DemoError> {
    keyfile::read_key(path, KeyKind::NodePublic).map(|k| PublicKey(*k)).map_err(|e| DemoError::Provision(e.to_string()))
}

/// One reading: send time (µs since the demo started), device index, sequence number, marker.
fn reading(start: Instant, device: u32, seq: u32) -> Bytes {
    let mut b = BytesMut::with_capacity(READING_LEN);
    b.put_u64(u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX));
    b.put_u32(device);
    b.put_u32(seq);
    b.put_slice(&MARKER[..READING_LEN - 16]);
    b.freeze()
}

fn parse_reading(p: &[u8]) -> Option<(u64, u32, u32)> {
    if p.len() != READING_LEN {
        return None;
    }
    let at = u64::from_be_bytes(p[0..8].try_into().ok()?);
    let dev = u32::from_be_bytes(p[8..12].try_into().ok()?);
    let seq = u32::from_be_bytes(p[12..16].try_into().ok()?);
    Some((at, dev, seq))
}

/// What the cloud side records.
#[derive(Debug, Default)]
struct CloudTally {
    latencies: Vec<Duration>,
    seen: HashMap<(u32, u32), u8>,
    duplicates: u64,
    commands_sent: u64,
    answered: std::collections::HashSet<NodeId>,
}

/// Most latencies recorded (the rest are counted, not timed).
const MAX_SAMPLES: usize = 1_000_000;

/// Runs the demo.
///
/// # Errors
/// [`DemoError`] when provisioning or a role fails; failed checks are in the report.
#[allow(clippy::too_many_lines)]
pub async fn run(opts: &DemoOptions) -> Result<DemoReport, DemoError> {
    let tmp = tempfile::tempdir().map_err(|e| DemoError::Provision(e.to_string()))?;
    let fleet = provision(tmp.path(), opts.devices)?;
    let start = Instant::now();

    // The cloud, from its configuration file.
    let (cloud_config, cloud_node) = load(&fleet.cloud_config)?;
    let cloud_settings =
        CloudSettings::from_node(&cloud_node, &cloud_config).map_err(|e| DemoError::Start(e.to_string()))?;
    let cloud = Arc::new(Cloud::start(cloud_settings).await.map_err(|e| DemoError::Start(e.to_string()))?);
    let cloud_addr = cloud.local_tcp_addr().ok_or_else(|| DemoError::Start("cloud has no TCP address".into()))?;

    // The gateway, from its configuration file, with its audit tap.
    let gw_config_path = write_gateway_config(&fleet, cloud_addr)?;
    let (gw_config, gw_node) = load(&gw_config_path)?;
    let mut gw_settings =
        GatewaySettings::from_node(&gw_node, &gw_config).map_err(|e| DemoError::Start(e.to_string()))?;
    let (tap_tx, mut tap_rx) = mpsc::channel::<Bytes>(1 << 16);
    gw_settings.tap = Some(tap_tx);
    let gateway_identity = gw_node.identity.clone();
    let gateway = Gateway::start(gw_settings).await.map_err(|e| DemoError::Start(e.to_string()))?;
    let gw_tcp = gateway.local_tcp_addr().ok_or_else(|| DemoError::Start("gateway has no TCP address".into()))?;
    let gw_udp = gateway.local_udp_addr().ok_or_else(|| DemoError::Start("gateway has no UDP address".into()))?;
    let gw_key = read_public(&fleet.gateway_pub)?;
    let cloud_key = read_public(&fleet.cloud_pub)?;

    // The gateway's tap: scan every packet, keep the INITs for the key check.
    let tap_task = tokio::spawn(async move {
        let (mut packets, mut leaks, mut inits) = (0u64, 0u64, Vec::new());
        while let Some(p) = tap_rx.recv().await {
            packets += 1;
            if p.windows(MARKER.len()).any(|w| w == MARKER) || p.windows(16).any(|w| w == &MARKER[..16]) {
                leaks += 1;
            }
            if p.first() == Some(&TYPE_HANDSHAKE_INIT) && inits.len() < 4_096 {
                inits.push(p);
            }
        }
        (packets, leaks, inits)
    });

    // The cloud's side of the traffic.
    let tally = Arc::new(Mutex::new(CloudTally::default()));
    let cloud_task = {
        let cloud = Arc::clone(&cloud);
        let tally = Arc::clone(&tally);
        tokio::spawn(async move {
            while let Ok(ev) = cloud.next_event().await {
                let NodeEvent::Message { node, payload, .. } = ev else { continue };
                let Some((at, dev, seq)) = parse_reading(&payload) else { continue };
                let now = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
                let first_of_device = {
                    let mut t = tally.lock().unwrap_or_else(PoisonError::into_inner);
                    let n = t.seen.entry((dev, seq)).or_insert(0);
                    *n = n.saturating_add(1);
                    if *n > 1 {
                        t.duplicates += 1;
                    } else if t.latencies.len() < MAX_SAMPLES {
                        t.latencies.push(Duration::from_micros(now.saturating_sub(at)));
                    }
                    t.answered.insert(node)
                };
                if first_of_device {
                    // One command per device, down through the gateway.
                    let cloud = Arc::clone(&cloud);
                    let tally = Arc::clone(&tally);
                    tokio::spawn(async move {
                        if cloud.send(&node, 1, Bytes::from_static(b"set-interval 10s")).await.is_ok() {
                            tally.lock().unwrap_or_else(PoisonError::into_inner).commands_sent += 1;
                        }
                    });
                }
            }
        })
    };

    // The devices.
    let bar = if opts.progress {
        let b = ProgressBar::new(opts.devices as u64);
        b.set_style(
            ProgressStyle::with_template("{spinner} {msg:<22} [{bar:30}] {pos}/{len}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    bar.set_message("devices connecting");
    let sent = Arc::new(AtomicU64::new(0));
    let received = Arc::new(AtomicU64::new(0));
    let connected = Arc::new(AtomicU64::new(0));
    let link_bytes = Arc::new(AtomicU64::new(0));
    let go = Arc::new(tokio::sync::Barrier::new(opts.devices + 1));
    let mut devices = JoinSet::new();
    let mut udp_devices = 0;
    for (i, (key, cert)) in fleet.devices.iter().enumerate() {
        let files = DeviceFiles::load(key, cert, &fleet.ca_pub).map_err(|e| DemoError::Provision(e.to_string()))?;
        let udp = opts.udp_every > 0 && i % opts.udp_every == opts.udp_every - 1;
        udp_devices += usize::from(udp);
        let d = DeviceRun {
            index: u32::try_from(i).unwrap_or(u32::MAX),
            files,
            transport: if udp { Transport::Udp } else { Transport::Tcp },
            gateway: if udp { gw_udp } else { gw_tcp },
            gateway_key: gw_key,
            cloud_key,
            start,
            duration: opts.duration,
            interval: Duration::from_secs_f64(1.0 / opts.rate.max(0.001)),
            sent: Arc::clone(&sent),
            received: Arc::clone(&received),
            connected: Arc::clone(&connected),
            link_bytes: Arc::clone(&link_bytes),
            go: Arc::clone(&go),
            bar: bar.clone(),
        };
        devices.spawn(d.run());
    }
    // Everyone connected (or gave up): the readings start together.
    go.wait().await;
    let up_before = gateway.uplink_stats().map_or(0, |s| s.bytes_sent);
    bar.set_length(opts.duration.as_secs().max(1));
    bar.set_position(0);
    bar.set_message("devices sending");
    let ticker = {
        let bar = bar.clone();
        let secs = opts.duration.as_secs();
        tokio::spawn(async move {
            for s in 1..=secs {
                tokio::time::sleep(Duration::from_secs(1)).await;
                bar.set_position(s);
            }
        })
    };
    while devices.join_next().await.is_some() {}
    ticker.abort();
    let up_after = gateway.uplink_stats().map_or(up_before, |s| s.bytes_sent);
    let uplink_suite = gateway.uplink_suite();
    bar.finish_and_clear();

    // Let the last readings and commands land (bounded).
    let expected = sent.load(Ordering::Relaxed);
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(5) {
        let delivered = tally.lock().unwrap_or_else(PoisonError::into_inner).seen.len() as u64;
        if delivered >= expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    gateway.shutdown(Duration::from_secs(2)).await;
    cloud.shutdown(Duration::from_secs(2)).await;
    cloud_task.abort();
    let (gateway_packets, marker_leaks, inits) = tap_task.await.unwrap_or_default();
    let (inits_tried, inits_opened) = try_inits_with_gateway_key(&gateway_identity, &inits);

    let t = std::mem::take(&mut *tally.lock().unwrap_or_else(PoisonError::into_inner));
    let mut lat = t.latencies;
    lat.sort_unstable();
    let pct = |q: f64| -> Duration {
        if lat.is_empty() {
            return Duration::ZERO;
        }
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
        let i = ((lat.len() - 1) as f64 * q).round() as usize;
        lat[i.min(lat.len() - 1)]
    };
    #[allow(clippy::cast_precision_loss)]
    let per = |bytes: u64, n: u64| if n == 0 { 0.0 } else { bytes as f64 / n as f64 };
    let delivered = t.seen.len() as u64;
    Ok(DemoReport {
        devices: opts.devices,
        udp_devices,
        connected: usize::try_from(connected.load(Ordering::Relaxed)).unwrap_or(usize::MAX),
        sent: expected,
        delivered,
        duplicates: t.duplicates,
        commands_sent: t.commands_sent,
        commands_received: received.load(Ordering::Relaxed),
        latency_p50: pct(0.50),
        latency_p99: pct(0.99),
        latency_max: lat.last().copied().unwrap_or_default(),
        #[allow(clippy::cast_precision_loss)]
        throughput: delivered as f64 / opts.duration.as_secs_f64().max(1e-3),
        device_hop_bytes: per(link_bytes.load(Ordering::Relaxed), expected),
        uplink_hop_bytes: per(up_after.saturating_sub(up_before), delivered),
        uplink_suite,
        gateway_packets,
        marker_leaks,
        inits_tried,
        inits_opened,
    })
}

/// Offers each end-to-end INIT the gateway passed on to a routed responder holding the
/// gateway's static key. IK INITs are encrypted to the cloud's key: none may open.
fn try_inits_with_gateway_key(identity: &veil_protocol::StaticKeypair, inits: &[Bytes]) -> (u64, u64) {
    let config = Arc::new(veil_protocol::Config::new(identity.clone(), Mode::Routed));
    let (mut tried, mut opened) = (0, 0);
    for init in inits {
        let Ok(mut c) = veil_protocol::Connection::new(
            Arc::clone(&config),
            Role::Responder,
            None,
            Timestamp::ZERO,
            &mut rand::rngs::OsRng,
        ) else {
            continue;
        };
        tried += 1;
        if c.handle_input(Timestamp::ZERO, init).is_ok() {
            // It read the INIT: only possible with the cloud's key.
            let revealed = std::iter::from_fn(|| c.poll_event())
                .any(|e| matches!(e, veil_protocol::Event::AuthorizationRequired { .. }));
            if revealed {
                opened += 1;
            }
        }
    }
    (tried, opened)
}

/// One simulated device.
struct DeviceRun {
    index: u32,
    files: DeviceFiles,
    transport: Transport,
    gateway: SocketAddr,
    gateway_key: PublicKey,
    cloud_key: PublicKey,
    start: Instant,
    duration: Duration,
    interval: Duration,
    sent: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
    connected: Arc<AtomicU64>,
    link_bytes: Arc<AtomicU64>,
    go: Arc<tokio::sync::Barrier>,
    bar: ProgressBar,
}

impl DeviceRun {
    async fn run(self) {
        let session = tokio::time::timeout(Duration::from_secs(30), self.connect()).await;
        let Ok(Ok((ep, routed, link, cloud))) = session else {
            if let Ok(Err(e)) = session {
                tracing::warn!(device = self.index, error = %e, "device could not connect");
            }
            self.go.wait().await;
            return;
        };
        self.connected.fetch_add(1, Ordering::Relaxed);
        self.bar.inc(1);
        let received = Arc::clone(&self.received);
        let mine = Arc::new(AtomicU64::new(0));
        let events = {
            let routed = routed.clone();
            let mine = Arc::clone(&mine);
            tokio::spawn(async move {
                while let Ok(ev) = routed.next_event().await {
                    if let NodeEvent::Message { channel: 1, .. } = ev {
                        received.fetch_add(1, Ordering::Relaxed);
                        mine.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };
        self.go.wait().await;
        let before = link.stats().bytes_sent;
        let deadline = tokio::time::Instant::now() + self.duration;
        let mut tick = tokio::time::interval(self.interval);
        let mut seq = 0u32;
        while tokio::time::Instant::now() < deadline {
            tick.tick().await;
            if routed.send(&cloud, 0, reading(self.start, self.index, seq)).await.is_ok() {
                self.sent.fetch_add(1, Ordering::Relaxed);
                seq += 1;
            }
        }
        // Let queued readings leave and the command arrive before the link goes.
        tokio::time::sleep(Duration::from_millis(500)).await;
        self.link_bytes.fetch_add(link.stats().bytes_sent.saturating_sub(before), Ordering::Relaxed);
        let settle = tokio::time::Instant::now() + Duration::from_secs(3);
        while mine.load(Ordering::Relaxed) == 0 && tokio::time::Instant::now() < settle {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        events.abort();
        routed.close();
        ep.close();
    }

    async fn connect(
        &self,
    ) -> Result<(Endpoint, RoutedEndpoint, veil_transports::Connection, NodeId), veil_transports::Error> {
        let d = SimDevice::connect(&self.files, self.transport, self.gateway, self.gateway_key, self.cloud_key).await?;
        Ok((d.endpoint, d.routed, d.link, d.cloud))
    }
}

/// A device as the demo and the tests simulate it: a link to a gateway (fleet-CA
/// certificate, IK to the gateway's key) and an end-to-end session with the cloud through it.
#[derive(Debug, Clone)]
pub struct SimDevice {
    /// The device's link endpoint.
    pub endpoint: Endpoint,
    /// Its end-to-end endpoint.
    pub routed: RoutedEndpoint,
    /// Its link to the gateway.
    pub link: veil_transports::Connection,
    /// The cloud's node id.
    pub cloud: NodeId,
}

impl SimDevice {
    /// Links to the gateway at `gateway` over `transport` (expecting a gateway certificate
    /// for `gateway_key`) and opens the end-to-end session with the cloud whose key is
    /// `cloud_key` (expecting a cloud certificate).
    ///
    /// # Errors
    /// The link or the end-to-end handshake failed.
    pub async fn connect(
        files: &DeviceFiles,
        transport: Transport,
        gateway: SocketAddr,
        gateway_key: PublicKey,
        cloud_key: PublicKey,
    ) -> Result<Self, veil_transports::Error> {
        // spec §17: readings and commands are delivered once, in order, across losses; the
        // device keeps nothing durable, so it commits what it is given at once.
        let delivery = DeliveryOptions { auto_commit: true, ..DeliveryOptions::default() };
        Self::connect_with(files, transport, gateway, gateway_key, cloud_key, Some(delivery)).await
    }

    /// As [`SimDevice::connect`], with `delivery` for the end-to-end endpoint instead of the
    /// demo's (acknowledged, auto-commit); `None` sends best effort (spec §16.2), as a device
    /// without spec §17 does.
    ///
    /// # Errors
    /// The link or the end-to-end handshake failed.
    pub async fn connect_with(
        files: &DeviceFiles,
        transport: Transport,
        gateway: SocketAddr,
        gateway_key: PublicKey,
        cloud_key: PublicKey,
        delivery: Option<DeliveryOptions>,
    ) -> Result<Self, veil_transports::Error> {
        let roles = PeerRoles::new(RoleSet::NONE, RoleSet::UPSTREAM);
        let mut b = Endpoint::builder(files.identity.clone())
            .authorizer(Authorizer::trust(files.trust.clone(), roles))
            .certificate_chain(&files.certificate_chain)
            .routing(true);
        if transport == Transport::Udp {
            b = b.bind_udp(SocketAddr::from(([127, 0, 0, 1], 0)));
        }
        let endpoint = b.bind().await?;
        let link = endpoint.connect_expecting(transport, gateway, Some(gateway_key), RoleSet::GATEWAY).await?;
        let mut rb = RoutedEndpoint::builder(files.identity.clone())
            .authorizer(Authorizer::trust(files.trust.clone(), PeerRoles::new(RoleSet::NONE, RoleSet::CLOUD)))
            .certificate_chain(&files.certificate_chain);
        if let Some(d) = delivery {
            rb = rb.delivery(d);
        }
        let routed = rb.build()?;
        routed.add_relay_link(link.clone());
        let cloud = routed.connect(cloud_key).await?;
        Ok(Self { endpoint, routed, link, cloud })
    }

    /// Sends a message to the cloud end to end.
    ///
    /// # Errors
    /// As [`RoutedEndpoint::send`].
    pub async fn send(&self, channel: u16, payload: Bytes) -> Result<(), veil_transports::Error> {
        self.routed.send(&self.cloud, channel, payload).await
    }

    /// Closes the session and the link.
    pub fn close(&self) {
        self.routed.close();
        self.endpoint.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The key check can tell: the cloud's key opens a device's INIT, the gateway's cannot.
    #[test]
    fn only_the_cloud_key_opens_a_device_init() {
        let mut rng = rand::rngs::OsRng;
        let device = veil_protocol::StaticKeypair::generate(&mut rng);
        let cloud = veil_protocol::StaticKeypair::generate(&mut rng);
        let gateway = veil_protocol::StaticKeypair::generate(&mut rng);
        let config = Arc::new(veil_protocol::Config::new(device, Mode::Routed));
        let mut init =
            veil_protocol::Connection::new(config, Role::Initiator, Some(*cloud.public()), Timestamp::ZERO, &mut rng)
                .unwrap();
        let mut buf = vec![0; veil_protocol::wire::MAX_PACKET_LEN];
        let n = init.poll_transmit(Timestamp::ZERO, &mut buf).unwrap().unwrap();
        let packets = [Bytes::copy_from_slice(&buf[..n])];
        assert_eq!(packets[0][0], TYPE_HANDSHAKE_INIT);
        assert_eq!(try_inits_with_gateway_key(&gateway, &packets), (1, 0));
        assert_eq!(try_inits_with_gateway_key(&cloud, &packets), (1, 1));
    }

    #[test]
    fn a_reading_carries_its_time_device_and_sequence() {
        let start = Instant::now();
        let r = reading(start, 7, 42);
        assert_eq!(r.len(), READING_LEN);
        let (_, dev, seq) = parse_reading(&r).unwrap();
        assert_eq!((dev, seq), (7, 42));
        assert!(r.windows(16).any(|w| w == &MARKER[..16]));
        assert_eq!(parse_reading(&r[1..]), None);
    }
}
