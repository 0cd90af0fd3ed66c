//! The NATS transport of mqrpc.
//!
//! - A topic is a subject its servers share through a queue group; a named server has
//!   a subject of its own (also a queue group, for several instances of one name); a
//!   fanout is a subject every server subscribes to plainly.
//! - Each client has one inbox and a single wildcard subscription for all its replies.
//!   A call's request carries a NATS reply subject under that inbox, so when nothing
//!   listens the server answers "no responders" at once and the call fails with
//!   `Error::NoResponders` instead of waiting for its timeout.
//! - Core NATS is at-most-once and keeps nothing for absent servers. With
//!   `jetstream=true`, casts to a topic or server go through a JetStream work-queue
//!   stream instead: kept while no server runs, delivered again until a server acks.
//!   The stream is made by the first cast that finds none, and set up by each server
//!   that listens: created with `replicas` copies (default 1; 3 on a JetStream
//!   cluster keeps casts through the loss of a node), and on an existing stream only
//!   its subject is added, its `max_age` set when the client sets one, and its
//!   replicas raised, never lowered (a raise the cluster refuses is logged and the
//!   stream used as it is); anything else an operator set is kept. `connect` sends no JetStream request, so
//!   it never waits on a stream without a leader; a cast to such a stream fails
//!   within about 2 s (at once right after casts were stored), saying so. Without
//!   JetStream on the server, casts and servers fail `Refused`, saying so.
//! - Notifications always go through JetStream, in both modes: an exchange's go to
//!   its stream `<prefix>_<exchange>_notifications` (subjects
//!   `<prefix>.js._notify.<exchange>.<topic>.<priority>`, limits retention, kept
//!   `max_age`), made by the first notifier or listener that finds none. Each route
//!   has a durable pull consumer for the default group, made by its first listener
//!   and delivering from the stream's start (so notifications sent before any
//!   listener are kept), and one per pool, made when the pool first listens and
//!   delivering from then on; the listeners of a group share its consumer. Acked
//!   once handled; a requeue is a NAK (delivered again at once), a drop a TERM; a
//!   listener gone without settling leaves them to be delivered again after
//!   `ack_wait`. Without JetStream on the server, they fail `Refused`, saying so.
//! - Reconnection is async-nats' own: it reconnects and re-subscribes by itself.
//!   `connect_timeout` (URL option, `2s` or plain seconds, default 10 s) bounds each
//!   attempt. On a cluster, list several servers in the URL (`nats://h1,h2,h3`);
//!   async-nats also learns the others from the server it reaches, unless the
//!   servers run with `--no_advertise`.
//! - A server holds no more request bytes than its budget
//!   ([`rpc_core::ListenOptions::budget`]): its core NATS subscriptions are drained
//!   as messages arrive, and a request that does not fit is dropped at once and
//!   counted ([`NatsTransport::dropped_requests`], one rate-limited warning), as
//!   core NATS is at-most-once. JetStream casts are pulled only while the budget has
//!   room, for at most that many bytes; the rest waits in the stream.
//! - Replies are published with a NATS reply subject of the server's own: when the
//!   caller's inbox has no listener any more, nats-server answers "no responders"
//!   and the server's next reply to it fails, which stops a stream to a caller
//!   that has gone.
//! - Names: subjects are escaped tokens and at most [`MAX_SUBJECT_BYTES`]
//!   long (a longer topic is refused with a clear error, as nats-server would close
//!   the connection); JetStream stream and consumer names fit nats-server's 255
//!   characters whatever the topic (a readable head and a hash when longer).
//!
//! ```no_run
//! # async fn demo() -> mqrpc::Result<()> {
//! let transport = mqrpc::NatsTransport::connect("nats://127.0.0.1:4222").await?;
//! # let _ = transport; Ok(()) }
//! ```

#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod batch;
mod config;
mod error;
mod jetstream;
mod monitor;
mod notify;
mod publisher;
mod reply;
mod server;
mod stream;
mod subjects;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use rpc_core::{
    Capabilities, Consumer, Error, ListenOptions, NotificationSource, Publisher, ReplyQueue,
    Result, Target, Transport, TransportErrorKind,
};

pub use config::{Auth, DEFAULT_MAX_AGE, NatsConfig};
pub use rpc_core::options::DEFAULT_CONNECT_TIMEOUT;
pub use subjects::{MAX_JETSTREAM_NAME, MAX_SUBJECT_BYTES};

pub(crate) use error::nats_error;
use publisher::NatsPublisher;
use reply::ReplyConsumer;
use server::ServerConsumer;

/// A connection to NATS. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct NatsTransport {
    shared: Arc<Shared>,
}

