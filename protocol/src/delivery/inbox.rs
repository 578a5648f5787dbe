//! The receiver's half of delivery (spec §17.2, §17.3, §17.5–§17.7): order, duplicates,
//! bounds, `Skip`, commit and acknowledgements.

use alloc::collections::{BTreeMap, VecDeque};

use bytes::Bytes;

use super::{Ack, DeliveryConfig, StreamId, ID_LIMIT, MAX_ACK_RANGES, RECEIVE_WINDOW};
use crate::error::DeliveryError;
use crate::params::Mode;
use crate::time::Timestamp;

/// What [`Inbox::on_data`] did with a Data message (spec §17.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DataOutcome {
    /// It was the next id of its channel: it (and whatever it unblocked) waits in
    /// [`Inbox::poll_deliver`].
    Delivered,
    /// Held above a gap until the ids below it arrive (or are skipped).
    Buffered,
    /// Delivered or buffered before: dropped (and acknowledged again, spec §17.3).
    Duplicate,
    /// Dropped without closing the connection: [`DeliveryError::OutOfWindow`] (datagram and
    /// routed modes; acknowledged), [`DeliveryError::ReceiverFull`] (not acknowledged: the
    /// sender retransmits it later) or [`DeliveryError::NoStream`].
    Dropped(DeliveryError),
}

/// One channel of the inbox.
#[derive(Debug, Clone)]
pub(super) struct InChannel {
    /// Every id below was handed over (it waits in `ready`, was polled, or was skipped).
    next: u64,
    /// Every id below was committed by the application, or skipped (spec §17.7).
    pub(super) committed: u64,
    /// Received above `next` (spec §17.5), copied out of their packets.
    buffer: BTreeMap<u64, Bytes>,
    /// Ready for [`Inbox::poll_deliver`], in id order.
    ready: VecDeque<(u64, Bytes)>,
    /// The last id polled by the application.
    last_polled: Option<u64>,
    /// Every id polled so far is committed: skipped ids need no commit of their own.
    all_committed: bool,
    /// `next` of the last `Ack` sent (spec §17.3: `ACK_EVERY`).
    acked: u64,
    /// Payload bytes handed to the application since the last `Ack` (spec §17.3:
    /// `ACK_EVERY_BYTES`, counted once some of them are committed).
    polled_bytes: usize,
    /// When the next `Ack` of the channel is due.
    ack_due: Option<Timestamp>,
    /// When the last `Ack` of the channel left (rate limit of spec §17.3).
    last_ack: Option<Timestamp>,
}

impl InChannel {
    pub(super) const fn new(next: u64) -> Self {
        Self {
            next,
            committed: next,
            buffer: BTreeMap::new(),
            ready: VecDeque::new(),
            last_polled: None,
            all_committed: true,
            acked: 0,
            polled_bytes: 0,
            ack_due: None,
            last_ack: None,
        }
    }

    /// Every id below this was handed to the application or skipped.
    fn handed(&self) -> u64 {
        self.ready.front().map_or(self.next, |(id, _)| *id)
    }

    /// spec §17.6: skipped ids are committed along with the polled ids around them.
    fn catch_up(&mut self) {
        if self.all_committed {
            self.committed = self.committed.max(self.handed());
        }
    }

    fn due(&mut self, at: Timestamp) {
        self.ack_due = Some(self.ack_due.map_or(at, |d| d.min(at)));
    }

    /// spec §17.3: an `Ack` for a duplicate, a gap, a `Skip` or an out-of-window Data, at
    /// most once per `ack_delay`.
    fn nudge(&mut self, now: Timestamp, config: &DeliveryConfig) {
        let at = self.last_ack.map_or(now, |t| now.max(t + config.ack_delay));
        self.due(at);
    }

    /// Moves `buffer[next]`, `buffer[next + 1]`, … to `ready`.
    fn pull(&mut self, channel: u16, order: &mut VecDeque<u16>) {
        while let Some(p) = self.buffer.remove(&self.next) {
            self.ready.push_back((self.next, p));
            order.push_back(channel);
            // Buffered ids are below ID_LIMIT (see `on_data`): no overflow.
            self.next += 1;
        }
    }

