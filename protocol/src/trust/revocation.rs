//! Signed revocation lists (spec §15.5).

use alloc::vec::Vec;

use serde::{Deserialize, Deserializer, Serialize};

use super::{
    bounded, encode_body, split_signed, CaPublicKey, CaSigningKey, Field, IssuerId, TrustError,
    MAX_REVOCATION_LIST_LEN, MAX_REVOKED_KEYS, MAX_REVOKED_SERIALS, REVOCATION_LIST_SIGNATURE_CONTEXT,
    REVOCATION_LIST_VERSION, SIGNATURE_LEN,
};

/// One revoked certificate: its issuer and serial (spec §15.5). Ordered by issuer, then
/// serial.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RevokedSerial {
    /// The issuer id of the certificate's issuer (an anchor or an intermediate).
    pub issuer: IssuerId,
    /// The certificate's serial.
    pub serial: u64,
}

/// What a revocation list says (spec §15.5). Field order is the wire order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationListBody {
    /// Always [`REVOCATION_LIST_VERSION`].
    pub version: u8,
    /// The issuer id of the trust anchor that signs the list.
    pub issuer: IssuerId,
    /// Strictly increasing per issuer.
    pub epoch: u64,
    /// Unix time of signing.
    pub issued_at: u64,
    /// Revoked certificates, strictly ascending, at most [`MAX_REVOKED_SERIALS`].
    #[serde(deserialize_with = "de_serials")]
    pub serials: Vec<RevokedSerial>,
    /// Revoked subject keys (node, intermediate or anchor keys), strictly ascending, at most
    /// [`MAX_REVOKED_KEYS`].
    #[serde(deserialize_with = "de_keys")]
    pub keys: Vec<[u8; 32]>,
}

fn de_serials<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<RevokedSerial>, D::Error> {
    bounded::vec::<D, RevokedSerial, MAX_REVOKED_SERIALS>(d)
}

fn de_keys<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<[u8; 32]>, D::Error> {
    // A claimed count is trusted for at most 64 keys (2 KiB) of preallocation.
    bounded::vec::<D, [u8; 32], 64>(d)
}

impl RevocationListBody {
    /// An empty list of `issuer` at `epoch`.
    #[must_use]
    pub const fn new(issuer: IssuerId, epoch: u64, issued_at: u64) -> Self {
        Self { version: REVOCATION_LIST_VERSION, issuer, epoch, issued_at, serials: Vec::new(), keys: Vec::new() }
    }

    /// Sorts and deduplicates both lists, as the encoding requires.
    pub fn normalize(&mut self) {
        self.serials.sort_unstable();
        self.serials.dedup();
        self.keys.sort_unstable();
        self.keys.dedup();
    }

    /// Checks the version and the field rules of spec §15.5.
    ///
    /// # Errors
    /// [`TrustError::UnsupportedVersion`] or [`TrustError::InvalidField`].
    pub fn validate(&self) -> Result<(), TrustError> {
        if self.version != REVOCATION_LIST_VERSION {
            return Err(TrustError::UnsupportedVersion(self.version));
        }
        if self.serials.len() > MAX_REVOKED_SERIALS || !self.serials.windows(2).all(|w| w[0] < w[1]) {
            return Err(TrustError::InvalidField(Field::Serials));
        }
        if self.keys.len() > MAX_REVOKED_KEYS || !self.keys.windows(2).all(|w| w[0] < w[1]) {
            return Err(TrustError::InvalidField(Field::Keys));
        }
        Ok(())
    }

    /// Whether the certificate `serial` of `issuer` is listed.
    #[must_use]
    pub fn lists_serial(&self, issuer: IssuerId, serial: u64) -> bool {
        self.serials.binary_search(&RevokedSerial { issuer, serial }).is_ok()
    }

    /// Whether `key` is listed.
    #[must_use]
    pub fn lists_key(&self, key: &[u8; 32]) -> bool {
        self.keys.binary_search(key).is_ok()
    }
}

/// A signed revocation list (spec §15.5).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RevocationList {
    body: RevocationListBody,
    signature: [u8; SIGNATURE_LEN],
    encoding: Vec<u8>,
}

impl RevocationList {
    /// Signs `body` with the anchor key `key`. The body's `issuer` should be
    /// `key.issuer_id()`; it is signed as given.
    ///
    /// # Errors
    /// The field rules ([`RevocationListBody::validate`]; call
    /// [`RevocationListBody::normalize`] first), [`TrustError::TooLong`].
    pub fn sign(body: RevocationListBody, key: &CaSigningKey) -> Result<Self, TrustError> {
        body.validate()?;
        let mut encoding = encode_body(&body, MAX_REVOCATION_LIST_LEN)?;
        let signature = key.sign(REVOCATION_LIST_SIGNATURE_CONTEXT, &encoding);
        encoding.extend_from_slice(&signature);
        Ok(Self { body, signature, encoding })
    }

