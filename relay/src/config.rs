//! The configuration file of the `gateway` and `cloud` roles: TOML, one file per node.
//!
//! The doc comment of every field below is the reference of its key; `relay/CONFIG.md` is the
//! operator's summary with a complete example for each role. [`Config::load`] reads and
//! validates a file without touching any other file; [`Config::check`] then opens and parses
//! every file the configuration names (what `--check-config` reports), and
//! [`LoadedNode::load`](crate::trustload::LoadedNode::load) builds the node from them.
//!
//! Every error names the dotted key it is about, e.g.
//! `gateway.toml:7:11: uplink.address: invalid socket address "cloud:x"` or
//! `trust.ca: file not found: /etc/veil/ca.pub`. Unknown keys are errors (a misspelt key
//! would otherwise be silently ignored), and so are sections that belong to the other role.
//! Relative file paths resolve against the directory of the configuration file.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use veil_protocol::trust::{CertRole, CLOCK_SKEW_SECS, MAX_CLOCK_SKEW_SECS, MAX_TRUST_ANCHORS};
use veil_protocol::Suite;
use veil_transports::{EndpointLimits, PeerRoles, Transport};

/// Largest configuration file accepted.
pub const MAX_CONFIG_LEN: u64 = 1 << 20;
/// Default of `uplink.backoff_initial_ms`.
pub const DEFAULT_BACKOFF_INITIAL_MS: u64 = 200;
/// Default of `uplink.backoff_max_ms`.
pub const DEFAULT_BACKOFF_MAX_MS: u64 = 30_000;
/// Largest `uplink.backoff_max_ms` (one hour): a longer wait looks like an outage.
pub const MAX_BACKOFF_MS: u64 = 3_600_000;
/// Largest `limits.handshake_timeout_ms` (one minute).
pub const MAX_HANDSHAKE_TIMEOUT_MS: u64 = 60_000;
/// `limits.keepalive_ms` at least (a tenth of a second) and at most (an hour).
pub const MIN_KEEPALIVE_MS: u64 = 100;
/// See [`MIN_KEEPALIVE_MS`].
pub const MAX_KEEPALIVE_MS: u64 = 3_600_000;
/// `limits.static_dh_cache` at most: about 130 MiB of cached results per cache.
pub const MAX_STATIC_DH_CACHE: usize = 1 << 20;

/// Why a configuration cannot be used. Every variant but [`ConfigError::Read`] and
/// [`ConfigError::Syntax`] names the key ([`ConfigError::key`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The configuration file cannot be read (or is larger than [`MAX_CONFIG_LEN`], or not
    /// UTF-8).
    #[error("{}: {source}", path.display())]
    Read {
        /// The configuration file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The file is not valid TOML.
    #[error("{}:{line}:{column}: {message}", file.display())]
    Syntax {
        /// The configuration file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column (in characters).
        column: usize,
        /// What is wrong.
        message: String,
    },
    /// A key that is unknown, missing, of the wrong type, out of range, or in the wrong place.
    #[error("{}{}: {key}: {message}", file.display(), LineColumn(*at))]
    Invalid {
        /// The configuration file.
        file: PathBuf,
        /// The dotted key, e.g. `uplink.address`.
        key: String,
        /// Line and column (1-based) where the TOML parser found it; `None` for checks made
        /// after parsing.
        at: Option<(usize, usize)>,
        /// What is wrong.
        message: String,
    },
    /// A file that the configuration names is missing, unreadable or bad (found by
    /// [`Config::check`] and when loading the node).
    #[error("{key}: {message}")]
    File {
        /// The dotted key that names the file, e.g. `trust.ca`.
        key: String,
        /// What is wrong, with the file's path.
        message: String,
    },
}

impl ConfigError {
    /// The dotted key the error is about, if any.
    #[must_use]
    pub fn key(&self) -> Option<&str> {
        match self {
            Self::Invalid { key, .. } | Self::File { key, .. } => Some(key),
            Self::Read { .. } | Self::Syntax { .. } => None,
        }
    }
}

/// `:line:column` when known.
struct LineColumn(Option<(usize, usize)>);

impl fmt::Display for LineColumn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some((line, column)) => write!(f, ":{line}:{column}"),
            None => Ok(()),
        }
    }
}

/// The long-running role of a `veil-relay` process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeRole {
    /// Accepts devices over local links and forwards their end-to-end traffic to the cloud
    /// over one uplink.
    Gateway,
    /// Terminates device sessions (direct, or relayed by gateways) and delivers their messages
    /// to a sink.
    Cloud,
}

