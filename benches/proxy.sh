#!/usr/bin/env bash
# Proxy overhead benchmark: the same wrk load four ways in one run.
#
#   direct     wrk -> nginx (fixed answer)
#   nginx      wrk -> nginx reverse proxy -> nginx (fixed answer)   the floor for any hop
#   hyper      wrk -> examples/hyper_floor -> nginx (fixed answer)  routeplane's HTTP stack alone
#   routeplane wrk -> routeplane serve    -> nginx (fixed answer)
#
# `hyper` is a proxy built from routeplane's parts and nothing else (tokio
# runtime per core, hyper server and pooled client, no parsing or policy):
# it splits routeplane's cost into what the HTTP stack costs and what
# routing adds.
#
# at 1, 16 and 64 connections, non-streaming and streaming (SSE), reporting
# median and p99 latency, throughput, non-2xx answers, CPU time per request
# of the proxy's processes (from /proc), routeplane's idle RSS, and the time
# from saving a policy file to the new version serving (`x-routeplane-policy`).
#
# Everything listens on 127.0.0.1. Needs nginx and wrk
# (scripts/install-test-deps.sh). Usage:
#
#   benches/proxy.sh                     # builds --release, 10 s per run
#   BENCH_DURATION=5 BENCH_CONNS="1 16" benches/proxy.sh
#   ROUTEPLANE_BIN=target/release/routeplane benches/proxy.sh
#   HYPER_FLOOR_BIN=target/release/examples/hyper_floor (else it is built)
#
# Output is Markdown (tables for docs/performance.md) on stdout.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
duration="${BENCH_DURATION:-10}"
conns="${BENCH_CONNS:-1 16 64}"
modes="${BENCH_MODES:-plain stream}"
port_up="${BENCH_PORT_UPSTREAM:-18181}"
port_px="${BENCH_PORT_NGINX:-18182}"
port_rp="${BENCH_PORT_ROUTEPLANE:-18183}"
port_hf="${BENCH_PORT_HYPER:-18184}"
reloads="${BENCH_RELOADS:-10}"

for tool in nginx wrk curl; do
    command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || {
        echo "proxy.sh: \`$tool\` is missing; run scripts/install-test-deps.sh" >&2
        exit 2
    }
done
nginx_bin="$(command -v nginx || echo /usr/sbin/nginx)"

if [ -z "${ROUTEPLANE_BIN:-}" ]; then
    (cd "$root" && cargo build --release --quiet)
    ROUTEPLANE_BIN="$root/target/release/routeplane"
fi
if [ -z "${HYPER_FLOOR_BIN:-}" ]; then
    (cd "$root" && cargo build --release --quiet --example hyper_floor)
    HYPER_FLOOR_BIN="$root/target/release/examples/hyper_floor"
fi

work="$(mktemp -d /tmp/routeplane-bench.XXXXXX)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do
        kill "$p" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
log() { printf 'proxy.sh: %s\n' "$*" >&2; }

# ---------------------------------------------------------------- the fixed answers
answer='{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"bench-model","choices":[{"index":0,"message":{"role":"assistant","content":"Hello from the fixed upstream."},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":7,"total_tokens":19}}'
chunk() { printf 'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,"model":"bench-model","choices":[{"index":0,"delta":{"content":"%s"},"finish_reason":null}]}\\n\\n' "$1"; }
stream_body="$(chunk Hello)$(chunk ' from')$(chunk ' the')$(chunk ' fixed')$(chunk ' upstream.')"
stream_body+='data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,"model":"bench-model","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":7,"total_tokens":19}}\n\ndata: [DONE]\n\n'

# nginx_common PREFIX WORKERS
nginx_common() {
    cat <<EOF
worker_processes $2;
pid $1/nginx.pid;
error_log $1/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $1/body;
    proxy_temp_path $1/proxy;
    fastcgi_temp_path $1/fastcgi;
    uwsgi_temp_path $1/uwsgi;
    scgi_temp_path $1/scgi;
    client_body_buffer_size 64k;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
EOF
}

mkdir -p "$work/up" "$work/px"
{
    nginx_common "$work/up" 1
    cat <<EOF
    server {
        listen 127.0.0.1:$port_up;
        location = /v1/chat/completions {
            default_type application/json;
            return 200 '$answer';
        }
        location = /stream/v1/chat/completions {
            default_type text/event-stream;
            return 200 '$stream_body';
        }
    }
}
EOF
} >"$work/up/nginx.conf"

