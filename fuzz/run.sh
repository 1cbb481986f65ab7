#!/usr/bin/env bash
# Runs every cargo-fuzz target of tally for SECONDS each (default 30) and exits non-zero
# if any target crashes. cargo-fuzz needs nightly flags; RUSTC_BOOTSTRAP=1 lets the stable
# toolchain accept them. Usage: fuzz/run.sh [SECONDS] [TARGET...]
set -euo pipefail

seconds="${1:-30}"
shift || true
cd "$(dirname "$0")"

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

export RUSTC_BOOTSTRAP=1
if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

cargo fuzz build
failed=()
for target in "${targets[@]}"; do
    echo "== $target: ${seconds}s"
    # Seeds are committed under corpus/<target>/; new inputs land there too (gitignored).
    mkdir -p "corpus/$target"
    dict=()
    if [ -f "dicts/$target.dict" ]; then
        dict=("-dict=dicts/$target.dict")
    fi
    if ! cargo fuzz run "$target" -- -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 "${dict[@]}"; then
        failed+=("$target")
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "crashed: ${failed[*]} (inputs in fuzz/artifacts/<target>/)" >&2
    exit 1
fi
echo "no crashes in: ${targets[*]}"
