//! [`ServerBuilder`]: a server's settings, and `start`, which subscribes and spawns
//! the serving loop.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::accept::RecentIds;
use super::serve::serve;
use super::{
    AckMode, DEFAULT_CONCURRENCY, DEFAULT_DUPLICATE_WINDOW, DEFAULT_GRACE_PERIOD,
    DEFAULT_MAX_DUPLICATE_IDS, Replier, Server, Serving,
};
use crate::auth::MessageAuth;
use crate::budget::{ByteBudget, DEFAULT_MAX_PENDING_BYTES};
use crate::control::{self, CONTROL_NAMESPACE, OSLO_PING_METHOD, ServingStats, StatusSource};
use crate::dispatcher::Dispatcher;
use crate::endpoint::Endpoint;
use crate::error::{Error, Result};
use crate::health::ConsumerStatus;
use crate::logs::Throttle;
use crate::metrics::ServerMetrics;
use crate::target::Target;
use crate::transport::{ListenOptions, Transport};

/// How many refusals of unauthenticated requests a server sends at once; beyond
/// that, refused requests are dropped without an answer.
const MAX_REFUSALS_IN_FLIGHT: usize = 16;

/// Configures and starts a [`Server`].
#[must_use = "a builder does nothing until start() is awaited"]
pub struct ServerBuilder {
    transport: Arc<dyn Transport>,
    target: Target,
    endpoints: Vec<Endpoint>,
    concurrency: usize,
    ack_mode: AckMode,
    grace_period: Duration,
    duplicate_window: Duration,
    max_duplicate_ids: usize,
    max_message_size: Option<usize>,
    max_pending_bytes: usize,
    auth: Option<MessageAuth>,
    discoverable: bool,
    oslo_ping: bool,
}

impl fmt::Debug for ServerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerBuilder")
            .field("transport", &self.transport.name())
            .field("target", &self.target)
            .field("endpoints", &self.endpoints)
            .field("concurrency", &self.concurrency)
            .field("ack_mode", &self.ack_mode)
            .field("grace_period", &self.grace_period)
            .field("duplicate_window", &self.duplicate_window)
            .field("max_duplicate_ids", &self.max_duplicate_ids)
            .field("max_message_size", &self.max_message_size)
            .field("max_pending_bytes", &self.max_pending_bytes)
            .field("auth", &self.auth)
            .field("discoverable", &self.discoverable)
            .field("oslo_ping", &self.oslo_ping)
            .finish()
    }
}

impl ServerBuilder {
    /// The defaults, for [`Server::builder`].
    pub(super) fn new(transport: Arc<dyn Transport>, target: Target) -> Self {
        ServerBuilder {
            transport,
            target,
            endpoints: Vec::new(),
            concurrency: DEFAULT_CONCURRENCY,
            ack_mode: AckMode::default(),
            grace_period: DEFAULT_GRACE_PERIOD,
            duplicate_window: DEFAULT_DUPLICATE_WINDOW,
            max_duplicate_ids: DEFAULT_MAX_DUPLICATE_IDS,
            max_message_size: None,
            max_pending_bytes: DEFAULT_MAX_PENDING_BYTES,
            auth: None,
            discoverable: true,
            oslo_ping: false,
        }
    }
}

impl ServerBuilder {
    /// Adds an endpoint; endpoints are tried in the order they are added.
    pub fn endpoint(mut self, endpoint: Endpoint) -> Self {
        self.endpoints.push(endpoint);
        self
    }

    /// At most this many handlers run at once, and no more deliveries than that are
    /// taken from the broker (default 64; 0 is taken as 1).
    pub fn concurrency(mut self, limit: usize) -> Self {
        self.concurrency = limit.max(1);
        self
    }

    /// When requests are acknowledged (default [`AckMode::BeforeDispatch`]).
    pub fn ack_mode(mut self, mode: AckMode) -> Self {
        self.ack_mode = mode;
        self
    }

