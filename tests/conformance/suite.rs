//! The generic conformance body. Each case takes a [`Backend`] (how to open a
//! transport of the backend under test) and states one behaviour every backend must
//! have. Cases that depend on a capability read it from the transport and print a
//! SKIP line naming the capability when it does not apply: never a silent pass.
//!
//! A backend module writes `conformance_suite!(name, async_fn_returning_backend)`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::StreamExt;
use mqrpc::transport::{Address, ListenOptions, Outgoing};
use mqrpc::{AckMode, Client, Context, Error, Server, Target, TimeoutKind, Transport, Version};
use serde_json::{Value, json};

use crate::service::{self, Recorder, ServiceError};

mod discovery;
pub use discovery::*;
mod hardening;
pub use hardening::*;
mod health;
pub use health::*;
mod typed_service;
pub use typed_service::*;
mod notifications;
pub use notifications::*;
#[cfg(feature = "metrics")]
mod metrics;
#[cfg(feature = "metrics")]
pub use metrics::*;
#[cfg(feature = "otel")]
mod traces;
#[cfg(feature = "otel")]
pub use traces::*;

type ConnectFuture = Pin<Box<dyn Future<Output = Arc<dyn Transport>> + Send>>;

/// How a case opens transports of the backend under test. Each call opens a new
/// connection (a new "process"), all reaching the same broker.
#[derive(Clone)]
pub struct Backend {
    pub name: &'static str,
    connect: Arc<dyn Fn() -> ConnectFuture + Send + Sync>,
}

