//! Publishing with publisher confirms on one shared channel. Every publish awaits its
//! own confirm, so many publishes are in flight at once (pipelined), not one round
//! trip at a time. A lost connection is re-opened and the publish retried until the
//! caller's deadline; a nacked publish (a quorum queue electing a leader) is tried
//! again a few times within the caller's deadline and the message's time to live
//! (servers drop duplicates by `_unique_id`); a publish whose confirm was lost with
//! the connection is not sent again (it may or may not have been delivered); any
//! other refusal by the broker is returned as it is.
//!
//! A nack retry is at-least-once, not exactly-once, across the servers of a topic: a
//! nacked message may still have reached a queue (RabbitMQ nacks a message when any
//! queue it was routed to failed it), and its new copy may be taken by a different
//! server of the topic, which has not seen its `_unique_id`: a cast or a call may then
//! run twice, on two servers. Each server drops the copies it has seen itself.
//!
//! Requests to a topic or a server and every reply are published `mandatory`: a
//! message the broker cannot route comes back (`basic.return`) and its publish fails,
//! a request with [`Error::NoResponders`] (no queue is bound there, so no server has
//! ever listened on it) and a reply with [`Error::Undeliverable`] (the caller's reply
//! queue is gone). Replies go only to reply-queue names the URL allows
//! ([`crate::ReplyQueues`]).
//!
//! A notification goes to its exchange with its `<topic>.<priority>` key, persistent
//! and not `mandatory`, as oslo.messaging sends it; before the first one of a key on
//! a channel the publisher declares the queue named after the key and binds it, so
//! the default group's copy is kept even before any listener.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, PublisherConfirm};
use rpc_core::backoff::{Backoff, Retry};
use rpc_core::{Address, Error, Outgoing, Publisher, Result, TransportErrorKind};

use crate::compression::compressed;
use crate::error::{kind_of, lapin_error};
use crate::link::Link;
use crate::topology::{self, short};

/// A confirm-mode channel and the exchanges already declared on it.
struct PublishChannel {
    channel: Channel,
    connection: Arc<lapin::Connection>,
    generation: usize,
    declared: Arc<Mutex<HashSet<String>>>,
    /// When it was opened: a young channel is not retired on a nack (see
    /// [`RETIRE_MIN_AGE`]).
    opened: Instant,
    /// Set when a nack retired it: it closes when its last user lets go of it.
    retired: AtomicBool,
}

impl Drop for PublishChannel {
    /// Closes a retired channel once nothing uses it any more: every publish on it
    /// holds it (an abandoned one through its [`Confirm`]) until its confirm resolves,
    /// so no confirm is lost to the close.
    fn drop(&mut self) {
        if !self.retired.load(Ordering::Relaxed) || !self.channel.status().connected() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let channel = self.channel.clone();
            runtime.spawn(async move {
                let _ =
                    tokio::time::timeout(RETIRE_LIMIT, channel.close(200, "retired".into())).await;
            });
        }
    }
}

pub(crate) struct AmqpPublisher {
    link: Arc<Link>,
    /// Shared, not cloned per publish: a lapin `Channel` is a dozen reference counts.
    current: Mutex<Option<Arc<PublishChannel>>>,
    opening: tokio::sync::Mutex<()>,
    /// Mandatory publishes waiting for their confirm, to match returned messages to.
    returns: Returns,
}

/// What the broker said of a message it returned, without its content.
#[derive(Debug, Clone)]
struct Returned {
    reply_code: u16,
    reply_text: String,
}

/// The mandatory publishes in flight, by a key of their body.
///
/// lapin hands a returned message (`basic.return`) to whichever publisher confirm the
/// broker answers next, not to the publish it belongs to (returns carry no delivery
/// tag, and a `multiple` ack resolves its confirms in no set order). A publish that
/// receives another's return passes it on here to its owner, found by the body
/// (every message has its own `_unique_id`). It is best effort: an owner whose own
/// confirm is examined before the return's holder passes it on takes its message as
/// delivered.
#[derive(Default)]
struct Returns {
    waiting: Mutex<HashMap<u64, Vec<Arc<Watch>>>>,
}

