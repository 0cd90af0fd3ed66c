//! `mqrpc bench`: sequential latency, throughput at several concurrencies, cast
//! throughput, payload sizes and competing servers for one backend, and with `--raw`
//! the same request/reply done by the broker's bare client in the same run, and with
//! `--oslo` Python oslo.messaging as client and server against mqrpc. Prints a
//! markdown table and writes JSON and an SVG plot. The servers run in the bench's
//! process or in a child one (`--servers-in`, see [`servers`]).

mod caller;
mod competing;
mod fairness;
mod figures;
mod oslo;
mod raw;
mod report;
mod servers;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use async_trait::async_trait;
use bytes::Bytes;
use clap::Args;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use mqrpc::{Client, Context, Server, Target};
use serde::{Deserialize, Serialize};
use serde_json::json;

use caller::{Caller, Pair};
use figures::{Figures, Latency, Rate, Run, Shaped, median_figures, median_rate};
use servers::{Placement, Servers, ServersIn};

/// What to measure.
#[derive(Args, Debug)]
pub(crate) struct BenchArgs {
    /// Broker URL.
    #[arg(long, env = "MQRPC_URL")]
    pub(crate) url: String,
    /// Also measure the broker's bare client doing the same request/reply.
    #[arg(long)]
    pub(crate) raw: bool,
    /// A short run (fewer calls per figure), for smoke tests.
    #[arg(long)]
    pub(crate) quick: bool,
    /// Concurrencies of the throughput figures.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    pub(crate) concurrency: Vec<usize>,
    /// Payload sizes in bytes.
    #[arg(long, value_delimiter = ',', default_value = "100,10240,1048576")]
    pub(crate) payloads: Vec<usize>,
    /// Numbers of competing servers (with --raw, of the bare client's competing
    /// consumers too).
    #[arg(long, value_delimiter = ',', default_value = "1,4,32")]
    pub(crate) servers: Vec<usize>,
    /// Where mqrpc's servers run: `bench`, in this process (one runtime with the
    /// clients); `child`, in a child `mqrpc serve --instances N` process (not on
    /// memory://); `both`, every figure once each way, reported side by side.
    #[arg(long, value_enum, default_value = "bench")]
    pub(crate) servers_in: Placement,
    /// Competing servers of the fairness figure: how many calls the busiest and the
    /// quietest of them handle under steady load (0 skips it).
    #[arg(long, value_name = "N", default_value_t = 50)]
    pub(crate) fairness: usize,
    /// Rounds of the figures compared with the bare client; each is reported as its
    /// median over the rounds, mqrpc and raw taking turns at going first [default: 3,
    /// 1 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=99))]
    pub(crate) rounds: Option<u32>,
    /// Sequential calls per side and round of the latency figures, whose
    /// percentiles are taken over every round's calls together [default: 10000, 200
    /// with --quick].
    #[arg(long)]
    pub(crate) latency_calls: Option<u64>,
    /// Directory for the JSON and SVG files.
    #[arg(long, default_value = "target/bench")]
    pub(crate) out: PathBuf,
    /// Serve the metrics of the run's clients and servers in Prometheus's text
    /// format on this address (`127.0.0.1:9464`); measures their cost too.
    #[arg(long, value_name = "ADDR")]
    pub(crate) metrics_addr: Option<std::net::SocketAddr>,
    /// Also measure Python oslo.messaging's client against a Python server and an
    /// mqrpc server, and mqrpc's client against both (AMQP only; needs the virtualenv
    /// of `scripts/oslo-venv.sh`).
    #[arg(long)]
    pub(crate) oslo: bool,
    /// The Python interpreter with oslo.messaging for `--oslo` [default:
    /// $MQRPC_OSLO_VENV/bin/python, else ~/.cache/mqrpc/oslo-venv/bin/python].
    #[arg(long, env = "MQRPC_OSLO_PYTHON", value_name = "PATH")]
    pub(crate) oslo_python: Option<PathBuf>,
}

const SMALL: usize = 100;

fn payload(size: usize) -> Bytes {
    Bytes::from(vec![b'x'; size])
}

/// mqrpc's echo call, the same round trip the raw clients make.
struct MqrpcCaller {
    client: Client,
}

