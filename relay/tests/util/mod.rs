//! Support for the multi-process tests (`relay/tests/processes.rs`): a provisioned fleet in a
//! temporary directory, the real `veil-relay` binary started as a cloud or gateway process
//! from TOML written here, and bounded ways to watch what those processes do (their sink
//! file, control socket, `/metrics` endpoint and logs).
//!
//! Every child is owned by a [`Proc`], whose `Drop` kills and reaps it, so no test path
//! leaves a process behind; when a test panics, the tail of every child's log is printed.
//! Every wait is bounded by [`WAIT`].
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

use std::fmt::Write as _;
use std::fs;
use std::future::Future;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use veil_protocol::trust::{CertRole, NodeId, RoleSet};
use veil_protocol::PublicKey;
use veil_relay::demo::{self, Fleet, SimDevice};
use veil_relay::keyfile::{self, KeyKind};
use veil_relay::tooling::{self, IssueRequest};
use veil_relay::trustload::DeviceFiles;
use veil_transports::{Authorizer, Connection, Endpoint, Error, NodeEvent, PeerRoles, RoutedEndpoint, Transport, Via};

/// The bound on every wait: a process becoming ready, a line reaching the sink, a metric
/// reaching a value, a message reaching a device.
pub const WAIT: Duration = Duration::from_secs(20);
/// How often a condition is polled.
const POLL: Duration = Duration::from_millis(25);
/// Starts of a process whose ports were taken by someone else in the meantime.
const START_ATTEMPTS: usize = 3;

/// The `veil-relay` binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_veil-relay");

/// A loopback TCP port that was free a moment ago (the child binds it; another process may
/// take it first, which [`start_cloud`] and [`start_gateway`] retry).
#[must_use]
pub fn free_tcp() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// A loopback UDP port that was free a moment ago.
#[must_use]
pub fn free_udp() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// Polls `f` every few milliseconds until it returns `Some`, at most [`WAIT`].
///
/// # Panics
/// When `WAIT` passes first, naming `what`.
pub async fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        tokio::time::sleep(POLL).await;
    }
}

/// [`eventually`] with an asynchronous check.
pub async fn eventually_async<T, F: Future<Output = Option<T>>>(what: &str, mut f: impl FnMut() -> F) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        tokio::time::sleep(POLL).await;
    }
}

/// Awaits `f`, at most [`WAIT`].
pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f).await.unwrap_or_else(|_| panic!("{what}: not within {WAIT:?}"))
}

// ---------------------------------------------------------------------------------------
// The fleet

/// A provisioned fleet (CA, cloud, gateway, devices) in a temporary directory.
pub struct Net {
    /// The directory (removed on drop).
    pub tmp: tempfile::TempDir,
    /// What `demo::provision` wrote.
    pub fleet: Fleet,
}

impl Net {
    /// Provisions a CA, a cloud, a gateway and `devices` devices.
    #[must_use]
    pub fn provision(devices: usize) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let fleet = demo::provision(tmp.path(), devices).unwrap();
        Self { tmp, fleet }
    }

    /// The directory.
    #[must_use]
    pub fn dir(&self) -> &Path {
        self.tmp.path()
    }

    /// The CA's directory (`ca init`, `revoke`).
    #[must_use]
    pub fn ca_dir(&self) -> PathBuf {
        self.dir().join("ca")
    }

    /// Issues one more key pair and certificate of `role` from the fleet's CA, as
    /// `<name>.key` and `<name>.cert`.
    pub fn issue(&self, name: &str, role: CertRole) {
        issue(self.dir(), &self.ca_dir(), name, role);
    }

    /// Device `i`'s files (key, certificate, the fleet's CA).
    #[must_use]
    pub fn device(&self, i: usize) -> DeviceFiles {
        let (key, cert) = &self.fleet.devices[i];
        DeviceFiles::load(key, cert, &self.fleet.ca_pub).unwrap()
    }

    /// The key file of device `i`'s public key.
    #[must_use]
    pub fn device_pub(&self, i: usize) -> PathBuf {
        let mut p = self.fleet.devices[i].0.clone().into_os_string();
        p.push(".pub");
        PathBuf::from(p)
    }

    /// The files of a node provisioned as `<name>.key` / `<name>.cert` (any role), with the
    /// fleet's CA.
    #[must_use]
    pub fn node(&self, name: &str) -> DeviceFiles {
        let d = self.dir();
        DeviceFiles::load(&d.join(format!("{name}.key")), &d.join(format!("{name}.cert")), &self.fleet.ca_pub).unwrap()
    }

    /// The public key of `<name>.key`.
    #[must_use]
    pub fn public(&self, name: &str) -> PublicKey {
        let k = keyfile::read_key(&self.dir().join(format!("{name}.key.pub")), KeyKind::NodePublic).unwrap();
        PublicKey(*k)
    }

    /// The cloud's static key.
    #[must_use]
    pub fn cloud_key(&self) -> PublicKey {
        self.public("cloud")
    }
}

