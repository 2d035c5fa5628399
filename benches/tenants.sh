#!/usr/bin/env bash
# How `routeplane serve` scales with the number of tenants in its config.
#
# For each tenant count (BENCH_TENANTS, default "10 10000 100000") it writes a
# config with that many tenants (each with its own `key_sha256`) on the
# built-in mock provider (no latency), then measures:
#   - start: from launching the binary to the first `/healthz` answer (config
#     parse, policy compile, every tenant resolved against the policy);
#   - RSS after start;
#   - requests per second and median latency at 16 connections (wrk), with
#     the key of the last tenant in the file;
#   - a reload under that load: the time the reload took (from the log) and
#     the slowest request wrk saw while it ran.
#
# Needs wrk (scripts/install-test-deps.sh). Talks only to 127.0.0.1.
#   ROUTEPLANE_BIN=target/release/routeplane (else it is built)
#   BENCH_DURATION=5 (seconds of load per row)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
counts="${BENCH_TENANTS:-10 10000 100000}"
duration="${BENCH_DURATION:-5}"
port="${BENCH_PORT:-18290}"

if [ -z "${ROUTEPLANE_BIN:-}" ]; then
    (cd "$root" && cargo build --release --quiet --bin routeplane)
    ROUTEPLANE_BIN="$root/target/release/routeplane"
fi
ROUTEPLANE_BIN="$(realpath "$ROUTEPLANE_BIN")"
command -v wrk >/dev/null || { echo "wrk is missing: run scripts/install-test-deps.sh" >&2; exit 2; }

work="$(mktemp -d)"
pid=""
cleanup() {
    [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/policy"
cat >"$work/policy/policy.route" <<'EOF'
provider mock { region us }
model fast { provider mock kind chat context 128k price in $0.15 out $0.60 per 1M quality 0.7 }
model spare { provider mock kind chat context 128k price in $0.30 out $1.20 per 1M quality 0.6 }
classify { chat otherwise }
route chat { candidates [fast, spare] score 1 * quality }
EOF

now_ms() { date +%s%3N; }

echo "| tenants | config size | start ms | RSS after start | req/s @16 | median µs | reload ms | slowest request during the reload |"
echo "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
for n in $counts; do
    python3 - "$n" "$port" >"$work/gateway.yaml" <<'EOF'
import hashlib, sys
n, port = int(sys.argv[1]), sys.argv[2]
print(f"listen: 127.0.0.1:{port}\npolicy: policy\nproviders:\n  - {{ name: mock, kind: mock }}\ntenants:")
for i in range(n):
    print(f"  - id: t{i}\n    key_sha256: {hashlib.sha256(f'sk-{i}'.encode()).hexdigest()}")
EOF
    size="$(du -h "$work/gateway.yaml" | cut -f1)"
    start="$(now_ms)"
    (cd "$work" && exec "$ROUTEPLANE_BIN" serve --config gateway.yaml >"$work/serve.log" 2>&1) &
    pid="$!"
    until curl -sf -o /dev/null "http://127.0.0.1:$port/healthz"; do
        kill -0 "$pid" 2>/dev/null || { cat "$work/serve.log" >&2; exit 1; }
        sleep 0.02
    done
    started=$(( $(now_ms) - start ))
    rss="$(awk '/VmRSS/ {printf "%d MiB", $2/1024}' "/proc/$pid/status")"
    cat >"$work/post.lua" <<EOF
wrk.method = "POST"
wrk.body = '{"model":"auto","messages":[{"role":"user","content":"hi"}]}'
wrk.headers["Authorization"] = "Bearer sk-$((n - 1))"
wrk.headers["Content-Type"] = "application/json"
EOF
    out="$(wrk -t2 -c16 -d"${duration}s" --latency -s "$work/post.lua" "http://127.0.0.1:$port/v1/chat/completions")"
    rps="$(awk '/Requests\/sec/ {printf "%d", $2}' <<<"$out")"
    median="$(awk '$1 == "50%" {v=$2; if (v ~ /ms$/) {sub("ms","",v); v*=1000} else if (v ~ /us$/) {sub("us","",v)} else if (v ~ /s$/) {sub("s","",v); v*=1000000}; printf "%d", v}' <<<"$out")"
    grep -q "Non-2xx" <<<"$out" && { echo "non-2xx answers at $n tenants:" >&2; echo "$out" >&2; exit 1; }
    # A reload under load: the slowest request while the new version is built.
    wrk -t2 -c16 -d"$((duration + 2))s" -s "$work/post.lua" "http://127.0.0.1:$port/v1/chat/completions" >"$work/reload-wrk.txt" &
    wrk_pid="$!"
    sleep 1
    echo "// reload $(now_ms)" >>"$work/policy/policy.route"
    wait "$wrk_pid"
    reload_ms="$(grep "policy reloaded" "$work/serve.log" | tail -1 | sed -E 's/.*duration_ms=([0-9]+).*/\1/')"
    slowest="$(awk '/Latency/ {print $4}' "$work/reload-wrk.txt")"
    echo "| $n | $size | $started | $rss | $rps | $median | ${reload_ms:-?} | $slowest |"
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    pid=""
done
