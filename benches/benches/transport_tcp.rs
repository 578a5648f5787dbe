//! Loopback TCP message rate and throughput: Veil connections against tokio-rustls (TLS 1.3
//! with the same AEAD) and plain TCP, measured in the same run.
//!
//! One transfer = `count` messages of one size sent on one connection from a sending task to a
//! receiving task, timed until the receiver holds the last one. Every subject delimits messages
//! and hands them to the receiver one by one:
//!
//! - **veil**: `Connection::send(Bytes)` per message on the client, `Connection::recv()` per
//!   message on the server (IK, each suite, Veil built with `ring`). Veil's driver packs the
//!   messages queued at the moment into one frame (spec §6.4) and frames into one write.
//! - **rustls**: tokio-rustls over the same loopback, TLS 1.3 with the cipher suite of the same
//!   AEAD ([`TlsSuite::matching`]); each message is a u16 big-endian length and the payload
//!   (Veil's frame layout), written with one `write_all` each — one TLS record and one `write`
//!   system call per message, as an application that sends each message when it has it does;
//!   the receiver splits the plaintext with tokio-util's `LengthDelimitedCodec`.
//! - **rustls-buffered**: the same behind a 64 KiB `BufWriter`, flushed at the end of the
//!   transfer: the batching an application can add itself, the best case for TLS (only at
//!   64 B).
//! - **tcp**: plain TCP with the same u16-length-prefixed messages, one `write_all` each; and
//!   **tcp-buffered** behind the same `BufWriter` (only at 64 B): the raw limit.
//!
//! `TCP_NODELAY` is set everywhere (Veil sets it on its sockets). Sizes: 64 B (a sensor
//! reading) and 16 KiB (bulk). The targets: bulk ≥ 1.0× rustls, 64 B ≥ 2× rustls
//! (against the one-write-per-message rustls, which is how the ratio is printed; the buffered
//! ratio is printed next to it).
//!
//! After criterion's benchmarks the ratios are printed from an interleaved measurement
//! (`veil_benches::timing`). Run with `cargo bench -p veil-benches --bench transport_tcp`;
//! figures go to `benches/RESULTS.md`.

use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use veil_benches::net::{self, FrameReader, NetError, Tls, TlsSuite, VeilPeers};
use veil_benches::timing::{self, Plan};
use veil_benches::VEIL_BUILD;
use veil_protocol::{Pattern, Suite};
use veil_transports::{Connection, Transport};

/// A sensor reading, and a bulk chunk.
const SIZES: [usize; 2] = [64, 16 * 1024];
/// Capacity of the peers' `BufWriter`: Veil's own write high-water mark and largest frame.
const BUFFER: usize = 64 * 1024;
/// Longest a transfer may take before the benchmark gives up (a hung peer, not a slow one).
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(60);
/// The interleaved measurement under `cargo bench`: transfers take milliseconds, so batches are
/// longer than the crypto benchmarks'.
const BENCH_PLAN: Plan = Plan { rounds: 15, batch: Duration::from_millis(60) };

/// Messages per transfer: a few milliseconds of work for every subject.
fn messages(size: usize) -> u64 {
    if size <= 64 {
        4_096
    } else {
        256
    }
}

/// The target for Veil ÷ rustls (one write per message).
fn target(size: usize) -> f64 {
    if size <= 64 {
        2.0
    } else {
        1.0
    }
}

fn short(suite: Suite) -> &'static str {
    match suite {
        Suite::AesGcmSha256 => "aes256gcm",
        _ => "chacha20poly1305",
    }
}

type Writer = Box<dyn AsyncWrite + Unpin + Send>;
type Reader = Box<dyn AsyncRead + Unpin + Send>;

enum Carrier {
    Veil {
        tx: Connection,
        rx: Connection,
        payload: Bytes,
        /// Keeps the endpoints for as long as the connection.
        _peers: VeilPeers,
    },
    Stream {
        tx: Option<Writer>,
        rx: Option<(Reader, FrameReader)>,
        message: Bytes,
    },
}

/// One way of carrying messages, with its connection set up.
struct Subject {
    name: String,
    size: usize,
    carrier: Carrier,
}

impl Subject {
    async fn veil(suite: Suite, size: usize) -> Result<Self, NetError> {
        let peers = VeilPeers::bind(Pattern::IK, suite, 16).await?;
        let (tx, rx) = peers.connect(Transport::Tcp).await?;
        Ok(Self {
            name: format!("veil-{VEIL_BUILD}-{}", short(suite)),
            size,
            carrier: Carrier::Veil { tx, rx, payload: Bytes::from(vec![0xa5; size]), _peers: peers },
        })
    }

