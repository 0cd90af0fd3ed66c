//! The control requests every server answers beside its endpoints: `status` in the
//! reserved namespace [`CONTROL_NAMESPACE`] (who is there: name, host, process,
//! endpoints, uptime, load), which [`crate::Client::discover`] sends to a topic's
//! fanout, and oslo.messaging's `oslo_rpc_server_ping` when it is turned on.

// A `RemoteError` here is the failure document itself, built once per failed
// request and sent as it is; boxing it would only add an allocation.
#![allow(clippy::result_large_err)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::context::Context;
use crate::endpoint::{Endpoint, NoArgs};
use crate::error::RemoteError;
use crate::target::Version;

/// The namespace of the control requests every server answers (unless built with
/// [`crate::ServerBuilder::discoverable`]`(false)`). Reserved: a server refuses to
/// start with an endpoint of its own in it.
pub const CONTROL_NAMESPACE: &str = "mqrpc.control";
/// The version of the control interface.
pub const CONTROL_VERSION: Version = Version::new(1, 0);
/// The control method that answers a [`ServerStatus`].
pub const STATUS_METHOD: &str = "status";
/// oslo.messaging's ping method (`rpc_ping_enabled`): null namespace, version 1.0,
/// any keyword arguments, answers `"pong"`.
pub const OSLO_PING_METHOD: &str = "oslo_rpc_server_ping";
/// What [`OSLO_PING_METHOD`] answers.
pub const OSLO_PING_ANSWER: &str = "pong";

/// What a server says about itself when asked who is there: the answer of the
/// control method [`STATUS_METHOD`], as [`crate::Client::discover`] returns it.
///
/// On the wire it is a JSON object with these member names; members a newer server
/// adds are ignored and members an older one lacks read as their defaults.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct ServerStatus {
    /// The server's name (its target's `server`).
    pub server: String,
    /// The topic it serves.
    pub topic: String,
    /// The exchange of that topic.
    pub exchange: String,
    /// The name of the machine (or container) it runs on.
    pub host: String,
    /// Its process id.
    pub pid: u32,
    /// The mqrpc version it runs.
    pub mqrpc_version: String,
    /// Its transport's backend (`memory`, `amqp`, `redis`, `nats`).
    pub backend: String,
    /// The endpoints it serves, in dispatch order; the control endpoint is not
    /// listed, oslo's ping endpoint is when it is on.
    pub endpoints: Vec<EndpointStatus>,
    /// Seconds since the server started.
    pub uptime: f64,
    /// Requests (calls and casts) it finished since it started: a call counts once
    /// its final reply is on its way. Control requests are not counted.
    pub handled: u64,
    /// Requests it is working on now (control requests not counted).
    pub in_flight: u64,
    /// At most this many requests are worked on at once.
    pub concurrency: u64,
    /// Whether it answers oslo.messaging's `oslo_rpc_server_ping`.
    pub oslo_ping: bool,
}

/// One endpoint of a [`ServerStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct EndpointStatus {
    /// Its namespace; `None` is the null namespace.
    pub namespace: Option<String>,
    /// The version it implements (`X.Y` or `X.Y.Z`).
    pub version: String,
    /// Its methods that can be called, sorted (names starting with `_` are never
    /// dispatched and not listed).
    pub methods: Vec<String>,
}

impl EndpointStatus {
    fn of(endpoint: &Endpoint) -> Self {
        let mut methods: Vec<String> = (endpoint.methods.keys())
            .filter(|name| !name.starts_with('_'))
            .cloned()
            .collect();
        methods.sort();
        EndpointStatus {
            namespace: endpoint.namespace.clone(),
            version: endpoint.version.to_string(),
            methods,
        }
    }
}

/// A server's counts of requests, for its [`ServerStatus`].
#[derive(Debug, Default)]
pub(crate) struct ServingStats {
    handled: AtomicU64,
    in_flight: AtomicU64,
}

/// One request being worked on: counted in `in_flight` from its start, and in
/// `handled` (no longer in flight) once [`InFlight::finish`] is called or it drops.
pub(crate) struct InFlight<'a> {
    stats: &'a ServingStats,
    finished: AtomicBool,
}

impl<'a> InFlight<'a> {
    pub(crate) fn start(stats: &'a ServingStats) -> Self {
        stats.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            stats,
            finished: AtomicBool::new(false),
        }
    }

    /// The request's work is done (a call's final reply is about to leave): a
    /// caller that then asks for the status sees it counted. Only the first call
    /// counts.
    pub(crate) fn finish(&self) {
        if !self.finished.swap(true, Ordering::Relaxed) {
            self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
            self.stats.handled.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.finish();
    }
}

