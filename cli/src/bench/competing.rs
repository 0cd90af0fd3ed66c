//! The competing-servers figures of `mqrpc bench`: 100 B echo calls at concurrency 64
//! to N servers of one topic, for each `--servers` count, and with `--raw` the bare
//! client's echo server as N competing consumers beside them (what the machine and
//! the broker allow, apart from mqrpc); then the fairness figure of each.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use anyhow::Result;
use indicatif::ProgressBar;

use super::caller::Caller;
use super::fairness::{Counters, EchoesOf, Fairness};
use super::figures::Figures;
use super::servers::{Servers, ServersIn};
use super::{
    BenchArgs, Budget, MqrpcCaller, SMALL, calls_for, fairness, mqrpc_client, new_topic, raw,
    throughput,
};

/// Calls in flight in these figures.
const CONCURRENCY: usize = 64;

/// How many progress steps [`measure`] takes.
pub(super) fn steps(args: &BenchArgs) -> u64 {
    let sides = if args.raw { 2 } else { 1 };
    (args.servers.len() as u64 + u64::from(args.fairness > 0)) * sides
}

/// Measures the competing servers (into `servers` of `mqrpc` and of `raw`, when the
/// run has a bare client) and the fairness figures.
pub(super) async fn measure(
    args: &BenchArgs,
    servers_in: ServersIn,
    mqrpc: &mut Figures,
    mut raw: Option<&mut Figures>,
    progress: &ProgressBar,
) -> Result<()> {
    let budget = calls_for(args.quick, CONCURRENCY, SMALL);
    for &n in &args.servers {
        progress.set_message(format!("{n} competing servers"));
        let topic = new_topic();
        let servers = Servers::start_in(servers_in, &args.url, &topic, n).await?;
        let caller: Arc<dyn Caller> = Arc::new(MqrpcCaller {
            client: mqrpc_client(&args.url, &topic).await?,
        });
        throughput(caller.clone(), SMALL, 16, Budget::WARM_UP).await?;
        let mut rate = throughput(caller, SMALL, CONCURRENCY, budget).await?;
        rate.x = n;
        mqrpc.servers.push(rate);
        servers.stop().await;
        progress.inc(1);
        if let Some(raw) = raw.as_deref_mut() {
            progress.set_message(format!("raw, {n} competing consumers"));
            let counters = counters(n);
            if let Some(pair) = raw::competing(&args.url, &counters).await? {
                throughput(pair.caller.clone(), SMALL, 16, Budget::WARM_UP).await?;
                let mut rate = throughput(pair.caller.clone(), SMALL, CONCURRENCY, budget).await?;
                rate.x = n;
                raw.servers.push(rate);
            }
            progress.inc(1);
        }
    }
    let n = args.fairness;
    if n == 0 {
        return Ok(());
    }
    progress.set_message(format!("fairness of {n} competing servers"));
    mqrpc.fairness = Some(mqrpc_fairness(args, servers_in, n, budget).await?);
    progress.inc(1);
    if let Some(raw) = raw {
        progress.set_message(format!("fairness of {n} raw competing consumers"));
        let counters = counters(n);
        if let Some(pair) = raw::competing(&args.url, &counters).await? {
            let tally = Counters(counters);
            raw.fairness =
                Some(fairness::measure(pair.caller.clone(), &tally, CONCURRENCY, budget).await?);
        }
        progress.inc(1);
    }
    Ok(())
}

/// `n` counters at zero.
fn counters(n: usize) -> Vec<Arc<AtomicU64>> {
    (0..n).map(|_| Arc::default()).collect()
}

/// The fairness of `n` of mqrpc's servers, each asked for its count of echoes.
async fn mqrpc_fairness(
    args: &BenchArgs,
    servers_in: ServersIn,
    n: usize,
    budget: Budget,
) -> Result<Fairness> {
    let topic = new_topic();
    let servers = Servers::start_in(servers_in, &args.url, &topic, n).await?;
    let client = mqrpc_client(&args.url, &topic).await?;
    let tally = EchoesOf {
        client: client.clone(),
        servers: servers.names().to_vec(),
    };
    let caller: Arc<dyn Caller> = Arc::new(MqrpcCaller { client });
    let measured = fairness::measure(caller, &tally, CONCURRENCY, budget).await;
    servers.stop().await;
    measured
}
