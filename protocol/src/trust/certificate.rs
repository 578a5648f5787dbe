//! Certificates and certificate chains (spec §15.3, §15.4).

use alloc::string::String;
use alloc::vec::Vec;

use serde::{Deserialize, Deserializer, Serialize};

use super::{
    bounded, encode_body, split_signed, CaPublicKey, CaSigningKey, CertRole, Field, IssuerId, TrustError, UnixTime,
    CERTIFICATE_SIGNATURE_CONTEXT, CERTIFICATE_VERSION, MAX_CERTIFICATE_LEN, MAX_CHAIN_CERTIFICATES, MAX_CHAIN_LEN,
    MAX_GROUPS, MAX_GROUP_LEN, MAX_NAME_LEN, SIGNATURE_LEN,
};

/// What a certificate binds (spec §15.3). Field order is the wire order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateBody {
    /// Always [`CERTIFICATE_VERSION`].
    pub version: u8,
    /// The subject key: the node's X25519 static key, or an intermediate's Ed25519 key
    /// (role [`CertRole::Ca`]).
    pub public_key: [u8; 32],
    /// 1..=64 bytes of UTF-8 without control characters.
    pub name: String,
    /// What the subject may act as.
    pub role: CertRole,
    /// 0..=8 group names, 1..=32 bytes each, strictly ascending; none on a ca.
    #[serde(deserialize_with = "de_groups")]
    pub groups: Vec<String>,
    /// First valid second (Unix time).
    pub not_before: u64,
    /// Last valid second (Unix time); not before `not_before`.
    pub not_after: u64,
    /// The issuer's serial number of this certificate.
    pub serial: u64,
    /// The issuer id of the signing key.
    pub issuer: IssuerId,
}

fn de_groups<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    bounded::vec::<D, String, MAX_GROUPS>(d)
}

/// spec §15.3: a name or group name.
pub(super) fn valid_text(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && !s.chars().any(char::is_control)
}

impl CertificateBody {
    /// A body with no groups, issued by `issuer` (the id of the key that will sign it).
    #[must_use]
    pub fn new(
        public_key: [u8; 32],
        name: impl Into<String>,
        role: CertRole,
        not_before: u64,
        not_after: u64,
        serial: u64,
        issuer: IssuerId,
    ) -> Self {
        Self {
            version: CERTIFICATE_VERSION,
            public_key,
            name: name.into(),
            role,
            groups: Vec::new(),
            not_before,
            not_after,
            serial,
            issuer,
        }
    }

    /// Checks the version and the field rules of spec §15.3.
    ///
    /// # Errors
    /// [`TrustError::UnsupportedVersion`] or [`TrustError::InvalidField`].
    pub fn validate(&self) -> Result<(), TrustError> {
        if self.version != CERTIFICATE_VERSION {
            return Err(TrustError::UnsupportedVersion(self.version));
        }
        if !valid_text(&self.name, MAX_NAME_LEN) {
            return Err(TrustError::InvalidField(Field::Name));
        }
        let groups_ok = self.groups.len() <= MAX_GROUPS
            && self.groups.iter().all(|g| valid_text(g, MAX_GROUP_LEN))
            && self.groups.windows(2).all(|w| w[0] < w[1])
            && (self.role != CertRole::Ca || self.groups.is_empty());
        if !groups_ok {
            return Err(TrustError::InvalidField(Field::Groups));
        }
        if self.not_before > self.not_after {
            return Err(TrustError::InvalidField(Field::Validity));
        }
        Ok(())
    }

    /// Whether the body is valid at `t` with `skew` seconds of tolerance (spec §15.7).
    ///
    /// # Errors
    /// [`TrustError::NotYetValid`] or [`TrustError::Expired`].
    pub fn check_validity(&self, t: UnixTime, skew: u64) -> Result<(), TrustError> {
        if t.as_secs().saturating_add(skew) < self.not_before {
            return Err(TrustError::NotYetValid);
        }
        if t.as_secs() > self.not_after.saturating_add(skew) {
            return Err(TrustError::Expired);
        }
        Ok(())
    }
}

