//! The relay's forwarding core (spec §16.4, §16.5, §16.4.1): a gateway's routing state and its
//! procedure for `Forward` envelopes, sans IO.
//!
//! A gateway owns one [`Relay`]. It tells it when links come and go ([`Relay::link_up`],
//! [`Relay::link_down`], [`Relay::revoke`]), hands it every routing message a link reports
//! ([`Relay::on_routing`]) and sends what it answers: the [`Verdict`] of each message, and the
//! announcements, withdrawals and notices of [`Relay::poll_output`]. Time enters as an argument;
//! the only timer is the repetition of announcements on datagram links (spec §16.3,
//! [`Relay::poll_timeout`], [`Relay::handle_timeout`]).
//!
//! # The caller's contract
//!
//! - **Drain [`poll_output`](Relay::poll_output) until `None` after every call** that takes
//!   `&mut self`, and before sending the `Deliver` of a [`Verdict::Forward`]: a `Route` the
//!   relay queued for that `Deliver` (spec §16.4 step 4) must reach the link first. Messages of
//!   one link come out in the order they must be sent.
//! - `Route` and `Withdraw` must not be dropped: if a link cannot take one, close that link
//!   (its peer's view of the bindings would be wrong from then on). `Unreachable` is a hint and
//!   may be dropped.
//! - When a [`Verdict::Forward`]'s `Deliver` cannot be queued on its link, call
//!   [`congested`](Relay::congested) so the sender is told (spec §16.4 step 5).
//! - [`LinkId`]s are the caller's and must not be reused for another link connection.
//!
//! # Shape (v1, spec §16)
//!
//! One relay hop: devices on [`LinkKind::Device`] links, the cloud at the other end of one
//! [`LinkKind::Uplink`]. On each device link the relay announces the cloud; on the uplink it
//! announces the attached devices; which pairs may talk is a [`Policy`] (default
//! [`CloudOnly`]). The `Deliver` a relay produces always names the handle of the node that
//! authenticated the link the `Forward` came in on (spec §16.4, "the source is the link's"):
//! nothing a peer sends can change that.
//!
//! # Bounds
//!
//! At most [`RelayLimits::max_links`] links, and per link at most
//! [`RelayLimits::max_routes_per_link`] announced handles ([`RouteTable`]). Pending output is
//! bounded per link: announcements and withdrawals are coalesced per handle (at most one
//! `Withdraw` followed by one `Route` per handle, and handles stay below twice the table bound
//! plus one), and at most [`RelayLimits::max_notices_per_link`] `Unreachable` notices wait,
//! the oldest dropped first. Nothing panics on any input or call order: unknown link ids are
//! no-ops, [`Verdict::UnknownLink`] or a typed [`RelayError`].
//!
//! # Custody (spec §17.9)
//!
//! A gateway with a spool turns custody on ([`Relay::set_custody`]). Then a `Forward` of a
//! routed TRANSPORT packet toward the cloud while the uplink is down is not dropped but
//! returned as [`Verdict::Spool`]; the gateway appends it to its spool and, once it is durable,
//! calls [`Relay::stored`], whose `Stored` notices come out of [`Relay::poll_output`],
//! coalesced ([`custody::StoredCoalescer`]). A packet the spool refuses is answered with
//! [`Relay::spool_full`]. The order rule is kept by the core: every [`Verdict::Spool`] marks
//! its (source, destination) pair as *spooling*, and while a pair is marked its newer
//! TRANSPORT packets are spooled too, even with the uplink up, so that they queue behind the
//! stored ones. The gateway clears the mark once the spool holds nothing more of the pair
//! ([`Relay::set_spooling`]), and sets it again for what a reopened spool holds. Stored packets
//! go back out through [`Relay::replay`].

pub mod custody;

use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::vec::Vec;
use core::fmt;

use bytes::Bytes;

use crate::message::Message;
use crate::routing::{RouteReason, RouteTable, RoutingError, RoutingMessage, MAX_ROUTES};
use crate::time::Timestamp;
use crate::trust::NodeId;
use crate::wire::{self, Packet};
use crate::Mode;
use custody::StoredCoalescer;

/// Names one link connection. Chosen by the caller, unique per link connection for the
/// relay's lifetime (a reconnecting node gets a new one).
pub type LinkId = u64;

/// spec §16.4.1: default bound on the links a relay holds (devices and the uplink).
pub const MAX_LINKS: usize = MAX_ROUTES;
/// spec §16.4.1: default bound on the `Unreachable` notices waiting per link.
pub const MAX_NOTICES_PER_LINK: usize = 64;

/// Which side of the relay a link is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LinkKind {
    /// A device's link to the gateway.
    Device,
    /// The gateway's link to the cloud (v1: one at a time).
    Uplink,
}

/// Which node may send to which (spec §16.4 step 2). Consulted for every `Forward`, and for
/// announcements: the relay announces a node on another node's link when either of the two
/// may send to the other (spec §16.3, §16.4.1).
///
/// Closures `Fn(&NodeId, LinkKind, &NodeId, LinkKind) -> bool` are policies.
pub trait Policy {
    /// Whether `from`, attached over a link of kind `from_kind`, may send to `to`, reached
    /// over a link of kind `to_kind` (the cloud is reached over the uplink even while it is
    /// down).
    fn allows(&self, from: &NodeId, from_kind: LinkKind, to: &NodeId, to_kind: LinkKind) -> bool;
}

/// The default [`Policy`]: every device may reach the cloud and the cloud any attached device;
/// nothing else (device to device is `NotAllowed`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CloudOnly;

impl Policy for CloudOnly {
    fn allows(&self, _from: &NodeId, from_kind: LinkKind, _to: &NodeId, to_kind: LinkKind) -> bool {
        from_kind != to_kind
    }
}

impl<F: Fn(&NodeId, LinkKind, &NodeId, LinkKind) -> bool> Policy for F {
    fn allows(&self, from: &NodeId, from_kind: LinkKind, to: &NodeId, to_kind: LinkKind) -> bool {
        self(from, from_kind, to, to_kind)
    }
}

/// Bounds of a [`Relay`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayLimits {
    /// At most this many links at once; [`Relay::link_up`] refuses more
    /// ([`RelayError::TooManyLinks`]). A link that replaces an older one of the same node does
    /// not count twice.
    pub max_links: usize,
    /// Handles the relay announces per link (spec §16.3, `MAX_ROUTES`): on the uplink, the
    /// number of devices that can be reached at once.
    pub max_routes_per_link: usize,
    /// `Unreachable` notices waiting per link; beyond it the oldest is dropped.
    pub max_notices_per_link: usize,
}

impl Default for RelayLimits {
    fn default() -> Self {
        Self { max_links: MAX_LINKS, max_routes_per_link: MAX_ROUTES, max_notices_per_link: MAX_NOTICES_PER_LINK }
    }
}

/// Why [`Relay::link_up`] refused a link. The caller closes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RelayError {
    /// The link id is in use by a live link.
    DuplicateLink(LinkId),
    /// [`RelayLimits::max_links`] links are up.
    TooManyLinks,
    /// The peer's node id is already the relay's on the other side: a device link from the
    /// cloud's node id, or an uplink to an attached device.
    NodeConflict,
}

impl fmt::Display for RelayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::DuplicateLink(l) => write!(f, "link id {l} is already in use"),
            Self::TooManyLinks => f.write_str("too many links"),
            Self::NodeConflict => f.write_str("node is already attached on the other side of the relay"),
        }
    }
}

impl core::error::Error for RelayError {}

/// What [`Relay::on_routing`] decided.
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use]
#[non_exhaustive]
pub enum Verdict {
    /// Send `msg` (a `Deliver`) on `link`, after everything [`Relay::poll_output`] yields now.
    /// If the link's queue cannot take it, call [`Relay::congested`].
    Forward {
        /// The link toward the destination.
        link: LinkId,
        /// `Deliver { route, packet }`: the packet of the `Forward`, unchanged and not copied.
        msg: RoutingMessage,
    },
    /// The message was dropped (spec §16.4, §16.7); an `Unreachable` answer may be waiting in
    /// [`Relay::poll_output`] (rate limited, spec §16.5).
    Dropped(RoutingError),
    /// Custody (spec §17.9, [`Relay::set_custody`]): append `packet` to the spool, then call
    /// [`Relay::stored`] once it is durable, or [`Relay::spool_full`] if the spool refuses it.
    /// Given for a routed TRANSPORT packet toward the cloud while the uplink is down, and for
    /// every newer one of the same source and destination until [`Relay::set_spooling`]
    /// clears the pair.
    Spool {
        /// The link the `Forward` came in on (the `Stored` goes back on it).
        link: LinkId,
        /// The node that authenticated that link: the packet's source.
        source: NodeId,
        /// The destination (the cloud).
        destination: NodeId,
        /// The handle the `Forward` named (for `Stored` and `Unreachable`).
        route: u32,
        /// The packet's G bit, 0 or 1 (spec §16.2).
        generation: u8,
        /// The packet's `counter_lo` (spec §16.2), below 2^24.
        counter_lo: u32,
        /// The routed packet, unchanged.
        packet: Bytes,
    },
    /// The link is not (or no longer) known to the relay: it went down, was replaced by a newer
    /// link of the same node, or its node was revoked. Dropped; nothing answers.
    UnknownLink,
}

