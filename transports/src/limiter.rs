//! Per-address handshake rate limit: one token bucket per IP address.
//!
//! Time is an argument (the endpoint's [`Clock`](crate::clock::Clock)), so the
//! limiter is tested without waiting.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use veil_protocol::Timestamp;

/// Buckets kept before idle (full) ones are pruned. Bounds memory under a flood of
/// source addresses; a flood of spoofed UDP sources is the cookie challenge's job.
const MAX_BUCKETS: usize = 65_536;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Timestamp,
}

/// Token buckets keyed by source IP.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    per_second: f64,
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl RateLimiter {
    pub(crate) fn new(per_second: f64, burst: u32) -> Self {
        Self { per_second: per_second.max(0.0), burst: f64::from(burst.max(1)), buckets: Mutex::new(HashMap::new()) }
    }

    fn refill(&self, b: &mut Bucket, now: Timestamp) {
        let elapsed = now.saturating_since(b.last).as_micros() as f64 / 1e6;
        b.tokens = (b.tokens + elapsed * self.per_second).min(self.burst);
        b.last = now;
    }

    /// Takes one token for `ip`; `false` when its bucket is empty.
    pub(crate) fn allow(&self, ip: IpAddr, now: Timestamp) -> bool {
        self.take(ip, now, 0.0)
    }

    /// Takes one token for `ip` only while its bucket is at least half full; `false` below
    /// that. For sources that have not proven their address (spec §5.7.4): the lower half of
    /// every bucket is kept for the address's real owner, who can return a cookie.
    pub(crate) fn allow_unproven(&self, ip: IpAddr, now: Timestamp) -> bool {
        self.take(ip, now, self.burst / 2.0)
    }

    /// Takes a token if more than `reserve` would remain.
    fn take(&self, ip: IpAddr, now: Timestamp, reserve: f64) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(&ip) {
            // A full bucket carries no information: forgetting it changes no decision.
            buckets.retain(|_, b| {
                let mut b2 = *b;
                self.refill(&mut b2, now);
                b2.tokens < self.burst
            });
            if buckets.len() >= MAX_BUCKETS {
                buckets.clear();
            }
        }
        let b = buckets.entry(ip).or_insert(Bucket { tokens: self.burst, last: now });
        self.refill(b, now);
        if b.tokens >= 1.0 + reserve {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn ip(n: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, n))
    }

    #[test]
    fn burst_then_sustained_rate_per_address() {
        let l = RateLimiter::new(2.0, 3);
        let t0 = Timestamp::from_millis(10_000);
        assert!((0..3).all(|_| l.allow(ip(1), t0)));
        assert!(!l.allow(ip(1), t0), "burst exhausted");
        assert!(l.allow(ip(2), t0), "buckets are per address");
        // 2 per second: one token every 500 ms.
        assert!(!l.allow(ip(1), Timestamp::from_millis(10_499)));
        assert!(l.allow(ip(1), Timestamp::from_millis(10_500)));
        assert!(!l.allow(ip(1), Timestamp::from_millis(10_600)));
        // A long pause refills to the burst, not beyond.
        let later = Timestamp::from_millis(100_000);
        assert_eq!((0..10).filter(|_| l.allow(ip(1), later)).count(), 3);
    }

    #[test]
    fn unproven_sources_cannot_take_the_lower_half_of_a_bucket() {
        let l = RateLimiter::new(0.0, 4);
        let t = Timestamp::ZERO;
        // A spoofer without cookies gets the upper half only…
        assert_eq!((0..10).filter(|_| l.allow_unproven(ip(1), t)).count(), 2);
        // …and the address's owner, once proven, still has the lower half.
        assert_eq!((0..10).filter(|_| l.allow(ip(1), t)).count(), 2);
        // A bucket of one has no upper half: every unproven source needs a cookie.
        let one = RateLimiter::new(0.0, 1);
        assert!(!one.allow_unproven(ip(2), t));
        assert!(one.allow(ip(2), t));
    }

    #[test]
    fn zero_rate_allows_only_the_burst() {
        let l = RateLimiter::new(0.0, 2);
        assert!(l.allow(ip(1), Timestamp::ZERO));
        assert!(l.allow(ip(1), Timestamp::ZERO));
        assert!(!l.allow(ip(1), Timestamp::from_millis(1_000_000)));
    }
}
