//! Cases of the typed-services issue (#25) that every backend must pass: a service
//! declared with `#[mqrpc::service]` is called, cast to, streamed from, fails with
//! its own error type, refuses versions it does not implement, reaches one named
//! server or all of them, and speaks the same wire as hand-written endpoints and
//! clients.
//!
//! Each typed server runs beside the hand-written test service of [`Fixture`]
//! (`crate::service`, null namespace); the typed service has a namespace of its
//! own, so every typed request also checks that the namespace selects its endpoint.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::{Stream, StreamExt};
use mqrpc::transport::{Address, ListenOptions, Outgoing};
use mqrpc::wire::{Reply, Request};
use mqrpc::{Client, Context, Error, Target, Version};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::mpsc;

use super::{ARRIVAL, Backend, Fixture, SETTLE, ctx, unique_topic};

/// The typed service's namespace; the hand-written service has none.
const NAMESPACE: &str = "typed_calc";

/// The typed service's own error type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CalcError {
    /// A unit variant.
    Overflow,
    /// A struct variant with data.
    OutOfRange { value: i64, max: i64 },
    /// A newtype variant, ending a stream.
    StoppedAt(u32),
}

impl std::fmt::Display for CalcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CalcError::Overflow => f.write_str("result does not fit in an i64"),
            CalcError::OutOfRange { value, max } => write!(f, "{value} is above {max}"),
            CalcError::StoppedAt(at) => write!(f, "stopped at {at}"),
        }
    }
}

/// A struct argument.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Query {
    pub label: String,
    pub tags: Vec<String>,
}

/// A struct result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub server: String,
    pub label: String,
    pub tags: Vec<String>,
    pub total: u64,
    pub note: Option<String>,
}

/// The typed service of these cases, at version 1.3.
#[mqrpc::service(version = "1.3", namespace = "typed_calc")]
trait Calc {
    /// Adds; overflow is a typed error.
    async fn add(&self, ctx: &Context, a: i64, b: i64) -> Result<i64, CalcError>;
    /// The server's name: a method without arguments.
    async fn whoami(&self, ctx: &Context) -> String;
    /// A struct in, a struct out.
    async fn stats(&self, ctx: &Context, query: Query) -> Stats;
    /// `value` back, or a struct-variant error above 10.
    async fn check(&self, ctx: &Context, value: i64) -> Result<i64, CalcError>;
    /// Panics.
    async fn explode(&self, ctx: &Context) -> u64;
    /// Adds `by` to the total and reports it on the service's channel.
    #[mqrpc(cast)]
    async fn bump(&self, ctx: &Context, by: u64);
    /// The total of the bumps.
    async fn total(&self, ctx: &Context) -> u64;
    /// `0..n`, one reply each.
    #[mqrpc(stream)]
    fn count(&self, ctx: &Context, n: u32) -> impl Stream<Item = Result<u32, CalcError>>;
    /// `0..n`, then a typed error.
    #[mqrpc(stream)]
    fn count_then_fail(&self, ctx: &Context, n: u32) -> impl Stream<Item = Result<u32, CalcError>>;
    /// Multiplies; added in 1.2.
    #[mqrpc(since = "1.2")]
    async fn mul(&self, ctx: &Context, a: i64, b: i64) -> Result<i64, CalcError>;
    /// Adds, under other names on the wire.
    #[mqrpc(name = "sum_of")]
    async fn add_renamed(
        &self,
        ctx: &Context,
        #[mqrpc(name = "left")] x: i64,
        #[mqrpc(name = "right")] y: i64,
    ) -> i64;
}

/// The same service as an older server implements it: version 1.1, without `mul`.
#[mqrpc::service(version = "1.1", namespace = "typed_calc", client = "OldCalcClient")]
trait OldCalc {
    /// Adds.
    async fn add(&self, ctx: &Context, a: i64, b: i64) -> Result<i64, CalcError>;
}

/// What one typed server reports of the casts it ran: `(server, by)`.
type Bumps = mpsc::UnboundedSender<(String, u64)>;

/// The implementation of [`Calc`] on server `name`.
struct TypedCalc {
    name: String,
    total: AtomicU64,
    bumps: Bumps,
}

impl TypedCalc {
    fn new(name: &str, bumps: &Bumps) -> Arc<Self> {
        Arc::new(TypedCalc {
            name: name.to_owned(),
            total: AtomicU64::new(0),
            bumps: bumps.clone(),
        })
    }
}

