//! Routing (spec §16): route handles, their announcement, envelopes and unreachable notices,
//! and the bounded per-link tables a relay and an endpoint keep. Sans IO, like the rest of
//! the crate: the tables take the time as an argument and say what to send; the caller sends
//! it through [`Connection::send_routing`].
//!
//! A relay keeps, per link, one [`RouteTable`] of the handles it announced to that peer
//! (`Route` messages; `Forward` names them) and one [`PeerRoutes`] of the handles the peer
//! announced, if the peer is a relay too. An endpoint keeps one [`PeerRoutes`] per relay link
//! (`Deliver` names those handles) and sorts the routed packets they carry to its end-to-end
//! connections with one [`E2eDemux`] (spec §16.6), which checks every end-to-end peer with
//! [`check_route_peer`].

use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use core::fmt;

use blake2::{Blake2s256, Digest};
use bytes::{Bytes, BytesMut};
use subtle::ConstantTimeEq;

use crate::config::{HANDSHAKE_RTO, HANDSHAKE_RTO_MAX};
use crate::connection::{Connection, Decision, Event};
use crate::crypto::PublicKey;
use crate::error::{ConnectionError, DecodeError};
use crate::message::Message;
use crate::time::{Duration, Timestamp};
use crate::trust::NodeId;
use crate::wire;

/// spec §16.3: default bound on the bindings one side of a link holds.
pub const MAX_ROUTES: usize = 65_536;
/// spec §16.3: a withdrawn handle is not bound to another node on the same link before this.
pub const ROUTE_REUSE_DELAY: Duration = Duration::from_secs(30);
/// spec §16.3: on a datagram link, an unused announcement is sent again at most this often.
pub const ROUTE_ANNOUNCE_REPEATS: u8 = 4;
/// spec §16.5: at most one `Unreachable` per link and handle in this interval.
pub const UNREACHABLE_INTERVAL: Duration = Duration::from_secs(1);
/// spec §16.2, §16.4: the most an envelope adds around a routed packet (kind, a 5-byte handle,
/// a 3-byte length).
pub const MAX_ENVELOPE_OVERHEAD: usize = 1 + 5 + 3;

/// Why a route cannot be used (spec §16.5): the reason of `Unreachable` and `Withdraw`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RouteReason {
    /// The handle is bound to nothing on this link.
    UnknownRoute,
    /// The destination is not attached to the relay.
    Detached,
    /// The relay's link toward the destination is down; it is reconnecting.
    UplinkDown,
    /// The relay's policy forbids this sender to reach this destination, or to forward at all.
    NotAllowed,
    /// The relay's queue or route table toward the destination is full.
    Congested,
    /// The envelope does not fit one transport packet toward the destination.
    TooLarge,
    /// The destination's (for `Withdraw`: the node's) credentials were revoked.
    Revoked,
    /// The relay is going away.
    ShuttingDown,
    /// The relay's spool (spec §17.9) has no room for the packet; transient.
    SpoolFull,
    /// A code this version does not define.
    Unknown(u8),
}

impl RouteReason {
    /// The wire code.
    #[must_use]
    pub const fn code(self) -> u8 {
        match self {
            Self::UnknownRoute => 1,
            Self::Detached => 2,
            Self::UplinkDown => 3,
            Self::NotAllowed => 4,
            Self::Congested => 5,
            Self::TooLarge => 6,
            Self::Revoked => 7,
            Self::ShuttingDown => 8,
            Self::SpoolFull => 9,
            Self::Unknown(c) => c,
        }
    }

    /// Parses a wire code; unknown codes are kept, never guessed.
    #[must_use]
    pub const fn from_code(code: u8) -> Self {
        match code {
            1 => Self::UnknownRoute,
            2 => Self::Detached,
            3 => Self::UplinkDown,
            4 => Self::NotAllowed,
            5 => Self::Congested,
            6 => Self::TooLarge,
            7 => Self::Revoked,
            8 => Self::ShuttingDown,
            9 => Self::SpoolFull,
            c => Self::Unknown(c),
        }
    }
}

impl fmt::Display for RouteReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownRoute => f.write_str("unknown route"),
            Self::Detached => f.write_str("destination not attached"),
            Self::UplinkDown => f.write_str("uplink down"),
            Self::NotAllowed => f.write_str("not allowed"),
            Self::Congested => f.write_str("congested"),
            Self::TooLarge => f.write_str("too large"),
            Self::Revoked => f.write_str("revoked"),
            Self::ShuttingDown => f.write_str("shutting down"),
            Self::SpoolFull => f.write_str("spool full"),
            Self::Unknown(c) => write!(f, "unknown reason {c}"),
        }
    }
}

/// A routing failure (spec §16.8). Local, for logs and metrics: on the wire a peer learns at
/// most a [`RouteReason`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RoutingError {
    /// An envelope names a handle with no binding in the namespace it refers to.
    UnknownRoute(u32),
    /// `Route`, `Withdraw`, `Deliver` or `Unreachable` from a peer not accepted as a relay.
    NotARelay,
    /// A binding beyond the per-link bound (spec §16.3).
    TableFull,
    /// An end-to-end peer's static key does not hash to its route's node id (spec §16.6).
    NodeMismatch,
    /// A relay could not pass an envelope on.
    Unreachable(RouteReason),
}

impl fmt::Display for RoutingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownRoute(h) => write!(f, "unknown route handle {h}"),
            Self::NotARelay => f.write_str("routing message from a peer that is not a relay"),
            Self::TableFull => f.write_str("route table full"),
            Self::NodeMismatch => f.write_str("end-to-end peer key does not match its route's node id"),
            Self::Unreachable(r) => write!(f, "destination unreachable: {r}"),
        }
    }
}

impl core::error::Error for RoutingError {}

/// A routing message (spec §9.2, §16), owning its packet: what a link connection reports
/// ([`Event::Routing`]) and takes ([`Connection::send_routing`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RoutingMessage {
    /// A routed packet for the node the receiver announced as `route` (spec §16.4).
    Forward {
        /// A handle the receiver announced.
        route: u32,
        /// One routed-mode packet, at least 1 byte; never altered by a relay.
        packet: Bytes,
    },
    /// A routed packet from the node the sender announced as `route` (spec §16.4).
    Deliver {
        /// A handle the sender announced.
        route: u32,
        /// One routed-mode packet, at least 1 byte.
        packet: Bytes,
    },
    /// The sender binds `route` to `node` (spec §16.3).
    Route {
        /// The handle.
        route: u32,
        /// The node reachable through the sender.
        node: NodeId,
    },
    /// The sender's `route` is gone (spec §16.3).
    Withdraw {
        /// The handle.
        route: u32,
        /// Why.
        reason: RouteReason,
    },
    /// A `Forward` naming the sender's `route` was dropped, or will be (spec §16.5).
    Unreachable {
        /// The handle, as in the `Forward`.
        route: u32,
        /// Why.
        reason: RouteReason,
    },
    /// The sender (a relay) holds in its spool the routed packets sent to it in `Forward`s
    /// naming `route` with generation `generation` and `counter_lo` `first .. first + count`
    /// modulo 2^24 (spec §17.9).
    Stored {
        /// The handle, as in the `Forward`s.
        route: u32,
        /// The packets' G bit: 0 or 1.
        generation: u8,
        /// The first packet's `counter_lo`, below 2^24.
        first: u32,
        /// How many consecutive packets: 1 ..= 2^24.
        count: u32,
    },
}

