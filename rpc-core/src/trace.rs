//! The spans of requests, on the client and on the server, and the W3C trace context
//! that links them across the broker.
//!
//! Every backend gets the same spans: they are made here, around the generic
//! algorithm, and the trace context travels inside the request's context, so no
//! backend needs headers of its own. Their names and attributes are in
//! `docs/observability.md`.
//!
//! With the feature `otel` the spans are at level INFO and carry the OpenTelemetry
//! semantic-convention fields that `tracing-opentelemetry` turns into span kind,
//! name, status and attributes; the client writes the current span's trace context
//! into each request as the context keys `traceparent` and `tracestate` (on the wire
//! `_context_traceparent`, `_context_tracestate`: where the oslo.messaging
//! instrumentation for Python puts them), and the server makes the caller's span the
//! parent of its own. Nothing is exported unless the application installs a
//! `tracing-opentelemetry` layer with an exporter. Without the feature the same spans
//! exist at level DEBUG for logs, and nothing is written into requests.

use std::fmt;

use tracing::Span;

use crate::context::Context;
use crate::logs::Escaped;

/// The context key of the W3C `traceparent`.
pub const TRACEPARENT: &str = "traceparent";
/// The context key of the W3C `tracestate`.
pub const TRACESTATE: &str = "tracestate";

/// The level of the request spans: INFO when they are meant for a trace exporter.
const LEVEL: tracing::Level = if cfg!(feature = "otel") {
    tracing::Level::INFO
} else {
    tracing::Level::DEBUG
};

/// `messaging.system` and `rpc.system.name` of every span.
const RPC_SYSTEM: &str = "oslo_messaging";

/// What a client span does; its `messaging.operation.name`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Operation {
    Call,
    Multicall,
    Cast,
    Discover,
}

impl Operation {
    fn as_str(self) -> &'static str {
        match self {
            Operation::Call => "call",
            Operation::Multicall => "multicall",
            Operation::Cast => "cast",
            Operation::Discover => "discover",
        }
    }

    /// A cast is a message sent; the others wait for answers as RPC clients.
    fn kind(self) -> &'static str {
        match self {
            Operation::Cast => "producer",
            _ => "client",
        }
    }
}

/// `<namespace.>method operation`: the span name, as the Python instrumentation
/// names its spans, formatted only when the span is enabled. A server's names come
/// from the network, hence escaped as in logs.
struct SpanName<'a> {
    namespace: Option<&'a str>,
    method: &'a str,
    operation: &'static str,
}

impl fmt::Display for SpanName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(namespace) = self.namespace {
            write!(f, "{}.", Escaped(namespace))?;
        }
        write!(f, "{} {}", Escaped(self.method), self.operation)
    }
}

/// The broker named as OpenTelemetry's `messaging.system` values name them.
fn messaging_system(backend: &'static str) -> &'static str {
    match backend {
        "amqp" => "rabbitmq",
        other => other,
    }
}

/// What a client span is about.
pub(crate) struct ClientRequest<'a> {
    pub(crate) operation: Operation,
    pub(crate) backend: &'static str,
    pub(crate) topic: &'a str,
    /// The server of a directed request.
    pub(crate) server: Option<&'a str>,
    pub(crate) fanout: bool,
    pub(crate) namespace: Option<&'a str>,
    pub(crate) method: &'a str,
}

/// The span of one request sent: a call (with its wait for the reply), the sending
/// of a multicall, a cast.
pub(crate) fn client_span(request: &ClientRequest<'_>) -> Span {
    let operation = request.operation;
    let name = SpanName {
        namespace: request.namespace,
        method: request.method,
        operation: operation.as_str(),
    };
    tracing::span!(LEVEL, "rpc.request",
        otel.name = %name,
        otel.kind = operation.kind(),
        otel.status_code = tracing::field::Empty,
        messaging.system = messaging_system(request.backend),
        messaging.destination.name = request.topic,
        messaging.operation.type = "send",
        messaging.operation.name = operation.as_str(),
        messaging.message.id = tracing::field::Empty,
        rpc.system.name = RPC_SYSTEM,
        rpc.method = request.method,
        mqrpc.namespace = request.namespace,
        mqrpc.server = request.server,
        mqrpc.fanout = request.fanout.then_some(true),
        error.type = tracing::field::Empty,
    )
}

/// Records the id of the request being sent in the current span.
pub(crate) fn record_message_id(msg_id: &str) {
    Span::current().record("messaging.message.id", msg_id);
}

/// Marks `span` failed, with `error_type` as its `error.type`.
pub(crate) fn record_error(span: &Span, error_type: &str) {
    span.record("error.type", error_type);
    span.record("otel.status_code", "error");
}

