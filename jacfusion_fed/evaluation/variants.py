"""The "perturbed modality unknown" tables run twice, with one option changed (issue 20's
``benchmarks/retain_selection.py`` and ``benchmarks/jacobian_evidence.py``): everything else
the same, in one process, compared per sample.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .analysis import stamp
from .stats import cluster_bootstrap
from .unknown_report import per_sample_correct, run_unknown
from .unknown_targets import best_clean_alone, targets

__all__ = ["compare_variants", "run_variants"]

Chosen = Callable[[Mapping[str, Any]], str]
"""A label for one row's selected hyperparameters (what ``chosen`` counts)."""


def compare_variants(
    runs: Mapping[str, dict[str, Any]], rows: Sequence[str], chosen: Chosen
) -> dict[str, Any]:
    """Two :func:`run_unknown` results of one dataset, ``{baseline: ..., variant: ...}`` in
    that order, compared: the issue's bars, both runs' targets (issues 11 and 20) and each
    setting's robust - Stat-w/o; per row the mean, the clean column and every column of both,
    the per-sample difference ``variant - baseline`` over the mean and per setting (cluster
    bootstrap over test samples, seeds together; keys ``mean_<variant>_minus_<baseline>`` and
    ``per_setting_<variant>_minus_<baseline>``), clean - Stat-w/o of both, and how often the
    selection chose each ``chosen`` label over seeds and test columns."""
    (old_name, old), (new_name, new) = runs.items()
    settings = new["settings"]
    diff = f"{new_name}_minus_{old_name}"
    out: dict[str, Any] = {
        "best_clean_alone_mean": float(np.mean([best_clean_alone(new, k) for k in settings])),
        "jac_oracle_mean": float(new["mean"]["jac_oracle"]),
        "stat_mean": float(new["mean"]["stat"]),
        "stat_clean": float(new["pooled"]["clean"]["stat"]),
        "targets": {g: targets(r) for g, r in runs.items()},
        "robust_minus_stat": {
            g: {k: r["pooled"][k]["robust-stat"] for k in settings} for g, r in runs.items()
        },
        "rows": {},
    }

    def counts(result: dict[str, Any], row: str) -> dict[str, int]:
        c = Counter(
            chosen(p[row])
            for s in result["seeds"]
            for p in result["per_seed"][str(s)]["params"].values()
        )
        return dict(sorted(c.items()))

    def minus(row: str, key: str | None) -> dict[str, float]:
        return cluster_bootstrap(
            per_sample_correct(new, row, key), per_sample_correct(old, row, key)
        )

    for row in rows:
        out["rows"][row] = {
            "mean": {g: float(r["mean"][row]) for g, r in runs.items()},
            "clean": {g: float(r["pooled"]["clean"][row]) for g, r in runs.items()},
            "per_setting": {
                k: {g: float(r["pooled"][k][row]) for g, r in runs.items()} for k in settings
            },
            f"mean_{diff}": minus(row, None),
            f"per_setting_{diff}": {k: minus(row, k) for k in settings},
            "clean_minus_stat": {
                g: cluster_bootstrap(
                    per_sample_correct(r, row, "clean"), per_sample_correct(r, "stat", "clean")
                )
                for g, r in runs.items()
            },
            "chosen": {g: counts(r, row) for g, r in runs.items()},
        }
    return out


def run_variants(
    datasets: Sequence[str],
    seeds: Sequence[int],
    variants: Mapping[str, Mapping[str, Any]],
    rows: Sequence[str],
    chosen: Chosen,
) -> dict[str, Any]:
    """Per dataset, :func:`run_unknown` once per ``variants`` entry (name: its keyword
    arguments; the first is the baseline) and :func:`compare_variants`; with each run's
    seconds, the environment per dataset, the load average and the total time."""
    start = time.perf_counter()
    results: dict[str, Any] = {}
    env: dict[str, Any] = {}
    for ds in datasets:
        runs = {g: run_unknown(ds, list(seeds), **kw) for g, kw in variants.items()}
        first = next(iter(runs.values()))
        env[ds] = {**first["environment"], "threads": first["threads"]}
        results[ds] = {
            **compare_variants(runs, rows, chosen),
            "seconds": {g: r["seconds"] for g, r in runs.items()},
        }
    return {"seeds": list(seeds), "datasets": results, "environment": env, **stamp(start)}
