//! The real `veil-relay` binary, in several processes: a cloud and one or two gateways are
//! spawned from TOML written into a temporary directory (fixed loopback ports; the fleet's
//! keys and certificates from `demo::provision`), and devices are simulated in this process
//! (`demo::SimDevice`, or lower-level code for the misbehaving ones). The cloud writes its
//! sink to a file and takes commands on its control socket; each gateway runs with
//! `--log-level trace --audit-tap FILE` and serves `/metrics`, which the tests scrape.
//!
//! | test | what it proves |
//! |---|---|
//! | [`devices_over_tcp_and_udp_exchange_messages_and_the_gateway_sees_no_plaintext`] | readings from a TCP and a UDP device reach the sink under their node ids; commands from the control socket reach the devices through the gateway; nothing the gateway passed on (audit tap) or logged at trace level holds the payloads' marker, which the sink does hold; SIGTERM drains and exits 0 |
//! | [`restarted_gateway_and_cloud_carry_traffic_again`] | a SIGKILLed gateway restarted on the same ports takes the device back and its end-to-end session goes on; a restarted cloud gets the gateway's uplink back (reconnect counted) and new sessions work |
//! | [`a_device_that_moves_between_gateways_keeps_its_session_and_commands_follow`] | a device linked to a second gateway keeps its session; the cloud sends over the newest route, and falls back to the older gateway when the newer link ends |
//! | [`revoked_foreign_and_spoofing_devices_are_refused_and_a_gateway_cannot_pose_as_the_cloud`] | revocation (SIGHUP at the cloud, pushed through the gateway) closes a device's link and refuses it afterwards; a certificate of another CA is refused; a handshake under another device's key over one's own link is denied by the cloud and the honest session goes on; a gateway cannot pass for the cloud, at the link or end to end |
//! | [`bad_routing_traffic_at_the_gateway_is_dropped_answered_and_counted`] | forwards to unknown handles, relay-only messages from a device and an envelope too large for the uplink are dropped with the `Unreachable` answers of spec §16.4/§16.5 (rate limited) and counted by reason; a message that does not decode closes only its link; another device's traffic is untouched |
//!
//! Every wait is bounded (`util::WAIT`); every child is killed on every exit path.
#![cfg(unix)]
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod util;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use util::{
    contains, device_endpoint, eventually, hex_id, issue, next_message, relink, scrape, send_when_routed, sim_device,
    start_cloud, start_gateway, within, CloudProc, GatewayProc, Net,
};
use veil_protocol::routing::{RouteReason, RoutingMessage};
use veil_protocol::trust::{CertRole, NodeId, RoleSet};
use veil_protocol::wire::{RejectReason, TYPE_HANDSHAKE_INIT, TYPE_TRANSPORT};
use veil_protocol::{
    CloseReason, Closed, Config, Decision, DenyReason, Event, Limits, Mode, PublicKey, Role, StaticKeypair, Timestamp,
};
use veil_relay::demo::SimDevice;
use veil_relay::metrics::{E2E_HANDSHAKES, HANDSHAKES, ROUTING_DROPS};
use veil_relay::tooling::{self, RevokeRequest};
use veil_relay::trustload::DeviceFiles;
use veil_transports::{Authorizer, Endpoint, Error, PeerRoles, Received, RoutedEndpoint, Transport, Via};

/// What every payload in these tests carries: it must reach the cloud and never show in
/// anything the gateway passes on or logs.
const MARKER: &str = "VEIL-PROCESS-TEST-MARKER-5d1e";

fn public(files: &DeviceFiles) -> PublicKey {
    *files.identity.public()
}

fn node_of(key: &PublicKey) -> NodeId {
    NodeId::from_public_key(key)
}

/// Sends a command through the cloud's control socket and waits for it at the device
/// (skipping other messages); how it came.
async fn command_reaches(cloud: &CloudProc, d: &SimDevice, key: &PublicKey, channel: u16, text: &str) -> Via {
    let answer = cloud.command(key, channel, text).await;
    assert_eq!((&answer["ok"], &answer["channel"]), (&json!(true), &json!(channel)), "command {text:?}: {answer}");
    assert!(answer["id"].is_u64(), "command {text:?}: {answer}");
    within(&format!("command {text:?} at the device"), async {
        loop {
            let (from, ch, payload, via) = next_message(&d.routed).await;
            if payload == text.as_bytes() {
                assert_eq!((from, ch), (d.cloud, channel));
                return via;
            }
        }
    })
    .await
}

