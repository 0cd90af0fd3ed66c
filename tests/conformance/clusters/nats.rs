//! mqrpc on a 3-node NATS cluster with JetStream (`scripts/cluster-nats.sh`): the
//! generic suite with server and client on different nodes, core and JetStream
//! (`replicas=3`), and node kills judged by counts.

use super::Cluster;

/// The cluster, when it is up (see [`Cluster::get`]).
fn cluster() -> Option<Cluster> {
    Cluster::get("nats")
}

/// Every node's address in one URL, `first` first (async-nats shuffles them anyway).
fn all_nodes(cluster: &Cluster) -> String {
    cluster.nodes.join(",")
}

pub mod suite_core {
    pub async fn backend() -> Option<crate::suite::Backend> {
        let cluster = super::cluster()?;
        Some(cluster.rotating_backend("nats-cluster", |_, node| {
            format!("nats://{node}?prefix=mqrpc-cluster")
        }))
    }

    conformance_suite!(backend);
}

pub mod suite_jetstream {
    pub async fn backend() -> Option<crate::suite::Backend> {
        let cluster = super::cluster()?;
        Some(cluster.rotating_backend("nats-cluster-jetstream", |_, node| {
            format!(
                "nats://{node}?prefix=mqrpc-cluster-js&jetstream=true&replicas=3&ack_wait=2&max_age=600"
            )
        }))
    }

    conformance_suite!(backend);
}

pub mod faults {
    use std::collections::{BTreeMap, HashSet};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use mqrpc::{Client, Context, NatsTransport, Server, Target};
    use serde_json::json;

    use super::{Cluster, all_nodes};
    use crate::service::{self, Recorder};

    /// A fresh name, so each run has topics and streams of its own.
    fn unique(what: &str) -> String {
        format!("{what}_{}", &mqrpc::wire::new_id()[..10])
    }

    /// Server `s1` of `topic` on a connection to `url`, recording into `recorder`.
    async fn server(url: &str, topic: &str, recorder: &Arc<Recorder>) -> Server {
        Server::builder(
            Arc::new(NatsTransport::connect(url).await.expect("server connects")),
            Target::new(topic).server("s1"),
        )
        .endpoint(service::endpoint("s1", recorder))
        .start()
        .await
        .expect("server starts")
    }

    /// Stream `name` as the JetStream API of the cluster reports it, once it has a
    /// leader (within 20 s in all, connecting included).
    async fn stream_info(cluster: &Cluster, name: &str) -> async_nats::jetstream::stream::Info {
        const WITHIN: Duration = Duration::from_secs(20);
        let mut last = String::from("no answer");
        let asking = async {
            let client = async_nats::ConnectOptions::new()
                .connection_timeout(Duration::from_secs(2))
                .connect(
                    cluster
                        .nodes
                        .iter()
                        .map(|n| n.parse::<async_nats::ServerAddr>().expect("address"))
                        .collect::<Vec<_>>(),
                )
                .await
                .expect("async-nats connects");
            let js = async_nats::jetstream::ContextBuilder::new()
                .timeout(Duration::from_secs(2))
                .build(client);
            // The answer may lag an election or a just-made change.
            loop {
                match js.get_stream(name).await {
                    Ok(stream) => {
                        let info = stream.cached_info().clone();
                        if info.cluster.as_ref().is_some_and(|c| c.leader.is_some()) {
                            return info;
                        }
                        last = format!("no leader yet: {:?}", info.cluster);
                    }
                    Err(err) => last = err.to_string(),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        match tokio::time::timeout(WITHIN, asking).await {
            Ok(info) => info,
            Err(_) => panic!("stream {name} after {WITHIN:?}: {last}"),
        }
    }

    /// The node (1..3) leading stream `name`.
    async fn stream_leader(cluster: &Cluster, name: &str) -> usize {
        let info = stream_info(cluster, name).await;
        let leader = info.cluster.and_then(|c| c.leader).expect("a leader");
        cluster.ctl(&["node-of", &leader]).parse().expect("a node")
    }

    /// Ends a fault test: every node up again, whatever happened.
    struct Restart<'a> {
        cluster: &'a Cluster,
        killed: Vec<usize>,
    }

    impl Restart<'_> {
        fn kill(&mut self, node: usize) {
            self.cluster.ctl(&["kill", &node.to_string()]);
            self.killed.push(node);
        }

        fn start(&mut self, node: usize) {
            self.cluster.ctl(&["start", &node.to_string()]);
            self.killed.retain(|n| *n != node);
        }
    }

    impl Drop for Restart<'_> {
        fn drop(&mut self) {
            for node in std::mem::take(&mut self.killed) {
                // Best effort: a panic here would hide the test's own.
                let _ = std::process::Command::new("bash")
                    .arg(self.cluster.script())
                    .args(["start", &node.to_string()])
                    .status();
            }
        }
    }

