"""Flower's Deployment Engine on one machine: SuperLink, SuperNodes and ``flwr run`` as
separate processes on one machine (``host``, default 127.0.0.1), TLS and SuperNode
authentication by default.

`LocalDeployment` is a context manager that owns every process it starts and stops them
all, by PID, on exit or failure (and at interpreter exit as a last resort). Each process
runs in its own session, so ``os.killpg(pid)`` also reaches the SuperExec and ClientApp
processes a SuperNode spawns; the SuperLink starts its SuperExec (and with it every
ServerApp process) in yet another session, so descendants are found through ``/proc`` and
signalled too, after checking their start time. Layout under ``run_dir``::

    superlink/          log, FLWR_HOME (installed FABs), cwd
    supernodes/<name>/  log, FLWR_HOME, cwd; one per SuperNode
    cli/                FLWR_HOME of the ``flwr`` CLI: config.toml with the connection

The pieces live in :mod:`jacfusion_fed.processes` (process groups, stopped by PID) and
:mod:`jacfusion_fed.federation.flwr_cli` (the ``flwr`` CLI with its own ``FLWR_HOME``).

Command lines it runs (paths absolute, ports free ones picked at start)::

    flower-superlink --host 127.0.0.1 --port P --disable-runtime-dependency-installation \\
        --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key \\
        --enable-supernode-auth
    FLWR_HOME=cli flwr supernode register node.pub jacfusion-local --format json
    flower-supernode --superlink 127.0.0.1:P --host 127.0.0.1 --port Q \\
        --root-certificates ca.crt --auth-supernode-private-key node.key \\
        --node-config "modality='audio' data='/data/audio'"
    FLWR_HOME=cli flwr run APP_DIR jacfusion-local --run-config "run-dir='/abs/dir'" \\
        --format json
    FLWR_HOME=cli flwr list jacfusion-local --run-id ID --format json   # until finished

with ``$FLWR_HOME/config.toml``::

    [superlink]
    default = "jacfusion-local"
    [superlink.jacfusion-local]
    address = "127.0.0.1:P"
    root-certificates = "/abs/ca.crt"      # or: insecure = true
"""

from __future__ import annotations

import atexit
import contextlib
import subprocess
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from jacfusion_fed.processes import ManagedProcess, free_port, stop_all, wait_for_port
from jacfusion_fed.rpc.bind import check_bind_host, connect_host
from jacfusion_fed.rpc.tls import TlsFiles

from ._env import LOOPBACK, apply_offline_defaults, child_env
from .config import format_config_arg, validate_config
from .flwr_cli import (
    DeploymentError,
    FlwrCli,
    RunFailedError,
    RunInfo,
    flower_executable,
)

__all__ = ["LocalDeployment", "NodeKeys", "SuperNodeHandle"]


@dataclass(frozen=True)
class NodeKeys:
    """A SuperNode's authentication key pair: EC (NIST curve, e.g. P-384) private key in
    OpenSSH format, and the public key as an OpenSSH one-liner."""

    private_key: Path
    public_key: Path

    def __post_init__(self) -> None:
        for name in ("private_key", "public_key"):
            path = Path(getattr(self, name)).expanduser().resolve()
            if not path.is_file():
                raise FileNotFoundError(f"SuperNode {name} not found: {path}")
            object.__setattr__(self, name, path)


@dataclass
class SuperNodeHandle:
    """A started SuperNode. ``node_id`` is known when its key was registered here."""

    name: str
    process: ManagedProcess
    port: int
    node_config: dict[str, Any]
    node_id: int | None
    flwr_home: Path


