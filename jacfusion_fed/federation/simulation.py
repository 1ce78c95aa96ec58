"""Run a ServerApp + ClientApp in-process with Flower's Simulation Engine (Ray backend).

Flower 1.42 has no non-deprecated in-process API: ``flwr.simulation.run_simulation`` is
deprecated (it logs a warning) in favour of ``flwr run`` against a SuperLink started with
``--simulation``, which needs a FAB, a SuperLink process, only forwards ``num_cpus`` /
``num_gpus`` / ``logging_level`` / ``log_to_driver`` to ``ray.init`` and offers no
per-node config either. ``run_simulation`` itself takes neither a run config nor node
configs: every simulated node only has ``partition-id`` and ``num-partitions``.

`run_simulation_app` therefore:

- starts Ray itself, before Flower would (Flower's ``RayBackend`` skips ``ray.init`` when
  Ray is up): address ``local``, node IP 127.0.0.1 with every Ray socket on loopback (see
  ``_env``), dashboard off, usage stats off, log to driver off, temp dir
  ``<run_dir>/ray`` (through a short symlink when that path is too long for Ray's
  107-byte AF_UNIX socket paths), workers given this process's ``sys.path``;
- wraps the ClientApp so that a simulated node sees ``node_configs[partition-id]``
  merged into ``context.node_config`` (``partition-id``/``num-partitions`` stay) and
  ``run_config`` in ``context.run_config``; wraps the ServerApp so that it sees
  ``run_config`` too. App code reads ``context.node_config["modality"]`` in simulation
  exactly as in deployment (``flower-supernode --node-config 'modality="audio"'``);
- calls the (deprecated) ``run_simulation`` with CPU-only client resources, and always
  shuts Ray down.

Simulation differs from deployment in one way app code must not rely on: ClientApps run
inside long-lived Ray actor processes, while a SuperNode starts a fresh process per
message. Keep state that must survive between messages on node-local disk (or in
``context.state``), never in module globals.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common.constant import PARTITION_ID_KEY
from flwr.serverapp import Grid, ServerApp

from ._env import LOOPBACK, apply_offline_defaults, scoped_environ
from .config import RESERVED_SIM_KEYS, ConfigValue, validate_config

__all__ = [
    "SimulatedNodeClientApp",
    "SimulationResult",
    "WithRunConfigServerApp",
    "run_simulation_app",
]

log = logging.getLogger(__name__)

# "/session_2026-01-01_00-00-00_000000_4194304/sockets/plasma_store" is 64 bytes; Ray
# refuses socket paths over 107 bytes.
_MAX_RAY_TEMP_DIR_LEN = 107 - 66


class SimulatedNodeClientApp(ClientApp):
    """A ClientApp that gives each simulated node its own node config and the run config.

    The Simulation Engine calls it with ``context.node_config = {"partition-id": i,
    "num-partitions": n}``; the wrapped app sees ``{**that, **node_configs[i]}`` and
    ``{**context.run_config, **run_config}``. Both are restored after the call (Flower
    refuses a ClientApp that changes ``run_config``). Picklable, as Ray requires.
    """

    def __init__(
        self,
        inner: ClientApp,
        node_configs: Sequence[Mapping[str, ConfigValue]],
        run_config: Mapping[str, ConfigValue] | None = None,
    ) -> None:
        super().__init__()
        self._inner = inner
        self._node_configs = [dict(c) for c in node_configs]
        self._run_config = dict(run_config or {})

    def __call__(self, message: Message, context: Context) -> Message:
        partition = int(context.node_config[PARTITION_ID_KEY])
        if not 0 <= partition < len(self._node_configs):
            raise RuntimeError(
                f"simulated node with partition-id {partition} has no node config "
                f"({len(self._node_configs)} given)"
            )
        saved_node, saved_run = context.node_config, context.run_config
        context.node_config = {**saved_node, **self._node_configs[partition]}
        context.run_config = {**saved_run, **self._run_config}
        try:
            return self._inner(message, context)
        finally:
            context.node_config, context.run_config = saved_node, saved_run


class WithRunConfigServerApp(ServerApp):
    """A ServerApp that runs ``inner`` with ``run_config`` merged into its context.

    Keeps the last context it ran with in ``last_context`` (same process: simulation only).
    """

    def __init__(self, inner: ServerApp, run_config: Mapping[str, ConfigValue]) -> None:
        super().__init__()
        self._inner = inner
        self._run_config = dict(run_config)
        self.last_context: Context | None = None

    def __call__(self, grid: Grid, context: Context) -> None:
        context.run_config = {**context.run_config, **self._run_config}
        self.last_context = context
        self._inner(grid, context)


@dataclass(frozen=True)
class SimulationResult:
    """What a finished simulation leaves behind (results: see ``federation.results``)."""

    run_dir: Path
    ray_temp_dir: Path
    num_supernodes: int
    ray_start_s: float
    run_s: float
    wall_s: float
    server_context: Context | None


class _DropRunSimulationDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not ("run_simulation" in msg and "deprecated" in msg.lower())


@contextlib.contextmanager
def _short_path(target: Path) -> Iterator[Path]:
    """``target`` itself, or a short symlink to it for Ray's AF_UNIX path limit."""
    target.mkdir(parents=True, exist_ok=True)
    if len(str(target)) <= _MAX_RAY_TEMP_DIR_LEN:
        yield target
        return
    base = Path("/tmp") if Path("/tmp").is_dir() else Path(tempfile.gettempdir())
    link = base / f"jfray-{secrets.token_hex(4)}"
    if len(str(link)) > _MAX_RAY_TEMP_DIR_LEN:
        raise OSError(f"no short enough temp folder for Ray sockets (tried {link})")
    link.symlink_to(target, target_is_directory=True)
    try:
        yield link
    finally:
        link.unlink(missing_ok=True)


