//! Fault injection for tests: a seeded, user-space lossy UDP link.
//!
//! Only with the `fault-injection` cargo feature: a test suite enables it with
//! `veil-transports = { workspace = true, features = ["fault-injection"] }` in its
//! `[dev-dependencies]` (this crate does so for its own tests).
//!
//! The machines Veil is tested on have no `netem`, so loss, reordering, duplication, delay
//! and corruption are applied by a [`LossyProxy`]: a tokio task that sits between clients
//! and one upstream UDP server.
//! A client sends to [`LossyProxy::local_addr`] instead of the server; the proxy gives each
//! client address its own server-facing socket (the server sees one address per client, as
//! behind a NAT) and passes datagrams on in both directions, applying each direction's
//! [`LinkFaults`].
//!
//! Every decision is drawn from a ChaCha RNG seeded by [`ProxyConfig::seed`], one stream
//! per direction, so a direction that sees the same datagrams in the same order makes the
//! same decisions in every run (the order itself comes from the network and the
//! scheduler). [`LossyProxy::stats`] counts what the proxy did, so that a test can check
//! that the faults it asked for really happened.
//!
//! Memory is bounded: at most [`ProxyConfig::max_in_flight`] datagrams wait in each
//! direction's delay line (more are dropped and counted), at most
//! [`ProxyConfig::max_clients`] client addresses get a socket, and no datagram is larger
//! than the largest UDP payload.
//!
//! ```
//! use std::time::Duration;
//! use veil_transports::fault::{LinkFaults, LossyProxy, ProxyConfig};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let server = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
//! let faults = LinkFaults::new().loss(0.1).reorder(0.25).duplicate(0.05).delay(Duration::from_millis(50));
//! let proxy =
//!     LossyProxy::start("127.0.0.1:0".parse()?, server.local_addr()?, ProxyConfig::symmetric(7, faults)).await?;
//!
//! // The client talks to the proxy instead of the server.
//! let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
//! for i in 0..10u8 {
//!     client.send_to(&[i], proxy.local_addr()).await?;
//! }
//! // About nine in ten arrive, 50 ms later, some out of order or twice.
//! let mut got = Vec::new();
//! let mut buf = [0u8; 16];
//! let quiet = Duration::from_millis(300);
//! while let Ok(Ok((n, _))) = tokio::time::timeout(quiet, server.recv_from(&mut buf)).await {
//!     got.extend_from_slice(&buf[..n]);
//! }
//! let stats = proxy.shutdown().await;
//! assert_eq!(stats.to_server.received, 10);
//! assert_eq!(stats.to_server.forwarded, got.len() as u64);
//! assert_eq!(stats.to_server.forwarded, 10 - stats.to_server.lost + stats.to_server.duplicated);
//! # Ok(())
//! # }
//! ```

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rand::Rng;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::MAX_DATAGRAM_SIZE;
use crate::connection::lock;

/// The longest a datagram may be held (delay + jitter + reorder hold), so that deadlines
/// stay far from any overflow and a misconfigured test cannot park packets for hours.
pub const MAX_HOLD: Duration = Duration::from_secs(60);
/// Datagrams passed from the server-facing readers to the proxy task before they wait.
const UPSTREAM_CHANNEL: usize = 1_024;
/// Receive buffer: one byte more than the largest UDP payload.
const RECV_BUFFER: usize = MAX_DATAGRAM_SIZE + 1;

/// What can go wrong when starting or reconfiguring a [`LossyProxy`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FaultError {
    /// A socket could not be bound.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    /// A probability outside `0.0..=1.0` (or NaN).
    #[error("{name} must be a probability in 0..=1, not {value}")]
    InvalidProbability {
        /// Which knob.
        name: &'static str,
        /// The value given.
        value: f64,
    },
    /// `delay + jitter + reorder_delay` exceeds [`MAX_HOLD`].
    #[error("a datagram could be held for {0:?}, more than the maximum of 60 s")]
    HoldTooLong(Duration),
    /// `max_in_flight` or `max_clients` is zero.
    #[error("{0} must be at least 1")]
    ZeroLimit(&'static str),
}

