//! The in-process transport of mqrpc: broker semantics on channels, for tests and
//! embedded use. It carries the same encoded bytes the brokers carry, so the whole
//! wire path runs. A bus lives inside one process: `memory://NAME` reaches the same
//! bus from anywhere in the process, and nothing outside it.
//!
//! - Topic and `topic.server` queues are created on first use and kept for the life of
//!   the bus, like declared broker queues: a message sent before any server listens
//!   waits for one (capability `keeps_messages_without_listener`). Servers of a topic
//!   compete for its queue; waiting consumers are served in turn.
//! - A fanout copies each message to every server listening at that moment; with no
//!   server listening it is dropped, as a fanout exchange without queues drops it.
//! - Each client gets a private reply queue; a reply to a queue that no longer exists
//!   fails with `Undeliverable` (the `mandatory` flag of the brokers).
//! - Queues are bounded: a send to a full queue waits, inside the caller's deadline.
//! - A delivery dropped without ack or reject goes back to its queue.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use mqrpc::MemoryTransport;
//! let bus = MemoryTransport::connect("memory://shared?capacity=100").unwrap();
//! let same = MemoryTransport::connect("memory://shared").unwrap();
//! assert!(bus.same_bus(&same));
//! # }
//! ```

#![deny(missing_docs)]
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, RwLock, Weak};

use async_channel::{Receiver, Sender, TrySendError};
use async_trait::async_trait;
use bytes::Bytes;
use dashmap::DashMap;
use rpc_core::{
    Acker, Address, Capabilities, Consumer, Delivery, Error, ListenOptions, NoAck,
    NotificationSource, Outgoing, Publisher, ReplyQueue, Result, Target, Transport,
};

mod config;
mod notify;

pub use config::{DEFAULT_CAPACITY, DEFAULT_MAX_MESSAGE_SIZE, MemoryConfig};

/// Named buses of this process: `memory://NAME` always reaches the same one while
/// any transport on it is alive.
static NAMED_BUSES: LazyLock<Mutex<HashMap<String, Weak<Bus>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// A transport on an in-process bus.
#[derive(Clone)]
pub struct MemoryTransport {
    bus: Arc<Bus>,
}

impl std::fmt::Debug for MemoryTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryTransport")
            .field("bus", &self.bus.name)
            .field("capacity", &self.bus.capacity)
            .finish()
    }
}

impl MemoryTransport {
    /// A transport on a new private bus that nothing else can reach.
    pub fn new() -> Self {
        MemoryTransport {
            bus: Arc::new(Bus::new(String::new(), MemoryConfig::default())),
        }
    }

    /// A transport on the bus called `name` in this process, created if needed.
    pub fn named(name: &str) -> Self {
        Self::on_bus(name, MemoryConfig::default())
    }

    /// A transport on the bus called `name` in this process (a new private bus when
    /// `name` is empty), created with `config` if it does not exist yet.
    pub fn with_config(name: &str, config: MemoryConfig) -> Result<Self> {
        config.validate()?;
        if name.is_empty() {
            return Ok(MemoryTransport {
                bus: Arc::new(Bus::new(String::new(), config)),
            });
        }
        Ok(Self::on_bus(name, config))
    }

    /// Parses `memory://` (a new private bus) or `memory://NAME` (the process-wide bus
    /// of that name), with optional query options `capacity` (messages per queue) and
    /// `max_message_size` (bytes). Options apply when the named bus is created.
    pub fn connect(url: &str) -> Result<Self> {
        let parsed = url::Url::parse(url).map_err(|e| Error::InvalidUrl(format!("{e}")))?;
        if parsed.scheme() != "memory" {
            return Err(Error::InvalidUrl(format!(
                "expected a memory:// URL, found scheme {:?}",
                parsed.scheme()
            )));
        }
        let config = MemoryConfig::from_query(parsed.query_pairs())?;
        Self::with_config(parsed.host_str().unwrap_or_default(), config)
    }

    fn on_bus(name: &str, config: MemoryConfig) -> Self {
        let mut buses = NAMED_BUSES.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(bus) = buses.get(name).and_then(Weak::upgrade) {
            return MemoryTransport { bus };
        }
        buses.retain(|_, bus| bus.strong_count() > 0);
        let bus = Arc::new(Bus::new(name.to_owned(), config));
        buses.insert(name.to_owned(), Arc::downgrade(&bus));
        MemoryTransport { bus }
    }

