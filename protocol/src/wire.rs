//! Packet layouts (spec §4): the cleartext headers in front of every Noise message
//! and transport ciphertext, parsed once at the edge into typed views.

use core::fmt;

use crate::error::DecodeError;
use crate::params::{Mode, Pattern, Suite, PROTOCOL_VERSION};

/// spec §3.3: the largest packet Noise allows, and the ceiling of `max_packet_len`.
pub const MAX_PACKET_LEN: usize = 65_535;
/// spec §3.3: the smallest `max_packet_len` a peer may announce or configure.
pub const MIN_PACKET_LEN: usize = 128;
/// spec §3.3: largest handshake payload plaintext.
pub const HANDSHAKE_PAYLOAD_MAX: usize = 1_024;
/// AEAD tag length for both suites.
pub const TAG_LEN: usize = 16;
/// X25519 public key length.
pub const DH_LEN: usize = 32;

/// spec §4.1: packet type of the first handshake message.
pub const TYPE_HANDSHAKE_INIT: u8 = 0x01;
/// spec §4.1: packet type of the second handshake message.
pub const TYPE_HANDSHAKE_RESP: u8 = 0x02;
/// spec §4.1: packet type of the third handshake message (XX patterns).
pub const TYPE_HANDSHAKE_FINAL: u8 = 0x03;
/// spec §4.1: unauthenticated refusal of a handshake.
pub const TYPE_HANDSHAKE_REJECT: u8 = 0x04;
/// spec §4.1, §5.7.4: the responder's cookie challenge (datagram mode only).
pub const TYPE_COOKIE_REPLY: u8 = 0x05;
/// spec §4.1, §5.7.4: an INIT with the cookie of a COOKIE_REPLY in front (datagram mode only).
pub const TYPE_HANDSHAKE_INIT_COOKIE: u8 = 0x06;
/// spec §4.2, §5.7.4: length of a cookie.
pub const COOKIE_LEN: usize = 16;
/// spec §4.2: a COOKIE_REPLY is exactly type, receiver index and cookie.
pub const COOKIE_REPLY_LEN: usize = 1 + 4 + COOKIE_LEN;
/// spec §4.2: what an INIT_COOKIE puts in front of the INIT (type and cookie).
pub const INIT_COOKIE_PREFIX_LEN: usize = 1 + COOKIE_LEN;
/// spec §4.1: transport packets use 0x10..=0x13, the low two bits being flags.
pub const TYPE_TRANSPORT: u8 = 0x10;
/// spec §6.2: transport flag bit 0, the session generation parity (both modes, spec §7.3).
pub const FLAG_GENERATION: u8 = 0x01;
/// spec §6.2: transport flag bit 1, "this packet starts the next epoch" (stream mode only).
pub const FLAG_EPOCH_ADVANCE: u8 = 0x02;

/// spec §4.2: transport header length in stream mode.
pub const STREAM_TRANSPORT_HEADER_LEN: usize = 1;
/// spec §4.2: transport header length in datagram mode.
pub const DATAGRAM_TRANSPORT_HEADER_LEN: usize = 8;
/// spec §4.2, §16.2: transport header length in routed mode (type and counter, no index).
pub const ROUTED_TRANSPORT_HEADER_LEN: usize = 4;

/// Transport header length for a mode.
#[must_use]
pub const fn transport_header_len(mode: Mode) -> usize {
    match mode {
        Mode::Stream => STREAM_TRANSPORT_HEADER_LEN,
        Mode::Datagram => DATAGRAM_TRANSPORT_HEADER_LEN,
        Mode::Routed => ROUTED_TRANSPORT_HEADER_LEN,
    }
}

/// Bytes a transport packet adds around its plaintext in a mode (header + tag).
#[must_use]
pub const fn transport_overhead(mode: Mode) -> usize {
    transport_header_len(mode) + TAG_LEN
}

