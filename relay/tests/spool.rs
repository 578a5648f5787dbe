//! The gateway's spool (spec §17.9) in the real `veil-relay` binary: a cloud and a gateway
//! with `[spool]` are spawned as in `processes.rs`, the gateway's uplink goes through a
//! `veil_transports::chaos::ChaosProxy` in this process, which the tests take down and bring
//! back (an outage of the uplink, shorter than the end-to-end idle timeout, so that the
//! device's end-to-end session with the cloud lives through it), and a simulated device
//! sends through the gateway.
//!
//! | test | what it proves |
//! |---|---|
//! | [`messages_sent_during_an_uplink_outage_reach_the_cloud_in_order_once_each`] | packets sent while the uplink is down are stored (metrics), nothing reaches the cloud meanwhile; once the uplink is back, with the device sending on during the replay, every message is in the sink, in order, once each; the spool is empty again and later messages go directly |
//! | [`a_full_spool_answers_spool_full_and_loses_nothing_silently`] | with a 4 KiB share per device: every packet is stored or refused, the device is told `Unreachable { SpoolFull }` (within the rate limit), the spool never exceeds the share while the device's delivery layer retransmits what was refused, and once the uplink is back every message reaches the cloud exactly once, in order (stored ones replayed, refused ones retransmitted) |
//! | [`without_a_spool_the_uplink_back_is_announced_and_devices_resend_at_once`] | a gateway without a spool drops what a device sends while the uplink is down (the device is told `Unreachable`); when the uplink is back the gateway announces the cloud to the device again (spec §16.4.1), which sends what was in flight at once (§17.4 rule 4), and it arrives once |
//! | [`a_gateway_killed_while_spooling_replays_its_spool_after_a_restart`] | SIGKILL after packets were stored, a restart with the uplink still down finds them (gauge), and they reach the cloud in order once the uplink is back, on the device's surviving end-to-end session |
//!
//! Every wait is bounded (`util::WAIT`); every child is killed on every exit path.
#![cfg(unix)]
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[allow(dead_code)]
mod util;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use util::{
    eventually, hex_id, sim_device, start_cloud, start_gateway_to, toml_path, within, CloudProc, GatewayProc, Net,
};
use veil_protocol::routing::RouteReason;
use veil_protocol::trust::NodeId;
use veil_relay::demo::SimDevice;
use veil_relay::metrics::{
    E2E_DELIVERY, ROUTING_DROPS, SPOOL_APPENDED, SPOOL_PACKETS, SPOOL_REFUSED, SPOOL_REPLAYED, UPLINK_UP,
};
use veil_transports::chaos::{ChaosConfig, ChaosProxy};
use veil_transports::{NodeEvent, Transport};

/// A cloud, a proxy in front of its TCP listener, and a gateway with a spool whose uplink
/// goes through the proxy.
async fn setup(net: &Net, spool_extra: &str) -> (CloudProc, ChaosProxy, GatewayProc) {
    let cloud = start_cloud(net).await;
    let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let proxy = ChaosProxy::start(listen, cloud.tcp, ChaosConfig::new(17)).await.unwrap();
    let spool = format!("\n[spool]\npath = {}\n{spool_extra}", toml_path(&net.dir().join("spool.redb")));
    let gw = start_gateway_to(net, "gateway", proxy.local_addr(), Transport::Tcp, &spool).await;
    (cloud, proxy, gw)
}

/// The payloads from `d` in the sink, in sink order, whose text starts with `prefix`.
fn received(cloud: &CloudProc, d: &str, prefix: &str) -> Vec<String> {
    cloud
        .sink_lines()
        .into_iter()
        .filter(|l| l.device == d && l.payload.starts_with(prefix.as_bytes()))
        .map(|l| String::from_utf8(l.payload).unwrap())
        .collect()
}

/// A device with an end-to-end session to the cloud through `gw`, proven by one message.
async fn device(net: &Net, gw: &GatewayProc, cloud: &CloudProc) -> (SimDevice, String) {
    let d = sim_device(net, 0, gw, Transport::Tcp).await;
    let id = hex_id(net.device(0).identity.public());
    d.send(1, Bytes::from_static(b"warm-up")).await.unwrap();
    cloud.wait_line("the warm-up message", |l| l.device == id && l.payload == b"warm-up").await;
    (d, id)
}

/// Waits until the gateway has taken `n` messages of the device into custody (`Stored`,
/// spec §17.9): their packets are in its spool.
async fn in_custody(d: &SimDevice, n: usize) {
    eventually("every message in the gateway's custody", || (d.routed.stats().custody >= n as u64).then_some(())).await;
}

/// Takes the uplink down and waits until the gateway knows.
async fn cut(proxy: &ChaosProxy, gw: &GatewayProc) {
    proxy.set_down(true);
    gw.wait_metric(UPLINK_UP, &[], |v| v == 0.0).await;
}

