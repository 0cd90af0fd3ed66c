//! Consumers: a server's queue-group subscriptions (topic and its own subject), its
//! plain fanout subscription and, in JetStream mode, its pull consumers for casts;
//! a client's single wildcard inbox subscription.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::consumer::pull::MessagesErrorKind;
use async_nats::jetstream::{self, AckKind};
use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use rpc_core::transport::Merged;
use rpc_core::wire::{Reply, encode_reply};
use rpc_core::{
    Acker, Consumer, Delivery, Error, NO_RESPONDERS_CLASS, NoAck, RemoteError, Result,
    TRANSPORT_FAILURE_MODULE, Target,
};

use crate::config::{NatsConfig, name_safe};
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

/// A server's subscriptions, merged.
pub(crate) struct ServerConsumer {
    streams: Merged<Deliveries>,
    shared: Arc<Shared>,
    slow_seen: u64,
    stopped: bool,
}

fn plain(subscriber: async_nats::Subscriber) -> Deliveries {
    subscriber
        .map(|message| Ok(Delivery::new(message.payload, Box::new(NoAck))))
        .boxed()
}

/// How long one pull request waits on the server. Short, so a request the server
/// dropped (its inbox lost interest during a disconnect) is replaced soon.
const PULL_EXPIRES: Duration = Duration::from_secs(10);
/// Idle heartbeat asked of the server while a pull request waits; two missed
/// heartbeats mean the request is gone and the pull is started again.
const PULL_HEARTBEAT: Duration = Duration::from_secs(1);
/// Pause before starting a pull again after it failed to start, and the first pause
/// before creating a deleted consumer again.
const PULL_RETRY: Duration = Duration::from_millis(500);
/// The longest pause between attempts to create a consumer again.
const PULL_RETRY_MAX: Duration = Duration::from_secs(10);

/// Where a server pulls casts from: a durable consumer of the exchange's stream.
struct PullSource {
    js: jetstream::Context,
    nats: NatsConfig,
    exchange: String,
    stream: jetstream::stream::Stream,
    config: jetstream::consumer::pull::Config,
    batch: usize,
    /// Pause before the next attempt to create the consumer again.
    retry: Duration,
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

    async fn pull(
        &self,
        consumer: &jetstream::consumer::PullConsumer,
    ) -> Result<jetstream::consumer::pull::Stream> {
        consumer
            .stream()
            .max_messages_per_batch(self.batch)
            .expires(PULL_EXPIRES)
            .heartbeat(PULL_HEARTBEAT)
            .messages()
            .await
            .map_err(|e| nats_error("starting a JetStream pull", e))
    }
}

/// What a JetStream pull needs next.
enum PullState {
    /// Pulling.
    Pulling(Box<jetstream::consumer::pull::Stream>),
    /// Start a new pull from the consumer.
    Restart,
    /// The consumer is gone (deleted, or the server answers no one): create it again.
    Recreate,
}

/// The casts of one JetStream consumer, pulled in batches.
///
/// async-nats renews its pull request when the client reconnects, but it can miss a
/// quick disconnect and reconnect, and the server drops a pull request whose inbox lost
/// interest: the pull would then wait out its expiry while casts sit in the stream.
/// Heartbeats reveal that, and the pull is started afresh; it is also started
/// again if it ends, and the consumer is created again if it was deleted. Messages
/// delivered to an abandoned pull and not yet acked are redelivered after `ack_wait`.
fn pulled(source: PullSource, consumer: jetstream::consumer::PullConsumer) -> Deliveries {
    let state = (source, consumer, PullState::Restart);
    futures::stream::unfold(state, |(mut source, mut consumer, mut state)| async move {
        loop {
            match state {
                PullState::Recreate => {
                    tokio::time::sleep(source.retry).await;
                    match source.consumer().await {
                        Ok(fresh) => {
                            consumer = fresh;
                            state = PullState::Restart;
                        }
                        Err(err) => {
                            source.retry = (source.retry * 2).min(PULL_RETRY_MAX);
                            return Some((Err(err), (source, consumer, state)));
                        }
                    }
                }
                PullState::Restart => match source.pull(&consumer).await {
                    Ok(pull) => state = PullState::Pulling(Box::new(pull)),
                    Err(err) => {
                        tokio::time::sleep(PULL_RETRY).await;
                        return Some((Err(err), (source, consumer, state)));
                    }
                },
                PullState::Pulling(ref mut pull) => match pull.next().await {
                    Some(Ok(message)) => {
                        let payload = message.payload.clone();
                        let delivery = Delivery::new(payload, Box::new(JetStreamAcker { message }));
                        return Some((Ok(delivery), (source, consumer, state)));
                    }
                    Some(Err(e)) if e.kind() == MessagesErrorKind::MissingHeartbeat => {
                        tracing::debug!("JetStream pull missed its heartbeats; pulling afresh");
                        state = PullState::Restart;
                    }
                    Some(Err(e))
                        if matches!(
                            e.kind(),
                            MessagesErrorKind::ConsumerDeleted | MessagesErrorKind::NoResponders
                        ) =>
                    {
                        state = PullState::Recreate;
                        let err = nats_error("JetStream pull (creating the consumer again)", e);
                        return Some((Err(err), (source, consumer, state)));
                    }
                    Some(Err(e)) => {
                        // The pull goes on after other errors; the server logs them.
                        let err = nats_error("JetStream pull", e);
                        return Some((Err(err), (source, consumer, state)));
                    }
                    None => {
                        tracing::debug!("JetStream pull ended; pulling afresh");
                        state = PullState::Recreate;
                    }
                },
            }
        }
    })
    .boxed()
}

