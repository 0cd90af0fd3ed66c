//! The RPC client: `call`, `multicall` and `cast` over any transport, with
//! oslo-style per-call overrides (`prepare()`), one reply queue per client and a
//! waiter per call keyed by `_msg_id`.

mod args;
mod call;
mod discover;
mod retry;

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::Either;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::OnceCell;
use tokio::time::{Instant, timeout_at};
use tracing::Instrument;

use crate::auth::MessageAuth;
use crate::context::Context;
use crate::error::{Error, Result, TimeoutKind};
use crate::metrics::{ClientMetrics, Outcome};
use crate::reply::ReplyRouter;
use crate::target::{Target, Version};
use crate::timing::{DEFAULT_TIMEOUT, MAX_TIMEOUT, MIN_CALL_MONITOR};
use crate::trace::{self, ClientRequest, Operation, TraceHeaders};
use crate::transport::{Address, CallHint, Outgoing, Publisher, Transport};
use crate::wire::{self, Head};
use args::{EncodedArgs, encode_args};
pub use call::ReplyStream;
use call::{PendingCall, decode_result, failure_error};
pub use discover::{Discovered, DiscoveryStream, DiscoveryWait};
pub use retry::RetryPolicy;

/// Calls methods on servers of a topic.
///
/// Cloning is cheap; clones share the connection and the reply queue. Per-call
/// settings are changed on a copy, in the style of oslo.messaging's `prepare()`:
///
/// ```
/// # async fn demo(client: mqrpc::Client) -> mqrpc::Result<()> {
/// use std::time::Duration;
/// use mqrpc::{Context, Version};
/// let sum: i64 = client
///     .prepare()
///     .server("host-1")
///     .version(Version::new(1, 2))
///     .timeout(Duration::from_secs(5))
///     .call(&Context::new(), "add", serde_json::json!({"a": 1, "b": 2}))
///     .await?;
/// # let _ = sum; Ok(()) }
/// ```
#[derive(Clone)]
pub struct Client {
    shared: Arc<ClientShared>,
    /// Shared with the calls in flight, which name it only in errors.
    target: Arc<Target>,
    /// Where the target's requests go: worked out once, not per call.
    address: Arc<Address>,
    timeout: Duration,
    call_monitor: Option<Duration>,
    retry: Option<RetryPolicy>,
    version_cap: Option<Version>,
    /// The handles of the target's topic (nothing without the `metrics` feature).
    metrics: ClientMetrics,
}

struct ClientShared {
    // First: fields drop in order, and the reply router must stop before the
    // transport goes, or it sees its queue end and warns about a client nobody uses.
    replies: OnceCell<ReplyRouter>,
    transport: Arc<dyn Transport>,
    publisher: OnceCell<Arc<dyn Publisher>>,
    exchange: String,
    max_message_size: Option<usize>,
    broker: String,
    auth: Option<MessageAuth>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("transport", &self.shared.transport.name())
            .field("target", &self.target)
            .field("timeout", &self.timeout)
            .field("call_monitor", &self.call_monitor)
            .finish()
    }
}

impl Client {
    /// A client of `target` over `transport`, with the default 60 s timeout.
    pub fn new(transport: Arc<dyn Transport>, target: Target) -> Self {
        let capabilities = transport.capabilities();
        let exchange = transport.default_exchange().to_owned();
        let broker = transport.describe();
        let address = Arc::new(Address::for_target(&target, &exchange));
        let metrics = ClientMetrics::for_topic(&target.topic);
        Client {
            shared: Arc::new(ClientShared {
                broker,
                transport,
                publisher: OnceCell::new(),
                replies: OnceCell::new(),
                exchange,
                max_message_size: capabilities.max_message_size,
                auth: None,
            }),
            target: Arc::new(target),
            address,
            timeout: DEFAULT_TIMEOUT,
            call_monitor: None,
            retry: None,
            version_cap: None,
            metrics,
        }
    }

