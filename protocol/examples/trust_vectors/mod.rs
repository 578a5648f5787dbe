//! `spec/vectors/trust.json` (spec §15.12): node ids, certificates, chains, revocation lists,
//! verification checks, list updates and malformed inputs, all from fixed keys. Ed25519
//! signatures are deterministic, so two runs write identical files.

use serde::Serialize;
use veil_protocol::trust::{
    CaSigningKey, CertRole, Certificate, CertificateBody, CertificateChain, IssuerId, NodeId, RevocationList,
    RevocationListBody, RevokedSerial, RoleSet, TrustStore, UnixTime, CLOCK_SKEW_SECS,
};
use veil_protocol::StaticKeypair;

/// 2026-01-01T00:00:00Z and a year later: the validity of every certificate.
const NOT_BEFORE: u64 = 1_767_225_600;
const NOT_AFTER: u64 = 1_798_761_600;
/// The time of most checks: 2026-07-01T00:00:00Z.
const NOW: u64 = 1_782_864_000;

const CAS: [(&str, [u8; 32]); 3] = [("ca", [0x11; 32]), ("intermediate", [0x12; 32]), ("foreign_ca", [0x13; 32])];
const NODES: [(&str, [u8; 32]); 3] = [("device", [0x21; 32]), ("gateway", [0x22; 32]), ("cloud", [0x23; 32])];

#[derive(Serialize)]
pub struct TrustFile {
    description: &'static str,
    spec: &'static str,
    generator: &'static str,
    signature_contexts: SignatureContexts,
    keys: Keys,
    certificates: Vec<CertJson>,
    chains: Vec<ChainJson>,
    revocation_lists: Vec<ListJson>,
    checks: Vec<CheckJson>,
    updates: Vec<UpdateJson>,
    malformed: Vec<MalformedJson>,
}

#[derive(Serialize)]
struct SignatureContexts {
    certificate: String,
    revocation_list: String,
    node_id: String,
    issuer_id: String,
}

#[derive(Serialize)]
struct Keys {
    signing: Vec<SigningKeyJson>,
    nodes: Vec<NodeKeyJson>,
}

#[derive(Serialize)]
struct SigningKeyJson {
    name: &'static str,
    seed: String,
    public: String,
    issuer_id: String,
}

#[derive(Serialize)]
struct NodeKeyJson {
    name: &'static str,
    static_secret: String,
    static_public: String,
    node_id: String,
}

#[derive(Serialize)]
struct CertJson {
    name: &'static str,
    signer: &'static str,
    version: u8,
    public_key: String,
    subject_name: String,
    role: &'static str,
    groups: Vec<String>,
    not_before: u64,
    not_after: u64,
    serial: u64,
    issuer: String,
    body: String,
    signature: String,
    encoding: String,
}

#[derive(Serialize)]
struct Tamper {
    certificate: usize,
    byte: usize,
    xor: u8,
}

#[derive(Serialize)]
struct ChainJson {
    name: &'static str,
    certificates: Vec<&'static str>,
    /// The byte `byte` of certificate `certificate` is XORed with `xor` before encoding.
    tamper: Option<Tamper>,
    encoding: String,
}

#[derive(Serialize)]
struct RevokedSerialJson {
    issuer: String,
    serial: u64,
}

#[derive(Serialize)]
struct ListJson {
    name: &'static str,
    signer: &'static str,
    version: u8,
    issuer: String,
    epoch: u64,
    issued_at: u64,
    serials: Vec<RevokedSerialJson>,
    keys: Vec<String>,
    encoding: String,
}

#[derive(Serialize)]
struct CheckJson {
    description: &'static str,
    chain: Option<&'static str>,
    remote_static: String,
    now: Option<u64>,
    time_floor: Option<u64>,
    require_time: bool,
    clock_skew: u64,
    expected_roles: Vec<&'static str>,
    revocation_lists: Vec<&'static str>,
    result: String,
}

#[derive(Serialize)]
struct UpdateJson {
    list: &'static str,
    result: String,
    epoch_after: Option<u64>,
}