/// A signed certificate (spec §15.3): the body, the issuer's signature, and the exact
/// (canonical) encoding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Certificate {
    body: CertificateBody,
    signature: [u8; SIGNATURE_LEN],
    encoding: Vec<u8>,
}

impl Certificate {
    /// Signs `body` with `key`. The body's `issuer` should be `key.issuer_id()`; it is
    /// signed as given.
    ///
    /// # Errors
    /// The field rules ([`CertificateBody::validate`]); [`TrustError::TooLong`] above
    /// [`MAX_CERTIFICATE_LEN`].
    pub fn sign(body: CertificateBody, key: &CaSigningKey) -> Result<Self, TrustError> {
        body.validate()?;
        let mut encoding = encode_body(&body, MAX_CERTIFICATE_LEN)?;
        let signature = key.sign(CERTIFICATE_SIGNATURE_CONTEXT, &encoding);
        encoding.extend_from_slice(&signature);
        Ok(Self { body, signature, encoding })
    }

    /// Decodes a certificate (spec §15.3 steps 1–5). Checks no signature.
    ///
    /// # Errors
    /// [`TrustError::TooLong`], [`TrustError::Malformed`], [`TrustError::UnsupportedVersion`],
    /// [`TrustError::InvalidField`], [`TrustError::NonCanonical`].
    pub fn decode(bytes: &[u8]) -> Result<Self, TrustError> {
        if bytes.len() > MAX_CERTIFICATE_LEN {
            return Err(TrustError::TooLong);
        }
        let &version = bytes.first().ok_or(TrustError::Malformed)?;
        if bytes.len() <= SIGNATURE_LEN {
            return Err(TrustError::Malformed);
        }
        if version != CERTIFICATE_VERSION {
            return Err(TrustError::UnsupportedVersion(version));
        }
        let (body, body_bytes, signature) = split_signed::<CertificateBody>(bytes)?;
        body.validate()?;
        // spec §15.3 step 5: exactly one encoding is accepted.
        let again = postcard::to_allocvec(&body).map_err(|_| TrustError::Malformed)?;
        if again != body_bytes {
            return Err(TrustError::NonCanonical);
        }
        Ok(Self { body, signature, encoding: bytes.to_vec() })
    }

    /// The signed fields.
    #[must_use]
    pub const fn body(&self) -> &CertificateBody {
        &self.body
    }

    /// The issuer's signature.
    #[must_use]
    pub const fn signature(&self) -> &[u8; SIGNATURE_LEN] {
        &self.signature
    }

    /// The exact encoding (body, then signature).
    #[must_use]
    pub fn encoding(&self) -> &[u8] {
        &self.encoding
    }

    /// The encoded body, as signed.
    #[must_use]
    pub fn body_encoding(&self) -> &[u8] {
        &self.encoding[..self.encoding.len() - SIGNATURE_LEN]
    }

    /// Verifies the signature strictly with the issuer's key (spec §15.3).
    ///
    /// # Errors
    /// [`TrustError::BadSignature`].
    pub fn verify_signature(&self, issuer: &CaPublicKey) -> Result<(), TrustError> {
        issuer.verify(CERTIFICATE_SIGNATURE_CONTEXT, self.body_encoding(), &self.signature)
    }

    /// The subject key as a signing key, for an intermediate (role ca).
    ///
    /// # Errors
    /// [`TrustError::InvalidChain`] if the role is not ca, [`TrustError::BadSignature`] if the
    /// key is not a valid Ed25519 key (spec §15.6 step 7).
    pub fn ca_key(&self) -> Result<CaPublicKey, TrustError> {
        if self.body.role != CertRole::Ca {
            return Err(TrustError::InvalidChain);
        }
        CaPublicKey::from_bytes(&self.body.public_key).ok_or(TrustError::BadSignature)
    }

    /// The issuer id of the subject key (meaningful for an intermediate).
    #[must_use]
    pub fn subject_issuer_id(&self) -> IssuerId {
        IssuerId::from_public_key(&self.body.public_key)
    }
}

