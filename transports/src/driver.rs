//! The per-connection driver: one tokio task that owns a sans-IO
//! [`veil_protocol::Connection`], its carrier (a TCP stream, or a UDP connection's
//! share of the endpoint socket) and its timer, and talks to the application's
//! [`Connection`] handle through bounded channels.
//!
//! The task is a loop around one `select!`: reading, writing, the application's
//! commands, delivery to the application and the core's timer all make progress
//! concurrently; after each wake-up [`Driver::pump`] drains the core's events and packets.
//! Backpressure is structural: the driver stops taking commands while its write buffer
//! is full, and stops reading while the application has not taken what was delivered.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::codec::{Decoder, LengthDelimitedCodec};
use veil_protocol::routing::RoutingMessage;
use veil_protocol::trust::{Authorized, CertRole, RoleSet};
use veil_protocol::wire::{self, RejectReason, MAX_PACKET_LEN};
use veil_protocol::{CloseReason, Closed, ConnectionError, Decision, Event, PublicKey, Role};

use crate::config::{AuthRequest, Transport};
use crate::connection::{lock, Command, ConnShared, Connection, DriverEnds, Message, Received};
use crate::endpoint::{EndpointShared, ReceivedRevocationList, Slot};
use crate::error::Error;
use crate::trust::{TimeSource, TrustState};
use crate::udp::Registration;

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
/// Commands taken from the handle in one go (they then share packets, spec §6.4).
const COMMAND_BATCH: usize = 1_024;
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

/// The read side of a carrier.
#[derive(Debug)]
pub(crate) enum Input {
    Tcp { reader: OwnedReadHalf, buf: BytesMut, codec: LengthDelimitedCodec, max: usize },
    Udp(mpsc::Receiver<(Bytes, SocketAddr)>),
}

impl Input {
    /// spec §3.1: frames are a u16 big-endian length and the packet; a length above
    /// `max` is refused by the codec before it reserves room for the frame.
    pub(crate) fn tcp(reader: OwnedReadHalf, max: usize) -> Self {
        let codec =
            LengthDelimitedCodec::builder().length_field_type::<u16>().big_endian().max_frame_length(max).new_codec();
        Self::Tcp { reader, buf: BytesMut::new(), codec, max }
    }

    /// The next packet. Cancel-safe: bytes read stay in the buffer, the codec keeps its state.
    async fn next(&mut self) -> Incoming {
        match self {
            Self::Tcp { reader, buf, codec, max } => loop {
                match codec.decode(buf) {
                    Ok(Some(frame)) if frame.is_empty() => return Incoming::Failed(Error::EmptyFrame),
                    Ok(Some(frame)) => {
                        if buf.is_empty() && buf.capacity() > IDLE_BUFFER_MAX {
                            *buf = BytesMut::new();
                        }
                        return Incoming::Packet(frame, None);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        let too_long = e.get_ref().is_some_and(|i| {
                            i.downcast_ref::<tokio_util::codec::LengthDelimitedCodecError>().is_some()
                        });
                        return Incoming::Failed(if too_long { Error::FrameTooLarge { max: *max } } else { e.into() });
                    }
                }
                if buf.capacity() - buf.len() < READ_RESERVE {
                    buf.reserve(READ_CHUNK);
                }
                match reader.try_read_buf(buf) {
                    Ok(0) => return Incoming::End,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        // Nothing to read: wait holding no read buffer unless a frame is
                        // partly read, so that an idle connection costs none (measured in
                        // benches/RESULTS.md, idle connections).
                        if buf.is_empty() {
                            *buf = BytesMut::new();
                        }
                        if let Err(e) = reader.readable().await {
                            return Incoming::Failed(e.into());
                        }
                    }
                    Err(e) => return Incoming::Failed(e.into()),
                }
            },
            Self::Udp(rx) => match rx.recv().await {
                // The socket task's copy is this connection's alone: no second copy.
                Some((p, from)) => {
                    Incoming::Packet(p.try_into_mut().unwrap_or_else(|p| BytesMut::from(&p[..])), Some(from))
                }
                None => Incoming::End,
            },
        }
    }
}

/// The write side of a carrier.
#[derive(Debug)]
pub(crate) enum Output {
    Tcp { writer: OwnedWriteHalf, buf: BytesMut },
    Udp { socket: Arc<UdpSocket>, peer: SocketAddr, queue: VecDeque<Bytes> },
}

impl Output {
    fn is_empty(&self) -> bool {
        match self {
            Self::Tcp { buf, .. } => buf.is_empty(),
            Self::Udp { queue, .. } => queue.is_empty(),
        }
    }

