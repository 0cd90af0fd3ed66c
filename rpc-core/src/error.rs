//! The one error type of mqrpc, and `RemoteError`, the failure a server sends back.
//!
//! Errors are data: every variant is something a caller can act on, and backend errors
//! keep their source.

use std::fmt;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A boxed error from a broker client or another library, kept as the source.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The result type of mqrpc.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in mqrpc.
///
/// Each variant says where a request failed; [`Error::kind`] groups them for a
/// `match`, [`Error::is_retryable`] says whether sending again may help.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use std::time::Duration;
/// use mqrpc::{Client, Context, Error, ErrorKind, Target, TimeoutKind};
///
/// let transport = mqrpc::connect("memory://").await.expect("memory bus");
/// // Nobody serves "nobody" on this bus: the call waits out its timeout.
/// let client = Client::new(transport, Target::new("nobody")).timeout(Duration::from_millis(50));
/// let err = client.call::<_, u32>(&Context::new(), "size", ()).await.unwrap_err();
/// assert!(matches!(err, Error::Timeout { kind: TimeoutKind::Reply, .. }));
/// assert_eq!(err.kind(), ErrorKind::Timeout);
/// assert!(err.is_retryable());
/// # }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No reply arrived in time. `kind` tells which clock ran out.
    #[error(
        "timed out after {waited:?} waiting for {kind} of message {msg_id} on topic {topic:?} via {broker}"
    )]
    Timeout {
        /// The `_msg_id` of the request (empty for a cast).
        msg_id: String,
        /// The topic (and server, when directed) the request went to.
        topic: String,
        /// The broker the request went through, without credentials
        /// ([`crate::Transport::describe`]).
        broker: String,
        /// How long the caller waited.
        waited: Duration,
        /// Which deadline expired.
        kind: TimeoutKind,
    },
    /// The server ran the method and it failed; the failure travelled back.
    #[error("{0}")]
    Remote(Box<RemoteError>),
    /// A server speaking the requested version exists but has no such method (or the
    /// method is private).
    #[error("endpoint does not support RPC method {method}")]
    NoSuchMethod {
        /// The method asked for.
        method: String,
    },
    /// No endpoint of the server is compatible with the requested namespace and version.
    #[error("endpoint does not support RPC version {version}; attempted method: {method}")]
    UnsupportedVersion {
        /// The version asked for.
        version: String,
        /// The method asked for.
        method: String,
    },
    /// The request asks for a version above the client's version cap
    /// ([`crate::Client::version_cap`]); it was not sent.
    #[error("method {method} needs version {version}, above this client's version cap {cap}")]
    VersionCap {
        /// The version the request would have asked for.
        version: String,
        /// The client's cap.
        cap: String,
        /// The method asked for.
        method: String,
    },
    /// The target cannot be used for this operation (no topic, `call` on a fanout, ...).
    #[error("invalid target: {0}")]
    InvalidTarget(String),
    /// Message authentication refused the request (the server said so) or its reply
    /// (this client did): a wrong or unknown key, a stale or replayed message.
    #[error("message authentication failed: {0}")]
    Authentication(String),
    /// A setting is invalid (a message authentication key, ...).
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// The arguments do not encode to a JSON object of keyword arguments.
    #[error("invalid arguments: {0}")]
    InvalidArguments(String),
    /// A broker or connection error.
    #[error("transport error: {message}")]
    Transport {
        /// What kind of failure it was (see [`Error::is_retryable`]).
        kind: TransportErrorKind,
        /// What failed.
        message: String,
        /// The broker client's own error, when there is one.
        #[source]
        source: Option<BoxError>,
    },
    /// A message could not be encoded or decoded.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The encoded message exceeds what the transport accepts.
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    MessageTooLarge {
        /// Encoded size in bytes.
        size: usize,
        /// The transport's limit in bytes.
        limit: usize,
    },
    /// The broker could not route the message to any queue (for example a reply queue
    /// that no longer exists).
    #[error("message to {address} could not be delivered: no queue is bound to it")]
    Undeliverable {
        /// The address that had no queue.
        address: String,
    },
    /// Nothing listens on the address, and the transport reports it at once.
    #[error("no server listens on {address}")]
    NoResponders {
        /// The address that had no listener.
        address: String,
    },
    /// The transport cannot do this.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The client, server or transport was closed.
    #[error("closed")]
    Closed,
    /// A URL could not be parsed or names options that do not exist.
    #[error("invalid URL: {0}")]
    InvalidUrl(String),
    /// The URL names a backend that this build does not contain.
    #[error(
        "the {scheme}:// backend is not compiled in: enable the Cargo feature `{feature}` of mqrpc"
    )]
    BackendNotEnabled {
        /// The URL scheme.
        scheme: String,
        /// The Cargo feature that provides it.
        feature: &'static str,
    },
    /// The URL scheme is not one mqrpc knows.
    #[error("unknown URL scheme {scheme:?}; known schemes: {known}")]
    UnknownScheme {
        /// The URL scheme.
        scheme: String,
        /// The schemes mqrpc knows, with the feature of each.
        known: &'static str,
    },
}