impl NodeRole {
    /// The name used in the configuration (`"gateway"`, `"cloud"`).
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Gateway => "gateway",
            Self::Cloud => "cloud",
        }
    }

    /// The certificate role this node's own certificate must have (spec §15.3).
    #[must_use]
    pub const fn cert_role(self) -> CertRole {
        match self {
            Self::Gateway => CertRole::Gateway,
            Self::Cloud => CertRole::Cloud,
        }
    }

    /// The certificate roles expected from peers, by direction (spec §15.6): a gateway accepts
    /// devices and connects to a cloud; a cloud accepts gateways and devices.
    #[must_use]
    pub const fn peer_roles(self) -> PeerRoles {
        PeerRoles::for_node(self.cert_role())
    }
}

impl fmt::Display for NodeRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A node's configuration: one TOML file (see `relay/CONFIG.md`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `role`: `"gateway"` or `"cloud"` (required). It must match the subcommand that runs
    /// the file.
    pub role: NodeRole,
    /// `[node]`: this node's identity (required).
    pub node: NodeConfig,
    /// `[trust]`: whom this node accepts and connects to (required).
    pub trust: TrustConfig,
    /// `[listen]`: where peers connect (at least one of `tcp` and `udp`). A gateway listens
    /// for its devices; a cloud for gateway uplinks and devices that connect directly.
    #[serde(default)]
    pub listen: ListenConfig,
    /// `[uplink]`: the gateway's link to the cloud. Required for a gateway, an error for a
    /// cloud.
    #[serde(default)]
    pub uplink: Option<UplinkConfig>,
    /// `[limits]`: endpoint limits; every key defaults to the transports' default.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// `[sink]`: where a cloud delivers device messages. Cloud only; absent: JSON lines on
    /// standard output. [`Config::load`] fills it in for a cloud.
    #[serde(default)]
    pub sink: Option<SinkConfig>,
    /// `[control]`: the cloud's local control socket. Cloud only, optional.
    #[serde(default)]
    pub control: Option<ControlConfig>,
    /// `[spool]`: the gateway's durable store for device packets while its uplink is down
    /// (spec §17.9). Gateway only, optional; absent: no spool (packets for the cloud are
    /// dropped with `Unreachable { UplinkDown }` while the uplink reconnects).
    #[serde(default)]
    pub spool: Option<SpoolConfig>,
    /// `[metrics]`: the Prometheus endpoint. Optional; absent: no metrics endpoint.
    #[serde(default)]
    pub metrics: Option<MetricsConfig>,
    /// `[log]`: logging.
    #[serde(default)]
    pub log: LogConfig,
    /// The file this configuration was read from.
    #[serde(skip)]
    source: PathBuf,
}

/// `[node]`: this node's identity.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// `node.key` (required): the node's static X25519 secret key file (`veil-relay keygen`;
    /// spec §15.10), mode 0600: a key file that group or others can read is refused.
    pub key: PathBuf,
    /// `node.certificate`: this node's certificate or chain (`veil-relay cert issue`), sent in
    /// its handshakes (spec §15.4). Required with `trust.mode = "ca"`, where it must certify
    /// `node.key` with the role of this node and verify against `trust.ca`. Optional in
    /// allowlist mode (sent to peers that check certificates).
    #[serde(default)]
    pub certificate: Option<PathBuf>,
}

/// `trust.mode`: how peers are authorized (spec §15.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrustMode {
    /// Fleet CA: peers present certificate chains rooted in `trust.ca`, checked against the
    /// revocation lists of `trust.crl`.
    Ca,
    /// Allowlist: peers are listed by key in `trust.allowlist`.
    Allowlist,
}

impl TrustMode {
    /// The name used in the configuration.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Ca => "ca",
            Self::Allowlist => "allowlist",
        }
    }
}

impl fmt::Display for TrustMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `[trust]`: whom this node accepts and connects to (spec §15). Re-read on SIGHUP
/// ([`LoadedNode::reload`](crate::trustload::LoadedNode::reload)).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustConfig {
    /// `trust.mode` (required): `"ca"` or `"allowlist"`.
    pub mode: TrustMode,
    /// `trust.ca`: the fleet CA's public key file (`ca.pub` of `veil-relay ca init`), or an
    /// array of up to 8 of them while a CA is rotated. Required with `mode = "ca"`, an error
    /// otherwise.
    #[serde(default, deserialize_with = "one_or_many")]
    pub ca: Vec<PathBuf>,
    /// `trust.crl`: revocation list files (`ca.crl`), one per CA at most; a path or an array.
    /// Optional, `mode = "ca"` only. Each must be signed by one of `trust.ca`.
    #[serde(default, deserialize_with = "one_or_many")]
    pub crl: Vec<PathBuf>,
    /// `trust.allowlist`: the allowlist file (`<64 hex digits> <name>` per line, spec
    /// §15.10). Required with `mode = "allowlist"`, an error otherwise. A gateway's list must
    /// also hold its cloud's key (`uplink.cloud_key`): the gateway checks the cloud too.
    #[serde(default)]
    pub allowlist: Option<PathBuf>,
    /// `trust.clock_skew_secs`: how far peers' clocks may be off when certificate validity is
    /// checked (spec §15.7), 0 to 86 400. Default 300. `mode = "ca"` only.
    #[serde(default)]
    pub clock_skew_secs: Option<u64>,
    /// `trust.gateways`: the allowlist names (from `trust.allowlist`) of the gateways a cloud
    /// accepts uplinks from; their links carry end-to-end sessions (spec §16.7), every other
    /// listed peer is a device connected directly. Cloud in allowlist mode only (in fleet-CA
    /// mode the certificate's role says it). Default: none.
    #[serde(default)]
    pub gateways: Vec<String>,
}