/// Waits for the sink line of `text` from `key`; its channel and id, and the relay it came
/// through.
async fn delivered(cloud: &CloudProc, key: &PublicKey, text: &str) -> (u16, u64, Option<String>) {
    let device = hex_id(key);
    let line =
        cloud.wait_line(&format!("{text:?} in the sink"), |l| l.device == device && l.payload == text.as_bytes()).await;
    assert_eq!(line.via, "relay", "{line:?}");
    (line.channel, line.id, line.relay)
}

/// Cases 1 and 2: traffic both ways over TCP and UDP device links, and the plaintext scan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_over_tcp_and_udp_exchange_messages_and_the_gateway_sees_no_plaintext() {
    let net = Net::provision(2);
    let cloud = start_cloud(&net).await;
    let mut gw = start_gateway(&net, "gateway", &cloud, Transport::Tcp).await;

    let mut devices = Vec::new();
    for (i, transport) in [(0, Transport::Tcp), (1, Transport::Udp)] {
        let d = sim_device(&net, i, &gw, transport).await;
        for n in 0..3 {
            d.send(7, Bytes::from(format!("{MARKER} reading {n} over {transport}"))).await.unwrap();
        }
        devices.push((public(&net.device(i)), transport, d));
    }
    // Each reading once in the sink, under the device's node id, through the gateway.
    for (key, transport, _) in &devices {
        for n in 0..3u64 {
            let text = format!("{MARKER} reading {n} over {transport}");
            assert_eq!(delivered(&cloud, key, &text).await, (7, n, Some(gw.id())));
        }
    }
    assert_eq!(cloud.sink_lines().len(), 6, "every reading once");
    // Commands from the control socket reach each device through the gateway.
    for (key, transport, d) in &devices {
        let text = format!("{MARKER} command for the {transport} device");
        assert_eq!(command_reaches(&cloud, d, key, 3, &text).await, Via::Relay(node_of(&gw.key)));
    }
    // A node the cloud has no session with: the command waits in its outbox (spec §17.7)
    // until its time to live ends; then the sink records it as expired (checked below).
    let answer = cloud.command(&gw.key, 3, "nobody").await;
    assert_eq!((&answer["ok"], &answer["channel"]), (&json!(true), &json!(3)), "{answer}");
    let nobody_id = answer["id"].as_u64().expect("the command's id");
    let nobody = Instant::now();

    // SIGTERM drains the gateway: every device is told ShuttingDown, the process exits 0,
    // and the uplink, closed by the drain, is not reconnected.
    let status = gw.proc.terminate().await;
    assert!(status.success(), "gateway exit after SIGTERM: {status}");
    for (_, transport, d) in &devices {
        let ended = within("the drained link ends", d.link.closed()).await;
        assert!(
            matches!(ended, Error::Closed { reason: CloseReason::ShuttingDown, by_peer: true }),
            "{transport}: {ended:?}"
        );
        d.close();
    }
    let log = gw.proc.log();
    assert!(!log.contains("uplink lost"), "the drain reconnected the uplink:\n{log}");

    // The scan: the gateway's tap and logs are complete now.
    let tapped = gw.tapped();
    // Routed-mode packets only (spec §16.2): handshakes and transport packets, at least one
    // for each device's 3 readings (sent together, they may share one) and one per command,
    // and each device's INIT, which the gateway's key cannot open.
    assert!(tapped.iter().all(|p| matches!(p.first(), Some(0x01..=0x03 | 0x10 | 0x11))), "{tapped:?}");
    assert!(tapped.iter().filter(|p| p[0] & 0xfe == TYPE_TRANSPORT).count() >= 4, "{} packets", tapped.len());
    let inits: Vec<&Vec<u8>> = tapped.iter().filter(|p| p[0] == TYPE_HANDSHAKE_INIT).collect();
    assert!(inits.len() >= 2, "{} INITs", inits.len());
    for init in inits {
        assert!(!opens_with(&net.node("gateway").identity, init), "the gateway's key opened a device's INIT");
    }
    let marker = MARKER.as_bytes();
    let hex_lower = hex::encode(marker);
    for (k, p) in tapped.iter().enumerate() {
        // Not even a 12-byte piece of the marker in what the gateway saw.
        for w in marker.windows(12) {
            assert!(!contains(p, w), "tapped packet {k} holds plaintext");
        }
    }
    let logs = [gw.proc.log(), gw.proc.output()];
    assert!(logs[0].contains(" DEBUG "), "the gateway logs at trace level (so the scan sees everything it logs)");
    for text in &logs {
        let lower = text.to_lowercase();
        assert!(!lower.contains(&hex_lower), "the gateway logged a payload in hex");
        for w in marker.windows(12) {
            assert!(!contains(text.as_bytes(), w), "the gateway logged a payload");
        }
    }
    // The scan would have found it: the sink holds it, as text and as hex.
    let sink = std::fs::read_to_string(&cloud.sink).unwrap();
    assert!(sink.contains(MARKER) && sink.contains(&hex_lower));

    // The command nobody took: recorded once its time to live ended, never sent.
    let gw_node = hex_id(&gw.key);
    let expired = eventually("the expired command in the sink", || {
        util::sink_records(&cloud.sink, "command").into_iter().find(|c| c["device"] == gw_node.as_str())
    })
    .await;
    assert!(nobody.elapsed() >= Duration::from_secs(util::COMMAND_TTL_SECS), "expired early: {expired}");
    assert_eq!(
        (expired["channel"].as_u64(), expired["id"].as_u64(), expired["outcome"].as_str()),
        (Some(3), Some(nobody_id), Some("expired")),
        "the record names the command the socket answered: {expired}"
    );
    assert_eq!(expired["payload_text"], "nobody");
}

