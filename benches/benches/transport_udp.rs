//! UDP message rate over loopback, one flow, 64-byte messages: Veil UDP connections against
//! plain UDP sockets, measured in the same run. A bench binary rather than criterion: UDP drops
//! what the receiver cannot take, so each transfer reports what arrived and when, not just how
//! long it took.
//!
//! One transfer = [`MESSAGES`] messages of 64 B sent from one task and received by another,
//! with at most [`WINDOW`] messages in flight (an in-process credit window: the receiver hands
//! back a credit per message). Without it the sender outruns the receiver and both subjects lose
//! a third or more of their messages in the kernel's socket buffer, and the rate then measures
//! the scheduler more than the flow; with it the rate is what the flow sustains without loss.
//! Each message carries the transfer's number and its index, and the receiver checks both
//! (stragglers of an earlier transfer are ignored). A credit or a message that does not come
//! within [`QUIET`] ends the transfer: what arrived is reported and the rest counts as lost.
//! Rate = messages received ÷ time from the first send to the last receive.
//!
//! - **veil**: `Connection::send(Bytes)` / `Connection::recv()` over UDP (datagram mode, IK,
//!   Veil built with `ring`, default datagram size 1 232 B): the driver packs the messages
//!   queued at the moment into one datagram (spec §6.4), up to about 17 of them.
//! - **udp**: a connected tokio `UdpSocket` pair, one datagram per message (`send` / `recv`),
//!   what an application sending each reading as it comes does; no encryption.
//! - **udp-packed**: the same sockets with [`PACKED`] messages per datagram, the packing Veil
//!   does, without encryption: the raw limit of this flow.
//!
//! Run with `cargo bench -p veil-benches --bench transport_udp`; figures go to
//! `benches/RESULTS.md`.

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::net::UdpSocket;
use tokio::runtime::Runtime;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use veil_benches::net::{self, NetError, VeilPeers};
use veil_benches::timing::{Plan, Rounds};
use veil_benches::VEIL_BUILD;
use veil_protocol::{Pattern, Suite};
use veil_transports::{Connection, Transport};

/// Message size.
const SIZE: usize = 64;
/// Messages per transfer under `cargo bench`.
const MESSAGES: u64 = 20_000;
/// Rounds under `cargo bench`; each runs one transfer of every subject.
const ROUNDS: usize = 12;
/// Messages in flight at most: the sender takes a credit per message and the receiver returns
/// one per message it gets. 128 datagrams of 64 B fit the kernel's default socket receive
/// buffer (212 992 B, ≈ 1 KiB of accounting per small datagram), so neither subject loses
/// messages to a receiver that fell behind; the rate is what the flow sustains.
const WINDOW: usize = 128;
/// Messages per datagram of the `udp-packed` peer: 1 024 B, within Veil's default datagram
/// size (1 232 B) as Veil's own packing is.
const PACKED: usize = 16;
/// A wait this long for a credit or a message means a message was lost: the transfer ends
/// there and reports what arrived.
const QUIET: Duration = Duration::from_millis(50);
/// Longest a transfer may take before the benchmark gives up.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(60);

fn short(suite: Suite) -> &'static str {
    match suite {
        Suite::AesGcmSha256 => "aes256gcm",
        _ => "chacha20poly1305",
    }
}

/// The two ends of one flow (cheap handles).
#[derive(Clone)]
enum Ends {
    Veil {
        tx: Connection,
        rx: Connection,
    },
    Udp {
        tx: Arc<UdpSocket>,
        rx: Arc<UdpSocket>,
    },
    /// Plain UDP with [`PACKED`] messages per datagram.
    UdpPacked {
        tx: Arc<UdpSocket>,
        rx: Arc<UdpSocket>,
    },
}

/// What one transfer delivered.
#[derive(Debug, Clone, Copy)]
struct Outcome {
    received: u64,
    /// First send to last receive.
    elapsed: Duration,
}

struct Subject {
    name: String,
    ends: Ends,
    /// Keeps Veil's endpoints for as long as the connection.
    _peers: Option<VeilPeers>,
    /// Number of the last transfer, carried in every message.
    transfer: u64,
}

