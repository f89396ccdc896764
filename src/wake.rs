//! Wake-ups: one pub/sub subscription per cache that turns "a fill landed"
//! and "an entry was invalidated" announcements from any process into local
//! notifications. Pub/sub is at-most-once, so waiters always keep polling
//! as well; this only makes them faster.
//!
//! The channels are per namespace (`store::channels`): the listener
//! subscribes to those of every namespace a layer of the cache serves. On a
//! single server a namespace's wake-ups share one channel; on a Redis
//! Cluster they are sharded (`SSUBSCRIBE`), one channel per entry in the
//! entry's slot, subscribed while a fill of this process waits on it, so a
//! store's message travels only inside the shard that owns the key.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::ConnectionLike;

use crate::backoff::Backoff;
#[cfg(feature = "cluster-async")]
use crate::backoff::jittered;
use crate::near::Near;
#[cfg(feature = "cluster-async")]
use crate::shared::{Forward, Interests};
use crate::shared::{Interest, Shared, Source};
use crate::stats::Counters;
use crate::store::channels;

/// The first pause before a listener reconnects after a failure; pauses
/// double (with jitter, [`Backoff`]) up to [`RECONNECT_CAP`].
const RECONNECT_FIRST: Duration = Duration::from_millis(50);
/// The longest pause between two reconnection attempts of a listener.
const RECONNECT_CAP: Duration = Duration::from_secs(2);
/// The pause before the cluster listener retries a failed (re)subscription
/// (jittered: half of it to all of it).
#[cfg(feature = "cluster-async")]
const RESUBSCRIBE: Duration = Duration::from_millis(200);

/// Clears the layer's "listening" flag when the listener ends, however it
/// ends (the layer dropped, or the runtime it ran on shut down).
pub(crate) struct Running(pub(crate) Arc<AtomicBool>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Starts the listener (see [`ensure_listener`]) and has it listen to the
/// channels of `namespace`.
pub(crate) fn listen_to<C>(shared: &Arc<Shared<C>>, namespace: &str)
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    if shared.interests.add_namespace(namespace)
        && let Some(near) = shared.near()
    {
        // Not in use until the new namespace's announcements are heard
        // (the namespace is added first: a subscription made before it
        // does not put the near cache back in use). Not a lost
        // subscription: not counted as a flush.
        near.down();
        // A sync that started after the namespace was added may have put
        // it back in use before this `down`: sync again (it finds nothing
        // new to subscribe, and puts it back in use).
        shared.interests.changed.notify_one();
    }
    ensure_listener(shared);
}

/// Has the listener hear the near-cache acknowledgements of `namespace`,
/// for a handle invalidating there (a process with no layer in it, such as
/// an invalidation worker, would otherwise wait them out).
pub(crate) fn hear_acks<C>(shared: &Arc<Shared<C>>, namespace: &str)
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    shared.interests.add_acks(namespace);
    ensure_listener(shared);
}

/// Has the listener subscribe to the wake-ups of the entry `key` while the
/// guard lives: on a Redis Cluster wake-ups are sharded, one channel per
/// entry (nothing on a single server, where the namespace's channel
/// carries every wake-up).
pub(crate) fn wake_interest<C>(shared: &Arc<Shared<C>>, key: &str) -> Option<Interest>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    if !shared.store.is_cluster() {
        return None;
    }
    let channel = channels::wake_of_key(key, true)?;
    ensure_listener(shared);
    Some(shared.interests.interest(channel))
}

/// Runs until the cache is dropped, reconnecting with backoff.
pub(crate) async fn listen<C>(source: Source, shared: Weak<Shared<C>>, _running: Running)
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    match source {
        Source::Single(client) => listen_single(Master::Fixed(client), shared).await,
        #[cfg(feature = "sentinel")]
        Source::Sentinel(conn) => listen_single(Master::Sentinel(conn), shared).await,
        #[cfg(feature = "cluster-async")]
        Source::Cluster(client, forward) => listen_cluster(*client, forward, shared).await,
    }
}

