//! End-to-end sessions over relays (spec §16): the endpoint side, for cloud services and
//! devices alike.
//!
//! A [`RoutedEndpoint`] runs the end-to-end sessions (layer 4, spec §2) of one node. Its
//! traffic rides on link [`Connection`]s the application hands it:
//!
//! - **relay links** ([`RoutedEndpoint::add_relay_link`]): a device's link to its gateway, or a
//!   gateway's uplink at the cloud. The link's peer is accepted as a relay (spec §16.7): its
//!   `Route`/`Withdraw` announcements bind route handles to node ids (spec §16.3), its
//!   `Deliver` envelopes carry routed-mode packets (spec §16.2) from the node they name, and its
//!   `Unreachable` notices become [`NodeEvent::Unreachable`]. Outgoing end-to-end packets leave
//!   as `Forward` envelopes on the node's most recently announced route (spec §16.6).
//! - **direct links** ([`RoutedEndpoint::add_direct`]): a device connected straight to the cloud
//!   (spec §16.1, direct shape). The link session *is* the end-to-end session: its data messages
//!   are the end-to-end messages, and there is no second layer.
//!
//! The application addresses peers by [`NodeId`] (spec §15.2) and never sees which shape,
//! link or route handle carries them, except in [`Via`] and the route events.
//!
//! # Tasks and bounds
//!
//! One actor task owns the end-to-end state: the [`E2eDemux`] (at most two sessions per node,
//! spec §16.6, bounded by [`DemuxLimits`]), one [`PeerRoutes`] per relay link (bounded by
//! [`RoutedLimits::max_routes_per_link`]), the most recent route of every node, and a clock.
//! Around it, every channel is bounded:
//!
//! - one reader task per link pushes what the link receives into the actor's input queue
//!   ([`RoutedLimits::input_queue`]); while it is full the reader stops reading, so that
//!   backpressure reaches the link and, over TCP, the sender;
//! - the actor puts `Forward` envelopes straight into the relay link's own send queue (the
//!   link's [`EndpointLimits::send_queue`](crate::EndpointLimits::send_queue)). When that queue
//!   is full (a slow or stalled relay link), a short-lived task waits for room for the envelope
//!   that did not fit, and the actor holds the node's packets in its end-to-end connection
//!   instead of producing them, and takes them up again once the link drains: **a stalled relay
//!   link stalls only the nodes routed over it**, never the actor;
//! - the actor takes up to 64 queued inputs and commands per wake-up, and sends what they
//!   queued for a node once, at the end: messages sent together share end-to-end packets, and
//!   a peer's acknowledgements go once per batch;
//! - [`RoutedEndpoint::send`] waits while the node's end-to-end queue is full (its link is
//!   stalled); at most [`RoutedLimits::command_queue`] sends wait at once, beyond that every
//!   handle call waits. Once a node took a message, the next sends to it are queued for the
//!   actor without waiting for its answer (the handles share which nodes take messages, and
//!   up to which size), so that a sender and the actor do not wake each other once per
//!   message; a message the actor can no longer take when its turn comes is given back
//!   ([`NodeEvent::Refused`]);
//! - events go to the application through one queue of [`RoutedLimits::event_queue`].
//!   **When the application does not read [`RoutedEndpoint::next_event`], the actor waits**:
//!   nothing is dropped, and nothing else moves until the application reads — `connect` and
//!   relayed `send`s wait too, so read events in a task of their own.
//!
//! The actor files every node's next session timer in an ordered set: a timer wakes only the
//! nodes that are due, and touching a node costs O(log n).
//!
//! # Trust
//!
//! End-to-end peers are authorized by the endpoint's own [`Authorizer`] (spec §5.5), called
//! with an [`AuthRequest`] whose `relay` names the relay the peer is reached through; the
//! demultiplexer has already checked that the peer's key hashes to the node id its route
//! names (spec §16.6: a mismatch is denied and counted in
//! [`RoutedStats::node_mismatch`]). With [`Authorizer::trust`] every end-to-end session is
//! checked again when the trust state changes or the peer's certificate expires, like a
//! link (spec §15.8). The roles expected are the authorizer's
//! [`PeerRoles`](crate::PeerRoles): `inbound` for initiators that reach this node,
//! `outbound` for responders it connects to — a cloud typically uses
//! `PeerRoles::new(RoleSet::DEVICE, RoleSet::CLOUD)` for its end-to-end peers.
//!
//! # Delivery
//!
//! With [`RoutedBuilder::delivery`] the endpoint runs spec §17 with every peer node: one
//! [`Outbox`] and one [`Inbox`] per node, owned by the actor, not by a session, so that they
//! carry over reconnects, new end-to-end sessions, direct links and route changes (§17.1).
//! On each new session the outbox sends its `Stream`, its `Skip`s and its whole window again
//! (§17.4 rule 2); its retransmission and expiry timers and the inbox's acknowledgement timer
//! are filed with the node's session timers. [`RoutedEndpoint::send`] takes an id from the
//! outbox and waits while the window is full ([`RoutedStats::window_waits`]); messages
//! come out of the inbox in order per channel, each once ([`RoutedStats::duplicates_dropped`]),
//! and are acknowledged once committed ([`RoutedEndpoint::commit`] or
//! [`DeliveryOptions::auto_commit`]). A relay's `Stored` puts the Data of the packets it names
//! in custody (§17.9; the endpoint remembers which packet carried which Data, bounded by
//! [`DeliveryOptions::custody_memory`]); a route announced again after an `Unreachable` or a
//! loss of every route sends what is in flight at once (§17.4 rule 4). Messages sent with
//! [`RoutedEndpoint::send_with_ttl`] that are not acknowledged in time are dropped and
//! reported ([`NodeEvent::Expired`]). The delivery state lives as long as the endpoint: a
//! process that must survive its own restart rebuilds its inboxes
//! ([`RoutedBuilder::restore_inbox`]; the veil-relay cloud does it from its sink).
//!
//! # Limits of v1
//!
//! - Responders accept IK, XX and their psk variants; a KK responder needs the initiator's key
//!   in advance, which a routed INIT does not give, so KK INITs fail (counted in
//!   [`RoutedStats::dropped_refused`]).
//! - A session's packet limit (spec §16.2) is fixed when it starts, from the link its route
//!   then uses; if the node later moves to a link that carries less, the relay answers larger
//!   packets with `Unreachable { TooLarge }`. With delivery, a message accepted for a node
//!   with no session is checked against [`RoutedLimits::max_routed_packet`] only; one larger
//!   than the session that comes can carry is never sent, and blocks its channel until its
//!   time to live ends.
//! - Delivery state is not saved by the endpoint (an outbox dies with the process: spec
//!   §17.1), and the state of idle peers is dropped only when
//!   [`DeliveryOptions::max_peers`] is reached.
//!
//! # Example
//!
//! A device connected directly to its cloud service (the direct shape of spec §16.1); through a
//! gateway the code is the same, with [`RoutedEndpoint::add_relay_link`] in place of
//! [`RoutedEndpoint::add_direct`].
//!
//! ```
//! use bytes::Bytes;
//! use veil_protocol::trust::NodeId;
//! use veil_protocol::StaticKeypair;
//! use veil_transports::{Authorizer, Endpoint, NodeEvent, RoutedEndpoint, Via};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut rng = rand::rngs::OsRng;
//! let cloud_id = StaticKeypair::generate(&mut rng);
//! let device_id = StaticKeypair::generate(&mut rng);
//! let (cloud_key, device_key) = (*cloud_id.public(), *device_id.public());
//!
//! // Each node: an Endpoint for its links, a RoutedEndpoint for its end-to-end peers.
//! let cloud_links = Endpoint::builder(cloud_id.clone())
//!     .authorizer(Authorizer::allowlist([device_key]))
//!     .listen_tcp("127.0.0.1:0".parse()?)
//!     .bind()
//!     .await?;
//! let cloud = RoutedEndpoint::builder(cloud_id).authorizer(Authorizer::allowlist([device_key])).build()?;
//! let device_links = Endpoint::builder(device_id.clone()).bind().await?;
//! let device = RoutedEndpoint::builder(device_id).build()?;
//!
//! let addr = cloud_links.local_tcp_addr().expect("listening");
//! let (link, accepted) = tokio::try_join!(device_links.connect_tcp(addr, Some(cloud_key)), cloud_links.accept())?;
//! device.add_direct(link);
//! cloud.add_direct(accepted);
//!
//! let cloud_node = device.connect(cloud_key).await?;
//! device.send(&cloud_node, 1, Bytes::from_static(b"temperature=21.5")).await?;
//! for _ in 0..4 {
//!     if let NodeEvent::Message { node, payload, via, .. } = cloud.next_event().await? {
//!         assert_eq!(node, NodeId::from_public_key(&device_key));
//!         assert_eq!(via, Via::Direct);
//!         assert_eq!(payload, "temperature=21.5");
//!         break;
//!     }
//! }
//! device.close();
//! cloud.close();
//! # Ok(())
//! # }
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::{broadcast, mpsc, oneshot, watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use veil_protocol::delivery::{
    DataOutcome, DeliveryConfig, DeliveryMessage, DeliveryOutput, Inbox, InboxState, Outbox, StreamId,
};
use veil_protocol::dh_cache::CacheStats;
use veil_protocol::routing::{
    DemuxError, DemuxLimits, E2eDemux, PeerRoutes, RouteReason, RoutedEvent, RoutingMessage, Slot,
    MAX_ENVELOPE_OVERHEAD, MAX_ROUTES,
};
use veil_protocol::trust::{Authorized, CertificateChain, NodeId, RoleSet, TrustError};
use veil_protocol::wire::{self, MAX_PACKET_LEN};
use veil_protocol::{
    CloseReason, Config, ConnectionError, Decision, DeliveryError, Event, Mode, Pattern, Psk, PublicKey, Role,
    StaticDhCache, StaticKeypair, Suite, Timestamp,
};

use crate::clock::Clock;
use crate::config::{AuthRequest, Authorizer, Transport};
use crate::connection::{lock, Connection, Received, TrySendError};
use crate::driver::{expiry_of, DATA_FRAMING_MAX};
use crate::error::Error;

/// Bounds and queue sizes of a [`RoutedEndpoint`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoutedLimits {
    /// The end-to-end demultiplexer's bounds (spec §16.6): nodes held, new handshakes per node.
    pub demux: DemuxLimits,
    /// Route bindings accepted from one relay link (spec §16.3, default `MAX_ROUTES`); a
    /// `Route` beyond it is dropped ([`RoutedStats::dropped_table_full`]).
    pub max_routes_per_link: usize,
    /// The largest routed packet (spec §16.2) this node accepts and advertises. Each session
    /// uses at most the largest packet its relay link carries in one envelope (the link's
    /// largest plaintext minus 9, the spec's SHOULD), whatever this says. Default
    /// `MAX_PACKET_LEN`.
    pub max_routed_packet: usize,
    /// Events held for [`RoutedEndpoint::next_event`] before the actor waits.
    pub event_queue: usize,
    /// Handle calls (`connect`, `send`) queued for the actor, and sends that may wait for
    /// room in their session at once.
    pub command_queue: usize,
    /// What the link readers hold for the actor before they stop reading.
    pub input_queue: usize,
    /// Delivery messages queued towards one direct link's connection (with
    /// [`RoutedBuilder::delivery`]). Relay links take `Forward` envelopes into their own send
    /// queue ([`EndpointLimits::send_queue`](crate::EndpointLimits::send_queue)).
    pub link_queue: usize,
    /// `connect` calls waiting at once (for a route or a handshake).
    pub max_pending_connects: usize,
    /// How long [`RoutedEndpoint::connect`] waits for a relay link to announce the node
    /// before it fails with [`Error::NoRoute`]. The handshake that follows has the protocol's
    /// handshake timeout.
    pub connect_timeout: Duration,
    /// Entries of the end-to-end sessions' static-static Diffie-Hellman cache
    /// ([`veil_protocol::StaticDhCache`], spec §11.11): a device that starts IK again (a
    /// reconnect, a restart) costs this node one X25519 less. About 130 B per entry,
    /// allocated as peers arrive; `0` turns it off. Default 4 096, as
    /// [`EndpointLimits::static_dh_cache`](crate::EndpointLimits::static_dh_cache) for links.
    pub static_dh_cache: usize,
}

impl Default for RoutedLimits {
    fn default() -> Self {
        Self {
            demux: DemuxLimits::default(),
            max_routes_per_link: MAX_ROUTES,
            max_routed_packet: MAX_PACKET_LEN,
            event_queue: 1_024,
            command_queue: 64,
            input_queue: 256,
            link_queue: 64,
            max_pending_connects: 1_024,
            connect_timeout: Duration::from_secs(10),
            static_dh_cache: 4_096,
        }
    }
}

/// Acknowledged delivery (spec §17) on a [`RoutedEndpoint`]: see
/// [`RoutedBuilder::delivery`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryOptions {
    /// Window, receive bounds and timers (spec §17.4, §17.5, §17.10).
    pub config: DeliveryConfig,
    /// Commit every message as soon as it is handed to the application (queued for
    /// [`RoutedEndpoint::next_event`]), for applications that keep nothing durable. Without
    /// it the application calls [`RoutedEndpoint::commit`] (spec §17.7).
    pub auto_commit: bool,
    /// Peers with delivery state (outbox and inbox) held at once. Beyond it, the state of a
    /// peer with no session, an empty window and nothing held is dropped to make room; if
    /// there is none, sends to a new peer fail with [`Error::TooManyConnections`] and its
    /// Data is not taken (its sender retransmits it later).
    pub max_peers: usize,
    /// Data messages remembered per peer with the packet that carried them, so that a
    /// relay's `Stored` (spec §17.9) can be mapped to the messages in its custody.
    pub custody_memory: usize,
    /// spec §17.4 rule 6: after a route comes back (from the return if the window holds a
    /// message then, else from the first send after it), how long the end-to-end session may
    /// stay without an authenticated packet before it is ended (as by an idle timeout:
    /// [`NodeEvent::Closed`] with `IdleTimeout`), so that the application can open a new one.
    /// Default `ROUTE_BACK_TIMEOUT`, 3 s.
    pub route_back_timeout: Duration,
}

impl Default for DeliveryOptions {
    fn default() -> Self {
        Self {
            config: DeliveryConfig::default(),
            auto_commit: false,
            max_peers: 65_536,
            custody_memory: 2_048,
            route_back_timeout: Duration::from_micros(veil_protocol::delivery::ROUTE_BACK_TIMEOUT.as_micros()),
        }
    }
}

/// How a message reached this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Via {
    /// In a direct link session (spec §16.1).
    Direct,
    /// In an end-to-end session, through the relay with this node id (spec §16.6).
    Relay(NodeId),
}

/// What a [`RoutedEndpoint`] reports ([`RoutedEndpoint::next_event`]).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum NodeEvent {
    /// A session with `node` is up: an end-to-end session confirmed (spec §5.7), or a direct
    /// link added. A second `Connected` for a node whose session is up means the peer started
    /// a new session (it restarted) and the new one replaced the old (spec §16.6).
    Connected {
        /// The peer's node id.
        node: NodeId,
        /// The peer's authenticated static key.
        remote_static: PublicKey,
        /// Whether the session is a direct link (spec §16.1).
        direct: bool,
        /// Who the trust check said the peer is; `None` without a trust check.
        peer: Option<Authorized>,
    },
    /// A data message from `node`.
    Message {
        /// The sender's node id.
        node: NodeId,
        /// Application channel.
        channel: u16,
        /// The sender's id for the message (per channel, counting from 0, continuing across
        /// route changes).
        id: u64,
        /// The payload.
        payload: Bytes,
        /// How it came.
        via: Via,
        /// With delivery (spec §17.2): the sender's stream, which `id` belongs to; `None` for
        /// a message taken best effort (delivery off, or a sender without it).
        stream: Option<StreamId>,
    },
    /// The session with `node` is over.
    Closed {
        /// The peer's node id.
        node: NodeId,
        /// Whether it was a direct link.
        direct: bool,
        /// Why: [`Error::Closed`] for an orderly close by either side.
        outcome: Error,
    },
    /// A relay could not pass a `Forward` to `node` on, or will not (spec §16.5). A hint: the
    /// session goes on, and the application decides whether to wait, queue or give up.
    Unreachable {
        /// The destination.
        node: NodeId,
        /// The relay that sent the notice.
        relay: NodeId,
        /// Why.
        reason: RouteReason,
    },
    /// With delivery (spec §17.6): a message sent with a time to live
    /// ([`RoutedEndpoint::send_with_ttl`]) was dropped from the window unacknowledged when
    /// its time ran out. The peer learns by a `Skip` that it will never come.
    Expired {
        /// The destination.
        node: NodeId,
        /// Application channel.
        channel: u16,
        /// The message's id.
        id: u64,
        /// The payload.
        payload: Bytes,
        /// The message was transmitted at least once: the peer may have received it (and
        /// the acknowledgement been lost). `false`: it never left this node.
        unconfirmed: bool,
    },
    /// A message [`RoutedEndpoint::send`] took without waiting for the endpoint's answer,
    /// which the endpoint could not queue when its turn came: without delivery, its session
    /// ended or its route changed in between; with delivery, its route changed to one that
    /// carries less than its size, or no delivery state was free for its node. Nothing of it
    /// was sent: the payload comes back, and the application decides whether to send it
    /// again. `error` is what `send` would have returned.
    Refused {
        /// The destination.
        node: NodeId,
        /// Application channel.
        channel: u16,
        /// The payload.
        payload: Bytes,
        /// Why.
        error: Error,
    },
    /// The route to a node with an end-to-end session changed (spec §16.6, "routes change,
    /// sessions stay"): it now goes through `relay`, or no link announces the node any more
    /// (`None`: sends fail with [`Error::NoRoute`] until one does). Reported only for nodes
    /// whose session is up.
    RouteChanged {
        /// The peer's node id.
        node: NodeId,
        /// The relay its packets now go through, if any.
        relay: Option<NodeId>,
    },
}

