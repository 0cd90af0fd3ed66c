//! `NotificationListener`: takes notifications and hands each to the endpoints that
//! handle its priority and pass their filter, as oslo.messaging's notification
//! listener; acknowledges each once they are done, or hands it back to the broker
//! when a handler asks and the listener allows it.

use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{Notification, NotificationFilter, Priority};
use crate::error::{Error, Result};
use crate::logs::Throttle;
use crate::server::{DEFAULT_CONCURRENCY, DEFAULT_GRACE_PERIOD};
use crate::target::Target;
use crate::transport::{Address, Consumer, Delivery, ListenOptions, NotificationSource, Transport};
use crate::wire;

/// What a handler did with a notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NotificationResult {
    /// Done: the notification is acknowledged.
    #[default]
    Handled,
    /// Not now: the broker delivers it again, when the listener allows requeues
    /// ([`NotificationListenerBuilder::allow_requeue`]); otherwise it is
    /// acknowledged as handled, as oslo.messaging does.
    Requeue,
}

type Handler = Arc<dyn Fn(Notification) -> BoxFuture<'static, NotificationResult> + Send + Sync>;

/// Handlers per priority, behind an optional filter: oslo's notification endpoint
/// with its methods `info`, `warn`, ... and its `filter_rule`.
#[derive(Clone, Default)]
pub struct NotificationEndpoint {
    filter: Option<NotificationFilter>,
    handlers: [Option<Handler>; 7],
}

impl fmt::Debug for NotificationEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NotificationEndpoint")
            .field("priorities", &self.priorities().collect::<Vec<_>>())
            .field("filter", &self.filter)
            .finish()
    }
}

impl NotificationEndpoint {
    /// An endpoint that handles nothing yet.
    pub fn new() -> Self {
        NotificationEndpoint::default()
    }

    /// Only notifications that pass `filter` reach this endpoint's handlers; the
    /// others are acknowledged without them.
    pub fn filter(mut self, filter: NotificationFilter) -> Self {
        self.filter = Some(filter);
        self
    }

    /// Handles the notifications of `priority` with `handler`. A handler that
    /// panics counts as one that asked for a requeue, as an exception does in oslo.
    pub fn on<F, Fut>(mut self, priority: Priority, handler: F) -> Self
    where
        F: Fn(Notification) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = NotificationResult> + Send + 'static,
    {
        self.handlers[priority as usize] = Some(Arc::new(move |n| handler(n).boxed()));
        self
    }

    /// Handles the notifications of every priority with `handler`.
    pub fn on_every<F, Fut>(mut self, handler: F) -> Self
    where
        F: Fn(Notification) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = NotificationResult> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |n| handler(n).boxed());
        self.handlers = std::array::from_fn(|_| Some(handler.clone()));
        self
    }

    /// The priorities this endpoint handles.
    pub fn priorities(&self) -> impl Iterator<Item = Priority> + '_ {
        Priority::ALL
            .into_iter()
            .filter(|p| self.handlers[*p as usize].is_some())
    }
}

/// Builds a [`NotificationListener`].
pub struct NotificationListenerBuilder {
    transport: Arc<dyn Transport>,
    targets: Vec<Target>,
    endpoints: Vec<NotificationEndpoint>,
    pool: Option<String>,
    allow_requeue: bool,
    concurrency: usize,
    grace_period: Duration,
}

impl fmt::Debug for NotificationListenerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NotificationListenerBuilder")
            .field("transport", &self.transport.name())
            .field("targets", &self.targets)
            .field("endpoints", &self.endpoints)
            .field("pool", &self.pool)
            .field("allow_requeue", &self.allow_requeue)
            .field("concurrency", &self.concurrency)
            .field("grace_period", &self.grace_period)
            .finish()
    }
}

impl NotificationListenerBuilder {
    /// Adds an endpoint. Every endpoint that handles a notification's priority and
    /// whose filter it passes gets it, in the order they were added.
    pub fn endpoint(mut self, endpoint: NotificationEndpoint) -> Self {
        self.endpoints.push(endpoint);
        self
    }

