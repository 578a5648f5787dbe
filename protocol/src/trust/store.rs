//! The allow/deny check of a peer (spec §15.1, §15.6) and the trust state behind it.

use alloc::string::String;
use alloc::vec::Vec;

use subtle::ConstantTimeEq;

use super::{
    certificate::valid_text, CaPublicKey, CertRole, Certificate, CertificateChain, IssuerId, NodeId, RevocationList,
    RoleSet, TrustError, UnixTime, CLOCK_SKEW_SECS, MAX_CLOCK_SKEW_SECS, MAX_NAME_LEN, MAX_TRUST_ANCHORS,
};
use crate::crypto::PublicKey;

/// A peer that passed fleet-CA verification (spec §15.6).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedPeer {
    /// The node id of the peer's static key.
    pub node_id: NodeId,
    /// The leaf certificate's name.
    pub name: String,
    /// The leaf certificate's role (never [`CertRole::Ca`]).
    pub role: CertRole,
    /// The leaf certificate's groups.
    pub groups: Vec<String>,
    /// The leaf certificate's serial.
    pub serial: u64,
    /// The leaf certificate's issuer.
    pub issuer: IssuerId,
    /// The smallest `not_after` of the chain: when the peer must be checked again.
    pub valid_until: UnixTime,
}

/// What a verified revocation list changed (spec §15.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RevocationUpdate {
    /// The anchor that signed it.
    pub issuer: IssuerId,
    /// The epoch held before, if any.
    pub previous_epoch: Option<u64>,
    /// The new epoch.
    pub epoch: u64,
}

#[derive(Clone, Debug)]
struct Anchor {
    key: CaPublicKey,
    id: IssuerId,
    list: Option<RevocationList>,
}

/// Fleet-CA trust state (spec §15.1): trust anchors, the newest revocation list of each,
/// the clock-skew tolerance and the time floor (spec §15.7).
#[derive(Clone, Debug)]
pub struct TrustStore {
    anchors: Vec<Anchor>,
    skew: u64,
    require_time: bool,
    floor: Option<UnixTime>,
}

impl TrustStore {
    /// A store trusting `anchors`, with no revocation list yet, the default skew
    /// ([`CLOCK_SKEW_SECS`]) and no time required. Duplicate anchors are kept once.
    ///
    /// # Errors
    /// [`TrustError::TooManyAnchors`] above [`MAX_TRUST_ANCHORS`].
    pub fn new(anchors: impl IntoIterator<Item = CaPublicKey>) -> Result<Self, TrustError> {
        let mut list: Vec<Anchor> = Vec::new();
        for key in anchors {
            let id = key.issuer_id();
            if list.iter().any(|a| a.id == id) {
                continue;
            }
            if list.len() == MAX_TRUST_ANCHORS {
                return Err(TrustError::TooManyAnchors);
            }
            list.push(Anchor { key, id, list: None });
        }
        Ok(Self { anchors: list, skew: CLOCK_SKEW_SECS, require_time: false, floor: None })
    }

    /// Sets the clock-skew tolerance (spec §15.7), capped at [`MAX_CLOCK_SKEW_SECS`].
    #[must_use]
    pub fn with_clock_skew(mut self, secs: u64) -> Self {
        self.skew = secs.min(MAX_CLOCK_SKEW_SECS);
        self
    }

    /// Gateways and cloud services require a time for every verification (spec §15.7).
    #[must_use]
    pub const fn require_time(mut self, required: bool) -> Self {
        self.require_time = required;
        self
    }

    /// The clock-skew tolerance in seconds.
    #[must_use]
    pub const fn clock_skew(&self) -> u64 {
        self.skew
    }

    /// The time floor: the largest Unix time known to have passed (spec §15.7).
    #[must_use]
    pub const fn time_floor(&self) -> Option<UnixTime> {
        self.floor
    }

    /// Raises the time floor to `t` (a firmware build time, or an accepted `TimeSync`,
    /// spec §15.7). A lower value is ignored; returns whether the floor rose.
    pub fn raise_time_floor(&mut self, t: UnixTime) -> bool {
        if self.floor.is_some_and(|f| f >= t) {
            return false;
        }
        self.floor = Some(t);
        true
    }

