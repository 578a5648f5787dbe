//! Fuzz entry point of the relay's forwarding core (spec §16.4, §16.4.1): a [`Relay`] driven by
//! arbitrary link events and routing messages, checked against the view a correct peer builds
//! from what the relay sends.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec;
use alloc::vec::Vec;

use bytes::Bytes;

use crate::message::STORED_COUNTER_SPAN;
use crate::relay::custody::MAX_STORED_RANGES;
use crate::relay::{LinkId, LinkKind, Relay, RelayError, RelayLimits, Verdict};
use crate::routing::{RouteReason, RoutingError, RoutingMessage};
use crate::time::{Duration, Timestamp};
use crate::trust::NodeId;

/// Small bounds, so that every limit is reached.
const MAX_ROUTES: usize = 4;
const MAX_LINKS: usize = 6;
const MAX_NOTICES: usize = 2;
/// Link ids and node ids the operations pick from.
const LINK_IDS: u8 = 12;
const NODES: u8 = 8;
/// At most this many operations are read from one input.
const MAX_OPS: usize = 512;
/// The encoded length of a `Deliver` of a `len`-byte packet in this harness (kind, a handle
/// below 128, the length's varint), to predict `TooLarge`.
fn deliver_len(len: usize) -> usize {
    1 + 1 + if len < 128 { 1 } else { 2 } + len
}

/// One operation on a [`Relay`] (see [`relay`] for the byte layout).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RelayOp {
    /// `link_up(link, node, kind, lossy, max_message)`.
    LinkUp {
        /// Link id (mod 12).
        link: u8,
        /// Node (mod 8).
        node: u8,
        /// Uplink rather than device link.
        uplink: bool,
        /// Datagram link.
        lossy: bool,
        /// The link's largest message.
        max_message: u16,
    },
    /// `link_down(link)`.
    LinkDown {
        /// Link id (mod 12).
        link: u8,
    },
    /// `revoke(node)`.
    Revoke {
        /// Node (mod 8).
        node: u8,
    },
    /// `Forward { route, packet of len bytes }` on `link` (outputs drained first, and before
    /// the `Deliver` is checked, as the caller's contract says).
    Forward {
        /// Link id (mod 12).
        link: u8,
        /// The handle.
        route: u32,
        /// Packet length (at least 1).
        len: u16,
    },
    /// A message only relays send (`Route`, `Withdraw`, `Deliver`, `Unreachable` by `kind % 4`)
    /// on `link`.
    Other {
        /// Link id (mod 12).
        link: u8,
        /// Which message.
        kind: u8,
        /// Its handle.
        route: u32,
    },
    /// `congested(link, route)`.
    Congested {
        /// Link id (mod 12).
        link: u8,
        /// The handle.
        route: u32,
    },
    /// The clock moves on, then `handle_timeout`.
    Advance {
        /// How far.
        millis: u32,
    },
    /// `poll_output` until `None`, into the peers' views.
    Drain,
}

fn route_of_byte(b: u8) -> u32 {
    // Mostly small handles (the ones given out), sometimes huge made-up ones.
    if b < 0xf0 {
        u32::from(b % 16)
    } else {
        u32::MAX - u32::from(b & 0x0f)
    }
}

impl RelayOp {
    /// Decodes `[op, a, b, c]`:
    ///
    /// | `op % 8` | operation |
    /// |---|---|
    /// | 0 | `LinkUp { link: a, node: b, uplink: c & 1, lossy: c & 2, max_message: (c >> 2) * 5 }` |
    /// | 1 | `LinkDown { link: a }` |
    /// | 2 | `Revoke { node: a }` |
    /// | 3 | `Forward { link: a, route: b, len: c }` |
    /// | 4 | `Other { link: a, kind: b, route: c }` |
    /// | 5 | `Congested { link: a, route: b }` |
    /// | 6 | `Advance { millis: u16::from_le_bytes([b, c]) }` |
    /// | 7 | `Drain` |
    ///
    /// Handles: `b % 16` for `b < 0xf0`, else `u32::MAX - (b & 0x0f)`.
    #[must_use]
    pub fn decode(op: [u8; 4]) -> Self {
        let [o, a, b, c] = op;
        match o % 8 {
            0 => Self::LinkUp {
                link: a,
                node: b,
                uplink: c & 1 != 0,
                lossy: c & 2 != 0,
                max_message: u16::from(c >> 2) * 5,
            },
            1 => Self::LinkDown { link: a },
            2 => Self::Revoke { node: a },
            3 => Self::Forward { link: a, route: route_of_byte(b), len: u16::from(c) },
            4 => Self::Other { link: a, kind: b, route: route_of_byte(c) },
            5 => Self::Congested { link: a, route: route_of_byte(b) },
            6 => Self::Advance { millis: u32::from(u16::from_le_bytes([b, c])) },
            _ => Self::Drain,
        }
    }
}