impl Calc for TypedCalc {
    async fn add(&self, _ctx: &Context, a: i64, b: i64) -> Result<i64, CalcError> {
        a.checked_add(b).ok_or(CalcError::Overflow)
    }

    async fn whoami(&self, _ctx: &Context) -> String {
        self.name.clone()
    }

    async fn stats(&self, _ctx: &Context, query: Query) -> Stats {
        Stats {
            server: self.name.clone(),
            label: query.label,
            tags: query.tags,
            total: self.total.load(Ordering::SeqCst),
            note: None,
        }
    }

    async fn check(&self, _ctx: &Context, value: i64) -> Result<i64, CalcError> {
        if value > 10 {
            return Err(CalcError::OutOfRange { value, max: 10 });
        }
        Ok(value)
    }

    async fn explode(&self, _ctx: &Context) -> u64 {
        panic!("deliberate typed panic")
    }

    async fn bump(&self, _ctx: &Context, by: u64) {
        self.total.fetch_add(by, Ordering::SeqCst);
        // The receiver is gone only once the case is over.
        let _ = self.bumps.send((self.name.clone(), by));
    }

    async fn total(&self, _ctx: &Context) -> u64 {
        self.total.load(Ordering::SeqCst)
    }

    fn count(&self, _ctx: &Context, n: u32) -> impl Stream<Item = Result<u32, CalcError>> {
        futures::stream::iter((0..n).map(Ok))
    }

    fn count_then_fail(
        &self,
        _ctx: &Context,
        n: u32,
    ) -> impl Stream<Item = Result<u32, CalcError>> {
        futures::stream::iter((0..=n).map(move |i| {
            if i < n {
                Ok(i)
            } else {
                Err(CalcError::StoppedAt(i))
            }
        }))
    }

    async fn mul(&self, _ctx: &Context, a: i64, b: i64) -> Result<i64, CalcError> {
        a.checked_mul(b).ok_or(CalcError::Overflow)
    }

    async fn add_renamed(&self, _ctx: &Context, x: i64, y: i64) -> i64 {
        x + y
    }
}

/// The implementation of [`OldCalc`].
struct OlderCalc;

impl OldCalc for OlderCalc {
    async fn add(&self, _ctx: &Context, a: i64, b: i64) -> Result<i64, CalcError> {
        a.checked_add(b).ok_or(CalcError::Overflow)
    }
}

/// Starts server `server` of the fixture's topic serving [`Calc`] (beside the
/// hand-written test service).
async fn start_typed(fx: &mut Fixture, server: &str, bumps: &Bumps) {
    let service = TypedCalc::new(server, bumps);
    fx.start_with(server, |builder| builder.endpoint(Calc::endpoint(service)))
        .await;
}

/// A typed client of the fixture's topic, on a connection of its own.
async fn typed_client(fx: &Fixture) -> CalcClient {
    CalcClient::from_client(fx.client().await)
}

/// The next bump a server reported; panics after [`ARRIVAL`].
async fn next_bump(bumps: &mut mpsc::UnboundedReceiver<(String, u64)>) -> (String, u64) {
    tokio::time::timeout(ARRIVAL, bumps.recv())
        .await
        .expect("the server ran the cast in time")
        .expect("the servers are up")
}

/// Waits [`SETTLE`] so that duplicates would show, then says no bump came.
async fn no_more_bumps(bumps: &mut mpsc::UnboundedReceiver<(String, u64)>) {
    tokio::time::sleep(SETTLE).await;
    let extra = bumps.try_recv();
    assert!(
        matches!(extra, Err(mpsc::error::TryRecvError::Empty)),
        "a cast ran more often than sent: {extra:?}"
    );
}

pub async fn typed_service_call_returns_typed_results(backend: Backend) {
    let mut fx = Fixture::new(&backend, "typed_service_call");
    let (bumps, _seen) = mpsc::unbounded_channel();
    start_typed(&mut fx, "s1", &bumps).await;
    let client = typed_client(&fx).await;

    assert_eq!(client.add(&ctx(), 2, 40).await.expect("add"), 42);
    assert_eq!(client.add(&ctx(), -7, 3).await.expect("add"), -4);
    assert_eq!(client.whoami(&ctx()).await.expect("whoami"), "s1");
    let query = Query {
        label: "naïve ☃".into(),
        tags: vec!["a".into(), "ü".into()],
    };
    let stats = client.stats(&ctx(), query.clone()).await.expect("stats");
    assert_eq!(
        stats,
        Stats {
            server: "s1".into(),
            label: query.label,
            tags: query.tags,
            total: 0,
            note: None,
        }
    );
    // The hand-written service of the same server still answers in its namespace.
    let sum: i64 = fx
        .client()
        .await
        .call(&ctx(), "add", json!({"a": 1, "b": 2}))
        .await
        .expect("the hand-written add");
    assert_eq!(sum, 3);
    fx.shutdown().await;
}

