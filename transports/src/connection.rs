//! The application's handle on one connection. The connection itself lives in a driver
//! task ([`crate::driver`]); the handles and the driver share one [`ConnShared`]: what the
//! driver publishes, and the two bounded queues between them (commands to the driver,
//! received messages to the application).
//!
//! The queues are plain `VecDeque`s behind one mutex, with `Notify`s for the handles and the
//! driver's waker: an idle connection holds no queue storage at all (tokio `mpsc` channels
//! would allocate their first block of slots up front, ≈ 2 KiB each; benches/RESULTS.md,
//! idle connections).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Waker;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use veil_protocol::delivery::DeliveryMessage;
use veil_protocol::handshake::HANDSHAKE_HASH_LEN;
use veil_protocol::routing::RoutingMessage;
use veil_protocol::trust::{Authorized, MAX_REVOCATION_LIST_LEN};
use veil_protocol::{CloseReason, ConnectionStats, PublicKey, Role, Suite};

use crate::config::Transport;
use crate::error::Error;

/// A message received on a connection (spec §9.2 `Data`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Message {
    /// Application channel.
    pub channel: u16,
    /// The sender's id for this message (per channel, counting from 0).
    pub id: u64,
    /// The payload.
    pub payload: Bytes,
}

/// What [`Connection::recv_any`] returns: a data message, or a routing message (spec §16)
/// on an endpoint that routes ([`crate::EndpointBuilder::routing`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Received {
    /// A data message (spec §9.2 `Data`).
    Message(Message),
    /// A routing message: an envelope, an announcement or a notice. Envelopes share the
    /// decrypted packet's buffer.
    Routing(RoutingMessage),
    /// A delivery message (spec §17): `Stream`, `Skip` or `Ack`, for the delivery layer of a
    /// [`RoutedEndpoint`](crate::RoutedEndpoint) that reads this link as a direct link.
    Delivery(DeliveryMessage),
}

/// Why [`Connection::try_send_routing`] did not queue a message.
#[derive(Debug)]
#[non_exhaustive]
pub enum TrySendError {
    /// The connection's queue is full (a relay answers `Unreachable { Congested }`, spec
    /// §16.4); the message is handed back.
    Full(RoutingMessage),
    /// The connection has ended, or the message cannot be sent on it (too large).
    Failed(Error),
}

/// What a handle asks of its driver. Travels in order with the data, so a close
/// follows every message sent before it.
#[derive(Debug)]
pub(crate) enum Command {
    Send {
        channel: u16,
        payload: Bytes,
    },
    /// spec §17.2: a data message with the id the delivery layer assigned.
    SendData {
        channel: u16,
        id: u64,
        payload: Bytes,
    },
    /// spec §17: a delivery message.
    Delivery(DeliveryMessage),
    /// spec §15.8: a revocation list for the peer.
    PushRevocationList(Bytes),
    /// spec §16: a routing message.
    Routing(RoutingMessage),
    Close(CloseReason),
}

/// Locks a mutex whose data stays consistent even if a holder panicked (plain values).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How far the driver is.
#[derive(Debug)]
pub(crate) enum End {
    Running,
    /// The driver has finished: how the connection ended.
    Over(Error),
    /// The driver is gone without a word (its task was aborted, e.g. with the runtime).
    Gone,
}

/// The queues between the handles and the driver, and what they tell each other. Both
/// queues are bounded (by `send_queue` and `recv_queue`) and hold no storage while empty
/// and idle: the driver releases it on its timer ([`ConnShared::trim`]).
#[derive(Debug)]
pub(crate) struct Link {
    /// Commands from the handles, in order: a close follows every message sent before it.
    pub(crate) commands: VecDeque<Command>,
    /// Received messages the application has not read yet.
    pub(crate) incoming: VecDeque<Received>,
    /// The driver takes no more commands (it is closing or has ended).
    pub(crate) refusing: bool,
    /// Set by `close` when the ordered `Close` command cannot get through in time.
    pub(crate) force_close: Option<CloseReason>,
    /// Every handle is gone: nobody sends or reads any more.
    pub(crate) abandoned: bool,
    pub(crate) end: End,
    /// The driver's task, woken when the handles have something for it.
    pub(crate) driver: Option<Waker>,
}