/// The faults applied to one direction of the link. The default is a perfect link.
///
/// For each datagram, in this order: it is lost with probability `loss`; otherwise one
/// random bit of it is flipped with probability `corrupt`; it is sent twice with
/// probability `duplicate`; each copy is delayed by `delay` plus a uniform random share
/// of `jitter`, and held back for another `reorder_delay` with probability `reorder`, so
/// that datagrams sent after it overtake it.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[non_exhaustive]
pub struct LinkFaults {
    /// Probability that a datagram is dropped.
    pub loss: f64,
    /// Probability that a copy is held back for `reorder_delay` on top of its delay.
    pub reorder: f64,
    /// Extra hold of a reordered copy. Zero means "as long as `delay`, at least 1 ms".
    pub reorder_delay: Duration,
    /// Probability that a datagram is sent twice (each copy with its own delay).
    pub duplicate: f64,
    /// Probability that one bit of a datagram is flipped.
    pub corrupt: f64,
    /// Fixed one-way delay.
    pub delay: Duration,
    /// Uniform random extra delay in `0..jitter` (reorders on its own when it exceeds the
    /// spacing of the datagrams).
    pub jitter: Duration,
}

impl LinkFaults {
    /// A perfect link: nothing lost, reordered, duplicated, corrupted or delayed.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the loss probability.
    #[must_use]
    pub fn loss(mut self, p: f64) -> Self {
        self.loss = p;
        self
    }

    /// Sets the probability that a copy is held back (see [`LinkFaults::reorder_delay`]).
    #[must_use]
    pub fn reorder(mut self, p: f64) -> Self {
        self.reorder = p;
        self
    }

    /// Sets how long a reordered copy is held back on top of its delay.
    #[must_use]
    pub fn reorder_delay(mut self, d: Duration) -> Self {
        self.reorder_delay = d;
        self
    }

    /// Sets the duplication probability.
    #[must_use]
    pub fn duplicate(mut self, p: f64) -> Self {
        self.duplicate = p;
        self
    }

    /// Sets the probability of a flipped bit.
    #[must_use]
    pub fn corrupt(mut self, p: f64) -> Self {
        self.corrupt = p;
        self
    }

    /// Sets the fixed one-way delay.
    #[must_use]
    pub fn delay(mut self, d: Duration) -> Self {
        self.delay = d;
        self
    }

    /// Sets the jitter (uniform extra delay in `0..jitter`).
    #[must_use]
    pub fn jitter(mut self, d: Duration) -> Self {
        self.jitter = d;
        self
    }

    /// A link that drops everything (a partition), for [`LossyProxy::set_faults`].
    #[must_use]
    pub fn partition() -> Self {
        Self::new().loss(1.0)
    }

    /// The extra hold of a reordered copy, with the default applied.
    fn hold_back(&self) -> Duration {
        if self.reorder_delay.is_zero() {
            self.delay.max(Duration::from_millis(1))
        } else {
            self.reorder_delay
        }
    }

    fn validate(&self) -> Result<(), FaultError> {
        for (name, value) in
            [("loss", self.loss), ("reorder", self.reorder), ("duplicate", self.duplicate), ("corrupt", self.corrupt)]
        {
            if !(0.0..=1.0).contains(&value) {
                return Err(FaultError::InvalidProbability { name, value });
            }
        }
        let hold = self.delay.saturating_add(self.jitter).saturating_add(self.hold_back());
        if hold > MAX_HOLD {
            return Err(FaultError::HoldTooLong(hold));
        }
        Ok(())
    }
}

/// One direction of the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the clients to the upstream server.
    ToServer,
    /// From the upstream server back to a client.
    ToClient,
}

impl Direction {
    pub(crate) const fn index(self) -> usize {
        match self {
            Self::ToServer => 0,
            Self::ToClient => 1,
        }
    }
}

/// How a [`LossyProxy`] behaves.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct ProxyConfig {
    /// Seed of the decisions (direction `ToServer` uses ChaCha stream 0, `ToClient` stream 1).
    pub seed: u64,
    /// Faults from the clients to the server.
    pub to_server: LinkFaults,
    /// Faults from the server to the clients.
    pub to_client: LinkFaults,
    /// Datagrams held in each direction's delay line; further ones are dropped (and
    /// counted in [`LinkStats::dropped_queue_full`]).
    pub max_in_flight: usize,
    /// Client addresses that get a server-facing socket; datagrams from further ones are
    /// dropped (counted in [`ProxyStats::clients_refused`]).
    pub max_clients: usize,
}

