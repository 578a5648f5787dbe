//! From a configuration to a running node's identity and trust: the static key pair, the
//! [`TrustState`] its endpoints check peers against, its own certificate chain and its limits
//! ([`LoadedNode::load`]); and the SIGHUP reload that swaps freshly read trust files into the
//! live [`TrustState`] ([`LoadedNode::reload`], [`TrustReloader::spawn_on_sighup`]).
//!
//! Secrets: the node's secret key is read into a zeroizing buffer and lives on only inside
//! [`StaticKeypair`] (zeroized on drop, never printed); no error or log line contains it.

use std::fmt;
use std::io;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use veil_protocol::trust::{
    CaPublicKey, Certificate, CertificateChain, IssuerId, RevocationList, RoleSet, Trust, TrustError, TrustStore,
    UnixTime, MAX_CERTIFICATE_LEN, MAX_CHAIN_LEN, MAX_REVOCATION_LIST_LEN,
};
use veil_protocol::{PublicKey, StaticKeypair};
use veil_transports::{Authorizer, Endpoint, EndpointBuilder, EndpointLimits, PeerRoles, TimeSource, TrustState};

use crate::config::{Config, ConfigError, NodeRole, TrustConfig, TrustMode};
use crate::keyfile::{self, FileError, KeyKind};

/// A node ready to build its endpoints: identity, trust, own chain and limits, all read and
/// checked from the files its [`Config`] names.
///
/// `Debug` shows the public key only, never the secret.
pub struct LoadedNode {
    /// The role.
    pub role: NodeRole,
    /// The node's static key pair (`node.key`).
    pub identity: StaticKeypair,
    /// The trust state every endpoint of the node shares (`[trust]`): allowlist or fleet CA
    /// with its revocation lists, with the system clock (spec §15.7: gateways and cloud
    /// services check validity). [`LoadedNode::reload`] replaces its contents in place.
    pub trust: TrustState,
    /// This node's certificate chain (`node.certificate`), for
    /// [`EndpointBuilder::certificate_chain`]; verified against the node's own trust anchors
    /// in fleet-CA mode.
    pub certificate_chain: Option<CertificateChain>,
    /// Roles expected from peers, by direction ([`NodeRole::peer_roles`]).
    pub peer_roles: PeerRoles,
    /// The endpoint's limits (`[limits]`).
    pub limits: EndpointLimits,
    /// The protocol's limits (`[limits]` timeouts).
    pub protocol_limits: veil_protocol::Limits,
    /// A gateway's cloud: its static key (`uplink.cloud_key`), for the IK handshake.
    pub cloud_key: Option<PublicKey>,
    /// Re-reads the trust files into [`LoadedNode::trust`].
    reloader: TrustReloader,
}

impl fmt::Debug for LoadedNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedNode")
            .field("role", &self.role)
            .field("public_key", self.identity.public())
            .field("trust_mode", &self.reloader.config.mode)
            .field("certificate_chain", &self.certificate_chain.as_ref().map(|c| c.certificates().len()))
            .field("cloud_key", &self.cloud_key)
            .finish_non_exhaustive()
    }
}

/// What a load or reload installed, for the log line that reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustSummary {
    /// The mode.
    pub mode: TrustMode,
    /// Fleet CA: the trust anchors.
    pub anchors: Vec<IssuerId>,
    /// Fleet CA: the epoch of each anchor's revocation list in force (after a reload, possibly
    /// one a peer pushed that is newer than the file).
    pub revocation_epochs: Vec<(IssuerId, u64)>,
    /// Allowlist: the number of entries.
    pub allowlist_entries: usize,
}

