//! Traces over OTLP from the `mqrpc` binary: `serve` and `call` as separate
//! processes on NATS, each told by the standard `OTEL_*` variables to export to a
//! collector that this test plays (HTTP on loopback, answering 200 to
//! `POST /v1/traces`).
#![cfg(feature = "otel")]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader as AsyncBufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

mod common;

const MQRPC: &str = env!("CARGO_BIN_EXE_mqrpc");

/// The variables that would change what the test asks for, from the environment
/// the test runs in.
const INHERITED: [&str; 8] = [
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_COMPRESSION",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
];

fn nats_url() -> String {
    std::env::var("MQRPC_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

/// One request the collector received: its request line and its body.
struct Received {
    request_line: String,
    body: Vec<u8>,
}

/// A collector on loopback: every request it reads is sent on the channel and
/// answered 200 with an empty body (an empty `ExportTraceServiceResponse`, a full
/// success).
async fn collector() -> (String, mpsc::UnboundedReceiver<Received>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let (sender, received) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(answer(stream, sender.clone()));
        }
    });
    (format!("http://{addr}"), received)
}

/// Answers the requests of one connection (the exporter keeps it alive).
async fn answer(stream: TcpStream, received: mpsc::UnboundedSender<Received>) {
    let (read, mut write) = stream.into_split();
    let mut read = AsyncBufReader::new(read);
    loop {
        let mut request_line = String::new();
        if read.read_line(&mut request_line).await.unwrap_or(0) == 0 {
            return;
        }
        let mut length = 0usize;
        loop {
            let mut header = String::new();
            if read.read_line(&mut header).await.unwrap_or(0) == 0 {
                return;
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.trim().eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().expect("a content length");
            }
        }
        let mut body = vec![0; length];
        read.read_exact(&mut body).await.expect("the body");
        let _ = received.send(Received {
            request_line: request_line.trim_end().to_owned(),
            body,
        });
        let response = "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\n\
                        content-length: 0\r\n\r\n";
        if write.write_all(response.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Every request received so far.
fn drain(received: &mut mpsc::UnboundedReceiver<Received>) -> Vec<Received> {
    std::iter::from_fn(|| received.try_recv().ok()).collect()
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle.as_bytes())
}

/// Whether an OTLP protobuf body has the resource attribute `service.name = name`:
/// a `KeyValue` (key, field 1) whose `AnyValue` (field 2) is that string (field 1).
fn has_service_name(body: &[u8], name: &str) -> bool {
    let key = "service.name";
    let mut encoded = vec![0x0a, key.len() as u8];
    encoded.extend_from_slice(key.as_bytes());
    encoded.extend_from_slice(&[0x12, name.len() as u8 + 2, 0x0a, name.len() as u8]);
    encoded.extend_from_slice(name.as_bytes());
    body.windows(encoded.len()).any(|window| window == encoded)
}

/// `mqrpc` with the environment of a process that exports to `endpoint`.
fn mqrpc(endpoint: &str) -> Command {
    let mut command = Command::new(MQRPC);
    for name in INHERITED {
        command.env_remove(name);
    }
    command.env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint);
    command
}

/// A `mqrpc serve` killed if the test fails before it stops it.
struct Serving(Option<std::process::Child>);

impl Drop for Serving {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits for `child` to exit, killing it after `limit` (a hang, not a measurement).
fn wait(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("mqrpc did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// With `OTEL_EXPORTER_OTLP_ENDPOINT` set, `mqrpc call` sends its client span
/// (`add call`) before it exits, and `mqrpc serve`, stopped by SIGINT, sends its
/// server span (`add process`) under the service name `OTEL_SERVICE_NAME` gives;
/// both as OTLP protobuf to `/v1/traces`. With `OTEL_TRACES_EXPORTER=none` the call
/// sends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_and_call_export_their_spans_over_otlp() {
    let url = nats_url();
    if !common::broker_available("otel cli on nats", &url) {
        return;
    }
    let topic = format!("cli_otel_{}", std::process::id());
    let (server_endpoint, mut server_received) = collector().await;
    let (client_endpoint, mut client_received) = collector().await;

    let mut serve = mqrpc(&server_endpoint)
        .env("OTEL_SERVICE_NAME", "otel-test-server")
        .args(["serve", "--url", &url, "--topic", &topic, "--server", "s1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start mqrpc serve");
    let stdout = serve.stdout.take().expect("stdout");
    let mut serving = Serving(Some(serve));
    let ready = tokio::task::spawn_blocking(move || {
        let mut ready = String::new();
        BufReader::new(stdout)
            .read_line(&mut ready)
            .expect("read the ready line");
        ready
    })
    .await
    .expect("ready line");
    assert!(ready.contains("\"ready\""), "{ready:?}");

    let call = |extra_env: &[(&str, &str)]| {
        let mut command = mqrpc(&client_endpoint);
        command.envs(extra_env.iter().copied()).args([
            "call",
            "--url",
            &url,
            "--topic",
            &topic,
            "--timeout",
            "10s",
            "add",
            r#"{"a": 1, "b": 2}"#,
        ]);
        async move {
            tokio::task::spawn_blocking(move || command.output().expect("run mqrpc call"))
                .await
                .expect("mqrpc call")
        }
    };

    // Told not to export: nothing reaches the collector by the time it exits.
    let quiet = call(&[("OTEL_TRACES_EXPORTER", "none")]).await;
    assert!(quiet.status.success(), "{quiet:?}");
    assert!(drain(&mut client_received).is_empty());

    let output = call(&[]).await;
    assert!(output.status.success(), "{output:?}");
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "3");
    // The call flushed its spans before exiting.
    let client = drain(&mut client_received);
    assert!(!client.is_empty(), "the call exported nothing");
    for request in &client {
        assert_eq!(request.request_line, "POST /v1/traces HTTP/1.1");
    }
    assert!(
        client.iter().any(|r| contains(&r.body, "add call")),
        "no span `add call` from the client"
    );
    assert!(
        client.iter().any(|r| has_service_name(&r.body, "mqrpc")),
        "the default service name is missing"
    );

    // SIGINT: the server stops gracefully and sends what it holds.
    let mut serve = serving.0.take().expect("serving");
    let sent = Command::new("kill")
        .args(["-INT", &serve.id().to_string()])
        .status()
        .expect("run kill");
    assert!(sent.success());
    let status = tokio::task::spawn_blocking(move || wait(&mut serve, Duration::from_secs(30)))
        .await
        .expect("serve exited");
    assert!(status.success(), "{status:?}");
    let server = drain(&mut server_received);
    assert!(
        server
            .iter()
            .all(|r| r.request_line == "POST /v1/traces HTTP/1.1"),
        "{:?}",
        server.iter().map(|r| &r.request_line).collect::<Vec<_>>()
    );
    let processed: Vec<&Received> = server
        .iter()
        .filter(|r| contains(&r.body, "add process"))
        .collect();
    assert!(
        !processed.is_empty(),
        "no span `add process` from the server"
    );
    assert!(
        processed
            .iter()
            .any(|r| has_service_name(&r.body, "otel-test-server")),
        "OTEL_SERVICE_NAME is not the service name"
    );
    // The client's span went to its own collector, not the server's.
    assert!(!server.iter().any(|r| contains(&r.body, "add call")));
}
