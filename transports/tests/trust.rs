//! Trust end to end over the transports (spec §15, issue 4): both trust modes over TCP and
//! UDP; every bad certificate of the issue refused with its reason code; roles enforced by
//! direction; revocation applied to live sessions within a second while others carry on;
//! lists that do not verify refused and the current one kept; certificate expiry on a live
//! session; `TimeSync` believed only from a verified gateway or cloud.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod util;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use util::*;
use veil_protocol::trust::{
    Allowlist, Authorized, CaSigningKey, CertRole, Certificate, CertificateBody, CertificateChain, RevocationList,
    RevocationListBody, RevokedSerial, RoleSet, Trust, TrustError, TrustStore, UnixTime,
};
use veil_protocol::wire::RejectReason;
use veil_protocol::{CloseReason, Config, DenyReason, Mode, Pattern, PublicKey};
use veil_transports::{
    Authorizer, Connection, Endpoint, EndpointBuilder, Error, PeerRoles, TimeSource, Transport, TrustState,
};

const DAY: u64 = 86_400;
const TRANSPORTS: [Transport; 2] = [Transport::Tcp, Transport::Udp];
/// Handshake timeout of initiators whose UDP handshake is refused in silence (spec §11.9).
const SHORT: Duration = Duration::from_millis(400);

const GATEWAY: u64 = 1;
const CLOUD: u64 = 2;

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// The fleet's keys: its CA, an intermediate, and another fleet's CA.
struct Pki {
    ca: CaSigningKey,
    inter: CaSigningKey,
    other: CaSigningKey,
}

fn pki() -> Pki {
    Pki {
        ca: CaSigningKey::from_seed([0xca; 32]),
        inter: CaSigningKey::from_seed([0x1e; 32]),
        other: CaSigningKey::from_seed([0x07; 32]),
    }
}

fn cert(signer: &CaSigningKey, key: &[u8; 32], role: CertRole, serial: u64, nb: u64, na: u64) -> Certificate {
    let body = CertificateBody::new(*key, format!("{role}-{serial}"), role, nb, na, serial, signer.issuer_id());
    Certificate::sign(body, signer).unwrap()
}

/// A chain of one certificate by the fleet CA, valid for a day either side of now.
fn valid(p: &Pki, key: &PublicKey, role: CertRole, serial: u64) -> Vec<u8> {
    let now = unix_now();
    let c = cert(&p.ca, key.as_bytes(), role, serial, now - DAY, now + DAY);
    CertificateChain::new(vec![c]).unwrap().encode().unwrap()
}

/// The fleet's intermediate (serial 77) and a leaf it signed.
fn via_intermediate(p: &Pki, key: &PublicKey, role: CertRole, serial: u64) -> Vec<u8> {
    let now = unix_now();
    let icert = cert(&p.ca, &p.inter.verifying_key().to_bytes(), CertRole::Ca, 77, now - DAY, now + DAY);
    let leaf = cert(&p.inter, key.as_bytes(), role, serial, now - DAY, now + DAY);
    CertificateChain::new(vec![leaf, icert]).unwrap().encode().unwrap()
}

fn store(p: &Pki) -> TrustStore {
    TrustStore::new([p.ca.verifying_key()]).unwrap()
}

/// A revocation list of the fleet CA.
fn crl(p: &Pki, epoch: u64, serials: &[(&CaSigningKey, u64)], keys: &[PublicKey]) -> Vec<u8> {
    let mut b = RevocationListBody::new(p.ca.issuer_id(), epoch, unix_now() - 10);
    b.serials = serials.iter().map(|(k, serial)| RevokedSerial { issuer: k.issuer_id(), serial: *serial }).collect();
    b.keys = keys.iter().map(|k| *k.as_bytes()).collect();
    b.normalize();
    RevocationList::sign(b, &p.ca).unwrap().encoding().to_vec()
}

/// An endpoint with identity `seed`, the raw chain bytes `chain` (so that tests can send
/// bad ones), trust `state`, expecting `roles`; listening if `listen`.
fn node(seed: u64, chain: Option<Vec<u8>>, state: &TrustState, roles: PeerRoles, listen: bool) -> EndpointBuilder {
    let mut config = Config::new(keypair(seed), Mode::Stream);
    config.certificate_chain = chain;
    let b = EndpointBuilder::from_config(config)
        .authorizer(Authorizer::trust(state.clone(), roles))
        .limits(open_limits())
        .bind_udp(localhost());
    if listen {
        b.listen_tcp(localhost())
    } else {
        b
    }
}