impl Error {
    /// A transport error of `kind` with a message and the broker client's error.
    pub fn transport(
        kind: TransportErrorKind,
        message: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Self {
        Error::Transport {
            kind,
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// A transport error of `kind` with a message only.
    pub fn transport_msg(kind: TransportErrorKind, message: impl Into<String>) -> Self {
        Error::Transport {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// What kind of error this is, for callers that branch on it.
    ///
    /// ```
    /// use mqrpc::{Error, ErrorKind};
    ///
    /// fn advice(err: &Error) -> &'static str {
    ///     match err.kind() {
    ///         ErrorKind::Timeout | ErrorKind::NoResponders => "try again later",
    ///         ErrorKind::Remote => "the server's method failed",
    ///         ErrorKind::Config => "fix the configuration",
    ///         _ => "see the error's message",
    ///     }
    /// }
    /// let err = Error::InvalidUrl("no host".into());
    /// assert_eq!(advice(&err), "fix the configuration");
    /// ```
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Timeout { .. } => ErrorKind::Timeout,
            Error::Remote(_) => ErrorKind::Remote,
            Error::NoSuchMethod { .. }
            | Error::UnsupportedVersion { .. }
            | Error::VersionCap { .. } => ErrorKind::NotServed,
            Error::NoResponders { .. } | Error::Undeliverable { .. } => ErrorKind::NoResponders,
            Error::Authentication(_) => ErrorKind::Authentication,
            Error::Transport { kind, .. } => ErrorKind::Transport(*kind),
            Error::Codec(_) => ErrorKind::Codec,
            Error::InvalidTarget(_)
            | Error::InvalidArguments(_)
            | Error::MessageTooLarge { .. }
            | Error::Unsupported(_) => ErrorKind::InvalidInput,
            Error::InvalidConfig(_)
            | Error::InvalidUrl(_)
            | Error::BackendNotEnabled { .. }
            | Error::UnknownScheme { .. } => ErrorKind::Config,
            Error::Closed => ErrorKind::Closed,
        }
    }

    /// Whether sending the same request again may succeed: a timeout, no server
    /// listening yet ([`Error::NoResponders`]), or a broker or connection failure other than a refusal. Only
    /// idempotent calls should be retried ([`crate::RetryPolicy`] does so).
    pub fn is_retryable(&self) -> bool {
        if let Error::Undeliverable { .. } = self {
            // The broker dropped the message for want of a queue: the address is
            // wrong, not busy.
            return false;
        }
        match self.kind() {
            ErrorKind::Timeout | ErrorKind::NoResponders => true,
            ErrorKind::Transport(kind) => kind != TransportErrorKind::Refused,
            _ => false,
        }
    }

    /// [`Error::MessageTooLarge`] when `size` bytes exceed `limit`: the check a client
    /// and every publisher make before sending.
    pub fn check_size(size: usize, limit: usize) -> Result<()> {
        if size > limit {
            return Err(Error::MessageTooLarge { size, limit });
        }
        Ok(())
    }

    /// The remote failure, when this error is one.
    pub fn as_remote(&self) -> Option<&RemoteError> {
        match self {
            Error::Remote(remote) => Some(remote),
            _ => None,
        }
    }

    /// The typed error a Rust handler returned, decoded back into its type `E`
    /// ([`RemoteError::decode`]); `None` when this is not a remote failure or it
    /// carries no `E`. A typed service's client returns its methods' errors this way:
    /// `err.decode_remote::<CalcError>()`.
    pub fn decode_remote<E: DeserializeOwned>(&self) -> Option<E> {
        self.as_remote()?.decode()
    }
}

/// The kinds of [`Error`], small enough to match on ([`Error::kind`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// No reply (or no heartbeat, or no broker confirmation) in time.
    Timeout,
    /// The server ran the method and it failed ([`Error::Remote`]).
    Remote,
    /// The server does not serve the method or version asked for.
    NotServed,
    /// Nothing listens on the address, or the broker could not route the message.
    NoResponders,
    /// Message authentication refused a request or a reply.
    Authentication,
    /// The broker or the connection failed; the inner kind tells how.
    Transport(TransportErrorKind),
    /// A message did not follow the wire format.
    Codec,
    /// The caller's input cannot be sent: a bad target, arguments that are not keyword
    /// arguments, an oversized message, an operation the backend cannot do.
    InvalidInput,
    /// A URL or setting is invalid, or names a backend this build lacks.
    Config,
    /// The client, server or transport was closed.
    Closed,
}

/// How a broker or connection failed ([`Error::Transport`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TransportErrorKind {
    /// Connecting (TCP, TLS or the broker's handshake) failed or took too long.
    Connect,
    /// An established connection or channel went away.
    Disconnected,
    /// The broker refused the operation: credentials, permissions, a resource that
    /// exists with other settings. Sending again will not help.
    Refused,
    /// The broker did not answer an operation in time.
    Timeout,
    /// Anything else the broker client reported.
    Other,
}

impl fmt::Display for TransportErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TransportErrorKind::Connect => "connect",
            TransportErrorKind::Disconnected => "disconnected",
            TransportErrorKind::Refused => "refused",
            TransportErrorKind::Timeout => "timeout",
            TransportErrorKind::Other => "other",
        })
    }
}

