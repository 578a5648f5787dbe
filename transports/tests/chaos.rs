//! The TCP chaos proxy of `veil_transports::chaos`: bytes pass intact when no fault is
//! asked for; cuts end connections at random points with a prefix of what was sent;
//! corruption breaks a Veil connection through the proxy while a direct one carries on;
//! `cut_all` and `set_down` end Veil connections, which reconnect once the link is back.
//! `VEIL_TEST_SEED` shifts every proxy seed to explore other runs.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod util;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use util::*;
use veil_protocol::Pattern;
use veil_transports::chaos::{ChaosConfig, ChaosProxy, StreamFaults};
use veil_transports::fault::Direction;
use veil_transports::Endpoint;

fn seed(base: u64) -> u64 {
    let shift = std::env::var("VEIL_TEST_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    let seed = base.wrapping_add(shift);
    eprintln!("proxy seed {seed}");
    seed
}

/// An echo server on loopback: every connection gets back what it sends.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind(localhost()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// Deterministic test bytes.
fn pattern_bytes(len: usize, salt: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt)).collect()
}

/// Writes `data` in 1 KiB pieces while reading the echo; returns what came back before
/// the connection ended (or all of it).
async fn echo_through(addr: SocketAddr, data: &[u8]) -> Vec<u8> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut r, mut w) = stream.into_split();
    let owned = data.to_vec();
    let writer = tokio::spawn(async move {
        for piece in owned.chunks(1024) {
            if w.write_all(piece).await.is_err() {
                return;
            }
        }
        let _ = w.shutdown().await;
    });
    let mut back = Vec::with_capacity(data.len());
    let mut buf = [0u8; 4096];
    while back.len() < data.len() {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => back.extend_from_slice(&buf[..n]),
        }
    }
    writer.abort();
    back
}

#[tokio::test]
async fn a_perfect_proxy_passes_every_byte_both_ways() {
    within(async {
        let upstream = echo_server().await;
        let proxy = ChaosProxy::start(localhost(), upstream, ChaosConfig::new(seed(1))).await.unwrap();
        let data = pattern_bytes(1 << 20, 7);
        let back = echo_through(proxy.local_addr(), &data).await;
        assert_eq!(back, data);
        let stats = proxy.shutdown().await;
        assert_eq!(stats.accepted, 1);
        assert_eq!(stats.to_server.bytes_in, data.len() as u64);
        assert_eq!(stats.to_server.bytes_out, data.len() as u64);
        assert_eq!(stats.to_client.bytes_out, data.len() as u64);
        assert_eq!(stats.to_server.cuts + stats.to_client.cuts + stats.to_server.corrupted, 0);
    })
    .await;
}

#[tokio::test]
async fn cuts_end_connections_at_random_points_with_a_prefix_of_the_data() {
    within(async {
        let upstream = echo_server().await;
        let faults = StreamFaults::new().cut(0.05);
        // Cuts in the echo's direction: the client then sees exactly where its stream ended.
        let config = ChaosConfig::new(seed(2)).with(Direction::ToClient, faults).chunk_size(512);
        let proxy = ChaosProxy::start(localhost(), upstream, config).await.unwrap();
        let data = pattern_bytes(64 * 1024, 3);
        let mut cut = 0;
        let mut lengths = Vec::new();
        for _ in 0..20 {
            let back = echo_through(proxy.local_addr(), &data).await;
            // Whatever came back is exactly the start of what was sent: a cut loses the
            // rest, never reorders or alters bytes.
            assert_eq!(back[..], data[..back.len()]);
            if back.len() < data.len() {
                cut += 1;
            }
            lengths.push(back.len());
        }
        let stats = proxy.shutdown().await;
        eprintln!("returned lengths {lengths:?}, stats {stats:?}");
        assert!(cut > 0, "no connection was cut");
        assert_eq!(stats.to_client.cuts, cut);
        // At random points: not all at the same offset.
        lengths.sort_unstable();
        lengths.dedup();
        assert!(lengths.len() > 2, "cuts at too few distinct points: {lengths:?}");
    })
    .await;
}

