//! Traces over OTLP: the spans of this process's calls, casts and handlers
//! (`mqrpc::trace`) sent to an OpenTelemetry collector when the standard
//! `OTEL_*` environment variables ask for it.
//!
//! When to export (see [`decide`]), in the spirit of the OpenTelemetry SDK's
//! environment specification, but opt-in: a command line tool must not start
//! sending to `localhost:4318` because nothing was set.
//! - `OTEL_SDK_DISABLED=true`: never.
//! - `OTEL_TRACES_EXPORTER`: `none` never; `otlp` (also in a comma-separated list)
//!   always, to the endpoint below or OTLP's default `http://localhost:4318`; any
//!   other value (`console`, `zipkin`, ...) is not supported here: a warning, and
//!   nothing is exported.
//! - Unset `OTEL_TRACES_EXPORTER`: only when `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` is set (not empty).
//!
//! The exporter is OTLP over HTTP, `http/protobuf` unless
//! `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` or `OTEL_EXPORTER_OTLP_PROTOCOL` says
//! `http/json`; `grpc` is not built in, nor is TLS (an `https://` endpoint): a
//! warning, and nothing is exported. The exporter itself reads the endpoint
//! (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` as is, or `OTEL_EXPORTER_OTLP_ENDPOINT` +
//! `/v1/traces`), `..._HEADERS` and `..._TIMEOUT`; the batch processor reads
//! `OTEL_BSP_*`; the resource reads `OTEL_RESOURCE_ATTRIBUTES` and
//! `OTEL_SERVICE_NAME`, whose default here is `mqrpc`.
//!
//! The spans are INFO spans of the mqrpc crates, which the exporting layer takes
//! whatever `MQRPC_LOG` says of the logs on stderr. Without the variables nothing is
//! installed, and the spans cost what they cost with logging only.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::resource::{EnvResourceDetector, ResourceDetector as _};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Subscriber;
use tracing::level_filters::LevelFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::registry::LookupSpan;

/// `service.name` when neither `OTEL_SERVICE_NAME` nor `OTEL_RESOURCE_ATTRIBUTES`
/// names the service.
const DEFAULT_SERVICE_NAME: &str = "mqrpc";

/// What the environment asks for.
#[derive(Debug, PartialEq)]
enum Decision {
    /// No exporter.
    Off,
    /// OTLP over HTTP with this protocol.
    Export(Protocol),
    /// Asked for something this build cannot do: the warning to print.
    Unsupported(String),
}

/// Whether and how to export, from the environment as `var` reads it (empty values
/// count as unset, as the specification says).
fn decide(var: impl Fn(&str) -> Option<String>) -> Decision {
    let var = |name: &str| var(name).filter(|value| !value.trim().is_empty());
    if var("OTEL_SDK_DISABLED").is_some_and(|value| value.trim().eq_ignore_ascii_case("true")) {
        return Decision::Off;
    }
    let endpoint = var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .map(|url| ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", url))
        .or_else(|| {
            var("OTEL_EXPORTER_OTLP_ENDPOINT").map(|url| ("OTEL_EXPORTER_OTLP_ENDPOINT", url))
        });
    match var("OTEL_TRACES_EXPORTER") {
        None if endpoint.is_none() => return Decision::Off,
        None => {}
        Some(exporters) => {
            let exporters: Vec<String> = exporters
                .split(',')
                .map(|name| name.trim().to_ascii_lowercase())
                .collect();
            if exporters.iter().any(|name| name == "none") {
                return Decision::Off;
            }
            if !exporters.iter().any(|name| name == "otlp") {
                return Decision::Unsupported(format!(
                    "OTEL_TRACES_EXPORTER={}: this mqrpc exports traces over OTLP only \
                     (otlp or none)",
                    exporters.join(",")
                ));
            }
        }
    }
    if let Some((name, url)) = &endpoint
        && url
            .trim()
            .get(..8)
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case("https://"))
    {
        return Decision::Unsupported(format!(
            "{name}={url}: this mqrpc exports traces without TLS (http:// only)"
        ));
    }
    let (name, protocol) = match var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") {
        Some(protocol) => ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", protocol),
        None => match var("OTEL_EXPORTER_OTLP_PROTOCOL") {
            Some(protocol) => ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol),
            None => return Decision::Export(Protocol::HttpBinary),
        },
    };
    match protocol.trim() {
        "http/protobuf" => Decision::Export(Protocol::HttpBinary),
        "http/json" => Decision::Export(Protocol::HttpJson),
        other => Decision::Unsupported(format!(
            "{name}={other}: this mqrpc exports traces over HTTP only \
             (http/protobuf or http/json)"
        )),
    }
}

/// The tracer provider whose batch processor holds the spans not yet sent.
pub(crate) struct Exporting {
    provider: SdkTracerProvider,
}

impl Exporting {
    /// Sends the spans still held and stops the exporter; waits for the collector
    /// within the exporter's timeout (`OTEL_EXPORTER_OTLP_TIMEOUT`, 10 s by default).
    pub(crate) async fn shutdown(self) {
        // Blocks on the batch processor's thread: not on a runtime worker.
        let provider = self.provider;
        match tokio::task::spawn_blocking(move || provider.shutdown()).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => eprintln!("mqrpc: warning: sending the last traces: {err}"),
            Err(err) => eprintln!("mqrpc: warning: sending the last traces: {err}"),
        }
    }
}

