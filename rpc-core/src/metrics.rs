//! Metrics of clients, servers and transports through the [`metrics`] facade (Cargo
//! feature `metrics`, off by default). The library installs no recorder: an
//! application that wants the figures installs one (a Prometheus exporter, say)
//! before it creates its clients and servers, and may call [`describe`] for the
//! units and help texts. Without the feature every function here does nothing.
//!
//! Labels are bounded: topics are the application's own targets, a server counts a
//! method no endpoint of it has under [`OTHER_METHOD`], and no message id is ever a
//! label. Handles are registered once per topic, method and outcome and kept, so a
//! call does not build a metric key.
//!
//! | name | kind | unit | labels |
//! |---|---|---|---|
//! | `rpc.client.call.duration` | histogram | s | `topic`, `method`, `outcome` |
//! | `mqrpc.client.casts` | counter | | `topic`, `method`, `outcome` |
//! | `mqrpc.client.calls.in_flight` | gauge | | `topic` |
//! | `rpc.server.call.duration` | histogram | s | `topic`, `method`, `outcome` |
//! | `mqrpc.server.requests.active` | gauge | | `topic` |
//! | `mqrpc.server.slot.waits` | counter | | `topic`, `limit` |
//! | `mqrpc.server.held.bytes` | gauge | bytes | `topic` |
//! | `mqrpc.server.rejected` | counter | | `topic`, `reason` |
//! | `mqrpc.transport.reconnections` | counter | | `backend` |
//!
//! [`metrics`]: https://docs.rs/metrics

/// Client calls (one sample per `call`, its retries included), in seconds.
pub const CLIENT_CALL_DURATION: &str = "rpc.client.call.duration";
/// Casts a client sent (or failed to send).
pub const CLIENT_CASTS: &str = "mqrpc.client.casts";
/// Calls of a client waiting for their result.
pub const CLIENT_CALLS_IN_FLIGHT: &str = "mqrpc.client.calls.in_flight";
/// Requests a server handled (calls and casts), from dispatch to the last reply, in
/// seconds.
pub const SERVER_CALL_DURATION: &str = "rpc.server.call.duration";
/// Requests a server is working on (at most its concurrency).
pub const SERVER_REQUESTS_ACTIVE: &str = "mqrpc.server.requests.active";
/// Times a server stopped taking deliveries because every handler slot was busy
/// (`limit="concurrency"`) or its byte budget was used up (`limit="bytes"`): the
/// next delivery waited in the broker or the consumer.
pub const SERVER_SLOT_WAITS: &str = "mqrpc.server.slot.waits";
/// Bytes of requests a server holds ([`crate::ByteBudget::held`]).
pub const SERVER_BYTES_HELD: &str = "mqrpc.server.held.bytes";
/// Messages a server (or its consumer) dropped without running them, by reason.
pub const SERVER_REJECTED: &str = "mqrpc.server.rejected";
/// Reconnections of a transport to its broker.
pub const TRANSPORT_RECONNECTIONS: &str = "mqrpc.transport.reconnections";

/// Label: the topic of the client's target or the server's.
pub const LABEL_TOPIC: &str = "topic";
/// Label: the method called.
pub const LABEL_METHOD: &str = "method";
/// Label: how a call, cast or request ended ([`Outcome`], [`Handled`]).
pub const LABEL_OUTCOME: &str = "outcome";
/// Label: why a message was dropped ([`RejectReason`]).
pub const LABEL_REASON: &str = "reason";
/// Label: which limit made a server wait (`concurrency` or `bytes`).
pub const LABEL_LIMIT: &str = "limit";
/// Label: the transport's name ([`crate::Transport::name`]).
pub const LABEL_BACKEND: &str = "backend";
/// The `method` label of requests for a method no endpoint of the server has.
pub const OTHER_METHOD: &str = "_other";

/// At most this many methods get a label of their own per client topic; the rest
/// count under [`OTHER_METHOD`].
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
const MAX_CLIENT_METHODS: usize = 256;

