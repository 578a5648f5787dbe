//! Delivery (spec §17): every Data message a sender's [`Outbox`] accepts reaches the
//! receiving application exactly once, in order per channel, across lost packets, new
//! connections and restarts of either side (with saved state, spec §17.8).
//!
//! Both halves are sans-IO state machines that outlive connections (spec §17.1): an endpoint
//! keeps, per peer node id, one [`Outbox`] for what it sends and one [`Inbox`] for what it
//! receives, and drives them with the connection of the moment:
//!
//! - sender: [`Outbox::on_connected`] when a connection to the peer is established, then
//!   [`Outbox::push`] to send, [`Outbox::poll_transmit`] for what to put on the connection
//!   ([`Connection::send_delivery`](crate::Connection::send_delivery) and
//!   [`Connection::send_data`](crate::Connection::send_data)), [`Outbox::on_ack`] with every
//!   [`Ack`] the peer sends, [`Outbox::expire`] and a timer at [`Outbox::poll_timeout`];
//! - receiver: [`Inbox::on_stream`], [`Inbox::on_skip`] and [`Inbox::on_data`] with what the
//!   peer sends, [`Inbox::poll_deliver`] for the application, [`Inbox::commit`] once the
//!   application holds what it was given, [`Inbox::poll_ack`] for the acknowledgements to
//!   send, and a timer at [`Inbox::poll_timeout`].
//!
//! Neither reads a clock nor draws randomness: times are arguments, and the stream id is the
//! caller's (8 bytes from a CSPRNG when an outbox starts without saved state, spec §17.1).
//! Memory is bounded by the [`DeliveryConfig`] whatever the peer sends.
//!
//! ```
//! use bytes::Bytes;
//! use veil_protocol::delivery::{DataOutcome, DeliveryConfig, DeliveryMessage, DeliveryOutput, Inbox, Outbox};
//! use veil_protocol::{Duration, Mode, Timestamp};
//!
//! let config = DeliveryConfig::default();
//! let mut outbox = Outbox::new(config, [7; 8])?;
//! let mut inbox = Inbox::new(config)?;
//! let mut now = Timestamp::ZERO;
//! outbox.on_connected(Mode::Datagram, now);
//! for reading in ["21.5", "21.6", "21.4"] {
//!     outbox.push(1, Bytes::from(reading), now, None)?;
//! }
//!
//! // One round trip over a path that loses the first Data message.
//! let mut first_data = true;
//! let mut round = |outbox: &mut Outbox, inbox: &mut Inbox, now| -> Result<(), veil_protocol::error::DeliveryError> {
//!     while let Some(out) = outbox.poll_transmit(now, usize::MAX) {
//!         match out {
//!             DeliveryOutput::Message(DeliveryMessage::Stream { stream }) => {
//!                 inbox.on_stream(stream, now);
//!             }
//!             DeliveryOutput::Message(DeliveryMessage::Skip { channel, next }) => {
//!                 inbox.on_skip(channel, next, now);
//!             }
//!             DeliveryOutput::Data { channel, id, payload } => {
//!                 if std::mem::take(&mut first_data) {
//!                     continue; // lost
//!                 }
//!                 let _: DataOutcome = inbox.on_data(channel, id, payload, Mode::Datagram, now)?;
//!             }
//!             _ => {}
//!         }
//!     }
//!     inbox.commit_delivered(now);
//!     let later = now + Duration::from_millis(25);
//!     while let Some(ack) = inbox.poll_ack(later) {
//!         outbox.on_ack(&ack, later)?;
//!     }
//!     Ok(())
//! };
//! round(&mut outbox, &mut inbox, now)?;
//! assert!(inbox.poll_deliver().is_none(), "21.6 and 21.4 wait behind the lost 21.5");
//! assert_eq!(outbox.window_len(), 3, "nothing is freed before it is delivered and committed");
//!
//! // The retransmission timeout sends 21.5 again; everything is delivered in order, once.
//! now = outbox.poll_timeout().expect("a retransmission is pending");
//! round(&mut outbox, &mut inbox, now)?;
//! let got: Vec<_> = std::iter::from_fn(|| inbox.poll_deliver()).map(|(_, id, p)| (id, p)).collect();
//! assert_eq!(got, [(0, Bytes::from("21.5")), (1, Bytes::from("21.6")), (2, Bytes::from("21.4"))]);
//! inbox.commit_delivered(now);
//! let later = now + Duration::from_millis(25);
//! while let Some(ack) = inbox.poll_ack(later) {
//!     outbox.on_ack(&ack, later)?;
//! }
//! assert_eq!(outbox.window_len(), 0);
//! # Ok::<(), veil_protocol::error::DeliveryError>(())
//! ```

