//! Memory per idle connection: the growth of a server process's resident set (`VmRSS`) over
//! [`CONNECTIONS`] idle connections, divided by their number; Veil over TCP against tokio-rustls
//! (TLS 1.3) in the same run, and Veil over UDP.
//!
//! A bench binary, not criterion, and not a test target: `cargo bench -p veil-benches --bench
//! idle_memory` measures; `cargo test --benches` runs it with a few connections only, to check
//! that it works.
//!
//! Each subject runs in fresh processes, so that one subject's freed memory cannot serve the
//! next: this binary starts itself as a *server* process per subject, which starts itself again
//! as the *client* process (the machine allows 20 000 descriptors per process, and 10 000 TCP
//! connections with both ends in one process would need 20 000 sockets). The client opens
//! [`WARM_UP`] connections first; the server then reads its RSS, the client opens
//! [`CONNECTIONS`] more, and once the server has them all and the process has settled the server
//! reads its RSS again. The client process measures its own growth the same way. RSS counts
//! user-space memory only (heap, task state, buffers), not the kernel's socket buffers.
//!
//! What one connection holds on each side, as a server and a client application would hold it:
//!
//! - **veil-tcp**: the `Connection` handle, in a task waiting in `Connection::recv()`, and
//!   Veil's driver task behind it (IK, the default ChaChaPoly suite, Veil built with `ring`).
//! - **rustls-tcp**: the tokio-rustls `TlsStream`, in a task waiting to read one byte (TLS 1.3,
//!   `TLS13_CHACHA20_POLY1305_SHA256`, X25519, ECDSA P-256 certificate, no tickets). The
//!   application's read buffer is one byte: the least a TLS server can hold.
//! - **veil-udp**: as veil-tcp, over the endpoints' UDP sockets (one socket per process).
//!
//! The target: ≤ 4 KiB of user-space memory per connection (server side).

use std::net::SocketAddr;
use std::process::Stdio;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, Lines};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::Semaphore;
use veil_benches::net::{self, NetError, Tls, TlsSuite, VeilPeers};
use veil_benches::timing::Plan;
use veil_benches::VEIL_BUILD;
use veil_protocol::{Pattern, Suite};
use veil_transports::{Authorizer, Connection, Endpoint, Transport};

/// Idle connections measured.
const CONNECTIONS: usize = 10_000;
/// Connections opened before the baseline, so that the baseline includes everything paid once
/// (runtime, allocator arenas, per-thread buffers, the first connection's lazy statics).
const WARM_UP: usize = 200;
/// Handshakes in flight at once from the client.
const CONNECT_CONCURRENCY: usize = 32;
/// Wait after the last connection before reading the RSS: the last handshakes' buffers are
/// freed and the tasks have gone idle.
const SETTLE: Duration = Duration::from_secs(1);
/// Longest any step may take before the benchmark gives up.
const STEP_TIMEOUT: Duration = Duration::from_secs(300);
/// The target, bytes per connection.
const TARGET: f64 = 4096.0;

const ROLE: &str = "VEIL_IDLE_ROLE";
const SUBJECT: &str = "VEIL_IDLE_SUBJECT";
const ADDR: &str = "VEIL_IDLE_ADDR";
const CERT: &str = "VEIL_IDLE_CERT";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Subject {
    VeilTcp,
    RustlsTcp,
    VeilUdp,
}

impl Subject {
    const ALL: [Self; 3] = [Self::VeilTcp, Self::RustlsTcp, Self::VeilUdp];

    fn name(self) -> &'static str {
        match self {
            Self::VeilTcp => "veil-tcp",
            Self::RustlsTcp => "rustls-tcp",
            Self::VeilUdp => "veil-udp",
        }
    }
}

impl FromStr for Subject {
    type Err = NetError;
    fn from_str(s: &str) -> Result<Self, NetError> {
        Self::ALL.into_iter().find(|x| x.name() == s).ok_or_else(|| NetError::Broken(format!("subject {s}")))
    }
}

fn env(name: &str) -> Result<String, NetError> {
    std::env::var(name).map_err(|_| NetError::Broken(format!("{name} not set")))
}

fn broken(what: impl Into<String>) -> NetError {
    NetError::Broken(what.into())
}

async fn within<T>(what: &str, f: impl std::future::Future<Output = Result<T, NetError>>) -> Result<T, NetError> {
    tokio::time::timeout(STEP_TIMEOUT, f).await.map_err(|_| broken(format!("{what} timed out")))?
}

/// Raises the soft limit on open files to the hard one (20 000 on the recording machines).
fn raise_fd_limit() -> Result<u64, NetError> {
    Ok(rlimit::increase_nofile_limit(u64::MAX)?)
}

