//! `mqrpc serve`: a demo server for smoke tests and benchmarks, version 1.3.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result};
use futures::StreamExt;
use mqrpc::{Context, Endpoint, RemoteError, Server, Target, Version};
use serde::Deserialize;
use serde_json::Value;

use crate::ServeArgs;
use crate::health::HealthEndpoint;

#[derive(Deserialize)]
struct Echo {
    payload: Value,
}

#[derive(Deserialize)]
struct Add {
    a: f64,
    b: f64,
}

#[derive(Deserialize)]
struct Sleep {
    seconds: f64,
}

#[derive(Deserialize)]
struct Fail {
    message: String,
}

#[derive(Deserialize)]
struct Count {
    n: u64,
}

/// The most items `count(n)` streams: a larger `n` fails with `ValueError`, so that
/// no stream of the demo server runs (nearly) forever.
pub(crate) const MAX_COUNT: u64 = 10_000;

#[derive(Deserialize)]
struct Bump {
    /// How long the handler works before it counts (default: not at all).
    #[serde(default)]
    seconds: f64,
}

/// Waits `seconds`, or fails with `ValueError` when that is not a duration.
async fn pause(seconds: f64) -> Result<(), RemoteError> {
    let Ok(pause) = Duration::try_from_secs_f64(seconds) else {
        return Err(RemoteError::new(
            "ValueError",
            "seconds must be a non-negative number",
        ));
    };
    // A zero pause must not touch the timer: `sleep(0)` still waits for the next
    // timer tick (a millisecond), which would cap `bump` casts at 1 000/s per
    // handler.
    if !pause.is_zero() {
        tokio::time::sleep(pause).await;
    }
    Ok(())
}

/// A number as JSON: an integer when it is one, so `add(1, 2)` prints `3`.
fn number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 9.0e15 {
        Value::from(x as i64)
    } else {
        Value::from(x)
    }
}

/// The demo endpoint: `echo(payload)`, `add(a, b)`, `sleep(seconds)`, `fail(message)`
/// (a Python `ValueError`), `count(n)` streaming 0..n (`n` at most [`MAX_COUNT`]),
/// `bump(seconds = 0)` (works `seconds`, then counts), `bumps()` (the count) and
/// `echoes()` (how many `echo` calls this server handled: `mqrpc bench` asks each
/// server directly, to tell how evenly competing servers share the calls).
/// Arguments a method does not take (a `payload` beside `seconds`, say) are read
/// and ignored.
pub(crate) fn endpoint(bumps: Arc<AtomicU64>) -> Endpoint {
    let read = bumps.clone();
    let echoes = Arc::new(AtomicU64::new(0));
    let echoes_read = echoes.clone();
    Endpoint::new()
        .version(Version::new(1, 3))
        .method("echo", move |_ctx: Context, args: Echo| {
            echoes.fetch_add(1, Ordering::Relaxed);
            async move { Ok::<_, RemoteError>(args.payload) }
        })
        .method("add", |_ctx: Context, args: Add| async move {
            Ok::<_, RemoteError>(number(args.a + args.b))
        })
        .method("sleep", |_ctx: Context, args: Sleep| async move {
            pause(args.seconds).await?;
            Ok::<_, RemoteError>(number(args.seconds))
        })
        .method("fail", |_ctx: Context, args: Fail| async move {
            Err::<(), _>(RemoteError::new("ValueError", args.message))
        })
        .stream_method("count", |_ctx: Context, args: Count| {
            if args.n <= MAX_COUNT {
                futures::stream::iter((0..args.n).map(Ok)).left_stream()
            } else {
                let too_many = RemoteError::new(
                    "ValueError",
                    format!("n must be at most {MAX_COUNT}, not {}", args.n),
                );
                futures::stream::iter([Err(too_many)]).right_stream()
            }
        })
        .method("bump", move |_ctx: Context, args: Bump| {
            let bumps = bumps.clone();
            async move {
                pause(args.seconds).await?;
                bumps.fetch_add(1, Ordering::Relaxed);
                Ok::<_, RemoteError>(())
            }
        })
        .method("bumps", move |_ctx: Context, _args: mqrpc::NoArgs| {
            let count = read.load(Ordering::Relaxed);
            async move { Ok::<_, RemoteError>(count) }
        })
        .method("echoes", move |_ctx: Context, _args: mqrpc::NoArgs| {
            let count = echoes_read.load(Ordering::Relaxed);
            async move { Ok::<_, RemoteError>(count) }
        })
}

