//! What the cache tells `tracing`, kept free of personal data: request
//! queries and header values never appear in a field (keys are shown up to
//! their query, then by digest), and warnings that would repeat for every
//! request while Redis fails are let through at most once a second.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::entry::now_ms;

/// A key as logged: the namespace and path, the query replaced by `?…`,
/// then the key's digest (`:{…}` and what follows it) if it has one. Redis
/// keys are escaped (a `?` appears as `%3F`); cache keys are not.
pub(crate) struct Redacted<'a>(&'a str);

/// `key` as it may be logged.
pub(crate) fn redact(key: &str) -> Redacted<'_> {
    Redacted(key)
}

impl fmt::Display for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = self.0;
        // A raw `?` (a cache key) or an escaped one (a Redis key).
        let query = match (key.find('?'), key.find("%3F")) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        match query {
            Some(query) => {
                let tail = key
                    .rfind(":{")
                    .filter(|&t| t > query)
                    .map_or("", |t| &key[t..]);
                write!(f, "{}?…{}", &key[..query], tail)
            }
            None => f.write_str(key),
        }
    }
}

/// Lets a repeated warning through at most once per second; counts the
/// ones held back in between.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    last_ms: AtomicU64,
    held: AtomicU64,
}

impl Gate {
    /// `Some(n)` when this warning may be logged, `n` being how many were
    /// held back since the last one; `None` when it is held back.
    pub(crate) fn allow(&self) -> Option<u64> {
        let now = now_ms();
        let last = self.last_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 1000
            && self
                .last_ms
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.held.swap(0, Ordering::Relaxed));
        }
        self.held.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_cut_from_logged_keys() {
        let key = "ns|/p%3Femail=a%40b.c:{0123abcd}:v:ff";
        assert_eq!(redact(key).to_string(), "ns|/p?…:{0123abcd}:v:ff");
        assert_eq!(redact("ns|/p:{0123}").to_string(), "ns|/p:{0123}");
        assert_eq!(redact("ns|/p%3Fq").to_string(), "ns|/p?…");
        assert_eq!(redact("/p?email=a@b.c").to_string(), "/p?…");
    }

    #[test]
    fn the_gate_lets_one_warning_a_second_through() {
        let gate = Gate::default();
        assert_eq!(gate.allow(), Some(0));
        assert_eq!(gate.allow(), None);
        assert_eq!(gate.allow(), None);
    }
}