fn main() {
    let r = match std::env::var(ROLE).as_deref() {
        Ok("server") => server_main(),
        Ok("client") => client_main(),
        _ => orchestrate(),
    };
    if let Err(e) = r {
        eprintln!("idle_memory: {e}");
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------------------------------------
// Orchestrator: one server process per subject, results side by side.

#[derive(Debug, Clone, Copy, Default)]
struct Figures {
    connections: usize,
    server_growth: f64,
    client_growth: f64,
}

impl Figures {
    fn server_per_connection(&self) -> f64 {
        self.server_growth / self.connections as f64
    }
    fn client_per_connection(&self) -> f64 {
        self.client_growth / self.connections as f64
    }
}

fn orchestrate() -> Result<(), NetError> {
    let Some(plan) = Plan::from_args() else { return Ok(()) };
    let (n, warm) = if plan.is_measuring() { (CONNECTIONS, WARM_UP) } else { (20, 4) };
    let limit = raise_fd_limit()?;
    let rt = net::runtime()?;
    let mut results = Vec::new();
    for subject in Subject::ALL {
        let figures = rt.block_on(run_server_process(subject, n, warm))?;
        if figures.connections != n {
            return Err(broken(format!("{}: {} of {n} connections", subject.name(), figures.connections)));
        }
        results.push((subject, figures));
    }
    if !plan.is_measuring() {
        return Ok(());
    }
    println!(
        "\nIdle connections: RSS growth over {n} connections after {warm} warm-up ones, divided by {n} \
         (fresh server and client processes per subject; open-file limit {limit}); Veil built with {VEIL_BUILD}:"
    );
    for (subject, f) in &results {
        println!(
            "  {:<11} server {:>7.0} B/connection ({:.1} MiB in all), client {:>7.0} B/connection",
            subject.name(),
            f.server_per_connection(),
            f.server_growth / 1_048_576.0,
            f.client_per_connection()
        );
    }
    let per = |s: Subject| results.iter().find(|(x, _)| *x == s).map(|(_, f)| f.server_per_connection());
    if let (Some(veil), Some(tls)) = (per(Subject::VeilTcp), per(Subject::RustlsTcp)) {
        println!("  veil-tcp ÷ rustls-tcp (server side): {:.3}", veil / tls);
    }
    for s in [Subject::VeilTcp, Subject::VeilUdp] {
        if let Some(v) = per(s) {
            let verdict = if v <= TARGET { "met" } else { "MISSED" };
            println!("  {}: {:.2} KiB per connection, target ≤ 4 KiB {verdict}", s.name(), v / 1024.0);
        }
    }
    Ok(())
}

async fn run_server_process(subject: Subject, n: usize, warm: usize) -> Result<Figures, NetError> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .env(ROLE, "server")
        .env(SUBJECT, subject.name())
        .env("VEIL_IDLE_N", n.to_string())
        .env("VEIL_IDLE_WARM", warm.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child.stdout.take().ok_or_else(|| broken("server stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let result = within("server process", async {
        while let Some(line) = lines.next_line().await? {
            if let Some(rest) = line.strip_prefix("RESULT ") {
                return parse_result(rest);
            }
        }
        Err(broken(format!("{} server ended without a result", subject.name())))
    })
    .await;
    let status = within("server exit", async { Ok(child.wait().await?) }).await?;
    if !status.success() {
        return Err(broken(format!("{} server failed: {status}", subject.name())));
    }
    result
}

fn parse_result(s: &str) -> Result<Figures, NetError> {
    let mut f = Figures::default();
    for field in s.split_whitespace() {
        let (k, v) = field.split_once('=').ok_or_else(|| broken(format!("result field {field}")))?;
        let num = |v: &str| v.parse::<f64>().map_err(|_| broken(format!("result value {v}")));
        match k {
            "connections" => f.connections = num(v)? as usize,
            "server_growth" => f.server_growth = num(v)?,
            "client_growth" => f.client_growth = num(v)?,
            _ => {}
        }
    }
    Ok(f)
}

// ---------------------------------------------------------------------------------------------
// Server process: listens, starts the client, counts and holds connections, reads its RSS.

/// Holds accepted connections; counts them.
#[derive(Default)]
struct Accepted {
    count: AtomicUsize,
}

fn server_main() -> Result<(), NetError> {
    raise_fd_limit()?;
    let subject: Subject = env(SUBJECT)?.parse()?;
    let n: usize = env("VEIL_IDLE_N")?.parse().map_err(|_| broken("VEIL_IDLE_N"))?;
    let warm: usize = env("VEIL_IDLE_WARM")?.parse().map_err(|_| broken("VEIL_IDLE_WARM"))?;
    let rt = net::runtime()?;
    rt.block_on(serve(subject, n, warm))
}

async fn serve(subject: Subject, n: usize, warm: usize) -> Result<(), NetError> {
    let accepted = Arc::new(Accepted::default());
    let mut client = Command::new(std::env::current_exe()?);
    client.env(ROLE, "client").env(SUBJECT, subject.name());
    // Everything the server holds lives until the process ends.
    let _keep: Box<dyn std::any::Any + Send> = match subject {
        Subject::VeilTcp | Subject::VeilUdp => {
            let transport = if subject == Subject::VeilTcp { Transport::Tcp } else { Transport::Udp };
            let peers = VeilPeers::bind(Pattern::IK, Suite::ChaChaPolyBlake2s, 2 * (n + warm) + 16).await?;
            let addr = if transport == Transport::Tcp { peers.tcp_addr()? } else { peers.udp_addr()? };
            client.env(ADDR, addr.to_string());
            let server = peers.server.clone();
            let accepted = Arc::clone(&accepted);
            tokio::spawn(async move {
                while let Ok(conn) = server.accept().await {
                    accepted.count.fetch_add(1, Ordering::AcqRel);
                    tokio::spawn(hold_veil(conn));
                }
            });
            Box::new(peers)
        }
        Subject::RustlsTcp => {
            let tls = Tls::new(TlsSuite::ChaCha20Poly1305)?;
            let listener = TcpListener::bind(net::localhost()).await?;
            client.env(ADDR, listener.local_addr()?.to_string()).env(CERT, tls_cert_hex(&tls)?);
            let (acceptor, accepted) = (tls.acceptor.clone(), Arc::clone(&accepted));
            tokio::spawn(async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    let (acceptor, accepted) = (acceptor.clone(), Arc::clone(&accepted));
                    tokio::spawn(async move {
                        if let Ok(stream) = acceptor.accept(tcp).await {
                            accepted.count.fetch_add(1, Ordering::AcqRel);
                            hold_stream(stream).await;
                        }
                    });
                }
            });
            Box::new(tls)
        }
    };
    let mut client = client.stdin(Stdio::piped()).stdout(Stdio::piped()).kill_on_drop(true).spawn()?;
    let mut ctl = ClientControl::new(&mut client)?;

    let client_before = ctl.open(warm).await?;
    wait_for(&accepted, warm).await?;
    tokio::time::sleep(SETTLE).await;
    let before = net::rss_bytes()?;
    let client_after = ctl.open(n).await?;
    wait_for(&accepted, warm + n).await?;
    tokio::time::sleep(SETTLE).await;
    let after = net::rss_bytes()?;
    let connections = accepted.count.load(Ordering::Acquire) - warm;
    ctl.quit().await?;
    within("client exit", async { Ok(client.wait().await?) }).await?;
    println!(
        "RESULT connections={connections} server_growth={} client_growth={}",
        after.saturating_sub(before),
        client_after.saturating_sub(client_before)
    );
    Ok(())
}

