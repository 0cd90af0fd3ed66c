//! Notifications on Redis streams.
//!
//! - Each routing key `<topic>.<priority>` of an exchange is a stream
//!   ([`crate::RedisConfig::notification_key`]), capped with `MAXLEN ~` like the
//!   other streams, expiring `stream_ttl` after its last listener stopped refreshing
//!   it (or after the send that made it, if no listener ever came).
//! - Each group of listeners is a consumer group of the stream: the default group,
//!   `default`, which the first send makes with the stream at `0` (it keeps every
//!   notification until one of its listeners takes it), and a pool's, `pool:<name>`,
//!   made at `$` when the pool first listens (it gets what is sent from then on).
//!   Listeners of one group compete for its entries, each with a consumer name of
//!   its own.
//! - A listener reads the streams of its routes with one blocking `XREADGROUP` per
//!   hash tag (a topic's priorities share one, so one read on a cluster too), on a
//!   connection of its own, taking no more than its buffer (the listener's
//!   concurrency) has room for.
//! - A delivery is acked with `XACK` (rejecting without requeue too: dropped). A
//!   requeue leaves the entry pending and marks it idle for `claim_idle`
//!   (`XCLAIM ... IDLE`, which keeps its place and counts a delivery), then wakes
//!   the listener's housekeeping, whose `XAUTOCLAIM` takes it at once: delivered
//!   again soon, to this member or whichever member of the group claims first. A
//!   delivery dropped unsettled is marked the same way. Entries left pending by a
//!   listener that died are taken over by another member after `claim_idle`, as the
//!   servers' are.
//! - Housekeeping also keeps the entries a listener holds fresh (so nobody claims
//!   them while a handler runs), deletes entries every group has settled
//!   (`TRIM_SETTLED`), refreshes the streams' TTLs and removes consumers idle past
//!   `prune_idle` with nothing pending.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use rpc_core::transport::ConnectionStatus;
use rpc_core::{Acker, Consumer, Delivery, Error, ListenOptions, NotificationSource, Result};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::commands::{DECLARE_NOTIFY, DROP_IDLE_CONSUMER, TRIM_SETTLED};
use crate::connection::Connection;
use crate::entry::take_field;
use crate::error::{is_connection_error, is_missing_group, redis_error};
use crate::publisher::BODY_FIELD;
use crate::{BACKOFF, Shared, blocking_connection};

/// The consumer group of the default listeners (no pool): made with the stream by
/// the first send.
pub(crate) const DEFAULT_GROUP: &str = "default";
/// Most entries taken in one read, and the most deliveries buffered for a listener.
const MAX_BATCH: usize = 64;

/// The consumer group of `pool` (`None`: the default group).
fn group_name(pool: Option<&str>) -> String {
    match pool {
        None => DEFAULT_GROUP.to_owned(),
        Some(pool) => format!("pool:{pool}"),
    }
}

/// Entries this listener holds (read, not yet settled), by stream and id.
type Held = Mutex<HashSet<(String, String)>>;

/// What a listener's readers, housekeeping and ackers share.
struct Member {
    shared: Arc<Shared>,
    group: String,
    /// This listener's consumer name in its group.
    consumer: String,
    /// Every stream the listener reads.
    streams: Vec<String>,
    held: Held,
    /// Asks housekeeping to claim now (a requeue).
    claim_now: Notify,
}

impl Member {
    fn held(&self) -> MutexGuard<'_, HashSet<(String, String)>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Declares the groups on `streams`; the listener's own group starts at `start`.
    async fn declare(&self, streams: &[String], start: &str) -> Result<()> {
        let mut conn = self.shared.commands.clone();
        let ttl = self.shared.config.stream_ttl.as_secs().max(1);
        for key in streams {
            DECLARE_NOTIFY
                .run::<i64>(&mut conn, key, (DEFAULT_GROUP, &self.group, start, ttl))
                .await
                .map_err(|e| redis_error(&format!("creating group {} on {key}", self.group), e))?;
        }
        Ok(())
    }