    /// Signs every request with `auth` and accepts only replies that it verifies
    /// (opt-in message authentication; see [`MessageAuth`]). The returned client has a
    /// reply queue of its own; set this before making copies with `prepare`.
    pub fn message_auth(self, auth: MessageAuth) -> Self {
        let old = &self.shared;
        let shared = Arc::new(ClientShared {
            transport: old.transport.clone(),
            publisher: OnceCell::new(),
            replies: OnceCell::new(),
            exchange: old.exchange.clone(),
            max_message_size: old.max_message_size,
            broker: old.broker.clone(),
            auth: Some(auth.own_memory()),
        });
        Client { shared, ..self }
    }

    /// A copy to change per-call settings on (oslo's `prepare()`); the copy shares the
    /// connection and reply queue.
    pub fn prepare(&self) -> Client {
        self.clone()
    }

    /// Sends to one named server of the topic.
    pub fn server(self, server: impl Into<String>) -> Self {
        self.retarget(|target| target.server = Some(server.into()))
    }

    /// Sends to every server of the topic (casts only).
    pub fn fanout(self, fanout: bool) -> Self {
        self.retarget(|target| target.fanout = fanout)
    }

    /// Sets the topic.
    pub fn topic(self, topic: impl Into<String>) -> Self {
        self.retarget(|target| target.topic = topic.into())
    }

    /// Sets the exchange.
    pub fn exchange(self, exchange: impl Into<String>) -> Self {
        self.retarget(|target| target.exchange = Some(exchange.into()))
    }

    /// Sets the interface namespace.
    pub fn namespace(self, namespace: impl Into<String>) -> Self {
        self.retarget(|target| target.namespace = Some(namespace.into()))
    }

    /// Sets the interface version the request asks for.
    pub fn version(self, version: Version) -> Self {
        self.retarget(|target| target.version = Some(version))
    }