/// A gateway of the fleet: real-time clock, accepts devices, certified as gateway.
fn gateway(p: &Pki, state: &TrustState) -> EndpointBuilder {
    let chain = valid(p, keypair(GATEWAY).public(), CertRole::Gateway, 1);
    node(GATEWAY, Some(chain), state, PeerRoles::for_node(CertRole::Gateway), true)
}

/// A device of the fleet without a clock, with the chain `chain`.
fn device(seed: u64, chain: Option<Vec<u8>>, p: &Pki) -> EndpointBuilder {
    let state = TrustState::fleet_ca(store(p), TimeSource::Learned);
    node(seed, chain, &state, PeerRoles::for_node(CertRole::Device), false)
}

fn addr(server: &Endpoint, t: Transport) -> std::net::SocketAddr {
    match t {
        Transport::Tcp => server.local_tcp_addr().unwrap(),
        Transport::Udp => server.local_udp_addr().unwrap(),
    }
}

/// Connects `client` to `server` over `t` (IK: the client knows the server's key) and
/// accepts on the server.
async fn pair(client: &Endpoint, server: &Endpoint, t: Transport) -> (Connection, Connection) {
    within(async { tokio::try_join!(client.connect(t, addr(server, t), Some(server.public_key())), server.accept()) })
        .await
        .unwrap()
}

async fn assert_alive(a: &Connection, b: &Connection, what: &str) {
    a.send(Bytes::from(what.to_owned())).await.unwrap();
    assert_eq!(within(b.recv()).await.unwrap().payload, what.as_bytes(), "{what}");
}

fn certified(c: &Connection) -> (CertRole, String) {
    match c.peer() {
        Some(Authorized::Certified(p)) => (p.role, p.name.clone()),
        other => panic!("not a certified peer: {other:?}"),
    }
}

#[tokio::test]
async fn fleet_ca_mode_end_to_end_over_tcp_and_udp() {
    init_tracing();
    let p = pki();
    let gw_state = TrustState::fleet_ca(store(&p), TimeSource::SystemClock);
    let gw = gateway(&p, &gw_state).bind().await.unwrap();
    for (t, pattern, serial) in
        [(Transport::Tcp, Pattern::IK, 10), (Transport::Udp, Pattern::IK, 11), (Transport::Tcp, Pattern::XX, 12)]
    {
        let what = format!("{t} {pattern:?}");
        let dev_key = *keypair(serial).public();
        let dev = device(serial, Some(valid(&p, &dev_key, CertRole::Device, serial)), &p)
            .pattern(pattern)
            .bind()
            .await
            .unwrap();
        let (c, s) = within(async {
            let key = pattern.initiator_knows_responder().then_some(gw.public_key());
            tokio::try_join!(dev.connect(t, addr(&gw, t), key), gw.accept())
        })
        .await
        .unwrap();
        // Each side verified the other's certificate (spec §15.6), in both directions.
        assert_eq!(certified(&s), (CertRole::Device, format!("device-{serial}")), "{what}");
        assert_eq!(certified(&c), (CertRole::Gateway, "gateway-1".to_owned()), "{what}");
        assert_alive(&c, &s, &what).await;
        assert_alive(&s, &c, &what).await;
    }
}

#[tokio::test]
async fn allowlist_mode_end_to_end_over_tcp_and_udp() {
    init_tracing();
    let gw_key = *keypair(GATEWAY).public();
    let dev_key = *keypair(20).public();
    let mut gw_list = Allowlist::new();
    gw_list.insert(dev_key, "sensor-20").unwrap();
    let gw_state = TrustState::allowlist(gw_list, TimeSource::SystemClock, []);
    let gw = node(GATEWAY, None, &gw_state, PeerRoles::for_node(CertRole::Gateway), true).bind().await.unwrap();
    let mut dev_list = Allowlist::new();
    dev_list.insert(gw_key, "gateway").unwrap();
    let dev_state = TrustState::allowlist(dev_list.clone(), TimeSource::Learned, [gw_key]);
    let dev = node(20, None, &dev_state, PeerRoles::for_node(CertRole::Device), false).bind().await.unwrap();
    for t in TRANSPORTS {
        let (c, s) = pair(&dev, &gw, t).await;
        assert!(matches!(s.peer(), Some(Authorized::Listed { name, .. }) if name == "sensor-20"), "{t}");
        assert!(matches!(c.peer(), Some(Authorized::Listed { name, .. }) if name == "gateway"), "{t}");
        assert_alive(&c, &s, &t.to_string()).await;
    }
    // A key that is not listed is refused (Unauthorized), over TCP with a REJECT, over UDP in
    // silence (the gateway reports it).
    let stranger_state = TrustState::allowlist(dev_list, TimeSource::Learned, []);
    let stranger = node(21, None, &stranger_state, PeerRoles::for_node(CertRole::Device), false)
        .handshake_timeout(SHORT)
        .bind()
        .await
        .unwrap();
    for t in TRANSPORTS {
        let mut failures = gw.handshake_failures();
        let e = within(stranger.connect(t, addr(&gw, t), Some(gw_key))).await.unwrap_err();
        match t {
            Transport::Tcp => assert_eq!(e.reject_reason(), Some(RejectReason::Unauthorized), "{e:?}"),
            Transport::Udp => assert!(e.is_handshake_timeout(), "{e:?}"),
        }
        let f = within(failures.recv()).await.unwrap();
        assert_eq!(f.error.deny_reason(), Some(DenyReason::Unauthorized), "{t}: {f:?}");
    }
    // Allowlist mode holds no trust anchor: a revocation list is refused with a typed error.
    assert!(matches!(gw.update_revocation_list(&[0; 80]), Err(Error::Trust(TrustError::UnknownIssuer))));
}