impl TrustConfig {
    /// The clock-skew tolerance in force (the default if not set).
    #[must_use]
    pub fn clock_skew(&self) -> u64 {
        self.clock_skew_secs.unwrap_or(CLOCK_SKEW_SECS)
    }
}

/// `[listen]`: where peers connect.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    /// `listen.tcp`: a TCP address, e.g. `"0.0.0.0:7400"` (port 0 picks a free port).
    #[serde(default, deserialize_with = "opt_socket_addr")]
    pub tcp: Option<SocketAddr>,
    /// `listen.udp`: a UDP address, e.g. `"0.0.0.0:7400"`.
    #[serde(default, deserialize_with = "opt_socket_addr")]
    pub udp: Option<SocketAddr>,
}

/// `[uplink]`: the gateway's link to the cloud.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkConfig {
    /// `uplink.address` (required): the cloud's address, an IP address and port such as
    /// `"198.51.100.7:7401"` (host names are not resolved).
    #[serde(deserialize_with = "socket_addr")]
    pub address: SocketAddr,
    /// `uplink.transport`: `"tcp"` (default) or `"udp"`.
    #[serde(default = "default_transport", deserialize_with = "transport")]
    pub transport: Transport,
    /// `uplink.cloud_key` (required): the cloud's public key file (`node-public`), for the IK
    /// handshake.
    pub cloud_key: PathBuf,
    /// `uplink.suite`: the cipher suite the uplink offers (spec §4.3), by its Noise name:
    /// `"25519_ChaChaPoly_BLAKE2s"` (default: fast on any CPU) or `"25519_AESGCM_SHA256"`
    /// (≈ 4× the throughput where both ends have AES instructions, as x86-64 servers do). It
    /// changes only the link session to the cloud: each device picks the suites of its own
    /// link and end-to-end session.
    #[serde(default = "default_suite", deserialize_with = "suite")]
    pub suite: Suite,
    /// `uplink.backoff_initial_ms`: the first wait before reconnecting after the uplink fails;
    /// it doubles with each failure. Default 200, at least 1.
    #[serde(default = "default_backoff_initial")]
    pub backoff_initial_ms: u64,
    /// `uplink.backoff_max_ms`: the longest wait between reconnection attempts. Default
    /// 30 000, from `backoff_initial_ms` to 3 600 000.
    #[serde(default = "default_backoff_max")]
    pub backoff_max_ms: u64,
}

impl UplinkConfig {
    /// `backoff_initial_ms` as a duration.
    #[must_use]
    pub fn backoff_initial(&self) -> Duration {
        Duration::from_millis(self.backoff_initial_ms)
    }

    /// `backoff_max_ms` as a duration.
    #[must_use]
    pub fn backoff_max(&self) -> Duration {
        Duration::from_millis(self.backoff_max_ms)
    }
}

const fn default_transport() -> Transport {
    Transport::Tcp
}
const fn default_suite() -> Suite {
    Suite::ChaChaPolyBlake2s
}
const fn default_backoff_initial() -> u64 {
    DEFAULT_BACKOFF_INITIAL_MS
}
const fn default_backoff_max() -> u64 {
    DEFAULT_BACKOFF_MAX_MS
}