#[derive(Serialize)]
struct Pad {
    byte: u8,
    to_length: usize,
}

#[derive(Serialize)]
struct MalformedJson {
    function: &'static str,
    description: &'static str,
    input: String,
    /// If present, `input` is extended with `byte` up to `to_length` bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pad: Option<Pad>,
    error: String,
}

fn ca(name: &str) -> CaSigningKey {
    let (_, seed) = CAS.iter().find(|(n, _)| *n == name).unwrap();
    CaSigningKey::from_seed(*seed)
}

fn node(name: &str) -> [u8; 32] {
    let (_, secret) = NODES.iter().find(|(n, _)| *n == name).unwrap();
    *StaticKeypair::from_secret_bytes(*secret).public().as_bytes()
}

fn result_string<T, E: core::fmt::Debug>(r: &Result<T, E>) -> String {
    match r {
        Ok(_) => "Ok".into(),
        Err(e) => format!("{e:?}"),
    }
}

struct CertSpec {
    name: &'static str,
    signer: &'static str,
    body: CertificateBody,
}

fn cert_specs() -> Vec<CertSpec> {
    let body = |key: [u8; 32], name: &str, role, serial, signer: &str, groups: &[&str]| CertificateBody {
        groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        ..CertificateBody::new(key, name, role, NOT_BEFORE, NOT_AFTER, serial, ca(signer).issuer_id())
    };
    let inter = ca("intermediate").verifying_key().to_bytes();
    vec![
        CertSpec {
            name: "device",
            signer: "ca",
            body: body(node("device"), "sensor-17", CertRole::Device, 1, "ca", &["building-a", "sensors"]),
        },
        CertSpec {
            name: "gateway",
            signer: "ca",
            body: body(node("gateway"), "gw-site-1", CertRole::Gateway, 2, "ca", &["site-1"]),
        },
        CertSpec { name: "cloud", signer: "ca", body: body(node("cloud"), "ingest", CertRole::Cloud, 3, "ca", &[]) },
        CertSpec {
            name: "intermediate",
            signer: "ca",
            body: body(inter, "factory-line-2", CertRole::Ca, 4, "ca", &[]),
        },
        CertSpec {
            name: "device_via_intermediate",
            signer: "intermediate",
            body: body(node("device"), "sensor-17", CertRole::Device, 1, "intermediate", &["sensors"]),
        },
        CertSpec {
            name: "device_foreign",
            signer: "foreign_ca",
            body: body(node("device"), "sensor-17", CertRole::Device, 1, "foreign_ca", &[]),
        },
    ]
}

struct ListSpec {
    name: &'static str,
    signer: &'static str,
    body: RevocationListBody,
}

fn list_specs() -> Vec<ListSpec> {
    let ca_id = ca("ca").issuer_id();
    let list = |issuer: IssuerId, epoch, serials: &[(IssuerId, u64)], keys: &[[u8; 32]]| {
        let mut b = RevocationListBody::new(issuer, epoch, NOW - 3_600);
        b.serials = serials.iter().map(|&(issuer, serial)| RevokedSerial { issuer, serial }).collect();
        b.keys = keys.to_vec();
        b.normalize();
        b
    };
    vec![
        ListSpec { name: "epoch1_empty", signer: "ca", body: list(ca_id, 1, &[], &[]) },
        ListSpec { name: "epoch2_device_serial", signer: "ca", body: list(ca_id, 2, &[(ca_id, 1)], &[]) },
        ListSpec { name: "epoch3_device_key", signer: "ca", body: list(ca_id, 3, &[], &[node("device")]) },
        ListSpec { name: "epoch3_intermediate", signer: "ca", body: list(ca_id, 3, &[(ca_id, 4)], &[]) },
        ListSpec {
            name: "epoch4_anchor_key",
            signer: "ca",
            body: list(ca_id, 4, &[], &[ca("ca").verifying_key().to_bytes()]),
        },
        ListSpec {
            name: "foreign",
            signer: "foreign_ca",
            body: list(ca("foreign_ca").issuer_id(), 9, &[], &[node("device")]),
        },
        ListSpec { name: "forged", signer: "foreign_ca", body: list(ca_id, 9, &[(ca_id, 1)], &[]) },
    ]
}

