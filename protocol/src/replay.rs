//! Sliding anti-replay window (spec §8).
//!
//! Each receive direction keeps one [`ReplayWindow`]. The receiver asks
//! [`ReplayWindow::check`] before decrypting (a cheap reject that costs no AEAD work) and calls
//! [`ReplayWindow::commit`] only once the packet authenticated, so a forged packet can never move
//! the window.
//!
//! The window is a ring bitmap in the style of RFC 6479 and WireGuard: bit
//! `c mod REPLAY_WINDOW` records whether counter `c` was seen. Unlike RFC 6479, the ring holds
//! exactly [`REPLAY_WINDOW`] bits, so a slide clears exactly the slots of the counters it skips
//! (with word masks) rather than whole words, which would forget counters still inside the
//! window. A slide costs one masked word write per 64 counters skipped, capped at one pass over
//! the bitmap (a jump of a whole window or more just zeroes it), so every operation is O(1) and
//! bounded by 129 word writes.
//!
//! The bitmap (1 KiB) exists only while it is needed: as long as the committed counters inside
//! the window form one run ending at the highest (packets arriving in order, the common case,
//! and always on a quiet connection) the window is that run's two ends. The first commit that
//! leaves a gap or fills one out of order allocates the bitmap (one pass, ≤ 129 word writes);
//! [`ReplayWindow::compact`] frees it again once the committed counters form a run. Either
//! form accepts and refuses exactly the same counters (spec §8).

use alloc::boxed::Box;
use core::fmt;

/// spec §8: size of the window in counters.
///
/// With `highest` the highest committed counter, a counter `c ≤ highest` is still inside the
/// window iff `highest − c < REPLAY_WINDOW`.
pub const REPLAY_WINDOW: u64 = 8192;

/// Bits per bitmap word.
const WORD_BITS: usize = u64::BITS as usize;
/// `REPLAY_WINDOW` as a bit count (fits `usize` on every target: checked below).
const WINDOW_BITS: usize = REPLAY_WINDOW as usize;
/// Number of `u64` words in the ring.
const WORDS: usize = WINDOW_BITS / WORD_BITS;

// The ring indexing below masks with `WINDOW_BITS - 1` and splits into whole words.
const _: () = assert!(REPLAY_WINDOW.is_power_of_two());
const _: () = assert!(WINDOW_BITS.is_multiple_of(WORD_BITS));
const _: () = assert!(WINDOW_BITS as u64 == REPLAY_WINDOW);

/// Why a counter was refused by the replay window (spec §8).
///
/// On the wire both cases are a silent drop; the distinction is for local logs and statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReplayError {
    /// The counter is `REPLAY_WINDOW` or more below the highest committed counter: it can no
    /// longer be told apart from a replay.
    TooOld,
    /// The counter was already committed.
    Duplicate,
}

impl fmt::Display for ReplayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::TooOld => "counter is older than the replay window",
            Self::Duplicate => "counter was already received",
        })
    }
}

impl core::error::Error for ReplayError {}

/// Per-direction sliding anti-replay window over packet counters (spec §8).
///
/// Accepts each counter at most once, and only while it is fewer than [`REPLAY_WINDOW`] below
/// the highest committed counter. Counters above the highest slide the window forward.
///
/// Use [`check`](Self::check) before decrypting and [`commit`](Self::commit) after the packet
/// authenticated.
#[derive(Clone)]
pub struct ReplayWindow {
    /// Ring bitmap: bit `c % REPLAY_WINDOW` is set iff counter `c` in
    /// `(highest − REPLAY_WINDOW, highest]` was committed. Bits of counters outside that range
    /// are always clear. `None` while the committed counters in the window are the run
    /// `low..=highest`.
    bitmap: Option<Box<[u64; WORDS]>>,
    /// Without a bitmap: the committed counters inside the window are exactly those of
    /// `low..=highest` (the run may reach below the window). Unused with a bitmap.
    low: u64,
    /// Highest committed counter; `None` until the first commit.
    highest: Option<u64>,
}

