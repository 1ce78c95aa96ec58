"""The app's run config as one typed, validated value: :class:`RunConfig`.

Every default is written here once. ``[tool.flwr.app.config]`` of ``pyproject.toml`` (what
``flwr run`` sends), the simulation's run config, the ServerApp (coordinator) and the ClientApp
(owners) all come from it (a test keeps ``pyproject.toml`` equal to
``RunConfig().to_mapping()``).

Flower hands the apps a flat ``UserConfig`` (``bool | int | float | str`` values, dashed keys:
``batch-size``); :meth:`RunConfig.from_mapping` reads such a mapping (missing keys take their
defaults, unknown keys are refused), :meth:`RunConfig.to_mapping` writes one. Every value is
checked once, when the object is built; a bad one raises :class:`RunConfigError` whose one-line
message names the key and the value, e.g.
``run config 'gamma' = 1.5: must be 'auto' or a number in (0, 1]``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from jacfusion_fed.data.presets import AVDIGITS_COLUMNS
from jacfusion_fed.owner.perturbation import PerturbationSpec

__all__ = [
    "DEFAULT_COLUMNS",
    "GAMMA_AUTO",
    "HEAD_KINDS",
    "TRAINING_METHODS",
    "RunConfig",
    "RunConfigError",
]

ConfigValue = bool | int | float | str

#: The paper's Table 1 columns (audio perturbed in the built-in AV-Digits preset).
DEFAULT_COLUMNS: Final = AVDIGITS_COLUMNS
#: Written for ``gamma`` when it is chosen on the validation split.
GAMMA_AUTO: Final = "auto"
_GAMMA_AUTO_WORDS = frozenset({"auto", "", "select"})
#: The training add-ons of :mod:`jacfusion_fed.training.methods` (a test keeps them equal;
#: listed here so that reading a run config never imports torch).
TRAINING_METHODS: Final = ("regular", "adversarial", "free", "stability", "mixup")
HEAD_KINDS: Final = ("gram", "full")
_PATH_KEYS: Final = ("run_dir", "registry_dir", "labels_file", "audit_log", "audit_tls")
_AT_LEAST_ONE: Final = (
    "expected_nodes",
    "epochs",
    "batch_size",
    "fedavg_rounds",
    "repeats",
    "query_batch_size",
)
#: The paper's gamma grid (``jacfusion_fed.evaluation.GAMMA_CANDIDATES``; a test keeps them equal).
_PAPER_GAMMAS: Final = (0.1, 0.5, 0.9)


class RunConfigError(ValueError):
    """A run config key or value is not valid; the message names both, in one line."""

    def __init__(self, message: str, key: str | None = None, why: str = "") -> None:
        super().__init__(message)
        self.key, self.why = key, why


def _key(field_name: str) -> str:
    return field_name.replace("_", "-")


def _fail(key: str, value: object, why: str) -> RunConfigError:
    shown = repr(value)
    if len(shown) > 120:
        shown = shown[:117] + "..."
    return RunConfigError(f"run config {key!r} = {shown}: {why}", key, why)


# ------------------------------------------------------------------------ coercion
def _as_str(key: str, value: object) -> str:
    if isinstance(value, str):
        return value
    raise _fail(key, value, "must be a string")


def _as_int(key: str, value: object) -> int:
    if isinstance(value, bool):
        raise _fail(key, value, "must be an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise _fail(key, value, "must be an integer")


def _as_float(key: str, value: object) -> float:
    if isinstance(value, bool):
        raise _fail(key, value, "must be a number")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise _fail(key, value, "must be a number")


def _as_bool(key: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise _fail(key, value, "must be true or false")


def _as_gamma(key: str, value: object) -> float | None:
    if isinstance(value, str) and value.strip().lower() in _GAMMA_AUTO_WORDS:
        return None
    try:
        return _as_float(key, value)
    except RunConfigError:
        raise _fail(key, value, "must be 'auto' or a number in (0, 1]") from None


def _as_candidates(key: str, value: object) -> tuple[float, ...]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (float(value),)
    text = _as_str(key, value)
    try:
        return tuple(float(g) for g in text.split(",") if g.strip())
    except ValueError:
        raise _fail(key, value, "must be comma-separated numbers in (0, 1]") from None


_PARSERS: dict[str, Callable[[str, object], Any]] = {
    "expected_nodes": _as_int,
    "node_timeout": _as_float,
    "reply_timeout": _as_float,
    "train": _as_bool,
    "epochs": _as_int,
    "lr": _as_float,
    "batch_size": _as_int,
    "seed": _as_int,
    "fedavg_rounds": _as_int,
    "local_epochs": _as_int,
    "repeats": _as_int,
    "gamma": _as_gamma,
    "gamma_candidates": _as_candidates,
    "query_batch_size": _as_int,
    "secagg": _as_bool,
    "dp_clip": _as_float,
    "dp_noise": _as_float,
}


# ------------------------------------------------------------------------ the config
@dataclass(frozen=True)
class RunConfig:
    """The run config of the coordinator (ServerApp) and the owners (ClientApp).

    Keys on the wire are the field names with dashes (``batch_size`` -> ``batch-size``).
    ``gamma=None`` means "auto": chosen on the validation split among ``gamma_candidates``.
    """

    run_dir: str = ""
    """Coordinator's results folder (absolute; default ./runs/flwr-run-<id>)."""
    registry_dir: str = ""
    """Head registry (default <run-dir>/registry)."""
    labels_file: str = ""
    """The requester's pseudonym -> label file; "" = train and register only."""
    dataset: str = "avdigits"
    """Label of tables and reports."""
    expected_nodes: int = 2
    """Owners (SuperNodes) to wait for."""
    node_timeout: float = 300.0
    reply_timeout: float = 1800.0
    train: bool = True
    """False: fetch the owners' current heads instead of training."""
    training: str = "regular"
    """One of `TRAINING_METHODS`."""
    epochs: int = 15
    lr: float = 0.003
    batch_size: int = 32
    seed: int = 0
    fedavg_rounds: int = 3
    """For modalities held by several sites."""
    local_epochs: int = 0
    """Per FedAvg round; 0 = epochs / fedavg-rounds."""
    head_kind: str = "gram"
    """"full" = W and b (only from owners that allow it)."""
    perturbed: str = ""
    """Modality perturbed in the table ("" = last in name order)."""
    columns: str = DEFAULT_COLUMNS
    repeats: int = 1
    """Draws of the random perturbations."""
    gamma: float | None = None
    """None ("auto") = chosen on the validation split, or a value in (0, 1]."""
    gamma_candidates: tuple[float, ...] = _PAPER_GAMMAS
    query_batch_size: int = 10_000
    secagg: bool = False
    """FedAvg rounds with Flower's SecAgg+ (federation.private)."""
    dp_clip: float = 0.0
    """Central DP: clip each site's update to this L2 norm (0 = no DP)."""
    dp_noise: float = 0.0
    """Central DP: Gaussian noise multiplier sigma (std sigma * dp-clip / sites)."""
    audit_log: str = ""
    """The coordinator's audit log (absolute; "" = none)."""
    audit_tls: str = ""
    """Certificate directory whose key signs the audit checkpoints ("" = unsigned)."""

    def __post_init__(self) -> None:
        for name in _PATH_KEYS:
            value = getattr(self, name)
            if value and not Path(value).expanduser().is_absolute():
                raise _fail(_key(name), value, "must be an absolute path (or empty)")
        for name in _AT_LEAST_ONE:
            if getattr(self, name) < 1:
                raise _fail(_key(name), getattr(self, name), "must be >= 1")
        if self.local_epochs < 0:
            raise _fail("local-epochs", self.local_epochs, "must be >= 0 (0 = epochs / rounds)")
        for name in ("dp_clip", "dp_noise"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise _fail(_key(name), value, "must be a finite number >= 0 (0 = off)")
        if self.dp_noise > 0 and self.dp_clip == 0:
            raise _fail("dp-noise", self.dp_noise, "needs dp-clip > 0 (noise scales with it)")
        for name in ("node_timeout", "reply_timeout", "lr"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise _fail(_key(name), value, "must be a finite number > 0")
        if self.training not in TRAINING_METHODS:
            raise _fail("training", self.training, f"must be one of {', '.join(TRAINING_METHODS)}")
        if self.head_kind not in HEAD_KINDS:
            raise _fail("head-kind", self.head_kind, "must be 'gram' or 'full'")
        if self.gamma is not None and not (math.isfinite(self.gamma) and 0 < self.gamma <= 1):
            raise _fail("gamma", self.gamma, "must be 'auto' or a number in (0, 1]")
        candidates = self.gamma_candidates or _PAPER_GAMMAS  # empty: the paper's grid
        object.__setattr__(self, "gamma_candidates", tuple(float(g) for g in candidates))
        for g in self.gamma_candidates:
            if not (math.isfinite(g) and 0 < g <= 1):
                text = _candidates_text(self.gamma_candidates)
                raise _fail("gamma-candidates", text, f"{g} is not in (0, 1]")
        self._check_columns()

    def _check_columns(self) -> None:
        if self.columns == DEFAULT_COLUMNS:
            return  # checked by a test; spares importing torch for every default config
        parts = [p.strip() for p in self.columns.split(";") if p.strip()]
        if not parts:
            raise _fail("columns", self.columns, "lists no column")
        for part in parts:
            if part.lower() == "clean":
                continue
            try:
                PerturbationSpec.parse(part)
            except (ValueError, KeyError) as exc:
                raise _fail("columns", self.columns, f"{part!r}: {exc}") from None

    # -- mapping form --------------------------------------------------------------------
    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The wire keys (dashed), in declaration order."""
        return tuple(_key(f.name) for f in dataclasses.fields(cls))

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, object]) -> RunConfig:
        """Read a Flower run config (dashed keys); missing keys keep their defaults.

        Raises:
            RunConfigError: an unknown key, or a value of the wrong type or range.
        """
        names = {_key(f.name): f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in mapping if k not in names)
        if unknown:
            raise RunConfigError(
                f"unknown run config key(s) {', '.join(map(repr, unknown))}; "
                f"valid: {', '.join(names)}"
            )
        values: dict[str, Any] = {}
        for key, value in mapping.items():
            name = names[key]
            values[name] = _PARSERS.get(name, _as_str)(key, value)
        try:
            return cls(**values)
        except RunConfigError as exc:  # name the value as it was given, not as parsed
            if exc.key is not None and exc.key in mapping:
                raise _fail(exc.key, mapping[exc.key], exc.why) from None
            raise

    def to_mapping(self) -> dict[str, ConfigValue]:
        """The Flower run config form: dashed keys, ``gamma`` as ``"auto"`` or its value
        written as a string, the candidates as ``"0.1,0.5,0.9"``."""
        out: dict[str, ConfigValue] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "gamma":
                value = GAMMA_AUTO if value is None else repr(float(value))
            elif f.name == "gamma_candidates":
                value = _candidates_text(value)
            out[_key(f.name)] = value
        return out

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with ``changes`` (field names), validated again."""
        return dataclasses.replace(self, **changes)

    def updated(self, mapping: Mapping[str, object]) -> RunConfig:
        """A copy with the dashed-key values of ``mapping`` on top."""
        return RunConfig.from_mapping({**self.to_mapping(), **mapping})


def _candidates_text(candidates: tuple[float, ...]) -> str:
    return ",".join(repr(float(g)) for g in candidates)
