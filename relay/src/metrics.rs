//! Prometheus metrics of the gateway and cloud roles, recorded through the `metrics` facade.
//!
//! Every metric name is a constant here and described in [`register`]; label keys and their
//! values are in [`labels`]. Code records with the facade's macros, e.g.
//!
//! ```
//! use veil_relay::metrics::{labels, HANDSHAKES};
//!
//! metrics::counter!(HANDSHAKES, labels::OUTCOME => labels::REFUSED, labels::REASON => "revoked").increment(1);
//! ```
//!
//! Without [`install`] (no `[metrics]` in the configuration) the facade has no recorder and
//! recording costs next to nothing. [`install`] starts the `/metrics` HTTP endpoint
//! (`metrics-exporter-prometheus`'s listener) and installs its recorder for the whole process;
//! it can succeed once per process.
//!
//! Metrics carry no keys, payloads or node names: labels are fixed vocabularies, so that a
//! peer cannot make the number of series grow.

use std::net::SocketAddr;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use ::metrics::{describe_counter, describe_gauge, Unit};
use metrics_exporter_prometheus::{BuildError, PrometheusBuilder, PrometheusHandle};

/// Gauge: live connections, by [`labels::ROLE`] (the peer's kind) and [`labels::TRANSPORT`].
pub const CONNECTIONS: &str = "veil_relay_connections";
/// Counter: inbound and outbound handshakes that ended, by [`labels::OUTCOME`] and
/// [`labels::REASON`] (`"none"` when accepted; else a short snake_case reason such as
/// `"revoked"`, `"bad_certificate"`, `"unauthorized"`, `"timeout"`, `"busy"`).
pub const HANDSHAKES: &str = "veil_relay_handshakes_total";
/// Counter: end-to-end handshakes with devices at the cloud (spec §16.6) that ended, by
/// `outcome` (`accepted`, `refused`: denied here, `failed`) and `reason` (`relayed` for an
/// accepted one; `unauthorized`, `revoked`, `bad_certificate`, `node_mismatch`; `timeout`,
/// `rejected`, `protocol`, `other`).
pub const E2E_HANDSHAKES: &str = "veil_relay_e2e_handshakes_total";
/// Counter (cloud): routed packets of end-to-end sessions the cloud dropped, by `reason`:
/// `no_route` (no relay announces the device), `no_session` (no session for the packet, e.g.
/// one that ended), `unknown_route`, `refused`, `init_limited`, `too_many_peers`,
/// `too_large`, `table_full`, `link_messages`, `not_a_relay`.
pub const E2E_DROPS: &str = "veil_relay_e2e_drops_total";
/// Counter (cloud): delivery events of the end-to-end sessions, by `event`: `retransmission`
/// (commands sent again), `duplicate` (device messages already delivered, dropped),
/// `route_back` (spec §17.4 rule 4), `ack_request` and `custody_lost` (spec §17.9).
pub const E2E_DELIVERY: &str = "veil_relay_e2e_delivery_total";
/// Counter: application messages, by [`labels::DIRECTION`] and [`labels::HOP`].
pub const MESSAGES: &str = "veil_relay_messages_total";
/// Counter: application payload bytes, by [`labels::DIRECTION`] and [`labels::HOP`].
pub const BYTES: &str = "veil_relay_bytes_total";
/// Counter: routing messages dropped, by [`labels::REASON`] (the routing reason in
/// snake_case, e.g. `"no_route"`, `"uplink_down"`, `"not_allowed"`, `"congested"`,
/// `"spool_full"`).
pub const ROUTING_DROPS: &str = "veil_relay_routing_drops_total";
/// Counter: envelopes a gateway forwarded (a `Forward` in, a `Deliver` out; spec §16.4).
pub const FORWARDED: &str = "veil_relay_forwarded_envelopes_total";
/// Counter: route announcements sent, by [`labels::KIND`] (`Route` or `Withdraw`, spec §16.3).
pub const ROUTE_ANNOUNCEMENTS: &str = "veil_relay_route_announcements_total";
/// Gauge: messages waiting in a queue, by [`labels::QUEUE`].
pub const QUEUE_DEPTH: &str = "veil_relay_queue_depth";
/// Gauge: 1 while the gateway's uplink to the cloud is up, else 0.
pub const UPLINK_UP: &str = "veil_relay_uplink_up";
/// Counter: uplink connection attempts after the first (reconnects).
pub const UPLINK_RECONNECTS: &str = "veil_relay_uplink_reconnects_total";
/// Counter: trust reloads (SIGHUP), by [`labels::OUTCOME`] ([`labels::ACCEPTED`] or
/// [`labels::FAILED`]).
pub const TRUST_RELOADS: &str = "veil_relay_trust_reloads_total";

