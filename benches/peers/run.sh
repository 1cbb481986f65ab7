#!/usr/bin/env bash
# tally against what a user would pick instead: a Redis Lua script and a PostgreSQL
# transaction, each in its durable mode, doing the same debit (idempotency record with a 24 h
# TTL, GCRA, monthly cap, balance, journal entry) for the same 1,000 agents at the same
# concurrency; and a no-op axum handler as the ceiling of the HTTP stack.
#   benches/peers/run.sh                                  # DURATION=10 CONCURRENCY="64 256"
#   PREBUILT=1 DURATION=3 CONCURRENCY=64 benches/peers/run.sh
# Env: DURATION (seconds per run), CONCURRENCY (connections, space-separated), BATCH (items
# a tally batch, 100), PIPELINE (Redis requests a round trip, 16), THREADS (load generator
# threads, 2), PREBUILT=1 (use target/release/tally as it is), TALLY_BIN (another binary).
#
# What runs (all on 127.0.0.1, in a temp dir, as this script's own processes, stopped by PID
# on exit, error or Ctrl-C; nothing is installed as a service):
#   tally        `tally serve` (release, durable default: a debit is answered after its group
#                commit's fsync), config tally.toml. Driven by wrk (-t THREADS -c N) with
#                benches/wrk/debit.lua (one debit a request, a fresh Idempotency-Key each) and
#                benches/wrk/batch.lua (POST /v1/batch, BATCH debits a request, N connections).
#   no-op        `tally noop-server`: the same runtime, axum and listener, a handler that only
#                answers 201. wrk with debit.lua.
#   Redis 7      appendonly yes, appendfsync always (the AOF is written and fsynced before
#                replies go out, once per event-loop pass for all the commands of that pass: a
#                group commit of its own), no RDB snapshots, one I/O thread. Driven by
#                redis-benchmark (--threads THREADS -c N): EVALSHA of redis-debit.lua, a random
#                agent and a fresh random key (5 × __rand_int__, 10^15 values) per call; then
#                the same with -P PIPELINE for the batch comparison.
#   PostgreSQL 15  initdb into the temp dir, synchronous_commit on, fsync on, other settings
#                default but max_connections (300). Driven by pgbench -M prepared -c N -j THREADS
#                -T DURATION with pg-debit.sql: one transaction (debit() in pg-schema.sql) a debit.
# Caveats:
#   - Everything shares the same 2 cores: the load generator takes CPU from the system it
#     measures (wrk, redis-benchmark and pgbench each differently), and other work on the
#     machine (builds) shows in the figures. Compare rows of one run, not runs.
#   - All three load generators are closed-loop: a slow reply delays the next request, so
#     p99 understates what an open-loop client would see (coordinated omission). wrk's
#     percentiles are per request (a batch request carries BATCH debits); redis-benchmark's are
#     per command, and with -P a command's latency is that of its whole pipeline; pgbench's come
#     from its per-transaction log (-l), client-side, including the round trip.
#   - redis-benchmark has no duration: a short calibration run (checked like the others, not
#     shown) estimates the rate, then -n is set to rate × DURATION, so its runs last about
#     DURATION. The p50/p99 it prints are rounded by its histogram.
#   - pgbench's -T clock starts before its clients are connected: at c=256 connecting takes
#     seconds of a loaded machine, so give DURATION ≥ 10 there (its tps leaves that time out).
#   - tally's and the no-op's rows come from wrk's count of answered requests: requests still
#     in flight when wrk stops are done by the server but not counted.
# After each run the work is checked against each system's own records, and the script fails
# if it was not all done: tally (admin API) the usage counts and balances of all agents;
# Redis the journal stream's length, the idempotency keys, replays/denials and the sum of
# balances; PostgreSQL the journal and idempotency row counts and the sum of balances.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
HERE="$ROOT/benches/peers"
DURATION="${DURATION:-10}"
CONCURRENCY="${CONCURRENCY:-64 256}"
BATCH="${BATCH:-100}"
PIPELINE="${PIPELINE:-16}"
THREADS="${THREADS:-2}"
AGENTS=1000
BALANCE_MICROS=1000000000000 # each agent's credit (fund_agents in benches/wrk/lib.sh gives the same)
export BATCH AGENTS
[[ $DURATION =~ ^[1-9][0-9]*$ ]] || { echo "DURATION is whole seconds, got '$DURATION'" >&2; exit 2; }
PG_BIN=/usr/lib/postgresql/15/bin

