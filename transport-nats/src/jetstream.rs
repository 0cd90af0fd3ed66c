//! JetStream: the pull loop through which a server takes casts (JetStream mode) and
//! a listener takes notifications (always) no faster than its byte budget allows,
//! and the acker that settles each message (the streams themselves: `stream.rs`).

use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use async_trait::async_trait;
use futures::StreamExt;
use rpc_core::backoff::{Backoff, Jitter};
use rpc_core::transport::Merged;
use rpc_core::{Acker, ByteBudget, Delivery, Error, Result, Target, TransportErrorKind};

use crate::config::{DEFAULT_MAX_AGE, NatsConfig};
use crate::error::boxed_nats_error;
use crate::stream::{StreamKind, ensure_stream};
use crate::{Deliveries, nats_error};

/// The casts a server of `target` takes: one pull loop for the topic's JetStream
/// subject and one for its server's, each on a durable consumer shared by every
/// server of that subject, pulled no faster than `budget` has room.
pub(crate) async fn pulls(
    js: &jetstream::Context,
    config: &NatsConfig,
    exchange: &str,
    target: &Target,
    prefetch: usize,
    budget: &ByteBudget,
) -> Result<Merged<Deliveries>> {
    let server = target.server.clone().unwrap_or_default();
    let mut pulls = Merged::new();
    let stream = ensure_stream(js, config, StreamKind::Casts, exchange).await?;
    for address in [
        rpc_core::Address::Topic {
            exchange: exchange.to_owned(),
            topic: target.topic.clone(),
        },
        rpc_core::Address::Server {
            exchange: exchange.to_owned(),
            topic: target.topic.clone(),
            server: server.clone(),
        },
    ] {
        let Some(subject) = config.jetstream_subject(&address) else {
            continue;
        };
        NatsConfig::check_subject(&subject, target)?;
        let durable = config.jetstream_durable(&subject);
        let consumer = jetstream::consumer::pull::Config {
            durable_name: Some(durable),
            filter_subject: subject,
            ack_wait: config.ack_wait,
            // The consumer is shared by every server of the subject and
            // removed once none has pulled for a while.
            inactive_threshold: inactive_threshold(config),
            ..Default::default()
        };
        let place = (StreamKind::Casts, exchange);
        pulls.push(pull(js, config, place, &stream, consumer, prefetch, budget).await?);
    }
    Ok(pulls)
}

/// The notifications a listener takes ([`rpc_core::NotificationSource`]): for each of
/// its routes (exchange and `<topic>.<priority>`), a pull loop on the durable consumer
/// of the route's subject that the listener's group shares, pulled no faster than
/// `budget` has room.
///
/// The default group's consumer (`pool` `None`) is made with
/// [`jetstream::consumer::DeliverPolicy::All`]: it takes every notification of its
/// subject the stream holds, those sent before any listener included. A pool's is made
/// with `New` when the pool first listens: it takes what is sent from then on. Both
/// go once no listener has pulled for `max_age` (1 h at least), so a consumer made
/// again finds only notifications nobody took (the stream keeps them `max_age`).
pub(crate) async fn notification_pulls(
    js: &jetstream::Context,
    config: &NatsConfig,
    source: &rpc_core::NotificationSource,
    prefetch: usize,
    budget: &ByteBudget,
) -> Result<Merged<Deliveries>> {
    let mut pulls = Merged::new();
    let mut streams: Vec<(String, jetstream::stream::Stream<()>)> = Vec::new();
    let mut subjects: Vec<String> = Vec::new();
    for (exchange, key) in source.routes() {
        let subject = config.notification_subject(exchange, key);
        let address = rpc_core::Address::Notification {
            exchange: exchange.to_owned(),
            key: key.to_owned(),
        };
        NatsConfig::check_subject(&subject, &address)?;
        // One pull per subject: a route listed twice is taken once.
        if subjects.contains(&subject) {
            continue;
        }
        subjects.push(subject.clone());
        let stream = match streams.iter().find(|(e, _)| e == exchange) {
            Some((_, stream)) => stream.clone(),
            None => {
                let stream = ensure_stream(js, config, StreamKind::Notifications, exchange)
                    .await
                    .map_err(needs_jetstream)?;
                streams.push((exchange.to_owned(), stream.clone()));
                stream
            }
        };
        let durable = config.notification_durable(&subject, source.pool.as_deref());
        let deliver_policy = if source.pool.is_some() {
            jetstream::consumer::DeliverPolicy::New
        } else {
            jetstream::consumer::DeliverPolicy::All
        };
        let consumer = jetstream::consumer::pull::Config {
            durable_name: Some(durable),
            filter_subject: subject,
            deliver_policy,
            ack_wait: config.ack_wait,
            inactive_threshold: inactive_threshold(config),
            ..Default::default()
        };
        let place = (StreamKind::Notifications, exchange);
        let pulled = pull(js, config, place, &stream, consumer, prefetch, budget).await;
        pulls.push(pulled.map_err(needs_jetstream)?);
    }
    Ok(pulls)
}

