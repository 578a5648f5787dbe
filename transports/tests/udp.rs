//! UDP specifics through a user-space proxy: handshake retransmission after a lost
//! INIT, and roaming (the server follows the client to a new address once a packet from
//! there authenticates, and not for replayed or forged packets).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod util;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use util::*;
use veil_protocol::{Limits, Pattern};

/// Client-to-server datagrams seen by the proxy.
type Captured = Arc<Mutex<Vec<Vec<u8>>>>;

/// A UDP proxy between one client and `server`. It drops the first `drop_first`
/// client-to-server datagrams, records the others, and moves its server-facing side to
/// any socket sent on `moves` (the client "roams" from the server's point of view).
struct Proxy {
    front: SocketAddr,
    moves: mpsc::Sender<UdpSocket>,
    captured: Captured,
}

async fn proxy(server: SocketAddr, drop_first: usize) -> Proxy {
    let front = UdpSocket::bind(localhost()).await.unwrap();
    let front_addr = front.local_addr().unwrap();
    let (moves, mut rx) = mpsc::channel::<UdpSocket>(1);
    let captured = Captured::default();
    let log = Arc::clone(&captured);
    tokio::spawn(async move {
        let mut back = UdpSocket::bind(localhost()).await.unwrap();
        let mut client = None;
        let mut seen = 0;
        let (mut a, mut b) = (vec![0u8; 65_536], vec![0u8; 65_536]);
        loop {
            tokio::select! {
                // A move is taken before any packet that arrives after it was sent.
                biased;
                s = rx.recv() => match s {
                    Some(s) => back = s,
                    None => break,
                },
                r = front.recv_from(&mut a) => {
                    let (n, from) = r.unwrap();
                    client = Some(from);
                    seen += 1;
                    if seen > drop_first {
                        log.lock().unwrap().push(a[..n].to_vec());
                        back.send_to(&a[..n], server).await.unwrap();
                    }
                }
                r = back.recv_from(&mut b) => {
                    let (n, _) = r.unwrap();
                    if let Some(c) = client {
                        front.send_to(&b[..n], c).await.unwrap();
                    }
                }
            }
        }
    });
    Proxy { front: front_addr, moves, captured }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_init_is_retransmitted() {
    init_tracing();
    let client_id = keypair(2);
    let server = server_builder(keypair(1), &[*client_id.public()]).bind().await.unwrap();
    let p = proxy(server.local_udp_addr().unwrap(), 1).await;
    let limits = Limits { handshake_rto: Duration::from_millis(100).into(), ..Limits::default() };
    let client =
        client_builder(client_id, Pattern::IK, server.public_key()).protocol_limits(limits).bind().await.unwrap();
    let (c, s) =
        within(async { tokio::try_join!(client.connect_udp(p.front, Some(server.public_key())), server.accept()) })
            .await
            .unwrap();
    c.send(Bytes::from_static(b"after a retransmission")).await.unwrap();
    assert_eq!(within(s.recv()).await.unwrap().payload, "after a retransmission");
    // The proxy dropped the first INIT; the byte-identical retransmission got through.
    let captured = p.captured.lock().unwrap().clone();
    assert_eq!(captured[0][0], 0x01, "first forwarded packet is the retransmitted INIT");
    // One more packet left the client than reached the server: the dropped INIT.
    assert!(c.stats().packets_sent > captured.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_follows_a_roaming_client_only_after_authentication() {
    init_tracing();
    let client_id = keypair(2);
    let server = server_builder(keypair(1), &[*client_id.public()]).bind().await.unwrap();
    let server_udp = server.local_udp_addr().unwrap();
    let p = proxy(server_udp, 0).await;
    let client = client_builder(client_id, Pattern::XX, server.public_key()).bind().await.unwrap();
    let (c, s) = within(async { tokio::try_join!(client.connect_udp(p.front, None), server.accept()) }).await.unwrap();
    c.send(Bytes::from_static(b"one")).await.unwrap();
    assert_eq!(within(s.recv()).await.unwrap().payload, "one");
    let first = s.remote_addr();
    assert_ne!(first, p.front, "the server sees the proxy's back side");

    // From another address, an attacker replays a genuine transport packet and sends a
    // forged one with the right index: neither authenticates, the server stays put.
    let attacker = UdpSocket::bind(localhost()).await.unwrap();
    let genuine = p.captured.lock().unwrap().iter().rev().find(|d| d[0] & 0xfe == 0x10).cloned().unwrap();
    attacker.send_to(&genuine, server_udp).await.unwrap();
    let mut forged = genuine.clone();
    *forged.last_mut().unwrap() ^= 1;
    attacker.send_to(&forged, server_udp).await.unwrap();
    c.send(Bytes::from_static(b"two")).await.unwrap();
    assert_eq!(within(s.recv()).await.unwrap().payload, "two");
    assert_eq!(s.remote_addr(), first, "moved for an unauthenticated packet");

    // The client's path changes (new source port): the first authenticated packet from
    // there moves the server, and its answers follow.
    let new_back = UdpSocket::bind(localhost()).await.unwrap();
    let new_addr = new_back.local_addr().unwrap();
    p.moves.send(new_back).await.unwrap();
    c.send(Bytes::from_static(b"three")).await.unwrap();
    assert_eq!(within(s.recv()).await.unwrap().payload, "three");
    assert_eq!(s.remote_addr(), new_addr);
    s.send(Bytes::from_static(b"followed")).await.unwrap();
    assert_eq!(within(c.recv()).await.unwrap().payload, "followed");
    assert!(s.stats().packets_dropped >= 2, "{:?}", s.stats());
}
