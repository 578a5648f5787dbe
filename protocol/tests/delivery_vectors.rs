//! `spec/vectors/delivery.json` (spec §17.11):
//!
//! - each delivery message's encoding is rebuilt from the spec's layout (§9.2, §17.2, §17.3,
//!   §17.6: kind, postcard varints, the stream id's 8 raw bytes, the ranges as a counted
//!   sequence of pairs) and decodes back to its fields;
//! - the scripted exchange is replayed through a fresh outbox and inbox: every message each side
//!   emits (rebuilt from the layout too), every outcome, delivery, expiry and window size must be
//!   the recorded one;
//! - the malformed delivery messages of `malformed.json` are present (`vectors.rs` checks every
//!   malformed case's error).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use bytes::Bytes;
use serde_json::Value;
use veil_protocol::delivery::{Ack, DeliveryConfig, DeliveryMessage, DeliveryOutput, Inbox, Outbox, StreamId};
use veil_protocol::message::Message;
use veil_protocol::{Duration, Mode, Timestamp};

fn load(name: &str) -> Value {
    let path = format!("{}/../spec/vectors/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_else(|| panic!("string field `{key}` in {v}"))
}

fn n(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("integer field `{key}` in {v}"))
}

fn bytes(v: &Value, key: &str) -> Vec<u8> {
    hex::decode(s(v, key)).unwrap_or_else(|e| panic!("hex field `{key}`: {e}"))
}

fn list<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v[key].as_array().map_or(&[], Vec::as_slice)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn pairs(m: &Value) -> Vec<(u64, u64)> {
    list(m, "ranges").iter().map(|p| (p[0].as_u64().unwrap(), p[1].as_u64().unwrap())).collect()
}

/// spec §9.2, §17: a delivery message (or Data) from its fields, by the spec's layout.
fn spec_encoding(m: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    match s(m, "kind") {
        "Ack" => {
            out.push(0x02);
            varint(n(m, "channel"), &mut out);
            varint(n(m, "next"), &mut out);
            let p = pairs(m);
            varint(p.len() as u64, &mut out);
            for (skip, count) in p {
                varint(skip, &mut out);
                varint(count, &mut out);
            }
        }
        "Stream" => {
            out.push(0x0f);
            let id = bytes(m, "stream");
            assert_eq!(id.len(), 8);
            out.extend_from_slice(&id);
        }
        "Skip" => {
            out.push(0x10);
            varint(n(m, "channel"), &mut out);
            varint(n(m, "next"), &mut out);
        }
        "Stored" => {
            out.push(0x11);
            varint(n(m, "route"), &mut out);
            out.push(u8::try_from(n(m, "generation")).unwrap());
            varint(n(m, "first"), &mut out);
            varint(n(m, "count"), &mut out);
        }
        "Data" => {
            out.push(0x01);
            varint(n(m, "channel"), &mut out);
            varint(n(m, "id"), &mut out);
            let p = bytes(m, "payload");
            varint(p.len() as u64, &mut out);
            out.extend_from_slice(&p);
        }
        k => panic!("kind {k}"),
    }
    out
}

/// The message a JSON object describes, decoded through the implementation.
fn decoded(m: &Value) -> Message<'static> {
    let enc: &'static [u8] = Box::leak(bytes(m, "encoding").into_boxed_slice());
    let (msg, rest) = Message::decode(enc).unwrap();
    assert!(rest.is_empty(), "{m}");
    msg
}

#[test]
fn delivery_messages_are_encoded_as_the_spec_lays_them_out() {
    let file = load("delivery.json");
    let messages = list(&file, "messages");
    let mut kinds = std::collections::BTreeMap::new();
    for m in messages {
        assert_eq!(hex::encode(spec_encoding(m)), s(m, "encoding"), "{m}");
        let channel = || u16::try_from(n(m, "channel")).unwrap();
        let expected = match s(m, "kind") {
            "Ack" => Message::Ack(Ack::new(channel(), n(m, "next"), &pairs(m)).unwrap()),
            "Stream" => Message::Stream { stream: bytes(m, "stream").try_into().unwrap() },
            "Stored" => {
                let u32_of = |k| u32::try_from(n(m, k)).unwrap();
                Message::Stored {
                    route: u32_of("route"),
                    generation: u8::try_from(n(m, "generation")).unwrap(),
                    first: u32_of("first"),
                    count: u32_of("count"),
                }
            }
            _ => Message::Skip { channel: channel(), next: n(m, "next") },
        };
        assert_eq!(decoded(m), expected, "{m}");
        *kinds.entry(s(m, "kind")).or_insert(0) += 1;
    }
    assert_eq!(kinds.len(), 4, "every delivery message has a vector");
    // spec §17.11: Acks without ranges, with one and with 16.
    let ranges: Vec<usize> = messages.iter().filter(|m| s(m, "kind") == "Ack").map(|m| pairs(m).len()).collect();
    assert_eq!(ranges, [0, 1, 16]);
}

