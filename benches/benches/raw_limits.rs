//! The raw limits that Veil's own benchmarks are compared against: bare AEAD seal+open (ring and
//! RustCrypto, ChaCha20-Poly1305 and AES-256-GCM) at several message sizes, and one X25519 DH.
//!
//! Run with `cargo bench -p veil-benches --bench raw_limits`; figures go to `benches/RESULTS.md`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use veil_benches::raw::{self, TAG_LEN};

/// Plaintext sizes: a sensor reading, a typical message, a bulk chunk, and just under Noise's
/// 65 535-byte message limit once the 16-byte tag is added.
const SIZES: [usize; 4] = [64, 1024, 16 * 1024, 65_000];

fn plaintext(len: usize) -> Vec<u8> {
    // Room for the tag, so that ring's append-tag seal never reallocates inside the loop.
    let mut buf = Vec::with_capacity(len + TAG_LEN);
    buf.resize(len, 0xa5);
    buf
}

fn aead_seal_open(c: &mut Criterion) {
    let key = raw::random_key();
    let ring_chacha = raw::ring_chacha20_poly1305(&key);
    let ring_aes = raw::ring_aes_256_gcm(&key);
    let rc_chacha = raw::rustcrypto_chacha20_poly1305(&key);
    let rc_aes = raw::rustcrypto_aes_256_gcm(&key);

    let mut group = c.benchmark_group("aead_seal_open");
    for size in SIZES {
        group.throughput(Throughput::Bytes(size as u64));
        let mut buf = plaintext(size);
        let mut n = 0u64;

        group.bench_function(BenchmarkId::new("ring/chacha20poly1305", size), |b| {
            b.iter(|| {
                n += 1;
                let r = raw::ring_seal_open(&ring_chacha, raw::chacha_nonce(n), &mut buf);
                assert!(r.is_ok(), "ring ChaCha20-Poly1305 round trip failed");
                black_box(&buf);
            })
        });
        group.bench_function(BenchmarkId::new("ring/aes256gcm", size), |b| {
            b.iter(|| {
                n += 1;
                let r = raw::ring_seal_open(&ring_aes, raw::aesgcm_nonce(n), &mut buf);
                assert!(r.is_ok(), "ring AES-256-GCM round trip failed");
                black_box(&buf);
            })
        });
        group.bench_function(BenchmarkId::new("rustcrypto/chacha20poly1305", size), |b| {
            b.iter(|| {
                n += 1;
                let r = raw::rustcrypto_seal_open(&rc_chacha, raw::chacha_nonce(n), &mut buf);
                assert!(r.is_ok(), "RustCrypto ChaCha20-Poly1305 round trip failed");
                black_box(&buf);
            })
        });
        group.bench_function(BenchmarkId::new("rustcrypto/aes256gcm", size), |b| {
            b.iter(|| {
                n += 1;
                let r = raw::rustcrypto_seal_open(&rc_aes, raw::aesgcm_nonce(n), &mut buf);
                assert!(r.is_ok(), "RustCrypto AES-256-GCM round trip failed");
                black_box(&buf);
            })
        });
    }
    group.finish();
}

fn x25519(c: &mut Criterion) {
    let mut group = c.benchmark_group("x25519");
    for implementation in ["x25519-dalek", "aws-lc"] {
        let Ok(x) = raw::X25519::new(implementation) else { panic!("no X25519 {implementation}") };
        group.bench_function(BenchmarkId::new("dh", implementation), |b| {
            b.iter(|| assert!(black_box(black_box(&x).dh()).is_ok(), "X25519 DH failed"))
        });
        group.bench_function(BenchmarkId::new("keygen", implementation), |b| {
            b.iter(|| assert!(black_box(black_box(&x).keygen()).is_ok(), "X25519 key generation failed"))
        });
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3)).sample_size(20)
}

criterion_group! {
    name = raw_limits;
    config = config();
    targets = aead_seal_open, x25519
}
criterion_main!(raw_limits);