impl TrustSummary {
    fn of(trust: &Trust) -> Self {
        match trust {
            Trust::FleetCa(store) => {
                let anchors: Vec<IssuerId> = store.anchors().collect();
                let revocation_epochs =
                    anchors.iter().filter_map(|&a| store.revocation_epoch(a).map(|e| (a, e))).collect();
                Self { mode: TrustMode::Ca, anchors, revocation_epochs, allowlist_entries: 0 }
            }
            Trust::Allowlist(list) => Self {
                mode: TrustMode::Allowlist,
                anchors: Vec::new(),
                revocation_epochs: Vec::new(),
                allowlist_entries: list.len(),
            },
            // `Trust` is non-exhaustive; a mode this build does not know has nothing to count.
            _ => Self { mode: TrustMode::Ca, anchors: Vec::new(), revocation_epochs: Vec::new(), allowlist_entries: 0 },
        }
    }
}

impl fmt::Display for TrustSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.mode {
            TrustMode::Allowlist => write!(f, "allowlist with {} entries", self.allowlist_entries),
            TrustMode::Ca => {
                write!(f, "fleet CA with {} trust anchor(s)", self.anchors.len())?;
                for (issuer, epoch) in &self.revocation_epochs {
                    write!(f, ", revocation list of {issuer} at epoch {epoch}")?;
                }
                Ok(())
            }
        }
    }
}

fn file_error(key: &str, e: &FileError) -> ConfigError {
    let message = match e {
        FileError::Io { path, source } if source.kind() == io::ErrorKind::NotFound => {
            format!("file not found: {}", path.display())
        }
        other => other.to_string(),
    };
    ConfigError::File { key: key.to_owned(), message }
}

fn bad_file(key: &str, path: &Path, what: impl fmt::Display) -> ConfigError {
    ConfigError::File { key: key.to_owned(), message: format!("{}: {what}", path.display()) }
}

/// Reads a certificate file: one certificate, or a chain (spec §15.10).
fn read_chain(key: &str, path: &Path) -> Result<CertificateChain, ConfigError> {
    let bytes =
        keyfile::read_bounded(path, MAX_CHAIN_LEN.max(MAX_CERTIFICATE_LEN) as u64).map_err(|e| file_error(key, &e))?;
    match Certificate::decode(&bytes) {
        Ok(cert) => CertificateChain::new(vec![cert]).map_err(|e| bad_file(key, path, e)),
        Err(single) => CertificateChain::decode(&bytes).map_err(|_| bad_file(key, path, single)),
    }
}

/// Builds the trust of `[trust]` from its files; every error names its key.
fn read_trust(t: &TrustConfig) -> Result<Trust, ConfigError> {
    match t.mode {
        TrustMode::Allowlist => {
            let Some(path) = &t.allowlist else {
                // `Config::load` requires it in this mode.
                return Err(ConfigError::File { key: "trust.allowlist".into(), message: "not set".into() });
            };
            let list = keyfile::read_allowlist(path).map_err(|e| file_error("trust.allowlist", &e))?;
            if list.is_empty() {
                // Most likely a truncated or wrong file; taken as it is, it would refuse (and,
                // on reload, disconnect) every peer.
                return Err(bad_file("trust.allowlist", path, "lists nobody: every peer would be refused"));
            }
            Ok(Trust::Allowlist(list))
        }
        TrustMode::Ca => {
            let mut anchors = Vec::with_capacity(t.ca.len());
            for path in &t.ca {
                let bytes = keyfile::read_key(path, KeyKind::CaPublic).map_err(|e| file_error("trust.ca", &e))?;
                let key = CaPublicKey::from_bytes(&bytes)
                    .ok_or_else(|| bad_file("trust.ca", path, "not a valid Ed25519 public key"))?;
                anchors.push(key);
            }
            let mut store = TrustStore::new(anchors)
                .map_err(|e| ConfigError::File { key: "trust.ca".into(), message: e.to_string() })?
                .with_clock_skew(t.clock_skew());
            for path in &t.crl {
                let bytes = keyfile::read_bounded(path, MAX_REVOCATION_LIST_LEN as u64)
                    .map_err(|e| file_error("trust.crl", &e))?;
                let list = RevocationList::decode(&bytes).map_err(|e| bad_file("trust.crl", path, e))?;
                store.update_revocation_list(&bytes).map_err(|e| {
                    let why = match e {
                        TrustError::UnknownIssuer => {
                            format!("signed by {}, which is not a CA of trust.ca", list.body().issuer)
                        }
                        TrustError::BadSignature => "the signature does not verify with its CA's key".to_owned(),
                        TrustError::StaleRevocationList { .. } => {
                            "a second list of the same CA (give one list per CA)".to_owned()
                        }
                        other => other.to_string(),
                    };
                    bad_file("trust.crl", path, why)
                })?;
            }
            Ok(Trust::FleetCa(store))
        }
    }
}

