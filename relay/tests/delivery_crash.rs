//! Delivery across a cloud crash (spec §17.7), with the real `veil-relay` binary: a cloud and
//! a gateway run as processes, two devices (in this process, with delivery) send a paced
//! stream of readings through the gateway, and the cloud is killed with SIGKILL twice in the
//! middle of it and started again on the same ports. Each device's end-to-end session dies
//! with the cloud; the device notices by its idle timeout, connects again, and its outbox
//! sends its window on the new session (spec §17.4 rule 2). At the end the sink file holds
//! every reading exactly once, under one stream per device, byte for byte: what the killed
//! cloud had written (and so committed) is not written again, because the restarted cloud
//! resumes each stream from its sink; what it had not written, the device still held.
#![cfg(unix)]
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[allow(dead_code)]
mod util;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use util::{device_endpoint, start_cloud, start_gateway, Net};
use veil_protocol::trust::RoleSet;
use veil_protocol::{Limits, PublicKey};
use veil_transports::{Authorizer, DeliveryOptions, Endpoint, NodeEvent, PeerRoles, RoutedEndpoint, Transport};

/// Readings per device.
const READINGS: u64 = 400;
const CHANNEL: u16 = 2;
/// Bound on the whole run.
const BOUND: Duration = Duration::from_secs(120);

fn reading(device: usize, n: u64) -> Bytes {
    Bytes::from(format!("device {device} reading {n}"))
}

/// A device with delivery whose end-to-end session notices a dead cloud within seconds.
async fn device(net: &Net, i: usize, gw_addr: std::net::SocketAddr, gw_key: PublicKey) -> (Endpoint, RoutedEndpoint) {
    let files = net.device(i);
    let endpoint = device_endpoint(&files, Transport::Tcp).await;
    let link = endpoint.connect_expecting(Transport::Tcp, gw_addr, Some(gw_key), RoleSet::GATEWAY).await.unwrap();
    let limits = Limits {
        keepalive_interval: Duration::from_millis(500).into(),
        idle_timeout: Duration::from_secs(3).into(),
        ..Limits::default()
    };
    let routed = RoutedEndpoint::builder(files.identity.clone())
        .authorizer(Authorizer::trust(files.trust.clone(), PeerRoles::new(RoleSet::NONE, RoleSet::CLOUD)))
        .certificate_chain(&files.certificate_chain)
        .protocol_limits(limits)
        .delivery(DeliveryOptions { auto_commit: true, ..DeliveryOptions::default() })
        .build()
        .unwrap();
    routed.add_relay_link(link);
    (endpoint, routed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_killed_twice_mid_stream_leaves_every_reading_once_in_its_sink() {
    let started = Instant::now();
    let net = Net::provision(2);
    let mut cloud = start_cloud(&net).await;
    let gw = start_gateway(&net, "gateway", &cloud, Transport::Tcp).await;
    let cloud_key = net.cloud_key();
    let done = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    let mut nodes = Vec::new();
    let mut endpoints = Vec::new();
    for i in 0..2 {
        let (endpoint, routed) = device(&net, i, gw.addr(Transport::Tcp), gw.key).await;
        endpoints.push(endpoint);
        nodes.push(routed.node_id().to_string());
        let cloud_node =
            tokio::time::timeout(Duration::from_secs(20), routed.connect(cloud_key)).await.unwrap().unwrap();
        // Events: a session that ended (the cloud died) is started again, bounded.
        let (r, stop) = (routed.clone(), Arc::clone(&done));
        tasks.push(tokio::spawn(async move {
            for _ in 0..10_000 {
                let Ok(Ok(ev)) = tokio::time::timeout(Duration::from_millis(200), r.next_event()).await else {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    continue;
                };
                if let NodeEvent::Closed { .. } = ev {
                    for _ in 0..100 {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        match tokio::time::timeout(Duration::from_secs(5), r.connect(cloud_key)).await {
                            Ok(Ok(_)) => break,
                            _ => tokio::time::sleep(Duration::from_millis(100)).await,
                        }
                    }
                }
            }
        }));
        // Readings, paced so that the kills land mid-stream; every send is accepted (it
        // waits while the window is full).
        let done = Arc::clone(&done);
        tasks.push(tokio::spawn(async move {
            for n in 0..READINGS {
                tokio::time::timeout(Duration::from_secs(60), routed.send(&cloud_node, CHANNEL, reading(i, n)))
                    .await
                    .expect("send waits, bounded")
                    .expect("send is accepted");
                tokio::time::sleep(Duration::from_millis(8)).await;
            }
            // Keep the endpoint until the test is over.
            while !done.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            routed.close();
        }));
    }

    let total = 2 * READINGS as usize;
    let sink_path = cloud.sink.clone();
    let wait_lines = |at_least: usize| {
        let sink = sink_path.clone();
        async move {
            while util::read_sink(&sink).len() < at_least {
                assert!(started.elapsed() < BOUND, "the sink stopped at {} lines", util::read_sink(&sink).len());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    for at in [total / 5, total / 2] {
        wait_lines(at).await;
        cloud.restart().await;
        eprintln!("cloud killed and restarted at {} sink lines", util::read_sink(&cloud.sink).len());
    }
    wait_lines(total).await;
    // Anything written twice would show within the acknowledgement delays; wait past them.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let lines = util::read_sink(&cloud.sink);
    let mut seen: HashSet<(String, u64)> = HashSet::new();
    let mut streams: HashMap<String, HashSet<String>> = HashMap::new();
    for l in &lines {
        let i = nodes.iter().position(|n| *n == l.device).expect("a line from one of the devices");
        assert_eq!(l.channel, CHANNEL);
        assert!(l.id < READINGS, "{l:?}");
        assert_eq!(l.payload, reading(i, l.id), "line {l:?}");
        assert!(seen.insert((l.device.clone(), l.id)), "written twice: {l:?}");
        streams.entry(l.device.clone()).or_default().insert(l.stream.clone().expect("a delivery stream"));
    }
    assert_eq!(lines.len(), total, "every reading once");
    assert!(streams.values().all(|s| s.len() == 1), "one stream per device: {streams:?}");
    let log = cloud.proc.log();
    assert!(log.matches("delivery state rebuilt from the sink").count() >= 3, "{log}");
    assert!(log.matches("cloud up").count() >= 3);
    done.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    for e in endpoints {
        e.close();
    }
}
