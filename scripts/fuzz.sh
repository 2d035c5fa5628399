#!/usr/bin/env bash
# Run every fuzz target for a bounded time; fail on any crash.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#
# Needs the nightly toolchain and cargo-fuzz (installed here if missing).
# Corpora are seeded from policies/ and tests/ui/ and kept in fuzz/corpus/
# (not committed); crashes land in fuzz/artifacts/<target>/.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
seconds="${1:-30}"
shift || true
targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
    targets=(parse check_compile fmt_roundtrip decide_differential request_features sse)
fi

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz: the nightly toolchain is not installed (rustup toolchain install nightly)" >&2
    exit 2
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

seed() {
    local target="$1" dir="fuzz/corpus/$1"
    mkdir -p "$dir"
    case "$target" in
        parse|check_compile|fmt_roundtrip)
            find policies tests/ui tests/fmt -name '*.route' 2>/dev/null | while read -r f; do
                cp "$f" "$dir/$(echo "$f" | tr '/' '_')"
            done ;;
        request_features)
            find tests policies -name '*.json' 2>/dev/null | while read -r f; do
                cp "$f" "$dir/$(echo "$f" | tr '/' '_')"
            done
            printf '{"model":"auto","messages":[{"role":"user","content":"hi"}],"stream":true}' > "$dir/chat.json" ;;
        sse)
            printf 'data: {"a":1}\n\ndata: [DONE]\n\n' > "$dir/basic" ;;
        *) ;;
    esac
}

echo "fuzz: building the targets" >&2
if ! cargo +nightly fuzz build >fuzz/build.log 2>&1; then
    tail -40 fuzz/build.log >&2
    echo "fuzz: the targets do not build" >&2
    exit 1
fi
status=0
for t in "${targets[@]}"; do
    seed "$t"
    echo "fuzz: $t for ${seconds}s" >&2
    log="fuzz/$t.log"
    if cargo +nightly fuzz run "$t" "fuzz/corpus/$t" -- -max_total_time="$seconds" -max_len=65536 -timeout=10 >"$log" 2>&1; then
        runs=$(grep -Eo 'Done [0-9]+ runs' "$log" | tail -1 || true)
        echo "fuzz: $t ok (${runs:-no summary})" >&2
    else
        echo "fuzz: $t FAILED; see $log and fuzz/artifacts/$t/" >&2
        tail -40 "$log" >&2
        status=1
    fi
done
exit "$status"