impl Backend {
    pub fn new<F, Fut>(name: &'static str, connect: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Arc<dyn Transport>> + Send + 'static,
    {
        Backend {
            name,
            connect: Arc::new(move || Box::pin(connect())),
        }
    }

    pub async fn transport(&self) -> Arc<dyn Transport> {
        (self.connect)().await
    }
}

/// [`skip`], for the cases a macro arm skips.
pub fn skip_case(backend: &Backend, case: &str, why: &str) {
    skip(backend, case, why);
}

/// Says loudly that a case does not apply to a backend, and why.
fn skip(backend: &Backend, case: &str, why: &str) {
    crate::skips::record_skip(&format!("{}::{case}", backend.name), why);
}

/// A topic name no other test uses.
fn unique_topic(case: &str) -> String {
    format!("{case}_{}", &mqrpc::wire::new_id()[..12])
}

/// Every case runs under this bound, so a bug hangs no CI run.
const CASE_LIMIT: Duration = Duration::from_secs(120);
/// How long a case waits for a message it expects.
const ARRIVAL: Duration = Duration::from_secs(20);
/// How long a case waits after the expected messages so duplicates would show.
const SETTLE: Duration = Duration::from_millis(300);
/// Allowed lateness of a timeout.
const TIMEOUT_MARGIN: Duration = Duration::from_millis(750);

/// After a fault, calls `add` until it works again (at most `tries` attempts, a short
/// pause after each failure) and then checks that every subscription of server `s1`
/// came back: its own queue (a directed call) and its fanout. Returns how long after
/// `cut_at` calls worked again.
#[allow(dead_code)]
pub async fn calls_work_again(
    client: &Client,
    cut_at: Instant,
    backend: &str,
    tries: usize,
) -> Duration {
    let mut recovered = None;
    for _ in 0..tries {
        match client
            .call::<_, i64>(&ctx(), "add", json!({"a": 20, "b": 22}))
            .await
        {
            Ok(sum) => {
                assert_eq!(sum, 42);
                recovered = Some(cut_at.elapsed());
                break;
            }
            Err(err) => {
                eprintln!("{backend} call after the cut failed (retrying): {err}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let recovered = recovered.expect("calls succeed again after reconnection");
    eprintln!("{backend} recovered {recovered:?} after the cut");
    directed_and_fanout_work(client).await;
    recovered
}

/// A call directed at `s1` reaches it, and a fanout cast (`record` id 1) is sent.
async fn directed_and_fanout_work(client: &Client) {
    let who: String = client
        .prepare()
        .server("s1")
        .call(&ctx(), "whoami", mqrpc::NoArgs {})
        .await
        .expect("directed");
    assert_eq!(who, "s1");
    client
        .prepare()
        .fanout(true)
        .cast(&ctx(), "record", json!({"id": 1}))
        .await
        .expect("fanout");
}

/// Runs a case body with the case bound.
pub async fn bounded(case: &str, body: impl Future<Output = ()>) {
    if tokio::time::timeout(CASE_LIMIT, body).await.is_err() {
        panic!("{case} did not finish within {CASE_LIMIT:?}");
    }
}

/// How many copies of each case run at once: `MQRPC_STRESS` (default 1). Stress mode
/// (`MQRPC_STRESS=20`, see `scripts/stress.sh`) runs every case that many times
/// concurrently against the same broker, each copy on topics of its own.
pub fn stress_copies() -> usize {
    std::env::var("MQRPC_STRESS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1usize)
        .max(1)
}

/// Runs `copies` of a case at once, each bounded; all must pass.
pub async fn stressed<F, Fut>(case: &str, backend: Backend, body: F)
where
    F: Fn(Backend) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let copies = stress_copies();
    if copies == 1 {
        return bounded(case, body(backend)).await;
    }
    // Each copy is a task of its own so that copies run on both workers and a failed
    // copy is reported by name.
    let limit = CASE_LIMIT * 3;
    let mut running = tokio::task::JoinSet::new();
    for _ in 0..copies {
        running.spawn(tokio::time::timeout(limit, body(backend.clone())));
    }
    let mut failed = 0;
    while let Some(done) = running.join_next().await {
        match done {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                failed += 1;
                eprintln!("{case}: a copy did not finish within {limit:?}");
            }
            Err(err) => {
                failed += 1;
                eprintln!("{case}: a copy failed: {err}");
            }
        }
    }
    assert_eq!(
        failed, 0,
        "{case}: {failed} of {copies} stressed copies failed"
    );
    eprintln!("STRESS {} {case}: {copies} copies passed", backend.name);
}

/// Test servers of one topic and what they recorded.
struct Fixture {
    backend: Backend,
    topic: String,
    recorder: Arc<Recorder>,
    servers: Vec<Server>,
}

impl Fixture {
    fn new(backend: &Backend, case: &str) -> Self {
        Fixture {
            backend: backend.clone(),
            topic: unique_topic(case),
            recorder: Recorder::new(),
            servers: Vec::new(),
        }
    }

    /// Starts servers `s1..=sN`, each on a connection of its own.
    async fn start(&mut self, n: usize) {
        for i in 1..=n {
            self.start_with(&format!("s{i}"), |b| b).await;
        }
    }

    async fn start_with(
        &mut self,
        server: &str,
        configure: impl FnOnce(mqrpc::ServerBuilder) -> mqrpc::ServerBuilder,
    ) {
        let transport = self.backend.transport().await;
        let target = Target::new(&self.topic).server(server);
        let builder =
            Server::builder(transport, target).endpoint(service::endpoint(server, &self.recorder));
        let started = configure(builder).start().await.expect("server starts");
        self.servers.push(started);
    }

    /// A client of the topic on a connection of its own.
    async fn client(&self) -> Client {
        Client::new(self.backend.transport().await, Target::new(&self.topic))
            .timeout(Duration::from_secs(30))
    }

    async fn shutdown(self) {
        for server in self.servers {
            server.shutdown().await.expect("server shuts down");
        }
    }
}

/// Three calls of `add(a, b)` all answered: the server keeps serving.
async fn still_answers(client: &Client, a: i64, b: i64) {
    for _ in 0..3 {
        let sum: i64 = client
            .call(&ctx(), "add", json!({"a": a, "b": b}))
            .await
            .expect("server still answers");
        assert_eq!(sum, a + b);
    }
}

fn ctx() -> Context {
    Context::new()
}

pub async fn typed_call(backend: Backend) {
    let mut fx = Fixture::new(&backend, "typed_call");
    fx.start(1).await;
    let client = fx.client().await;
    let sum: i64 = client
        .call(&ctx(), "add", json!({"a": 2, "b": 40}))
        .await
        .expect("add");
    assert_eq!(sum, 42);

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Point {
        x: i32,
        tags: Vec<String>,
    }
    let point = Point {
        x: -3,
        tags: vec!["a".into(), "ü".into()],
    };
    let back: Point = client
        .call(&ctx(), "echo", json!({"payload": point}))
        .await
        .expect("echo");
    assert_eq!(back, point);

    let wrong: Result<String, _> = client.call(&ctx(), "add", json!({"a": 1, "b": 2})).await;
    assert!(matches!(wrong, Err(Error::Codec(_))), "{wrong:?}");
    fx.shutdown().await;
}

pub async fn context_round_trip_keeps_unknown_keys(backend: Backend) {
    let mut fx = Fixture::new(&backend, "context");
    fx.start(1).await;
    let client = fx.client().await;
    let sent = Context::new()
        .with("user", "alice")
        .with("request_id", "req-7")
        .with(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .with("roles", vec!["admin", "member"])
        .with("nested", json!({"deep": {"n": 1, "none": null}}))
        .with("is_admin", true);
    let received: Context = client
        .call(&sent, "context", mqrpc::NoArgs {})
        .await
        .expect("context");
    assert_eq!(received, sent);
    fx.shutdown().await;
}

pub async fn cast_to_topic_with_n_servers_is_handled_once(backend: Backend) {
    let mut fx = Fixture::new(&backend, "cast_once");
    fx.start(3).await;
    let client = fx.client().await;
    const CASTS: u64 = 30;
    for id in 0..CASTS {
        client
            .cast(&ctx(), "record", json!({ "id": id }))
            .await
            .expect("cast");
    }
    fx.recorder.wait_for(CASTS as usize, ARRIVAL).await;
    let records = fx.recorder.settled(SETTLE).await;
    assert_eq!(records.len(), CASTS as usize, "{records:?}");
    let per_id = Recorder::per_id(&records);
    assert!(
        (0..CASTS).all(|id| per_id.get(&id) == Some(&1)),
        "{per_id:?}"
    );
    fx.shutdown().await;
}

pub async fn directed_call_reaches_only_its_server(backend: Backend) {
    let mut fx = Fixture::new(&backend, "directed");
    fx.start(3).await;
    let client = fx.client().await;
    let to_s2 = client.prepare().server("s2");
    for _ in 0..10 {
        let who: String = to_s2
            .call(&ctx(), "whoami", mqrpc::NoArgs {})
            .await
            .expect("whoami");
        assert_eq!(who, "s2");
    }
    for id in 0..5 {
        to_s2
            .cast(&ctx(), "record", json!({ "id": id }))
            .await
            .expect("cast");
    }
    fx.recorder.wait_for(5, ARRIVAL).await;
    let records = fx.recorder.settled(SETTLE).await;
    assert_eq!(records.len(), 5, "{records:?}");
    assert!(
        records.iter().all(|(server, _)| server == "s2"),
        "{records:?}"
    );
    fx.shutdown().await;
}

pub async fn fanout_cast_reaches_every_server_once(backend: Backend) {
    let mut fx = Fixture::new(&backend, "fanout");
    fx.start(3).await;
    let client = fx.client().await;
    client
        .prepare()
        .fanout(true)
        .cast(&ctx(), "record", json!({"id": 7}))
        .await
        .expect("fanout cast");
    fx.recorder.wait_for(3, ARRIVAL).await;
    let records = fx.recorder.settled(SETTLE).await;
    let mut servers: Vec<_> = records.iter().map(|(s, _)| s.clone()).collect();
    servers.sort();
    assert_eq!(servers, ["s1", "s2", "s3"], "{records:?}");
    fx.shutdown().await;
}

pub async fn call_on_fanout_target_is_invalid(backend: Backend) {
    let mut fx = Fixture::new(&backend, "fanout_call");
    fx.start(1).await;
    let client = fx.client().await.fanout(true);
    let result: Result<i64, _> = client.call(&ctx(), "add", json!({"a": 1, "b": 1})).await;
    assert!(matches!(result, Err(Error::InvalidTarget(_))), "{result:?}");
    let stream = client
        .multicall::<_, u64>(&ctx(), "count", json!({"n": 1}))
        .await;
    assert!(matches!(stream, Err(Error::InvalidTarget(_))));
    fx.shutdown().await;
}

pub async fn multicall_streams_items_in_order_then_ends(backend: Backend) {
    let mut fx = Fixture::new(&backend, "multicall");
    fx.start(1).await;
    let client = fx.client().await;
    let stream = client
        .multicall::<_, u64>(&ctx(), "count", json!({"n": 50}))
        .await
        .expect("multicall");
    let items: Vec<u64> = stream.map(|item| item.expect("item")).collect().await;
    assert_eq!(items, (0..50).collect::<Vec<_>>());

    // A plain call of a streaming method returns its last item.
    let last: u64 = client
        .call(&ctx(), "count", json!({"n": 4}))
        .await
        .expect("call");
    assert_eq!(last, 3);

    // A multicall of a unary method yields its one result.
    let single: Vec<i64> = client
        .multicall::<_, i64>(&ctx(), "add", json!({"a": 1, "b": 2}))
        .await
        .expect("multicall")
        .map(|item| item.expect("item"))
        .collect()
        .await;
    assert_eq!(single, vec![3]);

    // An error ends the stream after the items before it.
    let mut failing = client
        .multicall::<_, u64>(&ctx(), "count_then_fail", json!({"n": 2}))
        .await
        .expect("multicall");
    assert_eq!(failing.next().await.map(|r| r.expect("0")), Some(0));
    assert_eq!(failing.next().await.map(|r| r.expect("1")), Some(1));
    let err = failing
        .next()
        .await
        .expect("an error item")
        .expect_err("error");
    let remote = err.as_remote().expect("remote error");
    assert_eq!(remote.decode::<ServiceError>(), Some(ServiceError::Refused));
    assert!(
        failing.next().await.is_none(),
        "the stream ends after the error"
    );
    fx.shutdown().await;
}

pub async fn multicall_stream_outlives_its_client(backend: Backend) {
    let mut fx = Fixture::new(&backend, "multicall_alone");
    fx.start(1).await;
    // The stream is all that is left of the client.
    let stream = fx
        .client()
        .await
        .multicall::<_, u64>(&ctx(), "count", json!({"n": 5}))
        .await
        .expect("multicall");
    let items: Vec<u64> = stream.map(|item| item.expect("item")).collect().await;
    assert_eq!(items, vec![0, 1, 2, 3, 4]);
    fx.shutdown().await;
}

pub async fn remote_error_decodes_to_the_handler_type(backend: Backend) {
    let mut fx = Fixture::new(&backend, "typed_error");
    fx.start(1).await;
    let client = fx.client().await;
    let err = client
        .call::<_, ()>(&ctx(), "fail", json!({"kind": "range"}))
        .await
        .expect_err("fails");
    let remote = err.as_remote().expect("remote error");
    assert_eq!(remote.class, "ServiceError");
    assert_eq!(remote.message, "11 is above 10");
    assert_eq!(
        remote.decode::<ServiceError>(),
        Some(ServiceError::OutOfRange { value: 11, max: 10 })
    );
    let err = client
        .call::<_, ()>(&ctx(), "fail", json!({"kind": "refused"}))
        .await
        .expect_err("fails");
    assert_eq!(
        err.as_remote().and_then(|r| r.decode::<ServiceError>()),
        Some(ServiceError::Refused)
    );

    // A failure built by hand keeps class and module for Python callers.
    let err = client
        .call::<_, ()>(&ctx(), "value_error", mqrpc::NoArgs {})
        .await
        .expect_err("fails");
    let remote = err.as_remote().expect("remote error");
    assert_eq!(
        (remote.module.as_str(), remote.class.as_str()),
        ("builtins", "ValueError")
    );
    assert_eq!(remote.message, "bad value");
    assert_eq!(remote.decode::<ServiceError>(), None);

    // Arguments that do not fit the method are the caller's TypeError.
    let err = client
        .call::<_, i64>(&ctx(), "add", json!({"a": "one"}))
        .await
        .expect_err("bad args");
    assert_eq!(err.as_remote().map(|r| r.class.as_str()), Some("TypeError"));
    fx.shutdown().await;
}

pub async fn handler_panic_is_a_remote_failure_and_server_keeps_serving(backend: Backend) {
    let mut fx = Fixture::new(&backend, "panic");
    fx.start(1).await;
    let client = fx.client().await;
    for _ in 0..3 {
        let err = client
            .call::<_, ()>(&ctx(), "panic", mqrpc::NoArgs {})
            .await
            .expect_err("panics");
        let remote = err.as_remote().expect("remote error");
        assert_eq!(remote.class, "RuntimeError");
        assert!(remote.message.contains("deliberate test panic"), "{remote}");
    }
    let sum: i64 = client
        .call(&ctx(), "add", json!({"a": 1, "b": 1}))
        .await
        .expect("still serving");
    assert_eq!(sum, 2);
    fx.shutdown().await;
}

pub async fn unknown_method_is_no_such_method(backend: Backend) {
    let mut fx = Fixture::new(&backend, "no_such_method");
    fx.start(1).await;
    let client = fx.client().await;
    let err = client
        .call::<_, Value>(&ctx(), "does_not_exist", json!({}))
        .await
        .expect_err("missing");
    assert!(
        matches!(&err, Error::NoSuchMethod { method } if method == "does_not_exist"),
        "{err:?}"
    );
    fx.shutdown().await;
}

pub async fn version_rules_follow_oslo(backend: Backend) {
    let mut fx = Fixture::new(&backend, "versions");
    fx.start(1).await;
    let client = fx.client().await;
    for ok in [Version::new(1, 0), Version::new(1, 2), Version::new(1, 3)] {
        let sum: i64 = client
            .prepare()
            .version(ok)
            .call(&ctx(), "add", json!({"a": 1, "b": 2}))
            .await
            .unwrap_or_else(|e| panic!("version {ok} should be served: {e}"));
        assert_eq!(sum, 3);
    }
    for refused in [
        Version::new(1, 4),
        Version::new(2, 0),
        Version::with_revision(1, 3, 1),
    ] {
        let err = client
            .prepare()
            .version(refused)
            .call::<_, i64>(&ctx(), "add", json!({"a": 1, "b": 2}))
            .await
            .expect_err("unsupported");
        assert!(
            matches!(&err, Error::UnsupportedVersion { version, method }
                if *version == refused.to_string() && method == "add"),
            "{refused}: {err:?}"
        );
    }
    // A namespace no endpoint has is an unsupported version, as in oslo.
    let err = client
        .prepare()
        .namespace("elsewhere")
        .call::<_, i64>(&ctx(), "add", json!({"a": 1, "b": 2}))
        .await
        .expect_err("namespace");
    assert!(matches!(err, Error::UnsupportedVersion { .. }), "{err:?}");
    fx.shutdown().await;
}

pub async fn private_methods_are_never_dispatched(backend: Backend) {
    let mut fx = Fixture::new(&backend, "private");
    fx.start(1).await;
    let client = fx.client().await;
    let err = client
        .call::<_, Value>(&ctx(), "_private", json!({}))
        .await
        .expect_err("denied");
    assert!(
        matches!(&err, Error::NoSuchMethod { method } if method == "_private"),
        "{err:?}"
    );
    assert!(!fx.recorder.private_called.load(Ordering::SeqCst));
    fx.shutdown().await;
}

/// A timeout or call-monitor interval too long for the clock (`Duration::MAX`, a
/// user's `--timeout 1e19`) is taken as the longest a client keeps, not a panic.
pub async fn endless_timeouts_are_capped_not_a_panic(backend: Backend) {
    let mut fx = Fixture::new(&backend, "endless");
    fx.start(1).await;
    let client = fx
        .client()
        .await
        .timeout(Duration::MAX)
        .call_monitor(Some(Duration::MAX));
    still_answers(&client, 20, 22).await;
    client
        .cast(&ctx(), "record", json!({"id": 1}))
        .await
        .expect("cast");
    fx.recorder.wait_for(1, Duration::from_secs(20)).await;
    fx.shutdown().await;
}

pub async fn timeout_fires_and_late_reply_does_not_disturb_next_call(backend: Backend) {
    let mut fx = Fixture::new(&backend, "timeout");
    fx.start(1).await;
    let client = fx.client().await;
    // Set up the reply queue first: the timeout below is about the reply.
    still_answers(&client, 1, 2).await;
    let timeout = Duration::from_millis(400);
    let started = Instant::now();
    let err = client
        .prepare()
        .timeout(timeout)
        .call::<_, f64>(&ctx(), "sleep", json!({"seconds": 1.2}))
        .await
        .expect_err("times out");
    let waited = started.elapsed();
    assert!(
        matches!(
            err,
            Error::Timeout {
                kind: TimeoutKind::Reply,
                ..
            }
        ),
        "{err:?}"
    );
    // The error says where it waited: the topic and the broker, never credentials.
    let text = err.to_string();
    assert!(text.contains(&fx.topic), "{text}");
    if let Error::Timeout { broker, .. } = &err {
        assert!(
            !broker.is_empty() && text.contains(broker.as_str()),
            "{text}"
        );
    }
    assert!(!text.contains("guest:guest"), "{text}");
    assert!(waited >= timeout, "fired early: {waited:?}");
    assert!(waited < timeout + TIMEOUT_MARGIN, "fired late: {waited:?}");
    // The late reply of the first call lands while this one waits.
    let second: String = client
        .call(
            &ctx(),
            "delayed_echo",
            json!({"seconds": 1.2, "payload": "second"}),
        )
        .await
        .expect("second call");
    assert_eq!(second, "second");
    fx.shutdown().await;
}

pub async fn retry_policy_sends_an_idempotent_call_again(backend: Backend) {
    let mut fx = Fixture::new(&backend, "retry");
    fx.start(1).await;
    let client = fx.client().await;
    // The reply queue exists before the timed attempts, so each of them is sent
    // (its setup would otherwise count against the first attempt's deadline).
    still_answers(&client, 1, 2).await;
    let policy = mqrpc::RetryPolicy::new(3)
        .backoff_between(Duration::from_millis(50), Duration::from_millis(100));
    // Each attempt times out (the handler takes longer), so all three go out.
    let err = client
        .prepare()
        .timeout(Duration::from_millis(300))
        .retry(Some(policy))
        .call::<_, u64>(&ctx(), "slow_record", json!({"id": 7, "seconds": 0.8}))
        .await
        .expect_err("every attempt times out");
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    fx.recorder.wait_for(3, ARRIVAL).await;
    let records = fx.recorder.settled(SETTLE).await;
    assert_eq!(records.len(), 3, "three attempts, no more: {records:?}");
    // A call that succeeds is sent once.
    let back: u64 = client
        .prepare()
        .retry(Some(mqrpc::RetryPolicy::new(3)))
        .call(&ctx(), "slow_record", json!({"id": 8, "seconds": 0.0}))
        .await
        .expect("succeeds at once");
    assert_eq!(back, 8);
    fx.recorder.wait_for(4, ARRIVAL).await;
    assert_eq!(fx.recorder.settled(SETTLE).await.len(), 4);
    fx.shutdown().await;
}

/// DESIGN §5: a reply proves the request arrived, so a call proceeds on whichever
/// comes first, the publish's confirm or the reply; a publish failure that comes
/// first still fails the call.
pub async fn call_proceeds_on_the_reply_or_the_publish_failure_whichever_comes_first(
    backend: Backend,
) {
    use crate::settling::{REFUSED, Settle, Unsettled};
    let mut fx = Fixture::new(&backend, "confirm_or_reply");
    fx.start(1).await;
    let client_on = |settle| {
        let backend = backend.clone();
        let topic = fx.topic.clone();
        async move {
            let transport = Unsettled::wrap(backend.transport().await, settle);
            Client::new(transport, Target::new(topic)).timeout(Duration::from_secs(10))
        }
    };
    // The confirm never comes: the reply alone completes the call, well before the
    // timeout; so does a multi-part reply.
    let client = client_on(Settle::Never).await;
    let started = Instant::now();
    let sum: i64 = client
        .call(&ctx(), "add", json!({"a": 20, "b": 22}))
        .await
        .expect("the reply completes the call without its confirm");
    assert_eq!(sum, 42);
    let last: i64 = client
        .call(&ctx(), "count", json!({"n": 3}))
        .await
        .expect("a streamed reply completes the call without its confirm");
    assert_eq!(last, 2);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the calls waited for a confirm that never came"
    );
    // The publish fails long after the reply came: the call already succeeded.
    let client = client_on(Settle::FailAfter(Duration::from_secs(5))).await;
    let sum: i64 = client
        .call(&ctx(), "add", json!({"a": 1, "b": 2}))
        .await
        .expect("the reply came before the publish failed");
    assert_eq!(sum, 3);
    // The publish fails at once, before any reply: the call fails with that error.
    let client = client_on(Settle::FailAfter(Duration::ZERO)).await;
    let err = client
        .call::<_, i64>(&ctx(), "sleep", json!({"seconds": 0.5}))
        .await
        .expect_err("a publish failure before the reply fails the call");
    assert!(err.to_string().contains(REFUSED), "{err}");
    // The request leaves 1.8 s late and the server answers 0.6 s after it gets it,
    // 2.4 s after the call began. The 2 s call monitor counts from the publish, so the
    // late start is not taken for a silent server.
    let client = client_on(Settle::SendAfter(Duration::from_millis(1800)))
        .await
        .call_monitor(Some(Duration::from_secs(2)));
    let slept: f64 = client
        .call(&ctx(), "sleep", json!({"seconds": 0.6}))
        .await
        .expect("the call monitor starts when the request is out");
    assert_eq!(slept, 0.6);
    fx.shutdown().await;
}

pub async fn thousand_concurrent_calls_each_get_their_own_reply(backend: Backend) {
    let mut fx = Fixture::new(&backend, "concurrent");
    fx.start(2).await;
    let client = fx.client().await;
    let calls = (0..1000u64).map(|i| {
        let client = client.clone();
        async move {
            let back: u64 = client
                .call(&ctx(), "echo", json!({ "payload": i }))
                .await
                .expect("echo");
            assert_eq!(back, i);
        }
    });
    futures::future::join_all(calls).await;
    fx.shutdown().await;
}

/// Thousands of calls answered at the same moment: every caller gets its reply,
/// however far the client's reader falls behind the burst (a reply buffer or stream
/// that drops what it has not read yet loses calls here).
pub async fn burst_of_replies_reaches_every_caller(backend: Backend) {
    // Stressed copies share the burst, so the broker sees 5000 replies at once either way.
    let calls = (5000 / stress_copies()).max(250);
    let mut fx = Fixture::new(&backend, "burst");
    fx.start_with("s1", |b| b.concurrency(calls)).await;
    let client = fx.client().await;
    let recorder = fx.recorder.clone();
    // Every handler sleeps the same 2 s, so the replies leave within moments of each other.
    let sent = (0..calls).map(|_| {
        let client = client.clone();
        async move {
            client
                .call::<_, f64>(&ctx(), "sleep", json!({"seconds": 2.0}))
                .await
        }
    });
    let results = futures::future::join_all(sent).await;
    let lost = results.iter().filter(|r| r.is_err()).count();
    assert_eq!(
        lost,
        0,
        "{lost} of {calls} calls got no reply (max handlers in flight: {}); first error: {:?}",
        recorder.max_in_flight.load(Ordering::SeqCst),
        results.iter().find_map(|r| r.as_ref().err()),
    );
    fx.shutdown().await;
}

pub async fn one_mib_payload_round_trips(backend: Backend) {
    const PAYLOAD: usize = 1024 * 1024;
    let transport = backend.transport().await;
    // The request carries the payload plus the envelope and its escaping.
    if let Some(limit) = transport.capabilities().max_message_size
        && limit < PAYLOAD + 4096
    {
        skip(
            &backend,
            "one_mib_payload_round_trips",
            &format!("capability `max_message_size` is {limit} bytes, below a 1 MiB payload"),
        );
        return;
    }
    drop(transport);
    let mut fx = Fixture::new(&backend, "big_payload");
    fx.start(1).await;
    let client = fx.client().await;
    let payload: String = (0..PAYLOAD)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let back: String = client
        .call(&ctx(), "echo", json!({ "payload": payload }))
        .await
        .expect("echo 1 MiB");
    assert_eq!(back.len(), payload.len());
    assert!(back == payload);
    fx.shutdown().await;
}

pub async fn signed_messages_interoperate_and_forgeries_are_refused(backend: Backend) {
    use mqrpc::MessageAuth;
    const K0: &[u8] = b"last month's key, 32 bytes long.";
    const K1: &[u8] = b"this month's key, 32 bytes long.";
    let server_auth = MessageAuth::new("k1", K1)
        .and_then(|a| a.accept("k0", K0))
        .expect("keys");
    let mut fx = Fixture::new(&backend, "signed");
    let configured = server_auth.clone();
    fx.start_with("s1", move |b| b.message_auth(configured))
        .await;
    let signed = fx
        .client()
        .await
        .message_auth(MessageAuth::new("k1", K1).expect("key"));
    still_answers(&signed, 2, 3).await;
    // A peer still on last month's key, accepting this month's: both ways verify.
    let rotating = fx.client().await.message_auth(
        MessageAuth::new("k0", K0)
            .and_then(|a| a.accept("k1", K1))
            .expect("keys"),
    );
    still_answers(&rotating, 4, 5).await;

    // Unsigned and wrong-key requests are refused, and the callers are told why.
    let unsigned = fx.client().await;
    let err = unsigned
        .call::<_, i64>(&ctx(), "add", json!({"a": 1, "b": 1}))
        .await
        .expect_err("unsigned");
    match &err {
        Error::Authentication(why) => assert!(why.contains("not signed"), "{why}"),
        other => panic!("expected an authentication error, got {other:?}"),
    }
    let forger = fx.client().await.message_auth(
        MessageAuth::new("k1", b"a guess at the key, 32 bytes....".to_vec()).expect("key"),
    );
    let err = forger
        .call::<_, i64>(&ctx(), "add", json!({"a": 1, "b": 1}))
        .await
        .expect_err("wrong key");
    assert!(matches!(err, Error::Authentication(_)), "{err:?}");
    assert!(err.to_string().contains("does not verify"), "{err}");
    unsigned
        .cast(&ctx(), "record", json!({"id": 66}))
        .await
        .expect("the broker takes it");

    // A signed cast captured on the wire and sent again is a replay.
    let tap = backend.transport().await;
    let mut tap = tap.monitor(&Target::new(&fx.topic)).await.ok();
    signed
        .cast(&ctx(), "record", json!({"id": 7}))
        .await
        .expect("signed cast");
    fx.recorder.wait_for(1, ARRIVAL).await;
    let mut replayed = false;
    if let Some(tap) = tap.as_mut() {
        while let Ok(Some(Ok(delivery))) =
            tokio::time::timeout(Duration::from_secs(3), tap.recv()).await
        {
            let is_seven = mqrpc::wire::decode_request(delivery.body())
                .is_ok_and(|r| r.method == "record" && r.args.get("id") == Some(&json!(7)));
            if is_seven {
                let publisher = backend
                    .transport()
                    .await
                    .publisher()
                    .await
                    .expect("publisher");
                let address = Address::Topic {
                    exchange: backend.transport().await.default_exchange().to_owned(),
                    topic: fx.topic.clone(),
                };
                publisher
                    .send(&address, Outgoing::new(delivery.body().to_vec()))
                    .await
                    .expect("the broker takes the copy");
                replayed = true;
                break;
            }
        }
    }
    still_answers(&signed, 1, 1).await;
    let records = fx.recorder.settled(SETTLE * 3).await;
    let ids: Vec<u64> = records.iter().map(|(_, id)| *id).collect();
    assert_eq!(ids, [7], "only the signed cast ran, once");
    let refused = server_auth.rejections();
    assert_eq!(refused.unsigned, 2, "{refused:?}");
    assert_eq!(refused.forged, 1, "{refused:?}");
    if replayed {
        // The copy may still be on its way; wait for the server to count it.
        let deadline = Instant::now() + ARRIVAL;
        while server_auth.rejections().replayed == 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(server_auth.rejections().replayed, 1);
    } else {
        skip(
            &backend,
            "signed_messages replay",
            "the watcher does not see casts here",
        );
    }
    fx.shutdown().await;
}

pub async fn oversized_request_is_rejected_on_receipt(backend: Backend) {
    let mut fx = Fixture::new(&backend, "receive_limit");
    fx.start_with("s1", |b| b.max_message_size(4096)).await;
    let client = fx.client().await;
    // The transport's own limit lets it through; the server's smaller one does not.
    client
        .cast(&ctx(), "record", json!({"id": 1, "pad": "x".repeat(8192)}))
        .await
        .expect("the transport takes it");
    let err = client
        .clone()
        .timeout(Duration::from_secs(2))
        .call::<_, ()>(&ctx(), "record", json!({"id": 2, "pad": "x".repeat(8192)}))
        .await
        .expect_err("never answered");
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    client
        .cast(&ctx(), "record", json!({"id": 3}))
        .await
        .expect("small cast");
    fx.recorder.wait_for(1, ARRIVAL).await;
    let records = fx.recorder.settled(SETTLE).await;
    let ids: Vec<u64> = records.iter().map(|(_, id)| *id).collect();
    assert_eq!(ids, [3], "only the small request was handled");
    still_answers(&client, 1, 1).await;
    fx.shutdown().await;
}

pub async fn oversized_message_is_refused_with_a_clear_error(backend: Backend) {
    let transport = backend.transport().await;
    let Some(limit) = transport.capabilities().max_message_size else {
        skip(
            &backend,
            "oversized_message",
            "capability `max_message_size` is not set (no limit)",
        );
        return;
    };
    let client = Client::new(transport, Target::new(unique_topic("oversized")));
    // Building and encoding tens of MiB takes a debug build a while: on a blocking
    // thread, so that 20 stressed copies do not hold the runtime's workers and starve
    // the connection tasks of other copies (an AMQP handshake timed out that way).
    let runtime = tokio::runtime::Handle::current();
    let err = tokio::task::spawn_blocking(move || {
        let payload = "x".repeat(limit + 1);
        runtime.block_on(client.cast(&ctx(), "echo", json!({ "payload": payload })))
    })
    .await
    .expect("the encoding thread")
    .expect_err("too large");
    assert!(matches!(err, Error::MessageTooLarge { .. }), "{err:?}");
}

pub async fn heartbeats_keep_a_long_call_alive(backend: Backend) {
    let mut fx = Fixture::new(&backend, "heartbeat");
    fx.start(1).await;
    let client = fx.client().await;
    // The handler runs past the monitor interval; only heartbeats keep the call alive.
    let slept: f64 = client
        .prepare()
        .call_monitor(Some(Duration::from_secs(2)))
        .timeout(Duration::from_secs(20))
        .call(&ctx(), "sleep", json!({"seconds": 4.5}))
        .await
        .expect("heartbeats keep the call alive");
    assert_eq!(slept, 4.5);
    fx.shutdown().await;
}

pub async fn silent_server_fails_the_call_monitor(backend: Backend) {
    let transport = backend.transport().await;
    let topic = unique_topic("silent");
    // A listener that takes requests and never answers, as a hung server would.
    let mut silent = transport
        .listen(&Target::new(&topic).server("mute"), &ListenOptions::new(8))
        .await
        .expect("listen");
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some(Ok(delivery)) = silent.recv().await {
            held.push(delivery);
        }
    });
    let client = Client::new(backend.transport().await, Target::new(&topic));
    let started = Instant::now();
    let err = client
        .prepare()
        .call_monitor(Some(Duration::from_secs(2)))
        .timeout(Duration::from_secs(60))
        .call::<_, f64>(&ctx(), "sleep", json!({"seconds": 1}))
        .await
        .expect_err("silence fails the call");
    assert!(
        matches!(
            err,
            Error::Timeout {
                kind: TimeoutKind::CallMonitor,
                ..
            }
        ),
        "{err:?}"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(2) + TIMEOUT_MARGIN,
        "the monitor fires after its interval, long before the timeout: {waited:?}"
    );
    holder.abort();
}

/// Whether the backend keeps messages nobody has taken yet; prints a SKIP line for
/// `case` when it does not.
async fn keeps_messages(backend: &Backend, case: &str) -> bool {
    let keeps = backend
        .transport()
        .await
        .capabilities()
        .keeps_messages_without_listener;
    if !keeps {
        skip(
            backend,
            case,
            "capability `keeps_messages_without_listener` is not set",
        );
    }
    keeps
}

/// Casts `slow_record` with ids `0..total`, each handler taking `seconds`.
async fn slow_casts(client: &Client, total: u64, seconds: f64) {
    for id in 0..total {
        client
            .cast(&ctx(), "slow_record", json!({"id": id, "seconds": seconds}))
            .await
            .expect("cast");
    }
}

pub async fn graceful_stop_leaves_unhandled_requests_to_other_servers(backend: Backend) {
    if !keeps_messages(&backend, "graceful_stop_leaves_unhandled_requests").await {
        return;
    }
    let mut fx = Fixture::new(&backend, "handback");
    fx.start_with("s1", |b| b.concurrency(2)).await;
    let client = fx.client().await;
    let total = 20u64;
    slow_casts(&client, total, 0.3).await;
    // s1 is busy with two and has more read ahead when it stops.
    fx.recorder.wait_for(2, ARRIVAL).await;
    let first = fx.servers.pop().expect("s1");
    first.shutdown().await.expect("graceful stop");
    fx.start_with("s2", |b| b.concurrency(8)).await;
    fx.recorder.wait_for(total as usize, ARRIVAL).await;
    let records = fx.recorder.settled(SETTLE * 3).await;
    let counts = Recorder::per_id(&records);
    let missing: Vec<u64> = (0..total).filter(|id| !counts.contains_key(id)).collect();
    let twice: Vec<u64> = counts
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| *id)
        .collect();
    assert!(missing.is_empty(), "requests lost at the stop: {missing:?}");
    assert!(twice.is_empty(), "requests run twice: {twice:?}");
    fx.shutdown().await;
}

/// Load shedding: a server at its concurrency limit takes no more than it can run
/// (plus a small bounded prefetch); the rest waits in the broker, where a server that
/// starts later finds it.
pub async fn waiting_work_stays_in_the_broker_for_other_servers(backend: Backend) {
    if !keeps_messages(&backend, "waiting_work_stays_in_the_broker").await {
        return;
    }
    let mut fx = Fixture::new(&backend, "shedding");
    fx.start_with("s1", |b| b.concurrency(1)).await;
    let client = fx.client().await;
    let total = 24u64;
    slow_casts(&client, total, 0.5).await;
    fx.recorder.wait_for(1, ARRIVAL).await;
    fx.start_with("s2", |b| b.concurrency(8)).await;
    fx.recorder.wait_for(total as usize, ARRIVAL).await;
    let records = fx.recorder.settled(SETTLE).await;
    let counts = Recorder::per_id(&records);
    let missing: Vec<u64> = (0..total).filter(|id| !counts.contains_key(id)).collect();
    assert!(missing.is_empty(), "casts lost: {missing:?}");
    let by_s2 = records.iter().filter(|(server, _)| server == "s2").count();
    // s1 runs one at a time (2 per second) and holds only a few ahead; most of the
    // casts were still in the broker when s2 started (it may take a few seconds to
    // connect on a loaded broker).
    assert!(
        by_s2 as u64 >= total / 2,
        "s2 handled {by_s2} of {total}: the busy server took work it could not run"
    );
    fx.shutdown().await;
}

pub async fn graceful_shutdown_completes_in_flight_calls(backend: Backend) {
    let mut fx = Fixture::new(&backend, "shutdown");
    fx.start(1).await;
    let client = fx.client().await;
    let in_flight = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .call::<_, f64>(&ctx(), "sleep", json!({"seconds": 1.0}))
                .await
        })
    };
    tokio::time::timeout(ARRIVAL, fx.recorder.started.notified())
        .await
        .expect("handler started");
    let server = fx.servers.pop().expect("one server");
    server.shutdown().await.expect("shutdown");
    let result = in_flight.await.expect("task");
    assert_eq!(result.expect("in-flight call completes"), 1.0);

    // The stopped server takes no more work.
    let after = client
        .prepare()
        .timeout(Duration::from_millis(500))
        .call::<_, i64>(&ctx(), "add", json!({"a": 1, "b": 1}))
        .await
        .expect_err("nobody serves");
    assert!(
        matches!(after, Error::Timeout { .. } | Error::NoResponders { .. }),
        "{after:?}"
    );
}

