//! Connection handshakes per second over loopback TCP: Veil against rustls full TLS 1.3
//! handshakes, measured in the same run.
//!
//! One batch = [`HANDSHAKES`] connections opened by [`CLIENTS`] concurrent client tasks (each
//! opens its share one after the other), counted when the *server* has completed each one; then
//! every connection is dropped. The server handles each connection in its own task, so both
//! cores work on handshakes. Everything a server pays per connection is in the time: TCP
//! connect and accept, the handshake, both ends' connection state, and the teardown of the
//! previous batch (which overlaps the next one).
//!
//! - **veil**: `Endpoint::connect_tcp` on the client endpoint, `Endpoint::accept` on the server
//!   endpoint; a handshake is complete once `accept` yields the connection, i.e. once the
//!   server's session is confirmed (spec §5.7.1). Mutual authentication: both static keys,
//!   the server's allowlist decision. IK (Veil's default; the client knows the server's key)
//!   and XX (neither knows the other's key in advance, as with a TLS certificate), each suite,
//!   Veil built with `ring`.
//!   Veil endpoints keep a static-static DH cache by default (spec §11.11): after the first
//!   connection, the IK server and client each skip the `ss` X25519. `IK-no-ss-cache` is the
//!   same IK run with the cache turned off (`EndpointLimits::static_dh_cache = 0`), and
//!   `IK-server-ss-cache` with it on the server only (devices running the `no_std` core have none).
//! - **rustls**: tokio-rustls with rustls's ring provider, TLS 1.3 only, X25519, the cipher
//!   suite with the AEAD of the Veil suite it is compared with, a self-signed ECDSA P-256
//!   certificate (rcgen) verified by the client against it as the trust anchor; server
//!   authentication only; no resumption (no tickets, no session cache): every handshake is a
//!   full one, complete once the server's `accept` returns.
//! - **rustls-mtls**: the same with client certificates, since Veil authenticates both sides:
//!   the client presents an ECDSA P-256 certificate issued by an rcgen CA and signs the
//!   handshake; the server verifies it with `WebPkiClientVerifier` against that CA.
//!
//! The target: Veil ≥ 1.5× rustls handshakes per second; each Veil subject's ratio is
//! printed against both TLS peers of its suite. Run with
//! `cargo bench -p veil-benches --bench transport_handshake`; figures go to
//! `benches/RESULTS.md`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::sync::mpsc;
use veil_benches::net::{self, open_limits, NetError, Tls, TlsSuite, VeilPeers};
use veil_benches::timing::{self, Plan};
use veil_benches::VEIL_BUILD;
use veil_protocol::{Pattern, Suite};

/// Handshakes per batch.
const HANDSHAKES: usize = 64;
/// Concurrent client tasks (the reference figure for rustls was taken with 8).
const CLIENTS: usize = 8;
/// Longest a batch may take before the benchmark gives up.
const BATCH_TIMEOUT: Duration = Duration::from_secs(60);
/// The interleaved measurement under `cargo bench`.
const BENCH_PLAN: Plan = Plan { rounds: 11, batch: Duration::from_millis(150) };
/// The target for Veil ÷ rustls.
const TARGET: f64 = 1.5;

fn short(suite: Suite) -> &'static str {
    match suite {
        Suite::AesGcmSha256 => "aes256gcm",
        _ => "chacha20poly1305",
    }
}

/// Which Veil endpoints keep a static-static DH cache.
#[derive(Clone, Copy)]
enum Cache {
    Both,
    Server,
    None,
}

enum Server {
    Veil(VeilPeers),
    Tls { tls: Tls, listener: Arc<TcpListener>, addr: SocketAddr },
}

struct Subject {
    name: String,
    suite: Suite,
    server: Server,
}

impl Subject {
    async fn veil(pattern: Pattern, suite: Suite, cache: Cache) -> Result<Self, NetError> {
        // Room for a batch and the previous one still closing.
        let limits = open_limits(4 * HANDSHAKES);
        let mut off = limits.clone();
        off.static_dh_cache = 0;
        let (server, client, variant) = match cache {
            Cache::Both => (limits.clone(), limits, ""),
            Cache::Server => (limits, off, "-server-ss-cache"),
            Cache::None => (off.clone(), off, "-no-ss-cache"),
        };
        let peers = VeilPeers::bind_each(pattern, suite, server, client).await?;
        Ok(Self {
            name: format!("veil-{VEIL_BUILD}-{pattern}{variant}-{}", short(suite)),
            suite,
            server: Server::Veil(peers),
        })
    }