    async fn stream(name: String, size: usize, tls: Option<TlsSuite>, buffered: bool) -> Result<Self, NetError> {
        let listener = TcpListener::bind(net::localhost()).await?;
        let addr = listener.local_addr()?;
        let (client, server) = tokio::try_join!(TcpStream::connect(addr), async { Ok(listener.accept().await?.0) })?;
        client.set_nodelay(true)?;
        server.set_nodelay(true)?;
        let (tx, rx): (Writer, Reader) = match tls {
            Some(suite) => {
                let tls = Tls::new(suite)?;
                let (c, s) = tokio::try_join!(
                    tls.connector.connect(tls.server_name.clone(), client),
                    tls.acceptor.accept(server)
                )?;
                (Box::new(c), Box::new(s))
            }
            None => (Box::new(client), Box::new(server)),
        };
        let tx: Writer = if buffered { Box::new(BufWriter::with_capacity(BUFFER, tx)) } else { tx };
        let message = net::framed(&vec![0xa5; size])?;
        Ok(Self { name, size, carrier: Carrier::Stream { tx: Some(tx), rx: Some((rx, FrameReader::new())), message } })
    }

    /// Every subject of one message size, in the order the ratios refer to them.
    async fn all(size: usize) -> Result<Vec<Self>, NetError> {
        let mut v = Vec::new();
        for suite in Suite::ALL {
            v.push(Self::veil(suite, size).await?);
        }
        for suite in Suite::ALL {
            let tls = TlsSuite::matching(suite);
            v.push(Self::stream(format!("rustls-{}", short(suite)), size, Some(tls), false).await?);
        }
        v.push(Self::stream("tcp".into(), size, None, false).await?);
        if size <= 64 {
            for suite in Suite::ALL {
                let tls = TlsSuite::matching(suite);
                v.push(Self::stream(format!("rustls-buffered-{}", short(suite)), size, Some(tls), true).await?);
            }
            v.push(Self::stream("tcp-buffered".into(), size, None, true).await?);
        }
        Ok(v)
    }

    fn index(subjects: &[Self], name: &str) -> Option<usize> {
        subjects.iter().position(|s| s.name == name)
    }

    /// Sends `count` messages and waits until the receiver has them all.
    fn transfer(&mut self, rt: &Runtime, count: u64) -> Result<(), NetError> {
        let size = self.size;
        let check = move |len: usize| {
            if len == size {
                Ok(())
            } else {
                Err(NetError::Broken(format!("received {len} B, sent {size} B")))
            }
        };
        match &mut self.carrier {
            Carrier::Veil { tx, rx, payload, .. } => {
                let (tx, rx, payload) = (tx.clone(), rx.clone(), payload.clone());
                let send = async move {
                    for _ in 0..count {
                        tx.send(payload.clone()).await?;
                    }
                    Ok::<_, NetError>(())
                };
                let recv = async move {
                    for _ in 0..count {
                        check(rx.recv().await?.payload.len())?;
                    }
                    Ok::<_, NetError>(())
                };
                rt.block_on(async {
                    let (s, r) = tokio::time::timeout(TRANSFER_TIMEOUT, async {
                        tokio::join!(tokio::spawn(send), tokio::spawn(recv))
                    })
                    .await
                    .map_err(|_| NetError::Broken("transfer timed out".into()))?;
                    s??;
                    r??;
                    Ok(())
                })
            }
            Carrier::Stream { tx, rx, message } => {
                let (Some(mut w), Some((mut r, mut reader))) = (tx.take(), rx.take()) else {
                    return Err(NetError::Broken("an earlier transfer failed".into()));
                };
                let message = message.clone();
                let send = async move {
                    for _ in 0..count {
                        w.write_all(&message).await?;
                    }
                    w.flush().await?;
                    Ok::<_, NetError>(w)
                };
                let recv = async move {
                    for _ in 0..count {
                        match reader.next(&mut r).await? {
                            Some(m) => check(m.len())?,
                            None => return Err(NetError::Broken("stream ended".into())),
                        }
                    }
                    Ok::<_, NetError>((r, reader))
                };
                let (w, r) = rt.block_on(async {
                    let (s, r) = tokio::time::timeout(TRANSFER_TIMEOUT, async {
                        tokio::join!(tokio::spawn(send), tokio::spawn(recv))
                    })
                    .await
                    .map_err(|_| NetError::Broken("transfer timed out".into()))?;
                    Ok::<_, NetError>((s??, r??))
                })?;
                *tx = Some(w);
                *rx = Some(r);
                Ok(())
            }
        }
    }
}