    /// Listens as a member of `pool`: the listeners of one pool share the
    /// notifications, and each pool (and the listeners without one) gets every
    /// notification sent after the pool first listened.
    pub fn pool(mut self, pool: impl Into<String>) -> Self {
        self.pool = Some(pool.into());
        self
    }

    /// Lets handlers hand notifications back to the broker
    /// ([`NotificationResult::Requeue`]); off by default, as in oslo.messaging.
    pub fn allow_requeue(mut self, allow: bool) -> Self {
        self.allow_requeue = allow;
        self
    }

    /// At most this many notifications handled at once (default
    /// [`DEFAULT_CONCURRENCY`]); the others wait at the broker.
    pub fn concurrency(mut self, limit: usize) -> Self {
        self.concurrency = limit.max(1);
        self
    }

    /// How long [`NotificationListener::shutdown`] lets handlers run (default
    /// [`DEFAULT_GRACE_PERIOD`]); notifications still unfinished then are not
    /// acknowledged, so the broker delivers them again.
    pub fn grace_period(mut self, grace: Duration) -> Self {
        self.grace_period = grace;
        self
    }

    /// Subscribes, then handles notifications until shut down.
    pub async fn start(self) -> Result<NotificationListener> {
        let priorities: BTreeSet<Priority> = self
            .endpoints
            .iter()
            .flat_map(NotificationEndpoint::priorities)
            .collect();
        if priorities.is_empty() {
            return Err(Error::InvalidArguments(
                "a notification listener needs an endpoint that handles a priority".to_owned(),
            ));
        }
        if self.targets.is_empty() {
            return Err(Error::InvalidArguments(
                "a notification listener needs a target".to_owned(),
            ));
        }
        let mut addresses = Vec::new();
        for target in &self.targets {
            target.require_topic()?;
            let exchange = target.exchange_or(self.transport.default_exchange());
            for priority in &priorities {
                addresses.push(Address::Notification {
                    exchange: exchange.to_owned(),
                    key: priority.key(&target.topic),
                });
            }
        }
        if let Some(pool) = &self.pool
            && pool.is_empty()
        {
            return Err(Error::InvalidArguments(
                "a notification pool needs a name".to_owned(),
            ));
        }
        let source = NotificationSource::new(addresses, self.pool.clone());
        let options = ListenOptions::new(self.concurrency);
        let consumer = self
            .transport
            .listen_notifications(&source, &options)
            .await?;
        let stop = CancellationToken::new();
        let listening = Listening {
            endpoints: self.endpoints.into(),
            allow_requeue: self.allow_requeue,
            rejections: Arc::new(Throttle::default()),
        };
        let task = tokio::spawn(listen(
            consumer,
            Arc::new(listening),
            Arc::new(Semaphore::new(self.concurrency)),
            stop.clone(),
            self.grace_period,
        ));
        Ok(NotificationListener { stop, task })
    }
}

/// Handles notifications in the background until shut down.
///
/// ```
/// # async fn demo(transport: std::sync::Arc<dyn mqrpc::Transport>) -> mqrpc::Result<()> {
/// use mqrpc::Target;
/// use mqrpc::notify::{NotificationEndpoint, NotificationListener, NotificationResult, Priority};
/// let endpoint = NotificationEndpoint::new().on(Priority::Info, |n| async move {
///     println!("{} from {}", n.event_type, n.publisher_id);
///     NotificationResult::Handled
/// });
/// let listener = NotificationListener::builder(transport, [Target::new("notifications")])
///     .endpoint(endpoint)
///     .start()
///     .await?;
/// listener.shutdown().await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct NotificationListener {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<()>>,
}