/// Which clock ended a wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TimeoutKind {
    /// The overall call timeout passed before a final reply.
    Reply,
    /// The server stayed silent (no reply, no heartbeat) for the call-monitor interval.
    CallMonitor,
    /// The broker did not accept the request before the deadline.
    Publish,
}

impl fmt::Display for TimeoutKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TimeoutKind::Reply => "a reply",
            TimeoutKind::CallMonitor => "a heartbeat (call monitor)",
            TimeoutKind::Publish => "the broker to accept the request",
        })
    }
}

/// A message that does not follow the wire format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed message: {reason}")]
pub struct CodecError {
    reason: String,
}

impl CodecError {
    /// A codec error with the given reason.
    pub fn new(reason: impl Into<String>) -> Self {
        CodecError {
            reason: reason.into(),
        }
    }

    /// Why the message was refused.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl From<serde_json::Error> for CodecError {
    fn from(err: serde_json::Error) -> Self {
        CodecError::new(err.to_string())
    }
}

/// Key of `kwargs` under which a typed Rust error travels (see [`RemoteError::decode`]).
pub const ERROR_KWARG: &str = "error";

/// A failure raised by a remote method, as oslo.messaging describes it on the wire:
/// the exception's class and module, its message, traceback lines, and its positional
/// and keyword arguments.
///
/// A handler's own serde error type travels in `kwargs["error"]`, so the caller can
/// get the same type back with [`RemoteError::decode`].
///
/// `RemoteError` deliberately does not implement `Serialize`: every `Serialize +
/// Display` type converts into a `RemoteError` through [`IntoRemoteError`], and a
/// `RemoteError` returned by a handler is sent as it is.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RemoteError {
    /// Exception class name (`ValueError`, or the Rust type name of a handler error).
    pub class: String,
    /// Module of the class (`builtins`, or the Rust module path of a handler error).
    pub module: String,
    /// Human-readable message.
    pub message: String,
    /// Traceback lines, as Python formats them (empty from Rust servers).
    pub traceback: Vec<String>,
    /// Positional arguments of the exception.
    pub args: Vec<Value>,
    /// Keyword arguments of the exception.
    pub kwargs: Map<String, Value>,
}

/// The failure document of the wire format (`failure` of a reply, itself JSON).
#[derive(Serialize, Deserialize)]
struct FailureDoc {
    class: String,
    #[serde(default)]
    module: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    tb: Vec<String>,
    #[serde(default)]
    args: Vec<Value>,
    #[serde(default)]
    kwargs: Map<String, Value>,
}

impl RemoteError {
    /// The failure document as the JSON text a reply's `failure` carries.
    pub fn to_failure_json(&self) -> std::result::Result<String, serde_json::Error> {
        serde_json::to_string(&FailureDoc {
            class: self.class.clone(),
            module: self.module.clone(),
            message: self.message.clone(),
            tb: self.traceback.clone(),
            args: self.args.clone(),
            kwargs: self.kwargs.clone(),
        })
    }

    /// Reads a failure document (a JSON object with at least `class`).
    pub fn from_failure_value(value: Value) -> std::result::Result<Self, serde_json::Error> {
        let doc = FailureDoc::deserialize(value)?;
        Ok(RemoteError {
            class: doc.class,
            module: doc.module,
            message: doc.message,
            traceback: doc.tb,
            args: doc.args,
            kwargs: doc.kwargs,
        })
    }

