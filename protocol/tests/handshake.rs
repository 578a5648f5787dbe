//! Every pattern × suite × mode completes and exchanges data; failures fail closed.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod util;

use bytes::Bytes;
use util::*;
use veil_protocol::{Duration, Event, Mode, Pattern, Suite};

#[test]
fn every_pattern_suite_and_mode_completes_and_exchanges_data() {
    for (p, s, m) in all_combinations() {
        let mut pair = Pair::new(p, s, m);
        pair.drive();
        assert!(pair.connected(), "{p:?} {s:?} {m:?}: {:?} / {:?}", pair.a_errors, pair.b_errors);
        assert_eq!(pair.a.handshake_hash(), pair.b.handshake_hash());
        assert_eq!(pair.a.remote_static(), Some(&pair.b_key));
        assert_eq!(pair.b.remote_static(), Some(&pair.a_key));
        pair.a.send(7, Bytes::from_static(b"up")).unwrap();
        pair.b.send(9, Bytes::from_static(b"down")).unwrap();
        pair.drive();
        assert_eq!(pair.b_messages(), vec![(7, 0, b"up".to_vec())], "{p:?} {s:?} {m:?}");
        assert_eq!(pair.a_messages(), vec![(9, 0, b"down".to_vec())], "{p:?} {s:?} {m:?}");
        assert!(pair.a_errors.is_empty() && pair.b_errors.is_empty(), "{:?} {:?}", pair.a_errors, pair.b_errors);
    }
}

#[test]
fn rehandshake_keeps_traffic_flowing() {
    for (p, s, m) in all_combinations() {
        let mut pair = Pair::new(p, s, m);
        pair.drive();
        let h1 = *pair.a.handshake_hash().unwrap();
        pair.a.send(1, Bytes::from_static(b"before")).unwrap();
        pair.a.start_rehandshake(pair.now).unwrap();
        pair.a.send(1, Bytes::from_static(b"during")).unwrap();
        pair.drive();
        pair.a.send(1, Bytes::from_static(b"after")).unwrap();
        pair.b.send(2, Bytes::from_static(b"reply")).unwrap();
        pair.drive();
        let h2 = *pair.a.handshake_hash().unwrap();
        assert_ne!(h1, h2, "{p:?} {s:?} {m:?}");
        assert_eq!(pair.a.handshake_hash(), pair.b.handshake_hash(), "{p:?} {s:?} {m:?}");
        let got: Vec<_> = pair.b_messages().into_iter().map(|x| x.2).collect();
        assert_eq!(got, vec![b"before".to_vec(), b"during".to_vec(), b"after".to_vec()], "{p:?} {s:?} {m:?}");
        assert_eq!(pair.a_messages().len(), 1);
        assert!(pair.a_events.iter().any(|e| matches!(e, Event::Rehandshaked { .. })));
        assert!(pair.b_events.iter().any(|e| matches!(e, Event::Rehandshaked { .. })));
        assert!(
            pair.a_errors.is_empty() && pair.b_errors.is_empty(),
            "{p:?} {s:?} {m:?} {:?} {:?}",
            pair.a_errors,
            pair.b_errors
        );
    }
}

#[test]
fn timers_drive_keepalive_rekey_and_rehandshake() {
    let mut pair = Pair::new(Pattern::IK, Suite::ChaChaPolyBlake2s, Mode::Datagram);
    pair.drive();
    // Three hours with a message every 10 s: keepalives, rekeys and re-handshakes happen,
    // the session never idles out and never expires.
    for i in 0..1_080u64 {
        pair.a.send(1, Bytes::from(i.to_be_bytes().to_vec())).unwrap();
        pair.advance(Duration::from_secs(10));
        assert!(pair.connected(), "at step {i}: {:?}", pair.a_events.last());
    }
    assert_eq!(pair.b_messages().len(), 1_080);
    assert!(pair.a.stats().rehandshakes >= 2, "{:?}", pair.a.stats());
    assert!(pair.a.stats().rekeys > 0 || pair.b.stats().rekeys > 0);
}
