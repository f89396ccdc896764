//! Exponential backoff with jitter, for every loop that retries Redis: the
//! wake-up listeners, the connection healer, the queue worker and the
//! queue's retries. Jitter spreads the processes that lost Redis at the same
//! moment (a restart, a failover), so they don't come back in step.

use std::time::Duration;

/// `base * 2^(n-1)`, at most `cap`, then a random point in its upper half:
/// never more than `cap` (the documented bounds hold), at least half of
/// the exponential step.
pub(crate) fn jittered(base: Duration, cap: Duration, n: u32) -> Duration {
    let exp = base
        .saturating_mul(1u32 << n.saturating_sub(1).min(20))
        .min(cap);
    exp.mul_f64(0.5 + rand::random_range(0.0..0.5))
}

/// The pauses of one retry loop: [`jittered`] steps from `base` up to
/// `cap`, back to `base` after [`reset`](Self::reset).
#[derive(Debug)]
pub(crate) struct Backoff {
    base: Duration,
    cap: Duration,
    failures: u32,
}

impl Backoff {
    pub(crate) fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            failures: 0,
        }
    }

    /// The pause after one more failure.
    pub(crate) fn next(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        jittered(self.base, self.cap, self.failures)
    }

    /// A success: the next failure pauses `base` again.
    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_stays_capped() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(1);
        for n in 1..40 {
            let d = jittered(base, cap, n);
            let exp = base.saturating_mul(1 << (n - 1).min(20)).min(cap);
            assert!(d >= exp / 2 && d <= exp, "{n}: {d:?}");
        }
    }

    #[test]
    fn a_loop_backs_off_to_the_cap_and_starts_over_after_a_reset() {
        let mut b = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        let pauses: Vec<Duration> = (0..12).map(|_| b.next()).collect();
        assert!(pauses[0] >= Duration::from_millis(25) && pauses[0] <= Duration::from_millis(50));
        for p in &pauses[6..] {
            assert!(
                *p >= Duration::from_secs(1) && *p <= Duration::from_secs(2),
                "{p:?}"
            );
        }
        // Jittered: twelve pauses at the cap are not all equal.
        let at_cap: Vec<Duration> = (0..12).map(|_| b.next()).collect();
        assert!(at_cap.iter().any(|p| *p != at_cap[0]), "{at_cap:?}");
        b.reset();
        assert!(b.next() <= Duration::from_millis(50));
    }
}