impl LoadedNode {
    /// Reads every file `config` names and builds the node: the identity (`node.key`), the
    /// trust (`[trust]`), the own chain (`node.certificate`, which must certify `node.key`
    /// with this node's role and, in fleet-CA mode, verify now against `trust.ca` and the
    /// revocation lists), the cloud's key (`uplink.cloud_key`) and the limits. A gateway in
    /// allowlist mode must list its cloud's key.
    ///
    /// # Errors
    /// [`ConfigError::File`] naming the key of the first file that is missing or bad.
    pub fn load(config: &Config) -> Result<Self, ConfigError> {
        let secret =
            keyfile::read_key(&config.node.key, KeyKind::NodeSecret).map_err(|e| file_error("node.key", &e))?;
        let identity = StaticKeypair::from_secret_bytes(*secret);
        drop(secret);
        let trust = read_trust(&config.trust)?;
        let certificate_chain = match &config.node.certificate {
            Some(path) => Some(check_own_chain(config, path, &identity, &trust)?),
            None => None,
        };
        let cloud_key = match &config.uplink {
            Some(up) => {
                let key = keyfile::read_key(&up.cloud_key, KeyKind::NodePublic)
                    .map_err(|e| file_error("uplink.cloud_key", &e))?;
                let key = PublicKey(*key);
                if key == *identity.public() {
                    return Err(bad_file("uplink.cloud_key", &up.cloud_key, "is this node's own key (node.key)"));
                }
                if let (Trust::Allowlist(list), Some(path)) = (&trust, &config.trust.allowlist) {
                    if list.check(&key).is_err() {
                        return Err(bad_file(
                            "trust.allowlist",
                            path,
                            "does not list the cloud's key (uplink.cloud_key): the gateway would refuse its cloud",
                        ));
                    }
                }
                Some(key)
            }
            None => None,
        };
        let trust = new_state(trust);
        let reloader = TrustReloader {
            trust: trust.clone(),
            config: config.trust.clone(),
            role: config.role,
            public_key: *identity.public(),
            certificate_chain: certificate_chain.clone(),
            cloud_key,
        };
        Ok(Self {
            role: config.role,
            identity,
            trust,
            certificate_chain,
            peer_roles: config.role.peer_roles(),
            limits: config.limits.endpoint_limits(),
            protocol_limits: config.limits.protocol_limits(),
            cloud_key,
            reloader,
        })
    }

    /// A builder for an endpoint of this node: its identity, protocol and endpoint limits, a
    /// trust authorizer over [`LoadedNode::trust`] expecting [`LoadedNode::peer_roles`], and its
    /// certificate chain. Add the listen addresses (and, for the routed shape, `routing`).
    #[must_use]
    pub fn endpoint_builder(&self) -> EndpointBuilder {
        let b = Endpoint::builder(self.identity.clone())
            .protocol_limits(self.protocol_limits)
            .limits(self.limits.clone())
            .authorizer(Authorizer::trust(self.trust.clone(), self.peer_roles));
        match &self.certificate_chain {
            Some(chain) => b.certificate_chain(chain),
            None => b,
        }
    }

    /// What [`LoadedNode::trust`] holds now.
    #[must_use]
    pub fn trust_summary(&self) -> TrustSummary {
        TrustSummary::of(&self.trust.snapshot())
    }

