//! Key and certificate tooling (spec §15.10): `keygen`, `ca init`, `cert issue`, `cert show`,
//! `revoke`, `crl show`.
//!
//! Exit codes: 0 success; 1 an error (I/O, a malformed or refused file, bad arguments found
//! after parsing); 2 usage (clap); 3 verification failed (`cert show`/`crl show` with `--ca`:
//! bad signature, unknown issuer, or a certificate not valid at the time checked).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use veil_protocol::trust::{
    CaPublicKey, CaSigningKey, CertRole, Certificate, CertificateBody, CertificateChain, IssuerId, NodeId,
    RevocationList, RevocationListBody, RevokedSerial, TrustError, UnixTime, CLOCK_SKEW_SECS, MAX_CERTIFICATE_LEN,
    MAX_CHAIN_LEN, MAX_REVOCATION_LIST_LEN,
};
use veil_protocol::{PublicKey, StaticKeypair};

use crate::keyfile::{self, FileError, KeyKind};

/// A failed command: what to print and which exit code to use.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// A file could not be read, parsed or written.
    #[error(transparent)]
    File(#[from] FileError),
    /// Arguments that clap accepted but that make no sense together.
    #[error("{0}")]
    Usage(String),
    /// `--ca` verification failed.
    #[error("verification failed: {0}")]
    Verification(TrustError),
    /// The CA directory is inconsistent.
    #[error("{0}")]
    Ca(String),
}

impl ToolError {
    /// The documented exit code (module docs).
    pub const fn exit_code(&self) -> u8 {
        match self {
            Self::Verification(_) => 3,
            _ => 1,
        }
    }
}

type Result<T> = std::result::Result<T, ToolError>;

/// File names inside a CA directory (spec §15.10).
pub const CA_KEY: &str = "ca.key";
/// The CA's public key file.
pub const CA_PUB: &str = "ca.pub";
/// The next serial, in decimal.
pub const CA_SERIAL: &str = "serial";
/// The newest revocation list.
pub const CA_CRL: &str = "ca.crl";

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn public_path(secret: &Path) -> PathBuf {
    let mut s = secret.as_os_str().to_owned();
    s.push(".pub");
    PathBuf::from(s)
}

fn trust_err(path: &Path) -> impl FnOnce(TrustError) -> ToolError + '_ {
    move |source| ToolError::File(FileError::Trust { path: path.to_path_buf(), source })
}

/// `keygen`: a node's static X25519 key pair into `out` (0600) and `out.pub`.
///
/// # Errors
/// [`ToolError::File`].
pub fn keygen(out: &Path, force: bool) -> Result<String> {
    let kp = StaticKeypair::generate(&mut rand::rngs::OsRng);
    let pub_path = public_path(out);
    if !force && pub_path.exists() {
        return Err(FileError::Exists { path: pub_path }.into());
    }
    keyfile::write_key(out, KeyKind::NodeSecret, &kp.secret_bytes(), force)?;
    keyfile::write_key(&pub_path, KeyKind::NodePublic, kp.public().as_bytes(), force)?;
    Ok(format!(
        "wrote {} (secret, mode 0600) and {}\npublic key: {}\nnode id:    {}\n",
        out.display(),
        pub_path.display(),
        hex::encode(kp.public().as_bytes()),
        NodeId::from_public_key(kp.public()),
    ))
}

/// `ca init`: a CA directory with a fresh Ed25519 key, serial 1 and an empty list of epoch 1.
///
/// # Errors
/// [`ToolError::File`].
pub fn ca_init(dir: &Path, force: bool) -> Result<String> {
    std::fs::create_dir_all(dir).map_err(|source| FileError::Io { path: dir.to_path_buf(), source })?;
    let key = CaSigningKey::generate(&mut rand::rngs::OsRng);
    for name in [CA_PUB, CA_SERIAL, CA_CRL] {
        if !force && dir.join(name).exists() {
            return Err(FileError::Exists { path: dir.join(name) }.into());
        }
    }
    keyfile::write_key(&dir.join(CA_KEY), KeyKind::CaSecret, &key.seed(), force)?;
    keyfile::write_key(&dir.join(CA_PUB), KeyKind::CaPublic, &key.verifying_key().to_bytes(), force)?;
    keyfile::write_atomic(&dir.join(CA_SERIAL), b"1\n", 0o644, force)?;
    let list = RevocationList::sign(RevocationListBody::new(key.issuer_id(), 1, now_secs()), &key)
        .map_err(trust_err(&dir.join(CA_CRL)))?;
    keyfile::write_atomic(&dir.join(CA_CRL), list.encoding(), 0o644, force)?;
    Ok(format!(
        "initialized CA in {}\npublic key: {}\nissuer id:  {}\nrevocation list: epoch 1, empty\n",
        dir.display(),
        hex::encode(key.verifying_key().to_bytes()),
        key.issuer_id(),
    ))
}