/// Why a responder refused a handshake (spec §5.8). Sent in cleartext, so unauthenticated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RejectReason {
    /// The first message did not parse.
    Malformed,
    /// The protocol version is not supported.
    UnsupportedVersion,
    /// The pattern is unknown or not enabled.
    UnsupportedPattern,
    /// The suite is unknown or not enabled.
    UnsupportedSuite,
    /// The responder has no room for another connection or handshake (spec §5.8); sent by
    /// the transports, before any Diffie-Hellman work.
    Busy,
    /// The authorization decision denied the initiator (stream mode only).
    Unauthorized,
    /// The initiator's certificate, an issuer above it, or its key is revoked (spec §15.9;
    /// stream mode only).
    Revoked,
    /// The initiator's certificate chain failed verification (spec §15.9; stream mode only).
    BadCertificate,
    /// A code this version does not know.
    Unknown(u8),
}

impl RejectReason {
    /// The wire code.
    #[must_use]
    pub const fn code(self) -> u8 {
        match self {
            Self::Malformed => 0x01,
            Self::UnsupportedVersion => 0x02,
            Self::UnsupportedPattern => 0x03,
            Self::UnsupportedSuite => 0x04,
            Self::Busy => 0x05,
            Self::Unauthorized => 0x06,
            Self::Revoked => 0x07,
            Self::BadCertificate => 0x08,
            Self::Unknown(c) => c,
        }
    }

    /// Parses a wire code (unknown codes are kept, never guessed).
    #[must_use]
    pub const fn from_code(code: u8) -> Self {
        match code {
            0x01 => Self::Malformed,
            0x02 => Self::UnsupportedVersion,
            0x03 => Self::UnsupportedPattern,
            0x04 => Self::UnsupportedSuite,
            0x05 => Self::Busy,
            0x06 => Self::Unauthorized,
            0x07 => Self::Revoked,
            0x08 => Self::BadCertificate,
            c => Self::Unknown(c),
        }
    }

    /// The reason to answer a first message that failed to decode with.
    #[must_use]
    pub const fn for_decode_error(e: DecodeError) -> Self {
        match e {
            DecodeError::UnsupportedVersion(_) => Self::UnsupportedVersion,
            DecodeError::UnsupportedPattern(_) => Self::UnsupportedPattern,
            DecodeError::UnsupportedSuite(_) => Self::UnsupportedSuite,
            _ => Self::Malformed,
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Malformed => f.write_str("malformed"),
            Self::UnsupportedVersion => f.write_str("unsupported version"),
            Self::UnsupportedPattern => f.write_str("unsupported pattern"),
            Self::UnsupportedSuite => f.write_str("unsupported suite"),
            Self::Busy => f.write_str("busy"),
            Self::Unauthorized => f.write_str("unauthorized"),
            Self::Revoked => f.write_str("revoked"),
            Self::BadCertificate => f.write_str("bad certificate"),
            Self::Unknown(c) => write!(f, "unknown reason {c:#04x}"),
        }
    }
}

/// The parsed `HANDSHAKE_INIT` header (spec §4.2). Version, pattern and suite are
/// validated; the raw header bytes are kept for the prologue (spec §5.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitHeader {
    /// Protocol version (always [`PROTOCOL_VERSION`] once parsed).
    pub version: u8,
    /// Noise pattern.
    pub pattern: Pattern,
    /// Cipher suite.
    pub suite: Suite,
    /// The initiator's session index (datagram mode only).
    pub sender_index: Option<u32>,
}

impl InitHeader {
    /// Header length in a mode.
    #[must_use]
    pub const fn len(mode: Mode) -> usize {
        if mode.has_indices() {
            7
        } else {
            3
        }
    }