    /// SIGHUP: reads the trust files again and swaps them into the live
    /// [`LoadedNode::trust`] ([`TrustReloader::reload`]).
    ///
    /// # Errors
    /// [`ConfigError::File`] naming the key of the problem; nothing changes then.
    pub fn reload(&self) -> Result<TrustSummary, ConfigError> {
        self.reloader.reload()
    }

    /// A handle that reloads this node's trust, for a signal task
    /// ([`TrustReloader::spawn_on_sighup`]) or a control command.
    #[must_use]
    pub fn reloader(&self) -> TrustReloader {
        self.reloader.clone()
    }
}

/// Re-reads a node's trust files into its live [`TrustState`]. Cheap to clone; clones reload
/// the same state.
#[derive(Debug, Clone)]
pub struct TrustReloader {
    trust: TrustState,
    config: TrustConfig,
    role: NodeRole,
    public_key: PublicKey,
    certificate_chain: Option<CertificateChain>,
    cloud_key: Option<PublicKey>,
}

impl TrustReloader {
    /// Reads the trust files again (`trust.allowlist`, or `trust.ca` and `trust.crl`; the
    /// paths of the configuration loaded at start) and swaps them into the live trust state
    /// with [`TrustState::replace`]. Healthy sessions stay up; every live connection checks
    /// its peer against the new trust at once and closes if it now fails (taken off the
    /// allowlist: `Unauthorized`; revoked: `Revoked`). A revocation list a peer pushed that
    /// is newer than the file stays in force. The node key, certificate, limits and
    /// addresses are not reloaded (restart for those).
    ///
    /// If a file is missing or bad, or the new revocation list is older than the one in
    /// force, nothing changes and the error says why; the node carries on with its current
    /// trust.
    ///
    /// # Errors
    /// [`ConfigError::File`] naming the key of the problem.
    pub fn reload(&self) -> Result<TrustSummary, ConfigError> {
        let trust = read_trust(&self.config)?;
        if let (Trust::FleetCa(store), Some(chain)) = (&trust, &self.certificate_chain) {
            // The node keeps presenting its chain; if the new anchors no longer accept it,
            // its peers will refuse it at their next handshake. Say so, but reload anyway:
            // the trust files are the operator's decision.
            if let Err(e) = own_chain_verifies(store, chain, &self.public_key, self.role) {
                tracing::warn!(error = %e, "after the reload this node's own certificate no longer verifies");
            }
        }
        if let (Trust::Allowlist(list), Some(cloud)) = (&trust, &self.cloud_key) {
            if list.check(cloud).is_err() {
                tracing::warn!("the reloaded allowlist does not list the cloud: the uplink will close");
            }
        }
        let key = if self.config.mode == TrustMode::Ca { "trust.crl" } else { "trust.allowlist" };
        self.trust.replace(trust).map_err(|e| match e {
            TrustError::StaleRevocationList { current, received } => ConfigError::File {
                key: key.to_owned(),
                message: if received == 0 {
                    format!("the reloaded files hold no revocation list, but epoch {current} is in force; nothing reloaded")
                } else {
                    format!(
                        "the reloaded list has epoch {received}, older than epoch {current} in force; nothing reloaded"
                    )
                },
            },
            other => ConfigError::File { key: key.to_owned(), message: other.to_string() },
        })?;
        let summary = TrustSummary::of(&self.trust.snapshot());
        tracing::info!(trust = %summary, "trust reloaded");
        Ok(summary)
    }

