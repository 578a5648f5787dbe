//! The trust layer's error type (spec §15.9).

use core::fmt;

use super::CertRole;
use crate::error::DenyReason;
use crate::message::CloseReason;
use crate::wire::RejectReason;

/// A field rule of spec §15.3 or §15.5 that an input broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Field {
    /// The certificate name: 1..=64 bytes of UTF-8 without control characters.
    Name,
    /// The certificate groups: count, lengths, characters, order, or present on a ca.
    Groups,
    /// The certificate validity: `not_before > not_after`.
    Validity,
    /// The revoked serials of a revocation list: count or order.
    Serials,
    /// The revoked keys of a revocation list: count or order.
    Keys,
}

/// Why a certificate, chain, revocation list or peer was refused (spec §15.9).
///
/// Detailed, for local logs. What a peer learns is coarse: [`TrustError::reject_reason`] and
/// [`TrustError::close_reason`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TrustError {
    /// The input is longer than its maximum (spec §15.11); checked before decoding.
    TooLong,
    /// postcard decoding failed, the input is truncated, has trailing bytes, or lacks its
    /// 64-byte signature.
    Malformed,
    /// The version byte is not 1.
    UnsupportedVersion(u8),
    /// A field rule was broken.
    InvalidField(Field),
    /// The input is not the canonical encoding of what it decodes to (spec §15.3).
    NonCanonical,
    /// Fleet-CA mode, and the peer sent no certificate chain.
    CertificateMissing,
    /// The chain has no or too many certificates, an intermediate is not of role ca, or an
    /// issuer link is broken (spec §15.6 step 3).
    InvalidChain,
    /// The leaf certificate's key is not the peer's Noise static key.
    KeyMismatch,
    /// The leaf certificate's role (shown) is not one the local node expects from this peer.
    WrongRole(CertRole),
    /// The chain is not rooted in a trust anchor, or a revocation list names an issuer that is
    /// not a trust anchor.
    UnknownIssuer,
    /// A signature failed strict verification, or an intermediate's key is not a valid
    /// Ed25519 key.
    BadSignature,
    /// A trust anchor or intermediate of the chain is revoked.
    RevokedCa,
    /// The leaf certificate's serial is revoked.
    RevokedSerial,
    /// The leaf certificate's key is revoked.
    RevokedKey,
    /// A certificate of the chain is not valid yet.
    NotYetValid,
    /// A certificate of the chain has expired.
    Expired,
    /// The local policy requires a time (gateways, cloud: spec §15.7) and none was given.
    NoTime,
    /// Allowlist mode: the peer's key is not listed.
    NotAllowed,
    /// A revocation list's epoch is not above the one held for its issuer.
    StaleRevocationList {
        /// The epoch held.
        current: u64,
        /// The epoch offered.
        received: u64,
    },
    /// More trust anchors than `MAX_TRUST_ANCHORS` were configured (a local error).
    TooManyAnchors,
}

impl TrustError {
    /// Whether the error is a revocation (spec §15.5).
    #[must_use]
    pub const fn is_revocation(self) -> bool {
        matches!(self, Self::RevokedCa | Self::RevokedSerial | Self::RevokedKey)
    }

    /// The reason of the authorization decision that denies a peer for this error (spec
    /// §5.5, §15.9): `Decision::Deny(error.deny_reason())`. Its REJECT and close reasons are
    /// [`TrustError::reject_reason`] and [`TrustError::close_reason`].
    #[must_use]
    pub const fn deny_reason(self) -> DenyReason {
        match self {
            Self::RevokedCa | Self::RevokedSerial | Self::RevokedKey => DenyReason::Revoked,
            Self::WrongRole(_) | Self::NoTime | Self::NotAllowed | Self::TooManyAnchors => DenyReason::Unauthorized,
            _ => DenyReason::BadCertificate,
        }
    }

    /// The REJECT reason a stream-mode responder sends when it denies an initiator for this
    /// error (spec §15.9, §5.8).
    #[must_use]
    pub const fn reject_reason(self) -> RejectReason {
        self.deny_reason().reject_reason()
    }

    /// The close reason for a live session whose peer fails a re-check with this error
    /// (spec §15.8, §9.3).
    #[must_use]
    pub const fn close_reason(self) -> CloseReason {
        self.deny_reason().close_reason()
    }
}

impl From<TrustError> for DenyReason {
    fn from(e: TrustError) -> Self {
        e.deny_reason()
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Name => "name (1 to 64 bytes of UTF-8 without control characters)",
            Self::Groups => "groups (at most 8, each 1 to 32 bytes, strictly ascending, none on a ca)",
            Self::Validity => "validity (not_before after not_after)",
            Self::Serials => "revoked serials (at most 1024, strictly ascending)",
            Self::Keys => "revoked keys (at most 512, strictly ascending)",
        })
    }
}

impl fmt::Display for TrustError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLong => f.write_str("longer than its maximum size"),
            Self::Malformed => f.write_str("malformed encoding"),
            Self::UnsupportedVersion(v) => write!(f, "unsupported version {v}"),
            Self::InvalidField(field) => write!(f, "invalid field: {field}"),
            Self::NonCanonical => f.write_str("not in canonical encoding"),
            Self::CertificateMissing => f.write_str("peer sent no certificate"),
            Self::InvalidChain => f.write_str("invalid certificate chain"),
            Self::KeyMismatch => f.write_str("certificate key differs from the peer's static key"),
            Self::WrongRole(r) => write!(f, "certificate role {r} not accepted here"),
            Self::UnknownIssuer => f.write_str("issuer is not a trust anchor"),
            Self::BadSignature => f.write_str("signature verification failed"),
            Self::RevokedCa => f.write_str("issuing CA revoked"),
            Self::RevokedSerial => f.write_str("certificate revoked"),
            Self::RevokedKey => f.write_str("key revoked"),
            Self::NotYetValid => f.write_str("certificate not yet valid"),
            Self::Expired => f.write_str("certificate expired"),
            Self::NoTime => f.write_str("no time available to check validity"),
            Self::NotAllowed => f.write_str("key not in the allowlist"),
            Self::StaleRevocationList { current, received } => {
                write!(f, "stale revocation list: epoch {received} is not above the current {current}")
            }
            Self::TooManyAnchors => f.write_str("too many trust anchors"),
        }
    }
}

impl core::error::Error for TrustError {}