/// One mandatory publish waiting for its confirm.
struct Watch {
    key: u64,
    body: bytes::Bytes,
    returned: Mutex<Option<Returned>>,
}

/// Bytes of a body's head and tail that its key covers (with its length): enough to
/// tell messages apart (their ids), cheap for big bodies.
const KEY_SPAN: usize = 4096;

fn body_key(body: &[u8]) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    body.len().hash(&mut hasher);
    body[..body.len().min(KEY_SPAN)].hash(&mut hasher);
    body[body.len().saturating_sub(KEY_SPAN)..].hash(&mut hasher);
    hasher.finish()
}

impl Returns {
    fn watch(&self, body: &bytes::Bytes) -> WatchGuard<'_> {
        let watch = Arc::new(Watch {
            key: body_key(body),
            body: body.clone(),
            returned: Mutex::new(None),
        });
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(watch.key)
            .or_default()
            .push(watch.clone());
        WatchGuard {
            returns: self,
            watch,
        }
    }

    /// Hands a returned message to the publish it belongs to; false when none waits.
    fn deliver(&self, body: &[u8], returned: Returned) -> bool {
        let waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        let owner = waiting
            .get(&body_key(body))
            .and_then(|watches| watches.iter().find(|w| w.body[..] == *body));
        match owner {
            Some(owner) => {
                *owner.returned.lock().unwrap_or_else(|e| e.into_inner()) = Some(returned);
                true
            }
            None => false,
        }
    }
}

/// Removes its watch when the publish is over.
struct WatchGuard<'a> {
    returns: &'a Returns,
    watch: Arc<Watch>,
}

impl WatchGuard<'_> {
    fn returned(&self) -> Option<Returned> {
        self.watch
            .returned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for WatchGuard<'_> {
    fn drop(&mut self) {
        let mut waiting = self
            .returns
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(watches) = waiting.get_mut(&self.watch.key) {
            watches.retain(|w| !Arc::ptr_eq(w, &self.watch));
            if watches.is_empty() {
                waiting.remove(&self.watch.key);
            }
        }
    }
}

/// A peer-chosen name for a log line: at most 64 characters, escaped (`Debug`), so
/// it can neither flood a log nor forge a line.
pub(crate) fn escaped(name: &str) -> String {
    const LIMIT: usize = 64;
    let mut shown: String = name.chars().take(LIMIT).collect();
    if shown.len() < name.len() {
        shown.push('…');
    }
    format!("{shown:?}")
}

/// Why one publish attempt failed.
enum Failure {
    /// The connection went away: reconnect and try again.
    Connection(Error),
    /// The broker refused (or the request is bad): give up.
    Refused(Error),
    /// The broker closed the channel over this publish (say a 404 for an exchange
    /// that was auto-deleted since it was declared): worth one try on a new channel,
    /// which declares its exchanges again.
    ChannelClosed(Error),
    /// The broker nacked the message: it took it but could not enqueue it (a quorum
    /// queue electing a leader, a queue process that failed, a full queue with
    /// `reject-publish`). Worth a few more tries, shortly after.
    Nacked(Error),
    /// The message's time to live ran out before an attempt could start.
    Expired(Error),
}

/// How long the close of a retired publish channel may wait for the broker.
const RETIRE_LIMIT: Duration = Duration::from_secs(30);

/// How long a publish channel lives at least before a nack retires it: at most one
/// new channel a second per publisher, so a queue that nacks everything (full, with
/// `reject-publish`) does not make every publish, unrelated ones included, open a
/// channel of its own. Nacked publishes on a young channel are tried on it again.
const RETIRE_MIN_AGE: Duration = Duration::from_secs(1);

/// How many times in all a nacked publish is tried (the first included), while the
/// caller's deadline (and the message's time to live) allows.
pub(crate) const NACK_ATTEMPTS: u32 = 8;

/// The waits between the tries of a nacked publish: 100 ms doubling up to 1 s, each
/// drawn in the upper half (about 2 to 4.5 s over [`NACK_ATTEMPTS`] tries, long
/// enough for a quorum queue to elect a new leader after its node is lost).
fn nack_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(100), Duration::from_secs(1))
}