/// How a client's call or cast ended: the `outcome` label of
/// [`CLIENT_CALL_DURATION`] and [`CLIENT_CASTS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// `ok`: a result (a call) or the transport took the message (a cast).
    Ok,
    /// `remote`: the server's method failed ([`crate::Error::Remote`]).
    Remote,
    /// `no_such_method`.
    NoSuchMethod,
    /// `unsupported_version`.
    UnsupportedVersion,
    /// `timeout_reply`: no final reply in time.
    TimeoutReply,
    /// `timeout_call_monitor`: the server stayed silent for the call monitor.
    TimeoutCallMonitor,
    /// `timeout_publish`: the broker did not take the request in time.
    TimeoutPublish,
    /// `no_responders`: nothing listened, or the broker could not route it.
    NoResponders,
    /// `authentication`: message authentication refused the request or its reply.
    Authentication,
    /// `transport`: the broker or the connection failed.
    Transport,
    /// `codec`: a message or result did not decode.
    Codec,
    /// `invalid_input`: arguments, size or target that cannot be sent.
    InvalidInput,
    /// `closed`: the client or transport was closed.
    Closed,
    /// `cancelled`: the caller dropped the call before it ended.
    Cancelled,
    /// `other`.
    Other,
}

impl Outcome {
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    const ALL: usize = 15;

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Remote => "remote",
            Outcome::NoSuchMethod => "no_such_method",
            Outcome::UnsupportedVersion => "unsupported_version",
            Outcome::TimeoutReply => "timeout_reply",
            Outcome::TimeoutCallMonitor => "timeout_call_monitor",
            Outcome::TimeoutPublish => "timeout_publish",
            Outcome::NoResponders => "no_responders",
            Outcome::Authentication => "authentication",
            Outcome::Transport => "transport",
            Outcome::Codec => "codec",
            Outcome::InvalidInput => "invalid_input",
            Outcome::Closed => "closed",
            Outcome::Cancelled => "cancelled",
            Outcome::Other => "other",
        }
    }

    /// The outcome of a call or cast that ended with `result`.
    pub fn of<T>(result: &crate::Result<T>) -> Outcome {
        match result {
            Ok(_) => Outcome::Ok,
            Err(err) => Outcome::of_error(err),
        }
    }

    /// The outcome of a call or cast that failed with `err`.
    pub fn of_error(err: &crate::Error) -> Outcome {
        use crate::error::{Error, TimeoutKind};
        match err {
            Error::Remote(_) => Outcome::Remote,
            Error::NoSuchMethod { .. } => Outcome::NoSuchMethod,
            Error::UnsupportedVersion { .. } => Outcome::UnsupportedVersion,
            Error::Timeout { kind, .. } => match kind {
                TimeoutKind::Reply => Outcome::TimeoutReply,
                TimeoutKind::CallMonitor => Outcome::TimeoutCallMonitor,
                TimeoutKind::Publish => Outcome::TimeoutPublish,
            },
            Error::NoResponders { .. } | Error::Undeliverable { .. } => Outcome::NoResponders,
            Error::Authentication(_) => Outcome::Authentication,
            Error::Transport { .. } => Outcome::Transport,
            Error::Codec(_) => Outcome::Codec,
            Error::InvalidTarget(_)
            | Error::InvalidArguments(_)
            | Error::MessageTooLarge { .. }
            | Error::VersionCap { .. }
            | Error::Unsupported(_) => Outcome::InvalidInput,
            Error::Closed => Outcome::Closed,
            _ => Outcome::Other,
        }
    }
}

/// How a server's request ended: the `outcome` label of [`SERVER_CALL_DURATION`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Handled {
    /// `ok`: the handler returned (or its stream ended) without a failure.
    Ok,
    /// `error`: the handler failed, or its arguments did not decode.
    Error,
    /// `panic`: the handler panicked.
    Panic,
    /// `no_such_method`: no endpoint serving the version has the method.
    NoSuchMethod,
    /// `unsupported_version`: no endpoint serves the namespace and version.
    UnsupportedVersion,
    /// `deadline`: the caller's deadline passed first; the work was dropped.
    Deadline,
    /// `cancelled`: the server stopped before the request was done.
    Cancelled,
}

