//! The AMQP configuration, built from `Default` with setters or parsed from a URL
//! (`url.rs`). Passwords never appear in `Debug` output or in errors.

mod url;

use std::fmt;
use std::time::Duration;

use rpc_core::TlsFiles;
use rpc_core::options::DEFAULT_CONNECT_TIMEOUT;

use crate::compression::Compression;
use crate::reply_queues::ReplyQueues;

/// Default `x-expires` of reply and fanout queues: oslo's
/// `rabbit_transient_queues_ttl` of 1800 s.
pub const DEFAULT_TRANSIENT_TTL: Duration = Duration::from_secs(1800);
/// AMQP heartbeat asked of the broker unless the URL says otherwise.
pub const DEFAULT_HEARTBEAT: u16 = 30;
/// The largest message sent unless the URL says otherwise: RabbitMQ 4's default
/// `max_message_size` (16 MiB; 3.x brokers accept up to 128 MiB).
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 16 * 1024 * 1024;
/// The longest wait between reconnection attempts unless the URL says otherwise
/// (`max_backoff`).
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How long each step of a re-subscription after a reconnection (declaring an
/// exchange or a queue, binding, consuming) may wait for the broker before it is
/// logged as stuck and tried again, unless the URL says otherwise
/// (`resubscribe_timeout`).
pub const DEFAULT_RESUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(10);

/// One broker host: where it listens and whom to connect as (`Host::new` then
/// [`Host::credentials`], or one comma-separated host of a URL).
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Host {
    /// Host name or address (IPv6 without brackets).
    pub host: String,
    /// Port.
    pub port: u16,
    /// User name.
    pub username: String,
    /// Password (never printed).
    pub password: String,
}

impl Host {
    /// The broker at `host` (a name or an address, IPv6 without brackets) and `port`,
    /// as RabbitMQ's default user `guest` (password `guest`).
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        Host {
            host: host.into(),
            port,
            username: "guest".to_owned(),
            password: "guest".to_owned(),
        }
    }

    /// Connects as `username` with `password`.
    #[must_use]
    pub fn credentials(mut self, username: impl Into<String>, password: impl Into<String>) -> Self {
        self.username = username.into();
        self.password = password.into();
        self
    }
}

impl fmt::Debug for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Host")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Everything an AMQP URL configures: parse a URL ([`AmqpConfig::parse`]) or start from
/// the defaults (a broker on `localhost:5672` as `guest`, the defaults of the URL
/// options) and set what differs.
///
/// ```no_run
/// # async fn demo() -> mqrpc::Result<()> {
/// use std::time::Duration;
/// use mqrpc::{AmqpConfig, AmqpHost, AmqpTransport};
///
/// let config = AmqpConfig::default()
///     .hosts([AmqpHost::new("rabbit-1", 5672).credentials("nova", "secret")])
///     .vhost("nova")
///     .prefetch(64)
///     .durable(true)
///     .connect_timeout(Duration::from_secs(2));
/// let transport = AmqpTransport::with_config(config).await?;
/// # let _ = transport; Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AmqpConfig {
    /// Brokers to try (rotated on each reconnection), in this order or, with
    /// [`AmqpConfig::shuffle_hosts`], in an order drawn for each transport.
    pub hosts: Vec<Host>,
    /// Whether each transport tries the hosts in an order of its own, drawn at
    /// random when it connects, as oslo.messaging does (`shuffle_hosts`, default
    /// true), so that the processes of a deployment spread over a cluster's nodes
    /// instead of all starting on the first. False tries them in the URL's order.
    pub shuffle_hosts: bool,
    /// Virtual host.
    pub vhost: String,
    /// TLS (`amqps://`, or `ssl=true` on `rabbit://`).
    pub tls: bool,
    /// The control exchange (oslo's `control_exchange`, default `openstack`).
    pub exchange: String,
    /// Durable exchange and topic/server queues (`amqp_durable_queues`).
    pub durable: bool,
    /// Quorum topic/server queues (`rabbit_quorum_queue`; implies durable).
    pub quorum: bool,
    /// Quorum reply and fanout queues (`transient_quorum`, oslo's
    /// `rabbit_transient_quorum_queue`): they survive the loss of a cluster node
    /// instead of dying with the node that held them. They keep their `x-expires`
    /// (`transient_ttl`) and are durable, as quorum queues must be.
    pub transient_quorum: bool,
    /// AMQP heartbeat in whole seconds, the protocol's unit (0 disables).
    pub heartbeat: u16,
    /// Prefetch of server consumers; `None` uses the server's concurrency limit.
    pub prefetch: Option<u16>,
    /// `x-expires` of reply and fanout queues; `None` disables it.
    pub transient_ttl: Option<Duration>,
    /// `x-expires` of topic, server and notification queues; `None` (the default, as
    /// in oslo) keeps them until deleted.
    pub topic_ttl: Option<Duration>,
    /// The largest message sent.
    pub max_message_size: usize,
    /// Longest wait between reconnection attempts.
    pub max_backoff: Duration,
    /// How long each step of a re-subscription (declare, bind, consume) may wait for
    /// the broker before it is logged (WARN, naming the step and the queue) and the
    /// subscription tried again on a fresh channel (`resubscribe_timeout`, default
    /// [`DEFAULT_RESUBSCRIBE_TIMEOUT`]). A broker node that froze keeps declarations
    /// waiting until the cluster declares it down (RabbitMQ's `net_ticktime`).
    pub resubscribe_timeout: Duration,
    /// CA and client certificate files (`tls_ca_file`, `tls_cert_file`,
    /// `tls_key_file`, or oslo's `ssl_*` names); naming any turns TLS on.
    pub tls_files: TlsFiles,
    /// Compression of every body this transport sends (`compression`, oslo's
    /// `kombu_compression`); `None` sends them as they are. Compressed bodies are
    /// read whatever this says.
    pub compression: Option<Compression>,
    /// How long one connection attempt may take: TCP connect, TLS handshake and
    /// AMQP handshake together (`connect_timeout`, default 10 s:
    /// `mqrpc::transport::options::DEFAULT_CONNECT_TIMEOUT`). It bounds the first connect and every
    /// reconnection attempt.
    pub connect_timeout: Duration,
    /// Reply-queue names a server answers besides the shape oslo.messaging and mqrpc
    /// give their own (`reply_` and 32 lowercase hex digits): the URL's
    /// `allow_reply_queues` (see [`ReplyQueues`]).
    pub reply_queues: ReplyQueues,
}

