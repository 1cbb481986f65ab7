#!/usr/bin/env bash
# The metering proxy's overhead and forward-auth's decisions per second, one run:
#   1. wrk straight to an upstream (`tally noop-server`),
#   2. wrk through `tally serve`'s proxy to the same upstream (each call: key lookup,
#      route match, durable debit, forward, stream back),
#   3. wrk against /v1/authorize as a gateway asks (durable debit per distinct request id).
#   benches/wrk/proxy.sh          # DURATION, CONNECTIONS, THREADS, AGENTS as in lib.sh
# Needs wrk and curl. Loopback only; stops what it starts.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
AGENTS="${AGENTS:-16}"
# shellcheck source=lib.sh
source "$ROOT/benches/wrk/lib.sh"
[[ -n ${PREBUILT:-} ]] || cargo build --quiet --release -p tally-server --bin tally \
  --manifest-path "$ROOT/Cargo.toml"
BIN="$ROOT/target/release/tally"

"$BIN" noop-server --listen 127.0.0.1:0 > "$WORK/noop.out" 2> "$WORK/noop.err" &
PIDS+=($!)
UPSTREAM="$(wait_listening "$WORK/noop.out" "${PIDS[-1]}")"

cat > "$WORK/tally.toml" <<TOML
[proxy]
listen = "127.0.0.1:0"

[[routes]]
name = "debits"
methods = ["POST", "GET"]
path = "/v1/agents/{id}/debits"
upstream = "$UPSTREAM"
price_micros = 1
TOML
TALLY_ADMIN_TOKEN_SHA256="$TOKEN_HASH" TALLY_LOG=warn "$BIN" serve --config "$WORK/tally.toml" \
  --listen 127.0.0.1:0 --data-dir "$WORK/data" > "$WORK/serve.out" 2> "$WORK/serve.err" &
PIDS+=($!)
BASE="$(wait_listening "$WORK/serve.out" "${PIDS[-1]}")"
PROXY=""
for _ in $(seq 1 100); do
  PROXY="$(sed -n 's/^tally proxy listening on //p' "$WORK/serve.out" | head -n1)"
  [[ -n $PROXY ]] && break; sleep 0.1
done
[[ -n $PROXY ]] || { echo "the proxy did not start" >&2; cat "$WORK/serve.err" >&2; exit 1; }
fund_agents "$BASE"
KEYS=""
for i in $(seq 0 $((AGENTS - 1))); do
  key="$(curl -fsS -X POST "$BASE/v1/agents/bench-$i/keys" -H "Authorization: Bearer $TALLY_TOKEN" \
    -H "Idempotency-Key: bench-key-$i" -H 'Content-Type: application/json' -d '{"name":"bench"}' \
    | sed -n 's/.*"key":"\([^"]*\)".*/\1/p')"
  [[ -n $key ]] || { echo "no key for bench-$i" >&2; exit 1; }
  KEYS="$KEYS${KEYS:+,}$key"
done
export KEYS

run() { # name url mode
  echo "== $1"
  MODE="$3" wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -s "$ROOT/benches/wrk/proxy.lua" "$2" \
    | tee "$WORK/$1.txt"
}
run direct "$UPSTREAM" proxy
run proxied "$PROXY" proxy
run authorize "$BASE" authorize

echo
echo "summary (wrk -t$THREADS -c$CONNECTIONS -d$DURATION, loopback, $(nproc) cores, $AGENTS agents)"
for n in direct proxied authorize; do
  printf '  %-10s: %8s req/s  p50 %s ms  p99 %s ms  (non-2xx or socket errors: %s)\n' "$n" \
    "$(field "$WORK/$n.txt" rps)" "$(field "$WORK/$n.txt" p50_ms)" "$(field "$WORK/$n.txt" p99_ms)" \
    "$(field "$WORK/$n.txt" non2xx_or_socket_errors)"
done
awk -v d="$(field "$WORK/direct.txt" rps)" -v p="$(field "$WORK/proxied.txt" rps)" \
  'BEGIN { printf "  proxied / direct: %.2f\n", p / d }'
# Every proxied and authorized call was charged once: the agents' debits add up.
total="$(debited_micros "$BASE")"
echo "  micros charged over all agents: $total (each proxied or authorized call: 1)"