/// The layer that exports the mqrpc crates' spans, with its own filter, and the
/// provider to shut down at exit; `None` when the environment does not ask for
/// traces or asks for what cannot be done (then with a warning on stderr).
pub(crate) fn layer<S>() -> Option<(impl Layer<S> + Send + Sync + 'static, Exporting)>
where
    S: Subscriber + for<'span> LookupSpan<'span> + Send + Sync,
{
    let protocol = match decide(|name| std::env::var(name).ok()) {
        Decision::Off => return None,
        Decision::Export(protocol) => protocol,
        Decision::Unsupported(why) => {
            eprintln!("mqrpc: warning: not exporting traces: {why}");
            return None;
        }
    };
    let exporter = match SpanExporter::builder()
        .with_http()
        .with_protocol(protocol)
        .build()
    {
        Ok(exporter) => exporter,
        Err(err) => {
            eprintln!("mqrpc: warning: not exporting traces: {err}");
            return None;
        }
    };
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource())
        .build();
    let tracer = provider.tracer("mqrpc");
    // INFO spans (and their events) of the library and its backends, whatever
    // MQRPC_LOG lets through to stderr; nothing of lapin, redis, async-nats or the
    // exporter itself.
    let mqrpc_crates = Targets::new()
        .with_target("rpc_core", LevelFilter::INFO)
        .with_target("mqrpc", LevelFilter::INFO)
        .with_target("transport_memory", LevelFilter::INFO)
        .with_target("transport_amqp", LevelFilter::INFO)
        .with_target("transport_redis", LevelFilter::INFO)
        .with_target("transport_nats", LevelFilter::INFO);
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(mqrpc_crates);
    Some((layer, Exporting { provider }))
}

/// The SDK's resource (`OTEL_RESOURCE_ATTRIBUTES`, `OTEL_SERVICE_NAME`), named
/// `mqrpc` when neither names the service.
fn resource() -> Resource {
    let named = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|name| !name.is_empty())
        || EnvResourceDetector::new()
            .detect()
            .get(&opentelemetry::Key::new("service.name"))
            .is_some();
    let builder = Resource::builder();
    if named {
        builder.build()
    } else {
        builder.with_service_name(DEFAULT_SERVICE_NAME).build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decide_with(vars: &[(&str, &str)]) -> Decision {
        decide(|name| {
            vars.iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| (*value).to_owned())
        })
    }

    #[test]
    fn exports_only_when_asked() {
        use Decision::{Export, Off};
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318");
        let traces_endpoint = (
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "http://c:4318/v1/traces",
        );
        assert_eq!(decide_with(&[]), Off);
        assert_eq!(decide_with(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "")]), Off);
        assert_eq!(decide_with(&[endpoint]), Export(Protocol::HttpBinary));
        assert_eq!(
            decide_with(&[traces_endpoint]),
            Export(Protocol::HttpBinary)
        );
        assert_eq!(
            decide_with(&[("OTEL_TRACES_EXPORTER", "otlp")]),
            Export(Protocol::HttpBinary)
        );
        assert_eq!(
            decide_with(&[endpoint, ("OTEL_TRACES_EXPORTER", "otlp,console")]),
            Export(Protocol::HttpBinary)
        );
        assert_eq!(
            decide_with(&[endpoint, ("OTEL_TRACES_EXPORTER", "none")]),
            Off
        );
        assert_eq!(decide_with(&[endpoint, ("OTEL_SDK_DISABLED", "TRUE")]), Off);
        assert_eq!(
            decide_with(&[endpoint, ("OTEL_SDK_DISABLED", "false")]),
            Export(Protocol::HttpBinary)
        );
    }

    #[test]
    fn the_protocol_is_http_protobuf_or_json() {
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318");
        assert_eq!(
            decide_with(&[endpoint, ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")]),
            Decision::Export(Protocol::HttpJson)
        );
        // The traces' own variable wins.
        assert_eq!(
            decide_with(&[
                endpoint,
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
            ]),
            Decision::Export(Protocol::HttpBinary)
        );
        let Decision::Unsupported(why) =
            decide_with(&[endpoint, ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")])
        else {
            panic!("gRPC was accepted");
        };
        assert!(why.contains("OTEL_EXPORTER_OTLP_PROTOCOL=grpc"), "{why}");
        let Decision::Unsupported(why) =
            decide_with(&[endpoint, ("OTEL_TRACES_EXPORTER", "zipkin")])
        else {
            panic!("zipkin was accepted");
        };
        assert!(why.contains("OTEL_TRACES_EXPORTER=zipkin"), "{why}");
        let Decision::Unsupported(why) = decide_with(&[(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "HTTPS://collector:4318/v1/traces",
        )]) else {
            panic!("TLS was accepted");
        };
        assert!(why.contains("without TLS"), "{why}");
    }
}