/// `count` messages of transfer `transfer`, sharing one allocation.
fn messages(transfer: u64, count: u64) -> Vec<Bytes> {
    let mut all = BytesMut::with_capacity(SIZE * count as usize);
    for i in 0..count {
        all.put_u64(transfer);
        all.put_u64(i);
        all.put_bytes(0xa5, SIZE - 16);
    }
    let mut all = all.freeze();
    (0..count).map(|_| all.split_to(SIZE)).collect()
}

/// Whether `m` belongs to `transfer`; an error for anything that is not one of our messages.
fn belongs(m: &[u8], transfer: u64, count: u64) -> Result<bool, NetError> {
    let field = |at: usize| {
        m.get(at..at + 8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_be_bytes)
            .ok_or_else(|| NetError::Broken(format!("{} B message", m.len())))
    };
    let (t, i) = (field(0)?, field(8)?);
    if m.len() != SIZE || t > transfer || (t == transfer && i >= count) {
        return Err(NetError::Broken(format!("unexpected message: transfer {t}, index {i}, {} B", m.len())));
    }
    Ok(t == transfer)
}

impl Subject {
    async fn veil(suite: Suite) -> Result<Self, NetError> {
        let peers = VeilPeers::bind(Pattern::IK, suite, 16).await?;
        let (tx, rx) = peers.connect(Transport::Udp).await?;
        Ok(Self {
            name: format!("veil-udp-{VEIL_BUILD}-{}", short(suite)),
            ends: Ends::Veil { tx, rx },
            _peers: Some(peers),
            transfer: 0,
        })
    }

    async fn udp(packed: bool) -> Result<Self, NetError> {
        let tx = UdpSocket::bind(net::localhost()).await?;
        let rx = UdpSocket::bind(net::localhost()).await?;
        tx.connect(rx.local_addr()?).await?;
        rx.connect(tx.local_addr()?).await?;
        let (tx, rx) = (Arc::new(tx), Arc::new(rx));
        let (name, ends) =
            if packed { ("udp-packed", Ends::UdpPacked { tx, rx }) } else { ("udp", Ends::Udp { tx, rx }) };
        Ok(Self { name: name.into(), ends, _peers: None, transfer: 0 })
    }

    async fn all() -> Result<Vec<Self>, NetError> {
        let mut v = Vec::new();
        for suite in Suite::ALL {
            v.push(Self::veil(suite).await?);
        }
        v.push(Self::udp(false).await?);
        v.push(Self::udp(true).await?);
        Ok(v)
    }

    fn run(&mut self, rt: &Runtime, count: u64) -> Result<Outcome, NetError> {
        self.transfer += 1;
        let transfer = self.transfer;
        let batch = messages(transfer, count);
        let ends = self.ends.clone();
        rt.block_on(async move {
            tokio::time::timeout(TRANSFER_TIMEOUT, transfer_once(ends, batch, transfer, count))
                .await
                .map_err(|_| NetError::Broken("transfer timed out".into()))?
        })
    }
}

