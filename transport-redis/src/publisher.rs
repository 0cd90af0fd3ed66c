//! Publishing: `XADD` with an approximate `MAXLEN`. To a topic, server or fanout
//! stream it is tried with `NOMKSTREAM` first; a stream that does not exist yet is
//! then made by a second `XADD` with `EXPIRE ... NX` in one `MULTI`/`EXEC`, so every
//! stream mqrpc creates carries a time-to-live. Replies use `NOMKSTREAM` only: a reply to a stream
//! that no longer exists is undeliverable, never a new key.

use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use rpc_core::{Address, Error, Outgoing, Publisher, Result, Retry};

use crate::BACKOFF;
use crate::config::RedisConfig;
use crate::connection::Connection;
use crate::error::{is_cluster_change, redis_error};

/// Field of an entry holding the encoded message.
pub(crate) const BODY_FIELD: &str = "b";
/// Field of an entry holding the time (Unix ms) after which it is not worth handling.
pub(crate) const EXPIRES_FIELD: &str = "x";

/// The least a reply stream is capped at, whatever `maxlen` says (it is sized for
/// topic backlogs): 100 000 replies unread at once.
const REPLY_MAXLEN_FLOOR: usize = 100_000;

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
            Address::Reply(_) => None,
        }
    }

    async fn attempt(&self, address: &Address, message: &Outgoing) -> redis::RedisResult<bool> {
        let mut conn = self.conn.clone();
        match self.stream_key(address) {
            Some(key) => {
                let expires = message.time_to_live.map(|ttl| {
                    now_millis().saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX))
                });
                let xadd = |create: bool| {
                    let mut xadd = redis::cmd("XADD");
                    xadd.arg(&key);
                    if !create {
                        xadd.arg("NOMKSTREAM");
                    }
                    xadd.arg("MAXLEN")
                        .arg("~")
                        .arg(self.config.maxlen)
                        .arg("*")
                        .arg(BODY_FIELD)
                        .arg(message.body.as_ref());
                    if let Some(expires) = expires {
                        xadd.arg(EXPIRES_FIELD).arg(expires);
                    }
                    xadd
                };
                // The stream nearly always exists (its servers' group made it): one
                // command. Only when it does not is it made here, with its TTL.
                let id: Option<String> = xadd(false).query_async(&mut conn).await?;
                if id.is_none() {
                    // Atomic: a connection lost between the two must not leave a
                    // stream this send made without its TTL.
                    let mut pipe = redis::pipe();
                    pipe.atomic()
                        .add_command(xadd(true))
                        .ignore()
                        .cmd("EXPIRE")
                        .arg(&key)
                        .arg(self.config.stream_ttl.as_secs().max(1))
                        .arg("NX")
                        .ignore();
                    pipe.query_async::<()>(&mut conn).await?;
                }
                Ok(true)
            }
            None => {
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
        let sent = Retry::new(BACKOFF)
            .run_notify(
                |_| self.attempt(address, &message),
                // Only a refused connection, or a cluster refusing the command while
                // it changes (CLUSTERDOWN, TRYAGAIN...), proves the command was not
                // applied; after any other failure the entry may exist, and a second
                // would run twice.
                |err| err.is_connection_refusal() || is_cluster_change(err),
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
            Err(err) => Err(redis_error(&format!("publishing to {address}"), err)),
        }
    }
}
