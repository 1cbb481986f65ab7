#!/usr/bin/env bash
# Durable debits with fresh idempotency keys over HTTP, on an empty key index and on one
# already holding KEYS keys (spread over the last 24 h, as a busy day leaves it): req/s and
# p99 of both (the same wrk script as run.sh), tally's RSS after each run, and the time a
# start takes to be ready and its RSS with the large index.
#   benches/wrk/keys.sh                                   # KEYS=20000000, defaults below
#   KEYS=5000000 DURATION=20s benches/wrk/keys.sh
# Needs wrk (apt-get install -y wrk) and ~1.1 GB of disk per 20 M keys in $TMPDIR.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
KEYS="${KEYS:-20000000}"
# shellcheck source=lib.sh
source "$ROOT/benches/wrk/lib.sh"
# PREBUILT=1: use the release binaries already in target/ (build them first).
[[ -n ${PREBUILT:-} ]] || cargo build --quiet --release -p tally-server --bin tally \
  -p tally-benches --bin preload_keys --manifest-path "$ROOT/Cargo.toml"
BIN="$ROOT/target/release/tally"

debits() { # name data_dir: serve, fund, wrk, RSS; leaves tally stopped
  local started ready_s
  started=$(date +%s%N)
  start_tally "$2" "$1"
  wait_ready "$BASE"
  ready_s=$(awk -v ns=$(( $(date +%s%N) - started )) 'BEGIN { printf "%.2f", ns / 1e9 }')
  local pid="${PIDS[-1]}"
  echo "== $1: ready in ${ready_s} s, RSS $(rss_mib "$pid") MiB at ready"
  echo "$ready_s $(rss_mib "$pid")" > "$WORK/$1.ready"
  fund_agents "$BASE"
  wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -s "$ROOT/benches/wrk/debit.lua" "$BASE" \
    | tee "$WORK/$1.txt"
  rss_mib "$pid" > "$WORK/$1.rss"
  curl -fsS "$BASE/readyz" > "$WORK/$1.readyz"; echo
  kill -TERM "$pid"; wait "$pid" || true
}

debits empty "$WORK/empty"
"$ROOT/target/release/preload_keys" --dir "$WORK/full" --keys "$KEYS"
debits full "$WORK/full"
# A restart of the large index after the run (keys on disk now include the run's).
started=$(date +%s%N)
start_tally "$WORK/full" restart
wait_ready "$BASE"
RESTART_S=$(awk -v ns=$(( $(date +%s%N) - started )) 'BEGIN { printf "%.2f", ns / 1e9 }')
RESTART_RSS=$(rss_mib "${PIDS[-1]}")
kill -TERM "${PIDS[-1]}"; wait "${PIDS[-1]}" || true

E_RPS="$(field "$WORK/empty.txt" rps)"; F_RPS="$(field "$WORK/full.txt" rps)"
echo
echo "summary (wrk -t$THREADS -c$CONNECTIONS -d$DURATION, fresh keys, loopback, $(nproc) cores)"
printf '  %-22s %9s %8s %9s %15s\n' "key index" "req/s" "p99 ms" "RSS MiB" "ready s (RSS)"
printf '  %-22s %9s %8s %9s %15s\n' "empty" "$E_RPS" "$(field "$WORK/empty.txt" p99_ms)" \
  "$(cat "$WORK/empty.rss")" "$(awk '{printf "%.2f (%s)", $1, $2}' "$WORK/empty.ready")"
printf '  %-22s %9s %8s %9s %15s\n' "$KEYS keys" "$F_RPS" "$(field "$WORK/full.txt" p99_ms)" \
  "$(cat "$WORK/full.rss")" "$(awk '{printf "%.2f (%s)", $1, $2}' "$WORK/full.ready")"
printf '  restart with the large index after its run: ready in %.2f s, RSS %s MiB\n' "$RESTART_S" "$RESTART_RSS"
awk -v e="$E_RPS" -v f="$F_RPS" 'BEGIN { printf "  throughput with the large index: %.2f of the empty one (target >= 0.85)\n", f / e }'
echo "  /readyz after the large run: $(cat "$WORK/full.readyz")"