    /// The bus's name (empty for a private bus).
    pub fn name(&self) -> &str {
        &self.bus.name
    }

    /// Whether two transports share one bus.
    pub fn same_bus(&self, other: &MemoryTransport) -> bool {
        Arc::ptr_eq(&self.bus, &other.bus)
    }

    /// Messages waiting in the queue of `topic` (the shared one) of `exchange`.
    pub fn queued(&self, exchange: &str, topic: &str) -> usize {
        let key = QueueKey::Topic(exchange.to_owned(), topic.to_owned());
        self.bus.queues.get(&key).map_or(0, |q| q.rx.len())
    }

    /// Messages rejected without requeue (poison messages) on this bus so far.
    pub fn rejected(&self) -> u64 {
        self.bus.rejected.load(Ordering::Relaxed)
    }
}

impl Default for MemoryTransport {
    fn default() -> Self {
        Self::new()
    }
}

/// What a memory bus can do.
fn capabilities(max_message_size: usize) -> Capabilities {
    Capabilities::default()
        .keeps_messages_without_listener(true)
        .reports_no_responders(false)
        .redelivers_unacked(true)
        .max_message_size(Some(max_message_size))
        .notifications(true)
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum QueueKey {
    Topic(String, String),
    Server(String, String, String),
    /// A notification queue of an exchange: the default group's, named after its
    /// routing key, or a pool's, named after the pool (as on RabbitMQ).
    Notification(String, String),
}

/// Both ends of a queue; the bus keeps them so messages outlive their consumers.
#[derive(Clone)]
struct Queue {
    tx: Sender<Bytes>,
    rx: Receiver<Bytes>,
}

impl Queue {
    /// The next message, as a delivery with nothing to settle (replies, watcher copies).
    async fn next_copy(&self) -> Option<Result<Delivery>> {
        let body = self.rx.recv().await.ok()?;
        Some(Ok(Delivery::new(body, Box::new(NoAck))))
    }
}

/// The servers listening to one topic's fanout.
#[derive(Default)]
struct FanoutGroup {
    members: RwLock<Vec<(u64, Sender<Bytes>)>>,
}

struct Bus {
    name: String,
    capacity: usize,
    max_message_size: usize,
    queues: DashMap<QueueKey, Queue>,
    fanouts: DashMap<(String, String), Arc<FanoutGroup>>,
    /// Watchers of a topic (`monitor`), who get a copy of everything sent to it.
    taps: DashMap<(String, String), Arc<FanoutGroup>>,
    replies: DashMap<String, Sender<Bytes>>,
    /// The notification queues bound to each routing key of an exchange.
    bindings: DashMap<(String, String), Arc<RwLock<Vec<String>>>>,
    next_id: AtomicU64,
    rejected: AtomicU64,
}

impl Bus {
    fn new(name: String, config: MemoryConfig) -> Self {
        Bus {
            name,
            capacity: config.capacity,
            max_message_size: config.max_message_size,
            queues: DashMap::new(),
            fanouts: DashMap::new(),
            taps: DashMap::new(),
            replies: DashMap::new(),
            bindings: DashMap::new(),
            next_id: AtomicU64::new(1),
            rejected: AtomicU64::new(0),
        }
    }

    /// The queue for `key`, declared on first use.
    fn queue(&self, key: QueueKey) -> Queue {
        if let Some(queue) = self.queues.get(&key) {
            return queue.clone();
        }
        self.queues
            .entry(key)
            .or_insert_with(|| {
                let (tx, rx) = async_channel::bounded(self.capacity);
                Queue { tx, rx }
            })
            .clone()
    }

    fn fanout_group(&self, exchange: &str, topic: &str) -> Arc<FanoutGroup> {
        self.fanouts
            .entry((exchange.to_owned(), topic.to_owned()))
            .or_default()
            .clone()
    }
}

#[async_trait]
impl Transport for MemoryTransport {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn describe(&self) -> String {
        if self.bus.name.is_empty() {
            "memory:// (private bus)".to_owned()
        } else {
            format!("memory://{}", self.bus.name)
        }
    }

    fn capabilities(&self) -> Capabilities {
        capabilities(self.bus.max_message_size)
    }

    async fn publisher(&self) -> Result<Arc<dyn Publisher>> {
        Ok(Arc::new(MemoryPublisher {
            bus: self.bus.clone(),
            routes: DashMap::default(),
        }))
    }

    async fn listen(&self, target: &Target, _options: &ListenOptions) -> Result<Box<dyn Consumer>> {
        target.validate_for_listen()?;
        let exchange = target.exchange_or(self.default_exchange()).to_owned();
        let server = target.server.clone().unwrap_or_default();
        let topic = self
            .bus
            .queue(QueueKey::Topic(exchange.clone(), target.topic.clone()));
        let direct = self.bus.queue(QueueKey::Server(
            exchange.clone(),
            target.topic.clone(),
            server,
        ));
        let (fanout_tx, fanout_rx) = async_channel::bounded(self.bus.capacity);
        let group = self.bus.fanout_group(&exchange, &target.topic);
        let id = self.bus.next_id.fetch_add(1, Ordering::Relaxed);
        group
            .members
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push((id, fanout_tx.clone()));
        Ok(Box::new(ServerConsumer {
            sources: Some(Sources {
                topic,
                direct,
                fanout: Queue {
                    tx: fanout_tx,
                    rx: fanout_rx,
                },
                _membership: FanoutMembership { group, id },
            }),
            bus: self.bus.clone(),
        }))
    }

    async fn monitor(&self, target: &Target) -> Result<Box<dyn Consumer>> {
        let exchange = target.exchange_or(self.default_exchange()).to_owned();
        let group = self
            .bus
            .taps
            .entry((exchange, target.topic.clone()))
            .or_default()
            .clone();
        let (tx, rx) = async_channel::bounded(self.bus.capacity);
        let id = self.bus.next_id.fetch_add(1, Ordering::Relaxed);
        group
            .members
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push((id, tx.clone()));
        Ok(Box::new(TapConsumer {
            queue: Queue { tx, rx },
            _membership: FanoutMembership { group, id },
        }))
    }

    async fn reply_queue(&self) -> Result<ReplyQueue> {
        let (address, consumer) = self.open_reply_queue();
        Ok(ReplyQueue::new(address, consumer))
    }

    async fn listen_notifications(
        &self,
        source: &NotificationSource,
        _options: &ListenOptions,
    ) -> Result<Box<dyn Consumer>> {
        Ok(Box::new(notify::listen(&self.bus, source)))
    }
}

impl MemoryTransport {
    /// A new reply queue on the bus: its address and its consumer.
    fn open_reply_queue(&self) -> (String, ReplyConsumer) {
        let address = format!("reply_{}", rpc_core::wire::new_id());
        let (tx, rx) = async_channel::bounded(self.bus.capacity);
        self.bus.replies.insert(address.clone(), tx.clone());
        let consumer = ReplyConsumer {
            queue: Queue { tx, rx },
            address: address.clone(),
            bus: self.bus.clone(),
        };
        (address, consumer)
    }
}

struct MemoryPublisher {
    bus: Arc<Bus>,
    /// Where each topic or server address leads, found once: a send then builds no
    /// lookup keys. Queues and tap groups, once made, live as long as the bus.
    routes: DashMap<Address, Route, foldhash::fast::RandomState>,
}

/// The queue of a topic or server address, and the watchers of its topic.
#[derive(Clone)]
struct Route {
    queue: Sender<Bytes>,
    taps: Arc<FanoutGroup>,
}

impl MemoryPublisher {
    /// The queue of a topic or server `address` (of `exchange` and `topic`), found
    /// once and kept; `key` names the queue on the bus the first time. Gives the
    /// topic's watchers a copy of `body` on the way.
    fn route(
        &self,
        address: &Address,
        exchange: &str,
        topic: &str,
        key: impl FnOnce() -> QueueKey,
        body: &Bytes,
    ) -> Sender<Bytes> {
        let route = match self.routes.get(address) {
            Some(route) => route.clone(),
            None => {
                let route = Route {
                    queue: self.bus.queue(key()).tx,
                    taps: self
                        .bus
                        .taps
                        .entry((exchange.to_owned(), topic.to_owned()))
                        .or_default()
                        .clone(),
                };
                self.routes.insert(address.clone(), route.clone());
                route
            }
        };
        tap(&route.taps, body);
        route.queue
    }
}

/// Gives each watcher of a topic a copy of `body`.
fn tap(taps: &FanoutGroup, body: &Bytes) {
    for (_, tx) in taps
        .members
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
    {
        // A watcher that does not keep up misses copies; the servers do not wait.
        let _ = tx.try_send(body.clone());
    }
}

#[async_trait]
impl Publisher for MemoryPublisher {
    async fn send(&self, address: &Address, message: Outgoing) -> Result<()> {
        Error::check_size(message.body.len(), self.bus.max_message_size)?;
        let queue_tx = match address {
            Address::Topic { exchange, topic } => self.route(
                address,
                exchange,
                topic,
                || QueueKey::Topic(exchange.clone(), topic.clone()),
                &message.body,
            ),
            Address::Server {
                exchange,
                topic,
                server,
            } => self.route(
                address,
                exchange,
                topic,
                || QueueKey::Server(exchange.clone(), topic.clone(), server.clone()),
                &message.body,
            ),
            Address::Fanout { exchange, topic } => {
                if let Some(taps) = self.bus.taps.get(&(exchange.clone(), topic.clone())) {
                    tap(&taps, &message.body);
                }
                let members: Vec<Sender<Bytes>> =
                    match self.bus.fanouts.get(&(exchange.clone(), topic.clone())) {
                        Some(group) => group
                            .members
                            .read()
                            .unwrap_or_else(|e| e.into_inner())
                            .iter()
                            .map(|(_, tx)| tx.clone())
                            .collect(),
                        None => Vec::new(),
                    };
                if members.is_empty() {
                    tracing::debug!(%address, "fanout with no server listening; dropped");
                }
                for tx in members {
                    // A member that left meanwhile simply misses the copy.
                    let _ = tx.send(message.body.clone()).await;
                }
                return Ok(());
            }
            Address::Notification { exchange, key } => {
                return notify::publish(&self.bus, exchange, key, message.body, address).await;
            }
            Address::Reply(queue) => {
                let tx = self.bus.replies.get(queue).map(|tx| tx.value().clone());
                match tx {
                    Some(tx) => tx,
                    None if message.mandatory => {
                        return Err(Error::Undeliverable {
                            address: address.to_string(),
                        });
                    }
                    None => return Ok(()),
                }
            }
        };
        queue_tx
            .send(message.body)
            .await
            .map_err(|_| Error::Undeliverable {
                address: address.to_string(),
            })
    }
}

/// The three queues a server reads, and its fanout membership.
struct Sources {
    topic: Queue,
    direct: Queue,
    fanout: Queue,
    _membership: FanoutMembership,
}

/// Leaves the fanout group when the server's consumer goes away.
struct FanoutMembership {
    group: Arc<FanoutGroup>,
    id: u64,
}

impl Drop for FanoutMembership {
    fn drop(&mut self) {
        self.group
            .members
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(id, _)| *id != self.id);
    }
}

