//! The conformance suite on Redis streams. `MQRPC_REDIS_URL` names the server
//! (default `redis://127.0.0.1:6379/`); the suite adds its own key prefix and short
//! claim and expiry times so its keys never outlive it by much.

use std::time::Duration;

use crate::skips::broker_unavailable;
use crate::suite::Backend;

pub(crate) fn base_url() -> String {
    std::env::var("MQRPC_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".to_owned())
}

/// The suite's URL: a prefix of its own, claims after 1 s (for the redelivery case),
/// streams that expire 5 min after their last server.
pub(crate) fn url_with_prefix(prefix: &str) -> String {
    let base = base_url();
    let separator = if base.contains('?') { '&' } else { '?' };
    format!(
        "{base}{separator}prefix={prefix}&claim_idle_ms=1000&stream_ttl=300&block_ms=2000&reply_ttl=30"
    )
}

pub async fn backend() -> Option<Backend> {
    let url = url_with_prefix("mqrpc-test");
    if let Err(err) = mqrpc::connect(&url).await {
        return broker_unavailable("redis", &err);
    }
    Some(Backend::new("redis", move || {
        let url = url.clone();
        async move {
            mqrpc::connect(&url)
                .await
                .expect("Redis answered a moment ago")
        }
    }))
}

conformance_suite!(backend);

mod hardening;

/// Keys under `prefix`, read with `redis-cli --scan` as an operator would.
fn keys_under(prefix: &str) -> Vec<String> {
    let url = base_url();
    let output = std::process::Command::new("redis-cli")
        .args(["-u", &url, "--scan", "--pattern", &format!("{prefix}:*")])
        .output()
        .expect("redis-cli runs");
    assert!(output.status.success(), "redis-cli failed: {output:?}");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A server of the test service on `topic`, named `name`, recording into `recorder`.
async fn service_server(
    transport: std::sync::Arc<dyn mqrpc::Transport>,
    topic: &str,
    name: &str,
    recorder: &std::sync::Arc<crate::service::Recorder>,
) -> mqrpc::Server {
    mqrpc::Server::builder(transport, mqrpc::Target::new(topic).server(name))
        .endpoint(crate::service::endpoint(name, recorder))
        .start()
        .await
        .expect("server")
}

/// Nothing is left behind: no reply or fanout key once clients and servers are gone,
/// and, while servers still run, no request entry and no watcher's group. Entries
/// handled while a watcher was attached (which keeps them for it), entries kept by
/// the group of a watcher that crashed, and entries whose settle a cut connection
/// lost are all deleted by the servers' housekeeping, and the crashed watcher's
/// group is pruned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_leaves_no_reply_or_fanout_keys_after_shutdown() {
    let Some(_) = backend().await else { return };
    use mqrpc::{Client, Context, Target};
    use serde_json::json;
    let prefix = format!("mqrpc-cleanup-{}", &mqrpc::wire::new_id()[..12]);
    // Dead watchers are pruned within about a second.
    let url = format!("{}&prune_idle=1", url_with_prefix(&prefix));
    let recorder = crate::service::Recorder::new();
    let mut servers = Vec::new();
    for name in ["s1", "s2"] {
        let transport = mqrpc::connect(&url).await.expect("redis");
        servers.push(service_server(transport, "cleanup", name, &recorder).await);
    }
    let client = Client::new(
        mqrpc::connect(&url).await.expect("redis"),
        Target::new("cleanup"),
    );
    let sum: i64 = client
        .call(&Context::new(), "add", json!({"a": 1, "b": 2}))
        .await
        .expect("call");
    assert_eq!(sum, 3);
    client
        .prepare()
        .fanout(true)
        .cast(&Context::new(), "record", json!({"id": 1}))
        .await
        .expect("fanout");
    recorder.wait_for(2, Duration::from_secs(20)).await;
    let during = keys_under(&prefix);
    assert!(during.iter().any(|k| k.contains(":reply:")), "{during:?}");
    assert!(during.iter().any(|k| k.ends_with(":fanout")), "{during:?}");
    let calls = |first: i64| {
        let client = &client;
        async move {
            for a in first..first + 5 {
                let sum: i64 = client
                    .call(&Context::new(), "add", json!({"a": a, "b": 1}))
                    .await
                    .expect("call");
                assert_eq!(sum, a + 1);
            }
        }
    };

    // A watcher attached while requests are handled, then detached.
    let watching = mqrpc::connect(&url).await.expect("redis");
    let mut tap = watching
        .monitor(&Target::new("cleanup"))
        .await
        .expect("a watcher");
    calls(10).await;
    tap.stop().await.expect("stop watching");
    drop(tap);

    // A watcher that crashes: its process ends without removing its groups.
    crash_a_watcher(&url, "cleanup");
    calls(20).await;

    // A server whose settles a cut connection loses (with NOACK reads, handled
    // entries are deleted in the background; those deletes go).
    let proxy = crate::proxy::TcpProxy::start(
        crate::faults::upstream(&crate::faults::host_port(&base_url(), 6379)).await,
    )
    .await;
    let proxied = mqrpc::connect(&format!(
        "redis://127.0.0.1:{}/?prefix={prefix}&claim_idle_ms=1000&stream_ttl=300&block_ms=2000&prune_idle=1",
        proxy.port()
    ))
    .await
    .expect("redis through the proxy");
    let mut s3 = proxied
        .listen(
            &Target::new("cleanup").server("s3"),
            &mqrpc::transport::ListenOptions::new(8).settle_on_receipt(true),
        )
        .await
        .expect("listen as s3");
    for id in 0..3 {
        client
            .prepare()
            .server("s3")
            .cast(&Context::new(), "record", json!({ "id": id }))
            .await
            .expect("cast to s3");
    }
    let mut taken = Vec::new();
    while taken.len() < 3 {
        let next = tokio::time::timeout(Duration::from_secs(20), s3.recv())
            .await
            .expect("s3 gets its casts")
            .expect("open")
            .expect("a delivery");
        taken.push(next);
    }
    let s3_stream = format!("{prefix}:{{openstack:cleanup}}:server:s3");
    proxy.black_hole(true);
    for delivery in taken {
        delivery.ack().await.expect("ack");
    }
    // The deletes are on their way, held by the black hole, and the cut drops them.
    // (Housekeeping may have deleted the entries already: what matters is that
    // none is left however the race went.)
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.cut();
    proxy.black_hole(false);

    // While the servers run, their housekeeping leaves no entry and no watcher group.
    let streams = [
        format!("{prefix}:{{openstack:cleanup}}:topic"),
        format!("{prefix}:{{openstack:cleanup}}:server:s1"),
        format!("{prefix}:{{openstack:cleanup}}:server:s2"),
        s3_stream,
    ];
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let left: Vec<String> = streams
            .iter()
            .filter_map(|key| {
                let length = redis_cli(&["XLEN", key]);
                let watchers: Vec<String> = group_names(key)
                    .into_iter()
                    .filter(|g| g.starts_with("monitor:"))
                    .collect();
                (length != "0" || !watchers.is_empty())
                    .then(|| format!("{key}: {length} entries, watcher groups {watchers:?}"))
            })
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "left behind while the servers run: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    s3.close().await.expect("close s3");
    client.close().await;
    for server in servers {
        server.shutdown().await.expect("shutdown");
    }
    let after = keys_under(&prefix);
    assert!(
        after
            .iter()
            .all(|k| !k.contains(":reply:") && !k.ends_with(":fanout")),
        "reply or fanout keys left behind: {after:?}"
    );
    // What remains are the topic and server streams, which expire (stream_ttl).
    for key in &after {
        let ttl = ttl_of(key);
        assert!(ttl > 0, "{key} has no expiry ({ttl})");
    }
}

