//! Gateway memory per attached idle device (issue 5): the growth of a gateway process's resident
//! set (`VmRSS`) over [`DEVICES`] attached idle devices, divided by their number; and, in the
//! same run, the same figure for a plain veil-transports endpoint process holding the same
//! devices' links, the reference.
//!
//! A bench binary, not criterion: `cargo bench -p veil-benches --bench relay_memory` measures;
//! `cargo test --benches` runs it with a few devices only, to check that it works.
//! `VEIL_RELAY_DEVICES` sets the number of devices (default 1 000; up to ≈ 9 000 with the
//! machines' 20 000 open files, the devices' sockets all being in this process).
//!
//! The gateway runs alone in a child process, so that its resident set holds nothing of the
//! devices or the cloud: this binary starts itself with `VEIL_RELAY_MEMORY_ROLE=gateway`, which
//! runs `veil_relay::run::gateway` (what `veil-relay gateway --config F` runs, on the same
//! runtime) from a configuration file written here; with `VEIL_RELAY_BIN` set to a `veil-relay`
//! executable, that executable is started instead. The fleet (CA, cloud, gateway and device
//! certificates) is provisioned with veil-relay's tooling; the cloud runs in this process
//! (`veil_relay::cloud::Cloud`), and so do the devices, each a [`SimDevice`]: a TCP link to the
//! gateway and an end-to-end session with the cloud through it, then idle.
//!
//! The reference process (`VEIL_RELAY_MEMORY_ROLE=endpoint`) is a plain `Endpoint` with the
//! gateway's identity, certificate, trust and limits, listening where the gateway would, each
//! accepted connection held by a task waiting in `recv()`; the same devices link to it (link
//! only: there is nothing to hold an end-to-end session with).
//!
//! Per subject: [`WARM_UP`] devices attach first, the process settles and its RSS is read;
//! [`DEVICES`] more attach, and once all are up and the process has settled for [`SETTLE`] its
//! RSS is read again. RSS counts user-space memory (heap, tasks, buffers), not the kernel's
//! socket buffers.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use veil_benches::net::{self, NetError};
use veil_benches::relay::{self, RelayFleet, SimDevice, Tally};
use veil_benches::timing::Plan;
use veil_benches::VEIL_BUILD;
use veil_relay::cloud::Cloud;
use veil_relay::run::RunOptions;
use veil_relay::trustload::DeviceFiles;
use veil_transports::{Authorizer, Connection, Endpoint, Transport};

/// Devices measured, unless `VEIL_RELAY_DEVICES` says otherwise.
const DEVICES: usize = 1_000;
/// Devices attached before the baseline, so that it includes everything paid once (runtime,
/// allocator arenas, the forwarding state's first allocations).
const WARM_UP: usize = 50;
/// Devices connecting at once.
const CONNECT_CONCURRENCY: usize = 32;
/// Wait after the last device before reading the RSS.
const SETTLE: Duration = Duration::from_secs(2);
/// Longest any step may take before the benchmark gives up.
const STEP_TIMEOUT: Duration = Duration::from_secs(300);

const ROLE: &str = "VEIL_RELAY_MEMORY_ROLE";
const CONFIG: &str = "VEIL_RELAY_MEMORY_CONFIG";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Subject {
    /// The gateway role.
    Gateway,
    /// A plain endpoint holding the same links.
    Endpoint,
}

impl Subject {
    const ALL: [Self; 2] = [Self::Gateway, Self::Endpoint];

    fn name(self) -> &'static str {
        match self {
            Self::Gateway => "gateway",
            Self::Endpoint => "endpoint",
        }
    }
}

fn broken(what: impl std::fmt::Display) -> NetError {
    NetError::Broken(what.to_string())
}

async fn within<T>(what: &str, f: impl std::future::Future<Output = Result<T, NetError>>) -> Result<T, NetError> {
    tokio::time::timeout(STEP_TIMEOUT, f).await.map_err(|_| broken(format!("{what} timed out")))?
}

