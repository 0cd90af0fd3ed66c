//! The connection to the broker, re-opened when lost: rpc-core's capped exponential
//! [`Backoff`] with jitter, rotating through the URL's hosts (in an order drawn once
//! per link with `shuffle_hosts`, the default, as oslo.messaging does). Everyone who needs the
//! connection asks the `Link`; only one task reconnects at a time.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::uri::{AMQPAuthority, AMQPQueryString, AMQPScheme, AMQPUri, AMQPUserInfo};
use lapin::{Connection, ConnectionProperties};
use rpc_core::backoff::{Backoff, Retry};
use rpc_core::{Error, Result, TransportErrorKind};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::config::{AmqpConfig, Host};
use crate::error::connect_kind;

/// First wait between reconnection attempts.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// A live connection and the count of connections opened before it.
#[derive(Clone)]
pub(crate) struct Connected {
    pub(crate) connection: Arc<Connection>,
    pub(crate) generation: usize,
}

pub(crate) struct Link {
    pub(crate) config: Arc<AmqpConfig>,
    current: Mutex<Option<Connected>>,
    /// The order in which this link tries the URL's hosts (indexes into
    /// `config.hosts`): the URL's, or drawn once at random (`shuffle_hosts`).
    order: Vec<usize>,
    next_host: AtomicUsize,
    generation: AtomicUsize,
    name: String,
    /// The CA and client identity from the URL's TLS files, read once.
    tls: OwnedTLSConfig,
    pub(crate) closed: CancellationToken,
}

impl Link {
    /// Opens the first connection. Each host is tried in turn (in the URL's order, or
    /// in this link's shuffled order with `shuffle_hosts`), each attempt bounded
    /// by the URL's `connect_timeout`; a broker that resets the handshake (RabbitMQ
    /// under a storm of connections) is tried again with backoff within
    /// `connect_timeout` overall, while a refusal (nothing listening, bad
    /// credentials) or a handshake that stalls for the whole `connect_timeout` fails
    /// once every host failed.
    pub(crate) async fn open(config: AmqpConfig) -> Result<Arc<Link>> {
        if config.hosts.is_empty() {
            return Err(Error::InvalidConfig(
                "an AMQP configuration needs at least one host".to_owned(),
            ));
        }
        // A URL cannot give these zero; setters can.
        if config.max_backoff.is_zero() || config.connect_timeout.is_zero() {
            return Err(Error::InvalidConfig(
                "AMQP: max_backoff and connect_timeout must be positive durations".to_owned(),
            ));
        }
        let pem = config.tls_files.load()?;
        let tls = OwnedTLSConfig {
            identity: pem
                .identity
                .map(|(pem, key)| OwnedIdentity::PKCS8 { pem, key }),
            cert_chain: match pem.ca {
                Some(ca) => Some(String::from_utf8(ca).map_err(|_| {
                    Error::InvalidConfig("the TLS CA file is not PEM text".to_owned())
                })?),
                None => None,
            },
        };
        let order = host_order(config.hosts.len(), config.shuffle_hosts);
        let link = Arc::new(Link {
            tls,
            order,
            config: Arc::new(config),
            current: Mutex::new(None),
            next_host: AtomicUsize::new(0),
            generation: AtomicUsize::new(0),
            name: format!(
                "mqrpc:{}:{}",
                std::process::id(),
                &rpc_core::wire::new_id()[..8]
            ),
            closed: CancellationToken::new(),
        });
        let mut current = link.current.lock().await;
        let deadline = tokio::time::Instant::now() + link.config.connect_timeout;
        let connected = Retry::new(link.backoff())
            .deadline(deadline)
            .run_notify(
                |_| link.try_every_host(),
                |failed| failed.transient.is_some(),
                |failed, _, wait| {
                    if let Some(err) = &failed.transient {
                        tracing::debug!(error = %err, ?wait, "broker reset the connection; trying again");
                    }
                },
            )
            .await
            .map_err(|failed| {
                (failed.refused.or(failed.transient)).unwrap_or(Error::Closed)
            })?;
        *current = Some(connected);
        drop(current);
        Ok(link)
    }

    /// One connection attempt to each host in turn, until one answers.
    async fn try_every_host(&self) -> std::result::Result<Connected, EveryHostFailed> {
        let mut failed = EveryHostFailed {
            transient: None,
            refused: None,
        };
        for _ in 0..self.config.hosts.len() {
            match self.try_connect_next().await {
                Ok(connected) => return Ok(connected),
                Err((err, true)) => failed.transient = Some(err),
                Err((err, false)) => failed.refused = Some(err),
            }
        }
        Err(failed)
    }

    /// How many connections this link has opened (1 until the first reconnection).
    pub(crate) fn connections_opened(&self) -> usize {
        self.generation.load(Ordering::Relaxed)
    }

    /// The connection name shown by the broker (`rabbitmqctl list_connections name`).
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// A connected connection, reconnecting (with backoff, forever) if needed. Callers
    /// bound the wait with their own deadline; a closed link fails with `Closed`.
    pub(crate) async fn connection(&self) -> Result<Connected> {
        let mut current = tokio::select! {
            _ = self.closed.cancelled() => return Err(Error::Closed),
            guard = self.current.lock() => guard,
        };
        if let Some(connected) = current.as_ref() {
            if connected.connection.status().connected() {
                return Ok(connected.clone());
            }
            tracing::warn!(connection = %self.name, "connection to the broker lost; reconnecting");
        }
        *current = None;
        let retry = Retry::new(self.backoff());
        let reconnect = retry.run_notify(
            |attempt| async move {
                let connected = self.try_connect_next().await.map_err(|(err, _)| err)?;
                tracing::info!(connection = %self.name, attempt, "reconnected to the broker");
                Ok(connected)
            },
            // Every failure is worth another attempt: the broker may come back.
            |_: &Error| true,
            |err, attempt, wait| {
                tracing::warn!(error = %err, ?wait, attempt, "broker connection attempt failed");
            },
        );
        let connected = tokio::select! {
            biased;
            _ = self.closed.cancelled() => return Err(Error::Closed),
            connected = reconnect => connected?,
        };
        rpc_core::metrics::reconnected("amqp");
        *current = Some(connected.clone());
        Ok(connected)
    }

