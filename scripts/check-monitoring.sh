#!/usr/bin/env bash
# Checks tally's monitoring config: Prometheus alert rules and their unit tests, the example
# Prometheus config, and the Grafana dashboard (valid JSON, every PromQL expression parses).
#
#   scripts/check-monitoring.sh            # works from any directory
#   scripts/check-monitoring.sh --no-live  # skip the live check below
#
# Installs the Debian `prometheus` package (promtool + server) when promtool is missing.
#
# Live check (when a tally binary is found: $TALLY_BIN, else target/release/tally; build it
# with `cargo build --release -p tally-server`): starts `tally serve` and a Prometheus
# server, both on 127.0.0.1 only, in a temporary directory; sends a few requests; checks
# that Prometheus sees up{job="tally"} == 1, that every rule of tally-alerts.yml loaded
# and evaluates without error against the real series, and that every tally_* metric
# named in the rules and the dashboard is in the live /metrics. Both processes are
# stopped at the end (and on any exit); it takes about 10-20 s. The seed requests must get
# the statuses they are meant to provoke (201, 402, 200, 404).
#
# Without a tally binary or a prometheus server the live check is SKIPPED; with CI=true a
# skip is a failure instead.
#
# Exits non-zero if any check fails.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
PROM_DIR=config/prometheus
RULES=$PROM_DIR/tally-alerts.yml
TESTS=$PROM_DIR/tally-alerts.test.yml
PROM_CONFIG=$PROM_DIR/prometheus.example.yml
DASHBOARD=config/grafana/tally-dashboard.json

LIVE=1
for arg in "$@"; do
    case $arg in
        --no-live) LIVE=0 ;;
        -h | --help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "unknown argument: $arg" >&2; exit 2 ;;
    esac
done

failures=0
step() { printf '\n== %s\n' "$*"; }
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }
ok() { echo "ok: $*"; }
# A check that cannot run: a failure in CI, a notice elsewhere.
skip() {
    if [ "${CI:-}" = true ]; then
        fail "$* (CI=true: a skipped check is a failure)"
    else
        echo "SKIPPED: $*"
    fi
}

