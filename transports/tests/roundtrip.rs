//! Round trips over loopback TCP and UDP for every pattern, counters, close, backpressure
//! and multi-message frames.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod util;

use bytes::Bytes;
use util::*;
use veil_protocol::{CloseReason, Pattern, Suite};
use veil_transports::{Endpoint, Error, Transport};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_pattern_round_trips_over_tcp_and_udp() {
    init_tracing();
    let server_id = keypair(1);
    let client_id = keypair(2);
    let client_key = *client_id.public();
    let server = server_builder(server_id, &[client_key]).bind().await.unwrap();
    let server_key = server.public_key();
    let mut cases: Vec<(Pattern, Suite)> = Pattern::ALL.iter().map(|p| (*p, Suite::ChaChaPolyBlake2s)).collect();
    cases.push((Pattern::IK, Suite::AesGcmSha256));
    for (pattern, suite) in cases {
        let client = client_builder(keypair(2), pattern, server_key).suite(suite).bind().await.unwrap();
        for transport in [Transport::Tcp, Transport::Udp] {
            let ctx = format!("{pattern:?} {suite:?} {transport}");
            let addr = match transport {
                Transport::Tcp => server.local_tcp_addr().unwrap(),
                Transport::Udp => server.local_udp_addr().unwrap(),
            };
            let (c, s) = within(async {
                tokio::try_join!(client.connect(transport, addr, expected_key(pattern, server_key)), server.accept())
            })
            .await
            .unwrap_or_else(|e| panic!("{ctx}: {e}"));
            assert_eq!(s.remote_static(), client_key, "{ctx}");
            assert_eq!(c.remote_static(), server_key, "{ctx}");
            assert_eq!(c.handshake_hash(), s.handshake_hash(), "{ctx}");
            assert_eq!((c.transport(), s.transport()), (transport, transport));
            assert_eq!((c.suite(), s.suite()), (Some(suite), Some(suite)), "{ctx}");

            c.send_on(3, Bytes::from(format!("up {ctx}"))).await.unwrap();
            let m = within(s.recv()).await.unwrap();
            assert_eq!((m.channel, m.id, &m.payload[..]), (3, 0, format!("up {ctx}").as_bytes()), "{ctx}");
            s.send(Bytes::from_static(b"down")).await.unwrap();
            let m = within(c.recv()).await.unwrap();
            assert_eq!((m.channel, &m.payload[..]), (0, &b"down"[..]), "{ctx}");

            within(c.close(CloseReason::Normal)).await.unwrap();
            match within(s.recv()).await {
                Err(Error::Closed { reason: CloseReason::Normal, by_peer: true }) => {}
                other => panic!("{ctx}: {other:?}"),
            }
            let (cs, ss) = (c.stats(), s.stats());
            assert_eq!((cs.messages_sent, cs.messages_received), (1, 1), "{ctx}: {cs:?}");
            assert_eq!((ss.messages_sent, ss.messages_received), (1, 1), "{ctx}: {ss:?}");
            assert!(cs.bytes_sent > 0 && ss.bytes_received > 0, "{ctx}");
        }
    }
    assert_eq!(server.stats().handshake_failures, 0, "{:?}", server.stats());
    assert_eq!(server.stats().accepted, 12);
    // One client key: its `ss` result went into the server's cache (spec §11.11) with the
    // first IK/IKpsk2/KK handshake, and every later one of the 8 took it from there.
    let cache = server.stats().static_dh_cache;
    assert_eq!(cache.inserts, 1, "{cache:?}");
    assert!(cache.hits >= 7, "{cache:?}");
}

