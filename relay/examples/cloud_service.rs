//! A cloud service that embeds Veil's cloud role (`veil_relay::cloud`): it accepts a device's
//! end-to-end session through a gateway, prints each reading and answers it with a command.
//!
//! Everything runs on loopback: a fleet CA, keys and certificates are made in a temporary
//! directory, then a cloud, a gateway and one device start.
//!
//! ```sh
//! cargo run -p veil-relay --example cloud_service
//! ```

use std::time::Duration;

use bytes::Bytes;
use veil_relay::cloud::{Cloud, CloudSettings};
use veil_relay::config::Config;
use veil_relay::demo::{provision, write_gateway_config, SimDevice};
use veil_relay::gateway::{Gateway, GatewaySettings};
use veil_relay::keyfile::{read_key, KeyKind};
use veil_relay::trustload::{DeviceFiles, LoadedNode};
use veil_transports::{NodeEvent, Transport};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let fleet = provision(dir.path(), 1)?;

    // The service: the cloud role from its configuration file (trust, keys, listener).
    let config = Config::load(&fleet.cloud_config)?;
    let node = LoadedNode::load(&config)?;
    let cloud = Cloud::start(CloudSettings::from_node(&node, &config)?).await?;
    let cloud_addr = cloud.local_tcp_addr().ok_or("no TCP listener")?;
    println!("cloud {} listening on {cloud_addr}", cloud.node_id());

    // A gateway and a device, to have someone to talk to.
    let gw_config = Config::load(write_gateway_config(&fleet, cloud_addr)?)?;
    let gw_node = LoadedNode::load(&gw_config)?;
    let gateway = Gateway::start(GatewaySettings::from_node(&gw_node, &gw_config)?).await?;
    let (key, cert) = &fleet.devices[0];
    let files = DeviceFiles::load(key, cert, &fleet.ca_pub)?;
    let gateway_key = veil_protocol::PublicKey(*read_key(&fleet.gateway_pub, KeyKind::NodePublic)?);
    let cloud_key = veil_protocol::PublicKey(*read_key(&fleet.cloud_pub, KeyKind::NodePublic)?);
    let gw_addr = gateway.local_tcp_addr().ok_or("no gateway listener")?;
    let device = SimDevice::connect(&files, Transport::Tcp, gw_addr, gateway_key, cloud_key).await?;
    for i in 0..3 {
        device.send(0, Bytes::from(format!("temperature {}.5 C", 20 + i))).await?;
    }

    // The service's loop: readings in, one command back per reading.
    let mut answered = 0;
    while answered < 3 {
        match tokio::time::timeout(Duration::from_secs(10), cloud.next_event()).await?? {
            NodeEvent::Connected { node, direct, .. } => println!("{node} connected (direct: {direct})"),
            NodeEvent::Message { node, channel, id, payload, via, .. } => {
                println!("{node} channel {channel} #{id} via {via:?}: {}", String::from_utf8_lossy(&payload));
                cloud.send(&node, 1, Bytes::from_static(b"ack")).await?;
                answered += 1;
            }
            _ => {}
        }
    }
    // The device gets the answers end to end.
    let mut acks = 0;
    while acks < 3 {
        if let NodeEvent::Message { payload, .. } =
            tokio::time::timeout(Duration::from_secs(10), device.routed.next_event()).await??
        {
            println!("device got: {}", String::from_utf8_lossy(&payload));
            acks += 1;
        }
    }
    device.close();
    gateway.shutdown(Duration::from_secs(2)).await;
    cloud.shutdown(Duration::from_secs(2)).await;
    Ok(())
}