/// Case 3: SIGKILL the gateway and start it again on the same ports; then the same for the
/// cloud, which the gateway's uplink must find again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_gateway_and_cloud_carry_traffic_again() {
    let net = Net::provision(1);
    let mut cloud = start_cloud(&net).await;
    let mut gw = start_gateway(&net, "gateway", &cloud, Transport::Tcp).await;
    let key = public(&net.device(0));
    let d = sim_device(&net, 0, &gw, Transport::Tcp).await;
    d.send(1, Bytes::from_static(b"before the gateway restart")).await.unwrap();
    assert_eq!(delivered(&cloud, &key, "before the gateway restart").await, (1, 0, Some(gw.id())));

    let ports = (gw.tcp, gw.udp);
    gw.restart().await;
    assert_eq!((gw.tcp, gw.udp), ports);
    // The device's link died with the process; it links to the new one.
    let ended = within("the old link ends", d.link.closed()).await;
    assert!(matches!(ended, Error::CarrierClosed | Error::Io(_)), "{ended:?}");
    let _link = relink(&d, &gw, Transport::Tcp).await;
    send_when_routed(&d, 1, "after the gateway restart").await;
    // Same end-to-end session: the message id goes on.
    assert_eq!(delivered(&cloud, &key, "after the gateway restart").await, (1, 1, Some(gw.id())));
    assert_eq!(command_reaches(&cloud, &d, &key, 2, "through the new gateway").await, Via::Relay(node_of(&gw.key)));

    // The cloud goes away: the gateway sees its uplink down, and back up once it restarts.
    assert_eq!(gw.metric("veil_relay_uplink_reconnects_total", &[]).await, 0.0);
    cloud.proc.kill();
    gw.wait_metric("veil_relay_uplink_up", &[], |v| v == 0.0).await;
    cloud.restart().await;
    gw.wait_metric("veil_relay_uplink_up", &[], |v| v == 1.0).await;
    assert!(gw.metric("veil_relay_uplink_reconnects_total", &[]).await >= 1.0);
    // The new cloud process knows no session: the device starts a new one.
    d.close();
    let d = sim_device(&net, 0, &gw, Transport::Tcp).await;
    d.send(1, Bytes::from_static(b"after the cloud restart")).await.unwrap();
    assert_eq!(delivered(&cloud, &key, "after the cloud restart").await, (1, 0, Some(gw.id())));
    assert_eq!(command_reaches(&cloud, &d, &key, 2, "from the new cloud").await, Via::Relay(node_of(&gw.key)));
}

