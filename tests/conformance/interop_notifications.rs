//! Notification interop with Python oslo.messaging on the same RabbitMQ, both
//! directions: an oslo `Notifier` (driver `messagingv2`) to mqrpc listeners (the
//! default group and pools), and an mqrpc `Notifier` to oslo notification listeners
//! (endpoints per priority, a `NotificationFilter`, a pool, `allow_requeue`). The
//! Python peer is `tests/interop/oslo_peer.py` (`notify`, `listen-notifications`).
//!
//! Notification queues have no `x-expires` (as in oslo), so each test deletes the
//! queues it made when it ends, even when it fails.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use mqrpc::notify::{
    Notification, NotificationEndpoint, NotificationListener, NotificationResult, Notifier,
    Priority,
};
use mqrpc::{Context, Target};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::interop_amqp::{Peer, oslo_url, python};

/// How long a notification may take to arrive.
const ARRIVAL: Duration = Duration::from_secs(20);

/// How long to wait for anything more once everything expected has come.
const SETTLE: Duration = Duration::from_millis(500);

/// Deletes queues when dropped (the test's end, or its panic): the notification
/// queues of a topic's every priority, and pool queues.
pub(crate) struct Queues(Vec<String>);

impl Queues {
    pub(crate) fn of(topic: &str, pools: &[&str]) -> Queues {
        let mut names: Vec<String> = Priority::ALL.iter().map(|p| p.key(topic)).collect();
        names.extend(pools.iter().map(|pool| (*pool).to_owned()));
        Queues(names)
    }
}

impl Drop for Queues {
    fn drop(&mut self) {
        let names = std::mem::take(&mut self.0);
        // A runtime of its own: a drop cannot await, and may run during a panic.
        let deleted = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime")
                .block_on(delete_queues(names))
        })
        .join();
        if deleted.is_err() {
            eprintln!("could not delete the test's notification queues");
        }
    }
}

async fn delete_queues(names: Vec<String>) {
    // lapin reads an empty path as the vhost "", where mqrpc reads `/`.
    let base = crate::amqp::url();
    let url = match base.strip_suffix('/') {
        Some(host) if !host.ends_with('/') => format!("{host}/%2f"),
        _ => base,
    };
    let Ok(connection) =
        lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await
    else {
        return;
    };
    for name in names {
        // A channel each: deleting a queue that is not there may close its channel.
        let Ok(channel) = connection.create_channel().await else {
            continue;
        };
        let _ = channel
            .queue_delete(
                name.as_str().into(),
                lapin::options::QueueDeleteOptions::default(),
            )
            .await;
        let _ = channel.close(200, "done".into()).await;
    }
    let _ = connection.close(200, "done".into()).await;
}

/// An mqrpc listener of every priority of `topic`, in `pool`, sending what it gets
/// under `name`.
async fn rust_listener(
    topic: &str,
    pool: Option<&str>,
    name: &str,
    tx: &mpsc::UnboundedSender<(String, Notification)>,
) -> NotificationListener {
    let transport = mqrpc::connect(&crate::amqp::url()).await.expect("RabbitMQ");
    let tx = tx.clone();
    let name = name.to_owned();
    let endpoint = NotificationEndpoint::new().on_every(move |n| {
        let _ = tx.send((name.clone(), n));
        async { NotificationResult::Handled }
    });
    let mut builder =
        NotificationListener::builder(transport, [Target::new(topic)]).endpoint(endpoint);
    if let Some(pool) = pool {
        builder = builder.pool(pool);
    }
    builder.start().await.expect("listener starts")
}

