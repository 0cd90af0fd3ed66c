//! A calculator service and its client in one process, on the in-process bus:
//! `call`, `multicall`, `cast`, a fanout cast to two servers, a call directed at one
//! server, a typed remote error and a version mismatch.
//!
//! Run with `cargo run --example calculator` (add `RUST_LOG=debug` to see the
//! library's logs). Swap `memory://` for a broker URL once its backend exists.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use mqrpc::{
    Client, Context, Endpoint, Error, NoArgs, RemoteError, Server, Target, Transport, Version,
};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

const TOPIC: &str = "calculator";
/// The interface version both servers implement.
const IMPLEMENTED: Version = Version::new(1, 1);
/// How long the client waits for a cast's effect before giving up.
const SETTLE: Duration = Duration::from_secs(5);

type BoxResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Keyword arguments of `add` and `divide`, shared by both sides.
#[derive(Debug, Serialize, Deserialize)]
struct Pair {
    a: i64,
    b: i64,
}

/// Keyword arguments of `count`.
#[derive(Debug, Serialize, Deserialize)]
struct Count {
    n: u64,
}

/// The calculator's own error; it travels in the failure's `kwargs["error"]` and
/// the client decodes it back into this enum.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum CalcError {
    DivideByZero,
    Overflow,
}

impl fmt::Display for CalcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CalcError::DivideByZero => "division by zero",
            CalcError::Overflow => "result does not fit in an i64",
        })
    }
}

/// State every server shares, as a database behind a service would be.
#[derive(Default)]
struct Shared {
    bumps: AtomicU64,
    /// Woken whenever a cast changed something, so the client waits without polling.
    changed: Notify,
}

/// State of one server process.
struct Local {
    name: String,
    pings: AtomicU64,
}

/// The calculator interface, served by every server of the topic.
fn calculator(shared: Arc<Shared>, local: Arc<Local>) -> Endpoint {
    let bump_state = shared.clone();
    let bumps_state = shared.clone();
    let ping_shared = shared;
    let ping_local = local.clone();
    let pings_local = local.clone();
    Endpoint::new()
        .version(IMPLEMENTED)
        .method("add", |_ctx: Context, args: Pair| async move {
            args.a.checked_add(args.b).ok_or(CalcError::Overflow)
        })
        .method("divide", |_ctx: Context, args: Pair| async move {
            if args.b == 0 {
                return Err(CalcError::DivideByZero);
            }
            args.a.checked_div(args.b).ok_or(CalcError::Overflow)
        })
        .stream_method("count", |_ctx: Context, args: Count| {
            futures::stream::iter((0..args.n).map(Ok::<_, RemoteError>))
        })
        .method("bump", move |_ctx: Context, _args: NoArgs| {
            let shared = bump_state.clone();
            async move {
                let bumps = shared.bumps.fetch_add(1, Ordering::SeqCst) + 1;
                shared.changed.notify_waiters();
                Ok::<_, RemoteError>(bumps)
            }
        })
        .method("bumps", move |_ctx: Context, _args: NoArgs| {
            let shared = bumps_state.clone();
            async move { Ok::<_, RemoteError>(shared.bumps.load(Ordering::SeqCst)) }
        })
        .method("ping", move |_ctx: Context, _args: NoArgs| {
            let (shared, local) = (ping_shared.clone(), ping_local.clone());
            async move {
                let pings = local.pings.fetch_add(1, Ordering::SeqCst) + 1;
                shared.changed.notify_waiters();
                Ok::<_, RemoteError>(pings)
            }
        })
        .method("pings", move |_ctx: Context, _args: NoArgs| {
            let local = pings_local.clone();
            async move { Ok::<_, RemoteError>(local.pings.load(Ordering::SeqCst)) }
        })
        .method("whoami", move |_ctx: Context, _args: NoArgs| {
            let local = local.clone();
            async move { Ok::<_, RemoteError>(local.name.clone()) }
        })
}

async fn start_server(
    transport: Arc<dyn Transport>,
    shared: Arc<Shared>,
    name: &str,
) -> BoxResult<Server> {
    let local = Arc::new(Local {
        name: name.to_owned(),
        pings: AtomicU64::new(0),
    });
    Ok(Server::builder(transport, Target::new(TOPIC).server(name))
        .endpoint(calculator(shared, local))
        .start()
        .await?)
}

