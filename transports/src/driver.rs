//! The per-connection driver: one tokio task that owns a sans-IO
//! [`veil_protocol::Connection`], its carrier (a TCP stream, or a UDP connection's
//! share of the endpoint socket) and its timer, and talks to the application's
//! [`Connection`] handles through the connection's shared queues ([`ConnShared`]).
//!
//! The task is a hand-written poll loop ([`Driver::poll_drive`]) rather than a `select!`:
//! reading, writing, the handles' commands and deliveries, the accept queue and one timer
//! for everything (the core's timers, the close linger, the write-stall timeout, the peer
//! certificate's expiry) all make progress concurrently, and an idle connection's task holds
//! only the driver, one `Sleep` and the shutdown signal — no per-branch futures (measured in
//! benches/RESULTS.md, idle connections). After each wake-up [`Driver::pump`] drains the
//! core's events and packets. Backpressure is structural: the driver stops taking commands
//! while its write buffer is full, and stops reading while the application has not taken
//! what was delivered.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{oneshot, watch};
use tokio::time::{Instant, Sleep};
use tokio_util::codec::{Decoder, LengthDelimitedCodec};
use tokio_util::sync::WaitForCancellationFuture;
use veil_protocol::routing::RoutingMessage;
use veil_protocol::trust::{Authorized, CertRole, RoleSet};
use veil_protocol::wire::{self, RejectReason, MAX_PACKET_LEN};
use veil_protocol::{CloseReason, Closed, ConnectionError, Decision, Event, PublicKey, Role};

use crate::config::{AuthRequest, Transport};
use crate::connection::{lock, Command, ConnShared, Connection, Info, Message, Published, Received};
use crate::endpoint::{EndpointShared, ReceivedRevocationList, Slot};
use crate::error::Error;
use crate::trust::{TimeSource, TrustState};
use crate::udp::{Datagrams, Registration};

/// Bytes of TCP frames buffered for writing before the driver stops producing packets.
const TCP_WRITE_HIGH_WATER: usize = 64 * 1024;
/// Datagrams buffered for sending before the driver stops producing packets.
const UDP_WRITE_HIGH_WATER: usize = 64;
/// Free space the TCP read buffer keeps before a read.
const READ_RESERVE: usize = 4 * 1024;
/// What the TCP read buffer grows by when it is short of [`READ_RESERVE`]: one read takes a
/// 16 KiB frame, or many small ones, at once.
const READ_CHUNK: usize = 16 * 1024;
/// An empty read or write buffer with more capacity than this is released.
const IDLE_BUFFER_MAX: usize = 16 * 1024;
/// Commands taken from the handles in one go (they then share packets, spec §6.4).
const COMMAND_BATCH: usize = 1_024;
/// Commands moved off the handles' queue under one lock.
const COMMAND_CHUNK: usize = 32;
/// Rounds of the poll loop in one poll of the task before it yields to the others (as a
/// `select!` loop would at its next await): a peer or an application that keeps the driver
/// busy cannot hold the worker thread.
const POLL_ROUNDS: usize = 32;
/// Worst-case framing of one data message: kind (1), channel (≤ 3), id (≤ 10), length
/// (≤ 3) — the same bound the core's `max_message_payload` uses (spec §9.2).
pub(crate) const DATA_FRAMING_MAX: usize = 17;

thread_local! {
    /// One packet buffer per worker thread instead of 64 KiB per connection: the core
    /// writes into it and the bytes are copied out before the next await.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; MAX_PACKET_LEN]);
}

/// What a read produced.
#[derive(Debug)]
pub(crate) enum Incoming {
    /// One packet, with its source address (UDP). Owned, so that the core decrypts it in
    /// place (`handle_input_owned`).
    Packet(BytesMut, Option<SocketAddr>),
    /// The carrier has nothing more to give.
    End,
    /// The carrier failed (I/O or framing).
    Failed(Error),
}

/// A TCP connection's stream and buffers. The stream is not split into halves: one task
/// reads and writes it, and the halves would cost an `Arc` per connection.
#[derive(Debug)]
pub(crate) struct TcpCarrier {
    stream: TcpStream,
    /// Bytes read and not yet decoded; holds no storage while nothing is pending.
    read: BytesMut,
    codec: LengthDelimitedCodec,
    max: usize,
    /// Frames queued for writing.
    write: BytesMut,
}

/// A UDP connection's share of the endpoint socket.
#[derive(Debug)]
pub(crate) struct UdpCarrier {
    /// This connection's entry in the socket's demultiplexing table.
    _registration: Registration,
    /// Datagrams the socket task demultiplexed to this connection.
    datagrams: Arc<Datagrams>,
    socket: Arc<UdpSocket>,
    peer: SocketAddr,
    /// Datagrams queued for sending.
    queue: VecDeque<Bytes>,
}

/// What carries a connection's packets.
#[derive(Debug)]
pub(crate) enum Carrier {
    Tcp(TcpCarrier),
    Udp(UdpCarrier),
}

impl Carrier {
    /// spec §3.1: frames are a u16 big-endian length and the packet; a length above
    /// `max` is refused by the codec before it reserves room for the frame.
    pub(crate) fn tcp(stream: TcpStream, max: usize) -> Self {
        let codec =
            LengthDelimitedCodec::builder().length_field_type::<u16>().big_endian().max_frame_length(max).new_codec();
        Self::Tcp(TcpCarrier { stream, read: BytesMut::new(), codec, max, write: BytesMut::new() })
    }

    /// spec §3.2: one packet per datagram, through the endpoint's socket.
    pub(crate) fn udp(
        registration: Registration,
        datagrams: Arc<Datagrams>,
        socket: Arc<UdpSocket>,
        peer: SocketAddr,
    ) -> Self {
        Self::Udp(UdpCarrier { _registration: registration, datagrams, socket, peer, queue: VecDeque::new() })
    }