/// One bad input of the issue: the chain a device presents, and the reason the gateway
/// denies it with.
struct BadCase {
    what: &'static str,
    seed: u64,
    chain: Option<Vec<u8>>,
    reason: DenyReason,
}

fn bad_cases(p: &Pki) -> Vec<BadCase> {
    let now = unix_now();
    let key = |seed: u64| *keypair(seed).public().as_bytes();
    let one = |c: Certificate| CertificateChain::new(vec![c]).unwrap().encode().unwrap();
    let tampered = {
        let good = cert(&p.ca, &key(34), CertRole::Device, 34, now - DAY, now + DAY);
        let mut bytes = good.encoding().to_vec();
        let n = bytes.len();
        bytes[n - 5] ^= 0x01;
        one(Certificate::decode(&bytes).unwrap())
    };
    let non_canonical = {
        // The chain count as the overlong varint 81 00 (spec §15.4: NonCanonical).
        let ok = valid(p, keypair(35).public(), CertRole::Device, 35);
        [&[0x81, 0x00][..], &ok[1..]].concat()
    };
    vec![
        BadCase {
            what: "expired",
            seed: 31,
            chain: Some(one(cert(&p.ca, &key(31), CertRole::Device, 31, now - 3 * DAY, now - 2 * DAY))),
            reason: DenyReason::BadCertificate,
        },
        BadCase {
            what: "not yet valid",
            seed: 32,
            chain: Some(one(cert(&p.ca, &key(32), CertRole::Device, 32, now + 2 * DAY, now + 3 * DAY))),
            reason: DenyReason::BadCertificate,
        },
        BadCase {
            what: "signed by another CA",
            seed: 33,
            chain: Some(one(cert(&p.other, &key(33), CertRole::Device, 33, now - DAY, now + DAY))),
            reason: DenyReason::BadCertificate,
        },
        BadCase { what: "tampered signature", seed: 34, chain: Some(tampered), reason: DenyReason::BadCertificate },
        BadCase {
            what: "non-canonical encoding",
            seed: 35,
            chain: Some(non_canonical),
            reason: DenyReason::BadCertificate,
        },
        BadCase {
            what: "wrong role (a gateway posing as a device)",
            seed: 36,
            chain: Some(valid(p, keypair(36).public(), CertRole::Gateway, 36)),
            reason: DenyReason::Unauthorized,
        },
        BadCase {
            what: "certificate key is not the Noise static key",
            seed: 37,
            chain: Some(valid(p, keypair(99).public(), CertRole::Device, 37)),
            reason: DenyReason::BadCertificate,
        },
        BadCase {
            what: "revoked serial",
            seed: 38,
            chain: Some(valid(p, keypair(38).public(), CertRole::Device, 66)),
            reason: DenyReason::Revoked,
        },
        BadCase {
            what: "revoked CA (the intermediate)",
            seed: 39,
            chain: Some(via_intermediate(p, keypair(39).public(), CertRole::Device, 39)),
            reason: DenyReason::Revoked,
        },
        BadCase { what: "no certificate", seed: 40, chain: None, reason: DenyReason::BadCertificate },
    ]
}