/// Where a single-server listener connects: one address, or the master a
/// Sentinel names (looked up at each connection, and the subscription
/// moved when the master changes).
enum Master {
    Fixed(redis::Client),
    #[cfg(feature = "sentinel")]
    Sentinel(crate::sentinel::SentinelConnection),
}

impl Master {
    fn client(&self) -> redis::Client {
        match self {
            Self::Fixed(client) => client.clone(),
            #[cfg(feature = "sentinel")]
            Self::Sentinel(conn) => conn.master_client(),
        }
    }

    /// Told when the master changes (never for a fixed address).
    fn moves(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        match self {
            Self::Fixed(_) => None,
            #[cfg(feature = "sentinel")]
            Self::Sentinel(conn) => Some(conn.subscribe()),
        }
    }

    /// The connection failed: have a Sentinel connection look for the
    /// master now.
    fn failed(&self) {
        #[cfg(feature = "sentinel")]
        if let Self::Sentinel(conn) = self {
            conn.nudge();
        }
    }
}

/// Resolves when the master moves; never for a fixed address.
async fn moved(moves: &mut Option<tokio::sync::watch::Receiver<u64>>) {
    if let Some(rx) = moves
        && rx.changed().await.is_ok()
    {
        return;
    }
    std::future::pending::<()>().await
}

async fn listen_single<C>(master: Master, shared: Weak<Shared<C>>)
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    let Some(interests) = shared.upgrade().map(|s| s.interests.clone()) else {
        return;
    };
    if shared.upgrade().is_some_and(|s| s.store.is_cluster()) {
        tracing::warn!(
            "wake_ups(redis::Client) on a Redis Cluster hears invalidations but not the sharded wake-ups: use cluster_wake_ups"
        );
    }
    // However the listener ends, the near cache is emptied and bypassed.
    let _near = NearDown(shared.clone());
    let mut backoff = Backoff::new(RECONNECT_FIRST, RECONNECT_CAP);
    // A move (the Sentinel named a new master): reconnect at once.
    let mut at_once = false;
    let mut moves = master.moves();
    loop {
        if shared.strong_count() == 0 {
            return;
        }
        if let Some(rx) = moves.as_mut() {
            rx.borrow_and_update();
        }
        let client = master.client();
        match timed(client.get_async_pubsub()).await {
            Ok(pubsub) => {
                backoff.reset();
                let (mut sink, mut messages) = pubsub.split();
                let mut subscribed: HashSet<String> = HashSet::new();
                let mut synced = sync_single(&mut sink, &shared, &mut subscribed).await;
                if synced.is_ok() {
                    tracing::debug!("wake-up subscription established");
                    if let Some(shared) = shared.upgrade() {
                        Counters::inc(&shared.counters.listener_connects);
                    }
                }
                // With a near cache, a subscription that stops answering
                // (a half-open connection) ends the loop within 1.5 s.
                let probing = probe(sink.clone(), shared.clone());
                tokio::pin!(probing);
                while synced.is_ok() {
                    tokio::select! {
                        () = &mut probing => {
                            tracing::info!("wake-up subscription: a probe went unanswered; near cache emptied, reconnecting");
                            break;
                        }
                        msg = messages.next() => {
                            let Some(msg) = msg else { break };
                            let Some(shared) = shared.upgrade() else { return };
                            dispatch(&shared, &msg);
                        }
                        () = interests.changed.notified() => {
                            synced = sync_single(&mut sink, &shared, &mut subscribed).await;
                        }
                        () = moved(&mut moves) => {
                            tracing::info!("wake-up subscription: the master moved; subscribing there");
                            at_once = true;
                            break;
                        }
                        () = tokio::time::sleep(Duration::from_secs(5)) => {
                            if shared.strong_count() == 0 {
                                return;
                            }
                        }
                    }
                }
                if near_down(&shared)
                    && let Some(shared) = shared.upgrade()
                {
                    // Out of the registry before a new subscription may
                    // put it back.
                    registry(&shared, false).await;
                }
                tracing::debug!("wake-up subscription lost, reconnecting");
                master.failed();
            }
            Err(err) => {
                tracing::debug!(error = %err, "wake-up subscription failed, retrying");
                master.failed();
            }
        }
        let pause = if std::mem::take(&mut at_once) {
            Duration::ZERO
        } else {
            backoff.next()
        };
        // A move (the Sentinel named a new master) ends the wait early.
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = moved(&mut moves) => {}
        }
    }
}