/// Starts a watcher of `topic` in a runtime of its own and kills that runtime: like
/// a watcher's process ending, nothing runs its clean-up or refreshes its alive key,
/// and its groups stay on the streams.
fn crash_a_watcher(url: &str, topic: &str) {
    let url = url.to_owned();
    let topic = topic.to_owned();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let (transport, watcher) = runtime.block_on(async {
            let transport = mqrpc::connect(&url).await.expect("redis");
            let watcher = transport
                .monitor(&mqrpc::Target::new(&topic))
                .await
                .expect("a watcher");
            (transport, watcher)
        });
        drop(runtime);
        // Outside any runtime: the watcher's drop cannot start its clean-up.
        drop(watcher);
        drop(transport);
    })
    .join()
    .expect("the watcher's thread");
}

/// A send to a stream that does not exist (no server made it) creates it with its
/// TTL; sends to it once it exists add to it and leave that TTL alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_send_that_creates_a_stream_gives_it_a_ttl() {
    let Some(_) = backend().await else { return };
    use mqrpc::{Client, Context, Target};
    use serde_json::json;
    let prefix = format!("mqrpc-created-{}", &mqrpc::wire::new_id()[..12]);
    let client = Client::new(
        mqrpc::connect(&url_with_prefix(&prefix))
            .await
            .expect("redis"),
        Target::new("nobody"),
    );
    let ctx = Context::new();
    client
        .cast(&ctx, "record", json!({"id": 1}))
        .await
        .expect("cast");
    let keys = keys_under(&prefix);
    let [key] = keys.as_slice() else {
        panic!("one stream expected, found {keys:?}");
    };
    let ttl = ttl_of(key);
    assert!(
        (1..=300).contains(&ttl),
        "{key} has TTL {ttl}, not stream_ttl"
    );
    // A TTL set by someone else stays: the next sends find the stream.
    redis_cli(&["EXPIRE", key, "1000"]);
    for id in 2..=3 {
        client
            .cast(&ctx, "record", json!({"id": id}))
            .await
            .expect("cast");
    }
    assert_eq!(redis_cli(&["XLEN", key]), "3");
    let ttl = ttl_of(key);
    assert!(ttl > 300, "{key}'s TTL was replaced: {ttl}");
    redis_cli(&["DEL", key]);
    client.close().await;
}

