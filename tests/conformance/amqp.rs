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

/// A notification listener whose connection is cut subscribes again and gets what
/// was sent meanwhile (kept in its queue).
mod notification_faults {
    use std::time::Duration;

    use mqrpc::notify::{NotificationEndpoint, NotificationListener, NotificationResult, Notifier};
    use mqrpc::{Context, Target};
    use serde_json::json;
    use std::sync::Arc;

    use crate::interop_notifications::Queues;
    use crate::proxy::TcpProxy;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn amqp_notification_listener_resubscribes_after_the_connection_is_cut() {
        let Some(_) = super::backend().await else {
            return;
        };
        let mut config = mqrpc::AmqpConfig::parse(&super::url()).expect("AMQP URL");
        let upstream = format!("{}:{}", config.hosts[0].host, config.hosts[0].port);
        let upstream = tokio::net::lookup_host(upstream)
            .await
            .expect("resolve broker")
            .next()
            .expect("an address");
        let proxy = TcpProxy::start(upstream).await;
        for host in &mut config.hosts {
            host.host = "127.0.0.1".to_owned();
            host.port = proxy.port();
        }
        config.heartbeat = 5;
        config.max_backoff = Duration::from_millis(500);
        let through = mqrpc::AmqpTransport::with_config(config)
            .await
            .expect("connect through proxy");

        let topic = format!("notify_cut_{}", &mqrpc::wire::new_id()[..12]);
        let _cleanup = Queues::of(&topic, &[]);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let endpoint = NotificationEndpoint::new().on_every(move |n| {
            let _ = tx.send(n.payload);
            async { NotificationResult::Handled }
        });
        let listener =
            NotificationListener::builder(Arc::new(through.clone()), [Target::new(&topic)])
                .endpoint(endpoint)
                .start()
                .await
                .expect("listener");
        let direct = mqrpc::connect(&super::url()).await.expect("RabbitMQ");
        let notifier = Notifier::new(direct, "compute.host1").topics([topic.as_str()]);
        let arrival = Duration::from_secs(30);
        notifier
            .info(&Context::new(), "before", json!(1))
            .await
            .expect("sent");
        let got = tokio::time::timeout(arrival, rx.recv())
            .await
            .expect("in time");
        assert_eq!(got, Some(json!(1)));

        proxy.cut();
        // Sent while the listener is away: its queue keeps it.
        notifier
            .info(&Context::new(), "during", json!(2))
            .await
            .expect("sent");
        // At least once: the first may come again, if the cut took its ack.
        loop {
            let got = tokio::time::timeout(arrival, rx.recv())
                .await
                .expect("after the cut");
            match got {
                Some(payload) if payload == json!(2) => break,
                Some(payload) => assert_eq!(payload, json!(1), "only the first again"),
                None => panic!("the listener stopped"),
            }
        }
        assert!(
            through.connections_opened() >= 2,
            "the listener reconnected"
        );
        listener.shutdown().await.expect("shutdown");
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
    async fn amqp_health_is_reconnecting_while_cut_off_then_consuming() {
        let Some(rig) = rig().await else { return };
        faults::health_follows_a_cut(&rig).await;
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

/// Issue #22 on RabbitMQ: replies only to reply queues, a byte budget for what a busy
/// server holds, a bounded connect, unroutable requests reported at once, and the
/// `expiration` of requests read as their time to live.
mod hardening {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use futures::StreamExt;
    use lapin::options::{BasicGetOptions, BasicPublishOptions, QueueDeclareOptions};
    use lapin::types::{AMQPValue, FieldTable};
    use lapin::{BasicProperties, Channel};
    use mqrpc::transport::ListenOptions;
    use mqrpc::{
        AckMode, Client, Context, Endpoint, Error, ErrorKind, RemoteError, Server, Target,
        TransportErrorKind,
    };
    use serde::Deserialize;
    use serde_json::{Value, json};

    use crate::service::{self, Recorder};
    use crate::spy::BudgetSpy;

    fn topic(case: &str) -> String {
        format!("{case}_{}", &mqrpc::wire::new_id()[..12])
    }

    /// A raw lapin channel on the suite's broker (lapin reads an empty path as the
    /// vhost "", where mqrpc reads `/`).
    pub(super) async fn raw_channel() -> (lapin::Connection, Channel) {
        let base = super::url();
        let url = match base.strip_suffix('/') {
            Some(host) if !host.ends_with('/') => format!("{host}/%2f"),
            _ => base,
        };
        let connection = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
            .await
            .expect("RabbitMQ");
        let channel = connection.create_channel().await.expect("a channel");
        (connection, channel)
    }

    /// Declares a plain queue of another "service" that expires a minute after use.
    async fn declare_victim(channel: &Channel, name: &str) {
        let mut arguments = FieldTable::default();
        arguments.insert("x-expires".into(), AMQPValue::LongLongInt(60_000));
        channel
            .queue_declare(name.into(), QueueDeclareOptions::default(), arguments)
            .await
            .expect("victim queue");
    }

    /// How many messages wait in `queue`.
    pub(super) async fn waiting(channel: &Channel, queue: &str) -> u32 {
        channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("queue exists")
            .message_count()
    }

    /// An oslo.messaging request as a forger would write it, with its own `_reply_q`.
    fn raw_request(method: &str, args: Value, reply_q: &str) -> Vec<u8> {
        let message = json!({
            "method": method,
            "args": args,
            "_msg_id": mqrpc::wire::new_id(),
            "_reply_q": reply_q,
            "_unique_id": mqrpc::wire::new_id(),
        });
        serde_json::to_vec(&json!({
            "oslo.version": "2.0",
            "oslo.message": message.to_string(),
        }))
        .expect("json")
    }

    /// An oslo.messaging cast.
    fn raw_cast(method: &str, args: Value) -> Vec<u8> {
        let message = json!({
            "method": method,
            "args": args,
            "_unique_id": mqrpc::wire::new_id(),
        });
        serde_json::to_vec(&json!({
            "oslo.version": "2.0",
            "oslo.message": message.to_string(),
        }))
        .expect("json")
    }

    async fn publish_raw(channel: &Channel, routing_key: &str, body: &[u8], ttl: Option<&str>) {
        let mut properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_content_encoding("utf-8".into());
        if let Some(ttl) = ttl {
            properties = properties.with_expiration(ttl.into());
        }
        channel
            .basic_publish(
                mqrpc::DEFAULT_EXCHANGE.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
    }

    async fn start_server(url: &str, topic: &str, recorder: &Arc<Recorder>) -> Server {
        let transport = mqrpc::connect(url).await.expect("RabbitMQ");
        Server::builder(transport, Target::new(topic).server("s1"))
            .endpoint(service::endpoint("s1", recorder))
            .start()
            .await
            .expect("server")
    }

    /// A request whose `_reply_q` names another service's queue gets no reply there,
    /// and the server keeps serving; `allow_reply_queues` lets a peer's own names
    /// through.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn amqp_replies_go_only_to_reply_queue_names() {
        let Some(_) = super::backend().await else {
            return;
        };
        let (_connection, channel) = raw_channel().await;
        let victim = topic("victim");
        declare_victim(&channel, &victim).await;

        let topic_name = topic("confined");
        let recorder = Recorder::new();
        let server = start_server(&super::suite_url(), &topic_name, &recorder).await;
        for reply_q in [
            victim.clone(),
            // The shape, but not lowercase hex.
            format!("reply_{}", mqrpc::wire::new_id().to_uppercase()),
            format!("{victim}\nforged log line"),
        ] {
            let body = raw_request("record", json!({"id": 7}), &reply_q);
            publish_raw(&channel, &topic_name, &body, None).await;
        }
        recorder.wait_for(3, Duration::from_secs(20)).await;
        // Still serving, and its own replies still arrive.
        let client = Client::new(
            mqrpc::connect(&super::suite_url()).await.expect("RabbitMQ"),
            Target::new(&topic_name),
        )
        .timeout(Duration::from_secs(20));
        let sum: i64 = client
            .call(&Context::new(), "add", json!({"a": 2, "b": 3}))
            .await
            .expect("the server keeps serving");
        assert_eq!(sum, 5);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            waiting(&channel, &victim).await,
            0,
            "a reply reached {victim}"
        );
        server.shutdown().await.expect("shutdown");

        // With the option, the name is a reply queue like any other.
        let joiner = if super::suite_url().contains('?') {
            '&'
        } else {
            '?'
        };
        let allowing = format!(
            "{}{joiner}allow_reply_queues=nothing_else,{victim}",
            super::suite_url()
        );
        let server = start_server(&allowing, &topic_name, &recorder).await;
        let body = raw_request("add", json!({"a": 20, "b": 22}), &victim);
        publish_raw(&channel, &topic_name, &body, None).await;
        let reply = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let got = channel
                    .basic_get(victim.as_str().into(), BasicGetOptions { no_ack: true })
                    .await
                    .expect("basic.get");
                if let Some(message) = got {
                    break message;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the allowed queue gets its reply");
        let text = String::from_utf8_lossy(&reply.delivery.data).into_owned();
        assert!(text.contains("42"), "{text}");
        server.shutdown().await.expect("shutdown");
    }

    /// A call or cast to a topic or server no queue is bound to fails at once; a
    /// fanout cast to nobody does not.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn amqp_unroutable_requests_fail_at_once() {
        let Some(_) = super::backend().await else {
            return;
        };
        let transport = mqrpc::connect(&super::suite_url()).await.expect("RabbitMQ");
        assert!(transport.capabilities().reports_no_responders);
        let nowhere = topic("nowhere");
        let client =
            Client::new(transport.clone(), Target::new(&nowhere)).timeout(Duration::from_secs(60));
        let started = Instant::now();
        let err = client
            .call::<_, i64>(&Context::new(), "add", json!({"a": 1, "b": 1}))
            .await
            .expect_err("nobody ever listened");
        assert!(matches!(err, Error::NoResponders { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains("no server has ever listened"), "{text}");
        assert!(text.contains(&nowhere), "{text}");
        // Far below the call's own timeout: the broker said so at once.
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{:?}",
            started.elapsed()
        );
        let err = client
            .cast(&Context::new(), "record", json!({"id": 1}))
            .await
            .expect_err("a cast nobody can take");
        assert!(matches!(err, Error::NoResponders { .. }), "{err:?}");
        client
            .clone()
            .fanout(true)
            .cast(&Context::new(), "record", json!({"id": 2}))
            .await
            .expect("a fanout cast to nobody is fine");

        // A topic that is served, but not by the server named.
        let served = topic("served");
        let recorder = Recorder::new();
        let server = start_server(&super::suite_url(), &served, &recorder).await;
        let directed = Client::new(transport.clone(), Target::new(&served).server("s2"))
            .timeout(Duration::from_secs(60));
        let err = directed
            .call::<_, i64>(&Context::new(), "add", json!({"a": 1, "b": 1}))
            .await
            .expect_err("s2 never listened");
        assert!(matches!(err, Error::NoResponders { .. }), "{err:?}");
        // What is routable is not mistaken for unroutable, even among returns.
        let served_client = Client::new(transport.clone(), Target::new(&served));
        let mut sends = Vec::new();
        for id in 0..50u64 {
            let good = served_client.clone();
            let bad = client.clone();
            sends.push(tokio::spawn(async move {
                let ok = good
                    .cast(&Context::new(), "record", json!({ "id": id }))
                    .await;
                let refused = bad
                    .cast(&Context::new(), "record", json!({ "id": id }))
                    .await;
                (ok, refused)
            }));
        }
        let mut reported = 0;
        for send in sends {
            let (ok, refused) = send.await.expect("task");
            ok.expect("a routable cast is accepted");
            if matches!(refused, Err(Error::NoResponders { .. })) {
                reported += 1;
            }
        }
        eprintln!("amqp: {reported} of 50 concurrent unroutable casts reported");
        assert!(reported > 0);
        recorder.wait_for(50, Duration::from_secs(20)).await;
        // A server that stopped leaves its queue behind: requests wait there.
        server.shutdown().await.expect("shutdown");
        served_client
            .cast(&Context::new(), "record", json!({"id": 99}))
            .await
            .expect("a stopped server's queue keeps the cast");
    }

    /// A broker that accepts the connection and never answers fails a connect after
    /// `connect_timeout`, with an error that says so and holds no credential.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn amqp_connect_timeout_bounds_a_silent_broker() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a port");
        let port = listener.local_addr().expect("address").port();
        let held = Arc::new(Mutex::new(Vec::new()));
        let keep = held.clone();
        let accepting = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                keep.lock().expect("lock").push(socket);
            }
        });
        let url = format!("amqp://guest:Zq9-silent-secret@127.0.0.1:{port}/?connect_timeout=1");
        let started = Instant::now();
        let err = mqrpc::connect(&url).await.expect_err("nothing answers");
        let waited = started.elapsed();
        assert!(waited < Duration::from_secs(4), "took {waited:?}");
        let text = format!("{err} {err:?}");
        assert!(text.contains("timed out"), "{text}");
        assert!(text.contains("connect_timeout"), "{text}");
        assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
        assert!(!text.contains("Zq9-silent-secret"), "{text}");
        assert_eq!(
            err.kind(),
            ErrorKind::Transport(TransportErrorKind::Connect),
            "{text}"
        );
        assert!(
            !held.lock().expect("lock").is_empty(),
            "the test's listener was reached"
        );
        accepting.abort();
    }

    /// Transport errors say what kind of failure they are, with lapin's error as their
    /// source: a wrong password and a queue that exists with other arguments are
    /// refusals (sending again will not help), a port with nothing listening a failure
    /// to connect (it may).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn amqp_errors_tell_a_refusal_from_a_failure_to_connect() {
        if super::backend().await.is_none() {
            return;
        }
        let config = mqrpc::AmqpConfig::parse(&super::url()).expect("AMQP URL");
        let host = &config.hosts[0];
        let wrong = format!("amqp://{}:not-the-password@{host}/", host.username);
        let err = mqrpc::connect(&wrong).await.expect_err("a wrong password");
        assert_eq!(
            err.kind(),
            ErrorKind::Transport(TransportErrorKind::Refused),
            "{err}"
        );
        assert!(!err.is_retryable(), "{err}");
        assert!(std::error::Error::source(&err).is_some(), "{err:?}");

        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("a port")
            .local_addr()
            .expect("address")
            .port();
        let url = format!("amqp://guest:guest@127.0.0.1:{closed}/?connect_timeout=2");
        let err = mqrpc::connect(&url).await.expect_err("nothing listens");
        assert_eq!(
            err.kind(),
            ErrorKind::Transport(TransportErrorKind::Connect),
            "{err}"
        );
        assert!(err.is_retryable(), "{err}");

        // A server declares the topic's queue with one x-expires; a second that
        // declares it with another is refused (PRECONDITION_FAILED). Both expire.
        let name = topic("precondition");
        let first = mqrpc::connect(&super::suite_url()).await.expect("RabbitMQ");
        let base = super::url();
        let separator = if base.contains('?') { '&' } else { '?' };
        let other = mqrpc::connect(&format!("{base}{separator}topic_ttl=301"))
            .await
            .expect("RabbitMQ");
        let target = Target::new(&name).server("s1");
        let mut listening = first
            .listen(&target, &ListenOptions::new(1))
            .await
            .expect("the first server");
        let Err(err) = other.listen(&target, &ListenOptions::new(1)).await else {
            panic!("a queue declared with other arguments was accepted");
        };
        assert_eq!(
            err.kind(),
            ErrorKind::Transport(TransportErrorKind::Refused),
            "{err}"
        );
        listening.close().await.expect("close");
    }

    #[derive(Deserialize)]
    struct HoldArgs {
        id: u64,
        blob: String,
    }

    /// Big requests to a server whose handlers are busy: the bytes its budget holds
    /// stay under the documented bound (the budget plus one message), most requests
    /// wait in the broker meanwhile, and every one is handled in the end.
    async fn budget_bounds_a_busy_server(ack_mode: AckMode) {
        const BUDGET: usize = 8 * 1024 * 1024;
        const SIZE: usize = 3 * 1024 * 1024;
        const COUNT: u64 = 10;
        let url = super::suite_url();
        let spy = BudgetSpy::new(mqrpc::connect(&url).await.expect("RabbitMQ"));
        let name = topic("budget");
        let handled = Arc::new(Mutex::new(Vec::new()));
        let endpoint = Endpoint::new().method("hold", {
            let handled = handled.clone();
            move |_ctx: Context, args: HoldArgs| {
                let handled = handled.clone();
                async move {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    handled
                        .lock()
                        .expect("lock")
                        .push((args.id, args.blob.len()));
                    Ok::<_, RemoteError>(())
                }
            }
        });
        let server = Server::builder(spy.clone(), Target::new(&name).server("s1"))
            .endpoint(endpoint)
            .concurrency(8)
            .ack_mode(ack_mode)
            .max_pending_bytes(BUDGET)
            .start()
            .await
            .expect("server");
        let budget = spy.budget();
        assert_eq!(budget.limit(), BUDGET);

        let (_connection, channel) = raw_channel().await;
        let done = Arc::new(AtomicBool::new(false));
        let published = Arc::new(AtomicBool::new(false));
        let sampling = {
            let budget = budget.clone();
            let channel = channel.clone();
            let queue = name.clone();
            let (done, published) = (done.clone(), published.clone());
            tokio::spawn(async move {
                let (mut peak, mut most_waiting) = (0, 0);
                while !done.load(Ordering::SeqCst) {
                    peak = peak.max(budget.held());
                    // Once the whole burst is in the broker, while the first
                    // handlers still run: what has the server left there?
                    if published.load(Ordering::SeqCst) {
                        most_waiting = most_waiting.max(waiting(&channel, &queue).await);
                    }
                    peak = peak.max(budget.held());
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                (peak, most_waiting)
            })
        };
        // Encoded first, then published at once, as a burst.
        let blob = "x".repeat(SIZE);
        let bodies: Vec<Vec<u8>> = (0..COUNT)
            .map(|id| raw_cast("hold", json!({ "id": id, "blob": blob })))
            .collect();
        let mut confirms = Vec::new();
        for body in &bodies {
            let confirm = channel
                .basic_publish(
                    mqrpc::DEFAULT_EXCHANGE.into(),
                    name.as_str().into(),
                    BasicPublishOptions::default(),
                    body,
                    BasicProperties::default().with_content_type("application/json".into()),
                )
                .await
                .expect("publish");
            confirms.push(confirm);
        }
        for confirm in confirms {
            confirm.await.expect("confirm");
        }
        published.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(60);
        while handled.lock().expect("lock").len() < COUNT as usize {
            assert!(Instant::now() < deadline, "not every request was handled");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        done.store(true, Ordering::SeqCst);
        let (peak, most_waiting) = sampling.await.expect("sampler");
        let mut ids: Vec<u64> = handled.lock().expect("lock").iter().map(|h| h.0).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(
            ids,
            (0..COUNT).collect::<Vec<_>>(),
            "{ack_mode:?}: lost or duplicated"
        );
        // A request's body is its blob and a little envelope.
        let bound = BUDGET + SIZE + 4096;
        eprintln!(
            "amqp budget {ack_mode:?}: peak held {peak} bytes (bound {bound}), at most \
             {most_waiting} of {COUNT} waiting in the broker"
        );
        assert!(
            peak <= bound,
            "{ack_mode:?}: held {peak} bytes, bound {bound}"
        );
        assert!(peak > 0, "the sampler saw the budget in use");
        // Budget 8 MiB, 3 MiB requests: the server holds three, the broker pushes it
        // at most two more (the prefetch, 8 at first, falls to 2); the rest waits in
        // the broker while the first three are handled (2 s each).
        assert!(
            most_waiting >= 5,
            "{ack_mode:?}: only {most_waiting} requests waited in the broker"
        );
        server.shutdown().await.expect("shutdown");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn amqp_byte_budget_bounds_a_busy_server_acking_on_receipt() {
        let Some(_) = super::backend().await else {
            return;
        };
        budget_bounds_a_busy_server(AckMode::BeforeDispatch).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn amqp_byte_budget_bounds_a_busy_server_acking_after_handling() {
        let Some(_) = super::backend().await else {
            return;
        };
        budget_bounds_a_busy_server(AckMode::AfterHandling).await;
    }

    /// A client's reply queue is deleted when it is closed (not left to expire after
    /// `transient_ttl`; a quorum one is a Raft group while it lives).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn amqp_reply_queue_is_deleted_on_close() {
        use mqrpc::Transport;
        let Some(_) = super::backend().await else {
            return;
        };
        let transport = mqrpc::AmqpTransport::connect(&super::suite_url())
            .await
            .expect("RabbitMQ");
        let mut queue = transport.reply_queue().await.expect("reply queue");
        let (_connection, channel) = raw_channel().await;
        assert_eq!(waiting(&channel, &queue.address).await, 0);
        queue.consumer.close().await.expect("close");
        let gone = channel
            .queue_declare(
                queue.address.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        let err = gone.expect_err("the reply queue is gone");
        assert!(err.to_string().contains("NOT_FOUND"), "{err}");
        transport.close().await;
    }

    /// The `expiration` a request carries (oslo.messaging and mqrpc set it on calls
    /// to the call's timeout) is its time to live on delivery.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn amqp_expiration_is_the_time_to_live() {
        let Some(_) = super::backend().await else {
            return;
        };
        let transport = mqrpc::connect(&super::suite_url()).await.expect("RabbitMQ");
        let name = topic("ttl");
        let mut consumer = transport
            .listen(&Target::new(&name).server("s1"), &ListenOptions::new(4))
            .await
            .expect("listen");
        let (_connection, channel) = raw_channel().await;
        let body = raw_request("add", json!({"a": 1, "b": 2}), "reply_0");
        publish_raw(&channel, &name, &body, Some("4500")).await;
        publish_raw(&channel, &name, &body, None).await;
        let mut next = async || {
            tokio::time::timeout(Duration::from_secs(10), consumer.recv())
                .await
                .expect("delivered")
                .expect("open")
                .expect("delivery")
        };
        let first = next().await;
        assert_eq!(first.time_to_live(), Some(Duration::from_millis(4500)));
        let second = next().await;
        assert_eq!(second.time_to_live(), None);
        drop((first, second));

        // A call carries its timeout.
        let client =
            Client::new(transport.clone(), Target::new(&name)).timeout(Duration::from_secs(3));
        let call = tokio::spawn(async move {
            client
                .call::<_, i64>(&Context::new(), "add", json!({"a": 1, "b": 2}))
                .await
        });
        let third = next().await;
        assert_eq!(third.time_to_live(), Some(Duration::from_secs(3)));
        call.abort();
    }

    #[derive(Deserialize)]
    struct TicksArgs {
        n: u64,
    }

    /// A stream whose replies come back unroutable (the caller's reply queue is gone)
    /// stops at the first one: the reply's publish fails.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn amqp_stream_stops_when_its_replies_are_returned() {
        let Some(_) = super::backend().await else {
            return;
        };
        let produced = Arc::new(AtomicUsize::new(0));
        let endpoint = Endpoint::new().stream_method("ticks", {
            let produced = produced.clone();
            move |_ctx: Context, args: TicksArgs| {
                let produced = produced.clone();
                futures::stream::iter(0..args.n).then(move |i| {
                    let produced = produced.clone();
                    async move {
                        produced.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        Ok::<u64, RemoteError>(i)
                    }
                })
            }
        });
        let name = topic("returned_stream");
        let server = Server::builder(
            mqrpc::connect(&super::suite_url()).await.expect("RabbitMQ"),
            Target::new(&name).server("s1"),
        )
        .endpoint(endpoint)
        .start()
        .await
        .expect("server");
        let (_connection, channel) = raw_channel().await;
        // A reply queue of the right shape that nobody declared (a caller gone).
        let gone = format!("reply_{}", mqrpc::wire::new_id());
        let body = raw_request("ticks", json!({"n": 100_000}), &gone);
        publish_raw(&channel, &name, &body, None).await;
        let deadline = Instant::now() + Duration::from_secs(20);
        while produced.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline, "the stream never started");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = produced.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let later = produced.load(Ordering::SeqCst);
        eprintln!("amqp: the stream produced {later} items for a gone caller");
        assert_eq!(after, later, "the stream still runs");
        assert!(later < 100, "the stream ran on for {later} items");
        server.shutdown().await.expect("shutdown");
    }
}

