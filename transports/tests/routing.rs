//! Routing messages (spec §16) over real connections: an endpoint that routes hands them to
//! the application in order with data; one that does not drops and counts them (spec §16.7).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod util;

use bytes::Bytes;
use util::*;
use veil_protocol::routing::{RouteReason, RoutingMessage};
use veil_protocol::trust::NodeId;
use veil_protocol::Pattern;
use veil_transports::{Error, Received, Transport, TrySendError};

fn node(seed: u8) -> NodeId {
    NodeId([seed; 16])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_messages_reach_a_routing_endpoint_in_order_with_data() {
    init_tracing();
    let client_id = keypair(2);
    let client_key = *client_id.public();
    let server = server_builder(keypair(1), &[client_key]).routing(true).bind().await.unwrap();
    let server_key = server.public_key();
    let client = client_builder(client_id, Pattern::IK, server_key).routing(true).bind().await.unwrap();
    for transport in [Transport::Tcp, Transport::Udp] {
        let addr = match transport {
            Transport::Tcp => server.local_tcp_addr().unwrap(),
            Transport::Udp => server.local_udp_addr().unwrap(),
        };
        let (c, s) =
            within(async { tokio::try_join!(client.connect(transport, addr, Some(server_key)), server.accept()) })
                .await
                .unwrap();
        // Relay → endpoint: an announcement, an envelope, a notice; then data.
        s.send_routing(RoutingMessage::Route { route: 0, node: node(7) }).await.unwrap();
        s.send_routing(RoutingMessage::Deliver { route: 0, packet: Bytes::from_static(b"sealed") }).await.unwrap();
        s.try_send_routing(RoutingMessage::Unreachable { route: 0, reason: RouteReason::UplinkDown }).unwrap();
        s.send(Bytes::from_static(b"data")).await.unwrap();
        let mut got = Vec::new();
        for _ in 0..4 {
            got.push(within(c.recv_any()).await.unwrap());
        }
        // Announcements and notices leave ahead of queued data (spec §16.3), so the notice may
        // overtake the envelope; the announcement precedes the envelope, the envelope the data.
        let route = Received::Routing(RoutingMessage::Route { route: 0, node: node(7) });
        let deliver = Received::Routing(RoutingMessage::Deliver { route: 0, packet: Bytes::from_static(b"sealed") });
        let notice = Received::Routing(RoutingMessage::Unreachable { route: 0, reason: RouteReason::UplinkDown });
        let at =
            |m: &Received| got.iter().position(|g| g == m).unwrap_or_else(|| panic!("{transport}: {m:?} in {got:?}"));
        assert!(at(&route) < at(&deliver), "{transport}: {got:?}");
        assert!(at(&notice) < 3, "{transport}: {got:?}");
        match &got[3] {
            Received::Message(m) => assert_eq!(&m.payload[..], b"data", "{transport}"),
            other => panic!("{transport}: {other:?}"),
        }
        // Endpoint → relay.
        c.send_routing(RoutingMessage::Forward { route: 0, packet: Bytes::from_static(b"up") }).await.unwrap();
        assert_eq!(
            within(s.recv_any()).await.unwrap(),
            Received::Routing(RoutingMessage::Forward { route: 0, packet: Bytes::from_static(b"up") })
        );
        // `recv` skips routing messages and returns the next data message.
        s.send_routing(RoutingMessage::Withdraw { route: 0, reason: RouteReason::Detached }).await.unwrap();
        s.send(Bytes::from_static(b"after")).await.unwrap();
        assert_eq!(&within(c.recv()).await.unwrap().payload[..], b"after");
    }
    assert_eq!(server.stats().routing_dropped, 0);
    assert_eq!(client.stats().routing_dropped, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_does_not_route_drops_and_counts_routing_messages() {
    init_tracing();
    let client_id = keypair(2);
    let client_key = *client_id.public();
    let server = server_builder(keypair(1), &[client_key]).routing(true).bind().await.unwrap();
    let server_key = server.public_key();
    // Routing off (the default).
    let client = client_builder(client_id, Pattern::IK, server_key).bind().await.unwrap();
    let addr = server.local_tcp_addr().unwrap();
    let (c, s) =
        within(async { tokio::try_join!(client.connect(Transport::Tcp, addr, Some(server_key)), server.accept()) })
            .await
            .unwrap();
    s.send_routing(RoutingMessage::Route { route: 1, node: node(9) }).await.unwrap();
    s.send_routing(RoutingMessage::Deliver { route: 1, packet: Bytes::from_static(b"x") }).await.unwrap();
    s.send(Bytes::from_static(b"still here")).await.unwrap();
    match within(c.recv_any()).await.unwrap() {
        Received::Message(m) => assert_eq!(&m.payload[..], b"still here"),
        other => panic!("{other:?}"),
    }
    assert_eq!(client.stats().routing_dropped, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_larger_than_one_packet_is_refused_with_a_typed_error() {
    init_tracing();
    let client_id = keypair(2);
    let client_key = *client_id.public();
    let server = server_builder(keypair(1), &[client_key]).routing(true).bind().await.unwrap();
    let server_key = server.public_key();
    let client = client_builder(client_id, Pattern::IK, server_key).routing(true).bind().await.unwrap();
    let addr = server.local_udp_addr().unwrap();
    let (c, _s) =
        within(async { tokio::try_join!(client.connect(Transport::Udp, addr, Some(server_key)), server.accept()) })
            .await
            .unwrap();
    let big = Bytes::from(vec![0u8; c.max_message_len() + 64]);
    match c.send_routing(RoutingMessage::Forward { route: 0, packet: big.clone() }).await {
        Err(Error::MessageTooLarge { .. }) => {}
        other => panic!("{other:?}"),
    }
    match c.try_send_routing(RoutingMessage::Forward { route: 0, packet: big }) {
        Err(TrySendError::Failed(Error::MessageTooLarge { .. })) => {}
        other => panic!("{other:?}"),
    }
    // The connection goes on.
    c.send_routing(RoutingMessage::Forward { route: 0, packet: Bytes::from_static(b"fits") }).await.unwrap();
}
