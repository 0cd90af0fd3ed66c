//! Publishing: `XADD` with an approximate `MAXLEN`. To a topic, server or fanout
//! stream it is tried with `NOMKSTREAM` first; a stream that does not exist yet is
//! then made by a second `XADD` with `EXPIRE ... NX` in one `MULTI`/`EXEC`, so every
//! stream mqrpc creates carries a time-to-live. Replies use `NOMKSTREAM` only: a reply to a stream
//! that no longer exists is undeliverable, never a new key. A notification's stream
//! is made by its first send, together with its default consumer group (see
//! `crate::notify`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use rpc_core::{Address, Error, Outgoing, Publisher, Result, Retry};

use crate::BACKOFF;
use crate::commands::NOTIFY_CREATE;
use crate::config::RedisConfig;
use crate::connection::Connection;
use crate::error::{command_error, is_cluster_change, was_not_sent};

/// Field of an entry holding the encoded message.
pub(crate) const BODY_FIELD: &str = "b";
/// Field of an entry holding the time (Unix ms) after which it is not worth handling.
pub(crate) const EXPIRES_FIELD: &str = "x";

/// How many attempts a publish makes while a Redis Cluster refuses it as changing
/// (`CLUSTERDOWN`, `TRYAGAIN`, `MASTERDOWN`): with [`BACKOFF`] about 30 s of waits,
/// twice what a failover takes with Redis's default `cluster-node-timeout`. A
/// cluster down for longer fails the publish with its own error rather than the
/// caller's timeout.
const CLUSTER_CHANGE_ATTEMPTS: u32 = 12;

/// The least a reply stream is capped at, whatever `maxlen` says (it is sized for
/// topic backlogs): 100 000 replies unread at once.
const REPLY_MAXLEN_FLOOR: usize = 100_000;

/// `XADD` of `message` to `key`, capped at about `maxlen`; without `create`, only
/// to a stream that exists (`NOMKSTREAM`).
fn xadd_cmd(
    key: &str,
    create: bool,
    maxlen: usize,
    message: &Outgoing,
    expires: Option<u64>,
) -> redis::Cmd {
    let mut xadd = redis::cmd("XADD");
    xadd.arg(key);
    if !create {
        xadd.arg("NOMKSTREAM");
    }
    xadd.arg("MAXLEN")
        .arg("~")
        .arg(maxlen)
        .arg("*")
        .arg(BODY_FIELD)
        .arg(message.body.as_ref());
    if let Some(expires) = expires {
        xadd.arg(EXPIRES_FIELD).arg(expires);
    }
    xadd
}

/// The transaction that makes `key` with its first entry (`xadd`) and its TTL.
pub(crate) fn create_stream_pipe(xadd: redis::Cmd, key: &str, ttl: Duration) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    pipe.atomic()
        .add_command(xadd)
        .ignore()
        .cmd("EXPIRE")
        .arg(key)
        .arg(ttl.as_secs().max(1))
        .arg("NX")
        .ignore();
    pipe
}

pub(crate) struct RedisPublisher {
    conn: Connection,
    config: RedisConfig,
    reply_prefix: String,
}

