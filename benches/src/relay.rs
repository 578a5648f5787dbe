//! The relay benchmarks' fleet (issue 5): a fleet CA, a cloud, a gateway and devices
//! provisioned in a temporary directory with veil-relay's own tooling ([`demo::provision`]),
//! the cloud and the gateway configured from TOML files as the `veil-relay` roles are; devices
//! linked through the gateway ([`SimDevice`], the demo's device) or straight to the cloud
//! ([`DirectDevice`]); and a count of what the cloud receives from each device ([`Tally`]).
//!
//! Everything listens on 127.0.0.1. The limits are opened for many handshakes from one address
//! (every device of a benchmark connects from 127.0.0.1); everything else is the roles'
//! defaults.

use std::collections::HashMap;
use std::fmt::Display;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::watch;
use veil_protocol::trust::{NodeId, RoleSet};
use veil_protocol::PublicKey;
use veil_relay::cloud::{Cloud, CloudSettings};
use veil_relay::config::Config;
use veil_relay::demo::{self, Fleet};
use veil_relay::gateway::GatewaySettings;
use veil_relay::keyfile::{self, KeyKind};
use veil_relay::trustload::{DeviceFiles, LoadedNode};
use veil_transports::{
    Authorizer, Connection, DeliveryOptions, Endpoint, NodeEvent, PeerRoles, RoutedEndpoint, Transport, Via,
};

pub use veil_relay::demo::SimDevice;

use crate::net::{self, NetError};

fn broken(e: impl Display) -> NetError {
    NetError::Broken(e.to_string())
}

/// Handshakes a benchmark's devices may start at once at the gateway and the cloud.
const MAX_HANDSHAKES: usize = 4_096;

/// A provisioned fleet in a temporary directory (removed on drop).
#[derive(Debug)]
pub struct RelayFleet {
    dir: tempfile::TempDir,
    fleet: Fleet,
    /// The gateway's static public key.
    pub gateway_key: PublicKey,
    /// The cloud's static public key.
    pub cloud_key: PublicKey,
}

impl RelayFleet {
    /// A CA, a cloud, a gateway and `devices` devices, each with a key pair and a certificate
    /// of its role (one day valid).
    ///
    /// # Errors
    /// If the tooling fails (disk full, a bug).
    pub fn provision(devices: usize) -> Result<Self, NetError> {
        let dir = tempfile::tempdir()?;
        let fleet = demo::provision(dir.path(), devices).map_err(broken)?;
        let gateway_key = read_public(&fleet.gateway_pub)?;
        let cloud_key = read_public(&fleet.cloud_pub)?;
        Ok(Self { dir, fleet, gateway_key, cloud_key })
    }

    /// The fleet's directory.
    #[must_use]
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Devices provisioned.
    #[must_use]
    pub fn devices(&self) -> usize {
        self.fleet.devices.len()
    }

    /// Device `i`'s key, certificate and trust.
    ///
    /// # Errors
    /// No such device, or its files cannot be read.
    pub fn device(&self, i: usize) -> Result<DeviceFiles, NetError> {
        let (key, cert) = self.fleet.devices.get(i).ok_or_else(|| broken(format!("no device {i}")))?;
        DeviceFiles::load(key, cert, &self.fleet.ca_pub).map_err(broken)
    }

    /// The cloud's settings from its configuration file (TCP on 127.0.0.1, any port), with
    /// the handshake limits opened for `max_connections` links from one address.
    ///
    /// # Errors
    /// If the configuration or a file it names is refused.
    pub fn cloud_settings(&self, max_connections: usize) -> Result<CloudSettings, NetError> {
        let (config, node) = load(&self.fleet.cloud_config)?;
        let mut s = CloudSettings::from_node(&node, &config).map_err(broken)?;
        s.limits = net::open_limits(max_connections);
        Ok(s)
    }

