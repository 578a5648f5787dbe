//! Session seal+open throughput against raw AEAD of the same suite, measured in the same run.
//!
//! Three ways of moving one message from one side to the other, at 64 B, 1 KiB, 16 KiB and
//! 65 000 B of plaintext:
//!
//! - raw: one seal and one open of the bare AEAD (`veil_benches::raw`), no framing;
//! - session: [`Session::seal`](veil_protocol::Session::seal) on one side of an established
//!   pair and [`Session::open`](veil_protocol::Session::open) on the other, in place, in one
//!   buffer (the transport header as associated data, counters, epoch checks);
//! - connection: what an application gets: `Connection::send`, `poll_transmit`,
//!   `handle_input` on the peer and `poll_event` until the message comes out (message framing,
//!   queues, the received packet's copy into its own buffer, the event).
//!
//! The targets, against raw `ring` of the same suite with Veil built with `ring`:
//! ≥ 0.95 at 16 KiB and ≥ 0.8 at 64 B. Built without it (`--no-default-features`), Veil uses
//! the pure-Rust resolver of `no_std` firmware; that run also measures raw RustCrypto, its own
//! limit.
//!
//! After criterion's benchmarks the ratios are printed, timed interleaved with their limits
//! (`veil_benches::timing`), together with datagram-mode sessions and raw AEAD with a one-byte
//! stand-in for Veil's header as associated data, which tells the header's cost apart from the
//! session's.
//!
//! Run with `cargo bench -p veil-benches --bench session` (and again with
//! `--no-default-features`); figures go to `benches/RESULTS.md`.

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ring::aead::LessSafeKey;
use veil_benches::pair::{self, NOW};
use veil_benches::raw::{self, TAG_LEN};
use veil_benches::timing::{self, Plan};
use veil_benches::VEIL_BUILD;
use veil_protocol::{Connection, Event, Mode, Session, Suite};

/// Plaintext sizes: a sensor reading, a typical message, a bulk chunk, and the largest that
/// still fits one packet with Veil's framing.
const SIZES: [usize; 4] = [64, 1024, 16 * 1024, 65_000];

/// The first byte of a stream-mode transport packet, its whole header (spec §4.2).
const TRANSPORT_TYPE: u8 = veil_protocol::wire::TYPE_TRANSPORT;

/// The targets against raw ring, for the ring build.
fn target(size: usize) -> Option<f64> {
    match size {
        64 => Some(0.8),
        16_384 => Some(0.95),
        _ => None,
    }
}

fn short_name(suite: Suite) -> &'static str {
    match suite {
        Suite::ChaChaPolyBlake2s => "chacha20poly1305",
        Suite::AesGcmSha256 => "aes256gcm",
        _ => "unknown",
    }
}

/// Bare ring AEAD of a suite, with its Noise nonce layout.
struct RawRing {
    key: LessSafeKey,
    nonce: fn(u64) -> [u8; 12],
    counter: u64,
    /// Associated data: empty (Noise transport messages, the limit) or a stand-in for Veil's
    /// stream transport header, to show what authenticating it costs.
    ad: &'static [u8],
    buf: Vec<u8>,
}

impl RawRing {
    /// With Veil's one-byte stream transport header as associated data.
    fn with_header_ad(suite: Suite, size: usize) -> Self {
        Self { ad: &[TRANSPORT_TYPE], ..Self::new(suite, size) }
    }

    fn new(suite: Suite, size: usize) -> Self {
        let key = raw::random_key();
        let (key, nonce): (_, fn(u64) -> [u8; 12]) = match suite {
            Suite::AesGcmSha256 => (raw::ring_aes_256_gcm(&key), raw::aesgcm_nonce),
            _ => (raw::ring_chacha20_poly1305(&key), raw::chacha_nonce),
        };
        let mut buf = Vec::with_capacity(size + TAG_LEN);
        buf.resize(size, 0xa5);
        Self { key, nonce, counter: 0, ad: &[], buf }
    }

    fn round_trip(&mut self) {
        self.counter += 1;
        let r = raw::ring_seal_open_with_ad(&self.key, (self.nonce)(self.counter), self.ad, &mut self.buf);
        assert!(r.is_ok(), "ring round trip failed");
        black_box(&self.buf);
    }
}

/// Bare RustCrypto AEAD of a suite: the limit of the pure-Rust build.
struct RawRustCrypto {
    cipher: RustCryptoCipher,
    counter: u64,
    /// Associated data, as in [`RawRing`].
    ad: &'static [u8],
    buf: Vec<u8>,
}