    fn has_room(&self) -> bool {
        match self {
            Self::Tcp { buf, .. } => buf.len() < TCP_WRITE_HIGH_WATER,
            Self::Udp { queue, .. } => queue.len() < UDP_WRITE_HIGH_WATER,
        }
    }

    /// Queues one packet: a frame (spec §3.1) or a datagram (spec §3.2).
    fn push(&mut self, packet: &[u8]) {
        match self {
            Self::Tcp { buf, .. } => {
                // The same layout the reader's `LengthDelimitedCodec` expects; packets never
                // exceed MAX_PACKET_LEN, so the length fits.
                buf.reserve(2 + packet.len());
                buf.put_u16(u16::try_from(packet.len()).unwrap_or(u16::MAX));
                buf.extend_from_slice(packet);
            }
            Self::Udp { queue, .. } => queue.push_back(Bytes::copy_from_slice(packet)),
        }
    }

    /// Writes as much as the socket takes. Cancel-safe: a write either happened and was
    /// accounted for, or did not happen.
    async fn write_some(&mut self) -> io::Result<()> {
        match self {
            Self::Tcp { writer, buf } => {
                // Everything queued goes in one write: queued messages share frames and
                // frames share writes.
                let n = writer.write(buf).await?;
                if n == 0 {
                    return Err(io::ErrorKind::WriteZero.into());
                }
                buf.advance(n);
                if buf.is_empty() && buf.capacity() > IDLE_BUFFER_MAX {
                    // An idle connection should not keep a burst's buffer.
                    *buf = BytesMut::new();
                }
                Ok(())
            }
            Self::Udp { socket, peer, queue } => {
                if let Some(d) = queue.front() {
                    // A datagram the socket refuses is lost, like one the network drops.
                    // `poll_send_to` rather than `send_to`: its future is ~400 B smaller, and
                    // it sits in every idle connection's task (benches/RESULTS.md).
                    let peer = *peer;
                    if let Err(e) = std::future::poll_fn(|cx| socket.poll_send_to(cx, d, peer)).await {
                        tracing::debug!(error = %e, "datagram not sent");
                    }
                    queue.pop_front();
                }
                Ok(())
            }
        }
    }

    async fn shutdown(&mut self) {
        if let Self::Tcp { writer, .. } = self {
            let _ = writer.shutdown().await;
        }
    }
}