TMP=$(mktemp -d "${TMPDIR:-/tmp}/check-monitoring.XXXXXX")
PIDS=()
cleanup() {
    local pid i
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done   # SIGTERM: graceful
    for pid in "${PIDS[@]}"; do
        for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step "promtool"
if ! command -v promtool >/dev/null 2>&1; then
    echo "promtool not found; installing the Debian prometheus package"
    SUDO=
    [ "$(id -u)" -ne 0 ] && SUDO=sudo
    if ! { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q &&
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus; } >"$TMP/apt.log" 2>&1; then
        tail -n 20 "$TMP/apt.log"
        echo "FAIL: could not install prometheus (promtool)"
        exit 1
    fi
fi
promtool --version 2>&1 | head -n 1

step "promtool check rules $RULES"
promtool check rules "$RULES" || fail "check rules $RULES"

step "promtool test rules $TESTS"
promtool test rules "$TESTS" || fail "test rules $TESTS"

step "promtool check config $PROM_CONFIG"
promtool check config "$PROM_CONFIG" || fail "check config $PROM_CONFIG"

step "dashboard JSON: $DASHBOARD"
if python3 -m json.tool "$DASHBOARD" >/dev/null; then
    ok "valid JSON"
else
    fail "$DASHBOARD is not valid JSON"
fi

step "dashboard PromQL: every expr parses (promtool check rules)"
# Every "expr" in the dashboard becomes a recording rule in a temporary rules file (JSON is
# YAML). Grafana's interval variables are replaced by 5m as Grafana does at query time;
# $job / $instance only ever appear inside label-matcher strings, so they stay as they are.
if python3 - "$DASHBOARD" "$TMP/dashboard-rules.yml" <<'EOF'; then
import json, re, sys

dash = json.load(open(sys.argv[1]))
exprs, bad_ds = [], []

def walk(node, where):
    if isinstance(node, dict):
        title = node.get("title", where)
        ds = node.get("datasource")
        if isinstance(ds, dict) and ds.get("uid") != "${DS_PROMETHEUS}":
            bad_ds.append(title)
        for k, v in node.items():
            if k == "expr":
                exprs.append((title, v))
            else:
                walk(v, title)
    elif isinstance(node, list):
        for v in node:
            walk(v, where)

walk(dash, "dashboard")
inputs = [i.get("name") for i in dash.get("__inputs", [])]
ok = True
if "DS_PROMETHEUS" not in inputs:
    print("FAIL: no DS_PROMETHEUS in __inputs"); ok = False
if bad_ds:
    print("FAIL: datasource not ${DS_PROMETHEUS} in:", ", ".join(sorted(set(bad_ds)))); ok = False
empty = [t for t, e in exprs if not isinstance(e, str) or not e.strip()]
if empty:
    print("FAIL: empty expr in:", ", ".join(empty)); ok = False
if not exprs:
    print("FAIL: no expr found"); ok = False
rules = []
for n, (title, e) in enumerate(exprs, 1):
    e = re.sub(r"\$\{?__(rate_interval|interval|range)\}?", "5m", e)
    rules.append({"record": f"dashboard_expr_{n}", "expr": e})
    print(f"  expr {n:2} [{title}]")
json.dump({"groups": [{"name": "dashboard", "rules": rules}]}, open(sys.argv[2], "w"), indent=1)
print(f"{len(exprs)} expressions extracted")
sys.exit(0 if ok else 1)
EOF
    promtool check rules "$TMP/dashboard-rules.yml" || fail "a dashboard expression does not parse"
else
    fail "dashboard structure"
fi

live_check() {
    local tally_bin=${TALLY_BIN:-$ROOT/target/release/tally}
    if [ ! -x "$tally_bin" ]; then
        skip "no tally binary at $tally_bin (cargo build --release -p tally-server, or set TALLY_BIN)"
        return 0
    fi
    if ! command -v prometheus >/dev/null 2>&1; then
        skip "no prometheus server binary"
        return 0
    fi
    local token hash addr="" port i
    token=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
    hash=$(printf %s "$token" | sha256sum | cut -d' ' -f1)

    TALLY_ADMIN_TOKEN_SHA256=$hash TALLY_LOG=warn \
        "$tally_bin" serve --listen 127.0.0.1:0 --data-dir "$TMP/tally-data" \
        >"$TMP/tally.out" 2>"$TMP/tally.err" &
    PIDS+=($!)
    for i in $(seq 1 100); do
        addr=$(sed -n 's#^tally listening on http://##p' "$TMP/tally.out")
        [ -n "$addr" ] && break
        sleep 0.1
    done
    if [ -z "$addr" ]; then
        tail -n 5 "$TMP/tally.err"
        fail "tally serve did not start within 10 s"
        return
    fi
    echo "tally listening on $addr"

    # A little traffic so the server-side series exist: an agent, a top-up, an approved
    # debit, a 402, a check, a 404. Each must get the status it is meant to provoke.
    local base="http://$addr/v1" h="Authorization: Bearer $token" j="Content-Type: application/json"
    local agent="mon-$$" got="" want="201 201 201 402 200 404 "
    c() { curl -sS -o /dev/null -w '%{http_code} ' --max-time 5 -H "$h" -H "$j" "$@"; }
    got+=$(c -X POST "$base/agents" -H "Idempotency-Key: a-$agent" -d "{\"id\":\"$agent\"}")
    got+=$(c -X POST "$base/agents/$agent/credits" -H "Idempotency-Key: c-$agent" -d '{"amount_micros":5000}')
    got+=$(c -X POST "$base/agents/$agent/debits" -H "Idempotency-Key: d1-$agent" -d '{"amount_micros":1500,"task_type":"llm"}')
    got+=$(c -X POST "$base/agents/$agent/debits" -H "Idempotency-Key: d2-$agent" -d '{"amount_micros":900000,"task_type":"llm"}')
    got+=$(c -X POST "$base/agents/$agent/check" -d '{"amount_micros":100}')
    got+=$(c "$base/agents/nobody-$agent")
    if [ "$got" = "$want" ]; then
        ok "seed requests: $got"
    else
        fail "seed requests answered '$got', expected '$want'"
    fi

    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    cat >"$TMP/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - $ROOT/$RULES
scrape_configs:
  - job_name: tally
    static_configs:
      - targets: ["$addr"]
EOF
    prometheus --config.file="$TMP/prometheus.yml" --storage.tsdb.path="$TMP/prom-data" \
        --web.listen-address="127.0.0.1:$port" --log.level=warn \
        >"$TMP/prom.log" 2>&1 &
    PIDS+=($!)
    echo "prometheus on 127.0.0.1:$port (scrape and rule evaluation every 1 s)"

    local api="http://127.0.0.1:$port/api/v1" verdict=""
    for i in $(seq 1 30); do
        sleep 1
        verdict=$(python3 - "$api" <<'EOF' 2>/dev/null
import json, sys, urllib.parse, urllib.request
api = sys.argv[1]
def get(path, **q):
    url = api + path + ("?" + urllib.parse.urlencode(q) if q else "")
    return json.load(urllib.request.urlopen(url, timeout=2))["data"]
up = get("/query", query='up{job="tally"}')["result"]
if not up or up[0]["value"][1] != "1":
    print("wait up"); sys.exit()
rules = [r for g in get("/rules")["groups"] for r in g["rules"]]
pending = [r["name"] for r in rules if r.get("health") != "ok"]
if pending:
    print("wait rules " + " ".join(f'{r["name"]}={r.get("health")}:{r.get("lastError", "")}' for r in rules if r.get("health") != "ok")); sys.exit()
agents = get("/query", query='tally_agents{job="tally"}')["result"]
print(f'ok up=1 rules={len(rules)} tally_agents={agents[0]["value"][1] if agents else "none"}')
EOF
        )
        case $verdict in ok*) break ;; esac
    done
    case $verdict in
        ok*) ok "prometheus scrapes tally: $verdict (all rules health=ok)" ;;
        *)
            tail -n 5 "$TMP/prom.log"
            fail "prometheus check did not pass within 30 s (last: ${verdict:-no answer})"
            ;;
    esac

    # Every tally_* metric the rules and the dashboard use must exist in the live /metrics.
    curl -sS --max-time 5 "http://$addr/metrics" >"$TMP/metrics.txt"
    if python3 - "$TMP/metrics.txt" "$RULES" "$DASHBOARD" <<'EOF'; then
import re, sys
live = set()
for line in open(sys.argv[1]):
    m = re.match(r"# TYPE (\S+) (\S+)", line)
    if m:
        name, kind = m.groups()
        live.add(name)
        if kind == "histogram":
            live.update({name + "_bucket", name + "_sum", name + "_count"})
used = set()
for path in sys.argv[2:]:
    used |= set(re.findall(r"\btally_[a-z_]+\b", open(path).read()))
missing = sorted(used - live)
print(f"{len(used)} tally_* names used, {len(missing)} missing from the live /metrics")
for n in missing:
    print("  missing:", n)
sys.exit(1 if missing else 0)
EOF
        ok "every tally_* metric named in the rules and the dashboard is exported"
    else
        fail "metric names used but not exported"
    fi
}

if [ "$LIVE" = 1 ]; then
    step "live: tally serve + prometheus on 127.0.0.1"
    live_check
fi

echo
if [ "$failures" -ne 0 ]; then
    echo "check-monitoring: $failures check(s) FAILED"
    exit 1
fi
echo "check-monitoring: all checks passed"
