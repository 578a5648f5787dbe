//! Full handshakes per second, per pattern and suite, against the X25519 bound measured in the
//! same run.
//!
//! One iteration builds an initiator and a responder [`Connection`](veil_protocol::Connection),
//! runs the handshake in one thread until both are connected (the responder, and the XX
//! initiator, authorize their peer) and drops both. That is everything a server and a device
//! spend on a handshake, without the carrier.
//!
//! The bound is the handshake's X25519 work, counted from the pattern's Noise tokens: each `ee`,
//! `es`, `se` or `ss` token is one DH on each side, timed as one DH of the X25519 that Veil
//! computes with in this build (`veil_protocol::X25519_IMPLEMENTATION`) in the same run.
//! The target is ≥ 0.85 of that bound. A stricter bound also counts the two ephemeral
//! key generations (one fixed-base multiplication per `e` token), which no implementation can
//! skip either.
//!
//! After criterion's benchmarks the ratios are printed, timed interleaved with the DH and the key
//! generation (`veil_benches::timing`) so that all of them see the same machine load.
//!
//! Run with `cargo bench -p veil-benches --bench handshake` (add `--no-default-features` for the
//! pure-Rust build); figures go to `benches/RESULTS.md`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use rand::rngs::StdRng;
use rand::SeedableRng;
use veil_benches::pair::{self, dh_cost, Endpoints};
use veil_benches::timing::{self, format_ns, Plan};
use veil_benches::{raw, VEIL_BUILD};
use veil_protocol::{Mode, Pattern, Suite, X25519_IMPLEMENTATION};

/// The target: handshakes reach this fraction of the DH-only bound.
const TARGET: f64 = 0.85;

/// Every pattern and suite whose X25519 work these benchmarks know how to count, without and,
/// for the patterns with an `ss` token, with a static-static DH cache on both sides.
fn cases() -> impl Iterator<Item = (Pattern, Suite, bool)> {
    Pattern::ALL.into_iter().filter(|p| dh_cost(*p).is_some()).flat_map(|p| {
        let cached = dh_cost(p).is_some_and(|c| c.ss > 0);
        Suite::ALL
            .into_iter()
            .flat_map(move |s| [(p, s, false), (p, s, true)].into_iter().filter(move |c| !c.2 || cached))
    })
}

fn endpoints(pattern: Pattern, suite: Suite, cached: bool) -> Endpoints {
    if cached {
        Endpoints::with_static_dh_cache(pattern, suite, Mode::Stream)
    } else {
        Endpoints::new(pattern, suite, Mode::Stream)
    }
}

fn label(pattern: Pattern, cached: bool) -> String {
    if cached {
        format!("{pattern}+ss-cache")
    } else {
        pattern.to_string()
    }
}

/// One full handshake with fresh connections.
fn handshake(endpoints: &Endpoints, rng: &mut StdRng, buf: &mut [u8]) {
    match endpoints.connect(rng, buf) {
        Ok(pair) => drop(black_box(pair)),
        Err(e) => panic!("handshake failed: {e}"),
    }
}

/// The X25519 that Veil computes with in this build, for the bound.
fn x25519() -> raw::X25519 {
    match raw::X25519::of_veil() {
        Ok(x) => x,
        Err(e) => panic!("{X25519_IMPLEMENTATION}: {e}"),
    }
}

fn dh(x: &raw::X25519) {
    assert!(black_box(black_box(x).dh()).is_ok(), "X25519 DH failed");
}

fn keygen(x: &raw::X25519) {
    assert!(black_box(black_box(x).keygen()).is_ok(), "X25519 key generation failed");
}

fn handshakes(c: &mut Criterion) {
    let x = x25519();
    let mut group = c.benchmark_group(format!("handshake-{VEIL_BUILD}"));
    group.bench_function(format!("x25519/dh/{X25519_IMPLEMENTATION}"), |b| b.iter(|| dh(&x)));
    group.bench_function(format!("x25519/keygen/{X25519_IMPLEMENTATION}"), |b| b.iter(|| keygen(&x)));
    let mut rng = StdRng::seed_from_u64(1);
    let mut buf = pair::packet_buffer();
    for (pattern, suite, cached) in cases() {
        let endpoints = endpoints(pattern, suite, cached);
        group.bench_function(BenchmarkId::new(label(pattern, cached), suite), |b| {
            b.iter(|| handshake(&endpoints, &mut rng, &mut buf))
        });
    }
    group.finish();
}

