//! Messages inside transport packets (spec §9): each is a kind byte followed by a
//! postcard body; a packet's plaintext is zero or more of them.

use core::fmt;

use serde::{Deserialize, Serialize};

use crate::delivery::{Ack, StreamId, STREAM_ID_LEN};
use crate::error::DecodeError;
use crate::routing::RouteReason;
use crate::trust::NodeId;

/// spec §9.2: application data.
pub const KIND_DATA: u8 = 0x01;
/// spec §9.2, §17.3: delivery acknowledgement.
pub const KIND_ACK: u8 = 0x02;
/// spec §9.2: liveness probe.
pub const KIND_PING: u8 = 0x03;
/// spec §9.2: answer to a ping.
pub const KIND_PONG: u8 = 0x04;
/// spec §9.2: authenticated close.
pub const KIND_CLOSE: u8 = 0x05;
/// spec §9.2, §16.4: a routed packet for a node the receiver announced.
pub const KIND_FORWARD: u8 = 0x06;
/// spec §9.2, §16.4: a routed packet from a node the sender announced.
pub const KIND_DELIVER: u8 = 0x07;
/// spec §9.2, §15.8: a revocation list pushed over the session.
pub const KIND_REVOCATION_PUSH: u8 = 0x08;
/// spec §9.2: reserved for flow reports.
pub const KIND_FLOW_REPORT: u8 = 0x09;
/// spec §9.2, §15.7: the sender's Unix time, a hint for nodes without a real-time clock.
pub const KIND_TIME_SYNC: u8 = 0x0A;
/// spec §9.2: a re-handshake packet carried inside the current session (spec §7.3).
pub const KIND_HANDSHAKE: u8 = 0x0B;
/// spec §9.2, §16.3: the sender binds a route handle to a node id.
pub const KIND_ROUTE: u8 = 0x0C;
/// spec §9.2, §16.3: the sender's route handle is gone.
pub const KIND_WITHDRAW: u8 = 0x0D;
/// spec §9.2, §16.5: a `Forward` naming the sender's route handle was dropped.
pub const KIND_UNREACHABLE: u8 = 0x0E;
/// spec §9.2, §17.2: the sender's delivery stream.
pub const KIND_STREAM: u8 = 0x0F;
/// spec §9.2, §17.6: the sender will never send again the ids of a channel below a bound.
pub const KIND_SKIP: u8 = 0x10;
/// spec §9.2, §17.9: the gateway's custody acknowledgement.
pub const KIND_STORED: u8 = 0x11;
/// spec §17.9: `Stored.first` is a 24-bit counter: it stays below this.
pub const STORED_COUNTER_SPAN: u32 = 1 << 24;

/// Why a connection closed (spec §9.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CloseReason {
    /// Orderly close by the application.
    Normal,
    /// The peer broke a protocol rule.
    ProtocolViolation,
    /// Nothing authenticated arrived for `IDLE_TIMEOUT`.
    IdleTimeout,
    /// The peer is not (or no longer) authorized.
    Unauthorized,
    /// The peer's credentials were revoked (trust layer).
    Revoked,
    /// The node is shutting down.
    ShuttingDown,
    /// The session passed `REJECT_AFTER_TIME` without a successful re-handshake.
    SessionExpired,
    /// A message counter reached its limit.
    TooManyMessages,
    /// An internal failure.
    InternalError,
    /// The peer's certificate chain no longer passes verification (spec §15.9).
    BadCertificate,
    /// A code this version does not define.
    Unknown(u16),
}

impl CloseReason {
    /// The wire code.
    #[must_use]
    pub const fn code(self) -> u16 {
        match self {
            Self::Normal => 0,
            Self::ProtocolViolation => 1,
            Self::IdleTimeout => 2,
            Self::Unauthorized => 3,
            Self::Revoked => 4,
            Self::ShuttingDown => 5,
            Self::SessionExpired => 6,
            Self::TooManyMessages => 7,
            Self::InternalError => 8,
            Self::BadCertificate => 9,
            Self::Unknown(c) => c,
        }
    }

