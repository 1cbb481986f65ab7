#!/usr/bin/env bash
# Runs schemathesis against /openapi.json of a live `tally serve` (loopback, temp data
# dir, known admin token) for every operation, in every phase (examples, coverage, fuzzing,
# and the stateful phase that follows the document's links: create an agent, then credit,
# debit, hold, capture ...), with three checks that must have 0 failures: not_a_server_error,
# status_code_conformance and response_schema_conformance. Then it counts what the server
# answered (from its own metrics) and fails when fewer than a floor of requests got a 2xx,
# a 402 or a 429: a run that only ever reached 404s or 400s checked little.
#
#   scripts/schemathesis.sh                 # builds tally (debug) and runs, a new seed each time
#   SEED=123 scripts/schemathesis.sh        # replays a run (the seed is printed)
#   MAX_EXAMPLES=50 scripts/schemathesis.sh # more examples per operation
#   MIN_2XX=200 MIN_402=5 MIN_429=2         # the floors (these are the defaults; the
#                                           # examples phase sends a1's spend routes 3
#                                           # requests that must be 429; 4 seeds gave 3..32)
#   TALLY_BIN=target/release/tally scripts/schemathesis.sh
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${SCHEMATHESIS_VENV:-$ROOT/target/schemathesis-venv}"
SCHEMATHESIS_VERSION="${SCHEMATHESIS_VERSION:-4.32.5}"
MAX_EXAMPLES="${MAX_EXAMPLES:-100}"
SEED="${SEED:-$(( $(date +%s) % 1000000 ))}"
MIN_2XX="${MIN_2XX:-200}"
MIN_402="${MIN_402:-5}"
MIN_429="${MIN_429:-2}"
TALLY_BIN="${TALLY_BIN:-}"

if [[ ! -x "$VENV/bin/schemathesis" ]]; then
  echo "schemathesis.sh: installing schemathesis $SCHEMATHESIS_VERSION into $VENV" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi

if [[ -z "$TALLY_BIN" ]]; then
  cargo build --quiet -p tally-server --bin tally --manifest-path "$ROOT/Cargo.toml"
  TALLY_BIN="$ROOT/target/debug/tally"
fi

WORK="$(mktemp -d)"
TOKEN="$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
HASH="$(printf '%s' "$TOKEN" | sha256sum | cut -d' ' -f1)"
SERVER_PID=""
cleanup() {
  if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

# A config with a rate-limited and a capped plan so those answers are reachable too.
cat > "$WORK/tally.toml" <<TOML
[server]
listen = "127.0.0.1:0"
data_dir = "$WORK/data"
log = "warn"

[[plans]]
name = "default"

[[plans]]
name = "limited"
[[plans.buckets]]
name = "default"
quota = 1
window_s = 3600

[[plans]]
name = "capped"
monthly_cap_micros = 1000000
soft_threshold_pct = 80

[x402]
network = "eip155:84532"
asset = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
pay_to = "0x000000000000000000000000000000000000dEaD"
TOML

TALLY_ADMIN_TOKEN_SHA256="$HASH" "$TALLY_BIN" serve --config "$WORK/tally.toml" \
  > "$WORK/stdout" 2> "$WORK/stderr" &
SERVER_PID=$!

BASE=""
for _ in $(seq 1 300); do
  BASE="$(sed -n 's/^tally listening on //p' "$WORK/stdout" | head -n1)"
  [[ -n "$BASE" ]] && break
  kill -0 "$SERVER_PID" 2>/dev/null || { echo "tally exited:" >&2; cat "$WORK/stderr" >&2; exit 1; }
  sleep 0.1
done
[[ -n "$BASE" ]] || { echo "tally did not start" >&2; exit 1; }
echo "schemathesis.sh: tally at $BASE, seed $SEED (SEED=$SEED replays this run)" >&2

# The agents the document's examples name, so that generated requests reach them and money
# moves: a1 is funded but has used its one spend an hour (every spend on it is a 429),
# broke-1 has no money (402), the others are funded (201) or capped.
for id in a1 a2 limited-1 capped-1 broke-1; do
  plan=default
  case "$id" in a1|limited-*) plan=limited ;; capped-*) plan=capped ;; esac
  curl -fsS -o /dev/null -X POST "$BASE/v1/agents" -H "Authorization: Bearer $TOKEN" \
    -H "Idempotency-Key: seed-$id" -H 'Content-Type: application/json' \
    -d "{\"id\":\"$id\",\"plan\":\"$plan\"}"
  [[ $id == broke-* ]] && continue
  curl -fsS -o /dev/null -X POST "$BASE/v1/agents/$id/credits" -H "Authorization: Bearer $TOKEN" \
    -H "Idempotency-Key: seed-credit-$id" -H 'Content-Type: application/json' \
    -d '{"amount_micros":1000000000}'
done
curl -fsS -o /dev/null -X POST "$BASE/v1/agents/a1/debits" -H "Authorization: Bearer $TOKEN" \
  -H "Idempotency-Key: seed-debit-a1" -H 'Content-Type: application/json' -d '{"amount_micros":1}'


set +e
# From the temp dir, so schemathesis's own .schemathesis/ files do not land in the repo.
cd "$WORK"
"$VENV/bin/schemathesis" run "$BASE/openapi.json" \
  --url "$BASE" \
  --header "Authorization: Bearer $TOKEN" \
  --checks not_a_server_error,status_code_conformance,response_schema_conformance \
  --max-examples "$MAX_EXAMPLES" \
  --workers 1 \
  --no-color \
  --seed "$SEED" \
  --request-timeout 10
STATUS=$?
set -e

# What the server answered, by status, from its own request metrics.
curl -fsS "$BASE/metrics" > "$WORK/metrics"
count() { # status regex -> requests answered with it
  awk -v re="$1" '/^tally_http_request_duration_seconds_count/ {
      if (match($0, /status="[0-9]+"/)) { st = substr($0, RSTART + 8, RLENGTH - 9); if (st ~ re) n += $NF } }
    END { printf "%d", n }' "$WORK/metrics"
}
N2XX=$(count '^2'); N402=$(count '^402$'); N429=$(count '^429$'); N4XX=$(count '^4'); N5XX=$(count '^5')
echo "schemathesis.sh: the server answered 2xx: $N2XX, 402: $N402, 429: $N429, 4xx in all: $N4XX, 5xx: $N5XX (seed $SEED)"
for pair in "2xx:$N2XX:$MIN_2XX" "402:$N402:$MIN_402" "429:$N429:$MIN_429"; do
  IFS=: read -r what got floor <<< "$pair"
  if (( got < floor )); then
    echo "schemathesis.sh: only $got requests got $what (floor $floor): the run exercised too little" >&2
    STATUS=1
  fi
done

if grep -q '"level":"ERROR"' "$WORK/stderr"; then
  echo "schemathesis.sh: the server logged errors:" >&2
  grep '"level":"ERROR"' "$WORK/stderr" | head -n 20 >&2
  STATUS=1
fi
exit "$STATUS"
