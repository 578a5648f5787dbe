//! A bounded cache of static-static X25519 results (`std` only; spec §11.11).
//!
//! In IK, IKpsk2 and KK the `ss` token is `DH(s, rs)` between the two static keys: the same
//! 32 bytes on every handshake between the same two nodes (WireGuard precomputes it per peer).
//! An endpoint that shares one [`StaticDhCache`] between its connections
//! ([`Config::static_dh_cache`](crate::Config::static_dh_cache)) computes it once per peer
//! instead of once per handshake: IK and KK go from 4 to 3 X25519 operations per side, one
//! fixed-base key generation aside. Nothing on the wire changes, and the handshake's keys and
//! hash are those of an uncached handshake.
//!
//! What goes in: only `DH(local static, remote static)`, once the handshake that computed it
//! has finished (the peer proved its key and was authorized, spec §5.5). Results that involve
//! an ephemeral key (`ee`, `es`, `se`) are never stored: the X25519 wrapper hands the
//! handshake every result it computed with the static key, and the handshake inserts only the
//! one whose public key is the peer's authenticated static key. XX and XXpsk3 have no `ss`
//! and so store nothing.
//!
//! What comes out: an X25519 with the node's static key looks up the public key it is given
//! and, on a hit, returns the stored `DH(s, P)`, which is by definition what it would have
//! computed, whichever token asked.
//!
//! - **Keyed by public data.** Entries are found by the remote public key (a `BTreeMap`
//!   compares public bytes only); the secrets take no part in any branch or comparison. A
//!   network observer can tell a hit from a miss by the time of a handshake (one X25519 less,
//!   ≈ 50 µs): that reveals whether a public key completed a handshake with this node
//!   recently, not any secret (spec §11.8).
//! - **Bounded.** At most `capacity` entries; when full, a CLOCK sweep (second chance) evicts
//!   an entry that was not used since the hand last passed it; new entries start unused, so
//!   keys that never come back go first.
//! - **Zeroized.** Stored results are zeroized when evicted, overwritten, cleared and dropped.
//!   They live in fixed chunks of [`CHUNK`] slots that are never moved or reallocated (growing
//!   the cache adds a chunk), so no stale copy is left behind in freed memory.
//! - **Key rotation.** The cache belongs to one local static key: the first insert with
//!   another local key (a new identity) clears it, and lookups with another key miss.
//!   [`StaticDhCache::clear`] empties it on demand.
//!
//! **Memory**: about 130 B per entry on 64-bit targets (a 65-byte slot and the index's
//! `BTreeMap` entry, measured by the `heap` test in `tests/heap.rs`), allocated as entries
//! arrive, [`CHUNK`] slots at a time: ≈ 0.5 MiB at most for 4 096 entries (129 B per entry measured with 256).

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::fmt;
use std::sync::{Mutex, MutexGuard, PoisonError};

use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::crypto::PublicKey;

/// Slots allocated at a time.
pub const CHUNK: usize = 64;

/// A stored X25519 result. Zeroized on drop.
#[derive(Zeroize, ZeroizeOnDrop)]
struct Shared([u8; 32]);

struct Slot {
    remote: [u8; 32],
    shared: Shared,
    /// CLOCK's reference bit: used since the hand last passed.
    referenced: bool,
}

impl Slot {
    const fn empty() -> Self {
        Self { remote: [0u8; 32], shared: Shared([0u8; 32]), referenced: false }
    }
}

/// Counters of a [`StaticDhCache`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Lookups not answered (the X25519 was computed).
    pub misses: u64,
    /// Entries stored.
    pub inserts: u64,
    /// Entries evicted to make room.
    pub evictions: u64,
    /// Times the cache was emptied because the local static key changed.
    pub key_changes: u64,
}