    /// The next packet, or `Pending` with the task registered for the carrier's readiness.
    /// Bytes read stay in the buffer and the codec keeps its state between polls.
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Incoming> {
        match self {
            Self::Tcp(TcpCarrier { stream, read: buf, codec, max, .. }) => loop {
                match codec.decode(buf) {
                    Ok(Some(frame)) if frame.is_empty() => return Poll::Ready(Incoming::Failed(Error::EmptyFrame)),
                    Ok(Some(frame)) => {
                        if buf.is_empty() && buf.capacity() > IDLE_BUFFER_MAX {
                            *buf = BytesMut::new();
                        }
                        return Poll::Ready(Incoming::Packet(frame, None));
                    }
                    Ok(None) => {}
                    Err(e) => {
                        let too_long = e.get_ref().is_some_and(|i| {
                            i.downcast_ref::<tokio_util::codec::LengthDelimitedCodecError>().is_some()
                        });
                        let e = if too_long { Error::FrameTooLarge { max: *max } } else { e.into() };
                        return Poll::Ready(Incoming::Failed(e));
                    }
                }
                if buf.capacity() == 0 {
                    // Holding no buffer (an idle connection costs none, benches/RESULTS.md):
                    // wait until the socket has bytes before taking one.
                    match stream.poll_read_ready(cx) {
                        Poll::Ready(Ok(())) => {}
                        Poll::Ready(Err(e)) => return Poll::Ready(Incoming::Failed(e.into())),
                        Poll::Pending => return Poll::Pending,
                    }
                }
                if buf.capacity() - buf.len() < READ_RESERVE {
                    buf.reserve(READ_CHUNK);
                }
                // tokio's `poll_read` takes a read that did not fill the buffer as the socket
                // drained and waits for the next readiness event instead of reading again
                // into `WouldBlock`: one `recvfrom` fewer per burst of packets.
                match tokio_util::io::poll_read_buf(Pin::new(&mut *stream), cx, buf) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Incoming::End),
                    Poll::Ready(Ok(_)) => {}
                    Poll::Ready(Err(e)) => return Poll::Ready(Incoming::Failed(e.into())),
                    Poll::Pending => {
                        // Nothing to read: wait holding no read buffer unless a frame is
                        // partly read.
                        if buf.is_empty() {
                            *buf = BytesMut::new();
                        }
                        return Poll::Pending;
                    }
                }
            },
            // The socket task's copy is this connection's alone: no second copy.
            Self::Udp(u) => u.datagrams.poll_recv(cx).map(|(p, from)| Incoming::Packet(p, Some(from))),
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Self::Tcp(t) => t.write.is_empty(),
            Self::Udp(u) => u.queue.is_empty(),
        }
    }

    fn has_room(&self) -> bool {
        match self {
            Self::Tcp(t) => t.write.len() < TCP_WRITE_HIGH_WATER,
            Self::Udp(u) => u.queue.len() < UDP_WRITE_HIGH_WATER,
        }
    }

    /// Queues one packet: a frame (spec §3.1) or a datagram (spec §3.2).
    fn push(&mut self, packet: &[u8]) {
        match self {
            Self::Tcp(TcpCarrier { write: buf, .. }) => {
                // The same layout the reader's `LengthDelimitedCodec` expects; packets never
                // exceed MAX_PACKET_LEN, so the length fits.
                buf.reserve(2 + packet.len());
                buf.put_u16(u16::try_from(packet.len()).unwrap_or(u16::MAX));
                buf.extend_from_slice(packet);
            }
            Self::Udp(u) => u.queue.push_back(Bytes::copy_from_slice(packet)),
        }
    }

    /// Writes once, as much as the socket takes, or registers the task for the socket's
    /// readiness. A write either happened and was accounted for, or did not happen.
    fn poll_write_some(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Self::Tcp(TcpCarrier { stream, write: buf, .. }) => {
                // Everything queued goes in one write: queued messages share frames and
                // frames share writes.
                let n = match Pin::new(stream).poll_write(cx, buf) {
                    Poll::Ready(Ok(n)) => n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                };
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                buf.advance(n);
                if buf.is_empty() && buf.capacity() > IDLE_BUFFER_MAX {
                    // An idle connection should not keep a burst's buffer.
                    *buf = BytesMut::new();
                }
                Poll::Ready(Ok(()))
            }
            Self::Udp(UdpCarrier { socket, peer, queue, .. }) => {
                if let Some(d) = queue.front() {
                    // A datagram the socket refuses is lost, like one the network drops.
                    match socket.poll_send_to(cx, d, *peer) {
                        Poll::Ready(Ok(_)) => {}
                        Poll::Ready(Err(e)) => tracing::debug!(error = %e, "datagram not sent"),
                        Poll::Pending => return Poll::Pending,
                    }
                    queue.pop_front();
                }
                Poll::Ready(Ok(()))
            }
        }
    }

    /// Follows a roaming peer (UDP).
    fn set_peer(&mut self, to: SocketAddr) {
        if let Self::Udp(u) = self {
            u.peer = to;
        }
    }

    /// Releases the storage of empty queues and buffers (on the driver's timer): a
    /// connection that has gone idle after a burst holds none.
    fn trim(&mut self) {
        match self {
            Self::Tcp(t) => {
                // Even at capacity 0 an empty buffer may still hold its allocation (all of it
                // written and advanced past).
                if t.write.is_empty() {
                    t.write = BytesMut::new();
                }
            }
            Self::Udp(u) => {
                if u.queue.is_empty() && u.queue.capacity() > 0 {
                    u.queue = VecDeque::new();
                }
                u.datagrams.trim();
            }
        }
    }

    async fn shutdown(&mut self) {
        if let Self::Tcp(t) = self {
            let _ = t.stream.shutdown().await;
        }
    }
}

