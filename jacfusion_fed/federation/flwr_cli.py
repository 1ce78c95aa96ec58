"""The ``flwr`` command line as a Python object: one connection, its own ``FLWR_HOME``.

:class:`FlwrCli` writes ``$FLWR_HOME/config.toml`` with one connection
(:data:`CONNECTION_NAME`) and runs ``flwr`` sub-commands against it with ``--format json``::

    [superlink]
    default = "jacfusion-local"
    [superlink.jacfusion-local]
    address = "127.0.0.1:P"
    root-certificates = "/abs/ca.crt"      # or: insecure = true

    FLWR_HOME=cli flwr supernode register node.pub jacfusion-local --format json
    FLWR_HOME=cli flwr run APP_DIR jacfusion-local --run-config "run-dir='/abs/dir'" \\
        --format json
    FLWR_HOME=cli flwr list jacfusion-local --run-id ID --format json   # until finished
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - flwr depends on tomli
    import tomli as tomllib

from jacfusion_fed.atomicio import atomic_write_bytes

from .config import format_config_arg

__all__ = [
    "CONNECTION_NAME",
    "DeploymentError",
    "FlwrCli",
    "FlwrCliError",
    "RunFailedError",
    "RunInfo",
    "flower_executable",
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


def flower_executable(name: str) -> str:
    """``flower-superlink`` etc. from this interpreter's ``bin`` folder."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    raise FileNotFoundError(
        f"{name} not found next to {sys.executable}; install flwr in this environment"
    )


def _parse_json_output(text: str) -> Any:
    """The JSON document in a ``--format json`` output (ignoring any lines around it)."""
    decoder = json.JSONDecoder()
    for i, ch in enumerate(text):
        if ch in "{[" and (i == 0 or text[i - 1] == "\n"):
            with contextlib.suppress(json.JSONDecodeError):
                return decoder.raw_decode(text[i:])[0]
    raise ValueError(f"no JSON document in output:\n{text[-2000:]}")


class FlwrCli:
    """``flwr`` with ``FLWR_HOME=home`` (also its working directory) and environment ``env``."""

    def __init__(self, home: Path, env: Mapping[str, str]) -> None:
        self.home = Path(home)
        self.env = dict(env)

    def write_config(self, address: str, ca_cert: Path | None) -> Path:
        """``config.toml`` with the one connection; ``ca_cert=None``: insecure."""
        lines = [
            "[superlink]",
            f'default = "{CONNECTION_NAME}"',
            "",
            f"[superlink.{CONNECTION_NAME}]",
            f'address = "{address}"',
        ]
        if ca_cert is None:
            lines.append("insecure = true")
        else:
            lines.append(f"root-certificates = {json.dumps(str(ca_cert))}")
        path = self.home / "config.toml"
        atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("utf-8"))
        return path

    def __call__(
        self, args: Sequence[str], *, timeout: float = 120.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run ``flwr ARGS``; `FlwrCliError` on a non-zero exit when ``check``."""
        argv = [flower_executable("flwr"), *args]
        self.home.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            argv,
            cwd=str(self.home),
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise FlwrCliError(argv, proc.returncode, proc.stdout, proc.stderr)
        return proc

    def json(self, args: Sequence[str], timeout: float = 120.0) -> Any:
        """``flwr ARGS --format json``, parsed; `FlwrCliError` when it reports a failure."""
        proc = self([*args, "--format", "json"], timeout=timeout)
        data = _parse_json_output(proc.stdout)
        if isinstance(data, dict) and data.get("success") is False:
            message = str(data.get("error-message") or data)
            raise FlwrCliError(["flwr", *args], proc.returncode, proc.stdout, proc.stderr, message)
        return data

    # -- SuperNodes ------------------------------------------------------------------
    def register_supernode(self, public_key: Path | str, *, name: str | None = None) -> int:
        """``flwr supernode register``; returns the node id the SuperNode will get."""
        args = ["supernode", "register", str(Path(public_key).resolve()), CONNECTION_NAME]
        if name:
            args += ["--name", name]
        data = self.json(args)
        try:
            return int(data["node-id"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DeploymentError(f"unexpected `flwr supernode register` output: {data}") from exc

    def list_supernodes(self) -> dict[int, str]:
        """Node id -> status ("registered", "online", "offline", ...) from the SuperLink."""
        data = self.json(["supernode", "list", CONNECTION_NAME])
        return {int(n["node-id"]): str(n["status"]) for n in data.get("nodes", [])}

    # -- runs ------------------------------------------------------------------------
    def submit_run(self, app_dir: Path | str, run_config: Mapping[str, Any] | None = None) -> int:
        """``flwr run APP_DIR``; returns the run id.

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
        data = self.json(args)
        if not isinstance(data, dict) or not data.get("run-id"):
            raise DeploymentError(f"unexpected `flwr run` output: {data}")
        return int(data["run-id"])

    def run_info(self, run_id: int) -> RunInfo:
        data = self.json(["list", CONNECTION_NAME, "--run-id", str(run_id)])
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
            proc = self(
                ["log", str(run_id), CONNECTION_NAME, "--show"], timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            return ""
        return proc.stdout + proc.stderr

    def stop_run(self, run_id: int) -> None:
        self(["stop", str(run_id), CONNECTION_NAME], check=False)
