//! Shared helpers for the transport tests: seeded identities, loopback endpoints and a
//! time bound around everything.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use veil_protocol::{Pattern, Psk, PublicKey, StaticKeypair};
use veil_transports::{Authorizer, Endpoint, EndpointBuilder, EndpointLimits};

/// Upper bound on any single awaited step; tests are far quicker.
pub const STEP: Duration = Duration::from_secs(10);

pub const PSK: [u8; 32] = [0x42; 32];

/// Logs to the test output when RUST_LOG is set.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

pub fn keypair(seed: u64) -> StaticKeypair {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut secret = [0u8; 32];
    rng.fill_bytes(&mut secret);
    StaticKeypair::from_secret_bytes(secret)
}

pub fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Awaits `f`, failing the test if it takes longer than [`STEP`].
pub async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(STEP, f).await.expect("step timed out")
}

/// Polls `f` until it holds, every 20 ms for at most 10 s.
#[allow(dead_code)] // not every test file polls
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..500 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("never: {what}");
}

/// Limits loose enough for tests that open many connections from one address.
pub fn open_limits() -> EndpointLimits {
    let mut l = EndpointLimits::default();
    l.handshake_rate_per_ip = 1e6;
    l.handshake_burst_per_ip = 1_000_000;
    l
}

/// A server listening on TCP and UDP that accepts `clients`, with the psk and the KK
/// initiator set so that every pattern can reach it.
pub fn server_builder(id: StaticKeypair, clients: &[PublicKey]) -> EndpointBuilder {
    let mut b = Endpoint::builder(id)
        .authorizer(Authorizer::allowlist(clients.iter().copied()))
        .psk(Psk::new(PSK))
        .limits(open_limits())
        .listen_tcp(localhost())
        .bind_udp(localhost());
    if let Some(k) = clients.first() {
        b = b.kk_initiator(*k);
    }
    b
}

/// A client using `pattern`, allowing `server` (XX initiators decide about their responder).
pub fn client_builder(id: StaticKeypair, pattern: Pattern, server: PublicKey) -> EndpointBuilder {
    Endpoint::builder(id)
        .pattern(pattern)
        .psk(Psk::new(PSK))
        .authorizer(Authorizer::allowlist([server]))
        .limits(open_limits())
        .bind_udp(localhost())
}

/// The key an initiator must know in advance for `pattern`.
pub fn expected_key(pattern: Pattern, server: PublicKey) -> Option<PublicKey> {
    pattern.initiator_knows_responder().then_some(server)
}