pub async fn malformed_bytes_are_rejected_and_the_server_keeps_serving(backend: Backend) {
    let mut fx = Fixture::new(&backend, "malformed");
    fx.start(1).await;
    let transport = backend.transport().await;
    let publisher = transport.publisher().await.expect("publisher");
    let exchange = transport.default_exchange().to_owned();
    let deep = format!(
        r#"{{"method": "record", "args": {{"id": {}1{}}}}}"#,
        "[".repeat(5000),
        "]".repeat(5000)
    );
    let deep_inner = serde_json::to_string(&json!({
        "oslo.version": "2.0",
        "oslo.message": format!(r#"{{"method": "record", "args": {{"id": {}1{}}}}}"#,
            "[".repeat(200), "]".repeat(200)),
    }))
    .expect("json");
    let poison: Vec<&[u8]> = vec![
        b"\x00\xffnot json at all",
        b"{\"oslo.version\": \"3.0\", \"oslo.message\": \"{}\"}",
        b"{\"oslo.version\": \"2.0\", \"oslo.message\": \"{truncated\"}",
        b"{\"method\": 42}",
        b"[]",
        // Nesting far beyond wire::MAX_DEPTH (64), in the body and in oslo.message.
        deep.as_bytes(),
        deep_inner.as_bytes(),
    ];
    let addresses = [
        Address::Topic {
            exchange: exchange.clone(),
            topic: fx.topic.clone(),
        },
        Address::Server {
            exchange: exchange.clone(),
            topic: fx.topic.clone(),
            server: "s1".into(),
        },
        Address::Fanout {
            exchange,
            topic: fx.topic.clone(),
        },
    ];
    for address in &addresses {
        for body in &poison {
            publisher
                .send(address, Outgoing::new(body.to_vec()))
                .await
                .expect("broker takes any bytes");
        }
    }
    still_answers(&fx.client().await, 20, 22).await;
    fx.shutdown().await;
}

