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
import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - flwr depends on tomli
    import tomli as tomllib

from ._env import LOOPBACK, apply_offline_defaults, child_env
from .config import format_config_arg, validate_config

__all__ = [
    "CONNECTION_NAME",
    "DeploymentError",
    "FlwrCliError",
    "LocalDeployment",
    "ManagedProcess",
    "NodeKeys",
    "RunFailedError",
    "RunInfo",
    "SuperNodeHandle",
    "TlsFiles",
    "flower_executable",
    "free_port",
    "stop_all",
]

CONNECTION_NAME = "jacfusion-local"
_RUN_FINISHED_PREFIX = "finished"
_RUN_COMPLETED = "finished:completed"


class DeploymentError(RuntimeError):
    """A deployment process did not start, or stopped when it should not have."""


class FlwrCliError(DeploymentError):
    """A ``flwr`` CLI command failed."""

    def __init__(
        self,
        argv: Sequence[str],
        returncode: int,
        stdout: str,
        stderr: str,
        error_message: str | None = None,
    ):
        self.argv, self.returncode = list(argv), returncode
        self.stdout, self.stderr = stdout, stderr
        self.error_message = error_message
        if error_message is not None:  # `--format json` reports failures with exit code 0
            super().__init__(f"`{' '.join(argv)}` failed: {error_message}")
        else:
            tail = (stderr.strip() or stdout.strip())[-3000:]
            super().__init__(f"`{' '.join(argv)}` exited with {returncode}:\n{tail}")


@dataclass(frozen=True)
class RunInfo:
    """A run's state as ``flwr list --run-id`` reports it."""

    run_id: int
    status: str  # e.g. "running", "finished:completed", "finished:failed"
    details: str
    elapsed_s: float
    raw: dict[str, Any] = field(repr=False, compare=False)

    @property
    def finished(self) -> bool:
        return self.status.startswith(_RUN_FINISHED_PREFIX)

    @property
    def completed(self) -> bool:
        return self.status == _RUN_COMPLETED


class RunFailedError(DeploymentError):
    """A run finished without completing, or did not finish in time."""

    def __init__(self, message: str, info: RunInfo | None, logs: str):
        self.info, self.logs = info, logs
        super().__init__(f"{message}\n--- run logs (tail) ---\n{logs[-4000:]}")


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: the CA that signed the SuperLink certificate, the certificate (SANs
    must cover 127.0.0.1 / localhost) and its unencrypted private key."""

    ca_cert: Path
    server_cert: Path
    server_key: Path

    def __post_init__(self) -> None:
        for name in ("ca_cert", "server_cert", "server_key"):
            path = Path(getattr(self, name)).expanduser().resolve()
            if not path.is_file():
                raise FileNotFoundError(f"TLS {name} not found: {path}")
            object.__setattr__(self, name, path)


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


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port free on ``host`` right now (start-up retries cover the race)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_open(port: int, host: str = LOOPBACK) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def flower_executable(name: str) -> str:
    """``flower-superlink`` etc. from this interpreter's ``bin`` folder."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    raise FileNotFoundError(
        f"{name} not found next to {sys.executable}; install flwr in this environment"
    )


class ManagedProcess:
    """A child process in its own session (process group id == pid), logging to a file.

    `stop` signals the whole group (the process and everything it spawned, e.g. SuperExec
    and ClientApp processes) by that id: SIGTERM, then SIGKILL after ``grace`` seconds.
    The leader is only reaped after that, so its id cannot be reused in between.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: Path,
        log_path: Path,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        cwd.mkdir(parents=True, exist_ok=True)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log_fh:
            log_fh.write(f"$ {' '.join(self.argv)}\n".encode())
            log_fh.flush()
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                cwd=str(cwd),
                env=dict(env),
                start_new_session=True,
            )
        self.pid = self._popen.pid

    def exit_code(self) -> int | None:
        """The exit status if the process has exited, without reaping it."""
        if self._popen.returncode is not None:
            return self._popen.returncode
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return self._popen.poll()
        if info is None:
            return None
        if info.si_code == os.CLD_EXITED:
            return int(info.si_status)
        return -int(info.si_status)

    def is_running(self) -> bool:
        return self.exit_code() is None

    def wait(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` s for the process to exit; its exit status or None."""
        deadline = time.monotonic() + timeout
        while True:
            code = self.exit_code()
            if code is not None or time.monotonic() >= deadline:
                return code
            time.sleep(0.1)

    def log_text(self, max_chars: int | None = None) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        return text if max_chars is None else text[-max_chars:]

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def terminate(self) -> None:
        """SIGTERM to the whole group (no-op once the leader has been reaped)."""
        if self._popen.returncode is None:
            self._signal_group(signal.SIGTERM)

    def kill_and_reap(self) -> int | None:
        """SIGKILL to whatever is left of the group, then reap the leader.

        The unreaped leader keeps the group id reserved until here, so the signal reaches
        only our group.
        """
        if self._popen.returncode is not None:
            return self._popen.returncode
        self._signal_group(signal.SIGKILL)
        try:
            return self._popen.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL'd, cannot hang
            return None

    def stop(self, grace: float = 10.0) -> int | None:
        """Stop the process group; return the leader's exit status."""
        return stop_all([self], grace)[0]

    def __repr__(self) -> str:
        return f"ManagedProcess({self.name!r}, pid={self.pid}, exit={self.exit_code()})"