fn node(b: u8) -> NodeId {
    NodeId([b % NODES + 1; 16])
}

fn link_id(b: u8) -> LinkId {
    LinkId::from(b % LINK_IDS)
}

/// What the peer of one link knows, built only from what the relay sent on it.
#[derive(Debug)]
struct PeerView {
    peer: NodeId,
    kind: LinkKind,
    lossy: bool,
    max_message: usize,
    /// The bindings the relay announced to this peer.
    known: BTreeMap<u32, NodeId>,
    /// Handles this peer has named in a `Forward` that passed step 1 (datagram links).
    used: BTreeSet<u32>,
    /// The uplink came back to the same cloud: the cloud's binding may be announced again,
    /// once (spec §16.4.1).
    again: Option<NodeId>,
}

fn view_peer(views: &BTreeMap<LinkId, PeerView>, id: LinkId) -> Option<NodeId> {
    views.get(&id).map(|v| v.peer)
}

struct Harness {
    relay: Relay,
    now: Timestamp,
    views: BTreeMap<LinkId, PeerView>,
    forwarded: u64,
}

impl Harness {
    fn new() -> Self {
        let limits =
            RelayLimits { max_links: MAX_LINKS, max_routes_per_link: MAX_ROUTES, max_notices_per_link: MAX_NOTICES };
        let mut relay = Relay::new(limits);
        // spec §17.9: custody on; packets that are no routed TRANSPORT packet keep §16.4.
        relay.set_custody(true);
        Self { relay, now: Timestamp::from_millis(1_000), views: BTreeMap::new(), forwarded: 0 }
    }

    fn apply(&mut self, op: RelayOp) {
        match op {
            RelayOp::LinkUp { link, node: n, uplink, lossy, max_message } => {
                self.link_up(link, n, uplink, lossy, max_message)
            }
            RelayOp::LinkDown { link } => self.relay.link_down(self.now, link_id(link)),
            RelayOp::Revoke { node: n } => self.relay.revoke(self.now, &node(n)),
            RelayOp::Forward { link, route, len } => self.forward(link_id(link), route, len),
            RelayOp::Other { link, kind, route } => {
                let id = link_id(link);
                let msg = match kind % 4 {
                    0 => RoutingMessage::Route { route, node: node(kind) },
                    1 => RoutingMessage::Withdraw { route, reason: RouteReason::Detached },
                    2 => RoutingMessage::Deliver { route, packet: Bytes::from_static(&[0x10, 0, 0, 1]) },
                    _ => RoutingMessage::Unreachable { route, reason: RouteReason::Congested },
                };
                let before = self.relay.queued();
                let v = self.relay.on_routing(self.now, id, msg);
                if self.views.contains_key(&id) {
                    assert_eq!(v, Verdict::Dropped(RoutingError::NotARelay));
                } else {
                    assert_eq!(v, Verdict::UnknownLink);
                }
                assert_eq!(self.relay.queued(), before, "a message no relay accepts drew an answer");
            }
            RelayOp::Congested { link, route } => self.relay.congested(self.now, link_id(link), route),
            RelayOp::Advance { millis } => {
                self.now = self.now + Duration::from_millis(u64::from(millis));
                self.relay.handle_timeout(self.now);
                assert!(self.relay.poll_timeout().is_none_or(|t| t > self.now), "a due repeat was left");
            }
            RelayOp::Drain => {
                let _ = self.drain();
            }
        }
        self.check();
    }

