//! The task behind each consumer: it declares the topology and subscribes, hands each
//! fresh subscription to the consumer, and when one is lost (or retired for a new
//! prefetch) subscribes again, with rpc-core's backoff between failed attempts.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};

use futures::StreamExt;
use futures::stream::BoxStream;
use lapin::Channel;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use rpc_core::backoff::Retry;
use rpc_core::transport::{ConnectionStatus, Merged};
use rpc_core::{Error, Result, TransportErrorKind};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::settle::{settled, until_lost};
use super::{Live, Subscription};
use crate::error::lapin_error;
use crate::link::Link;
use crate::topology::{self, short};

/// The error of a subscription step the broker left unanswered for `limit`.
fn stuck(step: &str, name: &str, limit: std::time::Duration) -> Error {
    let what = if name.is_empty() {
        step.to_owned()
    } else {
        format!("{step} {name}")
    };
    Error::transport_msg(
        TransportErrorKind::Timeout,
        format!(
            "{what}: the broker did not answer within {limit:?} (URL option \
             resubscribe_timeout; a frozen cluster node holds declarations until the \
             cluster declares it down, after its net_ticktime)"
        ),
    )
}

/// Whether a subscription failed because a step was stuck (worth retrying even for
/// the first subscription: the broker is slow, not refusing).
fn is_stuck(err: &Error) -> bool {
    matches!(
        err,
        Error::Transport {
            kind: TransportErrorKind::Timeout,
            ..
        }
    )
}

/// How long each clean-up step on close may wait for the broker.
const CLEANUP_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Deliveries of one consumer; its end (the broker cancelled it) is an error item,
/// so losing one of several consumers is noticed, not silently absorbed by the merge.
pub(super) type Deliveries =
    BoxStream<'static, std::result::Result<lapin::message::Delivery, String>>;

/// One subscription on one channel.
struct Session {
    channel: Arc<Channel>,
    stream: Merged<Deliveries>,
    tags: Vec<String>,
}

/// What the task of one consumer owns.
pub(super) struct ConsumerTask {
    pub(super) link: Arc<Link>,
    pub(super) subscription: Subscription,
    pub(super) sessions: mpsc::UnboundedSender<Live>,
    pub(super) lost: mpsc::UnboundedReceiver<Option<Live>>,
    pub(super) stop: CancellationToken,
    pub(super) closed: CancellationToken,
    /// The prefetch of a server's next subscription (set by the consumer).
    pub(super) prefetch: Arc<AtomicU16>,
    /// Where a server's consumer reports a lost subscription and its return.
    pub(super) connection: Option<ConnectionStatus>,
}

impl ConsumerTask {
    pub(super) async fn run(mut self, ready: oneshot::Sender<Result<()>>) {
        let mut ready = Some(ready);
        loop {
            // The first subscription's failure is the caller's to see; a later one is
            // tried again until the transport closes.
            let first = ready.is_some();
            let retry = Retry::new(self.link.backoff());
            let subscribing = retry.run_notify(
                |_| self.open_until_unstuck(),
                |err| (!first || is_stuck(err)) && !matches!(err, Error::Closed),
                |err, _, wait| {
                    tracing::warn!(error = %err, ?wait, "re-subscribing failed; will retry");
                },
            );
            let opened = tokio::select! {
                _ = self.closed.cancelled() => return,
                _ = self.stop.cancelled() => return self.finish(None).await,
                opened = subscribing => opened,
            };
            let session = match opened {
                Ok(session) => session,
                Err(err) => {
                    // The caller hears why the first subscription failed; after a
                    // later one the transport was closed: this consumer is finished.
                    if let Some(ready) = ready.take() {
                        let _ = ready.send(Err(err));
                    }
                    return;
                }
            };
            if let Some(ready) = ready.take() {
                let _ = ready.send(Ok(()));
            } else {
                tracing::info!(subscription = ?self.subscription, "re-subscribed after reconnection");
            }
            let Session {
                channel,
                stream,
                tags,
            } = session;
            let settles = matches!(
                self.subscription,
                Subscription::Server { .. } | Subscription::Notifications { .. }
            );
            let live = Live {
                stream,
                channel: channel.clone(),
                settles,
                tags: tags.clone(),
            };
            if self.sessions.send(live).is_err() {
                // The consumer is gone.
                return self.finish(Some((channel, tags))).await;
            }
            if let Some(connection) = &self.connection {
                connection.restored();
            }
            tokio::select! {
                biased;
                _ = self.closed.cancelled() => return self.finish(Some((channel, tags))).await,
                _ = self.stop.cancelled() => return self.finish(Some((channel, tags))).await,
                lost = self.lost.recv() => match lost {
                    None => return self.finish(Some((channel, tags))).await,
                    // Lost (the channel or connection failed, or the broker cancelled
                    // a consumer): the server is reconnecting until the next
                    // subscription is handed over.
                    Some(None) => {
                        if let Some(connection) = &self.connection {
                            connection.lost();
                        }
                    }
                    // Replaced for a new prefetch: still consuming.
                    Some(Some(retired)) => retire(retired).await,
                }
            }
        }
    }