struct ServerConsumer {
    sources: Option<Sources>,
    bus: Arc<Bus>,
}

impl ServerConsumer {
    fn delivery(&self, body: Bytes, queue: &Queue) -> Delivery {
        Delivery::new(
            body.clone(),
            Box::new(MemoryAcker {
                body: Some(body),
                requeue_to: queue.tx.clone(),
                bus: self.bus.clone(),
            }),
        )
    }
}

#[async_trait]
impl Consumer for ServerConsumer {
    async fn recv(&mut self) -> Option<Result<Delivery>> {
        let sources = self.sources.as_ref()?;
        // Each `recv` future is cancel-safe: a message leaves its queue only when the
        // future completes, so the branches that lose the race lose nothing.
        let (body, queue) = tokio::select! {
            Ok(body) = sources.topic.rx.recv() => (body, &sources.topic),
            Ok(body) = sources.direct.rx.recv() => (body, &sources.direct),
            Ok(body) = sources.fanout.rx.recv() => (body, &sources.fanout),
            else => return None,
        };
        Some(Ok(self.delivery(body, queue)))
    }

    async fn stop(&mut self) -> Result<()> {
        // Messages not taken yet stay in the shared queues for other servers.
        self.sources = None;
        Ok(())
    }
}

/// A watcher's copy of a topic's traffic.
struct TapConsumer {
    queue: Queue,
    _membership: FanoutMembership,
}

