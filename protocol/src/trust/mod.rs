//! Trust (spec §15): node ids, fleet-CA certificates and chains, signed revocation lists,
//! and the allow/deny check of a peer (allowlist or fleet CA).
//!
//! The check that the authorization decision of spec §5.5 needs is [`Trust::check`] (or
//! [`TrustStore::verify`] in fleet-CA mode): give it the peer's Noise static key, the
//! `certificate` bytes of its handshake payload, the time if known and the roles expected
//! from this peer; it returns who the peer is, or a [`TrustError`] whose
//! [`reject_reason`](TrustError::reject_reason) and [`close_reason`](TrustError::close_reason)
//! say what to tell the peer.
//!
//! ```
//! use veil_protocol::trust::{
//!     CaSigningKey, CertRole, Certificate, CertificateBody, CertificateChain, RoleSet, TrustStore, UnixTime,
//! };
//! # use veil_protocol::StaticKeypair;
//! let ca = CaSigningKey::from_seed([9; 32]);
//! let device = StaticKeypair::from_secret_bytes([1; 32]);
//! let body = CertificateBody {
//!     name: "sensor-17".into(),
//!     groups: vec!["building-a".into()],
//!     ..CertificateBody::new(*device.public().as_bytes(), "", CertRole::Device, 1_700_000_000, 1_800_000_000, 1, ca.issuer_id())
//! };
//! let chain = CertificateChain::new(vec![Certificate::sign(body, &ca)?])?.encode()?;
//!
//! // The gateway: one trust anchor, a real-time clock.
//! let store = TrustStore::new([ca.verifying_key()])?.require_time(true);
//! let peer = store.verify(device.public(), Some(&chain), Some(UnixTime::from_secs(1_750_000_000)), RoleSet::DEVICE)?;
//! assert_eq!(peer.name, "sensor-17");
//! # Ok::<(), veil_protocol::trust::TrustError>(())
//! ```

mod certificate;
mod error;
mod revocation;
mod store;

use alloc::vec::Vec;
use core::fmt;
use core::marker::PhantomData;

use blake2::{Blake2s256, Digest};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rand_core::CryptoRngCore;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

pub use certificate::{Certificate, CertificateBody, CertificateChain};
pub use error::{Field, TrustError};
pub use revocation::{RevocationList, RevocationListBody, RevokedSerial};
pub use store::{Allowlist, Authorized, RevocationUpdate, Trust, TrustStore, VerifiedPeer};

use crate::crypto::PublicKey;

/// Length of a node id and of an issuer id (spec §15.2).
pub const NODE_ID_LEN: usize = 16;
/// Length of an issuer id (spec §15.2).
pub const ISSUER_ID_LEN: usize = NODE_ID_LEN;
/// The only certificate version (spec §15.3).
pub const CERTIFICATE_VERSION: u8 = 1;
/// The only revocation-list version (spec §15.5).
pub const REVOCATION_LIST_VERSION: u8 = 1;
/// Largest certificate encoding accepted (spec §15.3).
pub const MAX_CERTIFICATE_LEN: usize = 512;
/// Longest certificate name, in bytes (spec §15.3).
pub const MAX_NAME_LEN: usize = 64;
/// Most groups in one certificate (spec §15.3).
pub const MAX_GROUPS: usize = 8;
/// Longest group name, in bytes (spec §15.3).
pub const MAX_GROUP_LEN: usize = 32;
/// Most certificates in a chain: the leaf and at most two intermediates (spec §15.4).
pub const MAX_CHAIN_CERTIFICATES: usize = 3;
/// Largest chain encoding accepted (spec §15.4): fits a handshake payload.
pub const MAX_CHAIN_LEN: usize = 1000;
/// Largest revocation-list encoding accepted (spec §15.5).
pub const MAX_REVOCATION_LIST_LEN: usize = 49_152;
/// Most revoked serials in one list (spec §15.5).
pub const MAX_REVOKED_SERIALS: usize = 1024;
/// Most revoked keys in one list (spec §15.5).
pub const MAX_REVOKED_KEYS: usize = 512;
/// Most trust anchors in a [`TrustStore`] (spec §15.1).
pub const MAX_TRUST_ANCHORS: usize = 8;
/// Default clock-skew tolerance in seconds (spec §15.7).
pub const CLOCK_SKEW_SECS: u64 = 300;
/// Largest configurable clock-skew tolerance in seconds (spec §15.7).
pub const MAX_CLOCK_SKEW_SECS: u64 = 86_400;
/// Length of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// spec §15.2: hash input prefixes; the NUL ends each context string.
const NODE_ID_CONTEXT: &[u8] = b"Veil-v1 node id\0";
const ISSUER_ID_CONTEXT: &[u8] = b"Veil-v1 issuer id\0";
/// spec §15.3, §15.5: what each signature covers before the body.
const CERTIFICATE_SIGNATURE_CONTEXT: &[u8] = b"Veil-v1 certificate\0";
const REVOCATION_LIST_SIGNATURE_CONTEXT: &[u8] = b"Veil-v1 revocation list\0";

