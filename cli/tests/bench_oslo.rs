//! `mqrpc bench --oslo` on RabbitMQ: Python oslo.messaging's client and server
//! against mqrpc's, figures and ratios in the JSON and the markdown. Needs RabbitMQ
//! and the virtualenv of `scripts/oslo-venv.sh` (`MQRPC_OSLO_PYTHON` overrides the
//! interpreter); either missing fails the test unless `MQRPC_ALLOW_SKIP=1`.

use std::path::PathBuf;

mod common;

use common::{amqp_url, broker_available, mqrpc, skips};

/// The Python interpreter with oslo.messaging, as the interop tests find it. When it
/// is missing: a failure, or `None` after a recorded skip under `MQRPC_ALLOW_SKIP=1`.
fn python() -> Option<PathBuf> {
    let path = match std::env::var_os("MQRPC_OSLO_PYTHON") {
        Some(path) => PathBuf::from(path),
        None => std::env::var_os("MQRPC_OSLO_VENV")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                    .join(".cache/mqrpc/oslo-venv")
            })
            .join("bin/python"),
    };
    if path.exists() {
        return Some(path);
    }
    skips::missing(
        "bench --oslo",
        &format!(
            "the Python peer {} is missing; run scripts/oslo-venv.sh",
            path.display()
        ),
    );
    None
}

#[test]
fn bench_oslo_measures_python_and_mqrpc_as_clients_and_servers_of_each_other() {
    if !broker_available("bench --oslo", &amqp_url()) {
        return;
    }
    let Some(python) = python() else {
        return;
    };
    let out = std::env::temp_dir().join(format!("mqrpc-bench-oslo-test-{}", std::process::id()));
    let (code, stdout, stderr) = mqrpc(&[
        "bench",
        "--url",
        &amqp_url(),
        "--quick",
        "--oslo",
        "--oslo-python",
        python.to_str().expect("utf-8 path"),
        "--concurrency",
        "1,4",
        "--payloads",
        "100",
        "--servers",
        "1",
        "--out",
        out.to_str().expect("utf-8 path"),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("### Against Python oslo.messaging"),
        "{stdout}"
    );
    assert!(
        stdout.contains("| Python client → mqrpc server | 4 |"),
        "{stdout}"
    );
    assert!(stdout.contains("| mqrpc end to end | 1 |"), "{stdout}");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("bench-amqp.json")).expect("json written"))
            .expect("json");
    let oslo = &json["oslo"];
    assert!(
        oslo["oslo_messaging"]
            .as_str()
            .is_some_and(|v| !v.is_empty()),
        "{oslo}"
    );
    let positive = |value: &serde_json::Value| value.as_f64().is_some_and(|v| v > 0.0);
    for pairing in [
        "python_to_python",
        "python_to_mqrpc",
        "mqrpc_to_python",
        "mqrpc_to_mqrpc",
    ] {
        let points = oslo["median"][pairing].as_array().expect(pairing);
        let concurrencies: Vec<u64> = points
            .iter()
            .map(|p| p["concurrency"].as_u64().expect("concurrency"))
            .collect();
        assert_eq!(concurrencies, [1, 4], "{pairing}: {oslo}");
        for point in points {
            assert!(positive(&point["calls_per_s"]), "{pairing}: {point}");
            assert!(positive(&point["p50_us"]), "{pairing}: {point}");
            assert!(
                point["calls"].as_u64().is_some_and(|n| n >= 100),
                "{pairing}: {point}"
            );
        }
    }
    let ratios = oslo["ratios"].as_array().expect("ratios");
    assert_eq!(ratios.len(), 2, "{oslo}");
    for ratio in ratios {
        for key in [
            "server_calls_per_s",
            "server_p50",
            "end_to_end_calls_per_s",
            "end_to_end_p50",
        ] {
            assert!(positive(&ratio[key]), "{key}: {ratio}");
        }
    }
    assert_eq!(oslo["rounds"].as_array().map(Vec::len), Some(1), "{oslo}");
    let _ = std::fs::remove_dir_all(out);
}

#[test]
fn bench_oslo_needs_an_amqp_url() {
    for url in ["memory://", "nats://127.0.0.1:4222"] {
        let (code, _, stderr) = mqrpc(&["bench", "--url", url, "--quick", "--oslo"]);
        assert_ne!(code, 0, "{url}: {stderr}");
        assert!(stderr.contains("needs an amqp:// URL"), "{url}: {stderr}");
    }
}

#[test]
fn bench_oslo_without_its_interpreter_says_how_to_get_it() {
    let (code, _, stderr) = mqrpc(&[
        "bench",
        "--url",
        "amqp://guest:guest@127.0.0.1:5672/",
        "--quick",
        "--oslo",
        "--oslo-python",
        "/nonexistent/bin/python",
    ]);
    assert_ne!(code, 0, "{stderr}");
    assert!(stderr.contains("bash scripts/oslo-venv.sh"), "{stderr}");
}
