//! A watcher of a topic (`monitor`): reads the topic, server and fanout streams
//! without taking entries from servers, and keeps a group of its own on the topic
//! and server streams so that servers keep settled entries until it has read them.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::streams::StreamId;
use rpc_core::{Consumer, Delivery, Result, Target};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::commands::{create_group, mark_alive};
use crate::connection::Connection;
use crate::entry::{ReadOutcome, read_after};
use crate::error::{is_missing_group, redis_error};
use crate::{BACKOFF, Shared, blocking_connection};

/// How the name of a watcher's keep-group starts.
pub(crate) const WATCHER_GROUP_PREFIX: &str = "monitor:";

/// A watcher of a topic: reads the topic, server and fanout streams without a group,
/// from their ends at the time it starts, so servers still get every entry.
pub(crate) struct MonitorConsumer {
    rx: mpsc::Receiver<Result<Delivery>>,
    stop: CancellationToken,
    shared: Arc<Shared>,
    /// Streams where this watcher registered a group so servers keep settled entries.
    kept: Vec<String>,
    group: String,
}

impl MonitorConsumer {
    pub(crate) async fn start(shared: Arc<Shared>, target: &Target) -> Result<Self> {
        let config = &shared.config;
        let exchange = target.exchange_or(&config.exchange);
        let mut conn = shared.commands.clone();
        let mut keys = vec![
            config.topic_key(exchange, &target.topic),
            config.fanout_key(exchange, &target.topic),
        ];
        let pattern = config.server_key(exchange, &target.topic, "*");
        // On a cluster, where the topic's keys live: they share its hash tag.
        let servers: Vec<String> = conn
            .query_at(&keys[0], redis::cmd("KEYS").arg(&pattern))
            .await
            .map_err(|e| redis_error("listing server streams", e))?;
        keys.extend(servers);
        // A group on the topic and server streams tells servers to keep settled entries
        // (they delete them only when their group is the stream's only one).
        let group = format!("{WATCHER_GROUP_PREFIX}{}", rpc_core::wire::new_id());
        let kept: Vec<String> = keys
            .iter()
            .filter(|k| !k.ends_with(":fanout"))
            .cloned()
            .collect();
        for key in &kept {
            // MKSTREAM may create the stream: it expires like any other.
            create_group(&mut conn, key, &group, "$", config.stream_ttl).await?;
        }
        let mut ids = Vec::with_capacity(keys.len());
        for key in &keys {
            let last: Vec<StreamId> = redis::cmd("XREVRANGE")
                .arg(key)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .query_async::<redis::streams::StreamRangeReply>(&mut conn)
                .await
                .map(|reply| reply.ids)
                .map_err(|e| redis_error("reading a stream's end", e))?;
            ids.push(
                last.first()
                    .map_or_else(|| "0-0".to_owned(), |entry| entry.id.clone()),
            );
        }
        let block = config.block;
        let reader = blocking_connection(&shared.client, &shared.config, block).await?;
        let (tx, rx) = mpsc::channel(1024);
        let stop = CancellationToken::new();
        // Says the keep-groups are wanted: servers remove those of a watcher whose
        // key has expired (it died without removing them).
        let alive = config.alive_key(&group);
        mark_alive(&mut conn, &alive, config.prune_idle)
            .await
            .map_err(|e| redis_error("marking the watcher alive", e))?;
        tokio::spawn(keep_watcher_alive(
            shared.commands.clone(),
            alive,
            config.prune_idle,
            stop.clone(),
        ));
        let kept_slots = keys
            .iter()
            .enumerate()
            .filter(|(_, key)| kept.contains(key))
            .map(|(slot, _)| slot)
            .collect();
        tokio::spawn(
            Watch {
                reader,
                commands: shared.commands.clone(),
                advanced: ids.clone(),
                keys,
                ids,
                kept: kept_slots,
                group: group.clone(),
                block,
                stream_ttl: config.stream_ttl,
                tx,
                stop: stop.clone(),
            }
            .run(),
        );
        Ok(MonitorConsumer {
            rx,
            stop,
            shared,
            kept,
            group,
        })
    }
}