struct Table {
    /// The local static key the entries belong to.
    owner: Option<[u8; 32]>,
    /// Remote static key → slot position.
    index: BTreeMap<[u8; 32], usize>,
    /// Fixed-size chunks of slots; only the list of chunks ever grows.
    chunks: Vec<Box<[Slot]>>,
    /// Slots in use (positions `0..len`).
    len: usize,
    /// CLOCK hand.
    hand: usize,
    stats: CacheStats,
}

impl Table {
    fn slot(&mut self, pos: usize) -> &mut Slot {
        &mut self.chunks[pos / CHUNK][pos % CHUNK]
    }

    /// Drops every entry (zeroizing them) and the chunks.
    fn clear(&mut self) {
        self.index.clear();
        self.chunks = Vec::new();
        self.len = 0;
        self.hand = 0;
    }

    /// A free or freed slot position for a new entry.
    fn place(&mut self, capacity: usize) -> usize {
        if self.len < capacity {
            let pos = self.len;
            if pos / CHUNK == self.chunks.len() {
                let n = (capacity - pos).min(CHUNK);
                self.chunks.push((0..n).map(|_| Slot::empty()).collect());
            }
            self.len += 1;
            return pos;
        }
        // CLOCK: at most two passes, the first clearing every reference bit.
        loop {
            let pos = self.hand;
            self.hand = (self.hand + 1) % self.len;
            let slot = self.slot(pos);
            if slot.referenced {
                slot.referenced = false;
                continue;
            }
            let old = slot.remote;
            slot.shared.zeroize();
            self.index.remove(&old);
            self.stats.evictions += 1;
            return pos;
        }
    }
}

/// A bounded, thread-safe cache of `DH(local static, remote static)` results, shared by the
/// connections of one endpoint (see the [module documentation](self)).
pub struct StaticDhCache {
    capacity: usize,
    table: Mutex<Table>,
}

impl fmt::Debug for StaticDhCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticDhCache").field("capacity", &self.capacity).field("len", &self.len()).finish()
    }
}

