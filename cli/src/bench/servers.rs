//! Where `mqrpc bench` runs its servers: in its own process, sharing one runtime (and
//! the machine's cores) with its clients, or in a child `mqrpc serve --instances N`
//! process, so that clients and servers each have a process and a runtime of their
//! own, as a deployment has them.

use std::collections::VecDeque;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use mqrpc::{Server, Target};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout};

use super::leave;

/// Where the servers of one run are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ServersIn {
    /// In the bench's own process, on its runtime.
    Bench,
    /// In a child `mqrpc serve --instances N` process, one per figure.
    Child,
}

impl ServersIn {
    /// How the report names it.
    pub(crate) fn describe(self) -> &'static str {
        match self {
            ServersIn::Bench => "servers in the bench's process (one runtime with the clients)",
            ServersIn::Child => {
                "servers in a child process (`mqrpc serve --instances N`, one per figure; \
                 the bare clients' echo servers stay in the bench's process)"
            }
        }
    }
}

/// `--servers-in`: where to run mqrpc's servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Placement {
    /// In the bench's own process.
    Bench,
    /// In a child `mqrpc serve` process (not on memory://).
    Child,
    /// Every figure twice: first with the servers in the bench's process, then in a
    /// child process.
    Both,
}

impl Placement {
    /// The runs this placement asks for, in order.
    pub(crate) fn runs(self) -> &'static [ServersIn] {
        match self {
            Placement::Bench => &[ServersIn::Bench],
            Placement::Child => &[ServersIn::Child],
            Placement::Both => &[ServersIn::Bench, ServersIn::Child],
        }
    }
}

/// Why the memory bus cannot have its servers in a child process.
pub(crate) const NO_CHILD_ON_MEMORY: &str = "--servers-in child runs the servers in another \
    process, which memory:// (a bus inside one process) cannot reach; use a broker URL \
    (nats://127.0.0.1:4222, amqp://, redis://) or --servers-in bench";

/// Servers of the demo endpoint on a topic, each on a connection of its own.
pub(crate) struct Servers {
    names: Vec<String>,
    running: Running,
}

enum Running {
    Bench(Vec<Server>),
    Child(Box<ChildServers>),
}

impl Servers {
    /// `n` servers of `topic` where `servers_in` says, named `bench-0`, `bench-1`...
    pub(crate) async fn start_in(
        servers_in: ServersIn,
        url: &str,
        topic: &str,
        n: usize,
    ) -> Result<Servers> {
        let names: Vec<String> = (0..n).map(|i| format!("bench-{i}")).collect();
        for name in &names {
            leave(topic, name);
        }
        let running = match servers_in {
            ServersIn::Bench => {
                let mut servers = Vec::with_capacity(n);
                for name in &names {
                    let transport = mqrpc::connect(url).await.context("connecting a server")?;
                    let server = Server::builder(transport, Target::new(topic).server(name))
                        .endpoint(crate::demo::endpoint(Arc::default()))
                        .start()
                        .await
                        .context("starting a server")?;
                    servers.push(server);
                }
                Running::Bench(servers)
            }
            ServersIn::Child => Running::Child(Box::new(ChildServers::spawn(url, topic, n).await?)),
        };
        Ok(Servers { names, running })
    }

    /// The servers' names, for calls directed at each.
    pub(crate) fn names(&self) -> &[String] {
        &self.names
    }

    /// Shuts every server down at once: on Redis each waits out its blocking read
    /// (up to 500 ms), which one after another made 32 servers take 16 s.
    pub(crate) async fn stop(self) {
        match self.running {
            Running::Bench(servers) => {
                futures::future::join_all(servers.into_iter().map(Server::shutdown)).await;
            }
            Running::Child(child) => child.stop().await,
        }
    }
}

/// How long a child may take to say it serves: 50 servers connect and declare.
const READY_WITHIN: Duration = Duration::from_secs(120);
/// How long a child may take to stop gracefully before it is killed.
const STOP_WITHIN: Duration = Duration::from_secs(15);
/// Lines of the child's stderr kept to explain its failure.
const STDERR_LINES: usize = 20;

/// A child `mqrpc serve --instances N` process. Dropped without [`Self::stop`] (an
/// error on the way), it is killed: no run leaves a server process behind.
struct ChildServers {
    child: Child,
    /// Closed to stop the child.
    stdin: ChildStdin,
    /// Held open (and unread after the ready line): closing it would make the
    /// child's next write fail.
    _stdout: BufReader<ChildStdout>,
}

impl ChildServers {
    /// Starts this binary's `serve` as servers `bench-0`... of `topic` and waits for
    /// its ready line.
    async fn spawn(url: &str, topic: &str, n: usize) -> Result<ChildServers> {
        let exe = std::env::current_exe().context("finding the mqrpc binary")?;
        let mut child = tokio::process::Command::new(exe)
            .args(["serve", "--topic", topic, "--server", "bench"])
            .args(["--instances", &n.to_string(), "--stop-at-stdin-end"])
            // Through the environment: a URL's password would show in `ps`.
            .env("MQRPC_URL", url)
            // Its end stops the child, closed by `stop` or by the kernel when this
            // process dies, however it dies.
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting `mqrpc serve` for the servers")?;
        let stdin = child.stdin.take().context("the child's stdin")?;
        let stdout = child.stdout.take().context("the child's stdout")?;
        let stderr = child.stderr.take().context("the child's stderr")?;
        // Read all along, so that the pipe never fills; its last lines explain a
        // failure to start.
        let stderr_tail = tokio::spawn(async move {
            let mut tail = VecDeque::with_capacity(STDERR_LINES);
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if tail.len() == STDERR_LINES {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
            tail
        });
        let mut stdout = BufReader::new(stdout);
        let ready = tokio::time::timeout(READY_WITHIN, async {
            let mut line = String::new();
            loop {
                line.clear();
                if stdout.read_line(&mut line).await? == 0 {
                    return Ok::<_, std::io::Error>(false);
                }
                let said: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                if said["event"] == "ready" {
                    return Ok(true);
                }
            }
        })
        .await;
        let why = match ready {
            Ok(Ok(true)) => {
                return Ok(ChildServers {
                    child,
                    stdin,
                    _stdout: stdout,
                });
            }
            Ok(Ok(false)) => "it ended before serving".to_owned(),
            Ok(Err(err)) => format!("cannot read its output: {err}"),
            Err(_) => format!("not serving after {READY_WITHIN:?}"),
        };
        // Killed first: its stderr ends with it.
        let _ = child.kill().await;
        let tail = tokio::time::timeout(Duration::from_secs(5), stderr_tail).await;
        let tail = tail.ok().and_then(Result::ok).unwrap_or_default();
        let said: Vec<&str> = tail.iter().map(String::as_str).collect();
        bail!(
            "`mqrpc serve --instances {n}` for the bench's servers: {why}; it said:\n{}",
            said.join("\n")
        )
    }

    /// Asks the child to stop (by closing its stdin: its servers shut down
    /// gracefully), and kills it if it has not within [`STOP_WITHIN`].
    async fn stop(self) {
        let ChildServers {
            mut child, stdin, ..
        } = self;
        drop(stdin);
        if tokio::time::timeout(STOP_WITHIN, child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
        }
    }
}