#[tokio::test]
async fn each_bad_certificate_is_refused_with_its_reason_code() {
    init_tracing();
    let p = pki();
    let gw_state = TrustState::fleet_ca(store(&p), TimeSource::SystemClock);
    // The gateway's list revokes serial 66 of the CA and the intermediate (serial 77).
    gw_state.update_revocation_list(&crl(&p, 1, &[(&p.ca, 66), (&p.ca, 77)], &[])).unwrap();
    let gw = gateway(&p, &gw_state).bind().await.unwrap();
    for case in bad_cases(&p) {
        let dev = device(case.seed, case.chain.clone(), &p).handshake_timeout(SHORT).bind().await.unwrap();
        for t in TRANSPORTS {
            let what = format!("{} over {t}", case.what);
            let mut failures = gw.handshake_failures();
            let e = within(dev.connect(t, addr(&gw, t), Some(gw.public_key()))).await.unwrap_err();
            match t {
                // spec §5.8, §15.9: the initiator sees the mapped REJECT reason.
                Transport::Tcp => assert_eq!(e.reject_reason(), Some(case.reason.reject_reason()), "{what}: {e:?}"),
                // spec §11.9: no oracle in datagram mode; the initiator times out.
                Transport::Udp => assert!(e.is_handshake_timeout(), "{what}: {e:?}"),
            }
            let f = within(failures.recv()).await.unwrap();
            assert_eq!(f.error.deny_reason(), Some(case.reason), "{what}: {f:?}");
        }
    }
    // The gateway still serves good devices.
    let good = device(41, Some(valid(&p, keypair(41).public(), CertRole::Device, 41)), &p).bind().await.unwrap();
    let (c, s) = pair(&good, &gw, Transport::Tcp).await;
    assert_alive(&c, &s, "good device after the bad ones").await;
}

#[tokio::test]
async fn a_chain_that_does_not_certify_the_endpoint_key_is_refused_at_bind() {
    let p = pki();
    let chain = CertificateChain::decode(&valid(&p, keypair(99).public(), CertRole::Device, 5)).unwrap();
    let r = Endpoint::builder(keypair(5)).certificate_chain(&chain).bind().await;
    assert!(matches!(r, Err(Error::Trust(TrustError::KeyMismatch))), "{r:?}");
    let own = CertificateChain::decode(&valid(&p, keypair(5).public(), CertRole::Device, 5)).unwrap();
    assert!(Endpoint::builder(keypair(5)).certificate_chain(&own).bind().await.is_ok());
}

#[tokio::test]
async fn roles_are_enforced_by_direction() {
    init_tracing();
    let p = pki();
    // The cloud's gateway uplink accepts gateways only.
    let cloud_state = TrustState::fleet_ca(store(&p), TimeSource::SystemClock);
    let cloud_chain = valid(&p, keypair(CLOUD).public(), CertRole::Cloud, 2);
    let cloud = node(CLOUD, Some(cloud_chain), &cloud_state, PeerRoles::GATEWAY_UPLINK, true).bind().await.unwrap();
    let gw_state = TrustState::fleet_ca(store(&p), TimeSource::SystemClock);
    let gw = gateway(&p, &gw_state).bind().await.unwrap();
    // A device certificate cannot open a gateway uplink.
    let dev = device(50, Some(valid(&p, keypair(50).public(), CertRole::Device, 50)), &p).bind().await.unwrap();
    let e = within(dev.connect_tcp(cloud.local_tcp_addr().unwrap(), Some(cloud.public_key()))).await.unwrap_err();
    assert_eq!(e.reject_reason(), Some(RejectReason::Unauthorized), "{e:?}");
    // A gateway can, over both carriers; each side sees the other's verified role.
    for t in TRANSPORTS {
        let (up, down) = pair(&gw, &cloud, t).await;
        assert_eq!(certified(&down).0, CertRole::Gateway, "{t}");
        assert_eq!(certified(&up).0, CertRole::Cloud, "{t}");
        assert_alive(&up, &down, "uplink").await;
    }
    // The gateway connecting out expects a cloud: a responder certified as a device is denied
    // by the initiator (spec §5.5), which sends nothing more.
    let rogue_state = TrustState::fleet_ca(store(&p), TimeSource::SystemClock);
    let rogue_chain = valid(&p, keypair(51).public(), CertRole::Device, 51);
    let rogue = node(51, Some(rogue_chain), &rogue_state, PeerRoles::GATEWAY_UPLINK, true)
        .handshake_timeout(SHORT)
        .bind()
        .await
        .unwrap();
    for t in TRANSPORTS {
        let e = within(gw.connect(t, addr(&rogue, t), Some(rogue.public_key()))).await.unwrap_err();
        assert_eq!(e.deny_reason(), Some(DenyReason::Unauthorized), "{t}: {e:?}");
    }
    // Per connect call: the same peer is accepted where a device is what the caller expects,
    // and the cloud is not.
    let (c, _s) = within(async {
        tokio::try_join!(
            gw.connect_expecting(
                Transport::Tcp,
                addr(&rogue, Transport::Tcp),
                Some(rogue.public_key()),
                RoleSet::DEVICE
            ),
            rogue.accept()
        )
    })
    .await
    .unwrap();
    assert_eq!(certified(&c).0, CertRole::Device);
    let e = within(gw.connect_expecting(
        Transport::Tcp,
        addr(&cloud, Transport::Tcp),
        Some(cloud.public_key()),
        RoleSet::DEVICE,
    ))
    .await
    .unwrap_err();
    assert_eq!(e.deny_reason(), Some(DenyReason::Unauthorized), "{e:?}");
}

