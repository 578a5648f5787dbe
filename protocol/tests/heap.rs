//! Heap held by established connections, measured with a counting global allocator.
//!
//! This file is its own test binary so that the `#[global_allocator]` affects nothing else.
//! Counting is per thread (the test harness runs tests on several threads), so each figure
//! covers exactly the work of the test that measured it and is deterministic.
//!
//! Method: build `N` connected pairs that share one `Arc<Config>` per side (a config belongs to
//! an endpoint, not to a connection), let them go idle, and divide the live heap by `N`; then
//! drop the initiators to split the figure per side. Run with `--nocapture` to see the figures
//! (`--features ring` for the ring AEAD).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
// The counting allocator needs `unsafe impl GlobalAlloc`; see its SAFETY comment.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{Cell, RefCell};
use std::sync::Arc;

use bytes::Bytes;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use veil_protocol::replay::ReplayWindow;
use veil_protocol::{
    Config, Connection, Decision, Duration, Event, Mode, Pattern, Psk, Role, Session, StaticKeypair, Suite, Timestamp,
};

/// Connected pairs per measurement.
const N: usize = 100;
/// Pairs for the after-traffic figure (each runs a re-handshake: kept small for debug builds).
const N_TRAFFIC: usize = 10;
/// Live allocations the tracer can follow at once (one connection has a handful).
const TRACE_SLOTS: usize = 256;

/// Forwards to [`System`] and counts, per thread, the bytes live and their peak.
struct Counting;

/// Live allocations of the traced window: (address, size); address 0 marks a free slot.
struct Trace {
    on: bool,
    overflow: bool,
    slots: [(usize, usize); TRACE_SLOTS],
}

thread_local! {
    // `const` initialisers without destructors: reading these never allocates, which an
    // allocator must not do.
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
    static TRACE: RefCell<Trace> =
        const { RefCell::new(Trace { on: false, overflow: false, slots: [(0, 0); TRACE_SLOTS] }) };
}

fn on_alloc(ptr: *mut u8, size: usize) {
    if ptr.is_null() {
        return;
    }
    let _ = LIVE.try_with(|l| {
        let v = l.get() + size as isize;
        l.set(v);
        let _ = PEAK.try_with(|p| p.set(p.get().max(v)));
    });
    let _ = TRACE.try_with(|t| {
        if let Ok(mut t) = t.try_borrow_mut() {
            if t.on {
                match t.slots.iter_mut().find(|s| s.0 == 0) {
                    Some(s) => *s = (ptr as usize, size),
                    None => t.overflow = true,
                }
            }
        }
    });
}

fn on_dealloc(ptr: *mut u8, size: usize) {
    let _ = LIVE.try_with(|l| l.set(l.get() - size as isize));
    let _ = TRACE.try_with(|t| {
        if let Ok(mut t) = t.try_borrow_mut() {
            if let Some(s) = t.slots.iter_mut().find(|s| s.0 == ptr as usize) {
                *s = (0, 0);
            }
        }
    });
}

// SAFETY: every call is forwarded unchanged to `System`, which upholds the `GlobalAlloc`
// contract; the bookkeeping around it only touches const-initialised thread-locals without
// destructors (no allocation, no reentrancy) and ignores them while the thread is torn down.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as ours.
        let p = unsafe { System.alloc(layout) };
        on_alloc(p, layout.size());
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as ours.
        let p = unsafe { System.alloc_zeroed(layout) };
        on_alloc(p, layout.size());
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        on_dealloc(ptr, layout.size());
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as ours.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            on_dealloc(ptr, layout.size());
            on_alloc(p, new_size);
        }
        p
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Bytes currently live on this thread.
fn live() -> isize {
    LIVE.with(Cell::get)
}

/// Restarts peak tracking from the current live figure.
fn reset_peak() {
    PEAK.with(|p| p.set(live()));
}

fn peak() -> isize {
    PEAK.with(Cell::get)
}

fn trace_start() {
    TRACE.with(|t| {
        let mut t = t.borrow_mut();
        t.slots = [(0, 0); TRACE_SLOTS];
        t.overflow = false;
        t.on = true;
    });
}

