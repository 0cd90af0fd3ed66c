//! `mqrpc ping TOPIC` and `mqrpc status TOPIC` as an operator runs them, against
//! `mqrpc serve` processes on NATS: the servers that answer, as a table and as
//! JSON; a server started with `--no-discovery` stays out; `--rpc-ping` answers
//! oslo's ping; nobody there is exit status 1.

mod common;

use common::{broker_available, mqrpc, nats_url, serve_as};
use serde_json::{Value, json};

/// The demo server's methods (`mqrpc serve`), as a status lists them.
const DEMO_METHODS: [&str; 8] = [
    "add", "bump", "bumps", "count", "echo", "echoes", "fail", "sleep",
];

#[test]
fn ping_and_status_list_the_servers_of_a_topic_on_nats() {
    if !broker_available("cli discovery on nats", &nats_url()) {
        return;
    }
    let url = nats_url();
    let topic = format!("cli_discover_{}", std::process::id());
    let s1 = serve_as(&url, &topic, "s1", &["--rpc-ping"]);
    let s2 = serve_as(&url, &topic, "s2", &[]);
    let _s3 = serve_as(&url, &topic, "s3", &["--no-discovery"]);
    let base = ["--url", url.as_str()];
    let run = |command: &str, extra: &[&str]| {
        let mut all = vec![command];
        all.extend_from_slice(&base);
        all.extend_from_slice(extra);
        all.push(&topic);
        mqrpc(&all)
    };
    let call = |server: &str, method: &str| {
        mqrpc(&[
            "call",
            "--url",
            &url,
            "--topic",
            &topic,
            "--server",
            server,
            "--timeout",
            "10s",
            method,
            "{}",
        ])
    };
    for _ in 0..2 {
        let (code, out, err) = call("s1", "bumps");
        assert_eq!((code, out.trim()), (0, "0"), "{err}");
    }
    // oslo's ping, on the server started with --rpc-ping only.
    let (code, out, err) = call("s1", "oslo_rpc_server_ping");
    assert_eq!((code, out.trim()), (0, "\"pong\""), "{err}");
    let (code, _, err) = call("s2", "oslo_rpc_server_ping");
    assert_eq!(code, 1);
    assert!(err.contains("oslo_rpc_server_ping"), "{err}");

    // Waits for two answers at most 20 s: no quiet interval cuts a slow one off.
    let waiting = ["--expect", "2", "--quiet", "20s", "--timeout", "20s"];
    let (code, out, err) = run("status", &[&waiting[..], &["--json"][..]].concat());
    assert_eq!(code, 0, "{err}");
    let statuses: Value = serde_json::from_str(out.trim()).expect("a JSON array");
    let statuses = statuses.as_array().expect("an array");
    let servers: Vec<&str> = statuses
        .iter()
        .map(|s| s["server"].as_str().expect("a name"))
        .collect();
    assert_eq!(servers, ["s1", "s2"], "sorted by name: {out}");
    let (one, two) = (&statuses[0], &statuses[1]);
    assert_eq!(one["pid"], json!(s1.0.id()));
    assert_eq!(two["pid"], json!(s2.0.id()));
    // Three calls to s1 (its ping among them), one to s2, which failed.
    assert_eq!((&one["handled"], &two["handled"]), (&json!(3), &json!(1)));
    for status in [one, two] {
        assert_eq!(status["topic"], json!(topic));
        assert_eq!(status["backend"], "nats");
        assert_eq!(status["in_flight"], 0);
        assert!(status["round_trip_ms"].as_f64().is_some(), "{status}");
        assert!(status["uptime"].as_f64().is_some(), "{status}");
        assert_eq!(
            status["endpoints"][0],
            json!({"namespace": null, "version": "1.3", "methods": DEMO_METHODS})
        );
    }
    assert_eq!(
        (&one["oslo_ping"], &two["oslo_ping"]),
        (&json!(true), &json!(false))
    );
    assert_eq!(
        one["endpoints"][1],
        json!({"namespace": null, "version": "1.0", "methods": ["oslo_rpc_server_ping"]})
    );

    let (code, out, err) = run("ping", &waiting);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        header,
        ["SERVER", "HOST", "PID", "BACKEND", "TIME"],
        "{out}"
    );
    for (line, (name, serving)) in lines[1..].iter().zip([("s1", &s1), ("s2", &s2)]) {
        let cells: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cells[0], name, "{out}");
        assert_eq!(cells[2], serving.0.id().to_string(), "{out}");
        assert_eq!((cells[3], cells[5]), ("nats", "ms"), "{out}");
        assert!(cells[4].parse::<f64>().is_ok(), "{out}");
    }
    // The columns line up: each starts where its header does.
    let at = lines[0].find("PID").expect("PID");
    assert!(
        lines[1..]
            .iter()
            .all(|l| l[at..].starts_with(|c: char| c.is_ascii_digit())),
        "{out}"
    );

    let (code, out, err) = run("status", &waiting);
    assert_eq!(code, 0, "{err}");
    let tables: Vec<&str> = out.split("\n\n").collect();
    assert_eq!(tables.len(), 2, "{out}");
    let servers: Vec<Vec<&str>> = tables[0]
        .lines()
        .map(|l| {
            l.split("  ")
                .filter(|c| !c.is_empty())
                .map(str::trim)
                .collect()
        })
        .collect();
    assert_eq!(
        servers[0],
        [
            "SERVER",
            "HOST",
            "PID",
            "BACKEND",
            "MQRPC",
            "UPTIME",
            "HANDLED",
            "IN FLIGHT",
            "CONCURRENCY",
            "OSLO PING"
        ],
        "{out}"
    );
    assert_eq!(
        (servers[1][0], servers[1][6], servers[1][9]),
        ("s1", "3", "on"),
        "{out}"
    );
    assert_eq!(
        (servers[2][0], servers[2][6], servers[2][9]),
        ("s2", "1", "off"),
        "{out}"
    );
    let endpoints: Vec<&str> = tables[1].lines().collect();
    assert_eq!(
        endpoints[0].split_whitespace().collect::<Vec<_>>(),
        ["SERVER", "NAMESPACE", "VERSION", "METHODS"],
        "{out}"
    );
    let methods = DEMO_METHODS.join(" ");
    assert_eq!(
        endpoints[1..]
            .iter()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect::<Vec<_>>(),
        [
            format!("s1 - 1.3 {methods}"),
            "s1 - 1.0 oslo_rpc_server_ping".to_owned(),
            format!("s2 - 1.3 {methods}"),
        ],
        "{out}"
    );

    // s3 serves, but does not answer: waiting the quiet interval after the two
    // others finds them only; asked alone, nobody answers.
    let (code, out, err) = run("ping", &["--quiet", "3s", "--timeout", "20s", "--json"]);
    assert_eq!(code, 0, "{err}");
    let found: Value = serde_json::from_str(out.trim()).expect("JSON");
    let names: Vec<&str> = (found.as_array().expect("array").iter())
        .map(|s| s["server"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["s1", "s2"], "{out}");
    let (code, out, err) = run("ping", &["--server", "s3", "--quiet", "2s"]);
    assert_eq!((code, out.as_str()), (1, ""), "{err}");
    assert!(
        err.contains("no server of topic") && err.contains("as s3"),
        "{err}"
    );
    let (code, out, _) = call("s3", "bumps");
    assert_eq!((code, out.trim()), (0, "0"), "s3 serves its endpoint");

    // Nobody on the topic: NATS says so at once, and so does the exit status.
    let nobody = format!("{topic}_nobody");
    let (code, out, err) = mqrpc(&["ping", "--url", &url, "--json", &nobody]);
    assert_eq!((code, out.trim()), (1, "[]"), "{err}");
    assert!(err.contains("no server of topic"), "{err}");
}
