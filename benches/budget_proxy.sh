#!/usr/bin/env bash
# Latency the budget adds on the request path, through the real gateway:
# the same wrk load against routeplane with
#
#   no-budget   a policy without budgets (the ledger entry is written in the background)
#   sqlite      a monthly tenant budget, `state: sqlite` (check, reserve, settle per request)
#   redis       the same budget, `state: redis` on a local redis-server
#
# with nginx as a fixed-answer upstream, at 1 and 16 connections. Everything
# on 127.0.0.1. Needs nginx, wrk and redis-server (scripts/install-test-deps.sh).
#
#   benches/budget_proxy.sh                      # builds --release, 5 s per run
#   BENCH_DURATION=10 ROUTEPLANE_BIN=target/release/routeplane benches/budget_proxy.sh
#
# Output: a Markdown table on stdout.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
duration="${BENCH_DURATION:-5}"
conns="${BENCH_CONNS:-1 16}"
port_up="${BENCH_PORT_UPSTREAM:-18281}"
port_rp="${BENCH_PORT_ROUTEPLANE:-18283}"
port_redis="${BENCH_PORT_REDIS:-18284}"

for tool in nginx wrk redis-server curl; do
    command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || {
        echo "budget_proxy.sh: \`$tool\` is missing; run scripts/install-test-deps.sh" >&2
        exit 2
    }
done
nginx_bin="$(command -v nginx || echo /usr/sbin/nginx)"
if [ -z "${ROUTEPLANE_BIN:-}" ]; then
    (cd "$root" && cargo build --release --quiet)
    ROUTEPLANE_BIN="$root/target/release/routeplane"
fi

work="$(mktemp -d /tmp/routeplane-budget-bench.XXXXXX)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
log() { printf 'budget_proxy.sh: %s\n' "$*" >&2; }

answer='{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"bench-model","choices":[{"index":0,"message":{"role":"assistant","content":"Hello from the fixed upstream."},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":7,"total_tokens":19}}'
mkdir -p "$work/up"
cat >"$work/up/nginx.conf" <<EOF
worker_processes 1;
pid $work/up/nginx.pid;
error_log $work/up/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $work/up/body;
    proxy_temp_path $work/up/proxy;
    fastcgi_temp_path $work/up/fastcgi;
    uwsgi_temp_path $work/up/uwsgi;
    scgi_temp_path $work/up/scgi;
    keepalive_requests 1000000;
    server {
        listen 127.0.0.1:$port_up;
        location = /v1/chat/completions {
            default_type application/json;
            return 200 '$answer';
        }
    }
}
EOF
"$nginx_bin" -c "$work/up/nginx.conf" -g 'daemon off;' &
pids+=("$!")
redis-server --bind 127.0.0.1 --port "$port_redis" --save "" --appendonly no --dir "$work" >/dev/null &
pids+=("$!")

policy() {
    mkdir -p "$work/$1"
    cat >"$work/$1/policy.route" <<EOF
tenant {
  monthly_budget: number = 1000000
}
provider upstream {
  region us
}
model bench-model {
  provider upstream
  kind chat
  context 128k
  max_output 1k
  price in \$0.15 out \$0.60 per 1M
  tokenizer o200k
}
classify {
  chat otherwise
}
route chat {
  candidates [bench-model] // allow(single-candidate)
}
$2
EOF
}
policy none ""
policy budget 'protect {
  budget monthly per tenant tenant.monthly_budget {
    warn at 80%
    block at 100%
  }
}'

results="$work/results.tsv"
: >"$results"
printf 'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.headers["Authorization"] = "Bearer sk-bench"\nwrk.body = %s\n' \
    "'{\"model\":\"auto\",\"max_tokens\":64,\"messages\":[{\"role\":\"user\",\"content\":\"Say hello.\"}]}'" >"$work/plain.lua"

to_us() {
    awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) m = 1; else if (v ~ /ms$/) m = 1000; else if (v ~ /s$/) m = 1000000; else m = 1; printf "%.0f", n * m }'
}

# variant NAME POLICY_DIR STATE_YAML
variant() {
    local name="$1" dir="$2" state="$3"
    cat >"$work/$name.yaml" <<EOF
listen: 127.0.0.1:$port_rp
policy: $dir
state: $state
providers:
  - name: upstream
    kind: openai
    base_url: http://127.0.0.1:$port_up/v1
tenants:
  - id: bench
    key: sk-bench
EOF
    "$ROUTEPLANE_BIN" serve --config "$work/$name.yaml" >"$work/$name.log" 2>&1 &
    local pid="$!"
    local ok=0
    for _ in $(seq 1 100); do
        if curl -sf -o /dev/null "http://127.0.0.1:$port_rp/v1/chat/completions" \
            -H 'authorization: Bearer sk-bench' -H 'content-type: application/json' \
            -d '{"model":"auto","max_tokens":64,"messages":[{"role":"user","content":"hi"}]}'; then
            ok=1; break
        fi
        sleep 0.1
    done
    if [ "$ok" != 1 ]; then log "$name did not start"; tail -n 20 "$work/$name.log" >&2; kill "$pid"; return; fi
    for c in $conns; do
        local threads=1
        [ "$c" -gt 1 ] && threads=2
        wrk -t"$threads" -c"$c" -d1s -s "$work/plain.lua" "http://127.0.0.1:$port_rp/v1/chat/completions" >/dev/null 2>&1 || true
        local out
        out="$(wrk -t"$threads" -c"$c" -d"${duration}s" --latency -s "$work/plain.lua" "http://127.0.0.1:$port_rp/v1/chat/completions" 2>&1)" || true
        local rps p50 p99 non2xx
        rps="$(awk '/^Requests\/sec/ {printf "%.0f", $2}' <<<"$out")"
        p50="$(to_us "$(awk '$1 == "50%" {print $2}' <<<"$out")")"
        p99="$(to_us "$(awk '$1 == "99%" {print $2}' <<<"$out")")"
        non2xx="$(awk '/Non-2xx/ {print $NF}' <<<"$out")"
        printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$c" "$rps" "$p50" "$p99" "${non2xx:-0}" >>"$results"
        log "$name c=$c: $rps req/s, p50 $p50 us, p99 $p99 us, non-2xx ${non2xx:-0}"
    done
    kill "$pid"
    wait "$pid" 2>/dev/null || true
}

variant no-budget "$work/none" "{ backend: memory }"
variant sqlite "$work/budget" "{ backend: sqlite, path: $work/state.db }"
variant redis "$work/budget" "{ backend: redis, url: \"redis://127.0.0.1:$port_redis/0\" }"

echo "| variant | connections | req/s | p50 | p99 | non-2xx |"
echo "|---|---|---|---|---|---|"
while IFS=$'\t' read -r name c rps p50 p99 non2xx; do
    echo "| $name | $c | $rps | ${p50} µs | ${p99} µs | $non2xx |"
done <"$results"
