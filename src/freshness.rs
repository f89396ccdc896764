//! RFC 9111 shared-cache freshness, for
//! [`FenceLayer::rfc9111`](crate::FenceLayer::rfc9111): how long a response may be served fresh,
//! how long stale, and how old it already is when it arrives.
//!
//! - The directives come from `CDN-Cache-Control` (RFC 9213) when it holds
//!   any, else from `Cache-Control`.
//! - The freshness lifetime is `s-maxage`, else `max-age`, else `Expires`
//!   minus `Date` (an invalid `Expires` means already expired), else a
//!   heuristic fraction of the time since `Last-Modified` when one is
//!   configured; without any, the response is not stored.
//! - The age on arrival (§4.2.3) is the larger of the time since `Date`
//!   and the upstream `Age` plus the time the response took to arrive (the
//!   response delay); a malformed, repeated or huge `Age` counts as stale.
//!   A response already stale on arrival is not stored.
//! - A `no-cache` response with a validator is stored to be revalidated on
//!   every use (never fresh, never served stale); without one it is not
//!   stored.
//! - Stale serving (the entry's grace) comes from `stale-while-revalidate`;
//!   on origin errors `stale-if-error` serves it longer. `no-cache`,
//!   `must-revalidate`, `proxy-revalidate` and `s-maxage` forbid both
//!   (§4.2.4), and a soft purge too ([`may_serve_stale`]).

use std::time::{Duration, SystemTime};

use http::header::{AGE, CACHE_CONTROL, DATE, ETAG, EXPIRES, HeaderName, LAST_MODIFIED};
use http::{HeaderMap, response};

/// `CDN-Cache-Control` (RFC 9213).
const CDN_CACHE_CONTROL: HeaderName = HeaderName::from_static("cdn-cache-control");

/// What RFC 9111 says about a storable response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Freshness {
    /// Freshness left on arrival: the lifetime minus the age (zero for a
    /// response stored only to be revalidated).
    pub(crate) ttl: Duration,
    /// How long past fresh it may be served stale.
    pub(crate) grace: Duration,
    /// Its age on arrival.
    pub(crate) age: Duration,
    /// How long past fresh it is kept (at least `grace`): to be served on
    /// origin errors (`stale-if-error`), or revalidated (`no-cache`).
    pub(crate) keep: Duration,
}

/// The directives in force: `CDN-Cache-Control` when it holds any (RFC
/// 9213), else `Cache-Control`.
fn directives(headers: &HeaderMap) -> Directives {
    let cdn = Directives::parse(headers, &CDN_CACHE_CONTROL);
    if cdn.any {
        cdn
    } else {
        Directives::parse(headers, &CACHE_CONTROL)
    }
}

