//! Fault injection for tests: a seeded TCP chaos proxy.
//!
//! Only with the `fault-injection` cargo feature (like [`fault`](crate::fault)). A
//! [`ChaosProxy`] sits between TCP clients and one upstream server: each client
//! connection it accepts gets its own connection to the upstream, and the bytes are
//! passed on in both directions, chunk by chunk, with each direction's [`StreamFaults`]
//! applied to every chunk:
//!
//! - **cut**: the connection ends at a random point inside the chunk (the bytes before
//!   that point are passed on, then both sides are closed), as when a cellular link
//!   drops or a NAT forgets a flow;
//! - **corrupt**: one random bit of the chunk is flipped (Veil's AEAD refuses the packet
//!   and the connection fails);
//! - **stall**: the direction stops for [`StreamFaults::stall_for`] before the chunk
//!   goes on (everything behind it waits too), as a congested or suspended peer;
//! - **delay**: every chunk leaves [`StreamFaults::delay`] after it arrived, order kept.
//!
//! A test can also act on every connection at once: [`ChaosProxy::cut_all`] cuts them,
//! [`ChaosProxy::set_down`] refuses new ones and cuts the live ones until it is lifted
//! (an outage of the link behind the proxy), and [`ChaosProxy::set_faults`] changes the
//! faults of new chunks.
//!
//! Decisions come from a ChaCha RNG seeded by [`ChaosConfig::seed`], one stream per
//! connection (in accept order) and direction, so the same chunks in the same order get
//! the same decisions (the chunking itself comes from the network and the scheduler).
//! [`ChaosProxy::stats`] counts what happened, so that a test can check that the faults it
//! asked for really happened.
//!
//! Memory is bounded: at most [`ChaosConfig::max_connections`] connections at once (more
//! are accepted and closed at once, and counted), chunks of at most
//! [`ChaosConfig::chunk_size`] bytes, and at most [`DELAY_LINE`] chunks waiting per
//! direction (the reader then waits, which is TCP's own backpressure).
//!
//! ```
//! use std::time::Duration;
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//! use veil_transports::chaos::{ChaosConfig, ChaosProxy, StreamFaults};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // An echo server.
//! let server = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let upstream = server.local_addr()?;
//! tokio::spawn(async move {
//!     while let Ok((mut s, _)) = server.accept().await {
//!         tokio::spawn(async move {
//!             let (mut r, mut w) = s.split();
//!             let _ = tokio::io::copy(&mut r, &mut w).await;
//!         });
//!     }
//! });
//! let faults = StreamFaults::new().delay(Duration::from_millis(20));
//! let proxy = ChaosProxy::start("127.0.0.1:0".parse()?, upstream, ChaosConfig::symmetric(1, faults)).await?;
//!
//! let mut client = tokio::net::TcpStream::connect(proxy.local_addr()).await?;
//! client.write_all(b"hello").await?;
//! let mut echo = [0u8; 5];
//! client.read_exact(&mut echo).await?; // 40 ms later: 20 ms each way
//! assert_eq!(&echo, b"hello");
//!
//! proxy.cut_all();
//! let mut rest = Vec::new();
//! let _ = client.read_to_end(&mut rest).await; // the proxy closed the connection
//! assert!(rest.is_empty());
//! assert_eq!(proxy.shutdown().await.cut_by_command, 1);
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use rand::Rng;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::connection::lock;
use crate::fault::{Direction, FaultError, MAX_HOLD};

/// Chunks waiting in one direction's delay line before the reader waits.
pub const DELAY_LINE: usize = 64;
/// How long the proxy waits for the upstream to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The faults applied to one direction of every connection. The default is a perfect
/// stream: nothing cut, corrupted, stalled or delayed.
///
/// For each chunk, in this order: the connection is cut inside it with probability
/// `cut`; otherwise one bit of it is flipped with probability `corrupt`; the direction
/// stalls for `stall_for` before it with probability `stall`; it leaves `delay` after it
/// arrived.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[non_exhaustive]
pub struct StreamFaults {
    /// Probability that the connection is cut inside a chunk.
    pub cut: f64,
    /// Probability that one bit of a chunk is flipped.
    pub corrupt: f64,
    /// Probability that the direction stalls before a chunk.
    pub stall: f64,
    /// How long a stall lasts.
    pub stall_for: Duration,
    /// Fixed delay of every chunk (order is kept).
    pub delay: Duration,
}

