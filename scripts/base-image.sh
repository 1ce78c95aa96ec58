#!/usr/bin/env bash
# An offline stand-in for python:3.11-slim, built from Debian's own packages.
#
#   scripts/base-image.sh [TAG]        (default TAG: jacfusion/python-base:3.11-bookworm)
#
# Where Docker Hub is out of reach but Debian's archive is not (the machines this project is
# tested on), `docker build --build-arg BASE_IMAGE=TAG .` then builds the project's image from
# this base instead of the default python:3.11-slim. The base is Debian bookworm (minbase) with
# its python3 (3.11), venv and CA certificates: what the Dockerfile needs of python:3.11-slim.
# Needs root (debootstrap), debootstrap and a Docker engine. Builds nothing when TAG exists
# already (FORCE=1 rebuilds). MIRROR, SUITE choose the archive and the release.
set -euo pipefail

TAG=${1:-jacfusion/python-base:3.11-bookworm}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
DOCKER=${DOCKER:-docker}

if [ "${FORCE:-0}" != 1 ] && $DOCKER image inspect "$TAG" >/dev/null 2>&1; then
    echo "base image $TAG exists (FORCE=1 rebuilds it)"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "error: debootstrap needs root (run scripts/base-image.sh as root)" >&2
    exit 2
fi
command -v debootstrap >/dev/null || { echo "error: debootstrap not found (apt-get install debootstrap)" >&2; exit 2; }

root=$(mktemp -d "${TMPDIR:-/tmp}/jacfusion-base.XXXXXX")
trap 'rm -rf "$root"' EXIT
echo "debootstrap $SUITE from $MIRROR into $root/rootfs"
debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
    "$SUITE" "$root/rootfs" "$MIRROR" >"$root/debootstrap.log" 2>&1 \
    || { tail -20 "$root/debootstrap.log" >&2; echo "error: debootstrap failed" >&2; exit 1; }
# what python:3.11-slim leaves out as well: package lists, caches, documentation
rm -rf "$root"/rootfs/var/lib/apt/lists/* "$root"/rootfs/var/cache/apt/*.bin \
    "$root"/rootfs/var/cache/apt/archives/*.deb "$root"/rootfs/usr/share/doc/* \
    "$root"/rootfs/usr/share/man/* "$root"/rootfs/usr/share/info/* "$root"/rootfs/var/log/*
tar --numeric-owner -C "$root/rootfs" -c . | $DOCKER import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' \
    --message "debootstrap --variant=minbase $SUITE + python3 (scripts/base-image.sh)" \
    - "$TAG" >/dev/null
echo "built $TAG: $($DOCKER run --rm "$TAG" python3 --version)"