    /// Runs one step of a subscription (declare, bind, consume) under
    /// `resubscribe_timeout`: a step the broker leaves unanswered (a node that froze,
    /// a queue whose leader is on it) is logged, naming the step and the queue or
    /// exchange, and fails with a timeout, so the subscription is tried again.
    async fn step<T>(
        &self,
        step: &str,
        name: &str,
        work: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let limit = self.link.config.resubscribe_timeout;
        match tokio::time::timeout(limit, work).await {
            Ok(outcome) => outcome,
            Err(_) => {
                tracing::warn!(
                    step,
                    name,
                    ?limit,
                    connection = %self.link.name(),
                    "subscribing is stuck: the broker has not answered; trying again on a \
                     fresh channel"
                );
                Err(stuck(step, name, limit))
            }
        }
    }

    /// Subscribes, trying again at once (no backoff) after a step that was stuck: it
    /// already waited `resubscribe_timeout`, and the broker is slow, not refusing. Each
    /// stuck step is logged at WARN by [`ConsumerTask::step`]; other failures are the
    /// caller's to retry with backoff.
    async fn open_until_unstuck(&self) -> Result<Session> {
        loop {
            match self.open().await {
                Err(err) if is_stuck(&err) && !self.closed.is_cancelled() => continue,
                outcome => return outcome,
            }
        }
    }

    async fn open(&self) -> Result<Session> {
        let connected = self.link.connection().await?;
        let channel = self
            .step("opening a channel", "", async {
                connected
                    .connection
                    .create_channel()
                    .await
                    .map_err(|e| lapin_error("opening a consumer channel", e))
            })
            .await?;
        match self.subscribe(&channel).await {
            Ok((stream, tags)) => Ok(Session {
                channel: Arc::new(channel),
                stream,
                tags,
            }),
            Err(err) => {
                // A step that timed out left the channel open, waiting on the broker:
                // close it without waiting (the broker may not answer for a while).
                // The close also ends a `basic.consume` the broker answers late: the
                // broker handles the channel's methods in order, so a consumer it
                // creates after the timeout is cancelled with the channel, and cannot
                // take (no-ack: lose) a reply or monitor delivery nobody reads.
                if channel.status().connected() {
                    tokio::spawn(async move {
                        let close = channel.close(200, "subscription abandoned".into());
                        let _ = tokio::time::timeout(CLEANUP_LIMIT, close).await;
                    });
                }
                Err(err)
            }
        }
    }

    /// Sets the channel's prefetch to the consumer's, per consumer, as oslo.messaging
    /// sets it: RabbitMQ's channel-wide (`global`) limit coordinates the channel and
    /// its queues on every message and cost a third of the calls per second here.
    async fn set_prefetch(&self, channel: &Channel) -> Result<()> {
        let prefetch = self.prefetch.load(Ordering::Relaxed);
        self.step("setting prefetch", "", async {
            channel
                .basic_qos(prefetch, BasicQosOptions { global: false })
                .await
                .map_err(|e| lapin_error("setting prefetch", e))
        })
        .await
    }

