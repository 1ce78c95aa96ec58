#!/usr/bin/env bash
# Build the jacfusion-fed image (Dockerfile) the way this project's machines can:
#
#   scripts/build-image.sh [TAG]              (default TAG: jacfusion-fed:latest)
#
# * BASE_IMAGE: python:3.11-slim when the engine has it or can pull it; otherwise the offline
#   base that scripts/base-image.sh builds from Debian's packages (Docker Hub out of reach).
# * TORCH_WHEEL: the CPU build of torch for the build context (build/wheels/); default: the
#   torch-*+cpu-cp311 wheel in pip's find-links (`pip config list`), if there is one.
# * PIP_CA: a CA bundle for PyPI, given to the build as a BuildKit secret (never in a layer);
#   default: pip's `cert` setting (`pip config list`, PIP_CERT), if any.
# Extra arguments after `--` go to `docker build` (e.g. -- --no-cache).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/docker-lib.sh
jf_pick_docker

TAG=${1:-jacfusion-fed:latest}
shift || true
[ "${1:-}" = "--" ] && shift

pip_setting() {  # the first value pip's configuration gives `$1` (env, then files)
    python3 -m pip config list 2>/dev/null | sed -n "s/^[^.]*\.$1='\(.*\)'\$/\1/p" | head -n 1
}

if [ -z "${BASE_IMAGE:-}" ]; then
    BASE_IMAGE=python:3.11-slim
    if ! $DOCKER image inspect "$BASE_IMAGE" >/dev/null 2>&1 \
        && ! timeout 120 $DOCKER pull -q "$BASE_IMAGE" >/dev/null 2>&1; then
        BASE_IMAGE=jacfusion/python-base:3.11-bookworm
        echo "python:3.11-slim cannot be pulled here: the offline base $BASE_IMAGE"
        DOCKER=$DOCKER scripts/base-image.sh "$BASE_IMAGE"
    fi
fi

mkdir -p build/wheels
if [ -z "${TORCH_WHEEL:-}" ]; then
    for dir in ${PIP_FIND_LINKS:-} $(pip_setting find-links); do
        found=$(ls "${dir#file://}"/torch-*+cpu-cp311-*.whl 2>/dev/null | sort -V | tail -n 1 || true)
        if [ -n "$found" ]; then TORCH_WHEEL=$found; break; fi
    done
fi
rm -f build/wheels/torch-*.whl
if [ -n "${TORCH_WHEEL:-}" ]; then
    ln -f "$TORCH_WHEEL" build/wheels/ 2>/dev/null || cp "$TORCH_WHEEL" build/wheels/
    echo "torch: $(basename "$TORCH_WHEEL") in the build context"
else
    echo "torch: no local CPU wheel; the build takes it from PyTorch's CPU index"
fi

secret=()
PIP_CA=${PIP_CA:-${PIP_CERT:-$(pip_setting cert)}}
if [ -n "$PIP_CA" ]; then
    secret=(--secret "id=pip-ca,src=$PIP_CA")
    echo "pip CA bundle: $PIP_CA (a BuildKit secret)"
fi

echo "building $TAG from $BASE_IMAGE"
DOCKER_BUILDKIT=1 nice -n 10 $DOCKER build --build-arg "BASE_IMAGE=$BASE_IMAGE" \
    "${secret[@]}" -t "$TAG" "$@" .
echo "built $TAG: $($DOCKER image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1 / 1e6}')"
