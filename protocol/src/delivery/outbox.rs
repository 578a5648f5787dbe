//! The sender's half of delivery (spec §17.2–§17.4, §17.6): the window, retransmissions,
//! `Stream` and `Skip`.

use alloc::collections::{BTreeMap, VecDeque};
use alloc::vec::Vec;

use bytes::Bytes;

use super::{Ack, DeliveryConfig, DeliveryMessage, DeliveryOutput, StreamId, ID_LIMIT, RECEIVE_WINDOW};
use crate::error::DeliveryError;
use crate::params::Mode;
use crate::time::{Duration, Timestamp};

/// One message of the window.
#[derive(Debug, Clone)]
pub(super) struct OutMessage {
    pub(super) payload: Bytes,
    /// spec §17.6: dropped (expired) once this passes, if set.
    pub(super) deadline: Option<Timestamp>,
    /// Sent on any connection: decides "expired" or "expired unconfirmed" (spec §17.6).
    pub(super) transmitted: bool,
    /// Last transmission on the current connection; `None`: not sent on it yet.
    last_sent: Option<Timestamp>,
    /// Current retransmission timeout (spec §17.4).
    rto: Duration,
    /// Named by an `Ack`'s ranges on the current connection: not retransmitted on it.
    marked: bool,
    /// Due at once (route back, spec §17.4 rule 4), whatever its timer.
    forced: bool,
    /// In a relay's custody (spec §17.9): not retransmitted on this connection before this.
    custody_until: Option<Timestamp>,
    /// The outbox's transmission count when it last went out: orders transmissions on the
    /// connection (spec §17.9: an `Ack` naming a later one ends custody).
    sent_seq: u64,
}

impl OutMessage {
    pub(super) const fn new(payload: Bytes, deadline: Option<Timestamp>, transmitted: bool) -> Self {
        Self {
            payload,
            deadline,
            transmitted,
            last_sent: None,
            rto: Duration::ZERO,
            marked: false,
            forced: false,
            custody_until: None,
            sent_seq: 0,
        }
    }

    /// When this message is due for retransmission on the current connection, if ever.
    fn retransmit_at(&self) -> Option<Timestamp> {
        let last = self.last_sent?;
        if self.marked {
            return None;
        }
        let due = if self.forced { Timestamp::ZERO } else { last + self.rto };
        // spec §17.9: custody holds back timeouts and route back alike.
        Some(self.custody_until.map_or(due, |c| due.max(c)))
    }
}

/// One channel of the outbox.
#[derive(Debug, Clone)]
pub(super) struct OutChannel {
    /// The next id to assign.
    pub(super) next_id: u64,
    /// The highest `next` the receiver acknowledged (spec §17.3).
    pub(super) acked: u64,
    /// The id of `window[0]`; `next_id` when the window of the channel is empty.
    pub(super) base: u64,
    pub(super) window: VecDeque<OutMessage>,
    /// Messages of `window` before this index were sent (or marked) on this connection; the
    /// first transmissions go in id order from here (spec §17.4 rules 1–2).
    unsent: usize,
    /// The highest `Ack.next` read on the current connection (spec §17.6).
    conn_acked: u64,
    /// The highest `Skip.next` sent on the current connection (0: none).
    skip_sent: u64,
    /// Datagram and routed modes: when the `Skip` last went out, and its timeout.
    skip_last: Option<Timestamp>,
    skip_rto: Duration,
    /// Datagram and routed modes, while messages are in custody (spec §17.9): the last `Ack`
    /// of the channel read, custody notice or acknowledgement request, and the wait after it.
    probe_last: Option<Timestamp>,
    probe_rto: Duration,
}

impl OutChannel {
    pub(super) const fn new(next_id: u64, acked: u64, base: u64, window: VecDeque<OutMessage>) -> Self {
        Self {
            next_id,
            acked,
            base,
            window,
            unsent: 0,
            conn_acked: 0,
            skip_sent: 0,
            skip_last: None,
            skip_rto: Duration::ZERO,
            probe_last: None,
            probe_rto: Duration::ZERO,
        }
    }

    /// Whether a message sent on this connection is in a relay's custody at `now` (spec §17.9).
    fn holds_custody(&self, now: Timestamp) -> bool {
        self.window.iter().take(self.unsent).any(|m| m.custody_until.is_some_and(|c| c > now) && !m.marked)
    }

    /// spec §17.9: when this channel asks for an acknowledgement next, if it holds messages in
    /// custody.
    fn probe_at(&self, now: Timestamp) -> Option<Timestamp> {
        let last = self.probe_last?;
        self.holds_custody(now).then(|| last + self.probe_rto)
    }

    /// spec §17.2: the lowest id the sender may still send, and whether the receiver still
    /// has to learn it on this connection (a `Skip` is needed).
    const fn skip_needed(&self) -> bool {
        self.base > 0 && self.base > self.conn_acked
    }

    /// spec §17.4: ids at or above this may not be sent yet.
    const fn send_limit(&self) -> u64 {
        self.acked.saturating_add(RECEIVE_WINDOW)
    }

    fn pop_front(&mut self) -> Option<OutMessage> {
        let m = self.window.pop_front()?;
        self.base += 1;
        self.unsent = self.unsent.saturating_sub(1);
        Some(m)
    }
}

/// The connection the outbox currently sends on.
#[derive(Debug, Clone, Copy)]
struct Conn {
    mode: Mode,
    /// The `Stream` of spec §17.2 is still to be sent.
    stream_due: bool,
    /// An `Ack` was read on this connection, so the peer read its `Stream` (spec §17.2).
    confirmed: bool,
}

/// A message dropped from the window by its time to live (spec §17.6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expired {
    /// Channel.
    pub channel: u16,
    /// Its id.
    pub id: u64,
    /// The payload, back to the application.
    pub payload: Bytes,
    /// It was transmitted at least once: the peer may have received it and its acknowledgement
    /// been lost ("expired unconfirmed"); otherwise it never left ("expired").
    pub unconfirmed: bool,
}

/// Counters of an [`Outbox`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxStats {
    /// Messages accepted by `push`.
    pub pushed: u64,
    /// First transmissions of a message on a connection.
    pub transmitted: u64,
    /// Transmissions after a timeout or a route back (spec §17.4 rules 3–4).
    pub retransmitted: u64,
    /// Messages freed by a cumulative acknowledgement.
    pub freed: u64,
    /// Messages dropped by their time to live before any transmission.
    pub expired: u64,
    /// Messages dropped by their time to live after a transmission.
    pub expired_unconfirmed: u64,
    /// `Stream` messages sent.
    pub streams_sent: u64,
    /// `Skip` messages sent.
    pub skips_sent: u64,
    /// Acknowledgements read.
    pub acks: u64,
    /// Acknowledgements whose `next` was below an earlier one (spec §17.3: stale).
    pub stale_acks: u64,
    /// Acknowledgement requests (a `Stream` alone) for messages in custody (spec §17.9);
    /// also counted in `streams_sent`.
    pub probes: u64,
    /// Messages whose custody ended because an `Ack` named as received a message transmitted
    /// after them: the relay lost them (spec §17.9).
    pub custody_lost: u64,
}

