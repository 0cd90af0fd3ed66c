//! Issue #22 on Redis: a server reads no more than its byte budget allows and the
//! rest waits in Redis; connecting gives up after `connect_timeout`; an idle server
//! shuts down at once; a request cannot make a server write outside the reply
//! streams.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mqrpc::transport::{Address, ByteBudget, Delivery, ListenOptions, Outgoing};
use mqrpc::{AckMode, Client, Context, Endpoint, RemoteError, Server, Target, Transport};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::{backend, base_url, keys_under, redis_cli, service_server, url_with_prefix};

const MIB: usize = 1024 * 1024;

fn unique(name: &str) -> String {
    format!("mqrpc-{name}-{}", &mqrpc::wire::new_id()[..12])
}

/// One field of a group in `XINFO GROUPS <key>`, as `redis-cli` prints it.
fn group_field(key: &str, group: &str, field: &str) -> String {
    let text = redis_cli(&["XINFO", "GROUPS", key]);
    let lines: Vec<&str> = text.lines().collect();
    // Each group: `name`, its name, then the other fields and values, in pairs.
    let start = lines
        .windows(2)
        .position(|pair| pair[0] == "name" && pair[1] == group)
        .unwrap_or_else(|| panic!("no group {group} on {key}: {text}"));
    lines[start..]
        .chunks(2)
        .find(|pair| pair[0] == field)
        .and_then(|pair| pair.get(1))
        .map(|value| (*value).to_owned())
        .unwrap_or_else(|| panic!("no {field} for {group} on {key}: {text}"))
}

/// How many entries of `key` the group `servers` has delivered and not had acked.
fn pending(key: &str) -> usize {
    let text = redis_cli(&["XPENDING", key, "servers"]);
    text.lines()
        .next()
        .and_then(|count| count.parse().ok())
        .unwrap_or_else(|| panic!("XPENDING {key}: {text}"))
}

/// The number a test body starts with (`0007:...`).
fn number(delivery: &Delivery) -> usize {
    let body = delivery.body();
    std::str::from_utf8(&body[..4])
        .ok()
        .and_then(|n| n.parse().ok())
        .expect("a numbered body")
}

/// A server that reads big entries while its handlers are busy holds at most its
/// budget and one entry more (the one read when the budget still had room): here
/// 16 entries of 1 MiB and a budget of 4 MiB. The rest wait in Redis, and every
/// entry arrives once handlers finish. Both ways of settling (`NOACK` reads, and
/// reads into the pending list) are checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_consumer_takes_no_more_than_its_byte_budget() {
    let Some(_) = backend().await else { return };
    for settle_on_receipt in [true, false] {
        consumer_within_budget(settle_on_receipt).await;
    }
}