    /// Writes the header into `out`, returning its length.
    ///
    /// # Errors
    /// [`DecodeError::Truncated`] if `out` is too short.
    pub fn encode(&self, mode: Mode, out: &mut [u8]) -> Result<usize, DecodeError> {
        let len = Self::len(mode);
        let out = out.get_mut(..len).ok_or(DecodeError::Truncated)?;
        out[0] = TYPE_HANDSHAKE_INIT;
        out[1] = self.version;
        out[2] = (self.pattern.code() << 4) | self.suite.code();
        if mode.has_indices() {
            out[3..7].copy_from_slice(&self.sender_index.unwrap_or(0).to_be_bytes());
        }
        Ok(len)
    }
}

/// One parsed packet: a typed header and borrowed body (spec §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Packet<'a> {
    /// First handshake message.
    Init {
        /// The validated header.
        header: InitHeader,
        /// The header bytes as received (bound into the prologue).
        header_bytes: &'a [u8],
        /// The Noise message.
        body: &'a [u8],
    },
    /// Second handshake message.
    Resp {
        /// Index of the initiator's session (datagram mode).
        receiver_index: Option<u32>,
        /// The responder's index for later packets (datagram mode).
        sender_index: Option<u32>,
        /// The Noise message.
        body: &'a [u8],
    },
    /// Third handshake message (XX patterns).
    Final {
        /// Index of the responder's session (datagram mode).
        receiver_index: Option<u32>,
        /// The Noise message.
        body: &'a [u8],
    },
    /// Unauthenticated handshake refusal.
    Reject {
        /// Index of the initiator's session (datagram mode).
        receiver_index: Option<u32>,
        /// Why.
        reason: RejectReason,
    },
    /// The responder's cookie challenge (spec §5.7.4, datagram mode only).
    CookieReply {
        /// Index of the initiator's session.
        receiver_index: u32,
        /// The cookie to send back in front of the INIT.
        cookie: [u8; COOKIE_LEN],
    },
    /// An INIT with a cookie in front (spec §5.7.4, datagram mode only). The INIT inside is
    /// parsed exactly as [`Packet::Init`].
    InitCookie {
        /// The cookie, from a COOKIE_REPLY.
        cookie: [u8; COOKIE_LEN],
        /// The INIT inside, as received (its header is the one bound into the prologue).
        init: &'a [u8],
        /// The validated header of the INIT inside.
        header: InitHeader,
        /// That header's bytes.
        header_bytes: &'a [u8],
        /// Its Noise message.
        body: &'a [u8],
    },
    /// A transport packet.
    Transport(TransportHeader, &'a [u8]),
}

/// The parsed header of a transport packet (spec §4.2, §6.2, §6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransportHeader {
    /// Generation parity (spec §6.2, §7.3).
    pub generation: bool,
    /// Epoch-advance flag (stream mode only).
    pub epoch_advance: bool,
    /// Receiver's session index (datagram mode; routed mode has none, spec §16.2).
    pub receiver_index: Option<u32>,
    /// Low 24 bits of the counter (datagram and routed modes).
    pub counter_lo: Option<u32>,
}

impl TransportHeader {
    /// Writes a transport header, returning its length.
    ///
    /// # Errors
    /// [`DecodeError::Truncated`] if `out` is too short.
    pub fn encode(&self, mode: Mode, out: &mut [u8]) -> Result<usize, DecodeError> {
        let len = transport_header_len(mode);
        let out = out.get_mut(..len).ok_or(DecodeError::Truncated)?;
        match mode {
            Mode::Stream => {
                let mut t = TYPE_TRANSPORT;
                if self.generation {
                    t |= FLAG_GENERATION;
                }
                if self.epoch_advance {
                    t |= FLAG_EPOCH_ADVANCE;
                }
                out[0] = t;
            }
            Mode::Datagram => {
                out[0] = if self.generation { TYPE_TRANSPORT | FLAG_GENERATION } else { TYPE_TRANSPORT };
                out[1..5].copy_from_slice(&self.receiver_index.unwrap_or(0).to_be_bytes());
                let c = self.counter_lo.unwrap_or(0).to_be_bytes();
                out[5..8].copy_from_slice(&c[1..4]);
            }
            Mode::Routed => {
                out[0] = if self.generation { TYPE_TRANSPORT | FLAG_GENERATION } else { TYPE_TRANSPORT };
                let c = self.counter_lo.unwrap_or(0).to_be_bytes();
                out[1..4].copy_from_slice(&c[1..4]);
            }
        }
        Ok(len)
    }
}

