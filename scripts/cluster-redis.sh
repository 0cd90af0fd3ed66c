#!/usr/bin/env bash
# A Redis Cluster of 3 masters and 3 replicas on 127.0.0.1:17000-17005 (cluster bus
# 27000-27005) for mqrpc's cluster tests: no persistence, cluster-node-timeout 5 s.
# Never touches the shared Redis (6379): nodes are started, signalled and torn down
# by the PIDs in their own pid files, under ${MQRPC_CLUSTER_DIR:-target/clusters}/redis.
#
#   up            start the six nodes from nothing and create the cluster; returns once
#                 every node says cluster_state:ok and sees the 3 replicas
#   down          kill the nodes by PID and remove the data directory
#   nodes         one client address (host:port) per line, node 1 (17000) first
#   kill N        kill -9 node N (1-6) and remove its pid file
#   start N       start node N again with its nodes.conf (it rejoins, as a replica if
#                 its slots failed over meanwhile) and wait until the others see it
#                 and, as a replica, it has synced (else it could not take over)
#   stop N/cont N SIGSTOP / SIGCONT node N
#   slot-master KEY   host:port of the master that owns KEY's slot now
#   status        CLUSTER NODES as a live node sees it
#   unique-ids KEY    the _unique_id of each message in stream KEY, one per line
#   at KEY COMMAND... run a command on the master of KEY's slot
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BASE="${MQRPC_CLUSTER_DIR:-$ROOT/target/clusters}"
DIR="$BASE/redis"
HOST=127.0.0.1
FIRST_PORT=17000
COUNT=6
CLI=(redis-cli -h "$HOST")

die() { echo "cluster-redis: $*" >&2; exit 1; }
port_of() { echo $((FIRST_PORT + $1 - 1)); }
node_dir() { echo "$DIR/n$1"; }
pid_file() { echo "$(node_dir "$1")/redis.pid"; }

check_index() {
    [[ "${1:-}" =~ ^[1-6]$ ]] || die "node index must be 1 to $COUNT, not '${1:-}'"
}

