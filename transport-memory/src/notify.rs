//! Notifications on the memory bus: a queue per name (the default group's is named
//! after its routing key, a pool's after the pool), bound to the routing keys of an
//! exchange, as oslo.messaging's RabbitMQ topology has them.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use rpc_core::{Address, Consumer, Delivery, Error, NotificationSource, Result};

use crate::{Bus, MemoryAcker, Queue, QueueKey};

impl Bus {
    /// Binds the notification queue `name` of `exchange` to `key` (once) and
    /// returns the queue.
    fn bind_notifications(&self, exchange: &str, key: &str, name: &str) -> Queue {
        let queue = self.queue(QueueKey::Notification(exchange.to_owned(), name.to_owned()));
        let bound = self
            .bindings
            .entry((exchange.to_owned(), key.to_owned()))
            .or_default()
            .clone();
        let mut names = bound.write().unwrap_or_else(|e| e.into_inner());
        if !names.iter().any(|n| n == name) {
            names.push(name.to_owned());
        }
        queue
    }
}

/// The consumer of a notification listener: binds its queues to every route of
/// `source`, each name once.
pub(crate) fn listen(bus: &Arc<Bus>, source: &NotificationSource) -> NotificationConsumer {
    let mut queues: Vec<(String, String, Queue)> = Vec::new();
    for (exchange, key) in source.routes() {
        let name = source.pool.as_deref().unwrap_or(key);
        let queue = bus.bind_notifications(exchange, key, name);
        if !queues.iter().any(|(e, n, _)| e == exchange && n == name) {
            queues.push((exchange.to_owned(), name.to_owned(), queue));
        }
    }
    NotificationConsumer {
        queues: queues.into_iter().map(|(_, _, queue)| queue).collect(),
        bus: bus.clone(),
    }
}

/// Sends `body` to every queue bound to `key` of `exchange`.
pub(crate) async fn publish(
    bus: &Bus,
    exchange: &str,
    key: &str,
    body: Bytes,
    address: &Address,
) -> Result<()> {
    // The default group's queue exists from the first send, as the oslo notifier
    // declares it: nothing is lost before a listener.
    bus.bind_notifications(exchange, key, key);
    let names = bus
        .bindings
        .get(&(exchange.to_owned(), key.to_owned()))
        .map(|bound| bound.read().unwrap_or_else(|e| e.into_inner()).clone())
        .unwrap_or_default();
    for name in names {
        let queue = bus.queue(QueueKey::Notification(exchange.to_owned(), name));
        queue
            .tx
            .send(body.clone())
            .await
            .map_err(|_| Error::Undeliverable {
                address: address.to_string(),
            })?;
    }
    Ok(())
}

/// A notification listener's queues: the default group's of each key, or its pool's.
pub(crate) struct NotificationConsumer {
    queues: Vec<Queue>,
    bus: Arc<Bus>,
}

#[async_trait]
impl Consumer for NotificationConsumer {
    async fn recv(&mut self) -> Option<Result<Delivery>> {
        if self.queues.is_empty() {
            return None;
        }
        // Each `recv` future is cancel-safe: a message leaves its queue only when the
        // future completes.
        let waiting = self.queues.iter().map(|queue| Box::pin(queue.rx.recv()));
        let (received, index, _) = futures::future::select_all(waiting).await;
        let body = received.ok()?;
        let queue = &self.queues[index];
        Some(Ok(Delivery::new(
            body.clone(),
            Box::new(MemoryAcker {
                body: Some(body),
                requeue_to: queue.tx.clone(),
                bus: self.bus.clone(),
            }),
        )))
    }

    async fn stop(&mut self) -> Result<()> {
        // Messages not taken stay in the queues for the other listeners.
        self.queues.clear();
        Ok(())
    }
}