async fn transfer_once(ends: Ends, batch: Vec<Bytes>, transfer: u64, count: u64) -> Result<Outcome, NetError> {
    let credits = Arc::new(Semaphore::new(WINDOW));
    let start = Instant::now();
    let sender = {
        let (ends, credits) = (ends.clone(), Arc::clone(&credits));
        tokio::spawn(async move {
            if let Ends::UdpPacked { tx, .. } = &ends {
                let mut datagram = Vec::with_capacity(PACKED * SIZE);
                for chunk in batch.chunks(PACKED) {
                    match tokio::time::timeout(QUIET, credits.acquire_many(chunk.len() as u32)).await {
                        Ok(Ok(permit)) => permit.forget(),
                        _ => break,
                    }
                    datagram.clear();
                    chunk.iter().for_each(|m| datagram.extend_from_slice(m));
                    tx.send(&datagram).await?;
                }
                return Ok(());
            }
            for m in batch {
                // A credit that does not come back within QUIET means a message was lost:
                // stop sending, the receiver reports what arrived.
                match tokio::time::timeout(QUIET, credits.acquire()).await {
                    Ok(Ok(permit)) => permit.forget(),
                    _ => break,
                }
                match &ends {
                    Ends::Veil { tx, .. } => tx.send(m).await?,
                    Ends::Udp { tx, .. } | Ends::UdpPacked { tx, .. } => {
                        tx.send(&m).await?;
                    }
                }
            }
            Ok::<_, NetError>(())
        })
    };
    let receiver = tokio::spawn(async move {
        let (mut received, mut last) = (0u64, start);
        let mut on_message = |m: &[u8]| -> Result<bool, NetError> {
            if belongs(m, transfer, count)? {
                received += 1;
                last = Instant::now();
                credits.add_permits(1);
            }
            Ok(received == count)
        };
        let mut buf = [0u8; 2 * PACKED * SIZE];
        loop {
            // Ends after the last message, or once nothing has come for QUIET.
            let done = match &ends {
                Ends::Veil { rx, .. } => match tokio::time::timeout(QUIET, rx.recv()).await {
                    Ok(m) => on_message(&m?.payload)?,
                    Err(_) => true,
                },
                Ends::Udp { rx, .. } => match tokio::time::timeout(QUIET, rx.recv(&mut buf)).await {
                    Ok(n) => on_message(&buf[..n?])?,
                    Err(_) => true,
                },
                Ends::UdpPacked { rx, .. } => match tokio::time::timeout(QUIET, rx.recv(&mut buf)).await {
                    Ok(n) => {
                        let mut last = false;
                        for m in buf[..n?].chunks(SIZE) {
                            last = on_message(m)?;
                        }
                        last
                    }
                    Err(_) => true,
                },
            };
            if done {
                break;
            }
        }
        Ok::<_, NetError>(Outcome { received, elapsed: last - start })
    });
    sender.await??;
    receiver.await?
}

fn main() {
    let Some(plan) = Plan::from_args() else { return };
    let (rounds, count) = if plan.is_measuring() { (ROUNDS, MESSAGES) } else { (1, 100) };
    let rt = match net::runtime() {
        Ok(rt) => rt,
        Err(e) => panic!("no runtime: {e}"),
    };
    let mut subjects = match rt.block_on(Subject::all()) {
        Ok(s) => s,
        Err(e) => panic!("setup failed: {e}"),
    };
    let run = |s: &mut Subject| match s.run(&rt, count) {
        Ok(o) => o,
        Err(e) => panic!("{}: {e}", s.name),
    };
    // Warm-up: one transfer each, not counted.
    for s in &mut subjects {
        run(s);
    }
    let mut received = vec![0u64; subjects.len()];
    let mut ns = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let row: Vec<f64> = subjects
            .iter_mut()
            .enumerate()
            .map(|(i, s)| {
                let o = run(s);
                received[i] += o.received;
                if o.received == 0 {
                    f64::INFINITY
                } else {
                    o.elapsed.as_nanos() as f64 / o.received as f64
                }
            })
            .collect();
        ns.push(row);
    }
    let rounds_data = Rounds { ns };
    if !plan.is_measuring() {
        // `cargo test --benches`: the code ran and messages arrived.
        assert!(received.iter().all(|&r| r > 0), "a subject delivered nothing");
        return;
    }
    let sent = count * rounds as u64;
    println!(
        "\nUDP loopback, one flow, {SIZE} B messages, {count} per transfer, {rounds} interleaved rounds; rate = \
         messages received per second in each subject's fastest round (median in brackets):"
    );
    for (i, s) in subjects.iter().enumerate() {
        println!(
            "  {:<32} {:>10.0} msg/s  (median {:>10.0})  loss {:.2} %",
            s.name,
            1e9 / rounds_data.best_ns(i),
            1e9 / rounds_data.median_ns(i),
            100.0 * (1.0 - received[i] as f64 / sent as f64)
        );
    }
    let peers: Vec<usize> =
        subjects.iter().enumerate().filter(|(_, s)| s.name.starts_with("udp")).map(|(i, _)| i).collect();
    for (v, s) in subjects.iter().enumerate().filter(|(_, s)| s.name.starts_with("veil")) {
        let mut line = format!("  {} ÷", s.name);
        for &p in &peers {
            line += &format!(
                " {} {:.3} (m {:.3})",
                subjects[p].name,
                rounds_data.best_ns(p) / rounds_data.best_ns(v),
                rounds_data.median_of(|r| r[p] / r[v])
            );
        }
        println!("{line}");
    }
}
