//! The RPC client: `call`, `multicall` and `cast` over any transport, with
//! oslo-style per-call overrides (`prepare()`), one reply queue per client and a
//! waiter per call keyed by `_msg_id`.

use std::borrow::Cow;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::channel::mpsc;
use futures::future::Either;
use futures::{Stream, StreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::OnceCell;
use tokio::time::{Instant, timeout_at};
use tracing::Instrument;

use crate::auth::MessageAuth;
use crate::context::Context;
use crate::error::{Error, RemoteError, Result, TimeoutKind};
use crate::reply::{PendingReplies, ReplyRouter};
use crate::target::{Target, Version};
use crate::transport::{Address, CallHint, Outgoing, Publisher, Transport};
use crate::wire::{self, Head, Reply};

/// How long a call waits for its reply unless told otherwise (oslo's
/// `rpc_response_timeout`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// The shortest call-monitor interval servers honour (oslo.messaging's rule).
pub const MIN_CALL_MONITOR: Duration = Duration::from_secs(2);
/// The longest timeout or call-monitor interval a client keeps (ten years); longer
/// ones, `Duration::MAX` included, are taken as this.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(10 * 365 * 86_400);

/// Module of the dispatcher failures, as oslo.messaging names it on the wire.
pub(crate) const DISPATCHER_MODULE: &str = "oslo_messaging.rpc.dispatcher";

/// Module of failures a transport reports through the reply path.
pub const TRANSPORT_FAILURE_MODULE: &str = "mqrpc.transport";
/// Class of the failure a transport sends a caller when nothing listens on the
/// address of its request; the client turns it into [`Error::NoResponders`], with the
/// address as the first argument.
pub const NO_RESPONDERS_CLASS: &str = "NoResponders";

/// Calls methods on servers of a topic.
///
/// Cloning is cheap; clones share the connection and the reply queue. Per-call
/// settings are changed on a copy, in the style of oslo.messaging's `prepare()`:
///
/// ```
/// # async fn demo(client: rpc_core::Client) -> rpc_core::Result<()> {
/// use std::time::Duration;
/// use rpc_core::{Context, Version};
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
    pub async fn call<A, R>(&self, ctx: &Context, method: &str, args: A) -> Result<R>
    where
        A: Serialize,
        R: DeserializeOwned,
    {
        self.check_callable()?;
        let kwargs = encode_args(args)?;
        let mut retries = 0u32;
        loop {
            let outcome = self.call_once(ctx, method, &kwargs).await;
            let Some(policy) = &self.retry else {
                return outcome;
            };
            match outcome {
                Err(err) if retries + 1 < policy.attempts && is_retryable(&err) => {
                    let wait = policy.backoff(retries);
                    tracing::debug!(error = %err, ?wait, method, "retrying an idempotent call");
                    tokio::time::sleep(wait).await;
                    retries += 1;
                }
                other => return other,
            }
        }
    }

    async fn call_once<R: DeserializeOwned>(
        &self,
        ctx: &Context,
        method: &str,
        kwargs: &EncodedArgs,
    ) -> Result<R> {
        let span = tracing::debug_span!("rpc.call", msg_id = tracing::field::Empty,
            topic = %self.target, method);
        async {
            let (mut pending, outgoing) = self.prepare_call(ctx, method, kwargs).await?;
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
                let mut first = {
                    let msg_id = pending.msg_id.clone();
                    let publish = std::pin::pin!(self.publish_call(outgoing, None, &msg_id));
                    let early = std::pin::pin!(pending.recv_reply());
                    match futures::future::select(publish, early).await {
                        // Waiting for a reply is cancel-safe: nothing is lost by
                        // dropping it.
                        Either::Left((Ok(()), _waiting)) => None,
                        Either::Left((Err(err), _)) => return Err(err),
                        Either::Right((reply, _unconfirmed)) => Some(reply?),
                    }
                };
                published = true;
                pending.monitor_from_now();
                let mut last = Value::Null;
                loop {
                    let reply = match first.take() {
                        Some(reply) => reply,
                        None => pending.wait_reply().await?,
                    };
                    if let Some(failure) = reply.failure {
                        return Err(pending.failure(failure));
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
        .instrument(span)
        .await
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
        self.check_callable()?;
        let span = tracing::debug_span!("rpc.multicall", msg_id = tracing::field::Empty,
            topic = %self.target, method);
        let pending = async {
            let args = encode_args(args)?;
            let (mut pending, outgoing) = self.prepare_call(ctx, method, &args).await?;
            self.publish_call(outgoing, Some(pending.deadline), &pending.msg_id)
                .await?;
            pending.monitor_from_now();
            Ok::<_, Error>(pending)
        }
        .instrument(span)
        .await?;
        Ok(ReplyStream::new(pending))
    }

    /// Sends `method` without waiting for any result; returns once the transport has
    /// accepted the message. With [`Client::fanout`] every server of the topic gets it.
    pub async fn cast<A: Serialize>(&self, ctx: &Context, method: &str, args: A) -> Result<()> {
        self.target.require_topic()?;
        let span = tracing::debug_span!("rpc.cast", topic = %self.target, method);
        async {
            let deadline = Instant::now() + self.timeout;
            let args = encode_args(args)?;
            let body = self.encode(&self.head(ctx, method), &args)?;
            let address = &self.address;
            tracing::debug!(size = body.len(), %address, "sending cast");
            self.publish(address, Outgoing::new(body), Some(deadline), "")
                .await
        }
        .instrument(span)
        .await
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
    /// were encoded to once.
    fn head<'a>(&'a self, ctx: &'a Context, method: &'a str) -> Head<'a> {
        Head {
            namespace: self.target.namespace.as_deref(),
            version: self.target.version.map(|v| Cow::Owned(v.to_string())),
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
        tracing::Span::current().record("msg_id", &*msg_id);
        // The waiter exists before the request leaves, so no reply can be missed.
        let (replies, rx) = router.register(&msg_id)?;
        let head = Head {
            msg_id: Some(&msg_id),
            reply_to: Some(router.address()),
            call_monitor: self.call_monitor.map(|d| d.as_secs_f64()),
            expires_in: Some(self.timeout.as_secs_f64()),
            ..self.head(ctx, method)
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
        let pending = PendingCall {
            _client: self.shared.clone(),
            rx,
            _waiter: replies,
            msg_id,
            target: self.target.clone(),
            started,
            deadline,
            call_monitor: self.call_monitor,
            monitoring: false,
            last_heard: started,
        };
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
        self
    }

    fn timeout_error(&self, msg_id: &str, started: Instant, kind: TimeoutKind) -> Error {
        timeout_error(&self.target, &self.shared, msg_id, started, kind)
    }
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

/// Retries of idempotent calls: how many attempts in all, and the backoff between
/// them (doubling from `first_backoff` up to `max_backoff`, each wait drawn between
/// half and all of that, so clients that failed together do not retry together).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// Attempts in all, the first included (at least 1).
    pub attempts: u32,
    /// Wait before the first retry.
    pub first_backoff: Duration,
    /// Longest wait between attempts.
    pub max_backoff: Duration,
}

impl RetryPolicy {
    /// `attempts` attempts in all, waits from 100 ms up to 5 s.
    pub fn new(attempts: u32) -> Self {
        RetryPolicy {
            attempts: attempts.max(1),
            first_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }

    /// Sets the first and the longest wait.
    pub fn backoff_between(mut self, first: Duration, max: Duration) -> Self {
        self.first_backoff = first;
        self.max_backoff = max.max(first);
        self
    }

    /// The wait before retry number `retry` (0 for the first retry).
    pub fn backoff(&self, retry: u32) -> Duration {
        use std::hash::{BuildHasher, Hasher};
        let full = self
            .first_backoff
            .checked_mul(1u32 << retry.min(20))
            .unwrap_or(self.max_backoff)
            .min(self.max_backoff);
        // Jitter from the std hasher's random keys: no extra dependency.
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u32(retry);
        let fraction = 0.5 + (hasher.finish() % 1000) as f64 / 2000.0;
        full.mul_f64(fraction)
    }
}

/// Errors after which an idempotent call is worth sending again.
fn is_retryable(err: &Error) -> bool {
    matches!(
        err,
        Error::Timeout { .. } | Error::Transport { .. } | Error::NoResponders { .. }
    )
}

/// A call's keyword arguments, serialized once, straight into the escaped text the
/// envelope carries (no map of values in between), and written from there into
/// every attempt's body.
struct EncodedArgs(Vec<u8>);

/// Accepts anything that serializes to a JSON object; `()` means no arguments.
fn encode_args<A: Serialize>(args: A) -> Result<EncodedArgs> {
    let text = wire::escaped(&args).map_err(|err| Error::InvalidArguments(err.to_string()))?;
    // The first byte tells what the value is: compact JSON, with a string's quote
    // escaped (`\"`).
    let other = match text.first() {
        Some(b'{') => return Ok(EncodedArgs(text)),
        Some(b'n') => return Ok(EncodedArgs(b"{}".to_vec())),
        Some(b'[') => "an array",
        Some(b'\\') => "a string",
        Some(b't' | b'f') => "a boolean",
        _ => "a number",
    };
    Err(Error::InvalidArguments(format!(
        "arguments must serialize to a JSON object of keyword arguments, not {other}"
    )))
}

fn decode_result<R: DeserializeOwned>(value: Value) -> Result<R> {
    R::deserialize(value).map_err(|e| {
        Error::Codec(crate::error::CodecError::new(format!(
            "result does not decode into the expected type: {e}"
        )))
    })
}

/// Turns the dispatcher's own failures back into their variants.
///
/// A Rust server sends the method (and version) as the positional arguments; a Python
/// server sends only the message text, so the names are read from it then.
pub(crate) fn failure_to_error(failure: RemoteError) -> Error {
    if failure.module == crate::auth::AUTH_FAILURE_MODULE
        && failure.class == crate::auth::AUTH_FAILURE_CLASS
    {
        return Error::Authentication(failure.message);
    }
    if failure.module == TRANSPORT_FAILURE_MODULE && failure.class == NO_RESPONDERS_CLASS {
        let address = positional(&failure, 0, 1).unwrap_or_default();
        return Error::NoResponders { address };
    }
    if failure.base_module() == DISPATCHER_MODULE {
        match failure.base_class() {
            "NoSuchMethod" => {
                let raw = positional(&failure, 0, 1).unwrap_or_else(|| failure.message.clone());
                let method = raw
                    .strip_prefix("Endpoint does not support RPC method ")
                    .map_or(raw.clone(), str::to_owned);
                return Error::NoSuchMethod { method };
            }
            "UnsupportedVersion" => {
                let (version, method) =
                    match (positional(&failure, 0, 2), positional(&failure, 1, 2)) {
                        (Some(version), Some(method)) => (version, method),
                        _ => parse_unsupported_version(&failure.message),
                    };
                return Error::UnsupportedVersion { version, method };
            }
            _ => {}
        }
    }
    Error::Remote(Box::new(failure))
}

/// Positional argument `i` when the failure has exactly `count` string arguments.
fn positional(failure: &RemoteError, i: usize, count: usize) -> Option<String> {
    if failure.args.len() != count {
        return None;
    }
    failure
        .args
        .get(i)
        .and_then(Value::as_str)
        .map(str::to_owned)
}

/// Reads oslo's "Endpoint does not support RPC version V. Attempted method: M".
fn parse_unsupported_version(message: &str) -> (String, String) {
    let rest = message
        .strip_prefix("Endpoint does not support RPC version ")
        .unwrap_or(message);
    match rest.split_once(". Attempted method: ") {
        Some((version, method)) => (version.to_owned(), method.trim().to_owned()),
        None => (String::new(), String::new()),
    }
}

/// A call whose request is out: waits for its replies, heartbeats and deadlines.
struct PendingCall {
    /// Keeps the reply queue alive while the call waits, even if every `Client`
    /// handle is gone (a multicall stream outliving its client).
    _client: Arc<ClientShared>,
    rx: mpsc::UnboundedReceiver<Reply>,
    _waiter: PendingReplies,
    msg_id: Arc<str>,
    target: Arc<Target>,
    started: Instant,
    deadline: Instant,
    call_monitor: Option<Duration>,
    /// Whether the call monitor's clock runs (once the request is published).
    monitoring: bool,
    last_heard: Instant,
}

impl PendingCall {
    /// The error for a failure reply, naming this call's target where the failure
    /// could not.
    fn failure(&self, failure: RemoteError) -> Error {
        match failure_to_error(failure) {
            Error::NoResponders { address } if address.is_empty() => Error::NoResponders {
                address: self.target.to_string(),
            },
            err => err,
        }
    }

    /// Starts the call monitor's clock: the request is out, the server has
    /// `call_monitor` from now to answer or send a heartbeat.
    fn monitor_from_now(&mut self) {
        self.monitoring = true;
        self.last_heard = Instant::now();
    }

    /// The error of this call timing out while it waited for `kind`.
    fn timeout(&self, kind: TimeoutKind) -> Error {
        timeout_error(
            &self.target,
            &self._client,
            &self.msg_id,
            self.started,
            kind,
        )
    }

    /// The next reply that is not a heartbeat, with no deadline: the caller bounds
    /// the wait. The call monitor's clock is not kept.
    async fn recv_reply(&mut self) -> Result<Reply> {
        loop {
            match self.rx.next().await {
                Some(reply) if reply.is_heartbeat() => {
                    tracing::trace!(msg_id = %self.msg_id, "heartbeat");
                }
                Some(reply) => return Ok(reply),
                None => return Err(Error::Closed),
            }
        }
    }

    /// The next reply that is not a heartbeat, for a caller that bounds the overall
    /// deadline itself: only a call monitor needs a timer of its own here.
    async fn wait_reply(&mut self) -> Result<Reply> {
        match self.call_monitor {
            Some(_) => self.next_reply().await,
            None => self.recv_reply().await,
        }
    }

    /// The next reply that is not a heartbeat.
    async fn next_reply(&mut self) -> Result<Reply> {
        loop {
            let (wake, kind) = match self.call_monitor {
                Some(interval) if self.monitoring && self.last_heard + interval < self.deadline => {
                    (self.last_heard + interval, TimeoutKind::CallMonitor)
                }
                _ => (self.deadline, TimeoutKind::Reply),
            };
            match timeout_at(wake, self.rx.next()).await {
                Ok(Some(reply)) => {
                    self.last_heard = Instant::now();
                    if reply.is_heartbeat() {
                        tracing::trace!(msg_id = %self.msg_id, "heartbeat");
                        continue;
                    }
                    return Ok(reply);
                }
                Ok(None) => return Err(Error::Closed),
                Err(_) => return Err(self.timeout(kind)),
            }
        }
    }
}

type BoxedStream<R> = Pin<Box<dyn Stream<Item = Result<R>> + Send>>;

/// The results of a [`Client::multicall`], in the order the server sent them.
pub struct ReplyStream<R> {
    inner: BoxedStream<R>,
}

impl<R: DeserializeOwned + Send + 'static> ReplyStream<R> {
    fn new(pending: PendingCall) -> Self {
        let stream = futures::stream::unfold(Some(pending), |state| async move {
            let mut pending = state?;
            loop {
                let reply = match pending.next_reply().await {
                    Ok(reply) => reply,
                    Err(err) => return Some((Err(err), None)),
                };
                if let Some(failure) = reply.failure {
                    return Some((Err(pending.failure(failure)), None));
                }
                match (reply.result.is_null(), reply.ending) {
                    (true, true) => return None,
                    (false, true) => return Some((decode_result(reply.result), None)),
                    (false, false) => return Some((decode_result(reply.result), Some(pending))),
                    (true, false) => continue,
                }
            }
        });
        ReplyStream {
            inner: Box::pin(stream),
        }
    }
}

impl<R> Stream for ReplyStream<R> {
    type Item = Result<R>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

impl<R> fmt::Debug for ReplyStream<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplyStream").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Map, json};

    /// The arguments as a request carrying them decodes them.
    fn decoded_args(args: &EncodedArgs) -> Map<String, Value> {
        let context = Context::new();
        let head = Head::new("m", &context);
        let body = wire::encode_request_with(&head, wire::Args::Escaped(&args.0)).expect("encodes");
        wire::decode_request(&body).expect("decodes").args
    }

    #[test]
    fn arguments_are_encoded_once_as_the_object_they_serialize_to() {
        #[derive(Serialize)]
        struct Typed<'a> {
            text: &'a str,
            n: i64,
            x: f64,
            list: Vec<Option<bool>>,
            nested: Map<String, Value>,
        }
        let nested = json!({"z": 1, "a": [null, "é"]});
        let typed = Typed {
            text: "quote \" backslash \\ tab \t nul \u{0} é 😀 </",
            n: -7,
            x: 0.5,
            list: vec![Some(true), None],
            nested: nested.as_object().cloned().unwrap_or_default(),
        };
        // The same members, whatever serializes them: a typed struct or a `Value`.
        let want = serde_json::to_value(&typed).expect("to_value");
        let encoded = encode_args(&typed).expect("an object");
        assert_eq!(Value::Object(decoded_args(&encoded)), want);
        let from_value = encode_args(&want).expect("an object");
        assert_eq!(Value::Object(decoded_args(&from_value)), want);
        // No arguments: `()`, `None` and an empty map alike.
        for none in [
            encode_args(()),
            encode_args(None::<u8>),
            encode_args(json!({})),
        ] {
            assert!(decoded_args(&none.expect("no arguments")).is_empty());
        }
    }

    #[test]
    fn arguments_that_are_not_an_object_are_refused_by_kind() {
        for (args, kind) in [
            (json!([1]), "an array"),
            (json!("text"), "a string"),
            (json!(3), "a number"),
            (json!(-3.5), "a number"),
            (json!(true), "a boolean"),
            (json!(false), "a boolean"),
        ] {
            match encode_args(&args) {
                Err(Error::InvalidArguments(message)) => {
                    assert!(
                        message.ends_with(&format!("not {kind}")),
                        "{args}: {message}"
                    )
                }
                other => panic!("{args}: {:?}", other.map(|a| a.0)),
            }
        }
        // A map whose keys are not strings does not serialize to JSON at all.
        let mut keyed = std::collections::BTreeMap::new();
        keyed.insert(vec![1u8], 1);
        assert!(matches!(
            encode_args(&keyed),
            Err(Error::InvalidArguments(_))
        ));
    }

    #[test]
    fn retry_backoff_doubles_with_jitter_and_caps() {
        let policy = RetryPolicy::new(5)
            .backoff_between(Duration::from_millis(100), Duration::from_millis(300));
        for retry in 0..6 {
            let wait = policy.backoff(retry);
            let full =
                Duration::from_millis(100 * (1 << retry.min(20))).min(Duration::from_millis(300));
            assert!(
                wait >= full / 2 && wait <= full,
                "retry {retry}: {wait:?} of {full:?}"
            );
        }
        assert_eq!(RetryPolicy::new(0).attempts, 1);
        assert!(is_retryable(&Error::NoResponders {
            address: "x".into()
        }));
        assert!(!is_retryable(&Error::NoSuchMethod { method: "m".into() }));
    }

    fn dispatcher_failure(class: &str, message: &str, args: &[&str]) -> RemoteError {
        let mut failure = RemoteError::new(class, message).with_module(DISPATCHER_MODULE);
        failure.args = args.iter().map(|a| Value::from(*a)).collect();
        failure
    }

    #[test]
    fn dispatcher_failures_from_rust_and_python_servers() {
        let rust = dispatcher_failure(
            "NoSuchMethod",
            "Endpoint does not support RPC method m",
            &["m"],
        );
        assert!(matches!(failure_to_error(rust), Error::NoSuchMethod { method } if method == "m"));
        let text = "Endpoint does not support RPC method m";
        let python = dispatcher_failure("NoSuchMethod", text, &[text]);
        assert!(
            matches!(failure_to_error(python), Error::NoSuchMethod { method } if method == "m")
        );
        let text = "Endpoint does not support RPC version 2.0. Attempted method: add";
        let python = dispatcher_failure("UnsupportedVersion", text, &[text]);
        assert!(matches!(failure_to_error(python),
            Error::UnsupportedVersion { version, method } if version == "2.0" && method == "add"));
        let mut remote = dispatcher_failure("NoSuchMethod", text, &[]);
        remote.class = "NoSuchMethod_Remote".into();
        remote.module = format!("{DISPATCHER_MODULE}_Remote");
        assert!(matches!(
            failure_to_error(remote),
            Error::NoSuchMethod { .. }
        ));
        let other = RemoteError::new("ValueError", "x");
        assert!(matches!(failure_to_error(other), Error::Remote(_)));
    }
}
