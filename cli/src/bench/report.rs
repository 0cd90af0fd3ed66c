//! The benchmark's outputs: a markdown table (with mqrpc/raw ratios) and an SVG plot
//! of throughput and mean latency against concurrency.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context as _, Result};
use plotters::prelude::*;

use super::fairness::Fairness;
use super::figures::{Figures, Latency, Oslo, OsloRatios, Rate, Run, Shaped};

fn ratio(ours: f64, raw: Option<f64>) -> String {
    match raw {
        Some(raw) if raw > 0.0 => format!("{:.2}", ours / raw),
        _ => "-".to_owned(),
    }
}

fn raw_rate(raw: Option<&Figures>, pick: impl Fn(&Figures) -> &Vec<Rate>, x: usize) -> Option<f64> {
    raw.and_then(|figures| rate_at(pick(figures), x))
}

/// The lowest and highest of the rounds' own ratios, when there are several rounds.
fn spread(pairs: impl IntoIterator<Item = (f64, f64)>) -> String {
    let ratios: Vec<f64> = (pairs.into_iter())
        .filter(|&(_, raw)| raw > 0.0)
        .map(|(ours, raw)| ours / raw)
        .collect();
    let low = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let high = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if ratios.len() < 2 {
        "-".to_owned()
    } else {
        format!("{low:.2}–{high:.2}")
    }
}

/// One row: mqrpc's figure, the raw client's (or `-`), their ratio, and the spread
/// of the rounds' ratios.
fn compared(out: &mut String, name: &str, ours: f64, theirs: Option<f64>, spread: &str) {
    let theirs_text = theirs.map_or("-".to_owned(), |t| format!("{t:.0}"));
    let _ = writeln!(
        out,
        "| {name} | {ours:.0} | {theirs_text} | {} | {spread} |",
        ratio(ours, theirs)
    );
}

/// Each round's mqrpc and raw values of one figure, paired by round.
fn paired(run: &Run, pick: impl Fn(&Figures) -> Option<f64>) -> Vec<(f64, f64)> {
    (run.rounds_mqrpc.iter().zip(&run.rounds_raw))
        .filter_map(|(ours, raw)| Some((pick(ours)?, pick(raw)?)))
        .collect()
}

/// The calls per second of the rate at `x` among `rates`.
pub(super) fn rate_at(rates: &[Rate], x: usize) -> Option<f64> {
    rates.iter().find(|r| r.x == x).map(|r| r.calls_per_s)
}

