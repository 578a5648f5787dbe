//! The configuration of the gateway and cloud roles (`veil_relay::config`) and the node built
//! from it (`veil_relay::trustload`): the documented examples parse with their defaults; every
//! kind of error names its key; relative paths resolve against the file's directory;
//! `check()` opens every file and catches bad ones; a SIGHUP reload swaps trust into live
//! endpoints, closing only the peers that no longer pass.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use veil_protocol::trust::{CaPublicKey, CertRole, Certificate, CertificateChain, TrustStore};
use veil_protocol::{CloseReason, StaticKeypair, Suite};
use veil_relay::config::{Config, ConfigError, LimitsConfig, LogLevel, NodeRole, SinkKind, TrustMode};
use veil_relay::keyfile::{self, KeyKind};
use veil_relay::tooling::{self, IssueRequest, RevokeRequest};
use veil_relay::trustload::LoadedNode;
use veil_transports::{Authorizer, Connection, Endpoint, Error, PeerRoles, TimeSource, Transport, TrustState};

/// Upper bound on any awaited step; the tests are far quicker.
const STEP: Duration = Duration::from_secs(10);

async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(STEP, f).await.expect("step timed out")
}

fn origin() -> PathBuf {
    PathBuf::from("/etc/veil/node.toml")
}

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, &origin())
}

/// The error of `text`, which must fail.
fn error(text: &str) -> ConfigError {
    match parse(text) {
        Ok(c) => panic!("accepted: {text}\n{c:?}"),
        Err(e) => e,
    }
}

/// The ```toml blocks of relay/CONFIG.md.
fn documented_examples() -> Vec<String> {
    let doc = include_str!("../CONFIG.md");
    let mut out = Vec::new();
    let mut rest = doc;
    while let Some(start) = rest.find("```toml\n") {
        let body = &rest[start + 8..];
        let end = body.find("```").expect("closed block");
        out.push(body[..end].to_owned());
        rest = &body[end + 3..];
    }
    out
}

#[test]
fn the_documented_examples_parse_with_the_documented_defaults() {
    let examples = documented_examples();
    assert_eq!(examples.len(), 3, "CONFIG.md holds three examples");
    let gw = parse(&examples[0]).unwrap();
    assert_eq!(gw.role, NodeRole::Gateway);
    assert_eq!(gw.trust.mode, TrustMode::Ca);
    assert_eq!(gw.trust.clock_skew(), 300);
    assert_eq!(gw.limits, LimitsConfig::default(), "the example writes out the defaults");
    let up = gw.uplink.as_ref().unwrap();
    assert_eq!(up.address, "198.51.100.7:7401".parse().unwrap());
    assert_eq!(up.transport, Transport::Tcp);
    assert_eq!(up.suite, Suite::ChaChaPolyBlake2s);
    assert_eq!((up.backoff_initial(), up.backoff_max()), (Duration::from_millis(200), Duration::from_secs(30)));
    assert_eq!(gw.metrics.as_ref().unwrap().listen, "127.0.0.1:9464".parse().unwrap());
    assert_eq!(gw.log.level, LogLevel::Info);
    assert!(gw.sink.is_none() && gw.control.is_none());

    let cloud = parse(&examples[1]).unwrap();
    assert_eq!(cloud.role, NodeRole::Cloud);
    assert_eq!(cloud.trust.ca, [PathBuf::from("/etc/veil/ca.pub"), PathBuf::from("/etc/veil/ca-next.pub")]);
    assert_eq!(cloud.trust.crl.len(), 2);
    assert_eq!(cloud.limits, LimitsConfig::default());
    let sink = cloud.sink.as_ref().unwrap();
    assert_eq!((sink.kind, sink.path.as_deref()), (SinkKind::File, Some(Path::new("/var/lib/veil/messages.jsonl"))));
    assert_eq!(cloud.control.as_ref().unwrap().socket, Path::new("/run/veil/control.sock"));

    // The smallest file gets every default.
    let small = parse(&examples[2]).unwrap();
    assert_eq!(small.trust.mode, TrustMode::Allowlist);
    assert_eq!(small.limits, LimitsConfig::default());
    assert_eq!(small.uplink.as_ref().unwrap().transport, Transport::Tcp);
    assert_eq!(small.uplink.as_ref().unwrap().backoff_max_ms, 30_000);
    assert_eq!(small.uplink.as_ref().unwrap().suite, Suite::ChaChaPolyBlake2s);
    let aes = parse(&gateway_with(("cloud_key", "suite = \"25519_AESGCM_SHA256\"\ncloud_key"), "")).unwrap();
    assert_eq!(aes.uplink.as_ref().unwrap().suite, Suite::AesGcmSha256);
    assert!(small.metrics.is_none() && small.listen.tcp.is_none());
    assert_eq!(small.log.level, LogLevel::Info);
    // A cloud without [sink] writes to standard output.
    let cloud = parse(
        "role = \"cloud\"\nnode.key = \"k\"\ntrust = { mode = \"allowlist\", allowlist = \"a\" }\nlisten.tcp = \"0.0.0.0:1\"\n",
    )
    .unwrap();
    assert_eq!(cloud.sink.as_ref().map(|s| s.kind), Some(SinkKind::Stdout));
}

