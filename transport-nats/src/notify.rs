//! A notification listener's consumer: the pulls of its routes' durable consumers
//! (`jetstream::notification_pulls`), and its connection reported to the listener's
//! health as the client's events tell it.

use std::sync::Arc;

use async_trait::async_trait;
use futures::StreamExt;
use rpc_core::transport::Merged;
use rpc_core::{Consumer, Delivery, Error, ListenOptions, NotificationSource, Result};

use crate::{Deliveries, Shared, nats_error};

pub(crate) struct NotificationConsumer {
    pulls: Merged<Deliveries>,
    /// Reports the connection (lost, restored) to the listener's status.
    watch: Option<tokio::task::JoinHandle<()>>,
    shared: Arc<Shared>,
}

impl NotificationConsumer {
    /// Sets up the stream of each exchange of `source` and its group's durable
    /// consumer of each route (created when missing), so that once this returns
    /// every notification sent is kept for the group.
    pub(crate) async fn start(
        shared: Arc<Shared>,
        source: &NotificationSource,
        options: &ListenOptions,
    ) -> Result<Self> {
        if source.routes().next().is_none() {
            return Err(Error::InvalidTarget(
                "a notification listener needs at least one notification address".to_owned(),
            ));
        }
        let pulls = crate::jetstream::notification_pulls(
            &shared.notify_js,
            &shared.config,
            source,
            options.prefetch,
            &options.budget,
        )
        .await?;
        // async-nats reconnects and subscribes again by itself; the pulls send new
        // requests when theirs are lost. The client's events are all there is to say.
        let connection = options.status.connection();
        let mut connected = shared.connected.subscribe();
        let watch = tokio::spawn(async move {
            loop {
                if *connected.borrow_and_update() {
                    connection.restored();
                } else {
                    connection.lost();
                }
                // Ends with the transport.
                if connected.changed().await.is_err() {
                    break;
                }
            }
        });
        Ok(NotificationConsumer {
            pulls,
            watch: Some(watch),
            shared,
        })
    }
}

#[async_trait]
impl Consumer for NotificationConsumer {
    async fn recv(&mut self) -> Option<Result<Delivery>> {
        // Cancel-safe: a pull loop hands a message out only as its poll completes.
        self.pulls.next().await
    }

    async fn stop(&mut self) -> Result<()> {
        // Dropping the pulls stops pulling. Messages pulled and not handed out go
        // back to the stream after `ack_wait`, for any listener of the group.
        self.pulls = Merged::new();
        if let Some(watch) = self.watch.take() {
            watch.abort();
        }
        Ok(())
    }

    async fn close(&mut self) -> Result<()> {
        // The acks of the last handlers may still sit in the client's write buffer.
        match tokio::time::timeout(crate::ROUND_TRIP_LIMIT, self.shared.client.flush()).await {
            Ok(flushed) => flushed.map_err(|e| nats_error("flushing the last acks", e)),
            Err(_) => Err(Error::transport_msg(
                rpc_core::TransportErrorKind::Disconnected,
                "the last acks could not be flushed (disconnected)",
            )),
        }
    }
}

impl Drop for NotificationConsumer {
    fn drop(&mut self) {
        if let Some(watch) = self.watch.take() {
            watch.abort();
        }
    }
}
