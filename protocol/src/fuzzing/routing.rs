//! Fuzz entry point of the routing layer (spec §16): the per-link route tables a relay and an
//! endpoint keep, driven by arbitrary operations and compared with simple models, and the
//! routing messages of the input decoded and re-encoded.

use alloc::collections::{BTreeMap, VecDeque};
use alloc::vec::Vec;

use bytes::Bytes;

use crate::message::Message;
use crate::routing::{
    PeerRoutes, RouteTable, RoutingError, RoutingMessage, ROUTE_ANNOUNCE_REPEATS, ROUTE_REUSE_DELAY,
    UNREACHABLE_INTERVAL,
};
use crate::time::{Duration, Timestamp};
use crate::trust::NodeId;

/// Bindings each table may hold: small, so that the bounds are reached.
const MAX: usize = 8;
/// At most this many operations are read from one input.
const MAX_OPS: usize = 512;

fn node(b: u8) -> NodeId {
    // Sixteen distinct nodes: enough to overflow a table of eight.
    NodeId([b & 0x0f; 16])
}

/// A relay's [`RouteTable`] (on a datagram link, so that repeats run) and a receiver's
/// [`PeerRoutes`], fed 4-byte operations `[op, a, b, c]`:
///
/// | `op % 8` | operation |
/// |---|---|
/// | 0 | `announce(node(a))` |
/// | 1 | `withdraw(node(a))` |
/// | 2 | `on_forward(a)` (a `Forward` naming handle `a`) |
/// | 3 | the clock moves `b * 100 + c` ms |
/// | 4 | `poll_repeat` until `None` |
/// | 5 | `allow_notice(a)` |
/// | 6 | `PeerRoutes::learn(a, node(b))` |
/// | 7 | `PeerRoutes::forget(a)` |
///
/// Invariants: the tables never hold more than their bound and always map handles and nodes
/// one to one; a handle given out is never one bound to another node, nor one withdrawn less
/// than `ROUTE_REUSE_DELAY` ago unless more than the bound were withdrawn since (the
/// quarantine is bounded too); handles stay below twice the bound plus one; an announcement is
/// repeated at most `ROUTE_ANNOUNCE_REPEATS` times, never after the peer used it, never before
/// it is due; two notices for one bound handle are `UNREACHABLE_INTERVAL` apart; `PeerRoutes`
/// equals a trivially correct model. Afterwards, `data` is decoded as messages and every routing
/// message survives the round trip through [`RoutingMessage`].
pub fn routing(data: &[u8]) {
    let mut now = Timestamp::from_millis(1_000);
    let mut table = RouteTable::new(MAX, true);
    let mut peer = PeerRoutes::new(MAX);
    // Models.
    let mut bound: BTreeMap<NodeId, u32> = BTreeMap::new();
    let mut withdrawn: VecDeque<(u32, Timestamp)> = VecDeque::new();
    let mut used: BTreeMap<u32, bool> = BTreeMap::new();
    let mut repeats: BTreeMap<u32, u8> = BTreeMap::new();
    let mut notices: BTreeMap<u32, Timestamp> = BTreeMap::new();
    let mut learned: BTreeMap<u32, NodeId> = BTreeMap::new();
    for op in data.chunks_exact(4).take(MAX_OPS) {
        let (a, b, c) = (op[1], op[2], op[3]);
        match op[0] % 8 {
            0 => {
                let n = node(a);
                match table.announce(n, now) {
                    Ok(ann) => {
                        if let Some(&r) = bound.get(&n) {
                            assert_eq!((ann.route, ann.new), (r, false), "a bound node keeps its handle");
                        } else {
                            assert!(ann.new);
                            assert!(!bound.values().any(|r| *r == ann.route), "handle {} given twice", ann.route);
                            // spec §16.3: no reuse within the delay, unless the bounded
                            // quarantine overflowed (more than MAX withdrawals pending).
                            if let Some(pos) = withdrawn.iter().rposition(|(r, _)| *r == ann.route) {
                                let (_, at) = withdrawn[pos];
                                let later = withdrawn.len() - pos - 1;
                                assert!(
                                    now.saturating_since(at) >= ROUTE_REUSE_DELAY || later >= MAX,
                                    "handle {} reused too early",
                                    ann.route
                                );
                            }
                            assert!((ann.route as usize) < 2 * MAX + 1, "handles keep growing: {}", ann.route);
                            bound.insert(n, ann.route);
                            used.insert(ann.route, false);
                            repeats.insert(ann.route, 0);
                            notices.remove(&ann.route);
                        }
                    }
                    Err(RoutingError::TableFull) => assert!(bound.len() >= MAX && !bound.contains_key(&n)),
                    Err(e) => panic!("announce: {e:?}"),
                }
            }
            1 => {
                let n = node(a);
                let got = table.withdraw(&n, now);
                assert_eq!(got, bound.remove(&n));
                if let Some(r) = got {
                    withdrawn.push_back((r, now));
                    used.remove(&r);
                    repeats.remove(&r);
                    notices.remove(&r);
                }
            }
            2 => {
                let route = u32::from(a);
                let want = bound.iter().find(|(_, r)| **r == route).map(|(n, _)| *n);
                assert_eq!(table.on_forward(route).ok(), want);
                if want.is_some() {
                    used.insert(route, true);
                    assert!(!table.needs_announcement(route));
                }
            }
            3 => now = now + Duration::from_millis(u64::from(b) * 100 + u64::from(c)),
            4 => {
                let due = table.next_timeout();
                while let Some((route, n)) = table.poll_repeat(now) {
                    assert!(due.is_some_and(|d| d <= now), "a repeat before it was due");
                    assert_eq!(bound.get(&n), Some(&route));
                    assert_eq!(used.get(&route), Some(&false), "repeated after the peer used it");
                    let k = repeats.entry(route).or_insert(0);
                    *k += 1;
                    assert!(*k <= ROUTE_ANNOUNCE_REPEATS, "repeated {k} times");
                }
                assert!(table.next_timeout().is_none_or(|t| t > now), "a due repeat was left");
            }
            5 => {
                let route = u32::from(a);
                if table.allow_notice(route, now) && bound.values().any(|r| *r == route) {
                    if let Some(prev) = notices.insert(route, now) {
                        assert!(now.saturating_since(prev) >= UNREACHABLE_INTERVAL, "notices too close");
                    }
                }
            }
            6 => {
                let (route, n) = (u32::from(a), node(b));
                let grows = !learned.contains_key(&route) && !learned.values().any(|x| *x == n);
                match peer.learn(route, n) {
                    Ok(()) => {
                        learned.retain(|r, x| *r != route && *x != n);
                        learned.insert(route, n);
                    }
                    Err(RoutingError::TableFull) => assert!(grows && learned.len() >= MAX),
                    Err(e) => panic!("learn: {e:?}"),
                }
            }
            _ => assert_eq!(peer.forget(u32::from(a)), learned.remove(&u32::from(a))),
        }
        assert!(table.len() <= MAX && peer.len() <= MAX);
        assert_eq!(table.len(), bound.len());
        for (n, r) in &bound {
            assert_eq!((table.resolve(*r), table.route_of(n)), (Some(*n), Some(*r)));
        }
        assert_eq!(peer.iter().collect::<Vec<_>>(), learned.iter().map(|(r, n)| (*r, *n)).collect::<Vec<_>>());
        for (r, n) in &learned {
            assert_eq!((peer.resolve(*r), peer.route_of(n)), (Ok(*n), Some(*r)));
        }
        // Keep the model of withdrawals as small as what it has to remember.
        while withdrawn.len() > 4 * MAX {
            withdrawn.pop_front();
        }
    }

    // The input as a plaintext: routing messages survive the trip through `RoutingMessage`.
    let buf = Bytes::copy_from_slice(data);
    let mut rest = &buf[..];
    while let Ok((m, tail)) = Message::decode(rest) {
        if let Some(r) = RoutingMessage::from_message(&m, &buf) {
            assert_eq!(r.message(), m);
            let mut out = alloc::vec![0u8; m.encoded_len()];
            assert_eq!(m.encode(&mut out), Ok(out.len()));
            assert_eq!(Message::decode(&out), Ok((m, &[][..])));
        }
        rest = tail;
    }
}
