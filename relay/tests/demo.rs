//! The demo end to end in one process: devices over TCP and UDP reach the cloud through the
//! gateway, every reading is delivered once, every command arrives, and the gateway sees no
//! plaintext and cannot open a device's handshake with its key.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use veil_protocol::Suite;
use veil_relay::demo::{run, DemoOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_passes_every_check() {
    let opts = DemoOptions { devices: 8, duration: Duration::from_secs(1), rate: 20.0, udp_every: 4, progress: false };
    let report = tokio::time::timeout(Duration::from_secs(120), run(&opts)).await.unwrap().unwrap();
    assert_eq!((report.devices, report.udp_devices, report.connected), (8, 2, 8), "{report}");
    assert!(report.sent > 0, "{report}");
    assert_eq!(report.delivered, report.sent, "{report}");
    assert_eq!(report.duplicates, 0, "{report}");
    assert_eq!((report.commands_sent, report.commands_received), (8, 8), "{report}");
    assert!(report.gateway_packets >= report.sent, "{report}");
    assert_eq!(report.marker_leaks, 0, "{report}");
    assert_eq!((report.inits_tried, report.inits_opened), (8, 0), "{report}");
    assert!(report.device_hop_bytes > 32.0 && report.uplink_hop_bytes > 32.0, "{report}");
    // The demo's gateway configuration picks AES-GCM for its uplink (`uplink.suite`).
    assert_eq!(report.uplink_suite, Some(Suite::AesGcmSha256), "{report}");
    assert!(report.passed(), "{report}");
}