/// Case 4: a device moves from gateway A (TCP uplink) to gateway B (UDP uplink).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_moves_between_gateways_keeps_its_session_and_commands_follow() {
    let net = Net::provision(1);
    net.issue("gateway-b", CertRole::Gateway);
    let cloud = start_cloud(&net).await;
    let a = start_gateway(&net, "gateway", &cloud, Transport::Tcp).await;
    let b = start_gateway(&net, "gateway-b", &cloud, Transport::Udp).await;
    let key = public(&net.device(0));
    let d = sim_device(&net, 0, &a, Transport::Tcp).await;
    d.send(5, Bytes::from_static(b"through A")).await.unwrap();
    assert_eq!(delivered(&cloud, &key, "through A").await, (5, 0, Some(a.id())));
    assert_eq!(command_reaches(&cloud, &d, &key, 6, "command through A").await, Via::Relay(node_of(&a.key)));

    // The device links to B as well (over UDP); B announces it to the cloud, so the newest
    // route to it goes through B, and the device's own newest route to the cloud too.
    let ep_b = device_endpoint(&net.device(0), Transport::Udp).await;
    let link_b = within("the link to B", ep_b.connect_expecting(Transport::Udp, b.udp, Some(b.key), RoleSet::GATEWAY))
        .await
        .unwrap();
    d.routed.add_relay_link(link_b.clone());
    wait_route(&d.routed, &d.cloud, &node_of(&b.key)).await;
    d.send(5, Bytes::from_static(b"through B")).await.unwrap();
    // The session goes on across the move: the id continues.
    assert_eq!(delivered(&cloud, &key, "through B").await, (5, 1, Some(b.id())));
    assert_eq!(command_reaches(&cloud, &d, &key, 6, "command through B").await, Via::Relay(node_of(&b.key)));

    // The link to B ends: B withdraws the device, and the cloud falls back to A.
    link_b.close(CloseReason::Normal).await.unwrap();
    b.wait_metric("veil_relay_route_announcements_total", &[("kind", "withdraw")], |v| v >= 1.0).await;
    wait_route(&d.routed, &d.cloud, &node_of(&a.key)).await;
    d.send(5, Bytes::from_static(b"back through A")).await.unwrap();
    assert_eq!(delivered(&cloud, &key, "back through A").await, (5, 2, Some(a.id())));
    // B's withdrawal left B (the metric above) before that message went out through A, so
    // the cloud has taken it by the time the message is in the sink: its newest route is A's.
    assert_eq!(command_reaches(&cloud, &d, &key, 6, "command through A again").await, Via::Relay(node_of(&a.key)));
}

/// Waits until the device's route to `node` goes through `relay`.
async fn wait_route(routed: &RoutedEndpoint, node: &NodeId, relay: &NodeId) {
    within("the route change", async {
        loop {
            if let veil_transports::NodeEvent::RouteChanged { node: n, relay: Some(r) } =
                routed.next_event().await.unwrap()
            {
                if n == *node && r == *relay {
                    return;
                }
            }
        }
    })
    .await;
}

