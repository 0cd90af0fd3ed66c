//! Consumers: a server's three queues on one channel with bounded prefetch, and a
//! client's reply queue. `recv` reads lapin's delivery streams itself (a stream's
//! `next` is cancel-safe), so a delivery costs no task hand-off of mqrpc's; a task
//! per consumer subscribes, hands each fresh subscription over, and when one is
//! lost reconnects and declares and subscribes everything again.
//!
//! A server that acks on receipt (`ListenOptions::settle_on_receipt`, the default
//! `AckMode::BeforeDispatch`) has its deliveries acked in batches: `recv` takes every
//! delivery lapin already holds, settles them all with one `basic.ack` with
//! `multiple` (for the highest delivery tag), and only then hands them out one at a
//! time. Each is still acked before it is dispatched; RabbitMQ spends far less on one
//! ack for many messages than on one ack each.
//!
//! A server's consumer charges every delivery it reads against the server's byte
//! budget (`ListenOptions::budget`) and stops a batch once the budget is used up, so
//! the bytes charged stay under the budget plus one message. RabbitMQ has no prefetch
//! in bytes, so the prefetch in messages follows the deliveries' size: it is lowered
//! to the budget divided by the largest recent delivery (at least 1, at most the
//! server's concurrency or the URL's `prefetch`) as soon as a delivery is too big for
//! it, and raised again after a window of smaller ones. RabbitMQ fixes a consumer's
//! prefetch when it subscribes, so a change subscribes again on a fresh channel: the
//! old consumers are cancelled first and what they had been sent but the server had
//! not read goes back to the broker (`basic.reject` with requeue), nothing is lost.

use std::collections::VecDeque;
use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use rpc_core::logs::{DEFAULT_WARN_INTERVAL, Escaped, Throttle};
use rpc_core::transport::Merged;
use rpc_core::{Acker, ByteBudget, Consumer, Delivery, Error, NoAck, Result};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::Compression;
use crate::link::Link;
use crate::topology::{self, lapin_error, short};

/// How long each clean-up step on close may wait for the broker.
const CLEANUP_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

/// What a consumer subscribes to.
#[derive(Debug, Clone)]
pub(crate) enum Subscription {
    /// A server: `<topic>`, `<topic>.<server>` and a fanout queue of its own.
    Server {
        exchange: String,
        topic: String,
        server: String,
        fanout_queue: String,
        prefetch: u16,
    },
    /// A client's reply queue, consumed without acks.
    Reply { queue: String },
    /// A watcher of a topic: a queue of its own (exclusive, auto-delete) bound to the
    /// topic's routing keys and its fanout, consumed without acks.
    Monitor {
        exchange: String,
        topic: String,
        queue: String,
    },
}

/// The receiving end handed to rpc-core.
pub(crate) struct AmqpConsumer {
    /// Fresh subscriptions from the task: the first, then one after each loss.
    sessions: mpsc::UnboundedReceiver<Live>,
    /// The subscription being read.
    current: Option<Live>,
    /// Tells the task that the current subscription ended, or hands it back to be
    /// retired (its consumers cancelled, what it holds requeued) for a new prefetch.
    lost: mpsc::UnboundedSender<Option<Live>>,
    /// A server's byte budget and the prefetch that follows the deliveries' size;
    /// `None` for reply queues and watchers.
    sizing: Option<Sizing>,
    stop: CancellationToken,
    close_on_drop: Option<DropGuard>,
    task: Option<JoinHandle<()>>,
    /// The largest body a compressed delivery may inflate to.
    max_message_size: usize,
    /// A server's deliveries are acked in batches as they are read.
    settle_on_receipt: bool,
    /// Deliveries acked in the last batch and not handed out yet.
    taken: VecDeque<Delivery>,
    /// The ack of the last batch while the broker has not answered it: kept here so
    /// that a `recv` dropped meanwhile (a server stopping) does not drop it, and the
    /// batch is handed out (or, at a stop, run by the server) only once it is acked.
    acking: Option<futures::future::BoxFuture<'static, lapin::Result<bool>>>,
    /// The stream reported its end or an error while a batch was read: subscribe
    /// again once the batch is handed out.
    broken: bool,
}

