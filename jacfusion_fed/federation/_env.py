"""Process environment for Flower and Ray: offline, loopback-only.

Applied where Ray or Flower start, not on import (importing the package changes no
environment variable): :func:`apply_offline_defaults` by ``run_simulation_app`` before it
imports and starts Ray, and by ``LocalDeployment``, whose children also get them through
:func:`child_env`. Both libraries read some of these variables once, at import time, so the
copies in modules already imported are patched as well:

- ``FLWR_TELEMETRY_ENABLED=0``: Flower otherwise posts an event to telemetry.flower.ai on
  every ``run_simulation`` / ``flwr run``.
- ``FLWR_DISABLE_UPDATE_CHECK=1``: the ``flower-*`` and ``flwr`` entry points otherwise
  query an update-check endpoint in a background thread.
- ``RAY_USAGE_STATS_ENABLED=0``: Ray's usage-stats reporting.
- ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``: with the default (``1`` on Linux) Ray replaces a
  node IP of ``127.0.0.1`` by the machine's routable address ("resolve_ip_for_localhost")
  and its gRPC servers listen on every interface. With ``0`` every Ray socket (GCS, raylet,
  workers, runtime-env agent) binds to 127.0.0.1 (measured with ``ss -ltnp``).
- ``RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0``: silences a FutureWarning on every ``ray.init``.
- ``RAY_ENABLE_UV_RUN_RUNTIME_ENV=0``: Ray must never try ``uv run`` for workers.

The module-level copies in ``flwr``/``ray`` modules imported earlier are patched by
`patch_imported_modules`.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

from jacfusion_fed.processes import LOOPBACK as LOOPBACK  # the address local sockets bind

OFFLINE_ENV: dict[str, str] = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
}


def patch_imported_modules() -> None:
    """Turn telemetry off / pin Ray to loopback in modules already imported."""
    telemetry = sys.modules.get("flwr.supercore.telemetry")
    if telemetry is not None and getattr(telemetry, "FLWR_TELEMETRY_ENABLED", "0") != "0":
        telemetry.FLWR_TELEMETRY_ENABLED = "0"  # type: ignore[attr-defined]
    ray_constants = sys.modules.get("ray._private.ray_constants")
    if ray_constants is not None and getattr(ray_constants, "ENABLE_RAY_CLUSTER", False):
        ray_constants.ENABLE_RAY_CLUSTER = False  # type: ignore[attr-defined]


def apply_offline_defaults() -> None:
    """Set `OFFLINE_ENV` in ``os.environ`` (inherited by every child process)."""
    os.environ.update(OFFLINE_ENV)
    patch_imported_modules()


def child_env(
    flwr_home: Path | None = None, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Environment for a ``flower-*`` / ``flwr`` child process.

    Inherits ``os.environ``, adds `OFFLINE_ENV`, puts this interpreter's ``bin`` folder
    first on ``PATH`` (SuperExec launches ``flwr-serverapp`` / ``flwr-clientapp`` by name),
    keeps loopback traffic away from any HTTP proxy, and sets ``FLWR_HOME``.
    """
    env = dict(os.environ)
    env.update(OFFLINE_ENV)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")]).rstrip(os.pathsep)
    for key in ("NO_PROXY", "no_proxy"):
        hosts = [h for h in env.get(key, "").split(",") if h]
        for host in (LOOPBACK, "localhost"):
            if host not in hosts:
                hosts.append(host)
        env[key] = ",".join(hosts)
    env["PYTHONUNBUFFERED"] = "1"
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    if extra:
        env.update(extra)
    return env


@contextlib.contextmanager
def scoped_environ(updates: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the block, then restore them."""
    saved = {key: os.environ.get(key) for key in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
