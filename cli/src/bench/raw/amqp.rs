//! The RabbitMQ baseline of `mqrpc bench --raw`, with lapin: the classic RPC pattern
//! (an exclusive request queue, replies to `reply_to` by `correlation_id`), and the
//! shapes that add publisher confirms and then oslo.messaging's messages.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context as _, Result};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use uuid::Uuid;

use super::waiters::{CloseOnDrop, Waiters};
use super::{Keep, Padding, connecting, padded};
use crate::bench::caller::{Caller, Pair};

/// Unacknowledged deliveries the AMQP echo server may hold.
const AMQP_PREFETCH: u16 = 256;

/// What a bare lapin echo pair puts on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AmqpShape {
    /// The classic RPC pattern, without publisher confirms.
    Plain,
    /// The classic pattern with publisher confirms on both publish channels (each
    /// publish awaits its confirm): what confirms alone cost the broker.
    Confirmed,
    /// The messages oslo.messaging (and so mqrpc) sends, made by the bare client:
    /// confirms; requests through a topic exchange, with oslo's per-message expiry and
    /// JSON content properties; mandatory replies; and bodies as long as mqrpc's
    /// envelopes (the payload padded by `padding`). What the broker costs for oslo's
    /// wire protocol, apart from mqrpc's code.
    Oslo(Padding),
}

/// The `amqp://` (or `amqps://`) URL lapin understands for an `amqp://`, `amqps://` or
/// oslo.messaging `rabbit://` URL: the first host only, no query, and the virtual host as
/// mqrpc reads it (none, empty or `/` mean `/`, sent as `%2f`). `ssl=true` (or `tls=true`)
/// in the query means `amqps://`.
pub(super) fn lapin_url(url: &str) -> Result<String> {
    let (scheme, rest) = url
        .split_once("://")
        .with_context(|| format!("not a URL: {url:?}"))?;
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let tls_option = query.split('&').any(|option| {
        option.split_once('=').is_some_and(|(key, value)| {
            matches!(key, "ssl" | "tls")
                && matches!(
                    value.to_ascii_lowercase().as_str(),
                    "1" | "true" | "yes" | "on"
                )
        })
    });
    let tls = scheme.eq_ignore_ascii_case("amqps") || tls_option;
    let (hosts, path) = match rest.split_once('/') {
        Some((hosts, path)) => (hosts, path),
        None => (rest, ""),
    };
    let host = hosts.split(',').next().unwrap_or_default();
    let host = if host.is_empty() { "localhost" } else { host };
    let vhost = match path {
        "" | "/" => "%2f",
        path => path,
    };
    let scheme = if tls { "amqps" } else { "amqp" };
    Ok(format!("{scheme}://{host}/{vhost}"))
}

/// Deletes the topic and server queues that servers of `left` (topic, server name)
/// leave once they stopped (oslo.messaging's queues persist).
pub(super) async fn delete_left(url: &str, left: &[(String, String)]) -> Result<()> {
    let mut names: Vec<String> = Vec::new();
    for (topic, server) in left {
        names.extend([topic.clone(), format!("{topic}.{server}")]);
    }
    names.sort();
    names.dedup();
    let connection = connect(&lapin_url(url)?, "raw-bench-cleanup".to_owned()).await?;
    let mut channel = connection.create_channel().await?;
    for queue in &names {
        let deleted = channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
        if let Err(err) = deleted {
            tracing::debug!("raw bench: cannot delete the queue {queue}: {err}");
            // A refusal closes the channel; the next queue needs another.
            channel = connection.create_channel().await?;
        }
    }
    let _ = connection.close(200, "bench done".into()).await;
    Ok(())
}

/// The AMQP RPC client: publish with `reply_to` and `correlation_id` (to the request
/// queue, or through the topic exchange in the oslo shape); replies come on one
/// exclusive queue.
struct AmqpCaller {
    /// Closes the connection (and so the reply queue) when the caller goes.
    _connection: Connection,
    publish: Channel,
    /// The default exchange, or the topic exchange in the oslo shape.
    exchange: ShortString,
    request_queue: ShortString,
    /// Every request's properties but its correlation id.
    properties: BasicProperties,
    /// Bytes added to each payload, and taken off each reply.
    padding: Padding,
    waiters: Arc<Waiters>,
}