    /// Parses a wire code; unknown codes are kept as [`CloseReason::Unknown`].
    #[must_use]
    pub const fn from_code(code: u16) -> Self {
        match code {
            0 => Self::Normal,
            1 => Self::ProtocolViolation,
            2 => Self::IdleTimeout,
            3 => Self::Unauthorized,
            4 => Self::Revoked,
            5 => Self::ShuttingDown,
            6 => Self::SessionExpired,
            7 => Self::TooManyMessages,
            8 => Self::InternalError,
            9 => Self::BadCertificate,
            c => Self::Unknown(c),
        }
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unknown(c) => write!(f, "unknown reason {c}"),
            other => write!(f, "{other:?}"),
        }
    }
}

/// One message (spec §9.2), borrowing its payload from the decrypted packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Message<'a> {
    /// Application data on a channel, with a sender-assigned id.
    Data {
        /// Application channel.
        channel: u16,
        /// Sender-assigned id, increasing per channel.
        id: u64,
        /// The application bytes.
        payload: &'a [u8],
    },
    /// Asks the peer for a [`Message::Pong`] with the same id.
    Ping {
        /// Echoed id.
        id: u32,
    },
    /// Answers a ping.
    Pong {
        /// The ping's id.
        id: u32,
    },
    /// The sender closes the connection.
    Close {
        /// Why.
        reason: CloseReason,
    },
    /// A re-handshake packet (spec §7.3), carried inside the current session.
    Handshake {
        /// The complete handshake packet, header included.
        packet: &'a [u8],
    },
    /// A signed revocation list (spec §15.8), at most
    /// [`MAX_REVOCATION_LIST_LEN`](crate::trust::MAX_REVOCATION_LIST_LEN) bytes. The
    /// connection does not interpret it; the trust layer verifies it.
    RevocationPush {
        /// The encoded revocation list (spec §15.5).
        list: &'a [u8],
    },
    /// The sender's Unix time in seconds (spec §15.7).
    TimeSync {
        /// Seconds since 1970-01-01T00:00:00Z.
        unix_time: u64,
    },
    /// A routed packet for the node the receiver announced as `route` (spec §16.4).
    Forward {
        /// A handle the receiver announced.
        route: u32,
        /// One routed-mode packet (at least 1 byte).
        packet: &'a [u8],
    },
    /// A routed packet from the node the sender announced as `route` (spec §16.4).
    Deliver {
        /// A handle the sender announced.
        route: u32,
        /// One routed-mode packet (at least 1 byte).
        packet: &'a [u8],
    },
    /// The sender binds `route` to `node` (spec §16.3).
    Route {
        /// The handle.
        route: u32,
        /// The node id (16 raw bytes on the wire).
        node: NodeId,
    },
    /// The sender's `route` is gone (spec §16.3).
    Withdraw {
        /// The handle.
        route: u32,
        /// Why (spec §16.5).
        reason: RouteReason,
    },
    /// A `Forward` naming the sender's `route` was dropped, or will be (spec §16.5).
    Unreachable {
        /// The handle.
        route: u32,
        /// Why.
        reason: RouteReason,
    },
    /// Delivery acknowledgement of one channel (spec §17.3), validated when decoded.
    Ack(Ack),
    /// The Data the sender sends from now on belongs to delivery stream `stream` (spec §17.2).
    Stream {
        /// The sender's stream id (8 raw bytes on the wire).
        stream: StreamId,
    },
    /// The sender will never send again an id of `channel` below `next` (spec §17.6).
    Skip {
        /// The channel.
        channel: u16,
        /// The lowest id the sender may still send.
        next: u64,
    },
    /// The relay holds, in its spool, the routed packets its peer sent in `Forward`s naming
    /// `route` with generation `generation` and `counter_lo` `first .. first + count` (modulo
    /// 2^24) (spec §17.9). Validated when decoded.
    Stored {
        /// The handle the `Forward`s named.
        route: u32,
        /// The G bit of the packets' type byte: 0 or 1.
        generation: u8,
        /// The `counter_lo` of the first packet, below 2^24.
        first: u32,
        /// How many consecutive packets: 1 ..= 2^24.
        count: u32,
    },
}

/// spec §16.4: `Forward` and `Deliver` bodies.
#[derive(Serialize, Deserialize)]
struct EnvelopeBody<'a> {
    route: u32,
    #[serde(borrow, serialize_with = "as_bytes")]
    packet: &'a [u8],
}

/// spec §16.3: `Route` body; the node id is a postcard array (no length prefix).
#[derive(Serialize, Deserialize)]
struct RouteBody {
    route: u32,
    node: [u8; crate::trust::NODE_ID_LEN],
}

