//! Typed services (`#[mqrpc::service]`) against Python oslo.messaging on the same
//! RabbitMQ, both directions: an oslo `RPCClient` calls a macro-defined Rust server,
//! and a macro-defined typed client calls an oslo RPC server (the `calc` endpoint of
//! `tests/interop/oslo_peer.py`, namespace `calc`, version 1.1). The Python peer and
//! its skip rules are those of [`crate::interop_amqp`].

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mqrpc::{Context, Error, RemoteError, Server, Target, Version};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::interop_amqp::{Peer, oslo_url, python, python_server_with};

/// The typed error of [`Calc::divide`].
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
enum CalcError {
    DivideByZero(i64),
}

impl fmt::Display for CalcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CalcError::DivideByZero(n) => write!(f, "cannot divide {n} by zero"),
        }
    }
}

/// One interface for both directions: the Rust server implements all of it, the
/// Python `calc` endpoint (version 1.1) all but `mul` (1.2) and `divide`.
#[mqrpc::service(version = "1.3", namespace = "calc")]
trait Calc {
    async fn add(&self, ctx: &Context, a: i64, b: i64) -> i64;
    /// Adds `by` to the server's total.
    #[mqrpc(cast)]
    async fn bump(&self, ctx: &Context, by: u64);
    async fn total(&self, ctx: &Context) -> u64;
    async fn whoami(&self, ctx: &Context) -> String;
    #[mqrpc(since = "1.2")]
    async fn mul(&self, ctx: &Context, a: i64, b: i64) -> i64;
    async fn divide(&self, ctx: &Context, a: i64, b: i64) -> Result<i64, CalcError>;
    /// `subtract(from=.., subtrahend=..)` on the wire.
    #[mqrpc(name = "subtract")]
    async fn sub(
        &self,
        ctx: &Context,
        #[mqrpc(name = "from")] minuend: i64,
        subtrahend: i64,
    ) -> i64;
    /// Fails with a Python `ValueError(message)`.
    async fn fail(&self, ctx: &Context, message: String) -> Result<(), RemoteError>;
}

struct RustCalc {
    name: String,
    total: watch::Sender<u64>,
}

impl Calc for RustCalc {
    async fn add(&self, _ctx: &Context, a: i64, b: i64) -> i64 {
        a + b
    }
    async fn bump(&self, _ctx: &Context, by: u64) {
        self.total.send_modify(|total| *total += by);
    }
    async fn total(&self, _ctx: &Context) -> u64 {
        *self.total.borrow()
    }
    async fn whoami(&self, _ctx: &Context) -> String {
        self.name.clone()
    }
    async fn mul(&self, _ctx: &Context, a: i64, b: i64) -> i64 {
        a * b
    }
    async fn divide(&self, _ctx: &Context, a: i64, b: i64) -> Result<i64, CalcError> {
        a.checked_div(b).ok_or(CalcError::DivideByZero(a))
    }
    async fn sub(&self, _ctx: &Context, minuend: i64, subtrahend: i64) -> i64 {
        minuend - subtrahend
    }
    async fn fail(&self, _ctx: &Context, message: String) -> Result<(), RemoteError> {
        Err(RemoteError::new("ValueError", message))
    }
}

/// Sends `requests` one at a time to a Python client and returns its answers by id.
async fn ask(client: &mut Peer, requests: &[Value]) -> HashMap<i64, Value> {
    let mut answers = HashMap::new();
    for request in requests {
        client.send(request).await;
        let answer = client.next(Duration::from_secs(60)).await;
        assert_eq!(answer["id"], request["id"], "{answer}");
        answers.insert(answer["id"].as_i64().expect("id"), answer);
    }
    answers
}

fn ok(answers: &HashMap<i64, Value>, id: i64) -> Value {
    answers[&id]
        .get("ok")
        .cloned()
        .unwrap_or_else(|| panic!("request {id} failed: {}", answers[&id]))
}

fn error(answers: &HashMap<i64, Value>, id: i64) -> Value {
    answers[&id]
        .get("error")
        .cloned()
        .unwrap_or_else(|| panic!("request {id} succeeded: {}", answers[&id]))
}

