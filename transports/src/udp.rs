//! UDP: one socket per endpoint (datagram mode, spec §3.2). A socket task reads every
//! datagram and demultiplexes it by the receiver's session index (spec §4.2); each
//! connection's state lives in its own driver task, which sends through the shared socket.
//! `HANDSHAKE_INIT` carries no receiver index: a new one creates a responder connection
//! (after admission control), and a repeat (same source and initiator index) goes to the
//! connection it created, which answers it from its cache (spec §5.7).
//!
//! Under load the socket task answers a new INIT with a stateless cookie challenge instead
//! (spec §5.7.4, [`CookieChecker`]): until the initiator returns the cookie from the address
//! it claims, nothing is allocated for it and no Diffie-Hellman work is done.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::BytesMut;
use tokio::net::UdpSocket;
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use veil_protocol::cookie::{CookieChecker, CookieStatus, Verdict};
use veil_protocol::trust::RoleSet;
use veil_protocol::wire::{self, InitHeader, RejectReason};
use veil_protocol::{ConnectionError, Mode, PublicKey, Role};

use crate::config::Transport;
use crate::connection::{lock, Connection};
use crate::driver::{Carrier, Driver, Ready};
use crate::endpoint::EndpointShared;
use crate::error::Error;

/// Receive buffer: one byte more than the largest UDP payload, so that an oversized
/// datagram is seen as such rather than silently truncated.
const RECV_BUFFER: usize = 65_536;
/// Attempts at drawing a session index not already in use.
const INDEX_ATTEMPTS: usize = 8;
/// Room for the stateless answers of the socket task: a COOKIE_REPLY (21 B) or a REJECT (6 B).
const ANSWER_BUFFER: usize = 64;

/// One connection's datagrams from the socket task, with their source addresses: a queue
/// bounded by `datagram_queue`, whose storage is allocated when datagrams arrive and released
/// once the driver has drained it (and by the driver's timer, [`Datagrams::trim`]), so that an idle connection holds
/// none (a tokio `mpsc` channel would hold ≈ 2.5 KiB; benches/RESULTS.md, idle connections).
#[derive(Debug)]
pub(crate) struct Datagrams {
    capacity: usize,
    inner: Mutex<DatagramsInner>,
}

#[derive(Debug, Default)]
struct DatagramsInner {
    queue: VecDeque<(BytesMut, SocketAddr)>,
    /// The driver's task, waiting for a datagram.
    waker: Option<Waker>,
}

impl Datagrams {
    fn new(capacity: usize) -> Self {
        Self { capacity: capacity.max(1), inner: Mutex::default() }
    }

    /// The socket task: queues a copy of `data`, or gives up when the queue is full.
    fn push(&self, data: &[u8], from: SocketAddr) -> bool {
        let mut inner = lock(&self.inner);
        if inner.queue.len() >= self.capacity {
            return false;
        }
        inner.queue.push_back((BytesMut::from(data), from));
        let waker = inner.waker.take();
        drop(inner);
        if let Some(w) = waker {
            w.wake();
        }
        true
    }