/// Case 5: who may reach the cloud, and who may pose as whom.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines)]
async fn revoked_foreign_and_spoofing_devices_are_refused_and_a_gateway_cannot_pose_as_the_cloud() {
    let net = Net::provision(4);
    let ca2 = net.dir().join("ca2");
    tooling::ca_init(&ca2, false).unwrap();
    issue(net.dir(), &ca2, "foreign", CertRole::Device);
    let cloud = start_cloud(&net).await;
    let gw = start_gateway(&net, "gateway", &cloud, Transport::Tcp).await;
    let cloud_key = net.cloud_key();
    let refused = |reason: &'static str| [("outcome", "refused"), ("reason", reason)];

    // Revocation: device 2 is up, then revoked; SIGHUP makes the cloud read the list and push
    // it to the gateway, which closes the device's link with Revoked.
    let revoked_key = public(&net.device(2));
    let r = sim_device(&net, 2, &gw, Transport::Tcp).await;
    r.send(1, Bytes::from_static(b"before revocation")).await.unwrap();
    delivered(&cloud, &revoked_key, "before revocation").await;
    let keys = vec![net.device_pub(2).to_str().unwrap().to_owned()];
    tooling::revoke(&net.ca_dir(), RevokeRequest { keys, ..RevokeRequest::default() }).unwrap();
    cloud.proc.signal("HUP");
    let ended = within("the revoked device's link closes", r.link.closed()).await;
    assert!(matches!(ended, Error::Closed { reason: CloseReason::Revoked, by_peer: true }), "{ended:?}");
    let reloads = util::eventually_async("the cloud's reload", || async {
        let body = scrape(cloud.metrics).await?;
        util::metric(&body, "veil_relay_trust_reloads_total", &[("outcome", "accepted")]).filter(|v| *v >= 1.0)
    })
    .await;
    assert_eq!(reloads, 1.0);
    // What it still tries goes nowhere (checked at the end), and a new link is refused at
    // the handshake.
    let _ = r.send(1, Bytes::from_static(b"after revocation")).await;
    let e = SimDevice::connect(&net.device(2), Transport::Tcp, gw.tcp, gw.key, cloud_key).await.unwrap_err();
    assert_eq!(e.reject_reason(), Some(RejectReason::Revoked), "{e}");
    gw.wait_metric(HANDSHAKES, &refused("revoked"), |v| v >= 1.0).await;

    // A device certified by another CA.
    let d = net.dir();
    let foreign = DeviceFiles::load(&d.join("foreign.key"), &d.join("foreign.cert"), &net.fleet.ca_pub).unwrap();
    let e = SimDevice::connect(&foreign, Transport::Tcp, gw.tcp, gw.key, cloud_key).await.unwrap_err();
    assert_eq!(e.reject_reason(), Some(RejectReason::BadCertificate), "{e}");
    gw.wait_metric(HANDSHAKES, &refused("bad_certificate"), |v| v >= 1.0).await;

    // Spoofing: device 0 has an honest session. Then a link authenticated as device 0 carries
    // an end-to-end handshake made with device 1's key: the gateway labels it with device
    // 0's node id (the link's), and the cloud denies the mismatch.
    let (a_files, b_files) = (net.device(0), net.device(1));
    let (a_key, b_key) = (public(&a_files), public(&b_files));
    let a = sim_device(&net, 0, &gw, Transport::Tcp).await;
    a.send(1, Bytes::from_static(b"honest before")).await.unwrap();
    assert_eq!(delivered(&cloud, &a_key, "honest before").await.1, 0);
    let ep = device_endpoint(&a_files, Transport::Tcp).await;
    let link = within(
        "a second link as device 0",
        ep.connect_expecting(Transport::Tcp, gw.tcp, Some(gw.key), RoleSet::GATEWAY),
    )
    .await
    .unwrap();
    let rogue = RoutedEndpoint::builder(b_files.identity.clone())
        .authorizer(Authorizer::trust(b_files.trust.clone(), PeerRoles::new(RoleSet::NONE, RoleSet::CLOUD)))
        .certificate_chain(&b_files.certificate_chain)
        .protocol_limits(short_handshakes())
        .build()
        .unwrap();
    rogue.add_relay_link(link);
    let attempt = tokio::spawn({
        let rogue = rogue.clone();
        async move { rogue.connect(cloud_key).await }
    });
    let a_id = hex_id(&a_key);
    eventually("the cloud denies the handshake under device 0's id", || {
        cloud
            .proc
            .log()
            .lines()
            .any(|l| l.contains("does not match its route's node id") && l.contains(&format!("node={a_id}")))
            .then_some(())
    })
    .await;
    let spoofed = within("the spoofed connect ends", attempt).await.unwrap();
    assert!(matches!(spoofed, Err(Error::Protocol(_))), "{spoofed:?}");
    // The cloud counts it among its end-to-end handshakes, next to the accepted ones.
    let e2e = |outcome: &'static str, reason: &'static str| [("outcome", outcome), ("reason", reason)];
    // (The rogue's INIT may come more than once: each is denied.)
    util::eventually_async("the cloud counts the refused end-to-end handshake", || async {
        let body = scrape(cloud.metrics).await?;
        util::metric(&body, E2E_HANDSHAKES, &e2e("refused", "node_mismatch")).filter(|v| *v >= 1.0)
    })
    .await;
    let body = scrape(cloud.metrics).await.unwrap();
    // At least devices 2 and 0 (the revoked device's new link was refused before a session).
    let accepted = util::metric(&body, E2E_HANDSHAKES, &e2e("accepted", "relayed"));
    assert!(accepted.is_some_and(|v| v >= 2.0), "{body}");
    rogue.close();
    ep.close();
    // Device 0's honest session goes on over a new link.
    let _link = relink(&a, &gw, Transport::Tcp).await;
    send_when_routed(&a, 1, "honest after").await;
    assert_eq!(delivered(&cloud, &a_key, "honest after").await, (1, 1, Some(gw.id())));
    assert_eq!(command_reaches(&cloud, &a, &a_key, 2, "still yours").await, Via::Relay(node_of(&gw.key)));

    // A gateway cannot pose as the cloud. At the link: a device that expects the cloud's
    // role refuses the gateway's certificate ...
    let d3 = net.device(3);
    let ep = device_endpoint(&d3, Transport::Tcp).await;
    let e = within(
        "a link expecting the cloud",
        ep.connect_expecting(Transport::Tcp, gw.tcp, Some(gw.key), RoleSet::CLOUD),
    )
    .await
    .unwrap_err();
    assert_eq!(e.deny_reason(), Some(DenyReason::Unauthorized), "{e}");
    // ... and a device pinned to the cloud's key gets no session from the gateway's port.
    let pinned = Endpoint::builder(d3.identity.clone())
        .authorizer(Authorizer::trust(d3.trust.clone(), PeerRoles::new(RoleSet::NONE, RoleSet::CLOUD)))
        .certificate_chain(&d3.certificate_chain)
        .handshake_timeout(Duration::from_secs(2))
        .bind()
        .await
        .unwrap();
    let r = within("a link pinned to the cloud's key", pinned.connect(Transport::Tcp, gw.tcp, Some(cloud_key))).await;
    assert!(matches!(r, Err(Error::Protocol(_))), "the gateway answered for the cloud's key: {r:?}");
    // End to end: a relay with the gateway's own credentials announces the cloud to a
    // device, cannot open the device's handshake, and its own handshake is refused.
    rogue_relay_cannot_pose_as_the_cloud(&net, &d3, &gw, cloud_key).await;

    // Nothing of the revoked, foreign or spoofed identities reached the sink.
    let lines = cloud.sink_lines();
    assert_eq!(lines.iter().filter(|l| l.device == hex_id(&revoked_key)).count(), 1, "{lines:?}");
    assert!(!lines.iter().any(|l| l.device == hex_id(&b_key) || l.device == hex_id(&public(&foreign))), "{lines:?}");
}