/// A gateway configuration in allowlist mode with `extra` appended; `replace` edits a line.
fn gateway_with(replace: (&str, &str), extra: &str) -> String {
    let base = "role = \"gateway\"\n\
                [node]\nkey = \"gw.key\"\n\
                [trust]\nmode = \"allowlist\"\nallowlist = \"allow\"\n\
                [listen]\ntcp = \"127.0.0.1:7400\"\n\
                [uplink]\naddress = \"127.0.0.1:7401\"\ncloud_key = \"cloud.pub\"\n";
    assert!(base.contains(replace.0), "{}", replace.0);
    format!("{}{extra}", base.replacen(replace.0, replace.1, 1))
}

fn gateway(extra: &str) -> String {
    gateway_with(("", ""), extra)
}

#[test]
fn every_kind_of_error_names_its_key() {
    assert!(parse(&gateway("")).is_ok());
    // (configuration, key, part of the message)
    let cases: Vec<(String, &str, &str)> = vec![
        // Unknown keys, at the top and in a section.
        (gateway_with(("role", "colour = \"blue\"\nrole"), ""), "colour", "unknown field `colour`"),
        (gateway_with(("address", "adress"), ""), "uplink.adress", "unknown field `adress`"),
        (gateway("[metric]\nlisten = \"127.0.0.1:9\"\n"), "metric", "unknown field"),
        // Bad addresses.
        (gateway_with(("127.0.0.1:7401", "cloud:x"), ""), "uplink.address", "invalid socket address \"cloud:x\""),
        (gateway_with(("127.0.0.1:7400", "localhost"), ""), "listen.tcp", "invalid socket address \"localhost\""),
        (gateway("[metrics]\nlisten = \"9464\"\n"), "metrics.listen", "invalid socket address"),
        (gateway_with(("127.0.0.1:7401", "127.0.0.1:0"), ""), "uplink.address", "port 0"),
        // Bad enum values and types.
        (gateway_with(("\"gateway\"", "\"relay\""), ""), "role", "unknown variant `relay`"),
        (gateway_with(("\"allowlist\"\nallow", "\"pki\"\nallow"), ""), "trust.mode", "unknown variant `pki`"),
        (gateway("[log]\nlevel = \"loud\"\n"), "log.level", "unknown variant `loud`"),
        (gateway_with(("cloud_key", "transport = \"quic\"\ncloud_key"), ""), "uplink.transport", "\"quic\""),
        (gateway_with(("cloud_key", "suite = \"AES\"\ncloud_key"), ""), "uplink.suite", "\"25519_AESGCM_SHA256\""),
        (gateway("[limits]\nmax_connections = \"many\"\n"), "limits.max_connections", "invalid type"),
        (gateway("[limits]\nmax_connections = -1\n"), "limits.max_connections", "invalid value"),
        (gateway_with(("\"allow\"", "[\"a\", 3]"), ""), "trust.allowlist", "invalid type"),
        // Missing keys.
        (gateway_with(("cloud_key = \"cloud.pub\"\n", ""), ""), "uplink.cloud_key", "required"),
        (gateway_with(("role = \"gateway\"\n", ""), ""), "role", "required"),
        // Role-specific sections in the wrong role, or missing in the right one.
        (gateway("[sink]\nkind = \"stdout\"\n"), "sink", "only allowed with role = \"cloud\""),
        (gateway("[control]\nsocket = \"c.sock\"\n"), "control", "only allowed with role = \"cloud\""),
        (gateway_with(("\"gateway\"", "\"cloud\""), ""), "uplink", "only allowed with role = \"gateway\""),
        (
            gateway_with(("[uplink]\naddress = \"127.0.0.1:7401\"\ncloud_key = \"cloud.pub\"\n", ""), ""),
            "uplink",
            "required with role = \"gateway\"",
        ),
        // Trust mode rules.
        (
            gateway_with(("allowlist = \"allow\"", "allowlist = \"allow\"\nca = \"ca.pub\""), ""),
            "trust.ca",
            "only used",
        ),
        (gateway_with(("\"allowlist\"\nallowlist = \"allow\"", "\"ca\""), ""), "trust.ca", "required"),
        (
            gateway_with(("\"allowlist\"\nallowlist = \"allow\"", "\"ca\"\nca = \"ca.pub\""), ""),
            "node.certificate",
            "required",
        ),
        (
            gateway_with(
                ("\"allowlist\"\nallowlist = \"allow\"", "\"ca\"\nca = \"ca.pub\"\nclock_skew_secs = 90000"),
                "",
            ),
            "trust.clock_skew_secs",
            "from 0 to 86400",
        ),
        (gateway_with(("allowlist = \"allow\"", ""), ""), "trust.allowlist", "required"),
        // Ranges.
        (gateway("[limits]\nidle_timeout_ms = 1000\n"), "limits.idle_timeout_ms", "keepalive"),
        (gateway("[limits]\nmax_handshakes = 0\n"), "limits.max_handshakes", "at least 1"),
        (gateway("[limits]\nhandshake_rate_per_sec = 0.0\n"), "limits.handshake_rate_per_sec", "above 0"),
        (gateway("[limits]\nhandshake_timeout_ms = 600000\n"), "limits.handshake_timeout_ms", "1 to 60000"),
        (gateway("[limits]\nstatic_dh_cache = 2000000\n"), "limits.static_dh_cache", "at most 1048576"),
        (gateway("[limits]\nkeepalive_ms = 50\n"), "limits.keepalive_ms", "from 100 to 3600000"),
        (gateway("[limits]\nkeepalive_ms = 60000\n"), "limits.idle_timeout_ms", "(60000 ms)"),
        (gateway_with(("cloud_key", "backoff_max_ms = 10\ncloud_key"), ""), "uplink.backoff_max_ms", "from"),
        (gateway_with(("tcp = \"127.0.0.1:7400\"\n", ""), ""), "listen", "listen.tcp, listen.udp"),
        (gateway("[metrics]\nlisten = \"127.0.0.1:7400\"\n"), "metrics.listen", "also listen.tcp"),
        // The spool.
        (gateway("[spool]\nmax_bytes = 100000\n"), "spool.path", "required"),
        (gateway("[spool]\npath = \"s.redb\"\nmax_bytes = 1000\n"), "spool.max_bytes", "from 65536"),
        (
            gateway("[spool]\npath = \"s.redb\"\nmax_bytes = 100000\nmax_bytes_per_device = 200000\n"),
            "spool.max_bytes_per_device",
            "to spool.max_bytes (100000)",
        ),
        (gateway("[spool]\npath = \"s.redb\"\nttl_secs = 5\n"), "spool.ttl_secs", "from 60"),
        (gateway("[spool]\npath = \"s.redb\"\nsize = 5\n"), "spool.size", "unknown field"),
    ];
    for (text, key, message) in &cases {
        let e = error(text);
        assert_eq!(e.key(), Some(*key), "{e}\n--- in ---\n{text}");
        let shown = e.to_string();
        assert!(shown.contains(&format!("{key}: ")) && shown.contains(message), "{shown}");
        assert!(shown.starts_with("/etc/veil/node.toml"), "names the file: {shown}");
    }
    // Cloud-only rules.
    let cloud = |extra: &str| {
        format!(
            "role = \"cloud\"\nnode.key = \"k\"\ntrust = {{ mode = \"allowlist\", allowlist = \"a\" }}\n\
             listen.udp = \"0.0.0.0:1\"\n{extra}"
        )
    };
    assert_eq!(error(&cloud("[sink]\nkind = \"file\"\n")).key(), Some("sink.path"));
    assert_eq!(error(&cloud("[sink]\nkind = \"stdout\"\npath = \"x\"\n")).key(), Some("sink.path"));
    assert_eq!(error(&cloud("[sink]\nkind = \"kafka\"\n")).key(), Some("sink.kind"));
    assert_eq!(error(&cloud("[spool]\npath = \"s.redb\"\n")).key(), Some("spool"));
    // A valid spool section: defaults filled in, the path resolved against the file's directory.
    let c = parse(&gateway("[spool]\npath = \"spool/s.redb\"\nmax_bytes_per_device = 8192\n")).unwrap();
    let spool = c.spool.as_ref().unwrap();
    assert_eq!(spool.path, std::path::Path::new("/etc/veil/spool/s.redb"));
    assert_eq!((spool.max_bytes, spool.max_bytes_per_device, spool.ttl_secs), (64 << 20, 8192, 86_400));

    // Errors the parser finds carry the line and column of the value.
    let e = error(&gateway_with(("127.0.0.1:7401", "cloud:x"), ""));
    assert!(e.to_string().starts_with("/etc/veil/node.toml:10:11: uplink.address: "), "{e}");
    // Not TOML at all: a syntax error with its position, and no key.
    let e = error("role = \"gateway\"\n[node\nkey = 1\n");
    assert!(matches!(e, ConfigError::Syntax { line: 2, .. }), "{e:?}");
    assert_eq!(e.key(), None);
}

