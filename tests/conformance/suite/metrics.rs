//! Metrics (feature `metrics`, issue #26) that every backend must record alike: after
//! a known sequence of calls, casts and a malformed message, the client's and the
//! server's figures say exactly what happened, with bounded labels.
//!
//! The recorder is the process's global one, installed once: tests run in parallel
//! on multi-thread runtimes, where a thread-local recorder would miss the work of
//! other threads. It keeps every value (metrics-util's `DebuggingRecorder` resets a
//! value each time it is read, so one test's read would reset another's), and each
//! case reads only the series of its own topic.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ::metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use futures::StreamExt;
use metrics_util::registry::{AtomicStorage, Registry};
use mqrpc::metrics as names;
use mqrpc::transport::{Address, Outgoing};
use mqrpc::{Error, TimeoutKind};
use serde_json::{Value, json};

use super::{ARRIVAL, Backend, Fixture, ctx};

type Store = Registry<Key, AtomicStorage>;

/// A recorder that keeps every value in a registry that tests read without
/// changing it.
struct Keeping(Arc<Store>);

impl Recorder for Keeping {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        self.0
            .get_or_create_counter(key, |c| Counter::from_arc(c.clone()))
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        self.0
            .get_or_create_gauge(key, |g| Gauge::from_arc(g.clone()))
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        self.0
            .get_or_create_histogram(key, |h| Histogram::from_arc(h.clone()))
    }
}

/// The process's recorder, installed by the first caller. Clients and servers take
/// their handles when they first record, so a case calls this before it starts any.
fn store() -> &'static Arc<Store> {
    static STORE: OnceLock<Arc<Store>> = OnceLock::new();
    STORE.get_or_init(|| {
        let store = Arc::new(Registry::atomic());
        ::metrics::set_global_recorder(Keeping(store.clone()))
            .expect("no other recorder in the conformance binary");
        store
    })
}

/// The series of one topic, by name and labels (the topic label left out).
#[derive(Debug, Default)]
struct Figures {
    counters: BTreeMap<(String, Labels), u64>,
    gauges: BTreeMap<(String, Labels), f64>,
    histograms: BTreeMap<(String, Labels), Vec<f64>>,
}

type Labels = BTreeMap<String, String>;

/// The labels of `key` without the topic, when its topic is `topic`.
fn of_topic(key: &Key, topic: &str) -> Option<Labels> {
    let mut labels = Labels::new();
    let mut ours = false;
    for label in key.labels() {
        if label.key() == names::LABEL_TOPIC {
            ours = label.value() == topic;
        } else {
            labels.insert(label.key().to_owned(), label.value().to_owned());
        }
    }
    ours.then_some(labels)
}

impl Figures {
    fn of(topic: &str) -> Self {
        let store = store();
        let mut figures = Figures::default();
        let name = |key: &Key| key.name().to_owned();
        for (key, value) in store.get_counter_handles() {
            if let Some(labels) = of_topic(&key, topic) {
                let value = value.load(std::sync::atomic::Ordering::Acquire);
                figures.counters.insert((name(&key), labels), value);
            }
        }
        for (key, value) in store.get_gauge_handles() {
            if let Some(labels) = of_topic(&key, topic) {
                let value = f64::from_bits(value.load(std::sync::atomic::Ordering::Acquire));
                figures.gauges.insert((name(&key), labels), value);
            }
        }
        for (key, bucket) in store.get_histogram_handles() {
            if let Some(labels) = of_topic(&key, topic) {
                figures
                    .histograms
                    .insert((name(&key), labels), bucket.data());
            }
        }
        figures
    }

    fn key(name: &str, labels: &[(&str, &str)]) -> (String, Labels) {
        let labels = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        (name.to_owned(), labels)
    }