/// The sender's delivery state for one peer (spec §17.1): the stream id, per channel the
/// next id, and the window of messages not yet acknowledged, with their payloads.
///
/// Call [`Outbox::poll_transmit`] after every `push`, `on_connected`, `on_ack`,
/// `on_route_back` and `expire`, and at [`Outbox::poll_timeout`] (after [`Outbox::expire`]).
#[derive(Debug, Clone)]
pub struct Outbox {
    config: DeliveryConfig,
    stream: StreamId,
    channels: BTreeMap<u16, OutChannel>,
    /// Messages and payload bytes in the window, all channels together (spec §17.4).
    messages: usize,
    bytes: usize,
    conn: Option<Conn>,
    /// The channel served last, so that channels take turns.
    turn: u16,
    /// Since the last Data: the `Stream` went out, and the `Skip` of this channel last
    /// (datagram and routed modes: they go in front of Data, spec §17.2, §17.6).
    stream_in_front: bool,
    skip_in_front: Option<u16>,
    /// No retransmission is due before this (a lower bound; `None`: none is pending).
    retransmit_check: Option<Timestamp>,
    /// No acknowledgement request (spec §17.9) is due before this (a lower bound).
    probe_check: Option<Timestamp>,
    /// Transmissions so far ([`OutMessage::sent_seq`]).
    sent_seq: u64,
    stats: OutboxStats,
}

impl Outbox {
    /// An outbox for a new stream (spec §17.1): `stream` is 8 bytes the caller drew from a
    /// CSPRNG.
    ///
    /// # Errors
    /// [`DeliveryError::Config`].
    pub fn new(config: DeliveryConfig, stream: StreamId) -> Result<Self, DeliveryError> {
        config.validate()?;
        Ok(Self::from_parts(config, stream, BTreeMap::new()))
    }

    pub(super) fn from_parts(config: DeliveryConfig, stream: StreamId, channels: BTreeMap<u16, OutChannel>) -> Self {
        let messages = channels.values().map(|c| c.window.len()).sum();
        let bytes = channels.values().flat_map(|c| c.window.iter()).map(|m| m.payload.len()).sum();
        Self {
            config,
            stream,
            channels,
            messages,
            bytes,
            conn: None,
            turn: 0,
            stream_in_front: false,
            skip_in_front: None,
            retransmit_check: None,
            probe_check: None,
            sent_seq: 0,
            stats: OutboxStats::default(),
        }
    }

    pub(super) const fn channels(&self) -> &BTreeMap<u16, OutChannel> {
        &self.channels
    }

    /// The stream id.
    #[must_use]
    pub const fn stream(&self) -> StreamId {
        self.stream
    }

    /// The configuration.
    #[must_use]
    pub const fn config(&self) -> &DeliveryConfig {
        &self.config
    }

    /// Counters.
    #[must_use]
    pub const fn stats(&self) -> OutboxStats {
        self.stats
    }

    /// Messages in the window (sent or not, not yet acknowledged).
    #[must_use]
    pub const fn window_len(&self) -> usize {
        self.messages
    }

    /// Payload bytes in the window.
    #[must_use]
    pub const fn window_bytes(&self) -> usize {
        self.bytes
    }

    /// The next id `push` assigns on `channel`.
    #[must_use]
    pub fn next_id(&self, channel: u16) -> u64 {
        self.channels.get(&channel).map_or(0, |c| c.next_id)
    }

    /// The highest cumulative acknowledgement of `channel`: every id below it reached the
    /// peer's application and was committed.
    #[must_use]
    pub fn acked(&self, channel: u16) -> u64 {
        self.channels.get(&channel).map_or(0, |c| c.acked)
    }

    /// Whether a connection is current ([`Outbox::on_connected`] without a later
    /// [`Outbox::on_disconnected`]).
    #[must_use]
    pub const fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    /// Accepts a message for `channel` and returns its id (spec §17.2). With `ttl`, the message
    /// is dropped by [`Outbox::expire`] once `now + ttl` passes, if still unacknowledged
    /// (spec §17.6). The payload must fit one Data message to the peer
    /// ([`Connection::max_message_payload`](crate::Connection::max_message_payload)): the
    /// outbox does not know the packet limit, and a message that can never be sent blocks
    /// its channel until it expires.
    ///
    /// # Errors
    /// [`DeliveryError::WindowFull`] (wait for acknowledgements),
    /// [`DeliveryError::MessageTooLarge`] (above `window_bytes`),
    /// [`DeliveryError::IdsExhausted`].
    pub fn push(
        &mut self,
        channel: u16,
        payload: Bytes,
        now: Timestamp,
        ttl: Option<Duration>,
    ) -> Result<u64, DeliveryError> {
        if payload.len() > self.config.window_bytes {
            return Err(DeliveryError::MessageTooLarge);
        }
        // spec §17.4: the window bounds messages and bytes, all channels together.
        if self.messages >= self.config.window_messages || self.bytes + payload.len() > self.config.window_bytes {
            return Err(DeliveryError::WindowFull);
        }
        let id = self.next_id(channel);
        // spec §17.2: the next id never reaches 2^64 − 1024.
        if id >= ID_LIMIT - 1 {
            return Err(DeliveryError::IdsExhausted);
        }
        let ch = self.channels.entry(channel).or_insert_with(|| OutChannel::new(0, 0, 0, VecDeque::new()));
        ch.next_id = id + 1;
        self.bytes += payload.len();
        self.messages += 1;
        ch.window.push_back(OutMessage::new(payload, ttl.map(|t| now + t), false));
        self.stats.pushed += 1;
        Ok(id)
    }

    const fn initial_rto(&self, mode: Mode) -> Duration {
        // spec §17.4: the carrier of stream mode loses nothing; only a receiver's bound does.
        if mode.is_lossy() {
            self.config.rto
        } else {
            self.config.rto_max
        }
    }

    /// A connection to the peer is established (spec §17.1, §17.4 rule 2): whatever the
    /// previous one had in flight is void. Queues the `Stream`, a `Skip` for every channel whose
    /// lowest id still to send is above 0, and the whole window, in id order per channel.
    /// `mode` decides the retransmission timeout and whether `Skip`s are repeated.
    pub fn on_connected(&mut self, mode: Mode, _now: Timestamp) {
        let rto = self.initial_rto(mode);
        let probe = self.config.custody_probe;
        self.conn = Some(Conn { mode, stream_due: true, confirmed: false });
        for ch in self.channels.values_mut() {
            ch.unsent = 0;
            ch.conn_acked = 0;
            ch.skip_sent = 0;
            ch.skip_last = None;
            ch.skip_rto = rto;
            ch.probe_last = None;
            ch.probe_rto = probe;
            for m in &mut ch.window {
                m.last_sent = None;
                m.marked = false;
                m.forced = false;
                m.custody_until = None;
                m.rto = rto;
            }
        }
        self.stream_in_front = false;
        self.skip_in_front = None;
        self.retransmit_check = None;
        self.probe_check = None;
    }

    /// The connection ended: nothing is sent until the next [`Outbox::on_connected`]. The
    /// window stays.
    pub fn on_disconnected(&mut self) {
        self.conn = None;
        self.skip_in_front = None;
        self.retransmit_check = None;
        self.probe_check = None;
    }