/// Gauge: packets in the gateway's spool (spec §17.9).
pub const SPOOL_PACKETS: &str = "veil_relay_spool_packets";
/// Gauge: bytes in the gateway's spool, as its bounds count them (packet plus 41 B each).
pub const SPOOL_BYTES: &str = "veil_relay_spool_bytes";
/// Counter: packets stored durably in the spool (each acknowledged with `Stored`).
pub const SPOOL_APPENDED: &str = "veil_relay_spool_appended_total";
/// Counter: stored packets replayed to the cloud (taken by the uplink and removed).
pub const SPOOL_REPLAYED: &str = "veil_relay_spool_replayed_total";
/// Counter: packets the spool did not take, by [`labels::REASON`]: `"total"` (spool full),
/// `"per_device"` (the device's share full), `"queue"` (too many waiting for the disk),
/// `"bad_size"`, `"storage"` (a write failed). Each is answered `Unreachable { SpoolFull }`
/// (rate limited).
pub const SPOOL_REFUSED: &str = "veil_relay_spool_refused_total";
/// Counter: stored packets dropped after `spool.ttl_secs`.
pub const SPOOL_EXPIRED: &str = "veil_relay_spool_expired_total";
/// Counter: stored packets dropped otherwise, by [`labels::REASON`]: `"revoked"` (their
/// device was revoked), `"not_allowed"`, `"too_large"` (they can no longer go to the cloud).
pub const SPOOL_DROPPED: &str = "veil_relay_spool_dropped_total";

/// Label keys, and the values that have fixed vocabularies.
pub mod labels {
    /// Key: the peer's kind — [`DEVICE`], [`GATEWAY`] or [`CLOUD`].
    pub const ROLE: &str = "role";
    /// Key: the carrier — `"tcp"` or `"udp"` (`veil_transports::Transport`'s `Display`).
    pub const TRANSPORT: &str = "transport";
    /// Key: how something ended — [`ACCEPTED`], [`REFUSED`] or [`FAILED`].
    pub const OUTCOME: &str = "outcome";
    /// Key: why (snake_case, from a fixed set of reasons; `"none"` when there is none).
    pub const REASON: &str = "reason";
    /// Key: [`IN`] (received) or [`OUT`] (sent).
    pub const DIRECTION: &str = "direction";
    /// Key: the kind of link — [`DEVICE`] (a device's own link, at a gateway or directly at
    /// the cloud) or [`UPLINK`] (gateway ⇄ cloud).
    pub const HOP: &str = "hop";
    /// Key: the kind of announcement — [`ROUTE`] or [`WITHDRAW`].
    pub const KIND: &str = "kind";
    /// Key: which queue — e.g. [`UPLINK`] (the gateway's uplink send queue) or [`SINK`] (the
    /// cloud's sink).
    pub const QUEUE: &str = "queue";