fn texts(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix} {i:03}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_sent_during_an_uplink_outage_reach_the_cloud_in_order_once_each() {
    const N: usize = 40;
    const M: usize = 20;
    let net = Net::provision(1);
    let (cloud, proxy, gw) = setup(&net, "").await;
    let (d, id) = device(&net, &gw, &cloud).await;

    cut(&proxy, &gw).await;
    let sent = texts("outage", N);
    for t in &sent {
        d.send(1, Bytes::from(t.clone())).await.unwrap();
    }
    // Every message is in custody: its packet stored durably and acknowledged with `Stored`
    // (messages sent together may share a packet).
    in_custody(&d, N).await;
    let appended = gw.wait_metric(SPOOL_APPENDED, &[], |v| v >= 1.0).await;
    assert_eq!(gw.metric(SPOOL_PACKETS, &[]).await, appended);
    assert_eq!(gw.metric(SPOOL_REFUSED, &[]).await, 0.0);
    assert!(received(&cloud, &id, "outage").is_empty(), "something passed the cut uplink");

    // The uplink comes back, and the device sends on while the spool replays (spec §17.9,
    // order: its newer packets queue behind the stored ones): everything, in order, once each.
    proxy.set_down(false);
    gw.wait_metric(UPLINK_UP, &[], |v| v == 1.0).await;
    let more = texts("outage more", M);
    for t in &more {
        d.send(1, Bytes::from(t.clone())).await.unwrap();
    }
    let all_sent: Vec<String> = sent.iter().chain(&more).cloned().collect();
    eventually("every message at the cloud", || (received(&cloud, &id, "outage").len() >= N + M).then_some(())).await;
    gw.wait_metric(SPOOL_PACKETS, &[], |v| v == 0.0).await;
    let replayed = gw.metric(SPOOL_REPLAYED, &[]).await;
    assert_eq!(replayed, gw.metric(SPOOL_APPENDED, &[]).await, "stored but not replayed");
    assert!(replayed >= appended);
    assert_eq!(received(&cloud, &id, "outage"), all_sent, "order or count differs");

    // With the spool empty, new messages go straight through (and after the replayed ones).
    d.send(1, Bytes::from_static(b"after 000")).await.unwrap();
    cloud.wait_line("a message after the outage", |l| l.device == id && l.payload == b"after 000").await;
    let appended = gw.metric(SPOOL_APPENDED, &[]).await;
    assert_eq!(appended, replayed, "stored although the uplink was up and the spool empty");
    let all: Vec<String> = cloud
        .sink_lines()
        .into_iter()
        .filter(|l| l.device == id)
        .map(|l| String::from_utf8(l.payload).unwrap())
        .collect();
    assert_eq!(all.last().map(String::as_str), Some("after 000"), "{all:?}");
    assert_eq!(all.len(), N + M + 2, "{all:?}");
    d.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_answers_spool_full_and_loses_nothing_silently() {
    // Entries cost their packet plus 41 B: 4096 B hold about 20 packets of 150 B.
    const N: usize = 40;
    let net = Net::provision(1);
    let (cloud, proxy, gw) = setup(&net, "max_bytes_per_device = 4096\n").await;
    let (d, id) = device(&net, &gw, &cloud).await;

    cut(&proxy, &gw).await;
    let sent: Vec<String> = texts("full", N).into_iter().map(|t| format!("{t} {}", "x".repeat(100))).collect();
    // Each packet is either stored or refused.
    let counts = || async {
        let stored = gw.metric(SPOOL_APPENDED, &[]).await;
        (stored, gw.metric(SPOOL_REFUSED, &[("reason", "per_device")]).await)
    };
    // One message per packet: each send waits for the gateway's verdict on the one before
    // (messages sent together would share a packet, stored or refused as one).
    for t in &sent {
        let (s0, r0) = counts().await;
        d.send(1, Bytes::from(t.clone())).await.unwrap();
        util::eventually_async("the gateway's verdict on the packet", || async {
            let (s, r) = counts().await;
            (s + r > s0 + r0).then_some(())
        })
        .await;
    }
    gw.wait_metric(SPOOL_REFUSED, &[("reason", "per_device")], |v| v >= 1.0).await;
    let (mut stored, mut refused) = counts().await;
    for _ in 0..200 {
        if stored + refused >= N as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
        (stored, refused) = counts().await;
    }
    assert!(stored + refused >= N as f64, "stored {stored} + refused {refused}");
    assert!(stored >= 10.0 && refused >= 10.0, "stored {stored}, refused {refused}");
    // The refusals came within a second of the UplinkDown notice, so the rate limit (spec
    // §16.5: one notice per link and handle each second) held their notices back; one more
    // refused packet a second later is answered.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    d.send(1, Bytes::from(format!("late {}", "x".repeat(100)))).await.unwrap();
    within("Unreachable { SpoolFull } at the device", async {
        loop {
            if let NodeEvent::Unreachable { reason: RouteReason::SpoolFull, relay, .. } =
                d.routed.next_event().await.unwrap()
            {
                assert_eq!(relay, NodeId::from_public_key(&gw.key));
                return;
            }
        }
    })
    .await;
    // The device's delivery layer keeps what was refused and sends it again at each
    // retransmission timeout (spec §17.4): refused again while the spool stays full, never
    // stored beyond the device's share.
    gw.wait_metric(SPOOL_REFUSED, &[("reason", "per_device")], |v| v >= refused + 2.0).await;
    assert_eq!(gw.metric(SPOOL_APPENDED, &[]).await, stored);
    assert!(received(&cloud, &id, "full").is_empty() && received(&cloud, &id, "late").is_empty());

    // Once the uplink is back, the stored packets are replayed and the refused ones come
    // again from the device: every message reaches the cloud exactly once, in order.
    proxy.set_down(false);
    gw.wait_metric(SPOOL_PACKETS, &[], |v| v == 0.0).await;
    let got = eventually("every message at the cloud", || {
        let got = received(&cloud, &id, "full");
        (got.len() >= N && !received(&cloud, &id, "late").is_empty()).then_some(got)
    })
    .await;
    assert_eq!(got, sent, "not each once, in order");
    assert_eq!(received(&cloud, &id, "late").len(), 1, "the late message twice");
    let all: Vec<String> =
        cloud.sink_lines().into_iter().filter(|l| l.device == id).map(|l| l.id.to_string()).collect();
    let mut unique = all.clone();
    unique.dedup();
    assert_eq!(all, unique, "a message id delivered twice");
    d.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_while_spooling_replays_its_spool_after_a_restart() {
    const N: usize = 30;
    let net = Net::provision(1);
    let (cloud, proxy, mut gw) = setup(&net, "").await;
    let (d, id) = device(&net, &gw, &cloud).await;

    cut(&proxy, &gw).await;
    let sent = texts("crash", N);
    for t in &sent {
        d.send(1, Bytes::from(t.clone())).await.unwrap();
    }
    in_custody(&d, N).await;
    let appended = gw.wait_metric(SPOOL_APPENDED, &[], |v| v >= 1.0).await;
    // SIGKILL, and a restart while the uplink is still down: the spool is found intact.
    gw.restart_offline().await;
    gw.wait_metric(SPOOL_PACKETS, &[], |v| v == appended).await;
    assert!(received(&cloud, &id, "crash").is_empty());

    // The cloud kept the device's end-to-end session: the replayed packets open.
    proxy.set_down(false);
    gw.wait_metric(UPLINK_UP, &[], |v| v == 1.0).await;
    eventually("the stored messages at the cloud", || (received(&cloud, &id, "crash").len() >= N).then_some(())).await;
    gw.wait_metric(SPOOL_PACKETS, &[], |v| v == 0.0).await;
    assert_eq!(received(&cloud, &id, "crash"), sent);
    assert_eq!(gw.metric(SPOOL_REPLAYED, &[]).await, appended);
    d.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_spool_the_uplink_back_is_announced_and_devices_resend_at_once() {
    let net = Net::provision(1);
    let cloud = start_cloud(&net).await;
    let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let proxy = ChaosProxy::start(listen, cloud.tcp, ChaosConfig::new(18)).await.unwrap();
    let gw = start_gateway_to(&net, "gateway", proxy.local_addr(), Transport::Tcp, "").await;
    let (d, id) = device(&net, &gw, &cloud).await;

    cut(&proxy, &gw).await;
    // Told that the cloud is unreachable (unprompted, spec §16.5), the device still sends; the
    // gateway has nowhere to keep the message and drops it.
    eventually("the device told UplinkDown", || (d.routed.stats().unreachable >= 1).then_some(())).await;
    d.send(1, Bytes::from_static(b"during 000")).await.unwrap();
    let dropped = gw.wait_metric(ROUTING_DROPS, &[("reason", "uplink_down")], |v| v >= 1.0).await;
    assert!(dropped >= 1.0);
    assert_eq!(d.routed.stats().routes_back, 0);

    proxy.set_down(false);
    gw.wait_metric(UPLINK_UP, &[], |v| v == 1.0).await;
    eventually("the cloud announced to the device again", || (d.routed.stats().routes_back >= 1).then_some(())).await;
    cloud.wait_line("the message sent during the outage", |l| l.device == id && l.payload == b"during 000").await;
    assert_eq!(received(&cloud, &id, "during"), ["during 000"]);
    assert_eq!(d.routed.stats().custody, 0, "no spool, no custody");
    // The cloud lost its routes to the device with the uplink and learned them again: its
    // delivery counters, exported each second, show the route back.
    util::eventually_async("the cloud's route back in its metrics", || async {
        let body = veil_relay::metrics::scrape(cloud.metrics).await?;
        util::metric(&body, E2E_DELIVERY, &[("event", "route_back")]).filter(|v| *v >= 1.0)
    })
    .await;
    d.close();
}
