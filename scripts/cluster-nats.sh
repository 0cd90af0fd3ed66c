#!/usr/bin/env bash
# A 3-node NATS cluster with JetStream on loopback, for the cluster tests
# (tests/conformance/clusters/nats.rs). Never touches the shared NATS on 4222.
#
#   node N (1..3): client 127.0.0.1:1422N+1, routes 1622N+1, monitor 1822N+1
#   (n1 = 14222/16222/18222, n2 = 14223/..., n3 = 14224/...), server names
#   n1..n3, cluster name mqrpc-test, JetStream store under the state dir.
#
# Sub-commands:
#   up              start all three from nothing, wait until ready (every node has
#                   2 routes, /healthz ok, a JetStream meta leader); fails if a
#                   port is taken
#   down            kill every node by PID, remove the state dir
#   nodes           one host:port client address per line, node 1 first
#   kill N          kill -9 node N (its pid file is removed)
#   start N         start node N again (same store), wait until it rejoined
#   stop N / cont N SIGSTOP / SIGCONT node N
#   stream-leader NAME   the server name (n1..n3) leading stream NAME, or nothing
#   node-of NAME    the node number (1..3) of a server name
#
# State (pids, JetStream stores, logs): ${MQRPC_CLUSTER_DIR:-target/clusters}/nats
set -euo pipefail

export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
HOST=127.0.0.1
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BASE="${MQRPC_CLUSTER_DIR:-$ROOT/target/clusters}"
DIR="$BASE/nats"
CLUSTER_NAME=mqrpc-test
NODES=(1 2 3)
READY_WAIT="${MQRPC_CLUSTER_READY_WAIT:-30}"

die() { printf 'cluster-nats.sh: error: %s\n' "$*" >&2; exit 1; }
client_port() { echo $((14221 + $1)); }
route_port() { echo $((16221 + $1)); }
monitor_port() { echo $((18221 + $1)); }
pidfile() { echo "$DIR/n$1.pid"; }

port_up() { timeout 1 bash -c "exec 3<>/dev/tcp/$HOST/$1" >/dev/null 2>&1; }

check_node() {
    case "${1:-}" in 1 | 2 | 3) ;; *) die "node must be 1, 2 or 3 (got '${1:-}')" ;; esac
}

# alive PID: the process runs (a zombie waiting for its parent to reap it does not).
alive() {
    local state
    state="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" || return 1
    [ -n "$state" ] && [ "$state" != Z ]
}

# ours N PID: PID is node N's nats-server (its command line names nats-server and
# the node's own store dir), not a process that reused the PID of a stale pid file
# (the shared nats-server, say).
ours() {
    local cmdline
    cmdline="$(tr '\0' ' ' <"/proc/$2/cmdline" 2>/dev/null)" || return 1
    case "$cmdline" in
    *nats-server*"$DIR/store/n$1 "*) return 0 ;;
    *) return 1 ;;
    esac
}

# pid_of N: the PID of node N, if it runs.
pid_of() {
    local f
    f="$(pidfile "$1")"
    [ -f "$f" ] || return 1
    local pid
    pid="$(cat "$f")"
    case "$pid" in '' | *[!0-9]*) return 1 ;; esac
    alive "$pid" || return 1
    ours "$1" "$pid" || return 1
    echo "$pid"
}

# The tools this script runs.
need_tools() {
    local tool
    for tool in nats-server python3 curl; do
        command -v "$tool" >/dev/null 2>&1 || die "$tool not found on PATH"
    done
}

# monitor N PATH: the JSON the monitor endpoint PATH of node N answers.
monitor() {
    curl -fsS --max-time 1 "http://$HOST:$(monitor_port "$1")$2" 2>/dev/null
}

launch() {
    local n="$1" routes=() m
    for m in "${NODES[@]}"; do
        [ "$m" = "$n" ] || routes+=("nats://$HOST:$(route_port "$m")")
    done
    mkdir -p "$DIR/store/n$n"
    local joined
    joined="$(IFS=,; echo "${routes[*]}")"
    nats-server -a "$HOST" -p "$(client_port "$n")" -m "$(monitor_port "$n")" \
        -n "n$n" --cluster_name "$CLUSTER_NAME" \
        --cluster "nats://$HOST:$(route_port "$n")" --routes "$joined" \
        -js -sd "$DIR/store/n$n" \
        -P "$(pidfile "$n")" -l "$DIR/n$n.log" </dev/null >>"$DIR/n$n.out" 2>&1 &
    # The pid file is written by the server itself; keep ours until then.
    echo $! >"$(pidfile "$n")"
    disown
}

# node_ready N [HEALTHZ]: node N has its 2 routes, is healthy (/healthz, or the
# HEALTHZ path given) and sees a meta leader.
node_ready() {
    local n="$1" routez jsz
    routez="$(monitor "$n" /routez)" || return 1
    python3 -c 'import json,sys; sys.exit(0 if json.loads(sys.argv[1])["num_routes"] >= 2 else 1)' \
        "$routez" || return 1
    monitor "$n" "${2:-/healthz}" >/dev/null || return 1
    jsz="$(monitor "$n" /jsz)" || return 1
    python3 -c 'import json,sys
d = json.loads(sys.argv[1])
sys.exit(0 if (d.get("meta_cluster") or {}).get("leader") else 1)' "$jsz"
}

