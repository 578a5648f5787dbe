//! The Prometheus endpoint (`veil_relay::metrics`): served over HTTP on loopback, with every
//! metric described, a recorded counter visible in `GET /metrics`, and clear errors for an
//! address in use and a second install. The recorder is global to the process, so one test
//! does it all in order (this file is its own test process).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use veil_relay::metrics::{self, labels, MetricsError};

/// Upper bound on any awaited step.
const STEP: Duration = Duration::from_secs(10);

/// A loopback port that was free a moment ago (the exporter binds its own listener and does
/// not report the port it got).
fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// `GET /metrics` with a hand-written HTTP/1.1 request; the status line and the body.
async fn get_metrics(addr: SocketAddr) -> (String, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut response = Vec::new();
    // The server closes after the response (Connection: close); at most 1 MiB is read.
    (&mut stream).take(1 << 20).read_to_end(&mut response).await.unwrap();
    let text = String::from_utf8(response).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    (head.lines().next().unwrap_or_default().to_owned(), body.to_owned())
}

#[tokio::test]
async fn the_endpoint_serves_recorded_metrics_over_http() {
    assert!(metrics::installed().is_none());

    // An address in use: the error names it, and nothing is installed.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap();
    let e = metrics::install(busy).unwrap_err();
    assert!(matches!(&e, MetricsError::Bind { addr, .. } if *addr == busy), "{e:?}");
    assert!(e.to_string().contains(&busy.to_string()), "{e}");
    assert!(metrics::installed().is_none());
    drop(taken);

    let addr = free_port();
    let installed = metrics::install(addr).unwrap();
    assert_eq!(installed.listen_addr(), addr);
    // Recorded through the facade, as the gateway and cloud do.
    ::metrics::counter!(metrics::HANDSHAKES, labels::OUTCOME => labels::REFUSED, labels::REASON => "revoked")
        .increment(3);
    ::metrics::gauge!(metrics::UPLINK_UP).set(1.0);
    ::metrics::counter!(metrics::BYTES, labels::DIRECTION => labels::IN, labels::HOP => labels::DEVICE).increment(4096);

    let (status, body) = tokio::time::timeout(STEP, get_metrics(addr)).await.expect("response in time");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert!(
        body.lines().any(|l| l == "veil_relay_handshakes_total{outcome=\"refused\",reason=\"revoked\"} 3"),
        "{body}"
    );
    assert!(body.lines().any(|l| l == "veil_relay_uplink_up 1"), "{body}");
    assert!(body.lines().any(|l| l == "veil_relay_bytes_total{direction=\"in\",hop=\"device\"} 4096"), "{body}");
    // `register` described them: help text and type.
    assert!(body.contains("# HELP veil_relay_handshakes_total Handshakes that ended"), "{body}");
    assert!(body.contains("# TYPE veil_relay_handshakes_total counter"), "{body}");
    assert_eq!(installed.render().lines().filter(|l| l.starts_with("veil_relay_uplink_up ")).count(), 1);

    // The recorder is the process's: a second install is refused, the first keeps serving.
    assert!(matches!(metrics::install(free_port()), Err(MetricsError::AlreadyInstalled)));
    assert_eq!(metrics::installed().map(|m| m.listen_addr()), Some(addr));
    let (status, _) = tokio::time::timeout(STEP, get_metrics(addr)).await.expect("response in time");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
}

#[test]
fn install_outside_a_runtime_is_an_error_not_a_panic() {
    assert!(matches!(metrics::install(free_port()), Err(MetricsError::NoRuntime)));
}
