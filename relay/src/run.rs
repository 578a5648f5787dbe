//! Running a role as a process: configuration, logging, metrics, signals.
//!
//! - `SIGTERM` / `SIGINT`: graceful drain (stop taking peers, send what is queued, close every
//!   link with `ShuttingDown`), then exit 0.
//! - `SIGHUP`: reload the trust files (allowlist, CA, revocation list) without dropping
//!   healthy sessions; peers that no longer pass are closed (spec §15.8).

use std::collections::HashMap;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use std::sync::Arc;

use veil_protocol::delivery::InboxState;
use veil_protocol::trust::NodeId;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use veil_transports::{DeliveryOptions, NodeEvent, TrustState};

use crate::cloud::{Cloud, CloudSettings};
use crate::config::{Config, NodeRole};
use crate::control::{ControlRequest, ControlSocket};
use crate::sink::{Delivery, ExpiredCommand, Sink, SinkTarget, Via};
use crate::trustload::LoadedNode;

/// How long a drain may take before the process exits anyway.
pub const DRAIN_GRACE: Duration = Duration::from_secs(10);

/// Options shared by the long-running roles.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Only check the configuration and every file it names, print the result and exit.
    pub check_config: bool,
    /// Overrides `log.level` (`RUST_LOG` overrides both).
    pub log_level: Option<String>,
    /// Gateway: append every end-to-end packet passed on to this file, one hex line each
    /// (an audit of what the gateway sees of device traffic: opaque routed packets).
    pub audit_tap: Option<std::path::PathBuf>,
}

/// Starts logging to standard error: `RUST_LOG` if set, else `level`. Logs carry no secret
/// (keys, payloads); peers are named by public key or node id.
pub fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A second initialisation (tests) keeps the first.
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

/// Loads and checks the configuration of `role`, printing the problem (naming its key) on
/// failure.
///
/// # Errors
/// The exit code to end with.
pub fn load_config(path: &Path, role: NodeRole) -> Result<Config, ExitCode> {
    let config = Config::load(path).map_err(|e| {
        eprintln!("veil-relay: {e}");
        ExitCode::from(1)
    })?;
    if config.role != role {
        eprintln!("veil-relay: {}: role: this file configures a {}, not a {role}", path.display(), config.role);
        return Err(ExitCode::from(1));
    }
    config.check().map_err(|e| {
        eprintln!("veil-relay: {e}");
        ExitCode::from(1)
    })?;
    Ok(config)
}

/// Loads the node's files, starts logging and the metrics endpoint, and the SIGHUP reload.
///
/// # Errors
/// The exit code to end with (the problem is printed).
pub fn prepare(config: &Config, opts: &RunOptions) -> Result<LoadedNode, ExitCode> {
    init_logging(opts.log_level.as_deref().unwrap_or(config.log.level.as_str()));
    let node = LoadedNode::load(config).map_err(|e| {
        eprintln!("veil-relay: {e}");
        ExitCode::from(1)
    })?;
    tracing::info!(role = %config.role, public_key = ?node.identity.public(), trust = %node.trust_summary(), "starting");
    if let Some(m) = &config.metrics {
        match crate::metrics::install(m.listen) {
            Ok(h) => tracing::info!(addr = %h.listen_addr(), "metrics at /metrics"),
            Err(e) => {
                eprintln!("veil-relay: metrics.listen: {e}");
                return Err(ExitCode::from(1));
            }
        }
    }
    #[cfg(unix)]
    if let Err(e) = node.reloader().spawn_on_sighup() {
        eprintln!("veil-relay: cannot handle SIGHUP: {e}");
        return Err(ExitCode::from(1));
    }
    Ok(node)
}

/// Waits for SIGTERM or SIGINT.
pub async fn terminated() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Loads and checks the configuration of `role`; with `--check-config` reports and returns
/// `None`, else prepares the node.
fn start(path: &Path, role: NodeRole, opts: &RunOptions) -> Result<Option<(Config, LoadedNode)>, ExitCode> {
    let config = load_config(path, role)?;
    if opts.check_config {
        println!("{}: ok", path.display());
        return Ok(None);
    }
    let node = prepare(&config, opts)?;
    Ok(Some((config, node)))
}