/// How long an ack or reject may take on a channel that still looks open.
const SETTLE_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

/// How often a pending ack or reject looks at its channel's state.
const SETTLE_POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// Waits for an ack or reject lapin sends, but not past the loss of its channel:
/// lapin does not always resolve a settlement queued just before its connection was
/// cut, and a server waiting for it would wait for good (a batch ack would hold up
/// its whole consumer). A lost channel answers `Ok(false)`, as lapin does for an
/// acker whose channel is gone; the broker requeues what it did not get settled.
async fn until_lost(
    channel: &Channel,
    settle: impl std::future::Future<Output = lapin::Result<bool>>,
) -> lapin::Result<bool> {
    let mut settle = std::pin::pin!(settle);
    let started = tokio::time::Instant::now();
    loop {
        match tokio::time::timeout(SETTLE_POLL, &mut settle).await {
            Ok(outcome) => return outcome,
            Err(_) if !channel.status().connected() || started.elapsed() > SETTLE_LIMIT => {
                return Ok(false);
            }
            Err(_) => {}
        }
    }
}

/// A live subscription's deliveries, read by the consumer.
struct Live {
    stream: Merged<Deliveries>,
    /// Shared with the deliveries' ackers, which keep it open until they settle.
    channel: Arc<Channel>,
    settles: bool,
    /// The consumer tags of the subscription.
    tags: Vec<String>,
}

/// How many deliveries a window of the prefetch controller spans at least.
const SIZE_WINDOW: u32 = 16;

/// A server consumer's byte budget, and its prefetch derived from the size of recent
/// deliveries: `budget / largest`, at least 1 and at most `max`.
struct Sizing {
    budget: ByteBudget,
    /// The prefetch new subscriptions use (read by the consumer task).
    prefetch: Arc<AtomicU16>,
    /// The ceiling: the URL's `prefetch`, or the server's concurrency.
    max: u16,
    /// The largest delivery of the current window, and how many it has seen.
    largest: usize,
    seen: u32,
}

impl Sizing {
    /// The prefetch for deliveries of at most `largest` bytes.
    fn wanted(&self, largest: usize) -> u16 {
        let fits = self.budget.limit() / largest.max(1);
        u16::try_from(fits).unwrap_or(u16::MAX).clamp(1, self.max)
    }

    /// Counts a delivery of `size` bytes; a new prefetch when it should change: at
    /// once when the delivery is too big for the current one, at the end of a window
    /// of deliveries when the largest of them leaves room for at least twice as many
    /// (or for the ceiling).
    fn observe(&mut self, size: usize) -> Option<u16> {
        let current = self.prefetch.load(Ordering::Relaxed);
        self.largest = self.largest.max(size);
        self.seen = self.seen.saturating_add(1);
        let mut change = None;
        if self.wanted(size) < current {
            change = Some(self.wanted(self.largest));
        } else if self.seen >= SIZE_WINDOW.max(2 * u32::from(current)) {
            let wanted = self.wanted(self.largest);
            if wanted > current && (wanted >= current.saturating_mul(2) || wanted == self.max) {
                change = Some(wanted);
            }
            self.largest = 0;
            self.seen = 0;
        }
        let change = change?;
        self.largest = 0;
        self.seen = 0;
        self.prefetch.store(change, Ordering::Relaxed);
        Some(change)
    }
}

