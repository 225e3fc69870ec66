#!/usr/bin/env bash
# Coverage-guided fuzzing of everything that parses network bytes (cargo-fuzz / libFuzzer,
# see fuzz/README.md): runs each target for N seconds, one after the other.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#
# SECONDS_PER_TARGET defaults to 60; the targets default to all five (pdu, association,
# dimse, sniff, reassembly). Each run starts from the committed seeds in fuzz/corpus/<t>/
# and from the inputs earlier runs found in fuzz/work/<t>/ (git-ignored); new inputs go to
# fuzz/work/<t>/, crashes to fuzz/artifacts/<t>/, and the log to fuzz/work/<t>.log.
# Exit status 1 if any target found a crash, leak, timeout or out-of-memory.
#
# FUZZ_JOBS=N runs N libFuzzer workers per target (default 1: the machine is shared).
set -uo pipefail
cd "$(dirname "$0")/.."

SECONDS_PER_TARGET=${1:-60}
shift || true
ALL_TARGETS=(pdu association dimse sniff reassembly)
if [ "$#" -gt 0 ]; then
    TARGETS=("$@")
else
    TARGETS=("${ALL_TARGETS[@]}")
fi
JOBS=${FUZZ_JOBS:-1}

if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install --locked cargo-fuzz || exit 1
fi

# cargo-fuzz passes -Z flags (sanitizer, coverage instrumentation) that only a nightly
# rustc accepts; RUSTC_BOOTSTRAP=1 makes the stable toolchain accept them too.
export RUSTC_BOOTSTRAP=1

# cargo-fuzz's default build: optimized, with debug assertions, overflow checks and
# AddressSanitizer.
echo "== building the fuzz targets"
cargo fuzz build || exit 1

failed=()
summary=()
for t in "${TARGETS[@]}"; do
    work="fuzz/work/$t"
    log="fuzz/work/$t.log"
    mkdir -p "$work" "fuzz/artifacts/$t"
    echo "== $t: ${SECONDS_PER_TARGET}s"
    cargo fuzz run "$t" "$work" "fuzz/corpus/$t" -- \
        -max_total_time="$SECONDS_PER_TARGET" -max_len=8192 -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 -jobs="$JOBS" -workers="$JOBS" >"$log" 2>&1
    status=$?
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | awk '{s += $2} END {print s + 0}')
    rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | awk '{s += $2} END {print s + 0}')
    last=$(grep -E '^#[0-9]+' "$log" | tail -n 1)
    cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
    ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
    corp=$(sed -n 's/.* corp: \([0-9]*\/[0-9a-zA-Z]*\).*/\1/p' <<<"$last")
    line="$t: ${SECONDS_PER_TARGET}s, ${execs} execs (${rate}/s), cov ${cov:-?}, ft ${ft:-?}, corpus ${corp:-?}"
    if [ "$status" -ne 0 ] || grep -qE '^(==[0-9]+==ERROR|SUMMARY: libFuzzer)' "$log"; then
        failed+=("$t")
        line="$line, FAILED (see $log and fuzz/artifacts/$t/)"
        grep -E 'panicked|ERROR:|SUMMARY|Test unit written' "$log" | head -n 5
    else
        line="$line, no crash"
    fi
    echo "$line"
    summary+=("$line")
done

echo "== summary ($(date -u +%Y-%m-%dT%H:%MZ), $(git rev-parse --short HEAD 2>/dev/null || echo '?'))"
printf '%s\n' "${summary[@]}"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "findings in: ${failed[*]}"
    exit 1
fi