    /// The acknowledgement of the channel's current state (spec §17.3).
    fn ack(&self, channel: u16) -> Ack {
        let next = self.committed;
        let mut r = Ranges { pairs: [(0, 0); MAX_ACK_RANGES], n: 0, p: next, end: next.saturating_add(RECEIVE_WINDOW) };
        // Handed over (or skipped) and not yet committed: nothing to retransmit. `next` itself
        // cannot be named (a skip is at least 1).
        let first = next.saturating_add(1);
        let mut open = self.next <= first || r.push(first, self.next);
        // Then the buffered ids (all above `self.next`), in runs.
        let mut run: Option<(u64, u64)> = None;
        for &id in self.buffer.keys() {
            if !open {
                break;
            }
            run = match run {
                Some((a, b)) if id == b => Some((a, b + 1)),
                Some((a, b)) => {
                    open = r.push(a, b);
                    Some((id, id + 1))
                }
                None => Some((id, id + 1)),
            };
        }
        if let (true, Some((a, b))) = (open, run) {
            r.push(a, b);
        }
        // Built within the bounds Ack::new checks; the fallback only guards that claim.
        Ack::new(channel, next, &r.pairs[..r.n]).unwrap_or(Ack::cumulative(channel, next))
    }
}

/// The ranges of an `Ack` being built: ids from `p` on, below `end`.
struct Ranges {
    pairs: [(u64, u64); MAX_ACK_RANGES],
    n: usize,
    p: u64,
    end: u64,
}

impl Ranges {
    /// Names ids `a..b` (`a > p`); returns whether more may follow.
    fn push(&mut self, a: u64, b: u64) -> bool {
        if self.n == MAX_ACK_RANGES || a >= self.end || a <= self.p {
            return false;
        }
        let b = b.min(self.end);
        self.pairs[self.n] = (a - self.p, b - a);
        self.n += 1;
        self.p = b;
        b < self.end && self.n < MAX_ACK_RANGES
    }
}

/// Counters of an [`Inbox`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InboxStats {
    /// Messages handed to the application by `poll_deliver`.
    pub delivered: u64,
    /// Data messages buffered above a gap.
    pub buffered: u64,
    /// Duplicates dropped.
    pub duplicates: u64,
    /// Data at or beyond `next + RECEIVE_WINDOW` (spec §17.5).
    pub out_of_window: u64,
    /// Data (or a `Skip` for a new channel) beyond the receiver's bounds (spec §17.5).
    pub receiver_full: u64,
    /// `Skip` messages that moved a channel's `next`.
    pub skips: u64,
    /// A `Stream` other than the one followed (spec §17.2).
    pub stream_resets: u64,
    /// `Ack` messages produced.
    pub acks_sent: u64,
}

/// The receiver's delivery state for one peer (spec §17.1): the stream it follows and, per
/// channel, the next id, a bounded reorder buffer and the committed next.
///
/// Memory is bounded whatever the peer sends: at most `max_channels` channels, and
/// `reorder_bytes` of held payload plus, per channel, the one message equal to its `next`
/// that is always taken (spec §17.5) — drain [`Inbox::poll_deliver`] after every
/// [`Inbox::on_data`] and [`Inbox::on_skip`], or later such messages count against
/// `reorder_bytes` too. Buffered payloads are copied out of their packets, so a small
/// message does not keep a large packet alive.
#[derive(Debug, Clone)]
pub struct Inbox {
    config: DeliveryConfig,
    stream: Option<StreamId>,
    /// A `Stream` was read on the current connection (spec §17.2): its Data and `Skip`s are
    /// the inbox's, and `Ack`s may go on it.
    conn_stream: bool,
    channels: BTreeMap<u16, InChannel>,
    /// Payload bytes in buffers and ready queues.
    held: usize,
    /// The channel of each ready message, in the order they became ready.
    order: VecDeque<u16>,
    /// No `Ack` is due before this (a lower bound; `None`: none is).
    ack_check: Option<Timestamp>,
    stats: InboxStats,
}

impl Inbox {
    /// An empty inbox that follows no stream yet.
    ///
    /// # Errors
    /// [`DeliveryError::Config`].
    pub fn new(config: DeliveryConfig) -> Result<Self, DeliveryError> {
        config.validate()?;
        Ok(Self::from_parts(config, None, BTreeMap::new()))
    }