/// `echo`'s arguments, typed as a Rust caller would write them.
#[derive(Serialize)]
struct Echo<'a> {
    payload: &'a str,
}

#[derive(Deserialize)]
struct Echoed(String);

#[async_trait]
impl Caller for MqrpcCaller {
    async fn call(&self, payload: Bytes) -> Result<Bytes> {
        let payload = std::str::from_utf8(&payload).context("payload is text")?;
        let Echoed(back) = self
            .client
            .call(&Context::new(), "echo", Echo { payload })
            .await?;
        Ok(Bytes::from(back))
    }
}

/// The topics and server names this run started servers on: their queues (AMQP) and
/// streams (Redis) outlive the servers, as oslo.messaging's do, and the run deletes
/// them at its end.
static LEFT: std::sync::Mutex<Vec<(String, String)>> = std::sync::Mutex::new(Vec::new());

/// Records that a server `server` of `topic` was started.
pub(super) fn leave(topic: &str, server: &str) {
    let mut left = LEFT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    left.push((topic.to_owned(), server.to_owned()));
}

fn new_topic() -> String {
    format!("bench_{}", &mqrpc::wire::new_id()[..12])
}

async fn mqrpc_client(url: &str, topic: &str) -> Result<Client> {
    let transport = mqrpc::connect(url).await.context("connecting the client")?;
    Ok(Client::new(transport, Target::new(topic)).timeout(Duration::from_secs(60)))
}

/// Sequential latency of `sides` (mqrpc, then the bare clients if any), `calls` calls
/// each, taken in blocks of `BLOCK` calls per side, the order of the sides reversed
/// every other block (A B, B A, A B...: each side makes twice `BLOCK` calls between
/// switches, and goes first as often as second), so that both sides see the same
/// state of the machine and the broker. Measured apart, a few seconds each, the two
/// drifted: the same binary's p50 ratio moved between 0.7 and 1.5 from one run to the
/// next. Gives each side's histogram of latencies in nanoseconds.
async fn latencies(
    sides: &[Arc<dyn Caller>],
    size: usize,
    calls: u64,
) -> Result<Vec<Histogram<u64>>> {
    /// Calls per side and block: short enough to interleave finely, long enough that
    /// switching sides does not dominate.
    const BLOCK: u64 = 50;
    let body = payload(size);
    let mut histograms = sides
        .iter()
        .map(|_| Histogram::<u64>::new(3).context("histogram"))
        .collect::<Result<Vec<_>>>()?;
    let mut done = 0;
    let mut block = 0;
    while done < calls {
        let n = BLOCK.min(calls - done);
        let mut order: Vec<usize> = (0..sides.len()).collect();
        // Who goes first alternates too: the first block after a switch may pay for it.
        if block % 2 == 1 {
            order.reverse();
        }
        for side in order {
            for _ in 0..n {
                let started = Instant::now();
                let back = sides[side].call(body.clone()).await?;
                histograms[side]
                    .record(u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX))
                    .context("recording")?;
                if back.len() != size {
                    bail!("echo returned {} bytes instead of {size}", back.len());
                }
            }
        }
        done += n;
        block += 1;
    }
    Ok(histograms)
}

/// The percentiles of a histogram of latencies in nanoseconds.
fn latency_of(histogram: &Histogram<u64>) -> Latency {
    let us = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    Latency {
        calls: histogram.len(),
        p50_us: us(0.5),
        p99_us: us(0.99),
        p999_us: us(0.999),
    }
}

/// How much of a throughput figure to run: at least `calls` calls, and calls go on
/// being started until `at_least` has passed (a figure of a few thousand calls on a
/// fast backend lasts milliseconds, too short to be steady).
#[derive(Clone, Copy)]
struct Budget {
    calls: usize,
    at_least: Duration,
}

impl Budget {
    /// A warm-up: a fixed count, no time floor.
    const WARM_UP: Self = Self {
        calls: 200,
        at_least: Duration::ZERO,
    };
}

async fn throughput(
    caller: Arc<dyn Caller>,
    size: usize,
    concurrency: usize,
    budget: Budget,
) -> Result<Rate> {
    Ok(timed_throughput(caller, size, concurrency, budget).await?.0)
}

