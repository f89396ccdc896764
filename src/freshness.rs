//! RFC 9111 shared-cache freshness, for
//! [`FenceLayer::rfc9111`](crate::FenceLayer::rfc9111): how long a response may be served fresh,
//! how long stale, and how old it already is when it arrives.
//!
//! - The directives come from `CDN-Cache-Control` (RFC 9213) when it holds
//!   any, else from `Cache-Control`.
//! - The freshness lifetime is `s-maxage`, else `max-age`, else `Expires`
//!   minus `Date` (an invalid `Expires` means already expired), else a
//!   heuristic fraction of the time since `Last-Modified` when one is
//!   configured (for the statuses the layer caches without explicit
//!   freshness); without any, the response is not stored. Explicit
//!   freshness makes any final status storable (§3).
//! - `must-understand` stores a status the cache understands despite
//!   `no-store`, and never one it doesn't (§5.2.2.3).
//! - A response with a validator is kept past its freshness for the
//!   revalidation window, to be revalidated (§4.3), never served unvalidated.
//! - The age on arrival (§4.2.3) is the larger of the time since `Date`
//!   and the upstream `Age` plus the time the response took to arrive (the
//!   response delay); `Age` is its first member, ignored when invalid
//!   (§5.1), at most 2^31 s.
//!   A response already stale on arrival is not stored, unless it has a
//!   validator: then it is kept for the revalidation window, to be
//!   revalidated on its next use.
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

/// What the layer adds to RFC 9111's rules for one response.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Knobs {
    /// The fraction of the time since `Last-Modified` used as the lifetime
    /// of a response without explicit freshness (0: none), capped at
    /// `default_keep`.
    pub(crate) heuristic: f64,
    /// How long a `no-cache` response without a lifetime is kept for
    /// revalidation; the cap of a heuristic lifetime.
    pub(crate) default_keep: Duration,
    /// The longest heuristic lifetime (`None`: `default_keep`).
    pub(crate) heuristic_max: Option<Duration>,
    /// How long past its freshness a response with a validator is kept to
    /// be revalidated (§4.3) instead of refetched (zero: not kept).
    pub(crate) revalidate_for: Duration,
    /// Whether the status is one the layer caches without explicit
    /// freshness (its [`statuses`](crate::FenceLayer::statuses), by default
    /// the heuristically cacheable ones): others need an explicit lifetime.
    pub(crate) listed: bool,
}

/// The freshness of a response received at `now`, `delay` after its
/// request was sent, or why it is not stored. `heuristic` is the fraction
/// of the time since `Last-Modified` used as the lifetime of a response
/// without explicit freshness (0: none), capped at `default_keep`, which is
/// also how long a `no-cache` response without a lifetime is kept for
/// revalidation.
#[cfg(test)]
pub(crate) fn freshness(
    parts: &response::Parts,
    now: SystemTime,
    delay: Duration,
    heuristic: f64,
    default_keep: Duration,
) -> Result<Freshness, &'static str> {
    let knobs = Knobs {
        heuristic,
        default_keep,
        heuristic_max: None,
        revalidate_for: Duration::ZERO,
        listed: true,
    };
    freshness_with(parts, now, delay, &knobs)
}

/// [`freshness`] with every knob.
pub(crate) fn freshness_with(
    parts: &response::Parts,
    now: SystemTime,
    delay: Duration,
    knobs: &Knobs,
) -> Result<Freshness, &'static str> {
    let Knobs {
        heuristic,
        default_keep,
        heuristic_max,
        revalidate_for,
        listed,
    } = *knobs;
    let headers = &parts.headers;
    let cc = directives(headers);
    // §5.2.2.3: with `must-understand`, a status the cache understands is
    // stored whatever `no-store` says, one it doesn't never.
    let understood = parts.status.canonical_reason().is_some();
    if cc.must_understand && !understood {
        return Err("must-understand");
    }
    if (cc.no_store && !cc.must_understand) || cc.private {
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
        && listed
        && let Some(modified) = date_of(headers, &LAST_MODIFIED)
    {
        let since = date
            .unwrap_or(now)
            .duration_since(modified)
            .unwrap_or_default();
        Some(
            since
                .mul_f64(heuristic.min(1.0))
                .min(heuristic_max.unwrap_or(default_keep)),
        )
    } else {
        None
    };
    if !listed && lifetime.is_none() {
        // Any final status is storable with explicit freshness (§3); the
        // others only as the layer's status list says.
        return Err("status");
    }
    let upstream_age = age(headers);
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
        if validated && !revalidate_for.is_zero() {
            // Stale on arrival (`max-age=0`, an `Expires` past) but with a
            // validator: kept to be revalidated on its next use, as a
            // `no-cache` response is (§4.3), never served as it is.
            return Ok(Freshness {
                ttl: Duration::ZERO,
                grace: Duration::ZERO,
                age,
                keep: revalidate_for,
            });
        }
        return Err("stale on arrival");
    }
    let (grace, keep) = if cc.forbids_stale() {
        (Duration::ZERO, Duration::ZERO)
    } else {
        let grace = Duration::from_secs(cc.stale_while_revalidate.unwrap_or(0));
        let on_error = Duration::from_secs(cc.stale_if_error.unwrap_or(0));
        (grace, grace.max(on_error))
    };
    // §4.3: a response with a validator outlives its freshness, to be
    // revalidated (never served without it: `may_serve_stale`), not
    // refetched; `must-revalidate` and friends included.
    let keep = if validated {
        keep.max(revalidate_for)
    } else {
        keep
    };
    Ok(Freshness {
        ttl,
        grace,
        age,
        keep,
    })
}