    /// A delivery of `entry` of `key`, held until settled.
    fn delivery(self: &Arc<Self>, key: &str, entry: StreamId) -> Delivery {
        let StreamId { id, mut map, .. } = entry;
        let body = Bytes::from(take_field(&mut map, BODY_FIELD).unwrap_or_default());
        self.held().insert((key.to_owned(), id.clone()));
        Delivery::new(
            body,
            Box::new(NotifyAcker {
                member: self.clone(),
                key: key.to_owned(),
                id,
                settled: false,
            }),
        )
    }

    /// Settles an entry for good (`XACK`).
    async fn ack(&self, key: &str, id: &str) -> Result<()> {
        let mut conn = self.shared.commands.clone();
        let acked = redis::cmd("XACK")
            .arg(key)
            .arg(&self.group)
            .arg(id)
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| redis_error("XACK", e));
        self.held().remove(&(key.to_owned(), id.to_owned()));
        acked
    }

    /// Leaves an entry pending but idle for `claim_idle`, so that the next
    /// `XAUTOCLAIM` of any member takes it, and wakes this listener's housekeeping.
    async fn requeue(&self, key: &str, id: &str) -> Result<()> {
        self.held().remove(&(key.to_owned(), id.to_owned()));
        let idle = u64::try_from(self.shared.config.claim_idle.as_millis())
            .unwrap_or(u64::MAX / 2)
            .saturating_add(1000);
        let mut conn = self.shared.commands.clone();
        let marked = redis::cmd("XCLAIM")
            .arg(key)
            .arg(&self.group)
            .arg(&self.consumer)
            .arg(0)
            .arg(id)
            .arg("IDLE")
            .arg(idle)
            .arg("JUSTID")
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| redis_error("requeueing", e));
        self.claim_now.notify_one();
        marked
    }
}

/// Settles one notification entry.
struct NotifyAcker {
    member: Arc<Member>,
    key: String,
    id: String,
    settled: bool,
}

#[async_trait]
impl Acker for NotifyAcker {
    async fn ack(mut self: Box<Self>) -> Result<()> {
        self.settled = true;
        self.member.ack(&self.key, &self.id).await
    }

    async fn reject(mut self: Box<Self>, requeue: bool) -> Result<()> {
        self.settled = true;
        if requeue {
            self.member.requeue(&self.key, &self.id).await
        } else {
            self.member.ack(&self.key, &self.id).await
        }
    }
}

impl Drop for NotifyAcker {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        // Unsettled: delivered again soon, as a requeue would (without a runtime,
        // once `claim_idle` has passed).
        self.member
            .held()
            .remove(&(self.key.clone(), self.id.clone()));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let member = self.member.clone();
            let (key, id) = (std::mem::take(&mut self.key), std::mem::take(&mut self.id));
            runtime.spawn(async move {
                if let Err(err) = member.requeue(&key, &id).await {
                    tracing::debug!(error = %err, "could not give back an unsettled notification");
                }
            });
        }
    }
}

/// A notification listener's consumer.
pub(crate) struct NotificationConsumer {
    rx: mpsc::Receiver<Result<Delivery>>,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    member: Arc<Member>,
    cleaned: bool,
}

