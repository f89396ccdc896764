//! [`FenceHandle`]: invalidation and counters.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use redis::aio::ConnectionLike;

use std::collections::HashMap;
use std::time::Duration;

use futures_util::future::join_all;

use crate::config::Config;
use crate::error::FenceError;
use crate::key::{
    EntryKey, READABLE_MAX, escape, namespace_prefix, tag_keys, tag_marker_prefix,
    truncate_escaped, url_of,
};
use crate::policy::RequestRule;
use crate::shared::Shared;
use crate::stats::{Counters, Stats};
use crate::store::{Layout, Node, ReleaseArgs, Store, channels};

/// Keys read per SCAN step.
const SCAN_BATCH: usize = 500;
/// Entries popped from a tag index per step.
const TAG_BATCH: usize = 500;
/// Invalidation scripts in flight at once.
const PARALLEL: usize = 64;
/// The shortest a tag's fence refuses fills that started before its last
/// invalidation (longer when a fill may run longer: `Store::fence_ttl`).
const TAG_FENCE_TTL: Duration = Duration::from_secs(3600);

/// Attempts of one idempotent step of an invalidation (a SCAN, one entry's
/// script, setting a fence, reading a tag page) that timed out or lost its
/// connection: an invalidation on a busy Redis should not fail on one slow
/// reply. (Popping a tag's index is not tried again: a pop that ran but
/// whose reply was lost would lose entries.)
const STEP_ATTEMPTS: u32 = 3;