/// Sizes of the allocations made since [`trace_start`] that are still live, largest first.
fn trace_stop() -> Vec<usize> {
    let (slots, overflow) = TRACE.with(|t| {
        let mut t = t.borrow_mut();
        t.on = false;
        (t.slots, t.overflow)
    });
    assert!(!overflow, "trace table full");
    let mut sizes: Vec<usize> = slots.iter().filter(|s| s.0 != 0).map(|s| s.1).collect();
    sizes.sort_unstable_by(|a, b| b.cmp(a));
    sizes
}

struct Endpoints {
    initiator: Arc<Config>,
    responder: Arc<Config>,
    responder_key: veil_protocol::PublicKey,
    initiator_key: veil_protocol::PublicKey,
    pattern: Pattern,
}

fn endpoints(pattern: Pattern, suite: Suite, mode: Mode) -> Endpoints {
    let a = StaticKeypair::from_secret_bytes([1; 32]);
    let b = StaticKeypair::from_secret_bytes([2; 32]);
    let (initiator_key, responder_key) = (*a.public(), *b.public());
    let psk = matches!(pattern, Pattern::IKpsk2 | Pattern::XXpsk3).then(|| Psk::new([0x42; 32]));
    let mut ca = Config::new(a, mode);
    ca.pattern = pattern;
    ca.suite = suite;
    ca.psk = psk.clone();
    let mut cb = Config::new(b, mode);
    cb.psk = psk;
    Endpoints { initiator: Arc::new(ca), responder: Arc::new(cb), responder_key, initiator_key, pattern }
}

fn drain_events(c: &mut Connection, now: Timestamp) {
    while let Some(e) = c.poll_event() {
        if let Event::AuthorizationRequired { .. } = e {
            c.authorize(now, Decision::allow()).unwrap();
        }
    }
}

/// Runs one handshake to completion (both sides confirmed) and leaves both idle.
fn connect(ep: &Endpoints, now: Timestamp, rng: &mut ChaCha20Rng, buf: &mut [u8]) -> (Connection, Connection) {
    let a_remote = ep.pattern.initiator_knows_responder().then_some(ep.responder_key);
    let b_remote = ep.pattern.responder_knows_initiator().then_some(ep.initiator_key);
    let mut a = Connection::new(Arc::clone(&ep.initiator), Role::Initiator, a_remote, now, rng).unwrap();
    let mut b = Connection::new(Arc::clone(&ep.responder), Role::Responder, b_remote, now, rng).unwrap();
    exchange(&mut a, &mut b, now, buf);
    assert!(a.is_connected() && b.is_connected());
    (a, b)
}

/// Moves packets both ways, answering authorization requests, until nothing moves.
fn exchange(a: &mut Connection, b: &mut Connection, now: Timestamp, buf: &mut [u8]) {
    for _ in 0..20 {
        let mut moved = false;
        while let Some(n) = a.poll_transmit(now, buf).unwrap() {
            b.handle_input(now, &buf[..n]).unwrap();
            drain_events(b, now);
            moved = true;
        }
        while let Some(n) = b.poll_transmit(now, buf).unwrap() {
            a.handle_input(now, &buf[..n]).unwrap();
            drain_events(a, now);
            moved = true;
        }
        drain_events(a, now);
        drain_events(b, now);
        if !moved {
            return;
        }
    }
    panic!("pair did not settle");
}

/// Heap figures for one pattern × suite × mode, per connection side.
#[derive(Debug)]
struct Figures {
    initiator: usize,
    responder: usize,
    /// Both sides of one pair after `Connection::release_idle_memory`, and the initiator's part.
    released_pair: usize,
    initiator_released: usize,
    /// Live heap blocks of one initiator after its handshake, largest first.
    initiator_blocks: Vec<usize>,
    responder_blocks: Vec<usize>,
    /// Peak heap above the idle baseline while one pair handshakes (both sides, packets in flight).
    handshake_peak: usize,
    /// One initiator right after `Connection::new` (snow's HandshakeState, INIT queued).
    initiator_started: usize,
    started_blocks: Vec<usize>,
    /// One initiator after sending and receiving traffic, a re-handshake and the overlap.
    initiator_after_traffic: usize,
    responder_after_traffic: usize,
}

fn per(total: isize) -> usize {
    usize::try_from(total).unwrap() / N
}

