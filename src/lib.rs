//! mqrpc: OpenStack-style RPC for Rust over pluggable message brokers.
//!
//! A service calls a method on a *topic* and a server listening on it answers:
//! [`Client::call`] waits for the reply, [`Client::multicall`] streams several,
//! [`Client::cast`] fires and forgets, a fanout cast reaches every server of the topic,
//! and a call can be directed at one named server. The backend is chosen by URL with
//! [`connect`]; on RabbitMQ the messages are oslo.messaging's, so Rust and Python
//! services share a deployment.
//!
//! ```
//! use mqrpc::{Client, Context, Endpoint, RemoteError, Server, Target};
//!
//! #[derive(serde::Deserialize)]
//! struct Add { a: i64, b: i64 }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> mqrpc::Result<()> {
//! let transport = mqrpc::connect("memory://").await?;
//! let server = Server::builder(transport.clone(), Target::new("calc").server("s1"))
//!     .endpoint(Endpoint::new().method("add", |_ctx: Context, args: Add| async move {
//!         Ok::<_, RemoteError>(args.a + args.b)
//!     }))
//!     .start()
//!     .await?;
//!
//! let client = Client::new(transport, Target::new("calc"));
//! let sum: i64 = client.call(&Context::new(), "add", serde_json::json!({"a": 2, "b": 3})).await?;
//! assert_eq!(sum, 5);
//! server.shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! # Typed services
//! [`service`] (feature `macros`, on by default) declares an interface once as a
//! trait and generates a typed client and the server's [`Endpoint`]; the hand-written
//! `Endpoint` and [`Client`] above are the layer it builds on.
//!
//! `examples/calculator.rs` in the repository shows the rest with a typed service
//! (`cargo run --example calculator`): multicall, casts, a fanout, a directed call, a
//! typed error decoded on the caller's side, versions.
//!
//! # Features
//! One Cargo feature per backend: `memory` (default), `amqp`, `redis`, `nats`, and
//! `full` for all of them; `macros` (default) for [`service`]; `metrics` (off by
//! default) records [`metrics`] through the `metrics` facade crate; `otel` (off by
//! default) makes the request spans OpenTelemetry spans linked across the broker
//! ([`trace`]).

#![deny(missing_docs)]
#![forbid(unsafe_code)]

use std::sync::Arc;

// The application API, by name. What only a backend author needs lives in
// `mqrpc::transport`, the protocol's names and constants in `mqrpc::wire`.
pub use rpc_core::{
    AckMode, AuthFailure, Backoff, BoxError, Client, CodecError, Context, DEFAULT_CONCURRENCY,
    DEFAULT_DUPLICATE_WINDOW, DEFAULT_EXCHANGE, DEFAULT_FRESHNESS, DEFAULT_GRACE_PERIOD,
    DEFAULT_MAX_DUPLICATE_IDS, DEFAULT_MAX_PENDING_BYTES, DEFAULT_TIMEOUT, Discovered,
    DiscoveryStream, DiscoveryWait, Endpoint, EndpointStatus, Error, ErrorKind, Health,
    HealthProbe, HealthState, IntoRemoteError, Jitter, MAX_TIMEOUT, MIN_CALL_MONITOR, MIN_KEY_LEN,
    MessageAuth, NoArgs, ParseVersionError, Rejections, RemoteError, ReplyStream, Result, Retry,
    RetryPolicy, Server, ServerBuilder, ServerStatus, Target, TimeoutKind, TlsFiles, TlsPem,
    Transport, TransportErrorKind, Version,
};

#[cfg(feature = "macros")]
pub use mqrpc_macros::service;

/// What `#[mqrpc::service]` expands to uses these; not an API of its own.
#[cfg(feature = "macros")]
#[doc(hidden)]
pub mod __private {
    pub use async_stream;
    pub use futures::StreamExt;
    pub use serde;

    /// A type a service method takes as an argument.
    #[diagnostic::on_unimplemented(
        message = "`{Self}` cannot be an argument of a service method",
        label = "arguments travel as JSON: this type must implement serde's `Serialize` and `Deserialize`",
        note = "an argument is an owned value, `Send` and `'static`"
    )]
    pub trait Argument: serde::Serialize + serde::de::DeserializeOwned + Send + 'static {}
    impl<T: serde::Serialize + serde::de::DeserializeOwned + Send + 'static> Argument for T {}

    /// A type a service method returns (or streams).
    #[diagnostic::on_unimplemented(
        message = "`{Self}` cannot be the result of a service method",
        label = "results travel as JSON: this type must implement serde's `Serialize` and `Deserialize`",
        note = "a result is an owned value, `Send` and `'static`"
    )]
    pub trait Reply: serde::Serialize + serde::de::DeserializeOwned + Send + 'static {}
    impl<T: serde::Serialize + serde::de::DeserializeOwned + Send + 'static> Reply for T {}

    /// A service method's error type.
    #[diagnostic::on_unimplemented(
        message = "`{Self}` cannot be the error of a service method",
        label = "errors travel as remote failures: implement `Serialize` and `Display` (or use `mqrpc::RemoteError`)"
    )]
    pub trait Failure: rpc_core::IntoRemoteError + Send + 'static {}
    impl<T: rpc_core::IntoRemoteError + Send + 'static> Failure for T {}

    /// Checks an argument type where the trait names it.
    pub fn argument<T: Argument>() {}
    /// Checks a result type where the trait names it.
    pub fn result<T: Reply>() {}
    /// Checks an error type where the trait names it.
    pub fn error<T: Failure>() {}
}

