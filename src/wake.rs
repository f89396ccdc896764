//! Wake-ups: one pub/sub subscription per layer that turns "a fill landed"
//! and "an entry was invalidated" announcements from any process into local
//! notifications. Pub/sub is at-most-once, so waiters always keep polling
//! as well; this only makes them faster.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::ConnectionLike;

use crate::shared::Shared;
use crate::stats::Counters;
use crate::store::{INVALIDATE_CHANNEL, WAKE_CHANNEL};

/// Clears the layer's "listening" flag when the listener ends, however it
/// ends (the layer dropped, or the runtime it ran on shut down).
pub(crate) struct Running(pub(crate) Arc<AtomicBool>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Runs until the layer is dropped, reconnecting with backoff.
pub(crate) async fn listen<C>(client: redis::Client, shared: Weak<Shared<C>>, _running: Running)
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    let mut backoff = Duration::from_millis(50);
    loop {
        if shared.strong_count() == 0 {
            return;
        }
        match subscribe(&client).await {
            Ok(pubsub) => {
                backoff = Duration::from_millis(50);
                tracing::debug!("wake-up subscription established");
                if let Some(shared) = shared.upgrade() {
                    Counters::inc(&shared.counters.listener_connects);
                }
                let mut messages = pubsub.into_on_message();
                while let Some(msg) = next_or_gone(&mut messages, &shared).await {
                    let Some(shared) = shared.upgrade() else {
                        return;
                    };
                    let Ok(payload) = std::str::from_utf8(msg.get_payload_bytes()) else {
                        continue;
                    };
                    match msg.get_channel_name() {
                        WAKE_CHANNEL => {
                            if let Some(key) = payload.strip_suffix(":lease") {
                                shared.flights.wake(key);
                            }
                        }
                        INVALIDATE_CHANNEL => {
                            // `<kind>:<sender id>:<key or prefix>`; this
                            // layer already detached its own.
                            let Some((kind, rest)) = payload.split_once(':') else {
                                continue;
                            };
                            let Some((sender, target)) = rest.split_once(':') else {
                                continue;
                            };
                            if sender.parse::<u64>().ok() == Some(shared.id) {
                                continue;
                            }
                            let n = match kind {
                                "prefix" => shared.flights.detach_prefix(target),
                                "key" => shared.flights.detach_entry(target),
                                _ => 0,
                            };
                            Counters::add(&shared.counters.detached, n);
                        }
                        _ => {}
                    }
                }
                tracing::debug!("wake-up subscription lost, reconnecting");
            }
            Err(err) => {
                tracing::debug!(error = %err, "wake-up subscription failed, retrying");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

async fn subscribe(client: &redis::Client) -> redis::RedisResult<redis::aio::PubSub> {
    let connect = async {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub
            .subscribe(&[WAKE_CHANNEL, INVALIDATE_CHANNEL])
            .await?;
        Ok(pubsub)
    };
    match tokio::time::timeout(Duration::from_secs(2), connect).await {
        Ok(result) => result,
        Err(_) => Err(redis::RedisError::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "pub/sub connect timed out",
        ))),
    }
}

/// The next message, or `None` when the stream ends or the layer is gone
/// (checked every few seconds so an idle listener doesn't outlive it).
async fn next_or_gone<C>(
    messages: &mut redis::aio::PubSubStream,
    shared: &Weak<Shared<C>>,
) -> Option<redis::Msg> {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), messages.next()).await {
            Ok(msg) => return msg,
            Err(_) if shared.strong_count() == 0 => return None,
            Err(_) => {}
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
