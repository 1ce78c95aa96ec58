"""Plain data classes holding measured accuracies, serializable to and from JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

__all__ = [
    "MM_ROW_KINDS",
    "PAPER_MM_KINDS",
    "Column",
    "Curve",
    "EvaluationResult",
    "Row",
    "Table",
]

ColumnKind = Literal["clean", "corruption", "attack", "adaptive"]
RowKind = Literal[
    "unimodal",
    "mean",
    "confidence_mean",
    "statistical",
    "jacobian",
    "jacobian_clean",
    "jacobian_all",
    "jacobian_centered",
]

PAPER_MM_KINDS: tuple[str, ...] = ("mean", "confidence_mean", "statistical", "jacobian")
"""The four multimodal rows of the paper's tables, in order."""
MM_ROW_KINDS: tuple[str, ...] = (
    *PAPER_MM_KINDS,
    "jacobian_centered",
    "jacobian_clean",
    "jacobian_all",
)
ROW_NAMES: dict[str, str] = {
    "mean": "Mean-w/o",
    "confidence_mean": "Mean-w/",
    "statistical": "Stat-w/o",
    "jacobian": "Stat-w/ (ours)",
    "jacobian_clean": "Stat-w/ on clean mod.",
    "jacobian_all": "Stat-w/ on all mods",
    "jacobian_centered": "Stat-w/ centered logits",
}


@dataclass
class Column:
    """One column: ``key`` (stable id), ``label`` (header text), ``kind``."""

    key: str
    label: str
    kind: ColumnKind


@dataclass
class Row:
    """One table row and its accuracies (fractions in [0, 1]).

    Attributes:
        group: ``"UM"`` or ``"MM (0, i)"``.
        name: ``"1: Aud-regT"`` or ``"Stat-w/ (ours)"``.
        kind: ``"unimodal"`` or one of :data:`MM_ROW_KINDS`.
        acc: column key -> one accuracy per repeat.
        gamma: column key -> the gamma used (Jacobian rows only).
        correct: column key -> per-test-sample correctness (N,), the mean over the draws of
            the column's perturbation (Stat-w/o, Stat-w/ (ours) and the centered row, which
            the tables mark by a bootstrap interval of their difference to Stat-w/o); with
            several training seeds the mean over the seeds.
        correct_seeds: column key -> per seed its per-sample correctness (seeds, N): the
            cluster bootstrap resamples test samples with their seeds together.
        seed_acc: column key -> per training seed the mean accuracy (the seed spread).
    """

    group: str
    name: str
    kind: str
    acc: dict[str, list[float]] = field(default_factory=dict)
    gamma: dict[str, float] = field(default_factory=dict)
    correct: dict[str, list[float]] = field(default_factory=dict)
    correct_seeds: dict[str, list[list[float]]] = field(default_factory=dict)
    seed_acc: dict[str, list[float]] = field(default_factory=dict)

    def mean(self, key: str) -> float:
        return float(np.mean(self.acc[key])) if self.acc.get(key) else float("nan")

    def std(self, key: str) -> float:
        return float(np.std(self.acc[key])) if self.acc.get(key) else float("nan")


@dataclass
class Table:
    """One paper-style table (e.g. Table 1: AV-Digits, audio perturbed)."""

    title: str
    dataset: str
    perturbed: str
    clean: str
    columns: list[Column]
    rows: list[Row]
    repeats: int
    notes: list[str] = field(default_factory=list)

    def groups(self) -> list[str]:
        """Row groups in order of appearance."""
        return list(dict.fromkeys(r.group for r in self.rows))

    def row(self, group: str, kind: str) -> Row:
        for r in self.rows:
            if r.group == group and r.kind == kind:
                return r
        raise KeyError(f"no row {kind!r} in group {group!r}")


@dataclass
class Curve:
    """Accuracy vs perturbation size (Figure 4/6/7): one line with its repeats.

    ``acc[i]`` holds the per-repeat accuracies at ``sizes[i]``.
    """

    table: str
    perturbation: str
    parameter: str
    method: str
    gamma: float | None
    sizes: list[float]
    acc: list[list[float]]


@dataclass
class EvaluationResult:
    """Everything :func:`run_evaluation` measured; ``heatmaps`` are not written to JSON."""

    config: dict[str, Any]
    tables: list[Table]
    curves: list[Curve] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    heatmaps: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)

    def to_json_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("heatmaps")
        out["heatmap_accuracies"] = {
            k: {"clean_acc": v.get("clean_acc"), "noisy_acc": v.get("noisy_acc")}
            for k, v in self.heatmaps.items()
        }
        return out

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> EvaluationResult:
        tables = [
            Table(
                **{k: v for k, v in t.items() if k not in ("columns", "rows")},
                columns=[Column(**c) for c in t["columns"]],
                rows=[Row(**r) for r in t["rows"]],
            )
            for t in data["tables"]
        ]
        return cls(
            config=data["config"],
            tables=tables,
            curves=[Curve(**c) for c in data.get("curves", [])],
            timings=data.get("timings", {}),
            models=data.get("models", {}),
            environment=data.get("environment", {}),
        )