fn truncated_hash(context: &[u8], key: &[u8; 32]) -> [u8; NODE_ID_LEN] {
    let digest = Blake2s256::new().chain_update(context).chain_update(key).finalize();
    let mut id = [0u8; NODE_ID_LEN];
    id.copy_from_slice(&digest[..NODE_ID_LEN]);
    id
}

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    bytes.iter().try_for_each(|b| write!(f, "{b:02x}"))
}

/// A node's id: BLAKE2s-256 of its static X25519 public key, domain-separated and truncated
/// to 16 bytes (spec §15.2). Names nodes in routing envelopes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub [u8; NODE_ID_LEN]);

impl NodeId {
    /// The id of the node whose static public key is `key`.
    #[must_use]
    pub fn from_public_key(key: &PublicKey) -> Self {
        Self(truncated_hash(NODE_ID_CONTEXT, key.as_bytes()))
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

/// The id of a signing key (a CA or an intermediate): BLAKE2s-256 of its Ed25519 public
/// key, domain-separated and truncated to 16 bytes (spec §15.2).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct IssuerId(pub [u8; ISSUER_ID_LEN]);

impl IssuerId {
    /// The id of the Ed25519 public key `key` (32 bytes, not necessarily a valid point).
    #[must_use]
    pub fn from_public_key(key: &[u8; 32]) -> Self {
        Self(truncated_hash(ISSUER_ID_CONTEXT, key))
    }
}

impl fmt::Display for IssuerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Debug for IssuerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IssuerId({self})")
    }
}

/// Unix time in seconds (POSIX time, leap seconds not counted), as certificates use it
/// (spec §15). Unlike [`Timestamp`](crate::Timestamp) it has a fixed epoch; the caller
/// supplies it from a real-time clock or from what it learned (spec §15.7).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct UnixTime(u64);

impl UnixTime {
    /// `secs` seconds after 1970-01-01T00:00:00Z.
    #[must_use]
    pub const fn from_secs(secs: u64) -> Self {
        Self(secs)
    }

    /// Seconds since 1970-01-01T00:00:00Z.
    #[must_use]
    pub const fn as_secs(self) -> u64 {
        self.0
    }
}

/// The role a certificate grants (spec §15.3). Encoded as its variant index; append-only.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub enum CertRole {
    /// A perception-layer device.
    Device,
    /// A gateway (relay).
    Gateway,
    /// A cloud service.
    Cloud,
    /// An intermediate CA: its `public_key` is an Ed25519 key that signs certificates.
    Ca,
}

impl CertRole {
    /// Every role, in encoding order.
    pub const ALL: [Self; 4] = [Self::Device, Self::Gateway, Self::Cloud, Self::Ca];

    /// The lowercase name used in tooling and logs.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Device => "device",
            Self::Gateway => "gateway",
            Self::Cloud => "cloud",
            Self::Ca => "ca",
        }
    }

    /// Parses [`CertRole::name`].
    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.name() == name)
    }

    const fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl fmt::Display for CertRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of roles: what the local node accepts from a peer (spec §15.6).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct RoleSet(u8);

