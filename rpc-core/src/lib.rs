//! The core of mqrpc: OpenStack-style RPC written once for every broker.
//!
//! - [`Client`]: `call` (request/reply), `multicall` (streamed replies) and `cast`
//!   (fire and forget), to a topic, one named server, or every server (fanout).
//! - [`Server`]: listens on a [`Target`], dispatches to [`Endpoint`]s by namespace and
//!   [`Version`] with oslo.messaging's rules, replies, heartbeats, shuts down gracefully.
//! - [`wire`]: oslo.messaging's message format 2.0, so Rust and Python peers interoperate.
//! - [`transport`]: the small object-safe traits a backend implements to route bytes.
//!
//! Backends live in their own crates (`transport-memory`, ...); the `mqrpc` facade
//! picks one by URL. See the `mqrpc` crate for a runnable example.

#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod auth;
pub mod backoff;
mod budget;
mod client;
mod context;
mod control;
mod dispatch_failure;
mod dispatcher;
mod endpoint;
mod error;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
mod health;
pub mod logs;
pub mod metrics;
#[cfg(test)]
mod module_graph;
pub mod notify;
pub mod options;
mod reply;
mod server;
mod target;
mod timing;
mod tls;
pub mod trace;
pub mod transport;
pub mod wire;

pub use auth::{
    AUTH_FAILURE_CLASS, AUTH_FAILURE_MODULE, AuthFailure, DEFAULT_FRESHNESS, MIN_KEY_LEN,
    MessageAuth, Rejections,
};
pub use backoff::{Backoff, Jitter, Retry};
pub use budget::{ByteBudget, Charge, DEFAULT_MAX_PENDING_BYTES};
pub use client::{Client, Discovered, DiscoveryStream, DiscoveryWait, ReplyStream, RetryPolicy};
pub use context::Context;
pub use control::{
    CONTROL_NAMESPACE, CONTROL_VERSION, EndpointStatus, OSLO_PING_ANSWER, OSLO_PING_METHOD,
    STATUS_METHOD, ServerStatus,
};
pub use endpoint::{Endpoint, NoArgs};
pub use error::{
    BoxError, CodecError, ERROR_KWARG, Error, ErrorKind, IntoRemoteError, RemoteError, Result,
    TimeoutKind, TransportErrorKind,
};
pub use health::{Health, HealthProbe, HealthState};
pub use server::{
    AckMode, DEFAULT_CONCURRENCY, DEFAULT_DUPLICATE_WINDOW, DEFAULT_GRACE_PERIOD,
    DEFAULT_MAX_DUPLICATE_IDS, SERVER_SHUTDOWN_CLASS, SERVER_SHUTDOWN_MODULE, Server,
    ServerBuilder,
};
pub use target::{DEFAULT_EXCHANGE, ParseVersionError, Target, Version};
pub use timing::{DEFAULT_TIMEOUT, MAX_TIMEOUT, MIN_CALL_MONITOR};
pub use tls::{TlsFiles, TlsPem};
pub use transport::{
    Acker, Address, CallHint, Capabilities, Consumer, Delivery, ListenOptions, NoAck,
    NotificationSource, Outgoing, Publisher, ReplyConsumer, ReplyEvent, ReplyQueue, Transport,
};
