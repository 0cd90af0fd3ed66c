//! `Notifier`: sends notifications, as oslo.messaging's `Notifier` with the
//! `messagingv2` driver.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::OnceCell;

use super::{DEFAULT_NOTIFICATION_TOPIC, Priority, oslo_timestamp};
use crate::client::RetryPolicy;
use crate::context::Context;
use crate::error::{Error, Result};
use crate::timing::DEFAULT_TIMEOUT;
use crate::transport::{Address, Outgoing, Publisher, Transport};
use crate::wire::{self, NotificationMessage};

/// Sends notifications to `<topic>.<priority>` on each of its topics.
///
/// Each send returns once every topic's broker has the message (confirmed where the
/// backend confirms casts). Clones share the connection.
///
/// ```
/// # async fn demo(transport: std::sync::Arc<dyn mqrpc::Transport>) -> mqrpc::Result<()> {
/// use mqrpc::{Context, notify::Notifier};
/// let notifier = Notifier::new(transport, "compute.host1");
/// notifier
///     .info(&Context::new(), "compute.instance.create.end", serde_json::json!({"id": 7}))
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Notifier {
    shared: Arc<Shared>,
    publisher_id: String,
    topics: Vec<String>,
    exchange: Option<String>,
    retry: Option<RetryPolicy>,
    timeout: Duration,
}

struct Shared {
    transport: Arc<dyn Transport>,
    publisher: OnceCell<Arc<dyn Publisher>>,
}

impl fmt::Debug for Notifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Notifier")
            .field("transport", &self.shared.transport.name())
            .field("publisher_id", &self.publisher_id)
            .field("topics", &self.topics)
            .field("exchange", &self.exchange)
            .finish_non_exhaustive()
    }
}

impl Notifier {
    /// A notifier on `transport` whose notifications say they come from
    /// `publisher_id`, to the topic [`DEFAULT_NOTIFICATION_TOPIC`].
    pub fn new(transport: Arc<dyn Transport>, publisher_id: impl Into<String>) -> Self {
        Notifier {
            shared: Arc::new(Shared {
                transport,
                publisher: OnceCell::new(),
            }),
            publisher_id: publisher_id.into(),
            topics: vec![DEFAULT_NOTIFICATION_TOPIC.to_owned()],
            exchange: None,
            retry: None,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Sends to these topics instead (each notification goes to every one).
    pub fn topics<I, S>(mut self, topics: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.topics = topics.into_iter().map(Into::into).collect();
        self
    }

    /// Sends in this exchange instead of the transport's default (oslo's control
    /// exchange).
    pub fn exchange(mut self, exchange: impl Into<String>) -> Self {
        self.exchange = Some(exchange.into());
        self
    }

    /// A copy to change settings on, as oslo's `Notifier.prepare()`.
    pub fn prepare(&self) -> Notifier {
        self.clone()
    }

    /// Says the notifications come from `publisher_id`.
    pub fn publisher_id(mut self, publisher_id: impl Into<String>) -> Self {
        self.publisher_id = publisher_id.into();
        self
    }

    /// Sends again after a retryable failure (a lost connection), by `policy`; the
    /// copy sent again is the same message, with the same ids.
    pub fn retry(mut self, policy: impl Into<Option<RetryPolicy>>) -> Self {
        self.retry = policy.into();
        self
    }

    /// How long one send may take before it fails with [`Error::Timeout`] (default
    /// [`DEFAULT_TIMEOUT`]).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Who the notifications say they come from.
    pub fn publisher(&self) -> &str {
        &self.publisher_id
    }

    /// Sends a notification of `priority`.
    pub async fn notify<P: Serialize>(
        &self,
        ctx: &Context,
        priority: Priority,
        event_type: &str,
        payload: P,
    ) -> Result<()> {
        if self.topics.is_empty() {
            return Err(Error::InvalidTarget(
                "a notifier needs at least one topic".to_owned(),
            ));
        }
        let payload = serde_json::to_value(payload)
            .map_err(|e| Error::InvalidArguments(format!("payload does not encode: {e}")))?;
        let message = NotificationMessage {
            message_id: uuid::Uuid::new_v4().to_string(),
            publisher_id: self.publisher_id.clone(),
            event_type: event_type.to_owned(),
            priority: priority.wire_name().to_owned(),
            payload,
            timestamp: oslo_timestamp(SystemTime::now()),
            context: ctx.clone(),
            unique_id: Some(wire::new_id()),
        };
        let body = bytes::Bytes::from(wire::encode_notification(&message)?);
        if let Some(limit) = self.shared.transport.capabilities().max_message_size {
            Error::check_size(body.len(), limit)?;
        }
        let exchange = self
            .exchange
            .as_deref()
            .unwrap_or_else(|| self.shared.transport.default_exchange());
        for topic in &self.topics {
            let address = Address::Notification {
                exchange: exchange.to_owned(),
                key: priority.key(topic),
            };
            let send = || self.send(&address, body.clone());
            match &self.retry {
                None => send().await?,
                Some(policy) => policy.run(event_type, |_| send()).await?,
            }
        }
        Ok(())
    }

    async fn send(&self, address: &Address, body: bytes::Bytes) -> Result<()> {
        let started = tokio::time::Instant::now();
        let sending = async {
            let publisher = self
                .shared
                .publisher
                .get_or_try_init(|| self.shared.transport.publisher())
                .await?;
            publisher.send(address, Outgoing::new(body)).await
        };
        match tokio::time::timeout(self.timeout, sending).await {
            Ok(sent) => sent,
            Err(_) => Err(Error::Timeout {
                msg_id: String::new(),
                topic: address.to_string(),
                broker: self.shared.transport.describe(),
                waited: started.elapsed(),
                kind: crate::error::TimeoutKind::Publish,
            }),
        }
    }

    /// Sends an `audit` notification.
    pub async fn audit<P: Serialize>(
        &self,
        ctx: &Context,
        event_type: &str,
        payload: P,
    ) -> Result<()> {
        self.notify(ctx, Priority::Audit, event_type, payload).await
    }

    /// Sends a `debug` notification.
    pub async fn debug<P: Serialize>(
        &self,
        ctx: &Context,
        event_type: &str,
        payload: P,
    ) -> Result<()> {
        self.notify(ctx, Priority::Debug, event_type, payload).await
    }

    /// Sends an `info` notification.
    pub async fn info<P: Serialize>(
        &self,
        ctx: &Context,
        event_type: &str,
        payload: P,
    ) -> Result<()> {
        self.notify(ctx, Priority::Info, event_type, payload).await
    }

    /// Sends a `warn` notification (oslo's `warn` and `warning`).
    pub async fn warn<P: Serialize>(
        &self,
        ctx: &Context,
        event_type: &str,
        payload: P,
    ) -> Result<()> {
        self.notify(ctx, Priority::Warn, event_type, payload).await
    }

    /// Sends an `error` notification.
    pub async fn error<P: Serialize>(
        &self,
        ctx: &Context,
        event_type: &str,
        payload: P,
    ) -> Result<()> {
        self.notify(ctx, Priority::Error, event_type, payload).await
    }

    /// Sends a `critical` notification.
    pub async fn critical<P: Serialize>(
        &self,
        ctx: &Context,
        event_type: &str,
        payload: P,
    ) -> Result<()> {
        self.notify(ctx, Priority::Critical, event_type, payload)
            .await
    }

    /// Sends a `sample` notification.
    pub async fn sample<P: Serialize>(
        &self,
        ctx: &Context,
        event_type: &str,
        payload: P,
    ) -> Result<()> {
        self.notify(ctx, Priority::Sample, event_type, payload)
            .await
    }
}
