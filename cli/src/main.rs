//! `mqrpc`: call, cast, listen to and serve mqrpc topics on any backend, ask a topic
//! who serves it (`mqrpc ping`, `mqrpc status`), and measure them (`mqrpc bench`). The URL picks the backend: `memory://`, `amqp://`,
//! `rabbit://`, `redis://`, `nats://`.

mod bench;
mod demo;
mod discover;
mod health;
mod metrics;
mod notify;
#[cfg(feature = "otel")]
mod otel;
#[cfg(test)]
mod skips;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use clap::{Args, Parser, Subcommand};
use futures::StreamExt;
use mqrpc::{Client, Context, Error, Target, Transport, Version};
use serde_json::Value;

// The benchmark figures (mqrpc and the raw clients alike) are taken with mimalloc;
// glibc's malloc costs a busy 2-core machine measurably more per call. It is built
// without transparent huge pages (see Cargo.toml).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// OpenStack-style RPC from the command line.
#[derive(Parser, Debug)]
#[command(name = "mqrpc", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Call METHOD and print its JSON result (or the remote error, exit status 1).
    Call(CallArgs),
    /// Cast METHOD (fire and forget); prints nothing on success.
    Cast(CallArgs),
    /// Call METHOD and print each streamed result on its own line (multicall).
    Multicall(CallArgs),
    /// Print the messages passing on a topic, one JSON line each, without taking them
    /// from its servers; with --notifications, take and print its notifications.
    Listen(ListenArgs),
    /// Send one notification (oslo.messaging's messagingv2 format) to
    /// `<topic>.<priority>`; prints nothing on success.
    Notify(notify::NotifyArgs),
    /// Run a demo server (version 1.3): echo, add, sleep, fail, count, bump, bumps,
    /// echoes; with --instances, several.
    Serve(ServeArgs),
    /// Measure latency and throughput (with --raw, beside the broker's bare client).
    Bench(bench::BenchArgs),
    /// Ask TOPIC who serves it: each server's name, host, process id and round trip
    /// (exit status 1 when none answers).
    Ping(discover::DiscoverArgs),
    /// Ask TOPIC's servers for their status: host, process, versions, uptime, load
    /// and endpoints (exit status 1 when none answers).
    Status(discover::DiscoverArgs),
}

/// Message authentication (HMAC-SHA256), for peers that require signed messages.
#[derive(Args, Debug, Default)]
pub(crate) struct AuthArgs {
    /// Sign with the key in this file (its bytes; a trailing newline is ignored) and
    /// accept messages it signs; needs --auth-key-id.
    #[arg(long, env = "MQRPC_AUTH_KEY_FILE", requires = "auth_key_id")]
    pub(crate) auth_key_file: Option<std::path::PathBuf>,
    /// The id of that key.
    #[arg(long, env = "MQRPC_AUTH_KEY_ID", requires = "auth_key_file")]
    pub(crate) auth_key_id: Option<String>,
    /// Also accept messages signed with another key, as ID=FILE (repeatable; for key
    /// rotation).
    #[arg(long, value_name = "ID=FILE")]
    pub(crate) auth_accept: Vec<String>,
}

impl AuthArgs {
    /// The `MessageAuth` these options describe, if any.
    pub(crate) fn message_auth(&self) -> Result<Option<mqrpc::MessageAuth>> {
        let read = |path: &std::path::Path| -> Result<Vec<u8>> {
            let mut key = std::fs::read(path)
                .with_context(|| format!("reading the key file {}", path.display()))?;
            while key.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                key.pop();
            }
            Ok(key)
        };
        let (Some(id), Some(file)) = (&self.auth_key_id, &self.auth_key_file) else {
            if !self.auth_accept.is_empty() {
                bail!("--auth-accept needs --auth-key-id and --auth-key-file");
            }
            return Ok(None);
        };
        let mut auth = mqrpc::MessageAuth::new(id.clone(), read(file)?)?;
        for other in &self.auth_accept {
            let (id, file) = other
                .split_once('=')
                .with_context(|| format!("--auth-accept {other:?} is not ID=FILE"))?;
            auth = auth.accept(id, read(std::path::Path::new(file))?)?;
        }
        Ok(Some(auth))
    }
}