impl StaticDhCache {
    /// A cache of at most `capacity` entries (about 130 B each). Nothing is allocated
    /// before the first entry; `0` makes a cache that stores nothing.
    #[must_use]
    pub const fn new(capacity: usize) -> Self {
        Self {
            capacity,
            table: Mutex::new(Table {
                owner: None,
                index: BTreeMap::new(),
                chunks: Vec::new(),
                len: 0,
                hand: 0,
                stats: CacheStats { hits: 0, misses: 0, inserts: 0, evictions: 0, key_changes: 0 },
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // A panic elsewhere cannot leave the table inconsistent in a way that matters: at
        // worst an entry is missing from the index, i.e. a miss.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The most entries held.
    #[must_use]
    pub const fn capacity(&self) -> usize {
        self.capacity
    }

    /// Entries held.
    #[must_use]
    pub fn len(&self) -> usize {
        self.lock().len
    }

    /// Whether no entry is held.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the result for `local` and `remote` is held.
    #[must_use]
    pub fn contains(&self, local: &PublicKey, remote: &PublicKey) -> bool {
        let t = self.lock();
        t.owner == Some(local.0) && t.index.contains_key(&remote.0)
    }

    /// The counters so far.
    #[must_use]
    pub fn stats(&self) -> CacheStats {
        self.lock().stats
    }

    /// Removes (and zeroizes) every entry.
    pub fn clear(&self) {
        let mut t = self.lock();
        t.clear();
        t.owner = None;
    }

    /// Copies the result for `local` and `remote` into `out` if held.
    pub(crate) fn get(&self, local: &[u8; 32], remote: &[u8; 32], out: &mut [u8; 32]) -> bool {
        let mut t = self.lock();
        let pos = if t.owner.as_ref() == Some(local) { t.index.get(remote).copied() } else { None };
        let Some(pos) = pos else {
            t.stats.misses += 1;
            return false;
        };
        t.stats.hits += 1;
        let slot = t.slot(pos);
        slot.referenced = true;
        out.copy_from_slice(&slot.shared.0);
        true
    }

    /// Stores `shared` = `DH(local, remote)`, evicting an entry if full, or emptying the
    /// cache first if it belonged to another local key.
    pub(crate) fn insert(&self, local: &[u8; 32], remote: &[u8; 32], shared: &[u8; 32]) {
        if self.capacity == 0 {
            return;
        }
        let mut t = self.lock();
        if t.owner.as_ref() != Some(local) {
            if t.owner.is_some() {
                t.stats.key_changes += 1;
            }
            t.clear();
            t.owner = Some(*local);
        }
        let pos = match t.index.get(remote) {
            Some(&pos) => pos,
            None => {
                let pos = t.place(self.capacity);
                t.index.insert(*remote, pos);
                t.stats.inserts += 1;
                pos
            }
        };
        let slot = t.slot(pos);
        slot.remote = *remote;
        slot.shared.0.copy_from_slice(shared);
    }
}

/// Results one handshake computed with the node's static key, until the handshake finishes
/// and knows which one, if any, is `DH(s, rs)`.
const RECORDED_MAX: usize = 4;

/// A static-key X25519 result of one handshake: the public key it was computed with, and the
/// result.
type Recorded = Option<([u8; 32], Shared)>;

/// One handshake's link to the endpoint's cache (held by the handshake and by its X25519
/// objects).
pub(crate) struct SsContext {
    cache: alloc::sync::Arc<StaticDhCache>,
    local: [u8; 32],
    recorded: Mutex<[Recorded; RECORDED_MAX]>,
}

impl SsContext {
    pub(crate) fn new(cache: alloc::sync::Arc<StaticDhCache>, local: &PublicKey) -> Self {
        Self { cache, local: local.0, recorded: Mutex::new([None, None, None, None]) }
    }

    /// A static-key X25519 with `remote`: the stored result, if any.
    pub(crate) fn lookup(&self, remote: &[u8; 32], out: &mut [u8; 32]) -> bool {
        self.cache.get(&self.local, remote, out)
    }

    /// A static-key X25519 result just computed; kept until [`SsContext::commit`].
    pub(crate) fn record(&self, remote: &[u8; 32], shared: &[u8; 32]) {
        let mut r = self.recorded.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(free) = r.iter_mut().find(|e| e.is_none()) {
            *free = Some((*remote, Shared(*shared)));
        }
    }

    /// The handshake finished with `remote_static` authenticated: store `DH(s, rs)` if it
    /// was computed, and forget (zeroize) everything recorded.
    pub(crate) fn commit(&self, remote_static: Option<&PublicKey>) {
        let mut r = self.recorded.lock().unwrap_or_else(PoisonError::into_inner);
        for e in r.iter_mut() {
            if let (Some((remote, shared)), Some(rs)) = (e.as_ref(), remote_static) {
                if *remote == rs.0 {
                    self.cache.insert(&self.local, remote, &shared.0);
                }
            }
            *e = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> [u8; 32] {
        [b; 32]
    }

    #[test]
    fn stores_finds_and_stays_within_capacity() {
        let c = StaticDhCache::new(3);
        let me = key(1);
        let mut out = [0u8; 32];
        assert!(!c.get(&me, &key(10), &mut out));
        for r in 10..13 {
            c.insert(&me, &key(r), &key(r + 100));
        }
        assert_eq!(c.len(), 3);
        assert!(c.get(&me, &key(11), &mut out));
        assert_eq!(out, key(111));
        // Full: the next insert evicts one entry that was not used (11 was).
        c.insert(&me, &key(13), &key(113));
        assert_eq!(c.len(), 3);
        assert!(c.get(&me, &key(11), &mut out));
        assert!(c.get(&me, &key(13), &mut out));
        assert_eq!(out, key(113));
        let held = (10..14).filter(|&r| c.get(&me, &key(r), &mut out)).count();
        assert_eq!(held, 3);
        let s = c.stats();
        assert_eq!((s.inserts, s.evictions), (4, 1));
        // Many more keys than room: never above capacity, every held entry is right.
        for r in 20..120 {
            c.insert(&me, &key(r), &key(r.wrapping_add(100)));
            assert!(c.len() <= 3);
        }
        for r in 10..120u8 {
            if c.get(&me, &key(r), &mut out) {
                assert_eq!(out, key(r.wrapping_add(100)));
            }
        }
    }

    #[test]
    fn grows_by_chunks_and_fills_them() {
        let c = StaticDhCache::new(CHUNK + 5);
        let me = key(1);
        for r in 0..(CHUNK + 5) {
            let mut k = [0u8; 32];
            k[..8].copy_from_slice(&(r as u64).to_le_bytes());
            c.insert(&me, &k, &key(7));
        }
        assert_eq!(c.len(), CHUNK + 5);
        let t = c.lock();
        assert_eq!(t.chunks.len(), 2);
        assert_eq!(t.chunks[1].len(), 5);
        assert_eq!(t.stats.evictions, 0);
    }

    #[test]
    fn another_local_key_misses_and_its_first_insert_clears() {
        let c = StaticDhCache::new(8);
        let mut out = [0u8; 32];
        c.insert(&key(1), &key(10), &key(110));
        c.insert(&key(1), &key(11), &key(111));
        assert!(!c.get(&key(2), &key(10), &mut out));
        c.insert(&key(2), &key(12), &key(212));
        assert_eq!(c.len(), 1);
        assert!(!c.get(&key(1), &key(10), &mut out));
        assert!(c.get(&key(2), &key(12), &mut out));
        assert_eq!(c.stats().key_changes, 1);
        c.clear();
        assert!(c.is_empty());
        assert!(!c.get(&key(2), &key(12), &mut out));
    }

    #[test]
    fn an_evicted_result_leaves_no_copy_in_the_table() {
        let c = StaticDhCache::new(2);
        let me = key(1);
        c.insert(&me, &key(10), &key(110));
        c.insert(&me, &key(11), &key(111));
        c.insert(&me, &key(12), &key(112));
        let t = c.lock();
        let held: Vec<[u8; 32]> = t.chunks.iter().flat_map(|ch| ch.iter().map(|s| s.shared.0)).collect();
        // One of the first two went; its slot now holds the newcomer, and nothing else holds it.
        assert_eq!(held.len(), 2);
        assert!(held.contains(&key(112)));
        let gone = if held.contains(&key(110)) { key(111) } else { key(110) };
        assert!(!held.contains(&gone));
        assert_eq!(t.index.len(), 2);
    }

    #[test]
    fn zero_capacity_stores_nothing() {
        let c = StaticDhCache::new(0);
        c.insert(&key(1), &key(2), &key(3));
        assert!(c.is_empty());
    }

    #[test]
    fn commit_stores_only_the_result_with_the_peer_static_key() {
        let cache = alloc::sync::Arc::new(StaticDhCache::new(8));
        let me = PublicKey(key(1));
        let ctx = SsContext::new(alloc::sync::Arc::clone(&cache), &me);
        // As an IK responder: `es` with the peer's ephemeral key, then `ss`.
        ctx.record(&key(50), &key(150));
        ctx.record(&key(10), &key(110));
        ctx.commit(Some(&PublicKey(key(10))));
        assert_eq!(cache.len(), 1);
        assert!(cache.contains(&me, &PublicKey(key(10))));
        assert!(!cache.contains(&me, &PublicKey(key(50))));
        // Everything recorded is forgotten: a second commit stores nothing new.
        ctx.commit(Some(&PublicKey(key(50))));
        assert_eq!(cache.len(), 1);
        assert!(ctx.recorded.lock().unwrap_or_else(PoisonError::into_inner).iter().all(Option::is_none));
        // An unknown peer (no static key) stores nothing.
        ctx.record(&key(60), &key(160));
        ctx.commit(None);
        assert_eq!(cache.len(), 1);
    }
}
