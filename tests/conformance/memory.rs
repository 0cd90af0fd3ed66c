//! The conformance suite on the in-process bus. Each test gets a bus of its own name,
//! reached through `mqrpc::connect` like any backend.

use std::sync::Arc;

use mqrpc::Transport;

use crate::suite::Backend;

async fn backend() -> Option<Backend> {
    let url = format!("memory://conformance-{}", mqrpc::wire::new_id());
    // Keep one transport alive so the named bus lives as long as the test.
    let anchor = mqrpc::connect(&url).await.expect("memory bus");
    Some(Backend::new("memory", move || {
        let url = url.clone();
        let anchor: Arc<dyn Transport> = anchor.clone();
        async move {
            let _ = &anchor;
            mqrpc::connect(&url).await.expect("memory bus")
        }
    }))
}

conformance_suite!(backend);

/// Every input kept for the `server` fuzz target (its seeds, and the input of any
/// crash it found, in `fuzz/regressions/server`), published as it is to a live
/// server's topic: the server answers a call after each one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_keeps_serving_after_the_server_fuzz_inputs() {
    use std::time::Duration;

    use mqrpc::transport::{Address, Outgoing};
    use mqrpc::{Client, Context, Endpoint, MemoryTransport, RemoteError, Server, Target};
    use serde::Deserialize;

    #[derive(Deserialize)]
    struct Add {
        a: i64,
        b: i64,
    }

    let fuzz = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut inputs = Vec::new();
    for dir in ["seeds/server", "regressions/server"] {
        if let Ok(entries) = std::fs::read_dir(fuzz.join(dir)) {
            for entry in entries.flatten() {
                let bytes = std::fs::read(entry.path()).expect("a readable input");
                inputs.push((entry.path(), bytes));
            }
        }
    }
    assert!(
        !inputs.is_empty(),
        "the server target's seeds are in fuzz/seeds/server"
    );

    let transport: Arc<dyn Transport> = Arc::new(MemoryTransport::new());
    let endpoint = Endpoint::new().method("add", |_ctx, args: Add| async move {
        Ok::<_, RemoteError>(args.a.wrapping_add(args.b))
    });
    let server = Server::builder(transport.clone(), Target::new("fuzzed").server("s1"))
        .endpoint(endpoint)
        .start()
        .await
        .expect("a server");
    let client =
        Client::new(transport.clone(), Target::new("fuzzed")).timeout(Duration::from_secs(5));
    let publisher = transport.publisher().await.expect("a publisher");
    let address = Address::Topic {
        exchange: mqrpc::DEFAULT_EXCHANGE.to_owned(),
        topic: "fuzzed".to_owned(),
    };
    for (path, bytes) in inputs {
        let _ = publisher.send(&address, Outgoing::new(bytes)).await;
        let sum: i64 = client
            .call(&Context::new(), "add", serde_json::json!({"a": 1, "b": 2}))
            .await
            .unwrap_or_else(|e| panic!("no answer after {}: {e}", path.display()));
        assert_eq!(sum, 3, "after {}", path.display());
    }
    server.shutdown().await.expect("shutdown");
}

/// A call whose request cannot leave before its deadline (its topic's queue is full
/// and nobody takes from it) times out as a publish, not as a missing reply, and
/// says how long the call waited in all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_stuck_in_its_publish_times_out_as_a_publish() {
    use std::time::{Duration, Instant};

    use mqrpc::{Client, Context, Error, Target, TimeoutKind};
    use serde_json::{Value, json};

    let url = format!("memory://stuck-{}?capacity=1", mqrpc::wire::new_id());
    let transport = mqrpc::connect(&url).await.expect("memory bus");
    let timeout = Duration::from_millis(300);
    let client = Client::new(transport, Target::new("full")).timeout(timeout);
    client
        .cast(&Context::new(), "fill", json!({}))
        .await
        .expect("the cast takes the queue's one place");
    let started = Instant::now();
    let err = client
        .call::<_, Value>(&Context::new(), "echo", json!({"payload": 1}))
        .await
        .expect_err("times out");
    assert!(
        matches!(
            err,
            Error::Timeout {
                kind: TimeoutKind::Publish,
                ..
            }
        ),
        "{err:?}"
    );
    let Error::Timeout { waited, .. } = err else {
        unreachable!()
    };
    assert!(waited >= timeout, "waited {waited:?}");
    assert!(started.elapsed() < timeout * 10, "{:?}", started.elapsed());
}

/// A client's setters retarget it: a client made for one topic, then given another
/// topic, an exchange and a server, reaches that server, and a copy made with
/// `prepare` before the change still reaches the first one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_retargeted_by_its_setters_reaches_its_new_server() {
    use std::time::Duration;

    use mqrpc::{Client, Context, Endpoint, MemoryTransport, RemoteError, Server, Target};

    let transport: Arc<dyn Transport> = Arc::new(MemoryTransport::new());
    let named = |name: &'static str| {
        Endpoint::new().method("whoami", move |_ctx, _args: serde_json::Value| async move {
            Ok::<_, RemoteError>(name)
        })
    };
    let first = Server::builder(transport.clone(), Target::new("first").server("a"))
        .endpoint(named("a"))
        .start()
        .await
        .expect("a server");
    let second = Server::builder(
        transport.clone(),
        Target::new("second").exchange("other").server("b"),
    )
    .endpoint(named("b"))
    .start()
    .await
    .expect("a server");

    let client =
        Client::new(transport.clone(), Target::new("first")).timeout(Duration::from_secs(5));
    let before = client.prepare();
    let client = client.topic("second").exchange("other").server("b");
    let ctx = Context::new();
    let args = serde_json::json!({});
    let answer: String = client.call(&ctx, "whoami", &args).await.expect("an answer");
    assert_eq!(answer, "b");
    let answer: String = before.call(&ctx, "whoami", &args).await.expect("an answer");
    assert_eq!(answer, "a");
    // The named server of the other topic is not a server of the first one.
    let missing = before
        .clone()
        .server("b")
        .timeout(Duration::from_millis(300))
        .call::<_, String>(&ctx, "whoami", &args)
        .await;
    assert!(missing.is_err(), "{missing:?}");
    first.shutdown().await.expect("shutdown");
    second.shutdown().await.expect("shutdown");
}