fn be_u32(b: &[u8]) -> Result<u32, DecodeError> {
    let arr: [u8; 4] = b.get(..4).ok_or(DecodeError::Truncated)?.try_into().map_err(|_| DecodeError::Truncated)?;
    Ok(u32::from_be_bytes(arr))
}

fn cookie_at(b: &[u8]) -> Result<[u8; COOKIE_LEN], DecodeError> {
    b.get(..COOKIE_LEN).ok_or(DecodeError::Truncated)?.try_into().map_err(|_| DecodeError::Truncated)
}

/// spec §4.2, §4.3: an INIT's header, checked in the order version, pattern, suite (nothing
/// is guessed), its bytes and the Noise message after it.
fn parse_init(mode: Mode, bytes: &[u8]) -> Result<(InitHeader, &[u8], &[u8]), DecodeError> {
    let hlen = InitHeader::len(mode);
    if bytes.len() < hlen {
        return Err(DecodeError::Truncated);
    }
    let version = bytes[1];
    if version != PROTOCOL_VERSION {
        return Err(DecodeError::UnsupportedVersion(version));
    }
    let ps = bytes[2];
    let pattern = Pattern::from_code(ps >> 4).ok_or(DecodeError::UnsupportedPattern(ps >> 4))?;
    let suite = Suite::from_code(ps & 0x0f).ok_or(DecodeError::UnsupportedSuite(ps & 0x0f))?;
    let sender_index = if mode.has_indices() { Some(be_u32(&bytes[3..])?) } else { None };
    Ok((InitHeader { version, pattern, suite, sender_index }, &bytes[..hlen], &bytes[hlen..]))
}

/// Writes a COOKIE_REPLY (spec §4.2, §5.7.4) into `out`, returning its length.
///
/// # Errors
/// [`DecodeError::Truncated`] if `out` is shorter than [`COOKIE_REPLY_LEN`].
pub fn encode_cookie_reply(
    receiver_index: u32,
    cookie: &[u8; COOKIE_LEN],
    out: &mut [u8],
) -> Result<usize, DecodeError> {
    let out = out.get_mut(..COOKIE_REPLY_LEN).ok_or(DecodeError::Truncated)?;
    out[0] = TYPE_COOKIE_REPLY;
    out[1..5].copy_from_slice(&receiver_index.to_be_bytes());
    out[5..].copy_from_slice(cookie);
    Ok(COOKIE_REPLY_LEN)
}

/// Writes an INIT_COOKIE (spec §4.2, §5.7.4): the prefix and `init`, unchanged. Returns its
/// length.
///
/// # Errors
/// [`DecodeError::Truncated`] if `out` cannot hold the prefix and `init`.
pub fn encode_init_cookie(cookie: &[u8; COOKIE_LEN], init: &[u8], out: &mut [u8]) -> Result<usize, DecodeError> {
    let len = INIT_COOKIE_PREFIX_LEN + init.len();
    let out = out.get_mut(..len).ok_or(DecodeError::Truncated)?;
    out[0] = TYPE_HANDSHAKE_INIT_COOKIE;
    out[1..INIT_COOKIE_PREFIX_LEN].copy_from_slice(cookie);
    out[INIT_COOKIE_PREFIX_LEN..].copy_from_slice(init);
    Ok(len)
}

