//! Cases of "ask a topic who is there" (issue #26) that every backend must pass:
//! `Client::discover` reaches every server through the topic's fanout and each
//! answers with its status (the control request of `mqrpc.control`), also with
//! message signing on; a server built not discoverable stays silent; oslo's
//! `oslo_rpc_server_ping` is answered when turned on, by oslo's dispatch rules.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use mqrpc::wire::{CONTROL_NAMESPACE, OSLO_PING_METHOD};
use mqrpc::{
    Client, Discovered, DiscoveryWait, Endpoint, Error, MessageAuth, Server, ServerStatus, Target,
    Version,
};
use serde_json::json;

use super::{ARRIVAL, Backend, CASE_LIMIT, Fixture, ctx};

/// The methods of the test service (`crate::service`) a status lists: sorted, and
/// without `_private`, which is never dispatched.
const SERVICE_METHODS: [&str; 15] = [
    "add",
    "context",
    "count",
    "count_then_fail",
    "decode_panic",
    "delayed_echo",
    "echo",
    "endless",
    "fail",
    "panic",
    "record",
    "sleep",
    "slow_record",
    "value_error",
    "whoami",
];

/// How long a case waits, after the answers it expects, for answers it must not get.
const QUIET: Duration = Duration::from_secs(2);

/// Waits for `n` answers (or the case's arrival limit): no quiet interval cuts a
/// slow answer off.
fn expecting(n: usize) -> DiscoveryWait {
    DiscoveryWait::new(ARRIVAL).quiet(ARRIVAL).expect(n)
}

/// Every answer of one discovery: the statuses and the errors.
async fn gather(client: &Client, wait: DiscoveryWait) -> (Vec<Discovered>, Vec<Error>) {
    let mut answers = client.discover(wait).await.expect("the request is sent");
    let (mut found, mut errors) = (Vec::new(), Vec::new());
    while let Some(answer) = answers.next().await {
        match answer {
            Ok(discovered) => found.push(discovered),
            Err(err) => errors.push(err),
        }
    }
    (found, errors)
}

/// The statuses by server name; each server answers once.
fn by_server(found: &[Discovered]) -> BTreeMap<String, ServerStatus> {
    let statuses: BTreeMap<String, ServerStatus> = found
        .iter()
        .map(|d| (d.status.server.clone(), d.status.clone()))
        .collect();
    assert_eq!(
        statuses.len(),
        found.len(),
        "a server answered twice: {found:?}"
    );
    statuses
}

fn names(statuses: &BTreeMap<String, ServerStatus>) -> Vec<&str> {
    statuses.keys().map(String::as_str).collect()
}