/// Where to send and what.
#[derive(Args, Debug)]
struct CallArgs {
    /// Broker URL (amqp://, rabbit://, redis://, nats://, ...; not memory://, a bus
    /// inside one process that no other command can reach).
    #[arg(long, env = "MQRPC_URL")]
    url: String,
    /// Topic.
    #[arg(long)]
    topic: String,
    /// Send to this server of the topic only.
    #[arg(long)]
    server: Option<String>,
    /// Send to every server of the topic (casts only).
    #[arg(long)]
    fanout: bool,
    /// Interface version asked for (`X.Y` or `X.Y.Z`).
    #[arg(long)]
    version: Option<Version>,
    /// Interface namespace.
    #[arg(long)]
    namespace: Option<String>,
    /// Overall deadline: seconds (`30`, `0.5`) or with a unit (`30s`, `500ms`, `2m`).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    timeout: Duration,
    /// Ask the server for heartbeats, failing after this much silence: seconds or
    /// with a unit (`10`, `10s`).
    #[arg(long, value_parser = parse_duration)]
    call_monitor: Option<Duration>,
    /// Context as a JSON object.
    #[arg(long, default_value = "{}")]
    context: String,
    #[command(flatten)]
    auth: AuthArgs,
    /// Method name.
    method: String,
    /// Keyword arguments as a JSON object.
    #[arg(default_value = "{}")]
    args: String,
}

/// What to watch.
#[derive(Args, Debug)]
struct ListenArgs {
    /// Broker URL (on memory://, a bus inside this process, nothing passes).
    #[arg(long, env = "MQRPC_URL")]
    url: String,
    /// Topic (with --notifications, default `notifications`).
    #[arg(long, required_unless_present = "notifications")]
    topic: Option<String>,
    /// Stop after this many messages.
    #[arg(long)]
    count: Option<u64>,
    #[command(flatten)]
    notifications: notify::NotificationArgs,
}

/// What to serve.
#[derive(Args, Debug)]
pub(crate) struct ServeArgs {
    /// Broker URL (on memory://, a bus inside this process, no client can call).
    #[arg(long, env = "MQRPC_URL")]
    pub(crate) url: String,
    /// Topic.
    #[arg(long)]
    pub(crate) topic: String,
    /// This server's name (default: `mqrpc-<process id>`).
    #[arg(long)]
    pub(crate) server: Option<String>,
    /// Run N servers in this process, each on a connection of its own, named
    /// `<server>-0` to `<server>-<N-1>`: competing consumers of the topic, as N
    /// separate services would be (`mqrpc bench --servers-in child` runs its servers
    /// so). The ready line, printed once all serve, names them: `"servers": [...]`.
    #[arg(
        long,
        value_name = "N",
        conflicts_with = "health_addr",
        value_parser = clap::value_parser!(u32).range(1..=10_000)
    )]
    pub(crate) instances: Option<u32>,
    /// Handlers running at once.
    #[arg(long, default_value_t = mqrpc::DEFAULT_CONCURRENCY)]
    pub(crate) concurrency: usize,
    /// Bytes of requests taken from the broker but not yet handled that the server
    /// holds at most (more wait in the broker; core NATS drops them): bytes
    /// (`1048576`) or with a unit (`64MiB`, `512KiB`, `1GiB`, `100MB`, `64kB`).
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    pub(crate) max_pending_bytes: usize,
    /// Serve the server's health over HTTP on this address (`127.0.0.1:8080`; port 0
    /// picks one, named in the ready line): `GET /health` answers 200 while it is
    /// consuming, 503 while starting, reconnecting or stopping, with a JSON body.
    #[arg(long, value_name = "IP:PORT")]
    pub(crate) health_addr: Option<std::net::SocketAddr>,
    /// Serve the server's metrics in Prometheus's text format on this address
    /// (`127.0.0.1:9464`: http://127.0.0.1:9464/metrics).
    #[arg(long, value_name = "ADDR")]
    pub(crate) metrics_addr: Option<std::net::SocketAddr>,
    #[command(flatten)]
    pub(crate) auth: AuthArgs,
    /// Do not answer `mqrpc ping` and `mqrpc status` (the control requests of
    /// namespace mqrpc.control): askers do not learn this server is there.
    #[arg(long)]
    pub(crate) no_discovery: bool,
    /// Answer oslo.messaging's `oslo_rpc_server_ping` with "pong", as a Python
    /// server with rpc_ping_enabled does.
    #[arg(long)]
    pub(crate) rpc_ping: bool,
    /// Also stop (gracefully, as on SIGTERM) when standard input reaches its end: a
    /// parent holding the other end of a pipe stops the server by closing it, and
    /// cannot leave it behind when it dies (`mqrpc bench --servers-in child`).
    #[arg(long)]
    pub(crate) stop_at_stdin_end: bool,
}