    /// Routed mode (spec §17.4 rule 5): the relay reported that it dropped a packet toward the
    /// peer for a passing reason (`Unreachable { Congested }` or `{ SpoolFull }`). Every message
    /// in flight on the current connection (transmitted, neither freed, marked received nor in
    /// custody) whose retransmission timeout would run out later than `rto` (the configured
    /// first timeout) from `now` is due then instead; its timeout doubles again from there.
    /// Returns how many messages were brought forward.
    pub fn on_transient_drop(&mut self, now: Timestamp) -> usize {
        if self.conn.is_none() {
            return 0;
        }
        let rto = self.config.rto;
        let soon = now + rto;
        let mut n = 0;
        for ch in self.channels.values_mut() {
            for m in ch.window.iter_mut().take(ch.unsent) {
                let Some(last) = m.last_sent else { continue };
                if m.marked || m.custody_until.is_some_and(|c| c > now) || last + m.rto <= soon {
                    continue;
                }
                // Due at `soon`: the timeout measured from the last transmission.
                m.rto = soon - last;
                n += 1;
            }
        }
        if n > 0 {
            self.retransmit_check = Some(self.retransmit_check.map_or(soon, |t| t.min(soon)));
        }
        n
    }

    /// Routed mode (spec §17.4 rule 4): the route to the peer was announced again after an
    /// `Unreachable` for it. Every message in flight on the current connection (transmitted,
    /// neither freed nor marked received) and every unconfirmed `Skip` is due at once: the
    /// sender cannot tell which went out while the route was down. With messages in the
    /// window, the `Stream` goes again first: a live receiver answers it at once with an
    /// `Ack` per channel it holds (spec §17.2), so that the session shows whether the peer
    /// still has it (rule 6).
    pub fn on_route_back(&mut self, now: Timestamp) {
        let in_window = self.window_len() > 0;
        let Some(conn) = self.conn.as_mut() else { return };
        if in_window {
            conn.stream_due = true;
        }
        for ch in self.channels.values_mut() {
            for m in ch.window.iter_mut().take(ch.unsent) {
                if m.last_sent.is_some() && !m.marked {
                    m.forced = true;
                }
            }
            if ch.skip_sent > 0 {
                ch.skip_last = None;
            }
        }
        self.retransmit_check = Some(now);
    }

    /// A relay holds, in its spool, the packets that last carried the messages `ids` of
    /// `channel` on the current connection (spec §17.9: the caller maps the `Stored` it read to
    /// the Data those packets carried). They are in custody: not retransmitted on timeout or
    /// route back for [`CUSTODY_TIMEOUT`](super::CUSTODY_TIMEOUT), then unacknowledged again.
    /// Custody frees nothing, and a new connection sends them again. In datagram and routed
    /// modes, a channel with messages in custody and no `Ack` read for the configured
    /// `custody_probe` ([`CUSTODY_PROBE`](super::CUSTODY_PROBE)) asks the receiver for its
    /// acknowledgements (a `Stream` alone, doubling the wait each time), so that a lost `Ack`
    /// does not hold them until the custody ends; an `Ack` that names as received a message
    /// sent after one in custody ends that custody (the relay lost it). Returns how many
    /// messages were put in custody.
    pub fn on_custody(&mut self, channel: u16, ids: core::ops::Range<u64>, now: Timestamp) -> usize {
        let probe = self.config.custody_probe;
        if self.conn.is_none() {
            return 0;
        }
        let Some(ch) = self.channels.get_mut(&channel) else { return 0 };
        let from = ids.start.max(ch.base);
        let to = ids.end.min(ch.base + ch.unsent as u64);
        let mut n = 0;
        for id in from..to {
            if let Some(m) = usize::try_from(id - ch.base).ok().and_then(|i| ch.window.get_mut(i)) {
                if m.last_sent.is_some() && !m.marked {
                    m.custody_until = Some(now + super::CUSTODY_TIMEOUT);
                    m.forced = false;
                    n += 1;
                }
            }
        }
        if n > 0 {
            // spec §17.9: the wait for an acknowledgement request starts again.
            ch.probe_last = Some(now);
            ch.probe_rto = probe;
            if self.conn.is_some_and(|c| c.mode.is_lossy()) {
                let at = now + probe;
                self.probe_check = Some(self.probe_check.map_or(at, |t| t.min(at)));
            }
        }
        n
    }

    /// Reads an acknowledgement from the peer (spec §17.3) and returns how many messages it
    /// freed.
    ///
    /// # Errors
    /// [`DeliveryError::AckBeyondSent`]: the peer is broken; close the connection with
    /// ProtocolViolation. Nothing changed.
    pub fn on_ack(&mut self, ack: &Ack, now: Timestamp) -> Result<usize, DeliveryError> {
        let channel = ack.channel();
        let next_id = self.next_id(channel);
        // spec §17.3: an id the sender never assigned.
        if ack.next() > next_id || ack.ranges().span() > 0 && ack.next().saturating_add(ack.ranges().span()) > next_id {
            return Err(DeliveryError::AckBeyondSent);
        }
        self.stats.acks += 1;
        let probe = self.config.custody_probe;
        let connected = self.conn.is_some();
        if let Some(conn) = self.conn.as_mut() {
            // spec §17.2: a receiver acknowledges on a connection only after its Stream.
            conn.confirmed = true;
        }
        let Some(ch) = self.channels.get_mut(&channel) else {
            return Ok(0);
        };
        if connected {
            ch.conn_acked = ch.conn_acked.max(ack.next());
            // spec §17.9: the receiver answers; an acknowledgement request waits again.
            ch.probe_last = Some(now);
            ch.probe_rto = probe;
        }
        let mut freed = 0;
        if ack.next() < ch.acked {
            // spec §17.3: stale (reordered); its ranges still count.
            self.stats.stale_acks += 1;
        } else {
            ch.acked = ack.next();
            while ch.base < ch.acked {
                let Some(m) = ch.pop_front() else { break };
                self.bytes -= m.payload.len();
                self.messages -= 1;
                freed += 1;
            }
        }
        if connected {
            // spec §17.3: marked received on this connection; kept until `next` covers them.
            let mut latest = 0;
            for r in ack.received() {
                let from = r.start.max(ch.base);
                let to = r.end.min(ch.next_id);
                for id in from..to {
                    if let Some(m) = usize::try_from(id - ch.base).ok().and_then(|i| ch.window.get_mut(i)) {
                        m.marked = true;
                        latest = latest.max(m.sent_seq);
                    }
                }
            }
            // spec §17.9: a relay passes a source's packets on in order, so a message in
            // custody that went out before one the receiver has, and that the receiver lacks,
            // was lost after the relay took it: its custody ends.
            let mut lost = 0;
            for m in ch.window.iter_mut().take(ch.unsent) {
                if m.custody_until.is_some_and(|c| c > now) && !m.marked && m.sent_seq < latest {
                    m.custody_until = None;
                    lost += 1;
                }
            }
            if lost > 0 {
                self.stats.custody_lost += lost;
                self.retransmit_check = Some(now);
            }
        }
        self.stats.freed += freed as u64;
        if self.probe_check.is_some() {
            // spec §17.9: the request this Ack answered, or made moot, moves.
            self.probe_check = self.channels.values().filter_map(|ch| ch.probe_at(now)).min();
        }
        Ok(freed)
    }

    /// Drops the messages whose time to live has passed (spec §17.6) and returns them. A
    /// message waits until every older message of its channel is freed or dropped, so the
    /// dropped ids are a prefix; the receiver learns of them by a `Skip`.
    pub fn expire(&mut self, now: Timestamp) -> Vec<Expired> {
        let mut out = Vec::new();
        for (&channel, ch) in &mut self.channels {
            while ch.window.front().is_some_and(|m| m.deadline.is_some_and(|d| d <= now)) {
                let id = ch.base;
                let Some(m) = ch.pop_front() else { break };
                self.bytes -= m.payload.len();
                self.messages -= 1;
                if m.transmitted {
                    self.stats.expired_unconfirmed += 1;
                } else {
                    self.stats.expired += 1;
                }
                out.push(Expired { channel, id, payload: m.payload, unconfirmed: m.transmitted });
            }
        }
        out
    }