    /// Sets the overall deadline of a call, publish included, and of a cast's publish.
    /// A timeout longer than [`MAX_TIMEOUT`] is taken as that (a deadline must be a
    /// point in time the clock can represent).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout.min(MAX_TIMEOUT);
        self
    }

    /// Asks the server for heartbeats every `interval / 2` and fails the call when
    /// nothing is heard for `interval` (oslo's `call_monitor_timeout`), while the
    /// overall timeout still applies. Servers heartbeat only for intervals of 2 s or
    /// more, so shorter intervals are raised to 2 s.
    pub fn call_monitor(mut self, interval: Option<Duration>) -> Self {
        self.call_monitor = interval.map(|i| i.clamp(MIN_CALL_MONITOR, MAX_TIMEOUT));
        self
    }

    /// Retries `call` after a timeout, a transport error or "no responders", with
    /// capped exponential backoff and jitter (opt-in, default none). Use it only for
    /// idempotent methods: every attempt is a new request that a server may run even
    /// when its reply was lost. Each attempt has the full timeout.
    pub fn retry(mut self, policy: Option<RetryPolicy>) -> Self {
        self.retry = policy;
        self
    }

    /// Refuses, before sending, any request whose version this `cap` cannot serve
    /// (another major, or a higher minor), with [`Error::VersionCap`]: oslo's
    /// `version_cap`. During a rolling upgrade a client capped at the oldest
    /// server's version never sends what some servers would refuse, and
    /// [`Client::can_send_version`] tells it which calls to make instead. A request
    /// that names no version asks for 1.0.
    pub fn version_cap(mut self, cap: Option<Version>) -> Self {
        self.version_cap = cap;
        self
    }

    /// Whether a request for `version` passes the [`Client::version_cap`] (always,
    /// without a cap).
    pub fn can_send_version(&self, version: Version) -> bool {
        self.version_cap.is_none_or(|cap| cap.serves(&version))
    }

    /// The target requests go to.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The transport this client sends through.
    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.shared.transport
    }

    /// Calls `method` and waits for its result.
    ///
    /// `args` must serialize to a JSON object (the keyword arguments); `()` and
    /// [`crate::NoArgs`] send `{}`. A server method that streams returns its last item.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> mqrpc::Result<()> {
    /// use mqrpc::{Client, Context, Endpoint, RemoteError, Server, Target};
    ///
    /// let transport = mqrpc::connect("memory://").await?;
    /// let echo = Endpoint::new().method("echo", |_ctx, args: serde_json::Value| async move {
    ///     Ok::<_, RemoteError>(args["text"].clone())
    /// });
    /// let server = Server::builder(transport.clone(), Target::new("demo").server("s1"))
    ///     .endpoint(echo)
    ///     .start()
    ///     .await?;
    ///
    /// let client = Client::new(transport, Target::new("demo"));
    /// let text: String = client
    ///     .call(&Context::new(), "echo", serde_json::json!({"text": "hi"}))
    ///     .await?;
    /// assert_eq!(text, "hi");
    /// server.shutdown().await
    /// # }
    /// ```
    pub async fn call<A, R>(&self, ctx: &Context, method: &str, args: A) -> Result<R>
    where
        A: Serialize,
        R: DeserializeOwned,
    {
        self.call_at(ctx, method, None, args).await
    }

    /// [`Client::call`] asking for `version` unless this client's target names one: a
    /// typed client's method (`#[mqrpc::service]`) asks for the version that added it.
    #[doc(hidden)]
    pub async fn call_at<A, R>(
        &self,
        ctx: &Context,
        method: &str,
        version: Option<Version>,
        args: A,
    ) -> Result<R>
    where
        A: Serialize,
        R: DeserializeOwned,
    {
        self.check_callable()?;
        self.check_cap(method, version)?;
        let kwargs = &encode_args(args)?;
        let timer = self.metrics.call(method);
        let called = match &self.retry {
            None => self.call_once(ctx, method, version, kwargs).await,
            Some(policy) => {
                policy
                    .run(method, |_| self.call_once(ctx, method, version, kwargs))
                    .await
            }
        };
        timer.finish(&called);
        called
    }

    async fn call_once<R: DeserializeOwned>(
        &self,
        ctx: &Context,
        method: &str,
        version: Option<Version>,
        kwargs: &EncodedArgs,
    ) -> Result<R> {
        let span = self.span(Operation::Call, method);
        let called = async {
            let (mut pending, outgoing) = self.prepare_call(ctx, method, version, kwargs).await?;
            // One timer for the whole call, publish included: the parts below wait
            // without timers of their own (a timer registered and cancelled per wait
            // was a measurable share of a call on a fast bus).
            let deadline = pending.deadline;
            let mut published = false;
            let outcome = timeout_at(deadline, async {
                // A reply proves the request arrived: the call proceeds on whichever
                // comes first, the publish (with its confirm) or the reply. A failed
                // publish still fails the call when it comes first. Until the publish
                // is done only the deadline applies: the call monitor's clock starts
                // once the request is out.
                // Kept for a resend after "no responders" (a refcount, no copy).
                let resend = outgoing.clone();
                let msg_id = pending.msg_id.clone();
                let mut first = {
                    let publish = std::pin::pin!(self.publish_call(outgoing, None, &msg_id));
                    let early = std::pin::pin!(pending.recv_reply());
                    match futures::future::select(publish, early).await {
                        // Waiting for a reply is cancel-safe: nothing is lost by
                        // dropping it.
                        Either::Left((Ok(()), _waiting)) => None,
                        Either::Left((Err(err), _)) => return Err(err),
                        Either::Right((reply, _unconfirmed)) => Some(reply),
                    }
                };
                published = true;
                pending.monitor_from_now();
                let mut last = Value::Null;
                let mut resends = 0;
                loop {
                    let reply = match first.take() {
                        Some(reply) => reply,
                        None => pending.wait_reply().await,
                    };
                    if matches!(reply, Err(Error::NoResponders { .. }))
                        && let Some(pause) = no_responders_pause(resends, &pending)
                    {
                        // Nothing received the request, so sending it again cannot
                        // run it twice.
                        resends += 1;
                        tracing::debug!(resends, "no responders; sending the request again");
                        tokio::time::sleep(pause).await;
                        self.publish_call(resend.clone(), None, &msg_id).await?;
                        continue;
                    }
                    let reply = reply?;
                    if let Some(failure) = reply.failure {
                        return Err(failure_error(failure));
                    }
                    if !reply.result.is_null() {
                        last = reply.result;
                    }
                    if reply.ending {
                        return decode_result(last);
                    }
                }
            })
            .await;
            outcome.unwrap_or_else(|_| {
                Err(pending.timeout(if published {
                    TimeoutKind::Reply
                } else {
                    TimeoutKind::Publish
                }))
            })
        }
        .instrument(span.clone())
        .await;
        record_failure(&span, &called);
        called
    }

    /// Calls `method` and streams every result the server sends, in order, until the
    /// server ends the stream. The request is sent before this returns.
    ///
    /// The overall timeout covers the whole stream; the call monitor, when set, covers
    /// each gap between replies. After an error the stream ends.
    pub async fn multicall<A, R>(
        &self,
        ctx: &Context,
        method: &str,
        args: A,
    ) -> Result<ReplyStream<R>>
    where
        A: Serialize,
        R: DeserializeOwned + Send + 'static,
    {
        self.multicall_at(ctx, method, None, args).await
    }

    /// [`Client::multicall`] asking for `version` unless this client's target names one.
    #[doc(hidden)]
    pub async fn multicall_at<A, R>(
        &self,
        ctx: &Context,
        method: &str,
        version: Option<Version>,
        args: A,
    ) -> Result<ReplyStream<R>>
    where
        A: Serialize,
        R: DeserializeOwned + Send + 'static,
    {
        self.check_callable()?;
        self.check_cap(method, version)?;
        let span = self.span(Operation::Multicall, method);
        let timer = self.metrics.call(method);
        let pending = async {
            let args = encode_args(args)?;
            let (mut pending, outgoing) = self.prepare_call(ctx, method, version, &args).await?;
            self.publish_call(outgoing, Some(pending.deadline), &pending.msg_id)
                .await?;
            pending.monitor_from_now();
            Ok::<_, Error>(pending)
        }
        .instrument(span.clone())
        .await;
        record_failure(&span, &pending);
        match pending {
            Ok(pending) => Ok(ReplyStream::new(pending, timer)),
            Err(err) => {
                let failed = Err(err);
                timer.finish(&failed);
                failed
            }
        }
    }

    /// Sends `method` without waiting for any result; returns once the transport has
    /// accepted the message. With [`Client::fanout`] every server of the topic gets it.
    pub async fn cast<A: Serialize>(&self, ctx: &Context, method: &str, args: A) -> Result<()> {
        self.cast_at(ctx, method, None, args).await
    }

    /// [`Client::cast`] asking for `version` unless this client's target names one.
    #[doc(hidden)]
    pub async fn cast_at<A: Serialize>(
        &self,
        ctx: &Context,
        method: &str,
        version: Option<Version>,
        args: A,
    ) -> Result<()> {
        self.target.require_topic()?;
        self.check_cap(method, version)?;
        let span = self.span(Operation::Cast, method);
        let sent = async {
            let deadline = Instant::now() + self.timeout;
            let args = encode_args(args)?;
            let trace = TraceHeaders::current();
            let body = self.encode(&self.head(ctx, method, version, &trace), &args)?;
            let address = &self.address;
            tracing::debug!(size = body.len(), %address, "sending cast");
            self.publish(address, Outgoing::new(body), Some(deadline), "")
                .await
        }
        .instrument(span.clone())
        .await;
        record_failure(&span, &sent);
        self.metrics.cast_sent(method, &sent);
        sent
    }

    /// Releases the client's reply queue at the broker (a reply stream, a queue).
    /// Calls still waiting fail with [`Error::Closed`], and so do later calls on this
    /// client and its clones. Dropping the last clone releases it too, in the
    /// background.
    pub async fn close(&self) {
        if let Some(router) = self.shared.replies.get() {
            router.close().await;
        }
    }

    /// [`Error::VersionCap`] when the version a request would ask for is above the cap.
    fn check_cap(&self, method: &str, version: Option<Version>) -> Result<()> {
        let Some(cap) = self.version_cap else {
            return Ok(());
        };
        let asked = self.target.version.or(version).unwrap_or_default();
        if cap.serves(&asked) {
            return Ok(());
        }
        Err(Error::VersionCap {
            version: asked.to_string(),
            cap: cap.to_string(),
            method: method.to_owned(),
        })
    }

    /// The span of one request of `operation` to this client's target.
    fn span(&self, operation: Operation, method: &str) -> tracing::Span {
        let target = &*self.target;
        trace::client_span(&ClientRequest {
            operation,
            backend: self.shared.transport.name(),
            topic: &target.topic,
            server: target.server.as_deref(),
            fanout: target.fanout,
            namespace: target.namespace.as_deref(),
            method,
        })
    }

    fn check_callable(&self) -> Result<()> {
        self.target.require_topic()?;
        if self.target.fanout {
            return Err(Error::InvalidTarget(
                "call and multicall cannot use a fanout target; use cast".to_owned(),
            ));
        }
        Ok(())
    }

    /// A request without its arguments, borrowing the target and `ctx`:
    /// [`Client::encode`] writes the arguments from the text the caller's arguments
    /// were encoded to once. The target's version, when it names one, wins over the
    /// method's own `version`.
    fn head<'a>(
        &'a self,
        ctx: &'a Context,
        method: &'a str,
        version: Option<Version>,
        trace: &'a TraceHeaders,
    ) -> Head<'a> {
        Head {
            trace: Some(trace),
            namespace: self.target.namespace.as_deref(),
            version: self
                .target
                .version
                .or(version)
                .map(|v| Cow::Owned(v.to_string())),
            ..Head::new(method, ctx)
        }
    }

    fn encode(&self, head: &Head<'_>, args: &EncodedArgs) -> Result<Bytes> {
        let mut body = wire::encode_request_with(head, wire::Args::Escaped(&args.0))?;
        if let Some(auth) = &self.shared.auth {
            body = auth.seal(body);
        }
        if let Some(limit) = self.shared.max_message_size {
            Error::check_size(body.len(), limit)?;
        }
        Ok(Bytes::from(body))
    }

    /// Registers a waiter for a call and encodes its request; the request is sent by
    /// [`Client::publish_call`].
    async fn prepare_call(
        &self,
        ctx: &Context,
        method: &str,
        version: Option<Version>,
        args: &EncodedArgs,
    ) -> Result<(PendingCall, Outgoing)> {
        let started = Instant::now();
        let deadline = started + self.timeout;
        // Only the first call waits for the reply queue; later ones skip the timer.
        let router = match self.shared.replies.get() {
            Some(router) => router,
            None => match timeout_at(deadline, self.replies()).await {
                Ok(router) => router?,
                Err(_) => {
                    return Err(self.timeout_error("", started, TimeoutKind::Publish));
                }
            },
        };
        // One copy of the id, shared by the waiter, the call and the transport's hint.
        let msg_id: Arc<str> = wire::fresh_id(&mut [0; wire::ID_LEN]).into();
        trace::record_message_id(&msg_id);
        // The waiter exists before the request leaves, so no reply can be missed.
        let waiter = router.register(&msg_id, &self.target)?;
        let trace = TraceHeaders::current();
        let head = Head {
            msg_id: Some(&msg_id),
            reply_to: Some(router.address()),
            call_monitor: self.call_monitor.map(|d| d.as_secs_f64()),
            expires_in: Some(self.timeout.as_secs_f64()),
            ..self.head(ctx, method, version, &trace)
        };
        let body = self.encode(&head, args)?;
        let outgoing = Outgoing {
            body,
            time_to_live: Some(self.timeout),
            mandatory: false,
            call: Some(CallHint {
                reply_to: router.shared_address(),
                msg_id: msg_id.clone(),
            }),
        };
        let pending = PendingCall::new(
            self.shared.clone(),
            waiter,
            msg_id,
            self.target.clone(),
            started,
            deadline,
            self.call_monitor,
        );
        Ok((pending, outgoing))
    }

    /// Sends a prepared call's request to the client's target.
    async fn publish_call(
        &self,
        outgoing: Outgoing,
        deadline: Option<Instant>,
        msg_id: &str,
    ) -> Result<()> {
        let address = &self.address;
        tracing::debug!(size = outgoing.body.len(), %address, "sending call");
        self.publish(address, outgoing, deadline, msg_id).await
    }

    /// Publishes `outgoing` to `address`, failing at `deadline` if one is given
    /// (without one, the caller bounds the wait).
    async fn publish(
        &self,
        address: &Address,
        outgoing: Outgoing,
        deadline: Option<Instant>,
        msg_id: &str,
    ) -> Result<()> {
        let send = async {
            let publisher = self
                .shared
                .publisher
                .get_or_try_init(|| self.shared.transport.publisher())
                .await?;
            publisher.send(address, outgoing).await
        };
        let Some(deadline) = deadline else {
            return send.await;
        };
        let started = Instant::now();
        match timeout_at(deadline, send).await {
            Ok(sent) => sent,
            Err(_) => Err(self.timeout_error(msg_id, started, TimeoutKind::Publish)),
        }
    }

    async fn replies(&self) -> Result<&ReplyRouter> {
        self.shared
            .replies
            .get_or_try_init(|| async {
                let queue = self.shared.transport.reply_queue().await?;
                Ok::<_, Error>(ReplyRouter::start(
                    queue,
                    self.shared.auth.clone(),
                    self.shared.max_message_size,
                ))
            })
            .await
    }

    /// Changes the target, and the address its requests go to with it.
    fn retarget(mut self, change: impl FnOnce(&mut Target)) -> Self {
        change(Arc::make_mut(&mut self.target));
        self.address = Arc::new(Address::for_target(&self.target, &self.shared.exchange));
        self.metrics.follow(&self.target.topic);
        self
    }

    fn timeout_error(&self, msg_id: &str, started: Instant, kind: TimeoutKind) -> Error {
        timeout_error(&self.target, &self.shared, msg_id, started, kind)
    }
}

