//! Custody acknowledgements of a relay with a spool (spec §17.9): the coalescer of `Stored`
//! notices, sans IO.
//!
//! The gateway [`record`](StoredCoalescer::record)s each routed packet once it is durable in its
//! spool, with the link and handle of the `Forward` that carried it, its G bit and its
//! `counter_lo`. Consecutive counters of one handle and generation (modulo 2^24) merge into one
//! `Stored { route, generation, first, count }`; per link at most one `Stored` leaves each
//! [`STORED_DELAY`] while more are waiting, the oldest range first. Time enters as an argument:
//! call [`handle_timeout`](StoredCoalescer::handle_timeout) when
//! [`poll_timeout`](StoredCoalescer::poll_timeout) is due (a first record is due at once, so
//! that the records of one spool commit go out together), then drain
//! [`poll_output`](StoredCoalescer::poll_output).
//!
//! `Stored` is a hint (a lost one costs the device a retransmission, never a message), so the
//! ranges waiting per link are bounded ([`MAX_STORED_RANGES`]): beyond it the oldest is dropped
//! and counted.

use alloc::collections::{BTreeMap, BTreeSet, VecDeque};

use super::LinkId;
use crate::delivery::STORED_DELAY;
use crate::message::STORED_COUNTER_SPAN;
use crate::routing::RoutingMessage;
use crate::time::Timestamp;

/// Bound on the `Stored` ranges waiting per link; the oldest is dropped beyond it.
pub const MAX_STORED_RANGES: usize = 256;

/// One run of consecutive counters: `first`, `first + 1`, … `first + count − 1` (mod 2^24).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Range {
    route: u32,
    generation: u8,
    first: u32,
    count: u32,
}

impl Range {
    /// Extends the range by `counter_lo` if it is the next counter and the range has room.
    fn extend(&mut self, route: u32, generation: u8, counter_lo: u32) -> bool {
        let next = (self.first + self.count) % STORED_COUNTER_SPAN;
        if self.route == route
            && self.generation == generation
            && next == counter_lo
            && self.count < STORED_COUNTER_SPAN
        {
            self.count += 1;
            true
        } else {
            false
        }
    }
}

#[derive(Debug, Default)]
struct Pending {
    ranges: VecDeque<Range>,
    /// When the last `Stored` of the link left.
    last_sent: Option<Timestamp>,
    /// This link's entry in [`StoredCoalescer::timers`].
    timer: Option<Timestamp>,
}

/// Counters of a [`StoredCoalescer`]. They only grow (saturating).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CustodyStats {
    /// Packets recorded.
    pub recorded: u64,
    /// `Stored` messages handed out.
    pub sent: u64,
    /// Ranges dropped from a full per-link queue (their packets are in the spool all the same).
    pub overflowed: u64,
}

/// Coalesces custody acknowledgements into `Stored` messages (spec §17.9). See the
/// [module documentation](self).
#[derive(Debug)]
pub struct StoredCoalescer {
    max_ranges: usize,
    links: BTreeMap<LinkId, Pending>,
    timers: BTreeSet<(Timestamp, LinkId)>,
    out: VecDeque<(LinkId, RoutingMessage)>,
    stats: CustodyStats,
}

impl Default for StoredCoalescer {
    fn default() -> Self {
        Self::new(MAX_STORED_RANGES)
    }
}

impl StoredCoalescer {
    /// A coalescer holding at most `max_ranges` waiting ranges per link (at least 1).
    #[must_use]
    pub fn new(max_ranges: usize) -> Self {
        Self {
            max_ranges: max_ranges.max(1),
            links: BTreeMap::new(),
            timers: BTreeSet::new(),
            out: VecDeque::new(),
            stats: CustodyStats::default(),
        }
    }

    /// The packet with G bit `generation` (0 or 1; other values are taken as their low bit)
    /// and `counter_lo` (below 2^24; higher bits are ignored), from a `Forward` naming `route`
    /// on `link`, is durable in the spool. Call in the order the packets were received.
    pub fn record(&mut self, now: Timestamp, link: LinkId, route: u32, generation: u8, counter_lo: u32) {
        let (generation, counter_lo) = (generation & 1, counter_lo % STORED_COUNTER_SPAN);
        self.stats.recorded = self.stats.recorded.saturating_add(1);
        let p = self.links.entry(link).or_default();
        if !p.ranges.back_mut().is_some_and(|r| r.extend(route, generation, counter_lo)) {
            if p.ranges.len() >= self.max_ranges {
                p.ranges.pop_front();
                self.stats.overflowed = self.stats.overflowed.saturating_add(1);
            }
            p.ranges.push_back(Range { route, generation, first: counter_lo, count: 1 });
        }
        if p.timer.is_none() {
            // spec §17.9: at most one `Stored` per link each STORED_DELAY.
            let at = p.last_sent.map_or(now, |t| (t + STORED_DELAY).max(now));
            p.timer = Some(at);
            self.timers.insert((at, link));
        }
    }

