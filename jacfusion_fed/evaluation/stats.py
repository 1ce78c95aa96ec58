"""Paired bootstrap intervals: the one implementation behind every mark in the result tables.

A mark compares two fusion rules evaluated on the **same** test samples (and the same draws of
every perturbation). With per-sample correctness a_i, b_i in [0, 1] (the mean over the draws of
a random perturbation), the difference is d = mean_i (a_i - b_i); its percentile bootstrap
interval resamples the samples i with replacement. A mark is ``↑`` / ``↓`` only when the 95 %
interval lies entirely above / below 0, ``=`` (a tie) otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["DOWN", "TIE", "UP", "mark", "paired_bootstrap"]

UP, DOWN, TIE = "↑", "↓", "="


def paired_bootstrap(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """Mean of a - b over paired samples and its percentile bootstrap interval, in points (%).

    Args:
        a, b: per-sample correctness (N,) of the two rules, paired by index.
        resamples: bootstrap resamples (fixed ``seed``: the interval is reproducible).
        level: coverage of the interval.

    Returns:
        ``(mean, low, high)`` of 100 * (a - b).
    """
    xa, xb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if xa.ndim != 1 or xa.shape != xb.shape or xa.shape[0] == 0:
        raise ValueError(
            f"paired_bootstrap needs two 1-D arrays of one non-zero length, "
            f"got {xa.shape} and {xb.shape}"
        )
    d = (xa - xb) * 100.0
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.shape[0], size=(resamples, d.shape[0]))
    means = d[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(d.mean()), float(lo), float(hi)


def mark(ci: Sequence[float]) -> str:
    """``↑`` if the interval ``(mean, low, high)`` excludes 0 from above, ``↓`` from below,
    ``=`` otherwise."""
    _, lo, hi = ci
    return UP if lo > 0 else (DOWN if hi < 0 else TIE)