/// `[limits]`: the endpoint's limits. Each key defaults to the value of
/// [`EndpointLimits::default`] or [`veil_protocol::Limits::default`] named below.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// `limits.max_connections`: live connections, both directions and transports; inbound
    /// ones above it are refused with `REJECT(Busy)`. Default 10 000
    /// ([`EndpointLimits::max_connections`]).
    pub max_connections: usize,
    /// `limits.max_handshakes`: inbound handshakes in progress; new peers above it get
    /// `REJECT(Busy)`. Default 1 024 ([`EndpointLimits::max_handshakes`]).
    pub max_handshakes: usize,
    /// `limits.handshake_rate_per_sec`: sustained inbound handshakes per second from one IP
    /// address. Default 50 ([`EndpointLimits::handshake_rate_per_ip`]).
    pub handshake_rate_per_sec: f64,
    /// `limits.handshake_burst`: handshakes one IP address may start in a burst. Default 100
    /// ([`EndpointLimits::handshake_burst_per_ip`]).
    pub handshake_burst: u32,
    /// `limits.handshake_timeout_ms`: a handshake not complete by then is dropped (spec
    /// §5.7.3). Default 10 000 ([`veil_protocol::Limits::handshake_timeout`]), 1 to 60 000.
    pub handshake_timeout_ms: u64,
    /// `limits.idle_timeout_ms`: a connection that heard nothing authenticated for this long
    /// closes (spec §7.5). Default 60 000 ([`veil_protocol::Limits::idle_timeout`]); it must
    /// exceed `limits.keepalive_ms`.
    pub idle_timeout_ms: u64,
    /// `limits.keepalive_ms`: a connection that sent nothing for this long sends an empty
    /// packet (spec §7.5), on links and, on a cloud, on the end-to-end sessions. Peers whose
    /// idle timeout is shorter than the default 15 000 (devices that must notice a dead peer
    /// soon) need a shorter one here; a UDP link behind NAT may too. From 100 to 3 600 000
    /// ([`veil_protocol::Limits::keepalive_interval`]).
    pub keepalive_ms: u64,
    /// `limits.send_queue`: messages a connection queues for sending before the sender waits.
    /// Default 64 ([`EndpointLimits::send_queue`]).
    pub send_queue: usize,
    /// `limits.recv_queue`: received messages held for the application before the
    /// connection stops reading. Default 64 ([`EndpointLimits::recv_queue`]).
    pub recv_queue: usize,
    /// `limits.static_dh_cache`: entries of each static-static Diffie-Hellman cache (spec
    /// §11.11): one for the links' handshakes, and on a cloud one for the end-to-end sessions
    /// with devices; a peer that handshakes again costs one X25519 less. About 130 B per
    /// entry, allocated as peers arrive; `0` turns the caches off. Default 4 096
    /// ([`EndpointLimits::static_dh_cache`]), at most 1 048 576.
    pub static_dh_cache: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let endpoint = EndpointLimits::default();
        let protocol = veil_protocol::Limits::default();
        Self {
            max_connections: endpoint.max_connections,
            max_handshakes: endpoint.max_handshakes,
            handshake_rate_per_sec: endpoint.handshake_rate_per_ip,
            handshake_burst: endpoint.handshake_burst_per_ip,
            handshake_timeout_ms: protocol.handshake_timeout.as_micros() / 1_000,
            idle_timeout_ms: protocol.idle_timeout.as_micros() / 1_000,
            keepalive_ms: protocol.keepalive_interval.as_micros() / 1_000,
            send_queue: endpoint.send_queue,
            recv_queue: endpoint.recv_queue,
            static_dh_cache: endpoint.static_dh_cache,
        }
    }
}

impl LimitsConfig {
    /// The transports' limits: the defaults with this section's values.
    #[must_use]
    pub fn endpoint_limits(&self) -> EndpointLimits {
        let mut l = EndpointLimits::default();
        l.max_connections = self.max_connections;
        l.max_handshakes = self.max_handshakes;
        l.handshake_rate_per_ip = self.handshake_rate_per_sec;
        l.handshake_burst_per_ip = self.handshake_burst;
        l.send_queue = self.send_queue;
        l.recv_queue = self.recv_queue;
        l.static_dh_cache = self.static_dh_cache;
        l
    }

    /// The protocol's limits: the defaults (spec §7.7) with this section's timeouts.
    #[must_use]
    pub fn protocol_limits(&self) -> veil_protocol::Limits {
        veil_protocol::Limits {
            handshake_timeout: veil_protocol::Duration::from_millis(self.handshake_timeout_ms),
            idle_timeout: veil_protocol::Duration::from_millis(self.idle_timeout_ms),
            keepalive_interval: veil_protocol::Duration::from_millis(self.keepalive_ms),
            ..veil_protocol::Limits::default()
        }
    }
}

/// `sink.kind`: where a cloud's delivered messages go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SinkKind {
    /// JSON lines on standard output.
    Stdout,
    /// JSON lines appended to `sink.path`.
    File,
}

/// `[sink]`: where a cloud delivers device messages (one JSON line each).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// `sink.kind` (required in the section): `"stdout"` or `"file"`.
    pub kind: SinkKind,
    /// `sink.path`: the file to append to; required with `kind = "file"`, an error otherwise.
    /// Created if missing; its directory must exist.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// `sink.fsync`: with `kind = "file"`, sync the file to disk (`fdatasync`) after each
    /// batch of lines before the cloud commits them (spec §17.7), so that an acknowledged
    /// message survives a power loss, not only a crash of the process. Default `false`:
    /// lines are written and flushed to the operating system before they are committed.
    #[serde(default)]
    pub fsync: bool,
}

impl Default for SinkConfig {
    fn default() -> Self {
        Self { kind: SinkKind::Stdout, path: None, fsync: false }
    }
}

