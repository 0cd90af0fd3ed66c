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
//!
//! [`competing`] makes the echo server N competing consumers, each on a connection of
//! its own as mqrpc's servers are: subscribers of one NATS queue group, consumers of
//! one Redis consumer group, consumers of one (non-exclusive) RabbitMQ queue.

mod amqp;
mod nats;
mod redis_streams;
mod waiters;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use redis::aio::ConnectionManager;
use tokio::task::JoinHandle;

use super::caller::Pair;
use amqp::AmqpShape;

/// How long connecting to a broker may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts an echo server and a client for `url` with the broker's bare client.
///
/// The scheme picks the broker: `amqp://`, `amqps://`, `rabbit://` (RabbitMQ),
/// `redis://`, `rediss://` (Redis streams), `nats://`, `tls://` (NATS). `memory://` has no
/// bare client and gives `Ok(None)`. Any `?query` is dropped. Dropping the pair's `_keep`
/// stops the server and the client's reader and deletes what the pair created on the broker
/// (where that is cheap).
pub(crate) async fn pair(url: &str) -> Result<Option<Pair>> {
    let pair = match scheme(url)?.as_str() {
        "amqp" | "amqps" | "rabbit" => amqp::pair(&amqp::lapin_url(url)?, AmqpShape::Plain)
            .await
            .context("raw RabbitMQ (lapin) echo pair")?,
        "redis" | "rediss" => redis_streams::pair(strip_query(url), &EchoServers::One)
            .await
            .context("raw Redis streams (redis-rs) echo pair")?,
        "nats" | "tls" => nats::pair(strip_query(url), Padding::NONE, &EchoServers::One)
            .await
            .context("raw NATS (async-nats) echo pair")?,
        "memory" => return Ok(None),
        other => bail!("no bare client for the scheme {other}://"),
    };
    Ok(Some(pair))
}

/// Who takes a pair's requests.
pub(super) enum EchoServers<'a> {
    /// One echo server (the baselines of [`pair`] and [`shaped_pairs`]).
    One,
    /// Competing consumers, one per counter, each on a connection of its own; each
    /// adds the requests it handles to its counter.
    Competing(&'a [Arc<AtomicU64>]),
}

/// As [`pair`], with the echo server made of competing consumers, one per counter of
/// `handled`, each on a connection of its own and counting there the requests it
/// handled; the plain shape only. `Ok(None)` on `memory://`.
pub(crate) async fn competing(url: &str, handled: &[Arc<AtomicU64>]) -> Result<Option<Pair>> {
    let servers = EchoServers::Competing(handled);
    let n = handled.len();
    let pair = match scheme(url)?.as_str() {
        "amqp" | "amqps" | "rabbit" => amqp::competing_pair(&amqp::lapin_url(url)?, handled)
            .await
            .with_context(|| format!("raw RabbitMQ (lapin) echo pair, {n} consumers"))?,
        "redis" | "rediss" => redis_streams::pair(strip_query(url), &servers)
            .await
            .with_context(|| format!("raw Redis streams (redis-rs) echo pair, {n} consumers"))?,
        "nats" | "tls" => nats::pair(strip_query(url), Padding::NONE, &servers)
            .await
            .with_context(|| format!("raw NATS (async-nats) echo pair, {n} subscribers"))?,
        "memory" => return Ok(None),
        other => bail!("no bare client for the scheme {other}://"),
    };
    Ok(Some(pair))
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
                let pair = amqp::pair(&amqp::lapin_url(url)?, shape).await;
                let pair =
                    pair.with_context(|| format!("raw RabbitMQ (lapin) echo pair {name}"))?;
                pairs.push((name, pair));
            }
        }
        "nats" | "tls" => {
            let pair = nats::pair(strip_query(url), padding, &EchoServers::One).await;
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
    match scheme.as_str() {
        "amqp" | "amqps" | "rabbit" => amqp::delete_left(url, left).await,
        "redis" | "rediss" => redis_streams::delete_left(url, left).await,
        _ => Ok(()),
    }
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

#[cfg(test)]
mod tests {
    use lapin::options::QueueDeclareOptions;
    use lapin::types::FieldTable;
    use uuid::Uuid;

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
        match amqp::connect(amqp, "raw-bench-test".to_owned()).await {
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
        match redis_streams::connect(&client).await {
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