pub async fn typed_service_cast_runs_on_the_server(backend: Backend) {
    let mut fx = Fixture::new(&backend, "typed_service_cast");
    let (bumps, mut seen) = mpsc::unbounded_channel();
    start_typed(&mut fx, "s1", &bumps).await;
    let client = typed_client(&fx).await;
    client.bump(&ctx(), 7).await.expect("cast");
    assert_eq!(next_bump(&mut seen).await, ("s1".to_owned(), 7));
    client.bump(&ctx(), 5).await.expect("cast");
    assert_eq!(next_bump(&mut seen).await, ("s1".to_owned(), 5));
    no_more_bumps(&mut seen).await;
    // The casts changed the server's state.
    assert_eq!(client.total(&ctx()).await.expect("total"), 12);
    fx.shutdown().await;
}

pub async fn typed_service_stream_yields_items_in_order_then_ends(backend: Backend) {
    let mut fx = Fixture::new(&backend, "typed_service_stream");
    let (bumps, _seen) = mpsc::unbounded_channel();
    start_typed(&mut fx, "s1", &bumps).await;
    let client = typed_client(&fx).await;

    let items: Vec<u32> = client
        .count(&ctx(), 40)
        .await
        .expect("count")
        .map(|item| item.expect("item"))
        .collect()
        .await;
    assert_eq!(items, (0..40).collect::<Vec<_>>());

    let empty: Vec<u32> = client
        .count(&ctx(), 0)
        .await
        .expect("count")
        .map(|item| item.expect("item"))
        .collect()
        .await;
    assert!(empty.is_empty(), "{empty:?}");

    // An error item ends the stream after the items before it, as its own type.
    let mut failing = client
        .count_then_fail(&ctx(), 2)
        .await
        .expect("count_then_fail");
    assert_eq!(failing.next().await.map(|r| r.expect("0")), Some(0));
    assert_eq!(failing.next().await.map(|r| r.expect("1")), Some(1));
    let err = failing
        .next()
        .await
        .expect("an error item")
        .expect_err("the error");
    assert_eq!(
        err.decode_remote::<CalcError>(),
        Some(CalcError::StoppedAt(2))
    );
    assert!(
        failing.next().await.is_none(),
        "the stream ends after the error"
    );
    fx.shutdown().await;
}

pub async fn typed_service_error_decodes_to_the_method_type(backend: Backend) {
    let mut fx = Fixture::new(&backend, "typed_service_error");
    let (bumps, _seen) = mpsc::unbounded_channel();
    start_typed(&mut fx, "s1", &bumps).await;
    let client = typed_client(&fx).await;

    // A unit variant and a struct variant come back as the same values.
    let err = client
        .add(&ctx(), i64::MAX, 1)
        .await
        .expect_err("overflows");
    assert_eq!(err.decode_remote::<CalcError>(), Some(CalcError::Overflow));
    let err = client.check(&ctx(), 11).await.expect_err("out of range");
    assert_eq!(
        err.decode_remote::<CalcError>(),
        Some(CalcError::OutOfRange { value: 11, max: 10 })
    );
    // Class and module are the Rust type's, the message is its Display.
    let remote = err.as_remote().expect("a remote error");
    assert_eq!(remote.class, "CalcError");
    assert_eq!(
        format!("{}::{}", remote.module, remote.class),
        std::any::type_name::<CalcError>()
    );
    assert_eq!(remote.message, "11 is above 10");
    assert_eq!(client.check(&ctx(), 10).await.expect("in range"), 10);

    // A panic is the caller's RuntimeError, and the server keeps serving.
    for _ in 0..3 {
        let err = client.explode(&ctx()).await.expect_err("panics");
        let remote = err.as_remote().expect("a remote error");
        assert_eq!(remote.class, "RuntimeError");
        assert!(
            remote.message.contains("deliberate typed panic"),
            "{remote}"
        );
    }
    assert_eq!(client.add(&ctx(), 1, 1).await.expect("still serving"), 2);

    // Arguments that do not fit the method are the caller's TypeError, as for the
    // hand-written service's `add`.
    let plain = fx.client().await;
    let bad = json!({"a": "one", "b": 2});
    let typed_err = plain
        .prepare()
        .namespace(NAMESPACE)
        .call::<_, i64>(&ctx(), "add", bad.clone())
        .await
        .expect_err("bad args");
    let hand_err = plain
        .call::<_, i64>(&ctx(), "add", bad)
        .await
        .expect_err("bad args");
    let (typed, hand) = (
        typed_err.as_remote().expect("a remote error"),
        hand_err.as_remote().expect("a remote error"),
    );
    assert_eq!(typed.class, "TypeError");
    assert_eq!(
        (typed.module.as_str(), typed.class.as_str()),
        (hand.module.as_str(), hand.class.as_str())
    );
    // A missing argument too.
    let err = plain
        .prepare()
        .namespace(NAMESPACE)
        .call::<_, i64>(&ctx(), "add", json!({"a": 1}))
        .await
        .expect_err("missing argument");
    assert_eq!(err.as_remote().map(|r| r.class.as_str()), Some("TypeError"));
    assert_eq!(client.add(&ctx(), 2, 2).await.expect("still serving"), 4);
    fx.shutdown().await;
}

