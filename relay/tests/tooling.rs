//! Runs the `veil-relay` binary's key and certificate tooling (spec §15.10) in a temporary
//! directory: every subcommand, its output, its files and its exit codes.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::Path;
use std::process::{Command, Output};

use veil_protocol::trust::{
    CaPublicKey, CertRole, Certificate, CertificateChain, RevocationList, RoleSet, TrustError, TrustStore, UnixTime,
};
use veil_protocol::PublicKey;

fn run(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_veil-relay")).current_dir(dir).args(args).output().expect("run veil-relay")
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = run(dir, args);
    assert_eq!(out.status.code(), Some(0), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn fails(dir: &Path, args: &[&str], code: i32) -> String {
    let out = run(dir, args);
    assert_eq!(out.status.code(), Some(code), "{args:?}: stdout {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8(out.stderr).unwrap()
}

fn key_bytes(path: &Path) -> [u8; 32] {
    let text = std::fs::read_to_string(path).unwrap();
    let line = text.lines().nth(1).unwrap();
    let mut k = [0u8; 32];
    hex::decode_to_slice(line, &mut k).unwrap();
    k
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn keygen_ca_issue_show_revoke_and_verify_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();

    let out = ok(d, &["keygen", "--out", "dev.key"]);
    assert!(out.contains("node id:"), "{out}");
    assert!(std::fs::read_to_string(d.join("dev.key")).unwrap().starts_with("veil-key 1 node-secret\n"));
    assert!(std::fs::read_to_string(d.join("dev.key.pub")).unwrap().starts_with("veil-key 1 node-public\n"));
    #[cfg(unix)]
    assert_eq!(mode(&d.join("dev.key")), 0o600);
    // Not overwritten without --force.
    let err = fails(d, &["keygen", "--out", "dev.key"], 1);
    assert!(err.contains("already exists"), "{err}");

    let out = ok(d, &["ca", "init", "--dir", "ca"]);
    assert!(out.contains("issuer id:"), "{out}");
    #[cfg(unix)]
    assert_eq!(mode(&d.join("ca/ca.key")), 0o600);

    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let out = ok(
        d,
        &[
            "cert",
            "issue",
            "--ca",
            "ca",
            "--key",
            "dev.key.pub",
            "--name",
            "sensor-1",
            "--role",
            "device",
            "--group",
            "sensors",
            "--group",
            "building-a",
            "--days",
            "30",
            "--out",
            "dev.cert",
        ],
    );
    assert!(out.contains("serial:      1"), "{out}");
    assert!(out.contains("groups:      building-a, sensors"), "{out}");
    // The serial advances.
    ok(d, &["keygen", "--out", "gw.key"]);
    let out = ok(
        d,
        &[
            "cert",
            "issue",
            "--ca",
            "ca",
            "--key",
            "gw.key.pub",
            "--name",
            "gw",
            "--role",
            "gateway",
            "--out",
            "gw.cert",
        ],
    );
    assert!(out.contains("serial:      2"), "{out}");

    // The files are wire encodings the library verifies.
    let ca_pub = CaPublicKey::from_bytes(&key_bytes(&d.join("ca/ca.pub"))).unwrap();
    let cert = Certificate::decode(&std::fs::read(d.join("dev.cert")).unwrap()).unwrap();
    assert_eq!(cert.body().role, CertRole::Device);
    let dev = PublicKey(key_bytes(&d.join("dev.key.pub")));
    let chain = CertificateChain::new(vec![cert]).unwrap().encode().unwrap();
    let mut store = TrustStore::new([ca_pub]).unwrap().require_time(true);
    let t = Some(UnixTime::from_secs(now + 60));
    assert!(store.verify(&dev, Some(&chain), t, RoleSet::DEVICE).is_ok());

    let out = ok(d, &["cert", "show", "dev.cert", "--ca", "ca/ca.pub"]);
    assert!(out.contains("name:        sensor-1") && out.contains("verified"), "{out}");
    // Expired at a later time: verification failure, exit code 3.
    let late = (now + 31 * 86_400 + 3_600).to_string();
    let err = fails(d, &["cert", "show", "dev.cert", "--ca", "ca/ca.pub", "--at", &late], 3);
    assert!(err.contains("expired"), "{err}");
    // Another CA: exit code 3.
    ok(d, &["ca", "init", "--dir", "other"]);
    let err = fails(d, &["cert", "show", "dev.cert", "--ca", "other/ca.pub"], 3);
    assert!(err.contains("not a trust anchor"), "{err}");

    // Revoke serial 1 and the gateway's key.
    let out = ok(d, &["revoke", "--ca", "ca", "--serial", "1", "--key", "gw.key.pub"]);
    assert!(out.contains("epoch 2, 2 new entries"), "{out}");
    let out = ok(d, &["crl", "show", "ca/ca.crl", "--ca", "ca/ca.pub"]);
    assert!(out.contains("epoch:       2") && out.contains("verified"), "{out}");
    let crl = std::fs::read(d.join("ca/ca.crl")).unwrap();
    store.update_revocation_list(&crl).unwrap();
    assert_eq!(store.verify(&dev, Some(&chain), t, RoleSet::DEVICE), Err(TrustError::RevokedSerial));
    let list = RevocationList::decode(&crl).unwrap();
    assert!(list.body().lists_key(&key_bytes(&d.join("gw.key.pub"))));
    // Another revocation: epoch 3, entries kept.
    let hex_key = hex::encode(dev.0);
    let out = ok(d, &["revoke", "--ca", "ca", "--key", &hex_key]);
    assert!(out.contains("epoch 3, 1 new entries"), "{out}");
    assert!(out.contains("serials:     1") && out.contains("keys:        2"), "{out}");
    let err = fails(d, &["crl", "show", "ca/ca.crl", "--ca", "other/ca.pub"], 3);
    assert!(err.contains("verification failed"), "{err}");
    // Nothing to revoke is an error.
    fails(d, &["revoke", "--ca", "ca"], 1);
}

#[cfg(unix)]
#[test]
fn readable_private_keys_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    ok(d, &["ca", "init", "--dir", "ca"]);
    ok(d, &["keygen", "--out", "n.key"]);
    std::fs::set_permissions(d.join("ca/ca.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = fails(
        d,
        &["cert", "issue", "--ca", "ca", "--key", "n.key.pub", "--name", "n", "--role", "device", "--out", "n.cert"],
        1,
    );
    assert!(err.contains("are too open") && err.contains("chmod 600"), "{err}");
    assert!(!d.join("n.cert").exists());
    // The serial was not consumed.
    assert_eq!(std::fs::read_to_string(d.join("ca/serial")).unwrap(), "1\n");
}

#[test]
fn malformed_and_mismatched_inputs_give_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    ok(d, &["ca", "init", "--dir", "ca"]);
    ok(d, &["keygen", "--out", "n.key"]);
    let issue = |key: &str, role: &str| {
        run(
            d,
            &["cert", "issue", "--ca", "ca", "--key", key, "--name", "n", "--role", role, "--out", "n.cert", "--force"],
        )
    };
    // A truncated public key file.
    let text = std::fs::read_to_string(d.join("n.key.pub")).unwrap();
    std::fs::write(d.join("trunc.pub"), &text[..40]).unwrap();
    let out = issue("trunc.pub", "device");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("truncated key file"));
    // A secret key where a public one is needed.
    let out = issue("n.key", "device");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("holds a node-secret key, but a node-public key is needed"));
    // A node key for an intermediate.
    let out = issue("n.key.pub", "ca");
    assert!(String::from_utf8_lossy(&out.stderr).contains("but a ca-public key is needed"));
    // A name the certificate rules refuse.
    let out = run(
        d,
        &["cert", "issue", "--ca", "ca", "--key", "n.key.pub", "--name", "", "--role", "device", "--out", "x.cert"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid field: name"));
    // Garbage where a certificate or list is expected.
    std::fs::write(d.join("junk"), b"\x01not a certificate").unwrap();
    let err = fails(d, &["cert", "show", "junk"], 1);
    assert!(err.contains("junk"), "{err}");
    let err = fails(d, &["crl", "show", "junk"], 1);
    assert!(err.contains("malformed"), "{err}");
    // Missing file.
    let err = fails(d, &["cert", "show", "nope.cert"], 1);
    assert!(err.contains("nope.cert"), "{err}");
    // Usage errors are exit code 2.
    fails(d, &["cert", "issue", "--ca", "ca"], 2);
    fails(d, &["frobnicate"], 2);
}

#[test]
fn intermediate_certificates_and_allowlists() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    ok(d, &["ca", "init", "--dir", "root"]);
    ok(d, &["ca", "init", "--dir", "line2"]);
    let out = ok(
        d,
        &[
            "cert",
            "issue",
            "--ca",
            "root",
            "--key",
            "line2/ca.pub",
            "--name",
            "line 2",
            "--role",
            "ca",
            "--out",
            "line2.cert",
        ],
    );
    assert!(out.contains("role:        ca") && out.contains("ca key:"), "{out}");
    ok(d, &["keygen", "--out", "n.key"]);
    ok(
        d,
        &["cert", "issue", "--ca", "line2", "--key", "n.key.pub", "--name", "n", "--role", "device", "--out", "n.cert"],
    );
    // A chain file: leaf, then the intermediate.
    let leaf = Certificate::decode(&std::fs::read(d.join("n.cert")).unwrap()).unwrap();
    let inter = Certificate::decode(&std::fs::read(d.join("line2.cert")).unwrap()).unwrap();
    let chain = CertificateChain::new(vec![leaf, inter]).unwrap().encode().unwrap();
    std::fs::write(d.join("n.chain"), &chain).unwrap();
    let out = ok(d, &["cert", "show", "n.chain", "--ca", "root/ca.pub"]);
    assert!(out.contains("certificate 2 of 2") && out.contains("verified"), "{out}");
    fails(d, &["cert", "show", "n.chain", "--ca", "line2/ca.pub"], 3);

    let key = std::fs::read_to_string(d.join("n.key.pub")).unwrap();
    let hexkey = key.lines().nth(1).unwrap();
    std::fs::write(d.join("allow"), format!("# devices\n{hexkey} sensor 9\n")).unwrap();
    let out = ok(d, &["allowlist", "show", "allow"]);
    assert!(out.contains("1 entries") && out.contains("sensor 9"), "{out}");
    std::fs::write(d.join("bad-allow"), "not-a-key name\n").unwrap();
    let err = fails(d, &["allowlist", "show", "bad-allow"], 1);
    assert!(err.contains("bad-allow:1"), "{err}");
}