/// Parses one packet received in `mode` (spec §4.4). Lengths are checked before
/// anything else; no allocation happens here.
///
/// # Errors
/// A [`DecodeError`] naming the first rule the packet breaks.
pub fn parse(mode: Mode, max_packet_len: usize, bytes: &[u8]) -> Result<Packet<'_>, DecodeError> {
    let (&ty, rest) = bytes.split_first().ok_or(DecodeError::Empty)?;
    if bytes.len() > max_packet_len.min(MAX_PACKET_LEN) {
        return Err(DecodeError::TooLong);
    }
    // Handshake packets have the datagram layouts in routed mode too (spec §16.2).
    let datagram = mode.has_indices();
    match ty {
        TYPE_HANDSHAKE_INIT => {
            let (header, header_bytes, body) = parse_init(mode, bytes)?;
            Ok(Packet::Init { header, header_bytes, body })
        }
        // spec §4.1, §4.4 step 4: cookies exist only in datagram mode (not stream, not routed).
        TYPE_COOKIE_REPLY | TYPE_HANDSHAKE_INIT_COOKIE if mode != Mode::Datagram => Err(DecodeError::WrongMode),
        TYPE_COOKIE_REPLY => match rest.len() {
            n if n < COOKIE_REPLY_LEN - 1 => Err(DecodeError::Truncated),
            n if n > COOKIE_REPLY_LEN - 1 => Err(DecodeError::TooLong),
            _ => Ok(Packet::CookieReply { receiver_index: be_u32(rest)?, cookie: cookie_at(&rest[4..])? }),
        },
        TYPE_HANDSHAKE_INIT_COOKIE => {
            if bytes.len() < INIT_COOKIE_PREFIX_LEN + InitHeader::len(mode) {
                return Err(DecodeError::Truncated);
            }
            let init = &bytes[INIT_COOKIE_PREFIX_LEN..];
            if init[0] != TYPE_HANDSHAKE_INIT {
                return Err(DecodeError::UnknownPacketType(init[0]));
            }
            let (header, header_bytes, body) = parse_init(mode, init)?;
            Ok(Packet::InitCookie { cookie: cookie_at(rest)?, init, header, header_bytes, body })
        }
        TYPE_HANDSHAKE_RESP => {
            if datagram {
                if rest.len() < 8 {
                    return Err(DecodeError::Truncated);
                }
                Ok(Packet::Resp {
                    receiver_index: Some(be_u32(rest)?),
                    sender_index: Some(be_u32(&rest[4..])?),
                    body: &rest[8..],
                })
            } else {
                Ok(Packet::Resp { receiver_index: None, sender_index: None, body: rest })
            }
        }
        TYPE_HANDSHAKE_FINAL => {
            if datagram {
                Ok(Packet::Final { receiver_index: Some(be_u32(rest)?), body: &rest[4..] })
            } else {
                Ok(Packet::Final { receiver_index: None, body: rest })
            }
        }
        TYPE_HANDSHAKE_REJECT => {
            let (receiver_index, rest) = if datagram { (Some(be_u32(rest)?), &rest[4..]) } else { (None, rest) };
            match rest {
                [code] => Ok(Packet::Reject { receiver_index, reason: RejectReason::from_code(*code) }),
                [] => Err(DecodeError::Truncated),
                _ => Err(DecodeError::TooLong),
            }
        }
        t if t & !(FLAG_GENERATION | FLAG_EPOCH_ADVANCE) == TYPE_TRANSPORT => {
            let hlen = transport_header_len(mode);
            if bytes.len() < hlen + TAG_LEN {
                return Err(DecodeError::Truncated);
            }
            // spec §6.2: the epoch-advance flag exists only in stream mode.
            if mode.is_lossy() && t & FLAG_EPOCH_ADVANCE != 0 {
                return Err(DecodeError::WrongMode);
            }
            let generation = t & FLAG_GENERATION != 0;
            let header = match mode {
                Mode::Datagram => TransportHeader {
                    generation,
                    epoch_advance: false,
                    receiver_index: Some(be_u32(rest)?),
                    counter_lo: Some(u32::from_be_bytes([0, rest[4], rest[5], rest[6]])),
                },
                // spec §16.2: no index; the route names the session.
                Mode::Routed => TransportHeader {
                    generation,
                    epoch_advance: false,
                    receiver_index: None,
                    counter_lo: Some(u32::from_be_bytes([0, rest[0], rest[1], rest[2]])),
                },
                Mode::Stream => TransportHeader {
                    generation,
                    epoch_advance: t & FLAG_EPOCH_ADVANCE != 0,
                    receiver_index: None,
                    counter_lo: None,
                },
            };
            Ok(Packet::Transport(header, bytes))
        }
        t => Err(DecodeError::UnknownPacketType(t)),
    }
}

