//! The Redis streams transport of mqrpc.
//!
//! - A topic is a stream read by one consumer group that all its servers share
//!   (competing consumers); a named server has a stream of its own; a topic's fanout
//!   is a stream read by one group per server instance, created at `$`.
//! - Replies go to a stream per client, read without a group and kept alive by a
//!   TTL the client refreshes; servers write replies with `NOMKSTREAM`, so a reply to
//!   a client that is gone fails as undeliverable instead of creating a key.
//! - Blocking reads run on connections of their own; publishing shares one
//!   multiplexed, auto-reconnecting connection (pipelined). Connecting, and each
//!   attempt to reconnect, gives up after `connect_timeout` (10 s). Every other retry
//!   waits from 50 ms, doubling up to 5 s, with jitter.
//! - Redis Cluster (`redis://h1:p1,h2:p2,h3:p3/?cluster=true`; any host is a seed):
//!   commands go to the master of their key's slot through redis-rs's cluster client,
//!   which follows `MOVED`/`ASK` and failovers. Every key of a topic shares its hash
//!   tag, so the reads, pipelines and scripts of a topic stay in one slot; reply
//!   streams and alive keys are used alone. Each blocking reader has a cluster
//!   connection of its own (a read blocked on a shared one would hold every other
//!   command to its node). Replication is asynchronous: a cast a master acknowledged
//!   just before it died may be missing on the replica that takes over.
//! - A server reads no more entries than its byte budget
//!   ([`rpc_core::ListenOptions::budget`]) has room for; the rest wait in Redis.
//! - Entries left pending by a dead consumer longer than `claim_idle` are taken
//!   over with `XAUTOCLAIM`; entries every group has settled are deleted by the
//!   servers' housekeeping; streams are capped with an approximate `MAXLEN`.
//! - Notifications: a stream per routing key `<topic>.<priority>`, in the topic's
//!   hash tag, read by a consumer group per pool (`default` for listeners without
//!   one, made with the stream by the first send); see the `notify` module.
//!
//! ```no_run
//! # async fn demo() -> mqrpc::Result<()> {
//! let transport = mqrpc::RedisTransport::connect("redis://127.0.0.1:6379/?prefix=app").await?;
//! // A Redis Cluster, through any of its nodes:
//! let cluster = mqrpc::RedisTransport::connect(
//!     "redis://10.0.0.1:7000,10.0.0.2:7000,10.0.0.3:7000/?cluster=true",
//! )
//! .await?;
//! # let _ = (transport, cluster); Ok(()) }
//! ```

#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod commands;
mod config;
mod connection;
mod entry;
mod error;
mod notify;
mod publisher;
mod replies;
mod server;
mod watcher;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rpc_core::{
    Backoff, Capabilities, Consumer, ListenOptions, NotificationSource, Publisher, ReplyQueue,
    Result, Target, Transport,
};

pub use config::RedisConfig;
pub use rpc_core::options::DEFAULT_CONNECT_TIMEOUT;

use connection::{Connection, Connector};
use notify::NotificationConsumer;
use publisher::RedisPublisher;
use replies::ReplyConsumer;
use server::ServerConsumer;
use watcher::MonitorConsumer;

/// A connection to Redis. Cheap to clone; clones share the publishing connection.
#[derive(Clone)]
pub struct RedisTransport {
    shared: Arc<Shared>,
}

pub(crate) struct Shared {
    pub(crate) config: RedisConfig,
    /// Makes the connections: to one Redis, or to a Redis Cluster.
    pub(crate) client: Connector,
    /// Commands that never block: publishes, acks, claims, housekeeping.
    pub(crate) commands: Connection,
    publisher: Arc<RedisPublisher>,
}

impl std::fmt::Debug for RedisTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTransport")
            .field("config", &self.shared.config)
            .finish()
    }
}

/// A non-blocking command answered later than this counts as a lost connection.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// How every retry of this backend waits: a publish refused a connection, a read
/// that failed, a consumer group to create again. From 50 ms, doubling up to 5 s,
/// each wait drawn from its upper half so that servers cut off together do not
/// come back together.
pub(crate) const BACKOFF: Backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));

