//! `mqrpc bench --oslo`: Python oslo.messaging and mqrpc as clients and servers of
//! each other on the same RabbitMQ. Four pairings, each measured the same way (100 B
//! `echo` calls, each timed on its own, at each concurrency in turn):
//!
//! - a Python client calling a Python server, the baseline;
//! - a Python client calling an mqrpc server: what moving a service's server to
//!   mqrpc gives its Python callers;
//! - an mqrpc client calling a Python server;
//! - an mqrpc client calling an mqrpc server.
//!
//! The Python side is `tests/interop/oslo_peer.py` (its `server` and `bench`
//! subcommands), built into the binary and written to a scratch directory at run
//! time, run by the interpreter of the virtualenv `scripts/oslo-venv.sh` prepares.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use super::caller::Caller;
use super::figures::{Oslo, OsloFigures, OsloPoint};
use super::servers::ServersIn;
use super::{BenchArgs, Budget, MqrpcCaller, SMALL, Servers, leave, new_topic, payload};

/// The Python peer, built in so that an installed `mqrpc` needs no checkout.
const PEER: &str = include_str!("../../../tests/interop/oslo_peer.py");

/// The highest concurrency measured: oslo.messaging's threading executor handles 64
/// calls at once by default (`executor_thread_pool_size`); beyond, a Python server
/// only queues them, and a Python client's threads only contend for the GIL.
const MAX_CONCURRENCY: usize = 64;

/// The Python server's name on its topic.
const PYTHON_SERVER: &str = "oslo-bench-0";

/// How long a Python process may take to start (importing oslo.messaging on a busy
/// machine takes seconds).
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// What `--oslo` needs, checked before the run starts so that a missing interpreter
/// fails at once rather than after the other figures.
pub(super) struct Setup {
    python: PathBuf,
    /// oslo.messaging's URL of the run's broker.
    oslo_url: String,
    /// The control exchange, when not oslo.messaging's default (`openstack`).
    exchange: Option<String>,
    scratch: Scratch,
}

/// The scratch directory holding the peer script and the Python processes' stderr;
/// removed when the run ends.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Setup {
    fn script(&self) -> PathBuf {
        self.scratch.0.join("oslo_peer.py")
    }

    fn log(&self, name: &str) -> PathBuf {
        self.scratch.0.join(format!("{name}.log"))
    }

    /// The peer running `args`, its stderr going to the log `log`.
    fn peer(&self, args: &[&str], log: &str) -> Result<Child> {
        let stderr = std::fs::File::create(self.log(log)).context("creating a log file")?;
        let mut command = Command::new(&self.python);
        command
            .arg(self.script())
            .args(args)
            .args(["--url", &self.oslo_url]);
        if let Some(exchange) = &self.exchange {
            command.args(["--exchange", exchange]);
        }
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.python.display()))
    }

    /// The end of the log `log`, to explain a failure.
    fn tail(&self, log: &str) -> String {
        let text = std::fs::read_to_string(self.log(log)).unwrap_or_default();
        let start = text.len().saturating_sub(3000);
        let start = (start..text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(text.len());
        let tail = text[start..].trim();
        if tail.is_empty() {
            "(nothing on its stderr)".to_owned()
        } else {
            format!("its stderr ends with:\n{tail}")
        }
    }
}

/// Checks that `--oslo` can run with `args`: an AMQP URL and a Python with the peer's
/// interpreter; writes the peer script.
pub(super) fn setup(args: &BenchArgs) -> Result<Setup> {
    let (oslo_url, exchange) = oslo_url(&args.url)?;
    let python = python(args.oslo_python.as_deref())?;
    let dir = std::env::temp_dir().join(format!("mqrpc-bench-oslo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let scratch = Scratch(dir);
    let setup = Setup {
        python,
        oslo_url,
        exchange,
        scratch,
    };
    std::fs::write(setup.script(), PEER)
        .with_context(|| format!("writing {}", setup.script().display()))?;
    Ok(setup)
}

/// The interpreter: `explicit` (`--oslo-python`, `MQRPC_OSLO_PYTHON`), else the one of
/// the virtualenv `scripts/oslo-venv.sh` makes (`$MQRPC_OSLO_VENV`, by default
/// `~/.cache/mqrpc/oslo-venv`).
fn python(explicit: Option<&Path>) -> Result<PathBuf> {
    let path = match explicit {
        Some(path) => path.to_owned(),
        None => std::env::var_os("MQRPC_OSLO_VENV")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                    .join(".cache/mqrpc/oslo-venv")
            })
            .join("bin/python"),
    };
    if !path.exists() {
        bail!(
            "--oslo needs a Python with oslo.messaging, and {} does not exist: run \
             `bash scripts/oslo-venv.sh` (from mqrpc's repository) to create it, or name \
             another interpreter with --oslo-python",
            path.display()
        );
    }
    Ok(path)
}

