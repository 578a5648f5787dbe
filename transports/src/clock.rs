//! The one place Veil reads a clock: `tokio::time::Instant`, converted to the core's
//! [`Timestamp`] (µs since the endpoint started) and back.

use tokio::time::Instant;
use veil_protocol::Timestamp;

/// A time base for sans-IO cores driven by tokio (an endpoint's, a relay's). Copy it
/// freely: every copy agrees.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    start: Instant,
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock {
    /// A time base starting now.
    #[must_use]
    pub fn new() -> Self {
        Self { start: Instant::now() }
    }

    /// Now, as the core sees it.
    #[must_use]
    pub fn now(&self) -> Timestamp {
        self.timestamp(Instant::now())
    }

    /// `at` as a timestamp. Floors to the microsecond, so that a timer armed with
    /// [`Clock::instant`] never wakes before its deadline as the core computes it.
    #[must_use]
    pub fn timestamp(&self, at: Instant) -> Timestamp {
        let micros = at.saturating_duration_since(self.start).as_micros();
        Timestamp::from_micros(u64::try_from(micros).unwrap_or(u64::MAX))
    }

    /// The instant of a core deadline (far future if it does not fit).
    #[must_use]
    pub fn instant(&self, t: Timestamp) -> Instant {
        let d = std::time::Duration::from_micros(t.as_micros());
        self.start.checked_add(d).unwrap_or_else(|| Instant::now() + std::time::Duration::from_secs(86_400 * 365))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn deadlines_round_trip_and_never_wake_early() {
        let clock = Clock::new();
        tokio::time::advance(std::time::Duration::from_millis(1_500)).await;
        let now = clock.now();
        assert_eq!(now, Timestamp::from_millis(1_500));
        let deadline = Timestamp::from_micros(2_000_123);
        tokio::time::sleep_until(clock.instant(deadline)).await;
        assert!(clock.now() >= deadline);
        assert_eq!(clock.timestamp(clock.instant(deadline)), deadline);
    }
}
