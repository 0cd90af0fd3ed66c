//! The `--raw` baselines of `mqrpc bench`: the same request/reply round trip as mqrpc's
//! `call`, done with each broker's bare client (lapin, redis-rs, async-nats) and no mqrpc
//! code on the path, so the benchmark can print how much mqrpc costs on top of it.
//!
//! Each baseline is an echo server and a client, each on a connection of its own and on
//! names nobody else uses (`raw-bench-<uuid>`):
//!
//! - RabbitMQ: the classic RPC pattern. The server consumes an exclusive request queue
//!   (prefetch 256, that many deliveries handled at once) and publishes each body back to
//!   the delivery's `reply_to` with its `correlation_id`, then acks it; the client consumes
//!   one exclusive reply queue (no ack) and publishes without publisher confirms. Two
//!   more shapes of it ([`AmqpShape`]) add publisher confirms, and then the rest of
//!   oslo.messaging's wire work, to tell what the broker costs from what mqrpc costs.
//! - Redis streams: the server reads the request stream through a consumer group and
//!   `XADD`s each payload to the reply stream named in the entry, then `XACK`s it; the
//!   client `XADD`s requests and one reader task `XREAD`s its reply stream.
//! - NATS: core request/reply (`Client::request` against a subscriber that publishes to
//!   the message's reply subject). A second shape pads requests and replies to the
//!   length of mqrpc's messages.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
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
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::StreamReadReply;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use uuid::Uuid;

use super::caller::{Caller, Pair};

/// How long connecting to a broker may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Unacknowledged deliveries the AMQP echo server may hold.
const AMQP_PREFETCH: u16 = 256;
/// Approximate length the Redis streams are trimmed to.
const REDIS_MAXLEN: usize = 10_000;
/// Seconds the Redis streams live if nobody deletes them.
const REDIS_EXPIRE_SECS: u64 = 300;
/// Milliseconds a Redis stream read blocks for.
const REDIS_BLOCK_MS: u64 = 1_000;
/// Pause after a failed Redis read before trying again.
const REDIS_RETRY: Duration = Duration::from_millis(100);

/// Starts an echo server and a client for `url` with the broker's bare client.
///
/// The scheme picks the broker: `amqp://`, `amqps://`, `rabbit://` (RabbitMQ),
/// `redis://`, `rediss://` (Redis streams), `nats://`, `tls://` (NATS). `memory://` has no
/// bare client and gives `Ok(None)`. Any `?query` is dropped. Dropping the pair's `_keep`
/// stops the server and the client's reader and deletes what the pair created on the broker
/// (where that is cheap).
pub(crate) async fn pair(url: &str) -> Result<Option<Pair>> {
    let pair = match scheme(url)?.as_str() {
        "amqp" | "amqps" | "rabbit" => amqp_pair(&amqp_url(url)?, AmqpShape::Plain)
            .await
            .context("raw RabbitMQ (lapin) echo pair")?,
        "redis" | "rediss" => redis_pair(strip_query(url))
            .await
            .context("raw Redis streams (redis-rs) echo pair")?,
        "nats" | "tls" => nats_pair(strip_query(url), Padding::NONE)
            .await
            .context("raw NATS (async-nats) echo pair")?,
        "memory" => return Ok(None),
        other => bail!("no bare client for the scheme {other}://"),
    };
    Ok(Some(pair))
}

/// What a bare lapin echo pair puts on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AmqpShape {
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

/// How much longer than its payload each of mqrpc's messages is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Padding {
    /// The request's envelope around its payload.
    pub(crate) request: usize,
    /// The reply's envelope around its result.
    pub(crate) reply: usize,
}

impl Padding {
    /// No padding: the bare client's own message sizes.
    const NONE: Padding = Padding {
        request: 0,
        reply: 0,
    };

    /// How many bytes longer a request is than its reply.
    fn reply_shorter_by(self) -> usize {
        self.request.saturating_sub(self.reply)
    }

