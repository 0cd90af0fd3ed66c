#!/usr/bin/env bash
# A 3-node RabbitMQ cluster on loopback for mqrpc's cluster tests, beside (never
# touching) the shared broker rabbit@localhost on 5672.
#
#   bash scripts/cluster-rabbitmq.sh up            # from nothing; fails if a port is taken
#   bash scripts/cluster-rabbitmq.sh down          # kill by PID (node name checked), remove state
#   bash scripts/cluster-rabbitmq.sh nodes         # 127.0.0.1:5701 ... one per line
#   bash scripts/cluster-rabbitmq.sh kill N        # kill -9 node N's beam.smp
#   bash scripts/cluster-rabbitmq.sh start N       # start node N again, wait until clustered
#   bash scripts/cluster-rabbitmq.sh stop N|cont N # SIGSTOP / SIGCONT node N
#   bash scripts/cluster-rabbitmq.sh quorum-leader QUEUE [VHOST]   # node number of the leader
#   bash scripts/cluster-rabbitmq.sh connection-node NAME         # node number of a connection
#   bash scripts/cluster-rabbitmq.sh heal          # restart the app of nodes that see a partition
#   bash scripts/cluster-rabbitmq.sh ctl N ARGS... # rabbitmqctl -n rN@localhost ARGS
#
# Nodes r1..r3@localhost, AMQP 5701-5703, Erlang distribution 25701-25703 (moved by
# MQRPC_RABBITMQ_AMQP_BASE=5700, MQRPC_RABBITMQ_DIST_BASE=25700, MQRPC_RABBITMQ_NODE_PREFIX=r), the
# package's own scripts (not the /usr/sbin wrappers, which su to the rabbitmq user and
# its cookie) run with HOME holding the cluster's own .erlang.cookie, and with the
# cluster's own rabbitmq-env.conf and rabbitmq.conf (no plugins). net_ticktime is 10 s
# so that a frozen node is declared down quickly; pause_minority on partitions.
# State: ${MQRPC_CLUSTER_DIR:-target/clusters}/rabbitmq.
# `up` exits with 3 when it refuses to start (a node already runs, a port is taken):
# it started nothing, so do not run `down` then. A failure after those checks stops
# what it started. Not cleaned up by `down`: the epmd (port 4369) the first node
# starts if none runs stays behind (it may be shared with other Erlang nodes).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BASE=${MQRPC_CLUSTER_DIR:-$ROOT/target/clusters}
DIR=$BASE/rabbitmq
RMQ_BIN=${RABBITMQ_BIN:-/usr/lib/rabbitmq/bin}
NODES=3
TICKTIME=${MQRPC_RABBITMQ_NET_TICKTIME:-10}
# A node name (r2@localhost) or an Erlang pid on it (<r2@localhost.1.2.3>).
# A second cluster beside this one (another checkout's run) needs other ports and
# other node names (epmd knows each name once per host): these move both.
AMQP_BASE=${MQRPC_RABBITMQ_AMQP_BASE:-5700}
DIST_BASE=${MQRPC_RABBITMQ_DIST_BASE:-25700}
PREFIX=${MQRPC_RABBITMQ_NODE_PREFIX:-r}
[[ $PREFIX =~ ^[a-z]+$ ]] || { echo "cluster-rabbitmq: MQRPC_RABBITMQ_NODE_PREFIX: letters only" >&2; exit 1; }
NODE_RE="^<?${PREFIX}([0-9])@"

amqp_port() { echo $((AMQP_BASE + $1)); }
dist_port() { echo $((DIST_BASE + $1)); }
node_name() { echo "$PREFIX$1@localhost"; }
pid_file() { echo "$DIR/r$1/pid"; }

log() { echo "cluster-rabbitmq: $*" >&2; }
die() {
    log "$*"
    exit 1
}

# Exit status of `up` when it refuses to start (a node of this state directory already
# runs, or a port is taken, say by another run's cluster): it started nothing, so the
# caller must not run `down` (which would stop a cluster that is not its own).
REFUSED=3
refuse() {
    log "$*"
    exit $REFUSED
}

# The environment every command of this cluster runs with: never the system cookie,
# never the system's env or config files.
cluster_env() {
    export HOME=$DIR/home
    export RABBITMQ_CONF_ENV_FILE=$DIR/rabbitmq-env.conf
    export ERL_EPMD_ADDRESS=127.0.0.1
    # The CLI's own distribution must tick as often as the nodes, or a slow command
    # would be cut off by a node with a low net_ticktime.
    export RABBITMQ_CTL_ERL_ARGS="-kernel net_ticktime $TICKTIME"
    # No conf.d from /etc (rabbitmq.conf.d): an empty directory of the cluster's own.
    export RABBITMQ_CONFIG_FILES=$DIR/conf.d
    unset RABBITMQ_NODENAME RABBITMQ_CONFIG_FILE RABBITMQ_MNESIA_BASE RABBITMQ_LOG_BASE
    # Flags from the caller's environment would reach every node and CLI command.
    unset ERL_FLAGS ERL_AFLAGS ERL_ZFLAGS
}