impl RoutingMessage {
    /// The wire message.
    #[must_use]
    pub fn message(&self) -> Message<'_> {
        match self {
            Self::Forward { route, packet } => Message::Forward { route: *route, packet },
            Self::Deliver { route, packet } => Message::Deliver { route: *route, packet },
            Self::Route { route, node } => Message::Route { route: *route, node: *node },
            Self::Withdraw { route, reason } => Message::Withdraw { route: *route, reason: *reason },
            Self::Unreachable { route, reason } => Message::Unreachable { route: *route, reason: *reason },
            Self::Stored { route, generation, first, count } => {
                Message::Stored { route: *route, generation: *generation, first: *first, count: *count }
            }
        }
    }

    /// The routing message `m`, its packet shared with `buf` (the decrypted plaintext `m` was
    /// decoded from) or, if `m` was decoded from another buffer, copied; `None` for messages
    /// of other kinds.
    #[must_use]
    pub fn from_message(m: &Message<'_>, buf: &Bytes) -> Option<Self> {
        Some(match *m {
            Message::Forward { route, packet } => Self::Forward { route, packet: share(buf, packet) },
            Message::Deliver { route, packet } => Self::Deliver { route, packet: share(buf, packet) },
            Message::Route { route, node } => Self::Route { route, node },
            Message::Withdraw { route, reason } => Self::Withdraw { route, reason },
            Message::Unreachable { route, reason } => Self::Unreachable { route, reason },
            Message::Stored { route, generation, first, count } => Self::Stored { route, generation, first, count },
            _ => return None,
        })
    }

    /// The handle the message names.
    #[must_use]
    pub const fn route(&self) -> u32 {
        match self {
            Self::Forward { route, .. }
            | Self::Deliver { route, .. }
            | Self::Route { route, .. }
            | Self::Withdraw { route, .. }
            | Self::Unreachable { route, .. }
            | Self::Stored { route, .. } => *route,
        }
    }
}

/// spec §16.6: an end-to-end peer must be the node its route names. Compares
/// `node_id(remote_static)` with `node` in constant time.
///
/// # Errors
/// [`RoutingError::NodeMismatch`]: deny the handshake.
pub fn check_route_peer(remote_static: &PublicKey, node: &NodeId) -> Result<(), RoutingError> {
    let id = NodeId::from_public_key(remote_static);
    if bool::from(id.0.ct_eq(&node.0)) {
        Ok(())
    } else {
        Err(RoutingError::NodeMismatch)
    }
}

/// What [`RouteTable::announce`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub struct Announcement {
    /// The node's handle on this link.
    pub route: u32,
    /// Whether the handle is new: send `Route { route, node }` to the peer now.
    pub new: bool,
}

#[derive(Debug, Clone)]
struct Announced {
    node: NodeId,
    /// The peer has named this handle in a `Forward`: it knows the binding (spec §16.3).
    used: bool,
    /// Datagram links: repeats still to send, and when the next one is due.
    repeats_left: u8,
    next_repeat: Option<Timestamp>,
    interval: Duration,
    /// spec §16.5: when the last `Unreachable` for this handle went out.
    last_notice: Option<Timestamp>,
}

/// The handles one side announced on one link (spec §16.3): a relay's per-link table.
///
/// Bounded: at most `max_routes` bindings, and at most as many withdrawn handles waiting out
/// [`ROUTE_REUSE_DELAY`] (beyond that the oldest is released early). Handles are the lowest
/// free ones, so they stay one byte long while fewer than 128 nodes are announced.
#[derive(Debug, Clone)]
pub struct RouteTable {
    max_routes: usize,
    lossy: bool,
    by_route: BTreeMap<u32, Announced>,
    by_node: BTreeMap<NodeId, u32>,
    /// Withdrawn handles and when they may be reused, oldest first.
    quarantine: VecDeque<(u32, Timestamp)>,
    /// Handles free for reuse, below `next_fresh`.
    free: BTreeSet<u32>,
    next_fresh: u32,
    /// spec §16.5: the notice slot shared by handles that name nothing.
    unknown_notice: Option<Timestamp>,
}

impl RouteTable {
    /// An empty table for a link in stream mode (`lossy = false`) or datagram mode
    /// (`lossy = true`: unused announcements are repeated, spec §16.3).
    #[must_use]
    pub const fn new(max_routes: usize, lossy: bool) -> Self {
        Self {
            max_routes,
            lossy,
            by_route: BTreeMap::new(),
            by_node: BTreeMap::new(),
            quarantine: VecDeque::new(),
            free: BTreeSet::new(),
            next_fresh: 0,
            unknown_notice: None,
        }
    }

    /// Number of bindings.
    #[must_use]
    pub fn len(&self) -> usize {
        self.by_route.len()
    }

    /// Whether there are no bindings.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.by_route.is_empty()
    }

    /// The bindings, by handle.
    pub fn iter(&self) -> impl Iterator<Item = (u32, NodeId)> + '_ {
        self.by_route.iter().map(|(r, a)| (*r, a.node))
    }

    /// The node bound to `route`.
    #[must_use]
    pub fn resolve(&self, route: u32) -> Option<NodeId> {
        self.by_route.get(&route).map(|a| a.node)
    }

    /// The handle of `node`.
    #[must_use]
    pub fn route_of(&self, node: &NodeId) -> Option<u32> {
        self.by_node.get(node).copied()
    }

    fn release_quarantine(&mut self, now: Timestamp) {
        while let Some(&(route, until)) = self.quarantine.front() {
            if until > now && self.quarantine.len() <= self.max_routes {
                break;
            }
            self.quarantine.pop_front();
            self.free.insert(route);
        }
    }

    fn allocate(&mut self, now: Timestamp) -> Result<u32, RoutingError> {
        self.release_quarantine(now);
        if let Some(route) = self.free.pop_first() {
            return Ok(route);
        }
        let route = self.next_fresh;
        self.next_fresh = self.next_fresh.checked_add(1).ok_or(RoutingError::TableFull)?;
        Ok(route)
    }

    /// Gives `node` a handle on this link, or returns the one it has (spec §16.3). When the
    /// handle is new, send `Route { route, node }` to the peer.
    ///
    /// # Errors
    /// [`RoutingError::TableFull`] when `max_routes` nodes are announced already.
    pub fn announce(&mut self, node: NodeId, now: Timestamp) -> Result<Announcement, RoutingError> {
        if let Some(route) = self.route_of(&node) {
            return Ok(Announcement { route, new: false });
        }
        if self.by_route.len() >= self.max_routes {
            return Err(RoutingError::TableFull);
        }
        let route = self.allocate(now)?;
        let repeats_left = if self.lossy { ROUTE_ANNOUNCE_REPEATS } else { 0 };
        self.by_route.insert(
            route,
            Announced {
                node,
                used: false,
                repeats_left,
                next_repeat: self.lossy.then(|| now + HANDSHAKE_RTO),
                interval: HANDSHAKE_RTO,
                last_notice: None,
            },
        );
        self.by_node.insert(node, route);
        Ok(Announcement { route, new: true })
    }

    /// Removes `node`'s handle and returns it: send `Withdraw { route, reason }`. The handle is
    /// not given to another node before [`ROUTE_REUSE_DELAY`] has passed.
    pub fn withdraw(&mut self, node: &NodeId, now: Timestamp) -> Option<u32> {
        let route = self.by_node.remove(node)?;
        self.by_route.remove(&route);
        self.quarantine.push_back((route, now + ROUTE_REUSE_DELAY));
        self.release_quarantine(now);
        Some(route)
    }

    /// A `Forward` named `route` (spec §16.4 step 1): the node it goes to. The peer has proven
    /// it knows the binding, so it is no longer repeated.
    ///
    /// # Errors
    /// [`RoutingError::UnknownRoute`]: answer `Unreachable { route, UnknownRoute }`.
    pub fn on_forward(&mut self, route: u32) -> Result<NodeId, RoutingError> {
        let a = self.by_route.get_mut(&route).ok_or(RoutingError::UnknownRoute(route))?;
        a.used = true;
        a.next_repeat = None;
        Ok(a.node)
    }

    /// Whether a `Deliver` naming `route` should carry `Route { route, node }` in front of it:
    /// a datagram link whose peer has not yet used the handle (spec §16.3).
    #[must_use]
    pub fn needs_announcement(&self, route: u32) -> bool {
        self.lossy && self.by_route.get(&route).is_some_and(|a| !a.used)
    }

    /// The next announcement due for repetition at `now` (datagram links, spec §16.3), if any:
    /// send `Route { route, node }` again. Call until `None` when
    /// [`next_timeout`](Self::next_timeout) has come. Scans the table (O(n)).
    pub fn poll_repeat(&mut self, now: Timestamp) -> Option<(u32, NodeId)> {
        let (route, a) = self.by_route.iter_mut().find(|(_, a)| a.next_repeat.is_some_and(|t| t <= now))?;
        a.repeats_left = a.repeats_left.saturating_sub(1);
        a.interval = a.interval.doubled().min(HANDSHAKE_RTO_MAX);
        a.next_repeat = (a.repeats_left > 0).then(|| now + a.interval);
        Some((*route, a.node))
    }

    /// When [`poll_repeat`](Self::poll_repeat) has work next.
    #[must_use]
    pub fn next_timeout(&self) -> Option<Timestamp> {
        self.by_route.values().filter_map(|a| a.next_repeat).min()
    }

    /// spec §16.5: whether an `Unreachable` for `route` may be sent at `now` (at most one per
    /// handle each [`UNREACHABLE_INTERVAL`]; handles bound to nothing share one slot). Records
    /// the notice when it returns `true`.
    pub fn allow_notice(&mut self, route: u32, now: Timestamp) -> bool {
        let slot = match self.by_route.get_mut(&route) {
            Some(a) => &mut a.last_notice,
            None => &mut self.unknown_notice,
        };
        let ok = slot.is_none_or(|t| now.saturating_since(t) >= UNREACHABLE_INTERVAL);
        if ok {
            *slot = Some(now);
        }
        ok
    }
}