use core::fmt;
use core::ops::Range;

use bytes::Bytes;

use crate::error::{DecodeError, DeliveryError};
use crate::message::varint_len;
use crate::time::Duration;

mod inbox;
mod outbox;
mod state;

pub use inbox::{DataOutcome, Inbox, InboxStats};
pub use outbox::{Expired, Outbox, OutboxStats};
pub use state::{InboxState, OutboxState};

/// spec §17.4, §17.5: ids per channel a sender may have beyond the receiver's cumulative
/// acknowledgement, and a receiver accepts beyond its `next`.
pub const RECEIVE_WINDOW: u64 = 1024;
/// spec §17.3: at most this many `(skip, count)` pairs in an `Ack`.
pub const MAX_ACK_RANGES: usize = 16;
/// spec §17.3: an `Ack` follows a commit at most this much later.
pub const ACK_DELAY: Duration = Duration::from_millis(25);
/// spec §17.3: this many committed, unacknowledged messages of a channel are acknowledged at once.
pub const ACK_EVERY: u64 = 32;
/// spec §17.3: committed, unacknowledged messages of a channel carrying this many payload
/// bytes are acknowledged at once (a quarter of the default `window_bytes`, so that a sender of
/// large messages, whose byte window fills before [`ACK_EVERY`] messages, does not wait for
/// [`ACK_DELAY`]).
pub const ACK_EVERY_BYTES: usize = 64 * 1024;
/// spec §17.4: first retransmission timeout in datagram and routed modes.
pub const DELIVERY_RTO: Duration = Duration::from_secs(1);
/// spec §17.4: retransmission timeout cap, and the first one in stream mode.
pub const DELIVERY_RTO_MAX: Duration = Duration::from_secs(16);
/// spec §17.9: how long a message in a relay's custody is not retransmitted.
pub const CUSTODY_TIMEOUT: Duration = Duration::from_secs(300);
/// spec §17.9: a sender with messages of a channel in custody and no `Ack` of that channel for
/// this long asks for one (a `Stream` alone); the interval doubles at each request without an
/// answer, up to [`CUSTODY_TIMEOUT`].
pub const CUSTODY_PROBE: Duration = Duration::from_secs(16);
/// spec §17.4 rule 6: a sender whose route came back with messages in its window, and that
/// then authenticates nothing in the end-to-end session for this long, ends the session (the
/// peer may have restarted during the outage).
pub const ROUTE_BACK_TIMEOUT: Duration = Duration::from_secs(3);
/// spec §17.9: a relay sends at most one `Stored` per link each `STORED_DELAY` while more are
/// waiting ([`crate::relay::custody::StoredCoalescer`]).
pub const STORED_DELAY: Duration = Duration::from_millis(10);
/// spec §17.2: a channel's next id never reaches this (2^64 − 1024), so that
/// `next + RECEIVE_WINDOW` never overflows.
pub const ID_LIMIT: u64 = u64::MAX - (RECEIVE_WINDOW - 1);
/// spec §17.4: default `window_messages`.
pub const WINDOW_MESSAGES: usize = 256;
/// spec §17.4: default `window_bytes`.
pub const WINDOW_BYTES: usize = 256 * 1024;
/// spec §17.5: default `max_channels`.
pub const MAX_CHANNELS: usize = 64;
/// spec §17.5: default `reorder_bytes`.
pub const REORDER_BYTES: usize = 256 * 1024;
/// spec §17.2: bytes of a stream id.
pub const STREAM_ID_LEN: usize = 8;

