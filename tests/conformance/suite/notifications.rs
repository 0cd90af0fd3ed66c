//! Notifications (issue #27) that every backend must deliver alike: a notifier's
//! notification reaches a listener with everything it was sent with; every pool gets
//! each notification and the listeners of one pool share them without loss or
//! duplicates; filters; requeue; notifications sent before any listener are kept; a
//! malformed message is rejected and the listener keeps running.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use mqrpc::notify::{
    NotificationEndpoint, NotificationFilter, NotificationListener, NotificationResult, Notifier,
    Priority,
};
use mqrpc::transport::{Address, Outgoing};
use mqrpc::{Context, Target};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::{ARRIVAL, Backend, SETTLE, unique_topic};

/// What an endpoint saw: the notifications, by arrival.
struct Seen {
    tx: mpsc::UnboundedSender<(String, mqrpc::notify::Notification)>,
    rx: mpsc::UnboundedReceiver<(String, mqrpc::notify::Notification)>,
}

impl Seen {
    fn new() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Seen { tx, rx }
    }

    /// An endpoint recording every priority's notifications under `name`.
    fn endpoint(&self, name: &str) -> NotificationEndpoint {
        let tx = self.tx.clone();
        let name = name.to_owned();
        NotificationEndpoint::new().on_every(move |n| {
            let _ = tx.send((name.clone(), n));
            async { NotificationResult::Handled }
        })
    }

    /// The next `count` notifications; panics if they do not come in time.
    async fn take(&mut self, count: usize) -> Vec<(String, mqrpc::notify::Notification)> {
        let mut got = Vec::with_capacity(count);
        while got.len() < count {
            match tokio::time::timeout(ARRIVAL, self.rx.recv()).await {
                Ok(Some(item)) => got.push(item),
                _ => panic!("{} of {count} notifications after {ARRIVAL:?}", got.len()),
            }
        }
        got
    }

    /// Waits `SETTLE` and says whether nothing more came.
    async fn nothing_more(&mut self) -> Result<(), String> {
        tokio::time::sleep(SETTLE).await;
        match self.rx.try_recv() {
            Ok((name, n)) => Err(format!("{name} got {n:?}")),
            Err(_) => Ok(()),
        }
    }
}

fn notifier(transport: Arc<dyn mqrpc::Transport>, topic: &str) -> Notifier {
    Notifier::new(transport, "compute.host1").topics([topic])
}

async fn listener(
    backend: &Backend,
    topic: &str,
    configure: impl FnOnce(
        mqrpc::notify::NotificationListenerBuilder,
    ) -> mqrpc::notify::NotificationListenerBuilder,
) -> NotificationListener {
    configure(NotificationListener::builder(
        backend.transport().await,
        [Target::new(topic)],
    ))
    .start()
    .await
    .expect("listener starts")
}