/// Counters of a [`Relay`], for logs and metrics. They only grow (saturating).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelayStats {
    /// `Forward`s passed on: [`Verdict::Forward`]s returned (a later
    /// [`Relay::congested`] does not take one back).
    pub forwarded: u64,
    /// Their packet bytes.
    pub forwarded_bytes: u64,
    /// `Forward`s dropped, step 1: UnknownRoute.
    pub unknown_route: u64,
    /// Step 2: NotAllowed.
    pub not_allowed: u64,
    /// Step 3: Detached.
    pub detached: u64,
    /// Step 3: UplinkDown.
    pub uplink_down: u64,
    /// Step 4 (the out link's table is full) and step 5 ([`Relay::congested`]): Congested.
    pub congested: u64,
    /// Step 5: TooLarge.
    pub too_large: u64,
    /// [`Verdict::Spool`]s returned (spec §17.9).
    pub spooled: u64,
    /// Their packet bytes.
    pub spooled_bytes: u64,
    /// Packets the spool refused ([`Relay::spool_full`]): SpoolFull.
    pub spool_full: u64,
    /// Stored packets handed back to the uplink by [`Relay::replay`].
    pub replayed: u64,
    /// `Route`, `Withdraw`, `Deliver` or `Unreachable` received from a peer (spec §16.7).
    pub not_a_relay: u64,
    /// Routing messages on links the relay does not know.
    pub unknown_link: u64,
    /// `Route`s handed out by [`Relay::poll_output`], repeats included.
    pub routes: u64,
    /// Repeats of unused announcements queued on datagram links (spec §16.3).
    pub repeats: u64,
    /// `Withdraw`s handed out.
    pub withdrawals: u64,
    /// Announcements that did not fit the link's table (spec §16.3 bounds).
    pub table_full: u64,
    /// `Unreachable`s handed out.
    pub notices: u64,
    /// `Unreachable`s not sent because of the rate limit (spec §16.5).
    pub notices_limited: u64,
    /// `Unreachable`s dropped from a full per-link queue.
    pub notices_overflowed: u64,
}

impl RelayStats {
    /// `Forward`s dropped for `reason` (0 for reasons a relay never gives a `Forward`).
    #[must_use]
    pub const fn dropped(&self, reason: RouteReason) -> u64 {
        match reason {
            RouteReason::UnknownRoute => self.unknown_route,
            RouteReason::NotAllowed => self.not_allowed,
            RouteReason::Detached => self.detached,
            RouteReason::UplinkDown => self.uplink_down,
            RouteReason::Congested => self.congested,
            RouteReason::TooLarge => self.too_large,
            RouteReason::SpoolFull => self.spool_full,
            _ => 0,
        }
    }

    fn count_drop(&mut self, reason: RouteReason) {
        let c = match reason {
            RouteReason::UnknownRoute => &mut self.unknown_route,
            RouteReason::NotAllowed => &mut self.not_allowed,
            RouteReason::Detached => &mut self.detached,
            RouteReason::UplinkDown => &mut self.uplink_down,
            RouteReason::Congested => &mut self.congested,
            RouteReason::TooLarge => &mut self.too_large,
            RouteReason::SpoolFull => &mut self.spool_full,
            _ => return,
        };
        bump(c);
    }
}

fn bump(c: &mut u64) {
    *c = c.saturating_add(1);
}

/// Announcement changes of one handle not yet handed out: a `Withdraw` of what the peer may
/// know, then a `Route` of the current binding.
#[derive(Clone, Copy, Debug, Default)]
struct Update {
    withdraw: Option<RouteReason>,
    route: Option<NodeId>,
}

#[derive(Debug)]
struct Link {
    peer: NodeId,
    kind: LinkKind,
    lossy: bool,
    /// The largest message one transport packet of the link carries.
    max_message: usize,
    /// The handles the relay announced on this link (spec §16.3).
    table: RouteTable,
    /// Pending `Route`/`Withdraw`, coalesced by handle.
    updates: BTreeMap<u32, Update>,
    /// Pending `Unreachable`s, oldest first.
    notices: VecDeque<(u32, RouteReason)>,
    /// This link's entry in [`Relay::timers`].
    timer: Option<Timestamp>,
}

impl Link {
    fn queue_route(&mut self, route: u32, node: NodeId) {
        self.updates.entry(route).or_default().route = Some(node);
    }

    fn queue_withdraw(&mut self, route: u32, reason: RouteReason) {
        // A `Route` of the handle not yet sent is moot; one `Withdraw` covers whatever the
        // peer knows of the handle.
        let u = self.updates.entry(route).or_default();
        u.route = None;
        u.withdraw = Some(reason);
    }

    fn queued(&self) -> usize {
        let updates: usize =
            self.updates.values().map(|u| usize::from(u.withdraw.is_some()) + usize::from(u.route.is_some())).sum();
        updates + self.notices.len()
    }
}

/// Moves `link`'s entry in `timers` to its table's next repeat.
fn reschedule(timers: &mut BTreeSet<(Timestamp, LinkId)>, id: LinkId, link: &mut Link) {
    let next = if link.lossy { link.table.next_timeout() } else { None };
    if next != link.timer {
        if let Some(t) = link.timer {
            timers.remove(&(t, id));
        }
        if let Some(t) = next {
            timers.insert((t, id));
        }
        link.timer = next;
    }
}

/// A gateway's routing state and forwarding procedure (spec §16.4), sans IO. See the
/// [module documentation](self) for the caller's contract.
#[derive(Debug)]
pub struct Relay<P = CloudOnly> {
    limits: RelayLimits,
    policy: P,
    links: BTreeMap<LinkId, Link>,
    /// The link of every attached node: the devices and the uplink's peer.
    nodes: BTreeMap<NodeId, LinkId>,
    uplink: Option<LinkId>,
    /// The node at the other end of the uplink; kept while the uplink reconnects.
    cloud: Option<NodeId>,
    /// Links with pending output.
    ready: BTreeSet<LinkId>,
    /// Next announcement repeat per datagram link.
    timers: BTreeSet<(Timestamp, LinkId)>,
    stats: RelayStats,
    /// Custody on (spec §17.9).
    custody: bool,
    /// (source, destination) pairs with packets in the spool: their newer packets are spooled.
    spooling: BTreeSet<(NodeId, NodeId)>,
    /// `Stored` notices waiting (spec §17.9).
    stored: StoredCoalescer,
}

impl Relay<CloudOnly> {
    /// A relay with no links and the default policy ([`CloudOnly`]).
    #[must_use]
    pub fn new(limits: RelayLimits) -> Self {
        Self::with_policy(limits, CloudOnly)
    }
}

impl Default for Relay<CloudOnly> {
    fn default() -> Self {
        Self::new(RelayLimits::default())
    }
}

impl<P: Policy> Relay<P> {
    /// A relay with no links and the given policy.
    #[must_use]
    pub fn with_policy(limits: RelayLimits, policy: P) -> Self {
        Self {
            limits,
            policy,
            links: BTreeMap::new(),
            nodes: BTreeMap::new(),
            uplink: None,
            cloud: None,
            ready: BTreeSet::new(),
            timers: BTreeSet::new(),
            stats: RelayStats::default(),
            custody: false,
            spooling: BTreeSet::new(),
            stored: StoredCoalescer::default(),
        }
    }

    /// Turns custody (spec §17.9) on or off: with it, `Forward`s the uplink cannot take yet
    /// become [`Verdict::Spool`] (see the [module documentation](self)). Off by default: a
    /// relay without a spool drops them (`UplinkDown`, spec §16.4).
    pub fn set_custody(&mut self, on: bool) {
        self.custody = on;
        if !on {
            self.spooling.clear();
        }
    }

    /// Whether custody is on.
    #[must_use]
    pub const fn custody(&self) -> bool {
        self.custody
    }

    /// Marks (`true`) or clears (`false`) the pair (`source`, `destination`) as having packets
    /// in the spool (spec §17.9, order): while marked, `source`'s newer TRANSPORT packets to
    /// `destination` are [`Verdict::Spool`] even with the uplink up. Every [`Verdict::Spool`]
    /// marks its pair; the gateway clears it once the spool holds nothing more of the pair and
    /// no append of it is pending, and marks what a reopened spool holds. The pairs are
    /// bounded by the spool's sources, which the gateway bounds.
    pub fn set_spooling(&mut self, source: NodeId, destination: NodeId, on: bool) {
        if on && self.custody {
            self.spooling.insert((source, destination));
        } else {
            self.spooling.remove(&(source, destination));
        }
    }

    /// Whether the pair is marked (see [`set_spooling`](Self::set_spooling)).
    #[must_use]
    pub fn is_spooling(&self, source: &NodeId, destination: &NodeId) -> bool {
        self.spooling.contains(&(*source, *destination))
    }

    /// The packet of a [`Verdict::Spool`] (from `link`, handle `route`, G bit `generation`,
    /// `counter_lo`) is durable in the spool: its `Stored` notice is queued, coalesced with
    /// its neighbours (spec §17.9). Call [`handle_timeout`](Self::handle_timeout) when
    /// [`poll_timeout`](Self::poll_timeout) is due (at once for a first record), then drain
    /// [`poll_output`](Self::poll_output). Unknown links: no-op (the link closed meanwhile).
    pub fn stored(&mut self, now: Timestamp, link: LinkId, route: u32, generation: u8, counter_lo: u32) {
        if self.links.contains_key(&link) {
            self.stored.record(now, link, route, generation, counter_lo);
        }
    }

    /// The spool refused the packet of a [`Verdict::Spool`] for a `Forward` naming `route` on
    /// `in_link`: answers `Unreachable { SpoolFull }` on `in_link` (spec §17.9, §16.5, rate
    /// limited) and counts it. Unknown links: counted only.
    pub fn spool_full(&mut self, now: Timestamp, in_link: LinkId, route: u32) {
        self.stats.count_drop(RouteReason::SpoolFull);
        self.notice(now, in_link, route, RouteReason::SpoolFull);
    }

