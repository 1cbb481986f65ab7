#!/usr/bin/env bash
# A debit's latency with threshold webhooks off, on with a receiver that never answers,
# and on with one that answers at once: the senders only read the change feed, so a
# hanging receiver must not move a debit's latency (issue: "delivery never blocks or slows
# a debit"). Each run: `tally loadtest --spawn` (a fresh release server and data dir) for
# DURATION_S seconds at CONCURRENCY workers, the same seed; every agent's balance crosses
# the plan's balance_below_micros early, so webhooks are due from the first seconds.
# Everything runs on 127.0.0.1 and stops by itself.
set -euo pipefail
cd "$(dirname "$0")/../.."
DURATION_S=${DURATION_S:-20}
CONCURRENCY=${CONCURRENCY:-64}
# Runs of the three modes, interleaved (off hang ok off hang ok ...) so that drift of the
# machine falls on all of them.
ROUNDS=${ROUNDS:-2}
cargo build --release -q -p tally-server
BIN=$PWD/target/release/tally
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
for mode in ok hang; do
  python3 benches/webhooks/receiver.py --mode "$mode" --port-file "$WORK/$mode.port" \
    --count-file "$WORK/$mode.count" --max-seconds $((DURATION_S * 3 + 120)) &
  PIDS+=($!)
done
for mode in ok hang; do
  for _ in $(seq 100); do [[ -s $WORK/$mode.port ]] && break; sleep 0.1; done
  [[ -s $WORK/$mode.port ]] || { echo "receiver $mode did not start" >&2; exit 1; }
done
config() { # $1: off | ok | hang
  cat <<TOML
[engine]
sled_cache_bytes = 67108864

[[plans]]
name = "default"
[plans.thresholds]
balance_below_micros = 9990000

[[plans]]
name = "loadtest-tight"
[[plans.buckets]]
name = "default"
quota = 5
window_s = 1
burst = 5
TOML
  if [[ $1 != off ]]; then
    cat <<TOML

[[webhooks]]
name = "bench"
url = "http://127.0.0.1:$(cat "$WORK/$1.port")/hooks"
secrets = ["whsec_KioqKioqKioqKioqKioqKioqKioqKioqKioqKioqKio="]
TOML
  fi
}
for round in $(seq "$ROUNDS"); do
  for mode in off hang ok; do
    config "$mode" >"$WORK/$mode.toml"
    "$BIN" loadtest --spawn --tally-bin "$BIN" --config "$WORK/$mode.toml" --seed 7 \
      --duration-s "$DURATION_S" --concurrency "$CONCURRENCY" --quiet \
      --json "$WORK/$mode.$round.json" >"$WORK/$mode.$round.out"
    # The receivers count over all runs; the count after this run is what it got so far.
    cp "$WORK/$mode.count" "$WORK/$mode.$round.count" 2>/dev/null || true
  done
done
python3 - "$WORK" "$ROUNDS" <<'PY'
import json, sys, pathlib
work, rounds = pathlib.Path(sys.argv[1]), int(sys.argv[2])
print(f"{'round':<6} {'webhooks':<26} {'req/s':>8} {'approved p50 ms':>16} {'p99 ms':>8} {'webhook requests so far':>24}")
for rnd in range(1, rounds + 1):
    for mode, label in [("off", "none"), ("hang", "receiver never answers"), ("ok", "receiver answers at once")]:
        r = json.loads((work / f"{mode}.{rnd}.json").read_text())
        lat = r["latency_ms_by_outcome"]["approved"]
        count = (work / f"{mode}.{rnd}.count").read_text() if mode != "off" else "-"
        bad = [] if r["invariants"]["ok"] else [c["name"] for c in r["invariants"]["checks"] if not c["ok"]]
        print(f"{rnd:<6} {label:<26} {r['requests_per_s']:>8.0f} {lat['p50_ms']:>16.2f} {lat['p99_ms']:>8.2f} {count:>24}" + (f"  INVARIANTS BROKEN: {bad}" if bad else ""))
PY