/// Resolves once standard input reaches its end (or fails). Read on a thread of its
/// own, not the runtime's blocking pool: the runtime would wait for a read still
/// blocked when the server stops on a signal.
fn stdin_end() -> tokio::sync::oneshot::Receiver<()> {
    let (ended, end) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
        let _ = ended.send(());
    });
    end
}

/// One demo server of `args` named `name`, on a connection of its own.
async fn start(args: &ServeArgs, name: &str) -> Result<Server> {
    let transport = mqrpc::connect(&args.url).await.context("connecting")?;
    let mut builder = Server::builder(transport, Target::new(&args.topic).server(name))
        .endpoint(endpoint(Arc::new(AtomicU64::new(0))))
        .concurrency(args.concurrency)
        .max_pending_bytes(args.max_pending_bytes)
        .discoverable(!args.no_discovery)
        .oslo_ping(args.rpc_ping);
    if let Some(auth) = args.auth.message_auth()? {
        builder = builder.message_auth(auth);
    }
    builder.start().await.context("starting the server")
}

/// `mqrpc serve`. SIGINT or SIGTERM stops it at any time: while it connects or
/// declares, at once; while it serves, gracefully (the requests in progress finish,
/// within the server's grace period). A second signal during that shutdown exits at
/// once with status 130, abandoning them.
pub(crate) async fn serve(args: ServeArgs) -> Result<()> {
    let server_name =
        (args.server.clone()).unwrap_or_else(|| format!("mqrpc-{}", std::process::id()));
    if crate::in_process(&args.url) {
        eprintln!(
            "mqrpc: warning: {}; no client can call this server",
            crate::IN_PROCESS
        );
    }
    // Before the server exists: its metrics are registered with this recorder.
    if let Some(addr) = args.metrics_addr {
        crate::metrics::export(addr)?;
    }
    // Listening before connecting: a bad address fails at once, and a probe hears
    // "starting" while the broker is reached.
    let health = match args.health_addr {
        Some(addr) => Some(HealthEndpoint::bind(addr, &args.topic, &server_name).await?),
        None => None,
    };
    // One catcher for the whole run: one made per wait would miss a signal that
    // came between two waits.
    let mut signals = crate::StopSignals::new();
    let stdin_end = args.stop_at_stdin_end.then(stdin_end);
    let stopped_starting = || {
        eprintln!("mqrpc: stopped before serving");
        Ok(())
    };
    let names: Vec<String> = match args.instances {
        None => vec![server_name.clone()],
        Some(n) => (0..n).map(|i| format!("{server_name}-{i}")).collect(),
    };
    // Each server on a connection of its own, as separate services would be.
    let starting = futures::future::try_join_all(names.iter().map(|name| start(&args, name)));
    let servers = tokio::select! {
        () = signals.next() => return stopped_starting(),
        started = starting => started?,
    };
    let mut ready = match args.instances {
        None => {
            eprintln!(
                "mqrpc: serving topic {} as server {} (Ctrl-C stops)",
                args.topic, server_name
            );
            serde_json::json!({"event": "ready", "topic": args.topic, "server": server_name})
        }
        Some(n) => {
            eprintln!(
                "mqrpc: serving topic {} as {n} servers {server_name}-0 to {server_name}-{} \
                 (Ctrl-C stops)",
                args.topic,
                n - 1
            );
            serde_json::json!({"event": "ready", "topic": args.topic, "servers": names})
        }
    };
    if let (Some(health), Some(server)) = (&health, servers.first()) {
        health.serve(server.health_probe());
        eprintln!("mqrpc: health at http://{}/health", health.addr());
        ready["health_addr"] = health.addr().to_string().into();
    }
    println!("{ready}");
    match stdin_end {
        Some(end) => {
            tokio::select! {
                () = signals.next() => {}
                _ = end => {}
            }
        }
        None => signals.next().await,
    }
    eprintln!(
        "mqrpc: stopping: the requests in progress finish first (Ctrl-C again exits at once)"
    );
    // All at once: on Redis each waits out its blocking read.
    let stopping = futures::future::join_all(servers.into_iter().map(Server::shutdown));
    tokio::select! {
        stopped = stopping => {
            stopped.into_iter().collect::<Result<Vec<()>, _>>().context("shutting down")?;
        }
        () = signals.next() => {
            eprintln!("mqrpc: exiting at once; requests in progress are abandoned");
            std::process::exit(crate::EXIT_INTERRUPTED);
        }
    }
    Ok(())
}