/// Issue #24 on RabbitMQ: a publish the broker nacks (a quorum queue without a leader,
/// here a full queue with `reject-publish`) is tried again a few times within the
/// caller's deadline, and the error after the last try says how often it was nacked.
mod nacks {
    use std::time::{Duration, Instant};

    use lapin::BasicProperties;
    use lapin::options::{
        BasicGetOptions, BasicPublishOptions, QueueBindOptions, QueueDeclareOptions,
    };
    use lapin::types::{AMQPValue, FieldTable};
    use mqrpc::{Client, Context, Target};
    use serde_json::json;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn amqp_nacked_publish_is_retried_then_reported_with_its_count() {
        let Some(_) = super::backend().await else {
            return;
        };
        let topic = format!("nacked_{}", &mqrpc::wire::new_id()[..12]);
        let (_connection, channel) = super::hardening::raw_channel().await;
        // The topic's queue holds one message and nacks any more.
        let mut arguments = FieldTable::default();
        arguments.insert("x-max-length".into(), AMQPValue::LongLongInt(1));
        arguments.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
        arguments.insert("x-expires".into(), AMQPValue::LongLongInt(60_000));
        channel
            .queue_declare(
                topic.as_str().into(),
                QueueDeclareOptions::default(),
                arguments,
            )
            .await
            .expect("bounded queue");
        let transport = mqrpc::connect(&super::suite_url()).await.expect("connect");
        let exchange = transport.default_exchange().to_owned();
        let client = Client::new(transport, Target::new(&topic)).timeout(Duration::from_secs(30));
        let ctx = Context::new();
        // mqrpc declares its exchange on its first publish (to no queue yet: no
        // responders); then the queue is bound to it.
        let unbound = client.cast(&ctx, "record", json!({"id": 0})).await;
        assert!(unbound.is_err(), "no queue is bound yet");
        channel
            .queue_bind(
                topic.as_str().into(),
                exchange.as_str().into(),
                topic.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind");
        channel
            .basic_publish(
                "".into(),
                topic.as_str().into(),
                BasicPublishOptions::default(),
                b"filler",
                BasicProperties::default(),
            )
            .await
            .expect("publish the filler");
        let filled = tokio::time::timeout(Duration::from_secs(5), async {
            while super::hardening::waiting(&channel, &topic).await < 1 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(filled.is_ok(), "the filler is queued");

        // Full for good: nacked on every try, then reported with the count.
        let started = Instant::now();
        let err = client
            .cast(&ctx, "record", json!({"id": 1}))
            .await
            .expect_err("a full queue nacks");
        let text = err.to_string();
        eprintln!(
            "amqp nacked cast failed after {:?}: {text}",
            started.elapsed()
        );
        assert!(text.contains("(nack)"), "{text}");
        assert!(text.contains("nacked 8 times"), "{text}");

        // Room made a moment after the first nack: the cast goes through.
        let drain = {
            let channel = channel.clone();
            let topic = topic.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                channel
                    .basic_get(topic.as_str().into(), BasicGetOptions { no_ack: true })
                    .await
                    .expect("get")
                    .expect("the filler")
            })
        };
        client
            .cast(&ctx, "record", json!({"id": 2}))
            .await
            .expect("a nacked cast is tried again until the queue has room");
        assert_eq!(drain.await.expect("drain").delivery.data, b"filler");
        assert_eq!(super::hardening::waiting(&channel, &topic).await, 1);
    }
}