#[async_trait]
impl Consumer for TapConsumer {
    async fn recv(&mut self) -> Option<Result<Delivery>> {
        self.queue.next_copy().await
    }

    async fn stop(&mut self) -> Result<()> {
        self.queue.rx.close();
        Ok(())
    }
}

struct ReplyConsumer {
    queue: Queue,
    address: String,
    bus: Arc<Bus>,
}

impl Drop for ReplyConsumer {
    fn drop(&mut self) {
        self.bus.replies.remove(&self.address);
        self.queue.rx.close();
    }
}

#[async_trait]
impl Consumer for ReplyConsumer {
    async fn recv(&mut self) -> Option<Result<Delivery>> {
        self.queue.next_copy().await
    }

    async fn stop(&mut self) -> Result<()> {
        self.bus.replies.remove(&self.address);
        self.queue.rx.close();
        Ok(())
    }
}

/// Settles a delivery; one dropped unsettled goes back to its queue.
struct MemoryAcker {
    /// The body to put back if the delivery is requeued or dropped unsettled.
    body: Option<Bytes>,
    requeue_to: Sender<Bytes>,
    bus: Arc<Bus>,
}

impl MemoryAcker {
    fn requeue(&mut self) {
        let Some(body) = self.body.take() else { return };
        match self.requeue_to.try_send(body) {
            Ok(()) | Err(TrySendError::Closed(_)) => {}
            Err(TrySendError::Full(body)) => {
                let tx = self.requeue_to.clone();
                match tokio::runtime::Handle::try_current() {
                    Ok(runtime) => {
                        runtime.spawn(async move {
                            let _ = tx.send(body).await;
                        });
                    }
                    Err(_) => tracing::warn!("queue full and no runtime; requeued message lost"),
                }
            }
        }
    }
}

