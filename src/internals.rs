//! Entry points into the hit path for the crate's micro-benchmarks
//! (`benches/hit_path.rs`). Not part of the API: hidden, and may change in
//! any release.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};

use crate::config::Config;
use crate::entry::{Entry, Raw, Record};
use crate::flight::CacheStatus;
use crate::key::EntryKey;

/// The hash fields of an entry as `HGETALL` returns them.
pub type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// The Redis key a request's cache key is stored under (the digests and
/// escaping every lookup does).
///
/// ```
/// let key = cachefence::internals::entry_key("ns:", "/p?a=1\nhost:example.com");
/// assert!(key.starts_with("ns:|/p") && key.contains(":{"));
/// ```
pub fn entry_key(namespace: &str, key: &str) -> String {
    EntryKey::new(namespace, key).primary
}

/// The fields of a stored `200` with a `content-type`, an `etag` and a
/// body of `body_len` bytes, fresh for a minute from `now_ms`.
///
/// ```
/// let fields = cachefence::internals::sample_fields(4096, 0);
/// assert!(fields.iter().any(|(k, _)| k == b"body"));
/// ```
pub fn sample_fields(body_len: usize, now_ms: u64) -> Fields {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    headers.insert("etag", HeaderValue::from_static("\"v1\""));
    let entry = Entry {
        status: StatusCode::OK,
        headers,
        body: Bytes::from(vec![b'x'; body_len]),
        delta: Duration::from_millis(20),
        stored_ms: now_ms,
        fresh_ms: now_ms + 60_000,
        stale_ms: now_ms + 90_000,
        retry_ms: 0,
    };
    entry
        .to_fields("/p?a=1\nhost:example.com", "0123456789abcdef")
        .into_iter()
        .map(|(k, v)| (k.as_bytes().to_vec(), v))
        .collect()
}

/// The values `HMGET` returns for an entry with [`sample_fields`]' fields
/// (the hit's one command reads these fields only, in this order).
///
/// ```
/// let values = cachefence::internals::sample_values(4096, 0);
/// assert!(values.iter().any(|v| v.as_ref().is_some_and(|v| v.len() == 4096)));
/// ```
pub fn sample_values(body_len: usize, now_ms: u64) -> Values {
    crate::entry::lookup_values(&sample_fields(body_len, now_ms))
}

/// The values of an `HMGET` reply, `None` for a missing field.
pub type Values = Vec<Option<Bytes>>;

/// Decodes fields as a script's reply is decoded: whether they hold an
/// entry.
///
/// ```
/// let fields = cachefence::internals::sample_fields(16, 0);
/// assert!(cachefence::internals::decode(fields, 1));
/// ```
pub fn decode(fields: Fields, now_ms: u64) -> bool {
    matches!(Record::decode(fields, now_ms), Record::Entry(_))
}

/// Decodes `HMGET` values as a lookup does: whether they hold an entry.
///
/// ```
/// let values = cachefence::internals::sample_values(16, 0);
/// assert!(cachefence::internals::decode_values(values, 1));
/// ```
pub fn decode_values(values: Values, now_ms: u64) -> bool {
    matches!(
        Record::from_raw(Raw::from_values(values), now_ms),
        Record::Entry(_)
    )
}

/// Decodes `HMGET` values and builds the response a hit sends (default
/// settings): its header count, or `None` when they hold no entry.
///
/// ```
/// let values = cachefence::internals::sample_values(16, 0);
/// assert!(cachefence::internals::hit_response(values, 1).is_some());
/// ```
pub fn hit_response(values: Values, now_ms: u64) -> Option<usize> {
    let Record::Entry(entry) = Record::from_raw(Raw::from_values(values), now_ms) else {
        return None;
    };
    // Made once, as a layer's is: the bench measures the response only.
    static CONFIG: std::sync::OnceLock<Config> = std::sync::OnceLock::new();
    let config = CONFIG.get_or_init(Config::default);
    let res = crate::response::from_owned_entry::<http_body_util::Empty<Bytes>>(
        config,
        entry,
        CacheStatus::Hit,
        false,
        now_ms,
    );
    Some(res.headers().len())
}

/// A near cache in use (its subscription up), for the near-hit benchmark:
/// what a near hit does in `serve` before building the response.
///
/// ```
/// let near = cachefence::internals::NearCache::new(1 << 20);
/// let key = cachefence::internals::entry_key("ns:", "/p");
/// assert!(near.admit(&key, 16, u64::MAX));
/// assert!(near.get(&key, 0));
/// ```
#[derive(Debug)]
pub struct NearCache(crate::near::Near);

impl NearCache {
    /// A near cache of `max_bytes`, in use.
    pub fn new(max_bytes: usize) -> Self {
        let near = crate::near::Near::new(max_bytes, Default::default());
        near.up();
        Self(near)
    }

    /// Takes in a `200` with a body of `body_len` bytes fresh until
    /// `fresh_ms` under `key` (a snapshot, then the admit): whether taken.
    pub fn admit(&self, key: &str, body_len: usize, fresh_ms: u64) -> bool {
        let snapshot = self.0.snapshot(key);
        let entry = Entry {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Bytes::from(vec![b'x'; body_len]),
            delta: Duration::ZERO,
            stored_ms: 0,
            fresh_ms,
            stale_ms: fresh_ms,
            retry_ms: 0,
        };
        self.0.admit(key, std::sync::Arc::new(entry), snapshot)
    }

    /// A near hit: whether a fresh entry is held for `key` at `now_ms`.
    pub fn get(&self, key: &str, now_ms: u64) -> bool {
        self.0.get(key, now_ms).is_some()
    }

    /// Drops the entries of the URL of `key` (an announcement): how many.
    pub fn drop_url_of(&self, key: &str) -> usize {
        self.0.drop_url_of(key)
    }
}
