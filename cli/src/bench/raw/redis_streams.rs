//! The Redis baseline of `mqrpc bench --raw`, with redis-rs on streams: the server
//! reads the request stream through a consumer group and `XADD`s each payload to the
//! reply stream named in the entry; the client's one reader task `XREAD`s the replies.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result};
use async_trait::async_trait;
use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::StreamReadReply;
use uuid::Uuid;

use super::waiters::{CloseOnDrop, Waiters};
use super::{CONNECT_TIMEOUT, EchoServers, Keep, connecting, strip_query};
use crate::bench::caller::{Caller, Pair};

/// Approximate length the Redis streams are trimmed to.
const REDIS_MAXLEN: usize = 10_000;
/// Seconds the Redis streams live if nobody deletes them.
const REDIS_EXPIRE_SECS: u64 = 300;
/// Milliseconds a Redis stream read blocks for.
const REDIS_BLOCK_MS: u64 = 1_000;
/// Pause after a failed Redis read before trying again.
const REDIS_RETRY: Duration = Duration::from_millis(100);

/// Deletes the topic, server and fanout streams that servers of `left` (topic,
/// server name) leave once they stopped.
pub(super) async fn delete_left(url: &str, left: &[(String, String)]) -> Result<()> {
    let config = mqrpc::RedisConfig::parse(url)?;
    let exchange = &config.exchange;
    let mut names: Vec<String> = Vec::new();
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
    let mut conn = connect(&client).await?;
    for keys in names.chunks(256) {
        redis::cmd("DEL")
            .arg(keys)
            .query_async::<()>(&mut conn)
            .await?;
    }
    Ok(())
}

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
pub(super) async fn connect(client: &redis::Client) -> Result<ConnectionManager> {
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
async fn create_stream(conn: &mut ConnectionManager, stream: &str, group: &str) -> Result<()> {
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

/// The echo server: reads the request stream through group `g` as `consumer` and, per
/// batch, pipelines one `XADD` of each payload to its reply stream and one `XACK` of the
/// batch; counts the requests in `handled` if given.
async fn echo_server(
    mut conn: ConnectionManager,
    stream: String,
    consumer: String,
    handled: Option<Arc<AtomicU64>>,
) {
    loop {
        let read = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("g")
            .arg(&consumer)
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
        if let Some(handled) = &handled {
            handled.fetch_add(ids.len() as u64, Ordering::Relaxed);
        }
        pipe.cmd("XACK").arg(&stream).arg("g").arg(&ids).ignore();
        if let Err(err) = pipe.query_async::<()>(&mut conn).await {
            tracing::warn!("raw bench: Redis echo server cannot reply: {err}");
        }
    }
}

/// The client's reply reader: `XREAD`s the reply stream after the last id seen and hands
/// each entry to the caller waiting for its correlation id.
async fn reply_reader(mut conn: ConnectionManager, stream: String, waiters: CloseOnDrop) {
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

/// The redis-rs echo pair on the server at `url` (without its query); competing echo
/// servers are consumers of one consumer group.
pub(super) async fn pair(url: &str, servers: &EchoServers<'_>) -> Result<Pair> {
    let client = redis::Client::open(url).context("invalid Redis URL")?;
    let id = Uuid::new_v4().simple().to_string();
    // One hash tag: both streams live on the same cluster slot.
    let request_stream = format!("raw-bench:{{{id}}}:req");
    let reply_stream = format!("raw-bench:{{{id}}}:rep");

    // Each echo server on its own connection.
    let consumers: Vec<(String, Option<Arc<AtomicU64>>)> = match servers {
        EchoServers::One => vec![("c".to_owned(), None)],
        EchoServers::Competing(handled) => (handled.iter().enumerate())
            .map(|(i, handled)| (format!("c{i}"), Some(handled.clone())))
            .collect(),
    };
    let mut keep = Keep {
        tasks: Vec::with_capacity(consumers.len() + 1),
        redis_keys: None,
    };
    for (i, (consumer, handled)) in consumers.into_iter().enumerate() {
        let mut server = connect(&client).await.context("server")?;
        if i == 0 {
            create_stream(&mut server, &request_stream, "g").await?;
        }
        let stream = request_stream.clone();
        (keep.tasks).push(tokio::spawn(echo_server(server, stream, consumer, handled)));
    }

    // The client: one connection for requests, one for the blocking reply reads.
    let mut conn = connect(&client).await.context("client")?;
    keep.redis_keys = Some((
        conn.clone(),
        vec![request_stream.clone(), reply_stream.clone()],
    ));
    // The group only serves to create the empty stream; the reader uses plain XREAD.
    create_stream(&mut conn, &reply_stream, "g").await?;
    let reader_conn = connect(&client).await.context("client reply reader")?;
    let waiters = Waiters::new();
    keep.tasks.push(tokio::spawn(reply_reader(
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