fn main() -> ExitCode {
    let r = match std::env::var(ROLE).as_deref() {
        Ok("gateway") => return gateway_main(),
        Ok("endpoint") => endpoint_main(),
        _ => orchestrate(),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("relay_memory: {e}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The bench process: fleet, cloud, devices; starts and measures the subject processes.

#[derive(Debug, Clone, Copy)]
struct Figures {
    devices: usize,
    before: u64,
    after: u64,
}

impl Figures {
    fn per_device(&self) -> f64 {
        self.after.saturating_sub(self.before) as f64 / self.devices as f64
    }
}

fn orchestrate() -> Result<(), NetError> {
    let Some(plan) = Plan::from_args() else { return Ok(()) };
    let (n, warm) = if plan.is_measuring() {
        let n = match std::env::var("VEIL_RELAY_DEVICES") {
            Ok(v) => v.parse().map_err(|_| broken(format!("VEIL_RELAY_DEVICES={v}: not a number")))?,
            Err(_) => DEVICES,
        };
        (n, WARM_UP)
    } else {
        (10, 2)
    };
    let limit = rlimit::increase_nofile_limit(u64::MAX)?;
    let fleet = RelayFleet::provision(warm + n)?;
    let files = (0..fleet.devices()).map(|i| fleet.device(i)).collect::<Result<Vec<_>, _>>()?;
    let files = Arc::new(files);
    let rt = net::runtime()?;
    let results = rt.block_on(async {
        let cloud = Arc::new(Cloud::start(fleet.cloud_settings(64)?).await.map_err(broken)?);
        let _tally = Tally::spawn(Arc::clone(&cloud));
        let cloud_addr = cloud.local_tcp_addr().ok_or_else(|| broken("the cloud has no TCP listener"))?;
        let mut results = Vec::new();
        for subject in Subject::ALL {
            let f = measure(subject, &fleet, &files, &cloud, cloud_addr, warm, n).await?;
            results.push((subject, f));
        }
        cloud.shutdown(Duration::from_secs(2)).await;
        Ok::<_, NetError>(results)
    })?;
    if !plan.is_measuring() {
        return Ok(());
    }
    let how = match std::env::var("VEIL_RELAY_BIN") {
        Ok(bin) => format!("`{bin} gateway` (that executable's own build)"),
        Err(_) => format!("veil_relay::run::gateway in a child process (this build, Veil with {VEIL_BUILD})"),
    };
    println!(
        "\nIdle devices: RSS growth of the subject process over {n} devices attached after {warm} warm-up ones, \
         divided by {n}; gateway: {how}, devices linked over TCP with an end-to-end session with the cloud each; \
         endpoint: a plain Endpoint holding the same links (Veil with {VEIL_BUILD}); open-file limit {limit}:"
    );
    for (subject, f) in &results {
        println!(
            "  {:<8} {:>7.0} B per device ({:.1} MiB in all; RSS {:.1} → {:.1} MiB)",
            subject.name(),
            f.per_device(),
            f.after.saturating_sub(f.before) as f64 / 1_048_576.0,
            f.before as f64 / 1_048_576.0,
            f.after as f64 / 1_048_576.0
        );
    }
    let per = |s: Subject| results.iter().find(|(x, _)| *x == s).map(|(_, f)| f.per_device());
    if let (Some(g), Some(e)) = (per(Subject::Gateway), per(Subject::Endpoint)) {
        println!("  gateway ÷ endpoint {:.3}; the gateway adds {:.0} B per device to the link it holds", g / e, g - e);
    }
    Ok(())
}

/// One subject: a fresh process, `warm` then `n` devices, its RSS before and after the `n`.
async fn measure(
    subject: Subject,
    fleet: &RelayFleet,
    files: &Arc<Vec<DeviceFiles>>,
    cloud: &Cloud,
    cloud_addr: SocketAddr,
    warm: usize,
    n: usize,
) -> Result<Figures, NetError> {
    let addr = free_port().await?;
    let config = fleet.write_gateway_config(cloud_addr, addr, warm + n)?;
    let mut child = spawn(subject, &config)?;
    let pid = child.id().ok_or_else(|| broken("the child has no pid"))?;
    let result = async {
        within("the subject process listening", wait_listening(addr, &mut child)).await?;
        if subject == Subject::Gateway {
            within("the gateway's uplink", async {
                // Polls the cloud's counter: 10 ms steps, bounded by STEP_TIMEOUT.
                while cloud.routed().stats().relay_links == 0 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Ok(())
            })
            .await?;
        }
        let mut held = Vec::new();
        held.extend(within("warm-up devices", attach(subject, fleet, files, addr, 0..warm)).await?);
        tokio::time::sleep(SETTLE).await;
        let before = net::rss_bytes_of(pid)?;
        held.extend(within("devices", attach(subject, fleet, files, addr, warm..warm + n)).await?);
        tokio::time::sleep(SETTLE).await;
        let after = net::rss_bytes_of(pid)?;
        let devices = held.len() - warm;
        for h in &held {
            h.close();
        }
        Ok::<_, NetError>(Figures { devices, before, after })
    }
    .await;
    // Our own child, by its handle.
    child.start_kill()?;
    within("the subject process exiting", async { Ok(child.wait().await?) }).await?;
    let f = result?;
    if f.devices != n {
        return Err(broken(format!("{}: {} of {n} devices attached", subject.name(), f.devices)));
    }
    Ok(f)
}

/// A port on 127.0.0.1 that was free a moment ago.
async fn free_port() -> Result<SocketAddr, NetError> {
    let l = tokio::net::TcpListener::bind(net::localhost()).await?;
    Ok(l.local_addr()?)
}

fn spawn(subject: Subject, config: &Path) -> Result<Child, NetError> {
    let mut cmd = match (subject, std::env::var("VEIL_RELAY_BIN")) {
        (Subject::Gateway, Ok(bin)) => {
            let mut c = Command::new(bin);
            c.arg("gateway").arg("--config").arg(config);
            c
        }
        _ => {
            let mut c = Command::new(std::env::current_exe()?);
            c.env(ROLE, subject.name()).env(CONFIG, config);
            c
        }
    };
    Ok(cmd.stdin(Stdio::null()).stdout(Stdio::null()).kill_on_drop(true).spawn()?)
}

/// Waits until something accepts TCP connections on `addr`, or the child exits.
async fn wait_listening(addr: SocketAddr, child: &mut Child) -> Result<(), NetError> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Err(broken(format!("the subject process exited: {status}")));
        }
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What the bench process holds of one attached device.
enum Held {
    Device(SimDevice),
    Link { endpoint: Endpoint, _link: Connection },
}

impl Held {
    fn close(&self) {
        match self {
            Self::Device(d) => d.close(),
            Self::Link { endpoint, .. } => endpoint.close(),
        }
    }
}

/// Attaches devices `range` to the subject at `addr`, [`CONNECT_CONCURRENCY`] at a time.
async fn attach(
    subject: Subject,
    fleet: &RelayFleet,
    files: &Arc<Vec<DeviceFiles>>,
    addr: SocketAddr,
    range: std::ops::Range<usize>,
) -> Result<Vec<Held>, NetError> {
    let permits = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let mut tasks = JoinSet::new();
    let (gateway_key, cloud_key) = (fleet.gateway_key, fleet.cloud_key);
    for i in range {
        let (permits, files) = (Arc::clone(&permits), Arc::clone(files));
        tasks.spawn(async move {
            let _permit = permits.acquire().await.map_err(broken)?;
            let f = files.get(i).ok_or_else(|| broken(format!("no device {i}")))?;
            Ok::<_, NetError>(match subject {
                Subject::Gateway => {
                    Held::Device(SimDevice::connect(f, Transport::Tcp, addr, gateway_key, cloud_key).await?)
                }
                Subject::Endpoint => {
                    let (endpoint, link) = relay::link_to_gateway(f, addr, gateway_key).await?;
                    Held::Link { endpoint, _link: link }
                }
            })
        });
    }
    let mut held = Vec::new();
    while let Some(r) = tasks.join_next().await {
        held.push(r??);
    }
    Ok(held)
}

// ---------------------------------------------------------------------------------------------
// The subject processes.

fn config_path() -> Result<std::path::PathBuf, NetError> {
    std::env::var_os(CONFIG).map(Into::into).ok_or_else(|| broken(format!("{CONFIG} not set")))
}

/// `veil-relay gateway --config F`, as its `main` runs it.
fn gateway_main() -> ExitCode {
    let path = match config_path() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("relay_memory gateway: {e}");
            return ExitCode::FAILURE;
        }
    };
    match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt.block_on(veil_relay::run::gateway(&path, RunOptions::default())),
        Err(e) => {
            eprintln!("relay_memory gateway: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A plain endpoint with the gateway's identity, trust and limits, holding every connection
/// in a task waiting in `recv()`. Runs until killed.
fn endpoint_main() -> Result<(), NetError> {
    let path = config_path()?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        let (config, node) = relay::load(&path)?;
        let mut b = Endpoint::builder(node.identity.clone())
            .authorizer(Authorizer::trust(node.trust.clone(), node.peer_roles))
            .protocol_limits(node.protocol_limits)
            .limits(node.limits.clone());
        if let Some(chain) = &node.certificate_chain {
            b = b.certificate_chain(chain);
        }
        if let Some(a) = config.listen.tcp {
            b = b.listen_tcp(a);
        }
        let endpoint = b.bind().await?;
        while let Ok(conn) = endpoint.accept().await {
            tokio::spawn(async move { while conn.recv().await.is_ok() {} });
        }
        Ok(())
    })
}