pub(crate) fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl RedisPublisher {
    pub(crate) fn new(conn: Connection, config: RedisConfig) -> Self {
        RedisPublisher {
            reply_prefix: config.reply_prefix(),
            conn,
            config,
        }
    }

    fn stream_key(&self, address: &Address) -> Option<String> {
        let c = &self.config;
        match address {
            Address::Topic { exchange, topic } => Some(c.topic_key(exchange, topic)),
            Address::Server {
                exchange,
                topic,
                server,
            } => Some(c.server_key(exchange, topic, server)),
            Address::Fanout { exchange, topic } => Some(c.fanout_key(exchange, topic)),
            Address::Reply(_) | Address::Notification { .. } => None,
        }
    }

    /// Adds a notification to the stream of its routing key. The stream nearly
    /// always exists: one `XADD`. The first send makes it, with the default group
    /// that keeps every notification until a listener of that group takes it
    /// (`NOTIFY_CREATE`).
    async fn notify(
        &self,
        exchange: &str,
        key: &str,
        message: &Outgoing,
    ) -> redis::RedisResult<bool> {
        let mut conn = self.conn.clone();
        let stream = self.config.notification_key(exchange, key);
        let id: Option<String> = xadd_cmd(&stream, false, self.config.maxlen, message, None)
            .query_async(&mut conn)
            .await?;
        if id.is_none() {
            NOTIFY_CREATE
                .run::<String>(
                    &mut conn,
                    &stream,
                    (
                        crate::notify::DEFAULT_GROUP,
                        self.config.stream_ttl.as_secs().max(1),
                        self.config.maxlen,
                        message.body.as_ref(),
                    ),
                )
                .await?;
        }
        Ok(true)
    }

    async fn attempt(&self, address: &Address, message: &Outgoing) -> redis::RedisResult<bool> {
        let mut conn = self.conn.clone();
        match self.stream_key(address) {
            Some(key) => {
                let expires = message.time_to_live.map(|ttl| {
                    now_millis().saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX))
                });
                let xadd =
                    |create: bool| xadd_cmd(&key, create, self.config.maxlen, message, expires);
                // The stream nearly always exists (its servers' group made it): one
                // command. Only when it does not is it made here, with its TTL.
                let id: Option<String> = xadd(false).query_async(&mut conn).await?;
                if id.is_none() {
                    // Atomic: a connection lost between the two must not leave a
                    // stream this send made without its TTL.
                    create_stream_pipe(xadd(true), &key, self.config.stream_ttl)
                        .query_async::<()>(&mut conn)
                        .await?;
                }
                Ok(true)
            }
            None => {
                if let Address::Notification { exchange, key } = address {
                    return self.notify(exchange, key, message).await;
                }
                let Address::Reply(key) = address else {
                    return Ok(false);
                };
                if !key.starts_with(&self.reply_prefix) {
                    // A request may name any reply address; only reply streams are written.
                    return Ok(false);
                }
                let id: Option<String> = redis::cmd("XADD")
                    .arg(key)
                    .arg("NOMKSTREAM")
                    // Its client deletes what it has read; the cap only bounds a stream
                    // whose client is gone and whose key has not expired yet (or whose
                    // Redis refuses XTRIM), never below what a burst of calls needs.
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(self.config.maxlen.max(REPLY_MAXLEN_FLOOR))
                    .arg("*")
                    .arg(BODY_FIELD)
                    .arg(message.body.as_ref())
                    .query_async(&mut conn)
                    .await?;
                Ok(id.is_some())
            }
        }
    }
}

#[async_trait]
impl Publisher for RedisPublisher {
    async fn send(&self, address: &Address, message: Outgoing) -> Result<()> {
        Error::check_size(message.body.len(), self.config.max_message_size)?;
        let mut cluster_changes = 0u32;
        let sent = Retry::new(BACKOFF)
            .run_notify(
                |_| self.attempt(address, &message),
                // Only an error proving the command reached no Redis (a refused
                // connection, a cluster refusing it while it changes, a cluster
                // client without a connection to its node) is retried here: after any
                // other failure the entry may exist, and a second would run twice.
                // This holds for what mqrpc sends again, in both modes. On a cluster,
                // redis-rs's client also sends a command again by itself after its
                // connection dropped (a master dying): an entry the dying master had
                // applied, and passed to its replica, is then written a second time
                // by the promoted replica. Servers drop a duplicate only within one
                // instance; in cluster mode a failover can deliver a cast twice.
                |err| {
                    if is_cluster_change(err) {
                        cluster_changes += 1;
                        return cluster_changes < CLUSTER_CHANGE_ATTEMPTS;
                    }
                    was_not_sent(err)
                },
                |err, _attempt, wait| {
                    tracing::warn!(error = %err, %address, ?wait, "publish failed; retrying after reconnection");
                },
            )
            .await;
        match sent {
            Ok(true) => Ok(()),
            Ok(false) if message.mandatory => Err(Error::Undeliverable {
                address: address.to_string(),
            }),
            Ok(false) => Ok(()),
            Err(err) => Err(command_error(
                &self.conn,
                &format!("publishing to {address}"),
                err,
            )),
        }
    }
}