    /// Declares the topic exchange `exchange` and the fanout exchange of `topic`,
    /// each a step of its own; returns the fanout exchange's name.
    async fn declare_exchanges(
        &self,
        channel: &Channel,
        exchange: &str,
        topic: &str,
    ) -> Result<String> {
        let config = &self.link.config;
        self.step(
            "declaring exchange",
            exchange,
            topology::declare_topic_exchange(channel, config, exchange),
        )
        .await?;
        let fanout = topology::fanout_exchange(topic);
        self.step(
            "declaring exchange",
            &fanout,
            topology::declare_fanout_exchange(channel, config, topic),
        )
        .await?;
        Ok(fanout)
    }

    /// Declares and binds what the subscription needs on `channel` and consumes its
    /// queues, each step bounded by [`ConsumerTask::step`].
    async fn subscribe(&self, channel: &Channel) -> Result<(Merged<Deliveries>, Vec<String>)> {
        let config = &self.link.config;
        let (queues, no_ack) = match &self.subscription {
            Subscription::Server {
                exchange,
                topic,
                server,
                fanout_queue,
                prefetch: _,
            } => {
                self.set_prefetch(channel).await?;
                let direct = topology::server_queue(topic, server);
                let fanout = self.declare_exchanges(channel, exchange, topic).await?;
                for queue in [topic, &direct] {
                    self.step(
                        "declaring and binding queue",
                        queue,
                        topology::declare_shared_queue(channel, config, exchange, queue),
                    )
                    .await?;
                }
                self.step(
                    "declaring queue",
                    fanout_queue,
                    topology::declare_transient_queue(channel, config, fanout_queue),
                )
                .await?;
                self.step(
                    "binding queue",
                    fanout_queue,
                    topology::bind(channel, fanout_queue, &fanout, topic),
                )
                .await?;
                (vec![topic.clone(), direct, fanout_queue.clone()], false)
            }
            Subscription::Notifications {
                routes,
                pool,
                prefetch: _,
            } => {
                self.set_prefetch(channel).await?;
                let mut exchanges: Vec<&str> = Vec::new();
                for (exchange, _) in routes {
                    if !exchanges.contains(&exchange.as_str()) {
                        exchanges.push(exchange);
                        self.step(
                            "declaring exchange",
                            exchange,
                            topology::declare_topic_exchange(channel, config, exchange),
                        )
                        .await?;
                    }
                }
                // The default group reads the queue of each key, which the notifiers
                // declare too; a pool reads its own queue, bound to every key.
                let mut queues: Vec<String> = Vec::new();
                for (exchange, key) in routes {
                    let queue = pool.as_deref().unwrap_or(key);
                    if queues.iter().any(|known| known == queue) {
                        self.step(
                            "binding queue",
                            queue,
                            topology::bind(channel, queue, exchange, key),
                        )
                        .await?;
                    } else {
                        self.step(
                            "declaring and binding queue",
                            queue,
                            topology::declare_notification_queue(
                                channel, config, exchange, queue, key,
                            ),
                        )
                        .await?;
                        queues.push(queue.to_owned());
                    }
                }
                (queues, false)
            }
            Subscription::Reply { queue } => {
                self.step(
                    "declaring queue",
                    queue,
                    topology::declare_transient_queue(channel, config, queue),
                )
                .await?;
                (vec![queue.clone()], true)
            }
            Subscription::Monitor {
                exchange,
                topic,
                queue,
            } => {
                let fanout = self.declare_exchanges(channel, exchange, topic).await?;
                self.step(
                    "declaring queue",
                    queue,
                    topology::declare_private_queue(channel, queue),
                )
                .await?;
                let bindings = [
                    (exchange.as_str(), topic.clone()),
                    (exchange.as_str(), format!("{topic}.*")),
                    (fanout.as_str(), topic.clone()),
                ];
                for (source, key) in &bindings {
                    self.step(
                        "binding queue",
                        queue,
                        topology::bind(channel, queue, source, key),
                    )
                    .await?;
                }
                (vec![queue.clone()], true)
            }
        };
        let mut stream = Merged::new();
        let mut tags = Vec::new();
        for queue in queues {
            let consumer = self
                .step("consuming", &queue, async {
                    channel
                        .basic_consume(
                            short(&queue)?,
                            "".into(),
                            BasicConsumeOptions {
                                no_ack,
                                ..BasicConsumeOptions::default()
                            },
                            FieldTable::default(),
                        )
                        .await
                        .map_err(|e| lapin_error(&format!("consuming {queue}"), e))
                })
                .await?;
            tags.push(consumer.tag().to_string());
            let ended = format!("the broker cancelled the consumer of {queue}");
            stream.push(
                consumer
                    .map(|item| item.map_err(|e| e.to_string()))
                    .chain(futures::stream::once(async move { Err(ended) }))
                    .boxed(),
            );
        }
        Ok((stream, tags))
    }