    /// What one fault did to a stream of calls.
    #[derive(Debug, Default)]
    struct CallCounts {
        sent: usize,
        ok: usize,
        /// When (after the kill) and how each call failed.
        failed: Vec<(Duration, mqrpc::ErrorKind, String)>,
        /// From the kill to the first answered call after the last failure.
        recovered: Option<Duration>,
    }

    impl CallCounts {
        /// Calls refused at once because no server was subscribed (the server's
        /// connection moving to another node), and the others (lost, timed out).
        fn split(&self) -> (usize, Vec<&(Duration, mqrpc::ErrorKind, String)>) {
            let refused = self
                .failed
                .iter()
                .filter(|f| f.1 == mqrpc::ErrorKind::NoResponders)
                .count();
            let other = self
                .failed
                .iter()
                .filter(|f| f.1 != mqrpc::ErrorKind::NoResponders)
                .collect();
            (refused, other)
        }
    }

    /// Calls `add` one after another on `client` (each with its timeout): `before`
    /// answered calls, then `kill()`, then until `after` calls were answered since.
    async fn calls_across(
        client: &Client,
        before: usize,
        after: usize,
        kill: impl FnOnce(),
    ) -> CallCounts {
        let ctx = Context::new();
        let mut counts = CallCounts::default();
        let call = async |counts: &mut CallCounts, killed_at: Option<Instant>| {
            counts.sent += 1;
            let n = counts.sent as i64;
            match client
                .call::<_, i64>(&ctx, "add", json!({"a": n, "b": 1}))
                .await
            {
                Ok(sum) => {
                    assert_eq!(sum, n + 1);
                    counts.ok += 1;
                    true
                }
                Err(err) => {
                    let at = killed_at.map(|k| k.elapsed()).unwrap_or_default();
                    counts.failed.push((at, err.kind(), err.to_string()));
                    false
                }
            }
        };
        while counts.ok < before {
            call(&mut counts, None).await;
            assert!(
                counts.sent < before * 2,
                "calls fail before the kill: {counts:?}"
            );
        }
        let at = Instant::now();
        kill();
        let ok_before = counts.ok;
        while counts.ok < ok_before + after {
            if call(&mut counts, Some(at)).await {
                counts.recovered.get_or_insert(at.elapsed());
            } else {
                counts.recovered = None;
            }
            assert!(
                at.elapsed() < Duration::from_secs(60),
                "calls do not work again a minute after the kill: {counts:?}"
            );
        }
        counts
    }

    /// Core NATS: kill -9 the server's node during calls, then the client's node. At
    /// most one failed call per kill, and calls work again within 2 s.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn core_calls_survive_the_loss_of_the_servers_node_then_the_clients() {
        let Some(cluster) = super::cluster() else {
            return;
        };
        let mut nodes = Restart {
            cluster: &cluster,
            killed: Vec::new(),
        };
        let topic = unique("cl_core");
        let recorder = Recorder::new();
        // One node each in the URL, so which node to kill is known; the cluster's
        // gossip gives each the other nodes to fail over to.
        let server_node = 1;
        let client_node = 3;
        let url = |node: usize| format!("nats://{}?prefix=mqrpc-cluster", cluster.nodes[node - 1]);
        let server = server(&url(server_node), &topic, &recorder).await;
        let client = Client::new(
            Arc::new(
                NatsTransport::connect(&url(client_node))
                    .await
                    .expect("client"),
            ),
            Target::new(&topic),
        )
        .timeout(Duration::from_secs(1));