/// A watcher of a topic nobody serves creates the topic stream (its group needs
/// one), and that stream expires like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_watcher_that_creates_a_stream_gives_it_a_ttl() {
    let Some(_) = backend().await else { return };
    let prefix = format!("mqrpc-watched-{}", &mqrpc::wire::new_id()[..12]);
    let transport = mqrpc::connect(&url_with_prefix(&prefix))
        .await
        .expect("redis");
    let mut tap = transport
        .monitor(&mqrpc::Target::new("unserved"))
        .await
        .expect("monitor");
    let keys = keys_under(&prefix);
    let topic: Vec<&String> = keys.iter().filter(|k| k.ends_with(":topic")).collect();
    assert_eq!(topic.len(), 1, "{keys:?}");
    for key in topic {
        let ttl = ttl_of(key);
        assert!(
            (1..=300).contains(&ttl),
            "{key} has TTL {ttl}, not stream_ttl"
        );
    }
    tap.stop().await.expect("stop");
    for key in keys_under(&prefix) {
        redis_cli(&["DEL", &key]);
    }
}

/// A configuration built with setters, not a URL's options, connects and serves:
/// its prefix names the keys, and the streams expire after its `stream_ttl`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_config_built_with_setters_serves_calls() {
    let Some(_) = backend().await else { return };
    let prefix = format!("mqrpc-built-{}", &mqrpc::wire::new_id()[..12]);
    let config = mqrpc::RedisConfig::parse(&base_url())
        .expect("MQRPC_REDIS_URL")
        .prefix(prefix.clone())
        .claim_idle(Duration::from_secs(1))
        .stream_ttl(Duration::from_secs(300))
        .block(Duration::from_millis(500))
        .reply_ttl(Duration::from_secs(30));
    let transport: std::sync::Arc<dyn mqrpc::Transport> = std::sync::Arc::new(
        mqrpc::RedisTransport::with_config(config)
            .await
            .expect("redis"),
    );
    let server = service_server(
        transport.clone(),
        "built",
        "s1",
        &crate::service::Recorder::new(),
    )
    .await;
    let client = mqrpc::Client::new(transport, mqrpc::Target::new("built"));
    echo_in_hundreds(&client, 100).await;
    let keys = keys_under(&prefix);
    let topic = keys
        .iter()
        .find(|k| k.ends_with(":topic"))
        .unwrap_or_else(|| panic!("no topic stream under {prefix}: {keys:?}"));
    let ttl = ttl_of(topic);
    assert!(
        (1..=300).contains(&ttl),
        "{topic} has TTL {ttl}, not stream_ttl"
    );
    client.close().await;
    server.shutdown().await.expect("shutdown");
    for key in keys_under(&prefix) {
        redis_cli(&["DEL", &key]);
    }
}

/// `total` echo calls, a hundred at a time, each checked.
async fn echo_in_hundreds(client: &mqrpc::Client, total: u64) {
    for chunk in 0..total / 100 {
        let calls = (0..100).map(|i| async move {
            let n = chunk * 100 + i;
            let back: u64 = client
                .call(
                    &mqrpc::Context::new(),
                    "echo",
                    serde_json::json!({ "payload": n }),
                )
                .await
                .unwrap_or_else(|err| panic!("call {n}: {err}"));
            assert_eq!(back, n);
        });
        futures::future::join_all(calls).await;
    }
}