impl StreamFaults {
    /// A perfect stream.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the probability of a cut per chunk.
    #[must_use]
    pub fn cut(mut self, p: f64) -> Self {
        self.cut = p;
        self
    }

    /// Sets the probability of a flipped bit per chunk.
    #[must_use]
    pub fn corrupt(mut self, p: f64) -> Self {
        self.corrupt = p;
        self
    }

    /// Sets the probability of a stall per chunk, and its length.
    #[must_use]
    pub fn stall(mut self, p: f64, stall_for: Duration) -> Self {
        self.stall = p;
        self.stall_for = stall_for;
        self
    }

    /// Sets the delay of every chunk.
    #[must_use]
    pub fn delay(mut self, d: Duration) -> Self {
        self.delay = d;
        self
    }

    fn validate(&self) -> Result<(), FaultError> {
        for (name, value) in [("cut", self.cut), ("corrupt", self.corrupt), ("stall", self.stall)] {
            if !(0.0..=1.0).contains(&value) {
                return Err(FaultError::InvalidProbability { name, value });
            }
        }
        let hold = self.delay.saturating_add(self.stall_for);
        if hold > MAX_HOLD {
            return Err(FaultError::HoldTooLong(hold));
        }
        Ok(())
    }
}

/// How a [`ChaosProxy`] behaves.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct ChaosConfig {
    /// Seed of the decisions.
    pub seed: u64,
    /// Faults from the clients to the server.
    pub to_server: StreamFaults,
    /// Faults from the server to the clients.
    pub to_client: StreamFaults,
    /// Connections held at once; further clients are closed at once (counted in
    /// [`ChaosStats::refused`]).
    pub max_connections: usize,
    /// Largest chunk read at once, in bytes.
    pub chunk_size: usize,
}

impl ChaosConfig {
    /// A perfect proxy (add faults with the other constructors or fields).
    #[must_use]
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            to_server: StreamFaults::new(),
            to_client: StreamFaults::new(),
            max_connections: 1_024,
            chunk_size: 16 * 1024,
        }
    }

    /// The same faults in both directions.
    #[must_use]
    pub fn symmetric(seed: u64, faults: StreamFaults) -> Self {
        Self { to_server: faults, to_client: faults, ..Self::new(seed) }
    }

    /// Sets the faults of one direction.
    #[must_use]
    pub fn with(mut self, direction: Direction, faults: StreamFaults) -> Self {
        match direction {
            Direction::ToServer => self.to_server = faults,
            Direction::ToClient => self.to_client = faults,
        }
        self
    }

    /// Sets [`ChaosConfig::max_connections`].
    #[must_use]
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = n;
        self
    }

    /// Sets [`ChaosConfig::chunk_size`].
    #[must_use]
    pub fn chunk_size(mut self, n: usize) -> Self {
        self.chunk_size = n;
        self
    }

    fn validate(&self) -> Result<(), FaultError> {
        self.to_server.validate()?;
        self.to_client.validate()?;
        if self.max_connections == 0 {
            return Err(FaultError::ZeroLimit("max_connections"));
        }
        if self.chunk_size == 0 {
            return Err(FaultError::ZeroLimit("chunk_size"));
        }
        Ok(())
    }
}

/// What a [`ChaosProxy`] did in one direction (a snapshot).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StreamStats {
    /// Bytes read from the sending side.
    pub bytes_in: u64,
    /// Bytes written to the receiving side.
    pub bytes_out: u64,
    /// Chunks read.
    pub chunks: u64,
    /// Chunks with a flipped bit.
    pub corrupted: u64,
    /// Stalls.
    pub stalls: u64,
    /// Connections cut inside a chunk of this direction.
    pub cuts: u64,
}

/// What a [`ChaosProxy`] did (a snapshot).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ChaosStats {
    /// Clients to server.
    pub to_server: StreamStats,
    /// Server to clients.
    pub to_client: StreamStats,
    /// Client connections passed on to the upstream.
    pub accepted: u64,
    /// Client connections closed at once: the proxy was down or full.
    pub refused: u64,
    /// Client connections closed because the upstream could not be reached.
    pub upstream_failed: u64,
    /// Connections cut by [`ChaosProxy::cut_all`] or [`ChaosProxy::set_down`].
    pub cut_by_command: u64,
    /// Connections open now.
    pub open: usize,
}

