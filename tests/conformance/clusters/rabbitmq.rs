//! mqrpc on a 3-node RabbitMQ cluster (`scripts/cluster-rabbitmq.sh`: r1..r3 on
//! 127.0.0.1:5701-5703, `net_ticktime` 10 s, `pause_minority`), with quorum queues
//! for topics and servers (`quorum=true`) and for replies and fanouts
//! (`transient_quorum=true`).
//!
//! - `suite`: the conformance suite, each transport on the next node, so a case's
//!   server and client sit on different nodes.
//! - `faults`: a long-lived client and server in this process while nodes are killed
//!   (`kill -9`), two at once, or frozen (`SIGSTOP`); judged by counts (calls sent,
//!   answered, failed by kind; casts confirmed versus handled), each fault printing
//!   a `SUMMARY` line. Run with `--test-threads=1`.

/// The options every cluster test adds: quorum queues everywhere, fast detection of
/// a lost node (heartbeat 2 s), fast reconnection, and short re-subscription steps.
/// Transient (reply, fanout) queues left by a test expire after 30 s: each is a
/// 3-member Raft group while it lives.
const OPTIONS: &str = "quorum=true&transient_quorum=true&heartbeat=2&max_backoff=0.5\
    &resubscribe_timeout=3s&topic_ttl=300&transient_ttl=30";

pub mod suite {
    use crate::clusters::Cluster;
    use crate::suite::Backend;

    pub async fn backend() -> Option<Backend> {
        let cluster = Cluster::get("rabbitmq")?;
        Some(cluster.rotating_backend("rabbitmq-cluster", |_, node| {
            format!("amqp://guest:guest@{node}/?{}", super::OPTIONS)
        }))
    }

    conformance_suite!(backend);
}

