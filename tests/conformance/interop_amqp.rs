//! Interop with Python oslo.messaging on the same RabbitMQ, both directions. The
//! Python peer is `tests/interop/oslo_peer.py`, run with the virtualenv that
//! `scripts/oslo-venv.sh` prepares (`MQRPC_OSLO_PYTHON` overrides the interpreter).

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use mqrpc::{Client, Context, Error, Server, Target, Version};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::service::{self, Recorder};

/// oslo.messaging's URL for the broker the Rust side uses.
pub(crate) fn oslo_url() -> String {
    let config = mqrpc::AmqpConfig::parse(&crate::amqp::url()).expect("AMQP URL");
    let host = &config.hosts[0];
    let vhost = if config.vhost == "/" {
        String::new()
    } else {
        config.vhost.clone()
    };
    format!(
        "rabbit://{}:{}@{}:{}/{}",
        host.username, host.password, host.host, host.port, vhost
    )
}

/// The Python interpreter with oslo.messaging. When it is missing: a failure, or
/// `None` after a recorded skip under `MQRPC_ALLOW_SKIP=1`.
pub(crate) fn python() -> Option<PathBuf> {
    let path = match std::env::var_os("MQRPC_OSLO_PYTHON") {
        Some(path) => PathBuf::from(path),
        None => {
            let venv = std::env::var_os("MQRPC_OSLO_VENV")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    let home = std::env::var_os("HOME").unwrap_or_default();
                    PathBuf::from(home).join(".cache/mqrpc/oslo-venv")
                });
            venv.join("bin/python")
        }
    };
    if path.exists() {
        return Some(path);
    }
    crate::skips::missing(
        "amqp interop",
        &format!(
            "the Python peer {} is missing; run scripts/oslo-venv.sh",
            path.display()
        ),
    );
    None
}

fn peer_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/interop/oslo_peer.py")
}

/// A running Python process speaking JSON lines.
pub(crate) struct Peer {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Peer {
    pub(crate) fn spawn(python: &PathBuf, args: &[&str]) -> Peer {
        let mut child = Command::new(python)
            .arg(peer_script())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start the Python peer");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout");
        Peer {
            child,
            stdin,
            lines: BufReader::new(stdout).lines(),
        }
    }

    /// The next JSON line, within `limit`.
    pub(crate) async fn next(&mut self, limit: Duration) -> Value {
        let line = tokio::time::timeout(limit, self.lines.next_line())
            .await
            .expect("the Python peer answered in time")
            .expect("read from the Python peer")
            .expect("the Python peer is still running");
        serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("not JSON from the peer: {line:?}: {e}"))
    }

    pub(crate) async fn send(&mut self, request: &Value) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        let mut line = request.to_string();
        line.push('\n');
        stdin
            .write_all(line.as_bytes())
            .await
            .expect("write to the Python peer");
        stdin.flush().await.expect("flush");
    }

    /// Closes stdin (the peer's signal to stop), reads every line it still prints
    /// until it exits, and checks it exits cleanly; returns those lines.
    pub(crate) async fn finish_reading(mut self) -> Vec<Value> {
        drop(self.stdin.take());
        let mut rest = Vec::new();
        let read = async {
            while let Some(line) = self.lines.next_line().await.expect("read from the peer") {
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("not JSON from the peer: {line:?}: {e}"));
                rest.push(value);
            }
        };
        tokio::time::timeout(Duration::from_secs(30), read)
            .await
            .expect("the Python peer stopped in time");
        self.finish().await;
        rest
    }

    /// Closes stdin (the peer's signal to stop) and checks it exits cleanly.
    pub(crate) async fn finish(mut self) {
        drop(self.stdin.take());
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("the Python peer stopped in time")
            .expect("wait for the Python peer");
        assert!(status.success(), "the Python peer exited with {status}");
    }
}

async fn python_server(python: &PathBuf, topic: &str, server: &str) -> Peer {
    python_server_with(python, topic, server, &[]).await
}

pub(crate) async fn python_server_with(
    python: &PathBuf,
    topic: &str,
    server: &str,
    extra: &[&str],
) -> Peer {
    let url = oslo_url();
    let mut args = vec![
        "server", "--url", &url, "--topic", topic, "--server", server,
    ];
    args.extend_from_slice(extra);
    let mut peer = Peer::spawn(python, &args);
    let ready = peer.next(Duration::from_secs(60)).await;
    assert_eq!(ready["event"], "ready", "{ready}");
    peer
}

