//! The handles of clients and servers with the feature `metrics`: each records
//! into the recorder the application installed.

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

    /// A call (or multicall) of `method` starts: it counts as in flight until the
    /// timer ends.
    pub(crate) fn call(&self, method: &str) -> CallTimer {
        self.in_flight().increment(1);
        CallTimer {
            metrics: self.clone(),
            method: self.method(method),
            started: Instant::now(),
            done: false,
        }
    }

    fn record_call(&self, entry: &ClientMethod, outcome: Outcome, seconds: f64) {
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

/// One call being timed; dropped unfinished, it counts as cancelled. It owns its
/// handles, so a multicall's stream carries it until the stream ends.
pub(crate) struct CallTimer {
    metrics: ClientMetrics,
    method: Arc<ClientMethod>,
    started: Instant,
    done: bool,
}

impl CallTimer {
    /// The call ended with `result`.
    pub(crate) fn finish<T>(mut self, result: &crate::Result<T>) {
        self.end(Outcome::of(result));
    }

    fn end(&mut self, outcome: Outcome) {
        self.done = true;
        let seconds = self.started.elapsed().as_secs_f64();
        self.metrics.in_flight().decrement(1);
        self.metrics.record_call(&self.method, outcome, seconds);
    }
}

impl Drop for CallTimer {
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
        self.inner
            .active
            .get_or_init(|| ::metrics::gauge!(SERVER_REQUESTS_ACTIVE, LABEL_TOPIC => self.topic()))
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