    /// Measured on mqrpc's own encoding of an echo call of `payload` bytes and of its
    /// reply (not on the bare client's path: only the lengths are used).
    pub(crate) fn of_mqrpc(payload: usize) -> Result<Padding> {
        let text = "x".repeat(payload);
        let msg_id = mqrpc::wire::new_id();
        let request = mqrpc::wire::Request {
            method: "echo".to_owned(),
            args: serde_json::Map::from_iter([("payload".to_owned(), text.clone().into())]),
            msg_id: Some(msg_id.clone()),
            reply_to: Some(format!("reply_{}", mqrpc::wire::new_id())),
            unique_id: Some(mqrpc::wire::new_id()),
            ..Default::default()
        };
        let request = mqrpc::wire::encode_request(&request).context("encoding a request")?;
        let reply = mqrpc::wire::encode_reply(&mqrpc::wire::Reply::result(&msg_id, text.into()))
            .context("encoding a reply")?;
        Ok(Padding {
            request: request.len().saturating_sub(payload),
            reply: reply.len().saturating_sub(payload),
        })
    }
}

/// The bare client in shapes closer to mqrpc's wire work than [`pair`]'s, each named
/// by what it adds, for the backends that have them: on RabbitMQ publisher confirms,
/// then all of oslo.messaging's messages ([`AmqpShape`]); on NATS mqrpc's message
/// sizes. Each tells what that work costs the broker and the bare client, apart from
/// mqrpc's code. `payload` is the size the shapes are measured at.
pub(crate) async fn shaped_pairs(url: &str, payload: usize) -> Result<Vec<(&'static str, Pair)>> {
    let scheme = scheme(url)?;
    let padding = Padding::of_mqrpc(payload)?;
    let mut pairs = Vec::new();
    match scheme.as_str() {
        "amqp" | "amqps" | "rabbit" => {
            for (name, shape) in [
                ("with publisher confirms", AmqpShape::Confirmed),
                ("sending oslo's messages", AmqpShape::Oslo(padding)),
            ] {
                let pair = amqp_pair(&amqp_url(url)?, shape).await;
                let pair =
                    pair.with_context(|| format!("raw RabbitMQ (lapin) echo pair {name}"))?;
                pairs.push((name, pair));
            }
        }
        "nats" | "tls" => {
            let pair = nats_pair(strip_query(url), padding).await;
            let pair = pair.context("raw NATS (async-nats) echo pair with mqrpc's sizes")?;
            pairs.push(("with mqrpc's message sizes", pair));
        }
        _ => {}
    }
    Ok(pairs)
}