{
    # As many workers as cores, like routeplane's runtime: the fair throughput floor.
    nginx_common "$work/px" auto
    cat <<EOF
    upstream fixed {
        server 127.0.0.1:$port_up;
        keepalive 128;
    }
    server {
        listen 127.0.0.1:$port_px;
        location / {
            proxy_pass http://fixed;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }
    }
}
EOF
} >"$work/px/nginx.conf"

# Sets `started` to the master's pid (nginx stays in the foreground, so it is `$!`).
start_nginx() {
    "$nginx_bin" -p "$1" -c "$1/nginx.conf" -g 'daemon off;' 2>>"$1/error.log" &
    started="$!"
    pids+=("$started")
}

wait_port() {
    local i
    for i in $(seq 1 300); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    return 1
}

start_nginx "$work/up"
up_master="$started"
start_nginx "$work/px"
px_master="$started"
wait_port "$port_up" && wait_port "$port_px" || { log "nginx did not start"; cat "$work"/*/error.log >&2; exit 1; }

"$HYPER_FLOOR_BIN" "127.0.0.1:$port_hf" "http://127.0.0.1:$port_up" 2>"$work/hyper_floor.log" &
hf_pid="$!"
pids+=("$hf_pid")
hf_ok=1
wait_port "$port_hf" || { log "hyper_floor did not start; its rows are skipped"; cat "$work/hyper_floor.log" >&2; hf_ok=0; }

# ---------------------------------------------------------------- routeplane
mkdir -p "$work/policy"
cat >"$work/policy/policy.route" <<'EOF'
// The benchmark policy: one model on the fixed nginx upstream.
provider upstream {
  region us
}

provider upstream_stream {
  region us
}

model bench-model {
  provider upstream
  kind chat
  context 128k
  price in $0.15 out $0.60 per 1M
  quality 0.7
}

model bench-stream {
  provider upstream_stream
  kind chat
  context 128k
  price in $0.15 out $0.60 per 1M
  quality 0.7
}

classify {
  streaming when request.stream
  chat otherwise
}

route chat {
  candidates [bench-model]
}

route streaming {
  candidates [bench-stream]
}
EOF
cat >"$work/gateway.yaml" <<EOF
listen: 127.0.0.1:$port_rp
policy: policy
providers:
  - name: upstream
    kind: openai
    base_url: http://127.0.0.1:$port_up/v1
  - name: upstream_stream
    kind: openai
    base_url: http://127.0.0.1:$port_up/stream/v1
tenants:
  - id: bench
    key: sk-bench
EOF

"$ROUTEPLANE_BIN" serve --config "$work/gateway.yaml" >"$work/routeplane.log" 2>&1 &
rp_pid="$!"
pids+=("$rp_pid")
rp_ok=0
for _ in $(seq 1 100); do
    if ! kill -0 "$rp_pid" 2>/dev/null; then break; fi
    if curl -sf -o /dev/null "http://127.0.0.1:$port_rp/v1/chat/completions" \
        -H 'authorization: Bearer sk-bench' -H 'content-type: application/json' \
        -d '{"model":"auto","messages":[{"role":"user","content":"hi"}]}'; then
        rp_ok=1
        break
    fi
    sleep 0.1
done
rp_idle_rss_kb=""
if [ "$rp_ok" = 1 ]; then
    sleep 1
    rp_idle_rss_kb="$(awk '/^VmRSS/ {print $2}' "/proc/$rp_pid/status")"
else
    log "routeplane serve did not answer; its rows are skipped. Its log:"
    tail -n 20 "$work/routeplane.log" >&2 || true
fi

# ---------------------------------------------------------------- measuring
# CPU seconds (utime + stime, all threads) of a process and its direct children.
cpu_ticks() {
    local total=0 p t
    for p in "$1" $(pgrep -P "$1" || true); do
        t="$(awk '{sub(/.*\) /, ""); print $12 + $13}' "/proc/$p/stat" 2>/dev/null || echo 0)"
        total=$((total + t))
    done
    echo "$total"
}
clk_tck="$(getconf CLK_TCK)"

# wrk script: POST a chat completion with the tenant key.
wrk_script() {
    local stream="$1"
    cat <<EOF
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-bench"
wrk.body = '{"model":"auto","stream":$stream,"messages":[{"role":"user","content":"Say hello."}]}'
EOF
}
wrk_script false >"$work/plain.lua"
wrk_script true >"$work/stream.lua"

# Convert wrk's "245.00us" / "1.23ms" / "2.00s" to microseconds.
to_us() {
    awk -v v="$1" 'BEGIN {
        n = v + 0
        if (v ~ /us$/) m = 1; else if (v ~ /ms$/) m = 1000; else if (v ~ /m$/) m = 60000000; else if (v ~ /s$/) m = 1000000; else m = 1
        printf "%.0f", n * m
    }'
}

results="$work/results.tsv"
: >"$results"

# run NAME URL LUA CONNS PID
run() {
    local name="$1" url="$2" lua="$3" c="$4" pid="$5" threads=1 out before after reqs rps p50 p99 non2xx cpu_us
    [ "$c" -gt 1 ] && threads=2
    # Warm up connections, caches and the gateway's live stats.
    wrk -t"$threads" -c"$c" -d1s -s "$lua" "$url" >/dev/null 2>&1 || true
    before="$(cpu_ticks "$pid")"
    out="$(wrk -t"$threads" -c"$c" -d"${duration}s" --latency -s "$lua" "$url" 2>&1)" || true
    after="$(cpu_ticks "$pid")"
    reqs="$(awk '/requests in/ {print $1}' <<<"$out")"
    rps="$(awk '/^Requests\/sec/ {printf "%.0f", $2}' <<<"$out")"
    p50="$(to_us "$(awk '$1 == "50%" {print $2}' <<<"$out")")"
    p99="$(to_us "$(awk '$1 == "99%" {print $2}' <<<"$out")")"
    non2xx="$(awk '/Non-2xx/ {print $NF}' <<<"$out")"
    non2xx="${non2xx:-0}"
    errors="$(awk '/Socket errors/ {print $0}' <<<"$out" | sed 's/^ *//')"
    if [ -z "$reqs" ] || [ "$reqs" = 0 ]; then
        log "$name c=$c: no requests completed"; log "$out"; return
    fi
    cpu_us="$(awk -v a="$after" -v b="$before" -v r="$reqs" -v t="$clk_tck" 'BEGIN {printf "%.1f", (a - b) / t * 1e6 / r}')"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$c" "$rps" "$p50" "$p99" "$non2xx" "$cpu_us" "$errors" >>"$results"
    log "$name c=$c: ${rps} req/s, p50 ${p50} us, p99 ${p99} us, cpu ${cpu_us} us/req, non-2xx ${non2xx} ${errors}"
}