impl RoleSet {
    /// No role: every certificate is refused with `WrongRole`.
    pub const NONE: Self = Self(0);
    /// Devices only (a gateway's device port).
    pub const DEVICE: Self = Self(CertRole::Device.bit());
    /// Gateways only (the cloud's gateway uplink).
    pub const GATEWAY: Self = Self(CertRole::Gateway.bit());
    /// Cloud services only.
    pub const CLOUD: Self = Self(CertRole::Cloud.bit());
    /// What a device accepts: a gateway or the cloud.
    pub const UPSTREAM: Self = Self(CertRole::Gateway.bit() | CertRole::Cloud.bit());

    /// The set of `roles`. [`CertRole::Ca`] is never accepted as a peer and is ignored.
    #[must_use]
    pub fn of(roles: &[CertRole]) -> Self {
        Self(roles.iter().filter(|r| **r != CertRole::Ca).fold(0, |acc, r| acc | r.bit()))
    }

    /// Whether `role` is in the set.
    #[must_use]
    pub const fn contains(self, role: CertRole) -> bool {
        self.0 & role.bit() != 0
    }

    /// Both sets.
    #[must_use]
    pub const fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    /// The roles in the set, in encoding order.
    pub fn iter(self) -> impl Iterator<Item = CertRole> {
        CertRole::ALL.into_iter().filter(move |r| self.contains(*r))
    }
}

impl fmt::Debug for RoleSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

/// A CA's (or intermediate's) Ed25519 verifying key: a trust anchor (spec §15.1).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct CaPublicKey(VerifyingKey);

impl CaPublicKey {
    /// Parses a 32-byte Ed25519 public key; `None` if it is not a valid point encoding.
    #[must_use]
    pub fn from_bytes(bytes: &[u8; 32]) -> Option<Self> {
        VerifyingKey::from_bytes(bytes).ok().map(Self)
    }

    /// The 32-byte encoding.
    #[must_use]
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The key's issuer id (spec §15.2).
    #[must_use]
    pub fn issuer_id(&self) -> IssuerId {
        IssuerId::from_public_key(self.0.as_bytes())
    }

    /// spec §15.3: strict Ed25519 verification of `context || body`.
    fn verify(&self, context: &[u8], body: &[u8], signature: &[u8; SIGNATURE_LEN]) -> Result<(), TrustError> {
        let msg = signed_message(context, body);
        self.0.verify_strict(&msg, &Signature::from_bytes(signature)).map_err(|_| TrustError::BadSignature)
    }
}

impl fmt::Debug for CaPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CaPublicKey(")?;
        write_hex(f, self.0.as_bytes())?;
        f.write_str(")")
    }
}

/// A CA's (or intermediate's) Ed25519 signing key. Zeroized on drop (ed25519-dalek's
/// `zeroize` feature); its `Debug` shows only the public half.
#[derive(Clone)]
pub struct CaSigningKey(SigningKey);

impl CaSigningKey {
    /// The key with the 32-byte secret seed `seed` (RFC 8032). The caller's copy of the seed
    /// is not zeroized by this call.
    #[must_use]
    pub fn from_seed(seed: [u8; 32]) -> Self {
        let seed = Zeroizing::new(seed);
        Self(SigningKey::from_bytes(&seed))
    }

    /// A fresh key from a cryptographically secure RNG.
    pub fn generate(rng: &mut dyn CryptoRngCore) -> Self {
        let mut seed = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(seed.as_mut());
        Self(SigningKey::from_bytes(&seed))
    }

    /// The secret seed, for storing in a key file.
    #[must_use]
    pub fn seed(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.0.to_bytes())
    }

    /// The public half.
    #[must_use]
    pub fn verifying_key(&self) -> CaPublicKey {
        CaPublicKey(self.0.verifying_key())
    }

    /// The key's issuer id (spec §15.2).
    #[must_use]
    pub fn issuer_id(&self) -> IssuerId {
        self.verifying_key().issuer_id()
    }

    fn sign(&self, context: &[u8], body: &[u8]) -> [u8; SIGNATURE_LEN] {
        self.0.sign(&signed_message(context, body)).to_bytes()
    }
}