impl AmqpConfig {
    /// Whether topic and server queues (and the topic exchange) are durable.
    pub fn durable_queues(&self) -> bool {
        self.durable || self.quorum
    }
}

/// What `amqp://` means: RabbitMQ on `localhost:5672` as `guest`, virtual host `/`,
/// and the default of every URL option.
impl Default for AmqpConfig {
    fn default() -> Self {
        AmqpConfig {
            hosts: vec![Host::new("localhost", 5672)],
            shuffle_hosts: true,
            vhost: "/".to_owned(),
            tls: false,
            exchange: rpc_core::DEFAULT_EXCHANGE.to_owned(),
            durable: false,
            quorum: false,
            transient_quorum: false,
            heartbeat: DEFAULT_HEARTBEAT,
            prefetch: None,
            transient_ttl: Some(DEFAULT_TRANSIENT_TTL),
            topic_ttl: None,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            max_backoff: DEFAULT_MAX_BACKOFF,
            resubscribe_timeout: DEFAULT_RESUBSCRIBE_TIMEOUT,
            tls_files: TlsFiles::default(),
            compression: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            reply_queues: ReplyQueues::default(),
        }
    }
}

/// Setters, one per field, for a configuration built without a URL.
impl AmqpConfig {
    /// The brokers to try, in this order unless [`AmqpConfig::shuffle_hosts`] (at
    /// least one; a TLS broker usually listens on
    /// 5671).
    #[must_use]
    pub fn hosts(mut self, hosts: impl IntoIterator<Item = Host>) -> Self {
        self.hosts = hosts.into_iter().collect();
        self
    }

    /// Whether each transport tries the hosts in an order drawn at random (true, the
    /// default, as oslo.messaging) or in the order given (false).
    #[must_use]
    pub fn shuffle_hosts(mut self, shuffle: bool) -> Self {
        self.shuffle_hosts = shuffle;
        self
    }

    /// The virtual host.
    #[must_use]
    pub fn vhost(mut self, vhost: impl Into<String>) -> Self {
        self.vhost = vhost.into();
        self
    }

    /// Whether to connect with TLS (the ports of the hosts stay as they are).
    #[must_use]
    pub fn tls(mut self, tls: bool) -> Self {
        self.tls = tls;
        self
    }

    /// The control exchange.
    #[must_use]
    pub fn exchange(mut self, exchange: impl Into<String>) -> Self {
        self.exchange = exchange.into();
        self
    }

    /// Durable exchange and topic and server queues.
    #[must_use]
    pub fn durable(mut self, durable: bool) -> Self {
        self.durable = durable;
        self
    }

