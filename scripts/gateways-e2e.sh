#!/usr/bin/env bash
# Installs Caddy and nginx (Debian packages) without letting their own services run, then
# runs the gateway end-to-end tests (crates/tally-server/tests/gateways_e2e.rs).
#   scripts/gateways-e2e.sh                 install if missing, then run the tests
#   scripts/gateways-e2e.sh --install-only  what .ci/run does before `cargo test`
set -euo pipefail
cd "$(dirname "$0")/.."

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
if ! have caddy || ! have nginx; then
  if [ "$(id -u)" != 0 ]; then
    echo "caddy/nginx missing and not root: apt-get install -y caddy nginx" >&2
    exit 1
  fi
  # A policy-rc.d that says 101 keeps the packages' services (port 80) from starting.
  policy=/usr/sbin/policy-rc.d
  restore=""
  if [ -e "$policy" ]; then restore=$(mktemp); cp -p "$policy" "$restore"; fi
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod +x "$policy"
  trap 'if [ -n "$restore" ]; then mv "$restore" "$policy"; else rm -f "$policy"; fi' EXIT
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq caddy nginx >/dev/null
fi
# Should a service have started anyway (systemd hosts), stop it: the tests bring their own.
for svc in caddy nginx; do
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
    systemctl disable --now "$svc" || true
  fi
done
caddy version
"$(command -v nginx || echo /usr/sbin/nginx)" -v

if [ "${1:-}" != "--install-only" ]; then
  CI=${CI:-true} cargo test -p tally-server --test gateways_e2e -- --nocapture
fi