impl Handled {
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    const ALL: usize = 7;

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Handled::Ok => "ok",
            Handled::Error => "error",
            Handled::Panic => "panic",
            Handled::NoSuchMethod => "no_such_method",
            Handled::UnsupportedVersion => "unsupported_version",
            Handled::Deadline => "deadline",
            Handled::Cancelled => "cancelled",
        }
    }

    /// The outcome of a request no endpoint serves.
    pub(crate) fn not_served(failure: &crate::dispatch_failure::DispatchFailure) -> Self {
        use crate::dispatch_failure::DispatchFailure;
        match failure {
            DispatchFailure::NoSuchMethod { .. } => Handled::NoSuchMethod,
            DispatchFailure::UnsupportedVersion { .. } => Handled::UnsupportedVersion,
        }
    }
}

/// Why a message was dropped without being run: the `reason` label of
/// [`SERVER_REJECTED`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RejectReason {
    /// `too_large`: above the server's message size limit.
    TooLarge,
    /// `unsigned`: message authentication is on and the request is not signed.
    Unsigned,
    /// `forged`: a malformed signature, an unknown key or a MAC that did not verify.
    Forged,
    /// `stale`: signed outside the freshness window.
    Stale,
    /// `replayed`: a signature seen before.
    Replayed,
    /// `malformed`: not a request of the wire format.
    Malformed,
    /// `duplicate`: a copy of a request already taken (acknowledged, not run).
    Duplicate,
    /// `over_budget`: dropped by an at-most-once consumer (core NATS) because the
    /// byte budget was used up.
    OverBudget,
    /// `queue_full`: dropped by an at-most-once consumer because its queue was full.
    QueueFull,
}

impl RejectReason {
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    const ALL: usize = 9;

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::TooLarge => "too_large",
            RejectReason::Unsigned => "unsigned",
            RejectReason::Forged => "forged",
            RejectReason::Stale => "stale",
            RejectReason::Replayed => "replayed",
            RejectReason::Malformed => "malformed",
            RejectReason::Duplicate => "duplicate",
            RejectReason::OverBudget => "over_budget",
            RejectReason::QueueFull => "queue_full",
        }
    }

    /// The reason for a request that failed message authentication.
    pub(crate) fn of_auth(failure: &crate::AuthFailure) -> Self {
        use crate::AuthFailure;
        match failure {
            AuthFailure::Unsigned => RejectReason::Unsigned,
            AuthFailure::Stale(_) => RejectReason::Stale,
            AuthFailure::Replayed => RejectReason::Replayed,
            _ => RejectReason::Forged,
        }
    }
}

/// Which limit made a server wait before it took the next delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SlotLimit {
    /// Every handler slot was busy.
    Concurrency,
    /// The byte budget was used up.
    Bytes,
}

impl SlotLimit {
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    fn as_str(self) -> &'static str {
        match self {
            SlotLimit::Concurrency => "concurrency",
            SlotLimit::Bytes => "bytes",
        }
    }
}

/// Registers the unit and help text of every metric with the installed recorder.
/// Call it after installing one; without the feature it does nothing.
pub fn describe() {
    #[cfg(feature = "metrics")]
    live::describe();
}

/// Counts a reconnection of a `backend` transport to its broker (for backends: call
/// it once the connection is back).
pub fn reconnected(backend: &'static str) {
    #[cfg(feature = "metrics")]
    ::metrics::counter!(TRANSPORT_RECONNECTIONS, LABEL_BACKEND => backend).increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = backend;
}

/// The count of messages of one topic that a consumer dropped for one reason (for
/// at-most-once consumers that drop messages before the server sees them). Make it
/// once, count with [`RejectionCounter::increment`].
#[derive(Clone)]
pub struct RejectionCounter {
    #[cfg(feature = "metrics")]
    counter: ::metrics::Counter,
}

impl RejectionCounter {
    /// The counter of `reason` for `topic`.
    pub fn new(topic: &str, reason: RejectReason) -> Self {
        #[cfg(not(feature = "metrics"))]
        let _ = (topic, reason);
        RejectionCounter {
            #[cfg(feature = "metrics")]
            counter: ::metrics::counter!(SERVER_REJECTED,
                LABEL_TOPIC => topic.to_owned(), LABEL_REASON => reason.as_str()),
        }
    }