    /// How long [`Server::shutdown`] waits for in-flight handlers (default 30 s).
    pub fn grace_period(mut self, grace: Duration) -> Self {
        self.grace_period = grace;
        self
    }

    /// How long the server remembers each request's `_unique_id`, to drop a copy
    /// the broker delivers again, e.g. after a lost acknowledgement (default
    /// [`DEFAULT_DUPLICATE_WINDOW`], 2 min). Make it longer than the time the
    /// broker waits before it redelivers (JetStream's `ack_wait`, Redis's
    /// `claim_idle`): a copy that arrives later runs again. At most
    /// [`ServerBuilder::max_duplicate_ids`] ids are kept; past it the window is
    /// shorter, with a rate-limited warning.
    pub fn duplicate_window(mut self, window: Duration) -> Self {
        self.duplicate_window = window;
        self
    }

    /// At most this many ids are kept for the [`ServerBuilder::duplicate_window`]
    /// (default [`DEFAULT_MAX_DUPLICATE_IDS`], 65,536, a few MiB; 0 turns
    /// duplicate suppression off).
    pub fn max_duplicate_ids(mut self, max: usize) -> Self {
        self.max_duplicate_ids = max;
        self
    }

    /// Requests larger than this many bytes are rejected on receipt, unread (default:
    /// the transport's own limit, [`crate::Capabilities::max_message_size`]).
    pub fn max_message_size(mut self, limit: usize) -> Self {
        self.max_message_size = Some(limit);
        self
    }

    /// At most about this many bytes of requests are held by the server at once:
    /// taken from the broker and not yet handled to the end (default
    /// [`DEFAULT_MAX_PENDING_BYTES`], 64 MiB). Past it the server takes no more;
    /// AMQP, Redis and JetStream leave the rest waiting in the broker, core NATS
    /// (at-most-once) drops what does not fit, with a rate-limited warning. One
    /// request bigger than the budget is still taken when nothing else is held.
    pub fn max_pending_bytes(mut self, bytes: usize) -> Self {
        self.max_pending_bytes = bytes.max(1);
        self
    }

    /// Accepts only requests that `auth` verifies and signs every reply (opt-in
    /// message authentication; see [`MessageAuth`]). A refused request is counted,
    /// logged without its payload, dropped, and answered with
    /// [`crate::AUTH_FAILURE_CLASS`] when it names a reply address.
    pub fn message_auth(mut self, auth: MessageAuth) -> Self {
        self.auth = Some(auth.own_memory());
        self
    }

    /// Whether the server answers the control requests of the reserved namespace
    /// [`crate::CONTROL_NAMESPACE`] (default true): [`crate::Client::discover`] and
    /// `mqrpc ping`/`mqrpc status` then list it, with its host, process id,
    /// endpoints, uptime and load. With `false` it drops them unanswered, so askers
    /// do not learn it is there.
    pub fn discoverable(mut self, yes: bool) -> Self {
        self.discoverable = yes;
        self
    }

    /// Whether the server answers oslo.messaging's ping, as a Python server with
    /// `rpc_ping_enabled = True` does (default false, as in oslo.messaging): a call
    /// of [`crate::OSLO_PING_METHOD`] in the null namespace at version 1.0, with any
    /// keyword arguments, returns `"pong"`. Its endpoint comes after the ones added
    /// with [`ServerBuilder::endpoint`], as oslo appends its `PingEndpoint`; when one
    /// of those in the null namespace has a method of that name already, the ping
    /// endpoint is left out with a warning, as in oslo.messaging.
    pub fn oslo_ping(mut self, yes: bool) -> Self {
        self.oslo_ping = yes;
        self
    }