pub async fn reply_to_a_vanished_queue_is_dropped_and_the_server_keeps_serving(backend: Backend) {
    let mut fx = Fixture::new(&backend, "vanished_reply");
    fx.start(1).await;
    let transport = backend.transport().await;
    let publisher = transport.publisher().await.expect("publisher");
    // A call whose caller is gone: its reply queue does not exist (any more).
    let orphan = mqrpc::wire::Request {
        method: "record".into(),
        args: json!({"id": 5}).as_object().cloned().expect("object"),
        msg_id: Some(mqrpc::wire::new_id()),
        reply_to: Some(format!("reply_{}", mqrpc::wire::new_id())),
        unique_id: Some(mqrpc::wire::new_id()),
        ..mqrpc::wire::Request::default()
    };
    let body = mqrpc::wire::encode_request(&orphan).expect("encode");
    let address = Address::Topic {
        exchange: transport.default_exchange().to_owned(),
        topic: fx.topic.clone(),
    };
    publisher
        .send(&address, Outgoing::new(body))
        .await
        .expect("send the orphan call");
    fx.recorder.wait_for(1, ARRIVAL).await;
    still_answers(&fx.client().await, 2, 2).await;
    fx.shutdown().await;
}

pub async fn monitor_sees_a_topics_traffic_without_taking_it(backend: Backend) {
    let mut fx = Fixture::new(&backend, "monitor");
    fx.start(1).await;
    let transport = backend.transport().await;
    let mut tap = match transport.monitor(&Target::new(&fx.topic)).await {
        Ok(tap) => tap,
        Err(Error::Unsupported(why)) => {
            skip(&backend, "monitor_sees_a_topics_traffic", &why);
            return;
        }
        Err(err) => panic!("monitor: {err}"),
    };
    let client = fx.client().await;
    let sum: i64 = client
        .call(&ctx(), "add", json!({"a": 1, "b": 2}))
        .await
        .expect("the server still answers");
    assert_eq!(sum, 3);
    directed_and_fanout_work(&client).await;
    fx.recorder.wait_for(1, ARRIVAL).await;
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let delivery = tokio::time::timeout(ARRIVAL, tap.recv())
            .await
            .expect("the watcher sees the traffic")
            .expect("open")
            .expect("delivery");
        let request = mqrpc::wire::decode_request(delivery.body()).expect("a request");
        seen.push(request.method);
    }
    seen.sort();
    assert_eq!(seen, ["add", "record", "whoami"]);
    fx.shutdown().await;
}