impl NotificationListener {
    /// A listener of the notifications sent to `targets` (their topics, and
    /// exchanges where set), on `transport`.
    pub fn builder(
        transport: Arc<dyn Transport>,
        targets: impl IntoIterator<Item = Target>,
    ) -> NotificationListenerBuilder {
        NotificationListenerBuilder {
            transport,
            targets: targets.into_iter().collect(),
            endpoints: Vec::new(),
            pool: None,
            allow_requeue: false,
            concurrency: DEFAULT_CONCURRENCY,
            grace_period: DEFAULT_GRACE_PERIOD,
        }
    }

    /// Stops taking notifications, lets the ones being handled finish within the
    /// grace period, and releases the subscription.
    pub async fn shutdown(mut self) -> Result<()> {
        self.stop.cancel();
        match (&mut self.task).await {
            Ok(result) => result,
            Err(err) => Err(Error::transport(
                crate::error::TransportErrorKind::Other,
                "the notification listener's task failed",
                err,
            )),
        }
    }
}

impl Drop for NotificationListener {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct Listening {
    endpoints: Arc<[NotificationEndpoint]>,
    allow_requeue: bool,
    rejections: Arc<Throttle>,
}

impl Listening {
    /// Decodes, dispatches and settles one delivery.
    async fn handle(&self, delivery: Delivery) {
        let (body, acker) = delivery.into_parts();
        let notification =
            match wire::decode_notification(&body).and_then(Notification::from_message) {
                Ok(notification) => notification,
                Err(err) => {
                    if let Some(suppressed) = self.rejections.hit() {
                        tracing::warn!(error = %err, suppressed, size = body.len(),
                        "rejecting a message that is not a notification");
                    }
                    if let Err(err) = acker.reject(false).await {
                        tracing::warn!(error = %err, "could not reject a malformed notification");
                    }
                    return;
                }
            };
        let result = self.dispatch(notification).await;
        let settled = match result {
            NotificationResult::Requeue if self.allow_requeue => acker.reject(true).await,
            _ => acker.ack().await,
        };
        if let Err(err) = settled {
            tracing::warn!(error = %err, ?result, "could not settle a notification");
        }
    }

    /// Runs every endpoint that takes `notification`; a requeue (or a panic) by any
    /// of them makes the result a requeue.
    async fn dispatch(&self, notification: Notification) -> NotificationResult {
        let mut result = NotificationResult::Handled;
        for endpoint in self.endpoints.iter() {
            let Some(handler) = &endpoint.handlers[notification.priority as usize] else {
                continue;
            };
            if endpoint
                .filter
                .as_ref()
                .is_some_and(|filter| !filter.matches(&notification))
            {
                continue;
            }
            let handled = AssertUnwindSafe(handler(notification.clone()))
                .catch_unwind()
                .await;
            match handled {
                Ok(NotificationResult::Handled) => {}
                Ok(NotificationResult::Requeue) => result = NotificationResult::Requeue,
                Err(_) => {
                    tracing::warn!(event_type = %crate::logs::Escaped(&notification.event_type),
                        "a notification handler panicked");
                    result = NotificationResult::Requeue;
                }
            }
        }
        result
    }
}

async fn listen(
    mut consumer: Box<dyn Consumer>,
    listening: Arc<Listening>,
    slots: Arc<Semaphore>,
    stop: CancellationToken,
    grace: Duration,
) -> Result<()> {
    let mut running = JoinSet::new();
    loop {
        while running.try_join_next().is_some() {}
        let permit = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            permit = slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let delivery = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            delivery = consumer.recv() => delivery,
        };
        match delivery {
            None => break,
            Some(Err(err)) => {
                tracing::warn!(error = %err, "notification consumer: {err}");
                drop(permit);
            }
            Some(Ok(delivery)) => {
                let listening = listening.clone();
                running.spawn(async move {
                    listening.handle(delivery).await;
                    drop(permit);
                });
            }
        }
    }
    let stopped = consumer.stop().await;
    let finished = tokio::time::timeout(grace, async {
        while running.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        tracing::warn!(
            unfinished = running.len(),
            ?grace,
            "grace period over: notifications still being handled are left to the broker"
        );
        running.shutdown().await;
    }
    consumer.close().await?;
    stopped
}