/// Deletes what servers of `left` (topic, server name) leave on the broker once they
/// stopped: on RabbitMQ the topic and server queues (oslo.messaging's persist), on
/// Redis the topic, server and fanout streams. Nothing on NATS or the memory bus.
pub(crate) async fn delete_left(url: &str, left: &[(String, String)]) -> Result<()> {
    let Ok(scheme) = scheme(url) else {
        return Ok(());
    };
    let mut names: Vec<String> = Vec::new();
    match scheme.as_str() {
        "amqp" | "amqps" | "rabbit" => {
            for (topic, server) in left {
                names.extend([topic.clone(), format!("{topic}.{server}")]);
            }
            names.sort();
            names.dedup();
            let connection = amqp_connect(&amqp_url(url)?, "raw-bench-cleanup".to_owned()).await?;
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
        }
        "redis" | "rediss" => {
            let config = mqrpc::RedisConfig::parse(url)?;
            let exchange = &config.exchange;
            for (topic, server) in left {
                names.extend([
                    config.topic_key(exchange, topic),
                    config.fanout_key(exchange, topic),
                    config.server_key(exchange, topic, server),
                ]);
            }
            names.sort();
            names.dedup();
            let client = redis::Client::open(strip_query(url))?;
            let mut conn = redis_connect(&client).await?;
            for keys in names.chunks(256) {
                redis::cmd("DEL")
                    .arg(keys)
                    .query_async::<()>(&mut conn)
                    .await?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// `payload` followed by `padding` spaces (a copy), or `payload` itself.
fn padded(payload: Bytes, padding: usize) -> Bytes {
    if padding == 0 {
        return payload;
    }
    let mut body = Vec::with_capacity(payload.len() + padding);
    body.extend_from_slice(&payload);
    body.resize(payload.len() + padding, b' ');
    Bytes::from(body)
}

/// The scheme of `url`, in lower case.
fn scheme(url: &str) -> Result<String> {
    url.split_once("://")
        .map(|(scheme, _)| scheme.to_ascii_lowercase())
        .with_context(|| format!("not a URL: {url:?}"))
}

/// `url` without its `?query`.
fn strip_query(url: &str) -> &str {
    url.split_once('?').map_or(url, |(url, _)| url)
}

/// The `amqp://` (or `amqps://`) URL lapin understands for an `amqp://`, `amqps://` or
/// oslo.messaging `rabbit://` URL: the first host only, no query, and the virtual host as
/// mqrpc reads it (none, empty or `/` mean `/`, sent as `%2f`). `ssl=true` (or `tls=true`)
/// in the query means `amqps://`.
fn amqp_url(url: &str) -> Result<String> {
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

/// Runs `connect` with [`CONNECT_TIMEOUT`].
async fn connecting<T, E>(what: &str, connect: impl Future<Output = Result<T, E>>) -> Result<T>
where
    E: std::error::Error + Send + Sync + 'static,
{
    match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
        Ok(result) => result.with_context(|| format!("cannot connect {what}")),
        Err(_) => bail!("cannot connect {what}: no answer within {CONNECT_TIMEOUT:?}"),
    }
}

/// What a pair keeps alive: its background tasks, stopped when it is dropped, and the
/// Redis keys it deletes then.
struct Keep {
    tasks: Vec<JoinHandle<()>>,
    redis_keys: Option<(ConnectionManager, Vec<String>)>,
}

impl Drop for Keep {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        let Some((mut conn, keys)) = self.redis_keys.take() else {
            return;
        };
        // Without a runtime the keys expire on their own (EXPIRE at creation).
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            if let Err(err) = redis::cmd("DEL")
                .arg(&keys)
                .query_async::<()>(&mut conn)
                .await
            {
                tracing::debug!(?keys, "raw bench: cannot delete the streams: {err}");
            }
        });
    }
}

/// Callers waiting for their reply, by correlation id. `None` once the reply reader has
/// stopped: no reply can come any more.
#[derive(Default)]
struct Waiters(Mutex<Option<HashMap<String, oneshot::Sender<Bytes>>>>);

impl Waiters {
    fn new() -> Arc<Self> {
        Arc::new(Waiters(Mutex::new(Some(HashMap::new()))))
    }

    fn lock(&self) -> MutexGuard<'_, Option<HashMap<String, oneshot::Sender<Bytes>>>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts waiting for the reply with correlation id `id`.
    fn register(self: &Arc<Self>, id: &str) -> Result<Waiting> {
        let (tx, rx) = oneshot::channel();
        self.lock()
            .as_mut()
            .ok_or_else(|| anyhow!("the reply reader has stopped"))?
            .insert(id.to_owned(), tx);
        Ok(Waiting {
            waiters: self.clone(),
            id: id.to_owned(),
            rx,
            done: false,
        })
    }

    /// Hands `body` to whoever waits for `id` (replies nobody waits for are dropped).
    fn resolve(&self, id: &str, body: Bytes) {
        let tx = self.lock().as_mut().and_then(|waiting| waiting.remove(id));
        if let Some(tx) = tx {
            let _ = tx.send(body);
        }
    }

    /// The reply reader stopped: fails every waiting call and every later one.
    fn close(&self) {
        self.lock().take();
    }
}

/// Closes the [`Waiters`] when the reader task holding it ends, however it ends.
struct CloseOnDrop(Arc<Waiters>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// One call waiting for its reply; stops waiting (forgets its id) when dropped.
struct Waiting {
    waiters: Arc<Waiters>,
    id: String,
    rx: oneshot::Receiver<Bytes>,
    done: bool,
}

impl Waiting {
    async fn reply(mut self) -> Result<Bytes> {
        let body = (&mut self.rx)
            .await
            .map_err(|_| anyhow!("the reply reader stopped before the reply came"))?;
        self.done = true;
        Ok(body)
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Some(waiting) = self.waiters.lock().as_mut() {
            waiting.remove(&self.id);
        }
    }
}

// ---------------------------------------------------------------------------------------
// RabbitMQ (lapin)
// ---------------------------------------------------------------------------------------

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

async fn amqp_connect(url: &str, name: String) -> Result<Connection> {
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
async fn amqp_echo(publish: &Channel, reply: &EchoReply, delivery: Delivery) {
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

async fn amqp_pair(url: &str, shape: AmqpShape) -> Result<Pair> {
    let id = Uuid::new_v4().simple().to_string();
    let request_queue = format!("raw-bench-{id}");
    let reply_queue = format!("raw-bench-{id}-reply");
    let confirms = shape != AmqpShape::Plain;
    let padding = match shape {
        AmqpShape::Oslo(padding) => padding,
        AmqpShape::Plain | AmqpShape::Confirmed => Padding::NONE,
    };
    let oslo = matches!(shape, AmqpShape::Oslo(_));

    // The echo server, on its own connection.
    let server = amqp_connect(url, format!("raw-bench-server-{id}")).await?;
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
    consume
        .basic_qos(AMQP_PREFETCH, BasicQosOptions::default())
        .await
        .context("server: cannot set the prefetch count")?;
    let requests = consume
        .basic_consume(
            request_queue.as_str().into(),
            ShortString::from(""),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("server: cannot consume {request_queue}"))?;
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
                    Ok(delivery) => amqp_echo(publish, reply, delivery).await,
                    Err(err) => tracing::warn!("raw bench: AMQP echo server stopped: {err}"),
                }
            })
            .await;
    });
    let keep = Keep {
        tasks: vec![server_task],
        redis_keys: None,
    };

    // The client, on another connection.
    let client = amqp_connect(url, format!("raw-bench-client-{id}")).await?;
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