/// What the core could not take yet (its queue was full), sent first once it has room.
#[derive(Debug)]
enum Held {
    Data(u16, Bytes),
    DataId(u16, u64, Bytes),
    Routing(RoutingMessage),
}

/// Who waits for the handshake's result.
#[derive(Debug)]
pub(crate) enum Ready {
    /// `connect` waits for the connection or the error.
    Initiator(Option<oneshot::Sender<Result<Connection, Error>>>),
    /// The connection goes to the accept queue; failures are reported to the endpoint.
    Responder,
}

/// A boxed future the driver polls by hand; allocated only while it is needed (a handoff to
/// the accept queue, a trust subscription).
type Pending<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Waits for the next change of the trust state; gives the receiver back (`None` once the
/// trust state is gone, which it never is while the endpoint lives).
fn next_change(mut rx: watch::Receiver<u64>) -> Pending<Option<watch::Receiver<u64>>> {
    Box::pin(async move { rx.changed().await.ok().map(|()| rx) })
}

/// A connection whose peer passed a trust check: what it is re-checked with whenever the
/// trust state changes or its certificate expires (spec §15.6, §15.8). Boxed in the driver:
/// connections without a trust authorizer pay one pointer.
struct PeerTrust {
    state: TrustState,
    /// Who the trust check said the peer is.
    peer: Authorized,
    remote: PublicKey,
    /// The chain the peer sent in its handshake.
    certificate: Option<Vec<u8>>,
    /// The wait for the trust state's next change.
    changes: Option<Pending<Option<watch::Receiver<u64>>>>,
    /// When the chain's validity (plus the skew tolerance) ends, by the monotonic clock.
    expires: Option<Instant>,
}

/// When a verified peer's chain stops being valid at the state's time: one second past its
/// `valid_until` plus the skew tolerance (spec §15.7), at least a second from now. `None`
/// for allowlisted peers and while the time is unknown (a change of time re-checks anyway).
pub(crate) fn expiry_of(state: &TrustState, peer: &Authorized) -> Option<Instant> {
    let Authorized::Certified(p) = peer else { return None };
    let now = state.now()?.as_secs();
    let end = p.valid_until.as_secs().saturating_add(state.clock_skew()).saturating_add(1);
    let wait = std::time::Duration::from_secs(end.saturating_sub(now).max(1));
    // A deadline too far to represent never comes.
    Instant::now().checked_add(wait)
}

/// What made the poll loop go round.
enum Wake {
    Shutdown,
    Wrote(io::Result<()>),
    Input(Incoming),
    HandedOff(bool),
    /// The one timer: the core's timers, the close linger, the write-stall timeout or the
    /// peer certificate's expiry, whichever came first.
    Timer,
    /// The trust state changed: re-check the peer (spec §15.8).
    TrustChanged,
}

/// The driver's end of the shared state. If the driver goes without finishing (its task
/// aborted), the handles learn it from the drop.
struct LinkEnd(Arc<ConnShared>);

impl Drop for LinkEnd {
    fn drop(&mut self) {
        self.0.end(None);
    }
}

/// One connection's task state. Deliberately not `Debug`: the core's state includes
/// queued plaintext, which must never reach a log.
pub(crate) struct Driver {
    pub(crate) ep: Arc<EndpointShared>,
    pub(crate) core: veil_protocol::Connection,
    pub(crate) transport: Transport,
    pub(crate) remote_addr: SocketAddr,
    pub(crate) id: u64,
    pub(crate) carrier: Carrier,
    pub(crate) ready: Ready,
    /// Holds one of `max_connections` while the task lives.
    pub(crate) _connection_slot: Slot,
    /// Holds one of `max_handshakes` until the session is established.
    pub(crate) handshake_slot: Option<Slot>,
    /// The state shared with the handles, once the session is established.
    shared: Option<LinkEnd>,
    /// A responder's connection on its way to the accept queue.
    handoff: Option<Pending<bool>>,
    /// Received messages the handles' queue had no room for yet.
    pending: VecDeque<Received>,
    /// A message the core's queue could not take yet (boxed: rarely there, and the driver
    /// sits in every idle connection's task).
    held: Option<Box<Held>>,
    /// The first local error that ends the connection; wins over the core's report.
    error: Option<Error>,
    closed: Option<Closed>,
    close_requested: Option<CloseReason>,
    closing_since: Option<Instant>,
    linger_expired: bool,
    /// Since when packets have waited for the carrier without any being written.
    stalled_since: Option<Instant>,
    input_done: bool,
    carrier_dead: bool,
    shutdown_seen: bool,
    /// The session was just established: release what the handshake left once idle.
    trim_due: bool,
    /// Certificate roles expected from the peer (spec §15.6).
    expected: RoleSet,
    trust: Option<Box<PeerTrust>>,
}

impl Driver {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        ep: Arc<EndpointShared>,
        core: veil_protocol::Connection,
        transport: Transport,
        remote_addr: SocketAddr,
        carrier: Carrier,
        ready: Ready,
        connection_slot: Slot,
        handshake_slot: Option<Slot>,
    ) -> Self {
        let expected = match (ep.authorizer.roles(), core.role()) {
            (Some(r), Role::Responder) => r.inbound,
            (Some(r), Role::Initiator) => r.outbound,
            (None, _) => RoleSet::NONE,
        };
        Self {
            id: ep.next_id(),
            ep,
            core,
            transport,
            remote_addr,
            carrier,
            ready,
            _connection_slot: connection_slot,
            handshake_slot,
            shared: None,
            handoff: None,
            pending: VecDeque::new(),
            held: None,
            error: None,
            closed: None,
            close_requested: None,
            closing_since: None,
            linger_expired: false,
            stalled_since: None,
            input_done: false,
            carrier_dead: false,
            shutdown_seen: false,
            trim_due: false,
            expected,
            trust: None,
        }
    }

    /// Expects `roles` from the peer instead of the authorizer's default for this direction.
    pub(crate) fn expecting(mut self, roles: Option<RoleSet>) -> Self {
        if let Some(r) = roles {
            self.expected = r;
        }
        self
    }

    /// The tracing span every event of this connection is logged in. Peer keys are public;
    /// nothing secret (keys, hashes, payloads) is ever logged.
    pub(crate) fn span(&self) -> tracing::Span {
        tracing::info_span!(
            "veil_conn",
            id = self.id,
            transport = %self.transport,
            peer = %self.remote_addr,
            role = ?self.core.role(),
        )
    }

    /// Runs the connection to its end. Not an `async fn`: one would keep the driver twice in
    /// the task, as its argument and as the local it is moved to (≈ 1.1 KiB per connection,
    /// benches/RESULTS.md); the block below uses the captured driver in place.
    pub(crate) fn run(self) -> impl Future<Output = ()> + Send {
        let mut driver = self;
        async move {
            tracing::debug!("connection task started");
            let ep = Arc::clone(&driver.ep);
            // The two futures the loop polls, pinned here in the task next to the driver:
            // the endpoint's shutdown, and one timer for every deadline (re-armed as they
            // change).
            let shutdown = ep.shutdown.cancelled();
            let timer = tokio::time::sleep_until(Instant::now());
            tokio::pin!(shutdown, timer);
            let outcome = std::future::poll_fn(|cx| driver.poll_drive(cx, timer.as_mut(), shutdown.as_mut())).await;
            // Boxed: otherwise the task keeps room for the closing steps next to the running
            // loop's state for its whole life (≈ 1 KiB per idle connection, benches/RESULTS.md).
            Box::pin(driver.finish(outcome)).await;
        }
    }

    /// The connection's loop: until it is over, drain the core, poll every source that may
    /// make progress, and exchange with the handles; `Pending` once none did (each has
    /// registered the task's waker by then).
    fn poll_drive(
        &mut self,
        cx: &mut Context<'_>,
        mut timer: Pin<&mut Sleep>,
        mut shutdown: Pin<&mut WaitForCancellationFuture<'_>>,
    ) -> Poll<Error> {
        for _ in 0..POLL_ROUNDS {
            self.pump();
            if let Some(outcome) = self.done() {
                return Poll::Ready(outcome);
            }
            let mut woke = false;
            if !self.shutdown_seen && shutdown.as_mut().poll(cx).is_ready() {
                self.on_wake(Wake::Shutdown);
                woke = true;
            }
            if !self.carrier.is_empty() && !self.carrier_dead {
                if let Poll::Ready(r) = self.carrier.poll_write_some(cx) {
                    self.on_wake(Wake::Wrote(r));
                    woke = true;
                }
            }
            if !self.input_done && self.pending.is_empty() && self.closed.is_none() {
                if let Poll::Ready(incoming) = self.carrier.poll_next(cx) {
                    self.on_wake(Wake::Input(incoming));
                    woke = true;
                }
            }
            if let Some(handoff) = self.handoff.as_mut() {
                if let Poll::Ready(ok) = handoff.as_mut().poll(cx) {
                    self.handoff = None;
                    self.on_wake(Wake::HandedOff(ok));
                    woke = true;
                }
            }
            if self.closed.is_none() && self.close_requested.is_none() {
                if let Some(changes) = self.trust.as_mut().and_then(|t| t.changes.as_mut()) {
                    if let Poll::Ready(rx) = changes.as_mut().poll(cx) {
                        if let Some(t) = self.trust.as_mut() {
                            t.changes = rx.map(next_change);
                        }
                        self.on_wake(Wake::TrustChanged);
                        woke = true;
                    }
                }
            }
            if let Some(at) = self.next_deadline() {
                if timer.deadline() != at {
                    timer.as_mut().reset(at);
                }
                if timer.as_mut().poll(cx).is_ready() {
                    self.on_wake(Wake::Timer);
                    woke = true;
                }
            }
            // Last, so that the handles find the task's waker with the state as it is now
            // (including a session that `pump` has just established).
            if self.exchange(cx) {
                woke = true;
            }
            if !woke {
                if self.trim_due {
                    self.trim_due = false;
                    self.trim();
                }
                return Poll::Pending;
            }
        }
        // Still busy: let the worker's other tasks run, and come back.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// The earliest of the core's next timeout, the close linger, the write-stall timeout and
    /// the peer certificate's expiry.
    fn next_deadline(&mut self) -> Option<Instant> {
        let timer = self.core.poll_timeout().map(|t| self.ep.clock.instant(t));
        let linger = self.closing_since.map(|t| t + self.ep.limits.close_linger).filter(|_| !self.linger_expired);
        let watch_trust = self.closed.is_none() && self.close_requested.is_none();
        let expiry = self.trust.as_ref().and_then(|t| t.expires).filter(|_| watch_trust);
        [timer, linger, self.stall_deadline(), expiry].into_iter().flatten().min()
    }

    /// Everything between the driver and the handles: a forced close, the handles' commands
    /// (while the core and the carrier take them), their going away, and received messages
    /// (while their queue has room). Leaves the task's waker for the handles. Whether anything
    /// changed (the loop then goes round again).
    fn exchange(&mut self, cx: &Context<'_>) -> bool {
        let Some(LinkEnd(shared)) = &self.shared else { return false };
        let (force, abandoned) = {
            let mut link = lock(&shared.link);
            if !link.driver.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                link.driver = Some(cx.waker().clone());
            }
            (link.force_close.take(), link.abandoned)
        };
        let mut changed = false;
        if let Some(reason) = force {
            // The ordered `Close` could not get through: close with what the core has.
            shared.refuse_commands();
            self.request_close(reason);
            changed = true;
        }
        // Commands come off the queue a chunk at a time (one lock per chunk, not per message).
        let mut chunk: [Option<Command>; COMMAND_CHUNK] = [const { None }; COMMAND_CHUNK];
        let mut n = 0;
        'batch: while n < COMMAND_BATCH && self.can_take_commands() {
            let Some(LinkEnd(shared)) = &self.shared else { break };
            let k = shared.take_commands(&mut chunk);
            if k == 0 {
                break;
            }
            for i in 0..k {
                if !self.can_take_commands() {
                    // The core's queue filled up, or a `Close` came: the rest waits.
                    if let Some(LinkEnd(shared)) = &self.shared {
                        shared.untake_commands(&mut chunk[i..k]);
                    }
                    break 'batch;
                }
                if let Some(cmd) = chunk[i].take() {
                    self.apply(cmd);
                    n += 1;
                }
            }
        }
        changed |= n > 0;
        if abandoned && self.close_requested.is_none() {
            // Every handle is gone: once their last commands are out, close (as dropping
            // the last handle promises).
            let drained = self.shared.as_ref().is_some_and(|s| lock(&s.0.link).commands.is_empty());
            if drained {
                self.request_close(CloseReason::Normal);
                changed = true;
            }
        }
        let waiting = self.pending.len();
        self.deliver_ready();
        changed || self.pending.len() != waiting
    }

    fn on_wake(&mut self, wake: Wake) {
        let now = self.ep.clock.now();
        match wake {
            Wake::Shutdown => {
                self.shutdown_seen = true;
                self.request_close(CloseReason::ShuttingDown);
            }
            Wake::Wrote(Ok(())) => self.stalled_since = None,
            Wake::Wrote(Err(e)) => {
                tracing::debug!(error = %e, "write failed");
                self.fail(e.into());
                self.carrier_dead = true;
            }
            Wake::Input(incoming) => self.on_input(incoming),
            Wake::HandedOff(true) => {
                self.ep.counters.accepted.fetch_add(1, Ordering::Relaxed);
            }
            Wake::HandedOff(false) => {
                // The endpoint is gone: nobody will accept this connection.
                self.request_close(CloseReason::ShuttingDown);
            }
            Wake::Timer => {
                let at = Instant::now();
                if self.closing_since.is_some_and(|t| t + self.ep.limits.close_linger <= at) {
                    self.linger_expired = true;
                }
                if self.stall_deadline().is_some_and(|t| t <= at) {
                    // The peer stopped reading: nothing, not even a Close, can get through.
                    tracing::debug!("write stalled, dropping the connection");
                    self.fail(Error::WriteStalled);
                    self.carrier_dead = true;
                }
                if self.trust.as_ref().and_then(|t| t.expires).is_some_and(|t| t <= at) {
                    // spec §15.6: a certificate's `not_after` passed.
                    self.recheck();
                }
                self.trim();
            }
            Wake::TrustChanged => self.recheck(),
        }
        // Whatever woke us, run the core's timers that are due (they may fire late,
        // never early).
        if self.core.poll_timeout().is_some_and(|t| now >= t) {
            self.core.handle_timeout(now);
        }
    }

    /// Releases the storage of empty queues and buffers: the timer fires at the latest with
    /// the core's keepalive, so a connection that has gone idle after a burst holds none for
    /// long.
    fn trim(&mut self) {
        if self.pending.is_empty() && self.pending.capacity() > 0 {
            self.pending = VecDeque::new();
        }
        self.carrier.trim();
        self.core.release_idle_memory();
        if let Some(LinkEnd(shared)) = &self.shared {
            shared.trim();
        }
    }

    fn on_input(&mut self, incoming: Incoming) {
        let now = self.ep.clock.now();
        match incoming {
            Incoming::Packet(packet, from) => {
                let is_transport = packet.first().is_some_and(|t| t & !wire::FLAG_GENERATION == wire::TYPE_TRANSPORT);
                match self.core.handle_input_owned(now, packet) {
                    Ok(()) => {
                        if let Some(from) = from {
                            self.maybe_roam(is_transport, from);
                        }
                    }
                    Err(e) => match self.transport {
                        // spec §10.1: in datagram mode anyone can inject a packet; a refused one
                        // is dropped and the session goes on.
                        Transport::Udp => tracing::trace!(error = %e, "datagram dropped"),
                        // spec §10.1: in stream mode any refused packet ends the connection.
                        Transport::Tcp => {
                            tracing::debug!(error = %e, "packet refused");
                            if !self.core.is_closed() {
                                self.fail(Error::Protocol(e));
                                self.request_close(CloseReason::ProtocolViolation);
                            }
                        }
                    },
                }
            }
            Incoming::End => {
                self.input_done = true;
                if self.transport == Transport::Tcp {
                    if !self.core.is_closed() {
                        self.fail(Error::CarrierClosed);
                    }
                    self.carrier_dead = true;
                }
            }
            Incoming::Failed(e) => {
                self.input_done = true;
                tracing::debug!(error = %e, "carrier failed");
                let framing = matches!(e, Error::FrameTooLarge { .. } | Error::EmptyFrame);
                self.fail(e);
                if !framing {
                    self.carrier_dead = true;
                    return;
                }
                // spec §10.2 #3: a bad length is fatal; a responder still in its handshake
                // answers REJECT(Malformed), an established session sends Close.
                if self.core.role() == Role::Responder && self.shared.is_none() && !self.core.is_closed() {
                    self.carrier.push(&[wire::TYPE_HANDSHAKE_REJECT, RejectReason::Malformed.code()]);
                }
                self.request_close(CloseReason::ProtocolViolation);
            }
        }
    }

    /// Roaming (UDP): follow the peer to a new address once a packet from there has
    /// authenticated — a transport packet that the core accepted — and never before.
    fn maybe_roam(&mut self, is_transport: bool, from: SocketAddr) {
        if !is_transport || from == self.remote_addr {
            return;
        }
        tracing::info!(from = %self.remote_addr, to = %from, "peer moved to a new address");
        self.remote_addr = from;
        self.carrier.set_peer(from);
        if let Some(LinkEnd(s)) = &self.shared {
            lock(&s.info).remote_addr = from;
        }
    }

    /// Records the error that ends the connection. Once the session has closed, carrier
    /// errors (a peer that hung up after its `Close`) change nothing.
    fn fail(&mut self, e: Error) {
        if self.error.is_none() && self.closed.is_none() {
            self.error = Some(e);
        }
    }

    fn request_close(&mut self, reason: CloseReason) {
        if self.close_requested.is_none() {
            self.close_requested = Some(reason);
            self.closing_since.get_or_insert_with(Instant::now);
            self.handoff = None;
            let now = self.ep.clock.now();
            self.core.close(now, reason);
        }
    }

    /// When a carrier that takes none of our packets has kept us waiting for
    /// `write_stall_timeout` (a peer that stopped reading). Every write restarts it.
    fn stall_deadline(&mut self) -> Option<Instant> {
        if self.carrier.is_empty() || self.carrier_dead {
            self.stalled_since = None;
            return None;
        }
        let since = *self.stalled_since.get_or_insert_with(Instant::now);
        // A timeout too large to represent never fires.
        since.checked_add(self.ep.limits.write_stall_timeout)
    }

    fn can_take_commands(&self) -> bool {
        self.shared.is_some()
            && self.held.is_none()
            && self.close_requested.is_none()
            && self.closed.is_none()
            && self.carrier.has_room()
    }

    fn apply(&mut self, cmd: Command) {
        match cmd {
            Command::Send { channel, payload } => self.send(channel, payload),
            Command::SendData { channel, id, payload } => self.send_data(channel, id, payload),
            Command::Delivery(msg) => {
                if let Err(e) = self.core.send_delivery(msg) {
                    tracing::debug!(error = %e, "delivery message not sent");
                }
            }
            Command::Routing(msg) => self.send_routing(msg),
            Command::PushRevocationList(list) => {
                if let Err(e) = self.core.push_revocation_list(list) {
                    tracing::debug!(error = %e, "revocation list not pushed");
                }
            }
            Command::Close(reason) => self.request_close(reason),
        }
    }

    /// Checks the peer again against the current trust state (spec §15.6, §15.8) and closes
    /// the connection with the mapped reason if it now fails: `Revoked` for a revocation,
    /// `BadCertificate` for an expired chain, `Unauthorized` otherwise.
    fn recheck(&mut self) {
        let Some(t) = self.trust.as_mut() else { return };
        match t.state.check(&t.remote, t.certificate.as_deref(), self.expected) {
            Ok(peer) => t.expires = expiry_of(&t.state, &peer),
            Err(e) => {
                t.expires = None;
                tracing::info!(error = %e, "peer no longer passes the trust check, closing");
                self.request_close(e.close_reason());
            }
        }
    }

    /// spec §15.7: a node with a real-time clock tells each device peer the time, when the
    /// session starts and after each re-handshake.
    fn send_time_sync(&mut self) {
        let Some(t) = &self.trust else { return };
        let device = matches!(&t.peer, Authorized::Certified(p) if p.role == CertRole::Device);
        if !device || t.state.time_source() != TimeSource::SystemClock {
            return;
        }
        if let Some(now) = t.state.now() {
            if let Err(e) = self.core.send_time_sync(now.as_secs()) {
                tracing::debug!(error = %e, "TimeSync not sent");
            }
        }
    }

    /// spec §15.8: a list a peer pushed is applied to the trust state (which logs a refusal
    /// and keeps its current list), then published for the application.
    fn on_revocation_list(&mut self, list: Bytes) {
        let result = match self.ep.authorizer.trust_state() {
            Some(state) => state.update_revocation_list(&list).map_err(Error::from),
            None => Err(Error::NoTrust),
        };
        if let Some(remote_static) = self.core.remote_static().copied() {
            // No subscriber is fine: the trust state has applied (or refused) it.
            let _ =
                self.ep.revocations.send(ReceivedRevocationList { remote_static, connection: self.id, list, result });
        }
    }

    fn send(&mut self, channel: u16, payload: Bytes) {
        match self.core.send(channel, payload.clone()) {
            Ok(_) => {}
            Err(ConnectionError::QueueFull) => self.held = Some(Box::new(Held::Data(channel, payload))),
            Err(e) => tracing::debug!(error = %e, "message not sent"),
        }
    }

    /// spec §17.2: a data message with the delivery layer's id. Waits like data.
    fn send_data(&mut self, channel: u16, id: u64, payload: Bytes) {
        match self.core.send_data(channel, id, payload.clone()) {
            Ok(()) => {}
            Err(ConnectionError::QueueFull) => self.held = Some(Box::new(Held::DataId(channel, id, payload))),
            Err(e) => tracing::debug!(error = %e, "message not sent"),
        }
    }

    /// spec §16: a routing message from the application (a relay or an endpoint that
    /// routes). Waits like data when the core's queue is full.
    fn send_routing(&mut self, msg: RoutingMessage) {
        match self.core.send_routing(msg.clone()) {
            Ok(()) => {}
            Err(ConnectionError::QueueFull) => self.held = Some(Box::new(Held::Routing(msg))),
            Err(e) => tracing::debug!(error = %e, "routing message not sent"),
        }
    }

    /// Largest payload of one `send`: what the peer accepts (core) and what fits in the
    /// packets we produce.
    fn max_payload(&self) -> usize {
        let ours = self.send_limit().saturating_sub(wire::transport_overhead(self.core_mode()) + DATA_FRAMING_MAX);
        self.core.max_message_payload().min(ours)
    }

    /// Largest packet we produce: the frame maximum (TCP) or the datagram size (UDP).
    fn send_limit(&self) -> usize {
        match self.transport {
            Transport::Tcp => MAX_PACKET_LEN,
            Transport::Udp => self.ep.datagram_config.limits.packet_len(),
        }
    }

    fn core_mode(&self) -> veil_protocol::Mode {
        match self.transport {
            Transport::Tcp => veil_protocol::Mode::Stream,
            Transport::Udp => veil_protocol::Mode::Datagram,
        }
    }

    /// Drains the core: events (decisions, messages, state changes), then packets, until
    /// neither produces anything new.
    fn pump(&mut self) {
        loop {
            let mut progressed = false;
            let now = self.ep.clock.now();
            match self.held.take().map(|h| *h) {
                Some(Held::Data(channel, payload)) => self.send(channel, payload),
                Some(Held::DataId(channel, id, payload)) => self.send_data(channel, id, payload),
                Some(Held::Routing(msg)) => self.send_routing(msg),
                None => {}
            }
            while let Some(ev) = self.core.poll_event() {
                progressed = true;
                self.on_event(ev);
            }
            let mut internal = None;
            SCRATCH.with_borrow_mut(|buf| {
                let buf = &mut buf[..self.send_limit()];
                while self.carrier.has_room() {
                    match self.core.poll_transmit(now, buf) {
                        Ok(Some(n)) => {
                            self.carrier.push(&buf[..n]);
                            progressed = true;
                        }
                        Ok(None) => break,
                        Err(e) => {
                            internal = Some(e);
                            break;
                        }
                    }
                }
            });
            if let Some(e) = internal {
                // Only a packet larger than our buffer: a bug, not the peer's doing.
                tracing::error!(error = %e, "cannot produce packet");
                self.fail(Error::Protocol(e));
                self.request_close(CloseReason::InternalError);
            }
            self.deliver_ready();
            if !progressed {
                break;
            }
        }
        self.publish();
    }

    fn on_event(&mut self, ev: Event) {
        // No clock read here for the other events: this runs once per received message.
        match ev {
            Event::AuthorizationRequired { remote_static, certificate } => {
                // Subscribed before the check, so that no change after it goes unseen.
                let changes = self.ep.authorizer.trust_state().map(|s| next_change(s.subscribe()));
                let req = AuthRequest {
                    remote_static: &remote_static,
                    certificate: certificate.as_deref(),
                    remote_addr: self.remote_addr,
                    transport: self.transport,
                    role: self.core.role(),
                    expected_roles: self.expected,
                    relay: None,
                };
                let (decision, peer) = self.ep.authorizer.decide(&req);
                match (&decision, peer) {
                    (Decision::Deny(reason), _) => tracing::info!(remote = ?remote_static, %reason, "peer denied"),
                    (_, Some(peer)) => {
                        if let (Some(state), Some(changes)) = (self.ep.authorizer.trust_state(), changes) {
                            let expires = expiry_of(state, &peer);
                            let state = state.clone();
                            let remote = remote_static;
                            let changes = Some(changes);
                            self.trust =
                                Some(Box::new(PeerTrust { state, peer, remote, certificate, changes, expires }));
                        }
                    }
                    _ => {}
                }
                // A denial closes the core, which reports it with `Closed`.
                let _ = self.core.authorize(self.ep.clock.now(), decision);
            }
            Event::Connected { remote_static, handshake_hash } => {
                tracing::info!(remote = ?remote_static, "connection established");
                let published = Published {
                    id: self.id,
                    transport: self.transport,
                    role: self.core.role(),
                    remote_static,
                    // Connected is reported once the session exists.
                    suite: self.core.session().map(veil_protocol::Session::suite),
                    peer: self.trust.as_ref().map(|t| Box::new(t.peer.clone())),
                    info: Info { remote_addr: self.remote_addr, handshake_hash, stats: self.core.stats() },
                    max_payload: self.max_payload(),
                };
                let limits = &self.ep.limits;
                let shared =
                    Arc::new(ConnShared::new(published, limits.send_queue, limits.recv_queue, limits.close_linger));
                let conn = Connection::new(Arc::clone(&shared));
                self.shared = Some(LinkEnd(shared));
                self.handshake_slot = None;
                self.trim_due = true;
                match &mut self.ready {
                    Ready::Initiator(tx) => {
                        if let Some(tx) = tx.take() {
                            // If `connect` was abandoned the handle drops here and the
                            // connection closes.
                            let _ = tx.send(Ok(conn));
                        }
                    }
                    Ready::Responder => {
                        let accept = self.ep.accept_tx.clone();
                        // Waits for room in the accept queue; `false` when the endpoint is gone.
                        self.handoff = Some(Box::pin(async move { accept.send(conn).await.is_ok() }));
                    }
                }
                self.send_time_sync();
            }
            Event::Message { channel, id, payload } => {
                self.pending.push_back(Received::Message(Message { channel, id, payload }));
            }
            Event::Delivery(msg) => self.pending.push_back(Received::Delivery(msg)),
            Event::Routing(msg) => {
                if self.ep.routing {
                    self.pending.push_back(Received::Routing(msg));
                } else {
                    // spec §16.7: a node that does not route drops routing messages.
                    self.ep.counters.routing_dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(route = msg.route(), "routing message dropped: this endpoint does not route");
                }
            }
            Event::Rehandshaked { handshake_hash } => {
                tracing::debug!("re-handshake complete");
                if let Some(LinkEnd(s)) = &self.shared {
                    lock(&s.info).handshake_hash = handshake_hash;
                }
                self.send_time_sync();
            }
            Event::RevocationList { list } => self.on_revocation_list(list),
            Event::Unsent { channel, id, len } => {
                tracing::warn!(channel, id, len, "message larger than the peer's packet limit dropped unsent");
            }
            Event::TimeSync { unix_time } => match &self.trust {
                Some(t) => {
                    t.state.accept_time_sync(&t.remote, Some(&t.peer), unix_time);
                }
                None => tracing::debug!("TimeSync ignored: no trust state"),
            },
            Event::Closed(c) => {
                tracing::debug!(reason = %c.reason, by_peer = c.by_peer, error = ?c.error, "session closed");
                self.closing_since.get_or_insert_with(Instant::now);
                self.handoff = None;
                self.closed = Some(c);
            }
            _ => {}
        }
    }

    /// Hands received messages to the application while its queue has room.
    fn deliver_ready(&mut self) {
        let Some(LinkEnd(shared)) = &self.shared else {
            if self.closed.is_some() {
                self.pending.clear();
            }
            return;
        };
        if self.pending.is_empty() {
            return;
        }
        let mut link = lock(&shared.link);
        if link.abandoned {
            // Nobody will read them.
            link.incoming = VecDeque::new();
            drop(link);
            self.pending.clear();
            if self.handoff.is_none() {
                self.request_close(CloseReason::Normal);
            }
            return;
        }
        let was_empty = link.incoming.is_empty();
        while link.incoming.len() < shared.recv_queue {
            let Some(m) = self.pending.pop_front() else { break };
            link.incoming.push_back(m);
        }
        let arrived = was_empty && !link.incoming.is_empty();
        drop(link);
        // Receivers wait only on an empty queue: the first message wakes them.
        if arrived {
            shared.arrived.notify_waiters();
        }
    }

    fn publish(&self) {
        if let Some(LinkEnd(s)) = &self.shared {
            lock(&s.info).stats = self.core.stats();
            s.max_payload.store(self.max_payload(), Ordering::Relaxed);
        }
    }

    /// The outcome, once the connection has nothing left to do.
    fn done(&self) -> Option<Error> {
        let finished = self.carrier_dead
            || self.linger_expired
            || self.closed.is_some() && self.carrier.is_empty() && self.pending.is_empty();
        finished.then(|| self.outcome())
    }

    fn outcome(&self) -> Error {
        if let Some(e) = &self.error {
            return e.clone();
        }
        match &self.closed {
            Some(Closed { error: Some(e), .. }) => Error::Protocol(e.clone()),
            Some(Closed { reason, by_peer, .. }) => Error::Closed { reason: *reason, by_peer: *by_peer },
            None => Error::Closed { reason: self.close_requested.unwrap_or(CloseReason::Normal), by_peer: false },
        }
    }

    async fn finish(mut self, outcome: Error) {
        // The handshake is over either way: free its slot before anyone hears about it.
        self.handshake_slot = None;
        if !self.carrier_dead {
            let linger = self.ep.limits.close_linger;
            let _ = tokio::time::timeout(linger, self.carrier.shutdown()).await;
        }
        self.publish();
        match &outcome {
            Error::Closed { reason, by_peer } => tracing::info!(%reason, by_peer, "connection closed"),
            e if self.shared.is_some() => tracing::info!(error = %e, "connection ended"),
            e => tracing::debug!(error = %e, "handshake failed"),
        }
        match &mut self.ready {
            Ready::Initiator(tx) => {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(Err(outcome.clone()));
                }
            }
            Ready::Responder if self.shared.is_none() => {
                self.ep.report_failure(self.remote_addr, self.transport, outcome.clone());
            }
            Ready::Responder => {}
        }
        if let Some(LinkEnd(shared)) = &self.shared {
            // Refuses further commands and publishes the outcome, which `recv` returns after
            // the messages already queued.
            shared.end(Some(outcome));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Duration;

    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// Long enough for bytes written on loopback to arrive; a read that is still pending
    /// after it has nothing to read.
    const SETTLE: Duration = Duration::from_millis(100);

    async fn pair() -> (Carrier, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (ours, (theirs, _)) = tokio::try_join!(TcpStream::connect(addr), listener.accept()).unwrap();
        (Carrier::tcp(ours, MAX_PACKET_LEN), theirs)
    }

    fn read_buffer(carrier: &Carrier) -> &BytesMut {
        match carrier {
            Carrier::Tcp(t) => &t.read,
            Carrier::Udp(_) => unreachable!("a TCP carrier"),
        }
    }

    /// The next packet, as the driver's loop polls for it.
    async fn next(carrier: &mut Carrier) -> Incoming {
        std::future::poll_fn(|cx| carrier.poll_next(cx)).await
    }

    #[tokio::test]
    async fn an_idle_tcp_connection_holds_no_read_buffer_but_keeps_a_partial_frame() {
        let (mut input, mut peer) = pair().await;
        peer.write_all(&[0, 3, 1, 2, 3]).await.unwrap();
        match tokio::time::timeout(SETTLE * 50, next(&mut input)).await.unwrap() {
            Incoming::Packet(p, None) => assert_eq!(&p[..], &[1, 2, 3]),
            other => panic!("expected the packet, got {other:?}"),
        }
        // Nothing more to read: the pending read gave its buffer back.
        assert!(tokio::time::timeout(SETTLE, next(&mut input)).await.is_err());
        assert_eq!(read_buffer(&input).capacity(), 0);

        // Half a frame stays buffered while the rest is awaited, and the frame completes.
        peer.write_all(&[0, 4, 9, 8]).await.unwrap();
        // Bounded wait for the four bytes to arrive (loopback: far sooner).
        for _ in 0..100 {
            assert!(tokio::time::timeout(SETTLE, next(&mut input)).await.is_err(), "half a frame is no packet");
            if !read_buffer(&input).is_empty() {
                break;
            }
        }
        // (The codec has taken the length prefix; the bytes read of the packet stay.)
        assert_eq!(&read_buffer(&input)[..], &[9, 8]);
        peer.write_all(&[7, 6]).await.unwrap();
        match tokio::time::timeout(SETTLE * 50, next(&mut input)).await.unwrap() {
            Incoming::Packet(p, None) => assert_eq!(&p[..], &[9, 8, 7, 6]),
            other => panic!("expected the packet, got {other:?}"),
        }

        drop(peer);
        assert!(matches!(tokio::time::timeout(SETTLE * 50, next(&mut input)).await.unwrap(), Incoming::End));
    }
}