/// The run as a markdown table.
pub(crate) fn markdown(run: &Run) -> String {
    let raw = run.raw.as_ref();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## {}{}\n",
        run.backend,
        if run.quick { " (quick run)" } else { "" }
    );
    let _ = writeln!(out, "mqrpc's {}.\n", run.servers_in.describe());
    if run.rounds > 1 {
        let _ = writeln!(
            out,
            "Latency percentiles over the calls of all {0} rounds together, the other \
             figures medians of the {0} rounds (mqrpc and raw taking turns at going \
             first); the last column is the lowest and highest ratio of a single round. \
             Competing servers, casts and memory ran once.\n",
            run.rounds
        );
    }
    let _ = writeln!(out, "| figure | mqrpc | raw | mqrpc/raw | rounds' ratios |");
    let _ = writeln!(out, "|---|---|---|---|---|");
    if let Some(latency) = &run.mqrpc.latency {
        let raw_latency = raw.and_then(|r| r.latency.as_ref());
        type Pick = fn(&Latency) -> f64;
        for (name, pick) in [
            ("latency p50 (µs)", (|l| l.p50_us) as Pick),
            ("latency p99 (µs)", |l| l.p99_us),
            ("latency p99.9 (µs)", |l| l.p999_us),
        ] {
            let rounds = paired(run, |f| f.latency.as_ref().map(pick));
            compared(
                &mut out,
                name,
                pick(latency),
                raw_latency.map(pick),
                &spread(rounds),
            );
        }
    }
    for rate in &run.mqrpc.throughput {
        let theirs = raw_rate(raw, |f| &f.throughput, rate.x);
        let name = format!("calls/s at concurrency {}", rate.x);
        let rounds = paired(run, |f| rate_at(&f.throughput, rate.x));
        compared(&mut out, &name, rate.calls_per_s, theirs, &spread(rounds));
    }
    for rate in &run.mqrpc.payloads {
        let theirs = raw_rate(raw, |f| &f.payloads, rate.x);
        let name = format!("calls/s, {} B payload, concurrency 16", rate.x);
        let rounds = paired(run, |f| rate_at(&f.payloads, rate.x));
        compared(&mut out, &name, rate.calls_per_s, theirs, &spread(rounds));
    }
    competing_rows(&mut out, &run.mqrpc, raw);
    for Shaped {
        name,
        median: theirs,
        rounds: their_rounds,
        latency: their_latency,
    } in &run.raw_shaped
    {
        if let (Some(ours), Some(theirs)) = (&run.mqrpc.latency, their_latency) {
            for (what, ours, theirs) in [
                ("p50", ours.p50_us, theirs.p50_us),
                ("p99", ours.p99_us, theirs.p99_us),
                ("p99.9", ours.p999_us, theirs.p999_us),
            ] {
                let _ = writeln!(
                    out,
                    "| latency {what} (µs), raw {name} | {ours:.0} | {theirs:.0} | {} | - |",
                    ratio(ours, Some(theirs))
                );
            }
        }
        let ours = run.mqrpc.throughput.iter().find(|r| r.x == theirs.x);
        let rounds = (run.rounds_mqrpc.iter().zip(their_rounds))
            .filter_map(|(f, raw)| Some((rate_at(&f.throughput, raw.x)?, raw.calls_per_s)));
        let _ = writeln!(
            out,
            "| calls/s at concurrency {}, raw {name} | {} | {:.0} | {} | {} |",
            theirs.x,
            ours.map_or("-".to_owned(), |r| format!("{:.0}", r.calls_per_s)),
            theirs.calls_per_s,
            ours.map_or("-".to_owned(), |r| ratio(
                r.calls_per_s,
                Some(theirs.calls_per_s)
            )),
            spread(rounds)
        );
    }
    if let Some(casts) = run.mqrpc.casts_per_s {
        let _ = writeln!(
            out,
            "| casts/s (sent and handled), concurrency 64 | {casts:.0} | - | - | - |"
        );
    }
    if let (Some(sent), Some(handled)) = (
        run.mqrpc.notifications_sent_per_s,
        run.mqrpc.notifications_handled_per_s,
    ) {
        let _ = writeln!(
            out,
            "| notifications/s sent, 64 senders | {sent:.0} | - | - | - |\n\
             | notifications/s handled (from the first sent to the last handled) | {handled:.0} | - | - | - |"
        );
    }
    if let Some(bytes) = run.mqrpc.bytes_per_in_flight_call {
        let _ = writeln!(
            out,
            "| resident bytes per call in flight | {bytes:.0} | - | - | - |"
        );
    }
    if let Some(oslo) = &run.oslo {
        oslo_section(&mut out, oslo, run.rounds);
    }
    out
}

/// The competing servers' rows: calls/s with N servers (beside the bare client with
/// N competing consumers), each count's throughput against one server's, and the
/// fairness figure.
fn competing_rows(out: &mut String, ours: &Figures, raw: Option<&Figures>) {
    for rate in &ours.servers {
        let theirs = raw_rate(raw, |f| &f.servers, rate.x);
        let name = format!(
            "calls/s with {} competing servers (raw: consumers), concurrency 64",
            rate.x
        );
        compared(out, &name, rate.calls_per_s, theirs, "-");
    }
    let per_one = |figures: &Figures, n: usize| {
        Some(rate_at(&figures.servers, n)? / rate_at(&figures.servers, 1)?)
    };
    for rate in ours.servers.iter().filter(|r| r.x != 1) {
        let Some(ours) = per_one(ours, rate.x) else {
            continue;
        };
        let theirs = raw
            .and_then(|raw| per_one(raw, rate.x))
            .map_or("-".to_owned(), |t| format!("{t:.2}"));
        let _ = writeln!(
            out,
            "| {n} competing servers / 1 server (calls/s) | {ours:.2} | {theirs} | - | - |",
            n = rate.x
        );
    }
    if let Some(fair) = &ours.fairness {
        let theirs = raw.and_then(|raw| raw.fairness.as_ref());
        let cell =
            |f: Option<&Fairness>, text: fn(&Fairness) -> String| f.map_or("-".to_owned(), text);
        let n = fair.servers;
        let _ = writeln!(
            out,
            "| busiest / quietest of {n} competing servers (calls handled), concurrency 64 | {} | {} | - | - |\n\
             | calls handled per server of {n}: fewest / median / most | {} | {} | - | - |\n\
             | calls/s with {n} competing servers (fairness run: {} calls) | {:.0} | {} | {} | - |",
            busiest_to_quietest(fair),
            cell(theirs, busiest_to_quietest),
            spread_of(fair),
            cell(theirs, spread_of),
            fair.calls,
            fair.calls_per_s,
            cell(theirs, |f| format!("{:.0}", f.calls_per_s)),
            ratio(fair.calls_per_s, theirs.map(|f| f.calls_per_s)),
        );
    }
}