// ---------------------------------------------------------------------------------------
// Redis streams (redis-rs)
// ---------------------------------------------------------------------------------------

/// Requests go to the request stream with `XADD` (fields `b` payload, `c` correlation id,
/// `r` reply stream); a reader task routes the reply stream's entries to the callers.
struct RedisCaller {
    conn: ConnectionManager,
    request_stream: String,
    reply_stream: String,
    waiters: Arc<Waiters>,
}

#[async_trait]
impl Caller for RedisCaller {
    async fn call(&self, payload: Bytes) -> Result<Bytes> {
        let id = Uuid::new_v4().simple().to_string();
        let waiting = self.waiters.register(&id)?;
        redis::cmd("XADD")
            .arg(&self.request_stream)
            .arg("MAXLEN")
            .arg("~")
            .arg(REDIS_MAXLEN)
            .arg("*")
            .arg("b")
            .arg(&payload[..])
            .arg("c")
            .arg(&id)
            .arg("r")
            .arg(&self.reply_stream)
            .query_async::<()>(&mut self.conn.clone())
            .await
            .context("cannot add the request to the stream")?;
        waiting.reply().await
    }
}

/// A connection of its own (blocking reads would hold up a shared one), with a response
/// timeout longer than the reads block.
async fn redis_connect(client: &redis::Client) -> Result<ConnectionManager> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_number_of_retries(1)
        .set_response_timeout(Some(Duration::from_secs(10)));
    connecting(
        "to Redis",
        client.get_connection_manager_with_config(config),
    )
    .await
}

/// Creates `stream` (empty, with the consumer group `group`) and sets its expiry.
async fn redis_create_stream(
    conn: &mut ConnectionManager,
    stream: &str,
    group: &str,
) -> Result<()> {
    redis::pipe()
        .cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(group)
        .arg("$")
        .arg("MKSTREAM")
        .ignore()
        .cmd("EXPIRE")
        .arg(stream)
        .arg(REDIS_EXPIRE_SECS)
        .ignore()
        .query_async::<()>(conn)
        .await
        .with_context(|| format!("cannot create the stream {stream}"))
}

/// Takes field `name` of a stream entry as bytes.
fn take_field(map: &mut HashMap<String, redis::Value>, name: &str) -> Option<Vec<u8>> {
    match map.remove(name)? {
        redis::Value::BulkString(bytes) => Some(bytes),
        redis::Value::SimpleString(text) => Some(text.into_bytes()),
        _ => None,
    }
}