impl NotificationConsumer {
    pub(crate) async fn start(
        shared: Arc<Shared>,
        source: &NotificationSource,
        options: &ListenOptions,
    ) -> Result<Self> {
        let config = &shared.config;
        // The streams, by hash tag: one read each (one slot on a cluster).
        let mut slots: Vec<(String, Vec<String>)> = Vec::new();
        let mut streams = Vec::new();
        for (exchange, key) in source.routes() {
            let stream = config.notification_key(exchange, key);
            if streams.contains(&stream) {
                continue;
            }
            let tag = stream
                .find('}')
                .map_or(stream.as_str(), |end| &stream[..=end])
                .to_owned();
            match slots.iter_mut().find(|(t, _)| *t == tag) {
                Some((_, keys)) => keys.push(stream.clone()),
                None => slots.push((tag, vec![stream.clone()])),
            }
            streams.push(stream);
        }
        if streams.is_empty() {
            return Err(Error::InvalidArguments(
                "a notification listener needs an address".to_owned(),
            ));
        }
        let member = Arc::new(Member {
            group: group_name(source.pool.as_deref()),
            consumer: format!("listener:{}", &rpc_core::wire::new_id()[..12]),
            streams,
            held: Mutex::default(),
            claim_now: Notify::new(),
            shared: shared.clone(),
        });
        // A pool gets what is sent from its first listen on.
        member.declare(&member.streams, "$").await?;
        let (tx, rx) = mpsc::channel(options.prefetch.clamp(1, MAX_BATCH));
        let stop = CancellationToken::new();
        let mut tasks = Vec::new();
        for (_, keys) in slots {
            let conn = blocking_connection(&shared.client, config, config.block).await?;
            tasks.push(tokio::spawn(
                Reader {
                    member: member.clone(),
                    conn,
                    streams: keys,
                    tx: tx.clone(),
                    stop: stop.clone(),
                    connection: options.status.connection(),
                }
                .run(),
            ));
        }
        tasks.push(tokio::spawn(housekeeping(member.clone(), tx, stop.clone())));
        tracing::debug!(group = %member.group, consumer = %member.consumer,
            streams = ?member.streams, "listening to notifications on Redis streams");
        Ok(NotificationConsumer {
            rx,
            stop,
            tasks,
            member,
            cleaned: false,
        })
    }
}

/// Removes this listener's consumer from its group on each stream, unless it still
/// holds pending entries (another member claims them, and housekeeping removes it
/// later).
async fn leave(member: &Member) -> Result<()> {
    let mut conn = member.shared.commands.clone();
    for key in &member.streams {
        DROP_IDLE_CONSUMER
            .run::<i64>(&mut conn, key, (&member.group, &member.consumer))
            .await
            .map_err(|e| redis_error("leaving the group", e))?;
    }
    Ok(())
}

#[async_trait]
impl Consumer for NotificationConsumer {
    async fn recv(&mut self) -> Option<Result<Delivery>> {
        self.rx.recv().await
    }

    async fn stop(&mut self) -> Result<()> {
        self.stop.cancel();
        Ok(())
    }

    async fn close(&mut self) -> Result<()> {
        self.stop.cancel();
        self.rx.close();
        // Read but never handed out: for another member, at once.
        while let Ok(delivery) = self.rx.try_recv() {
            if let Ok(delivery) = delivery {
                let _ = delivery.reject(true).await;
            }
        }
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
        self.cleaned = true;
        leave(&self.member).await
    }
}

impl Drop for NotificationConsumer {
    fn drop(&mut self) {
        self.stop.cancel();
        if self.cleaned {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let member = self.member.clone();
            runtime.spawn(async move {
                if let Err(err) = leave(&member).await {
                    tracing::debug!(error = %err, "could not leave the notification groups");
                }
            });
        }
    }
}

/// One blocking `XREADGROUP` loop over the streams of one hash tag.
struct Reader {
    member: Arc<Member>,
    conn: Connection,
    streams: Vec<String>,
    tx: mpsc::Sender<Result<Delivery>>,
    stop: CancellationToken,
    /// Reported lost when a read fails, restored when Redis answers again.
    connection: ConnectionStatus,
}