    async fn tls(suite: Suite, mutual: bool) -> Result<Self, NetError> {
        let listener = TcpListener::bind(net::localhost()).await?;
        let addr = listener.local_addr()?;
        let tls = if mutual { Tls::mutual(TlsSuite::matching(suite))? } else { Tls::new(TlsSuite::matching(suite))? };
        Ok(Self {
            name: format!("{}-{}", if mutual { "rustls-mtls" } else { "rustls" }, short(suite)),
            suite,
            server: Server::Tls { tls, listener: Arc::new(listener), addr },
        })
    }

    async fn all() -> Result<Vec<Self>, NetError> {
        let mut v = Vec::new();
        for suite in Suite::ALL {
            v.push(Self::veil(Pattern::IK, suite, Cache::Both).await?);
            v.push(Self::veil(Pattern::IK, suite, Cache::Server).await?);
            v.push(Self::veil(Pattern::IK, suite, Cache::None).await?);
            v.push(Self::veil(Pattern::XX, suite, Cache::Both).await?);
            v.push(Self::tls(suite, false).await?);
            v.push(Self::tls(suite, true).await?);
        }
        Ok(v)
    }

    fn is_veil(&self) -> bool {
        matches!(self.server, Server::Veil(_))
    }

    /// The TLS peer of `suite`, server-only or mutual.
    fn is_tls(&self, suite: Suite, mutual: bool) -> bool {
        self.suite == suite
            && matches!(self.server, Server::Tls { .. })
            && self.name.starts_with("rustls-mtls") == mutual
    }

    /// Runs `n` handshakes and waits for the server to complete them all.
    fn batch(&self, rt: &Runtime, n: usize) -> Result<(), NetError> {
        let work = async {
            match &self.server {
                Server::Veil(peers) => veil_batch(peers, n).await,
                Server::Tls { tls, listener, addr } => tls_batch(tls, listener, *addr, n).await,
            }
        };
        rt.block_on(async {
            tokio::time::timeout(BATCH_TIMEOUT, work).await.map_err(|_| NetError::Broken("batch timed out".into()))?
        })
    }
}

/// Splits `n` handshakes over [`CLIENTS`] tasks.
fn shares(n: usize) -> impl Iterator<Item = usize> {
    (0..CLIENTS).map(move |i| n / CLIENTS + usize::from(i < n % CLIENTS)).filter(|&k| k > 0)
}

async fn veil_batch(peers: &VeilPeers, n: usize) -> Result<(), NetError> {
    let server = peers.server.clone();
    let acceptor = tokio::spawn(async move {
        for _ in 0..n {
            // Dropping the server's end closes it (spec §7.6); the client's end follows.
            drop(server.accept().await?);
        }
        Ok::<_, NetError>(())
    });
    let addr = peers.tcp_addr()?;
    let clients: Vec<_> = shares(n)
        .map(|k| {
            let (client, key) = (peers.client.clone(), peers.server_key);
            tokio::spawn(async move {
                // Held until the server has accepted: a connection closed at once could end
                // before the server hands it to `accept`.
                let mut held = Vec::with_capacity(k);
                for _ in 0..k {
                    held.push(client.connect_tcp(addr, key).await?);
                }
                Ok::<_, NetError>(held)
            })
        })
        .collect();
    let mut held = Vec::new();
    for c in clients {
        held.push(c.await??);
    }
    acceptor.await??;
    drop(held);
    Ok(())
}

async fn tls_batch(tls: &Tls, listener: &Arc<TcpListener>, addr: SocketAddr, n: usize) -> Result<(), NetError> {
    let (done_tx, mut done_rx) = mpsc::channel::<Result<(), NetError>>(n.max(1));
    let accept_loop = {
        let (listener, acceptor) = (Arc::clone(listener), tls.acceptor.clone());
        tokio::spawn(async move {
            for _ in 0..n {
                let (tcp, _) = listener.accept().await?;
                let (acceptor, done) = (acceptor.clone(), done_tx.clone());
                // One task per connection, as Veil's driver: handshakes use both cores.
                tokio::spawn(async move {
                    let r = async {
                        tcp.set_nodelay(true)?;
                        drop(acceptor.accept(tcp).await?);
                        Ok(())
                    }
                    .await;
                    let _ = done.send(r).await;
                });
            }
            Ok::<_, NetError>(())
        })
    };
    let clients: Vec<_> = shares(n)
        .map(|k| {
            let (connector, name) = (tls.connector.clone(), tls.server_name.clone());
            tokio::spawn(async move {
                let mut held = Vec::with_capacity(k);
                for _ in 0..k {
                    let tcp = TcpStream::connect(addr).await?;
                    tcp.set_nodelay(true)?;
                    held.push(connector.connect(name.clone(), tcp).await?);
                }
                Ok::<_, NetError>(held)
            })
        })
        .collect();
    let mut held = Vec::new();
    for c in clients {
        held.push(c.await??);
    }
    accept_loop.await??;
    for _ in 0..n {
        match done_rx.recv().await {
            Some(r) => r?,
            None => return Err(NetError::Broken("server tasks vanished".into())),
        }
    }
    drop(held);
    Ok(())
}