for mode in $modes; do
    if [ "$mode" = stream ]; then
        lua="$work/stream.lua"; path=/stream/v1/chat/completions
    else
        lua="$work/plain.lua"; path=/v1/chat/completions
    fi
    for c in $conns; do
        run "direct/$mode" "http://127.0.0.1:$port_up$path" "$lua" "$c" "$up_master"
        run "nginx/$mode" "http://127.0.0.1:$port_px$path" "$lua" "$c" "$px_master"
        if [ "$hf_ok" = 1 ]; then
            run "hyper/$mode" "http://127.0.0.1:$port_hf$path" "$lua" "$c" "$hf_pid"
        fi
        if [ "$rp_ok" = 1 ]; then
            run "routeplane/$mode" "http://127.0.0.1:$port_rp/v1/chat/completions" "$lua" "$c" "$rp_pid"
        fi
    done
done

# ---------------------------------------------------------------- hot reload latency
policy_version() {
    curl -s -o /dev/null -D - "http://127.0.0.1:$port_rp/v1/chat/completions" \
        -H 'authorization: Bearer sk-bench' -H 'content-type: application/json' \
        -d '{"model":"auto","messages":[{"role":"user","content":"hi"}]}' |
        awk 'tolower($1) == "x-routeplane-policy:" {gsub(/\r/, "", $2); print $2}'
}
reload_ms=()
if [ "$rp_ok" = 1 ]; then
    for i in $(seq 1 "$reloads"); do
        old="$(policy_version)"
        if [ -z "$old" ]; then log "no x-routeplane-policy header; skipping the reload timing"; break; fi
        t0="$(date +%s%N)"
        # A save: the editor writes the whole file again.
        printf '// saved %s\n' "$i" >>"$work/policy/policy.route"
        new="$old"
        while [ "$new" = "$old" ]; do
            if [ $(( ($(date +%s%N) - t0) / 1000000 )) -gt 10000 ]; then new=timeout; break; fi
            new="$(policy_version)"
        done
        t1="$(date +%s%N)"
        if [ "$new" = timeout ]; then log "reload $i: the new version did not serve within 10 s"; continue; fi
        reload_ms+=("$(( (t1 - t0) / 1000000 ))")
        sleep 0.5
    done
    rp_rss_after_kb="$(awk '/^VmRSS/ {print $2}' "/proc/$rp_pid/status")"
