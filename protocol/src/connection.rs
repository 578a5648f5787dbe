//! The sans-IO connection driver: one peer, from the first handshake packet to close.
//!
//! Inputs are `handle_*`, outputs are `poll_*` (spec §5, §7):
//!
//! - [`Connection::handle_input`] with every packet that arrives (one datagram, or one
//!   length-delimited frame without its prefix in stream mode),
//! - [`Connection::handle_timeout`] when the time returned by
//!   [`Connection::poll_timeout`] has come,
//! - then drain [`Connection::poll_transmit`] (packets to put on the carrier) and
//!   [`Connection::poll_event`] (things the application must know or decide).
//!
//! The connection never reads a clock or draws randomness itself: time is an argument,
//! and entropy comes from the RNG passed to the constructor (see [`Connection::new`]).

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, VecDeque};
use alloc::sync::Arc;
use alloc::vec::Vec;

use bytes::{Bytes, BytesMut};
use rand_core::{RngCore, SeedableRng};
use zeroize::Zeroizing;

use crate::config::Config;
use crate::cookie::MAX_COOKIE_REPLIES;
use crate::crypto::{Psk, PublicKey};
use crate::delivery::{Ack, DeliveryMessage, StreamId};
use crate::error::{ConnectionError, DecodeError, DenyReason, HandshakeError, SessionError};
use crate::handshake::{Handshake, HandshakeParams, HANDSHAKE_HASH_LEN};
use crate::message::{self, CloseReason, Message, Messages};
use crate::params::{Mode, Pattern};
use crate::payload::HandshakePayload;
use crate::routing::RoutingMessage;
use crate::session::{Role, Session};
use crate::time::{Duration, Timestamp};
use crate::wire::{self, InitHeader, Packet, RejectReason, TransportHeader};

/// What the application decides about a peer (spec §5.5).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Decision {
    /// Let the handshake go on. An IKpsk2 responder may name the initiator's psk here.
    Allow {
        /// Per-peer pre-shared key (IKpsk2 responder only); `None` uses the configured one.
        psk: Option<Psk>,
    },
    /// Refuse the peer: no session, nothing kept. The reason picks the REJECT a
    /// stream-mode responder sends and the local close reason (spec §5.5, §15.9).
    Deny(DenyReason),
}

impl Decision {
    /// Allow, with the configured psk if any.
    #[must_use]
    pub const fn allow() -> Self {
        Self::Allow { psk: None }
    }

    /// Deny as [`DenyReason::Unauthorized`].
    #[must_use]
    pub const fn deny() -> Self {
        Self::Deny(DenyReason::Unauthorized)
    }
}

/// How a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    /// The reason code (sent or received, spec §9.3).
    pub reason: CloseReason,
    /// Whether the peer closed (an authenticated `Close` message).
    pub by_peer: bool,
    /// The local error that ended the connection, if any.
    pub error: Option<ConnectionError>,
}

/// Something the application must know or decide. Drain with [`Connection::poll_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// The peer's static key is known: call [`Connection::authorize`] before anything
    /// else happens (spec §5.5).
    AuthorizationRequired {
        /// The peer's authenticated static key.
        remote_static: PublicKey,
        /// The `certificate` field of the peer's handshake payload, if any: a certificate
        /// chain (spec §15.4) to check with `veil_protocol::trust::Trust::check`.
        certificate: Option<Vec<u8>>,
    },
    /// The session is established and confirmed (spec §5.7); messages flow.
    Connected {
        /// The peer's static key.
        remote_static: PublicKey,
        /// The handshake hash, for channel binding.
        handshake_hash: [u8; HANDSHAKE_HASH_LEN],
    },
    /// A data message arrived.
    Message {
        /// Channel.
        channel: u16,
        /// Sender-assigned id.
        id: u64,
        /// Payload, sharing the decrypted packet's buffer.
        payload: Bytes,
    },
    /// A pong answered our ping.
    Pong {
        /// The ping id.
        id: u32,
    },
    /// A periodic re-handshake completed (spec §7.3).
    Rehandshaked {
        /// The new handshake hash.
        handshake_hash: [u8; HANDSHAKE_HASH_LEN],
    },
    /// The peer pushed a revocation list (spec §15.8). Unverified: offer it to the trust
    /// store (`veil_protocol::trust::TrustStore::update_revocation_list`); a list that fails
    /// there is logged and ignored, the connection goes on.
    RevocationList {
        /// The encoded list, sharing the decrypted packet's buffer.
        list: Bytes,
    },
    /// The peer sent its Unix time (spec §15.7). Only a peer verified as gateway or cloud (or
    /// configured as a time source) is to be believed.
    TimeSync {
        /// Seconds since 1970-01-01T00:00:00Z.
        unix_time: u64,
    },
    /// The peer sent a routing message (spec §16): an envelope, an announcement or a notice.
    /// The connection does not interpret it; the routing layer does (`veil_protocol::routing`).
    /// A node that does not route drops it (spec §16.7).
    Routing(RoutingMessage),
    /// The peer sent a delivery message (spec §17): an `Ack` for the local
    /// [`Outbox`](crate::delivery::Outbox), a `Stream` or `Skip` for the local
    /// [`Inbox`](crate::delivery::Inbox). The connection does not interpret it. Events keep the
    /// order of the messages in the packet, so a `Stream` comes before the Data it announces.
    Delivery(DeliveryMessage),
    /// A data message queued before the peer announced its packet limit (spec §3.3) turned
    /// out larger than one packet to that peer: it was taken off the queue unsent (it would
    /// otherwise block every message behind it). The application may send it again in
    /// smaller pieces.
    Unsent {
        /// Channel.
        channel: u16,
        /// The id it was queued with.
        id: u64,
        /// Payload length.
        len: usize,
    },
    /// The connection is over. No further events follow.
    Closed(Closed),
}

/// Traffic counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnectionStats {
    /// Data messages queued by the application and sent.
    pub messages_sent: u64,
    /// Data messages taken off the queue unsent, each reported by an [`Event::Unsent`].
    pub messages_unsent: u64,
    /// Data messages delivered to the application.
    pub messages_received: u64,
    /// Packets put on the carrier (handshake and transport).
    pub packets_sent: u64,
    /// Packets accepted.
    pub packets_received: u64,
    /// Packets refused (malformed, unauthenticated, replayed…).
    pub packets_dropped: u64,
    /// Bytes put on the carrier (packet bytes, without stream length prefixes).
    pub bytes_sent: u64,
    /// Bytes of accepted packets.
    pub bytes_received: u64,
    /// Epoch changes (symmetric rekeys), both directions.
    pub rekeys: u64,
    /// Completed re-handshakes.
    pub rehandshakes: u64,
    /// Re-handshake messages that arrived in an authenticated packet but were not usable
    /// (stale, duplicate or failed); the packet itself was accepted (spec §7.3).
    pub handshake_messages_ignored: u64,
}

/// Timers are data (spec §7.7): each slot holds an optional deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
enum Timer {
    /// Initial handshake (until confirmed) or re-handshake must finish.
    Handshake,
    /// Resend the last handshake packet (datagram mode).
    Retransmit,
    /// Send a keepalive.
    Keepalive,
    /// Nothing received for too long.
    Idle,
    /// Start a re-handshake (initiator).
    Rehandshake,
    /// Session passed `REJECT_AFTER_TIME`.
    Expiry,
    /// Drop the previous session / previous epoch key.
    Overlap,
}

const TIMER_COUNT: usize = 7;

#[derive(Debug, Default)]
struct Timers([Option<Timestamp>; TIMER_COUNT]);

impl Timers {
    fn set(&mut self, t: Timer, at: Timestamp) {
        self.0[t as usize] = Some(at);
    }
    fn clear(&mut self, t: Timer) {
        self.0[t as usize] = None;
    }
    fn expired(&self, t: Timer, now: Timestamp) -> bool {
        matches!(self.0[t as usize], Some(at) if now >= at)
    }
    fn next(&self) -> Option<Timestamp> {
        self.0.iter().flatten().min().copied()
    }
}

/// A handshake with its retransmission state (spec §5.7).
#[derive(Debug)]
struct Driver {
    hs: Handshake,
    /// The authorization decision is pending.
    awaiting_decision: bool,
    /// Last handshake packet we wrote (resent on timeout or duplicate).
    last_sent: Option<Vec<u8>>,
    /// Last handshake packet we read and have not answered yet.
    last_read: Option<Vec<u8>>,
    /// A packet we read and our answer to it: a byte-identical repeat of the former is
    /// answered with the latter (spec §5.7). Never set for a packet we sent first, so
    /// duplicates cannot make two peers ping-pong.
    reply: Option<(Vec<u8>, Vec<u8>)>,
    /// Datagram XX/XXpsk3 responder: the seed of its handshake RNG, to rebuild the
    /// handshake after a FINAL that failed half-way (see `restore_responder`).
    replay_seed: Option<Zeroizing<[u8; 32]>>,
    rto: Duration,
    generation: bool,
    /// COOKIE_REPLYs acted on (initiator, first handshake; spec §5.7.4).
    cookie_replies: u8,
}

#[derive(Debug)]
struct Established {
    current: Session,
    /// Responder: the peer has not yet proven it holds the keys (spec §5.7).
    confirmed: bool,
    /// Replaced session, still accepted until the overlap ends (spec §7.3). Boxed, like
    /// `pending`: both exist only around a re-handshake, and inline they would triple the
    /// size of every idle connection (spec §13).
    previous: Option<(Box<Session>, Timestamp)>,
    /// A re-handshake's new session, complete on this side and waiting for the peer's
    /// first packet in it (spec §5.9.1), with its handshake hash (exported only once the
    /// session is promoted).
    pending: Option<Box<(Session, [u8; HANDSHAKE_HASH_LEN])>>,
    rehandshake: Option<Box<Driver>>,
    /// Initiator of a 3-message pattern (datagram): FINAL, resent until the responder's
    /// first packet arrives (spec §5.7).
    final_sent: Option<Vec<u8>>,
    /// See [`Driver::reply`]; dropped once the session is confirmed both ways.
    reply: Option<(Vec<u8>, Vec<u8>)>,
    /// Initiator in datagram mode: no authenticated packet from the responder yet, so the
    /// confirmation (or FINAL) may have been lost and is repeated (spec §5.7.2).
    awaiting_peer: bool,
    /// Datagram mode, after switching at once to a re-handshake's new session: no packet of
    /// the new generation from the peer yet, so the replaced session is kept for receiving
    /// whatever its deadline (the peer, still pending, sends in it; spec §7.3).
    peer_unproven: bool,
    /// XX re-handshake initiator: FINAL, repeated inside the old session until the new
    /// session is confirmed (datagram mode, spec §7.3).
    rehandshake_final: Option<Vec<u8>>,
    /// Digest of the last re-handshake INIT or FINAL this responder answered, so that a late
    /// repeat of it is recognised instead of starting a new re-handshake (spec §7.3).
    answered: Option<u64>,
}