/// The freshness of a response received at `now`, `delay` after its
/// request was sent, or why it is not stored. `heuristic` is the fraction
/// of the time since `Last-Modified` used as the lifetime of a response
/// without explicit freshness (0: none), capped at `default_keep`, which is
/// also how long a `no-cache` response without a lifetime is kept for
/// revalidation.
pub(crate) fn freshness(
    parts: &response::Parts,
    now: SystemTime,
    delay: Duration,
    heuristic: f64,
    default_keep: Duration,
) -> Result<Freshness, &'static str> {
    let headers = &parts.headers;
    let cc = directives(headers);
    if cc.no_store || cc.private {
        return Err("cache-control");
    }
    let validated = headers.contains_key(ETAG) || headers.contains_key(LAST_MODIFIED);
    if cc.no_cache && !validated {
        // Every use needs a full fetch: nothing to keep.
        return Err("no-cache without validators");
    }
    let date = date_of(headers, &DATE);
    let lifetime = if let Some(secs) = cc.s_maxage.or(cc.max_age) {
        Some(Duration::from_secs(secs))
    } else if headers.contains_key(EXPIRES) {
        Some(match date_of(headers, &EXPIRES) {
            Some(expires) => expires
                .duration_since(date.unwrap_or(now))
                .unwrap_or_default(),
            // An invalid Expires (`0`, garbage) means already expired.
            None => Duration::ZERO,
        })
    } else if heuristic > 0.0
        && let Some(modified) = date_of(headers, &LAST_MODIFIED)
    {
        let since = date
            .unwrap_or(now)
            .duration_since(modified)
            .unwrap_or_default();
        Some(since.mul_f64(heuristic.min(1.0)).min(default_keep))
    } else {
        None
    };
    let Some(upstream_age) = age(headers) else {
        return Err("malformed age");
    };
    // §4.2.3: corrected_initial_age = max(apparent_age, age_value +
    // response_delay).
    let apparent_age = date
        .and_then(|d| now.duration_since(d).ok())
        .unwrap_or_default();
    let age = apparent_age.max(upstream_age.saturating_add(delay));
    if cc.no_cache {
        // §5.2.2.4: stored, but never used without a successful
        // revalidation. Kept for the rest of its lifetime, else for the
        // layer's TTL.
        let keep = lifetime
            .map(|l| l.saturating_sub(age))
            .filter(|k| !k.is_zero())
            .unwrap_or(default_keep);
        return Ok(Freshness {
            ttl: Duration::ZERO,
            grace: Duration::ZERO,
            age,
            keep,
        });
    }
    let Some(lifetime) = lifetime else {
        return Err("no explicit freshness");
    };
    let ttl = lifetime.saturating_sub(age);
    if ttl.is_zero() {
        return Err("stale on arrival");
    }
    let (grace, keep) = if cc.forbids_stale() {
        (Duration::ZERO, Duration::ZERO)
    } else {
        let grace = Duration::from_secs(cc.stale_while_revalidate.unwrap_or(0));
        let on_error = Duration::from_secs(cc.stale_if_error.unwrap_or(0));
        (grace, grace.max(on_error))
    };
    Ok(Freshness {
        ttl,
        grace,
        age,
        keep,
    })
}

/// Whether a stored response that is no longer fresh may be served now
/// (RFC 9111 §4.2.4, RFC 5861), by its headers: never when `no-cache`,
/// `must-revalidate`, `proxy-revalidate` or `s-maxage` forbid it (a soft
/// purge included); else until `stale_ms` (its `stale-while-revalidate`
/// window), and when the origin failed (`error`: an error, a timeout, a
/// 5xx), for `stale-if-error` seconds past the end of its freshness. A soft
/// purge zeroes `fresh_ms`: its freshness then ended where the
/// `stale-while-revalidate` window began.
pub(crate) fn may_serve_stale(
    headers: &HeaderMap,
    fresh_ms: u64,
    stale_ms: u64,
    now_ms: u64,
    error: bool,
) -> bool {
    let cc = directives(headers);
    if cc.forbids_stale() {
        return false;
    }
    if now_ms < stale_ms {
        return true;
    }
    let Some(on_error) = cc.stale_if_error.filter(|_| error) else {
        return false;
    };
    let fresh_until = if fresh_ms > 0 {
        fresh_ms
    } else {
        let window = cc.stale_while_revalidate.unwrap_or(0);
        stale_ms.saturating_sub(window.saturating_mul(1000))
    };
    now_ms < fresh_until.saturating_add(on_error.saturating_mul(1000))
}

/// The largest `Age` taken as a number; larger ones count as stale.
const MAX_AGE_SECS: u64 = 1 << 31;

/// The upstream `Age`: zero when absent, `None` when repeated, malformed or
/// huge (RFC 9111 §1.2.2, §5.1).
fn age(headers: &HeaderMap) -> Option<Duration> {
    let mut values = headers.get_all(AGE).iter();
    let Some(value) = values.next() else {
        return Some(Duration::ZERO);
    };
    if values.next().is_some() {
        return None;
    }
    let value = value.as_bytes().trim_ascii();
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let secs = parse_seconds(value)?;
    (secs < MAX_AGE_SECS).then(|| Duration::from_secs(secs))
}

