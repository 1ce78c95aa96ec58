"""How results get from a ServerApp back to whoever launched it.

Neither launcher can return a value from a ServerApp: ``flwr run`` only submits the run,
and ``run_simulation`` returns nothing. The convention here: the caller puts a folder in
the run config under `RUN_DIR_KEY` (``run-dir``); the ServerApp writes JSON files there with
`write_run_results` (atomic: temp file, fsync, rename); the caller reads them with
`read_run_results` once the run has finished.

In deployment the ServerApp runs on the coordinator's machine (SuperLink side), so the
folder must be one that the ServerApp process can write. The key must also be declared in
``[tool.flwr.app.config]`` (``run-dir = ""``): ``flwr run -c`` refuses keys that are not.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context

from jacfusion_fed.atomicio import atomic_write_bytes

__all__ = [
    "RESULTS_FILE",
    "RUN_DIR_KEY",
    "read_run_results",
    "run_dir_from_context",
    "write_run_results",
]

RUN_DIR_KEY = "run-dir"
RESULTS_FILE = "results.json"


def run_dir_from_context(context: Context, key: str = RUN_DIR_KEY) -> Path:
    """The results folder named in the run config; raises if absent or empty."""
    value = context.run_config.get(key)
    if not isinstance(value, str) or not value:
        raise KeyError(
            f"run config has no {key!r} (got {value!r}); pass it with "
            f"run_config={{'{key}': ...}} or `flwr run -c '{key}=\"...\"'`"
        )
    path = Path(value)
    if not path.is_absolute():
        raise ValueError(f"run config {key!r} must be an absolute path, got {value!r}")
    return path


def write_run_results(
    target: Context | Path | str, payload: Mapping[str, Any], name: str = RESULTS_FILE
) -> Path:
    """Atomically write ``payload`` as JSON to ``<run-dir>/<name>``; return the path."""
    folder = run_dir_from_context(target) if isinstance(target, Context) else Path(target)
    folder.mkdir(parents=True, exist_ok=True)
    if Path(name).name != name:
        raise ValueError(f"results file name must be a plain file name, got {name!r}")
    final = folder / name
    atomic_write_bytes(final, json.dumps(dict(payload), indent=2, sort_keys=True).encode())
    return final


def read_run_results(run_dir: Path | str, name: str = RESULTS_FILE) -> dict[str, Any]:
    """Read what the ServerApp wrote with `write_run_results`."""
    path = Path(run_dir) / name
    if not path.is_file():
        raise FileNotFoundError(f"the ServerApp wrote no results file at {path}")
    with path.open(encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data
