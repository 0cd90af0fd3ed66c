#!/usr/bin/env python3
"""Where a sequential NATS round trip spends its time, from a packet capture.

Capture loopback traffic to nats-server while `mqrpc bench --raw --concurrency 1`
runs, then read the capture:

    tcpdump -i lo -w /tmp/nats.pcap 'tcp port 4222' &
    target/release/mqrpc bench --url nats://127.0.0.1:4222 --raw --concurrency 1 \
        --payloads 100 --servers 1
    kill %1; python3 scripts/nats-hops.py /tmp/nats.pcap

For every call made one at a time it finds the four protocol lines of one round trip
(client PUB, MSG to the server, server PUB of the reply, MSG to the client, then the
client's next PUB) and prints the median of each gap, for mqrpc and for the bare
async-nats client (subjects starting `raw-bench`):

    broker in   client PUB -> MSG delivered to the server  (nats-server)
    server      MSG received -> reply PUB                   (the serving process)
    broker out  reply PUB -> MSG delivered to the client    (nats-server)
    client      reply MSG -> next request PUB               (the calling process)
"""
import statistics
import struct
import sys


def protocol_lines(path):
    """(time, source port, verb, subject) of each PUB/MSG line in a pcap file."""
    data = open(path, "rb").read()
    (link,) = struct.unpack("<I", data[20:24])
    header = {1: 14, 113: 16, 0: 4}.get(link, 14)
    offset = 24
    while offset + 16 <= len(data):
        seconds, micros, length, _ = struct.unpack("<IIII", data[offset:offset + 16])
        offset += 16
        packet = data[offset + header:offset + length]
        offset += length
        ip_len = (packet[0] & 15) * 4
        (source,) = struct.unpack(">H", packet[ip_len:ip_len + 2])
        tcp_len = (packet[ip_len + 12] >> 4) * 4
        for line in packet[ip_len + tcp_len:].split(b"\r\n"):
            verb = line[:4]
            if verb in (b"PUB ", b"MSG "):
                subject = line[4:].split(b" ", 1)[0].decode("latin1")
                yield seconds + micros / 1e6, source, verb.strip().decode(), subject


def main(path):
    lines = list(protocol_lines(path))
    gaps = {"mqrpc": [], "raw": []}
    for a, b, c, d, e in zip(lines, lines[1:], lines[2:], lines[3:], lines[4:]):
        verbs = (a[2], b[2], c[2], d[2], e[2])
        if verbs != ("PUB", "MSG", "PUB", "MSG", "PUB"):
            continue
        # One caller at a time: the next request comes from the same connection, the
        # reply from another one, and the server got the request's subject.
        if a[1] != e[1] or a[1] == c[1] or a[3] != b[3] or c[3] != d[3]:
            continue
        kind = "raw" if a[3].startswith("raw-bench") else "mqrpc"
        gaps[kind].append((b[0] - a[0], c[0] - b[0], d[0] - c[0], e[0] - d[0]))
    print("| | round trips | broker in | server | broker out | client | total |")
    print("|---|---|---|---|---|---|---|")
    for kind, rows in gaps.items():
        if not rows:
            continue
        medians = [statistics.median(col) * 1e6 for col in zip(*rows)]
        total = statistics.median(sum(row) for row in rows) * 1e6
        cells = " | ".join(f"{m:.0f} µs" for m in medians)
        print(f"| {kind} | {len(rows)} | {cells} | {total:.0f} µs |")


if __name__ == "__main__":
    main(sys.argv[1])
