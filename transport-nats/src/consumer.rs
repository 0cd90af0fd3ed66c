//! Consumers: a server's queue-group subscriptions (topic and its own subject), its
//! plain fanout subscription and, in JetStream mode, its pull consumers for casts;
//! a client's single wildcard inbox subscription.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use rpc_core::transport::{Merged, ReplyEvent};
use rpc_core::{
    Acker, ByteBudget, Consumer, Delivery, Error, ListenOptions, NoAck, Result, Target,
};
use tokio::sync::{mpsc, oneshot};

use crate::config::NatsConfig;
use crate::publisher::{NO_RESPONDERS_TOKEN, REPLY_TOKEN};
use crate::{Shared, nats_error};

/// The queue group all servers of a subject share.
const QUEUE_GROUP: &str = "mqrpc";

/// Creates (or finds) the work-queue stream holding an exchange's casts.
pub(crate) async fn ensure_stream(
    js: &jetstream::Context,
    config: &NatsConfig,
    exchange: &str,
) -> Result<jetstream::stream::Stream> {
    let name = config.jetstream_stream(exchange);
    let subject = config
        .jetstream_subject(&rpc_core::Address::Topic {
            exchange: exchange.to_owned(),
            topic: "x".to_owned(),
        })
        .and_then(|s| s.rsplit_once('.').map(|(base, _)| format!("{base}.>")))
        .unwrap_or_default();
    // Create, or bring an existing stream's subjects and limits up to date.
    js.create_or_update_stream(jetstream::stream::Config {
        name: name.clone(),
        subjects: vec![subject],
        retention: jetstream::stream::RetentionPolicy::WorkQueue,
        max_age: config.max_age,
        ..Default::default()
    })
    .await
    .map_err(|e| nats_error(&format!("creating JetStream stream {name}"), e))?;
    js.get_stream(&name)
        .await
        .map_err(|e| nats_error(&format!("opening JetStream stream {name}"), e))
}

type Deliveries = BoxStream<'static, Result<Delivery>>;

fn plain(subscriber: async_nats::Subscriber) -> Deliveries {
    subscriber
        .map(|message| Ok(Delivery::new(message.payload, Box::new(NoAck))))
        .boxed()
}

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

/// The shortest pause between two warnings about dropped core NATS requests.
const DROP_WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// Counts the core NATS requests a server drops and says so in at most one line per
/// [`DROP_WARNING_INTERVAL`], with the counts since the last line and no content.
struct DropReport {
    topic: String,
    limit: usize,
    over_budget: u64,
    queue_full: u64,
    /// When the next line may be written (`None`: at once).
    next_line: Option<tokio::time::Instant>,
    shared: Arc<Shared>,
}

impl DropReport {
    fn dropped(&mut self, over_budget: bool) {
        self.shared.dropped.fetch_add(1, Ordering::Relaxed);
        if over_budget {
            self.over_budget += 1;
        } else {
            self.queue_full += 1;
        }
        let now = tokio::time::Instant::now();
        if self.next_line.is_none_or(|at| at <= now) {
            self.write(now);
        }
    }

    /// Writes the counts since the last line, if any.
    fn write(&mut self, now: tokio::time::Instant) {
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
        self.next_line = Some(now + DROP_WARNING_INTERVAL);
    }

    /// When the counts gathered since the last line are due (`None`: nothing to say).
    fn due(&self) -> Option<tokio::time::Instant> {
        (self.over_budget + self.queue_full > 0)
            .then_some(self.next_line)
            .flatten()
    }
}