fn measure(pattern: Pattern, suite: Suite, mode: Mode) -> Figures {
    let ep = endpoints(pattern, suite, mode);
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let mut buf = vec![0u8; 65_535];
    let mut now = Timestamp::from_millis(1_000);
    let mut initiators = Vec::with_capacity(N);
    let mut responders = Vec::with_capacity(N);

    // A first pair outside the count warms up anything lazily initialised.
    drop(connect(&ep, now, &mut rng, &mut buf));

    let base = live();
    for _ in 0..N {
        let (a, b) = connect(&ep, now, &mut rng, &mut buf);
        initiators.push(a);
        responders.push(b);
    }
    // Each side's figure as the handshake left it, then after `release_idle_memory`.
    let both = live() - base;
    initiators.iter_mut().for_each(Connection::release_idle_memory);
    let initiator_saved = per(both - (live() - base));
    let before = live();
    responders.iter_mut().for_each(Connection::release_idle_memory);
    let responder_saved = per(before - live());
    let released_pair = per(live() - base);
    initiators.clear();
    let responder_released = per(live() - base);
    let initiator = released_pair - responder_released + initiator_saved;
    let responder = responder_released + responder_saved;
    responders.clear();
    assert_eq!(live(), base, "dropping every connection frees everything they held");

    // What one established connection holds, block by block.
    trace_start();
    let (a, b) = connect(&ep, now, &mut rng, &mut buf);
    drop(b);
    let initiator_blocks = trace_stop();
    drop(a);
    trace_start();
    let (a, b) = connect(&ep, now, &mut rng, &mut buf);
    drop(a);
    let responder_blocks = trace_stop();
    drop(b);
    // The two block lists are the only new allocations.
    let lists = (initiator_blocks.capacity() + responder_blocks.capacity()) * size_of::<usize>();
    assert_eq!(live(), base + isize::try_from(lists).unwrap());
    let base = live();

    // Peak during one handshake, both sides together.
    reset_peak();
    let pair = connect(&ep, now, &mut rng, &mut buf);
    let handshake_peak = usize::try_from(peak() - base).unwrap();
    drop(pair);

    let a_remote = pattern.initiator_knows_responder().then_some(ep.responder_key);
    trace_start();
    let before = live();
    let started = Connection::new(Arc::clone(&ep.initiator), Role::Initiator, a_remote, now, &mut rng).unwrap();
    let initiator_started = usize::try_from(live() - before).unwrap();
    let started_blocks = trace_stop();
    drop(started);
    let list = started_blocks.capacity() * size_of::<usize>();
    assert_eq!(live(), base + isize::try_from(list).unwrap());
    let base = live();

    // After traffic both ways, a re-handshake, and the previous session's overlap: the
    // replaced session is gone; the working queues keep their capacity.
    for _ in 0..N_TRAFFIC {
        let (mut a, mut b) = connect(&ep, now, &mut rng, &mut buf);
        for i in 0..5u8 {
            a.send(1, Bytes::from(vec![i; 32])).unwrap();
        }
        a.ping(1).unwrap();
        b.send(2, Bytes::from_static(b"interval=30")).unwrap();
        exchange(&mut a, &mut b, now, &mut buf);
        a.start_rehandshake(now).unwrap();
        exchange(&mut a, &mut b, now, &mut buf);
        a.send(1, Bytes::from_static(b"after")).unwrap();
        b.send(2, Bytes::from_static(b"ack")).unwrap();
        exchange(&mut a, &mut b, now, &mut buf);
        initiators.push(a);
        responders.push(b);
    }
    now = now + veil_protocol::config::KEY_OVERLAP + Duration::from_secs(1);
    for c in initiators.iter_mut().chain(responders.iter_mut()) {
        c.handle_timeout(now);
        assert!(c.is_connected());
        assert_eq!(c.stats().rehandshakes, 1);
        while c.poll_transmit(now, &mut buf).unwrap().is_some() {}
        while c.poll_event().is_some() {}
    }
    let both = usize::try_from(live() - base).unwrap() / N_TRAFFIC;
    initiators.clear();
    let responder_after_traffic = usize::try_from(live() - base).unwrap() / N_TRAFFIC;
    let initiator_after_traffic = both - responder_after_traffic;
    responders.clear();
    assert_eq!(live(), base);

    Figures {
        initiator,
        responder,
        released_pair,
        initiator_released: released_pair - responder_released,
        initiator_blocks,
        responder_blocks,
        handshake_peak,
        initiator_started,
        started_blocks,
        initiator_after_traffic,
        responder_after_traffic,
    }
}