/// How a connection ended, waiting at most [`STEP`].
async fn ended(c: &Connection) -> Error {
    within(c.closed()).await
}

#[tokio::test]
async fn live_revocation_closes_within_a_second_while_other_connections_carry_on() {
    init_tracing();
    let p = pki();
    let gw_state = TrustState::fleet_ca(store(&p), TimeSource::SystemClock);
    let gw = gateway(&p, &gw_state).bind().await.unwrap();
    let revoked_dev = device(60, Some(valid(&p, keypair(60).public(), CertRole::Device, 60)), &p).bind().await.unwrap();
    let kept_dev = device(61, Some(valid(&p, keypair(61).public(), CertRole::Device, 61)), &p).bind().await.unwrap();
    let mut revoked = Vec::new();
    let mut kept = Vec::new();
    for t in TRANSPORTS {
        revoked.push((t, pair(&revoked_dev, &gw, t).await));
        kept.push((t, pair(&kept_dev, &gw, t).await));
    }
    for (t, (c, s)) in revoked.iter().chain(&kept) {
        assert_alive(c, s, &format!("{t} before the update")).await;
    }

    let start = std::time::Instant::now();
    let update = gw.update_revocation_list(&crl(&p, 1, &[(&p.ca, 60)], &[])).unwrap();
    assert_eq!((update.epoch, update.previous_epoch), (1, None));
    for (t, (c, s)) in &revoked {
        // The device hears an authenticated Close(Revoked); the gateway closed it locally.
        let e = ended(c).await;
        let elapsed = start.elapsed();
        assert!(
            matches!(e, Error::Closed { reason: CloseReason::Revoked, by_peer: true }),
            "{t}: device side ended with {e:?}"
        );
        // spec §15.8, the functional requirement: within one second of the update.
        assert!(elapsed < Duration::from_secs(1), "{t}: closed {elapsed:?} after the update");
        let e = ended(s).await;
        assert!(matches!(e, Error::Closed { reason: CloseReason::Revoked, by_peer: false }), "{t}: {e:?}");
    }
    for (t, (c, s)) in &kept {
        assert_alive(c, s, &format!("{t} after the update")).await;
        assert_alive(s, c, &format!("{t} after the update, back")).await;
    }
    // A new handshake of the revoked device is refused (spec §15.6 at every handshake).
    let e = within(revoked_dev.connect_tcp(gw.local_tcp_addr().unwrap(), Some(gw.public_key()))).await.unwrap_err();
    assert_eq!(e.reject_reason(), Some(RejectReason::Revoked), "{e:?}");
}

#[tokio::test]
async fn a_revocation_list_that_does_not_verify_is_refused_and_the_current_one_kept() {
    init_tracing();
    let p = pki();
    let gw_state = TrustState::fleet_ca(store(&p), TimeSource::SystemClock);
    let gw = gateway(&p, &gw_state).bind().await.unwrap();
    gw.update_revocation_list(&crl(&p, 5, &[], &[])).unwrap();
    let dev = device(70, Some(valid(&p, keypair(70).public(), CertRole::Device, 70)), &p).bind().await.unwrap();
    let (c, s) = pair(&dev, &gw, Transport::Udp).await;

    let revoking = |epoch| crl(&p, epoch, &[(&p.ca, 70)], &[]);
    let mut tampered = revoking(6);
    let n = tampered.len();
    tampered[n - 1] ^= 0x80;
    let foreign = {
        let mut b = RevocationListBody::new(p.other.issuer_id(), 9, unix_now());
        b.serials = vec![RevokedSerial { issuer: p.ca.issuer_id(), serial: 70 }];
        RevocationList::sign(b, &p.other).unwrap().encoding().to_vec()
    };
    let cases: [(&str, Vec<u8>, TrustError); 5] = [
        ("stale (same epoch)", revoking(5), TrustError::StaleRevocationList { current: 5, received: 5 }),
        ("stale (older epoch)", revoking(4), TrustError::StaleRevocationList { current: 5, received: 4 }),
        ("tampered signature", tampered, TrustError::BadSignature),
        ("another CA's list", foreign, TrustError::UnknownIssuer),
        ("truncated", revoking(6)[..n - 1].to_vec(), TrustError::Malformed),
    ];
    for (what, list, want) in cases {
        match gw.update_revocation_list(&list) {
            Err(Error::Trust(e)) => assert_eq!(e, want, "{what}"),
            other => panic!("{what}: {other:?}"),
        }
        match gw_state.snapshot() {
            Trust::FleetCa(st) => assert_eq!(st.revocation_epoch(p.ca.issuer_id()), Some(5), "{what}"),
            other => panic!("{other:?}"),
        }
        // The session is not touched.
        assert_alive(&c, &s, what).await;
    }
    // Without a trust state there is nothing to update.
    let plain = Endpoint::builder(keypair(71)).bind().await.unwrap();
    assert!(matches!(plain.update_revocation_list(&revoking(7)), Err(Error::NoTrust)));
}

