//! The backend SPI: what a broker must do for mqrpc. A backend routes opaque bytes
//! to addresses and acknowledges deliveries; everything else (encoding, timeouts,
//! dispatch, heartbeats, limits) is written once in this crate.
//!
//! The traits are object-safe, so a transport chosen at run time is an
//! `Arc<dyn Transport>`.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use std::sync::Arc;

use crate::budget::{ByteBudget, Charge};
use crate::error::Result;
pub use crate::health::{ConnectionStatus, ConsumerStatus};
use crate::target::Target;

/// Where a message is sent.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Address {
    /// The shared queue of a topic: one of its servers gets the message.
    Topic {
        /// Exchange (scope) of the topic.
        exchange: String,
        /// The topic.
        topic: String,
    },
    /// The queue of one named server of a topic.
    Server {
        /// Exchange (scope) of the topic.
        exchange: String,
        /// The topic.
        topic: String,
        /// The server.
        server: String,
    },
    /// Every server of a topic gets a copy.
    Fanout {
        /// Exchange (scope) of the topic.
        exchange: String,
        /// The topic.
        topic: String,
    },
    /// A client's private reply queue, by the address its transport gave it.
    Reply(String),
    /// The notifications of one routing key, `<topic>.<priority>`
    /// (`notifications.info`), in an exchange: every pool of listeners of the key
    /// gets a copy, kept until a member of the pool takes it.
    Notification {
        /// Exchange (scope) of the notifications.
        exchange: String,
        /// `<topic>.<priority>`.
        key: String,
    },
}

impl Address {
    /// The address a target sends to (fanout, then server, then topic), using
    /// `default_exchange` when the target names none.
    pub fn for_target(target: &Target, default_exchange: &str) -> Address {
        let exchange = target.exchange_or(default_exchange).to_owned();
        let topic = target.topic.clone();
        if target.fanout {
            Address::Fanout { exchange, topic }
        } else if let Some(server) = &target.server {
            Address::Server {
                exchange,
                topic,
                server: server.clone(),
            }
        } else {
            Address::Topic { exchange, topic }
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Topic { exchange, topic } => write!(f, "{exchange}/{topic}"),
            Address::Server {
                exchange,
                topic,
                server,
            } => write!(f, "{exchange}/{topic}.{server}"),
            Address::Fanout { exchange, topic } => write!(f, "{exchange}/{topic}_fanout"),
            Address::Reply(queue) => write!(f, "reply queue {queue}"),
            Address::Notification { exchange, key } => {
                write!(f, "{exchange}/{key} (notifications)")
            }
        }
    }
}

/// An encoded message with its delivery hints.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The encoded body (see [`crate::wire`]).
    pub body: Bytes,
    /// How long the message is worth delivering (calls: the call timeout). Brokers
    /// that support it drop the message after that.
    pub time_to_live: Option<Duration>,
    /// Fail with [`crate::Error::Undeliverable`] when no queue takes the message
    /// (used for replies).
    pub mandatory: bool,
    /// Set on a call's request: where its replies go and under which `_msg_id`, for
    /// transports that report a missing listener through the reply path (NATS "no
    /// responders").
    pub call: Option<CallHint>,
}

/// The reply address and correlation id of a call, as the request carries them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallHint {
    /// The caller's reply address (`_reply_q`).
    pub reply_to: Arc<str>,
    /// The call's `_msg_id`.
    pub msg_id: Arc<str>,
}

impl Outgoing {
    /// A message with no hints.
    pub fn new(body: impl Into<Bytes>) -> Self {
        Outgoing {
            body: body.into(),
            time_to_live: None,
            mandatory: false,
            call: None,
        }
    }
}

/// What a transport can and cannot do; the conformance suite reads it to decide which
/// cases apply, and rpc-core reads `max_message_size`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// A message sent to a topic or server queue while no server listens is kept and
    /// delivered once one listens (AMQP queues, Redis streams, the memory bus).
    pub keeps_messages_without_listener: bool,
    /// A send to an address nobody listens on fails at once with
    /// [`crate::Error::NoResponders`] (NATS).
    pub reports_no_responders: bool,
    /// A delivery that was neither acked nor rejected when its consumer went away is
    /// delivered again (the at-least-once path of `AckMode::AfterHandling`).
    pub redelivers_unacked: bool,
    /// The largest encoded message the transport carries, if it has a limit.
    pub max_message_size: Option<usize>,
    /// Notifications are sent and listened to
    /// ([`Transport::listen_notifications`], [`Address::Notification`]).
    pub notifications: bool,
}