/// The error saying JetStream is off ([`crate::stream::not_enabled`]) said for
/// notifications, which always go through JetStream: connecting without
/// `jetstream=true` is no way out for them. Other errors are kept as they are.
pub(crate) fn needs_jetstream(err: Error) -> Error {
    match err {
        Error::Transport {
            kind: TransportErrorKind::Refused,
            message,
            source,
        } if message.contains(crate::stream::NOT_ENABLED) => Error::Transport {
            kind: TransportErrorKind::Refused,
            message: "notifications need JetStream, which is not enabled on this NATS server \
                      (or for this account): no responders on $JS.API; start nats-server \
                      with -js"
                .to_owned(),
            source,
        },
        other => other,
    }
}

/// How long a durable consumer nobody pulls from is kept: `max_age` (1 h at least).
fn inactive_threshold(config: &NatsConfig) -> Duration {
    config
        .max_age
        .unwrap_or(DEFAULT_MAX_AGE)
        .max(Duration::from_secs(3600))
}

/// A pull loop on the durable consumer `consumer` (created when missing) of the
/// stream of `place` (its kind and exchange).
async fn pull(
    js: &jetstream::Context,
    config: &NatsConfig,
    (kind, exchange): (StreamKind, &str),
    stream: &jetstream::stream::Stream<()>,
    consumer: jetstream::consumer::pull::Config,
    prefetch: usize,
    budget: &ByteBudget,
) -> Result<Deliveries> {
    let client = js.client();
    let inbox = async_nats::Subject::from(client.new_inbox());
    let subscriber = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| nats_error("subscribing", e))?;
    let mut source = PullSource {
        js: js.clone(),
        nats: config.clone(),
        kind,
        exchange: exchange.to_owned(),
        failures: 0,
        stream: stream.clone(),
        config: consumer,
        // Small batches: a busy consumer must not sit on messages others sharing
        // the durable could take (they would be redelivered after ack_wait).
        batch: prefetch.clamp(1, 4),
        budget: budget.clone(),
        consumer: None,
        inbox,
        subscriber,
        pending: None,
        need: 0,
    };
    source.consumer = Some(source.consumer().await?);
    Ok(pulled(source))
}

/// How long one pull request waits on the server. Short, so a request the server
/// dropped (its inbox lost interest during a disconnect) is replaced soon.
const PULL_EXPIRES: Duration = Duration::from_secs(10);
/// Idle heartbeat asked of the server while a pull request waits; two missed
/// heartbeats mean the request is gone and a new one is sent.
const PULL_HEARTBEAT: Duration = Duration::from_secs(1);
/// Pauses between attempts to create a deleted consumer again: 0.5 s doubling up to
/// 10 s. Without jitter: the servers sharing a consumer recreate it idempotently.
const PULL_BACKOFF: Backoff =
    Backoff::new(Duration::from_millis(500), Duration::from_secs(10)).jitter(Jitter::None);
/// Pause before pulling again after a pull failed to start or the server refused it.
const PULL_RETRY: Duration = PULL_BACKOFF.first();
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
    /// What the stream holds, and of which exchange.
    kind: StreamKind,
    exchange: String,
    stream: jetstream::stream::Stream<()>,
    config: jetstream::consumer::pull::Config,
    batch: usize,
    /// Failed attempts to create the consumer again since it last worked
    /// ([`PULL_BACKOFF`]).
    failures: u32,
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
                self.stream =
                    ensure_stream(&self.js, &self.nats, self.kind, &self.exchange).await?;
                self.stream
                    .get_or_create_consumer(&durable, self.config.clone())
                    .await
                    .map_err(|e| {
                        nats_error(&format!("creating the JetStream consumer {durable}"), e)
                    })?
            }
        };
        self.failures = 0;
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
                        TransportErrorKind::Other,
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
                    TransportErrorKind::Other,
                    "JetStream pull: no responders (creating the consumer again)",
                )));
            }
            other => {
                self.pending = None;
                tokio::time::sleep(PULL_RETRY).await;
                return Some(Err(Error::transport_msg(
                    TransportErrorKind::Other,
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
                tokio::time::sleep(PULL_BACKOFF.delay(source.failures)).await;
                match source.consumer().await {
                    Ok(fresh) => {
                        source.consumer = Some(fresh);
                        source.pending = None;
                    }
                    Err(err) => {
                        source.failures = source.failures.saturating_add(1);
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

/// Settles a JetStream cast.
struct JetStreamAcker {
    message: jetstream::Message,
}

#[async_trait]
impl Acker for JetStreamAcker {
    async fn ack(self: Box<Self>) -> Result<()> {
        (self.message.ack().await)
            .map_err(|e| boxed_nats_error(format!("JetStream ack failed: {e}"), e))
    }

    async fn reject(self: Box<Self>, requeue: bool) -> Result<()> {
        let kind = if requeue {
            AckKind::Nak(None)
        } else {
            AckKind::Term
        };
        (self.message.ack_with(kind).await)
            .map_err(|e| boxed_nats_error(format!("JetStream reject failed: {e}"), e))
    }
}