impl ProxyConfig {
    /// A perfect link in both directions (add faults with the other constructors or fields).
    #[must_use]
    pub fn new(seed: u64) -> Self {
        Self { seed, to_server: LinkFaults::new(), to_client: LinkFaults::new(), max_in_flight: 4_096, max_clients: 64 }
    }

    /// The same faults in both directions.
    #[must_use]
    pub fn symmetric(seed: u64, faults: LinkFaults) -> Self {
        Self { to_server: faults, to_client: faults, ..Self::new(seed) }
    }

    /// Sets the faults of one direction.
    #[must_use]
    pub fn with(mut self, direction: Direction, faults: LinkFaults) -> Self {
        match direction {
            Direction::ToServer => self.to_server = faults,
            Direction::ToClient => self.to_client = faults,
        }
        self
    }

    /// Sets [`ProxyConfig::max_in_flight`].
    #[must_use]
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n;
        self
    }

    /// Sets [`ProxyConfig::max_clients`].
    #[must_use]
    pub fn max_clients(mut self, n: usize) -> Self {
        self.max_clients = n;
        self
    }

    fn validate(&self) -> Result<(), FaultError> {
        self.to_server.validate()?;
        self.to_client.validate()?;
        if self.max_in_flight == 0 {
            return Err(FaultError::ZeroLimit("max_in_flight"));
        }
        if self.max_clients == 0 {
            return Err(FaultError::ZeroLimit("max_clients"));
        }
        Ok(())
    }
}

/// What a [`LossyProxy`] did in one direction (a snapshot).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LinkStats {
    /// Datagrams that entered the proxy in this direction.
    pub received: u64,
    /// Datagrams sent on (duplicates count twice).
    pub forwarded: u64,
    /// Datagrams dropped by the `loss` draw.
    pub lost: u64,
    /// Datagrams sent twice.
    pub duplicated: u64,
    /// Copies held back by the `reorder` draw.
    pub held_back: u64,
    /// Copies that left after a datagram that arrived later than them (reordering that
    /// actually happened, from holds or jitter).
    pub reordered: u64,
    /// Datagrams with a flipped bit.
    pub corrupted: u64,
    /// Copies dropped because the delay line was full.
    pub dropped_queue_full: u64,
    /// Copies the socket refused to send (or whose client flow was gone).
    pub send_errors: u64,
}

/// What a [`LossyProxy`] did (a snapshot).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProxyStats {
    /// Clients to server.
    pub to_server: LinkStats,
    /// Server to clients.
    pub to_client: LinkStats,
    /// Client addresses with a server-facing socket.
    pub clients: usize,
    /// Datagrams from client addresses beyond `max_clients` (or whose socket could not be
    /// bound), dropped.
    pub clients_refused: u64,
    /// Datagrams that reached a server-facing socket from somewhere other than the server,
    /// dropped.
    pub stray: u64,
}

#[derive(Debug, Default)]
struct LinkCounters {
    received: AtomicU64,
    forwarded: AtomicU64,
    lost: AtomicU64,
    duplicated: AtomicU64,
    held_back: AtomicU64,
    reordered: AtomicU64,
    corrupted: AtomicU64,
    dropped_queue_full: AtomicU64,
    send_errors: AtomicU64,
}

