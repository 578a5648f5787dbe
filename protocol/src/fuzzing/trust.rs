//! Fuzz entry points of the trust layer (spec §15): certificate and chain decoding with
//! verification, and revocation-list decoding with the epoch rules. The trust anchor is the
//! `ca` key of `spec/vectors/trust.json` (Ed25519 seed `[0x11; 32]`), so the vectors' encodings
//! (the seed corpus) reach every verification step.

use crate::crypto::PublicKey;
use crate::trust::{
    CaSigningKey, CertRole, Certificate, CertificateChain, RevocationList, RoleSet, TrustError, TrustStore, UnixTime,
};

/// The trust anchor of the vectors.
const ANCHOR_SEED: [u8; 32] = [0x11; 32];
/// 2026-07-01, inside the vectors' validity period.
const NOW: u64 = 1_782_864_000;

fn store() -> TrustStore {
    TrustStore::new([CaSigningKey::from_seed(ANCHOR_SEED).verifying_key()]).unwrap()
}

/// Decodes `data` as a certificate and as a chain, and verifies the chain.
///
/// Invariants: nothing panics; whatever decodes re-encodes to exactly `data` (spec §15.3:
/// canonical form); a chain that verifies has every signature valid up to the anchor, a leaf
/// that is not a ca, and the expected role; verification is deterministic.
pub fn certificate(data: &[u8]) {
    if let Ok(c) = Certificate::decode(data) {
        assert_eq!(c.encoding(), data, "a decoded certificate must be its input");
        assert_eq!(c.body().validate(), Ok(()));
    }
    let Ok(chain) = CertificateChain::decode(data) else {
        return;
    };
    assert_eq!(chain.encode().as_deref(), Ok(data), "a decoded chain must be its input");
    let s = store();
    let leaf = PublicKey(chain.leaf().body().public_key);
    let all = RoleSet::of(&CertRole::ALL);
    for now in [Some(UnixTime::from_secs(NOW)), None] {
        let r = s.verify(&leaf, Some(data), now, all);
        assert_eq!(r, s.verify(&leaf, Some(data), now, all), "verification must be deterministic");
        if let Ok(peer) = r {
            assert_ne!(peer.role, CertRole::Ca);
            let certs = chain.certificates();
            let anchor = CaSigningKey::from_seed(ANCHOR_SEED).verifying_key();
            let mut signer = anchor;
            for c in certs.iter().rev() {
                assert_eq!(c.verify_signature(&signer), Ok(()));
                if c.body().role == CertRole::Ca {
                    signer = c.ca_key().unwrap();
                }
            }
        }
        // Another static key is never accepted with this chain.
        let mut other = leaf;
        other.0[0] ^= 1;
        assert!(s.verify(&other, Some(data), now, all).is_err());
    }
}

/// Decodes `data` as a revocation list and offers it to a store twice.
///
/// Invariants: nothing panics; a decoded list re-encodes to `data`; a refused update leaves
/// the held epoch unchanged; an accepted one raises it to the list's epoch; the same list
/// offered again is refused as stale.
pub fn revocation_list(data: &[u8]) {
    if let Ok(l) = RevocationList::decode(data) {
        assert_eq!(l.encoding(), data, "a decoded list must be its input");
        assert_eq!(l.body().validate(), Ok(()));
    }
    let mut s = store();
    let id = CaSigningKey::from_seed(ANCHOR_SEED).issuer_id();
    match s.update_revocation_list(data) {
        Ok(update) => {
            assert_eq!(s.revocation_epoch(id), Some(update.epoch));
            let again = s.update_revocation_list(data);
            assert_eq!(again, Err(TrustError::StaleRevocationList { current: update.epoch, received: update.epoch }));
            assert_eq!(s.revocation_epoch(id), Some(update.epoch));
        }
        Err(_) => assert_eq!(s.revocation_epoch(id), None),
    }
}
