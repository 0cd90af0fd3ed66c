//! The `mqrpc` binary as an operator runs it: `serve` and `call`/`cast`/`multicall`/
//! `listen` as separate processes on a broker (NATS), `bench` on the memory bus, the
//! memory bus refused or warned about where a command needs another process;
//! `--timeout` bounding the connection, `serve` stopped by signals, and logs that
//! never show the AMQP password.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

mod common;

use common::{MQRPC, Serving, amqp_url, broker_available, mqrpc, nats_url, serve_as};

fn nats_available() -> bool {
    broker_available("cli on nats", &nats_url())
}

/// `mqrpc serve` as server `s1` of `topic`, once it says it is ready.
fn serve(url: &str, topic: &str, extra: &[&str]) -> Serving {
    serve_as(url, topic, "s1", extra)
}

/// An address on loopback that nothing listens on now.
fn free_local_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("its address").to_string()
}

/// The text of `GET /metrics` at `addr`.
#[cfg(feature = "metrics")]
fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("the metrics listener answers");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(
        head.starts_with("HTTP/1.") && head.contains(" 200 "),
        "{head}"
    );
    body.to_owned()
}

/// The value of the series `name` whose labels include every one of `labels`
/// (`key="value"`), if the scrape has it.
#[cfg(feature = "metrics")]
fn series(scraped: &str, name: &str, labels: &[&str]) -> Option<f64> {
    scraped
        .lines()
        .filter(|line| line.starts_with(&format!("{name}{{")))
        .find(|line| labels.iter().all(|label| line.contains(label)))
        .and_then(|line| line.rsplit(' ').next())
        .map(|value| value.parse().expect("a number"))
}