/// Subscribes to the channels of the namespaces not subscribed yet: the
/// wake-ups, the invalidations, this cache's acknowledgements, and with a
/// near cache the near-cache announcements; then the near cache is in use.
async fn sync_single<C>(
    sink: &mut redis::aio::PubSubSink,
    shared: &Weak<Shared<C>>,
    subscribed: &mut HashSet<String>,
) -> redis::RedisResult<()>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    let Some(shared) = shared.upgrade() else {
        return Ok(());
    };
    let near = shared.near();
    let version = shared.interests.version();
    let mut wanted = Vec::new();
    for namespace in shared.interests.namespaces() {
        wanted.push(channels::wake(&namespace));
        wanted.push(channels::invalidate(&namespace));
        if near.is_some() {
            wanted.push(channels::near(&namespace));
        }
    }
    for namespace in shared.interests.ack_namespaces() {
        wanted.push(channels::ack(&namespace, shared.id));
    }
    let new: Vec<String> = wanted
        .into_iter()
        .filter(|channel| !subscribed.contains(channel))
        .collect();
    if !new.is_empty() {
        timed(sink.subscribe(&new)).await?;
        subscribed.extend(new);
    }
    // Every namespace's announcements are heard from here on (unless one
    // was added meanwhile: the next sync takes it).
    if let Some(near) = near
        && !near.is_up()
        && shared.interests.version() == version
    {
        near.up();
        spawn_registry(&shared, true);
        tracing::debug!("near cache in use");
    }
    Ok(())
}

/// With a near cache: `PING`s the subscribed connection every
/// [`PROBE_EVERY`](crate::near::PROBE_EVERY) and returns when one is not
/// answered within [`PROBE_TIMEOUT`](crate::near::PROBE_TIMEOUT) (the
/// answer comes after every message sent before it: the stream is alive up
/// to then), or fails. While the near cache is in use, renews its
/// registration every [`REGISTER_EVERY`](crate::near::REGISTER_EVERY).
/// Sends nothing without a near cache (the wake-ups are polled anyway).
async fn probe<C>(mut sink: redis::aio::PubSubSink, shared: Weak<Shared<C>>)
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    use crate::near::{PROBE_EVERY, PROBE_TIMEOUT, REGISTER_EVERY};

    let mut registered = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(PROBE_EVERY).await;
        // Looked at each time: `near_cache` may be set after the listener
        // connected.
        if shared.upgrade().is_none_or(|s| s.near().is_none()) {
            continue;
        }
        match tokio::time::timeout(PROBE_TIMEOUT, sink.ping::<redis::Value>()).await {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => {
                tracing::debug!(error = %err, "near-cache subscription probe failed");
                return;
            }
            Err(_) => {
                tracing::debug!("near-cache subscription probe unanswered");
                return;
            }
        }
        let Some(shared) = shared.upgrade() else {
            return std::future::pending().await;
        };
        if registered.elapsed() >= REGISTER_EVERY && shared.near().is_some_and(Near::is_up) {
            registered = tokio::time::Instant::now();
            spawn_registry(&shared, true);
        }
    }
}

/// Registers this cache's near cache as alive in the registry of each of
/// its namespaces (`alive`), or takes it out (`store::near_registry`).
async fn registry<C>(shared: &Shared<C>, alive: bool)
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    for namespace in shared.interests.namespaces() {
        let ttl = crate::near::REGISTERED_FOR;
        if let Err(err) = shared
            .store
            .near_register(&namespace, shared.id, alive, ttl)
            .await
        {
            tracing::debug!(error = %err, alive, "near-cache registration failed");
        }
    }
}

/// [`registry`] in the background.
fn spawn_registry<C>(shared: &Arc<Shared<C>>, alive: bool)
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        let shared = shared.clone();
        runtime.spawn(async move { registry(&shared, alive).await });
    }
}