pub mod faults {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};
    use std::time::{Duration, Instant};

    use mqrpc::{AmqpConfig, AmqpTransport, Client, Context, Server, Target};
    use serde_json::json;
    use tokio::task::JoinHandle;

    use crate::clusters::Cluster;
    use crate::redaction::Captured;
    use crate::service::{self, Recorder};

    /// A URL listing every node, node `first` first, tried in that order (so a
    /// transport's first node is known; it moves to the next one when it loses it).
    fn url(cluster: &Cluster, first: usize, extra: &str) -> String {
        let n = cluster.nodes.len();
        let hosts: Vec<String> = (0..n)
            .map(|i| format!("guest:guest@{}", cluster.nodes[(first - 1 + i) % n]))
            .collect();
        format!(
            "amqp://{}/?{}&shuffle_hosts=false{extra}",
            hosts.join(","),
            super::OPTIONS
        )
    }

    async fn transport(cluster: &Cluster, first: usize, extra: &str) -> AmqpTransport {
        let url = url(cluster, first, extra);
        let config = AmqpConfig::parse(&url).expect("cluster URL");
        AmqpTransport::with_config(config)
            .await
            .unwrap_or_else(|err| panic!("connecting to {url}: {err}"))
    }

    /// Runs the script off the runtime's workers.
    async fn ctl(cluster: &Cluster, args: &[&str]) -> String {
        let cluster = cluster.clone();
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            cluster.ctl(&args)
        })
        .await
        .expect("script task")
    }

    /// The node number a transport's connection is on.
    async fn node_of(cluster: &Cluster, transport: &AmqpTransport) -> usize {
        // Right after a reconnection the broker may not list the connection yet.
        for _ in 0..20 {
            let cluster2 = cluster.clone();
            let name = transport.connection_name().to_owned();
            let found = tokio::task::spawn_blocking(move || {
                std::process::Command::new("bash")
                    .arg(cluster2.script())
                    .args(["connection-node", &name])
                    .output()
            })
            .await
            .expect("script task")
            .expect("run script");
            if found.status.success()
                && let Ok(n) = String::from_utf8_lossy(&found.stdout).trim().parse()
            {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        panic!("connection {} not found", transport.connection_name());
    }

    /// Brings back any node a previous test left down, frozen or partitioned.
    async fn all_nodes_up(cluster: &Cluster) {
        for n in ["1", "2", "3"] {
            let _ = std::process::Command::new("bash")
                .arg(cluster.script())
                .args(["cont", n])
                .output();
        }
        for n in ["1", "2", "3"] {
            let script = cluster.script();
            let running = std::process::Command::new("bash")
                .arg(&script)
                .args(["ctl", n, "status"])
                .output()
                .is_ok_and(|o| o.status.success());
            if !running {
                ctl(cluster, &["start", n]).await;
            }
        }
        ctl(cluster, &["heal"]).await;
    }

    /// The log of this test process (transport-amqp at INFO), when this process's
    /// global subscriber could be set (the fault tests run in a process of their own,
    /// `--test-threads=1`); `None` otherwise.
    fn log() -> Option<&'static Captured> {
        static LOG: OnceLock<Option<Captured>> = OnceLock::new();
        LOG.get_or_init(|| {
            let captured = Captured::default();
            let subscriber = tracing_subscriber::fmt()
                .with_env_filter("warn,transport_amqp=info")
                .with_ansi(false)
                .with_writer(captured.clone())
                .finish();
            tracing::subscriber::set_global_default(subscriber)
                .ok()
                .map(|()| captured)
        })
        .as_ref()
    }

    /// Lines of the log since `from` (a length of it) that contain `needle`.
    fn logged(from: usize, needle: &str) -> Vec<String> {
        let Some(log) = log() else {
            return Vec::new();
        };
        let text = log.text();
        text.get(from..)
            .unwrap_or_default()
            .lines()
            .filter(|line| line.contains(needle))
            .map(str::to_owned)
            .collect()
    }

    /// Prints the log since `from` (for a failure's post-mortem).
    fn dump_log(from: usize) {
        if let Some(log) = log() {
            let text = log.text();
            eprintln!(
                "--- log ---\n{}\n--- end of log ---",
                text.get(from..).unwrap_or_default()
            );
        }
    }

    fn log_len() -> usize {
        log().map_or(0, |log| log.text().len())
    }

    /// When a log line (after `from`) containing every one of `needles` first shows,
    /// polled every 20 ms for up to `limit`; `None` without a captured log or line.
    fn watch_log(
        from: usize,
        needles: &'static [&'static str],
        limit: Duration,
    ) -> JoinHandle<Option<Instant>> {
        tokio::spawn(async move {
            log()?;
            let until = Instant::now() + limit;
            while Instant::now() < until {
                let seen = log().is_some_and(|log| {
                    let text = log.text();
                    text.get(from..)
                        .unwrap_or_default()
                        .lines()
                        .any(|line| needles.iter().all(|n| line.contains(n)))
                });
                if seen {
                    return Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            None
        })
    }

    /// One call of the traffic: when it was sent, when it ended, and how.
    #[derive(Clone, Debug)]
    struct CallRecord {
        sent: Instant,
        ended: Instant,
        error: Option<String>,
    }

    /// Casts sent: confirmed ids, and failed ones with their error.
    #[derive(Default)]
    struct Casts {
        confirmed: Vec<u64>,
        failed: Vec<(u64, String)>,
    }

    /// A long-lived client sending a call and a cast every `every`.
    struct Traffic {
        calls: Arc<Mutex<Vec<CallRecord>>>,
        casts: Arc<Mutex<Casts>>,
        stop: tokio_util::sync::CancellationToken,
        tasks: Vec<JoinHandle<()>>,
    }

    impl Traffic {
        fn start(client: &Client, every: Duration) -> Traffic {
            let calls = Arc::new(Mutex::new(Vec::new()));
            let casts = Arc::new(Mutex::new(Casts::default()));
            let stop = tokio_util::sync::CancellationToken::new();
            let mut tasks = Vec::new();
            {
                let (client, calls, stop) = (client.clone(), calls.clone(), stop.clone());
                tasks.push(tokio::spawn(async move {
                    while !stop.is_cancelled() {
                        let sent = Instant::now();
                        let outcome = client
                            .call::<_, i64>(&Context::new(), "add", json!({"a": 2, "b": 3}))
                            .await;
                        let error = match outcome {
                            Ok(5) => None,
                            Ok(other) => Some(format!("wrong sum {other}")),
                            Err(err) => Some(chain(&err)),
                        };
                        calls.lock().expect("calls").push(CallRecord {
                            sent,
                            ended: Instant::now(),
                            error,
                        });
                        tokio::time::sleep(every).await;
                    }
                }));
            }
            {
                let (client, casts, stop) = (client.clone(), casts.clone(), stop.clone());
                tasks.push(tokio::spawn(async move {
                    let mut id = 0u64;
                    while !stop.is_cancelled() {
                        id += 1;
                        let outcome = client
                            .cast(&Context::new(), "record", json!({ "id": id }))
                            .await;
                        {
                            let mut casts = casts.lock().expect("casts");
                            match outcome {
                                Ok(()) => casts.confirmed.push(id),
                                Err(err) => casts.failed.push((id, chain(&err))),
                            }
                        }
                        tokio::time::sleep(every).await;
                    }
                }));
            }
            Traffic {
                calls,
                casts,
                stop,
                tasks,
            }
        }

        async fn finish(self) -> (Vec<CallRecord>, Casts) {
            self.stop.cancel();
            for task in self.tasks {
                task.await.expect("traffic task");
            }
            let calls = std::mem::take(&mut *self.calls.lock().expect("calls"));
            let casts = std::mem::take(&mut *self.casts.lock().expect("casts"));
            (calls, casts)
        }

        fn calls_since(&self, since: Instant) -> Vec<CallRecord> {
            (self.calls.lock().expect("calls").iter())
                .filter(|c| c.sent >= since)
                .cloned()
                .collect()
        }

        /// The longest time without a successful call ending, from `since` until the
        /// first success after it: how long the kill kept calls from completing.
        fn longest_gap(&self, since: Instant) -> Duration {
            let calls = self.calls.lock().expect("calls");
            let mut ends: Vec<Instant> = calls
                .iter()
                .filter(|c| c.error.is_none())
                .map(|c| c.ended)
                .collect();
            ends.sort_unstable();
            let mut last = ends.iter().rev().find(|end| **end <= since).copied();
            let mut gap = Duration::ZERO;
            for end in ends.into_iter().filter(|end| *end > since) {
                gap = gap.max(end - last.unwrap_or(since));
                last = Some(end);
            }
            gap
        }

        /// Waits until a call sent after `since` succeeded; how long after `since`
        /// it ended.
        async fn ok_again_after(&self, since: Instant, limit: Duration) -> Option<Duration> {
            let until = Instant::now() + limit;
            while Instant::now() < until {
                let first_ok = self
                    .calls_since(since)
                    .iter()
                    .filter(|c| c.error.is_none())
                    .map(|c| c.ended)
                    .min();
                if let Some(ended) = first_ok {
                    return Some(ended - since);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            None
        }
    }

    /// An error with its sources, for counting by kind.
    fn chain(err: &dyn std::error::Error) -> String {
        let mut text = err.to_string();
        let mut source = err.source();
        while let Some(cause) = source {
            text.push_str(" <- ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        text
    }

    /// The kind of a failed call or cast, as the summary counts them.
    fn kind(error: &str) -> &'static str {
        if error.contains("(nack)") {
            "nack"
        } else if error.contains("may or may not have been delivered") {
            "unconfirmed"
        } else if error.contains("timed out") {
            "timeout"
        } else {
            "other"
        }
    }

    fn kinds<'a>(errors: impl Iterator<Item = &'a str>) -> HashMap<&'static str, usize> {
        let mut counts = HashMap::new();
        for error in errors {
            *counts.entry(kind(error)).or_insert(0) += 1;
        }
        counts
    }

    /// The test's server, client and traffic on a topic of its own, with the topic's
    /// queues created through node `leader` (so their quorum leader is there), the
    /// server on node `server_node` and the client on node `client_node`.
    struct Rig {
        cluster: Cluster,
        topic: String,
        recorder: Arc<Recorder>,
        server_side: AmqpTransport,
        client_side: AmqpTransport,
        server: Server,
        client: Client,
    }

    impl Rig {
        async fn new(
            cluster: &Cluster,
            case: &str,
            leader: usize,
            server_node: usize,
            client_node: usize,
        ) -> Rig {
            all_nodes_up(cluster).await;
            let topic = format!("{case}_{}", &mqrpc::wire::new_id()[..8]);
            // A first server through `leader` declares the quorum queues there, then
            // stops (its queues stay).
            let setup = transport(cluster, leader, "").await;
            let first = Server::builder(Arc::new(setup.clone()), Target::new(&topic).server("s1"))
                .endpoint(service::endpoint("s1", &Recorder::new()))
                .start()
                .await
                .expect("setup server");
            first.shutdown().await.expect("setup server stops");
            setup.close().await;
            let recorder = Recorder::new();
            let server_side = transport(cluster, server_node, "").await;
            let server = Server::builder(
                Arc::new(server_side.clone()),
                Target::new(&topic).server("s1"),
            )
            .endpoint(service::endpoint("s1", &recorder))
            .start()
            .await
            .expect("server");
            let client_side = transport(cluster, client_node, "").await;
            let client = Client::new(Arc::new(client_side.clone()), Target::new(&topic))
                .timeout(Duration::from_secs(5));
            let sum: i64 = client
                .call(&Context::new(), "add", json!({"a": 1, "b": 2}))
                .await
                .expect("first call");
            assert_eq!(sum, 3);
            Rig {
                cluster: cluster.clone(),
                topic,
                recorder,
                server_side,
                client_side,
                server,
                client,
            }
        }

        async fn where_(&self) -> (usize, usize, usize) {
            let leader: usize = ctl(&self.cluster, &["quorum-leader", &self.topic])
                .await
                .parse()
                .expect("leader number");
            let server = node_of(&self.cluster, &self.server_side).await;
            let client = node_of(&self.cluster, &self.client_side).await;
            (server, leader, client)
        }

        /// Waits for the traffic's casts to be handled, then checks that each
        /// confirmed cast was handled exactly once; returns (confirmed, failed,
        /// failed-but-handled, duplicates executed).
        async fn judge_casts(&self, casts: &Casts) -> (usize, usize, usize, usize) {
            let handled = loop {
                let before = self
                    .recorder
                    .settled(Duration::from_millis(500))
                    .await
                    .len();
                let records = self.recorder.settled(Duration::from_secs(2)).await;
                if records.len() == before {
                    break Recorder::per_id(&records);
                }
            };
            let mut lost = Vec::new();
            let mut duplicates = 0;
            for id in &casts.confirmed {
                match handled.get(id).copied().unwrap_or(0) {
                    1 => {}
                    0 => lost.push(*id),
                    n => duplicates += n - 1,
                }
            }
            let mut failed_handled = 0;
            for (id, _) in &casts.failed {
                match handled.get(id).copied().unwrap_or(0) {
                    0 => {}
                    1 => failed_handled += 1,
                    n => {
                        failed_handled += 1;
                        duplicates += n - 1;
                    }
                }
            }
            assert!(
                lost.is_empty(),
                "{} confirmed casts were never handled: {lost:?}",
                lost.len()
            );
            assert_eq!(duplicates, 0, "casts executed more than once");
            (
                casts.confirmed.len(),
                casts.failed.len(),
                failed_handled,
                duplicates,
            )
        }

        async fn finish(self) {
            self.server.shutdown().await.expect("shutdown");
            self.client_side.close().await;
            self.server_side.close().await;
        }
    }

    /// Kill -9 (1) the server's node, (2) the quorum leader's node, (3) the client's
    /// node, each during calls and casts, and start it again: every confirmed cast is
    /// handled exactly once, at most one call fails per kill (never with a nack),
    /// and calls succeed again soon after each kill.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn node_kills_during_calls_and_casts() {
        let Some(cluster) = Cluster::get("rabbitmq") else {
            return;
        };
        let log_from = log_len();
        let rig = Rig::new(&cluster, "kills", 3, 1, 2).await;
        let traffic = Traffic::start(&rig.client, Duration::from_millis(20));
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut summary = Vec::new();
        for role in ["server", "leader", "client"] {
            let (server, leader, client) = rig.where_().await;
            let victim = match role {
                "server" => server,
                "leader" => leader,
                _ => client,
            };
            eprintln!(
                "rabbitmq kill of the {role}'s node r{victim} (server r{server}, leader \
                 r{leader}, client r{client})"
            );
            // The server's consumer subscribing again on another node (only the
            // server's kill makes it re-subscribe).
            let resubscribed = (role == "server").then(|| {
                watch_log(
                    log_len(),
                    &["re-subscribed after reconnection", "Server {"],
                    Duration::from_secs(30),
                )
            });
            let killed_at = Instant::now();
            ctl(&cluster, &["kill", &victim.to_string()]).await;
            // The node is dead once the script returned: calls sent from then on are
            // sent after the kill (earlier ones may have been answered before it).
            let dead_at = Instant::now();
            let recovered = traffic
                .ok_again_after(dead_at, Duration::from_secs(30))
                .await
                .unwrap_or_else(|| {
                    dump_log(log_from);
                    for call in traffic.calls_since(killed_at) {
                        eprintln!(
                            "call sent {:?} after the kill: {:?}",
                            call.sent - killed_at,
                            call.error
                        );
                    }
                    panic!("calls never worked again after the kill of r{victim}")
                });
            let resubscribed = match resubscribed {
                Some(watch) => watch.await.expect("log watch").map(|at| at - killed_at),
                None => None,
            };
            tokio::time::sleep(Duration::from_secs(2)).await;
            ctl(&cluster, &["start", &victim.to_string()]).await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            let calls = traffic.calls_since(killed_at);
            let failed: Vec<&str> = calls.iter().filter_map(|c| c.error.as_deref()).collect();
            for error in &failed {
                eprintln!("rabbitmq {role} kill: call failed: {error}");
            }
            let counts = kinds(failed.iter().copied());
            let gap = traffic.longest_gap(killed_at);
            summary.push(format!(
                "kill {role} (r{victim}; server r{server}, leader r{leader}, client r{client}): \
                 calls {} failed {} {counts:?}, first call sent after the kill answered after \
                 {recovered:.2?}, longest time without an answered call {gap:.2?}{}",
                calls.len(),
                failed.len(),
                resubscribed.map_or(String::new(), |at| format!(
                    ", server consuming again {at:.2?} after the kill"
                ))
            ));
            crate::faults::figures(format!(
                "FIGURES rabbitmq-cluster kill_{role} node=r{victim} calls={} calls_failed={} \
                 nack={} unconfirmed={} timeout={} first_ok_ms={} longest_gap_ms={}{}",
                calls.len(),
                failed.len(),
                counts.get("nack").unwrap_or(&0),
                counts.get("unconfirmed").unwrap_or(&0),
                counts.get("timeout").unwrap_or(&0),
                recovered.as_millis(),
                gap.as_millis(),
                resubscribed.map_or(String::new(), |at| format!(
                    " server_resubscribed_ms={}",
                    at.as_millis()
                ))
            ));
            if role == "server" && log().is_some() {
                // The issue asks for about 2 s; generous for a loaded 2-core machine,
                // the figure is printed.
                let at = resubscribed.unwrap_or_else(|| {
                    dump_log(log_from);
                    panic!("the server never logged its re-subscription after the kill")
                });
                assert!(
                    at < Duration::from_secs(10),
                    "the server took {at:?} to consume again after its node was killed"
                );
            }
            assert!(
                failed.len() <= 1,
                "{} calls failed across the kill of the {role}'s node: {failed:?}",
                failed.len()
            );
            assert!(
                !failed.iter().any(|e| kind(e) == "nack"),
                "a call failed with a nack: {failed:?}"
            );
            // Generous for a loaded 2-core machine; the figure is printed.
            assert!(
                recovered < Duration::from_secs(10),
                "calls took {recovered:?} to work again after the kill of the {role}'s node"
            );
        }
        let (_, casts) = traffic.finish().await;
        let cast_kinds = kinds(casts.failed.iter().map(|(_, e)| e.as_str()));
        for (id, error) in &casts.failed {
            eprintln!("rabbitmq kills: cast {id} failed: {error}");
        }
        assert!(
            !casts.failed.iter().any(|(_, e)| kind(e) == "nack"),
            "a cast failed with a nack"
        );
        let (confirmed, failed, failed_handled, duplicates) = rig.judge_casts(&casts).await;
        let nacks = logged(log_from, "the broker nacked a publish; trying again");
        if let Some(line) = nacks.first() {
            eprintln!("rabbitmq kills: first nack retried: {line}");
        }
        crate::faults::figures(format!(
            "FIGURES rabbitmq-cluster kills casts_confirmed={confirmed} casts_failed={failed} \
             casts_failed_but_handled={failed_handled} casts_lost=0 \
             casts_duplicated={duplicates} nack_retries={}",
            nacks.len()
        ));
        crate::faults::figures(format!(
            "SUMMARY rabbitmq node kills: {}; casts confirmed {confirmed} (each handled once), \
             failed {failed} {cast_kinds:?} ({failed_handled} of them handled anyway), \
             duplicates executed {duplicates}; nacked publishes tried again {}",
            summary.join("; "),
            nacks.len()
        ));
        rig.finish().await;
    }

    /// Two servers of a topic (on r1 and r2) share one recorder while casts flow and
    /// the node of the topic queue's quorum leader (r3) is killed: no confirmed cast is
    /// lost; a cast nacked and sent again may run on both servers (nack retries are
    /// at-least-once across servers), so duplicates are counted, not forbidden.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_servers_leader_kill_counts_duplicates() {
        let Some(cluster) = Cluster::get("rabbitmq") else {
            return;
        };
        let log_from = log_len();
        // The queues on r3 (leader), s1 on r1 (the rig), the client on r1.
        let rig = Rig::new(&cluster, "twoservers", 3, 1, 1).await;
        let second_side = transport(&cluster, 2, "").await;
        let second = Server::builder(
            Arc::new(second_side.clone()),
            Target::new(&rig.topic).server("s2"),
        )
        .endpoint(service::endpoint("s2", &rig.recorder))
        .start()
        .await
        .expect("second server");
        let traffic = Traffic::start(&rig.client, Duration::from_millis(10));
        tokio::time::sleep(Duration::from_secs(2)).await;
        let leader = ctl(&cluster, &["quorum-leader", &rig.topic]).await;
        ctl(&cluster, &["kill", &leader]).await;
        tokio::time::sleep(Duration::from_secs(6)).await;
        ctl(&cluster, &["start", &leader]).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (calls, casts) = traffic.finish().await;
        // Counted here, not by `judge_casts`, which forbids duplicates.
        let handled = loop {
            let before = rig.recorder.settled(Duration::from_millis(500)).await.len();
            let records = rig.recorder.settled(Duration::from_secs(2)).await;
            if records.len() == before {
                break Recorder::per_id(&records);
            }
        };
        let lost: Vec<u64> = (casts.confirmed.iter())
            .filter(|id| !handled.contains_key(id))
            .copied()
            .collect();
        let duplicates: usize = handled.values().map(|n| n.saturating_sub(1)).sum();
        let nacks = logged(log_from, "the broker nacked a publish; trying again").len();
        let failed_calls = calls.iter().filter(|c| c.error.is_some()).count();
        crate::faults::figures(format!(
            "FIGURES rabbitmq-cluster two_servers_leader_kill leader=r{leader} calls={} \
             calls_failed={failed_calls} casts_confirmed={} casts_failed={} casts_lost={} \
             casts_duplicated={duplicates} nack_retries={nacks}",
            calls.len(),
            casts.confirmed.len(),
            casts.failed.len(),
            lost.len(),
        ));
        assert!(lost.is_empty(), "confirmed casts never handled: {lost:?}");
        second.shutdown().await.expect("second server stops");
        second_side.close().await;
        rig.finish().await;
    }

    /// Kill 2 of the 3 nodes: calls fail while the majority is gone; once both are
    /// back, calls and casts work again without restarting anything of mqrpc's.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn majority_loss_then_recovery() {
        let Some(cluster) = Cluster::get("rabbitmq") else {
            return;
        };
        let rig = Rig::new(&cluster, "majority", 1, 1, 2).await;
        // Calls give up after 2 s, so several end while both nodes are down.
        let short = rig.client.clone().timeout(Duration::from_secs(2));
        let traffic = Traffic::start(&short, Duration::from_millis(50));
        tokio::time::sleep(Duration::from_secs(1)).await;
        let lost_at = Instant::now();
        ctl(&cluster, &["kill", "2"]).await;
        ctl(&cluster, &["kill", "3"]).await;
        tokio::time::sleep(Duration::from_secs(8)).await;
        // Both at once: a node restarted alone may wait for the other's tables.
        let starting_at = Instant::now();
        let (two, three) = tokio::join!(
            ctl(&cluster, &["start", "2"]),
            ctl(&cluster, &["start", "3"])
        );
        let _ = (two, three);
        let back_at = Instant::now();
        let recovered = traffic
            .ok_again_after(back_at, Duration::from_secs(60))
            .await
            .expect("calls work again once the majority is back");
        tokio::time::sleep(Duration::from_secs(2)).await;
        // Calls sent and ended while both nodes were down (after the second kill,
        // before they were started again).
        let down_from = lost_at + Duration::from_secs(4);
        let during: Vec<CallRecord> = traffic
            .calls_since(down_from)
            .into_iter()
            .filter(|c| c.ended < starting_at)
            .collect();
        let failed_during = during.iter().filter(|c| c.error.is_some()).count();
        let calls = traffic.calls_since(lost_at);
        let failed: Vec<&str> = calls.iter().filter_map(|c| c.error.as_deref()).collect();
        let counts = kinds(failed.iter().copied());
        let (_, casts) = traffic.finish().await;
        // A directed call and a fanout reach the server again too.
        let who: String = rig
            .client
            .prepare()
            .server("s1")
            .call(&Context::new(), "whoami", mqrpc::NoArgs {})
            .await
            .expect("directed call after recovery");
        assert_eq!(who, "s1");
        let (confirmed, cast_failed, failed_handled, duplicates) = rig.judge_casts(&casts).await;
        crate::faults::figures(format!(
            "SUMMARY rabbitmq majority loss: calls {} failed {} {counts:?} ({} of {} while \
             2 nodes were down); nodes back after {:.1?} (start took {:.1?}); calls ok \
             again {recovered:.2?} after; casts confirmed {confirmed} (each handled once), \
             failed {cast_failed} ({failed_handled} handled anyway), duplicates {duplicates}",
            calls.len(),
            failed.len(),
            failed_during,
            during.len(),
            back_at - lost_at,
            back_at - starting_at,
        ));
        assert!(
            failed_during > 0 && failed_during == during.len(),
            "calls fail while the majority is down ({failed_during} of {})",
            during.len()
        );
        assert!(
            recovered < Duration::from_secs(20),
            "calls took {recovered:?} to work again once the majority was back"
        );
        rig.finish().await;
    }

    /// Freeze (SIGSTOP) the server's node for longer than the cluster needs to
    /// declare it down: the server moves to another node and serves again within
    /// heartbeat + net_ticktime + a margin, before the node is resumed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn frozen_server_node() {
        let Some(cluster) = Cluster::get("rabbitmq") else {
            return;
        };
        // Leader and server on r1, client on r2.
        let log_from = log_len();
        let rig = Rig::new(&cluster, "frozen", 1, 1, 2).await;
        let (server, leader, client) = rig.where_().await;
        assert_ne!(server, client, "server and client on different nodes");
        let traffic = Traffic::start(&rig.client, Duration::from_millis(50));
        tokio::time::sleep(Duration::from_secs(1)).await;
        ctl(&cluster, &["stop", &server.to_string()]).await;
        // Once the script returned (calls sent before could still be answered).
        let frozen_at = Instant::now();
        // heartbeat 2 s (lost after about 2 heartbeats) + net_ticktime 10 s (a node
        // is declared down after 10 to 12.5 s) + a margin for a loaded 2-core
        // machine (11 to 15 s measured; 61 s before re-subscription steps had a
        // deadline, with the default net_ticktime).
        let bound = Duration::from_secs(2 * 2 + 10 + 15);
        // Waits past the bound, so a late recovery is measured, not cut off.
        let recovered = traffic
            .ok_again_after(frozen_at, bound + Duration::from_secs(20))
            .await;
        let calls = traffic.calls_since(frozen_at);
        ctl(&cluster, &["cont", &server.to_string()]).await;
        let resumed_after = frozen_at.elapsed();
        let failed: Vec<&str> = calls.iter().filter_map(|c| c.error.as_deref()).collect();
        let counts = kinds(failed.iter().copied());
        // The node resumed may find itself partitioned; pause_minority usually heals
        // it, `heal` restarts its app otherwise.
        tokio::time::sleep(Duration::from_secs(3)).await;
        ctl(&cluster, &["heal"]).await;
        let (_, casts) = traffic.finish().await;
        let (confirmed, cast_failed, failed_handled, duplicates) = rig.judge_casts(&casts).await;
        crate::faults::figures(format!(
            "SUMMARY rabbitmq frozen server node r{server} (leader r{leader}, client \
             r{client}): calls ok again after {recovered:.2?} (bound {bound:?}), calls while \
             frozen {} failed {} {counts:?}, resumed after {resumed_after:.1?}; casts \
             confirmed {confirmed} (each handled once), failed {cast_failed} \
             ({failed_handled} handled anyway), duplicates {duplicates}",
            calls.len(),
            failed.len(),
        ));
        let stuck = logged(log_from, "subscribing is stuck");
        for line in stuck.iter().take(3) {
            eprintln!("rabbitmq frozen node: {line}");
        }
        eprintln!(
            "rabbitmq frozen node: {} re-subscription steps logged as stuck",
            stuck.len()
        );
        crate::faults::figures(format!(
            "FIGURES rabbitmq-cluster frozen_server first_ok_ms={} stuck_steps={}",
            recovered.map_or(-1, |r| i64::try_from(r.as_millis()).unwrap_or(i64::MAX)),
            stuck.len()
        ));
        if log().is_some() {
            // The server's declarations wait on the frozen node (the quorum leader)
            // until the cluster declares it down: a step is cut off and logged.
            assert!(
                !stuck.is_empty(),
                "no re-subscription step was logged as stuck while the node was frozen"
            );
        }
        let recovered = recovered.unwrap_or_else(|| {
            dump_log(log_from);
            panic!("the server did not serve again within {bound:?} of its node freezing")
        });
        assert!(
            recovered < bound,
            "the server served again {recovered:?} after its node froze (bound {bound:?})"
        );
        rig.finish().await;
    }

    /// The trap: `durable=true` without quorum makes classic durable queues, which
    /// live on one node. While that node is down the server cannot re-subscribe (the
    /// broker answers 404 "home node ... is down or inaccessible") and calls fail;
    /// once it is back, the server subscribes again by itself. On its own exchange,
    /// since a vhost's queues and exchanges cannot change mode.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn durable_without_quorum_waits_for_the_queues_node() {
        let Some(cluster) = Cluster::get("rabbitmq") else {
            return;
        };
        all_nodes_up(&cluster).await;
        let log_from = log_len();
        let options = "durable=true&exchange=mqrpc_durable_classic&heartbeat=2&max_backoff=0.5\
            &resubscribe_timeout=3s&topic_ttl=300&transient_ttl=120&shuffle_hosts=false";
        let url = |first: usize| {
            let n = cluster.nodes.len();
            let hosts: Vec<String> = (0..n)
                .map(|i| format!("guest:guest@{}", cluster.nodes[(first - 1 + i) % n]))
                .collect();
            format!("amqp://{}/?{options}", hosts.join(","))
        };
        let topic = format!("classic_{}", &mqrpc::wire::new_id()[..8]);
        let recorder = Recorder::new();
        // The server, and so its queues, on r2; the client on r1.
        let server_side = AmqpTransport::connect(&url(2)).await.expect("server side");
        let server = Server::builder(
            Arc::new(server_side.clone()),
            Target::new(&topic).server("s1"),
        )
        .endpoint(service::endpoint("s1", &recorder))
        .start()
        .await
        .expect("server");
        let client_side = AmqpTransport::connect(&url(1)).await.expect("client side");
        let client = Client::new(Arc::new(client_side.clone()), Target::new(&topic))
            .timeout(Duration::from_secs(2));
        let ctx = Context::new();
        let add = || client.call::<_, i64>(&ctx, "add", json!({"a": 1, "b": 1}));
        assert_eq!(add().await.expect("before the kill"), 2);
        let killed_at = Instant::now();
        ctl(&cluster, &["kill", "2"]).await;
        let mut failed_down = 0;
        for _ in 0..3 {
            if add().await.is_err() {
                failed_down += 1;
            }
        }
        let refused = logged(log_from, "is down or inaccessible").len();
        let down_for = killed_at.elapsed();
        ctl(&cluster, &["start", "2"]).await;
        let back_at = Instant::now();
        let mut recovered = None;
        for _ in 0..40 {
            if add().await.is_ok() {
                recovered = Some(back_at.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        crate::faults::figures(format!(
            "SUMMARY rabbitmq durable=true without quorum: {failed_down} of 3 calls failed \
             while the queues' node was down ({down_for:.1?}; 404 home-node-down logged \
             {refused} times); calls ok again {recovered:.2?} after the node was back"
        ));
        assert_eq!(
            failed_down, 3,
            "calls fail while the classic queues' node is down"
        );
        assert!(
            recovered.is_some(),
            "the server subscribes again once the node is back"
        );
        server.shutdown().await.expect("shutdown");
        client_side.close().await;
        server_side.close().await;
    }
}
