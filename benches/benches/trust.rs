//! The cost of certificate verification per handshake (issue 4), as a fraction of the handshake
//! time, measured in the same run.
//!
//! Measured, one thread, IK with ChaChaPoly/BLAKE2s in stream mode (the default handshake):
//! - `verify/1-cert` and `verify/2-cert`: one `TrustStore::verify` of a chain of one
//!   certificate (signed by the anchor) or two (leaf and intermediate), with a revocation list
//!   of 100 serials loaded and a time given — what a gateway runs for every device handshake;
//! - `handshake/plain`: a full handshake where the responder allows the initiator without a
//!   check (the `handshake` bench's IK case);
//! - `handshake/trusted`: the same handshake with a one-certificate chain on each side, each
//!   side verifying the other's (the responder after message 1, the initiator after message 2,
//!   spec §5.5), as two fleet nodes with trust authorizers do.
//!
//! After criterion, the ratios are printed from interleaved timing (`veil_benches::timing`):
//! one verification as a fraction of a plain handshake, and the whole trust overhead (chains in
//! the messages plus both verifications) as a fraction of the trusted handshake.
//!
//! Run with `cargo bench -p veil-benches --bench trust`; figures go to `benches/RESULTS.md`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use rand::rngs::StdRng;
use rand::SeedableRng;
use veil_benches::pair::{self, pump, Endpoints, NOW};
use veil_benches::timing::{self, format_ns, Plan};
use veil_benches::VEIL_BUILD;
use veil_protocol::trust::{
    CaSigningKey, CertRole, Certificate, CertificateBody, CertificateChain, RevocationList, RevocationListBody,
    RevokedSerial, RoleSet, TrustError, TrustStore, UnixTime,
};
use veil_protocol::{
    Config, Connection, ConnectionError, Decision, Event, Mode, Pattern, PublicKey, Role, StaticKeypair, Suite,
};

/// The Unix time every verification runs at.
const T: u64 = 1_800_000_000;
const DAY: u64 = 86_400;

/// A fleet: its CA and intermediate, and a gateway's store with a revocation list of 100
/// serials (none of the benchmark's).
struct Fleet {
    ca: CaSigningKey,
    inter: CaSigningKey,
    store: TrustStore,
}

fn fleet() -> Result<Fleet, TrustError> {
    let ca = CaSigningKey::from_seed([0xca; 32]);
    let inter = CaSigningKey::from_seed([0x1e; 32]);
    let mut store = TrustStore::new([ca.verifying_key()])?.require_time(true);
    let mut body = RevocationListBody::new(ca.issuer_id(), 1, T - DAY);
    body.serials = (1_000..1_100).map(|serial| RevokedSerial { issuer: ca.issuer_id(), serial }).collect();
    body.normalize();
    let list = RevocationList::sign(body, &ca)?;
    store.update_revocation_list(list.encoding())?;
    Ok(Fleet { ca, inter, store })
}

fn cert(signer: &CaSigningKey, key: [u8; 32], role: CertRole, serial: u64) -> Result<Certificate, TrustError> {
    let body = CertificateBody {
        // spec §15.3: a ca certificate has no groups.
        groups: if role == CertRole::Ca { Vec::new() } else { vec!["site-a".into()] },
        ..CertificateBody::new(key, format!("{role}-{serial}"), role, T - DAY, T + DAY, serial, signer.issuer_id())
    };
    Certificate::sign(body, signer)
}

fn chain(certs: Vec<Certificate>) -> Result<Vec<u8>, TrustError> {
    CertificateChain::new(certs)?.encode()
}

/// A node's chain signed by the anchor.
fn direct(f: &Fleet, key: &PublicKey, role: CertRole) -> Result<Vec<u8>, TrustError> {
    chain(vec![cert(&f.ca, *key.as_bytes(), role, 7)?])
}

