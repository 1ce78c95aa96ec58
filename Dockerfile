# One image for every party of a jacfusion-fed deployment: the owners (`owner serve`, Flower
# SuperNode), the coordinator (`coordinator serve`, Flower SuperLink, the flwr CLI) and the
# requester's CLI (`predict`, `submit`, ...). compose.yaml runs the hospital scenario with it.
#
#   scripts/build-image.sh          # what CI and the README run: the steps below, offline base
#
# or by hand, with BuildKit (Docker >= 20.10; no `# syntax` line, so no frontend is pulled):
#
#   mkdir -p build/wheels && cp /path/to/torch-*+cpu-*.whl build/wheels/   # optional, see below
#   DOCKER_BUILDKIT=1 docker build -t jacfusion-fed \
#       --secret id=pip-ca,src=/etc/ssl/certs/ca-certificates.crt .      # the secret: optional
#
# * BASE_IMAGE: any Debian-like image with python3 (3.10+) and its venv module; default the
#   usual python:3.11-slim. scripts/base-image.sh builds an equivalent from Debian's packages
#   (debootstrap + docker import) where Docker Hub is out of reach.
# * torch: the CPU build from a wheel in build/wheels/ of the build context (pip on PyPI would
#   take a multi-GB CUDA build); without one, from TORCH_INDEX_URL (PyTorch's CPU index).
# * pip-ca: a CA bundle for PyPI (a TLS-intercepting proxy's), as a BuildKit secret: it is
#   mounted for the pip commands only and never written into a layer.
# * Final stage: no compiler, no build tools, a non-root user (10001), state only under the
#   /data volume (the root filesystem may be read-only: compose.yaml runs it so), and a
#   HEALTHCHECK through gRPC health (scripts/healthcheck.py).

ARG BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------
# The dependencies as a requirements file: the install below is redone only when they change,
# not on every edit of pyproject.toml (COPY --from compares the file's content).
FROM ${BASE_IMAGE} AS requirements
COPY pyproject.toml /src/pyproject.toml
RUN python3 -c 'import tomllib; p = tomllib.load(open("/src/pyproject.toml", "rb"))["project"]; \
print("\n".join(p["dependencies"] + p["optional-dependencies"]["speech"]))' > /requirements.txt

# ---------------------------------------------------------------------------------------------
# The virtual environment with torch and every dependency (the big layer, rebuilt only when
# the dependencies change).
FROM ${BASE_IMAGE} AS deps
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_DEFAULT_TIMEOUT=120
RUN python3 -m venv /opt/jacfusion
# `pip-with-ca`: pip with the CA secret when one was given (PIP_CERT only then: pip refuses a
# missing file); pip's download cache is a BuildKit cache mount (kept between builds, no layer).
RUN printf '%s\n' '#!/bin/sh' \
        'if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi' \
        'exec /opt/jacfusion/bin/pip "$@"' > /usr/local/bin/pip-with-ca \
    && chmod 0755 /usr/local/bin/pip-with-ca

# 1. torch, CPU build: the wheel of the build context, else PyTorch's CPU index
COPY build/wheel[s]/ /wheels/
RUN --mount=type=secret,id=pip-ca --mount=type=cache,target=/root/.cache/pip \
    set -e; \
    if ls /wheels/torch-*.whl >/dev/null 2>&1; then \
        pip-with-ca install /wheels/torch-*.whl; \
    else \
        echo "no torch wheel in build/wheels/: torch from $TORCH_INDEX_URL"; \
        pip-with-ca install --index-url "$TORCH_INDEX_URL" torch; \
    fi

# 2. the dependencies (a layer that source edits do not invalidate)
COPY --from=requirements /requirements.txt /src/requirements.txt
RUN --mount=type=secret,id=pip-ca --mount=type=cache,target=/root/.cache/pip \
    pip-with-ca install -r /src/requirements.txt

# ---------------------------------------------------------------------------------------------
# The package itself as a wheel (no editable install: the image holds no source tree).
FROM deps AS wheel
COPY pyproject.toml README.md /src/
COPY jacfusion_fed /src/jacfusion_fed
COPY server /src/server
COPY clients /src/clients
RUN --mount=type=secret,id=pip-ca --mount=type=cache,target=/root/.cache/pip \
    pip-with-ca wheel --no-deps --wheel-dir /dist /src

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="jacfusion-fed" \
      org.opencontainers.image.description="Federated late fusion: owners, coordinator, CLI" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN useradd --uid 10001 --user-group --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin jacfusion \
    && install -d -o 10001 -g 10001 -m 0750 /data
COPY --from=deps /opt/jacfusion /opt/jacfusion
# the package in a small layer of its own: a source edit does not copy the environment again
RUN --mount=type=bind,from=wheel,source=/dist,target=/dist \
    PIP_DISABLE_PIP_VERSION_CHECK=1 /opt/jacfusion/bin/pip install --no-deps --no-index \
        /dist/jacfusion_fed-*.whl \
    && /opt/jacfusion/bin/jacfusion-fed --help >/dev/null
COPY scripts/healthcheck.py /opt/jacfusion/bin/jacfusion-healthcheck
# HOME, Flower's home and the data cache live in the volume; matplotlib's cache in /tmp (a tmpfs
# under compose); no .pyc written at run time (the root filesystem is read-only).
ENV PATH=/opt/jacfusion/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/data \
    FLWR_HOME=/data/.flwr \
    MPLCONFIGDIR=/tmp/matplotlib \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
# owner serve, coordinator serve, the SuperLink (Flower)
EXPOSE 50051 50060 9093
HEALTHCHECK --interval=10s --timeout=30s --start-period=60s --retries=3 \
    CMD ["jacfusion-healthcheck"]
CMD ["jacfusion-fed", "--help"]
