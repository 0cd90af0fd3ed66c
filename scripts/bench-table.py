#!/usr/bin/env python3
"""Prints the combined results table of BENCHMARKS.md from the JSON files that
`mqrpc bench --raw --out DIR` writes, one per backend.

    python3 scripts/bench-table.py [DIR]      (default: docs/bench)

Columns: memory, then mqrpc, the bare client and their ratio for NATS, Redis and
AMQP (the AMQP bare client without publisher confirms). A ratio is mqrpc over raw
for throughput and for latency alike; where the run had several rounds, the figures
the targets name also show the lowest and highest ratio of a single round. A figure
a run did not measure is left empty. After the table, one line per backend (and per
placement of the servers, with `--servers-in both`) gives the fairness figure and the
competing servers' throughput against one server's, mqrpc's and the bare client's.

When the AMQP run was made with `--oslo`, a second table follows: Python
oslo.messaging's client and server against mqrpc's, and mqrpc's ratios to
oslo.messaging end to end.
"""

import json
import sys
from pathlib import Path

BROKERS = [("nats", "NATS"), ("redis", "Redis"), ("amqp", "AMQP")]


def number(value):
    """A figure with its thousands apart, as the tables write them."""
    if value is None:
        return ""
    return f"{round(value):,}".replace(",", " ")


def point(points, x):
    """The calls per second at `x` of a list of {x, calls_per_s} points."""
    for p in points or []:
        if p.get("x") == x:
            return p.get("calls_per_s")
    return None


def latency(side, key):
    return (side or {}).get("latency", {}).get(key)


def figures(side):
    """The table's rows of one side of a run (mqrpc or raw), by row name."""
    if not side:
        return {}
    rows = {
        "latency p50 (µs)": latency(side, "p50_us"),
        "latency p99 (µs)": latency(side, "p99_us"),
        "latency p99.9 (µs)": latency(side, "p999_us"),
    }
    for c in (1, 16, 64, 256):
        rows[f"calls/s, concurrency {c}"] = point(side.get("throughput"), c)
    rows["calls/s, 10 KiB, concurrency 16"] = point(side.get("payloads"), 10240)
    rows["calls/s, 1 MiB, concurrency 16"] = point(side.get("payloads"), 1048576)
    for n, name in ((1, "calls/s, 1 server, concurrency 64"),
                    (4, "calls/s, 4 competing servers"),
                    (32, "calls/s, 32 competing servers")):
        rows[name] = point(side.get("servers"), n)
    rows["casts/s, sent and handled"] = side.get("casts_per_s")
    rows["notifications/s sent"] = side.get("notifications_sent_per_s")
    rows["notifications/s handled"] = side.get("notifications_handled_per_s")
    rows["resident bytes per call in flight (10 000 waiting)"] = side.get(
        "bytes_per_in_flight_call")
    return rows


# The rows whose ratio the targets name: shown with the range over the rounds.
RANGED = {"latency p50 (µs)", "calls/s, concurrency 16", "calls/s, concurrency 64"}


def ratio(run, row, mqrpc, raw):
    if mqrpc is None or not raw:
        return ""
    text = f"{mqrpc / raw:.2f}"
    rounds = list(zip(run.get("rounds_mqrpc") or [], run.get("rounds_raw") or []))
    if row in RANGED and len(rounds) > 1:
        each = []
        for ours, theirs in rounds:
            a, b = figures(ours).get(row), figures(theirs).get(row)
            if a is not None and b:
                each.append(a / b)
        if each:
            text += f" ({min(each):.2f}–{max(each):.2f})"
    return text


