#!/usr/bin/env bash
# The whole test suite, as a newcomer and CI run it:
#   1. install what the tests need (scripts/install-test-deps.sh, idempotent);
#   2. every cargo test target (unit, UI snapshots, CLI golden tests, decision
#      tests, property tests, gateway integration, LSP, Neovim, VS Code build);
#   3. the doc tests;
#   4. a short pass of every fuzz target (ROUTEPLANE_FUZZ_SECONDS, default 15;
#      0 skips it).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -d "$HOME/.cargo/bin" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi

bash scripts/install-test-deps.sh

# The tests that drive the gateway with the official `openai` SDK use this interpreter.
export ROUTEPLANE_TEST_PYTHON="$PWD/.venv/bin/python"

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
status=0
echo "== cargo test --all-targets"
cargo test --all-targets 2>&1 | tee "$log" || status=$?
echo "== cargo test --doc"
cargo test --doc 2>&1 | tee -a "$log" || status=$?

fuzz_seconds="${ROUTEPLANE_FUZZ_SECONDS:-15}"
fuzz_status=0
if [ "$fuzz_seconds" != 0 ]; then
    echo "== fuzzing every target for ${fuzz_seconds}s"
    bash scripts/fuzz.sh "$fuzz_seconds" || fuzz_status=$?
fi

# cargo prints one `test result:` line per test binary; close with the totals
# so the run reads as what it was.
passed=$(grep -o '^test result: [A-Za-z]*\. [0-9]* passed' "$log" | awk '{s += $4} END {print s + 0}')
failed=$(grep -o '; [0-9]* failed' "$log" | awk '{s += $2} END {print s + 0}')
if [ "$fuzz_status" -ne 0 ]; then
    failed=$((failed + 1))
    echo "fuzzing found a crash (see above)" >&2
fi
echo "tests: $passed passed, $failed failed"
if [ "$status" -ne 0 ]; then
    exit "$status"
fi
if [ "$fuzz_status" -ne 0 ]; then
    exit "$fuzz_status"
fi
if [ "$passed" -eq 0 ]; then
    echo "no test ran" >&2
    exit 1
fi