fn date_of(headers: &HeaderMap, name: &HeaderName) -> Option<SystemTime> {
    let value = headers.get(name)?.to_str().ok()?;
    httpdate::parse_http_date(value.trim()).ok()
}

/// The response directives RFC 9111 §5.2.2 and RFC 5861 define.
#[derive(Debug, Default, PartialEq, Eq)]
struct Directives {
    /// Whether the field held any directive at all.
    any: bool,
    no_store: bool,
    no_cache: bool,
    private: bool,
    must_revalidate: bool,
    proxy_revalidate: bool,
    max_age: Option<u64>,
    s_maxage: Option<u64>,
    stale_while_revalidate: Option<u64>,
    stale_if_error: Option<u64>,
}

impl Directives {
    /// `no-cache`, `must-revalidate`, `proxy-revalidate` and `s-maxage`
    /// (which implies `proxy-revalidate`) forbid serving it stale.
    fn forbids_stale(&self) -> bool {
        self.no_cache || self.must_revalidate || self.proxy_revalidate || self.s_maxage.is_some()
    }

    fn parse(headers: &HeaderMap, name: &HeaderName) -> Self {
        let mut d = Self::default();
        for value in headers.get_all(name) {
            for directive in split_directives(value.as_bytes()) {
                let (name, arg) = match directive.iter().position(|&b| b == b'=') {
                    Some(i) => (&directive[..i], Some(&directive[i + 1..])),
                    None => (directive, None),
                };
                let name = name.trim_ascii().to_ascii_lowercase();
                let seconds = || arg.and_then(parse_seconds);
                d.any = true;
                match name.as_slice() {
                    b"no-store" => d.no_store = true,
                    // Qualified forms (`no-cache="x"`) count in full.
                    b"no-cache" => d.no_cache = true,
                    b"private" => d.private = true,
                    b"must-revalidate" => d.must_revalidate = true,
                    b"proxy-revalidate" => d.proxy_revalidate = true,
                    b"max-age" => d.max_age = d.max_age.or_else(seconds),
                    b"s-maxage" => d.s_maxage = d.s_maxage.or_else(seconds),
                    b"stale-while-revalidate" => {
                        d.stale_while_revalidate = d.stale_while_revalidate.or_else(seconds)
                    }
                    b"stale-if-error" => d.stale_if_error = d.stale_if_error.or_else(seconds),
                    _ => {}
                }
            }
        }
        d
    }
}