/// spec §16.3, §16.5: `Withdraw` and `Unreachable` bodies.
#[derive(Serialize, Deserialize)]
struct NoticeBody {
    route: u32,
    reason: u8,
}

/// spec §17.9: `Stored` body.
#[derive(Serialize, Deserialize)]
struct StoredBody {
    route: u32,
    generation: u8,
    first: u32,
    count: u32,
}

impl StoredBody {
    /// spec §17.9: the ranges a `Stored` may name.
    const fn is_valid(&self) -> bool {
        self.generation <= 1 && self.first < STORED_COUNTER_SPAN && self.count >= 1 && self.count <= STORED_COUNTER_SPAN
    }
}

/// spec §17.6: `Skip` body.
#[derive(Serialize, Deserialize)]
struct SkipBody {
    channel: u16,
    next: u64,
}

#[derive(Serialize, Deserialize)]
struct DataBody<'a> {
    channel: u16,
    id: u64,
    #[serde(borrow, serialize_with = "as_bytes")]
    payload: &'a [u8],
}

/// A byte string encoded as postcard bytes (length prefix, then the bytes).
#[derive(Serialize, Deserialize)]
struct Bytes<'a>(#[serde(borrow, serialize_with = "as_bytes")] &'a [u8]);

/// Serializes a byte slice as serde bytes. serde's default for `&[u8]` is a sequence of
/// `u8`, which postcard writes one byte at a time; as bytes it is one copy. postcard
/// encodes both the same way (varint length, then the raw bytes), so the wire is unchanged.
fn as_bytes<S: serde::Serializer>(bytes: &&[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_bytes(bytes)
}

pub(crate) fn varint_len(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

impl<'a> Message<'a> {
    /// Encoded length in bytes (kind byte included).
    #[must_use]
    pub fn encoded_len(&self) -> usize {
        1 + match *self {
            Self::Data { channel, id, payload } => {
                varint_len(u64::from(channel)) + varint_len(id) + varint_len(payload.len() as u64) + payload.len()
            }
            Self::Ping { id } | Self::Pong { id } => varint_len(u64::from(id)),
            Self::Close { reason } => varint_len(u64::from(reason.code())),
            Self::Handshake { packet } | Self::RevocationPush { list: packet } => {
                varint_len(packet.len() as u64) + packet.len()
            }
            Self::TimeSync { unix_time } => varint_len(unix_time),
            Self::Forward { route, packet } | Self::Deliver { route, packet } => {
                varint_len(u64::from(route)) + varint_len(packet.len() as u64) + packet.len()
            }
            Self::Route { route, .. } => varint_len(u64::from(route)) + crate::trust::NODE_ID_LEN,
            Self::Withdraw { route, .. } | Self::Unreachable { route, .. } => varint_len(u64::from(route)) + 1,
            Self::Ack(ref ack) => ack.body_len(),
            Self::Stream { .. } => STREAM_ID_LEN,
            Self::Skip { channel, next } => varint_len(u64::from(channel)) + varint_len(next),
            Self::Stored { route, first, count, .. } => {
                varint_len(u64::from(route)) + 1 + varint_len(u64::from(first)) + varint_len(u64::from(count))
            }
        }
    }

    /// Writes the message into `out`, returning its length.
    ///
    /// # Errors
    /// [`DecodeError::Truncated`] if `out` is too short; [`DecodeError::MalformedMessage`] for a
    /// `Stored` whose fields are out of range (spec §17.9), which a receiver would refuse.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, DecodeError> {
        let (kind, body) = out.split_first_mut().ok_or(DecodeError::Truncated)?;
        let n = match *self {
            Self::Data { channel, id, payload } => {
                *kind = KIND_DATA;
                postcard::to_slice(&DataBody { channel, id, payload }, body)
            }
            Self::Ping { id } => {
                *kind = KIND_PING;
                postcard::to_slice(&id, body)
            }
            Self::Pong { id } => {
                *kind = KIND_PONG;
                postcard::to_slice(&id, body)
            }
            Self::Close { reason } => {
                *kind = KIND_CLOSE;
                postcard::to_slice(&reason.code(), body)
            }
            Self::Handshake { packet } => {
                *kind = KIND_HANDSHAKE;
                postcard::to_slice(&Bytes(packet), body)
            }
            Self::RevocationPush { list } => {
                *kind = KIND_REVOCATION_PUSH;
                postcard::to_slice(&Bytes(list), body)
            }
            Self::TimeSync { unix_time } => {
                *kind = KIND_TIME_SYNC;
                postcard::to_slice(&unix_time, body)
            }
            Self::Forward { route, packet } => {
                *kind = KIND_FORWARD;
                postcard::to_slice(&EnvelopeBody { route, packet }, body)
            }
            Self::Deliver { route, packet } => {
                *kind = KIND_DELIVER;
                postcard::to_slice(&EnvelopeBody { route, packet }, body)
            }
            Self::Route { route, node } => {
                *kind = KIND_ROUTE;
                postcard::to_slice(&RouteBody { route, node: node.0 }, body)
            }
            Self::Withdraw { route, reason } => {
                *kind = KIND_WITHDRAW;
                postcard::to_slice(&NoticeBody { route, reason: reason.code() }, body)
            }
            Self::Unreachable { route, reason } => {
                *kind = KIND_UNREACHABLE;
                postcard::to_slice(&NoticeBody { route, reason: reason.code() }, body)
            }
            Self::Ack(ref ack) => {
                *kind = KIND_ACK;
                return Ok(1 + ack.encode_body(body)?);
            }
            Self::Stream { stream } => {
                *kind = KIND_STREAM;
                postcard::to_slice(&stream, body)
            }
            Self::Skip { channel, next } => {
                *kind = KIND_SKIP;
                postcard::to_slice(&SkipBody { channel, next }, body)
            }
            Self::Stored { route, generation, first, count } => {
                let b = StoredBody { route, generation, first, count };
                // Never put on the wire what a receiver must refuse.
                if !b.is_valid() {
                    return Err(DecodeError::MalformedMessage);
                }
                *kind = KIND_STORED;
                postcard::to_slice(&b, body)
            }
        }
        .map_err(|_| DecodeError::Truncated)?
        .len();
        Ok(1 + n)
    }

    /// Decodes the first message of `bytes`, returning it and the rest (spec §9.1).
    ///
    /// # Errors
    /// [`DecodeError::UnknownMessageKind`] for reserved or unknown kinds (spec §9.2),
    /// [`DecodeError::MalformedMessage`] for a body that does not decode.
    pub fn decode(bytes: &'a [u8]) -> Result<(Self, &'a [u8]), DecodeError> {
        let (&kind, body) = bytes.split_first().ok_or(DecodeError::Truncated)?;
        let bad = |_| DecodeError::MalformedMessage;
        match kind {
            KIND_DATA => {
                let (d, rest): (DataBody<'a>, _) = postcard::take_from_bytes(body).map_err(bad)?;
                Ok((Self::Data { channel: d.channel, id: d.id, payload: d.payload }, rest))
            }
            KIND_PING => {
                let (id, rest) = postcard::take_from_bytes(body).map_err(bad)?;
                Ok((Self::Ping { id }, rest))
            }
            KIND_PONG => {
                let (id, rest) = postcard::take_from_bytes(body).map_err(bad)?;
                Ok((Self::Pong { id }, rest))
            }
            KIND_CLOSE => {
                let (code, rest): (u16, _) = postcard::take_from_bytes(body).map_err(bad)?;
                Ok((Self::Close { reason: CloseReason::from_code(code) }, rest))
            }
            KIND_HANDSHAKE => {
                let (b, rest): (Bytes<'a>, _) = postcard::take_from_bytes(body).map_err(bad)?;
                Ok((Self::Handshake { packet: b.0 }, rest))
            }
            KIND_REVOCATION_PUSH => {
                // Borrowed: nothing is allocated whatever the length claims (spec §15.8).
                let (b, rest): (Bytes<'a>, _) = postcard::take_from_bytes(body).map_err(bad)?;
                if b.0.len() > crate::trust::MAX_REVOCATION_LIST_LEN {
                    return Err(DecodeError::MalformedMessage);
                }
                Ok((Self::RevocationPush { list: b.0 }, rest))
            }
            KIND_TIME_SYNC => {
                let (unix_time, rest) = postcard::take_from_bytes(body).map_err(bad)?;
                Ok((Self::TimeSync { unix_time }, rest))
            }
            KIND_FORWARD | KIND_DELIVER => {
                // Borrowed: the packet is a slice of the plaintext, nothing is allocated.
                let (e, rest): (EnvelopeBody<'a>, _) = postcard::take_from_bytes(body).map_err(bad)?;
                // spec §9.2: an envelope carries a packet.
                if e.packet.is_empty() {
                    return Err(DecodeError::MalformedMessage);
                }
                let m = if kind == KIND_FORWARD {
                    Self::Forward { route: e.route, packet: e.packet }
                } else {
                    Self::Deliver { route: e.route, packet: e.packet }
                };
                Ok((m, rest))
            }
            KIND_ROUTE => {
                let (r, rest): (RouteBody, _) = postcard::take_from_bytes(body).map_err(bad)?;
                Ok((Self::Route { route: r.route, node: NodeId(r.node) }, rest))
            }
            KIND_WITHDRAW | KIND_UNREACHABLE => {
                let (n, rest): (NoticeBody, _) = postcard::take_from_bytes(body).map_err(bad)?;
                let reason = RouteReason::from_code(n.reason);
                let m = if kind == KIND_WITHDRAW {
                    Self::Withdraw { route: n.route, reason }
                } else {
                    Self::Unreachable { route: n.route, reason }
                };
                Ok((m, rest))
            }
            KIND_ACK => {
                // Ranges land in a fixed-size array: nothing is allocated (spec §17.3).
                let (ack, rest) = Ack::decode_body(body)?;
                Ok((Self::Ack(ack), rest))
            }
            KIND_STREAM => {
                let (stream, rest) = postcard::take_from_bytes(body).map_err(bad)?;
                Ok((Self::Stream { stream }, rest))
            }
            KIND_SKIP => {
                let (s, rest): (SkipBody, _) = postcard::take_from_bytes(body).map_err(bad)?;
                Ok((Self::Skip { channel: s.channel, next: s.next }, rest))
            }
            KIND_STORED => {
                let (s, rest): (StoredBody, _) = postcard::take_from_bytes(body).map_err(bad)?;
                if !s.is_valid() {
                    return Err(DecodeError::MalformedMessage);
                }
                Ok((Self::Stored { route: s.route, generation: s.generation, first: s.first, count: s.count }, rest))
            }
            other => Err(DecodeError::UnknownMessageKind(other)),
        }
    }
}

/// Iterates over the messages of a decrypted packet (spec §6.4). Stops at the first
/// error, which it yields once.
#[derive(Debug, Clone)]
pub struct Messages<'a> {
    rest: &'a [u8],
    failed: bool,
}

impl<'a> Messages<'a> {
    /// Iterates over `plaintext`.
    #[must_use]
    pub const fn new(plaintext: &'a [u8]) -> Self {
        Self { rest: plaintext, failed: false }
    }
}

impl<'a> Iterator for Messages<'a> {
    type Item = Result<Message<'a>, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() || self.failed {
            return None;
        }
        match Message::decode(self.rest) {
            Ok((m, rest)) => {
                self.rest = rest;
                Some(Ok(m))
            }
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

/// Checks a whole plaintext before any of it is acted on, so that a packet is taken
/// or refused as a unit (spec §9.1).
///
/// # Errors
/// The first message's decode error.
pub fn validate(plaintext: &[u8]) -> Result<usize, DecodeError> {
    let mut n = 0;
    for m in Messages::new(plaintext) {
        m?;
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_strings_encode_as_a_postcard_sequence_of_u8() {
        // The bulk-copy encoding must stay byte-for-byte what serde's default `&[u8]`
        // (a sequence of u8) gave, the format spec §9.2 describes.
        let payload: alloc::vec::Vec<u8> = (0..300u16).map(|i| (i % 251) as u8).collect();
        let mut ours = [0u8; 400];
        let n = Message::Data { channel: 3, id: 200, payload: &payload }.encode(&mut ours).unwrap();
        let mut seq = [0u8; 400];
        let m = postcard::to_slice(&(3u16, 200u64, payload.clone()), &mut seq).unwrap().len();
        assert_eq!(ours[0], KIND_DATA);
        assert_eq!(&ours[1..n], &seq[..m]);
        let n = Message::Handshake { packet: &payload }.encode(&mut ours).unwrap();
        let m = postcard::to_slice(&payload, &mut seq).unwrap().len();
        assert_eq!(&ours[1..n], &seq[..m]);
    }

    #[test]
    fn messages_round_trip_with_exact_lengths() {
        let msgs = [
            Message::Data { channel: 3, id: 300, payload: b"hello" },
            Message::Data { channel: 0, id: 0, payload: &[] },
            Message::Ping { id: 7 },
            Message::Pong { id: u32::MAX },
            Message::Close { reason: CloseReason::Unknown(999) },
        ];
        let mut buf = [0u8; 128];
        let mut at = 0;
        for m in &msgs {
            let n = m.encode(&mut buf[at..]).unwrap();
            assert_eq!(n, m.encoded_len(), "{m:?}");
            at += n;
        }
        let decoded: alloc::vec::Vec<_> = Messages::new(&buf[..at]).map(Result::unwrap).collect();
        assert_eq!(decoded, msgs);
        assert_eq!(validate(&buf[..at]), Ok(5));
    }

    #[test]
    fn small_data_message_costs_four_bytes_of_framing() {
        let m = Message::Data { channel: 1, id: 5, payload: &[0u8; 32] };
        assert_eq!(m.encoded_len(), 36);
    }

    #[test]
    fn reserved_and_malformed_kinds_are_errors() {
        for k in [0u8, KIND_FLOW_REPORT, 0x12, 0x7f, 0x80] {
            assert_eq!(Message::decode(&[k, 0]), Err(DecodeError::UnknownMessageKind(k)));
        }
        assert_eq!(Message::decode(&[KIND_DATA, 1, 1, 9, 0]), Err(DecodeError::MalformedMessage));
        assert_eq!(validate(&[KIND_PING, 1, KIND_PING]), Err(DecodeError::MalformedMessage));
    }

    #[test]
    fn routing_messages_round_trip_with_exact_lengths() {
        let packet = alloc::vec![0x10u8; 200];
        let msgs = [
            Message::Forward { route: 0, packet: &packet[..56] },
            Message::Deliver { route: 300, packet: &packet },
            Message::Route { route: u32::MAX, node: NodeId([0xab; 16]) },
            Message::Withdraw { route: 5, reason: RouteReason::Detached },
            Message::Unreachable { route: 127, reason: RouteReason::Unknown(200) },
        ];
        let mut buf = [0u8; 512];
        let mut at = 0;
        for m in &msgs {
            let n = m.encode(&mut buf[at..]).unwrap();
            assert_eq!(n, m.encoded_len(), "{m:?}");
            at += n;
        }
        let decoded: alloc::vec::Vec<_> = Messages::new(&buf[..at]).map(Result::unwrap).collect();
        assert_eq!(decoded, msgs);
        // spec §12.6: kind, a one-byte handle and a one-byte length around a 56-byte packet.
        assert_eq!(msgs[0].encoded_len(), 3 + 56);
        assert_eq!(Message::Route { route: 1, node: NodeId([0; 16]) }.encoded_len(), 18);
    }

    #[test]
    fn malformed_routing_messages_are_errors() {
        for bad in [
            &[KIND_FORWARD][..],
            &[KIND_FORWARD, 0x00, 0x00],                               // empty packet
            &[KIND_DELIVER, 0x01, 0x02, 0x10],                         // packet cut short
            &[KIND_FORWARD, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x01, 0x10], // route > u32
            &[KIND_ROUTE, 0x01, 0xab],                                 // node id cut short
            &[KIND_WITHDRAW, 0x01],                                    // no reason
            &[KIND_UNREACHABLE, 0x80],                                 // route varint cut
        ] {
            assert_eq!(Message::decode(bad), Err(DecodeError::MalformedMessage), "{bad:02x?}");
        }
    }

    #[test]
    fn delivery_messages_round_trip_with_exact_lengths() {
        let msgs = [
            Message::Ack(Ack::cumulative(1, 300)),
            Message::Ack(Ack::new(u16::MAX, u64::MAX - 5000, &[(1, 2), (3, 1000)]).unwrap()),
            Message::Stream { stream: [0xa5; 8] },
            Message::Skip { channel: 2, next: 1 << 40 },
            Message::Stored { route: 3, generation: 1, first: STORED_COUNTER_SPAN - 1, count: STORED_COUNTER_SPAN },
            Message::Stored { route: u32::MAX, generation: 0, first: 0, count: 1 },
        ];
        let mut buf = [0u8; 256];
        let mut at = 0;
        for m in &msgs {
            let n = m.encode(&mut buf[at..]).unwrap();
            assert_eq!(n, m.encoded_len(), "{m:?}");
            assert!(m.encode(&mut [0u8; 64][..n - 1]).is_err(), "{m:?} in a short buffer");
            at += n;
        }
        let decoded: alloc::vec::Vec<_> = Messages::new(&buf[..at]).map(Result::unwrap).collect();
        assert_eq!(decoded, msgs);
        // spec §17.2, §17.3, §17.6 layouts.
        assert_eq!(buf[..5], [KIND_ACK, 0x01, 0xac, 0x02, 0x00]);
        let mut one = [0u8; 16];
        let n = Message::Ack(Ack::new(5, 10, &[(2, 3)]).unwrap()).encode(&mut one).unwrap();
        assert_eq!(&one[..n], [KIND_ACK, 5, 10, 1, 2, 3]);
        let n = Message::Stream { stream: *b"stream!!" }.encode(&mut one).unwrap();
        assert_eq!(&one[..n], [&[KIND_STREAM][..], b"stream!!"].concat());
        let n = Message::Skip { channel: 300, next: 128 }.encode(&mut one).unwrap();
        assert_eq!(&one[..n], [KIND_SKIP, 0xac, 0x02, 0x80, 0x01]);
        let n = Message::Stored { route: 2, generation: 1, first: 200, count: 3 }.encode(&mut one).unwrap();
        assert_eq!(&one[..n], [KIND_STORED, 2, 1, 0xc8, 0x01, 3]);
        for bad in [
            Message::Stored { route: 0, generation: 2, first: 0, count: 1 },
            Message::Stored { route: 0, generation: 0, first: STORED_COUNTER_SPAN, count: 1 },
            Message::Stored { route: 0, generation: 0, first: 0, count: 0 },
            Message::Stored { route: 0, generation: 0, first: 0, count: STORED_COUNTER_SPAN + 1 },
        ] {
            assert_eq!(bad.encode(&mut one), Err(DecodeError::MalformedMessage), "{bad:?}");
        }
        for bad in [
            &[KIND_STREAM, 1, 2, 3, 4, 5, 6, 7][..],         // 7 of 8 bytes
            &[KIND_SKIP, 1],                                 // no next
            &[KIND_ACK, 1, 0, 1, 0, 1],                      // zero skip
            &[KIND_ACK, 1, 0, 1, 1, 0],                      // zero count
            &[KIND_STORED, 0, 2, 0, 1],                      // generation 2
            &[KIND_STORED, 0, 0, 0x80, 0x80, 0x80, 0x08, 1], // first = 2^24
            &[KIND_STORED, 0, 0, 0, 0],                      // count 0
            &[KIND_STORED, 0, 0, 0, 0x81, 0x80, 0x80, 0x08], // count = 2^24 + 1
            &[KIND_STORED, 0, 0, 0],                         // no count
        ] {
            assert_eq!(Message::decode(bad), Err(DecodeError::MalformedMessage), "{bad:02x?}");
        }
    }

    #[test]
    fn trust_messages_round_trip_and_are_bounded() {
        let list = alloc::vec![7u8; 300];
        let msgs = [Message::RevocationPush { list: &list }, Message::TimeSync { unix_time: 1_782_864_000 }];
        let mut buf = [0u8; 400];
        let mut at = 0;
        for m in &msgs {
            let n = m.encode(&mut buf[at..]).unwrap();
            assert_eq!(n, m.encoded_len(), "{m:?}");
            at += n;
        }
        let decoded: alloc::vec::Vec<_> = Messages::new(&buf[..at]).map(Result::unwrap).collect();
        assert_eq!(decoded, msgs);
        // spec §15.8: a list longer than the maximum is malformed, whatever follows.
        let too_long = alloc::vec![0u8; crate::trust::MAX_REVOCATION_LIST_LEN + 1];
        let mut big = alloc::vec![0u8; too_long.len() + 8];
        let n = Message::RevocationPush { list: &too_long }.encode(&mut big).unwrap();
        assert_eq!(Message::decode(&big[..n]), Err(DecodeError::MalformedMessage));
        assert_eq!(Message::decode(&[KIND_TIME_SYNC]), Err(DecodeError::MalformedMessage));
        assert_eq!(Message::decode(&[KIND_REVOCATION_PUSH, 0x80]), Err(DecodeError::MalformedMessage));
    }
}