impl AmqpConsumer {
    /// Starts the consumer task and waits until the first subscription is active.
    pub(crate) async fn start(
        link: Arc<Link>,
        subscription: Subscription,
        settle_on_receipt: bool,
        budget: Option<ByteBudget>,
    ) -> Result<Self> {
        let (sessions_tx, sessions) = mpsc::unbounded_channel();
        let (lost, lost_rx) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let closed = CancellationToken::new();
        let (ready_tx, ready_rx) = oneshot::channel();
        let max_message_size = link.config.max_message_size;
        let max_prefetch = match &subscription {
            Subscription::Server { prefetch, .. } => (*prefetch).max(1),
            _ => 1,
        };
        let prefetch = Arc::new(AtomicU16::new(max_prefetch));
        let sizing = match (&subscription, budget) {
            (Subscription::Server { .. }, Some(budget)) => Some(Sizing {
                budget,
                prefetch: prefetch.clone(),
                max: max_prefetch,
                largest: 0,
                seen: 0,
            }),
            _ => None,
        };
        let task = ConsumerTask {
            link,
            subscription,
            sessions: sessions_tx,
            lost: lost_rx,
            stop: stop.clone(),
            closed: closed.clone(),
            prefetch,
        };
        let task = tokio::spawn(task.run(ready_tx));
        // If this future is dropped before the subscription is ready, the guard stops
        // the task instead of leaving it reconnecting for nobody.
        let guard = closed.drop_guard();
        match ready_rx.await {
            Ok(Ok(())) => Ok(AmqpConsumer {
                sessions,
                current: None,
                lost,
                sizing,
                stop,
                close_on_drop: Some(guard),
                task: Some(task),
                max_message_size,
                settle_on_receipt,
                taken: VecDeque::new(),
                acking: None,
                broken: false,
            }),
            Ok(Err(err)) => Err(err),
            Err(_) => Err(Error::Closed),
        }
    }

    /// Drops the subscription being read and asks the task for a fresh one.
    fn resubscribe(&mut self) {
        if self.current.take().is_some() {
            let _ = self.lost.send(None);
        }
    }

    /// Hands the subscription being read back to the task, which cancels its
    /// consumers, requeues what they hold and subscribes again with the prefetch
    /// now set.
    fn retire(&mut self) {
        if let Some(live) = self.current.take() {
            let _ = self.lost.send(Some(live));
        }
    }

    /// A delivery as handed out: its body inflated and, for a server's queue, its
    /// bytes charged against the budget (whatever room the budget has: they are in
    /// memory) and its time to live read.
    fn delivery(
        &self,
        data: Vec<u8>,
        properties: &BasicProperties,
        acker: Box<dyn Acker>,
    ) -> Delivery {
        let body = inflated(data, properties, self.max_message_size);
        let Some(sizing) = &self.sizing else {
            return Delivery::new(body, acker);
        };
        let charge = sizing.budget.charge(body.len());
        let mut delivery = Delivery::new(body, acker).with_charge(charge);
        if let Some(ttl) = time_to_live(properties) {
            delivery = delivery.with_time_to_live(ttl);
        }
        delivery
    }

    /// Counts the size of a delivery read; when the prefetch must change, the
    /// subscription is retired at once (not at the next `recv`, which a server with
    /// its budget used up may not make for a while).
    fn observe(&mut self, size: usize) {
        let Some(sizing) = self.sizing.as_mut() else {
            return;
        };
        if let Some(prefetch) = sizing.observe(size) {
            tracing::debug!(
                prefetch,
                size,
                budget = sizing.budget.limit(),
                "delivery size changed; subscribing again with a new prefetch"
            );
            self.retire();
        }
    }
}

/// The time to live of a delivery: its AMQP `expiration` in milliseconds (set by
/// oslo.messaging and mqrpc on calls to the call's timeout). The broker does not
/// lower it while the message waits in a queue, so it is counted from now.
fn time_to_live(properties: &BasicProperties) -> Option<Duration> {
    let expiration = properties.expiration().as_ref()?;
    let millis: u64 = expiration.as_str().trim().parse().ok()?;
    Some(Duration::from_millis(millis))
}

/// Compressed bodies larger than this are inflated with the worker marked as
/// blocking, so the runtime moves its other tasks elsewhere meanwhile.
const INFLATE_INLINE_LIMIT: usize = 16 * 1024;

/// Runs `work`, which inflates a body of `size` compressed bytes. A large one (or any
/// bzip2 one: megabytes of working memory per stream) runs in `block_in_place` on a
/// multi-threaded runtime, which stays synchronous (so nothing about cancellation
/// changes) while the other tasks of this worker move to another.
fn blocking_if_large<T>(size: usize, bzip2: bool, work: impl FnOnce() -> T) -> T {
    let multi_thread = tokio::runtime::Handle::try_current().is_ok_and(|runtime| {
        runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
    });
    if multi_thread && (bzip2 || size > INFLATE_INLINE_LIMIT) {
        tokio::task::block_in_place(work)
    } else {
        work()
    }
}