enum RustCryptoCipher {
    ChaCha(chacha20poly1305::ChaCha20Poly1305),
    AesGcm(Box<aes_gcm::Aes256Gcm>),
}

impl RawRustCrypto {
    fn new(suite: Suite, size: usize) -> Self {
        let key = raw::random_key();
        let cipher = match suite {
            Suite::AesGcmSha256 => RustCryptoCipher::AesGcm(Box::new(raw::rustcrypto_aes_256_gcm(&key))),
            _ => RustCryptoCipher::ChaCha(raw::rustcrypto_chacha20_poly1305(&key)),
        };
        Self { cipher, counter: 0, ad: &[], buf: vec![0xa5; size] }
    }

    /// With Veil's one-byte stream transport header as associated data.
    fn with_header_ad(suite: Suite, size: usize) -> Self {
        Self { ad: &[TRANSPORT_TYPE], ..Self::new(suite, size) }
    }

    fn round_trip(&mut self) {
        self.counter += 1;
        let (n, ad) = (self.counter, self.ad);
        let r = match &self.cipher {
            RustCryptoCipher::ChaCha(c) => {
                raw::rustcrypto_seal_open_with_ad(c, raw::chacha_nonce(n), ad, &mut self.buf)
            }
            RustCryptoCipher::AesGcm(c) => {
                raw::rustcrypto_seal_open_with_ad(&**c, raw::aesgcm_nonce(n), ad, &mut self.buf)
            }
        };
        assert!(r.is_ok(), "RustCrypto round trip failed");
        black_box(&self.buf);
    }
}

/// An established pair used through its sessions only.
struct SessionPair {
    a: Connection,
    b: Connection,
    size: usize,
    buf: Vec<u8>,
}

impl SessionPair {
    fn new(suite: Suite, mode: Mode, size: usize) -> Self {
        let (a, b) = match pair::established(suite, mode) {
            Ok(p) => p,
            Err(e) => panic!("handshake failed: {e}"),
        };
        let header_len = a.session().map_or(0, Session::header_len);
        Self { a, b, size, buf: vec![0xa5; header_len + size + TAG_LEN] }
    }

    /// Seals `size` bytes on one side and opens them on the other, in place.
    fn round_trip(&mut self) {
        let (Some(tx), Some(rx)) = (self.a.session_mut(), self.b.session_mut()) else {
            panic!("pair not established");
        };
        let n = match tx.seal(NOW, &mut self.buf, self.size) {
            Ok(n) => n,
            Err(e) => panic!("seal failed: {e}"),
        };
        match rx.open(NOW, &mut self.buf[..n]) {
            Ok(plain) => assert_eq!(plain.len(), self.size, "open returned the wrong length"),
            Err(e) => panic!("open failed: {e}"),
        }
    }
}

/// An established pair used as an application uses it.
struct ConnectionPair {
    a: Connection,
    b: Connection,
    payload: Bytes,
    buf: Vec<u8>,
}

impl ConnectionPair {
    fn new(suite: Suite, size: usize) -> Self {
        let (a, b) = match pair::established(suite, Mode::Stream) {
            Ok(p) => p,
            Err(e) => panic!("handshake failed: {e}"),
        };
        Self { a, b, payload: Bytes::from(vec![0xa5; size]), buf: pair::packet_buffer() }
    }

    /// `send`, `poll_transmit`, the peer's `handle_input` and `poll_event`.
    fn round_trip(&mut self) {
        if let Err(e) = self.a.send(1, self.payload.clone()) {
            panic!("send failed: {e}");
        }
        let n = match self.a.poll_transmit(NOW, &mut self.buf) {
            Ok(Some(n)) => n,
            other => panic!("poll_transmit gave {other:?}"),
        };
        if let Err(e) = self.b.handle_input(NOW, &self.buf[..n]) {
            panic!("handle_input failed: {e}");
        }
        match self.b.poll_event() {
            Some(Event::Message { payload, .. }) if payload.len() == self.payload.len() => drop(black_box(payload)),
            other => panic!("expected the message, got {other:?}"),
        }
    }
}