impl LinkCounters {
    fn snapshot(&self) -> LinkStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        LinkStats {
            received: get(&self.received),
            forwarded: get(&self.forwarded),
            lost: get(&self.lost),
            duplicated: get(&self.duplicated),
            held_back: get(&self.held_back),
            reordered: get(&self.reordered),
            corrupted: get(&self.corrupted),
            dropped_queue_full: get(&self.dropped_queue_full),
            send_errors: get(&self.send_errors),
        }
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

#[derive(Debug)]
struct Shared {
    links: [LinkCounters; 2],
    faults: Mutex<[LinkFaults; 2]>,
    clients: AtomicUsize,
    clients_refused: AtomicU64,
    stray: AtomicU64,
}

impl Shared {
    fn snapshot(&self) -> ProxyStats {
        ProxyStats {
            to_server: self.links[0].snapshot(),
            to_client: self.links[1].snapshot(),
            clients: self.clients.load(Ordering::Relaxed),
            clients_refused: self.clients_refused.load(Ordering::Relaxed),
            stray: self.stray.load(Ordering::Relaxed),
        }
    }
}

/// A seeded, lossy UDP proxy in front of one upstream server (see the [module](self) docs).
///
/// Dropping it stops it; [`LossyProxy::shutdown`] stops it and waits until its sockets
/// are closed.
#[derive(Debug)]
pub struct LossyProxy {
    local_addr: SocketAddr,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl LossyProxy {
    /// Binds the client-facing socket to `listen` (port 0 picks one) and starts passing
    /// datagrams to and from `upstream`. Server-facing sockets are bound to `listen`'s IP.
    /// Needs a tokio runtime.
    ///
    /// # Errors
    /// [`FaultError::Io`] if the socket cannot be bound; the other variants for a
    /// configuration out of range.
    pub async fn start(listen: SocketAddr, upstream: SocketAddr, config: ProxyConfig) -> Result<Self, FaultError> {
        config.validate()?;
        let front = Arc::new(UdpSocket::bind(listen).await?);
        let local_addr = front.local_addr()?;
        let shared = Arc::new(Shared {
            links: Default::default(),
            faults: Mutex::new([config.to_server, config.to_client]),
            clients: AtomicUsize::new(0),
            clients_refused: AtomicU64::new(0),
            stray: AtomicU64::new(0),
        });
        let cancel = CancellationToken::new();
        let task = Task {
            front,
            upstream,
            back_ip: local_addr.ip(),
            flows: HashMap::new(),
            lines: [DelayLine::new(config.seed, Direction::ToServer), DelayLine::new(config.seed, Direction::ToClient)],
            max_in_flight: config.max_in_flight,
            max_clients: config.max_clients,
            shared: Arc::clone(&shared),
            cancel: cancel.clone(),
        };
        let span = tracing::debug_span!("veil_lossy_proxy", addr = %local_addr, %upstream);
        let task = tokio::spawn(tracing::Instrument::instrument(task.run(), span));
        Ok(Self { local_addr, upstream, shared, cancel, task: Some(task) })
    }

    /// The client-facing address: clients send here instead of to the server.
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The server the proxy passes datagrams to.
    #[must_use]
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// What the proxy has done so far.
    #[must_use]
    pub fn stats(&self) -> ProxyStats {
        self.shared.snapshot()
    }

    /// Changes the faults of one direction from the next datagram on (datagrams already in
    /// the delay line keep their release time). A [`LinkFaults::partition`] cuts the link.
    ///
    /// # Errors
    /// As [`LossyProxy::start`] for values out of range; nothing changes then.
    pub fn set_faults(&self, direction: Direction, faults: LinkFaults) -> Result<(), FaultError> {
        faults.validate()?;
        lock(&self.shared.faults)[direction.index()] = faults;
        Ok(())
    }

    /// Stops the proxy: datagrams still in the delay lines are dropped, every socket is
    /// closed when this returns. Returns the final counters.
    pub async fn shutdown(mut self) -> ProxyStats {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            // The task only ends by cancellation; a panic in it would be a bug in the proxy.
            if let Err(e) = task.await {
                tracing::error!(error = %e, "lossy proxy task failed");
            }
        }
        self.shared.snapshot()
    }
}

impl Drop for LossyProxy {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// One datagram copy waiting in a delay line.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Held {
    at: Instant,
    /// Insertion order: copies due at the same instant leave first in, first out.
    order: u64,
    /// Arrival number of the datagram (shared by its copies), to detect reordering.
    seq: u64,
    client: SocketAddr,
    data: Bytes,
}

/// One direction's RNG and the datagrams it holds, by release time.
#[derive(Debug)]
struct DelayLine {
    rng: ChaCha8Rng,
    heap: BinaryHeap<Reverse<Held>>,
    next_order: u64,
    next_seq: u64,
    /// Highest arrival number released so far.
    released: Option<u64>,
}

impl DelayLine {
    fn new(seed: u64, direction: Direction) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(direction.index() as u64);
        Self { rng, heap: BinaryHeap::new(), next_order: 0, next_seq: 0, released: None }
    }