impl AmqpPublisher {
    pub(crate) fn new(link: Arc<Link>) -> Self {
        AmqpPublisher {
            link,
            current: Mutex::new(None),
            opening: tokio::sync::Mutex::new(()),
            returns: Returns::default(),
        }
    }

    fn cached(&self) -> Option<Arc<PublishChannel>> {
        let current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        current
            .as_ref()
            .filter(|c| c.channel.status().connected())
            .cloned()
    }

    /// The publish channel, opened (with confirms) when missing or dead.
    async fn channel(&self) -> Result<Arc<PublishChannel>> {
        if let Some(channel) = self.cached() {
            return Ok(channel);
        }
        let _opening = self.opening.lock().await;
        if let Some(channel) = self.cached() {
            return Ok(channel);
        }
        let connected = self.link.connection().await?;
        let channel = connected
            .connection
            .create_channel()
            .await
            .map_err(|e| lapin_error("opening a publish channel", e))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| lapin_error("enabling publisher confirms", e))?;
        tokio::spawn(drain_dropped_confirms(channel.clone()));
        let fresh = Arc::new(PublishChannel {
            channel,
            connection: connected.connection.clone(),
            generation: connected.generation,
            declared: Arc::new(Mutex::new(HashSet::new())),
            opened: Instant::now(),
            retired: AtomicBool::new(false),
        });
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(fresh.clone());
        Ok(fresh)
    }

    fn forget(&self, failed: &PublishChannel) {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if current.as_ref().is_some_and(|c| {
            c.channel.id() == failed.channel.id() && c.generation == failed.generation
        }) {
            *current = None;
        }
    }

    /// Stops publishing on a channel whose publish was nacked: the next publish opens
    /// a fresh one. RabbitMQ 3.10 was seen to nack every publish of a channel to a
    /// quorum queue for as long as that channel lived after the queue's leader was
    /// killed (30 s and more, while a new channel's publishes went through at once):
    /// the channel's view of the queue's leader is stale. A channel younger than
    /// [`RETIRE_MIN_AGE`] is kept (its nacked publishes are tried on it again).
    /// Publishes still waiting on the old channel keep it until their confirms
    /// arrive; it is closed when the last of them lets go of it.
    fn retire(&self, nacked: &PublishChannel) {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let Some(live) = current.as_ref().filter(|c| {
            c.channel.id() == nacked.channel.id()
                && c.generation == nacked.generation
                && c.opened.elapsed() >= RETIRE_MIN_AGE
        }) else {
            return;
        };
        live.retired.store(true, Ordering::Relaxed);
        let channel = live.channel.id();
        // Dropping this holder may close it at once, if no publish holds it any more.
        *current = None;
        drop(current);
        tracing::debug!(
            channel,
            "a publish was nacked; publishing on a fresh channel"
        );
    }

    /// Declares the exchange a publish needs, once per channel.
    async fn ensure_exchange(&self, pc: &PublishChannel, address: &Address) -> Result<()> {
        let (name, fanout_topic) = match address {
            Address::Topic { exchange, .. }
            | Address::Server { exchange, .. }
            | Address::Notification { exchange, .. } => (exchange.clone(), None),
            Address::Fanout { topic, .. } => (topology::fanout_exchange(topic), Some(topic)),
            Address::Reply(_) => return Ok(()),
        };
        let known = pc
            .declared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&name);
        if known {
            return Ok(());
        }
        match fanout_topic {
            Some(topic) => {
                topology::declare_fanout_exchange(&pc.channel, &self.link.config, topic).await?
            }
            None => topology::declare_topic_exchange(&pc.channel, &self.link.config, &name).await?,
        }
        pc.declared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name);
        Ok(())
    }

    /// Declares the queue a notification's default group reads (named after its
    /// routing key, bound to its exchange with that key) once per channel, as
    /// oslo.messaging's notifier does: the broker then keeps every notification from
    /// the first, before any listener exists.
    async fn ensure_notification_queue(
        &self,
        pc: &PublishChannel,
        address: &Address,
    ) -> Result<()> {
        let Address::Notification { exchange, key } = address else {
            return Ok(());
        };
        // Exchange names never hold a NUL (an AMQP short string may, but no name
        // declared here does): the entry cannot be confused with an exchange's.
        let entry = format!("{exchange}\0{key}");
        let known = pc
            .declared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&entry);
        if known {
            return Ok(());
        }
        topology::declare_notification_queue(&pc.channel, &self.link.config, exchange, key, key)
            .await?;
        pc.declared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(entry);
        Ok(())
    }

    /// One try at publishing `message`. The first carries its whole time to live as
    /// `expiration` (a call's timeout, as oslo sends it), a later one what is left of
    /// it, counted to `deadline` (none left: [`Failure::Expired`]).
    async fn attempt(
        &self,
        address: &Address,
        message: &Outgoing,
        deadline: Option<tokio::time::Instant>,
        first: bool,
    ) -> std::result::Result<(), Failure> {
        let left = deadline.map(|d| d.saturating_duration_since(tokio::time::Instant::now()));
        if left.is_some_and(|left| left.as_millis() == 0) {
            return Err(Failure::Expired(Error::transport_msg(
                TransportErrorKind::Timeout,
                format!(
                    "the message to {address} expired (its time to live ran out) before the \
                     broker took it"
                ),
            )));
        }
        let pc: Arc<PublishChannel> = self.channel().await.map_err(Failure::Connection)?;
        // With the connection still up, the broker refused this publish (and may have
        // closed the channel); with it down, the publish is worth retrying.
        let classify = |err: Error| {
            if pc.connection.status().connected() || self.link.closed.is_cancelled() {
                Failure::Refused(err)
            } else {
                Failure::Connection(err)
            }
        };
        // The message left but its confirm never came: whether the broker routed it is
        // unknown, so it is not sent again.
        let mut unconfirmed = false;
        let mut nacked = false;
        let outcome = async {
            self.ensure_exchange(&pc, address).await?;
            self.ensure_notification_queue(&pc, address).await?;
            let (exchange, routing_key) = route(address);
            // Notifications are persistent whatever the queues' durability, as
            // oslo.messaging (kombu's default) sends them: they may wait long in
            // their queues.
            let persistent = self.link.config.durable_queues()
                || matches!(address, Address::Notification { .. });
            let mut properties = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_content_encoding("utf-8".into())
                .with_delivery_mode(if persistent { 2 } else { 1 });
            if let Some(compression) = self.link.config.compression {
                let mut headers = lapin::types::FieldTable::default();
                headers.insert(
                    "compression".into(),
                    lapin::types::AMQPValue::LongString(compression.header().into()),
                );
                properties = properties.with_headers(headers);
            }
            // What is left of the time to live: a message tried again (after a nack or
            // a reconnection) expires when the first try's would have.
            let ttl = if first {
                message.time_to_live
            } else {
                left.or(message.time_to_live)
            };
            if let Some(ttl) = ttl {
                properties = properties.with_expiration(ttl.as_millis().max(1).to_string().into());
            }
            // A request to a topic or a server that no queue takes is an error at once
            // (no server has ever listened there); a fanout with no server is not.
            let mandatory = message.mandatory
                || matches!(address, Address::Topic { .. } | Address::Server { .. });
            let watch = mandatory.then(|| self.returns.watch(&message.body));
            let confirm = pc
                .channel
                .basic_publish(
                    short(&exchange)?,
                    short(&routing_key)?,
                    BasicPublishOptions {
                        mandatory,
                        ..BasicPublishOptions::default()
                    },
                    &message.body,
                    properties,
                )
                .await
                .map_err(|e| lapin_error("publishing", e))?;
            let mut confirm = Confirm {
                confirm: Some(confirm),
                channel: pc.clone(),
            };
            let confirmation = match confirm.wait().await {
                Ok(confirmation) => confirmation,
                // The message left; whether the broker routed it is unknown. Sending it
                // again could run a request twice, so only replies are retried.
                Err(err) if !matches!(address, Address::Reply(_)) => {
                    unconfirmed = true;
                    return Err(Error::transport(
                        kind_of(&err),
                        format!(
                            "the broker connection failed before it confirmed the message to \
                             {address}; it may or may not have been delivered"
                        ),
                        err,
                    ));
                }
                Err(err) => return Err(lapin_error("waiting for the publisher confirm", err)),
            };
            let (acked, carried) = match confirmation {
                Confirmation::Ack(carried) => (true, carried),
                Confirmation::Nack(carried) => (false, carried),
                Confirmation::NotRequested => (true, None),
            };
            let mut returned = None;
            if let Some(carried) = carried {
                let info = Returned {
                    reply_code: carried.reply_code,
                    reply_text: carried.reply_text.to_string(),
                };
                // lapin pairs returns with confirms by order, not by tag: the return
                // is this message's only if it carries this body (each has its own
                // `_unique_id`); another's goes to its owner.
                if carried.delivery.data == message.body[..] {
                    returned = Some(info);
                } else if !self.returns.deliver(&carried.delivery.data, info.clone()) {
                    tracing::debug!(
                        size = carried.delivery.data.len(),
                        reply_code = info.reply_code,
                        reply_text = %escaped(&info.reply_text),
                        routing_key = %escaped(carried.delivery.routing_key.as_str()),
                        "the broker returned a message whose publish was already answered"
                    );
                }
            }
            let returned = returned.or_else(|| watch.as_ref().and_then(WatchGuard::returned));
            drop(watch);
            if let Some(returned) = returned {
                tracing::debug!(
                    size = message.body.len(),
                    reply_code = returned.reply_code,
                    reply_text = %escaped(&returned.reply_text),
                    routing_key = %escaped(&routing_key),
                    "the broker returned a message: no queue is bound to its routing key"
                );
                return Err(unroutable(address));
            }
            if acked {
                Ok(())
            } else {
                // Not `Refused`: RabbitMQ nacks when a queue is full (`x-overflow`
                // `reject-publish`), a queue process failed or a quorum queue has no
                // leader, which a later attempt may get past.
                nacked = true;
                Err(Error::transport_msg(
                    TransportErrorKind::Other,
                    format!("the broker refused the message to {address} (nack)"),
                ))
            }
        }
        .await;
        outcome.map_err(|err| match err {
            Error::Undeliverable { .. } | Error::NoResponders { .. } | Error::InvalidTarget(_) => {
                Failure::Refused(err)
            }
            err if nacked => {
                self.retire(&pc);
                Failure::Nacked(err)
            }
            err if unconfirmed => {
                if !pc.channel.status().connected() {
                    self.forget(&pc);
                }
                Failure::Refused(err)
            }
            err => {
                let channel_closed = !pc.channel.status().connected();
                if channel_closed {
                    self.forget(&pc);
                }
                match classify(err) {
                    Failure::Refused(err) if channel_closed => Failure::ChannelClosed(err),
                    failure => failure,
                }
            }
        })
    }
}

