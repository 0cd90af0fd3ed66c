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
    /// With `--oslo`: Python oslo.messaging and mqrpc as clients and servers of
    /// each other on the same RabbitMQ.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) oslo: Option<Oslo>,
}

/// One figure of the oslo.messaging comparison at one concurrency: 100 B echo calls,
/// each timed on its own.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct OsloPoint {
    pub(crate) concurrency: usize,
    pub(crate) calls: u64,
    pub(crate) calls_per_s: f64,
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
    pub(crate) p999_us: f64,
}

/// The four pairings of client and server, each a point per concurrency.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct OsloFigures {
    /// oslo.messaging's client calling oslo.messaging's server: the baseline.
    pub(crate) python_to_python: Vec<OsloPoint>,
    /// oslo.messaging's client calling an mqrpc server.
    pub(crate) python_to_mqrpc: Vec<OsloPoint>,
    /// An mqrpc client calling oslo.messaging's server.
    pub(crate) mqrpc_to_python: Vec<OsloPoint>,
    /// An mqrpc client calling an mqrpc server.
    pub(crate) mqrpc_to_mqrpc: Vec<OsloPoint>,
}

/// mqrpc's ratios to oslo.messaging at one concurrency (medians' ratios; above 1 is
/// mqrpc faster for calls/s, slower for p50).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct OsloRatios {
    pub(crate) concurrency: usize,
    /// Calls/s of Python clients served by mqrpc over served by Python.
    pub(crate) server_calls_per_s: Option<f64>,
    /// p50 of Python clients served by mqrpc over served by Python.
    pub(crate) server_p50: Option<f64>,
    /// Calls/s of mqrpc end to end over Python end to end.
    pub(crate) end_to_end_calls_per_s: Option<f64>,
    /// p50 of mqrpc end to end over Python end to end.
    pub(crate) end_to_end_p50: Option<f64>,
}

/// `--oslo`'s figures: their medians over the rounds, the ratios, each round.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Oslo {
    /// The oslo.messaging and Python versions measured.
    pub(crate) oslo_messaging: String,
    pub(crate) python: String,
    /// Each figure's median over the rounds (calls/s and each percentile apart).
    pub(crate) median: OsloFigures,
    pub(crate) ratios: Vec<OsloRatios>,
    pub(crate) rounds: Vec<OsloFigures>,
}

impl OsloFigures {
    /// The four pairings, named as the report names them.
    pub(crate) fn pairings(&self) -> [(&'static str, &Vec<OsloPoint>); 4] {
        [
            ("Python client → Python server", &self.python_to_python),
            ("Python client → mqrpc server", &self.python_to_mqrpc),
            ("mqrpc client → Python server", &self.mqrpc_to_python),
            ("mqrpc client → mqrpc server", &self.mqrpc_to_mqrpc),
        ]
    }

    /// The medians of `rounds`, point by point (paired by concurrency).
    pub(crate) fn median_of(rounds: &[OsloFigures]) -> OsloFigures {
        let of = |pick: fn(&OsloFigures) -> &Vec<OsloPoint>| -> Vec<OsloPoint> {
            let Some(first) = rounds.first() else {
                return Vec::new();
            };
            (pick(first).iter())
                .map(|point| {
                    let same: Vec<&OsloPoint> = (rounds.iter())
                        .filter_map(|f| pick(f).iter().find(|p| p.concurrency == point.concurrency))
                        .collect();
                    OsloPoint {
                        concurrency: point.concurrency,
                        calls: point.calls,
                        calls_per_s: median(same.iter().map(|p| p.calls_per_s)),
                        p50_us: median(same.iter().map(|p| p.p50_us)),
                        p99_us: median(same.iter().map(|p| p.p99_us)),
                        p999_us: median(same.iter().map(|p| p.p999_us)),
                    }
                })
                .collect()
        };
        OsloFigures {
            python_to_python: of(|f| &f.python_to_python),
            python_to_mqrpc: of(|f| &f.python_to_mqrpc),
            mqrpc_to_python: of(|f| &f.mqrpc_to_python),
            mqrpc_to_mqrpc: of(|f| &f.mqrpc_to_mqrpc),
        }
    }

    /// mqrpc's ratios to oslo.messaging, at each concurrency of the baseline.
    pub(crate) fn ratios(&self) -> Vec<OsloRatios> {
        let at =
            |points: &[OsloPoint], c: usize| points.iter().find(|p| p.concurrency == c).cloned();
        let over =
            |ours: Option<f64>, theirs: f64| ours.filter(|_| theirs > 0.0).map(|o| o / theirs);
        (self.python_to_python.iter())
            .map(|base| {
                let server = at(&self.python_to_mqrpc, base.concurrency);
                let end_to_end = at(&self.mqrpc_to_mqrpc, base.concurrency);
                OsloRatios {
                    concurrency: base.concurrency,
                    server_calls_per_s: over(
                        server.as_ref().map(|p| p.calls_per_s),
                        base.calls_per_s,
                    ),
                    server_p50: over(server.as_ref().map(|p| p.p50_us), base.p50_us),
                    end_to_end_calls_per_s: over(
                        end_to_end.as_ref().map(|p| p.calls_per_s),
                        base.calls_per_s,
                    ),
                    end_to_end_p50: over(end_to_end.as_ref().map(|p| p.p50_us), base.p50_us),
                }
            })
            .collect()
    }
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

    fn point(concurrency: usize, calls_per_s: f64, p50_us: f64) -> OsloPoint {
        OsloPoint {
            concurrency,
            calls: 100,
            calls_per_s,
            p50_us,
            p99_us: p50_us * 2.0,
            p999_us: p50_us * 3.0,
        }
    }

    #[test]
    fn oslo_medians_pair_by_concurrency_and_ratios_are_over_python_to_python() {
        let round = |base: f64| OsloFigures {
            python_to_python: vec![point(1, base, 2000.0), point(16, base * 4.0, 4000.0)],
            python_to_mqrpc: vec![point(16, base * 8.0, 2000.0), point(1, base * 2.0, 1000.0)],
            mqrpc_to_python: vec![point(1, base, 1500.0)],
            mqrpc_to_mqrpc: vec![point(1, base * 10.0, 200.0)],
        };
        let median = OsloFigures::median_of(&[round(100.0), round(300.0), round(200.0)]);
        assert_eq!(median.python_to_python[1].calls_per_s, 800.0);
        assert_eq!(median.python_to_mqrpc[0].concurrency, 16);
        let ratios = median.ratios();
        assert_eq!(ratios.len(), 2);
        assert_eq!(ratios[0].server_calls_per_s, Some(2.0));
        assert_eq!(ratios[0].server_p50, Some(0.5));
        assert_eq!(ratios[0].end_to_end_calls_per_s, Some(10.0));
        assert_eq!(ratios[0].end_to_end_p50, Some(0.1));
        assert_eq!(ratios[1].server_calls_per_s, Some(2.0));
        // No mqrpc end-to-end point at 16: no ratio, rather than a wrong one.
        assert_eq!(ratios[1].end_to_end_calls_per_s, None);
    }

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