    fn next_at(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse(h)| h.at)
    }

    /// A uniform draw in `0..1`. Every decision draws, whatever its probability, so that
    /// changing one knob does not shift the others' draws for a datagram.
    fn draw(&mut self) -> f64 {
        self.rng.gen::<f64>()
    }

    /// Applies the faults to one arriving datagram and queues what survives.
    fn admit(&mut self, faults: &LinkFaults, counters: &LinkCounters, cap: usize, client: SocketAddr, data: &[u8]) {
        bump(&counters.received);
        let seq = self.next_seq;
        self.next_seq += 1;
        let now = Instant::now();
        let lost = self.draw() < faults.loss;
        let corrupt = self.draw() < faults.corrupt;
        let bit = self.rng.gen::<u64>();
        let duplicate = self.draw() < faults.duplicate;
        if lost {
            bump(&counters.lost);
            return;
        }
        let mut data = data.to_vec();
        if corrupt && !data.is_empty() {
            // Both casts are lossless: a datagram is far shorter than 2^61 bytes.
            let bits = data.len() as u64 * 8;
            let bit = bit % bits;
            data[(bit / 8) as usize] ^= 1 << (bit % 8);
            bump(&counters.corrupted);
        }
        let data = Bytes::from(data);
        let copies = if duplicate {
            bump(&counters.duplicated);
            2
        } else {
            1
        };
        for _ in 0..copies {
            let mut hold = faults.delay + faults.jitter.mul_f64(self.draw());
            if self.draw() < faults.reorder {
                hold += faults.hold_back();
                bump(&counters.held_back);
            }
            if self.heap.len() >= cap {
                bump(&counters.dropped_queue_full);
                continue;
            }
            let order = self.next_order;
            self.next_order += 1;
            // `hold` is at most MAX_HOLD (validated): no overflow.
            self.heap.push(Reverse(Held { at: now + hold, order, seq, client, data: data.clone() }));
        }
    }

    /// Removes the next copy that is due at `now`, counting reordering.
    fn pop_due(&mut self, now: Instant, counters: &LinkCounters) -> Option<Held> {
        if self.next_at()? > now {
            return None;
        }
        let Reverse(held) = self.heap.pop()?;
        match self.released {
            Some(r) if held.seq < r => bump(&counters.reordered),
            Some(r) if held.seq == r => {}
            _ => self.released = Some(held.seq),
        }
        Some(held)
    }
}

/// A client address and its server-facing socket.
#[derive(Debug)]
struct Flow {
    back: Arc<UdpSocket>,
    reader: JoinHandle<()>,
}

/// The proxy's task state.
#[derive(Debug)]
struct Task {
    front: Arc<UdpSocket>,
    upstream: SocketAddr,
    back_ip: std::net::IpAddr,
    flows: HashMap<SocketAddr, Flow>,
    lines: [DelayLine; 2],
    max_in_flight: usize,
    max_clients: usize,
    shared: Arc<Shared>,
    cancel: CancellationToken,
}

