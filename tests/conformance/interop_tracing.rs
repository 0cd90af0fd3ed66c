//! Tracing interop with Python oslo.messaging instrumented by the PyPI package
//! `opentelemetry-instrumentation-oslo-messaging` (`oslo_peer.py --trace`), both
//! directions on one RabbitMQ: each side's span is the parent of the other side's,
//! by the W3C trace context that both keep in the request's context
//! (`_context_traceparent` on the wire).
//!
//! The Python peer prints its finished spans as JSON lines; the Rust spans go to the
//! in-memory exporter of [`Traced`], the default subscriber of this thread only, so
//! these tests run on a current-thread runtime (the mqrpc server's tasks included).

use std::path::PathBuf;
use std::time::Duration;

use mqrpc::{Client, Context, Target};
use opentelemetry::trace::{SpanId, SpanKind, TraceId};
use opentelemetry_sdk::trace::SpanData;
use serde_json::{Value, json};

use crate::interop_amqp::{Peer, oslo_url, python, python_server_with, rust_server};
use crate::suite::Traced;

/// How long the peer may take to print a line.
const LINE: Duration = Duration::from_secs(60);

/// The Python interpreter of [`python`], if it also has the OpenTelemetry SDK and
/// the oslo.messaging instrumentation; when they are missing: a failure, or `None`
/// after a recorded skip under `MQRPC_ALLOW_SKIP=1`.
fn traced_python() -> Option<PathBuf> {
    let python = python()?;
    let imports = std::process::Command::new(&python)
        .args([
            "-W",
            "ignore",
            "-c",
            "import opentelemetry.sdk.trace, opentelemetry.instrumentation.oslo_messaging",
        ])
        .output()
        .expect("run the Python peer's interpreter");
    if imports.status.success() {
        return Some(python);
    }
    crate::skips::missing(
        "amqp interop tracing",
        &format!(
            "{} lacks opentelemetry-sdk or opentelemetry-instrumentation-oslo-messaging ({}); \
             run scripts/oslo-venv.sh",
            python.display(),
            String::from_utf8_lossy(&imports.stderr)
                .lines()
                .rfind(|line| !line.trim().is_empty())
                .unwrap_or_default()
                .trim()
        ),
    );
    None
}

/// A span the Python peer printed.
#[derive(Debug)]
struct PySpan {
    name: String,
    kind: String,
    trace_id: TraceId,
    span_id: SpanId,
    parent_span_id: Option<SpanId>,
    attributes: Value,
}

impl PySpan {
    /// The span of a `{"event": "span", ...}` line, `None` for other lines.
    fn of(line: &Value) -> Option<PySpan> {
        if line["event"] != "span" {
            return None;
        }
        let hex = |key: &str| {
            line[key]
                .as_str()
                .unwrap_or_else(|| panic!("{key} of {line}"))
                .to_owned()
        };
        let trace_id = hex("trace_id");
        let span_id = hex("span_id");
        assert_eq!((trace_id.len(), span_id.len()), (32, 16), "{line}");
        Some(PySpan {
            name: hex("name"),
            kind: hex("kind"),
            trace_id: TraceId::from_hex(&trace_id).expect("a trace id"),
            span_id: SpanId::from_hex(&span_id).expect("a span id"),
            parent_span_id: line["parent_span_id"]
                .as_str()
                .map(|id| SpanId::from_hex(id).expect("a parent span id")),
            attributes: line["attributes"].clone(),
        })
    }
}

/// Reads the peer's lines until one is a span named `name`; returns it.
async fn python_span(peer: &mut Peer, name: &str) -> PySpan {
    loop {
        let line = peer.next(LINE).await;
        if let Some(span) = PySpan::of(&line).filter(|span| span.name == name) {
            return span;
        }
    }
}

/// Sends `request` to a Python client; returns its answer and the spans it printed
/// before it (those of this request).
async fn python_request(client: &mut Peer, request: &Value) -> (Value, Vec<PySpan>) {
    client.send(request).await;
    let mut spans = Vec::new();
    loop {
        let line = client.next(LINE).await;
        match PySpan::of(&line) {
            Some(span) => spans.push(span),
            None => {
                assert_eq!(line["id"], request["id"], "an answer: {line}");
                return (line, spans);
            }
        }
    }
}

/// The one span of `spans` named `name`.
fn named<'a>(spans: &'a [PySpan], name: &str) -> &'a PySpan {
    let mut matching = spans.iter().filter(|span| span.name == name);
    let span = matching
        .next()
        .unwrap_or_else(|| panic!("a Python span named {name:?}: {spans:?}"));
    assert!(matching.next().is_none(), "one {name:?}: {spans:?}");
    span
}

/// The Rust span `child` is a child of the Python span `parent`, in its trace.
fn assert_rust_child_of_python(child: &SpanData, parent: &PySpan) {
    assert_eq!(
        child.span_context.trace_id(),
        parent.trace_id,
        "{} is in the trace of Python's {}",
        child.name,
        parent.name
    );
    assert_eq!(
        child.parent_span_id, parent.span_id,
        "{} is a child of Python's {}",
        child.name, parent.name
    );
}

/// The Python span `child` is a child of the Rust span `parent`, in its trace.
fn assert_python_child_of_rust(child: &PySpan, parent: &SpanData) {
    assert_eq!(
        child.trace_id,
        parent.span_context.trace_id(),
        "Python's {} is in the trace of {}",
        child.name,
        parent.name
    );
    assert_eq!(
        child.parent_span_id,
        Some(parent.span_context.span_id()),
        "Python's {} is a child of {}",
        child.name,
        parent.name
    );
}

