//! The AMQP 0-9-1 transport of mqrpc (RabbitMQ, through lapin), byte-compatible with
//! oslo.messaging's rabbit driver: same exchanges, queues, bindings, message
//! properties and body format, so Rust and Python services share a deployment.
//!
//! - Publisher confirms on every publish, pipelined on one channel; calls carry an
//!   AMQP `expiration` equal to their timeout; replies go through the default exchange
//!   with `mandatory`, and a returned reply fails with `Error::Undeliverable`.
//! - Requests to a topic or a server are `mandatory` too: one that no queue takes (no
//!   server has ever listened there) fails at once with `Error::NoResponders`. A
//!   fanout cast with no server is not an error (as in oslo.messaging).
//! - Replies go only to queues named as oslo.messaging and mqrpc name reply queues
//!   (`reply_` and 32 lowercase hex digits) or that the URL allows
//!   ([`ReplyQueues`]): the default exchange reaches every queue by name.
//! - Servers consume `<topic>`, `<topic>.<server>` and a fanout queue of their own on
//!   one channel with `basic.qos` bounded by their concurrency limit, and lowered when
//!   deliveries are big so that what the broker pushes stays near the server's byte
//!   budget (see `ListenOptions::budget`).
//! - Notifications follow oslo.messaging's topology: a notifier publishes to the
//!   control exchange with key `<topic>.<priority>` (persistent, confirmed) after
//!   declaring the queue named after the key and binding it (once per key and
//!   channel), so the default group's copy is kept before any listener; a listener
//!   reads the queue of each of its keys, or with a pool the queue named exactly after
//!   the pool, bound to every key. Both are durable and quorum as topic queues are,
//!   with no `x-expires`. Deliveries are acked once handled; a requeue is a
//!   `basic.reject` with requeue.
//! - A lost connection is noticed (AMQP heartbeats, socket errors), re-opened with
//!   capped exponential backoff and jitter across the URL's hosts, and every exchange,
//!   queue, binding and consumer is declared again.
//! - Every connection attempt (TCP, TLS, AMQP handshake) is bounded by the URL's
//!   `connect_timeout` (default 10 s).
//! - A publish the broker nacks (a quorum queue electing a leader, a full queue with
//!   `reject-publish`) is tried again a few times within its time to live, each try
//!   expiring when the first would have. This is at-least-once, not exactly-once: a
//!   nacked message may still have been enqueued, and its new copy may be taken by
//!   another server of the topic, which then runs the cast or call a second time
//!   (a server drops only the copies it has seen itself, by `_unique_id`).
//!
//! lapin logs every message the broker returns at WARN with its whole body as
//! decimal bytes (target `lapin::returned_messages`, whatever the application does
//! with returns), every frame it receives at TRACE, message bodies included (target
//! `lapin::channels`), and every frame it sends at TRACE, the connection's
//! credentials included (target `lapin::io_loop`, the `connection.start-ok`
//! frame). mqrpc handles returned messages itself and logs them without content, so
//! keep those lines out: add `lapin=info,lapin::returned_messages=error` (or simply
//! `lapin=error`) to a `tracing_subscriber::EnvFilter` (a directive naming a target
//! wins over a bare level such as `trace`). lapin logs them from its own I/O thread,
//! so only a global subscriber sees them.
//!
//! ```no_run
//! # async fn demo() -> mqrpc::Result<()> {
//! let transport = mqrpc::AmqpTransport::connect("rabbit://guest:guest@127.0.0.1:5672/").await?;
//! # let _ = transport; Ok(()) }
//! ```

#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod compression;
mod config;
mod consumer;
mod error;
mod link;
mod publisher;
mod reply_queues;
mod topology;

use std::sync::Arc;

use async_trait::async_trait;
use rpc_core::{
    Capabilities, Consumer, Error, ListenOptions, NotificationSource, Publisher, ReplyQueue,
    Result, Target, Transport,
};

pub use compression::Compression;
pub use config::{
    AmqpConfig, DEFAULT_HEARTBEAT, DEFAULT_MAX_BACKOFF, DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_RESUBSCRIBE_TIMEOUT, DEFAULT_TRANSIENT_TTL, Host,
};
pub use reply_queues::ReplyQueues;

use consumer::{AmqpConsumer, Subscription};
use link::Link;
use publisher::AmqpPublisher;

/// A connection to RabbitMQ. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct AmqpTransport {
    link: Arc<Link>,
    publisher: Arc<AmqpPublisher>,
}

impl std::fmt::Debug for AmqpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpTransport")
            .field("connection", &self.link.name())
            .field("config", &self.link.config)
            .finish()
    }
}

