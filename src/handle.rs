//! [`FenceHandle`]: invalidation and counters.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use redis::aio::ConnectionLike;

use crate::error::FenceError;
use crate::key::{EntryKey, normalize_user_path};
use crate::layer::{Config, Shared};
use crate::stats::{Counters, Stats};

/// Invalidates cached entries and reads the cache's counters.
///
/// Made by [`FenceLayer::handle`](crate::FenceLayer::handle); cheap to clone,
/// `Send + Sync`, and bound to the namespace of the layer it came from.
///
/// After an invalidation returns, no request is served a response computed
/// by a fill that started before it: the entry and its fill leases are
/// removed in one script, so a fill elsewhere can't write its result back,
/// and this process's in-flight fill for the key is detached.
///
/// # Example
///
/// ```no_run
/// # async fn doc(handle: cachefence::FenceHandle<redis::aio::ConnectionManager>) -> Result<(), cachefence::FenceError> {
/// let removed = handle.invalidate_path("/products/42").await?;
/// println!("removed {removed} entries");
/// # Ok(()) }
/// ```
pub struct FenceHandle<C> {
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
    /// normalised as [`DefaultKey`](crate::DefaultKey) does): all `Vary`
    /// variants, for GET and HEAD. Returns how many entries were removed.
    ///
    /// This assumes the default key function; with a custom one use
    /// [`invalidate_key`](Self::invalidate_key).
    pub async fn invalidate_path(&self, path: &str) -> Result<u64, FenceError> {
        self.invalidate_key(&normalize_user_path(path)).await
    }

    /// Removes the entry stored under a cache key (as returned by the key
    /// function), with all its variants. Returns how many entries were
    /// removed.
    pub async fn invalidate_key(&self, key: &str) -> Result<u64, FenceError> {
        let ek = EntryKey::new(&self.config.namespace, key);
        // Detach first: a local fill that finishes between the script and
        // the detach must not hand its response to the requests that joined.
        self.detach(&ek);
        let removed = self
            .shared
            .store
            .invalidate(&ek.primary, &ek.variants_set())
            .await?;
        self.detach(&ek);
        tracing::debug!(key = %ek.primary, removed, "invalidated");
        Ok(removed)
    }

    /// Marks the entry of a URL stale instead of removing it: the next
    /// request is served the stale copy while one refresh runs. Fills in
    /// flight are fenced out as with [`invalidate_path`](Self::invalidate_path).
    /// Returns how many entries were marked.
    pub async fn soft_invalidate_path(&self, path: &str) -> Result<u64, FenceError> {
        self.soft_invalidate_key(&normalize_user_path(path)).await
    }

    /// [`soft_invalidate_path`](Self::soft_invalidate_path) by cache key.
    pub async fn soft_invalidate_key(&self, key: &str) -> Result<u64, FenceError> {
        let ek = EntryKey::new(&self.config.namespace, key);
        self.detach(&ek);
        let marked = self
            .shared
            .store
            .soft_invalidate(&ek.primary, &ek.variants_set())
            .await?;
        self.detach(&ek);
        Ok(marked)
    }

    fn detach(&self, ek: &EntryKey) {
        for _ in 0..self.shared.flights.detach_entry(&ek.primary) {
            Counters::inc(&self.shared.counters.detached);
        }
    }

    /// A snapshot of the counters of the layer this handle came from (shared
    /// by all its clones).
    pub fn stats(&self) -> Stats {
        let mut stats = self.shared.counters.snapshot();
        stats.redis_errors = self.shared.store.errors.load(Ordering::Relaxed);
        stats.redis_calls = self.shared.store.commands.load(Ordering::Relaxed);
        stats.in_flight = self.shared.flights.len() as u64;
        stats
    }
}