/// `keygen` and `cert issue` of `role` from the CA in `ca`, as `dir/<name>.key`, `.cert`.
pub fn issue(dir: &Path, ca: &Path, name: &str, role: CertRole) {
    let key = dir.join(format!("{name}.key"));
    tooling::keygen(&key, false).unwrap();
    tooling::cert_issue(IssueRequest {
        ca: ca.to_path_buf(),
        key: dir.join(format!("{name}.key.pub")),
        name: name.to_owned(),
        role,
        groups: Vec::new(),
        not_before: None,
        days: 1,
        out: dir.join(format!("{name}.cert")),
        force: false,
    })
    .unwrap();
}

/// A node's id in the form the sink and the control socket use (32 hex digits).
#[must_use]
pub fn hex_id(key: &PublicKey) -> String {
    NodeId::from_public_key(key).to_string()
}

/// A path as a TOML string.
#[must_use]
pub fn toml_path(p: &Path) -> String {
    // Temporary paths hold no quote or backslash; Debug quoting is TOML's basic string then.
    format!("{:?}", p.display().to_string())
}

// ---------------------------------------------------------------------------------------
// Processes

/// A child process running the binary, killed and reaped on drop.
pub struct Proc {
    child: Option<Child>,
    /// A name for messages.
    pub name: String,
    /// Its standard output, captured to a file.
    pub stdout: PathBuf,
    /// Its standard error (its logs), captured to a file.
    pub stderr: PathBuf,
}

impl Proc {
    /// Starts `veil-relay args…` with standard output and error in `dir/<name>.stdout` and
    /// `.stderr` (appended: a restarted node keeps one log). Logs carry no colours, and
    /// `RUST_LOG` is removed so that the log level is the one the arguments give.
    #[must_use]
    pub fn spawn(dir: &Path, name: &str, args: &[&str]) -> Self {
        let stdout = dir.join(format!("{name}.stdout"));
        let stderr = dir.join(format!("{name}.stderr"));
        let open = |p: &Path| fs::OpenOptions::new().create(true).append(true).open(p).unwrap();
        let child = Command::new(BIN)
            .args(args)
            .current_dir(dir)
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::from(open(&stdout)))
            .stderr(Stdio::from(open(&stderr)))
            .spawn()
            .unwrap();
        Self { child: Some(child), name: name.to_owned(), stdout, stderr }
    }

    /// Its process id.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Sends a signal (`"TERM"`, `"HUP"`, …) with `kill(1)`.
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill").arg(format!("-{sig}")).arg(self.pid().to_string()).status().unwrap();
        assert!(status.success(), "kill -{sig} {}", self.name);
    }

    /// SIGKILL, and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM (a graceful drain), and waits for the exit, at most [`WAIT`].
    pub async fn terminate(&mut self) -> ExitStatus {
        self.signal("TERM");
        let name = self.name.clone();
        eventually(&format!("{name} exits after SIGTERM"), || self.exited()).await
    }

    /// The exit status, if it has exited (reaped then).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
        if status.is_some() {
            self.child = None;
        }
        status
    }

    /// Everything it logged so far.
    #[must_use]
    pub fn log(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Everything it wrote to standard output so far.
    #[must_use]
    pub fn output(&self) -> String {
        fs::read_to_string(&self.stdout).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(60)..];
            let mut s = format!("----- last lines of {} ({}) -----\n", self.name, self.stderr.display());
            for l in tail {
                let _ = writeln!(s, "{l}");
            }
            eprint!("{s}");
        }
    }
}