/// `[control]`: the cloud's local control socket.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// `control.socket` (required in the section): the Unix socket path; its directory must
    /// exist.
    pub socket: PathBuf,
    /// `control.command_ttl_secs`: how long a command waits in the cloud's outbox for its
    /// device to connect and acknowledge it (spec §17.6, §17.7); then it is dropped and the
    /// sink gets a record of it. Default 3 600 (an hour), from 1 to 2 592 000 (30 days).
    #[serde(default = "default_command_ttl")]
    pub command_ttl_secs: u64,
}

const fn default_command_ttl() -> u64 {
    3_600
}

/// `[spool]`: the gateway's spool ([`crate::spool`], spec §17.9).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    /// `spool.path` (required in the section): the redb database file, created if missing;
    /// its directory must exist. Keep it on a local disk: every stored batch is synced.
    pub path: PathBuf,
    /// `spool.max_bytes`: bytes stored in all (packets plus 41 B each). Default 67 108 864
    /// (64 MiB), from 65 536 to 2^40.
    #[serde(default = "default_spool_max_bytes")]
    pub max_bytes: u64,
    /// `spool.max_bytes_per_device`: bytes stored for one device, so that one device cannot
    /// fill the spool for the others. Default 1 048 576 (1 MiB), from 4 096 to `max_bytes`.
    #[serde(default = "default_spool_per_device")]
    pub max_bytes_per_device: u64,
    /// `spool.ttl_secs`: packets stored longer than this are dropped and counted. Default
    /// 86 400 (a day), from 60 to 2 592 000 (30 days).
    #[serde(default = "default_spool_ttl")]
    pub ttl_secs: u64,
}

const fn default_spool_max_bytes() -> u64 {
    64 << 20
}

const fn default_spool_per_device() -> u64 {
    1 << 20
}

const fn default_spool_ttl() -> u64 {
    86_400
}

impl SpoolConfig {
    /// The spool's settings.
    #[must_use]
    pub fn spool_config(&self) -> crate::spool::SpoolConfig {
        crate::spool::SpoolConfig::new(&self.path)
            .max_bytes(self.max_bytes)
            .max_bytes_per_source(self.max_bytes_per_device)
            .ttl(Duration::from_secs(self.ttl_secs))
    }
}

/// `[metrics]`: the Prometheus endpoint ([`crate::metrics::install`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `metrics.listen` (required in the section): the HTTP address serving `/metrics`, e.g.
    /// `"127.0.0.1:9464"`. Anyone who can reach it can read the metrics: keep it local or
    /// firewalled.
    #[serde(deserialize_with = "socket_addr")]
    pub listen: SocketAddr,
}

/// `log.level`: the least severe events logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Everything.
    Trace,
    /// Debugging detail.
    Debug,
    /// Normal operation (default).
    #[default]
    Info,
    /// Problems that do not stop the node.
    Warn,
    /// Failures only.
    Error,
    /// Nothing.
    Off,
}

impl LogLevel {
    /// The name, as `tracing_subscriber::EnvFilter` reads it.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Trace => "trace",
            Self::Debug => "debug",
            Self::Info => "info",
            Self::Warn => "warn",
            Self::Error => "error",
            Self::Off => "off",
        }
    }
}

/// `[log]`: logging.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `log.level`: `"trace"`, `"debug"`, `"info"` (default), `"warn"`, `"error"` or `"off"`.
    /// `--log-level` and `RUST_LOG` (full filter syntax) override it.
    #[serde(default)]
    pub level: LogLevel,
}

/// A serde error of a custom deserializer.
fn invalid<E: serde::de::Error>(msg: String) -> E {
    E::custom(msg)
}

fn parse_socket_addr<E: serde::de::Error>(s: &str) -> Result<SocketAddr, E> {
    s.parse().map_err(|_| invalid(format!("invalid socket address {s:?} (expected an IP address and port)")))
}

fn socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let s = String::deserialize(d)?;
    parse_socket_addr(&s)
}

fn opt_socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    socket_addr(d).map(Some)
}

fn transport<'de, D: Deserializer<'de>>(d: D) -> Result<Transport, D::Error> {
    let s = String::deserialize(d)?;
    match s.as_str() {
        "tcp" => Ok(Transport::Tcp),
        "udp" => Ok(Transport::Udp),
        _ => Err(invalid(format!("unknown transport {s:?}, expected \"tcp\" or \"udp\""))),
    }
}

fn suite<'de, D: Deserializer<'de>>(d: D) -> Result<Suite, D::Error> {
    let s = String::deserialize(d)?;
    Suite::ALL.into_iter().find(|suite| suite.noise_name() == s).ok_or_else(|| {
        let names: Vec<String> = Suite::ALL.iter().map(|suite| format!("{:?}", suite.noise_name())).collect();
        invalid(format!("unknown suite {s:?}, expected {}", names.join(" or ")))
    })
}