#[tokio::test]
async fn corruption_breaks_the_veil_connection_through_the_proxy_and_nothing_else() {
    within(async {
        let server_id = keypair(10);
        let (a, b) = (keypair(11), keypair(12));
        let server = server_builder(server_id.clone(), &[*a.public(), *b.public()]).bind().await.unwrap();
        let server_addr = server.local_tcp_addr().unwrap();
        let proxy = ChaosProxy::start(localhost(), server_addr, ChaosConfig::new(seed(3))).await.unwrap();

        let via_proxy = client_builder(a, Pattern::IK, *server_id.public()).bind().await.unwrap();
        let direct = client_builder(b, Pattern::IK, *server_id.public()).bind().await.unwrap();
        let c1 = via_proxy.connect_tcp(proxy.local_addr(), Some(*server_id.public())).await.unwrap();
        let s1 = server.accept().await.unwrap();
        let c2 = direct.connect_tcp(server_addr, Some(*server_id.public())).await.unwrap();
        let s2 = server.accept().await.unwrap();
        c1.send(Bytes::from_static(b"before")).await.unwrap();
        assert_eq!(s1.recv().await.unwrap().payload.as_ref(), b"before");

        // From now on every chunk toward the server has a flipped bit.
        proxy.set_faults(Direction::ToServer, StreamFaults::new().corrupt(1.0)).unwrap();
        c1.send(Bytes::from_static(b"tampered")).await.unwrap();
        // The server refuses the packet and ends that connection; nothing forged arrives.
        let got = s1.recv().await;
        assert!(got.is_err(), "a corrupted packet was delivered: {got:?}");
        // The direct connection carries on.
        c2.send(Bytes::from_static(b"still here")).await.unwrap();
        assert_eq!(s2.recv().await.unwrap().payload.as_ref(), b"still here");
        s2.send(Bytes::from_static(b"and back")).await.unwrap();
        assert_eq!(c2.recv().await.unwrap().payload.as_ref(), b"and back");
        let stats = proxy.shutdown().await;
        assert!(stats.to_server.corrupted >= 1);
    })
    .await;
}

#[tokio::test]
async fn an_outage_ends_veil_connections_and_they_come_back_after_it() {
    within(async {
        let server_id = keypair(20);
        let client_id = keypair(21);
        let server = server_builder(server_id.clone(), &[*client_id.public()]).bind().await.unwrap();
        let proxy =
            ChaosProxy::start(localhost(), server.local_tcp_addr().unwrap(), ChaosConfig::new(seed(4))).await.unwrap();
        let client: Endpoint = client_builder(client_id, Pattern::IK, *server_id.public()).bind().await.unwrap();

        let c = client.connect_tcp(proxy.local_addr(), Some(*server_id.public())).await.unwrap();
        let s = server.accept().await.unwrap();
        c.send(Bytes::from_static(b"one")).await.unwrap();
        assert_eq!(s.recv().await.unwrap().payload.as_ref(), b"one");

        proxy.set_down(true);
        // Both ends learn that the connection is gone.
        assert!(c.recv().await.is_err());
        assert!(s.recv().await.is_err());
        // While down, new connections are refused.
        assert!(client.connect_tcp(proxy.local_addr(), Some(*server_id.public())).await.is_err());

        proxy.set_down(false);
        let c = client.connect_tcp(proxy.local_addr(), Some(*server_id.public())).await.unwrap();
        let s = server.accept().await.unwrap();
        c.send(Bytes::from_static(b"two")).await.unwrap();
        assert_eq!(s.recv().await.unwrap().payload.as_ref(), b"two");

        proxy.cut_all();
        assert!(c.recv().await.is_err());
        let stats = proxy.shutdown().await;
        assert_eq!(stats.cut_by_command, 2);
        assert!(stats.refused >= 1);
        assert_eq!(stats.accepted, 2);
    })
    .await;
}

#[tokio::test]
async fn stalls_and_delays_hold_bytes_back_without_changing_them() {
    within(async {
        let upstream = echo_server().await;
        let faults = StreamFaults::new().stall(0.5, Duration::from_millis(20)).delay(Duration::from_millis(5));
        let proxy = ChaosProxy::start(localhost(), upstream, ChaosConfig::symmetric(seed(5), faults).chunk_size(256))
            .await
            .unwrap();
        let data = pattern_bytes(8 * 1024, 9);
        let back = echo_through(proxy.local_addr(), &data).await;
        assert_eq!(back, data);
        let stats = proxy.shutdown().await;
        assert!(stats.to_server.stalls + stats.to_client.stalls > 0);
    })
    .await;
}

#[tokio::test]
async fn invalid_configurations_are_refused() {
    let upstream: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let bad = ChaosConfig::symmetric(0, StreamFaults::new().cut(1.5));
    assert!(ChaosProxy::start(localhost(), upstream, bad).await.is_err());
    let long = ChaosConfig::symmetric(0, StreamFaults::new().delay(Duration::from_secs(3600)));
    assert!(ChaosProxy::start(localhost(), upstream, long).await.is_err());
    assert!(ChaosProxy::start(localhost(), upstream, ChaosConfig::new(0).max_connections(0)).await.is_err());
    let proxy = ChaosProxy::start(localhost(), upstream, ChaosConfig::new(0)).await.unwrap();
    assert!(proxy.set_faults(Direction::ToClient, StreamFaults::new().corrupt(-0.1)).is_err());
}