/// The handles a peer announced on one link (spec §16.3), as the receiver of its `Route` and
/// `Withdraw` messages keeps them. Bounded by `max_routes`.
#[derive(Debug, Clone)]
pub struct PeerRoutes {
    max_routes: usize,
    by_route: BTreeMap<u32, NodeId>,
    by_node: BTreeMap<NodeId, u32>,
}

impl PeerRoutes {
    /// An empty table holding at most `max_routes` bindings.
    #[must_use]
    pub const fn new(max_routes: usize) -> Self {
        Self { max_routes, by_route: BTreeMap::new(), by_node: BTreeMap::new() }
    }

    /// Number of bindings.
    #[must_use]
    pub fn len(&self) -> usize {
        self.by_route.len()
    }

    /// Whether there are no bindings.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.by_route.is_empty()
    }

    /// The bindings, by handle.
    pub fn iter(&self) -> impl Iterator<Item = (u32, NodeId)> + '_ {
        self.by_route.iter().map(|(r, n)| (*r, *n))
    }

    /// A `Route { route, node }` from the peer: binds `route` to `node`, replacing the
    /// handle's earlier node and the node's earlier handle (spec §16.3).
    ///
    /// # Errors
    /// [`RoutingError::TableFull`]: the binding would exceed the bound; nothing changed.
    pub fn learn(&mut self, route: u32, node: NodeId) -> Result<(), RoutingError> {
        if self.by_route.get(&route) == Some(&node) {
            return Ok(());
        }
        let grows = !self.by_route.contains_key(&route) && !self.by_node.contains_key(&node);
        if grows && self.by_route.len() >= self.max_routes {
            return Err(RoutingError::TableFull);
        }
        if let Some(old_node) = self.by_route.remove(&route) {
            self.by_node.remove(&old_node);
        }
        if let Some(old_route) = self.by_node.remove(&node) {
            self.by_route.remove(&old_route);
        }
        self.by_route.insert(route, node);
        self.by_node.insert(node, route);
        Ok(())
    }

    /// A `Withdraw { route, .. }` from the peer: forgets the binding, returning its node.
    pub fn forget(&mut self, route: u32) -> Option<NodeId> {
        let node = self.by_route.remove(&route)?;
        self.by_node.remove(&node);
        Some(node)
    }

    /// The node the peer announced as `route` (a `Deliver`'s source, spec §16.4).
    ///
    /// # Errors
    /// [`RoutingError::UnknownRoute`]: drop the envelope.
    pub fn resolve(&self, route: u32) -> Result<NodeId, RoutingError> {
        self.by_route.get(&route).copied().ok_or(RoutingError::UnknownRoute(route))
    }

    /// The handle under which the peer announced `node` (for a `Forward` to it).
    #[must_use]
    pub fn route_of(&self, node: &NodeId) -> Option<u32> {
        self.by_node.get(node).copied()
    }

    /// Forgets everything (the link closed).
    pub fn clear(&mut self) {
        self.by_route.clear();
        self.by_node.clear();
    }
}

/// spec §16.6: default bound on the peer node ids an [`E2eDemux`] holds connections for.
pub const MAX_E2E_PEERS: usize = 65_536;
/// spec §16.6 (the SHOULD on INITs per source node): default burst of new end-to-end
/// handshakes one node may start at once. A repeated INIT (answered from a connection's cache)
/// costs nothing.
pub const E2E_INIT_BURST: u32 = 4;
/// spec §16.6: default pace at which a node's allowance of new handshakes refills, one per
/// interval, up to [`E2E_INIT_BURST`].
pub const E2E_INIT_INTERVAL: Duration = Duration::from_secs(1);

/// Which of a peer node's two end-to-end connections (spec §16.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Slot {
    /// The established (or only) connection.
    Current,
    /// A connection started by a newer INIT, not yet Connected.
    Candidate,
}

/// Why an [`E2eDemux`] did not hand a routed packet to a connection, or a connection refused it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DemuxError {
    /// An INIT from a node not held yet, while the demultiplexer holds its bound of nodes.
    TooManyPeers,
    /// An INIT beyond the node's allowance of new handshakes (spec §16.6): dropped, no
    /// handshake work done.
    InitLimited,
    /// No connection of the node can take the packet (no connection at all, or a RESP, FINAL
    /// or REJECT whose index names none of them): dropped.
    NoConnection,
    /// The connection the packet went to refused it (or the new candidate could not be made).
    Connection(ConnectionError),
}

impl fmt::Display for DemuxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooManyPeers => f.write_str("end-to-end peer table full"),
            Self::InitLimited => f.write_str("too many end-to-end handshakes from this node"),
            Self::NoConnection => f.write_str("no end-to-end connection for this packet"),
            Self::Connection(e) => write!(f, "end-to-end connection refused the packet: {e}"),
        }
    }
}

impl core::error::Error for DemuxError {}

impl From<ConnectionError> for DemuxError {
    fn from(e: ConnectionError) -> Self {
        Self::Connection(e)
    }
}

/// Bounds of an [`E2eDemux`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DemuxLimits {
    /// At most this many peer node ids (each with at most two connections).
    pub max_peers: usize,
    /// New handshakes a node may start at once.
    pub init_burst: u32,
    /// One more new handshake allowed per this interval, up to `init_burst`.
    pub init_interval: Duration,
}

impl Default for DemuxLimits {
    fn default() -> Self {
        Self { max_peers: MAX_E2E_PEERS, init_burst: E2E_INIT_BURST, init_interval: E2E_INIT_INTERVAL }
    }
}

/// What an [`E2eDemux`] reports for one peer node ([`E2eDemux::poll_event`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RoutedEvent {
    /// An event of the node's connection in `slot`. `AuthorizationRequired` comes only for a
    /// key whose node id is the node's (the check of spec §16.6 passed); answer it with
    /// [`E2eDemux::authorize`]. A `Connected` from the candidate means it has just replaced the
    /// current connection (spec §16.6): it is [`Slot::Current`] from now on.
    Event {
        /// The connection the event came from.
        slot: Slot,
        /// The event.
        event: Event,
    },
    /// spec §16.6: a handshake revealed a static key whose node id is not the node's; the
    /// demultiplexer denied it (`RoutingError::NodeMismatch`). The connection's `Closed`
    /// event follows; a connection whose request was answered anyway, through
    /// [`E2eDemux::connection_mut`], is dropped at once instead.
    NodeMismatch {
        /// The denied connection.
        slot: Slot,
    },
}

/// A digest of the INIT a responder connection read (spec §16.6: repeats go to it).
type InitDigest = [u8; 32];

fn init_digest(packet: &[u8]) -> InitDigest {
    Blake2s256::digest(packet).into()
}

const fn slot_index(slot: Slot) -> usize {
    match slot {
        Slot::Current => 0,
        Slot::Candidate => 1,
    }
}