def _proc_stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, pgid, start time) from /proc; None if gone or not on Linux."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[2]), int(fields[19])


def _descendants(root: int) -> dict[int, tuple[int, int]]:
    """Every live process below ``root``: pid -> (pgid, start time). Linux only."""
    children: dict[int, list[int]] = {}
    stats: dict[int, tuple[str, int, int, int]] = {}
    with contextlib.suppress(OSError):
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and (st := _proc_stat(int(entry.name))) is not None:
                stats[int(entry.name)] = st
                children.setdefault(st[1], []).append(int(entry.name))
    out: dict[int, tuple[int, int]] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if pid not in out and stats[pid][0] != "Z":
            out[pid] = (stats[pid][2], stats[pid][3])
            todo.extend(children.get(pid, []))
    return out


def _signal_descendants(found: dict[int, tuple[int, int]], leaders: set[int], sig: int) -> None:
    """Signal processes found below our leaders that left our process groups (Flower's
    SuperLink starts its SuperExec in a new session; ServerApps run in that one), by pid
    or, for a group leader, by its group; only if still the same process (start time)."""
    for pid, (pgid, started) in found.items():
        st = _proc_stat(pid)
        if st is None or st[0] == "Z" or st[3] != started or pgid in leaders:
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if pgid == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)


