//! Saved delivery state (spec §17.8): an outbox or inbox exported, postcard-encoded, and
//! imported again after a restart, validated against the configuration it is imported into.

use alloc::collections::{BTreeMap, VecDeque};
use alloc::vec::Vec;
use core::fmt;
use core::marker::PhantomData;

use bytes::Bytes;
use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::inbox::InChannel;
use super::outbox::{OutChannel, OutMessage};
use super::{DeliveryConfig, Inbox, Outbox, StreamId, ID_LIMIT, RECEIVE_WINDOW};
use crate::error::DeliveryError;
use crate::time::{Duration, Timestamp};

/// Version byte in front of every saved state.
const STATE_VERSION: u8 = 1;
/// Channels a saved state may name (every u16).
const MAX_SAVED_CHANNELS: usize = 1 << 16;

/// A saved [`Outbox`] (spec §17.8): the stream id, and per channel the next id, the highest
/// acknowledgement and the window with its payloads. Times to live are kept as the time left
/// at export; the time the state spends saved does not count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxState {
    stream: StreamId,
    channels: Vec<SavedChannel>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct SavedChannel {
    channel: u16,
    next_id: u64,
    acked: u64,
    /// The id of `messages[0]`.
    base: u64,
    messages: Vec<SavedMessage>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct SavedMessage {
    payload: Bytes,
    ttl: Option<Duration>,
    transmitted: bool,
}

/// A saved [`Inbox`] (spec §17.7, §17.8): the stream followed and, per channel, the committed
/// next id. Buffered and uncommitted messages are not saved: the sender still holds them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxState {
    stream: Option<StreamId>,
    channels: Vec<(u16, u64)>,
}

// ---------------------------------------------------------------------------------------
// Encoding. Sequences are read element by element with a bound, never preallocated from a
// length the input claims.

/// A sequence of at most `MAX` elements.
struct Bounded<T, const MAX: usize>(Vec<T>);

impl<T: Serialize, const MAX: usize> Serialize for Bounded<T, MAX> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter())
    }
}

impl<'de, T: Deserialize<'de>, const MAX: usize> Deserialize<'de> for Bounded<T, MAX> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T, const MAX: usize>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>, const MAX: usize> Visitor<'de> for V<T, MAX> {
            type Value = Bounded<T, MAX>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a sequence of at most {MAX} elements")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                if let Some(n) = seq.size_hint().filter(|&n| n > MAX) {
                    return Err(de::Error::invalid_length(n, &self));
                }
                let mut v = Vec::new();
                while let Some(x) = seq.next_element()? {
                    if v.len() == MAX {
                        return Err(de::Error::invalid_length(MAX + 1, &self));
                    }
                    v.push(x);
                }
                Ok(Bounded(v))
            }
        }
        d.deserialize_seq(V(PhantomData))
    }
}

#[derive(Serialize, Deserialize)]
struct OutboxWire<'a> {
    version: u8,
    stream: StreamId,
    #[serde(borrow)]
    channels: Bounded<ChannelWire<'a>, MAX_SAVED_CHANNELS>,
}

#[derive(Serialize, Deserialize)]
struct ChannelWire<'a> {
    channel: u16,
    next_id: u64,
    acked: u64,
    base: u64,
    #[serde(borrow)]
    messages: Bounded<MessageWire<'a>, { RECEIVE_WINDOW as usize }>,
}

#[derive(Serialize, Deserialize)]
struct MessageWire<'a> {
    #[serde(borrow)]
    payload: &'a [u8],
    ttl_us: Option<u64>,
    transmitted: bool,
}

#[derive(Serialize, Deserialize)]
struct InboxWire {
    version: u8,
    stream: Option<StreamId>,
    channels: Bounded<(u16, u64), MAX_SAVED_CHANNELS>,
}