    /// Reloads on every SIGHUP for as long as the runtime runs: each attempt is logged (the
    /// new trust, or the error and that the current trust stays) and counted in
    /// [`metrics::TRUST_RELOADS`](crate::metrics::TRUST_RELOADS). The handler is installed
    /// before this returns, so a SIGHUP sent afterwards is never the default action (exit).
    ///
    /// # Errors
    /// The I/O error of installing the signal handler. Needs a tokio runtime.
    #[cfg(unix)]
    pub fn spawn_on_sighup(self) -> io::Result<tokio::task::JoinHandle<()>> {
        use crate::metrics::{labels, TRUST_RELOADS};
        let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        Ok(tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                let outcome = match self.reload() {
                    Ok(_) => labels::ACCEPTED,
                    Err(e) => {
                        tracing::error!(error = %e, "trust reload failed; the current trust stays in force");
                        labels::FAILED
                    }
                };
                ::metrics::counter!(TRUST_RELOADS, labels::OUTCOME => outcome).increment(1);
            }
        }))
    }
}

/// A device's files in fleet-CA mode (the `demo` subcommand and tests simulate devices
/// with them): its identity, its certificate chain, and a trust state holding the CA.
pub struct DeviceFiles {
    /// The device's static key pair.
    pub identity: StaticKeypair,
    /// Its certificate chain.
    pub certificate_chain: CertificateChain,
    /// Its trust: the fleet CA, with the system clock.
    pub trust: TrustState,
}

impl fmt::Debug for DeviceFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceFiles").field("public_key", self.identity.public()).finish_non_exhaustive()
    }
}

impl DeviceFiles {
    /// Reads a device's secret key, certificate (or chain) and its CA's public key.
    ///
    /// # Errors
    /// [`ConfigError::File`] naming `node.key`, `node.certificate` or `trust.ca`.
    pub fn load(key: &Path, certificate: &Path, ca: &Path) -> Result<Self, ConfigError> {
        let secret = keyfile::read_key(key, KeyKind::NodeSecret).map_err(|e| file_error("node.key", &e))?;
        let identity = StaticKeypair::from_secret_bytes(*secret);
        drop(secret);
        let certificate_chain = read_chain("node.certificate", certificate)?;
        let trust = read_trust(&TrustConfig {
            mode: TrustMode::Ca,
            ca: vec![ca.to_path_buf()],
            crl: Vec::new(),
            allowlist: None,
            clock_skew_secs: None,
            gateways: Vec::new(),
        })?;
        Ok(Self { identity, certificate_chain, trust: new_state(trust) })
    }
}

fn new_state(trust: Trust) -> TrustState {
    match trust {
        Trust::Allowlist(list) => TrustState::allowlist(list, TimeSource::SystemClock, []),
        other => TrustState::new(other, TimeSource::SystemClock),
    }
}

fn own_chain_verifies(
    store: &TrustStore,
    chain: &CertificateChain,
    public_key: &PublicKey,
    role: NodeRole,
) -> Result<(), TrustError> {
    let bytes = chain.encode()?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok().map(|d| UnixTime::from_secs(d.as_secs()));
    store.verify(public_key, Some(&bytes), now, RoleSet::of(&[role.cert_role()])).map(drop)
}

/// `node.certificate` must certify `node.key` with this node's role and, in fleet-CA mode,
/// verify now with the node's own trust anchors and lists — what its peers will check.
fn check_own_chain(
    config: &Config,
    path: &Path,
    identity: &StaticKeypair,
    trust: &Trust,
) -> Result<CertificateChain, ConfigError> {
    const KEY: &str = "node.certificate";
    let chain = read_chain(KEY, path)?;
    let leaf = chain.leaf().body();
    // Public keys: no constant-time comparison needed.
    if leaf.public_key != *identity.public().as_bytes() {
        return Err(bad_file(KEY, path, "certifies another key than node.key"));
    }
    if leaf.role != config.role.cert_role() {
        return Err(bad_file(KEY, path, format!("has role {}, but this node runs as {}", leaf.role, config.role)));
    }
    if let Trust::FleetCa(store) = trust {
        own_chain_verifies(store, &chain, identity.public(), config.role)
            .map_err(|e| bad_file(KEY, path, format!("does not verify with trust.ca and trust.crl: {e}")))?;
    }
    Ok(chain)
}
