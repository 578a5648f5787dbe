//! Many concurrent TCP and UDP connections on one endpoint.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod util;

use std::time::Duration;

use bytes::Bytes;
use util::*;
use veil_protocol::Pattern;

/// Connections opened at once: the issue asks for 1 000 (`VEIL_TEST_CONNECTIONS` changes it).
/// Both ends live in this process: 2 sockets per connection, well below the machine's 20 000
/// descriptors up to several thousand.
fn connections() -> u32 {
    let n = std::env::var("VEIL_TEST_CONNECTIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000);
    // Two descriptors per connection plus slack: raise the soft limit up to the hard one.
    let want = 2 * u64::from(n) + 256;
    let got = rlimit::increase_nofile_limit(want).unwrap();
    assert!(got >= want, "{n} connections need {want} descriptors; the hard limit allows {got}");
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_tcp_connections_on_one_endpoint() {
    let n = connections();
    let client_id = keypair(2);
    // Handshakes queue for the CPU: give them time, this test is about concurrency.
    let server = server_builder(keypair(1), &[*client_id.public()])
        .handshake_timeout(Duration::from_secs(120))
        .bind()
        .await
        .unwrap();
    let client = client_builder(client_id, Pattern::IK, server.public_key())
        .handshake_timeout(Duration::from_secs(120))
        .bind()
        .await
        .unwrap();
    let addr = server.local_tcp_addr().unwrap();
    let key = Some(server.public_key());
    let started = std::time::Instant::now();

    let acceptor = {
        let server = server.clone();
        tokio::spawn(async move {
            let mut echoes = Vec::new();
            for _ in 0..n {
                let conn = server.accept().await.unwrap();
                echoes.push(tokio::spawn(async move {
                    let m = conn.recv().await.unwrap();
                    conn.send(m.payload).await.unwrap();
                    // Keep the connection open until the client closes it.
                    assert!(conn.recv().await.unwrap_err().is_closed());
                }));
            }
            echoes
        })
    };
    let clients: Vec<_> = (0..n)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let c = client.connect_tcp(addr, key).await.unwrap();
                c.send(Bytes::from(i.to_be_bytes().to_vec())).await.unwrap();
                let m = c.recv().await.unwrap();
                assert_eq!(&m.payload[..], &i.to_be_bytes());
                c
            })
        })
        .collect();
    let mut conns = Vec::new();
    for c in clients {
        conns.push(tokio::time::timeout(Duration::from_secs(180), c).await.expect("clients timed out").unwrap());
    }
    // Every connection is open at once.
    assert_eq!(server.stats().connections, n as usize);
    assert_eq!(server.stats().accepted, u64::from(n));
    let established = started.elapsed();
    drop(conns);
    let echoes = within(acceptor).await.unwrap();
    for e in echoes {
        within(e).await.unwrap();
    }
    eprintln!("{n} connections established and echoed in {established:?}");
    assert_eq!(server.stats().handshake_failures, 0);
}

/// The same over UDP: one socket on each side carries every connection, demultiplexed by
/// session index. In the burst the server's socket buffer overflows and datagrams are
/// lost (loopback UDP is not reliable either): handshake packets are retransmitted by the
/// core (spec §5.7.2), and each client repeats its data message until the echo arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_udp_connections_on_one_endpoint() {
    const RESEND: Duration = Duration::from_millis(500);
    const ATTEMPTS: u32 = 60;
    let n = connections();
    let client_id = keypair(2);
    // All handshakes may be in flight at once (the default allows 1 024).
    let mut limits = open_limits();
    limits.max_handshakes = limits.max_handshakes.max(n as usize);
    limits.max_connections = limits.max_connections.max(n as usize);
    let server = server_builder(keypair(1), &[*client_id.public()])
        .limits(limits.clone())
        .handshake_timeout(Duration::from_secs(120))
        .bind()
        .await
        .unwrap();
    let client = client_builder(client_id, Pattern::IK, server.public_key())
        .limits(limits)
        .handshake_timeout(Duration::from_secs(120))
        .bind()
        .await
        .unwrap();
    let addr = server.local_udp_addr().unwrap();
    let key = Some(server.public_key());
    let started = std::time::Instant::now();

    let acceptor = {
        let server = server.clone();
        tokio::spawn(async move {
            let mut echoes = Vec::new();
            for _ in 0..n {
                let conn = server.accept().await.unwrap();
                // Echo everything until the endpoint closes the connection.
                echoes.push(tokio::spawn(async move {
                    let mut echoed = 0u32;
                    while let Ok(m) = conn.recv().await {
                        conn.send(m.payload).await.unwrap();
                        echoed += 1;
                    }
                    echoed
                }));
            }
            echoes
        })
    };
    let clients: Vec<_> = (0..n)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let c = client.connect_udp(addr, key).await.unwrap();
                let msg = Bytes::from(i.to_be_bytes().to_vec());
                for attempt in 0.. {
                    assert!(attempt < ATTEMPTS, "connection {i}: no echo after {ATTEMPTS} attempts");
                    c.send(msg.clone()).await.unwrap();
                    if let Ok(m) = tokio::time::timeout(RESEND, c.recv()).await {
                        assert_eq!(m.unwrap().payload, msg, "connection {i} got another's echo");
                        break;
                    }
                }
                c
            })
        })
        .collect();
    let mut conns = Vec::new();
    for c in clients {
        conns.push(tokio::time::timeout(Duration::from_secs(180), c).await.expect("clients timed out").unwrap());
    }
    // Every connection is open at once, each on its own session index.
    let established = started.elapsed();
    assert_eq!(server.stats().connections, n as usize);
    assert_eq!(client.stats().connections, n as usize);
    let echoes = within(acceptor).await.unwrap();
    server.close();
    let mut echoed = 0;
    for e in echoes {
        let k = within(e).await.unwrap();
        assert!(k >= 1);
        echoed += k;
    }
    eprintln!(
        "{n} UDP connections established and echoed in {established:?}; {echoed} messages echoed; server {:?}",
        server.stats()
    );
    assert_eq!(server.stats().handshake_failures, 0);
    drop(conns);
}