/// Runs one step of a walk, again after a transport failure (not when the
/// circuit breaker is open, nor on an error Redis answered with).
async fn step<T, F, Fut>(mut f: F) -> Result<T, FenceError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, FenceError>>,
{
    let mut attempt = 1;
    loop {
        match f().await {
            Err(err) if err.is_transport() && attempt < STEP_ATTEMPTS => {
                tracing::debug!(error = %err, attempt, "walk step failed, trying again");
                tokio::time::sleep(Duration::from_millis(20 * u64::from(attempt))).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Whether `key` (under an entry's URL) is one of the URL's index keys or
/// leases rather than an entry: its variant set, fence, a lease, a
/// waiter mark, a fill's temporary new entry or its owed near-cache
/// announcement (Redis Cluster).
fn is_index_key(key: &str) -> bool {
    [":vars", ":fence", ":lease", ":lease:w", ":near-owed"]
        .iter()
        .any(|s| key.ends_with(s))
        || crate::store::is_temp_entry(key)
}

/// Escapes the glob characters of a Redis `MATCH` pattern. (Keys built by
/// this crate never hold them, as the key escaping encodes them; this is a
/// second line of defence.)
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\' | '^' | '-') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A SCAN walk over every node: the server, or each primary of a Redis
/// Cluster in turn. One batch of keys at a time, so memory stays bounded.
///
/// On a cluster the walk never ends partial without saying so: when every
/// node is done it lists the primaries again and walks any it has not (a
/// replica promoted, a node added mid-walk); a node that fails is skipped
/// only when it is no longer a primary (its slots moved to one that is then
/// walked), else the walk returns an error naming it.
struct Walk {
    /// The nodes left, the one being scanned last.
    nodes: Vec<Node>,
    /// The nodes walked (or being walked).
    seen: Vec<Node>,
    cursor: u64,
    pattern: String,
    /// The node the last batch came from.
    batch_node: Option<Node>,
    /// The slot owners when the current round began (Redis Cluster).
    layout: Option<Layout>,
}

/// Rounds of "list the primaries again" before a walk gives up on a
/// cluster whose topology keeps changing.
const WALK_ROUNDS: usize = 4;

impl Walk {
    async fn new<C>(store: &Store<C>, pattern: String) -> Result<Self, FenceError>
    where
        C: ConnectionLike + Clone + Send + Sync + 'static,
    {
        // Before the nodes: a slot moving after this is seen moved.
        let layout = step(|| store.layout()).await?;
        let mut nodes = step(|| store.nodes()).await?;
        nodes.reverse();
        Ok(Self {
            seen: nodes.clone(),
            nodes,
            cursor: 0,
            pattern,
            batch_node: None,
            layout,
        })
    }

    /// The next batch of keys, or `None` when every node was walked.
    async fn next<C>(&mut self, store: &Store<C>) -> Result<Option<Vec<String>>, FenceError>
    where
        C: ConnectionLike + Clone + Send + Sync + 'static,
    {
        let mut rounds = 0;
        loop {
            let Some(node) = self.nodes.last().cloned() else {
                if !store.is_cluster() {
                    return Ok(None);
                }
                // Slots that moved (or are moving) while the walk ran: their
                // keys may have reached a node after it was scanned.
                let moved = self.slots_moved(store).await?;
                if rounds >= WALK_ROUNDS {
                    return match moved.first() {
                        Some(node) => Err(walk_incomplete(
                            node,
                            "slots kept moving to it while the walk ran",
                        )),
                        None => Ok(None),
                    };
                }
                // Primaries that appeared while the walk ran.
                rounds += 1;
                let now = step(|| store.nodes()).await?;
                self.nodes = now.into_iter().filter(|n| !self.seen.contains(n)).collect();
                if !moved.is_empty() {
                    tracing::debug!(nodes = ?moved, "slots moved during the walk: walking their new owners again");
                    for node in moved {
                        if !self.nodes.contains(&node) {
                            self.nodes.push(node);
                        }
                    }
                    // A migration in progress: give it time to end.
                    tokio::time::sleep(Duration::from_millis(20 << rounds)).await;
                }
                if self.nodes.is_empty() {
                    return Ok(None);
                }
                tracing::debug!(nodes = ?self.nodes, "walking primaries that appeared during the walk");
                self.seen.extend(self.nodes.iter().cloned());
                self.cursor = 0;
                continue;
            };
            match step(|| store.scan(&node, self.cursor, &self.pattern, SCAN_BATCH)).await {
                Ok((next, keys)) => {
                    if next == 0 {
                        self.nodes.pop();
                    }
                    self.batch_node = Some(node);
                    self.cursor = next;
                    return Ok(Some(keys));
                }
                Err(err) if store.is_cluster() && err.is_transport() => {
                    // Failed over? Then its slots are another primary's.
                    let now = match step(|| store.nodes()).await {
                        Ok(now) => now,
                        Err(e) => {
                            let why = format!("{err}; listing primaries: {e}");
                            return Err(walk_stopped(&node, &why, err));
                        }
                    };
                    if now.contains(&node) {
                        return Err(walk_stopped(&node, &err.to_string(), err));
                    }
                    tracing::debug!(node = ?node, error = %err, "a node left mid-walk; walking its successor");
                    self.nodes.pop();
                    self.cursor = 0;
                    let new: Vec<Node> =
                        now.into_iter().filter(|n| !self.seen.contains(n)).collect();
                    self.seen.extend(new.iter().cloned());
                    self.nodes.extend(new);
                }
                Err(err) => return Err(err),
            }
        }
    }
}

impl Walk {
    /// The primaries keys may have moved to since this round began
    /// (`Layout::moved_to_since`); the next round begins now.
    async fn slots_moved<C>(&mut self, store: &Store<C>) -> Result<Vec<Node>, FenceError>
    where
        C: ConnectionLike + Clone + Send + Sync + 'static,
    {
        let Some(before) = self.layout.take() else {
            return Ok(Vec::new());
        };
        let now = step(|| store.layout()).await?;
        let moved = now
            .as_ref()
            .map_or_else(Vec::new, |now| now.moved_to_since(&before));
        self.layout = now;
        Ok(moved)
    }

    /// Acting on the last batch failed: on a cluster, the walk could not
    /// cover the node that batch came from (a primary failing mid-walk);
    /// the error names it.
    fn batch_failed(&self, cluster: bool, err: FenceError) -> FenceError {
        match &self.batch_node {
            Some(node) if cluster => walk_stopped(node, &err.to_string(), err),
            _ => err,
        }
    }
}

/// The error of a walk that could not cover `node`.
fn walk_incomplete(node: &Node, why: &str) -> FenceError {
    FenceError::walk_incomplete(walk_incomplete_text(node, why))
}

/// The error of a walk that `cause` stopped at `node`: it names the node,
/// and says what `cause` says (`is_timeout`, `is_circuit_open`).
fn walk_stopped(node: &Node, why: &str, cause: FenceError) -> FenceError {
    FenceError::walk_incomplete_by(walk_incomplete_text(node, why), cause)
}

fn walk_incomplete_text(node: &Node, why: &str) -> String {
    let name = node
        .as_ref()
        .map_or_else(|| "the server".to_owned(), |(h, p)| format!("{h}:{p}"));
    format!("invalidation walk incomplete: the keys on {name} were not covered ({why})")
}

/// One invalidation, as applied by [`FenceHandle::apply`] and carried by the
/// invalidation queue.
///
/// # Example
///
/// ```
/// use cachefence::Invalidation;
///
/// let inv = Invalidation::prefix("/products/").soft();
/// assert_eq!(Invalidation::decode(&inv.encode()), Some(inv));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalidation {
    target: Target,
    soft: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Path(String),
    Key(String),
    Prefix(String),
    Tag(String),
    All,
}

impl Invalidation {
    /// Every variant of a URL ([`FenceHandle::invalidate_path`]).
    ///
    /// ```no_run
    /// # fn doc() {
    /// use cachefence::Invalidation;
    /// let invalidation = Invalidation::path("/products/42");
    /// # let _ = invalidation;
    /// # }
    /// ```
    pub fn path(path: impl Into<String>) -> Self {
        Self::new(Target::Path(path.into()))
    }

    /// The entry of a cache key ([`FenceHandle::invalidate_key`]).
    ///
    /// ```no_run
    /// # fn doc() {
    /// use cachefence::Invalidation;
    /// // A key as the route's key function returned it.
    /// let invalidation = Invalidation::key("products:42");
    /// # let _ = invalidation;
    /// # }
    /// ```
    pub fn key(key: impl Into<String>) -> Self {
        Self::new(Target::Key(key.into()))
    }

    /// Every entry under a key prefix ([`FenceHandle::invalidate_prefix`]).
    ///
    /// ```no_run
    /// # fn doc() {
    /// use cachefence::Invalidation;
    /// let invalidation = Invalidation::prefix("/products/");
    /// # let _ = invalidation;
    /// # }
    /// ```
    pub fn prefix(prefix: impl Into<String>) -> Self {
        Self::new(Target::Prefix(prefix.into()))
    }

    /// Every entry carrying a tag ([`FenceHandle::invalidate_tag`]).
    ///
    /// ```no_run
    /// # fn doc() {
    /// use cachefence::Invalidation;
    /// let invalidation = Invalidation::tag("product:42");
    /// # let _ = invalidation;
    /// # }
    /// ```
    pub fn tag(tag: impl Into<String>) -> Self {
        Self::new(Target::Tag(tag.into()))
    }

    /// Everything in the namespace ([`FenceHandle::invalidate_all`]).
    ///
    /// ```no_run
    /// # fn doc() {
    /// use cachefence::Invalidation;
    /// let invalidation = Invalidation::all();
    /// # let _ = invalidation;
    /// # }
    /// ```
    pub fn all() -> Self {
        Self::new(Target::All)
    }

    /// Marks entries stale instead of removing them
    /// ([`FenceHandle::soft_invalidate_all`] for `all`).
    ///
    /// ```no_run
    /// # fn doc() {
    /// use cachefence::Invalidation;
    /// let invalidation = Invalidation::tag("product:42").soft();
    /// # let _ = invalidation;
    /// # }
    /// ```
    #[must_use]
    pub fn soft(mut self) -> Self {
        self.soft = true;
        self
    }

    fn new(target: Target) -> Self {
        Self {
            target,
            soft: false,
        }
    }

    /// A compact text form: `<kind>[~]:<value>`, where `~` marks a soft one.
    ///
    /// ```no_run
    /// # fn doc() {
    /// use cachefence::Invalidation;
    /// let text = Invalidation::tag("product:42").encode();
    /// assert_eq!(Invalidation::decode(&text), Some(Invalidation::tag("product:42")));
    /// # }
    /// ```
    pub fn encode(&self) -> String {
        let (kind, value) = match &self.target {
            Target::Path(v) => ("path", v.as_str()),
            Target::Key(v) => ("key", v.as_str()),
            Target::Prefix(v) => ("prefix", v.as_str()),
            Target::Tag(v) => ("tag", v.as_str()),
            Target::All => ("all", ""),
        };
        format!("{kind}{}:{value}", if self.soft { "~" } else { "" })
    }

    /// Reads the form written by [`encode`](Self::encode); `None` when it is
    /// not one.
    ///
    /// ```no_run
    /// # fn doc() {
    /// use cachefence::Invalidation;
    /// let text = Invalidation::prefix("/products/").soft().encode();
    /// assert_eq!(Invalidation::decode(&text), Some(Invalidation::prefix("/products/").soft()));
    /// assert_eq!(Invalidation::decode("not an invalidation"), None);
    /// # }
    /// ```
    pub fn decode(text: &str) -> Option<Self> {
        let (kind, value) = text.split_once(':')?;
        let (kind, soft) = match kind.strip_suffix('~') {
            Some(kind) => (kind, true),
            None => (kind, false),
        };
        let target = match kind {
            "path" => Target::Path(value.to_owned()),
            "key" => Target::Key(value.to_owned()),
            "prefix" => Target::Prefix(value.to_owned()),
            "tag" => Target::Tag(value.to_owned()),
            "all" => Target::All,
            _ => return None,
        };
        Some(Self { target, soft })
    }
}

/// Invalidates cached entries and reads the cache's counters.
///
/// Made by [`FenceLayer::handle`](crate::FenceLayer::handle); cheap to clone,
/// `Send + Sync`, and bound to the namespace of the layer it came from.
///
/// # What an invalidation guarantees
///
/// After any invalidation call returns (path, key, prefix, tag, whole
/// namespace; hard or soft; directly or through the queue), no request, on
/// any process, is served as fresh a response computed by a fill that
/// started before the call. (A soft invalidation may still serve the
/// entries it marked, as stale, while one refresh runs.) Fills are fenced
/// where they write back: the store script refuses a fill whose lease was
/// removed, or that started (Redis time) at or before the last
/// invalidation of its URL (of any `Vary` variant, even one never stored
/// before), of a prefix of its key, of the whole namespace, or of one of
/// its response's tags. Prefix and namespace fences are set before the
/// SCAN walk starts, so a fill that stores into a part of the keyspace the
/// walk has already passed is refused too. On a Redis Cluster, prefix and
/// namespace walks first remove every fill lease under the prefix (a SCAN
/// of its own), then the entries.
///
/// # This process's in-flight fill
///
/// When the key of a fill running in this process is invalidated, the fill
/// is *detached*: requests arriving afterwards don't join it, and the
/// requests that joined it before look again (they start or join a new
/// fill) instead of taking its response. If the request that started the
/// fill (its leader) is still waiting, the origin call runs to its end and
/// the leader receives that response (its request raced the invalidation),
/// but it is not stored: the write-back is fenced out. If no one waits for
/// it any more, the origin call is dropped (aborted) and the lease released.
/// A fill the call does not find in this process's table (for example a
/// cold fill of a tag's entry, not yet in the tag's index) runs on; its
/// write-back is refused, and the requests that joined it look again.
///
/// # Clocks
///
/// * Fences compare Redis times only (the `TIME` of the server holding the
///   entry, taken when the lease is won and when the fence is set): no
///   host's clock matters, and they outlive the longest fill of the cache
///   (`fill_timeout + lock_timeout` of its routes and handles).
/// * Leases and pass markers' lifetimes are Redis expiries (`PX`).
/// * Freshness, grace and XFetch use the clock of the host that stored the
///   entry (`fresh until` = its time + TTL) and of the host that reads it.
///   A reader whose clock runs `d` behind the writer's serves entries `d`
///   longer as fresh (ahead: `d` shorter). Keep hosts within a small part of
///   your TTLs (NTP keeps them within milliseconds).
/// * A soft invalidation does not use a clock at all: it sets an entry's
///   fresh-until time to zero, so every reader sees it stale however far its
///   clock is behind.
///
/// # Example
///
/// ```no_run
/// # async fn doc(handle: cachefence::FenceHandle<redis::aio::ConnectionManager>) -> Result<(), cachefence::FenceError> {
/// let removed = handle.invalidate_path("/products/42").await?;
/// println!("removed {removed} entries");
/// # Ok(()) }
/// ```
pub struct FenceHandle<C = redis::aio::ConnectionManager> {
    shared: Arc<Shared<C>>,
    config: Config,
}

impl<C> Clone for FenceHandle<C> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            config: self.config.clone(),
        }
    }
}

impl<C> fmt::Debug for FenceHandle<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FenceHandle")
            .field("namespace", &self.config.namespace)
            .finish_non_exhaustive()
    }
}