/// An end-to-end handshake that did not complete ([`RoutedEndpoint::handshake_failures`]),
/// whichever side started it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RoutedHandshakeFailure {
    /// The peer's node id (as its route names it).
    pub node: NodeId,
    /// The relay its last packet came through, if any did.
    pub relay: Option<NodeId>,
    /// The peer's key does not hash to its route's node id (spec §16.6): denied.
    pub node_mismatch: bool,
    /// How it ended: [`Error::deny_reason`] names a denial (this node's authorizer, or the
    /// node-id check), [`Error::reject_reason`] a refusal by the peer, else a timeout or
    /// another protocol failure.
    pub error: Error,
}

/// Failures kept for slow subscribers of [`RoutedEndpoint::handshake_failures`]; older ones
/// are skipped (`Lagged`).
const FAILURE_BACKLOG: usize = 256;

/// Counters of a [`RoutedEndpoint`] (a snapshot).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RoutedStats {
    /// Relay links in use.
    pub relay_links: usize,
    /// Direct links in use.
    pub direct_links: usize,
    /// End-to-end sessions up.
    pub sessions: usize,
    /// End-to-end handshakes this node started.
    pub handshakes_started: u64,
    /// End-to-end handshakes that failed (either side; a denial included).
    pub handshakes_failed: u64,
    /// End-to-end peers the authorizer denied.
    pub denied: u64,
    /// End-to-end peers whose key does not hash to their route's node id (spec §16.6), denied.
    pub node_mismatch: u64,
    /// Data messages received (end to end and direct).
    pub messages_in: u64,
    /// Data messages sent (queued).
    pub messages_out: u64,
    /// Payload bytes received.
    pub bytes_in: u64,
    /// Payload bytes sent (queued).
    pub bytes_out: u64,
    /// `Deliver` envelopes received and resolved.
    pub envelopes_in: u64,
    /// `Forward` envelopes handed to relay links.
    pub envelopes_out: u64,
    /// `Unreachable` notices reported.
    pub unreachable: u64,
    /// Routing messages naming a handle the relay never announced (or withdrew): dropped
    /// (spec §16.4, `RoutingError::UnknownRoute`).
    pub dropped_unknown_route: u64,
    /// Routing messages from a peer not accepted as a relay (a direct link), or of a kind an
    /// endpoint does not take (`Forward`, routing inside an end-to-end session): dropped
    /// (spec §16.7, `RoutingError::NotARelay`).
    pub dropped_not_a_relay: u64,
    /// `Route`s beyond [`RoutedLimits::max_routes_per_link`]: dropped (`RoutingError::TableFull`).
    pub dropped_table_full: u64,
    /// Data messages a relay sent in its own link session (it is no end-to-end peer): dropped.
    pub dropped_link_messages: u64,
    /// End-to-end packets produced while no link announced their node: dropped.
    pub dropped_no_route: u64,
    /// Routed packets for no session of their node (spec §16.6 table: "none: drop").
    pub dropped_no_session: u64,
    /// INITs beyond a node's allowance of new handshakes (spec §16.6).
    pub dropped_init_limited: u64,
    /// INITs from a new node while the demultiplexer is full.
    pub dropped_too_many_peers: u64,
    /// Routed packets a session refused (unauthenticated, replayed, malformed, wrong pattern).
    pub dropped_refused: u64,
    /// End-to-end packets larger than their relay link carries: dropped.
    pub dropped_too_large: u64,
    /// Times a relay link's queue was full, so that the nodes routed over it waited for it.
    pub link_stalls: u64,
    /// Sends that waited for room in their session.
    pub sends_waited: u64,
    /// Messages `send` took without waiting for the endpoint's answer that the endpoint then
    /// refused, each given back as a [`NodeEvent::Refused`] (see [`RoutedEndpoint::send`]).
    pub sends_refused: u64,
    /// Delivery (spec §17.4): Data retransmitted (timeouts, new sessions, route back).
    pub retransmissions: u64,
    /// Delivery (spec §17.5): Data received again and dropped.
    pub duplicates_dropped: u64,
    /// Delivery (spec §17.4): sends that waited for room in their peer's window.
    pub window_waits: u64,
    /// Delivery (spec §17.6): messages dropped by their time to live.
    pub expired: u64,
    /// Delivery (spec §17.9): messages put in a relay's custody by a `Stored`.
    pub custody: u64,
    /// Delivery (spec §17.4 rule 4): routes announced again after an `Unreachable` (a relay's
    /// uplink came back), each of which sent at once what was in flight.
    pub routes_back: u64,
    /// Delivery (spec §17.4 rule 6): end-to-end sessions ended because nothing authenticated
    /// came back within `route_back_timeout` of a route's return (the peer had likely
    /// restarted during the outage).
    pub route_back_timeouts: u64,
    /// Delivery (spec §17.9): acknowledgement requests (a `Stream` alone) for messages in a
    /// relay's custody whose `Ack` did not come.
    pub ack_requests: u64,
    /// Delivery (spec §17.9): messages whose custody ended because the peer acknowledged one
    /// sent after them: the relay lost them after storing them (they go again).
    pub custody_lost: u64,
    /// Delivery (spec §17.3): messages the peer acknowledged, freed from their window. With
    /// no message expired, `messages_out - acknowledged` is what the outboxes still hold.
    pub acknowledged: u64,
    /// The end-to-end sessions' static-static DH cache ([`RoutedLimits::static_dh_cache`]).
    pub static_dh_cache: CacheStats,
    /// Delivery: the largest window (messages) any peer's outbox held.
    pub window_peak: usize,
}

#[derive(Debug, Default)]
struct Counters {
    relay_links: AtomicUsize,
    direct_links: AtomicUsize,
    sessions: AtomicUsize,
    handshakes_started: AtomicU64,
    handshakes_failed: AtomicU64,
    denied: AtomicU64,
    node_mismatch: AtomicU64,
    messages_in: AtomicU64,
    messages_out: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    envelopes_in: AtomicU64,
    envelopes_out: AtomicU64,
    unreachable: AtomicU64,
    dropped_unknown_route: AtomicU64,
    dropped_not_a_relay: AtomicU64,
    dropped_table_full: AtomicU64,
    dropped_link_messages: AtomicU64,
    dropped_no_route: AtomicU64,
    dropped_no_session: AtomicU64,
    dropped_init_limited: AtomicU64,
    dropped_too_many_peers: AtomicU64,
    dropped_refused: AtomicU64,
    dropped_too_large: AtomicU64,
    link_stalls: AtomicU64,
    sends_waited: AtomicU64,
    sends_refused: AtomicU64,
    retransmissions: AtomicU64,
    duplicates_dropped: AtomicU64,
    window_waits: AtomicU64,
    expired: AtomicU64,
    custody: AtomicU64,
    routes_back: AtomicU64,
    route_back_timeouts: AtomicU64,
    ack_requests: AtomicU64,
    custody_lost: AtomicU64,
    acknowledged: AtomicU64,
    window_peak: AtomicUsize,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    fn snapshot(&self) -> RoutedStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RoutedStats {
            relay_links: self.relay_links.load(Ordering::Relaxed),
            direct_links: self.direct_links.load(Ordering::Relaxed),
            sessions: self.sessions.load(Ordering::Relaxed),
            handshakes_started: g(&self.handshakes_started),
            handshakes_failed: g(&self.handshakes_failed),
            denied: g(&self.denied),
            node_mismatch: g(&self.node_mismatch),
            messages_in: g(&self.messages_in),
            messages_out: g(&self.messages_out),
            bytes_in: g(&self.bytes_in),
            bytes_out: g(&self.bytes_out),
            envelopes_in: g(&self.envelopes_in),
            envelopes_out: g(&self.envelopes_out),
            unreachable: g(&self.unreachable),
            dropped_unknown_route: g(&self.dropped_unknown_route),
            dropped_not_a_relay: g(&self.dropped_not_a_relay),
            dropped_table_full: g(&self.dropped_table_full),
            dropped_link_messages: g(&self.dropped_link_messages),
            dropped_no_route: g(&self.dropped_no_route),
            dropped_no_session: g(&self.dropped_no_session),
            dropped_init_limited: g(&self.dropped_init_limited),
            dropped_too_many_peers: g(&self.dropped_too_many_peers),
            dropped_refused: g(&self.dropped_refused),
            dropped_too_large: g(&self.dropped_too_large),
            link_stalls: g(&self.link_stalls),
            sends_waited: g(&self.sends_waited),
            sends_refused: g(&self.sends_refused),
            retransmissions: g(&self.retransmissions),
            duplicates_dropped: g(&self.duplicates_dropped),
            window_waits: g(&self.window_waits),
            expired: g(&self.expired),
            custody: g(&self.custody),
            routes_back: g(&self.routes_back),
            route_back_timeouts: g(&self.route_back_timeouts),
            ack_requests: g(&self.ack_requests),
            custody_lost: g(&self.custody_lost),
            acknowledged: g(&self.acknowledged),
            static_dh_cache: CacheStats::default(),
            window_peak: self.window_peak.load(Ordering::Relaxed),
        }
    }

    fn message_out(&self, len: usize) {
        bump(&self.messages_out);
        self.bytes_out.fetch_add(len as u64, Ordering::Relaxed);
    }
}

/// Builds a [`RoutedEndpoint`]. Start with [`RoutedEndpoint::builder`].
#[derive(Debug)]
pub struct RoutedBuilder {
    config: Config,
    authorizer: Authorizer,
    limits: RoutedLimits,
    /// The local chain, or why it cannot be used (reported by `build`).
    chain: Option<Result<Vec<u8>, TrustError>>,
    delivery: Option<DeliveryOptions>,
    /// Saved inboxes to start from (spec §17.7).
    restored: Vec<(NodeId, InboxState)>,
}

impl RoutedBuilder {
    /// The handshake pattern of the end-to-end sessions this node starts (default IK: the
    /// device knows the cloud's key). As a responder it accepts IK, XX, IKpsk2 and XXpsk3.
    #[must_use]
    pub fn pattern(mut self, pattern: Pattern) -> Self {
        self.config.pattern = pattern;
        self
    }

    /// The cipher suite this node offers when it starts a session.
    #[must_use]
    pub fn suite(mut self, suite: Suite) -> Self {
        self.config.suite = suite;
        self
    }

    /// The pre-shared key of the `psk` patterns.
    #[must_use]
    pub fn psk(mut self, psk: Psk) -> Self {
        self.config.psk = Some(psk);
        self
    }

    /// The protocol's timers and limits for end-to-end sessions (spec §7.7). Its
    /// `max_packet_len` is ignored: see [`RoutedLimits::max_routed_packet`].
    #[must_use]
    pub fn protocol_limits(mut self, limits: veil_protocol::Limits) -> Self {
        self.config.limits = limits;
        self
    }

    /// This node's certificate chain (spec §15.4), sent in its end-to-end handshakes where
    /// spec §5.4.1 says. Its leaf must certify this node's key ([`RoutedBuilder::build`] checks).
    #[must_use]
    pub fn certificate_chain(mut self, chain: &CertificateChain) -> Self {
        // Public keys: no need for a constant-time comparison.
        let bound = chain.leaf().body().public_key == *self.config.public_key().as_bytes();
        self.chain = Some(if bound { chain.encode() } else { Err(TrustError::KeyMismatch) });
        self
    }

    /// Who may hold an end-to-end session with this node (spec §5.5): the same allowlist or
    /// fleet-CA trust as for links. Without one every end-to-end peer that needs a decision is
    /// denied.
    #[must_use]
    pub fn authorizer(mut self, authorizer: Authorizer) -> Self {
        self.authorizer = authorizer;
        self
    }

    /// All bounds and queue sizes at once.
    #[must_use]
    pub fn limits(mut self, limits: RoutedLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The demultiplexer's bounds (spec §16.6).
    #[must_use]
    pub fn demux_limits(mut self, limits: DemuxLimits) -> Self {
        self.limits.demux = limits;
        self
    }

    /// Events held for [`RoutedEndpoint::next_event`] before the actor waits.
    #[must_use]
    pub fn event_queue(mut self, events: usize) -> Self {
        self.limits.event_queue = events;
        self
    }

    /// The largest routed packet (spec §16.2); see [`RoutedLimits::max_routed_packet`].
    #[must_use]
    pub fn max_routed_packet(mut self, len: usize) -> Self {
        self.limits.max_routed_packet = len;
        self
    }

    /// How long `connect` waits for a route; see [`RoutedLimits::connect_timeout`].
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.limits.connect_timeout = timeout;
        self
    }

    /// Turns on acknowledged delivery (spec §17): every message [`RoutedEndpoint::send`]
    /// accepts reaches the peer's application exactly once, in order per channel, across
    /// lost packets, reconnects, new end-to-end sessions and route changes, as long as this
    /// endpoint lives. Per peer node the endpoint holds an outbox and an inbox that outlive
    /// sessions (spec §17.1); `send` waits while the peer's window is full (backpressure) and
    /// queues for a peer with no session until one comes; received messages are reported in
    /// order, once, and acknowledged once committed ([`RoutedEndpoint::commit`], or
    /// [`DeliveryOptions::auto_commit`]). The peer must use delivery too for its acks (a
    /// peer without it sends none: the window fills and `send` waits).
    #[must_use]
    pub fn delivery(mut self, options: DeliveryOptions) -> Self {
        self.delivery = Some(options);
        self
    }

    /// With delivery: starts the inbox of `node` from saved state (spec §17.7, §17.8), e.g.
    /// what a restarted receiver rebuilt from its sink, so that nothing it committed before
    /// is delivered again. Invalid states are reported by [`RoutedBuilder::build`].
    #[must_use]
    pub fn restore_inbox(mut self, node: NodeId, state: InboxState) -> Self {
        self.restored.push((node, state));
        self
    }

    /// Starts the endpoint's actor task on the current tokio runtime.
    ///
    /// # Errors
    /// [`Error::Trust`] if the certificate chain does not certify this node's key
    /// (`KeyMismatch`) or is too long; [`Error::Io`] outside a tokio runtime;
    /// [`Error::Delivery`] for a delivery configuration out of its bounds.
    pub fn build(mut self) -> Result<RoutedEndpoint, Error> {
        let runtime = tokio::runtime::Handle::try_current().map_err(std::io::Error::other)?;
        let mut deliveries = HashMap::new();
        if let Some(d) = &self.delivery {
            d.config.validate().map_err(Error::Delivery)?;
            for (node, state) in std::mem::take(&mut self.restored) {
                let inbox = Inbox::from_state(d.config, &state).map_err(Error::Delivery)?;
                let mut stream = [0u8; veil_protocol::delivery::STREAM_ID_LEN];
                rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut stream);
                let outbox = Outbox::new(d.config, stream).map_err(Error::Delivery)?;
                deliveries.insert(node, NodeDelivery::new(outbox, inbox));
            }
        }
        if let Some(chain) = self.chain.take() {
            self.config.certificate_chain = Some(chain?);
        }
        if self.authorizer.trust_state().is_some() {
            // spec §5.5: with a trust check, initiators check the responder's certificate too.
            self.config.authorize_responder = true;
        }
        self.config.mode = Mode::Routed;
        let limits = self.limits;
        if self.config.static_dh_cache.is_none() && limits.static_dh_cache > 0 {
            self.config.static_dh_cache = Some(Arc::new(StaticDhCache::new(limits.static_dh_cache)));
        }
        let dh_cache = self.config.static_dh_cache.clone();
        let public_key = *self.config.public_key();
        let (cmd_tx, cmd_rx) = mpsc::channel(limits.command_queue.max(1));
        let (input_tx, input_rx) = mpsc::channel(limits.input_queue.max(1));
        let (events_tx, events_rx) = mpsc::channel(limits.event_queue.max(1));
        let counters = Arc::new(Counters::default());
        let direct = Arc::new(Mutex::new(HashMap::new()));
        let ready = Arc::new(Mutex::new(HashMap::new()));
        let stop = CancellationToken::new();
        let trust_changes = self.authorizer.trust_state().map(crate::trust::TrustState::subscribe);
        let commits = Arc::new(Mutex::new(HashMap::new()));
        let commit_wake = Arc::new(Notify::new());
        let failures = broadcast::channel(FAILURE_BACKLOG).0;
        let actor = Actor {
            failures: failures.clone(),
            mismatched: HashSet::new(),
            delivery: self.delivery,
            deliveries,
            direct_tx: HashMap::new(),
            commits: Arc::clone(&commits),
            commit_wake: Arc::clone(&commit_wake),
            clock: Clock::new(),
            config: self.config,
            configs: HashMap::new(),
            authorizer: self.authorizer,
            limits,
            demux: E2eDemux::new(limits.demux),
            links: BTreeMap::new(),
            directs: HashMap::new(),
            best: HashMap::new(),
            nodes: HashMap::new(),
            timers: BTreeSet::new(),
            armed: HashMap::new(),
            connecting: HashMap::new(),
            pending_connects: 0,
            parked_total: 0,
            parked_posts: 0,
            out: VecDeque::new(),
            buf: vec![0; MAX_PACKET_LEN],
            cmd_rx,
            input_rx,
            input_tx: input_tx.clone(),
            events_tx,
            direct: Arc::clone(&direct),
            ready: Arc::clone(&ready),
            counters: Arc::clone(&counters),
            stop: stop.clone(),
            runtime: runtime.clone(),
            trust_changes,
            trust_deadline: None,
            batching: false,
            deferred: HashSet::new(),
            draining: false,
        };
        let span = tracing::info_span!("veil_routed", node = %NodeId::from_public_key(&public_key));
        runtime.spawn(tracing::Instrument::instrument(actor.run(), span));
        Ok(RoutedEndpoint {
            inner: Arc::new(Shared {
                cmd: cmd_tx,
                input: input_tx,
                events: tokio::sync::Mutex::new(events_rx),
                direct,
                ready,
                counters,
                stop,
                runtime,
                next_link: AtomicU64::new(1),
                public_key,
                dh_cache,
                delivery: self.delivery.is_some(),
                commits,
                commit_wake,
                failures,
            }),
        })
    }
}