async fn consumer_within_budget(settle_on_receipt: bool) {
    const COUNT: usize = 16;
    let limit = 4 * MIB;
    // One entry over the limit, with room for the entry's field names.
    let most = limit + MIB + 64;
    let prefix = unique("budget");
    // Held entries are refreshed anyway; a long claim time keeps a slow machine from
    // handing one out twice.
    let url = format!("{}&claim_idle_ms=60000", url_with_prefix(&prefix));
    let transport = mqrpc::connect(&url).await.expect("redis");
    let budget = ByteBudget::new(limit);
    let options = ListenOptions::new(64)
        .settle_on_receipt(settle_on_receipt)
        .budget(budget.clone());
    let mut consumer = transport
        .listen(&Target::new("budget").server("s1"), &options)
        .await
        .expect("listen");
    let publisher = transport.publisher().await.expect("publisher");
    let address = Address::Topic {
        exchange: transport.default_exchange().to_owned(),
        topic: "budget".to_owned(),
    };
    for n in 0..COUNT {
        let mut body = format!("{n:04}:").into_bytes();
        body.resize(MIB, b'x');
        publisher
            .send(&address, Outgoing::new(body))
            .await
            .expect("send");
    }

    // Handlers that never finish: every delivery taken stays charged.
    let mut held = Vec::new();
    while let Ok(next) = tokio::time::timeout(Duration::from_secs(2), consumer.recv()).await {
        held.push(next.expect("open").expect("a delivery"));
        assert!(
            budget.held() <= most,
            "{} bytes held with a budget of {limit} (settle_on_receipt {settle_on_receipt})",
            budget.held()
        );
    }
    assert!(
        !held.is_empty() && held.len() <= 5,
        "took {} entries of 1 MiB with a budget of 4 MiB (settle_on_receipt {settle_on_receipt})",
        held.len()
    );
    // What the consumer did not take is still Redis's to give.
    let topic = format!("{prefix}:{{openstack:budget}}:topic");
    let read: usize = group_field(&topic, "servers", "entries-read")
        .parse()
        .expect("a count");
    assert!(
        read <= 5,
        "Redis handed out {read} of {COUNT} entries (settle_on_receipt {settle_on_receipt})"
    );

    // Handlers that finish, a fifth of a second each: everything arrives, once.
    let mut seen: HashSet<usize> = held.iter().map(number).collect();
    assert_eq!(seen.len(), held.len(), "an entry came twice");
    let finish = |delivery: Delivery| {
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            delivery.ack().await.expect("ack");
        })
    };
    let mut handlers: Vec<_> = held.into_iter().map(finish).collect();
    while seen.len() < COUNT {
        let next = tokio::time::timeout(Duration::from_secs(20), consumer.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {COUNT} entries arrived", seen.len()))
            .expect("open")
            .expect("a delivery");
        assert!(
            budget.held() <= most,
            "{} bytes held with a budget of {limit}",
            budget.held()
        );
        assert!(
            seen.insert(number(&next)),
            "entry {} came twice",
            number(&next)
        );
        handlers.push(finish(next));
    }
    for handler in handlers {
        handler.await.expect("a handler");
    }
    consumer.close().await.expect("close");
    for key in keys_under(&prefix) {
        redis_cli(&["DEL", &key]);
    }
}

/// An entry bigger than the whole budget is still taken, alone: while one is held
/// nothing else is read, and the next comes once it is handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_an_entry_bigger_than_the_budget_is_taken_alone() {
    let Some(_) = backend().await else { return };
    let prefix = unique("oversize");
    let url = format!("{}&claim_idle_ms=60000", url_with_prefix(&prefix));
    let transport = mqrpc::connect(&url).await.expect("redis");
    let budget = ByteBudget::new(MIB);
    let options = ListenOptions::new(64)
        .settle_on_receipt(true)
        .budget(budget.clone());
    let mut consumer = transport
        .listen(&Target::new("oversize").server("s1"), &options)
        .await
        .expect("listen");
    let publisher = transport.publisher().await.expect("publisher");
    let address = Address::Topic {
        exchange: transport.default_exchange().to_owned(),
        topic: "oversize".to_owned(),
    };
    for n in 0..3 {
        let mut body = format!("{n:04}:").into_bytes();
        body.resize(2 * MIB, b'x');
        publisher
            .send(&address, Outgoing::new(body))
            .await
            .expect("send");
    }
    let mut seen = Vec::new();
    for _ in 0..3 {
        let next = tokio::time::timeout(Duration::from_secs(20), consumer.recv())
            .await
            .expect("the next entry comes once the one before is handled")
            .expect("open")
            .expect("a delivery");
        seen.push(number(&next));
        // One entry, alone: nothing else is read while it is held (waiting longer
        // than a relaxed reader waits for room does not change that).
        let more = tokio::time::timeout(Duration::from_millis(1500), consumer.recv()).await;
        assert!(
            more.is_err(),
            "a second entry came while one of 2 MiB was held"
        );
        assert!(
            budget.held() <= 2 * MIB + 64,
            "{} bytes held",
            budget.held()
        );
        next.ack().await.expect("ack");
    }
    seen.sort_unstable();
    assert_eq!(seen, [0, 1, 2]);
    consumer.close().await.expect("close");
    for key in keys_under(&prefix) {
        redis_cli(&["DEL", &key]);
    }
}

