//! Tracing (feature `otel`, issue #26 part 1) that every backend must do alike: a
//! call, a multicall, a cast and a fanout cast each produce a client span and server
//! spans that are its children in the same trace, with the semantic-convention
//! attributes; a remote error marks both spans.
//!
//! Spans go to an in-memory exporter through a `tracing-opentelemetry` layer that is
//! the default subscriber of the case's thread only, so the other cases of the binary
//! (running at the same time on threads of their own) send no trace context. These
//! cases therefore run on a current-thread runtime: every task of the case, servers
//! included, runs on the thread that sees the layer.
//!
//! `tracing` caches at each span's call site whether any subscriber wants it. A call
//! site first reached by another test while this thread's subscriber was being
//! registered can keep "nobody" until the cache is rebuilt, so a case first makes
//! sure its layer sees the request spans (on the memory bus, whose spans are made by
//! the same call sites as every backend's) and only then starts.

use std::time::Duration;

use futures::StreamExt;
use mqrpc::{Client, Context, Error};
use opentelemetry::trace::{SpanKind, Status, TracerProvider as _};
use opentelemetry::{KeyValue, Value as OtelValue};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use serde_json::{Value, json};
use tracing::Instrument;
use tracing::subscriber::DefaultGuard;
use tracing_subscriber::layer::SubscriberExt;

use super::{ARRIVAL, Backend, Fixture, SETTLE, ctx};

/// The spans of one case (and of the tracing interop tests with Python).
pub(crate) struct Traced {
    exporter: InMemorySpanExporter,
    provider: SdkTracerProvider,
    _default: DefaultGuard,
}