pub async fn typed_service_version_is_refused_by_older_servers(backend: Backend) {
    let (bumps, _seen) = mpsc::unbounded_channel();

    // A server of the same service at 1.1, without `mul`.
    let mut older = Fixture::new(&backend, "typed_service_old");
    older
        .start_with("s1", |builder| {
            builder.endpoint(OldCalc::endpoint(Arc::new(OlderCalc)))
        })
        .await;
    let client = typed_client(&older).await;
    // `add` asks for 1.0, which 1.1 serves; `mul` asks for 1.2, which it does not.
    assert_eq!(client.add(&ctx(), 2, 3).await.expect("add at 1.0"), 5);
    let err = client.mul(&ctx(), 4, 5).await.expect_err("1.2 refused");
    assert!(
        matches!(&err, Error::UnsupportedVersion { version, method }
            if version == "1.2" && method == "mul"),
        "{err:?}"
    );
    assert_eq!(client.add(&ctx(), 1, 1).await.expect("still serving"), 2);
    // Capped at the older server's version, the client refuses `mul` itself (oslo's
    // `version_cap`) and still sends what the cap allows.
    let capped = client.prepare().version_cap(Some(Version::new(1, 1)));
    assert!(capped.can_send_version(Version::new(1, 1)));
    assert!(!capped.can_send_version(Version::new(1, 2)));
    let err = capped.mul(&ctx(), 4, 5).await.expect_err("above the cap");
    assert!(
        matches!(&err, Error::VersionCap { version, cap, method }
            if version == "1.2" && cap == "1.1" && method == "mul"),
        "{err:?}"
    );
    assert_eq!(err.kind(), mqrpc::ErrorKind::NotServed);
    assert_eq!(capped.add(&ctx(), 2, 2).await.expect("within the cap"), 4);
    older.shutdown().await;

    // A server at 1.3 serves `mul`, and the older client; 2.0 is refused.
    let mut current = Fixture::new(&backend, "typed_service_new");
    start_typed(&mut current, "s1", &bumps).await;
    let client = typed_client(&current).await;
    assert_eq!(client.mul(&ctx(), 4, 5).await.expect("mul at 1.2"), 20);
    let old_client = OldCalcClient::from_client(current.client().await);
    assert_eq!(old_client.add(&ctx(), 2, 3).await.expect("old client"), 5);
    for refused in [Version::new(2, 0), Version::new(1, 4)] {
        let err = client
            .prepare()
            .version(refused)
            .add(&ctx(), 1, 1)
            .await
            .expect_err("refused");
        assert!(
            matches!(&err, Error::UnsupportedVersion { version, method }
                if *version == refused.to_string() && method == "add"),
            "{refused}: {err:?}"
        );
    }
    // A version the server implements is asked for even by a method added later.
    let sum = client
        .prepare()
        .version(Version::new(1, 3))
        .mul(&ctx(), 3, 3)
        .await
        .expect("1.3 served");
    assert_eq!(sum, 9);
    current.shutdown().await;
}