impl Link {
    fn wake_driver(&self) {
        if let Some(w) = &self.driver {
            w.wake_by_ref();
        }
    }

    fn outcome(&self) -> Option<Error> {
        match &self.end {
            End::Running => None,
            End::Over(e) => Some(e.clone()),
            End::Gone => Some(Error::EndpointClosed),
        }
    }
}

/// One connection's state shared by its handles and its driver, created once the session is
/// established: what the driver publishes, and the [`Link`] between them.
pub(crate) struct ConnShared {
    pub(crate) id: u64,
    pub(crate) transport: Transport,
    pub(crate) role: Role,
    pub(crate) remote_static: PublicKey,
    pub(crate) suite: Option<Suite>,
    /// Who the trust check said the peer is (spec §15.6).
    pub(crate) peer: Option<Box<Authorized>>,
    /// What changes during the connection (one lock for the three: they are read rarely).
    pub(crate) info: Mutex<Info>,
    pub(crate) max_payload: AtomicUsize,
    pub(crate) link: Mutex<Link>,
    /// Live [`Connection`] handles; the last one to go tells the driver.
    handles: AtomicUsize,
    /// Commands the driver's queue takes before `send` waits.
    send_queue: usize,
    /// Received messages queued for the application before the driver stops reading.
    pub(crate) recv_queue: usize,
    linger: Duration,
    /// Signalled when the command queue stops being full, when the driver refuses commands
    /// and when it has finished: for senders waiting for room and for `closed` and `close`
    /// (one `Notify` for both: each waiter checks what it waits for).
    room_or_end: Notify,
    /// Signalled when the message queue stops being empty, for receivers.
    pub(crate) arrived: Notify,
}

/// The connection's state that changes while it lives. Not `Debug`: the handshake hash
/// stays out of logs.
pub(crate) struct Info {
    /// The peer's current address (UDP: it follows a roaming peer).
    pub(crate) remote_addr: SocketAddr,
    pub(crate) handshake_hash: [u8; HANDSHAKE_HASH_LEN],
    pub(crate) stats: ConnectionStats,
}

/// What the driver knows of the connection when it creates the shared state.
pub(crate) struct Published {
    pub(crate) id: u64,
    pub(crate) transport: Transport,
    pub(crate) role: Role,
    pub(crate) remote_static: PublicKey,
    pub(crate) suite: Option<Suite>,
    pub(crate) peer: Option<Box<Authorized>>,
    pub(crate) info: Info,
    pub(crate) max_payload: usize,
}

impl ConnShared {
    pub(crate) fn new(p: Published, send_queue: usize, recv_queue: usize, linger: Duration) -> Self {
        Self {
            id: p.id,
            transport: p.transport,
            role: p.role,
            remote_static: p.remote_static,
            suite: p.suite,
            peer: p.peer,
            info: Mutex::new(p.info),
            max_payload: p.max_payload.into(),
            link: Mutex::new(Link {
                commands: VecDeque::new(),
                incoming: VecDeque::new(),
                refusing: false,
                force_close: None,
                abandoned: false,
                end: End::Running,
                driver: None,
            }),
            handles: AtomicUsize::new(0),
            send_queue: send_queue.max(1),
            recv_queue: recv_queue.max(1),
            linger,
            room_or_end: Notify::new(),
            arrived: Notify::new(),
        }
    }