struct Check {
    description: &'static str,
    chain: Option<&'static str>,
    remote: &'static str,
    now: Option<u64>,
    floor: Option<u64>,
    require_time: bool,
    expected: &'static [CertRole],
    lists: &'static [&'static str],
}

const fn check(description: &'static str, chain: &'static str, remote: &'static str) -> Check {
    Check {
        description,
        chain: Some(chain),
        remote,
        now: Some(NOW),
        floor: None,
        require_time: true,
        expected: &[CertRole::Device],
        lists: &[],
    }
}

fn checks() -> Vec<Check> {
    let skew = CLOCK_SKEW_SECS;
    vec![
        check("gateway admits a device", "device", "device"),
        Check { expected: &[CertRole::Gateway], ..check("cloud admits a gateway", "gateway", "gateway") },
        Check { expected: &[CertRole::Gateway, CertRole::Cloud], ..check("device admits the cloud", "cloud", "cloud") },
        check("device through an intermediate", "device_via_intermediate", "device"),
        Check { now: Some(NOT_AFTER + skew), ..check("last second of the skew tolerance", "device", "device") },
        Check { now: Some(NOT_AFTER + skew + 1), ..check("expired", "device", "device") },
        Check { now: Some(NOT_BEFORE - skew - 1), ..check("not yet valid", "device", "device") },
        check("signed by another CA", "device_foreign", "device"),
        check("tampered signature", "device_tampered_signature", "device"),
        check("tampered serial", "device_tampered_serial", "device"),
        check("a gateway cannot pose as a device", "gateway", "gateway"),
        Check { expected: &[CertRole::Gateway], ..check("a device cannot open a gateway uplink", "device", "device") },
        check("certificate key differs from the Noise static key", "device", "gateway"),
        check("intermediate certificate as a leaf", "intermediate_alone", "device"),
        check("leaf not issued by the intermediate after it", "device_wrong_intermediate", "device"),
        Check { lists: &["epoch2_device_serial"], ..check("revoked serial", "device", "device") },
        Check { lists: &["epoch3_device_key"], ..check("revoked key", "device", "device") },
        Check { lists: &["epoch3_intermediate"], ..check("revoked intermediate", "device_via_intermediate", "device") },
        Check { lists: &["epoch4_anchor_key"], ..check("revoked anchor", "device", "device") },
        Check {
            lists: &["epoch1_empty", "epoch2_device_serial", "epoch1_empty"],
            ..check("a stale list leaves the newer one in force", "device", "device")
        },
        Check { lists: &["forged"], ..check("an unverifiable list revokes nothing", "device", "device") },
        Check { chain: None, ..check("no certificate", "device", "device") },
        Check { now: None, ..check("a gateway requires a time", "device", "device") },
        Check {
            now: None,
            require_time: false,
            expected: &[CertRole::Gateway],
            ..check("device without a clock or floor", "gateway", "gateway")
        },
        Check {
            now: None,
            require_time: false,
            floor: Some(NOT_AFTER + skew + 1),
            expected: &[CertRole::Gateway],
            ..check("device without a clock, floor past not_after", "gateway", "gateway")
        },
    ]
}

/// The chains: name, certificate names, tamper.
fn chain_specs() -> Vec<(&'static str, Vec<&'static str>, Option<Tamper>)> {
    vec![
        ("device", vec!["device"], None),
        ("gateway", vec!["gateway"], None),
        ("cloud", vec!["cloud"], None),
        ("device_via_intermediate", vec!["device_via_intermediate", "intermediate"], None),
        ("device_foreign", vec!["device_foreign"], None),
        ("intermediate_alone", vec!["intermediate"], None),
        ("device_wrong_intermediate", vec!["device", "intermediate"], None),
        // The last byte of the signature.
        ("device_tampered_signature", vec!["device"], Some(Tamper { certificate: 0, byte: usize::MAX, xor: 0x01 })),
        // The serial (1), the byte before the 16-byte issuer and the signature.
        (
            "device_tampered_serial",
            vec!["device"],
            Some(Tamper { certificate: 0, byte: usize::MAX - 64 - 16, xor: 0x02 }),
        ),
    ]
}