/// The ratios, timed interleaved with the DH and key generation they are compared with.
fn ratios() {
    let Some(plan) = Plan::from_args() else { return };
    let x = x25519();
    let mut rng = StdRng::seed_from_u64(2);
    let mut buf = pair::packet_buffer();
    if plan.is_measuring() {
        println!(
            "\nHandshakes ({VEIL_BUILD} build, stream mode) vs the X25519 bound ({X25519_IMPLEMENTATION}), interleaved over {} rounds; \
             times are each operation's fastest round, (m …) the median of the per-round ratios:",
            plan.rounds
        );
    }
    let mut worst = f64::INFINITY;
    for (pattern, suite, cached) in cases() {
        let Some(cost) = dh_cost(pattern) else { continue };
        // With the cache warm, the `ss` DHs are not computed: the bound leaves them out.
        let dh_count = if cached { cost.dh - cost.ss } else { cost.dh };
        let endpoints = endpoints(pattern, suite, cached);
        // Fills the caches (the first handshake computes `ss`).
        handshake(&endpoints, &mut rng, &mut buf);
        // The cached handshake is also timed against the uncached one, in the same rounds.
        let uncached = cached.then(|| self::endpoints(pattern, suite, false));
        let mut rng2 = StdRng::seed_from_u64(3);
        let mut buf2 = pair::packet_buffer();
        let mut ops: Vec<Box<dyn FnMut() + '_>> =
            vec![Box::new(|| dh(&x)), Box::new(|| keygen(&x)), Box::new(|| handshake(&endpoints, &mut rng, &mut buf))];
        if let Some(u) = &uncached {
            ops.push(Box::new(move || handshake(u, &mut rng2, &mut buf2)));
        }
        let mut refs: Vec<&mut dyn FnMut()> = ops.iter_mut().map(|o| &mut **o as &mut dyn FnMut()).collect();
        let rounds = timing::interleave(plan, &mut refs);
        drop(refs);
        drop(ops);
        if !plan.is_measuring() {
            continue;
        }
        let (dh, keygen) = (f64::from(dh_count), f64::from(cost.keygen));
        let (t_dh, t_keygen, t_hs) = (rounds.best_ns(0), rounds.best_ns(1), rounds.best_ns(2));
        let (bound, strict_bound) = (dh * t_dh, dh * t_dh + keygen * t_keygen);
        let ratio = bound / t_hs;
        if !cached {
            // The target is about the handshake as specified (every DH computed).
            worst = worst.min(ratio);
        }
        println!(
            "{} {suite}: {:.0} handshakes/s ({}), bound {:.0}/s ({} DH × {}), ratio {ratio:.3} (m {:.3}) {}; \
             with {} keygens × {}: bound {:.0}/s, ratio {:.3} (m {:.3})",
            label(pattern, cached),
            1e9 / t_hs,
            format_ns(t_hs),
            1e9 / bound,
            dh_count,
            format_ns(t_dh),
            rounds.median_of(|r| dh * r[0] / r[2]),
            if ratio >= TARGET { "target ≥ 0.85 met" } else { "target ≥ 0.85 MISSED" },
            cost.keygen,
            format_ns(t_keygen),
            1e9 / strict_bound,
            strict_bound / t_hs,
            rounds.median_of(|r| (dh * r[0] + keygen * r[1]) / r[2]),
        );
        if uncached.is_some() {
            println!(
                "  {} ÷ {pattern} (same rounds): {:.3}× the handshakes/s (m {:.3}); {pattern} {}",
                label(pattern, cached),
                rounds.best_ns(3) / t_hs,
                rounds.median_of(|r| r[3] / r[2]),
                format_ns(rounds.best_ns(3)),
            );
        }
    }
    if plan.is_measuring() {
        println!("lowest ratio to the DH bound, without the ss cache: {worst:.3} (target ≥ {TARGET})");
    }
}

fn config() -> Criterion {
    Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(2)).sample_size(20)
}

criterion_group! {
    name = benches;
    config = config();
    targets = handshakes
}
criterion_main!(benches, ratios);