    pub(super) fn from_parts(
        config: DeliveryConfig,
        stream: Option<StreamId>,
        channels: BTreeMap<u16, InChannel>,
    ) -> Self {
        Self {
            config,
            stream,
            conn_stream: false,
            channels,
            held: 0,
            order: VecDeque::new(),
            ack_check: None,
            stats: InboxStats::default(),
        }
    }

    pub(super) const fn channels(&self) -> &BTreeMap<u16, InChannel> {
        &self.channels
    }

    /// The stream followed, if any.
    #[must_use]
    pub const fn stream(&self) -> Option<StreamId> {
        self.stream
    }

    /// The configuration.
    #[must_use]
    pub const fn config(&self) -> &DeliveryConfig {
        &self.config
    }

    /// Counters.
    #[must_use]
    pub const fn stats(&self) -> InboxStats {
        self.stats
    }

    /// Payload bytes held (buffered above gaps or waiting for `poll_deliver`).
    #[must_use]
    pub const fn held_bytes(&self) -> usize {
        self.held
    }

    /// Channels held.
    #[must_use]
    pub fn channel_count(&self) -> usize {
        self.channels.len()
    }

    /// Messages held (buffered or waiting for `poll_deliver`).
    #[must_use]
    pub fn held_messages(&self) -> usize {
        self.channels.values().map(|c| c.buffer.len() + c.ready.len()).sum()
    }

    /// The next id of `channel` to hand over: every id below it was handed over or skipped.
    #[must_use]
    pub fn next(&self, channel: u16) -> u64 {
        self.channels.get(&channel).map_or(0, |c| c.next)
    }

    /// Every id of `channel` below this is committed (or was skipped).
    #[must_use]
    pub fn committed(&self, channel: u16) -> u64 {
        self.channels.get(&channel).map_or(0, |c| c.committed)
    }

    /// A new connection from the peer (spec §17.1): until a `Stream` is read on it, its Data
    /// is best effort (not the inbox's) and no `Ack` goes on it (spec §17.2).
    pub fn on_connected(&mut self) {
        self.conn_stream = false;
    }

    /// Whether a `Stream` was read on the current connection.
    #[must_use]
    pub const fn stream_read(&self) -> bool {
        self.conn_stream
    }

    /// Reads the peer's `Stream` (spec §17.2) and returns whether the inbox started over: a
    /// stream other than the one followed discards every channel, buffered and undelivered
    /// messages included, and follows the new one from id 0. Either way, an `Ack` per channel
    /// held is due, at once unless one left less than `ack_delay` ago (a sender in datagram
    /// or routed mode repeats its `Stream` until it reads an `Ack`).
    pub fn on_stream(&mut self, stream: StreamId, now: Timestamp) -> bool {
        self.conn_stream = true;
        let reset = self.stream != Some(stream);
        if reset {
            if self.stream.is_some() {
                self.stats.stream_resets += 1;
            }
            self.stream = Some(stream);
            self.channels.clear();
            self.order.clear();
            self.held = 0;
            self.ack_check = None;
        }
        let config = self.config;
        for ch in self.channels.values_mut() {
            ch.nudge(now, &config);
            self.ack_check = Some(now);
        }
        reset
    }