class LocalDeployment:
    """SuperLink + SuperNodes + ``flwr run`` on one machine; a context manager.

    ``host`` is the address every server binds (default 127.0.0.1; any address, 0.0.0.0
    included, with a warning when not loopback): the TLS certificate must name it, or
    127.0.0.1 for a wildcard (the address the SuperNodes, the CLI and the SuperExec dial).

    ``tls`` is required unless ``insecure=True``; ``node_auth`` (default on, needs TLS)
    starts the SuperLink with ``--enable-supernode-auth`` and requires `NodeKeys` for every
    SuperNode. ``task_poll_interval`` sets ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` (Flower's
    default 1 s) for the SuperExec processes, which start ServerApp/ClientApp processes.
    """

    def __init__(
        self,
        run_dir: Path | str,
        *,
        tls: TlsFiles | None = None,
        insecure: bool = False,
        node_auth: bool = True,
        task_poll_interval: float | None = 0.25,
        startup_timeout: float = 60.0,
        extra_env: Mapping[str, str] | None = None,
        host: str = LOOPBACK,
    ) -> None:
        if insecure and tls is not None:
            raise ValueError("pass either tls or insecure=True, not both")
        if not insecure and tls is None:
            raise ValueError("TLS files are required; pass insecure=True to run without TLS")
        if insecure and node_auth:
            raise ValueError("SuperNode authentication needs TLS; pass node_auth=False too")
        # Where every server binds (--host of SuperLink and SuperNodes) and the address
        # they are dialled at (loopback for 0.0.0.0); TLS certificates must name the latter.
        self.host = check_bind_host(host, what="Flower SuperLink and SuperNodes")
        self.dial_host = connect_host(self.host)
        apply_offline_defaults()
        self.run_dir = Path(run_dir).expanduser().resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.tls = tls
        self.insecure = insecure
        self.node_auth = node_auth
        self.startup_timeout = startup_timeout
        self._extra_env = dict(extra_env or {})
        if task_poll_interval is not None:
            self._extra_env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(task_poll_interval)
        self.cli_home = self.run_dir / "cli"
        self.cli = FlwrCli(self.cli_home, self._env(self.cli_home))
        self.superlink: ManagedProcess | None = None
        self.superlink_port: int | None = None
        self.supernodes: dict[str, SuperNodeHandle] = {}
        self.timings: dict[str, float] = {}
        self._procs: list[ManagedProcess] = []
        self._closed = False
        atexit.register(self.close)

    # -- context manager -------------------------------------------------------------
    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except Exception as close_exc:  # do not mask the original failure
            warnings.warn(str(close_exc), RuntimeWarning, stacklevel=2)

    def close(self) -> None:
        """Stop every process started here and everything they spawned. Idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        try:
            stop_all(list(reversed(self._procs)))
        except Exception:  # never leave a process behind: one by one, then re-raise
            for proc in self._procs:
                with contextlib.suppress(Exception):
                    proc.kill_and_reap()
            raise

    def processes(self) -> list[ManagedProcess]:
        """Every process started here, in start order (failed starts included)."""
        return list(self._procs)

    def _spawn(
        self, name: str, argv: Sequence[str], flwr_home: Path, cwd: Path, log: Path
    ) -> ManagedProcess:
        if self._closed:
            raise DeploymentError("this deployment is closed")
        proc = ManagedProcess(name, argv, env=self._env(flwr_home), cwd=cwd, log_path=log)
        self._procs.append(proc)
        return proc

    # -- helpers ---------------------------------------------------------------------
    @property
    def address(self) -> str:
        if self.superlink_port is None:
            raise DeploymentError("the SuperLink is not started")
        host = f"[{self.dial_host}]" if ":" in self.dial_host else self.dial_host
        return f"{host}:{self.superlink_port}"

    def _env(self, flwr_home: Path) -> dict[str, str]:
        flwr_home.mkdir(parents=True, exist_ok=True)
        return child_env(flwr_home, self._extra_env)

    def _ca_cert(self) -> Path:
        assert self.tls is not None
        return self.tls.ca_cert

    def _tls_client_args(self) -> list[str]:
        if self.insecure:
            return ["--insecure"]
        assert self.tls is not None
        return ["--root-certificates", str(self.tls.ca_cert)]

    def flwr_cli(
        self, args: Sequence[str], *, timeout: float = 120.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run ``flwr ARGS`` with this deployment's CLI ``FLWR_HOME`` (cwd: ``cli/``)."""
        return self.cli(args, timeout=timeout, check=check)

    def _start_listening(
        self, name: str, make_argv: Any, flwr_home: Path, cwd: Path, log_path: Path
    ) -> tuple[ManagedProcess, int]:
        """Start a server process on a free port; retry on a port clash."""
        last_log = ""
        for _attempt in range(3):
            port = free_port(self.host)
            proc = self._spawn(name, make_argv(port), flwr_home, cwd, log_path)
            try:
                if wait_for_port(proc, port, self.startup_timeout, host=self.dial_host) is None:
                    return proc, port
            except TimeoutError:
                pass
            code = proc.exit_code()
            last_log = proc.log_text(4000)
            proc.stop()
            if code is None:
                raise DeploymentError(
                    f"{name} did not listen on {self.dial_host}:{port} within "
                    f"{self.startup_timeout:.0f} s:\n{last_log}"
                )
            if "address already in use" not in last_log.lower():
                raise DeploymentError(f"{name} exited with {code} at start:\n{last_log}")
        raise DeploymentError(f"{name}: no free port after 3 tries:\n{last_log}")

    # -- SuperLink -------------------------------------------------------------------
    def start_superlink(self, *, database: Path | None = None) -> ManagedProcess:
        """Start the SuperLink (Fleet, Control and Runtime APIs on one HTTPS port)."""
        if self.superlink is not None:
            raise DeploymentError("the SuperLink is already started")
        t0 = time.perf_counter()
        base = self.run_dir / "superlink"

        def argv(port: int) -> list[str]:
            args = [
                flower_executable("flower-superlink"),
                "--host",
                self.host,
                "--port",
                str(port),
                "--disable-runtime-dependency-installation",
            ]
            if database is not None:
                args += ["--database", str(Path(database).resolve())]
            if self.insecure:
                args.append("--insecure")
            else:
                assert self.tls is not None
                args += [
                    "--ssl-ca-certfile",
                    str(self.tls.ca_cert),
                    "--ssl-certfile",
                    str(self.tls.cert),
                    "--ssl-keyfile",
                    str(self.tls.key),
                ]
            if self.node_auth:
                args.append("--enable-supernode-auth")
            return args

        self.superlink, self.superlink_port = self._start_listening(
            "superlink", argv, base / "flwr-home", base, base / "superlink.log"
        )
        self.cli.write_config(self.address, None if self.insecure else self._ca_cert())
        self.timings["superlink_start_s"] = time.perf_counter() - t0
        return self.superlink

    # -- SuperNodes ------------------------------------------------------------------
    def register_supernode(self, public_key: Path | str, *, name: str | None = None) -> int:
        """``flwr supernode register``; returns the node id the SuperNode will get."""
        return self.cli.register_supernode(public_key, name=name)

    def list_supernodes(self) -> dict[int, str]:
        """Node id -> status ("registered", "online", "offline", ...) from the SuperLink."""
        return self.cli.list_supernodes()

    def start_supernode(
        self,
        name: str,
        node_config: Mapping[str, Any],
        *,
        keys: NodeKeys | None = None,
        register: bool = True,
        max_retries: int | None = None,
        max_wait_time: float | None = None,
        wait: bool = True,
    ) -> SuperNodeHandle:
        """Start a SuperNode with its own port, ``FLWR_HOME`` and node config.

        With node auth, ``keys`` is required and, unless ``register=False`` (e.g. to
        check that an unregistered node is refused), its public key is registered first.
        ``wait`` (default) returns once its Runtime API port listens (a SuperNode that
        exits first raises `DeploymentError` with its log); ``wait=False`` returns at once,
        e.g. for a node expected to be refused (then ``handle.process.wait(timeout)``).
        """
        if self.superlink is None:
            raise DeploymentError("start the SuperLink first")
        if name in self.supernodes:
            raise ValueError(f"a SuperNode named {name!r} already exists")
        if not name or Path(name).name != name:
            raise ValueError(f"SuperNode name must be a plain folder name, got {name!r}")
        if self.node_auth and keys is None:
            raise ValueError("node authentication is on: pass keys=NodeKeys(...)")
        config = validate_config(node_config, "node_config")
        node_arg = format_config_arg(config, "node_config")
        node_id = None
        if keys is not None and register and self.node_auth:
            node_id = self.register_supernode(keys.public_key, name=name)
        base = self.run_dir / "supernodes" / name

        def argv(port: int) -> list[str]:
            args = [
                flower_executable("flower-supernode"),
                "--superlink",
                self.address,
                "--host",
                self.host,
                "--port",
                str(port),
                *self._tls_client_args(),
            ]
            if keys is not None:
                args += ["--auth-supernode-private-key", str(keys.private_key)]
            if node_arg:
                args += ["--node-config", node_arg]
            if max_retries is not None:
                args += ["--max-retries", str(max_retries)]
            if max_wait_time is not None:
                args += ["--max-wait-time", str(max_wait_time)]
            return args

        if wait:
            proc, port = self._start_listening(
                f"supernode {name}", argv, base / "flwr-home", base, base / "supernode.log"
            )
        else:
            port = free_port(self.host)
            proc = self._spawn(
                f"supernode {name}", argv(port), base / "flwr-home", base, base / "supernode.log"
            )
        handle = SuperNodeHandle(name, proc, port, dict(config), node_id, base / "flwr-home")
        self.supernodes[name] = handle
        return handle

    def wait_online(self, node_ids: Sequence[int], timeout: float = 60.0) -> None:
        """Wait until the SuperLink reports every node in ``node_ids`` as online."""
        t0 = time.perf_counter()
        deadline = time.monotonic() + timeout
        status: dict[int, str] = {}
        while time.monotonic() < deadline:
            status = self.list_supernodes()
            if all(status.get(int(n)) == "online" for n in node_ids):
                self.timings["supernodes_online_s"] = time.perf_counter() - t0
                return
            for handle in self.supernodes.values():
                if handle.node_id in node_ids and handle.process.exit_code() is not None:
                    raise DeploymentError(
                        f"supernode {handle.name} exited with {handle.process.exit_code()}:\n"
                        f"{handle.process.log_text(3000)}"
                    )
            time.sleep(0.5)
        raise DeploymentError(f"SuperNodes not online after {timeout:.0f} s: {status}")

    # -- runs ------------------------------------------------------------------------
    def submit_run(self, app_dir: Path | str, run_config: Mapping[str, Any] | None = None) -> int:
        """``flwr run APP_DIR`` against this deployment; returns the run id (see
        :meth:`FlwrCli.submit_run`)."""
        return self.cli.submit_run(app_dir, run_config)

    def run_info(self, run_id: int) -> RunInfo:
        return self.cli.run_info(run_id)

    def run_logs(self, run_id: int, timeout: float = 60.0) -> str:
        """The ServerApp's logs of a run (``flwr log ID --show``); '' if unavailable."""
        return self.cli.run_logs(run_id, timeout)

    def stop_run(self, run_id: int) -> None:
        self.cli.stop_run(run_id)

    def wait_for_run(
        self, run_id: int, timeout: float = 600.0, poll_interval: float = 1.0
    ) -> RunInfo:
        """Poll until the run finishes; raise `RunFailedError` unless it completed."""
        deadline = time.monotonic() + timeout
        info: RunInfo | None = None
        while time.monotonic() < deadline:
            info = self.run_info(run_id)
            if info.finished:
                break
            if self.superlink is not None and self.superlink.exit_code() is not None:
                raise RunFailedError(
                    f"the SuperLink exited during run {run_id}",
                    info,
                    self.superlink.log_text(4000),
                )
            time.sleep(poll_interval)
        else:
            self.stop_run(run_id)
            raise RunFailedError(
                f"run {run_id} did not finish within {timeout:.0f} s (stopped it)",
                info,
                self.run_logs(run_id),
            )
        if not info.completed:
            raise RunFailedError(
                f"run {run_id} ended with status {info.status!r} ({info.details})",
                info,
                self.run_logs(run_id),
            )
        return info

    def run_app(
        self,
        app_dir: Path | str,
        run_config: Mapping[str, Any] | None = None,
        *,
        timeout: float = 600.0,
    ) -> RunInfo:
        """Submit the app, wait until it completes; `RunFailedError` otherwise."""
        t0 = time.perf_counter()
        run_id = self.submit_run(app_dir, run_config)
        info = self.wait_for_run(run_id, timeout=timeout)
        self.timings["run_wall_s"] = time.perf_counter() - t0
        return info