    /// Counts one message.
    pub fn increment(&self) {
        #[cfg(feature = "metrics")]
        self.counter.increment(1);
    }
}

impl std::fmt::Debug for RejectionCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RejectionCounter").finish_non_exhaustive()
    }
}

#[cfg(feature = "metrics")]
pub(crate) use live::{ClientMetrics, ServerMetrics};
#[cfg(not(feature = "metrics"))]
pub(crate) use off::{ClientMetrics, ServerMetrics};

/// The real thing: cached handles per topic, method and outcome.
#[cfg(feature = "metrics")]
mod live {
    use std::collections::HashMap;
    use std::sync::{Arc, OnceLock};
    use std::time::Instant;

    use ::metrics::{Counter, Gauge, Histogram, SharedString, Unit};
    use dashmap::DashMap;

    use super::*;
    use crate::budget::ByteBudget;

    pub(super) fn describe() {
        ::metrics::describe_histogram!(
            CLIENT_CALL_DURATION,
            Unit::Seconds,
            "Duration of client calls, retries included, by topic, method and outcome"
        );
        ::metrics::describe_counter!(
            CLIENT_CASTS,
            Unit::Count,
            "Casts sent by clients, by topic, method and outcome"
        );
        ::metrics::describe_gauge!(
            CLIENT_CALLS_IN_FLIGHT,
            Unit::Count,
            "Client calls waiting for their result, by topic"
        );
        ::metrics::describe_histogram!(
            SERVER_CALL_DURATION,
            Unit::Seconds,
            "Duration of requests handled by servers (calls and casts), by topic, method and outcome"
        );
        ::metrics::describe_gauge!(
            SERVER_REQUESTS_ACTIVE,
            Unit::Count,
            "Requests a server is working on, by topic"
        );
        ::metrics::describe_counter!(
            SERVER_SLOT_WAITS,
            Unit::Count,
            "Times a server waited for a free handler slot or byte budget before taking the next delivery"
        );
        ::metrics::describe_gauge!(
            SERVER_BYTES_HELD,
            Unit::Bytes,
            "Bytes of requests a server holds (its byte budget in use), by topic"
        );
        ::metrics::describe_counter!(
            SERVER_REJECTED,
            Unit::Count,
            "Messages dropped without being run, by topic and reason"
        );
        ::metrics::describe_counter!(
            TRANSPORT_RECONNECTIONS,
            Unit::Count,
            "Reconnections of transports to their broker, by backend"
        );
    }

    fn slots<T, const N: usize>() -> [OnceLock<T>; N] {
        std::array::from_fn(|_| OnceLock::new())
    }

    /// A client's metrics for its target's topic. Clones share the handles.
    #[derive(Clone)]
    pub(crate) struct ClientMetrics {
        topic: Arc<ClientTopic>,
    }

    struct ClientTopic {
        name: Arc<str>,
        in_flight: OnceLock<Gauge>,
        methods: DashMap<Box<str>, Arc<ClientMethod>, foldhash::fast::RandomState>,
    }

    struct ClientMethod {
        name: SharedString,
        calls: [OnceLock<Histogram>; Outcome::ALL],
        casts: [OnceLock<Counter>; Outcome::ALL],
    }

    impl ClientMetrics {
        pub(crate) fn for_topic(topic: &str) -> Self {
            ClientMetrics {
                topic: Arc::new(ClientTopic {
                    name: Arc::from(topic),
                    in_flight: OnceLock::new(),
                    methods: DashMap::default(),
                }),
            }
        }

        /// Follows a change of the target's topic.
        pub(crate) fn follow(&mut self, topic: &str) {
            if &*self.topic.name != topic {
                *self = ClientMetrics::for_topic(topic);
            }
        }

        fn topic_label(&self) -> SharedString {
            SharedString::from(self.topic.name.clone())
        }

