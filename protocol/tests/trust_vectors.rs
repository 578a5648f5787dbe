//! Reproduces `spec/vectors/trust.json` (spec §15.12) byte for byte: ids, certificates,
//! chains and revocation lists, once through the implementation and once through an
//! independent encoder written from spec §15.2–§15.5 with ed25519-dalek and BLAKE2s alone;
//! then runs every check, update and malformed case.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use blake2::{Blake2s256, Digest};
use ed25519_dalek::{Signature, SigningKey};
use serde_json::Value;
use veil_protocol::trust::{
    CaSigningKey, CertRole, Certificate, CertificateBody, CertificateChain, IssuerId, NodeId, RevocationList,
    RevocationListBody, RevokedSerial, RoleSet, TrustStore, UnixTime,
};
use veil_protocol::{PublicKey, StaticKeypair};

fn file() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../spec/vectors/trust.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn h(v: &Value) -> Vec<u8> {
    hex::decode(v.as_str().unwrap()).unwrap()
}

fn h32(v: &Value) -> [u8; 32] {
    h(v).try_into().unwrap()
}

fn h16(v: &Value) -> [u8; 16] {
    h(v).try_into().unwrap()
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap()
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap()
}

fn named<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array().unwrap().iter().find(|x| x["name"] == name).unwrap_or_else(|| panic!("no {name}"))
}

fn result<T, E: std::fmt::Debug>(r: &Result<T, E>) -> String {
    match r {
        Ok(_) => "Ok".into(),
        Err(e) => format!("{e:?}"),
    }
}