    /// The link closed: what waits for it is dropped.
    pub fn forget(&mut self, link: LinkId) {
        if let Some(p) = self.links.remove(&link) {
            if let Some(t) = p.timer {
                self.timers.remove(&(t, link));
            }
        }
        self.out.retain(|(l, _)| *l != link);
    }

    /// When [`handle_timeout`](Self::handle_timeout) has work next.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        self.timers.first().map(|(t, _)| *t)
    }

    /// Releases the `Stored` of every link that is due at `now` (one per link) into
    /// [`poll_output`](Self::poll_output). Calling early does nothing.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        // Bounded: one pass over the due links, each releasing one range.
        while let Some(&(t, link)) = self.timers.first() {
            if t > now {
                break;
            }
            self.timers.remove(&(t, link));
            let Some(p) = self.links.get_mut(&link) else { continue };
            p.timer = None;
            let Some(r) = p.ranges.pop_front() else { continue };
            p.last_sent = Some(now);
            self.stats.sent = self.stats.sent.saturating_add(1);
            self.out.push_back((
                link,
                RoutingMessage::Stored { route: r.route, generation: r.generation, first: r.first, count: r.count },
            ));
            if !p.ranges.is_empty() {
                let at = now + STORED_DELAY;
                p.timer = Some(at);
                self.timers.insert((at, link));
            }
        }
        // Links idle for STORED_DELAY hold nothing worth keeping.
        self.links
            .retain(|_, p| !p.ranges.is_empty() || p.last_sent.is_some_and(|t| now.saturating_since(t) < STORED_DELAY));
    }

    /// The next `Stored` to send, with its link.
    pub fn poll_output(&mut self) -> Option<(LinkId, RoutingMessage)> {
        self.out.pop_front()
    }

    /// Ranges waiting, over all links (released ones not yet polled included).
    #[must_use]
    pub fn waiting(&self) -> usize {
        self.links.values().map(|p| p.ranges.len()).sum::<usize>() + self.out.len()
    }

    /// The counters.
    #[must_use]
    pub const fn stats(&self) -> &CustodyStats {
        &self.stats
    }
}

#[cfg(test)]
mod tests {
    use alloc::vec::Vec;

    use super::*;
    use crate::time::Duration;

    const T0: Timestamp = Timestamp::from_millis(1_000);

    fn at(ms: u64) -> Timestamp {
        T0 + Duration::from_millis(ms)
    }

    fn stored(link: LinkId, route: u32, generation: u8, first: u32, count: u32) -> (LinkId, RoutingMessage) {
        (link, RoutingMessage::Stored { route, generation, first, count })
    }

    fn run(c: &mut StoredCoalescer, now: Timestamp) -> Vec<(LinkId, RoutingMessage)> {
        c.handle_timeout(now);
        let mut v = Vec::new();
        while let Some(m) = c.poll_output() {
            v.push(m);
        }
        v
    }

    #[test]
    fn consecutive_counters_of_one_commit_become_one_stored() {
        let mut c = StoredCoalescer::default();
        for ctr in 5..105 {
            c.record(T0, 1, 0, 0, ctr);
        }
        assert_eq!(c.poll_timeout(), Some(T0), "a first record is due at once");
        assert_eq!(run(&mut c, T0), [stored(1, 0, 0, 5, 100)]);
        assert_eq!(c.poll_timeout(), None);
        assert_eq!((c.stats().recorded, c.stats().sent), (100, 1));
    }

    #[test]
    fn counters_wrap_modulo_2_24_and_a_gap_or_a_new_generation_starts_a_range() {
        let mut c = StoredCoalescer::default();
        let top = STORED_COUNTER_SPAN - 2;
        for ctr in [top, top + 1, 0, 1, 3] {
            c.record(T0, 1, 0, 0, ctr);
        }
        c.record(T0, 1, 0, 1, 4);
        c.record(T0, 1, 7, 1, 5);
        assert_eq!(run(&mut c, T0), [stored(1, 0, 0, top, 4)]);
        assert_eq!(run(&mut c, at(9)), [], "one per link each STORED_DELAY");
        assert_eq!(c.poll_timeout(), Some(at(10)));
        assert_eq!(run(&mut c, at(10)), [stored(1, 0, 0, 3, 1)]);
        assert_eq!(run(&mut c, at(20)), [stored(1, 0, 1, 4, 1)]);
        assert_eq!(run(&mut c, at(30)), [stored(1, 7, 1, 5, 1)]);
        assert_eq!(run(&mut c, at(40)), []);
        assert_eq!(c.poll_timeout(), None);
    }