#[async_trait]
impl Acker for MemoryAcker {
    async fn ack(mut self: Box<Self>) -> Result<()> {
        self.body = None;
        Ok(())
    }

    async fn reject(mut self: Box<Self>, requeue: bool) -> Result<()> {
        if requeue {
            self.requeue();
        } else {
            self.body = None;
            self.bus.rejected.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

impl Drop for MemoryAcker {
    fn drop(&mut self) {
        self.requeue();
    }
}

#[cfg(test)]
mod tests {
    use super::{MemoryConfig, MemoryTransport};

    #[test]
    fn url_options_are_positive_integers_and_unknown_ones_are_named() {
        let bus = MemoryTransport::connect("memory://?capacity=3&max_message_size=100")
            .expect("valid options");
        assert_eq!((bus.bus.capacity, bus.bus.max_message_size), (3, 100));
        for (url, expected) in [
            (
                "memory://?capacity=0",
                "memory URL: option capacity must be a positive integer",
            ),
            (
                "memory://?max_message_size=-1",
                "option max_message_size must be a positive integer",
            ),
            (
                "memory://?colour=red",
                "unknown option \"colour\" (known: capacity, max_message_size)",
            ),
        ] {
            let err = MemoryTransport::connect(url).expect_err(url);
            assert!(err.to_string().contains(expected), "{url}: {err}");
        }
    }

    #[test]
    fn a_config_built_in_code_sets_the_bus_and_refuses_zero_bounds() {
        let config = MemoryConfig::default().capacity(7).max_message_size(70);
        let bus = MemoryTransport::with_config("", config).expect("valid config");
        assert_eq!((bus.bus.capacity, bus.bus.max_message_size), (7, 70));
        let zero = MemoryTransport::with_config("x", MemoryConfig::default().capacity(0));
        assert!(matches!(zero, Err(rpc_core::Error::InvalidConfig(_))));
    }
}
