//! Publishing with publisher confirms on one shared channel. Every publish awaits its
//! own confirm, so many publishes are in flight at once (pipelined), not one round
//! trip at a time. A lost connection is re-opened and the publish retried until the
//! caller's deadline; a refusal by the broker is returned as it is.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, PublisherConfirm};

use crate::config::Compression;
use rpc_core::{Address, Error, Outgoing, Publisher, Result};

use crate::link::Link;
use crate::topology::{self, lapin_error, short};

/// A confirm-mode channel and the exchanges already declared on it.
struct PublishChannel {
    channel: Channel,
    connection: Arc<lapin::Connection>,
    generation: usize,
    declared: Arc<Mutex<HashSet<String>>>,
}

pub(crate) struct AmqpPublisher {
    link: Arc<Link>,
    /// Shared, not cloned per publish: a lapin `Channel` is a dozen reference counts.
    current: Mutex<Option<Arc<PublishChannel>>>,
    opening: tokio::sync::Mutex<()>,
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
}

impl AmqpPublisher {
    pub(crate) fn new(link: Arc<Link>) -> Self {
        AmqpPublisher {
            link,
            current: Mutex::new(None),
            opening: tokio::sync::Mutex::new(()),
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

    /// Declares the exchange a publish needs, once per channel.
    async fn ensure_exchange(&self, pc: &PublishChannel, address: &Address) -> Result<()> {
        let (name, fanout_topic) = match address {
            Address::Topic { exchange, .. } | Address::Server { exchange, .. } => {
                (exchange.clone(), None)
            }
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
            Some(topic) => topology::declare_fanout_exchange(&pc.channel, topic).await?,
            None => topology::declare_topic_exchange(&pc.channel, &self.link.config, &name).await?,
        }
        pc.declared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name);
        Ok(())
    }

    async fn attempt(
        &self,
        address: &Address,
        message: &Outgoing,
    ) -> std::result::Result<(), Failure> {
        let pc = self.channel().await.map_err(Failure::Connection)?;
        // With the connection still up, the broker refused this publish (and may have
        // closed the channel); with it down, the publish is worth retrying.
        let classify = |err: Error| {
            if pc.connection.status().connected() || self.link.closed.is_cancelled() {
                Failure::Refused(err)
            } else {
                Failure::Connection(err)
            }
        };
        let outcome = async {
            self.ensure_exchange(&pc, address).await?;
            let (exchange, routing_key) = route(address);
            let mut properties = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_content_encoding("utf-8".into())
                .with_delivery_mode(if self.link.config.durable_queues() {
                    2
                } else {
                    1
                });
            if let Some(compression) = self.link.config.compression {
                let mut headers = lapin::types::FieldTable::default();
                headers.insert(
                    "compression".into(),
                    lapin::types::AMQPValue::LongString(compression.header().into()),
                );
                properties = properties.with_headers(headers);
            }
            if let Some(ttl) = message.time_to_live {
                properties = properties.with_expiration(ttl.as_millis().max(1).to_string().into());
            }
            let confirm = pc
                .channel
                .basic_publish(
                    short(&exchange)?,
                    short(&routing_key)?,
                    BasicPublishOptions {
                        mandatory: message.mandatory,
                        ..BasicPublishOptions::default()
                    },
                    &message.body,
                    properties,
                )
                .await
                .map_err(|e| lapin_error("publishing", e))?;
            let mut confirm = Confirm(Some(confirm));
            let confirmation = match confirm.wait().await {
                Ok(confirmation) => confirmation,
                // The message left; whether the broker routed it is unknown. Sending it
                // again could run a request twice, so only replies are retried.
                Err(err) if !matches!(address, Address::Reply(_)) => {
                    return Err(Error::transport(
                        format!(
                            "the broker connection failed before it confirmed the message to \
                             {address}; it may or may not have been delivered"
                        ),
                        err,
                    ));
                }
                Err(err) => return Err(lapin_error("waiting for the publisher confirm", err)),
            };
            match confirmation {
                Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
                // lapin pairs returns with confirms by order, not by tag: a return is
                // this message's only if it carries this body (each has its own
                // `_unique_id`).
                Confirmation::Ack(Some(returned)) if returned.delivery.data == message.body[..] => {
                    Err(Error::Undeliverable {
                        address: address.to_string(),
                    })
                }
                Confirmation::Ack(Some(_)) => Ok(()),
                Confirmation::Nack(_) => Err(Error::transport_msg(format!(
                    "the broker refused the message to {address} (nack)"
                ))),
            }
        }
        .await;
        outcome.map_err(|err| match err {
            Error::Undeliverable { .. } | Error::InvalidTarget(_) => Failure::Refused(err),
            Error::Transport { ref message, .. }
                if message.contains("may or may not have been delivered") =>
            {
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
/// grow for as long as the load lasts. A dropped one is awaited on a task instead.
struct Confirm(Option<PublisherConfirm>);

impl Confirm {
    async fn wait(&mut self) -> lapin::Result<Confirmation> {
        let Some(confirm) = self.0.as_mut() else {
            return Ok(Confirmation::NotRequested);
        };
        let confirmation = confirm.await;
        self.0 = None;
        confirmation
    }
}

impl Drop for Confirm {
    fn drop(&mut self) {
        if let (Some(confirm), Ok(runtime)) = (self.0.take(), tokio::runtime::Handle::try_current())
        {
            runtime.spawn(async move {
                let _ = confirm.await;
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

/// gzip bodies larger than this are compressed on a blocking thread, not on the
/// caller's worker.
const COMPRESS_INLINE_LIMIT: usize = 64 * 1024;

/// `body` compressed as the URL asked. bzip2 always runs on a blocking thread: it sets
/// up megabytes of working memory even for a small body, and takes tens of
/// milliseconds per MiB.
async fn compressed(compression: Compression, body: bytes::Bytes) -> Result<bytes::Bytes> {
    if compression == Compression::Gzip && body.len() <= COMPRESS_INLINE_LIMIT {
        return Ok(compression.compress(&body).into());
    }
    tokio::task::spawn_blocking(move || compression.compress(&body).into())
        .await
        .map_err(|e| Error::transport("compressing a message", e))
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
    }
}

#[async_trait]
impl Publisher for AmqpPublisher {
    async fn send(&self, address: &Address, mut message: Outgoing) -> Result<()> {
        Error::check_size(message.body.len(), self.link.config.max_message_size)?;
        if let Some(compression) = self.link.config.compression {
            message.body = compressed(compression, message.body).await?;
        }
        let mut attempt = 0u32;
        let mut retried_on_new_channel = false;
        loop {
            match self.attempt(address, &message).await {
                Ok(()) => return Ok(()),
                Err(Failure::Refused(err)) => return Err(err),
                Err(Failure::ChannelClosed(err)) => {
                    if retried_on_new_channel {
                        return Err(err);
                    }
                    tracing::debug!(error = %err, %address, "channel closed by the broker; retrying once");
                    retried_on_new_channel = true;
                }
                Err(Failure::Connection(err)) => {
                    if self.link.closed.is_cancelled() {
                        return Err(Error::Closed);
                    }
                    let wait = self.link.backoff(attempt);
                    tracing::warn!(error = %err, %address, ?wait, "publish failed; retrying after reconnection");
                    attempt = attempt.saturating_add(1);
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}
