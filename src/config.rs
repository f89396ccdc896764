//! The per-route settings ([`Config`]) a [`FenceLayer`](crate::FenceLayer)
//! builds and every service, fill and handle reads, and [`OnWaitTimeout`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;

use crate::key::{DefaultKey, MakeKey};
use crate::normalize::Normalizers;
use crate::policy::Policy;
use crate::stats::Counters;

/// What a request does when its wait for another request's fill runs out.
///
/// ```no_run
/// # fn doc(fence: cachefence::FenceLayer) {
/// use cachefence::OnWaitTimeout;
/// // A request that waited its wait_timeout with no stale copy gets a 504.
/// let fence = fence.on_wait_timeout(OnWaitTimeout::GatewayTimeout);
/// # let _ = fence;
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum OnWaitTimeout {
    /// Keep waiting for the fill (the default). A live fill is bounded by
    /// [`fill_timeout`](crate::FenceLayer::fill_timeout) and a dead one by
    /// [`lock_timeout`](crate::FenceLayer::lock_timeout), after which one request
    /// takes over: the request is answered by whichever fill lands, and never
    /// waits longer than `fill_timeout` + `lock_timeout` in all (then `504`).
    Wait,
    /// Call the inner service without storing the result. At most one
    /// request per key and process does so (the others of the process are
    /// handed its response), never one per waiting request. The call gets
    /// the time left of `fill_timeout` + `lock_timeout` since the request
    /// arrived.
    CallOrigin,
    /// Answer `504 Gateway Timeout`.
    GatewayTimeout,
}

/// The per-layer configuration (a clone of the layer may change it).
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) namespace: Arc<str>,
    pub(crate) policy: Policy,
    pub(crate) key: Arc<dyn MakeKey>,
    pub(crate) body_limit: usize,
    pub(crate) status_header: Option<HeaderName>,
    pub(crate) beta: f64,
    pub(crate) lock_timeout: Duration,
    pub(crate) fill_timeout: Duration,
    pub(crate) wait_timeout: Duration,
    pub(crate) early_refresh_after: f64,
    pub(crate) on_wait_timeout: OnWaitTimeout,
    pub(crate) stale_if_error: bool,
    pub(crate) pass_ttl: Duration,
    pub(crate) tag_headers: Vec<HeaderName>,
    pub(crate) expose_tags: bool,
    pub(crate) invalidate_unsafe: bool,
    /// This cache's identifier in `Cache-Status`, when that header is on.
    pub(crate) cache_status: Option<Arc<str>>,
    pub(crate) normalizers: Normalizers,
    pub(crate) max_variants: usize,
    /// The route's name, a label of its metrics and spans.
    pub(crate) name: Arc<str>,
    /// The route's counters: the cache's totals, labelled metrics. Set by
    /// [`Config::for_route`].
    pub(crate) counters: Arc<Counters>,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("namespace", &self.namespace)
            .field("policy", &self.policy)
            .field("body_limit", &self.body_limit)
            .field("status_header", &self.status_header)
            .field("beta", &self.beta)
            .field("lock_timeout", &self.lock_timeout)
            .field("fill_timeout", &self.fill_timeout)
            .field("wait_timeout", &self.wait_timeout)
            .field("early_refresh_after", &self.early_refresh_after)
            .field("on_wait_timeout", &self.on_wait_timeout)
            .field("stale_if_error", &self.stale_if_error)
            .field("pass_ttl", &self.pass_ttl)
            .field("tag_headers", &self.tag_headers)
            .field("expose_tags", &self.expose_tags)
            .field("invalidate_unsafe", &self.invalidate_unsafe)
            .field("cache_status", &self.cache_status)
            .field("normalizers", &self.normalizers)
            .field("max_variants", &self.max_variants)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Config {
    /// The cache key of a request the policy looks up: the key function's,
    /// with the unkeyed inputs it carries added as dimensions.
    pub(crate) fn cache_key(&self, parts: &http::request::Parts) -> Option<String> {
        let key = self.key.make_key(parts)?;
        Some(self.policy.unkeyed.extend_key(key, &parts.headers))
    }

    /// The headers the cache adds or strips itself: the cache-status header,
    /// and the tag headers unless they are exposed. They are never stored.
    pub(crate) fn is_own_header(&self, name: &HeaderName) -> bool {
        self.status_header.as_ref() == Some(name)
            || (!self.expose_tags && self.tag_headers.contains(name))
    }

    /// The settings as a layer uses them: every duration inside the range
    /// its setter documents, so that no deadline overflows and no lease is
    /// too short to renew. Applied when a service is made, so the order of
    /// the setters doesn't matter.
    pub(crate) fn sanitized(mut self) -> Self {
        self.lock_timeout = self.lock_timeout.clamp(MIN_LOCK_TIMEOUT, MAX_TIMEOUT);
        self.fill_timeout = self.fill_timeout.clamp(MIN_LOCK_TIMEOUT, MAX_TIMEOUT);
        self.wait_timeout = self.wait_timeout.min(MAX_TIMEOUT);
        self.pass_ttl = self.pass_ttl.min(crate::policy::MAX_TTL);
        self.policy.grace = self.policy.grace.min(crate::policy::MAX_TTL);
        if !self.beta.is_finite() || self.beta < 0.0 {
            self.beta = 0.0;
        }
        if !(0.0..=1.0).contains(&self.early_refresh_after) {
            // NaN too.
            self.early_refresh_after = DEFAULT_EARLY_REFRESH_AFTER;
        }
        self
    }

    /// The settings as a service or handle of a cache with `counters` uses
    /// them: sanitized, with the route's counters.
    pub(crate) fn for_route(&self, counters: &Counters) -> Self {
        let mut config = self.clone().sanitized();
        config.counters = Arc::new(counters.for_route(&config.namespace, &config.name));
        config
    }

    /// The longest a request may wait for fills in all: the longest a live
    /// fill may run, plus the time a dead filler's lease takes to expire.
    pub(crate) fn wait_cap(&self) -> Duration {
        self.fill_timeout.saturating_add(self.lock_timeout)
    }
}

/// The shortest lease and fill timeout a layer uses: a lease must outlive a
/// few Redis round trips to be renewed.
pub(crate) const MIN_LOCK_TIMEOUT: Duration = Duration::from_millis(100);
/// The longest lease, fill and wait timeout a layer uses (one day).
pub(crate) const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// The default share of the TTL before which XFetch never refreshes.
pub(crate) const DEFAULT_EARLY_REFRESH_AFTER: f64 = 0.75;

impl Default for Config {
    fn default() -> Self {
        Self {
            namespace: Arc::from(crate::key::DEFAULT_NAMESPACE),
            policy: Policy::default(),
            key: Arc::new(DefaultKey::new()),
            body_limit: 1024 * 1024,
            status_header: Some(HeaderName::from_static("x-cache")),
            beta: 1.0,
            lock_timeout: Duration::from_secs(3),
            fill_timeout: Duration::from_secs(30),
            wait_timeout: Duration::from_secs(5),
            early_refresh_after: DEFAULT_EARLY_REFRESH_AFTER,
            on_wait_timeout: OnWaitTimeout::Wait,
            stale_if_error: true,
            pass_ttl: Duration::from_secs(10),
            tag_headers: vec![
                HeaderName::from_static("cache-tag"),
                HeaderName::from_static("surrogate-key"),
            ],
            expose_tags: false,
            invalidate_unsafe: true,
            cache_status: None,
            normalizers: Normalizers::default(),
            max_variants: 64,
            name: Arc::from("default"),
            counters: Arc::default(),
        }
    }
}