/// A sender's delivery stream id (spec §17.2).
pub type StreamId = [u8; STREAM_ID_LEN];

/// Bounds and timers of the delivery layer (spec §17.10). Defaults are the spec's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeliveryConfig {
    /// Messages in a sender's window, all channels together (1 ..= [`RECEIVE_WINDOW`]).
    pub window_messages: usize,
    /// Payload bytes in a sender's window (at least 1).
    pub window_bytes: usize,
    /// Channels a receiver holds per peer (1 ..= 65 536).
    pub max_channels: usize,
    /// Payload bytes a receiver holds per peer, buffered above a gap or waiting for
    /// [`Inbox::poll_deliver`] (spec §17.5).
    pub reorder_bytes: usize,
    /// First retransmission timeout in datagram and routed modes (spec §17.4).
    pub rto: Duration,
    /// Retransmission timeout cap, and the first one in stream mode (at least `rto`).
    pub rto_max: Duration,
    /// Longest wait between a commit and its acknowledgement (spec §17.3).
    pub ack_delay: Duration,
    /// Committed, unacknowledged messages of a channel that are acknowledged at once (at least 1).
    pub ack_every: u64,
    /// Payload bytes of committed, unacknowledged messages of a channel that are acknowledged
    /// at once (at least 1).
    pub ack_every_bytes: usize,
    /// The first wait before a sender asks for the acknowledgement of messages in a relay's
    /// custody (spec §17.9; positive).
    pub custody_probe: Duration,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            window_messages: WINDOW_MESSAGES,
            window_bytes: WINDOW_BYTES,
            max_channels: MAX_CHANNELS,
            reorder_bytes: REORDER_BYTES,
            rto: DELIVERY_RTO,
            rto_max: DELIVERY_RTO_MAX,
            ack_delay: ACK_DELAY,
            ack_every: ACK_EVERY,
            ack_every_bytes: ACK_EVERY_BYTES,
            custody_probe: CUSTODY_PROBE,
        }
    }
}

impl DeliveryConfig {
    /// Checks the bounds of spec §17.10.
    ///
    /// # Errors
    /// [`DeliveryError::Config`] naming the first field out of bounds.
    pub fn validate(&self) -> Result<(), DeliveryError> {
        if self.window_messages == 0 || self.window_messages as u64 > RECEIVE_WINDOW {
            return Err(DeliveryError::Config("window_messages must be 1..=1024 (spec §17.4)"));
        }
        if self.window_bytes == 0 {
            return Err(DeliveryError::Config("window_bytes must be at least 1"));
        }
        if self.max_channels == 0 || self.max_channels > usize::from(u16::MAX) + 1 {
            return Err(DeliveryError::Config("max_channels must be 1..=65536"));
        }
        if self.rto == Duration::ZERO {
            return Err(DeliveryError::Config("rto must be positive"));
        }
        if self.custody_probe == Duration::ZERO {
            return Err(DeliveryError::Config("custody_probe must be positive"));
        }
        if self.rto_max < self.rto {
            return Err(DeliveryError::Config("rto_max must be at least rto"));
        }
        if self.ack_every == 0 {
            return Err(DeliveryError::Config("ack_every must be at least 1"));
        }
        if self.ack_every_bytes == 0 {
            return Err(DeliveryError::Config("ack_every_bytes must be at least 1"));
        }
        Ok(())
    }
}

