//! `Endpoint`: a namespace, a version and named methods. Methods are async closures
//! or fns with serde-typed arguments and results; streaming methods answer multicalls.

// A `RemoteError` here is the failure document itself, built once per failed
// request and sent as it is; boxing it would only add an allocation.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, Stream, StreamExt};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::context::Context;
use crate::dispatch_failure::DispatchFailure;
use crate::error::{IntoRemoteError, RemoteError};
use crate::target::Version;

/// Arguments of a method that takes none: serializes to `{}` and accepts any object.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoArgs {}

/// What running a method produces: one result, or a stream of them.
pub(crate) enum Invocation {
    Unary(BoxFuture<'static, Result<Value, RemoteError>>),
    Stream(BoxStream<'static, Result<Value, RemoteError>>),
    /// The method could not start (bad arguments, or it panicked while starting).
    Failed(RemoteError),
    /// No endpoint serves the method or version asked for.
    NotServed(DispatchFailure),
}

type Method = Arc<dyn Fn(Context, Map<String, Value>) -> Invocation + Send + Sync>;

/// A set of methods served under one namespace and version.
///
/// ```
/// use mqrpc::{Context, Endpoint, RemoteError, Version};
/// #[derive(serde::Deserialize)]
/// struct Add { a: i64, b: i64 }
///
/// let endpoint = Endpoint::new()
///     .version(Version::new(1, 3))
///     .method("add", |_ctx: Context, args: Add| async move {
///         Ok::<_, RemoteError>(args.a + args.b)
///     });
/// assert!(endpoint.has_method("add"));
/// ```
#[derive(Clone, Default)]
pub struct Endpoint {
    pub(crate) namespace: Option<String>,
    pub(crate) version: Version,
    pub(crate) methods: HashMap<String, Method>,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<_> = self.methods.keys().collect();
        names.sort();
        f.debug_struct("Endpoint")
            .field("namespace", &self.namespace)
            .field("version", &self.version)
            .field("methods", &names)
            .finish()
    }
}

impl Endpoint {
    /// An endpoint in the null namespace at version 1.0, with no methods.
    pub fn new() -> Self {
        Endpoint::default()
    }

    /// Sets the namespace requests must name to reach this endpoint.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// Sets the version this endpoint implements.
    pub fn version(mut self, version: Version) -> Self {
        self.version = version;
        self
    }

    /// Whether a method of that name is registered.
    pub fn has_method(&self, name: &str) -> bool {
        self.methods.contains_key(name)
    }

    /// Registers a method: an async fn of the context and the keyword arguments
    /// (decoded into `A`) returning `Result<T, E>`. `E` is sent back as a
    /// [`RemoteError`]: either a `RemoteError` itself or any `Serialize + Display`
    /// type, which the caller can decode again with [`RemoteError::decode`].
    ///
    /// Arguments that do not decode into `A` fail the call with a `TypeError`, as a
    /// Python server does. Names starting with `_` are never dispatched.
    ///
    /// ```
    /// use mqrpc::{Context, Endpoint, RemoteError};
    ///
    /// #[derive(serde::Deserialize)]
    /// struct Resize {
    ///     instance: String,
    ///     flavor: u32,
    /// }
    ///
    /// let endpoint = Endpoint::new().method("resize", |ctx: Context, args: Resize| async move {
    ///     if args.flavor == 0 {
    ///         return Err(RemoteError::new("ValueError", "flavor 0 does not exist"));
    ///     }
    ///     let user = ctx.get("user").cloned();
    ///     Ok(serde_json::json!({"instance": args.instance, "by": user}))
    /// });
    /// assert!(endpoint.has_method("resize"));
    /// ```
    pub fn method<A, T, E, F, Fut>(self, name: impl Into<String>, handler: F) -> Self
    where
        A: DeserializeOwned + Send + 'static,
        T: Serialize + Send + 'static,
        E: IntoRemoteError + Send + 'static,
        F: Fn(Context, A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        self.register(name, handler, |future: Fut| {
            Invocation::Unary(future.map(reply_value).boxed())
        })
    }

    /// Registers a streaming method: it returns a stream of results, each sent to the
    /// caller as one reply, then the end marker. A [`crate::Client::multicall`]
    /// receives every item; a `call` receives the last one. The stream ends at its
    /// first error, which the caller receives as a failure.
    ///
    /// An item must not serialize to JSON `null`: on the wire that is a heartbeat.
    /// Such items are skipped with a warning.
    pub fn stream_method<A, T, E, F, S>(self, name: impl Into<String>, handler: F) -> Self
    where
        A: DeserializeOwned + Send + 'static,
        T: Serialize + Send + 'static,
        E: IntoRemoteError + Send + 'static,
        F: Fn(Context, A) -> S + Send + Sync + 'static,
        S: Stream<Item = Result<T, E>> + Send + 'static,
    {
        self.register(name, handler, |stream: S| {
            Invocation::Stream(stream.map(reply_value).boxed())
        })
    }

    /// Erases a typed handler: decodes the arguments, catches a panic raised while
    /// they decode or while the handler builds its future or stream, and wraps what
    /// it built.
    fn register<A, F, R>(
        mut self,
        name: impl Into<String>,
        handler: F,
        wrap: fn(R) -> Invocation,
    ) -> Self
    where
        A: DeserializeOwned + Send + 'static,
        F: Fn(Context, A) -> R + Send + Sync + 'static,
        R: 'static,
    {
        let name = name.into();
        let method_name = name.clone();
        let method: Method = Arc::new(move |ctx, args| {
            // An argument type's `Deserialize` may panic as well as the handler: both
            // become the caller's failure, never an unanswered call.
            let built = std::panic::catch_unwind(AssertUnwindSafe(|| {
                decode_args::<A>(&method_name, args).map(|args| handler(ctx, args))
            }))
            .unwrap_or_else(|panic| Err(panic_failure(&*panic)));
            match built {
                Ok(built) => wrap(built),
                Err(failure) => Invocation::Failed(failure),
            }
        });
        self.methods.insert(name, method);
        self
    }
}

/// A handler's outcome as the JSON result or the failure to send.
fn reply_value<T: Serialize, E: IntoRemoteError>(
    outcome: Result<T, E>,
) -> Result<Value, RemoteError> {
    match outcome {
        Ok(value) => encode_result(&value),
        Err(err) => Err(err.into_remote_error()),
    }
}

fn decode_args<A: DeserializeOwned>(
    method: &str,
    args: Map<String, Value>,
) -> Result<A, RemoteError> {
    A::deserialize(Value::Object(args))
        .map_err(|e| RemoteError::new("TypeError", format!("{method}() got bad arguments: {e}")))
}

fn encode_result<T: Serialize>(value: &T) -> Result<Value, RemoteError> {
    serde_json::to_value(value)
        .map_err(|e| RemoteError::new("TypeError", format!("result does not serialize: {e}")))
}

/// The failure sent for a panicking handler: a Python `RuntimeError` for Python
/// callers, with the panic message.
pub(crate) fn panic_failure(panic: &(dyn std::any::Any + Send)) -> RemoteError {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(non-string panic payload)".to_owned());
    RemoteError::new("RuntimeError", format!("handler panicked: {text}"))
}