    fn link_up(&mut self, link: u8, n: u8, uplink: bool, lossy: bool, max_message: u16) {
        let (id, peer) = (link_id(link), node(n));
        let kind = if uplink { LinkKind::Uplink } else { LinkKind::Device };
        let attached: BTreeSet<NodeId> = self.relay.attached().collect();
        let (links, cloud) = (self.relay.len(), self.relay.cloud());
        let replaces = match kind {
            LinkKind::Device => attached.contains(&peer),
            LinkKind::Uplink => self.relay.uplink().is_some(),
        };
        let back = uplink && !replaces && cloud == Some(peer);
        match self.relay.link_up(self.now, id, peer, kind, lossy, usize::from(max_message)) {
            Ok(()) => {
                let view = PeerView {
                    peer,
                    kind,
                    lossy,
                    max_message: usize::from(max_message),
                    known: BTreeMap::new(),
                    used: BTreeSet::new(),
                    again: None,
                };
                assert!(self.views.insert(id, view).is_none(), "a live link id was accepted twice");
                if back {
                    for v in self.views.values_mut().filter(|v| v.kind == LinkKind::Device) {
                        v.again = Some(peer);
                    }
                }
                assert_eq!(self.relay.link_of(&peer), Some(id), "the newest link wins");
            }
            Err(RelayError::DuplicateLink(l)) => assert!(l == id && self.views.contains_key(&id)),
            Err(RelayError::TooManyLinks) => assert!(links >= MAX_LINKS && !replaces),
            Err(RelayError::NodeConflict) => match kind {
                LinkKind::Device => assert_eq!(cloud, Some(peer)),
                LinkKind::Uplink => assert!(attached.contains(&peer)),
            },
        }
    }