fi

# ---------------------------------------------------------------- report
median() { sort -n | awk '{a[NR] = $1} END {if (NR == 0) print "-"; else if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }

echo "## Proxy overhead ($(date -u +%Y-%m-%d), $(nproc) cores, ${duration}s per run, wrk)"
echo
echo "| target | mode | conns | req/s | median µs | p99 µs | CPU µs/req | non-2xx |"
echo "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
while IFS=$'\t' read -r name c rps p50 p99 non2xx cpu errors; do
    echo "| ${name%/*} | ${name#*/} | $c | $rps | $p50 | $p99 | $cpu | $non2xx${errors:+ ($errors)} |"
done <"$results"
echo
echo "CPU µs/req is the target's own processes (for \`direct\`, the upstream nginx)."
echo
if [ "$rp_ok" = 1 ]; then
    echo "## Added by the hop, compared with nginx"
    echo
    echo "| mode | conns | routeplane − direct median µs | nginx − direct median µs | routeplane − nginx median µs | routeplane − nginx p99 µs | CPU ratio | throughput ratio |"
    echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    awk -F'\t' '
        { split($1, nm, "/"); k = nm[2] "\t" $2; rps[nm[1], k] = $3; p50[nm[1], k] = $4; p99[nm[1], k] = $5; cpu[nm[1], k] = $7; keys[k] = 1; order[++n] = k }
        END {
            for (i = 1; i <= n; i++) {
                k = order[i]; if (seen[k]++) continue
                if (!(("routeplane", k) in rps) || !(("nginx", k) in rps)) continue
                split(k, mc, "\t")
                cr = (cpu["nginx", k] > 0) ? sprintf("%.2f×", cpu["routeplane", k] / cpu["nginx", k]) : "-"
                tr = (rps["nginx", k] > 0) ? sprintf("%.0f%%", 100 * rps["routeplane", k] / rps["nginx", k]) : "-"
                printf "| %s | %s | %d | %d | %d | %d | %s | %s |\n", mc[1], mc[2],
                    p50["routeplane", k] - p50["direct", k], p50["nginx", k] - p50["direct", k],
                    p50["routeplane", k] - p50["nginx", k], p99["routeplane", k] - p99["nginx", k], cr, tr
            }
        }' "$results"
    echo
    echo "## The HTTP stack alone (\`hyper\`) against nginx and routeplane"
    echo
    echo "| mode | conns | hyper CPU ratio to nginx | hyper throughput ratio to nginx | routeplane CPU − hyper µs/req | routeplane throughput ratio to hyper |"
    echo "| --- | ---: | ---: | ---: | ---: | ---: |"
    awk -F'\t' '
        { split($1, nm, "/"); k = nm[2] "\t" $2; rps[nm[1], k] = $3; cpu[nm[1], k] = $7; order[++n] = k }
        END {
            for (i = 1; i <= n; i++) {
                k = order[i]; if (seen[k]++) continue
                if (!(("routeplane", k) in rps) || !(("nginx", k) in rps) || !(("hyper", k) in rps)) continue
                split(k, mc, "\t")
                hc = (cpu["nginx", k] > 0) ? sprintf("%.2f×", cpu["hyper", k] / cpu["nginx", k]) : "-"
                ht = (rps["nginx", k] > 0) ? sprintf("%.0f%%", 100 * rps["hyper", k] / rps["nginx", k]) : "-"
                rt = (rps["hyper", k] > 0) ? sprintf("%.0f%%", 100 * rps["routeplane", k] / rps["hyper", k]) : "-"
                printf "| %s | %s | %s | %s | %.1f | %s |\n", mc[1], mc[2], hc, ht, cpu["routeplane", k] - cpu["hyper", k], rt
            }
        }' "$results"
    echo
    echo "## routeplane"
    echo
    echo "- idle RSS after start: $((rp_idle_rss_kb / 1024)) MiB (${rp_idle_rss_kb} kB); after the load: $((${rp_rss_after_kb:-0} / 1024)) MiB"
    if [ "${#reload_ms[@]}" -gt 0 ]; then
        echo "- policy file saved -> new version serving (${#reload_ms[@]} saves, includes the 150 ms debounce and a curl per poll): median $(printf '%s\n' "${reload_ms[@]}" | median) ms, max $(printf '%s\n' "${reload_ms[@]}" | sort -n | tail -1) ms"
    fi
else
    echo "routeplane serve did not start, so only the direct and nginx rows were measured."
fi