/// Heap a [`Session`] owns outside its own struct, whatever its use: its keys are raw 32-byte
/// keys inside the struct, so only the boxed replay window (datagram mode). AES-GCM adds an
/// expanded cipher for each direction used, until [`Connection::release_idle_memory`];
/// ChaCha20-Poly1305 expands per operation.
fn session_heap(mode: Mode) -> usize {
    if mode == Mode::Datagram {
        size_of::<ReplayWindow>()
    } else {
        0
    }
}

/// One expanded AES-256-GCM cipher as the session keeps it while busy.
fn expanded_aes_gcm() -> usize {
    #[cfg(feature = "ring")]
    {
        size_of::<ring::aead::LessSafeKey>()
    }
    #[cfg(not(feature = "ring"))]
    {
        size_of::<aes_gcm::Aes256Gcm>()
    }
}

fn aead_name() -> &'static str {
    if cfg!(feature = "ring") {
        "ring"
    } else {
        "RustCrypto"
    }
}

/// spec §13: an idle established connection costs little heap. The bound leaves room for
/// a few hundred bytes of growth but catches a retained handshake buffer, an inline spare
/// session or a kept handshake state (each ≥ 0.3 KiB), in every suite and with either AEAD
/// backend (RustCrypto AES-GCM keys are ~1 KiB per direction).
const STREAM_BOUND: usize = 4 * 1024;
/// Datagram mode: the same (was 1 KiB more for the replay bitmap, which now exists only while
/// counters arrive out of order).
const DATAGRAM_BOUND: usize = STREAM_BOUND;
/// The goal of ≤ 1 KiB per connection once snow's handshake state is gone: the default
/// suite (ChaChaPoly, keys held raw) in either mode and with either AEAD backend, and every
/// suite once `release_idle_memory` has dropped AES-GCM's expanded keys.
const IDLE_GOAL: usize = 1024;

fn check(pattern: Pattern, mode: Mode, suites: &[Suite]) {
    for &suite in suites {
        let f = measure(pattern, suite, mode);
        // The session struct itself lives inside the connection's boxed state.
        let session = size_of::<Session>() + session_heap(mode);
        // One line per combination; `--nocapture` shows them (the lead copies them into spec §13).
        println!(
            "\n{pattern:<6} {:<8} {:<25} {} AEAD: idle initiator {} B, responder {} B (session {} B incl. its \
             {} B struct, connection's own {} B); after traffic + re-handshake {} / {} B; handshake peak \
             (pair) {} B, initiator after new() {} B {:?}; blocks {:?} / {:?}; size_of Connection {} B",
            format!("{mode:?}"),
            suite.to_string(),
            aead_name(),
            f.initiator,
            f.responder,
            session,
            size_of::<Session>(),
            f.initiator.max(f.responder).saturating_sub(session),
            f.initiator_after_traffic,
            f.responder_after_traffic,
            f.handshake_peak,
            f.initiator_started,
            f.started_blocks,
            f.initiator_blocks,
            f.responder_blocks,
            size_of::<Connection>(),
        );
        // Releasing drops AES-GCM's expanded ciphers, at least one per side (the handshake
        // used a direction); ChaCha20-Poly1305 holds none.
        let expanded = if suite == Suite::ChaChaPolyBlake2s { 0 } else { 2 * expanded_aes_gcm() };
        println!("  both sides after release_idle_memory: {} B", f.released_pair);
        assert!(f.released_pair + expanded <= f.initiator + f.responder, "{f:?}");
        assert!(f.released_pair >= 2 * session_heap(mode), "{f:?}");
        let bound = if mode == Mode::Stream { STREAM_BOUND } else { DATAGRAM_BOUND };
        for (side, v) in [
            ("initiator", f.initiator),
            ("responder", f.responder),
            ("initiator after traffic", f.initiator_after_traffic),
            ("responder after traffic", f.responder_after_traffic),
        ] {
            assert!(v <= bound, "{pattern} {mode:?} {suite}: {side} holds {v} B > {bound} B");
        }
        assert!(f.released_pair <= 2 * IDLE_GOAL, "{f:?}");
        if suite == Suite::ChaChaPolyBlake2s {
            assert!(f.initiator.max(f.responder) <= IDLE_GOAL, "{f:?}");
        }
        // The session's keys (and window) must be in there: a figure below them would mean
        // the measurement missed the connection.
        assert!(f.initiator.min(f.responder) >= session_heap(mode), "{f:?}");
        // snow's HandshakeState (~2.5 KiB) is gone once established: beside its keys and
        // window, the connection holds well under half of what it held right after new().
        // (AES-GCM's expanded ciphers are released like the queues: compare what stays.)
        assert!(f.initiator_released - session_heap(mode) < f.initiator_started / 2, "{f:?}");
    }
}

