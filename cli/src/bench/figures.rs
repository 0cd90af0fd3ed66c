//! What `mqrpc bench` measured: the figures of each side (mqrpc, the bare client)
//! and of the whole run, as printed and written to JSON, and how the figures of
//! several rounds combine into their medians.

use serde::{Deserialize, Serialize};

use super::fairness::Fairness;
use super::servers::ServersIn;

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Latency {
    pub(crate) calls: u64,
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
    pub(crate) p999_us: f64,
}

/// Calls per second at one concurrency, with the mean latency seen there.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Rate {
    pub(crate) x: usize,
    pub(crate) calls_per_s: f64,
    pub(crate) mean_latency_us: f64,
}

/// Everything measured for one side (mqrpc or raw).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Figures {
    pub(crate) latency: Option<Latency>,
    pub(crate) throughput: Vec<Rate>,
    pub(crate) payloads: Vec<Rate>,
    pub(crate) servers: Vec<Rate>,
    pub(crate) casts_per_s: Option<f64>,
    /// Notifications sent per second by 64 senders, until the broker had them all.
    #[serde(default)]
    pub(crate) notifications_sent_per_s: Option<f64>,
    /// Notifications handled per second, from the first send to the last handled.
    #[serde(default)]
    pub(crate) notifications_handled_per_s: Option<f64>,
    /// Resident memory per call in flight, measured with 10 000 calls waiting.
    #[serde(default)]
    pub(crate) bytes_per_in_flight_call: Option<f64>,
    /// How evenly `--fairness` competing servers (or bare consumers) shared the calls.
    #[serde(default)]
    pub(crate) fairness: Option<Fairness>,
}

/// The result of one run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Run {
    pub(crate) backend: String,
    pub(crate) quick: bool,
    /// Where mqrpc's servers ran (the bare clients' always run in the bench).
    #[serde(default = "in_bench")]
    pub(crate) servers_in: ServersIn,
    /// How many rounds the latency, throughput and payload figures ran; `mqrpc` and
    /// `raw` hold their medians, `rounds_*` each round's figures.
    #[serde(default = "one")]
    pub(crate) rounds: usize,
    pub(crate) mqrpc: Figures,
    pub(crate) raw: Option<Figures>,
    /// With `--raw`, on AMQP and NATS: the bare client doing more of mqrpc's wire work
    /// (see [`super::raw::shaped_pairs`]), at concurrency 64 only: what that work costs the
    /// broker apart from mqrpc's code.
    #[serde(default)]
    pub(crate) raw_shaped: Vec<Shaped>,
    #[serde(default)]
    pub(crate) rounds_mqrpc: Vec<Figures>,
    #[serde(default)]
    pub(crate) rounds_raw: Vec<Figures>,
    /// With `--servers-in both`: the same figures measured next with the servers in
    /// a child process (this run's had them in the bench's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) servers_in_child: Option<Box<Run>>,
}

/// The bare client in another shape, measured at concurrency 64 only.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Shaped {
    /// What the bare client does in this shape.
    pub(crate) name: String,
    /// The median over the rounds.
    pub(crate) median: Rate,
    /// Each round's figure.
    pub(crate) rounds: Vec<Rate>,
    /// Sequential latency over every round's calls, measured in turns with mqrpc's.
    #[serde(default)]
    pub(crate) latency: Option<Latency>,
}

fn one() -> usize {
    1
}

fn in_bench() -> ServersIn {
    ServersIn::Bench
}

/// The median of `values` (the mean of the middle two for an even count); 0 for none.
fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.into_iter().collect();
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Each rate of `pick` in the first round, as its median over every round.
fn median_rates(rounds: &[Figures], pick: fn(&Figures) -> &Vec<Rate>) -> Vec<Rate> {
    let Some(first) = rounds.first() else {
        return Vec::new();
    };
    (pick(first).iter())
        .map(|rate| {
            let same: Vec<&Rate> = (rounds.iter())
                .filter_map(|f| pick(f).iter().find(|r| r.x == rate.x))
                .collect();
            median_rate(rate.x, &same)
        })
        .collect()
}

/// One rate at `x` from its measurements in several rounds, by their medians.
pub(super) fn median_rate(x: usize, same: &[&Rate]) -> Rate {
    Rate {
        x,
        calls_per_s: median(same.iter().map(|r| r.calls_per_s)),
        mean_latency_us: median(same.iter().map(|r| r.mean_latency_us)),
    }
}

/// The figures of several rounds as their medians (latency percentiles each on
/// their own).
pub(super) fn median_figures(rounds: &[Figures]) -> Figures {
    let latencies: Vec<&Latency> = rounds.iter().filter_map(|f| f.latency.as_ref()).collect();
    Figures {
        latency: latencies.first().map(|first| Latency {
            calls: first.calls,
            p50_us: median(latencies.iter().map(|l| l.p50_us)),
            p99_us: median(latencies.iter().map(|l| l.p99_us)),
            p999_us: median(latencies.iter().map(|l| l.p999_us)),
        }),
        throughput: median_rates(rounds, |f| &f.throughput),
        payloads: median_rates(rounds, |f| &f.payloads),
        ..Figures::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(x: usize, calls_per_s: f64) -> Rate {
        Rate {
            x,
            calls_per_s,
            mean_latency_us: 1e6 / calls_per_s,
        }
    }

    #[test]
    fn medians_of_odd_even_and_no_rounds() {
        assert_eq!(median([3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median([4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median([7.0]), 7.0);
        assert_eq!(median([]), 0.0);
    }

    #[test]
    fn figures_are_the_medians_of_their_rounds_by_concurrency() {
        let round = |p50: f64, at1: f64, at64: f64| Figures {
            latency: Some(Latency {
                calls: 10,
                p50_us: p50,
                p99_us: p50 * 2.0,
                p999_us: p50 * 3.0,
            }),
            throughput: vec![rate(1, at1), rate(64, at64)],
            ..Figures::default()
        };
        // The third round lists its rates in another order: they pair by concurrency.
        let mut third = round(30.0, 300.0, 9000.0);
        third.throughput.reverse();
        let medians = median_figures(&[
            round(10.0, 100.0, 7000.0),
            round(20.0, 500.0, 8000.0),
            third,
        ]);
        let latency = medians.latency.expect("latency");
        assert_eq!((latency.p50_us, latency.p999_us), (20.0, 60.0));
        let at = |x| super::super::report::rate_at(&medians.throughput, x);
        assert_eq!((at(1), at(64)), (Some(300.0), Some(8000.0)));
        assert!(medians.servers.is_empty() && medians.casts_per_s.is_none());
    }
}