/// [`throughput`], and how many calls it made.
async fn timed_throughput(
    caller: Arc<dyn Caller>,
    size: usize,
    concurrency: usize,
    budget: Budget,
) -> Result<(Rate, usize)> {
    let body = payload(size);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let until = started + budget.at_least;
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (caller, body, next) = (caller.clone(), body.clone(), next.clone());
        workers.spawn(async move {
            let mut made = 0_usize;
            while next.fetch_add(1, Ordering::Relaxed) < budget.calls || Instant::now() < until {
                caller.call(body.clone()).await?;
                made += 1;
            }
            Ok::<_, anyhow::Error>(made)
        });
    }
    let mut total = 0;
    while let Some(done) = workers.join_next().await {
        total += done.context("worker")??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let calls_per_s = total as f64 / elapsed;
    let rate = Rate {
        x: concurrency,
        calls_per_s,
        mean_latency_us: elapsed * concurrency.min(total) as f64 / total as f64 * 1e6,
    };
    Ok((rate, total))
}

/// Calls per figure: enough to be steady, few enough to end quickly.
fn calls_for(quick: bool, concurrency: usize, size: usize) -> Budget {
    let base = if quick { 200 } else { 20_000 };
    let scaled = base.max(concurrency * if quick { 4 } else { 100 });
    let calls = match size {
        s if s >= 1024 * 1024 => {
            if quick {
                8
            } else {
                100
            }
        }
        s if s >= 10 * 1024 => scaled / 2,
        _ => scaled,
    };
    Budget {
        calls,
        at_least: if quick {
            Duration::ZERO
        } else {
            Duration::from_secs(1)
        },
    }
}

