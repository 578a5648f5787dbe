//! Routing (spec §16): route handles, their announcement, envelopes and unreachable notices,
//! and the bounded per-link tables a relay and an endpoint keep. Sans IO, like the rest of
//! the crate: the tables take the time as an argument and say what to send; the caller sends
//! it through [`Connection::send_routing`](crate::Connection::send_routing).
//!
//! A relay keeps, per link, one [`RouteTable`] of the handles it announced to that peer
//! (`Route` messages; `Forward` names them) and one [`PeerRoutes`] of the handles the peer
//! announced, if the peer is a relay too. An endpoint keeps one [`PeerRoutes`] per relay link
//! (`Deliver` names those handles) and checks every end-to-end peer with [`check_route_peer`].

use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use core::fmt;

use bytes::Bytes;
use subtle::ConstantTimeEq;

use crate::config::{HANDSHAKE_RTO, HANDSHAKE_RTO_MAX};
use crate::crypto::PublicKey;
use crate::message::Message;
use crate::time::{Duration, Timestamp};
use crate::trust::NodeId;

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
/// ([`Event::Routing`](crate::Event::Routing)) and takes
/// ([`Connection::send_routing`](crate::Connection::send_routing)).
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
            | Self::Unreachable { route, .. } => *route,
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
        assert_eq!(RouteReason::from_code(9), RouteReason::Unknown(9));
        assert_eq!(RouteReason::UplinkDown.code(), 3);
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
}
