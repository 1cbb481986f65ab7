#!/usr/bin/env bash
# Durable debits over HTTP vs a no-op axum handler, same binary set-up, same wrk script.
#   benches/wrk/run.sh                     # defaults below
#   DURATION=20s CONNECTIONS=128 THREADS=2 AGENTS=256 benches/wrk/run.sh
# Prints both req/s, their ratio and p99. Needs wrk (apt-get install -y wrk).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
# shellcheck source=lib.sh
source "$ROOT/benches/wrk/lib.sh"
# PREBUILT=1: use the release binary already in target/ (build it first).
[[ -n ${PREBUILT:-} ]] || cargo build --quiet --release -p tally-server --bin tally \
  --manifest-path "$ROOT/Cargo.toml"
BIN="$ROOT/target/release/tally"

# 1. tally serve, durable debits.
start_tally "$WORK/data" serve
fund_agents "$BASE"
echo "== tally serve: POST /v1/agents/{id}/debits (durable, distinct keys, $AGENTS agents)"
wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -s "$ROOT/benches/wrk/debit.lua" "$BASE" | tee "$WORK/debits.txt"
kill -TERM "${PIDS[-1]}"; wait "${PIDS[-1]}" || true

# 2. the no-op handler, same runtime and listener set-up.
"$BIN" noop-server --listen 127.0.0.1:0 > "$WORK/noop.out" 2> "$WORK/noop.err" &
PIDS+=($!)
NOOP="$(wait_listening "$WORK/noop.out" "${PIDS[-1]}")"
echo "== tally noop-server: POST /v1/agents/{id}/debits (no-op handler)"
wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -s "$ROOT/benches/wrk/debit.lua" "$NOOP" | tee "$WORK/noop.txt"

D_RPS="$(field "$WORK/debits.txt" rps)"; N_RPS="$(field "$WORK/noop.txt" rps)"
D_P99="$(field "$WORK/debits.txt" p99_ms)"; N_P99="$(field "$WORK/noop.txt" p99_ms)"
D_ERR="$(field "$WORK/debits.txt" non2xx_or_socket_errors)"
echo
echo "summary (wrk -t$THREADS -c$CONNECTIONS -d$DURATION, loopback, $(nproc) cores)"
printf '  durable debits : %8s req/s  p99 %s ms  (non-2xx or socket errors: %s)\n' "$D_RPS" "$D_P99" "$D_ERR"
printf '  no-op handler  : %8s req/s  p99 %s ms\n' "$N_RPS" "$N_P99"
awk -v d="$D_RPS" -v n="$N_RPS" 'BEGIN { printf "  ratio          : %.2f (debits / no-op; target >= 0.5)\n", d / n }'