    /// A handle: queues `cmd` if the queue has room. `Err(Some(cmd))` when it is full,
    /// `Err(None)` when the driver refuses commands.
    fn try_push(&self, cmd: Command) -> Result<(), Option<Command>> {
        let mut link = lock(&self.link);
        if link.refusing {
            return Err(None);
        }
        if link.commands.len() >= self.send_queue {
            return Err(Some(cmd));
        }
        // The driver takes everything queued whenever it runs: only the first command of a
        // batch needs to wake it.
        if link.commands.is_empty() {
            link.wake_driver();
        }
        link.commands.push_back(cmd);
        Ok(())
    }

    /// A handle: the oldest received message, or the outcome once the driver has finished
    /// and every message was read; `None` while there is neither.
    fn try_recv(&self) -> Option<Result<Received, Error>> {
        let mut link = lock(&self.link);
        let was_full = link.incoming.len() >= self.recv_queue;
        if let Some(m) = link.incoming.pop_front() {
            // The driver stops reading while the queue is full: room lets it go on.
            if was_full {
                link.wake_driver();
            }
            return Some(Ok(m));
        }
        link.outcome().map(Err)
    }

    /// The driver: moves up to `into.len()` of the oldest commands into `into` under one
    /// lock, and returns how many. Wakes senders waiting for room.
    pub(crate) fn take_commands(&self, into: &mut [Option<Command>]) -> usize {
        let mut link = lock(&self.link);
        let was_full = link.commands.len() >= self.send_queue;
        let mut n = 0;
        for slot in into.iter_mut() {
            let Some(c) = link.commands.pop_front() else { break };
            *slot = Some(c);
            n += 1;
        }
        drop(link);
        if was_full && n > 0 {
            self.room_or_end.notify_waiters();
        }
        n
    }

    /// The driver: gives back commands it took but cannot carry out yet, ahead of the queue
    /// (their order kept). The queue may then briefly hold up to a chunk more than
    /// `send_queue`; senders still wait while it is full.
    pub(crate) fn untake_commands(&self, back: &mut [Option<Command>]) {
        let mut link = lock(&self.link);
        for c in back.iter_mut().rev().filter_map(Option::take) {
            link.commands.push_front(c);
        }
    }

    /// The driver: refuse further commands (a forced close); waiting senders then wait for
    /// the outcome.
    pub(crate) fn refuse_commands(&self) {
        lock(&self.link).refusing = true;
        self.room_or_end.notify_waiters();
    }

    /// The driver has finished (`Some(outcome)`) or is gone without one (`None`): refuse
    /// commands, publish the outcome, and wake every handle. Messages already queued stay
    /// readable; `recv` returns the outcome after them. Only the first call counts.
    pub(crate) fn end(&self, outcome: Option<Error>) {
        let mut link = lock(&self.link);
        if !matches!(link.end, End::Running) {
            return;
        }
        link.refusing = true;
        link.end = match outcome {
            Some(e) => End::Over(e),
            None => End::Gone,
        };
        // Commands nobody will carry out.
        link.commands = VecDeque::new();
        drop(link);
        self.room_or_end.notify_waiters();
        self.arrived.notify_waiters();
    }

    /// The driver, on its timer: releases the storage of queues that are empty, so that a
    /// connection that has gone idle after a burst holds none (benches/RESULTS.md).
    pub(crate) fn trim(&self) {
        let mut link = lock(&self.link);
        if link.commands.is_empty() && link.commands.capacity() > 0 {
            link.commands = VecDeque::new();
        }
        if link.incoming.is_empty() && link.incoming.capacity() > 0 {
            link.incoming = VecDeque::new();
        }
    }
}

impl std::fmt::Debug for ConnShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The handshake hash stays out of logs.
        f.debug_struct("Connection")
            .field("id", &self.id)
            .field("transport", &self.transport)
            .field("role", &self.role)
            .field("remote_addr", &lock(&self.info).remote_addr)
            .field("remote_static", &self.remote_static)
            .finish_non_exhaustive()
    }
}