#[async_trait]
impl Caller for AmqpCaller {
    async fn call(&self, payload: Bytes) -> Result<Bytes> {
        let id = Uuid::new_v4().simple().to_string();
        let waiting = self.waiters.register(&id)?;
        let properties = self.properties.clone().with_correlation_id(id.into());
        let size = payload.len();
        let body = padded(payload, self.padding.request);
        self.publish
            .basic_publish(
                self.exchange.clone(),
                self.request_queue.clone(),
                BasicPublishOptions::default(),
                &body,
                properties,
            )
            .await
            .context("cannot publish the request")?
            .await
            .context("cannot publish the request")?;
        let mut reply = waiting.reply().await?;
        reply.truncate(size);
        Ok(reply)
    }
}

/// A connection named `name`, within the connect timeout.
pub(super) async fn connect(url: &str, name: String) -> Result<Connection> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    connecting("to RabbitMQ", Connection::connect(url, properties)).await
}

/// A transient queue only this connection may consume, gone with it.
fn private_queue() -> QueueDeclareOptions {
    QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..QueueDeclareOptions::default()
    }
}

/// The properties oslo.messaging gives every message: a JSON body, not persistent.
fn oslo_properties() -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("utf-8".into())
        .with_delivery_mode(1)
}

/// How the echo server replies.
struct EchoReply {
    mandatory: bool,
    /// Every reply's properties but its correlation id.
    properties: BasicProperties,
    /// Bytes a request's body has beyond the reply's.
    shorter_by: usize,
}

/// The echo server's work for one request: publish its body (shortened to the reply's
/// length) to its `reply_to` with its `correlation_id`, await the confirm if the channel
/// has them, then ack it.
async fn echo(publish: &Channel, reply: &EchoReply, delivery: Delivery) {
    if let Some(reply_to) = delivery.properties.reply_to().clone() {
        let mut properties = reply.properties.clone();
        if let Some(correlation_id) = delivery.properties.correlation_id().clone() {
            properties = properties.with_correlation_id(correlation_id);
        }
        let body = &delivery.data[..delivery.data.len().saturating_sub(reply.shorter_by)];
        let published = match publish
            .basic_publish(
                ShortString::from(""),
                reply_to,
                BasicPublishOptions {
                    mandatory: reply.mandatory,
                    ..BasicPublishOptions::default()
                },
                body,
                properties,
            )
            .await
        {
            Ok(confirm) => confirm.await.map(drop),
            Err(err) => Err(err),
        };
        if let Err(err) = published {
            tracing::warn!("raw bench: AMQP echo server cannot reply: {err}");
        }
    }
    if let Err(err) = delivery.acker.ack(BasicAckOptions::default()).await {
        tracing::warn!("raw bench: AMQP echo server cannot ack: {err}");
    }
}

/// A channel for publishing, with publisher confirms when `confirms`.
async fn publish_channel(connection: &Connection, confirms: bool, side: &str) -> Result<Channel> {
    let channel = connection
        .create_channel()
        .await
        .with_context(|| format!("{side}: cannot open a channel"))?;
    if confirms {
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .with_context(|| format!("{side}: cannot enable confirms"))?;
    }
    Ok(channel)
}

