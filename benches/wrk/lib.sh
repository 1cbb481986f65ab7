# Shared by the wrk bench scripts (sourced, not run): the wrk settings, a work dir and the
# processes to stop on exit, a bearer token, starting `tally serve` on a data dir, funding
# bench agents, and reading wrk's RESULT line. The caller sets ROOT, then BIN after building.

DURATION="${DURATION:-10s}"
CONNECTIONS="${CONNECTIONS:-64}"
THREADS="${THREADS:-2}"
AGENTS="${AGENTS:-64}"
export AGENTS
# Where the wrk scripts find result.lua.
export WRK_LIB="$ROOT/benches/wrk"
command -v wrk >/dev/null || { echo "wrk not found: apt-get install -y wrk" >&2; exit 1; }

WORK="$(mktemp -d)"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

TALLY_TOKEN="$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export TALLY_TOKEN
TOKEN_HASH="$(printf '%s' "$TALLY_TOKEN" | sha256sum | cut -d' ' -f1)"

wait_listening() { # file pid -> base url
  for _ in $(seq 1 3000); do
    local base
    base="$(sed -n 's/^tally listening on //p' "$1" 2>/dev/null | head -n1)"
    if [[ -n "$base" ]]; then echo "$base"; return 0; fi
    kill -0 "$2" 2>/dev/null || { echo "server exited" >&2; return 1; }
    sleep 0.1
  done
  return 1
}

wait_ready() { # base url -> seconds waited, once /readyz answers 200
  for _ in $(seq 1 6000); do
    if curl -fsS -o /dev/null "$1/readyz" 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "tally never became ready" >&2; return 1
}

start_tally() { # data_dir name -> sets BASE; the pid is the last of PIDS
  TALLY_ADMIN_TOKEN_SHA256="$TOKEN_HASH" TALLY_LOG=warn "$BIN" serve \
    --listen 127.0.0.1:0 --data-dir "$1" > "$WORK/$2.out" 2> "$WORK/$2.err" &
  PIDS+=($!)
  BASE="$(wait_listening "$WORK/$2.out" "${PIDS[-1]}")"
}

fund_agents() { # base url: creates and credits bench-0 .. bench-(AGENTS-1)
  for i in $(seq 0 $((AGENTS - 1))); do
    curl -fsS -o /dev/null -X POST "$1/v1/agents" -H "Authorization: Bearer $TALLY_TOKEN" \
      -H "Idempotency-Key: bench-create-$i" -H 'Content-Type: application/json' -d "{\"id\":\"bench-$i\"}"
    curl -fsS -o /dev/null -X POST "$1/v1/agents/bench-$i/credits" -H "Authorization: Bearer $TALLY_TOKEN" \
      -H "Idempotency-Key: bench-credit-$i" -H 'Content-Type: application/json' \
      -d '{"amount_micros":1000000000000}'
  done
}

debited_micros() { # base url -> micros the bench agents spent (fund_agents gave each 10^12)
  local total=0 b
  for i in $(seq 0 $((AGENTS - 1))); do
    b="$(curl -fsS "$1/v1/agents/bench-$i" -H "Authorization: Bearer $TALLY_TOKEN" \
      | sed -n 's/.*"balance_micros":\([0-9]*\).*/\1/p')"
    total=$((total + 1000000000000 - b))
  done
  echo "$total"
}

rss_mib() { # pid -> resident MiB
  awk '/^VmRSS:/ { printf "%.0f", $2 / 1024 }' "/proc/$1/status"
}

field() { sed -n "s/^RESULT.*$2=\([0-9.]*\).*/\1/p" "$1"; }
