//! Hostile and excessive peers: garbage, oversized frames, silence, denial, and the
//! endpoint limits. Each is dropped with a typed error while a good connection goes on.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod util;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::broadcast;
use util::*;
use veil_protocol::wire::{self, RejectReason};
use veil_protocol::{Config, ConnectionError, DecodeError, HandshakeError, Mode, Pattern, Role, Timestamp};
use veil_transports::{Connection, Endpoint, EndpointLimits, Error, HandshakeFailure, Transport};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_millis(400);

/// Reads until EOF (or reset); returns what arrived.
async fn read_to_end(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    out
}

/// Collects failures until one has arrived from each address in `addrs`.
async fn failures_from(
    rx: &mut broadcast::Receiver<HandshakeFailure>,
    addrs: &[SocketAddr],
) -> HashMap<SocketAddr, Error> {
    let mut got = HashMap::new();
    while !addrs.iter().all(|a| got.contains_key(a)) {
        let f = within(rx.recv()).await.unwrap();
        got.entry(f.remote_addr).or_insert(f.error);
    }
    got
}

async fn assert_alive(c: &Connection, s: &Connection, what: &str) {
    c.send(Bytes::from(what.to_owned())).await.unwrap();
    assert_eq!(within(s.recv()).await.unwrap().payload, what.as_bytes(), "good connection after {what}");
}