#[test]
fn relative_paths_resolve_against_the_configuration_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("etc");
    fs::create_dir(&dir).unwrap();
    let path = dir.join("gw.toml");
    fs::write(&path, gateway_with(("\"gw.key\"", "\"keys/gw.key\""), "")).unwrap();
    let c = Config::load(&path).unwrap();
    assert_eq!(c.source(), path);
    assert_eq!(c.node.key, dir.join("keys/gw.key"));
    assert_eq!(c.trust.allowlist.as_deref(), Some(dir.join("allow").as_path()));
    assert_eq!(c.uplink.as_ref().unwrap().cloud_key, dir.join("cloud.pub"));
    // Absolute paths stay as they are.
    fs::write(&path, gateway_with(("\"gw.key\"", "\"/srv/veil/gw.key\""), "")).unwrap();
    assert_eq!(Config::load(&path).unwrap().node.key, Path::new("/srv/veil/gw.key"));
    // A cloud's sink and control socket too.
    fs::write(
        &path,
        "role = \"cloud\"\nnode.key = \"k\"\ntrust = { mode = \"allowlist\", allowlist = \"a\" }\n\
         listen.udp = \"0.0.0.0:1\"\nsink = { kind = \"file\", path = \"out/m.jsonl\" }\ncontrol.socket = \"c.sock\"\n",
    )
    .unwrap();
    let c = Config::load(&path).unwrap();
    assert_eq!(c.sink.unwrap().path.unwrap(), dir.join("out/m.jsonl"));
    assert_eq!(c.control.unwrap().socket, dir.join("c.sock"));
    // The file itself missing.
    let e = Config::load(dir.join("missing.toml")).unwrap_err();
    assert!(matches!(e, ConfigError::Read { .. }), "{e:?}");
}