/// Takes every message of a server's core subscriptions as soon as async-nats has it,
/// so that none waits in async-nats' per-subscription buffer: a message that fits in
/// the budget is charged and queued for the server (at most `capacity` of them), any
/// other is dropped at once and counted.
async fn drain(
    mut subscriptions: Merged<async_nats::Subscriber>,
    budget: ByteBudget,
    queue: mpsc::Sender<Delivery>,
    mut stop: oneshot::Receiver<()>,
    mut report: DropReport,
) {
    loop {
        let due = report.due();
        tokio::select! {
            biased;
            _ = &mut stop => break,
            _ = async { tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)).await },
                if due.is_some() =>
            {
                report.write(tokio::time::Instant::now());
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
    report.write(tokio::time::Instant::now());
    // Dropping the subscribers unsubscribes them.
}

/// How long one pull request waits on the server. Short, so a request the server
/// dropped (its inbox lost interest during a disconnect) is replaced soon.
const PULL_EXPIRES: Duration = Duration::from_secs(10);
/// Idle heartbeat asked of the server while a pull request waits; two missed
/// heartbeats mean the request is gone and a new one is sent.
const PULL_HEARTBEAT: Duration = Duration::from_secs(1);
/// Pause before pulling again after a pull failed to start or the server refused it,
/// and the first pause before creating a deleted consumer again.
const PULL_RETRY: Duration = Duration::from_millis(500);
/// The longest pause between attempts to create a consumer again.
const PULL_RETRY_MAX: Duration = Duration::from_secs(10);
/// The least room in the budget worth a pull (or the whole budget, when smaller).
const PULL_MIN_ROOM: usize = 4096;

/// A pull request the server may still be answering.
struct PendingPull {
    /// Messages it may still deliver.
    left: usize,
    /// Bytes it may still deliver (0: any).
    bytes_left: usize,
    /// When the server was last heard from about it (a message or a heartbeat).
    heard: tokio::time::Instant,
}

/// Where a server pulls casts from: a durable consumer of the exchange's stream,
/// pulled through an inbox of its own, never for more bytes than the server's budget
/// has room for.
struct PullSource {
    js: jetstream::Context,
    nats: NatsConfig,
    exchange: String,
    stream: jetstream::stream::Stream,
    config: jetstream::consumer::pull::Config,
    batch: usize,
    /// Pause before the next attempt to create the consumer again.
    retry: Duration,
    budget: ByteBudget,
    /// The consumer; `None` when it must be created (again).
    consumer: Option<jetstream::consumer::PullConsumer>,
    /// Where the server delivers what is pulled.
    inbox: async_nats::Subject,
    subscriber: async_nats::Subscriber,
    pending: Option<PendingPull>,
    /// Room the next pull waits for: the size of a cast that did not fit, or twice the
    /// room of a pull the server refused because its next cast is bigger.
    need: usize,
}

impl PullSource {
    /// The durable consumer, created when missing (first use, or deleted since); the
    /// exchange's stream too, when it is gone.
    async fn consumer(&mut self) -> Result<jetstream::consumer::PullConsumer> {
        let durable = self.config.durable_name.clone().unwrap_or_default();
        let created = self
            .stream
            .get_or_create_consumer(&durable, self.config.clone())
            .await;
        let consumer = match created {
            Ok(consumer) => consumer,
            Err(_) => {
                self.stream = ensure_stream(&self.js, &self.nats, &self.exchange).await?;
                self.stream
                    .get_or_create_consumer(&durable, self.config.clone())
                    .await
                    .map_err(|e| {
                        nats_error(&format!("creating the JetStream consumer {durable}"), e)
                    })?
            }
        };
        self.retry = PULL_RETRY;
        Ok(consumer)
    }

    /// Asks the server for casts: at most `batch` of them and, unless the budget is
    /// empty and the next cast is known to be bigger than it, no more bytes than the
    /// budget has room for.
    async fn request(&mut self, consumer: &jetstream::consumer::PullConsumer) -> Result<()> {
        let limit = self.budget.limit();
        let room = self.budget.available();
        let (batch, max_bytes) = if self.need >= limit && room >= limit {
            // Bigger than the whole budget: alone, as `try_charge` lets it through.
            (1, 0)
        } else {
            (self.batch, room)
        };
        let request = jetstream::consumer::pull::BatchConfig {
            batch,
            expires: Some(PULL_EXPIRES),
            max_bytes,
            idle_heartbeat: PULL_HEARTBEAT,
            ..Default::default()
        };
        consumer
            .request_batch(request, self.inbox.clone())
            .await
            .map_err(|e| nats_error("sending a JetStream pull request", e))?;
        self.pending = Some(PendingPull {
            left: batch,
            bytes_left: max_bytes,
            heard: tokio::time::Instant::now(),
        });
        Ok(())
    }

    /// What the server sent to the pull inbox: a cast taken into the budget, or
    /// `None` for status messages and casts given back.
    async fn received(&mut self, message: async_nats::Message) -> Option<Result<Delivery>> {
        if let Some(pending) = &mut self.pending {
            pending.heard = tokio::time::Instant::now();
        }
        let status = message.status.unwrap_or(async_nats::StatusCode::OK);
        match status {
            async_nats::StatusCode::OK => {}
            async_nats::StatusCode::IDLE_HEARTBEAT => return None,
            // The pull expired, or found nothing.
            async_nats::StatusCode::TIMEOUT | async_nats::StatusCode::NOT_FOUND => {
                self.pending = None;
                return None;
            }
            async_nats::StatusCode::REQUEST_TERMINATED => {
                let pending = self.pending.take();
                let description = message.description.unwrap_or_default();
                if description.contains("Message Size Exceeds MaxBytes") {
                    // The next cast is bigger than what the pull had left: the next pull
                    // waits for twice that room (up to the whole budget, when it is
                    // taken alone).
                    let left = pending.map_or(0, |p| p.bytes_left);
                    self.need = left.saturating_mul(2).max(PULL_MIN_ROOM);
                    return None;
                }
                if description.contains("Consumer Deleted") {
                    self.consumer = None;
                    return Some(Err(Error::transport_msg(
                        rpc_core::TransportErrorKind::Other,
                        "JetStream consumer deleted; creating it again",
                    )));
                }
                // Leadership change, too many waiting pulls and the like: pull again
                // after a pause.
                tracing::debug!(description, "JetStream pull ended by the server");
                tokio::time::sleep(PULL_RETRY).await;
                return None;
            }
            async_nats::StatusCode::NO_RESPONDERS => {
                // No consumer (or no JetStream) answers the pull request.
                self.pending = None;
                self.consumer = None;
                return Some(Err(Error::transport_msg(
                    rpc_core::TransportErrorKind::Other,
                    "JetStream pull: no responders (creating the consumer again)",
                )));
            }
            other => {
                self.pending = None;
                tokio::time::sleep(PULL_RETRY).await;
                return Some(Err(Error::transport_msg(
                    rpc_core::TransportErrorKind::Other,
                    format!("JetStream pull: unexpected status {other}"),
                )));
            }
        }
        let size = message.payload.len();
        if let Some(pending) = &mut self.pending {
            pending.left = pending.left.saturating_sub(1);
            pending.bytes_left = pending.bytes_left.saturating_sub(size);
            if pending.left == 0 {
                self.pending = None;
            }
        }
        let message = jetstream::Message {
            message,
            context: self.js.clone(),
        };
        match self.budget.try_charge(size) {
            Some(charge) => {
                self.need = 0;
                let payload = message.payload.clone();
                let acker = Box::new(JetStreamAcker { message });
                Some(Ok(Delivery::new(payload, acker).with_charge(charge)))
            }
            None => {
                // Came in while the budget filled up: back to the broker at once, for
                // any server with room. The next pull waits for room for it.
                self.need = size;
                if let Err(err) = message.ack_with(AckKind::Nak(None)).await {
                    tracing::debug!(error = %err, "JetStream nak failed; redelivered after ack_wait");
                }
                None
            }
        }
    }
}

/// The casts of one JetStream consumer.
///
/// A pull request is sent only while the server asks for deliveries and its budget
/// has room, for at most that room in bytes, so casts beyond the budget wait in the
/// stream. A request the server lost (two missed heartbeats, as after a quick
/// disconnect and reconnect) is replaced, and the consumer is created again if it was
/// deleted. Messages delivered to an abandoned pull and not yet acked are redelivered
/// after `ack_wait`.
fn pulled(source: PullSource) -> Deliveries {
    futures::stream::unfold(source, |mut source| async move {
        loop {
            let Some(consumer) = source.consumer.clone() else {
                tokio::time::sleep(source.retry).await;
                match source.consumer().await {
                    Ok(fresh) => {
                        source.consumer = Some(fresh);
                        source.pending = None;
                    }
                    Err(err) => {
                        source.retry = (source.retry * 2).min(PULL_RETRY_MAX);
                        return Some((Err(err), source));
                    }
                }
                continue;
            };
            let room = source.need.max(PULL_MIN_ROOM);
            let deadline = source
                .pending
                .as_ref()
                .map(|pending| pending.heard + PULL_HEARTBEAT * 2 + PULL_HEARTBEAT / 2);
            let budget = source.budget.clone();
            tokio::select! {
                biased;
                message = source.subscriber.next() => {
                    // The inbox subscription ends only with the client.
                    let message = message?;
                    if let Some(item) = source.received(message).await {
                        return Some((item, source));
                    }
                }
                () = budget.until_available(room), if deadline.is_none() => {
                    if let Err(err) = source.request(&consumer).await {
                        tokio::time::sleep(PULL_RETRY).await;
                        return Some((Err(err), source));
                    }
                }
                () = async { tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)).await },
                    if deadline.is_some() =>
                {
                    tracing::debug!("JetStream pull missed its heartbeats; pulling afresh");
                    source.pending = None;
                }
            }
        }
    })
    .boxed()
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
        let mut pulls = Merged::new();
        if let Some(js) = &shared.jetstream {
            let stream = ensure_stream(js, config, &exchange).await?;
            for address in [
                rpc_core::Address::Topic {
                    exchange: exchange.clone(),
                    topic: target.topic.clone(),
                },
                rpc_core::Address::Server {
                    exchange: exchange.clone(),
                    topic: target.topic.clone(),
                    server: server.clone(),
                },
            ] {
                let Some(subject) = config.jetstream_subject(&address) else {
                    continue;
                };
                NatsConfig::check_subject(&subject, target)?;
                let durable = config.jetstream_durable(&subject);
                let inbox = async_nats::Subject::from(client.new_inbox());
                let subscriber = client
                    .subscribe(inbox.clone())
                    .await
                    .map_err(subscribe_error)?;
                let mut source = PullSource {
                    js: js.clone(),
                    nats: config.clone(),
                    exchange: exchange.clone(),
                    retry: PULL_RETRY,
                    stream: stream.clone(),
                    config: jetstream::consumer::pull::Config {
                        durable_name: Some(durable),
                        filter_subject: subject,
                        ack_wait: config.ack_wait,
                        // The consumer is shared by every server of the subject and
                        // removed once none has pulled for a while.
                        inactive_threshold: config.max_age.max(Duration::from_secs(3600)),
                        ..Default::default()
                    },
                    // Small batches: a busy server must not sit on casts other servers
                    // could take (they would be redelivered after ack_wait).
                    batch: options.prefetch.clamp(1, 4),
                    budget: budget.clone(),
                    consumer: None,
                    inbox,
                    subscriber,
                    pending: None,
                    need: 0,
                };
                source.consumer = Some(source.consumer().await?);
                pulls.push(pulled(source));
            }
        }
        // Once the server has processed the subscriptions, messages sent from any
        // connection reach this consumer.
        crate::round_trip(client, config).await?;
        let (queue, core) = mpsc::channel(config.subscription_capacity);
        let (stop, stopped) = oneshot::channel();
        let report = DropReport {
            topic: target.topic.clone(),
            limit: budget.limit(),
            over_budget: 0,
            queue_full: 0,
            next_line: None,
            shared: shared.clone(),
        };
        let task = tokio::spawn(drain(subscriptions, budget, queue, stopped, report));
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
                rpc_core::TransportErrorKind::Other,
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