    /// The issuer ids of the trust anchors.
    pub fn anchors(&self) -> impl Iterator<Item = IssuerId> + '_ {
        self.anchors.iter().map(|a| a.id)
    }

    /// The epoch of the list held for anchor `issuer`, if any.
    #[must_use]
    pub fn revocation_epoch(&self, issuer: IssuerId) -> Option<u64> {
        self.anchors.iter().find(|a| a.id == issuer)?.list.as_ref().map(|l| l.body().epoch)
    }

    /// Offers a revocation list (spec §15.5): it replaces the held list of its anchor only if
    /// it decodes, names a trust anchor, verifies, and has a higher epoch. On any error the
    /// current state is unchanged. An accepted list raises the time floor to its
    /// `issued_at`. After success, re-check live sessions ([`TrustStore::recheck`]).
    ///
    /// # Errors
    /// The decoding errors of [`RevocationList::decode`], [`TrustError::UnknownIssuer`],
    /// [`TrustError::BadSignature`], [`TrustError::StaleRevocationList`].
    pub fn update_revocation_list(&mut self, bytes: &[u8]) -> Result<RevocationUpdate, TrustError> {
        let list = RevocationList::decode(bytes)?;
        let issuer = list.body().issuer;
        let anchor = self.anchors.iter_mut().find(|a| a.id == issuer).ok_or(TrustError::UnknownIssuer)?;
        list.verify_signature(&anchor.key)?;
        let previous_epoch = anchor.list.as_ref().map(|l| l.body().epoch);
        let epoch = list.body().epoch;
        if let Some(current) = previous_epoch {
            // spec §15.5: an older or equal epoch is refused.
            if epoch <= current {
                return Err(TrustError::StaleRevocationList { current, received: epoch });
            }
        }
        let issued_at = UnixTime::from_secs(list.body().issued_at);
        anchor.list = Some(list);
        self.raise_time_floor(issued_at);
        Ok(RevocationUpdate { issuer, previous_epoch, epoch })
    }

    fn serial_revoked(&self, issuer: IssuerId, serial: u64) -> bool {
        self.anchors.iter().filter_map(|a| a.list.as_ref()).any(|l| l.body().lists_serial(issuer, serial))
    }

    fn key_revoked(&self, key: &[u8; 32]) -> bool {
        self.anchors.iter().filter_map(|a| a.list.as_ref()).any(|l| l.body().lists_key(key))
    }

    /// Verifies a peer (spec §15.6): its Noise static key `remote_static`, the `certificate`
    /// bytes of its handshake payload (a chain, spec §15.4), the time if known, and the roles
    /// expected from it.
    ///
    /// # Errors
    /// The first failing check of spec §15.6, as a [`TrustError`].
    pub fn verify(
        &self,
        remote_static: &PublicKey,
        certificate: Option<&[u8]>,
        now: Option<UnixTime>,
        expected: RoleSet,
    ) -> Result<VerifiedPeer, TrustError> {
        let bytes = certificate.ok_or(TrustError::CertificateMissing)?;
        let chain = CertificateChain::decode(bytes)?;
        self.verify_chain(remote_static, &chain, now, expected)
    }

    /// [`TrustStore::verify`] for an already decoded chain (spec §15.6 steps 3–9).
    ///
    /// # Errors
    /// As [`TrustStore::verify`].
    pub fn verify_chain(
        &self,
        remote_static: &PublicKey,
        chain: &CertificateChain,
        now: Option<UnixTime>,
        expected: RoleSet,
    ) -> Result<VerifiedPeer, TrustError> {
        let certs = chain.certificates();
        let leaf = chain.leaf();
        // Step 3: structure.
        if leaf.body().role == CertRole::Ca {
            return Err(TrustError::WrongRole(CertRole::Ca));
        }
        for pair in certs.windows(2) {
            if pair[1].body().role != CertRole::Ca || pair[0].body().issuer != pair[1].subject_issuer_id() {
                return Err(TrustError::InvalidChain);
            }
        }
        // Step 4: binding to the Noise static key.
        if !bool::from(leaf.body().public_key.ct_eq(remote_static.as_bytes())) {
            return Err(TrustError::KeyMismatch);
        }
        // Step 5: role.
        if !expected.contains(leaf.body().role) {
            return Err(TrustError::WrongRole(leaf.body().role));
        }
        // Step 6: anchor. `certs` is never empty.
        let top = &certs[certs.len() - 1];
        let anchor = self.anchors.iter().find(|a| a.id == top.body().issuer).ok_or(TrustError::UnknownIssuer)?;
        // Step 7: signatures, from the anchor down.
        let mut signer = anchor.key;
        for cert in certs.iter().rev() {
            cert.verify_signature(&signer)?;
            if cert.body().role == CertRole::Ca {
                signer = cert.ca_key()?;
            }
        }
        // Step 8: revocation, from the anchor down.
        self.check_revocation(&anchor.key, certs)?;
        // Step 9: validity of every certificate, from the top down.
        for cert in certs.iter().rev() {
            self.check_time(cert, now)?;
        }
        let b = leaf.body();
        let valid_until = certs.iter().map(|c| c.body().not_after).min().unwrap_or(b.not_after);
        Ok(VerifiedPeer {
            node_id: NodeId::from_public_key(remote_static),
            name: b.name.clone(),
            role: b.role,
            groups: b.groups.clone(),
            serial: b.serial,
            issuer: b.issuer,
            valid_until: UnixTime::from_secs(valid_until),
        })
    }

    /// spec §15.6 step 8.
    fn check_revocation(&self, anchor: &CaPublicKey, certs: &[Certificate]) -> Result<(), TrustError> {
        if self.key_revoked(&anchor.to_bytes()) {
            return Err(TrustError::RevokedCa);
        }
        let (leaf, intermediates) = certs.split_first().ok_or(TrustError::InvalidChain)?;
        for cert in intermediates.iter().rev() {
            let b = cert.body();
            if self.serial_revoked(b.issuer, b.serial) || self.key_revoked(&b.public_key) {
                return Err(TrustError::RevokedCa);
            }
        }
        let b = leaf.body();
        if self.serial_revoked(b.issuer, b.serial) {
            return Err(TrustError::RevokedSerial);
        }
        if self.key_revoked(&b.public_key) {
            return Err(TrustError::RevokedKey);
        }
        Ok(())
    }

    /// spec §15.7.
    fn check_time(&self, cert: &Certificate, now: Option<UnixTime>) -> Result<(), TrustError> {
        match (now, self.floor) {
            (Some(t), _) => cert.body().check_validity(t, self.skew),
            (None, _) if self.require_time => Err(TrustError::NoTime),
            (None, Some(floor)) if floor.as_secs() > cert.body().not_after.saturating_add(self.skew) => {
                Err(TrustError::Expired)
            }
            (None, _) => Ok(()),
        }
    }

    /// Re-checks a verified peer after the trust state changed (a new revocation list, a
    /// time learned): the full [`TrustStore::verify`] of its stored chain. Convenience for
    /// closing live sessions (spec §15.8).
    ///
    /// # Errors
    /// As [`TrustStore::verify`].
    pub fn recheck(
        &self,
        remote_static: &PublicKey,
        certificate: &[u8],
        now: Option<UnixTime>,
        expected: RoleSet,
    ) -> Result<(), TrustError> {
        self.verify(remote_static, Some(certificate), now, expected).map(|_| ())
    }
}