/// A duration given as seconds (`30`, `0.5`, as oslo.messaging's options take them)
/// or with a unit (`30s`, `500ms`).
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    match text.trim().parse::<f64>() {
        Ok(seconds) => Duration::try_from_secs_f64(seconds)
            .map_err(|_| format!("{text:?} is not a duration in seconds")),
        Err(_) => humantime::parse_duration(text).map_err(|e| e.to_string()),
    }
}

/// A size in bytes: a whole number (`1048576`), or one with a unit, binary (`KiB`,
/// `MiB`, `GiB`) or decimal (`B`, `kB`, `MB`, `GB`); units are not case-sensitive.
fn parse_size(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size (bytes, or a number and a unit)"))?;
    let unit_bytes: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        other => {
            return Err(format!(
                "{other:?} is not a unit of size: use B, KiB, MiB, GiB, kB, MB or GB"
            ));
        }
    };
    number
        .checked_mul(unit_bytes)
        .and_then(|bytes| usize::try_from(bytes).ok())
        .filter(|bytes| *bytes > 0)
        .ok_or_else(|| format!("{text:?} is not a size between 1 byte and {}", usize::MAX))
}

pub(crate) fn parse_object(text: &str, what: &str) -> Result<serde_json::Map<String, Value>> {
    match serde_json::from_str::<Value>(text).with_context(|| format!("{what} is not JSON"))? {
        Value::Object(map) => Ok(map),
        other => bail!("{what} must be a JSON object, not {other}"),
    }
}

/// The client `args` describe, whose calls time out after `timeout`.
fn client(transport: Arc<dyn Transport>, args: &CallArgs, timeout: Duration) -> Result<Client> {
    let mut target = Target::new(&args.topic);
    target.server.clone_from(&args.server);
    target.fanout = args.fanout;
    target.namespace.clone_from(&args.namespace);
    target.version = args.version;
    let client = Client::new(transport, target)
        .timeout(timeout)
        .call_monitor(args.call_monitor);
    Ok(match args.auth.message_auth()? {
        Some(auth) => client.message_auth(auth),
        None => client,
    })
}