/// A client deletes the replies it has read from its reply stream, so the stream
/// holds only what is unread and needs no cap that would drop unread replies when a
/// burst of them arrives at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_client_deletes_the_replies_it_has_read() {
    let Some(_) = backend().await else { return };
    use mqrpc::{Client, Target};
    const CALLS: u64 = 3000;
    let prefix = format!("mqrpc-trim-{}", &mqrpc::wire::new_id()[..12]);
    let url = url_with_prefix(&prefix);
    let transport = mqrpc::connect(&url).await.expect("redis");
    let server = service_server(transport, "trim", "s1", &crate::service::Recorder::new()).await;
    let client = Client::new(
        mqrpc::connect(&url).await.expect("redis"),
        Target::new("trim"),
    );
    echo_in_hundreds(&client, CALLS).await;
    let replies: Vec<String> = keys_under(&prefix)
        .into_iter()
        .filter(|k| k.contains(":reply:"))
        .collect();
    assert_eq!(replies.len(), 1, "{replies:?}");
    let length = std::process::Command::new("redis-cli")
        .args(["-u", &base_url(), "XLEN", &replies[0]])
        .output()
        .expect("redis-cli runs");
    let length: u64 = String::from_utf8_lossy(&length.stdout)
        .trim()
        .parse()
        .expect("a length");
    // Read replies go once a read batch (256) has gathered; what is left is at most
    // about two batches, far below the replies sent.
    assert!(
        length <= 600,
        "{length} of {CALLS} replies are still in {}",
        replies[0]
    );
    client.close().await;
    server.shutdown().await.expect("shutdown");
}

/// The names of the groups on a stream, read with `redis-cli XINFO GROUPS`.
fn group_names(key: &str) -> Vec<String> {
    let output = std::process::Command::new("redis-cli")
        .args(["-u", &base_url(), "XINFO", "GROUPS", key])
        .output()
        .expect("redis-cli runs");
    assert!(output.status.success(), "redis-cli failed: {output:?}");
    // Each group is printed as field and value lines: `name`, then the name.
    let text = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = text.lines().collect();
    lines
        .windows(2)
        .filter(|pair| pair[0] == "name")
        .map(|pair| pair[1].to_owned())
        .collect()
}

/// A key's `TTL` in seconds (-1: none, -2: no such key).
fn ttl_of(key: &str) -> i64 {
    redis_cli(&["TTL", key]).parse().expect("a TTL")
}