#[derive(Debug, Default)]
struct StreamCounters {
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    chunks: AtomicU64,
    corrupted: AtomicU64,
    stalls: AtomicU64,
    cuts: AtomicU64,
}

impl StreamCounters {
    fn snapshot(&self) -> StreamStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StreamStats {
            bytes_in: get(&self.bytes_in),
            bytes_out: get(&self.bytes_out),
            chunks: get(&self.chunks),
            corrupted: get(&self.corrupted),
            stalls: get(&self.stalls),
            cuts: get(&self.cuts),
        }
    }
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

#[derive(Debug)]
struct Shared {
    streams: [StreamCounters; 2],
    faults: Mutex<[StreamFaults; 2]>,
    /// Live connections and the token that cuts each.
    live: Mutex<HashMap<u64, CancellationToken>>,
    down: AtomicBool,
    accepted: AtomicU64,
    refused: AtomicU64,
    upstream_failed: AtomicU64,
    cut_by_command: AtomicU64,
}

impl Shared {
    fn snapshot(&self) -> ChaosStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ChaosStats {
            to_server: self.streams[0].snapshot(),
            to_client: self.streams[1].snapshot(),
            accepted: get(&self.accepted),
            refused: get(&self.refused),
            upstream_failed: get(&self.upstream_failed),
            cut_by_command: get(&self.cut_by_command),
            open: lock(&self.live).len(),
        }
    }

    fn cut_live(&self) {
        let live: Vec<CancellationToken> = lock(&self.live).drain().map(|(_, t)| t).collect();
        add(&self.cut_by_command, live.len() as u64);
        for token in live {
            token.cancel();
        }
    }
}

/// A seeded TCP chaos proxy in front of one upstream server (see the [module](self)
/// docs).
///
/// Dropping it stops it and cuts its connections; [`ChaosProxy::shutdown`] does the same
/// and waits until its listener is closed.
#[derive(Debug)]
pub struct ChaosProxy {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl ChaosProxy {
    /// Listens on `listen` (port 0 for any) and passes every connection on to
    /// `upstream`.
    ///
    /// # Errors
    ///
    /// [`FaultError`] for an invalid configuration or a listener that cannot be bound.
    pub async fn start(listen: SocketAddr, upstream: SocketAddr, config: ChaosConfig) -> Result<Self, FaultError> {
        config.validate()?;
        let listener = TcpListener::bind(listen).await?;
        let local_addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            streams: Default::default(),
            faults: Mutex::new([config.to_server, config.to_client]),
            live: Mutex::new(HashMap::new()),
            down: AtomicBool::new(false),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            upstream_failed: AtomicU64::new(0),
            cut_by_command: AtomicU64::new(0),
        });
        let cancel = CancellationToken::new();
        let task = tokio::spawn(accept_loop(listener, upstream, config, Arc::clone(&shared), cancel.clone()));
        Ok(Self { local_addr, shared, cancel, task: Some(task) })
    }

    /// The address clients connect to.
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// What the proxy did so far.
    #[must_use]
    pub fn stats(&self) -> ChaosStats {
        self.shared.snapshot()
    }

    /// Changes the faults of one direction, from the next chunk of every connection on.
    ///
    /// # Errors
    ///
    /// [`FaultError`] for invalid faults (nothing changes).
    pub fn set_faults(&self, direction: Direction, faults: StreamFaults) -> Result<(), FaultError> {
        faults.validate()?;
        lock(&self.shared.faults)[direction.index()] = faults;
        Ok(())
    }

    /// Cuts every live connection now (both sides see the connection end).
    pub fn cut_all(&self) {
        self.shared.cut_live();
    }

    /// Down: cuts every live connection and closes new ones at once, until lifted with
    /// `set_down(false)`.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
        if down {
            self.shared.cut_live();
        }
    }

    /// Stops the proxy, cuts its connections and returns what it did.
    pub async fn shutdown(mut self) -> ChaosStats {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        self.shared.cut_live();
        self.shared.snapshot()
    }
}