/// Whether the directives in force refuse a lifetime set by a handler
/// ([`CacheTtl`](crate::CacheTtl)): `no-store` (unless `must-understand`),
/// `private`, `no-cache`.
pub(crate) fn refuses_set_ttl(headers: &HeaderMap) -> bool {
    let cc = directives(headers);
    (cc.no_store && !cc.must_understand) || cc.private || cc.no_cache
}

/// Whether a response to a request with `Authorization` may be stored by a
/// shared cache and reused (RFC 9111 §3.5): `public`, `s-maxage` or
/// `must-revalidate` in the directives in force.
pub(crate) fn allows_authorized(headers: &HeaderMap) -> bool {
    let cc = directives(headers);
    cc.public || cc.s_maxage.is_some() || cc.must_revalidate
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

/// The largest `Age` taken as a number (§1.2.2: larger ones, and
/// overflows, are 2^31 seconds, stale on arrival for any lifetime).
const MAX_AGE_SECS: u64 = 1 << 31;

/// The upstream `Age` (RFC 9111 §5.1): the first member of the field (a
/// list, or several lines, keep the first), as delta-seconds (§1.2.2);
/// zero when absent or invalid (a float, a sign, a suffix: the field is
/// ignored), at most 2^31 seconds.
fn age(headers: &HeaderMap) -> Duration {
    let Some(value) = headers.get(AGE) else {
        return Duration::ZERO;
    };
    let bytes = value.as_bytes();
    let first = bytes.split(|&b| b == b',').next().unwrap_or_default();
    let first = first.trim_ascii();
    if first.is_empty() || !first.iter().all(u8::is_ascii_digit) {
        return Duration::ZERO;
    }
    let secs = parse_seconds(first).unwrap_or(MAX_AGE_SECS);
    Duration::from_secs(secs.min(MAX_AGE_SECS))
}

/// Parses an HTTP date as RFC 9110 §5.6.7 says recipients accept it:
/// IMF-fixdate, the obsolete RFC 850 and asctime formats, day and month
/// names in any case (RFC 850's two-digit years 70..=99 are 19xx, the
/// others 20xx).
pub(crate) fn parse_date(value: &[u8]) -> Option<SystemTime> {
    let text = std::str::from_utf8(value).ok()?.trim();
    if let Ok(t) = httpdate::parse_http_date(text) {
        return Some(t);
    }
    // Names in the canonical case: `monday` -> `Monday`, `NOV` -> `Nov`,
    // `gmt` -> `GMT`.
    let mut canonical = String::with_capacity(text.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        if word.eq_ignore_ascii_case("gmt") {
            out.push_str("GMT");
        } else {
            for (i, c) in word.chars().enumerate() {
                out.push(if i == 0 {
                    c.to_ascii_uppercase()
                } else {
                    c.to_ascii_lowercase()
                });
            }
        }
        word.clear();
    };
    for c in text.chars() {
        if c.is_ascii_alphabetic() {
            word.push(c);
        } else {
            flush(&mut word, &mut canonical);
            canonical.push(c);
        }
    }
    flush(&mut word, &mut canonical);
    httpdate::parse_http_date(&canonical).ok()
}

fn date_of(headers: &HeaderMap, name: &HeaderName) -> Option<SystemTime> {
    parse_date(headers.get(name)?.as_bytes())
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
    must_understand: bool,
    public: bool,
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
                    b"must-understand" => d.must_understand = true,
                    b"public" => d.public = true,
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
    fn the_age_on_arrival_counts_and_bad_ages_are_ignored() {
        let got = fresh(&[("cache-control", "max-age=60"), ("age", "20")]).unwrap();
        assert_eq!((got.ttl, got.age), (secs(40), secs(20)));
        assert_eq!(
            fresh(&[("cache-control", "max-age=60"), ("age", "60")]),
            Err("stale on arrival")
        );
        // §5.1: invalid values are ignored, never a reason not to store.
        for bad in ["-1", "1.5", "abc", "1a", " ", "0x10"] {
            let pairs = [("cache-control", "max-age=60"), ("age", bad)];
            assert_eq!(fresh(&pairs).map(|f| f.age), Ok(secs(0)), "{bad}");
        }
        // The first member of a list, or of several lines, counts.
        let first = |pairs: &[(&'static str, &'static str)]| fresh(pairs).map(|f| f.age);
        assert_eq!(
            first(&[("cache-control", "max-age=60"), ("age", "10, 20")]),
            Ok(secs(10))
        );
        assert_eq!(
            first(&[
                ("cache-control", "max-age=60"),
                ("age", "10"),
                ("age", "30")
            ]),
            Ok(secs(10))
        );
        // Too large: 2^31 s, stale on arrival (§1.2.2).
        assert_eq!(
            fresh(&[
                ("cache-control", "max-age=60"),
                ("age", "99999999999999999999")
            ]),
            Err("stale on arrival")
        );
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
    fn dates_in_every_format_rfc_9110_accepts() {
        let want = parse_date(b"Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        for v in [
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
            "sun, 06 nov 1994 08:49:37 gmt",
            "SUNDAY, 06-NOV-94 08:49:37 GMT",
            "sun NOV  6 08:49:37 1994",
            " Sun, 06 Nov 1994 08:49:37 GMT ",
        ] {
            assert_eq!(parse_date(v.as_bytes()), Some(want), "{v}");
        }
        assert_eq!(parse_date(b"yesterday"), None);
        assert_eq!(parse_date(b"0"), None);
    }

    fn with(
        status: u16,
        pairs: &[(&'static str, &'static str)],
        listed: bool,
        heuristic: f64,
    ) -> Result<Freshness, &'static str> {
        let mut p = parts(pairs);
        p.status = http::StatusCode::from_u16(status).unwrap();
        let knobs = Knobs {
            heuristic,
            default_keep: secs(3600),
            heuristic_max: None,
            revalidate_for: secs(600),
            listed,
        };
        freshness_with(&p, now(), Duration::ZERO, &knobs)
    }

    #[test]
    fn explicit_freshness_makes_any_status_storable_and_heuristics_only_listed_ones() {
        for status in [302, 307, 400, 500, 503, 599] {
            let got = with(status, &[("cache-control", "max-age=60")], false, 0.1);
            assert_eq!(got.map(|f| f.ttl), Ok(secs(60)), "{status}");
            let got = with(
                status,
                &[("date", NOW), ("expires", "Tue, 01 Dec 2026 12:01:00 GMT")],
                false,
                0.1,
            );
            assert_eq!(got.map(|f| f.ttl), Ok(secs(60)), "{status}");
        }
        let modified = [
            ("date", NOW),
            ("last-modified", "Tue, 01 Dec 2026 02:00:00 GMT"),
        ];
        assert_eq!(with(500, &modified, false, 0.1), Err("status"));
        assert_eq!(
            with(200, &modified, true, 0.1).map(|f| f.ttl),
            Ok(secs(3600))
        );
    }

    #[test]
    fn must_understand_stores_an_understood_status_despite_no_store() {
        let cc = [("cache-control", "max-age=60, must-understand, no-store")];
        assert_eq!(with(200, &cc, true, 0.0).map(|f| f.ttl), Ok(secs(60)));
        assert_eq!(with(299, &cc, false, 0.0), Err("must-understand"));
        let cc = [("cache-control", "max-age=60, no-store")];
        assert_eq!(with(200, &cc, true, 0.0), Err("cache-control"));
    }

    #[test]
    fn a_response_with_a_validator_is_kept_to_be_revalidated() {
        for cc in ["max-age=60", "max-age=60, must-revalidate", "s-maxage=60"] {
            let pairs = [("cache-control", cc), ("etag", "\"a\"")];
            let got = with(200, &pairs, true, 0.0).unwrap();
            assert_eq!((got.grace, got.keep), (secs(0), secs(600)), "{cc}");
            let got = with(200, &[("cache-control", cc)], true, 0.0).unwrap();
            assert_eq!(got.keep, secs(0), "{cc}");
        }
        let pairs = [
            ("cache-control", "max-age=60, stale-if-error=900"),
            ("last-modified", "Tue, 01 Dec 2026 02:00:00 GMT"),
        ];
        assert_eq!(with(200, &pairs, true, 0.0).unwrap().keep, secs(900));
        // Stale on arrival: kept only to be revalidated.
        for stale in [
            [("cache-control", "max-age=0"), ("etag", "\"a\"")],
            [
                ("expires", "Tue, 01 Dec 2026 11:00:00 GMT"),
                ("etag", "\"a\""),
            ],
        ] {
            let got = with(200, &stale, true, 0.0).unwrap();
            assert_eq!(
                (got.ttl, got.grace, got.keep),
                (secs(0), secs(0), secs(600))
            );
        }
        assert_eq!(
            with(200, &[("cache-control", "max-age=0")], true, 0.0),
            Err("stale on arrival")
        );
    }

    #[test]
    fn cdn_cache_control_overrides_no_store_in_cache_control() {
        let pairs = [
            ("cache-control", "no-store"),
            ("cdn-cache-control", "max-age=60"),
        ];
        assert_eq!(with(200, &pairs, true, 0.0).map(|f| f.ttl), Ok(secs(60)));
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