/// An oslo `RPCClient` (namespace `calc`) calls the macro-defined Rust server `rs1`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_interop_typed_python_client_calls_macro_server() {
    let Some(_) = crate::amqp::backend().await else {
        return;
    };
    let Some(python) = python() else { return };
    let topic = format!("interop_typed_rs_{}", &mqrpc::wire::new_id()[..12]);
    let calc = Arc::new(RustCalc {
        name: "rs1".to_owned(),
        total: watch::channel(0).0,
    });
    let mut total = calc.total.subscribe();
    let transport = mqrpc::connect(&crate::amqp::url()).await.expect("RabbitMQ");
    let server = Server::builder(transport, Target::new(&topic).server("rs1"))
        .endpoint(Calc::endpoint(calc))
        .start()
        .await
        .expect("server");

    let url = oslo_url();
    let mut client = Peer::spawn(&python, &["client", "--url", &url, "--topic", &topic]);
    let calc_request = |id: i64, method: &str, args: Value| json!({"id": id, "method": method, "args": args, "namespace": "calc", "timeout": 20});
    let mut answers = ask(
        &mut client,
        &[
            // No version: oslo sends none, which means 1.0.
            calc_request(1, "add", json!({"a": 2, "b": 3})),
            json!({"id": 2, "method": "add", "args": {"a": 2, "b": 2}, "namespace": "calc",
                   "version": "1.3", "timeout": 20}),
            json!({"id": 3, "method": "mul", "args": {"a": 6, "b": 7}, "namespace": "calc",
                   "version": "1.2", "timeout": 20}),
            calc_request(4, "divide", json!({"a": 9, "b": 3})),
            calc_request(5, "divide", json!({"a": 1, "b": 0})),
            // The wire names of the renamed method and argument.
            calc_request(6, "subtract", json!({"from": 10, "subtrahend": 3})),
            calc_request(7, "sub", json!({"from": 10, "subtrahend": 3})),
            calc_request(8, "fail", json!({"message": "bad input"})),
            json!({"id": 9, "method": "add", "args": {"a": 1, "b": 1}, "namespace": "calc",
                   "version": "2.0", "timeout": 20}),
            // The endpoint serves namespace `calc` only.
            json!({"id": 10, "method": "add", "args": {"a": 1, "b": 1}, "timeout": 20}),
            json!({"id": 11, "method": "whoami", "namespace": "calc", "server": "rs1",
                   "timeout": 20}),
            json!({"id": 12, "method": "bump", "args": {"by": 7}, "namespace": "calc",
                   "cast": true}),
        ],
    )
    .await;

    assert_eq!(ok(&answers, 1), json!(5));
    assert_eq!(ok(&answers, 2), json!(4));
    assert_eq!(ok(&answers, 3), json!(42), "1.2 is served by 1.3");
    assert_eq!(ok(&answers, 4), json!(3));
    // The typed error: a RemoteError of the Rust type's class with its Display text.
    let typed = error(&answers, 5);
    assert_eq!(
        (&typed["type"], &typed["exc_type"], &typed["value"]),
        (
            &json!("RemoteError"),
            &json!("CalcError"),
            &json!("cannot divide 1 by zero")
        ),
        "{typed}"
    );
    assert_eq!(ok(&answers, 6), json!(7));
    let rust_name = error(&answers, 7);
    assert_eq!(
        (&rust_name["type"], &rust_name["exc_type"]),
        (&json!("RemoteError"), &json!("NoSuchMethod")),
        "only the wire name is served: {rust_name}"
    );
    let value_error = error(&answers, 8);
    assert_eq!(
        (&value_error["type"], &value_error["is_value_error"]),
        (&json!("ValueError"), &json!(true)),
        "{value_error}"
    );
    assert!(
        value_error["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("bad input")),
        "{value_error}"
    );
    for id in [9, 10] {
        let refused = error(&answers, id);
        assert_eq!(
            (&refused["type"], &refused["exc_type"]),
            (&json!("RemoteError"), &json!("UnsupportedVersion")),
            "request {id}: {refused}"
        );
    }
    assert_eq!(ok(&answers, 11), json!("rs1"));
    assert_eq!(ok(&answers, 12), Value::Null, "a cast returns nothing");

    // The cast's effect, seen by the Rust server; then Python reads it back.
    tokio::time::timeout(Duration::from_secs(20), total.wait_for(|total| *total == 7))
        .await
        .expect("the cast bump(7) ran in time")
        .expect("the server is alive");
    answers = ask(&mut client, &[calc_request(13, "total", json!({}))]).await;
    assert_eq!(ok(&answers, 13), json!(7));
    client.finish().await;

    // With oslo's dispatcher module allowed, the Python client rebuilds the Rust
    // server's refusal as oslo's own UnsupportedVersion, from its arguments.
    let mut client = Peer::spawn(
        &python,
        &[
            "client",
            "--url",
            &url,
            "--topic",
            &topic,
            "--allow-exmod",
            "oslo_messaging.rpc.dispatcher",
        ],
    );
    answers = ask(
        &mut client,
        &[
            json!({"id": 1, "method": "add", "args": {"a": 1, "b": 1}, "namespace": "calc",
                   "version": "2.0", "timeout": 20}),
        ],
    )
    .await;
    let refused = error(&answers, 1);
    assert!(
        refused["mro"]
            .as_array()
            .is_some_and(|mro| mro.contains(&json!("UnsupportedVersion"))),
        "{refused}"
    );
    assert_eq!(
        (&refused["module"], &refused["version"], &refused["method"]),
        (
            &json!("oslo_messaging.rpc.dispatcher_Remote"),
            &json!("2.0"),
            &json!("add")
        ),
        "{refused}"
    );
    client.finish().await;
    server.shutdown().await.expect("shutdown");
}

