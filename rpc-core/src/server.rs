//! The RPC server: consumes a target's three addresses, bounds work with a concurrency
//! limit, dispatches each request, replies (with call-monitor heartbeats), turns
//! panics into failures and shuts down gracefully.

// A `RemoteError` here is the failure document itself, built once per failed
// request and sent as it is; boxing it would only add an allocation.
#![allow(clippy::result_large_err)]

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::Either;
use futures::stream::{BoxStream, FuturesUnordered};
use futures::{FutureExt, StreamExt};
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::auth::{AuthFailure, MessageAuth, refusal};
use crate::budget::{ByteBudget, DEFAULT_MAX_PENDING_BYTES};
use crate::dispatcher::Dispatcher;
use crate::endpoint::{Endpoint, Invocation, panic_failure};
use crate::error::{Error, RemoteError, Result};
use crate::logs::{Escaped, Throttle};
use crate::target::Target;
use crate::transport::{
    Acker, Address, Consumer, Delivery, ListenOptions, Outgoing, Publisher, Transport,
};
use crate::wire::{self, Answer, Request};

/// How many requests a server handles at once unless told otherwise (oslo's
/// `executor_thread_pool_size`).
pub const DEFAULT_CONCURRENCY: usize = 64;
/// How long `shutdown()` lets in-flight handlers run unless told otherwise.
pub const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(30);
/// How many refusals of unauthenticated requests a server sends at once; beyond
/// that, refused requests are dropped without an answer.
const MAX_REFUSALS_IN_FLIGHT: usize = 16;
/// How many recent `_unique_id`s a server remembers to drop duplicates.
const DEDUP_WINDOW: usize = 1024;
/// Call-monitor intervals below this get no heartbeats (as in oslo.messaging).
const MIN_CALL_MONITOR_SECS: f64 = 2.0;
/// How long one reply may wait for the transport before it is dropped, so a stuck
/// reply queue cannot hold a handler slot forever.
const REPLY_SEND_LIMIT: Duration = Duration::from_secs(30);
/// How long the failures sent to the callers of handlers cut off by the end of the
/// grace period may take, all together.
const SHUTDOWN_REPLY_LIMIT: Duration = Duration::from_secs(5);
/// No call is worked on for longer than this, whatever its `_expires_in` says.
const MAX_CALL_LIFETIME: Duration = crate::client::MAX_TIMEOUT;

/// The class of the failure a caller receives when the server shut down before its
/// handler finished (the grace period ended).
pub const SERVER_SHUTDOWN_CLASS: &str = "ServerShutdown";

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

/// Configures and starts a [`Server`].
#[must_use = "a builder does nothing until start() is awaited"]
pub struct ServerBuilder {
    transport: Arc<dyn Transport>,
    target: Target,
    endpoints: Vec<Endpoint>,
    concurrency: usize,
    ack_mode: AckMode,
    grace_period: Duration,
    max_message_size: Option<usize>,
    max_pending_bytes: usize,
    auth: Option<MessageAuth>,
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
            .field("max_message_size", &self.max_message_size)
            .field("max_pending_bytes", &self.max_pending_bytes)
            .field("auth", &self.auth)
            .finish()
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

    /// Subscribes to the topic, `topic.server` and the fanout, and starts serving.
    /// When this returns, messages sent to the target reach this server.
    pub async fn start(self) -> Result<Server> {
        self.target.validate_for_listen()?;
        let budget = ByteBudget::new(self.max_pending_bytes);
        let options = ListenOptions::new(self.concurrency)
            .settle_on_receipt(self.ack_mode == AckMode::BeforeDispatch)
            .budget(budget.clone());
        let publisher = self.transport.publisher().await?;
        let consumer = self.transport.listen(&self.target, &options).await?;
        let max_message_size = self.transport.capabilities().max_message_size;
        let max_request = self.max_message_size.or(max_message_size);
        let token = CancellationToken::new();
        let serving = Serving {
            dispatcher: Arc::new(Dispatcher::new(self.endpoints)),
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
        };
        let task = tokio::spawn(serve(
            consumer,
            serving,
            self.concurrency,
            self.grace_period,
            token.clone(),
        ));
        tracing::debug!(target = %self.target, "server started");
        Ok(Server {
            target: self.target,
            token,
            task: Some(task),
        })
    }
}