/// Empties the near cache and bypasses it until the subscription is back.
/// Returns whether it was in use.
fn near_down<C>(shared: &Weak<Shared<C>>) -> bool
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    let Some(shared) = shared.upgrade() else {
        return false;
    };
    let Some(dropped) = shared.near.get().and_then(Near::down) else {
        return false;
    };
    Counters::inc(&shared.counters.near_flushes);
    tracing::debug!(dropped, "near cache flushed: its subscription is lost");
    true
}

/// Calls [`near_down`] when the listener ends, however it ends.
struct NearDown<C>(Weak<Shared<C>>)
where
    C: ConnectionLike + Clone + Send + Sync + 'static;

impl<C> Drop for NearDown<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    fn drop(&mut self) {
        if near_down(&self.0)
            && let Some(shared) = self.0.upgrade()
        {
            spawn_registry(&shared, false);
        }
    }
}

#[cfg(feature = "cluster-async")]
async fn listen_cluster<C>(
    client: redis::cluster::ClusterClient,
    forward: Forward,
    shared: Weak<Shared<C>>,
) where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    use redis::PushKind;

    let Some(interests) = shared.upgrade().map(|s| s.interests.clone()) else {
        return;
    };
    let mut backoff = Backoff::new(RECONNECT_FIRST, RECONNECT_CAP);
    let mut conn = loop {
        if shared.strong_count() == 0 {
            return;
        }
        match timed(client.get_async_connection()).await {
            Ok(conn) => break conn,
            Err(err) => {
                tracing::debug!(error = %err, "wake-up cluster connection failed, retrying");
            }
        }
        tokio::time::sleep(backoff.next()).await;
    };
    let (tx, mut pushes) = tokio::sync::mpsc::unbounded_channel();
    if let Ok(mut slot) = forward.lock() {
        *slot = Some(tx);
    }
    if let Some(shared) = shared.upgrade() {
        Counters::inc(&shared.counters.listener_connects);
    }
    tracing::debug!("wake-up cluster connection established");
    // The connection resubscribes by itself after a reconnection or a
    // topology change; what the server drops (a slot moved away sends
    // `sunsubscribe`) is subscribed again here, at the slot's new owner.
    let mut held = Held::default();
    interests.unconfirm(None);
    // However the listener ends, the near cache is emptied and bypassed.
    let _near = NearDown(shared.clone());
    let mut dirty = true;
    loop {
        if dirty {
            dirty = !sync_cluster(&mut conn, &interests, &mut held).await;
            dirty |= !sync_cluster_near(&mut conn, &shared, &mut held).await;
        }
        let retry = if dirty {
            // Spread: every process resubscribes after the same event.
            jittered(RESUBSCRIBE, RESUBSCRIBE, 1)
        } else {
            Duration::from_secs(5)
        };
        tokio::select! {
            push = pushes.recv() => {
                let Some(push) = push else { return };
                let Some(shared) = shared.upgrade() else { return };
                match push.kind {
                    PushKind::SUnsubscribe | PushKind::Unsubscribe => {
                        if let Some(channel) = push.data.first().and_then(string_of) {
                            // Ours (sync_cluster forgot it first) or the
                            // server's: either way look again.
                            interests.unconfirm(Some(&channel));
                            if held.near.remove(&channel) {
                                // The announcements' slot moved: nothing is
                                // heard until the subscription is back.
                                near_down(&Arc::downgrade(&shared));
                                dirty = true;
                            }
                            if held.shards.remove(&channel) || held.namespace.remove(&channel) {
                                dirty = true;
                            }
                        }
                    }
                    PushKind::Disconnection => {
                        // A node's connection dropped: redis-rs subscribes
                        // again by itself, but what was sent meanwhile is
                        // lost. Subscribe (and confirm) everything again.
                        tracing::debug!("wake-up cluster connection: a node disconnected");
                        near_down(&Arc::downgrade(&shared));
                        interests.unconfirm(None);
                        held = Held::default();
                        dirty = true;
                        // Their messages may be lost: waiters look now.
                        shared.flights.wake_all();
                    }
                    _ => {
                        if let Some(msg) = redis::Msg::from_push_info(push) {
                            dispatch(&shared, &msg);
                        }
                    }
                }
            }
            () = interests.changed.notified() => dirty = true,
            () = tokio::time::sleep(retry) => {
                if shared.strong_count() == 0 {
                    return;
                }
            }
        }
    }
}