impl Reader {
    async fn run(mut self) {
        let block = self.member.shared.config.block;
        let mut attempt = 0u32;
        let mut lost = false;
        loop {
            // Read only what the buffer has room for: the rest waits in Redis.
            let room = tokio::select! {
                _ = self.stop.cancelled() => return,
                permit = self.tx.reserve() => match permit {
                    Ok(permit) => { drop(permit); self.tx.capacity().max(1) }
                    Err(_) => return,
                },
            };
            let mut cmd = redis::cmd("XREADGROUP");
            cmd.arg("GROUP")
                .arg(&self.member.group)
                .arg(&self.member.consumer)
                .arg("COUNT")
                .arg(room)
                .arg("BLOCK")
                .arg(u64::try_from(block.as_millis().max(1)).unwrap_or(u64::MAX))
                .arg("STREAMS")
                .arg(&self.streams);
            for _ in &self.streams {
                cmd.arg(">");
            }
            // A stop abandons the read: what it took stays pending for this
            // consumer, and another member claims it after `claim_idle`.
            let read = tokio::select! {
                _ = self.stop.cancelled() => return,
                read = cmd.query_async::<Option<StreamReadReply>>(&mut self.conn) => read,
            };
            match read {
                Ok(reply) => {
                    attempt = 0;
                    self.connection.restored();
                    if lost {
                        lost = false;
                        rpc_core::metrics::reconnected("redis");
                    }
                    if let Some(reply) = reply
                        && self.hand_over(reply).await
                    {
                        return;
                    }
                }
                Err(err) if is_missing_group(&err) => {
                    self.connection.restored();
                    // The streams vanished (expiry, a Redis restart): declare them
                    // again. Whatever they hold now was sent since the group had
                    // listened, so a pool's group starts at their beginning too.
                    tracing::warn!(streams = ?self.streams, "notification group missing; creating it again");
                    if let Err(err) = self.member.declare(&self.streams, "0").await {
                        tracing::warn!(error = %err, "could not re-create notification groups");
                        let wait = BACKOFF.delay(attempt);
                        attempt = attempt.saturating_add(1);
                        tokio::select! {
                            _ = self.stop.cancelled() => return,
                            _ = tokio::time::sleep(wait) => {}
                        }
                    }
                }
                Err(err) => {
                    self.connection.lost();
                    let wait = BACKOFF.delay(attempt);
                    attempt = attempt.saturating_add(1);
                    if is_connection_error(&err) {
                        lost = true;
                        tracing::warn!(error = %err, ?wait, "reading notifications from Redis failed; retrying");
                    } else {
                        tracing::error!(error = %err, ?wait, "XREADGROUP of notifications refused; retrying");
                    }
                    tokio::select! {
                        _ = self.stop.cancelled() => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    /// Hands a read's entries over; returns whether the consumer is stopping (the
    /// entries not handed out are then given back, by their ackers' drop).
    async fn hand_over(&mut self, reply: StreamReadReply) -> bool {
        let mut stopping = false;
        for stream in reply.keys {
            for entry in stream.ids {
                let delivery = self.member.delivery(&stream.key, entry);
                if stopping {
                    // Dropped unsettled: given back at once.
                    continue;
                }
                let reserved = tokio::select! {
                    _ = self.stop.cancelled() => None,
                    permit = self.tx.reserve() => permit.ok(),
                };
                match reserved {
                    Some(permit) => permit.send(Ok(delivery)),
                    None => stopping = true,
                }
            }
        }
        stopping
    }
}

/// Claims what dead members left and what was requeued, keeps held entries fresh,
/// deletes settled entries, refreshes TTLs and prunes idle consumers.
async fn housekeeping(
    member: Arc<Member>,
    tx: mpsc::Sender<Result<Delivery>>,
    stop: CancellationToken,
) {
    let config = &member.shared.config;
    let tick = (config.claim_idle / 2)
        .min(config.stream_ttl / 3)
        .min(config.prune_idle / 2)
        .clamp(Duration::from_millis(100), Duration::from_secs(10));
    let mut ticks = tokio::time::interval(tick);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_refresh = tokio::time::Instant::now();
    let mut last_prune = tokio::time::Instant::now();
    loop {
        let woken = tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => false,
            () = member.claim_now.notified() => true,
        };
        let mut conn = member.shared.commands.clone();
        if !woken && let Err(err) = keep_held(&member, &mut conn).await {
            tracing::debug!(error = %err, "keeping held notifications fresh failed");
        }
        for key in &member.streams {
            match claim(&member, &mut conn, key, &tx, &stop).await {
                Err(Error::Closed) => return,
                Err(err) => {
                    tracing::debug!(error = %err, stream = %key, "claiming notifications failed");
                }
                Ok(()) => {}
            }
            if woken {
                continue;
            }
            if let Err(err) = TRIM_SETTLED
                .run::<i64>(&mut conn, key, Vec::<String>::new())
                .await
            {
                tracing::debug!(error = %err, stream = %key, "deleting settled notifications failed");
            }
        }
        if woken {
            continue;
        }
        if last_refresh.elapsed() >= config.stream_ttl / 3 {
            last_refresh = tokio::time::Instant::now();
            for key in &member.streams {
                if let Err(err) = redis::cmd("EXPIRE")
                    .arg(key)
                    .arg(config.stream_ttl.as_secs().max(1))
                    .query_async::<()>(&mut conn)
                    .await
                {
                    tracing::debug!(error = %err, stream = %key, "refreshing a notification stream's TTL failed");
                }
            }
        }
        if last_prune.elapsed() >= config.prune_idle / 2 {
            last_prune = tokio::time::Instant::now();
            if let Err(err) = prune(&member, &mut conn).await {
                tracing::debug!(error = %err, "pruning idle notification consumers failed");
            }
        }
    }
}

/// Resets the idle time of the entries this listener holds, so that no other
/// member claims them while their handlers run.
async fn keep_held(member: &Member, conn: &mut Connection) -> Result<()> {
    let held: Vec<(String, String)> = member.held().iter().cloned().collect();
    for key in &member.streams {
        let ids: Vec<&String> = held
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, id)| id)
            .collect();
        if ids.is_empty() {
            continue;
        }
        redis::cmd("XCLAIM")
            .arg(key)
            .arg(&member.group)
            .arg(&member.consumer)
            .arg(0)
            .arg(&ids)
            .arg("JUSTID")
            .query_async::<()>(conn)
            .await
            .map_err(|e| redis_error("refreshing held notifications", e))?;
    }
    Ok(())
}

/// Takes over entries of `key` pending longer than `claim_idle` (their listener
/// died, or they were requeued) and hands them over, as many as there is room for.
async fn claim(
    member: &Arc<Member>,
    conn: &mut Connection,
    key: &str,
    tx: &mpsc::Sender<Result<Delivery>>,
    stop: &CancellationToken,
) -> Result<()> {
    let room = tx.capacity();
    if room == 0 {
        // Full: the entries wait, and the next tick tries again.
        return Ok(());
    }
    let claimed: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
        .arg(key)
        .arg(&member.group)
        .arg(&member.consumer)
        .arg(u64::try_from(member.shared.config.claim_idle.as_millis()).unwrap_or(u64::MAX))
        .arg("0-0")
        .arg("COUNT")
        .arg(room.min(MAX_BATCH))
        .query_async(conn)
        .await
        .map_err(|e| redis_error("XAUTOCLAIM", e))?;
    for entry in claimed.claimed {
        if member.held().contains(&(key.to_owned(), entry.id.clone())) {
            // Ours already, being handled.
            continue;
        }
        let delivery = member.delivery(key, entry);
        tokio::select! {
            _ = stop.cancelled() => return Err(Error::Closed),
            sent = tx.send(Ok(delivery)) => if sent.is_err() { return Err(Error::Closed) },
        }
    }
    Ok(())
}

/// Removes consumers of the group idle past `prune_idle` with nothing pending
/// (listeners that are gone).
async fn prune(member: &Member, conn: &mut Connection) -> Result<()> {
    let limit =
        u128::from(u64::try_from(member.shared.config.prune_idle.as_millis()).unwrap_or(u64::MAX));
    for key in &member.streams {
        let consumers: redis::streams::StreamInfoConsumersReply = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(key)
            .arg(&member.group)
            .query_async(conn)
            .await
            .map_err(|e| redis_error("XINFO CONSUMERS", e))?;
        for consumer in consumers.consumers {
            if consumer.name != member.consumer
                && consumer.pending == 0
                && consumer.idle as u128 > limit
            {
                DROP_IDLE_CONSUMER
                    .run::<i64>(conn, key, (&member.group, &consumer.name))
                    .await
                    .map_err(|e| redis_error("removing an idle consumer", e))?;
            }
        }
    }
    Ok(())
}