/// A running server. [`Server::shutdown`] stops it gracefully; dropping it stops
/// consuming at once and lets in-flight handlers finish in the background.
#[derive(Debug)]
pub struct Server {
    target: Target,
    token: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Server {
    /// Starts configuring a server of `target` (which needs topic and server) over
    /// `transport`.
    pub fn builder(transport: Arc<dyn Transport>, target: Target) -> ServerBuilder {
        ServerBuilder {
            transport,
            target,
            endpoints: Vec::new(),
            concurrency: DEFAULT_CONCURRENCY,
            ack_mode: AckMode::default(),
            grace_period: DEFAULT_GRACE_PERIOD,
            max_message_size: None,
            max_pending_bytes: DEFAULT_MAX_PENDING_BYTES,
            auth: None,
        }
    }

    /// The target this server listens on.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Stops consuming, lets in-flight handlers finish (within the grace period; the
    /// rest are aborted), then closes the consumer.
    pub async fn shutdown(mut self) -> Result<()> {
        self.token.cancel();
        if let Some(task) = self.task.take() {
            task.await.map_err(|e| {
                Error::transport(
                    crate::error::TransportErrorKind::Other,
                    "server task failed",
                    e,
                )
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
}

async fn serve(
    mut consumer: Box<dyn Consumer>,
    serving: Serving,
    concurrency: usize,
    grace_period: Duration,
    token: CancellationToken,
) {
    // Handlers run as futures of this task, not as tasks of their own: a request
    // then costs no spawn and no cross-thread wake-up between taking it and handling
    // it. They still run concurrently; CPU-heavy handlers should move their work to
    // `spawn_blocking` (as in any async server).
    let mut running = FuturesUnordered::new();
    let mut seen = RecentIds::new(DEDUP_WINDOW);
    // The bytes of the requests handed to `running`: the part of the budget this
    // loop can free by waiting. What a consumer has read ahead and not handed out
    // is in memory already and counts in `serving.budget`; waiting for it would
    // only stall the loop behind work that is never started.
    let working = ByteBudget::new(serving.budget.limit());
    // Takes a delivery: checks and decodes it, and returns the future that runs its
    // work (or only settles it), for the running set.
    let mut start = |mut delivery: Delivery| {
        // Held until the request's work is done, so the budget counts it as long as
        // its bytes (or the arguments decoded from them) live.
        let charge = (delivery.take_charge())
            .unwrap_or_else(|| serving.budget.charge(delivery.body().len()));
        let charge = (charge, working.charge(delivery.body().len()));
        let ttl = delivery.time_to_live();
        let (body, acker) = delivery.into_parts();
        match accept(body, acker, ttl, &serving, &mut seen) {
            // A panic anywhere in a request (a handler, or an argument's `Deserialize`)
            // ends that request, never the server. Boxed: the request's future is
            // kilobytes, and a future pushed by value was copied three times on its way
            // into the set.
            Accepted::Work(work) => Either::Left(
                AssertUnwindSafe(Box::pin(work.run(serving.clone())))
                    .catch_unwind()
                    .map(move |outcome| {
                        drop(charge);
                        if outcome.is_err() {
                            tracing::error!("a request panicked outside its handler; dropped");
                        }
                    }),
            ),
            // Settling a refused message takes a slot too, so a flood of bad messages is
            // bounded like work and never stalls this loop.
            Accepted::Settle(settle) => Either::Right(settle.run().map(move |()| drop(charge))),
        }
    };
    'serving: loop {
        // Take a delivery only when a handler slot is free, so waiting work stays in
        // the broker and not in this process.
        // Likewise when the requests held use up the byte budget: a handler that
        // finishes gives its bytes back.
        while running.len() >= concurrency || (!running.is_empty() && working.is_exhausted()) {
            tokio::select! {
                biased;
                _ = token.cancelled() => break 'serving,
                _ = running.next() => {}
            }
        }
        // One receive future per delivery, kept while handlers finish beside it.
        let mut receiving = consumer.recv();
        let next = loop {
            tokio::select! {
                biased;
                _ = token.cancelled() => break 'serving,
                Some(()) = running.next(), if !running.is_empty() => {}
                next = &mut receiving => break next,
            }
        };
        drop(receiving);
        match next {
            Some(Ok(delivery)) => running.push(start(delivery)),
            Some(Err(err)) => {
                tracing::warn!(error = %err, topic = %serving.topic, "consumer reported an error");
            }
            None => {
                tracing::warn!(topic = %serving.topic, "consumer closed; server stops serving");
                break;
            }
        }
    }
    if let Err(err) = consumer.stop().await {
        tracing::warn!(error = %err, "could not stop consuming cleanly");
    }
    // Acked with the broker on receipt but not handed out yet: nobody else will get
    // them, so they run here.
    for delivery in consumer.take_settled() {
        running.push(start(delivery));
    }
    let in_flight = running.len();
    let drained = tokio::time::timeout(grace_period, async {
        while running.next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            in_flight,
            remaining = running.len(),
            ?grace_period,
            "grace period over; dropping handlers still running"
        );
        drop(running);
        tell_abandoned_callers(&serving).await;
    }
    if let Err(err) = consumer.close().await {
        tracing::warn!(error = %err, "could not close the consumer cleanly");
    }
}

/// Sends a failure to every caller whose handler the end of the grace period cut
/// off, so that none waits out its timeout for a reply that cannot come.
async fn tell_abandoned_callers(serving: &Serving) {
    let abandoned = std::mem::take(
        &mut *serving
            .abandoned
            .lock()
            .unwrap_or_else(|poison| poison.into_inner()),
    );
    if abandoned.is_empty() {
        return;
    }
    let failure = RemoteError::new(
        SERVER_SHUTDOWN_CLASS,
        "server shut down before the handler finished",
    )
    .with_module(crate::client::TRANSPORT_FAILURE_MODULE);
    let answer = Answer::failure(failure);
    let sends = abandoned.iter().map(|(msg_id, reply_to)| {
        let answer = &answer;
        async move {
            if let Err(err) = serving.replier.send(reply_to, msg_id, answer).await {
                tracing::debug!(error = %err, "could not tell a caller the server shut down");
            }
        }
    });
    let told = tokio::time::timeout(SHUTDOWN_REPLY_LIMIT, futures::future::join_all(sends)).await;
    tracing::info!(
        calls = abandoned.len(),
        all_sent = told.is_ok(),
        "told the callers of unfinished handlers that the server shut down"
    );
}

/// What to do with a delivery: run it, or only settle it.
// Lives for one `match`; boxing the work would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
enum Accepted {
    Work(Work),
    Settle(Settle),
}

/// A delivery that is not run: acked (a duplicate) or rejected for good.
struct Settle {
    acker: Box<dyn Acker>,
    ack: bool,
}

impl Settle {
    fn reject(acker: Box<dyn Acker>) -> Accepted {
        Accepted::Settle(Settle { acker, ack: false })
    }

    async fn run(self) {
        let settled = if self.ack {
            self.acker.ack().await
        } else {
            self.acker.reject(false).await
        };
        if let Err(err) = settled {
            tracing::debug!(error = %err, ack = self.ack, "could not settle a refused message");
        }
    }
}

/// Checks and decodes a delivery; returns the work to run, or how to settle it.
fn accept(
    body: Bytes,
    acker: Box<dyn Acker>,
    ttl: Option<Duration>,
    serving: &Serving,
    seen: &mut RecentIds,
) -> Accepted {
    let received = Instant::now();
    if let Some(limit) = serving.max_request.filter(|limit| body.len() > *limit) {
        // Dropped for good and never parsed: its size alone is reason enough.
        if let Some(suppressed) = serving.rejections.hit() {
            tracing::warn!(size = body.len(), limit, topic = %Escaped(&serving.topic),
                suppressed, "rejecting a request above the message size limit");
        }
        return Settle::reject(acker);
    }
    if let Some(failure) = serving
        .auth
        .as_ref()
        .and_then(|auth| auth.open(&body).err())
    {
        if let Some(suppressed) = serving.rejections.hit() {
            tracing::warn!(reason = %failure, size = body.len(), topic = %Escaped(&serving.topic),
                suppressed, "rejecting a request that fails authentication");
        }
        // A caller with a wrong key learns why instead of timing out; a replay (a
        // copy of a request already taken) gets no answer, like a duplicate. At most
        // a few refusals are on their way at once, so a flood costs no more.
        let answer = !matches!(failure, AuthFailure::Replayed);
        let permit = answer
            .then(|| serving.refusals.clone().try_acquire_owned().ok())
            .flatten();
        if let (
            Some(permit),
            Ok(Request {
                msg_id: Some(msg_id),
                reply_to: Some(reply_to),
                ..
            }),
        ) = (permit, wire::decode_request(&body))
        {
            let replier = serving.replier.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let answer = Answer::failure(refusal("request", &failure));
                if let Err(err) = replier
                    .send(&Address::Reply(reply_to), &msg_id, &answer)
                    .await
                {
                    tracing::debug!(error = %err, "could not tell the caller its request was refused");
                }
            });
        }
        return Settle::reject(acker);
    }
    let request = match wire::decode_request(&body) {
        Ok(request) => request,
        Err(err) => {
            // A poison message is dropped for good, never retried.
            if let Some(suppressed) = serving.rejections.hit() {
                tracing::warn!(size = body.len(), error = %Escaped(&err.to_string()),
                    topic = %Escaped(&serving.topic), suppressed, "rejecting malformed message");
            }
            tracing::trace!(prefix = %String::from_utf8_lossy(&body[..body.len().min(64)]),
                "malformed message prefix");
            return Settle::reject(acker);
        }
    };
    if let Some(unique_id) = &request.unique_id
        && !seen.insert(unique_id)
    {
        tracing::info!(unique_id = %Escaped(unique_id), method = %Escaped(&request.method),
            "dropping duplicate request");
        return Accepted::Settle(Settle { acker, ack: true });
    }
    // The caller waits `_expires_in` from sending; past it nobody waits for the
    // reply. A request without it (from oslo.messaging) may still carry the
    // transport's time to live (AMQP's `expiration`, the call timeout). The
    // caller's own figure goes first: a transport's may come from the caller's
    // wall clock, which need not agree with this server's.
    let expires_in = match request.expires_in {
        Some(secs) => Duration::try_from_secs_f64(secs.min(MAX_CALL_LIFETIME.as_secs_f64())).ok(),
        None => ttl,
    }
    .map(|limit| limit.min(MAX_CALL_LIFETIME));
    let deadline = expires_in.and_then(|limit| received.checked_add(limit));
    Accepted::Work(Work {
        request,
        acker,
        ack_mode: serving.ack_mode,
        deadline,
    })
}

/// One accepted request and its unsettled acker. The ack happens in the request's
/// own task (before dispatch, or after handling), never in the receiving loop, so a
/// broker round trip per ack does not serialise the server.
struct Work {
    request: Request,
    acker: Box<dyn Acker>,
    ack_mode: AckMode,
    /// When the caller stops waiting, if the request says.
    deadline: Option<Instant>,
}

impl Work {
    async fn run(self, serving: Serving) {
        let Work {
            request,
            acker,
            ack_mode,
            deadline,
        } = self;
        let acker = match ack_mode {
            _ if acker.is_noop() => None,
            AckMode::BeforeDispatch => {
                if let Err(err) = acker.ack().await {
                    tracing::warn!(error = %err, method = %Escaped(&request.method),
                        "discarding request: acknowledgement failed");
                    return;
                }
                None
            }
            AckMode::AfterHandling => Some(acker),
        };
        // A request still held by the broker goes to another server if this one stops
        // before it is handled; one already taken from the broker does not.
        let redelivered_if_dropped = acker.is_some();
        let span = tracing::debug_span!("rpc.dispatch",
            msg_id = %Escaped(request.msg_id.as_deref().unwrap_or("")),
            topic = %Escaped(&serving.topic), method = %Escaped(&request.method));
        async {
            let Request {
                method,
                args,
                namespace,
                version,
                context,
                msg_id,
                reply_to,
                call_monitor,
                ..
            } = request;
            let invocation = serving.dispatcher.dispatch(
                namespace.as_deref(),
                version.as_deref(),
                &method,
                context,
                args,
            );
            match (msg_id, reply_to) {
                (Some(msg_id), Some(reply_to)) => {
                    let reply_to = Address::Reply(reply_to);
                    let call = Call {
                        replier: &serving.replier,
                        msg_id: &msg_id,
                        reply_to: &reply_to,
                    };
                    let mut unfinished = Unfinished {
                        abandoned: &serving.abandoned,
                        msg_id: &msg_id,
                        reply_to: &reply_to,
                        armed: !redelivered_if_dropped,
                    };
                    call.answer(invocation, call_monitor, deadline).await;
                    unfinished.armed = false;
                }
                (msg_id, _) => {
                    if msg_id.is_some() {
                        tracing::warn!("call without a reply address (_reply_q); no reply sent");
                    }
                    run_cast(invocation).await;
                }
            }
            if let Some(acker) = acker
                && let Err(err) = acker.ack().await
            {
                tracing::warn!(error = %err, "could not ack handled request");
            }
        }
        .instrument(span)
        .await;
    }
}

async fn run_cast(invocation: Invocation) {
    let failure = match invocation {
        Invocation::Failed(failure) => Some(failure),
        Invocation::Unary(future) => match AssertUnwindSafe(future).catch_unwind().await {
            Ok(Ok(_)) => None,
            Ok(Err(failure)) => Some(failure),
            Err(panic) => Some(panic_failure(&*panic)),
        },
        Invocation::Stream(stream) => {
            let mut stream = AssertUnwindSafe(stream).catch_unwind();
            let mut failure = None;
            while let Some(item) = stream.next().await {
                match item {
                    Ok(Ok(_)) => {}
                    Ok(Err(f)) => {
                        failure = Some(f);
                        break;
                    }
                    Err(panic) => {
                        failure = Some(panic_failure(&*panic));
                        break;
                    }
                }
            }
            failure
        }
    };
    if let Some(failure) = failure {
        tracing::warn!(class = %Escaped(&failure.class), message = %Escaped(&failure.message),
            "cast failed");
    }
}

/// Records a call as abandoned if its work is dropped before it answered (the end
/// of the grace period drops running handlers), so its caller can be told.
struct Unfinished<'a> {
    abandoned: &'a Mutex<Vec<(String, Address)>>,
    msg_id: &'a str,
    reply_to: &'a Address,
    armed: bool,
}

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        if self.armed {
            (self.abandoned.lock())
                .unwrap_or_else(|poison| poison.into_inner())
                .push((self.msg_id.to_owned(), self.reply_to.clone()));
        }
    }
}