type LinkId = u64;

/// What the handles share.
#[derive(Debug)]
struct Shared {
    cmd: mpsc::Sender<Command>,
    input: mpsc::Sender<Input>,
    events: tokio::sync::Mutex<mpsc::Receiver<NodeEvent>>,
    /// Direct links by node, for sends that need no actor.
    direct: Arc<Mutex<HashMap<NodeId, (LinkId, Connection)>>>,
    /// Nodes that took a send (their end-to-end session, or with delivery their outbox), with
    /// the largest payload they take now (see [`Command::Post`]).
    ready: Arc<Mutex<HashMap<NodeId, usize>>>,
    counters: Arc<Counters>,
    stop: CancellationToken,
    runtime: tokio::runtime::Handle,
    next_link: AtomicU64,
    public_key: PublicKey,
    /// The end-to-end sessions' static-static DH cache, for [`RoutedEndpoint::stats`].
    dh_cache: Option<Arc<StaticDhCache>>,
    /// Delivery is on: every send goes through the actor's outboxes.
    delivery: bool,
    /// Commits the actor has not taken yet, by node and channel (the highest id wins).
    commits: Arc<Mutex<HashMap<(NodeId, u16), u64>>>,
    commit_wake: Arc<Notify>,
    failures: broadcast::Sender<RoutedHandshakeFailure>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // The last handle is gone: close the sessions and stop every task.
        self.stop.cancel();
    }
}

/// A node that runs end-to-end sessions over relay links (spec §16.6) and, for a cloud, also
/// takes direct device connections (spec §16.1, no second layer). See the
/// [module documentation](crate::routed) for its tasks, bounds and an example.
///
/// Cheap to clone; clones share the node. Dropping the last clone is [`RoutedEndpoint::close`].
#[derive(Debug, Clone)]
pub struct RoutedEndpoint {
    inner: Arc<Shared>,
}

impl RoutedEndpoint {
    /// A builder for a node with this identity (the same key pair as its links: spec §16.1)
    /// and Veil's defaults (IK, ChaChaPoly/BLAKE2s, spec timers).
    #[must_use]
    pub fn builder(identity: StaticKeypair) -> RoutedBuilder {
        RoutedBuilder {
            config: Config::new(identity, Mode::Routed),
            authorizer: Authorizer::default(),
            limits: RoutedLimits::default(),
            chain: None,
            delivery: None,
            restored: Vec::new(),
        }
    }

    /// Adds a link to a relay; its peer is accepted as a relay (spec §16.7). Its `Route` and
    /// `Withdraw` messages bind route handles (a [`PeerRoutes`] per link, spec §16.3), its
    /// `Deliver` envelopes feed the end-to-end sessions, its `Unreachable` notices become
    /// [`NodeEvent::Unreachable`]. When the link ends its routes go, and each node falls back
    /// to another link that announces it (spec §16.6), newest link first.
    ///
    /// The link must come from an [`Endpoint`](crate::Endpoint) built with
    /// [`routing(true)`](crate::EndpointBuilder::routing), and the endpoint reads it from now
    /// on: do not `recv` on it elsewhere. The endpoint holds a clone until the link ends or
    /// the endpoint closes.
    pub fn add_relay_link(&self, link: Connection) {
        self.add_link(link, LinkKind::Relay);
    }

    /// Adds a direct link (spec §16.1): a device connected to this node (cloud side), or this
    /// device's link to the cloud itself. Its data messages are the end-to-end messages of
    /// node `node_id(link.remote_static())`, reported as [`Via::Direct`]; [`RoutedEndpoint::send`]
    /// prefers it over any relayed session with the same node. Routing messages on it are
    /// dropped (the peer is no relay, spec §16.7). A [`NodeEvent::Connected`] with `direct`
    /// reports it, a [`NodeEvent::Closed`] its end.
    ///
    /// As for relay links, the endpoint reads the link from now on. A newer direct link to the
    /// same node takes over sending.
    pub fn add_direct(&self, link: Connection) {
        let id = self.inner.next_link.fetch_add(1, Ordering::Relaxed);
        let node = NodeId::from_public_key(&link.remote_static());
        // Published before the actor hears of it, so that a `send` right after finds it.
        lock(&self.inner.direct).insert(node, (id, link.clone()));
        self.spawn_reader(id, link, LinkKind::Direct);
    }

    fn add_link(&self, link: Connection, kind: LinkKind) {
        let id = self.inner.next_link.fetch_add(1, Ordering::Relaxed);
        self.spawn_reader(id, link, kind);
    }

    fn spawn_reader(&self, id: LinkId, link: Connection, kind: LinkKind) {
        let tx = self.inner.input.clone();
        let stop = self.inner.stop.clone();
        let span = tracing::debug_span!("veil_routed_link", id, kind = ?kind, link = link.id());
        self.inner.runtime.spawn(tracing::Instrument::instrument(read_link(id, kind, link, tx, stop), span));
    }

    /// Starts an end-to-end session with the node whose static key is `remote` (spec §16.6;
    /// with IK, the default, the device knows the cloud's key), once some relay link
    /// announces `node_id(remote)`, and returns the node id when the session is confirmed.
    /// Returns at once if a session with the node is up, or a direct link goes to it; joins a
    /// handshake already under way (either side may start one).
    ///
    /// # Errors
    /// [`Error::NoRoute`] when no link announced the node within
    /// [`RoutedLimits::connect_timeout`]; [`Error::Protocol`] when the handshake failed (timed
    /// out, denied, refused); [`Error::TooManyConnections`] beyond
    /// [`RoutedLimits::max_pending_connects`] or the demultiplexer's bound;
    /// [`Error::EndpointClosed`] after [`RoutedEndpoint::close`].
    pub async fn connect(&self, remote: PublicKey) -> Result<NodeId, Error> {
        let node = NodeId::from_public_key(&remote);
        if lock(&self.inner.direct).contains_key(&node) {
            return Ok(node);
        }
        let (reply, rx) = oneshot::channel();
        self.command(Command::Connect { remote, reply }).await?;
        rx.await.unwrap_or(Err(Error::EndpointClosed))
    }

    /// Queues a data message to `node` on `channel`: in its direct link if there is one,
    /// else in its end-to-end session, as a `Forward` on its most recent route. Waits while
    /// the session's queue is full (its relay link is slow); returns once the message is
    /// queued, not once the peer has it (routed sessions, like datagram ones, may lose
    /// packets: spec §16.2).
    ///
    /// Once the node took a message, the following sends to it (of payloads that fit its
    /// route) are handed to the endpoint's task without waiting for its answer, so that a
    /// sender's messages share its wake-ups. If the node's session or route changes before
    /// the task gets to such a message and the task cannot take it any more, the message
    /// comes back as a [`NodeEvent::Refused`] (counted in [`RoutedStats::sends_refused`]);
    /// the change itself is reported ([`NodeEvent::Closed`], [`NodeEvent::RouteChanged`]),
    /// and from then on `send` waits for the answer and returns the error again.
    ///
    /// # Errors
    /// [`Error::NoSession`] without a session with the node (connect first);
    /// [`Error::NoRoute`] when the session is up but no link announces the node any more;
    /// [`Error::MessageTooLarge`] when the payload does not fit one packet to the node over
    /// its current route; the direct link's outcome if it has ended;
    /// [`Error::EndpointClosed`].
    ///
    /// With delivery ([`RoutedBuilder::delivery`]) the message goes into the node's outbox
    /// instead (spec §17): `send` waits while the node's window is full and returns once the
    /// message has its id; it is sent on the node's session, now or once one comes up, and
    /// kept until the peer acknowledges it. [`Error::NoSession`] and [`Error::NoRoute`] do not
    /// occur then.
    pub async fn send(&self, node: &NodeId, channel: u16, payload: Bytes) -> Result<(), Error> {
        if !self.inner.delivery {
            let direct = lock(&self.inner.direct).get(node).map(|(_, c)| c.clone());
            if let Some(link) = direct {
                let len = payload.len();
                link.send_on(channel, payload).await?;
                self.inner.counters.message_out(len);
                return Ok(());
            }
        }
        let max = lock(&self.inner.ready).get(node).copied();
        if max.is_some_and(|max| payload.len() <= max) {
            return self.command(Command::Post { node: *node, channel, payload }).await;
        }
        self.send_command(node, channel, payload, None).await.map(|_| ())
    }

    /// Sends `payloads` to `node` on `channel`, in order, as [`RoutedEndpoint::send`] would one
    /// after the other, but hands them to the endpoint's task up to 64 at a time instead of one
    /// per call and wake-up (a burst of readings, a batch of commands): they share its
    /// wake-ups and packets. Returns once every message was taken (queued on its session, or
    /// with delivery given its id), waiting like `send` while the session's queue or the
    /// window is full.
    ///
    /// # Errors
    /// As [`RoutedEndpoint::send`], for the first message that was refused. The messages
    /// before it were taken; of those after it in the same group of 64, each was taken or
    /// refused on its own (without delivery a refusal means it was not sent), and none of the
    /// later groups was handed over.
    pub async fn send_many(
        &self,
        node: &NodeId,
        channel: u16,
        payloads: impl IntoIterator<Item = Bytes>,
    ) -> Result<(), Error> {
        let mut payloads = payloads.into_iter().peekable();
        if !self.inner.delivery {
            let direct = lock(&self.inner.direct).get(node).map(|(_, c)| c.clone());
            if let Some(link) = direct {
                for payload in payloads {
                    let len = payload.len();
                    link.send_on(channel, payload).await?;
                    self.inner.counters.message_out(len);
                }
                return Ok(());
            }
        }
        while payloads.peek().is_some() {
            let mut items = Vec::with_capacity(SEND_MANY_CHUNK);
            let mut replies = Vec::with_capacity(SEND_MANY_CHUNK);
            for payload in payloads.by_ref().take(SEND_MANY_CHUNK) {
                let (reply, rx) = oneshot::channel();
                items.push((payload, reply));
                replies.push(rx);
            }
            self.command(Command::SendMany { node: *node, channel, items }).await?;
            let mut first = None;
            for rx in replies {
                if let Err(e) = rx.await.unwrap_or(Err(Error::EndpointClosed)) {
                    first.get_or_insert(e);
                }
            }
            if let Some(e) = first {
                return Err(e);
            }
        }
        Ok(())
    }

    /// With delivery (spec §17.6, §17.7): as [`RoutedEndpoint::send`], and the message is
    /// dropped from the window if the peer has not acknowledged it `ttl` after this call (a
    /// command for a device that stays offline); it is then reported as
    /// [`NodeEvent::Expired`]. Returns the message's id in its channel.
    ///
    /// # Errors
    /// As [`RoutedEndpoint::send`]; [`Error::Delivery`] (`NoStream`) without delivery.
    pub async fn send_with_ttl(
        &self,
        node: &NodeId,
        channel: u16,
        payload: Bytes,
        ttl: Option<Duration>,
    ) -> Result<u64, Error> {
        if !self.inner.delivery {
            return Err(Error::Delivery(DeliveryError::NoStream));
        }
        self.send_command(node, channel, payload, ttl).await?.ok_or(Error::Delivery(DeliveryError::NoStream))
    }

    async fn send_command(
        &self,
        node: &NodeId,
        channel: u16,
        payload: Bytes,
        ttl: Option<Duration>,
    ) -> Result<Option<u64>, Error> {
        let (reply, rx) = oneshot::channel();
        self.command(Command::Send { node: *node, channel, payload, ttl, reply }).await?;
        rx.await.unwrap_or(Err(Error::EndpointClosed))
    }

    /// With delivery (spec §17.7): the application holds every message of `channel` from
    /// `node` it was given up to `through` inclusive (durably, if it needs to): the endpoint
    /// acknowledges them, and the sender frees them. Messages not committed are not
    /// acknowledged, so the sender keeps them. Does not wait; without delivery, or with
    /// [`DeliveryOptions::auto_commit`], it changes nothing.
    pub fn commit(&self, node: &NodeId, channel: u16, through: u64) {
        if !self.inner.delivery {
            return;
        }
        {
            let mut commits = lock(&self.inner.commits);
            let e = commits.entry((*node, channel)).or_insert(through);
            *e = (*e).max(through);
        }
        self.inner.commit_wake.notify_one();
    }

    async fn command(&self, cmd: Command) -> Result<(), Error> {
        if self.inner.stop.is_cancelled() {
            return Err(Error::EndpointClosed);
        }
        self.inner.cmd.send(cmd).await.map_err(|_| Error::EndpointClosed)
    }

    /// The next event. While the application does not call it the actor waits once
    /// [`RoutedLimits::event_queue`] events are pending (see the module documentation).
    ///
    /// # Errors
    /// [`Error::EndpointClosed`] once the endpoint is closed and every event was read.
    pub async fn next_event(&self) -> Result<NodeEvent, Error> {
        self.inner.events.lock().await.recv().await.ok_or(Error::EndpointClosed)
    }

    /// Subscribes to end-to-end handshakes that fail (denied here, refused by the peer, timed
    /// out, broken), with a typed error each; a cloud counts them by reason. Only failures
    /// after the call are seen; a subscriber that falls behind skips the oldest.
    #[must_use]
    pub fn handshake_failures(&self) -> broadcast::Receiver<RoutedHandshakeFailure> {
        self.inner.failures.subscribe()
    }

    /// Counters.
    #[must_use]
    pub fn stats(&self) -> RoutedStats {
        let mut stats = self.inner.counters.snapshot();
        stats.static_dh_cache = self.inner.dh_cache.as_ref().map(|c| c.stats()).unwrap_or_default();
        stats
    }

    /// Closes every end-to-end session (`Close { ShuttingDown }`, spec §7.6) and every direct
    /// link, stops the actor and the link tasks, and releases the relay links (they close once
    /// the application holds no other clone of them). Calls after it fail with
    /// [`Error::EndpointClosed`].
    pub fn close(&self) {
        self.inner.stop.cancel();
    }

    /// This node's static public key.
    #[must_use]
    pub fn public_key(&self) -> PublicKey {
        self.inner.public_key
    }

    /// This node's id (spec §15.2).
    #[must_use]
    pub fn node_id(&self) -> NodeId {
        NodeId::from_public_key(&self.inner.public_key)
    }
}

// ---------------------------------------------------------------------------------------
// Link tasks

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LinkKind {
    Relay,
    Direct,
}

/// What the link tasks tell the actor.
#[derive(Debug)]
enum Input {
    /// A link was added (sent by its reader before anything it reads).
    Up(LinkId, LinkKind, Connection),
    /// A link received something.
    Received(LinkId, Received),
    /// A link ended.
    Down(LinkId, Error),
    /// A relay link's send queue took the envelope the actor found no room for (a stalled
    /// link moves again), or a direct link's delivery writer has room again.
    Ready(LinkId),
}