/// A client's inbox: one wildcard subscription for every reply.
pub(crate) struct ReplyConsumer {
    subscriber: async_nats::Subscriber,
    no_responders_prefix: String,
}

impl ReplyConsumer {
    pub(crate) async fn start(shared: Arc<Shared>) -> Result<(String, Self)> {
        let base = format!(
            "{}{}",
            shared.config.reply_prefix(),
            rpc_core::wire::new_id()
        );
        let subscriber = shared
            .client
            .subscribe(format!("{base}.>"))
            .await
            .map_err(|e| nats_error("subscribing to the inbox", e))?;
        crate::round_trip(&shared.client, &shared.config).await?;
        Ok((
            format!("{base}.{REPLY_TOKEN}"),
            ReplyConsumer {
                subscriber,
                no_responders_prefix: format!("{base}.{NO_RESPONDERS_TOKEN}."),
            },
        ))
    }
}

#[async_trait]
impl rpc_core::ReplyConsumer for ReplyConsumer {
    async fn recv(&mut self) -> Option<Result<ReplyEvent>> {
        let message = self.subscriber.next().await?;
        let no_responders = message.status == Some(async_nats::StatusCode::NO_RESPONDERS);
        if let Some(msg_id) = message
            .subject
            .as_str()
            .strip_prefix(&self.no_responders_prefix)
            .filter(|_| no_responders)
        {
            // The server's answer to a call nobody listened for.
            let msg_id = msg_id.to_owned();
            return Some(Ok(ReplyEvent::NoResponders { msg_id }));
        }
        let reply = Delivery::new(message.payload, Box::new(NoAck));
        Some(Ok(ReplyEvent::Reply(reply)))
    }
}

