//! The static-static DH cache (`Config::static_dh_cache`, spec §11.11): handshakes that use it
//! produce exactly the handshake hash and keys of handshakes that do not, it holds only
//! `DH(s, rs)` of finished handshakes, and a new local identity invalidates it.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod util;

use std::sync::Arc;

use bytes::Bytes;
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, RngAlgorithm, RngSeed, TestRunner};
use util::*;
use veil_protocol::dh_cache::CacheStats;
use veil_protocol::{Config, Decision, Mode, Pattern, StaticDhCache, StaticKeypair, Suite};

fn has_ss(p: Pattern) -> bool {
    matches!(p, Pattern::IK | Pattern::IKpsk2 | Pattern::KK)
}

/// A pair whose sides use `cache_a` and `cache_b` (if any), with the handshake's RNG seeded
/// by `seed`, driven to the end.
fn pair(
    pattern: Pattern,
    suite: Suite,
    mode: Mode,
    seed: u64,
    cache_a: Option<&Arc<StaticDhCache>>,
    cache_b: Option<&Arc<StaticDhCache>>,
) -> Pair {
    let setup = Setup { seed, ..Setup::new(pattern, suite, mode) };
    let mut p =
        Pair::with_configs(setup, |a| a.static_dh_cache = cache_a.cloned(), |b| b.static_dh_cache = cache_b.cloned());
    p.drive();
    assert!(p.connected(), "{pattern:?} {suite:?} {mode:?}: {:?} / {:?}", p.a_errors, p.b_errors);
    p
}

/// Hash of the handshake, and a message each way to prove both directions' keys agree.
fn outcome(p: &mut Pair) -> ([u8; 32], Vec<u8>, Vec<u8>) {
    let hash = *p.a.handshake_hash().unwrap();
    assert_eq!(Some(&hash), p.b.handshake_hash());
    p.a.send(1, Bytes::from_static(b"up")).unwrap();
    p.b.send(2, Bytes::from_static(b"down")).unwrap();
    p.drive();
    let up = p.b_messages().pop().unwrap().2;
    let down = p.a_messages().pop().unwrap().2;
    (hash, up, down)
}

fn hits(c: &StaticDhCache) -> u64 {
    c.stats().hits
}