fn load_ca(dir: &Path) -> Result<CaSigningKey> {
    let seed = keyfile::read_key(&dir.join(CA_KEY), KeyKind::CaSecret)?;
    let key = CaSigningKey::from_seed(*seed);
    let public = keyfile::read_key(&dir.join(CA_PUB), KeyKind::CaPublic)?;
    if *public != key.verifying_key().to_bytes() {
        return Err(ToolError::Ca(format!("{}: does not match {}", dir.join(CA_PUB).display(), CA_KEY)));
    }
    Ok(key)
}

fn load_ca_public(path: &Path) -> Result<CaPublicKey> {
    let bytes = keyfile::read_key(path, KeyKind::CaPublic)?;
    CaPublicKey::from_bytes(&bytes).ok_or(FileError::BadKey { path: path.to_path_buf() }.into())
}

/// What `cert issue` is asked for.
#[derive(Debug)]
pub struct IssueRequest {
    /// The CA directory.
    pub ca: PathBuf,
    /// The subject's public key file (node-public; ca-public for role ca).
    pub key: PathBuf,
    /// The certificate name.
    pub name: String,
    /// The role.
    pub role: CertRole,
    /// Groups (any order; sorted and deduplicated).
    pub groups: Vec<String>,
    /// Start of validity (Unix time); now if absent.
    pub not_before: Option<u64>,
    /// Length of validity in days.
    pub days: u64,
    /// Where to write the certificate.
    pub out: PathBuf,
    /// Overwrite `out`.
    pub force: bool,
}

/// `cert issue`: signs a certificate with the CA, taking its next serial.
///
/// # Errors
/// [`ToolError::File`], [`ToolError::Usage`] for field rules, [`ToolError::Ca`].
pub fn cert_issue(req: IssueRequest) -> Result<String> {
    let ca = load_ca(&req.ca)?;
    let kind = if req.role == CertRole::Ca { KeyKind::CaPublic } else { KeyKind::NodePublic };
    let subject = keyfile::read_key(&req.key, kind)?;
    if req.role == CertRole::Ca && CaPublicKey::from_bytes(&subject).is_none() {
        return Err(FileError::BadKey { path: req.key.clone() }.into());
    }
    let serial_path = req.ca.join(CA_SERIAL);
    let serial = read_serial(&serial_path)?;
    let not_before = req.not_before.unwrap_or_else(now_secs);
    let not_after = req
        .days
        .checked_mul(86_400)
        .and_then(|s| not_before.checked_add(s))
        .ok_or_else(|| ToolError::Usage("validity end does not fit in 64-bit Unix time".into()))?;
    let mut groups = req.groups;
    groups.sort();
    groups.dedup();
    let body = CertificateBody {
        groups,
        ..CertificateBody::new(*subject, req.name, req.role, not_before, not_after, serial, ca.issuer_id())
    };
    let cert = Certificate::sign(body, &ca).map_err(|e| ToolError::Usage(format!("cannot issue: {e}")))?;
    keyfile::write_atomic(&req.out, cert.encoding(), 0o644, req.force)?;
    // The serial is consumed only once the certificate is written.
    let next = serial.checked_add(1).ok_or_else(|| ToolError::Ca("serial numbers exhausted".into()))?;
    keyfile::write_atomic(&serial_path, format!("{next}\n").as_bytes(), 0o644, true)?;
    let mut s = format!("wrote {} ({} bytes)\n", req.out.display(), cert.encoding().len());
    describe_cert(&mut s, &cert);
    Ok(s)
}

fn read_serial(path: &Path) -> Result<u64> {
    let bytes = keyfile::read_bounded(path, 32)?;
    std::str::from_utf8(&bytes)
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .ok_or_else(|| ToolError::Ca(format!("{}: not a decimal serial number", path.display())))
}

