//! A calculator service and its client in one process, on the in-process bus. The
//! interface is declared once, as a trait with `#[mqrpc::service]`: the servers
//! implement it and the client calls it through the generated `CalculatorClient`.
//! It shows `call`, `multicall` (a stream), `cast`, a fanout cast to two servers, a
//! call directed at one server, a typed remote error, and versions: a method added in
//! 1.1 refused by a server still at 1.0, and a request for 2.0 refused by all.
//!
//! Run with `cargo run --example calculator` (add `RUST_LOG=debug` to see the
//! library's logs). `examples/typed_service.rs` is the short version, on any backend.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::{Stream, StreamExt};
use mqrpc::{Context, Endpoint, Error, Server, Target, Transport, Version};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

const TOPIC: &str = "calculator";
/// How long the client waits for a cast's effect before giving up.
const SETTLE: Duration = Duration::from_secs(5);

type BoxResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// The calculator's own error: it travels in the failure's `kwargs["error"]` and the
/// client decodes it back into this enum with `Error::decode_remote`.
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

/// The calculator interface, version 1.1. A method without `since` is 1.0's, and its
/// client asks servers for 1.0; `power` came with 1.1, so its client asks for 1.1.
#[mqrpc::service(version = "1.1")]
trait Calculator {
    /// `a + b`.
    async fn add(&self, ctx: &Context, a: i64, b: i64) -> Result<i64, CalcError>;
    /// `a / b`, rounded towards zero.
    async fn divide(&self, ctx: &Context, a: i64, b: i64) -> Result<i64, CalcError>;
    /// `base` to the power `exp`.
    #[mqrpc(since = "1.1")]
    async fn power(&self, ctx: &Context, base: i64, exp: u32) -> Result<i64, CalcError>;
    /// `0, 1, ..., n - 1`, one reply each.
    #[mqrpc(stream)]
    fn count(&self, ctx: &Context, n: u64) -> impl Stream<Item = u64>;
    /// Counts a bump in the state every server shares; nobody waits for it.
    #[mqrpc(cast)]
    async fn bump(&self, ctx: &Context);
    /// The bumps counted by all servers.
    async fn bumps(&self, ctx: &Context) -> u64;
    /// Counts a ping on the server that receives it (sent as a fanout cast).
    #[mqrpc(cast)]
    async fn ping(&self, ctx: &Context);
    /// The pings this server received.
    async fn pings(&self, ctx: &Context) -> u64;
    /// This server's name.
    async fn whoami(&self, ctx: &Context) -> String;
}

/// State every server shares, as a database behind a service would be.
#[derive(Default)]
struct Shared {
    bumps: AtomicU64,
    /// Woken whenever a cast changed something, so the client waits without polling.
    changed: Notify,
}

/// One server: its own state, and the shared state. Methods borrow it through `&self`;
/// the macro keeps the `Arc` around it.
struct Calc {
    name: String,
    pings: AtomicU64,
    shared: Arc<Shared>,
}

impl Calculator for Calc {
    async fn add(&self, _ctx: &Context, a: i64, b: i64) -> Result<i64, CalcError> {
        a.checked_add(b).ok_or(CalcError::Overflow)
    }

    async fn divide(&self, _ctx: &Context, a: i64, b: i64) -> Result<i64, CalcError> {
        if b == 0 {
            return Err(CalcError::DivideByZero);
        }
        a.checked_div(b).ok_or(CalcError::Overflow)
    }

    async fn power(&self, _ctx: &Context, base: i64, exp: u32) -> Result<i64, CalcError> {
        base.checked_pow(exp).ok_or(CalcError::Overflow)
    }

    fn count(&self, _ctx: &Context, n: u64) -> impl Stream<Item = u64> {
        futures::stream::iter(0..n)
    }

    async fn bump(&self, _ctx: &Context) {
        self.shared.bumps.fetch_add(1, Ordering::SeqCst);
        self.shared.changed.notify_waiters();
    }

    async fn bumps(&self, _ctx: &Context) -> u64 {
        self.shared.bumps.load(Ordering::SeqCst)
    }

    async fn ping(&self, _ctx: &Context) {
        self.pings.fetch_add(1, Ordering::SeqCst);
        self.shared.changed.notify_waiters();
    }

    async fn pings(&self, _ctx: &Context) -> u64 {
        self.pings.load(Ordering::SeqCst)
    }

    async fn whoami(&self, _ctx: &Context) -> String {
        self.name.clone()
    }
}

async fn start_server(
    transport: Arc<dyn Transport>,
    shared: Arc<Shared>,
    name: &str,
) -> BoxResult<Server> {
    let calc = Calc {
        name: name.to_owned(),
        pings: AtomicU64::new(0),
        shared,
    };
    Ok(Server::builder(transport, Target::new(TOPIC).server(name))
        .endpoint(Calculator::endpoint(Arc::new(calc)))
        .start()
        .await?)
}