/// A fleet on disk, made with the tooling: a CA, another fleet's CA, and keys and
/// certificates for a gateway (serial 1), a cloud (2) and two devices (3, 4).
struct Fleet {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

impl Fleet {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        tooling::ca_init(&dir.join("ca"), false).unwrap();
        tooling::ca_init(&dir.join("other"), false).unwrap();
        for (name, role) in [
            ("gw", CertRole::Gateway),
            ("cloud", CertRole::Cloud),
            ("dev1", CertRole::Device),
            ("dev2", CertRole::Device),
        ] {
            tooling::keygen(&dir.join(format!("{name}.key")), false).unwrap();
            tooling::cert_issue(IssueRequest {
                ca: dir.join("ca"),
                key: dir.join(format!("{name}.key.pub")),
                name: name.to_owned(),
                role,
                groups: Vec::new(),
                not_before: None,
                days: 1,
                out: dir.join(format!("{name}.cert")),
                force: false,
            })
            .unwrap();
        }
        Self { _tmp: tmp, dir }
    }

    fn p(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn keypair(&self, name: &str) -> StaticKeypair {
        let secret = keyfile::read_key(&self.p(&format!("{name}.key")), KeyKind::NodeSecret).unwrap();
        StaticKeypair::from_secret_bytes(*secret)
    }

    fn public_hex(&self, name: &str) -> String {
        hex::encode(self.keypair(name).public().as_bytes())
    }

    /// Writes `text` as `name` in the fleet's directory and loads it.
    fn config(&self, name: &str, text: &str) -> Config {
        let path = self.p(name);
        fs::write(&path, text).unwrap();
        Config::load(&path).unwrap()
    }

    fn gateway_ca(&self) -> Config {
        self.config(
            "gw.toml",
            "role = \"gateway\"\nnode = { key = \"gw.key\", certificate = \"gw.cert\" }\n\
             trust = { mode = \"ca\", ca = \"ca/ca.pub\", crl = \"ca/ca.crl\" }\n\
             listen.tcp = \"127.0.0.1:0\"\n\
             uplink = { address = \"127.0.0.1:7401\", cloud_key = \"cloud.key.pub\" }\n",
        )
    }

    fn gateway_allowlist(&self) -> Config {
        self.config(
            "gw-allow.toml",
            "role = \"gateway\"\nnode.key = \"gw.key\"\ntrust = { mode = \"allowlist\", allowlist = \"devices.allow\" }\n\
             listen.tcp = \"127.0.0.1:0\"\n\
             uplink = { address = \"127.0.0.1:7401\", cloud_key = \"cloud.key.pub\" }\n",
        )
    }

    fn write_allowlist(&self, names: &[&str]) {
        let mut text = String::from("# devices and the cloud\n");
        for n in names {
            text.push_str(&format!("{} {n}\n", self.public_hex(n)));
        }
        fs::write(self.p("devices.allow"), text).unwrap();
    }

    fn revoke(&self, serial: u64) {
        tooling::revoke(&self.p("ca"), RevokeRequest { serials: vec![serial], ..RevokeRequest::default() }).unwrap();
    }
}

/// `check()` of `config` fails; its key and message.
fn check_fails(config: &Config) -> (String, String) {
    let e = config.check().expect_err("check must fail");
    (e.key().unwrap_or_default().to_owned(), e.to_string())
}

#[test]
fn check_opens_every_file_and_catches_bad_ones() {
    let f = Fleet::new();
    let gw = f.gateway_ca();
    gw.check().unwrap();
    let node = LoadedNode::load(&gw).unwrap();
    assert_eq!(node.role, NodeRole::Gateway);
    assert_eq!(node.identity.public(), f.keypair("gw").public());
    assert_eq!(node.cloud_key.as_ref(), Some(f.keypair("cloud").public()));
    assert_eq!(node.certificate_chain.as_ref().map(|c| c.leaf().body().role), Some(CertRole::Gateway));
    assert_eq!(node.trust_summary().revocation_epochs.len(), 1);
    // The secret key never shows in Debug output.
    let shown = format!("{node:?} {gw:?}");
    assert!(!shown.contains(&hex::encode(*node.identity.secret_bytes())), "{shown}");

    // A missing file names its key and path.
    let mut c = gw.clone();
    c.trust.ca = vec![f.p("nowhere/ca.pub")];
    let (key, shown) = check_fails(&c);
    assert_eq!(key, "trust.ca");
    assert_eq!(shown, format!("trust.ca: file not found: {}", f.p("nowhere/ca.pub").display()));

    // A corrupt node key.
    let bad_key = f.p("corrupt.key");
    fs::write(&bad_key, "veil-key 1 node-secret\nnot hex at all\n").unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&bad_key, fs::Permissions::from_mode(0o600)).unwrap();
    }
    let mut c = gw.clone();
    c.node.key = bad_key.clone();
    let (key, shown) = check_fails(&c);
    assert_eq!(key, "node.key");
    assert!(shown.contains("64 lowercase hex digits"), "{shown}");
    // A secret key that others may read.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let open = f.p("open.key");
        fs::copy(f.p("gw.key"), &open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o644)).unwrap();
        let mut c = gw.clone();
        c.node.key = open;
        let (key, shown) = check_fails(&c);
        assert_eq!(key, "node.key");
        assert!(shown.contains("too open"), "{shown}");
    }
    // The wrong kind of key where the cloud's public key belongs.
    let mut c = gw.clone();
    c.uplink.as_mut().unwrap().cloud_key = f.p("ca/ca.pub");
    assert_eq!(check_fails(&c).0, "uplink.cloud_key");

    // A revocation list signed by another fleet's CA.
    let mut c = gw.clone();
    c.trust.crl = vec![f.p("other/ca.crl")];
    let (key, shown) = check_fails(&c);
    assert_eq!(key, "trust.crl");
    assert!(shown.contains("not a CA of trust.ca"), "{shown}");
    // A tampered list of the right CA.
    let mut tampered = fs::read(f.p("ca/ca.crl")).unwrap();
    let n = tampered.len();
    tampered[n - 1] ^= 1;
    fs::write(f.p("tampered.crl"), tampered).unwrap();
    c.trust.crl = vec![f.p("tampered.crl")];
    let (key, shown) = check_fails(&c);
    assert_eq!(key, "trust.crl");
    assert!(shown.contains("signature"), "{shown}");
    // Not a list at all.
    c.trust.crl = vec![f.p("gw.cert")];
    assert_eq!(check_fails(&c).0, "trust.crl");

    // The node's certificate: of another key, of the wrong role, or revoked.
    let mut c = gw.clone();
    c.node.certificate = Some(f.p("cloud.cert"));
    let (key, shown) = check_fails(&c);
    assert_eq!(key, "node.certificate");
    assert!(shown.contains("another key"), "{shown}");
    let mut c = f.config(
        "cloud.toml",
        "role = \"cloud\"\nnode = { key = \"gw.key\", certificate = \"gw.cert\" }\n\
         trust = { mode = \"ca\", ca = \"ca/ca.pub\" }\nlisten.udp = \"127.0.0.1:0\"\n",
    );
    let (key, shown) = check_fails(&c);
    assert_eq!(key, "node.certificate");
    assert!(shown.contains("role gateway, but this node runs as cloud"), "{shown}");
    c.node.key = f.p("cloud.key");
    c.node.certificate = Some(f.p("cloud.cert"));
    c.check().unwrap();
    c.trust.ca = vec![f.p("other/ca.pub")];
    let (key, shown) = check_fails(&c);
    assert_eq!(key, "node.certificate");
    assert!(shown.contains("does not verify"), "{shown}");
    f.revoke(1);
    let (key, shown) = check_fails(&gw);
    assert_eq!(key, "node.certificate");
    assert!(shown.contains("revoked"), "{shown}");

    // A cloud's sink directory must exist.
    let c = f.config(
        "cloud2.toml",
        "role = \"cloud\"\nnode = { key = \"cloud.key\", certificate = \"cloud.cert\" }\n\
         trust = { mode = \"ca\", ca = \"ca/ca.pub\" }\nlisten.udp = \"127.0.0.1:0\"\n\
         sink = { kind = \"file\", path = \"no/such/dir/m.jsonl\" }\n",
    );
    let (key, shown) = check_fails(&c);
    assert_eq!(key, "sink.path");
    assert!(shown.contains("directory not found"), "{shown}");
}