/// What the handles ask of the actor.
#[derive(Debug)]
enum Command {
    Connect {
        remote: PublicKey,
        reply: oneshot::Sender<Result<NodeId, Error>>,
    },
    Send {
        node: NodeId,
        channel: u16,
        payload: Bytes,
        ttl: Option<Duration>,
        reply: oneshot::Sender<Result<Option<u64>, Error>>,
    },
    /// A `send` to a node that took one before, of a payload that fits: nobody waits for the
    /// answer (the caller's next message can follow at once). If the node's session or route
    /// changed meanwhile and the message is refused, it goes back to the application as a
    /// [`NodeEvent::Refused`].
    Post {
        node: NodeId,
        channel: u16,
        payload: Bytes,
    },
    /// [`RoutedEndpoint::send_many`]: each message as a `Send` without a time to live.
    SendMany {
        node: NodeId,
        channel: u16,
        items: Vec<(Bytes, SendReply)>,
    },
}

/// Where the actor answers one send: the message's id with delivery, `None` without.
type SendReply = oneshot::Sender<Result<Option<u64>, Error>>;

/// Messages one [`RoutedEndpoint::send_many`] command carries at most.
const SEND_MANY_CHUNK: usize = 64;

/// Sends `input` to the actor unless the endpoint stops first.
async fn tell(tx: &mpsc::Sender<Input>, stop: &CancellationToken, input: Input) -> bool {
    tokio::select! {
        r = tx.send(input) => r.is_ok(),
        () = stop.cancelled() => false,
    }
}