#[tokio::test]
async fn a_pushed_revocation_list_is_applied_published_and_passed_on() {
    init_tracing();
    let p = pki();
    // cloud ⇄ gateway uplink, gateway ⇄ device.
    let cloud_state = TrustState::fleet_ca(store(&p), TimeSource::SystemClock);
    let cloud_chain = valid(&p, keypair(CLOUD).public(), CertRole::Cloud, 2);
    let cloud =
        node(CLOUD, Some(cloud_chain), &cloud_state, PeerRoles::for_node(CertRole::Cloud), true).bind().await.unwrap();
    let gw_state = TrustState::fleet_ca(store(&p), TimeSource::SystemClock);
    let gw = gateway(&p, &gw_state).bind().await.unwrap();
    let dev = device(80, Some(valid(&p, keypair(80).public(), CertRole::Device, 80)), &p).bind().await.unwrap();
    let (up, down) = pair(&gw, &cloud, Transport::Tcp).await;
    let (dev_conn, gw_conn) = pair(&dev, &gw, Transport::Udp).await;
    let mut pushed = gw.revocation_lists();

    // A list the gateway cannot verify: published with the error, the session goes on.
    let mut bad = crl(&p, 3, &[(&p.ca, 80)], &[]);
    let n = bad.len();
    bad[n - 2] ^= 0x10;
    down.push_revocation_list(Bytes::from(bad)).await.unwrap();
    let got = within(pushed.recv()).await.unwrap();
    assert_eq!(got.remote_static, cloud.public_key());
    assert!(matches!(got.result, Err(Error::Trust(TrustError::BadSignature))), "{:?}", got.result);
    assert_alive(&dev_conn, &gw_conn, "after a bad push").await;
    assert_alive(&down, &up, "uplink after a bad push").await;

    // The cloud's new list: the gateway applies it and the revoked device's session closes.
    let list = crl(&p, 3, &[(&p.ca, 80)], &[]);
    down.push_revocation_list(Bytes::from(list.clone())).await.unwrap();
    let got = within(pushed.recv()).await.unwrap();
    assert_eq!(got.connection, up.id());
    assert_eq!(got.result.as_ref().map(|u| u.epoch).ok(), Some(3), "{:?}", got.result);
    assert_eq!(&got.list[..], &list[..]);
    let e = ended(&dev_conn).await;
    assert!(matches!(e, Error::Closed { reason: CloseReason::Revoked, by_peer: true }), "{e:?}");
    // The uplink carries on, and the device's own trust state can receive the list too.
    assert_alive(&up, &down, "uplink after the push").await;
    let dev2 = device(81, Some(valid(&p, keypair(81).public(), CertRole::Device, 81)), &p).bind().await.unwrap();
    let (d2, g2) = pair(&dev2, &gw, Transport::Tcp).await;
    let mut dev_pushed = dev2.revocation_lists();
    g2.push_revocation_list(Bytes::from(list)).await.unwrap();
    let got = within(dev_pushed.recv()).await.unwrap();
    assert_eq!(got.result.map(|u| u.epoch).ok(), Some(3));
    assert_alive(&g2, &d2, "device after its own update").await;
    // An oversized list is refused before it is queued.
    let huge = Bytes::from(vec![0u8; veil_protocol::trust::MAX_REVOCATION_LIST_LEN + 1]);
    assert!(matches!(g2.push_revocation_list(huge).await, Err(Error::MessageTooLarge { .. })));
}

/// A device in allowlist mode that trusts the gateway `GATEWAY`.
async fn listed_device(seed: u64) -> Endpoint {
    let mut list = Allowlist::new();
    list.insert(*keypair(GATEWAY).public(), "gateway").unwrap();
    let state = TrustState::allowlist(list, TimeSource::Learned, []);
    node(seed, None, &state, PeerRoles::for_node(CertRole::Device), false).bind().await.unwrap()
}