/// Settles a JetStream cast.
struct JetStreamAcker {
    message: jetstream::Message,
}

#[async_trait]
impl Acker for JetStreamAcker {
    async fn ack(self: Box<Self>) -> Result<()> {
        self.message.ack().await.map_err(|e| {
            Error::transport_msg(
                rpc_core::TransportErrorKind::Other,
                format!("JetStream ack failed: {e}"),
            )
        })
    }

    async fn reject(self: Box<Self>, requeue: bool) -> Result<()> {
        let kind = if requeue {
            AckKind::Nak(None)
        } else {
            AckKind::Term
        };
        self.message.ack_with(kind).await.map_err(|e| {
            Error::transport_msg(
                rpc_core::TransportErrorKind::Other,
                format!("JetStream reject failed: {e}"),
            )
        })
    }
}

/// A watcher of a topic: plain (not queue-group) subscriptions to the topic, every
/// server subject of it and its fanout, so servers still get every message.
pub(crate) struct Monitor {
    streams: Merged<Deliveries>,
}

impl Monitor {
    pub(crate) async fn start(shared: Arc<Shared>, target: &Target) -> Result<Self> {
        let config = &shared.config;
        let exchange = target.exchange_or(&config.exchange).to_owned();
        let mut streams = Merged::new();
        let mut subjects = vec![
            config.topic_subject(&exchange, &target.topic),
            format!("{}.s.*", config.topic_subject(&exchange, &target.topic)),
            config.fanout_subject(&exchange, &target.topic),
        ];
        if shared.jetstream.is_some() {
            // JetStream casts are ordinary messages on their subjects too.
            let topic = rpc_core::Address::Topic {
                exchange: exchange.clone(),
                topic: target.topic.clone(),
            };
            if let Some(js_topic) = config.jetstream_subject(&topic) {
                subjects.push(format!("{js_topic}.s.*"));
                subjects.push(js_topic);
            }
        }
        for subject in subjects {
            NatsConfig::check_subject(&subject, target)?;
            let subscriber = shared
                .client
                .subscribe(subject)
                .await
                .map_err(|e| nats_error("subscribing", e))?;
            streams.push(plain(subscriber));
        }
        crate::round_trip(&shared.client, config).await?;
        Ok(Monitor { streams })
    }
}

#[async_trait]
impl Consumer for Monitor {
    async fn recv(&mut self) -> Option<Result<Delivery>> {
        self.streams.next().await
    }

    async fn stop(&mut self) -> Result<()> {
        self.streams = Merged::new();
        Ok(())
    }
}