        let server_kill = calls_across(&client, 100, 150, || nodes.kill(server_node)).await;
        eprintln!("core, server's node n{server_node} killed: {server_kill:?}");
        nodes.start(server_node);
        // The server's connection moved to node 2 or 3, whichever: a server of its
        // own on node 1 again, so killing the client's node kills only the client's.
        server.shutdown().await.expect("shutdown");
        let server = self::server(&url(server_node), &topic, &recorder).await;
        let client_kill = calls_across(&client, 50, 150, || nodes.kill(client_node)).await;
        eprintln!("core, client's node n{client_node} killed: {client_kill:?}");
        nodes.start(client_node);

        let (server_refused, server_other) = server_kill.split();
        let (client_refused, client_other) = client_kill.split();
        crate::faults::figures(format!(
            "SUMMARY nats core: kill server's node: {} calls, {} failed ({server_refused} \
             refused at once with no responders, last {:?} after the kill; {} other), ok again \
             after {:?}; kill client's node: {} calls, {} failed ({client_refused} no responders, \
             last {:?} after the kill; {} other), ok again after {:?}",
            server_kill.sent,
            server_kill.failed.len(),
            server_kill.failed.last().map(|f| f.0),
            server_other.len(),
            server_kill.recovered,
            client_kill.sent,
            client_kill.failed.len(),
            client_kill.failed.last().map(|f| f.0),
            client_other.len(),
            client_kill.recovered,
        ));
        for (fault, counts, other) in [
            ("server's node", &server_kill, &server_other),
            ("client's node", &client_kill, &client_other),
        ] {
            // At most one failed call per kill: one lost in flight. A call sent
            // while the server's subscription moves to another node gets "no
            // responders" and is sent again (the client's resends span ~0.4 s), so
            // it is answered once the server has subscribed again.
            assert!(
                counts.failed.len() <= 1,
                "{fault}: more than one failed call ({} with no responders): {:?}",
                counts.failed.len() - other.len(),
                counts.failed
            );
            for failure in &counts.failed {
                assert!(
                    failure.0 < Duration::from_secs(2),
                    "{fault}: a call failed {:?} after the kill: {}",
                    failure.0,
                    failure.2
                );
            }
            let recovered = counts.recovered.expect("recovered");
            // 2 s in the issue, with room for a loaded machine: the counts above
            // are the point, the time is printed.
            assert!(
                recovered < Duration::from_secs(5),
                "{fault}: calls worked again only after {recovered:?}"
            );
        }
        server.shutdown().await.expect("shutdown");
    }

    /// JetStream with `replicas=3`: serving with the default `replicas` keeps the
    /// stream's 3 replicas (a server sets the stream up as it listens); killing the stream leader's node
    /// during casts loses no acknowledged cast, and casts fail only during the
    /// election. Duplicates executed are counted and printed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jetstream_r3_keeps_its_replicas_and_every_acknowledged_cast() {
        let Some(cluster) = super::cluster() else {
            return;
        };
        let mut nodes = Restart {
            cluster: &cluster,
            killed: Vec::new(),
        };
        let prefix = unique("mqrpc-cl-r3");
        let options = format!("prefix={prefix}&jetstream=true&ack_wait=5&max_age=600");
        let url = format!("nats://{}?{options}&replicas=3", all_nodes(&cluster));
        let plain_url = format!("nats://{}?{options}", all_nodes(&cluster));
        let topic = unique("cl_js");
        let recorder = Recorder::new();
        let server = server(&url, &topic, &recorder).await;
        let stream = mqrpc::NatsConfig::parse(&url)
            .expect("URL")
            .jetstream_stream("openstack");
        let info = stream_info(&cluster, &stream).await;
        assert_eq!(info.config.num_replicas, 3, "created with 3 replicas");

        // The regression: every JetStream connect used to scale the stream to 1. A
        // cast sets nothing up while the stream takes it: only a server can.
        for round in 1..=2 {
            let transport = Arc::new(NatsTransport::connect(&plain_url).await.expect("connect"));
            let other = Server::builder(transport, Target::new(unique("cl_js_other")).server("s2"))
                .endpoint(service::endpoint("s2", &Recorder::new()))
                .start()
                .await
                .expect("a server with the default replicas");
            other.shutdown().await.expect("shutdown");
            let replicas = stream_info(&cluster, &stream).await.config.num_replicas;
            eprintln!("after server {round} with the default replicas: {replicas} replicas");
            assert_eq!(replicas, 3, "server {round} changed the stream's replicas");
        }

        let client = Client::new(
            Arc::new(NatsTransport::connect(&url).await.expect("client")),
            Target::new(&topic),
        )
        .timeout(Duration::from_secs(5));
        let leader = stream_leader(&cluster, &stream).await;
        let ctx = Context::new();
        let mut acked = Vec::new();
        let mut failures: Vec<(Duration, String)> = Vec::new();
        let mut killed_at = None;
        // Casts acknowledged when the last one failed.
        let mut acked_at_fail = 0;
        let started = Instant::now();
        let mut id = 1000u64;
        // Casts before the kill, then on until 15 s after it with 100 acknowledged
        // since the last failure.
        loop {
            id += 1;
            match client.cast(&ctx, "record", json!({"id": id})).await {
                Ok(()) => acked.push(id),
                Err(err) => {
                    failures.push((started.elapsed(), err.to_string()));
                    acked_at_fail = acked.len();
                }
            }
            if killed_at.is_none() && acked.len() >= 300 {
                nodes.kill(leader);
                killed_at = Some(started.elapsed());
            }
            if let Some(at) = killed_at {
                let since = started.elapsed() - at;
                let last_fail = failures.last().map_or(at, |f| f.0);
                let ok_since_fail = acked.len() - acked_at_fail;
                if since > Duration::from_secs(15)
                    && started.elapsed() - last_fail > Duration::from_secs(1)
                    && ok_since_fail >= 100
                {
                    break;
                }
                assert!(since < Duration::from_secs(60), "casts never recovered");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let killed_at = killed_at.expect("killed");
        nodes.start(leader);
        let new_leader = stream_leader(&cluster, &stream).await;

        // Every acknowledged cast handled: wait for them (redeliveries come after
        // ack_wait), then a little more for duplicates to show.
        let wanted: HashSet<u64> = acked.iter().copied().collect();
        let deadline = Instant::now() + Duration::from_secs(60);
        let records = loop {
            let records = recorder.settled(Duration::from_millis(500)).await;
            let seen: HashSet<u64> = records.iter().map(|(_, id)| *id).collect();
            if wanted.is_subset(&seen) || Instant::now() > deadline {
                break recorder.settled(Duration::from_secs(7)).await;
            }
        };
        let per_id = Recorder::per_id(&records);
        let lost: Vec<u64> = acked
            .iter()
            .filter(|id| !per_id.contains_key(id))
            .copied()
            .collect();
        let duplicates: usize = per_id
            .iter()
            .filter(|(id, _)| **id > 1000)
            .map(|(_, n)| n.saturating_sub(1))
            .sum();
        let handled_unacked = per_id
            .keys()
            .filter(|id| **id > 1000 && !wanted.contains(id))
            .count();
        let first_fail = failures.first().map(|f| f.0.saturating_sub(killed_at));
        let last_fail = failures.last().map(|f| f.0.saturating_sub(killed_at));
        let mut reasons = BTreeMap::<String, usize>::new();
        for (_, err) in &failures {
            *reasons.entry(err.clone()).or_default() += 1;
        }
        eprintln!("failed casts by message: {reasons:#?}");
        crate::faults::figures(format!(
            "SUMMARY nats jetstream R3: leader n{leader} killed ({new_leader} leads after); \
             casts {} acknowledged, {} failed (from {first_fail:?} to {last_fail:?} after the kill), \
             {} acknowledged lost, {duplicates} duplicates executed, {handled_unacked} failed casts \
             handled anyway; replicas 3 after 2 servers with the default",
            acked.len(),
            failures.len(),
            lost.len(),
        ));
        assert!(lost.is_empty(), "acknowledged casts lost: {lost:?}");
        if let Some(last) = last_fail {
            // An election takes seconds; 20 s leaves room for a loaded machine (the
            // figure is printed above).
            assert!(
                last < Duration::from_secs(20),
                "casts failed {last:?} after the kill, past the election"
            );
        }
        server.shutdown().await.expect("shutdown");
    }

    /// A stream made with 1 replica (by a cast with the default `replicas`) is raised
    /// to 3 by a server asking for 3, and a setting an operator made that mqrpc does
    /// not own is kept through the update.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jetstream_replicas_are_raised_and_foreign_settings_kept() {
        let Some(cluster) = super::cluster() else {
            return;
        };
        let prefix = unique("mqrpc-cl-up");
        let topic = unique("cl_up");
        let url = format!(
            "nats://{}?prefix={prefix}&jetstream=true&max_age=600",
            all_nodes(&cluster)
        );
        Client::new(
            Arc::new(NatsTransport::connect(&url).await.expect("client")),
            Target::new(&topic),
        )
        .cast(&Context::new(), "record", json!({"id": 1}))
        .await
        .expect("the first cast creates the stream");
        let stream = mqrpc::NatsConfig::parse(&url)
            .expect("URL")
            .jetstream_stream("openstack");
        let info = stream_info(&cluster, &stream).await;
        assert_eq!(info.config.num_replicas, 1);
        // An operator's own setting.
        let client = async_nats::connect(cluster.nodes[0].as_str())
            .await
            .expect("async-nats connects");
        let js = async_nats::jetstream::new(client);
        let mut operator = info.config.clone();
        operator.max_messages = 123_456;
        operator.description = Some("set by hand".to_owned());
        js.update_stream(&operator)
            .await
            .expect("operator's update");

        let recorder = Recorder::new();
        let server = server(&format!("{url}&replicas=3"), &topic, &recorder).await;
        let info = stream_info(&cluster, &stream).await;
        eprintln!(
            "after a server with replicas=3: {} replicas, max_messages {}, description {:?}",
            info.config.num_replicas, info.config.max_messages, info.config.description
        );
        assert_eq!(info.config.num_replicas, 3, "raised");
        assert_eq!(
            info.config.max_messages, 123_456,
            "the operator's setting stays"
        );
        assert_eq!(info.config.description.as_deref(), Some("set by hand"));
        recorder.wait_for(1, Duration::from_secs(30)).await;
        server.shutdown().await.expect("shutdown");
    }

    /// A server asking for 3 replicas of an R1 stream while a node is down: whether
    /// the cluster refuses the raise, takes it, or does not answer in time, the
    /// server listens all the same, on the stream as it is (a failed update is
    /// logged), and casts are served.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jetstream_a_raise_with_a_node_down_still_serves() {
        let Some(cluster) = super::cluster() else {
            return;
        };
        let mut nodes = Restart {
            cluster: &cluster,
            killed: Vec::new(),
        };
        let prefix = unique("mqrpc-cl-raise");
        let topic = unique("cl_raise");
        let options = format!("prefix={prefix}&jetstream=true&max_age=600");
        let url = format!("nats://{}?{options}", all_nodes(&cluster));
        let client = Client::new(
            Arc::new(NatsTransport::connect(&url).await.expect("client")),
            Target::new(&topic),
        )
        .timeout(Duration::from_secs(10));
        client
            .cast(&Context::new(), "record", json!({"id": 1}))
            .await
            .expect("the first cast creates the stream");
        let stream = mqrpc::NatsConfig::parse(&url)
            .expect("URL")
            .jetstream_stream("openstack");
        let leader = stream_leader(&cluster, &stream).await;
        let down = leader % 3 + 1;
        nodes.kill(down);
        let alive: Vec<&str> = (1..=3)
            .filter(|n| *n != down)
            .map(|n| cluster.nodes[n - 1].as_str())
            .collect();
        let url = format!("nats://{}?{options}&replicas=3", alive.join(","));
        let recorder = Recorder::new();
        let started = Instant::now();
        let server = server(&url, &topic, &recorder).await;
        let listen_took = started.elapsed();
        recorder.wait_for(1, Duration::from_secs(30)).await;
        client
            .cast(&Context::new(), "record", json!({"id": 2}))
            .await
            .expect("a cast after the raise");
        recorder.wait_for(2, Duration::from_secs(30)).await;
        let replicas = stream_info(&cluster, &stream).await.config.num_replicas;
        crate::faults::figures(format!(
            "SUMMARY nats jetstream raise R1->R3 with n{down} down: the server listened after \
             {listen_took:?}, the stream has {replicas} replicas, casts served"
        ));
        server.shutdown().await.expect("shutdown");
        nodes.start(down);
    }

    /// JetStream, its stream offline (R1, its node killed): `connect` returns
    /// within the caller's deadline, and a cast fails within its deadline saying the
    /// stream has no leader.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jetstream_stream_offline_fails_casts_fast_with_the_cause() {
        let Some(cluster) = super::cluster() else {
            return;
        };
        let mut nodes = Restart {
            cluster: &cluster,
            killed: Vec::new(),
        };
        let prefix = unique("mqrpc-cl-r1");
        let topic = unique("cl_off");
        let url = format!(
            "nats://{}?prefix={prefix}&jetstream=true&max_age=600",
            all_nodes(&cluster)
        );
        let client = Client::new(
            Arc::new(NatsTransport::connect(&url).await.expect("client")),
            Target::new(&topic),
        );
        client
            .cast(&Context::new(), "record", json!({"id": 1}))
            .await
            .expect("the first cast creates the stream");
        let stream = mqrpc::NatsConfig::parse(&url)
            .expect("URL")
            .jetstream_stream("openstack");
        let leader = stream_leader(&cluster, &stream).await;
        let info = stream_info(&cluster, &stream).await;
        assert_eq!(info.config.num_replicas, 1);
        nodes.kill(leader);

        let deadline = Duration::from_secs(5);
        // A node the client may use: not the dead one.
        let alive: Vec<&str> = (1..=3)
            .filter(|n| *n != leader)
            .map(|n| cluster.nodes[n - 1].as_str())
            .collect();
        let url = format!(
            "nats://{}?prefix={prefix}&jetstream=true&max_age=600",
            alive.join(",")
        );
        let started = Instant::now();
        let connected = tokio::time::timeout(deadline, NatsTransport::connect(&url)).await;
        let connect_took = started.elapsed();
        let transport = connected
            .expect("connect returns within the caller's deadline")
            .expect("connect does not wait on the stream");
        let started = Instant::now();
        let cast = Client::new(Arc::new(transport), Target::new(&topic))
            .timeout(deadline)
            .cast(&Context::new(), "record", json!({"id": 2}))
            .await;
        let cast_took = started.elapsed();
        let err = cast.expect_err("a cast to an offline stream fails");
        let text = err.to_string();
        // The long-lived client fails the same way.
        let old = client
            .clone()
            .timeout(deadline)
            .cast(&Context::new(), "record", json!({"id": 3}))
            .await
            .expect_err("a cast to an offline stream fails")
            .to_string();
        crate::faults::figures(format!(
            "SUMMARY nats jetstream offline stream (R1, n{leader} killed): connect took \
             {connect_took:?}, a cast failed after {cast_took:?}: {text}"
        ));
        assert!(text.contains("no leader"), "the cause is said: {text}");
        assert!(old.contains("no leader"), "the cause is said: {old}");
        assert!(
            matches!(err.kind(), mqrpc::ErrorKind::Transport(_)),
            "not the caller's timeout: {err:?}"
        );
        nodes.start(leader);
        // Back with its node.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match client
                .clone()
                .timeout(Duration::from_secs(5))
                .cast(&Context::new(), "record", json!({"id": 4}))
                .await
            {
                Ok(()) => break,
                Err(err) if Instant::now() < deadline => {
                    eprintln!("cast after the restart: {err}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(err) => panic!("casts fail after the stream's node returned: {err}"),
            }
        }
    }
}