/// An mqrpc server `rs1` of the test endpoint on `topic`, and its recorder.
pub(crate) async fn rust_server(topic: &str) -> (Server, Arc<Recorder>) {
    rust_server_on(&crate::amqp::url(), topic).await
}

/// [`rust_server`] on the broker of `url`.
async fn rust_server_on(url: &str, topic: &str) -> (Server, Arc<Recorder>) {
    let recorder = Recorder::new();
    let transport = mqrpc::connect(url).await.expect("RabbitMQ");
    let server = Server::builder(transport, Target::new(topic).server("rs1"))
        .endpoint(service::endpoint("rs1", &recorder))
        .start()
        .await
        .expect("server");
    (server, recorder)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_interop_mqrpc_client_calls_python_oslo_server() {
    let Some(_) = crate::amqp::backend().await else {
        return;
    };
    let Some(python) = python() else { return };
    let topic = format!("interop_py_{}", &mqrpc::wire::new_id()[..12]);
    let (mut py1, mut py2) = tokio::join!(
        python_server(&python, &topic, "py1"),
        python_server(&python, &topic, "py2")
    );
    let transport = mqrpc::connect(&crate::amqp::url()).await.expect("RabbitMQ");
    let client = Client::new(transport, Target::new(&topic)).timeout(Duration::from_secs(20));
    let ctx = Context::new()
        .with("user", "rust")
        .with("request_id", "req-interop");

    let sum: i64 = client
        .call(&ctx, "add", json!({"a": 2, "b": 3}))
        .await
        .expect("add");
    assert_eq!(sum, 5);
    let payload = json!({"nested": [1, "two", {"three": 3.5}], "unicode": "żółw"});
    let back: Value = client
        .call(&ctx, "echo", json!({ "payload": payload }))
        .await
        .expect("echo");
    assert_eq!(back, payload);
    let seen: Value = client
        .call(&ctx, "context", json!({}))
        .await
        .expect("context");
    assert_eq!(
        (seen["user"].as_str(), seen["request_id"].as_str()),
        (Some("rust"), Some("req-interop"))
    );

    // A call to a named server reaches that server only.
    for _ in 0..4 {
        let who: String = client
            .prepare()
            .server("py2")
            .call(&ctx, "whoami", json!({}))
            .await
            .expect("whoami");
        assert_eq!(who, "py2");
    }

    // Versions: the Python endpoint implements 1.3.
    let ok: i64 = client
        .prepare()
        .version(Version::new(1, 2))
        .call(&ctx, "add", json!({"a": 1, "b": 1}))
        .await
        .expect("1.2 is served by 1.3");
    assert_eq!(ok, 2);
    for refused in [Version::new(1, 4), Version::new(2, 0)] {
        let err = client
            .prepare()
            .version(refused)
            .call::<_, i64>(&ctx, "add", json!({"a": 1, "b": 1}))
            .await
            .expect_err("unsupported");
        assert!(
            matches!(&err, Error::UnsupportedVersion { version, method } if *version == refused.to_string() && method == "add"),
            "{refused}: {err:?}"
        );
    }
    for missing in ["_private", "no_such_thing"] {
        let err = client
            .call::<_, Value>(&ctx, missing, json!({}))
            .await
            .expect_err("missing");
        assert!(
            matches!(&err, Error::NoSuchMethod { method } if method == missing),
            "{err:?}"
        );
    }

    // A Python ValueError arrives with its class, module and traceback.
    let err = client
        .call::<_, Value>(&ctx, "fail", json!({"message": "bad thing"}))
        .await
        .expect_err("ValueError");
    let remote = err.as_remote().expect("remote error");
    assert_eq!(
        (remote.class.as_str(), remote.module.as_str()),
        ("ValueError", "builtins")
    );
    assert_eq!(remote.message, "bad thing");
    assert!(
        remote
            .traceback
            .iter()
            .any(|line| line.contains("ValueError")),
        "{remote:?}"
    );

    // Python's server heartbeats keep a call alive past the monitor interval.
    let slept: f64 = client
        .prepare()
        .call_monitor(Some(Duration::from_secs(2)))
        .call(&ctx, "sleep", json!({"seconds": 3.0}))
        .await
        .expect("heartbeats from Python");
    assert_eq!(slept, 3.0);

    // A cast reaches one of the two servers; a fanout cast reaches both.
    client
        .cast(&ctx, "record", json!({"id": 1}))
        .await
        .expect("cast");
    client
        .prepare()
        .fanout(true)
        .cast(&ctx, "record", json!({"id": 2}))
        .await
        .expect("fanout cast");
    let mut ids = Vec::new();
    while ids.len() < 3 {
        // `next_line` is cancel-safe, so reading both peers in a race loses no line.
        let line = tokio::select! {
            line = py1.next(Duration::from_secs(20)) => line,
            line = py2.next(Duration::from_secs(20)) => line,
        };
        if line["event"] == "record" {
            ids.push(line["id"].as_i64().expect("record id"));
        }
    }
    ids.sort();
    assert_eq!(ids, vec![1, 2, 2], "one cast and a fanout to two servers");

    py1.finish().await;
    py2.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_interop_python_oslo_client_calls_mqrpc_server() {
    let Some(_) = crate::amqp::backend().await else {
        return;
    };
    let Some(python) = python() else { return };
    let topic = format!("interop_rs_{}", &mqrpc::wire::new_id()[..12]);
    let (server, recorder) = rust_server(&topic).await;
    let url = oslo_url();
    let mut client = Peer::spawn(&python, &["client", "--url", &url, "--topic", &topic]);
    let requests = [
        json!({"id": 1, "method": "add", "args": {"a": 40, "b": 2}, "timeout": 20}),
        json!({"id": 2, "method": "echo", "args": {"payload": {"k": [1, 2, "drei"]}}, "timeout": 20}),
        json!({"id": 3, "method": "no_such_thing", "timeout": 20}),
        json!({"id": 4, "method": "value_error", "timeout": 20}),
        json!({"id": 5, "method": "sleep", "args": {"seconds": 4.5}, "timeout": 3600, "call_monitor_timeout": 2}),
        json!({"id": 6, "method": "add", "args": {"a": 1, "b": 1}, "version": "1.2", "timeout": 20}),
        json!({"id": 7, "method": "add", "args": {"a": 1, "b": 1}, "version": "1.4", "timeout": 20}),
        json!({"id": 8, "method": "whoami", "server": "rs1", "timeout": 20}),
        json!({"id": 9, "method": "context", "context": {"user": "py", "roles": ["admin"]}, "timeout": 20}),
        json!({"id": 10, "method": "record", "args": {"id": 77}, "cast": true}),
        json!({"id": 11, "method": "record", "args": {"id": 78}, "cast": true, "fanout": true}),
    ];
    let mut answers = std::collections::HashMap::new();
    for request in &requests {
        client.send(request).await;
        let answer = client.next(Duration::from_secs(60)).await;
        answers.insert(answer["id"].as_i64().expect("id"), answer);
    }
    let ok = |id: i64| {
        answers[&id]
            .get("ok")
            .cloned()
            .unwrap_or_else(|| panic!("request {id} failed: {}", answers[&id]))
    };
    let error = |id: i64| {
        answers[&id]
            .get("error")
            .cloned()
            .unwrap_or_else(|| panic!("request {id} succeeded: {}", answers[&id]))
    };

    assert_eq!(ok(1), json!(42));
    assert_eq!(ok(2), json!({"k": [1, 2, "drei"]}));
    let missing = error(3);
    assert_eq!(missing["type"], "RemoteError", "{missing}");
    assert!(
        missing["message"]
            .as_str()
            .is_some_and(|m| m.contains("NoSuchMethod")),
        "{missing}"
    );
    let value_error = error(4);
    assert_eq!(value_error["type"], "ValueError", "{value_error}");
    assert_eq!(value_error["is_value_error"], true);
    assert!(
        value_error["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("bad value")),
        "{value_error}"
    );
    assert_eq!(
        ok(5),
        json!(4.5),
        "heartbeats keep Python's monitored call alive"
    );
    assert_eq!(ok(6), json!(2));
    let unsupported = error(7);
    assert!(
        unsupported["message"]
            .as_str()
            .is_some_and(|m| m.contains("UnsupportedVersion")),
        "{unsupported}"
    );
    assert_eq!(ok(8), json!("rs1"));
    let context = ok(9);
    assert_eq!(
        (context["user"].clone(), context["roles"].clone()),
        (json!("py"), json!(["admin"]))
    );
    assert_eq!(ok(10), Value::Null);
    recorder.wait_for(2, Duration::from_secs(20)).await;
    client.finish().await;
    server.shutdown().await.expect("shutdown");
}

/// oslo.messaging with `kombu_compression = gzip` sends zlib bodies, with `bzip2`
/// bzip2 bodies, each with a `compression` header: its replies reach an mqrpc
/// client, its requests an mqrpc server, both inflated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_interop_reads_kombu_compressed_bodies() {
    let Some(_) = crate::amqp::backend().await else {
        return;
    };
    let Some(python) = python() else { return };
    // Large and repetitive, so compression is certain to change it.
    let payload = json!({"text": "compressible ".repeat(400)});
    for compression in ["gzip", "bzip2"] {
        let topic = format!("interop_{compression}_{}", &mqrpc::wire::new_id()[..12]);
        let python_compresses = ["--compression", compression];
        echo_both_ways(
            &python,
            &topic,
            &crate::amqp::url(),
            &python_compresses,
            &payload,
        )
        .await;
    }
}

/// `echo(payload)` from an mqrpc client on `url` to a Python server, then from a
/// Python client to an mqrpc server on `url`; the Python peers run with
/// `python_options`.
async fn echo_both_ways(
    python: &PathBuf,
    topic: &str,
    url: &str,
    python_options: &[&str],
    payload: &Value,
) {
    let py = python_server_with(python, topic, "py1", python_options).await;
    let transport = mqrpc::connect(url).await.expect("RabbitMQ");
    let client = Client::new(transport, Target::new(topic)).timeout(Duration::from_secs(20));
    let back: Value = client
        .call(&Context::new(), "echo", json!({ "payload": payload }))
        .await
        .unwrap_or_else(|e| panic!("{url} {python_options:?}: a Python server answers: {e}"));
    assert_eq!(&back, payload, "{url} {python_options:?}");
    py.finish().await;

    let (server, _recorder) = rust_server_on(url, topic).await;
    let oslo = oslo_url();
    let mut args = vec!["client", "--url", &oslo, "--topic", topic];
    args.extend_from_slice(python_options);
    let mut client = Peer::spawn(python, &args);
    client
        .send(&json!({"id": 1, "method": "echo", "args": {"payload": payload}, "timeout": 20}))
        .await;
    let answer = client.next(Duration::from_secs(60)).await;
    assert_eq!(&answer["ok"], payload, "{url} {python_options:?}: {answer}");
    client.finish().await;
    server.shutdown().await.expect("shutdown");
}

/// With `compression=gzip` or `bzip2` (oslo's `kombu_compression`), mqrpc sends every
/// body compressed, with kombu's `compression` header; Python peers that compress
/// nothing themselves read those requests and replies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_interop_python_peers_read_what_mqrpc_compresses() {
    use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
    use lapin::types::{AMQPValue, FieldTable};

    let Some(_) = crate::amqp::backend().await else {
        return;
    };
    let payload = json!({"text": "compressible ".repeat(400)});
    let base = crate::amqp::url();
    let joiner = if base.contains('?') { '&' } else { '?' };
    // On the wire: a cast lands in a queue of this test's own, read as it is.
    // lapin reads an empty path as the vhost "", where oslo (and mqrpc) read `/`.
    let raw_url = match base.strip_suffix('/') {
        Some(host) if !host.ends_with('/') => format!("{host}/%2f"),
        _ => base.clone(),
    };
    let raw = lapin::Connection::connect(&raw_url, lapin::ConnectionProperties::default())
        .await
        .expect("RabbitMQ");
    let channel = raw.create_channel().await.expect("a channel");
    for (compression, header, magic) in [
        ("gzip", "application/x-gzip", &b"\x78"[..]),
        ("bzip2", "application/x-bz2", &b"BZh"[..]),
    ] {
        let url = format!("{base}{joiner}compression={compression}");
        let topic = format!(
            "interop_send_{compression}_{}",
            &mqrpc::wire::new_id()[..12]
        );
        let transport = mqrpc::connect(&url).await.expect("RabbitMQ");
        let caster = Client::new(transport, Target::new(&topic));
        // The first cast declares the exchange; no queue is bound to the topic yet,
        // so the broker returns it.
        let err = caster
            .cast(&Context::new(), "echo", json!({}))
            .await
            .expect_err("nobody listens yet");
        assert!(matches!(err, Error::NoResponders { .. }), "{err:?}");
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("a queue");
        channel
            .queue_bind(
                queue.name().clone(),
                mqrpc::DEFAULT_EXCHANGE.into(),
                topic.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bound");
        caster
            .cast(&Context::new(), "echo", json!({ "payload": payload }))
            .await
            .expect("cast");
        let message = loop {
            let got = channel
                .basic_get(queue.name().clone(), BasicGetOptions { no_ack: true })
                .await
                .expect("basic.get");
            if let Some(message) = got {
                break message;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let named = message
            .delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("compression").cloned());
        assert_eq!(
            named,
            Some(AMQPValue::LongString(header.into())),
            "{compression}"
        );
        assert!(
            message.delivery.data.starts_with(magic),
            "{compression}: not compressed"
        );

        // Python peers that compress nothing read the request and the reply.
        if let Some(python) = python() {
            echo_both_ways(&python, &topic, &url, &[], &payload).await;
        }
    }
}

/// With `transient_quorum=true` on both sides (oslo's `rabbit_transient_quorum_queue`),
/// an oslo server and an mqrpc server share a topic: both declare its fanout exchange
/// alike (durable, as oslo declares it; a `durable` mismatch is a 406 that closes the
/// channel), calls reach either through quorum reply queues, and a fanout cast from
/// either side reaches both servers. On a topic of its own, so the shared vhost keeps
/// no other declaration of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_interop_transient_quorum_fanout_with_oslo() {
    let Some(_) = crate::amqp::backend().await else {
        return;
    };
    let Some(python) = python() else { return };
    let topic = format!("interop_tq_{}", &mqrpc::wire::new_id()[..12]);
    let base = crate::amqp::url();
    let joiner = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{joiner}transient_quorum=true");

    // The oslo server first: its fanout exchange exists when mqrpc declares it.
    let mut py = python_server_with(&python, &topic, "py1", &["--transient-quorum"]).await;
    let (server, recorder) = rust_server_on(&url, &topic).await;
    let transport = mqrpc::connect(&url).await.expect("RabbitMQ");
    let client = Client::new(transport, Target::new(&topic)).timeout(Duration::from_secs(20));
    let ctx = Context::new();
    for name in ["py1", "rs1"] {
        let who: String = client
            .prepare()
            .server(name)
            .call(&ctx, "whoami", json!({}))
            .await
            .unwrap_or_else(|e| panic!("a call to {name}: {e}"));
        assert_eq!(who, name);
    }
    // mqrpc's publisher declares the fanout exchange too, on its own channel.
    client
        .prepare()
        .fanout(true)
        .cast(&ctx, "record", json!({"id": 1}))
        .await
        .expect("fanout cast from mqrpc");

    let oslo = oslo_url();
    let mut py_client = Peer::spawn(
        &python,
        &[
            "client",
            "--url",
            &oslo,
            "--topic",
            &topic,
            "--transient-quorum",
        ],
    );
    let requests = [
        json!({"id": 1, "method": "whoami", "server": "rs1", "timeout": 20}),
        json!({"id": 2, "method": "whoami", "server": "py1", "timeout": 20}),
        json!({"id": 3, "method": "record", "args": {"id": 2}, "cast": true, "fanout": true}),
    ];
    for request in &requests {
        py_client.send(request).await;
        let answer = py_client.next(Duration::from_secs(60)).await;
        assert!(answer.get("error").is_none(), "{request}: {answer}");
        if request["method"] == "whoami" {
            assert_eq!(answer["ok"], request["server"], "{answer}");
        }
    }
    // Each fanout reached both servers.
    let mut python_ids = Vec::new();
    while python_ids.len() < 2 {
        let line = py.next(Duration::from_secs(20)).await;
        if line["event"] == "record" {
            python_ids.push(line["id"].as_i64().expect("record id"));
        }
    }
    python_ids.sort();
    assert_eq!(python_ids, vec![1, 2], "the oslo server got both fanouts");
    recorder.wait_for(2, Duration::from_secs(20)).await;
    let mut rust_ids = recorder.settled_ids(Duration::from_millis(300)).await;
    rust_ids.sort();
    assert_eq!(rust_ids, vec![1, 2], "the mqrpc server got both fanouts");

    py_client.finish().await;
    py.finish().await;
    server.shutdown().await.expect("shutdown");
}