pub async fn concurrency_limit_bounds_in_flight_handlers(backend: Backend) {
    let mut fx = Fixture::new(&backend, "concurrency");
    fx.start_with("s1", |b| b.concurrency(2)).await;
    let client = fx.client().await;
    let calls = (0..6).map(|_| {
        let client = client.clone();
        async move {
            client
                .call::<_, f64>(&ctx(), "sleep", json!({"seconds": 0.2}))
                .await
                .expect("sleep")
        }
    });
    futures::future::join_all(calls).await;
    let max = fx.recorder.max_in_flight.load(Ordering::SeqCst);
    assert!(
        (1..=2).contains(&max),
        "at most 2 handlers at once, saw {max}"
    );
    fx.shutdown().await;
}

pub async fn namespaces_select_the_endpoint(backend: Backend) {
    let topic = unique_topic("namespaces");
    let transport = backend.transport().await;
    let server = Server::builder(transport, Target::new(&topic).server("s1"))
        .endpoint(
            mqrpc::Endpoint::new()
                .namespace("left")
                .method("side", |_ctx: Context, _args: mqrpc::NoArgs| async move {
                    Ok::<_, mqrpc::RemoteError>("left")
                }),
        )
        .endpoint(
            mqrpc::Endpoint::new()
                .method("side", |_ctx: Context, _args: mqrpc::NoArgs| async move {
                    Ok::<_, mqrpc::RemoteError>("null")
                }),
        )
        .start()
        .await
        .expect("server");
    let client = Client::new(backend.transport().await, Target::new(&topic));
    let null: String = client
        .call(&ctx(), "side", json!({}))
        .await
        .expect("null ns");
    let left: String = client
        .prepare()
        .namespace("left")
        .call(&ctx(), "side", json!({}))
        .await
        .expect("left ns");
    assert_eq!((null.as_str(), left.as_str()), ("null", "left"));
    server.shutdown().await.expect("shutdown");
}