/// The selective part of an [`Ack`] (spec §17.3): up to [`MAX_ACK_RANGES`] `(skip, count)`
/// pairs, each at least 1, naming ids below `next + RECEIVE_WINDOW`. Kept as offsets, which
/// that bound makes fit 16 bits, in a fixed array: decoding allocates nothing.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct AckRanges {
    len: u8,
    /// Unused pairs stay zero, so that the derived equality compares the ranges only.
    pairs: [(u16, u16); MAX_ACK_RANGES],
}

impl AckRanges {
    /// No ranges.
    pub const EMPTY: Self = Self { len: 0, pairs: [(0, 0); MAX_ACK_RANGES] };

    /// Number of pairs.
    #[must_use]
    pub const fn len(&self) -> usize {
        self.len as usize
    }

    /// Whether there are no pairs.
    #[must_use]
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The `(skip, count)` pairs, in wire order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.pairs[..self.len()].iter().map(|&(s, c)| (u64::from(s), u64::from(c)))
    }

    /// Offset past the last id named, from the `Ack`'s `next` (0 without ranges).
    #[must_use]
    pub fn span(&self) -> u64 {
        self.iter().map(|(s, c)| s + c).sum()
    }
}

impl fmt::Debug for AckRanges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// A delivery acknowledgement of one channel (spec §17.3), valid by construction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ack {
    channel: u16,
    next: u64,
    ranges: AckRanges,
}

impl Ack {
    /// A cumulative acknowledgement: every id of `channel` below `next` was delivered and
    /// committed.
    #[must_use]
    pub const fn cumulative(channel: u16, next: u64) -> Self {
        Self { channel, next, ranges: AckRanges::EMPTY }
    }

    /// An acknowledgement with selective `(skip, count)` ranges (spec §17.3).
    ///
    /// # Errors
    /// [`DecodeError::MalformedMessage`] for ranges spec §17.3 forbids: more than 16 pairs, a
    /// zero `skip` or `count`, an id at or beyond `next + RECEIVE_WINDOW`, or beyond 2^64 − 1.
    pub fn new(channel: u16, next: u64, ranges: &[(u64, u64)]) -> Result<Self, DecodeError> {
        if ranges.len() > MAX_ACK_RANGES {
            return Err(DecodeError::MalformedMessage);
        }
        let mut out = AckRanges::EMPTY;
        let mut span = 0u64;
        for (i, &(skip, count)) in ranges.iter().enumerate() {
            if skip == 0 || count == 0 {
                return Err(DecodeError::MalformedMessage);
            }
            span = skip
                .checked_add(count)
                .and_then(|d| span.checked_add(d))
                .filter(|&s| s <= RECEIVE_WINDOW)
                .ok_or(DecodeError::MalformedMessage)?;
            // Both are below RECEIVE_WINDOW here.
            out.pairs[i] = (skip as u16, count as u16);
        }
        // The last id named, next + span − 1, must exist.
        if span > 0 && next.checked_add(span - 1).is_none() {
            return Err(DecodeError::MalformedMessage);
        }
        out.len = ranges.len() as u8;
        Ok(Self { channel, next, ranges: out })
    }

    /// The channel.
    #[must_use]
    pub const fn channel(&self) -> u16 {
        self.channel
    }

    /// Every id of the channel below this was delivered and committed.
    #[must_use]
    pub const fn next(&self) -> u64 {
        self.next
    }

    /// The selective ranges.
    #[must_use]
    pub const fn ranges(&self) -> &AckRanges {
        &self.ranges
    }

    /// The ids the ranges name as received and buffered, as absolute id ranges.
    pub fn received(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        // Valid by construction: no sum below overflows (the last id named exists).
        let mut p = self.next;
        self.ranges.iter().map(move |(skip, count)| {
            let start = p + skip;
            p = start + count;
            start..p
        })
    }

    /// Encoded body length (without the kind byte).
    pub(crate) fn body_len(&self) -> usize {
        varint_len(u64::from(self.channel))
            + varint_len(self.next)
            + varint_len(self.ranges.len() as u64)
            + self.ranges.iter().map(|(s, c)| varint_len(s) + varint_len(c)).sum::<usize>()
    }