    /// A failure of the given class with a message; module `builtins`, so a Python
    /// caller sees its own built-in exception (for example `ValueError`).
    pub fn new(class: impl Into<String>, message: impl Into<String>) -> Self {
        let message = message.into();
        RemoteError {
            class: class.into(),
            module: "builtins".to_owned(),
            args: vec![Value::String(message.clone())],
            message,
            traceback: Vec::new(),
            kwargs: Map::new(),
        }
    }

    /// Sets the module of the class.
    pub fn with_module(mut self, module: impl Into<String>) -> Self {
        self.module = module.into();
        self
    }

    /// Adds one keyword argument.
    pub fn with_kwarg(mut self, key: impl Into<String>, value: Value) -> Self {
        self.kwargs.insert(key.into(), value);
        self
    }

    /// Builds the failure for a typed handler error: class and module from the Rust
    /// type name, message from `Display`, the value itself in `kwargs["error"]`.
    pub fn from_typed<E: Serialize + fmt::Display>(error: &E) -> Self {
        let full = std::any::type_name::<E>();
        // Generic parameters would confuse the split on `::`; drop them.
        let path = full.split('<').next().unwrap_or(full);
        let (module, class) = match path.rsplit_once("::") {
            Some((module, class)) => (module.to_owned(), class.to_owned()),
            None => (String::new(), path.to_owned()),
        };
        let message = error.to_string();
        let mut kwargs = Map::new();
        match serde_json::to_value(error) {
            Ok(value) => {
                kwargs.insert(ERROR_KWARG.to_owned(), value);
            }
            Err(err) => {
                tracing::warn!(error = %err, class, "handler error does not serialize; sent as text only");
            }
        }
        RemoteError {
            class,
            module,
            args: vec![Value::String(message.clone())],
            message,
            traceback: Vec::new(),
            kwargs,
        }
    }

    /// Decodes the typed error a Rust handler returned (it travels in
    /// `kwargs["error"]`). `None` when the failure carries no such value or it is
    /// not an `E`.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> mqrpc::Result<()> {
    /// use mqrpc::{Client, Context, Endpoint, Server, Target};
    ///
    /// #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize, thiserror::Error)]
    /// enum QuotaError {
    ///     #[error("over quota by {0}")]
    ///     Over(u32),
    /// }
    ///
    /// let transport = mqrpc::connect("memory://").await?;
    /// let endpoint = Endpoint::new().method("reserve", |_ctx, _: mqrpc::NoArgs| async {
    ///     Err::<(), _>(QuotaError::Over(3))
    /// });
    /// let server = Server::builder(transport.clone(), Target::new("quota").server("q1"))
    ///     .endpoint(endpoint)
    ///     .start()
    ///     .await?;
    /// let client = Client::new(transport, Target::new("quota"));
    /// let err = client.call::<_, ()>(&Context::new(), "reserve", ()).await.unwrap_err();
    /// let remote = err.as_remote().expect("the handler failed");
    /// assert_eq!(remote.decode::<QuotaError>(), Some(QuotaError::Over(3)));
    /// server.shutdown().await
    /// # }
    /// ```
    pub fn decode<E: DeserializeOwned>(&self) -> Option<E> {
        let value = self.kwargs.get(ERROR_KWARG)?;
        E::deserialize(value).ok()
    }

    /// The class without oslo.messaging's `_Remote` suffix.
    pub fn base_class(&self) -> &str {
        self.class.strip_suffix("_Remote").unwrap_or(&self.class)
    }

    /// The module without oslo.messaging's `_Remote` suffix.
    pub fn base_module(&self) -> &str {
        self.module.strip_suffix("_Remote").unwrap_or(&self.module)
    }
}

impl fmt::Display for RemoteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.module.is_empty() {
            write!(f, "remote error {}: {}", self.class, self.message)
        } else {
            write!(
                f,
                "remote error {}.{}: {}",
                self.module, self.class, self.message
            )
        }
    }
}

impl std::error::Error for RemoteError {}

/// Conversion of a handler's error into the failure sent to the caller.
///
/// Implemented for [`RemoteError`] itself (sent as it is) and for every type that is
/// `Serialize + Display` (sent with [`RemoteError::from_typed`]).
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be sent back as a remote failure",
    label = "a handler's error must implement serde's `Serialize` and `Display`, or be a `RemoteError`"
)]
pub trait IntoRemoteError {
    /// The failure to send.
    fn into_remote_error(self) -> RemoteError;
}

impl IntoRemoteError for RemoteError {
    fn into_remote_error(self) -> RemoteError {
        self
    }
}

impl<E: Serialize + fmt::Display> IntoRemoteError for E {
    fn into_remote_error(self) -> RemoteError {
        RemoteError::from_typed(&self)
    }
}