/// The outcome of one start attempt.
enum Started {
    Ready,
    /// The process exited before it was ready (a port taken by someone else, most likely).
    Exited(ExitStatus),
}

/// Waits until `ready` holds or the process exits, at most [`WAIT`].
async fn wait_ready<F: Future<Output = bool>>(p: &mut Proc, mut ready: impl FnMut() -> F) -> Started {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = p.exited() {
            return Started::Exited(status);
        }
        if ready().await {
            return Started::Ready;
        }
        assert!(Instant::now() < deadline, "{} not ready within {WAIT:?}:\n{}", p.name, p.log());
        tokio::time::sleep(POLL).await;
    }
}

// ---------------------------------------------------------------------------------------
// The cloud

/// A running `veil-relay cloud`.
pub struct CloudProc {
    /// The process.
    pub proc: Proc,
    /// Its configuration file.
    pub config: PathBuf,
    /// TCP listener (gateway uplinks, devices).
    pub tcp: SocketAddr,
    /// UDP listener.
    pub udp: SocketAddr,
    /// `/metrics`.
    pub metrics: SocketAddr,
    /// The sink file (JSON lines).
    pub sink: PathBuf,
    /// The control socket.
    pub control: PathBuf,
}

fn write_cloud_config(net: &Net, tcp: SocketAddr, udp: SocketAddr, metrics: SocketAddr) -> PathBuf {
    let d = net.dir();
    let text = format!(
        "role = \"cloud\"\n\n[node]\nkey = {key}\ncertificate = {cert}\n\n\
         [trust]\nmode = \"ca\"\nca = {ca}\ncrl = {crl}\n\n\
         [listen]\ntcp = \"{tcp}\"\nudp = \"{udp}\"\n\n\
         [sink]\nkind = \"file\"\npath = {sink}\n\n[control]\nsocket = {control}\ncommand_ttl_secs = {COMMAND_TTL_SECS}\n\n\
         [metrics]\nlisten = \"{metrics}\"\n",
        key = toml_path(&d.join("cloud.key")),
        cert = toml_path(&d.join("cloud.cert")),
        ca = toml_path(&net.fleet.ca_pub),
        crl = toml_path(&net.ca_dir().join(tooling::CA_CRL)),
        sink = toml_path(&d.join("messages.jsonl")),
        control = toml_path(&d.join("control.sock")),
    );
    let path = d.join("cloud-test.toml");
    fs::write(&path, text).unwrap();
    path
}

/// Starts the cloud on fresh loopback ports (retried if a port was taken meanwhile) and
/// waits until it listens.
pub async fn start_cloud(net: &Net) -> CloudProc {
    for attempt in 1..=START_ATTEMPTS {
        let (tcp, udp, metrics) = (free_tcp(), free_udp(), free_tcp());
        let config = write_cloud_config(net, tcp, udp, metrics);
        let proc = Proc::spawn(net.dir(), "cloud", &["cloud", "--config", config.to_str().unwrap()]);
        let d = net.dir();
        let mut c = CloudProc {
            proc,
            config,
            tcp,
            udp,
            metrics,
            sink: d.join("messages.jsonl"),
            control: d.join("control.sock"),
        };
        match c.wait_up(0).await {
            Started::Ready => return c,
            Started::Exited(s) if attempt < START_ATTEMPTS => eprintln!("cloud exited ({s}); new ports"),
            Started::Exited(s) => panic!("the cloud did not start ({s}):\n{}", c.proc.log()),
        }
    }
    unreachable!("the loop returns or panics")
}

impl CloudProc {
    /// Waits for the `ups`-th (0-based) "cloud up" line of the log and the metrics endpoint.
    async fn wait_up(&mut self, ups: usize) -> Started {
        let (stderr, metrics) = (self.proc.stderr.clone(), self.metrics);
        wait_ready(&mut self.proc, || {
            let stderr = stderr.clone();
            async move {
                let log = fs::read_to_string(&stderr).unwrap_or_default();
                log.matches("cloud up").count() > ups && scrape(metrics).await.is_some()
            }
        })
        .await
    }