pub async fn notification_reaches_a_listener_with_all_it_was_sent_with(backend: Backend) {
    let topic = unique_topic("notify");
    let mut seen = Seen::new();
    let listening = listener(&backend, &topic, |b| b.endpoint(seen.endpoint("l1"))).await;
    let notifier = notifier(backend.transport().await, &topic);
    let ctx = Context::new()
        .with("user", "alice")
        .with("request_id", "req-1");
    notifier
        .info(
            &ctx,
            "compute.instance.create.end",
            json!({"id": 7, "name": "vm"}),
        )
        .await
        .expect("info");
    notifier
        .prepare()
        .publisher_id("network.host2")
        .warn(&Context::new(), "network.port.down", json!([1, 2]))
        .await
        .expect("warn");
    let got = seen.take(2).await;
    // By priority, not arrival: they come from two queues, handled concurrently.
    let of = |priority: Priority| {
        got.iter()
            .map(|(_, n)| n)
            .find(|n| n.priority == priority)
            .unwrap_or_else(|| panic!("no {priority} notification in {got:?}"))
    };
    let info = of(Priority::Info);
    assert_eq!(info.priority, Priority::Info);
    assert_eq!(info.publisher_id, "compute.host1");
    assert_eq!(info.event_type, "compute.instance.create.end");
    assert_eq!(info.payload, json!({"id": 7, "name": "vm"}));
    assert_eq!(info.context, ctx);
    // oslo's message id is a uuid4 with dashes, its timestamp Python's str(datetime).
    assert_eq!(info.metadata.message_id.len(), 36, "{:?}", info.metadata);
    assert_eq!(info.metadata.message_id.matches('-').count(), 4);
    let stamp = &info.metadata.timestamp;
    assert!(
        stamp.len() >= 19 && stamp.as_bytes()[10] == b' ' && stamp.as_bytes()[4] == b'-',
        "{stamp:?}"
    );
    #[derive(serde::Deserialize, Debug, PartialEq)]
    struct Created {
        id: u32,
        name: String,
    }
    assert_eq!(
        info.payload_as::<Created>().expect("typed payload"),
        Created {
            id: 7,
            name: "vm".into()
        }
    );
    let warn = of(Priority::Warn);
    assert_eq!(warn.priority, Priority::Warn);
    assert_eq!(warn.publisher_id, "network.host2");
    assert_eq!(warn.payload, json!([1, 2]));
    assert_ne!(warn.metadata.message_id, info.metadata.message_id);
    seen.nothing_more().await.expect("each once");
    listening.shutdown().await.expect("shutdown");
}

pub async fn a_listener_takes_only_the_priorities_it_handles(backend: Backend) {
    let topic = unique_topic("notify_prio");
    let (tx, mut rx) = mpsc::unbounded_channel();
    let endpoint = NotificationEndpoint::new().on(Priority::Error, move |n| {
        let _ = tx.send(n);
        async { NotificationResult::Handled }
    });
    let listening = listener(&backend, &topic, |b| b.endpoint(endpoint)).await;
    let notifier = notifier(backend.transport().await, &topic);
    notifier
        .info(&Context::new(), "ignored", json!(1))
        .await
        .expect("info");
    notifier
        .error(&Context::new(), "wanted", json!(2))
        .await
        .expect("error");
    let got = tokio::time::timeout(ARRIVAL, rx.recv())
        .await
        .expect("in time")
        .expect("one");
    assert_eq!(got.event_type, "wanted");
    tokio::time::sleep(SETTLE).await;
    assert!(rx.try_recv().is_err(), "info is not for this listener");
    listening.shutdown().await.expect("shutdown");
}

pub async fn every_pool_gets_each_notification_and_a_pool_shares_them(backend: Backend) {
    let topic = unique_topic("notify_pools");
    let mut seen = Seen::new();
    // Pool "a" with two members, pool "b" with one, and the default group. Pool
    // names are unique too: on AMQP a pool's queue is named after the pool alone (as
    // in oslo.messaging), so pools of one name in concurrent runs would share it.
    let (pool_a, pool_b) = (format!("{topic}_a"), format!("{topic}_b"));
    let a1 = listener(&backend, &topic, |b| {
        b.pool(&pool_a).endpoint(seen.endpoint("a1"))
    })
    .await;
    let a2 = listener(&backend, &topic, |b| {
        b.pool(&pool_a).endpoint(seen.endpoint("a2"))
    })
    .await;
    let b1 = listener(&backend, &topic, |b| {
        b.pool(&pool_b).endpoint(seen.endpoint("b1"))
    })
    .await;
    let d1 = listener(&backend, &topic, |b| b.endpoint(seen.endpoint("d1"))).await;
    let notifier = notifier(backend.transport().await, &topic);
    const COUNT: u64 = 1000;
    for i in 0..COUNT {
        notifier
            .sample(&Context::new(), "meter", json!({"n": i}))
            .await
            .expect("sample");
    }
    let got = seen.take(3 * COUNT as usize).await;
    seen.nothing_more().await.expect("no duplicates");
    let mut by_group: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    let mut by_member: BTreeMap<&str, usize> = BTreeMap::new();
    for (member, n) in &got {
        let group = match member.as_str() {
            "a1" | "a2" => "a",
            "b1" => "b",
            _ => "default",
        };
        let i = n.payload["n"].as_u64().expect("n");
        by_group.entry(group).or_default().push(i);
        *by_member.entry(member.as_str()).or_default() += 1;
    }
    for (group, mut ids) in by_group {
        ids.sort_unstable();
        assert_eq!(
            ids,
            (0..COUNT).collect::<Vec<_>>(),
            "pool {group} got each notification exactly once"
        );
    }
    assert!(
        by_member.get("a1").copied().unwrap_or(0) > 0
            && by_member.get("a2").copied().unwrap_or(0) > 0,
        "both members of pool a took a share: {by_member:?}"
    );
    for listening in [a1, a2, b1, d1] {
        listening.shutdown().await.expect("shutdown");
    }
}