/// An authenticated, authorized Veil connection over TCP or UDP.
///
/// Cheap to clone; clones share the connection, so one task may `recv` while another
/// `send`s. The connection closes (`Close { Normal }`) when the last clone is dropped.
pub struct Connection {
    shared: Arc<ConnShared>,
}

impl Clone for Connection {
    fn clone(&self) -> Self {
        Self::new(Arc::clone(&self.shared))
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if self.shared.handles.fetch_sub(1, Ordering::AcqRel) == 1 {
            let mut link = lock(&self.shared.link);
            link.abandoned = true;
            link.wake_driver();
        }
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.shared.fmt(f)
    }
}

/// The command queue refused a command: the driver is closing or has ended.
struct Refused;

impl Connection {
    /// A handle on `shared`; the connection lives while at least one does.
    pub(crate) fn new(shared: Arc<ConnShared>) -> Self {
        shared.handles.fetch_add(1, Ordering::AcqRel);
        Self { shared }
    }

    /// Queues a command for the driver, waiting while the queue is full. Cancel-safe: the
    /// command is either queued or dropped with the future.
    async fn push_command(&self, cmd: Command) -> Result<(), Refused> {
        let s = &*self.shared;
        let mut cmd = match s.try_push(cmd) {
            Ok(()) => return Ok(()),
            Err(Some(c)) => c,
            Err(None) => return Err(Refused),
        };
        loop {
            // The queue is full: register for room, then look again, so that room made
            // in between is not missed.
            let room = s.room_or_end.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            cmd = match s.try_push(cmd) {
                Ok(()) => return Ok(()),
                Err(Some(c)) => c,
                Err(None) => return Err(Refused),
            };
            room.await;
        }
    }

    /// Sends `payload` on channel 0. See [`Connection::send_on`].
    ///
    /// # Errors
    /// As [`Connection::send_on`].
    pub async fn send(&self, payload: Bytes) -> Result<(), Error> {
        self.send_on(0, payload).await
    }

    /// Queues `payload` as one message on `channel`. Waits while the connection's queue
    /// is full, which it stays while the peer reads slower than we write: buffering is
    /// bounded end to end. Returns once the driver has the message, not once the peer has it.
    ///
    /// # Errors
    /// [`Error::MessageTooLarge`] if it cannot fit in one packet (for UDP: one datagram);
    /// the connection's outcome (for example [`Error::Closed`]) if it has ended.
    pub async fn send_on(&self, channel: u16, payload: Bytes) -> Result<(), Error> {
        let max = self.max_message_len();
        if payload.len() > max {
            return Err(Error::MessageTooLarge { len: payload.len(), max });
        }
        if self.push_command(Command::Send { channel, payload }).await.is_err() {
            return Err(self.outcome().await);
        }
        Ok(())
    }

    /// Queues a data message with the id the caller's delivery layer assigned (spec §17.2:
    /// ids belong to the sender's stream and repeat on retransmission). Waits like
    /// [`Connection::send_on`].
    ///
    /// # Errors
    /// As [`Connection::send_on`].
    pub async fn send_data(&self, channel: u16, id: u64, payload: Bytes) -> Result<(), Error> {
        let max = self.max_message_len();
        if payload.len() > max {
            return Err(Error::MessageTooLarge { len: payload.len(), max });
        }
        if self.push_command(Command::SendData { channel, id, payload }).await.is_err() {
            return Err(self.outcome().await);
        }
        Ok(())
    }

    /// Queues a delivery message (spec §17: `Stream`, `Skip`, `Ack`) for the peer. Waits
    /// while the connection's queue is full.
    ///
    /// # Errors
    /// The connection's outcome if it has ended.
    pub async fn send_delivery(&self, msg: DeliveryMessage) -> Result<(), Error> {
        if self.push_command(Command::Delivery(msg)).await.is_err() {
            return Err(self.outcome().await);
        }
        Ok(())
    }