pub async fn discovery_finds_every_server_with_its_details(backend: Backend) {
    let mut fx = Fixture::new(&backend, "discover");
    fx.start(2).await;
    let client = fx.client().await;
    let to_s1 = client.prepare().server("s1");
    for _ in 0..3 {
        let sum: i64 = to_s1
            .call(&ctx(), "add", json!({"a": 1, "b": 2}))
            .await
            .expect("add");
        assert_eq!(sum, 3);
    }

    let (found, errors) = gather(&client, expecting(2)).await;
    assert!(errors.is_empty(), "{errors:?}");
    let statuses = by_server(&found);
    assert_eq!(names(&statuses), ["s1", "s2"], "{found:?}");
    let transport = client.transport();
    let exchange = client.target().exchange_or(transport.default_exchange());
    for status in statuses.values() {
        assert_eq!(status.topic, fx.topic);
        assert_eq!(status.exchange, exchange);
        // The servers run in this process.
        assert_eq!(status.pid, std::process::id());
        assert!(!status.host.is_empty());
        assert_eq!(status.backend, transport.name());
        assert_eq!(status.mqrpc_version, env!("CARGO_PKG_VERSION"));
        assert_eq!(status.endpoints.len(), 1, "{status:?}");
        let endpoint = &status.endpoints[0];
        assert_eq!(endpoint.namespace, None);
        assert_eq!(endpoint.version, "1.3");
        assert_eq!(endpoint.methods, SERVICE_METHODS);
        assert_eq!(status.in_flight, 0);
        assert_eq!(status.concurrency, mqrpc::DEFAULT_CONCURRENCY as u64);
        assert!(!status.oslo_ping);
        assert!(
            (0.0..CASE_LIMIT.as_secs_f64()).contains(&status.uptime),
            "{status:?}"
        );
    }
    assert_eq!(statuses["s1"].host, statuses["s2"].host);
    // Counted once their replies left: a caller that has its result sees them.
    assert_eq!((statuses["s1"].handled, statuses["s2"].handled), (3, 0));
    assert!(found.iter().all(|d| d.round_trip <= ARRIVAL), "{found:?}");

    // Asking the topic again does not count the asking; a cast and a call to s2 count.
    client
        .prepare()
        .server("s2")
        .cast(&ctx(), "record", json!({"id": 1}))
        .await
        .expect("cast");
    fx.recorder.wait_for(1, ARRIVAL).await;
    let who: String = client
        .prepare()
        .server("s2")
        .call(&ctx(), "whoami", mqrpc::NoArgs {})
        .await
        .expect("whoami");
    assert_eq!(who, "s2");

    // A client whose target names a server asks that server only.
    let (found, errors) = gather(&client.prepare().server("s2"), expecting(1)).await;
    assert!(errors.is_empty(), "{errors:?}");
    let statuses = by_server(&found);
    assert_eq!(names(&statuses), ["s2"]);
    // The cast may still be finishing after its record: 1 or 2 handled, never the asking.
    let s2 = &statuses["s2"];
    assert!(s2.handled + s2.in_flight == 2 && s2.handled >= 1, "{s2:?}");
    let (found, _) = gather(&client, expecting(2)).await;
    assert_eq!(
        by_server(&found)["s1"].handled,
        3,
        "the asking is not counted"
    );
    fx.shutdown().await;
}

pub async fn discovery_works_with_message_signing(backend: Backend) {
    const KEY: &[u8] = b"discovery key of 32 bytes long..";
    let auth = || MessageAuth::new("k1", KEY).expect("a key");
    let mut fx = Fixture::new(&backend, "discover_signed");
    for server in ["s1", "s2"] {
        fx.start_with(server, |b| b.message_auth(auth())).await;
    }
    let signed = fx.client().await.message_auth(auth());
    let (found, errors) = gather(&signed, expecting(2)).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(names(&by_server(&found)), ["s1", "s2"]);

    // Servers refuse an unsigned request, and say so to its asker.
    let unsigned = fx.client().await;
    let (found, errors) = gather(&unsigned, expecting(2)).await;
    assert!(found.is_empty(), "{found:?}");
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors.iter().all(|e| matches!(e, Error::Authentication(_))),
        "{errors:?}"
    );

    // A client with another key under the same id refuses the servers' answers
    // (signed with the real key) as much as they refuse its request.
    let forger = fx.client().await.message_auth(
        MessageAuth::new("k1", b"a guess at the key, 32 bytes....".to_vec()).expect("key"),
    );
    let (found, errors) = gather(&forger, expecting(2)).await;
    assert!(found.is_empty(), "{found:?}");
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors.iter().all(|e| matches!(e, Error::Authentication(_))),
        "{errors:?}"
    );
    fx.shutdown().await;
}

pub async fn undiscoverable_server_does_not_answer(backend: Backend) {
    let mut fx = Fixture::new(&backend, "undiscoverable");
    fx.start(1).await;
    fx.start_with("s2", |b| b.discoverable(false)).await;
    let client = fx.client().await;

    // Waits for both, then for the quiet interval after s1's answer.
    let wait = DiscoveryWait::new(ARRIVAL).quiet(QUIET).expect(2);
    let (found, errors) = gather(&client, wait).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(names(&by_server(&found)), ["s1"]);
    // Asked directly, it stays silent as well (no failure reply either) ...
    let wait = DiscoveryWait::new(QUIET).quiet(QUIET);
    let (found, errors) = gather(&client.prepare().server("s2"), wait).await;
    assert!(
        found.is_empty() && errors.is_empty(),
        "{found:?} {errors:?}"
    );
    // ... while it serves its endpoints.
    let who: String = client
        .prepare()
        .server("s2")
        .call(&ctx(), "whoami", mqrpc::NoArgs {})
        .await
        .expect("whoami");
    assert_eq!(who, "s2");

    // The control namespace is reserved: a server refuses to start with it.
    let reserved = Endpoint::new()
        .namespace(CONTROL_NAMESPACE)
        .method("status", |_: mqrpc::Context, _: mqrpc::NoArgs| async {
            Ok::<_, mqrpc::RemoteError>(0)
        });
    let refused = Server::builder(
        backend.transport().await,
        Target::new(&fx.topic).server("s3"),
    )
    .endpoint(reserved)
    .start()
    .await;
    assert!(
        matches!(refused, Err(Error::InvalidConfig(_))),
        "{refused:?}"
    );
    fx.shutdown().await;
}