    /// A stored packet from `source` to `destination` goes out (spec §17.9, replay): returns
    /// the uplink and the `Deliver` to queue on it, after what [`poll_output`](Self::poll_output)
    /// yields now (it may hold the `Route` announcing `source`, spec §16.4 step 4). Whether the
    /// packet may be removed from the spool is the caller's: once the uplink took it.
    ///
    /// # Errors
    /// The reason it cannot go now: `UplinkDown` (no uplink, or one to another node: keep it),
    /// `Congested` (the uplink's table is full: keep it and retry later), `NotAllowed` (the
    /// policy no longer lets `source` reach `destination`) or `TooLarge` (it will never fit
    /// the uplink): drop it.
    pub fn replay(
        &mut self,
        now: Timestamp,
        source: NodeId,
        destination: NodeId,
        packet: Bytes,
    ) -> Result<(LinkId, RoutingMessage), RouteReason> {
        let Some((up, cloud)) = self.uplink() else { return Err(RouteReason::UplinkDown) };
        if cloud != destination {
            return Err(RouteReason::UplinkDown);
        }
        if !self.policy.allows(&source, LinkKind::Device, &destination, LinkKind::Uplink) {
            return Err(RouteReason::NotAllowed);
        }
        if self.links.get(&up).is_some_and(|l| {
            let len = Message::Deliver { route: 0, packet: &packet }.encoded_len();
            // The handle may take up to 5 B where 0 takes 1.
            len.saturating_add(4) > l.max_message
        }) {
            return Err(RouteReason::TooLarge);
        }
        let handle = self.announce(now, up, source).ok_or(RouteReason::Congested)?;
        bump(&mut self.stats.replayed);
        Ok((up, RoutingMessage::Deliver { route: handle, packet }))
    }

    /// The policy.
    pub const fn policy(&self) -> &P {
        &self.policy
    }

    /// The policy, to change it. A change applies to the next `Forward` and the next
    /// announcement; it withdraws nothing announced already (revoke the node for that).
    pub fn policy_mut(&mut self) -> &mut P {
        &mut self.policy
    }

    /// The bounds.
    pub const fn limits(&self) -> &RelayLimits {
        &self.limits
    }