/// The body of a delivery, inflated when its sender compressed it: oslo.messaging
/// with `kombu_compression = gzip` sends a zlib stream with the header `compression:
/// application/x-gzip`, with `kombu_compression = bzip2` a bzip2 stream with
/// `application/x-bz2`. A body that does not inflate, inflates beyond
/// `max_message_size`, or uses another compression (kombu's brotli, lzma, zstd) is
/// handed on as it came, with a warning, and then refused as malformed by the server
/// or the client (never lost silently).
fn inflated(body: Vec<u8>, properties: &BasicProperties, max_message_size: usize) -> Vec<u8> {
    // Peers choose these bodies: one line per interval, whatever their number.
    static REFUSED: Throttle = Throttle::new(DEFAULT_WARN_INTERVAL);
    let compression = properties
        .headers()
        .as_ref()
        .and_then(|headers| headers.inner().get("compression"))
        .and_then(|value| match value {
            AMQPValue::LongString(text) => Some(text.to_string()),
            AMQPValue::ShortString(text) => Some(text.to_string()),
            _ => None,
        });
    let Some(compression) = compression else {
        return body;
    };
    let Some(kind) = Compression::from_header(&compression) else {
        if let Some(suppressed) = REFUSED.hit() {
            tracing::warn!(compression = %Escaped(&compression), size = body.len(), suppressed,
                "body compression not supported; the message will be refused");
        }
        return body;
    };
    let decoder = kind.decoder(&body);
    let limit = u64::try_from(max_message_size).unwrap_or(u64::MAX);
    let mut text = Vec::with_capacity(body.len().saturating_mul(4).min(max_message_size));
    let read = blocking_if_large(body.len(), kind == Compression::Bzip2, || {
        decoder.take(limit.saturating_add(1)).read_to_end(&mut text)
    });
    match read {
        Ok(size) if u64::try_from(size).unwrap_or(u64::MAX) <= limit => text,
        Ok(_) => {
            if let Some(suppressed) = REFUSED.hit() {
                tracing::warn!(
                    size = body.len(),
                    limit = max_message_size,
                    suppressed,
                    "compressed body inflates beyond max_message_size; the message will be refused"
                );
            }
            body
        }
        Err(err) => {
            if let Some(suppressed) = REFUSED.hit() {
                tracing::warn!(error = %err, size = body.len(), suppressed,
                    "compressed body does not inflate; the message will be refused");
            }
            body
        }
    }
}

impl AmqpConsumer {
    /// Waits for the ack of the last batch, if one is unanswered. False when it
    /// failed: the channel is gone, and with it the acks, so the broker delivers the
    /// batch again and none of it is handed out. Cancel-safe: the ack stays in
    /// `acking` until it is answered.
    async fn finish_batch_ack(&mut self) -> bool {
        let Some(acking) = self.acking.as_mut() else {
            return true;
        };
        let acked = acking.await;
        self.acking = None;
        match settled(acked, "acknowledging") {
            Ok(()) => true,
            Err(err) => {
                tracing::warn!(error = %err, count = self.taken.len(),
                    "could not acknowledge deliveries; the broker delivers them again");
                self.taken.clear();
                self.broken = true;
                false
            }
        }
    }
}