impl Default for Capabilities {
    fn default() -> Self {
        Capabilities {
            keeps_messages_without_listener: true,
            reports_no_responders: false,
            redelivers_unacked: true,
            max_message_size: None,
            notifications: false,
        }
    }
}

impl Capabilities {
    /// Sets `keeps_messages_without_listener`.
    pub fn keeps_messages_without_listener(mut self, value: bool) -> Self {
        self.keeps_messages_without_listener = value;
        self
    }

    /// Sets `reports_no_responders`.
    pub fn reports_no_responders(mut self, value: bool) -> Self {
        self.reports_no_responders = value;
        self
    }

    /// Sets `redelivers_unacked`.
    pub fn redelivers_unacked(mut self, value: bool) -> Self {
        self.redelivers_unacked = value;
        self
    }

    /// Sets `max_message_size`.
    pub fn max_message_size(mut self, value: Option<usize>) -> Self {
        self.max_message_size = value;
        self
    }

    /// Sets `notifications`.
    pub fn notifications(mut self, value: bool) -> Self {
        self.notifications = value;
        self
    }
}

/// How a server's consumer should be set up.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ListenOptions {
    /// At most this many deliveries handed out and not yet acked (AMQP prefetch).
    pub prefetch: usize,
    /// The server acks every delivery on receipt, before handling it (at-most-once).
    /// A transport whose ack costs a broker round trip may then take deliveries as
    /// settled when it reads them (Redis `XREADGROUP ... NOACK`), so no round trip
    /// stands between a request and its handler. Default false.
    pub settle_on_receipt: bool,
    /// The server's budget of bytes for deliveries taken and not yet handled. A
    /// consumer charges each message it reads against it
    /// ([`ByteBudget::charge`], handed on with [`Delivery::with_charge`]) and takes
    /// fewer messages from the broker, or none, while it is exhausted; where the
    /// broker keeps messages they wait there. Default: a budget of
    /// [`crate::DEFAULT_MAX_PENDING_BYTES`] of its own.
    pub budget: ByteBudget,
    /// Where the consumer reports its connections, shared with the server, whose
    /// health it makes ([`crate::Health`]): a consumer takes a
    /// [`ConsumerStatus::connection`] for each connection it reads from and says
    /// when one is lost and when it is restored, subscriptions included. A consumer
    /// whose connection cannot be lost reports nothing. Default: a status of its own.
    pub status: ConsumerStatus,
}

impl ListenOptions {
    /// Options with the given prefetch.
    pub fn new(prefetch: usize) -> Self {
        ListenOptions {
            prefetch,
            settle_on_receipt: false,
            budget: ByteBudget::default(),
            status: ConsumerStatus::new(),
        }
    }

    /// Shares `status` with the consumer (see [`ListenOptions::status`]).
    pub fn status(mut self, status: ConsumerStatus) -> Self {
        self.status = status;
        self
    }

    /// Shares `budget` with the consumer (see [`ListenOptions::budget`]).
    pub fn budget(mut self, budget: ByteBudget) -> Self {
        self.budget = budget;
        self
    }

    /// Deliveries count as settled once read (see [`ListenOptions::settle_on_receipt`]).
    pub fn settle_on_receipt(mut self, yes: bool) -> Self {
        self.settle_on_receipt = yes;
        self
    }
}

/// What a notification listener takes: the notifications of some addresses, as a
/// member of a pool or of the default group.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct NotificationSource {
    /// The [`Address::Notification`]s to take notifications from.
    pub addresses: Vec<Address>,
    /// The pool: the listeners of one pool share its copy of each notification.
    /// `None` is the default group, whose copy the broker keeps from the first send,
    /// even before any listener (on AMQP the queue named after the key, which the
    /// notifier declares). A pool's copies are kept from when the pool first listens.
    pub pool: Option<String>,
}

impl NotificationSource {
    /// The notifications of `addresses`, for `pool` (`None`: the default group).
    pub fn new(addresses: Vec<Address>, pool: Option<String>) -> Self {
        NotificationSource { addresses, pool }
    }

    /// The exchange and key of each address (addresses of other kinds are left out).
    pub fn routes(&self) -> impl Iterator<Item = (&str, &str)> {
        self.addresses.iter().filter_map(|address| match address {
            Address::Notification { exchange, key } => Some((exchange.as_str(), key.as_str())),
            _ => None,
        })
    }
}