    /// A link finished its handshake and was authorized. `peer` = `node_id` of its remote
    /// static key (spec §15.2); `lossy` = a datagram-mode link (announcements repeat, spec
    /// §16.3); `max_message` = the largest message one transport packet to the peer carries
    /// (`Session::max_plaintext_len`; a smaller value only makes `TooLarge` come earlier).
    ///
    /// Queues announcements (spec §16.3): on a device link, `Route` for the cloud if the uplink
    /// is up, and `Route` for the device on the uplink; on the uplink, `Route` for every
    /// attached device, and `Route` for the cloud on each device link that lacks it.
    ///
    /// A node that is already attached over another link of the same kind is re-attaching
    /// (spec §16.4.1): the newest link wins. The older link is forgotten (later calls naming it
    /// are no-ops or [`Verdict::UnknownLink`]; the caller closes it), without `Withdraw`: the
    /// node is still attached and keeps its handle on the other side. Likewise a second uplink
    /// replaces the first.
    ///
    /// # Errors
    /// [`RelayError`]; nothing changed, close the link.
    pub fn link_up(
        &mut self,
        now: Timestamp,
        link: LinkId,
        peer: NodeId,
        kind: LinkKind,
        lossy: bool,
        max_message: usize,
    ) -> Result<(), RelayError> {
        if self.links.contains_key(&link) {
            return Err(RelayError::DuplicateLink(link));
        }
        // spec §16.4.1: an uplink back to the same cloud after an outage.
        let back = kind == LinkKind::Uplink && self.uplink.is_none() && self.cloud == Some(peer);
        let replaced = match kind {
            LinkKind::Device => {
                if self.cloud == Some(peer) {
                    return Err(RelayError::NodeConflict);
                }
                self.nodes.get(&peer).copied()
            }
            LinkKind::Uplink => {
                let on = self.nodes.get(&peer).and_then(|l| self.links.get(l));
                if on.is_some_and(|l| l.kind == LinkKind::Device) {
                    return Err(RelayError::NodeConflict);
                }
                self.uplink
            }
        };
        if replaced.is_none() && self.links.len() >= self.limits.max_links {
            return Err(RelayError::TooManyLinks);
        }
        if let Some(old) = replaced {
            self.forget_link(old);
        }
        self.links.insert(
            link,
            Link {
                peer,
                kind,
                lossy,
                max_message,
                table: RouteTable::new(self.limits.max_routes_per_link, lossy),
                updates: BTreeMap::new(),
                notices: VecDeque::new(),
                timer: None,
            },
        );
        self.nodes.insert(peer, link);
        match kind {
            LinkKind::Device => {
                if let (Some(up), Some(cloud)) = (self.uplink, self.cloud) {
                    if self.related(&peer, &cloud) {
                        let _ = self.announce(now, link, cloud);
                        let _ = self.announce(now, up, peer);
                    }
                }
            }
            LinkKind::Uplink => {
                let devices = self.device_links();
                if let Some(old) = self.cloud.filter(|c| *c != peer) {
                    // spec §16.4.1: a different cloud; the old one's routes go.
                    for (id, _) in &devices {
                        self.withdraw(now, *id, &old, RouteReason::Detached);
                    }
                }
                self.uplink = Some(link);
                self.cloud = Some(peer);
                for (id, device) in devices {
                    if self.related(&device, &peer) {
                        let _ = self.announce(now, link, device);
                        let route = self.announce(now, id, peer);
                        if let Some((route, l)) = route.filter(|_| back).zip(self.links.get_mut(&id)) {
                            // The device was told UplinkDown: the same binding again tells it
                            // the cloud is reachable (spec §17.4 rule 4).
                            l.queue_route(route, peer);
                            self.ready.insert(id);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The link closed (or failed). A device's handle is withdrawn on the uplink
    /// (`Withdraw { Detached }`, spec §16.3). The uplink's namespaces end with it; every
    /// device link keeps the cloud's binding (the uplink comes back with the same cloud) and
    /// is told `Unreachable { UplinkDown }` for it (spec §16.5 MAY, rate limited; §16.4.1).
    /// Unknown (or already replaced) links: no-op.
    pub fn link_down(&mut self, now: Timestamp, link: LinkId) {
        let Some(l) = self.forget_link(link) else { return };
        match l.kind {
            LinkKind::Device => {
                if let Some(up) = self.uplink {
                    self.withdraw(now, up, &l.peer, RouteReason::Detached);
                }
            }
            LinkKind::Uplink => {
                for (id, _) in self.device_links() {
                    let Some(route) = self.links.get(&id).and_then(|d| d.table.route_of(&l.peer)) else { continue };
                    self.notice(now, id, route, RouteReason::UplinkDown);
                }
            }
        }
    }

    /// A node's credentials were revoked (spec §15.8): `Withdraw { Revoked }` of it on every
    /// link that announced it, and its own link is forgotten at once (later envelopes from it
    /// are [`Verdict::UnknownLink`]); the caller closes that link with `Close { Revoked }`.
    /// Revoking the cloud withdraws it from every device link and forgets it and the uplink.
    /// Nodes the relay does not know: no-op.
    pub fn revoke(&mut self, now: Timestamp, node: &NodeId) {
        if self.cloud.as_ref() == Some(node) {
            for (id, _) in self.device_links() {
                self.withdraw(now, id, node, RouteReason::Revoked);
            }
            if let Some(up) = self.uplink {
                self.forget_link(up);
            }
            self.cloud = None;
            return;
        }
        // spec §17.9: a revoked source's stored packets are dropped (the caller's spool).
        self.spooling.retain(|(src, _)| src != node);
        let Some(&id) = self.nodes.get(node) else { return };
        self.forget_link(id);
        if let Some(up) = self.uplink {
            self.withdraw(now, up, node, RouteReason::Revoked);
        }
    }

    /// A routing message arrived on `link`. `Forward` runs spec §16.4 steps 1–5; whatever
    /// else an endpoint sends a relay (`Route`, `Withdraw`, `Deliver`, `Unreachable`) is
    /// dropped and counted (`NotARelay`, spec §16.7). Drain [`poll_output`](Self::poll_output)
    /// before sending a [`Verdict::Forward`]'s `Deliver`.
    pub fn on_routing(&mut self, now: Timestamp, link: LinkId, msg: RoutingMessage) -> Verdict {
        let Some(l_in) = self.links.get_mut(&link) else {
            bump(&mut self.stats.unknown_link);
            return Verdict::UnknownLink;
        };
        let RoutingMessage::Forward { route, packet } = msg else {
            bump(&mut self.stats.not_a_relay);
            return Verdict::Dropped(RoutingError::NotARelay);
        };
        let (source, source_kind) = (l_in.peer, l_in.kind);
        // Step 1. The peer proves it knows the handle: its announcement stops repeating.
        let was_unused = l_in.table.needs_announcement(route);
        let Ok(dst) = l_in.table.on_forward(route) else {
            return self.drop_forward(now, link, route, RoutingError::UnknownRoute(route));
        };
        if was_unused {
            reschedule(&mut self.timers, link, l_in);
        }
        // Step 2.
        let dst_kind = if self.cloud == Some(dst) { LinkKind::Uplink } else { LinkKind::Device };
        if !self.policy.allows(&source, source_kind, &dst, dst_kind) {
            return self.drop_forward(now, link, route, RoutingError::Unreachable(RouteReason::NotAllowed));
        }
        // spec §17.9, order: behind what the source already has in the spool. The spool holds
        // device packets only: a node on the uplink that was a device before (its pair still
        // marked) is not spooled.
        if source_kind == LinkKind::Device && self.spooling.contains(&(source, dst)) {
            if let Some(v) = self.spool(link, source, dst, route, &packet) {
                return v;
            }
        }
        // Step 3.
        let Some(&out) = self.nodes.get(&dst) else {
            let reason = if dst_kind == LinkKind::Uplink { RouteReason::UplinkDown } else { RouteReason::Detached };
            if reason == RouteReason::UplinkDown && self.custody {
                if let Some(v) = self.spool(link, source, dst, route, &packet) {
                    return v;
                }
            }
            return self.drop_forward(now, link, route, RoutingError::Unreachable(reason));
        };
        // Step 4: the handle of the link's peer, never anything the sender said.
        let Some(handle) = self.announce(now, out, source) else {
            return self.drop_forward(now, link, route, RoutingError::Unreachable(RouteReason::Congested));
        };
        // Step 5 (the queue is the caller's: `congested`).
        let Some(l_out) = self.links.get(&out) else {
            // `nodes` only names live links; kept as a drop rather than a panic.
            return self.drop_forward(now, link, route, RoutingError::Unreachable(RouteReason::Detached));
        };
        let len = Message::Deliver { route: handle, packet: &packet }.encoded_len();
        if len > l_out.max_message {
            return self.drop_forward(now, link, route, RoutingError::Unreachable(RouteReason::TooLarge));
        }
        bump(&mut self.stats.forwarded);
        self.stats.forwarded_bytes = self.stats.forwarded_bytes.saturating_add(packet.len() as u64);
        Verdict::Forward { link: out, msg: RoutingMessage::Deliver { route: handle, packet } }
    }

    /// The `Deliver` of a [`Verdict::Forward`] for a `Forward` naming `route` on `in_link`
    /// could not be queued (the out link's queue was full): answers `Unreachable { Congested }`
    /// on `in_link` (spec §16.4 step 5, rate limited). Unknown links: no-op.
    pub fn congested(&mut self, now: Timestamp, in_link: LinkId, route: u32) {
        if self.links.contains_key(&in_link) {
            self.stats.count_drop(RouteReason::Congested);
            self.notice(now, in_link, route, RouteReason::Congested);
        }
    }

    /// The largest message one packet of `link` carries changed (a re-handshake brought a new
    /// `max_packet_len`, spec §3.3). Unknown links: no-op.
    pub fn set_max_message(&mut self, link: LinkId, max_message: usize) {
        if let Some(l) = self.links.get_mut(&link) {
            l.max_message = max_message;
        }
    }

    /// The next message to send: `Route`, `Withdraw` or `Unreachable`, with its link. Call
    /// until `None` after every call that takes `&mut self`. A link's messages come in the
    /// order they must be sent (per handle a `Withdraw` before a `Route`; announcements before
    /// notices).
    pub fn poll_output(&mut self) -> Option<(LinkId, RoutingMessage)> {
        while let Some(&id) = self.ready.first() {
            if let Some(l) = self.links.get_mut(&id) {
                if let Some(mut entry) = l.updates.first_entry() {
                    let route = *entry.key();
                    let u = entry.get_mut();
                    let msg = if let Some(reason) = u.withdraw.take() {
                        bump(&mut self.stats.withdrawals);
                        Some(RoutingMessage::Withdraw { route, reason })
                    } else {
                        u.route.take().map(|node| {
                            bump(&mut self.stats.routes);
                            RoutingMessage::Route { route, node }
                        })
                    };
                    if u.withdraw.is_none() && u.route.is_none() {
                        entry.remove();
                    }
                    match msg {
                        Some(m) => return Some((id, m)),
                        None => continue,
                    }
                }
                if let Some((route, reason)) = l.notices.pop_front() {
                    bump(&mut self.stats.notices);
                    return Some((id, RoutingMessage::Unreachable { route, reason }));
                }
            }
            self.ready.remove(&id);
        }
        self.stored.poll_output()
    }

    /// When [`handle_timeout`](Self::handle_timeout) has work next: the next repetition of an
    /// unused announcement on a datagram link (spec §16.3), or the next `Stored` notice
    /// (spec §17.9).
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        let repeat = self.timers.first().map(|(t, _)| *t);
        match (repeat, self.stored.poll_timeout()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Queues the announcement repeats (spec §16.3) and the `Stored` notices (spec §17.9) due
    /// at `now`. Calling early does nothing.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        self.stored.handle_timeout(now);
        let due: Vec<LinkId> = self.timers.iter().take_while(|(t, _)| *t <= now).map(|(_, id)| *id).collect();
        for id in due {
            let Some(l) = self.links.get_mut(&id) else { continue };
            // Bounded: every announcement repeats at most ROUTE_ANNOUNCE_REPEATS times.
            while let Some((route, node)) = l.table.poll_repeat(now) {
                l.queue_route(route, node);
                bump(&mut self.stats.repeats);
                self.ready.insert(id);
            }
            reschedule(&mut self.timers, id, l);
        }
    }

    /// The counters.
    #[must_use]
    pub const fn stats(&self) -> &RelayStats {
        &self.stats
    }

    /// The attached devices (one link each).
    pub fn attached(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.links.values().filter(|l| l.kind == LinkKind::Device).map(|l| l.peer)
    }

    /// The link a node is attached over, if any (devices and the uplink's peer).
    #[must_use]
    pub fn link_of(&self, node: &NodeId) -> Option<LinkId> {
        self.nodes.get(node).copied()
    }

    /// The uplink and the cloud's node id, while the uplink is up.
    #[must_use]
    pub fn uplink(&self) -> Option<(LinkId, NodeId)> {
        let id = self.uplink?;
        self.links.get(&id).map(|l| (id, l.peer))
    }

    /// The cloud's node id: the uplink's peer, kept while the uplink reconnects.
    #[must_use]
    pub const fn cloud(&self) -> Option<NodeId> {
        self.cloud
    }

    /// Number of links.
    #[must_use]
    pub fn len(&self) -> usize {
        self.links.len()
    }

    /// Whether there are no links.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    /// Messages waiting in [`poll_output`](Self::poll_output), over all links (`Stored`
    /// ranges not yet due included).
    #[must_use]
    pub fn queued(&self) -> usize {
        self.links.values().map(Link::queued).sum::<usize>() + self.stored.waiting()
    }

    /// The `Stored` coalescer's counters (spec §17.9).
    #[must_use]
    pub const fn custody_stats(&self) -> &custody::CustodyStats {
        self.stored.stats()
    }

    /// The bindings the relay announced on `link` (handle, node), including those whose
    /// `Route` is still waiting in [`poll_output`](Self::poll_output); `None` for an unknown
    /// link.
    pub fn announced(&self, link: LinkId) -> Option<impl Iterator<Item = (u32, NodeId)> + '_> {
        self.links.get(&link).map(|l| l.table.iter())
    }

    // -------------------------------------------------------------------------------------

    /// Whether the relay announces `device` and `cloud` to each other: when either may send
    /// to the other (spec §16.4.1).
    fn related(&self, device: &NodeId, cloud: &NodeId) -> bool {
        self.policy.allows(device, LinkKind::Device, cloud, LinkKind::Uplink)
            || self.policy.allows(cloud, LinkKind::Uplink, device, LinkKind::Device)
    }

    fn device_links(&self) -> Vec<(LinkId, NodeId)> {
        self.links.iter().filter(|(_, l)| l.kind == LinkKind::Device).map(|(id, l)| (*id, l.peer)).collect()
    }

    /// Removes a link's state (its pending output goes with it) and returns it.
    fn forget_link(&mut self, id: LinkId) -> Option<Link> {
        let l = self.links.remove(&id)?;
        if self.nodes.get(&l.peer) == Some(&id) {
            self.nodes.remove(&l.peer);
        }
        if self.uplink == Some(id) {
            self.uplink = None;
        }
        if let Some(t) = l.timer {
            self.timers.remove(&(t, id));
        }
        self.ready.remove(&id);
        self.stored.forget(id);
        Some(l)
    }

    /// [`Verdict::Spool`] for a routed TRANSPORT packet (spec §17.9, §16.2), marking its pair;
    /// `None` for anything else (handshake packets are not stored).
    fn spool(
        &mut self,
        link: LinkId,
        source: NodeId,
        destination: NodeId,
        route: u32,
        packet: &Bytes,
    ) -> Option<Verdict> {
        let Ok(Packet::Transport(header, _)) = wire::parse(Mode::Routed, wire::MAX_PACKET_LEN, packet) else {
            return None;
        };
        let counter_lo = header.counter_lo?;
        self.spooling.insert((source, destination));
        bump(&mut self.stats.spooled);
        self.stats.spooled_bytes = self.stats.spooled_bytes.saturating_add(packet.len() as u64);
        Some(Verdict::Spool {
            link,
            source,
            destination,
            route,
            generation: u8::from(header.generation),
            counter_lo,
            packet: packet.clone(),
        })
    }

    /// Announces `node` on `link` (spec §16.3) and returns its handle. A new handle queues a
    /// `Route`; so does an unused one on a datagram link, to go in front of a `Deliver`.
    /// `None`: the link's table is full (or the link is unknown).
    fn announce(&mut self, now: Timestamp, link: LinkId, node: NodeId) -> Option<u32> {
        let l = self.links.get_mut(&link)?;
        let Ok(a) = l.table.announce(node, now) else {
            bump(&mut self.stats.table_full);
            return None;
        };
        if a.new || l.table.needs_announcement(a.route) {
            l.queue_route(a.route, node);
            self.ready.insert(link);
        }
        if a.new {
            reschedule(&mut self.timers, link, l);
        }
        Some(a.route)
    }

    /// Withdraws `node` on `link`, if announced there.
    fn withdraw(&mut self, now: Timestamp, link: LinkId, node: &NodeId, reason: RouteReason) {
        let Some(l) = self.links.get_mut(&link) else { return };
        let Some(route) = l.table.withdraw(node, now) else { return };
        l.queue_withdraw(route, reason);
        self.ready.insert(link);
        reschedule(&mut self.timers, link, l);
    }

    /// Queues `Unreachable { route, reason }` on `link` if the rate limit allows (spec §16.5).
    fn notice(&mut self, now: Timestamp, link: LinkId, route: u32, reason: RouteReason) {
        let Some(l) = self.links.get_mut(&link) else { return };
        if !l.table.allow_notice(route, now) {
            bump(&mut self.stats.notices_limited);
            return;
        }
        if l.notices.len() >= self.limits.max_notices_per_link {
            bump(&mut self.stats.notices_overflowed);
            if l.notices.pop_front().is_none() {
                return; // a bound of zero: no notices at all
            }
        }
        l.notices.push_back((route, reason));
        self.ready.insert(link);
    }

    fn drop_forward(&mut self, now: Timestamp, link: LinkId, route: u32, error: RoutingError) -> Verdict {
        let reason = match error {
            RoutingError::Unreachable(r) => r,
            _ => RouteReason::UnknownRoute,
        };
        self.stats.count_drop(reason);
        self.notice(now, link, route, reason);
        Verdict::Dropped(error)
    }
}

#[cfg(test)]
mod tests {
    use alloc::vec;

    use bytes::Bytes;
    use proptest::prelude::*;
    use proptest::test_runner::{Config as ProptestConfig, RngAlgorithm, RngSeed, TestRunner};

    use super::*;
    use crate::config::HANDSHAKE_RTO;
    use crate::routing::{PeerRoutes, ROUTE_ANNOUNCE_REPEATS, UNREACHABLE_INTERVAL};
    use crate::time::Duration;

    const T0: Timestamp = Timestamp::from_millis(10_000);
    const CLOUD: NodeId = NodeId([0xc0; 16]);
    const UP: LinkId = 100;
    const MTU: usize = 1_400;

    fn dev(i: u8) -> NodeId {
        NodeId([i; 16])
    }

    fn relay() -> Relay {
        Relay::new(RelayLimits::default())
    }

    fn at(ms: u64) -> Timestamp {
        T0 + Duration::from_millis(ms)
    }

    fn drain<P: Policy>(r: &mut Relay<P>) -> Vec<(LinkId, RoutingMessage)> {
        let mut out = Vec::new();
        for _ in 0..10_000 {
            match r.poll_output() {
                Some(m) => out.push(m),
                None => return out,
            }
        }
        panic!("poll_output does not end")
    }

    fn forward(route: u32, packet: &Bytes) -> RoutingMessage {
        RoutingMessage::Forward { route, packet: packet.clone() }
    }

    fn route(link: LinkId, route: u32, node: NodeId) -> (LinkId, RoutingMessage) {
        (link, RoutingMessage::Route { route, node })
    }

    fn withdraw(link: LinkId, route: u32, reason: RouteReason) -> (LinkId, RoutingMessage) {
        (link, RoutingMessage::Withdraw { route, reason })
    }

    fn unreachable(link: LinkId, route: u32, reason: RouteReason) -> (LinkId, RoutingMessage) {
        (link, RoutingMessage::Unreachable { route, reason })
    }

    fn deliver(link: LinkId, route: u32, packet: &Bytes) -> Verdict {
        Verdict::Forward { link, msg: RoutingMessage::Deliver { route, packet: packet.clone() } }
    }

    fn dropped(reason: RouteReason) -> Verdict {
        Verdict::Dropped(RoutingError::Unreachable(reason))
    }

    /// Uplink to the cloud on `UP`, then devices 1 and 2 on links 1 and 2 (stream links).
    fn gateway() -> Relay {
        let mut r = relay();
        r.link_up(T0, UP, CLOUD, LinkKind::Uplink, false, MTU).unwrap();
        r.link_up(T0, 1, dev(1), LinkKind::Device, false, MTU).unwrap();
        r.link_up(T0, 2, dev(2), LinkKind::Device, false, MTU).unwrap();
        let _ = drain(&mut r);
        r
    }

    #[test]
    fn devices_attached_before_the_uplink_are_announced_when_it_comes_up() {
        let mut r = relay();
        r.link_up(T0, 1, dev(1), LinkKind::Device, false, MTU).unwrap();
        r.link_up(T0, 2, dev(2), LinkKind::Device, false, MTU).unwrap();
        assert_eq!(drain(&mut r), [], "nothing to announce without an uplink");
        r.link_up(T0, UP, CLOUD, LinkKind::Uplink, false, MTU).unwrap();
        assert_eq!(drain(&mut r), [route(1, 0, CLOUD), route(2, 0, CLOUD), route(UP, 0, dev(1)), route(UP, 1, dev(2))]);
        assert_eq!(r.uplink(), Some((UP, CLOUD)));
        assert_eq!(r.attached().collect::<Vec<_>>(), [dev(1), dev(2)]);
        assert_eq!(r.stats().routes, 4);
    }

    #[test]
    fn devices_attached_after_the_uplink_are_announced_as_they_come() {
        let mut r = relay();
        r.link_up(T0, UP, CLOUD, LinkKind::Uplink, false, MTU).unwrap();
        assert_eq!(drain(&mut r), []);
        r.link_up(T0, 1, dev(1), LinkKind::Device, false, MTU).unwrap();
        assert_eq!(drain(&mut r), [route(1, 0, CLOUD), route(UP, 0, dev(1))]);
        r.link_up(T0, 2, dev(2), LinkKind::Device, false, MTU).unwrap();
        assert_eq!(drain(&mut r), [route(2, 0, CLOUD), route(UP, 1, dev(2))]);
    }

    #[test]
    fn a_forward_becomes_a_deliver_naming_the_in_links_peer_both_ways() {
        let mut r = gateway();
        let packet = Bytes::from_static(&[0x10, 0, 0, 1, 0xee, 0xee]);
        // Device 2 → cloud: the Deliver names device 2's handle on the uplink (1), whatever
        // device 2 might wish it named.
        let v = r.on_routing(T0, 2, forward(0, &packet));
        assert_eq!(v, deliver(UP, 1, &packet));
        let Verdict::Forward { msg: RoutingMessage::Deliver { packet: p, .. }, .. } = v else { unreachable!() };
        assert_eq!(p.as_ptr(), packet.as_ptr(), "the packet is passed on, not copied");
        // Cloud → device 1: named by its handle on the uplink (0); the Deliver names the
        // cloud's handle on link 1.
        assert_eq!(r.on_routing(T0, UP, forward(0, &packet)), deliver(1, 0, &packet));
        assert_eq!(drain(&mut r), []);
        assert_eq!((r.stats().forwarded, r.stats().forwarded_bytes), (2, 12));
    }

    #[test]
    fn a_device_cannot_spoof_another_source() {
        let mut r = gateway();
        let packet = Bytes::from_static(b"e2e");
        // The only handle a device link holds is the cloud's: naming device 1's uplink handle
        // (0 on the uplink, but nothing else than the cloud on link 2) goes nowhere new.
        assert_eq!(r.announced(2).unwrap().collect::<Vec<_>>(), [(0, CLOUD)]);
        for h in [1, 2, u32::MAX] {
            assert_eq!(r.on_routing(T0, 2, forward(h, &packet)), Verdict::Dropped(RoutingError::UnknownRoute(h)));
        }
        // However often and in whatever order the devices send, each Deliver names the sender's
        // own link peer, as the cloud resolves it from the announcements it read.
        let mut cloud = PeerRoutes::new(16);
        for (route, node) in r.announced(UP).unwrap() {
            cloud.learn(route, node).unwrap();
        }
        for link in [2, 1, 2, 2, 1] {
            let Verdict::Forward { link: UP, msg: RoutingMessage::Deliver { route, .. } } =
                r.on_routing(T0, link, forward(0, &packet))
            else {
                panic!("not forwarded to the uplink")
            };
            assert_eq!(cloud.resolve(route), Ok(dev(link as u8)));
        }
    }

    #[test]
    fn step_1_an_unknown_handle_is_answered_unknown_route() {
        let mut r = gateway();
        let packet = Bytes::from_static(b"x");
        assert_eq!(r.on_routing(T0, 1, forward(9, &packet)), Verdict::Dropped(RoutingError::UnknownRoute(9)));
        assert_eq!(drain(&mut r), [unreachable(1, 9, RouteReason::UnknownRoute)]);
        // The cloud names a handle the relay never gave out.
        assert_eq!(r.on_routing(T0, UP, forward(7, &packet)), Verdict::Dropped(RoutingError::UnknownRoute(7)));
        assert_eq!(drain(&mut r), [unreachable(UP, 7, RouteReason::UnknownRoute)]);
        assert_eq!(r.stats().dropped(RouteReason::UnknownRoute), 2);
    }

    #[test]
    fn step_2_what_the_policy_forbids_is_answered_not_allowed() {
        // Device 1 may receive from the cloud but not send; device 3 is not related at all.
        let policy = |from: &NodeId, from_kind: LinkKind, to: &NodeId, to_kind: LinkKind| {
            from_kind != to_kind && *from != dev(1) && *from != dev(3) && *to != dev(3)
        };
        let mut r = Relay::with_policy(RelayLimits::default(), policy);
        r.link_up(T0, UP, CLOUD, LinkKind::Uplink, false, MTU).unwrap();
        r.link_up(T0, 1, dev(1), LinkKind::Device, false, MTU).unwrap();
        r.link_up(T0, 3, dev(3), LinkKind::Device, false, MTU).unwrap();
        assert_eq!(drain(&mut r), [route(1, 0, CLOUD), route(UP, 0, dev(1))], "device 3 is not announced");
        let packet = Bytes::from_static(b"x");
        assert_eq!(r.on_routing(T0, 1, forward(0, &packet)), dropped(RouteReason::NotAllowed));
        assert_eq!(drain(&mut r), [unreachable(1, 0, RouteReason::NotAllowed)]);
        assert_eq!(r.on_routing(T0, UP, forward(0, &packet)), deliver(1, 0, &packet));
        assert_eq!(r.stats().not_allowed, 1);
    }

    #[test]
    fn the_default_policy_lets_devices_reach_only_the_cloud() {
        let p = CloudOnly;
        assert!(p.allows(&dev(1), LinkKind::Device, &CLOUD, LinkKind::Uplink));
        assert!(p.allows(&CLOUD, LinkKind::Uplink, &dev(1), LinkKind::Device));
        assert!(!p.allows(&dev(1), LinkKind::Device, &dev(2), LinkKind::Device));
        assert!(!p.allows(&CLOUD, LinkKind::Uplink, &CLOUD, LinkKind::Uplink));
    }

    #[test]
    fn step_3_the_cloud_is_uplink_down_while_the_uplink_reconnects() {
        let mut r = gateway();
        r.link_down(T0, UP);
        // spec §16.5 MAY: every device hears it unprompted, once.
        assert_eq!(
            drain(&mut r),
            [unreachable(1, 0, RouteReason::UplinkDown), unreachable(2, 0, RouteReason::UplinkDown)]
        );
        assert_eq!((r.uplink(), r.cloud()), (None, Some(CLOUD)));
        // The binding stays; Forwards are dropped, and answered within the rate limit only.
        assert_eq!(r.announced(1).unwrap().collect::<Vec<_>>(), [(0, CLOUD)]);
        let packet = Bytes::from_static(b"x");
        assert_eq!(r.on_routing(at(500), 1, forward(0, &packet)), dropped(RouteReason::UplinkDown));
        assert_eq!(drain(&mut r), []);
        assert_eq!(r.on_routing(at(1_000), 1, forward(0, &packet)), dropped(RouteReason::UplinkDown));
        assert_eq!(drain(&mut r), [unreachable(1, 0, RouteReason::UplinkDown)]);
        assert_eq!(r.stats().uplink_down, 2);
        assert_eq!(r.stats().notices_limited, 1);
        // A device attaching now learns of the cloud when the uplink is back.
        r.link_up(at(1_000), 3, dev(3), LinkKind::Device, false, MTU).unwrap();
        assert_eq!(drain(&mut r), []);
    }

    #[test]
    fn step_4_a_full_table_on_the_out_link_is_congested_until_room_is_made() {
        let limits = RelayLimits { max_routes_per_link: 1, ..RelayLimits::default() };
        let mut r = Relay::new(limits);
        r.link_up(T0, UP, CLOUD, LinkKind::Uplink, false, MTU).unwrap();
        r.link_up(T0, 1, dev(1), LinkKind::Device, false, MTU).unwrap();
        r.link_up(T0, 2, dev(2), LinkKind::Device, false, MTU).unwrap();
        assert_eq!(drain(&mut r), [route(1, 0, CLOUD), route(2, 0, CLOUD), route(UP, 0, dev(1))]);
        assert_eq!(r.stats().table_full, 1);
        let packet = Bytes::from_static(b"x");
        assert_eq!(r.on_routing(T0, 2, forward(0, &packet)), dropped(RouteReason::Congested));
        assert_eq!(drain(&mut r), [unreachable(2, 0, RouteReason::Congested)]);
        assert_eq!(r.on_routing(T0, 1, forward(0, &packet)), deliver(UP, 0, &packet));
        // Device 1 leaves; device 2's next Forward announces it first (handle 0 waits out
        // ROUTE_REUSE_DELAY), and the Route is in the output before the Deliver is sent.
        r.link_down(T0, 1);
        assert_eq!(drain(&mut r), [withdraw(UP, 0, RouteReason::Detached)]);
        let v = r.on_routing(at(1), 2, forward(0, &packet));
        assert_eq!(drain(&mut r), [route(UP, 1, dev(2))]);
        assert_eq!(v, deliver(UP, 1, &packet));
        assert_eq!(r.stats().congested, 1);
    }

    #[test]
    fn step_5_an_envelope_larger_than_the_out_link_carries_is_too_large() {
        let mut r = relay();
        r.link_up(T0, UP, CLOUD, LinkKind::Uplink, false, 64).unwrap();
        r.link_up(T0, 1, dev(1), LinkKind::Device, false, MTU).unwrap();
        let _ = drain(&mut r);
        // Deliver = kind 1 + handle 1 + length 1 + packet.
        let fits = Bytes::from(vec![7u8; 61]);
        assert_eq!(r.on_routing(T0, 1, forward(0, &fits)), deliver(UP, 0, &fits));
        let over = Bytes::from(vec![7u8; 62]);
        assert_eq!(r.on_routing(T0, 1, forward(0, &over)), dropped(RouteReason::TooLarge));
        assert_eq!(drain(&mut r), [unreachable(1, 0, RouteReason::TooLarge)]);
        // A re-handshake raised the limit.
        r.set_max_message(UP, 65);
        assert_eq!(r.on_routing(at(1), 1, forward(0, &over)), deliver(UP, 0, &over));
        assert_eq!(r.stats().too_large, 1);
    }

    #[test]
    fn congestion_reported_by_the_caller_is_answered_within_the_rate_limit() {
        let mut r = gateway();
        r.congested(T0, 1, 0);
        r.congested(at(999), 1, 0);
        assert_eq!(drain(&mut r), [unreachable(1, 0, RouteReason::Congested)]);
        r.congested(at(1_000), 1, 0);
        assert_eq!(drain(&mut r), [unreachable(1, 0, RouteReason::Congested)]);
        assert_eq!((r.stats().congested, r.stats().notices, r.stats().notices_limited), (3, 2, 1));
    }

    #[test]
    fn messages_only_relays_send_are_dropped_as_not_a_relay() {
        let mut r = gateway();
        let packet = Bytes::from_static(b"x");
        let msgs = [
            RoutingMessage::Route { route: 0, node: dev(9) },
            RoutingMessage::Withdraw { route: 0, reason: RouteReason::Detached },
            RoutingMessage::Deliver { route: 0, packet },
            RoutingMessage::Unreachable { route: 0, reason: RouteReason::UplinkDown },
        ];
        for link in [1, UP] {
            for m in &msgs {
                assert_eq!(r.on_routing(T0, link, m.clone()), Verdict::Dropped(RoutingError::NotARelay));
            }
        }
        assert_eq!(drain(&mut r), []);
        assert_eq!(r.stats().not_a_relay, 8);
        assert_eq!(r.announced(UP).unwrap().count(), 2, "nothing was learned");
    }

    #[test]
    fn a_device_that_detaches_is_withdrawn_from_the_uplink() {
        let mut r = gateway();
        r.link_down(T0, 1);
        assert_eq!(drain(&mut r), [withdraw(UP, 0, RouteReason::Detached)]);
        assert_eq!(r.attached().collect::<Vec<_>>(), [dev(2)]);
        let packet = Bytes::from_static(b"x");
        assert_eq!(r.on_routing(T0, UP, forward(0, &packet)), Verdict::Dropped(RoutingError::UnknownRoute(0)));
        assert_eq!(r.on_routing(T0, 1, forward(0, &packet)), Verdict::UnknownLink);
        assert_eq!(r.stats().withdrawals, 1);
    }

    #[test]
    fn revocation_withdraws_the_node_and_forgets_its_link() {
        let mut r = gateway();
        r.revoke(T0, &dev(1));
        assert_eq!(drain(&mut r), [withdraw(UP, 0, RouteReason::Revoked)]);
        let packet = Bytes::from_static(b"x");
        assert_eq!(r.on_routing(T0, 1, forward(0, &packet)), Verdict::UnknownLink);
        // The link's close comes later and adds nothing.
        r.link_down(T0, 1);
        assert_eq!(drain(&mut r), []);
        // The cloud revoked: its route goes from every device link, and the uplink is forgotten.
        r.revoke(T0, &CLOUD);
        assert_eq!(drain(&mut r), [withdraw(2, 0, RouteReason::Revoked)]);
        assert_eq!((r.uplink(), r.cloud()), (None, None));
        assert_eq!(r.on_routing(T0, 2, forward(0, &packet)), Verdict::Dropped(RoutingError::UnknownRoute(0)));
        r.revoke(T0, &dev(77));
        r.link_down(T0, UP);
        assert_eq!(drain(&mut r), [unreachable(2, 0, RouteReason::UnknownRoute)]);
    }

    #[test]
    fn unreachable_notices_are_limited_per_link_and_handle_and_made_up_handles_share_one() {
        let policy =
            |from: &NodeId, from_kind: LinkKind, _: &NodeId, to_kind: LinkKind| from_kind != to_kind && *from != dev(1);
        let mut r = Relay::with_policy(RelayLimits::default(), policy);
        r.link_up(T0, UP, CLOUD, LinkKind::Uplink, false, MTU).unwrap();
        r.link_up(T0, 1, dev(1), LinkKind::Device, false, MTU).unwrap();
        r.link_up(T0, 2, dev(2), LinkKind::Device, false, MTU).unwrap();
        let _ = drain(&mut r);
        let packet = Bytes::from_static(b"x");
        for t in [0, 300, 999] {
            for h in [0, 7, 8, u32::MAX] {
                let _ = r.on_routing(at(t), 1, forward(h, &packet));
            }
            let _ = r.on_routing(at(t), 2, forward(5, &packet));
        }
        assert_eq!(
            drain(&mut r),
            [
                unreachable(1, 0, RouteReason::NotAllowed),
                unreachable(1, 7, RouteReason::UnknownRoute),
                unreachable(2, 5, RouteReason::UnknownRoute),
            ]
        );
        for h in [u32::MAX, 0] {
            let _ = r.on_routing(at(1_000), 1, forward(h, &packet));
        }
        assert_eq!(
            drain(&mut r),
            [unreachable(1, u32::MAX, RouteReason::UnknownRoute), unreachable(1, 0, RouteReason::NotAllowed)]
        );
        assert_eq!(r.stats().notices_limited, 15 - 3);
        assert!(UNREACHABLE_INTERVAL == Duration::from_millis(1_000));
    }

    #[test]
    fn announcements_repeat_on_datagram_links_until_the_peer_names_the_handle() {
        let mut r = relay();
        r.link_up(T0, UP, CLOUD, LinkKind::Uplink, false, MTU).unwrap();
        r.link_up(T0, 1, dev(1), LinkKind::Device, true, MTU).unwrap();
        assert_eq!(drain(&mut r), [route(1, 0, CLOUD), route(UP, 0, dev(1))]);
        assert_eq!(r.poll_timeout(), Some(T0 + HANDSHAKE_RTO));
        r.handle_timeout(at(999));
        assert_eq!(drain(&mut r), [], "not due yet");
        r.handle_timeout(T0 + HANDSHAKE_RTO);
        assert_eq!(drain(&mut r), [route(1, 0, CLOUD)]);
        assert_eq!(r.poll_timeout(), Some(T0 + HANDSHAKE_RTO + HANDSHAKE_RTO.doubled()));
        // Until then the Route also goes in front of every Deliver naming it.
        let packet = Bytes::from_static(b"x");
        let v = r.on_routing(at(1_500), UP, forward(0, &packet));
        assert_eq!(drain(&mut r), [route(1, 0, CLOUD)]);
        assert_eq!(v, deliver(1, 0, &packet));
        // The device names the handle: no more repeats, nothing in front.
        assert_eq!(r.on_routing(at(1_600), 1, forward(0, &packet)), deliver(UP, 0, &packet));
        assert_eq!(r.poll_timeout(), None);
        assert_eq!(r.on_routing(at(1_700), UP, forward(0, &packet)), deliver(1, 0, &packet));
        r.handle_timeout(at(60_000));
        assert_eq!(drain(&mut r), []);
        assert_eq!(r.stats().repeats, 1);
    }

    #[test]
    fn an_unused_announcement_is_repeated_a_bounded_number_of_times() {
        let mut r = relay();
        r.link_up(T0, 1, dev(1), LinkKind::Device, true, MTU).unwrap();
        r.link_up(T0, UP, CLOUD, LinkKind::Uplink, true, MTU).unwrap();
        let _ = drain(&mut r);
        let mut repeats = 0;
        for _ in 0..32 {
            let Some(t) = r.poll_timeout() else { break };
            r.handle_timeout(t);
            repeats += drain(&mut r).len();
        }
        // Both sides' announcements, ROUTE_ANNOUNCE_REPEATS times each.
        assert_eq!(repeats, 2 * usize::from(ROUTE_ANNOUNCE_REPEATS));
        assert_eq!(r.poll_timeout(), None);
    }

    #[test]
    fn pending_notices_are_bounded_and_the_oldest_go_first() {
        let limits = RelayLimits { max_notices_per_link: 2, ..RelayLimits::default() };
        let mut r = Relay::new(limits);
        r.link_up(T0, 1, dev(1), LinkKind::Device, false, MTU).unwrap();
        let packet = Bytes::from_static(b"x");
        for s in 0..10u32 {
            let _ = r.on_routing(at(u64::from(s) * 1_000), 1, forward(s, &packet));
            assert!(r.queued() <= 2);
        }
        assert_eq!(r.stats().notices_overflowed, 8);
        assert_eq!(
            drain(&mut r),
            [unreachable(1, 8, RouteReason::UnknownRoute), unreachable(1, 9, RouteReason::UnknownRoute)]
        );
    }

    #[test]
    fn announcements_of_a_link_that_does_not_drain_are_coalesced_and_bounded() {
        let limits = RelayLimits { max_routes_per_link: 4, ..RelayLimits::default() };
        let mut r = Relay::new(limits);
        r.link_up(T0, UP, CLOUD, LinkKind::Uplink, false, MTU).unwrap();
        // Devices come and go, nobody drains; time passes so handles are reused.
        for i in 0..2_000u64 {
            let (now, link) = (T0 + Duration::from_secs(i), 1_000 + i);
            r.link_up(now, link, dev((i % 7) as u8 + 1), LinkKind::Device, false, MTU).unwrap();
            if i % 3 != 0 {
                r.link_down(now, link);
            }
            // Per link at most one Withdraw and one Route per handle (below 2 * 4 + 1),
            // on every device link the cloud's Route.
            assert!(r.queued() <= 2 * (2 * 4 + 1) + (r.len() - 1), "{} queued", r.queued());
        }
        // The cloud, reading what is left, ends up with exactly the relay's bindings.
        let mut cloud = PeerRoutes::new(16);
        for (l, m) in drain(&mut r) {
            if l != UP {
                continue;
            }
            match m {
                RoutingMessage::Route { route, node } => cloud.learn(route, node).unwrap(),
                RoutingMessage::Withdraw { route, .. } => {
                    let _ = cloud.forget(route);
                }
                m => panic!("{m:?}"),
            }
        }
        assert_eq!(cloud.iter().collect::<Vec<_>>(), r.announced(UP).unwrap().collect::<Vec<_>>());
        let attached: Vec<NodeId> = r.attached().collect();
        assert!(r.announced(UP).unwrap().all(|(_, n)| attached.contains(&n)));
    }

    #[test]
    fn a_device_that_reattaches_keeps_its_handle_and_its_old_link_is_forgotten() {
        let mut r = gateway();
        let packet = Bytes::from_static(b"x");
        r.link_up(T0, 11, dev(1), LinkKind::Device, false, MTU).unwrap();
        // The new link learns the cloud; the cloud hears nothing: device 1 never left.
        assert_eq!(drain(&mut r), [route(11, 0, CLOUD)]);
        assert_eq!(r.link_of(&dev(1)), Some(11));
        assert_eq!(r.attached().collect::<Vec<_>>(), [dev(2), dev(1)]);
        assert_eq!(r.on_routing(T0, 1, forward(0, &packet)), Verdict::UnknownLink);
        assert_eq!(r.on_routing(T0, 11, forward(0, &packet)), deliver(UP, 0, &packet));
        assert_eq!(r.on_routing(T0, UP, forward(0, &packet)), deliver(11, 0, &packet));
        // The old link's late close changes nothing; the new one's withdraws.
        r.link_down(T0, 1);
        assert_eq!(drain(&mut r), []);
        r.link_down(T0, 11);
        assert_eq!(drain(&mut r), [withdraw(UP, 0, RouteReason::Detached)]);
        assert_eq!(r.stats().unknown_link, 1);
    }

    #[test]
    fn the_uplink_comes_back_with_the_same_cloud_or_another() {
        let mut r = gateway();
        let packet = Bytes::from_static(b"x");
        r.link_down(T0, UP);
        let _ = drain(&mut r);
        // Same cloud: the devices keep their binding, and hear it again (the route is back);
        // the new uplink learns the devices.
        r.link_up(at(5_000), 101, CLOUD, LinkKind::Uplink, false, MTU).unwrap();
        assert_eq!(
            drain(&mut r),
            [route(1, 0, CLOUD), route(2, 0, CLOUD), route(101, 0, dev(1)), route(101, 1, dev(2))]
        );
        assert_eq!(r.on_routing(at(5_001), 1, forward(0, &packet)), deliver(101, 0, &packet));
        // A newer uplink replaces this one at once (no outage: nothing for the devices); the
        // old one's close is then a no-op.
        r.link_up(at(6_000), 102, CLOUD, LinkKind::Uplink, false, MTU).unwrap();
        assert_eq!(drain(&mut r), [route(102, 0, dev(1)), route(102, 1, dev(2))]);
        r.link_down(at(6_000), 101);
        assert_eq!(drain(&mut r), [], "no UplinkDown: the uplink is up");
        // Another cloud: the old one's route goes, the new one's comes.
        let other = NodeId([0xc1; 16]);
        r.link_up(at(7_000), 103, other, LinkKind::Uplink, false, MTU).unwrap();
        assert_eq!(
            drain(&mut r),
            [
                withdraw(1, 0, RouteReason::Detached),
                route(1, 1, other),
                withdraw(2, 0, RouteReason::Detached),
                route(2, 1, other),
                route(103, 0, dev(1)),
                route(103, 1, dev(2)),
            ]
        );
        assert_eq!(r.uplink(), Some((103, other)));
        assert_eq!(r.on_routing(at(7_001), 2, forward(1, &packet)), deliver(103, 1, &packet));
        assert_eq!(r.len(), 3);
    }

    #[test]
    fn link_up_refuses_reused_ids_conflicting_nodes_and_too_many_links() {
        let limits = RelayLimits { max_links: 3, ..RelayLimits::default() };
        let mut r = Relay::new(limits);
        r.link_up(T0, UP, CLOUD, LinkKind::Uplink, false, MTU).unwrap();
        r.link_up(T0, 1, dev(1), LinkKind::Device, false, MTU).unwrap();
        assert_eq!(r.link_up(T0, 1, dev(5), LinkKind::Device, false, MTU), Err(RelayError::DuplicateLink(1)));
        assert_eq!(r.link_up(T0, 2, CLOUD, LinkKind::Device, false, MTU), Err(RelayError::NodeConflict));
        assert_eq!(r.link_up(T0, 3, dev(1), LinkKind::Uplink, false, MTU), Err(RelayError::NodeConflict));
        r.link_up(T0, 2, dev(2), LinkKind::Device, false, MTU).unwrap();
        assert_eq!(r.link_up(T0, 4, dev(4), LinkKind::Device, false, MTU), Err(RelayError::TooManyLinks));
        // A re-attach replaces a link, so it fits.
        r.link_up(T0, 5, dev(2), LinkKind::Device, false, MTU).unwrap();
        // The cloud's id stays reserved while the uplink reconnects.
        r.link_down(T0, UP);
        assert_eq!(r.link_up(T0, 6, CLOUD, LinkKind::Device, false, MTU), Err(RelayError::NodeConflict));
        assert_eq!(r.len(), 2);
        assert!(!RelayError::TooManyLinks.to_string().is_empty());
    }

    /// A routed TRANSPORT packet (spec §16.2): type `0x10 | g`, counter_lo, 16 B of "tag".
    fn transport(g: u8, counter_lo: u32) -> Bytes {
        let c = counter_lo.to_be_bytes();
        let mut p = vec![0x10 | g, c[1], c[2], c[3]];
        p.extend_from_slice(&[0xab; 16]);
        Bytes::from(p)
    }

    fn custody_gateway() -> Relay {
        let mut r = gateway();
        r.set_custody(true);
        r
    }

    #[test]
    fn with_custody_transport_packets_toward_a_down_uplink_are_spooled_and_handshakes_dropped() {
        let mut r = custody_gateway();
        r.link_down(T0, UP);
        let _ = drain(&mut r);
        let p = transport(1, 0x01_02_03);
        assert_eq!(
            r.on_routing(T0, 1, forward(0, &p)),
            Verdict::Spool {
                link: 1,
                source: dev(1),
                destination: CLOUD,
                route: 0,
                generation: 1,
                counter_lo: 0x01_02_03,
                packet: p.clone()
            }
        );
        assert!(r.is_spooling(&dev(1), &CLOUD) && !r.is_spooling(&dev(2), &CLOUD));
        // spec §17.9: handshake packets are not stored; nor is what is no routed TRANSPORT
        // packet (A = 1, truncated).
        let init = Bytes::from_static(&[0x01, 1, 0, 0, 0, 0, 0, 0]);
        let bad_flags = Bytes::from(vec![0x12; 20]);
        let short = Bytes::from_static(&[0x10, 0, 0, 1]);
        for p in [&init, &bad_flags, &short] {
            assert_eq!(r.on_routing(at(1_000), 2, forward(0, p)), dropped(RouteReason::UplinkDown));
        }
        assert_eq!((r.stats().spooled, r.stats().spooled_bytes, r.stats().uplink_down), (1, 20, 3));
        // Without custody, the same packet is dropped (spec §16.4 unchanged).
        r.set_custody(false);
        assert!(!r.is_spooling(&dev(1), &CLOUD));
        assert_eq!(r.on_routing(at(2_000), 1, forward(0, &p)), dropped(RouteReason::UplinkDown));
    }

    #[test]
    fn a_spooling_source_queues_behind_its_stored_packets_until_the_gateway_clears_it() {
        let mut r = custody_gateway();
        r.link_down(T0, UP);
        let _ = drain(&mut r);
        assert!(matches!(r.on_routing(T0, 1, forward(0, &transport(0, 1))), Verdict::Spool { .. }));
        r.link_up(at(1), UP + 1, CLOUD, LinkKind::Uplink, false, MTU).unwrap();
        let _ = drain(&mut r);
        // spec §17.9, order: device 1 has packets in the spool, so its newer ones join them;
        // device 2 has none and is forwarded; handshakes are never held back.
        assert!(matches!(r.on_routing(at(2), 1, forward(0, &transport(0, 2))), Verdict::Spool { counter_lo: 2, .. }));
        assert_eq!(r.on_routing(at(2), 2, forward(0, &transport(0, 9))), deliver(UP + 1, 1, &transport(0, 9)));
        let init = Bytes::from_static(&[0x01, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(r.on_routing(at(2), 1, forward(0, &init)), deliver(UP + 1, 0, &init));
        // The spool replayed and emptied: device 1 is forwarded again.
        r.set_spooling(dev(1), CLOUD, false);
        assert_eq!(r.on_routing(at(3), 1, forward(0, &transport(0, 3))), deliver(UP + 1, 0, &transport(0, 3)));
        // A reopened spool marks what it holds (only with custody on).
        r.set_spooling(dev(2), CLOUD, true);
        assert!(matches!(r.on_routing(at(4), 2, forward(0, &transport(0, 10))), Verdict::Spool { .. }));
        // Revocation forgets the source's mark with its link.
        r.revoke(at(5), &dev(2));
        assert!(!r.is_spooling(&dev(2), &CLOUD));
        let mut plain = gateway();
        plain.set_spooling(dev(1), CLOUD, true);
        assert!(!plain.is_spooling(&dev(1), &CLOUD), "no custody, no marks");
    }

    #[test]
    fn stored_notices_are_coalesced_and_paced_on_the_virtual_clock() {
        let mut r = custody_gateway();
        r.link_down(T0, UP);
        let _ = drain(&mut r);
        for c in 0..5 {
            r.stored(T0, 1, 0, 0, c);
        }
        r.stored(T0, 2, 0, 1, 7);
        r.stored(T0, 77, 0, 0, 0); // a link that is gone: nothing
        assert_eq!(drain(&mut r), [], "due, but released by handle_timeout");
        assert_eq!(r.poll_timeout(), Some(T0));
        r.handle_timeout(T0);
        let stored =
            |link, generation, first, count| (link, RoutingMessage::Stored { route: 0, generation, first, count });
        assert_eq!(drain(&mut r), [stored(1, 0, 0, 5), stored(2, 1, 7, 1)]);
        r.stored(at(3), 1, 0, 0, 5);
        assert_eq!(r.poll_timeout(), Some(at(10)), "STORED_DELAY after the last one");
        assert_eq!(r.queued(), 1);
        r.handle_timeout(at(10));
        assert_eq!(drain(&mut r), [stored(1, 0, 5, 1)]);
        assert_eq!(r.poll_timeout(), None);
        // A link that closes takes its waiting notices with it.
        r.stored(at(11), 2, 0, 1, 8);
        r.link_down(at(11), 2);
        r.handle_timeout(at(100));
        assert_eq!(drain(&mut r), []);
        assert_eq!(r.custody_stats().sent, 3);
    }

    #[test]
    fn a_full_spool_is_answered_spool_full_within_the_rate_limit() {
        let mut r = custody_gateway();
        r.spool_full(T0, 1, 0);
        r.spool_full(at(10), 1, 0);
        assert_eq!(drain(&mut r), [unreachable(1, 0, RouteReason::SpoolFull)]);
        assert_eq!((r.stats().spool_full, r.stats().dropped(RouteReason::SpoolFull)), (2, 2));
        assert_eq!(r.stats().notices_limited, 1);
    }

    #[test]
    fn replay_announces_the_source_then_delivers_and_refuses_what_cannot_go() {
        let mut r = custody_gateway();
        r.link_down(T0, UP);
        let _ = drain(&mut r);
        let p = transport(0, 1);
        assert_eq!(r.replay(T0, dev(1), CLOUD, p.clone()), Err(RouteReason::UplinkDown));
        r.link_up(at(1), UP + 1, CLOUD, LinkKind::Uplink, false, 64).unwrap();
        let _ = drain(&mut r);
        // A device that left meanwhile is announced again for its stored packets.
        r.link_down(at(1), 2);
        let _ = drain(&mut r);
        assert_eq!(
            r.replay(at(2), dev(2), CLOUD, p.clone()),
            Ok((UP + 1, RoutingMessage::Deliver { route: 2, packet: p.clone() }))
        );
        assert_eq!(drain(&mut r), [route(UP + 1, 2, dev(2))]);
        assert_eq!(r.replay(at(2), dev(1), dev(9), p.clone()), Err(RouteReason::UplinkDown), "another cloud's");
        assert_eq!(r.replay(at(2), dev(1), CLOUD, Bytes::from(vec![0x10; 64])), Err(RouteReason::TooLarge));
        assert_eq!(r.stats().replayed, 1);
    }

    #[test]
    fn calls_naming_unknown_links_or_nodes_are_no_ops() {
        let mut r = relay();
        let packet = Bytes::from_static(b"x");
        r.link_down(T0, 5);
        r.congested(T0, 5, 0);
        r.set_max_message(5, 0);
        r.revoke(T0, &dev(5));
        r.handle_timeout(T0);
        assert_eq!(r.on_routing(T0, 5, forward(0, &packet)), Verdict::UnknownLink);
        assert_eq!(r.on_routing(T0, 5, RoutingMessage::Route { route: 0, node: dev(5) }), Verdict::UnknownLink);
        assert_eq!((r.poll_output(), r.poll_timeout(), r.queued()), (None, None, 0));
        assert!(r.is_empty() && r.announced(5).is_none() && r.uplink().is_none());
        assert_eq!(r.stats().unknown_link, 2);
        // Time going backwards is not an error either.
        r.link_up(T0, 1, dev(1), LinkKind::Device, true, MTU).unwrap();
        r.link_up(Timestamp::ZERO, UP, CLOUD, LinkKind::Uplink, true, MTU).unwrap();
        r.handle_timeout(Timestamp::ZERO);
        r.handle_timeout(Timestamp::from_micros(u64::MAX));
        let _ = drain(&mut r);
    }

    #[test]
    fn random_operation_sequences_keep_the_relays_invariants() {
        let mut runner = TestRunner::new(ProptestConfig {
            cases: 512,
            failure_persistence: None,
            rng_algorithm: RngAlgorithm::ChaCha,
            rng_seed: RngSeed::Fixed(0x7e1a_7001),
            max_shrink_iters: 1_024,
            ..ProptestConfig::default()
        });
        let ops = proptest::collection::vec(any::<[u8; 4]>().prop_map(crate::fuzzing::RelayOp::decode), 0..256);
        let result = runner.run(&ops, |ops| {
            crate::fuzzing::relay_ops(ops);
            Ok(())
        });
        if let Err(e) = result {
            panic!("{e}");
        }
    }
}