    fn forward(&mut self, id: LinkId, route: u32, len: u16) {
        let _ = self.drain();
        let mut packet = vec![0xa5; usize::from(len.max(1))];
        if len.is_multiple_of(2) && len >= 20 {
            // A routed TRANSPORT packet (spec §16.2): G from the length, counter_lo = len.
            packet[..4].copy_from_slice(&[0x10 | ((len >> 1) & 1) as u8, 0, (len >> 8) as u8, len as u8]);
        }
        let transport = packet[0] & 0xfe == 0x10;
        let packet = Bytes::from(packet);
        // Whether the pair (the link's peer, the node the handle names) is marked before.
        let named = self.views.get(&id).and_then(|v| v.known.get(&route).copied());
        let spooling =
            view_peer(&self.views, id).is_some_and(|p| named.is_some_and(|d| self.relay.is_spooling(&p, &d)));
        let verdict = self.relay.on_routing(self.now, id, RoutingMessage::Forward { route, packet: packet.clone() });
        let Some(view) = self.views.get_mut(&id) else {
            assert_eq!(verdict, Verdict::UnknownLink);
            return;
        };
        let (source, source_kind) = (view.peer, view.kind);
        // Outputs were drained: the peer's view is the relay's table (checked in `check`).
        let dst = view.known.get(&route).copied();
        if dst.is_some() && view.lossy {
            view.used.insert(route);
        }
        let sent = self.drain();
        match verdict {
            Verdict::Forward { link: out, msg: RoutingMessage::Deliver { route: h, packet: p } } => {
                self.forwarded += 1;
                assert_eq!((p.as_ptr(), p.len()), (packet.as_ptr(), packet.len()), "the packet was copied or changed");
                assert!(h < 128, "handles stay below twice the table bound plus one");
                let out_view = self.views.get(&out).expect("a Deliver for a link the relay does not hold");
                assert!(deliver_len(packet.len()) <= out_view.max_message, "a Deliver larger than its link carries");
                assert_eq!(Some(out_view.peer), dst, "the Deliver goes to the Forward's destination");
                assert_ne!(source_kind, out_view.kind, "the default policy forwards only across the relay");
                // spec §16.4: the source is the link's; the peer on the out link, having read
                // every message the relay sent before, resolves the handle to it.
                assert_eq!(out_view.known.get(&h), Some(&source), "the Deliver's route is not the in-link's peer");
                // spec §16.3: on a datagram link, an announcement the peer has not used goes
                // in front of every Deliver naming it.
                if out_view.lossy && !out_view.used.contains(&h) {
                    let route = RoutingMessage::Route { route: h, node: source };
                    assert!(sent.contains(&(out, route)), "no Route in front of a Deliver on a datagram link");
                }
            }
            Verdict::Forward { msg, .. } => panic!("a Forward verdict with {msg:?}"),
            Verdict::Spool { link, source: s, destination, route: r, generation, counter_lo, packet: p } => {
                // spec §17.9: only routed TRANSPORT packets toward the cloud, from the link's
                // peer, while the uplink is down or behind what the source has spooled.
                assert!(transport, "a packet that is no TRANSPORT packet was spooled");
                assert_eq!((link, s, r), (id, source, route));
                assert_eq!(Some(destination), dst);
                // Toward the cloud, or behind what the pair already has in the spool: packets
                // for a former cloud (the uplink came back to another node) queue behind the
                // stored ones, which wait for it until their time to live ends.
                assert!(spooling || Some(destination) == self.relay.cloud(), "spooled toward a node not the cloud");
                assert!(spooling || self.relay.link_of(&destination).is_none(), "spooled with the uplink up");
                assert!(self.relay.is_spooling(&s, &destination), "a spooled pair not marked");
                assert_eq!((p.as_ptr(), p.len()), (packet.as_ptr(), packet.len()), "the packet was copied or changed");
                assert_eq!((generation, counter_lo), (((len >> 1) & 1) as u8, u32::from(len)));
                // The gateway's part: stored, refused, or the pair cleared as if the spool
                // emptied now, by the counter's residue.
                if counter_lo.is_multiple_of(3) {
                    self.relay.stored(self.now, id, route, generation, counter_lo);
                } else if counter_lo % 3 == 1 {
                    self.relay.spool_full(self.now, id, route);
                } else {
                    self.relay.set_spooling(s, destination, false);
                }
            }
            Verdict::Dropped(RoutingError::UnknownRoute(r)) => assert!(r == route && dst.is_none()),
            Verdict::Dropped(RoutingError::Unreachable(reason)) => {
                let dst = dst.expect("a known handle failed later than step 1");
                let out = self.relay.link_of(&dst);
                match reason {
                    RouteReason::UplinkDown => {
                        assert!(self.relay.cloud() == Some(dst) && out.is_none());
                        assert!(!transport, "custody on, yet a TRANSPORT packet was dropped");
                    }
                    RouteReason::Detached => assert!(out.is_none()),
                    RouteReason::Congested => {
                        let full = out.and_then(|o| self.relay.announced(o)).map(Iterator::count);
                        assert_eq!(full, Some(MAX_ROUTES), "Congested while the table has room");
                    }
                    RouteReason::TooLarge => {
                        let max = out.and_then(|o| self.views.get(&o)).map(|v| v.max_message);
                        assert!(max.is_some_and(|m| deliver_len(packet.len()) > m), "TooLarge for a packet that fits");
                    }
                    r => panic!("Forward dropped with {r:?}"),
                }
            }
            v => panic!("Forward: {v:?}"),
        }
        assert_eq!(self.relay.stats().forwarded, self.forwarded);
    }