#[derive(Debug)]
struct E2ePeer {
    current: Option<Connection>,
    candidate: Option<Connection>,
    /// The INIT each responder connection read, if it is one.
    current_init: Option<InitDigest>,
    candidate_init: Option<InitDigest>,
    /// Per slot ([`slot_index`]): the connection's authorization request passed the check of
    /// spec §16.6 in [`E2eDemux::poll_event`], so the application may answer it. A request
    /// answered before that could be another connection's (a newer INIT replaced the
    /// candidate meanwhile) or a key of another node.
    checked: [bool; 2],
    /// spec §16.6: the node's allowance of new handshakes, and when it was last refilled.
    init_tokens: u32,
    refilled: Timestamp,
}

impl E2ePeer {
    const fn new(init_burst: u32, now: Timestamp) -> Self {
        Self {
            current: None,
            candidate: None,
            current_init: None,
            candidate_init: None,
            checked: [false; 2],
            init_tokens: init_burst,
            refilled: now,
        }
    }

    fn set(&mut self, slot: Slot, connection: Option<Connection>, init: Option<InitDigest>) {
        self.checked[slot_index(slot)] = false;
        match slot {
            Slot::Current => (self.current, self.current_init) = (connection, init),
            Slot::Candidate => (self.candidate, self.candidate_init) = (connection, init),
        }
    }

    fn slot_mut(&mut self, slot: Slot) -> Option<&mut Connection> {
        match slot {
            Slot::Current => self.current.as_mut(),
            Slot::Candidate => self.candidate.as_mut(),
        }
    }

    fn is_idle(&self) -> bool {
        self.current.is_none() && self.candidate.is_none()
    }

    /// Refills the allowance at `now` and reports whether it is full.
    fn refill(&mut self, now: Timestamp, limits: &DemuxLimits) -> bool {
        let interval = limits.init_interval.as_micros();
        let elapsed = now.saturating_since(self.refilled).as_micros();
        let earned = elapsed.checked_div(interval).unwrap_or(u64::MAX);
        let tokens = u64::from(self.init_tokens).saturating_add(earned);
        if tokens >= u64::from(limits.init_burst) {
            self.init_tokens = limits.init_burst;
            self.refilled = now;
        } else {
            // `tokens` < init_burst, a u32; the partial interval carries over.
            self.init_tokens = u32::try_from(tokens).unwrap_or(limits.init_burst);
            self.refilled = self.refilled + Duration::from_micros(earned.saturating_mul(interval));
        }
        self.init_tokens >= limits.init_burst
    }
}

/// The end-to-end connections of an endpoint that runs routed sessions (spec §16.6): per peer
/// node id one current connection and one candidate, and the rule that sorts routed packets
/// from `Deliver` envelopes to them. Sans IO: packets, time and new connections come from the
/// caller, which also sends what [`poll_transmit`](Self::poll_transmit) yields in a `Forward`
/// on the node's most recent route.
///
/// Bounded: at most [`DemuxLimits::max_peers`] node ids, and per node at most
/// [`DemuxLimits::init_burst`] new handshakes at once, refilled one per
/// [`DemuxLimits::init_interval`] (routed mode has no cookie challenge; the source is a node
/// the relay authenticated). A node whose connections are gone keeps its entry, so its
/// allowance is not reset by failing; such entries are evicted when the table is full.
#[derive(Debug)]
pub struct E2eDemux {
    limits: DemuxLimits,
    peers: BTreeMap<NodeId, E2ePeer>,
}

impl E2eDemux {
    /// An empty demultiplexer.
    #[must_use]
    pub const fn new(limits: DemuxLimits) -> Self {
        Self { limits, peers: BTreeMap::new() }
    }

    /// Number of node ids held.
    #[must_use]
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Whether no node id is held.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// The node ids held, in order.
    pub fn nodes(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.peers.keys().copied()
    }

    /// The node's connection in `slot`.
    #[must_use]
    pub fn connection(&self, node: &NodeId, slot: Slot) -> Option<&Connection> {
        let p = self.peers.get(node)?;
        match slot {
            Slot::Current => p.current.as_ref(),
            Slot::Candidate => p.candidate.as_ref(),
        }
    }

    /// The node's connection in `slot`, to send on ([`Connection::send`]) or close. Answer
    /// its authorization requests with [`authorize`](Self::authorize), not through this:
    /// only that makes sure the check of spec §16.6 came first.
    #[must_use]
    pub fn connection_mut(&mut self, node: &NodeId, slot: Slot) -> Option<&mut Connection> {
        self.peers.get_mut(node)?.slot_mut(slot)
    }

    /// Adds `connection`, an initiator this endpoint started towards `node` (spec §16.6:
    /// either end may initiate), as the node's candidate, replacing any earlier candidate; it
    /// becomes the current connection once Connected. Not subject to the INIT allowance.
    ///
    /// # Errors
    /// [`DemuxError::TooManyPeers`] when `node` is new and the table is full.
    pub fn start(&mut self, now: Timestamp, node: NodeId, connection: Connection) -> Result<(), DemuxError> {
        if !self.peers.contains_key(&node) {
            self.make_room(now)?;
        }
        let burst = self.limits.init_burst;
        let peer = self.peers.entry(node).or_insert_with(|| E2ePeer::new(burst, now));
        peer.set(Slot::Candidate, Some(connection), None);
        Ok(())
    }

    /// Feeds a routed packet that a `Deliver` from `node` carried (spec §16.4, §16.6) and
    /// returns the connection that took it; then drain that node's
    /// [`poll_event`](Self::poll_event).
    ///
    /// - INIT: a byte-identical repeat of the INIT the current connection or the candidate
    ///   read goes to that connection, which answers it from its cache or drops it (spec
    ///   §5.7.2); any other INIT makes a new candidate with
    ///   `new_responder` (a routed-mode [`Role::Responder`](crate::Role::Responder)
    ///   connection, called only here, after the limits), replacing any earlier candidate once
    ///   it has read the INIT.
    /// - RESP, FINAL, REJECT: the connection whose index the packet names.
    /// - Anything else: the candidate, then, if it refused it, the current connection.
    ///
    /// # Errors
    /// [`DemuxError`]: the packet was dropped; nothing of any connection changed, except that
    /// an INIT the new candidate could not read leaves the earlier candidate in place.
    pub fn handle_input(
        &mut self,
        now: Timestamp,
        node: NodeId,
        packet: BytesMut,
        new_responder: impl FnOnce() -> Result<Connection, ConnectionError>,
    ) -> Result<Slot, DemuxError> {
        match packet.first().copied() {
            None => Err(ConnectionError::Decode(DecodeError::Empty).into()),
            Some(wire::TYPE_HANDSHAKE_INIT) => self.on_init(now, node, packet, new_responder),
            Some(wire::TYPE_HANDSHAKE_RESP | wire::TYPE_HANDSHAKE_FINAL | wire::TYPE_HANDSHAKE_REJECT) => {
                let peer = self.peers.get_mut(&node).ok_or(DemuxError::NoConnection)?;
                let index = wire::routed_receiver_index(&packet);
                for slot in [Slot::Candidate, Slot::Current] {
                    if let Some(c) = peer.slot_mut(slot).filter(|c| Some(c.local_index()) == index) {
                        c.handle_input_owned(now, packet)?;
                        return Ok(slot);
                    }
                }
                Err(DemuxError::NoConnection)
            }
            Some(_) => {
                let peer = self.peers.get_mut(&node).ok_or(DemuxError::NoConnection)?;
                // spec §16.6, §10.1: a refused packet changes no state, so trying the candidate
                // first costs at most one more AEAD opening. The packet (decrypted in place) is
                // copied only when both connections may need it.
                if let Some(c) = peer.candidate.as_mut() {
                    if peer.current.is_none() {
                        c.handle_input_owned(now, packet)?;
                        return Ok(Slot::Candidate);
                    }
                    if c.handle_input_owned(now, packet.clone()).is_ok() {
                        return Ok(Slot::Candidate);
                    }
                }
                let c = peer.current.as_mut().ok_or(DemuxError::NoConnection)?;
                c.handle_input_owned(now, packet)?;
                Ok(Slot::Current)
            }
        }
    }