def _expand_node_configs(
    num_supernodes: int, node_configs: Sequence[Mapping[str, Any]] | None
) -> list[dict[str, ConfigValue]]:
    if node_configs is None:
        return [{} for _ in range(num_supernodes)]
    if len(node_configs) != num_supernodes:
        raise ValueError(
            f"node_configs has {len(node_configs)} entries for {num_supernodes} supernodes"
        )
    out = []
    for i, cfg in enumerate(node_configs):
        checked = validate_config(cfg, f"node_configs[{i}]")
        clash = RESERVED_SIM_KEYS & set(checked)
        if clash:
            raise ValueError(
                f"node_configs[{i}] sets {sorted(clash)}, which the Simulation Engine owns"
            )
        out.append(checked)
    return out


def run_simulation_app(
    server_app: ServerApp,
    client_app: ClientApp,
    num_supernodes: int,
    node_configs: Sequence[Mapping[str, Any]] | None,
    run_config: Mapping[str, Any] | None,
    run_dir: Path | str,
    *,
    client_num_cpus: float = 1.0,
    ray_num_cpus: int | None = None,
    verbose: bool = False,
) -> SimulationResult:
    """Run ``server_app`` against ``num_supernodes`` simulated nodes; block until done.

    ``node_configs[i]`` is merged into the node config of the node with ``partition-id``
    ``i`` (so ``len(node_configs) == num_supernodes``); ``run_config`` is what both apps
    see as ``context.run_config``. Ray's temp dir is ``<run_dir>/ray``, Flower's home
    ``<run_dir>/flwr-home``. Client resources: ``client_num_cpus`` CPUs, no GPU; Ray gets
    ``ray_num_cpus`` CPUs (default: all), so ``ray_num_cpus // client_num_cpus`` ClientApps
    run at once.

    Raises whatever the ServerApp raised (re-raised by Flower from its thread), and
    ``RuntimeError`` if Ray is already initialized in this process or does not bind to
    loopback.
    """
    t_wall = time.perf_counter()
    if num_supernodes < 1:
        raise ValueError(f"num_supernodes must be >= 1, got {num_supernodes}")
    if client_num_cpus <= 0:
        raise ValueError("client_num_cpus must be > 0")
    per_node = _expand_node_configs(num_supernodes, node_configs)
    run_cfg = validate_config(run_config or {}, "run_config")
    run_dir = Path(run_dir).expanduser().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    ray_dir = run_dir / "ray"
    flwr_home = run_dir / "flwr-home"
    flwr_home.mkdir(exist_ok=True)

    apply_offline_defaults()
    import ray
    from flwr.simulation import run_simulation

    if ray.is_initialized():
        raise RuntimeError(
            "Ray is already initialized in this process; run_simulation_app must start it "
            "itself (loopback, temp dir in the run dir). Call ray.shutdown() first."
        )

    wrapped_server = WithRunConfigServerApp(server_app, run_cfg)
    wrapped_client = SimulatedNodeClientApp(client_app, per_node, run_cfg)
    pythonpath = os.pathsep.join([p for p in sys.path if p] + [os.environ.get("PYTHONPATH", "")])
    flwr_logger = logging.getLogger("flwr")
    log_filter = _DropRunSimulationDeprecation()

    with (
        scoped_environ({"FLWR_HOME": str(flwr_home)}),
        _short_path(ray_dir) as ray_temp,
    ):
        t0 = time.perf_counter()
        try:
            ray.init(
                address="local",
                _node_ip_address=LOOPBACK,
                _temp_dir=str(ray_temp),
                include_dashboard=False,
                log_to_driver=verbose,
                num_cpus=ray_num_cpus or os.cpu_count() or 1,
                num_gpus=0,
                logging_level=logging.INFO if verbose else logging.WARNING,
                runtime_env={"env_vars": {"PYTHONPATH": pythonpath.rstrip(os.pathsep)}},
            )
            node_ip = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
            if node_ip != LOOPBACK:
                raise RuntimeError(f"Ray bound to {node_ip}, not {LOOPBACK}")
            ray_start_s = time.perf_counter() - t0
            log.info("Ray started in %.2f s (temp dir %s)", ray_start_s, ray_dir)

            flwr_logger.addFilter(log_filter)
            t1 = time.perf_counter()
            run_simulation(
                server_app=wrapped_server,
                client_app=wrapped_client,
                num_supernodes=num_supernodes,
                backend_config={"client_resources": {"num_cpus": client_num_cpus, "num_gpus": 0.0}},
                verbose_logging=verbose,
            )
            run_s = time.perf_counter() - t1
        finally:
            flwr_logger.removeFilter(log_filter)
            if ray.is_initialized():
                ray.shutdown()

    return SimulationResult(
        run_dir=run_dir,
        ray_temp_dir=ray_dir,
        num_supernodes=num_supernodes,
        ray_start_s=ray_start_s,
        run_s=run_s,
        wall_s=time.perf_counter() - t_wall,
        server_context=wrapped_server.last_context,
    )