/// What the core could not take yet (its queue was full), sent first once it has room.
#[derive(Debug)]
enum Held {
    Data(u16, Bytes),
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
    changes: watch::Receiver<u64>,
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

/// Why the select loop woke up.
enum Wake {
    Shutdown,
    ForceClose(Option<CloseReason>),
    Wrote(io::Result<()>),
    Input(Incoming),
    Delivered(bool),
    HandedOff(bool),
    Command(Option<Command>),
    Timer,
    /// The close linger, the write-stall timeout or the peer certificate's expiry (one timer
    /// for all: it sits in every connection's task).
    Deadline,
    /// The trust state changed: re-check the peer (spec §15.8).
    TrustChanged,
}

/// One connection's task state. Deliberately not `Debug`: the core's state includes
/// queued plaintext, which must never reach a log.
pub(crate) struct Driver {
    pub(crate) ep: Arc<EndpointShared>,
    pub(crate) core: veil_protocol::Connection,
    pub(crate) transport: Transport,
    pub(crate) remote_addr: SocketAddr,
    pub(crate) id: u64,
    pub(crate) input: Input,
    pub(crate) output: Output,
    pub(crate) ready: Ready,
    /// Holds one of `max_connections` while the task lives.
    pub(crate) _connection_slot: Slot,
    /// Holds one of `max_handshakes` until the session is established.
    pub(crate) handshake_slot: Option<Slot>,
    /// UDP: this connection's entry in the socket's demultiplexing table.
    pub(crate) _registration: Option<Registration>,
    ends: Option<DriverEnds>,
    shared: Option<Arc<ConnShared>>,
    handoff: Option<Connection>,
    pending: VecDeque<Received>,
    /// A message the core's queue could not take yet.
    held: Option<Held>,
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
    /// Largest packet we produce: the frame maximum (TCP) or the datagram size (UDP).
    send_limit: usize,
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
        input: Input,
        output: Output,
        ready: Ready,
        connection_slot: Slot,
        handshake_slot: Option<Slot>,
        registration: Option<Registration>,
    ) -> Self {
        let send_limit = match transport {
            Transport::Tcp => MAX_PACKET_LEN,
            Transport::Udp => ep.datagram_config.limits.packet_len(),
        };
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
            input,
            output,
            ready,
            _connection_slot: connection_slot,
            handshake_slot,
            _registration: registration,
            ends: None,
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
            send_limit,
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

    /// Runs the connection to its end.
    pub(crate) async fn run(mut self) {
        tracing::debug!("connection task started");
        let outcome = self.drive().await;
        // Boxed: otherwise the task keeps room for the closing steps next to the running
        // loop's state for its whole life (≈ 1 KiB per idle connection, benches/RESULTS.md).
        Box::pin(self.finish(outcome)).await;
    }

    async fn drive(&mut self) -> Error {
        self.pump();
        loop {
            if let Some(outcome) = self.done() {
                return outcome;
            }
            let timer = self.core.poll_timeout().map(|t| self.ep.clock.instant(t));
            let linger = self.closing_since.map(|t| t + self.ep.limits.close_linger);
            let take_commands = self.can_take_commands();
            let can_read = !self.input_done && self.pending.is_empty() && self.closed.is_none();
            let has_ends = self.ends.is_some();
            let can_write = !self.output.is_empty() && !self.carrier_dead;
            let watch_shutdown = !self.shutdown_seen;
            let watch_linger = linger.is_some() && !self.linger_expired;
            let watch_trust = self.trust.is_some() && self.closed.is_none() && self.close_requested.is_none();
            let expiry = self.trust.as_ref().and_then(|t| t.expires).filter(|_| watch_trust);
            let deadline = [linger.filter(|_| watch_linger), self.stall_deadline(), expiry].into_iter().flatten().min();
            let wake = {
                let Self { ep, input, output, ends, pending, handoff, trust, .. } = self;
                let (cmd, force, incoming) = match ends {
                    Some(e) => (Some(&mut e.cmd), Some(&mut e.force_close), Some(&e.incoming)),
                    None => (None, None, None),
                };
                let changes = trust.as_mut().map(|t| &mut t.changes);
                tokio::select! {
                    () = ep.shutdown.cancelled(), if watch_shutdown => Wake::Shutdown,
                    r = force_changed(force), if has_ends => Wake::ForceClose(r),
                    r = output.write_some(), if can_write => Wake::Wrote(r),
                    r = input.next(), if can_read => Wake::Input(r),
                    ok = deliver(incoming, pending), if !pending.is_empty() => Wake::Delivered(ok),
                    ok = hand_off(&ep.accept_tx, handoff), if handoff.is_some() => Wake::HandedOff(ok),
                    c = recv_command(cmd), if take_commands => Wake::Command(c),
                    () = sleep_until(timer), if timer.is_some() => Wake::Timer,
                    () = sleep_until(deadline), if deadline.is_some() => Wake::Deadline,
                    () = trust_changed(changes), if watch_trust => Wake::TrustChanged,
                }
            };
            self.on_wake(wake);
            self.pump();
        }
    }

    fn on_wake(&mut self, wake: Wake) {
        let now = self.ep.clock.now();
        match wake {
            Wake::Shutdown => {
                self.shutdown_seen = true;
                self.request_close(CloseReason::ShuttingDown);
            }
            Wake::ForceClose(reason) => {
                // The ordered `Close` could not get through: close with what the core has.
                self.request_close(reason.unwrap_or(CloseReason::Normal));
                if let Some(e) = self.ends.as_mut() {
                    e.cmd.close();
                }
            }
            Wake::Wrote(Ok(())) => self.stalled_since = None,
            Wake::Wrote(Err(e)) => {
                tracing::debug!(error = %e, "write failed");
                self.fail(e.into());
                self.carrier_dead = true;
            }
            Wake::Input(incoming) => self.on_input(incoming),
            Wake::Delivered(true) | Wake::Timer => {}
            Wake::HandedOff(true) => {
                self.ep.counters.accepted.fetch_add(1, Ordering::Relaxed);
            }
            Wake::Delivered(false) => {
                // The application dropped every handle.
                self.pending.clear();
                self.request_close(CloseReason::Normal);
            }
            Wake::HandedOff(false) => {
                // The endpoint is gone: nobody will accept this connection.
                self.handoff = None;
                self.request_close(CloseReason::ShuttingDown);
            }
            Wake::Command(None) => self.request_close(CloseReason::Normal),
            Wake::Command(Some(cmd)) => {
                self.apply(cmd);
                let mut n = 1;
                while n < COMMAND_BATCH && self.can_take_commands() {
                    let Some(Ok(cmd)) = self.ends.as_mut().map(|e| e.cmd.try_recv()) else { break };
                    self.apply(cmd);
                    n += 1;
                }
            }
            Wake::Deadline => {
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
            }
            Wake::TrustChanged => self.recheck(),
        }
        // Whatever woke us, run the core's timers that are due (they may fire late,
        // never early).
        if self.core.poll_timeout().is_some_and(|t| now >= t) {
            self.core.handle_timeout(now);
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
                    self.output.push(&[wire::TYPE_HANDSHAKE_REJECT, RejectReason::Malformed.code()]);
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
        if let Output::Udp { peer, .. } = &mut self.output {
            *peer = from;
        }
        if let Some(s) = &self.shared {
            *lock(&s.remote_addr) = from;
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
        if self.output.is_empty() || self.carrier_dead {
            self.stalled_since = None;
            return None;
        }
        let since = *self.stalled_since.get_or_insert_with(Instant::now);
        // A timeout too large to represent never fires.
        since.checked_add(self.ep.limits.write_stall_timeout)
    }

    fn can_take_commands(&self) -> bool {
        self.ends.is_some()
            && self.held.is_none()
            && self.close_requested.is_none()
            && self.closed.is_none()
            && self.output.has_room()
    }

    fn apply(&mut self, cmd: Command) {
        match cmd {
            Command::Send { channel, payload } => self.send(channel, payload),
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
            Err(ConnectionError::QueueFull) => self.held = Some(Held::Data(channel, payload)),
            Err(e) => tracing::debug!(error = %e, "message not sent"),
        }
    }

    /// spec §16: a routing message from the application (a relay or an endpoint that
    /// routes). Waits like data when the core's queue is full.
    fn send_routing(&mut self, msg: RoutingMessage) {
        match self.core.send_routing(msg.clone()) {
            Ok(()) => {}
            Err(ConnectionError::QueueFull) => self.held = Some(Held::Routing(msg)),
            Err(e) => tracing::debug!(error = %e, "routing message not sent"),
        }
    }

    /// Largest payload of one `send`: what the peer accepts (core) and what fits in the
    /// packets we produce.
    fn max_payload(&self) -> usize {
        let ours = self.send_limit.saturating_sub(wire::transport_overhead(self.core_mode()) + DATA_FRAMING_MAX);
        self.core.max_message_payload().min(ours)
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
            match self.held.take() {
                Some(Held::Data(channel, payload)) => self.send(channel, payload),
                Some(Held::Routing(msg)) => self.send_routing(msg),
                None => {}
            }
            while let Some(ev) = self.core.poll_event() {
                progressed = true;
                self.on_event(ev);
            }
            let mut internal = None;
            SCRATCH.with_borrow_mut(|buf| {
                let buf = &mut buf[..self.send_limit];
                while self.output.has_room() {
                    match self.core.poll_transmit(now, buf) {
                        Ok(Some(n)) => {
                            self.output.push(&buf[..n]);
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
                let changes = self.ep.authorizer.trust_state().map(TrustState::subscribe);
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
                let shared = Arc::new(ConnShared {
                    id: self.id,
                    transport: self.transport,
                    role: self.core.role(),
                    remote_static,
                    peer: self.trust.as_ref().map(|t| Box::new(t.peer.clone())),
                    remote_addr: Mutex::new(self.remote_addr),
                    handshake_hash: Mutex::new(handshake_hash),
                    max_payload: self.max_payload().into(),
                    stats: Mutex::new(self.core.stats()),
                });
                let limits = &self.ep.limits;
                let (conn, ends) =
                    Connection::new(Arc::clone(&shared), limits.send_queue, limits.recv_queue, limits.close_linger);
                self.shared = Some(shared);
                self.ends = Some(ends);
                self.handshake_slot = None;
                match &mut self.ready {
                    Ready::Initiator(tx) => {
                        if let Some(tx) = tx.take() {
                            // If `connect` was abandoned the handle drops here and the
                            // connection closes.
                            let _ = tx.send(Ok(conn));
                        }
                    }
                    Ready::Responder => self.handoff = Some(conn),
                }
                self.send_time_sync();
            }
            Event::Message { channel, id, payload } => {
                self.pending.push_back(Received::Message(Message { channel, id, payload }));
            }
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
                if let Some(s) = &self.shared {
                    *lock(&s.handshake_hash) = handshake_hash;
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
        let Some(ends) = &self.ends else {
            if self.closed.is_some() {
                self.pending.clear();
            }
            return;
        };
        while let Some(m) = self.pending.pop_front() {
            match ends.incoming.try_send(m) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(m)) => {
                    self.pending.push_front(m);
                    break;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.pending.clear();
                    if self.handoff.is_none() {
                        self.request_close(CloseReason::Normal);
                    }
                    break;
                }
            }
        }
    }

    fn publish(&self) {
        if let Some(s) = &self.shared {
            *lock(&s.stats) = self.core.stats();
            s.max_payload.store(self.max_payload(), Ordering::Relaxed);
        }
    }

    /// The outcome, once the connection has nothing left to do.
    fn done(&self) -> Option<Error> {
        let finished = self.carrier_dead
            || self.linger_expired
            || self.closed.is_some() && self.output.is_empty() && self.pending.is_empty();
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
            let _ = tokio::time::timeout(linger, self.output.shutdown()).await;
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
        if let Some(mut ends) = self.ends.take() {
            // Refuse further commands, then publish the outcome, then close the message
            // channel: whoever sees a channel closed finds the outcome set.
            ends.cmd.close();
            ends.outcome.send_replace(Some(outcome));
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn trust_changed(rx: Option<&mut watch::Receiver<u64>>) {
    match rx {
        Some(rx) => {
            if rx.changed().await.is_err() {
                // The trust state is gone (it never is while the endpoint lives).
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

async fn recv_command(rx: Option<&mut mpsc::Receiver<Command>>) -> Option<Command> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn force_changed(rx: Option<&mut tokio::sync::watch::Receiver<Option<CloseReason>>>) -> Option<CloseReason> {
    match rx {
        Some(rx) => match rx.changed().await {
            Ok(()) => *rx.borrow_and_update(),
            // Every handle is gone; the command channel reports that too.
            Err(_) => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// Waits for room in the application's queue and hands over the oldest message.
/// `false` when the application is gone.
async fn deliver(tx: Option<&mpsc::Sender<Received>>, pending: &mut VecDeque<Received>) -> bool {
    let Some(tx) = tx else { return std::future::pending().await };
    match tx.reserve().await {
        Ok(permit) => {
            if let Some(m) = pending.pop_front() {
                permit.send(m);
            }
            true
        }
        Err(_) => false,
    }
}

/// Waits for room in the accept queue and hands over the connection. `false` when the
/// endpoint is gone.
async fn hand_off(tx: &mpsc::Sender<Connection>, conn: &mut Option<Connection>) -> bool {
    match tx.reserve().await {
        Ok(permit) => {
            if let Some(c) = conn.take() {
                permit.send(c);
            }
            true
        }
        Err(_) => false,
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

    async fn pair() -> (Input, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (ours, (theirs, _)) = tokio::try_join!(TcpStream::connect(addr), listener.accept()).unwrap();
        let (reader, _writer) = ours.into_split();
        (Input::tcp(reader, MAX_PACKET_LEN), theirs)
    }

    fn read_buffer(input: &Input) -> &BytesMut {
        match input {
            Input::Tcp { buf, .. } => buf,
            Input::Udp(_) => unreachable!("a TCP input"),
        }
    }

    #[tokio::test]
    async fn an_idle_tcp_connection_holds_no_read_buffer_but_keeps_a_partial_frame() {
        let (mut input, mut peer) = pair().await;
        peer.write_all(&[0, 3, 1, 2, 3]).await.unwrap();
        match tokio::time::timeout(SETTLE * 50, input.next()).await.unwrap() {
            Incoming::Packet(p, None) => assert_eq!(&p[..], &[1, 2, 3]),
            other => panic!("expected the packet, got {other:?}"),
        }
        // Nothing more to read: the pending read gave its buffer back.
        assert!(tokio::time::timeout(SETTLE, input.next()).await.is_err());
        assert_eq!(read_buffer(&input).capacity(), 0);

        // Half a frame stays buffered while the rest is awaited, and the frame completes.
        peer.write_all(&[0, 4, 9, 8]).await.unwrap();
        // Bounded wait for the four bytes to arrive (loopback: far sooner).
        for _ in 0..100 {
            assert!(tokio::time::timeout(SETTLE, input.next()).await.is_err(), "half a frame is no packet");
            if !read_buffer(&input).is_empty() {
                break;
            }
        }
        // (The codec has taken the length prefix; the bytes read of the packet stay.)
        assert_eq!(&read_buffer(&input)[..], &[9, 8]);
        peer.write_all(&[7, 6]).await.unwrap();
        match tokio::time::timeout(SETTLE * 50, input.next()).await.unwrap() {
            Incoming::Packet(p, None) => assert_eq!(&p[..], &[9, 8, 7, 6]),
            other => panic!("expected the packet, got {other:?}"),
        }

        drop(peer);
        assert!(matches!(tokio::time::timeout(SETTLE * 50, input.next()).await.unwrap(), Incoming::End));
    }
}