/// Allowlist trust (spec §15.1): peer static keys with names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Allowlist {
    entries: Vec<(PublicKey, String)>,
}

impl Allowlist {
    /// An empty allowlist (allows nobody).
    #[must_use]
    pub const fn new() -> Self {
        Self { entries: Vec::new() }
    }

    /// Adds (or renames) `key` as `name`.
    ///
    /// # Errors
    /// [`TrustError::InvalidField`] if the name breaks the rules of spec §15.3.
    pub fn insert(&mut self, key: PublicKey, name: impl Into<String>) -> Result<(), TrustError> {
        let name = name.into();
        if !valid_text(&name, MAX_NAME_LEN) {
            return Err(TrustError::InvalidField(super::Field::Name));
        }
        match self.entries.iter_mut().find(|(k, _)| k.ct_eq(&key)) {
            Some(entry) => entry.1 = name,
            None => self.entries.push((key, name)),
        }
        Ok(())
    }

    /// Removes `key`; returns whether it was listed.
    pub fn remove(&mut self, key: &PublicKey) -> bool {
        let before = self.entries.len();
        self.entries.retain(|(k, _)| !k.ct_eq(key));
        self.entries.len() != before
    }

    /// The number of entries.
    #[must_use]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nobody is listed.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries: key and name, in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (&PublicKey, &str)> {
        self.entries.iter().map(|(k, n)| (k, n.as_str()))
    }

    /// The name of `key`, comparing every entry in constant time.
    ///
    /// # Errors
    /// [`TrustError::NotAllowed`] if it is not listed.
    pub fn check(&self, key: &PublicKey) -> Result<&str, TrustError> {
        let mut found = None;
        for (k, name) in &self.entries {
            // Visit every entry so that the time taken does not depend on the position.
            if k.ct_eq(key) && found.is_none() {
                found = Some(name.as_str());
            }
        }
        found.ok_or(TrustError::NotAllowed)
    }
}