#[async_trait]
impl Consumer for AmqpConsumer {
    async fn recv(&mut self) -> Option<Result<Delivery>> {
        self.finish_batch_ack().await;
        if let Some(delivery) = self.taken.pop_front() {
            return Some(Ok(delivery));
        }
        loop {
            if std::mem::take(&mut self.broken) {
                self.resubscribe();
            }
            let live = match &mut self.current {
                Some(live) => live,
                None => self.current.insert(self.sessions.recv().await?),
            };
            match live.stream.next().await {
                Some(Ok(first)) if live.settles && self.settle_on_receipt => {
                    // Every delivery lapin holds, up to the byte budget. The
                    // `multiple` ack below settles every tag up to the highest, so it
                    // is used only when the batch took everything lapin held; a batch
                    // cut short by the budget acks each of its deliveries instead, so
                    // that none left behind is acked unseen (its requeue would then
                    // close the channel).
                    let channel = live.channel.clone();
                    let room = self.sizing.as_ref().map(|sizing| sizing.budget.available());
                    let mut bytes = first.data.len();
                    let mut batch = vec![first];
                    let mut cut = false;
                    loop {
                        if room.is_some_and(|room| bytes >= room) {
                            cut = true;
                            break;
                        }
                        let Some(live) = self.current.as_mut() else {
                            break;
                        };
                        match live.stream.next().now_or_never() {
                            Some(Some(Ok(delivery))) => {
                                bytes += delivery.data.len();
                                batch.push(delivery);
                            }
                            Some(Some(Err(err))) => {
                                tracing::warn!(error = %err, "consumer lost its channel; reconnecting");
                                self.broken = true;
                                break;
                            }
                            Some(None) => {
                                tracing::warn!(
                                    "the broker cancelled the consumer; subscribing again"
                                );
                                self.broken = true;
                                break;
                            }
                            None => break,
                        }
                    }
                    let acking: futures::future::BoxFuture<'static, lapin::Result<bool>> = if cut {
                        let ackers: Vec<lapin::Acker> =
                            batch.iter().map(|d| d.acker.clone()).collect();
                        Box::pin(async move {
                            let acks = ackers.into_iter().map(|acker| async move {
                                acker.ack(BasicAckOptions { multiple: false }).await
                            });
                            let all = futures::future::join_all(acks).map(|outcomes| {
                                let mut acked = true;
                                for outcome in outcomes {
                                    acked &= outcome?;
                                }
                                Ok(acked)
                            });
                            until_lost(&channel, all).await
                        })
                    } else {
                        // Delivery tags count every delivery of the channel, in the
                        // order lapin hands them to the consumers' streams: every
                        // one below the highest here is in this batch or was in an
                        // earlier one.
                        let Some(acker) = (batch.iter().max_by_key(|d| d.delivery_tag))
                            .map(|highest| highest.acker.clone())
                        else {
                            continue; // never: a batch starts with a delivery
                        };
                        Box::pin(async move {
                            until_lost(&channel, acker.ack(BasicAckOptions { multiple: true }))
                                .await
                        })
                    };
                    // Kept here before the ack is awaited, so that a dropped `recv`
                    // loses none of them (lapin sends the ack once it is polled).
                    let sizes: Vec<usize> = batch.iter().map(|d| d.data.len()).collect();
                    for delivery in batch {
                        let taken =
                            self.delivery(delivery.data, &delivery.properties, Box::new(NoAck));
                        self.taken.push_back(taken);
                    }
                    self.acking = Some(acking);
                    if !self.finish_batch_ack().await {
                        continue;
                    }
                    if !self.broken {
                        for size in sizes {
                            self.observe(size);
                        }
                    }
                    if let Some(delivery) = self.taken.pop_front() {
                        return Some(Ok(delivery));
                    }
                }
                Some(Ok(delivery)) => {
                    let acker: Box<dyn Acker> = if live.settles {
                        Box::new(AmqpAcker {
                            acker: delivery.acker,
                            channel: live.channel.clone(),
                        })
                    } else {
                        Box::new(NoAck)
                    };
                    let size = delivery.data.len();
                    let delivery = self.delivery(delivery.data, &delivery.properties, acker);
                    self.observe(size);
                    return Some(Ok(delivery));
                }
                Some(Err(err)) => {
                    tracing::warn!(error = %err, "consumer lost its channel; reconnecting");
                    self.resubscribe();
                }
                None => {
                    tracing::warn!("the broker cancelled the consumer; subscribing again");
                    self.resubscribe();
                }
            }
        }
    }

    async fn stop(&mut self) -> Result<()> {
        self.stop.cancel();
        // A batch whose ack was still unanswered when the server stopped is run by the
        // server only if the broker took the ack; otherwise it delivers them again.
        self.finish_batch_ack().await;
        // Deliveries lapin already holds but the server did not take go back now, so
        // other servers can take them during this server's grace period.
        let live = match self.current.take() {
            Some(live) => Some(live),
            None => self.sessions.try_recv().ok(),
        };
        if let Some(mut live) = live.filter(|live| live.settles) {
            while let Some(Some(Ok(delivery))) = live.stream.next().now_or_never() {
                let requeue = delivery.acker.reject(BasicRejectOptions { requeue: true });
                let requeued = until_lost(&live.channel, requeue).await;
                if let Err(err) = settled(requeued, "requeueing a delivery on stop") {
                    tracing::debug!(error = %err, "could not requeue a held delivery");
                }
            }
        }
        Ok(())
    }

    fn take_settled(&mut self) -> Vec<Delivery> {
        self.taken.drain(..).collect()
    }

    async fn close(&mut self) -> Result<()> {
        self.stop.cancel();
        self.current = None;
        // Dropping the guard cancels `closed`; the task then cleans up and ends.
        drop(self.close_on_drop.take());
        if let Some(task) = self.task.take() {
            task.await.map_err(|e| {
                Error::transport(
                    rpc_core::TransportErrorKind::Other,
                    "consumer task failed",
                    e,
                )
            })?;
        }
        Ok(())
    }
}