/// A connection to a broker (or to the in-process bus).
#[async_trait]
pub trait Transport: Send + Sync + fmt::Debug + 'static {
    /// Short backend name (`memory`, `amqp`, `redis`, `nats`) for logs and tests.
    fn name(&self) -> &'static str;

    /// What this transport can do.
    fn capabilities(&self) -> Capabilities;

    /// Where this transport connects, without credentials, for errors and logs
    /// (`amqp 127.0.0.1:5672/`, `nats nats://h1:4222`, ...).
    fn describe(&self) -> String {
        self.name().to_owned()
    }

    /// The exchange used when a target names none.
    fn default_exchange(&self) -> &str {
        crate::target::DEFAULT_EXCHANGE
    }

    /// A handle for sending; cheap to clone and safe to share between tasks.
    async fn publisher(&self) -> Result<Arc<dyn Publisher>>;

    /// Starts consuming, for a server, its three addresses at once: the topic's shared
    /// queue, its own `topic.server` queue and the topic's fanout. When this returns,
    /// messages sent to those addresses reach the consumer.
    async fn listen(&self, target: &Target, options: &ListenOptions) -> Result<Box<dyn Consumer>>;

    /// Creates a private reply queue for one client.
    async fn reply_queue(&self) -> Result<ReplyQueue>;

    /// Subscribes to notifications ([`NotificationSource`]); each delivery is acked
    /// once handled or rejected (with `requeue` to be delivered again). A send to an
    /// [`Address::Notification`] must keep a copy for the default group (and for
    /// every pool that has listened) until one of its listeners takes it. Backends
    /// without notifications keep this default, which says so.
    async fn listen_notifications(
        &self,
        source: &NotificationSource,
        options: &ListenOptions,
    ) -> Result<Box<dyn Consumer>> {
        let _ = (source, options);
        Err(crate::error::Error::Unsupported(format!(
            "the {} backend has no notifications",
            self.name()
        )))
    }

    /// Watches a topic without taking part: a copy of what is sent to the topic, to
    /// its servers and to its fanout from now on, while servers still get every
    /// message as before (what `mqrpc listen` prints). Deliveries need no settling.
    async fn monitor(&self, target: &Target) -> Result<Box<dyn Consumer>> {
        let _ = target;
        Err(crate::Error::Unsupported(format!(
            "the {} transport cannot watch a topic",
            self.name()
        )))
    }
}

/// Sends encoded messages.
#[async_trait]
pub trait Publisher: Send + Sync + 'static {
    /// Sends one message; returns once the broker has accepted it (confirmed where the
    /// broker has confirms). Dropping the future may or may not have sent it.
    async fn send(&self, address: &Address, message: Outgoing) -> Result<()>;
}

/// A stream of deliveries.
#[async_trait]
pub trait Consumer: Send + 'static {
    /// The next delivery. `None` means the consumer is finished for good; `Some(Err)`
    /// reports a problem the consumer could not hide while it keeps trying.
    ///
    /// Cancel-safe: dropping the future loses no message.
    async fn recv(&mut self) -> Option<Result<Delivery>>;

    /// Stops taking new deliveries while letting deliveries already handed out be
    /// acked or rejected. Messages not yet handed out stay with the broker.
    async fn stop(&mut self) -> Result<()>;

    /// Deliveries this consumer already settled with the broker (a consumer told to
    /// [`ListenOptions::settle_on_receipt`] may settle several at once, as it reads
    /// them) but had not handed out when [`Consumer::stop`] came. They are no longer
    /// the broker's to deliver again, so the server runs them in its grace period, as
    /// if taken before the stop. Called once, after `stop`; none by default.
    fn take_settled(&mut self) -> Vec<Delivery> {
        Vec::new()
    }

    /// Releases what the consumer holds at the broker (channels, a server's own fanout
    /// queue) once its deliveries are settled. Dropping a consumer releases it too, in
    /// the background; `close` waits until it is done.
    async fn close(&mut self) -> Result<()> {
        Ok(())
    }
}

/// A client's private reply queue: the address to put in requests, and its consumer.
pub struct ReplyQueue {
    /// The address servers reply to (`_reply_q` on the wire).
    pub address: String,
    /// The queue's consumer.
    pub consumer: Box<dyn ReplyConsumer>,
}

