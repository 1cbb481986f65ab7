#!/usr/bin/env bash
# Durable debits over HTTP in batches (POST /v1/batch, BATCH items a request) vs one debit a
# request, same server set-up, one run:
#   benches/wrk/batch.sh            # BATCH=100; DURATION, CONNECTIONS, THREADS, AGENTS as in lib.sh
# Prints requests/s and debits/s of each, and checks from the balances that every debit
# the batches reported was really made. Needs wrk and curl; loopback only.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
BATCH="${BATCH:-100}"
export BATCH
# shellcheck source=lib.sh
source "$ROOT/benches/wrk/lib.sh"
[[ -n ${PREBUILT:-} ]] || cargo build --quiet --release -p tally-server --bin tally \
  --manifest-path "$ROOT/Cargo.toml"
BIN="$ROOT/target/release/tally"

start_tally "$WORK/data" serve
fund_agents "$BASE"
echo "== POST /v1/agents/{id}/debits, one debit a request"
wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -s "$ROOT/benches/wrk/debit.lua" "$BASE" | tee "$WORK/single.txt"
echo "== POST /v1/batch, $BATCH debits a request"
wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -s "$ROOT/benches/wrk/batch.lua" "$BASE" | tee "$WORK/batch.txt"

total=0
for i in $(seq 0 $((AGENTS - 1))); do
  b="$(curl -fsS "$BASE/v1/agents/bench-$i" -H "Authorization: Bearer $TALLY_TOKEN" \
    | sed -n 's/.*"balance_micros":\([0-9]*\).*/\1/p')"
  total=$((total + 1000000000000 - b))
done
S_REQ="$(field "$WORK/single.txt" requests)"; B_REQ="$(field "$WORK/batch.txt" requests)"
echo
echo "summary (wrk -t$THREADS -c$CONNECTIONS -d$DURATION, loopback, $(nproc) cores, $AGENTS agents)"
printf '  single : %8s req/s = %8s debits/s  p99 %s ms\n' "$(field "$WORK/single.txt" rps)" \
  "$(field "$WORK/single.txt" rps)" "$(field "$WORK/single.txt" p99_ms)"
printf '  batch  : %8s req/s = %8s debits/s  p99 %s ms (%s items a request)\n' "$(field "$WORK/batch.txt" rps)" \
  "$(( $(field "$WORK/batch.txt" rps) * BATCH ))" "$(field "$WORK/batch.txt" p99_ms)" "$BATCH"
echo "  micros debited over all agents: $total (wrk counted $S_REQ single + $B_REQ × $BATCH batched; requests still in flight at the end add a few)"
