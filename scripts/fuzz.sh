#!/usr/bin/env bash
# make fuzz: run every cargo-fuzz target of fuzz/ for FUZZ_SECS seconds
# (default 300) and print, per target, the runs, the seconds and the crashes.
# On demand only (it needs nightly and minutes per target), not in CI.
#
#   FUZZ_SECS=60 make fuzz            shorter runs
#   FUZZ_TARGETS="utf7 orders" make fuzz
set -euo pipefail

cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
secs="${FUZZ_SECS:-300}"
targets="${FUZZ_TARGETS:-orders jobs config headers utf7}"

if ! rustup toolchain list | grep -q '^nightly'; then
    echo "fuzz: the nightly toolchain is needed: rustup toolchain install nightly" >&2
    exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

cd fuzz
cargo +nightly fuzz build >&2
mkdir -p logs
rows=()
failed=0
for t in $targets; do
    mkdir -p "corpus/$t" "artifacts/$t"
    before=$(find "artifacts/$t" -type f -name 'crash-*' -o -type f -name 'oom-*' -o -type f -name 'timeout-*' | wc -l)
    seeds=()
    [ -d "seeds/$t" ] && seeds=("seeds/$t")
    echo "fuzz: $t for ${secs}s" >&2
    start=$(date +%s)
    status=0
    cargo +nightly fuzz run "$t" "corpus/$t" "${seeds[@]}" -- \
        -max_total_time="$secs" -print_final_stats=1 -timeout=10 \
        >"logs/$t.log" 2>&1 || status=$?
    took=$(( $(date +%s) - start ))
    after=$(find "artifacts/$t" -type f -name 'crash-*' -o -type f -name 'oom-*' -o -type f -name 'timeout-*' | wc -l)
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "logs/$t.log" | tail -1 | grep -o '[0-9]*$' || true)
    crashes=$(( after - before ))
    if [ "$status" -ne 0 ] && [ "$crashes" -eq 0 ]; then crashes="?"; fi
    [ "$status" -ne 0 ] && failed=1
    rows+=("$(printf '%-8s %12s %8s %8s' "$t" "${runs:-?}" "$took" "$crashes")")
done

printf '%-8s %12s %8s %8s\n' target runs seconds crashes
printf '%s\n' "${rows[@]}"
if [ "$failed" -ne 0 ]; then
    echo "fuzz: a target failed: see fuzz/logs/ and fuzz/artifacts/" >&2
    exit 1
fi