/// Decodes `bytes` as a whole.
fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, DeliveryError> {
    let (v, rest) = postcard::take_from_bytes(bytes).map_err(|_| DeliveryError::State("does not decode"))?;
    if !rest.is_empty() {
        return Err(DeliveryError::State("trailing bytes"));
    }
    Ok(v)
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing into a Vec fails only when allocation does, which aborts first.
    postcard::to_allocvec(v).unwrap_or_default()
}

/// Channels in strictly ascending order (so none twice).
fn ascending(mut channels: impl Iterator<Item = u16>) -> bool {
    let Some(mut prev) = channels.next() else { return true };
    channels.all(|c| {
        let ok = c > prev;
        prev = c;
        ok
    })
}

impl OutboxState {
    /// The stream id.
    #[must_use]
    pub const fn stream(&self) -> StreamId {
        self.stream
    }

    /// Messages in the saved window.
    #[must_use]
    pub fn window_len(&self) -> usize {
        self.channels.iter().map(|c| c.messages.len()).sum()
    }

    /// The postcard encoding, for storage.
    #[must_use]
    pub fn to_bytes(&self) -> Vec<u8> {
        let channels = self
            .channels
            .iter()
            .map(|c| ChannelWire {
                channel: c.channel,
                next_id: c.next_id,
                acked: c.acked,
                base: c.base,
                messages: Bounded(
                    c.messages
                        .iter()
                        .map(|m| MessageWire {
                            payload: &m.payload,
                            ttl_us: m.ttl.map(Duration::as_micros),
                            transmitted: m.transmitted,
                        })
                        .collect(),
                ),
            })
            .collect();
        encode(&OutboxWire { version: STATE_VERSION, stream: self.stream, channels: Bounded(channels) })
    }

    /// Decodes and checks a saved outbox; allocation is bounded by the input's length.
    ///
    /// # Errors
    /// [`DeliveryError::State`]: it does not decode, or breaks an invariant of the outbox
    /// (channels twice, ids that do not follow each other, an id at the spec's limit).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DeliveryError> {
        let w: OutboxWire<'_> = decode(bytes)?;
        if w.version != STATE_VERSION {
            return Err(DeliveryError::State("unknown version"));
        }
        let state = Self {
            stream: w.stream,
            channels: w
                .channels
                .0
                .into_iter()
                .map(|c| SavedChannel {
                    channel: c.channel,
                    next_id: c.next_id,
                    acked: c.acked,
                    base: c.base,
                    messages: c
                        .messages
                        .0
                        .into_iter()
                        .map(|m| SavedMessage {
                            payload: Bytes::copy_from_slice(m.payload),
                            ttl: m.ttl_us.map(Duration::from_micros),
                            transmitted: m.transmitted,
                        })
                        .collect(),
                })
                .collect(),
        };
        state.check()?;
        Ok(state)
    }

    fn check(&self) -> Result<(), DeliveryError> {
        if !ascending(self.channels.iter().map(|c| c.channel)) {
            return Err(DeliveryError::State("channels out of order or repeated"));
        }
        for c in &self.channels {
            // spec §17.2: the next id stays below 2^64 − 1024; the window is ids base..next_id,
            // all above the acknowledged ones.
            if c.next_id >= ID_LIMIT {
                return Err(DeliveryError::State("next id at the limit"));
            }
            if c.acked > c.base || c.base.checked_add(c.messages.len() as u64) != Some(c.next_id) {
                return Err(DeliveryError::State("window ids inconsistent"));
            }
        }
        Ok(())
    }
}

impl InboxState {
    /// A saved inbox built by the application (spec §17.7): an application that rebuilds
    /// from its own sink what it committed, rather than saving [`Inbox::export`], names the
    /// stream it followed and the committed next id of each channel.
    ///
    /// # Errors
    /// [`DeliveryError::State`]: a channel named twice.
    pub fn new(stream: StreamId, mut channels: Vec<(u16, u64)>) -> Result<Self, DeliveryError> {
        channels.sort_unstable_by_key(|c| c.0);
        let state = Self { stream: Some(stream), channels };
        state.check()?;
        Ok(state)
    }

