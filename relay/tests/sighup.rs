//! SIGHUP reloads a node's trust (`TrustReloader::spawn_on_sighup`): the test sends SIGHUP to
//! its own process (its own test binary, so no other test sees it) and watches the trust state
//! and the reload counter change. A failed reload keeps the current trust, and the handler
//! keeps running.
#![cfg(unix)]
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use veil_protocol::StaticKeypair;
use veil_relay::config::Config;
use veil_relay::keyfile::{self, KeyKind};
use veil_relay::metrics::{self, Metrics};
use veil_relay::tooling;
use veil_relay::trustload::LoadedNode;

fn public_hex(dir: &Path, name: &str) -> String {
    let secret = keyfile::read_key(&dir.join(format!("{name}.key")), KeyKind::NodeSecret).unwrap();
    hex::encode(StaticKeypair::from_secret_bytes(*secret).public().as_bytes())
}

fn write_allowlist(dir: &Path, names: &[&str]) {
    let text: String = names.iter().map(|n| format!("{} {n}\n", public_hex(dir, n))).collect();
    fs::write(dir.join("devices.allow"), text).unwrap();
}

fn hangup() {
    let status = Command::new("kill").args(["-HUP", &std::process::id().to_string()]).status().unwrap();
    assert!(status.success());
}

/// Waits (at most 10 s, in 25 ms steps) until `done` holds.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..400 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{what}: not within 10 s");
}

fn reloads(m: &Metrics, outcome: &str) -> u64 {
    let prefix = format!("veil_relay_trust_reloads_total{{outcome=\"{outcome}\"}} ");
    m.render().lines().find_map(|l| l.strip_prefix(&prefix)).map_or(0, |v| v.trim().parse().unwrap())
}

#[tokio::test]
async fn sighup_reloads_the_trust_and_survives_a_bad_file() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    for name in ["gw", "cloud", "dev1", "dev2"] {
        tooling::keygen(&d.join(format!("{name}.key")), false).unwrap();
    }
    write_allowlist(d, &["dev1", "dev2", "cloud"]);
    fs::write(
        d.join("gw.toml"),
        "role = \"gateway\"\nnode.key = \"gw.key\"\ntrust = { mode = \"allowlist\", allowlist = \"devices.allow\" }\n\
         listen.udp = \"127.0.0.1:0\"\nuplink = { address = \"127.0.0.1:7401\", cloud_key = \"cloud.key.pub\" }\n",
    )
    .unwrap();
    let node = LoadedNode::load(&Config::load(d.join("gw.toml")).unwrap()).unwrap();
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let m = metrics::install(free).unwrap();
    let task = node.reloader().spawn_on_sighup().unwrap();

    write_allowlist(d, &["dev2", "cloud"]);
    hangup();
    eventually("the reload", || node.trust_summary().allowlist_entries == 2).await;
    eventually("the count", || reloads(&m, "accepted") == 1).await;

    fs::write(d.join("devices.allow"), "not an allowlist\n").unwrap();
    hangup();
    eventually("the failed reload", || reloads(&m, "failed") == 1).await;
    assert_eq!(node.trust_summary().allowlist_entries, 2, "a bad file changes nothing");

    write_allowlist(d, &["dev1", "dev2", "dev1", "cloud"]);
    hangup();
    eventually("the next reload", || reloads(&m, "accepted") == 2).await;
    assert_eq!(node.trust_summary().allowlist_entries, 3);
    assert!(!task.is_finished());
    task.abort();
}