/// The same through a server whose handlers are busy (acks after handling, so what
/// the server took from Redis is exactly what Redis lists as pending): it takes what
/// its `max_pending_bytes` has room for, the rest waits in Redis, and every request
/// is handled once the handlers are free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_busy_server_leaves_what_exceeds_its_byte_budget_in_redis() {
    let Some(_) = backend().await else { return };
    const COUNT: usize = 12;
    let limit = 4 * MIB;
    let prefix = unique("busy");
    let url = format!("{}&claim_idle_ms=60000", url_with_prefix(&prefix));
    let started = Arc::new(AtomicUsize::new(0));
    let (release, released) = watch::channel(false);
    let endpoint = Endpoint::new().method("hold", {
        let started = started.clone();
        move |_ctx: Context, args: serde_json::Value| {
            let started = started.clone();
            let mut released = released.clone();
            async move {
                started.fetch_add(1, Ordering::SeqCst);
                let _ = released.wait_for(|free| *free).await;
                Ok::<_, RemoteError>(args["n"].as_u64())
            }
        }
    });
    let server = Server::builder(
        mqrpc::connect(&url).await.expect("redis"),
        Target::new("busy").server("s1"),
    )
    .endpoint(endpoint)
    .ack_mode(AckMode::AfterHandling)
    .max_pending_bytes(limit)
    .start()
    .await
    .expect("server");
    let client = Client::new(
        mqrpc::connect(&url).await.expect("redis"),
        Target::new("busy"),
    );
    let blob = "x".repeat(MIB);
    for n in 0..COUNT {
        client
            .cast(&Context::new(), "hold", json!({"n": n, "blob": blob}))
            .await
            .expect("cast");
    }
    let topic = format!("{prefix}:{{openstack:busy}}:topic");
    let deadline = Instant::now() + Duration::from_secs(20);
    while started.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "no handler started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Give the server time to take whatever it would take.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let taken = pending(&topic);
    assert!(
        taken <= 5,
        "the server took {taken} requests of 1 MiB from Redis with a budget of 4 MiB"
    );
    assert!(started.load(Ordering::SeqCst) <= taken);
    release.send(true).expect("handlers listen");
    let deadline = Instant::now() + Duration::from_secs(60);
    while started.load(Ordering::SeqCst) < COUNT || pending(&topic) > 0 {
        assert!(
            Instant::now() < deadline,
            "{} of {COUNT} requests handled, {} pending",
            started.load(Ordering::SeqCst),
            pending(&topic)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(started.load(Ordering::SeqCst), COUNT, "a request ran twice");
    client.close().await;
    server.shutdown().await.expect("shutdown");
    for key in keys_under(&prefix) {
        redis_cli(&["DEL", &key]);
    }
}

/// A "broker" that accepts connections and never says a word.
async fn silent_listener() -> (u16, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    let task = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            open.push(socket);
        }
    });
    (port, task)
}