// README.md's Rust code blocks run as doc tests, so its Quick start cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

/// For backend authors: the traits a transport implements to move bytes and acks
/// (`rpc_core::transport`), the byte budget consumers honour, the URL option reader and
/// the log helpers shared by the backends.
pub mod transport {
    pub use rpc_core::logs;
    pub use rpc_core::options;
    pub use rpc_core::transport::*;
    pub use rpc_core::{ByteBudget, Charge};
}

/// oslo.messaging's message format 2.0 (`rpc_core::wire`), the class and module
/// names of the failures mqrpc itself sends, and the names of the control requests
/// every server answers.
pub mod wire {
    pub use rpc_core::wire::*;
    pub use rpc_core::{
        AUTH_FAILURE_CLASS, AUTH_FAILURE_MODULE, CONTROL_NAMESPACE, CONTROL_VERSION, ERROR_KWARG,
        OSLO_PING_ANSWER, OSLO_PING_METHOD, SERVER_SHUTDOWN_CLASS, SERVER_SHUTDOWN_MODULE,
        STATUS_METHOD,
    };
}

/// Metrics of clients, servers and transports (`rpc_core::metrics`): their names,
/// labels and label values, and [`metrics::describe`]. They are recorded only with
/// the Cargo feature `metrics`, through the `metrics` facade crate, into whatever
/// recorder the application installs (before it creates clients and servers).
pub mod metrics {
    pub use rpc_core::metrics::*;
}

/// Notifications, as oslo.messaging's: a [`notify::Notifier`] sends events to
/// `<topic>.<priority>`, a [`notify::NotificationListener`] hands them to the
/// endpoints that handle their priority and pass their filter, alone or as a member
/// of a pool.
pub mod notify {
    pub use rpc_core::notify::*;
}

/// Tracing of requests (`rpc_core::trace`). Every call, multicall and cast has a
/// client span, and every request handled a server span, on every backend. With the
/// Cargo feature `otel` they are OpenTelemetry spans (semantic conventions for
/// messaging and RPC, at level INFO): the client writes the W3C trace context of its
/// span into the request's context under [`trace::TRACEPARENT`] and
/// [`trace::TRACESTATE`], where the oslo.messaging instrumentation for Python writes
/// it, and the server's span becomes the child of the caller's. Spans are exported
/// only through a `tracing-opentelemetry` layer the application installs.
pub mod trace {
    pub use rpc_core::trace::{TRACEPARENT, TRACESTATE};
}

#[cfg(feature = "memory")]
pub use transport_memory::{MemoryConfig, MemoryTransport};

#[cfg(feature = "amqp")]
pub use transport_amqp::{AmqpConfig, AmqpTransport, Compression, Host as AmqpHost, ReplyQueues};

#[cfg(feature = "redis")]
pub use transport_redis::{RedisConfig, RedisTransport};

#[cfg(feature = "nats")]
pub use transport_nats::{Auth as NatsAuth, NatsConfig, NatsTransport};

/// The URL schemes mqrpc knows and the Cargo feature that provides each.
const SCHEMES: &[(&str, &str)] = &[
    ("memory", "memory"),
    ("amqp", "amqp"),
    ("amqps", "amqp"),
    ("rabbit", "amqp"),
    ("kombu", "amqp"),
    ("redis", "redis"),
    ("rediss", "redis"),
    ("nats", "nats"),
    ("tls", "nats"),
];

const KNOWN_SCHEMES: &str = "memory:// (feature memory), amqp://, amqps://, rabbit://, kombu:// (feature amqp), \
redis://, rediss:// (feature redis), nats://, tls:// (feature nats)";

