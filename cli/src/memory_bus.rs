//! `memory://` across `mqrpc` commands. A memory bus lives in one process, so the
//! first `serve` or `listen` on `memory://NAME` starts a keeper: a background `mqrpc`
//! process (the hidden subcommand `keep-bus`) that holds the bus and shares it on a
//! Unix socket of this user (`mqrpc::shared_memory`). Every command on that URL,
//! the first included, attaches to it, so no command's exit takes the bus from the
//! others. The keeper exits once no process has been attached for a while.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use mqrpc::Transport;
use mqrpc::shared_memory::{self, AttachedBus};

/// How long a keeper waits with nobody attached before it exits (and the bus, with
/// whatever it still queues, goes with it).
const KEEPER_IDLE: Duration = Duration::from_secs(5);
/// How long a command waits for the keeper it started to share the bus.
const KEEPER_START: Duration = Duration::from_secs(5);
/// How long a client command waits for a new keeper of a bus that was kept before.
const HANDOVER: Duration = Duration::from_secs(1);
/// How often a command that waits for a keeper looks again.
const RETRY: Duration = Duration::from_millis(20);

/// Whether `url` names the memory bus.
pub(crate) fn is_memory(url: &str) -> bool {
    url.trim_start()
        .get(..7)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("memory:"))
}

/// What a command does when no process keeps the memory bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// `serve` and `listen`: start a keeper, then attach to it.
    Member,
    /// `call`, `cast`, `multicall`: a bus nobody keeps has no server to answer, so
    /// fail at once.
    Client,
}

/// The transport a command works on.
pub(crate) struct Opened {
    pub(crate) transport: Arc<dyn Transport>,
    /// The memory bus a keeper holds, which this process attached to.
    attached: Option<AttachedBus>,
}

impl Opened {
    /// Whether this process attached to a memory bus whose keeper has gone away.
    pub(crate) fn keeper_lost(&self) -> bool {
        self.attached.as_ref().is_some_and(AttachedBus::is_closed)
    }

    /// Resolves when the keeper of the memory bus this process attached to goes away
    /// (killed); never otherwise.
    pub(crate) async fn keeper_gone(&self) {
        match &self.attached {
            Some(attached) => attached.closed().await,
            None => std::future::pending().await,
        }
    }
}

/// The bus's name for messages (`memory://` is `default`) and its socket.
fn bus_of(url: &str) -> Result<(mqrpc::MemoryTransport, String, std::path::PathBuf)> {
    let bus = mqrpc::MemoryTransport::connect(url).context("connecting")?;
    let label = match bus.name() {
        "" => "default".to_owned(),
        name => name.to_owned(),
    };
    let path = shared_memory::socket_path(bus.name());
    Ok((bus, label, path))
}

/// The transport for `url`: the broker's, or the memory bus's keeper, attached.
pub(crate) async fn open(url: &str, role: Role) -> Result<Opened> {
    if !is_memory(url) {
        return Ok(Opened {
            transport: mqrpc::connect(url).await.context("connecting")?,
            attached: None,
        });
    }
    let (_, label, path) = bus_of(url)?;
    let attach = || async {
        match shared_memory::attach(&path).await {
            Ok(attached) => Ok(Some(attached)),
            Err(err) if shared_memory::nobody_shares(&err) => Ok(None),
            Err(err) => Err(anyhow::anyhow!(
                "attaching to the memory bus {label} at {}: {err}",
                path.display()
            )),
        }
    };
    let attached = match (attach().await?, role) {
        (Some(attached), _) => {
            if url.contains('?') {
                eprintln!(
                    "mqrpc: note: the memory bus {label} exists already; the options of \
                     {url} apply only where a bus is created"
                );
            }
            attached
        }
        (None, Role::Client) => {
            // A bus that was kept before (its lock file is there) may be getting a new
            // keeper: a `serve` starts one when its keeper is killed. Worth a moment.
            let mut found = None;
            if shared_memory::lock_path(&path).exists() {
                let deadline = tokio::time::Instant::now() + HANDOVER;
                while found.is_none() && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(RETRY).await;
                    found = attach().await?;
                }
            }
            found.ok_or_else(|| {
                anyhow::anyhow!(
                    "no mqrpc process keeps the memory bus {label} (nothing at {}); start \
                     `mqrpc serve --url {url} --topic ...` first",
                    path.display()
                )
            })?
        }
        (None, Role::Member) => {
            let mut keeper = start_keeper(url)?;
            let deadline = tokio::time::Instant::now() + KEEPER_START;
            let attached = loop {
                if let Some(attached) = attach().await? {
                    break attached;
                }
                // A keeper that lost the race to another exits with success, and the
                // other one shares the bus; one that failed says so by its status.
                if let Some(status) = keeper.try_wait()?
                    && !status.success()
                {
                    bail!(
                        "the keeper of the memory bus {label} failed ({status}); run `mqrpc \
                         keep-bus --url {url}` to see why"
                    );
                }
                if tokio::time::Instant::now() > deadline {
                    bail!(
                        "the keeper of the memory bus {label} did not share it at {} in time",
                        path.display()
                    );
                }
                tokio::time::sleep(RETRY).await;
            };
            // Reaped when it exits, while this command runs (no zombie meanwhile).
            tokio::spawn(async move {
                let _ = keeper.wait().await;
            });
            attached
        }
    };
    Ok(Opened {
        transport: Arc::new(attached.clone()),
        attached: Some(attached),
    })
}

/// Starts `mqrpc keep-bus --url URL` in the background, detached from this command's
/// terminal and output, so that neither Ctrl-C on this command nor a test harness
/// that reads this command's output to its end waits for the keeper.
fn start_keeper(url: &str) -> Result<tokio::process::Child> {
    use std::process::Stdio;

    let program = std::env::current_exe().context("finding the mqrpc executable")?;
    tokio::process::Command::new(&program)
        .args(["keep-bus", "--url", url])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting the memory bus keeper {}", program.display()))
}

/// `mqrpc keep-bus`: holds the memory bus of `url` and shares it until nobody has
/// been attached for [`KEEPER_IDLE`]. A keeper that finds another one already
/// sharing the bus leaves it to that one.
pub(crate) async fn keep(url: &str) -> Result<()> {
    let (bus, label, path) = bus_of(url)?;
    let sharing = match bus.share(&path).await {
        Ok(sharing) => sharing,
        Err(err) if err.kind() == std::io::ErrorKind::AddrInUse => return Ok(()),
        Err(err) => {
            return Err(err)
                .with_context(|| format!("sharing the memory bus {label} at {}", path.display()));
        }
    };
    tokio::select! {
        () = sharing.idle_for(KEEPER_IDLE) => {}
        () = crate::stopped() => {}
    }
    Ok(())
}
