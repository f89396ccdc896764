//! The circuit breaker in front of Redis.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::entry::{duration_ms, now_ms};

/// Consecutive transport failures before the breaker opens.
#[derive(Debug)]
pub(crate) struct Breaker {
    failures: AtomicU32,
    open_until: AtomicU64,
    threshold: AtomicU32,
    cooldown_ms: AtomicU64,
}

impl Breaker {
    pub(crate) fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            failures: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            threshold: AtomicU32::new(threshold.max(1)),
            cooldown_ms: AtomicU64::new(duration_ms(cooldown)),
        }
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
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return true;
        }
        let now = now_ms();
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
        let n = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if n >= self.threshold.load(Ordering::Relaxed) {
            let next = now_ms() + self.cooldown();
            return self.open_until.swap(next, Ordering::AcqRel) == 0;
        }
        false
    }

    /// The state, for [`Stats`](crate::Stats).
    pub(crate) fn state(&self) -> crate::stats::BreakerState {
        use crate::stats::BreakerState;
        match self.open_until.load(Ordering::Acquire) {
            0 => BreakerState::Closed,
            until if now_ms() < until => BreakerState::Open,
            _ => BreakerState::HalfOpen,
        }
    }

    pub(crate) fn is_open(&self) -> bool {
        let until = self.open_until.load(Ordering::Acquire);
        until != 0 && now_ms() < until
    }
}