#[test]
fn ik_stream_connection_heap_is_bounded_and_freed_on_drop() {
    check(Pattern::IK, Mode::Stream, &Suite::ALL);
}

#[test]
fn ik_datagram_connection_heap_is_bounded_and_freed_on_drop() {
    check(Pattern::IK, Mode::Datagram, &Suite::ALL);
}

/// XX keeps a FINAL and cached answers in datagram mode until the peer proves it got them.
#[test]
fn xx_connection_heap_is_bounded_and_freed_on_drop() {
    check(Pattern::XX, Mode::Stream, &[Suite::ChaChaPolyBlake2s]);
    check(Pattern::XX, Mode::Datagram, &[Suite::ChaChaPolyBlake2s]);
}

/// The static-static DH cache (spec §11.11) holds about 122 B per entry, as its documentation
/// says, and frees everything when cleared: `ENTRIES` IK handshakes from as many initiator
/// keys fill a responder's cache; the heap left after every connection is gone is the cache's.
#[test]
fn static_dh_cache_heap_per_entry() {
    const ENTRIES: usize = 256;
    let now = Timestamp::from_millis(1);
    let mut rng = ChaCha20Rng::seed_from_u64(11);
    let mut buf = vec![0u8; 65_535];
    let responder = StaticKeypair::from_secret_bytes([2; 32]);
    let responder_key = *responder.public();
    let mut cb = Config::new(responder, Mode::Stream);
    let cache = Arc::new(veil_protocol::StaticDhCache::new(ENTRIES));
    cb.static_dh_cache = Some(Arc::clone(&cache));
    let cb = Arc::new(cb);
    let initiators: Vec<Arc<Config>> =
        (0..ENTRIES).map(|_| Arc::new(Config::new(StaticKeypair::generate(&mut rng), Mode::Stream))).collect();
    // One handshake without the cache first: whatever the first handshake of a thread sets up
    // once is not the cache's.
    {
        let plain = Arc::new(Config::new(StaticKeypair::from_secret_bytes([3; 32]), Mode::Stream));
        let mut a =
            Connection::new(Arc::clone(&initiators[0]), Role::Initiator, Some(*plain.public_key()), now, &mut rng)
                .unwrap();
        let mut b = Connection::new(plain, Role::Responder, None, now, &mut rng).unwrap();
        exchange(&mut a, &mut b, now, &mut buf);
        assert!(a.is_connected() && b.is_connected());
    }
    let before = live();
    for ca in &initiators {
        let mut a = Connection::new(Arc::clone(ca), Role::Initiator, Some(responder_key), now, &mut rng).unwrap();
        let mut b = Connection::new(Arc::clone(&cb), Role::Responder, None, now, &mut rng).unwrap();
        exchange(&mut a, &mut b, now, &mut buf);
        assert!(a.is_connected() && b.is_connected());
    }
    assert_eq!(cache.len(), ENTRIES);
    let per_entry = usize::try_from(live() - before).unwrap() / ENTRIES;
    // Clearing frees all of it (and zeroizes the entries on the way).
    cache.clear();
    assert_eq!(live(), before);
    // Printed last: the harness's output capture allocates on this thread.
    println!("static DH cache: {per_entry} B per entry ({ENTRIES} entries)");
    assert!((65..=140).contains(&per_entry), "{per_entry} B per entry");
}