    fn on_init(
        &mut self,
        now: Timestamp,
        node: NodeId,
        packet: BytesMut,
        new_responder: impl FnOnce() -> Result<Connection, ConnectionError>,
    ) -> Result<Slot, DemuxError> {
        let digest = init_digest(&packet);
        if let Some(peer) = self.peers.get_mut(&node) {
            // spec §16.6: a repeat goes to the connection that read the INIT, which answers
            // it or, once past the point of caching an answer, drops it (§5.7.2). It never
            // starts a handshake again, however late a relay delivers it.
            for (slot, read) in [(Slot::Current, peer.current_init), (Slot::Candidate, peer.candidate_init)] {
                if read == Some(digest) {
                    if let Some(c) = peer.slot_mut(slot) {
                        c.handle_input_owned(now, packet)?;
                        return Ok(slot);
                    }
                }
            }
        } else {
            self.make_room(now)?;
        }
        let limits = self.limits;
        let peer = self.peers.entry(node).or_insert_with(|| E2ePeer::new(limits.init_burst, now));
        peer.refill(now, &limits);
        if peer.init_tokens == 0 {
            return Err(DemuxError::InitLimited);
        }
        peer.init_tokens -= 1;
        let mut c = new_responder()?;
        // A responder that cannot read message 1 keeps nothing (spec §10): neither does the
        // demultiplexer, so a bad INIT does not end a good candidate.
        c.handle_input_owned(now, packet)?;
        peer.set(Slot::Candidate, Some(c), Some(digest));
        Ok(Slot::Candidate)
    }

    /// Evicts one node without connections whose allowance is full; else the table is full.
    fn make_room(&mut self, now: Timestamp) -> Result<(), DemuxError> {
        if self.peers.len() < self.limits.max_peers {
            return Ok(());
        }
        let limits = self.limits;
        let idle = self.peers.iter_mut().find_map(|(n, p)| (p.is_idle() && p.refill(now, &limits)).then_some(*n));
        match idle {
            Some(n) => {
                self.peers.remove(&n);
                Ok(())
            }
            None => Err(DemuxError::TooManyPeers),
        }
    }

    /// The next event of `node`'s connections: the current connection's first, then the
    /// candidate's. Checks every revealed peer key against `node` (spec §16.6) and denies a
    /// mismatch itself; promotes a candidate that becomes Connected. Connections that are
    /// closed and drained are dropped. Call after [`handle_input`](Self::handle_input) and
    /// [`handle_timeout`](Self::handle_timeout) until `None`.
    pub fn poll_event(&mut self, now: Timestamp, node: &NodeId) -> Option<RoutedEvent> {
        let peer = self.peers.get_mut(node)?;
        for slot in [Slot::Current, Slot::Candidate] {
            let Some(c) = peer.slot_mut(slot) else { continue };
            let Some(event) = c.poll_event() else {
                if c.is_closed() {
                    peer.set(slot, None, None);
                }
                continue;
            };
            match &event {
                Event::AuthorizationRequired { remote_static, .. }
                    if check_route_peer(remote_static, node).is_err() =>
                {
                    // The connection closes on the denial; its Closed event follows.
                    let _ = c.authorize(now, Decision::deny());
                    if !c.is_closed() {
                        // Someone answered it already (through `connection_mut`): whatever
                        // it did since is void. Dropped at once, without a Closed.
                        peer.set(slot, None, None);
                    }
                    return Some(RoutedEvent::NodeMismatch { slot });
                }
                Event::AuthorizationRequired { .. } => peer.checked[slot_index(slot)] = true,
                Event::Connected { .. } if slot == Slot::Candidate => {
                    // spec §5.9, §16.6: the Connected candidate replaces the current connection
                    // (whose events were drained first).
                    let init = peer.candidate_init.take();
                    let promoted = peer.candidate.take();
                    peer.set(Slot::Candidate, None, None);
                    peer.set(Slot::Current, promoted, init);
                }
                _ => {}
            }
            return Some(RoutedEvent::Event { slot, event });
        }
        None
    }

    /// Answers an `AuthorizationRequired` of `node`'s connection in `slot` (spec §5.5), once
    /// [`poll_event`](Self::poll_event) has passed it on: a request not polled yet (or made
    /// by a connection that replaced the one whose request was polled) is not answered, since
    /// the key it names has not been checked against `node` (spec §16.6).
    ///
    /// # Errors
    /// [`DemuxError::NoConnection`] when there is no such connection;
    /// [`ConnectionError::NoDecisionPending`] when its request was not polled; else as
    /// [`Connection::authorize`].
    pub fn authorize(
        &mut self,
        now: Timestamp,
        node: &NodeId,
        slot: Slot,
        decision: Decision,
    ) -> Result<(), DemuxError> {
        let peer = self.peers.get_mut(node).ok_or(DemuxError::NoConnection)?;
        let checked = peer.checked[slot_index(slot)];
        let c = peer.slot_mut(slot).ok_or(DemuxError::NoConnection)?;
        if !checked {
            return Err(ConnectionError::NoDecisionPending.into());
        }
        Ok(c.authorize(now, decision)?)
    }

    /// The next routed packet to send to `node`, from its current connection first, then its
    /// candidate: wrap it in a `Forward` on the node's most recent route (spec §16.6).
    ///
    /// # Errors
    /// As [`Connection::poll_transmit`].
    pub fn poll_transmit(
        &mut self,
        now: Timestamp,
        node: &NodeId,
        buf: &mut [u8],
    ) -> Result<Option<usize>, ConnectionError> {
        let Some(peer) = self.peers.get_mut(node) else { return Ok(None) };
        for c in [&mut peer.current, &mut peer.candidate].into_iter().flatten() {
            if let Some(n) = c.poll_transmit(now, buf)? {
                return Ok(Some(n));
            }
        }
        Ok(None)
    }

    /// Runs every connection's timers at `now`; then drain [`poll_event`](Self::poll_event)
    /// and [`poll_transmit`](Self::poll_transmit) of every node. Scans all nodes (O(n)).
    pub fn handle_timeout(&mut self, now: Timestamp) {
        for p in self.peers.values_mut() {
            for c in [&mut p.current, &mut p.candidate].into_iter().flatten() {
                c.handle_timeout(now);
            }
        }
    }

    /// The earliest timer of any connection. Scans all nodes (O(n)).
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        self.peers
            .values()
            .flat_map(|p| [&p.current, &p.candidate])
            .filter_map(|c| c.as_ref().and_then(Connection::poll_timeout))
            .min()
    }
}