    /// A device.
    pub const DEVICE: &str = "device";
    /// A gateway.
    pub const GATEWAY: &str = "gateway";
    /// A cloud endpoint.
    pub const CLOUD: &str = "cloud";
    /// The gateway ⇄ cloud link.
    pub const UPLINK: &str = "uplink";
    /// The cloud's message sink.
    pub const SINK: &str = "sink";
    /// Received.
    pub const IN: &str = "in";
    /// Sent.
    pub const OUT: &str = "out";
    /// Allowed / done.
    pub const ACCEPTED: &str = "accepted";
    /// Refused by a policy or trust check.
    pub const REFUSED: &str = "refused";
    /// Failed otherwise (I/O, timeout, bad file).
    pub const FAILED: &str = "failed";
    /// An end-to-end session through a gateway (the reason of an accepted one).
    pub const RELAYED: &str = "relayed";
    /// The peer's key does not hash to its route's node id (spec §16.6).
    pub const NODE_MISMATCH: &str = "node_mismatch";
    /// `Route` (spec §16.3).
    pub const ROUTE: &str = "route";
    /// `Withdraw` (spec §16.3).
    pub const WITHDRAW: &str = "withdraw";
    /// The reason when there is none.
    pub const NONE: &str = "none";
}

/// Describes every metric to the installed recorder (help text and unit). [`install`] calls
/// it; call it again only after installing another recorder yourself.
pub fn register() {
    describe_gauge!(CONNECTIONS, Unit::Count, "Live connections, by peer role and transport.");
    describe_counter!(HANDSHAKES, Unit::Count, "Handshakes that ended, by outcome and reason.");
    describe_counter!(
        E2E_HANDSHAKES,
        Unit::Count,
        "End-to-end handshakes with devices that ended, by outcome and reason."
    );
    describe_counter!(E2E_DROPS, Unit::Count, "Routed end-to-end packets the cloud dropped, by reason.");
    describe_counter!(E2E_DELIVERY, Unit::Count, "Delivery events of the end-to-end sessions, by event.");
    describe_counter!(MESSAGES, Unit::Count, "Application messages, by direction and hop.");
    describe_counter!(BYTES, Unit::Bytes, "Application payload bytes, by direction and hop.");
    describe_counter!(ROUTING_DROPS, Unit::Count, "Routing messages dropped, by reason.");
    describe_counter!(FORWARDED, Unit::Count, "Envelopes forwarded by the gateway.");
    describe_counter!(ROUTE_ANNOUNCEMENTS, Unit::Count, "Route announcements sent, by kind.");
    describe_gauge!(QUEUE_DEPTH, Unit::Count, "Messages waiting in a queue, by queue.");
    describe_gauge!(UPLINK_UP, Unit::Count, "1 while the gateway's uplink to the cloud is up, else 0.");
    describe_counter!(UPLINK_RECONNECTS, Unit::Count, "Uplink reconnection attempts.");
    describe_counter!(TRUST_RELOADS, Unit::Count, "Trust reloads, by outcome.");
    describe_gauge!(SPOOL_PACKETS, Unit::Count, "Packets in the gateway's spool.");
    describe_gauge!(SPOOL_BYTES, Unit::Bytes, "Bytes in the gateway's spool.");
    describe_counter!(SPOOL_APPENDED, Unit::Count, "Packets stored durably in the spool.");
    describe_counter!(SPOOL_REPLAYED, Unit::Count, "Stored packets replayed to the cloud.");
    describe_counter!(SPOOL_REFUSED, Unit::Count, "Packets the spool did not take, by reason.");
    describe_counter!(SPOOL_EXPIRED, Unit::Count, "Stored packets dropped after their time to live.");
    describe_counter!(SPOOL_DROPPED, Unit::Count, "Stored packets dropped otherwise, by reason.");
}

/// Why the metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetricsError {
    /// The HTTP listener cannot bind its address (in use, not local, no permission).
    #[error("metrics.listen {addr}: cannot listen: {reason}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The operating system's reason.
        reason: String,
    },
    /// This process already has a metrics recorder (a second [`install`]).
    #[error("a metrics recorder is already installed in this process")]
    AlreadyInstalled,
    /// [`install`] was called outside a tokio runtime.
    #[error("the metrics endpoint needs a tokio runtime")]
    NoRuntime,
    /// Any other failure of the exporter.
    #[error("metrics exporter: {0}")]
    Exporter(String),
}

/// The installed recorder: renders what `/metrics` serves.
#[derive(Debug, Clone)]
pub struct Metrics {
    handle: PrometheusHandle,
    listen: SocketAddr,
}

