//! The suites that run on a broker cluster: three nodes of NATS, Redis Cluster
//! (three masters and three replicas) or RabbitMQ, brought up on spare loopback
//! ports by `scripts/cluster-<kind>.sh` and torn down by PID, never touching the
//! shared brokers.
//!
//! `scripts/test.sh` runs them one cluster at a time: it brings the cluster up,
//! runs `clusters::<kind>::suite*` (the generic conformance suite with client and
//! server on different nodes) and then `clusters::<kind>::faults*` (node kills, one
//! test at a time) with `MQRPC_CLUSTER=<kind>`, and tears the cluster down. The
//! main test run passes `--skip clusters::`. Run by hand:
//!
//! ```text
//! bash scripts/cluster-nats.sh up
//! MQRPC_CLUSTER=nats cargo test --workspace --all-features --test conformance -- clusters::nats::suite
//! MQRPC_CLUSTER=nats cargo test --workspace --all-features --test conformance -- clusters::nats::faults --test-threads=1
//! bash scripts/cluster-nats.sh down
//! ```
//!
//! A cluster test whose cluster is not up fails (it says how to bring it up),
//! unless `MQRPC_ALLOW_SKIP=1`.

// A build with one backend's feature leaves parts unused.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::suite::Backend;

#[cfg(feature = "nats")]
mod nats;
#[cfg(feature = "amqp")]
mod rabbitmq;
#[cfg(feature = "redis")]
mod redis;

/// The environment variable naming the cluster kind that is up (`nats`, `redis`
/// or `rabbitmq`); `scripts/test.sh` sets it while that cluster runs.
pub const CLUSTER_VAR: &str = "MQRPC_CLUSTER";

/// A running cluster of one kind: its nodes' client addresses and its script.
#[derive(Clone, Debug)]
pub struct Cluster {
    /// `nats`, `redis` or `rabbitmq`: the script is `scripts/cluster-<kind>.sh`.
    pub kind: &'static str,
    /// Each node's client address, `host:port`, node 1 first.
    pub nodes: Vec<String>,
}

impl Cluster {
    /// The cluster of `kind` when it is up (`MQRPC_CLUSTER=<kind>`). Otherwise
    /// the test fails, saying how to bring the cluster up, or records a skip
    /// when `MQRPC_ALLOW_SKIP=1`; `None` then tells the caller to return.
    pub fn get(kind: &'static str) -> Option<Cluster> {
        let up = std::env::var(CLUSTER_VAR).ok();
        if up.as_deref().map(str::trim) != Some(kind) {
            crate::skips::missing(
                &format!("clusters::{kind}"),
                &format!(
                    "the {kind} cluster is not up (run `bash scripts/cluster-{kind}.sh up` \
                     and set {CLUSTER_VAR}={kind}; scripts/test.sh does both)"
                ),
            );
            return None;
        }
        let cluster = Cluster {
            kind,
            nodes: Vec::new(),
        };
        let nodes = cluster
            .ctl(&["nodes"])
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty())
            .map(str::to_owned)
            .collect::<Vec<_>>();
        assert!(!nodes.is_empty(), "cluster-{kind}.sh nodes printed no node");
        Some(Cluster { kind, nodes })
    }

    /// The cluster's script.
    pub fn script(&self) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("scripts")
            .join(format!("cluster-{}.sh", self.kind))
    }

    /// Runs the cluster's script with `args` and returns its standard output,
    /// trimmed. Panics, with the script's standard error, when it fails.
    pub fn ctl(&self, args: &[&str]) -> String {
        let output = Command::new("bash")
            .arg(self.script())
            .args(args)
            .output()
            .unwrap_or_else(|err| panic!("running {}: {err}", self.script().display()));
        assert!(
            output.status.success(),
            "cluster-{}.sh {} failed ({}): {}",
            self.kind,
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// A backend whose successive transports connect to node 1, 2, 3, 1, …, so a
    /// case's server and client sit on different nodes. `url_of(i, node)` builds
    /// the URL for the node of index `i` (address `node`).
    pub fn rotating_backend(
        &self,
        name: &'static str,
        url_of: impl Fn(usize, &str) -> String + Send + Sync + 'static,
    ) -> Backend {
        let nodes = Arc::new(self.nodes.clone());
        let next = Arc::new(AtomicUsize::new(0));
        let url_of = Arc::new(url_of);
        Backend::new(name, move || {
            let index = next.fetch_add(1, Ordering::Relaxed) % nodes.len();
            let url = url_of(index, &nodes[index]);
            async move {
                mqrpc::connect(&url)
                    .await
                    .unwrap_or_else(|err| panic!("connecting to {url}: {err}"))
            }
        })
    }
}