    /// Pushes a revocation list to the peer (`RevocationPush`, spec §15.8), ahead of queued
    /// data: the cloud to its gateways, a gateway on to its devices. The peer verifies it
    /// itself; a list it cannot verify changes nothing there.
    ///
    /// # Errors
    /// [`Error::MessageTooLarge`] if the list is longer than `MAX_REVOCATION_LIST_LEN` or
    /// does not fit one packet to this peer (it must then get the list by other means); the
    /// connection's outcome if it has ended.
    pub async fn push_revocation_list(&self, list: Bytes) -> Result<(), Error> {
        let max = self.max_message_len().min(MAX_REVOCATION_LIST_LEN);
        if list.len() > max {
            return Err(Error::MessageTooLarge { len: list.len(), max });
        }
        if self.push_command(Command::PushRevocationList(list)).await.is_err() {
            return Err(self.outcome().await);
        }
        Ok(())
    }

    /// The next data message from the peer. On an endpoint that routes
    /// ([`crate::EndpointBuilder::routing`]) routing messages are skipped (and lost): read
    /// such a connection with [`Connection::recv_any`].
    ///
    /// # Errors
    /// Once the connection is over and every received message was read: why it ended
    /// ([`Error::Closed`] for an orderly close by either side).
    pub async fn recv(&self) -> Result<Message, Error> {
        loop {
            match self.recv_any().await? {
                Received::Message(m) => return Ok(m),
                Received::Routing(m) => {
                    tracing::debug!(route = m.route(), "routing message skipped by recv");
                }
                Received::Delivery(m) => tracing::debug!(?m, "delivery message skipped by recv"),
            }
        }
    }

    /// The next data or routing message from the peer, in the order they arrived.
    ///
    /// # Errors
    /// As [`Connection::recv`].
    pub async fn recv_any(&self) -> Result<Received, Error> {
        let s = &*self.shared;
        if let Some(r) = s.try_recv() {
            return r;
        }
        loop {
            // Nothing queued: register for the next message, then look again, so that one
            // queued in between is not missed.
            let arrived = s.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if let Some(r) = s.try_recv() {
                return r;
            }
            arrived.await;
        }
    }

    /// Queues a routing message (spec §16): `Route`, `Withdraw` and `Unreachable` from a
    /// relay, `Forward` from an endpoint, `Deliver` from a relay. Waits while the
    /// connection's queue is full. Announcements and notices leave ahead of queued data
    /// (spec §16.3).
    ///
    /// # Errors
    /// [`Error::MessageTooLarge`] if an envelope does not fit one packet to this peer; the
    /// connection's outcome if it has ended.
    pub async fn send_routing(&self, msg: RoutingMessage) -> Result<(), Error> {
        self.check_routing(&msg)?;
        if self.push_command(Command::Routing(msg)).await.is_err() {
            return Err(self.outcome().await);
        }
        Ok(())
    }

    /// Queues a routing message without waiting: a relay that finds the next link's queue
    /// full drops the envelope and answers `Unreachable { Congested }` (spec §16.4 step 5).
    ///
    /// # Errors
    /// [`TrySendError::Full`] with the message when the queue is full;
    /// [`TrySendError::Failed`] as [`Connection::send_routing`] otherwise.
    pub fn try_send_routing(&self, msg: RoutingMessage) -> Result<(), TrySendError> {
        self.check_routing(&msg).map_err(TrySendError::Failed)?;
        match self.shared.try_push(Command::Routing(msg)) {
            Ok(()) => Ok(()),
            Err(Some(Command::Routing(m))) => Err(TrySendError::Full(m)),
            Err(_) => {
                let outcome = lock(&self.shared.link).outcome();
                Err(TrySendError::Failed(outcome.unwrap_or(Error::EndpointClosed)))
            }
        }
    }

    /// The longest routing message (encoded, spec §9.2) one packet to this peer carries: a
    /// relay refuses a `Deliver` above it with `Unreachable { TooLarge }` (spec §16.4).
    #[must_use]
    pub fn max_envelope_len(&self) -> usize {
        self.max_message_len() + crate::driver::DATA_FRAMING_MAX
    }

