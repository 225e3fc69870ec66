#!/usr/bin/env bash
# The whole test suite on a fresh machine: system packages, the Rust build, Python
# dependencies, lints, Rust unit tests, then pytest (unit and end-to-end).
set -euo pipefail
cd "$(dirname "$0")/.."

# dcmtk provides the real peers (storescu, echoscu, dcmdump) the end-to-end tests use.
if [ ! -x /usr/bin/storescu ] || [ ! -x /usr/bin/dcmdump ] || [ ! -x /usr/bin/echoscu ]; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dcmtk >/dev/null
fi

VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
# pynetdicom installs console scripts named storescp/storescu/echoscu: install it
# first, then the project, and call every tool by an unambiguous path in the tests.
"$PY" -m pip install -q --disable-pip-version-check "pynetdicom>=2.1" "pydicom>=3.0"
"$PY" -m pip install -q --disable-pip-version-check ".[test]"

echo "== rust: fmt, clippy, unit tests"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# Each test binary's summary line; the whole output when a test fails.
cargo_tests() {
    local log
    log=$(mktemp)
    if cargo test -q "$@" >"$log" 2>&1; then
        grep -E '^test result' "$log"
        rm -f "$log"
    else
        cat "$log"
        rm -f "$log"
        return 1
    fi
}
cargo_tests --workspace
echo "== fuzz: replay the committed seeds and past findings (no libFuzzer)"
cargo_tests --manifest-path fuzz/Cargo.toml

echo "== python: ruff, mypy"
"$VENV/bin/ruff" check python tests benchmarks
"$VENV/bin/ruff" format --check python tests benchmarks
"$VENV/bin/mypy" --strict python/storescp

echo "== micro benchmarks, each case run once to check its result"
"$PY" -m pytest -q -p no:cacheprovider benchmarks/test_micro.py --benchmark-disable

echo "== pytest"
"$PY" -m pytest -q -p no:cacheprovider "$@"
