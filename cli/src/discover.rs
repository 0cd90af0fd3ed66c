//! `mqrpc ping TOPIC` and `mqrpc status TOPIC`: ask a topic who is there
//! (`Client::discover`) and print the servers that answered, as a table or as JSON.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::Args;
use futures::StreamExt;
use mqrpc::{Client, Discovered, DiscoveryWait, Target};
use serde_json::{Value, json};

use crate::{AuthArgs, IN_PROCESS, chain, in_process, parse_duration};

/// Whom to ask, and how long to wait for answers.
#[derive(Args, Debug)]
pub(crate) struct DiscoverArgs {
    /// Broker URL (amqp://, rabbit://, redis://, nats://, ...; not memory://).
    #[arg(long, env = "MQRPC_URL")]
    url: String,
    /// The topic to ask.
    topic: String,
    /// Ask this server of the topic only (default: every server, through the
    /// topic's fanout).
    #[arg(long)]
    server: Option<String>,
    /// Wait at most this long for answers, connecting included: seconds or with a
    /// unit (`5`, `5s`, `500ms`).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    timeout: Duration,
    /// Stop after this long without a new answer (counted from the request, then
    /// from each answer).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    quiet: Duration,
    /// Stop as soon as this many servers answered.
    #[arg(long)]
    expect: Option<usize>,
    /// Print a JSON array instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    auth: AuthArgs,
}

/// Which command prints the answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Report {
    /// `ping`: who answered, and how fast.
    Ping,
    /// `status`: everything each server says about itself.
    Status,
}

/// Runs `ping` or `status`: exit status 0 when at least one server answered, 1 when
/// none did.
pub(crate) async fn run(args: DiscoverArgs, report: Report) -> Result<ExitCode> {
    let started = tokio::time::Instant::now();
    anyhow::ensure!(!in_process(&args.url), "{IN_PROCESS}");
    let transport = crate::connect_within(&args.url, args.timeout).await?;
    let mut target = Target::new(&args.topic);
    target.server.clone_from(&args.server);
    let mut client = Client::new(transport, target);
    if let Some(auth) = args.auth.message_auth()? {
        client = client.message_auth(auth);
    }
    let left = args
        .timeout
        .saturating_sub(started.elapsed())
        .max(Duration::from_millis(1));
    let mut wait = DiscoveryWait::new(left).quiet(args.quiet);
    if let Some(expect) = args.expect {
        wait = wait.expect(expect);
    }
    let mut answers = client.discover(wait).await.context("asking")?;
    let mut found = Vec::new();
    while let Some(answer) = answers.next().await {
        match answer {
            Ok(discovered) => found.push(discovered),
            Err(err) => eprintln!("mqrpc: an answer without a status: {}", chain(&err)),
        }
    }
    client.close().await;
    found.sort_by(|a, b| {
        let key = |d: &Discovered| (d.status.server.clone(), d.status.host.clone(), d.status.pid);
        key(a).cmp(&key(b))
    });
    if args.json {
        let rows: Vec<Value> = found.iter().map(|d| as_json(d, report)).collect();
        println!("{}", Value::Array(rows));
    } else if !found.is_empty() {
        print!("{}", as_table(&found, report));
    }
    if found.is_empty() {
        eprintln!(
            "mqrpc: no server of topic {} answered{}",
            args.topic,
            args.server
                .as_deref()
                .map(|s| format!(" as {s}"))
                .unwrap_or_default()
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// Milliseconds, to a tenth.
fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

/// One answer as printed by `--json`: `ping` gives who and how fast, `status` the
/// whole status, both with `round_trip_ms`.
fn as_json(found: &Discovered, report: Report) -> Value {
    let s = &found.status;
    let mut row = match report {
        Report::Ping => json!({
            "server": s.server,
            "host": s.host,
            "pid": s.pid,
            "backend": s.backend,
        }),
        Report::Status => serde_json::to_value(s).unwrap_or(Value::Null),
    };
    if let Value::Object(map) = &mut row {
        map.insert("round_trip_ms".to_owned(), json!(millis(found.round_trip)));
    }
    row
}

/// The answers as text tables: `ping` one line per server; `status` one line per
/// server, then one per endpoint of each.
fn as_table(found: &[Discovered], report: Report) -> String {
    match report {
        Report::Ping => table(
            &["SERVER", "HOST", "PID", "BACKEND", "TIME"],
            found.iter().map(|d| {
                let s = &d.status;
                vec![
                    s.server.clone(),
                    s.host.clone(),
                    s.pid.to_string(),
                    s.backend.clone(),
                    format!("{:.1} ms", millis(d.round_trip)),
                ]
            }),
        ),
        Report::Status => {
            let servers = table(
                &[
                    "SERVER",
                    "HOST",
                    "PID",
                    "BACKEND",
                    "MQRPC",
                    "UPTIME",
                    "HANDLED",
                    "IN FLIGHT",
                    "CONCURRENCY",
                    "OSLO PING",
                ],
                found.iter().map(|d| {
                    let s = &d.status;
                    vec![
                        s.server.clone(),
                        s.host.clone(),
                        s.pid.to_string(),
                        s.backend.clone(),
                        s.mqrpc_version.clone(),
                        uptime(s.uptime),
                        s.handled.to_string(),
                        s.in_flight.to_string(),
                        s.concurrency.to_string(),
                        if s.oslo_ping { "on" } else { "off" }.to_owned(),
                    ]
                }),
            );
            let endpoints = table(
                &["SERVER", "NAMESPACE", "VERSION", "METHODS"],
                found.iter().flat_map(|d| {
                    d.status.endpoints.iter().map(|e| {
                        vec![
                            d.status.server.clone(),
                            e.namespace.clone().unwrap_or_else(|| "-".to_owned()),
                            e.version.clone(),
                            e.methods.join(" "),
                        ]
                    })
                }),
            );
            format!("{servers}\n{endpoints}")
        }
    }
}

/// Seconds as whole seconds, minutes, hours and days (`1h 2m 3s`).
fn uptime(seconds: f64) -> String {
    let whole = Duration::try_from_secs_f64(seconds.floor()).unwrap_or_default();
    humantime::format_duration(whole).to_string()
}

/// Left-aligned columns two spaces apart, without trailing spaces.
fn table(header: &[&str], rows: impl Iterator<Item = Vec<String>>) -> String {
    let mut lines: Vec<Vec<String>> = vec![header.iter().map(|h| (*h).to_owned()).collect()];
    lines.extend(rows);
    let mut widths = vec![0; header.len()];
    for line in &lines {
        for (width, cell) in widths.iter_mut().zip(line) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for line in &lines {
        let mut text = String::new();
        for (i, (cell, width)) in line.iter().zip(&widths).enumerate() {
            if i > 0 {
                text.push_str("  ");
            }
            text.push_str(cell);
            text.extend(std::iter::repeat_n(' ', width - cell.chars().count()));
        }
        out.push_str(text.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_their_columns_without_trailing_spaces() {
        let text = table(
            &["A", "LONG HEADER", "C"],
            [
                vec!["xyz".to_owned(), "1".to_owned(), "".to_owned()],
                vec!["ü".to_owned(), "22".to_owned(), "end".to_owned()],
            ]
            .into_iter(),
        );
        assert_eq!(text, "A    LONG HEADER  C\nxyz  1\nü    22           end\n");
    }

    #[test]
    fn uptimes_read_in_whole_units() {
        assert_eq!(uptime(3723.9), "1h 2m 3s");
        assert_eq!(uptime(0.4), "0s");
        assert_eq!(uptime(f64::NAN), "0s");
    }
}