/// A path or an array of paths.
fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<PathBuf>, D::Error> {
    struct Paths;
    impl<'de> serde::de::Visitor<'de> for Paths {
        type Value = Vec<PathBuf>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a file path or an array of file paths")
        }

        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(vec![PathBuf::from(v)])
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(p) = seq.next_element::<PathBuf>()? {
                // More than any valid configuration holds; stops a huge array early.
                if out.len() == MAX_TRUST_ANCHORS {
                    return Err(invalid(format!("at most {MAX_TRUST_ANCHORS} files")));
                }
                out.push(p);
            }
            Ok(out)
        }
    }
    d.deserialize_any(Paths)
}

/// 1-based line and column (in characters) of byte offset `at` in `text`.
fn line_column(text: &str, at: usize) -> (usize, usize) {
    let at = at.min(text.len());
    let before = text.get(..at).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// A semantic error: the key and what is wrong with it.
type Problem = (String, String);

fn problem(key: &str, message: impl Into<String>) -> Problem {
    (key.to_owned(), message.into())
}

impl Config {
    /// Reads and validates the configuration file `path`. Relative paths in it resolve
    /// against `path`'s directory. No other file is opened: see [`Config::check`].
    ///
    /// # Errors
    /// [`ConfigError::Read`], [`ConfigError::Syntax`], [`ConfigError::Invalid`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let read_err = |source| ConfigError::Read { path: path.to_path_buf(), source };
        let file = File::open(path).map_err(read_err)?;
        let mut bytes = Vec::new();
        file.take(MAX_CONFIG_LEN + 1).read_to_end(&mut bytes).map_err(read_err)?;
        if bytes.len() as u64 > MAX_CONFIG_LEN {
            return Err(read_err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("larger than {MAX_CONFIG_LEN} bytes, not a configuration file"),
            )));
        }
        let text =
            String::from_utf8(bytes).map_err(|_| read_err(io::Error::new(io::ErrorKind::InvalidData, "not UTF-8")))?;
        Self::parse(&text, path)
    }

    /// Parses and validates configuration text as if read from the file `origin` (used in
    /// error messages and to resolve relative paths).
    ///
    /// # Errors
    /// [`ConfigError::Syntax`], [`ConfigError::Invalid`].
    pub fn parse(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        let file = origin.to_path_buf();
        let de = toml::Deserializer::parse(text).map_err(|e| {
            let (line, column) = line_column(text, e.span().map_or(0, |s| s.start));
            ConfigError::Syntax { file: file.clone(), line, column, message: e.message().trim().to_owned() }
        })?;
        let mut config: Self = serde_path_to_error::deserialize(de).map_err(|e| {
            let at = e.inner().span().map(|s| line_column(text, s.start));
            let path = e.path().to_string();
            let message = e.inner().message().trim().to_owned();
            // "missing field `x`" is about the key `x`, not its table.
            let (key, message) = match message.strip_prefix("missing field `").and_then(|m| m.strip_suffix('`')) {
                Some(field) if path == "." => (field.to_owned(), "required, but missing".to_owned()),
                Some(field) => (format!("{path}.{field}"), "required, but missing".to_owned()),
                None => (path, message),
            };
            ConfigError::Invalid { file: file.clone(), key, at, message }
        })?;
        config.source = file.clone();
        config.validate().map_err(|(key, message)| ConfigError::Invalid {
            file: file.clone(),
            key,
            at: None,
            message,
        })?;
        config.resolve_paths(origin.parent().unwrap_or_else(|| Path::new("")));
        Ok(config)
    }

    /// The file this configuration was read from.
    #[must_use]
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// Opens and parses every file this configuration names — the node key, its certificate,
    /// the CA keys, revocation lists and allowlist, the cloud's key — and checks them
    /// against each other; also that the directories of `sink.path` and `control.socket`
    /// exist. Reports the first problem, naming its key. This is `--check-config`.
    ///
    /// # Errors
    /// [`ConfigError::File`].
    pub fn check(&self) -> Result<(), ConfigError> {
        crate::trustload::LoadedNode::load(self)?;
        if let Some(SinkConfig { path: Some(path), .. }) = &self.sink {
            check_parent_dir("sink.path", path)?;
        }
        if let Some(control) = &self.control {
            check_parent_dir("control.socket", &control.socket)?;
        }
        if let Some(spool) = &self.spool {
            check_parent_dir("spool.path", &spool.path)?;
        }
        Ok(())
    }

    /// Rules that serde cannot express; the first broken one names its key.
    fn validate(&mut self) -> Result<(), Problem> {
        let only = |role: NodeRole| format!("only allowed with role = \"{role}\"");
        match self.role {
            NodeRole::Gateway => {
                if self.uplink.is_none() {
                    return Err(problem("uplink", "required with role = \"gateway\"; add an [uplink] section"));
                }
                if self.sink.is_some() {
                    return Err(problem("sink", only(NodeRole::Cloud)));
                }
                if self.control.is_some() {
                    return Err(problem("control", only(NodeRole::Cloud)));
                }
            }
            NodeRole::Cloud => {
                if self.uplink.is_some() {
                    return Err(problem("uplink", only(NodeRole::Gateway)));
                }
                if self.spool.is_some() {
                    return Err(problem("spool", only(NodeRole::Gateway)));
                }
                self.sink.get_or_insert_with(SinkConfig::default);
            }
        }
        if self.listen.tcp.is_none() && self.listen.udp.is_none() {
            return Err(problem("listen", "set listen.tcp, listen.udp or both: peers must be able to connect"));
        }
        self.validate_trust()?;
        if let Some(up) = &self.uplink {
            if up.address.port() == 0 {
                return Err(problem("uplink.address", format!("port 0 in {}: name the cloud's port", up.address)));
            }
            if up.backoff_initial_ms == 0 {
                return Err(problem("uplink.backoff_initial_ms", "must be at least 1"));
            }
            if up.backoff_max_ms < up.backoff_initial_ms || up.backoff_max_ms > MAX_BACKOFF_MS {
                return Err(problem(
                    "uplink.backoff_max_ms",
                    format!("must be from uplink.backoff_initial_ms ({}) to {MAX_BACKOFF_MS}", up.backoff_initial_ms),
                ));
            }
        }
        self.validate_limits()?;
        if let Some(sink) = &self.sink {
            match (sink.kind, &sink.path) {
                (SinkKind::File, None) => return Err(problem("sink.path", "required with sink.kind = \"file\"")),
                (SinkKind::Stdout, Some(_)) => {
                    return Err(problem("sink.path", "only used with sink.kind = \"file\""));
                }
                _ => {}
            }
        }
        if let Some(c) = &self.control {
            if !(1..=2_592_000).contains(&c.command_ttl_secs) {
                return Err(problem("control.command_ttl_secs", "must be from 1 to 2592000 (30 days)"));
            }
        }
        if let Some(sp) = &self.spool {
            if !(65_536..=1 << 40).contains(&sp.max_bytes) {
                return Err(problem("spool.max_bytes", "must be from 65536 to 1099511627776"));
            }
            if sp.max_bytes_per_device < 4_096 || sp.max_bytes_per_device > sp.max_bytes {
                return Err(problem(
                    "spool.max_bytes_per_device",
                    format!("must be from 4096 to spool.max_bytes ({})", sp.max_bytes),
                ));
            }
            if !(60..=2_592_000).contains(&sp.ttl_secs) {
                return Err(problem("spool.ttl_secs", "must be from 60 to 2592000 (30 days)"));
            }
        }
        if let Some(m) = &self.metrics {
            if self.listen.tcp == Some(m.listen) && m.listen.port() != 0 {
                return Err(problem("metrics.listen", format!("{} is also listen.tcp", m.listen)));
            }
        }
        Ok(())
    }

    fn validate_trust(&self) -> Result<(), Problem> {
        let t = &self.trust;
        let only = |key: &str, mode: TrustMode| problem(key, format!("only used with trust.mode = \"{mode}\""));
        match t.mode {
            TrustMode::Ca => {
                if t.ca.is_empty() {
                    return Err(problem("trust.ca", "required with trust.mode = \"ca\""));
                }
                if t.allowlist.is_some() {
                    return Err(only("trust.allowlist", TrustMode::Allowlist));
                }
                if t.crl.len() > t.ca.len() {
                    return Err(problem("trust.crl", "more revocation lists than CAs (one list per CA at most)"));
                }
                if t.clock_skew_secs.is_some_and(|s| s > MAX_CLOCK_SKEW_SECS) {
                    return Err(problem("trust.clock_skew_secs", format!("must be from 0 to {MAX_CLOCK_SKEW_SECS}")));
                }
                if self.node.certificate.is_none() {
                    return Err(problem(
                        "node.certificate",
                        "required with trust.mode = \"ca\": peers check this node's certificate",
                    ));
                }
            }
            TrustMode::Allowlist => {
                if t.allowlist.is_none() {
                    return Err(problem("trust.allowlist", "required with trust.mode = \"allowlist\""));
                }
                if !t.ca.is_empty() {
                    return Err(only("trust.ca", TrustMode::Ca));
                }
                if !t.crl.is_empty() {
                    return Err(only("trust.crl", TrustMode::Ca));
                }
                if t.clock_skew_secs.is_some() {
                    return Err(only("trust.clock_skew_secs", TrustMode::Ca));
                }
                if !t.gateways.is_empty() && self.role != NodeRole::Cloud {
                    return Err(problem("trust.gateways", "only used by a cloud"));
                }
            }
        }
        if t.mode == TrustMode::Ca && !t.gateways.is_empty() {
            return Err(only("trust.gateways", TrustMode::Allowlist));
        }
        Ok(())
    }

    fn validate_limits(&self) -> Result<(), Problem> {
        let l = &self.limits;
        let at_least_one = |key: &str, v: u64| if v == 0 { Err(problem(key, "must be at least 1")) } else { Ok(()) };
        at_least_one("limits.max_connections", l.max_connections as u64)?;
        at_least_one("limits.max_handshakes", l.max_handshakes as u64)?;
        at_least_one("limits.handshake_burst", u64::from(l.handshake_burst))?;
        at_least_one("limits.send_queue", l.send_queue as u64)?;
        at_least_one("limits.recv_queue", l.recv_queue as u64)?;
        if l.static_dh_cache > MAX_STATIC_DH_CACHE {
            return Err(problem("limits.static_dh_cache", format!("must be at most {MAX_STATIC_DH_CACHE}")));
        }
        if !(l.handshake_rate_per_sec.is_finite() && l.handshake_rate_per_sec > 0.0) {
            return Err(problem("limits.handshake_rate_per_sec", "must be a number above 0"));
        }
        if !(1..=MAX_HANDSHAKE_TIMEOUT_MS).contains(&l.handshake_timeout_ms) {
            return Err(problem(
                "limits.handshake_timeout_ms",
                format!("must be from 1 to {MAX_HANDSHAKE_TIMEOUT_MS}"),
            ));
        }
        if !(MIN_KEEPALIVE_MS..=MAX_KEEPALIVE_MS).contains(&l.keepalive_ms) {
            return Err(problem(
                "limits.keepalive_ms",
                format!("must be from {MIN_KEEPALIVE_MS} to {MAX_KEEPALIVE_MS}"),
            ));
        }
        let keepalive_ms = l.keepalive_ms;
        if l.idle_timeout_ms <= keepalive_ms {
            return Err(problem(
                "limits.idle_timeout_ms",
                format!("must exceed the keepalive interval ({keepalive_ms} ms), or idle peers would be dropped"),
            ));
        }
        Ok(())
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.node.key);
        self.node.certificate.iter_mut().for_each(fix);
        self.trust.ca.iter_mut().for_each(fix);
        self.trust.crl.iter_mut().for_each(fix);
        self.trust.allowlist.iter_mut().for_each(fix);
        if let Some(up) = &mut self.uplink {
            fix(&mut up.cloud_key);
        }
        if let Some(sink) = &mut self.sink {
            sink.path.iter_mut().for_each(fix);
        }
        if let Some(spool) = &mut self.spool {
            fix(&mut spool.path);
        }
        if let Some(control) = &mut self.control {
            fix(&mut control.socket);
        }
    }
}

