//! mqrpc on a Redis Cluster of 3 masters and 3 replicas (`scripts/cluster-redis.sh`,
//! ports 17000-17005), in cluster mode (`?cluster=true`, one seed node per URL: the
//! cluster client finds the others).
//!
//! - `suite`: the conformance suite, each transport seeded through the next node
//!   (masters and replicas in turn), so a case's server and client start from
//!   different nodes and most keys live on a node neither was pointed at.
//! - `faults`: a long-lived server and client, seeded through a master that owns
//!   none of the topic's slots, under a stream of calls and casts; the master of the
//!   topic's slot is killed (`kill -9`); calls must work again after the failover and
//!   one read cycle without restarting the server. Casts acknowledged and handled are
//!   counted: replication is asynchronous, so a cast a master acknowledged just
//!   before it died may be missing on the promoted replica (counted, printed, not
//!   required to be zero). Messages written twice are counted too, in the stream
//!   itself (a group of the test's own keeps every entry): redis-rs's cluster client
//!   sends a command again after its connection dropped, so an `XADD` the dying
//!   master applied (and replicated) may be applied again by the promoted replica;
//!   a server drops a duplicate only within one instance.

use super::Cluster;

/// Options of every URL here: short claims and reads, so a failover is recovered
/// from quickly, and a prefix of their own.
const OPTIONS: &str = "cluster=true&prefix=mqrpc-cluster&claim_idle_ms=1000&stream_ttl=300\
&block_ms=2000&reply_ttl=30&maxlen=1000000";

/// The URL of a transport seeded through `node` (`host:port`).
fn url(node: &str) -> String {
    format!("redis://{node}/?{OPTIONS}")
}

/// A master that owns none of `master`'s slots: the master of another key's slot.
fn other_master(cluster: &Cluster, master: &str) -> String {
    (0..100)
        .map(|i| cluster.ctl(&["slot-master", &format!("seed-{i}")]))
        .find(|node| node != master)
        .expect("another master owns some slot")
}

pub mod suite {
    use std::sync::Arc;

    use mqrpc::{RedisConfig, Server, Target};

    use super::{Cluster, other_master, url};
    use crate::service::{self, Recorder};
    use crate::suite::Backend;

    pub async fn backend() -> Option<Backend> {
        let cluster = Cluster::get("redis")?;
        Some(cluster.rotating_backend("redis-cluster", |_, node| url(node)))
    }

    conformance_suite!(backend);

    /// The master that owns `topic`'s slot, and a transport without `cluster=true`
    /// to another master, which does not own it.
    async fn plain_transport_off_the_slot(
        cluster: &Cluster,
        topic: &str,
    ) -> (String, Arc<dyn mqrpc::Transport>) {
        let config = RedisConfig::parse(&url(&cluster.nodes[0])).expect("URL");
        let master = cluster.ctl(&["slot-master", &config.topic_key(&config.exchange, topic)]);
        let other = other_master(cluster, &master);
        let transport = mqrpc::connect(&format!("redis://{other}/?prefix=mqrpc-cluster"))
            .await
            .expect("one node answers");
        (master, transport)
    }

    /// A URL without `cluster=true` talks to its one node: what that node does not
    /// own fails, and the error names Redis's `MOVED`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_cluster_mode_errors_name_moved() {
        let Some(cluster) = Cluster::get("redis") else {
            return;
        };
        let topic = format!("plain_{}", &mqrpc::wire::new_id()[..10]);
        let (master, transport) = plain_transport_off_the_slot(&cluster, &topic).await;
        let err = Server::builder(transport, Target::new(&topic).server("s1"))
            .endpoint(service::endpoint("s1", &Recorder::new()))
            .start()
            .await
            .expect_err("the topic's slot is on another node");
        let text = err.to_string();
        assert!(
            text.contains("(Redis MOVED ")
                && text.contains(&master)
                && text.contains("cluster=true"),
            "{text}"
        );
    }

    /// A cast through a URL without `cluster=true`, to a node that does not own the
    /// topic's slot, fails at once with an error naming `MOVED` (not retryable):
    /// it is not sent again until the client's timeout, which would hide the cause.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_cluster_mode_a_cast_fails_naming_moved() {
        let Some(cluster) = Cluster::get("redis") else {
            return;
        };
        let topic = format!("plain_cast_{}", &mqrpc::wire::new_id()[..10]);
        let (master, transport) = plain_transport_off_the_slot(&cluster, &topic).await;
        // A timeout far longer than the test may take: the cast must fail by itself.
        let client = mqrpc::Client::new(transport, Target::new(&topic))
            .timeout(std::time::Duration::from_secs(600));
        let started = std::time::Instant::now();
        let err = client
            .cast(
                &mqrpc::Context::new(),
                "record",
                serde_json::json!({"id": 1}),
            )
            .await
            .expect_err("the topic's slot is on another node");
        let text = err.to_string();
        eprintln!(
            "plain-URL cast failed after {:?}: {text}",
            started.elapsed()
        );
        assert!(
            !err.is_retryable(),
            "a redirection is not retryable: {text}"
        );
        assert!(
            text.contains("(Redis MOVED ")
                && text.contains(&master)
                && text.contains("cluster=true"),
            "{text}"
        );
    }
}