/// Keyword arguments of the old server's `add`.
#[derive(Deserialize)]
struct Pair {
    a: i64,
    b: i64,
}

/// A server not yet upgraded: interface 1.0, so no `power`. It is written with the
/// layer under the macro, a hand-written `Endpoint`; the typed client talks to it all
/// the same, since both send the same requests.
fn calculator_1_0() -> Endpoint {
    Endpoint::new()
        .version(Version::new(1, 0))
        .method("add", |_ctx: Context, args: Pair| async move {
            args.a.checked_add(args.b).ok_or(CalcError::Overflow)
        })
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

    let client = CalculatorClient::new(transport.clone(), Target::new(TOPIC))
        .timeout(Duration::from_secs(5));
    let ctx = Context::new().with("request_id", "req-calculator-1");

    // call: one server of the topic answers.
    println!("call add(2, 3) = {}", client.add(&ctx, 2, 3).await?);

    // multicall: one reply per streamed item, then the end of the stream.
    let items: Vec<mqrpc::Result<u64>> = client.count(&ctx, 5).await?.collect().await;
    let items = items.into_iter().collect::<mqrpc::Result<Vec<u64>>>()?;
    println!("multicall count(5) = {items:?}");

    // cast: fire and forget; the effect is visible once a server handled it.
    const BUMPS: u64 = 3;
    for _ in 0..BUMPS {
        client.bump(&ctx).await?;
    }
    wait_until(&shared.changed, || {
        let (client, ctx) = (&client, &ctx);
        async move { Ok(client.bumps(ctx).await? >= BUMPS) }
    })
    .await?;
    println!(
        "cast bump() x{BUMPS}, then call bumps() = {}",
        client.bumps(&ctx).await?
    );

    // fanout cast: every server of the topic gets a copy.
    client.prepare().fanout(true).ping(&ctx).await?;
    let pings_of = |server: &'static str| {
        let (client, ctx) = (&client, &ctx);
        async move { client.prepare().server(server).pings(ctx).await }
    };
    wait_until(&shared.changed, || async {
        Ok(pings_of("server-a").await? >= 1 && pings_of("server-b").await? >= 1)
    })
    .await?;
    println!(
        "fanout cast ping(): server-a counted {}, server-b counted {}",
        pings_of("server-a").await?,
        pings_of("server-b").await?
    );

    // directed call: only the named server's own queue gets it.
    let name = client.prepare().server("server-b").whoami(&ctx).await?;
    println!("directed call whoami() on server-b = {name}");

    // typed error: the handler's error enum comes back as the same enum.
    match client.divide(&ctx, 1, 0).await {
        Ok(quotient) => return Err(format!("divide(1, 0) returned {quotient}").into()),
        Err(err) => match err.decode_remote::<CalcError>() {
            Some(calc) => println!("call divide(1, 0) = Err(CalcError::{calc:?}) [{err}]"),
            None => return Err(err.into()),
        },
    }

    // versions: `power` asks for 1.1, which the 1.1 servers serve.
    println!(
        "call power(2, 10) at 1.1 = {}",
        client.power(&ctx, 2, 10).await?
    );

    // A server still at 1.0 joins the topic, as in a rolling upgrade. It serves 1.0's
    // `add`, but refuses `power`, whose request asks for 1.1.
    let server_old = Server::builder(transport, Target::new(TOPIC).server("server-old"))
        .endpoint(calculator_1_0())
        .start()
        .await?;
    let old = client.prepare().server("server-old");
    println!(
        "directed call add(1, 1) on server-old (1.0) = {}",
        old.add(&ctx, 1, 1).await?
    );
    match old.power(&ctx, 2, 10).await {
        Err(Error::UnsupportedVersion { version, method }) => {
            println!(
                "directed call {method}(2, 10) on server-old asks for {version} = Err(UnsupportedVersion)"
            );
        }
        other => return Err(format!("expected UnsupportedVersion, got {other:?}").into()),
    }

    // `version` overrides what every request asks for: no 1.x server serves 2.0.
    match client
        .prepare()
        .version(Version::new(2, 0))
        .add(&ctx, 1, 1)
        .await
    {
        Err(Error::UnsupportedVersion { version, method }) => {
            println!("call {method}(1, 1) at version {version} = Err(UnsupportedVersion)");
        }
        other => return Err(format!("expected UnsupportedVersion, got {other:?}").into()),
    }

    server_old.shutdown().await?;
    server_a.shutdown().await?;
    server_b.shutdown().await?;
    println!("servers shut down");
    Ok(())
}
