//! UDP under a handshake flood (spec §5.7.4): spoofed-looking INITs that never answer a
//! cookie, attackers that do answer and then abandon their handshakes (real Diffie-Hellman
//! work for the endpoint), and genuine clients connecting at the same time.
//!
//! This file is its own test binary: a process-wide counting allocator measures the heap, and
//! its two tests run one after the other (a static lock) so that each sees only its own work.
//! Run with `--nocapture` to see the figures.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
// The counting allocator needs `unsafe impl GlobalAlloc`; see its SAFETY comments.
#![allow(unsafe_code)]

mod util;

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use tokio::net::UdpSocket;
use tokio::task::JoinSet;
use util::*;
use veil_protocol::wire::{self, COOKIE_REPLY_LEN};
use veil_protocol::{Config, Mode, Role, Timestamp};
use veil_transports::{Authorizer, Endpoint, EndpointLimits};

/// Forwards to [`System`] and keeps the bytes live in the whole process.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so
// `System`'s guarantees hold; the counter is a relaxed atomic that never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is (see the impl).
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is (see the impl).
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is (see the impl).
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded as is (see the impl).
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live_heap() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// The tests of this binary run one at a time: the heap figures are process-wide.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn loopback(last: u8) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)), 0)
}

/// A datagram IK INIT header with `index` and 100 bytes of noise: the size of a real IK INIT,
/// but nobody holds its keys (a spoofed or garbage first message).
fn bogus_init(rng: &mut ChaCha20Rng, index: u32) -> Vec<u8> {
    let mut p = vec![wire::TYPE_HANDSHAKE_INIT, 1, 0x11];
    p.extend_from_slice(&index.to_be_bytes());
    let mut body = [0u8; 100];
    rng.fill_bytes(&mut body);
    p.extend_from_slice(&body);
    p
}