/// oslo.messaging's transport URL for the broker of the AMQP URL `url`, and the
/// control exchange when it is not oslo.messaging's default.
fn oslo_url(url: &str) -> Result<(String, Option<String>)> {
    let scheme = url
        .split_once("://")
        .map(|(scheme, _)| scheme.to_ascii_lowercase());
    match scheme.as_deref() {
        Some("amqp" | "amqps" | "rabbit" | "kombu") => {}
        // The scheme only: a URL may carry a password.
        other => bail!(
            "--oslo compares with oslo.messaging's RabbitMQ driver: it needs an amqp:// \
             URL, not {}",
            other.map_or("one without a scheme".to_owned(), |s| format!(
                "a {s}:// one"
            ))
        ),
    }
    let config = mqrpc::AmqpConfig::parse(url).context("parsing the AMQP URL")?;
    if config.tls {
        bail!("--oslo runs oslo.messaging over plain AMQP only, and the URL asks for TLS");
    }
    let hosts: Vec<String> = (config.hosts.iter())
        .map(|host| {
            format!(
                "{}:{}@{}:{}",
                encode(&host.username),
                encode(&host.password),
                host.host,
                host.port
            )
        })
        .collect();
    let vhost = if config.vhost == "/" {
        String::new()
    } else {
        encode(&config.vhost)
    };
    let exchange = (config.exchange != "openstack").then(|| config.exchange.clone());
    Ok((format!("rabbit://{}/{vhost}", hosts.join(",")), exchange))
}

/// `text` percent-encoded but for the characters a URL never needs to encode.
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The concurrencies measured: the run's, at most [`MAX_CONCURRENCY`].
fn concurrencies(asked: &[usize]) -> Vec<usize> {
    let mut chosen: Vec<usize> = (asked.iter())
        .map(|&c| c.clamp(1, MAX_CONCURRENCY))
        .collect();
    chosen.sort_unstable();
    chosen.dedup();
    if chosen.is_empty() {
        chosen.push(1);
    }
    chosen
}

/// How much of each figure to run: at least `calls` calls, and calls go on being
/// started until `min_seconds` have passed; `warm_up` calls before a client's first
/// figure of a round.
#[derive(Clone, Copy)]
struct OsloBudget {
    calls: usize,
    min_seconds: f64,
    warm_up: usize,
}

impl OsloBudget {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                calls: 100,
                min_seconds: 0.0,
                warm_up: 50,
            }
        } else {
            // oslo.messaging makes a few hundred to a few thousand calls a second
            // here: at least 2 s per figure.
            Self {
                calls: 1000,
                min_seconds: 2.0,
                warm_up: Budget::WARM_UP.calls,
            }
        }
    }
}

/// oslo.messaging's RPC server, a child process.
struct PythonServer {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Lines<BufReader<ChildStdout>>,
}

