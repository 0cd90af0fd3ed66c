//! A server's consumer: its queue-group subscriptions (topic and its own subject) and
//! plain fanout subscription, drained by a task of their own into the server's byte
//! budget, and in JetStream mode its pulls of casts (`jetstream.rs`).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;

use async_trait::async_trait;
use futures::StreamExt;
use rpc_core::logs::{DEFAULT_WARN_INTERVAL, Throttle};
use rpc_core::metrics::{RejectReason, RejectionCounter};
use rpc_core::transport::{ConnectionStatus, Merged};
use rpc_core::{ByteBudget, Consumer, Delivery, Error, ListenOptions, NoAck, Result, Target};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::NatsConfig;
use crate::{Deliveries, Shared, jetstream, nats_error};

/// The queue group all servers of a subject share.
const QUEUE_GROUP: &str = "mqrpc";

/// A server's consumer: its core NATS subscriptions, drained by a task of their own
/// into the server's byte budget, and in JetStream mode its pulls of casts.
pub(crate) struct ServerConsumer {
    /// Core NATS requests taken into the budget, in arrival order.
    core: Option<mpsc::Receiver<Delivery>>,
    /// Stops the task that drains the core subscriptions.
    drain: Option<Drain>,
    /// JetStream pulls (none on core NATS).
    pulls: Merged<Deliveries>,
    /// Which of `core` and `pulls` is looked at first next time, in turn.
    pulls_first: bool,
    /// Core requests taken and not handed out when the consumer stopped.
    settled: Vec<Delivery>,
    shared: Arc<Shared>,
    slow_seen: u64,
    stopped: bool,
}

/// The task draining a server's core NATS subscriptions.
struct Drain {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

/// Counts the core NATS requests a server drops and says so in at most one line per
/// [`DEFAULT_WARN_INTERVAL`] ([`Throttle`]), with the counts since the last line and
/// no content.
struct DropReport {
    topic: String,
    limit: usize,
    /// Drops since the last line, by cause.
    over_budget: u64,
    queue_full: u64,
    throttle: Throttle,
    shared: Arc<Shared>,
    /// The drops as metrics (`mqrpc.server.rejected`), by cause.
    metrics: [RejectionCounter; 2],
}

impl DropReport {
    fn new(topic: String, limit: usize, shared: Arc<Shared>) -> Self {
        let metrics = [RejectReason::OverBudget, RejectReason::QueueFull]
            .map(|reason| RejectionCounter::new(&topic, reason));
        DropReport {
            metrics,
            topic,
            limit,
            over_budget: 0,
            queue_full: 0,
            throttle: Throttle::new(DEFAULT_WARN_INTERVAL),
            shared,
        }
    }

    fn dropped(&mut self, over_budget: bool) {
        self.shared.dropped.fetch_add(1, Ordering::Relaxed);
        self.metrics[usize::from(!over_budget)].increment();
        if over_budget {
            self.over_budget += 1;
        } else {
            self.queue_full += 1;
        }
        self.write_if_due();
    }

    /// Writes the counts since the last line when the throttle lets a line through.
    fn write_if_due(&mut self) {
        if self.throttle.hit().is_some() {
            self.write();
        }
    }

    /// Writes the counts since the last line, if any.
    fn write(&mut self) {
        if self.over_budget + self.queue_full == 0 {
            return;
        }
        tracing::warn!(
            topic = ?self.topic,
            over_budget = self.over_budget,
            queue_full = self.queue_full,
            max_pending_bytes = self.limit,
            "core NATS requests dropped: the server's byte budget (max_pending_bytes) or \
             queue (subscription_capacity) was full; core NATS is at-most-once, so the \
             callers of dropped calls time out"
        );
        self.over_budget = 0;
        self.queue_full = 0;
    }

    /// When the drops counted since the last line are due (`None`: nothing to say).
    fn due(&self) -> Option<tokio::time::Instant> {
        self.throttle.due().map(tokio::time::Instant::from_std)
    }
}

/// Takes every message of a server's core subscriptions as soon as async-nats has it,
/// so that none waits in async-nats' per-subscription buffer: a message that fits in
/// the budget is charged and queued for the server (at most `capacity` of them), any
/// other is dropped at once and counted.
///
/// It also reports the client's connection to the server's health: async-nats
/// reconnects and subscribes again by itself, so the transport's `connected` flag,
/// set from the client's events, is all a server learns of it.
async fn drain(
    mut subscriptions: Merged<async_nats::Subscriber>,
    budget: ByteBudget,
    queue: mpsc::Sender<Delivery>,
    mut stop: oneshot::Receiver<()>,
    mut report: DropReport,
    mut connected: watch::Receiver<bool>,
    connection: ConnectionStatus,
) {
    let mut watching = true;
    let report_connection = |up: bool| {
        if up {
            connection.restored();
        } else {
            connection.lost();
        }
    };
    report_connection(*connected.borrow_and_update());
    loop {
        let due = report.due();
        tokio::select! {
            biased;
            _ = &mut stop => break,
            changed = connected.changed(), if watching => match changed {
                Ok(()) => report_connection(*connected.borrow_and_update()),
                // The transport is gone; its subscriptions end too.
                Err(_) => watching = false,
            },
            _ = async { tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)).await },
                if due.is_some() =>
            {
                report.write_if_due();
            }
            message = subscriptions.next() => {
                let Some(message) = message else { break };
                let Some(charge) = budget.try_charge(message.payload.len()) else {
                    report.dropped(true);
                    continue;
                };
                let delivery = Delivery::new(message.payload, Box::new(NoAck)).with_charge(charge);
                match queue.try_send(delivery) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => report.dropped(false),
                    Err(mpsc::error::TrySendError::Closed(_)) => break,
                }
            }
        }
    }
    report.write();
    // Dropping the subscribers unsubscribes them.
}