/// The echo server: reads the request stream through group `g` and, per batch, pipelines
/// one `XADD` of each payload to its reply stream and one `XACK` of the batch.
async fn redis_echo_server(mut conn: ConnectionManager, stream: String) {
    loop {
        let read = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("g")
            .arg("c")
            .arg("COUNT")
            .arg(64)
            .arg("BLOCK")
            .arg(REDIS_BLOCK_MS)
            .arg("STREAMS")
            .arg(&stream)
            .arg(">")
            .query_async::<Option<StreamReadReply>>(&mut conn)
            .await;
        let read = match read {
            Ok(read) => read,
            Err(err) => {
                tracing::warn!("raw bench: Redis echo server cannot read: {err}");
                tokio::time::sleep(REDIS_RETRY).await;
                continue;
            }
        };
        let Some(read) = read else { continue };
        let mut pipe = redis::pipe();
        let mut ids = Vec::new();
        for entry in read.keys.into_iter().flat_map(|key| key.ids) {
            let mut map = entry.map;
            if let (Some(body), Some(correlation_id), Some(reply_to)) = (
                take_field(&mut map, "b"),
                take_field(&mut map, "c"),
                take_field(&mut map, "r"),
            ) {
                pipe.cmd("XADD")
                    .arg(reply_to)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(REDIS_MAXLEN)
                    .arg("*")
                    .arg("b")
                    .arg(body)
                    .arg("c")
                    .arg(correlation_id)
                    .ignore();
            }
            ids.push(entry.id);
        }
        if ids.is_empty() {
            continue;
        }
        pipe.cmd("XACK").arg(&stream).arg("g").arg(&ids).ignore();
        if let Err(err) = pipe.query_async::<()>(&mut conn).await {
            tracing::warn!("raw bench: Redis echo server cannot reply: {err}");
        }
    }
}

/// The client's reply reader: `XREAD`s the reply stream after the last id seen and hands
/// each entry to the caller waiting for its correlation id.
async fn redis_reply_reader(mut conn: ConnectionManager, stream: String, waiters: CloseOnDrop) {
    let mut last_id = "0-0".to_owned();
    loop {
        let read = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(256)
            .arg("BLOCK")
            .arg(REDIS_BLOCK_MS)
            .arg("STREAMS")
            .arg(&stream)
            .arg(&last_id)
            .query_async::<Option<StreamReadReply>>(&mut conn)
            .await;
        let read = match read {
            Ok(read) => read,
            Err(err) => {
                tracing::warn!("raw bench: Redis reply reader cannot read: {err}");
                tokio::time::sleep(REDIS_RETRY).await;
                continue;
            }
        };
        let Some(read) = read else { continue };
        for entry in read.keys.into_iter().flat_map(|key| key.ids) {
            let mut map = entry.map;
            if let (Some(body), Some(correlation_id)) =
                (take_field(&mut map, "b"), take_field(&mut map, "c"))
                && let Ok(correlation_id) = std::str::from_utf8(&correlation_id)
            {
                waiters.0.resolve(correlation_id, Bytes::from(body));
            }
            last_id = entry.id;
        }
    }
}

async fn redis_pair(url: &str) -> Result<Pair> {
    let client = redis::Client::open(url).context("invalid Redis URL")?;
    let id = Uuid::new_v4().simple().to_string();
    // One hash tag: both streams live on the same cluster slot.
    let request_stream = format!("raw-bench:{{{id}}}:req");
    let reply_stream = format!("raw-bench:{{{id}}}:rep");

    // The echo server, on its own connection.
    let mut server = redis_connect(&client).await.context("server")?;
    redis_create_stream(&mut server, &request_stream, "g").await?;
    let mut keep = Keep {
        tasks: vec![tokio::spawn(redis_echo_server(
            server,
            request_stream.clone(),
        ))],
        redis_keys: None,
    };

    // The client: one connection for requests, one for the blocking reply reads.
    let mut conn = redis_connect(&client).await.context("client")?;
    keep.redis_keys = Some((
        conn.clone(),
        vec![request_stream.clone(), reply_stream.clone()],
    ));
    // The group only serves to create the empty stream; the reader uses plain XREAD.
    redis_create_stream(&mut conn, &reply_stream, "g").await?;
    let reader_conn = redis_connect(&client)
        .await
        .context("client reply reader")?;
    let waiters = Waiters::new();
    keep.tasks.push(tokio::spawn(redis_reply_reader(
        reader_conn,
        reply_stream.clone(),
        CloseOnDrop(waiters.clone()),
    )));

    let caller = RedisCaller {
        conn,
        request_stream,
        reply_stream,
        waiters,
    };
    Ok(Pair {
        caller: Arc::new(caller),
        _keep: Box::new(keep),
    })
}