async fn wait_for(accepted: &Accepted, n: usize) -> Result<(), NetError> {
    within("accepting", async {
        // Polls a counter: 10 ms steps, bounded by STEP_TIMEOUT.
        while accepted.count.load(Ordering::Acquire) < n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    })
    .await
}

/// An application's task on one idle Veil connection: waits for the next message.
async fn hold_veil(conn: Connection) {
    while conn.recv().await.is_ok() {}
}

/// An application's task on one idle TLS connection: waits to read.
async fn hold_stream<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) {
    let mut byte = [0u8; 1];
    while matches!(stream.read(&mut byte).await, Ok(1..)) {}
}

fn tls_cert_hex(tls: &Tls) -> Result<String, NetError> {
    Ok(tls.certificate.iter().map(|b| format!("{b:02x}")).collect())
}

/// The server's line protocol with its client process: `open N` → `ok RSS`, then `quit`.
struct ClientControl {
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl ClientControl {
    fn new(child: &mut Child) -> Result<Self, NetError> {
        let stdin = child.stdin.take().ok_or_else(|| broken("client stdin"))?;
        let stdout = child.stdout.take().ok_or_else(|| broken("client stdout"))?;
        Ok(Self { stdin, lines: BufReader::new(stdout).lines() })
    }

    /// Has the client open `n` more connections; returns the client's RSS once they are up.
    async fn open(&mut self, n: usize) -> Result<u64, NetError> {
        self.stdin.write_all(format!("open {n}\n").as_bytes()).await?;
        self.stdin.flush().await?;
        within("client", async {
            let line = self.lines.next_line().await?.ok_or_else(|| broken("client ended"))?;
            line.strip_prefix("ok ").and_then(|v| v.parse().ok()).ok_or_else(|| broken(format!("client said {line:?}")))
        })
        .await
    }

    async fn quit(&mut self) -> Result<(), NetError> {
        self.stdin.write_all(b"quit\n").await?;
        self.stdin.flush().await?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Client process: opens connections on request and holds them.

fn client_main() -> Result<(), NetError> {
    raise_fd_limit()?;
    let subject: Subject = env(SUBJECT)?.parse()?;
    let addr: SocketAddr = env(ADDR)?.parse().map_err(|_| broken("VEIL_IDLE_ADDR"))?;
    let rt = net::runtime()?;
    rt.block_on(client(subject, addr))
}

async fn client(subject: Subject, addr: SocketAddr) -> Result<(), NetError> {
    let opener = Opener::new(subject, addr).await?;
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let mut stdout = tokio::io::stdout();
    let mut held = 0usize;
    while let Some(line) = stdin.next_line().await? {
        let Some(n) = line.strip_prefix("open ").and_then(|n| n.parse::<usize>().ok()) else { break };
        within("opening connections", opener.open(n)).await?;
        held += n;
        tokio::time::sleep(SETTLE).await;
        stdout.write_all(format!("ok {}\n", net::rss_bytes()?).as_bytes()).await?;
        stdout.flush().await?;
    }
    eprintln!("idle_memory client: held {held} {} connections", subject.name());
    Ok(())
}

/// Opens connections of one subject; each lives in its own task until the process ends.
enum Opener {
    Veil { endpoint: Endpoint, addr: SocketAddr, transport: Transport, key: veil_protocol::PublicKey },
    Tls { connector: tokio_rustls::TlsConnector, name: rustls::pki_types::ServerName<'static>, addr: SocketAddr },
}

impl Opener {
    async fn new(subject: Subject, addr: SocketAddr) -> Result<Self, NetError> {
        Ok(match subject {
            Subject::VeilTcp | Subject::VeilUdp => {
                // The identities VeilPeers::bind gave the server process.
                let server_key = *net::keypair(1).public();
                let endpoint = Endpoint::builder(net::keypair(2))
                    .suite(Suite::ChaChaPolyBlake2s)
                    .authorizer(Authorizer::allowlist([server_key]))
                    .limits(net::open_limits(2 * CONNECTIONS + 2 * WARM_UP + 16))
                    .bind_udp(net::localhost())
                    .bind()
                    .await?;
                let transport = if subject == Subject::VeilTcp { Transport::Tcp } else { Transport::Udp };
                Self::Veil { endpoint, addr, transport, key: server_key }
            }
            Subject::RustlsTcp => {
                let hex = env(CERT)?;
                let der = (0..hex.len())
                    .step_by(2)
                    .map(|i| hex.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
                    .collect::<Option<Vec<u8>>>()
                    .ok_or_else(|| broken("certificate hex"))?;
                let (connector, name) = Tls::connector_trusting(TlsSuite::ChaCha20Poly1305, der.into())?;
                Self::Tls { connector, name, addr }
            }
        })
    }

    async fn open(&self, n: usize) -> Result<(), NetError> {
        let permits = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
        let mut tasks = Vec::with_capacity(n);
        for _ in 0..n {
            let permits = Arc::clone(&permits);
            let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<(), NetError>>();
            match self {
                Self::Veil { endpoint, addr, transport, key } => {
                    let (endpoint, addr, transport, key) = (endpoint.clone(), *addr, *transport, *key);
                    tokio::spawn(async move {
                        let conn = {
                            let _permit = permits.acquire().await;
                            endpoint.connect(transport, addr, Some(key)).await
                        };
                        match conn {
                            Ok(conn) => {
                                let _ = ready_tx.send(Ok(()));
                                hold_veil(conn).await;
                            }
                            Err(e) => {
                                let _ = ready_tx.send(Err(e.into()));
                            }
                        }
                    });
                }
                Self::Tls { connector, name, addr } => {
                    let (connector, name, addr) = (connector.clone(), name.clone(), *addr);
                    tokio::spawn(async move {
                        let stream = {
                            let _permit = permits.acquire().await;
                            async {
                                let tcp = TcpStream::connect(addr).await?;
                                Ok::<_, NetError>(connector.connect(name, tcp).await?)
                            }
                            .await
                        };
                        match stream {
                            Ok(stream) => {
                                let _ = ready_tx.send(Ok(()));
                                hold_stream(stream).await;
                            }
                            Err(e) => {
                                let _ = ready_tx.send(Err(e));
                            }
                        }
                    });
                }
            }
            tasks.push(ready_rx);
        }
        for t in tasks {
            t.await.map_err(|_| broken("connection task vanished"))??;
        }
        Ok(())
    }
}