/// Sends `n` numbered messages from `a` to `b` while `b` echoes them, with both
/// directions in flight at once.
async fn echo_concurrently(transport: Transport, n: u32) {
    let server = server_builder(keypair(1), &[*keypair(2).public()]).bind().await.unwrap();
    let client = client_builder(keypair(2), Pattern::IK, server.public_key()).bind().await.unwrap();
    let addr = match transport {
        Transport::Tcp => server.local_tcp_addr().unwrap(),
        Transport::Udp => server.local_udp_addr().unwrap(),
    };
    let (c, s) =
        within(async { tokio::try_join!(client.connect(transport, addr, Some(server.public_key())), server.accept()) })
            .await
            .unwrap();
    let echo = tokio::spawn(async move {
        for _ in 0..n {
            let m = s.recv().await.unwrap();
            s.send(m.payload).await.unwrap();
        }
        s
    });
    let reader = {
        let c = c.clone();
        tokio::spawn(async move {
            let mut got = Vec::new();
            for _ in 0..n {
                got.push(c.recv().await.unwrap().payload);
            }
            got
        })
    };
    for i in 0..n {
        c.send(Bytes::from(i.to_be_bytes().to_vec())).await.unwrap();
    }
    let got = within(reader).await.unwrap();
    let want: Vec<Bytes> = (0..n).map(|i| Bytes::from(i.to_be_bytes().to_vec())).collect();
    assert_eq!(got, want, "{transport}: echoes arrive complete and in order");
    let s = within(echo).await.unwrap();
    assert_eq!(s.stats().messages_received, u64::from(n));
    assert_eq!(c.stats().messages_sent, u64::from(n));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_and_writes_proceed_concurrently_over_tcp() {
    echo_concurrently(Transport::Tcp, 2_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_and_writes_proceed_concurrently_over_udp() {
    // Fewer than the per-connection queues hold, so loopback UDP loses nothing.
    echo_concurrently(Transport::Udp, 40).await;
}

#[tokio::test(flavor = "current_thread")]
async fn queued_small_messages_share_frames() {
    let server = server_builder(keypair(1), &[*keypair(2).public()]).bind().await.unwrap();
    let client = client_builder(keypair(2), Pattern::IK, server.public_key()).bind().await.unwrap();
    let addr = server.local_tcp_addr().unwrap();
    let (c, s) =
        within(async { tokio::try_join!(client.connect_tcp(addr, Some(server.public_key())), server.accept()) })
            .await
            .unwrap();
    let before = c.stats().packets_sent;
    let n = 1_000u64;
    let reader = tokio::spawn(async move {
        for i in 0..n {
            let m = s.recv().await.unwrap();
            assert_eq!(m.id, i);
        }
        s
    });
    for _ in 0..n {
        c.send(Bytes::from_static(b"21.5C")).await.unwrap();
    }
    let s = within(reader).await.unwrap();
    let packets = c.stats().packets_sent - before;
    // The sender fills the queue before the driver runs; each wake-up seals everything
    // queued into one packet (spec §6.4). One packet per message would be `n`.
    assert!(packets * 4 < n, "{packets} packets for {n} messages");
    assert!(s.stats().packets_received < n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_makes_send_wait_and_loses_nothing() {
    // Small queues and kernel buffers, so that the bounded path fills quickly (debug
    // builds seal slowly).
    let mut limits = open_limits();
    limits.send_queue = 8;
    limits.recv_queue = 8;
    limits.tcp_send_buffer = Some(32 * 1024);
    limits.tcp_recv_buffer = Some(32 * 1024);
    let server = server_builder(keypair(1), &[*keypair(2).public()]).limits(limits.clone()).bind().await.unwrap();
    let client = client_builder(keypair(2), Pattern::IK, server.public_key()).limits(limits).bind().await.unwrap();
    let addr = server.local_tcp_addr().unwrap();
    let (c, s) =
        within(async { tokio::try_join!(client.connect_tcp(addr, Some(server.public_key())), server.accept()) })
            .await
            .unwrap();
    // The server does not read. `send` must start waiting once the bounded queues and
    // the socket buffers are full, long before this much was accepted.
    let chunk = Bytes::from(vec![7u8; 4 * 1024]);
    let limit = 64 * 1024 * 1024 / chunk.len();
    let mut sent = 0usize;
    loop {
        assert!(sent < limit, "send never waited: {} MiB buffered", (sent * chunk.len()) >> 20);
        match tokio::time::timeout(std::time::Duration::from_millis(300), c.send(chunk.clone())).await {
            Ok(r) => {
                r.unwrap();
                sent += 1;
            }
            Err(_) => break,
        }
    }
    // The pending send was cancelled; everything accepted before arrives, in order.
    let reader = tokio::spawn(async move {
        for i in 0..sent {
            let m = s.recv().await.unwrap();
            assert_eq!(m.id, i as u64);
            assert_eq!(m.payload.len(), 4 * 1024);
        }
        s
    });
    within(reader).await.unwrap();
    assert!(sent > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_delivers_queued_messages_first_and_drop_closes() {
    let server = server_builder(keypair(1), &[*keypair(2).public()]).bind().await.unwrap();
    let client = client_builder(keypair(2), Pattern::IK, server.public_key()).bind().await.unwrap();
    for transport in [Transport::Tcp, Transport::Udp] {
        let addr = match transport {
            Transport::Tcp => server.local_tcp_addr().unwrap(),
            Transport::Udp => server.local_udp_addr().unwrap(),
        };
        let (c, s) = within(async {
            tokio::try_join!(client.connect(transport, addr, Some(server.public_key())), server.accept())
        })
        .await
        .unwrap();
        for i in 0..3u8 {
            c.send(Bytes::from(vec![i])).await.unwrap();
        }
        within(c.close(CloseReason::ShuttingDown)).await.unwrap();
        for i in 0..3u8 {
            assert_eq!(&within(s.recv()).await.unwrap().payload[..], &[i], "{transport}");
        }
        match within(s.recv()).await {
            Err(Error::Closed { reason: CloseReason::ShuttingDown, by_peer: true }) => {}
            other => panic!("{transport}: {other:?}"),
        }
        assert!(matches!(c.send(Bytes::from_static(b"late")).await, Err(Error::Closed { by_peer: false, .. })));

        // Dropping every handle closes the connection with `Normal`.
        let (c, s) = within(async {
            tokio::try_join!(client.connect(transport, addr, Some(server.public_key())), server.accept())
        })
        .await
        .unwrap();
        let c2 = c.clone();
        drop(c);
        c2.send(Bytes::from_static(b"last")).await.unwrap();
        drop(c2);
        assert_eq!(&within(s.recv()).await.unwrap().payload[..], b"last");
        match within(s.recv()).await {
            Err(Error::Closed { reason: CloseReason::Normal, by_peer: true }) => {}
            other => panic!("{transport}: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_close_ends_every_connection_and_accept() {
    let server = server_builder(keypair(1), &[*keypair(2).public()]).bind().await.unwrap();
    let client = client_builder(keypair(2), Pattern::IK, server.public_key()).bind().await.unwrap();
    let tcp = server.local_tcp_addr().unwrap();
    let udp = server.local_udp_addr().unwrap();
    let (c1, _s1) =
        within(async { tokio::try_join!(client.connect_tcp(tcp, Some(server.public_key())), server.accept()) })
            .await
            .unwrap();
    let (c2, _s2) =
        within(async { tokio::try_join!(client.connect_udp(udp, Some(server.public_key())), server.accept()) })
            .await
            .unwrap();
    server.close();
    for c in [c1, c2] {
        match within(c.recv()).await {
            Err(Error::Closed { reason: CloseReason::ShuttingDown, by_peer: true }) => {}
            other => panic!("{:?}: {other:?}", c.transport()),
        }
    }
    assert!(matches!(within(server.accept()).await, Err(Error::EndpointClosed)));
    assert!(matches!(
        Endpoint::builder(keypair(3)).bind().await.unwrap().connect_udp(udp, None).await,
        Err(Error::NotBound(Transport::Udp))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_outlive_a_dropped_endpoint() {
    let server = server_builder(keypair(1), &[*keypair(2).public()]).bind().await.unwrap();
    let key = Some(server.public_key());
    for transport in [Transport::Tcp, Transport::Udp] {
        let addr = match transport {
            Transport::Tcp => server.local_tcp_addr().unwrap(),
            Transport::Udp => server.local_udp_addr().unwrap(),
        };
        let client = client_builder(keypair(2), Pattern::IK, server.public_key()).bind().await.unwrap();
        let (c, s) =
            within(async { tokio::try_join!(client.connect(transport, addr, key), server.accept()) }).await.unwrap();
        // The client's endpoint (and, for UDP, the task reading its socket) stays alive
        // as long as the connection needs it.
        drop(client);
        s.send(Bytes::from_static(b"still here")).await.unwrap();
        assert_eq!(within(c.recv()).await.unwrap().payload, "still here", "{transport}");
        c.send(Bytes::from_static(b"me too")).await.unwrap();
        assert_eq!(within(s.recv()).await.unwrap().payload, "me too", "{transport}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_gives_up_on_a_peer_that_never_reads() {
    let mut limits = open_limits();
    limits.send_queue = 4;
    limits.recv_queue = 4;
    limits.tcp_send_buffer = Some(16 * 1024);
    limits.tcp_recv_buffer = Some(16 * 1024);
    limits.close_linger = std::time::Duration::from_millis(200);
    let server = server_builder(keypair(1), &[*keypair(2).public()]).limits(limits.clone()).bind().await.unwrap();
    let client = client_builder(keypair(2), Pattern::IK, server.public_key()).limits(limits).bind().await.unwrap();
    let addr = server.local_tcp_addr().unwrap();
    let (c, s) =
        within(async { tokio::try_join!(client.connect_tcp(addr, Some(server.public_key())), server.accept()) })
            .await
            .unwrap();
    let chunk = Bytes::from(vec![0u8; 8 * 1024]);
    while tokio::time::timeout(std::time::Duration::from_millis(200), c.send(chunk.clone())).await.is_ok() {}
    // Queued data cannot leave, so neither can the Close: the linger bounds the wait.
    let started = std::time::Instant::now();
    match within(c.close(CloseReason::Normal)).await {
        Ok(()) | Err(Error::Closed { by_peer: false, .. }) => {}
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    // The server sees the stream end (the messages it had buffered first).
    loop {
        match within(s.recv()).await {
            Ok(_) => {}
            Err(e) => {
                assert!(matches!(e, Error::CarrierClosed | Error::Io(_)), "{e:?}");
                break;
            }
        }
    }
}
