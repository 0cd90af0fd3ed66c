//! The conformance suite on NATS, twice: core NATS (at-most-once, "no responders"),
//! and JetStream mode (casts kept while no server runs and redelivered until acked).
//! `MQRPC_NATS_URL` names the server (default `nats://127.0.0.1:4222`).

use crate::skips::broker_unavailable;
use crate::suite::Backend;

pub(crate) fn base_url() -> String {
    std::env::var("MQRPC_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

pub(crate) fn with_options(options: &str) -> String {
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

/// Issue #22 on NATS (in a file of its own, run with the rest by `-- nats::`).
#[path = "nats_hardening.rs"]
mod hardening;

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

    use futures::StreamExt;
    use mqrpc::{AckMode, Client, Context, NatsConfig, NatsTransport, Server, Target};
    use serde_json::json;

    use crate::proxy::TcpProxy;
    use crate::service::{self, Recorder};

    /// Server `s1` of `topic` recording into `recorder`, and a client of the topic, each
    /// on a connection of its own to `url`.
    pub(super) async fn server_and_client(
        url: &str,
        topic: &str,
        recorder: &Arc<Recorder>,
        ack_mode: AckMode,
    ) -> (Server, Client) {
        let server = Server::builder(
            Arc::new(NatsTransport::connect(url).await.expect("server")),
            Target::new(topic).server("s1"),
        )
        .endpoint(service::endpoint("s1", recorder))
        .ack_mode(ack_mode)
        .start()
        .await
        .expect("server");
        let client = Client::new(
            Arc::new(NatsTransport::connect(url).await.expect("client")),
            Target::new(topic),
        );
        (server, client)
    }

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
        let (server, client) = server_and_client(&url, &topic, &recorder, AckMode::default()).await;
        let client = client.timeout(Duration::from_secs(3));
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

    /// A client whose URL sets a smaller `max_message_size` than its server's drops a
    /// reply above it unparsed: the call times out, and the next one works.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reply_above_the_clients_limit_is_dropped_unread() {
        let Some(_) = super::core::backend().await else {
            return;
        };
        let topic = format!("reply_limit_{}", &mqrpc::wire::new_id()[..12]);
        #[derive(serde::Deserialize)]
        struct Repeat {
            text: String,
            times: usize,
        }
        let server = Server::builder(
            Arc::new(
                NatsTransport::connect(&super::with_options("prefix=mqrpc-test"))
                    .await
                    .expect("server"),
            ),
            Target::new(&topic).server("s1"),
        )
        .endpoint(mqrpc::Endpoint::new().method(
            "repeat",
            |_ctx: Context, args: Repeat| async move {
                Ok::<_, mqrpc::RemoteError>(args.text.repeat(args.times))
            },
        ))
        .start()
        .await
        .expect("server");
        let small = NatsTransport::connect(&super::with_options(
            "prefix=mqrpc-test&max_message_size=2048",
        ))
        .await
        .expect("client");
        assert_eq!(small.max_message_size(), 2048);
        let client =
            Client::new(Arc::new(small), Target::new(&topic)).timeout(Duration::from_secs(2));
        let ctx = Context::new();
        // The request is small, its reply is not.
        let err = client
            .call::<_, String>(&ctx, "repeat", json!({"text": "y", "times": 4096}))
            .await
            .expect_err("the reply is above the limit");
        assert!(matches!(err, mqrpc::Error::Timeout { .. }), "{err:?}");
        let text: String = client
            .call(&ctx, "repeat", json!({"text": "y", "times": 100}))
            .await
            .expect("a small reply still arrives");
        assert_eq!(text.len(), 100);
        server.shutdown().await.expect("shutdown");
    }

    /// A JetStream consumer deleted under a running server (by an operator, or by the
    /// NATS server's inactivity threshold) is created again, and casts flow on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jetstream_server_creates_a_deleted_consumer_again() {
        let Some(_) = super::jetstream::backend().await else {
            return;
        };
        let url = super::with_options("prefix=mqrpc-test-js&jetstream=true&ack_wait=2&max_age=600");
        let config = NatsConfig::parse(&url).expect("NATS URL");
        let topic = format!("recreate_{}", &mqrpc::wire::new_id()[..12]);
        let recorder = Recorder::new();
        let (server, client) =
            server_and_client(&url, &topic, &recorder, AckMode::AfterHandling).await;
        let ctx = Context::new();
        client
            .cast(&ctx, "record", json!({"id": 1}))
            .await
            .expect("first cast");
        recorder.wait_for(1, Duration::from_secs(20)).await;

        // Delete the topic's durable consumer behind the server's back.
        let subject = config
            .jetstream_subject(&mqrpc::transport::Address::Topic {
                exchange: config.exchange.clone(),
                topic: topic.clone(),
            })
            .expect("a JetStream subject");
        let nats = async_nats::connect(config.servers[0].as_str())
            .await
            .expect("a plain NATS connection");
        let js = async_nats::jetstream::new(nats);
        let stream = js
            .get_stream(config.jetstream_stream(&config.exchange))
            .await
            .expect("the exchange's stream");
        let mut names = stream.consumer_names();
        let mut deleted = 0;
        while let Some(name) = names.next().await {
            let name = name.expect("a consumer name");
            // Other tests share the stream: a consumer of theirs may go between the
            // listing and this look-up.
            let info = match stream.consumer_info(&name).await {
                Ok(info) => info,
                Err(err)
                    if err.kind()
                        == async_nats::jetstream::context::ConsumerInfoErrorKind::NotFound =>
                {
                    continue;
                }
                Err(err) => panic!("consumer info of {name}: {err}"),
            };
            if info.config.filter_subject == subject {
                stream.delete_consumer(&name).await.expect("delete");
                deleted += 1;
            }
        }
        assert_eq!(deleted, 1, "the topic has one durable consumer");

        client
            .cast(&ctx, "record", json!({"id": 2}))
            .await
            .expect("a cast after the deletion");
        recorder.wait_for(2, Duration::from_secs(30)).await;
        let ids = recorder.settled_ids(Duration::from_millis(200)).await;
        assert!(
            ids.contains(&2),
            "the cast after the deletion was handled: {ids:?}"
        );
        server.shutdown().await.expect("shutdown");
    }

    /// A JetStream URL with a prefix of its own (so a stream of its own on the shared
    /// NATS), its config, and the JetStream API of a plain connection.
    async fn own_stream(what: &str) -> (String, NatsConfig, async_nats::jetstream::Context) {
        let prefix = format!("mqrpc-test-{what}-{}", &mqrpc::wire::new_id()[..10]);
        let url = super::with_options(&format!("prefix={prefix}&jetstream=true&max_age=600"));
        let config = NatsConfig::parse(&url).expect("NATS URL");
        let nats = async_nats::connect(config.servers[0].as_str())
            .await
            .expect("a plain NATS connection");
        (url, config, async_nats::jetstream::new(nats))
    }

    /// Casts stored in the stream `name` (no server takes them here).
    async fn stored(js: &async_nats::jetstream::Context, name: &str) -> u64 {
        let mut stream = js.get_stream(name).await.expect("the stream");
        stream.info().await.expect("stream info").state.messages
    }

    /// Many first casts at once from one client, before any stream exists: one stream
    /// is made, and every cast is stored.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jetstream_concurrent_first_casts_make_one_stream_and_are_all_stored() {
        let Some(_) = super::jetstream::backend().await else {
            return;
        };
        let (url, config, js) = own_stream("jsfirst").await;
        let client = Client::new(
            Arc::new(NatsTransport::connect(&url).await.expect("client")),
            Target::new("first"),
        )
        .timeout(Duration::from_secs(10));
        let ctx = Context::new();
        let casts = (0..24).map(|id| client.cast(&ctx, "record", json!({"id": id})));
        let results = futures::future::join_all(casts).await;
        let failed: Vec<String> = results
            .iter()
            .filter_map(|r| r.as_ref().err().map(ToString::to_string))
            .collect();
        assert!(failed.is_empty(), "first casts failed: {failed:?}");
        let name = config.jetstream_stream(&config.exchange);
        let names: serde_json::Value = js
            .request(
                "STREAM.NAMES",
                &json!({ "subject": format!("{}.>", config.prefix) }),
            )
            .await
            .expect("stream names");
        assert_eq!(names["streams"], json!([name]), "one stream: {names}");
        assert_eq!(stored(&js, &name).await, 24, "every cast stored");
        js.delete_stream(&name).await.expect("clean up");
    }

    /// `replicas=3` on a single server: creating the stream is refused (`Refused`,
    /// not retried); an existing R1 stream is used as it is, the raise the server
    /// refuses only logged.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jetstream_replicas_a_single_server_cannot_have() {
        let Some(_) = super::jetstream::backend().await else {
            return;
        };
        let (url, config, js) = own_stream("jsr3").await;
        let name = config.jetstream_stream(&config.exchange);
        let r3 = Client::new(
            Arc::new(
                NatsTransport::connect(&format!("{url}&replicas=3"))
                    .await
                    .expect("client"),
            ),
            Target::new("r3"),
        )
        .timeout(Duration::from_secs(10));
        let err = r3
            .cast(&Context::new(), "record", json!({"id": 1}))
            .await
            .expect_err("no 3 replicas on one server");
        eprintln!("{err}");
        assert_eq!(
            err.kind(),
            mqrpc::ErrorKind::Transport(mqrpc::TransportErrorKind::Refused),
            "{err:?}"
        );
        let client = Client::new(
            Arc::new(NatsTransport::connect(&url).await.expect("client")),
            Target::new("r3"),
        );
        client
            .cast(&Context::new(), "record", json!({"id": 2}))
            .await
            .expect("R1 made");
        let recorder = Recorder::new();
        let server = Server::builder(
            Arc::new(
                NatsTransport::connect(&format!("{url}&replicas=3"))
                    .await
                    .expect("server"),
            ),
            Target::new("r3").server("s1"),
        )
        .endpoint(service::endpoint("s1", &recorder))
        .start()
        .await
        .expect("the server listens on the R1 stream");
        recorder.wait_for(1, Duration::from_secs(20)).await;
        server.shutdown().await.expect("shutdown");
        js.delete_stream(&name).await.expect("clean up");
    }

    /// A stream deleted under a running client (by an operator) is made again by the
    /// client's casts: at most one cast fails meanwhile (saying the stream has no
    /// leader), and the next ones are stored.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jetstream_client_makes_a_deleted_stream_again() {
        let Some(_) = super::jetstream::backend().await else {
            return;
        };
        let (url, config, js) = own_stream("jsdeleted").await;
        let client = Client::new(
            Arc::new(NatsTransport::connect(&url).await.expect("client")),
            Target::new("deleted"),
        )
        .timeout(Duration::from_secs(10));
        let ctx = Context::new();
        client
            .cast(&ctx, "record", json!({"id": 1}))
            .await
            .expect("the first cast makes the stream");
        let name = config.jetstream_stream(&config.exchange);
        js.delete_stream(&name)
            .await
            .expect("an operator deletes it");
        let mut failures = Vec::new();
        let mut ok = 0;
        for id in 2..6 {
            match client.cast(&ctx, "record", json!({"id": id})).await {
                Ok(()) => ok += 1,
                Err(err) => failures.push(err.to_string()),
            }
        }
        eprintln!("casts after the deletion: {ok} stored, failed: {failures:?}");
        assert!(failures.len() <= 1, "casts keep failing: {failures:?}");
        assert_eq!(stored(&js, &name).await, ok, "the stream is back with them");
        js.delete_stream(&name).await.expect("clean up");
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
    async fn nats_health_is_reconnecting_while_cut_off_then_consuming() {
        let Some(rig) = rig("nats", "prefix=mqrpc-test").await else {
            return;
        };
        faults::health_follows_a_cut(&rig).await;
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

    /// JetStream mode across a restart of a nats-server of the test's own, with file
    /// storage: casts sent after the restart are delivered again without restarting
    /// mqrpc's server (its pulls and durable consumers come back by themselves).
    /// `jetstream=true` against a nats-server without JetStream: a cast fails at
    /// once, `Refused` (not retried), saying JetStream is not enabled.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nats_jetstream_not_enabled_is_refused_saying_so() {
        use std::time::{Duration, Instant};

        use mqrpc::{Client, Context, NatsTransport, Target};

        let Some(broker) = OwnBroker::start("nats-server", |port| {
            ["-a", "127.0.0.1", "-p", &port.to_string()]
                .map(str::to_owned)
                .to_vec()
        })
        .await
        else {
            return;
        };
        let url = format!("nats://127.0.0.1:{}?jetstream=true", broker.port);
        let client = Client::new(
            Arc::new(NatsTransport::connect(&url).await.expect("connect")),
            Target::new("nojs"),
        )
        .timeout(Duration::from_secs(10));
        let started = Instant::now();
        let err = client
            .cast(&Context::new(), "record", serde_json::json!({}))
            .await
            .expect_err("no JetStream to store the cast");
        let took = started.elapsed();
        let text = err.to_string();
        eprintln!("after {took:?}: {text}");
        assert!(text.contains("JetStream is not enabled"), "{text}");
        assert_eq!(
            err.kind(),
            mqrpc::ErrorKind::Transport(mqrpc::TransportErrorKind::Refused),
            "{err:?}"
        );
        assert!(!err.is_retryable(), "{err:?}");
    }

    /// Notifications always go through JetStream, core mode too: without JetStream
    /// on the server, a notifier's send and a listener's start fail at once,
    /// `Refused`, saying notifications need it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nats_notifications_without_jetstream_are_refused_saying_so() {
        use mqrpc::notify::{NotificationEndpoint, NotificationListener, Notifier};
        use mqrpc::{Context, NatsTransport, Target};

        let Some(broker) = OwnBroker::start("nats-server", |port| {
            ["-a", "127.0.0.1", "-p", &port.to_string()]
                .map(str::to_owned)
                .to_vec()
        })
        .await
        else {
            return;
        };
        let url = format!("nats://127.0.0.1:{}", broker.port);
        let transport: Arc<dyn mqrpc::Transport> =
            Arc::new(NatsTransport::connect(&url).await.expect("connect"));
        let refused = |err: mqrpc::Error| {
            let text = err.to_string();
            assert!(text.contains("notifications need JetStream"), "{text}");
            assert!(
                !text.contains("jetstream=true"),
                "no way out for them: {text}"
            );
            assert_eq!(
                err.kind(),
                mqrpc::ErrorKind::Transport(mqrpc::TransportErrorKind::Refused),
                "{err:?}"
            );
        };
        let err = Notifier::new(transport.clone(), "compute.host1")
            .topics(["nojs"])
            .info(&Context::new(), "x", serde_json::json!(1))
            .await
            .expect_err("no JetStream to keep the notification");
        refused(err);
        let err = NotificationListener::builder(transport, [Target::new("nojs")])
            .endpoint(
                NotificationEndpoint::new()
                    .on_every(|_| async { mqrpc::notify::NotificationResult::Handled }),
            )
            .start()
            .await
            .expect_err("no JetStream to listen through");
        refused(err);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nats_jetstream_casts_flow_again_after_a_broker_restart() {
        use std::time::{Duration, Instant};

        use mqrpc::{AckMode, Context};
        use serde_json::json;

        use crate::service::Recorder;

        let dir = std::env::temp_dir().join(format!("mqrpc-js-{}", mqrpc::wire::new_id()));
        let store = dir.display().to_string();
        let Some(mut broker) = OwnBroker::start("nats-server", |port| {
            [
                "-a",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-js",
                "-sd",
                &store,
            ]
            .map(str::to_owned)
            .to_vec()
        })
        .await
        else {
            return;
        };
        broker.owns_dir(dir);
        let url = format!(
            "nats://127.0.0.1:{}?prefix=mqrpc-restart-js&jetstream=true&ack_wait=2",
            broker.port
        );
        let topic = format!("js_restart_{}", &mqrpc::wire::new_id()[..12]);
        let recorder = Recorder::new();
        let (server, client) =
            super::faults::server_and_client(&url, &topic, &recorder, AckMode::AfterHandling).await;
        let client = client.timeout(Duration::from_secs(2));
        let ctx = Context::new();
        client
            .cast(&ctx, "record", json!({"id": 1}))
            .await
            .expect("a cast before the restart");
        recorder.wait_for(1, Duration::from_secs(20)).await;

        broker.kill().await;
        broker.restart().await;
        let restarted = Instant::now();
        // The first cast JetStream stores after the restart; until the client is
        // connected again a cast fails (it is not confirmed) and is sent again.
        let mut id = 2;
        loop {
            match client.cast(&ctx, "record", json!({"id": id})).await {
                Ok(()) => break,
                Err(err) => {
                    assert!(
                        restarted.elapsed() < Duration::from_secs(30),
                        "no cast accepted 30 s after the restart: {err}"
                    );
                    id += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        // Casts that failed during the restart may arrive too (unconfirmed is not
        // undelivered): wait record by record until the confirmed one is there.
        let mut ids = recorder.settled_ids(Duration::ZERO).await;
        while !ids.contains(&id) {
            // Fails the test after 30 s without a new record.
            recorder
                .wait_for(ids.len() + 1, Duration::from_secs(30))
                .await;
            ids = recorder.settled_ids(Duration::ZERO).await;
        }
        crate::faults::figures(format!(
            "FIGURES nats-jetstream broker_restart cast_delivered_after_ms={}",
            restarted.elapsed().as_millis()
        ));
        server.shutdown().await.expect("shutdown");
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

/// Call requests are handed to async-nats in batches (see `batch.rs`): requests whose
/// calls returned before they were handed over leave, in order, also when sent from a
/// thread of no runtime, and a cast does not overtake a request gathered before it.
mod batching {
    use std::sync::Arc;
    use std::task::Poll;
    use std::time::Duration;

    use mqrpc::transport::{Address, CallHint, Consumer, ListenOptions, Outgoing};
    use mqrpc::{Target, Transport};

    /// A transport, a server's consumer of a fresh topic, its address, and a reply
    /// queue's address to name in requests.
    async fn rig() -> Option<(Arc<dyn Transport>, Box<dyn Consumer>, Address, Arc<str>)> {
        super::core::backend().await?;
        let transport = mqrpc::connect(&super::base_url()).await.expect("connect");
        let topic = format!("batching_{}", &mqrpc::wire::new_id()[..12]);
        let consumer = (transport.listen(&Target::new(&topic).server("s"), &ListenOptions::new(8)))
            .await
            .expect("listen");
        let address = Address::Topic {
            exchange: transport.default_exchange().to_owned(),
            topic,
        };
        let reply_to = transport.reply_queue().await.expect("reply queue").address;
        Some((transport, consumer, address, reply_to.into()))
    }

    fn call(body: &'static str, reply_to: &Arc<str>) -> Outgoing {
        Outgoing {
            call: Some(CallHint {
                reply_to: reply_to.clone(),
                msg_id: mqrpc::wire::new_id().into(),
            }),
            ..Outgoing::new(body)
        }
    }

    /// The next `n` bodies the consumer receives.
    async fn received(consumer: &mut Box<dyn Consumer>, n: usize) -> Vec<String> {
        let mut bodies = Vec::new();
        while bodies.len() < n {
            let next = tokio::time::timeout(Duration::from_secs(5), consumer.recv()).await;
            let delivery = next
                .expect("a message within 5 s")
                .expect("open")
                .expect("ok");
            bodies.push(String::from_utf8_lossy(delivery.body()).into_owned());
        }
        bodies
    }

    #[tokio::test]
    async fn requests_whose_calls_returned_at_once_leave_in_order() {
        let Some((transport, mut consumer, address, reply_to)) = rig().await else {
            return;
        };
        let publisher = transport.publisher().await.expect("publisher");
        // A new client starts as if under load: the first request's batch is handed
        // over by a task, and every send returns before the task has run.
        for body in ["a", "b", "c"] {
            let mut send = Box::pin(publisher.send(&address, call(body, &reply_to)));
            assert!(matches!(futures::poll!(&mut send), Poll::Ready(Ok(()))));
        }
        assert_eq!(received(&mut consumer, 3).await, ["a", "b", "c"]);
    }

    #[tokio::test]
    async fn a_call_sent_off_the_runtime_leaves() {
        let Some((transport, mut consumer, address, reply_to)) = rig().await else {
            return;
        };
        let publisher = transport.publisher().await.expect("publisher");
        // From a thread of no runtime: the hand-over runs on the publisher's.
        std::thread::scope(|scope| {
            scope.spawn(|| {
                futures::executor::block_on(publisher.send(&address, call("a", &reply_to)))
                    .expect("a");
            });
        });
        (publisher.send(&address, call("b", &reply_to)))
            .await
            .expect("b");
        assert_eq!(received(&mut consumer, 2).await, ["a", "b"]);
    }

    #[tokio::test]
    async fn a_cast_does_not_overtake_a_gathered_request() {
        let Some((transport, mut consumer, address, reply_to)) = rig().await else {
            return;
        };
        let publisher = transport.publisher().await.expect("publisher");
        // `a` returns with its request gathered for a task that has not run yet.
        (publisher.send(&address, call("a", &reply_to)))
            .await
            .expect("a");
        (publisher.send(&address, Outgoing::new("c")))
            .await
            .expect("cast");
        assert_eq!(received(&mut consumer, 2).await, ["a", "c"]);
    }
}