/// What a server span is about.
pub(crate) struct ServerRequest<'a> {
    pub(crate) backend: &'static str,
    pub(crate) topic: &'a str,
    pub(crate) namespace: Option<&'a str>,
    pub(crate) method: &'a str,
    /// The call's `_msg_id`, or the cast's `_unique_id`.
    pub(crate) message_id: Option<&'a str>,
    pub(crate) call: bool,
    pub(crate) context: &'a Context,
}

/// The span of one request handled, a child of the caller's span when the request
/// carries its trace context.
pub(crate) fn server_span(request: &ServerRequest<'_>) -> Span {
    let name = SpanName {
        namespace: request.namespace,
        method: request.method,
        operation: "process",
    };
    let span = tracing::span!(LEVEL, "rpc.dispatch",
        otel.name = %name,
        otel.kind = if request.call { "server" } else { "consumer" },
        otel.status_code = tracing::field::Empty,
        messaging.system = messaging_system(request.backend),
        messaging.destination.name = request.topic,
        messaging.operation.type = "process",
        messaging.operation.name = "process",
        messaging.message.id = request.message_id.map(|id| display(Escaped(id))),
        rpc.system.name = RPC_SYSTEM,
        rpc.method = %Escaped(request.method),
        mqrpc.namespace = request.namespace.map(|ns| display(Escaped(ns))),
        error.type = tracing::field::Empty,
    );
    #[cfg(feature = "otel")]
    otel::adopt_parent(&span, request.context);
    #[cfg(not(feature = "otel"))]
    let _ = request.context;
    span
}

/// The trace context to write into a request: that of the current span.
#[derive(Debug, Default)]
pub(crate) struct TraceHeaders {
    /// `(key, value)` pairs; empty values are left out, as Python leaves them out.
    #[cfg(feature = "otel")]
    pairs: Vec<(String, String)>,
}

impl TraceHeaders {
    /// The current span's trace context; empty without the feature or without an
    /// OpenTelemetry layer.
    pub(crate) fn current() -> Self {
        #[cfg(feature = "otel")]
        {
            otel::inject_current()
        }
        #[cfg(not(feature = "otel"))]
        {
            TraceHeaders {}
        }
    }

    /// The pairs to write as context members, after the context's own keys of other
    /// names.
    pub(crate) fn pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        #[cfg(feature = "otel")]
        {
            self.pairs.iter().map(|(k, v)| (k.as_str(), v.as_str()))
        }
        #[cfg(not(feature = "otel"))]
        {
            std::iter::empty()
        }
    }

    /// Whether the context's own key `key` gives way to a value written here.
    pub(crate) fn replaces(&self, key: &str) -> bool {
        self.pairs().any(|(k, _)| k == key)
    }

    /// Headers holding `pairs`, as a test writes them.
    #[cfg(all(test, feature = "otel"))]
    pub(crate) fn from_pairs(pairs: &[(&str, &str)]) -> Self {
        use opentelemetry::propagation::Injector;
        let mut headers = TraceHeaders::default();
        for (key, value) in pairs {
            headers.set(key, (*value).to_owned());
        }
        headers
    }

    /// Whether there is nothing to write.
    pub(crate) fn is_empty(&self) -> bool {
        self.pairs().next().is_none()
    }
}

#[cfg(feature = "otel")]
mod otel {
    use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
    use opentelemetry::trace::TraceContextExt;
    use opentelemetry_sdk::propagation::TraceContextPropagator;
    use tracing::Span;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    use super::TraceHeaders;
    use crate::context::Context;

    impl Injector for TraceHeaders {
        fn set(&mut self, key: &str, value: String) {
            if !value.is_empty() {
                self.pairs.push((key.to_owned(), value));
            }
        }
    }

    pub(super) fn inject_current() -> TraceHeaders {
        let mut headers = TraceHeaders::default();
        let span = Span::current();
        if span.is_disabled() {
            return headers;
        }
        let cx = span.context();
        if cx.span().span_context().is_valid() {
            TraceContextPropagator::new().inject_context(&cx, &mut headers);
        }
        headers
    }

    /// The request context as the propagator reads it: string values only.
    struct ContextCarrier<'a>(&'a Context);

    impl Extractor for ContextCarrier<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.get(key).and_then(|value| value.as_str())
        }

        fn keys(&self) -> Vec<&str> {
            self.0.iter().map(|(key, _)| key.as_str()).collect()
        }
    }

    pub(super) fn adopt_parent(span: &Span, context: &Context) {
        if span.is_disabled() || context.get(super::TRACEPARENT).is_none() {
            return;
        }
        let parent = TraceContextPropagator::new().extract(&ContextCarrier(context));
        if parent.span().span_context().is_valid() {
            // Without an OpenTelemetry layer there is nothing to link.
            let _ = span.set_parent(parent);
        }
    }
}