/// Answers one call.
struct Call<'a> {
    replier: &'a Replier,
    msg_id: &'a str,
    /// An [`Address::Reply`].
    reply_to: &'a Address,
}

impl Call<'_> {
    /// Runs the call and replies, heartbeating if asked, until it is done or its
    /// `deadline` passes: then the caller has stopped waiting, and its handler or
    /// stream is dropped unfinished.
    async fn answer(
        &self,
        invocation: Invocation,
        call_monitor: Option<f64>,
        deadline: Option<Instant>,
    ) {
        let answering = self.answer_until_done(invocation, call_monitor);
        match deadline {
            Some(deadline) => {
                if tokio::time::timeout_at(deadline, answering).await.is_err() {
                    tracing::debug!("the caller's deadline passed; the call's work stops");
                }
            }
            None => answering.await,
        }
    }

    async fn answer_until_done(&self, invocation: Invocation, call_monitor: Option<f64>) {
        let work = self.reply_all(invocation);
        let interval = call_monitor
            .filter(|t| *t >= MIN_CALL_MONITOR_SECS)
            // The value comes from the network: no panic on absurd ones, and no
            // heartbeat interval beyond a day.
            .and_then(|t| Duration::try_from_secs_f64(t / 2.0).ok())
            .map(|d| d.min(Duration::from_secs(86_400)));
        match interval {
            // Boxed: this future is stored inline in every request's future, and most
            // calls ask for no heartbeats; moving a large future costs every request.
            Some(interval) => {
                Box::pin(async move {
                    let mut work = std::pin::pin!(work);
                    tokio::select! {
                        _ = &mut work => {}
                        _ = self.heartbeats(interval) => work.await,
                    }
                })
                .await;
            }
            None => work.await,
        }
    }

    /// Sends a heartbeat every `interval`; returns only when one cannot be sent.
    async fn heartbeats(&self, interval: Duration) {
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        loop {
            ticks.tick().await;
            if let Err(err) = self
                .replier
                .send(self.reply_to, self.msg_id, &Answer::heartbeat())
                .await
            {
                tracing::debug!(error = %err, "heartbeat not delivered; heartbeats stop");
                return;
            }
        }
    }

    async fn reply_all(&self, invocation: Invocation) {
        match invocation {
            Invocation::Failed(failure) => {
                self.reply(Answer::failure(failure)).await;
            }
            Invocation::Unary(future) => {
                let reply = match AssertUnwindSafe(future).catch_unwind().await {
                    Ok(Ok(value)) => Answer::result(value),
                    Ok(Err(failure)) => Answer::failure(failure),
                    Err(panic) => {
                        tracing::error!("handler panicked; sending the failure to the caller");
                        Answer::failure(panic_failure(&*panic))
                    }
                };
                self.reply(reply).await;
            }
            // Boxed, like the heartbeats above: streams are the rarer kind.
            Invocation::Stream(stream) => Box::pin(self.reply_stream(stream)).await,
        }
    }

    async fn reply_stream(&self, stream: BoxStream<'static, Result<Value, RemoteError>>) {
        let mut stream = AssertUnwindSafe(stream).catch_unwind();
        while let Some(item) = stream.next().await {
            match item {
                Ok(Ok(Value::Null)) => {
                    tracing::warn!("streamed item is null (reads as a heartbeat); skipped");
                }
                Ok(Ok(value)) => {
                    if !self.reply(Answer::item(value)).await {
                        return;
                    }
                }
                Ok(Err(failure)) => {
                    self.reply(Answer::failure(failure)).await;
                    return;
                }
                Err(panic) => {
                    tracing::error!("streaming handler panicked; sending the failure");
                    self.reply(Answer::failure(panic_failure(&*panic))).await;
                    return;
                }
            }
        }
        self.reply(Answer::end()).await;
    }

    /// Sends a reply; a reply that cannot be delivered is logged and dropped.
    async fn reply(&self, answer: Answer) -> bool {
        match self.replier.send(self.reply_to, self.msg_id, &answer).await {
            Ok(()) => true,
            Err(err) => {
                let reply_to = match self.reply_to {
                    Address::Reply(queue) => queue.as_str(),
                    _ => "",
                };
                // A request may name any reply address: a flood of undeliverable ones
                // writes one line per interval.
                if let Some(suppressed) = self.replier.dropped.hit() {
                    tracing::warn!(error = %Escaped(&err.to_string()), reply_to = %Escaped(reply_to),
                        suppressed, "reply dropped");
                }
                false
            }
        }
    }
}