pub(crate) struct Shared {
    pub(crate) config: NatsConfig,
    pub(crate) client: async_nats::Client,
    pub(crate) jetstream: Option<async_nats::jetstream::Context>,
    /// The JetStream context of notifications, which always go through JetStream.
    pub(crate) notify_js: async_nats::jetstream::Context,
    /// Slow-consumer events the client reported (messages it dropped).
    pub(crate) slow_consumers: Arc<AtomicU64>,
    /// Whether the client is connected, as its events say: async-nats reconnects
    /// and subscribes again by itself, so servers learn of it only here.
    pub(crate) connected: tokio::sync::watch::Sender<bool>,
    /// Core NATS requests this transport's servers dropped because they did not fit
    /// in the server's byte budget or queue.
    pub(crate) dropped: AtomicU64,
    publisher: Arc<NatsPublisher>,
}

impl std::fmt::Debug for NatsTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsTransport")
            .field("config", &self.shared.config)
            .finish()
    }
}

/// What a consumer hands out, merged from several subscriptions or pulls.
pub(crate) type Deliveries = futures::stream::BoxStream<'static, Result<rpc_core::Delivery>>;

/// How long a round trip to the server or a flush may take before it counts as failed.
pub(crate) const ROUND_TRIP_LIMIT: Duration = Duration::from_secs(5);

/// A round trip through the server: once it returns, the server has processed every
/// command this client sent before (subscriptions, publishes). `flush` only writes
/// the socket; a request to a subject nobody listens on comes back "no responders"
/// after the server handled what came before it.
pub(crate) async fn round_trip(
    shared_client: &async_nats::Client,
    config: &NatsConfig,
) -> Result<()> {
    let request = shared_client.request(config.ping_subject(), bytes::Bytes::new());
    match tokio::time::timeout(ROUND_TRIP_LIMIT, request).await {
        Ok(Err(err)) if err.kind() == async_nats::client::RequestErrorKind::NoResponders => Ok(()),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(err)) => Err(nats_error("round trip to the NATS server", err)),
        Err(_) => Err(Error::transport_msg(
            TransportErrorKind::Timeout,
            format!("the NATS server did not answer within {ROUND_TRIP_LIMIT:?}"),
        )),
    }
}

impl NatsTransport {
    /// Connects to the NATS server(s) of a `nats://` or `tls://` URL (see
    /// [`NatsConfig::parse`]). Fails when no server answers.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::with_config(NatsConfig::parse(url)?).await
    }

    /// Connects with a configuration, parsed or built (checked first with
    /// [`NatsConfig::validate`]).
    pub async fn with_config(config: NatsConfig) -> Result<Self> {
        config.validate()?;
        let slow_consumers = Arc::new(AtomicU64::new(0));
        let counter = slow_consumers.clone();
        let connected = tokio::sync::watch::Sender::new(true);
        let reported = connected.clone();
        let mut options = async_nats::ConnectOptions::new()
            .name(format!("mqrpc:{}", std::process::id()))
            .subscription_capacity(config.subscription_capacity)
            .connection_timeout(config.connect_timeout)
            // Every subject this transport publishes to is made of escaped tokens under
            // a checked prefix, and a reply inbox taken from a request is checked in
            // the publisher (`valid_inbox`); async-nats's own scan of each subject
            // (and the copy of a `String` subject it works on) is then done twice.
            .skip_subject_validation(true)
            .require_tls(config.tls)
            .event_callback(move |event| {
                let counter = counter.clone();
                let reported = reported.clone();
                // `Connected` comes once the connection is up again; async-nats
                // sends its subscriptions right after, before anything else. It says
                // `Connected` on the first connection too, which changes nothing:
                // a reconnection is a `Connected` after a `Disconnected`.
                let set = move |up: bool| {
                    reported.send_if_modified(|was| std::mem::replace(was, up) != up)
                };
                async move {
                    match event {
                        async_nats::Event::SlowConsumer(sid) => {
                            counter.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(
                                subscription = sid,
                                "NATS slow consumer: the client dropped messages"
                            );
                        }
                        async_nats::Event::Disconnected => {
                            set(false);
                            tracing::warn!("disconnected from NATS; reconnecting")
                        }
                        async_nats::Event::Connected => {
                            if set(true) {
                                rpc_core::metrics::reconnected("nats");
                            }
                            tracing::info!("connected to NATS")
                        }
                        other => tracing::debug!(event = %other, "NATS event"),
                    }
                }
            });
        // Read here so that a missing file is a clear error, not a failed handshake.
        let pem = config.tls_files.load()?;
        if let (Some(_), Some(path)) = (&pem.ca, &config.tls_files.ca_file) {
            options = options.add_root_certificates(path.clone());
        }
        if let (Some(_), Some(cert), Some(key)) = (
            &pem.identity,
            &config.tls_files.cert_file,
            &config.tls_files.key_file,
        ) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        options = match &config.auth {
            Auth::None => options,
            Auth::UserPassword(user, password) => {
                options.user_and_password(user.clone(), password.clone())
            }
            Auth::Token(token) => options.token(token.clone()),
            Auth::CredentialsFile(path) => {
                options.credentials_file(path.clone()).await.map_err(|e| {
                    Error::InvalidUrl(format!("NATS credentials file {}: {e}", path.display()))
                })?
            }
        };
        let servers: Vec<async_nats::ServerAddr> = config
            .servers
            .iter()
            .map(|s| s.parse())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| Error::InvalidUrl("NATS URL: a server address is malformed".to_owned()))?;
        // Each attempt is bounded by async-nats (`connection_timeout`), reconnects
        // included; the whole first connect, name resolution too, by this timeout.
        let attempts = u32::try_from(servers.len().max(1)).unwrap_or(u32::MAX);
        let bound = config.connect_timeout.saturating_mul(attempts);
        let where_to = config.servers.join(",");
        let timed_out = format!(
            "connecting to NATS at {where_to} timed out after {:?} (connect_timeout)",
            config.connect_timeout
        );
        let client = match tokio::time::timeout(bound, options.connect(servers)).await {
            Ok(Ok(client)) => client,
            Ok(Err(err)) if err.kind() == async_nats::ConnectErrorKind::TimedOut => {
                return Err(nats_error(&timed_out, err));
            }
            Ok(Err(err)) => {
                return Err(nats_error(
                    &format!("cannot connect to NATS at {where_to}"),
                    err,
                ));
            }
            Err(_) => {
                return Err(Error::transport_msg(TransportErrorKind::Connect, timed_out));
            }
        };
        // API requests and store acknowledgements bounded well inside a cast's usual
        // deadline, so a stream without a leader is reported as such.
        let any_js = async_nats::jetstream::ContextBuilder::new()
            .timeout(crate::stream::JETSTREAM_API_TIMEOUT)
            .build(client.clone());
        let jetstream = config.jetstream.then(|| any_js.clone());
        let publisher = Arc::new(NatsPublisher::new(
            client.clone(),
            config.clone(),
            jetstream.clone(),
            any_js.clone(),
        ));
        let shared = Arc::new(Shared {
            config,
            client,
            jetstream,
            notify_js: any_js,
            slow_consumers,
            connected,
            dropped: AtomicU64::new(0),
            publisher,
        });
        // No JetStream request here: the stream is created by the first cast that
        // finds none, and set up by each server that listens (`jetstream::pulls`), so
        // connecting never waits on a stream that has no leader.
        Ok(NatsTransport { shared })
    }

    /// The parsed configuration.
    pub fn config(&self) -> &NatsConfig {
        &self.shared.config
    }

    /// Requests the servers of this transport dropped on core NATS, since it
    /// connected, because they did not fit in the server's byte budget
    /// (`ServerBuilder::max_pending_bytes`) or its queue (`subscription_capacity`
    /// messages). Core NATS is at-most-once: such a request is lost, its caller
    /// times out. Each drop is also counted in a rate-limited warning.
    pub fn dropped_requests(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// The largest message the connected server accepts (its `max_payload`).
    pub fn max_payload(&self) -> usize {
        self.shared.client.max_payload()
    }

    /// The largest message this transport sends or accepts: the URL's
    /// `max_message_size`, capped by the server's `max_payload`.
    pub fn max_message_size(&self) -> usize {
        message_limit(&self.shared.client, &self.shared.config)
    }
}