/// The fairness ratio as text; `∞` when a server handled nothing.
fn busiest_to_quietest(fair: &Fairness) -> String {
    fair.busiest_to_quietest
        .map_or("∞ (a server handled none)".to_owned(), |r| {
            format!("{r:.2}")
        })
}

/// Fewest / median / most calls handled by one server.
fn spread_of(fair: &Fairness) -> String {
    format!("{} / {:.0} / {}", fair.quietest, fair.median, fair.busiest)
}

/// The main figures of two runs of one backend side by side: servers in the bench's
/// process, and in a child process.
pub(crate) fn placements(bench: &Run, child: &Run) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## {}: mqrpc's servers in the bench's process and in a child process\n",
        bench.backend
    );
    let _ = writeln!(out, "| figure | in the bench | in a child | child/bench |");
    let _ = writeln!(out, "|---|---|---|---|");
    let mut row = |name: &str, ours: Option<f64>, theirs: Option<f64>, digits: usize| {
        if let (Some(a), Some(b)) = (ours, theirs) {
            let _ = writeln!(
                out,
                "| {name} | {a:.digits$} | {b:.digits$} | {} |",
                ratio(b, Some(a))
            );
        }
    };
    let (a, b) = (&bench.mqrpc, &child.mqrpc);
    let p50 = |f: &Figures| f.latency.as_ref().map(|l| l.p50_us);
    row("latency p50 (µs)", p50(a), p50(b), 0);
    for rate in &a.throughput {
        let name = format!("calls/s at concurrency {}", rate.x);
        row(
            &name,
            Some(rate.calls_per_s),
            rate_at(&b.throughput, rate.x),
            0,
        );
    }
    for rate in &a.servers {
        let name = format!("calls/s with {} competing servers, concurrency 64", rate.x);
        row(
            &name,
            Some(rate.calls_per_s),
            rate_at(&b.servers, rate.x),
            0,
        );
    }
    let per_one = |f: &Figures, n: usize| Some(rate_at(&f.servers, n)? / rate_at(&f.servers, 1)?);
    for rate in a.servers.iter().filter(|r| r.x != 1) {
        let name = format!("{} competing servers / 1 server (calls/s)", rate.x);
        row(&name, per_one(a, rate.x), per_one(b, rate.x), 2);
    }
    let fair = |f: &Figures| f.fairness.as_ref().and_then(|f| f.busiest_to_quietest);
    if let Some(n) = a.fairness.as_ref().map(|f| f.servers) {
        let name = format!("busiest / quietest of {n} competing servers");
        row(&name, fair(a), fair(b), 2);
    }
    row("casts/s, concurrency 64", a.casts_per_s, b.casts_per_s, 0);
    out
}