/// Who a peer is, once allowed.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Authorized {
    /// Allowlist mode: the listed name.
    Listed {
        /// The node id of the peer's static key.
        node_id: NodeId,
        /// The allowlist name.
        name: String,
    },
    /// Fleet-CA mode: the verified leaf certificate.
    Certified(VerifiedPeer),
}

/// The trust mode of a node (spec §15.1), chosen by configuration.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Trust {
    /// Peers are listed by key.
    Allowlist(Allowlist),
    /// Peers present certificate chains rooted in trust anchors.
    FleetCa(TrustStore),
}

impl Trust {
    /// The authorization check of spec §5.5: what an authorizer calls with the peer's Noise
    /// static key, the `certificate` of its handshake payload, the time if known and the
    /// roles it expects from this peer. Allowlist mode ignores the certificate, the time
    /// and the roles.
    ///
    /// # Errors
    /// A [`TrustError`]; map it with [`TrustError::reject_reason`] /
    /// [`TrustError::close_reason`].
    pub fn check(
        &self,
        remote_static: &PublicKey,
        certificate: Option<&[u8]>,
        now: Option<UnixTime>,
        expected: RoleSet,
    ) -> Result<Authorized, TrustError> {
        match self {
            Self::Allowlist(list) => list.check(remote_static).map(|name| Authorized::Listed {
                node_id: NodeId::from_public_key(remote_static),
                name: String::from(name),
            }),
            Self::FleetCa(store) => store.verify(remote_static, certificate, now, expected).map(Authorized::Certified),
        }
    }
}

#[cfg(test)]
mod tests {
    //! One test per bad input of the trust issue, plus the rules around them.
    use super::*;
    use crate::trust::{CaSigningKey, CertificateBody, Field, RevocationListBody, RevokedSerial};
    use alloc::vec;

    const T: u64 = 1_750_000_000;
    const DAY: u64 = 86_400;

    struct Fleet {
        ca: CaSigningKey,
        inter: CaSigningKey,
        node: PublicKey,
    }

    fn fleet() -> Fleet {
        Fleet {
            ca: CaSigningKey::from_seed([0xca; 32]),
            inter: CaSigningKey::from_seed([0x1e; 32]),
            node: PublicKey([0x55; 32]),
        }
    }

    fn body(key: [u8; 32], role: CertRole, serial: u64, issuer: &CaSigningKey) -> CertificateBody {
        CertificateBody::new(key, "node-1", role, T - DAY, T + DAY, serial, issuer.issuer_id())
    }

    fn leaf(f: &Fleet) -> Certificate {
        Certificate::sign(body(f.node.0, CertRole::Device, 7, &f.ca), &f.ca).unwrap()
    }

    fn chain(certs: Vec<Certificate>) -> Vec<u8> {
        CertificateChain::new(certs).unwrap().encode().unwrap()
    }

    fn store(f: &Fleet) -> TrustStore {
        TrustStore::new([f.ca.verifying_key()]).unwrap()
    }