    /// The stream followed.
    #[must_use]
    pub const fn stream(&self) -> Option<StreamId> {
        self.stream
    }

    /// `(channel, committed next)` per channel.
    #[must_use]
    pub fn channels(&self) -> &[(u16, u64)] {
        &self.channels
    }

    /// The postcard encoding, for storage.
    #[must_use]
    pub fn to_bytes(&self) -> Vec<u8> {
        encode(&InboxWire { version: STATE_VERSION, stream: self.stream, channels: Bounded(self.channels.clone()) })
    }

    /// Decodes and checks a saved inbox.
    ///
    /// # Errors
    /// [`DeliveryError::State`]: it does not decode, names a channel twice, or has channels
    /// without a stream.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DeliveryError> {
        let w: InboxWire = decode(bytes)?;
        if w.version != STATE_VERSION {
            return Err(DeliveryError::State("unknown version"));
        }
        let state = Self { stream: w.stream, channels: w.channels.0 };
        state.check()?;
        Ok(state)
    }

    fn check(&self) -> Result<(), DeliveryError> {
        if self.stream.is_none() && !self.channels.is_empty() {
            return Err(DeliveryError::State("channels without a stream"));
        }
        if !ascending(self.channels.iter().map(|c| c.0)) {
            return Err(DeliveryError::State("channels out of order or repeated"));
        }
        Ok(())
    }
}