fn check_parent_dir(key: &str, path: &Path) -> Result<(), ConfigError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if dir.is_dir() {
        Ok(())
    } else {
        Err(ConfigError::File { key: key.to_owned(), message: format!("directory not found: {}", dir.display()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_count_characters() {
        let text = "a = 1\nbé = \"x\"\n";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 6), (2, 1));
        // After "bé = " (6 bytes, 5 characters).
        assert_eq!(line_column(text, 12), (2, 6));
        assert_eq!(line_column(text, 10_000), (3, 1));
    }

    #[test]
    fn limits_defaults_are_the_transports_defaults() {
        let l = LimitsConfig::default();
        let e = l.endpoint_limits();
        let d = EndpointLimits::default();
        assert_eq!(
            (e.max_connections, e.max_handshakes, e.handshake_burst_per_ip, e.send_queue, e.recv_queue),
            (d.max_connections, d.max_handshakes, d.handshake_burst_per_ip, d.send_queue, d.recv_queue)
        );
        assert!((e.handshake_rate_per_ip - d.handshake_rate_per_ip).abs() < f64::EPSILON);
        let p = l.protocol_limits();
        let dp = veil_protocol::Limits::default();
        assert_eq!(
            (p.handshake_timeout, p.idle_timeout, p.keepalive_interval),
            (dp.handshake_timeout, dp.idle_timeout, dp.keepalive_interval)
        );
        assert_eq!(l.keepalive_ms, 15_000);
        // The numbers the documentation states.
        assert_eq!(
            (l.max_connections, l.max_handshakes, l.handshake_burst, l.handshake_timeout_ms, l.idle_timeout_ms),
            (10_000, 1_024, 100, 10_000, 60_000)
        );
        assert_eq!((l.send_queue, l.recv_queue, l.static_dh_cache), (64, 64, 4_096));
        assert_eq!(e.static_dh_cache, d.static_dh_cache);
        assert!((l.handshake_rate_per_sec - 50.0).abs() < f64::EPSILON);
    }
}