    /// Hands every pending message to the peer of its link, checking each against that peer's
    /// view, and returns them.
    fn drain(&mut self) -> Vec<(LinkId, RoutingMessage)> {
        let mut sent = Vec::new();
        for _ in 0..100_000 {
            let Some((id, msg)) = self.relay.poll_output() else { return sent };
            sent.push((id, msg.clone()));
            let view = self.views.get_mut(&id).expect("output for a link the relay does not hold");
            match msg {
                RoutingMessage::Route { route, node } if view.again == Some(node) => {
                    // spec §16.4.1: the cloud again, once, after the uplink came back.
                    view.again = None;
                    view.known.retain(|r, n| *r != route && *n != node);
                    view.known.insert(route, node);
                }
                RoutingMessage::Route { route, node } => {
                    assert!(!view.used.contains(&route), "announcement repeated after the peer used it");
                    if !view.lossy {
                        assert_ne!(view.known.get(&route), Some(&node), "announced twice on a stream link");
                    }
                    view.known.retain(|r, n| *r != route && *n != node);
                    view.known.insert(route, node);
                }
                RoutingMessage::Withdraw { route, reason } => {
                    assert!(matches!(reason, RouteReason::Detached | RouteReason::Revoked), "{reason:?}");
                    view.known.remove(&route);
                    view.used.remove(&route);
                }
                RoutingMessage::Unreachable { reason, .. } => assert!(
                    matches!(
                        reason,
                        RouteReason::UnknownRoute
                            | RouteReason::NotAllowed
                            | RouteReason::Detached
                            | RouteReason::UplinkDown
                            | RouteReason::Congested
                            | RouteReason::TooLarge
                            | RouteReason::SpoolFull
                    ),
                    "{reason:?}"
                ),
                RoutingMessage::Stored { generation, first, count, .. } => {
                    assert_eq!(view.kind, LinkKind::Device, "a Stored on the uplink");
                    assert!(
                        generation <= 1 && first < STORED_COUNTER_SPAN && (1..=STORED_COUNTER_SPAN).contains(&count)
                    );
                }
                m => panic!("the relay sent {m:?}"),
            }
        }
        panic!("poll_output does not end");
    }

    fn check(&mut self) {
        // Links the relay forgot (down, replaced, revoked) are gone for their peers too.
        self.views.retain(|id, _| self.relay.announced(*id).is_some());
        assert_eq!(self.views.len(), self.relay.len(), "the relay holds a link it never accepted");
        assert!(self.relay.len() <= MAX_LINKS);
        // Pending output per link: a Withdraw and a Route per handle (handles stay below
        // 2 * MAX_ROUTES + 1), and the notices.
        let per_link = 2 * (2 * MAX_ROUTES + 1) + MAX_NOTICES + MAX_STORED_RANGES;
        assert!(self.relay.queued() <= self.relay.len() * per_link, "output queue grew to {}", self.relay.queued());
        let attached: Vec<NodeId> = self.relay.attached().collect();
        let unique: BTreeSet<NodeId> = attached.iter().copied().collect();
        assert_eq!(unique.len(), attached.len(), "a node attached twice");
        for n in &attached {
            let view = self.relay.link_of(n).and_then(|l| self.views.get(&l));
            assert!(view.is_some_and(|v| v.peer == *n && v.kind == LinkKind::Device));
        }
        let cloud = self.relay.cloud();
        if let Some((id, peer)) = self.relay.uplink() {
            assert_eq!(cloud, Some(peer));
            assert!(self.views.get(&id).is_some_and(|v| v.kind == LinkKind::Uplink));
        }
        for (id, view) in &self.views {
            let table: Vec<(u32, NodeId)> = self.relay.announced(*id).map(Iterator::collect).unwrap_or_default();
            assert!(table.len() <= MAX_ROUTES);
            // Device links carry the cloud only; the uplink carries attached devices only.
            for (_, n) in &table {
                match view.kind {
                    LinkKind::Device => assert_eq!(Some(*n), cloud, "a device link announces a non-cloud node"),
                    LinkKind::Uplink => assert!(unique.contains(n), "the uplink announces a detached node"),
                }
            }
            if self.relay.queued() == 0 {
                // Everything was sent: the peer knows exactly the relay's bindings.
                let known: Vec<(u32, NodeId)> = view.known.iter().map(|(r, n)| (*r, *n)).collect();
                assert_eq!(known, table, "link {id}: the peer's view differs from the relay's table");
            }
        }
    }
}