impl Outbox {
    /// Saves the outbox (spec §17.8). Times to live are saved as the time left at `now`.
    #[must_use]
    pub fn export(&self, now: Timestamp) -> OutboxState {
        OutboxState {
            stream: self.stream(),
            channels: self
                .channels()
                .iter()
                .map(|(&channel, c)| SavedChannel {
                    channel,
                    next_id: c.next_id,
                    acked: c.acked,
                    base: c.base,
                    messages: c
                        .window
                        .iter()
                        .map(|m| SavedMessage {
                            payload: m.payload.clone(),
                            ttl: m.deadline.map(|d| d.saturating_since(now)),
                            transmitted: m.transmitted,
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    /// Resumes a saved outbox under `config` (spec §17.8): same stream id, and the whole
    /// window is retransmitted on the first connection. Times to live restart at `now`.
    ///
    /// # Errors
    /// [`DeliveryError::Config`]; [`DeliveryError::State`] if the state breaks an invariant or
    /// its window exceeds `config`'s.
    pub fn from_state(config: DeliveryConfig, state: &OutboxState, now: Timestamp) -> Result<Self, DeliveryError> {
        config.validate()?;
        state.check()?;
        let messages = state.window_len();
        let bytes: usize = state.channels.iter().flat_map(|c| &c.messages).map(|m| m.payload.len()).sum();
        if messages > config.window_messages || bytes > config.window_bytes {
            return Err(DeliveryError::State("window larger than the configuration's"));
        }
        let channels: BTreeMap<u16, OutChannel> = state
            .channels
            .iter()
            .map(|c| {
                let window: VecDeque<OutMessage> = c
                    .messages
                    .iter()
                    .map(|m| OutMessage::new(m.payload.clone(), m.ttl.map(|t| now + t), m.transmitted))
                    .collect();
                (c.channel, OutChannel::new(c.next_id, c.acked, c.base, window))
            })
            .collect();
        Ok(Self::from_parts(config, state.stream, channels))
    }
}

impl Inbox {
    /// Saves the inbox (spec §17.7): the stream and the committed next of every channel.
    /// Save it atomically with whatever the application committed.
    #[must_use]
    pub fn export(&self) -> InboxState {
        InboxState {
            stream: self.stream(),
            channels: self.channels().iter().map(|(&c, ch)| (c, ch.committed)).collect(),
        }
    }

    /// An inbox from saved state (spec §17.7): each channel resumes at its committed next, so
    /// nothing committed is delivered again.
    ///
    /// # Errors
    /// [`DeliveryError::Config`]; [`DeliveryError::State`] if the state breaks an invariant or
    /// holds more than `max_channels` channels.
    pub fn from_state(config: DeliveryConfig, state: &InboxState) -> Result<Self, DeliveryError> {
        config.validate()?;
        state.check()?;
        if state.channels.len() > config.max_channels {
            return Err(DeliveryError::State("more channels than max_channels"));
        }
        let channels = state.channels.iter().map(|&(c, next)| (c, InChannel::new(next))).collect();
        Ok(Self::from_parts(config, state.stream, channels))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::{Ack, DataOutcome, DeliveryOutput};
    use crate::params::Mode;

    const T0: Timestamp = Timestamp::from_millis(5_000);

    #[test]
    fn outbox_round_trips_and_resumes_its_stream() {
        let mut o = Outbox::new(DeliveryConfig::default(), [9; 8]).unwrap();
        for i in 0..5u8 {
            o.push(u16::from(i % 2), Bytes::from(alloc::vec![i; 3]), T0, (i == 4).then_some(Duration::from_secs(60)))
                .unwrap();
        }
        o.on_connected(Mode::Stream, T0);
        while o.poll_transmit(T0, usize::MAX).is_some() {}
        o.push(7, Bytes::from_static(b"unsent"), T0, None).unwrap();
        o.on_ack(&Ack::cumulative(0, 2), T0).unwrap();
        let later = T0 + Duration::from_secs(20);
        let state = o.export(later);
        let bytes = state.to_bytes();
        let back = OutboxState::from_bytes(&bytes).unwrap();
        assert_eq!(back, state);
        assert_eq!(back.window_len(), 4);
        let restart = Timestamp::from_millis(1);
        let mut r = Outbox::from_state(DeliveryConfig::default(), &back, restart).unwrap();
        assert_eq!((r.stream(), r.next_id(0), r.acked(0), r.window_len()), ([9; 8], 3, 2, 4));
        // The time to live left at export (40 s) restarts at `restart`.
        assert_eq!(r.poll_timeout(), Some(restart + Duration::from_secs(40)));
        // The first connection sends the same stream, a Skip and the whole window.
        r.on_connected(Mode::Stream, restart);
        let out: Vec<_> = core::iter::from_fn(|| r.poll_transmit(restart, usize::MAX)).collect();
        assert_eq!(out.len(), 6, "{out:?}");
        assert_eq!(out[1], DeliveryOutput::Message(crate::delivery::DeliveryMessage::Skip { channel: 0, next: 2 }));
        let expired = r.expire(restart + Duration::from_secs(40));
        assert_eq!(expired.len(), 1);
        assert_eq!((expired[0].channel, expired[0].id, expired[0].unconfirmed), (0, 2, true));
        // A smaller configuration refuses the window.
        let small = DeliveryConfig { window_messages: 3, ..DeliveryConfig::default() };
        assert!(matches!(Outbox::from_state(small, &back, restart), Err(DeliveryError::State(_))));
    }

    #[test]
    fn inbox_resumes_at_its_committed_next() {
        let mut i = Inbox::new(DeliveryConfig::default()).unwrap();
        assert_eq!(InboxState::from_bytes(&i.export().to_bytes()).unwrap(), i.export());
        i.on_stream([3; 8], T0);
        for id in 0..4 {
            assert_eq!(i.on_data(1, id, Bytes::from_static(b"x"), Mode::Datagram, T0), Ok(DataOutcome::Delivered));
        }
        i.on_data(2, 0, Bytes::from_static(b"y"), Mode::Datagram, T0).unwrap();
        while i.poll_deliver().is_some() {}
        i.commit(1, 1, T0);
        let state = InboxState::from_bytes(&i.export().to_bytes()).unwrap();
        assert_eq!((state.stream(), state.channels()), (Some([3; 8]), &[(1, 2), (2, 0)][..]));
        let mut r = Inbox::from_state(DeliveryConfig::default(), &state).unwrap();
        assert!(!r.on_stream([3; 8], T0), "the same stream is followed");
        // Uncommitted 2 and 3 come again; committed 0 and 1 are duplicates.
        let d = |r: &mut Inbox, id| r.on_data(1, id, Bytes::from_static(b"x"), Mode::Datagram, T0);
        assert_eq!(d(&mut r, 1), Ok(DataOutcome::Duplicate));
        assert_eq!(d(&mut r, 2), Ok(DataOutcome::Delivered));
        let small = DeliveryConfig { max_channels: 1, ..DeliveryConfig::default() };
        assert!(matches!(Inbox::from_state(small, &state), Err(DeliveryError::State(_))));
    }

    #[test]
    fn broken_saved_state_is_refused() {
        let ok = |b: &[u8]| OutboxState::from_bytes(b).is_ok();
        let mut o = Outbox::new(DeliveryConfig::default(), [1; 8]).unwrap();
        o.push(4, Bytes::from_static(b"p"), T0, None).unwrap();
        let good = o.export(T0).to_bytes();
        assert!(ok(&good));
        // version 1, stream, 1 channel: 4, next_id 1, acked 0, base 0, one message.
        assert_eq!(good[..13], [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 4, 1, 0]);
        let with = |at: usize, v: u8| {
            let mut b = good.clone();
            b[at] = v;
            b
        };
        assert!(!ok(&with(0, 2)), "version");
        assert!(!ok(&with(11, 2)), "next id does not follow the window");
        assert!(!ok(&with(12, 1)), "acked above base");
        assert!(!ok(&[good.as_slice(), &[0]].concat()), "trailing byte");
        assert!(!ok(&good[..good.len() - 1]), "truncated");
        // A claimed sequence length is not preallocated: 2^32 channels in a few bytes.
        assert!(!ok(&[1, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x0f]));
        // Two channels out of order.
        let mut o = Outbox::new(DeliveryConfig::default(), [1; 8]).unwrap();
        o.push(1, Bytes::new(), T0, None).unwrap();
        o.push(2, Bytes::new(), T0, None).unwrap();
        let mut two = o.export(T0);
        two.channels.swap(0, 1);
        assert!(!ok(&two.to_bytes()));
        // Ids at the limit.
        let mut limit = o.export(T0);
        limit.channels[0].next_id = ID_LIMIT;
        limit.channels[0].base = ID_LIMIT - 1;
        limit.channels[0].acked = ID_LIMIT - 1;
        assert!(!ok(&limit.to_bytes()));
        // Inbox: channels without a stream, repeated channels.
        let bad = InboxState { stream: None, channels: alloc::vec![(1, 0)] };
        assert!(InboxState::from_bytes(&bad.to_bytes()).is_err());
        let bad = InboxState { stream: Some([0; 8]), channels: alloc::vec![(1, 0), (1, 5)] };
        assert!(InboxState::from_bytes(&bad.to_bytes()).is_err());
        assert!(InboxState::from_bytes(&[]).is_err());
    }

    #[test]
    fn an_inbox_state_rebuilt_by_the_application_resumes_where_it_says() {
        let state = InboxState::new([4; 8], alloc::vec![(9, 3), (2, 7)]).unwrap();
        assert_eq!(state.channels(), [(2, 7), (9, 3)], "sorted by channel");
        assert_eq!(state.stream(), Some([4; 8]));
        assert!(InboxState::new([4; 8], alloc::vec![(1, 0), (1, 5)]).is_err(), "a channel twice");
        let mut i = Inbox::from_state(DeliveryConfig::default(), &state).unwrap();
        i.on_connected();
        assert!(!i.on_stream([4; 8], T0), "the same stream goes on");
        assert_eq!(i.on_data(2, 6, Bytes::from_static(b"old"), Mode::Routed, T0), Ok(DataOutcome::Duplicate));
        assert_eq!(i.on_data(2, 7, Bytes::from_static(b"new"), Mode::Routed, T0), Ok(DataOutcome::Delivered));
        assert_eq!(i.poll_deliver(), Some((2, 7, Bytes::from_static(b"new"))));
    }
}