#[derive(Debug)]
enum Phase {
    /// A responder before the first packet.
    AwaitingInit,
    Handshaking(Box<Driver>),
    Established(Box<Established>),
    Closed,
}

#[derive(Debug)]
enum Outgoing {
    Data {
        channel: u16,
        id: u64,
        payload: Bytes,
    },
    Ping(u32),
    Pong(u32),
    /// A re-handshake packet; `switch` = move to the new session once it was sealed
    /// (the XX initiator's FINAL must travel in the old session).
    Rehandshake(Vec<u8>, bool),
    /// A revocation list (spec §15.8).
    RevocationPush(Bytes),
    /// The local Unix time (spec §15.7).
    TimeSync(u64),
    /// A routing message (spec §16).
    Routing(RoutingMessage),
    /// A delivery acknowledgement (spec §17.3), boxed: its ranges would double the size of
    /// every queued message.
    Ack(Box<Ack>),
    /// spec §17.2.
    Stream(StreamId),
    /// spec §17.6.
    Skip(u16, u64),
}

impl Outgoing {
    fn message(&self) -> Message<'_> {
        match self {
            Self::Data { channel, id, payload } => Message::Data { channel: *channel, id: *id, payload },
            Self::Ping(id) => Message::Ping { id: *id },
            Self::Pong(id) => Message::Pong { id: *id },
            Self::Rehandshake(p, _) => Message::Handshake { packet: p },
            Self::RevocationPush(list) => Message::RevocationPush { list },
            Self::TimeSync(unix_time) => Message::TimeSync { unix_time: *unix_time },
            Self::Routing(m) => m.message(),
            Self::Ack(ack) => Message::Ack(**ack),
            Self::Stream(stream) => Message::Stream { stream: *stream },
            Self::Skip(channel, next) => Message::Skip { channel: *channel, next: *next },
        }
    }

    /// Bytes this message counts against `send_queue_bytes`: data payloads and envelope packets.
    fn queued_len(&self) -> usize {
        match self {
            Self::Data { payload, .. } => payload.len(),
            Self::Routing(RoutingMessage::Forward { packet, .. } | RoutingMessage::Deliver { packet, .. }) => {
                packet.len()
            }
            _ => 0,
        }
    }
}

/// Length of the run at the front of `q` that must share a packet: the `Stream`s and `Skip`s
/// there and the message after them (spec §17.2).
fn glued_len(q: &VecDeque<Outgoing>) -> usize {
    let mut n = 0;
    for m in q {
        n += m.message().encoded_len();
        if !matches!(m, Outgoing::Stream(_) | Outgoing::Skip(..)) {
            break;
        }
    }
    n
}

/// One Veil connection (spec §5–§7), sans IO.
#[derive(Debug)]
pub struct Connection {
    config: Arc<Config>,
    role: Role,
    /// The peer key the pattern needs in advance (initiator: responder's; KK responder:
    /// the initiator's).
    expected_peer: Option<PublicKey>,
    /// Fast-key-erasure seed for later handshakes and indices (see `next_seed`).
    seed: Zeroizing<[u8; 32]>,
    local_index: u32,
    phase: Phase,
    events: VecDeque<Event>,
    /// Raw packets to send first (handshake packets, rejects).
    control: VecDeque<Vec<u8>>,
    /// Control messages for the session (pings, pongs, re-handshake packets).
    priority: VecDeque<Outgoing>,
    queue: VecDeque<Outgoing>,
    queued_bytes: usize,
    next_id: BTreeMap<u16, u64>,
    close_pending: Option<CloseReason>,
    /// Send a transport packet even if empty (confirmation or keepalive).
    empty_packet_due: bool,
    timers: Timers,
    remote_static: Option<PublicKey>,
    /// IKpsk2 responder: the psk the authorization decision named, reused by re-handshakes.
    peer_psk: Option<Psk>,
    handshake_hash: Option<[u8; HANDSHAKE_HASH_LEN]>,
    stats: ConnectionStats,
    started: Timestamp,
    #[cfg(feature = "dangerous-testing")]
    fixed_ephemeral: Option<[u8; 32]>,
}

/// A session-less stand-in so that the struct stays small when closed.
fn closed_event(reason: CloseReason, by_peer: bool, error: Option<ConnectionError>) -> Event {
    Event::Closed(Closed { reason, by_peer, error })
}

impl Connection {
    /// Creates a connection. `role` says whether this side sends the first handshake
    /// message; `remote_static` is the peer's key when the pattern needs it in advance
    /// (IK/IKpsk2/KK initiator, KK responder). `rng` is read once, here: 32 bytes seed the
    /// connection's own generator (fast key erasure) for ephemeral keys and indices.
    ///
    /// An initiator queues its first packet immediately: call
    /// [`Connection::poll_transmit`] next.
    ///
    /// # Errors
    /// [`HandshakeError::Config`] when the configuration cannot run the pattern, or its
    /// certificate chain is too long for a handshake payload (spec §15.4).
    pub fn new(
        config: Arc<Config>,
        role: Role,
        remote_static: Option<PublicKey>,
        now: Timestamp,
        rng: &mut dyn rand_core::CryptoRngCore,
    ) -> Result<Self, ConnectionError> {
        if config.certificate_chain.as_ref().is_some_and(|c| c.len() > crate::trust::MAX_CHAIN_LEN) {
            // spec §15.4: a longer chain cannot fit a handshake payload.
            return Err(HandshakeError::Config("certificate chain longer than MAX_CHAIN_LEN").into());
        }
        let mut seed = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(seed.as_mut());
        let mut c = Self {
            config,
            role,
            expected_peer: remote_static,
            seed,
            local_index: 0,
            phase: Phase::Closed,
            events: VecDeque::new(),
            control: VecDeque::new(),
            priority: VecDeque::new(),
            queue: VecDeque::new(),
            queued_bytes: 0,
            next_id: BTreeMap::new(),
            close_pending: None,
            empty_packet_due: false,
            timers: Timers::default(),
            remote_static: None,
            peer_psk: None,
            handshake_hash: None,
            stats: ConnectionStats::default(),
            started: now,
            #[cfg(feature = "dangerous-testing")]
            fixed_ephemeral: None,
        };
        c.local_index = c.next_u32();
        c.timers.set(Timer::Handshake, now + c.config.limits.handshake_timeout);
        if role == Role::Initiator {
            let driver = c.start_initiator(false)?;
            c.phase = Phase::Handshaking(driver);
            c.send_handshake_packet(now)?;
        } else {
            // A responder waits for HANDSHAKE_INIT; the handshake is built once it arrives.
            c.phase = Phase::AwaitingInit;
        }
        Ok(c)
    }

    /// Like [`Connection::new`] with a fixed ephemeral key, for test vectors only.
    ///
    /// # Errors
    /// As [`Connection::new`].
    #[cfg(feature = "dangerous-testing")]
    pub fn new_with_fixed_ephemeral_for_testing_only(
        config: Arc<Config>,
        role: Role,
        remote_static: Option<PublicKey>,
        now: Timestamp,
        rng: &mut dyn rand_core::CryptoRngCore,
        ephemeral: [u8; 32],
        local_index: u32,
    ) -> Result<Self, ConnectionError> {
        let mut c = Self::new(config, Role::Responder, remote_static, now, rng)?;
        c.role = role;
        c.fixed_ephemeral = Some(ephemeral);
        c.local_index = local_index;
        if role == Role::Initiator {
            let driver = c.start_initiator(false)?;
            c.phase = Phase::Handshaking(driver);
            c.send_handshake_packet(now)?;
        }
        Ok(c)
    }

    /// 32 fresh bytes from the connection's generator; the seed is replaced first, so a
    /// later compromise does not reveal earlier outputs.
    fn next_seed(&mut self) -> Zeroizing<[u8; 32]> {
        let mut g = rand_chacha::ChaCha20Rng::from_seed(*self.seed);
        let mut out = Zeroizing::new([0u8; 32]);
        g.fill_bytes(self.seed.as_mut());
        g.fill_bytes(out.as_mut());
        out
    }

    fn next_u32(&mut self) -> u32 {
        let s = self.next_seed();
        u32::from_le_bytes([s[0], s[1], s[2], s[3]])
    }

    fn handshake_rng(&mut self) -> rand_chacha::ChaCha20Rng {
        rand_chacha::ChaCha20Rng::from_seed(*self.next_seed())
    }

    fn fixed_ephemeral(&self) -> Option<[u8; 32]> {
        #[cfg(feature = "dangerous-testing")]
        {
            self.fixed_ephemeral
        }
        #[cfg(not(feature = "dangerous-testing"))]
        {
            None
        }
    }

    fn start_initiator(&mut self, generation: bool) -> Result<Box<Driver>, ConnectionError> {
        let mut rng = self.handshake_rng();
        let eph = self.fixed_ephemeral();
        let config = Arc::clone(&self.config);
        let remote = self.expected_peer;
        let p = HandshakeParams {
            config: &config,
            pattern: config.pattern,
            suite: config.suite,
            local_index: self.local_index,
            remote_static: remote.as_ref(),
            psk: config.psk.as_ref(),
            fixed_ephemeral: eph.as_ref(),
        };
        let hs = Handshake::initiator(&p, &mut rng)?;
        Ok(Box::new(Driver::new(hs, &self.config, generation)))
    }

    /// This side's session index (datagram mode: peers address packets to it).
    #[must_use]
    pub const fn local_index(&self) -> u32 {
        self.local_index
    }

    /// Which side sent the first handshake message.
    #[must_use]
    pub const fn role(&self) -> Role {
        self.role
    }

    /// The peer's authenticated static key, once known.
    #[must_use]
    pub const fn remote_static(&self) -> Option<&PublicKey> {
        self.remote_static.as_ref()
    }

    /// The handshake hash of the current session (channel binding).
    #[must_use]
    pub const fn handshake_hash(&self) -> Option<&[u8; HANDSHAKE_HASH_LEN]> {
        self.handshake_hash.as_ref()
    }

    /// Traffic counters.
    #[must_use]
    pub fn stats(&self) -> ConnectionStats {
        let mut s = self.stats;
        if let Phase::Established(e) = &self.phase {
            let st = e.current.stats();
            s.rekeys += st.send_rekeys + st.recv_rekeys;
        }
        s
    }