/// The lapin echo pair of `shape` on the broker at `url` (as [`lapin_url`] gives it).
pub(super) async fn pair(url: &str, shape: AmqpShape) -> Result<Pair> {
    let id = Uuid::new_v4().simple().to_string();
    let request_queue = format!("raw-bench-{id}");
    let confirms = shape != AmqpShape::Plain;
    let padding = match shape {
        AmqpShape::Oslo(padding) => padding,
        AmqpShape::Plain | AmqpShape::Confirmed => Padding::NONE,
    };
    let oslo = matches!(shape, AmqpShape::Oslo(_));

    // The echo server, on its own connection.
    let server = connect(url, format!("raw-bench-server-{id}")).await?;
    let consume = server
        .create_channel()
        .await
        .context("server: cannot open a channel")?;
    let publish = publish_channel(&server, confirms, "server").await?;
    consume
        .queue_declare(
            request_queue.as_str().into(),
            private_queue(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("server: cannot declare the queue {request_queue}"))?;
    // In the oslo shape requests come through a topic exchange of their own, gone
    // with its only binding (the request queue's) when the server's connection closes.
    let exchange = if oslo {
        let exchange = format!("raw-bench-{id}-topic");
        consume
            .exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    auto_delete: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("server: cannot declare the exchange {exchange}"))?;
        let bound = consume
            .queue_bind(
                request_queue.as_str().into(),
                exchange.as_str().into(),
                request_queue.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await;
        if let Err(err) = bound {
            // Never bound, so never auto-deleted: delete it here (on a fresh channel,
            // the failed bind closed this one).
            if let Ok(channel) = server.create_channel().await {
                let options = ExchangeDeleteOptions::default();
                let _ = channel
                    .exchange_delete(exchange.as_str().into(), options)
                    .await;
            }
            return Err(err).context(format!("server: cannot bind {request_queue} to {exchange}"));
        }
        exchange
    } else {
        String::new()
    };
    let requests = consume_requests(&consume, &request_queue).await?;
    let reply = EchoReply {
        mandatory: oslo,
        properties: if oslo {
            oslo_properties()
        } else {
            BasicProperties::default()
        },
        shorter_by: padding.reply_shorter_by(),
    };
    let server_task = tokio::spawn(async move {
        // Owned here so that aborting the task closes the connection.
        let _server = server;
        let _consume = consume;
        let (publish, reply) = (&publish, &reply);
        // As many deliveries in hand at once as the prefetch lets through.
        requests
            .for_each_concurrent(usize::from(AMQP_PREFETCH), |delivery| async move {
                match delivery {
                    Ok(delivery) => echo(publish, reply, delivery).await,
                    Err(err) => tracing::warn!("raw bench: AMQP echo server stopped: {err}"),
                }
            })
            .await;
    });
    let keep = Keep {
        tasks: vec![server_task],
        redis_keys: None,
    };
    let requests_to = RequestsTo {
        exchange,
        request_queue,
    };
    client_pair(url, &id, shape, requests_to, keep).await
}

/// Where a client publishes its requests.
struct RequestsTo {
    /// The default exchange (empty), or the oslo shape's topic exchange.
    exchange: String,
    /// The queue, or the routing key through `exchange`.
    request_queue: String,
}

/// The lapin echo pair of the plain shape whose echo server is competing consumers
/// of one queue, one per counter of `handled`, each on a connection of its own (with
/// the prefetch of [`pair`]'s server), counting there the requests it handled.
pub(super) async fn competing_pair(url: &str, handled: &[Arc<AtomicU64>]) -> Result<Pair> {
    let id = Uuid::new_v4().simple().to_string();
    let request_queue = format!("raw-bench-{id}");
    let mut keep = Keep {
        tasks: Vec::with_capacity(handled.len() + 1),
        redis_keys: None,
    };
    for (i, handled) in handled.iter().enumerate() {
        let server = connect(url, format!("raw-bench-server-{id}-{i}")).await?;
        let consume = server
            .create_channel()
            .await
            .context("server: cannot open a channel")?;
        let publish = publish_channel(&server, false, "server").await?;
        // Shared by the consumers, so not exclusive; gone with the last of them.
        let options = QueueDeclareOptions {
            auto_delete: true,
            ..QueueDeclareOptions::default()
        };
        consume
            .queue_declare(
                request_queue.as_str().into(),
                options,
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("server: cannot declare the queue {request_queue}"))?;
        let requests = consume_requests(&consume, &request_queue).await?;
        let reply = EchoReply {
            mandatory: false,
            properties: BasicProperties::default(),
            shorter_by: 0,
        };
        let handled = handled.clone();
        keep.tasks.push(tokio::spawn(async move {
            let _server = server;
            let _consume = consume;
            let (publish, reply, handled) = (&publish, &reply, &handled);
            requests
                .for_each_concurrent(usize::from(AMQP_PREFETCH), |delivery| async move {
                    match delivery {
                        Ok(delivery) => {
                            handled.fetch_add(1, Ordering::Relaxed);
                            echo(publish, reply, delivery).await;
                        }
                        Err(err) => tracing::warn!("raw bench: AMQP echo server stopped: {err}"),
                    }
                })
                .await;
        }));
    }
    let requests_to = RequestsTo {
        exchange: String::new(),
        request_queue,
    };
    client_pair(url, &id, AmqpShape::Plain, requests_to, keep).await
}

/// The client side of a pair of `shape`, on a connection of its own, with `keep` (the
/// echo server side).
async fn client_pair(
    url: &str,
    id: &str,
    shape: AmqpShape,
    requests_to: RequestsTo,
    keep: Keep,
) -> Result<Pair> {
    let reply_queue = format!("raw-bench-{id}-reply");
    let confirms = shape != AmqpShape::Plain;
    let padding = match shape {
        AmqpShape::Oslo(padding) => padding,
        AmqpShape::Plain | AmqpShape::Confirmed => Padding::NONE,
    };
    let oslo = matches!(shape, AmqpShape::Oslo(_));
    let RequestsTo {
        exchange,
        request_queue,
    } = requests_to;
    let client = connect(url, format!("raw-bench-client-{id}")).await?;
    let consume = client
        .create_channel()
        .await
        .context("client: cannot open a channel")?;
    let publish = publish_channel(&client, confirms, "client").await?;
    consume
        .queue_declare(
            reply_queue.as_str().into(),
            private_queue(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("client: cannot declare the queue {reply_queue}"))?;
    let mut replies = consume
        .basic_consume(
            reply_queue.as_str().into(),
            ShortString::from(""),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("client: cannot consume {reply_queue}"))?;
    let waiters = Waiters::new();
    let reader_waiters = CloseOnDrop(waiters.clone());
    let reader = tokio::spawn(async move {
        let _consume = consume;
        while let Some(delivery) = replies.next().await {
            let delivery = match delivery {
                Ok(delivery) => delivery,
                Err(err) => {
                    tracing::warn!("raw bench: AMQP reply consumer stopped: {err}");
                    break;
                }
            };
            if let Some(id) = delivery.properties.correlation_id() {
                reader_waiters
                    .0
                    .resolve(id.as_str(), Bytes::from(delivery.data));
            }
        }
    });
    let mut keep = keep;
    keep.tasks.push(reader);

    let properties = if oslo {
        // oslo.messaging's call: JSON properties and an expiry of the call's timeout.
        oslo_properties().with_expiration("60000".into())
    } else {
        BasicProperties::default()
    };
    let properties = properties.with_reply_to(reply_queue.into());
    let caller = AmqpCaller {
        _connection: client,
        publish,
        exchange: exchange.into(),
        request_queue: request_queue.into(),
        properties,
        padding,
        waiters,
    };
    Ok(Pair {
        caller: Arc::new(caller),
        _keep: Box::new(keep),
    })
}

/// Consumes `request_queue` on `channel` with the echo servers' prefetch.
async fn consume_requests(channel: &Channel, request_queue: &str) -> Result<lapin::Consumer> {
    channel
        .basic_qos(AMQP_PREFETCH, BasicQosOptions::default())
        .await
        .context("server: cannot set the prefetch count")?;
    channel
        .basic_consume(
            request_queue.into(),
            ShortString::from(""),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("server: cannot consume {request_queue}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amqp_urls_for_lapin() {
        let cases = [
            (
                "rabbit://guest:guest@127.0.0.1:5672/",
                "amqp://guest:guest@127.0.0.1:5672/%2f",
            ),
            (
                "rabbit://u:p@h1:5673,u2:p2@h2/vh?heartbeat=5",
                "amqp://u:p@h1:5673/vh",
            ),
            ("rabbit://h?ssl=true", "amqps://h/%2f"),
            ("rabbit://", "amqp://localhost/%2f"),
            ("amqp://h//", "amqp://h/%2f"),
            (
                "amqp://guest:guest@127.0.0.1:5672/%2f",
                "amqp://guest:guest@127.0.0.1:5672/%2f",
            ),
            ("amqps://h:5671/x?prefetch=10", "amqps://h:5671/x"),
        ];
        for (url, want) in cases {
            assert_eq!(lapin_url(url).ok().as_deref(), Some(want), "{url}");
        }
    }
}