/// Whether a routed responder holding `identity` can read an end-to-end INIT: it can only
/// if `identity` is the key the INIT was sealed to (the peer's identity comes out of it).
fn opens_with(identity: &StaticKeypair, init: &[u8]) -> bool {
    let config = Arc::new(Config::new(identity.clone(), Mode::Routed));
    let mut responder =
        veil_protocol::Connection::new(config, Role::Responder, None, Timestamp::ZERO, &mut rand::rngs::OsRng).unwrap();
    let _ = responder.handle_input(Timestamp::ZERO, init);
    std::iter::from_fn(|| responder.poll_event()).any(|e| matches!(e, Event::AuthorizationRequired { .. }))
}

fn short_handshakes() -> Limits {
    Limits { handshake_timeout: Duration::from_secs(3).into(), ..Limits::default() }
}

/// A device links to an in-test relay holding the real gateway's key and certificate. The
/// relay announces the cloud's node id, receives the device's end-to-end INIT (sealed to
/// the cloud's key), cannot open it, and answers with an INIT of its own: the device denies
/// it (its key is not the cloud's node id) and never gets a session.
async fn rogue_relay_cannot_pose_as_the_cloud(net: &Net, device: &DeviceFiles, gw: &GatewayProc, cloud_key: PublicKey) {
    let gw_files = net.node("gateway");
    let relay = Endpoint::builder(gw_files.identity.clone())
        .authorizer(Authorizer::trust(gw_files.trust.clone(), PeerRoles::for_node(CertRole::Gateway)))
        .certificate_chain(&gw_files.certificate_chain)
        .routing(true)
        .listen_tcp(SocketAddr::from(([127, 0, 0, 1], 0)))
        .bind()
        .await
        .unwrap();
    let ep = device_endpoint(device, Transport::Tcp).await;
    let addr = relay.local_tcp_addr().unwrap();
    let (link, conn) = within("the rogue link", async {
        tokio::try_join!(ep.connect_expecting(Transport::Tcp, addr, Some(gw.key), RoleSet::GATEWAY), relay.accept())
    })
    .await
    .unwrap();
    let routed = RoutedEndpoint::builder(device.identity.clone())
        .authorizer(Authorizer::trust(device.trust.clone(), PeerRoles::new(RoleSet::NONE, RoleSet::CLOUD)))
        .certificate_chain(&device.certificate_chain)
        .protocol_limits(short_handshakes())
        .build()
        .unwrap();
    routed.add_relay_link(link);
    conn.send_routing(RoutingMessage::Route { route: 1, node: node_of(&cloud_key) }).await.unwrap();
    let attempt = tokio::spawn({
        let routed = routed.clone();
        async move { routed.connect(cloud_key).await }
    });
    let init = within("the device's INIT at the rogue", async {
        loop {
            if let Received::Routing(RoutingMessage::Forward { route: 1, packet }) = conn.recv_any().await.unwrap() {
                if packet.first() == Some(&TYPE_HANDSHAKE_INIT) {
                    return packet;
                }
            }
        }
    })
    .await;
    assert!(!opens_with(&gw_files.identity, &init), "the gateway's key opened a device's end-to-end INIT");
    let started = Instant::now();
    let now = || Timestamp::from_micros(u64::try_from(started.elapsed().as_micros()).unwrap());
    // Its own INIT, labelled as coming from the cloud's route.
    let mut config = Config::new(gw_files.identity.clone(), Mode::Routed);
    config.set_certificate_chain(&gw_files.certificate_chain).unwrap();
    let mut initiator = veil_protocol::Connection::new(
        Arc::new(config),
        Role::Initiator,
        Some(*device.identity.public()),
        now(),
        &mut rand::rngs::OsRng,
    )
    .unwrap();
    let mut buf = vec![0u8; veil_protocol::wire::MAX_PACKET_LEN];
    let n = initiator.poll_transmit(now(), &mut buf).unwrap().unwrap();
    let packet = Bytes::copy_from_slice(&buf[..n]);
    conn.send_routing(RoutingMessage::Deliver { route: 1, packet }).await.unwrap();
    eventually("the device denies the rogue's handshake", || (routed.stats().node_mismatch >= 1).then_some(())).await;
    let r = within("the device's connect ends", attempt).await.unwrap();
    assert!(matches!(r, Err(Error::Protocol(_))), "{r:?}");
    assert_eq!(routed.stats().sessions, 0);
    routed.close();
    ep.close();
    relay.close();
}