fn describe_cert(s: &mut String, c: &Certificate) {
    let b = c.body();
    let key_line = if b.role == CertRole::Ca {
        format!("ca key:      {} (issuer id {})", hex::encode(b.public_key), c.subject_issuer_id())
    } else {
        format!(
            "public key:  {}\nnode id:     {}",
            hex::encode(b.public_key),
            NodeId::from_public_key(&PublicKey(b.public_key))
        )
    };
    let groups = if b.groups.is_empty() { "(none)".to_owned() } else { b.groups.join(", ") };
    let _ = write!(
        s,
        "name:        {}\nrole:        {}\ngroups:      {groups}\n{key_line}\nserial:      {}\nissuer id:   {}\nnot before:  {}\nnot after:   {}\n",
        b.name, b.role, b.serial, b.issuer, b.not_before, b.not_after,
    );
}

/// `cert show`: prints a certificate (or each certificate of a chain); with `ca`, verifies
/// the signature (and the chain's links) and validity at `at` (default now).
///
/// # Errors
/// [`ToolError::File`]; [`ToolError::Verification`] (exit code 3) if verification fails.
pub fn cert_show(path: &Path, ca: Option<&Path>, at: Option<u64>) -> Result<String> {
    let bytes = keyfile::read_bounded(path, MAX_CHAIN_LEN.max(MAX_CERTIFICATE_LEN) as u64)?;
    let certs = match Certificate::decode(&bytes) {
        Ok(c) => vec![c],
        Err(single) => match CertificateChain::decode(&bytes) {
            Ok(chain) => chain.certificates().to_vec(),
            // Report the error of the more likely reading: a single certificate.
            Err(_) => return Err(trust_err(path)(single)),
        },
    };
    let mut s = String::new();
    for (i, c) in certs.iter().enumerate() {
        if certs.len() > 1 {
            let _ = writeln!(s, "certificate {} of {}:", i + 1, certs.len());
        }
        describe_cert(&mut s, c);
    }
    if let Some(ca_path) = ca {
        let anchor = load_ca_public(ca_path)?;
        verify_certs(&certs, &anchor, UnixTime::from_secs(at.unwrap_or_else(now_secs)))
            .map_err(ToolError::Verification)?;
        s.push_str("verified: signature chain to the CA is valid, and valid at the time checked\n");
    }
    Ok(s)
}

/// Signatures, links and validity (spec §15.6 steps 3, 6, 7, 9), without a peer key, role or
/// revocation list.
fn verify_certs(certs: &[Certificate], anchor: &CaPublicKey, t: UnixTime) -> std::result::Result<(), TrustError> {
    let top = certs.last().ok_or(TrustError::InvalidChain)?;
    if top.body().issuer != anchor.issuer_id() {
        return Err(TrustError::UnknownIssuer);
    }
    let mut signer = *anchor;
    for (i, c) in certs.iter().enumerate().rev() {
        c.verify_signature(&signer)?;
        c.body().check_validity(t, CLOCK_SKEW_SECS)?;
        if i > 0 {
            signer = c.ca_key()?;
            if certs[i - 1].body().issuer != c.subject_issuer_id() {
                return Err(TrustError::InvalidChain);
            }
        }
    }
    Ok(())
}

/// What `revoke` adds to the CA's list.
#[derive(Debug, Default)]
pub struct RevokeRequest {
    /// Serials, of `issuer` (default: the CA).
    pub serials: Vec<u64>,
    /// The issuer id (hex) of the serials, for certificates of an intermediate.
    pub issuer: Option<String>,
    /// Keys: key files (node-public or ca-public) or 64 hex digits.
    pub keys: Vec<String>,
}

fn parse_key_arg(arg: &str) -> Result<[u8; 32]> {
    let mut k = [0u8; 32];
    if arg.len() == 64 && hex::decode_to_slice(arg, &mut k).is_ok() {
        return Ok(k);
    }
    let path = Path::new(arg);
    match keyfile::read_key(path, KeyKind::NodePublic) {
        Ok(k) => Ok(*k),
        Err(FileError::WrongKind { found: KeyKind::CaPublic, .. }) => Ok(*keyfile::read_key(path, KeyKind::CaPublic)?),
        Err(e) => Err(e.into()),
    }
}

