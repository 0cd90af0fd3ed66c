//! The `mqrpc` binary as an operator runs it: `serve` and `call`/`cast`/`multicall`/
//! `listen` as separate processes on a broker (NATS) and on a shared memory bus, and
//! `bench` on the memory bus.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MQRPC: &str = env!("CARGO_BIN_EXE_mqrpc");

fn nats_url() -> String {
    std::env::var("MQRPC_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

fn nats_available() -> bool {
    let address = nats_url()
        .split_once("://")
        .map(|(_, rest)| rest.split(['?', '/']).next().unwrap_or(rest).to_owned())
        .unwrap_or_default();
    let reachable = std::net::TcpStream::connect(&address).is_ok();
    if !reachable {
        assert!(
            std::env::var("MQRPC_REQUIRE_BROKERS").as_deref() != Ok("1"),
            "NATS unreachable at {address} and MQRPC_REQUIRE_BROKERS=1"
        );
        eprintln!("SKIP cli on nats: NATS unreachable at {address}");
    }
    reachable
}

fn mqrpc(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(MQRPC).args(args).output().expect("run mqrpc");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

struct Serving(Child);

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `mqrpc serve` as server `s1` of `topic`, once it says it is ready.
fn serve(url: &str, topic: &str, extra: &[&str]) -> Serving {
    serve_as(url, topic, "s1", extra)
}

/// `mqrpc serve` as `server` of `topic`, once it says it is ready.
fn serve_as(url: &str, topic: &str, server: &str, extra: &[&str]) -> Serving {
    let mut child = Command::new(MQRPC)
        .args(["serve", "--url", url, "--topic", topic, "--server", server])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start mqrpc serve");
    let stdout = child.stdout.take().expect("stdout");
    let serving = Serving(child);
    let mut ready = String::new();
    BufReader::new(stdout)
        .read_line(&mut ready)
        .expect("read the ready line");
    assert!(ready.contains("\"ready\""), "{ready:?}");
    assert!(ready.contains(&format!("\"{server}\"")), "{ready:?}");
    serving
}

#[test]
fn serve_and_call_as_processes_on_nats() {
    if !nats_available() {
        return;
    }
    serve_and_call_as_processes(&nats_url(), "no server listens");
}

/// The first `serve` on a memory URL starts a keeper of the bus; `call`, `cast`,
/// `multicall` and `listen` on the same URL reach it from their own processes.
#[test]
fn serve_and_call_as_processes_on_memory() {
    let url = format!("memory://cli-{}", std::process::id());
    // The memory bus keeps a call to a topic nobody serves until its deadline.
    serve_and_call_as_processes(&url, "timed out");
}

/// `serve`, then every client command as its own process, on `url`; a call to a
/// topic nobody serves fails with `nobody` in its message.
fn serve_and_call_as_processes(url: &str, nobody: &str) {
    let url = url.to_owned();
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
    assert!(err.contains(nobody), "{err}");
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

/// A client command on a memory bus that no `mqrpc serve` started fails at once,
/// saying why, instead of waiting out its timeout for a server that cannot exist.
#[test]
fn client_commands_on_a_memory_bus_nobody_keeps_fail_at_once() {
    let url = format!("memory://nobody-{}", std::process::id());
    for command in ["call", "cast", "multicall"] {
        let (code, stdout, stderr) = mqrpc(&[
            command,
            "--url",
            &url,
            "--topic",
            "t",
            "--timeout",
            "30s",
            "echo",
            "{}",
        ]);
        assert_eq!(code, 2, "{command}: {stdout} {stderr}");
        // A timeout would exit with 1 and name the deadline.
        assert!(
            stderr.contains("no mqrpc process keeps the memory bus"),
            "{command}: {stderr}"
        );
    }
}

/// A second `serve` on a memory URL joins the same bus: the two compete for the
/// topic's calls, and each answers calls directed at it. The bus outlives the
/// `serve` that started its keeper; if the keeper itself is killed, the remaining
/// `serve` starts a new one and serves on.
#[test]
fn a_second_serve_on_a_memory_bus_joins_the_first() {
    let url = format!("memory://cli-two-{}", std::process::id());
    let topic = "two";
    let first = serve(&url, topic, &[]);
    let second = serve_as(&url, topic, "s2", &[]);
    let echo = |payload: &str, server: &[&str]| {
        let mut all = vec!["call", "--url", &url, "--topic", topic, "--timeout", "5s"];
        all.extend_from_slice(server);
        all.extend_from_slice(&["echo", payload]);
        mqrpc(&all)
    };
    for server in ["s1", "s2"] {
        let (code, out, err) = echo(r#"{"payload": "hi"}"#, &["--server", server]);
        assert_eq!((code, out.trim()), (0, "\"hi\""), "{server}: {err}");
    }
    // The first server dies: the bus and the second server go on.
    drop(first);
    let (code, out, err) = echo(r#"{"payload": 7}"#, &[]);
    assert_eq!((code, out.trim()), (0, "7"), "{err}");

    // The keeper dies: the second server starts a new one.
    let killed = Command::new("pkill")
        .args(["-KILL", "-f", &format!("keep-bus --url {url}$")])
        .status()
        .expect("run pkill");
    assert!(killed.success(), "a keeper of {url} was running");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, out, err) = echo(r#"{"payload": 8}"#, &[]);
        if code == 0 {
            assert_eq!(out.trim(), "8");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no new keeper and server after the keeper was killed: {err}"
        );
        std::thread::sleep(Duration::from_millis(50));
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
    assert!(stdout.contains("Medians of 2 rounds"), "{stdout}");
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
    let rounds = json["rounds_mqrpc"].as_array().expect("rounds_mqrpc");
    assert_eq!(rounds.len(), 2);
    assert!(rounds.iter().all(|r| {
        r["throughput"][1]["calls_per_s"]
            .as_f64()
            .is_some_and(|r| r > 0.0)
    }));
    let svg = std::fs::read_to_string(out.join("bench-memory.svg")).expect("svg written");
    assert!(svg.contains("<svg"));
    let _ = std::fs::remove_dir_all(out);
}

/// A `listen` that started the keeper of a memory bus and exits takes nothing with
/// it: the `serve` attached to the bus answers the next call.
#[test]
fn a_memory_bus_outlives_the_listener_that_started_it() {
    let url = format!("memory://cli-handover-{}", std::process::id());
    let topic = "handover";
    let mut listener = Command::new(MQRPC)
        .args(["listen", "--url", &url, "--topic", topic, "--count", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start mqrpc listen");
    let mut stderr = BufReader::new(listener.stderr.take().expect("stderr"));
    let mut line = String::new();
    while !line.contains("listening") {
        line.clear();
        stderr
            .read_line(&mut line)
            .expect("the listener says it listens");
        assert!(!line.is_empty(), "the listener ended early");
    }
    let serving = serve(&url, topic, &[]);
    let call = |payload: &str| {
        mqrpc(&[
            "call",
            "--url",
            &url,
            "--topic",
            topic,
            "--timeout",
            "5s",
            "echo",
            payload,
        ])
    };
    let (code, out, err) = call(r#"{"payload": 1}"#);
    assert_eq!((code, out.trim()), (0, "1"), "{err}");
    // The listener saw that call and ends; the bus stays.
    let seen = listener.wait_with_output().expect("the listener ends");
    assert!(seen.status.success());
    let (code, out, err) = call(r#"{"payload": 2}"#);
    assert_eq!((code, out.trim()), (0, "2"), "{err}");
    drop(serving);
}