impl fmt::Debug for ReplayWindow {
    // The bitmap is 1 KiB of noise in a log line; `highest` is what a reader wants.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplayWindow").field("highest", &self.highest).finish_non_exhaustive()
    }
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl ReplayWindow {
    /// An empty window: nothing committed, every counter acceptable.
    #[must_use]
    pub const fn new() -> Self {
        Self { bitmap: None, low: 0, highest: None }
    }

    /// Would `counter` be accepted? Never modifies the window.
    ///
    /// Call before decrypting, to drop replays and stale packets without spending AEAD work.
    /// A successful check does not reserve the counter: call [`commit`](Self::commit) once the
    /// packet authenticated.
    ///
    /// # Errors
    ///
    /// [`ReplayError::TooOld`] if `counter` is `REPLAY_WINDOW` or more below the highest
    /// committed counter, else [`ReplayError::Duplicate`] if it was already committed.
    pub fn check(&self, counter: u64) -> Result<(), ReplayError> {
        let Some(highest) = self.highest else {
            return Ok(());
        };
        if counter > highest {
            // spec §8: counters above highest are new and slide the window on commit.
            return Ok(());
        }
        // No underflow: counter <= highest here.
        // spec §8: too old iff counter <= highest − REPLAY_WINDOW, i.e. highest − counter >= it.
        if highest - counter >= REPLAY_WINDOW {
            return Err(ReplayError::TooOld);
        }
        let seen = match self.bitmap.as_deref() {
            Some(bitmap) => {
                let (word, mask) = Self::position(counter);
                bitmap[word] & mask != 0
            }
            None => counter >= self.low,
        };
        if seen {
            // spec §8: already seen.
            return Err(ReplayError::Duplicate);
        }
        Ok(())
    }

    /// Marks `counter` as received.
    ///
    /// Call only after the packet authenticated (spec §8: update only after authentication).
    /// Re-checks first and returns the same errors as [`check`](Self::check), leaving the window
    /// unchanged on error, so a caller can't commit a counter twice.
    ///
    /// # Errors
    ///
    /// The same as [`check`](Self::check).
    pub fn commit(&mut self, counter: u64) -> Result<(), ReplayError> {
        self.check(counter)?;
        let Some(highest) = self.highest else {
            self.highest = Some(counter);
            self.low = counter;
            return Ok(());
        };
        if self.bitmap.is_none() {
            // The run `low..=highest` grows at either end, or moves out of the window whole;
            // anything else leaves a gap and needs the bitmap. No overflow: check() passed, so
            // counter > highest or counter < low <= highest.
            if counter > highest && (counter == highest + 1 || counter - highest >= REPLAY_WINDOW) {
                if counter != highest + 1 {
                    self.low = counter;
                }
                self.highest = Some(counter);
                return Ok(());
            }
            if counter < highest && counter + 1 == self.low {
                self.low = counter;
                return Ok(());
            }
            self.materialize(highest);
        }
        // Invariant: present, allocated just above if it was not.
        if let Some(bitmap) = self.bitmap.as_deref_mut() {
            if counter > highest {
                // spec §8: an accepted counter above highest slides the window. The ring slots
                // of the skipped counters (highest, counter] still hold bits of counters that
                // just left the window; clear them. No underflow: counter > highest.
                mark(bitmap, highest.wrapping_add(1), counter - highest, false);
            }
            let (word, mask) = Self::position(counter);
            bitmap[word] |= mask;
        }
        self.highest = Some(highest.max(counter));
        Ok(())
    }

    /// Frees the bitmap if the committed counters inside the window form one run ending at
    /// the highest; the window then holds no heap memory. Changes nothing else: the same
    /// counters are accepted and refused afterwards. Costs one pass over the bitmap (a
    /// connection calls it when it goes idle).
    pub fn compact(&mut self) {
        let (Some(highest), Some(bitmap)) = (self.highest, self.bitmap.as_deref()) else { return };
        let n: u64 = bitmap.iter().map(|w| u64::from(w.count_ones())).sum();
        // The highest counter's bit is always set, so n >= 1; bits are set only for counters
        // <= highest, so n - 1 <= highest.
        let Some(low) = n.checked_sub(1).and_then(|k| highest.checked_sub(k)) else { return };
        // n bits are set; if the n of low..=highest all are, no other one is.
        if segments(low, n).all(|(word, mask)| bitmap[word] & mask == mask) {
            self.low = low;
            self.bitmap = None;
        }
    }

    /// Whether the window holds its bitmap (on the heap).
    #[must_use]
    pub fn has_bitmap(&self) -> bool {
        self.bitmap.is_some()
    }

    /// Allocates the bitmap, holding the part of the run `low..=highest` inside the window.
    fn materialize(&mut self, highest: u64) {
        let from = self.low.max(highest.saturating_sub(REPLAY_WINDOW - 1));
        let mut bitmap = Box::new([0u64; WORDS]);
        // No underflow: from <= highest. At most REPLAY_WINDOW counters.
        mark(&mut bitmap, from, highest - from + 1, true);
        self.bitmap = Some(bitmap);
    }

    /// Highest committed counter, if any.
    #[must_use]
    pub fn highest(&self) -> Option<u64> {
        self.highest
    }

    /// `highest + 1`, or 0 when nothing was committed: the "expected" counter used for
    /// truncated-counter reconstruction (spec §6.3).
    ///
    /// Saturates at `u64::MAX` if `u64::MAX` itself was committed; a session never gets there
    /// (spec §7.4 caps a direction at 2^60 messages).
    #[must_use]
    pub fn expected(&self) -> u64 {
        self.highest.map_or(0, |h| h.saturating_add(1))
    }

    /// Bit index of `counter`'s slot in the ring, `< WINDOW_BITS`.
    fn slot(counter: u64) -> usize {
        // Truncation is intended: only the low log2(REPLAY_WINDOW) bits select the slot.
        #[allow(clippy::cast_possible_truncation)]
        let slot = (counter & (REPLAY_WINDOW - 1)) as usize;
        slot
    }

    /// Word index and bit mask of `counter`'s slot in the ring.
    fn position(counter: u64) -> (usize, u64) {
        let slot = Self::slot(counter);
        (slot / WORD_BITS, 1 << (slot % WORD_BITS))
    }
}