pub async fn cast_before_any_server_waits_for_one(backend: Backend) {
    let transport = backend.transport().await;
    if !transport.capabilities().keeps_messages_without_listener {
        skip(
            &backend,
            "cast_before_any_server_waits_for_one",
            "capability `keeps_messages_without_listener` is not set",
        );
        return;
    }
    let mut fx = Fixture::new(&backend, "early_cast");
    // The queue exists once a server has listened; a fresh topic is declared by a
    // first server that then goes away.
    fx.start(1).await;
    fx.servers
        .pop()
        .expect("server")
        .shutdown()
        .await
        .expect("shutdown");
    let client = fx.client().await;
    client
        .cast(&ctx(), "record", json!({"id": 1}))
        .await
        .expect("cast");
    fx.start(1).await;
    fx.recorder.wait_for(1, ARRIVAL).await;
    fx.shutdown().await;
}

pub async fn send_to_missing_server_is_reported_at_once(backend: Backend) {
    let transport = backend.transport().await;
    if !transport.capabilities().reports_no_responders {
        skip(
            &backend,
            "send_to_missing_server_is_reported_at_once",
            "capability `reports_no_responders` is not set",
        );
        return;
    }
    let client = Client::new(transport, Target::new(unique_topic("no_responders")));
    let err = client
        .call::<_, i64>(&ctx(), "add", json!({"a": 1, "b": 1}))
        .await
        .expect_err("nobody listens");
    assert!(matches!(err, Error::NoResponders { .. }), "{err:?}");
}

