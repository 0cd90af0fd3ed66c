//! Consumers: a server's three queues on one channel with bounded prefetch, a
//! notification listener's queues (the same way, acked once handled), a client's
//! reply queue, and a watcher's queue. `recv` reads lapin's delivery streams itself (a stream's
//! `next` is cancel-safe), so a delivery costs no task hand-off of mqrpc's; a task
//! per consumer subscribes, hands each fresh subscription over, and when one is
//! lost reconnects and declares and subscribes everything again (`task.rs`). For a
//! server it reports the loss and the new subscription to the server's health
//! (`ListenOptions::status`): reconnecting from the one to the other.
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
//! not read goes back to the broker (`basic.reject` with requeue), nothing is lost
//! (`prefetch.rs`). Acks and rejects that outlive their channel are in `settle.rs`.

mod prefetch;
mod settle;
mod task;

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::AtomicU16;
use std::time::Duration;

use async_trait::async_trait;
use futures::{FutureExt, StreamExt};
use lapin::options::{BasicAckOptions, BasicRejectOptions};
use lapin::{BasicProperties, Channel};
use rpc_core::transport::{ConnectionStatus, Merged};
use rpc_core::{Acker, ByteBudget, Consumer, Delivery, Error, NoAck, Result, TransportErrorKind};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::compression::inflated;
use crate::link::Link;
use prefetch::Sizing;
use settle::{AmqpAcker, settled, until_lost};
use task::{ConsumerTask, Deliveries};

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
    /// A notification listener: the default group's queue of each route (named
    /// after its `<topic>.<priority>` key), or its pool's one queue (named after the
    /// pool, bound to every route), acked or rejected once handled.
    Notifications {
        /// The exchange and the `<topic>.<priority>` key of each route.
        routes: Vec<(String, String)>,
        /// The pool; `None` for the default group.
        pool: Option<String>,
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

/// A live subscription's deliveries, read by the consumer.
struct Live {
    stream: Merged<Deliveries>,
    /// Shared with the deliveries' ackers, which keep it open until they settle.
    channel: Arc<Channel>,
    settles: bool,
    /// The consumer tags of the subscription.
    tags: Vec<String>,
}

impl AmqpConsumer {
    /// Starts the consumer task and waits until the first subscription is active.
    pub(crate) async fn start(
        link: Arc<Link>,
        subscription: Subscription,
        settle_on_receipt: bool,
        budget: Option<ByteBudget>,
        connection: Option<ConnectionStatus>,
    ) -> Result<Self> {
        let (sessions_tx, sessions) = mpsc::unbounded_channel();
        let (lost, lost_rx) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let closed = CancellationToken::new();
        let (ready_tx, ready_rx) = oneshot::channel();
        let max_message_size = link.config.max_message_size;
        let max_prefetch = match &subscription {
            Subscription::Server { prefetch, .. }
            | Subscription::Notifications { prefetch, .. } => (*prefetch).max(1),
            _ => 1,
        };
        let prefetch = Arc::new(AtomicU16::new(max_prefetch));
        let sizing = match (&subscription, budget) {
            (Subscription::Server { .. }, Some(budget)) => {
                Some(Sizing::new(budget, prefetch.clone(), max_prefetch))
            }
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
            connection,
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
                Error::transport(TransportErrorKind::Other, "consumer task failed", e)
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiration_is_read_as_the_time_to_live() {
        let with = |text: &str| BasicProperties::default().with_expiration(text.into());
        assert_eq!(time_to_live(&with("60000")), Some(Duration::from_secs(60)));
        assert_eq!(time_to_live(&with("1")), Some(Duration::from_millis(1)));
        assert_eq!(time_to_live(&with("soon")), None);
        assert_eq!(time_to_live(&with("-5")), None);
        assert_eq!(time_to_live(&BasicProperties::default()), None);
    }
}