    /// The next `Stream`, `Skip` or Data to send on the current connection, if any is due.
    /// `budget` is the payload room the caller has now (e.g. the connection's send queue):
    /// a Data message with a larger payload is not returned yet. Call until `None`.
    pub fn poll_transmit(&mut self, now: Timestamp, budget: usize) -> Option<DeliveryOutput> {
        let out = self.transmit(now, budget);
        if out.is_none() {
            // The caller's burst ends here: what it sent next goes in another packet, which
            // needs its own Stream and Skip in front.
            self.stream_in_front = false;
            self.skip_in_front = None;
        }
        out
    }

    fn transmit(&mut self, now: Timestamp, budget: usize) -> Option<DeliveryOutput> {
        let conn = self.conn.as_mut()?;
        let mode = conn.mode;
        if conn.stream_due {
            // spec §17.2: the Stream precedes every Data of the connection.
            conn.stream_due = false;
            return Some(self.stream_out());
        }
        let confirmed = conn.confirmed;
        // spec §17.9: a channel whose messages wait in custody and that read no Ack for a while
        // asks for one, in datagram and routed modes where the Ack may have been lost.
        if mode.is_lossy() && self.probe_due(now) {
            let custody_max = super::CUSTODY_TIMEOUT;
            for ch in self.channels.values_mut() {
                if let Some(at) = ch.probe_at(now) {
                    if at <= now {
                        ch.probe_rto = ch.probe_rto.doubled().min(custody_max);
                    }
                    ch.probe_last = Some(now);
                }
            }
            self.probe_check = self.channels.values().filter_map(|ch| ch.probe_at(now)).min();
            self.stats.probes += 1;
            return Some(self.stream_out());
        }
        // spec §17.2: in datagram and routed modes the packet with the first Stream may be
        // lost, so a Stream goes in front of every Skip and Data until an Ack is read.
        let stream_prefix = mode.is_lossy() && !confirmed;
        let rto = self.initial_rto(mode);
        let rto_max = self.config.rto_max;
        // Skips on their own: a new value (every mode), or a timeout (datagram and routed).
        let mut alone = None;
        for (&channel, ch) in &self.channels {
            if !ch.skip_needed() {
                continue;
            }
            let fresh = ch.skip_sent < ch.base;
            let timed_out = mode.is_lossy() && ch.skip_last.is_none_or(|t| now >= t + ch.skip_rto);
            if fresh || timed_out {
                alone = Some((channel, fresh));
                break;
            }
        }
        if let Some((channel, fresh)) = alone {
            if stream_prefix && !self.stream_in_front {
                return Some(self.stream_out());
            }
            let ch = self.channels.get_mut(&channel)?;
            // spec §17.6: repeated at each retransmission timeout, doubling like a message's.
            ch.skip_rto = if fresh { rto } else { ch.skip_rto.doubled().min(rto_max) };
            return Some(self.skip_out(channel, now));
        }
        let (channel, index, retransmit) = self.next_data(now)?;
        let ch = self.channels.get(&channel)?;
        if ch.window.get(index)?.payload.len() > budget {
            return None;
        }
        if stream_prefix && !self.stream_in_front {
            return Some(self.stream_out());
        }
        // spec §17.6: in datagram and routed modes an unconfirmed Skip goes in front of every
        // Data of its channel.
        if mode.is_lossy() && ch.skip_needed() && self.skip_in_front != Some(channel) {
            return Some(self.skip_out(channel, now));
        }
        let ch = self.channels.get_mut(&channel)?;
        let id = ch.base + index as u64;
        let m = ch.window.get_mut(index)?;
        if retransmit {
            if !m.forced {
                // spec §17.4 rule 3: the timeout doubles at each retransmission.
                m.rto = m.rto.doubled().min(rto_max);
            }
            self.stats.retransmitted += 1;
        } else {
            m.rto = rto;
            ch.unsent = index + 1;
            self.stats.transmitted += 1;
        }
        m.forced = false;
        m.custody_until = None;
        m.transmitted = true;
        m.last_sent = Some(now);
        self.sent_seq += 1;
        m.sent_seq = self.sent_seq;
        let due = now + m.rto;
        let payload = m.payload.clone();
        self.retransmit_check = Some(self.retransmit_check.map_or(due, |t| t.min(due)));
        self.stream_in_front = false;
        self.skip_in_front = None;
        self.turn = channel;
        Some(DeliveryOutput::Data { channel, id, payload })
    }

    /// Whether a channel's acknowledgement request (spec §17.9) is due. Scans the channels
    /// only once `probe_check` passes, and moves it to the next request.
    fn probe_due(&mut self, now: Timestamp) -> bool {
        if self.probe_check.is_none_or(|t| t > now) {
            return false;
        }
        let next = self.channels.values().filter_map(|ch| ch.probe_at(now)).min();
        self.probe_check = next;
        next.is_some_and(|t| t <= now)
    }

    fn stream_out(&mut self) -> DeliveryOutput {
        self.stream_in_front = true;
        self.stats.streams_sent += 1;
        DeliveryOutput::Message(DeliveryMessage::Stream { stream: self.stream })
    }

    /// The channel's `Skip` (spec §17.6), recorded as sent now.
    fn skip_out(&mut self, channel: u16, now: Timestamp) -> DeliveryOutput {
        let mut next = 0;
        if let Some(ch) = self.channels.get_mut(&channel) {
            ch.skip_sent = ch.base;
            ch.skip_last = Some(now);
            next = ch.base;
        }
        self.skip_in_front = Some(channel);
        self.stats.skips_sent += 1;
        DeliveryOutput::Message(DeliveryMessage::Skip { channel, next })
    }

    /// Channels in turn order: those after the last one served first.
    fn turn_order(&self) -> impl Iterator<Item = (&u16, &OutChannel)> {
        let after = self.turn.checked_add(1);
        after.map(|a| self.channels.range(a..)).into_iter().flatten().chain(self.channels.range(..=self.turn))
    }