    fn now() -> Option<UnixTime> {
        Some(UnixTime::from_secs(T))
    }

    fn crl(f: &Fleet, epoch: u64, serials: &[(IssuerId, u64)], keys: &[[u8; 32]]) -> Vec<u8> {
        let mut b = RevocationListBody::new(f.ca.issuer_id(), epoch, T - 10);
        b.serials = serials.iter().map(|&(issuer, serial)| RevokedSerial { issuer, serial }).collect();
        b.keys = keys.to_vec();
        b.normalize();
        RevocationList::sign(b, &f.ca).unwrap().encoding().to_vec()
    }

    fn intermediate_chain(f: &Fleet) -> Vec<u8> {
        let icert = Certificate::sign(body(f.inter.verifying_key().to_bytes(), CertRole::Ca, 2, &f.ca), &f.ca).unwrap();
        let l = Certificate::sign(body(f.node.0, CertRole::Device, 7, &f.inter), &f.inter).unwrap();
        chain(vec![l, icert])
    }

    #[test]
    fn valid_certificate_is_allowed() {
        let f = fleet();
        let peer = store(&f).verify(&f.node, Some(&chain(vec![leaf(&f)])), now(), RoleSet::DEVICE).unwrap();
        assert_eq!(peer.role, CertRole::Device);
        assert_eq!(peer.serial, 7);
        assert_eq!(peer.node_id, NodeId::from_public_key(&f.node));
        assert_eq!(peer.valid_until, UnixTime::from_secs(T + DAY));
    }

    #[test]
    fn valid_chain_through_an_intermediate_is_allowed() {
        let f = fleet();
        let peer = store(&f).verify(&f.node, Some(&intermediate_chain(&f)), now(), RoleSet::DEVICE).unwrap();
        assert_eq!(peer.issuer, f.inter.issuer_id());
    }

    #[test]
    fn expired() {
        let f = fleet();
        let c = chain(vec![leaf(&f)]);
        let s = store(&f);
        let late = Some(UnixTime::from_secs(T + DAY + CLOCK_SKEW_SECS + 1));
        assert_eq!(s.verify(&f.node, Some(&c), late, RoleSet::DEVICE), Err(TrustError::Expired));
        // Within the skew tolerance it is still accepted.
        let edge = Some(UnixTime::from_secs(T + DAY + CLOCK_SKEW_SECS));
        assert!(s.verify(&f.node, Some(&c), edge, RoleSet::DEVICE).is_ok());
    }

    #[test]
    fn not_yet_valid() {
        let f = fleet();
        let early = Some(UnixTime::from_secs(T - DAY - CLOCK_SKEW_SECS - 1));
        let r = store(&f).verify(&f.node, Some(&chain(vec![leaf(&f)])), early, RoleSet::DEVICE);
        assert_eq!(r, Err(TrustError::NotYetValid));
        // A zero skew tolerance is exact.
        let s = store(&f).with_clock_skew(0);
        let r =
            s.verify(&f.node, Some(&chain(vec![leaf(&f)])), Some(UnixTime::from_secs(T - DAY - 1)), RoleSet::DEVICE);
        assert_eq!(r, Err(TrustError::NotYetValid));
    }

    #[test]
    fn signed_by_another_ca() {
        let f = fleet();
        let other = CaSigningKey::from_seed([0x07; 32]);
        let foreign = Certificate::sign(body(f.node.0, CertRole::Device, 7, &other), &other).unwrap();
        let r = store(&f).verify(&f.node, Some(&chain(vec![foreign])), now(), RoleSet::DEVICE);
        assert_eq!(r, Err(TrustError::UnknownIssuer));
        // Claiming our CA as issuer but signed by another key.
        let forged = Certificate::sign(body(f.node.0, CertRole::Device, 7, &f.ca), &other).unwrap();
        let r = store(&f).verify(&f.node, Some(&chain(vec![forged])), now(), RoleSet::DEVICE);
        assert_eq!(r, Err(TrustError::BadSignature));
    }