/// Case 6: what a device may not send a gateway, over a real device link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_routing_traffic_at_the_gateway_is_dropped_answered_and_counted() {
    let net = Net::provision(3);
    let cloud = start_cloud(&net).await;
    // A UDP uplink carries smaller packets than a TCP device link: an envelope can fit the
    // device's link and not the uplink.
    let gw = start_gateway(&net, "gateway", &cloud, Transport::Udp).await;
    let honest_key = public(&net.device(0));
    let honest = sim_device(&net, 0, &gw, Transport::Tcp).await;
    honest.send(1, Bytes::from_static(b"honest 0")).await.unwrap();
    assert_eq!(delivered(&cloud, &honest_key, "honest 0").await, (1, 0, Some(gw.id())));

    // A device with a genuine certificate that speaks routing messages by hand.
    let files = net.device(1);
    let ep = device_endpoint(&files, Transport::Tcp).await;
    let link =
        within("the hand-made link", ep.connect_expecting(Transport::Tcp, gw.tcp, Some(gw.key), RoleSet::GATEWAY))
            .await
            .unwrap();
    // The gateway announces the cloud, and only the cloud.
    let cloud_route = match within("the cloud's route", link.recv_any()).await.unwrap() {
        Received::Routing(RoutingMessage::Route { route, node }) => {
            assert_eq!(node, node_of(&net.cloud_key()));
            route
        }
        other => panic!("{other:?}"),
    };
    let packet = Bytes::from_static(&[0x10; 40]);
    // Forwards naming handles never announced, in a burst.
    const UNKNOWN: u32 = 20;
    let burst = Instant::now();
    for i in 0..UNKNOWN {
        link.send_routing(RoutingMessage::Forward { route: 1000 + i, packet: packet.clone() }).await.unwrap();
    }
    // What only a relay may send.
    for msg in [
        RoutingMessage::Route { route: 7, node: NodeId([7; 16]) },
        RoutingMessage::Withdraw { route: cloud_route, reason: RouteReason::Detached },
        RoutingMessage::Deliver { route: cloud_route, packet: packet.clone() },
        RoutingMessage::Unreachable { route: cloud_route, reason: RouteReason::Congested },
    ] {
        link.send_routing(msg).await.unwrap();
    }
    // An envelope that fits the device's link but not one packet of the UDP uplink.
    let big = RoutingMessage::Forward { route: cloud_route, packet: Bytes::from(vec![0x10; 4_000]) };
    assert!(big.message().encoded_len() <= link.max_envelope_len());
    link.send_routing(big).await.unwrap();
    // Answers, in order: UnknownRoute for the unknown handles (one per second and link,
    // spec §16.5), then TooLarge for the cloud's handle (spec §16.4 step 5).
    let mut unknown_answers = 0u64;
    let answer = within("the TooLarge answer", async {
        loop {
            match link.recv_any().await.unwrap() {
                Received::Routing(RoutingMessage::Unreachable { route, reason: RouteReason::UnknownRoute }) => {
                    assert!((1000..1000 + UNKNOWN).contains(&route), "answer for {route}");
                    unknown_answers += 1;
                }
                Received::Routing(RoutingMessage::Unreachable { route, reason }) => return (route, reason),
                other => panic!("unexpected at the device: {other:?}"),
            }
        }
    })
    .await;
    assert_eq!(answer, (cloud_route, RouteReason::TooLarge));
    let elapsed = burst.elapsed().as_secs();
    assert!(unknown_answers >= 1 && unknown_answers <= 2 + elapsed, "{unknown_answers} answers in {elapsed} s");
    // Counted by reason.
    let drops = |reason: &'static str| [("reason", reason)];
    let at_least = |n: u32| move |v: f64| v >= f64::from(n);
    assert_eq!(gw.wait_metric(ROUTING_DROPS, &drops("unknown_route"), at_least(UNKNOWN)).await, f64::from(UNKNOWN));
    assert_eq!(gw.wait_metric(ROUTING_DROPS, &drops("not_a_relay"), at_least(4)).await, 4.0);
    assert_eq!(gw.wait_metric(ROUTING_DROPS, &drops("too_large"), at_least(1)).await, 1.0);
    assert!(!link.is_closed(), "dropped envelopes leave the link up");
    // Larger than the device's own link: refused locally with a typed error.
    let huge = RoutingMessage::Forward { route: cloud_route, packet: Bytes::from(vec![0x10; 70_000]) };
    assert!(matches!(link.send_routing(huge).await, Err(Error::MessageTooLarge { .. })));

    // A message that does not decode closes that link, and only that one.
    let closed = malformed_link(gw.tcp, gw.key, &net.device(2)).await;
    assert_eq!((closed.reason, closed.by_peer), (CloseReason::ProtocolViolation, true), "{closed:?}");
    gw.wait_metric("veil_relay_connections", &[("role", "device"), ("transport", "tcp")], |v| v == 2.0).await;
    assert!(!link.is_closed());
    // The honest device is untouched, both ways.
    honest.send(1, Bytes::from_static(b"honest 1")).await.unwrap();
    assert_eq!(delivered(&cloud, &honest_key, "honest 1").await, (1, 1, Some(gw.id())));
    assert_eq!(command_reaches(&cloud, &honest, &honest_key, 2, "still fine").await, Via::Relay(node_of(&gw.key)));
    // Nothing of the hand-made traffic reached the sink.
    let lines = cloud.sink_lines();
    assert_eq!(lines.len(), 2, "{lines:?}");
}