/// `--oslo`'s section: each pairing's figures, then mqrpc's ratios to oslo.messaging.
fn oslo_section(out: &mut String, oslo: &Oslo, rounds: usize) {
    let _ = writeln!(
        out,
        "\n### Against Python oslo.messaging {} (Python {})\n\n\
         100 B echo calls on the same broker, each timed on its own{}; a Python client \
         is one RPCClient shared by as many threads as the concurrency.\n",
        oslo.oslo_messaging,
        oslo.python,
        if rounds > 1 {
            format!("; medians of {rounds} rounds (the pairings' order reversed every other round)")
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        out,
        "| client → server | concurrency | calls/s | p50 (µs) | p99 (µs) |\n|---|---|---|---|---|"
    );
    for (name, points) in oslo.median.pairings() {
        for point in points {
            let _ = writeln!(
                out,
                "| {name} | {} | {:.0} | {:.0} | {:.0} |",
                point.concurrency, point.calls_per_s, point.p50_us, point.p99_us
            );
        }
    }
    let _ = writeln!(
        out,
        "\nmqrpc's figures over Python → Python's: above 1 is faster for calls/s, below 1 \
         is faster for p50. \"mqrpc server, Python clients\" is Python client → mqrpc \
         server; \"mqrpc end to end\" is mqrpc client → mqrpc server.\n\n\
         | mqrpc's ratio to oslo.messaging | concurrency | calls/s | p50 | rounds' calls/s ratios |\n\
         |---|---|---|---|---|"
    );
    let text = |ratio: Option<f64>| ratio.map_or("-".to_owned(), |r| format!("{r:.2}"));
    let each_round: Vec<_> = oslo.rounds.iter().map(|round| round.ratios()).collect();
    for (name, server) in [
        ("mqrpc server, Python clients", true),
        ("mqrpc end to end", false),
    ] {
        let pick = |ratios: &OsloRatios| {
            if server {
                (ratios.server_calls_per_s, ratios.server_p50)
            } else {
                (ratios.end_to_end_calls_per_s, ratios.end_to_end_p50)
            }
        };
        for ratios in &oslo.ratios {
            let (rate, p50) = pick(ratios);
            // Each round's own ratio, as (ratio, 1) pairs for `spread`.
            let rounds = (each_round.iter())
                .filter_map(|round| round.iter().find(|r| r.concurrency == ratios.concurrency))
                .filter_map(|r| Some((pick(r).0?, 1.0)));
            let _ = writeln!(
                out,
                "| {name} | {} | {} | {} | {} |",
                ratios.concurrency,
                text(rate),
                text(p50),
                spread(rounds)
            );
        }
    }
}

/// Throughput and mean latency against concurrency, for mqrpc and the raw client.
pub(crate) fn plot(run: &Run, path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, (960, 420)).into_drawing_area();
    root.fill(&WHITE).context("drawing")?;
    let (left, right) = root.split_horizontally(480);
    let mut series: Vec<(&str, &Figures, RGBColor)> = vec![("mqrpc", &run.mqrpc, BLUE)];
    if let Some(raw) = &run.raw {
        series.push(("raw", raw, RED));
    }
    let max_x = run
        .mqrpc
        .throughput
        .iter()
        .map(|r| r.x)
        .max()
        .unwrap_or(1)
        .max(2) as f64;
    for (area, title, pick) in [
        (
            &left,
            "calls/s vs concurrency",
            (|r: &Rate| r.calls_per_s) as fn(&Rate) -> f64,
        ),
        (&right, "mean latency (µs) vs concurrency", |r: &Rate| {
            r.mean_latency_us
        }),
    ] {
        let max_y = series
            .iter()
            .flat_map(|(_, f, _)| f.throughput.iter().map(pick))
            .fold(1.0_f64, f64::max)
            * 1.1;
        let mut chart = ChartBuilder::on(area)
            .caption(format!("{} — {title}", run.backend), ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d((1.0_f64..max_x).log_scale(), 0.0..max_y)
            .context("chart")?;
        chart
            .configure_mesh()
            .x_desc("concurrency")
            .draw()
            .context("mesh")?;
        for (name, figures, color) in &series {
            let points: Vec<(f64, f64)> = figures
                .throughput
                .iter()
                .map(|r| (r.x.max(1) as f64, pick(r)))
                .collect();
            chart
                .draw_series(LineSeries::new(points.clone(), color))
                .context("line")?
                .label(*name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
            chart
                .draw_series(
                    points
                        .into_iter()
                        .map(|p| Circle::new(p, 3, color.filled())),
                )
                .context("points")?;
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE)
            .draw()
            .context("legend")?;
    }
    root.present().context("writing the plot")?;
    Ok(())
}