    /// Writes the body (spec §17.3: channel, next, then a postcard sequence of pairs).
    pub(crate) fn encode_body(&self, out: &mut [u8]) -> Result<usize, DecodeError> {
        let mut at = put_varint(out, 0, u64::from(self.channel))?;
        at = put_varint(out, at, self.next)?;
        at = put_varint(out, at, self.ranges.len() as u64)?;
        for (s, c) in self.ranges.iter() {
            at = put_varint(out, at, s)?;
            at = put_varint(out, at, c)?;
        }
        Ok(at)
    }

    /// Reads a body, validating it (spec §17.3), without allocating.
    pub(crate) fn decode_body(body: &[u8]) -> Result<(Self, &[u8]), DecodeError> {
        let bad = |_| DecodeError::MalformedMessage;
        let (channel, rest): (u16, _) = postcard::take_from_bytes(body).map_err(bad)?;
        let (next, rest): (u64, _) = postcard::take_from_bytes(rest).map_err(bad)?;
        // The sequence length, read as a u64 whatever the platform's usize.
        let (count, mut rest): (u64, _) = postcard::take_from_bytes(rest).map_err(bad)?;
        if count > MAX_ACK_RANGES as u64 {
            return Err(DecodeError::MalformedMessage);
        }
        let mut pairs = [(0u64, 0u64); MAX_ACK_RANGES];
        for pair in pairs.iter_mut().take(count as usize) {
            let (p, r): ((u64, u64), _) = postcard::take_from_bytes(rest).map_err(bad)?;
            *pair = p;
            rest = r;
        }
        Ok((Self::new(channel, next, &pairs[..count as usize])?, rest))
    }
}

/// Writes `v` as a postcard varint at `out[at..]`, returning the new end.
fn put_varint(out: &mut [u8], mut at: usize, mut v: u64) -> Result<usize, DecodeError> {
    loop {
        let slot = out.get_mut(at).ok_or(DecodeError::Truncated)?;
        at += 1;
        if v < 0x80 {
            *slot = v as u8;
            return Ok(at);
        }
        *slot = (v as u8) | 0x80;
        v >>= 7;
    }
}

/// A delivery-layer message (spec §17) other than Data, as a connection reports it
/// ([`Event::Delivery`](crate::Event::Delivery)) and sends it
/// ([`Connection::send_delivery`](crate::Connection::send_delivery)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeliveryMessage {
    /// For the peer's [`Outbox::on_ack`].
    Ack(Ack),
    /// For the peer's [`Inbox::on_stream`].
    Stream {
        /// The sender's stream id.
        stream: StreamId,
    },
    /// For the peer's [`Inbox::on_skip`].
    Skip {
        /// The channel.
        channel: u16,
        /// The lowest id the sender may still send.
        next: u64,
    },
}

impl DeliveryMessage {
    /// The wire message.
    #[must_use]
    pub const fn message(&self) -> crate::message::Message<'static> {
        use crate::message::Message;
        match *self {
            Self::Ack(ack) => Message::Ack(ack),
            Self::Stream { stream } => Message::Stream { stream },
            Self::Skip { channel, next } => Message::Skip { channel, next },
        }
    }

    /// The delivery message `m` is, if any.
    #[must_use]
    pub const fn from_message(m: &crate::message::Message<'_>) -> Option<Self> {
        use crate::message::Message;
        match *m {
            Message::Ack(ack) => Some(Self::Ack(ack)),
            Message::Stream { stream } => Some(Self::Stream { stream }),
            Message::Skip { channel, next } => Some(Self::Skip { channel, next }),
            _ => None,
        }
    }
}