/// Deliveries of one consumer; its end (the broker cancelled it) is an error item,
/// so losing one of several consumers is noticed, not silently absorbed by the merge.
type Deliveries = BoxStream<'static, std::result::Result<lapin::message::Delivery, String>>;

/// One subscription on one channel.
struct Session {
    channel: Arc<Channel>,
    stream: Merged<Deliveries>,
    tags: Vec<String>,
}

struct ConsumerTask {
    link: Arc<Link>,
    subscription: Subscription,
    sessions: mpsc::UnboundedSender<Live>,
    lost: mpsc::UnboundedReceiver<Option<Live>>,
    stop: CancellationToken,
    closed: CancellationToken,
    /// The prefetch of a server's next subscription (set by the consumer).
    prefetch: Arc<AtomicU16>,
}

impl ConsumerTask {
    async fn run(mut self, ready: oneshot::Sender<Result<()>>) {
        let mut ready = Some(ready);
        let mut attempt = 0u32;
        loop {
            let opened = tokio::select! {
                _ = self.closed.cancelled() => return,
                _ = self.stop.cancelled() => return self.finish(None).await,
                opened = self.open() => opened,
            };
            let session = match opened {
                Ok(session) => session,
                Err(err) => {
                    if let Some(ready) = ready.take() {
                        let _ = ready.send(Err(err));
                        return;
                    }
                    if matches!(err, Error::Closed) {
                        // The transport was closed: this consumer is finished for good.
                        return;
                    }
                    let wait = self.link.backoff(attempt);
                    attempt = attempt.saturating_add(1);
                    tracing::warn!(error = %err, ?wait, "re-subscribing failed; will retry");
                    tokio::select! {
                        _ = self.closed.cancelled() => return,
                        _ = tokio::time::sleep(wait) => continue,
                    }
                }
            };
            if let Some(ready) = ready.take() {
                let _ = ready.send(Ok(()));
            } else {
                tracing::info!(subscription = ?self.subscription, "re-subscribed after reconnection");
            }
            attempt = 0;
            let Session {
                channel,
                stream,
                tags,
            } = session;
            let settles = matches!(self.subscription, Subscription::Server { .. });
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
            tokio::select! {
                biased;
                _ = self.closed.cancelled() => return self.finish(Some((channel, tags))).await,
                _ = self.stop.cancelled() => return self.finish(Some((channel, tags))).await,
                lost = self.lost.recv() => match lost {
                    None => return self.finish(Some((channel, tags))).await,
                    Some(None) => {}
                    Some(Some(retired)) => retire(retired).await,
                }
            }
        }
    }

