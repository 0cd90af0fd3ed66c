//! The conformance suite on RabbitMQ. `MQRPC_AMQP_URL` names the broker (default
//! `amqp://guest:guest@127.0.0.1:5672/?topic_ttl=300`); every transport is a connection of its own.

use crate::skips::broker_unavailable;
use crate::suite::Backend;

pub(crate) fn url() -> String {
    std::env::var("MQRPC_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/".to_owned())
}

/// The suite's URL: test topics are unique, so their queues expire (`topic_ttl`)
/// instead of piling up on the shared broker.
pub(crate) fn suite_url() -> String {
    let base = url();
    let separator = if base.contains('?') { '&' } else { '?' };
    format!("{base}{separator}topic_ttl=300")
}

pub async fn backend() -> Option<Backend> {
    let url = suite_url();
    if let Err(err) = mqrpc::connect(&url).await {
        return broker_unavailable("amqp", &err);
    }
    Some(Backend::new("amqp", move || {
        let url = url.clone();
        async move {
            mqrpc::connect(&url)
                .await
                .expect("RabbitMQ answered a moment ago")
        }
    }))
}

conformance_suite!(backend);

mod faults {
    use std::time::{Duration, Instant};

    use mqrpc::{AmqpConfig, AmqpTransport, Client, Context, Server, Target};
    use serde_json::json;
    use std::sync::Arc;

    use crate::proxy::TcpProxy;
    use crate::service::{self, Recorder};

    /// A transport whose every connection passes through `proxy`.
    async fn through(proxy: &TcpProxy) -> AmqpTransport {
        let mut config = AmqpConfig::parse(&super::suite_url()).expect("AMQP URL");
        for host in &mut config.hosts {
            host.host = "127.0.0.1".to_owned();
            host.port = proxy.port();
        }
        config.heartbeat = 5;
        config.max_backoff = Duration::from_millis(500);
        AmqpTransport::with_config(config)
            .await
            .expect("connect through proxy")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn amqp_calls_succeed_again_after_connections_are_cut() {
        let Some(_) = super::backend().await else {
            return;
        };
        let config = AmqpConfig::parse(&super::url()).expect("AMQP URL");
        let upstream = format!("{}:{}", config.hosts[0].host, config.hosts[0].port);
        let upstream = tokio::net::lookup_host(upstream)
            .await
            .expect("resolve broker")
            .next()
            .expect("an address");
        let proxy = TcpProxy::start(upstream).await;

        let topic = format!("reconnect_{}", &mqrpc::wire::new_id()[..12]);
        let recorder = Recorder::new();
        let server_side = through(&proxy).await;
        let client_side = through(&proxy).await;
        let server = Server::builder(
            Arc::new(server_side.clone()),
            Target::new(&topic).server("s1"),
        )
        .endpoint(service::endpoint("s1", &recorder))
        .start()
        .await
        .expect("server");
        let client = Client::new(Arc::new(client_side.clone()), Target::new(&topic))
            .timeout(Duration::from_secs(3));
        let ctx = Context::new();
        let sum: i64 = client
            .call(&ctx, "add", json!({"a": 1, "b": 2}))
            .await
            .expect("before the cut");
        assert_eq!(sum, 3);

        // A call in flight when the connections go must end by its deadline either way.
        let in_flight = {
            let client = client.clone().timeout(Duration::from_secs(6));
            tokio::spawn(async move {
                let started = Instant::now();
                let result = client
                    .call::<_, f64>(&Context::new(), "sleep", json!({"seconds": 1.0}))
                    .await;
                (result, started.elapsed())
            })
        };
        tokio::time::timeout(Duration::from_secs(10), recorder.started.notified())
            .await
            .expect("handler started");
        let cut_at = Instant::now();
        proxy.cut();

        let (result, waited) = in_flight.await.expect("in-flight task");
        assert!(
            waited < Duration::from_secs(6) + Duration::from_secs(1),
            "in-flight call hung: {waited:?}"
        );
        eprintln!("amqp in-flight call across the cut: {result:?} after {waited:?}");

        crate::suite::calls_work_again(&client, cut_at, "amqp", 20).await;
        client
            .cast(&ctx, "record", json!({"id": 2}))
            .await
            .expect("cast");
        recorder.wait_for(2, Duration::from_secs(20)).await;
        assert!(
            server_side.connections_opened() >= 2,
            "the server reconnected"
        );
        assert!(
            client_side.connections_opened() >= 2,
            "the client reconnected"
        );
        server.shutdown().await.expect("shutdown");
    }
}

/// Issue #7 on RabbitMQ: cuts, a black hole, latency, confirmed casts, load.
mod reliability {
    use std::sync::Arc;
    use std::time::Duration;

    use mqrpc::{AmqpConfig, AmqpTransport, Transport};

    use crate::faults::{self, Rig};

    async fn rig() -> Option<Rig> {
        super::backend().await?;
        let config = AmqpConfig::parse(&super::url()).expect("AMQP URL");
        let upstream = faults::upstream(&format!(
            "{}:{}",
            config.hosts[0].host, config.hosts[0].port
        ))
        .await;
        Some(
            Rig::new("amqp", upstream, |port| async move {
                let mut config = AmqpConfig::parse(&super::suite_url()).expect("AMQP URL");
                for host in &mut config.hosts {
                    host.host = "127.0.0.1".to_owned();
                    host.port = port;
                }
                config.heartbeat = 5;
                config.max_backoff = Duration::from_millis(500);
                let transport = AmqpTransport::with_config(config)
                    .await
                    .expect("connect through proxy");
                Arc::new(transport) as Arc<dyn Transport>
            })
            .await,
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn amqp_twenty_cuts_during_traffic() {
        let Some(rig) = rig().await else { return };
        faults::twenty_cuts(&rig).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn amqp_black_hole_times_out_naming_the_broker() {
        let Some(rig) = rig().await else { return };
        faults::black_hole(&rig).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn amqp_added_latency() {
        let Some(rig) = rig().await else { return };
        faults::added_latency(&rig).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn amqp_confirmed_casts_survive_cuts() {
        let Some(rig) = rig().await else { return };
        faults::confirmed_casts_survive_cuts(&rig, 300).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn amqp_rabbitmq_restart_is_survived() {
        let Some(mut broker) = faults::OwnBroker::rabbitmq().await else {
            return;
        };
        faults::broker_restart("amqp", &mut broker, |port| async move {
            let url = format!("amqp://guest:guest@127.0.0.1:{port}/?max_backoff=0.5");
            let mut config = AmqpConfig::parse(&url).expect("AMQP URL");
            config.heartbeat = 5;
            Arc::new(
                AmqpTransport::with_config(config)
                    .await
                    .expect("connect to the test's RabbitMQ"),
            ) as Arc<dyn Transport>
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn amqp_load_100k_calls_at_256() {
        let Some(backend) = super::backend().await else {
            return;
        };
        faults::load(&backend, 100_000, 256).await;
    }
}
