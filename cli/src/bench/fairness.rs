//! The fairness figure of `mqrpc bench`: how evenly competing servers share steady
//! load. A client makes 100 B echo calls at concurrency 64 to N servers of one
//! topic; each server's count of the calls it handled, read before and after the
//! measured part, gives the busiest and the quietest server.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context as _, Result};
use async_trait::async_trait;
use mqrpc::{Client, Context};
use serde::{Deserialize, Serialize};

use super::caller::Caller;
use super::{Budget, SMALL, timed_throughput};

/// How N competing servers shared the calls of the measured part.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Fairness {
    /// Competing servers (or bare consumers).
    pub(crate) servers: usize,
    /// Calls in flight at once.
    pub(crate) concurrency: usize,
    /// Calls the client made in the measured part.
    pub(crate) calls: u64,
    /// Their rate.
    pub(crate) calls_per_s: f64,
    /// The calls each server handled in the measured part, in the servers' order.
    pub(crate) handled: Vec<u64>,
    /// The fewest calls a server handled.
    pub(crate) quietest: u64,
    /// The most calls a server handled.
    pub(crate) busiest: u64,
    /// The median of `handled`.
    pub(crate) median: f64,
    /// `busiest / quietest`; none when a server handled no call at all.
    pub(crate) busiest_to_quietest: Option<f64>,
}

impl Fairness {
    /// The figure for `handled` calls by server, `calls` made at `calls_per_s`.
    pub(crate) fn new(concurrency: usize, calls: u64, calls_per_s: f64, handled: Vec<u64>) -> Self {
        let mut sorted = handled.clone();
        sorted.sort_unstable();
        let quietest = sorted.first().copied().unwrap_or(0);
        let busiest = sorted.last().copied().unwrap_or(0);
        let n = sorted.len();
        let median = match n {
            0 => 0.0,
            n if n % 2 == 1 => sorted[n / 2] as f64,
            n => (sorted[n / 2 - 1] + sorted[n / 2]) as f64 / 2.0,
        };
        Fairness {
            servers: n,
            concurrency,
            calls,
            calls_per_s,
            handled,
            quietest,
            busiest,
            median,
            busiest_to_quietest: (quietest > 0).then(|| busiest as f64 / quietest as f64),
        }
    }
}

/// The running totals of calls handled by each of the competing servers.
#[async_trait]
pub(crate) trait Tally: Send + Sync {
    /// Each server's count of calls handled so far, in a fixed order.
    async fn handled(&self) -> Result<Vec<u64>>;
}

/// mqrpc's demo servers, each asked for its `echoes()` by a call directed at it:
/// works wherever the servers run.
pub(crate) struct EchoesOf {
    pub(crate) client: Client,
    pub(crate) servers: Vec<String>,
}

#[async_trait]
impl Tally for EchoesOf {
    async fn handled(&self) -> Result<Vec<u64>> {
        let asks = self.servers.iter().map(|name| async move {
            self.client
                .prepare()
                .server(name)
                .call::<_, u64>(&Context::new(), "echoes", mqrpc::NoArgs {})
                .await
                .with_context(|| format!("asking server {name} for its count of echoes"))
        });
        futures::future::try_join_all(asks).await
    }
}

/// Counters the bare clients' echo servers bump, one per consumer.
pub(crate) struct Counters(pub(crate) Vec<Arc<AtomicU64>>);

#[async_trait]
impl Tally for Counters {
    async fn handled(&self) -> Result<Vec<u64>> {
        Ok(self.0.iter().map(|c| c.load(Ordering::Relaxed)).collect())
    }
}

/// Warms up, then measures `budget` of 100 B calls at `concurrency` through `caller`
/// and how `tally`'s servers shared them.
pub(crate) async fn measure(
    caller: Arc<dyn Caller>,
    tally: &dyn Tally,
    concurrency: usize,
    budget: Budget,
) -> Result<Fairness> {
    let before = tally.handled().await?;
    // Enough for every server to have handled some before the measured part.
    let warm_up = Budget {
        calls: (before.len() * 20).max(Budget::WARM_UP.calls),
        ..Budget::WARM_UP
    };
    timed_throughput(caller.clone(), SMALL, concurrency, warm_up).await?;
    let before = tally.handled().await?;
    let (rate, calls) = timed_throughput(caller, SMALL, concurrency, budget).await?;
    let after = tally.handled().await?;
    let handled = (after.iter().zip(&before))
        .map(|(after, before)| after.saturating_sub(*before))
        .collect();
    Ok(Fairness::new(
        concurrency,
        calls as u64,
        rate.calls_per_s,
        handled,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busiest_against_quietest() {
        let fair = Fairness::new(64, 10, 100.0, vec![3, 1, 4, 2]);
        assert_eq!((fair.quietest, fair.busiest, fair.median), (1, 4, 2.5));
        assert_eq!(fair.busiest_to_quietest, Some(4.0));
        assert_eq!(fair.servers, 4);
        let starved = Fairness::new(64, 5, 100.0, vec![5, 0, 0]);
        assert_eq!(starved.busiest_to_quietest, None);
        assert_eq!(starved.median, 0.0);
    }
}
