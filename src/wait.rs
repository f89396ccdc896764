//! Waiting on another process's fill: backed-off polling with jitter. Wake-up
//! notifications (see `wake.rs`) cut the wait short; the poll is the
//! fallback because pub/sub may drop a message.

use std::time::Duration;

/// First pause between polls.
pub(crate) const FIRST: Duration = Duration::from_millis(5);
/// Longest pause between polls.
pub(crate) const CAP: Duration = Duration::from_millis(100);

/// Exponential backoff from [`FIRST`] to [`CAP`], each pause with up to
/// +50% jitter so that waiters in many processes don't poll in step.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    pub(crate) fn new() -> Self {
        Self { next: FIRST }
    }

    /// Backoff whose first pause is `first` (even above [`CAP`]), then
    /// [`CAP`]: for a waiter whose wake-up is confirmed to reach it, polling
    /// is only the fallback for a message lost with its connection.
    pub(crate) fn from(first: Duration) -> Self {
        Self { next: first }
    }

    pub(crate) fn next(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(CAP);
        let jitter = rand::random_range(0.0..0.5);
        base.mul_f64(1.0 + jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_with_bounded_jitter() {
        let mut b = Backoff::new();
        let pauses: Vec<Duration> = (0..10).map(|_| b.next()).collect();
        assert!(pauses[0] >= FIRST && pauses[0] <= FIRST.mul_f64(1.5));
        for p in &pauses[6..] {
            assert!(*p >= CAP && *p <= CAP.mul_f64(1.5), "{p:?}");
        }
    }
}