    async fn open(&self) -> Result<Session> {
        let connected = self.link.connection().await?;
        let channel = connected
            .connection
            .create_channel()
            .await
            .map_err(|e| lapin_error("opening a consumer channel", e))?;
        let config = &self.link.config;
        let (queues, no_ack) = match &self.subscription {
            Subscription::Server {
                exchange,
                topic,
                server,
                fanout_queue,
                prefetch: _,
            } => {
                let prefetch = self.prefetch.load(Ordering::Relaxed);
                channel
                    // Per consumer, as oslo.messaging sets it: RabbitMQ's channel-wide
                    // (`global`) limit coordinates the channel and its queues on every
                    // message and cost a third of the calls per second here.
                    .basic_qos(prefetch, BasicQosOptions { global: false })
                    .await
                    .map_err(|e| lapin_error("setting prefetch", e))?;
                let direct = topology::server_queue(topic, server);
                let fanout = topology::fanout_exchange(topic);
                topology::declare_topic_exchange(&channel, config, exchange).await?;
                topology::declare_shared_queue(&channel, config, exchange, topic).await?;
                topology::declare_shared_queue(&channel, config, exchange, &direct).await?;
                topology::declare_fanout_exchange(&channel, topic).await?;
                topology::declare_transient_queue(&channel, config, fanout_queue).await?;
                topology::bind(&channel, fanout_queue, &fanout, topic).await?;
                (vec![topic.clone(), direct, fanout_queue.clone()], false)
            }
            Subscription::Reply { queue } => {
                topology::declare_transient_queue(&channel, config, queue).await?;
                (vec![queue.clone()], true)
            }
            Subscription::Monitor {
                exchange,
                topic,
                queue,
            } => {
                topology::declare_topic_exchange(&channel, config, exchange).await?;
                topology::declare_fanout_exchange(&channel, topic).await?;
                topology::declare_private_queue(&channel, queue).await?;
                topology::bind(&channel, queue, exchange, topic).await?;
                topology::bind(&channel, queue, exchange, &format!("{topic}.*")).await?;
                topology::bind(&channel, queue, &topology::fanout_exchange(topic), topic).await?;
                (vec![queue.clone()], true)
            }
        };
        let mut stream = Merged::new();
        let mut tags = Vec::new();
        for queue in queues {
            let consumer = channel
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
                .map_err(|e| lapin_error(&format!("consuming {queue}"), e))?;
            tags.push(consumer.tag().to_string());
            let ended = format!("the broker cancelled the consumer of {queue}");
            stream.push(
                consumer
                    .map(|item| item.map_err(|e| e.to_string()))
                    .chain(futures::stream::once(async move { Err(ended) }))
                    .boxed(),
            );
        }
        Ok(Session {
            channel: Arc::new(channel),
            stream,
            tags,
        })
    }

