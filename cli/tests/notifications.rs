//! `mqrpc notify` and `mqrpc listen --notifications` as separate processes on
//! RabbitMQ: a notification sent by one reaches the other with its priority, event
//! type, publisher, payload and context, as a pool member or in the default group,
//! and one sent before the listener started is kept for it.

use std::io::{BufRead, BufReader};
use std::process::{ChildStdout, Command, Stdio};

mod common;

use common::{MQRPC, Serving, amqp_url, broker_available, mqrpc};
use serde_json::{Value, json};

fn topic(case: &str) -> String {
    format!("cli_{case}_{}", std::process::id())
}

/// The broker's URL, with the test's queues expiring a minute after their last use
/// (notification queues are otherwise kept for good, as in oslo).
fn url() -> String {
    let url = amqp_url();
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}topic_ttl=60")
}

/// `mqrpc listen --notifications ARGS`, once it says it listens.
fn listen(url: &str, args: &[&str]) -> (Serving, BufReader<ChildStdout>) {
    let mut child = Command::new(MQRPC)
        .args(["listen", "--notifications", "--url", url])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start mqrpc listen");
    let stdout = child.stdout.take().expect("stdout");
    let stderr = child.stderr.take().expect("stderr");
    let mut line = String::new();
    BufReader::new(stderr)
        .read_line(&mut line)
        .expect("read the listening line");
    assert!(line.contains("listening to the notifications"), "{line:?}");
    (Serving(child), BufReader::new(stdout))
}

fn next_line(out: &mut BufReader<ChildStdout>) -> Value {
    let mut line = String::new();
    out.read_line(&mut line).expect("read a notification line");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
}

fn notify(url: &str, args: &[&str]) {
    let mut all = vec!["notify", "--url", url];
    all.extend_from_slice(args);
    let (status, stdout, stderr) = mqrpc(&all);
    assert_eq!(status, 0, "{stderr}");
    assert!(stdout.is_empty(), "{stdout:?}");
}

#[test]
fn a_notification_sent_by_one_process_is_printed_by_another() {
    let url = url();
    if !broker_available("cli notifications on amqp", &url) {
        return;
    }
    let topic = topic("notify");
    let pool = format!("{topic}_pool");
    let (mut listening, mut out) =
        listen(&url, &["--topic", &topic, "--pool", &pool, "--count", "2"]);
    notify(
        &url,
        &[
            "--topic",
            &topic,
            "--priority",
            "warn",
            "--publisher-id",
            "compute.host1",
            "--context",
            r#"{"user": "alice"}"#,
            "compute.instance.update",
            r#"{"state": "active"}"#,
        ],
    );
    notify(&url, &["--topic", &topic, "audit.event", "7"]);
    let first = next_line(&mut out);
    assert_eq!(first["priority"], "warn");
    assert_eq!(first["event_type"], "compute.instance.update");
    assert_eq!(first["publisher_id"], "compute.host1");
    assert_eq!(first["payload"], json!({"state": "active"}));
    assert_eq!(first["context"], json!({"user": "alice"}));
    assert_eq!(first["message_id"].as_str().map(str::len), Some(36));
    let second = next_line(&mut out);
    assert_eq!(second["priority"], "info");
    assert_eq!(second["publisher_id"], "mqrpc");
    assert_eq!(second["payload"], json!(7));
    let status = listening.0.wait().expect("listen ends after --count");
    assert!(status.success(), "{status:?}");
}

#[test]
fn a_notification_sent_before_the_listener_is_kept_for_it() {
    let url = url();
    if !broker_available("cli notifications on amqp", &url) {
        return;
    }
    let topic = topic("early");
    notify(
        &url,
        &["--topic", &topic, "--priority", "error", "early.event"],
    );
    let (mut listening, mut out) = listen(&url, &["--topic", &topic, "--count", "1"]);
    let line = next_line(&mut out);
    assert_eq!(line["event_type"], "early.event");
    assert_eq!(line["priority"], "error");
    assert!(listening.0.wait().expect("listen ends").success());
}

#[test]
fn a_priority_that_is_not_oslos_is_a_usage_error() {
    let (status, _, stderr) = mqrpc(&[
        "notify",
        "--url",
        "amqp://guest:guest@127.0.0.1:5672/",
        "--priority",
        "loud",
        "x",
    ]);
    assert_eq!(status, 2, "{stderr}");
    assert!(stderr.contains("loud"), "{stderr}");
}