    /// The Data to send next: `(channel, index in its window, retransmission)`.
    fn next_data(&mut self, now: Timestamp) -> Option<(u16, usize, bool)> {
        // spec §17.4 rules 3–4: retransmissions first, oldest id first per channel.
        if self.retransmit_check.is_some_and(|t| t <= now) {
            let mut earliest: Option<Timestamp> = None;
            let mut found = None;
            'scan: for (&channel, ch) in self.turn_order() {
                let limit = ch.send_limit();
                for (i, m) in ch.window.iter().take(ch.unsent).enumerate() {
                    let Some(at) = m.retransmit_at() else { continue };
                    if at <= now && ch.base + (i as u64) < limit {
                        found = Some((channel, i, true));
                        break 'scan;
                    }
                    earliest = Some(earliest.map_or(at, |e| e.min(at)));
                }
            }
            if found.is_some() {
                return found;
            }
            self.retransmit_check = earliest;
        }
        // spec §17.4 rules 1–2: first transmissions in id order, within the receive window.
        let mut first = None;
        for (&channel, ch) in self.turn_order() {
            let skip = ch.window.iter().skip(ch.unsent).take_while(|m| m.marked).count();
            let i = ch.unsent + skip;
            if i < ch.window.len() && ch.base + (i as u64) < ch.send_limit() {
                first = Some((channel, i, skip));
                break;
            }
        }
        let (channel, i, skip) = first?;
        if skip > 0 {
            // Marked on this connection before it was sent on it (an Ack answering the
            // Stream named it): the receiver holds it already.
            if let Some(ch) = self.channels.get_mut(&channel) {
                ch.unsent = i;
            }
        }
        Some((channel, i, false))
    }

    /// When [`Outbox::poll_transmit`] (a retransmission or a `Skip` repeat) or
    /// [`Outbox::expire`] must be called next, if ever.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        let mut next: Option<Timestamp> = None;
        let mut at = |t: Timestamp| next = Some(next.map_or(t, |n| n.min(t)));
        for ch in self.channels.values() {
            // spec §17.6: only the oldest message of a channel can expire.
            if let Some(d) = ch.window.front().and_then(|m| m.deadline) {
                at(d);
            }
            let Some(conn) = self.conn else { continue };
            let limit = ch.send_limit();
            for (i, m) in ch.window.iter().take(ch.unsent).enumerate() {
                if ch.base + (i as u64) < limit {
                    if let Some(t) = m.retransmit_at() {
                        at(t);
                    }
                }
            }
            if conn.mode.is_lossy() && ch.skip_needed() {
                if let Some(t) = ch.skip_last {
                    at(t + ch.skip_rto);
                }
            }
        }
        if let Some(t) = self.probe_check.filter(|_| self.conn.is_some()) {
            at(t);
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::{Ack, DELIVERY_RTO, DELIVERY_RTO_MAX};

    const T0: Timestamp = Timestamp::from_millis(1_000);
    const S: StreamId = [0x5e; 8];

    fn outbox() -> Outbox {
        Outbox::new(DeliveryConfig::default(), S).unwrap()
    }

    fn drain(o: &mut Outbox, now: Timestamp) -> Vec<DeliveryOutput> {
        core::iter::from_fn(|| o.poll_transmit(now, usize::MAX)).take(10_000).collect()
    }

    fn data(channel: u16, id: u64, p: &'static [u8]) -> DeliveryOutput {
        DeliveryOutput::Data { channel, id, payload: Bytes::from_static(p) }
    }

    fn stream() -> DeliveryOutput {
        DeliveryOutput::Message(DeliveryMessage::Stream { stream: S })
    }

    fn skip(channel: u16, next: u64) -> DeliveryOutput {
        DeliveryOutput::Message(DeliveryMessage::Skip { channel, next })
    }

    #[test]
    fn nothing_leaves_before_a_connection_and_the_stream_goes_first() {
        let mut o = outbox();
        assert_eq!(o.push(1, Bytes::from_static(b"a"), T0, None), Ok(0));
        assert_eq!(o.push(1, Bytes::from_static(b"b"), T0, None), Ok(1));
        assert_eq!(o.push(2, Bytes::from_static(b"c"), T0, None), Ok(0));
        assert_eq!(o.poll_transmit(T0, usize::MAX), None);
        o.on_connected(Mode::Stream, T0);
        let out = drain(&mut o, T0);
        assert_eq!(out[0], stream());
        // spec §17.4: id order per channel; channels take turns.
        let ch1: Vec<_> = out.iter().filter(|d| matches!(d, DeliveryOutput::Data { channel: 1, .. })).collect();
        assert_eq!(ch1, [&data(1, 0, b"a"), &data(1, 1, b"b")]);
        assert!(out.contains(&data(2, 0, b"c")));
        assert_eq!(out.len(), 4);
        assert_eq!(o.stats().transmitted, 3);
    }

    #[test]
    fn window_full_refuses_and_acks_make_room() {
        let config = DeliveryConfig { window_messages: 2, window_bytes: 10, ..DeliveryConfig::default() };
        let mut o = Outbox::new(config, S).unwrap();
        assert_eq!(o.push(0, Bytes::from_static(&[0; 11]), T0, None), Err(DeliveryError::MessageTooLarge));
        o.push(0, Bytes::from_static(&[0; 6]), T0, None).unwrap();
        assert_eq!(o.push(0, Bytes::from_static(&[0; 5]), T0, None), Err(DeliveryError::WindowFull), "bytes");
        o.push(0, Bytes::from_static(&[0; 4]), T0, None).unwrap();
        assert_eq!(o.push(1, Bytes::new(), T0, None), Err(DeliveryError::WindowFull), "messages");
        o.on_connected(Mode::Datagram, T0);
        drain(&mut o, T0);
        assert_eq!(o.on_ack(&Ack::cumulative(0, 1), T0), Ok(1));
        assert_eq!((o.window_len(), o.window_bytes()), (1, 4));
        assert_eq!(o.push(1, Bytes::from_static(&[0; 6]), T0, None), Ok(0));
    }

    #[test]
    fn ids_run_out_before_the_limit() {
        let mut o = outbox();
        let mut window = VecDeque::new();
        window.push_back(OutMessage::new(Bytes::new(), None, false));
        o.channels.insert(9, OutChannel::new(ID_LIMIT - 2, ID_LIMIT - 3, ID_LIMIT - 3, window));
        o.messages = 1;
        // The last id: the next id becomes 2^64 − 1025.
        assert_eq!(o.push(9, Bytes::new(), T0, None), Ok(ID_LIMIT - 2));
        assert_eq!(o.push(9, Bytes::new(), T0, None), Err(DeliveryError::IdsExhausted));
        assert_eq!(o.push(8, Bytes::new(), T0, None), Ok(0));
    }

    #[test]
    fn acks_free_stale_ones_are_ignored_and_beyond_sent_is_an_error() {
        let mut o = outbox();
        for _ in 0..5 {
            o.push(3, Bytes::from_static(b"x"), T0, None).unwrap();
        }
        o.on_connected(Mode::Datagram, T0);
        drain(&mut o, T0);
        assert_eq!(o.on_ack(&Ack::cumulative(3, 6), T0), Err(DeliveryError::AckBeyondSent));
        assert_eq!(o.on_ack(&Ack::new(3, 2, &[(1, 3)]).unwrap(), T0), Err(DeliveryError::AckBeyondSent));
        assert_eq!(o.on_ack(&Ack::cumulative(4, 1), T0), Err(DeliveryError::AckBeyondSent), "unused channel");
        assert_eq!(o.on_ack(&Ack::cumulative(4, 0), T0), Ok(0));
        assert_eq!(o.window_len(), 5, "errors change nothing");
        assert_eq!(o.on_ack(&Ack::cumulative(3, 3), T0), Ok(3));
        assert_eq!(o.acked(3), 3);
        // Stale: next below the earlier 3 is ignored, but its ranges mark id 4.
        assert_eq!(o.on_ack(&Ack::new(3, 2, &[(2, 1)]).unwrap(), T0), Ok(0));
        assert_eq!((o.acked(3), o.stats().stale_acks), (3, 1));
        // At the timeout only id 3 goes again: 4 is marked received on this connection.
        let later = T0 + DELIVERY_RTO;
        assert_eq!(drain(&mut o, later), [data(3, 3, b"x")]);
        assert_eq!(o.on_ack(&Ack::cumulative(3, 5), later), Ok(2));
        assert_eq!(o.window_len(), 0);
        assert_eq!(o.poll_timeout(), None);
    }

    #[test]
    fn retransmission_timeout_doubles_up_to_the_cap() {
        for (mode, first) in
            [(Mode::Datagram, DELIVERY_RTO), (Mode::Routed, DELIVERY_RTO), (Mode::Stream, DELIVERY_RTO_MAX)]
        {
            // Datagram and routed: no Ack read yet, so the Stream goes in front (spec §17.2).
            let again: Vec<DeliveryOutput> =
                if mode.is_lossy() { alloc::vec![stream(), data(0, 0, b"m")] } else { alloc::vec![data(0, 0, b"m")] };
            let mut o = outbox();
            o.push(0, Bytes::from_static(b"m"), T0, None).unwrap();
            o.on_connected(mode, T0);
            assert_eq!(drain(&mut o, T0), [stream(), data(0, 0, b"m")]);
            let mut now = T0;
            let mut rto = first;
            let mut gaps = Vec::new();
            for _ in 0..7 {
                let at = o.poll_timeout().unwrap();
                assert_eq!(at, now + rto, "{mode:?}");
                assert!(drain(&mut o, Timestamp::from_micros(at.as_micros() - 1)).is_empty(), "not before");
                assert_eq!(drain(&mut o, at), again);
                gaps.push((at - now).as_micros() / 1_000_000);
                now = at;
                rto = rto.doubled().min(DELIVERY_RTO_MAX);
            }
            if mode == Mode::Stream {
                assert_eq!(gaps, [16; 7]);
            } else {
                assert_eq!(gaps, [1, 2, 4, 8, 16, 16, 16]);
            }
            // A new connection starts over: the message goes at once, then after `first`.
            o.on_connected(mode, now);
            assert_eq!(drain(&mut o, now), [stream(), data(0, 0, b"m")]);
            assert_eq!(o.poll_timeout(), Some(now + first));
        }
    }

    #[test]
    fn a_new_connection_sends_stream_skips_and_the_whole_window() {
        let mut o = outbox();
        for p in [&b"0"[..], b"1", b"2", b"3"] {
            o.push(7, Bytes::from_static(p), T0, None).unwrap();
        }
        o.push(8, Bytes::from_static(b"z"), T0, None).unwrap();
        o.on_connected(Mode::Stream, T0);
        drain(&mut o, T0);
        o.on_ack(&Ack::cumulative(7, 2), T0).unwrap();
        o.on_ack(&Ack::cumulative(8, 1), T0).unwrap();
        // Stream mode: one Skip per channel whose lowest id is above 0, then the window.
        o.on_connected(Mode::Stream, T0);
        let out = drain(&mut o, T0);
        assert_eq!(out, [stream(), skip(7, 2), skip(8, 1), data(7, 2, b"2"), data(7, 3, b"3")]);
        // An Ack on this connection confirms the Skip: none in later connections' data...
        o.on_ack(&Ack::cumulative(7, 2), T0).unwrap();
        // ...but every new connection repeats it (the receiver may have lost its inbox).
        o.on_connected(Mode::Datagram, T0);
        let out = drain(&mut o, T0);
        assert_eq!(out[..3], [stream(), skip(7, 2), skip(8, 1)]);
        // Datagram mode: the unconfirmed Skip goes in front of the channel's Data again, and
        // so does the Stream until an Ack is read on the connection.
        assert_eq!(out[3..], [skip(7, 2), data(7, 2, b"2"), stream(), skip(7, 2), data(7, 3, b"3")]);
        o.on_ack(&Ack::cumulative(7, 3), T0).unwrap();
        let later = T0 + DELIVERY_RTO;
        // At the timeout: Skip of channel 8 alone (no ack on this connection), and 7/3 without one.
        let out = drain(&mut o, later);
        assert_eq!(out, [skip(8, 1), data(7, 3, b"3")]);
        o.on_ack(&Ack::cumulative(8, 1), later).unwrap();
        assert_eq!(o.poll_timeout(), Some(later + DELIVERY_RTO.doubled()), "only 7/3 is left");
    }

    #[test]
    fn skip_repeats_in_lossy_modes_only_until_acknowledged() {
        let mut o = outbox();
        o.push(1, Bytes::from_static(b"a"), T0, None).unwrap();
        o.on_connected(Mode::Routed, T0);
        drain(&mut o, T0);
        o.on_ack(&Ack::cumulative(1, 1), T0).unwrap();
        o.on_connected(Mode::Routed, T0);
        assert_eq!(drain(&mut o, T0), [stream(), skip(1, 1)]);
        let mut now = T0;
        // Alone at each timeout, 1, 2 then 4 s apart.
        for secs in [1, 3, 7] {
            now = o.poll_timeout().unwrap();
            assert_eq!(now, T0 + Duration::from_secs(secs));
            assert_eq!(drain(&mut o, now), [stream(), skip(1, 1)]);
        }
        // A stale Ack (next 0) does not confirm it; an Ack with next ≥ Skip.next does.
        o.on_ack(&Ack::cumulative(1, 0), now).unwrap();
        assert!(o.poll_timeout().is_some());
        o.on_ack(&Ack::cumulative(1, 1), now).unwrap();
        assert_eq!(o.poll_timeout(), None);
        // Stream mode sends it once.
        o.on_connected(Mode::Stream, now);
        assert_eq!(drain(&mut o, now), [stream(), skip(1, 1)]);
        assert_eq!(o.poll_timeout(), None);
    }

    #[test]
    fn expiry_drops_a_prefix_and_reports_it() {
        let mut o = outbox();
        let ttl = Some(Duration::from_secs(5));
        o.push(2, Bytes::from_static(b"a"), T0, None).unwrap(); // id 0: no ttl
        o.push(2, Bytes::from_static(b"b"), T0, ttl).unwrap(); // id 1
        o.push(2, Bytes::from_static(b"c"), T0, ttl).unwrap(); // id 2
        assert_eq!(o.poll_timeout(), None, "the oldest message has no deadline");
        o.on_connected(Mode::Stream, T0);
        assert_eq!(drain(&mut o, T0).len(), 4);
        o.on_disconnected();
        o.push(2, Bytes::from_static(b"d"), T0, Some(Duration::from_secs(1))).unwrap(); // id 3, never sent
        let late = T0 + Duration::from_secs(10);
        // spec §17.6: ids 1–3 wait behind 0, which has no deadline.
        assert!(o.expire(late).is_empty());
        o.on_connected(Mode::Stream, late);
        drain(&mut o, late);
        o.on_ack(&Ack::cumulative(2, 1), late).unwrap();
        assert_eq!(o.poll_timeout(), Some(T0 + Duration::from_secs(5)));
        let expired = o.expire(late);
        let got: Vec<_> = expired.iter().map(|e| (e.id, e.unconfirmed)).collect();
        assert_eq!(got, [(1, true), (2, true), (3, true)], "3 was sent on the second connection");
        assert_eq!((o.stats().expired_unconfirmed, o.window_len()), (3, 0));
        // The receiver learns it by a Skip, sent once in stream mode.
        assert_eq!(drain(&mut o, late), [skip(2, 4)]);
        assert!(drain(&mut o, late).is_empty());
        // Never transmitted: "expired".
        o.on_disconnected();
        o.push(2, Bytes::from_static(b"e"), late, Some(Duration::ZERO)).unwrap();
        let e = o.expire(late);
        assert_eq!((e[0].id, e[0].unconfirmed, o.stats().expired), (4, false, 1));
    }

    #[test]
    fn sends_stay_within_the_receive_window() {
        let config = DeliveryConfig { window_messages: 1024, ..DeliveryConfig::default() };
        let mut o = Outbox::new(config, S).unwrap();
        for _ in 0..1024 {
            o.push(0, Bytes::new(), T0, Some(Duration::from_secs(1))).unwrap();
        }
        o.on_connected(Mode::Datagram, T0);
        let sent = drain(&mut o, T0);
        assert_eq!(sent.iter().filter(|d| matches!(d, DeliveryOutput::Data { .. })).count(), 1024);
        // 1000 expire; the next 1024 may only go once the receiver acknowledged the Skip.
        let later = T0 + Duration::from_secs(1);
        o.channels.get_mut(&0).unwrap().window.iter_mut().skip(1000).for_each(|m| m.deadline = None);
        assert_eq!(o.expire(later).len(), 1000);
        for _ in 0..1000 {
            o.push(0, Bytes::new(), later, None).unwrap();
        }
        o.on_connected(Mode::Datagram, later);
        let out = drain(&mut o, later);
        let ids: Vec<u64> =
            out.iter().filter_map(|d| if let DeliveryOutput::Data { id, .. } = d { Some(*id) } else { None }).collect();
        assert_eq!(ids, (1000..1024).collect::<Vec<_>>(), "ids below acked (0) + 1024 only");
        o.on_ack(&Ack::cumulative(0, 1000), later).unwrap();
        let out = drain(&mut o, later);
        let ids: Vec<u64> =
            out.iter().filter_map(|d| if let DeliveryOutput::Data { id, .. } = d { Some(*id) } else { None }).collect();
        assert_eq!(ids, (1024..2024).collect::<Vec<_>>());
    }

    #[test]
    fn budget_holds_back_large_payloads() {
        let mut o = outbox();
        o.push(0, Bytes::from_static(&[1; 100]), T0, None).unwrap();
        o.on_connected(Mode::Stream, T0);
        assert_eq!(o.poll_transmit(T0, 10), Some(stream()));
        assert_eq!(o.poll_transmit(T0, 99), None);
        assert!(matches!(o.poll_transmit(T0, 100), Some(DeliveryOutput::Data { .. })));
    }

    #[test]
    fn route_back_resends_what_is_in_flight_at_once() {
        let mut o = outbox();
        for _ in 0..3 {
            o.push(5, Bytes::from_static(b"r"), T0, None).unwrap();
        }
        o.on_connected(Mode::Routed, T0);
        drain(&mut o, T0);
        o.on_ack(&Ack::new(5, 0, &[(1, 1)]).unwrap(), T0).unwrap(); // 1 is buffered
        let t = T0 + Duration::from_millis(300);
        assert!(drain(&mut o, t).is_empty());
        o.on_route_back(t);
        assert_eq!(drain(&mut o, t), [stream(), data(5, 0, b"r"), data(5, 2, b"r")]);
        // Not a timeout: the timeout did not double.
        assert_eq!(o.poll_timeout(), Some(t + DELIVERY_RTO));
        assert_eq!(o.stats().retransmitted, 2);
    }

    #[test]
    fn a_route_back_with_an_empty_window_sends_nothing() {
        let mut o = outbox();
        o.push(5, Bytes::from_static(b"r"), T0, None).unwrap();
        o.on_connected(Mode::Routed, T0);
        drain(&mut o, T0);
        o.on_ack(&Ack::cumulative(5, 1), T0).unwrap();
        assert_eq!(o.window_len(), 0);
        o.on_route_back(T0 + DELIVERY_RTO);
        assert!(drain(&mut o, T0 + DELIVERY_RTO).is_empty());
    }

    #[test]
    fn custody_holds_back_retransmissions_but_frees_nothing() {
        let mut o = outbox();
        for _ in 0..3 {
            o.push(2, Bytes::from_static(b"c"), T0, None).unwrap();
        }
        o.on_connected(Mode::Routed, T0);
        drain(&mut o, T0);
        o.on_ack(&Ack::cumulative(2, 0), T0).unwrap();
        let t = T0 + Duration::from_millis(100);
        assert_eq!(o.on_custody(2, 0..2, t), 2);
        assert_eq!(o.on_custody(2, 5..9, t), 0, "never sent");
        // Only 2 goes at its timeout; a route back does not resend the others either.
        assert_eq!(drain(&mut o, T0 + DELIVERY_RTO), [data(2, 2, b"c")]);
        o.on_route_back(T0 + DELIVERY_RTO);
        assert_eq!(drain(&mut o, T0 + DELIVERY_RTO), [stream(), data(2, 2, b"c")], "in flight, not in custody");
        assert_eq!(o.window_len(), 3, "custody frees nothing");
        // After CUSTODY_TIMEOUT they are unacknowledged again.
        let end = t + crate::delivery::CUSTODY_TIMEOUT;
        assert!(o.poll_timeout().is_some_and(|at| at <= end));
        let out = drain(&mut o, end);
        assert!(out.contains(&data(2, 0, b"c")) && out.contains(&data(2, 1, b"c")), "{out:?}");
        // A new connection sends everything again at once.
        o.on_custody(2, 0..3, end);
        o.on_connected(Mode::Routed, end);
        assert_eq!(drain(&mut o, end).iter().filter(|d| matches!(d, DeliveryOutput::Data { .. })).count(), 3);
    }

    #[test]
    fn custody_without_an_ack_asks_for_one() {
        use crate::delivery::{CUSTODY_PROBE, CUSTODY_TIMEOUT};
        let mut o = outbox();
        for _ in 0..2 {
            o.push(4, Bytes::from_static(b"k"), T0, None).unwrap();
        }
        o.push(6, Bytes::from_static(b"z"), T0, None).unwrap();
        o.on_connected(Mode::Routed, T0);
        drain(&mut o, T0);
        o.on_ack(&Ack::cumulative(4, 0), T0).unwrap();
        o.on_ack(&Ack::cumulative(6, 1), T0).unwrap();
        let t = T0 + Duration::from_millis(50);
        assert_eq!(o.on_custody(4, 0..2, t), 2);
        // The cloud's Ack of both is lost: at CUSTODY_PROBE a Stream alone asks again.
        assert_eq!(o.poll_timeout(), Some(t + CUSTODY_PROBE));
        assert!(drain(&mut o, t + Duration::from_micros(CUSTODY_PROBE.as_micros() - 1)).is_empty());
        let mut now = t + CUSTODY_PROBE;
        assert_eq!(drain(&mut o, now), [stream()]);
        assert_eq!((o.stats().probes, o.stats().retransmitted), (1, 0));
        // Unanswered, the wait doubles: 32 s, then 64 s, 128 s.
        for wait in [32, 64, 128] {
            assert_eq!(o.poll_timeout(), Some(now + Duration::from_secs(wait)));
            now = now + Duration::from_secs(wait);
            assert_eq!(drain(&mut o, now), [stream()], "after {wait} s");
        }
        // An Ack of another channel is no answer for this one; one of this channel resets the
        // wait even if it frees nothing (the receiver does not have them yet).
        o.on_ack(&Ack::cumulative(6, 1), now).unwrap();
        assert_eq!(o.poll_timeout(), Some(t + CUSTODY_TIMEOUT), "custody ends before 256 s more");
        o.on_ack(&Ack::cumulative(4, 0), now).unwrap();
        assert_eq!(o.poll_timeout(), Some(now + CUSTODY_PROBE));
        // The answer to the request frees both, and nothing more is due.
        now = now + CUSTODY_PROBE;
        assert_eq!(drain(&mut o, now), [stream()]);
        assert_eq!(o.on_ack(&Ack::cumulative(4, 2), now), Ok(2));
        assert_eq!(o.poll_timeout(), None);
        assert_eq!(o.stats().probes, 5);
    }

    #[test]
    fn custody_requests_stop_with_the_custody_and_are_not_made_in_stream_mode() {
        use crate::delivery::{CUSTODY_PROBE, CUSTODY_TIMEOUT};
        // Custody over: the retransmission takes over, no request.
        let mut o = outbox();
        o.push(1, Bytes::from_static(b"m"), T0, None).unwrap();
        o.on_connected(Mode::Datagram, T0);
        drain(&mut o, T0);
        o.on_ack(&Ack::cumulative(1, 0), T0).unwrap();
        o.on_custody(1, 0..1, T0);
        // Requests at 16, 48, 112, 240 s; custody ends at 300 s.
        let mut probes = 0;
        let mut now = T0;
        while let Some(at) = o.poll_timeout() {
            now = at;
            let out = drain(&mut o, now);
            if out == [stream()] {
                probes += 1;
            } else {
                assert_eq!(out, [data(1, 0, b"m")], "retransmitted once custody ends");
                break;
            }
            assert!(probes < 10, "bounded");
        }
        assert_eq!((probes, now), (4, T0 + CUSTODY_TIMEOUT));
        // Stream mode: the carrier loses no Ack, so no request.
        let mut o = outbox();
        o.push(1, Bytes::from_static(b"m"), T0, None).unwrap();
        o.on_connected(Mode::Stream, T0);
        drain(&mut o, T0);
        o.on_custody(1, 0..1, T0);
        assert_eq!(o.poll_timeout(), Some(T0 + CUSTODY_TIMEOUT));
        assert!(drain(&mut o, T0 + CUSTODY_PROBE).is_empty());
        // A new connection ends custody and its requests.
        let mut o = outbox();
        o.push(1, Bytes::from_static(b"m"), T0, None).unwrap();
        o.on_connected(Mode::Routed, T0);
        drain(&mut o, T0);
        o.on_custody(1, 0..1, T0);
        o.on_connected(Mode::Routed, T0);
        drain(&mut o, T0);
        assert_eq!(o.poll_timeout(), Some(T0 + DELIVERY_RTO));
    }

    #[test]
    fn custody_ends_when_the_receiver_has_a_message_sent_after_it() {
        let mut o = outbox();
        o.push(3, Bytes::from_static(b"k"), T0, None).unwrap();
        o.on_connected(Mode::Routed, T0);
        drain(&mut o, T0);
        o.on_ack(&Ack::cumulative(3, 0), T0).unwrap();
        assert_eq!(o.on_custody(3, 0..1, T0), 1);
        // 3/1 goes after 3/0, through the same relay; the receiver has it but not 3/0: the
        // relay lost 3/0 after taking it (a replay onto an uplink that failed).
        let t = T0 + Duration::from_millis(10);
        o.push(3, Bytes::from_static(b"j"), t, None).unwrap();
        assert_eq!(drain(&mut o, t), [data(3, 1, b"j")]);
        o.on_ack(&Ack::new(3, 0, &[(1, 1)]).unwrap(), t).unwrap();
        assert_eq!(o.stats().custody_lost, 1);
        // 3/0 is retransmitted at its timeout, not after CUSTODY_TIMEOUT.
        assert_eq!(o.poll_timeout(), Some(T0 + DELIVERY_RTO));
        assert_eq!(drain(&mut o, T0 + DELIVERY_RTO), [data(3, 0, b"k")]);

        // A message received that went out *before* the one in custody proves nothing: the
        // relay may still hold the later packet.
        let mut o = outbox();
        for p in [&b"a"[..], b"b"] {
            o.push(4, Bytes::from_static(p), T0, None).unwrap();
        }
        o.on_connected(Mode::Routed, T0);
        drain(&mut o, T0);
        // 4/0 is lost, 4/1 arrives; 4/0's retransmission goes into a spool.
        o.on_ack(&Ack::new(4, 0, &[(1, 1)]).unwrap(), T0).unwrap();
        let again = T0 + DELIVERY_RTO;
        assert_eq!(drain(&mut o, again), [data(4, 0, b"a")]);
        assert_eq!(o.on_custody(4, 0..1, again), 1);
        o.on_ack(&Ack::new(4, 0, &[(1, 1)]).unwrap(), again).unwrap();
        assert_eq!(o.stats().custody_lost, 0, "4/1's last transmission left after 4/0's");
        let later = again + Duration::from_secs(10);
        assert!(drain(&mut o, later).iter().all(|d| !matches!(d, DeliveryOutput::Data { id: 0, .. })));
    }

    #[test]
    fn a_transient_drop_brings_backed_off_retransmissions_forward() {
        let mut o = outbox();
        for p in [&b"a"[..], b"b", b"c"] {
            o.push(1, Bytes::from_static(p), T0, None).unwrap();
        }
        o.on_connected(Mode::Routed, T0);
        drain(&mut o, T0);
        // 1/1 is received; the others back off: retransmitted at 1, 3 and 7 s, next at 15 s.
        o.on_ack(&Ack::new(1, 0, &[(1, 1)]).unwrap(), T0).unwrap();
        let mut now = T0;
        for _ in 0..3 {
            now = o.poll_timeout().unwrap();
            drain(&mut o, now);
        }
        assert_eq!(now, T0 + Duration::from_secs(7));
        assert_eq!(o.poll_timeout(), Some(now + Duration::from_secs(8)));
        // 1/2 goes into custody; then the relay says it dropped a packet (Congested).
        o.on_custody(1, 2..3, now);
        let t = now + Duration::from_millis(500);
        assert_eq!(o.on_transient_drop(t), 1, "not the marked 1/1, not 1/2 in custody");
        assert_eq!(o.poll_timeout(), Some(t + DELIVERY_RTO));
        assert_eq!(drain(&mut o, t + DELIVERY_RTO), [data(1, 0, b"a")]);
        // Its timeout doubles from there (1.5 s → 3 s), capped as usual.
        assert_eq!(o.poll_timeout(), Some(t + DELIVERY_RTO + Duration::from_secs(3)));
        // Another notice a little later: due one `rto` after it, if that is sooner.
        let u = t + DELIVERY_RTO + Duration::from_millis(100);
        assert_eq!(o.on_transient_drop(u), 1);
        assert_eq!(o.poll_timeout(), Some(u + DELIVERY_RTO));
        // A message already due sooner is left alone.
        assert_eq!(o.on_transient_drop(u + Duration::from_millis(200)), 0);
    }

    #[test]
    fn marked_messages_are_skipped_on_a_new_connection_until_the_next_one() {
        let mut o = outbox();
        for _ in 0..3 {
            o.push(1, Bytes::from_static(b"q"), T0, None).unwrap();
        }
        o.on_connected(Mode::Stream, T0);
        // The receiver's answer to the Stream names 1 as buffered: 0 and 2 are sent.
        assert_eq!(o.poll_transmit(T0, usize::MAX), Some(stream()));
        o.on_ack(&Ack::new(1, 0, &[(1, 1)]).unwrap(), T0).unwrap();
        assert_eq!(drain(&mut o, T0), [data(1, 0, b"q"), data(1, 2, b"q")]);
    }
}