pub async fn typed_service_directed_call_reaches_only_its_server(backend: Backend) {
    let mut fx = Fixture::new(&backend, "typed_service_directed");
    let (bumps, mut seen) = mpsc::unbounded_channel();
    start_typed(&mut fx, "s1", &bumps).await;
    start_typed(&mut fx, "s2", &bumps).await;
    let client = typed_client(&fx).await;
    let to_s2 = client.prepare().server("s2");
    for _ in 0..10 {
        assert_eq!(to_s2.whoami(&ctx()).await.expect("whoami"), "s2");
    }
    for by in 1..=3 {
        to_s2.bump(&ctx(), by).await.expect("directed cast");
    }
    // A server may run its casts in any order; each arrives, at s2.
    let mut reached = Vec::new();
    for _ in 1..=3 {
        reached.push(next_bump(&mut seen).await);
    }
    reached.sort();
    let s2 = |by| ("s2".to_owned(), by);
    assert_eq!(reached, [s2(1), s2(2), s2(3)]);
    no_more_bumps(&mut seen).await;
    assert_eq!(to_s2.total(&ctx()).await.expect("total"), 6);
    assert_eq!(
        client
            .prepare()
            .server("s1")
            .total(&ctx())
            .await
            .expect("total"),
        0
    );
    fx.shutdown().await;
}

pub async fn typed_service_fanout_cast_reaches_every_server_once(backend: Backend) {
    let mut fx = Fixture::new(&backend, "typed_service_fanout");
    let (bumps, mut seen) = mpsc::unbounded_channel();
    start_typed(&mut fx, "s1", &bumps).await;
    start_typed(&mut fx, "s2", &bumps).await;
    let client = typed_client(&fx).await;
    client
        .prepare()
        .fanout(true)
        .bump(&ctx(), 9)
        .await
        .expect("fanout cast");
    let mut reached = vec![next_bump(&mut seen).await, next_bump(&mut seen).await];
    reached.sort();
    assert_eq!(
        reached,
        [("s1".to_owned(), 9), ("s2".to_owned(), 9)],
        "each server once"
    );
    no_more_bumps(&mut seen).await;
    // A call on a fanout target is refused, as for hand-written clients.
    let err = client
        .prepare()
        .fanout(true)
        .add(&ctx(), 1, 1)
        .await
        .expect_err("fanout call");
    assert!(matches!(err, Error::InvalidTarget(_)), "{err:?}");
    fx.shutdown().await;
}

/// A server written against the wire alone: it answers every call with `5` and
/// hands each request, as decoded, to the case.
async fn raw_server(
    backend: &Backend,
    topic: &str,
) -> (
    mpsc::UnboundedReceiver<Request>,
    tokio::task::JoinHandle<()>,
) {
    let transport = backend.transport().await;
    let mut consumer = transport
        .listen(&Target::new(topic).server("raw"), &ListenOptions::new(8))
        .await
        .expect("listen");
    let publisher = transport.publisher().await.expect("publisher");
    let (requests, seen) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let _transport = transport;
        while let Some(delivery) = consumer.recv().await {
            let delivery = delivery.expect("a delivery");
            let request = mqrpc::wire::decode_request(delivery.body()).expect("a request");
            if let (Some(msg_id), Some(reply_to)) = (&request.msg_id, &request.reply_to) {
                let body =
                    mqrpc::wire::encode_reply(&Reply::result(msg_id, json!(5))).expect("encode");
                let mut reply = Outgoing::new(body);
                reply.mandatory = true;
                publisher
                    .send(&Address::Reply(reply_to.clone()), reply)
                    .await
                    .expect("reply");
            }
            delivery.ack().await.expect("ack");
            if requests.send(request).is_err() {
                break;
            }
        }
    });
    (seen, task)
}

/// The next request the raw server saw; panics after [`ARRIVAL`].
async fn next_request(seen: &mut mpsc::UnboundedReceiver<Request>) -> Request {
    tokio::time::timeout(ARRIVAL, seen.recv())
        .await
        .expect("the raw server saw the request")
        .expect("the raw server runs")
}

/// What a server reads of a request: method, keyword arguments, namespace, version
/// and context.
fn wire_view(
    request: &Request,
) -> (
    String,
    serde_json::Value,
    Option<String>,
    Option<String>,
    Context,
) {
    (
        request.method.clone(),
        serde_json::Value::Object(request.args.clone()),
        request.namespace.clone(),
        request.version.clone(),
        request.context.clone(),
    )
}

