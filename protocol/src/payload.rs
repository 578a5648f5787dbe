//! The handshake payload carried inside every handshake message (spec §5.3).

use alloc::vec::Vec;

use serde::{Deserialize, Serialize};

use crate::error::{DecodeError, HandshakeError};
use crate::params::PROTOCOL_VERSION;
use crate::wire::{HANDSHAKE_PAYLOAD_MAX, MAX_PACKET_LEN, MIN_PACKET_LEN};

/// Capability bits (spec §5.3). Version 1 defines none; unknown bits are ignored.
pub type Capabilities = u32;

/// What each side announces during the handshake (spec §5.3). Never carries application
/// data (spec §5.6).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandshakePayload {
    /// Highest protocol version the sender implements.
    pub max_version: u8,
    /// Capability bits.
    pub capabilities: Capabilities,
    /// Largest packet the sender accepts; `None` means 65535.
    pub max_packet_len: Option<u16>,
    /// A certificate, opaque in version 1 (the trust layer defines its contents).
    pub certificate: Option<Vec<u8>>,
}

impl Default for HandshakePayload {
    fn default() -> Self {
        Self { max_version: PROTOCOL_VERSION, capabilities: 0, max_packet_len: None, certificate: None }
    }
}

impl HandshakePayload {
    /// Encodes into `out`, returning the length.
    ///
    /// # Errors
    /// [`HandshakeError::PayloadTooLarge`] above `HANDSHAKE_PAYLOAD_MAX` or when `out` is short.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, HandshakeError> {
        let limit = out.len().min(HANDSHAKE_PAYLOAD_MAX);
        postcard::to_slice(self, &mut out[..limit]).map(|s| s.len()).map_err(|_| HandshakeError::PayloadTooLarge)
    }

    /// Decodes and validates a received payload (spec §5.3): trailing bytes, version 0
    /// and `max_packet_len` below the minimum are refused.
    ///
    /// # Errors
    /// [`DecodeError::MalformedPayload`].
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() > HANDSHAKE_PAYLOAD_MAX {
            return Err(DecodeError::MalformedPayload);
        }
        let (p, rest): (Self, _) = postcard::take_from_bytes(bytes).map_err(|_| DecodeError::MalformedPayload)?;
        if !rest.is_empty() || p.max_version == 0 {
            return Err(DecodeError::MalformedPayload);
        }
        if let Some(m) = p.max_packet_len {
            if usize::from(m) < MIN_PACKET_LEN {
                return Err(DecodeError::MalformedPayload);
            }
        }
        Ok(p)
    }

    /// The peer's packet limit as a length.
    #[must_use]
    pub fn packet_limit(&self) -> usize {
        self.max_packet_len.map_or(MAX_PACKET_LEN, usize::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_payload_is_four_bytes() {
        let mut buf = [0u8; 16];
        let n = HandshakePayload::default().encode(&mut buf).unwrap();
        assert_eq!(&buf[..n], &[1, 0, 0, 0]);
        assert_eq!(HandshakePayload::decode(&buf[..n]).unwrap(), HandshakePayload::default());
    }

    #[test]
    fn invalid_payloads_are_refused() {
        assert_eq!(HandshakePayload::decode(&[1, 0, 0, 0, 0]), Err(DecodeError::MalformedPayload));
        assert_eq!(HandshakePayload::decode(&[0, 0, 0, 0]), Err(DecodeError::MalformedPayload));
        assert_eq!(HandshakePayload::decode(&[1, 0, 1, 10, 0]), Err(DecodeError::MalformedPayload));
        assert_eq!(HandshakePayload::decode(&[1, 0, 0]), Err(DecodeError::MalformedPayload));
        // A certificate length that claims more bytes than present.
        assert_eq!(HandshakePayload::decode(&[1, 0, 0, 1, 0x7f, 1]), Err(DecodeError::MalformedPayload));
    }
}