/// Encodes and publishes replies.
#[derive(Clone)]
struct Replier {
    publisher: Arc<dyn Publisher>,
    max_message_size: Option<usize>,
    auth: Option<MessageAuth>,
    /// Limits the warnings about replies that could not be sent.
    dropped: Arc<Throttle>,
}

impl Replier {
    /// Sends `answer` to the call `msg_id`; `reply_to` is an [`Address::Reply`].
    async fn send(&self, reply_to: &Address, msg_id: &str, answer: &Answer) -> Result<()> {
        let seal = |body: Vec<u8>| match &self.auth {
            Some(auth) => auth.seal(body),
            None => body,
        };
        // Sealed before the size check: the signature counts against the limit.
        let mut body = seal(wire::encode_answer(answer, msg_id)?);
        if let Some(limit) = self.max_message_size
            && body.len() > limit
        {
            // The caller learns why instead of waiting for its timeout.
            let failure = RemoteError::new(
                "MessageTooLarge",
                format!(
                    "reply of {} bytes exceeds the transport limit of {limit} bytes",
                    body.len()
                ),
            );
            body = seal(wire::encode_answer(&Answer::failure(failure), msg_id)?);
        }
        let outgoing = Outgoing {
            body: Bytes::from(body),
            time_to_live: None,
            mandatory: true,
            call: None,
        };
        let send = self.publisher.send(reply_to, outgoing);
        match tokio::time::timeout(REPLY_SEND_LIMIT, send).await {
            Ok(sent) => sent,
            Err(_) => Err(Error::transport_msg(
                crate::error::TransportErrorKind::Timeout,
                format!("reply not accepted by the transport within {REPLY_SEND_LIMIT:?}"),
            )),
        }
    }
}