/// `part` as a slice of `buf` when it lies within it (no copy), else a copy of it.
fn share(buf: &Bytes, part: &[u8]) -> Bytes {
    let (start, base) = (part.as_ptr() as usize, buf.as_ptr() as usize);
    if start >= base && start + part.len() <= base + buf.len() {
        buf.slice_ref(part)
    } else {
        Bytes::copy_from_slice(part)
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn from_message_copies_a_packet_from_another_buffer_instead_of_panicking() {
        let packet = [1u8, 2, 3, 4];
        let m = Message::Forward { route: 7, packet: &packet };
        let unrelated = Bytes::from_static(b"something else entirely");
        let r = RoutingMessage::from_message(&m, &unrelated).unwrap();
        assert_eq!(r, RoutingMessage::Forward { route: 7, packet: Bytes::copy_from_slice(&packet) });
        let shared = Bytes::copy_from_slice(&packet);
        let m = Message::Deliver { route: 1, packet: &shared[1..] };
        let r = RoutingMessage::from_message(&m, &shared).unwrap();
        assert_eq!(r, RoutingMessage::Deliver { route: 1, packet: shared.slice(1..) });
    }
    use super::*;

    fn node(b: u8) -> NodeId {
        NodeId([b; 16])
    }

    const T: Timestamp = Timestamp::from_millis(5_000);

    #[test]
    fn reasons_round_trip_and_unknown_codes_are_kept() {
        for c in 0..=255u8 {
            assert_eq!(RouteReason::from_code(c).code(), c);
        }
        assert_eq!(RouteReason::from_code(0), RouteReason::Unknown(0));
        assert_eq!(RouteReason::from_code(10), RouteReason::Unknown(10));
        assert_eq!(RouteReason::from_code(255), RouteReason::Unknown(255));
        assert_eq!(RouteReason::UplinkDown.code(), 3);
        // spec §16.5: the codes of the table, in order.
        let named = [
            RouteReason::UnknownRoute,
            RouteReason::Detached,
            RouteReason::UplinkDown,
            RouteReason::NotAllowed,
            RouteReason::Congested,
            RouteReason::TooLarge,
            RouteReason::Revoked,
            RouteReason::ShuttingDown,
            RouteReason::SpoolFull,
        ];
        for (i, r) in named.into_iter().enumerate() {
            assert_eq!(usize::from(r.code()), i + 1, "{r}");
        }
        assert_eq!(RouteReason::SpoolFull.to_string(), "spool full");
    }

    #[test]
    fn handles_are_the_lowest_free_and_withdrawn_ones_wait_out_the_reuse_delay() {
        let mut t = RouteTable::new(8, false);
        assert_eq!(t.announce(node(1), T), Ok(Announcement { route: 0, new: true }));
        assert_eq!(t.announce(node(2), T), Ok(Announcement { route: 1, new: true }));
        assert_eq!(t.announce(node(1), T), Ok(Announcement { route: 0, new: false }));
        assert_eq!(t.withdraw(&node(1), T), Some(0));
        assert_eq!(t.withdraw(&node(1), T), None);
        assert_eq!(t.resolve(0), None);
        // spec §16.3: handle 0 is quarantined, so node 3 gets a fresh one.
        assert_eq!(t.announce(node(3), T), Ok(Announcement { route: 2, new: true }));
        let later = T + ROUTE_REUSE_DELAY;
        assert_eq!(t.announce(node(4), later), Ok(Announcement { route: 0, new: true }));
        assert_eq!(t.resolve(0), Some(node(4)));
        assert_eq!(t.route_of(&node(3)), Some(2));
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn the_table_is_bounded_and_so_is_its_quarantine() {
        let mut t = RouteTable::new(2, false);
        let _ = t.announce(node(1), T).unwrap();
        let _ = t.announce(node(2), T).unwrap();
        assert_eq!(t.announce(node(3), T), Err(RoutingError::TableFull));
        // Churn: each withdrawal quarantines a handle; the quarantine never exceeds the bound.
        for i in 0..100u8 {
            let n = node(10 + (i % 2));
            t.withdraw(&node(1 + (i % 2)), T);
            t.withdraw(&n, T);
            let _ = t.announce(n, T).unwrap();
            assert!(t.quarantine.len() <= 2, "{}", t.quarantine.len());
        }
        assert!(t.next_fresh <= 6, "handles kept growing: {}", t.next_fresh);
    }

    #[test]
    fn datagram_links_repeat_unused_announcements_a_bounded_number_of_times() {
        let mut t = RouteTable::new(8, true);
        let a = t.announce(node(1), T).unwrap();
        assert!(t.needs_announcement(a.route));
        let mut sent = 0;
        let mut now = T;
        for _ in 0..32 {
            let Some(due) = t.next_timeout() else { break };
            assert!(due > now);
            now = due;
            while let Some((r, n)) = t.poll_repeat(now) {
                assert_eq!((r, n), (a.route, node(1)));
                sent += 1;
            }
        }
        assert_eq!(sent, usize::from(ROUTE_ANNOUNCE_REPEATS));
        assert_eq!(now, T + Duration::from_secs(1 + 2 + 4 + 8));
        // Once the peer uses the handle nothing is repeated any more.
        let b = t.announce(node(2), now).unwrap();
        assert_eq!(t.on_forward(b.route), Ok(node(2)));
        assert!(!t.needs_announcement(b.route));
        assert_eq!(t.next_timeout(), None);
        assert_eq!(t.on_forward(77), Err(RoutingError::UnknownRoute(77)));
        // Stream links never repeat.
        let mut s = RouteTable::new(8, false);
        let c = s.announce(node(3), T).unwrap();
        assert!(!s.needs_announcement(c.route));
        assert_eq!(s.next_timeout(), None);
    }

    #[test]
    fn unreachable_notices_are_rate_limited_per_handle() {
        let mut t = RouteTable::new(8, false);
        let a = t.announce(node(1), T).unwrap();
        assert!(t.allow_notice(a.route, T));
        assert!(!t.allow_notice(a.route, T + Duration::from_millis(999)));
        assert!(t.allow_notice(a.route, T + UNREACHABLE_INTERVAL));
        // Unknown handles share one slot, so a flood of made-up handles costs one notice a second.
        assert!(t.allow_notice(1000, T));
        assert!(!t.allow_notice(1001, T));
        assert!(t.allow_notice(a.route + 1, T + UNREACHABLE_INTERVAL));
    }

    #[test]
    fn peer_routes_replace_bindings_and_are_bounded() {
        let mut p = PeerRoutes::new(2);
        p.learn(0, node(1)).unwrap();
        p.learn(1, node(2)).unwrap();
        assert_eq!(p.learn(2, node(3)), Err(RoutingError::TableFull));
        // Rebinding a handle or a node does not grow the table.
        p.learn(0, node(3)).unwrap();
        assert_eq!((p.resolve(0), p.route_of(&node(1))), (Ok(node(3)), None));
        p.learn(5, node(3)).unwrap();
        assert_eq!((p.resolve(0), p.resolve(5)), (Err(RoutingError::UnknownRoute(0)), Ok(node(3))));
        assert_eq!(p.len(), 2);
        assert_eq!(p.forget(5), Some(node(3)));
        assert_eq!(p.forget(5), None);
        assert_eq!(p.iter().collect::<alloc::vec::Vec<_>>(), [(1, node(2))]);
        p.clear();
        assert!(p.is_empty());
    }

    #[test]
    fn route_peer_check_compares_node_ids() {
        let key = PublicKey([9; 32]);
        assert_eq!(check_route_peer(&key, &NodeId::from_public_key(&key)), Ok(()));
        assert_eq!(check_route_peer(&key, &node(0)), Err(RoutingError::NodeMismatch));
    }

    // ---------------------------------------------------------------------------------
    // E2eDemux (spec §16.6)

    mod demux {
        use alloc::sync::Arc;
        use alloc::vec::Vec;

        use rand_core::SeedableRng;

        use super::super::*;
        use super::node;
        use crate::{Config, Mode, Role, StaticKeypair};

        const CLOUD: u8 = 3;
        const T0: Timestamp = Timestamp::from_millis(1_000);

        struct Device {
            conn: Connection,
            init: BytesMut,
            node: NodeId,
        }

        fn key(seed: u8) -> StaticKeypair {
            StaticKeypair::from_secret_bytes([seed; 32])
        }

        fn rng(seed: u64) -> rand_chacha::ChaCha20Rng {
            rand_chacha::ChaCha20Rng::seed_from_u64(seed)
        }

        /// A routed IK initiator towards the cloud and its first packet.
        fn device(seed: u8, rng_seed: u64) -> Device {
            let cfg = Arc::new(Config::new(key(seed), Mode::Routed));
            let cloud = *key(CLOUD).public();
            let mut conn = Connection::new(cfg, Role::Initiator, Some(cloud), T0, &mut rng(rng_seed)).unwrap();
            let mut buf = [0u8; 2048];
            let n = conn.poll_transmit(T0, &mut buf).unwrap().unwrap();
            assert_eq!(buf[0], wire::TYPE_HANDSHAKE_INIT);
            Device { conn, init: BytesMut::from(&buf[..n]), node: NodeId::from_public_key(key(seed).public()) }
        }

        fn responder(rng_seed: u64) -> impl FnOnce() -> Result<Connection, ConnectionError> {
            move || {
                let cfg = Arc::new(Config::new(key(CLOUD), Mode::Routed));
                Connection::new(cfg, Role::Responder, None, T0, &mut rng(rng_seed))
            }
        }

        fn never() -> Result<Connection, ConnectionError> {
            panic!("no connection may be made here")
        }

        fn events(d: &mut E2eDemux, now: Timestamp, node: &NodeId) -> Vec<RoutedEvent> {
            let mut out = Vec::new();
            for _ in 0..64 {
                let Some(e) = d.poll_event(now, node) else { return out };
                if let RoutedEvent::Event { slot, event: Event::AuthorizationRequired { .. } } = &e {
                    d.authorize(now, node, *slot, Decision::allow()).unwrap();
                }
                out.push(e);
            }
            panic!("endless events")
        }

        fn index(d: &E2eDemux, node: &NodeId, slot: Slot) -> Option<u32> {
            d.connection(node, slot).map(Connection::local_index)
        }

        /// Runs the handshake between `dev` and the demux until both are Connected (bounded).
        fn connect(d: &mut E2eDemux, dev: &mut Device) -> Vec<RoutedEvent> {
            let mut seen = Vec::new();
            let mut buf = [0u8; 2048];
            for _ in 0..16 {
                seen.extend(events(d, T0, &dev.node));
                while let Some(n) = d.poll_transmit(T0, &dev.node, &mut buf).unwrap() {
                    let _ = dev.conn.handle_input(T0, &buf[..n]);
                }
                while let Some(n) = dev.conn.poll_transmit(T0, &mut buf).unwrap() {
                    let _ = d.handle_input(T0, dev.node, BytesMut::from(&buf[..n]), never);
                }
                let up = d.connection(&dev.node, Slot::Current).is_some_and(Connection::is_connected);
                if up && dev.conn.is_connected() {
                    seen.extend(events(d, T0, &dev.node));
                    return seen;
                }
            }
            panic!("no handshake")
        }

        #[test]
        fn packets_from_an_unknown_node_are_dropped_with_a_typed_error() {
            let mut d = E2eDemux::new(DemuxLimits::default());
            let n = node(1);
            let mut transport = BytesMut::from(&[wire::TYPE_TRANSPORT, 0, 0, 1][..]);
            transport.extend_from_slice(&[0; 16]);
            assert_eq!(d.handle_input(T0, n, transport, never), Err(DemuxError::NoConnection));
            let resp = BytesMut::from(&[wire::TYPE_HANDSHAKE_RESP, 0, 0, 0, 7, 1, 2][..]);
            assert_eq!(d.handle_input(T0, n, resp, never), Err(DemuxError::NoConnection));
            assert_eq!(
                d.handle_input(T0, n, BytesMut::new(), never),
                Err(DemuxError::Connection(ConnectionError::Decode(DecodeError::Empty)))
            );
            // Nothing was allocated for the node.
            assert!(d.is_empty());
            assert_eq!(d.poll_event(T0, &n), None);
            assert_eq!(d.poll_transmit(T0, &n, &mut [0u8; 64]), Ok(None));
        }

        #[test]
        fn a_connected_candidate_is_promoted_and_traffic_flows() {
            let mut d = E2eDemux::new(DemuxLimits::default());
            let mut dev = device(10, 1);
            assert_eq!(d.handle_input(T0, dev.node, dev.init.clone(), responder(2)), Ok(Slot::Candidate));
            let cand = index(&d, &dev.node, Slot::Candidate);
            let seen = connect(&mut d, &mut dev);
            assert!(seen.contains(&RoutedEvent::Event {
                slot: Slot::Candidate,
                event: Event::Connected {
                    remote_static: *key(10).public(),
                    handshake_hash: *d.connection(&dev.node, Slot::Current).unwrap().handshake_hash().unwrap(),
                },
            }));
            assert_eq!(index(&d, &dev.node, Slot::Current), cand, "the candidate became current");
            assert_eq!(index(&d, &dev.node, Slot::Candidate), None);
            // A late copy of the INIT the current connection read goes to it, which no longer
            // caches an answer (spec §5.7.2) and drops it: no new handshake starts.
            assert_eq!(
                d.handle_input(T0, dev.node, dev.init.clone(), never),
                Err(DemuxError::Connection(ConnectionError::Handshake(crate::HandshakeError::UnexpectedPacket)))
            );
            assert_eq!(index(&d, &dev.node, Slot::Candidate), None);
            // Transport packets reach the current connection.
            dev.conn.send(1, Bytes::from_static(b"reading")).unwrap();
            let mut buf = [0u8; 256];
            let n = dev.conn.poll_transmit(T0, &mut buf).unwrap().unwrap();
            assert_eq!(d.handle_input(T0, dev.node, BytesMut::from(&buf[..n]), never), Ok(Slot::Current));
            let got = events(&mut d, T0, &dev.node);
            assert!(got.iter().any(|e| matches!(e,
                RoutedEvent::Event { slot: Slot::Current, event: Event::Message { payload, .. } } if &payload[..] == b"reading")));
            // A replay is refused by both connections and changes nothing.
            let replay = d.handle_input(T0, dev.node, BytesMut::from(&buf[..n]), never);
            assert!(matches!(replay, Err(DemuxError::Connection(_))), "{replay:?}");
        }

        #[test]
        fn a_newer_init_replaces_a_stale_candidate_and_the_current_connection_stays() {
            let mut d = E2eDemux::new(DemuxLimits::default());
            let mut dev = device(10, 1);
            assert_eq!(d.handle_input(T0, dev.node, dev.init.clone(), responder(2)), Ok(Slot::Candidate));
            let _ = connect(&mut d, &mut dev);
            let current = index(&d, &dev.node, Slot::Current);
            // The device restarts twice; the first new handshake goes stale.
            let stale = device(10, 3);
            assert_eq!(d.handle_input(T0, stale.node, stale.init.clone(), responder(4)), Ok(Slot::Candidate));
            let first = index(&d, &dev.node, Slot::Candidate);
            // A repeat of the candidate's own INIT goes to it: dropped while the candidate awaits
            // its authorization, answered from its cache after; never a new handshake.
            let r = d.handle_input(T0, stale.node, stale.init.clone(), never);
            assert!(matches!(r, Err(DemuxError::Connection(_))), "{r:?}");
            let _ = events(&mut d, T0, &dev.node);
            assert_eq!(d.handle_input(T0, stale.node, stale.init.clone(), never), Ok(Slot::Candidate));
            assert_eq!(index(&d, &dev.node, Slot::Candidate), first);
            let mut fresh = device(10, 5);
            assert_eq!(d.handle_input(T0, fresh.node, fresh.init.clone(), responder(6)), Ok(Slot::Candidate));
            let second = index(&d, &dev.node, Slot::Candidate);
            assert!(second.is_some() && second != first, "the newer INIT replaced the candidate");
            assert_eq!(index(&d, &dev.node, Slot::Current), current, "current kept until the candidate connects");
            // A RESP-type packet for the stale candidate's index reaches nobody.
            let mut resp = BytesMut::from(&[wire::TYPE_HANDSHAKE_FINAL][..]);
            resp.extend_from_slice(&first.unwrap().to_be_bytes());
            resp.extend_from_slice(&[0; 48]);
            assert_eq!(d.handle_input(T0, fresh.node, resp, never), Err(DemuxError::NoConnection));
            let _ = connect(&mut d, &mut fresh);
            assert_eq!(index(&d, &dev.node, Slot::Current), second);
            assert_eq!(d.len(), 1);
        }

        #[test]
        fn an_init_that_cannot_be_read_leaves_the_candidate_alone() {
            let mut d = E2eDemux::new(DemuxLimits::default());
            let dev = device(10, 1);
            let _ = d.handle_input(T0, dev.node, dev.init.clone(), responder(2)).unwrap();
            let cand = index(&d, &dev.node, Slot::Candidate);
            let mut bad = dev.init.clone();
            let last = bad.len() - 1;
            bad[last] ^= 1;
            let r = d.handle_input(T0, dev.node, bad, responder(3));
            assert!(matches!(r, Err(DemuxError::Connection(_))), "{r:?}");
            assert_eq!(index(&d, &dev.node, Slot::Candidate), cand);
        }

        #[test]
        fn a_key_that_is_not_the_routes_node_is_denied_by_the_demux() {
            let mut d = E2eDemux::new(DemuxLimits::default());
            let dev = device(10, 1);
            // The relay labels device 10's INIT with another node's route (spec §16.6).
            let other = node(0x77);
            assert_eq!(d.handle_input(T0, other, dev.init.clone(), responder(2)), Ok(Slot::Candidate));
            let ev = events(&mut d, T0, &other);
            assert_eq!(ev.first(), Some(&RoutedEvent::NodeMismatch { slot: Slot::Candidate }));
            assert!(ev
                .iter()
                .all(|e| !matches!(e, RoutedEvent::Event { event: Event::AuthorizationRequired { .. }, .. })));
            assert!(ev.iter().any(|e| matches!(e, RoutedEvent::Event { event: Event::Closed(_), .. })));
            // The denied connection is gone once drained; the node's entry stays.
            assert!(d.connection(&other, Slot::Candidate).is_none());
            assert_eq!(d.len(), 1);
        }

        #[test]
        fn new_handshakes_per_node_are_limited_and_refill_over_time() {
            let limits = DemuxLimits { init_burst: 2, init_interval: Duration::from_secs(1), ..DemuxLimits::default() };
            let mut d = E2eDemux::new(limits);
            let devs: Vec<Device> = (0..4).map(|i| device(10, 100 + i)).collect();
            let n = devs[0].node;
            assert_eq!(d.handle_input(T0, n, devs[0].init.clone(), responder(1)), Ok(Slot::Candidate));
            assert_eq!(d.handle_input(T0, n, devs[1].init.clone(), responder(2)), Ok(Slot::Candidate));
            let held = index(&d, &n, Slot::Candidate);
            assert_eq!(d.handle_input(T0, n, devs[2].init.clone(), never), Err(DemuxError::InitLimited));
            // A repeat costs nothing, and the limit does not touch the candidate.
            let _ = events(&mut d, T0, &n);
            assert_eq!(d.handle_input(T0, n, devs[1].init.clone(), never), Ok(Slot::Candidate));
            assert_eq!(index(&d, &n, Slot::Candidate), held);
            // Another node has its own allowance.
            let other = device(11, 9);
            assert_eq!(d.handle_input(T0, other.node, other.init.clone(), responder(3)), Ok(Slot::Candidate));
            let half = T0 + Duration::from_millis(999);
            assert_eq!(d.handle_input(half, n, devs[2].init.clone(), never), Err(DemuxError::InitLimited));
            let later = T0 + Duration::from_secs(1);
            assert_eq!(d.handle_input(later, n, devs[2].init.clone(), responder(4)), Ok(Slot::Candidate));
            assert_eq!(d.handle_input(later, n, devs[3].init.clone(), never), Err(DemuxError::InitLimited));
        }

        #[test]
        fn the_number_of_nodes_is_bounded_and_idle_nodes_make_room() {
            let limits = DemuxLimits { max_peers: 2, ..DemuxLimits::default() };
            let mut d = E2eDemux::new(limits);
            let dev = device(10, 1);
            // Node ids are the routing layer's labels: the same INIT under three of them.
            for (i, b) in [1u8, 2].into_iter().enumerate() {
                let r = d.handle_input(T0, node(b), dev.init.clone(), responder(10 + i as u64));
                assert_eq!(r, Ok(Slot::Candidate));
            }
            assert_eq!(d.handle_input(T0, node(3), dev.init.clone(), never), Err(DemuxError::TooManyPeers));
            let cfg = Arc::new(Config::new(key(CLOUD), Mode::Routed));
            let init = Connection::new(cfg, Role::Initiator, Some(*key(10).public()), T0, &mut rng(5)).unwrap();
            assert_eq!(d.start(T0, node(3), init), Err(DemuxError::TooManyPeers));
            assert_eq!(d.len(), 2);
            // Node 1's candidate is denied (its key is not node 1's) and dropped: once its
            // allowance is full again, its entry makes room for a new node.
            let _ = events(&mut d, T0, &node(1));
            assert!(d.connection(&node(1), Slot::Candidate).is_none());
            assert_eq!(d.handle_input(T0, node(3), dev.init.clone(), never), Err(DemuxError::TooManyPeers));
            let later = T0 + E2E_INIT_INTERVAL;
            assert_eq!(d.handle_input(later, node(3), dev.init.clone(), responder(20)), Ok(Slot::Candidate));
            assert_eq!(d.nodes().collect::<Vec<_>>(), [node(2), node(3)]);
        }

        #[test]
        fn timers_reach_every_connection() {
            let mut d = E2eDemux::new(DemuxLimits::default());
            let dev = device(10, 1);
            let _ = d.handle_input(T0, dev.node, dev.init.clone(), responder(2)).unwrap();
            let _ = events(&mut d, T0, &dev.node);
            let deadline = d.poll_timeout().unwrap();
            assert!(deadline > T0);
            // The handshake times out without a confirmation: the candidate closes and is dropped.
            let end = T0 + crate::config::HANDSHAKE_TIMEOUT;
            let mut now = T0;
            for _ in 0..64 {
                let Some(t) = d.poll_timeout().filter(|t| *t <= end) else { break };
                now = t;
                d.handle_timeout(now);
                let _ = events(&mut d, now, &dev.node);
                while d.poll_transmit(now, &dev.node, &mut [0u8; 2048]).unwrap().is_some() {}
            }
            d.handle_timeout(end);
            let _ = events(&mut d, end, &dev.node);
            assert!(now > T0, "no timer fired");
            assert!(d.connection(&dev.node, Slot::Candidate).is_none());
            assert_eq!(d.poll_timeout(), None);
        }

        /// The application polled a request of device 10's candidate and decided later; a
        /// relay meanwhile labelled device 11's INIT with device 10's node id, and the new
        /// candidate replaced the first. The late answer must not reach the new candidate,
        /// whose key was never checked: that let device 11 connect as device 10.
        #[test]
        fn a_late_answer_does_not_reach_a_candidate_that_replaced_the_one_asked_about() {
            let mut d = E2eDemux::new(DemuxLimits::default());
            let dev = device(10, 1);
            let n = dev.node;
            assert_eq!(d.handle_input(T0, n, dev.init.clone(), responder(2)), Ok(Slot::Candidate));
            let asked = d.poll_event(T0, &n);
            assert!(
                matches!(
                    asked,
                    Some(RoutedEvent::Event { slot: Slot::Candidate, event: Event::AuthorizationRequired { .. } })
                ),
                "{asked:?}"
            );
            let other = device(11, 3);
            assert_eq!(d.handle_input(T0, n, other.init.clone(), responder(4)), Ok(Slot::Candidate));
            assert_eq!(
                d.authorize(T0, &n, Slot::Candidate, Decision::allow()),
                Err(DemuxError::Connection(ConnectionError::NoDecisionPending))
            );
            assert_eq!(d.poll_event(T0, &n), Some(RoutedEvent::NodeMismatch { slot: Slot::Candidate }));
            let _ = events(&mut d, T0, &n);
            assert!(d.connection(&n, Slot::Candidate).is_none());
        }

        #[test]
        fn a_request_is_answered_only_once_polled() {
            let mut d = E2eDemux::new(DemuxLimits::default());
            let mut dev = device(10, 1);
            let n = dev.node;
            let _ = d.handle_input(T0, n, dev.init.clone(), responder(2)).unwrap();
            assert_eq!(
                d.authorize(T0, &n, Slot::Candidate, Decision::allow()),
                Err(DemuxError::Connection(ConnectionError::NoDecisionPending))
            );
            assert_eq!(d.authorize(T0, &node(1), Slot::Candidate, Decision::allow()), Err(DemuxError::NoConnection));
            // Polled, it is answered, and the handshake completes.
            let _ = connect(&mut d, &mut dev);
            assert!(d.connection(&n, Slot::Current).is_some_and(Connection::is_connected));
        }

        #[test]
        fn a_mismatched_request_answered_through_connection_mut_is_dropped() {
            let mut d = E2eDemux::new(DemuxLimits::default());
            let dev = device(10, 1);
            let other = node(0x77);
            let _ = d.handle_input(T0, other, dev.init.clone(), responder(2)).unwrap();
            let c = d.connection_mut(&other, Slot::Candidate).unwrap();
            c.authorize(T0, Decision::allow()).unwrap();
            assert_eq!(d.poll_event(T0, &other), Some(RoutedEvent::NodeMismatch { slot: Slot::Candidate }));
            assert!(d.connection(&other, Slot::Candidate).is_none());
            assert_eq!(d.poll_event(T0, &other), None);
            assert_eq!(d.poll_transmit(T0, &other, &mut [0u8; 2048]), Ok(None), "its RESP was dropped with it");
        }
    }
}