# 1. What is missing, from Debian.
need=()
command -v wrk >/dev/null || need+=(wrk)
command -v curl >/dev/null || need+=(curl)
command -v redis-server >/dev/null || need+=(redis-server)
command -v redis-benchmark >/dev/null || need+=(redis-tools)
[[ -x $PG_BIN/postgres && -x $PG_BIN/pgbench && -x $PG_BIN/psql ]] || need+=(postgresql-15 postgresql-client-15)
command -v python3 >/dev/null || need+=(python3)
if ((${#need[@]})); then
  if ((EUID != 0)); then echo "missing: ${need[*]}; run: sudo apt-get install -y ${need[*]}" >&2; exit 1; fi
  echo "== installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
redis-server --version | grep -q ' v=7\.' || { echo "need Redis 7: $(redis-server --version)" >&2; exit 1; }

# 2. The work dir, the processes to stop (PIDS, from lib.sh), the token, wrk's helpers.
# shellcheck source=../wrk/lib.sh
source "$ROOT/benches/wrk/lib.sh"
PG_PID=""
stop_all() {
  # PostgreSQL first, with SIGINT (fast shutdown: no waiting for clients); lib.sh's cleanup
  # then stops the rest (SIGTERM) and removes the work dir.
  if [[ -n $PG_PID ]]; then
    kill -INT "$PG_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$PG_PID" 2>/dev/null || break; sleep 0.1; done
  fi
  cleanup
}
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ -n ${TALLY_BIN:-} ]]; then
  BIN="$TALLY_BIN"
else
  [[ -n ${PREBUILT:-} ]] || cargo build --quiet --release -p tally-server --bin tally \
    --manifest-path "$ROOT/Cargo.toml"
  BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/tally"
fi
"$BIN" help noop-server >/dev/null 2>&1 || { echo "$BIN has no noop-server: build it again" >&2; exit 1; }

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
sum_field() { # field: the sum of a top-level field over the JSON objects on stdin, one after another
  python3 -c '
import json, sys
text, dec, at, total, n = sys.stdin.read(), json.JSONDecoder(), 0, 0, 0
while at < len(text.rstrip()):
    obj, at = dec.raw_decode(text, at)
    total, n = total + obj[sys.argv[1]], n + 1
    while at < len(text) and text[at].isspace():
        at += 1
print(total if n else "none")' "$1"
}
fail() { echo "CHECK FAILED: $*" >&2; exit 1; }
# A load generator that catches Ctrl-C (wrk does) exits 0, and bash then goes on: the servers
# got the SIGINT too, so a check finds them gone and stops the script here.
alive() { kill -0 "$2" 2>/dev/null || fail "$1 is not running any more (interrupted?)"; }
ROWS="$WORK/rows.tsv"
: > "$ROWS"
row() { # system mode c debits/s p50_ms p99_ms errors
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >> "$ROWS"
}

# 3. Start everything.
echo "== starting tally, the no-op handler, Redis, PostgreSQL in $WORK"
export TALLY_CONFIG="$HERE/tally.toml"
start_tally "$WORK/tally" tally
TALLY_PID="${PIDS[-1]}"
wait_ready "$BASE"
"$BIN" noop-server --listen 127.0.0.1:0 > "$WORK/noop.out" 2> "$WORK/noop.err" &
PIDS+=($!)
NOOP_PID="${PIDS[-1]}"
NOOP="$(wait_listening "$WORK/noop.out" "${PIDS[-1]}")"

REDIS_PORT="$(free_port)"
mkdir -p "$WORK/redis"
redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$WORK/redis" --daemonize no \
  --appendonly yes --appendfsync always --save '' --logfile "$WORK/redis/log" &
PIDS+=($!)
REDIS_PID="${PIDS[-1]}"
rcli() { redis-cli -h 127.0.0.1 -p "$REDIS_PORT" "$@"; }
for _ in $(seq 1 100); do [[ $(rcli ping 2>/dev/null) == PONG ]] && break; sleep 0.1; done
[[ $(rcli ping) == PONG ]] || fail "redis did not start: $(tail -5 "$WORK/redis/log")"
[[ $(rcli config get appendfsync | tail -1) == always ]] || fail "redis is not appendfsync always"

# PostgreSQL must not run as root: as the postgres user when we are root, else as ourselves.
PG_PORT="$(free_port)"
PG_DIR="$WORK/pg"
as_pg=()
if ((EUID == 0)); then
  chmod 711 "$WORK"
  as_pg=(setpriv --reuid=postgres --regid=postgres --init-groups --)
fi
mkdir -p "$PG_DIR"
((EUID != 0)) || chown postgres: "$PG_DIR"
"${as_pg[@]}" "$PG_BIN/initdb" -D "$PG_DIR/data" -U bench -A trust --no-sync > "$WORK/initdb.log" 2>&1 \
  || fail "initdb: $(tail -5 "$WORK/initdb.log")"
# setpriv execs, so $! is the postmaster itself.
"${as_pg[@]}" "$PG_BIN/postgres" -D "$PG_DIR/data" -c listen_addresses=127.0.0.1 -c port="$PG_PORT" \
  -c unix_socket_directories="$PG_DIR" -c synchronous_commit=on -c fsync=on \
  -c max_connections=300 > "$PG_DIR/log" 2>&1 &
PG_PID=$!
psql_q() { "$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U bench -d postgres -XAtq -v ON_ERROR_STOP=1 "$@"; }
for _ in $(seq 1 100); do psql_q -c 'select 1' >/dev/null 2>&1 && break; sleep 0.1; done
[[ $(psql_q -c 'show synchronous_commit') == on ]] || fail "postgres: $(tail -5 "$PG_DIR/log")"

# 4. The same 1,000 agents, each credited BALANCE_MICROS, in each system.
echo "== loading $AGENTS agents into each"
{
  for i in $(seq 0 $((AGENTS - 1))); do
    ((i == 0)) || echo next
    printf 'url = "%s/v1/agents"\nrequest = "POST"\nheader = "Authorization: Bearer %s"\n' "$BASE" "$TALLY_TOKEN"
    printf 'header = "Idempotency-Key: bench-create-%d"\nheader = "Content-Type: application/json"\n' "$i"
    printf 'data = "{\\"id\\":\\"bench-%d\\"}"\noutput = "/dev/null"\nfail\n' "$i"
  done
} > "$WORK/create.curl"
curl -sS -K "$WORK/create.curl" || fail "creating tally agents"
credits=()
for i in $(seq 0 $((AGENTS - 1))); do
  credits+=("{\"op\":\"credit\",\"agent_id\":\"bench-$i\",\"idempotency_key\":\"bench-credit-$i\",\"amount_micros\":$BALANCE_MICROS}")
done
credited="$(IFS=,; curl -fsS -X POST "$BASE/v1/batch" -H "Authorization: Bearer $TALLY_TOKEN" \
  -H 'Content-Type: application/json' -d "{\"items\":[${credits[*]}]}" | grep -o '"status":201' | wc -l)"
[[ $credited == "$AGENTS" ]] || fail "tally credited $credited of $AGENTS agents"

# Redis: the agents' hashes are agent:000000000000 .. agent:000000000999, the names
# redis-benchmark's __rand_int__ gives with -r 1000. GCRA: 1 µs emission interval, 1 s
# tolerance (1,000,000 a second, burst 1,000,000, as tally.toml); cap 10^15 micros.
for i in $(seq 0 $((AGENTS - 1))); do
  printf 'HSET agent:%012d balance %d tat_us 0 interval_us 1 tolerance_us 1000000 cap_micros 1000000000000000 period 0 spent_micros 0 seq 0\n' "$i" "$BALANCE_MICROS"
done | rcli > /dev/null
SHA="$(rcli script load "$(cat "$HERE/redis-debit.lua")")"
[[ $SHA =~ ^[0-9a-f]{40}$ ]] || fail "SCRIPT LOAD: $SHA"
[[ $(rcli dbsize) == "$AGENTS" ]] || fail "redis holds $(rcli dbsize) keys, not $AGENTS agents"

psql_q -f "$HERE/pg-schema.sql" >/dev/null
psql_q -c "INSERT INTO agents SELECT 'bench-' || i, $BALANCE_MICROS, 0, 1, 1000000, 1000000000000000, 0, 0, 0
           FROM generate_series(0, $((AGENTS - 1))) i" -c 'VACUUM ANALYZE agents' >/dev/null

# 5. Checks of the work done, cumulative over all runs of a system.
TALLY_DONE=0 # debits tally has journaled so far
tally_check() { # label min max: the journaled debits since the last check are in [min, max]
  local urls=() i usage balances debits spent left
  alive tally "$TALLY_PID"
  for i in $(seq 0 $((AGENTS - 1))); do urls+=("$BASE/v1/agents/bench-$i/usage?period=$(date -u +%Y-%m)"); done
  usage="$(curl -fsS --fail-early -H "Authorization: Bearer $TALLY_TOKEN" "${urls[@]}")" || fail "tally: reading $1 back"
  urls=()
  for i in $(seq 0 $((AGENTS - 1))); do urls+=("$BASE/v1/agents/bench-$i"); done
  balances="$(curl -fsS --fail-early -H "Authorization: Bearer $TALLY_TOKEN" "${urls[@]}")" || fail "tally: reading $1 back"
  debits="$(sum_field debits <<< "$usage")"
  spent="$(sum_field spent_micros <<< "$usage")"
  left="$(sum_field balance_micros <<< "$balances")"
  ((spent == debits)) || fail "tally $1: usage says $debits debits but $spent micros spent (1 each)"
  ((AGENTS * BALANCE_MICROS - left == spent)) || fail "tally $1: balances fell by $((AGENTS * BALANCE_MICROS - left)) micros, usage says $spent"
  local new=$((debits - TALLY_DONE))
  ((new >= $2 && new <= $3)) || fail "tally $1: $new debits journaled, wrk counted $2 (up to $3 with those in flight)"
  echo "   checked: tally journaled $new debits (wrk counted $2 answered 201), balances agree"
  TALLY_DONE=$debits
}
REDIS_DONE=0
redis_check() { # label requests: every request since the last check journaled, none replayed or denied
  local xlen keys replayed denied left
  alive redis "$REDIS_PID"
  xlen="$(rcli xlen journal)"
  replayed="$(rcli get stat:replayed)"; denied="$(rcli get stat:denied)"
  # Besides the idempotency keys, the database holds the agents and the journal (and the
  # stat: counters, which a passing run never creates).
  keys=$(($(rcli dbsize) - AGENTS - 1))
  left="$(rcli eval "local s = 0 for i = 0, $((AGENTS - 1)) do s = s + tonumber(redis.call('HGET', string.format('agent:%012d', i), 'balance')) end return string.format('%d', s)" 0)"
  [[ -z $replayed && -z $denied ]] || fail "redis $1: replayed ${replayed:-0}, denied ${denied:-0}"
  ((xlen - REDIS_DONE == $2)) || fail "redis $1: $((xlen - REDIS_DONE)) journal entries for $2 requests"
  ((keys == xlen)) || fail "redis $1: $keys idempotency keys for $xlen journal entries"
  ((AGENTS * BALANCE_MICROS - left == xlen)) || fail "redis $1: balances fell by $((AGENTS * BALANCE_MICROS - left)), journal holds $xlen"
  echo "   checked: redis journaled $(($2)) debits, $keys idempotency keys in all, balances agree"
  REDIS_DONE=$xlen
}
PG_DONE=0
pg_check() { # label min max: journal rows since the last check in [min, max]
  local out rows keys left
  alive postgres "$PG_PID"
  out="$(psql_q -F ' ' -c 'SELECT (SELECT count(*) FROM journal), (SELECT count(*) FROM idempotency), (SELECT sum(balance_micros) FROM agents)')"
  read -r rows keys left <<< "$out"
  ((keys == rows)) || fail "postgres $1: $keys idempotency rows for $rows journal rows"
  ((AGENTS * BALANCE_MICROS - left == rows)) || fail "postgres $1: balances fell by $((AGENTS * BALANCE_MICROS - left)), journal holds $rows"
  local new=$((rows - PG_DONE))
  ((new >= $2 && new <= $3)) || fail "postgres $1: $new journal rows, pgbench counted $2 transactions"
  echo "   checked: postgres journaled $new debits (pgbench counted $2), balances agree"
  PG_DONE=$rows
}

# 6. The runs.
wrk_run() { # name url lua c
  echo "== $1: wrk -t$THREADS -c$4 -d${DURATION}s $(basename "$3")"
  wrk -t"$THREADS" -c"$4" -d"${DURATION}s" --latency -s "$3" "$2" > "$WORK/$1.txt" \
    || fail "wrk $1: $(cat "$WORK/$1.txt")"
  grep -q '^RESULT' "$WORK/$1.txt" || fail "wrk $1 printed no RESULT: $(cat "$WORK/$1.txt")"
}
redis_run() { # name c pipeline n -> $WORK/name.csv
  rcli config resetstat >/dev/null
  redis-benchmark -h 127.0.0.1 -p "$REDIS_PORT" --threads "$THREADS" -c "$2" -P "$3" -n "$4" -r "$AGENTS" --csv \
    evalsha "$SHA" 2 'agent:__rand_int__' journal '__rand_int__-__rand_int__-__rand_int__-__rand_int__-__rand_int__' 1 \
    > "$WORK/$1.csv" 2> "$WORK/$1.err" || fail "redis-benchmark $1: $(cat "$WORK/$1.err")"
  # An error reply (e.g. a script error) must not pass as a debit.
  local errs
  errs="$(rcli info errorstats | grep -c '^errorstat_' || true)"
  ((errs == 0)) || fail "redis $1: error replies: $(rcli info errorstats)"
}
csv() { # file column -> the value in the data row
  awk -v col="$2" 'NR == 2 { gsub(/"/, ""); split($0, f, ","); print f[col] }' "$1"
}
redis_pair() { # mode c pipeline
  local name="redis-$1-$2" n_cal n rps
  # Calibration: about a second's worth at a guess, to learn the rate.
  # With -P, redis-benchmark finishes the pipelines it started, so -n is a multiple of c × P.
  local unit=$(($2 * $3))
  n_cal=$(((2000 * $3 > 20 * $2 ? 2000 * $3 : 20 * $2) / unit * unit))
  redis_run "$name-cal" "$2" "$3" "$n_cal"
  redis_check "$1 c=$2 calibration" "$n_cal"
  rps="$(csv "$WORK/$name-cal.csv" 2)"
  n="$(awk -v r="$rps" -v d="$DURATION" -v u="$unit" 'BEGIN { n = int(r * d / u) * u; if (n < 10 * u) n = 10 * u; print n }')"
  echo "== redis $1: redis-benchmark --threads $THREADS -c$2 -P$3 -n$n evalsha (~${DURATION}s at ${rps%.*}/s)"
  redis_run "$name" "$2" "$3" "$n"
  redis_check "$1 c=$2" "$n"
  local mode="single (EVALSHA)"
  (($3 == 1)) || mode="pipelined (EVALSHA, -P $3)"
  row redis "$mode" "$2" "$(csv "$WORK/$name.csv" 2 | cut -d. -f1)" \
    "$(csv "$WORK/$name.csv" 5)" "$(csv "$WORK/$name.csv" 7)" 0
}

for c in $CONCURRENCY; do
  # The no-op handler.
  wrk_run "noop-$c" "$NOOP" "$ROOT/benches/wrk/debit.lua" "$c"
  f="$WORK/noop-$c.txt"
  alive no-op "$NOOP_PID"
  row "no-op" "single (handler only)" "$c" "$(field "$f" rps)" "$(field "$f" p50_ms)" "$(field "$f" p99_ms)" "$(field "$f" non2xx_or_socket_errors)"

  # tally, one debit a request.
  wrk_run "tally-single-$c" "$BASE" "$ROOT/benches/wrk/debit.lua" "$c"
  f="$WORK/tally-single-$c.txt"
  errs="$(field "$f" non2xx_or_socket_errors)"
  ok=$(($(field "$f" requests) - errs))
  sleep 1 # requests in flight at the end
  tally_check "single c=$c" "$ok" $((ok + errs + c))
  row tally single "$c" "$(field "$f" rps)" "$(field "$f" p50_ms)" "$(field "$f" p99_ms)" "$errs"

  # tally, BATCH debits a request.
  wrk_run "tally-batch-$c" "$BASE" "$ROOT/benches/wrk/batch.lua" "$c"
  f="$WORK/tally-batch-$c.txt"
  ok="$(sed -n 's/^ITEMS ok=\([0-9]*\).*/\1/p' "$f")"
  items=$(($(field "$f" requests) * BATCH))
  sleep 1
  tally_check "batch c=$c" "$ok" $((items + c * BATCH))
  row tally "batch ($BATCH a request)" "$c" "$(sed -n 's/^ITEMS.*ok_per_s=\([0-9]*\).*/\1/p' "$f")" \
    "$(field "$f" p50_ms)" "$(field "$f" p99_ms)" $((items - ok + $(field "$f" non2xx_or_socket_errors)))

  # Redis, one EVALSHA a round trip, then PIPELINE a round trip.
  redis_pair single "$c" 1
  redis_pair pipelined "$c" "$PIPELINE"

  # PostgreSQL, one transaction a debit.
  echo "== postgres: pgbench -M prepared -c$c -j$THREADS -T$DURATION pg-debit.sql"
  mkdir -p "$WORK/pgbench-$c"
  (cd "$WORK/pgbench-$c" && PGPORT="$PG_PORT" "$PG_BIN/pgbench" -h 127.0.0.1 -U bench -n -M prepared \
    -c "$c" -j "$THREADS" -T "$DURATION" -l -f "$HERE/pg-debit.sql" postgres > out.txt 2>&1) \
    || fail "pgbench: $(tail -20 "$WORK/pgbench-$c/out.txt")"
  out="$WORK/pgbench-$c/out.txt"
  txs="$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$out")"
  failed="$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$out")"
  tps="$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time)/\1/p' "$out")"
  ((${txs:-0} > 0)) || fail "pgbench did no transaction: connecting $c clients may have taken all of DURATION=$DURATION s; $(tail -3 "$out")"
  [[ -n $tps ]] || fail "pgbench output: $(cat "$out")"
  pg_check "c=$c" "$txs" $((txs + c))
  # pgbench_log.*: client tx_no latency_us script epoch_s epoch_us, one line a transaction.
  read -r p50 p99 < <(cat "$WORK/pgbench-$c"/pgbench_log.* | awk '{ print $3 }' | sort -n | awk '
    { v[NR] = $1 } END { i50 = int(NR * 0.50); i99 = int(NR * 0.99); if (i50 < 1) i50 = 1; if (i99 < 1) i99 = 1;
      printf "%.3f %.3f\n", v[i50] / 1000, v[i99] / 1000 }')
  rm -f "$WORK/pgbench-$c"/pgbench_log.*
  row postgres "single (transaction)" "$c" "${tps%.*}" "$p50" "$p99" "${failed:-0}"
done

alive tally "$TALLY_PID"; alive no-op "$NOOP_PID"; alive redis "$REDIS_PID"; alive postgres "$PG_PID"

# 7. One table.
echo
echo "tally vs Redis vs PostgreSQL, durable debits, $AGENTS agents, ${DURATION}s a run, loopback,"
echo "load generators on the same $(nproc) cores; $(date -u +%Y-%m-%d) $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || true)"
awk -F'\t' '
  $1 == "tally" && $2 == "single" { base[$3] = $4 }
  { r[NR] = $0 }
  END {
    fmt = "%-9s %-27s %5s %11s %9s %9s %8s %7s\n"
    printf fmt, "system", "mode", "conns", "debits/s", "p50 ms", "p99 ms", "vs tally", "errors"
    for (i = 1; i <= NR; i++) {
      split(r[i], f, "\t")
      ratio = base[f[3]] > 0 ? sprintf("%.2f", f[4] / base[f[3]]) : "-"
      printf fmt, f[1], f[2], f[3], f[4], f[5], f[6], ratio, f[7]
    }
  }' "$ROWS"
echo "(vs tally: debits/s over tally single at the same connections; latency is per request: a"
echo " tally batch request carries $BATCH debits, a pipelined Redis command waits for its pipeline;"
echo " errors: non-2xx or refused items (tally, no-op), failed transactions (postgres))"