    /// An envelope must fit one message to this peer (spec §16.2).
    fn check_routing(&self, msg: &RoutingMessage) -> Result<(), Error> {
        let len = msg.message().encoded_len();
        let max = self.max_envelope_len();
        if len > max {
            return Err(Error::MessageTooLarge { len, max });
        }
        Ok(())
    }

    /// Closes the connection (spec §7.6): messages already passed to `send` go first,
    /// then an authenticated `Close { reason }`; waits until the driver is done. If the
    /// peer does not read for the endpoint's `close_linger`, the connection is dropped
    /// without waiting for them.
    ///
    /// # Errors
    /// How the connection ended, if not by an orderly close of either side.
    pub async fn close(&self, reason: CloseReason) -> Result<(), Error> {
        let linger = self.shared.linger;
        if tokio::time::timeout(linger, self.push_command(Command::Close(reason))).await.is_err() {
            let mut link = lock(&self.shared.link);
            link.force_close = Some(reason);
            link.wake_driver();
        }
        match self.outcome().await {
            Error::Closed { .. } => Ok(()),
            e => Err(e),
        }
    }

    /// Waits until the connection is over and returns why (like `recv` without reading).
    pub async fn closed(&self) -> Error {
        self.outcome().await
    }

    /// Whether the connection is over (its driver has finished; `closed` would return at
    /// once).
    #[must_use]
    pub fn is_closed(&self) -> bool {
        !matches!(lock(&self.shared.link).end, End::Running)
    }

    async fn outcome(&self) -> Error {
        let s = &*self.shared;
        loop {
            let ended = s.room_or_end.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if let Some(e) = lock(&s.link).outcome() {
                return e;
            }
            ended.await;
        }
    }

    /// The peer's authenticated static key.
    #[must_use]
    pub fn remote_static(&self) -> PublicKey {
        self.shared.remote_static
    }

    /// The session's cipher suite (spec §4.3: the initiator's choice, fixed for the
    /// connection). `Some` for every connection that `accept` or `connect` hands out.
    #[must_use]
    pub fn suite(&self) -> Option<Suite> {
        self.shared.suite
    }

    /// Who the peer is, as the trust check found it (spec §15.6): its allowlist name, or its
    /// verified certificate (name, role, groups, serial, issuer, validity). `None` when no
    /// trust check ran (a callback [`Authorizer`](crate::Authorizer)).
    #[must_use]
    pub fn peer(&self) -> Option<&Authorized> {
        self.shared.peer.as_deref()
    }

    /// The handshake hash of the current session (spec §5.5), for channel binding.
    /// Changes after a re-handshake.
    #[must_use]
    pub fn handshake_hash(&self) -> [u8; HANDSHAKE_HASH_LEN] {
        lock(&self.shared.info).handshake_hash
    }

    /// Traffic counters: messages, bytes, packets, rekeys, re-handshakes.
    #[must_use]
    pub fn stats(&self) -> ConnectionStats {
        lock(&self.shared.info).stats
    }

    /// The peer's current address. Over UDP it follows the peer once a packet from a
    /// new address authenticates (roaming).
    #[must_use]
    pub fn remote_addr(&self) -> SocketAddr {
        lock(&self.shared.info).remote_addr
    }

    /// The carrier.
    #[must_use]
    pub fn transport(&self) -> Transport {
        self.shared.transport
    }

    /// This side's role in the (first) handshake.
    #[must_use]
    pub fn role(&self) -> Role {
        self.shared.role
    }

    /// The largest payload one `send` accepts.
    #[must_use]
    pub fn max_message_len(&self) -> usize {
        self.shared.max_payload.load(Ordering::Relaxed)
    }