ctl() {
    local n=$1
    shift
    (cluster_env && "$RMQ_BIN/rabbitmqctl" -n "$(node_name "$n")" "$@")
}

port_taken() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

write_files() {
    mkdir -p "$DIR/home" "$DIR/conf.d"
    if [ ! -f "$DIR/home/.erlang.cookie" ]; then
        head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' | tr a-f A-F >"$DIR/home/.erlang.cookie"
        chmod 400 "$DIR/home/.erlang.cookie"
    fi
    # Read by rabbitmq-env (sourced) and by the node itself: nothing from /etc.
    cat >"$DIR/rabbitmq-env.conf" <<EOF
# mqrpc test cluster: settings are per node, in the environment the script sets.
EOF
    local n
    for n in $(seq 1 $NODES); do
        mkdir -p "$DIR/r$n/log" "$DIR/r$n/data"
        echo '[].' >"$DIR/r$n/enabled_plugins"
        echo '[].' >"$DIR/r$n/advanced.config"
        cat >"$DIR/r$n/rabbitmq.conf" <<EOF
listeners.tcp.local = 127.0.0.1:$(amqp_port "$n")
cluster_partition_handling = pause_minority
net_ticktime = $TICKTIME
log.console = false
log.file.level = info
EOF
    done
}

start_node() {
    local n=$1
    local name
    name=$(node_name "$n")
    rm -f "$(pid_file "$n")"
    (
        cluster_env
        export RABBITMQ_NODENAME=$name
        export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
        export RABBITMQ_NODE_PORT=$(amqp_port "$n")
        export RABBITMQ_DIST_PORT=$(dist_port "$n")
        export RABBITMQ_CONFIG_FILE=$DIR/r$n/rabbitmq.conf
        export RABBITMQ_ADVANCED_CONFIG_FILE=$DIR/r$n/advanced.config
        export RABBITMQ_ENABLED_PLUGINS_FILE=$DIR/r$n/enabled_plugins
        export RABBITMQ_MNESIA_BASE=$DIR/r$n/data
        export RABBITMQ_MNESIA_DIR=$DIR/r$n/data/$name
        export RABBITMQ_LOG_BASE=$DIR/r$n/log
        export RABBITMQ_PID_FILE=$(pid_file "$n")
        export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
        cd "$DIR/r$n"
        "$RMQ_BIN/rabbitmq-server" -detached >"$DIR/r$n/log/detached.out" 2>&1
    ) || die "node r$n failed to start (see $DIR/r$n/log)"
}

# Waits for the pid file, the distribution and the app (await_startup fails at once
# while the node is not registered in epmd; wait PIDFILE does not).
wait_node() {
    local n=$1
    ctl "$n" wait --timeout 90 "$(pid_file "$n")" >/dev/null 2>&1 ||
        die "node r$n did not start (log: $DIR/r$n/log)"
}

# The beam.smp of node N, only if the pid file names a live process of that node.
node_pid() {
    local n=$1 file pid
    file=$(pid_file "$n")
    [ -f "$file" ] || return 1
    pid=$(tr -d ' \n' <"$file")
    [ -n "$pid" ] && [ -r "/proc/$pid/environ" ] || return 1
    tr '\0' '\n' <"/proc/$pid/environ" | grep -qx "RABBITMQ_NODENAME=$(node_name "$n")" || return 1
    echo "$pid"
}

# Node N's pid when it runs and is not stopped (SIGSTOP): a CLI command to a frozen
# node would hang.
node_live() {
    local pid state
    pid=$(node_pid "$1") || return 1
    state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
    [ "$state" != T ] || return 1
    echo "$pid"
}

running_nodes() {
    ctl "$1" eval 'lists:sort(rabbit_nodes:all_running()).' 2>/dev/null | tr -d "[]\n '" || true
}

# Until node N sees every node that has a live process as running with it.
wait_clustered() {
    local n=$1 want="" m deadline=$((SECONDS + 60))
    for m in $(seq 1 $NODES); do
        if node_pid "$m" >/dev/null; then
            want="$want${want:+,}$(node_name "$m")"
        fi
    done
    while [ $SECONDS -lt $deadline ]; do
        [ "$(running_nodes "$n")" = "$want" ] && return 0
        sleep 0.5
    done
    die "node r$n is not clustered with $want (sees $(running_nodes "$n"))"
}

check_n() {
    [[ ${1:-} =~ ^[1-3]$ ]] || die "node number 1 to $NODES expected, got '${1:-}'"
}