/// Polls `f` every 10 ms until it holds, at most `max` times.
async fn wait_for(max: usize, mut f: impl FnMut() -> bool) -> bool {
    for _ in 0..max {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    f()
}

/// Memory per unauthenticated peer (spec §5.7.4, §13.1): zero for an INIT that is answered
/// with a cookie; one pending handshake for a peer that proved its address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_per_unauthenticated_peer_is_zero_and_a_pending_handshake_is_bounded() {
    let _serial = SERIAL.lock().await;
    init_tracing();
    let mut rng = ChaCha20Rng::seed_from_u64(11);

    // An endpoint that demands a cookie from everyone: spoofed INITs cost it nothing.
    let mut limits = open_limits();
    limits.require_cookie = true;
    let server = server_builder(keypair(1), &[]).limits(limits).bind().await.unwrap();
    let addr = server.local_udp_addr().unwrap();
    let flooders: Vec<UdpSocket> = bind_on(&[10, 11, 12, 13]).await;
    const WARM: usize = 200;
    const N: usize = 4_000;
    let inits: Vec<Vec<u8>> = (0..WARM + N).map(|i| bogus_init(&mut rng, i as u32)).collect();
    let send = |range: std::ops::Range<usize>| {
        let (inits, flooders) = (&inits, &flooders);
        async move {
            for i in range {
                flooders[i % flooders.len()].send_to(&inits[i], addr).await.unwrap();
                if i % 100 == 99 {
                    // Paced so that the endpoint's socket buffer never overflows.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        }
    };
    // Warm-up: whatever the socket task allocates once (buffers, the tables) is allocated now.
    send(0..WARM).await;
    assert!(wait_for(500, || server.stats().cookies_sent as usize >= WARM).await, "{:?}", server.stats());
    let before = live_heap();
    send(WARM..WARM + N).await;
    let all = wait_for(500, || server.stats().cookies_sent as usize >= WARM + N).await;
    let grown = live_heap() - before;
    let stats = server.stats();
    println!(
        "stateless: {N} spoofed INITs answered with {} COOKIE_REPLYs; heap {grown:+} B ({:.3} B per INIT)",
        stats.cookies_sent as usize - WARM,
        grown as f64 / N as f64
    );
    assert!(all, "not every INIT was answered: {stats:?}");
    assert_eq!((stats.handshakes, stats.connections, stats.handshake_failures), (0, 0, 0), "{stats:?}");
    // Nothing per peer: the heap does not grow with the number of INITs (a few KiB of noise
    // from the runtime at most, not N × anything).
    assert!(grown < 16 * 1024, "heap grew by {grown} B over {N} spoofed INITs");
    // Every reply was smaller than the INIT that caused it.
    let mut buf = [0u8; 64];
    let (n, _) = within(flooders[0].recv_from(&mut buf)).await.unwrap();
    assert_eq!((n, buf[0]), (COOKIE_REPLY_LEN, wire::TYPE_COOKIE_REPLY));
    assert!(n < inits[0].len());
    server.close();
    drop(server);

    // An endpoint without cookies and without rate limits: each genuine INIT becomes a pending
    // handshake (the responder answered RESP and waits for the confirmation that never comes).
    const K: usize = 64;
    let mut limits = open_limits();
    limits.cookie_threshold = usize::MAX;
    let server = Endpoint::builder(keypair(1))
        .authorizer(Authorizer::allow_all())
        .limits(limits)
        .bind_udp(localhost())
        .bind()
        .await
        .unwrap();
    let addr = server.local_udp_addr().unwrap();
    let key = server.public_key();
    let client_cfg = Arc::new(Config::new(keypair(2), Mode::Datagram));
    let mut out = vec![0u8; 2_048];
    let genuine: Vec<Vec<u8>> = (0..K + 4)
        .map(|_| {
            let mut c = veil_protocol::Connection::new(
                Arc::clone(&client_cfg),
                Role::Initiator,
                Some(key),
                Timestamp::ZERO,
                &mut rng,
            )
            .unwrap();
            let n = c.poll_transmit(Timestamp::ZERO, &mut out).unwrap().unwrap();
            out[..n].to_vec()
        })
        .collect();
    let raw = UdpSocket::bind(localhost()).await.unwrap();
    let mut resp = [0u8; 256];
    // Warm-up with four handshakes (first-use allocations of the runtime and the table).
    for p in &genuine[K..] {
        raw.send_to(p, addr).await.unwrap();
        within(raw.recv_from(&mut resp)).await.unwrap();
    }
    let before = live_heap();
    for p in &genuine[..K] {
        raw.send_to(p, addr).await.unwrap();
        let (n, _) = within(raw.recv_from(&mut resp)).await.unwrap();
        assert_eq!(resp[0], wire::TYPE_HANDSHAKE_RESP, "{:?}", &resp[..n]);
    }
    assert!(wait_for(100, || server.stats().handshakes == K + 4).await, "{:?}", server.stats());
    let per_pending = (live_heap() - before) / K as isize;
    println!("pending handshake (transports responder after RESP, heap): {per_pending} B per peer");
    assert!(per_pending > 0 && per_pending < 32 * 1024, "{per_pending} B per pending handshake");
    server.close();
}

/// Binds one UDP socket on each 127.0.0.`last`.
async fn bind_on(lasts: &[u8]) -> Vec<UdpSocket> {
    let mut v = Vec::new();
    for &l in lasts {
        v.push(UdpSocket::bind(loopback(l)).await.unwrap());
    }
    v
}

/// Spoofed-looking INITs per second, and for how long.
const FLOOD_RATE: usize = 10_000;
const FLOOD_TICKS: usize = 300;
const FLOOD_TICK: Duration = Duration::from_millis(10);
/// Source addresses of the flood (127.0.0.10…).
const FLOOD_ADDRS: u8 = 8;
/// Attackers that answer cookies and abandon their handshakes: addresses, INITs per second each.
const ATTACK_ADDRS: u8 = 2;
const ATTACK_RATE: usize = 100;
/// Genuine clients, started during the flood from 16 addresses (127.0.0.100…).
const GENUINE: usize = 80;
const GENUINE_ADDRS: usize = 16;

/// A handshake flood of 10 000 bogus INITs per second for 3 s from 8 addresses, plus 2
/// addresses whose INITs answer the cookie and then abandon the handshake, while 80 genuine
/// clients connect: at least 95 % of them succeed, the handshakes in progress never exceed
/// `max_handshakes`, and the flood makes the endpoint do (almost) no Diffie-Hellman work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn genuine_clients_connect_through_a_handshake_flood() {
    let _serial = SERIAL.lock().await;
    init_tracing();
    let mut limits = EndpointLimits::default();
    limits.max_handshakes = 256;
    limits.cookie_threshold = 32;
    limits.handshake_rate_per_ip = 10.0;
    limits.handshake_burst_per_ip = 20;
    let server = Endpoint::builder(keypair(1))
        .authorizer(Authorizer::allow_all())
        .limits(limits.clone())
        // Abandoned handshakes hold their slot for this long.
        .handshake_timeout(Duration::from_secs(2))
        .bind_udp(localhost())
        .bind()
        .await
        .unwrap();
    let addr = server.local_udp_addr().unwrap();
    let key = server.public_key();
    let heap_before = live_heap();
    let started = tokio::time::Instant::now();

    // The application: accepts everything (only genuine clients ever complete).
    let accepted = Arc::new(AtomicUsize::new(0));
    let acceptor = {
        let (server, accepted) = (server.clone(), Arc::clone(&accepted));
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok(c) = server.accept().await {
                accepted.fetch_add(1, Ordering::Relaxed);
                held.push(c);
            }
        })
    };

    // Stats sampled every 5 ms while anything runs.
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (server, done) = (server.clone(), Arc::clone(&done));
        tokio::spawn(async move {
            let (mut max_handshakes, mut max_heap, mut samples) = (0, 0isize, 0usize);
            // Bounded: 4 000 samples of 5 ms are 20 s.
            for _ in 0..4_000 {
                if done.load(Ordering::Relaxed) {
                    break;
                }
                max_handshakes = max_handshakes.max(server.stats().handshakes);
                max_heap = max_heap.max(live_heap());
                samples += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (max_handshakes, max_heap, samples)
        })
    };

    // The flood: bogus INITs that never answer, 100 per 10 ms tick.
    let flood = tokio::spawn(async move {
        let socks = bind_on(&(10..10 + FLOOD_ADDRS).collect::<Vec<_>>()).await;
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let per_tick = FLOOD_RATE * FLOOD_TICK.as_millis() as usize / 1_000;
        let mut tick = tokio::time::interval(FLOOD_TICK);
        let mut sent = 0usize;
        for t in 0..FLOOD_TICKS {
            tick.tick().await;
            for j in 0..per_tick {
                let p = bogus_init(&mut rng, (t * per_tick + j) as u32);
                if socks[j % socks.len()].try_send_to(&p, addr).is_ok() {
                    sent += 1;
                }
            }
        }
        sent
    });

    // Attackers that answer cookies (their address is real) and never finish a handshake.
    let mut attacks = JoinSet::new();
    for a in 0..ATTACK_ADDRS {
        attacks.spawn(async move {
            let sock = UdpSocket::bind(loopback(20 + a)).await.unwrap();
            let cfg = Arc::new(Config::new(keypair(50 + u64::from(a)), Mode::Datagram));
            let mut rng = ChaCha20Rng::seed_from_u64(100 + u64::from(a));
            let mut pending: HashMap<u32, veil_protocol::Connection> = HashMap::new();
            let (mut out, mut buf) = (vec![0u8; 2_048], vec![0u8; 2_048]);
            let (mut inits, mut answered) = (0usize, 0usize);
            let mut tick = tokio::time::interval(Duration::from_millis(1_000 / ATTACK_RATE as u64));
            let now = Timestamp::ZERO;
            let total = ATTACK_RATE * FLOOD_TICKS * FLOOD_TICK.as_millis() as usize / 1_000;
            while inits < total {
                tokio::select! {
                    _ = tick.tick() => {
                        let mut c = veil_protocol::Connection::new(Arc::clone(&cfg), Role::Initiator, Some(key), now, &mut rng).unwrap();
                        let n = c.poll_transmit(now, &mut out).unwrap().unwrap();
                        let _ = sock.try_send_to(&out[..n], addr);
                        pending.insert(c.local_index(), c);
                        inits += 1;
                    }
                    r = sock.recv_from(&mut buf) => {
                        let (n, _) = r.unwrap();
                        let Some(i) = wire::datagram_receiver_index(&buf[..n]) else { continue };
                        if buf[0] != wire::TYPE_COOKIE_REPLY {
                            // RESP (or REJECT): the handshake is abandoned here.
                            pending.remove(&i);
                            continue;
                        }
                        if let Some(c) = pending.get_mut(&i) {
                            if c.handle_input(now, &buf[..n]).is_ok() {
                                while let Ok(Some(m)) = c.poll_transmit(now, &mut out) {
                                    let _ = sock.try_send_to(&out[..m], addr);
                                    answered += 1;
                                }
                            }
                        }
                    }
                }
            }
            (inits, answered)
        });
    }

    // Genuine clients, one every 35 ms during the flood, each from its own endpoint.
    let mut genuine = JoinSet::new();
    for i in 0..GENUINE {
        genuine.spawn(async move {
            tokio::time::sleep(Duration::from_millis(35 * i as u64)).await;
            let last = 100 + (i % GENUINE_ADDRS) as u8;
            let client = Endpoint::builder(keypair(1_000 + i as u64))
                .limits(open_limits())
                .bind_udp(loopback(last))
                .bind()
                .await
                .unwrap();
            match tokio::time::timeout(STEP, client.connect_udp(addr, Some(key))).await {
                // Kept open to the end: its confirmation is repeated until the server answers.
                Ok(Ok(c)) => Some((client, c)),
                r => {
                    println!("genuine client {i} failed: {r:?}");
                    None
                }
            }
        });
    }
    let mut connected = Vec::new();
    while let Some(r) = genuine.join_next().await {
        connected.extend(r.unwrap());
    }
    let ok = connected.len();
    let bogus = flood.await.unwrap();
    let (mut attack_inits, mut attack_answers) = (0, 0);
    while let Some(r) = attacks.join_next().await {
        let (i, a) = r.unwrap();
        attack_inits += i;
        attack_answers += a;
    }
    // The abandoned handshakes end at the endpoint's handshake timeout.
    assert!(wait_for(1_000, || server.stats().handshakes == 0).await, "{:?}", server.stats());
    done.store(true, Ordering::Relaxed);
    let (max_handshakes, max_heap, samples) = sampler.await.unwrap();
    let elapsed = started.elapsed();
    let stats = server.stats();
    // Every responder connection ends accepted or failed: that is the handshakes the endpoint
    // started, i.e. the Diffie-Hellman work it did.
    let started_handshakes = stats.accepted as usize + stats.handshake_failures as usize;
    println!(
        "flood: {bogus} bogus INITs, {attack_inits} attacker INITs ({attack_answers} cookie answers), {ok}/{GENUINE} \
         genuine clients connected in {elapsed:?}"
    );
    println!("server: {stats:?}");
    println!(
        "handshakes in progress: max {max_handshakes} (limit {}, cookie threshold {}) over {samples} samples; \
         handshakes started {started_handshakes} for {} INITs; heap peak {:+} B",
        limits.max_handshakes,
        limits.cookie_threshold,
        bogus + attack_inits + GENUINE,
        max_heap - heap_before
    );

    assert!(ok * 100 >= GENUINE * 95, "only {ok} of {GENUINE} genuine clients connected");
    assert_eq!(accepted.load(Ordering::Relaxed), ok, "every connected client was accepted, nobody else");
    assert!(max_handshakes <= limits.max_handshakes, "{max_handshakes} handshakes in progress");
    assert!(samples > 10);
    assert!(bogus >= FLOOD_RATE * 3 * 9 / 10, "the flood sent only {bogus} INITs");
    // The cookie challenge answered the flood; only a bounded share reached a handshake: per
    // address, the upper half of its bucket plus its refill while the endpoint was not loaded.
    assert!(stats.cookies_sent as usize >= bogus / 2, "{stats:?}");
    let secs = elapsed.as_secs_f64().ceil() as usize + 1;
    let per_addr = limits.handshake_burst_per_ip as usize + limits.handshake_rate_per_ip as usize * secs;
    let bound = ok + (usize::from(FLOOD_ADDRS) + usize::from(ATTACK_ADDRS)) * per_addr;
    assert!(started_handshakes <= bound, "{started_handshakes} handshakes started (bound {bound})");
    assert!(started_handshakes * 20 < bogus, "the flood cost {started_handshakes} handshakes");
    // Bounded memory: far below what one pending handshake per bogus INIT would take.
    assert!(max_heap - heap_before < 64 << 20, "heap peak {:+} B", max_heap - heap_before);
    server.close();
    acceptor.await.unwrap();
}