        fn in_flight(&self) -> &Gauge {
            self.topic.in_flight.get_or_init(
                || ::metrics::gauge!(CLIENT_CALLS_IN_FLIGHT, LABEL_TOPIC => self.topic_label()),
            )
        }

        fn method(&self, method: &str) -> Arc<ClientMethod> {
            if let Some(known) = self.topic.methods.get(method) {
                return known.clone();
            }
            let name = if self.topic.methods.len() < MAX_CLIENT_METHODS {
                method
            } else {
                OTHER_METHOD
            };
            self.topic
                .methods
                .entry(name.into())
                .or_insert_with(|| {
                    Arc::new(ClientMethod {
                        name: SharedString::from(name.to_owned()),
                        calls: slots(),
                        casts: slots(),
                    })
                })
                .clone()
        }

        /// A call of `method` starts: it counts as in flight until the timer ends.
        pub(crate) fn call<'a>(&'a self, method: &'a str) -> CallTimer<'a> {
            self.in_flight().increment(1);
            CallTimer {
                metrics: self,
                method,
                started: Instant::now(),
                done: false,
            }
        }

        fn record_call(&self, method: &str, outcome: Outcome, seconds: f64) {
            let entry = self.method(method);
            entry.calls[outcome as usize]
                .get_or_init(|| {
                    ::metrics::histogram!(CLIENT_CALL_DURATION,
                        LABEL_TOPIC => self.topic_label(),
                        LABEL_METHOD => entry.name.clone(),
                        LABEL_OUTCOME => outcome.as_str())
                })
                .record(seconds);
        }

        /// A cast of `method` was sent (or failed to be).
        pub(crate) fn cast_sent(&self, method: &str, result: &crate::Result<()>) {
            let outcome = Outcome::of(result);
            let entry = self.method(method);
            entry.casts[outcome as usize]
                .get_or_init(|| {
                    ::metrics::counter!(CLIENT_CASTS,
                        LABEL_TOPIC => self.topic_label(),
                        LABEL_METHOD => entry.name.clone(),
                        LABEL_OUTCOME => outcome.as_str())
                })
                .increment(1);
        }
    }