impl ServerConsumer {
    pub(crate) async fn start(
        shared: Arc<Shared>,
        target: &Target,
        options: &ListenOptions,
    ) -> Result<Self> {
        let config = &shared.config;
        let client = &shared.client;
        let exchange = target.exchange_or(&config.exchange).to_owned();
        let server = target.server.clone().unwrap_or_default();
        let topic_subject = config.topic_subject(&exchange, &target.topic);
        let server_subject = config.server_subject(&exchange, &target.topic, &server);
        let fanout_subject = config.fanout_subject(&exchange, &target.topic);
        for subject in [&topic_subject, &server_subject, &fanout_subject] {
            NatsConfig::check_subject(subject, target)?;
        }
        let subscribe_error = |e| nats_error("subscribing", e);
        let topic = client
            .queue_subscribe(topic_subject, QUEUE_GROUP.to_owned())
            .await
            .map_err(subscribe_error)?;
        let direct = client
            .queue_subscribe(server_subject, QUEUE_GROUP.to_owned())
            .await
            .map_err(subscribe_error)?;
        let fanout = client
            .subscribe(fanout_subject)
            .await
            .map_err(subscribe_error)?;
        let mut subscriptions = Merged::new();
        for subscriber in [topic, direct, fanout] {
            subscriptions.push(subscriber);
        }
        let budget = options.budget.clone();
        let pulls = match &shared.jetstream {
            Some(js) => {
                jetstream::pulls(js, config, &exchange, target, options.prefetch, &budget).await?
            }
            None => Merged::new(),
        };
        // Once the server has processed the subscriptions, messages sent from any
        // connection reach this consumer.
        crate::round_trip(client, config).await?;
        let (queue, core) = mpsc::channel(config.subscription_capacity);
        let (stop, stopped) = oneshot::channel();
        let report = DropReport::new(target.topic.clone(), budget.limit(), shared.clone());
        let task = tokio::spawn(drain(
            subscriptions,
            budget,
            queue,
            stopped,
            report,
            shared.connected.subscribe(),
            options.status.connection(),
        ));
        let slow_seen = shared.slow_consumers.load(Ordering::Relaxed);
        Ok(ServerConsumer {
            core: Some(core),
            drain: Some(Drain { stop, task }),
            pulls,
            pulls_first: false,
            settled: Vec::new(),
            shared,
            slow_seen,
            stopped: false,
        })
    }

    /// The next delivery of the core queue or of the pulls, looked at in turn.
    fn poll_next(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Option<Result<Delivery>>> {
        self.pulls_first = !self.pulls_first;
        for pulls in [self.pulls_first, !self.pulls_first] {
            if pulls {
                if self.pulls.is_empty() {
                    continue;
                }
                if let Poll::Ready(Some(item)) = self.pulls.poll_next_unpin(cx) {
                    return Poll::Ready(Some(item));
                }
            } else if let Some(core) = &mut self.core {
                match core.poll_recv(cx) {
                    Poll::Ready(Some(delivery)) => return Poll::Ready(Some(Ok(delivery))),
                    Poll::Ready(None) => self.core = None,
                    Poll::Pending => {}
                }
            }
        }
        if self.core.is_none() && self.pulls.is_empty() {
            Poll::Ready(None)
        } else {
            Poll::Pending
        }
    }
}

#[async_trait]
impl Consumer for ServerConsumer {
    async fn recv(&mut self) -> Option<Result<Delivery>> {
        if self.stopped {
            return None;
        }
        let slow = self.shared.slow_consumers.load(Ordering::Relaxed);
        if slow != self.slow_seen {
            self.slow_seen = slow;
            return Some(Err(Error::transport_msg(
                rpc_core::TransportErrorKind::Other,
                "NATS slow consumer: the client dropped messages it could not buffer \
                 (raise subscription_capacity or the server's concurrency)",
            )));
        }
        futures::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    async fn stop(&mut self) -> Result<()> {
        self.stopped = true;
        // Dropping a pull stream stops pulling.
        self.pulls = Merged::new();
        if let Some(drain) = self.drain.take() {
            let _ = drain.stop.send(());
            // The task unsubscribes as it ends; it never waits on anything else.
            let _ = drain.task.await;
        }
        // Core requests already taken are lost to the broker (at-most-once): the
        // server runs them in its grace period.
        if let Some(mut core) = self.core.take() {
            while let Ok(delivery) = core.try_recv() {
                self.settled.push(delivery);
            }
        }
        // Bounded: while the connection is down the client does not flush at all.
        let _ = tokio::time::timeout(crate::ROUND_TRIP_LIMIT, self.shared.client.flush()).await;
        Ok(())
    }

    fn take_settled(&mut self) -> Vec<Delivery> {
        std::mem::take(&mut self.settled)
    }

    async fn close(&mut self) -> Result<()> {
        // Replies of the last handlers may still sit in the client's write buffer;
        // the connection can go away with the server right after this.
        match tokio::time::timeout(crate::ROUND_TRIP_LIMIT, self.shared.client.flush()).await {
            Ok(flushed) => flushed.map_err(|e| nats_error("flushing the last replies", e)),
            Err(_) => Err(Error::transport_msg(
                rpc_core::TransportErrorKind::Disconnected,
                "the last replies could not be flushed (disconnected)",
            )),
        }
    }
}

impl Drop for ServerConsumer {
    fn drop(&mut self) {
        // The task ends (and unsubscribes) when it sees the stop sender gone.
        if let Some(drain) = self.drain.take() {
            let _ = drain.stop.send(());
        }
    }
}