    /// Decodes a list (spec §15.5). Checks no signature and no epoch.
    ///
    /// # Errors
    /// [`TrustError::TooLong`], [`TrustError::Malformed`], [`TrustError::UnsupportedVersion`],
    /// [`TrustError::InvalidField`], [`TrustError::NonCanonical`].
    pub fn decode(bytes: &[u8]) -> Result<Self, TrustError> {
        if bytes.len() > MAX_REVOCATION_LIST_LEN {
            return Err(TrustError::TooLong);
        }
        let &version = bytes.first().ok_or(TrustError::Malformed)?;
        if bytes.len() <= SIGNATURE_LEN {
            return Err(TrustError::Malformed);
        }
        if version != REVOCATION_LIST_VERSION {
            return Err(TrustError::UnsupportedVersion(version));
        }
        let (body, body_bytes, signature) = split_signed::<RevocationListBody>(bytes)?;
        body.validate()?;
        let again = postcard::to_allocvec(&body).map_err(|_| TrustError::Malformed)?;
        if again != body_bytes {
            return Err(TrustError::NonCanonical);
        }
        Ok(Self { body, signature, encoding: bytes.to_vec() })
    }

    /// The signed fields.
    #[must_use]
    pub const fn body(&self) -> &RevocationListBody {
        &self.body
    }

    /// The anchor's signature.
    #[must_use]
    pub const fn signature(&self) -> &[u8; SIGNATURE_LEN] {
        &self.signature
    }

    /// The exact encoding (body, then signature).
    #[must_use]
    pub fn encoding(&self) -> &[u8] {
        &self.encoding
    }

    /// Verifies the signature strictly with the anchor's key.
    ///
    /// # Errors
    /// [`TrustError::BadSignature`].
    pub fn verify_signature(&self, issuer: &CaPublicKey) -> Result<(), TrustError> {
        let body = &self.encoding[..self.encoding.len() - SIGNATURE_LEN];
        issuer.verify(REVOCATION_LIST_SIGNATURE_CONTEXT, body, &self.signature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn round_trip_lookup_and_rules() {
        let ca = CaSigningKey::from_seed([4; 32]);
        let mut body = RevocationListBody::new(ca.issuer_id(), 3, 1_700_000_000);
        body.serials = vec![
            RevokedSerial { issuer: IssuerId([2; 16]), serial: 9 },
            RevokedSerial { issuer: IssuerId([1; 16]), serial: 7 },
            RevokedSerial { issuer: IssuerId([1; 16]), serial: 7 },
        ];
        body.keys = vec![[9; 32], [1; 32]];
        assert_eq!(RevocationList::sign(body.clone(), &ca), Err(TrustError::InvalidField(Field::Serials)));
        body.normalize();
        let list = RevocationList::sign(body, &ca).unwrap();
        let back = RevocationList::decode(list.encoding()).unwrap();
        assert_eq!(back, list);
        back.verify_signature(&ca.verifying_key()).unwrap();
        assert!(back.body().lists_serial(IssuerId([1; 16]), 7));
        assert!(!back.body().lists_serial(IssuerId([2; 16]), 7));
        assert!(back.body().lists_key(&[9; 32]));
        assert!(!back.body().lists_key(&[8; 32]));
        let other = CaSigningKey::from_seed([5; 32]);
        assert_eq!(back.verify_signature(&other.verifying_key()), Err(TrustError::BadSignature));
    }

    #[test]
    fn limits() {
        let ca = CaSigningKey::from_seed([4; 32]);
        let mut body = RevocationListBody::new(ca.issuer_id(), 1, 0);
        body.keys = (0..=MAX_REVOKED_KEYS)
            .map(|i| {
                let mut k = [0u8; 32];
                k[..8].copy_from_slice(&(i as u64).to_be_bytes());
                k
            })
            .collect();
        assert_eq!(RevocationList::sign(body.clone(), &ca), Err(TrustError::InvalidField(Field::Keys)));
        body.keys.pop();
        body.serials = (0..MAX_REVOKED_SERIALS as u64)
            .map(|serial| RevokedSerial { issuer: IssuerId([0xff; 16]), serial: u64::MAX - serial })
            .collect();
        body.normalize();
        let largest = RevocationList::sign(body, &ca).unwrap();
        assert!(largest.encoding().len() <= 43_113, "{}", largest.encoding().len());
        assert_eq!(RevocationList::decode(&vec![1; MAX_REVOCATION_LIST_LEN + 1]), Err(TrustError::TooLong));
        assert_eq!(RevocationList::decode(&[1; 64]), Err(TrustError::Malformed));
        assert_eq!(RevocationList::decode(&[2; 100]), Err(TrustError::UnsupportedVersion(2)));
    }

    #[test]
    fn a_huge_claimed_count_does_not_preallocate() {
        // version, issuer, epoch, issued_at, then a serial count of 2^32 − 1 and nothing.
        let mut bytes = vec![1u8];
        bytes.extend_from_slice(&[0; 16]);
        bytes.extend_from_slice(&[1, 0, 0xff, 0xff, 0xff, 0xff, 0x0f]);
        bytes.extend_from_slice(&[0; 64]);
        assert_eq!(RevocationList::decode(&bytes), Err(TrustError::Malformed));
    }
}