pub async fn oslo_ping_is_answered_when_turned_on(backend: Backend) {
    let mut fx = Fixture::new(&backend, "oslo_ping");
    fx.start_with("s1", |b| b.oslo_ping(true)).await;
    fx.start_with("s2", |b| b).await;
    // A server with the ping endpoint alone, as a Python server with no endpoint of
    // its own and rpc_ping_enabled.
    let alone = Server::builder(
        backend.transport().await,
        Target::new(&fx.topic).server("s3"),
    )
    .oslo_ping(true)
    .start()
    .await
    .expect("server starts");
    fx.servers.push(alone);
    let client = fx.client().await;
    let ping = |server: &str| client.prepare().server(server);

    for server in ["s1", "s3"] {
        let pong: String = ping(server)
            .call(&ctx(), OSLO_PING_METHOD, json!({}))
            .await
            .expect("pong");
        assert_eq!(pong, "pong");
        // Keyword arguments are accepted and ignored (`**kwargs`).
        let pong: String = ping(server)
            .call(&ctx(), OSLO_PING_METHOD, json!({"who": "python", "n": 1}))
            .await
            .expect("pong");
        assert_eq!(pong, "pong");
        // Its endpoint has no target: another namespace does not reach it.
        let other = ping(server)
            .namespace("ns1")
            .call::<_, String>(&ctx(), OSLO_PING_METHOD, json!({}))
            .await;
        assert!(
            matches!(other, Err(Error::UnsupportedVersion { .. })),
            "{server}: {other:?}"
        );
    }
    // Version 1.1: the ping endpoint (1.0) does not serve it; s1's own endpoint (1.3)
    // does but has no such method, s3 has no other endpoint.
    let newer = ping("s1").version(Version::new(1, 1));
    let on_s1 = (newer.call::<_, String>(&ctx(), OSLO_PING_METHOD, json!({}))).await;
    let newer = ping("s3").version(Version::new(1, 1));
    let on_s3 = (newer.call::<_, String>(&ctx(), OSLO_PING_METHOD, json!({}))).await;
    assert!(
        matches!(on_s1, Err(Error::NoSuchMethod { .. })),
        "{on_s1:?}"
    );
    assert!(
        matches!(on_s3, Err(Error::UnsupportedVersion { .. })),
        "{on_s3:?}"
    );
    // Off by default, as in oslo.messaging.
    let off = ping("s2")
        .call::<_, String>(&ctx(), OSLO_PING_METHOD, json!({}))
        .await;
    assert!(matches!(off, Err(Error::NoSuchMethod { .. })), "{off:?}");

    // The status says so, and lists the ping endpoint after the server's own.
    let (found, errors) = gather(&client, expecting(3)).await;
    assert!(errors.is_empty(), "{errors:?}");
    let statuses = by_server(&found);
    assert_eq!(names(&statuses), ["s1", "s2", "s3"]);
    let oslo_ping: Vec<bool> = statuses.values().map(|s| s.oslo_ping).collect();
    assert_eq!(oslo_ping, [true, false, true]);
    let endpoints = |server: &str| -> Vec<(Option<String>, String, Vec<String>)> {
        (statuses[server].endpoints.iter())
            .map(|e| (e.namespace.clone(), e.version.clone(), e.methods.clone()))
            .collect()
    };
    let ping_endpoint = (None, "1.0".to_owned(), vec![OSLO_PING_METHOD.to_owned()]);
    assert_eq!(endpoints("s1").len(), 2);
    assert_eq!(endpoints("s1")[1], ping_endpoint);
    assert_eq!(endpoints("s3"), [ping_endpoint]);
    assert_eq!(endpoints("s2").len(), 1);
    fx.shutdown().await;
}