impl Traced {
    /// Installs the layer as this thread's default subscriber, once it sees the
    /// spans of a call and of its handling.
    pub(crate) async fn install() -> Self {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("conformance"));
        let subscriber = tracing_subscriber::registry().with(layer);
        let default = tracing::subscriber::set_default(subscriber);
        let traced = Traced {
            exporter,
            provider,
            _default: default,
        };
        traced.see_request_spans().await;
        traced
    }

    /// Calls on the memory bus until this layer has the call's two spans (rebuilding
    /// `tracing`'s call-site cache before each try), then forgets them.
    async fn see_request_spans(&self) {
        let transport: std::sync::Arc<dyn mqrpc::Transport> =
            std::sync::Arc::new(mqrpc::MemoryTransport::new());
        let endpoint = mqrpc::Endpoint::new()
            .method("warm_up", |_ctx: Context, _args: mqrpc::NoArgs| async {
                Ok::<_, mqrpc::RemoteError>(())
            });
        let server = mqrpc::Server::builder(
            transport.clone(),
            mqrpc::Target::new("warm_up").server("w1"),
        )
        .endpoint(endpoint)
        .start()
        .await
        .expect("warm-up server");
        let client = Client::new(transport, mqrpc::Target::new("warm_up"));
        let mut seen = false;
        for _ in 0..50 {
            tracing::callsite::rebuild_interest_cache();
            let () = client
                .call(&ctx(), "warm_up", mqrpc::NoArgs {})
                .await
                .expect("warm-up call");
            let names: Vec<String> = self.names();
            if names.iter().any(|n| n == "warm_up call")
                && names.iter().any(|n| n == "warm_up process")
            {
                seen = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        server.shutdown().await.expect("warm-up server stops");
        assert!(
            seen,
            "the layer never saw the request spans: {:?}",
            self.names()
        );
        self.exporter.reset();
    }

    fn finished(&self) -> Vec<SpanData> {
        let _ = self.provider.force_flush();
        self.exporter.get_finished_spans().expect("finished spans")
    }

    /// Waits until `count` finished spans are named `name`; returns them.
    async fn wait_for(&self, name: &str, count: usize) -> Vec<SpanData> {
        let deadline = tokio::time::Instant::now() + ARRIVAL;
        loop {
            let named: Vec<SpanData> = self
                .finished()
                .into_iter()
                .filter(|span| span.name == name)
                .collect();
            if named.len() >= count {
                return named;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} of {count} spans named {name:?} after {ARRIVAL:?}; finished: {:?}",
                named.len(),
                self.names()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The one span named `name`.
    pub(crate) async fn one(&self, name: &str) -> SpanData {
        let mut named = self.wait_for(name, 1).await;
        assert_eq!(
            named.len(),
            1,
            "one span named {name:?}: {:?}",
            self.names()
        );
        named.pop().expect("one")
    }

    fn names(&self) -> Vec<String> {
        self.finished()
            .into_iter()
            .map(|span| span.name.into_owned())
            .collect()
    }
}

fn attribute<'a>(span: &'a SpanData, key: &str) -> Option<&'a OtelValue> {
    span.attributes
        .iter()
        .find(|kv: &&KeyValue| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

fn string_attribute(span: &SpanData, key: &str) -> String {
    match attribute(span, key) {
        Some(value) => value.as_str().into_owned(),
        None => panic!("span {:?} has no {key}: {:?}", span.name, span.attributes),
    }
}

/// OpenTelemetry's `messaging.system` of a backend of the suite.
fn system_of(backend: &Backend) -> &'static str {
    match backend.name.split(['_', '-']).next().unwrap_or_default() {
        "amqp" | "rabbitmq" => "rabbitmq",
        "redis" => "redis",
        "nats" => "nats",
        _ => "memory",
    }
}

/// `child` is a child of `parent`, in its trace.
fn assert_child(child: &SpanData, parent: &SpanData) {
    assert_eq!(
        child.span_context.trace_id(),
        parent.span_context.trace_id(),
        "{} is in the trace of {}",
        child.name,
        parent.name
    );
    assert_eq!(
        child.parent_span_id,
        parent.span_context.span_id(),
        "{} is a child of {}",
        child.name,
        parent.name
    );
}

/// The attributes both sides of a request carry.
fn assert_common(span: &SpanData, backend: &Backend, topic: &str, method: &str) {
    assert_eq!(
        string_attribute(span, "messaging.system"),
        system_of(backend)
    );
    assert_eq!(string_attribute(span, "messaging.destination.name"), topic);
    assert_eq!(string_attribute(span, "rpc.method"), method);
    assert_eq!(string_attribute(span, "rpc.system.name"), "oslo_messaging");
}

pub async fn tracing_links_client_and_server_spans(backend: Backend) {
    let traced = Traced::install().await;
    let mut fx = Fixture::new(&backend, "tracing");
    fx.start(2).await;
    let client = fx.client().await;
    let topic = fx.topic.clone();

    // A call, inside an application span that becomes its parent.
    let root = tracing::info_span!("application");
    let sum: i64 = client
        .call(&ctx(), "add", json!({"a": 1, "b": 2}))
        .instrument(root)
        .await
        .expect("add");
    assert_eq!(sum, 3);
    let application = traced.one("application").await;
    let call = traced.one("add call").await;
    let handled = traced.one("add process").await;
    assert_child(&call, &application);
    assert_child(&handled, &call);
    assert_eq!(call.span_kind, SpanKind::Client);
    assert_eq!(handled.span_kind, SpanKind::Server);
    assert_common(&call, &backend, &topic, "add");
    assert_common(&handled, &backend, &topic, "add");
    assert_eq!(string_attribute(&call, "messaging.operation.type"), "send");
    assert_eq!(string_attribute(&call, "messaging.operation.name"), "call");
    assert_eq!(
        string_attribute(&handled, "messaging.operation.type"),
        "process"
    );
    let msg_id = string_attribute(&call, "messaging.message.id");
    assert!(!msg_id.is_empty());
    assert_eq!(string_attribute(&handled, "messaging.message.id"), msg_id);
    assert_eq!(call.status, Status::Unset);
    assert_eq!(handled.status, Status::Unset);
    assert!(attribute(&call, "error.type").is_none());

    // The trace context travels in the request's context, where Python's
    // instrumentation puts it (`_context_traceparent` on the wire).
    let seen: Context = client
        .call(&ctx(), "context", mqrpc::NoArgs {})
        .await
        .expect("context");
    let asked = traced.one("context call").await;
    let traceparent = seen
        .get_as::<String>(mqrpc::trace::TRACEPARENT)
        .expect("the server sees a traceparent");
    assert_eq!(
        traceparent,
        format!(
            "00-{}-{}-01",
            asked.span_context.trace_id(),
            asked.span_context.span_id()
        )
    );
    assert_eq!(seen.get(mqrpc::trace::TRACESTATE), None, "empty: left out");

    // A multicall: its span covers the sending; the handler's is its child.
    let items: Vec<u64> = client
        .multicall::<_, u64>(&ctx(), "count", json!({"n": 3}))
        .await
        .expect("multicall")
        .map(|item| item.expect("item"))
        .collect()
        .await;
    assert_eq!(items, vec![0, 1, 2]);
    let multicall = traced.one("count multicall").await;
    let streamed = traced.one("count process").await;
    assert_child(&streamed, &multicall);
    assert_eq!(multicall.span_kind, SpanKind::Client);
    assert_eq!(
        string_attribute(&multicall, "messaging.operation.name"),
        "multicall"
    );

    // A cast: a producer span, and a consumer span on the one server that takes it.
    client
        .cast(&ctx(), "record", json!({"id": 1}))
        .await
        .expect("cast");
    fx.recorder.wait_for(1, ARRIVAL).await;
    let cast = traced.one("record cast").await;
    let consumed = traced.one("record process").await;
    assert_child(&consumed, &cast);
    assert_eq!(cast.span_kind, SpanKind::Producer);
    assert_eq!(consumed.span_kind, SpanKind::Consumer);
    assert_common(&consumed, &backend, &topic, "record");
    assert!(attribute(&cast, "mqrpc.fanout").is_none());

    // A fanout cast: one producer span, a child on each server.
    let fanout = client.prepare().fanout(true);
    fanout
        .cast(&ctx(), "whoami", mqrpc::NoArgs {})
        .await
        .expect("fanout cast");
    let sent = traced.one("whoami cast").await;
    assert_eq!(
        attribute(&sent, "mqrpc.fanout"),
        Some(&OtelValue::Bool(true))
    );
    let reached = traced.wait_for("whoami process", 2).await;
    for span in &reached {
        assert_child(span, &sent);
        assert_eq!(span.span_kind, SpanKind::Consumer);
    }
    tokio::time::sleep(SETTLE).await;
    assert_eq!(
        traced.wait_for("whoami process", 2).await.len(),
        2,
        "each server handled the fanout once"
    );

    // Every request of the case is in one of the traces made above, none orphaned.
    let traces =
        [&application, &asked, &multicall, &cast, &sent].map(|span| span.span_context.trace_id());
    for span in traced.finished() {
        assert!(
            traces.contains(&span.span_context.trace_id()),
            "{} is in a trace of its client",
            span.name
        );
    }
    fx.shutdown().await;
}

pub async fn tracing_marks_a_remote_error_on_both_spans(backend: Backend) {
    let traced = Traced::install().await;
    let mut fx = Fixture::new(&backend, "tracing_error");
    fx.start(1).await;
    let client: Client = fx.client().await;
    let failed = client
        .call::<_, Value>(&ctx(), "fail", json!({"kind": "refused"}))
        .await
        .expect_err("fail fails");
    let Error::Remote(remote) = &failed else {
        panic!("a remote error: {failed:?}");
    };
    let call = traced.one("fail call").await;
    let handled = traced.one("fail process").await;
    assert_child(&handled, &call);
    assert!(
        matches!(call.status, Status::Error { .. }),
        "{:?}",
        call.status
    );
    assert!(
        matches!(handled.status, Status::Error { .. }),
        "{:?}",
        handled.status
    );
    assert_eq!(string_attribute(&call, "error.type"), remote.class);
    assert_eq!(string_attribute(&handled, "error.type"), "error");

    let missing = client
        .call::<_, Value>(&ctx(), "does_not_exist", json!({}))
        .await
        .expect_err("no such method");
    assert!(matches!(missing, Error::NoSuchMethod { .. }), "{missing:?}");
    let call = traced.one("does_not_exist call").await;
    assert_eq!(string_attribute(&call, "error.type"), "no_such_method");
    let handled = traced.one("does_not_exist process").await;
    assert_child(&handled, &call);
    assert_eq!(string_attribute(&handled, "error.type"), "no_such_method");
    fx.shutdown().await;
}