    /// Stops consuming but keeps the channel open, so deliveries already handed out
    /// can still be acked; closes it (deleting a server's fanout queue, as oslo does on
    /// a graceful close, and a client's reply queue) when the consumer is dropped.
    async fn finish(self, session: Option<(Arc<Channel>, Vec<String>)>) {
        let Some((channel, tags)) = session else {
            return;
        };
        for tag in &tags {
            let cancel = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default());
            match tokio::time::timeout(CLEANUP_LIMIT, cancel).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => tracing::debug!(error = %err, "basic.cancel failed"),
                Err(_) => tracing::debug!("basic.cancel unanswered"),
            }
        }
        // No fresh subscription follows: a `recv` after `stop` ends.
        drop(self.sessions);
        self.closed.cancelled().await;
        // A reply queue is this consumer's alone (a random name) and nobody reads it
        // once it is dropped: deleting it now frees the broker at once instead of
        // after `transient_ttl`, which matters most for a quorum reply queue (a Raft
        // group on several nodes). A reply still on its way is returned to its server
        // (a missing reply queue, as after the expiry).
        let own_queue = match &self.subscription {
            Subscription::Server { fanout_queue, .. } => Some(("fanout", fanout_queue)),
            Subscription::Reply { queue } => Some(("reply", queue)),
            // Shared queues, kept for the other listeners and for what comes next.
            Subscription::Notifications { .. } | Subscription::Monitor { .. } => None,
        };
        if let Some((what, queue)) = own_queue
            && let Ok(name) = short(queue)
        {
            let delete = channel.queue_delete(name, QueueDeleteOptions::default());
            match tokio::time::timeout(CLEANUP_LIMIT, delete).await {
                Ok(Ok(_)) => {}
                Ok(Err(err)) => {
                    tracing::debug!(error = %err, what, "could not delete the queue")
                }
                Err(_) => tracing::debug!(what, "queue deletion unanswered"),
            }
        }
        let close = channel.close(200, "consumer closed".into());
        let _ = tokio::time::timeout(CLEANUP_LIMIT, close).await;
    }
}

/// Retires a subscription replaced for a new prefetch: cancels its consumers, so the
/// broker sends them nothing more, then (on a task of its own, while the new
/// subscription starts) gives back to the broker every delivery they had been sent
/// and the server had not read, until their streams end. The channel closes once the
/// deliveries handed out from it are settled.
async fn retire(live: Live) {
    for tag in &live.tags {
        let cancel = live
            .channel
            .basic_cancel(tag.as_str().into(), BasicCancelOptions::default());
        match tokio::time::timeout(CLEANUP_LIMIT, cancel).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::debug!(error = %err, "basic.cancel failed"),
            Err(_) => tracing::debug!("basic.cancel unanswered"),
        }
    }
    tokio::spawn(async move {
        let Live {
            mut stream,
            channel,
            ..
        } = live;
        let mut requeued = 0usize;
        // After cancel-ok the broker sends these consumers nothing more: their
        // streams yield what lapin holds, then end.
        while let Ok(Some(item)) = tokio::time::timeout(CLEANUP_LIMIT, stream.next()).await {
            if let Ok(delivery) = item {
                let requeue = delivery.acker.reject(BasicRejectOptions { requeue: true });
                if settled(until_lost(&channel, requeue).await, "requeueing").is_ok() {
                    requeued += 1;
                }
            }
        }
        if requeued > 0 {
            tracing::debug!(
                requeued,
                "deliveries of the old subscription given back to the broker"
            );
        }
    });
}
