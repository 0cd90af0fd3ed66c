//! A server's housekeeping: it takes over entries that dead consumers left pending
//! (`XAUTOCLAIM`), deletes entries every group has settled, keeps the streams' TTLs
//! and its held entries fresh, and prunes the groups of servers and watchers that died.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use redis::streams::StreamAutoClaimReply;
use rpc_core::{ByteBudget, Delivery, Error, Result};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::settle::{InFlight, Settle, delivery, lock};
use super::{GROUP, MAX_BATCH, ServerKeys};
use crate::Shared;
use crate::commands::{DROP_FANOUT_GROUP, DROP_IDLE_CONSUMER, TRIM_SETTLED, mark_alive_cmd};
use crate::connection::Connection;
use crate::entry::entry_size;
use crate::error::redis_error;
use crate::watcher::WATCHER_GROUP_PREFIX;

/// The pipeline that resets the idle time of the `held` entries (stream key, entry
/// id) of the instance `keys` name: an `XCLAIM ... JUSTID` per stream holding some.
/// Every key is one of the topic's: one slot.
pub(super) fn claim_held(keys: &ServerKeys, held: &[(String, String)]) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    for key in [&keys.topic, &keys.server] {
        let ids: Vec<&String> = held
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, id)| id)
            .collect();
        if !ids.is_empty() {
            pipe.cmd("XCLAIM")
                .arg(key)
                .arg(GROUP)
                .arg(&keys.instance)
                .arg(0)
                .arg(&ids)
                .arg("JUSTID")
                .ignore();
        }
    }
    pipe
}

/// Claims abandoned entries, deletes settled ones, refreshes TTLs and prunes dead
/// servers' and watchers' groups.
pub(super) struct Housekeeping {
    pub(super) in_flight: InFlight,
    pub(super) shared: Arc<Shared>,
    pub(super) keys: ServerKeys,
    pub(super) tx: mpsc::Sender<Result<Delivery>>,
    pub(super) stop: CancellationToken,
    /// The server's budget, which claimed entries are charged to.
    pub(super) budget: ByteBudget,
    /// The largest entry the shared group's reader read lately (0: none yet).
    pub(super) largest: Arc<AtomicUsize>,
    /// The most entries one read of the shared group takes, kept here as
    /// [`share_of_batch`] of the group's consumers.
    pub(super) share: Arc<AtomicUsize>,
}

/// How often a server counts the consumers of its topic's shared group.
const COUNT_CONSUMERS_EVERY: Duration = Duration::from_secs(1);

/// The most entries one read of a shared group takes when `consumers` servers
/// compete for its entries: an even share of a full batch, one at least.
///
/// A read takes what is waiting, up to its `COUNT`, and a reader whose reads come
/// back full reads more at a time (see `pace.rs`). Among competing servers the one
/// that comes back first under load would otherwise take whole batches while the
/// others wait on their blocked reads (measured: the busiest of 50 servers handled
/// up to 3 times as many casts as the quietest). Entries that arrive while servers
/// are blocked go to one blocked reader each, in turn, so this cap is what keeps the
/// load even; one server alone still reads full batches.
pub(super) fn share_of_batch(consumers: usize) -> usize {
    (MAX_BATCH / consumers.max(1)).max(1)
}