/// Starts the wake-up listener once, if a client for it was given and a
/// Tokio runtime is running.
///
/// Called again where waiting starts: a listener that ended with the
/// runtime it ran on is started again on the current one.
pub(crate) fn ensure_listener<C>(shared: &Arc<Shared<C>>)
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    if shared.listening.load(Ordering::Acquire) {
        return;
    }
    let Some(client) = shared.wake_client.get() else {
        return;
    };
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    if shared
        .listening
        .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
    {
        let weak: Weak<Shared<C>> = Arc::downgrade(shared);
        let running = Running(shared.listening.clone());
        runtime.spawn(listen(client.clone(), weak, running));
    }
}

/// The channels a cluster listener holds.
#[cfg(feature = "cluster-async")]
#[derive(Default)]
struct Held {
    /// Classic channels: invalidations, and the near cache's
    /// acknowledgements and store announcements.
    namespace: HashSet<String>,
    /// Sharded wake-up channels of the entries fills wait on.
    shards: HashSet<String>,
    /// The namespaces' sharded near-cache channels (`channels::near_shard`).
    near: HashSet<String>,
}

/// The near cache's channels on a Redis Cluster: this cache's
/// acknowledgements (classic: a `PUBLISH` reaches every node), and with a
/// near cache each namespace's classic `#near` (the stores' announcements,
/// which need no count) and sharded `#near:{..}` (the invalidations', whose
/// `SPUBLISH` counts every near cache on one primary). Then, when every one
/// is held and no namespace was added meanwhile, the near cache is in use.
/// Returns whether every command succeeded.
#[cfg(feature = "cluster-async")]
async fn sync_cluster_near<C>(
    conn: &mut redis::cluster_async::ClusterConnection,
    shared: &Weak<Shared<C>>,
    held: &mut Held,
) -> bool
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    let Some(shared) = shared.upgrade() else {
        return true;
    };
    let near = shared.near();
    let version = shared.interests.version();
    let mut classic = Vec::new();
    let mut sharded = Vec::new();
    for namespace in shared.interests.ack_namespaces() {
        classic.push(channels::ack(&namespace, shared.id));
    }
    if near.is_some() {
        for namespace in shared.interests.namespaces() {
            classic.push(channels::near(&namespace));
            sharded.push(channels::near_shard(&namespace));
        }
    }
    classic.retain(|c| !held.namespace.contains(c));
    let mut ok = true;
    if !classic.is_empty() {
        match timed(conn.subscribe(&classic)).await {
            Ok(()) => held.namespace.extend(classic),
            Err(err) => {
                tracing::debug!(error = %err, "subscribing to the near-cache channels failed");
                ok = false;
            }
        }
    }
    for channel in sharded {
        if held.near.contains(&channel) {
            continue;
        }
        match timed(conn.ssubscribe(&channel)).await {
            Ok(()) => {
                held.near.insert(channel);
            }
            Err(err) => {
                tracing::debug!(error = %err, "subscribing to the sharded near-cache channel failed");
                ok = false;
            }
        }
    }
    if ok
        && let Some(near) = near
        && !near.is_up()
        && shared.interests.version() == version
    {
        near.up();
        tracing::debug!("near cache in use (Redis Cluster)");
    }
    ok
}