impl<C> FenceHandle<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    pub(crate) fn new(shared: Arc<Shared<C>>, config: Config) -> Self {
        Self { shared, config }
    }

    /// Removes every stored variant of a URL (path with an optional query,
    /// normalised as [`DefaultKey`](crate::key::DefaultKey) does), for every
    /// host and every other key dimension (keyed headers, forwarding
    /// headers): all `Vary` variants, for GET and HEAD, in batches. Returns
    /// how many entries were removed. Sets the URL's fence: fills of it that
    /// started before, including fills of variants and hosts never stored,
    /// can't store.
    ///
    /// The URL's key comes from the layer's key function
    /// ([`MakeKey::path_key`](crate::key::MakeKey::path_key)). A key function
    /// that can't derive it (any closure) makes this fail with an
    /// invalid-input error rather than remove nothing: use
    /// [`invalidate_request`](Self::invalidate_request),
    /// [`invalidate_uri`](Self::invalidate_uri) or
    /// [`invalidate_key`](Self::invalidate_key) there.
    ///
    /// ```no_run
    /// # async fn doc(handle: cachefence::FenceHandle) -> Result<(), cachefence::FenceError> {
    /// let removed = handle.invalidate_path("/products/42").await?;
    /// # let _ = removed;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn invalidate_path(&self, path: &str) -> Result<u64, FenceError> {
        self.invalidate_key(&self.path_key(path)?).await
    }

    /// Removes the entries of one request's key, as the layer's key function
    /// makes it (host, keyed headers and forwarding headers included): with
    /// the default key, one URL on one host, with all its `Vary` variants.
    /// Returns how many entries were removed.
    ///
    /// Fails with an invalid-input error when the layer would not cache
    /// the request at all (a method other than GET or HEAD, a credential,
    /// a method override, a host outside
    /// [`allowed_hosts`](crate::FenceLayer::allowed_hosts), or a key
    /// function that returns `None`).
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn doc(handle: cachefence::FenceHandle<redis::aio::ConnectionManager>) -> Result<(), cachefence::FenceError> {
    /// let req = http::Request::get("/products/42")
    ///     .header("host", "shop-a.example")
    ///     .body(())
    ///     .unwrap();
    /// handle.invalidate_request(&req).await?;
    /// # Ok(()) }
    /// ```
    pub async fn invalidate_request(&self, req: &http::Request<()>) -> Result<u64, FenceError> {
        let key = self.request_key(req)?;
        self.invalidate_key(&key).await
    }

    /// [`invalidate_request`](Self::invalidate_request) of a `GET` for this
    /// URI. An absolute URI names the host (`https://shop-a.example/products/42`);
    /// a path alone names no host, which with the default key is the entry
    /// of requests that came without one (use
    /// [`invalidate_path`](Self::invalidate_path) for every host).
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn doc(handle: cachefence::FenceHandle<redis::aio::ConnectionManager>) -> Result<(), cachefence::FenceError> {
    /// let uri: http::Uri = "https://shop-a.example/products/42".parse().unwrap();
    /// handle.invalidate_uri(&uri).await?;
    /// # Ok(()) }
    /// ```
    pub async fn invalidate_uri(&self, uri: &http::Uri) -> Result<u64, FenceError> {
        let mut req = http::Request::new(());
        *req.uri_mut() = uri.clone();
        self.invalidate_request(&req).await
    }

    /// The URL key of a path, from the layer's key function.
    fn path_key(&self, path: &str) -> Result<String, FenceError> {
        self.config.key.path_key(path).ok_or_else(|| {
            FenceError::invalid_input(
                "the layer's key function can't derive a path's key; \
                 use invalidate_request, invalidate_uri or invalidate_key",
            )
        })
    }

    /// The cache key the layer gives this request.
    fn request_key(&self, req: &http::Request<()>) -> Result<String, FenceError> {
        let mut parts = http::Request::new(());
        *parts.method_mut() = req.method().clone();
        *parts.uri_mut() = req.uri().clone();
        *parts.version_mut() = req.version();
        *parts.headers_mut() = req.headers().clone();
        let (mut parts, ()) = parts.into_parts();
        self.config.policy.unkeyed.strip(&mut parts.headers);
        if let RequestRule::Bypass(reason) = self.config.policy.request(&parts) {
            tracing::debug!(
                reason,
                "invalidate_request: the layer bypasses this request"
            );
            return Err(FenceError::invalid_input(
                "the layer does not cache this request (method, credentials, method override, \
                 url rewrite header or host)",
            ));
        }
        self.config.cache_key(&parts).ok_or_else(|| {
            FenceError::invalid_input("the layer's key function does not cache this request")
        })
    }

    /// Removes the entry stored under a cache key (as returned by the key
    /// function), with all its variants. Returns how many entries were
    /// removed.
    ///
    /// ```no_run
    /// # async fn doc(handle: cachefence::FenceHandle) -> Result<(), cachefence::FenceError> {
    /// // A key as the route's key function returned it.
    /// let removed = handle.invalidate_key("products:42").await?;
    /// # let _ = removed;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn invalidate_key(&self, key: &str) -> Result<u64, FenceError> {
        let ek = EntryKey::new(&self.config.namespace, key);
        let removed = self.invalidate_entry(&ek.primary, false, true, &[]).await?;
        tracing::debug!(key = %crate::trace::redact(&ek.primary), removed, "invalidated");
        self.replicated(removed).await
    }

    /// Marks the entry of a URL stale instead of removing it: the next
    /// request is served the stale copy while one refresh runs. Fills in
    /// flight are fenced out as with [`invalidate_path`](Self::invalidate_path).
    /// Returns how many entries were marked.
    ///
    /// ```no_run
    /// # async fn doc(handle: cachefence::FenceHandle) -> Result<(), cachefence::FenceError> {
    /// let marked = handle.soft_invalidate_path("/products/42").await?;
    /// # let _ = marked;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn soft_invalidate_path(&self, path: &str) -> Result<u64, FenceError> {
        self.soft_invalidate_key(&self.path_key(path)?).await
    }

    /// [`soft_invalidate_path`](Self::soft_invalidate_path) by cache key.
    ///
    /// ```no_run
    /// # async fn doc(handle: cachefence::FenceHandle) -> Result<(), cachefence::FenceError> {
    /// // A key as the route's key function returned it.
    /// let marked = handle.soft_invalidate_key("products:42").await?;
    /// # let _ = marked;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn soft_invalidate_key(&self, key: &str) -> Result<u64, FenceError> {
        let ek = EntryKey::new(&self.config.namespace, key);
        let marked = self.invalidate_entry(&ek.primary, true, true, &[]).await?;
        self.replicated(marked).await
    }

    /// Removes every entry whose key starts with `prefix` (for the default
    /// key, a path prefix such as `/products/`). Returns how many entries
    /// were removed.
    ///
    /// First sets the prefix's fence (kept in Redis longer than any fill of
    /// the cache runs: its routes' longest `fill_timeout + lock_timeout`),
    /// so no fill under the prefix that started before can store, even
    /// while the walk runs. Then walks the namespace with `SCAN`
    /// and a `MATCH` pattern in which no character of `prefix` can act as a
    /// glob, in batches of 500 keys, so memory stays bounded and Redis is
    /// never blocked; on a Redis Cluster, every primary is walked. An empty
    /// prefix is refused: use [`invalidate_all`](Self::invalidate_all).
    ///
    /// ```no_run
    /// # async fn doc(handle: cachefence::FenceHandle) -> Result<(), cachefence::FenceError> {
    /// let removed = handle.invalidate_prefix("/products/").await?;
    /// # let _ = removed;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn invalidate_prefix(&self, prefix: &str) -> Result<u64, FenceError> {
        if prefix.is_empty() {
            return Err(FenceError::invalid_input(
                "empty prefix; use invalidate_all",
            ));
        }
        let removed = self.prefix_walk(prefix, false).await?;
        self.replicated(removed).await
    }

    /// [`invalidate_prefix`](Self::invalidate_prefix), marking entries stale
    /// instead of removing them.
    ///
    /// ```no_run
    /// # async fn doc(handle: cachefence::FenceHandle) -> Result<(), cachefence::FenceError> {
    /// let marked = handle.soft_invalidate_prefix("/products/").await?;
    /// # let _ = marked;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn soft_invalidate_prefix(&self, prefix: &str) -> Result<u64, FenceError> {
        if prefix.is_empty() {
            return Err(FenceError::invalid_input(
                "empty prefix; use invalidate_all",
            ));
        }
        let marked = self.prefix_walk(prefix, true).await?;
        self.replicated(marked).await
    }

    /// Removes every entry of this handle's namespace. Returns how many
    /// entries were removed. Fences every fill of the namespace that
    /// started before, as [`invalidate_prefix`](Self::invalidate_prefix)
    /// does.
    ///
    /// The walk removes only what it invalidated: tag indexes and tag
    /// fences stay, and on a Redis Cluster a tag marker goes only once its
    /// entry is gone, so an entry stored while the walk runs (after it
    /// passed that part of the keyspace) is still found by
    /// [`invalidate_tag`](Self::invalidate_tag). Index members naming
    /// removed entries are harmless and go with their expiry.
    ///
    /// ```no_run
    /// # async fn doc(handle: cachefence::FenceHandle) -> Result<(), cachefence::FenceError> {
    /// let removed = handle.invalidate_all().await?;
    /// # let _ = removed;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn invalidate_all(&self) -> Result<u64, FenceError> {
        let removed = self.prefix_walk("", false).await?;
        if self.shared.store.is_cluster() {
            // The markers of the entries it removed (each only once its
            // entry is gone: one stored again since keeps its marker).
            let mut pattern = glob_escape(&namespace_prefix(&self.config.namespace));
            pattern.push_str("#tagged:*");
            self.unmark_gone(pattern).await?;
        }
        self.replicated(removed).await
    }

    /// Removes the tag markers matching a SCAN pattern whose primary is
    /// gone (Redis Cluster), on every node.
    async fn unmark_gone(&self, pattern: String) -> Result<(), FenceError> {
        let store = &self.shared.store;
        let mut walk = Walk::new(store, pattern).await?;
        while let Some(markers) = walk.next(store).await? {
            for chunk in markers.chunks(PARALLEL) {
                let read = join_all(chunk.iter().map(|m| store.get(m))).await;
                let mut found = Vec::with_capacity(chunk.len());
                for (marker, primary) in chunk.iter().zip(read) {
                    let primary = primary.map_err(|e| walk.batch_failed(true, e))?;
                    if let Some(p) = primary.and_then(|p| String::from_utf8(p).ok()) {
                        found.push((marker.as_str(), p));
                    }
                }
                let calls = found.iter().map(|(m, p)| store.tag_unmark(m, p));
                for result in join_all(calls).await {
                    result.map_err(|e| walk.batch_failed(true, e))?;
                }
            }
        }
        Ok(())
    }

    /// Marks every entry of this handle's namespace stale, fencing fills as
    /// [`invalidate_all`](Self::invalidate_all) does. Returns how many
    /// entries were marked.
    ///
    /// ```no_run
    /// # async fn doc(handle: cachefence::FenceHandle<redis::aio::ConnectionManager>) -> Result<(), cachefence::FenceError> {
    /// let marked = handle.soft_invalidate_all().await?;
    /// # Ok(()) }
    /// ```
    pub async fn soft_invalidate_all(&self) -> Result<u64, FenceError> {
        let marked = self.prefix_walk("", true).await?;
        self.replicated(marked).await
    }

    /// With [`FenceCacheBuilder::replicated_fences`](crate::FenceCacheBuilder::replicated_fences),
    /// waits for the replicas to acknowledge an invalidation's writes.
    async fn replicated(&self, count: u64) -> Result<u64, FenceError> {
        self.shared.store.wait_replicated().await?;
        Ok(count)
    }

    /// UNLINKs every key matching a SCAN pattern, on every node. Returns how
    /// many keys were seen.
    async fn unlink_matching(&self, pattern: String) -> Result<u64, FenceError> {
        let store = &self.shared.store;
        let mut walk = Walk::new(store, pattern).await?;
        let mut seen = 0;
        while let Some(keys) = walk.next(store).await? {
            seen += keys.len() as u64;
            for chunk in keys.chunks(PARALLEL) {
                for result in join_all(chunk.iter().map(|k| store.unlink(k))).await {
                    result.map_err(|e| walk.batch_failed(store.is_cluster(), e))?;
                }
            }
        }
        Ok(seen)
    }

    /// Removes every entry that carries `tag` (named by the response's
    /// `Cache-Tag` / `Surrogate-Key` header or its [`CacheTags`](crate::CacheTags)
    /// extension). Returns how many entries were removed.
    ///
    /// Fills that started before this call and whose response carries the
    /// tag are refused when they try to store: the tag's fence holds the
    /// time of the invalidation for an hour, or longer when a fill may run
    /// longer. The index is popped a batch at
    /// a time; entries added while it runs are new data and may be removed
    /// too.
    ///
    /// On a Redis Cluster the tag's entries are found by SCANning every
    /// primary for their tag markers, and fills are fenced by removing every
    /// fill lease of the namespace first (fills of untagged keys then don't
    /// store either; their waiters look again).
    ///
    /// ```no_run
    /// # async fn doc(handle: cachefence::FenceHandle) -> Result<(), cachefence::FenceError> {
    /// let removed = handle.invalidate_tag("product:42").await?;
    /// # let _ = removed;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn invalidate_tag(&self, tag: &str) -> Result<u64, FenceError> {
        let removed = self.tag_walk(tag, false).await?;
        self.replicated(removed).await
    }

    /// [`invalidate_tag`](Self::invalidate_tag), marking entries stale
    /// instead of removing them. The index is read in pages by expiry time
    /// from a cursor, so entries that are added, stored again or expire
    /// while it pages never make it skip one.
    ///
    /// ```no_run
    /// # async fn doc(handle: cachefence::FenceHandle) -> Result<(), cachefence::FenceError> {
    /// let marked = handle.soft_invalidate_tag("product:42").await?;
    /// # let _ = marked;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn soft_invalidate_tag(&self, tag: &str) -> Result<u64, FenceError> {
        let marked = self.tag_walk(tag, true).await?;
        self.replicated(marked).await
    }

    /// Applies an [`Invalidation`] (as the invalidation queue's worker does).
    /// Applying one twice is harmless.
    ///
    /// ```no_run
    /// # async fn doc(handle: cachefence::FenceHandle) -> Result<(), cachefence::FenceError> {
    /// use cachefence::Invalidation;
    /// let removed = handle.apply(&Invalidation::tag("product:42")).await?;
    /// # let _ = removed;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn apply(&self, invalidation: &Invalidation) -> Result<u64, FenceError> {
        let Invalidation { target, soft } = invalidation;
        match (target, soft) {
            (Target::Path(p), false) => self.invalidate_path(p).await,
            (Target::Path(p), true) => self.soft_invalidate_path(p).await,
            (Target::Key(k), false) => self.invalidate_key(k).await,
            (Target::Key(k), true) => self.soft_invalidate_key(k).await,
            (Target::Prefix(p), false) => self.invalidate_prefix(p).await,
            (Target::Prefix(p), true) => self.soft_invalidate_prefix(p).await,
            (Target::Tag(t), false) => self.invalidate_tag(t).await,
            (Target::Tag(t), true) => self.soft_invalidate_tag(t).await,
            (Target::All, false) => self.invalidate_all().await,
            (Target::All, true) => self.soft_invalidate_all().await,
        }
    }

    async fn tag_walk(&self, tag: &str, soft: bool) -> Result<u64, FenceError> {
        if self.shared.store.is_cluster() {
            return self.cluster_tag_walk(tag, soft).await;
        }
        let (index, fence) = tag_keys(&self.config.namespace, tag);
        let store = &self.shared.store;
        let fence_for = store.fence_ttl().max(TAG_FENCE_TTL);
        let mut total = 0;
        let mut cursor: Option<String> = None;
        loop {
            let members = if soft {
                let page = step(|| {
                    store.tag_page(&index, &fence, TAG_BATCH, fence_for, cursor.as_deref())
                })
                .await?;
                let Some((members, next)) = page else { break };
                cursor = Some(next);
                members
            } else {
                store
                    .tag_batch(&index, &fence, TAG_BATCH, fence_for)
                    .await?
            };
            if members.is_empty() {
                break;
            }
            total += self
                .invalidate_primaries(members.iter().map(|m| (m.as_str(), Vec::new())), soft)
                .await?;
        }
        tracing::debug!(tag, removed = total, soft, "tag invalidated");
        Ok(total)
    }

    /// Tag invalidation on a Redis Cluster, where no one key can list a
    /// tag's entries (they live in every slot). Each tagged entry has a
    /// marker key in its own slot, and fills are fenced by removing leases:
    ///
    /// 1. every fill lease of the namespace is removed, on every primary.
    ///    A fill that started before this call holds its lease for the
    ///    whole scan, so SCAN returns it; such a fill can no longer store
    ///    (fills of other tags are fenced too, which is harmless: they don't
    ///    store and their waiters look again);
    /// 2. every marker of the tag is read, on every primary, and the entry
    ///    it names is invalidated. An entry stored before step 1 has its
    ///    marker in place before this scan starts.
    async fn cluster_tag_walk(&self, tag: &str, soft: bool) -> Result<u64, FenceError> {
        let store = &self.shared.store;
        let namespace = namespace_prefix(&self.config.namespace);
        let fenced = self
            .unlink_matching(format!("{}*:lease", glob_escape(&namespace)))
            .await?;
        let pattern = format!(
            "{}*",
            glob_escape(&tag_marker_prefix(&self.config.namespace, tag))
        );
        let mut walk = Walk::new(store, pattern).await?;
        let mut total = 0;
        while let Some(markers) = walk.next(store).await? {
            // (marker, the primary it names)
            let mut found: Vec<(&str, String)> = Vec::with_capacity(markers.len());
            for chunk in markers.chunks(PARALLEL) {
                let read = join_all(chunk.iter().map(|m| store.get(m))).await;
                for (marker, primary) in chunk.iter().zip(read) {
                    let primary = primary
                        .map_err(|e| walk.batch_failed(store.is_cluster(), e))?
                        .and_then(|p| String::from_utf8(p).ok());
                    // Only a primary key of this namespace is followed.
                    if let Some(p) = primary.filter(|p| p.starts_with(&namespace)) {
                        found.push((marker.as_str(), p));
                    }
                }
            }
            total += self
                .invalidate_primaries(found.iter().map(|(_, p)| (p.as_str(), Vec::new())), soft)
                .await
                .map_err(|e| walk.batch_failed(store.is_cluster(), e))?;
            if !soft {
                // A marker goes only with its entry: one stored again
                // since (by a fill that started after the leases were
                // removed) keeps the marker its store set.
                for chunk in found.chunks(PARALLEL) {
                    let calls = chunk.iter().map(|(m, p)| store.tag_unmark(m, p));
                    for result in join_all(calls).await {
                        result.map_err(|e| walk.batch_failed(store.is_cluster(), e))?;
                    }
                }
            }
        }
        tracing::debug!(
            tag,
            removed = total,
            fenced,
            soft,
            "tag invalidated (cluster)"
        );
        Ok(total)
    }

    async fn prefix_walk(&self, prefix: &str, soft: bool) -> Result<u64, FenceError> {
        let namespace = namespace_prefix(&self.config.namespace);
        let mut readable = escape(prefix.as_bytes());
        // Entry keys keep at most READABLE_MAX bytes of the key: a longer
        // prefix is matched on those, and candidates are checked against
        // the full key stored in the entry.
        let verify = readable.len() > READABLE_MAX;
        truncate_escaped(&mut readable, READABLE_MAX);
        let key_prefix = format!("{namespace}{readable}");
        let pattern = format!("{}*", glob_escape(&key_prefix));
        // Fence first: a fill under the prefix that started before can't
        // store from now on, whichever part of the keyspace the walk is in.
        let fenced = if self.shared.store.is_cluster() {
            // The store script can't read a fence in another slot: remove
            // the leases instead. A fill that started before holds its
            // lease until it stores, so this SCAN sees it unless it stored
            // first, and then the walk below sees its entry.
            self.unlink_matching(format!("{}*:lease", glob_escape(&key_prefix)))
                .await?
        } else {
            let store = &self.shared.store;
            step(|| store.prefix_fence(&self.config.namespace, &key_prefix)).await?;
            0
        };
        let mut total = 0;
        let mut walk = Walk::new(&self.shared.store, pattern).await?;
        while let Some(keys) = walk.next(&self.shared.store).await? {
            // The URL keys the batch's keys belong to (invalidating a URL
            // removes every host, dimension and variant of it), each with
            // the entries of it the scan found: those go too, even when
            // the URL's variant set no longer lists them.
            let mut primaries: HashMap<&str, Vec<&str>> = HashMap::new();
            for key in &keys {
                // Tag keys start with `<namespace>#`, never an entry key.
                if key.as_bytes().get(namespace.len()) == Some(&b'#') || !key.contains('}') {
                    continue;
                }
                let url = url_of(key);
                let entry = key.len() > url.len() && !is_index_key(key);
                if !entry && primaries.contains_key(url) {
                    continue;
                }
                if verify {
                    // The entry (at the URL or a dimension of it) holds the
                    // whole key, which starts with the URL.
                    if key.ends_with(":lease")
                        || crate::store::is_temp_entry(key)
                        || key.ends_with(":vars")
                        || key.ends_with(":near-owed")
                    {
                        continue;
                    }
                    let full = self
                        .shared
                        .store
                        .hget(key, "key")
                        .await
                        .map_err(|e| walk.batch_failed(self.shared.store.is_cluster(), e))?;
                    if !full.is_some_and(|k| k.starts_with(prefix.as_bytes())) {
                        continue;
                    }
                }
                let found = primaries.entry(url).or_default();
                if entry {
                    found.push(key);
                }
            }
            total += self
                .invalidate_primaries(primaries.into_iter(), soft)
                .await
                .map_err(|e| walk.batch_failed(self.shared.store.is_cluster(), e))?;
        }
        let detached = self.shared.flights.detach_prefix(&key_prefix);
        Counters::add(&self.config.counters.detached, detached);
        if let Err(err) = self
            .shared
            .store
            .publish(
                &channels::invalidate(&self.config.namespace),
                &format!("prefix:{}:{key_prefix}", self.shared.id),
            )
            .await
        {
            tracing::debug!(error = %err, "announcing a prefix invalidation failed; fencing still holds");
        }
        tracing::debug!(prefix, removed = total, soft, fenced, "prefix invalidated");
        Ok(total)
    }

    /// Invalidates entries by primary key (each with the entries of it a
    /// walk found), a batch at a time.
    async fn invalidate_primaries<'a>(
        &self,
        primaries: impl Iterator<Item = (&'a str, Vec<&'a str>)>,
        soft: bool,
    ) -> Result<u64, FenceError> {
        let primaries: Vec<(&str, Vec<&str>)> = primaries.collect();
        let mut total = 0;
        for chunk in primaries.chunks(PARALLEL) {
            // Walks fence by prefix or tag: no URL fence per entry.
            let calls = chunk
                .iter()
                .map(|(primary, found)| self.invalidate_entry(primary, soft, false, found));
            for result in join_all(calls).await {
                total += result?;
            }
        }
        Ok(total)
    }

    /// Removes (or, `soft`, marks stale) the entry at `primary` with its
    /// variants and leases, then detaches this process's fill of it, so the
    /// requests that joined it look again instead of taking its response. A
    /// fill that lands between the script and the detach is fenced out, and
    /// a fenced fill restarts its joiners too. (Detaching first would let a
    /// joiner restart, take a new lease before the script and be fenced out
    /// by it.) With `fence`, the URL's fence is set first. `found`: entries
    /// of the URL a walk found, removed (or marked) too.
    async fn invalidate_entry(
        &self,
        primary: &str,
        soft: bool,
        fence: bool,
        found: &[&str],
    ) -> Result<u64, FenceError> {
        let store = &self.shared.store;
        // Counted from before the script: an acknowledgement may come
        // before its reply.
        let acks = self.shared.acks.register();
        let tag = format!("{}:{}", self.shared.id, acks.seq);
        // On a Redis Cluster the script only says whether the entry was
        // marked; the announcement goes out on the sharded channel below.
        let cluster = store.is_cluster();
        let script_tag = if cluster {
            format!("={tag}")
        } else {
            tag.clone()
        };
        let result = if soft {
            step(|| store.soft_invalidate(primary, fence, &script_tag, found)).await
        } else {
            step(|| store.invalidate(primary, self.shared.id, fence, &script_tag, found)).await
        };
        let detached = self.shared.flights.detach_entry(primary);
        Counters::add(&self.config.counters.detached, detached);
        let (n, mut near) = result?;
        // On a Redis Cluster the script only counted the marked entries:
        // one announcement on the sharded channel counts the near caches.
        if cluster && near.entries > 0 {
            near.heard = announce_near_shard(store, primary, &tag).await?;
            near.entries = 1;
            // Out: the URL owes no announcement (a failure leaves the mark
            // for the next walk, which announces again).
            if !soft && let Err(err) = store.clear_owed(primary, &script_tag).await {
                tracing::debug!(error = %err, "clearing an owed near announcement failed; the next invalidation announces again");
            }
        }
        if near.entries > 0 {
            self.near_acknowledged(primary, &acks, near).await;
        }
        Ok(n)
    }

    /// Near caches held the entry (the script announced it): returns once
    /// every listener that heard it dropped it (at most
    /// [`ACK_WAIT`](crate::near::ACK_WAIT)), and says so when fewer
    /// acknowledged than near caches are registered alive in the namespace
    /// (one whose subscription Redis dropped is not among the listeners).
    async fn near_acknowledged(
        &self,
        primary: &str,
        acks: &crate::near::AckWait<'_>,
        near: crate::store::Announced,
    ) {
        let want = usize::try_from(near.heard).unwrap_or(usize::MAX);
        let (all, known) = tokio::join!(
            acks.until(want, crate::near::ACK_WAIT),
            self.shared.store.near_known(primary)
        );
        if !all {
            Counters::inc(&self.config.counters.near_ack_timeouts);
            tracing::debug!(
                key = %crate::trace::redact(primary),
                listeners = near.heard,
                "not every near cache acknowledged an invalidation in time"
            );
        }
        // Each announcement reaches every near cache alive: as many
        // acknowledgements each.
        let heard = acks.heard();
        match known {
            Ok(known) if heard < known.saturating_mul(near.entries) => {
                Counters::inc(&self.config.counters.near_acks_missing);
                tracing::warn!(
                    key = %crate::trace::redact(primary),
                    near_caches = known,
                    announced = near.entries,
                    acknowledged = heard,
                    "fewer near caches acknowledged an invalidation than are registered alive"
                );
            }
            Ok(_) => {}
            Err(err) => {
                tracing::debug!(error = %err, "counting the live near caches failed");
            }
        }
    }

    /// Shuts the cache down gracefully, for a process that is about to exit:
    /// new requests bypass the cache from now on, in-flight fills get up to
    /// `grace` to finish and store, and the Redis leases of those still
    /// running are released, so that other processes take the keys over at
    /// once instead of waiting for the leases to expire. Returns how many
    /// leases it released.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn doc(handle: cachefence::FenceHandle<redis::aio::ConnectionManager>) {
    /// // after the server stopped accepting connections:
    /// let released = handle.shutdown(std::time::Duration::from_secs(2)).await;
    /// # }
    /// ```
    pub async fn shutdown(&self, grace: Duration) -> usize {
        self.shared.closing.store(true, Ordering::Relaxed);
        let deadline = tokio::time::Instant::now() + grace;
        while self.shared.flights.len() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let held: Vec<(String, String)> = self
            .shared
            .leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, t)| (k.clone(), t.clone()))
            .collect();
        let mut released = 0;
        for (lease, token) in held {
            // The entry a lease belongs to ends at its hash tag's `}`.
            let primary = lease.find('}').map_or(lease.as_str(), |end| &lease[..=end]);
            match self
                .shared
                .store
                .release(ReleaseArgs::plain(&lease, primary, &token))
                .await
            {
                Ok(Some(_)) => released += 1,
                Ok(None) => {}
                Err(err) => {
                    tracing::warn!(error = %err, lease = %crate::trace::redact(&lease), "releasing a lease at shutdown failed; it expires by itself")
                }
            }
        }
        tracing::info!(released, "cache shut down");
        released
    }

    /// The connection the handle's commands go over (the layer's).
    pub(crate) fn connection(&self) -> C {
        self.shared.store.connection()
    }

    /// Shifts this layer's clock (freshness, XFetch, pass markers) by `ms`,
    /// to play a host whose clock is off. For tests only.
    #[cfg(feature = "__internals")]
    #[doc(hidden)]
    pub fn skew_clock_for_tests(&self, ms: i64) {
        self.shared.store.set_clock_skew(ms);
    }

    /// Whether the cache runs on a Redis Cluster.
    pub(crate) fn is_cluster(&self) -> bool {
        self.shared.store.is_cluster()
    }

    /// The namespace this handle invalidates in.
    ///
    /// ```no_run
    /// # fn doc(handle: cachefence::FenceHandle) {
    /// println!("invalidating in {}", handle.namespace());
    /// # }
    /// ```
    pub fn namespace(&self) -> &str {
        &self.config.namespace
    }

    /// A snapshot of the counters of the layer this handle came from (shared
    /// by all its clones).
    ///
    /// ```no_run
    /// # fn doc(handle: cachefence::FenceHandle) {
    /// let stats = handle.stats();
    /// println!("{} hits, {} misses", stats.hits, stats.misses);
    /// # }
    /// ```
    pub fn stats(&self) -> Stats {
        let mut stats = self.shared.counters.snapshot();
        stats.redis_errors = self.shared.store.errors.load(Ordering::Relaxed);
        stats.redis_calls = self.shared.store.commands.load(Ordering::Relaxed);
        stats.in_flight = self.shared.flights.len() as u64;
        stats.breaker = self.shared.store.breaker().state();
        stats
    }
}

/// A Redis Cluster's near-cache announcement of the marked entry `primary`
/// (removed or marked stale): `SPUBLISH`ed on its namespace's sharded
/// channel, where every near cache of the fleet subscribes (on the one
/// primary owning that channel's slot), so the count is every near cache's.
/// Returns that count (the acknowledgements to wait for). Not retried: a
/// retry after a lost reply would deliver it twice and have each near cache
/// acknowledge twice.
async fn announce_near_shard<C>(
    store: &crate::store::Store<C>,
    primary: &str,
    tag: &str,
) -> Result<u64, FenceError>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    let channel = crate::store::channels::near_shard_of_key(primary);
    let message = format!("{tag} {primary}");
    store.spublish(&channel, &message).await
}