impl Drop for ChaosProxy {
    fn drop(&mut self) {
        self.cancel.cancel();
        self.shared.cut_live();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    config: ChaosConfig,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    let mut next_id = 0u64;
    loop {
        let accepted = tokio::select! {
            () = cancel.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((client, _)) = accepted else {
            // Out of descriptors or a connection reset before accept: try the next one.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let full = lock(&shared.live).len() >= config.max_connections;
        if shared.down.load(Ordering::SeqCst) || full {
            add(&shared.refused, 1);
            drop(client);
            continue;
        }
        let id = next_id;
        next_id += 1;
        let token = cancel.child_token();
        lock(&shared.live).insert(id, token.clone());
        tokio::spawn(connection(id, client, upstream, config, Arc::clone(&shared), token));
    }
}

async fn connection(
    id: u64,
    client: TcpStream,
    upstream: SocketAddr,
    config: ChaosConfig,
    shared: Arc<Shared>,
    cut: CancellationToken,
) {
    let connected = tokio::select! {
        () = cut.cancelled() => None,
        c = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(upstream)) => Some(c),
    };
    let server = match connected {
        Some(Ok(Ok(server))) => server,
        Some(_) => {
            add(&shared.upstream_failed, 1);
            lock(&shared.live).remove(&id);
            return;
        }
        None => return,
    };
    add(&shared.accepted, 1);
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let seed = config.seed;
    let up = pump(client_read, server_write, Direction::ToServer, rng(seed, id, Direction::ToServer), &config, &shared);
    let down =
        pump(server_read, client_write, Direction::ToClient, rng(seed, id, Direction::ToClient), &config, &shared);
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    // Until both directions ended, one was cut by a fault, or a command cut them all.
    while !(up_done && down_done) {
        let outcome = tokio::select! {
            () = cut.cancelled() => break,
            o = &mut up, if !up_done => {
                up_done = true;
                o
            }
            o = &mut down, if !down_done => {
                down_done = true;
                o
            }
        };
        if outcome == Outcome::Cut {
            break;
        }
    }
    // Leaving drops both pumps and so both sockets' halves: both sides see the end.
    lock(&shared.live).remove(&id);
}

fn rng(seed: u64, id: u64, direction: Direction) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(id.wrapping_mul(2).wrapping_add(direction.index() as u64));
    rng
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The sending side closed (or failed); the receiving side was shut down for writing.
    Ended,
    /// A fault cut the connection.
    Cut,
}

/// A chunk on its way, with its decisions made.
struct Chunk {
    bytes: BytesMut,
    at: Instant,
    stall: Duration,
    /// Close the connection after writing this chunk.
    cut: bool,
}

/// One direction: a reader that draws the faults and a writer that applies delays and
/// stalls, joined by a bounded delay line.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    direction: Direction,
    mut rng: ChaCha8Rng,
    config: &ChaosConfig,
    shared: &Shared,
) -> Outcome {
    let counters = &shared.streams[direction.index()];
    let (tx, mut rx) = mpsc::channel::<Chunk>(DELAY_LINE);
    let reader = async move {
        loop {
            let mut buf = BytesMut::with_capacity(config.chunk_size);
            match from.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    add(&counters.bytes_in, n as u64);
                    add(&counters.chunks, 1);
                }
            }
            let faults = lock(&shared.faults)[direction.index()];
            let mut cut = false;
            if rng.gen_bool(faults.cut) {
                // Keep a random prefix (possibly empty), then end the connection.
                let keep = rng.gen_range(0..buf.len());
                buf.truncate(keep);
                add(&counters.cuts, 1);
                cut = true;
            } else if rng.gen_bool(faults.corrupt) {
                let bit = rng.gen_range(0..buf.len() * 8);
                buf[bit / 8] ^= 1 << (bit % 8);
                add(&counters.corrupted, 1);
            }
            let stall = if !cut && rng.gen_bool(faults.stall) {
                add(&counters.stalls, 1);
                faults.stall_for
            } else {
                Duration::ZERO
            };
            let chunk = Chunk { bytes: buf, at: Instant::now() + faults.delay, stall, cut };
            if tx.send(chunk).await.is_err() || cut {
                return;
            }
        }
    };
    let writer = async {
        while let Some(chunk) = rx.recv().await {
            tokio::time::sleep_until(chunk.at).await;
            if !chunk.stall.is_zero() {
                tokio::time::sleep(chunk.stall).await;
            }
            if to.write_all(&chunk.bytes).await.is_err() {
                return Outcome::Ended;
            }
            add(&counters.bytes_out, chunk.bytes.len() as u64);
            if chunk.cut {
                return Outcome::Cut;
            }
        }
        // The sender closed its side: pass the end of stream on (a half close).
        let _ = to.shutdown().await;
        Outcome::Ended
    };
    let (_, outcome) = tokio::join!(reader, writer);
    outcome
}