mod faults {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use mqrpc::{AckMode, Client, Context, RedisConfig, Server, Target};
    use serde_json::json;

    use super::{Cluster, other_master, url};
    use crate::faults::figures;
    use crate::service::{self, Recorder};

    /// The longest the calls may take to work again after the kill: the failover
    /// (`cluster-node-timeout` 5 s, then the election: about 9 s measured) plus a read
    /// cycle, with room for a loaded machine.
    const RECOVERY_BOUND: Duration = Duration::from_secs(30);

    /// The longest the calls may take to work again once a replica owns the slot:
    /// a read blocked on the dead master (`block_ms` 2 s) timing out (its response
    /// timeout is the block and 5 s), the reader's backoff (at most 5 s), and a
    /// margin for a loaded machine.
    const AFTER_FAILOVER_BOUND: Duration = Duration::from_secs(15);

    /// The test's own group on the topic stream: while a stream has a group other
    /// than the servers', settled entries stay (as for a watcher), so the stream
    /// shows every message written, duplicates included.
    const KEEPER_GROUP: &str = "fault-test-keeper";

    /// What the traffic saw.
    #[derive(Default)]
    struct Traffic {
        calls_ok: AtomicU64,
        calls_failed: AtomicU64,
        casts_failed: AtomicU64,
        /// Ids of the casts Redis acknowledged.
        acked: Mutex<Vec<u64>>,
        /// Error messages of failures, and how often each came.
        errors: Mutex<std::collections::BTreeMap<String, u64>>,
    }

    impl Traffic {
        fn failed(&self, err: &mqrpc::Error) {
            // Ids and addresses vary: the first words say what failed.
            let text: String = err.to_string().chars().take(140).collect();
            *self
                .errors
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(text)
                .or_default() += 1;
        }
    }

