//! The Redis commands of an [`InvalidationWorker`]: creating its group,
//! claiming and reading messages, and the scripts for each attempt.

use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Client, Value};

use super::InvalidationWorker;
use super::control::Counters;
use super::node;
use super::run::Run;
use crate::entry::duration_ms;
use crate::error::FenceError;
use crate::error::timed;
use crate::queue::call::call;
use crate::queue::reply::{Entry, parse_entries, parse_read, text};

/// How long the attempts hash lives after its last write.
const ATTEMPTS_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// The worker's own connection for its blocking reads.
pub(super) struct ReadConn {
    conn: MultiplexedConnection,
    /// Its `CLIENT ID`, for `CLIENT UNBLOCK` at shutdown.
    id: Option<i64>,
    /// On a Redis Cluster, the node it is connected to (`CLIENT UNBLOCK`
    /// must reach that node).
    node: Option<(String, u16, Client)>,
}

/// How a blocking read ended.
pub(super) enum Read {
    Entries(Vec<Entry>),
    Stopped,
}

impl<C> InvalidationWorker<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    pub(super) async fn ensure_group(&self) -> Result<(), FenceError> {
        let mut cmd = redis::cmd("XGROUP");
        cmd.arg("CREATE")
            .arg(&self.queue.keys.stream)
            .arg(&self.group)
            .arg("0")
            .arg("MKSTREAM");
        match call::<Value, _>(&self.queue.conn, self.queue.timeout, &cmd).await {
            Ok(_) => {}
            Err(err) if err.redis_code() == Some("BUSYGROUP") => {}
            Err(err) => return Err(err),
        }
        // Redis creates a consumer only when it is first handed a message:
        // create it now, so that `stats()` shows an idle worker too.
        let mut cmd = redis::cmd("XGROUP");
        cmd.arg("CREATECONSUMER")
            .arg(&self.queue.keys.stream)
            .arg(&self.group)
            .arg(&self.consumer);
        call::<Value, _>(&self.queue.conn, self.queue.timeout, &cmd).await?;
        Ok(())
    }

    /// Claims due entries (`XAUTOCLAIM`, counting the reclaimed ones in
    /// the queue's stats). Returns the next cursor, the entries and how
    /// many were reclaimed from a worker that died or stopped.
    pub(super) async fn autoclaim(
        &self,
        cursor: &str,
    ) -> Result<(String, Vec<Entry>, u64), FenceError> {
        let keys = &self.queue.keys;
        let mut inv = self.queue.scripts.claim.key(&keys.stream);
        inv.key(&keys.attempts)
            .key(&keys.stats)
            .arg(&self.group)
            .arg(&self.consumer)
            .arg(duration_ms(self.claim_idle))
            .arg(cursor)
            .arg(self.batch);
        let mut conn = self.queue.conn.clone();
        let value: Value = timed(self.queue.timeout, inv.invoke_async(&mut conn)).await?;
        let Value::Array(mut parts) = value else {
            return Err(FenceError::invalid_input("unexpected XAUTOCLAIM reply"));
        };
        if parts.len() < 3 {
            return Err(FenceError::invalid_input("unexpected XAUTOCLAIM reply"));
        }
        let reclaimed = match parts.pop() {
            Some(Value::Int(n)) => u64::try_from(n).unwrap_or(0),
            _ => 0,
        };
        let entries = parts.swap_remove(1);
        let next = text(&parts[0]).unwrap_or_else(|| "0-0".to_owned());
        Ok((next, parse_entries(entries), reclaimed))
    }

    /// The heartbeat: resets the idle time of the held entries that are
    /// still this worker's. Returns those another worker took over.
    pub(super) async fn refresh(&self, ids: &[String]) -> Result<Vec<String>, FenceError> {
        let mut inv = self.queue.scripts.refresh.key(&self.queue.keys.stream);
        inv.arg(&self.group).arg(&self.consumer);
        for id in ids {
            inv.arg(id);
        }
        let mut conn = self.queue.conn.clone();
        let value: Value = timed(self.queue.timeout, inv.invoke_async(&mut conn)).await?;
        let lost = match value {
            Value::Array(mut lists) if lists.len() == 2 => lists.pop(),
            _ => None,
        };
        Ok(match lost {
            Some(Value::Array(ids)) => ids.iter().filter_map(text).collect(),
            _ => Vec::new(),
        })
    }

    /// One blocking read on the worker's own connection. Shutdown ends it
    /// early with `CLIENT UNBLOCK`, so no message is delivered to a read
    /// nobody waits for.
    /// The client for the worker's reads: its own on a single server; on a
    /// Redis Cluster, one for the primary owning the queue's slot (where a
    /// `MOVED` pointed, else looked up).
    async fn read_client(
        &self,
        redirect: Option<(String, u16)>,
    ) -> Result<(Client, Option<(String, u16)>), FenceError> {
        #[cfg(feature = "sentinel")]
        if let Some(conn) = &self.sentinel {
            return Ok((conn.master_client(), None));
        }
        if !self.queue.handle.is_cluster() {
            return Ok((self.client.clone(), None));
        }
        let (host, port) = match redirect {
            Some(node) => node,
            None => self.slot_owner().await?,
        };
        let client = node::client_for(&self.client, host.clone(), port)?;
        Ok((client, Some((host, port))))
    }

    /// The primary serving the queue's slot, from `CLUSTER SLOTS` over the
    /// queue's (cluster) connection.
    async fn slot_owner(&self) -> Result<(String, u16), FenceError> {
        let mut cmd = redis::cmd("CLUSTER");
        cmd.arg("SLOTS");
        let reply: Value = call(&self.queue.conn, self.queue.timeout, &cmd).await?;
        let slot = node::slot(self.queue.keys.stream.as_bytes());
        let (host, port) = node::owner(&reply, slot).ok_or_else(|| {
            FenceError::invalid_input("CLUSTER SLOTS names no primary for the queue's slot")
        })?;
        if host.is_empty() {
            // The node does not know its address: the seed's host.
            let seed = match self.client.get_connection_info().addr() {
                redis::ConnectionAddr::Tcp(h, _) => h.clone(),
                redis::ConnectionAddr::TcpTls { host, .. } => host.clone(),
                _ => "127.0.0.1".to_owned(),
            };
            return Ok((seed, port));
        }
        Ok((host, port))
    }

    /// One blocking read on the worker's own connection. Shutdown ends it
    /// early with `CLIENT UNBLOCK`, so no message is delivered to a read
    /// nobody waits for.
    pub(super) async fn read(&self, run: &mut Run, wait: Duration) -> Result<Read, FenceError> {
        let margin = self.queue.timeout.max(Duration::from_secs(1));
        if run.conn.is_none() {
            let (client, node) = self.read_client(run.redirect.take()).await?;
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(margin))
                .set_response_timeout(Some(self.block + margin));
            let mut conn = timed(
                margin + margin,
                client.get_multiplexed_async_connection_with_config(&config),
            )
            .await?;
            Counters::add(&self.control.counters.connects, 1);
            let id: Option<i64> = timed(
                margin,
                redis::cmd("CLIENT").arg("ID").query_async(&mut conn),
            )
            .await
            .ok();
            if let Some((host, port)) = &node {
                tracing::info!(node = %format!("{host}:{port}"), "invalidation worker: reading from the primary that owns the queue's slot");
            }
            run.conn = Some(ReadConn {
                conn,
                id,
                node: node.map(|(h, p)| (h, p, client)),
            });
        }
        let Some(ReadConn {
            conn,
            id: client_id,
            node,
        }) = run.conn.as_mut()
        else {
            return Ok(Read::Stopped);
        };
        let client_id = *client_id;
        let node_client = node.as_ref().map(|(_, _, c)| c.clone());
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(self.batch)
            .arg("BLOCK")
            .arg(duration_ms(wait).max(1))
            .arg("STREAMS")
            .arg(&self.queue.keys.stream)
            .arg(">");
        let read = timed::<Value>(wait + margin, cmd.query_async(conn));
        tokio::pin!(read);
        let mut rx = self.control.shutdown.subscribe();
        let stopped = async move {
            if rx.wait_for(|stop| *stop).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        let value = tokio::select! {
            value = &mut read => value?,
            () = stopped => {
                if let Some(id) = client_id {
                    self.unblock(id, node_client, margin).await;
                }
                match read.await {
                    Ok(value) => {
                        let ids: Vec<String> = parse_read(value).into_iter().map(|e| e.id).collect();
                        self.release(&ids).await;
                    }
                    Err(err) => tracing::debug!(error = %err, "the last read failed at shutdown"),
                }
                return Ok(Read::Stopped);
            }
        };
        Ok(Read::Entries(parse_read(value)))
    }

    /// Ends the blocking read of client `id`: over the queue's connection
    /// on a single server, over a connection of its own to the read's node
    /// on a cluster.
    async fn unblock(&self, id: i64, node: Option<Client>, margin: Duration) {
        let mut unblock = redis::cmd("CLIENT");
        unblock.arg("UNBLOCK").arg(id);
        let result = match node {
            None => call::<Value, _>(&self.queue.conn, self.queue.timeout, &unblock).await,
            Some(client) => {
                async {
                    let conn: MultiplexedConnection =
                        timed(margin, client.get_multiplexed_async_connection()).await?;
                    call::<Value, _>(&conn, self.queue.timeout, &unblock).await
                }
                .await
            }
        };
        if let Err(err) = result {
            tracing::debug!(error = %err, "CLIENT UNBLOCK failed; waiting for the read to end");
        }
    }

    pub(super) async fn begin(&self, id: &str) -> Result<(u64, String), FenceError> {
        let mut inv = self.queue.scripts.begin.key(&self.queue.keys.attempts);
        inv.arg(id).arg(duration_ms(ATTEMPTS_TTL));
        let mut conn = self.queue.conn.clone();
        let (n, err): (i64, String) =
            timed(self.queue.timeout, inv.invoke_async(&mut conn)).await?;
        Ok((u64::try_from(n).unwrap_or(1).max(1), err))
    }

    pub(super) async fn ack(&self, id: &str) -> Result<bool, FenceError> {
        let keys = &self.queue.keys;
        let mut inv = self.queue.scripts.ack.key(&keys.stream);
        inv.key(&keys.attempts)
            .key(&keys.stats)
            .arg(&self.group)
            .arg(id);
        let mut conn = self.queue.conn.clone();
        let n: i64 = timed(self.queue.timeout, inv.invoke_async(&mut conn)).await?;
        Ok(n > 0)
    }

    pub(super) async fn fail(
        &self,
        id: &str,
        error: &str,
        delay: Duration,
        counted: bool,
    ) -> Result<(), FenceError> {
        let keys = &self.queue.keys;
        let mut inv = self.queue.scripts.fail.key(&keys.stream);
        inv.key(&keys.attempts)
            .key(&keys.stats)
            .arg(&self.group)
            .arg(&self.consumer)
            .arg(id)
            .arg(error)
            .arg(duration_ms(delay))
            .arg(duration_ms(self.claim_idle))
            .arg(duration_ms(ATTEMPTS_TTL))
            .arg(if counted { "0" } else { "1" });
        let mut conn = self.queue.conn.clone();
        timed::<Value>(self.queue.timeout, inv.invoke_async(&mut conn)).await?;
        Ok(())
    }

    pub(super) async fn retire(&self) -> Result<bool, FenceError> {
        let mut inv = self.queue.scripts.retire.key(&self.queue.keys.stream);
        inv.arg(&self.group).arg(&self.consumer);
        let mut conn = self.queue.conn.clone();
        let n: i64 = timed(self.queue.timeout, inv.invoke_async(&mut conn)).await?;
        Ok(n == 1)
    }
}
