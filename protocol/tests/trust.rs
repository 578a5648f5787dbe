//! Property tests of the trust layer (spec §15): encodings round-trip, and no single bit flip
//! of a signed certificate, chain or revocation list is ever accepted.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use proptest::collection::{btree_set, vec};
use proptest::prelude::*;
use veil_protocol::trust::{
    CaSigningKey, CertRole, Certificate, CertificateBody, CertificateChain, IssuerId, RevocationList,
    RevocationListBody, RevokedSerial, RoleSet, TrustStore, UnixTime,
};
use veil_protocol::PublicKey;

const T: u64 = 1_782_864_000;

fn ca() -> CaSigningKey {
    CaSigningKey::from_seed([0x11; 32])
}

fn node_role() -> impl Strategy<Value = CertRole> {
    prop_oneof![Just(CertRole::Device), Just(CertRole::Gateway), Just(CertRole::Cloud)]
}

prop_compose! {
    fn body()(
        key in any::<[u8; 32]>(),
        name in "[a-zA-Z0-9 ._-]{1,64}",
        role in node_role(),
        groups in btree_set("[a-z0-9-]{1,32}", 0..=8),
        a in any::<u64>(),
        b in any::<u64>(),
        serial in any::<u64>(),
    ) -> CertificateBody {
        CertificateBody {
            groups: groups.into_iter().collect(),
            ..CertificateBody::new(key, name, role, a.min(b), a.max(b), serial, ca().issuer_id())
        }
    }
}

fn fixed_leaf() -> (PublicKey, Certificate) {
    let key = PublicKey([0x21; 32]);
    let body = CertificateBody {
        groups: vec!["building-a".into(), "sensors".into()],
        ..CertificateBody::new(key.0, "sensor-17", CertRole::Device, T - 1_000, T + 1_000, 77, ca().issuer_id())
    };
    (key, Certificate::sign(body, &ca()).unwrap())
}

