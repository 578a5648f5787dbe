//! Negotiated parameters: protocol version, Noise pattern, cipher suite and carrier mode.
//!
//! These are the values named by the cleartext `HANDSHAKE_INIT` header (spec §4.3) and
//! bound into the Noise prologue (spec §5.2).

use core::fmt;

/// The protocol version implemented by this crate (spec §4.3).
pub const PROTOCOL_VERSION: u8 = 1;

/// A Noise handshake pattern supported by Veil (spec §4.3, §5.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Pattern {
    /// `IK`: the initiator knows the responder's static key; one round trip; the
    /// initiator's identity is hidden from passive observers. Veil's default.
    IK,
    /// `XX`: mutual static-key exchange for onboarding when the responder key is unknown.
    XX,
    /// `KK`: both static keys provisioned in advance; the most compact handshake.
    KK,
    /// `IKpsk2`: `IK` plus a pre-shared symmetric key mixed in at the second message.
    IKpsk2,
    /// `XXpsk3`: `XX` plus a pre-shared symmetric key mixed in at the third message.
    XXpsk3,
}

impl Pattern {
    /// All patterns, in code order.
    pub const ALL: [Pattern; 5] = [Self::IK, Self::XX, Self::KK, Self::IKpsk2, Self::XXpsk3];

    /// The wire code (spec §4.3).
    #[must_use]
    pub const fn code(self) -> u8 {
        match self {
            Self::IK => 1,
            Self::XX => 2,
            Self::KK => 3,
            Self::IKpsk2 => 4,
            Self::XXpsk3 => 5,
        }
    }

    /// Parses a wire code; `None` for codes this version does not define.
    #[must_use]
    pub const fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Self::IK),
            2 => Some(Self::XX),
            3 => Some(Self::KK),
            4 => Some(Self::IKpsk2),
            5 => Some(Self::XXpsk3),
            _ => None,
        }
    }

    /// The pattern's name in a Noise protocol name.
    #[must_use]
    pub const fn noise_name(self) -> &'static str {
        match self {
            Self::IK => "IK",
            Self::XX => "XX",
            Self::KK => "KK",
            Self::IKpsk2 => "IKpsk2",
            Self::XXpsk3 => "XXpsk3",
        }
    }

    /// Number of handshake messages (2 or 3).
    #[must_use]
    pub const fn message_count(self) -> usize {
        match self {
            Self::IK | Self::KK | Self::IKpsk2 => 2,
            Self::XX | Self::XXpsk3 => 3,
        }
    }

    /// Whether the initiator must know the responder's static key in advance.
    #[must_use]
    pub const fn initiator_knows_responder(self) -> bool {
        matches!(self, Self::IK | Self::KK | Self::IKpsk2)
    }

    /// Whether the responder must know the initiator's static key in advance.
    #[must_use]
    pub const fn responder_knows_initiator(self) -> bool {
        matches!(self, Self::KK)
    }

    /// The Noise psk modifier position, if any.
    #[must_use]
    pub const fn psk_position(self) -> Option<u8> {
        match self {
            Self::IKpsk2 => Some(2),
            Self::XXpsk3 => Some(3),
            _ => None,
        }
    }

    /// Handshake message index (0-based) after which the responder learns the
    /// initiator's static key and must ask for an authorization decision (spec §5.5).
    #[must_use]
    pub const fn responder_decision_after(self) -> usize {
        match self {
            Self::IK | Self::KK | Self::IKpsk2 => 0,
            Self::XX | Self::XXpsk3 => 2,
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.noise_name())
    }
}

/// A Noise cipher suite supported by Veil (spec §4.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Suite {
    /// `25519_ChaChaPoly_BLAKE2s`: fast in software on 32-bit microcontrollers. Default.
    ChaChaPolyBlake2s,
    /// `25519_AESGCM_SHA256`: for servers with AES instructions.
    AesGcmSha256,
}

impl Suite {
    /// All suites, in code order.
    pub const ALL: [Suite; 2] = [Self::ChaChaPolyBlake2s, Self::AesGcmSha256];

    /// The wire code (spec §4.3).
    #[must_use]
    pub const fn code(self) -> u8 {
        match self {
            Self::ChaChaPolyBlake2s => 1,
            Self::AesGcmSha256 => 2,
        }
    }

    /// Parses a wire code; `None` for codes this version does not define.
    #[must_use]
    pub const fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Self::ChaChaPolyBlake2s),
            2 => Some(Self::AesGcmSha256),
            _ => None,
        }
    }

    /// The suite's part of a Noise protocol name.
    #[must_use]
    pub const fn noise_name(self) -> &'static str {
        match self {
            Self::ChaChaPolyBlake2s => "25519_ChaChaPoly_BLAKE2s",
            Self::AesGcmSha256 => "25519_AESGCM_SHA256",
        }
    }
}

impl fmt::Display for Suite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.noise_name())
    }
}

/// How packets are carried (spec §3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Mode {
    /// Reliable, ordered carrier (TCP): implicit counters, no session indices (spec §3.1).
    Stream,
    /// Lossy, reordering carrier (UDP): session indices, explicit truncated counters and a
    /// replay window (spec §3.2).
    Datagram,
    /// End-to-end sessions inside routing envelopes (spec §16.2): datagram mode whose
    /// transport header has no index (the route identifies the session), and no cookies.
    Routed,
}

impl Mode {
    /// The byte bound into the prologue (spec §5.2).
    #[must_use]
    pub const fn code(self) -> u8 {
        match self {
            Self::Stream => 1,
            Self::Datagram => 2,
            Self::Routed => 3,
        }
    }

    /// Whether the carrier may lose, duplicate and reorder packets (datagram and routed
    /// modes): explicit counters, replay windows, handshake retransmissions and repeats
    /// (spec §5.7.2, §6.3, §16.2).
    #[must_use]
    pub const fn is_lossy(self) -> bool {
        matches!(self, Self::Datagram | Self::Routed)
    }

    /// Whether handshake packets carry session indices (datagram and routed modes, spec §4.2).
    #[must_use]
    pub const fn has_indices(self) -> bool {
        self.is_lossy()
    }
}

/// Writes the Noise protocol name, e.g. `Noise_IK_25519_ChaChaPoly_BLAKE2s` (spec §5.1).
pub(crate) fn noise_params(pattern: Pattern, suite: Suite) -> alloc::string::String {
    let mut s = alloc::string::String::with_capacity(48);
    s.push_str("Noise_");
    s.push_str(pattern.noise_name());
    s.push('_');
    s.push_str(suite.noise_name());
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for p in Pattern::ALL {
            assert_eq!(Pattern::from_code(p.code()), Some(p));
        }
        for s in Suite::ALL {
            assert_eq!(Suite::from_code(s.code()), Some(s));
        }
        assert_eq!(Pattern::from_code(0), None);
        assert_eq!(Pattern::from_code(6), None);
        assert_eq!(Suite::from_code(0), None);
        assert_eq!(Suite::from_code(3), None);
        // spec §5.2: every mode has its own prologue byte.
        assert_eq!([Mode::Stream.code(), Mode::Datagram.code(), Mode::Routed.code()], [1, 2, 3]);
        assert!(!Mode::Stream.is_lossy() && Mode::Datagram.is_lossy() && Mode::Routed.is_lossy());
    }

    #[test]
    fn every_combination_parses_in_snow() {
        for p in Pattern::ALL {
            for s in Suite::ALL {
                let name = noise_params(p, s);
                assert!(name.parse::<snow::params::NoiseParams>().is_ok(), "{name}");
            }
        }
    }
}
