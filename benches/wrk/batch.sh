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
# Items in flight = connections × BATCH; past a shard's queue (engine.shard_queue_len_max,
# 4,096) items are refused as overloaded (503 inside a 200 envelope), so fewer connections.
BATCH_CONNECTIONS="${BATCH_CONNECTIONS:-16}"
# shellcheck source=lib.sh
source "$ROOT/benches/wrk/lib.sh"
[[ -n ${PREBUILT:-} ]] || cargo build --quiet --release -p tally-server --bin tally \
  --manifest-path "$ROOT/Cargo.toml"
BIN="$ROOT/target/release/tally"

start_tally "$WORK/data" serve
fund_agents "$BASE"
echo "== POST /v1/agents/{id}/debits, one debit a request"
wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -s "$ROOT/benches/wrk/debit.lua" "$BASE" | tee "$WORK/single.txt"
echo "== POST /v1/batch, $BATCH debits a request, $BATCH_CONNECTIONS connections"
wrk -t"$THREADS" -c"$BATCH_CONNECTIONS" -d"$DURATION" --latency -s "$ROOT/benches/wrk/batch.lua" "$BASE" | tee "$WORK/batch.txt"

total="$(debited_micros "$BASE")"
S_REQ="$(field "$WORK/single.txt" requests)"; B_REQ="$(field "$WORK/batch.txt" requests)"
echo
echo "summary (wrk -t$THREADS -c$CONNECTIONS -d$DURATION, loopback, $(nproc) cores, $AGENTS agents)"
printf '  single : %8s req/s = %8s debits/s  p99 %s ms\n' "$(field "$WORK/single.txt" rps)" \
  "$(field "$WORK/single.txt" rps)" "$(field "$WORK/single.txt" p99_ms)"
B_OK="$(sed -n 's/^ITEMS ok=\([0-9]*\).*/\1/p' "$WORK/batch.txt")"
B_OK_S="$(sed -n 's/^ITEMS.*ok_per_s=\([0-9]*\).*/\1/p' "$WORK/batch.txt")"
printf '  batch  : %8s req/s, %8s debits/s answered 201  p99 %s ms (%s items a request; %s of %s items 201)\n' \
  "$(field "$WORK/batch.txt" rps)" "$B_OK_S" "$(field "$WORK/batch.txt" p99_ms)" "$BATCH" "$B_OK" "$((B_REQ * BATCH))"
echo "  micros debited over all agents: $total (wrk saw $S_REQ single 201s + $B_OK batched 201s; requests in flight at the end add a few)"