/// How long a call waits before it sends its request again after "no responders"
/// (NATS: nothing subscribed where the request went), or `None` to fail with
/// [`Error::NoResponders`]. A server whose connection moved to another cluster node
/// subscribes again within tens of milliseconds; the call rides over that, and a
/// topic nobody serves still fails within about 0.4 s.
fn no_responders_pause(resends: u32, call: &PendingCall) -> Option<Duration> {
    const PAUSES: [Duration; 4] = [
        Duration::from_millis(25),
        Duration::from_millis(50),
        Duration::from_millis(100),
        Duration::from_millis(200),
    ];
    let pause = *PAUSES.get(usize::try_from(resends).ok()?)?;
    (Instant::now() + pause < call.deadline).then_some(pause)
}

/// A request to `target` through `client`'s broker timed out after waiting since
/// `started` for `kind`.
fn timeout_error(
    target: &Target,
    client: &ClientShared,
    msg_id: &str,
    started: Instant,
    kind: TimeoutKind,
) -> Error {
    Error::Timeout {
        msg_id: msg_id.to_owned(),
        topic: target.to_string(),
        broker: client.broker.clone(),
        waited: started.elapsed(),
        kind,
    }
}

/// Marks a client span failed when `result` is an error: its `error.type` is the
/// remote exception's class for a remote failure, the metrics' outcome otherwise.
fn record_failure<T>(span: &tracing::Span, result: &Result<T>) {
    match result {
        Err(Error::Remote(remote)) => trace::record_error(span, &remote.class),
        Err(other) => trace::record_error(span, Outcome::of_error(other).as_str()),
        Ok(_) => {}
    }
}