    /// Whether the session is established and confirmed (messages flow).
    #[must_use]
    pub fn is_connected(&self) -> bool {
        matches!(&self.phase, Phase::Established(e) if e.confirmed)
    }

    /// Whether the connection is over.
    #[must_use]
    pub const fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed)
    }

    /// The established session, for diagnostics.
    #[must_use]
    pub fn session(&self) -> Option<&Session> {
        match &self.phase {
            Phase::Established(e) => Some(&e.current),
            _ => None,
        }
    }

    /// The established session, mutably: for benchmarks and drivers that seal and open
    /// transport packets directly. Bypasses the connection's queues and counters.
    pub fn session_mut(&mut self) -> Option<&mut Session> {
        match &mut self.phase {
            Phase::Established(e) => Some(&mut e.current),
            _ => None,
        }
    }

    /// The largest payload one data message can carry to this peer right now.
    #[must_use]
    pub fn max_message_payload(&self) -> usize {
        let plaintext = match &self.phase {
            Phase::Established(e) => e.current.max_plaintext_len(),
            _ => self.config.limits.packet_len() - wire::transport_overhead(self.config.mode),
        };
        // Data framing: kind, channel (≤ 3), id (≤ 10), length (≤ 3).
        plaintext.saturating_sub(17)
    }

    /// Next event, if any. Call until `None` after every `handle_*` call.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Releases the storage of internal queues that are empty (events, packets and messages
    /// waiting to be sent), the sessions' expanded cipher state (AES-GCM key schedules; the raw
    /// keys stay) and replay bitmaps a run of counters describes as well (datagram mode; see
    /// [`Session::release_idle_memory`]), for a connection that has gone idle: a driver holding many idle
    /// connections calls it after the handshake and from time to time. Changes nothing but
    /// memory; the queues grow again when used.
    pub fn release_idle_memory(&mut self) {
        fn release<T>(q: &mut VecDeque<T>) {
            if q.is_empty() && q.capacity() > 0 {
                *q = VecDeque::new();
            }
        }
        release(&mut self.events);
        release(&mut self.control);
        release(&mut self.priority);
        release(&mut self.queue);
        if let Phase::Established(est) = &mut self.phase {
            est.current.release_idle_memory();
            if let Some((s, _)) = &mut est.previous {
                s.release_idle_memory();
            }
            if let Some(p) = &mut est.pending {
                p.0.release_idle_memory();
            }
        }
    }

    /// When [`Connection::handle_timeout`] must be called next, if ever.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        if self.is_closed() {
            return None;
        }
        let overlap = match &self.phase {
            Phase::Established(est) => est.overlap_deadline(),
            _ => None,
        };
        [self.timers.next(), overlap].into_iter().flatten().min()
    }

    /// Queues a data message on `channel` and returns its id (spec §9.2). Messages queued
    /// before the connection is confirmed leave once it is.
    ///
    /// # Errors
    /// [`ConnectionError::QueueFull`] when `send_queue_bytes` would be exceeded (try again
    /// after draining `poll_transmit`), [`ConnectionError::MessageTooLarge`],
    /// [`ConnectionError::Closed`].
    pub fn send(&mut self, channel: u16, payload: Bytes) -> Result<u64, ConnectionError> {
        let id = self.next_id.get(&channel).copied().unwrap_or(0);
        // The id is taken only once the message is queued.
        self.send_data(channel, id, payload)?;
        self.next_id.insert(channel, id.wrapping_add(1));
        Ok(id)
    }

    /// Queues a data message with the id the caller assigned (spec §17.2): for the delivery
    /// layer ([`Outbox::poll_transmit`](crate::delivery::Outbox::poll_transmit)), whose ids
    /// belong to its stream and repeat on retransmission. [`Connection::send`]'s own numbering
    /// is not touched. Messages queued before the connection is confirmed leave once it is.
    ///
    /// # Errors
    /// As [`Connection::send`].
    pub fn send_data(&mut self, channel: u16, id: u64, payload: Bytes) -> Result<(), ConnectionError> {
        if self.is_closed() || self.close_pending.is_some() {
            return Err(ConnectionError::Closed);
        }
        if payload.len() > self.max_message_payload() {
            return Err(ConnectionError::MessageTooLarge);
        }
        if self.queued_bytes + payload.len() > self.config.limits.send_queue_bytes && !self.queue.is_empty() {
            return Err(ConnectionError::QueueFull);
        }
        self.queued_bytes += payload.len();
        self.queue.push_back(Outgoing::Data { channel, id, payload });
        Ok(())
    }

    /// Queues a delivery message for the peer (spec §17). An `Ack` leaves ahead of queued
    /// data; a `Stream` or `Skip` follows the data already queued, so that it precedes the
    /// Data queued after it (spec §17.2), and is never refused for space. Messages queued
    /// before the connection is confirmed leave once it is.
    ///
    /// # Errors
    /// [`ConnectionError::Closed`].
    pub fn send_delivery(&mut self, msg: DeliveryMessage) -> Result<(), ConnectionError> {
        if self.is_closed() || self.close_pending.is_some() {
            return Err(ConnectionError::Closed);
        }
        match msg {
            DeliveryMessage::Ack(ack) => self.priority.push_back(Outgoing::Ack(Box::new(ack))),
            DeliveryMessage::Stream { stream } => self.queue.push_back(Outgoing::Stream(stream)),
            DeliveryMessage::Skip { channel, next } => self.queue.push_back(Outgoing::Skip(channel, next)),
        }
        Ok(())
    }

    /// Bytes queued by [`Connection::send`] and not yet sealed.
    #[must_use]
    pub const fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// Queues a ping; the peer answers with a pong ([`Event::Pong`]).
    ///
    /// # Errors
    /// [`ConnectionError::NotConnected`] before the session is established.
    pub fn ping(&mut self, id: u32) -> Result<(), ConnectionError> {
        if !self.is_connected() {
            return Err(ConnectionError::NotConnected);
        }
        self.priority.push_back(Outgoing::Ping(id));
        Ok(())
    }

    /// Queues a revocation list for the peer (`RevocationPush`, spec §15.8), ahead of data.
    ///
    /// # Errors
    /// [`ConnectionError::NotConnected`]; [`ConnectionError::MessageTooLarge`] if the list is
    /// longer than `MAX_REVOCATION_LIST_LEN` or does not fit one packet to this peer (it then
    /// has to get the list by other means).
    pub fn push_revocation_list(&mut self, list: Bytes) -> Result<(), ConnectionError> {
        if !self.is_connected() {
            return Err(ConnectionError::NotConnected);
        }
        if list.len() > crate::trust::MAX_REVOCATION_LIST_LEN || list.len() > self.max_message_payload() {
            return Err(ConnectionError::MessageTooLarge);
        }
        self.priority.push_back(Outgoing::RevocationPush(list));
        Ok(())
    }

    /// Queues a routing message for the peer (spec §16). Envelopes (`Forward`, `Deliver`)
    /// join the data queue and count against `send_queue_bytes`; `Route` and `Unreachable`
    /// leave ahead of queued data (an announcement precedes the envelopes that use it,
    /// spec §16.3); `Withdraw` follows the envelopes already queued and is never refused for
    /// space. Messages queued before the connection is confirmed leave once it is.
    ///
    /// # Errors
    /// [`ConnectionError::Closed`]; for envelopes: [`ConnectionError::QueueFull`] (a relay
    /// answers `Unreachable { Congested }`), [`ConnectionError::MessageTooLarge`] when the
    /// envelope does not fit one packet to this peer (`Unreachable { TooLarge }`), and
    /// `ConnectionError::Decode(DecodeError::MalformedMessage)` for an empty packet (spec §9.2).
    pub fn send_routing(&mut self, msg: RoutingMessage) -> Result<(), ConnectionError> {
        if self.is_closed() || self.close_pending.is_some() {
            return Err(ConnectionError::Closed);
        }
        let out = Outgoing::Routing(msg);
        match &out {
            Outgoing::Routing(RoutingMessage::Forward { packet, .. } | RoutingMessage::Deliver { packet, .. }) => {
                if packet.is_empty() {
                    return Err(DecodeError::MalformedMessage.into());
                }
                let limit = match &self.phase {
                    Phase::Established(e) => e.current.max_plaintext_len(),
                    _ => self.config.limits.packet_len() - wire::transport_overhead(self.config.mode),
                };
                if out.message().encoded_len() > limit {
                    return Err(ConnectionError::MessageTooLarge);
                }
                let len = out.queued_len();
                if self.queued_bytes + len > self.config.limits.send_queue_bytes && !self.queue.is_empty() {
                    return Err(ConnectionError::QueueFull);
                }
                self.queued_bytes += len;
                self.queue.push_back(out);
            }
            Outgoing::Routing(RoutingMessage::Withdraw { .. }) => self.queue.push_back(out),
            _ => self.priority.push_back(out),
        }
        Ok(())
    }

    /// Queues the local Unix time for the peer (`TimeSync`, spec §15.7), ahead of data.
    ///
    /// # Errors
    /// [`ConnectionError::NotConnected`].
    pub fn send_time_sync(&mut self, unix_time: u64) -> Result<(), ConnectionError> {
        if !self.is_connected() {
            return Err(ConnectionError::NotConnected);
        }
        self.priority.push_back(Outgoing::TimeSync(unix_time));
        Ok(())
    }

    /// Closes the connection with `reason` (spec §7.6). Queued data is sent first, then
    /// an authenticated `Close`; [`Event::Closed`] follows once it was transmitted.
    pub fn close(&mut self, now: Timestamp, reason: CloseReason) {
        match &self.phase {
            Phase::Established(e) if e.confirmed => self.close_pending = Some(reason),
            Phase::Closed => {}
            _ => self.finish(now, reason, false, None),
        }
    }

    /// Ends the connection at once, locally, sending nothing (spec §7.6), as its idle timeout
    /// would: for a driver that judges the peer gone before that (spec §17.4 rule 6).
    /// [`Event::Closed`] follows with `by_peer: false`.
    pub fn abandon(&mut self, now: Timestamp, reason: CloseReason) {
        self.finish(now, reason, false, None);
    }

    /// Answers [`Event::AuthorizationRequired`] (spec §5.5).
    ///
    /// # Errors
    /// [`ConnectionError::NoDecisionPending`], or the handshake error that followed.
    pub fn authorize(&mut self, now: Timestamp, decision: Decision) -> Result<(), ConnectionError> {
        let (pattern, role) = match &self.phase {
            Phase::Handshaking(d) if d.awaiting_decision => (d.hs.pattern(), d.hs.role()),
            _ => return Err(ConnectionError::NoDecisionPending),
        };
        let psk = match decision {
            Decision::Deny(reason) => {
                // spec §5.5, §15.9: only a stream-mode responder answers, with the mapped
                // reason; a datagram responder and any initiator send nothing.
                if self.role == Role::Responder && self.config.mode == Mode::Stream {
                    self.control.push_back(alloc::vec![wire::TYPE_HANDSHAKE_REJECT, reason.reject_reason().code()]);
                }
                let e = ConnectionError::Handshake(HandshakeError::Denied(reason));
                self.finish(now, reason.close_reason(), false, Some(e.clone()));
                return Err(e);
            }
            Decision::Allow { psk } => psk,
        };
        // spec §5.4: an IKpsk2 responder names the psk now, per initiator or configured.
        if pattern == Pattern::IKpsk2 && role == Role::Responder {
            let Some(psk) = psk.or_else(|| self.config.psk.clone()) else {
                return Err(self.fail(now, HandshakeError::Config("pattern needs a pre-shared key")));
            };
            self.peer_psk = Some(psk.clone());
            let r = match &mut self.phase {
                Phase::Handshaking(d) => d.hs.set_psk(&psk),
                _ => Ok(()),
            };
            if let Err(e) = r {
                return Err(self.fail(now, e));
            }
        }
        if let Phase::Handshaking(d) = &mut self.phase {
            d.awaiting_decision = false;
        }
        self.advance_handshake(now)
    }

    fn fail(&mut self, now: Timestamp, e: HandshakeError) -> ConnectionError {
        let err = ConnectionError::Handshake(e);
        self.finish(now, CloseReason::ProtocolViolation, false, Some(err.clone()));
        err
    }

    fn finish(&mut self, _now: Timestamp, reason: CloseReason, by_peer: bool, error: Option<ConnectionError>) {
        if self.is_closed() {
            return;
        }
        self.phase = Phase::Closed;
        self.queue.clear();
        self.priority.clear();
        self.queued_bytes = 0;
        self.timers = Timers::default();
        self.events.push_back(closed_event(reason, by_peer, error));
    }

    /// After a read or a decision: write our next message, or finish.
    fn advance_handshake(&mut self, now: Timestamp) -> Result<(), ConnectionError> {
        let Phase::Handshaking(driver) = &mut self.phase else {
            return Ok(());
        };
        if driver.awaiting_decision {
            return Ok(());
        }
        if driver.hs.is_my_turn() {
            self.send_handshake_packet(now)?;
        }
        let Phase::Handshaking(driver) = &mut self.phase else {
            return Ok(());
        };
        if driver.hs.is_finished() {
            self.complete_handshake(now)?;
        }
        Ok(())
    }

    /// The payload of a re-handshake message: no certificate (spec §5.4.1: re-handshakes
    /// run no decision, §5.5).
    fn payload(&self) -> HandshakePayload {
        let limit = self.config.limits.packet_len();
        HandshakePayload {
            max_packet_len: (limit < wire::MAX_PACKET_LEN).then(|| u16::try_from(limit).unwrap_or(u16::MAX)),
            ..HandshakePayload::default()
        }
    }

    /// The payload of message `step` (0-based) of the first handshake: the local certificate
    /// chain goes in every message except XX/XXpsk3 message 1, which has no confidentiality
    /// (spec §5.3, §5.4.1, §15.4).
    fn first_payload(&self, pattern: Pattern, step: usize) -> HandshakePayload {
        let cleartext = step == 0 && matches!(pattern, Pattern::XX | Pattern::XXpsk3);
        HandshakePayload {
            certificate: if cleartext { None } else { self.config.certificate_chain.clone() },
            ..self.payload()
        }
    }

    fn send_handshake_packet(&mut self, now: Timestamp) -> Result<(), ConnectionError> {
        let payload = match &self.phase {
            Phase::Handshaking(d) => self.first_payload(d.hs.pattern(), d.hs.step()),
            _ => return Ok(()),
        };
        let mode = self.config.mode;
        let rto = self.config.limits.handshake_rto;
        let Phase::Handshaking(driver) = &mut self.phase else {
            return Ok(());
        };
        let mut buf = alloc::vec![0u8; wire::HANDSHAKE_PAYLOAD_MAX + 160];
        let n = match driver.hs.write(&payload, &mut buf) {
            Ok(n) => n,
            Err(e) => return Err(self.fail(now, e)),
        };
        buf.truncate(n);
        // Queued and cached packets take their own size, not the scratch buffer's ~1.2 KiB
        // (spec §13: handshake peak and per-connection heap).
        buf.shrink_to_fit();
        driver.last_sent = Some(buf.clone());
        if let Some(read) = driver.last_read.take() {
            driver.reply = Some((read, buf.clone()));
        }
        driver.rto = rto;
        // spec §5.7: only the initiator retransmits on a timer.
        if mode.is_lossy() && driver.hs.role() == Role::Initiator {
            self.timers.set(Timer::Retransmit, now + rto);
        }
        self.control.push_back(buf);
        Ok(())
    }

    fn complete_handshake(&mut self, now: Timestamp) -> Result<(), ConnectionError> {
        let Phase::Handshaking(driver) = core::mem::replace(&mut self.phase, Phase::Closed) else {
            return Ok(());
        };
        let Driver { hs, last_sent, reply, generation, .. } = *driver;
        let role = hs.role();
        let pattern = hs.pattern();
        let remote = hs.remote_static();
        let (session, hash) = match hs.into_session(now, self.config.limits, generation) {
            Ok(x) => x,
            Err(e) => return Err(self.fail(now, e)),
        };
        self.remote_static = remote;
        self.handshake_hash = Some(hash);
        // spec §5.7: who is confirmed when.
        let confirmed = match (role, pattern.message_count()) {
            (Role::Initiator, _) => true,
            (Role::Responder, 2) => false,
            (Role::Responder, _) => true,
        };
        self.timers.clear(Timer::Retransmit);
        let awaiting_peer = self.config.mode.is_lossy() && role == Role::Initiator;
        if awaiting_peer {
            // spec §5.7.2: repeat FINAL (XX) or the confirmation packet (IK, KK) until the
            // responder's first authenticated packet proves it arrived.
            self.timers.set(Timer::Retransmit, now + self.config.limits.handshake_rto);
        }
        self.phase = Phase::Established(Box::new(Established {
            current: session,
            confirmed,
            previous: None,
            pending: None,
            rehandshake: None,
            final_sent: if self.config.mode.is_lossy() && role == Role::Initiator && pattern.message_count() == 3 {
                last_sent
            } else {
                None
            },
            // A repeated packet can only still come before the peer proved it has our answer:
            // an XX responder that read FINAL has nothing left to answer.
            reply: if self.config.mode.is_lossy() && !(role == Role::Responder && pattern.message_count() == 3) {
                reply
            } else {
                None
            },
            awaiting_peer,
            peer_unproven: false,
            rehandshake_final: None,
            answered: None,
        }));
        if self.control.is_empty() {
            // As in `poll_transmit`: no buffer for handshake packets is kept for the session.
            self.control = VecDeque::new();
        }
        if confirmed {
            self.on_confirmed(now);
            // spec §5.7: an initiator of a 2-message pattern and an XX responder send a
            // transport packet at once, so the peer is confirmed without waiting for data.
            self.empty_packet_due = role == Role::Initiator && pattern.message_count() == 2
                || role == Role::Responder && pattern.message_count() == 3;
        }
        self.timers.set(Timer::Idle, now + self.config.limits.effective_idle_timeout());
        Ok(())
    }

    /// An XX/XXpsk3 initiator that wrote FINAL of its first handshake but has not yet
    /// authenticated a packet from the responder: Connected, but its handshake is not
    /// complete (spec §5.7.1).
    fn awaiting_xx_confirmation(&self) -> bool {
        match &self.phase {
            Phase::Established(e) => {
                self.role == Role::Initiator
                    && self.config.pattern.message_count() == 3
                    && self.stats.rehandshakes == 0
                    && e.rehandshake.is_none()
                    && e.previous.is_none()
                    && e.current.stats().packets_received == 0
            }
            _ => false,
        }
    }

    fn on_confirmed(&mut self, now: Timestamp) {
        // spec §5.7.1, §5.7.3: the XX initiator's handshake completes, and its timeout stops,
        // only with the responder's first authenticated packet (see `on_transport`).
        if !self.awaiting_xx_confirmation() {
            self.timers.clear(Timer::Handshake);
        }
        let Phase::Established(e) = &mut self.phase else {
            return;
        };
        e.confirmed = true;
        let limits = self.config.limits;
        self.timers.set(Timer::Keepalive, now + limits.keepalive_interval);
        self.timers.set(Timer::Expiry, e.current.established_at() + limits.reject_after_time);
        if self.role == Role::Initiator {
            self.timers.set(Timer::Rehandshake, e.current.established_at() + limits.rehandshake_after_time);
        }
        if let (Some(remote_static), Some(handshake_hash)) = (self.remote_static, self.handshake_hash) {
            self.events.push_back(Event::Connected { remote_static, handshake_hash });
        }
    }

    /// Feeds one received packet (spec §4). Errors say why a packet was refused; the
    /// connection's state tells whether it goes on ([`Connection::is_closed`]): in
    /// datagram mode refused packets are simply dropped; in stream mode a handshake
    /// failure closes the connection, and the driver should close the stream on any
    /// transport error (spec §10).
    ///
    /// # Errors
    /// The reason the packet was refused.
    pub fn handle_input(&mut self, now: Timestamp, packet: &[u8]) -> Result<(), ConnectionError> {
        let r = self.handle_input_inner(now, packet);
        match &r {
            Ok(()) => {
                self.stats.packets_received += 1;
                self.stats.bytes_received += packet.len() as u64;
            }
            Err(_) => self.stats.packets_dropped += 1,
        }
        r
    }

    /// [`handle_input`](Self::handle_input) for a packet the caller gives away: a transport
    /// packet is decrypted in place, and the messages it carries are handed out as slices of
    /// it, without a copy or an allocation. Same results and errors as `handle_input`.
    ///
    /// # Errors
    /// As [`handle_input`](Self::handle_input).
    pub fn handle_input_owned(&mut self, now: Timestamp, packet: BytesMut) -> Result<(), ConnectionError> {
        let len = packet.len() as u64;
        let transport = !self.is_closed()
            && matches!(self.phase, Phase::Established(_))
            && packet
                .first()
                .is_some_and(|t| t & !(wire::FLAG_GENERATION | wire::FLAG_EPOCH_ADVANCE) == wire::TYPE_TRANSPORT);
        let r = if transport {
            match wire::parse(self.config.mode, self.config.limits.packet_len(), &packet) {
                Ok(Packet::Transport(header, _)) => self.on_transport(now, header, packet),
                Ok(_) => self.handle_input_inner(now, &packet),
                Err(e) => Err(e.into()),
            }
        } else {
            self.handle_input_inner(now, &packet)
        };
        match &r {
            Ok(()) => {
                self.stats.packets_received += 1;
                self.stats.bytes_received += len;
            }
            Err(_) => self.stats.packets_dropped += 1,
        }
        r
    }

    fn handle_input_inner(&mut self, now: Timestamp, packet: &[u8]) -> Result<(), ConnectionError> {
        if self.is_closed() {
            return Err(ConnectionError::Closed);
        }
        let mode = self.config.mode;
        let parsed = match wire::parse(mode, self.config.limits.packet_len(), packet) {
            Ok(p) => p,
            Err(e) => {
                if matches!(self.phase, Phase::AwaitingInit) {
                    return Err(self.refuse_init(now, packet, e));
                }
                return Err(e.into());
            }
        };
        match parsed {
            Packet::Init { header, header_bytes, body } => self.on_init(now, packet, &header, header_bytes, body),
            Packet::Resp { receiver_index, sender_index, body } => {
                self.check_index(receiver_index)?;
                self.on_handshake_body(now, packet, body, sender_index, 1)
            }
            Packet::Final { receiver_index, body } => {
                self.check_index(receiver_index)?;
                self.on_handshake_body(now, packet, body, None, 2)
            }
            Packet::Reject { receiver_index, reason } => {
                self.check_index(receiver_index)?;
                match &self.phase {
                    Phase::Handshaking(d) if self.role == Role::Initiator && d.hs.step() == 1 => {
                        let e = HandshakeError::Rejected(reason);
                        Err(self.fail(now, e))
                    }
                    // spec §5.7.1, §5.8: a stream XX initiator accepts REJECT in place of the
                    // responder's confirmation.
                    Phase::Established(_) if self.config.mode == Mode::Stream && self.awaiting_xx_confirmation() => {
                        Err(self.fail(now, HandshakeError::Rejected(reason)))
                    }
                    _ => Err(HandshakeError::UnexpectedPacket.into()),
                }
            }
            Packet::CookieReply { receiver_index, cookie } => {
                self.check_index(Some(receiver_index))?;
                self.on_cookie_reply(now, &cookie)
            }
            // spec §5.7.4: the cookie was the endpoint's business; the INIT inside is handled
            // as if it had come alone, and is what a duplicate is compared with.
            Packet::InitCookie { init, header, header_bytes, body, .. } => {
                self.on_init(now, init, &header, header_bytes, body)
            }
            Packet::Transport(header, _) => self.on_transport(now, header, BytesMut::from(packet)),
        }
    }

    /// spec §5.7.4: an initiator waiting for RESP of its first handshake sends its INIT again
    /// with the cookie in front, at most `MAX_COOKIE_REPLIES` times.
    fn on_cookie_reply(&mut self, now: Timestamp, cookie: &[u8; wire::COOKIE_LEN]) -> Result<(), ConnectionError> {
        let rto = self.config.limits.handshake_rto;
        let driver = match &mut self.phase {
            Phase::Handshaking(d)
                if self.role == Role::Initiator
                    && d.hs.role() == Role::Initiator
                    && d.hs.step() == 1
                    && d.cookie_replies < MAX_COOKIE_REPLIES =>
            {
                d
            }
            _ => return Err(HandshakeError::UnexpectedPacket.into()),
        };
        let Some(sent) = driver.last_sent.as_deref() else {
            return Err(HandshakeError::UnexpectedPacket.into());
        };
        // The INIT itself, byte for byte: Noise message 1 is not written again.
        let init = match sent.first() {
            Some(&wire::TYPE_HANDSHAKE_INIT_COOKIE) => sent.get(wire::INIT_COOKIE_PREFIX_LEN..).unwrap_or(&[]),
            _ => sent,
        };
        let mut packet = alloc::vec![0u8; wire::INIT_COOKIE_PREFIX_LEN + init.len()];
        if wire::encode_init_cookie(cookie, init, &mut packet).is_err() {
            return Err(HandshakeError::BufferTooSmall.into());
        }
        driver.cookie_replies += 1;
        driver.last_sent = Some(packet.clone());
        // spec §5.7.4: sent at once, then the schedule of spec §5.7.2 restarts; the handshake
        // timeout still counts from the connection's creation.
        driver.rto = rto;
        self.timers.set(Timer::Retransmit, now + rto);
        self.control.push_back(packet);
        Ok(())
    }

    fn check_index(&self, receiver_index: Option<u32>) -> Result<(), ConnectionError> {
        match receiver_index {
            Some(i) if i != self.local_index => Err(HandshakeError::UnknownIndex.into()),
            _ => Ok(()),
        }
    }

    /// A first packet that failed to parse: answer with REJECT where the spec says so
    /// (spec §4.3, §5.8) and fail.
    fn refuse_init(&mut self, now: Timestamp, packet: &[u8], e: DecodeError) -> ConnectionError {
        // spec §5.7.4: the INIT inside an INIT_COOKIE is answered like an INIT.
        let packet = match packet.first() {
            Some(&wire::TYPE_HANDSHAKE_INIT_COOKIE) if self.config.mode == Mode::Datagram => {
                packet.get(wire::INIT_COOKIE_PREFIX_LEN..).unwrap_or(&[])
            }
            _ => packet,
        };
        if packet.first() == Some(&wire::TYPE_HANDSHAKE_INIT) {
            let reason = RejectReason::for_decode_error(e);
            match self.config.mode {
                Mode::Stream => self.control.push_back(alloc::vec![wire::TYPE_HANDSHAKE_REJECT, reason.code()]),
                Mode::Datagram | Mode::Routed => {
                    // spec §4.3: bytes 3..7 of a datagram INIT hold the sender index in every version.
                    if let Some(idx) = packet.get(3..7) {
                        let mut p = alloc::vec![wire::TYPE_HANDSHAKE_REJECT];
                        p.extend_from_slice(idx);
                        p.push(reason.code());
                        self.control.push_back(p);
                    }
                }
            }
        }
        self.fail(now, HandshakeError::Decode(e))
    }

    fn on_init(
        &mut self,
        now: Timestamp,
        packet: &[u8],
        header: &InitHeader,
        header_bytes: &[u8],
        body: &[u8],
    ) -> Result<(), ConnectionError> {
        if !matches!(self.phase, Phase::AwaitingInit) {
            return self.on_duplicate(packet);
        }
        let config = Arc::clone(&self.config);
        if !config.accept_patterns.contains(&header.pattern) || !config.accept_suites.contains(&header.suite) {
            let reason = if config.accept_patterns.contains(&header.pattern) {
                RejectReason::UnsupportedSuite
            } else {
                RejectReason::UnsupportedPattern
            };
            self.queue_reject(header.sender_index, reason);
            return Err(self.fail(now, HandshakeError::NotAccepted));
        }
        let seed = self.next_seed();
        let mut rng = rand_chacha::ChaCha20Rng::from_seed(*seed);
        let eph = self.fixed_ephemeral();
        let remote = self.expected_peer;
        let p = HandshakeParams {
            config: &config,
            pattern: header.pattern,
            suite: header.suite,
            local_index: self.local_index,
            remote_static: remote.as_ref(),
            psk: config.psk.as_ref(),
            fixed_ephemeral: eph.as_ref(),
        };
        let hs = match Handshake::responder(&p, header, header_bytes, &mut rng) {
            Ok(hs) => hs,
            Err(e) => return Err(self.fail(now, e)),
        };
        let mut driver = Box::new(Driver::new(hs, &config, false));
        if config.mode.is_lossy() && header.pattern.message_count() == 3 {
            driver.replay_seed = Some(seed);
        }
        if let Err(e) = driver.hs.read(body, header.sender_index) {
            // A responder that could not read message 1 keeps nothing (spec §10); in stream
            // mode it says Malformed, whatever the check that failed (spec §10 #8, #9, §10.3).
            if config.mode == Mode::Stream {
                self.queue_reject(None, RejectReason::Malformed);
            }
            return Err(self.fail(now, e));
        }
        driver.last_read = Some(packet.to_vec());
        self.phase = Phase::Handshaking(driver);
        self.after_read(now)
    }

    fn queue_reject(&mut self, sender_index: Option<u32>, reason: RejectReason) {
        let mut p = alloc::vec![wire::TYPE_HANDSHAKE_REJECT];
        if let Some(i) = sender_index {
            p.extend_from_slice(&i.to_be_bytes());
        }
        p.push(reason.code());
        self.control.push_back(p);
    }

    /// A handshake packet for a step already done: resend our answer if it is an exact
    /// duplicate of the last packet we read (datagram retransmission, spec §5.7).
    fn on_duplicate(&mut self, packet: &[u8]) -> Result<(), ConnectionError> {
        let reply = match &self.phase {
            Phase::Handshaking(d) => d.reply.as_ref(),
            Phase::Established(e) => e.reply.as_ref(),
            Phase::Closed | Phase::AwaitingInit => None,
        };
        if let Some((read, answer)) = reply {
            if self.config.mode.is_lossy() && read.as_slice() == packet {
                let answer = answer.clone();
                self.control.push_back(answer);
                return Ok(());
            }
        }
        Err(HandshakeError::UnexpectedPacket.into())
    }

    fn on_handshake_body(
        &mut self,
        now: Timestamp,
        packet: &[u8],
        body: &[u8],
        sender_index: Option<u32>,
        step: usize,
    ) -> Result<(), ConnectionError> {
        let expected_role = if step == 1 { Role::Initiator } else { Role::Responder };
        let driver = match &mut self.phase {
            Phase::Handshaking(d) if d.hs.step() == step && d.hs.role() == expected_role => d,
            _ => return self.on_duplicate(packet),
        };
        if driver.awaiting_decision {
            return Err(HandshakeError::UnexpectedPacket.into());
        }
        if let Err(e) = driver.hs.read(body, sender_index) {
            // The initiator's `s` decrypted, so the handshake cipher moved on (see
            // `restore_responder`); anything else failed before it changed state.
            let half_read = driver.replay_seed.is_some() && driver.hs.remote_static().is_some();
            return match self.config.mode {
                // spec §10: in datagram mode an unauthenticated packet is dropped and the
                // handshake goes on (anyone can inject one).
                Mode::Datagram | Mode::Routed => {
                    if half_read {
                        self.restore_responder();
                    }
                    Err(e.into())
                }
                Mode::Stream => {
                    if self.role == Role::Responder {
                        // spec §10 #8, #9: a stream responder that cannot read FINAL says Malformed.
                        self.queue_reject(None, RejectReason::Malformed);
                    }
                    Err(self.fail(now, e))
                }
            };
        }
        driver.last_read = Some(packet.to_vec());
        self.timers.clear(Timer::Retransmit);
        self.after_read(now)
    }

    /// Rebuilds a datagram XX/XXpsk3 responder's handshake as it was after writing RESP, from
    /// the INIT it read and its RNG seed. snow rolls back only the hash and chaining key of a
    /// failed read, not the handshake cipher: a FINAL whose `s` decrypted but whose payload
    /// did not (a genuine FINAL altered in flight) leaves that cipher re-keyed, and every
    /// later FINAL, the genuine one included, would fail. spec §5.4.3, §10.1: a failed read
    /// changes no state.
    fn restore_responder(&mut self) {
        let config = Arc::clone(&self.config);
        // Only datagram XX/XXpsk3 responders are restored: their RESP is message 2.
        let payload = self.first_payload(Pattern::XX, 1);
        let eph = self.fixed_ephemeral();
        let remote = self.expected_peer;
        let local_index = self.local_index;
        let Phase::Handshaking(driver) = &mut self.phase else {
            return;
        };
        let (Some(seed), Some((init, resp))) = (driver.replay_seed.clone(), driver.reply.clone()) else {
            return;
        };
        let Ok(Packet::Init { header, header_bytes, body }) =
            wire::parse(config.mode, config.limits.packet_len(), &init)
        else {
            return;
        };
        let p = HandshakeParams {
            config: &config,
            pattern: header.pattern,
            suite: header.suite,
            local_index,
            remote_static: remote.as_ref(),
            psk: config.psk.as_ref(),
            fixed_ephemeral: eph.as_ref(),
        };
        let mut rng = rand_chacha::ChaCha20Rng::from_seed(*seed);
        let mut out = alloc::vec![0u8; wire::HANDSHAKE_PAYLOAD_MAX + 160];
        let rebuilt = Handshake::responder(&p, &header, header_bytes, &mut rng).and_then(|mut hs| {
            hs.read(body, header.sender_index)?;
            let n = hs.write(&payload, &mut out)?;
            Ok((hs, n))
        });
        // The same seed gives the same ephemeral key, so the same RESP: the state is the old one.
        if let Ok((hs, n)) = rebuilt {
            if out[..n] == resp[..] {
                driver.hs = hs;
            }
        }
    }

    /// After a successful read: ask for a decision if the peer's key just became known.
    fn after_read(&mut self, now: Timestamp) -> Result<(), ConnectionError> {
        let Phase::Handshaking(driver) = &mut self.phase else {
            return Ok(());
        };
        let pattern = driver.hs.pattern();
        let step = driver.hs.step();
        // spec §5.5: who decides when.
        let decide = match driver.hs.role() {
            Role::Responder => step == pattern.responder_decision_after() + 1,
            Role::Initiator => {
                step == 2 && (matches!(pattern, Pattern::XX | Pattern::XXpsk3) || self.config.authorize_responder)
            }
        };
        if decide {
            if let Some(remote_static) = driver.hs.remote_static() {
                driver.awaiting_decision = true;
                let certificate = driver.hs.peer_payload().and_then(|p| p.certificate.clone());
                self.events.push_back(Event::AuthorizationRequired { remote_static, certificate });
                return Ok(());
            }
        }
        self.advance_handshake(now)
    }

    fn on_transport(
        &mut self,
        now: Timestamp,
        header: TransportHeader,
        mut buf: BytesMut,
    ) -> Result<(), ConnectionError> {
        let mode = self.config.mode;
        let completes_xx = self.awaiting_xx_confirmation();
        let Phase::Established(est) = &mut self.phase else {
            return Err(HandshakeError::UnexpectedPacket.into());
        };
        // Route to the session the header names (spec §6.2, §7.3).
        let which = est.route(mode, &header);
        let keep_previous = est.keeps_previous();
        let range = match which {
            Route::Current => est.current.open_parsed(now, header, &mut buf)?,
            Route::Pending => match est.pending.as_mut() {
                Some(p) => p.0.open_parsed(now, header, &mut buf)?,
                None => return Err(SessionError::WrongSession.into()),
            },
            // spec §7.3: an initiator still repeating its confirmation keeps the replaced
            // session open, whatever its deadline: the responder sends on it until then.
            Route::Previous => match est.previous.as_mut() {
                Some((s, until)) if now < *until || keep_previous => s.open_parsed(now, header, &mut buf)?,
                _ => return Err(SessionError::WrongSession.into()),
            },
        };
        let plain = buf.freeze().slice(range);
        // The packet authenticated: everything from here on is the peer's word.
        self.timers.set(Timer::Idle, now + self.config.limits.effective_idle_timeout());
        let mut rehandshake_now = false;
        if completes_xx {
            self.timers.clear(Timer::Handshake);
            // spec §7.3: a re-handshake that fell due before this was deferred: it starts
            // once this packet is processed.
            if let Phase::Established(est) = &self.phase {
                let due = est.current.established_at() + self.config.limits.rehandshake_after_time;
                rehandshake_now = due <= now;
                if rehandshake_now {
                    self.timers.clear(Timer::Rehandshake);
                } else {
                    self.timers.set(Timer::Rehandshake, due);
                }
            }
        }
        if which == Route::Pending {
            self.promote_pending(now);
        }
        if let Phase::Established(est) = &mut self.phase {
            if est.peer_unproven && which == Route::Current {
                // spec §7.3: the peer holds the new session; old packets may still be in flight.
                est.peer_unproven = false;
                if let Some((_, until)) = est.previous.as_mut() {
                    *until = now + self.config.limits.key_overlap;
                }
            }
            if !est.confirmed {
                // The initiator proved it holds the keys: our cached answer is not needed.
                est.reply = None;
                self.on_confirmed(now);
                // spec §5.7.2: in datagram mode the responder answers at once, so that the
                // initiator stops repeating its confirmation.
                if mode.is_lossy() {
                    self.empty_packet_due = true;
                }
            } else if est.awaiting_peer && which == Route::Current {
                // Any authenticated packet proves our FINAL or confirmation arrived (spec §5.7).
                est.awaiting_peer = false;
                if let Some((_, until)) = est.previous.as_mut() {
                    // Old-session packets may still be in flight behind it (spec §7.3).
                    *until = now + self.config.limits.key_overlap;
                }
                est.final_sent = None;
                est.reply = None;
                if est.rehandshake.is_none() {
                    self.timers.clear(Timer::Retransmit);
                }
            }
        }
        if which == Route::Current {
            if let Phase::Established(est) = &mut self.phase {
                if mode == Mode::Stream {
                    est.previous = None;
                }
            }
        }
        self.deliver(now, &plain)?;
        if rehandshake_now && !self.is_closed() {
            // As from the timer: a failure to start leaves the current session as it is.
            let _ = self.start_rehandshake(now);
        }
        Ok(())
    }

    fn deliver(&mut self, now: Timestamp, plain: &Bytes) -> Result<(), ConnectionError> {
        // spec §9.1: a packet's messages are taken or refused as a whole.
        if let Err(e) = message::validate(plain) {
            self.close_pending = Some(CloseReason::ProtocolViolation);
            self.queue.clear();
            self.queued_bytes = 0;
            return Err(e.into());
        }
        for m in Messages::new(plain) {
            let Ok(m) = m else { break };
            match m {
                Message::Data { channel, id, payload } => {
                    self.stats.messages_received += 1;
                    self.events.push_back(Event::Message { channel, id, payload: plain.slice_ref(payload) });
                }
                Message::Ping { id } => self.priority.push_back(Outgoing::Pong(id)),
                Message::Pong { id } => self.events.push_back(Event::Pong { id }),
                // spec §15.7, §15.8: the trust layer decides what these are worth.
                Message::RevocationPush { list } => {
                    self.events.push_back(Event::RevocationList { list: plain.slice_ref(list) });
                }
                Message::TimeSync { unix_time } => self.events.push_back(Event::TimeSync { unix_time }),
                // spec §16.7: the routing layer decides what these are worth.
                Message::Forward { .. }
                | Message::Deliver { .. }
                | Message::Route { .. }
                | Message::Withdraw { .. }
                | Message::Unreachable { .. }
                | Message::Stored { .. } => {
                    if let Some(r) = RoutingMessage::from_message(&m, plain) {
                        self.events.push_back(Event::Routing(r));
                    }
                }
                // spec §17: the delivery layer decides what these are worth.
                Message::Ack(_) | Message::Stream { .. } | Message::Skip { .. } => {
                    if let Some(d) = DeliveryMessage::from_message(&m) {
                        self.events.push_back(Event::Delivery(d));
                    }
                }
                Message::Close { reason } => {
                    self.finish(now, reason, true, None);
                    return Ok(());
                }
                Message::Handshake { packet } => {
                    // spec §7.3: an unusable re-handshake message is ignored; the packet and
                    // the other messages in it stand.
                    if self.on_rehandshake_packet(now, packet).is_err() {
                        self.stats.handshake_messages_ignored += 1;
                    }
                }
            }
        }
        Ok(())
    }

    fn promote_pending(&mut self, now: Timestamp) {
        let overlap = self.config.limits.key_overlap;
        let Phase::Established(est) = &mut self.phase else {
            return;
        };
        if let Some(new) = est.pending.take() {
            let (new, hash) = *new;
            est.reply = None;
            est.rehandshake_final = None;
            self.handshake_hash = Some(hash);
            let old = Box::new(core::mem::replace(&mut est.current, new));
            let st = old.stats();
            self.stats.rekeys += st.send_rekeys + st.recv_rekeys;
            est.previous = Some((old, now + overlap));
            self.timers.set(Timer::Overlap, now + overlap);
            // spec §7.3: answer at once, so that the peer stops repeating its confirmation.
            if self.config.mode.is_lossy() {
                self.empty_packet_due = true;
            }
            self.after_rehandshake(now);
        }
    }

    fn after_rehandshake(&mut self, now: Timestamp) {
        let limits = self.config.limits;
        let Phase::Established(est) = &self.phase else {
            return;
        };
        self.stats.rehandshakes += 1;
        let established = est.current.established_at();
        self.timers.clear(Timer::Handshake);
        self.timers.clear(Timer::Retransmit);
        self.timers.set(Timer::Expiry, established + limits.reject_after_time);
        if self.role == Role::Initiator {
            self.timers.set(Timer::Rehandshake, established + limits.rehandshake_after_time);
        }
        if let Some(h) = self.handshake_hash {
            self.events.push_back(Event::Rehandshaked { handshake_hash: h });
        }
        let _ = now;
    }

    /// spec §5.9, §7.3: re-handshake packets travel inside the current session.
    fn on_rehandshake_packet(&mut self, now: Timestamp, packet: &[u8]) -> Result<(), ConnectionError> {
        let config = Arc::clone(&self.config);
        let parsed = wire::parse(config.mode, config.limits.packet_len(), packet)?;
        let Phase::Established(est) = &mut self.phase else {
            return Err(HandshakeError::UnexpectedPacket.into());
        };
        let generation = !est.current.generation();
        let digest = fnv64(packet);
        match parsed {
            Packet::Init { header, header_bytes, body } if self.role == Role::Responder => {
                if let Some((read, answer)) = est.reply.as_ref() {
                    if read.as_slice() == packet {
                        // A repeat of the INIT we are answering: the answer again (spec §5.7).
                        let answer = answer.clone();
                        self.priority.push_back(Outgoing::Rehandshake(answer, false));
                        return Ok(());
                    }
                }
                if est.answered == Some(digest) {
                    // A late repeat of an INIT whose re-handshake is over.
                    return Err(HandshakeError::UnexpectedPacket.into());
                }
                if !config.accept_patterns.contains(&header.pattern) || !config.accept_suites.contains(&header.suite) {
                    return Err(HandshakeError::NotAccepted.into());
                }
                // The initiator runs one re-handshake at a time: a new INIT means it gave up
                // on any earlier one (spec §7.3).
                est.rehandshake = None;
                est.pending = None;
                est.reply = None;
                let mut rng = self.handshake_rng();
                let remote = self.remote_static;
                let psk = self.peer_psk.clone().or_else(|| config.psk.clone());
                let p = HandshakeParams {
                    config: &config,
                    pattern: header.pattern,
                    suite: header.suite,
                    local_index: self.local_index,
                    remote_static: if header.pattern.responder_knows_initiator() { remote.as_ref() } else { None },
                    psk: psk.as_ref(),
                    fixed_ephemeral: None,
                };
                let mut hs = Handshake::responder(&p, &header, header_bytes, &mut rng)?;
                hs.read(body, header.sender_index)?;
                self.check_same_peer(&hs)?;
                if hs.pattern() == Pattern::IKpsk2 {
                    let psk = psk.ok_or(HandshakeError::Config("pattern needs a pre-shared key"))?;
                    hs.set_psk(&psk)?;
                }
                let mut out = alloc::vec![0u8; wire::HANDSHAKE_PAYLOAD_MAX + 160];
                let n = hs.write(&self.payload(), &mut out)?;
                out.truncate(n);
                out.shrink_to_fit();
                self.priority.push_back(Outgoing::Rehandshake(out.clone(), false));
                // No timeout on this side (spec §5.9.4): a new INIT replaces this re-handshake.
                let Phase::Established(est) = &mut self.phase else {
                    return Ok(());
                };
                est.reply = Some((packet.to_vec(), out));
                est.answered = Some(digest);
                if hs.is_finished() {
                    // 2-message patterns: pending until the initiator's first new packet.
                    let (session, hash) = hs.into_session(now, config.limits, generation)?;
                    est.pending = Some(Box::new((session, hash)));
                } else {
                    est.rehandshake = Some(Box::new(Driver::new(hs, &config, generation)));
                }
                Ok(())
            }
            Packet::Resp { body, sender_index, .. } if self.role == Role::Initiator => {
                let Some(driver) = est.rehandshake.as_mut() else {
                    return Err(HandshakeError::UnexpectedPacket.into());
                };
                if driver.hs.step() != 1 {
                    return Err(HandshakeError::UnexpectedPacket.into());
                }
                driver.hs.read(body, sender_index)?;
                if let Some(rs) = driver.hs.remote_static() {
                    if !self.remote_static.is_some_and(|k| k.ct_eq(&rs)) {
                        est.rehandshake = None;
                        return Err(HandshakeError::PeerKeyChanged.into());
                    }
                }
                if !driver.hs.is_my_turn() {
                    // 2-message patterns: RESP proves the responder holds the new keys.
                    return self.switch_to_new_session(now);
                }
                // XX: FINAL travels in the old session; the new one stays pending until the
                // responder's first packet on it (spec §7.3).
                let payload = self.payload();
                let Phase::Established(est) = &mut self.phase else {
                    return Ok(());
                };
                let Some(mut driver) = est.rehandshake.take() else {
                    return Ok(());
                };
                let mut out = alloc::vec![0u8; wire::HANDSHAKE_PAYLOAD_MAX + 160];
                let n = driver.hs.write(&payload, &mut out)?;
                out.truncate(n);
                out.shrink_to_fit();
                let (session, hash) = driver.hs.into_session(now, config.limits, driver.generation)?;
                est.pending = Some(Box::new((session, hash)));
                est.rehandshake_final = config.mode.is_lossy().then(|| out.clone());
                self.priority.push_back(Outgoing::Rehandshake(out, false));
                if config.mode.is_lossy() {
                    self.timers.set(Timer::Retransmit, now + config.limits.handshake_rto);
                }
                Ok(())
            }
            Packet::Final { body, .. } if self.role == Role::Responder => {
                let Some(driver) = est.rehandshake.as_mut() else {
                    if est.answered == Some(digest) && config.mode.is_lossy() {
                        // Our confirmation was lost: confirm again on the new session.
                        self.empty_packet_due = true;
                        return Ok(());
                    }
                    return Err(HandshakeError::UnexpectedPacket.into());
                };
                driver.hs.read(body, None)?;
                if let Some(rs) = driver.hs.remote_static() {
                    if !self.remote_static.is_some_and(|k| k.ct_eq(&rs)) {
                        est.rehandshake = None;
                        return Err(HandshakeError::PeerKeyChanged.into());
                    }
                }
                est.answered = Some(digest);
                self.switch_to_new_session(now)
            }
            _ => Err(HandshakeError::UnexpectedPacket.into()),
        }
    }

    fn check_same_peer(&self, hs: &Handshake) -> Result<(), ConnectionError> {
        match (hs.remote_static(), self.remote_static) {
            (Some(new), Some(old)) if new.ct_eq(&old) => Ok(()),
            (None, _) => Ok(()),
            _ => Err(HandshakeError::PeerKeyChanged.into()),
        }
    }

    /// The re-handshake finished on this side with the peer proven: send on the new session.
    fn switch_to_new_session(&mut self, now: Timestamp) -> Result<(), ConnectionError> {
        let config = Arc::clone(&self.config);
        let Phase::Established(est) = &mut self.phase else {
            return Ok(());
        };
        let Some(driver) = est.rehandshake.take() else {
            return Ok(());
        };
        let generation = driver.generation;
        let (session, hash) = driver.hs.into_session(now, config.limits, generation)?;
        let old = Box::new(core::mem::replace(&mut est.current, session));
        let st = old.stats();
        self.stats.rekeys += st.send_rekeys + st.recv_rekeys;
        est.previous = Some((old, now + config.limits.key_overlap));
        // The peer's FINAL or RESP arrived: a repeat of its INIT needs no answer any more.
        est.reply = None;
        self.timers.set(Timer::Overlap, now + config.limits.key_overlap);
        self.handshake_hash = Some(hash);
        self.empty_packet_due = true;
        let repeat = config.mode.is_lossy() && self.role == Role::Initiator;
        est.awaiting_peer = repeat;
        est.peer_unproven = config.mode.is_lossy();
        self.after_rehandshake(now);
        if repeat {
            // spec §7.3: repeat the confirmation until the responder answers on the new session.
            self.timers.set(Timer::Retransmit, now + config.limits.handshake_rto);
        }
        Ok(())
    }

    /// Starts a re-handshake now (normally driven by the timer, spec §7.3). Only the
    /// connection's initiator may. Does nothing while one is in progress or pending, or
    /// before an XX/XXpsk3 initiator's first handshake is complete.
    ///
    /// # Errors
    /// [`ConnectionError::NotConnected`] without an established session.
    pub fn start_rehandshake(&mut self, now: Timestamp) -> Result<(), ConnectionError> {
        if self.role != Role::Initiator || !self.is_connected() {
            return Err(ConnectionError::NotConnected);
        }
        if let Phase::Established(est) = &self.phase {
            // One at a time (spec §5.9): an XX initiator's new session may still be pending,
            // and a second one would take the same generation.
            if est.rehandshake.is_some() || est.pending.is_some() {
                return Ok(());
            }
        }
        // spec §7.3: not before an XX/XXpsk3 initiator's first handshake is complete
        // (§5.7.1): it goes on repeating FINAL (§5.7.2), and the responder's first packet
        // arms the re-handshake timer again (`on_transport`).
        if self.awaiting_xx_confirmation() {
            return Ok(());
        }
        let generation = match &self.phase {
            Phase::Established(e) => !e.current.generation(),
            _ => return Err(ConnectionError::NotConnected),
        };
        let mut driver = self.start_initiator(generation)?;
        let mut out = alloc::vec![0u8; wire::HANDSHAKE_PAYLOAD_MAX + 160];
        let n = driver.hs.write(&self.payload(), &mut out)?;
        out.truncate(n);
        out.shrink_to_fit();
        driver.last_sent = Some(out.clone());
        self.priority.push_back(Outgoing::Rehandshake(out, false));
        if let Phase::Established(est) = &mut self.phase {
            est.rehandshake = Some(driver);
        }
        self.timers.set(Timer::Handshake, now + self.config.limits.handshake_timeout);
        if self.config.mode.is_lossy() {
            self.timers.set(Timer::Retransmit, now + self.config.limits.handshake_rto);
        }
        Ok(())
    }

    /// Runs every timer that has expired by `now` (spec §5.7, §7).
    pub fn handle_timeout(&mut self, now: Timestamp) {
        if self.is_closed() {
            return;
        }
        let limits = self.config.limits;
        if self.timers.expired(Timer::Handshake, now) {
            self.timers.clear(Timer::Handshake);
            let first_handshake_open = self.awaiting_xx_confirmation();
            match &mut self.phase {
                Phase::Established(est) if est.confirmed && !first_handshake_open => {
                    // spec §5.9.4: an initiator that has not read RESP gives up and retries
                    // later; the current session carries on. A new session it completed
                    // (XX: pending, FINAL repeated) is kept: the responder may already use it.
                    if est.rehandshake.take().is_some() {
                        self.timers.clear(Timer::Retransmit);
                        self.timers.set(Timer::Rehandshake, now + limits.handshake_timeout);
                    }
                }
                _ => {
                    let _ = self.fail(now, HandshakeError::Timeout);
                    return;
                }
            }
        }
        if self.timers.expired(Timer::Expiry, now) {
            self.finish(now, CloseReason::SessionExpired, false, Some(SessionError::Expired.into()));
            return;
        }
        if self.timers.expired(Timer::Idle, now) {
            self.finish(now, CloseReason::IdleTimeout, false, None);
            return;
        }
        if self.timers.expired(Timer::Retransmit, now) {
            self.retransmit(now);
        }
        if self.timers.expired(Timer::Rehandshake, now) {
            self.timers.clear(Timer::Rehandshake);
            let _ = self.start_rehandshake(now);
        }
        // spec §7.2, §7.3: replaced sessions and epoch keys live for KEY_OVERLAP only.
        if let Phase::Established(est) = &mut self.phase {
            // An initiator still repeating its confirmation keeps the old session: the
            // responder sends on it until it has seen the new one (spec §7.3).
            if !est.keeps_previous() && matches!(&est.previous, Some((_, until)) if now >= *until) {
                est.previous = None;
            }
            est.current.handle_timeout(now);
            match est.overlap_deadline() {
                Some(t) => self.timers.set(Timer::Overlap, t),
                None => self.timers.clear(Timer::Overlap),
            }
        }
        if self.timers.expired(Timer::Keepalive, now) {
            self.timers.set(Timer::Keepalive, now + limits.keepalive_interval);
            if self.is_connected() {
                self.empty_packet_due = true;
            }
        }
    }

    fn retransmit(&mut self, now: Timestamp) {
        let cap = self.config.limits.handshake_rto_max;
        let packet = match &mut self.phase {
            Phase::Handshaking(d) => {
                d.rto = d.rto.doubled().min(cap);
                let at = now + d.rto;
                self.timers.set(Timer::Retransmit, at);
                d.last_sent.clone().map(|p| (p, false))
            }
            Phase::Established(e) => {
                if let Some(d) = e.rehandshake.as_mut() {
                    d.rto = d.rto.doubled().min(cap);
                    let at = now + d.rto;
                    self.timers.set(Timer::Retransmit, at);
                    d.last_sent.clone().map(|p| (p, true))
                } else if let Some(f) = e.rehandshake_final.clone() {
                    // XX re-handshake: FINAL again, inside the old session (spec §7.3).
                    self.timers.set(Timer::Retransmit, now + cap);
                    Some((f, true))
                } else if e.awaiting_peer {
                    // Resending FINAL, or the confirmation, until the responder's first
                    // packet arrives (spec §5.7.2).
                    let at = now + cap;
                    self.timers.set(Timer::Retransmit, at);
                    if e.final_sent.is_none() {
                        self.empty_packet_due = true;
                    }
                    e.final_sent.clone().map(|p| (p, false))
                } else {
                    self.timers.clear(Timer::Retransmit);
                    None
                }
            }
            Phase::Closed | Phase::AwaitingInit => None,
        };
        match packet {
            Some((p, true)) => self.priority.push_back(Outgoing::Rehandshake(p, false)),
            Some((p, false)) => self.control.push_back(p),
            None => {}
        }
    }

    /// Writes the next packet to send into `buf` and returns its length, or `None` when
    /// there is nothing to send. Call repeatedly until `None` after every `handle_*` and
    /// `send` call. Several queued messages share one packet (spec §6.4).
    ///
    /// # Errors
    /// [`ConnectionError::BufferTooSmall`] if `buf` cannot hold the next packet (use a
    /// buffer of the configured `max_packet_len`); nothing is lost, retry with a larger one.
    pub fn poll_transmit(&mut self, now: Timestamp, buf: &mut [u8]) -> Result<Option<usize>, ConnectionError> {
        if let Some(p) = self.control.front() {
            let n = p.len();
            let dst = buf.get_mut(..n).ok_or(ConnectionError::BufferTooSmall)?;
            dst.copy_from_slice(p);
            self.control.pop_front();
            if self.control.is_empty() && matches!(self.phase, Phase::Established(_)) {
                // Handshake packets and rejects are done: an idle session keeps no buffer
                // for them (spec §13). Only a lost-FINAL resend refills it.
                self.control = VecDeque::new();
            }
            self.count_sent(n);
            return Ok(Some(n));
        }
        let Phase::Established(est) = &mut self.phase else {
            return Ok(None);
        };
        if !est.confirmed {
            return Ok(None);
        }
        let has_work = !self.priority.is_empty() || !self.queue.is_empty() || self.close_pending.is_some();
        if !has_work && !self.empty_packet_due {
            return Ok(None);
        }
        let session = &mut est.current;
        let hlen = session.header_len();
        let limit = session.max_plaintext_len();
        let room = limit.min(buf.len().saturating_sub(hlen + wire::TAG_LEN));
        let mut at = hlen;
        let mut abandon = false;
        // A control message that can never fit the peer's packet limit would block the queue:
        // drop it; for a re-handshake message that abandons the re-handshake (spec §3.3).
        while self.priority.front().is_some_and(|m| m.message().encoded_len() > limit) {
            abandon |= matches!(self.priority.pop_front(), Some(Outgoing::Rehandshake(..)));
        }
        if abandon {
            est.rehandshake = None;
            est.pending = None;
            est.rehandshake_final = None;
        }
        // spec §3.3: data queued before the peer's limit was known may not fit it; it is
        // reported (data) or dropped like a lost packet (an envelope), never left to block.
        while let Some(m) = self.queue.front().filter(|m| m.message().encoded_len() > limit) {
            self.queued_bytes -= m.queued_len();
            if let Some(Outgoing::Data { channel, id, payload }) = self.queue.pop_front() {
                self.stats.messages_unsent += 1;
                self.events.push_back(Event::Unsent { channel, id, len: payload.len() });
            }
        }
        let mut taken_data = 0u64;
        let mut taken_bytes = 0usize;
        let mut switch = false;
        // Control messages first, then application data, packed until the packet is full.
        for q in [&mut self.priority, &mut self.queue] {
            while let Some(m) = q.front() {
                if switch {
                    break;
                }
                let msg = m.message();
                let len = msg.encoded_len();
                if at - hlen + len > room {
                    break;
                }
                // spec §17.2, §17.6: a Stream or Skip travels in the same packet as the message
                // queued after it (unless that run does not fit even an empty packet).
                if at > hlen && matches!(m, Outgoing::Stream(_) | Outgoing::Skip(..)) && at - hlen + glued_len(q) > room
                {
                    break;
                }
                // Invariant: the length was checked against the buffer just above.
                let n = msg.encode(&mut buf[at..]).map_err(|_| ConnectionError::BufferTooSmall)?;
                at += n;
                match q.pop_front() {
                    Some(Outgoing::Data { payload, .. }) => {
                        taken_data += 1;
                        taken_bytes += payload.len();
                    }
                    Some(m @ Outgoing::Routing(_)) => taken_bytes += m.queued_len(),
                    Some(Outgoing::Rehandshake(_, true)) => switch = true,
                    _ => {}
                }
            }
        }
        let mut closing = None;
        if let Some(reason) = self.close_pending.filter(|_| !switch) {
            let msg = Message::Close { reason };
            if self.queue.is_empty() && self.priority.is_empty() && at - hlen + msg.encoded_len() <= room {
                at += msg.encode(&mut buf[at..]).map_err(|_| ConnectionError::BufferTooSmall)?;
                closing = Some(reason);
            }
        }
        if at == hlen && !self.empty_packet_due && closing.is_none() {
            if self.priority.is_empty() && self.queue.is_empty() {
                // Only an oversized control message was pending, and it was dropped.
                return Ok(None);
            }
            // The front message does not fit in `buf`.
            return Err(ConnectionError::BufferTooSmall);
        }
        let n = match session.seal(now, buf, at - hlen) {
            Ok(n) => n,
            Err(SessionError::BufferTooSmall) => return Err(ConnectionError::BufferTooSmall),
            Err(e) => {
                let reason = match e {
                    SessionError::CounterExhausted => CloseReason::TooManyMessages,
                    SessionError::Expired => CloseReason::SessionExpired,
                    _ => CloseReason::InternalError,
                };
                self.finish(now, reason, false, Some(e.into()));
                return Ok(None);
            }
        };
        self.empty_packet_due = false;
        self.queued_bytes -= taken_bytes;
        self.stats.messages_sent += taken_data;
        self.timers.set(Timer::Keepalive, now + self.config.limits.keepalive_interval);
        self.count_sent(n);
        if let Some(reason) = closing {
            self.finish(now, reason, false, None);
        }
        if switch {
            self.switch_to_new_session(now)?;
        }
        Ok(Some(n))
    }

    fn count_sent(&mut self, n: usize) {
        self.stats.packets_sent += 1;
        self.stats.bytes_sent += n as u64;
    }

    /// How long the connection has existed.
    #[must_use]
    pub fn age(&self, now: Timestamp) -> Duration {
        now.saturating_since(self.started)
    }
}