impl AmqpTransport {
    /// Connects to the broker of an `amqp://`, `amqps://` or `rabbit://` URL (see
    /// [`AmqpConfig::parse`]). Fails when no host of the URL answers.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::with_config(AmqpConfig::parse(url)?).await
    }

    /// Connects with a parsed configuration.
    pub async fn with_config(config: AmqpConfig) -> Result<Self> {
        let link = Link::open(config).await?;
        Ok(AmqpTransport {
            publisher: Arc::new(AmqpPublisher::new(link.clone())),
            link,
        })
    }

    /// The connection name the broker shows (`rabbitmqctl list_connections name`).
    pub fn connection_name(&self) -> &str {
        self.link.name()
    }

    /// How many connections this transport has opened: 1, plus one per reconnection.
    pub fn connections_opened(&self) -> usize {
        self.link.connections_opened()
    }

    /// The prefetch of a consumer: the URL's `prefetch`, or the consumer's
    /// concurrency.
    fn prefetch(&self, options: &ListenOptions) -> u16 {
        self.link
            .config
            .prefetch
            .unwrap_or_else(|| u16::try_from(options.prefetch.max(1)).unwrap_or(u16::MAX))
    }

    /// Closes the connection. Publishes then fail with `Error::Closed` and consumers
    /// of this transport end (`recv` returns `None`).
    pub async fn close(&self) {
        self.link.close().await;
    }
}

#[async_trait]
impl Transport for AmqpTransport {
    fn name(&self) -> &'static str {
        "amqp"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
            .keeps_messages_without_listener(true)
            .reports_no_responders(true)
            .redelivers_unacked(true)
            .max_message_size(Some(self.link.config.max_message_size))
            .notifications(true)
    }

    fn default_exchange(&self) -> &str {
        &self.link.config.exchange
    }

    fn describe(&self) -> String {
        let config = &self.link.config;
        let hosts: Vec<String> = config.hosts.iter().map(ToString::to_string).collect();
        format!("amqp {} vhost {:?}", hosts.join(","), config.vhost)
    }

    async fn publisher(&self) -> Result<Arc<dyn Publisher>> {
        Ok(self.publisher.clone())
    }

    async fn listen(&self, target: &Target, options: &ListenOptions) -> Result<Box<dyn Consumer>> {
        target.validate_for_listen()?;
        let prefetch = self.prefetch(options);
        let subscription = Subscription::Server {
            exchange: target.exchange_or(self.default_exchange()).to_owned(),
            topic: target.topic.clone(),
            server: target.server.clone().unwrap_or_default(),
            fanout_queue: topology::fanout_queue(&target.topic),
            prefetch,
        };
        let consumer = AmqpConsumer::start(
            self.link.clone(),
            subscription,
            options.settle_on_receipt,
            Some(options.budget.clone()),
            Some(options.status.connection()),
        )
        .await?;
        Ok(Box::new(consumer))
    }

    async fn listen_notifications(
        &self,
        source: &NotificationSource,
        options: &ListenOptions,
    ) -> Result<Box<dyn Consumer>> {
        let mut routes: Vec<(String, String)> = Vec::new();
        for (exchange, key) in source.routes() {
            let route = (exchange.to_owned(), key.to_owned());
            if !routes.contains(&route) {
                routes.push(route);
            }
        }
        if routes.is_empty() {
            return Err(Error::InvalidArguments(
                "a notification listener needs at least one notification address".to_owned(),
            ));
        }
        if source.pool.as_deref().is_some_and(str::is_empty) {
            // An empty queue name asks RabbitMQ for a fresh server-named queue.
            return Err(Error::InvalidArguments(
                "a notification pool needs a name".to_owned(),
            ));
        }
        let subscription = Subscription::Notifications {
            routes,
            pool: source.pool.clone(),
            prefetch: self.prefetch(options),
        };
        let consumer = AmqpConsumer::start(
            self.link.clone(),
            subscription,
            options.settle_on_receipt,
            None,
            Some(options.status.connection()),
        )
        .await?;
        Ok(Box::new(consumer))
    }

    async fn monitor(&self, target: &Target) -> Result<Box<dyn Consumer>> {
        let subscription = Subscription::Monitor {
            exchange: target.exchange_or(self.default_exchange()).to_owned(),
            topic: target.topic.clone(),
            queue: format!("mqrpc-listen-{}", rpc_core::wire::new_id()),
        };
        let consumer =
            AmqpConsumer::start(self.link.clone(), subscription, false, None, None).await?;
        Ok(Box::new(consumer))
    }

    async fn reply_queue(&self) -> Result<ReplyQueue> {
        let queue = topology::reply_queue();
        let subscription = Subscription::Reply {
            queue: queue.clone(),
        };
        let consumer =
            AmqpConsumer::start(self.link.clone(), subscription, false, None, None).await?;
        Ok(ReplyQueue::new(queue, consumer))
    }
}