fn setup(size: usize) -> (Runtime, Vec<Subject>) {
    let rt = match net::runtime() {
        Ok(rt) => rt,
        Err(e) => panic!("no runtime: {e}"),
    };
    match rt.block_on(Subject::all(size)) {
        Ok(subjects) => (rt, subjects),
        Err(e) => panic!("setup failed: {e}"),
    }
}

fn run(subject: &mut Subject, rt: &Runtime, count: u64) {
    if let Err(e) = subject.transfer(rt, count) {
        panic!("{} transfer failed: {e}", subject.name);
    }
}

fn throughput(c: &mut Criterion) {
    for size in SIZES {
        let (rt, mut subjects) = setup(size);
        let count = messages(size);
        let mut group = c.benchmark_group(format!("tcp-{size}B"));
        group.throughput(if size <= 64 { Throughput::Elements(count) } else { Throughput::Bytes(count * size as u64) });
        for s in &mut subjects {
            let name = s.name.clone();
            group.bench_function(BenchmarkId::new(name, count), |b| b.iter(|| run(s, &rt, count)));
        }
        group.finish();
    }
}

/// The ratios, timed interleaved.
fn ratios() {
    let Some(plan) = Plan::from_args() else { return };
    let plan = if plan.is_measuring() { BENCH_PLAN } else { plan };
    for size in SIZES {
        let (rt, mut subjects) = setup(size);
        let count = messages(size);
        let rounds = {
            let rt = &rt;
            let mut ops: Vec<Box<dyn FnMut() + '_>> =
                subjects.iter_mut().map(|s| Box::new(move || run(s, rt, count)) as Box<dyn FnMut()>).collect();
            let mut refs: Vec<&mut dyn FnMut()> = ops.iter_mut().map(|o| &mut **o as &mut dyn FnMut()).collect();
            timing::interleave(plan, &mut refs)
        };
        if !plan.is_measuring() {
            continue;
        }
        println!(
            "\nTCP loopback, {size} B messages, {count} per transfer, interleaved over {} rounds of ~{} ms per \
             subject; rates in each subject's fastest round, (m …) the median of the per-round ratios:",
            plan.rounds,
            plan.batch.as_millis()
        );
        for (i, s) in subjects.iter().enumerate() {
            let ns = rounds.best_ns(i);
            let per_s = count as f64 * 1e9 / ns;
            println!(
                "  {:<34} {:>10.0} msg/s  {:>7.3} GB/s  (median {:.0} msg/s)",
                s.name,
                per_s,
                per_s * size as f64 / 1e9,
                count as f64 * 1e9 / rounds.median_ns(i)
            );
        }
        let ratio = |veil: usize, peer: usize| {
            (rounds.best_ns(peer) / rounds.best_ns(veil), rounds.median_of(|r| r[peer] / r[veil]))
        };
        for suite in Suite::ALL {
            let Some(v) = Subject::index(&subjects, &format!("veil-{VEIL_BUILD}-{}", short(suite))) else { continue };
            let mut line = format!("  veil {suite} ÷");
            if let Some(p) = Subject::index(&subjects, &format!("rustls-{}", short(suite))) {
                let (best, median) = ratio(v, p);
                let t = target(size);
                let verdict = if VEIL_BUILD != "ring" {
                    String::new()
                } else if best >= t {
                    format!(", target ≥ {t} met")
                } else {
                    format!(", target ≥ {t} MISSED")
                };
                line += &format!(" rustls {} {best:.3} (m {median:.3}){verdict}", TlsSuite::matching(suite).name());
            }
            for peer in [format!("rustls-buffered-{}", short(suite)), "tcp".into(), "tcp-buffered".into()] {
                if let Some(p) = Subject::index(&subjects, &peer) {
                    let (best, median) = ratio(v, p);
                    line += &format!(" | {peer} {best:.3} (m {median:.3})");
                }
            }
            println!("{line}");
        }
    }
}

fn config() -> Criterion {
    Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3)).sample_size(10)
}

criterion_group! {
    name = benches;
    config = config();
    targets = throughput
}
criterion_main!(benches, ratios);