    /// Calls one after another until `stop`.
    async fn calls(client: Client, seen: Arc<Traffic>, stop: Arc<AtomicBool>) {
        while !stop.load(Ordering::Relaxed) {
            match client
                .call::<_, i64>(&Context::new(), "add", json!({"a": 1, "b": 1}))
                .await
            {
                Ok(2) => seen.calls_ok.fetch_add(1, Ordering::Relaxed),
                Ok(other) => panic!("add(1, 1) answered {other}"),
                Err(err) => {
                    seen.failed(&err);
                    seen.calls_failed.fetch_add(1, Ordering::Relaxed)
                }
            };
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Numbered casts one after another, beside the calls, until `stop`.
    async fn casts(client: Client, seen: Arc<Traffic>, stop: Arc<AtomicBool>) {
        let mut id = 0u64;
        while !stop.load(Ordering::Relaxed) {
            id += 1;
            match client
                .cast(&Context::new(), "record", json!({"id": id}))
                .await
            {
                Ok(()) => seen
                    .acked
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(id),
                Err(err) => {
                    seen.failed(&err);
                    seen.casts_failed.fetch_add(1, Ordering::Relaxed);
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Calls until one succeeds or `limit` passes; when it did, after how long.
    async fn first_success(client: &Client, limit: Duration) -> Option<Duration> {
        let started = Instant::now();
        while started.elapsed() < limit {
            let call = client
                .clone()
                .timeout(Duration::from_secs(2))
                .call::<_, i64>(&Context::new(), "add", json!({"a": 2, "b": 3}))
                .await;
            if let Ok(5) = call {
                return Some(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// The node index (1-based, as the script counts) of `host:port`.
    fn index_of(cluster: &Cluster, node: &str) -> usize {
        cluster
            .nodes
            .iter()
            .position(|n| n == node)
            .unwrap_or_else(|| panic!("{node} is not one of {:?}", cluster.nodes))
            + 1
    }

    /// Kill -9 of the master of the topic's slot during calls and casts: calls work
    /// again after the failover, without restarting the server; acknowledged casts
    /// lost are counted.
    ///
    /// The library's warnings and errors are captured (on every thread of the
    /// test's runtime): none may name `CROSSSLOT`, which a server only logs.
    #[test]
    fn kill_the_topic_masters_node() {
        let log = crate::redaction::Captured::default();
        let make = log.clone();
        let subscribe = move || {
            let subscriber = tracing_subscriber::fmt()
                .with_writer(make.clone())
                .with_max_level(tracing::Level::WARN)
                .with_ansi(false)
                .finish();
            // Kept for the thread's life: the runtime's threads end with the test.
            std::mem::forget(tracing::subscriber::set_default(subscriber));
        };
        subscribe();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .on_thread_start(subscribe)
            .build()
            .expect("runtime");
        runtime.block_on(kill_the_topic_masters_node_async());
        drop(runtime);
        let logged = log.text();
        let crossslot: Vec<&str> = logged
            .lines()
            .filter(|line| line.contains("CROSSSLOT"))
            .collect();
        eprintln!(
            "{} lines of warnings and errors logged during the fault test; the first:",
            logged.lines().count()
        );
        for line in logged.lines().take(10) {
            eprintln!("  {}", line.chars().take(300).collect::<String>());
        }
        assert!(
            crossslot.is_empty(),
            "a command spanned slots: {crossslot:?}"
        );
    }

    async fn kill_the_topic_masters_node_async() {
        let Some(cluster) = Cluster::get("redis") else {
            return;
        };
        let topic = format!("cluster_faults_{}", &mqrpc::wire::new_id()[..10]);
        let config = RedisConfig::parse(&url(&cluster.nodes[0])).expect("URL");
        let key = config.topic_key(&config.exchange, &topic);
        let master = cluster.ctl(&["slot-master", &key]);
        let seed = other_master(&cluster, &master);
        eprintln!("topic key {key} on {master}; server and client seeded through {seed}");

        let recorder = Recorder::new();
        let server = Server::builder(
            mqrpc::connect(&url(&seed)).await.expect("server transport"),
            Target::new(&topic).server("s1"),
        )
        .endpoint(service::endpoint("s1", &recorder))
        .ack_mode(AckMode::AfterHandling)
        .start()
        .await
        .expect("server starts on the cluster");
        cluster.ctl(&["at", &key, "XGROUP", "CREATE", &key, KEEPER_GROUP, "0"]);
        // The client's seed list names the master that is about to die, too.
        let client = Client::new(
            mqrpc::connect(&url(&format!("{seed},{master}")))
                .await
                .expect("client transport"),
            Target::new(&topic),
        )
        .timeout(Duration::from_secs(5));
        first_success(&client, Duration::from_secs(10))
            .await
            .expect("calls work before the kill");

        let seen = Arc::new(Traffic::default());
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = [
            tokio::spawn(calls(client.clone(), seen.clone(), stop.clone())),
            tokio::spawn(casts(client.clone(), seen.clone(), stop.clone())),
        ];
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before = seen.calls_ok.load(Ordering::Relaxed);
        assert!(before > 0, "calls worked before the kill");

        let killed = index_of(&cluster, &master);
        cluster.ctl(&["kill", &killed.to_string()]);
        let restart = Restart(&cluster, killed);
        let kill_time = Instant::now();
        // The failover: a replica takes the slot over.
        let new_master = loop {
            let owner = std::process::Command::new("bash")
                .arg(cluster.script())
                .args(["slot-master", &key])
                .output()
                .expect("script runs");
            let owner = String::from_utf8_lossy(&owner.stdout).trim().to_owned();
            if !owner.is_empty() && owner != master {
                break owner;
            }
            assert!(
                kill_time.elapsed() < RECOVERY_BOUND,
                "no replica took over {key} within {RECOVERY_BOUND:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let failover = kill_time.elapsed();
        let recovered = first_success(&client, RECOVERY_BOUND)
            .await
            .map(|_| kill_time.elapsed())
            .unwrap_or_else(|| {
                panic!("calls did not work again within {RECOVERY_BOUND:?} of the failover")
            });
        // The traffic goes on a while on the new master.
        tokio::time::sleep(Duration::from_secs(3)).await;
        stop.store(true, Ordering::Relaxed);
        for task in tasks {
            task.await.expect("traffic task");
        }

        // Calls after the recovery work, on the server that never restarted: 20 in
        // a row, one failure allowed (a loaded machine), with a generous timeout.
        let mut after_failed = Vec::new();
        for _ in 0..20 {
            match client
                .clone()
                .timeout(Duration::from_secs(15))
                .call::<_, i64>(&Context::new(), "add", json!({"a": 20, "b": 22}))
                .await
            {
                Ok(sum) => assert_eq!(sum, 42),
                Err(err) => after_failed.push(err.to_string()),
            }
        }
        assert!(
            after_failed.len() <= 1,
            "calls after the failover failed: {after_failed:?}"
        );

        // Messages written twice, in the stream (calls' requests and casts).
        let ids = cluster.ctl(&["unique-ids", &key]);
        let mut per_id = std::collections::HashMap::<&str, usize>::new();
        for id in ids.lines().filter(|l| !l.is_empty()) {
            *per_id.entry(id).or_default() += 1;
        }
        let stream_entries: usize = per_id.values().sum();
        let stream_duplicates: usize = per_id.values().map(|n| n - 1).sum();

        // Casts: what Redis acknowledged against what the server handled.
        let acked = seen.acked.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let deadline = Instant::now() + Duration::from_secs(15);
        let (lost, duplicated) = loop {
            let records = recorder.settled(Duration::from_millis(500)).await;
            let counts = Recorder::per_id(&records);
            let lost = acked.iter().filter(|id| !counts.contains_key(id)).count();
            let duplicated: usize = counts.values().map(|n| n.saturating_sub(1)).sum();
            if lost == 0 || Instant::now() > deadline {
                break (lost, duplicated);
            }
        };
        let errors = seen
            .errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for (error, count) in &errors {
            eprintln!("{count:>5} x {error}");
        }
        figures(format!(
            "FIGURES redis-cluster kill_slot_master calls_ok={} calls_failed={} \
             casts_acked={} casts_failed={} casts_lost={lost} casts_duplicated={duplicated} \
             stream_entries={stream_entries} stream_duplicates={stream_duplicates} \
             failover_s={:.1} calls_again_s={:.1} killed={master} new_master={new_master}",
            seen.calls_ok.load(Ordering::Relaxed),
            seen.calls_failed.load(Ordering::Relaxed),
            acked.len(),
            seen.casts_failed.load(Ordering::Relaxed),
            failover.as_secs_f64(),
            recovered.as_secs_f64(),
        ));
        // A cast failed by the library is reported, never silently dropped: the
        // counts above say how many; a message never names MOVED left unfollowed.
        // (That no pipeline spans slots is checked by transport-redis's unit test
        // `every_pipeline_keeps_to_one_slot`: a server only logs what Redis refuses.)
        assert!(
            !errors.keys().any(|e| e.contains("CROSSSLOT")),
            "a command spanned slots: {errors:?}"
        );
        assert!(
            recovered.saturating_sub(failover) < AFTER_FAILOVER_BOUND,
            "calls worked again {:?} after the failover (bound {AFTER_FAILOVER_BOUND:?})",
            recovered.saturating_sub(failover)
        );
        assert!(stream_entries > 0, "the stream kept the messages: {ids:?}");

        server.shutdown().await.expect("shutdown");
        drop(restart);
    }

    /// Starts a killed node again when dropped, the test passed or not, so later
    /// tests see the whole cluster (the node rejoins as a replica).
    struct Restart<'a>(&'a Cluster, usize);

    impl Drop for Restart<'_> {
        fn drop(&mut self) {
            let started = std::process::Command::new("bash")
                .arg(self.0.script())
                .args(["start", &self.1.to_string()])
                .status();
            if !matches!(started, Ok(status) if status.success()) {
                eprintln!("could not start node {} again: {started:?}", self.1);
            }
        }
    }
}