/// A certificate chain as carried in the handshake payload (spec §15.4): the leaf first,
/// then intermediates toward the trust anchor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateChain {
    certificates: Vec<Certificate>,
}

impl CertificateChain {
    /// A chain of `certificates`, leaf first.
    ///
    /// # Errors
    /// [`TrustError::InvalidChain`] for no or more than [`MAX_CHAIN_CERTIFICATES`]
    /// certificates, [`TrustError::TooLong`] if the encoding exceeds [`MAX_CHAIN_LEN`].
    pub fn new(certificates: Vec<Certificate>) -> Result<Self, TrustError> {
        if certificates.is_empty() || certificates.len() > MAX_CHAIN_CERTIFICATES {
            return Err(TrustError::InvalidChain);
        }
        let chain = Self { certificates };
        chain.encode()?;
        Ok(chain)
    }

    /// The encoding: postcard `Vec<Vec<u8>>` (spec §15.4).
    ///
    /// # Errors
    /// [`TrustError::TooLong`] above [`MAX_CHAIN_LEN`].
    pub fn encode(&self) -> Result<Vec<u8>, TrustError> {
        let parts: Vec<&[u8]> = self.certificates.iter().map(Certificate::encoding).collect();
        let bytes = postcard::to_allocvec(&parts).map_err(|_| TrustError::Malformed)?;
        if bytes.len() > MAX_CHAIN_LEN {
            return Err(TrustError::TooLong);
        }
        Ok(bytes)
    }

    /// Decodes a chain and each of its certificates (spec §15.4). Checks no signature.
    ///
    /// # Errors
    /// [`TrustError::TooLong`], [`TrustError::Malformed`], [`TrustError::InvalidChain`],
    /// [`TrustError::NonCanonical`], and the errors of [`Certificate::decode`].
    pub fn decode(bytes: &[u8]) -> Result<Self, TrustError> {
        if bytes.len() > MAX_CHAIN_LEN {
            return Err(TrustError::TooLong);
        }
        let (count, mut rest): (u32, _) = postcard::take_from_bytes(bytes).map_err(|_| TrustError::Malformed)?;
        let count = usize::try_from(count).map_err(|_| TrustError::InvalidChain)?;
        if count == 0 || count > MAX_CHAIN_CERTIFICATES {
            return Err(TrustError::InvalidChain);
        }
        let mut certificates = Vec::with_capacity(count);
        for _ in 0..count {
            let (cert, tail): (&[u8], _) = postcard::take_from_bytes(rest).map_err(|_| TrustError::Malformed)?;
            rest = tail;
            certificates.push(Certificate::decode(cert)?);
        }
        if !rest.is_empty() {
            return Err(TrustError::Malformed);
        }
        let chain = Self { certificates };
        if chain.encode()? != bytes {
            return Err(TrustError::NonCanonical);
        }
        Ok(chain)
    }

    /// The leaf certificate (the sender's own).
    #[must_use]
    pub fn leaf(&self) -> &Certificate {
        // `new` and `decode` never build an empty chain.
        &self.certificates[0]
    }

