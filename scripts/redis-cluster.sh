#!/usr/bin/env bash
# Starts or stops a local Redis Cluster for tally's shared storage backend and its tests
# (crates/tally-store/tests/redis_storage.rs): 6 redis-server processes on 127.0.0.1 only,
# 3 masters with one replica each, every write fsynced (appendonly, appendfsync always);
# it returns once every node reports cluster_state:ok and every replica has synced.
#
#   scripts/redis-cluster.sh up     # (re)starts it; the last stdout line is the node list
#   scripts/redis-cluster.sh down   # stops it and removes its directory
#   scripts/redis-cluster.sh start-node PORT   # starts again one node that was killed (the
#                                   # failover test): it rejoins, as a replica if it was
#                                   # failed over; returns once the cluster is whole again
#
#   TALLY_REDIS_CLUSTER=$(scripts/redis-cluster.sh up | tail -n1) cargo test -p tally-store --test redis_storage
#
# Environment:
#   REDIS_CLUSTER_PORT_BASE         first port (default 7000; uses it and the next 5)
#   REDIS_CLUSTER_DIR               where data, logs and pidfiles go (default /tmp/tally-redis-cluster)
#   REDIS_CLUSTER_NODE_TIMEOUT_MS   cluster-node-timeout (default 1000: quick failovers)
set -euo pipefail

PORT_BASE="${REDIS_CLUSTER_PORT_BASE:-7000}"
DIR="${REDIS_CLUSTER_DIR:-/tmp/tally-redis-cluster}"
NODE_TIMEOUT_MS="${REDIS_CLUSTER_NODE_TIMEOUT_MS:-1000}"
NODES=6
READY_WAIT_S=30
STOP_WAIT_S=10

ports() {
    local i
    for ((i = 0; i < NODES; i++)); do echo $((PORT_BASE + i)); done
}

need_redis() {
    if command -v redis-server >/dev/null && command -v redis-cli >/dev/null; then
        return
    fi
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        apt-get install -y redis-server >&2
    else
        echo "redis-server and redis-cli are needed (Debian: apt-get install redis-server)" >&2
        exit 1
    fi
}

down() {
    [[ -d "$DIR" ]] || return 0
    local port pidfile pid waited
    local pids=()
    for port in $(ports); do
        pidfile="$DIR/$port/redis.pid"
        if [[ -f "$pidfile" ]]; then
            pid=$(cat "$pidfile")
            if kill -0 "$pid" 2>/dev/null; then
                kill -TERM "$pid" 2>/dev/null || true
                pids+=("$pid")
            fi
        fi
    done
    for pid in "${pids[@]}"; do
        waited=0
        while kill -0 "$pid" 2>/dev/null && ((waited < STOP_WAIT_S * 10)); do
            sleep 0.1
            waited=$((waited + 1))
        done
        if kill -0 "$pid" 2>/dev/null; then
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    rm -rf "$DIR"
}

start_node() { # port: one node, on its directory (a new one, or one that ran before)
    local port=$1
    mkdir -p "$DIR/$port"
    redis-server \
        --port "$port" \
        --bind 127.0.0.1 \
        --protected-mode yes \
        --cluster-enabled yes \
        --cluster-config-file "$DIR/$port/nodes.conf" \
        --cluster-node-timeout "$NODE_TIMEOUT_MS" \
        --appendonly yes \
        --appendfsync always \
        --dir "$DIR/$port" \
        --daemonize yes \
        --pidfile "$DIR/$port/redis.pid" \
        --logfile "$DIR/$port/redis.log"
}

wait_ping() { # port deadline
    until redis-cli -p "$1" ping >/dev/null 2>&1; do
        if ((SECONDS >= $2)); then
            echo "redis on port $1 did not start; see $DIR/$1/redis.log" >&2
            exit 1
        fi
        sleep 0.1
    done
}

wait_whole() { # every node: cluster_state:ok, and every replica synced with its master
    local port deadline=$((SECONDS + READY_WAIT_S))
    for port in $(ports); do
        until redis-cli -p "$port" cluster info 2>/dev/null | grep -q '^cluster_state:ok'; do
            if ((SECONDS >= deadline)); then
                echo "the cluster did not reach cluster_state:ok within ${READY_WAIT_S} s" >&2
                exit 1
            fi
            sleep 0.2
        done
    done
    # Replicas must have synced, or a WAIT for them (wait_replicas) fails at first.
    for port in $(ports); do
        if redis-cli -p "$port" info replication | grep -q '^role:slave'; then
            until redis-cli -p "$port" info replication | grep -q '^master_link_status:up'; do
                if ((SECONDS >= deadline)); then
                    echo "the replica on port $port did not sync within ${READY_WAIT_S} s" >&2
                    exit 1
                fi
                sleep 0.2
            done
        fi
    done
}

up() {
    need_redis
    down
    mkdir -p "$DIR"
    local port addrs=()
    for port in $(ports); do
        start_node "$port"
        addrs+=("127.0.0.1:$port")
    done
    # Wait until every node answers before creating the cluster.
    local deadline=$((SECONDS + READY_WAIT_S))
    for port in $(ports); do
        wait_ping "$port" "$deadline"
    done
    redis-cli --cluster create "${addrs[@]}" --cluster-replicas 1 --cluster-yes >&2
    wait_whole
    (
        IFS=,
        echo "${addrs[*]}"
    )
}

case "${1:-}" in
up) up ;;
down) down ;;
start-node)
    [[ -n "${2:-}" && -d "$DIR/$2" ]] || { echo "usage: $0 start-node PORT (a node of the cluster in $DIR)" >&2; exit 2; }
    start_node "$2"
    wait_ping "$2" $((SECONDS + READY_WAIT_S))
    wait_whole
    ;;
*)
    echo "usage: $0 up|down|start-node PORT" >&2
    exit 2
    ;;
esac