/// Reads the session index a datagram is addressed to, without parsing the rest.
/// Used by endpoints to demultiplex (spec §4.2); `None` for `HANDSHAKE_INIT` and
/// `INIT_COOKIE` (which name the sender's index only) and for unknown types.
///
/// Datagram mode only: a routed-mode transport packet has no index (bytes 1..5 are its
/// counter and ciphertext); use [`routed_receiver_index`] there.
#[must_use]
pub fn datagram_receiver_index(bytes: &[u8]) -> Option<u32> {
    match bytes.first()? {
        &TYPE_HANDSHAKE_RESP
        | &TYPE_HANDSHAKE_FINAL
        | &TYPE_HANDSHAKE_REJECT
        | &TYPE_COOKIE_REPLY
        | &TYPE_TRANSPORT
        | &0x11 => be_u32(bytes.get(1..)?).ok(),
        _ => None,
    }
}

/// Reads the session index a routed-mode handshake packet (RESP, FINAL, REJECT) is addressed
/// to (spec §16.6); `None` for every other type, transport packets included: those are
/// demultiplexed by route, then by trying the connections of that route.
#[must_use]
pub fn routed_receiver_index(bytes: &[u8]) -> Option<u32> {
    match bytes.first()? {
        &TYPE_HANDSHAKE_RESP | &TYPE_HANDSHAKE_FINAL | &TYPE_HANDSHAKE_REJECT => be_u32(bytes.get(1..)?).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_header_round_trips() {
        for mode in [Mode::Stream, Mode::Datagram] {
            let h = InitHeader {
                version: PROTOCOL_VERSION,
                pattern: Pattern::XXpsk3,
                suite: Suite::AesGcmSha256,
                sender_index: matches!(mode, Mode::Datagram).then_some(0xdead_beef),
            };
            let mut buf = [0u8; 16];
            let n = h.encode(mode, &mut buf).unwrap();
            buf[n] = 0xaa;
            match parse(mode, MAX_PACKET_LEN, &buf[..n + 1]).unwrap() {
                Packet::Init { header, header_bytes, body } => {
                    assert_eq!(header, h);
                    assert_eq!(header_bytes, &buf[..n]);
                    assert_eq!(body, &[0xaa]);
                }
                p => panic!("{p:?}"),
            }
        }
    }

    #[test]
    fn unknown_codes_are_typed_errors() {
        assert_eq!(parse(Mode::Stream, MAX_PACKET_LEN, &[1, 2, 0x11]), Err(DecodeError::UnsupportedVersion(2)));
        assert_eq!(parse(Mode::Stream, MAX_PACKET_LEN, &[1, 1, 0x61]), Err(DecodeError::UnsupportedPattern(6)));
        assert_eq!(parse(Mode::Stream, MAX_PACKET_LEN, &[1, 1, 0x13]), Err(DecodeError::UnsupportedSuite(3)));
        assert_eq!(parse(Mode::Stream, MAX_PACKET_LEN, &[0x42]), Err(DecodeError::UnknownPacketType(0x42)));
        assert_eq!(parse(Mode::Stream, MAX_PACKET_LEN, &[]), Err(DecodeError::Empty));
        assert_eq!(parse(Mode::Datagram, MAX_PACKET_LEN, &[1, 1, 0x11, 0, 0]), Err(DecodeError::Truncated));
        let mut t = [0u8; 40];
        t[0] = 0x12;
        assert_eq!(parse(Mode::Datagram, MAX_PACKET_LEN, &t), Err(DecodeError::WrongMode));
        assert_eq!(parse(Mode::Stream, 20, &t), Err(DecodeError::TooLong));
    }

    #[test]
    fn cookie_packets_round_trip_in_datagram_mode_only() {
        let cookie = [0xc0; COOKIE_LEN];
        let mut reply = [0u8; COOKIE_REPLY_LEN];
        assert_eq!(encode_cookie_reply(0x0102_0304, &cookie, &mut reply), Ok(COOKIE_REPLY_LEN));
        assert_eq!(&reply[..5], &[TYPE_COOKIE_REPLY, 1, 2, 3, 4]);
        assert_eq!(
            parse(Mode::Datagram, MAX_PACKET_LEN, &reply),
            Ok(Packet::CookieReply { receiver_index: 0x0102_0304, cookie })
        );
        assert_eq!(datagram_receiver_index(&reply), Some(0x0102_0304));
        assert_eq!(parse(Mode::Datagram, MAX_PACKET_LEN, &reply[..20]), Err(DecodeError::Truncated));
        let mut long = reply.to_vec();
        long.push(0);
        assert_eq!(parse(Mode::Datagram, MAX_PACKET_LEN, &long), Err(DecodeError::TooLong));
        assert!(encode_cookie_reply(1, &cookie, &mut [0u8; 20]).is_err());

        let init = [TYPE_HANDSHAKE_INIT, PROTOCOL_VERSION, 0x11, 9, 8, 7, 6, 0xaa, 0xbb];
        let mut buf = [0u8; 64];
        let n = encode_init_cookie(&cookie, &init, &mut buf).unwrap();
        assert_eq!(n, INIT_COOKIE_PREFIX_LEN + init.len());
        match parse(Mode::Datagram, MAX_PACKET_LEN, &buf[..n]).unwrap() {
            Packet::InitCookie { cookie: c, init: i, header, header_bytes, body } => {
                assert_eq!((c, i, header_bytes, body), (cookie, &init[..], &init[..7], &init[7..]));
                assert_eq!(header.sender_index, Some(0x0908_0706));
            }
            p => panic!("{p:?}"),
        }
        assert_eq!(datagram_receiver_index(&buf[..n]), None);
        assert_eq!(parse(Mode::Datagram, MAX_PACKET_LEN, &buf[..n - 3]), Err(DecodeError::Truncated));
        buf[INIT_COOKIE_PREFIX_LEN] = TYPE_HANDSHAKE_RESP;
        assert_eq!(parse(Mode::Datagram, MAX_PACKET_LEN, &buf[..n]), Err(DecodeError::UnknownPacketType(2)));
        buf[INIT_COOKIE_PREFIX_LEN] = TYPE_HANDSHAKE_INIT;
        buf[INIT_COOKIE_PREFIX_LEN + 1] = 2;
        assert_eq!(parse(Mode::Datagram, MAX_PACKET_LEN, &buf[..n]), Err(DecodeError::UnsupportedVersion(2)));
        // spec §4.1: a TCP peer has proven its address; cookies do not exist in stream mode.
        assert_eq!(parse(Mode::Stream, MAX_PACKET_LEN, &reply), Err(DecodeError::WrongMode));
        assert_eq!(parse(Mode::Stream, MAX_PACKET_LEN, &buf[..n]), Err(DecodeError::WrongMode));
        assert_eq!(parse(Mode::Stream, MAX_PACKET_LEN, &[0x07]), Err(DecodeError::UnknownPacketType(7)));
        // spec §16.2: routed mode has no cookies either (the relay authenticated the link).
        assert_eq!(parse(Mode::Routed, MAX_PACKET_LEN, &reply), Err(DecodeError::WrongMode));
        assert_eq!(parse(Mode::Routed, MAX_PACKET_LEN, &buf[..n]), Err(DecodeError::WrongMode));
    }

    #[test]
    fn routed_handshake_packets_have_the_datagram_layouts() {
        let h = InitHeader {
            version: PROTOCOL_VERSION,
            pattern: Pattern::IK,
            suite: Suite::ChaChaPolyBlake2s,
            sender_index: Some(0x0a0b_0c0d),
        };
        let mut buf = [0u8; 8];
        assert_eq!(h.encode(Mode::Routed, &mut buf), Ok(7));
        assert_eq!(&buf[..7], &[TYPE_HANDSHAKE_INIT, 1, 0x11, 0x0a, 0x0b, 0x0c, 0x0d]);
        assert!(matches!(parse(Mode::Routed, MAX_PACKET_LEN, &buf), Ok(Packet::Init { header, .. }) if header == h));
        let resp = [TYPE_HANDSHAKE_RESP, 0, 0, 0, 7, 0, 0, 0, 9, 0xee];
        assert_eq!(
            parse(Mode::Routed, MAX_PACKET_LEN, &resp),
            Ok(Packet::Resp { receiver_index: Some(7), sender_index: Some(9), body: &[0xee] })
        );
        assert_eq!(routed_receiver_index(&resp), Some(7));
        assert_eq!(routed_receiver_index(&[TYPE_HANDSHAKE_REJECT, 0, 0, 1, 0, 2]), Some(256));
        assert_eq!(routed_receiver_index(&buf), None);
    }

    #[test]
    fn transport_header_round_trips() {
        let h = TransportHeader {
            generation: false,
            epoch_advance: false,
            receiver_index: Some(7),
            counter_lo: Some(0x00ab_cdef),
        };
        let mut buf = [0u8; 8 + TAG_LEN];
        h.encode(Mode::Datagram, &mut buf).unwrap();
        assert_eq!(&buf[..8], &[0x10, 0, 0, 0, 7, 0xab, 0xcd, 0xef]);
        assert_eq!(parse(Mode::Datagram, MAX_PACKET_LEN, &buf), Ok(Packet::Transport(h, &buf[..])));
        assert_eq!(datagram_receiver_index(&buf), Some(7));
        // spec §16.2: routed mode has the datagram header without its index.
        let r = TransportHeader {
            generation: true,
            epoch_advance: false,
            receiver_index: None,
            counter_lo: Some(0x0001_0203),
        };
        let mut buf = [0u8; 4 + TAG_LEN];
        assert_eq!(r.encode(Mode::Routed, &mut buf), Ok(4));
        assert_eq!(&buf[..4], &[0x11, 1, 2, 3]);
        assert_eq!(parse(Mode::Routed, MAX_PACKET_LEN, &buf), Ok(Packet::Transport(r, &buf[..])));
        assert_eq!(routed_receiver_index(&buf), None);
        buf[0] = 0x13;
        assert_eq!(parse(Mode::Routed, MAX_PACKET_LEN, &buf), Err(DecodeError::WrongMode));
        assert_eq!(parse(Mode::Routed, MAX_PACKET_LEN, &buf[..4 + TAG_LEN - 1]), Err(DecodeError::Truncated));
        let s = TransportHeader { generation: true, epoch_advance: true, receiver_index: None, counter_lo: None };
        let mut buf = [0u8; 1 + TAG_LEN];
        s.encode(Mode::Stream, &mut buf).unwrap();
        assert_eq!(buf[0], 0x13);
        assert_eq!(parse(Mode::Stream, MAX_PACKET_LEN, &buf), Ok(Packet::Transport(s, &buf[..])));
    }
}