#[test]
fn check_of_allowlist_files() {
    let f = Fleet::new();
    f.write_allowlist(&["dev1", "cloud"]);
    let gw = f.gateway_allowlist();
    gw.check().unwrap();
    assert_eq!(LoadedNode::load(&gw).unwrap().trust_summary().allowlist_entries, 2);
    // The gateway checks its cloud too, so the cloud must be listed.
    f.write_allowlist(&["dev1"]);
    let (key, shown) = check_fails(&gw);
    assert_eq!(key, "trust.allowlist");
    assert!(shown.contains("does not list the cloud"), "{shown}");
    // A bad line, and a list of nobody.
    fs::write(f.p("devices.allow"), "zz sensor\n").unwrap();
    let (key, shown) = check_fails(&gw);
    assert_eq!(key, "trust.allowlist");
    assert!(shown.contains(":1:"), "names the line: {shown}");
    fs::write(f.p("devices.allow"), "# nobody yet\n").unwrap();
    assert!(check_fails(&gw).1.contains("lists nobody"));
}

/// A device of the fleet in fleet-CA mode, without a clock.
async fn device(f: &Fleet, name: &str) -> Endpoint {
    let ca = keyfile::read_key(&f.p("ca/ca.pub"), KeyKind::CaPublic).unwrap();
    let store = TrustStore::new([CaPublicKey::from_bytes(&ca).unwrap()]).unwrap();
    let cert = Certificate::decode(&fs::read(f.p(&format!("{name}.cert"))).unwrap()).unwrap();
    let chain = CertificateChain::new(vec![cert]).unwrap();
    Endpoint::builder(f.keypair(name))
        .certificate_chain(&chain)
        .authorizer(Authorizer::trust(
            TrustState::fleet_ca(store, TimeSource::Learned),
            PeerRoles::for_node(CertRole::Device),
        ))
        .bind()
        .await
        .unwrap()
}

