#!/usr/bin/env bash
# Run a command with a Docker engine: `scripts/with-dockerd.sh make test-containers`.
#
# An engine that already answers (`docker info`) is used as it is. Otherwise, as root: install
# Debian's engine, compose and debootstrap when missing (apt-get), start dockerd for the
# command only (its log and PID in a temporary folder), and stop it by that PID at the end,
# whatever the command's exit status (which is this script's).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$#" -eq 0 ]; then echo "usage: scripts/with-dockerd.sh COMMAND [ARG...]" >&2; exit 2; fi

if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    exec "$@"
fi
if [ "$(id -u)" != 0 ]; then
    echo "error: no Docker engine answers, and starting one needs root" >&2
    exit 2
fi
missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
if ! { docker compose version || docker-compose version; } >/dev/null 2>&1; then
    missing+=(docker-compose)
fi
if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing ${missing[*]} (apt-get)"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
fi

dir=$(mktemp -d "${TMPDIR:-/tmp}/jacfusion-dockerd.XXXXXX")
dockerd >"$dir/dockerd.log" 2>&1 &
pid=$!
stop() {
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    rm -rf "$dir"
}
trap stop EXIT
for _ in $(seq 120); do
    docker info >/dev/null 2>&1 && break
    kill -0 "$pid" 2>/dev/null || { tail -20 "$dir/dockerd.log" >&2; echo "error: dockerd exited" >&2; exit 1; }
    sleep 0.5
done
docker info >/dev/null 2>&1 || { tail -20 "$dir/dockerd.log" >&2; echo "error: dockerd did not answer in 60 s" >&2; exit 1; }
echo "dockerd started (PID $pid, $(docker version -f '{{.Server.Version}}'))"
set +e
"$@"
status=$?
set -e
exit "$status"
