//! A server's health on every backend (issue #26, part 4): consuming while it serves,
//! with the time since its last delivery; stopping while the grace period runs;
//! stopped after a shutdown and after a drop. Losing the broker (reconnecting) is in
//! `faults.rs`, where a proxy the test owns cuts the connection.

use std::sync::Arc;
use std::time::Duration;

use mqrpc::{Client, Endpoint, HealthState, RemoteError, Server, Target};
use serde_json::json;
use tokio::sync::{Notify, Semaphore};

use super::{ARRIVAL, Backend, Fixture, ctx, unique_topic};

pub async fn health_is_consuming_while_serving_and_stopped_after_shutdown(backend: Backend) {
    let mut fx = Fixture::new(&backend, "health");
    fx.start(1).await;
    let server = fx.servers.pop().expect("one server");
    let fresh = server.health();
    assert_eq!(fresh.state, HealthState::Consuming, "{fresh:?}");
    assert!(fresh.state.is_consuming());
    assert_eq!(fresh.since_last_delivery, None, "nothing delivered yet");
    assert_eq!(fresh.reconnections, 0);

    let client = fx.client().await;
    let sum: i64 = client
        .call(&ctx(), "add", json!({"a": 1, "b": 2}))
        .await
        .expect("add");
    assert_eq!(sum, 3);
    let served = server.health();
    assert_eq!(served.state, HealthState::Consuming, "{served:?}");
    let since = served.since_last_delivery.expect("the call was a delivery");
    // Not a timing assertion: a delivery in the future would be a bug.
    assert!(since <= served.in_state_for, "{served:?}");
    assert_eq!(served.reconnections, 0);

    let probe = server.health_probe();
    server.shutdown().await.expect("shutdown");
    let stopped = probe.health();
    assert_eq!(stopped.state, HealthState::Stopped, "{stopped:?}");
    assert!(!stopped.state.is_consuming());
    assert_eq!(stopped.state.to_string(), "stopped");
    assert!(
        stopped.since_last_delivery.is_some(),
        "the last delivery is still known: {stopped:?}"
    );
}

pub async fn health_is_stopping_while_the_grace_period_runs(backend: Backend) {
    let topic = unique_topic("health_stopping");
    // `hold` runs until the test lets it go: the grace period lasts exactly as long
    // as the test says, with no timing involved.
    let gate = Arc::new(Semaphore::new(0));
    let entered = Arc::new(Notify::new());
    let endpoint = Endpoint::new().method("hold", {
        let (gate, entered) = (gate.clone(), entered.clone());
        move |_ctx: mqrpc::Context, _: mqrpc::NoArgs| {
            let (gate, entered) = (gate.clone(), entered.clone());
            async move {
                entered.notify_one();
                let _released = gate.acquire().await;
                Ok::<_, RemoteError>("released")
            }
        }
    });
    let server = Server::builder(backend.transport().await, Target::new(&topic).server("s1"))
        .endpoint(endpoint)
        .grace_period(Duration::from_secs(60))
        .start()
        .await
        .expect("server");
    let probe = server.health_probe();
    let client = Client::new(backend.transport().await, Target::new(&topic))
        .timeout(Duration::from_secs(60));
    let held = tokio::spawn(async move {
        client
            .call::<_, String>(&ctx(), "hold", mqrpc::NoArgs {})
            .await
    });
    tokio::time::timeout(ARRIVAL, entered.notified())
        .await
        .expect("the handler started");
    assert_eq!(server.health().state, HealthState::Consuming);

    let stopping = tokio::spawn(server.shutdown());
    let seen = tokio::time::timeout(
        ARRIVAL,
        probe.wait_for(|h| h.state != HealthState::Consuming),
    )
    .await
    .expect("the server leaves consuming once shutdown starts");
    // The handler is held, so the server cannot have stopped yet.
    assert_eq!(seen.state, HealthState::Stopping, "{seen:?}");
    assert!(!seen.state.is_consuming());

    gate.add_permits(1);
    stopping
        .await
        .expect("the shutdown task")
        .expect("shutdown");
    assert_eq!(probe.health().state, HealthState::Stopped);
    let answer = held.await.expect("the call task").expect("the held call");
    assert_eq!(answer, "released");
}

pub async fn a_dropped_server_reports_stopped(backend: Backend) {
    let mut fx = Fixture::new(&backend, "health_dropped");
    fx.start(1).await;
    let server = fx.servers.pop().expect("one server");
    let probe = server.health_probe();
    assert_eq!(probe.health().state, HealthState::Consuming);
    drop(server);
    // Dropping stops consuming at once and lets the (no) handlers finish in the
    // background; the probe, which outlives the server, sees the end.
    let health = tokio::time::timeout(ARRIVAL, probe.wait_for(|h| h.state == HealthState::Stopped))
        .await
        .expect("the dropped server stops");
    assert_eq!(health.state, HealthState::Stopped);
}