    /// Quorum topic and server queues (durable too).
    #[must_use]
    pub fn quorum(mut self, quorum: bool) -> Self {
        self.quorum = quorum;
        self
    }

    /// Quorum reply and fanout queues (oslo's `rabbit_transient_quorum_queue`).
    #[must_use]
    pub fn transient_quorum(mut self, transient_quorum: bool) -> Self {
        self.transient_quorum = transient_quorum;
        self
    }

    /// The AMQP heartbeat in seconds (0 disables it).
    #[must_use]
    pub fn heartbeat(mut self, seconds: u16) -> Self {
        self.heartbeat = seconds;
        self
    }

    /// The prefetch of server consumers; `None` (or 0) uses the server's concurrency
    /// limit.
    #[must_use]
    pub fn prefetch(mut self, prefetch: impl Into<Option<u16>>) -> Self {
        self.prefetch = prefetch.into().filter(|n| *n > 0);
        self
    }

    /// The `x-expires` of reply and fanout queues; `None` (or zero) sets none.
    #[must_use]
    pub fn transient_ttl(mut self, ttl: impl Into<Option<Duration>>) -> Self {
        self.transient_ttl = ttl.into().filter(|ttl| !ttl.is_zero());
        self
    }

    /// The `x-expires` of topic and server queues; `None` (or zero) sets none.
    #[must_use]
    pub fn topic_ttl(mut self, ttl: impl Into<Option<Duration>>) -> Self {
        self.topic_ttl = ttl.into().filter(|ttl| !ttl.is_zero());
        self
    }

    /// The largest message sent, in bytes.
    #[must_use]
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// The longest wait between reconnection attempts.
    #[must_use]
    pub fn max_backoff(mut self, max_backoff: Duration) -> Self {
        self.max_backoff = max_backoff;
        self
    }

    /// How long each re-subscription step (declare, bind, consume) may wait for the
    /// broker before it is logged as stuck and tried again.
    #[must_use]
    pub fn resubscribe_timeout(mut self, timeout: Duration) -> Self {
        self.resubscribe_timeout = timeout;
        self
    }

    /// CA and client certificate files; naming any turns TLS on, as in a URL.
    #[must_use]
    pub fn tls_files(mut self, files: TlsFiles) -> Self {
        self.tls |= files.any();
        self.tls_files = files;
        self
    }

    /// The compression of every body sent; `None` sends them as they are.
    #[must_use]
    pub fn compression(mut self, compression: impl Into<Option<Compression>>) -> Self {
        self.compression = compression.into();
        self
    }

    /// How long one connection attempt may take (TCP, TLS and AMQP handshake).
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Reply-queue names a server answers besides the standard shape.
    #[must_use]
    pub fn reply_queues(mut self, allowed: ReplyQueues) -> Self {
        self.reply_queues = allowed;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> AmqpConfig {
        AmqpConfig::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"))
    }

    #[test]
    fn the_default_is_what_amqp_means_and_setters_change_one_field_each() {
        assert_eq!(AmqpConfig::default(), parse("amqp://"));
        let built = AmqpConfig::default()
            .hosts([
                Host::new("h1", 5673).credentials("u1", "p@ss"),
                Host::new("::1", 5674).credentials("u2", "p2"),
            ])
            .vhost("vh")
            .shuffle_hosts(false)
            .transient_quorum(true)
            .resubscribe_timeout(Duration::from_secs(3))
            .exchange("nova")
            .durable(true)
            .heartbeat(5)
            .prefetch(10)
            .transient_ttl(None)
            .topic_ttl(Duration::from_secs(300))
            .max_backoff(Duration::from_millis(500))
            .connect_timeout(Duration::from_millis(250))
            .compression(Compression::Gzip)
            .reply_queues(ReplyQueues::parse("legacy"));
        let parsed = parse(
            "amqp://u1:p%40ss@h1:5673,u2:p2@[::1]:5674/vh?exchange=nova&durable=1&heartbeat=5\
             &prefetch=10&transient_ttl=0&topic_ttl=300&max_backoff=0.5&connect_timeout=250ms\
             &compression=gzip&allow_reply_queues=legacy&shuffle_hosts=false\
             &transient_quorum=true&resubscribe_timeout=3s",
        );
        assert_eq!(built, parsed);
        assert_eq!(AmqpConfig::default().prefetch(0).prefetch, None);
        let mut files = TlsFiles::default();
        files.ca_file = Some("/ca.pem".into());
        assert!(AmqpConfig::default().tls_files(files).tls);
    }
}
