"""Perturbations a coordinator may ask an owner to apply to its *own* inputs before it computes
logits: the robustness evaluation of a federated run (the coordinator never sees inputs, so the
perturbed modality's owner corrupts or attacks them locally and sends back only K logits).

A spec is written either as a short text (the form of the ``columns`` run config)::

    gaussian w0=1            Supplementary B.1 w0: x (1 + eps), eps ~ N(0, w0^2)
    missing w1=8             w1 consecutive time frames zeroed (axis=frequency for rows)
    bias w2=3 w3=2           a w2 x w2 patch scaled by 1 + w3
    fgsm w4=0.03             FGSM with l_inf budget w4, against the owner's own network
    pgd w4=0.03 w5=0.001     PGD, budget w4, step w5, w6 steps (default 20)

or as the canonical JSON object that travels in Flower messages
(``{"kind": "pgd", "w4": 0.03, "w5": 0.001, "w6": 20}``). :meth:`PerturbationSpec.build`
turns it into the :mod:`jacfusion_fed.robustness` object that does the work.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from jacfusion_fed.robustness import (
    AttackSpec,
    BiasNoise,
    Corruption,
    GaussianNoise,
    MissingEntries,
)

__all__ = ["PERTURBATION_KINDS", "PerturbationSpec"]

_FLOAT, _INT, _STR, _BOOL = "float", "int", "str", "bool"
_PARAMS: dict[str, dict[str, str]] = {
    "gaussian": {"w0": _FLOAT},
    "missing": {"w1": _INT, "axis": _STR},
    "bias": {"w2": _INT, "w3": _FLOAT},
    "fgsm": {"w4": _FLOAT},
    "pgd": {"w4": _FLOAT, "w5": _FLOAT, "w6": _INT, "random_start": _BOOL},
}
_REQUIRED: dict[str, tuple[str, ...]] = {
    "gaussian": ("w0",),
    "missing": ("w1",),
    "bias": ("w2", "w3"),
    "fgsm": ("w4",),
    "pgd": ("w4", "w5"),
}
_DEFAULTS: dict[str, dict[str, Any]] = {
    "missing": {"axis": "time"},
    "pgd": {"w6": 20, "random_start": True},
}
PERTURBATION_KINDS: tuple[str, ...] = tuple(_PARAMS)
"""Every kind an owner understands."""


def _coerce(kind: str, name: str, value: Any) -> Any:
    want = _PARAMS[kind][name]
    if want == _BOOL:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        raise ValueError(f"{kind}: {name} must be true or false, got {value!r}")
    if want == _STR:
        if not isinstance(value, str):
            raise ValueError(f"{kind}: {name} must be a string, got {value!r}")
        return value
    if isinstance(value, bool):
        raise ValueError(f"{kind}: {name} must be a number, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{kind}: {name} must be a number, got {value!r}") from None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{kind}: {name} must be a finite number, got {value!r}")
    if want == _INT:
        if float(value) != int(value):
            raise ValueError(f"{kind}: {name} must be an integer, got {value!r}")
        return int(value)
    return float(value)


@dataclass(frozen=True)
class PerturbationSpec:
    """One perturbation with its parameters and the random draw it stands for.

    ``draw`` selects an independent random draw of a random perturbation (Gaussian noise,
    missing entries, bias patches, PGD's random start); the owner derives its generator from the
    request seed, the spec and the draw, so the same request gives the same logits.
    """

    kind: str
    params: tuple[tuple[str, Any], ...]
    draw: int = 0

    # --- construction ----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PerturbationSpec:
        if not isinstance(data, Mapping):
            raise ValueError(f"a perturbation must be an object, got {type(data).__name__}")
        kind = data.get("kind")
        if kind not in _PARAMS:
            raise ValueError(
                f"unknown perturbation kind {kind!r}; valid: {', '.join(PERTURBATION_KINDS)}"
            )
        extra = set(data) - set(_PARAMS[kind]) - {"kind", "draw"}
        if extra:
            raise ValueError(
                f"{kind}: unknown parameter(s) {sorted(extra)}; valid: {sorted(_PARAMS[kind])}"
            )
        missing = [p for p in _REQUIRED[kind] if p not in data]
        if missing:
            raise ValueError(f"{kind}: missing parameter(s) {missing}")
        values = dict(_DEFAULTS.get(kind, {}))
        values.update(
            {k: _coerce(kind, k, v) for k, v in data.items() if k not in ("kind", "draw")}
        )
        draw = data.get("draw", 0)
        if isinstance(draw, bool) or not isinstance(draw, int) or draw < 0:
            raise ValueError(f"draw must be an integer >= 0, got {draw!r}")
        spec = cls(kind, tuple(sorted(values.items())), draw)
        spec.build()  # the robustness classes validate the values
        return spec

    @classmethod
    def parse(cls, text: str) -> PerturbationSpec:
        """``"pgd w4=0.03 w5=0.001"`` or the JSON form."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("empty perturbation spec")
        text = text.strip()
        if text.startswith("{"):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"perturbation spec is not valid JSON: {exc}") from None
            return cls.from_dict(parsed)
        kind, *pairs = text.split()
        data: dict[str, Any] = {"kind": kind.lower()}
        for pair in pairs:
            name, sep, value = pair.partition("=")
            if not sep or not name or not value:
                raise ValueError(f"perturbation {text!r}: expected name=value, got {pair!r}")
            data[name] = value
        return cls.from_dict(data)

    def with_draw(self, draw: int) -> PerturbationSpec:
        return PerturbationSpec(self.kind, self.params, draw)

    # --- views -----------------------------------------------------------------------------
    def get(self, name: str, default: Any = None) -> Any:
        return dict(self.params).get(name, default)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **dict(self.params), "draw": self.draw}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def build(self) -> Corruption | AttackSpec:
        """The :mod:`jacfusion_fed.robustness` object (raises ``ValueError`` on bad values)."""
        p = dict(self.params)
        if self.kind == "gaussian":
            return GaussianNoise(p["w0"])
        if self.kind == "missing":
            return MissingEntries(p["w1"], p["axis"])
        if self.kind == "bias":
            return BiasNoise(p["w2"], p["w3"])
        if self.kind == "fgsm":
            return AttackSpec("fgsm", p["w4"])
        return AttackSpec("pgd", p["w4"], p["w5"], p["w6"], p["random_start"])

    @property
    def is_attack(self) -> bool:
        return self.kind in ("fgsm", "pgd")

    @property
    def deterministic(self) -> bool:
        """Whether every draw gives the same result (FGSM; PGD without random start)."""
        built = self.build()
        return isinstance(built, AttackSpec) and built.deterministic

    @property
    def label(self) -> str:
        """Column label in the paper's notation (``w0=1``, ``FGSM w4=0.03``, ...)."""
        return self.build().label