    #[test]
    fn tampered_signature_and_body() {
        let f = fleet();
        let good = leaf(&f).encoding().to_vec();
        // The signature's last byte, one in its middle, the serial, a byte of the public key.
        for at in [good.len() - 1, good.len() - 40, good.len() - 64 - 17, 20] {
            let mut bad = good.clone();
            bad[at] ^= 0x01;
            let c = postcard::to_allocvec(&vec![&bad[..]]).unwrap();
            let r = store(&f).verify(&f.node, Some(&c), now(), RoleSet::DEVICE);
            // Byte 20 lies in the public key: the binding check fails before the signature.
            let want = if at == 20 { TrustError::KeyMismatch } else { TrustError::BadSignature };
            assert_eq!(r, Err(want), "flip at {at}");
        }
    }

    #[test]
    fn non_canonical_encoding() {
        let f = fleet();
        let c = leaf(&f);
        let enc = c.encoding();
        // Serial 7 is one byte before the 16-byte issuer; write it as the overlong 87 00.
        let at = enc.len() - 64 - 16 - 1;
        assert_eq!(enc[at], 7);
        let bad = [&enc[..at], &[0x87, 0x00], &enc[at + 1..]].concat();
        assert_eq!(Certificate::decode(&bad), Err(TrustError::NonCanonical));
        // A chain with a non-canonical count.
        let ok = chain(vec![c]);
        let bad_chain = [&[0x81, 0x00][..], &ok[1..]].concat();
        assert_eq!(store(&f).verify(&f.node, Some(&bad_chain), now(), RoleSet::DEVICE), Err(TrustError::NonCanonical));
    }

    #[test]
    fn wrong_role() {
        let f = fleet();
        let gw = Certificate::sign(body(f.node.0, CertRole::Gateway, 7, &f.ca), &f.ca).unwrap();
        // A gateway cannot pose as a device, a device cannot open a gateway uplink.
        let s = store(&f);
        assert_eq!(
            s.verify(&f.node, Some(&chain(vec![gw])), now(), RoleSet::DEVICE),
            Err(TrustError::WrongRole(CertRole::Gateway))
        );
        assert_eq!(
            s.verify(&f.node, Some(&chain(vec![leaf(&f)])), now(), RoleSet::GATEWAY),
            Err(TrustError::WrongRole(CertRole::Device))
        );
        // An intermediate's certificate is never a peer's.
        let icert = Certificate::sign(body(f.node.0, CertRole::Ca, 2, &f.ca), &f.ca).unwrap();
        assert_eq!(
            s.verify(&f.node, Some(&chain(vec![icert])), now(), RoleSet::of(&CertRole::ALL)),
            Err(TrustError::WrongRole(CertRole::Ca))
        );
    }

    #[test]
    fn certificate_key_differs_from_noise_static_key() {
        let f = fleet();
        let r = store(&f).verify(&PublicKey([0x56; 32]), Some(&chain(vec![leaf(&f)])), now(), RoleSet::DEVICE);
        assert_eq!(r, Err(TrustError::KeyMismatch));
    }

    #[test]
    fn revoked_serial_and_key() {
        let f = fleet();
        let c = chain(vec![leaf(&f)]);
        let mut s = store(&f);
        s.update_revocation_list(&crl(&f, 1, &[(f.ca.issuer_id(), 7)], &[])).unwrap();
        assert_eq!(s.verify(&f.node, Some(&c), now(), RoleSet::DEVICE), Err(TrustError::RevokedSerial));
        let mut s = store(&f);
        s.update_revocation_list(&crl(&f, 1, &[(f.ca.issuer_id(), 8)], &[f.node.0])).unwrap();
        assert_eq!(s.verify(&f.node, Some(&c), now(), RoleSet::DEVICE), Err(TrustError::RevokedKey));
        // The same serial of another issuer is a different certificate.
        let mut s = store(&f);
        s.update_revocation_list(&crl(&f, 1, &[(f.inter.issuer_id(), 7)], &[])).unwrap();
        assert!(s.verify(&f.node, Some(&c), now(), RoleSet::DEVICE).is_ok());
    }