    /// SIGKILLs the cloud and starts it again on the same ports (its sink is appended to).
    pub async fn restart(&mut self) {
        let ups = self.proc.log().matches("cloud up").count();
        self.proc.kill();
        for attempt in 1..=START_ATTEMPTS {
            self.proc = Proc::spawn(
                self.config.parent().unwrap(),
                "cloud",
                &["cloud", "--config", self.config.to_str().unwrap()],
            );
            match self.wait_up(ups).await {
                Started::Ready => return,
                Started::Exited(s) if attempt < START_ATTEMPTS => {
                    eprintln!("restarted cloud exited ({s}); again");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Started::Exited(s) => panic!("the cloud did not restart ({s}):\n{}", self.proc.log()),
            }
        }
    }

    /// The sink's lines so far.
    #[must_use]
    pub fn sink_lines(&self) -> Vec<SinkLine> {
        read_sink(&self.sink)
    }

    /// Waits for a sink line matching `pred`.
    pub async fn wait_line(&self, what: &str, pred: impl Fn(&SinkLine) -> bool) -> SinkLine {
        eventually(what, || self.sink_lines().into_iter().find(&pred)).await
    }

    /// Sends a command for `device` through the control socket; the cloud's answer.
    pub async fn command(&self, device: &PublicKey, channel: u16, text: &str) -> serde_json::Value {
        let line = serde_json::json!({ "device": hex_id(device), "channel": channel, "payload_text": text });
        within("a control socket answer", control(&self.control, &line.to_string())).await
    }
}

/// One command line to a control socket and its one-line answer.
pub async fn control(socket: &Path, line: &str) -> serde_json::Value {
    let stream = UnixStream::connect(socket).await.unwrap();
    let (r, mut w) = stream.into_split();
    w.write_all(format!("{line}\n").as_bytes()).await.unwrap();
    let mut answer = String::new();
    BufReader::new(r).take(64 * 1024).read_line(&mut answer).await.unwrap();
    serde_json::from_str(answer.trim_end()).unwrap()
}

// ---------------------------------------------------------------------------------------
// Gateways

/// A running `veil-relay gateway` with `--log-level trace --audit-tap`.
pub struct GatewayProc {
    /// The process.
    pub proc: Proc,
    /// The name of its key and certificate files (`<name>.key`, `<name>.cert`).
    pub name: String,
    /// Its configuration file.
    pub config: PathBuf,
    /// Device links over TCP.
    pub tcp: SocketAddr,
    /// Device links over UDP.
    pub udp: SocketAddr,
    /// `/metrics`.
    pub metrics: SocketAddr,
    /// The audit tap (one hex line per end-to-end packet passed on).
    pub tap: PathBuf,
    /// Its static key.
    pub key: PublicKey,
}

/// Starts the gateway whose files are `<name>.key` / `<name>.cert`, with its uplink to
/// `cloud` over `uplink`, on fresh loopback ports (retried if a port was taken meanwhile),
/// and waits until its uplink is up.
pub async fn start_gateway(net: &Net, name: &str, cloud: &CloudProc, uplink: Transport) -> GatewayProc {
    let cloud_addr = if uplink == Transport::Udp { cloud.udp } else { cloud.tcp };
    start_gateway_to(net, name, cloud_addr, uplink, "").await
}

/// [`start_gateway`] with the uplink to `cloud_addr` (e.g. a proxy in front of the cloud)
/// and `extra` appended to the configuration (e.g. a `[spool]` section).
pub async fn start_gateway_to(
    net: &Net,
    name: &str,
    cloud_addr: SocketAddr,
    uplink: Transport,
    extra: &str,
) -> GatewayProc {
    for attempt in 1..=START_ATTEMPTS {
        let (tcp, udp, metrics) = (free_tcp(), free_udp(), free_tcp());
        let d = net.dir();
        let text = format!(
            "role = \"gateway\"\n\n[node]\nkey = {key}\ncertificate = {cert}\n\n\
             [trust]\nmode = \"ca\"\nca = {ca}\ncrl = {crl}\n\n\
             [listen]\ntcp = \"{tcp}\"\nudp = \"{udp}\"\n\n\
             [uplink]\naddress = \"{cloud_addr}\"\ntransport = \"{uplink}\"\ncloud_key = {cloud_key}\n\
             backoff_initial_ms = 50\nbackoff_max_ms = 500\n\n\
             [metrics]\nlisten = \"{metrics}\"\n{extra}",
            key = toml_path(&d.join(format!("{name}.key"))),
            cert = toml_path(&d.join(format!("{name}.cert"))),
            ca = toml_path(&net.fleet.ca_pub),
            crl = toml_path(&net.ca_dir().join(tooling::CA_CRL)),
            cloud_key = toml_path(&net.fleet.cloud_pub),
        );
        let config = d.join(format!("{name}-test.toml"));
        fs::write(&config, text).unwrap();
        let tap = d.join(format!("{name}.tap"));
        let mut g = GatewayProc {
            proc: spawn_gateway(d, name, &config, &tap),
            name: name.to_owned(),
            config,
            tcp,
            udp,
            metrics,
            tap,
            key: net.public(name),
        };
        match g.wait_uplink().await {
            Started::Ready => return g,
            Started::Exited(s) if attempt < START_ATTEMPTS => eprintln!("{name} exited ({s}); new ports"),
            Started::Exited(s) => panic!("{name} did not start ({s}):\n{}", g.proc.log()),
        }
    }
    unreachable!("the loop returns or panics")
}

/// `veil-relay gateway --config F --log-level trace --audit-tap TAP`.
fn spawn_gateway(dir: &Path, name: &str, config: &Path, tap: &Path) -> Proc {
    let (config, tap) = (config.to_str().unwrap(), tap.to_str().unwrap());
    Proc::spawn(dir, name, &["gateway", "--config", config, "--log-level", "trace", "--audit-tap", tap])
}

impl GatewayProc {
    /// Waits until `/metrics` reports the uplink up.
    async fn wait_uplink(&mut self) -> Started {
        let metrics = self.metrics;
        wait_ready(&mut self.proc, || async move {
            scrape(metrics).await.and_then(|b| metric(&b, "veil_relay_uplink_up", &[])) == Some(1.0)
        })
        .await
    }