impl Metrics {
    /// The Prometheus text exposition, as `GET /metrics` returns it.
    #[must_use]
    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// The address `/metrics` is served on.
    #[must_use]
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }
}

/// The recorder of this process, once installed: the facade's recorder is global, so the
/// endpoint can be started once.
static INSTALLED: Mutex<Option<Metrics>> = Mutex::new(None);

/// Starts the Prometheus endpoint on `listen` (`GET /metrics`; any path but `/health` serves the
/// metrics, `/health` answers `OK`) on the current tokio runtime, installs its recorder as the
/// process's metrics recorder and describes every metric ([`register`]).
///
/// # Errors
/// [`MetricsError::Bind`] naming the address if it cannot be bound (nothing is installed then,
/// and a later call may succeed); [`MetricsError::AlreadyInstalled`] if this process already
/// has a recorder; [`MetricsError::NoRuntime`] outside a tokio runtime.
pub fn install(listen: SocketAddr) -> Result<Metrics, MetricsError> {
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| MetricsError::NoRuntime)?;
    let mut installed = INSTALLED.lock().unwrap_or_else(PoisonError::into_inner);
    if installed.is_some() {
        return Err(MetricsError::AlreadyInstalled);
    }
    let (recorder, exporter) = {
        let _entered = runtime.enter();
        PrometheusBuilder::new().with_http_listener(listen).build().map_err(|e| match e {
            BuildError::FailedToCreateHTTPListener(reason) => MetricsError::Bind { addr: listen, reason },
            other => MetricsError::Exporter(other.to_string()),
        })?
    };
    let handle = recorder.handle();
    ::metrics::set_global_recorder(recorder).map_err(|_| MetricsError::AlreadyInstalled)?;
    runtime.spawn(async move {
        if let Err(e) = exporter.await {
            tracing::warn!(error = ?e, "the metrics endpoint stopped");
        }
    });
    register();
    tracing::info!(%listen, "metrics endpoint listening");
    let metrics = Metrics { handle, listen };
    *installed = Some(metrics.clone());
    Ok(metrics)
}

/// The recorder [`install`] installed, if any.
#[must_use]
pub fn installed() -> Option<Metrics> {
    INSTALLED.lock().unwrap_or_else(PoisonError::into_inner).clone()
}

/// `GET /metrics` from `addr` with a hand-written HTTP/1.1 request (at most 5 s): the body,
/// or `None` if nothing answers (not listening yet). For tests and `veil-relay soak`.
pub async fn scrape(addr: SocketAddr) -> Option<String> {
    let get = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").await.ok()?;
        let mut response = Vec::new();
        (&mut stream).take(4 << 20).read_to_end(&mut response).await.ok()?;
        let text = String::from_utf8(response).ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
    };
    tokio::time::timeout(Duration::from_secs(5), get).await.ok().flatten()
}

/// The value of the sample of `name` whose labels include `labels` (the first such).
#[must_use]
pub fn sample(body: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    body.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (n, rest) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.strip_suffix('}')?),
            None => (series, ""),
        };
        if n != name {
            return None;
        }
        let has = |(k, v): &(&str, &str)| rest.split(',').any(|kv| kv == format!("{k}=\"{v}\""));
        labels.iter().all(has).then(|| value.parse().ok()).flatten()
    })
}

/// The sum of every sample of `name`, whatever its labels (0 when there is none).
#[must_use]
pub fn sample_sum(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let n = series.split_once('{').map_or(series, |(n, _)| n);
            (n == name).then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// Hands every event of `rx` to `count` until `stop` is cancelled or the sender is gone; events
/// missed because the receiver lagged are skipped (counting is best effort, never back pressure).
pub(crate) async fn count_each<T: Clone>(
    mut rx: tokio::sync::broadcast::Receiver<T>,
    stop: tokio_util::sync::CancellationToken,
    mut count: impl FnMut(T),
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let r = tokio::select! {
            () = stop.cancelled() => return,
            r = rx.recv() => r,
        };
        match r {
            Ok(event) => count(event),
            Err(RecvError::Lagged(_)) => {}
            Err(RecvError::Closed) => return,
        }
    }
}
