//! The core's timers driven through tokio: rekeys, re-handshakes, keepalives and the idle
//! timeout, over both carriers, with short intervals.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod util;

use std::time::Duration;

use bytes::Bytes;
use util::*;
use veil_protocol::{CloseReason, Limits, Pattern};
use veil_transports::{Error, Transport};

fn ms(n: u64) -> veil_protocol::Duration {
    veil_protocol::Duration::from_millis(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rekeys_and_rehandshakes_keep_traffic_flowing() {
    init_tracing();
    let limits = Limits {
        rekey_after_time: ms(100),
        rehandshake_after_time: ms(300),
        reject_after_time: ms(600),
        keepalive_interval: ms(50),
        ..Limits::default()
    };
    let client_id = keypair(2);
    let server = server_builder(keypair(1), &[*client_id.public()]).protocol_limits(limits).bind().await.unwrap();
    let client =
        client_builder(client_id, Pattern::IK, server.public_key()).protocol_limits(limits).bind().await.unwrap();
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
        let first_hash = c.handshake_hash();
        // Well past REJECT_AFTER_TIME: the session survives only by re-handshaking.
        for i in 0..25u32 {
            c.send(Bytes::from(i.to_be_bytes().to_vec())).await.unwrap();
            assert_eq!(&within(s.recv()).await.unwrap().payload[..], &i.to_be_bytes(), "{transport}");
            s.send(Bytes::from_static(b"ack")).await.unwrap();
            within(c.recv()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        let (cs, ss) = (c.stats(), s.stats());
        assert!(cs.rehandshakes >= 1 && ss.rehandshakes >= 1, "{transport}: {cs:?} {ss:?}");
        assert!(cs.rekeys >= 1, "{transport}: {cs:?}");
        assert_ne!(c.handshake_hash(), first_hash, "{transport}");
        // A re-handshake may be between its two halves right now: give it a moment.
        let mut tries = 0;
        while c.handshake_hash() != s.handshake_hash() && tries < 100 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            tries += 1;
        }
        assert_eq!(c.handshake_hash(), s.handshake_hash(), "{transport}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_sending_is_closed_at_the_idle_timeout() {
    // The server expects traffic every 300 ms; the client's keepalive is much slower.
    let server_limits = Limits { idle_timeout: ms(300), ..Limits::default() };
    let client_limits = Limits { keepalive_interval: veil_protocol::Duration::from_secs(30), ..Limits::default() };
    let client_id = keypair(2);
    let server =
        server_builder(keypair(1), &[*client_id.public()]).protocol_limits(server_limits).bind().await.unwrap();
    let client = client_builder(client_id, Pattern::IK, server.public_key())
        .protocol_limits(client_limits)
        .bind()
        .await
        .unwrap();
    for transport in [Transport::Tcp, Transport::Udp] {
        let addr = match transport {
            Transport::Tcp => server.local_tcp_addr().unwrap(),
            Transport::Udp => server.local_udp_addr().unwrap(),
        };
        let (_c, s) = within(async {
            tokio::try_join!(client.connect(transport, addr, Some(server.public_key())), server.accept())
        })
        .await
        .unwrap();
        match within(s.recv()).await {
            // spec §7.5: closed locally, nothing sent.
            Err(Error::Closed { reason: CloseReason::IdleTimeout, by_peer: false }) => {}
            other => panic!("{transport}: {other:?}"),
        }
    }
}