    /// Stops consuming but keeps the channel open, so deliveries already handed out
    /// can still be acked; closes it (deleting a server's fanout queue, as oslo does on
    /// a graceful close) when the consumer is dropped.
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
        if let Subscription::Server { fanout_queue, .. } = &self.subscription
            && let Ok(name) = short(fanout_queue)
        {
            let delete = channel.queue_delete(name, QueueDeleteOptions::default());
            match tokio::time::timeout(CLEANUP_LIMIT, delete).await {
                Ok(Ok(_)) => {}
                Ok(Err(err)) => {
                    tracing::debug!(error = %err, "could not delete the fanout queue")
                }
                Err(_) => tracing::debug!("fanout queue deletion unanswered"),
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

/// Settles a server delivery on the channel it came from.
struct AmqpAcker {
    acker: lapin::Acker,
    /// Keeps the channel open until the delivery is settled, and tells when it is
    /// lost.
    channel: Arc<Channel>,
}

#[async_trait]
impl Acker for AmqpAcker {
    async fn ack(self: Box<Self>) -> Result<()> {
        let acked = until_lost(&self.channel, self.acker.ack(BasicAckOptions::default()));
        settled(acked.await, "acknowledging")
    }

    async fn reject(self: Box<Self>, requeue: bool) -> Result<()> {
        let rejected = self.acker.reject(BasicRejectOptions { requeue });
        settled(until_lost(&self.channel, rejected).await, "rejecting")
    }
}

/// lapin answers `Ok(false)` when the delivery's channel is gone: the broker has
/// already requeued the message, so the settlement failed.
fn settled(outcome: lapin::Result<bool>, what: &str) -> Result<()> {
    match outcome {
        Ok(true) => Ok(()),
        Ok(false) => Err(Error::transport_msg(
            rpc_core::TransportErrorKind::Other,
            format!("{what} failed: the delivery's channel is closed (the broker requeued it)"),
        )),
        Err(err) => Err(lapin_error(what, err)),
    }
}

#[cfg(test)]
mod tests {
    use lapin::types::{LongString, ShortString};

    use super::*;
    use crate::Compression;

    /// What this transport sends with `compression=gzip`.
    fn zlib(data: &[u8]) -> Vec<u8> {
        Compression::Gzip.compress(data)
    }

    fn compressed_as(kind: &str) -> BasicProperties {
        let mut headers = FieldTable::default();
        headers.insert(
            ShortString::from("compression"),
            AMQPValue::LongString(LongString::from(kind)),
        );
        BasicProperties::default().with_headers(headers)
    }

    /// What this transport sends with `compression=bzip2`.
    fn bz2(data: &[u8]) -> Vec<u8> {
        Compression::Bzip2.compress(data)
    }

    fn sizing(limit: usize, max: u16) -> Sizing {
        Sizing {
            budget: ByteBudget::new(limit),
            prefetch: Arc::new(AtomicU16::new(max)),
            max,
            largest: 0,
            seen: 0,
        }
    }

    #[test]
    fn prefetch_follows_the_size_of_deliveries() {
        const MIB: usize = 1024 * 1024;
        let mut s = sizing(64 * MIB, 64);
        // Small deliveries leave the prefetch at its ceiling.
        for _ in 0..200 {
            assert_eq!(s.observe(10_000), None);
        }
        // One too big for it lowers it at once: budget / size.
        assert_eq!(s.observe(8 * MIB), Some(8));
        assert_eq!(s.observe(8 * MIB), None);
        // Bigger than the budget: one at a time.
        assert_eq!(s.observe(100 * MIB), Some(1));
        // Raised only after a whole window of smaller ones.
        for _ in 0..SIZE_WINDOW - 1 {
            assert_eq!(s.observe(MIB), None);
        }
        assert_eq!(s.observe(MIB), Some(64));
        // A raise that would not double the prefetch waits (no churn).
        let mut s = sizing(64 * MIB, 64);
        assert_eq!(s.observe(3 * MIB), Some(21));
        for _ in 0..2 * 21 {
            assert_eq!(s.observe(2 * MIB + MIB / 2), None);
        }
        assert_eq!(s.prefetch.load(Ordering::Relaxed), 21);
    }

    #[test]
    fn expiration_is_read_as_the_time_to_live() {
        let with = |text: &str| BasicProperties::default().with_expiration(text.into());
        assert_eq!(time_to_live(&with("60000")), Some(Duration::from_secs(60)));
        assert_eq!(time_to_live(&with("1")), Some(Duration::from_millis(1)));
        assert_eq!(time_to_live(&with("soon")), None);
        assert_eq!(time_to_live(&with("-5")), None);
        assert_eq!(time_to_live(&BasicProperties::default()), None);
    }

    #[test]
    fn inflates_kombu_gzip_and_bz2_bodies_within_the_limit_only() {
        let text = br#"{"oslo.version": "2.0", "oslo.message": "{}"}"#.repeat(20);
        for (kind, compress) in [
            (Compression::Gzip.header(), zlib as fn(&[u8]) -> Vec<u8>),
            (Compression::Bzip2.header(), bz2),
        ] {
            let header = compressed_as(kind);
            let packed = compress(&text);
            assert_ne!(packed, text, "{kind}");
            assert_eq!(inflated(packed.clone(), &header, 1 << 20), text, "{kind}");
            // Exactly at the limit inflates; one byte over is handed on as it came.
            assert_eq!(
                inflated(packed.clone(), &header, text.len()),
                text,
                "{kind}"
            );
            assert_eq!(
                inflated(packed.clone(), &header, text.len() - 1),
                packed,
                "{kind}"
            );
            // A body that does not inflate is handed on as it came.
            assert_eq!(
                inflated(b"not packed".to_vec(), &header, 1 << 20),
                b"not packed"
            );
        }
        // No header: the body is taken as it is, even when it is a zlib stream.
        let plain = BasicProperties::default();
        assert_eq!(inflated(zlib(&text), &plain, 1 << 20), zlib(&text));
        // The header names the compression: a zlib stream called bz2 does not inflate,
        // and a compression kombu has but mqrpc does not read is handed on as it came.
        let called_bz2 = compressed_as("application/x-bz2");
        assert_eq!(inflated(zlib(&text), &called_bz2, 1 << 20), zlib(&text));
        let lzma = compressed_as("application/x-lzma");
        assert_eq!(inflated(bz2(&text), &lzma, 1 << 20), bz2(&text));
    }
}
