//! What the command line's test files share: the skip helper, the broker check, the
//! broker URLs, and running `mqrpc` and `mqrpc serve`. Each test file uses a part.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

#[path = "../../src/skips.rs"]
pub mod skips;

/// Whether the broker of `url` accepts connections. When it does not: a failure, or
/// `false` after a recorded skip under `MQRPC_ALLOW_SKIP=1`.
pub fn broker_available(what: &str, url: &str) -> bool {
    let address = url
        .split_once("://")
        .map(|(_, rest)| rest.split(['?', '/']).next().unwrap_or(rest))
        .map(|authority| authority.rsplit('@').next().unwrap_or(authority).to_owned())
        .unwrap_or_default();
    match std::net::TcpStream::connect(&address) {
        Ok(_) => true,
        Err(err) => {
            skips::missing(what, &format!("broker unavailable at {address} ({err})"));
            false
        }
    }
}

/// The binary under test.
pub const MQRPC: &str = env!("CARGO_BIN_EXE_mqrpc");

pub fn nats_url() -> String {
    std::env::var("MQRPC_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

pub fn amqp_url() -> String {
    std::env::var("MQRPC_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/".to_owned())
}

/// Runs `mqrpc ARGS` to its end: exit status, stdout, stderr.
pub fn mqrpc(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(MQRPC).args(args).output().expect("run mqrpc");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A process the test started, killed when the test is done with it.
pub struct Serving(pub Child);

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `mqrpc serve` as `server` of `topic`, once it says it is ready.
pub fn serve_as(url: &str, topic: &str, server: &str, extra: &[&str]) -> Serving {
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
