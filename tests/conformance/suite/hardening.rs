//! Cases of the hardening issue (#22) that every backend must pass: a panic while
//! arguments decode is answered, a stream stops at its caller's deadline, the end of
//! a grace period answers the callers it cuts off, and topics with long or non-ASCII
//! names are served.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::json;

use super::{ARRIVAL, Backend, Fixture, SETTLE, ctx, still_answers};

pub async fn argument_decode_panic_is_a_remote_failure(backend: Backend) {
    let mut fx = Fixture::new(&backend, "decode_panic");
    fx.start(1).await;
    let client = fx.client().await;
    let started = Instant::now();
    let err = client
        .call::<_, ()>(&ctx(), "decode_panic", json!({"value": "seven"}))
        .await
        .expect_err("the arguments' Deserialize panics");
    let remote = err
        .as_remote()
        .unwrap_or_else(|| panic!("a remote failure, not {err:?}"));
    assert_eq!(remote.class, "RuntimeError");
    assert!(
        remote.message.contains("not a number: seven"),
        "{}",
        remote.message
    );
    // Answered, not timed out (the client's timeout is 30 s).
    assert!(started.elapsed() < Duration::from_secs(20));
    still_answers(&client, 1, 2).await;
    fx.shutdown().await;
}

pub async fn multicall_stream_stops_at_the_callers_deadline(backend: Backend) {
    let mut fx = Fixture::new(&backend, "stream_deadline");
    fx.start(1).await;
    // The client lives on (its reply queue stays), but the caller stops reading and
    // its deadline passes: the server must stop producing.
    let client = fx.client().await;
    let mut stream = client
        .prepare()
        .timeout(Duration::from_secs(2))
        .multicall::<_, u64>(&ctx(), "endless", json!({"interval_ms": 20}))
        .await
        .expect("multicall");
    for expected in 0..3 {
        let item = tokio::time::timeout(ARRIVAL, stream.next())
            .await
            .expect("an item in time")
            .expect("stream goes on")
            .expect("item");
        assert_eq!(item, expected);
    }
    drop(stream);
    // Well past the deadline (2 s from sending, counted from receipt by the server).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after_deadline = fx.recorder.streamed.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let later = fx.recorder.streamed.load(Ordering::SeqCst);
    assert_eq!(
        after_deadline, later,
        "the stream went on producing after its caller's deadline"
    );
    still_answers(&client, 2, 3).await;
    fx.shutdown().await;
}

pub async fn grace_period_end_fails_unfinished_calls_at_once(backend: Backend) {
    let mut fx = Fixture::new(&backend, "grace_end");
    fx.start_with("s1", |b| b.grace_period(Duration::from_millis(300)))
        .await;
    let client = fx.client().await.timeout(Duration::from_secs(60));
    let call = {
        let client = client.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let outcome = client
                .call::<_, f64>(&ctx(), "sleep", json!({"seconds": 120.0}))
                .await;
            (outcome, started.elapsed())
        })
    };
    tokio::time::timeout(ARRIVAL, fx.recorder.started.notified())
        .await
        .expect("handler started");
    let server = fx.servers.pop().expect("one server");
    server.shutdown().await.expect("shutdown");
    let (outcome, waited) = tokio::time::timeout(ARRIVAL, call)
        .await
        .expect("the caller is answered, not left to its 60 s timeout")
        .expect("task");
    let err = outcome.expect_err("the handler never finished");
    let remote = err
        .as_remote()
        .unwrap_or_else(|| panic!("a remote failure, not {err:?}"));
    assert_eq!(remote.class, mqrpc::wire::SERVER_SHUTDOWN_CLASS);
    assert!(
        remote
            .message
            .contains("shut down before the handler finished"),
        "{}",
        remote.message
    );
    assert!(waited < Duration::from_secs(30), "{waited:?}");
}

/// A 35-character Cyrillic topic, and a long ASCII one, work like any other: call,
/// cast, directed call and fanout.
pub async fn long_and_non_ascii_topics_are_served(backend: Backend) {
    let suffix = &mqrpc::wire::new_id()[..8];
    let topics = [
        format!("обработка_заказов_высокий_{suffix}"),
        format!("{}_{suffix}", "long-topic.name".repeat(8)),
    ];
    for topic in topics {
        let mut fx = Fixture::new(&backend, "unused");
        fx.topic = topic.clone();
        fx.start(2).await;
        let client = fx.client().await;
        still_answers(&client, 4, 5).await;
        let directed = client.prepare().server("s2");
        let name: String = directed
            .call(&ctx(), "whoami", mqrpc::NoArgs {})
            .await
            .unwrap_or_else(|err| panic!("directed call on {topic}: {err}"));
        assert_eq!(name, "s2");
        client
            .cast(&ctx(), "record", json!({"id": 1}))
            .await
            .expect("cast");
        client
            .prepare()
            .fanout(true)
            .cast(&ctx(), "record", json!({"id": 2}))
            .await
            .expect("fanout cast");
        // One for the cast, one per server for the fanout.
        fx.recorder.wait_for(3, ARRIVAL).await;
        let ids = fx.recorder.settled_ids(SETTLE).await;
        let fanned = ids.iter().filter(|id| **id == 2).count();
        assert_eq!((ids.len(), fanned), (3, 2), "{topic}: {ids:?}");
        fx.shutdown().await;
    }
}