/// What an [`Outbox`] wants sent next (spec §17.2, §17.4, §17.6).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeliveryOutput {
    /// A `Stream` or `Skip`: [`Connection::send_delivery`](crate::Connection::send_delivery).
    Message(DeliveryMessage),
    /// A Data message, new or retransmitted:
    /// [`Connection::send_data`](crate::Connection::send_data).
    Data {
        /// Channel.
        channel: u16,
        /// Its id in the stream.
        id: u64,
        /// Payload (shared with the outbox's copy).
        payload: Bytes,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Message;

    fn round_trip(ack: Ack) -> Ack {
        let m = Message::Ack(ack);
        let mut buf = [0u8; 512];
        let n = m.encode(&mut buf).unwrap();
        assert_eq!(n, m.encoded_len());
        let (back, rest) = Message::decode(&buf[..n]).unwrap();
        assert!(rest.is_empty());
        let Message::Ack(back) = back else { panic!("{back:?}") };
        back
    }

    #[test]
    fn ack_ranges_name_absolute_ids_and_round_trip() {
        let ack = Ack::new(3, 100, &[(2, 3), (1, 1)]).unwrap();
        assert_eq!(ack.received().collect::<alloc::vec::Vec<_>>(), [102..105, 106..107]);
        assert_eq!(ack.ranges().span(), 7);
        assert_eq!(round_trip(ack), ack);
        let max: alloc::vec::Vec<(u64, u64)> = (0..16).map(|_| (1, 63)).collect();
        let ack = Ack::new(u16::MAX, u64::MAX - 2000, &max).unwrap();
        assert_eq!(ack.ranges().span(), 1024);
        assert_eq!(round_trip(ack), ack);
        assert_eq!(round_trip(Ack::cumulative(0, 0)), Ack::cumulative(0, 0));
    }

    #[test]
    fn malformed_ack_ranges_are_refused() {
        let bad = DecodeError::MalformedMessage;
        assert_eq!(Ack::new(0, 0, &[(0, 1)]), Err(bad), "zero skip");
        assert_eq!(Ack::new(0, 0, &[(1, 0)]), Err(bad), "zero count");
        assert_eq!(Ack::new(0, 0, &[(1, 1); 17]), Err(bad), "17 pairs");
        assert_eq!(Ack::new(0, 0, &[(1, 1024)]), Err(bad), "the last id at next + 1024");
        assert!(Ack::new(0, 0, &[(1, 1023)]).is_ok(), "the last id at next + 1023");
        assert_eq!(Ack::new(0, 0, &[(u64::MAX, 2)]), Err(bad), "overflow");
        assert_eq!(Ack::new(0, u64::MAX, &[(1, 1)]), Err(bad), "an id beyond 2^64 - 1");
        assert!(Ack::new(0, u64::MAX - 2, &[(1, 1)]).is_ok());
        // On the wire: the count is checked before the pairs are read.
        assert_eq!(Message::decode(&[0x02, 0, 0, 17]), Err(bad));
        assert_eq!(Message::decode(&[0x02, 0, 0, 1, 1]), Err(bad), "pair cut short");
        assert_eq!(Message::decode(&[0x02, 0, 0]), Err(bad), "no count");
    }

    #[test]
    fn config_bounds_are_checked() {
        assert_eq!(DeliveryConfig::default().validate(), Ok(()));
        for bad in [
            DeliveryConfig { window_messages: 0, ..DeliveryConfig::default() },
            DeliveryConfig { window_messages: 1025, ..DeliveryConfig::default() },
            DeliveryConfig { window_bytes: 0, ..DeliveryConfig::default() },
            DeliveryConfig { max_channels: 0, ..DeliveryConfig::default() },
            DeliveryConfig { max_channels: 65_537, ..DeliveryConfig::default() },
            DeliveryConfig { rto: Duration::ZERO, ..DeliveryConfig::default() },
            DeliveryConfig { rto_max: Duration::from_millis(999), ..DeliveryConfig::default() },
            DeliveryConfig { ack_every: 0, ..DeliveryConfig::default() },
        ] {
            assert!(matches!(bad.validate(), Err(DeliveryError::Config(_))), "{bad:?}");
        }
    }
}