/// `serve --metrics-addr` serves Prometheus's text format; the calls and casts made
/// meanwhile (separate processes) move its counters, by method and outcome, and a
/// method the server does not have counts as `_other`.
#[cfg(feature = "metrics")]
#[test]
fn serve_exports_metrics_that_count_the_calls() {
    if !nats_available() {
        return;
    }
    let url = nats_url();
    let topic = format!("cli_metrics_{}", std::process::id());
    let addr = free_local_addr();
    let serving = serve(&url, &topic, &["--metrics-addr", &addr]);
    let topic_label = format!("topic=\"{topic}\"");
    let handled = |scraped: &str, method: &str, outcome: &str| {
        let method = format!("method=\"{method}\"");
        let outcome = format!("outcome=\"{outcome}\"");
        series(
            scraped,
            "rpc_server_call_duration_seconds_count",
            &[&topic_label, &method, &outcome],
        )
        .unwrap_or(0.0)
    };
    let before = scrape(&addr);
    assert_eq!(handled(&before, "add", "ok"), 0.0, "{before}");

    let common = [
        "--url",
        url.as_str(),
        "--topic",
        topic.as_str(),
        "--timeout",
        "10s",
    ];
    let run = |command: &str, method: &str, args: &str| {
        let mut all = vec![command];
        all.extend_from_slice(&common);
        all.extend_from_slice(&[method, args]);
        mqrpc(&all).0
    };
    for _ in 0..3 {
        assert_eq!(run("call", "add", r#"{"a": 1, "b": 2}"#), 0);
    }
    assert_eq!(run("call", "fail", r#"{"message": "boom"}"#), 1);
    assert_eq!(run("call", "no_such_thing", "{}"), 1);
    for _ in 0..2 {
        assert_eq!(run("cast", "bump", "{}"), 0);
    }
    let after = scrape(&addr);
    assert_eq!(handled(&after, "add", "ok"), 3.0, "{after}");
    assert_eq!(handled(&after, "fail", "error"), 1.0, "{after}");
    assert_eq!(handled(&after, "_other", "no_such_method"), 1.0, "{after}");
    assert!(!after.contains("no_such_thing"), "{after}");
    assert!(
        after.contains("# TYPE rpc_server_call_duration_seconds histogram"),
        "{after}"
    );
    assert!(
        series(
            &after,
            "rpc_server_call_duration_seconds_bucket",
            &[&topic_label]
        )
        .is_some(),
        "{after}"
    );
    assert!(
        series(&after, "mqrpc_server_held_bytes", &[&topic_label]).is_some(),
        "{after}"
    );
    // Casts are handled after their senders exit, in their own time.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let scraped = scrape(&addr);
        if handled(&scraped, "bump", "ok") == 2.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the casts were not counted: {scraped}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(serving);
}

/// Built without the feature `metrics`, `--metrics-addr` fails at once, saying why,
/// instead of serving without the metrics asked for.
#[cfg(not(feature = "metrics"))]
#[test]
fn metrics_addr_needs_the_feature() {
    let addr = free_local_addr();
    // Refused before connecting: no broker is needed.
    let (status, _, stderr) = mqrpc(&[
        "serve",
        "--url",
        "nats://127.0.0.1:1",
        "--topic",
        "t",
        "--metrics-addr",
        &addr,
    ]);
    assert_eq!(status, 2, "{stderr}");
    assert!(stderr.contains("built without metrics"), "{stderr}");
}

/// `serve`, then every client command and a listener, each as its own process.
#[test]
fn serve_and_call_as_processes_on_nats() {
    if !nats_available() {
        return;
    }
    let url = nats_url();
    let topic = format!("cli_{}", std::process::id());
    let serving = serve(&url, &topic, &[]);

    let common = [
        "--url",
        url.as_str(),
        "--topic",
        topic.as_str(),
        "--timeout",
        "10s",
    ];
    let call = |method: &str, args: &str, extra: &[&str]| {
        let mut all = vec!["call"];
        all.extend_from_slice(&common);
        all.extend_from_slice(extra);
        all.extend_from_slice(&[method, args]);
        mqrpc(&all)
    };

    // A listener sees the traffic without taking it from the server.
    let mut listener = Command::new(MQRPC)
        .args(["listen", "--url", &url, "--topic", &topic, "--count", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start mqrpc listen");
    let mut started = String::new();
    BufReader::new(listener.stderr.take().expect("stderr"))
        .read_line(&mut started)
        .expect("the listener says it listens");
    assert!(started.contains("listening"), "{started:?}");

    let (code, out, _) = call("add", r#"{"a": 1, "b": 2}"#, &[]);
    assert_eq!((code, out.trim()), (0, "3"));
    let seen = listener
        .wait_with_output()
        .expect("listener ends after one message");
    let line: serde_json::Value = serde_json::from_slice(&seen.stdout).expect("a JSON line");
    assert_eq!(
        (line["method"].as_str(), line["kind"].as_str()),
        (Some("add"), Some("call"))
    );
    assert_eq!(line["args"], serde_json::json!({"a": 1, "b": 2}));
    let (code, out, _) = call(
        "echo",
        r#"{"payload": {"k": [1, "x"]}}"#,
        &["--server", "s1"],
    );
    assert_eq!((code, out.trim()), (0, r#"{"k":[1,"x"]}"#));
    let (code, out, _) = call("fail", r#"{"message": "boom"}"#, &[]);
    assert_eq!(code, 1);
    let error: serde_json::Value = serde_json::from_str(out.trim()).expect("JSON error");
    assert_eq!(error["error"]["class"], "ValueError");
    assert_eq!(error["error"]["module"], "builtins");
    assert_eq!(error["error"]["message"], "boom");
    let (code, _, err) = call("add", "{}", &["--version", "2.0"]);
    assert_eq!(code, 1);
    assert!(err.contains("version 2.0"), "{err}");

    let mut multicall = vec!["multicall"];
    multicall.extend_from_slice(&common);
    multicall.extend_from_slice(&["count", r#"{"n": 3}"#]);
    let (code, out, _) = mqrpc(&multicall);
    assert_eq!(
        (code, out.lines().collect::<Vec<_>>()),
        (0, vec!["0", "1", "2"])
    );
    // The demo's streams are capped: count(n) streams at most 10 000 items.
    let counted = |n: u64| {
        let mut all = vec!["multicall"];
        all.extend_from_slice(&common);
        let args = format!(r#"{{"n": {n}}}"#);
        all.extend_from_slice(&["count", &args]);
        mqrpc(&all)
    };
    let (code, out, err) = counted(10_000);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 10_000);
    assert_eq!(out.lines().last(), Some("9999"));
    let (code, out, err) = counted(10_001);
    assert_eq!(code, 1, "{out} {err}");
    let error: serde_json::Value = serde_json::from_str(out.trim()).expect("JSON error");
    assert_eq!(error["error"]["class"], "ValueError");
    assert_eq!(
        error["error"]["message"],
        "n must be at most 10000, not 10001"
    );

    let mut cast = vec!["cast"];
    cast.extend_from_slice(&common);
    cast.push("bump");
    assert_eq!(mqrpc(&cast).0, 0);
    // The cast and the next call may be handled in either order: wait for the count.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, out, _) = call("bumps", "{}", &[]);
        assert_eq!(code, 0);
        if out.trim() == "1" {
            break;
        }
        assert!(Instant::now() < deadline, "the cast was not handled: {out}");
        std::thread::sleep(Duration::from_millis(50));
    }

    let (code, _, err) = mqrpc(&[
        "call",
        "--url",
        &url,
        "--topic",
        &format!("{topic}_nobody"),
        "--timeout",
        "1s",
        "add",
        "{}",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("no server listens"), "{err}");
    drop(serving);
}

#[test]
fn signed_serve_and_call_as_processes_on_nats() {
    if !nats_available() {
        return;
    }
    let url = nats_url();
    let topic = format!("cli_signed_{}", std::process::id());
    let dir = std::env::temp_dir().join(format!("mqrpc-cli-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("key directory");
    let key = dir.join("k1.key");
    let wrong = dir.join("wrong.key");
    std::fs::write(&key, "a shared secret of thirty-two b.\n").expect("key");
    std::fs::write(&wrong, "not the shared secret, 32 bytes.").expect("key");
    let key_path = key.display().to_string();
    let serving = serve(
        &url,
        &topic,
        &["--auth-key-id", "k1", "--auth-key-file", &key_path],
    );
    let call = |auth: &[&str]| {
        let mut all = vec!["call", "--url", &url, "--topic", &topic, "--timeout", "10s"];
        all.extend_from_slice(auth);
        all.extend_from_slice(&["add", r#"{"a": 2, "b": 2}"#]);
        mqrpc(&all)
    };
    let (code, out, err) = call(&["--auth-key-id", "k1", "--auth-key-file", &key_path]);
    assert_eq!((code, out.trim()), (0, "4"), "{err}");
    let (code, _, err) = call(&[]);
    assert_eq!(code, 1);
    assert!(err.contains("message authentication failed"), "{err}");
    let wrong_path = wrong.display().to_string();
    let (code, _, err) = call(&["--auth-key-id", "k1", "--auth-key-file", &wrong_path]);
    assert_eq!(code, 1);
    assert!(err.contains("does not verify"), "{err}");
    drop(serving);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The memory bus lives inside one process: a client command refuses it, saying
/// why, instead of waiting out its timeout for a server that cannot exist.
#[test]
fn client_commands_refuse_the_memory_bus_at_once() {
    for command in ["call", "cast", "multicall"] {
        let (code, stdout, stderr) = mqrpc(&[
            command,
            "--url",
            "memory://",
            "--topic",
            "t",
            "--timeout",
            "30s",
            "echo",
            "{}",
        ]);
        assert_eq!(code, 2, "{command}: {stdout} {stderr}");
        // A timeout would exit with 1 and name the deadline.
        assert!(stderr.contains("inside one process"), "{command}: {stderr}");
        assert!(
            stderr.contains("nats://127.0.0.1:4222"),
            "{command}: {stderr}"
        );
    }
}

/// `serve` and `listen` on the memory bus run (alone in their process) and warn
/// that no other command can reach them.
#[test]
fn serve_and_listen_on_the_memory_bus_warn_that_they_are_alone() {
    for command in [
        &["serve", "--url", "memory://", "--topic", "t"][..],
        &["listen", "--url", "memory://", "--topic", "t"][..],
    ] {
        let mut child = Command::new(MQRPC)
            .args(command)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start mqrpc");
        let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
        let mut warning = String::new();
        stderr.read_line(&mut warning).expect("the warning");
        let mut started = String::new();
        stderr.read_line(&mut started).expect("the start line");
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            warning.contains("warning: memory:// is a bus inside one process"),
            "{command:?}: {warning:?}"
        );
        assert!(
            started.contains("serving topic t") || started.contains("listening on topic t"),
            "{command:?}: {started:?}"
        );
    }
}

/// A second `serve` on a topic joins the first: the two compete for the topic's
/// calls, each answers calls directed at it, and the topic is served on when the
/// first one goes away.
#[test]
fn a_second_serve_on_a_topic_joins_the_first() {
    if !nats_available() {
        return;
    }
    let url = nats_url();
    let topic = format!("cli_two_{}", std::process::id());
    let first = serve(&url, &topic, &[]);
    let second = serve_as(&url, &topic, "s2", &[]);
    let echo = |payload: &str, server: &[&str]| {
        let mut all = vec!["call", "--url", &url, "--topic", &topic, "--timeout", "5s"];
        all.extend_from_slice(server);
        all.extend_from_slice(&["echo", payload]);
        mqrpc(&all)
    };
    for server in ["s1", "s2"] {
        let (code, out, err) = echo(r#"{"payload": "hi"}"#, &["--server", server]);
        assert_eq!((code, out.trim()), (0, "\"hi\""), "{server}: {err}");
    }
    // The first server dies: the second one goes on. A call the broker routed to
    // the dead one before it noticed the closed connection is lost (core NATS is
    // at most once), so the call is tried again until its deadline.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, out, err) = echo(r#"{"payload": 7}"#, &[]);
        if code == 0 {
            assert_eq!(out.trim(), "7");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the second server did not answer: {err}"
        );
    }
    drop(second);
}

#[test]
fn bench_runs_on_the_memory_bus_and_writes_its_files() {
    let out = std::env::temp_dir().join(format!("mqrpc-bench-{}", std::process::id()));
    let (code, stdout, stderr) = mqrpc(&[
        "bench",
        "--url",
        "memory://",
        "--quick",
        "--concurrency",
        "1,8",
        "--servers",
        "1,2",
        "--rounds",
        "2",
        "--out",
        out.to_str().expect("utf-8 path"),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("| calls/s at concurrency 8 |"), "{stdout}");
    assert!(
        stdout.contains("Latency percentiles over the calls of all 2 rounds together"),
        "{stdout}"
    );
    assert!(stdout.contains("medians of the 2 rounds"), "{stdout}");
    assert!(stdout.contains("latency p50"), "{stdout}");
    let json: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out.join("bench-memory.json")).expect("json written"),
    )
    .expect("json");
    assert!(
        json["mqrpc"]["throughput"][1]["calls_per_s"]
            .as_f64()
            .is_some_and(|r| r > 0.0)
    );
    // The medians come with each round's own figures.
    assert_eq!(json["rounds"], 2);
    // Latency is taken over both rounds' calls (200 a round with --quick).
    assert_eq!(json["mqrpc"]["latency"]["calls"], 400, "{json}");
    assert_eq!(json["rounds_mqrpc"][0]["latency"]["calls"], 200, "{json}");
    let rounds = json["rounds_mqrpc"].as_array().expect("rounds_mqrpc");
    assert_eq!(rounds.len(), 2);
    assert!(rounds.iter().all(|r| {
        r["throughput"][1]["calls_per_s"]
            .as_f64()
            .is_some_and(|r| r > 0.0)
    }));
    assert_eq!(json["servers_in"], "bench");
    assert_fairness_adds_up(&json["mqrpc"]["fairness"], 50, "memory");
    let svg = std::fs::read_to_string(out.join("bench-memory.svg")).expect("svg written");
    assert!(svg.contains("<svg"));
    let _ = std::fs::remove_dir_all(out);
}

/// The calls each server of a fairness figure handled add up to the calls the client
/// made: every call counted once, by the server that handled it.
fn assert_fairness_adds_up(fairness: &serde_json::Value, servers: usize, what: &str) {
    let handled: Vec<u64> = (fairness["handled"].as_array())
        .unwrap_or_else(|| panic!("{what}: no fairness figure: {fairness}"))
        .iter()
        .map(|n| n.as_u64().expect("a count"))
        .collect();
    assert_eq!(handled.len(), servers, "{what}: {fairness}");
    let calls = fairness["calls"].as_u64().expect("calls");
    assert!(calls >= 200, "{what}: {fairness}");
    assert_eq!(handled.iter().sum::<u64>(), calls, "{what}: {fairness}");
    assert_eq!(
        fairness["busiest"].as_u64(),
        handled.iter().max().copied(),
        "{what}"
    );
}

/// `--servers-in child`: the servers run in a child `mqrpc serve --instances N`
/// process; every figure is there, the report says where the servers ran, and the
/// competing servers' counts (asked of each server in the child) and the bare
/// consumers' add up to the calls made.
#[test]
fn bench_runs_its_servers_in_a_child_process() {
    if !nats_available() {
        return;
    }
    let out = std::env::temp_dir().join(format!("mqrpc-bench-child-{}", std::process::id()));
    let (code, stdout, stderr) = mqrpc(&[
        "bench",
        "--url",
        &nats_url(),
        "--raw",
        "--quick",
        "--concurrency",
        "8",
        "--payloads",
        "100",
        "--servers",
        "1,3",
        "--fairness",
        "5",
        "--servers-in",
        "child",
        "--out",
        out.to_str().expect("utf-8 path"),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("servers in a child process"), "{stdout}");
    assert!(
        stdout.contains("| 3 competing servers / 1 server (calls/s) |"),
        "{stdout}"
    );
    assert!(
        stdout.contains("| busiest / quietest of 5 competing servers"),
        "{stdout}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("bench-nats.json")).expect("json written"))
            .expect("json");
    assert_eq!(json["servers_in"], "child");
    for side in ["mqrpc", "raw"] {
        let servers = json[side]["servers"].as_array().expect("servers");
        assert_eq!(servers.len(), 2, "{side}: {servers:?}");
        assert!(
            servers
                .iter()
                .all(|r| r["calls_per_s"].as_f64() > Some(0.0))
        );
        assert_fairness_adds_up(&json[side]["fairness"], 5, side);
    }
    assert!(json["mqrpc"]["throughput"][0]["calls_per_s"].as_f64() > Some(0.0));
    assert!(json["mqrpc"]["casts_per_s"].as_f64() > Some(0.0));
    let _ = std::fs::remove_dir_all(out);
}

/// The memory bus cannot reach another process: `--servers-in child` (or `both`)
/// says so at once.
#[test]
fn bench_refuses_child_servers_on_the_memory_bus() {
    for placement in ["child", "both"] {
        let (code, _, stderr) = mqrpc(&[
            "bench",
            "--url",
            "memory://",
            "--quick",
            "--servers-in",
            placement,
        ]);
        assert_eq!(code, 2, "{placement}: {stderr}");
        assert!(
            stderr.contains("--servers-in bench"),
            "{placement}: {stderr}"
        );
    }
}

/// `serve --instances 3`: three servers in one process, named `<server>-0`..., each
/// answering calls directed at it; `echoes()` counts each one's echo calls. With
/// `--stop-at-stdin-end`, closing its stdin stops it (the way `bench` stops it).
#[test]
fn serve_runs_several_instances_in_one_process() {
    if !nats_available() {
        return;
    }
    let url = nats_url();
    let topic = format!("cli_instances_{}", std::process::id());
    let mut child = Command::new(MQRPC)
        .args(["serve", "--url", &url, "--topic", &topic])
        .args([
            "--server",
            "multi",
            "--instances",
            "3",
            "--stop-at-stdin-end",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start mqrpc serve");
    let stdout = child.stdout.take().expect("stdout");
    let mut serving = Serving(child);
    let mut ready = String::new();
    BufReader::new(stdout)
        .read_line(&mut ready)
        .expect("read the ready line");
    let ready: serde_json::Value = serde_json::from_str(&ready).expect("a JSON ready line");
    assert_eq!(
        ready["servers"],
        serde_json::json!(["multi-0", "multi-1", "multi-2"])
    );
    let call = |server: Option<&str>, method: &str, args: &str| {
        let mut all = vec!["call", "--url", &url, "--topic", &topic, "--timeout", "10s"];
        if let Some(server) = server {
            all.extend(["--server", server]);
        }
        all.extend([method, args]);
        mqrpc(&all)
    };
    let (code, out, err) = call(Some("multi-1"), "echo", r#"{"payload": "x"}"#);
    assert_eq!((code, out.trim()), (0, r#""x""#), "{err}");
    let echoes: Vec<String> = ["multi-0", "multi-1", "multi-2"]
        .into_iter()
        .map(|server| call(Some(server), "echoes", "{}").1.trim().to_owned())
        .collect();
    assert_eq!(echoes, ["0", "1", "0"]);
    drop(serving.0.stdin.take());
    let stopped = exit_within(&mut serving.0, Duration::from_secs(15));
    assert!(stopped.is_some_and(|s| s.success()), "{stopped:?}");
}

/// A loopback listener that accepts connections and never answers, as a broker that
/// hangs would: it holds every connection it accepted until the test ends.
struct Silent {
    port: u16,
    accepted: Arc<AtomicUsize>,
}

impl Silent {
    fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("address").port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = accepted.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for stream in listener.incoming().flatten() {
                held.push(stream);
                counted.fetch_add(1, Ordering::SeqCst);
            }
        });
        Silent { port, accepted }
    }

    /// The URL of this listener for `scheme`.
    fn url(&self, scheme: &str) -> String {
        match scheme {
            "amqp" => format!("amqp://guest:guest@127.0.0.1:{}/", self.port),
            "redis" => format!("redis://127.0.0.1:{}/", self.port),
            _ => format!("nats://127.0.0.1:{}", self.port),
        }
    }

    /// Waits (up to 10 s) until a client has connected.
    fn wait_for_a_connection(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.accepted.load(Ordering::SeqCst) == 0 {
            assert!(
                Instant::now() < deadline,
                "nothing connected to the listener"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Waits up to `limit` for `child` to exit; its status, or `None` (then it is
/// killed).
fn exit_within(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `signal` (`TERM`, `INT`) to the process `pid`.
fn signal(pid: u32, signal: &str) {
    let sent = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(sent.success(), "kill -{signal} {pid}");
}

/// `--timeout` bounds the whole command, connecting included: against a broker that
/// accepts TCP and never answers, `call`, `cast` and `multicall` fail after their
/// timeout (before this fix: 10 s on AMQP and 21 s on Redis for `--timeout 5`),
/// saying so, with the status of a connection failure.
#[test]
fn timeout_bounds_connecting_to_a_broker_that_never_answers() {
    let silent = Silent::start();
    let runs: Vec<_> = ["amqp", "redis", "nats"]
        .into_iter()
        .flat_map(|scheme| ["call", "cast", "multicall"].map(|command| (scheme, command)))
        .map(|(scheme, command)| {
            let url = silent.url(scheme);
            std::thread::spawn(move || {
                let started = Instant::now();
                let (code, out, err) = mqrpc(&[
                    command,
                    "--url",
                    &url,
                    "--topic",
                    "t",
                    "--timeout",
                    "2",
                    "echo",
                    "{}",
                ]);
                (scheme, command, started.elapsed(), code, out, err)
            })
        })
        .collect();
    for run in runs {
        let (scheme, command, took, code, out, err) = run.join().expect("a run");
        assert_eq!(code, 2, "{scheme} {command}: {out} {err}");
        assert!(
            err.contains("connecting: no answer within 2s (--timeout)"),
            "{scheme} {command}: {err}"
        );
        // Generous: 2 s plus the start of a debug binary on a busy machine.
        assert!(
            took < Duration::from_secs(8),
            "{scheme} {command} took {took:?}"
        );
    }
    assert!(silent.accepted.load(Ordering::SeqCst) >= 9);
}

/// SIGTERM or SIGINT stops a `serve` that is still connecting (its broker accepts
/// TCP and never answers) at once.
#[test]
fn serve_stops_on_a_signal_while_it_is_still_starting() {
    for (scheme, sig) in [("amqp", "TERM"), ("redis", "INT"), ("nats", "TERM")] {
        let silent = Silent::start();
        let mut child = Command::new(MQRPC)
            .args(["serve", "--url", &silent.url(scheme), "--topic", "t"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start mqrpc serve");
        silent.wait_for_a_connection();
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "{scheme}: serve ended before the signal"
        );
        signal(child.id(), sig);
        let status = exit_within(&mut child, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("{scheme}: serve still running 5 s after SIG{sig}"));
        let output = child.wait_with_output().expect("output");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(status.success(), "{scheme}: {status} {stderr}");
        assert!(
            stderr.contains("stopped before serving"),
            "{scheme}: {stderr}"
        );
        assert!(output.stdout.is_empty(), "{scheme}: it never said ready");
    }
}

/// The first Ctrl-C stops `serve` gracefully: it waits for the handler in progress.
/// A second one exits at once, with status 130.
#[test]
fn a_second_ctrl_c_stops_serve_at_once() {
    if !nats_available() {
        return;
    }
    let url = nats_url();
    let topic = &format!("cli_sigint_{}", std::process::id());
    let mut serving = serve(&url, topic, &[]);
    let mut listener = Command::new(MQRPC)
        .args(["listen", "--url", &url, "--topic", topic, "--count", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start mqrpc listen");
    let mut started = String::new();
    BufReader::new(listener.stderr.take().expect("stderr"))
        .read_line(&mut started)
        .expect("the listener says it listens");
    assert!(started.contains("listening"), "{started:?}");
    let mut slow = Command::new(MQRPC)
        .args(["call", "--url", &url, "--topic", topic, "--timeout", "60"])
        .args(["sleep", r#"{"seconds": 50}"#])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start a slow call");
    // The listener saw the call on the topic: the idle server takes it at once.
    let seen = listener.wait_with_output().expect("the listener ends");
    assert!(
        String::from_utf8_lossy(&seen.stdout).contains("\"sleep\""),
        "{seen:?}"
    );
    std::thread::sleep(Duration::from_millis(500));

    let pid = serving.0.id();
    signal(pid, "INT");
    // Still serving: the handler has 49 s to go and the grace period is longer.
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        serving.0.try_wait().expect("try_wait").is_none(),
        "serve ended on the first Ctrl-C although a handler was running"
    );
    signal(pid, "INT");
    let status = exit_within(&mut serving.0, Duration::from_secs(5))
        .expect("serve still running 5 s after the second Ctrl-C");
    assert_eq!(status.code(), Some(130), "{status}");
    let _ = slow.kill();
    let _ = slow.wait();
}

/// `--max-pending-bytes` takes bytes or a size with a unit, and refuses anything
/// else before starting.
#[test]
fn serve_refuses_a_bad_max_pending_bytes() {
    for bad in ["0", "12XB", "-1", "MiB", "99999999999999999999GiB"] {
        let (code, _, err) = mqrpc(&[
            "serve",
            "--url",
            "memory://never",
            "--topic",
            "t",
            &format!("--max-pending-bytes={bad}"),
        ]);
        assert_eq!(code, 2, "{bad}: {err}");
        assert!(err.contains("--max-pending-bytes"), "{bad}: {err}");
    }
}

/// Whether `text` shows the AMQP password `guest`: as text, or as the decimal bytes
/// lapin's frame dumps write (`[103, 117, 101, 115, 116]`, in any spacing).
fn shows_the_password(text: &str) -> bool {
    let packed: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    text.to_ascii_lowercase().contains("guest") || packed.contains("103,117,101,115,116")
}

/// No log level shows the AMQP password (lapin and amq-protocol trace their frames
/// and the URI), and lapin's dump of a returned message (a WARN with the whole body
/// as decimal bytes) is never printed: not even when `MQRPC_LOG` asks for their
/// targets by name.
#[test]
fn no_log_level_shows_the_amqp_password() {
    let url = amqp_url();
    if !broker_available("cli on amqp", &url) {
        return;
    }
    assert!(
        url.contains(":guest@"),
        "this test knows the password `guest` of the test broker: {url}"
    );
    let topic = format!("cli_logs_{}", std::process::id());
    // A payload whose bytes are easy to find: "zqxjk" is [122, 113, 120, 106, 107].
    let payload = r#"{"payload": "zqxjk"}"#;
    for filter in [
        "trace",
        "lapin=trace,amq_protocol=trace,amq_protocol_tcp=trace,amq_protocol_uri=trace",
        "warn",
    ] {
        let mut child = Command::new(MQRPC)
            .args(["serve", "--url", &url, "--topic", &topic, "--server", "s1"])
            .env("MQRPC_LOG", filter)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start mqrpc serve");
        // Read all along: a serve logging at TRACE fills a pipe nobody reads.
        let mut stderr = child.stderr.take().expect("stderr");
        let served = std::thread::spawn(move || {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut stderr, &mut text).expect("serve's stderr");
            text
        });
        let mut ready = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut ready)
            .expect("read the ready line");
        assert!(ready.contains("\"ready\""), "{ready:?}");
        let run = |topic: &str| {
            let output = Command::new(MQRPC)
                .args(["call", "--url", &url, "--topic", topic, "--timeout", "5"])
                .args(["echo", payload])
                .env("MQRPC_LOG", filter)
                .output()
                .expect("run mqrpc call");
            (
                output.status.code(),
                String::from_utf8_lossy(&output.stdout).into_owned(),
                String::from_utf8_lossy(&output.stderr).into_owned(),
            )
        };
        let (code, out, err) = run(&topic);
        assert_eq!(
            (code, out.trim()),
            (Some(0), "\"zqxjk\""),
            "{filter}: {err}"
        );
        // A call nobody can receive: the broker returns the request (mandatory).
        let (_, _, unroutable) = run(&format!("{topic}_nobody"));
        signal(child.id(), "TERM");
        exit_within(&mut child, Duration::from_secs(30)).expect("serve stops");
        let served = served.join().expect("serve's stderr");
        for (who, text) in [
            ("call", &err),
            ("unroutable call", &unroutable),
            ("serve", &served),
        ] {
            assert!(
                !shows_the_password(text),
                "{filter}: {who} shows it:\n{text}"
            );
            let packed: String = text.chars().filter(|c| !c.is_whitespace()).collect();
            assert!(
                !packed.contains("122,113,120,106,107"),
                "{filter}: {who} dumps a body:\n{text}"
            );
            assert!(
                !text.contains("Server returned us a message"),
                "{filter}: {who}:\n{text}"
            );
        }
        if filter == "trace" {
            // The filter keeps the rest: mqrpc's own events and lapin's DEBUG.
            assert!(err.contains("rpc_core"), "{err}");
            assert!(served.contains("lapin"), "{served}");
        }
    }
}

/// `GET /health` from the health endpoint at `addr`: the status code and the body,
/// or `None` when nothing listens there any more.
fn get_health(addr: &str) -> Option<(u16, serde_json::Value)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: probe\r\n\r\n")
        .expect("send the request");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("the answer");
    let (head, body) = answer.split_once("\r\n\r\n").expect("a head and a body");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("a status line: {head}"));
    let body = serde_json::from_str(body).unwrap_or_else(|e| panic!("JSON ({e}): {body}"));
    Some((status, body))
}

/// Asks the health endpoint until `until` holds for its answer (at most 20 s).
fn health_until(
    addr: &str,
    what: &str,
    until: impl Fn(u16, &serde_json::Value) -> bool,
) -> (u16, serde_json::Value) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = get_health(addr).unwrap_or_else(|| panic!("{what}: nothing listens"));
        if until(answer.0, &answer.1) {
            return answer;
        }
        assert!(Instant::now() < deadline, "{what}: last answer {answer:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `serve --health-addr` answers 200 with the state while it consumes, notes the
/// delivery of a call, answers 503 `stopping` while a SIGTERM lets that call finish,
/// and listens no more once it has exited.
#[test]
fn serve_reports_its_health_over_http() {
    if !nats_available() {
        return;
    }
    let url = nats_url();
    let topic = &format!("cli_health_{}", std::process::id());
    let mut child = Command::new(MQRPC)
        .args(["serve", "--url", &url, "--topic", topic, "--server", "s1"])
        .args(["--health-addr", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start mqrpc serve");
    let mut ready = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut ready)
        .expect("read the ready line");
    let mut serving = Serving(child);
    let ready: serde_json::Value = serde_json::from_str(&ready).expect("a JSON ready line");
    let addr = ready["health_addr"]
        .as_str()
        .unwrap_or_else(|| panic!("the ready line names the health address: {ready}"))
        .to_owned();

    let (status, body) = get_health(&addr).expect("the endpoint listens");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "consuming", "{body}");
    assert_eq!(body["since_last_delivery_ms"], serde_json::Value::Null);
    assert_eq!(body["reconnections"], 0, "{body}");
    assert_eq!(body["topic"], topic.as_str());
    assert_eq!(body["server"], "s1");

    let slow = Command::new(MQRPC)
        .args(["call", "--url", &url, "--topic", topic, "--timeout", "60"])
        .args(["sleep", r#"{"seconds": 5}"#])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start a slow call");
    // The server took the call: its handler runs for 5 s from now.
    health_until(&addr, "the call's delivery", |_, body| {
        body["since_last_delivery_ms"].is_u64()
    });
    signal(serving.0.id(), "TERM");
    let (status, body) = health_until(&addr, "stopping", |status, _| status != 200);
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["state"], "stopping", "{body}");

    let called = slow.wait_with_output().expect("the slow call ends");
    assert!(
        called.status.success(),
        "the call in progress finished: {}",
        String::from_utf8_lossy(&called.stderr)
    );
    let status = exit_within(&mut serving.0, Duration::from_secs(30)).expect("serve exits");
    assert!(status.success(), "{status}");
    assert_eq!(get_health(&addr), None, "nothing listens after the exit");
}

/// `--health-addr` takes an IP address and a port, and refuses anything else before
/// starting.
#[test]
fn serve_refuses_a_bad_health_addr() {
    for bad in ["8080", "localhost", "127.0.0.1", "127.0.0.1:99999"] {
        let (code, _, err) = mqrpc(&[
            "serve",
            "--url",
            "memory://never",
            "--topic",
            "t",
            "--health-addr",
            bad,
        ]);
        assert_eq!(code, 2, "{bad}: {err}");
        assert!(err.contains("--health-addr"), "{bad}: {err}");
    }
}