    /// All certificates, leaf first.
    #[must_use]
    pub fn certificates(&self) -> &[Certificate] {
        &self.certificates
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn ca() -> CaSigningKey {
        CaSigningKey::from_seed([3; 32])
    }

    fn body() -> CertificateBody {
        CertificateBody {
            groups: vec!["a".into(), "b".into()],
            ..CertificateBody::new([5; 32], "node", CertRole::Device, 10, 20, 300, ca().issuer_id())
        }
    }

    #[test]
    fn sign_decode_round_trip() {
        let c = Certificate::sign(body(), &ca()).unwrap();
        let d = Certificate::decode(c.encoding()).unwrap();
        assert_eq!(c, d);
        d.verify_signature(&ca().verifying_key()).unwrap();
        assert_eq!(d.body_encoding().len() + SIGNATURE_LEN, d.encoding().len());
    }

    #[test]
    fn field_rules() {
        let bad = [
            (CertificateBody { name: String::new(), ..body() }, Field::Name),
            (CertificateBody { name: "x".repeat(65), ..body() }, Field::Name),
            (CertificateBody { name: "a\nb".into(), ..body() }, Field::Name),
            (CertificateBody { groups: vec!["b".into(), "a".into()], ..body() }, Field::Groups),
            (CertificateBody { groups: vec!["a".into(), "a".into()], ..body() }, Field::Groups),
            (CertificateBody { groups: (0..9).map(|i| alloc::format!("g{i}")).collect(), ..body() }, Field::Groups),
            (CertificateBody { groups: vec!["x".repeat(33)], ..body() }, Field::Groups),
            (CertificateBody { role: CertRole::Ca, ..body() }, Field::Groups),
            (CertificateBody { not_before: 21, ..body() }, Field::Validity),
        ];
        for (b, field) in bad {
            assert_eq!(Certificate::sign(b, &ca()), Err(TrustError::InvalidField(field)));
        }
        assert_eq!(
            Certificate::sign(CertificateBody { version: 2, ..body() }, &ca()),
            Err(TrustError::UnsupportedVersion(2))
        );
        let longest = CertificateBody {
            name: "n".repeat(MAX_NAME_LEN),
            groups: (0..8).map(|i| alloc::format!("{i}").repeat(MAX_GROUP_LEN)).collect(),
            not_before: u64::MAX - 1,
            not_after: u64::MAX,
            serial: u64::MAX,
            ..body()
        };
        // spec §15.3: the largest certificate is 474 bytes.
        assert_eq!(Certificate::sign(longest, &ca()).unwrap().encoding().len(), 474);
    }

    #[test]
    fn validity_window_with_skew() {
        let b = body(); // 10..=20
        assert_eq!(b.check_validity(UnixTime::from_secs(9), 0), Err(TrustError::NotYetValid));
        assert_eq!(b.check_validity(UnixTime::from_secs(9), 1), Ok(()));
        assert_eq!(b.check_validity(UnixTime::from_secs(21), 0), Err(TrustError::Expired));
        assert_eq!(b.check_validity(UnixTime::from_secs(21), 1), Ok(()));
        let forever = CertificateBody { not_after: u64::MAX, ..body() };
        assert_eq!(forever.check_validity(UnixTime::from_secs(u64::MAX), u64::MAX), Ok(()));
    }

    #[test]
    fn overlong_varint_is_non_canonical() {
        let c = Certificate::sign(body(), &ca()).unwrap();
        // The serial (300) is the varint ac 02 just before the issuer id; pad it to ac 82 00.
        let enc = c.encoding();
        let at = enc.len() - SIGNATURE_LEN - 16 - 2;
        assert_eq!(&enc[at..at + 2], &[0xac, 0x02]);
        let mut bad = enc[..at].to_vec();
        bad.extend_from_slice(&[0xac, 0x82, 0x00]);
        bad.extend_from_slice(&enc[at + 2..]);
        assert_eq!(Certificate::decode(&bad), Err(TrustError::NonCanonical));
    }

    #[test]
    fn chain_round_trip_and_limits() {
        let c = Certificate::sign(body(), &ca()).unwrap();
        let chain = CertificateChain::new(vec![c.clone(), c.clone()]).unwrap();
        let bytes = chain.encode().unwrap();
        assert_eq!(CertificateChain::decode(&bytes).unwrap(), chain);
        assert_eq!(CertificateChain::new(vec![]), Err(TrustError::InvalidChain));
        assert_eq!(CertificateChain::new(vec![c.clone(); 4]), Err(TrustError::InvalidChain));
        assert_eq!(CertificateChain::decode(&[0]), Err(TrustError::InvalidChain));
        assert_eq!(CertificateChain::decode(&[4]), Err(TrustError::InvalidChain));
        assert_eq!(CertificateChain::decode(&[]), Err(TrustError::Malformed));
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert_eq!(CertificateChain::decode(&trailing), Err(TrustError::Malformed));
        assert_eq!(CertificateChain::decode(&vec![1; MAX_CHAIN_LEN + 1]), Err(TrustError::TooLong));
    }
}
