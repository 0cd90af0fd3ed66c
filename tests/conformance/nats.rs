//! The conformance suite on NATS, twice: core NATS (at-most-once, "no responders"),
//! and JetStream mode (casts kept while no server runs and redelivered until acked).
//! `MQRPC_NATS_URL` names the server (default `nats://127.0.0.1:4222`).

use crate::suite::{Backend, broker_unavailable};

pub(crate) fn base_url() -> String {
    std::env::var("MQRPC_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

fn with_options(options: &str) -> String {
    let base = base_url();
    let separator = if base.contains('?') { '&' } else { '?' };
    format!("{base}{separator}{options}")
}

async fn backend_at(name: &'static str, url: String) -> Option<Backend> {
    if let Err(err) = mqrpc::connect(&url).await {
        return broker_unavailable(name, &err);
    }
    Some(Backend::new(name, move || {
        let url = url.clone();
        async move {
            mqrpc::connect(&url)
                .await
                .expect("NATS answered a moment ago")
        }
    }))
}

pub mod core {
    pub async fn backend() -> Option<crate::suite::Backend> {
        super::backend_at("nats", super::with_options("prefix=mqrpc-test")).await
    }

    conformance_suite!(backend);
}

pub mod jetstream {
    pub async fn backend() -> Option<crate::suite::Backend> {
        let url = super::with_options("prefix=mqrpc-test-js&jetstream=true&ack_wait=2&max_age=600");
        super::backend_at("nats-jetstream", url).await
    }

    conformance_suite!(backend);
}

mod faults {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use mqrpc::{Client, Context, NatsConfig, NatsTransport, Server, Target};
    use serde_json::json;

    use crate::proxy::TcpProxy;
    use crate::service::{self, Recorder};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nats_calls_succeed_again_after_the_connection_is_cut() {
        let Some(_) = super::core::backend().await else {
            return;
        };
        let config = NatsConfig::parse(&super::base_url()).expect("NATS URL");
        let upstream = config.servers[0]
            .split_once("://")
            .map(|(_, a)| a.to_owned())
            .expect("address");
        let upstream = tokio::net::lookup_host(upstream)
            .await
            .expect("resolve NATS")
            .next()
            .expect("an address");
        let proxy = TcpProxy::start(upstream).await;
        let url = format!("nats://127.0.0.1:{}?prefix=mqrpc-test", proxy.port());
        let topic = format!("reconnect_{}", &mqrpc::wire::new_id()[..12]);
        let recorder = Recorder::new();
        let server_side = NatsTransport::connect(&url)
            .await
            .expect("through the proxy");
        let server = Server::builder(Arc::new(server_side), Target::new(&topic).server("s1"))
            .endpoint(service::endpoint("s1", &recorder))
            .start()
            .await
            .expect("server");
        let client = Client::new(
            Arc::new(NatsTransport::connect(&url).await.expect("client")),
            Target::new(&topic),
        )
        .timeout(Duration::from_secs(3));
        let ctx = Context::new();
        let sum: i64 = client
            .call(&ctx, "add", json!({"a": 1, "b": 2}))
            .await
            .expect("before the cut");
        assert_eq!(sum, 3);

        let cut_at = Instant::now();
        proxy.cut();
        crate::suite::calls_work_again(&client, cut_at, "nats", 30).await;
        recorder.wait_for(1, Duration::from_secs(20)).await;
        server.shutdown().await.expect("shutdown");
    }
}

/// Issue #7 on NATS: cuts, a black hole, latency and load on core NATS, confirmed
/// casts in JetStream mode, and a restart of a nats-server the test owns.
mod reliability {
    use std::sync::Arc;

    use mqrpc::Transport;

    use crate::faults::{self, OwnBroker, Rig};

    async fn connect(url: String) -> Arc<dyn Transport> {
        mqrpc::connect(&url).await.expect("connect to NATS")
    }

    async fn rig(name: &'static str, options: &'static str) -> Option<Rig> {
        super::core::backend().await?;
        let upstream = faults::upstream(&faults::host_port(&super::base_url(), 4222)).await;
        Some(
            Rig::new(name, upstream, move |port| {
                connect(format!("nats://127.0.0.1:{port}?{options}"))
            })
            .await,
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nats_twenty_cuts_during_traffic() {
        let Some(rig) = rig("nats", "prefix=mqrpc-test").await else {
            return;
        };
        faults::twenty_cuts(&rig).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nats_black_hole_times_out_naming_the_broker() {
        let Some(rig) = rig("nats", "prefix=mqrpc-test").await else {
            return;
        };
        faults::black_hole(&rig).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nats_added_latency() {
        let Some(rig) = rig("nats", "prefix=mqrpc-test").await else {
            return;
        };
        faults::added_latency(&rig).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nats_jetstream_confirmed_casts_survive_cuts() {
        let options = "prefix=mqrpc-test-js&jetstream=true&ack_wait=2&max_age=600";
        let Some(rig) = rig("nats-jetstream", options).await else {
            return;
        };
        faults::confirmed_casts_survive_cuts(&rig, 300).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nats_load_100k_calls_at_256() {
        let Some(backend) = super::core::backend().await else {
            return;
        };
        faults::load(&backend, 100_000, 256).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nats_server_restart_is_survived() {
        let Some(mut broker) = OwnBroker::start("nats-server", |port| {
            ["-a", "127.0.0.1", "-p", &port.to_string()]
                .map(str::to_owned)
                .to_vec()
        })
        .await
        else {
            return;
        };
        faults::broker_restart("nats", &mut broker, |port| {
            connect(format!("nats://127.0.0.1:{port}?prefix=mqrpc-restart"))
        })
        .await;
    }
}