/// Refreshes a watcher's alive key three times per `ttl` until the watcher stops.
async fn keep_watcher_alive(
    mut conn: Connection,
    key: String,
    ttl: Duration,
    stop: CancellationToken,
) {
    let mut ticks = tokio::time::interval((ttl / 3).max(Duration::from_millis(100)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        if let Err(err) = mark_alive(&mut conn, &key, ttl).await {
            tracing::debug!(error = %err, "refreshing the watcher's alive key failed");
        }
    }
}

/// A watcher's reading task.
struct Watch {
    reader: Connection,
    commands: Connection,
    /// The streams read, and the last id read in each.
    keys: Vec<String>,
    ids: Vec<String>,
    /// Where the keep-group stands on each stream (as `ids`).
    advanced: Vec<String>,
    /// The streams (slots of `keys`) where the watcher has its keep-group.
    kept: Vec<usize>,
    group: String,
    block: Duration,
    stream_ttl: Duration,
    tx: mpsc::Sender<Result<Delivery>>,
    stop: CancellationToken,
}

impl Watch {
    async fn run(mut self) {
        let mut attempt = 0u32;
        loop {
            // Others read these streams too: a watcher never trims them.
            match read_after(
                &mut self.reader,
                &self.keys,
                &mut self.ids,
                self.block,
                false,
                &self.tx,
                &self.stop,
            )
            .await
            {
                ReadOutcome::Read(count) => {
                    attempt = 0;
                    if count > 0 {
                        self.advance().await;
                    }
                }
                ReadOutcome::Stopped => return,
                ReadOutcome::Failed(err) => {
                    let wait = BACKOFF.delay(attempt);
                    attempt = attempt.saturating_add(1);
                    tracing::warn!(error = %err, ?wait, "watching the topic failed; retrying");
                    tokio::select! {
                        _ = self.stop.cancelled() => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    /// Moves the keep-group to what the watcher has read (`XGROUP SETID`), so that
    /// servers may delete what comes before (see `TRIM_SETTLED`) while the watcher
    /// is still there. A group servers removed meanwhile (this watcher was cut off
    /// longer than `prune_idle`) is made again where the watcher stands.
    async fn advance(&mut self) {
        for &slot in &self.kept {
            let (key, id) = (&self.keys[slot], &self.ids[slot]);
            if *id == self.advanced[slot] {
                continue;
            }
            let moved: redis::RedisResult<()> = redis::cmd("XGROUP")
                .arg("SETID")
                .arg(key)
                .arg(&self.group)
                .arg(id)
                .query_async(&mut self.commands)
                .await;
            let moved = match moved {
                // A stopping watcher removes its groups: not made again then (one made
                // in a race with the stop is pruned, its alive key being gone).
                Err(err) if is_missing_group(&err) && !self.stop.is_cancelled() => {
                    create_group(&mut self.commands, key, &self.group, id, self.stream_ttl).await
                }
                other => other.map_err(|e| redis_error("XGROUP SETID", e)),
            };
            match moved {
                Ok(()) => self.advanced[slot].clone_from(id),
                Err(err) => tracing::debug!(error = %err, stream = %key,
                    "could not move the watcher's group; servers keep its entries longer"),
            }
        }
    }
}

#[async_trait]
impl Consumer for MonitorConsumer {
    async fn recv(&mut self) -> Option<Result<Delivery>> {
        self.rx.recv().await
    }

    async fn stop(&mut self) -> Result<()> {
        self.stop.cancel();
        self.rx.close();
        let kept = std::mem::take(&mut self.kept);
        let alive = self.shared.config.alive_key(&self.group);
        drop_watch_groups(
            self.shared.commands.clone(),
            kept,
            self.group.clone(),
            alive,
        )
        .await;
        Ok(())
    }
}

/// Removes a watcher's keep-groups, so servers delete settled entries again, and
/// its alive key.
async fn drop_watch_groups(mut conn: Connection, kept: Vec<String>, group: String, alive: String) {
    if let Err(err) = redis::cmd("DEL")
        .arg(&alive)
        .query_async::<()>(&mut conn)
        .await
    {
        tracing::debug!(error = %err, "could not remove the watcher's alive key");
    }
    for key in kept {
        let destroyed: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("DESTROY")
            .arg(&key)
            .arg(&group)
            .query_async(&mut conn)
            .await;
        if let Err(err) = destroyed {
            tracing::debug!(error = %err, "could not remove the watcher's group");
        }
    }
}

impl Drop for MonitorConsumer {
    fn drop(&mut self) {
        self.stop.cancel();
        let kept = std::mem::take(&mut self.kept);
        if kept.is_empty() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(drop_watch_groups(
                self.shared.commands.clone(),
                kept,
                self.group.clone(),
                self.shared.config.alive_key(&self.group),
            ));
        }
    }
}