async fn connect(dev: &Endpoint, gw: &Endpoint) -> (Connection, Connection) {
    within(async {
        tokio::try_join!(dev.connect_tcp(gw.local_tcp_addr().unwrap(), Some(gw.public_key())), gw.accept())
    })
    .await
    .unwrap()
}

async fn assert_alive(a: &Connection, b: &Connection, what: &str) {
    a.send(Bytes::from(what.to_owned())).await.unwrap();
    assert_eq!(within(b.recv()).await.unwrap().payload, what.as_bytes(), "{what}");
}

#[tokio::test]
async fn a_reload_with_a_new_revocation_list_closes_the_revoked_device_only() {
    let f = Fleet::new();
    let node = LoadedNode::load(&f.gateway_ca()).unwrap();
    let gw = node.endpoint_builder().listen_tcp("127.0.0.1:0".parse().unwrap()).bind().await.unwrap();
    let dev1 = device(&f, "dev1").await;
    let dev2 = device(&f, "dev2").await;
    let (c1, s1) = connect(&dev1, &gw).await;
    let (c2, s2) = connect(&dev2, &gw).await;
    assert_alive(&c1, &s1, "dev1 before").await;
    assert_alive(&c2, &s2, "dev2 before").await;

    let old_crl = fs::read(f.p("ca/ca.crl")).unwrap();
    f.revoke(3); // dev1
    let summary = node.reload().unwrap();
    assert_eq!(summary.revocation_epochs.iter().map(|e| e.1).collect::<Vec<_>>(), [2]);
    let e = within(c1.closed()).await;
    assert!(matches!(e, Error::Closed { reason: CloseReason::Revoked, by_peer: true }), "{e:?}");
    assert_alive(&c2, &s2, "dev2 after the reload").await;
    assert_alive(&s2, &c2, "dev2 after the reload, back").await;

    // Restoring the old list is refused: the revocation stays.
    fs::write(f.p("ca/ca.crl"), old_crl).unwrap();
    let e = node.reload().unwrap_err();
    assert_eq!(e.key(), Some("trust.crl"));
    assert!(e.to_string().contains("older than epoch 2"), "{e}");
    assert_eq!(node.trust_summary().revocation_epochs[0].1, 2);
    let e = within(dev1.connect_tcp(gw.local_tcp_addr().unwrap(), Some(gw.public_key()))).await.unwrap_err();
    assert_eq!(e.reject_reason(), Some(veil_protocol::wire::RejectReason::Revoked), "{e:?}");
    // A bad file changes nothing either.
    fs::write(f.p("ca/ca.crl"), b"garbage").unwrap();
    assert_eq!(node.reload().unwrap_err().key(), Some("trust.crl"));
    assert_alive(&c2, &s2, "dev2 after the failed reloads").await;
}

