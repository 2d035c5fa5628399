#!/usr/bin/env bash
# Install what the test suite and benches need, from Debian's packages and PyPI only.
#
# Idempotent and fast when everything is there: each tool is probed first and
# apt/pip are only called for what is missing. Runs as root on a fresh Debian
# machine (CI) or as a developer with sudo.
#
#   nginx         fixed-answer upstream and the reverse-proxy floor (benches/proxy.sh)
#   wrk           load generator (benches/proxy.sh)
#   promtool      `promtool check metrics` on GET /metrics (Debian ships it in `prometheus`)
#   redis-server  the shared-state backend tests
#   nvim          the language-server smoke test
#   .venv/        a local virtualenv with the official `openai` Python SDK
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"

log() { printf 'install-test-deps: %s\n' "$*" >&2; }

sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then
    sudo_cmd=(sudo)
fi

# binary -> Debian package
declare -A want=(
    [nginx]=nginx
    [wrk]=wrk
    [promtool]=prometheus
    [redis-server]=redis-server
    [nvim]=neovim
)

missing=()
for bin in "${!want[@]}"; do
    if ! command -v "$bin" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$bin" ] && [ ! -x "/usr/bin/$bin" ]; then
        missing+=("${want[$bin]}")
    fi
done
# The venv module is a separate Debian package on a bare system.
if ! /usr/bin/python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    missing+=(python3-venv)
fi

if [ "${#missing[@]}" -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Packages like nginx, redis and prometheus start a daemon on install; the
    # tests start their own instances on 127.0.0.1, so keep the system ones off.
    # policy-rc.d is the Debian mechanism for that; only ours is removed again.
    policy=/usr/sbin/policy-rc.d
    placed_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | "${sudo_cmd[@]}" tee "$policy" >/dev/null
        "${sudo_cmd[@]}" chmod 755 "$policy"
        placed_policy=1
    fi
    cleanup() { if [ "$placed_policy" = 1 ]; then "${sudo_cmd[@]}" rm -f "$policy"; fi; }
    trap cleanup EXIT
    # Update the lists only when they are missing or the install cannot find a package.
    if [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v -e lock -e partial || true)" ]; then
        "${sudo_cmd[@]}" apt-get update -qq
    fi
    if ! "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
        "${sudo_cmd[@]}" apt-get update -qq
        "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    cleanup
    trap - EXIT
else
    log "Debian packages already present"
fi

# Daemons that an install may have started anyway (no policy-rc.d honoured) would
# hold port 80/6379/9090; the tests never use those ports, so they are left alone.

if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import openai' >/dev/null 2>&1; then
    log "python venv with openai already present"
else
    log "creating $venv with the openai SDK"
    /usr/bin/python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check openai
fi

for bin in nginx wrk promtool redis-server nvim; do
    command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || { log "missing after install: $bin"; exit 1; }
done
log "ok"