/// Prints an RPC error the way an operator needs it, and gives the exit status.
fn report(err: &Error) -> ExitCode {
    match err {
        Error::Remote(remote) => {
            let document = serde_json::json!({
                "error": {
                    "class": remote.class,
                    "module": remote.module,
                    "message": remote.message,
                    "traceback": remote.traceback,
                    "kwargs": remote.kwargs,
                }
            });
            println!("{document}");
        }
        // With its causes: "JetStream did not store the cast" alone does not say
        // that the stream has no leader.
        other => eprintln!("mqrpc: {}", chain(other)),
    }
    ExitCode::FAILURE
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Call(args) => {
            let (client, ctx, kwargs) = prepare(&args).await?;
            match client.call::<_, Value>(&ctx, &args.method, kwargs).await {
                Ok(result) => {
                    println!("{result}");
                    Ok(ExitCode::SUCCESS)
                }
                Err(err) => Ok(report(&err)),
            }
        }
        Command::Cast(args) => {
            let (client, ctx, kwargs) = prepare(&args).await?;
            match client.cast(&ctx, &args.method, kwargs).await {
                Ok(()) => Ok(ExitCode::SUCCESS),
                Err(err) => Ok(report(&err)),
            }
        }
        Command::Multicall(args) => {
            let (client, ctx, kwargs) = prepare(&args).await?;
            let mut stream = match client
                .multicall::<_, Value>(&ctx, &args.method, kwargs)
                .await
            {
                Ok(stream) => stream,
                Err(err) => return Ok(report(&err)),
            };
            while let Some(item) = stream.next().await {
                match item {
                    Ok(value) => println!("{value}"),
                    Err(err) => return Ok(report(&err)),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Listen(args) => listen(args).await.map(|()| ExitCode::SUCCESS),
        Command::Notify(args) => notify::notify(args).await.map(|()| ExitCode::SUCCESS),
        Command::Serve(args) => demo::serve(args).await.map(|()| ExitCode::SUCCESS),
        Command::Bench(args) => bench::run(args).await.map(|()| ExitCode::SUCCESS),
        Command::Ping(args) => discover::run(args, discover::Report::Ping).await,
        Command::Status(args) => discover::run(args, discover::Report::Status).await,
    }
}

/// One message seen on the topic, as printed by `listen`.
fn describe(body: &[u8]) -> Value {
    match mqrpc::wire::decode_request(body) {
        Ok(request) => serde_json::json!({
            "method": request.method,
            "args": request.args,
            "context": request.context,
            "namespace": request.namespace,
            "version": request.version,
            "kind": if request.is_call() { "call" } else { "cast" },
            "msg_id": request.msg_id,
            "reply_to": request.reply_to,
        }),
        Err(err) => serde_json::json!({"malformed": err.reason(), "size": body.len()}),
    }
}

async fn listen(args: ListenArgs) -> Result<()> {
    if args.notifications.notifications {
        return notify::listen(
            &args.url,
            args.topic.as_deref(),
            args.count,
            args.notifications,
        )
        .await;
    }
    let topic = args.topic.context("--topic is required")?;
    if in_process(&args.url) {
        eprintln!("mqrpc: warning: {IN_PROCESS}; nothing can pass on this topic");
    }
    let stop = stopped();
    tokio::pin!(stop);
    let transport = tokio::select! {
        () = &mut stop => return Ok(()),
        transport = mqrpc::connect(&args.url) => transport.context("connecting")?,
    };
    let target = Target::new(&topic);
    let mut tap = tokio::select! {
        () = &mut stop => return Ok(()),
        tap = transport.monitor(&target) => tap.context("watching the topic")?,
    };
    eprintln!("mqrpc: listening on topic {topic} (Ctrl-C stops)");
    let mut seen = 0u64;
    loop {
        let next = tokio::select! {
            () = &mut stop => break,
            next = tap.recv() => next,
        };
        match next {
            None => break,
            Some(Err(err)) => eprintln!("mqrpc: {}", chain(&err)),
            Some(Ok(delivery)) => {
                println!("{}", describe(delivery.body()));
                seen += 1;
                if args.count.is_some_and(|limit| seen >= limit) {
                    break;
                }
            }
        }
    }
    // Leaves the broker as it was (a Redis watcher removes its groups).
    tap.stop().await.context("stopping the watcher")?;
    Ok(())
}

/// Why a command of its own process cannot use the memory bus: the CLI documents a
/// broker (a local `nats-server` is one binary) for trying commands across processes.
pub(crate) const IN_PROCESS: &str = "memory:// is a bus inside one process, which no other \
    mqrpc process can reach; use a broker URL (a local nats-server: nats://127.0.0.1:4222; \
    amqp://, redis://), or `mqrpc bench --url memory://`, which runs its servers and clients \
    in one process";

/// Whether `url` names the in-process memory bus.
pub(crate) fn in_process(url: &str) -> bool {
    url.trim_start()
        .get(..7)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("memory:"))
}

/// The client of a `call`, `cast` or `multicall`, its context and its arguments.
/// `--timeout` bounds the whole command: connecting takes from it, and the call
/// gets what is left.
async fn prepare(args: &CallArgs) -> Result<(Client, Context, serde_json::Map<String, Value>)> {
    let started = tokio::time::Instant::now();
    // Fails at once instead of waiting out the timeout for a server that cannot exist.
    anyhow::ensure!(!in_process(&args.url), "{IN_PROCESS}");
    let kwargs = parse_object(&args.args, "ARGS")?;
    let ctx = Context::from(parse_object(&args.context, "--context")?);
    let transport = connect_within(&args.url, args.timeout).await?;
    let left = args
        .timeout
        .saturating_sub(started.elapsed())
        .max(Duration::from_millis(1));
    Ok((client(transport, args, left)?, ctx, kwargs))
}

/// The exit status of a command stopped at once by a second signal (128 + SIGINT, as
/// shells report a process that Ctrl-C ended).
pub(crate) const EXIT_INTERRUPTED: i32 = 130;

/// SIGINT (Ctrl-C) and SIGTERM, the ways an operator or a supervisor stops a command
/// that runs until stopped. Signals are caught from the moment this is made, so none
/// is missed between two waits, and each one is seen once.
pub(crate) struct StopSignals {
    interrupt: Option<tokio::signal::unix::Signal>,
    terminate: Option<tokio::signal::unix::Signal>,
}

impl StopSignals {
    /// Starts catching SIGINT and SIGTERM.
    pub(crate) fn new() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        StopSignals {
            interrupt: signal(SignalKind::interrupt()).ok(),
            terminate: signal(SignalKind::terminate()).ok(),
        }
    }

    /// Resolves at the next SIGINT or SIGTERM.
    pub(crate) async fn next(&mut self) {
        async fn one(signal: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
            signal.as_mut()?.recv().await
        }
        tokio::select! {
            Some(()) = one(&mut self.interrupt) => {}
            Some(()) = one(&mut self.terminate) => {}
            else => std::future::pending().await,
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM, the ways an operator or a supervisor stops a
/// command that runs until stopped.
pub(crate) async fn stopped() {
    StopSignals::new().next().await;
}

/// Whether a log event or span of `metadata` may be shown, whatever `MQRPC_LOG`
/// says. Never: TRACE of lapin and amq-protocol (their frame and URI dumps hold the
/// AMQP credentials, as bytes or text), nor lapin's report of a message the broker
/// returned (a WARN with the whole body as decimal bytes; mqrpc logs returned
/// messages itself, without content).
fn shown(metadata: &tracing::Metadata<'_>) -> bool {
    let target = metadata.target();
    let amqp_library =
        target == "lapin" || target.starts_with("lapin::") || target.starts_with("amq_protocol");
    if !amqp_library {
        return true;
    }
    let returned_message =
        target == "lapin::returned_messages" || target.starts_with("lapin::returned_messages::");
    *metadata.level() != tracing::Level::TRACE && !returned_message
}

/// What the process does before it exits: sends the spans it still holds.
#[derive(Default)]
struct Telemetry {
    #[cfg(feature = "otel")]
    traces: Option<otel::Exporting>,
}

impl Telemetry {
    async fn finish(self) {
        #[cfg(feature = "otel")]
        if let Some(traces) = self.traces {
            traces.shutdown().await;
        }
    }
}

/// Logs on stderr, filtered by `MQRPC_LOG` (default `warn`) and then by [`shown`];
/// with the feature `otel`, traces too when the `OTEL_*` variables ask for them
/// (see `otel.rs`), under a filter of their own.
fn init_telemetry() -> Telemetry {
    use tracing_subscriber::filter::{EnvFilter, FilterExt, filter_fn};
    use tracing_subscriber::prelude::*;

    let wanted = EnvFilter::try_from_env("MQRPC_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        // Colours only on a terminal, not in a log file or a pipe.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter(wanted.and(filter_fn(shown)));
    let registry = tracing_subscriber::registry().with(logs);
    // No layer at all unless traces are exported: an absent `Option` layer would
    // still say yes to every span, and each would be created for nobody (a tenth of
    // the bench's throughput).
    #[cfg(feature = "otel")]
    match otel::layer() {
        Some((layer, traces)) => {
            registry.with(layer).init();
            Telemetry {
                traces: Some(traces),
            }
        }
        None => {
            registry.init();
            Telemetry { traces: None }
        }
    }
    #[cfg(not(feature = "otel"))]
    {
        registry.init();
        Telemetry::default()
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let telemetry = init_telemetry();
    let code = match run(Cli::parse()).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("mqrpc: {}", chain(err.as_ref()));
            ExitCode::from(2)
        }
    };
    telemetry.finish().await;
    code
}

/// An error and its causes on one line, `: `-separated, leaving out a cause whose
/// text its parent already ends with (lapin, for one, prints its source inside its
/// own message and also returns it as the source).
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut line = String::new();
    for cause in std::iter::successors(Some(err), |cause| cause.source()) {
        let text = cause.to_string();
        // Only a whole cause counts: "reconnected" does not contain "connected".
        if line == text || line.ends_with(&format!(": {text}")) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Connects to `url`, failing after `timeout` (the command's `--timeout`, which
/// bounds connecting too).
pub(crate) async fn connect_within(url: &str, timeout: Duration) -> Result<Arc<dyn Transport>> {
    tokio::time::timeout(timeout, mqrpc::connect(url))
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "connecting: no answer within {} (--timeout)",
                humantime::format_duration(timeout)
            )
        })?
        .context("connecting")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_seconds_or_with_a_unit() {
        let ok = |text| parse_duration(text).expect(text);
        assert_eq!(ok("5"), Duration::from_secs(5));
        assert_eq!(ok("0.25"), Duration::from_millis(250));
        assert_eq!(ok("500ms"), Duration::from_millis(500));
        assert_eq!(ok("2m"), Duration::from_secs(120));
        for bad in ["-1", "inf", "NaN", "soon", ""] {
            assert!(parse_duration(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn sizes_read_as_bytes_or_with_a_unit() {
        let ok = |text| parse_size(text).expect(text);
        assert_eq!(ok("1048576"), 1 << 20);
        assert_eq!(ok("64MiB"), 64 << 20);
        assert_eq!(ok("64mib"), 64 << 20);
        assert_eq!(ok("16 MiB"), 16 << 20);
        assert_eq!(ok("512KiB"), 512 << 10);
        assert_eq!(ok("1GiB"), 1 << 30);
        assert_eq!(ok("100MB"), 100_000_000);
        assert_eq!(ok("64kB"), 64_000);
        assert_eq!(ok("7B"), 7);
        for bad in [
            "",
            "0",
            "0MiB",
            "MiB",
            "1.5MiB",
            "-1",
            "12XB",
            "99999999999999999999",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} was accepted");
        }
    }

    /// A cause that repeats the end of its parent's message is printed once.
    #[test]
    fn causes_already_in_the_message_are_not_repeated() {
        #[derive(Debug)]
        struct Wrapping(std::io::Error);
        impl std::fmt::Display for Wrapping {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "protocol error: {}", self.0)
            }
        }
        impl std::error::Error for Wrapping {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let inner = std::io::Error::other("refused");
        let err = anyhow::Error::new(Wrapping(inner)).context("connecting");
        assert_eq!(chain(err.as_ref()), "connecting: protocol error: refused");
        let plain = anyhow::anyhow!("refused").context("connecting");
        assert_eq!(chain(plain.as_ref()), "connecting: refused");
        let suffix = anyhow::anyhow!("connected").context("reconnected");
        assert_eq!(chain(suffix.as_ref()), "reconnected: connected");
    }
}