impl PythonServer {
    /// The server of `topic`, once it says it is ready.
    async fn start(setup: &Setup, topic: &str) -> Result<PythonServer> {
        let mut child = setup.peer(
            &["server", "--topic", topic, "--server", PYTHON_SERVER],
            "server",
        )?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().context("the server's stdout")?;
        let mut server = PythonServer {
            child,
            stdin,
            lines: BufReader::new(stdout).lines(),
        };
        let ready = async {
            while let Some(line) = server.lines.next_line().await? {
                if serde_json::from_str::<serde_json::Value>(&line)
                    .is_ok_and(|v| v["event"] == "ready")
                {
                    return Ok(true);
                }
            }
            Ok::<_, std::io::Error>(false)
        };
        match tokio::time::timeout(START_TIMEOUT, ready).await {
            Ok(Ok(true)) => Ok(server),
            Ok(Ok(false)) => bail!(
                "the Python oslo.messaging server exited before it was ready; {}",
                setup.tail("server")
            ),
            Ok(Err(err)) => Err(err).context("reading the Python server's output"),
            Err(_) => bail!(
                "the Python oslo.messaging server was not ready within {START_TIMEOUT:?}; {}",
                setup.tail("server")
            ),
        }
    }

    /// Stops the server (closing its stdin) and waits for it; kills it if it does
    /// not stop within 30 s.
    async fn stop(mut self) -> Result<()> {
        drop(self.stdin.take());
        let drain = async {
            while let Ok(Some(_)) = self.lines.next_line().await {}
            self.child.wait().await
        };
        match tokio::time::timeout(Duration::from_secs(30), drain).await {
            Ok(status) => {
                let status = status.context("waiting for the Python server")?;
                if !status.success() {
                    bail!("the Python server exited with {status}");
                }
                Ok(())
            }
            Err(_) => {
                let _ = self.child.kill().await;
                bail!("the Python server did not stop within 30 s; killed it")
            }
        }
    }
}

/// One line of the peer's `bench`.
#[derive(Deserialize)]
struct BenchLine {
    concurrency: usize,
    calls: u64,
    calls_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    oslo_messaging: String,
    python: String,
}