// --- An independent encoder: spec §1.1 (postcard) and §15.3–§15.5, no serde. ---

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn bytes(out: &mut Vec<u8>, b: &[u8]) {
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn role_index(name: &str) -> u64 {
    ["device", "gateway", "cloud", "ca"].iter().position(|r| *r == name).unwrap() as u64
}

fn spec_certificate_body(c: &Value) -> Vec<u8> {
    let mut out = vec![u8::try_from(u(&c["version"])).unwrap()];
    out.extend_from_slice(&h32(&c["public_key"]));
    bytes(&mut out, s(&c["subject_name"]).as_bytes());
    varint(&mut out, role_index(s(&c["role"])));
    let groups = c["groups"].as_array().unwrap();
    varint(&mut out, groups.len() as u64);
    for g in groups {
        bytes(&mut out, s(g).as_bytes());
    }
    for f in ["not_before", "not_after", "serial"] {
        varint(&mut out, u(&c[f]));
    }
    out.extend_from_slice(&h16(&c["issuer"]));
    out
}

fn spec_list_body(l: &Value) -> Vec<u8> {
    let mut out = vec![u8::try_from(u(&l["version"])).unwrap()];
    out.extend_from_slice(&h16(&l["issuer"]));
    varint(&mut out, u(&l["epoch"]));
    varint(&mut out, u(&l["issued_at"]));
    let serials = l["serials"].as_array().unwrap();
    varint(&mut out, serials.len() as u64);
    for r in serials {
        out.extend_from_slice(&h16(&r["issuer"]));
        varint(&mut out, u(&r["serial"]));
    }
    let keys = l["keys"].as_array().unwrap();
    varint(&mut out, keys.len() as u64);
    for k in keys {
        out.extend_from_slice(&h32(k));
    }
    out
}

fn spec_id(context: &[u8], key: &[u8; 32]) -> [u8; 16] {
    let d = Blake2s256::new().chain_update(context).chain_update(key).finalize();
    d[..16].try_into().unwrap()
}

fn signing_seed(f: &Value, name: &str) -> [u8; 32] {
    h32(&named(&f["keys"]["signing"], name)["seed"])
}

#[test]
fn keys_and_ids() {
    let f = file();
    assert_eq!(h(&f["signature_contexts"]["node_id"]), b"Veil-v1 node id\0");
    for k in f["keys"]["signing"].as_array().unwrap() {
        let seed = h32(&k["seed"]);
        let ours = CaSigningKey::from_seed(seed);
        let theirs = SigningKey::from_bytes(&seed).verifying_key();
        assert_eq!(ours.verifying_key().to_bytes(), theirs.to_bytes());
        assert_eq!(h32(&k["public"]), theirs.to_bytes());
        assert_eq!(h16(&k["issuer_id"]), ours.issuer_id().0);
        assert_eq!(h16(&k["issuer_id"]), spec_id(b"Veil-v1 issuer id\0", &theirs.to_bytes()));
    }
    for n in f["keys"]["nodes"].as_array().unwrap() {
        let kp = StaticKeypair::from_secret_bytes(h32(&n["static_secret"]));
        let public = x25519_dalek_public(h32(&n["static_secret"]));
        assert_eq!(kp.public().0, public);
        assert_eq!(h32(&n["static_public"]), public);
        assert_eq!(h16(&n["node_id"]), NodeId::from_public_key(kp.public()).0);
        assert_eq!(h16(&n["node_id"]), spec_id(b"Veil-v1 node id\0", &public));
    }
}

/// X25519 base-point multiplication straight from the curve library (RFC 7748).
fn x25519_dalek_public(secret: [u8; 32]) -> [u8; 32] {
    x25519_dalek::x25519(secret, x25519_dalek::X25519_BASEPOINT_BYTES)
}

#[test]
fn certificates_byte_for_byte() {
    let f = file();
    let ctx = h(&f["signature_contexts"]["certificate"]);
    assert_eq!(ctx, b"Veil-v1 certificate\0");
    for c in f["certificates"].as_array().unwrap() {
        let name = s(&c["name"]);
        let seed = signing_seed(&f, s(&c["signer"]));
        // Through the implementation.
        let body = CertificateBody {
            version: u8::try_from(u(&c["version"])).unwrap(),
            public_key: h32(&c["public_key"]),
            name: s(&c["subject_name"]).to_owned(),
            role: CertRole::from_name(s(&c["role"])).unwrap(),
            groups: c["groups"].as_array().unwrap().iter().map(|g| s(g).to_owned()).collect(),
            not_before: u(&c["not_before"]),
            not_after: u(&c["not_after"]),
            serial: u(&c["serial"]),
            issuer: IssuerId(h16(&c["issuer"])),
        };
        let cert = Certificate::sign(body.clone(), &CaSigningKey::from_seed(seed)).unwrap();
        assert_eq!(cert.body_encoding(), h(&c["body"]), "{name}: body");
        assert_eq!(cert.signature()[..], h(&c["signature"]), "{name}: signature");
        assert_eq!(cert.encoding(), h(&c["encoding"]), "{name}: encoding");
        assert_eq!(Certificate::decode(&h(&c["encoding"])).unwrap().body(), &body);
        // Through the spec alone.
        let spec_body = spec_certificate_body(c);
        assert_eq!(spec_body, h(&c["body"]), "{name}: spec body");
        let key = SigningKey::from_bytes(&seed).verifying_key();
        let sig = Signature::from_bytes(&h(&c["signature"]).try_into().unwrap());
        key.verify_strict(&[&ctx[..], &spec_body].concat(), &sig).unwrap();
        assert_eq!([spec_body, h(&c["signature"])].concat(), h(&c["encoding"]));
    }
}

#[test]
fn chains_byte_for_byte() {
    let f = file();
    for ch in f["chains"].as_array().unwrap() {
        let name = s(&ch["name"]);
        let mut parts: Vec<Vec<u8>> = ch["certificates"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| h(&named(&f["certificates"], s(n))["encoding"]))
            .collect();
        if let Some(t) = ch["tamper"].as_object() {
            let i = usize::try_from(u(&t["certificate"])).unwrap();
            let at = usize::try_from(u(&t["byte"])).unwrap();
            parts[i][at] ^= u8::try_from(u(&t["xor"])).unwrap();
        } else {
            let certs = parts.iter().map(|p| Certificate::decode(p).unwrap()).collect();
            assert_eq!(CertificateChain::new(certs).unwrap().encode().unwrap(), h(&ch["encoding"]), "{name}");
        }
        let mut spec = Vec::new();
        varint(&mut spec, parts.len() as u64);
        for p in &parts {
            bytes(&mut spec, p);
        }
        assert_eq!(spec, h(&ch["encoding"]), "{name}: spec encoding");
    }
}

#[test]
fn revocation_lists_byte_for_byte() {
    let f = file();
    let ctx = h(&f["signature_contexts"]["revocation_list"]);
    assert_eq!(ctx, b"Veil-v1 revocation list\0");
    for l in f["revocation_lists"].as_array().unwrap() {
        let name = s(&l["name"]);
        let seed = signing_seed(&f, s(&l["signer"]));
        let body = RevocationListBody {
            version: u8::try_from(u(&l["version"])).unwrap(),
            issuer: IssuerId(h16(&l["issuer"])),
            epoch: u(&l["epoch"]),
            issued_at: u(&l["issued_at"]),
            serials: l["serials"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| RevokedSerial { issuer: IssuerId(h16(&r["issuer"])), serial: u(&r["serial"]) })
                .collect(),
            keys: l["keys"].as_array().unwrap().iter().map(h32).collect(),
        };
        let list = RevocationList::sign(body.clone(), &CaSigningKey::from_seed(seed)).unwrap();
        assert_eq!(list.encoding(), h(&l["encoding"]), "{name}");
        assert_eq!(RevocationList::decode(&h(&l["encoding"])).unwrap().body(), &body);
        let spec_body = spec_list_body(l);
        let enc = h(&l["encoding"]);
        assert_eq!(spec_body[..], enc[..enc.len() - 64], "{name}: spec body");
        let sig = Signature::from_bytes(&enc[enc.len() - 64..].try_into().unwrap());
        SigningKey::from_bytes(&seed).verifying_key().verify_strict(&[&ctx[..], &spec_body].concat(), &sig).unwrap();
    }
}

fn anchor(f: &Value) -> veil_protocol::trust::CaPublicKey {
    CaSigningKey::from_seed(signing_seed(f, "ca")).verifying_key()
}

#[test]
fn checks() {
    let f = file();
    let checks = f["checks"].as_array().unwrap();
    assert!(checks.len() >= 20);
    for c in checks {
        let what = s(&c["description"]);
        let mut store = TrustStore::new([anchor(&f)])
            .unwrap()
            .require_time(c["require_time"].as_bool().unwrap())
            .with_clock_skew(u(&c["clock_skew"]));
        for l in c["revocation_lists"].as_array().unwrap() {
            let _ = store.update_revocation_list(&h(&named(&f["revocation_lists"], s(l))["encoding"]));
        }
        if let Some(floor) = c["time_floor"].as_u64() {
            store.raise_time_floor(UnixTime::from_secs(floor));
        }
        let chain = c["chain"].as_str().map(|n| h(&named(&f["chains"], n)["encoding"]));
        let roles: Vec<CertRole> =
            c["expected_roles"].as_array().unwrap().iter().map(|r| CertRole::from_name(s(r)).unwrap()).collect();
        let r = store.verify(
            &PublicKey(h32(&c["remote_static"])),
            chain.as_deref(),
            c["now"].as_u64().map(UnixTime::from_secs),
            RoleSet::of(&roles),
        );
        assert_eq!(result(&r), s(&c["result"]), "{what}");
    }
}

#[test]
fn updates() {
    let f = file();
    let mut store = TrustStore::new([anchor(&f)]).unwrap();
    let issuer = anchor(&f).issuer_id();
    for up in f["updates"].as_array().unwrap() {
        let r = store.update_revocation_list(&h(&named(&f["revocation_lists"], s(&up["list"]))["encoding"]));
        assert_eq!(result(&r), s(&up["result"]), "{}", up["list"]);
        assert_eq!(store.revocation_epoch(issuer), up["epoch_after"].as_u64());
    }
}

#[test]
fn malformed() {
    let f = file();
    let cases = f["malformed"].as_array().unwrap();
    assert!(cases.len() >= 25);
    for m in cases {
        let mut input = h(&m["input"]);
        if let Some(p) = m.get("pad") {
            input.resize(usize::try_from(u(&p["to_length"])).unwrap(), u8::try_from(u(&p["byte"])).unwrap());
        }
        let got = match s(&m["function"]) {
            "Certificate::decode" => result(&Certificate::decode(&input)),
            "CertificateChain::decode" => result(&CertificateChain::decode(&input)),
            "RevocationList::decode" => result(&RevocationList::decode(&input)),
            other => panic!("unknown function {other}"),
        };
        assert_eq!(got, s(&m["error"]), "{}: {}", m["function"], m["description"]);
    }
}