impl ReplyQueue {
    /// A reply queue whose consumer yields only the replies servers sent, as most
    /// brokers' do. A broker that also reports on calls (NATS "no responders") sets
    /// [`ReplyQueue::consumer`] to a [`ReplyConsumer`] of its own.
    pub fn new(address: impl Into<String>, consumer: impl Consumer) -> Self {
        ReplyQueue {
            address: address.into(),
            consumer: Box::new(RepliesOnly(consumer)),
        }
    }
}

impl fmt::Debug for ReplyQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplyQueue")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

/// What a client's reply queue yields: a reply a server sent, or what the broker
/// itself says about a call. The client's reply router hands each to the call it
/// names, as the call's next reply or as its error.
#[derive(Debug)]
#[non_exhaustive]
pub enum ReplyEvent {
    /// An encoded reply (see [`crate::wire`]), as a server sent it.
    Reply(Delivery),
    /// The broker found nothing listening on the address the call `msg_id` was sent
    /// to (the NATS "no responders" status). The call fails at once with
    /// [`crate::Error::NoResponders`] instead of waiting for its timeout.
    NoResponders {
        /// The call's `_msg_id`.
        msg_id: String,
    },
}

/// Reads a client's reply queue. [`ReplyQueue::new`] makes one of any [`Consumer`]
/// whose deliveries are all replies; a broker that also reports on calls implements
/// this trait itself.
#[async_trait]
pub trait ReplyConsumer: Send + 'static {
    /// The next reply or report. `None` means the queue is finished for good;
    /// `Some(Err)` reports a problem the consumer could not hide while it keeps trying.
    ///
    /// Cancel-safe: dropping the future loses nothing.
    async fn recv(&mut self) -> Option<Result<ReplyEvent>>;

    /// Releases the queue at the broker. Dropping the consumer releases it too, in
    /// the background; `close` waits until it is done. Does nothing by default.
    async fn close(&mut self) -> Result<()> {
        Ok(())
    }
}

/// A [`Consumer`] whose every delivery is a reply ([`ReplyQueue::new`]).
struct RepliesOnly<C>(C);

#[async_trait]
impl<C: Consumer> ReplyConsumer for RepliesOnly<C> {
    async fn recv(&mut self) -> Option<Result<ReplyEvent>> {
        Some(self.0.recv().await?.map(ReplyEvent::Reply))
    }

    async fn close(&mut self) -> Result<()> {
        self.0.close().await
    }
}

/// Settles one delivery with the broker.
#[async_trait]
pub trait Acker: Send + 'static {
    /// The message was taken; the broker forgets it.
    async fn ack(self: Box<Self>) -> Result<()>;

    /// The message was refused; with `requeue` the broker delivers it again, without
    /// it the broker drops it (or dead-letters it).
    async fn reject(self: Box<Self>, requeue: bool) -> Result<()>;

    /// Whether `ack` and `reject` do nothing, so that a caller may skip them (each
    /// call allocates its future). `false` unless the acker says otherwise.
    fn is_noop(&self) -> bool {
        false
    }
}

/// The acker of a delivery with nothing to settle (replies read without acks, core
/// NATS, copies for a watcher): `ack` and `reject` do nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoAck;

#[async_trait]
impl Acker for NoAck {
    async fn ack(self: Box<Self>) -> Result<()> {
        Ok(())
    }

    async fn reject(self: Box<Self>, _requeue: bool) -> Result<()> {
        Ok(())
    }

    fn is_noop(&self) -> bool {
        true
    }
}

/// One received message: its body, the handle that settles it, and what the
/// transport knows about it (its charge against the server's [`ByteBudget`], how
/// long its sender wants it).
pub struct Delivery {
    body: Bytes,
    acker: Box<dyn Acker>,
    charge: Option<Charge>,
    time_to_live: Option<Duration>,
}

impl Delivery {
    /// A delivery of `body`, settled through `acker`.
    pub fn new(body: impl Into<Bytes>, acker: Box<dyn Acker>) -> Self {
        Delivery {
            body: body.into(),
            acker,
            charge: None,
            time_to_live: None,
        }
    }

    /// The bytes of this message already counted against the server's budget by the
    /// consumer; released when the server is done with the request. A delivery
    /// without one is charged by the server on receipt.
    pub fn with_charge(mut self, charge: Charge) -> Self {
        self.charge = Some(charge);
        self
    }

    /// Takes the delivery's charge, if the consumer made one.
    pub fn take_charge(&mut self) -> Option<Charge> {
        self.charge.take()
    }