/// Waits until `done` (which asks the servers over RPC) holds, waking on `changed`
/// instead of polling. Gives up after [`SETTLE`].
async fn wait_until<F, Fut>(changed: &Notify, mut done: F) -> BoxResult<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = mqrpc::Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        // Register before checking, so a change between the check and the wait
        // still wakes us.
        let notified = changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if done().await? {
            return Ok(());
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return Err(format!("nothing changed within {SETTLE:?}").into());
        }
    }
}

#[tokio::main]
async fn main() -> BoxResult<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();

    // `memory://` is a private in-process bus; servers and client must share it.
    let transport = mqrpc::connect("memory://").await?;
    let shared = Arc::new(Shared::default());
    let server_a = start_server(transport.clone(), shared.clone(), "server-a").await?;
    let server_b = start_server(transport.clone(), shared.clone(), "server-b").await?;

    let client = Client::new(transport, Target::new(TOPIC)).timeout(Duration::from_secs(5));
    let ctx = Context::new().with("request_id", "req-calculator-1");

    // call: one server of the topic answers.
    let sum: i64 = client.call(&ctx, "add", Pair { a: 2, b: 3 }).await?;
    println!("call add(2, 3) = {sum}");

    // multicall: one reply per streamed item, then the end of the stream.
    let items: Vec<mqrpc::Result<u64>> = client
        .multicall(&ctx, "count", Count { n: 5 })
        .await?
        .collect()
        .await;
    let items = items.into_iter().collect::<mqrpc::Result<Vec<u64>>>()?;
    println!("multicall count(5) = {items:?}");

    // cast: fire and forget; the effect is visible once a server handled it.
    const BUMPS: u64 = 3;
    for _ in 0..BUMPS {
        client.cast(&ctx, "bump", NoArgs {}).await?;
    }
    wait_until(&shared.changed, || {
        let (client, ctx) = (&client, &ctx);
        async move {
            let bumps: u64 = client.call(ctx, "bumps", NoArgs {}).await?;
            Ok(bumps >= BUMPS)
        }
    })
    .await?;
    let bumps: u64 = client.call(&ctx, "bumps", NoArgs {}).await?;
    println!("cast bump x{BUMPS}, then call bumps() = {bumps}");

    // fanout cast: every server of the topic gets a copy.
    client
        .prepare()
        .fanout(true)
        .cast(&ctx, "ping", NoArgs {})
        .await?;
    let pings_of = |server: &'static str| {
        let (client, ctx) = (&client, &ctx);
        async move {
            client
                .prepare()
                .server(server)
                .call::<_, u64>(ctx, "pings", NoArgs {})
                .await
        }
    };
    wait_until(&shared.changed, || async {
        Ok(pings_of("server-a").await? >= 1 && pings_of("server-b").await? >= 1)
    })
    .await?;
    println!(
        "fanout cast ping: server-a counted {}, server-b counted {}",
        pings_of("server-a").await?,
        pings_of("server-b").await?
    );

    // directed call: only the named server's own queue gets it.
    let name: String = client
        .prepare()
        .server("server-b")
        .call(&ctx, "whoami", NoArgs {})
        .await?;
    println!("directed call whoami() on server-b = {name}");

    // remote error: the handler's error enum comes back as the same enum.
    match client
        .call::<_, i64>(&ctx, "divide", Pair { a: 1, b: 0 })
        .await
    {
        Ok(quotient) => return Err(format!("divide(1, 0) returned {quotient}").into()),
        Err(err) => match err.as_remote().and_then(|r| r.decode::<CalcError>()) {
            Some(calc) => println!("call divide(1, 0) = Err(CalcError::{calc:?}) [{err}]"),
            None => return Err(err.into()),
        },
    }

    // version mismatch: the servers implement 1.1, so 1.0 and 1.1 work and 2.0 does not.
    let sum: i64 = client
        .prepare()
        .version(Version::new(1, 0))
        .call(&ctx, "add", Pair { a: 1, b: 1 })
        .await?;
    println!("call add(1, 1) at version 1.0 = {sum}");
    match client
        .prepare()
        .version(Version::new(2, 0))
        .call::<_, i64>(&ctx, "add", Pair { a: 1, b: 1 })
        .await
    {
        Err(Error::UnsupportedVersion { version, method }) => {
            println!("call {method}(1, 1) at version {version} = Err(UnsupportedVersion)");
        }
        other => return Err(format!("expected UnsupportedVersion, got {other:?}").into()),
    }

    server_a.shutdown().await?;
    server_b.shutdown().await?;
    println!("servers shut down");
    Ok(())
}