    /// Writes the gateway's configuration to `gateway.toml` and returns its path: devices on
    /// `listen_tcp` and on a UDP port of the kernel's choice, the uplink to `cloud` over TCP,
    /// room and handshake rate for `max_devices` devices from one address, logs at `warn`
    /// (the default `info` logs every link).
    ///
    /// # Errors
    /// If the file cannot be written.
    pub fn write_gateway_config(
        &self,
        cloud: SocketAddr,
        listen_tcp: SocketAddr,
        max_devices: usize,
    ) -> Result<PathBuf, NetError> {
        let path = self.dir().join("gateway.toml");
        let text = format!(
            "role = \"gateway\"\n\n[node]\nkey = \"gateway.key\"\ncertificate = \"gateway.cert\"\n\n\
             [trust]\nmode = \"ca\"\nca = \"ca/ca.pub\"\ncrl = \"ca/ca.crl\"\n\n\
             [listen]\ntcp = \"{listen_tcp}\"\nudp = \"127.0.0.1:0\"\n\n\
             [uplink]\naddress = \"{cloud}\"\ncloud_key = \"cloud.key.pub\"\n\
             backoff_initial_ms = 50\nbackoff_max_ms = 1000\n\n\
             [limits]\nmax_connections = {}\nmax_handshakes = {MAX_HANDSHAKES}\n\
             handshake_rate_per_sec = 1000000000.0\nhandshake_burst = 4294967295\n\n\
             [log]\nlevel = \"warn\"\n",
            max_devices + 16
        );
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// The gateway's settings from a configuration [`RelayFleet::write_gateway_config`] wrote.
    ///
    /// # Errors
    /// If the configuration or a file it names is refused.
    pub fn gateway_settings(&self, config: &Path) -> Result<GatewaySettings, NetError> {
        let (config, node) = load(config)?;
        GatewaySettings::from_node(&node, &config).map_err(broken)
    }
}

/// Loads and checks a role's configuration and the files it names, as `veil-relay` does.
///
/// # Errors
/// The problem, naming its key.
pub fn load(path: &Path) -> Result<(Config, LoadedNode), NetError> {
    let config = Config::load(path).map_err(broken)?;
    config.check().map_err(broken)?;
    let node = LoadedNode::load(&config).map_err(broken)?;
    Ok((config, node))
}

fn read_public(path: &Path) -> Result<PublicKey, NetError> {
    keyfile::read_key(path, KeyKind::NodePublic).map(|k| PublicKey(*k)).map_err(broken)
}

/// A device linked straight to the cloud (spec §16.1, direct shape): its link session is its
/// end-to-end session. Sends go through a [`RoutedEndpoint`] with the link added as direct,
/// the same call a relayed device makes.
#[derive(Debug, Clone)]
pub struct DirectDevice {
    /// The device's link endpoint.
    pub endpoint: Endpoint,
    /// Its end-to-end endpoint (the direct link only).
    pub routed: RoutedEndpoint,
    /// Its link to the cloud.
    pub link: Connection,
    /// The cloud's node id.
    pub cloud: NodeId,
}

impl DirectDevice {
    /// Links to the cloud at `cloud` over TCP, expecting a cloud certificate for `cloud_key`;
    /// with `delivery`, its messages are acknowledged (spec §17), else best effort.
    ///
    /// # Errors
    /// The link failed.
    pub async fn connect(
        files: &DeviceFiles,
        cloud: SocketAddr,
        cloud_key: PublicKey,
        delivery: Option<DeliveryOptions>,
    ) -> Result<Self, NetError> {
        let roles = PeerRoles::new(RoleSet::NONE, RoleSet::CLOUD);
        let endpoint = Endpoint::builder(files.identity.clone())
            .authorizer(Authorizer::trust(files.trust.clone(), roles))
            .certificate_chain(&files.certificate_chain)
            .bind()
            .await?;
        let link = endpoint.connect_expecting(Transport::Tcp, cloud, Some(cloud_key), RoleSet::CLOUD).await?;
        let mut rb = RoutedEndpoint::builder(files.identity.clone())
            .authorizer(Authorizer::trust(files.trust.clone(), roles))
            .certificate_chain(&files.certificate_chain);
        if let Some(d) = delivery {
            rb = rb.delivery(d);
        }
        let routed = rb.build()?;
        routed.add_direct(link.clone());
        let cloud = routed.connect(cloud_key).await?;
        Ok(Self { endpoint, routed, link, cloud })
    }

    /// Closes the link.
    pub fn close(&self) {
        self.routed.close();
        self.endpoint.close();
    }
}

/// A device's link to the gateway alone, with no end-to-end session: what a plain endpoint
/// holding the same links is measured with.
///
/// # Errors
/// The link failed.
pub async fn link_to_gateway(
    files: &DeviceFiles,
    gateway: SocketAddr,
    gateway_key: PublicKey,
) -> Result<(Endpoint, Connection), NetError> {
    let roles = PeerRoles::new(RoleSet::NONE, RoleSet::UPSTREAM);
    let endpoint = Endpoint::builder(files.identity.clone())
        .authorizer(Authorizer::trust(files.trust.clone(), roles))
        .certificate_chain(&files.certificate_chain)
        .bind()
        .await?;
    let link = endpoint.connect_expecting(Transport::Tcp, gateway, Some(gateway_key), RoleSet::GATEWAY).await?;
    Ok((endpoint, link))
}

/// What the cloud has received from one device: messages and payload bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Received {
    /// Data messages.
    pub messages: u64,
    /// Their payload bytes.
    pub bytes: u64,
    /// Of the messages, those that came in a direct link.
    pub direct: u64,
}

/// Counts the cloud's messages per device. Its task reads every cloud event (the cloud's
/// end-to-end endpoint waits while nobody does).
#[derive(Debug, Default)]
pub struct Tally {
    nodes: Mutex<HashMap<NodeId, watch::Sender<Received>>>,
}

impl Tally {
    /// Starts reading `cloud`'s events; the task ends when the cloud shuts down.
    #[must_use]
    pub fn spawn(cloud: Arc<Cloud>) -> Arc<Self> {
        let tally = Arc::new(Self::default());
        let t = Arc::clone(&tally);
        tokio::spawn(async move {
            while let Ok(ev) = cloud.next_event().await {
                if let NodeEvent::Message { node, payload, via, .. } = ev {
                    t.sender(node).send_modify(|r| {
                        r.messages += 1;
                        r.bytes += payload.len() as u64;
                        r.direct += u64::from(via == Via::Direct);
                    });
                }
            }
        });
        tally
    }

    fn sender(&self, node: NodeId) -> watch::Sender<Received> {
        self.nodes.lock().unwrap_or_else(PoisonError::into_inner).entry(node).or_default().clone()
    }

    /// A view of what the cloud received from `node`, updated per message.
    #[must_use]
    pub fn watch(&self, node: NodeId) -> watch::Receiver<Received> {
        self.sender(node).subscribe()
    }
}