/// `veil-relay gateway --config F`.
pub async fn gateway(path: &Path, opts: RunOptions) -> ExitCode {
    let (config, node) = match start(path, NodeRole::Gateway, &opts) {
        Ok(Some(loaded)) => loaded,
        Ok(None) => return ExitCode::SUCCESS,
        Err(code) => return code,
    };
    let mut settings = match crate::gateway::GatewaySettings::from_node(&node, &config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("veil-relay: {e}");
            return ExitCode::from(1);
        }
    };
    let mut tap_task = None;
    if let Some(path) = &opts.audit_tap {
        match audit_tap(path).await {
            Ok((tx, task)) => {
                settings.tap = Some(tx);
                tap_task = Some(task);
            }
            Err(e) => {
                eprintln!("veil-relay: --audit-tap {}: {e}", path.display());
                return ExitCode::from(1);
            }
        }
    }
    let gw = match crate::gateway::Gateway::start(settings).await {
        Ok(g) => g,
        Err(e) => {
            eprintln!("veil-relay: {e}");
            return ExitCode::from(1);
        }
    };
    tracing::info!(tcp = ?gw.local_tcp_addr(), udp = ?gw.local_udp_addr(), "gateway up");
    terminated().await;
    tracing::info!("draining");
    gw.shutdown(DRAIN_GRACE).await;
    if let Some(t) = tap_task {
        // The tap's sender went with the gateway: the writer drains and ends.
        let _ = tokio::time::timeout(DRAIN_GRACE, t).await;
    }
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

/// `veil-relay cloud --config F`: the cloud role with its sink and control socket.
pub async fn cloud(path: &Path, opts: RunOptions) -> ExitCode {
    let (config, node) = match start(path, NodeRole::Cloud, &opts) {
        Ok(Some(loaded)) => loaded,
        Ok(None) => return ExitCode::SUCCESS,
        Err(code) => return code,
    };
    let target = match &config.sink {
        Some(s) if s.kind == crate::config::SinkKind::File => match &s.path {
            Some(p) => SinkTarget::File(p.clone()),
            None => SinkTarget::Stdout,
        },
        _ => SinkTarget::Stdout,
    };
    // spec §17.7: where each device's stream stands in the sink, so that a restarted cloud
    // delivers nothing twice.
    let restore = match &target {
        SinkTarget::File(path) => match resume_from(path) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("veil-relay: sink.path: {e}");
                return ExitCode::from(1);
            }
        },
        SinkTarget::Stdout => Vec::new(),
    };
    let fsync = config.sink.as_ref().is_some_and(|s| s.fsync);
    let mut sink = match Sink::open_synced(&target, fsync).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("veil-relay: sink.path: {e}");
            return ExitCode::from(1);
        }
    };
    let mut settings = match CloudSettings::from_node(&node, &config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("veil-relay: {e}");
            return ExitCode::from(1);
        }
    };
    // Messages are committed once the sink holds them (below), not when they arrive.
    settings.delivery = Some(DeliveryOptions { auto_commit: false, ..DeliveryOptions::default() });
    settings.restore = restore;
    let command_ttl = Duration::from_secs(config.control.as_ref().map_or(3_600, |c| c.command_ttl_secs));
    let cloud = match Cloud::start(settings).await {
        Ok(c) => Arc::new(c),
        Err(e) => {
            eprintln!("veil-relay: {e}");
            return ExitCode::from(1);
        }
    };
    tracing::info!(tcp = ?cloud.local_tcp_addr(), udp = ?cloud.local_udp_addr(), node = %cloud.node_id(), "cloud up");
    let stop = CancellationToken::new();
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<ControlRequest>(64);
    if let Some(c) = &config.control {
        match ControlSocket::bind(&c.socket) {
            Ok(sock) => {
                tokio::spawn(sock.serve(ctl_tx.clone(), stop.clone()));
            }
            Err(e) => {
                eprintln!("veil-relay: control.socket: {}: {e}", c.socket.display());
                return ExitCode::from(1);
            }
        }
    }
    drop(ctl_tx);
    // spec §15.8: a revocation list newly loaded on SIGHUP goes to every gateway (and on to
    // its devices) and to devices connected directly.
    let crls = config.trust.crl.clone();
    let mut updates = cloud.endpoint().trust_state().map(TrustState::subscribe_changes);
    let mut term = std::pin::pin!(terminated());
    let mut flush_at: Option<tokio::time::Instant> = None;
    // spec §17.7: what the sink has been given and not yet flushed, by device and channel.
    let mut uncommitted: HashMap<(NodeId, u16), u64> = HashMap::new();
    loop {
        tokio::select! {
            () = &mut term => break,
            ev = cloud.next_event() => match ev {
                Ok(ev) => {
                    if let Err(e) = deliver(&mut sink, &ev).await {
                        tracing::error!(error = %e, "sink write failed; stopping");
                        break;
                    }
                    if let NodeEvent::Message { node, channel, id, stream: Some(_), .. } = &ev {
                        let through = uncommitted.entry((*node, *channel)).or_insert(*id);
                        *through = (*through).max(*id);
                    }
                    flush_at.get_or_insert_with(|| tokio::time::Instant::now() + SINK_FLUSH);
                }
                Err(_) => break,
            },
            req = ctl_rx.recv(), if !ctl_rx.is_closed() => {
                if let Some(req) = req {
                    let c = Arc::clone(&cloud);
                    tokio::spawn(async move {
                        // spec §17.7: through the device's outbox, for at most `command_ttl`.
                        let r = c.send_with_ttl(&req.command.device, req.command.channel, req.command.payload, command_ttl)
                            .await;
                        let _ = req.reply.send(r.map_err(|e| e.to_string()));
                    });
                }
            }
            () = sleep_until(flush_at) => {
                flush_at = None;
                if let Err(e) = sink.flush().await {
                    tracing::error!(error = %e, "sink flush failed; stopping");
                    break;
                }
                // Written and flushed (and synced with sink.fsync): committed.
                for ((node, channel), through) in uncommitted.drain() {
                    cloud.commit(&node, channel, through);
                }
            }
            () = changed(updates.as_mut()) => {
                for path in &crls {
                    match std::fs::read(path) {
                        Ok(list) => {
                            let n = cloud.push_revocation_list(bytes::Bytes::from(list)).await;
                            tracing::info!(links = n, file = %path.display(), "revocation list pushed");
                        }
                        Err(e) => tracing::warn!(file = %path.display(), error = %e, "revocation list not read"),
                    }
                }
            }
        }
    }
    tracing::info!("draining");
    stop.cancel();
    cloud.shutdown(DRAIN_GRACE).await;
    // Events that arrived during the drain still reach the sink.
    while let Ok(Ok(ev)) = tokio::time::timeout(Duration::from_millis(100), cloud.next_event()).await {
        let _ = deliver(&mut sink, &ev).await;
    }
    let _ = sink.flush().await;
    tracing::info!(delivered = sink.written(), "stopped");
    ExitCode::SUCCESS
}