    /// One call being timed; dropped unfinished, it counts as cancelled.
    pub(crate) struct CallTimer<'a> {
        metrics: &'a ClientMetrics,
        method: &'a str,
        started: Instant,
        done: bool,
    }

    impl CallTimer<'_> {
        /// The call ended with `result`.
        pub(crate) fn finish<T>(mut self, result: &crate::Result<T>) {
            self.end(Outcome::of(result));
        }

        fn end(&mut self, outcome: Outcome) {
            self.done = true;
            let seconds = self.started.elapsed().as_secs_f64();
            self.metrics.in_flight().decrement(1);
            self.metrics.record_call(self.method, outcome, seconds);
        }
    }

    impl Drop for CallTimer<'_> {
        fn drop(&mut self) {
            if !self.done {
                self.end(Outcome::Cancelled);
            }
        }
    }

    /// A server's metrics for its topic. Clones share the handles (one `Arc`: the
    /// server clones it per request).
    #[derive(Clone)]
    pub(crate) struct ServerMetrics {
        inner: Arc<ServerInner>,
    }

    struct ServerInner {
        budget: ByteBudget,
        topic: SharedString,
        /// The methods some endpoint has; every other name is [`OTHER_METHOD`].
        methods: HashMap<Box<str>, ServerMethod, foldhash::fast::RandomState>,
        other: ServerMethod,
        rejected: [OnceLock<Counter>; RejectReason::ALL],
        slot_waits: [OnceLock<Counter>; 2],
        active: OnceLock<Gauge>,
        bytes_held: OnceLock<Gauge>,
    }

    struct ServerMethod {
        name: SharedString,
        handled: [OnceLock<Histogram>; Handled::ALL],
    }

    impl ServerMethod {
        fn new(name: &str) -> Self {
            ServerMethod {
                name: SharedString::from(name.to_owned()),
                handled: slots(),
            }
        }
    }

    impl ServerMetrics {
        /// The metrics of a server of `topic` whose endpoints have `methods`, holding
        /// its requests' bytes in `budget`.
        pub(crate) fn new<'a>(
            topic: &str,
            methods: impl IntoIterator<Item = &'a str>,
            budget: ByteBudget,
        ) -> Self {
            let methods = methods
                .into_iter()
                // Never dispatched: counted as any other unknown name.
                .filter(|name| !name.starts_with('_'))
                .map(|name| (Box::from(name), ServerMethod::new(name)))
                .collect();
            ServerMetrics {
                inner: Arc::new(ServerInner {
                    budget,
                    topic: SharedString::from(topic.to_owned()),
                    methods,
                    other: ServerMethod::new(OTHER_METHOD),
                    rejected: slots(),
                    slot_waits: slots(),
                    active: OnceLock::new(),
                    bytes_held: OnceLock::new(),
                }),
            }
        }

        fn topic(&self) -> SharedString {
            self.inner.topic.clone()
        }

        /// A request for `method` starts being handled.
        pub(crate) fn handling(&self, method: &str) -> HandlerTimer<'_> {
            HandlerTimer {
                method: self.inner.methods.get(method).unwrap_or(&self.inner.other),
                metrics: self,
                started: Instant::now(),
                done: false,
            }
        }

        /// A message was dropped without being run.
        pub(crate) fn rejected(&self, reason: RejectReason) {
            self.inner.rejected[reason as usize]
                .get_or_init(|| {
                    ::metrics::counter!(SERVER_REJECTED,
                        LABEL_TOPIC => self.topic(), LABEL_REASON => reason.as_str())
                })
                .increment(1);
        }

        /// The serving loop waits for `limit` before it takes the next delivery.
        pub(crate) fn slot_wait(&self, limit: SlotLimit) {
            self.inner.slot_waits[limit as usize]
                .get_or_init(|| {
                    ::metrics::counter!(SERVER_SLOT_WAITS,
                        LABEL_TOPIC => self.topic(), LABEL_LIMIT => limit.as_str())
                })
                .increment(1);
        }

        fn active(&self) -> &Gauge {
            self.inner.active.get_or_init(
                || ::metrics::gauge!(SERVER_REQUESTS_ACTIVE, LABEL_TOPIC => self.topic()),
            )
        }

        fn bytes_held(&self) {
            self.inner
                .bytes_held
                .get_or_init(|| ::metrics::gauge!(SERVER_BYTES_HELD, LABEL_TOPIC => self.topic()))
                .set(self.inner.budget.held() as f64);
        }

        /// A delivery was taken (its bytes charged): it is active until the guard
        /// drops, after its charge.
        pub(crate) fn request_started(&self) -> RequestGuard {
            self.active().increment(1);
            self.bytes_held();
            RequestGuard {
                metrics: self.clone(),
            }
        }
    }

    /// A request the server holds; dropping it (after its charge) updates the
    /// active requests and the bytes held.
    pub(crate) struct RequestGuard {
        metrics: ServerMetrics,
    }

    impl Drop for RequestGuard {
        fn drop(&mut self) {
            self.metrics.active().decrement(1);
            self.metrics.bytes_held();
        }
    }

    /// One request being handled; dropped unfinished, it counts as cancelled.
    pub(crate) struct HandlerTimer<'a> {
        metrics: &'a ServerMetrics,
        method: &'a ServerMethod,
        started: Instant,
        done: bool,
    }

    impl HandlerTimer<'_> {
        /// The request ended as `handled`.
        pub(crate) fn finish(mut self, handled: Handled) {
            self.end(handled);
        }

        fn end(&mut self, handled: Handled) {
            self.done = true;
            let seconds = self.started.elapsed().as_secs_f64();
            let method = self.method;
            method.handled[handled as usize]
                .get_or_init(|| {
                    ::metrics::histogram!(SERVER_CALL_DURATION,
                        LABEL_TOPIC => self.metrics.topic(),
                        LABEL_METHOD => method.name.clone(),
                        LABEL_OUTCOME => handled.as_str())
                })
                .record(seconds);
        }
    }

    impl Drop for HandlerTimer<'_> {
        fn drop(&mut self) {
            if !self.done {
                self.end(Handled::Cancelled);
            }
        }
    }
}