/// One link's reader: everything it receives goes to the actor, in order, through the bounded
/// input queue (a full queue stops the reading).
async fn read_link(id: LinkId, kind: LinkKind, link: Connection, tx: mpsc::Sender<Input>, stop: CancellationToken) {
    if !tell(&tx, &stop, Input::Up(id, kind, link.clone())).await {
        return;
    }
    loop {
        let received = tokio::select! {
            r = link.recv_any() => r,
            () = stop.cancelled() => return,
        };
        let input = match received {
            Ok(m) => Input::Received(id, m),
            Err(e) => Input::Down(id, e),
        };
        let down = matches!(input, Input::Down(..));
        if !tell(&tx, &stop, input).await || down {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------
// The actor

/// A relay link as the actor keeps it.
struct RelayLink {
    conn: Connection,
    /// The relay's node id.
    relay: NodeId,
    /// spec §16.3: the handles the relay announced on this link.
    routes: PeerRoutes,
    /// An envelope found the link's queue full: a task waits for room to queue it and then
    /// reports `Ready`; until then nothing else is sent here (the order is kept).
    stalled: bool,
    /// Nodes whose packets wait for this link to drain.
    waiting: HashSet<NodeId>,
    /// The largest routed packet one envelope on this link carries (spec §16.2).
    max_routed: usize,
}

/// A `send` waiting for room in its session (or, with delivery, in its window).
struct Parked {
    channel: u16,
    payload: Bytes,
    /// With delivery: when its time to live ends (spec §17.6), counted from the `send`.
    deadline: Option<Timestamp>,
    /// `None` for a [`Command::Post`].
    reply: Option<SendReply>,
}

/// What a direct link's delivery writer hands to the link.
#[derive(Debug)]
enum DirectOut {
    Data(u16, u64, Bytes),
    Delivery(DeliveryMessage),
}

/// The session a node's outbox sends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DeliverySession {
    Routed,
    Direct(LinkId),
}

/// spec §17.1: a peer's delivery state, which outlives its sessions.
struct NodeDelivery {
    outbox: Outbox,
    inbox: Inbox,
    /// Sends waiting for room in the window (spec §17.4: backpressure).
    waiting: VecDeque<Parked>,
    /// The session the outbox sends on, if one is up.
    session: Option<DeliverySession>,
    /// That session's mode.
    mode: Mode,
    /// Data queued in the current end-to-end session and not yet in a packet, in order.
    queued: VecDeque<(u16, u64)>,
    /// spec §17.9: the packet (generation, low 24 bits of the counter) that last carried each
    /// Data, oldest first, bounded by [`DeliveryOptions::custody_memory`].
    carried: VecDeque<(bool, u32, u16, u64)>,
    /// An `Unreachable` was read for the node since its route was last announced.
    unreachable: bool,
    /// spec §17.4 rule 6: the routed session's count of authenticated packets when the route
    /// came back, until the session answers or is checked.
    route_back: Option<u64>,
    /// When to check: `route_back_timeout` after the route came back with messages in the
    /// window, or after the first message sent since.
    route_back_check: Option<Timestamp>,
}

impl NodeDelivery {
    fn new(outbox: Outbox, inbox: Inbox) -> Self {
        Self {
            outbox,
            inbox,
            waiting: VecDeque::new(),
            session: None,
            mode: Mode::Routed,
            queued: VecDeque::new(),
            carried: VecDeque::new(),
            unreachable: false,
            route_back: None,
            route_back_check: None,
        }
    }

    /// Nothing would be lost by dropping it: no session, nothing to send, nothing held, and
    /// everything handed over committed (a new inbox learns where the stream stands from the
    /// sender's `Skip` on its next session, spec §17.2).
    fn is_idle(&self) -> bool {
        self.session.is_none()
            && self.waiting.is_empty()
            && self.outbox.window_len() == 0
            && self.inbox.held_messages() == 0
            && self.inbox.export().channels().iter().all(|&(c, committed)| committed == self.inbox.next(c))
    }
}

/// One direct link's delivery writer: hands the actor's outputs to the link in order.
async fn write_direct(
    id: LinkId,
    link: Connection,
    mut rx: mpsc::Receiver<DirectOut>,
    blocked: Arc<AtomicBool>,
    tx: mpsc::Sender<Input>,
) {
    while let Some(out) = rx.recv().await {
        let r = match out {
            DirectOut::Data(channel, id, payload) => link.send_data(channel, id, payload).await,
            DirectOut::Delivery(m) => link.send_delivery(m).await,
        };
        match r {
            Ok(()) | Err(Error::MessageTooLarge { .. }) => {}
            Err(e) => {
                tracing::debug!(error = %e, "direct link gone, delivery writer stops");
                return;
            }
        }
        if blocked.swap(false, Ordering::AcqRel) && tx.send(Input::Ready(id)).await.is_err() {
            return;
        }
    }
}

/// A retransmission that cannot go out yet (its link is stalled) is looked at again this
/// much later at the earliest, rather than in a loop.
const DELIVERY_RETRY: Duration = Duration::from_millis(5);

fn proto_duration(d: Duration) -> veil_protocol::Duration {
    veil_protocol::Duration::from_micros(u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// What a trust check needs to run again (spec §15.8).
struct Recheck {
    remote: PublicKey,
    certificate: Option<Vec<u8>>,
    expected: RoleSet,
    expires: Option<Instant>,
}

/// The authorization outcome of one connection.
#[derive(Default)]
struct PeerAuth {
    peer: Option<Authorized>,
    recheck: Option<Recheck>,
}

/// Per peer node: what the demultiplexer does not keep.
#[derive(Default)]
struct NodeState {
    /// By slot: `[current, candidate]`.
    auth: [Option<PeerAuth>; 2],
    /// The current end-to-end session is up (reported `Connected`).
    up: bool,
    waiters: Vec<oneshot::Sender<Result<NodeId, Error>>>,
    /// The key `connect` named, to start the handshake once a route comes.
    connect_key: Option<PublicKey>,
    parked: VecDeque<Parked>,
    /// The direct link to the node, if any.
    direct: Option<LinkId>,
    /// The relay the node's latest packet came through.
    last_relay: Option<NodeId>,
}

impl NodeState {
    fn is_idle(&self) -> bool {
        !self.up
            && self.waiters.is_empty()
            && self.parked.is_empty()
            && self.direct.is_none()
            && self.auth.iter().all(Option::is_none)
    }
}

const fn slot_index(slot: Slot) -> usize {
    match slot {
        Slot::Current => 0,
        Slot::Candidate => 1,
    }
}

/// Routed packets and data framing: what a data message adds in a routed packet.
const ROUTED_DATA_OVERHEAD: usize = wire::transport_overhead(Mode::Routed) + DATA_FRAMING_MAX;
/// Distinct per-link session configurations kept (one per packet limit in use).
const MAX_CONFIGS: usize = 16;

enum Wake {
    Stop,
    Input(Option<Input>),
    Command(Option<Command>),
    Timer,
    TrustChanged,
    Commits,
}

struct Actor {
    clock: Clock,
    /// The end-to-end configuration (routed mode); sessions use copies with their packet limit.
    config: Config,
    configs: HashMap<usize, Arc<Config>>,
    authorizer: Authorizer,
    limits: RoutedLimits,
    demux: E2eDemux,
    /// Relay links, oldest first.
    links: BTreeMap<LinkId, RelayLink>,
    directs: HashMap<LinkId, (NodeId, Connection)>,
    /// Shared with the handles: see [`Command::Post`]. An entry goes whenever its node's
    /// session or route changes, before anything reports the change.
    ready: Arc<Mutex<HashMap<NodeId, usize>>>,
    /// spec §16.6: every node's most recently announced route.
    best: HashMap<NodeId, (LinkId, u32)>,
    nodes: HashMap<NodeId, NodeState>,
    /// Every node's next session timer, earliest first, so that a wake-up touches only the
    /// nodes that are due (the demultiplexer's own `poll_timeout` scans them all).
    timers: BTreeSet<(Timestamp, NodeId)>,
    armed: HashMap<NodeId, Timestamp>,
    /// Nodes whose `connect` waits for a route, and until when.
    connecting: HashMap<NodeId, Instant>,
    pending_connects: usize,
    parked_total: usize,
    /// Of those, [`Command::Post`]s. They do not hold commands back: a post that has to wait
    /// makes its node's next sends wait for answers, so at most a command queue of them wait.
    parked_posts: usize,
    out: VecDeque<NodeEvent>,
    buf: Vec<u8>,
    cmd_rx: mpsc::Receiver<Command>,
    input_rx: mpsc::Receiver<Input>,
    /// For `Ready` from the tasks that wait on a full link queue or write to a direct link.
    input_tx: mpsc::Sender<Input>,
    events_tx: mpsc::Sender<NodeEvent>,
    direct: Arc<Mutex<HashMap<NodeId, (LinkId, Connection)>>>,
    counters: Arc<Counters>,
    stop: CancellationToken,
    runtime: tokio::runtime::Handle,
    trust_changes: Option<watch::Receiver<u64>>,
    /// The earliest certificate expiry among the sessions' peers.
    trust_deadline: Option<Instant>,
    /// spec §17: delivery, if on, and each peer's state.
    delivery: Option<DeliveryOptions>,
    deliveries: HashMap<NodeId, NodeDelivery>,
    /// Direct links' delivery writers (with delivery only).
    direct_tx: HashMap<LinkId, (mpsc::Sender<DirectOut>, Arc<AtomicBool>)>,
    commits: Arc<Mutex<HashMap<(NodeId, u16), u64>>>,
    commit_wake: Arc<Notify>,
    failures: broadcast::Sender<RoutedHandshakeFailure>,
    /// Nodes whose handshake the node-id check denied, until its `Closed` (spec §16.6).
    mismatched: HashSet<NodeId>,
    /// Within a wake-up's batch ([`Actor::batch`]): pumps wait for its end.
    batching: bool,
    /// The nodes to pump at the end of the batch (at most [`BATCH`] inputs and commands
    /// touched them).
    deferred: HashSet<NodeId>,
    /// Within [`Actor::drain`]: events are being read, in order; a nested pump leaves them.
    draining: bool,
}

/// Inputs and commands the actor takes per wake-up before it sends what they queued.
const BATCH: usize = 64;

/// How long a Close that found its link's queue full at shutdown waits for room.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

impl Actor {
    async fn run(mut self) {
        tracing::debug!("routed endpoint started");
        loop {
            if !self.flush().await {
                break;
            }
            let timer = self.next_deadline();
            let take_commands = self.takes_commands();
            let watch_trust = self.trust_changes.is_some();
            let wake = {
                let Self { stop, input_rx, cmd_rx, trust_changes, commit_wake, .. } = &mut self;
                tokio::select! {
                    () = stop.cancelled() => Wake::Stop,
                    i = input_rx.recv() => Wake::Input(i),
                    c = cmd_rx.recv(), if take_commands => Wake::Command(c),
                    () = sleep_until(timer), if timer.is_some() => Wake::Timer,
                    () = changed(trust_changes.as_mut()), if watch_trust => Wake::TrustChanged,
                    () = commit_wake.notified() => Wake::Commits,
                }
            };
            // What the wake-up and the batch after it do to a node's sessions is sent once, at
            // the end: queued messages share packets, and acknowledgements come once per batch.
            self.batching = true;
            let go_on = match wake {
                Wake::Stop | Wake::Command(None) | Wake::Input(None) => false,
                Wake::Input(Some(i)) => {
                    self.on_input(i);
                    self.batch().await
                }
                Wake::Command(Some(c)) => {
                    self.on_command(c);
                    self.batch().await
                }
                Wake::Timer => {
                    self.on_timer();
                    true
                }
                Wake::TrustChanged => {
                    self.recheck_all();
                    true
                }
                Wake::Commits => {
                    self.on_commits();
                    true
                }
            };
            self.batching = false;
            for node in std::mem::take(&mut self.deferred) {
                self.pump(&node);
            }
            if !go_on {
                break;
            }
        }
        self.shutdown();
        tracing::debug!("routed endpoint stopped");
    }

    /// After an input or a command: takes up to [`BATCH`] more that are already queued, an
    /// input and a command in turn (so that a busy network does not hold the application's
    /// sends back), their pumps deferred. When both queues are empty it yields once to the
    /// runtime (a sender this wake-up answered may queue its next message meanwhile) and
    /// looks again; it stops when a yield brought nothing. `false` when the endpoint stops.
    async fn batch(&mut self) -> bool {
        let mut taken = 1;
        let mut yielded = false;
        let mut command_turn = false;
        while taken < BATCH {
            // Waiting sends fill the allowance: no more commands until some go.
            let commands = self.takes_commands();
            let command = if commands && command_turn { self.cmd_rx.try_recv().ok() } else { None };
            command_turn = !command_turn;
            if let Some(c) = command {
                self.on_command(c);
            } else if let Ok(i) = self.input_rx.try_recv() {
                self.on_input(i);
            } else if !commands {
                break;
            } else if let Ok(c) = self.cmd_rx.try_recv() {
                self.on_command(c);
            } else if yielded || self.stop.is_cancelled() {
                break;
            } else {
                yielded = true;
                tokio::task::yield_now().await;
                continue;
            }
            taken += 1;
            yielded = false;
        }
        !self.stop.is_cancelled()
    }

    /// Whether the actor takes commands: not while [`RoutedLimits::command_queue`] sends wait
    /// for their answer.
    fn takes_commands(&self) -> bool {
        self.parked_total - self.parked_posts < self.limits.command_queue.max(1)
    }

    /// Hands the pending events to the application, waiting while its queue is full.
    /// `false` when the endpoint stops (or nobody can read any more).
    async fn flush(&mut self) -> bool {
        while let Some(e) = self.out.pop_front() {
            let sent = tokio::select! {
                r = self.events_tx.send(e) => r.is_ok(),
                () = self.stop.cancelled() => false,
            };
            if !sent {
                return false;
            }
        }
        true
    }

    fn next_deadline(&self) -> Option<Instant> {
        let demux = self.timers.first().map(|(t, _)| self.clock.instant(*t));
        let connect = self.connecting.values().min().copied();
        [demux, connect, self.trust_deadline].into_iter().flatten().min()
    }

    fn emit(&mut self, e: NodeEvent) {
        emit_to(&mut self.out, &self.events_tx, e);
    }

    /// The session configuration for a route whose link carries `cap`-byte routed packets.
    fn config_for(&mut self, cap: usize) -> Arc<Config> {
        let len = cap.min(self.limits.max_routed_packet).clamp(wire::MIN_PACKET_LEN, MAX_PACKET_LEN);
        if self.configs.len() >= MAX_CONFIGS && !self.configs.contains_key(&len) {
            self.configs.clear();
        }
        let base = &self.config;
        Arc::clone(self.configs.entry(len).or_insert_with(|| {
            let mut c = base.clone();
            c.limits.max_packet_len = len;
            Arc::new(c)
        }))
    }

    // -------------------------------------------------------------------------------
    // Links

    fn on_input(&mut self, input: Input) {
        match input {
            Input::Up(id, LinkKind::Relay, conn) => self.relay_up(id, conn),
            Input::Up(id, LinkKind::Direct, conn) => self.direct_up(id, conn),
            Input::Received(id, m) => {
                if self.links.contains_key(&id) {
                    self.on_relay(id, m);
                } else if let Some((node, _)) = self.directs.get(&id) {
                    let node = *node;
                    self.on_direct(id, node, m);
                }
            }
            Input::Down(id, error) => {
                if self.links.contains_key(&id) {
                    self.relay_down(id, &error);
                } else {
                    self.direct_down(id, error);
                }
            }
            Input::Ready(id) => self.link_ready(id),
        }
    }

    fn relay_up(&mut self, id: LinkId, conn: Connection) {
        let relay = NodeId::from_public_key(&conn.remote_static());
        // spec §16.2: a routed packet plus the largest envelope must fit one link message.
        let max_routed = conn.max_envelope_len().saturating_sub(MAX_ENVELOPE_OVERHEAD);
        if max_routed < wire::MIN_PACKET_LEN {
            tracing::warn!(max_routed, "relay link too small for routed packets");
        }
        tracing::info!(%relay, transport = %conn.transport(), "relay link added");
        self.links.insert(
            id,
            RelayLink {
                conn,
                relay,
                routes: PeerRoutes::new(self.limits.max_routes_per_link),
                stalled: false,
                waiting: HashSet::new(),
                max_routed,
            },
        );
        self.counters.relay_links.store(self.links.len(), Ordering::Relaxed);
    }

    fn relay_down(&mut self, id: LinkId, error: &Error) {
        let Some(link) = self.links.remove(&id) else { return };
        tracing::info!(relay = %link.relay, %error, "relay link ended");
        self.counters.relay_links.store(self.links.len(), Ordering::Relaxed);
        // spec §16.6: the routes it announced go with it; each node falls back.
        for (route, node) in link.routes.iter() {
            if self.best.get(&node) == Some(&(id, route)) {
                self.fallback(node);
            }
        }
    }

    fn direct_up(&mut self, id: LinkId, conn: Connection) {
        let remote_static = conn.remote_static();
        let node = NodeId::from_public_key(&remote_static);
        tracing::info!(%node, transport = %conn.transport(), "direct link added");
        let peer = conn.peer().cloned();
        if self.delivery.is_some() {
            let (tx, rx) = mpsc::channel(self.limits.link_queue.max(1));
            let blocked = Arc::new(AtomicBool::new(false));
            let span = tracing::debug_span!("veil_routed_direct_writer", id, link = conn.id());
            self.runtime.spawn(tracing::Instrument::instrument(
                write_direct(id, conn.clone(), rx, Arc::clone(&blocked), self.input_tx.clone()),
                span,
            ));
            self.direct_tx.insert(id, (tx, blocked));
            let mode = match conn.transport() {
                Transport::Tcp => Mode::Stream,
                Transport::Udp => Mode::Datagram,
            };
            let now = self.clock.now();
            if let Some(d) = self.delivery_state(&node) {
                // spec §17.1, §17.4 rule 2: a new connection to the peer.
                d.outbox.on_connected(mode, now);
                d.inbox.on_connected();
                d.route_back = None;
                d.route_back_check = None;
                d.session = Some(DeliverySession::Direct(id));
                d.mode = mode;
                d.queued.clear();
            }
        }
        self.directs.insert(id, (node, conn));
        // With delivery, sends to the node go on the direct link now, with its limit.
        self.unready(&node);
        self.counters.direct_links.store(self.directs.len(), Ordering::Relaxed);
        let st = self.nodes.entry(node).or_default();
        st.direct = Some(id);
        let waiters = std::mem::take(&mut st.waiters);
        self.release_waiters(waiters, &Ok(node));
        self.connecting.remove(&node);
        self.emit(NodeEvent::Connected { node, remote_static, direct: true, peer });
        self.pump(&node);
    }

    fn direct_down(&mut self, id: LinkId, outcome: Error) {
        let Some((node, _)) = self.directs.remove(&id) else { return };
        self.unready(&node);
        self.counters.direct_links.store(self.directs.len(), Ordering::Relaxed);
        self.direct_tx.remove(&id);
        let routed_up = self.demux.connection(&node, Slot::Current).is_some_and(|c| c.is_connected());
        let now = self.clock.now();
        if let Some(d) = self.deliveries.get_mut(&node) {
            if d.session == Some(DeliverySession::Direct(id)) {
                // No acknowledgement is due until a Stream on the next connection.
                d.inbox.on_connected();
                d.queued.clear();
                if routed_up {
                    // spec §17.1, §17.4 rule 2: the routed session that stayed up behind the
                    // direct link is the node's connection now; the Stream and the window go
                    // on it.
                    d.outbox.on_connected(Mode::Routed, now);
                    d.route_back = None;
                    d.route_back_check = None;
                    d.session = Some(DeliverySession::Routed);
                    d.mode = Mode::Routed;
                } else {
                    d.outbox.on_disconnected();
                    d.session = None;
                }
            }
        }
        {
            let mut direct = lock(&self.direct);
            if direct.get(&node).is_some_and(|(l, _)| *l == id) {
                direct.remove(&node);
            }
        }
        if let Some(st) = self.nodes.get_mut(&node) {
            if st.direct == Some(id) {
                st.direct = None;
            }
        }
        self.gc(&node);
        self.emit(NodeEvent::Closed { node, direct: true, outcome });
        if routed_up {
            self.pump(&node);
        }
    }

    /// Whether the node's delivery runs on another connection than its routed session (a
    /// direct link), while its sender uses delivery (a best-effort sender's messages pass).
    fn routed_stale(&self, node: &NodeId) -> bool {
        self.delivery.is_some()
            && self
                .deliveries
                .get(node)
                .is_some_and(|d| d.inbox.stream().is_some() && d.session != Some(DeliverySession::Routed))
    }

    fn on_direct(&mut self, id: LinkId, node: NodeId, m: Received) {
        // spec §17.2: delivery follows the node's newest connection; what an older direct link
        // still brings in (its Data came before a Stream on the new one) is dropped: the
        // sender sends it again on the new connection.
        let stale = self.deliveries.get(&node).is_some_and(|d| d.session != Some(DeliverySession::Direct(id)));
        if self.delivery.is_some() && stale && matches!(m, Received::Message(_) | Received::Delivery(_)) {
            tracing::debug!(%node, link = id, "delivery traffic on an older direct link dropped");
            return;
        }
        match m {
            Received::Message(m) => {
                bump(&self.counters.messages_in);
                self.counters.bytes_in.fetch_add(m.payload.len() as u64, Ordering::Relaxed);
                if self.delivery.is_some() {
                    self.on_delivery_data(node, m.channel, m.id, m.payload, Via::Direct);
                    self.pump(&node);
                    return;
                }
                self.emit(NodeEvent::Message {
                    node,
                    channel: m.channel,
                    id: m.id,
                    payload: m.payload,
                    via: Via::Direct,
                    stream: None,
                });
            }
            Received::Delivery(m) => {
                self.on_delivery_message(node, m);
                self.pump(&node);
            }
            Received::Routing(r) => {
                // spec §16.7: the peer of a direct link is not accepted as a relay.
                bump(&self.counters.dropped_not_a_relay);
                tracing::debug!(%node, route = r.route(), "routing message on a direct link dropped");
            }
        }
    }

    fn on_relay(&mut self, id: LinkId, m: Received) {
        let r = match m {
            Received::Routing(r) => r,
            Received::Message(_) | Received::Delivery(_) => {
                bump(&self.counters.dropped_link_messages);
                return;
            }
        };
        match r {
            RoutingMessage::Route { route, node } => self.learn(id, route, node),
            RoutingMessage::Withdraw { route, reason } => self.forget(id, route, reason),
            RoutingMessage::Deliver { route, packet } => self.deliver(id, route, &packet),
            RoutingMessage::Unreachable { route, reason } => self.unreachable(id, route, reason),
            RoutingMessage::Stored { route, generation, first, count } => {
                // spec §17.9: custody only spares retransmissions; delivery does not rely on it.
                tracing::trace!(route, count, "custody notice");
                self.on_stored(id, route, generation, first, count);
            }
            other => {
                // spec §16.7: `Forward` goes to relays; this node is none.
                bump(&self.counters.dropped_not_a_relay);
                tracing::debug!(route = other.route(), "routing message for a relay dropped");
            }
        }
    }

    /// spec §16.3: a `Route` binds a handle; the most recent announcement of a node wins
    /// (spec §16.6).
    fn learn(&mut self, id: LinkId, route: u32, node: NodeId) {
        let Some(link) = self.links.get_mut(&id) else { return };
        let replaced = link.routes.resolve(route).ok().filter(|n| *n != node);
        if link.routes.learn(route, node).is_err() {
            bump(&self.counters.dropped_table_full);
            tracing::debug!(route, "route table full, Route dropped");
            return;
        }
        let relay = link.relay;
        if let Some(old) = replaced {
            if self.best.get(&old) == Some(&(id, route)) {
                self.fallback(old);
            }
        }
        let previous = self.best.insert(node, (id, route));
        if previous != Some((id, route)) {
            self.unready(&node);
        }
        self.route_back(&node);
        if previous.is_some_and(|(l, _)| l == id) {
            self.pump(&node);
            return;
        }
        if self.nodes.get(&node).is_some_and(|s| s.up) {
            self.emit(NodeEvent::RouteChanged { node, relay: Some(relay) });
        }
        if self.connecting.remove(&node).is_some() {
            self.start(node);
        }
        self.pump(&node);
    }

    fn forget(&mut self, id: LinkId, route: u32, reason: RouteReason) {
        let Some(link) = self.links.get_mut(&id) else { return };
        match link.routes.forget(route) {
            Some(node) => {
                tracing::debug!(%node, %reason, "route withdrawn");
                if self.best.get(&node) == Some(&(id, route)) {
                    self.fallback(node);
                }
            }
            None => bump(&self.counters.dropped_unknown_route),
        }
    }

    /// spec §16.6: the node's route went away; use another link that announces it, newest
    /// first, or none.
    fn fallback(&mut self, node: NodeId) {
        let alternative =
            self.links.iter().rev().find_map(|(id, l)| l.routes.route_of(&node).map(|r| (*id, r, l.relay)));
        let up = self.nodes.get(&node).is_some_and(|s| s.up);
        match alternative {
            Some((id, route, relay)) => {
                self.best.insert(node, (id, route));
                self.unready(&node);
                self.route_back(&node);
                if up {
                    self.emit(NodeEvent::RouteChanged { node, relay: Some(relay) });
                }
                self.pump(&node);
            }
            None => {
                self.best.remove(&node);
                self.unready(&node);
                // spec §17.4 rule 4: what goes out now is lost; when a route comes back, what
                // is in flight goes again at once.
                if let Some(d) = self.deliveries.get_mut(&node) {
                    d.unreachable = true;
                }
                if up {
                    self.emit(NodeEvent::RouteChanged { node, relay: None });
                }
            }
        }
    }

    fn unreachable(&mut self, id: LinkId, route: u32, reason: RouteReason) {
        let Some(link) = self.links.get(&id) else { return };
        match link.routes.resolve(route) {
            Ok(node) => {
                bump(&self.counters.unreachable);
                let relay = link.relay;
                let now = self.clock.now();
                let mut sooner = 0;
                if let Some(d) = self.deliveries.get_mut(&node) {
                    d.unreachable = true;
                    if matches!(reason, RouteReason::Congested | RouteReason::SpoolFull) {
                        // spec §17.4 rule 5: a packet dropped for a passing reason; what is in
                        // flight goes again soon, not at its backed-off timeout.
                        sooner = d.outbox.on_transient_drop(now);
                    }
                }
                self.emit(NodeEvent::Unreachable { node, relay, reason });
                if sooner > 0 {
                    self.gc(&node);
                }
            }
            Err(_) => bump(&self.counters.dropped_unknown_route),
        }
    }

    /// spec §16.4, §16.6: a routed packet from the node the relay announced as `route`.
    fn deliver(&mut self, id: LinkId, route: u32, packet: &[u8]) {
        let Some(link) = self.links.get(&id) else { return };
        let Ok(node) = link.routes.resolve(route) else {
            bump(&self.counters.dropped_unknown_route);
            return;
        };
        bump(&self.counters.envelopes_in);
        let (relay, cap) = (link.relay, link.max_routed);
        let cfg = self.config_for(cap);
        let now = self.clock.now();
        // The packet shares the link's decrypted buffer; the session decrypts in place, so it
        // gets its own copy.
        let new_responder = || veil_protocol::Connection::new(cfg, Role::Responder, None, now, &mut rand::rngs::OsRng);
        match self.demux.handle_input(now, node, BytesMut::from(packet), new_responder) {
            Ok(_) => {}
            Err(e) => {
                let c = match e {
                    DemuxError::TooManyPeers => &self.counters.dropped_too_many_peers,
                    DemuxError::InitLimited => &self.counters.dropped_init_limited,
                    DemuxError::NoConnection => &self.counters.dropped_no_session,
                    _ => &self.counters.dropped_refused,
                };
                bump(c);
                tracing::trace!(%node, error = %e, "routed packet dropped");
            }
        }
        if let Some(st) = self.nodes.get_mut(&node) {
            st.last_relay = Some(relay);
        }
        self.drain(&node, Some(id));
        self.pump(&node);
    }

    fn link_ready(&mut self, id: LinkId) {
        if self.direct_tx.contains_key(&id) {
            if let Some((node, _)) = self.directs.get(&id) {
                let node = *node;
                self.pump(&node);
            }
            return;
        }
        let Some(link) = self.links.get_mut(&id) else { return };
        // The stalled envelope is in the link's queue now.
        link.stalled = false;
        let waiting: Vec<NodeId> = link.waiting.drain().collect();
        for node in waiting {
            self.pump(&node);
        }
    }

    /// Queues an envelope in the relay link's own send queue (no task in between). `false`
    /// when the queue is full: a task waits for room, queues the envelope, and reports
    /// `Ready`; the link is stalled until then.
    fn forward(&mut self, id: LinkId, msg: RoutingMessage) -> bool {
        let Some(link) = self.links.get_mut(&id) else { return true };
        let msg = match link.conn.try_send_routing(msg) {
            Ok(()) => {
                bump(&self.counters.envelopes_out);
                return true;
            }
            Err(TrySendError::Full(m)) => m,
            // Sized by the actor to fit; a link that shrank drops it like a lost packet.
            Err(TrySendError::Failed(Error::MessageTooLarge { len, max })) => {
                tracing::debug!(len, max, "envelope too large for the link");
                return true;
            }
            // The link is gone; its reader reports it. Lost like a packet in flight.
            Err(TrySendError::Failed(_)) => return true,
        };
        bump(&self.counters.link_stalls);
        link.stalled = true;
        let (conn, tx, stop, counters) =
            (link.conn.clone(), self.input_tx.clone(), self.stop.clone(), Arc::clone(&self.counters));
        self.runtime.spawn(async move {
            let queued = tokio::select! {
                r = conn.send_routing(msg) => r,
                () = stop.cancelled() => return,
            };
            match queued {
                Ok(()) => bump(&counters.envelopes_out),
                Err(Error::MessageTooLarge { len, max }) => {
                    tracing::debug!(len, max, "envelope too large for the link")
                }
                Err(e) => {
                    // The reader reports the link's end.
                    tracing::debug!(error = %e, "relay link gone");
                    return;
                }
            }
            tell(&tx, &stop, Input::Ready(id)).await;
        });
        false
    }

    // -------------------------------------------------------------------------------
    // End-to-end sessions

    /// Sends what `node`'s sessions have to send on its route, then lets waiting sends in.
    /// In a batch, only notes the node: the batch pumps it once at its end.
    fn pump(&mut self, node: &NodeId) {
        if self.batching {
            self.deferred.insert(*node);
            return;
        }
        self.delivery_pump(node);
        // Each round either sends, or lets a waiting send in: bounded by the parked sends.
        for _ in 0..=self.parked_total + 1 {
            self.transmit(node);
            if !self.unpark(node) {
                break;
            }
        }
        // A Close sealed just now (a link that had no room before, a violation found while
        // reading) finished its connection: its Closed event is read now, not whenever the
        // node next hears from its peer (a closed connection has no timer).
        let closed = [Slot::Current, Slot::Candidate]
            .into_iter()
            .any(|slot| self.demux.connection(node, slot).is_some_and(|c| c.is_closed()));
        if closed && !self.draining {
            self.drain(node, None);
        }
        self.gc(node);
    }

    fn transmit(&mut self, node: &NodeId) {
        let now = self.clock.now();
        let Some(&(id, route)) = self.best.get(node) else {
            // No route: the packets are lost, as on a network without one.
            while let Ok(Some(_)) = self.demux.poll_transmit(now, node, &mut self.buf) {
                bump(&self.counters.dropped_no_route);
            }
            if let Some(d) = self.deliveries.get_mut(node) {
                d.queued.clear();
            }
            return;
        };
        let Some(link) = self.links.get_mut(&id) else { return };
        if link.stalled {
            link.waiting.insert(*node);
            return;
        }
        let cap = link.max_routed.min(self.buf.len());
        loop {
            let before = self.data_sent(node);
            let n = match self.demux.poll_transmit(now, node, &mut self.buf[..cap]) {
                Ok(Some(n)) => n,
                Ok(None) => return,
                Err(ConnectionError::BufferTooSmall) => {
                    // A message queued for a larger route: it cannot cross this link.
                    if let Ok(Some(_)) = self.demux.poll_transmit(now, node, &mut self.buf) {
                        bump(&self.counters.dropped_too_large);
                        // Its Data are lost like the packet: no relay holds them.
                        self.record_carried(node, before, 0);
                        continue;
                    }
                    return;
                }
                Err(e) => {
                    tracing::warn!(%node, error = %e, "cannot produce a routed packet");
                    return;
                }
            };
            self.record_carried(node, before, n);
            let packet = Bytes::copy_from_slice(&self.buf[..n]);
            if !self.forward(id, RoutingMessage::Forward { route, packet }) {
                if let Some(link) = self.links.get_mut(&id) {
                    link.waiting.insert(*node);
                }
                return;
            }
        }
    }

    /// Lets waiting sends of `node` into its session while it takes them. `true` if any went.
    fn unpark(&mut self, node: &NodeId) -> bool {
        let Some(st) = self.nodes.get_mut(node) else { return false };
        let mut any = false;
        let mut refused = Vec::new();
        while let Some(p) = st.parked.pop_front() {
            self.parked_total -= 1;
            self.parked_posts -= usize::from(p.reply.is_none());
            if p.reply.as_ref().is_some_and(oneshot::Sender::is_closed) {
                continue;
            }
            let conn = self.demux.connection_mut(node, Slot::Current).filter(|c| c.is_connected());
            let Some(conn) = conn else {
                if let Some(e) = answer(p.reply, Err(Error::NoSession)) {
                    refused.push((p.channel, p.payload, e));
                }
                continue;
            };
            let len = p.payload.len();
            match conn.send(p.channel, p.payload.clone()) {
                Ok(_) => {
                    self.counters.message_out(len);
                    answer(p.reply, Ok(None));
                    any = true;
                }
                Err(ConnectionError::QueueFull) => {
                    self.parked_total += 1;
                    self.parked_posts += usize::from(p.reply.is_none());
                    st.parked.push_front(p);
                    break;
                }
                Err(e) => {
                    let e = if e == ConnectionError::Closed { Error::NoSession } else { e.into() };
                    if let Some(e) = answer(p.reply, Err(e)) {
                        refused.push((p.channel, p.payload, e));
                    }
                }
            }
        }
        for (channel, payload, error) in refused {
            self.give_back(*node, channel, payload, error);
        }
        any
    }

    /// Answers a send with `error`; a [`Command::Post`], which nobody waits for, is given back.
    fn refuse(&mut self, node: NodeId, channel: u16, payload: Bytes, reply: Option<SendReply>, error: Error) {
        if let Some(error) = answer(reply, Err(error)) {
            self.give_back(node, channel, payload, error);
        }
    }

    /// A [`Command::Post`] was refused (the node's session or route changed since its caller
    /// looked): it goes back to the application, and the node's next `send` waits for its
    /// answer again.
    fn give_back(&mut self, node: NodeId, channel: u16, payload: Bytes, error: Error) {
        self.unready(&node);
        bump(&self.counters.sends_refused);
        tracing::debug!(%node, %error, "a send taken without an answer was refused: given back");
        self.emit(NodeEvent::Refused { node, channel, payload, error });
    }

    /// The node's session, route or delivery state changed: its next `send` waits for the
    /// actor's answer.
    fn unready(&self, node: &NodeId) {
        lock(&self.ready).remove(node);
    }

    /// Drains `node`'s session events; `via` is the link the last packet came on.
    fn drain(&mut self, node: &NodeId, via: Option<LinkId>) {
        let now = self.clock.now();
        let nested = std::mem::replace(&mut self.draining, true);
        while let Some(ev) = self.demux.poll_event(now, node) {
            match ev {
                RoutedEvent::NodeMismatch { slot } => {
                    // spec §16.6: the demultiplexer denied it; the Closed event follows.
                    bump(&self.counters.node_mismatch);
                    self.mismatched.insert(*node);
                    tracing::warn!(%node, ?slot, "end-to-end peer key does not match its route's node id");
                }
                RoutedEvent::Event { slot, event } => self.on_event(node, slot, event, via),
                _ => {}
            }
        }
        self.draining = nested;
        self.gc(node);
    }

    fn on_event(&mut self, node: &NodeId, slot: Slot, event: Event, via: Option<LinkId>) {
        let node = *node;
        match event {
            Event::AuthorizationRequired { remote_static, certificate } => {
                self.authorize(node, slot, remote_static, certificate, via);
            }
            Event::Connected { remote_static, .. } => {
                let st = self.nodes.entry(node).or_default();
                if slot == Slot::Candidate {
                    // spec §16.6: the candidate has replaced the current connection.
                    st.auth[0] = st.auth[1].take();
                }
                if !st.up {
                    st.up = true;
                    self.counters.sessions.fetch_add(1, Ordering::Relaxed);
                }
                let peer = st.auth[0].as_ref().and_then(|a| a.peer.clone());
                let expires = st.auth[0].as_ref().and_then(|a| a.recheck.as_ref()).and_then(|r| r.expires);
                let waiters = std::mem::take(&mut st.waiters);
                // A new session may take other payloads than the one before.
                self.unready(&node);
                self.trust_deadline = [self.trust_deadline, expires].into_iter().flatten().min();
                self.connecting.remove(&node);
                self.release_waiters(waiters, &Ok(node));
                tracing::info!(%node, "end-to-end session established");
                self.emit(NodeEvent::Connected { node, remote_static, direct: false, peer });
                let now = self.clock.now();
                let direct = self.nodes.get(&node).is_some_and(|s| s.direct.is_some());
                if let Some(d) = self.delivery_state(&node).filter(|_| !direct) {
                    // spec §17.1, §17.4 rule 2: a new connection to the peer; the Stream and
                    // the window go on it.
                    d.outbox.on_connected(Mode::Routed, now);
                    d.inbox.on_connected();
                    d.route_back = None;
                    d.route_back_check = None;
                    d.session = Some(DeliverySession::Routed);
                    d.mode = Mode::Routed;
                    d.queued.clear();
                }
            }
            Event::Message { .. } | Event::Delivery(_) if self.routed_stale(&node) => {
                // spec §17.2: delivery follows the node's connection, here a direct link; what
                // the routed session still brings in (queued before, or a spool's replay) is
                // dropped, and the sender sends it again on the connection delivery uses.
                tracing::debug!(%node, "delivery traffic on a routed session not in use dropped");
            }
            Event::Message { channel, id, payload } => {
                bump(&self.counters.messages_in);
                self.counters.bytes_in.fetch_add(payload.len() as u64, Ordering::Relaxed);
                let relay = via.and_then(|l| self.links.get(&l)).map(|l| l.relay);
                let relay = relay.or_else(|| self.nodes.get(&node).and_then(|s| s.last_relay));
                match relay {
                    Some(relay) if self.delivery.is_some() => {
                        self.on_delivery_data(node, channel, id, payload, Via::Relay(relay));
                    }
                    Some(relay) => self.emit(NodeEvent::Message {
                        node,
                        channel,
                        id,
                        payload,
                        via: Via::Relay(relay),
                        stream: None,
                    }),
                    // Messages come only out of packets from a relay link, so one is known.
                    None => tracing::warn!(%node, "end-to-end message without a known relay dropped"),
                }
            }
            Event::Delivery(m) => self.on_delivery_message(node, m),
            Event::Closed(c) => {
                let outcome = match c.error {
                    Some(e) => Error::Protocol(e),
                    None => Error::Closed { reason: c.reason, by_peer: c.by_peer },
                };
                let st = self.nodes.entry(node).or_default();
                st.auth[slot_index(slot)] = None;
                match slot {
                    Slot::Current if st.up => {
                        st.up = false;
                        if let Some(d) = self.deliveries.get_mut(&node) {
                            if d.session == Some(DeliverySession::Routed) {
                                d.outbox.on_disconnected();
                                // No acknowledgement is due until a Stream on the next session.
                                d.inbox.on_connected();
                                d.route_back = None;
                                d.route_back_check = None;
                                d.session = None;
                            }
                        }
                        self.counters.sessions.fetch_sub(1, Ordering::Relaxed);
                        let parked = std::mem::take(&mut st.parked);
                        self.parked_total -= parked.len();
                        self.parked_posts -= parked.iter().filter(|p| p.reply.is_none()).count();
                        self.unready(&node);
                        for p in parked {
                            self.refuse(node, p.channel, p.payload, p.reply, Error::NoSession);
                        }
                        tracing::info!(%node, %outcome, "end-to-end session closed");
                        self.emit(NodeEvent::Closed { node, direct: false, outcome });
                    }
                    Slot::Current => {}
                    Slot::Candidate => {
                        bump(&self.counters.handshakes_failed);
                        tracing::debug!(%node, %outcome, "end-to-end handshake failed");
                        let _ = self.failures.send(RoutedHandshakeFailure {
                            node,
                            relay: st.last_relay,
                            node_mismatch: self.mismatched.remove(&node),
                            error: outcome.clone(),
                        });
                        let waiters = std::mem::take(&mut st.waiters);
                        self.release_waiters(waiters, &Err(outcome));
                    }
                }
            }
            Event::RevocationList { list } => {
                // spec §15.8: a list pushed end to end counts like one pushed over a link.
                match self.authorizer.trust_state().map(|s| s.update_revocation_list(&list)) {
                    Some(Ok(_)) => tracing::info!(%node, "revocation list applied"),
                    Some(Err(e)) => tracing::info!(%node, error = %e, "revocation list refused"),
                    None => tracing::debug!(%node, "revocation list ignored: no trust state"),
                }
            }
            Event::TimeSync { unix_time } => {
                // spec §15.7: believed only from a peer verified as gateway or cloud.
                let st = self.nodes.get(&node);
                let auth = st.and_then(|s| s.auth[slot_index(slot)].as_ref());
                if let (Some(state), Some(a), Some(r)) =
                    (self.authorizer.trust_state(), auth, auth.and_then(|a| a.recheck.as_ref()))
                {
                    state.accept_time_sync(&r.remote, a.peer.as_ref(), unix_time);
                }
            }
            Event::Routing(_) => {
                // Routing inside an end-to-end session is not defined (one relay per route).
                bump(&self.counters.dropped_not_a_relay);
            }
            Event::Unsent { channel, id, len } => {
                // Its entry in the node's `queued` went when it was taken off (`record_carried`).
                tracing::warn!(%node, channel, id, len, "message larger than the peer's packet limit dropped unsent");
            }
            _ => {}
        }
    }

    /// spec §5.5: the authorizer decides about an end-to-end peer whose key the
    /// demultiplexer has matched to its node id (spec §16.6).
    fn authorize(
        &mut self,
        node: NodeId,
        slot: Slot,
        remote_static: PublicKey,
        certificate: Option<Vec<u8>>,
        via: Option<LinkId>,
    ) {
        let now = self.clock.now();
        let role = self.demux.connection(&node, slot).map_or(Role::Responder, veil_protocol::Connection::role);
        let link = via.or_else(|| self.best.get(&node).map(|b| b.0)).and_then(|l| self.links.get(&l));
        let (remote_addr, transport, relay) = match link {
            Some(l) => (l.conn.remote_addr(), l.conn.transport(), Some(l.relay)),
            None => (SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)), Transport::Tcp, None),
        };
        let expected = match (self.authorizer.roles(), role) {
            (Some(r), Role::Responder) => r.inbound,
            (Some(r), Role::Initiator) => r.outbound,
            (None, _) => RoleSet::NONE,
        };
        let req = AuthRequest {
            remote_static: &remote_static,
            certificate: certificate.as_deref(),
            remote_addr,
            transport,
            role,
            expected_roles: expected,
            relay,
        };
        let (decision, peer) = self.authorizer.decide(&req);
        if matches!(decision, Decision::Deny(_)) {
            bump(&self.counters.denied);
            tracing::info!(%node, "end-to-end peer denied");
        }
        let recheck = match (self.authorizer.trust_state(), &peer) {
            (Some(state), Some(p)) => {
                Some(Recheck { remote: remote_static, expires: expiry_of(state, p), certificate, expected })
            }
            _ => None,
        };
        self.nodes.entry(node).or_default().auth[slot_index(slot)] = Some(PeerAuth { peer, recheck });
        if let Err(e) = self.demux.authorize(now, &node, slot, decision) {
            tracing::debug!(%node, error = %e, "authorization not applied");
        }
    }

    /// Starts the handshake a `connect` waits for, on the node's route.
    fn start(&mut self, node: NodeId) {
        let busy = self.demux.connection(&node, Slot::Candidate).is_some();
        let connected =
            self.demux.connection(&node, Slot::Current).is_some_and(veil_protocol::Connection::is_connected);
        let Some(&(id, _)) = self.best.get(&node) else { return };
        let Some(remote) = self.nodes.get(&node).and_then(|s| s.connect_key) else { return };
        if busy || connected {
            // A handshake is under way (perhaps the peer's), or the session is up already:
            // its Connected or Closed answers the waiters.
            return;
        }
        let cap = self.links.get(&id).map_or(wire::MIN_PACKET_LEN, |l| l.max_routed);
        let cfg = self.config_for(cap);
        let now = self.clock.now();
        // spec §16.6: an initiator that knows the responder's key sends only on a route
        // whose node id is that key's (the route is `node_id(remote)`'s by construction).
        let expected = self.config.pattern.initiator_knows_responder().then_some(remote);
        let started = veil_protocol::Connection::new(cfg, Role::Initiator, expected, now, &mut rand::rngs::OsRng)
            .map_err(Error::Protocol)
            .and_then(|c| self.demux.start(now, node, c).map_err(|_| Error::TooManyConnections));
        match started {
            Ok(()) => {
                bump(&self.counters.handshakes_started);
                tracing::debug!(%node, "end-to-end handshake started");
                self.drain(&node, Some(id));
                self.pump(&node);
            }
            Err(e) => {
                let waiters = self.nodes.get_mut(&node).map(|s| std::mem::take(&mut s.waiters)).unwrap_or_default();
                self.release_waiters(waiters, &Err(e));
                self.gc(&node);
            }
        }
    }

    /// Answers `connect` calls.
    fn release_waiters(
        &mut self,
        waiters: Vec<oneshot::Sender<Result<NodeId, Error>>>,
        result: &Result<NodeId, Error>,
    ) {
        self.pending_connects -= waiters.len();
        for w in waiters {
            let _ = w.send(result.clone());
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Connect { remote, reply } => self.on_connect(remote, reply),
            Command::Send { node, channel, payload, ttl, reply } => {
                if self.delivery.is_some() {
                    self.on_send_delivery(node, channel, payload, ttl, Some(reply));
                } else {
                    self.on_send(node, channel, payload, Some(reply));
                }
            }
            Command::Post { node, channel, payload } => {
                if self.delivery.is_some() {
                    self.on_send_delivery(node, channel, payload, None, None);
                } else {
                    self.on_send(node, channel, payload, None);
                }
            }
            Command::SendMany { node, channel, items } => {
                for (payload, reply) in items {
                    if self.delivery.is_some() {
                        self.on_send_delivery(node, channel, payload, None, Some(reply));
                    } else {
                        self.on_send(node, channel, payload, Some(reply));
                    }
                }
            }
        }
    }

    fn on_connect(&mut self, remote: PublicKey, reply: oneshot::Sender<Result<NodeId, Error>>) {
        let node = NodeId::from_public_key(&remote);
        let direct =
            self.nodes.get(&node).is_some_and(|s| s.direct.is_some()) || lock(&self.direct).contains_key(&node);
        let up = self.nodes.get(&node).is_some_and(|s| s.up);
        if direct || up {
            let _ = reply.send(Ok(node));
            return;
        }
        if self.pending_connects >= self.limits.max_pending_connects {
            // Callers that gave up still count until their node resolves: sweep them.
            for st in self.nodes.values_mut() {
                let before = st.waiters.len();
                st.waiters.retain(|w| !w.is_closed());
                self.pending_connects -= before - st.waiters.len();
            }
            if self.pending_connects >= self.limits.max_pending_connects {
                let _ = reply.send(Err(Error::TooManyConnections));
                return;
            }
        }
        let st = self.nodes.entry(node).or_default();
        st.waiters.push(reply);
        st.connect_key = Some(remote);
        self.pending_connects += 1;
        if self.best.contains_key(&node) {
            self.start(node);
        } else {
            let deadline = Instant::now() + self.limits.connect_timeout;
            self.connecting.entry(node).or_insert(deadline);
        }
    }

    /// A send without delivery; `reply` is `None` for a [`Command::Post`].
    fn on_send(&mut self, node: NodeId, channel: u16, payload: Bytes, reply: Option<SendReply>) {
        let direct = self.nodes.get(&node).and_then(|s| s.direct).and_then(|id| self.directs.get(&id));
        if let Some((_, link)) = direct {
            // The handle found no direct link a moment ago; one came since.
            let (link, counters, events) = (link.clone(), Arc::clone(&self.counters), self.events_tx.clone());
            self.runtime.spawn(async move {
                let len = payload.len();
                let r = link.send_on(channel, payload.clone()).await;
                if r.is_ok() {
                    counters.message_out(len);
                }
                if let Some(error) = answer(reply, r.map(|()| None)) {
                    bump(&counters.sends_refused);
                    let _ = events.send(NodeEvent::Refused { node, channel, payload, error }).await;
                }
            });
            return;
        }
        self.send_routed(node, channel, payload, reply);
    }

    /// [`Actor::on_send`] on the node's end-to-end session.
    fn send_routed(&mut self, node: NodeId, channel: u16, payload: Bytes, reply: Option<SendReply>) {
        let route = self.best.get(&node).copied();
        let Some(conn) = self.demux.connection_mut(&node, Slot::Current).filter(|c| c.is_connected()) else {
            return self.refuse(node, channel, payload, reply, Error::NoSession);
        };
        let Some((id, _)) = route else {
            return self.refuse(node, channel, payload, reply, Error::NoRoute);
        };
        let cap = self.links.get(&id).map_or(0, |l| l.max_routed);
        let max = conn.max_message_payload().min(cap.saturating_sub(ROUTED_DATA_OVERHEAD));
        if payload.len() > max {
            let e = Error::MessageTooLarge { len: payload.len(), max };
            return self.refuse(node, channel, payload, reply, e);
        }
        let st = self.nodes.entry(node).or_default();
        if st.parked.is_empty() {
            let len = payload.len();
            match conn.send(channel, payload.clone()) {
                Ok(_) => {
                    self.counters.message_out(len);
                    if reply.is_some() {
                        // The next sends to the node need no answer while this holds.
                        lock(&self.ready).insert(node, max);
                    }
                    answer(reply, Ok(None));
                    self.pump(&node);
                    return;
                }
                Err(ConnectionError::QueueFull) => {}
                Err(ConnectionError::Closed) => return self.refuse(node, channel, payload, reply, Error::NoSession),
                Err(e) => return self.refuse(node, channel, payload, reply, e.into()),
            }
        }
        // The session's queue is full (its link is slow): the send waits its turn, and the
        // node's next sends wait for their answers until one finds room at once.
        self.parked_posts += usize::from(reply.is_none());
        st.parked.push_back(Parked { channel, payload, deadline: None, reply });
        self.parked_total += 1;
        bump(&self.counters.sends_waited);
        self.unready(&node);
    }

    // -------------------------------------------------------------------------------
    // Delivery (spec §17)

    /// The node's delivery state, created if there is room (spec §17.1: a new stream id from
    /// the OS's CSPRNG). `None` without delivery, or at [`DeliveryOptions::max_peers`] with no
    /// idle state to drop.
    fn delivery_state(&mut self, node: &NodeId) -> Option<&mut NodeDelivery> {
        let opts = self.delivery?;
        if !self.deliveries.contains_key(node) {
            if self.deliveries.len() >= opts.max_peers.max(1) {
                let idle = self.deliveries.iter().find(|(_, d)| d.is_idle()).map(|(n, _)| *n);
                let Some(idle) = idle else {
                    tracing::debug!(%node, "no room for the delivery state of another peer");
                    return None;
                };
                self.deliveries.remove(&idle);
                lock(&self.ready).remove(&idle);
            }
            let mut stream = [0u8; veil_protocol::delivery::STREAM_ID_LEN];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut stream);
            // Invariant: the configuration was validated by `build`.
            let (Ok(outbox), Ok(inbox)) = (Outbox::new(opts.config, stream), Inbox::new(opts.config)) else {
                return None;
            };
            self.deliveries.insert(*node, NodeDelivery::new(outbox, inbox));
        }
        self.deliveries.get_mut(node)
    }

    /// The largest payload one message to `node` can carry now.
    fn delivery_max_payload(&self, node: &NodeId) -> usize {
        let direct = self.nodes.get(node).and_then(|s| s.direct).and_then(|id| self.directs.get(&id));
        if let Some((_, link)) = direct {
            return link.max_message_len();
        }
        let cap = self.best.get(node).and_then(|(id, _)| self.links.get(id)).map(|l| l.max_routed);
        let cap = cap.unwrap_or(self.limits.max_routed_packet).saturating_sub(ROUTED_DATA_OVERHEAD);
        let session = self
            .demux
            .connection(node, Slot::Current)
            .filter(|c| c.is_connected())
            .map_or(usize::MAX, veil_protocol::Connection::max_message_payload);
        cap.min(session)
    }

    /// spec §17.4: a send goes into the node's outbox, or waits for room in its window.
    fn on_send_delivery(
        &mut self,
        node: NodeId,
        channel: u16,
        payload: Bytes,
        ttl: Option<Duration>,
        reply: Option<SendReply>,
    ) {
        let max = self.delivery_max_payload(&node);
        if payload.len() > max {
            let e = Error::MessageTooLarge { len: payload.len(), max };
            return self.refuse(node, channel, payload, reply, e);
        }
        let now = self.clock.now();
        let deadline = ttl.map(|t| now + proto_duration(t));
        let counters = Arc::clone(&self.counters);
        let Some(d) = self.delivery_state(&node) else {
            return self.refuse(node, channel, payload, reply, Error::TooManyConnections);
        };
        if d.waiting.is_empty() {
            let len = payload.len();
            match d.outbox.push(channel, payload.clone(), now, ttl.map(proto_duration)) {
                Ok(id) => {
                    counters.message_out(len);
                    if reply.is_some() {
                        // The next sends to the node need no answer while this holds.
                        lock(&self.ready).insert(node, max);
                    }
                    answer(reply, Ok(Some(id)));
                    self.pump(&node);
                    return;
                }
                Err(DeliveryError::WindowFull) => {}
                Err(e) => return self.refuse(node, channel, payload, reply, Error::Delivery(e)),
            }
        }
        // spec §17.4: the window is full; the send waits for acknowledgements, and the node's
        // next sends wait for their answers until one finds room at once.
        let post = reply.is_none();
        d.waiting.push_back(Parked { channel, payload, deadline, reply });
        self.parked_posts += usize::from(post);
        self.parked_total += 1;
        bump(&counters.window_waits);
        self.unready(&node);
    }

    /// Everything the node's delivery state has to do now: expiry, waiting sends, acks and
    /// transmissions on its session. Runs at the start of every `pump`.
    fn delivery_pump(&mut self, node: &NodeId) {
        if self.delivery.is_none() {
            return;
        }
        let now = self.clock.now();
        let Some(d) = self.deliveries.get_mut(node) else { return };
        let (retransmitted, probes) = (d.outbox.stats().retransmitted, d.outbox.stats().probes);
        // spec §17.6: what ran out of time is dropped and reported; a Skip tells the peer.
        for e in d.outbox.expire(now) {
            bump(&self.counters.expired);
            emit_to(
                &mut self.out,
                &self.events_tx,
                NodeEvent::Expired {
                    node: *node,
                    channel: e.channel,
                    id: e.id,
                    payload: e.payload,
                    unconfirmed: e.unconfirmed,
                },
            );
        }
        // spec §17.4: waiting sends take the room acknowledgements made.
        let mut refused = Vec::new();
        while let Some(p) = d.waiting.front() {
            if p.reply.as_ref().is_some_and(oneshot::Sender::is_closed) {
                d.waiting.pop_front();
                self.parked_total -= 1;
                continue;
            }
            let ttl = p.deadline.map(|t| t.saturating_since(now));
            match d.outbox.push(p.channel, p.payload.clone(), now, ttl) {
                Err(DeliveryError::WindowFull) => break,
                r => {
                    let len = p.payload.len();
                    if let Some(p) = d.waiting.pop_front() {
                        self.parked_total -= 1;
                        self.parked_posts -= usize::from(p.reply.is_none());
                        if r.is_ok() {
                            self.counters.message_out(len);
                        }
                        if let Some(error) = answer(p.reply, r.map(Some).map_err(Error::Delivery)) {
                            refused.push((p.channel, p.payload, error));
                        }
                    }
                }
            }
        }
        if let Some(wait) = self.delivery.map(|o| proto_duration(o.route_back_timeout)) {
            Self::arm_route_back(d, self.demux.connection(node, Slot::Current), now + wait);
        }
        match d.session {
            Some(DeliverySession::Routed) => {
                let conn = self.demux.connection_mut(node, Slot::Current).filter(|c| c.is_connected());
                if let Some(conn) = conn {
                    while let Some(ack) = d.inbox.poll_ack(now) {
                        let _ = conn.send_delivery(DeliveryMessage::Ack(ack));
                    }
                    let limit = self.config.limits.send_queue_bytes;
                    loop {
                        let queued = conn.queued_bytes();
                        let budget = if queued == 0 { usize::MAX } else { limit.saturating_sub(queued) };
                        let Some(out) = d.outbox.poll_transmit(now, budget) else { break };
                        match out {
                            DeliveryOutput::Data { channel, id, payload } => {
                                match conn.send_data(channel, id, payload) {
                                    Ok(()) => d.queued.push_back((channel, id)),
                                    // Lost like a packet; retransmitted at its timeout.
                                    Err(e) => {
                                        tracing::debug!(%node, channel, id, error = %e, "delivery data not queued")
                                    }
                                }
                            }
                            DeliveryOutput::Message(m) => {
                                let _ = conn.send_delivery(m);
                            }
                        }
                    }
                }
            }
            Some(DeliverySession::Direct(link)) => {
                if let Some((tx, blocked)) = self.direct_tx.get(&link) {
                    loop {
                        if tx.capacity() == 0 {
                            // The writer reports `Ready` once it has room; look again in
                            // case it drained meanwhile.
                            blocked.store(true, Ordering::Release);
                            if tx.capacity() == 0 {
                                break;
                            }
                        }
                        let out = match d.inbox.poll_ack(now) {
                            Some(ack) => DirectOut::Delivery(DeliveryMessage::Ack(ack)),
                            None => match d.outbox.poll_transmit(now, usize::MAX) {
                                Some(DeliveryOutput::Data { channel, id, payload }) => {
                                    DirectOut::Data(channel, id, payload)
                                }
                                Some(DeliveryOutput::Message(m)) => DirectOut::Delivery(m),
                                None => break,
                            },
                        };
                        if tx.try_send(out).is_err() {
                            break;
                        }
                    }
                }
            }
            None => {}
        }
        let again = d.outbox.stats().retransmitted - retransmitted;
        self.counters.retransmissions.fetch_add(again, Ordering::Relaxed);
        self.counters.ack_requests.fetch_add(d.outbox.stats().probes - probes, Ordering::Relaxed);
        self.counters.window_peak.fetch_max(d.outbox.window_len(), Ordering::Relaxed);
        for (channel, payload, error) in refused {
            self.give_back(*node, channel, payload, error);
        }
    }

    /// spec §17.5: a Data message from `node`, through its inbox. Messages come out in
    /// order, each once.
    fn on_delivery_data(&mut self, node: NodeId, channel: u16, id: u64, payload: Bytes, via: Via) {
        let Some(opts) = self.delivery else { return };
        let now = self.clock.now();
        // The state is made when the session comes up; without one (no room then), the Data
        // is not taken and its sender keeps it.
        let Some(d) = self.deliveries.get_mut(&node) else {
            tracing::debug!(%node, channel, id, "no delivery state for the node, Data dropped");
            return;
        };
        match d.inbox.on_data(channel, id, payload.clone(), d.mode, now) {
            Ok(DataOutcome::Dropped(DeliveryError::NoStream)) => {
                // spec §17: a sender without delivery; best effort, as without it.
                emit_to(
                    &mut self.out,
                    &self.events_tx,
                    NodeEvent::Message { node, channel, id, payload, via, stream: None },
                );
                return;
            }
            Ok(DataOutcome::Duplicate) => bump(&self.counters.duplicates_dropped),
            Ok(_) => {}
            Err(e) => {
                // spec §17.5: in stream mode the sender broke §17.4.
                tracing::info!(%node, channel, id, error = %e, "delivery violation, closing");
                self.close_delivery_session(&node, CloseReason::ProtocolViolation);
                return;
            }
        }
        self.hand_over(&node, via, opts.auto_commit, now);
    }

    /// Hands what the node's inbox released to the application, in order.
    fn hand_over(&mut self, node: &NodeId, via: Via, auto_commit: bool, now: Timestamp) {
        let Some(d) = self.deliveries.get_mut(node) else { return };
        let stream = d.inbox.stream();
        while let Some((channel, id, payload)) = d.inbox.poll_deliver() {
            let e = NodeEvent::Message { node: *node, channel, id, payload, via, stream };
            emit_to(&mut self.out, &self.events_tx, e);
            if auto_commit {
                d.inbox.commit(channel, id, now);
            }
        }
    }

    /// Closes the session the node's delivery state uses (a broken peer, spec §9.3).
    fn close_delivery_session(&mut self, node: &NodeId, reason: CloseReason) {
        let now = self.clock.now();
        match self.deliveries.get(node).and_then(|d| d.session) {
            Some(DeliverySession::Routed) => {
                if let Some(c) = self.demux.connection_mut(node, Slot::Current) {
                    c.close(now, reason);
                }
                // The Close goes out before its Closed event is drained (see `recheck_all`).
                self.transmit(node);
            }
            Some(DeliverySession::Direct(id)) => {
                if let Some((_, link)) = self.directs.get(&id) {
                    let link = link.clone();
                    self.runtime.spawn(async move {
                        let _ = link.close(reason).await;
                    });
                }
            }
            None => {}
        }
    }

    /// spec §17.2, §17.3, §17.6: a `Stream`, `Skip` or `Ack` from `node`.
    fn on_delivery_message(&mut self, node: NodeId, m: DeliveryMessage) {
        let Some(opts) = self.delivery else {
            tracing::trace!(%node, "delivery message ignored: delivery is off");
            return;
        };
        let now = self.clock.now();
        let via = match self.deliveries.get(&node).and_then(|d| d.session) {
            Some(DeliverySession::Direct(_)) => Via::Direct,
            _ => match self.nodes.get(&node).and_then(|s| s.last_relay) {
                Some(r) => Via::Relay(r),
                None => Via::Direct,
            },
        };
        let Some(d) = self.deliveries.get_mut(&node) else { return };
        match m {
            DeliveryMessage::Stream { stream } => {
                let reset = d.inbox.on_stream(stream, now);
                tracing::debug!(%node, reset, "delivery stream read");
            }
            DeliveryMessage::Skip { channel, next } => {
                d.inbox.on_skip(channel, next, now);
                self.hand_over(&node, via, opts.auto_commit, now);
            }
            DeliveryMessage::Ack(ack) => match (d.outbox.stats().custody_lost, d.outbox.on_ack(&ack, now)) {
                (lost, Ok(freed)) => {
                    self.counters.acknowledged.fetch_add(freed as u64, Ordering::Relaxed);
                    let lost = d.outbox.stats().custody_lost - lost;
                    self.counters.custody_lost.fetch_add(lost, Ordering::Relaxed);
                }
                (_, Err(e)) => {
                    tracing::info!(%node, error = %e, "delivery violation, closing");
                    self.close_delivery_session(&node, CloseReason::ProtocolViolation);
                }
            },
            _ => {}
        }
    }

    /// Data messages sealed so far by the node's current session, and those it took off its
    /// queue unsent (too large for the route, [`Event::Unsent`]).
    fn data_sent(&self, node: &NodeId) -> (u64, u64) {
        if !self.deliveries.contains_key(node) {
            return (0, 0);
        }
        let stats = self.demux.connection(node, Slot::Current).map(|c| c.stats()).unwrap_or_default();
        (stats.messages_sent, stats.messages_unsent)
    }

    /// spec §17.9: remembers which packet carried the Data the session just sealed (they
    /// leave in the order they were queued; those dropped unsent leave the queue first, ahead
    /// of the packet's). `len` 0: the packet was dropped, and carried nothing anywhere.
    fn record_carried(&mut self, node: &NodeId, before: (u64, u64), len: usize) {
        let (after, unsent) = self.data_sent(node);
        let Some(opts) = self.delivery else { return };
        let Some(d) = self.deliveries.get_mut(node) else { return };
        let packet = &self.buf[..len];
        let header = match packet {
            [t, a, b, c, ..] if t & !wire::FLAG_GENERATION == wire::TYPE_TRANSPORT => {
                Some((t & wire::FLAG_GENERATION != 0, u32::from_be_bytes([0, *a, *b, *c])))
            }
            _ => None,
        };
        for _ in before.1..unsent {
            d.queued.pop_front();
        }
        for _ in before.0..after {
            let Some((channel, id)) = d.queued.pop_front() else { break };
            if let Some((generation, counter)) = header {
                if d.carried.len() >= opts.custody_memory {
                    d.carried.pop_front();
                }
                d.carried.push_back((generation, counter, channel, id));
            }
        }
    }

    /// spec §17.9: a relay holds some of our packets in its spool: the Data they carried is
    /// in custody (not retransmitted for a while; never freed by it).
    fn on_stored(&mut self, link: LinkId, route: u32, generation: u8, first: u32, count: u32) {
        let Some(node) = self.links.get(&link).and_then(|l| l.routes.resolve(route).ok()) else {
            bump(&self.counters.dropped_unknown_route);
            return;
        };
        let now = self.clock.now();
        let Some(d) = self.deliveries.get_mut(&node) else { return };
        let mut n = 0;
        for &(g, counter, channel, id) in &d.carried {
            let offset = counter.wrapping_sub(first) & 0x00ff_ffff;
            if g == (generation == 1) && offset < count {
                n += d.outbox.on_custody(channel, id..id + 1, now);
            }
        }
        self.counters.custody.fetch_add(n as u64, Ordering::Relaxed);
        self.pump(&node);
    }

    /// spec §17.4 rule 4: the route to a node came back after an `Unreachable`: what is in
    /// flight goes again at once. Rule 6: the routed session must then answer (see
    /// [`Self::arm_route_back`] and [`Self::check_route_back`]).
    fn route_back(&mut self, node: &NodeId) {
        let now = self.clock.now();
        let received = self.demux.connection(node, Slot::Current).map(|c| c.stats().packets_received);
        if let Some(d) = self.deliveries.get_mut(node) {
            if std::mem::take(&mut d.unreachable) {
                d.outbox.on_route_back(now);
                bump(&self.counters.routes_back);
                if d.session == Some(DeliverySession::Routed) {
                    d.route_back = received;
                    d.route_back_check = None;
                }
            }
        }
    }

    /// spec §17.4 rule 6: once the route is back and the window holds a message (then, or at
    /// the first send since), the routed session has `route_back_timeout` to authenticate a
    /// packet. A session that already did since the route came back needs no check.
    fn arm_route_back(d: &mut NodeDelivery, conn: Option<&veil_protocol::Connection>, at: Timestamp) {
        let Some(seen) = d.route_back.filter(|_| d.route_back_check.is_none() && d.outbox.window_len() > 0) else {
            return;
        };
        if conn.map(|c| c.stats().packets_received) == Some(seen) {
            d.route_back_check = Some(at);
        } else {
            d.route_back = None;
        }
    }

    /// spec §17.4 rule 6: the check is due; if the routed session has authenticated nothing
    /// since the route came back, the peer most likely lost the session (it restarted during
    /// the outage): the session ends as by an idle timeout, and the application opens
    /// another, on which the window goes again.
    fn check_route_back(&mut self, node: &NodeId, now: Timestamp) {
        let Some(d) = self.deliveries.get_mut(node) else { return };
        if d.route_back_check.is_none_or(|at| at > now) {
            return;
        }
        d.route_back_check = None;
        let Some(received) = d.route_back.take() else { return };
        if d.session != Some(DeliverySession::Routed) {
            return;
        }
        let Some(c) = self.demux.connection_mut(node, Slot::Current) else { return };
        if c.stats().packets_received != received {
            return;
        }
        bump(&self.counters.route_back_timeouts);
        tracing::info!(%node, "nothing authenticated since the route came back: end-to-end session ended");
        c.abandon(now, CloseReason::IdleTimeout);
    }

    /// spec §17.7: the application's commits; acknowledgements follow.
    fn on_commits(&mut self) {
        let commits = std::mem::take(&mut *lock(&self.commits));
        let now = self.clock.now();
        for ((node, channel), through) in commits {
            if let Some(d) = self.deliveries.get_mut(&node) {
                d.inbox.commit(channel, through, now);
                self.pump(&node);
            }
        }
    }

    fn on_timer(&mut self) {
        let at = Instant::now();
        let now = self.clock.now();
        let due: Vec<NodeId> = self.timers.iter().take_while(|(t, _)| *t <= now).map(|(_, n)| *n).collect();
        for node in due {
            self.check_route_back(&node, now);
            for slot in [Slot::Current, Slot::Candidate] {
                if let Some(c) = self.demux.connection_mut(&node, slot) {
                    c.handle_timeout(now);
                }
            }
            self.drain(&node, None);
            self.pump(&node);
        }
        let expired: Vec<NodeId> = self.connecting.iter().filter(|(_, t)| **t <= at).map(|(n, _)| *n).collect();
        for node in expired {
            self.connecting.remove(&node);
            let waiters = self.nodes.get_mut(&node).map(|s| std::mem::take(&mut s.waiters)).unwrap_or_default();
            self.release_waiters(waiters, &Err(Error::NoRoute));
            self.gc(&node);
        }
        if self.trust_deadline.is_some_and(|t| t <= at) {
            self.recheck_all();
        }
    }

    /// spec §15.8: every end-to-end session checked by a trust authorizer is checked again;
    /// those that fail now close with the mapped reason.
    fn recheck_all(&mut self) {
        let Some(state) = self.authorizer.trust_state().cloned() else { return };
        let now = self.clock.now();
        let mut deadline: Option<Instant> = None;
        let mut failed = Vec::new();
        for (node, st) in &mut self.nodes {
            let Some(a) = st.auth[0].as_mut() else { continue };
            let Some(r) = a.recheck.as_mut() else { continue };
            match state.check(&r.remote, r.certificate.as_deref(), r.expected) {
                Ok(peer) => {
                    r.expires = expiry_of(&state, &peer);
                    deadline = [deadline, r.expires].into_iter().flatten().min();
                }
                Err(e) => {
                    tracing::info!(%node, error = %e, "end-to-end peer no longer passes the trust check, closing");
                    a.recheck = None;
                    failed.push((*node, e.close_reason()));
                }
            }
        }
        self.trust_deadline = deadline;
        for (node, reason) in failed {
            if let Some(c) = self.demux.connection_mut(&node, Slot::Current) {
                c.close(now, reason);
            }
            // The Close goes out now, before its Closed event is drained (the demultiplexer
            // lets the connection go then), whatever a batch defers.
            self.transmit(&node);
            self.pump(&node);
            self.drain(&node, None);
        }
    }

    /// Files the node's next session timer, and forgets what is kept for a node that has
    /// nothing going on. Runs after everything that touches a node's sessions.
    fn gc(&mut self, node: &NodeId) {
        let now = self.clock.now();
        // A node whose link is full is pumped again when it drains ([`Input::Ready`]): what
        // is due already waits for that, not for a timer.
        let stalled = match self.deliveries.get(node).and_then(|d| d.session) {
            Some(DeliverySession::Routed) => {
                self.best.get(node).and_then(|(id, _)| self.links.get(id)).is_some_and(|l| l.stalled)
            }
            Some(DeliverySession::Direct(id)) => self.direct_tx.get(&id).is_some_and(|(tx, _)| tx.capacity() == 0),
            None => false,
        };
        let delivery = self.deliveries.get(node).and_then(|d| {
            // A due time that could not be served otherwise is looked at again a little
            // later, not in a loop.
            let check = d.route_back_check;
            [d.outbox.poll_timeout(), d.inbox.poll_timeout()]
                .into_iter()
                .flatten()
                .filter(|t| !stalled || *t > now)
                .min()
                .map(|t| t.max(now + proto_duration(DELIVERY_RETRY)))
                .into_iter()
                .chain(check)
                .min()
        });
        let next = [Slot::Current, Slot::Candidate]
            .into_iter()
            .filter_map(|s| self.demux.connection(node, s).and_then(veil_protocol::Connection::poll_timeout))
            .chain(delivery)
            .min();
        let armed = self.armed.get(node).copied();
        if armed != next {
            if let Some(t) = armed {
                self.timers.remove(&(t, *node));
                self.armed.remove(node);
            }
            if let Some(t) = next {
                self.timers.insert((t, *node));
                self.armed.insert(*node, t);
            }
        }
        let held = self.demux.connection(node, Slot::Current).is_some()
            || self.demux.connection(node, Slot::Candidate).is_some();
        if !held && self.nodes.get(node).is_some_and(NodeState::is_idle) {
            self.nodes.remove(node);
        }
    }

    /// At shutdown: the node's last packets (its Close) go on its link whatever a stall holds
    /// back; one that finds the queue full waits at most [`SHUTDOWN_GRACE`] for room in a
    /// task of its own (the tasks that wait for `stop` end at once).
    fn transmit_closing(&mut self, node: &NodeId) {
        let now = self.clock.now();
        let Some(&(id, route)) = self.best.get(node) else { return };
        let Some(link) = self.links.get(&id) else { return };
        let (conn, cap) = (link.conn.clone(), link.max_routed.min(self.buf.len()));
        // A closing connection emits its queued data and its Close: a few packets.
        for _ in 0..16 {
            let Ok(Some(n)) = self.demux.poll_transmit(now, node, &mut self.buf[..cap]) else { break };
            let msg = RoutingMessage::Forward { route, packet: Bytes::copy_from_slice(&self.buf[..n]) };
            match conn.try_send_routing(msg) {
                Ok(()) => bump(&self.counters.envelopes_out),
                Err(TrySendError::Full(m)) => {
                    let conn = conn.clone();
                    self.runtime.spawn(async move {
                        let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn.send_routing(m)).await;
                    });
                }
                Err(TrySendError::Failed(_)) => break,
            }
        }
    }

    fn shutdown(&mut self) {
        self.stop.cancel();
        let now = self.clock.now();
        let nodes: Vec<NodeId> = self.demux.nodes().collect();
        for node in &nodes {
            for slot in [Slot::Current, Slot::Candidate] {
                if let Some(c) = self.demux.connection_mut(node, slot) {
                    c.close(now, CloseReason::ShuttingDown);
                }
            }
            // The Close goes out, then its Closed event comes.
            self.transmit_closing(node);
            self.drain(node, None);
        }
        for st in self.nodes.values_mut() {
            for w in st.waiters.drain(..) {
                let _ = w.send(Err(Error::EndpointClosed));
            }
            for p in st.parked.drain(..) {
                answer(p.reply, Err(Error::EndpointClosed));
            }
        }
        for d in self.deliveries.values_mut() {
            for p in d.waiting.drain(..) {
                answer(p.reply, Err(Error::EndpointClosed));
            }
        }
        self.direct_tx.clear();
        for (_, (_, link)) in self.directs.drain() {
            self.runtime.spawn(async move {
                let _ = link.close(CloseReason::ShuttingDown).await;
            });
        }
        lock(&self.direct).clear();
        // The application may still read what happened; what does not fit is dropped.
        while let Some(e) = self.out.pop_front() {
            if self.events_tx.try_send(e).is_err() {
                break;
            }
        }
        // The links' connections stay with their owners (and the readers end with `stop`).
        self.links.clear();
        self.counters.relay_links.store(0, Ordering::Relaxed);
        self.counters.direct_links.store(0, Ordering::Relaxed);
        self.counters.sessions.store(0, Ordering::Relaxed);
    }
}