/// Brings the cluster subscriptions in line with the interests. Returns
/// whether every command succeeded (else it is tried again soon).
#[cfg(feature = "cluster-async")]
async fn sync_cluster(
    conn: &mut redis::cluster_async::ClusterConnection,
    interests: &Interests,
    held: &mut Held,
) -> bool {
    let mut ok = true;
    let mut new = Vec::new();
    for namespace in interests.namespaces() {
        let channel = channels::invalidate(&namespace);
        if !held.namespace.contains(&channel) {
            new.push(channel);
        }
    }
    if !new.is_empty() {
        match timed(conn.subscribe(&new)).await {
            Ok(()) => held.namespace.extend(new),
            Err(err) => {
                tracing::debug!(error = %err, "subscribing to invalidations failed");
                ok = false;
            }
        }
    }
    // One channel per call: each lives in its own slot.
    for channel in interests.take_unwanted(&held.shards) {
        held.shards.remove(&channel);
        if let Err(err) = timed(conn.sunsubscribe(&channel)).await {
            tracing::debug!(error = %err, "sharded unsubscribe failed");
        }
    }
    let wanted = interests.shards();
    let new: Vec<String> = wanted.difference(&held.shards).cloned().collect();
    for channel in new {
        match timed(conn.ssubscribe(&channel)).await {
            Ok(()) => {
                // The server answered: its `SPUBLISH`es reach us from now on.
                interests.confirm(&channel);
                held.shards.insert(channel);
            }
            Err(err) => {
                tracing::debug!(error = %err, "sharded subscribe failed");
                ok = false;
            }
        }
    }
    ok
}

#[cfg(feature = "cluster-async")]
fn string_of(value: &redis::Value) -> Option<String> {
    match value {
        redis::Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        redis::Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// Acts on one message: wakes the fills waiting on a key, restarts this
/// process's fills of an entry another process invalidated, drops a near
/// cache's entries of a URL written elsewhere (and acknowledges), or counts
/// an acknowledgement of this cache's announcement.
fn dispatch<C>(shared: &Arc<Shared<C>>, msg: &redis::Msg)
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    let Ok(payload) = std::str::from_utf8(msg.get_payload_bytes()) else {
        return;
    };
    let Ok(channel) = std::str::from_utf8(msg.get_channel_name().as_bytes()) else {
        return;
    };
    if channels::is_near(channel) {
        near_announced(shared, payload);
        return;
    }
    if channels::is_ack(channel) {
        if let Ok(seq) = payload.parse::<u64>() {
            shared.acks.ack(seq);
        }
        return;
    }
    if channels::is_wake(channel) {
        if let Some(key) = payload.strip_suffix(":lease") {
            shared.flights.wake(key);
        }
        return;
    }
    // `<kind>:<sender id>:<key or prefix>`; this cache already detached
    // its own.
    let Some((kind, rest)) = payload.split_once(':') else {
        return;
    };
    let Some((sender, target)) = rest.split_once(':') else {
        return;
    };
    if sender.parse::<u64>().ok() == Some(shared.id) {
        return;
    }
    let n = match kind {
        "prefix" => shared.flights.detach_prefix(target),
        "key" => shared.flights.detach_entry(target),
        _ => 0,
    };
    Counters::add(&shared.counters.detached, n);
}

/// `<ack tag> <key>` on `#near`: drop the key's URL from the near cache,
/// then acknowledge to the sender (tag `<sender>:<seq>`; `-` asks for none).
fn near_announced<C>(shared: &Arc<Shared<C>>, payload: &str)
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    let Some((tag, key)) = payload.split_once(' ') else {
        return;
    };
    if let Some(near) = shared.near.get() {
        let dropped = near.drop_url_of(key);
        Counters::add(&shared.counters.near_evictions, dropped);
    }
    let Some((sender, seq)) = tag.split_once(':') else {
        return;
    };
    let channel = channels::ack_of_key(key, sender);
    let seq = seq.to_owned();
    let shared = shared.clone();
    tokio::spawn(async move {
        if let Err(err) = shared.store.publish(&channel, &seq).await {
            tracing::debug!(error = %err, "acknowledging a near-cache announcement failed");
        }
    });
}

/// A pub/sub call bounded at 2 s.
async fn timed<T>(
    call: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> redis::RedisResult<T> {
    match tokio::time::timeout(Duration::from_secs(2), call).await {
        Ok(result) => result,
        Err(_) => Err(redis::RedisError::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "pub/sub call timed out",
        ))),
    }
}