/// oslo's message id: a uuid4 with dashes; its timestamp: `str(datetime)`.
fn assert_oslo_metadata(message_id: &str, timestamp: &str) {
    assert_eq!(message_id.len(), 36, "{message_id:?}");
    assert_eq!(message_id.matches('-').count(), 4, "{message_id:?}");
    let stamp = timestamp.as_bytes();
    assert!(
        timestamp.len() >= 19 && stamp[4] == b'-' && stamp[10] == b' ' && stamp[13] == b':',
        "{timestamp:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_interop_python_notifier_reaches_mqrpc_listeners() {
    let Some(_) = crate::amqp::backend().await else {
        return;
    };
    let Some(python) = python() else { return };
    let id = &mqrpc::wire::new_id()[..12];
    let topic = format!("interop_notify_py_{id}");
    let (pool_a, pool_b) = (
        format!("interop_pool_a_{id}"),
        format!("interop_pool_b_{id}"),
    );
    let _cleanup = Queues::of(&topic, &[&pool_a, &pool_b]);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let listeners = [
        rust_listener(&topic, None, "default", &tx).await,
        rust_listener(&topic, Some(&pool_a), "a", &tx).await,
        rust_listener(&topic, Some(&pool_b), "b", &tx).await,
    ];

    let url = oslo_url();
    let mut peer = Peer::spawn(
        &python,
        &[
            "notify",
            "--url",
            &url,
            "--topic",
            &topic,
            "--publisher-id",
            "compute.py1",
        ],
    );
    let sends = [
        (
            "info",
            "compute.instance.create.end",
            json!({"id": 7, "name": "vm", "tags": ["a", "żółw"]}),
            None,
        ),
        (
            "warn",
            "network.port.down",
            json!([1, 2]),
            Some("network.py2"),
        ),
        ("error", "volume.attach.error", json!({"code": 500}), None),
        ("audit", "identity.authenticate", json!("ok"), None),
        ("sample", "cpu.util", json!(0.5), None),
        ("debug", "trace.point", Value::Null, None),
        (
            "critical",
            "host.down",
            json!({"host": "h1"}),
            Some("ops.py3"),
        ),
    ];
    for (i, (priority, event_type, payload, publisher)) in sends.iter().enumerate() {
        peer.send(&json!({
            "id": i,
            "priority": priority,
            "event_type": event_type,
            "payload": payload,
            "publisher_id": publisher,
            "context": {"user": "alice", "project_id": "p1",
                        "request_id": format!("req-{i}"), "auth_token": "secret"},
        }))
        .await;
        let answer = peer.next(ARRIVAL).await;
        assert_eq!(answer, json!({"id": i, "ok": null}), "oslo sent it");
    }
    peer.finish().await;

    // Each of the three groups gets each notification once.
    let mut by_group: BTreeMap<String, BTreeMap<String, Notification>> = BTreeMap::new();
    for _ in 0..3 * sends.len() {
        let (group, n) = tokio::time::timeout(ARRIVAL, rx.recv())
            .await
            .expect("a notification in time")
            .expect("listeners running");
        let event = n.event_type.clone();
        let earlier = by_group.entry(group.clone()).or_default().insert(event, n);
        assert!(earlier.is_none(), "{group} got a notification twice");
    }
    tokio::time::sleep(SETTLE).await;
    assert!(rx.try_recv().is_err(), "nothing more");
    assert_eq!(
        by_group.keys().map(String::as_str).collect::<Vec<_>>(),
        ["a", "b", "default"]
    );
    let default = &by_group["default"];
    let mut ids = BTreeSet::new();
    for (i, (priority, event_type, payload, publisher)) in sends.iter().enumerate() {
        let n = &default[*event_type];
        assert_eq!(n.priority, priority.parse::<Priority>().expect("priority"));
        assert_eq!(n.publisher_id, publisher.unwrap_or("compute.py1"));
        assert_eq!(&n.payload, payload);
        // oslo sends the redacted copy of its RequestContext.
        assert_eq!(
            n.context.get("user"),
            Some(&json!("alice")),
            "{:?}",
            n.context
        );
        assert_eq!(n.context.get("project_id"), Some(&json!("p1")));
        assert_eq!(
            n.context.get("request_id"),
            Some(&json!(format!("req-{i}")))
        );
        assert_eq!(n.context.get("auth_token"), Some(&Value::Null));
        assert_oslo_metadata(&n.metadata.message_id, &n.metadata.timestamp);
        ids.insert(n.metadata.message_id.clone());
        for pool in ["a", "b"] {
            let copy = &by_group[pool][*event_type];
            assert_eq!(
                copy.metadata, n.metadata,
                "pool {pool}: the same notification"
            );
            assert_eq!(
                (
                    &copy.payload,
                    &copy.publisher_id,
                    copy.priority,
                    &copy.context
                ),
                (&n.payload, &n.publisher_id, n.priority, &n.context)
            );
        }
    }
    assert_eq!(ids.len(), sends.len(), "each has its own message id");
    for listener in listeners {
        listener.shutdown().await.expect("shutdown");
    }
}

/// The notification lines of an oslo listener's output.
fn notifications(lines: &[Value]) -> Vec<&Value> {
    lines
        .iter()
        .filter(|line| line["event"] == "notification")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_interop_mqrpc_notifier_reaches_python_listeners() {
    let Some(_) = crate::amqp::backend().await else {
        return;
    };
    let Some(python) = python() else { return };
    let id = &mqrpc::wire::new_id()[..12];
    let topic = format!("interop_notify_rs_{id}");
    let pool = format!("interop_pool_{id}");
    let _cleanup = Queues::of(&topic, &[&pool]);
    let url = oslo_url();
    let default_args = [
        "listen-notifications",
        "--url",
        &url,
        "--topic",
        &topic,
        "--allow-requeue",
        "--endpoint",
        r#"{"name": "info_warn", "priorities": ["info", "warn"], "requeue_once": ["retry.me"]}"#,
        "--endpoint",
        r#"{"name": "errors", "priorities": ["error", "critical"], "filter": {"event_type": "^compute[.]"}}"#,
    ];
    let pool_args = [
        "listen-notifications",
        "--url",
        &url,
        "--topic",
        &topic,
        "--pool",
        &pool,
        "--endpoint",
        r#"{"name": "active", "priorities": ["info"], "filter": {"publisher_id": "^compute", "payload": {"state": "^active$"}}}"#,
    ];
    let mut listeners = [
        Peer::spawn(&python, &default_args),
        Peer::spawn(&python, &pool_args),
        Peer::spawn(&python, &pool_args),
    ];
    for peer in &mut listeners {
        let ready = peer.next(Duration::from_secs(60)).await;
        assert_eq!(ready["event"], "ready", "{ready}");
    }

    let transport = mqrpc::connect(&crate::amqp::url()).await.expect("RabbitMQ");
    let notifier = Notifier::new(transport, "compute.rs1").topics([topic.as_str()]);
    let ctx = Context::new()
        .with("user", "bob")
        .with("request_id", "req-rs");
    let sends = [
        (
            Priority::Info,
            "compute.rs1",
            "compute.instance.create",
            json!({"state": "active", "n": 1}),
        ),
        (
            Priority::Info,
            "compute.rs1",
            "compute.instance.update",
            json!({"state": "deleted"}),
        ),
        (
            Priority::Info,
            "network.rs2",
            "network.port.up",
            json!({"state": "active"}),
        ),
        (
            Priority::Info,
            "compute.rs3",
            "compute.instance.create",
            json!({"state": "active", "n": 2}),
        ),
        (
            Priority::Warn,
            "compute.rs1",
            "network.port.down",
            json!([1, 2]),
        ),
        (
            Priority::Error,
            "compute.rs1",
            "compute.instance.fail",
            json!({"code": 1}),
        ),
        (Priority::Error, "compute.rs1", "network.fail", json!({})),
        (
            Priority::Critical,
            "compute.rs1",
            "compute.host.down",
            json!({"host": "h1"}),
        ),
        (Priority::Debug, "compute.rs1", "compute.trace", json!(null)),
        (Priority::Sample, "compute.rs1", "compute.cpu", json!(0.5)),
        (Priority::Info, "ops.rs4", "retry.me", json!({"state": "x"})),
    ];
    for (priority, publisher, event_type, payload) in &sends {
        notifier
            .prepare()
            .publisher_id(*publisher)
            .notify(&ctx, *priority, event_type, payload)
            .await
            .expect("sent");
    }

    // The default group: info and warn to one endpoint (retry.me requeued once, then
    // handled), error and critical of compute.* to the other; debug and sample to
    // nobody.
    let [default, pool_1, pool_2] = &mut listeners;
    let expected_default = 9;
    let mut got_default = Vec::new();
    while got_default.len() < expected_default {
        let line = default.next(ARRIVAL).await;
        assert_eq!(line["event"], "notification", "{line}");
        got_default.push(line);
    }
    // The pool: the two info notifications of compute.* in state active, each to one
    // of its two members.
    let mut got_pool = Vec::new();
    while got_pool.len() < 2 {
        let line = tokio::select! {
            line = pool_1.next(ARRIVAL) => line,
            line = pool_2.next(ARRIVAL) => line,
        };
        assert_eq!(line["event"], "notification", "{line}");
        got_pool.push(line);
    }
    tokio::time::sleep(SETTLE).await;
    let [default, pool_1, pool_2] = listeners;
    for (name, peer) in [("default", default), ("pool 1", pool_1), ("pool 2", pool_2)] {
        let rest = peer.finish_reading().await;
        assert!(notifications(&rest).is_empty(), "{name} got more: {rest:?}");
        assert_eq!(rest.last(), Some(&json!({"event": "stopped"})), "{name}");
    }

    let mut seen: Vec<(String, String, String, String)> = got_default
        .iter()
        .map(|line| {
            let field = |key: &str| line[key].as_str().expect(key).to_owned();
            (
                field("endpoint"),
                field("priority"),
                field("event_type"),
                field("result"),
            )
        })
        .collect();
    seen.sort();
    let expected = |endpoint: &str, priority: &str, event: &str, result: &str| {
        (
            endpoint.to_owned(),
            priority.to_owned(),
            event.to_owned(),
            result.to_owned(),
        )
    };
    let mut wanted = vec![
        expected("errors", "critical", "compute.host.down", "handled"),
        expected("errors", "error", "compute.instance.fail", "handled"),
        expected("info_warn", "info", "compute.instance.create", "handled"),
        expected("info_warn", "info", "compute.instance.create", "handled"),
        expected("info_warn", "info", "compute.instance.update", "handled"),
        expected("info_warn", "info", "network.port.up", "handled"),
        expected("info_warn", "info", "retry.me", "handled"),
        expected("info_warn", "info", "retry.me", "requeue"),
        expected("info_warn", "warn", "network.port.down", "handled"),
    ];
    wanted.sort();
    assert_eq!(seen, wanted);
    for line in &got_default {
        let (priority, publisher, event_type, _) = sends
            .iter()
            .find(|(_, publisher, event, payload)| {
                line["event_type"] == *event
                    && line["publisher_id"] == *publisher
                    && line["payload"] == *payload
            })
            .unwrap_or_else(|| panic!("not one that was sent: {line}"));
        assert_eq!(line["priority"], priority.as_str());
        assert_eq!(line["publisher_id"], *publisher);
        assert_eq!(line["event_type"], *event_type);
        assert_eq!(line["ctxt"]["user"], "bob", "{line}");
        assert_eq!(line["ctxt"]["request_id"], "req-rs", "{line}");
        assert_oslo_metadata(
            line["metadata"]["message_id"].as_str().expect("message_id"),
            line["metadata"]["timestamp"].as_str().expect("timestamp"),
        );
    }
    let retried: Vec<&Value> = got_default
        .iter()
        .filter(|line| line["event_type"] == "retry.me")
        .map(|line| &line["metadata"]["message_id"])
        .collect();
    assert_eq!(
        retried[0], retried[1],
        "the requeued notification came back"
    );

    let mut pool_seen: Vec<(String, Value)> = got_pool
        .iter()
        .map(|line| {
            assert_eq!(line["endpoint"], "active");
            assert_eq!(line["event_type"], "compute.instance.create");
            assert_eq!(line["ctxt"]["user"], "bob", "{line}");
            (
                line["publisher_id"].as_str().expect("publisher").to_owned(),
                line["payload"]["n"].clone(),
            )
        })
        .collect();
    pool_seen.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        pool_seen,
        [
            ("compute.rs1".to_owned(), json!(1)),
            ("compute.rs3".to_owned(), json!(2)),
        ]
    );
}