/// An event for the application: straight into its queue while that has room and nothing is
/// pending before it (so that a batch's messages reach the application as they come), else
/// after the pending ones ([`Actor::flush`] waits for room).
/// Answers a send. A [`Command::Post`] has nobody waiting: its refusal is returned instead.
fn answer(reply: Option<SendReply>, result: Result<Option<u64>, Error>) -> Option<Error> {
    match (reply, result) {
        (Some(reply), result) => {
            let _ = reply.send(result);
            None
        }
        (None, Ok(_)) => None,
        (None, Err(e)) => Some(e),
    }
}

fn emit_to(out: &mut VecDeque<NodeEvent>, events: &mpsc::Sender<NodeEvent>, e: NodeEvent) {
    if !out.is_empty() {
        out.push_back(e);
        return;
    }
    match events.try_send(e) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(e) | mpsc::error::TrySendError::Closed(e)) => out.push_back(e),
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn changed(rx: Option<&mut watch::Receiver<u64>>) {
    match rx {
        Some(rx) => {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The race [`Command::Post`] allows: a caller read the shared entry of a node just before
    /// the actor found the session gone. Its message comes back as a `Refused` event, the
    /// entry goes, and the node's next sends wait for the actor's answer again (and get the
    /// error).
    #[tokio::test]
    async fn a_post_its_session_refuses_comes_back_and_sends_wait_for_answers_again() {
        let endpoint = RoutedEndpoint::builder(StaticKeypair::from_secret_bytes([7; 32])).build().unwrap();
        let node = NodeId::from_public_key(StaticKeypair::from_secret_bytes([8; 32]).public());
        // No session with `node`: a stale entry, as if one had just ended.
        lock(&endpoint.inner.ready).insert(node, 8);
        endpoint.send(&node, 1, Bytes::from_static(b"raced")).await.unwrap();
        // Longer than the entry allows: this one waits for its answer, which comes after the
        // post's turn (commands are taken in order).
        let r = endpoint.send(&node, 1, Bytes::from_static(b"too long to post")).await;
        assert!(matches!(r, Err(Error::NoSession)), "{r:?}");
        let stats = endpoint.stats();
        assert_eq!((stats.sends_refused, stats.messages_out), (1, 0), "{stats:?}");
        assert!(!lock(&endpoint.inner.ready).contains_key(&node), "the stale entry stayed");
        match endpoint.next_event().await.unwrap() {
            NodeEvent::Refused { node: n, channel: 1, payload, error: Error::NoSession } => {
                assert_eq!((n, &payload[..]), (node, &b"raced"[..]));
            }
            other => panic!("{other:?}"),
        }
        let r = endpoint.send(&node, 1, Bytes::from_static(b"short")).await;
        assert!(matches!(r, Err(Error::NoSession)), "{r:?}");
        assert_eq!(endpoint.stats().sends_refused, 1);
        endpoint.close();
    }

    /// With delivery and no peer to acknowledge, the window fills. The posts that find it full
    /// wait in the actor, but they do not hold its commands back (as waiting `send`s would
    /// beyond `command_queue`): the node's next sends wait for their answers instead, and a
    /// `connect` is still served. (A device whose session died would otherwise never open
    /// another.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn posts_that_wait_for_the_window_do_not_hold_commands_back() {
        let mut options = DeliveryOptions::default();
        options.config.window_messages = 4;
        let limits =
            RoutedLimits { command_queue: 8, connect_timeout: Duration::from_millis(50), ..Default::default() };
        let endpoint = RoutedEndpoint::builder(StaticKeypair::from_secret_bytes([7; 32]))
            .delivery(options)
            .limits(limits)
            .build()
            .unwrap();
        let node = NodeId::from_public_key(StaticKeypair::from_secret_bytes([8; 32]).public());
        let sender = endpoint.clone();
        let sending = tokio::spawn(async move {
            for i in 0..1_000u32 {
                sender.send(&node, 1, Bytes::from(i.to_be_bytes().to_vec())).await.unwrap();
            }
        });
        for _ in 0..500 {
            if endpoint.stats().window_waits > 0 && lock(&endpoint.inner.ready).is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let stats = endpoint.stats();
        assert!(stats.window_waits > 0, "{stats:?}");
        assert!(lock(&endpoint.inner.ready).is_empty(), "a full window left the node ready");
        let other = *StaticKeypair::from_secret_bytes([9; 32]).public();
        let r = tokio::time::timeout(Duration::from_secs(5), endpoint.connect(other)).await;
        assert!(matches!(r, Ok(Err(Error::NoRoute))), "{r:?}");
        assert!(!sending.is_finished(), "sends to a node that acknowledges nothing all went");
        sending.abort();
        endpoint.close();
    }

    /// The same race with delivery: a message posted for a route that then carries less than
    /// its size is given back, not lost; the next send of that size gets the error.
    #[tokio::test]
    async fn with_delivery_a_post_that_no_longer_fits_comes_back() {
        let endpoint = RoutedEndpoint::builder(StaticKeypair::from_secret_bytes([7; 32]))
            .delivery(DeliveryOptions::default())
            .build()
            .unwrap();
        let node = NodeId::from_public_key(StaticKeypair::from_secret_bytes([8; 32]).public());
        // Without a route, a message to `node` may be as large as a routed packet allows.
        let max = RoutedLimits::default().max_routed_packet - ROUTED_DATA_OVERHEAD;
        endpoint.send(&node, 2, Bytes::from_static(b"first")).await.unwrap();
        assert_eq!(lock(&endpoint.inner.ready).get(&node), Some(&max));
        // A stale entry, as if the route had just shrunk.
        lock(&endpoint.inner.ready).insert(node, max + 100);
        let big = Bytes::from(vec![7; max + 50]);
        endpoint.send(&node, 2, big.clone()).await.unwrap();
        // Longer than the entry allows: waits for its answer, after the post's turn.
        let r = endpoint.send(&node, 2, Bytes::from(vec![7; max + 200])).await;
        assert!(matches!(r, Err(Error::MessageTooLarge { .. })), "{r:?}");
        match endpoint.next_event().await.unwrap() {
            NodeEvent::Refused { node: n, channel: 2, payload, error: Error::MessageTooLarge { .. } } => {
                assert_eq!((n, payload), (node, big));
            }
            other => panic!("{other:?}"),
        }
        let stats = endpoint.stats();
        assert_eq!((stats.sends_refused, stats.messages_out), (1, 1), "{stats:?}");
        endpoint.close();
    }
}