/// Runs a Redis command with `redis-cli`; its reply, trimmed.
fn redis_cli(args: &[&str]) -> String {
    let output = std::process::Command::new("redis-cli")
        .args(["-u", &base_url()])
        .args(args)
        .output()
        .expect("redis-cli runs");
    assert!(
        output.status.success(),
        "redis-cli {args:?} failed: {output:?}"
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// A watcher that died without removing its keep-group (no alive key) loses the
/// group to the servers' housekeeping; a live watcher's group stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_prunes_only_the_keep_groups_of_dead_watchers() {
    let Some(_) = backend().await else { return };
    use mqrpc::Target;
    let prefix = format!("mqrpc-watchers-{}", &mqrpc::wire::new_id()[..12]);
    let url = format!("{}&prune_idle=1", url_with_prefix(&prefix));
    let transport = mqrpc::connect(&url).await.expect("redis");
    let server = service_server(transport, "watched", "s1", &crate::service::Recorder::new()).await;
    let watching = mqrpc::connect(&url).await.expect("redis");
    let watcher = watching
        .monitor(&Target::new("watched"))
        .await
        .expect("a watcher");
    let topic = keys_under(&prefix)
        .into_iter()
        .find(|k| k.ends_with(":topic"))
        .expect("the topic stream");
    let live: Vec<String> = group_names(&topic)
        .into_iter()
        .filter(|g| g.starts_with("monitor:"))
        .collect();
    assert_eq!(live.len(), 1, "the watcher's group: {live:?}");
    redis_cli(&["XGROUP", "CREATE", &topic, "monitor:dead", "$"]);

    // Housekeeping prunes every prune_idle / 2 (0.5 s); the live watcher refreshes
    // its key three times per prune_idle.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while group_names(&topic).iter().any(|g| g == "monitor:dead") {
        assert!(
            std::time::Instant::now() < deadline,
            "the dead watcher's group is still there"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let groups = group_names(&topic);
    assert!(
        groups.contains(&live[0]),
        "the live watcher's group went: {groups:?}"
    );

    drop(watcher);
    server.shutdown().await.expect("shutdown");
}

/// Issue #7 on Redis: cuts, a black hole, latency, confirmed casts, load, and a
/// restart of a redis-server the test owns.
mod reliability {
    use std::sync::Arc;

    use mqrpc::Transport;

    use crate::faults::{self, OwnBroker, Rig};

    fn url_at(port: u16, prefix: &str) -> String {
        format!(
            "redis://127.0.0.1:{port}/?prefix={prefix}&claim_idle_ms=1000&stream_ttl=300&block_ms=2000&reply_ttl=30"
        )
    }

    async fn connect(port: u16, prefix: &'static str) -> Arc<dyn Transport> {
        mqrpc::connect(&url_at(port, prefix))
            .await
            .expect("connect to Redis")
    }

    /// The arguments of a redis-server of a test's own on `port`, keeping nothing on
    /// disk, followed by `extra`.
    fn own_redis(port: u16, extra: &[&str]) -> Vec<String> {
        let port = port.to_string();
        let base = [
            "--port",
            &port,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ];
        base.iter()
            .chain(extra)
            .map(|arg| (*arg).to_owned())
            .collect()
    }

    async fn rig() -> Option<Rig> {
        super::backend().await?;
        let upstream = faults::upstream(&faults::host_port(&super::base_url(), 6379)).await;
        Some(Rig::new("redis", upstream, |port| connect(port, "mqrpc-test")).await)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_twenty_cuts_during_traffic() {
        let Some(rig) = rig().await else { return };
        faults::twenty_cuts(&rig).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_black_hole_times_out_naming_the_broker() {
        let Some(rig) = rig().await else { return };
        faults::black_hole(&rig).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_health_is_reconnecting_while_cut_off_then_consuming() {
        let Some(rig) = rig().await else { return };
        faults::health_follows_a_cut(&rig).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_added_latency() {
        let Some(rig) = rig().await else { return };
        faults::added_latency(&rig).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_confirmed_casts_survive_cuts() {
        let Some(rig) = rig().await else { return };
        faults::confirmed_casts_survive_cuts(&rig, 300).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_load_100k_calls_at_256() {
        let Some(backend) = super::backend().await else {
            return;
        };
        faults::load(&backend, 100_000, 256).await;
    }

    /// A Redis whose ACL refuses `XTRIM`: the client stops trimming its reply stream
    /// and every call still gets its reply (a refused trim fails the whole read
    /// pipeline; retrying it would stop the replies for good).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_replies_flow_when_xtrim_is_refused() {
        use mqrpc::{Client, Target};
        let acl = [
            "--user", "default", "on", "nopass", "~*", "&*", "+@all", "-xtrim",
        ];
        let Some(broker) = OwnBroker::start("redis-server", |port| own_redis(port, &acl)).await
        else {
            return;
        };
        let transport = connect(broker.port, "mqrpc-notrim").await;
        let server =
            super::service_server(transport, "notrim", "s1", &crate::service::Recorder::new())
                .await;
        let client = Client::new(
            connect(broker.port, "mqrpc-notrim").await,
            Target::new("notrim"),
        )
        .timeout(std::time::Duration::from_secs(10));
        // Well past the 256 replies after which the client first trims.
        super::echo_in_hundreds(&client, 1000).await;
        client.close().await;
        server.shutdown().await.expect("shutdown");
    }

    /// A Redis whose ACL refuses `CLIENT` (or only `CLIENT UNBLOCK`), so a stopping
    /// server cannot wake its blocked read: servers still serve, read with short
    /// blocks instead, and stop within about one of them (0.5 s).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_servers_serve_and_stop_when_client_unblock_is_refused() {
        use mqrpc::{Client, Target};
        for refused in ["-client", "-client|unblock"] {
            let acl = [
                "--user", "default", "on", "nopass", "~*", "&*", "+@all", refused,
            ];
            let Some(broker) = OwnBroker::start("redis-server", |port| own_redis(port, &acl)).await
            else {
                return;
            };
            let transport = connect(broker.port, "mqrpc-noclient").await;
            let server = super::service_server(
                transport,
                "noclient",
                "s1",
                &crate::service::Recorder::new(),
            )
            .await;
            let client = Client::new(
                connect(broker.port, "mqrpc-noclient").await,
                Target::new("noclient"),
            )
            .timeout(std::time::Duration::from_secs(10));
            super::echo_in_hundreds(&client, 200).await;
            client.close().await;
            // Idle now: the readers block, for 0.5 s at most.
            tokio::time::sleep(std::time::Duration::from_millis(700)).await;
            let started = std::time::Instant::now();
            server.shutdown().await.expect("shutdown");
            let took = started.elapsed();
            // A bound for correctness (a blocked read of 2 s, block_ms, would exceed
            // it), generous for a busy machine.
            assert!(
                took < std::time::Duration::from_millis(1500),
                "with {refused}, an idle server took {took:?} to stop"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_server_restart_is_survived() {
        let Some(mut broker) = OwnBroker::start("redis-server", |port| own_redis(port, &[])).await
        else {
            return;
        };
        faults::broker_restart("redis", &mut broker, |port| connect(port, "mqrpc-restart")).await;
    }
}