    /// A number identifying the connection in this endpoint's logs.
    #[must_use]
    pub fn id(&self) -> u64 {
        self.shared.id
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    use veil_protocol::StaticKeypair;

    use super::*;

    /// Long enough for a spawned task to run on the test's runtime; a wait still pending after
    /// it is waiting for real.
    const SETTLE: Duration = Duration::from_millis(100);
    /// Bound on any wait that should end.
    const LIMIT: Duration = Duration::from_secs(10);

    fn shared(send_queue: usize, recv_queue: usize) -> Arc<ConnShared> {
        let published = Published {
            id: 7,
            transport: Transport::Tcp,
            role: Role::Responder,
            remote_static: *StaticKeypair::from_secret_bytes([3; 32]).public(),
            suite: Some(Suite::ChaChaPolyBlake2s),
            peer: None,
            info: Info {
                remote_addr: SocketAddr::from(([127, 0, 0, 1], 9)),
                handshake_hash: [0; HANDSHAKE_HASH_LEN],
                stats: ConnectionStats::default(),
            },
            max_payload: 1_000,
        };
        Arc::new(ConnShared::new(published, send_queue, recv_queue, Duration::from_secs(1)))
    }

    /// Counts the wakes of the "driver" task.
    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Registers a counting waker as the driver's, as `Driver::exchange` does.
    fn register_driver(s: &ConnShared) -> Arc<Wakes> {
        let wakes = Arc::new(Wakes::default());
        lock(&s.link).driver = Some(Waker::from(Arc::clone(&wakes)));
        wakes
    }

    fn take_all(s: &ConnShared) -> Vec<u16> {
        let mut chunk: [Option<Command>; 4] = [const { None }; 4];
        let mut channels = Vec::new();
        loop {
            let n = s.take_commands(&mut chunk);
            if n == 0 {
                return channels;
            }
            for c in chunk[..n].iter_mut().filter_map(Option::take) {
                match c {
                    Command::Send { channel, .. } => channels.push(channel),
                    other => panic!("unexpected command {other:?}"),
                }
            }
        }
    }

    #[tokio::test]
    async fn send_waits_for_room_and_commands_keep_their_order() {
        let s = shared(2, 4);
        let conn = Connection::new(Arc::clone(&s));
        let wakes = register_driver(&s);
        let sender = tokio::spawn({
            let conn = conn.clone();
            async move {
                for channel in 0..5u16 {
                    conn.send_on(channel, Bytes::from_static(b"x")).await.unwrap();
                }
            }
        });
        tokio::time::sleep(SETTLE).await;
        // Bounded: two queued, the sender waits for room.
        assert_eq!(lock(&s.link).commands.len(), 2);
        assert!(!sender.is_finished());
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1, "only the first command of a batch wakes the driver");
        let mut seen = take_all(&s);
        // Bounded wait for the sender to refill and finish.
        for _ in 0..100 {
            if sender.is_finished() && lock(&s.link).commands.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            seen.extend(take_all(&s));
        }
        assert_eq!(seen, vec![0, 1, 2, 3, 4]);
        tokio::time::timeout(LIMIT, sender).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn untaken_commands_go_back_ahead_of_the_queue() {
        let s = shared(4, 4);
        let conn = Connection::new(Arc::clone(&s));
        for channel in 0..3u16 {
            conn.send_on(channel, Bytes::new()).await.unwrap();
        }
        let mut chunk: [Option<Command>; 2] = [const { None }; 2];
        assert_eq!(s.take_commands(&mut chunk), 2);
        conn.send_on(3, Bytes::new()).await.unwrap();
        // The driver carried out none of the two: they go back first.
        s.untake_commands(&mut chunk);
        assert_eq!(take_all(&s), vec![0, 1, 2, 3]);
    }

    #[tokio::test]
    async fn a_full_queue_refuses_without_waiting_and_an_ended_one_refuses_with_the_outcome() {
        let s = shared(1, 1);
        let conn = Connection::new(Arc::clone(&s));
        conn.send(Bytes::new()).await.unwrap();
        assert!(matches!(s.try_push(Command::Close(CloseReason::Normal)), Err(Some(Command::Close(_)))));
        let closed = Error::Closed { reason: CloseReason::Normal, by_peer: true };
        s.end(Some(closed.clone()));
        assert!(matches!(s.try_push(Command::Close(CloseReason::Normal)), Err(None)));
        let e = tokio::time::timeout(LIMIT, conn.send(Bytes::new())).await.unwrap().unwrap_err();
        assert_eq!(e.to_string(), closed.to_string());
        assert!(conn.is_closed());
        // The queued command was dropped with the driver's end.
        assert!(lock(&s.link).commands.is_empty());
    }

    #[tokio::test]
    async fn recv_returns_every_queued_message_before_the_outcome() {
        let s = shared(4, 2);
        let conn = Connection::new(Arc::clone(&s));
        let wakes = register_driver(&s);
        let reader = tokio::spawn({
            let conn = conn.clone();
            async move {
                let mut got = Vec::new();
                loop {
                    match conn.recv().await {
                        Ok(m) => got.push(m.id),
                        Err(e) => return (got, e),
                    }
                }
            }
        });
        tokio::time::sleep(SETTLE).await;
        assert!(!reader.is_finished(), "nothing queued yet");
        for id in 0..2 {
            lock(&s.link).incoming.push_back(Received::Message(Message { channel: 0, id, payload: Bytes::new() }));
        }
        s.arrived.notify_waiters();
        s.end(Some(Error::Closed { reason: CloseReason::Normal, by_peer: false }));
        let (got, e) = tokio::time::timeout(LIMIT, reader).await.unwrap().unwrap();
        assert_eq!(got, vec![0, 1]);
        assert!(matches!(e, Error::Closed { by_peer: false, .. }));
        // Taking from a full queue woke the driver (it stops reading while the queue is full).
        assert!(wakes.0.load(Ordering::SeqCst) >= 1);
    }

    #[tokio::test]
    async fn the_last_handle_dropped_abandons_the_link_and_wakes_the_driver() {
        let s = shared(4, 4);
        let conn = Connection::new(Arc::clone(&s));
        let wakes = register_driver(&s);
        let other = conn.clone();
        drop(conn);
        assert!(!lock(&s.link).abandoned);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 0);
        drop(other);
        assert!(lock(&s.link).abandoned);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_driver_gone_without_an_outcome_reads_as_endpoint_closed() {
        let s = shared(4, 4);
        let conn = Connection::new(Arc::clone(&s));
        let waiting = tokio::spawn({
            let conn = conn.clone();
            async move { conn.closed().await }
        });
        tokio::time::sleep(SETTLE).await;
        assert!(!waiting.is_finished());
        s.end(None);
        let e = tokio::time::timeout(LIMIT, waiting).await.unwrap().unwrap();
        assert!(matches!(e, Error::EndpointClosed));
        // Only the first end counts.
        s.end(Some(Error::Closed { reason: CloseReason::Normal, by_peer: true }));
        assert!(matches!(conn.recv().await, Err(Error::EndpointClosed)));
    }

    #[tokio::test]
    async fn emptied_queues_give_their_storage_back_on_trim() {
        let s = shared(8, 8);
        let conn = Connection::new(Arc::clone(&s));
        conn.send(Bytes::new()).await.unwrap();
        lock(&s.link).incoming.push_back(Received::Message(Message { channel: 0, id: 0, payload: Bytes::new() }));
        conn.recv().await.unwrap();
        assert_eq!(take_all(&s), vec![0]);
        assert!(lock(&s.link).commands.capacity() > 0 && lock(&s.link).incoming.capacity() > 0);
        s.trim();
        assert_eq!(lock(&s.link).commands.capacity(), 0);
        assert_eq!(lock(&s.link).incoming.capacity(), 0);
    }
}