impl ServerConsumer {
    pub(crate) async fn start(
        shared: Arc<Shared>,
        target: &Target,
        prefetch: usize,
    ) -> Result<Self> {
        let config = &shared.config;
        let client = &shared.client;
        let exchange = target.exchange_or(&config.exchange).to_owned();
        let server = target.server.clone().unwrap_or_default();
        let subscribe_error = |e| nats_error("subscribing", e);
        let topic = client
            .queue_subscribe(
                config.topic_subject(&exchange, &target.topic),
                QUEUE_GROUP.to_owned(),
            )
            .await
            .map_err(subscribe_error)?;
        let direct = client
            .queue_subscribe(
                config.server_subject(&exchange, &target.topic, &server),
                QUEUE_GROUP.to_owned(),
            )
            .await
            .map_err(subscribe_error)?;
        let fanout = client
            .subscribe(config.fanout_subject(&exchange, &target.topic))
            .await
            .map_err(subscribe_error)?;
        let mut streams = Merged::new();
        for subscriber in [topic, direct, fanout] {
            streams.push(plain(subscriber));
        }
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
                let durable = name_safe(&subject);
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
                    batch: prefetch.clamp(1, 4),
                };
                let consumer = source.consumer().await?;
                streams.push(pulled(source, consumer));
            }
        }
        // Once the server has processed the subscriptions, messages sent from any
        // connection reach this consumer.
        crate::round_trip(client, config).await?;
        let slow_seen = shared.slow_consumers.load(Ordering::Relaxed);
        Ok(ServerConsumer {
            streams,
            shared,
            slow_seen,
            stopped: false,
        })
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
                "NATS slow consumer: the client dropped messages it could not buffer \
                 (raise subscription_capacity or the server's concurrency)",
            )));
        }
        self.streams.next().await
    }

    async fn stop(&mut self) -> Result<()> {
        self.stopped = true;
        // Dropping a subscriber unsubscribes it; dropping a pull stream stops pulling.
        self.streams = Merged::new();
        // Bounded: while the connection is down the client does not flush at all.
        let _ = tokio::time::timeout(crate::ROUND_TRIP_LIMIT, self.shared.client.flush()).await;
        Ok(())
    }

    async fn close(&mut self) -> Result<()> {
        // Replies of the last handlers may still sit in the client's write buffer;
        // the connection can go away with the server right after this.
        match tokio::time::timeout(crate::ROUND_TRIP_LIMIT, self.shared.client.flush()).await {
            Ok(flushed) => flushed.map_err(|e| nats_error("flushing the last replies", e)),
            Err(_) => Err(Error::transport_msg(
                "the last replies could not be flushed (disconnected)",
            )),
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
impl Consumer for ReplyConsumer {
    async fn recv(&mut self) -> Option<Result<Delivery>> {
        let message = self.subscriber.next().await?;
        let no_responders = message.status == Some(async_nats::StatusCode::NO_RESPONDERS);
        if let Some(msg_id) = message
            .subject
            .as_str()
            .strip_prefix(&self.no_responders_prefix)
            .filter(|_| no_responders)
        {
            // The server's answer to a call nobody listened for: a failure for that call.
            let mut failure = RemoteError::new(
                NO_RESPONDERS_CLASS,
                "no server listens on the call's subject",
            )
            .with_module(TRANSPORT_FAILURE_MODULE);
            // The client names the call's target in the error.
            failure.args = Vec::new();
            return Some(
                encode_reply(&Reply::failure(msg_id, failure))
                    .map(|body| Delivery::new(body, Box::new(NoAck)))
                    .map_err(Error::from),
            );
        }
        Some(Ok(Delivery::new(message.payload, Box::new(NoAck))))
    }

    async fn stop(&mut self) -> Result<()> {
        let _ = self.subscriber.unsubscribe().await;
        Ok(())
    }
}

/// Settles a JetStream cast.
struct JetStreamAcker {
    message: jetstream::Message,
}

#[async_trait]
impl Acker for JetStreamAcker {
    async fn ack(self: Box<Self>) -> Result<()> {
        self.message
            .ack()
            .await
            .map_err(|e| Error::transport_msg(format!("JetStream ack failed: {e}")))
    }

    async fn reject(self: Box<Self>, requeue: bool) -> Result<()> {
        let kind = if requeue {
            AckKind::Nak(None)
        } else {
            AckKind::Term
        };
        self.message
            .ack_with(kind)
            .await
            .map_err(|e| Error::transport_msg(format!("JetStream reject failed: {e}")))
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