pub async fn filters_pick_the_notifications_an_endpoint_wants(backend: Backend) {
    let topic = unique_topic("notify_filter");
    let mut seen = Seen::new();
    let filtered = seen.endpoint("compute").filter(
        NotificationFilter::new()
            .event_type(r"compute\.")
            .expect("pattern")
            .publisher_id("^compute")
            .expect("pattern")
            .payload("state", "active|error")
            .expect("pattern")
            .context("project", "p1")
            .expect("pattern"),
    );
    let listening = listener(&backend, &topic, |b| {
        b.endpoint(filtered).endpoint(seen.endpoint("all"))
    })
    .await;
    let notifier = notifier(backend.transport().await, &topic);
    let ctx = Context::new().with("project", "p1");
    let sends = [
        (
            "compute.host1",
            "compute.instance.update",
            json!({"state": "active"}),
            &ctx,
        ),
        (
            "compute.host1",
            "network.port.up",
            json!({"state": "active"}),
            &ctx,
        ),
        (
            "network.host1",
            "compute.instance.update",
            json!({"state": "active"}),
            &ctx,
        ),
        (
            "compute.host1",
            "compute.instance.update",
            json!({"state": "deleted"}),
            &ctx,
        ),
        (
            "compute.host1",
            "compute.instance.update",
            json!({"state": "error"}),
            &Context::new(),
        ),
        (
            "compute.host2",
            "compute.instance.delete",
            json!({"state": "error"}),
            &ctx,
        ),
    ];
    for (publisher, event, payload, ctx) in &sends {
        notifier
            .prepare()
            .publisher_id(*publisher)
            .info(ctx, event, payload)
            .await
            .expect("info");
    }
    // The unfiltered endpoint sees all six; the filtered one the first and last.
    let got = seen.take(sends.len() + 2).await;
    seen.nothing_more().await.expect("nothing else passes");
    // Sorted: the listener handles notifications concurrently, in no set order.
    let mut passed: Vec<(String, String)> = got
        .iter()
        .filter(|(name, _)| name == "compute")
        .map(|(_, n)| (n.publisher_id.clone(), n.event_type.clone()))
        .collect();
    passed.sort();
    assert_eq!(
        passed,
        vec![
            ("compute.host1".into(), "compute.instance.update".into()),
            ("compute.host2".into(), "compute.instance.delete".into()),
        ]
    );
    listening.shutdown().await.expect("shutdown");
}