pub async fn unsettled_delivery_is_redelivered_to_another_server(backend: Backend) {
    let transport = backend.transport().await;
    if !transport.capabilities().redelivers_unacked {
        skip(
            &backend,
            "unsettled_delivery_is_redelivered",
            "capability `redelivers_unacked` is not set",
        );
        return;
    }
    let mut fx = Fixture::new(&backend, "redeliver");
    // A server that takes the message and dies before acknowledging it.
    let mut dying = transport
        .listen(
            &Target::new(&fx.topic).server("dying"),
            &ListenOptions::new(1),
        )
        .await
        .expect("listen");
    let client = fx.client().await;
    client
        .cast(&ctx(), "record", json!({"id": 99}))
        .await
        .expect("cast");
    let taken = tokio::time::timeout(ARRIVAL, dying.recv())
        .await
        .expect("delivered")
        .expect("open")
        .expect("delivery");
    drop(taken);
    drop(dying);
    drop(transport);
    fx.start_with("s1", |b| b.ack_mode(AckMode::AfterHandling))
        .await;
    fx.recorder.wait_for(1, ARRIVAL).await;
    let records = fx.recorder.settled(SETTLE).await;
    assert_eq!(records, vec![("s1".to_owned(), 99)]);
    fx.shutdown().await;
}