/// The last `capacity` ids seen, to drop redelivered duplicates.
struct RecentIds {
    order: VecDeque<Arc<str>>,
    ids: HashSet<Arc<str>, foldhash::fast::RandomState>,
    capacity: usize,
}

impl RecentIds {
    fn new(capacity: usize) -> Self {
        RecentIds {
            order: VecDeque::with_capacity(capacity),
            ids: HashSet::with_capacity_and_hasher(capacity, Default::default()),
            capacity,
        }
    }

    /// Records `id`; false when it was already there.
    fn insert(&mut self, id: &str) -> bool {
        if self.ids.contains(id) {
            return false;
        }
        if self.order.len() == self.capacity
            && let Some(oldest) = self.order.pop_front()
        {
            self.ids.remove(&oldest);
        }
        let id: Arc<str> = Arc::from(id);
        self.order.push_back(id.clone());
        self.ids.insert(id);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::RecentIds;

    #[test]
    fn recent_ids_forget_the_oldest() {
        let mut ids = RecentIds::new(2);
        assert!(ids.insert("a"));
        assert!(!ids.insert("a"));
        assert!(ids.insert("b"));
        assert!(ids.insert("c"));
        assert!(ids.insert("a"), "a fell out of the window");
        assert!(!ids.insert("c"));
    }
}