fn setup() -> (Runtime, Vec<Subject>) {
    let rt = match net::runtime() {
        Ok(rt) => rt,
        Err(e) => panic!("no runtime: {e}"),
    };
    match rt.block_on(Subject::all()) {
        Ok(subjects) => (rt, subjects),
        Err(e) => panic!("setup failed: {e}"),
    }
}

fn run(subject: &Subject, rt: &Runtime, n: usize) {
    if let Err(e) = subject.batch(rt, n) {
        panic!("{}: {e}", subject.name);
    }
}

fn handshakes(c: &mut Criterion) {
    let (rt, subjects) = setup();
    let mut group = c.benchmark_group("tcp-handshakes");
    group.throughput(Throughput::Elements(HANDSHAKES as u64));
    for s in &subjects {
        group.bench_function(BenchmarkId::new(s.name.clone(), HANDSHAKES), |b| b.iter(|| run(s, &rt, HANDSHAKES)));
    }
    group.finish();
}

/// The ratios, timed interleaved.
fn ratios() {
    let Some(plan) = Plan::from_args() else { return };
    let (plan, n) = if plan.is_measuring() { (BENCH_PLAN, HANDSHAKES) } else { (plan, CLIENTS) };
    let (rt, subjects) = setup();
    let rounds = {
        let rt = &rt;
        let mut ops: Vec<Box<dyn FnMut() + '_>> =
            subjects.iter().map(|s| Box::new(move || run(s, rt, n)) as Box<dyn FnMut()>).collect();
        let mut refs: Vec<&mut dyn FnMut()> = ops.iter_mut().map(|o| &mut **o as &mut dyn FnMut()).collect();
        timing::interleave(plan, &mut refs)
    };
    if !plan.is_measuring() {
        return;
    }
    println!(
        "\nTCP loopback handshakes, {n} per batch from {CLIENTS} client tasks, interleaved over {} rounds of \
         ~{} ms per subject; rates in each subject's fastest round, (m …) the median of the per-round ratios:",
        plan.rounds,
        plan.batch.as_millis()
    );
    let per_s = |ns: f64| n as f64 * 1e9 / ns;
    for (i, s) in subjects.iter().enumerate() {
        println!(
            "  {:<44} {:>7.0} handshakes/s  (median {:.0})",
            s.name,
            per_s(rounds.best_ns(i)),
            per_s(rounds.median_ns(i))
        );
    }
    for (v, s) in subjects.iter().enumerate() {
        if !s.is_veil() {
            continue;
        }
        for mutual in [false, true] {
            let Some(p) = subjects.iter().position(|t| t.is_tls(s.suite, mutual)) else {
                continue;
            };
            let best = rounds.best_ns(p) / rounds.best_ns(v);
            let median = rounds.median_of(|r| r[p] / r[v]);
            let verdict = match (VEIL_BUILD, best >= TARGET) {
                ("ring", true) => format!(", target ≥ {TARGET} met"),
                ("ring", false) => format!(", target ≥ {TARGET} MISSED"),
                _ => String::new(),
            };
            println!("  {} ÷ {}: {best:.3} (m {median:.3}){verdict}", s.name, subjects[p].name);
        }
    }
    // The cache's own effect, measured in the same run.
    for (v, s) in subjects.iter().enumerate() {
        let uncached = format!("veil-{VEIL_BUILD}-IK-no-ss-cache-{}", short(s.suite));
        if s.name == uncached || !s.name.starts_with(&format!("veil-{VEIL_BUILD}-IK-")) {
            continue;
        }
        if let Some(u) = subjects.iter().position(|t| t.name == uncached) {
            let best = rounds.best_ns(u) / rounds.best_ns(v);
            let median = rounds.median_of(|r| r[u] / r[v]);
            println!("  {} ÷ {}: {best:.3} (m {median:.3})", s.name, subjects[u].name);
        }
    }
}

fn config() -> Criterion {
    Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3)).sample_size(10)
}

criterion_group! {
    name = benches;
    config = config();
    targets = handshakes
}
criterion_main!(benches, ratios);