wait_ready() {
    local deadline=$((SECONDS + READY_WAIT)) n
    for n in "$@"; do
        until node_ready "$n"; do
            [ "$SECONDS" -lt "$deadline" ] || die "node $n not ready after ${READY_WAIT}s (log: $DIR/n$n.log)"
            sleep 0.1
        done
    done
}

cmd_up() {
    local n
    for n in "${NODES[@]}"; do
        if pid_of "$n" >/dev/null; then
            die "node $n already runs (pid $(pid_of "$n")); run 'down' first"
        fi
        for port in "$(client_port "$n")" "$(route_port "$n")" "$(monitor_port "$n")"; do
            port_up "$port" && die "port $port is taken"
        done
    done
    rm -rf "$DIR"
    mkdir -p "$DIR"
    # A node that does not come up: take the others down again (logs kept).
    trap 'up_failed' EXIT
    for n in "${NODES[@]}"; do launch "$n"; done
    wait_ready "${NODES[@]}"
    trap - EXIT
    echo "nats cluster up: $(cmd_nodes | paste -sd, -)" >&2
}

# The EXIT trap of a failed `up`: kill the nodes started, keep the logs.
up_failed() {
    local rc=$? n pid
    [ "$rc" -ne 0 ] || return 0
    for n in "${NODES[@]}"; do
        if pid="$(pid_of "$n")"; then kill -9 "$pid" 2>/dev/null || true; fi
        rm -f "$(pidfile "$n")"
    done
    echo "cluster-nats.sh: up failed; nodes stopped, logs in $DIR" >&2
    exit "$rc"
}

cmd_down() {
    local n pid
    for n in "${NODES[@]}"; do
        if pid="$(pid_of "$n")"; then
            kill -9 "$pid" 2>/dev/null || true
        fi
    done
    for n in "${NODES[@]}"; do
        while pid="$(pid_of "$n")"; do sleep 0.05; done
    done
    rm -rf "$DIR"
}

cmd_nodes() {
    local n
    for n in "${NODES[@]}"; do echo "$HOST:$(client_port "$n")"; done
}

cmd_kill() {
    check_node "$1"
    local pid
    if pid="$(pid_of "$1")"; then
        kill -9 "$pid"
        while alive "$pid"; do sleep 0.02; done
    fi
    rm -f "$(pidfile "$1")"
}

cmd_start() {
    check_node "$1"
    pid_of "$1" >/dev/null && die "node $1 already runs"
    launch "$1"
    # Rejoined: routes, JetStream up, a meta leader. The full /healthz also wants
    # every stream and consumer replica current, and a replica of an idle consumer
    # (nats-server 2.9) stays behind until the consumer is used again: waited for a
    # while, not required.
    local deadline=$((SECONDS + READY_WAIT))
    until node_ready "$1" "/healthz?js-server-only=true"; do
        [ "$SECONDS" -lt "$deadline" ] || die "node $1 not ready after ${READY_WAIT}s (log: $DIR/n$1.log)"
        sleep 0.1
    done
    deadline=$((SECONDS + 10))
    until monitor "$1" /healthz >/dev/null; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "cluster-nats.sh: node $1 rejoined; some replicas not current yet: $(curl -sS --max-time 1 "http://$HOST:$(monitor_port "$1")/healthz" 2>&1 | head -c 300)" >&2
            break
        fi
        sleep 0.2
    done
}

cmd_signal() {
    check_node "$2"
    local pid
    pid="$(pid_of "$2")" || die "node $2 does not run"
    kill "-$1" "$pid"
}

cmd_stream_leader() {
    local name="$1" n jsz
    for n in "${NODES[@]}"; do
        pid_of "$n" >/dev/null || continue
        jsz="$(monitor "$n" "/jsz?streams=true")" || continue
        python3 -c 'import json,sys
d = json.loads(sys.argv[1]); name = sys.argv[2]
for acc in d.get("account_details") or []:
    for s in acc.get("stream_detail") or []:
        if s.get("name") == name:
            leader = (s.get("cluster") or {}).get("leader")
            if leader:
                print(leader); sys.exit(0)
sys.exit(1)' "$jsz" "$name" && return 0
    done
    return 0
}

case "${1:-}" in
up | start | stream-leader) need_tools ;;
esac

case "${1:-}" in
up) cmd_up ;;
down) cmd_down ;;
nodes) cmd_nodes ;;
kill) cmd_kill "${2:-}" ;;
start) cmd_start "${2:-}" ;;
stop) cmd_signal STOP "${2:-}" ;;
cont) cmd_signal CONT "${2:-}" ;;
stream-leader) [ -n "${2:-}" ] || die "stream-leader NAME"; cmd_stream_leader "$2" ;;
node-of) case "${2:-}" in n[123]) echo "${2#n}" ;; *) die "node-of n1|n2|n3" ;; esac ;;
*) die "usage: $0 up|down|nodes|kill N|start N|stop N|cont N|stream-leader NAME|node-of NAME" ;;
esac