async fn casts(url: &str, quick: bool, servers_in: ServersIn) -> Result<f64> {
    let topic = new_topic();
    let servers = Servers::start_in(servers_in, url, &topic, 1).await?;
    let client = mqrpc_client(url, &topic).await?;
    let total: u64 = if quick { 500 } else { 20_000 };
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let (client, next) = (client.clone(), next.clone());
        workers.spawn(async move {
            while (next.fetch_add(1, Ordering::Relaxed) as u64) < total {
                client
                    .cast(&Context::new(), "bump", mqrpc::NoArgs {})
                    .await?;
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(done) = workers.join_next().await {
        done.context("worker")??;
    }
    // Casts count once the server handled them, not once they were sent.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let handled: u64 = client
            .call(&Context::new(), "bumps", mqrpc::NoArgs {})
            .await?;
        if handled >= total {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {handled} of {total} casts handled after two minutes");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = total as f64 / started.elapsed().as_secs_f64();
    servers.stop().await;
    Ok(rate)
}

/// Notifications sent by 64 senders to one listener (concurrency 64): how many per
/// second the senders got the broker to take, and how many per second the listener
/// handled. `None` on a backend without notifications.
async fn notifications(url: &str, quick: bool) -> Result<Option<(f64, f64)>> {
    use mqrpc::notify::{NotificationEndpoint, NotificationListener, NotificationResult, Notifier};
    let transport = mqrpc::connect(url).await.context("connecting")?;
    if !transport.capabilities().notifications {
        return Ok(None);
    }
    let topic = new_topic();
    let total: u64 = if quick { 500 } else { 20_000 };
    let handled = Arc::new(AtomicUsize::new(0));
    let all_handled = Arc::new(tokio::sync::Notify::new());
    let endpoint = {
        let (handled, all_handled) = (handled.clone(), all_handled.clone());
        NotificationEndpoint::new().on(mqrpc::notify::Priority::Info, move |_| {
            if handled.fetch_add(1, Ordering::Relaxed) as u64 + 1 == total {
                all_handled.notify_one();
            }
            async { NotificationResult::Handled }
        })
    };
    let listener = NotificationListener::builder(
        mqrpc::connect(url).await.context("connecting")?,
        [Target::new(&topic)],
    )
    .endpoint(endpoint)
    .start()
    .await
    .context("starting the notification listener")?;
    let notifier = Notifier::new(transport, "bench").topics([topic.as_str()]);
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let (notifier, next) = (notifier.clone(), next.clone());
        workers.spawn(async move {
            while (next.fetch_add(1, Ordering::Relaxed) as u64) < total {
                notifier
                    .info(&Context::new(), "bench.event", SMALL_PAYLOAD)
                    .await?;
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(done) = workers.join_next().await {
        done.context("sender")??;
    }
    let sent = total as f64 / started.elapsed().as_secs_f64();
    if (handled.load(Ordering::Relaxed) as u64) < total
        && tokio::time::timeout(Duration::from_secs(120), all_handled.notified())
            .await
            .is_err()
    {
        bail!(
            "only {} of {total} notifications handled after two minutes",
            handled.load(Ordering::Relaxed)
        );
    }
    let handled_rate = total as f64 / started.elapsed().as_secs_f64();
    listener.shutdown().await.context("stopping the listener")?;
    Ok(Some((sent, handled_rate)))
}

/// A notification's payload in the bench: about 100 bytes, as the calls'.
const SMALL_PAYLOAD: &str =
    "0123456789012345678901234567890123456789012345678901234567890123456789012345678901234567";

/// Resident set size of this process, from /proc (Linux).
fn resident_bytes() -> Option<f64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: f64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096.0)
}

/// Memory held per call in flight: 10 000 calls to a handler that sleeps, measured
/// while they all wait (client, transport and server sides together).
async fn in_flight_memory(url: &str, quick: bool) -> Result<Option<f64>> {
    let calls: usize = if quick { 1000 } else { 10_000 };
    let topic = new_topic();
    let transport = mqrpc::connect(url).await.context("connecting a server")?;
    leave(&topic, "bench-memory");
    let server = Server::builder(transport, Target::new(&topic).server("bench-memory"))
        .endpoint(crate::demo::endpoint(Arc::default()))
        .concurrency(calls)
        .start()
        .await
        .context("starting a server")?;
    let client = mqrpc_client(url, &topic).await?;
    // Warm up allocators and connections before the baseline.
    let _: serde_json::Value = client
        .call(&Context::new(), "sleep", json!({"seconds": 0.0}))
        .await?;
    let Some(before) = resident_bytes() else {
        return Ok(None);
    };
    let mut waiting = tokio::task::JoinSet::new();
    for _ in 0..calls {
        let client = client.clone();
        waiting.spawn(async move {
            client
                .call::<_, serde_json::Value>(&Context::new(), "sleep", json!({"seconds": 3.0}))
                .await
        });
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let during = resident_bytes().unwrap_or(before);
    while let Some(done) = waiting.join_next().await {
        done.context("call task")??;
    }
    let _ = server.shutdown().await;
    Ok(Some((during - before).max(0.0) / calls as f64))
}

/// Everything but sequential latency (measured beforehand, see [`latencies`]).
async fn measure(
    pair: &Pair,
    latency: Latency,
    args: &BenchArgs,
    max_message: Option<usize>,
    progress: &ProgressBar,
) -> Result<Figures> {
    let mut figures = Figures {
        latency: Some(latency),
        ..Figures::default()
    };
    let caller = pair.caller.clone();
    for &concurrency in &args.concurrency {
        progress.set_message(format!("throughput at concurrency {concurrency}"));
        let budget = calls_for(args.quick, concurrency, SMALL);
        figures
            .throughput
            .push(throughput(caller.clone(), SMALL, concurrency, budget).await?);
        progress.inc(1);
    }
    for &size in &args.payloads {
        progress.set_message(format!("payload {size} B"));
        if max_message.is_some_and(|limit| size + 4096 > limit) {
            progress.println(format!(
                "skipping the {size} B payload: above the transport's limit"
            ));
        } else {
            let mut rate =
                throughput(caller.clone(), size, 16, calls_for(args.quick, 16, size)).await?;
            rate.x = size;
            figures.payloads.push(rate);
        }
        progress.inc(1);
    }
    Ok(figures)
}

pub(crate) async fn run(mut args: BenchArgs) -> Result<()> {
    if crate::in_process(&args.url) && args.servers_in != Placement::Bench {
        bail!(servers::NO_CHILD_ON_MEMORY);
    }
    // Every server and client connects on its own; a bare `memory://` would give each
    // a private bus of its own, so the run shares a named one.
    if args.url == "memory://" || args.url.starts_with("memory://?") {
        args.url = args.url.replacen(
            "memory://",
            &format!("memory://bench-{}", std::process::id()),
            1,
        );
    }
    // Checked first: a missing interpreter should not wait for the other figures.
    let oslo = args.oslo.then(|| oslo::setup(&args)).transpose()?;
    if let Some(addr) = args.metrics_addr {
        crate::metrics::export(addr)?;
    }
    let probe = mqrpc::connect(&args.url).await.context("connecting")?;
    let backend = probe.name().to_owned();
    let max_message = probe.capabilities().max_message_size;
    drop(probe);

    let mut runs = Vec::new();
    for (i, &servers_in) in args.servers_in.runs().iter().enumerate() {
        // Once: it measures this process, whose servers are the same code either way.
        let memory = i == 0;
        let measured = one_run(&args, &backend, max_message, servers_in, memory).await;
        if measured.is_err() {
            delete_left(&args.url).await;
        }
        runs.push(measured?);
    }
    let oslo = match oslo {
        Some(setup) => {
            let progress = ProgressBar::new_spinner();
            let measured = oslo::measure(setup, &args, rounds(&args), &progress).await;
            progress.finish_and_clear();
            if measured.is_err() {
                delete_left(&args.url).await;
            }
            Some(measured?)
        }
        None => None,
    };
    delete_left(&args.url).await;
    let mut runs = runs.into_iter();
    let Some(mut run) = runs.next() else {
        bail!("no run");
    };
    run.servers_in_child = runs.next().map(Box::new);
    run.oslo = oslo;

    println!("{}", report::markdown(&run));
    if let Some(child) = &run.servers_in_child {
        println!("{}", report::markdown(child));
        println!("{}", report::placements(&run, child));
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let json_path = args.out.join(format!("bench-{}.json", run.backend));
    std::fs::write(&json_path, serde_json::to_string_pretty(&run)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    let svg_path = args.out.join(format!("bench-{}.svg", run.backend));
    report::plot(&run, &svg_path)?;
    eprintln!("wrote {} and {}", json_path.display(), svg_path.display());
    Ok(())
}

/// Deletes the queues and streams of the servers started so far.
async fn delete_left(url: &str) {
    let left = std::mem::take(
        &mut *LEFT
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    if let Err(err) = raw::delete_left(url, &left).await {
        eprintln!("could not delete the run's queues or streams: {err:#}");
    }
}

/// Every figure once, with mqrpc's servers where `servers_in` says; the memory per
/// call in flight only if `memory`.
async fn one_run(
    args: &BenchArgs,
    backend: &str,
    max_message: Option<usize>,
    servers_in: ServersIn,
    memory: bool,
) -> Result<Run> {
    let rounds = rounds(args);
    let steps = (1 + args.concurrency.len() + args.payloads.len()) as u64
        * if args.raw { 2 } else { 1 }
        * rounds as u64
        + competing::steps(args)
        + 1;
    let progress = ProgressBar::new(steps);
    progress.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );

    // First, while the allocator holds no memory freed by earlier figures (mimalloc
    // keeps freed pages, which would hide the growth).
    progress.set_message("memory per call in flight");
    let bytes_per_in_flight_call = if memory {
        in_flight_memory(&args.url, args.quick).await?
    } else {
        None
    };
    let topic = new_topic();
    let servers = Servers::start_in(servers_in, &args.url, &topic, 1).await?;
    let mqrpc_pair = Pair {
        caller: Arc::new(MqrpcCaller {
            client: mqrpc_client(&args.url, &topic).await?,
        }),
        _keep: Box::new(()),
    };
    let raw_pair = if args.raw {
        let pair = raw::pair(&args.url).await?;
        if pair.is_none() {
            progress.println(format!("no bare client to compare with for {backend}"));
        }
        pair
    } else {
        None
    };
    let shaped = if args.raw {
        raw::shaped_pairs(&args.url, SMALL).await?
    } else {
        Vec::new()
    };

    // Rounds in turn, so that a drift of the machine or the broker during the run
    // weighs on both sides alike: mqrpc first in even rounds, raw first in odd ones.
    let mut per_side: [Vec<Figures>; 2] = Default::default();
    let mut rounds_shaped = vec![Vec::new(); shaped.len()];
    // Every round's latencies of each side (mqrpc, raw, then the shapes) together:
    // the tail of several rounds' calls is steadier than a median of each round's.
    let mut pooled: Vec<Histogram<u64>> = Vec::new();
    for round in 0..rounds {
        let callers: Vec<Arc<dyn Caller>> = [Some(&mqrpc_pair), raw_pair.as_ref()]
            .into_iter()
            .flatten()
            .chain(shaped.iter().map(|(_, pair)| pair))
            .map(|pair| pair.caller.clone())
            .collect();
        let sides_measured = callers.len() as u64;
        progress.set_message("sequential latency");
        for caller in &callers {
            // Warm up connections, reply queues and caches.
            throughput(caller.clone(), SMALL, 16, Budget::WARM_UP).await?;
        }
        // On a runtime worker, like a service's own tasks: `main`'s thread is not one,
        // so measured from there every call would pay two extra cross-thread wake-ups.
        let calls = args
            .latency_calls
            .unwrap_or(if args.quick { 200 } else { 10_000 });
        let histograms = tokio::spawn(async move { latencies(&callers, SMALL, calls).await })
            .await
            .context("latency task")??;
        progress.inc(sides_measured.min(2));
        if pooled.is_empty() {
            pooled = histograms.clone();
        } else {
            for (all, this) in pooled.iter_mut().zip(&histograms) {
                all.add(this).context("pooling latencies")?;
            }
        }
        let mut latency = histograms.iter().map(latency_of);
        let mut sides = [(0, Some(&mqrpc_pair)), (1, raw_pair.as_ref())];
        if round % 2 == 1 {
            sides.reverse();
        }
        let mut latency = [
            latency.next(),
            raw_pair.as_ref().and_then(|_| latency.next()),
        ];
        for (side, pair) in sides {
            if let (Some(pair), Some(latency)) = (pair, latency[side].take()) {
                per_side[side].push(measure(pair, latency, args, max_message, &progress).await?);
            }
        }
        for ((name, pair), rounds) in shaped.iter().zip(&mut rounds_shaped) {
            progress.set_message(format!("raw {name}"));
            throughput(pair.caller.clone(), SMALL, 16, Budget::WARM_UP).await?;
            let budget = calls_for(args.quick, 64, SMALL);
            rounds.push(throughput(pair.caller.clone(), SMALL, 64, budget).await?);
        }
    }
    let names: Vec<&str> = shaped.iter().map(|(name, _)| *name).collect();
    drop((mqrpc_pair, raw_pair, shaped));
    let [rounds_mqrpc, rounds_raw] = per_side;
    servers.stop().await;
    let mut pooled = pooled.iter().map(latency_of);
    let mut mqrpc = median_figures(&rounds_mqrpc);
    mqrpc.latency = pooled.next();
    mqrpc.bytes_per_in_flight_call = bytes_per_in_flight_call;
    let mut raw = (!rounds_raw.is_empty()).then(|| median_figures(&rounds_raw));
    if let Some(raw) = &mut raw {
        raw.latency = pooled.next();
    }
    let raw_shaped = (names.into_iter().zip(rounds_shaped))
        .map(|(name, rounds)| {
            let same: Vec<&Rate> = rounds.iter().collect();
            Shaped {
                name: name.to_owned(),
                median: median_rate(64, &same),
                rounds,
                latency: pooled.next(),
            }
        })
        .collect();

    competing::measure(args, servers_in, &mut mqrpc, raw.as_mut(), &progress).await?;
    progress.set_message("casts");
    mqrpc.casts_per_s = Some(casts(&args.url, args.quick, servers_in).await?);
    progress.set_message("notifications");
    if let Some((sent, handled)) = notifications(&args.url, args.quick).await? {
        mqrpc.notifications_sent_per_s = Some(sent);
        mqrpc.notifications_handled_per_s = Some(handled);
    }
    progress.inc(1);

    progress.finish_and_clear();
    Ok(Run {
        backend: backend.to_owned(),
        quick: args.quick,
        servers_in,
        rounds,
        mqrpc,
        raw,
        raw_shaped,
        rounds_mqrpc,
        rounds_raw,
        servers_in_child: None,
        oslo: None,
    })
}

/// Rounds of the figures compared with the bare client (and of `--oslo`'s).
fn rounds(args: &BenchArgs) -> usize {
    match (args.rounds, args.quick) {
        (Some(n), _) => n as usize,
        (None, true) => 1,
        (None, false) => 3,
    }
}
