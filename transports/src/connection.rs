//! The application's handle on one connection. The connection itself lives in a driver
//! task ([`crate::driver`]); the handle talks to it through bounded channels.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use veil_protocol::handshake::HANDSHAKE_HASH_LEN;
use veil_protocol::routing::RoutingMessage;
use veil_protocol::trust::{Authorized, MAX_REVOCATION_LIST_LEN};
use veil_protocol::{CloseReason, ConnectionStats, PublicKey, Role};

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

/// State the driver publishes for the handles, created once the session is established.
pub(crate) struct ConnShared {
    pub(crate) id: u64,
    pub(crate) transport: Transport,
    pub(crate) role: Role,
    pub(crate) remote_static: PublicKey,
    /// Who the trust check said the peer is (spec §15.6).
    pub(crate) peer: Option<Box<Authorized>>,
    pub(crate) remote_addr: Mutex<SocketAddr>,
    pub(crate) handshake_hash: Mutex<[u8; HANDSHAKE_HASH_LEN]>,
    pub(crate) max_payload: AtomicUsize,
    pub(crate) stats: Mutex<ConnectionStats>,
}

impl std::fmt::Debug for ConnShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The handshake hash stays out of logs.
        f.debug_struct("Connection")
            .field("id", &self.id)
            .field("transport", &self.transport)
            .field("role", &self.role)
            .field("remote_addr", &*lock(&self.remote_addr))
            .field("remote_static", &self.remote_static)
            .finish_non_exhaustive()
    }
}

struct Inner {
    shared: Arc<ConnShared>,
    cmd: mpsc::Sender<Command>,
    /// Set by `close` when the ordered `Close` command cannot get through in time.
    force_close: watch::Sender<Option<CloseReason>>,
    incoming: tokio::sync::Mutex<mpsc::Receiver<Received>>,
    outcome: watch::Receiver<Option<Error>>,
    linger: std::time::Duration,
}

/// An authenticated, authorized Veil connection over TCP or UDP.
///
/// Cheap to clone; clones share the connection, so one task may `recv` while another
/// `send`s. The connection closes (`Close { Normal }`) when the last clone is dropped.
#[derive(Clone)]
pub struct Connection {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.shared.fmt(f)
    }
}

/// The driver's ends of a connection's channels.
#[derive(Debug)]
pub(crate) struct DriverEnds {
    pub(crate) cmd: mpsc::Receiver<Command>,
    pub(crate) force_close: watch::Receiver<Option<CloseReason>>,
    pub(crate) incoming: mpsc::Sender<Received>,
    pub(crate) outcome: watch::Sender<Option<Error>>,
}

impl Connection {
    pub(crate) fn new(
        shared: Arc<ConnShared>,
        send_queue: usize,
        recv_queue: usize,
        linger: std::time::Duration,
    ) -> (Self, DriverEnds) {
        let (cmd_tx, cmd_rx) = mpsc::channel(send_queue.max(1));
        let (in_tx, in_rx) = mpsc::channel(recv_queue.max(1));
        let (force_tx, force_rx) = watch::channel(None);
        let (out_tx, out_rx) = watch::channel(None);
        let inner = Inner {
            shared,
            cmd: cmd_tx,
            force_close: force_tx,
            incoming: tokio::sync::Mutex::new(in_rx),
            outcome: out_rx,
            linger,
        };
        let ends = DriverEnds { cmd: cmd_rx, force_close: force_rx, incoming: in_tx, outcome: out_tx };
        (Self { inner: Arc::new(inner) }, ends)
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
        if self.inner.cmd.send(Command::Send { channel, payload }).await.is_err() {
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
        if self.inner.cmd.send(Command::PushRevocationList(list)).await.is_err() {
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
        let mut incoming = self.inner.incoming.lock().await;
        loop {
            match incoming.recv().await {
                Some(Received::Message(m)) => return Ok(m),
                Some(Received::Routing(m)) => {
                    tracing::debug!(route = m.route(), "routing message skipped by recv");
                }
                None => {
                    drop(incoming);
                    return Err(self.outcome().await);
                }
            }
        }
    }

    /// The next data or routing message from the peer, in the order they arrived.
    ///
    /// # Errors
    /// As [`Connection::recv`].
    pub async fn recv_any(&self) -> Result<Received, Error> {
        let next = self.inner.incoming.lock().await.recv().await;
        match next {
            Some(m) => Ok(m),
            None => Err(self.outcome().await),
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
        if self.inner.cmd.send(Command::Routing(msg)).await.is_err() {
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
        match self.inner.cmd.try_send(Command::Routing(msg)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(Command::Routing(m))) => Err(TrySendError::Full(m)),
            Err(_) => Err(TrySendError::Failed(self.inner.outcome.borrow().clone().unwrap_or(Error::EndpointClosed))),
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
        let linger = self.inner.linger;
        if tokio::time::timeout(linger, self.inner.cmd.send(Command::Close(reason))).await.is_err() {
            self.inner.force_close.send_replace(Some(reason));
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
        self.inner.outcome.borrow().is_some()
    }

    async fn outcome(&self) -> Error {
        let mut rx = self.inner.outcome.clone();
        let r = rx.wait_for(Option::is_some).await;
        match r {
            Ok(v) => v.clone().unwrap_or(Error::EndpointClosed),
            // The driver is gone without a word: only if its task was aborted.
            Err(_) => Error::EndpointClosed,
        }
    }

    /// The peer's authenticated static key.
    #[must_use]
    pub fn remote_static(&self) -> PublicKey {
        self.inner.shared.remote_static
    }

    /// Who the peer is, as the trust check found it (spec §15.6): its allowlist name, or its
    /// verified certificate (name, role, groups, serial, issuer, validity). `None` when no
    /// trust check ran (a callback [`Authorizer`](crate::Authorizer)).
    #[must_use]
    pub fn peer(&self) -> Option<&Authorized> {
        self.inner.shared.peer.as_deref()
    }

    /// The handshake hash of the current session (spec §5.5), for channel binding.
    /// Changes after a re-handshake.
    #[must_use]
    pub fn handshake_hash(&self) -> [u8; HANDSHAKE_HASH_LEN] {
        *lock(&self.inner.shared.handshake_hash)
    }

    /// Traffic counters: messages, bytes, packets, rekeys, re-handshakes.
    #[must_use]
    pub fn stats(&self) -> ConnectionStats {
        *lock(&self.inner.shared.stats)
    }

    /// The peer's current address. Over UDP it follows the peer once a packet from a
    /// new address authenticates (roaming).
    #[must_use]
    pub fn remote_addr(&self) -> SocketAddr {
        *lock(&self.inner.shared.remote_addr)
    }

    /// The carrier.
    #[must_use]
    pub fn transport(&self) -> Transport {
        self.inner.shared.transport
    }

    /// This side's role in the (first) handshake.
    #[must_use]
    pub fn role(&self) -> Role {
        self.inner.shared.role
    }

    /// The largest payload one `send` accepts.
    #[must_use]
    pub fn max_message_len(&self) -> usize {
        self.inner.shared.max_payload.load(Ordering::Relaxed)
    }

    /// A number identifying the connection in this endpoint's logs.
    #[must_use]
    pub fn id(&self) -> u64 {
        self.inner.shared.id
    }
}
