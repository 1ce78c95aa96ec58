"""Combination of p-values (issue 20): Fisher, Cauchy and Bonferroni, differentiable.

S p-values u_1..u_S of one sample and modality, by Fisher,

    T = -2 sum_s ln u_s,   u = P(chi2_{2S} >= T) = exp(-T/2) sum_{i<S} (T/2)^i / i!

(valid for independent p-values), or by Cauchy (Liu & Xie 2020; valid under arbitrary
dependence, asymptotically in the tail),

    T = (1/S) sum_s tan((1/2 - u_s) pi),   u = 1/2 - arctan(T) / pi,

or by Bonferroni (valid under arbitrary dependence, exactly),

    u = min(1, S min_s u_s).

Cauchy lets a p-value near 1 cancel one near 0 (tan((1/2 - u) pi) -> -inf as u -> 1): a test
that calls a sample *more* typical than its whole reference outvotes one that calls it
atypical. Bonferroni does not: one small p-value is enough. The owner combines its feature and
input tests by Bonferroni (:mod:`jacfusion_fed.training.input_detector`), since an input test
that sees only one kind of perturbation (sign noise) can find other kinds extremely typical.
"""

from __future__ import annotations

import math

import torch

from ._validation import ArrayLike, FusionInputError, to_tensor

__all__ = ["COMBINERS", "combine_pvalues"]

COMBINERS: tuple[str, ...] = ("fisher", "cauchy", "bonferroni")


def combine_pvalues(pvalues: ArrayLike, method: str = "fisher") -> torch.Tensor:
    """Combine S p-values along the last axis, (..., S) -> (...), by ``"fisher"``,
    ``"cauchy"`` or ``"bonferroni"`` (module docstring); S = 1 returns the input.
    Differentiable (Bonferroni almost everywhere)."""
    if method not in COMBINERS:
        raise FusionInputError(f"unknown combination {method!r}; valid: {', '.join(COMBINERS)}")
    u = to_tensor(pvalues, "pvalues", device=None, dtype=torch.float64)
    if u.ndim < 1 or u.shape[-1] < 1:
        raise FusionInputError("pvalues must have a last axis of at least one p-value")
    if bool(((u < 0) | (u > 1) | ~torch.isfinite(u)).any()):
        raise FusionInputError("pvalues must lie in [0, 1]")
    s = u.shape[-1]
    if s == 1:
        return u[..., 0]
    if method == "bonferroni":
        return (s * u.min(dim=-1).values).clamp(max=1.0)
    u = u.clamp(min=1e-300)
    if method == "fisher":
        half_t = -torch.log(u).sum(dim=-1)  # T / 2
        terms = torch.stack(
            [i * torch.log(half_t.clamp(min=1e-300)) - math.lgamma(i + 1) for i in range(s)],
            dim=-1,
        )
        return torch.exp(-half_t + torch.logsumexp(terms, dim=-1)).clamp(max=1.0)
    u = u.clamp(max=1.0 - 1e-15)
    t = torch.tan((0.5 - u) * math.pi).mean(dim=-1)
    return (0.5 - torch.arctan(t) / math.pi).clamp(min=0.0, max=1.0)