#[tokio::test]
async fn a_trust_reload_that_unlists_a_peer_closes_its_connections_and_keeps_the_others() {
    init_tracing();
    let allow = |seeds: &[u64]| {
        let mut list = Allowlist::new();
        for &s in seeds {
            list.insert(*keypair(s).public(), format!("sensor-{s}")).unwrap();
        }
        Trust::Allowlist(list)
    };
    let Trust::Allowlist(initial) = allow(&[110, 111]) else { unreachable!() };
    let gw_state = TrustState::allowlist(initial, TimeSource::SystemClock, []);
    let gw = node(GATEWAY, None, &gw_state, PeerRoles::for_node(CertRole::Gateway), true).bind().await.unwrap();
    let dropped_dev = listed_device(110).await;
    let kept_dev = listed_device(111).await;
    let mut dropped = Vec::new();
    let mut kept = Vec::new();
    for t in TRANSPORTS {
        dropped.push((t, pair(&dropped_dev, &gw, t).await));
        kept.push((t, pair(&kept_dev, &gw, t).await));
    }

    // The reload (say, SIGHUP after editing the allowlist file): 110 is gone, 112 is new.
    gw_state.replace(allow(&[111, 112])).unwrap();
    for (t, (c, s)) in &dropped {
        let e = ended(c).await;
        assert!(matches!(e, Error::Closed { reason: CloseReason::Unauthorized, by_peer: true }), "{t}: {e:?}");
        let e = ended(s).await;
        assert!(matches!(e, Error::Closed { reason: CloseReason::Unauthorized, by_peer: false }), "{t}: {e:?}");
    }
    for (t, (c, s)) in &kept {
        assert_alive(c, s, &format!("{t} after the reload")).await;
        assert_alive(s, c, &format!("{t} after the reload, back")).await;
    }
    // New handshakes follow the new list: 110 is refused, 112 gets in.
    let e = within(dropped_dev.connect_tcp(gw.local_tcp_addr().unwrap(), Some(gw.public_key()))).await.unwrap_err();
    assert_eq!(e.reject_reason(), Some(RejectReason::Unauthorized), "{e:?}");
    let new_dev = listed_device(112).await;
    let (c, s) = pair(&new_dev, &gw, Transport::Udp).await;
    assert_alive(&c, &s, "a device listed by the reload").await;
}

#[tokio::test]
async fn a_trust_reload_with_a_newer_revocation_list_closes_the_revoked_peer_only() {
    init_tracing();
    let p = pki();
    let gw_state = TrustState::fleet_ca(store(&p), TimeSource::SystemClock);
    let gw = gateway(&p, &gw_state).bind().await.unwrap();
    let revoked_dev =
        device(120, Some(valid(&p, keypair(120).public(), CertRole::Device, 120)), &p).bind().await.unwrap();
    let kept_dev =
        device(121, Some(via_intermediate(&p, keypair(121).public(), CertRole::Device, 121)), &p).bind().await.unwrap();
    let (rc, rs) = pair(&revoked_dev, &gw, Transport::Udp).await;
    let (kc, ks) = pair(&kept_dev, &gw, Transport::Tcp).await;

    let mut reloaded = store(&p);
    reloaded.update_revocation_list(&crl(&p, 2, &[(&p.ca, 120)], &[])).unwrap();
    gw_state.replace(Trust::FleetCa(reloaded)).unwrap();
    let e = ended(&rc).await;
    assert!(matches!(e, Error::Closed { reason: CloseReason::Revoked, by_peer: true }), "{e:?}");
    assert!(matches!(ended(&rs).await, Error::Closed { reason: CloseReason::Revoked, by_peer: false }));
    assert_alive(&kc, &ks, "after the reload").await;
    // Restoring the older file (no list at all) cannot undo the revocation.
    assert_eq!(
        gw_state.replace(Trust::FleetCa(store(&p))).unwrap_err(),
        TrustError::StaleRevocationList { current: 2, received: 0 }
    );
    let e = within(revoked_dev.connect_tcp(gw.local_tcp_addr().unwrap(), Some(gw.public_key()))).await.unwrap_err();
    assert_eq!(e.reject_reason(), Some(RejectReason::Revoked), "{e:?}");
    assert_alive(&ks, &kc, "after the refused reload").await;
}