/// FNV-1a: recognises repeats of our own peer's handshake packets (not a security check:
/// the packets already authenticated inside the session).
fn fnv64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Current,
    Pending,
    Previous,
}

impl Established {
    /// Whether the replaced session is kept for receiving beyond its deadline (spec §7.3).
    const fn keeps_previous(&self) -> bool {
        self.awaiting_peer || self.peer_unproven
    }

    /// When a replaced session or epoch key must next be dropped.
    fn overlap_deadline(&self) -> Option<Timestamp> {
        // While the initiator awaits the responder's first new packet the replaced session has
        // no deadline yet (see `handle_timeout`); reporting its old one would be a busy loop.
        let previous = self.previous.as_ref().filter(|_| !self.keeps_previous()).map(|p| p.1);
        [previous, self.current.next_timeout()].into_iter().flatten().min()
    }

    fn route(&self, mode: Mode, header: &TransportHeader) -> Route {
        // Stream mode tells sessions apart by the generation bit; datagram mode keeps one
        // index per connection and uses the same bit (spec §6.2, §7.3).
        let _ = mode;
        if header.generation == self.current.generation() {
            Route::Current
        } else if self.pending.is_some() {
            Route::Pending
        } else {
            Route::Previous
        }
    }
}

impl Driver {
    fn new(hs: Handshake, config: &Config, generation: bool) -> Self {
        Self {
            hs,
            awaiting_decision: false,
            last_sent: None,
            last_read: None,
            reply: None,
            replay_seed: None,
            rto: config.limits.handshake_rto,
            generation,
            cookie_replies: 0,
        }
    }
}