def main():
    directory = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/bench")
    runs = {}
    for backend in ["memory"] + [b for b, _ in BROKERS]:
        path = directory / f"bench-{backend}.json"
        runs[backend] = json.loads(path.read_text()) if path.exists() else {}
    header = ["figure", "memory"]
    for _, name in BROKERS:
        label = f"{name} (confirms)" if name == "AMQP" else name
        raw = f"{name} raw (no confirms)" if name == "AMQP" else f"{name} raw"
        header += [label, raw, f"{name} ratio"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    memory = figures(runs["memory"].get("mqrpc"))
    for row in figures({"latency": {}}).keys():
        cells = [row, number(memory.get(row))]
        for backend, _ in BROKERS:
            run = runs[backend]
            ours = figures(run.get("mqrpc")).get(row)
            theirs = figures(run.get("raw")).get(row)
            cells += [number(ours), number(theirs), ratio(run, row, ours, theirs)]
        print("| " + " | ".join(cells) + " |")
    # The bare client's other shapes are measured at concurrency 64 only: one point
    # each. Files written before `raw_shaped` have AMQP's confirmed shape alone.
    for backend, label in BROKERS:
        run = runs[backend]
        shaped = run.get("raw_shaped") or []
        if not shaped and run.get("raw_confirmed"):
            shaped = [{"name": "with publisher confirms", "median": run["raw_confirmed"]}]
        ours = point((run.get("mqrpc") or {}).get("throughput"), 64)
        for shape in shaped:
            theirs = shape["median"].get("calls_per_s")
            if ours and theirs:
                print()
                print(f"{label} bare client {shape['name']} at concurrency 64: "
                      f"{number(theirs)} calls/s; mqrpc {number(ours)} is "
                      f"{ours / theirs:.2f}× of it.")
    # Fairness (`--fairness`) and the competing servers' throughput against one
    # server's, for mqrpc and the bare client with as many consumers; with
    # `--servers-in both`, for the run with the servers in a child process too.
    for backend, label in BROKERS:
        run = runs[backend]
        for each in [run, run.get("servers_in_child")]:
            if each and each.get("mqrpc", {}).get("fairness"):
                print()
                print(competing(label, each))
    oslo_table(runs["amqp"].get("oslo"))


def competing(label, run):
    """One line: where the servers ran, their busiest/quietest, and N/1."""
    where = "in a child process" if run.get("servers_in") == "child" else "in the bench"
    parts = []
    for side, name in (("mqrpc", "mqrpc"), ("raw", "bare client")):
        figures_ = run.get(side) or {}
        fair = figures_.get("fairness") or {}
        text = []
        if fair:
            ratio_ = fair.get("busiest_to_quietest")
            text.append(f"busiest/quietest of {fair['servers']} "
                        + (f"{ratio_:.2f}" if ratio_ else "∞")
                        + f" ({fair['quietest']}–{fair['busiest']} calls)")
        one = point(figures_.get("servers"), 1)
        for p in figures_.get("servers") or []:
            if p["x"] != 1 and one:
                text.append(f"{p['x']}/1 servers {p['calls_per_s'] / one:.2f}")
        if text:
            parts.append(f"{name} " + ", ".join(text))
    return f"{label}, servers {where}: " + "; ".join(parts) + "."


PAIRINGS = [("python_to_python", "Python client → Python server"),
            ("python_to_mqrpc", "Python client → mqrpc server"),
            ("mqrpc_to_python", "mqrpc client → Python server"),
            ("mqrpc_to_mqrpc", "mqrpc client → mqrpc server")]


def oslo_table(oslo):
    """The `--oslo` figures of the AMQP run, if any."""
    if not oslo:
        return
    median = oslo.get("median") or {}
    concurrencies = [p["concurrency"] for p in median.get("python_to_python") or []]
    print()
    print(f"Against Python oslo.messaging {oslo.get('oslo_messaging', '')} "
          f"(Python {oslo.get('python', '')}), AMQP, 100 B echo calls:")
    print()
    header = ["client → server"]
    for c in concurrencies:
        header += [f"calls/s, concurrency {c}", f"p50 (µs), concurrency {c}"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))

    def at(points, c, key):
        for p in points or []:
            if p.get("concurrency") == c:
                return p.get(key)
        return None

    for key, name in PAIRINGS:
        cells = [name]
        for c in concurrencies:
            cells += [number(at(median.get(key), c, "calls_per_s")),
                      number(at(median.get(key), c, "p50_us"))]
        print("| " + " | ".join(cells) + " |")
    for name, rate, p50 in (
            ("ratio: mqrpc server, Python clients", "server_calls_per_s", "server_p50"),
            ("ratio: mqrpc end to end", "end_to_end_calls_per_s", "end_to_end_p50")):
        cells = [name]
        for c in concurrencies:
            ratios = next((r for r in oslo.get("ratios") or []
                           if r.get("concurrency") == c), {})
            cells += [f"{ratios[rate]:.2f}" if ratios.get(rate) else "",
                      f"{ratios[p50]:.2f}" if ratios.get(p50) else ""]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
