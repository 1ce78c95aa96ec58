"""Bootstrap intervals and marks: the one implementation behind every mark in the result tables.

A mark compares two fusion rules evaluated on the **same** test samples (and the same draws of
every perturbation), possibly for several training seeds. With per-seed, per-sample correctness
a_si, b_si in [0, 1] (the mean over the draws of a random perturbation), the difference is
d = mean_s mean_i (a_si - b_si).

**Cluster bootstrap.** The test samples are the clusters: a resample draws N test samples with
replacement and keeps *all* seeds of each drawn sample together (the seeds see the same test
sample, so they are not independent observations of it). Pooling the S x N values as if they
were S * N independent samples gives intervals that are too narrow whenever the seeds agree on
a sample; :func:`cluster_bootstrap` never does that. With equal cluster sizes the resampled
mean is the mean over the drawn samples of the per-sample seed mean, which is how it is
computed.

**Seed spread.** The standard deviation over training seeds of the per-seed difference (and,
in the tables, of each row's per-seed accuracy): the variation a user retraining the nets sees.

**Marks and multiplicity.** Every interval is a 95 % percentile interval. A table marks many
cells at once, so the marks are corrected with Holm's step-down procedure over the marked cells
of one table (:func:`holm_marks`), using the two-sided bootstrap p-value
2 min(P*(d <= 0), P*(d >= 0)) of each cell: ``↑`` / ``↓`` when the Holm-adjusted p-value is
below 0.05 and the mean difference is positive / negative, ``=`` (a tie) otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

__all__ = [
    "DOWN",
    "TIE",
    "UP",
    "cluster_bootstrap",
    "holm_adjust",
    "holm_marks",
    "mark",
    "paired_bootstrap",
    "seed_spread",
]

UP, DOWN, TIE = "↑", "↓", "="
K = TypeVar("K")


def _as_seed_matrix(x: Sequence[Any] | np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} must be (N,) or (seeds, N) with N > 0, got shape {arr.shape}")
    return arr


def cluster_bootstrap(
    a: Sequence[Any] | np.ndarray,
    b: Sequence[Any] | np.ndarray,
    *,
    resamples: int = 5000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, float]:
    """Mean of a - b, its cluster bootstrap interval over test samples (seeds kept together),
    the bootstrap p-value and the seed spread, in points (%).

    Args:
        a, b: per-sample correctness, (N,) for one seed or (S, N) for S training seeds on the
            same N test samples, paired by index.
        resamples: bootstrap resamples (fixed ``seed``: the interval is reproducible).
        level: coverage of the interval.

    Returns:
        ``{"mean", "low", "high", "p", "seed_sd", "seeds"}``; ``seed_sd`` is the standard
        deviation (ddof 1) over seeds of the per-seed mean difference (0 for one seed).
    """
    xa, xb = _as_seed_matrix(a, "a"), _as_seed_matrix(b, "b")
    if xa.shape != xb.shape:
        raise ValueError(f"a and b must have the same shape, got {xa.shape} and {xb.shape}")
    d = (xa - xb) * 100.0  # (S, N)
    per_sample = d.mean(axis=0)  # the cluster: every seed of one test sample
    n = per_sample.shape[0]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))
    means = per_sample[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    p = min(1.0, 2.0 * min(float(np.mean(means <= 0)), float(np.mean(means >= 0))))
    per_seed = d.mean(axis=1)
    return {
        "mean": float(per_sample.mean()),
        "low": float(lo),
        "high": float(hi),
        "p": p,
        "seed_sd": float(np.std(per_seed, ddof=1)) if d.shape[0] > 1 else 0.0,
        "seeds": int(d.shape[0]),
    }


def paired_bootstrap(
    a: Sequence[Any] | np.ndarray,
    b: Sequence[Any] | np.ndarray,
    *,
    resamples: int = 5000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """``(mean, low, high)`` of 100 * (a - b): :func:`cluster_bootstrap`'s interval.

    ``a``, ``b``: (N,) for one seed or (S, N) for S seeds on the same test samples (the
    samples are resampled with their seeds kept together, never pooled)."""
    r = cluster_bootstrap(a, b, resamples=resamples, seed=seed, level=level)
    return r["mean"], r["low"], r["high"]


def seed_spread(per_seed: Sequence[Any] | np.ndarray) -> float:
    """Standard deviation (ddof 1) over seeds of ``per_seed`` values (0 for one seed)."""
    x = np.asarray(per_seed, dtype=np.float64).ravel()
    return float(np.std(x, ddof=1)) if x.size > 1 else 0.0


def holm_adjust(pvalues: Mapping[K, float]) -> dict[K, float]:
    """Holm's step-down adjusted p-values (family-wise error over all the given tests)."""
    items = sorted(pvalues.items(), key=lambda kv: kv[1])
    m = len(items)
    out: dict[K, float] = {}
    running = 0.0
    for i, (key, p) in enumerate(items):
        running = max(running, min(1.0, (m - i) * p))
        out[key] = running
    return out


def holm_marks(tests: Mapping[K, Mapping[str, float]], *, level: float = 0.05) -> dict[K, str]:
    """``↑`` / ``↓`` / ``=`` per cell from :func:`cluster_bootstrap` results, Holm-corrected
    over all the cells given (one table)."""
    adjusted = holm_adjust({k: float(t["p"]) for k, t in tests.items()})
    return {
        k: (UP if t["mean"] > 0 else DOWN) if adjusted[k] < level and t["mean"] != 0 else TIE
        for k, t in tests.items()
    }


def mark(ci: Sequence[float]) -> str:
    """``↑`` if the interval ``(mean, low, high)`` excludes 0 from above, ``↓`` from below,
    ``=`` otherwise (one cell, no multiplicity correction)."""
    _, lo, hi = ci[:3]
    return UP if lo > 0 else (DOWN if hi < 0 else TIE)
