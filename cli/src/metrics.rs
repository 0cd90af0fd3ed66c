//! `--metrics-addr`: the metrics of this process's clients, servers and transports
//! (`mqrpc::metrics`) in Prometheus's text format over HTTP.

use std::net::SocketAddr;

use anyhow::Result;

/// Upper bounds of the duration histograms' buckets, in seconds: from 100 µs (a call
/// on a fast broker) up to a minute (the default call timeout).
#[cfg(feature = "metrics")]
const BUCKETS: [f64; 18] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

/// Installs the Prometheus recorder and serves it at `http://ADDR/` (any path).
/// Prometheus's naming: dots become underscores, counters end in `_total`, and the
/// unit ends the name (`rpc_client_call_duration_seconds`).
#[cfg(feature = "metrics")]
pub(crate) fn export(addr: SocketAddr) -> Result<()> {
    use anyhow::Context as _;
    use metrics_exporter_prometheus::PrometheusBuilder;

    PrometheusBuilder::new()
        .with_http_listener(addr)
        .with_recommended_naming(true)
        .set_buckets(&BUCKETS)
        .context("histogram buckets")?
        .install()
        .with_context(|| format!("serving metrics on {addr} (--metrics-addr)"))?;
    mqrpc::metrics::describe();
    Ok(())
}

/// Built without the feature `metrics`, there is nothing to serve.
#[cfg(not(feature = "metrics"))]
pub(crate) fn export(addr: SocketAddr) -> Result<()> {
    anyhow::bail!(
        "--metrics-addr {addr}: this mqrpc is built without metrics (the feature `metrics` \
         of mqrpc-cli)"
    )
}