#[test]
fn cached_handshakes_yield_the_same_hash_and_keys_as_uncached_ones() {
    let patterns = prop::sample::select(Pattern::ALL.to_vec());
    let suites = prop::sample::select(Suite::ALL.to_vec());
    let modes = prop::sample::select(vec![Mode::Stream, Mode::Datagram]);
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 24,
        failure_persistence: None,
        rng_algorithm: RngAlgorithm::ChaCha,
        rng_seed: RngSeed::Fixed(0x55),
        ..ProptestConfig::default()
    });
    let result = runner.run(&(patterns, suites, modes, any::<u64>()), |(pattern, suite, mode, seed)| {
        let reference = outcome(&mut pair(pattern, suite, mode, seed, None, None));
        let (ca, cb) = (Arc::new(StaticDhCache::new(16)), Arc::new(StaticDhCache::new(16)));
        // The first handshake fills the caches (other ephemeral keys: another seed) ...
        let _ = outcome(&mut pair(pattern, suite, mode, seed ^ 1, Some(&ca), Some(&cb)));
        let (ha, hb) = (hits(&ca), hits(&cb));
        // ... the second, with the reference's seed, takes `ss` from them.
        let cached = outcome(&mut pair(pattern, suite, mode, seed, Some(&ca), Some(&cb)));
        prop_assert_eq!(&cached, &reference);
        if has_ss(pattern) {
            prop_assert_eq!((ha, hb), (0, 0));
            prop_assert_eq!((hits(&ca), hits(&cb)), (1, 1));
            prop_assert_eq!((ca.len(), cb.len()), (1, 1));
        } else {
            prop_assert_eq!((hits(&ca), hits(&cb), ca.len(), cb.len()), (0, 0, 0, 0));
        }
        // A cached side and an uncached side agree too.
        let mixed = outcome(&mut pair(pattern, suite, mode, seed, Some(&ca), None));
        prop_assert_eq!(&mixed, &reference);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn only_the_static_static_result_of_a_finished_handshake_is_stored() {
    for pattern in Pattern::ALL {
        let (ca, cb) = (Arc::new(StaticDhCache::new(16)), Arc::new(StaticDhCache::new(16)));
        let p = pair(pattern, Suite::ChaChaPolyBlake2s, Mode::Stream, 3, Some(&ca), Some(&cb));
        if has_ss(pattern) {
            // One entry per side, under the local key, for the peer's static key: not the
            // results with the peer's ephemeral key each side's static key also computed.
            assert_eq!((ca.len(), cb.len()), (1, 1), "{pattern:?}");
            assert!(ca.contains(&p.a_key, &p.b_key), "{pattern:?}");
            assert!(cb.contains(&p.b_key, &p.a_key), "{pattern:?}");
        } else {
            // XX and XXpsk3 have no `ss`: nothing with an ephemeral key goes in.
            assert!(ca.is_empty() && cb.is_empty(), "{pattern:?}");
        }
        // Only the computations of the handshake's two static DHs were looked up.
        let s = ca.stats();
        assert_eq!((s.hits, s.evictions, s.key_changes), (0, 0, 0), "{pattern:?}");
    }
    // A handshake that does not finish (the responder denies) stores nothing on either side.
    let (ca, cb) = (Arc::new(StaticDhCache::new(16)), Arc::new(StaticDhCache::new(16)));
    let setup = Setup::new(Pattern::IK, Suite::ChaChaPolyBlake2s, Mode::Stream);
    let mut p = Pair::with_configs(
        setup,
        |a| a.static_dh_cache = Some(Arc::clone(&ca)),
        |b| b.static_dh_cache = Some(Arc::clone(&cb)),
    );
    p.decide_b = Some(Decision::deny());
    p.drive();
    assert!(!p.connected());
    assert!(ca.is_empty() && cb.is_empty());
}

#[test]
fn rehandshakes_use_the_cache() {
    for mode in [Mode::Stream, Mode::Datagram] {
        let (ca, cb) = (Arc::new(StaticDhCache::new(4)), Arc::new(StaticDhCache::new(4)));
        let mut p = pair(Pattern::KK, Suite::AesGcmSha256, mode, 9, Some(&ca), Some(&cb));
        let first = *p.a.handshake_hash().unwrap();
        p.a.start_rehandshake(p.now).unwrap();
        p.drive();
        assert_ne!(*p.a.handshake_hash().unwrap(), first);
        assert_eq!(p.a.handshake_hash(), p.b.handshake_hash());
        assert_eq!((hits(&ca), hits(&cb)), (1, 1), "{mode:?}");
        p.a.send(1, Bytes::from_static(b"after")).unwrap();
        p.drive();
        assert_eq!(p.b_messages().pop().unwrap().2, b"after");
    }
}

#[test]
fn a_new_local_identity_invalidates_the_cache() {
    let cache = Arc::new(StaticDhCache::new(8));
    let p = pair(Pattern::IK, Suite::ChaChaPolyBlake2s, Mode::Stream, 5, None, Some(&cache));
    let (old_local, device) = (p.b_key, p.a_key);
    assert!(cache.contains(&old_local, &device));
    // The responder rotates its static key; the endpoint keeps its cache object.
    let rotated = StaticKeypair::from_secret_bytes([9u8; 32]);
    let new_local = *rotated.public();
    let setup = Setup { a_expects: Some(new_local), ..Setup::new(Pattern::IK, Suite::ChaChaPolyBlake2s, Mode::Stream) };
    let cache_b = Arc::clone(&cache);
    let mut q = Pair::with_configs(
        setup,
        |_| {},
        move |b: &mut Config| {
            b.identity = rotated;
            b.static_dh_cache = Some(cache_b);
        },
    );
    q.drive();
    assert!(q.connected(), "{:?} / {:?}", q.a_errors, q.b_errors);
    // The old identity's entry missed (no hit), then went with the key change.
    let s: CacheStats = cache.stats();
    assert_eq!((s.hits, s.key_changes), (0, 1));
    assert!(!cache.contains(&old_local, &device));
    assert!(cache.contains(&new_local, &device));
    assert_eq!(cache.len(), 1);
}

#[test]
fn a_full_cache_evicts_and_stays_correct() {
    // Three initiators take turns with a responder whose cache holds two.
    let cache = Arc::new(StaticDhCache::new(2));
    for round in 0..3u64 {
        for device in [11u8, 12, 13] {
            let setup = Setup { seed: round, ..Setup::new(Pattern::IK, Suite::ChaChaPolyBlake2s, Mode::Stream) };
            let server_cache = Arc::clone(&cache);
            let mut p = Pair::with_configs(
                setup,
                |a| a.identity = keypair(device),
                move |b| b.static_dh_cache = Some(server_cache),
            );
            p.drive();
            assert!(p.connected(), "round {round} device {device}: {:?} / {:?}", p.a_errors, p.b_errors);
            assert_eq!(p.b.remote_static(), Some(keypair(device).public()));
            assert!(cache.len() <= 2);
        }
    }
    let s = cache.stats();
    assert!(s.evictions > 0);
    assert_eq!(s.inserts, s.evictions + 2);
}
