# Sourced by the container scripts: which docker client and which compose to use.
#
# BuildKit (RUN --mount, --secret) comes with the buildx plugin in Docker >= 23 and is built
# into the client of Docker 20.10-22 (DOCKER_BUILDKIT=1). A newer client without the plugin
# cannot build with BuildKit: then Debian's client (/usr/bin/docker, docker.io) is used.
# Compose: the `docker compose` plugin, else the standalone `docker-compose` (Debian's 1.29).
# DOCKER and COMPOSE override the choice.

jf_pick_docker() {
    if [ -n "${DOCKER:-}" ]; then return 0; fi
    local candidate major
    for candidate in docker /usr/bin/docker; do
        command -v "$candidate" >/dev/null 2>&1 || continue
        if "$candidate" buildx version >/dev/null 2>&1; then DOCKER=$candidate; return 0; fi
        major=$("$candidate" --version 2>/dev/null | sed -n 's/^Docker version \([0-9]*\)\..*/\1/p')
        if [ -n "$major" ] && [ "$major" -lt 23 ]; then DOCKER=$candidate; return 0; fi
    done
    echo "error: no docker client that can build with BuildKit (install the buildx plugin)" >&2
    return 2
}

jf_pick_compose() {
    if [ -n "${COMPOSE:-}" ]; then return 0; fi
    if $DOCKER compose version >/dev/null 2>&1; then COMPOSE="$DOCKER compose"
    elif command -v docker-compose >/dev/null 2>&1; then COMPOSE=docker-compose
    else echo "error: neither \`docker compose\` nor docker-compose found" >&2; return 2
    fi
}