    /// The channel, created at id 0 if there is room (spec §17.5).
    fn channel<'a>(
        channels: &'a mut BTreeMap<u16, InChannel>,
        max_channels: usize,
        stats: &mut InboxStats,
        channel: u16,
    ) -> Option<&'a mut InChannel> {
        if !channels.contains_key(&channel) && channels.len() >= max_channels {
            stats.receiver_full += 1;
            return None;
        }
        Some(channels.entry(channel).or_insert_with(|| InChannel::new(0)))
    }

    /// Reads a Data message (spec §17.5), received on the current connection, in `mode`.
    /// Drain [`Inbox::poll_deliver`] afterwards. Without a `Stream` read on the connection
    /// the Data is not the inbox's ([`DataOutcome::Dropped`] with
    /// [`DeliveryError::NoStream`]): the application gets it best effort (spec §17).
    ///
    /// # Errors
    /// [`DeliveryError::OutOfWindow`] in stream mode only: the sender broke spec §17.4; close
    /// the connection with ProtocolViolation. Nothing changed beyond the counters.
    pub fn on_data(
        &mut self,
        channel: u16,
        id: u64,
        payload: Bytes,
        mode: Mode,
        now: Timestamp,
    ) -> Result<DataOutcome, DeliveryError> {
        if self.stream.is_none() || !self.conn_stream {
            return Ok(DataOutcome::Dropped(DeliveryError::NoStream));
        }
        let config = self.config;
        let held = self.held;
        let Some(ch) = Self::channel(&mut self.channels, config.max_channels, &mut self.stats, channel) else {
            return Ok(DataOutcome::Dropped(DeliveryError::ReceiverFull));
        };
        if id < ch.next || ch.buffer.contains_key(&id) {
            ch.nudge(now, &config);
            self.stats.duplicates += 1;
            self.ack_check = Some(self.ack_check.map_or(now, |t| t.min(now)));
            return Ok(DataOutcome::Duplicate);
        }
        // An id an honest sender never assigns (spec §17.2) is out of any window too.
        if id >= ch.next.saturating_add(RECEIVE_WINDOW) || id >= ID_LIMIT {
            self.stats.out_of_window += 1;
            if mode.is_lossy() {
                // The Skip before it may have been lost: the sender sends it again.
                ch.nudge(now, &config);
                self.ack_check = Some(self.ack_check.map_or(now, |t| t.min(now)));
                return Ok(DataOutcome::Dropped(DeliveryError::OutOfWindow));
            }
            return Err(DeliveryError::OutOfWindow);
        }
        // spec §17.5: the next id is always taken (it is handed over at once); anything else
        // counts against the bound.
        let exempt = id == ch.next && ch.ready.is_empty();
        if !exempt && held + payload.len() > config.reorder_bytes {
            self.stats.receiver_full += 1;
            return Ok(DataOutcome::Dropped(DeliveryError::ReceiverFull));
        }
        self.held += payload.len();
        if id == ch.next {
            ch.ready.push_back((id, payload));
            self.order.push_back(channel);
            ch.next += 1;
            ch.pull(channel, &mut self.order);
            Ok(DataOutcome::Delivered)
        } else {
            // A copy: the packet the payload shares may be much larger than it.
            ch.buffer.insert(id, Bytes::copy_from_slice(&payload));
            // spec §17.3: so that the sender learns the gap.
            ch.nudge(now, &config);
            self.ack_check = Some(self.ack_check.map_or(now, |t| t.min(now)));
            self.stats.buffered += 1;
            Ok(DataOutcome::Buffered)
        }
    }

    /// Reads a `Skip` (spec §17.6), ignored without a `Stream` read on the connection: the
    /// buffered messages below `next`
    /// are handed over in order, the channel's `next` becomes at least `next`, what that
    /// unblocks is handed over, and an `Ack` is due. Returns whether the channel's `next`
    /// moved. Drain [`Inbox::poll_deliver`] afterwards.
    pub fn on_skip(&mut self, channel: u16, next: u64, now: Timestamp) -> bool {
        if self.stream.is_none() || !self.conn_stream || next == 0 && !self.channels.contains_key(&channel) {
            return false;
        }
        let config = self.config;
        // A new channel starts at 0 and moves at once: nothing below `next` will ever come.
        let Some(ch) = Self::channel(&mut self.channels, config.max_channels, &mut self.stats, channel) else {
            return false;
        };
        let moved = next > ch.next;
        if moved {
            while let Some(entry) = ch.buffer.first_entry() {
                if *entry.key() >= next {
                    break;
                }
                let (id, p) = entry.remove_entry();
                ch.ready.push_back((id, p));
                self.order.push_back(channel);
            }
            ch.next = next;
            ch.pull(channel, &mut self.order);
            ch.catch_up();
            self.stats.skips += 1;
        }
        ch.nudge(now, &config);
        self.ack_check = Some(self.ack_check.map_or(now, |t| t.min(now)));
        moved
    }

    /// The next message for the application, `(channel, id, payload)`, in id order per
    /// channel, each id once. Call until `None` after `on_data` and `on_skip`.
    pub fn poll_deliver(&mut self) -> Option<(u16, u64, Bytes)> {
        let channel = self.order.pop_front()?;
        let ch = self.channels.get_mut(&channel)?;
        let (id, payload) = ch.ready.pop_front()?;
        self.held -= payload.len();
        ch.last_polled = Some(id);
        ch.all_committed = false;
        ch.polled_bytes = ch.polled_bytes.saturating_add(payload.len());
        self.stats.delivered += 1;
        Some((channel, id, payload))
    }

    /// The application committed every message of `channel` it was given up to `through`
    /// inclusive (spec §17.7): it holds them durably, or as it declared sufficient. The
    /// `Ack` that tells the sender follows within `ack_delay`, or at once after `ack_every`
    /// such messages or `ack_every_bytes` of payload handed over since the last `Ack`.
    pub fn commit(&mut self, channel: u16, through: u64, now: Timestamp) {
        let config = self.config;
        let Some(ch) = self.channels.get_mut(&channel) else { return };
        let before = ch.committed;
        match ch.last_polled {
            Some(last) if through < last => ch.committed = ch.committed.max(through + 1),
            _ => {
                ch.all_committed = true;
                ch.catch_up();
            }
        }
        if ch.committed > before {
            let at = if ch.committed - ch.acked >= config.ack_every || ch.polled_bytes >= config.ack_every_bytes {
                now
            } else {
                now + config.ack_delay
            };
            ch.due(at);
            self.ack_check = Some(self.ack_check.map_or(at, |t| t.min(at)));
        }
    }

    /// [`Inbox::commit`] of everything the application was given, on every channel.
    pub fn commit_delivered(&mut self, now: Timestamp) {
        let last: alloc::vec::Vec<(u16, u64)> =
            self.channels.iter().filter_map(|(&c, ch)| ch.last_polled.map(|l| (c, l))).collect();
        for (channel, through) in last {
            self.commit(channel, through, now);
        }
    }

    /// The next acknowledgement to send on the current connection to the peer, if one is due
    /// (spec §17.3). Call until `None` after every input, commit and timeout.
    pub fn poll_ack(&mut self, now: Timestamp) -> Option<Ack> {
        // spec §17.2: an Ack tells the sender that its Stream arrived on this connection.
        if !self.conn_stream || self.ack_check.is_none_or(|t| t > now) {
            return None;
        }
        let mut found = None;
        let mut earliest: Option<Timestamp> = None;
        for (&channel, ch) in &self.channels {
            let Some(d) = ch.ack_due else { continue };
            if d <= now && found.is_none() {
                found = Some(channel);
            } else {
                earliest = Some(earliest.map_or(d, |e| e.min(d)));
            }
        }
        self.ack_check = earliest;
        let channel = found?;
        let ch = self.channels.get_mut(&channel)?;
        let ack = ch.ack(channel);
        ch.ack_due = None;
        ch.last_ack = Some(now);
        ch.acked = ack.next();
        ch.polled_bytes = 0;
        self.stats.acks_sent += 1;
        Some(ack)
    }

    /// When [`Inbox::poll_ack`] must be called next, if ever.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        if !self.conn_stream {
            return None;
        }
        self.channels.values().filter_map(|c| c.ack_due).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::ACK_DELAY;
    use crate::time::Duration;
    use alloc::vec::Vec;

    const T0: Timestamp = Timestamp::from_millis(1_000);
    const S: StreamId = [0x11; 8];

    fn inbox(config: DeliveryConfig) -> Inbox {
        let mut i = Inbox::new(config).unwrap();
        assert!(i.on_stream(S, T0));
        i
    }

    fn data(i: &mut Inbox, channel: u16, id: u64, p: &'static [u8]) -> Result<DataOutcome, DeliveryError> {
        i.on_data(channel, id, Bytes::from_static(p), Mode::Datagram, T0)
    }

    fn delivered(i: &mut Inbox) -> Vec<(u16, u64)> {
        core::iter::from_fn(|| i.poll_deliver()).map(|(c, id, _)| (c, id)).collect()
    }

    fn acks(i: &mut Inbox, now: Timestamp) -> Vec<Ack> {
        core::iter::from_fn(|| i.poll_ack(now)).take(1000).collect()
    }

    #[test]
    fn in_order_once_with_gaps_filled_and_duplicates_dropped() {
        let mut i = inbox(DeliveryConfig::default());
        assert_eq!(data(&mut i, 1, 1, b"b"), Ok(DataOutcome::Buffered));
        assert_eq!(data(&mut i, 1, 3, b"d"), Ok(DataOutcome::Buffered));
        assert_eq!(data(&mut i, 1, 3, b"d"), Ok(DataOutcome::Duplicate));
        assert!(delivered(&mut i).is_empty());
        assert_eq!(data(&mut i, 1, 0, b"a"), Ok(DataOutcome::Delivered));
        assert_eq!(delivered(&mut i), [(1, 0), (1, 1)]);
        assert_eq!(data(&mut i, 1, 0, b"a"), Ok(DataOutcome::Duplicate));
        assert_eq!(data(&mut i, 1, 2, b"c"), Ok(DataOutcome::Delivered));
        assert_eq!(delivered(&mut i), [(1, 2), (1, 3)]);
        assert_eq!((i.next(1), i.held_bytes(), i.stats().duplicates), (4, 0, 2));
        assert_eq!(data(&mut i, 1, 1, b"c"), Ok(DataOutcome::Duplicate));
    }

    #[test]
    fn acks_carry_committed_next_and_ranges_of_what_is_held() {
        let mut i = inbox(DeliveryConfig::default());
        // Gap acks: at once, then at most once per ACK_DELAY.
        data(&mut i, 2, 3, b"x").unwrap();
        assert_eq!(acks(&mut i, T0), [Ack::new(2, 0, &[(3, 1)]).unwrap()]);
        data(&mut i, 2, 4, b"x").unwrap();
        data(&mut i, 2, 7, b"x").unwrap();
        assert!(acks(&mut i, T0).is_empty());
        assert_eq!(i.poll_timeout(), Some(T0 + ACK_DELAY));
        assert_eq!(acks(&mut i, T0 + ACK_DELAY), [Ack::new(2, 0, &[(3, 2), (2, 1)]).unwrap()]);
        // Delivered but not committed: named in the ranges (except `next` itself), not in `next`.
        data(&mut i, 2, 0, b"x").unwrap();
        data(&mut i, 2, 1, b"x").unwrap();
        data(&mut i, 2, 2, b"x").unwrap();
        assert_eq!(delivered(&mut i).len(), 5);
        i.on_skip(2, 0, T0); // a Skip at or below next changes nothing but asks for an Ack
        let t = T0 + ACK_DELAY + ACK_DELAY;
        assert_eq!(acks(&mut i, t), [Ack::new(2, 0, &[(1, 4), (2, 1)]).unwrap()]);
        // Commit through 2: Ack within ACK_DELAY.
        i.commit(2, 2, t);
        assert!(acks(&mut i, t).is_empty());
        assert_eq!(i.poll_timeout(), Some(t + ACK_DELAY));
        assert_eq!(acks(&mut i, t + ACK_DELAY), [Ack::new(2, 3, &[(1, 1), (2, 1)]).unwrap()]);
        i.commit_delivered(t + ACK_DELAY);
        assert_eq!(i.committed(2), 5);
        assert_eq!(acks(&mut i, t + ACK_DELAY + ACK_DELAY), [Ack::new(2, 5, &[(2, 1)]).unwrap()]);
        assert_eq!(i.poll_timeout(), None);
    }

    #[test]
    fn ack_every_committed_messages_go_at_once() {
        let mut i = inbox(DeliveryConfig::default());
        for id in 0..32 {
            data(&mut i, 0, id, b"m").unwrap();
        }
        delivered(&mut i);
        i.commit(0, 30, T0);
        assert!(acks(&mut i, T0).is_empty(), "31 committed: within ACK_DELAY");
        i.commit(0, 31, T0);
        assert_eq!(acks(&mut i, T0), [Ack::cumulative(0, 32)]);
    }

    #[test]
    fn committed_payload_of_ack_every_bytes_goes_at_once() {
        let config = DeliveryConfig { ack_every_bytes: 40, ..DeliveryConfig::default() };
        let mut i = inbox(config);
        for id in 0..4 {
            data(&mut i, 0, id, &[0xa5; 10]).unwrap();
        }
        delivered(&mut i);
        i.commit(0, 3, T0);
        assert_eq!(acks(&mut i, T0), [Ack::cumulative(0, 4)], "40 B committed: at once");
        // The count starts again after the Ack: 30 B wait for ACK_DELAY.
        for id in 4..7 {
            data(&mut i, 0, id, &[0xa5; 10]).unwrap();
        }
        delivered(&mut i);
        i.commit(0, 6, T0);
        assert!(acks(&mut i, T0).is_empty(), "30 B committed: within ACK_DELAY");
        assert_eq!(acks(&mut i, T0 + ACK_DELAY), [Ack::cumulative(0, 7)]);
        // Handed over but not committed: no Ack for the bytes alone.
        data(&mut i, 0, 7, &[0xa5; 50]).unwrap();
        delivered(&mut i);
        assert!(acks(&mut i, T0 + ACK_DELAY + ACK_DELAY).is_empty());
    }

    #[test]
    fn ranges_stop_at_sixteen_pairs_and_at_the_window() {
        let mut i = inbox(DeliveryConfig::default());
        for id in (1..60).step_by(2) {
            data(&mut i, 0, id, b"").unwrap();
        }
        let a = acks(&mut i, T0).pop().unwrap();
        assert_eq!(a.ranges().len(), 16);
        assert!(a.received().all(|r| r.end - r.start == 1 && r.start % 2 == 1));
        // Delivered far ahead of `committed`: ranges name nothing at or beyond committed + 1024.
        let mut i = inbox(DeliveryConfig { reorder_bytes: 0, ..DeliveryConfig::default() });
        for id in 0..1100 {
            data(&mut i, 0, id, b"").unwrap();
            delivered(&mut i);
        }
        data(&mut i, 0, 1101, b"").unwrap();
        let a = acks(&mut i, T0 + ACK_DELAY).pop().unwrap();
        let named: Vec<_> = a.received().collect();
        assert_eq!((a.next(), named.len(), named[0].clone()), (0, 1, 1..1024));
    }

    #[test]
    fn out_of_window_closes_only_in_stream_mode() {
        let mut i = inbox(DeliveryConfig::default());
        let far = Bytes::from_static(b"far");
        assert_eq!(i.on_data(0, 1024, far.clone(), Mode::Stream, T0), Err(DeliveryError::OutOfWindow));
        for mode in [Mode::Datagram, Mode::Routed] {
            assert_eq!(i.on_data(0, 1024, far.clone(), mode, T0), Ok(DataOutcome::Dropped(DeliveryError::OutOfWindow)));
        }
        assert_eq!(i.on_data(0, 1023, far.clone(), Mode::Stream, T0), Ok(DataOutcome::Buffered));
        assert_eq!(
            i.on_data(0, u64::MAX, far, Mode::Datagram, T0),
            Ok(DataOutcome::Dropped(DeliveryError::OutOfWindow))
        );
        assert_eq!(i.stats().out_of_window, 4);
        // Acknowledged (lossy modes): the sender learns where the receiver stands.
        assert_eq!(acks(&mut i, T0), [Ack::new(0, 0, &[(1023, 1)]).unwrap()]);
    }

    #[test]
    fn receiver_bounds_drop_without_an_ack_and_take_the_next_id() {
        let config = DeliveryConfig { max_channels: 2, reorder_bytes: 10, ..DeliveryConfig::default() };
        let mut i = inbox(config);
        assert_eq!(data(&mut i, 0, 1, b"123456"), Ok(DataOutcome::Buffered));
        assert_eq!(acks(&mut i, T0).len(), 1);
        assert_eq!(data(&mut i, 1, 1, b"12345"), Ok(DataOutcome::Dropped(DeliveryError::ReceiverFull)));
        assert_eq!(data(&mut i, 2, 0, b""), Ok(DataOutcome::Dropped(DeliveryError::ReceiverFull)), "third channel");
        assert!(!i.on_skip(2, 5, T0), "no channel for a Skip either");
        assert_eq!(i.channel_count(), 2);
        assert!(acks(&mut i, T0 + ACK_DELAY).is_empty(), "no Ack for what was dropped for room");
        // The next id of a held channel is always taken, and unblocks the buffer.
        assert_eq!(data(&mut i, 1, 0, b"0123456789"), Ok(DataOutcome::Delivered));
        assert_eq!(data(&mut i, 0, 0, b"0123456789"), Ok(DataOutcome::Delivered));
        assert_eq!(i.held_bytes(), 26);
        // Until the application drains, a later next id counts against the bound.
        assert_eq!(data(&mut i, 1, 1, b"x"), Ok(DataOutcome::Dropped(DeliveryError::ReceiverFull)));
        assert_eq!(delivered(&mut i), [(1, 0), (0, 0), (0, 1)]);
        // The retransmission later gets in.
        assert_eq!(data(&mut i, 1, 1, b"x"), Ok(DataOutcome::Delivered));
        assert_eq!(i.stats().receiver_full, 4);
    }

    #[test]
    fn skip_hands_over_what_is_below_it_and_moves_next() {
        let mut i = inbox(DeliveryConfig::default());
        data(&mut i, 4, 2, b"c").unwrap();
        data(&mut i, 4, 5, b"f").unwrap();
        data(&mut i, 4, 7, b"h").unwrap();
        acks(&mut i, T0);
        assert!(i.on_skip(4, 5, T0));
        assert_eq!(delivered(&mut i), [(4, 2), (4, 5)]);
        assert_eq!(i.next(4), 6);
        // Skipped ids need no commit: committing 2 and 5 commits through 6.
        i.commit(4, 2, T0);
        assert_eq!(i.committed(4), 3);
        i.commit_delivered(T0);
        assert_eq!(i.committed(4), 6);
        // A Skip to a new channel creates it at the Skip, committed.
        assert!(i.on_skip(9, 1_000_000, T0));
        assert_eq!((i.next(9), i.committed(9)), (1_000_000, 1_000_000));
        let all = acks(&mut i, T0 + ACK_DELAY);
        assert!(all.contains(&Ack::new(4, 6, &[(1, 1)]).unwrap()), "{all:?}");
        assert!(all.contains(&Ack::cumulative(9, 1_000_000)), "{all:?}");
        // Skip far beyond the window, with nothing delivered since: committed follows.
        assert!(i.on_skip(4, u64::MAX - 5, T0));
        assert_eq!(delivered(&mut i), [(4, 7)]);
        assert_eq!(i.committed(4), 7, "6 was skipped, 7 is not committed yet");
        i.commit_delivered(T0);
        assert_eq!(i.committed(4), u64::MAX - 5);
        assert!(!i.on_skip(4, 7, T0), "below next: nothing changes");
    }

    #[test]
    fn a_new_stream_starts_over_and_every_stream_is_answered() {
        let mut i = inbox(DeliveryConfig::default());
        data(&mut i, 1, 0, b"a").unwrap();
        data(&mut i, 1, 2, b"c").unwrap();
        data(&mut i, 3, 0, b"a").unwrap();
        delivered(&mut i);
        i.commit_delivered(T0);
        acks(&mut i, T0 + ACK_DELAY);
        // The same stream (a reconnect): nothing changes; one Ack per channel at once.
        let t = T0 + Duration::from_secs(1);
        assert!(!i.on_stream(S, t));
        assert_eq!(acks(&mut i, t), [Ack::new(1, 1, &[(1, 1)]).unwrap(), Ack::cumulative(3, 1)]);
        // Another stream: everything goes, buffered messages included.
        assert!(i.on_stream([0x22; 8], t));
        assert_eq!((i.channel_count(), i.held_bytes(), i.stats().stream_resets), (0, 0, 1));
        assert!(acks(&mut i, t).is_empty());
        assert_eq!(data(&mut i, 1, 0, b"a"), Ok(DataOutcome::Delivered));
        assert_eq!(delivered(&mut i), [(1, 0)]);
    }

    #[test]
    fn data_without_a_stream_is_not_the_inbox_s() {
        let mut i = Inbox::new(DeliveryConfig::default()).unwrap();
        assert_eq!(data(&mut i, 0, 0, b"x"), Ok(DataOutcome::Dropped(DeliveryError::NoStream)));
        assert!(!i.on_skip(0, 5, T0));
        assert_eq!(i.channel_count(), 0);
        // A new connection: nothing of it is the inbox's, and no Ack goes on it, until its
        // Stream is read (spec §17.2).
        i.on_stream(S, T0);
        data(&mut i, 0, 1, b"x").unwrap();
        i.on_connected();
        assert!(!i.stream_read());
        assert_eq!(data(&mut i, 0, 0, b"x"), Ok(DataOutcome::Dropped(DeliveryError::NoStream)));
        assert!(!i.on_skip(0, 5, T0));
        assert_eq!((i.poll_ack(T0), i.poll_timeout()), (None, None));
        assert!(!i.on_stream(S, T0));
        assert_eq!(i.poll_ack(T0), Some(Ack::new(0, 0, &[(1, 1)]).unwrap()));
        assert_eq!(data(&mut i, 0, 0, b"x"), Ok(DataOutcome::Delivered));
    }
}