    #[test]
    fn revoked_ca_revokes_everything_under_it() {
        let f = fleet();
        let c = intermediate_chain(&f);
        // The intermediate by serial, by key, and the anchor by its own key.
        let lists = [
            crl(&f, 1, &[(f.ca.issuer_id(), 2)], &[]),
            crl(&f, 1, &[], &[f.inter.verifying_key().to_bytes()]),
            crl(&f, 1, &[], &[f.ca.verifying_key().to_bytes()]),
        ];
        for l in lists {
            let mut s = store(&f);
            assert!(s.verify(&f.node, Some(&c), now(), RoleSet::DEVICE).is_ok());
            s.update_revocation_list(&l).unwrap();
            assert_eq!(s.verify(&f.node, Some(&c), now(), RoleSet::DEVICE), Err(TrustError::RevokedCa));
        }
        // Revoking the anchor also revokes certificates it signed directly.
        let mut s = store(&f);
        s.update_revocation_list(&crl(&f, 1, &[], &[f.ca.verifying_key().to_bytes()])).unwrap();
        assert_eq!(s.verify(&f.node, Some(&chain(vec![leaf(&f)])), now(), RoleSet::DEVICE), Err(TrustError::RevokedCa));
    }

    #[test]
    fn stale_revocation_list() {
        let f = fleet();
        let mut s = store(&f);
        let up = s.update_revocation_list(&crl(&f, 5, &[(f.ca.issuer_id(), 7)], &[])).unwrap();
        assert_eq!(up, RevocationUpdate { issuer: f.ca.issuer_id(), previous_epoch: None, epoch: 5 });
        for epoch in [5, 4, 0] {
            assert_eq!(
                s.update_revocation_list(&crl(&f, epoch, &[], &[])),
                Err(TrustError::StaleRevocationList { current: 5, received: epoch })
            );
        }
        // The held list stays in force.
        assert_eq!(s.revocation_epoch(f.ca.issuer_id()), Some(5));
        assert_eq!(
            s.verify(&f.node, Some(&chain(vec![leaf(&f)])), now(), RoleSet::DEVICE),
            Err(TrustError::RevokedSerial)
        );
        // A newer empty list un-revokes (lists are complete).
        s.update_revocation_list(&crl(&f, 6, &[], &[])).unwrap();
        assert!(s.verify(&f.node, Some(&chain(vec![leaf(&f)])), now(), RoleSet::DEVICE).is_ok());
    }

    #[test]
    fn unverifiable_revocation_list() {
        let f = fleet();
        let mut s = store(&f);
        s.update_revocation_list(&crl(&f, 1, &[], &[])).unwrap();
        // Tampered signature.
        let mut bad = crl(&f, 2, &[(f.ca.issuer_id(), 7)], &[]);
        let n = bad.len();
        bad[n - 1] ^= 0x80;
        assert_eq!(s.update_revocation_list(&bad), Err(TrustError::BadSignature));
        // Signed by another CA, naming ours.
        let other = CaSigningKey::from_seed([0x07; 32]);
        let mut b = RevocationListBody::new(f.ca.issuer_id(), 9, T);
        b.keys = vec![f.node.0];
        let forged = RevocationList::sign(b.clone(), &other).unwrap();
        assert_eq!(s.update_revocation_list(forged.encoding()), Err(TrustError::BadSignature));
        // Signed by another CA, naming itself.
        b.issuer = other.issuer_id();
        let foreign = RevocationList::sign(b, &other).unwrap();
        assert_eq!(s.update_revocation_list(foreign.encoding()), Err(TrustError::UnknownIssuer));
        // Malformed.
        assert_eq!(s.update_revocation_list(&bad[..n - 1]), Err(TrustError::Malformed));
        // Nothing changed.
        assert_eq!(s.revocation_epoch(f.ca.issuer_id()), Some(1));
        assert!(s.verify(&f.node, Some(&chain(vec![leaf(&f)])), now(), RoleSet::DEVICE).is_ok());
    }