/// A node's chain through the intermediate.
fn via_intermediate(f: &Fleet, key: &PublicKey, role: CertRole) -> Result<Vec<u8>, TrustError> {
    let icert = cert(&f.ca, f.inter.verifying_key().to_bytes(), CertRole::Ca, 2)?;
    chain(vec![cert(&f.inter, *key.as_bytes(), role, 8)?, icert])
}

/// Both ends of a fleet handshake: a device (initiator) and a gateway (responder), each with
/// its chain and a store, each verifying the other.
struct Trusted {
    store: TrustStore,
    device: Arc<Config>,
    gateway: Arc<Config>,
    gateway_key: PublicKey,
}

fn trusted(f: &Fleet) -> Result<Trusted, TrustError> {
    let device_id = StaticKeypair::from_secret_bytes([0x11; 32]);
    let gateway_id = StaticKeypair::from_secret_bytes([0x22; 32]);
    let gateway_key = *gateway_id.public();
    let mut device = Config::new(device_id, Mode::Stream);
    device.certificate_chain = Some(direct(f, device.public_key(), CertRole::Device)?);
    device.authorize_responder = true;
    let mut gateway = Config::new(gateway_id, Mode::Stream);
    gateway.certificate_chain = Some(direct(f, &gateway_key, CertRole::Gateway)?);
    Ok(Trusted { store: f.store.clone(), device: Arc::new(device), gateway: Arc::new(gateway), gateway_key })
}

/// Answers `c`'s authorization requests with the store's verdict.
fn decide(c: &mut Connection, store: &TrustStore, expected: RoleSet) -> Result<(), ConnectionError> {
    while let Some(event) = c.poll_event() {
        match event {
            Event::AuthorizationRequired { remote_static, certificate } => {
                let now = Some(UnixTime::from_secs(T));
                let decision = match store.verify(&remote_static, certificate.as_deref(), now, expected) {
                    Ok(_) => Decision::allow(),
                    Err(e) => Decision::Deny(e.deny_reason()),
                };
                c.authorize(NOW, decision)?;
            }
            Event::Closed(closed) => return Err(closed.error.unwrap_or(ConnectionError::Closed)),
            _ => {}
        }
    }
    Ok(())
}

impl Trusted {
    /// One full handshake, both sides verifying; both connections are dropped.
    fn handshake(&self, rng: &mut StdRng, buf: &mut [u8]) {
        let mut run = || -> Result<(), ConnectionError> {
            let mut a = Connection::new(Arc::clone(&self.device), Role::Initiator, Some(self.gateway_key), NOW, rng)?;
            let mut b = Connection::new(Arc::clone(&self.gateway), Role::Responder, None, NOW, rng)?;
            for _ in 0..4 {
                pump(&mut a, &mut b, buf)?;
                decide(&mut b, &self.store, RoleSet::DEVICE)?;
                pump(&mut b, &mut a, buf)?;
                decide(&mut a, &self.store, RoleSet::UPSTREAM)?;
                if a.is_connected() && b.is_connected() {
                    drop(black_box((a, b)));
                    return Ok(());
                }
            }
            Err(ConnectionError::NotConnected)
        };
        if let Err(e) = run() {
            panic!("trusted handshake failed: {e}");
        }
    }
}

fn plain_handshake(endpoints: &Endpoints, rng: &mut StdRng, buf: &mut [u8]) {
    match endpoints.connect(rng, buf) {
        Ok(pair) => drop(black_box(pair)),
        Err(e) => panic!("handshake failed: {e}"),
    }
}

/// What the benchmarks share.
struct Setup {
    fleet: Fleet,
    one: Vec<u8>,
    two: Vec<u8>,
    key: PublicKey,
    trusted: Trusted,
    plain: Endpoints,
}