/// Expands to one `#[tokio::test]` per conformance case for a backend. `$backend` is
/// an async fn returning `Option<Backend>` (`None`: broker absent, already reported).
macro_rules! conformance_suite {
    ($backend:path) => {
        conformance_suite!(@cases $backend;
            typed_call,
            context_round_trip_keeps_unknown_keys,
            cast_to_topic_with_n_servers_is_handled_once,
            directed_call_reaches_only_its_server,
            fanout_cast_reaches_every_server_once,
            call_on_fanout_target_is_invalid,
            multicall_streams_items_in_order_then_ends,
            multicall_stream_outlives_its_client,
            remote_error_decodes_to_the_handler_type,
            handler_panic_is_a_remote_failure_and_server_keeps_serving,
            unknown_method_is_no_such_method,
            version_rules_follow_oslo,
            private_methods_are_never_dispatched,
            endless_timeouts_are_capped_not_a_panic,
            timeout_fires_and_late_reply_does_not_disturb_next_call,
            call_proceeds_on_the_reply_or_the_publish_failure_whichever_comes_first,
            thousand_concurrent_calls_each_get_their_own_reply,
            burst_of_replies_reaches_every_caller,
            retry_policy_sends_an_idempotent_call_again,
            one_mib_payload_round_trips,
            oversized_message_is_refused_with_a_clear_error,
            oversized_request_is_rejected_on_receipt,
            signed_messages_interoperate_and_forgeries_are_refused,
            heartbeats_keep_a_long_call_alive,
            silent_server_fails_the_call_monitor,
            graceful_shutdown_completes_in_flight_calls,
            graceful_stop_leaves_unhandled_requests_to_other_servers,
            waiting_work_stays_in_the_broker_for_other_servers,
            malformed_bytes_are_rejected_and_the_server_keeps_serving,
            reply_to_a_vanished_queue_is_dropped_and_the_server_keeps_serving,
            concurrency_limit_bounds_in_flight_handlers,
            monitor_sees_a_topics_traffic_without_taking_it,
            namespaces_select_the_endpoint,
            cast_before_any_server_waits_for_one,
            send_to_missing_server_is_reported_at_once,
            unsettled_delivery_is_redelivered_to_another_server,
            argument_decode_panic_is_a_remote_failure,
            multicall_stream_stops_at_the_callers_deadline,
            grace_period_end_fails_unfinished_calls_at_once,
            long_and_non_ascii_topics_are_served,
            typed_service_call_returns_typed_results,
            typed_service_cast_runs_on_the_server,
            typed_service_stream_yields_items_in_order_then_ends,
            typed_service_error_decodes_to_the_method_type,
            typed_service_version_is_refused_by_older_servers,
            typed_service_directed_call_reaches_only_its_server,
            typed_service_fanout_cast_reaches_every_server_once,
            typed_service_speaks_the_hand_written_wire,
            health_is_consuming_while_serving_and_stopped_after_shutdown,
            health_is_stopping_while_the_grace_period_runs,
            a_dropped_server_reports_stopped,
            discovery_finds_every_server_with_its_details,
            discovery_works_with_message_signing,
            undiscoverable_server_does_not_answer,
            oslo_ping_is_answered_when_turned_on,
        );
        conformance_suite!(@notifications $backend;
            notification_reaches_a_listener_with_all_it_was_sent_with,
            a_listener_takes_only_the_priorities_it_handles,
            every_pool_gets_each_notification_and_a_pool_shares_them,
            filters_pick_the_notifications_an_endpoint_wants,
            requeued_notification_comes_back_until_handled,
            notifications_sent_before_any_listener_are_kept,
            malformed_notification_is_rejected_and_the_listener_keeps_running,
        );
        conformance_suite!(@metrics $backend;
            metrics_count_a_known_sequence_of_calls,
        );
        conformance_suite!(@otel $backend;
            tracing_links_client_and_server_spans,
            tracing_marks_a_remote_error_on_both_spans,
        );
    };
    // Cases of the `otel` feature: on the current thread, whose default subscriber
    // holds the case's span exporter, and not stressed (copies would share it).
    (@otel $backend:path; $($case:ident),* $(,)?) => {
        $(
            #[cfg(feature = "otel")]
            #[tokio::test(flavor = "current_thread")]
            async fn $case() {
                let Some(backend) = $backend().await else { return };
                $crate::suite::bounded(stringify!($case), $crate::suite::$case(backend)).await;
            }
        )*
    };
    // Cases of notifications: skipped, loudly, on a backend without them.
    (@notifications $backend:path; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let Some(backend) = $backend().await else { return };
                if !backend.transport().await.capabilities().notifications {
                    $crate::suite::skip_case(&backend, stringify!($case), "the backend has no notifications yet");
                    return;
                }
                $crate::suite::stressed(stringify!($case), backend, $crate::suite::$case).await;
            }
        )*
    };
    // Cases of the `metrics` feature (of the `mqrpc` package these tests belong to).
    (@metrics $backend:path; $($case:ident),* $(,)?) => {
        $(
            #[cfg(feature = "metrics")]
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let Some(backend) = $backend().await else { return };
                $crate::suite::stressed(stringify!($case), backend, $crate::suite::$case).await;
            }
        )*
    };
    (@cases $backend:path; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let Some(backend) = $backend().await else { return };
                $crate::suite::stressed(stringify!($case), backend, $crate::suite::$case).await;
            }
        )*
    };
}