impl RedisTransport {
    /// Connects to the Redis of a `redis://` or `rediss://` URL (see
    /// [`RedisConfig::parse`]); with `cluster=true`, to the Redis Cluster its hosts
    /// are seed nodes of.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::with_config(RedisConfig::parse(url)?).await
    }

    /// Connects with a configuration, parsed or built (see [`RedisConfig`]).
    pub async fn with_config(config: RedisConfig) -> Result<Self> {
        config.validate()?;
        let client = Connector::new(&config)?;
        let commands = client.connect(&config, COMMAND_TIMEOUT).await?;
        let publisher = Arc::new(RedisPublisher::new(commands.clone(), config.clone()));
        Ok(RedisTransport {
            shared: Arc::new(Shared {
                config,
                client,
                commands,
                publisher,
            }),
        })
    }

    /// The parsed configuration.
    pub fn config(&self) -> &RedisConfig {
        &self.shared.config
    }
}

/// A connection of its own for blocking reads (`XREADGROUP`/`XREAD ... BLOCK`) of up
/// to `block`: its commands may take that long, and 5 s more, before they are late.
/// On a cluster too: a read blocked on a shared connection to a node would hold
/// every other command to that node.
pub(crate) async fn blocking_connection(
    client: &Connector,
    config: &RedisConfig,
    block: Duration,
) -> Result<Connection> {
    client.connect(config, block + Duration::from_secs(5)).await
}

/// Where `config` connects, without credentials: `127.0.0.1:6379/`, or
/// `h1:7000,h2:7000/` for a cluster's seeds.
fn address(config: &RedisConfig) -> String {
    // The connection URLs hold the password: print only hosts, ports and db.
    let mut hosts = Vec::new();
    let mut path = String::new();
    for url in config.connection_urls() {
        match url::Url::parse(url) {
            Ok(url) => {
                hosts.push(format!(
                    "{}:{}",
                    url.host_str().unwrap_or("?"),
                    url.port().unwrap_or(6379)
                ));
                if path.is_empty() {
                    url.path().clone_into(&mut path);
                }
            }
            Err(_) => hosts.push("?".to_owned()),
        }
    }
    format!("{}{path}", hosts.join(","))
}

/// What `config` connects to, for messages: `Redis at 127.0.0.1:6379/` or `Redis
/// Cluster at h1:7000,h2:7000/`.
pub(crate) fn server_name(config: &RedisConfig) -> String {
    let kind = if config.cluster {
        "Redis Cluster"
    } else {
        "Redis"
    };
    format!("{kind} at {}", address(config))
}

/// Where `config` connects, without credentials: `redis 127.0.0.1:6379/`, or
/// `redis cluster h1:7000,h2:7000/`.
pub(crate) fn describe(config: &RedisConfig) -> String {
    if config.cluster {
        format!("redis cluster {}", address(config))
    } else {
        format!("redis {}", address(config))
    }
}

#[async_trait]
impl Transport for RedisTransport {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
            .keeps_messages_without_listener(true)
            .reports_no_responders(false)
            .redelivers_unacked(true)
            .max_message_size(Some(self.shared.config.max_message_size))
            .notifications(true)
    }

    fn default_exchange(&self) -> &str {
        &self.shared.config.exchange
    }

    fn describe(&self) -> String {
        describe(&self.shared.config)
    }

    async fn publisher(&self) -> Result<Arc<dyn Publisher>> {
        Ok(self.shared.publisher.clone())
    }

    async fn listen(&self, target: &Target, options: &ListenOptions) -> Result<Box<dyn Consumer>> {
        target.validate_for_listen()?;
        let consumer = ServerConsumer::start(self.shared.clone(), target, options).await?;
        Ok(Box::new(consumer))
    }

    async fn monitor(&self, target: &Target) -> Result<Box<dyn Consumer>> {
        Ok(Box::new(
            MonitorConsumer::start(self.shared.clone(), target).await?,
        ))
    }

    async fn reply_queue(&self) -> Result<ReplyQueue> {
        let (address, consumer) = ReplyConsumer::start(self.shared.clone()).await?;
        Ok(ReplyQueue::new(address, consumer))
    }

    async fn listen_notifications(
        &self,
        source: &NotificationSource,
        options: &ListenOptions,
    ) -> Result<Box<dyn Consumer>> {
        Ok(Box::new(
            NotificationConsumer::start(self.shared.clone(), source, options).await?,
        ))
    }
}