impl Housekeeping {
    pub(super) async fn run(self) {
        let config = &self.shared.config;
        let tick = (config.claim_idle / 2)
            .min(config.stream_ttl / 3)
            .min(config.prune_idle / 2)
            .clamp(Duration::from_millis(100), Duration::from_secs(10));
        let mut ticks = tokio::time::interval(tick);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_refresh = tokio::time::Instant::now();
        let mut last_prune = tokio::time::Instant::now();
        let mut counts = tokio::time::interval(COUNT_CONSUMERS_EVERY);
        counts.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = ticks.tick() => {}
                _ = counts.tick() => {
                    if let Err(err) = self.count_consumers().await {
                        tracing::debug!(error = %err, "counting the shared group's consumers failed");
                    }
                    continue;
                }
            }
            let mut conn = self.shared.commands.clone();
            if let Err(err) = self.keep_alive(&mut conn).await {
                tracing::debug!(error = %err, "keeping held entries fresh failed");
            }
            for key in [&self.keys.topic, &self.keys.server] {
                if let Err(err) = self.claim(key).await {
                    tracing::debug!(error = %err, stream = %key, "claiming abandoned entries failed");
                }
                if let Err(err) = self.trim(&mut conn, key).await {
                    tracing::debug!(error = %err, stream = %key, "deleting settled entries failed");
                }
            }
            if last_refresh.elapsed() >= config.stream_ttl / 3 {
                last_refresh = tokio::time::Instant::now();
                if let Err(err) = self.keys.refresh(&mut conn, config.stream_ttl).await {
                    tracing::debug!(error = %err, "refreshing TTLs failed");
                }
            }
            if last_prune.elapsed() >= config.prune_idle / 2 {
                last_prune = tokio::time::Instant::now();
                if let Err(err) = self.prune(&mut conn).await {
                    tracing::debug!(error = %err, "pruning dead servers' groups failed");
                }
                if let Err(err) = self.prune_watchers(&mut conn).await {
                    tracing::debug!(error = %err, "pruning dead watchers' groups failed");
                }
            }
        }
    }

    /// Sets the share of a batch that one read of the shared group takes from the
    /// number of consumers of the topic's group (the servers competing for its
    /// entries, and any that died within `prune_idle`).
    async fn count_consumers(&self) -> Result<()> {
        let mut conn = self.shared.commands.clone();
        let groups: redis::streams::StreamInfoGroupsReply = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&self.keys.topic)
            .query_async(&mut conn)
            .await
            .map_err(|e| redis_error("XINFO GROUPS", e))?;
        if let Some(group) = groups.groups.iter().find(|group| group.name == GROUP) {
            self.share
                .store(share_of_batch(group.consumers), Ordering::Relaxed);
        }
        Ok(())
    }

    /// Takes over entries pending longer than `claim_idle` (their consumer died or
    /// hangs) and hands them to this server.
    async fn claim(&self, key: &str) -> Result<()> {
        let room = self.tx.capacity();
        if room == 0 {
            return Ok(());
        }
        // As many as the budget has room for at the size of the entries read lately
        // (one when none has been read); none while it has no room for one: they
        // wait for the next tick.
        let largest = self.largest.load(Ordering::Relaxed);
        let available = self.budget.available();
        if available < largest.clamp(1, self.budget.limit()) {
            return Ok(());
        }
        let count = available
            .checked_div(largest)
            .unwrap_or(1)
            .min(room)
            .clamp(1, MAX_BATCH);
        let mut conn = self.shared.commands.clone();
        let claimed: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
            .arg(key)
            .arg(GROUP)
            .arg(&self.keys.instance)
            .arg(u64::try_from(self.shared.config.claim_idle.as_millis()).unwrap_or(u64::MAX))
            .arg("0-0")
            .arg("COUNT")
            .arg(count)
            .query_async(&mut conn)
            .await
            .map_err(|e| redis_error("XAUTOCLAIM", e))?;
        if !claimed.claimed.is_empty() {
            tracing::info!(
                stream = key,
                count = claimed.claimed.len(),
                "took over entries a dead consumer left pending"
            );
        }
        for entry in claimed.claimed {
            if lock(&self.in_flight).contains(&(key.to_owned(), entry.id.clone())) {
                // Ours already, read and not yet settled: not a second time.
                continue;
            }
            let charge = self.budget.charge(entry_size(&entry.map));
            if let Some(delivery) = delivery(
                &self.shared,
                key,
                GROUP,
                entry,
                &Settle::Ack(Some(self.in_flight.clone())),
                charge,
            )
            .await
            {
                tokio::select! {
                    _ = self.stop.cancelled() => return Err(Error::Closed),
                    sent = self.tx.send(Ok(delivery)) => if sent.is_err() { return Err(Error::Closed) },
                }
            }
        }
        Ok(())
    }

    /// Deletes the entries of `key` that every group has read and settled (see
    /// `TRIM_SETTLED`).
    async fn trim(&self, conn: &mut Connection, key: &str) -> Result<()> {
        let trimmed: i64 = TRIM_SETTLED
            .run(conn, key, Vec::<String>::new())
            .await
            .map_err(|e| redis_error("deleting settled entries", e))?;
        if trimmed > 0 {
            tracing::debug!(
                stream = key,
                count = trimmed,
                "deleted entries every group had settled"
            );
        }
        Ok(())
    }

    /// Resets the idle time of the entries this instance holds, so other servers see
    /// them as taken, however long their handlers run; and says this instance lives.
    ///
    /// One round trip on one Redis. On a cluster two: the claims go to the topic's
    /// slot, the alive key (named after the instance alone, so servers of every
    /// version find it) to its own, and a pipeline must stay within one slot.
    async fn keep_alive(&self, conn: &mut Connection) -> Result<()> {
        let held: Vec<(String, String)> = lock(&self.in_flight).iter().cloned().collect();
        let config = &self.shared.config;
        let alive = mark_alive_cmd(&config.alive_key(&self.keys.instance), config.prune_idle);
        let mut claims = claim_held(&self.keys, &held);
        if !config.cluster {
            claims.add_command(alive).ignore();
            return claims
                .query_async::<()>(conn)
                .await
                .map_err(|e| redis_error("refreshing held entries", e));
        }
        let alive = alive
            .query_async::<()>(conn)
            .await
            .map_err(|e| redis_error("marking the server alive", e));
        if !claims.is_empty() {
            claims
                .query_async::<()>(conn)
                .await
                .map_err(|e| redis_error("refreshing held entries", e))?;
        }
        alive
    }

    /// Removes fanout groups whose consumers have all been idle past `prune_idle`, and
    /// shared-group consumers idle that long with nothing pending.
    async fn prune(&self, conn: &mut Connection) -> Result<()> {
        let limit = u128::from(
            u64::try_from(self.shared.config.prune_idle.as_millis()).unwrap_or(u64::MAX),
        );
        let groups: redis::streams::StreamInfoGroupsReply = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&self.keys.fanout)
            .query_async(conn)
            .await
            .map_err(|e| redis_error("XINFO GROUPS", e))?;
        for group in groups.groups {
            if group.name == self.keys.instance {
                continue;
            }
            // A live server refreshes its key every tick, even while too busy to read.
            if self.is_alive(conn, &group.name).await? {
                continue;
            }
            let consumers: redis::streams::StreamInfoConsumersReply = redis::cmd("XINFO")
                .arg("CONSUMERS")
                .arg(&self.keys.fanout)
                .arg(&group.name)
                .query_async(conn)
                .await
                .map_err(|e| redis_error("XINFO CONSUMERS", e))?;
            if group.consumers == 0 || consumers.consumers.iter().all(|c| c.idle as u128 > limit) {
                tracing::info!(group = %group.name, "removing the fanout group of a server that is gone");
                DROP_FANOUT_GROUP
                    .run::<i64>(conn, &self.keys.fanout, &group.name)
                    .await
                    .map_err(|e| redis_error("removing a fanout group", e))?;
            }
        }
        for key in [&self.keys.topic, &self.keys.server] {
            let consumers: redis::streams::StreamInfoConsumersReply = redis::cmd("XINFO")
                .arg("CONSUMERS")
                .arg(key)
                .arg(GROUP)
                .query_async(conn)
                .await
                .map_err(|e| redis_error("XINFO CONSUMERS", e))?;
            for consumer in consumers.consumers {
                if consumer.name != self.keys.instance
                    && consumer.pending == 0
                    && consumer.idle as u128 > limit
                {
                    DROP_IDLE_CONSUMER
                        .run::<i64>(conn, key, (GROUP, &consumer.name))
                        .await
                        .map_err(|e| redis_error("removing an idle consumer", e))?;
                }
            }
        }
        Ok(())
    }

    /// Whether the server or watcher `name` has refreshed its alive key lately.
    async fn is_alive(&self, conn: &mut Connection, name: &str) -> Result<bool> {
        redis::cmd("EXISTS")
            .arg(self.shared.config.alive_key(name))
            .query_async(conn)
            .await
            .map_err(|e| redis_error("EXISTS", e))
    }

    /// Removes the keep-groups of watchers whose alive key has expired: they died
    /// without removing them, and each makes servers keep settled entries.
    async fn prune_watchers(&self, conn: &mut Connection) -> Result<()> {
        for key in [&self.keys.topic, &self.keys.server] {
            let groups: redis::streams::StreamInfoGroupsReply = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(key)
                .query_async(conn)
                .await
                .map_err(|e| redis_error("XINFO GROUPS", e))?;
            for group in groups.groups {
                if !group.name.starts_with(WATCHER_GROUP_PREFIX) {
                    continue;
                }
                if !self.is_alive(conn, &group.name).await? {
                    tracing::info!(group = %group.name, stream = %key,
                        "removing the keep-group of a watcher that is gone");
                    redis::cmd("XGROUP")
                        .arg("DESTROY")
                        .arg(key)
                        .arg(&group.name)
                        .query_async::<()>(conn)
                        .await
                        .map_err(|e| redis_error("removing a watcher's group", e))?;
                }
            }
        }
        Ok(())
    }
}
