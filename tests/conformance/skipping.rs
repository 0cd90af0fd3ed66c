//! A test whose broker or Python peer is missing fails by default, and is recorded
//! as skipped (on the real stderr and in `MQRPC_SKIP_LOG`) only under
//! `MQRPC_ALLOW_SKIP=1`. Checked end to end: a real test of this very binary runs in
//! a child process, its broker's URL pointing at a port nobody listens on (or its
//! Python peer at a path that does not exist), once without and once with the
//! opt-in.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::skips::{ALLOW_SKIP, SKIP_LOG};

/// A loopback port nobody listens on (bound, read, released).
fn dead_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

/// A skip log of this check's own, not there yet.
fn fresh_log(name: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!(
        "mqrpc-skiplog-{name}-{}-{}",
        std::process::id(),
        &mqrpc::wire::new_id()[..8]
    ));
    let _ = std::fs::remove_file(&path);
    path
}

/// Runs the one test `name` of this binary, with `env` set, skipping allowed or not,
/// and its skips logged to `log`. libtest captures its output as usual.
fn run_test(name: &str, env: &[(&str, &str)], allow: bool, log: &Path) -> Output {
    let mut command = Command::new(std::env::current_exe().expect("the test binary"));
    command
        .args(["--exact", name, "--test-threads=1"])
        .env_remove(ALLOW_SKIP)
        .env_remove("MQRPC_STRESS")
        .env(SKIP_LOG, log)
        .envs(env.iter().copied());
    if allow {
        command.env(ALLOW_SKIP, "1");
    }
    command.output().expect("run the test binary")
}

/// `name` fails without the opt-in, saying what is missing and how to skip; with it,
/// it passes, and its skip shows on stderr although the test passed (libtest shows
/// no captured output of a passing test) and is the one line of the skip log.
fn fails_by_default_and_skips_when_allowed(name: &str, env: &[(&str, &str)], missing: &str) {
    let log = fresh_log("default");
    let failed = run_test(name, env, false, &log);
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&failed.stdout),
        String::from_utf8_lossy(&failed.stderr)
    );
    assert!(
        !failed.status.success(),
        "{name} passed without its {missing}: {output}"
    );
    assert!(output.contains("1 failed"), "{name}: {output}");
    assert!(output.contains(missing), "{name}: {output}");
    assert!(output.contains("MQRPC_ALLOW_SKIP=1"), "{name}: {output}");
    assert!(!log.exists(), "{name} logged a skip although it failed");

    let log = fresh_log("allowed");
    let skipped = run_test(name, env, true, &log);
    let stdout = String::from_utf8_lossy(&skipped.stdout);
    let stderr = String::from_utf8_lossy(&skipped.stderr);
    assert!(skipped.status.success(), "{name}: {stdout}{stderr}");
    assert!(stdout.contains("1 passed"), "{name}: {stdout}");
    let line = stderr
        .lines()
        .find(|line| line.starts_with("SKIP ") && line.contains(missing))
        .unwrap_or_else(|| panic!("{name}: no SKIP line on stderr: {stderr}"));
    let logged = std::fs::read_to_string(&log).expect("the skip log");
    let _ = std::fs::remove_file(&log);
    assert_eq!(logged, format!("{line}\n"), "{name}");
}

#[cfg(feature = "redis")]
#[test]
fn a_redis_test_fails_without_its_broker_unless_skipping_is_allowed() {
    let url = format!("redis://127.0.0.1:{}/", dead_port());
    fails_by_default_and_skips_when_allowed(
        "redis::typed_call",
        &[("MQRPC_REDIS_URL", &url)],
        "redis: broker unavailable",
    );
}

#[cfg(feature = "nats")]
#[test]
fn a_nats_test_fails_without_its_broker_unless_skipping_is_allowed() {
    let url = format!("nats://127.0.0.1:{}", dead_port());
    fails_by_default_and_skips_when_allowed(
        "nats::core::typed_call",
        &[("MQRPC_NATS_URL", &url)],
        "nats: broker unavailable",
    );
}

#[cfg(feature = "amqp")]
#[test]
fn an_amqp_test_fails_without_its_broker_unless_skipping_is_allowed() {
    let url = format!("amqp://guest:guest@127.0.0.1:{}/", dead_port());
    fails_by_default_and_skips_when_allowed(
        "amqp::typed_call",
        &[("MQRPC_AMQP_URL", &url)],
        "amqp: broker unavailable",
    );
}

/// The interop tests need RabbitMQ (the real one) and the Python peer (here, missing).
#[cfg(feature = "amqp")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interop_test_fails_without_its_python_peer_unless_skipping_is_allowed() {
    let Some(_) = crate::amqp::backend().await else {
        return;
    };
    let python = std::env::temp_dir().join(format!("mqrpc-no-python-{}", std::process::id()));
    let python = python.display().to_string();
    tokio::task::spawn_blocking(move || {
        fails_by_default_and_skips_when_allowed(
            "interop_amqp::amqp_interop_mqrpc_client_calls_python_oslo_server",
            &[("MQRPC_OSLO_PYTHON", &python)],
            "amqp interop: the Python peer",
        );
    })
    .await
    .expect("the check");
}