    #[test]
    fn missing_certificate_and_broken_chains() {
        let f = fleet();
        let s = store(&f);
        assert_eq!(s.verify(&f.node, None, now(), RoleSet::DEVICE), Err(TrustError::CertificateMissing));
        // Leaf not issued by the intermediate that follows it.
        let icert = Certificate::sign(body(f.inter.verifying_key().to_bytes(), CertRole::Ca, 2, &f.ca), &f.ca).unwrap();
        assert_eq!(
            s.verify(&f.node, Some(&chain(vec![leaf(&f), icert])), now(), RoleSet::DEVICE),
            Err(TrustError::InvalidChain)
        );
        // An "intermediate" that is a device certificate.
        let l = Certificate::sign(body(f.node.0, CertRole::Device, 7, &f.inter), &f.inter).unwrap();
        let fake =
            Certificate::sign(body(f.inter.verifying_key().to_bytes(), CertRole::Device, 3, &f.ca), &f.ca).unwrap();
        assert_eq!(
            s.verify(&f.node, Some(&chain(vec![l, fake])), now(), RoleSet::DEVICE),
            Err(TrustError::InvalidChain)
        );
    }

    #[test]
    fn time_rules_without_a_clock() {
        let f = fleet();
        let c = chain(vec![leaf(&f)]);
        // A gateway requires a time.
        let gw = store(&f).require_time(true);
        assert_eq!(gw.verify(&f.node, Some(&c), None, RoleSet::DEVICE), Err(TrustError::NoTime));
        // A device without a clock and without a floor cannot tell: allowed.
        let mut dev = store(&f);
        assert!(dev.verify(&f.node, Some(&c), None, RoleSet::DEVICE).is_ok());
        // Once it knows time has passed the end of validity, the certificate is expired.
        assert!(dev.raise_time_floor(UnixTime::from_secs(T + DAY + CLOCK_SKEW_SECS + 1)));
        assert!(!dev.raise_time_floor(UnixTime::from_secs(T)), "the floor never goes back");
        assert_eq!(dev.verify(&f.node, Some(&c), None, RoleSet::DEVICE), Err(TrustError::Expired));
        // A verified revocation list raises the floor to its issued_at.
        let mut dev = store(&f);
        dev.update_revocation_list(&crl(&f, 1, &[], &[])).unwrap();
        assert_eq!(dev.time_floor(), Some(UnixTime::from_secs(T - 10)));
    }

    #[test]
    fn allowlist_mode() {
        let f = fleet();
        let mut list = Allowlist::new();
        list.insert(f.node, "sensor").unwrap();
        assert_eq!(list.insert(f.node, ""), Err(TrustError::InvalidField(Field::Name)));
        let trust = Trust::Allowlist(list.clone());
        let ok = trust.check(&f.node, None, None, RoleSet::NONE).unwrap();
        assert_eq!(ok, Authorized::Listed { node_id: NodeId::from_public_key(&f.node), name: "sensor".into() });
        assert_eq!(trust.check(&PublicKey([1; 32]), None, None, RoleSet::NONE), Err(TrustError::NotAllowed));
        assert!(list.remove(&f.node));
        assert!(list.is_empty());
    }

    #[test]
    fn too_many_anchors() {
        let keys: Vec<_> = (0..9u8).map(|i| CaSigningKey::from_seed([i; 32]).verifying_key()).collect();
        assert_eq!(TrustStore::new(keys.clone()).err(), Some(TrustError::TooManyAnchors));
        // Duplicates count once.
        assert!(TrustStore::new(keys[..8].iter().chain(keys[..8].iter()).copied()).is_ok());
    }

    #[test]
    fn reason_codes() {
        use crate::message::CloseReason;
        use crate::wire::RejectReason;
        assert_eq!(TrustError::RevokedCa.reject_reason(), RejectReason::Revoked);
        assert_eq!(TrustError::RevokedKey.close_reason(), CloseReason::Revoked);
        assert_eq!(TrustError::Expired.reject_reason(), RejectReason::BadCertificate);
        assert_eq!(TrustError::Expired.close_reason(), CloseReason::BadCertificate);
        assert_eq!(TrustError::WrongRole(CertRole::Device).reject_reason(), RejectReason::Unauthorized);
        assert_eq!(RejectReason::from_code(RejectReason::BadCertificate.code()), RejectReason::BadCertificate);
        assert_eq!(CloseReason::from_code(9), CloseReason::BadCertificate);
    }
}
