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
pub(crate) use live::{CallTimer, ClientMetrics, ServerMetrics};
#[cfg(not(feature = "metrics"))]
pub(crate) use off::{CallTimer, ClientMetrics, ServerMetrics};

/// The real thing: cached handles per topic, method and outcome.
#[cfg(feature = "metrics")]
mod live;

/// Without the feature: the same calls, doing nothing.
#[cfg(not(feature = "metrics"))]
mod off;

#[cfg(test)]
mod tests;