    /// The samples of a histogram (none when it was never recorded).
    fn samples(&self, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
        let key = Self::key(name, labels);
        self.histograms.get(&key).cloned().unwrap_or_default()
    }

    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let key = Self::key(name, labels);
        self.counters.get(&key).copied().unwrap_or_default()
    }

    fn gauge(&self, name: &str) -> Option<f64> {
        self.gauges.get(&Self::key(name, &[])).copied()
    }

    /// Every label value of every series of the topic.
    fn label_values(&self) -> Vec<(String, String)> {
        let counters = self.counters.keys();
        let gauges = self.gauges.keys();
        let histograms = self.histograms.keys();
        counters
            .chain(gauges)
            .chain(histograms)
            .flat_map(|(_, labels)| labels.clone())
            .collect()
    }
}

fn call(method: &str, outcome: &str) -> [(&'static str, String); 2] {
    [
        (names::LABEL_METHOD, method.to_owned()),
        (names::LABEL_OUTCOME, outcome.to_owned()),
    ]
}

fn pairs<'a>(labels: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    labels.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

pub async fn metrics_count_a_known_sequence_of_calls(backend: Backend) {
    store();
    let mut fx = Fixture::new(&backend, "metrics");
    fx.start(1).await;
    let client = fx.client().await;

    for a in 0..3 {
        let sum: i64 = client
            .call(&ctx(), "add", json!({"a": a, "b": 1}))
            .await
            .expect("add");
        assert_eq!(sum, a + 1);
    }
    let failed = client
        .call::<_, Value>(&ctx(), "fail", json!({"kind": "range"}))
        .await
        .expect_err("fail fails");
    assert!(matches!(failed, Error::Remote(_)), "{failed:?}");
    let missing = client
        .call::<_, Value>(&ctx(), "does_not_exist", json!({}))
        .await
        .expect_err("no such method");
    assert!(matches!(missing, Error::NoSuchMethod { .. }), "{missing:?}");
    let timeout = Duration::from_millis(300);
    let late = client
        .prepare()
        .timeout(timeout)
        .call::<_, f64>(&ctx(), "sleep", json!({"seconds": 1.5}))
        .await
        .expect_err("times out");
    assert!(
        matches!(
            late,
            Error::Timeout {
                kind: TimeoutKind::Reply,
                ..
            }
        ),
        "{late:?}"
    );
    // Multicalls count as calls until their stream ends: one read to its end, one
    // that fails, one dropped before its end (cancelled).
    let items: Vec<u64> = client
        .multicall::<_, u64>(&ctx(), "count", json!({"n": 3}))
        .await
        .expect("multicall")
        .map(|item| item.expect("item"))
        .collect()
        .await;
    assert_eq!(items, vec![0, 1, 2]);
    let mut failing = client
        .multicall::<_, u64>(&ctx(), "count_then_fail", json!({"n": 1}))
        .await
        .expect("multicall");
    assert_eq!(failing.next().await.map(|item| item.ok()), Some(Some(0)));
    assert!(matches!(failing.next().await, Some(Err(Error::Remote(_)))));
    let mut dropped = client
        .multicall::<_, u64>(&ctx(), "count", json!({"n": 2}))
        .await
        .expect("multicall");
    assert_eq!(dropped.next().await.map(|item| item.ok()), Some(Some(0)));
    drop(dropped);
    for id in [1, 2] {
        client
            .cast(&ctx(), "record", json!({ "id": id }))
            .await
            .expect("cast");
    }
    // A malformed message, then a cast behind it through the same publisher: once
    // the cast ran, the server has refused the message before it.
    let transport = backend.transport().await;
    let publisher = transport.publisher().await.expect("publisher");
    let address = Address::Topic {
        exchange: transport.default_exchange().to_owned(),
        topic: fx.topic.clone(),
    };
    let behind = mqrpc::wire::Request {
        method: "record".into(),
        args: json!({"id": 3}).as_object().cloned().expect("object"),
        ..mqrpc::wire::Request::default()
    };
    for body in [
        b"\x00\xffnot json at all".to_vec(),
        mqrpc::wire::encode_request(&behind).expect("encode"),
    ] {
        publisher
            .send(&address, Outgoing::new(body))
            .await
            .expect("the broker takes any bytes");
    }
    fx.recorder.wait_for(3, ARRIVAL).await;
    // The server's figures are complete once its work is: the sleep that the caller
    // gave up on ends at the caller's deadline.
    let topic = fx.topic.clone();
    fx.shutdown().await;

    let seen = Figures::of(&topic);
    let client_calls = |method: &str, outcome: &str| {
        seen.samples(names::CLIENT_CALL_DURATION, &pairs(&call(method, outcome)))
    };
    assert_eq!(client_calls("add", "ok").len(), 3, "{seen:#?}");
    assert_eq!(client_calls("fail", "remote").len(), 1, "{seen:#?}");
    assert_eq!(
        client_calls("does_not_exist", "no_such_method").len(),
        1,
        "{seen:#?}"
    );
    let timed_out = client_calls("sleep", "timeout_reply");
    assert_eq!(timed_out.len(), 1, "{seen:#?}");
    assert!(
        timed_out[0] >= timeout.as_secs_f64(),
        "a call that waited out {timeout:?} lasted {}s",
        timed_out[0]
    );
    assert_eq!(client_calls("count", "ok").len(), 1, "{seen:#?}");
    assert_eq!(client_calls("count", "cancelled").len(), 1, "{seen:#?}");
    assert_eq!(
        client_calls("count_then_fail", "remote").len(),
        1,
        "{seen:#?}"
    );
    assert_eq!(
        seen.counter(names::CLIENT_CASTS, &pairs(&call("record", "ok"))),
        2,
        "{seen:#?}"
    );
    assert_eq!(
        seen.gauge(names::CLIENT_CALLS_IN_FLIGHT),
        Some(0.0),
        "{seen:#?}"
    );

    let handled = |method: &str, outcome: &str| {
        seen.samples(names::SERVER_CALL_DURATION, &pairs(&call(method, outcome)))
            .len()
    };
    assert_eq!(handled("add", "ok"), 3, "{seen:#?}");
    assert_eq!(handled("fail", "error"), 1, "{seen:#?}");
    // A method no endpoint has counts under one label, whatever its name.
    assert_eq!(
        handled(names::OTHER_METHOD, "no_such_method"),
        1,
        "{seen:#?}"
    );
    assert_eq!(handled("sleep", "deadline"), 1, "{seen:#?}");
    assert_eq!(handled("record", "ok"), 3, "{seen:#?}");
    assert_eq!(handled("count_then_fail", "error"), 1, "{seen:#?}");
    // Both `count` streams were sent to their end (the dropped one's replies went
    // unread).
    assert_eq!(handled("count", "ok"), 2, "{seen:#?}");
    assert_eq!(
        seen.counter(
            names::SERVER_REJECTED,
            &[(names::LABEL_REASON, "malformed")]
        ),
        1,
        "{seen:#?}"
    );
    assert_eq!(
        seen.gauge(names::SERVER_REQUESTS_ACTIVE),
        Some(0.0),
        "{seen:#?}"
    );
    assert_eq!(seen.gauge(names::SERVER_BYTES_HELD), Some(0.0), "{seen:#?}");

    // Bounded labels: the client names its own methods; the server names only its
    // endpoints' methods, never a message id.
    let client_methods = [
        "add",
        "fail",
        "does_not_exist",
        "sleep",
        "record",
        "count",
        "count_then_fail",
    ];
    for (label, value) in seen.label_values() {
        match label.as_str() {
            names::LABEL_METHOD => assert!(
                client_methods.contains(&value.as_str()) || value == names::OTHER_METHOD,
                "method label {value:?}"
            ),
            names::LABEL_OUTCOME | names::LABEL_REASON | names::LABEL_LIMIT => {
                assert!(
                    value.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                    "{label}={value:?}"
                )
            }
            other => panic!("unexpected label {other}={value:?}"),
        }
    }
    let server_methods: Vec<_> = seen
        .histograms
        .keys()
        .filter(|(name, _)| name == names::SERVER_CALL_DURATION)
        .filter_map(|(_, labels)| labels.get(names::LABEL_METHOD).cloned())
        .collect();
    assert!(
        !server_methods.iter().any(|m| m == "does_not_exist"),
        "{server_methods:?}"
    );
}