// ---------------------------------------------------------------------------------------
// NATS (async-nats)
// ---------------------------------------------------------------------------------------

/// Core NATS request/reply: `Client::request` on the echo server's subject.
struct NatsCaller {
    client: async_nats::Client,
    subject: async_nats::Subject,
    /// Bytes added to each payload, and taken off each reply.
    padding: Padding,
}

#[async_trait]
impl Caller for NatsCaller {
    async fn call(&self, payload: Bytes) -> Result<Bytes> {
        let size = payload.len();
        let mut reply = self
            .client
            .request(self.subject.clone(), padded(payload, self.padding.request))
            .await
            .context("NATS request failed")?
            .payload;
        reply.truncate(size);
        Ok(reply)
    }
}

/// The NATS echo pair; with `padding`, requests and replies are as long as mqrpc's.
async fn nats_pair(url: &str, padding: Padding) -> Result<Pair> {
    let subject = async_nats::Subject::from(format!("raw-bench.{}", Uuid::new_v4().simple()));

    // The echo server, on its own connection.
    let server = connecting("to NATS", async_nats::connect(url))
        .await
        .context("server")?;
    let mut requests = server
        .subscribe(subject.clone())
        .await
        .with_context(|| format!("server: cannot subscribe to {subject}"))?;
    server
        .flush()
        .await
        .context("server: cannot flush the subscription")?;
    let shorter_by = padding.reply_shorter_by();
    let server_task = tokio::spawn(async move {
        while let Some(message) = requests.next().await {
            let Some(reply) = message.reply else { continue };
            let mut body = message.payload;
            body.truncate(body.len().saturating_sub(shorter_by));
            if let Err(err) = server.publish(reply, body).await {
                tracing::warn!("raw bench: NATS echo server cannot reply: {err}");
                break;
            }
        }
    });
    let keep = Keep {
        tasks: vec![server_task],
        redis_keys: None,
    };

    // The client, on another connection.
    let client = connecting("to NATS", async_nats::connect(url))
        .await
        .context("client")?;
    Ok(Pair {
        caller: Arc::new(NatsCaller {
            client,
            subject,
            padding,
        }),
        _keep: Box::new(keep),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_is_what_mqrpc_wraps_around_a_payload() {
        let small = Padding::of_mqrpc(100).expect("padding");
        // An envelope, a method, three ids, a reply address: hundreds of bytes.
        assert!(small.request > 200, "{small:?}");
        assert!(small.reply > 100, "{small:?}");
        assert!(small.request > small.reply, "{small:?}");
        // Text needing no escapes adds the same envelope whatever its length.
        assert_eq!(Padding::of_mqrpc(10_000).expect("padding"), small);
        assert_eq!(
            padded(Bytes::from_static(b"ab"), 3),
            Bytes::from_static(b"ab   ")
        );
        assert_eq!(
            padded(Bytes::from_static(b"ab"), 0),
            Bytes::from_static(b"ab")
        );
    }

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
            assert_eq!(amqp_url(url).ok().as_deref(), Some(want), "{url}");
        }
    }

    /// 100 concurrent calls of different sizes through `pair`, each echoed intact.
    async fn echoes(what: &str, pair: Pair) {
        let calls = (0..100usize).map(|i| {
            let caller = pair.caller.clone();
            async move {
                let payload = Bytes::from(vec![(i % 251) as u8; i * 97]);
                let echoed = caller.call(payload.clone()).await?;
                anyhow::ensure!(echoed == payload, "call {i}: wrong payload echoed");
                Ok(())
            }
        });
        let result = tokio::time::timeout(
            Duration::from_secs(30),
            futures::future::try_join_all(calls),
        )
        .await;
        match result {
            Ok(Ok(_)) => println!("{what}: 100 concurrent calls echoed"),
            Ok(Err(err)) => panic!("{what}: {err:#}"),
            Err(_) => panic!("{what}: calls timed out"),
        }
    }

    /// What a run's servers leave (queues, streams) is gone after `delete_left`.
    #[tokio::test(flavor = "multi_thread")]
    async fn what_servers_leave_is_deleted() {
        let topic = format!("bench_left_{}", &Uuid::new_v4().simple().to_string()[..12]);
        let left = [(topic.clone(), "bench-0".to_owned())];
        let amqp = "amqp://guest:guest@127.0.0.1:5672/%2f";
        match amqp_connect(amqp, "raw-bench-test".to_owned()).await {
            Ok(connection) => {
                let channel = connection.create_channel().await.expect("channel");
                for queue in [topic.clone(), format!("{topic}.bench-0")] {
                    let options = QueueDeclareOptions::default();
                    (channel.queue_declare(queue.as_str().into(), options, FieldTable::default()))
                        .await
                        .expect("declare");
                }
                delete_left(amqp, &left).await.expect("delete on RabbitMQ");
                let passive = QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                };
                let fresh = connection.create_channel().await.expect("channel");
                let still = fresh
                    .queue_declare(topic.as_str().into(), passive, FieldTable::default())
                    .await;
                assert!(still.is_err(), "the topic queue is gone");
            }
            Err(err) => {
                crate::skips::missing("bench raw amqp", &format!("broker unavailable ({err:#})"))
            }
        }
        let redis_url = "redis://127.0.0.1:6379/";
        let client = redis::Client::open(redis_url).expect("URL");
        match redis_connect(&client).await {
            Ok(mut conn) => {
                let config = mqrpc::RedisConfig::parse(redis_url).expect("config");
                let key = config.server_key(&config.exchange, &topic, "bench-0");
                (redis::cmd("XADD").arg(&key).arg("*").arg("b").arg("x"))
                    .query_async::<()>(&mut conn)
                    .await
                    .expect("XADD");
                delete_left(redis_url, &left)
                    .await
                    .expect("delete on Redis");
                let exists: u32 = (redis::cmd("EXISTS").arg(&key))
                    .query_async(&mut conn)
                    .await
                    .expect("EXISTS");
                assert_eq!(exists, 0, "the server stream is gone");
            }
            Err(err) => {
                crate::skips::missing("bench raw redis", &format!("broker unavailable ({err:#})"))
            }
        }
    }

    /// Each raw pair, and each of its shapes, against the local brokers: 100 concurrent
    /// calls echo their payloads. An unreachable broker fails the test, unless
    /// `MQRPC_ALLOW_SKIP=1` (then it is skipped, and recorded).
    #[tokio::test(flavor = "multi_thread")]
    async fn raw_pairs_echo() {
        assert!(matches!(pair("memory://").await, Ok(None)));
        assert!(
            shaped_pairs("memory://", 100)
                .await
                .expect("no shapes")
                .is_empty()
        );
        for (url, shapes) in [
            ("amqp://guest:guest@127.0.0.1:5672/%2f", 2),
            ("redis://127.0.0.1:6379/", 0),
            ("nats://127.0.0.1:4222", 1),
        ] {
            let pair = match pair(url).await {
                Ok(Some(pair)) => pair,
                Ok(None) => panic!("{url}: no raw pair"),
                Err(err) => {
                    let what = format!("bench raw {}", url.split(':').next().unwrap_or(url));
                    crate::skips::missing(&what, &format!("broker unavailable ({err:#})"));
                    continue;
                }
            };
            echoes(url, pair).await;
            let shaped = shaped_pairs(url, 100).await;
            let shaped = shaped.unwrap_or_else(|err| panic!("{url}: {err:#}"));
            assert_eq!(shaped.len(), shapes, "{url}");
            for (name, pair) in shaped {
                echoes(&format!("{url} {name}"), pair).await;
            }
        }
    }
}