/// The oslo.messaging client calling `echo` on `topic`, at each of `concurrencies`
/// in turn: its points, with the oslo.messaging and Python versions.
async fn python_client(
    setup: &Setup,
    topic: &str,
    concurrencies: &[usize],
    budget: OsloBudget,
) -> Result<(Vec<OsloPoint>, String, String)> {
    let list = (concurrencies.iter())
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let (calls, warm_up, min_seconds, size) = (
        budget.calls.to_string(),
        budget.warm_up.to_string(),
        budget.min_seconds.to_string(),
        SMALL.to_string(),
    );
    let mut child = setup.peer(
        &[
            "bench",
            "--topic",
            topic,
            "--calls",
            &calls,
            "--concurrency",
            &list,
            "--payload-size",
            &size,
            "--warmup",
            &warm_up,
            "--min-seconds",
            &min_seconds,
        ],
        "client",
    )?;
    drop(child.stdin.take());
    let stdout = child.stdout.take().context("the client's stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut points = Vec::new();
    let mut versions = (String::new(), String::new());
    // Generous: each concurrency lasts seconds, a stalled client is stopped.
    let limit = START_TIMEOUT + Duration::from_secs(120) * concurrencies.len() as u32;
    let read = async {
        while let Some(line) = lines.next_line().await? {
            let value: serde_json::Value = serde_json::from_str(&line)
                .with_context(|| format!("not JSON from the Python client: {line:?}"))?;
            match value["event"].as_str() {
                Some("bench") => {
                    let line: BenchLine = serde_json::from_value(value)
                        .context("a bench line of the Python client")?;
                    versions = (line.oslo_messaging, line.python);
                    points.push(OsloPoint {
                        concurrency: line.concurrency,
                        calls: line.calls,
                        calls_per_s: line.calls_per_s,
                        p50_us: line.p50_us,
                        p99_us: line.p99_us,
                        p999_us: line.p999_us,
                    });
                }
                Some("error") => bail!("the Python client failed: {}", value["error"]),
                _ => {}
            }
        }
        child.wait().await.context("waiting for the Python client")
    };
    let status = match tokio::time::timeout(limit, read).await {
        Ok(status) => status.map_err(|err| anyhow::anyhow!("{err:#}; {}", setup.tail("client")))?,
        Err(_) => bail!(
            "the Python client did not finish within {limit:?}; {}",
            setup.tail("client")
        ),
    };
    if !status.success() || points.len() != concurrencies.len() {
        bail!(
            "the Python client exited with {status} after {} of {} figures; {}",
            points.len(),
            concurrencies.len(),
            setup.tail("client")
        );
    }
    Ok((points, versions.0, versions.1))
}

/// `caller` at `concurrency` as the peer's `bench` measures the oslo.messaging
/// client: each call timed, at least `budget.calls` calls, more until
/// `budget.min_seconds` have passed.
async fn mqrpc_point(
    caller: Arc<dyn Caller>,
    concurrency: usize,
    budget: OsloBudget,
) -> Result<OsloPoint> {
    let body = payload(SMALL);
    let started_calls = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(budget.min_seconds);
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (caller, body, started_calls) = (caller.clone(), body.clone(), started_calls.clone());
        workers.spawn(async move {
            let mut histogram = Histogram::<u64>::new(3).context("histogram")?;
            while started_calls.fetch_add(1, Ordering::Relaxed) < budget.calls
                || Instant::now() < until
            {
                let begun = Instant::now();
                let back = caller.call(body.clone()).await?;
                histogram
                    .record(u64::try_from(begun.elapsed().as_nanos()).unwrap_or(u64::MAX))
                    .context("recording")?;
                if back.len() != SMALL {
                    bail!("echo returned {} bytes instead of {SMALL}", back.len());
                }
            }
            Ok::<_, anyhow::Error>(histogram)
        });
    }
    let mut all = Histogram::<u64>::new(3).context("histogram")?;
    while let Some(done) = workers.join_next().await {
        all.add(done.context("worker")??).context("merging")?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let us = |q: f64| all.value_at_quantile(q) as f64 / 1000.0;
    Ok(OsloPoint {
        concurrency,
        calls: all.len(),
        calls_per_s: all.len() as f64 / seconds,
        p50_us: us(0.5),
        p99_us: us(0.99),
        p999_us: us(0.999),
    })
}

/// An mqrpc client at each of `concurrencies` in turn, after a warm-up.
async fn mqrpc_points(
    caller: &Arc<dyn Caller>,
    concurrencies: &[usize],
    budget: OsloBudget,
) -> Result<Vec<OsloPoint>> {
    let warm_up = Budget {
        calls: budget.warm_up,
        at_least: Duration::ZERO,
    };
    let most = concurrencies.iter().copied().max().unwrap_or(1);
    super::throughput(caller.clone(), SMALL, most, warm_up).await?;
    let mut points = Vec::with_capacity(concurrencies.len());
    for &concurrency in concurrencies {
        points.push(mqrpc_point(caller.clone(), concurrency, budget).await?);
    }
    Ok(points)
}

/// The four pairings, in the order of a round.
#[derive(Clone, Copy)]
enum Pairing {
    PythonToPython,
    PythonToMqrpc,
    MqrpcToPython,
    MqrpcToMqrpc,
}

/// Measures the four pairings `rounds` times, the order of the pairings reversed
/// every other round (so that a drift of the machine or the broker weighs on each
/// alike), and reports their medians.
pub(super) async fn measure(
    setup: Setup,
    args: &BenchArgs,
    rounds: usize,
    progress: &ProgressBar,
) -> Result<Oslo> {
    let concurrencies = concurrencies(&args.concurrency);
    let budget = OsloBudget::new(args.quick);
    progress.inc_length(rounds as u64);
    progress.set_message("oslo.messaging: starting the Python server");
    let python_topic = new_topic();
    let mqrpc_topic = new_topic();
    leave(&python_topic, PYTHON_SERVER);
    let python_server = PythonServer::start(&setup, &python_topic).await?;
    let servers = match Servers::start_in(ServersIn::Bench, &args.url, &mqrpc_topic, 1).await {
        Ok(servers) => servers,
        Err(err) => {
            let _ = python_server.stop().await;
            return Err(err);
        }
    };
    let measured = async {
        let to_python: Arc<dyn Caller> = Arc::new(MqrpcCaller {
            client: super::mqrpc_client(&args.url, &python_topic).await?,
        });
        let to_mqrpc: Arc<dyn Caller> = Arc::new(MqrpcCaller {
            client: super::mqrpc_client(&args.url, &mqrpc_topic).await?,
        });
        let mut each = Vec::with_capacity(rounds);
        let mut versions = (String::new(), String::new());
        for round in 0..rounds {
            let mut order = [
                Pairing::PythonToPython,
                Pairing::PythonToMqrpc,
                Pairing::MqrpcToPython,
                Pairing::MqrpcToMqrpc,
            ];
            if round % 2 == 1 {
                order.reverse();
            }
            let mut figures = OsloFigures::default();
            for pairing in order {
                let (name, points) = match pairing {
                    Pairing::PythonToPython => (
                        "Python client → Python server",
                        &mut figures.python_to_python,
                    ),
                    Pairing::PythonToMqrpc => {
                        ("Python client → mqrpc server", &mut figures.python_to_mqrpc)
                    }
                    Pairing::MqrpcToPython => {
                        ("mqrpc client → Python server", &mut figures.mqrpc_to_python)
                    }
                    Pairing::MqrpcToMqrpc => {
                        ("mqrpc client → mqrpc server", &mut figures.mqrpc_to_mqrpc)
                    }
                };
                progress.set_message(format!("oslo.messaging: {name}"));
                *points = match pairing {
                    Pairing::PythonToPython | Pairing::PythonToMqrpc => {
                        let topic = match pairing {
                            Pairing::PythonToPython => &python_topic,
                            _ => &mqrpc_topic,
                        };
                        let (points, oslo, python) =
                            python_client(&setup, topic, &concurrencies, budget)
                                .await
                                .with_context(|| name.to_owned())?;
                        versions = (oslo, python);
                        points
                    }
                    Pairing::MqrpcToPython => mqrpc_points(&to_python, &concurrencies, budget)
                        .await
                        .with_context(|| name.to_owned())?,
                    Pairing::MqrpcToMqrpc => mqrpc_points(&to_mqrpc, &concurrencies, budget)
                        .await
                        .with_context(|| name.to_owned())?,
                };
            }
            each.push(figures);
            progress.inc(1);
        }
        Ok::<_, anyhow::Error>((each, versions))
    }
    .await;
    servers.stop().await;
    let stopped = python_server.stop().await;
    let (each, (oslo_messaging, python)) = measured?;
    if let Err(err) = stopped {
        progress.println(format!("oslo.messaging: {err:#}"));
    }
    let median = OsloFigures::median_of(&each);
    Ok(Oslo {
        oslo_messaging,
        python,
        ratios: median.ratios(),
        median,
        rounds: each,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oslo_urls_of_amqp_urls() {
        assert_eq!(
            oslo_url("amqp://guest:guest@127.0.0.1:5672/").expect("url"),
            ("rabbit://guest:guest@127.0.0.1:5672/".to_owned(), None)
        );
        let (url, exchange) =
            oslo_url("amqp://u%40x:p%2Fw@h:5673/nova?exchange=nova").expect("url");
        assert_eq!(url, "rabbit://u%40x:p%2Fw@h:5673/nova");
        assert_eq!(exchange.as_deref(), Some("nova"));
    }

    #[test]
    fn oslo_needs_a_plain_amqp_url() {
        for url in ["nats://127.0.0.1:4222", "memory://x", "redis://h/"] {
            let err = oslo_url(url).expect_err(url).to_string();
            assert!(err.contains("needs an amqp:// URL"), "{err}");
        }
        for url in ["amqps://h/", "amqp://h/?ssl=1"] {
            let err = oslo_url(url).expect_err(url).to_string();
            assert!(err.contains("TLS"), "{err}");
        }
    }

    #[test]
    fn concurrencies_are_the_runs_up_to_64() {
        assert_eq!(concurrencies(&[1, 16, 64, 256]), vec![1, 16, 64]);
        assert_eq!(concurrencies(&[256, 0]), vec![1, 64]);
        assert_eq!(concurrencies(&[]), vec![1]);
    }

    #[test]
    fn a_missing_interpreter_says_how_to_make_it() {
        let err = python(Some(Path::new("/nonexistent/bin/python")))
            .expect_err("missing")
            .to_string();
        assert!(err.contains("scripts/oslo-venv.sh"), "{err}");
    }
}