/// A device in allowlist mode that trusts the fleet's gateway.
async fn listed_device(f: &Fleet, name: &str) -> Endpoint {
    let mut list = veil_protocol::trust::Allowlist::new();
    list.insert(*f.keypair("gw").public(), "gateway").unwrap();
    Endpoint::builder(f.keypair(name))
        .authorizer(Authorizer::trust(
            TrustState::allowlist(list, TimeSource::Learned, []),
            PeerRoles::for_node(CertRole::Device),
        ))
        .bind()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_reload_of_the_allowlist_closes_unlisted_devices_and_keeps_the_others() {
    let f = Fleet::new();
    f.write_allowlist(&["dev1", "dev2", "cloud"]);
    let node = LoadedNode::load(&f.gateway_allowlist()).unwrap();
    assert_eq!(node.trust_summary().allowlist_entries, 3);
    let gw = node.endpoint_builder().listen_tcp("127.0.0.1:0".parse().unwrap()).bind().await.unwrap();
    let dev1 = listed_device(&f, "dev1").await;
    let dev2 = listed_device(&f, "dev2").await;
    let (c1, _s1) = connect(&dev1, &gw).await;
    let (c2, s2) = connect(&dev2, &gw).await;

    f.write_allowlist(&["dev2", "cloud"]);
    assert_eq!(node.reload().unwrap().allowlist_entries, 2);
    let e = within(c1.closed()).await;
    assert!(matches!(e, Error::Closed { reason: CloseReason::Unauthorized, by_peer: true }), "{e:?}");
    assert_alive(&c2, &s2, "dev2 after the reload").await;

    // A broken or emptied file is refused and the current list stays.
    fs::write(f.p("devices.allow"), "").unwrap();
    assert_eq!(node.reload().unwrap_err().key(), Some("trust.allowlist"));
    assert_eq!(node.trust_summary().allowlist_entries, 2);
    assert_alive(&s2, &c2, "dev2 after the refused reload").await;
}