fn store() -> TrustStore {
    TrustStore::new([ca().verifying_key()]).unwrap().require_time(true)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn certificate_encode_decode_round_trip(b in body()) {
        let c = Certificate::sign(b.clone(), &ca()).unwrap();
        let d = Certificate::decode(c.encoding()).unwrap();
        prop_assert_eq!(d.body(), &b);
        prop_assert_eq!(d.encoding(), c.encoding());
        prop_assert!(d.verify_signature(&ca().verifying_key()).is_ok());
        let chain = CertificateChain::new(vec![d]).unwrap();
        prop_assert_eq!(CertificateChain::decode(&chain.encode().unwrap()).unwrap(), chain);
    }

    #[test]
    fn revocation_list_encode_decode_round_trip(
        epoch in any::<u64>(),
        issued_at in any::<u64>(),
        serials in vec((any::<[u8; 16]>(), any::<u64>()), 0..40),
        keys in vec(any::<[u8; 32]>(), 0..40),
    ) {
        let mut b = RevocationListBody::new(ca().issuer_id(), epoch, issued_at);
        b.serials = serials.into_iter().map(|(i, serial)| RevokedSerial { issuer: IssuerId(i), serial }).collect();
        b.keys = keys;
        b.normalize();
        let l = RevocationList::sign(b.clone(), &ca()).unwrap();
        let d = RevocationList::decode(l.encoding()).unwrap();
        prop_assert_eq!(d.body(), &b);
        prop_assert_eq!(d.encoding(), l.encoding());
    }

    #[test]
    fn any_single_bit_flip_of_a_chain_is_rejected(bit in 0usize..2048) {
        let (key, leaf) = fixed_leaf();
        let chain = CertificateChain::new(vec![leaf]).unwrap().encode().unwrap();
        let s = store();
        prop_assert!(s.verify(&key, Some(&chain), Some(UnixTime::from_secs(T)), RoleSet::DEVICE).is_ok());
        let bit = bit % (chain.len() * 8);
        let mut bad = chain.clone();
        bad[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(s.verify(&key, Some(&bad), Some(UnixTime::from_secs(T)), RoleSet::DEVICE).is_err());
    }

    #[test]
    fn any_single_bit_flip_of_a_revocation_list_is_rejected(bit in 0usize..4096) {
        let mut b = RevocationListBody::new(ca().issuer_id(), 5, T);
        b.serials = vec![RevokedSerial { issuer: ca().issuer_id(), serial: 77 }];
        b.keys = vec![[0x22; 32]];
        let list = RevocationList::sign(b, &ca()).unwrap();
        let bit = bit % (list.encoding().len() * 8);
        let mut bad = list.encoding().to_vec();
        bad[bit / 8] ^= 1 << (bit % 8);
        let mut s = store();
        prop_assert!(s.update_revocation_list(&bad).is_err());
        prop_assert_eq!(s.revocation_epoch(ca().issuer_id()), None);
        prop_assert!(s.update_revocation_list(list.encoding()).is_ok());
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics(data in vec(any::<u8>(), 0..600)) {
        let _ = Certificate::decode(&data);
        let _ = CertificateChain::decode(&data);
        let _ = RevocationList::decode(&data);
        let _ = store().verify(&PublicKey([0; 32]), Some(&data), None, RoleSet::DEVICE);
    }
}

mod over_a_session {
    //! RevocationPush and TimeSync (spec §15.7, §15.8) between two connections.
    use std::sync::Arc;

    use bytes::Bytes;
    use rand_core::SeedableRng;
    use veil_protocol::{Config, Connection, ConnectionError, Decision, Event, Mode, Role, StaticKeypair, Timestamp};

    use super::*;

    fn pair() -> (Connection, Connection) {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(15);
        let server_id = StaticKeypair::from_secret_bytes([2; 32]);
        let server_pub = *server_id.public();
        let client = Arc::new(Config::new(StaticKeypair::from_secret_bytes([1; 32]), Mode::Stream));
        let server = Arc::new(Config::new(server_id, Mode::Stream));
        let now = Timestamp::ZERO;
        let mut c = Connection::new(client, Role::Initiator, Some(server_pub), now, &mut rng).unwrap();
        let mut s = Connection::new(server, Role::Responder, None, now, &mut rng).unwrap();
        assert_eq!(c.push_revocation_list(Bytes::from_static(b"x")), Err(ConnectionError::NotConnected));
        pump(&mut c, &mut s, &mut |s, ev| {
            if matches!(ev, Event::AuthorizationRequired { .. }) {
                s.authorize(Timestamp::ZERO, Decision::allow()).unwrap();
            }
        });
        assert!(c.is_connected() && s.is_connected());
        (c, s)
    }

    /// Moves packets both ways for a bounded number of rounds; hands the server's events to `on`.
    fn pump(c: &mut Connection, s: &mut Connection, on: &mut dyn FnMut(&mut Connection, Event)) {
        let now = Timestamp::ZERO;
        let mut buf = vec![0u8; 65_535];
        for _ in 0..8 {
            while let Some(n) = c.poll_transmit(now, &mut buf).unwrap() {
                let _ = s.handle_input(now, &buf[..n]);
            }
            while let Some(n) = s.poll_transmit(now, &mut buf).unwrap() {
                let _ = c.handle_input(now, &buf[..n]);
            }
            while let Some(ev) = s.poll_event() {
                on(s, ev);
            }
            while c.poll_event().is_some() {}
        }
    }

    #[test]
    fn a_pushed_list_and_a_time_hint_arrive_as_events() {
        let (mut c, mut s) = pair();
        let mut b = RevocationListBody::new(ca().issuer_id(), 2, T);
        b.keys = vec![[0x22; 32]];
        let list = RevocationList::sign(b, &ca()).unwrap();
        c.push_revocation_list(Bytes::copy_from_slice(list.encoding())).unwrap();
        c.send_time_sync(T).unwrap();
        let mut got = Vec::new();
        pump(&mut c, &mut s, &mut |_, ev| got.push(ev));
        let lists: Vec<_> = got
            .iter()
            .filter_map(|e| match e {
                Event::RevocationList { list } => Some(list.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(lists, vec![Bytes::copy_from_slice(list.encoding())]);
        assert!(got.contains(&Event::TimeSync { unix_time: T }), "{got:?}");
        // The receiver's trust store takes it; the session is untouched either way.
        let mut store = store();
        assert!(store.update_revocation_list(&lists[0]).is_ok());
        assert!(store.update_revocation_list(&lists[0]).is_err());
        assert!(s.is_connected());
        let too_long = Bytes::from(vec![0u8; veil_protocol::trust::MAX_REVOCATION_LIST_LEN + 1]);
        assert_eq!(c.push_revocation_list(too_long), Err(ConnectionError::MessageTooLarge));
    }
}