/// A publisher confirm that is waited for to the end even when its publish is
/// abandoned (a deadline that fired, a heartbeat no longer needed, a call whose reply
/// came first). lapin keeps every confirm dropped unresolved in a list that only
/// `wait_for_confirms` empties, and under steady publishing that call waits in vain
/// (it resolves only when the newest confirm is the one acked), so the list would
/// grow for as long as the load lasts. A dropped one is awaited on a task instead,
/// which keeps its channel (a retired one closes only when no confirm is pending).
struct Confirm {
    confirm: Option<PublisherConfirm>,
    channel: Arc<PublishChannel>,
}

impl Confirm {
    async fn wait(&mut self) -> lapin::Result<Confirmation> {
        let Some(confirm) = self.confirm.as_mut() else {
            return Ok(Confirmation::NotRequested);
        };
        let confirmation = confirm.await;
        self.confirm = None;
        confirmation
    }
}

impl Drop for Confirm {
    fn drop(&mut self) {
        if let (Some(confirm), Ok(runtime)) =
            (self.confirm.take(), tokio::runtime::Handle::try_current())
        {
            let channel = self.channel.clone();
            runtime.spawn(async move {
                let _ = confirm.await;
                drop(channel);
            });
        }
    }
}

/// A backstop for confirms dropped without [`Confirm`] (none in this crate): lapin
/// keeps them until `wait_for_confirms` runs, which this does every 30 s while the
/// channel lives.
async fn drain_dropped_confirms(channel: Channel) {
    let period = std::time::Duration::from_secs(30);
    while channel.status().connected() {
        tokio::time::sleep(period).await;
        let _ = tokio::time::timeout(period, channel.wait_for_confirms()).await;
    }
}