/// A device that completes its link handshake by hand (IK, its genuine certificate), then
/// sends one transport packet whose plaintext does not decode: a `Forward` with an empty
/// packet (spec §9.2: at least 1 byte). Returns how the gateway closed the link.
async fn malformed_link(addr: SocketAddr, gw_key: PublicKey, files: &DeviceFiles) -> Closed {
    let mut config = Config::new(files.identity.clone(), Mode::Stream);
    config.set_certificate_chain(&files.certificate_chain).unwrap();
    let started = Instant::now();
    let now = || Timestamp::from_micros(u64::try_from(started.elapsed().as_micros()).unwrap());
    let mut core =
        veil_protocol::Connection::new(Arc::new(config), Role::Initiator, Some(gw_key), now(), &mut rand::rngs::OsRng)
            .unwrap();
    let mut stream = within("connect", TcpStream::connect(addr)).await.unwrap();
    let mut buf = vec![0u8; 65_535];
    for _ in 0..8 {
        while let Some(n) = core.poll_transmit(now(), &mut buf).unwrap() {
            write_frame(&mut stream, &buf[..n]).await;
        }
        if core.is_connected() {
            break;
        }
        let frame = read_frame(&mut stream).await;
        core.handle_input(now(), &frame).unwrap();
        while let Some(e) = core.poll_event() {
            if matches!(e, Event::AuthorizationRequired { .. }) {
                core.authorize(now(), Decision::allow()).unwrap();
            }
        }
    }
    assert!(core.is_connected(), "the hand-made link did not come up");
    let session = core.session_mut().unwrap();
    let h = session.header_len();
    let plaintext = [0x06, 0x01, 0x00];
    buf[h..h + plaintext.len()].copy_from_slice(&plaintext);
    let n = session.seal(now(), &mut buf, plaintext.len()).unwrap();
    write_frame(&mut stream, &buf[..n]).await;
    for _ in 0..64 {
        let frame = read_frame(&mut stream).await;
        let _ = core.handle_input(now(), &frame);
        while let Some(e) = core.poll_event() {
            if let Event::Closed(c) = e {
                return c;
            }
        }
    }
    panic!("the gateway did not close the link");
}

async fn write_frame(s: &mut TcpStream, packet: &[u8]) {
    s.write_all(&u16::try_from(packet.len()).unwrap().to_be_bytes()).await.unwrap();
    s.write_all(packet).await.unwrap();
}

async fn read_frame(s: &mut TcpStream) -> Vec<u8> {
    within("a frame", async {
        let mut len = [0u8; 2];
        s.read_exact(&mut len).await.unwrap();
        let mut frame = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut frame).await.unwrap();
        frame
    })
    .await
}