cmd_up() {
    local n started=$SECONDS
    for n in $(seq 1 $NODES); do
        if node_pid "$n" >/dev/null; then
            refuse "node $(node_name "$n") already runs (pid $(node_pid "$n")); run down first"
        fi
        for port in "$(amqp_port "$n")" "$(dist_port "$n")"; do
            port_taken "$port" && refuse "port $port is taken"
        done
    done
    rm -rf "$DIR"
    # From here on a failure stops the nodes started so far (their logs stay for
    # reading until the next up or down).
    trap 'log "up failed; stopping the nodes it started"; stop_nodes' EXIT
    write_files
    for n in $(seq 1 $NODES); do start_node "$n"; done
    for n in $(seq 1 $NODES); do wait_node "$n"; done
    for n in $(seq 2 $NODES); do
        {
            ctl "$n" stop_app
            ctl "$n" join_cluster "$(node_name 1)"
            ctl "$n" start_app
        } >>"$DIR/r$n/log/ctl.out" 2>&1 || die "r$n could not join r1 (see $DIR/r$n/log/ctl.out)"
    done
    wait_clustered 1
    trap - EXIT
    log "up in $((SECONDS - started)) s: $(cmd_nodes | tr '\n' ' ')"
}

cmd_down() {
    stop_nodes
    rm -rf "$DIR"
}

# Kills every node of this state directory (by the PID its pid file names, checked).
stop_nodes() {
    local n pid pids=()
    for n in $(seq 1 $NODES); do
        if pid=$(node_pid "$n"); then
            kill -CONT "$pid" 2>/dev/null || true
            kill -9 "$pid" 2>/dev/null || true
            pids+=("$pid")
        fi
        rm -f "$(pid_file "$n")"
    done
    for pid in "${pids[@]}"; do
        while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    done
}

cmd_nodes() {
    local n
    for n in $(seq 1 $NODES); do echo "127.0.0.1:$(amqp_port "$n")"; done
}

cmd_kill() {
    check_n "${1:-}"
    local pid
    pid=$(node_pid "$1") || die "node r$1 is not running"
    kill -CONT "$pid" 2>/dev/null || true
    kill -9 "$pid"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
    rm -f "$(pid_file "$1")"
}

cmd_start() {
    check_n "${1:-}"
    node_pid "$1" >/dev/null && die "node r$1 already runs"
    start_node "$1"
    wait_node "$1"
    wait_clustered "$1"
}

cmd_signal() {
    check_n "${2:-}"
    local pid
    pid=$(node_pid "$2") || die "node r$2 is not running"
    kill "-$1" "$pid"
}

cmd_quorum_leader() {
    local queue=${1:?queue name} vhost=${2:-/} n out
    for n in $(seq 1 $NODES); do
        node_live "$n" >/dev/null || continue
        out=$(ctl "$n" list_queues -p "$vhost" --quiet --no-table-headers name leader 2>/dev/null) || continue
        out=$(awk -v q="$queue" -F'\t' '$1 == q { print $2 }' <<<"$out")
        if [[ $out =~ $NODE_RE ]]; then
            echo "${BASH_REMATCH[1]}"
            return 0
        fi
    done
    die "no leader found for quorum queue $queue"
}

# The node number a client connection (by its connection name) is on.
cmd_connection_node() {
    local name=${1:?connection name} n out
    for n in $(seq 1 $NODES); do
        node_live "$n" >/dev/null || continue
        # The name a client gives its connection is in its client properties.
        out=$(ctl "$n" list_connections --quiet --no-table-headers pid client_properties 2>/dev/null) || continue
        out=$(grep -F "\"$name\"" <<<"$out" | grep -o "^<$PREFIX[0-9]@" | head -1) || true
        if [[ $out =~ $NODE_RE ]]; then
            echo "${BASH_REMATCH[1]}"
            return 0
        fi
    done
    die "no connection named $name"
}

# pause_minority usually heals by itself; a node that still lists partitions gets its
# app restarted.
cmd_heal() {
    local n parts
    for n in $(seq 1 $NODES); do
        node_live "$n" >/dev/null || continue
        parts=$(ctl "$n" eval 'rabbit_node_monitor:partitions().' 2>/dev/null | tr -d '\n ')
        if [ -n "$parts" ] && [ "$parts" != "[]" ]; then
            log "r$n sees a partition $parts; restarting its app"
            ctl "$n" stop_app >/dev/null
            ctl "$n" start_app >/dev/null
        fi
    done
    for n in $(seq 1 $NODES); do
        if node_pid "$n" >/dev/null; then
            wait_clustered "$n"
            break
        fi
    done
}

case ${1:-} in
up) cmd_up ;;
down) cmd_down ;;
nodes) cmd_nodes ;;
kill) cmd_kill "${2:-}" ;;
start) cmd_start "${2:-}" ;;
stop) cmd_signal STOP "${2:-}" ;;
cont) cmd_signal CONT "${2:-}" ;;
quorum-leader) cmd_quorum_leader "${2:-}" "${3:-/}" ;;
connection-node) cmd_connection_node "${2:-}" ;;
heal) cmd_heal ;;
ctl)
    check_n "${2:-}"
    n=$2
    shift 2
    ctl "$n" "$@"
    ;;
*) die "usage: $0 up|down|nodes|kill N|start N|stop N|cont N|quorum-leader QUEUE [VHOST]|connection-node NAME|heal|ctl N ARGS" ;;
esac