impl Task {
    async fn run(mut self) {
        let (up_tx, mut up_rx) = mpsc::channel::<(SocketAddr, Bytes)>(UPSTREAM_CHANNEL);
        let mut buf = vec![0u8; RECV_BUFFER];
        loop {
            let next = match (self.lines[0].next_at(), self.lines[1].next_at()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            tokio::select! {
                () = self.cancel.cancelled() => break,
                () = sleep_until(next), if next.is_some() => self.release().await,
                r = self.front.recv_from(&mut buf) => match r {
                    Ok((n, from)) => self.on_client_datagram(from, &buf[..n], &up_tx).await,
                    // An ICMP error for an earlier send (port unreachable) on some systems.
                    Err(e) => tracing::trace!(error = %e, "client socket error"),
                },
                Some((client, data)) = up_rx.recv() => {
                    let faults = lock(&self.shared.faults)[Direction::ToClient.index()];
                    let counters = &self.shared.links[Direction::ToClient.index()];
                    self.lines[1].admit(&faults, counters, self.max_in_flight, client, &data);
                }
            }
        }
        // Readers stop on the cancellation, or on the closed channel if they were waiting
        // to pass a datagram on; once they are done every server-facing socket is closed.
        drop(up_rx);
        for (_, flow) in self.flows.drain() {
            drop(flow.back);
            if let Err(e) = flow.reader.await {
                tracing::error!(error = %e, "lossy proxy reader failed");
            }
        }
        self.shared.clients.store(0, Ordering::Relaxed);
        tracing::debug!("lossy proxy stopped");
    }

    async fn on_client_datagram(&mut self, from: SocketAddr, data: &[u8], up_tx: &mpsc::Sender<(SocketAddr, Bytes)>) {
        if !self.flows.contains_key(&from) {
            if self.flows.len() >= self.max_clients {
                bump(&self.shared.clients_refused);
                return;
            }
            match self.open_flow(from, up_tx).await {
                Ok(flow) => {
                    self.flows.insert(from, flow);
                    self.shared.clients.store(self.flows.len(), Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cannot bind a server-facing socket");
                    bump(&self.shared.clients_refused);
                    return;
                }
            }
        }
        let faults = lock(&self.shared.faults)[Direction::ToServer.index()];
        let counters = &self.shared.links[Direction::ToServer.index()];
        self.lines[0].admit(&faults, counters, self.max_in_flight, from, data);
    }

    async fn open_flow(&self, client: SocketAddr, up_tx: &mpsc::Sender<(SocketAddr, Bytes)>) -> io::Result<Flow> {
        let back = Arc::new(UdpSocket::bind(SocketAddr::new(self.back_ip, 0)).await?);
        let reader = tokio::spawn(read_upstream(
            Arc::clone(&back),
            self.upstream,
            client,
            up_tx.clone(),
            Arc::clone(&self.shared),
            self.cancel.clone(),
        ));
        Ok(Flow { back, reader })
    }

    /// Sends every copy that is due.
    async fn release(&mut self) {
        let now = Instant::now();
        for direction in [Direction::ToServer, Direction::ToClient] {
            let i = direction.index();
            while let Some(held) = self.lines[i].pop_due(now, &self.shared.links[i]) {
                let sent = match direction {
                    Direction::ToServer => match self.flows.get(&held.client) {
                        Some(flow) => flow.back.send_to(&held.data, self.upstream).await.map(drop),
                        None => Err(io::ErrorKind::NotConnected.into()),
                    },
                    Direction::ToClient => self.front.send_to(&held.data, held.client).await.map(drop),
                };
                match sent {
                    Ok(()) => bump(&self.shared.links[i].forwarded),
                    Err(e) => {
                        tracing::trace!(error = %e, ?direction, "datagram not sent");
                        bump(&self.shared.links[i].send_errors);
                    }
                }
            }
        }
    }
}

/// Reads what the server sends to one client's server-facing socket.
async fn read_upstream(
    back: Arc<UdpSocket>,
    upstream: SocketAddr,
    client: SocketAddr,
    tx: mpsc::Sender<(SocketAddr, Bytes)>,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    let mut buf = vec![0u8; RECV_BUFFER];
    loop {
        let r = tokio::select! {
            () = cancel.cancelled() => return,
            r = back.recv_from(&mut buf) => r,
        };
        match r {
            Ok((n, from)) if from == upstream => {
                if tx.send((client, Bytes::copy_from_slice(&buf[..n]))).await.is_err() {
                    return;
                }
            }
            Ok(_) => bump(&shared.stray),
            Err(e) => tracing::trace!(error = %e, "server socket error"),
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STEP: Duration = Duration::from_secs(10);

    fn localhost() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }

    /// An echo-less sink: the proxy's upstream.
    async fn sink() -> UdpSocket {
        UdpSocket::bind(localhost()).await.unwrap()
    }

    /// Sends `n` numbered datagrams (u32 BE) through the proxy, one after another, letting
    /// the proxy task run in between so that no socket buffer overflows.
    async fn send_numbered(client: &UdpSocket, to: SocketAddr, n: u32) {
        for i in 0..n {
            client.send_to(&i.to_be_bytes(), to).await.unwrap();
            tokio::task::yield_now().await;
        }
    }

    /// Receives until `quiet` passes without a datagram (at most `max` of them).
    async fn drain(s: &UdpSocket, quiet: Duration, max: usize) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        let mut buf = [0u8; 2_048];
        while got.len() < max {
            match tokio::time::timeout(quiet, s.recv_from(&mut buf)).await {
                Ok(r) => {
                    let (n, _) = r.unwrap();
                    got.push(buf[..n].to_vec());
                }
                Err(_) => break,
            }
        }
        got
    }

    fn numbers(got: &[Vec<u8>]) -> Vec<u32> {
        got.iter().map(|d| u32::from_be_bytes(d[..4].try_into().unwrap())).collect()
    }

    /// Waits until the proxy has taken `n` datagrams in direction `to_server`.
    async fn until_received(p: &LossyProxy, n: u64) {
        tokio::time::timeout(STEP, async {
            while p.stats().to_server.received < n {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn a_perfect_link_passes_everything_both_ways_in_order() {
        let server = sink().await;
        let p = LossyProxy::start(localhost(), server.local_addr().unwrap(), ProxyConfig::new(1)).await.unwrap();
        let client = UdpSocket::bind(localhost()).await.unwrap();
        send_numbered(&client, p.local_addr(), 50).await;
        let up = drain(&server, Duration::from_millis(300), 100).await;
        assert_eq!(numbers(&up), (0..50).collect::<Vec<_>>());

        // The server answers the address it saw; the proxy maps it back to the client.
        client.send_to(b"who", p.local_addr()).await.unwrap();
        let mut buf = [0u8; 16];
        let (_, back_addr) = tokio::time::timeout(STEP, server.recv_from(&mut buf)).await.unwrap().unwrap();
        assert_ne!(back_addr, client.local_addr().unwrap());
        for i in 0..20u32 {
            server.send_to(&i.to_be_bytes(), back_addr).await.unwrap();
        }
        let down = drain(&client, Duration::from_millis(300), 100).await;
        assert_eq!(numbers(&down), (0..20).collect::<Vec<_>>());
        let stats = p.shutdown().await;
        assert_eq!((stats.to_server.received, stats.to_server.forwarded), (51, 51));
        assert_eq!((stats.to_client.received, stats.to_client.forwarded), (20, 20));
        assert_eq!(stats.to_server.lost + stats.to_server.reordered + stats.to_server.duplicated, 0);
    }

    /// The numbers that get through a link with 30 % loss, for one seed.
    async fn survivors(seed: u64) -> Vec<u32> {
        let server = sink().await;
        let config = ProxyConfig::new(seed).with(Direction::ToServer, LinkFaults::new().loss(0.3).duplicate(0.2));
        let p = LossyProxy::start(localhost(), server.local_addr().unwrap(), config).await.unwrap();
        let drained = tokio::spawn(async move { drain(&server, Duration::from_millis(300), 1_000).await });
        let client = UdpSocket::bind(localhost()).await.unwrap();
        send_numbered(&client, p.local_addr(), 200).await;
        until_received(&p, 200).await;
        let got = numbers(&tokio::time::timeout(STEP, drained).await.unwrap().unwrap());
        let stats = p.shutdown().await;
        assert_eq!(stats.to_server.forwarded, got.len() as u64);
        assert_eq!(stats.to_server.forwarded, 200 - stats.to_server.lost + stats.to_server.duplicated);
        assert!(stats.to_server.lost > 30 && stats.to_server.lost < 90, "{stats:?}");
        assert!(stats.to_server.duplicated > 10, "{stats:?}");
        got
    }

    #[tokio::test]
    async fn decisions_are_reproducible_from_the_seed() {
        let a = survivors(42).await;
        let b = survivors(42).await;
        let c = survivors(43).await;
        assert_eq!(a, b, "same seed, same datagrams: same decisions");
        assert_ne!(a, c, "another seed decides otherwise");
    }

    #[tokio::test]
    async fn held_back_datagrams_are_overtaken() {
        let server = sink().await;
        let faults = LinkFaults::new().reorder(0.3).reorder_delay(Duration::from_millis(30));
        let p = LossyProxy::start(localhost(), server.local_addr().unwrap(), ProxyConfig::symmetric(3, faults))
            .await
            .unwrap();
        let client = UdpSocket::bind(localhost()).await.unwrap();
        send_numbered(&client, p.local_addr(), 100).await;
        let got = numbers(&drain(&server, Duration::from_millis(300), 1_000).await);
        let mut sorted = got.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>(), "nothing lost or duplicated");
        assert_ne!(got, sorted, "some datagrams were overtaken");
        let stats = p.shutdown().await;
        assert!(stats.to_server.held_back > 10 && stats.to_server.reordered > 0, "{stats:?}");
    }

    #[tokio::test]
    async fn corruption_flips_exactly_one_bit() {
        let server = sink().await;
        let config = ProxyConfig::new(5).with(Direction::ToServer, LinkFaults::new().corrupt(1.0));
        let p = LossyProxy::start(localhost(), server.local_addr().unwrap(), config).await.unwrap();
        let client = UdpSocket::bind(localhost()).await.unwrap();
        let original = [0x5au8; 64];
        for _ in 0..20 {
            client.send_to(&original, p.local_addr()).await.unwrap();
        }
        let got = drain(&server, Duration::from_millis(300), 100).await;
        assert_eq!(got.len(), 20);
        for d in &got {
            let flipped: u32 = d.iter().zip(original).map(|(a, b)| (a ^ b).count_ones()).sum();
            assert_eq!(flipped, 1);
        }
        assert_eq!(p.shutdown().await.to_server.corrupted, 20);
    }

    #[tokio::test]
    async fn the_delay_line_is_bounded() {
        let server = sink().await;
        let config = ProxyConfig::new(9)
            .with(Direction::ToServer, LinkFaults::new().delay(Duration::from_millis(200)))
            .max_in_flight(4);
        let p = LossyProxy::start(localhost(), server.local_addr().unwrap(), config).await.unwrap();
        let client = UdpSocket::bind(localhost()).await.unwrap();
        send_numbered(&client, p.local_addr(), 20).await;
        until_received(&p, 20).await;
        let got = drain(&server, Duration::from_millis(500), 100).await;
        let stats = p.shutdown().await;
        // Whatever the timing, at most 4 wait at once; the 200 ms delay keeps the first
        // ones in the line while the rest arrive.
        assert_eq!(stats.to_server.dropped_queue_full + stats.to_server.forwarded, 20);
        assert!(got.len() < 20 && stats.to_server.dropped_queue_full > 0, "{stats:?}");
    }

    #[tokio::test]
    async fn clients_beyond_the_limit_are_refused_and_partitions_cut_the_link() {
        let server = sink().await;
        let p = LossyProxy::start(localhost(), server.local_addr().unwrap(), ProxyConfig::new(1).max_clients(1))
            .await
            .unwrap();
        let (a, b) = (UdpSocket::bind(localhost()).await.unwrap(), UdpSocket::bind(localhost()).await.unwrap());
        a.send_to(b"a", p.local_addr()).await.unwrap();
        assert_eq!(drain(&server, Duration::from_millis(200), 10).await, [b"a".to_vec()]);
        b.send_to(b"b", p.local_addr()).await.unwrap();
        p.set_faults(Direction::ToServer, LinkFaults::partition()).unwrap();
        a.send_to(b"cut", p.local_addr()).await.unwrap();
        assert!(drain(&server, Duration::from_millis(200), 10).await.is_empty());
        let stats = p.stats();
        assert_eq!((stats.clients, stats.clients_refused, stats.to_server.lost), (1, 1, 1), "{stats:?}");
        assert!(matches!(
            p.set_faults(Direction::ToClient, LinkFaults::new().loss(1.5)),
            Err(FaultError::InvalidProbability { name: "loss", .. })
        ));
        // Shutdown closes the client-facing socket: its port can be bound again.
        let addr = p.local_addr();
        p.shutdown().await;
        UdpSocket::bind(addr).await.unwrap();
    }

    #[tokio::test]
    async fn bad_configurations_are_refused() {
        let up = localhost();
        let bad = [
            (ProxyConfig::new(1).with(Direction::ToServer, LinkFaults::new().loss(f64::NAN)), "probability"),
            (ProxyConfig::new(1).with(Direction::ToClient, LinkFaults::new().reorder(-0.1)), "probability"),
            (ProxyConfig::symmetric(1, LinkFaults::new().delay(Duration::from_secs(3_600))), "hold"),
            (ProxyConfig::new(1).max_in_flight(0), "zero"),
        ];
        for (config, what) in bad {
            let err = LossyProxy::start(localhost(), up, config).await.unwrap_err();
            let ok = match what {
                "probability" => matches!(err, FaultError::InvalidProbability { .. }),
                "hold" => matches!(err, FaultError::HoldTooLong(_)),
                _ => matches!(err, FaultError::ZeroLimit("max_in_flight")),
            };
            assert!(ok, "{what}: {err:?}");
        }
    }
}