/// Opens a transport for `url`; the scheme picks the backend.
///
/// - `memory://` is a new private in-process bus; `memory://NAME` is the bus of that
///   name, shared by every `connect` in this process (and by nothing outside it).
/// - `amqp://`, `amqps://` and oslo's `rabbit://` connect to RabbitMQ (feature
///   `amqp`); see [`AmqpTransport`] for hosts, virtual host and options.
/// - `redis://` and `rediss://` use Redis streams (feature `redis`); see
///   [`RedisTransport`].
/// - `nats://` and `tls://` use NATS (feature `nats`); see [`NatsTransport`].
///
/// A scheme whose backend is not compiled in fails with
/// [`Error::BackendNotEnabled`] naming the Cargo feature to enable; an unknown
/// scheme fails with [`Error::UnknownScheme`]. Credentials in the URL never appear
/// in errors.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> mqrpc::Result<()> {
/// use mqrpc::ErrorKind;
///
/// let transport = mqrpc::connect("memory://orders?capacity=1000").await?;
/// assert_eq!(transport.name(), "memory");
/// // The same code takes a broker's URL, e.g. from configuration:
/// // mqrpc::connect("rabbit://nova:secret@rabbit-1:5672/nova?prefetch=64").await?;
/// let err = mqrpc::connect("kafka://127.0.0.1:9092").await.err().expect("unknown");
/// assert_eq!(err.kind(), ErrorKind::Config);
/// # Ok(()) }
/// ```
pub async fn connect(url: &str) -> Result<Arc<dyn Transport>> {
    let scheme = url
        .split_once("://")
        .map(|(scheme, _)| scheme.to_ascii_lowercase())
        .ok_or_else(|| Error::InvalidUrl("expected SCHEME://...".to_owned()))?;
    let Some(&(_, feature)) = SCHEMES.iter().find(|(known, _)| *known == scheme) else {
        return Err(Error::UnknownScheme {
            scheme,
            known: KNOWN_SCHEMES,
        });
    };
    match feature {
        #[cfg(feature = "memory")]
        "memory" => Ok(Arc::new(MemoryTransport::connect(url)?)),
        #[cfg(feature = "amqp")]
        "amqp" => Ok(Arc::new(AmqpTransport::connect(url).await?)),
        #[cfg(feature = "redis")]
        "redis" => Ok(Arc::new(RedisTransport::connect(url).await?)),
        #[cfg(feature = "nats")]
        "nats" => Ok(Arc::new(NatsTransport::connect(url).await?)),
        _ => Err(Error::BackendNotEnabled { scheme, feature }),
    }
}

/// Whether the backend behind a Cargo feature is compiled in.
#[cfg(test)]
fn feature_enabled(feature: &str) -> bool {
    match feature {
        "memory" => cfg!(feature = "memory"),
        "amqp" => cfg!(feature = "amqp"),
        "redis" => cfg!(feature = "redis"),
        _ => cfg!(feature = "nats"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unknown_scheme_lists_the_known_ones() {
        let err = connect("kafka://localhost:9092")
            .await
            .expect_err("unknown");
        assert!(matches!(&err, Error::UnknownScheme { scheme, .. } if scheme == "kafka"));
        assert!(err.to_string().contains("amqp://"), "{err}");
        let err = connect("no scheme here").await.expect_err("no scheme");
        assert!(matches!(err, Error::InvalidUrl(_)));
    }

    #[tokio::test]
    async fn backend_errors_name_the_feature_and_hide_credentials() {
        // Port 1 on loopback: nothing answers, so a compiled-in backend fails too.
        for (url, feature) in [
            ("amqp://user:s3cret@127.0.0.1:1/", "amqp"),
            ("rabbit://user:s3cret@127.0.0.1:1/vhost", "amqp"),
            ("redis://:s3cret@127.0.0.1:1/0", "redis"),
            ("nats://user:s3cret@127.0.0.1:1", "nats"),
        ] {
            let err = connect(url).await.expect_err("nothing listens on port 1");
            let text = err.to_string();
            assert!(!text.contains("s3cret"), "credentials leaked: {text}");
            assert!(
                !format!("{err:?}").contains("s3cret"),
                "credentials leaked: {err:?}"
            );
            if feature_enabled(feature) {
                assert!(matches!(err, Error::Transport { .. }), "{url}: {err:?}");
            } else {
                assert!(matches!(err, Error::BackendNotEnabled { .. }), "{err:?}");
                assert!(text.contains(&format!("`{feature}`")), "{text}");
            }
        }
    }

    #[cfg(feature = "memory")]
    #[tokio::test]
    async fn memory_names_share_a_bus_and_bare_memory_is_private() {
        let a = MemoryTransport::connect("memory://shared-test").expect("a");
        let b = MemoryTransport::connect("memory://shared-test").expect("b");
        let c = MemoryTransport::connect("memory://").expect("c");
        let d = MemoryTransport::connect("memory://").expect("d");
        assert!(a.same_bus(&b));
        assert!(!c.same_bus(&d));
        assert!(!a.same_bus(&c));
        assert!(connect("memory://x?capacity=0").await.is_err());
        assert!(connect("memory://x?bogus=1").await.is_err());
        assert_eq!(connect("memory://y").await.expect("y").name(), "memory");
    }
}
