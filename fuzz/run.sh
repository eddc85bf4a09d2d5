#!/usr/bin/env bash
# Runs each fuzz target for SECONDS (default 600) with cargo-fuzz on the
# nightly toolchain, one after another, growing fuzz/corpus/<target>; prints
# libFuzzer's final stats line per target. Usage: fuzz/run.sh [seconds] [target...]
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-600}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(intake source host_result)
target_dir=${PLUGIN_FUZZ_TARGET_DIR:-/var/tmp/plugin-delivery-fuzz-target}
for t in "${targets[@]}"; do
    log=$(mktemp)
    start=$(date +%s)
    if ! cargo +nightly fuzz run "$t" --target-dir "$target_dir" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
        tail -n 40 "$log"
        echo "fuzz $t: FAILED (crash input in fuzz/artifacts/$t)"
        exit 1
    fi
    runs=$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -Eo '[0-9]+$' || echo '?')
    cov=$(grep -Eo 'cov: [0-9]+' "$log" | tail -n 1 || true)
    echo "fuzz $t: $(( $(date +%s) - start )) s, $runs executions, $cov, corpus $(ls "corpus/$t" | wc -l) inputs, no crash"
    rm -f "$log"
done