impl fmt::Debug for CaSigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CaSigningKey(public: {:?})", self.verifying_key())
    }
}

fn signed_message(context: &[u8], body: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(context.len() + body.len());
    msg.extend_from_slice(context);
    msg.extend_from_slice(body);
    msg
}

/// Splits `body || signature` (spec §15.3, §15.5): decodes the body with postcard and
/// requires exactly [`SIGNATURE_LEN`] bytes after it. Returns the body, its bytes and the
/// signature.
fn split_signed<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<(T, &'a [u8], [u8; SIGNATURE_LEN]), TrustError> {
    let (body, rest): (T, _) = postcard::take_from_bytes(bytes).map_err(|_| TrustError::Malformed)?;
    let signature: [u8; SIGNATURE_LEN] = rest.try_into().map_err(|_| TrustError::Malformed)?;
    let body_bytes = &bytes[..bytes.len() - SIGNATURE_LEN];
    Ok((body, body_bytes, signature))
}

/// Encodes a body, or `TooLong` past `max` (a body that cannot be sent is not signed).
fn encode_body<T: Serialize>(body: &T, max: usize) -> Result<Vec<u8>, TrustError> {
    let bytes = postcard::to_allocvec(body).map_err(|_| TrustError::Malformed)?;
    if bytes.len() + SIGNATURE_LEN > max {
        return Err(TrustError::TooLong);
    }
    Ok(bytes)
}

/// serde helpers for sequences decoded from peer bytes.
mod bounded {
    use super::{fmt, PhantomData, Vec};
    use serde::de::{Deserialize, Deserializer, SeqAccess, Visitor};

    /// Deserializes a `Vec` without trusting its claimed length for preallocation beyond
    /// `CAP` elements: memory grows with the elements actually read, which the input length
    /// bounds. Counts above the spec's limits decode and are refused by the field rules.
    pub(super) fn vec<'de, D, T, const CAP: usize>(d: D) -> Result<Vec<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: Deserialize<'de>,
    {
        struct V<T, const CAP: usize>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>, const CAP: usize> Visitor<'de> for V<T, CAP> {
            type Value = Vec<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a sequence")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(CAP));
                while let Some(item) = seq.next_element()? {
                    out.push(item);
                }
                Ok(out)
            }
        }
        d.deserialize_seq(V::<T, CAP>(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_domain_separated_and_sixteen_bytes() {
        let key = [7u8; 32];
        let node = NodeId::from_public_key(&PublicKey(key));
        let issuer = IssuerId::from_public_key(&key);
        assert_ne!(node.0, issuer.0);
        assert_eq!(alloc::format!("{node}").len(), 32);
        // Independent computation of spec §15.2.
        let mut h = Blake2s256::new();
        h.update(b"Veil-v1 node id");
        h.update([0u8]);
        h.update(key);
        assert_eq!(node.0[..], h.finalize()[..16]);
    }

    #[test]
    fn role_sets_never_hold_ca() {
        assert!(!RoleSet::of(&CertRole::ALL).contains(CertRole::Ca));
        assert!(RoleSet::UPSTREAM.contains(CertRole::Cloud));
        assert!(!RoleSet::UPSTREAM.contains(CertRole::Device));
        assert_eq!(RoleSet::DEVICE.union(RoleSet::CLOUD), RoleSet::of(&[CertRole::Cloud, CertRole::Device]));
        for r in CertRole::ALL {
            assert_eq!(CertRole::from_name(r.name()), Some(r));
        }
    }

    #[test]
    fn signing_key_debug_shows_no_secret() {
        let k = CaSigningKey::from_seed([0x42; 32]);
        let shown = alloc::format!("{k:?}");
        assert!(!shown.contains("4242"), "{shown}");
        assert_eq!(*k.seed(), [0x42; 32]);
    }
}
