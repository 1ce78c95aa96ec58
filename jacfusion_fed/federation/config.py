"""Node config and run config values, and their command-line form.

Flower's ``UserConfig`` holds ``bool | int | float | str`` values. On the command line
(``flower-supernode --node-config``, ``flwr run --run-config``) they are written as
space-separated ``key=value`` pairs whose values are TOML literals, parsed by
``flwr.common.config.parse_config_args`` with the regex
``(\\S+?)=('[^']*'|"[^"]*"|\\S+)``. `format_config_arg` writes exactly that form and refuses
what that parser would misread (keys with spaces or empty dotted parts, strings holding
both quote kinds, non-finite floats). Dotted keys (``fusion.gamma``) are Flower's flattened
nested tables and round-trip.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - flwr depends on tomli
    import tomli as tomllib

__all__ = [
    "RESERVED_SIM_KEYS",
    "ConfigValue",
    "format_config_arg",
    "load_app_run_config",
    "validate_config",
]

ConfigValue = bool | int | float | str

#: Keys that the Simulation Engine sets itself in every simulated node's node config.
RESERVED_SIM_KEYS = frozenset({"partition-id", "num-partitions"})

_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")


def validate_config(config: Mapping[str, object], what: str = "config") -> dict[str, ConfigValue]:
    """Check keys and values of a node/run config; return it as a plain dict."""
    out: dict[str, ConfigValue] = {}
    for key, value in config.items():
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise ValueError(
                f"{what} key {key!r} must be letters, digits, '_' or '-', optionally in "
                "dot-separated parts (Flower's flattened nested tables)"
            )
        if not isinstance(value, (bool, int, float, str)):
            raise TypeError(
                f"{what}[{key!r}] has type {type(value).__name__}; Flower configs hold "
                "bool, int, float or str only"
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{what}[{key!r}] = {value!r} is not finite")
        out[key] = value
    return out


def _literal(key: str, value: ConfigValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if "'" not in value and "\n" not in value and "\r" not in value:
        return f"'{value}'"  # TOML literal string: no escapes, backslashes kept as-is
    if '"' not in value:
        escaped = value.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
        return f'"{escaped}"'
    raise ValueError(
        f"config[{key!r}]: a string holding both ' and \" cannot be passed on Flower's command line"
    )


def format_config_arg(config: Mapping[str, object], what: str = "config") -> str:
    """``{"modality": "audio", "k": 3}`` -> ``modality='audio' k=3`` (one argv item)."""
    checked = validate_config(config, what)
    return " ".join(f"{key}={_literal(key, value)}" for key, value in checked.items())


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(_flatten(value, name))
        else:
            out[name] = value
    return out


def load_app_run_config(
    app_dir: Path | str, overrides: Mapping[str, object] | None = None
) -> dict[str, ConfigValue]:
    """The run config a deployed app would see: ``[tool.flwr.app.config]`` of
    ``<app_dir>/pyproject.toml`` (nested tables flattened with dots, as Flower does) with
    ``overrides`` on top. Like ``flwr run -c``, refuses override keys that the app does not
    declare. Use it to give `run_simulation_app` the same run config as a deployment
    (simulation itself reads no pyproject.toml)."""
    path = Path(app_dir) / "pyproject.toml"
    with path.open("rb") as fh:
        project = tomllib.load(fh)
    defaults = _flatten(project.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {}))
    extra = validate_config(overrides or {}, "run config override")
    unknown = sorted(set(extra) - set(defaults))
    if unknown:
        raise KeyError(
            f"run config keys {unknown} are not declared in [tool.flwr.app.config] of {path}"
        )
    return validate_config({**defaults, **extra}, f"[tool.flwr.app.config] of {path}")
