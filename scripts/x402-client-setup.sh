#!/usr/bin/env bash
# Installs the official x402 Python client (PyPI x402[evm,requests], pinned in
# scripts/x402-client-requirements.txt) into a venv for scripts/x402-client.py, and prints
# the venv's python. Idempotent: a venv already holding these exact pins is left as it is
# (a stamp records the pins' hash), so a second run takes well under a second.
#   X402_VENV  where the venv goes (default ~/.cache/tally-x402-venv)
# Use: py=$(bash scripts/x402-client-setup.sh) && X402_PRIVATE_KEY=0x... "$py" scripts/x402-client.py URL
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv=${X402_VENV:-$HOME/.cache/tally-x402-venv}
pins="$here/x402-client-requirements.txt"
want=$(sha256sum "$pins" | cut -d' ' -f1)
stamp="$venv/.tally-x402-pins"

if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "$venv/bin/python"
    exit 0
fi

# x402 2.25.0 needs Python >= 3.10.
python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
    { echo "x402-client-setup: python3 >= 3.10 needed, found $(python3 --version)" >&2; exit 1; }
if ! python3 -m venv "$venv" >/dev/null 2>&1; then
    # Debian ships venv's ensurepip separately.
    echo "x402-client-setup: installing python3-venv" >&2
    apt-get update -qq >&2 && apt-get install -y -qq python3-venv >&2
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$pins" >&2
"$venv/bin/python" -c 'import x402, eth_account, requests, web3' >&2
echo "$want" > "$stamp"
echo "$venv/bin/python"