    /// The wait between attempts to reconnect, resubscribe or republish: from 100 ms
    /// (or the URL's `max_backoff`, if shorter), doubling up to `max_backoff`, each
    /// drawn in the upper half of its nominal value.
    pub(crate) fn backoff(&self) -> Backoff {
        let max = self.config.max_backoff;
        Backoff::new(FIRST_BACKOFF.min(max), max)
    }

    /// Connects to the next host; a failure says whether it was transient (the broker
    /// reset or stalled the handshake) rather than a refusal.
    async fn try_connect_next(&self) -> std::result::Result<Connected, (Error, bool)> {
        let hosts = &self.config.hosts;
        let next = self.next_host.fetch_add(1, Ordering::Relaxed) % hosts.len();
        let host = &hosts[self.order[next]];
        let uri = self.uri(host);
        let properties =
            ConnectionProperties::default().with_connection_name(self.name.clone().into());
        let limit = self.config.connect_timeout;
        let connection = match tokio::time::timeout(limit, self.connect_uri(uri, properties)).await
        {
            Ok(Ok(connection)) => connection,
            Ok(Err(err)) => {
                let transient = is_reset(&err);
                return Err((
                    Error::transport(connect_kind(&err), format!("cannot connect to {host}"), err),
                    transient,
                ));
            }
            Err(_) => {
                return Err((
                    Error::transport_msg(
                        TransportErrorKind::Connect,
                        format!(
                            "connecting to the AMQP broker at {host} timed out after {limit:?} \
                         (TCP connect, TLS and AMQP handshake; URL option connect_timeout)"
                        ),
                    ),
                    false,
                ));
            }
        };
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::debug!(connection = %self.name, %host, generation, "connected to the broker");
        Ok(Connected {
            connection: Arc::new(connection),
            generation,
        })
    }

    async fn connect_uri(
        &self,
        uri: AMQPUri,
        properties: ConnectionProperties,
    ) -> lapin::Result<Connection> {
        let runtime = lapin::runtime::default_runtime()?;
        Connection::connect_uri_with_config(uri, properties, self.tls.clone(), runtime).await
    }

    fn uri(&self, host: &Host) -> AMQPUri {
        AMQPUri {
            scheme: if self.config.tls {
                AMQPScheme::AMQPS
            } else {
                AMQPScheme::AMQP
            },
            authority: AMQPAuthority {
                userinfo: AMQPUserInfo {
                    username: host.username.clone(),
                    password: host.password.clone(),
                },
                host: host.host.clone(),
                port: host.port,
            },
            vhost: self.config.vhost.clone(),
            query: AMQPQueryString {
                heartbeat: Some(self.config.heartbeat),
                // lapin's own bound on the TCP connect, a little past mqrpc's bound on
                // the whole attempt, so that mqrpc's (clearer) error is the one seen
                // and a connect abandoned by mqrpc still ends soon after.
                connection_timeout: Some(
                    u64::try_from(self.config.connect_timeout.as_millis())
                        .unwrap_or(u64::MAX)
                        .saturating_add(500),
                ),
                ..AMQPQueryString::default()
            },
        }
    }

    /// Closes the connection; everyone waiting on the link gets `Closed`.
    pub(crate) async fn close(&self) {
        self.closed.cancel();
        let current = self.current.lock().await.take();
        if let Some(connected) = current {
            let _ = connected.connection.close(200, "closing".into()).await;
        }
    }
}

/// The order in which a link tries `count` hosts: as given, or shuffled (oslo's
/// behaviour, so that a deployment's processes spread over a cluster's nodes).
fn host_order(count: usize, shuffle: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..count).collect();
    if shuffle {
        use rand::seq::SliceRandom;
        order.shuffle(&mut rand::rng());
    }
    order
}

/// Every host of the URL failed one connection attempt: the last failure of each
/// sort.
struct EveryHostFailed {
    /// A host reset the handshake (RabbitMQ under a storm of connections): worth
    /// another round.
    transient: Option<Error>,
    /// A host refused, had nothing listening, or stalled for all of `connect_timeout`.
    refused: Option<Error>,
}

/// Whether the broker accepted the TCP connection and then dropped it mid-handshake.
fn is_reset(err: &lapin::Error) -> bool {
    use std::io::ErrorKind;
    match err.kind() {
        lapin::ErrorKind::IOError(io) => matches!(
            io.kind(),
            ErrorKind::ConnectionReset
                | ErrorKind::ConnectionAborted
                | ErrorKind::BrokenPipe
                | ErrorKind::UnexpectedEof
        ),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_tried_in_order_or_in_a_shuffled_order_of_them_all() {
        assert_eq!(host_order(3, false), [0, 1, 2]);
        let mut firsts = std::collections::HashSet::new();
        for _ in 0..200 {
            let mut order = host_order(3, true);
            firsts.insert(order[0]);
            order.sort_unstable();
            assert_eq!(order, [0, 1, 2]);
        }
        assert_eq!(firsts.len(), 3, "every host comes first sometimes");
    }
}
