#!/usr/bin/env bash
# Durable debits over HTTP, one tally node on sled against 1, 2 and 3 tally nodes sharing
# one Redis Cluster (scripts/redis-cluster.sh: 3 masters + 3 replicas on loopback,
# appendonly yes, appendfsync always), in one run, same wrk script, same agents.
#   benches/wrk/nodes.sh
#   DURATION=20s CONNECTIONS=64 AGENTS=256 WAIT_REPLICAS=1 benches/wrk/nodes.sh
#   TALLY_BIN=/path/to/other/tally benches/wrk/nodes.sh    # an A/B against another build
# With N nodes, N wrk processes run at once, one per node with CONNECTIONS/N connections
# each (wrk has one target): req/s is their sum, p99 the largest of their p99s (an upper
# bound of the p99 of all requests). After each run the agents' balances must show exactly
# the debits the 201s acknowledged. Everything runs on this machine: the cluster, the
# nodes and wrk share its cores, so more nodes add contention here, not capacity.
# Needs wrk and redis-server (apt-get install -y wrk redis-server).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
# shellcheck source=lib.sh
source "$ROOT/benches/wrk/lib.sh"
[[ -n ${PREBUILT:-}${TALLY_BIN:-} ]] || cargo build --quiet --release -p tally-server --bin tally \
  --manifest-path "$ROOT/Cargo.toml"
BIN="${TALLY_BIN:-$ROOT/target/release/tally}"
WAIT_REPLICAS="${WAIT_REPLICAS:-0}"
export REDIS_CLUSTER_PORT_BASE="${REDIS_CLUSTER_PORT_BASE:-7100}"
export REDIS_CLUSTER_DIR="$WORK/redis-cluster"

CLUSTER="$(bash "$ROOT/scripts/redis-cluster.sh" up 2>"$WORK/cluster.err" | tail -n 1)"
stop_cluster() { bash "$ROOT/scripts/redis-cluster.sh" down >/dev/null 2>&1 || true; cleanup; }
trap stop_cluster EXIT

start_node() { # name config -> appends its base url to BASES
  TALLY_ADMIN_TOKEN_SHA256="$TOKEN_HASH" TALLY_LOG=warn TALLY_CONFIG="$2" "$BIN" serve \
    --listen 127.0.0.1:0 --data-dir "$WORK/$1" > "$WORK/$1.out" 2> "$WORK/$1.err" &
  PIDS+=($!)
  BASES+=("$(wait_listening "$WORK/$1.out" "${PIDS[-1]}")")
}
: > "$WORK/sled.toml"
printf '[storage]\nurl = "redis://%s"\nwait_replicas = %s\n' "$CLUSTER" "$WAIT_REPLICAS" > "$WORK/redis.toml"

# One setup: wrk on every node in BASES at once; prints a summary line and checks the money.
run() { # label
  local before after n=${#BASES[@]} i conns
  before="$(debited_micros "${BASES[0]}")"
  conns=$((CONNECTIONS / n))
  local wrks=()
  for i in "${!BASES[@]}"; do
    KEY_PREFIX="n$n-w$i-" wrk -t1 -c"$conns" -d"$DURATION" --latency \
      -s "$ROOT/benches/wrk/debit.lua" "${BASES[$i]}" > "$WORK/wrk-$i.txt" &
    wrks+=($!)
  done
  wait "${wrks[@]}"
  after="$(debited_micros "${BASES[0]}")"
  local requests=0 errors=0 rps=0 p99=0
  for i in "${!BASES[@]}"; do
    requests=$((requests + $(sed -n 's/^RESULT requests=\([0-9]*\).*/\1/p' "$WORK/wrk-$i.txt")))
    errors=$((errors + $(field "$WORK/wrk-$i.txt" non2xx_or_socket_errors)))
    rps="$(awk -v a="$rps" -v b="$(field "$WORK/wrk-$i.txt" rps)" 'BEGIN { print a + b }')"
    p99="$(awk -v a="$p99" -v b="$(field "$WORK/wrk-$i.txt" p99_ms)" 'BEGIN { print (b > a) ? b : a }')"
  done
  local acked=$((requests - errors))
  printf '  %-28s %8.0f debits/s  p99 %7s ms  (%d acknowledged, %d not 201)\n' \
    "$1" "$rps" "$p99" "$acked" "$errors"
  # wrk counts a request whose answer came after its deadline as an error although the
  # debit may have been made: the balances may show more than the 201s, never less.
  if (( after - before < acked )); then
    echo "  FAILED: the agents were debited $((after - before)) micros, fewer than $acked acknowledged" >&2
    exit 1
  fi
}

echo "durable debits over HTTP (wrk, $CONNECTIONS connections in all, $DURATION per setup, $AGENTS agents, loopback, $(nproc) cores; Redis WAIT replicas: $WAIT_REPLICAS)"
BASES=()
start_node sled "$WORK/sled.toml"
fund_agents "${BASES[0]}"
run "1 node, sled"
kill -TERM "${PIDS[-1]}"; wait "${PIDS[-1]}" || true

for n in 1 2 3; do
  BASES=()
  for i in $(seq 1 "$n"); do start_node "redis-$n-$i" "$WORK/redis.toml"; done
  fund_agents "${BASES[0]}"
  run "$n node(s), Redis Cluster"
  for i in $(seq 1 "$n"); do kill -TERM "${PIDS[-$i]}" 2>/dev/null || true; done
  for i in $(seq 1 "$n"); do wait "${PIDS[-$i]}" 2>/dev/null || true; done
done
