#!/usr/bin/env bash
# Durable debits over HTTP vs a no-op axum handler, same binary set-up, same wrk script.
#   benches/wrk/run.sh                     # defaults below
#   DURATION=20s CONNECTIONS=128 THREADS=2 AGENTS=256 benches/wrk/run.sh
# Prints both req/s, their ratio and p99. Needs wrk (apt-get install -y wrk).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
DURATION="${DURATION:-10s}"
CONNECTIONS="${CONNECTIONS:-64}"
THREADS="${THREADS:-2}"
AGENTS="${AGENTS:-64}"
export AGENTS

command -v wrk >/dev/null || { echo "wrk not found: apt-get install -y wrk" >&2; exit 1; }
cargo build --quiet --release -p tally-server --bin tally --manifest-path "$ROOT/Cargo.toml"
BIN="$ROOT/target/release/tally"

WORK="$(mktemp -d)"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

TALLY_TOKEN="$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export TALLY_TOKEN
HASH="$(printf '%s' "$TALLY_TOKEN" | sha256sum | cut -d' ' -f1)"

wait_listening() { # file pid -> base url
  for _ in $(seq 1 600); do
    local base
    base="$(sed -n 's/^tally listening on //p' "$1" 2>/dev/null | head -n1)"
    if [[ -n "$base" ]]; then echo "$base"; return 0; fi
    kill -0 "$2" 2>/dev/null || { echo "server exited" >&2; return 1; }
    sleep 0.1
  done
  return 1
}

# 1. tally serve, durable debits.
TALLY_ADMIN_TOKEN_SHA256="$HASH" TALLY_LOG=warn "$BIN" serve \
  --listen 127.0.0.1:0 --data-dir "$WORK/data" > "$WORK/serve.out" 2> "$WORK/serve.err" &
PIDS+=($!)
BASE="$(wait_listening "$WORK/serve.out" "${PIDS[-1]}")"
for i in $(seq 0 $((AGENTS - 1))); do
  curl -fsS -o /dev/null -X POST "$BASE/v1/agents" -H "Authorization: Bearer $TALLY_TOKEN" \
    -H "Idempotency-Key: bench-create-$i" -H 'Content-Type: application/json' -d "{\"id\":\"bench-$i\"}"
  curl -fsS -o /dev/null -X POST "$BASE/v1/agents/bench-$i/credits" -H "Authorization: Bearer $TALLY_TOKEN" \
    -H "Idempotency-Key: bench-credit-$i" -H 'Content-Type: application/json' \
    -d '{"amount_micros":1000000000000}'
done
echo "== tally serve: POST /v1/agents/{id}/debits (durable, distinct keys, $AGENTS agents)"
wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -s "$ROOT/benches/wrk/debit.lua" "$BASE" | tee "$WORK/debits.txt"
kill -TERM "${PIDS[-1]}"; wait "${PIDS[-1]}" || true

# 2. the no-op handler, same runtime and listener set-up.
"$BIN" noop-server --listen 127.0.0.1:0 > "$WORK/noop.out" 2> "$WORK/noop.err" &
PIDS+=($!)
NOOP="$(wait_listening "$WORK/noop.out" "${PIDS[-1]}")"
echo "== tally noop-server: POST /v1/agents/{id}/debits (no-op handler)"
wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -s "$ROOT/benches/wrk/debit.lua" "$NOOP" | tee "$WORK/noop.txt"

field() { sed -n "s/^RESULT.*$2=\([0-9.]*\).*/\1/p" "$1"; }
D_RPS="$(field "$WORK/debits.txt" rps)"; N_RPS="$(field "$WORK/noop.txt" rps)"
D_P99="$(field "$WORK/debits.txt" p99_ms)"; N_P99="$(field "$WORK/noop.txt" p99_ms)"
D_ERR="$(field "$WORK/debits.txt" non2xx_or_socket_errors)"
echo
echo "summary (wrk -t$THREADS -c$CONNECTIONS -d$DURATION, loopback, $(nproc) cores)"
printf '  durable debits : %8s req/s  p99 %s ms  (non-2xx or socket errors: %s)\n' "$D_RPS" "$D_P99" "$D_ERR"
printf '  no-op handler  : %8s req/s  p99 %s ms\n' "$N_RPS" "$N_P99"
awk -v d="$D_RPS" -v n="$N_RPS" 'BEGIN { printf "  ratio          : %.2f (debits / no-op; target >= 0.5)\n", d / n }'