fn try_setup() -> Result<Setup, TrustError> {
    let fleet = fleet()?;
    let key = *StaticKeypair::from_secret_bytes([0x33; 32]).public();
    let one = direct(&fleet, &key, CertRole::Device)?;
    let two = via_intermediate(&fleet, &key, CertRole::Device)?;
    let trusted = trusted(&fleet)?;
    let plain = Endpoints::new(Pattern::IK, Suite::ChaChaPolyBlake2s, Mode::Stream);
    Ok(Setup { fleet, one, two, key, trusted, plain })
}

fn setup() -> Setup {
    match try_setup() {
        Ok(s) => s,
        Err(e) => panic!("benchmark setup failed: {e}"),
    }
}

fn verify(s: &Setup, chain: &[u8]) {
    let now = Some(UnixTime::from_secs(T));
    match s.fleet.store.verify(black_box(&s.key), Some(black_box(chain)), now, RoleSet::DEVICE) {
        Ok(peer) => drop(black_box(peer)),
        Err(e) => panic!("verification failed: {e}"),
    }
}

fn benches(c: &mut Criterion) {
    let s = setup();
    let mut group = c.benchmark_group(format!("trust-{VEIL_BUILD}"));
    group.bench_function("verify/1-cert", |b| b.iter(|| verify(&s, &s.one)));
    group.bench_function("verify/2-cert", |b| b.iter(|| verify(&s, &s.two)));
    let mut rng = StdRng::seed_from_u64(1);
    let mut buf = pair::packet_buffer();
    group.bench_function("handshake/plain", |b| b.iter(|| plain_handshake(&s.plain, &mut rng, &mut buf)));
    group.bench_function("handshake/trusted", |b| b.iter(|| s.trusted.handshake(&mut rng, &mut buf)));
    group.finish();
}

/// The ratios, from interleaved timing of all four operations.
fn ratios() {
    let Some(plan) = Plan::from_args() else { return };
    let s = setup();
    let mut rng = StdRng::seed_from_u64(2);
    let mut buf = pair::packet_buffer();
    let mut rng2 = StdRng::seed_from_u64(3);
    let mut buf2 = pair::packet_buffer();
    let rounds = timing::interleave(
        plan,
        &mut [
            &mut || verify(&s, &s.one),
            &mut || verify(&s, &s.two),
            &mut || plain_handshake(&s.plain, &mut rng, &mut buf),
            &mut || s.trusted.handshake(&mut rng2, &mut buf2),
        ],
    );
    if !plan.is_measuring() {
        return;
    }
    let (v1, v2, plain, trusted) = (rounds.best_ns(0), rounds.best_ns(1), rounds.best_ns(2), rounds.best_ns(3));
    println!(
        "\nCertificate verification vs the handshake ({VEIL_BUILD} build, IK ChaChaPoly/BLAKE2s, stream mode, \
         interleaved over {} rounds; best round, (m …) median of per-round ratios):",
        plan.rounds
    );
    println!(
        "verify 1-cert chain: {} = {:.3} of a plain handshake ({}) (m {:.3})",
        format_ns(v1),
        v1 / plain,
        format_ns(plain),
        rounds.median_of(|r| r[0] / r[2]),
    );
    println!(
        "verify 2-cert chain: {} = {:.3} of a plain handshake (m {:.3})",
        format_ns(v2),
        v2 / plain,
        rounds.median_of(|r| r[1] / r[2]),
    );
    println!(
        "trusted handshake (chains both ways, both sides verify): {} = {:.2}× plain; trust overhead {} = {:.3} of \
         the trusted handshake (m {:.3}); the two verifications alone: {:.3} of it",
        format_ns(trusted),
        trusted / plain,
        format_ns(trusted - plain),
        (trusted - plain) / trusted,
        rounds.median_of(|r| (r[3] - r[2]) / r[3]),
        2.0 * v1 / trusted,
    );
}

fn config() -> Criterion {
    Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(2)).sample_size(20)
}

criterion_group! {
    name = trust_benches;
    config = config();
    targets = benches
}
criterion_main!(trust_benches, ratios);
