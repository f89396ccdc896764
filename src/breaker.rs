//! The circuit breaker in front of Redis.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::entry::duration_ms;

/// Consecutive transport failures before the breaker opens.
///
/// Time is read from the monotonic clock ([`Instant`]), as milliseconds
/// since the breaker was made: a wall clock stepped back (NTP, a VM
/// resumed) can't keep it open longer than its cool-down, nor stepped
/// forward close it early.
#[derive(Debug)]
pub(crate) struct Breaker {
    failures: AtomicU32,
    /// When the cool-down ends, in [`ms`](Self::ms); 0: closed.
    open_until: AtomicU64,
    threshold: AtomicU32,
    cooldown_ms: AtomicU64,
    /// The instant the breaker's times count from.
    base: Instant,
}

impl Breaker {
    pub(crate) fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            failures: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            threshold: AtomicU32::new(threshold.max(1)),
            cooldown_ms: AtomicU64::new(duration_ms(cooldown)),
            base: Instant::now(),
        }
    }

    /// `at` in milliseconds since the breaker was made, plus one so that a
    /// time is never the 0 of "closed".
    fn ms(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.base).as_millis())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1)
    }

    pub(crate) fn configure(&self, threshold: u32, cooldown: Duration) {
        self.threshold.store(threshold.max(1), Ordering::Relaxed);
        self.cooldown_ms
            .store(duration_ms(cooldown), Ordering::Relaxed);
    }

    pub(crate) fn cooldown(&self) -> u64 {
        self.cooldown_ms.load(Ordering::Relaxed)
    }

    /// Whether a command may be sent. When a cool-down ends, exactly one
    /// caller wins the right to probe; the others keep bypassing until the
    /// probe succeeds.
    pub(crate) fn allow(&self) -> bool {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, at: Instant) -> bool {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return true;
        }
        let now = self.ms(at);
        if now < until {
            return false;
        }
        let next = now + self.cooldown();
        self.open_until
            .compare_exchange(until, next, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Returns true when this success closed an open breaker (a probe
    /// succeeded). The common case, a closed breaker, only reads.
    pub(crate) fn success(&self) -> bool {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Release);
        }
        self.open_until.load(Ordering::Acquire) != 0
            && self.open_until.swap(0, Ordering::AcqRel) != 0
    }

    /// Returns true when this failure opened the breaker.
    pub(crate) fn failure(&self) -> bool {
        self.failure_at(Instant::now())
    }

    fn failure_at(&self, at: Instant) -> bool {
        let n = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if n >= self.threshold.load(Ordering::Relaxed) {
            let next = self.ms(at) + self.cooldown();
            return self.open_until.swap(next, Ordering::AcqRel) == 0;
        }
        false
    }

    /// The state, for [`Stats`](crate::Stats).
    pub(crate) fn state(&self) -> crate::stats::BreakerState {
        self.state_at(Instant::now())
    }

    fn state_at(&self, at: Instant) -> crate::stats::BreakerState {
        use crate::stats::BreakerState;
        match self.open_until.load(Ordering::Acquire) {
            0 => BreakerState::Closed,
            until if self.ms(at) < until => BreakerState::Open,
            _ => BreakerState::HalfOpen,
        }
    }

    pub(crate) fn is_open(&self) -> bool {
        let until = self.open_until.load(Ordering::Acquire);
        until != 0 && self.ms(Instant::now()) < until
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::BreakerState;

    #[test]
    fn the_cool_down_is_measured_on_the_monotonic_clock_from_the_opening_failure() {
        let breaker = Breaker::new(2, Duration::from_millis(1000));
        // Opened some time after it was made: the times are offsets from
        // its own instant, never wall-clock readings.
        let opened = breaker.base + Duration::from_secs(3600);
        assert!(!breaker.failure_at(opened));
        assert!(breaker.failure_at(opened), "the second failure opens it");
        let ms = Duration::from_millis;
        assert_eq!(breaker.state_at(opened), BreakerState::Open);
        assert_eq!(breaker.state_at(opened + ms(999)), BreakerState::Open);
        assert!(!breaker.allow_at(opened + ms(999)));
        assert_eq!(breaker.state_at(opened + ms(1000)), BreakerState::HalfOpen);
        // One probe at the end of the cool-down, then open again for the
        // next cool-down until the probe reports.
        assert!(breaker.allow_at(opened + ms(1000)));
        assert!(!breaker.allow_at(opened + ms(1001)));
        assert_eq!(breaker.state_at(opened + ms(1999)), BreakerState::Open);
        assert!(breaker.success(), "the probe's success closes it");
        assert_eq!(breaker.state_at(opened + ms(1001)), BreakerState::Closed);
        assert!(breaker.allow_at(opened + ms(1001)));
    }

    #[test]
    fn an_instant_before_the_breaker_was_made_reads_as_its_start() {
        let breaker = Breaker::new(1, Duration::from_millis(10));
        let before = breaker.base.checked_sub(Duration::from_secs(1));
        if let Some(before) = before {
            assert_eq!(breaker.ms(before), 1);
        }
        assert!(breaker.failure_at(breaker.base));
        assert_eq!(breaker.state_at(breaker.base), BreakerState::Open);
        assert_eq!(
            breaker.state_at(breaker.base + Duration::from_millis(10)),
            BreakerState::HalfOpen
        );
    }
}
