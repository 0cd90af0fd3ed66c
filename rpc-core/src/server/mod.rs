//! The RPC server: consumes a target's three addresses, bounds work with a concurrency
//! limit, dispatches each request, replies (with call-monitor heartbeats), turns
//! panics into failures and shuts down gracefully.

// A `RemoteError` here is the failure document itself, built once per failed
// request and sent as it is; boxing it would only add an allocation.
#![allow(clippy::result_large_err)]

mod accept;
mod builder;
mod replier;
mod serve;
mod shutdown;
mod work;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::auth::MessageAuth;
use crate::budget::ByteBudget;
use crate::control::ServingStats;
use crate::dispatcher::Dispatcher;
use crate::error::{Error, Result, TransportErrorKind};
use crate::health::{Health, HealthProbe};
use crate::logs::Throttle;
use crate::metrics::ServerMetrics;
use crate::target::Target;
use crate::transport::{Address, Transport};
pub use builder::ServerBuilder;
use replier::Replier;
pub use shutdown::{SERVER_SHUTDOWN_CLASS, SERVER_SHUTDOWN_MODULE};

/// How many requests a server handles at once unless told otherwise (oslo's
/// `executor_thread_pool_size`).
pub const DEFAULT_CONCURRENCY: usize = 64;
/// How long `shutdown()` lets in-flight handlers run unless told otherwise.
pub const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(30);
/// How long a server remembers a request's `_unique_id` to drop a redelivered
/// copy, unless told otherwise: four times JetStream's default `ack_wait` (30 s),
/// the longest a broker here waits before it redelivers.
pub const DEFAULT_DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// At most this many ids are remembered for the duplicate window unless told
/// otherwise (a few MiB); past it the oldest go first and the window is shorter.
pub const DEFAULT_MAX_DUPLICATE_IDS: usize = 65_536;

/// When a server acknowledges a request to the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum AckMode {
    /// On receipt, before the handler runs: at-most-once, oslo.messaging's behaviour.
    #[default]
    BeforeDispatch,
    /// After the handler finished and its reply was sent: at-least-once; a server
    /// that dies mid-request leaves the message to be delivered again. Duplicates are
    /// suppressed by `_unique_id` over a bounded window.
    AfterHandling,
}

/// A running server. [`Server::shutdown`] stops it gracefully; dropping it stops
/// consuming at once and lets in-flight handlers finish in the background.
#[derive(Debug)]
pub struct Server {
    target: Target,
    token: CancellationToken,
    task: Option<JoinHandle<()>>,
    health: HealthProbe,
}

impl Server {
    /// Starts configuring a server of `target` (which needs topic and server) over
    /// `transport`.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> mqrpc::Result<()> {
    /// use std::time::Duration;
    /// use mqrpc::{AckMode, Context, Endpoint, RemoteError, Server, Target};
    ///
    /// let transport = mqrpc::connect("memory://").await?;
    /// let ping = Endpoint::new().method("ping", |_ctx: Context, _: mqrpc::NoArgs| async {
    ///     Ok::<_, RemoteError>("pong")
    /// });
    /// let server = Server::builder(transport, Target::new("compute").server("host-1"))
    ///     .endpoint(ping)
    ///     .concurrency(16)
    ///     .ack_mode(AckMode::AfterHandling)
    ///     .grace_period(Duration::from_secs(5))
    ///     .start()
    ///     .await?;
    /// server.shutdown().await
    /// # }
    /// ```
    pub fn builder(transport: Arc<dyn Transport>, target: Target) -> ServerBuilder {
        ServerBuilder::new(transport, target)
    }

    /// The target this server listens on.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Whether the server is consuming, reconnecting (its consumer lost a connection
    /// to the broker and is getting it back) or stopped, and how long since it last
    /// took a delivery. See [`Health`]; for a handle that outlives the server, or
    /// to wait for a state, [`Server::health_probe`].
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> mqrpc::Result<()> {
    /// use mqrpc::{HealthState, Server, Target};
    ///
    /// let transport = mqrpc::connect("memory://").await?;
    /// let server = Server::builder(transport, Target::new("compute").server("host-1"))
    ///     .start()
    ///     .await?;
    /// let health = server.health();
    /// assert_eq!(health.state, HealthState::Consuming);
    /// assert_eq!(health.since_last_delivery, None);
    /// let probe = server.health_probe();
    /// server.shutdown().await?;
    /// assert_eq!(probe.health().state, HealthState::Stopped);
    /// # Ok(())
    /// # }
    /// ```
    pub fn health(&self) -> Health {
        self.health.health()
    }

    /// A handle on this server's health that can be cloned, moved to another task
    /// (a health endpoint) and kept after the server is shut down or dropped, when
    /// it reports [`crate::HealthState::Stopped`].
    pub fn health_probe(&self) -> HealthProbe {
        self.health.clone()
    }

    /// Stops consuming, lets in-flight handlers finish (within the grace period; the
    /// rest are aborted), then closes the consumer.
    pub async fn shutdown(mut self) -> Result<()> {
        self.token.cancel();
        if let Some(task) = self.task.take() {
            task.await.map_err(|e| {
                Error::transport(TransportErrorKind::Other, "server task failed", e)
            })?;
        }
        tracing::debug!(target = %self.target, "server stopped");
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// What every request task needs.
#[derive(Clone)]
struct Serving {
    dispatcher: Arc<Dispatcher>,
    replier: Replier,
    ack_mode: AckMode,
    topic: Arc<str>,
    /// Larger requests are rejected unread.
    max_request: Option<usize>,
    auth: Option<MessageAuth>,
    /// Bounds the refusals of unauthenticated requests being answered at once.
    refusals: Arc<Semaphore>,
    /// Bytes of requests held, from their receipt to the end of their work.
    budget: ByteBudget,
    /// Limits the warnings about refused messages to one line per interval.
    rejections: Arc<Throttle>,
    /// Calls whose handlers were dropped unfinished; their callers are told.
    abandoned: Arc<Mutex<Vec<(String, Address)>>>,
    /// Requests handled and in flight, for the control request `status`.
    stats: Arc<ServingStats>,
    /// Whether control requests are answered; when not, they are dropped unanswered.
    discoverable: bool,
    /// The server's metric handles (nothing without the `metrics` feature).
    metrics: ServerMetrics,
    /// The transport's name, for the spans.
    backend: &'static str,
}