/// `revoke`: signs the CA's next revocation list (epoch + 1) with the new entries added.
///
/// # Errors
/// [`ToolError::File`], [`ToolError::Usage`], [`ToolError::Ca`].
pub fn revoke(ca_dir: &Path, req: RevokeRequest) -> Result<String> {
    if req.serials.is_empty() && req.keys.is_empty() {
        return Err(ToolError::Usage("nothing to revoke: give --serial and/or --key".into()));
    }
    let ca = load_ca(ca_dir)?;
    let crl_path = ca_dir.join(CA_CRL);
    let bytes = keyfile::read_bounded(&crl_path, MAX_REVOCATION_LIST_LEN as u64)?;
    let current = RevocationList::decode(&bytes).map_err(trust_err(&crl_path))?;
    current.verify_signature(&ca.verifying_key()).map_err(trust_err(&crl_path))?;
    let issuer = match &req.issuer {
        None => ca.issuer_id(),
        Some(h) => {
            let mut id = [0u8; 16];
            hex::decode_to_slice(h, &mut id)
                .map_err(|_| ToolError::Usage(format!("--issuer {h:?}: expected 32 hex digits")))?;
            IssuerId(id)
        }
    };
    let mut body = current.body().clone();
    body.epoch = body.epoch.checked_add(1).ok_or_else(|| ToolError::Ca("revocation epochs exhausted".into()))?;
    body.issued_at = now_secs().max(body.issued_at);
    let before = (body.serials.len(), body.keys.len());
    body.serials.extend(req.serials.iter().map(|&serial| RevokedSerial { issuer, serial }));
    for k in &req.keys {
        body.keys.push(parse_key_arg(k)?);
    }
    body.normalize();
    let added = body.serials.len() + body.keys.len() - before.0 - before.1;
    let list = RevocationList::sign(body, &ca).map_err(|e| ToolError::Ca(format!("cannot sign the new list: {e}")))?;
    keyfile::write_atomic(&crl_path, list.encoding(), 0o644, true)?;
    let mut s = format!("wrote {} (epoch {}, {added} new entries)\n", crl_path.display(), list.body().epoch);
    describe_list(&mut s, &list);
    Ok(s)
}

fn describe_list(s: &mut String, l: &RevocationList) {
    let b = l.body();
    let _ = writeln!(s, "issuer id:   {}\nepoch:       {}\nissued at:   {}", b.issuer, b.epoch, b.issued_at);
    let _ = writeln!(s, "serials:     {}", b.serials.len());
    for r in &b.serials {
        let _ = writeln!(s, "  {} {}", r.issuer, r.serial);
    }
    let _ = writeln!(s, "keys:        {}", b.keys.len());
    for k in &b.keys {
        let _ = writeln!(s, "  {}", hex::encode(k));
    }
}

/// `crl show`: prints a revocation list; with `ca`, verifies its signature and issuer.
///
/// # Errors
/// [`ToolError::File`]; [`ToolError::Verification`] (exit code 3).
pub fn crl_show(path: &Path, ca: Option<&Path>) -> Result<String> {
    let bytes = keyfile::read_bounded(path, MAX_REVOCATION_LIST_LEN as u64)?;
    let list = RevocationList::decode(&bytes).map_err(trust_err(path))?;
    let mut s = String::new();
    describe_list(&mut s, &list);
    if let Some(ca_path) = ca {
        let anchor = load_ca_public(ca_path)?;
        if list.body().issuer != anchor.issuer_id() {
            return Err(ToolError::Verification(TrustError::UnknownIssuer));
        }
        list.verify_signature(&anchor).map_err(ToolError::Verification)?;
        s.push_str("verified: signed by the CA\n");
    }
    Ok(s)
}

/// `allowlist show`: parses an allowlist file (spec §15.10) and prints its entries.
///
/// # Errors
/// [`ToolError::File`].
pub fn allowlist_show(path: &Path) -> Result<String> {
    let list = keyfile::read_allowlist(path)?;
    let mut s = format!("{} entries\n", list.len());
    for (key, name) in list.iter() {
        let _ = writeln!(s, "  {} node id {} {name}", hex::encode(key.as_bytes()), NodeId::from_public_key(key));
    }
    Ok(s)
}