fn hexs(b: &[u8]) -> String {
    hex::encode(b)
}

/// Builds the file; pushes fuzz seeds `(target, bytes)`.
pub fn generate(seeds: &mut Vec<(&'static str, Vec<u8>)>) -> TrustFile {
    let signing = CAS
        .iter()
        .map(|(name, seed)| {
            let k = CaSigningKey::from_seed(*seed);
            SigningKeyJson {
                name,
                seed: hexs(seed),
                public: hexs(&k.verifying_key().to_bytes()),
                issuer_id: hexs(&k.issuer_id().0),
            }
        })
        .collect();
    let nodes = NODES
        .iter()
        .map(|(name, secret)| {
            let kp = StaticKeypair::from_secret_bytes(*secret);
            NodeKeyJson {
                name,
                static_secret: hexs(secret),
                static_public: hexs(kp.public().as_bytes()),
                node_id: hexs(&NodeId::from_public_key(kp.public()).0),
            }
        })
        .collect();

    let mut certs: Vec<(&'static str, Certificate)> = Vec::new();
    let mut cert_json = Vec::new();
    for spec in cert_specs() {
        let c = Certificate::sign(spec.body.clone(), &ca(spec.signer)).unwrap();
        let b = c.body();
        cert_json.push(CertJson {
            name: spec.name,
            signer: spec.signer,
            version: b.version,
            public_key: hexs(&b.public_key),
            subject_name: b.name.clone(),
            role: b.role.name(),
            groups: b.groups.clone(),
            not_before: b.not_before,
            not_after: b.not_after,
            serial: b.serial,
            issuer: hexs(&b.issuer.0),
            body: hexs(c.body_encoding()),
            signature: hexs(c.signature()),
            encoding: hexs(c.encoding()),
        });
        seeds.push(("certificate", c.encoding().to_vec()));
        certs.push((spec.name, c));
    }
    let cert = |name: &str| certs.iter().find(|(n, _)| *n == name).unwrap().1.clone();

    let mut chains: Vec<(&'static str, Vec<u8>)> = Vec::new();
    let mut chain_json = Vec::new();
    for (name, names, tamper) in chain_specs() {
        let mut parts: Vec<Vec<u8>> = names.iter().map(|n| cert(n).encoding().to_vec()).collect();
        let tamper = tamper.map(|t| {
            let part = &mut parts[t.certificate];
            // usize::MAX − k names the k-th byte from the end.
            let byte = if t.byte > part.len() { part.len() - 1 - (usize::MAX - t.byte) } else { t.byte };
            part[byte] ^= t.xor;
            Tamper { byte, ..t }
        });
        let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        let encoding = postcard::to_allocvec(&refs).unwrap();
        if tamper.is_none() {
            let built = CertificateChain::new(names.iter().map(|n| cert(n)).collect()).unwrap();
            assert_eq!(built.encode().unwrap(), encoding);
        }
        seeds.push(("certificate", encoding.clone()));
        chain_json.push(ChainJson { name, certificates: names, tamper, encoding: hexs(&encoding) });
        chains.push((name, encoding));
    }

    let mut lists: Vec<(&'static str, Vec<u8>)> = Vec::new();
    let mut list_json = Vec::new();
    for spec in list_specs() {
        let l = RevocationList::sign(spec.body, &ca(spec.signer)).unwrap();
        let b = l.body();
        list_json.push(ListJson {
            name: spec.name,
            signer: spec.signer,
            version: b.version,
            issuer: hexs(&b.issuer.0),
            epoch: b.epoch,
            issued_at: b.issued_at,
            serials: b
                .serials
                .iter()
                .map(|s| RevokedSerialJson { issuer: hexs(&s.issuer.0), serial: s.serial })
                .collect(),
            keys: b.keys.iter().map(|k| hexs(k)).collect(),
            encoding: hexs(l.encoding()),
        });
        seeds.push(("revocation_list", l.encoding().to_vec()));
        lists.push((spec.name, l.encoding().to_vec()));
    }
    let list = |name: &str| lists.iter().find(|(n, _)| *n == name).unwrap().1.clone();

    let anchor = ca("ca").verifying_key();
    let mut check_json = Vec::new();
    for c in checks() {
        let mut store = TrustStore::new([anchor]).unwrap().require_time(c.require_time);
        for l in c.lists {
            // Failures are part of what the check shows (the held list stays in force).
            let _ = store.update_revocation_list(&list(l));
        }
        if let Some(f) = c.floor {
            store.raise_time_floor(UnixTime::from_secs(f));
        }
        let chain = c.chain.map(|n| chains.iter().find(|(x, _)| *x == n).unwrap().1.clone());
        let remote = veil_protocol::PublicKey(node(c.remote));
        let r = store.verify(&remote, chain.as_deref(), c.now.map(UnixTime::from_secs), RoleSet::of(c.expected));
        check_json.push(CheckJson {
            description: c.description,
            chain: c.chain,
            remote_static: hexs(&remote.0),
            now: c.now,
            time_floor: c.floor,
            require_time: c.require_time,
            clock_skew: store.clock_skew(),
            expected_roles: c.expected.iter().map(|r| r.name()).collect(),
            revocation_lists: c.lists.to_vec(),
            result: result_string(&r),
        });
    }

    let mut store = TrustStore::new([anchor]).unwrap();
    let mut updates = Vec::new();
    for name in [
        "epoch1_empty",
        "epoch2_device_serial",
        "epoch1_empty",
        "epoch2_device_serial",
        "forged",
        "foreign",
        "epoch3_device_key",
    ] {
        let r = store.update_revocation_list(&list(name));
        updates.push(UpdateJson {
            list: name,
            result: result_string(&r),
            epoch_after: store.revocation_epoch(ca("ca").issuer_id()),
        });
    }

    let malformed = malformed(&cert("device"), &list("epoch2_device_serial"), &chains[0].1);
    for m in malformed.iter().filter(|m| m.pad.is_none()) {
        let target = if m.function == "RevocationList::decode" { "revocation_list" } else { "certificate" };
        seeds.push((target, hex::decode(&m.input).unwrap()));
    }

    TrustFile {
        description: "Veil trust (spec §15): node and issuer ids, certificates, chains and revocation lists from \
                      fixed Ed25519 seeds and X25519 keys; verification checks against a store whose only trust \
                      anchor is `ca` (`result` is \"Ok\" or the Debug form of veil_protocol::trust::TrustError); \
                      a sequence of list updates to one store; malformed inputs and their errors.",
        spec: "spec/protocol.md §15",
        generator: crate::GENERATOR,
        signature_contexts: SignatureContexts {
            certificate: hexs(b"Veil-v1 certificate\0"),
            revocation_list: hexs(b"Veil-v1 revocation list\0"),
            node_id: hexs(b"Veil-v1 node id\0"),
            issuer_id: hexs(b"Veil-v1 issuer id\0"),
        },
        keys: Keys { signing, nodes },
        certificates: cert_json,
        chains: chain_json,
        revocation_lists: list_json,
        checks: check_json,
        updates,
        malformed,
    }
}

fn malformed(device: &Certificate, list: &[u8], chain: &[u8]) -> Vec<MalformedJson> {
    let mut out = Vec::new();
    let mut case = |function: &'static str, description: &'static str, input: Vec<u8>, pad: Option<Pad>| {
        let mut full = input.clone();
        if let Some(p) = &pad {
            full.resize(p.to_length, p.byte);
        }
        let error = match function {
            "Certificate::decode" => result_string(&Certificate::decode(&full)),
            "CertificateChain::decode" => result_string(&CertificateChain::decode(&full)),
            _ => result_string(&RevocationList::decode(&full)),
        };
        assert_ne!(error, "Ok", "{description}");
        out.push(MalformedJson { function, description, input: hexs(&input), pad, error });
    };
    let too_long = |n: usize| Some(Pad { byte: 1, to_length: n });
    let enc = device.encoding().to_vec();
    let body = device.body().clone();
    // A body that breaks a field rule, postcard-encoded by hand, with a dummy signature.
    let raw = |b: &CertificateBody| [postcard::to_allocvec(b).unwrap(), vec![0u8; 64]].concat();
    let c = "Certificate::decode";
    case(c, "empty", vec![], None);
    case(c, "64 bytes: no room for a body", vec![1; 64], None);
    case(c, "version 2", [&[2u8][..], &enc[1..]].concat(), None);
    case(c, "truncated by one byte", enc[..enc.len() - 1].to_vec(), None);
    case(c, "one trailing byte", [&enc[..], &[0]].concat(), None);
    case(c, "longer than 512 bytes", vec![1], too_long(513));
    // Serial 1 is the byte before the issuer id: write it as the overlong varint 81 00.
    let at = enc.len() - 64 - 16 - 1;
    case(c, "serial as an overlong varint", [&enc[..at], &[0x81, 0x00], &enc[at + 1..]].concat(), None);
    case(c, "empty name", raw(&CertificateBody { name: String::new(), ..body.clone() }), None);
    case(c, "name with a control character", raw(&CertificateBody { name: "a\u{7}b".into(), ..body.clone() }), None);
    case(
        c,
        "groups out of order",
        raw(&CertificateBody { groups: vec!["b".into(), "a".into()], ..body.clone() }),
        None,
    );
    case(c, "ca with groups", raw(&CertificateBody { role: CertRole::Ca, ..body.clone() }), None);
    case(
        c,
        "not_before after not_after",
        raw(&CertificateBody { not_before: body.not_after + 1, ..body.clone() }),
        None,
    );
    // The role byte follows version, key and the name (1 + 32 + 1 + 9).
    let role_at = 1 + 32 + 1 + body.name.len();
    let mut bad_role = enc.clone();
    bad_role[role_at] = 4;
    case(c, "role index 4", bad_role, None);
    let k = "CertificateChain::decode";
    case(k, "empty", vec![], None);
    case(k, "no certificates", vec![0], None);
    case(k, "four certificates", [&[4u8][..], &chain[1..]].concat(), None);
    case(k, "count as an overlong varint", [&[0x81u8, 0x00][..], &chain[1..]].concat(), None);
    case(k, "certificate length past the end", chain[..chain.len() - 1].to_vec(), None);
    case(k, "one trailing byte", [chain, &[0]].concat(), None);
    case(k, "longer than 1000 bytes", vec![1], too_long(1001));
    let r = "RevocationList::decode";
    let l = RevocationList::decode(list).unwrap();
    let lb = l.body().clone();
    let raw_list = |b: &RevocationListBody| [postcard::to_allocvec(b).unwrap(), vec![0u8; 64]].concat();
    case(r, "empty", vec![], None);
    case(r, "version 2", [&[2u8][..], &list[1..]].concat(), None);
    case(r, "truncated by one byte", list[..list.len() - 1].to_vec(), None);
    case(r, "longer than 49152 bytes", vec![1], too_long(49_153));
    // The epoch (2) follows version and issuer: write it as the overlong varint 82 00.
    case(r, "epoch as an overlong varint", [&list[..17], &[0x82, 0x00], &list[18..]].concat(), None);
    let mut unsorted = lb.clone();
    unsorted.serials.push(RevokedSerial { issuer: IssuerId([0; 16]), serial: 0 });
    case(r, "serials out of order", raw_list(&unsorted), None);
    let mut dup = lb.clone();
    dup.keys = vec![[1; 32], [1; 32]];
    case(r, "duplicate keys", raw_list(&dup), None);
    out
}