/// Against a broker that accepts TCP and never answers, connecting fails after
/// `connect_timeout` (it took 21 s before: a 5 s attempt, retried three times), and
/// the error says it timed out and where, without the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_connect_gives_up_after_connect_timeout() {
    let (port, listener) = silent_listener().await;
    let started = Instant::now();
    let err = mqrpc::connect(&format!(
        "redis://:s3cret@127.0.0.1:{port}/?connect_timeout=1"
    ))
    .await
    .expect_err("nothing answers");
    let waited = started.elapsed();
    // A bound for correctness, not a speed measurement: 1 s and a wide margin.
    assert!(
        waited < Duration::from_secs(4),
        "connecting took {waited:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("timed out") && text.contains(&format!("127.0.0.1:{port}")),
        "{text}"
    );
    assert!(!format!("{err:?}").contains("s3cret"), "{err:?}");
    assert_eq!(
        err.kind(),
        mqrpc::ErrorKind::Transport(mqrpc::TransportErrorKind::Connect),
        "{err}"
    );
    listener.abort();

    // Nothing listening at all: refused (tried again a few times, within the
    // timeout), and the error says where.
    let closed = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        probe.local_addr().expect("address").port()
    };
    let started = Instant::now();
    let err = mqrpc::connect(&format!(
        "redis://:s3cret@127.0.0.1:{closed}/?connect_timeout=1"
    ))
    .await
    .expect_err("nothing listens");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    let text = err.to_string();
    assert!(text.contains(&format!("127.0.0.1:{closed}")), "{text}");
    assert!(!format!("{err:?}").contains("s3cret"), "{err:?}");
    assert_eq!(
        err.kind(),
        mqrpc::ErrorKind::Transport(mqrpc::TransportErrorKind::Connect),
        "{err}"
    );
    assert!(err.is_retryable(), "{err}");
}

/// A login Redis refuses is a `Refused` transport error, which no retry helps, with
/// redis-rs's error kept as its source and the password in neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_refused_login_is_a_refused_error() {
    let Some(_) = backend().await else { return };
    let address = crate::faults::host_port(&base_url(), 6379);
    let err = mqrpc::connect(&format!(
        "redis://mqrpc-nobody:s3cret@{address}/?connect_timeout=2"
    ))
    .await
    .expect_err("no such user");
    assert_eq!(
        err.kind(),
        mqrpc::ErrorKind::Transport(mqrpc::TransportErrorKind::Refused),
        "{err}"
    );
    assert!(!err.is_retryable(), "{err}");
    assert!(std::error::Error::source(&err).is_some(), "{err:?}");
    assert!(!format!("{err:?}").contains("s3cret"), "{err:?}");
}