    /// SIGKILLs the gateway and starts it again on the same ports.
    pub async fn restart(&mut self) {
        self.proc.kill();
        for attempt in 1..=START_ATTEMPTS {
            self.proc = spawn_gateway(self.config.parent().unwrap(), &self.name, &self.config, &self.tap);
            match self.wait_uplink().await {
                Started::Ready => return,
                Started::Exited(s) if attempt < START_ATTEMPTS => {
                    eprintln!("restarted {} exited ({s}); again", self.name);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Started::Exited(s) => panic!("{} did not restart ({s}):\n{}", self.name, self.proc.log()),
            }
        }
    }

    /// SIGKILLs the gateway and starts it again on the same ports, waiting only for its
    /// `/metrics` endpoint (its uplink may be down).
    #[allow(dead_code)] // used by spool.rs only
    pub async fn restart_offline(&mut self) {
        self.proc.kill();
        self.proc = spawn_gateway(self.config.parent().unwrap(), &self.name, &self.config, &self.tap);
        let metrics = self.metrics;
        if let Started::Exited(s) = wait_ready(&mut self.proc, || async move { scrape(metrics).await.is_some() }).await
        {
            panic!("{} did not restart ({s}):\n{}", self.name, self.proc.log());
        }
    }

    /// Its node id as the sink names it (`relay`).
    #[must_use]
    pub fn id(&self) -> String {
        hex_id(&self.key)
    }

    /// The device-link address for `transport`.
    #[must_use]
    pub const fn addr(&self, transport: Transport) -> SocketAddr {
        match transport {
            Transport::Tcp => self.tcp,
            Transport::Udp => self.udp,
        }
    }

    /// The current value of a metric (0 when not yet recorded).
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let body = within("a /metrics answer", scrape(self.metrics)).await.expect("the metrics endpoint answers");
        metric(&body, name, labels).unwrap_or(0.0)
    }

    /// Waits until a metric satisfies `pred`; its value.
    pub async fn wait_metric(&self, name: &str, labels: &[(&str, &str)], pred: impl Fn(f64) -> bool) -> f64 {
        let addr = self.metrics;
        let what = format!("{name}{labels:?} on {}", self.name);
        eventually_async(&what, || async {
            let v = scrape(addr).await.map(|b| metric(&b, name, labels).unwrap_or(0.0))?;
            pred(v).then_some(v)
        })
        .await
    }