/// Waits for the next `bump` event of either Python server: (server, by, total).
async fn next_bump(py1: &mut Peer, py2: &mut Peer) -> (String, u64, u64) {
    loop {
        // `next_line` is cancel-safe, so reading both peers in a race loses no line.
        let line = tokio::select! {
            line = py1.next(Duration::from_secs(20)) => line,
            line = py2.next(Duration::from_secs(20)) => line,
        };
        if line["event"] == "bump" {
            let number = |key: &str| line[key].as_u64().unwrap_or_else(|| panic!("{line}"));
            let server = line["server"].as_str().expect("server").to_owned();
            return (server, number("by"), number("total"));
        }
    }
}

async fn python_calc_server(python: &PathBuf, topic: &str, server: &str) -> Peer {
    python_server_with(python, topic, server, &["--endpoint", "calc"]).await
}

/// The macro-defined typed client calls oslo RPC servers `py1` and `py2`, whose
/// `calc` endpoint implements version 1.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_interop_typed_macro_client_calls_python_server() {
    let Some(_) = crate::amqp::backend().await else {
        return;
    };
    let Some(python) = python() else { return };
    let topic = format!("interop_typed_py_{}", &mqrpc::wire::new_id()[..12]);
    let (mut py1, mut py2) = tokio::join!(
        python_calc_server(&python, &topic, "py1"),
        python_calc_server(&python, &topic, "py2")
    );
    let transport = mqrpc::connect(&crate::amqp::url()).await.expect("RabbitMQ");
    let client = CalcClient::new(transport, Target::new(&topic)).timeout(Duration::from_secs(20));
    let ctx = Context::new().with("user", "rust");

    assert_eq!(client.add(&ctx, 2, 3).await.expect("add"), 5);
    // The renamed method and argument reach Python by their wire names.
    assert_eq!(client.sub(&ctx, 10, 3).await.expect("subtract"), 7);

    // `mul` was added in 1.2; the Python endpoint implements 1.1.
    let err = client.mul(&ctx, 6, 7).await.expect_err("1.1 refuses 1.2");
    assert!(
        matches!(&err, Error::UnsupportedVersion { version, method } if version == "1.2" && method == "mul"),
        "{err:?}"
    );
    // Asked for 1.1, the endpoint is compatible but has no `mul`.
    let err = client
        .prepare()
        .version(Version::new(1, 1))
        .mul(&ctx, 6, 7)
        .await
        .expect_err("no mul in Python");
    assert!(
        matches!(&err, Error::NoSuchMethod { method } if method == "mul"),
        "{err:?}"
    );

    // A Python ValueError: a remote failure of its class, not a CalcError.
    let err = client
        .fail(&ctx, "bad input".to_owned())
        .await
        .expect_err("ValueError");
    let remote = err.as_remote().unwrap_or_else(|| panic!("{err:?}"));
    assert_eq!(
        (
            remote.class.as_str(),
            remote.module.as_str(),
            remote.message.as_str()
        ),
        ("ValueError", "builtins", "bad input")
    );
    assert_eq!(err.decode_remote::<CalcError>(), None);

    // A call to a named server reaches that server only.
    for name in ["py2", "py1", "py2", "py1"] {
        let who = client
            .prepare()
            .server(name)
            .whoami(&ctx)
            .await
            .expect("whoami");
        assert_eq!(who, name);
    }

    // A cast reaches one server, which a follow-up call to it confirms.
    client.bump(&ctx, 5).await.expect("cast");
    let (first, by, after) = next_bump(&mut py1, &mut py2).await;
    assert_eq!((by, after), (5, 5));
    let counted = client
        .prepare()
        .server(first.as_str())
        .total(&ctx)
        .await
        .expect("total");
    assert_eq!(counted, 5, "{first} counted the cast");

    // A fanout cast reaches both.
    client
        .prepare()
        .fanout(true)
        .bump(&ctx, 2)
        .await
        .expect("fanout cast");
    let mut seen = vec![
        next_bump(&mut py1, &mut py2).await,
        next_bump(&mut py1, &mut py2).await,
    ];
    seen.sort();
    let expected_total = |server: &str| if server == first { 7 } else { 2 };
    assert_eq!(
        seen,
        ["py1", "py2"].map(|s| (s.to_owned(), 2, expected_total(s))),
        "the fanout reached each server once"
    );
    for name in ["py1", "py2"] {
        let counted = client
            .prepare()
            .server(name)
            .total(&ctx)
            .await
            .expect("total");
        assert_eq!(counted, expected_total(name), "{name}");
    }

    client.close().await;
    py1.finish().await;
    py2.finish().await;
}