/// Splits on commas outside quoted strings.
pub(crate) fn split_directives(value: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let (mut start, mut quoted) = (0, false);
    for (i, &b) in value.iter().enumerate() {
        match b {
            b'"' => quoted = !quoted,
            b',' if !quoted => {
                out.push(value[start..i].trim_ascii());
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(value[start..].trim_ascii());
    out.retain(|d| !d.is_empty());
    out
}

/// Delta-seconds (RFC 9111 1.2.2): digits, possibly quoted; values too large
/// saturate, anything else is invalid.
pub(crate) fn parse_seconds(arg: &[u8]) -> Option<u64> {
    let arg = arg.trim_ascii();
    let arg = arg
        .strip_prefix(b"\"")
        .and_then(|a| a.strip_suffix(b"\""))
        .unwrap_or(arg);
    if arg.is_empty() || !arg.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(arg.iter().fold(0u64, |acc, &d| {
        acc.saturating_mul(10).saturating_add(u64::from(d - b'0'))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: &str = "Tue, 01 Dec 2026 12:00:00 GMT";

    fn now() -> SystemTime {
        httpdate::parse_http_date(NOW).unwrap()
    }

    fn parts(pairs: &[(&'static str, &'static str)]) -> response::Parts {
        let mut res = http::Response::new(());
        for (k, v) in pairs {
            res.headers_mut().append(*k, v.parse().unwrap());
        }
        res.into_parts().0
    }

    fn fresh(pairs: &[(&'static str, &'static str)]) -> Result<Freshness, &'static str> {
        freshness(
            &parts(pairs),
            now(),
            Duration::ZERO,
            0.0,
            Duration::from_secs(3600),
        )
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn the_lifetime_comes_from_cdn_cache_control_then_s_maxage_max_age_expires() {
        let f = |pairs| fresh(pairs).map(|f| f.ttl);
        assert_eq!(f(&[("cache-control", "max-age=60")]), Ok(secs(60)));
        assert_eq!(
            f(&[("cache-control", "max-age=60, s-maxage=30")]),
            Ok(secs(30))
        );
        assert_eq!(
            f(&[
                ("cache-control", "max-age=60"),
                ("cdn-cache-control", "max-age=600")
            ]),
            Ok(secs(600))
        );
        // CDN-Cache-Control replaces Cache-Control, no-store included.
        assert_eq!(
            f(&[
                ("cache-control", "max-age=60"),
                ("cdn-cache-control", "no-store")
            ]),
            Err("cache-control")
        );
        assert_eq!(
            f(&[("date", NOW), ("expires", "Tue, 01 Dec 2026 12:02:00 GMT")]),
            Ok(secs(120))
        );
        assert_eq!(
            f(&[("date", NOW), ("expires", "0")]),
            Err("stale on arrival")
        );
        assert_eq!(f(&[]), Err("no explicit freshness"));
        assert_eq!(
            f(&[("cache-control", "no-cache, max-age=60")]),
            Err("no-cache without validators")
        );
    }

    #[test]
    fn no_cache_with_a_validator_is_kept_to_be_revalidated_on_every_use() {
        let got = fresh(&[("cache-control", "no-cache"), ("etag", "\"a\"")]).unwrap();
        assert_eq!(
            (got.ttl, got.grace, got.keep),
            (Duration::ZERO, Duration::ZERO, secs(3600))
        );
        let got = fresh(&[
            (
                "cache-control",
                "no-cache, max-age=600, stale-if-error=9999",
            ),
            ("last-modified", "Tue, 01 Dec 2026 02:00:00 GMT"),
            ("age", "100"),
        ])
        .unwrap();
        assert_eq!((got.ttl, got.keep), (Duration::ZERO, secs(500)));
        // In CDN-Cache-Control only, it still counts.
        assert!(
            fresh(&[
                ("cache-control", "max-age=60"),
                ("cdn-cache-control", "no-cache"),
            ])
            .is_err()
        );
    }

    #[test]
    fn the_response_delay_counts_in_the_age() {
        let at = |pairs: &[(&'static str, &'static str)], delay| {
            freshness(&parts(pairs), now(), delay, 0.0, secs(1)).map(|f| (f.ttl, f.age))
        };
        // corrected_age_value = age_value + response_delay.
        assert_eq!(
            at(&[("cache-control", "max-age=60"), ("age", "20")], secs(5)),
            Ok((secs(35), secs(25)))
        );
        // Without Age the delay alone is the age.
        assert_eq!(
            at(&[("cache-control", "max-age=60")], secs(5)),
            Ok((secs(55), secs(5)))
        );
        // The apparent age wins when larger.
        assert_eq!(
            at(
                &[
                    ("cache-control", "max-age=60"),
                    ("age", "1"),
                    ("date", "Tue, 01 Dec 2026 11:59:30 GMT")
                ],
                secs(5)
            ),
            Ok((secs(30), secs(30)))
        );
        assert_eq!(
            at(&[("cache-control", "max-age=60"), ("age", "58")], secs(2)),
            Err("stale on arrival")
        );
    }

    #[test]
    fn the_age_on_arrival_counts_and_bad_ages_are_stale() {
        let got = fresh(&[("cache-control", "max-age=60"), ("age", "20")]).unwrap();
        assert_eq!((got.ttl, got.age), (secs(40), secs(20)));
        assert_eq!(
            fresh(&[("cache-control", "max-age=60"), ("age", "60")]),
            Err("stale on arrival")
        );
        for bad in ["-1", "1.5", "abc", "99999999999999999999"] {
            let pairs = [("cache-control", "max-age=60"), ("age", bad)];
            assert!(fresh(&pairs).is_err(), "{bad}");
        }
        assert!(fresh(&[("cache-control", "max-age=60"), ("age", "1"), ("age", "2")]).is_err());
        // Date in the past counts too (apparent age); a Date in the future doesn't.
        let old = fresh(&[
            ("cache-control", "max-age=60"),
            ("date", "Tue, 01 Dec 2026 11:59:30 GMT"),
        ])
        .unwrap();
        assert_eq!(old.ttl, secs(30));
        let ahead = fresh(&[
            ("cache-control", "max-age=60"),
            ("date", "Tue, 01 Dec 2026 12:10:00 GMT"),
        ])
        .unwrap();
        assert_eq!(ahead.ttl, secs(60));
    }

    #[test]
    fn stale_serving_comes_from_the_response_and_revalidation_forbids_it() {
        let grace = |cc| fresh(&[("cache-control", cc)]).unwrap().grace;
        assert_eq!(grace("max-age=60"), Duration::ZERO);
        assert_eq!(grace("max-age=60, stale-while-revalidate=30"), secs(30));
        for strict in ["must-revalidate", "proxy-revalidate", "s-maxage=60"] {
            let cc = format!("max-age=60, stale-while-revalidate=30, {strict}");
            let got = freshness(
                &parts(&[("cache-control", Box::leak(cc.into_boxed_str()))]),
                now(),
                Duration::ZERO,
                0.0,
                secs(1),
            )
            .unwrap();
            assert_eq!(
                (got.grace, got.keep),
                (Duration::ZERO, Duration::ZERO),
                "{strict}"
            );
        }
        let got = fresh(&[(
            "cache-control",
            "max-age=60, stale-while-revalidate=30, stale-if-error=300",
        )])
        .unwrap();
        assert_eq!((got.grace, got.keep), (secs(30), secs(300)));
    }

    #[test]
    fn stale_is_served_as_the_stored_headers_allow() {
        let h = |cc: &'static str| parts(&[("cache-control", cc)]).headers;
        let may = |cc, fresh, stale, now, error| may_serve_stale(&h(cc), fresh, stale, now, error);
        let swr = "max-age=60, stale-while-revalidate=10, stale-if-error=100";
        // Inside the stale-while-revalidate window, error or not.
        assert!(may(swr, 60_000, 70_000, 65_000, false));
        // Beyond it, only on an error, up to stale-if-error past freshness.
        assert!(!may(swr, 60_000, 70_000, 75_000, false));
        assert!(may(swr, 60_000, 70_000, 159_999, true));
        assert!(!may(swr, 60_000, 70_000, 160_000, true));
        // Soft purged (fresh 0): freshness ended where the window began.
        assert!(may(swr, 0, 70_000, 159_999, true));
        assert!(!may(swr, 0, 70_000, 160_000, true));
        // Forbidden by the revalidation directives, a purge included.
        for strict in [
            "max-age=60, stale-if-error=100, must-revalidate",
            "max-age=60, stale-if-error=100, proxy-revalidate",
            "max-age=60, s-maxage=60, stale-if-error=100",
            "no-cache, stale-if-error=100",
        ] {
            assert!(!may(strict, 0, 70_000, 65_000, false), "{strict}");
            assert!(!may(strict, 60_000, 70_000, 65_000, true), "{strict}");
        }
    }

    #[test]
    fn heuristic_freshness_only_when_configured() {
        let pairs = [
            ("date", NOW),
            ("last-modified", "Tue, 01 Dec 2026 02:00:00 GMT"),
        ];
        assert!(fresh(&pairs).is_err());
        let got = freshness(&parts(&pairs), now(), Duration::ZERO, 0.1, secs(3600)).unwrap();
        assert_eq!(got.ttl, secs(3600));
        let got = freshness(&parts(&pairs), now(), Duration::ZERO, 0.01, secs(3600)).unwrap();
        assert_eq!(got.ttl, secs(360));
    }
}
