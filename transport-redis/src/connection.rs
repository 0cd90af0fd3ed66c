//! The two kinds of connection the backend runs its commands on: one Redis (an
//! auto-reconnecting [`ConnectionManager`]) or a Redis Cluster (redis-rs's
//! [`ClusterConnection`], which routes each command by its key, follows `MOVED` and
//! `ASK`, and re-reads the topology after a failover). [`Connection`] is either, so
//! the rest of the crate is written once.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{Cmd, FromRedisValue, Pipeline, RedisFuture, RedisResult, Value};
use rpc_core::{Error, Result, TransportErrorKind};

use crate::BACKOFF;
use crate::config::RedisConfig;
use crate::error::{connect_error, kind_description};

/// A connection to one Redis or to a Redis Cluster. Cheap to clone; clones share it.
#[derive(Clone)]
pub(crate) enum Connection {
    /// One Redis.
    Single(ConnectionManager),
    /// A Redis Cluster: a multiplexed connection to each master, made as needed.
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(conn) => conn.req_packed_command(cmd),
            Connection::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(conn) => conn.req_packed_commands(cmd, offset, count),
            Connection::Cluster(conn) => conn.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(conn) => conn.get_db(),
            Connection::Cluster(conn) => conn.get_db(),
        }
    }
}

impl Connection {
    /// Runs `cmd` on the master that owns `key`'s slot: for commands whose keys
    /// redis-rs cannot see (`KEYS` with a pattern, `CLIENT ID`, `CLIENT UNBLOCK`),
    /// which it would send to any node or to all of them. On one Redis, as any command.
    pub(crate) async fn query_at<T: FromRedisValue>(
        &mut self,
        key: &str,
        cmd: &Cmd,
    ) -> RedisResult<T> {
        match self {
            Connection::Single(conn) => cmd.query_async(conn).await,
            Connection::Cluster(conn) => {
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                    Route::with_key(key, SlotAddr::Master),
                ));
                let value = conn.route_command(cmd.clone(), route).await?;
                Ok(redis::from_redis_value(value)?)
            }
        }
    }
}

impl Connection {
    /// Runs `cmd` on the cluster node at `host`:`port` (a name the cluster client
    /// knows it by: an address from the cluster's slot map); on one Redis, as any
    /// command. Fails (`ErrorKind::Client`) when the cluster client has no
    /// connection to that node.
    pub(crate) async fn query_node<T: FromRedisValue>(
        &mut self,
        host: &str,
        port: u16,
        cmd: &Cmd,
    ) -> RedisResult<T> {
        match self {
            Connection::Single(conn) => cmd.query_async(conn).await,
            Connection::Cluster(conn) => {
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: host.to_owned(),
                    port,
                });
                let value = conn.route_command(cmd.clone(), route).await?;
                Ok(redis::from_redis_value(value)?)
            }
        }
    }
}

/// What connections are made from: a redis-rs client for one Redis, or the seed
/// nodes (and TLS files) of a Redis Cluster, from which a cluster client is built for
/// each connection (its response timeout is the client's, and blocking readers need
/// a longer one).
pub(crate) enum Connector {
    /// One Redis.
    Single(redis::Client),
    /// A Redis Cluster: its seed nodes' URLs and the TLS certificates, if any.
    Cluster {
        /// URLs of the seed nodes (credentials included).
        nodes: Vec<String>,
        /// CA and client certificates, when TLS files are named.
        certificates: Option<redis::TlsCertificates>,
    },
}

impl Connector {
    /// Makes the connector for `config`, checking its URLs.
    pub(crate) fn new(config: &RedisConfig) -> Result<Self> {
        let urls = config.client_urls()?;
        let certificates = if config.tls_files.any() {
            let pem = config.tls_files.load()?;
            Some(redis::TlsCertificates {
                client_tls: pem
                    .identity
                    .map(|(client_cert, client_key)| redis::ClientTlsConfig {
                        client_cert,
                        client_key,
                    }),
                root_cert: pem.ca,
            })
        } else {
            None
        };
        let invalid = |e: redis::RedisError| {
            Error::InvalidUrl(format!("Redis URL: {}", kind_description(&e)))
        };
        if config.cluster {
            // Builds a client once to check the seeds (same credentials, no Unix socket).
            let connector = Connector::Cluster {
                nodes: urls,
                certificates,
            };
            connector
                .cluster_builder(config, Duration::from_secs(1))
                .build()
                .map_err(invalid)?;
            return Ok(connector);
        }
        let url = urls.into_iter().next().unwrap_or_default();
        let client = match certificates {
            Some(certificates) => redis::Client::build_with_tls(url, certificates),
            None => redis::Client::open(url),
        }
        .map_err(invalid)?;
        Ok(Connector::Single(client))
    }

    fn cluster_builder(
        &self,
        config: &RedisConfig,
        response_timeout: Duration,
    ) -> ClusterClientBuilder {
        let (nodes, certificates) = match self {
            Connector::Cluster {
                nodes,
                certificates,
            } => (nodes.clone(), certificates.clone()),
            Connector::Single(_) => (Vec::new(), None),
        };
        let mut builder = ClusterClientBuilder::new(nodes)
            .connection_timeout(config.connect_timeout)
            // Commands are retried (a failover, CLUSTERDOWN, TRYAGAIN) within this.
            .response_timeout(response_timeout)
            .min_retry_wait(u64::try_from(BACKOFF.first().as_millis()).unwrap_or(50))
            .max_retry_wait(u64::try_from(BACKOFF.max().as_millis()).unwrap_or(5000));
        if let Some(certificates) = certificates {
            builder = builder.certs(certificates);
        }
        builder
    }

    /// A new connection whose commands time out after `response_timeout`.
    /// Connecting, retries included, takes at most the configured `connect_timeout`,
    /// and so does each attempt of a later reconnection.
    pub(crate) async fn connect(
        &self,
        config: &RedisConfig,
        response_timeout: Duration,
    ) -> Result<Connection> {
        let connecting = async {
            match self {
                Connector::Single(client) => {
                    let manager = ConnectionManagerConfig::new()
                        .set_response_timeout(Some(response_timeout))
                        .set_connection_timeout(Some(config.connect_timeout))
                        // redis-rs reconnects on its own schedule; its waits stop where ours do.
                        .set_max_delay(BACKOFF.max())
                        .set_number_of_retries(3);
                    client
                        .get_connection_manager_with_config(manager)
                        .await
                        .map(Connection::Single)
                }
                Connector::Cluster { .. } => {
                    let client = self.cluster_builder(config, response_timeout).build()?;
                    client.get_async_connection().await.map(Connection::Cluster)
                }
            }
        };
        // redis-rs bounds each attempt, and retries the first connection as it retries a
        // reconnection: the whole of it must fit in the one timeout the user gave.
        match tokio::time::timeout(config.connect_timeout, connecting).await {
            Ok(Ok(connection)) => Ok(connection),
            Ok(Err(err)) if err.is_timeout() => Err(connect_timed_out(config)),
            Ok(Err(err)) => Err(connect_error(
                format!("cannot connect to {}", crate::server_name(config)),
                err,
            )),
            Err(_elapsed) => Err(connect_timed_out(config)),
        }
    }
}

fn connect_timed_out(config: &RedisConfig) -> Error {
    Error::transport_msg(
        TransportErrorKind::Connect,
        format!(
            "connecting to {} timed out after {:?} (TCP connect, TLS and Redis \
         handshake; URL option connect_timeout)",
            crate::server_name(config),
            config.connect_timeout
        ),
    )
}