/// Without the feature: the same calls, doing nothing.
#[cfg(not(feature = "metrics"))]
mod off {
    use super::{Handled, RejectReason, SlotLimit};
    use crate::budget::ByteBudget;

    #[derive(Clone)]
    pub(crate) struct ClientMetrics;

    impl ClientMetrics {
        pub(crate) fn for_topic(_topic: &str) -> Self {
            ClientMetrics
        }

        pub(crate) fn follow(&mut self, _topic: &str) {}

        pub(crate) fn call<'a>(&'a self, _method: &'a str) -> CallTimer<'a> {
            CallTimer(std::marker::PhantomData)
        }

        pub(crate) fn cast_sent(&self, _method: &str, _result: &crate::Result<()>) {}
    }

    pub(crate) struct CallTimer<'a>(std::marker::PhantomData<&'a ()>);

    impl CallTimer<'_> {
        pub(crate) fn finish<T>(self, _result: &crate::Result<T>) {}
    }

    #[derive(Clone)]
    pub(crate) struct ServerMetrics;

    impl ServerMetrics {
        pub(crate) fn new<'a>(
            _topic: &str,
            _methods: impl IntoIterator<Item = &'a str>,
            _budget: ByteBudget,
        ) -> Self {
            ServerMetrics
        }

        pub(crate) fn handling(&self, _method: &str) -> HandlerTimer<'_> {
            HandlerTimer(std::marker::PhantomData)
        }

        pub(crate) fn rejected(&self, _reason: RejectReason) {}

        pub(crate) fn slot_wait(&self, _limit: SlotLimit) {}

        pub(crate) fn request_started(&self) -> RequestGuard {
            RequestGuard
        }
    }

    pub(crate) struct RequestGuard;

    pub(crate) struct HandlerTimer<'a>(std::marker::PhantomData<&'a ()>);

    impl HandlerTimer<'_> {
        pub(crate) fn finish(self, _handled: Handled) {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{Error, RemoteError, TimeoutKind, TransportErrorKind};

    fn timeout(kind: TimeoutKind) -> Error {
        Error::Timeout {
            msg_id: "m".into(),
            topic: "t".into(),
            broker: "b".into(),
            waited: std::time::Duration::ZERO,
            kind,
        }
    }

    #[test]
    fn every_error_has_a_bounded_outcome() {
        let cases = [
            (Ok(()), "ok"),
            (
                Err(Error::Remote(Box::new(RemoteError::new("ValueError", "x")))),
                "remote",
            ),
            (
                Err(Error::NoSuchMethod { method: "m".into() }),
                "no_such_method",
            ),
            (Err(timeout(TimeoutKind::Reply)), "timeout_reply"),
            (
                Err(timeout(TimeoutKind::CallMonitor)),
                "timeout_call_monitor",
            ),
            (Err(timeout(TimeoutKind::Publish)), "timeout_publish"),
            (
                Err(Error::transport_msg(TransportErrorKind::Refused, "no")),
                "transport",
            ),
            (
                Err(Error::NoResponders {
                    address: "a".into(),
                }),
                "no_responders",
            ),
            (Err(Error::Closed), "closed"),
            (Err(Error::InvalidUrl("u".into())), "other"),
        ];
        for (result, label) in cases {
            assert_eq!(Outcome::of(&result).as_str(), label, "{result:?}");
        }
    }

    #[test]
    fn rejections_of_authentication_name_the_failure_not_the_key() {
        use crate::AuthFailure;
        assert_eq!(
            RejectReason::of_auth(&AuthFailure::Unsigned).as_str(),
            "unsigned"
        );
        assert_eq!(
            RejectReason::of_auth(&AuthFailure::Stale(5)).as_str(),
            "stale"
        );
        assert_eq!(
            RejectReason::of_auth(&AuthFailure::Replayed).as_str(),
            "replayed"
        );
        // The key id comes from the network: it never becomes a label value.
        let unknown = AuthFailure::UnknownKey("attacker-chosen".into());
        assert_eq!(RejectReason::of_auth(&unknown).as_str(), "forged");
    }
}