/// A relay with small bounds (6 links, 4 handles per link, 2 waiting notices), fed 4-byte
/// operations (layout: [`RelayOp::decode`]) and checked against the views of its links' peers,
/// which learn only from what the relay sends them.
///
/// Invariants: no panic; a `Deliver` carries the `Forward`'s packet uncopied, goes to the link of
/// the destination the in-link's peer named, and names a handle that the out link's peer,
/// having read everything the relay sent before it, resolves to the in-link's peer (spec
/// §16.4: the source is the link's); every drop has the reason of its §16.4 step; messages
/// only relays send are dropped (`NotARelay`) without an answer; with custody (spec §17.9) a
/// routed TRANSPORT packet toward the cloud is spooled, never dropped UplinkDown, only while
/// the uplink is down or its source's pair is marked, and `Stored` goes on device links only,
/// well-formed; once drained, every peer's
/// view equals the relay's table; device links announce only the cloud and the uplink only
/// attached devices; announcements are never repeated after the peer used them nor duplicated
/// on stream links; a node is attached over one link; links and pending output stay within
/// their bounds; no due timer is left after `handle_timeout`.
pub fn relay(data: &[u8]) {
    relay_ops(data.chunks_exact(4).take(MAX_OPS).map(|c| RelayOp::decode([c[0], c[1], c[2], c[3]])));
}

/// [`relay`] on decoded operations.
pub fn relay_ops(ops: impl IntoIterator<Item = RelayOp>) {
    let mut h = Harness::new();
    for op in ops {
        h.apply(op);
    }
    let _ = h.drain();
    h.check();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fuzz finding: a device's packets toward the cloud were spooled (its pair marked), then
    /// that node came back as the cloud, on the uplink, and the old cloud as a device. Its
    /// `Forward` from the uplink to that device matched the marked pair and was spooled, and
    /// the `Stored` went out on the uplink. The spool holds device packets only (spec §17.9).
    #[test]
    fn a_former_devices_packets_from_the_uplink_are_not_spooled() {
        let up = |link, node, max_message| RelayOp::LinkUp { link, node, uplink: true, lossy: false, max_message };
        let dev = |link, node, max_message| RelayOp::LinkUp { link, node, uplink: false, lossy: false, max_message };
        relay_ops([
            dev(1, 7, 50),
            up(0, 0, 300),
            dev(3, 1, 300),
            RelayOp::LinkDown { link: 0 },
            // Stored: spooled, its pair (node 7 -> node 0) marked.
            RelayOp::Forward { link: 1, route: 0, len: 30 },
            RelayOp::LinkDown { link: 1 },
            up(0, 7, 0),
            dev(6, 0, 290),
            RelayOp::Forward { link: 0, route: 1, len: 60 },
            RelayOp::Advance { millis: 0 },
        ]);
    }

    #[test]
    fn a_script_reaches_custody_and_its_invariants_hold() {
        let up = RelayOp::LinkUp { link: 0, node: 0, uplink: true, lossy: false, max_message: 1_000 };
        let dev = RelayOp::LinkUp { link: 1, node: 1, uplink: false, lossy: true, max_message: 1_000 };
        let mut h = Harness::new();
        for op in [up.clone(), dev, RelayOp::Drain, RelayOp::LinkDown { link: 0 }, RelayOp::Drain] {
            h.apply(op);
        }
        // Counters 20 (spooled, the pair cleared), 22 (refused), 24 (stored), a packet that is
        // no TRANSPORT packet (dropped); the uplink back: 28 is spooled behind the others
        // (refused), 26 clears the pair, 30 is forwarded.
        for len in [20, 22, 24, 21] {
            h.apply(RelayOp::Forward { link: 1, route: 0, len });
        }
        h.apply(RelayOp::Advance { millis: 20 });
        let sent = h.drain();
        assert!(sent.iter().any(|(_, m)| matches!(m, RoutingMessage::Stored { first: 24, count: 1, .. })), "{sent:?}");
        h.apply(up);
        h.apply(RelayOp::Forward { link: 1, route: 0, len: 28 });
        h.apply(RelayOp::Forward { link: 1, route: 0, len: 26 });
        h.apply(RelayOp::Forward { link: 1, route: 0, len: 30 });
        let s = h.relay.stats();
        assert_eq!((s.spooled, s.spool_full, s.uplink_down, s.forwarded), (5, 2, 1, 1));
        h.apply(RelayOp::Advance { millis: 20 });
        let _ = h.drain();
        h.check();
    }
}