    /// The endpoints to dispatch to: the control endpoint first (when the server is
    /// discoverable), the application's, then oslo's ping endpoint (when on).
    fn dispatch_endpoints(
        &mut self,
        stats: &Arc<ServingStats>,
        concurrency: usize,
    ) -> Result<Vec<Endpoint>> {
        if let Some(reserved) = (self.endpoints.iter())
            .find(|endpoint| endpoint.namespace.as_deref() == Some(CONTROL_NAMESPACE))
        {
            return Err(Error::InvalidConfig(format!(
                "namespace {CONTROL_NAMESPACE} is reserved for the control requests every \
                 server answers; an endpoint cannot use it ({reserved:?})"
            )));
        }
        let mut endpoints = std::mem::take(&mut self.endpoints);
        let mut oslo_ping = self.oslo_ping;
        if oslo_ping
            && endpoints.iter().any(|endpoint| {
                endpoint.namespace.is_none() && endpoint.has_method(OSLO_PING_METHOD)
            })
        {
            tracing::warn!(
                "oslo_ping is on but an endpoint has a method {OSLO_PING_METHOD} already; \
                 not adding the ping endpoint"
            );
            oslo_ping = false;
        }
        if oslo_ping {
            endpoints.push(control::oslo_ping_endpoint());
        }
        if self.discoverable {
            let source = StatusSource {
                server: self.target.server.clone().unwrap_or_default(),
                topic: self.target.topic.clone(),
                exchange: (self.target)
                    .exchange_or(self.transport.default_exchange())
                    .to_owned(),
                backend: self.transport.name(),
                endpoints: control::describe(&endpoints),
                concurrency,
                oslo_ping,
                started: Instant::now(),
                stats: stats.clone(),
            };
            endpoints.insert(0, control::control_endpoint(source));
        }
        Ok(endpoints)
    }

    /// Subscribes to the topic, `topic.server` and the fanout, and starts serving.
    /// When this returns, messages sent to the target reach this server.
    pub async fn start(mut self) -> Result<Server> {
        self.target.validate_for_listen()?;
        let stats = Arc::new(ServingStats::default());
        let endpoints = self.dispatch_endpoints(&stats, self.concurrency)?;
        let budget = ByteBudget::new(self.max_pending_bytes);
        let status = ConsumerStatus::new();
        let options = ListenOptions::new(self.concurrency)
            .settle_on_receipt(self.ack_mode == AckMode::BeforeDispatch)
            .budget(budget.clone())
            .status(status.clone());
        let publisher = self.transport.publisher().await?;
        let consumer = self.transport.listen(&self.target, &options).await?;
        let max_message_size = self.transport.capabilities().max_message_size;
        let max_request = self.max_message_size.or(max_message_size);
        let token = CancellationToken::new();
        let metrics = ServerMetrics::new(
            &self.target.topic,
            // The dispatch list: the application's endpoints and the built-in ones.
            (endpoints.iter()).flat_map(|endpoint| endpoint.methods.keys().map(String::as_str)),
            budget.clone(),
        );
        let serving = Serving {
            dispatcher: Arc::new(Dispatcher::new(endpoints)),
            replier: Replier {
                publisher,
                max_message_size,
                auth: self.auth.clone(),
                dropped: Arc::new(Throttle::default()),
            },
            auth: self.auth,
            ack_mode: self.ack_mode,
            topic: Arc::from(self.target.topic.as_str()),
            max_request,
            refusals: Arc::new(Semaphore::new(MAX_REFUSALS_IN_FLIGHT)),
            budget,
            rejections: Arc::new(Throttle::default()),
            abandoned: Arc::default(),
            stats,
            discoverable: self.discoverable,
            metrics,
            backend: self.transport.name(),
        };
        let health = status.probe();
        let task = tokio::spawn(serve(
            consumer,
            status,
            serving,
            self.concurrency,
            self.grace_period,
            RecentIds::new(self.duplicate_window, self.max_duplicate_ids),
            token.clone(),
        ));
        tracing::debug!(target = %self.target, "server started");
        Ok(Server {
            target: self.target,
            token,
            task: Some(task),
            health,
        })
    }
}