# The PID of node N if it runs (its pid file names a live redis-server on its port).
live_pid() {
    local file pid
    file="$(pid_file "$1")"
    [[ -f "$file" ]] || return 1
    pid="$(cat "$file")"
    [[ -n "$pid" && -r "/proc/$pid/cmdline" ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "redis-server.*:$(port_of "$1")" || return 1
    echo "$pid"
}

port_taken() {
    (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null
}

ask() { # ask N ARGS...: a command to node N
    local port
    port="$(port_of "$1")"; shift
    timeout 5 "${CLI[@]}" -p "$port" "$@" 2>/dev/null
}

start_node() {
    local n=$1 port dir
    port="$(port_of "$n")"
    dir="$(node_dir "$n")"
    # Another server on the port would answer the PING below in this node's stead.
    port_taken "$port" && die "port $port is taken (another Redis?)"
    port_taken $((port + 10000)) && die "cluster bus port $((port + 10000)) is taken"
    mkdir -p "$dir"
    redis-server --bind "$HOST" --port "$port" \
        --cluster-enabled yes --cluster-config-file "$dir/nodes.conf" \
        --cluster-node-timeout 5000 \
        --save "" --appendonly no --dir "$dir" \
        --repl-diskless-sync-delay 0 \
        --daemonize yes --pidfile "$(pid_file "$n")" --logfile "$dir/redis.log" >/dev/null
    local i
    for i in $(seq 1 100); do
        if [[ "$(ask "$n" PING || true)" == PONG ]]; then
            # The PONG must come from the server just started: its pid file names a
            # live redis-server on this port.
            live_pid "$n" >/dev/null || die "node $n (port $port) answered, but its pid file names no live redis-server; see $dir/redis.log"
            return 0
        fi
        sleep 0.05
    done
    die "node $n (port $port) did not answer PING; see $dir/redis.log"
}

# Whether node N, if a replica, has its copy of the master's data: a replica that
# never synced cannot take over when its master dies.
synced() {
    local replication
    replication="$(ask "$1" INFO replication)" || return 1
    grep -q '^role:master' <<<"$replication" && return 0
    grep -q '^master_link_status:up' <<<"$replication"
}

# Whether node N says cluster_state:ok, lists 3 live replicas and 3 live masters,
# and has synced if it is a replica.
node_ready() {
    local info nodes
    synced "$1" || return 1
    info="$(ask "$1" CLUSTER INFO)" || return 1
    grep -q '^cluster_state:ok' <<<"$info" || return 1
    nodes="$(ask "$1" CLUSTER NODES)" || return 1
    [[ "$(grep -v 'fail' <<<"$nodes" | awk '$3 ~ /slave/' | wc -l)" -eq 3 ]] || return 1
    [[ "$(grep -v 'fail' <<<"$nodes" | awk '$3 ~ /master/' | wc -l)" -eq 3 ]]
}

wait_until() { # wait_until SECONDS WHAT COMMAND...
    local seconds=$1 what=$2; shift 2
    local deadline=$((SECONDS + seconds))
    until "$@"; do
        ((SECONDS < deadline)) || die "timed out after ${seconds}s waiting for $what"
        sleep 0.1
    done
}

all_ready() {
    local n
    for n in $(seq 1 $COUNT); do node_ready "$n" || return 1; done
}

cmd_up() {
    local n running=0
    for n in $(seq 1 $COUNT); do
        if live_pid "$n" >/dev/null; then running=$((running + 1)); fi
    done
    if ((running == COUNT)) && all_ready; then
        echo "cluster-redis: already up" >&2
        return 0
    fi
    ((running == 0)) || die "some nodes of an earlier cluster still run; run 'down' first"
    for n in $(seq 1 $COUNT); do
        local port
        port="$(port_of "$n")"
        port_taken "$port" && die "port $port is taken (another Redis?)"
        port_taken $((port + 10000)) && die "cluster bus port $((port + 10000)) is taken"
    done
    rm -rf "$DIR"
    mkdir -p "$DIR"
    # From here a failure leaves nothing running behind it.
    trap 'echo "cluster-redis: up failed; tearing the nodes down" >&2; cmd_down' EXIT
    for n in $(seq 1 $COUNT); do start_node "$n"; done
    local addresses=()
    for n in $(seq 1 $COUNT); do addresses+=("$HOST:$(port_of "$n")"); done
    redis-cli --cluster create "${addresses[@]}" --cluster-replicas 1 --cluster-yes \
        >"$DIR/create.log" 2>&1 || { cat "$DIR/create.log" >&2; die "cluster create failed"; }
    wait_until 30 "cluster_state:ok and 3 replicas on every node" all_ready
    trap - EXIT
}

cmd_down() {
    local n pid pids=()
    for n in $(seq 1 $COUNT); do
        # A stopped node must be continued to die of SIGTERM.
        if pid="$(live_pid "$n")"; then kill -CONT "$pid" 2>/dev/null || true; kill "$pid" 2>/dev/null || true; pids+=("$pid"); fi
    done
    local i
    for pid in "${pids[@]}"; do
        for i in $(seq 1 50); do [[ -d "/proc/$pid" ]] || break; sleep 0.05; done
        [[ -d "/proc/$pid" ]] && kill -9 "$pid" 2>/dev/null || true
    done
    rm -rf "$DIR"
}

cmd_nodes() {
    local n
    for n in $(seq 1 $COUNT); do echo "$HOST:$(port_of "$n")"; done
}

cmd_kill() {
    check_index "${1:-}"
    local pid
    pid="$(live_pid "$1")" || die "node $1 is not running"
    kill -9 "$pid"
    rm -f "$(pid_file "$1")"
    local i
    for i in $(seq 1 100); do [[ -d "/proc/$pid" ]] || return 0; sleep 0.02; done
}

# Whether every other live node sees node N connected and not failing.
rejoined() {
    local n=$1 m port nodes
    port="$(port_of "$n")"
    synced "$n" || return 1
    [[ "$(ask "$n" CLUSTER INFO | grep -c '^cluster_state:ok')" -eq 1 ]] || return 1
    for m in $(seq 1 $COUNT); do
        [[ $m -eq $n ]] && continue
        live_pid "$m" >/dev/null || continue
        nodes="$(ask "$m" CLUSTER NODES)" || return 1
        grep " $HOST:$port@" <<<"$nodes" | grep -q ' connected' || return 1
        grep " $HOST:$port@" <<<"$nodes" | awk '{print $3}' | grep -q 'fail' && return 1
    done
    return 0
}

cmd_start() {
    check_index "${1:-}"
    live_pid "$1" >/dev/null && die "node $1 is running already"
    [[ -f "$(node_dir "$1")/nodes.conf" ]] || die "node $1 has no nodes.conf: run 'up' first"
    start_node "$1"
    wait_until 30 "node $1 to rejoin" rejoined "$1"
}

cmd_signal() {
    check_index "${2:-}"
    local pid
    pid="$(live_pid "$2")" || die "node $2 is not running"
    kill "-$1" "$pid"
}

# CLUSTER NODES from the first node that answers.
any_nodes() {
    local n
    for n in $(seq 1 $COUNT); do
        live_pid "$n" >/dev/null || continue
        ask "$n" CLUSTER NODES && return 0
    done
    die "no node answers"
}

any_node() {
    local n
    for n in $(seq 1 $COUNT); do
        live_pid "$n" >/dev/null || continue
        [[ "$(ask "$n" PING || true)" == PONG ]] && { echo "$n"; return 0; }
    done
    die "no node answers"
}

cmd_slot_master() {
    [[ -n "${1:-}" ]] || die "usage: slot-master KEY"
    local slot
    slot="$(ask "$(any_node)" CLUSTER KEYSLOT "$1")"
    [[ "$slot" =~ ^[0-9]+$ ]] || die "CLUSTER KEYSLOT answered '$slot'"
    # Fields: id addr@bus flags master ping pong epoch link slot ranges...
    any_nodes | awk -v slot="$slot" '
        $3 ~ /master/ && $3 !~ /fail/ {
            for (i = 9; i <= NF; i++) {
                if ($i ~ /^\[/) continue
                n = split($i, r, "-")
                lo = r[1]; hi = (n == 2 ? r[2] : r[1])
                if (slot + 0 >= lo + 0 && slot + 0 <= hi + 0) { sub(/@.*/, "", $2); print $2; found = 1; exit }
            }
        }
        END { if (!found) exit 1 }' || die "no live master owns slot $slot"
}

# The ids (`_unique_id`) of the messages in stream KEY, one per line, in stream
# order: the same id twice is a message written twice.
cmd_unique_ids() {
    [[ -n "${1:-}" ]] || die "usage: unique-ids KEY"
    local master
    master="$(cmd_slot_master "$1")"
    timeout 60 "${CLI[@]}" -p "${master##*:}" --raw XRANGE "$1" - + \
        | grep -aoE '_unique_id[^0-9a-f]{1,12}[0-9a-f]+' | sed -E 's/.*[^0-9a-f]//' || true
}

# Runs a command on the master of KEY's slot: at KEY COMMAND ARGS...
cmd_at() {
    [[ -n "${1:-}" && -n "${2:-}" ]] || die "usage: at KEY COMMAND [ARGS...]"
    local master
    master="$(cmd_slot_master "$1")"; shift
    timeout 10 "${CLI[@]}" -p "${master##*:}" "$@"
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    nodes) cmd_nodes ;;
    kill) cmd_kill "${2:-}" ;;
    start) cmd_start "${2:-}" ;;
    stop) cmd_signal STOP "${2:-}" ;;
    cont) cmd_signal CONT "${2:-}" ;;
    slot-master) cmd_slot_master "${2:-}" ;;
    status) any_nodes ;;
    unique-ids) cmd_unique_ids "${2:-}" ;;
    at) shift; cmd_at "$@" ;;
    *) die "usage: $0 up|down|nodes|kill N|start N|stop N|cont N|slot-master KEY|status|unique-ids KEY|at KEY COMMAND..." ;;
esac