/// The error of a publish the broker returned (`basic.return`): for a request, no
/// queue is bound to its routing key, so no server has ever listened there (a server
/// that has, even one since stopped, left its queue behind, which keeps the request);
/// for a reply, the caller's reply queue is gone.
fn unroutable(address: &Address) -> Error {
    match address {
        Address::Reply(_) => Error::Undeliverable {
            address: address.to_string(),
        },
        _ => Error::NoResponders {
            address: format!(
                "{address}: no queue is bound there, so no server has ever listened on it"
            ),
        },
    }
}

/// The error of a publish the broker nacked every time it was tried.
fn nack_error(address: &Address, times: u32, over: Duration) -> Error {
    let times = times.max(1);
    let tries = if times == 1 { "once" } else { "times" };
    let count = if times == 1 {
        String::new()
    } else {
        format!("{times} ")
    };
    Error::transport_msg(
        TransportErrorKind::Other,
        format!(
            "the broker refused the message to {address} (nack): nacked {count}{tries} over \
             {over:.1?} (a queue without a leader, full with reject-publish, or failed)"
        ),
    )
}

/// The exchange and routing key of an address, as oslo publishes.
fn route(address: &Address) -> (String, String) {
    match address {
        Address::Topic { exchange, topic } => (exchange.clone(), topic.clone()),
        Address::Server {
            exchange,
            topic,
            server,
        } => (exchange.clone(), topology::server_queue(topic, server)),
        Address::Fanout { topic, .. } => (topology::fanout_exchange(topic), String::new()),
        Address::Reply(queue) => (String::new(), queue.clone()),
        Address::Notification { exchange, key } => (exchange.clone(), key.clone()),
    }
}