fn output_json_matches(o: &DeliveryOutput, m: &Value) {
    let enc = bytes(m, "encoding");
    assert_eq!(enc, spec_encoding(m), "{m}");
    let msg = match o {
        DeliveryOutput::Message(d) => d.message(),
        DeliveryOutput::Data { channel, id, payload } => {
            let mut buf = vec![0u8; 4 + 10 + 3 + payload.len()];
            let k = Message::Data { channel: *channel, id: *id, payload }.encode(&mut buf).unwrap();
            assert_eq!(buf[..k], enc[..], "{m}");
            return;
        }
    };
    let mut buf = vec![0u8; msg.encoded_len()];
    msg.encode(&mut buf).unwrap();
    assert_eq!(buf, enc, "{m}");
}

#[test]
fn the_scripted_exchange_replays_through_the_implementation() {
    let file = load("delivery.json");
    let ex = &file["exchange"];
    let c = &ex["config"];
    let config = DeliveryConfig {
        window_messages: n(c, "window_messages") as usize,
        window_bytes: n(c, "window_bytes") as usize,
        max_channels: n(c, "max_channels") as usize,
        reorder_bytes: n(c, "reorder_bytes") as usize,
        rto: Duration::from_micros(n(c, "rto_us")),
        rto_max: Duration::from_micros(n(c, "rto_max_us")),
        ack_delay: Duration::from_micros(n(c, "ack_delay_us")),
        ack_every: n(c, "ack_every"),
        ack_every_bytes: n(c, "ack_every_bytes") as usize,
        custody_probe: Duration::from_micros(n(c, "custody_probe_us")),
    };
    assert_eq!(config, DeliveryConfig::default(), "spec §17.11: the default configuration");
    let stream: StreamId = bytes(ex, "stream").try_into().unwrap();
    let mut out = Outbox::new(config, stream).unwrap();
    let mut inbox = Inbox::new(config).unwrap();
    let mut mode = Mode::Stream;
    let mut actions = std::collections::BTreeSet::new();
    let steps = list(ex, "steps");
    for (k, st) in steps.iter().enumerate() {
        assert_eq!(n(st, "step"), k as u64 + 1);
        let now = Timestamp::from_micros(n(st, "time_us"));
        let deliver: Vec<usize> = list(st, "deliver").iter().map(|i| i.as_u64().unwrap() as usize).collect();
        let mut outcomes = Vec::new();
        let mut delivered = Vec::new();
        let action = s(st, "action");
        actions.insert(action);
        match action {
            "connect" => {
                mode = match s(st, "mode") {
                    "stream" => Mode::Stream,
                    "datagram" => Mode::Datagram,
                    _ => Mode::Routed,
                };
                out.on_connected(mode, now);
                inbox.on_connected();
            }
            "push" => {
                let ttl = st.get("ttl_us").map(|t| Duration::from_micros(t.as_u64().unwrap()));
                let id =
                    out.push(u16::try_from(n(st, "channel")).unwrap(), Bytes::from(bytes(st, "payload")), now, ttl);
                assert_eq!(id, Ok(n(st, "id")), "step {}", k + 1);
            }
            "transmit" => {
                let sent: Vec<DeliveryOutput> = std::iter::from_fn(|| out.poll_transmit(now, usize::MAX)).collect();
                let recorded = list(st, "sender");
                assert_eq!(sent.len(), recorded.len(), "step {}: {sent:?}", k + 1);
                for (o, m) in sent.iter().zip(recorded) {
                    output_json_matches(o, m);
                }
                for &i in &deliver {
                    outcomes.push(match sent[i].clone() {
                        DeliveryOutput::Message(DeliveryMessage::Stream { stream }) => {
                            if inbox.on_stream(stream, now) { "StartedOver" } else { "Same" }.to_owned()
                        }
                        DeliveryOutput::Message(DeliveryMessage::Skip { channel, next }) => {
                            if inbox.on_skip(channel, next, now) { "Moved" } else { "Unchanged" }.to_owned()
                        }
                        DeliveryOutput::Data { channel, id, payload } => {
                            format!("{:?}", inbox.on_data(channel, id, payload, mode, now).unwrap())
                        }
                        other => panic!("{other:?}"),
                    });
                }
                while let Some((channel, id, payload)) = inbox.poll_deliver() {
                    delivered.push((u64::from(channel), id, hex::encode(payload)));
                }
            }
            "commit" => inbox.commit_delivered(now),
            "acks" => {
                let acks: Vec<Ack> = std::iter::from_fn(|| inbox.poll_ack(now)).collect();
                let recorded = list(st, "receiver");
                assert_eq!(acks.len(), recorded.len(), "step {}: {acks:?}", k + 1);
                for (a, m) in acks.iter().zip(recorded) {
                    output_json_matches(&DeliveryOutput::Message(DeliveryMessage::Ack(*a)), m);
                }
                for &i in &deliver {
                    outcomes.push(format!("Freed({})", out.on_ack(&acks[i], now).unwrap()));
                }
            }
            "custody" => {
                let channel = u16::try_from(n(st, "channel")).unwrap();
                let first = n(st, "id");
                let held = out.on_custody(channel, first..first + n(st, "count"), now);
                assert_eq!(held as u64, n(st, "held"), "step {}", k + 1);
            }
            "transient" => {
                assert_eq!(out.on_transient_drop(now) as u64, n(st, "count"), "step {}", k + 1);
            }
            "expire" => {
                let expired: Vec<(u64, u64, bool)> =
                    out.expire(now).into_iter().map(|e| (u64::from(e.channel), e.id, e.unconfirmed)).collect();
                let recorded: Vec<(u64, u64, bool)> = list(st, "expired")
                    .iter()
                    .map(|e| (n(e, "channel"), n(e, "id"), e["unconfirmed"].as_bool().unwrap()))
                    .collect();
                assert_eq!(expired, recorded, "step {}", k + 1);
            }
            a => panic!("action {a}"),
        }
        let recorded: Vec<String> = list(st, "outcomes").iter().map(|o| o.as_str().unwrap().to_owned()).collect();
        assert_eq!(outcomes, recorded, "step {}", k + 1);
        let recorded: Vec<(u64, u64, String)> =
            list(st, "delivered").iter().map(|d| (n(d, "channel"), n(d, "id"), s(d, "payload").to_owned())).collect();
        assert_eq!(delivered, recorded, "step {}", k + 1);
        assert_eq!(out.window_len() as u64, n(st, "window"), "step {}", k + 1);
    }
    // spec §17.11: what the script covers.
    assert_eq!(actions.len(), 8, "{actions:?}");
    let all_outcomes: Vec<&str> =
        steps.iter().flat_map(|st| list(st, "outcomes")).map(|o| o.as_str().unwrap()).collect();
    for want in ["Buffered", "Duplicate", "Moved", "StartedOver"] {
        assert!(all_outcomes.contains(&want), "{want}");
    }
    let kinds: Vec<&str> = steps.iter().flat_map(|st| list(st, "sender")).map(|m| s(m, "kind")).collect();
    assert!(kinds.contains(&"Skip") && kinds.contains(&"Stream"));
    // spec §17.9: a transmit step in which the sender emits only a Stream (an acknowledgement
    // request for a message in custody), answered by an Ack that frees it.
    let request = steps
        .iter()
        .position(|st| s(st, "action") == "transmit" && list(st, "sender").iter().map(|m| s(m, "kind")).eq(["Stream"]));
    let request = request.expect("an acknowledgement request");
    assert!(steps[..request].iter().any(|st| s(st, "action") == "custody" && n(st, "held") > 0));
    let answer = &steps[request + 1];
    assert!(list(answer, "outcomes").iter().any(|o| o.as_str() == Some("Freed(1)")), "{answer}");
    assert_eq!(n(steps.last().unwrap(), "window"), 0, "everything acknowledged in the end");
}

#[test]
fn malformed_delivery_messages_are_in_malformed_json() {
    let file = load("malformed.json");
    let cases: Vec<&Value> = list(&file, "vectors").iter().filter(|c| s(c, "function") == "Message::decode").collect();
    for kind in ["02", "0f", "10", "11"] {
        let malformed = cases.iter().filter(|c| s(c, "input").starts_with(kind) && s(c, "error") == "MalformedMessage");
        assert!(malformed.count() >= 2, "kind {kind}");
    }
    for what in [
        "Stored generation 2",
        "Stored first = 2^24",
        "Stored count 0",
        "skip 0",
        "count 0",
        "17 range pairs",
        "overflows",
        "beyond the receive window",
        "Stream id cut short",
    ] {
        assert!(cases.iter().any(|c| s(c, "description").contains(what)), "{what}");
    }
}
