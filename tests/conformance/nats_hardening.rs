//! Issue #22 on NATS, core and JetStream (`nats::hardening::`): a server holds no
//! more request bytes than its budget (core NATS drops and counts the rest,
//! JetStream leaves it in the stream), long and non-ASCII topics are served,
//! connecting is bounded by `connect_timeout`, replies go only to client inboxes, and
//! a stream to a caller that has gone stops.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use mqrpc::transport::ByteBudget;
use mqrpc::{Client, Context, Endpoint, NatsConfig, NatsTransport, RemoteError, Server, Target};
use serde_json::json;
use tokio::sync::{Semaphore, watch};

use crate::service::{self, Recorder};
use crate::spy::BudgetSpy;

const CORE: &str = "prefix=mqrpc-test";
const JETSTREAM: &str = "prefix=mqrpc-test-js&jetstream=true&ack_wait=2&max_age=600";

fn unique(what: &str) -> String {
    format!("{what}_{}", &mqrpc::wire::new_id()[..12])
}

async fn connect(options: &str) -> Arc<NatsTransport> {
    Arc::new(
        NatsTransport::connect(&super::with_options(options))
            .await
            .expect("connect to NATS"),
    )
}

/// A transport that hands everything to the NATS one and keeps the byte budget the
/// server shares with its consumer, so the test can watch what the server holds.
/// The most bytes a budget was seen holding, sampled until the watcher is dropped.
struct PeakWatch {
    peak: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl PeakWatch {
    fn start(budget: ByteBudget) -> Self {
        let peak = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        tokio::spawn(async move {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(budget.held(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        });
        PeakWatch { peak, stop }
    }

    fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for PeakWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Handlers that hold their request until the gate opens.
struct Held {
    gate: Semaphore,
    started: watch::Sender<BTreeSet<u64>>,
}

impl Held {
    fn new() -> Arc<Self> {
        Arc::new(Held {
            gate: Semaphore::new(0),
            started: watch::channel(BTreeSet::new()).0,
        })
    }

    fn started(&self) -> BTreeSet<u64> {
        self.started.borrow().clone()
    }

    /// Waits until `n` distinct requests have started; panics after `limit`.
    async fn wait_started(&self, n: usize, limit: Duration) {
        let mut rx = self.started.subscribe();
        let reached = tokio::time::timeout(limit, rx.wait_for(|ids| ids.len() >= n)).await;
        assert!(
            reached.is_ok(),
            "only {} of {n} requests started within {limit:?}",
            self.started().len()
        );
    }

    fn endpoint(self: &Arc<Self>) -> Endpoint {
        #[derive(serde::Deserialize)]
        struct Add {
            a: i64,
            b: i64,
        }
        #[derive(serde::Deserialize)]
        struct Hold {
            id: u64,
            pad: String,
        }
        let held = self.clone();
        Endpoint::new()
            .method("hold", move |_ctx: Context, args: Hold| {
                let held = held.clone();
                async move {
                    held.started.send_modify(|ids| {
                        ids.insert(args.id);
                    });
                    let _permit = held.gate.acquire().await;
                    Ok::<_, RemoteError>(args.pad.len())
                }
            })
            .method("add", |_ctx: Context, args: Add| async move {
                Ok::<_, RemoteError>(args.a + args.b)
            })
    }
}

const PAD: usize = 256 * 1024;
const BUDGET: usize = 1024 * 1024;

/// A server with a budget of [`BUDGET`] bytes whose handlers wait for a gate, the
/// spy that sees its budget, and a client of the topic.
async fn gated_server(
    options: &str,
    topic: &str,
) -> (Server, Arc<BudgetSpy<NatsTransport>>, Arc<Held>, Client) {
    let spy = BudgetSpy::new(connect(options).await);
    let held = Held::new();
    let server = Server::builder(spy.clone(), Target::new(topic).server("s1"))
        .endpoint(held.endpoint())
        .concurrency(16)
        .max_pending_bytes(BUDGET)
        .start()
        .await
        .expect("server");
    let client =
        Client::new(connect(options).await, Target::new(topic)).timeout(Duration::from_secs(10));
    (server, spy, held, client)
}

fn budget_of(spy: &BudgetSpy<NatsTransport>) -> ByteBudget {
    let budget = spy.budget();
    assert_eq!(budget.limit(), BUDGET);
    budget
}

/// Core NATS is at-most-once: of many big casts to a busy server, those beyond its
/// budget are dropped and counted, the server never holds more than its budget, and
/// it keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_nats_drops_requests_beyond_the_budget_and_keeps_serving() {
    let Some(_) = super::core::backend().await else {
        return;
    };
    let topic = unique("budget_core");
    let (server, spy, held, client) = gated_server(CORE, &topic).await;
    let watch = PeakWatch::start(budget_of(&spy));
    let ctx = Context::new();
    let pad = "x".repeat(PAD);
    let sent = 24;
    for id in 0..sent {
        client
            .cast(&ctx, "hold", json!({"id": id, "pad": pad}))
            .await
            .expect("cast");
    }
    // Every cast was either taken or dropped: wait until the counts add up.
    let fit = BUDGET / PAD;
    held.wait_started(1, Duration::from_secs(10)).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let taken = held.started().len() as u64;
        let dropped = spy.inner.dropped_requests();
        if taken + dropped == sent {
            assert!(taken <= fit as u64, "{taken} requests of {PAD} bytes taken");
            assert!(dropped >= sent - fit as u64, "only {dropped} dropped");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{taken} taken and {dropped} dropped of {sent}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        watch.peak() <= BUDGET,
        "the server held {} bytes, above its budget of {BUDGET}",
        watch.peak()
    );

    // The handlers finish; the server takes requests again.
    held.gate.add_permits(1_000);
    let sum: i64 = client
        .call(&ctx, "add", json!({"a": 2, "b": 3}))
        .await
        .expect("call");
    assert_eq!(sum, 5);
    let before = held.started().len();
    client
        .cast(&ctx, "hold", json!({"id": 1000, "pad": "y"}))
        .await
        .expect("cast");
    held.wait_started(before + 1, Duration::from_secs(10)).await;
    server.shutdown().await.expect("shutdown");
}

/// JetStream keeps casts: a busy server takes no more than its budget, the rest wait
/// in the stream, and every cast is handled once the handlers finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_leaves_casts_beyond_the_budget_in_the_stream() {
    let Some(_) = super::jetstream::backend().await else {
        return;
    };
    let topic = unique("budget_js");
    let (server, spy, held, client) = gated_server(JETSTREAM, &topic).await;
    let watch = PeakWatch::start(budget_of(&spy));
    let ctx = Context::new();
    let pad = "x".repeat(PAD);
    let sent = 16;
    for id in 0..sent {
        client
            .cast(&ctx, "hold", json!({"id": id, "pad": pad}))
            .await
            .expect("cast stored");
    }
    let fit = BUDGET / PAD;
    held.wait_started(1, Duration::from_secs(20)).await;
    // A busy server with a full budget takes nothing more, however long it waits.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let taken = held.started().len();
    assert!(taken <= fit, "{taken} casts of {PAD} bytes taken at once");
    assert!(
        watch.peak() <= BUDGET,
        "the server held {} bytes, above its budget of {BUDGET}",
        watch.peak()
    );
    // The rest waits in the stream.
    let config = NatsConfig::parse(&super::with_options(JETSTREAM)).expect("URL");
    let subject = config
        .jetstream_subject(&mqrpc::transport::Address::Topic {
            exchange: config.exchange.clone(),
            topic: topic.clone(),
        })
        .expect("a JetStream subject");
    let js = async_nats::jetstream::new(
        async_nats::connect(config.servers[0].as_str())
            .await
            .expect("a plain NATS connection"),
    );
    let stream = js
        .get_stream(config.jetstream_stream(&config.exchange))
        .await
        .expect("the exchange's stream");
    let info = stream
        .consumer_info(config.jetstream_durable(&subject))
        .await
        .expect("the topic's consumer");
    let waiting = info.num_pending as usize + info.num_ack_pending;
    assert!(
        waiting >= sent as usize - fit,
        "{waiting} casts wait in the stream"
    );

    held.gate.add_permits(1_000);
    held.wait_started(sent as usize, Duration::from_secs(60))
        .await;
    assert_eq!(held.started(), (0..sent).collect::<BTreeSet<_>>());
    assert!(watch.peak() <= BUDGET, "peak {} bytes", watch.peak());
    server.shutdown().await.expect("shutdown");
}

/// Serves `topic` on `options` and checks call, directed call, multicall, cast,
/// directed cast and fanout through it.
async fn serve_everything_on(options: &str, topic: &str) {
    let recorder = Recorder::new();
    let server = Server::builder(connect(options).await, Target::new(topic).server("s1"))
        .endpoint(service::endpoint("s1", &recorder))
        .start()
        .await
        .unwrap_or_else(|err| panic!("a server of {topic:?} starts: {err}"));
    let client =
        Client::new(connect(options).await, Target::new(topic)).timeout(Duration::from_secs(10));
    let ctx = Context::new();
    let sum: i64 = client
        .call(&ctx, "add", json!({"a": 2, "b": 3}))
        .await
        .expect("call");
    assert_eq!(sum, 5);
    let me: String = client
        .prepare()
        .server("s1")
        .call(&ctx, "whoami", json!({}))
        .await
        .expect("directed call");
    assert_eq!(me, "s1");
    let items: Vec<u64> = client
        .multicall::<_, u64>(&ctx, "count", json!({"n": 3}))
        .await
        .expect("multicall")
        .map(|item| item.expect("item"))
        .collect()
        .await;
    assert_eq!(items, [0, 1, 2]);
    client
        .cast(&ctx, "record", json!({"id": 1}))
        .await
        .expect("cast");
    client
        .prepare()
        .server("s1")
        .cast(&ctx, "record", json!({"id": 2}))
        .await
        .expect("directed cast");
    client
        .prepare()
        .fanout(true)
        .cast(&ctx, "record", json!({"id": 3}))
        .await
        .expect("fanout");
    recorder.wait_for(3, Duration::from_secs(20)).await;
    let mut ids = recorder.settled_ids(Duration::from_millis(200)).await;
    ids.sort_unstable();
    assert_eq!(ids, [1, 2, 3]);
    server.shutdown().await.expect("shutdown");
}

fn cyrillic_topic() -> String {
    // The 35-character topic of the issue, made unique for this run.
    unique("обработка_заказов_высокий_приоритет")
}

fn topic_of_200() -> String {
    let id = unique("");
    let mut topic = "a_long.topic-name_".repeat(12);
    topic.truncate(200 - id.len());
    topic.push_str(&id);
    assert_eq!(topic.chars().count(), 200);
    topic
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_nats_serves_a_cyrillic_topic() {
    let Some(_) = super::core::backend().await else {
        return;
    };
    serve_everything_on(CORE, &cyrillic_topic()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_nats_serves_a_topic_of_200_characters() {
    let Some(_) = super::core::backend().await else {
        return;
    };
    serve_everything_on(CORE, &topic_of_200()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_serves_a_cyrillic_topic() {
    let Some(_) = super::jetstream::backend().await else {
        return;
    };
    serve_everything_on(JETSTREAM, &cyrillic_topic()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_serves_a_topic_of_200_characters() {
    let Some(_) = super::jetstream::backend().await else {
        return;
    };
    serve_everything_on(JETSTREAM, &topic_of_200()).await;
}

/// A topic whose subject would not fit in a NATS protocol line is refused with a
/// clear error (nats-server would close the connection), and the connection serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_too_long_for_nats_is_a_clear_error() {
    let Some(_) = super::core::backend().await else {
        return;
    };
    let transport = connect(CORE).await;
    let huge = "x".repeat(5000);
    let err = Server::builder(transport.clone(), Target::new(&huge).server("s1"))
        .endpoint(Endpoint::new())
        .start()
        .await
        .expect_err("a 5000-byte topic");
    assert!(matches!(err, mqrpc::Error::InvalidTarget(_)), "{err:?}");
    let client = Client::new(transport.clone(), Target::new(&huge));
    let err = client
        .cast(&Context::new(), "m", json!({}))
        .await
        .expect_err("a cast to a 5000-byte topic");
    assert!(err.to_string().contains("bytes"), "{err}");
    // The connection is still up: a normal topic works on it.
    let topic = unique("after_huge");
    let recorder = Recorder::new();
    let server = Server::builder(transport.clone(), Target::new(&topic).server("s1"))
        .endpoint(service::endpoint("s1", &recorder))
        .start()
        .await
        .expect("server");
    let sum: i64 = Client::new(transport, Target::new(&topic))
        .call(&Context::new(), "add", json!({"a": 1, "b": 1}))
        .await
        .expect("call");
    assert_eq!(sum, 2);
    server.shutdown().await.expect("shutdown");
}

/// A broker that accepts TCP and never answers: connecting fails after about
/// `connect_timeout`, saying so and where, without the credentials.
#[tokio::test]
async fn connect_timeout_bounds_connecting_to_a_silent_broker() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a free loopback port");
    let port = listener.local_addr().expect("address").port();
    let silent = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            open.push(socket);
        }
    });
    let started = Instant::now();
    let url = format!("nats://user:s3cret@127.0.0.1:{port}?connect_timeout=1");
    let err = mqrpc::connect(&url)
        .await
        .expect_err("nothing answers the handshake");
    let waited = started.elapsed();
    silent.abort();
    assert!(waited < Duration::from_secs(4), "failed after {waited:?}");
    let text = err.to_string();
    assert!(text.contains("timed out"), "{text}");
    assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
    assert!(!text.contains("s3cret"), "{text}");
}

/// Replies go only to client inboxes: a request whose `_reply_q` names another
/// service's subject makes the server publish nothing there, while the same request
/// naming an inbox is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_go_only_to_inboxes() {
    let Some(_) = super::core::backend().await else {
        return;
    };
    let url = super::with_options(CORE);
    let config = NatsConfig::parse(&url).expect("URL");
    let topic = unique("confined");
    let victim = unique("victim");
    let recorder = Recorder::new();
    let transport = connect(CORE).await;
    let server = Server::builder(transport.clone(), Target::new(&topic).server("s1"))
        .endpoint(service::endpoint("s1", &recorder))
        .start()
        .await
        .expect("server");

    let raw = async_nats::connect(config.servers[0].as_str())
        .await
        .expect("a plain NATS connection");
    let exchange = config.exchange.clone();
    let victims = [
        config.topic_subject(&exchange, &victim),
        config.server_subject(&exchange, &victim, "s1"),
        config.fanout_subject(&exchange, &victim),
        // Looks like an inbox, but is not under the reply prefix.
        format!(
            "{}.{}x.r",
            config.topic_subject(&exchange, &victim),
            config.reply_prefix()
        ),
    ];
    let mut watched = futures::stream::select_all(
        futures::future::join_all(victims.iter().map(|s| raw.subscribe(s.clone())))
            .await
            .into_iter()
            .map(|s| s.expect("subscribe")),
    );
    let inbox = format!("{}{}.r", config.reply_prefix(), mqrpc::wire::new_id());
    let mut answered = raw.subscribe(inbox.clone()).await.expect("subscribe");
    raw.flush().await.expect("flush");

    let request = |reply_q: &str| {
        let inner = json!({
            "method": "add",
            "args": {"a": 1, "b": 2},
            "_unique_id": mqrpc::wire::new_id(),
            "_msg_id": mqrpc::wire::new_id(),
            "_reply_q": reply_q,
            "_timeout": null,
        });
        let body = json!({"oslo.version": "2.0", "oslo.message": inner.to_string()});
        body.to_string()
    };
    let subject = config.topic_subject(&exchange, &topic);
    for reply_q in &victims {
        raw.publish(subject.clone(), request(reply_q).into())
            .await
            .expect("publish");
    }
    raw.publish(subject.clone(), request(&inbox).into())
        .await
        .expect("publish");
    raw.flush().await.expect("flush");

    // The request naming an inbox is answered, so the others were handled too.
    let reply = tokio::time::timeout(Duration::from_secs(10), answered.next())
        .await
        .expect("a reply to the inbox")
        .expect("open");
    assert!(
        String::from_utf8_lossy(&reply.payload).contains("\\\"result\\\": 3")
            || String::from_utf8_lossy(&reply.payload).contains("\\\"result\\\":3"),
        "{:?}",
        String::from_utf8_lossy(&reply.payload)
    );
    // Give replies sent elsewhere time to show.
    let stray = tokio::time::timeout(Duration::from_secs(1), watched.next()).await;
    assert!(
        stray.is_err(),
        "the server published to a non-inbox subject: {:?}",
        stray.ok().flatten().map(|m| m.subject)
    );
    // And it keeps serving.
    let sum: i64 = Client::new(connect(CORE).await, Target::new(&topic))
        .call(&Context::new(), "add", json!({"a": 2, "b": 2}))
        .await
        .expect("call");
    assert_eq!(sum, 4);
    server.shutdown().await.expect("shutdown");
}

/// Sets its flag when dropped: tells when a server let go of a handler's stream.
struct DropFlag(watch::Sender<bool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.send_replace(true);
    }
}

/// A stream to a caller that has gone stops at once (issue #22, defect 4): nats-server
/// answers a reply nobody listens for with "no responders", and the server's next
/// reply to that inbox fails, which ends the stream. The request carries no
/// deadline, so nothing else would stop it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_to_a_caller_that_has_gone_stops() {
    let Some(_) = super::core::backend().await else {
        return;
    };
    let config = NatsConfig::parse(&super::with_options(CORE)).expect("URL");
    let topic = unique("gone_caller");
    let produced = Arc::new(AtomicUsize::new(0));
    let (dropped, mut stream_dropped) = watch::channel(false);
    let dropped = Arc::new(Mutex::new(Some(dropped)));
    let endpoint = Endpoint::new()
        .stream_method("endless", {
            let produced = produced.clone();
            move |_ctx: Context, _args: mqrpc::NoArgs| {
                let flag = dropped.lock().expect("lock").take().map(DropFlag);
                let produced = produced.clone();
                futures::stream::unfold((0u64, flag), move |(i, flag)| {
                    let produced = produced.clone();
                    async move {
                        produced.fetch_add(1, Ordering::Relaxed);
                        tokio::task::yield_now().await;
                        Some((Ok::<u64, RemoteError>(i), (i + 1, flag)))
                    }
                })
            }
        })
        .method("ping", |_ctx: Context, _args: mqrpc::NoArgs| async move {
            Ok::<_, RemoteError>("pong")
        });
    let transport = connect(CORE).await;
    let server = Server::builder(transport, Target::new(&topic).server("s1"))
        .endpoint(endpoint)
        .start()
        .await
        .expect("server");

    // The caller's inbox, with nobody subscribed any more.
    let inbox = format!("{}{}.r", config.reply_prefix(), mqrpc::wire::new_id());
    let inner = json!({
        "method": "endless",
        "args": {},
        "_unique_id": mqrpc::wire::new_id(),
        "_msg_id": mqrpc::wire::new_id(),
        "_reply_q": inbox,
        "_timeout": null,
    });
    let body = json!({"oslo.version": "2.0", "oslo.message": inner.to_string()});
    let raw = async_nats::connect(config.servers[0].as_str())
        .await
        .expect("a plain NATS connection");
    raw.publish(
        config.topic_subject(&config.exchange, &topic),
        body.to_string().into(),
    )
    .await
    .expect("publish");
    raw.flush().await.expect("flush");

    let stopped = tokio::time::timeout(
        Duration::from_secs(10),
        stream_dropped.wait_for(|dropped| *dropped),
    )
    .await;
    let items = produced.load(Ordering::Relaxed);
    assert!(
        stopped.is_ok(),
        "the stream still runs after {items} items to an inbox nobody listens on"
    );
    assert!(items > 0, "the stream never started");
    // The server serves on.
    let pong: String = Client::new(connect(CORE).await, Target::new(&topic))
        .timeout(Duration::from_secs(10))
        .call(&Context::new(), "ping", json!({}))
        .await
        .expect("call");
    assert_eq!(pong, "pong");
    server.shutdown().await.expect("shutdown");
}