fn throughput(c: &mut Criterion) {
    for suite in Suite::ALL {
        let mut group = c.benchmark_group(format!("session-{VEIL_BUILD}/{}", short_name(suite)));
        for size in SIZES {
            group.throughput(Throughput::Bytes(size as u64));
            // Each build's own limit; the ratios below measure raw ring in both builds.
            if VEIL_BUILD == "pure" {
                let mut raw_rc = RawRustCrypto::new(suite, size);
                group.bench_function(BenchmarkId::new("raw-rustcrypto", size), |b| b.iter(|| raw_rc.round_trip()));
            } else {
                let mut raw_ring = RawRing::new(suite, size);
                group.bench_function(BenchmarkId::new("raw-ring", size), |b| b.iter(|| raw_ring.round_trip()));
            }
            let mut session = SessionPair::new(suite, Mode::Stream, size);
            group.bench_function(BenchmarkId::new("veil-session", size), |b| b.iter(|| session.round_trip()));
            let mut connection = ConnectionPair::new(suite, size);
            group.bench_function(BenchmarkId::new("veil-connection", size), |b| b.iter(|| connection.round_trip()));
        }
        group.finish();
    }
}

fn gbps(size: usize, ns: f64) -> f64 {
    size as f64 / ns
}

/// The ratios, timed interleaved with their raw limits.
fn ratios() {
    let Some(plan) = Plan::from_args() else { return };
    if plan.is_measuring() {
        println!(
            "\nSeal+open ({VEIL_BUILD} build) vs raw ring of the same suite, interleaved over {} rounds; \
             GB/s = 10^9 plaintext bytes/s in each operation's fastest round, (m …) the median of the \
             per-round ratios:",
            plan.rounds
        );
    }
    for suite in Suite::ALL {
        for size in SIZES {
            let mut raw_ring = RawRing::new(suite, size);
            let mut raw_rc = RawRustCrypto::new(suite, size);
            let mut raw_ring_ad = RawRing::with_header_ad(suite, size);
            let mut raw_rc_ad = RawRustCrypto::with_header_ad(suite, size);
            let mut stream = SessionPair::new(suite, Mode::Stream, size);
            let mut datagram = SessionPair::new(suite, Mode::Datagram, size);
            let mut connection = ConnectionPair::new(suite, size);
            let rounds = timing::interleave(
                plan,
                &mut [
                    &mut || raw_ring.round_trip(),
                    &mut || raw_rc.round_trip(),
                    &mut || stream.round_trip(),
                    &mut || datagram.round_trip(),
                    &mut || connection.round_trip(),
                    &mut || raw_ring_ad.round_trip(),
                    &mut || raw_rc_ad.round_trip(),
                ],
            );
            if !plan.is_measuring() {
                continue;
            }
            let rate = |op: usize| gbps(size, rounds.best_ns(op));
            let ratio = |limit: usize, op: usize| {
                format!(
                    "{:.3} (m {:.3})",
                    rounds.best_ns(limit) / rounds.best_ns(op),
                    rounds.median_of(|r| r[limit] / r[op])
                )
            };
            let verdict = match (VEIL_BUILD, target(size)) {
                ("ring", Some(t)) if rounds.best_ns(0) / rounds.best_ns(2) >= t => format!(", target ≥ {t} met"),
                ("ring", Some(t)) => format!(", target ≥ {t} MISSED"),
                _ => String::new(),
            };
            println!(
                "{suite} {size} B: raw ring {:.2} GB/s, raw RustCrypto {:.2} GB/s, raw ring with the header as \
                 associated data {:.2} GB/s (session ratio to it {})\n    \
                 vs raw ring: session {:.2} GB/s, ratio {}{verdict} | datagram session {:.2} GB/s, ratio {} | \
                 connection {:.2} GB/s, ratio {}",
                rate(0),
                rate(1),
                rate(5),
                ratio(5, 2),
                rate(2),
                ratio(0, 2),
                rate(3),
                ratio(0, 3),
                rate(4),
                ratio(0, 4),
            );
            if VEIL_BUILD == "pure" {
                println!(
                    "    vs raw RustCrypto (the pure build's own limit): session {}, datagram session {}, \
                     connection {}; raw RustCrypto with the header as associated data {:.2} GB/s (session ratio \
                     to it {})",
                    ratio(1, 2),
                    ratio(1, 3),
                    ratio(1, 4),
                    rate(6),
                    ratio(6, 2),
                );
            }
        }
    }
}

fn config() -> Criterion {
    Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(2)).sample_size(20)
}

criterion_group! {
    name = benches;
    config = config();
    targets = throughput
}
criterion_main!(benches, ratios);