/// Opens the audit tap file (append) and starts its writer.
async fn audit_tap(path: &Path) -> std::io::Result<(mpsc::Sender<bytes::Bytes>, tokio::task::JoinHandle<()>)> {
    use tokio::io::AsyncWriteExt;
    let file = tokio::fs::OpenOptions::new().create(true).append(true).open(path).await?;
    let (tx, mut rx) = mpsc::channel::<bytes::Bytes>(4_096);
    let task = tokio::spawn(async move {
        let mut out = tokio::io::BufWriter::new(file);
        while let Some(p) = rx.recv().await {
            let mut line = hex::encode(&p);
            line.push('\n');
            if out.write_all(line.as_bytes()).await.is_err() {
                return;
            }
            if rx.is_empty() && out.flush().await.is_err() {
                return;
            }
        }
        let _ = out.flush().await;
    });
    Ok((tx, task))
}

/// How long delivered lines may wait in the sink's buffer.
const SINK_FLUSH: Duration = Duration::from_millis(50);

/// spec §17.7: each device's stream as the sink file left it.
fn resume_from(path: &Path) -> std::io::Result<Vec<(NodeId, InboxState)>> {
    let resume = crate::sink::scan(path)?;
    let mut out = Vec::with_capacity(resume.devices.len());
    for (device, (stream, channels)) in resume.devices {
        match InboxState::new(stream, channels.into_iter().collect()) {
            Ok(state) => out.push((device, state)),
            Err(e) => tracing::warn!(%device, error = %e, "sink state of a device not resumed"),
        }
    }
    tracing::info!(devices = out.len(), skipped_lines = resume.skipped, "delivery state rebuilt from the sink");
    Ok(out)
}

async fn deliver(sink: &mut Sink, ev: &NodeEvent) -> std::io::Result<()> {
    match ev {
        NodeEvent::Expired { node, channel, id, payload, unconfirmed } => {
            tracing::info!(device = %node, channel, id, unconfirmed, "command expired");
            let c = ExpiredCommand {
                device: node,
                channel: *channel,
                id: *id,
                unconfirmed: *unconfirmed,
                at: std::time::SystemTime::now(),
                payload,
            };
            sink.write_command(&c).await
        }
        NodeEvent::Message { node, channel, id, payload, via, stream } => {
            let via = match via {
                veil_transports::Via::Relay(r) => Via::Relay(*r),
                _ => Via::Direct,
            };
            let d = Delivery {
                device: node,
                stream: *stream,
                channel: *channel,
                id: *id,
                via,
                received_at: std::time::SystemTime::now(),
                payload,
            };
            sink.write(&d).await
        }
        NodeEvent::Connected { node, direct, .. } => {
            tracing::info!(%node, direct, "device session up");
            Ok(())
        }
        NodeEvent::Closed { node, outcome, .. } => {
            tracing::info!(%node, %outcome, "device session closed");
            Ok(())
        }
        NodeEvent::Refused { node, channel, error, .. } => {
            // Commands go with `send_with_ttl`, which answers every refusal itself: a message
            // given back here came from an embedding application's `send`.
            tracing::warn!(device = %node, channel, %error, "a message to a device was refused after it was taken");
            Ok(())
        }
        _ => Ok(()),
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn changed(rx: Option<&mut tokio::sync::watch::Receiver<u64>>) {
    match rx {
        Some(rx) => {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}