    /// The end-to-end packets in the audit tap so far.
    #[must_use]
    pub fn tapped(&self) -> Vec<Vec<u8>> {
        fs::read_to_string(&self.tap)
            .unwrap_or_default()
            .lines()
            .map(|l| hex::decode(l).unwrap_or_else(|e| panic!("audit tap line {l:?}: {e}")))
            .collect()
    }
}

// ---------------------------------------------------------------------------------------
// Metrics

pub use veil_relay::metrics::{sample as metric, scrape};

// ---------------------------------------------------------------------------------------
// The sink

pub use veil_relay::sink::SinkLine;

/// The complete message lines of a sink file (a line still being written is skipped, and
/// so is a line a SIGKILL cut short, which the restarted cloud ended with a newline).
#[must_use]
pub fn read_sink(path: &Path) -> Vec<SinkLine> {
    veil_relay::sink::read_lines(path).unwrap()
}

/// The complete records of kind `record` (`"message"`, `"command"`) of a sink file.
#[must_use]
pub fn sink_records(path: &Path, record: &str) -> Vec<serde_json::Value> {
    veil_relay::sink::read_records(path, record).unwrap()
}

/// `control.command_ttl_secs` of the test clouds.
pub const COMMAND_TTL_SECS: u64 = 5;

// ---------------------------------------------------------------------------------------
// Devices

/// A device's link endpoint as `SimDevice` builds it: its certificate, trust in the fleet
/// CA, routing on.
pub async fn device_endpoint(files: &DeviceFiles, transport: Transport) -> Endpoint {
    let roles = PeerRoles::new(RoleSet::NONE, RoleSet::UPSTREAM);
    let mut b = Endpoint::builder(files.identity.clone())
        .authorizer(Authorizer::trust(files.trust.clone(), roles))
        .certificate_chain(&files.certificate_chain)
        .routing(true);
    if transport == Transport::Udp {
        b = b.bind_udp(SocketAddr::from(([127, 0, 0, 1], 0)));
    }
    b.bind().await.unwrap()
}

/// A device linked to `gw` over `transport` with an end-to-end session to the cloud.
pub async fn sim_device(net: &Net, i: usize, gw: &GatewayProc, transport: Transport) -> SimDevice {
    let files = net.device(i);
    within("a device session", SimDevice::connect(&files, transport, gw.addr(transport), gw.key, net.cloud_key()))
        .await
        .unwrap_or_else(|e| panic!("device {i} over {transport} to {}: {e}", gw.name))
}

/// A new link from the device's endpoint to `gw`, handed to its end-to-end endpoint.
pub async fn relink(d: &SimDevice, gw: &GatewayProc, transport: Transport) -> Connection {
    let link = within(
        "a device link",
        d.endpoint.connect_expecting(transport, gw.addr(transport), Some(gw.key), RoleSet::GATEWAY),
    )
    .await
    .unwrap();
    d.routed.add_relay_link(link.clone());
    link
}

/// Sends to the cloud, retrying (bounded) while the device has no route yet (a link just
/// added has not been announced the cloud yet).
pub async fn send_when_routed(d: &SimDevice, channel: u16, payload: &str) {
    let payload = Bytes::copy_from_slice(payload.as_bytes());
    let deadline = Instant::now() + WAIT;
    loop {
        match d.send(channel, payload.clone()).await {
            Ok(()) => return,
            Err(Error::NoRoute) if Instant::now() < deadline => tokio::time::sleep(POLL).await,
            Err(e) => panic!("send: {e}"),
        }
    }
}

/// The next data message an end-to-end endpoint receives (other events skipped), at most
/// [`WAIT`]: sender, channel, payload, and the relay it came through.
pub async fn next_message(routed: &RoutedEndpoint) -> (NodeId, u16, Bytes, Via) {
    within("a message at the device", async {
        loop {
            if let NodeEvent::Message { node, channel, payload, via, .. } = routed.next_event().await.unwrap() {
                return (node, channel, payload, via);
            }
        }
    })
    .await
}

/// Whether `needle` occurs in `hay`.
#[must_use]
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}