    /// The driver: the next datagram, or `Pending` with the task's waker kept for `push`.
    pub(crate) fn poll_recv(&self, cx: &Context<'_>) -> Poll<(BytesMut, SocketAddr)> {
        let mut inner = lock(&self.inner);
        match inner.queue.pop_front() {
            Some(d) => Poll::Ready(d),
            None => {
                // Drained: the storage goes now, not at the driver's next timer, so that a
                // connection that goes quiet after a few datagrams holds none.
                if inner.queue.capacity() > 0 {
                    inner.queue = VecDeque::new();
                }
                if !inner.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    inner.waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }

    /// Releases the queue's storage if it is empty.
    pub(crate) fn trim(&self) {
        let mut inner = lock(&self.inner);
        if inner.queue.is_empty() && inner.queue.capacity() > 0 {
            inner.queue = VecDeque::new();
        }
    }
}

#[derive(Debug, Default)]
struct Table {
    /// Live connections by the index peers address them with.
    by_index: HashMap<u32, Arc<Datagrams>>,
    /// Responders by the INIT that created them: (source, initiator's index) → our index.
    by_init: HashMap<(SocketAddr, u32), u32>,
}

/// The endpoint's UDP socket and its demultiplexing table.
#[derive(Debug)]
pub(crate) struct UdpShared {
    pub(crate) socket: Arc<UdpSocket>,
    table: Mutex<Table>,
    /// Signalled when a connection leaves the table.
    left: Notify,
}

impl UdpShared {
    pub(crate) async fn bind(addr: SocketAddr) -> std::io::Result<Self> {
        Ok(Self { socket: Arc::new(UdpSocket::bind(addr).await?), table: Mutex::default(), left: Notify::new() })
    }

    /// Creates a core connection with `make` and enters it in the table under a fresh
    /// index (drawing again on the rare collision).
    fn register(
        self: &Arc<Self>,
        mut make: impl FnMut() -> Result<veil_protocol::Connection, Error>,
        init: Option<(SocketAddr, u32)>,
        queue: usize,
    ) -> Result<(veil_protocol::Connection, Registration, Arc<Datagrams>), Error> {
        for _ in 0..INDEX_ATTEMPTS {
            let core = make()?;
            let index = core.local_index();
            let mut t = lock(&self.table);
            if t.by_index.contains_key(&index) {
                continue;
            }
            let datagrams = Arc::new(Datagrams::new(queue));
            t.by_index.insert(index, Arc::clone(&datagrams));
            if let Some(key) = init {
                t.by_init.insert(key, index);
            }
            return Ok((core, Registration { udp: Arc::clone(self), index, init }, datagrams));
        }
        Err(Error::TooManyConnections)
    }
}

/// A connection's entry in the table; removed when the driver ends.
#[derive(Debug)]
pub(crate) struct Registration {
    udp: Arc<UdpShared>,
    index: u32,
    init: Option<(SocketAddr, u32)>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut t = lock(&self.udp.table);
        t.by_index.remove(&self.index);
        if let Some(key) = self.init {
            if t.by_init.get(&key) == Some(&self.index) {
                t.by_init.remove(&key);
            }
        }
        drop(t);
        self.udp.left.notify_one();
    }
}

/// spec §5.8: `REJECT(Busy)` in datagram form, addressed to the initiator's index.
fn reject_busy(initiator_index: [u8; 4]) -> [u8; 6] {
    let i = initiator_index;
    [wire::TYPE_HANDSHAKE_REJECT, i[0], i[1], i[2], i[3], RejectReason::Busy.code()]
}

pub(crate) async fn socket_loop(ep: Arc<EndpointShared>, udp: Arc<UdpShared>, listening: CancellationToken) {
    let mut buf = vec![0u8; RECV_BUFFER];
    // spec §5.7.4: the cookie secrets; only this task reads INITs, so it owns them.
    let mut cookies =
        CookieChecker::new(ep.clock.now(), ep.limits.cookie_secret_lifetime.into(), &mut rand::rngs::OsRng);
    let mut accepting = true;
    loop {
        let received = tokio::select! {
            () = ep.shutdown.cancelled() => break,
            () = listening.cancelled(), if accepting => {
                accepting = false;
                None
            }
            () = udp.left.notified(), if !accepting => None,
            r = udp.socket.recv_from(&mut buf) => Some(r),
        };
        match received {
            Some(Ok((n, from))) => dispatch(&ep, &udp, &mut cookies, &buf[..n], from, accepting),
            // Unconnected sockets report few errors (an ICMP error on some systems): go on.
            Some(Err(e)) => tracing::debug!(error = %e, "receive failed"),
            None => {}
        }
        if !accepting && lock(&udp.table).by_index.is_empty() {
            break;
        }
    }
    tracing::debug!("socket task stopped");
}

fn drop_datagram(ep: &EndpointShared, why: &'static str, from: SocketAddr) {
    ep.counters.datagrams_dropped.fetch_add(1, Ordering::Relaxed);
    tracing::trace!(%from, why, "datagram dropped");
}

fn forward(ep: &EndpointShared, to: &Datagrams, data: &[u8], from: SocketAddr) {
    if !to.push(data, from) {
        // The connection is not keeping up (or just ended): UDP semantics, drop.
        drop_datagram(ep, "connection queue full", from);
    }
}

/// Sends a stateless answer of the socket task (COOKIE_REPLY, REJECT). Never waits: a full
/// socket buffer loses it, as the network could.
fn answer(udp: &UdpShared, packet: &[u8], to: SocketAddr) {
    if let Err(e) = udp.socket.try_send_to(packet, to) {
        tracing::trace!(error = %e, "answer not sent");
    }
}

fn dispatch(
    ep: &Arc<EndpointShared>,
    udp: &Arc<UdpShared>,
    cookies: &mut CookieChecker,
    data: &[u8],
    from: SocketAddr,
    accepting: bool,
) {
    if data.len() > ep.datagram_config.limits.packet_len() {
        return drop_datagram(ep, "oversized", from);
    }
    // The INIT an INIT_COOKIE carries follows its 17-byte prefix (spec §4.2).
    let init_part = match data.first() {
        Some(&wire::TYPE_HANDSHAKE_INIT) => data,
        Some(&wire::TYPE_HANDSHAKE_INIT_COOKIE) => data.get(wire::INIT_COOKIE_PREFIX_LEN..).unwrap_or(&[]),
        _ => {
            let tx = wire::datagram_receiver_index(data).and_then(|i| lock(&udp.table).by_index.get(&i).cloned());
            return match tx {
                Some(tx) => forward(ep, &tx, data, from),
                None => drop_datagram(ep, "unknown index", from),
            };
        }
    };
    let Some(index_bytes) = init_part.get(3..InitHeader::len(Mode::Datagram)).and_then(|b| <[u8; 4]>::try_from(b).ok())
    else {
        return drop_datagram(ep, "short INIT", from);
    };
    let key = (from, u32::from_be_bytes(index_bytes));
    let existing = {
        let t = lock(&udp.table);
        t.by_init.get(&key).and_then(|i| t.by_index.get(i)).cloned()
    };
    if let Some(tx) = existing {
        return forward(ep, &tx, data, from);
    }
    if !accepting {
        return drop_datagram(ep, "not accepting", from);
    }
    let now = ep.clock.now();
    let config = &ep.datagram_config;
    let mut out = [0u8; ANSWER_BUFFER];
    // spec §5.7.4: stateless until the source has proven its address (or we are not loaded).
    let (init, proven) = match cookies.verdict(now, &from, data, ep.demands_cookies(), config, &mut out) {
        Verdict::Proceed { init, cookie } => {
            if cookie == CookieStatus::Valid {
                ep.counters.cookies_accepted.fetch_add(1, Ordering::Relaxed);
            }
            (init, cookie == CookieStatus::Valid)
        }
        Verdict::CookieReply { len, cookie } => return challenged(ep, udp, &out[..len], cookie, from),
        Verdict::Reject { len, error } => {
            answer(udp, &out[..len], from);
            ep.report_failure(from, Transport::Udp, Error::Protocol(ConnectionError::Handshake(error)));
            return;
        }
        Verdict::Drop(e) => {
            tracing::trace!(%from, error = %e, "INIT dropped");
            return drop_datagram(ep, "INIT outside the handshake bounds", from);
        }
    };
    let admitted = if proven { ep.admit(from.ip(), now) } else { ep.admit_unproven(from.ip(), now) };
    let admission = match admitted {
        Ok(a) => a,
        // spec §5.7.4: an unproven source below half its bucket must prove its address first.
        Err(Error::RateLimited) if !proven => {
            return match cookies.verdict(now, &from, data, true, config, &mut out) {
                Verdict::CookieReply { len, cookie } => challenged(ep, udp, &out[..len], cookie, from),
                Verdict::Reject { len, .. } => answer(udp, &out[..len], from),
                _ => drop_datagram(ep, "INIT outside the handshake bounds", from),
            };
        }
        Err(e) => {
            tracing::debug!(peer = %from, error = %e, "peer refused");
            // A rate-limited source gets silence: answering would make us a reflector.
            if !matches!(e, Error::RateLimited) {
                answer(udp, &reject_busy(index_bytes), from);
            }
            ep.report_failure(from, Transport::Udp, e);
            return;
        }
    };
    let make = || {
        veil_protocol::Connection::new(
            Arc::clone(&ep.datagram_config),
            Role::Responder,
            ep.kk_initiator,
            now,
            &mut rand::rngs::OsRng,
        )
        .map_err(Error::from)
    };
    let (core, registration, datagrams) = match udp.register(make, Some(key), ep.limits.datagram_queue) {
        Ok(x) => x,
        Err(e) => {
            ep.report_failure(from, Transport::Udp, e);
            return;
        }
    };
    // The INIT alone: the cookie has done its work (spec §5.7.4).
    forward(ep, &datagrams, init, from);
    let ready = Ready::Responder;
    spawn(ep, udp, core, from, datagrams, ready, admission.connection, Some(admission.handshake), registration, None);
}

/// Sends a COOKIE_REPLY and counts it (spec §5.7.4).
fn challenged(ep: &EndpointShared, udp: &UdpShared, reply: &[u8], cookie: CookieStatus, from: SocketAddr) {
    answer(udp, reply, from);
    ep.counters.cookies_sent.fetch_add(1, Ordering::Relaxed);
    if cookie == CookieStatus::Invalid {
        ep.counters.cookies_refused.fetch_add(1, Ordering::Relaxed);
    }
    tracing::trace!(%from, "cookie demanded");
}

#[allow(clippy::too_many_arguments)]
fn spawn(
    ep: &Arc<EndpointShared>,
    udp: &Arc<UdpShared>,
    core: veil_protocol::Connection,
    peer: SocketAddr,
    datagrams: Arc<Datagrams>,
    ready: Ready,
    connection_slot: crate::endpoint::Slot,
    handshake_slot: Option<crate::endpoint::Slot>,
    registration: Registration,
    expected: Option<RoleSet>,
) {
    let driver = Driver::new(
        Arc::clone(ep),
        core,
        Transport::Udp,
        peer,
        Carrier::udp(registration, datagrams, Arc::clone(&udp.socket), peer),
        ready,
        connection_slot,
        handshake_slot,
    )
    .expecting(expected);
    let span = driver.span();
    tokio::spawn(driver.run().instrument(span));
}

pub(crate) async fn connect(
    ep: &Arc<EndpointShared>,
    addr: SocketAddr,
    remote_static: Option<PublicKey>,
    expected: Option<RoleSet>,
) -> Result<Connection, Error> {
    let udp = ep.udp.as_ref().ok_or(Error::NotBound(Transport::Udp))?;
    if ep.shutdown.is_cancelled() {
        return Err(Error::EndpointClosed);
    }
    let slot = ep.connection_slot()?;
    let make = || {
        veil_protocol::Connection::new(
            Arc::clone(&ep.datagram_config),
            Role::Initiator,
            remote_static,
            ep.clock.now(),
            &mut rand::rngs::OsRng,
        )
        .map_err(Error::from)
    };
    let (core, registration, datagrams) = udp.register(make, None, ep.limits.datagram_queue)?;
    let (tx, ready) = oneshot::channel();
    spawn(ep, udp, core, addr, datagrams, Ready::Initiator(Some(tx)), slot, None, registration, expected);
    ready.await.unwrap_or(Err(Error::EndpointClosed))
}