pub async fn typed_service_speaks_the_hand_written_wire(backend: Backend) {
    let topic = unique_topic("typed_service_wire");
    let (mut seen, raw) = raw_server(&backend, &topic).await;
    let transport = backend.transport().await;
    let plain = Client::new(transport, Target::new(&topic)).timeout(Duration::from_secs(30));
    let typed = CalcClient::from_client(plain.clone());
    let hand = plain
        .prepare()
        .namespace(NAMESPACE)
        .version(Version::new(1, 0));
    let sent = Context::new()
        .with("user", "alice")
        .with("request_id", "req-25");

    // The typed call and the hand-written one are the same request.
    assert_eq!(typed.add(&sent, 2, 3).await.expect("typed add"), 5);
    let by_typed = next_request(&mut seen).await;
    let sum: i64 = hand
        .call(&sent, "add", json!({"a": 2, "b": 3}))
        .await
        .expect("hand-written add");
    assert_eq!(sum, 5);
    let by_hand = next_request(&mut seen).await;
    assert_eq!(wire_view(&by_typed), wire_view(&by_hand));
    assert_eq!(
        wire_view(&by_typed),
        (
            "add".to_owned(),
            json!({"a": 2, "b": 3}),
            Some(NAMESPACE.to_owned()),
            Some("1.0".to_owned()),
            sent.clone(),
        )
    );
    assert!(by_typed.is_call() && by_hand.is_call());

    // Renamed method and arguments travel under their wire names.
    assert_eq!(typed.add_renamed(&sent, 2, 3).await.expect("renamed"), 5);
    let renamed = next_request(&mut seen).await;
    assert_eq!(
        (
            renamed.method.as_str(),
            serde_json::Value::Object(renamed.args)
        ),
        ("sum_of", json!({"left": 2, "right": 3}))
    );
    // A method added later asks for its version.
    assert_eq!(typed.mul(&sent, 2, 3).await.expect("mul"), 5);
    let mul = next_request(&mut seen).await;
    assert_eq!(
        (mul.method.as_str(), mul.version.as_deref()),
        ("mul", Some("1.2"))
    );
    // A cast is a request without reply address.
    typed.bump(&sent, 4).await.expect("cast");
    let cast = next_request(&mut seen).await;
    assert_eq!(
        (
            cast.method.as_str(),
            serde_json::Value::Object(cast.args.clone()),
            cast.is_call()
        ),
        ("bump", json!({"by": 4}), false)
    );
    raw.abort();

    // The macro's server answers a hand-written client as it answers the typed one.
    let mut fx = Fixture::new(&backend, "typed_service_wire_server");
    let (bumps, _bumped) = mpsc::unbounded_channel();
    start_typed(&mut fx, "s1", &bumps).await;
    let typed = typed_client(&fx).await;
    let hand = fx.client().await.namespace(NAMESPACE);
    let sum: i64 = hand
        .call(&ctx(), "add", json!({"a": 2, "b": 3}))
        .await
        .expect("hand-written add");
    assert_eq!(sum, typed.add(&ctx(), 2, 3).await.expect("typed add"));
    let sum: i64 = hand
        .call(&ctx(), "sum_of", json!({"left": 2, "right": 3}))
        .await
        .expect("hand-written sum_of");
    assert_eq!(sum, 5);
    let stats: Stats = hand
        .call(
            &ctx(),
            "stats",
            json!({"query": {"label": "x", "tags": []}}),
        )
        .await
        .expect("hand-written stats");
    assert_eq!(
        stats,
        typed
            .stats(
                &ctx(),
                Query {
                    label: "x".into(),
                    tags: vec![]
                }
            )
            .await
            .expect("typed stats")
    );
    let hand_err = hand
        .call::<_, i64>(&ctx(), "add", json!({"a": i64::MAX, "b": 1}))
        .await
        .expect_err("overflows");
    let typed_err = typed.add(&ctx(), i64::MAX, 1).await.expect_err("overflows");
    assert_eq!(hand_err.as_remote(), typed_err.as_remote());
    assert_eq!(
        hand_err.decode_remote::<CalcError>(),
        Some(CalcError::Overflow)
    );
    // The Rust names are not on the wire.
    for (method, args) in [
        ("add_renamed", json!({"left": 1, "right": 2})),
        ("sum_of", json!({"x": 1, "y": 2})),
    ] {
        let err = hand
            .call::<_, i64>(&ctx(), method, args)
            .await
            .expect_err("not the wire names");
        match method {
            "add_renamed" => assert!(
                matches!(&err, Error::NoSuchMethod { method } if method == "add_renamed"),
                "{err:?}"
            ),
            _ => assert_eq!(
                err.as_remote().map(|r| r.class.as_str()),
                Some("TypeError"),
                "{err:?}"
            ),
        }
    }
    fx.shutdown().await;
}
