//! The connection to the broker, re-opened when lost: capped exponential backoff with
//! jitter, rotating through the URL's hosts. Everyone who needs the connection asks
//! the `Link`; only one task reconnects at a time.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::uri::{AMQPAuthority, AMQPQueryString, AMQPScheme, AMQPUri, AMQPUserInfo};
use lapin::{Connection, ConnectionProperties};
use rand::Rng;
use rpc_core::{Error, Result};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::config::{AmqpConfig, Host};

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
    next_host: AtomicUsize,
    generation: AtomicUsize,
    name: String,
    /// The CA and client identity from the URL's TLS files, read once.
    tls: OwnedTLSConfig,
    pub(crate) closed: CancellationToken,
}

impl Link {
    /// Opens the first connection. Each host is tried in turn, each attempt bounded
    /// by the URL's `connect_timeout`; a broker that resets the handshake (RabbitMQ
    /// under a storm of connections) is tried again with backoff within
    /// `connect_timeout` overall, while a refusal (nothing listening, bad
    /// credentials) or a handshake that stalls for the whole `connect_timeout` fails
    /// once every host failed.
    pub(crate) async fn open(config: AmqpConfig) -> Result<Arc<Link>> {
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
        let link = Arc::new(Link {
            tls,
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
        let mut attempt = 0u32;
        loop {
            let mut transient = None;
            let mut refused = None;
            for _ in 0..link.config.hosts.len() {
                match link.try_connect_next().await {
                    Ok(connected) => {
                        *current = Some(connected);
                        drop(current);
                        return Ok(link);
                    }
                    Err((err, true)) => transient = Some(err),
                    Err((err, false)) => refused = Some(err),
                }
            }
            let wait = link.backoff(attempt);
            attempt = attempt.saturating_add(1);
            match transient {
                Some(err) if tokio::time::Instant::now() + wait < deadline => {
                    tracing::debug!(error = %err, ?wait, "broker reset the connection; trying again");
                    tokio::time::sleep(wait).await;
                }
                _ => return Err(refused.or(transient).unwrap_or(Error::Closed)),
            }
        }
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
        let mut attempt = 0u32;
        loop {
            if self.closed.is_cancelled() {
                return Err(Error::Closed);
            }
            match self.connect_next().await {
                Ok(connected) => {
                    tracing::info!(connection = %self.name, attempt, "reconnected to the broker");
                    *current = Some(connected.clone());
                    return Ok(connected);
                }
                Err(err) => {
                    let wait = self.backoff(attempt);
                    tracing::warn!(error = %err, ?wait, attempt, "broker connection attempt failed");
                    attempt = attempt.saturating_add(1);
                    tokio::select! {
                        _ = self.closed.cancelled() => return Err(Error::Closed),
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    /// Capped exponential backoff with full jitter in the upper half.
    pub(crate) fn backoff(&self, attempt: u32) -> Duration {
        let cap = self.config.max_backoff;
        let exp = FIRST_BACKOFF
            .checked_mul(1u32 << attempt.min(16))
            .unwrap_or(cap)
            .min(cap);
        let jitter: f64 = rand::rng().random_range(0.5..=1.0);
        exp.mul_f64(jitter)
    }

    async fn connect_next(&self) -> Result<Connected> {
        self.try_connect_next().await.map_err(|(err, _)| err)
    }

    /// Connects to the next host; a failure says whether it was transient (the broker
    /// reset or stalled the handshake) rather than a refusal.
    async fn try_connect_next(&self) -> std::result::Result<Connected, (Error, bool)> {
        let hosts = &self.config.hosts;
        let host = &hosts[self.next_host.fetch_add(1, Ordering::Relaxed) % hosts.len()];
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
                    Error::transport(
                        rpc_core::TransportErrorKind::Other,
                        format!("cannot connect to {host}"),
                        err,
                    ),
                    transient,
                ));
            }
            Err(_) => {
                return Err((
                    Error::transport_msg(
                        rpc_core::TransportErrorKind::Other,
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