/// The ring slots of the `n` counters `first ..` as (word, mask) pairs, one per word touched:
/// all of them once if `n >= REPLAY_WINDOW`. Wrapping past `u64::MAX` is harmless: only the
/// slot of `first` matters.
fn segments(first: u64, n: u64) -> impl Iterator<Item = (usize, u64)> {
    // At most REPLAY_WINDOW after the min, so it fits usize.
    #[allow(clippy::cast_possible_truncation)]
    let mut left = n.min(REPLAY_WINDOW) as usize;
    let slot = ReplayWindow::slot(first);
    let (mut word, mut bit) = (slot / WORD_BITS, slot % WORD_BITS);
    core::iter::from_fn(move || {
        if left == 0 {
            return None;
        }
        let k = left.min(WORD_BITS - bit);
        let mask = if k == WORD_BITS { u64::MAX } else { ((1u64 << k) - 1) << bit };
        let item = (word, mask);
        left -= k;
        bit = 0;
        word = (word + 1) % WORDS;
        Some(item)
    })
}

/// Sets or clears the ring slots of the `n` counters `first ..` (see [`segments`]).
fn mark(bitmap: &mut [u64; WORDS], first: u64, n: u64, set: bool) {
    for (word, mask) in segments(first, n) {
        if set {
            bitmap[word] |= mask;
        } else {
            bitmap[word] &= !mask;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use alloc::collections::BTreeSet;
    use alloc::vec::Vec;
    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Trivially correct model of spec §8: every committed counter, and the highest.
    #[derive(Default)]
    struct Model {
        seen: BTreeSet<u64>,
        highest: Option<u64>,
    }

    impl Model {
        fn check(&self, c: u64) -> Result<(), ReplayError> {
            // Too old wins over duplicate: below the window, seen and unseen look the same.
            match self.highest {
                // u128: c + REPLAY_WINDOW must not overflow near u64::MAX.
                Some(h) if u128::from(c) + u128::from(REPLAY_WINDOW) <= u128::from(h) => Err(ReplayError::TooOld),
                _ if self.seen.contains(&c) => Err(ReplayError::Duplicate),
                _ => Ok(()),
            }
        }

        fn commit(&mut self, c: u64) -> Result<(), ReplayError> {
            self.check(c)?;
            self.seen.insert(c);
            self.highest = self.highest.max(Some(c));
            Ok(())
        }
    }

    /// Snapshot of the full state, to prove that `check` and failed commits change nothing.
    fn state(w: &ReplayWindow) -> (Option<Box<[u64; WORDS]>>, u64, Option<u64>) {
        (w.bitmap.clone(), w.low, w.highest)
    }

    /// A window whose only committed counter is `c`.
    fn window_at(c: u64) -> ReplayWindow {
        let mut w = ReplayWindow::new();
        w.commit(c).unwrap();
        w
    }

    #[test]
    fn fresh_window_accepts_zero() {
        let mut w = ReplayWindow::default();
        assert_eq!(w.highest(), None);
        assert_eq!(w.expected(), 0);
        assert_eq!(w.check(0), Ok(()));
        assert_eq!(w.commit(0), Ok(()));
        assert_eq!(w.highest(), Some(0));
        assert_eq!(w.expected(), 1);
        assert_eq!(w.check(0), Err(ReplayError::Duplicate));
    }

    #[test]
    fn fresh_window_accepts_any_first_counter() {
        for c in [1, REPLAY_WINDOW, 123_456_789, u64::MAX - 1, u64::MAX] {
            assert_eq!(ReplayWindow::new().check(c), Ok(()));
            let w = window_at(c);
            assert_eq!(w.highest(), Some(c));
            // Below the first counter, but inside the window: never seen, so acceptable.
            assert_eq!(w.check(c.saturating_sub(1)), if c == 0 { Err(ReplayError::Duplicate) } else { Ok(()) });
        }
    }

    #[test]
    fn duplicates_rejected() {
        let mut w = ReplayWindow::new();
        for c in [5, 3, 9, 4, 100, 6] {
            assert_eq!(w.commit(c), Ok(()));
        }
        for c in [5, 3, 9, 4, 100, 6] {
            assert_eq!(w.check(c), Err(ReplayError::Duplicate));
            assert_eq!(w.commit(c), Err(ReplayError::Duplicate));
        }
        for c in [0, 1, 2, 7, 8, 10, 99, 101] {
            assert_eq!(w.check(c), Ok(()), "{c}");
        }
        assert_eq!(w.highest(), Some(100));
    }

    #[test]
    fn too_old_exactly_at_boundary() {
        for highest in [REPLAY_WINDOW, REPLAY_WINDOW + 1, 3 * REPLAY_WINDOW + 17, u64::MAX - 1] {
            let mut w = window_at(highest);
            // spec §8: highest − 8192 is too old, highest − 8191 is the oldest acceptable.
            assert_eq!(w.check(highest - REPLAY_WINDOW), Err(ReplayError::TooOld));
            assert_eq!(w.check((highest - REPLAY_WINDOW).saturating_sub(1)), Err(ReplayError::TooOld));
            assert_eq!(w.check(0), Err(ReplayError::TooOld));
            assert_eq!(w.commit(highest - REPLAY_WINDOW), Err(ReplayError::TooOld));
            assert_eq!(w.check(highest - (REPLAY_WINDOW - 1)), Ok(()));
            assert_eq!(w.commit(highest - (REPLAY_WINDOW - 1)), Ok(()));
            assert_eq!(w.check(highest - (REPLAY_WINDOW - 1)), Err(ReplayError::Duplicate));
            // Sliding by one pushes it out: it is now too old rather than a duplicate.
            w.commit(highest + 1).unwrap();
            assert_eq!(w.check(highest - (REPLAY_WINDOW - 1)), Err(ReplayError::TooOld));
        }
    }

    #[test]
    fn whole_window_fills_and_slides() {
        let mut w = ReplayWindow::new();
        for c in 0..REPLAY_WINDOW {
            w.commit(c).unwrap();
        }
        // Every counter in the window is taken; the next one is free.
        for c in 0..REPLAY_WINDOW {
            assert_eq!(w.check(c), Err(ReplayError::Duplicate));
        }
        assert_eq!(w.check(REPLAY_WINDOW), Ok(()));
        // Slide by one: 0 leaves, the rest stay duplicates.
        w.commit(REPLAY_WINDOW).unwrap();
        assert_eq!(w.check(0), Err(ReplayError::TooOld));
        for c in 1..=REPLAY_WINDOW {
            assert_eq!(w.check(c), Err(ReplayError::Duplicate));
        }
    }

    #[test]
    fn slide_inside_a_word_keeps_lower_bits_of_that_word() {
        // 1..=63 share a bitmap word with 0 and with 8192; sliding to 8192 must forget 0 only.
        let mut w = ReplayWindow::new();
        for c in 0..64 {
            w.commit(c).unwrap();
        }
        w.commit(REPLAY_WINDOW).unwrap();
        assert_eq!(w.check(0), Err(ReplayError::TooOld));
        for c in 1..64 {
            assert_eq!(w.check(c), Err(ReplayError::Duplicate), "{c}");
        }
        for c in 64..REPLAY_WINDOW {
            assert_eq!(w.check(c), Ok(()), "{c}");
        }
    }

    #[test]
    fn big_jumps() {
        let mut w = ReplayWindow::new();
        for c in 0..200 {
            w.commit(c).unwrap();
        }
        // Jump by exactly the window: every old slot is reused, nothing old may survive.
        w.commit(199 + REPLAY_WINDOW).unwrap();
        for c in 200..199 + REPLAY_WINDOW {
            assert_eq!(w.check(c), Ok(()), "{c}");
        }
        assert_eq!(w.check(199), Err(ReplayError::TooOld));
        // Jump by less than the window, wrapping around the ring.
        let h = 199 + REPLAY_WINDOW;
        w.commit(h - 15).unwrap();
        w.commit(h - 5).unwrap();
        w.commit(h + REPLAY_WINDOW - 10).unwrap();
        // The window is now (h − 10, h + 8182]: h − 15 left it, h − 5 and h are still in it.
        assert_eq!(w.check(h - 15), Err(ReplayError::TooOld));
        assert_eq!(w.check(h - 9), Ok(()));
        assert_eq!(w.check(h - 5), Err(ReplayError::Duplicate));
        assert_eq!(w.check(h), Err(ReplayError::Duplicate));
        for c in h + 1..h + REPLAY_WINDOW - 10 {
            assert_eq!(w.check(c), Ok(()), "{c}");
        }
        // A huge jump.
        w.commit(1 << 60).unwrap();
        assert_eq!(w.highest(), Some(1 << 60));
        assert_eq!(w.check(h + REPLAY_WINDOW - 10), Err(ReplayError::TooOld));
        for c in (1 << 60) - (REPLAY_WINDOW - 1)..1 << 60 {
            assert_eq!(w.check(c), Ok(()), "{c}");
        }
    }

    #[test]
    fn near_max_counters() {
        let mut w = ReplayWindow::new();
        let top = u64::MAX - 1;
        w.commit(top - 3).unwrap();
        w.commit(top).unwrap();
        assert_eq!(w.expected(), u64::MAX);
        assert_eq!(w.commit(top), Err(ReplayError::Duplicate));
        assert_eq!(w.commit(top - 3), Err(ReplayError::Duplicate));
        assert_eq!(w.commit(top - 1), Ok(()));
        assert_eq!(w.check(top - REPLAY_WINDOW), Err(ReplayError::TooOld));
        assert_eq!(w.check(0), Err(ReplayError::TooOld));
        // u64::MAX itself is accepted once; expected() saturates instead of overflowing.
        assert_eq!(w.commit(u64::MAX), Ok(()));
        assert_eq!(w.commit(u64::MAX), Err(ReplayError::Duplicate));
        assert_eq!(w.highest(), Some(u64::MAX));
        assert_eq!(w.expected(), u64::MAX);
        assert_eq!(w.check(u64::MAX - REPLAY_WINDOW), Err(ReplayError::TooOld));
        assert_eq!(w.check(u64::MAX - (REPLAY_WINDOW - 1)), Ok(()));

        // Jump from 0 straight to the top.
        let mut w = window_at(0);
        w.commit(u64::MAX).unwrap();
        assert_eq!(w.check(0), Err(ReplayError::TooOld));
        assert_eq!(w.check(u64::MAX - 1), Ok(()));
    }

    #[test]
    fn check_never_mutates() {
        let mut w = ReplayWindow::new();
        for c in [10, 7, 20_000, 19_999, 12_000] {
            w.commit(c).unwrap();
        }
        let before = state(&w);
        for c in [0, 7, 10, 12_000, 11_808, 11_809, 19_998, 20_000, 20_001, 1 << 40, u64::MAX] {
            let _ = w.check(c);
        }
        assert_eq!(state(&w), before);
        // A refused commit leaves the window untouched too.
        assert_eq!(w.commit(20_000), Err(ReplayError::Duplicate));
        assert_eq!(w.commit(7), Err(ReplayError::TooOld));
        assert_eq!(state(&w), before);
    }

    #[test]
    fn in_order_counters_need_no_bitmap_and_compact_frees_it_once_gaps_are_filled() {
        let mut w = ReplayWindow::new();
        for c in 0..100 {
            w.commit(c).unwrap();
        }
        assert!(!w.has_bitmap());
        // A gap needs the bitmap, and compacting keeps it while the gap is open.
        w.commit(101).unwrap();
        assert!(w.has_bitmap());
        w.compact();
        assert!(w.has_bitmap());
        assert_eq!(w.check(100), Ok(()));
        assert_eq!(w.check(99), Err(ReplayError::Duplicate));
        w.commit(100).unwrap();
        w.compact();
        assert!(!w.has_bitmap());
        for c in 0..=101 {
            assert_eq!(w.check(c), Err(ReplayError::Duplicate), "{c}");
        }
        assert_eq!(w.check(102), Ok(()));
        // A run grows downwards too, and a jump of a whole window starts a new run.
        let mut w = window_at(50);
        w.commit(49).unwrap();
        w.commit(51).unwrap();
        assert!(!w.has_bitmap());
        assert_eq!(w.check(48), Ok(()));
        w.commit(51 + REPLAY_WINDOW).unwrap();
        assert!(!w.has_bitmap());
        assert_eq!(w.check(52), Ok(()));
        assert_eq!(w.check(51), Err(ReplayError::TooOld));
        // A full window compacts to a run reaching below it.
        let mut w = ReplayWindow::new();
        w.commit(1).unwrap();
        w.commit(0).unwrap();
        w.commit(3).unwrap();
        for c in 4..3 * REPLAY_WINDOW {
            w.commit(c).unwrap();
        }
        w.commit(2).unwrap_err();
        w.compact();
        assert!(!w.has_bitmap());
        // The window is now 2 × REPLAY_WINDOW ..= 3 × REPLAY_WINDOW − 1.
        assert_eq!(w.check(2 * REPLAY_WINDOW - 1), Err(ReplayError::TooOld));
        assert_eq!(w.check(2 * REPLAY_WINDOW), Err(ReplayError::Duplicate));
    }

    #[test]
    fn debug_shows_only_highest_and_errors_display() {
        let w = window_at(42);
        let s = alloc::format!("{w:?}");
        assert_eq!(s, "ReplayWindow { highest: Some(42), .. }");
        assert_eq!(alloc::format!("{}", ReplayError::TooOld), "counter is older than the replay window");
        assert_eq!(alloc::format!("{}", ReplayError::Duplicate), "counter was already received");
        let _: &dyn core::error::Error = &ReplayError::Duplicate;
    }

    /// How the next counter of a generated sequence is chosen, relative to the current highest.
    #[derive(Debug, Clone, Copy)]
    enum Step {
        /// Small move around the highest, reaching past the window's lower edge.
        Near(i64),
        /// Just around the lower edge of the window.
        Edge(i64),
        /// Forward jump.
        Jump(u64),
        /// Replay of the k-th earlier counter (mod history length).
        Replay(u64),
        /// One of the last few counters plus `REPLAY_WINDOW` (+0..=2): it shares (or neighbours)
        /// a ring slot with a counter that may still have its bit set, which catches a slide that
        /// forgets to clear some slot.
        SameSlot(u64),
        /// Any counter at all.
        Anywhere(u64),
    }

    impl Step {
        /// Decodes a flat `(selector, value)` pair. Generating flat tuples instead of a nested
        /// `prop_oneof!` keeps thousands of steps per case fast in debug builds.
        #[allow(clippy::cast_possible_wrap)]
        fn decode(selector: u8, x: u64) -> Self {
            match selector {
                0..=7 => Self::Near((x % 9300) as i64 - 9000),
                8..=10 => Self::Edge((x % 8) as i64 - 8195),
                11 => Self::Jump(1 + x % 20_000),
                12 => Self::Jump(x),
                13..=15 => Self::Replay(x),
                16..=18 => Self::SameSlot(x),
                _ => Self::Anywhere(x),
            }
        }
    }

    /// Index into a non-empty history.
    fn pick(k: u64, history: &[u64]) -> usize {
        usize::try_from(k % history.len() as u64).unwrap()
    }

    fn start() -> impl Strategy<Value = u64> {
        prop_oneof![Just(0u64), 0u64..20_000, any::<u64>(), (0u64..50_000).prop_map(|d| u64::MAX - d),]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn window_matches_btreeset_model(
            start in start(),
            // (Step selector, Step value, authenticity roll) per packet.
            steps in prop::collection::vec((0u8..20, any::<u64>(), 0u8..20), 0..2000),
        ) {
            let mut w = ReplayWindow::new();
            let mut m = Model::default();
            let mut history: Vec<u64> = Vec::new();
            for (selector, x, auth) in steps {
                // 3 in 20 packets fail authentication: checked, never committed.
                let authentic = auth < 17;
                let base = m.highest.unwrap_or(start);
                let c = match Step::decode(selector, x) {
                    Step::Near(d) | Step::Edge(d) => base.saturating_add_signed(d),
                    Step::Jump(d) => base.saturating_add(d),
                    Step::Replay(k) | Step::SameSlot(k) if history.is_empty() => base.saturating_add(k % 3),
                    Step::Replay(k) => history[pick(k, &history)],
                    Step::SameSlot(k) => {
                        let recent = history.len().min(8);
                        let back = pick(k, &history[..recent]);
                        history[history.len() - 1 - back]
                            .saturating_add(REPLAY_WINDOW + (k >> 32) % 3)
                    }
                    Step::Anywhere(c) => c,
                };
                history.push(c);

                // `check` takes `&self`, so only a refused commit needs the snapshot.
                let expected = m.check(c);
                prop_assert_eq!(w.check(c), expected, "check({})", c);
                if authentic {
                    let before = expected.is_err().then(|| state(&w));
                    prop_assert_eq!(w.commit(c), m.commit(c), "commit({})", c);
                    if let Some(before) = before {
                        prop_assert_eq!(state(&w), before);
                    }
                }
                prop_assert_eq!(w.highest(), m.highest);
                prop_assert_eq!(w.expected(), m.highest.map_or(0, |h| h.saturating_add(1)));
                // Now and then, as a connection going idle does: the same answers after it.
                if x % 16 == 0 {
                    w.compact();
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn reordering_inside_window_accepted_exactly_once(
            start in start(),
            len in 1u64..20_000,
            // Max displacement: any counter arrives before all counters `spread` or more above it.
            spread in prop_oneof![1u64..64, 1..=REPLAY_WINDOW],
            dup_percent in 0u32..50,
            seed in any::<u64>(),
        ) {
            let start = start.min(u64::MAX - len);
            let mut rng = StdRng::seed_from_u64(seed);
            // Arrival order: sort by (i + jitter, copy). With jitter < spread, counter j arrives
            // before counter i only if j < i + spread, so at i's first arrival
            // highest − i < spread <= REPLAY_WINDOW: every original is inside the window.
            let mut arrivals: Vec<(u64, bool, u64)> = Vec::new();
            for i in 0..len {
                let key = i + rng.gen_range(0..spread);
                arrivals.push((key, false, i));
                if rng.gen_ratio(dup_percent, 100) {
                    // A duplicate arrives no earlier than its original, possibly much later.
                    let later = key + rng.gen_range(0..2 * REPLAY_WINDOW);
                    arrivals.push((later, true, i));
                }
            }
            arrivals.sort_unstable();

            let mut w = ReplayWindow::new();
            let mut accepted = BTreeSet::new();
            for (_, is_dup, i) in arrivals {
                let c = start + i;
                if is_dup {
                    let err = w.check(c).expect_err("duplicate accepted by check");
                    prop_assert_eq!(w.commit(c), Err(err));
                    let h = w.highest().unwrap();
                    if h - c < REPLAY_WINDOW {
                        prop_assert_eq!(err, ReplayError::Duplicate);
                    } else {
                        prop_assert_eq!(err, ReplayError::TooOld);
                    }
                } else {
                    prop_assert_eq!(w.check(c), Ok(()), "check({})", c);
                    prop_assert_eq!(w.commit(c), Ok(()), "commit({})", c);
                    prop_assert!(accepted.insert(c));
                }
            }
            prop_assert_eq!(accepted.len() as u64, len);
            prop_assert_eq!(w.highest(), Some(start + len - 1));
        }
    }
}