    /// How long, from now, the sender wants the message (a transport's own expiry,
    /// such as AMQP's `expiration` property that oslo.messaging sets on calls). The
    /// server stops working for a call past it.
    pub fn with_time_to_live(mut self, ttl: Duration) -> Self {
        self.time_to_live = Some(ttl);
        self
    }

    /// The time to live the transport read off the message, if any.
    pub fn time_to_live(&self) -> Option<Duration> {
        self.time_to_live
    }

    /// The encoded message.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// Splits into the body and the acker, to settle the message before or after
    /// handling it.
    pub fn into_parts(self) -> (Bytes, Box<dyn Acker>) {
        (self.body, self.acker)
    }

    /// Acknowledges the message.
    pub async fn ack(self) -> Result<()> {
        self.acker.ack().await
    }

    /// Rejects the message.
    pub async fn reject(self, requeue: bool) -> Result<()> {
        self.acker.reject(requeue).await
    }
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("size", &self.body.len())
            .finish_non_exhaustive()
    }
}

/// Streams merged into one, polled in turn from the one after the last to yield, so
/// that a busy stream does not starve the others. For a consumer reading several
/// subscriptions: unlike `futures`' `SelectAll`, which puts a stream back into a new
/// task node after every item, it allocates nothing per item. A stream that ends is
/// dropped; the merge ends when every stream has.
pub struct Merged<S> {
    streams: Vec<S>,
    next: usize,
}

impl<S> Merged<S> {
    /// No streams yet: the merge is at its end until one is pushed.
    pub fn new() -> Self {
        Merged {
            streams: Vec::new(),
            next: 0,
        }
    }

    /// Adds a stream.
    pub fn push(&mut self, stream: S) {
        self.streams.push(stream);
    }

    /// How many streams are merged: those that have not been seen to end (a stream
    /// is dropped when a poll finds it ended).
    pub fn len(&self) -> usize {
        self.streams.len()
    }

    /// Whether every stream has ended (or none was pushed).
    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }
}

impl<S> Default for Merged<S> {
    fn default() -> Self {
        Merged::new()
    }
}

impl<S: fmt::Debug> fmt::Debug for Merged<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Merged")
            .field("streams", &self.streams)
            .finish()
    }
}

impl<S: futures::Stream + Unpin> futures::Stream for Merged<S> {
    type Item = S::Item;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<S::Item>> {
        use std::task::Poll;
        let this = &mut *self;
        let mut tried = 0;
        while tried < this.streams.len() {
            let at = (this.next + tried) % this.streams.len();
            match std::pin::Pin::new(&mut this.streams[at]).poll_next(cx) {
                Poll::Ready(Some(item)) => {
                    this.next = at + 1;
                    return Poll::Ready(Some(item));
                }
                // The stream in its place is tried next, at the same count.
                Poll::Ready(None) => {
                    this.streams.remove(at);
                    if at < this.next {
                        this.next -= 1;
                    }
                }
                Poll::Pending => tried += 1,
            }
        }
        if this.streams.is_empty() {
            Poll::Ready(None)
        } else {
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;
    use futures::stream::{self, BoxStream};

    use super::Merged;

    #[tokio::test]
    async fn merged_streams_take_turns_and_end_with_the_last() {
        let mut merged: Merged<BoxStream<'static, u32>> = Merged::new();
        merged.push(stream::iter([1, 2, 3, 4]).boxed());
        merged.push(stream::iter([10]).boxed());
        merged.push(stream::empty().boxed());
        merged.push(stream::iter([20, 21]).boxed());
        let all: Vec<u32> = (&mut merged).collect().await;
        assert_eq!(all, [1, 10, 20, 2, 21, 3, 4]);
        assert!(merged.is_empty());
        assert_eq!(merged.next().await, None);
    }

    #[tokio::test]
    async fn a_merged_stream_that_waits_does_not_hold_the_others_back() {
        let (tx, rx) = futures::channel::mpsc::unbounded::<u32>();
        let mut merged: Merged<BoxStream<'static, u32>> = Merged::new();
        merged.push(rx.boxed());
        merged.push(stream::iter([7, 8]).boxed());
        assert_eq!(merged.next().await, Some(7));
        assert_eq!(merged.next().await, Some(8));
        tx.unbounded_send(1).expect("sent");
        assert_eq!(merged.next().await, Some(1));
        drop(tx);
        assert_eq!(merged.next().await, None);
        assert_eq!(merged.len(), 0);
    }
}