#[tokio::test]
async fn a_live_session_closes_when_the_peer_certificate_expires() {
    init_tracing();
    let p = pki();
    // No skew tolerance, so that the test waits only for the certificate's own end.
    let gw_state = TrustState::fleet_ca(store(&p).with_clock_skew(0), TimeSource::SystemClock);
    let gw = gateway(&p, &gw_state).bind().await.unwrap();
    let now = unix_now();
    // Valid for 4 more seconds: time enough to connect twice on a loaded machine.
    let short_lived = cert(&p.ca, keypair(90).public().as_bytes(), CertRole::Device, 90, now - DAY, now + 4);
    let chain = CertificateChain::new(vec![short_lived]).unwrap().encode().unwrap();
    let dev = device(90, Some(chain), &p).bind().await.unwrap();
    let mut conns = Vec::new();
    for t in TRANSPORTS {
        let (c, s) = pair(&dev, &gw, t).await;
        assert_alive(&c, &s, "before expiry").await;
        conns.push((t, c, s));
    }
    for (t, c, s) in &conns {
        let e = ended(c).await;
        assert!(matches!(e, Error::Closed { reason: CloseReason::BadCertificate, by_peer: true }), "{t}: {e:?}");
        assert!(unix_now() > now + 4, "{t}: closed before the certificate expired");
        let e = ended(s).await;
        assert!(matches!(e, Error::Closed { reason: CloseReason::BadCertificate, by_peer: false }), "{t}: {e:?}");
    }
}

/// Waits (bounded) until `dev`'s trust state knows the time.
async fn learned_time(state: &TrustState) -> Option<UnixTime> {
    for _ in 0..200 {
        if let Some(t) = state.now() {
            return Some(t);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

#[tokio::test]
async fn a_device_learns_time_only_from_a_verified_gateway_and_then_rechecks() {
    init_tracing();
    let p = pki();
    // A responder certified as a device, with a clock: it sends TimeSync to device peers,
    // but a device must not believe another device (spec §15.7).
    let peer_state = TrustState::fleet_ca(store(&p), TimeSource::SystemClock);
    let peer_chain = valid(&p, keypair(100).public(), CertRole::Device, 100);
    let peer = node(100, Some(peer_chain), &peer_state, PeerRoles::new(RoleSet::DEVICE, RoleSet::NONE), true)
        .bind()
        .await
        .unwrap();
    let dev_chain = valid(&p, keypair(101).public(), CertRole::Device, 101);
    let dev = device(101, Some(dev_chain.clone()), &p).bind().await.unwrap();
    let dev_state = dev.trust_state().unwrap().clone();
    let (c, s) = within(async {
        tokio::try_join!(
            dev.connect_expecting(
                Transport::Tcp,
                addr(&peer, Transport::Tcp),
                Some(peer.public_key()),
                RoleSet::DEVICE
            ),
            peer.accept()
        )
    })
    .await
    .unwrap();
    // TimeSync travels ahead of data: once this message is in, the TimeSync was handled.
    assert_alive(&s, &c, "after the device's TimeSync").await;
    assert_eq!(dev_state.now(), None, "a device peer is no time source");

    // A certified gateway is: the device learns the time and raises its floor.
    let gw_state = TrustState::fleet_ca(store(&p), TimeSource::SystemClock);
    let gw = gateway(&p, &gw_state).bind().await.unwrap();
    let (c, s) = pair(&dev, &gw, Transport::Udp).await;
    let t = learned_time(&dev_state).await.expect("time learned from the gateway");
    assert!(t.as_secs().abs_diff(unix_now()) <= 2, "{t:?}");
    match dev_state.snapshot() {
        Trust::FleetCa(st) => assert!(st.time_floor().is_some_and(|f| f.as_secs() + 2 >= unix_now())),
        other => panic!("{other:?}"),
    }
    assert_alive(&c, &s, "with a gateway").await;

    // A device that could not tell time accepted a gateway whose certificate had expired;
    // once a gateway tells it the time, it re-checks and closes that session (spec §15.7).
    let stale_gw_state = TrustState::fleet_ca(store(&p), TimeSource::SystemClock);
    let now = unix_now();
    let expired = cert(&p.ca, keypair(102).public().as_bytes(), CertRole::Gateway, 102, now - 3 * DAY, now - 2 * DAY);
    let stale_chain = CertificateChain::new(vec![expired]).unwrap().encode().unwrap();
    let stale_gw = node(102, Some(stale_chain), &stale_gw_state, PeerRoles::for_node(CertRole::Gateway), true)
        .bind()
        .await
        .unwrap();
    let fresh = device(103, Some(valid(&p, keypair(103).public(), CertRole::Device, 103)), &p).bind().await.unwrap();
    let (c, _s) = pair(&fresh, &stale_gw, Transport::Tcp).await;
    // The expired gateway's own TimeSync is what tells the device the time.
    let e = ended(&c).await;
    assert!(matches!(e, Error::Closed { reason: CloseReason::BadCertificate, by_peer: false }), "{e:?}");
    assert!(fresh.trust_state().unwrap().now().is_some());
}