    #[test]
    fn a_range_holds_at_most_2_24_counters() {
        let mut c = StoredCoalescer::default();
        c.record(T0, 1, 0, 0, 0);
        // Extend the range by hand to its bound: recording 2^24 packets is slow in a unit test.
        c.links.get_mut(&1).unwrap().ranges[0].count = STORED_COUNTER_SPAN;
        c.record(T0, 1, 0, 0, 0);
        assert_eq!(run(&mut c, T0), [stored(1, 0, 0, 0, STORED_COUNTER_SPAN)]);
        assert_eq!(run(&mut c, at(10)), [stored(1, 0, 0, 0, 1)]);
    }

    #[test]
    fn records_arriving_within_the_delay_wait_for_it_and_links_are_independent() {
        let mut c = StoredCoalescer::default();
        c.record(T0, 1, 0, 0, 0);
        c.record(T0, 2, 3, 1, 9);
        assert_eq!(run(&mut c, T0), [stored(1, 0, 0, 0, 1), stored(2, 3, 1, 9, 1)]);
        // Link 1 sends on: the next records wait until T0 + 10 ms and merge meanwhile.
        c.record(at(2), 1, 0, 0, 1);
        assert_eq!(c.poll_timeout(), Some(at(10)));
        c.record(at(5), 1, 0, 0, 2);
        assert_eq!(run(&mut c, at(5)), []);
        assert_eq!(run(&mut c, at(10)), [stored(1, 0, 0, 1, 2)]);
        // After a quiet period a record is due at once again.
        c.record(at(100), 1, 0, 0, 3);
        assert_eq!(c.poll_timeout(), Some(at(100)));
        assert_eq!(run(&mut c, at(100)), [stored(1, 0, 0, 3, 1)]);
        assert_eq!(c.stats().sent, 4);
    }

    #[test]
    fn waiting_ranges_are_bounded_per_link_and_forgotten_with_the_link() {
        let mut c = StoredCoalescer::new(3);
        for ctr in (0..10).map(|i| i * 2) {
            c.record(T0, 1, 0, 0, ctr);
        }
        assert_eq!(c.waiting(), 3);
        assert_eq!(c.stats().overflowed, 7);
        assert_eq!(run(&mut c, T0), [stored(1, 0, 0, 14, 1)], "the oldest were dropped");
        c.record(T0, 2, 0, 0, 0);
        c.forget(1);
        c.forget(2);
        assert_eq!(run(&mut c, at(1_000)), []);
        assert_eq!((c.waiting(), c.poll_timeout()), (0, None));
    }

    #[test]
    fn the_coalescer_covers_exactly_what_was_recorded() {
        // Model: the set of (route, generation, counter) recorded on a link, against the union
        // of the Stored ranges handed out, over a deterministic pseudo-random record sequence.
        let mut c = StoredCoalescer::default();
        let mut model = BTreeSet::new();
        let mut covered = BTreeSet::new();
        let mut x: u32 = 0x9e37_79b9;
        let mut ctr = STORED_COUNTER_SPAN - 50;
        let mut now = T0;
        let (mut route, mut generation) = (0u32, 0u8);
        for _ in 0..2_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            // Mostly consecutive, with gaps, a rekey now and then and a second handle.
            if x.is_multiple_of(97) {
                generation ^= 1;
            }
            if x.is_multiple_of(89) {
                route ^= 1;
            }
            ctr = (ctr + 1 + u32::from(x.is_multiple_of(7))) % STORED_COUNTER_SPAN;
            model.insert((route, generation, ctr));
            c.record(now, 1, route, generation, ctr);
            now = now + Duration::from_millis(u64::from(x % 3));
            for (_, m) in run(&mut c, now) {
                let RoutingMessage::Stored { route: r, generation: g, first, count } = m else { panic!("{m:?}") };
                assert!((1..=STORED_COUNTER_SPAN).contains(&count) && first < STORED_COUNTER_SPAN);
                for i in 0..count {
                    assert!(covered.insert((r, g, (first + i) % STORED_COUNTER_SPAN)), "twice");
                }
            }
        }
        for _ in 0..10_000 {
            let Some(t) = c.poll_timeout() else { break };
            for (_, m) in run(&mut c, t) {
                let RoutingMessage::Stored { route, generation, first, count } = m else { panic!("{m:?}") };
                for i in 0..count {
                    assert!(covered.insert((route, generation, (first + i) % STORED_COUNTER_SPAN)), "twice");
                }
            }
        }
        assert_eq!(c.stats().overflowed, 0);
        assert!(covered == model, "{} covered of {} recorded", covered.len(), model.len());
        assert!(c.stats().sent < 2_000 / 4, "coalesced: {} Stored", c.stats().sent);
    }
}