#[async_trait]
impl Publisher for AmqpPublisher {
    async fn send(&self, address: &Address, mut message: Outgoing) -> Result<()> {
        if let Address::Reply(queue) = address
            && !self.link.config.reply_queues.allows(queue)
        {
            // The default exchange reaches every queue by name: a request must not make
            // a server publish into another service's queue.
            return Err(Error::InvalidTarget(format!(
                "reply queue {} is not a reply-queue name (reply_ and 32 lowercase hex \
                 digits, or one the URL option allow_reply_queues allows); reply dropped",
                escaped(queue)
            )));
        }
        Error::check_size(message.body.len(), self.link.config.max_message_size)?;
        if let Some(compression) = self.link.config.compression {
            message.body = compressed(compression, message.body).await?;
        }
        let message = &message;
        let retried_on_new_channel = &AtomicBool::new(false);
        let tried = &AtomicBool::new(false);
        let nacks = &AtomicU32::new(0);
        let started = Instant::now();
        // A call's request is worth nothing past its time to live (its timeout).
        let deadline = message
            .time_to_live
            .and_then(|ttl| tokio::time::Instant::now().checked_add(ttl));
        // One publish, tried again on a new channel once if the broker closed its
        // channel, and again shortly after a nack, a few times (servers drop the
        // duplicates a nack may leave, by `_unique_id`).
        let publish_once = || async move {
            let first = !tried.swap(true, Ordering::Relaxed);
            let outcome = match self.attempt(address, message, deadline, first).await {
                Err(Failure::ChannelClosed(err))
                    if !retried_on_new_channel.swap(true, Ordering::Relaxed) =>
                {
                    tracing::debug!(error = %err, %address, "channel closed by the broker; retrying once");
                    self.attempt(address, message, deadline, false).await
                }
                outcome => outcome,
            };
            if matches!(outcome, Err(Failure::Nacked(_))) {
                nacks.fetch_add(1, Ordering::Relaxed);
            }
            outcome
        };
        let publish = |_| async move {
            let mut retry = Retry::new(nack_backoff()).attempts(NACK_ATTEMPTS);
            if let Some(deadline) = deadline {
                retry = retry.deadline(deadline);
            }
            retry
                .run_notify(
                    |_| publish_once(),
                    |failure| {
                        matches!(failure, Failure::Nacked(_)) && !self.link.closed.is_cancelled()
                    },
                    |failure, attempt, wait| {
                        if let Failure::Nacked(err) = failure {
                            tracing::info!(error = %err, %address, ?wait, attempt,
                                "the broker nacked a publish; trying again");
                        }
                    },
                )
                .await
        };
        // A lost connection is retried (with backoff) until the caller's deadline drops
        // this future; a publish whose channel the broker closed is tried once more, at
        // once, on a new channel.
        let sent = Retry::new(self.link.backoff())
            .run_notify(
                publish,
                |failure| {
                    matches!(failure, Failure::Connection(_)) && !self.link.closed.is_cancelled()
                },
                |failure, _, wait| {
                    if let Failure::Connection(err) = failure {
                        tracing::warn!(error = %err, %address, ?wait, "publish failed; retrying after reconnection");
                    }
                },
            )
            .await;
        sent.map_err(|failure| match failure {
            Failure::Connection(_) if self.link.closed.is_cancelled() => Error::Closed,
            Failure::Nacked(_) => {
                nack_error(address, nacks.load(Ordering::Relaxed), started.elapsed())
            }
            Failure::Expired(_) if nacks.load(Ordering::Relaxed) > 0 => {
                nack_error(address, nacks.load(Ordering::Relaxed), started.elapsed())
            }
            Failure::Connection(err)
            | Failure::Refused(err)
            | Failure::ChannelClosed(err)
            | Failure::Expired(err) => err,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_in_logs_are_escaped_and_short() {
        assert_eq!(escaped("reply_ab"), "\"reply_ab\"");
        let forged = escaped("q\nINFO forged line");
        assert!(!forged.contains('\n'), "{forged}");
        assert!(forged.contains("\\n"), "{forged}");
        let long = escaped(&"x".repeat(10_000));
        assert!(long.len() < 80, "{long}");
    }

    #[test]
    fn returns_reach_the_publish_they_belong_to() {
        let returns = Returns::default();
        let mine = bytes::Bytes::from(vec![1u8; 10_000]);
        let mut other = vec![1u8; 10_000];
        other[5_000] = 2; // same head and tail, same key: told apart by the body
        let other = bytes::Bytes::from(other);
        let my_watch = returns.watch(&mine);
        let other_watch = returns.watch(&other);
        let returned = Returned {
            reply_code: 312,
            reply_text: "NO_ROUTE".to_owned(),
        };
        assert!(returns.deliver(&other, returned.clone()));
        assert!(my_watch.returned().is_none());
        assert_eq!(other_watch.returned().map(|r| r.reply_code), Some(312));
        drop(other_watch);
        assert!(!returns.deliver(&other, returned));
        drop(my_watch);
        assert!(returns.waiting.lock().expect("lock").is_empty());
    }

    #[test]
    fn a_nack_error_says_how_many_times() {
        let topic = Address::Topic {
            exchange: "openstack".to_owned(),
            topic: "compute".to_owned(),
        };
        let text = nack_error(&topic, 8, Duration::from_millis(3200)).to_string();
        assert!(text.contains("(nack)"), "{text}");
        assert!(text.contains("nacked 8 times"), "{text}");
        let text = nack_error(&topic, 1, Duration::ZERO).to_string();
        assert!(text.contains("nacked once"), "{text}");
    }

    #[test]
    fn unroutable_requests_say_no_server_ever_listened() {
        let topic = Address::Topic {
            exchange: "openstack".to_owned(),
            topic: "compute".to_owned(),
        };
        let err = unroutable(&topic);
        assert!(matches!(err, Error::NoResponders { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains("openstack/compute"), "{text}");
        assert!(text.contains("no server has ever listened"), "{text}");
        let reply = unroutable(&Address::Reply("reply_x".to_owned()));
        assert!(matches!(reply, Error::Undeliverable { .. }), "{reply:?}");
    }
}