/// The URL's `max_message_size`, capped by the server's `max_payload` (read from the
/// client's atomic, so it is cheap per publish).
pub(crate) fn message_limit(client: &async_nats::Client, config: &NatsConfig) -> usize {
    let server = client.max_payload();
    config
        .max_message_size
        .map_or(server, |limit| limit.min(server))
}

#[async_trait]
impl Transport for NatsTransport {
    fn name(&self) -> &'static str {
        "nats"
    }

    fn capabilities(&self) -> Capabilities {
        let jetstream = self.shared.config.jetstream;
        Capabilities::default()
            .keeps_messages_without_listener(jetstream)
            .reports_no_responders(true)
            .redelivers_unacked(jetstream)
            .max_message_size(Some(self.max_message_size()))
            .notifications(true)
    }

    fn default_exchange(&self) -> &str {
        &self.shared.config.exchange
    }

    fn describe(&self) -> String {
        format!("nats {}", self.shared.config.servers.join(","))
    }

    async fn publisher(&self) -> Result<Arc<dyn Publisher>> {
        Ok(self.shared.publisher.clone())
    }

    async fn listen(&self, target: &Target, options: &ListenOptions) -> Result<Box<dyn Consumer>> {
        target.validate_for_listen()?;
        let consumer = ServerConsumer::start(self.shared.clone(), target, options).await?;
        Ok(Box::new(consumer))
    }

    async fn listen_notifications(
        &self,
        source: &NotificationSource,
        options: &ListenOptions,
    ) -> Result<Box<dyn Consumer>> {
        let consumer =
            notify::NotificationConsumer::start(self.shared.clone(), source, options).await?;
        Ok(Box::new(consumer))
    }

    async fn monitor(&self, target: &Target) -> Result<Box<dyn Consumer>> {
        Ok(Box::new(
            monitor::Monitor::start(self.shared.clone(), target).await?,
        ))
    }

    async fn reply_queue(&self) -> Result<ReplyQueue> {
        let (address, consumer) = ReplyConsumer::start(self.shared.clone()).await?;
        Ok(ReplyQueue {
            address,
            consumer: Box::new(consumer),
        })
    }
}