pub async fn requeued_notification_comes_back_until_handled(backend: Backend) {
    let topic = unique_topic("notify_requeue");
    let attempts = Arc::new(AtomicUsize::new(0));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let counted = attempts.clone();
    let endpoint = NotificationEndpoint::new().on(Priority::Info, move |n| {
        let attempt = counted.fetch_add(1, Ordering::SeqCst) + 1;
        let tx = tx.clone();
        async move {
            if attempt < 3 {
                return NotificationResult::Requeue;
            }
            let _ = tx.send((attempt, n));
            NotificationResult::Handled
        }
    });
    let listening = listener(&backend, &topic, |b| {
        b.allow_requeue(true).endpoint(endpoint)
    })
    .await;
    notifier(backend.transport().await, &topic)
        .info(&Context::new(), "retry.me", json!("x"))
        .await
        .expect("info");
    let (attempt, n) = tokio::time::timeout(ARRIVAL, rx.recv())
        .await
        .expect("handled in time")
        .expect("handled");
    assert_eq!(attempt, 3);
    assert_eq!(n.event_type, "retry.me");
    tokio::time::sleep(SETTLE).await;
    assert_eq!(
        attempts.load(Ordering::SeqCst),
        3,
        "handled once, then acknowledged"
    );
    listening.shutdown().await.expect("shutdown");

    // Without allow_requeue a requeue is taken as handled, as oslo does.
    let topic = unique_topic("notify_no_requeue");
    let attempts = Arc::new(AtomicUsize::new(0));
    let counted = attempts.clone();
    let endpoint = NotificationEndpoint::new().on(Priority::Info, move |_| {
        counted.fetch_add(1, Ordering::SeqCst);
        async { NotificationResult::Requeue }
    });
    let listening = listener(&backend, &topic, |b| b.endpoint(endpoint)).await;
    notifier(backend.transport().await, &topic)
        .info(&Context::new(), "once", json!(null))
        .await
        .expect("info");
    let deadline = tokio::time::Instant::now() + ARRIVAL;
    while attempts.load(Ordering::SeqCst) == 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(SETTLE).await;
    assert_eq!(attempts.load(Ordering::SeqCst), 1);
    listening.shutdown().await.expect("shutdown");
}

pub async fn notifications_sent_before_any_listener_are_kept(backend: Backend) {
    let topic = unique_topic("notify_early");
    let notifier = notifier(backend.transport().await, &topic);
    for i in 0..5 {
        notifier
            .audit(&Context::new(), "early", json!(i))
            .await
            .expect("audit");
    }
    let mut seen = Seen::new();
    let listening = listener(&backend, &topic, |b| b.endpoint(seen.endpoint("late"))).await;
    let got = seen.take(5).await;
    let mut values: Vec<Value> = got.into_iter().map(|(_, n)| n.payload).collect();
    values.sort_by_key(|v| v.as_i64());
    assert_eq!(values, (0..5).map(Value::from).collect::<Vec<_>>());
    seen.nothing_more().await.expect("each once");
    listening.shutdown().await.expect("shutdown");
}

pub async fn malformed_notification_is_rejected_and_the_listener_keeps_running(backend: Backend) {
    let topic = unique_topic("notify_bad");
    let mut seen = Seen::new();
    let listening = listener(&backend, &topic, |b| b.endpoint(seen.endpoint("l1"))).await;
    let transport = backend.transport().await;
    let publisher = transport.publisher().await.expect("publisher");
    let address = Address::Notification {
        exchange: transport.default_exchange().to_owned(),
        key: Priority::Info.key(&topic),
    };
    for body in [
        b"\x00\xffnot json".to_vec(),
        br#"{"event_type": "no.priority"}"#.to_vec(),
        br#"{"event_type": "x", "priority": "LOUD"}"#.to_vec(),
    ] {
        publisher
            .send(&address, Outgoing::new(body))
            .await
            .expect("the broker takes any bytes");
    }
    notifier(transport, &topic)
        .info(&Context::new(), "after.the.bad.ones", json!(true))
        .await
        .expect("info");
    let got = seen.take(1).await;
    assert_eq!(got[0].1.event_type, "after.the.bad.ones");
    seen.nothing_more()
        .await
        .expect("the bad ones never reach a handler");
    listening.shutdown().await.expect("shutdown");
}