/// An instrumented oslo.messaging client calls and casts to an mqrpc server: the
/// server's spans are children of the Python "send" spans.
#[tokio::test(flavor = "current_thread")]
async fn amqp_interop_tracing_python_client_parents_mqrpc_server_spans() {
    let Some(_) = crate::amqp::backend().await else {
        return;
    };
    let Some(python) = traced_python() else {
        return;
    };
    let traced = Traced::install().await;
    let topic = format!("interop_trace_rs_{}", &mqrpc::wire::new_id()[..12]);
    let (server, recorder) = rust_server(&topic).await;
    let url = oslo_url();
    let mut client = Peer::spawn(
        &python,
        &["client", "--url", &url, "--topic", &topic, "--trace"],
    );

    // A call: Python's producer span "add send" parents mqrpc's server span.
    let (answer, spans) = python_request(
        &mut client,
        &json!({"id": 1, "method": "add", "args": {"a": 40, "b": 2}, "timeout": 20}),
    )
    .await;
    assert_eq!(answer["ok"], json!(42), "{answer}");
    let sent = named(&spans, "add send");
    assert_eq!(sent.kind, "producer");
    assert_eq!(sent.attributes["messaging.operation"], "call", "{sent:?}");
    let handled = traced.one("add process").await;
    assert_rust_child_of_python(&handled, sent);
    assert_eq!(handled.span_kind, SpanKind::Server);

    // The trace context the mqrpc handler sees is the one of Python's span.
    let (answer, spans) = python_request(
        &mut client,
        &json!({"id": 2, "method": "context", "timeout": 20}),
    )
    .await;
    let sent = named(&spans, "context send");
    let traceparent = answer["ok"][mqrpc::trace::TRACEPARENT]
        .as_str()
        .unwrap_or_else(|| panic!("a traceparent in {answer}"));
    let prefix = format!("00-{}-{}-", sent.trace_id, sent.span_id);
    assert!(traceparent.starts_with(&prefix), "{traceparent} {sent:?}");
    assert_rust_child_of_python(&traced.one("context process").await, sent);

    // A cast: "record send" parents mqrpc's consumer span.
    let (answer, spans) = python_request(
        &mut client,
        &json!({"id": 3, "method": "record", "args": {"id": 7}, "cast": true}),
    )
    .await;
    assert_eq!(answer["ok"], Value::Null, "{answer}");
    recorder.wait_for(1, Duration::from_secs(20)).await;
    let sent = named(&spans, "record send");
    assert_eq!(sent.kind, "producer");
    assert_eq!(sent.attributes["messaging.operation"], "cast", "{sent:?}");
    let consumed = traced.one("record process").await;
    assert_rust_child_of_python(&consumed, sent);
    assert_eq!(consumed.span_kind, SpanKind::Consumer);

    client.finish().await;
    server.shutdown().await.expect("shutdown");
}

/// An mqrpc client calls and casts to an instrumented oslo.messaging server: the
/// Python "receive" spans are children of the mqrpc client spans.
#[tokio::test(flavor = "current_thread")]
async fn amqp_interop_tracing_mqrpc_client_parents_python_server_spans() {
    let Some(_) = crate::amqp::backend().await else {
        return;
    };
    let Some(python) = traced_python() else {
        return;
    };
    let traced = Traced::install().await;
    let topic = format!("interop_trace_py_{}", &mqrpc::wire::new_id()[..12]);
    let mut py = python_server_with(&python, &topic, "py1", &["--trace"]).await;
    let transport = mqrpc::connect(&crate::amqp::url()).await.expect("RabbitMQ");
    let client = Client::new(transport, Target::new(&topic)).timeout(Duration::from_secs(20));
    let ctx = Context::new().with("request_id", "req-trace");

    // A call: mqrpc's client span "add call" parents Python's "add receive".
    let sum: i64 = client
        .call(&ctx, "add", json!({"a": 2, "b": 3}))
        .await
        .expect("add");
    assert_eq!(sum, 5);
    let call = traced.one("add call").await;
    let received = python_span(&mut py, "add receive").await;
    assert_python_child_of_rust(&received, &call);
    assert_eq!(received.kind, "consumer");
    assert_eq!(received.attributes["rpc.method"], "add", "{received:?}");

    // What the Python endpoint gets as its context holds mqrpc's traceparent.
    let seen: Value = client
        .call(&ctx, "context", json!({}))
        .await
        .expect("context");
    let asked = traced.one("context call").await;
    assert_eq!(
        seen[mqrpc::trace::TRACEPARENT],
        format!(
            "00-{}-{}-01",
            asked.span_context.trace_id(),
            asked.span_context.span_id()
        ),
        "{seen}"
    );
    assert_eq!(seen["request_id"], "req-trace", "{seen}");
    assert_python_child_of_rust(&python_span(&mut py, "context receive").await, &asked);

    // A cast: "record cast" parents Python's "record receive".
    client
        .cast(&ctx, "record", json!({"id": 1}))
        .await
        .expect("cast");
    let cast = traced.one("record cast").await;
    assert_eq!(cast.span_kind, SpanKind::Producer);
    let received = python_span(&mut py, "record receive").await;
    assert_python_child_of_rust(&received, &cast);
    assert_eq!(received.kind, "consumer");

    py.finish().await;
}