async fn good_pair(server: &Endpoint, transport: Transport) -> (Endpoint, Connection, Connection) {
    let client = client_builder(keypair(2), Pattern::IK, server.public_key()).bind().await.unwrap();
    let addr = match transport {
        Transport::Tcp => server.local_tcp_addr().unwrap(),
        Transport::Udp => server.local_udp_addr().unwrap(),
    };
    let (c, s) =
        within(async { tokio::try_join!(client.connect(transport, addr, Some(server.public_key())), server.accept()) })
            .await
            .unwrap();
    (client, c, s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_garbage_oversized_empty_and_silent_peers_are_dropped() {
    init_tracing();
    let server = server_builder(keypair(1), &[*keypair(2).public()])
        .max_packet_len(1_024)
        .handshake_timeout(HANDSHAKE_TIMEOUT)
        .bind()
        .await
        .unwrap();
    let addr = server.local_tcp_addr().unwrap();
    let (_client, c, s) = good_pair(&server, Transport::Tcp).await;
    let mut failures = server.handshake_failures();

    // A frame holding an unknown packet type.
    let mut garbage = TcpStream::connect(addr).await.unwrap();
    garbage.write_all(&[0, 5, 0x42, 1, 2, 3, 4]).await.unwrap();
    // A length prefix above max_packet_len: refused before allocation, REJECT(Malformed).
    let mut oversized = TcpStream::connect(addr).await.unwrap();
    oversized.write_all(&[0xff, 0xff]).await.unwrap();
    // spec §3.1: length 0 is an error.
    let mut empty = TcpStream::connect(addr).await.unwrap();
    empty.write_all(&[0, 0]).await.unwrap();
    // Slowloris: half a length prefix, then silence.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    silent.write_all(&[0]).await.unwrap();
    let started = tokio::time::Instant::now();

    let addrs: Vec<SocketAddr> =
        [&garbage, &oversized, &empty, &silent].iter().map(|s| s.local_addr().unwrap()).collect();
    assert_eq!(within(read_to_end(&mut oversized)).await, [0, 2, 0x04, RejectReason::Malformed.code()]);
    within(read_to_end(&mut garbage)).await;
    within(read_to_end(&mut empty)).await;
    assert_alive(&c, &s, "garbage").await;
    within(read_to_end(&mut silent)).await;
    assert!(started.elapsed() >= HANDSHAKE_TIMEOUT - Duration::from_millis(50), "dropped before the timeout");

    let got = failures_from(&mut failures, &addrs).await;
    assert!(
        matches!(
            got[&addrs[0]],
            Error::Protocol(ConnectionError::Handshake(HandshakeError::Decode(DecodeError::UnknownPacketType(0x42))))
        ),
        "{:?}",
        got[&addrs[0]]
    );
    assert!(matches!(got[&addrs[1]], Error::FrameTooLarge { max: 1_024 }), "{:?}", got[&addrs[1]]);
    assert!(matches!(got[&addrs[2]], Error::EmptyFrame), "{:?}", got[&addrs[2]]);
    assert!(got[&addrs[3]].is_handshake_timeout(), "{:?}", got[&addrs[3]]);
    assert_alive(&c, &s, "silence").await;
    assert_eq!(server.stats().handshake_failures, 4);
    assert_eq!(server.stats().handshakes, 0);
}

/// A genuine datagram INIT for `server`, from a throwaway initiator.
fn genuine_init(server: &Endpoint) -> Vec<u8> {
    let cfg = Arc::new(Config::new(keypair(2), Mode::Datagram));
    let mut rng = rand::rngs::OsRng;
    let mut core =
        veil_protocol::Connection::new(cfg, Role::Initiator, Some(server.public_key()), Timestamp::ZERO, &mut rng)
            .unwrap();
    let mut buf = vec![0u8; 2_048];
    let n = core.poll_transmit(Timestamp::ZERO, &mut buf).unwrap().unwrap();
    buf.truncate(n);
    buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_garbage_and_silent_peers_are_dropped() {
    init_tracing();
    let server =
        server_builder(keypair(1), &[*keypair(2).public()]).handshake_timeout(HANDSHAKE_TIMEOUT).bind().await.unwrap();
    let addr = server.local_udp_addr().unwrap();
    let (_client, c, s) = good_pair(&server, Transport::Udp).await;
    let mut failures = server.handshake_failures();

    let raw = UdpSocket::bind(localhost()).await.unwrap();
    // Unknown packet type and unknown index: dropped at the socket.
    raw.send_to(&[0x42; 40], addr).await.unwrap();
    raw.send_to(&[0x10, 0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], addr)
        .await
        .unwrap();
    assert_alive(&c, &s, "stray datagrams").await;
    assert!(server.stats().datagrams_dropped >= 2, "{:?}", server.stats());

    // An INIT whose Noise message is garbage: the responder it creates fails at once.
    let garbage = UdpSocket::bind(localhost()).await.unwrap();
    let mut init = vec![0x01, 0x01, 0x11, 0, 0, 0, 9];
    init.extend_from_slice(&[0xab; 100]);
    garbage.send_to(&init, addr).await.unwrap();

    // A genuine INIT whose sender then goes silent: answered, then dropped at the timeout.
    let silent = UdpSocket::bind(localhost()).await.unwrap();
    silent.send_to(&genuine_init(&server), addr).await.unwrap();
    let mut resp = [0u8; 2_048];
    let (n, _) = within(silent.recv_from(&mut resp)).await.unwrap();
    assert_eq!(resp[0], 0x02, "the responder answered with RESP ({n} bytes)");

    let addrs = [garbage.local_addr().unwrap(), silent.local_addr().unwrap()];
    let got = failures_from(&mut failures, &addrs).await;
    assert!(
        matches!(got[&addrs[0]], Error::Protocol(ConnectionError::Handshake(HandshakeError::Crypto))),
        "{:?}",
        got[&addrs[0]]
    );
    assert!(got[&addrs[1]].is_handshake_timeout(), "{:?}", got[&addrs[1]]);
    assert_alive(&c, &s, "silence").await;
    assert_eq!(server.stats().handshakes, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_peers_never_reach_accept() {
    let allowed = keypair(2);
    let server = server_builder(keypair(1), &[*allowed.public()]).bind().await.unwrap();
    let mut failures = server.handshake_failures();
    let server_key = server.public_key();
    let denied =
        client_builder(keypair(66), Pattern::IK, server_key).handshake_timeout(HANDSHAKE_TIMEOUT).bind().await.unwrap();
    let good = client_builder(allowed, Pattern::IK, server_key).bind().await.unwrap();
    for transport in [Transport::Tcp, Transport::Udp] {
        let addr = match transport {
            Transport::Tcp => server.local_tcp_addr().unwrap(),
            Transport::Udp => server.local_udp_addr().unwrap(),
        };
        let err = within(denied.connect(transport, addr, Some(server_key))).await.unwrap_err();
        match transport {
            // spec §5.5: stream responders say REJECT(Unauthorized)…
            Transport::Tcp => assert!(
                matches!(
                    err,
                    Error::Protocol(ConnectionError::Handshake(HandshakeError::Rejected(RejectReason::Unauthorized)))
                ),
                "{err:?}"
            ),
            // …datagram responders stay silent (no oracle): the initiator times out.
            Transport::Udp => assert!(err.is_handshake_timeout(), "{err:?}"),
        }
        let f = within(failures.recv()).await.unwrap();
        assert!(matches!(f.error, Error::Protocol(ConnectionError::Handshake(HandshakeError::Denied(_)))), "{f:?}");
        // The first connection accept() yields is the allowed one.
        let (_c, s) =
            within(async { tokio::try_join!(good.connect(transport, addr, Some(server_key)), server.accept()) })
                .await
                .unwrap();
        assert_eq!(s.remote_static(), good.public_key(), "{transport}");
    }
}

fn limits(f: impl FnOnce(&mut EndpointLimits)) -> EndpointLimits {
    let mut l = open_limits();
    f(&mut l);
    l
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_refuses_with_busy() {
    let client_id = keypair(2);
    let server = server_builder(keypair(1), &[*client_id.public()])
        .limits(limits(|l| l.max_connections = 2))
        .bind()
        .await
        .unwrap();
    let client = client_builder(client_id, Pattern::IK, server.public_key()).bind().await.unwrap();
    let key = Some(server.public_key());
    let tcp = server.local_tcp_addr().unwrap();
    let udp = server.local_udp_addr().unwrap();
    let mut failures = server.handshake_failures();
    let (_a, _sa) = within(async { tokio::try_join!(client.connect_tcp(tcp, key), server.accept()) }).await.unwrap();
    let (_b, _sb) = within(async { tokio::try_join!(client.connect_udp(udp, key), server.accept()) }).await.unwrap();
    for transport in [Transport::Tcp, Transport::Udp] {
        let addr = if transport == Transport::Tcp { tcp } else { udp };
        let err = within(client.connect(transport, addr, key)).await.unwrap_err();
        let busy =
            matches!(err, Error::Protocol(ConnectionError::Handshake(HandshakeError::Rejected(RejectReason::Busy))));
        // Over TCP the refused socket may be reset before the REJECT is read.
        assert!(busy || transport == Transport::Tcp && matches!(err, Error::Io(_) | Error::CarrierClosed), "{err:?}");
        let f = within(failures.recv()).await.unwrap();
        assert!(matches!(f.error, Error::TooManyConnections), "{f:?}");
    }
    assert_eq!(server.stats().refused_busy, 2);
    assert_eq!(server.stats().connections, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_handshakes_refuses_until_the_silent_peer_times_out() {
    let client_id = keypair(2);
    let server = server_builder(keypair(1), &[*client_id.public()])
        .limits(limits(|l| l.max_handshakes = 1))
        .handshake_timeout(HANDSHAKE_TIMEOUT)
        .bind()
        .await
        .unwrap();
    let client = client_builder(client_id, Pattern::IK, server.public_key()).bind().await.unwrap();
    let key = Some(server.public_key());
    let addr = server.local_tcp_addr().unwrap();
    let mut failures = server.handshake_failures();
    // A silent peer holds the only handshake slot…
    let mut silent = TcpStream::connect(addr).await.unwrap();
    while server.stats().handshakes == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // …so a real client is refused…
    assert!(within(client.connect_tcp(addr, key)).await.is_err());
    assert!(matches!(within(failures.recv()).await.unwrap().error, Error::TooManyHandshakes));
    // …until the silent one is dropped at its handshake timeout.
    within(read_to_end(&mut silent)).await;
    assert!(within(failures.recv()).await.unwrap().error.is_handshake_timeout());
    let (_c, s) = within(async { tokio::try_join!(client.connect_tcp(addr, key), server.accept()) }).await.unwrap();
    assert_eq!(s.remote_static(), client.public_key());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_address_handshake_rate_is_limited() {
    let client_id = keypair(2);
    let server = server_builder(keypair(1), &[*client_id.public()])
        .limits(limits(|l| {
            l.handshake_rate_per_ip = 0.001;
            l.handshake_burst_per_ip = 2;
        }))
        .bind()
        .await
        .unwrap();
    let client = client_builder(client_id, Pattern::IK, server.public_key())
        .handshake_timeout(HANDSHAKE_TIMEOUT)
        .bind()
        .await
        .unwrap();
    let key = Some(server.public_key());
    let tcp = server.local_tcp_addr().unwrap();
    let udp = server.local_udp_addr().unwrap();
    let mut failures = server.handshake_failures();
    let (_a, _sa) = within(async { tokio::try_join!(client.connect_tcp(tcp, key), server.accept()) }).await.unwrap();
    let (_b, _sb) = within(async { tokio::try_join!(client.connect_udp(udp, key), server.accept()) }).await.unwrap();
    // The bucket (shared by both transports, per address) is empty now.
    assert!(within(client.connect_tcp(tcp, key)).await.is_err());
    // A UDP source below half its bucket must prove its address first (spec §5.7.4): the
    // first UDP handshake above took a cookie round trip. Proven and out of tokens, it gets
    // no answer at all (no reflection).
    assert!(within(client.connect_udp(udp, key)).await.unwrap_err().is_handshake_timeout());
    for _ in 0..2 {
        assert!(matches!(within(failures.recv()).await.unwrap().error, Error::RateLimited));
    }
    let stats = server.stats();
    assert_eq!(stats.refused_rate_limited, 2);
    assert_eq!((stats.cookies_sent, stats.cookies_accepted, stats.cookies_refused), (2, 2, 0), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_endpoint_requiring_cookies_answers_statelessly_until_the_address_is_proven() {
    let client_id = keypair(2);
    let server = server_builder(keypair(1), &[*client_id.public()])
        .limits(limits(|l| l.require_cookie = true))
        .bind()
        .await
        .unwrap();
    let udp = server.local_udp_addr().unwrap();
    // spec §5.7.4: a genuine INIT from an unproven address gets a COOKIE_REPLY, nothing else.
    let init = genuine_init(&server);
    let raw = UdpSocket::bind(localhost()).await.unwrap();
    raw.send_to(&init, udp).await.unwrap();
    let mut buf = [0u8; 2_048];
    let (n, _) = within(raw.recv_from(&mut buf)).await.unwrap();
    assert_eq!(n, wire::COOKIE_REPLY_LEN);
    assert!(n < init.len(), "the reply amplifies");
    assert_eq!((buf[0], &buf[1..5]), (wire::TYPE_COOKIE_REPLY, &init[3..7]));
    assert_eq!((server.stats().handshakes, server.stats().connections), (0, 0));
    // The cookie is bound to the address and port: sent back from another socket it is refused.
    let mut back = vec![0u8; wire::INIT_COOKIE_PREFIX_LEN + init.len()];
    wire::encode_init_cookie(buf[5..n].try_into().unwrap(), &init, &mut back).unwrap();
    let other = UdpSocket::bind(localhost()).await.unwrap();
    other.send_to(&back, udp).await.unwrap();
    let (m, _) = within(other.recv_from(&mut buf)).await.unwrap();
    assert_eq!((m, buf[0]), (wire::COOKIE_REPLY_LEN, wire::TYPE_COOKIE_REPLY));
    assert_eq!(server.stats().cookies_refused, 1);
    assert_eq!(server.stats().handshakes, 0);
    // From the right socket it proves the address: the responder answers with RESP.
    raw.send_to(&back, udp).await.unwrap();
    let (_, _) = within(raw.recv_from(&mut buf)).await.unwrap();
    assert_eq!(buf[0], wire::TYPE_HANDSHAKE_RESP);
    assert_eq!(server.stats().cookies_accepted, 1);
    // A real client goes through the challenge by itself.
    let client = client_builder(client_id, Pattern::IK, server.public_key()).bind().await.unwrap();
    let (_c, s) =
        within(async { tokio::try_join!(client.connect_udp(udp, Some(server.public_key())), server.accept()) })
            .await
            .unwrap();
    assert_eq!(s.remote_static(), client.public_key());
    let stats = server.stats();
    assert_eq!((stats.cookies_sent, stats.cookies_accepted, stats.cookies_refused), (3, 2, 1), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_messages_larger_than_a_datagram_are_refused() {
    let client_id = keypair(2);
    let server = server_builder(keypair(1), &[*client_id.public()]).bind().await.unwrap();
    let client = client_builder(client_id, Pattern::IK, server.public_key())
        .limits(limits(|l| l.datagram_size = 600))
        .bind()
        .await
        .unwrap();
    let udp = server.local_udp_addr().unwrap();
    let (c, s) =
        within(async { tokio::try_join!(client.connect_udp(udp, Some(server.public_key())), server.accept()) })
            .await
            .unwrap();
    let max = c.max_message_len();
    assert!(max < 600 && max > 500, "{max}");
    match c.send(Bytes::from(vec![1u8; max + 1])).await {
        Err(Error::MessageTooLarge { len, max: m }) => assert_eq!((len, m), (max + 1, max)),
        other => panic!("{other:?}"),
    }
    c.send(Bytes::from(vec![1u8; max])).await.unwrap();
    assert_eq!(within(s.recv()).await.unwrap().payload.len(), max);
    // The server announced nothing smaller than the default datagram size; the client
    // announced 600, so the server may not send more to it either.
    assert!(s.max_message_len() < 600, "{}", s.max_message_len());
}

#[test]
fn default_limits_are_sane() {
    let l = EndpointLimits::default();
    assert!(l.max_handshakes <= l.max_connections);
    assert!(l.datagram_size <= veil_transports::MAX_DATAGRAM_SIZE);
}

/// A Veil initiator driven by hand over a raw TCP stream (IK, `keypair(2)`), so that a
/// test can misbehave on an established session. Returns once the client is Connected
/// and its confirmation has been written.
async fn raw_tcp_session(addr: SocketAddr, server_key: veil_protocol::PublicKey) -> TcpStream {
    let cfg = Arc::new(Config::new(keypair(2), Mode::Stream));
    let started = std::time::Instant::now();
    let now = || Timestamp::from_micros(u64::try_from(started.elapsed().as_micros()).unwrap());
    let mut core =
        veil_protocol::Connection::new(cfg, Role::Initiator, Some(server_key), now(), &mut rand::rngs::OsRng).unwrap();
    let mut stream = within(TcpStream::connect(addr)).await.unwrap();
    let mut buf = vec![0u8; 65_535];
    // IK: INIT out, RESP in, confirmation out.
    for _ in 0..4 {
        while let Some(n) = core.poll_transmit(now(), &mut buf).unwrap() {
            stream.write_all(&u16::try_from(n).unwrap().to_be_bytes()).await.unwrap();
            stream.write_all(&buf[..n]).await.unwrap();
        }
        if core.is_connected() {
            return stream;
        }
        let mut len = [0u8; 2];
        within(stream.read_exact(&mut len)).await.unwrap();
        let frame = &mut buf[..usize::from(u16::from_be_bytes(len))];
        within(stream.read_exact(frame)).await.unwrap();
        core.handle_input(now(), frame).unwrap();
        while core.poll_event().is_some() {}
    }
    panic!("the raw client did not connect");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_truncated_frames_are_dropped() {
    init_tracing();
    let limits = veil_protocol::Limits {
        handshake_timeout: HANDSHAKE_TIMEOUT.into(),
        idle_timeout: Duration::from_millis(600).into(),
        keepalive_interval: Duration::from_millis(100).into(),
        ..veil_protocol::Limits::default()
    };
    let server = server_builder(keypair(1), &[*keypair(2).public()]).protocol_limits(limits).bind().await.unwrap();
    let addr = server.local_tcp_addr().unwrap();
    // The good client's keepalives (every 100 ms) keep it within the 600 ms idle timeout.
    let client =
        client_builder(keypair(2), Pattern::IK, server.public_key()).protocol_limits(limits).bind().await.unwrap();
    let (c, s) =
        within(async { tokio::try_join!(client.connect_tcp(addr, Some(server.public_key())), server.accept()) })
            .await
            .unwrap();
    let mut failures = server.handshake_failures();

    // Before the handshake: a length prefix of 100 and 10 bytes, then silence or EOF.
    let truncated: &[u8] = &[0, 100, 0x01, 1, 2, 3, 4, 5, 6, 7, 8, 9];
    let mut silent = TcpStream::connect(addr).await.unwrap();
    silent.write_all(truncated).await.unwrap();
    let mut hung_up = TcpStream::connect(addr).await.unwrap();
    hung_up.write_all(truncated).await.unwrap();
    hung_up.shutdown().await.unwrap();
    let addrs = [silent.local_addr().unwrap(), hung_up.local_addr().unwrap()];
    let got = failures_from(&mut failures, &addrs).await;
    assert!(got[&addrs[0]].is_handshake_timeout(), "{:?}", got[&addrs[0]]);
    assert!(matches!(got[&addrs[1]], Error::CarrierClosed), "{:?}", got[&addrs[1]]);
    within(read_to_end(&mut silent)).await;
    assert_alive(&c, &s, "truncated handshake frames").await;

    // On established sessions: a frame that announces 256 bytes and brings 20.
    let mut truncated = vec![1u8, 0];
    truncated.extend_from_slice(&[0x10; 20]);
    let mut established = Vec::new();
    for hang_up in [false, true] {
        let mut raw = raw_tcp_session(addr, server.public_key()).await;
        let conn = within(server.accept()).await.unwrap();
        raw.write_all(&truncated).await.unwrap();
        if hang_up {
            raw.shutdown().await.unwrap();
        }
        established.push((hang_up, raw, conn));
    }
    for (hang_up, _raw, conn) in &established {
        match within(conn.recv()).await {
            // The rest of the frame never comes, nor anything authenticated: spec §7.5.
            Err(Error::Closed { reason: veil_protocol::CloseReason::IdleTimeout, by_peer: false }) if !hang_up => {}
            // The stream ended inside a frame, without a Close.
            Err(Error::CarrierClosed) if *hang_up => {}
            other => panic!("hang up {hang_up}: {other:?}"),
        }
    }
    assert_alive(&c, &s, "truncated transport frames").await;
    until_connections(&server, 1).await;
}

/// Waits (bounded) until the endpoint counts `n` live connections: a connection's slot is
/// given back just after its outcome is published.
async fn until_connections(server: &Endpoint, n: usize) {
    let mut tries = 0;
    while server.stats().connections != n && tries < 200 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        tries += 1;
    }
    assert_eq!(server.stats().connections, n, "{:?}", server.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_reading_is_dropped_at_the_write_stall_timeout() {
    init_tracing();
    const STALL: Duration = Duration::from_millis(500);
    // Small queues and kernel buffers, so that the path to the stuck peer fills quickly.
    let small = limits(|l| {
        l.send_queue = 4;
        l.recv_queue = 4;
        l.tcp_send_buffer = Some(16 * 1024);
        l.tcp_recv_buffer = Some(16 * 1024);
        l.write_stall_timeout = STALL;
    });
    // The stuck peer keeps sending keepalives: the server's idle timeout never fires.
    let chatty = veil_protocol::Limits {
        keepalive_interval: Duration::from_millis(50).into(),
        ..veil_protocol::Limits::default()
    };
    let server = server_builder(keypair(1), &[*keypair(2).public()]).limits(small.clone()).bind().await.unwrap();
    let addr = server.local_tcp_addr().unwrap();
    let (_good_client, c, s) = good_pair(&server, Transport::Tcp).await;
    let stuck_client = client_builder(keypair(2), Pattern::IK, server.public_key())
        .limits(small)
        .protocol_limits(chatty)
        .bind()
        .await
        .unwrap();
    let (stuck, to_stuck) =
        within(async { tokio::try_join!(stuck_client.connect_tcp(addr, Some(server.public_key())), server.accept()) })
            .await
            .unwrap();

    // `stuck` never calls recv. The server writes until `send` waits…
    let chunk = Bytes::from(vec![9u8; 4 * 1024]);
    let mut sent = 0usize;
    loop {
        assert!(sent < 16 * 1024, "send never waited");
        match tokio::time::timeout(Duration::from_millis(300), to_stuck.send(chunk.clone())).await {
            Ok(r) => {
                r.unwrap();
                sent += 1;
            }
            Err(_) => break,
        }
    }
    // …the good connection is unaffected meanwhile…
    assert_alive(&c, &s, "a peer stopped reading").await;
    // …and the stuck one is dropped with a typed error once nothing could be written
    // for the stall timeout. Both a new `send` and the connection's outcome say so.
    assert!(matches!(within(to_stuck.closed()).await, Error::WriteStalled));
    assert!(matches!(to_stuck.send(chunk.clone()).await, Err(Error::WriteStalled)));
    assert_alive(&c, &s, "the stuck peer was dropped").await;
    s.send(Bytes::from_static(b"down")).await.unwrap();
    assert_eq!(within(c.recv()).await.unwrap().payload, "down");
    until_connections(&server, 1).await;
    drop(stuck);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_oversized_short_and_truncated_datagrams_are_dropped() {
    init_tracing();
    let server =
        server_builder(keypair(1), &[*keypair(2).public()]).handshake_timeout(HANDSHAKE_TIMEOUT).bind().await.unwrap();
    let addr = server.local_udp_addr().unwrap();
    let (_client, c, s) = good_pair(&server, Transport::Udp).await;
    let mut failures = server.handshake_failures();
    let dropped_before = server.stats().datagrams_dropped;

    // Larger than the datagram size (1 232 by default), and shorter than an INIT header:
    // both dropped at the socket, before any state is created for them.
    let raw = UdpSocket::bind(localhost()).await.unwrap();
    let mut oversized = genuine_init(&server);
    oversized.resize(veil_transports::DEFAULT_DATAGRAM_SIZE + 1, 0);
    raw.send_to(&oversized, addr).await.unwrap();
    raw.send_to(&[0x01, 0x01, 0x11], addr).await.unwrap();
    assert_alive(&c, &s, "oversized and short datagrams").await;
    assert!(server.stats().datagrams_dropped >= dropped_before + 2, "{:?}", server.stats());

    // A genuine INIT cut short: its responder refuses it with a typed error, says nothing.
    let truncated = UdpSocket::bind(localhost()).await.unwrap();
    let init = genuine_init(&server);
    truncated.send_to(&init[..init.len() / 2], addr).await.unwrap();
    let from = truncated.local_addr().unwrap();
    let got = failures_from(&mut failures, &[from]).await;
    assert!(matches!(got[&from], Error::Protocol(ConnectionError::Handshake(_))), "{:?}", got[&from]);
    let mut buf = [0u8; 64];
    assert!(tokio::time::timeout(Duration::from_millis(200), truncated.recv_from(&mut buf)).await.is_err());
    assert_alive(&c, &s, "a truncated INIT").await;
    assert_eq!(server.stats().handshakes, 0);
    // Only the truncated INIT got as far as a handshake.
    assert_eq!(server.stats().handshake_failures, 1, "{:?}", server.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_peer_that_stops_reading_costs_the_sender_nothing() {
    init_tracing();
    let small = limits(|l| {
        l.send_queue = 4;
        l.recv_queue = 4;
        l.datagram_queue = 8;
    });
    let server = server_builder(keypair(1), &[*keypair(2).public()]).bind().await.unwrap();
    let addr = server.local_udp_addr().unwrap();
    let (_good_client, c, s) = good_pair(&server, Transport::Udp).await;
    let stuck_client = client_builder(keypair(2), Pattern::IK, server.public_key()).limits(small).bind().await.unwrap();
    let (stuck, to_stuck) =
        within(async { tokio::try_join!(stuck_client.connect_udp(addr, Some(server.public_key())), server.accept()) })
            .await
            .unwrap();
    // `stuck` never calls recv: its queues fill and its endpoint drops what follows.
    // Datagrams leave the server whatever the peer does, so `send` never waits for it.
    let chunk = Bytes::from(vec![3u8; 512]);
    within(async {
        for _ in 0..2_000 {
            to_stuck.send(chunk.clone()).await.unwrap();
        }
    })
    .await;
    assert_alive(&c, &s, "a UDP peer stopped reading").await;
    let mut tries = 0;
    while stuck_client.stats().datagrams_dropped == 0 && tries < 200 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        tries += 1;
    }
    assert!(stuck_client.stats().datagrams_dropped > 0, "{:?}", stuck_client.stats());
    // What it had queued is still there, in order, and the connection still works.
    let first = within(stuck.recv()).await.unwrap();
    assert_eq!((first.id, first.payload.len()), (0, 512));
    stuck.send(Bytes::from_static(b"back")).await.unwrap();
    assert_eq!(within(to_stuck.recv()).await.unwrap().payload, "back");
}