/// A TCP forwarder to Redis that counts the connections open through it.
struct CountingForwarder {
    port: u16,
    open: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingForwarder {
    async fn start() -> Self {
        let upstream = crate::faults::upstream(&crate::faults::host_port(&base_url(), 6379)).await;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let open = Arc::new(AtomicUsize::new(0));
        let counter = open.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let counter = counter.clone();
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                    counter.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        CountingForwarder { port, open, task }
    }

    /// Waits until `n` connections are open; panics after 10 s.
    async fn wait_for_open(&self, n: usize, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.open.load(Ordering::SeqCst) != n {
            assert!(
                Instant::now() < deadline,
                "{} connections open {what}, expected {n}",
                self.open.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for CountingForwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Ten idle servers shut down one after the other, each at once: a stop wakes the
/// blocked read instead of waiting for it (about 0.5 s a server before, 5 s for
/// ten). Their reading connections close and no key of theirs stays but the
/// streams, which expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_idle_servers_shut_down_at_once() {
    let Some(_) = backend().await else { return };
    let prefix = unique("idle");
    let forwarder = CountingForwarder::start().await;
    let url = format!(
        "redis://127.0.0.1:{}/?prefix={prefix}&claim_idle_ms=1000&stream_ttl=300&block_ms=2000",
        forwarder.port
    );
    let transport: Arc<dyn Transport> = mqrpc::connect(&url).await.expect("redis");
    let recorder = crate::service::Recorder::new();
    let mut servers = Vec::new();
    for n in 0..10 {
        servers.push(service_server(transport.clone(), "idle", &format!("s{n}"), &recorder).await);
    }
    // Every server has its two reading connections, blocked in their reads.
    forwarder.wait_for_open(21, "with ten servers").await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let all = Instant::now();
    let mut each = Vec::new();
    for server in servers {
        let started = Instant::now();
        server.shutdown().await.expect("shutdown");
        each.push(started.elapsed());
    }
    let total = all.elapsed();
    // Bounds for correctness, generous for a busy machine: a blocked read held each
    // stop for about 0.5 s before.
    assert!(
        total < Duration::from_secs(2) && each.iter().all(|d| *d < Duration::from_secs(1)),
        "ten idle servers took {total:?} to shut down: {each:?}"
    );
    forwarder
        .wait_for_open(1, "after the shutdowns (the transport's own)")
        .await;
    drop(transport);
    forwarder
        .wait_for_open(0, "once the transport is gone")
        .await;
    let left = keys_under(&prefix);
    assert!(
        left.iter()
            .all(|k| k.ends_with(":topic") || k.contains(":server:")),
        "keys left behind: {left:?}"
    );
    for key in left {
        redis_cli(&["DEL", &key]);
    }
}

/// A request whose `_reply_q` names a stream that is not a reply stream (another
/// service's topic stream, the server's own topic or server stream, a key outside
/// mqrpc's prefix) makes the server write nothing there, and it keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_reply_goes_only_to_a_reply_stream() {
    let Some(_) = backend().await else { return };
    let prefix = unique("confined");
    let url = url_with_prefix(&prefix);
    let recorder = crate::service::Recorder::new();
    let server = service_server(
        mqrpc::connect(&url).await.expect("redis"),
        "confined",
        "s1",
        &recorder,
    )
    .await;
    // Another service's topic: a cast nobody serves waits in its stream.
    let other = Client::new(
        mqrpc::connect(&url).await.expect("redis"),
        Target::new("victim"),
    );
    other
        .cast(&Context::new(), "record", json!({"id": 0}))
        .await
        .expect("cast");
    let victim = format!("{prefix}:{{openstack:victim}}:topic");
    let own_topic = format!("{prefix}:{{openstack:confined}}:topic");
    let own_server = format!("{prefix}:{{openstack:confined}}:server:s1");
    let outside = format!("{prefix}-outside:{}", mqrpc::wire::new_id());
    let not_there = format!("{prefix}:reply-lookalike");
    assert_eq!(redis_cli(&["XLEN", &victim]), "1");

    let transport = mqrpc::connect(&url).await.expect("redis");
    let publisher = transport.publisher().await.expect("publisher");
    let address = Address::Topic {
        exchange: transport.default_exchange().to_owned(),
        topic: "confined".to_owned(),
    };
    let targets = [&victim, &own_topic, &own_server, &outside, &not_there];
    for (id, reply_to) in (1u64..).zip(targets) {
        let request = mqrpc::wire::Request {
            method: "record".into(),
            args: json!({ "id": id }).as_object().cloned().expect("object"),
            msg_id: Some(mqrpc::wire::new_id()),
            reply_to: Some(reply_to.clone()),
            unique_id: Some(mqrpc::wire::new_id()),
            ..mqrpc::wire::Request::default()
        };
        let body = mqrpc::wire::encode_request(&request).expect("encode");
        publisher
            .send(&address, Outgoing::new(body))
            .await
            .expect("send a forged call");
    }
    recorder
        .wait_for(targets.len(), Duration::from_secs(20))
        .await;
    // The server still answers, after replying (or not) to the forged calls.
    let client = Client::new(
        mqrpc::connect(&url).await.expect("redis"),
        Target::new("confined"),
    );
    for _ in 0..3 {
        let sum: i64 = client
            .call(&Context::new(), "add", json!({"a": 2, "b": 3}))
            .await
            .expect("the server still answers");
        assert_eq!(sum, 5);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        redis_cli(&["XLEN", &victim]),
        "1",
        "a reply reached {victim}"
    );
    for key in [&own_topic, &own_server] {
        // Handled entries are deleted: nothing is left, and no reply came in.
        let entries = redis_cli(&["XRANGE", key, "-", "+"]);
        assert!(entries.is_empty(), "{key} holds {entries}");
    }
    for key in [&outside, &not_there] {
        assert_eq!(redis_cli(&["EXISTS", key]), "0", "a reply made {key}");
    }
    client.close().await;
    other.close().await;
    server.shutdown().await.expect("shutdown");
    for key in keys_under(&prefix) {
        redis_cli(&["DEL", &key]);
    }
}