def stop_all(procs: Sequence[ManagedProcess], grace: float = 10.0) -> list[int | None]:
    """Stop several processes at once, with everything they spawned: SIGTERM to their
    groups (and to descendants in other groups), wait up to ``grace`` s for the leaders,
    0.5 s more for the rest, then SIGKILL the same set and reap the leaders."""
    live = [p for p in procs if p._popen.returncode is None]
    leaders = {p.pid for p in live}
    found: dict[int, tuple[int, int]] = {}
    for proc in live:
        found.update(_descendants(proc.pid))
    for proc in live:
        proc.terminate()
    _signal_descendants(found, leaders, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in live:
        proc.wait(max(0.0, deadline - time.monotonic()))
    if live:
        time.sleep(0.5)
    _signal_descendants(found, leaders, signal.SIGKILL)
    return [proc.kill_and_reap() for proc in procs]


@dataclass
class SuperNodeHandle:
    """A started SuperNode. ``node_id`` is known when its key was registered here."""

    name: str
    process: ManagedProcess
    port: int
    node_config: dict[str, Any]
    node_id: int | None
    flwr_home: Path


def _parse_json_output(text: str) -> Any:
    """The JSON document in a ``--format json`` output (ignoring any lines around it)."""
    decoder = json.JSONDecoder()
    for i, ch in enumerate(text):
        if ch in "{[" and (i == 0 or text[i - 1] == "\n"):
            with contextlib.suppress(json.JSONDecodeError):
                return decoder.raw_decode(text[i:])[0]
    raise ValueError(f"no JSON document in output:\n{text[-2000:]}")


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
        from jacfusion_fed.rpc.bind import check_bind_host, connect_host

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

    def _tls_client_args(self) -> list[str]:
        if self.insecure:
            return ["--insecure"]
        assert self.tls is not None
        return ["--root-certificates", str(self.tls.ca_cert)]

    def flwr_cli(
        self, args: Sequence[str], *, timeout: float = 120.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run ``flwr ARGS`` with this deployment's CLI ``FLWR_HOME`` (cwd: ``cli/``)."""
        argv = [flower_executable("flwr"), *args]
        proc = subprocess.run(
            argv,
            cwd=str(self.cli_home),
            env=self._env(self.cli_home),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise FlwrCliError(argv, proc.returncode, proc.stdout, proc.stderr)
        return proc

    def _flwr_json(self, args: Sequence[str], timeout: float = 120.0) -> Any:
        proc = self.flwr_cli([*args, "--format", "json"], timeout=timeout)
        data = _parse_json_output(proc.stdout)
        if isinstance(data, dict) and data.get("success") is False:
            message = str(data.get("error-message") or data)
            raise FlwrCliError(["flwr", *args], proc.returncode, proc.stdout, proc.stderr, message)
        return data

    def _write_cli_config(self) -> None:
        lines = [
            "[superlink]",
            f'default = "{CONNECTION_NAME}"',
            "",
            f"[superlink.{CONNECTION_NAME}]",
            f'address = "{self.address}"',
        ]
        if self.insecure:
            lines.append("insecure = true")
        else:
            assert self.tls is not None
            lines.append(f"root-certificates = {json.dumps(str(self.tls.ca_cert))}")
        self.cli_home.mkdir(parents=True, exist_ok=True)
        (self.cli_home / "config.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")

    def _start_listening(
        self, name: str, make_argv: Any, flwr_home: Path, cwd: Path, log_path: Path
    ) -> tuple[ManagedProcess, int]:
        """Start a server process on a free port; retry on a port clash."""
        last_log = ""
        for _attempt in range(3):
            port = free_port(self.host)
            proc = self._spawn(name, make_argv(port), flwr_home, cwd, log_path)
            deadline = time.monotonic() + self.startup_timeout
            while time.monotonic() < deadline:
                if proc.exit_code() is not None:
                    break
                if _port_open(port, self.dial_host):
                    return proc, port
                time.sleep(0.2)
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
                    str(self.tls.server_cert),
                    "--ssl-keyfile",
                    str(self.tls.server_key),
                ]
            if self.node_auth:
                args.append("--enable-supernode-auth")
            return args

        self.superlink, self.superlink_port = self._start_listening(
            "superlink", argv, base / "flwr-home", base, base / "superlink.log"
        )
        self._write_cli_config()
        self.timings["superlink_start_s"] = time.perf_counter() - t0
        return self.superlink

    # -- SuperNodes ------------------------------------------------------------------
    def register_supernode(self, public_key: Path | str, *, name: str | None = None) -> int:
        """``flwr supernode register``; returns the node id the SuperNode will get."""
        args = ["supernode", "register", str(Path(public_key).resolve()), CONNECTION_NAME]
        if name:
            args += ["--name", name]
        data = self._flwr_json(args)
        try:
            return int(data["node-id"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DeploymentError(f"unexpected `flwr supernode register` output: {data}") from exc

    def list_supernodes(self) -> dict[int, str]:
        """Node id -> status ("registered", "online", "offline", ...) from the SuperLink."""
        data = self._flwr_json(["supernode", "list", CONNECTION_NAME])
        return {int(n["node-id"]): str(n["status"]) for n in data.get("nodes", [])}

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
        """``flwr run APP_DIR`` against this deployment; returns the run id.

        Refuses an app whose ``pyproject.toml`` still has ``[tool.flwr.federations]``:
        ``flwr run`` would rewrite that file (comment the section out, "migration").
        """
        app = Path(app_dir).expanduser().resolve()
        pyproject = app / "pyproject.toml"
        if not pyproject.is_file():
            raise FileNotFoundError(f"no pyproject.toml in Flower app folder {app}")
        with pyproject.open("rb") as fh:
            project = tomllib.load(fh)
        if "federations" in project.get("tool", {}).get("flwr", {}):
            raise DeploymentError(
                f"{pyproject} has [tool.flwr.federations]: `flwr run` would rewrite that "
                "file to migrate it; remove the section (connections live in "
                "$FLWR_HOME/config.toml now)"
            )
        args = ["run", str(app), CONNECTION_NAME]
        if run_config:
            args += ["--run-config", format_config_arg(run_config, "run_config")]
        data = self._flwr_json(args)
        if not isinstance(data, dict) or not data.get("run-id"):
            raise DeploymentError(f"unexpected `flwr run` output: {data}")
        return int(data["run-id"])

    def run_info(self, run_id: int) -> RunInfo:
        data = self._flwr_json(["list", CONNECTION_NAME, "--run-id", str(run_id)])
        runs = [r for r in data.get("runs", []) if int(r.get("run-id", -1)) == run_id]
        if not runs:
            raise DeploymentError(f"run {run_id} unknown to the SuperLink: {data}")
        run = runs[0]
        return RunInfo(
            run_id=run_id,
            status=str(run.get("status", "")),
            details=str(run.get("status-details", "")),
            elapsed_s=float(run.get("elapsed", 0.0) or 0.0),
            raw=run,
        )

    def run_logs(self, run_id: int, timeout: float = 60.0) -> str:
        """The ServerApp's logs of a run (``flwr log ID --show``); '' if unavailable."""
        try:
            proc = self.flwr_cli(
                ["log", str(run_id), CONNECTION_NAME, "--show"], timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            return ""
        return proc.stdout + proc.stderr

    def stop_run(self, run_id: int) -> None:
        self.flwr_cli(["stop", str(run_id), CONNECTION_NAME], check=False)

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