/// What a server knows of itself, for the status method.
pub(crate) struct StatusSource {
    pub(crate) server: String,
    pub(crate) topic: String,
    pub(crate) exchange: String,
    pub(crate) backend: &'static str,
    pub(crate) endpoints: Vec<EndpointStatus>,
    pub(crate) concurrency: usize,
    pub(crate) oslo_ping: bool,
    pub(crate) started: Instant,
    pub(crate) stats: Arc<ServingStats>,
}

impl StatusSource {
    fn status(&self) -> ServerStatus {
        ServerStatus {
            server: self.server.clone(),
            topic: self.topic.clone(),
            exchange: self.exchange.clone(),
            host: host_name().to_owned(),
            pid: std::process::id(),
            mqrpc_version: env!("CARGO_PKG_VERSION").to_owned(),
            backend: self.backend.to_owned(),
            endpoints: self.endpoints.clone(),
            uptime: self.started.elapsed().as_secs_f64(),
            handled: self.stats.handled.load(Ordering::Relaxed),
            in_flight: self.stats.in_flight.load(Ordering::Relaxed),
            concurrency: u64::try_from(self.concurrency).unwrap_or(u64::MAX),
            oslo_ping: self.oslo_ping,
        }
    }
}

/// The descriptions of `endpoints`, for the status.
pub(crate) fn describe(endpoints: &[Endpoint]) -> Vec<EndpointStatus> {
    endpoints.iter().map(EndpointStatus::of).collect()
}

/// The control endpoint of a server described by `source`.
pub(crate) fn control_endpoint(source: StatusSource) -> Endpoint {
    let source = Arc::new(source);
    Endpoint::new()
        .namespace(CONTROL_NAMESPACE)
        .version(CONTROL_VERSION)
        .method(STATUS_METHOD, move |_ctx: Context, _args: NoArgs| {
            let status = source.status();
            async move { Ok::<_, RemoteError>(status) }
        })
}

/// oslo.messaging's `PingEndpoint`: no target, so the null namespace at version
/// 1.0; extra keyword arguments are accepted and ignored.
pub(crate) fn oslo_ping_endpoint() -> Endpoint {
    Endpoint::new().method(OSLO_PING_METHOD, |_ctx: Context, _args: NoArgs| async {
        Ok::<_, RemoteError>(OSLO_PING_ANSWER)
    })
}

/// This machine's name: the kernel's, else `/etc/hostname`, else `$HOSTNAME`
/// (`$COMPUTERNAME` on Windows), else `unknown`. Read once.
fn host_name() -> &'static str {
    static HOST: OnceLock<String> = OnceLock::new();
    HOST.get_or_init(|| {
        let from_file = ["/proc/sys/kernel/hostname", "/etc/hostname"]
            .iter()
            .filter_map(|path| std::fs::read_to_string(path).ok())
            .map(|text| text.trim().to_owned())
            .find(|name| !name.is_empty());
        from_file
            .or_else(|| {
                ["HOSTNAME", "COMPUTERNAME"]
                    .iter()
                    .filter_map(|var| std::env::var(var).ok())
                    .find(|name| !name.is_empty())
            })
            .unwrap_or_else(|| "unknown".to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_reads_what_an_older_or_newer_server_sends() {
        let newer = serde_json::json!({
            "server": "s1", "pid": 7, "handled": 3, "something_new": [1, 2],
            "endpoints": [{"namespace": null, "version": "1.3", "methods": ["add"], "x": 1}]
        });
        let status: ServerStatus = serde_json::from_value(newer).expect("decodes");
        assert_eq!((status.server.as_str(), status.pid), ("s1", 7));
        assert_eq!(status.handled, 3);
        assert_eq!(status.backend, "", "missing members read as their defaults");
        assert_eq!(status.endpoints[0].methods, ["add"]);
    }

    #[test]
    fn a_request_counts_as_handled_once() {
        let stats = ServingStats::default();
        let first = InFlight::start(&stats);
        let second = InFlight::start(&stats);
        assert_eq!(stats.in_flight.load(Ordering::Relaxed), 2);
        first.finish();
        first.finish();
        drop(first);
        assert_eq!(stats.handled.load(Ordering::Relaxed), 1);
        assert_eq!(stats.in_flight.load(Ordering::Relaxed), 1);
        drop(second);
        assert_eq!(stats.handled.load(Ordering::Relaxed), 2);
        assert_eq!(stats.in_flight.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn private_methods_are_not_listed() {
        let endpoint = Endpoint::new()
            .version(Version::new(1, 3))
            .method("b", |_: Context, _: NoArgs| async {
                Ok::<_, RemoteError>(())
            })
            .method("_hidden", |_: Context, _: NoArgs| async {
                Ok::<_, RemoteError>(())
            })
            .method("a", |_: Context, _: NoArgs| async {
                Ok::<_, RemoteError>(())
            });
        let described = describe(&[endpoint]);
        assert_eq!(described[0].methods, ["a", "b"]);
        assert_eq!(described[0].version, "1.3");
        assert_eq!(described[0].namespace, None);
    }
}
