"""Sample-wise Jacobian-regularized late fusion (Section 3, Algorithm 1)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from ._validation import (
    ArrayLike,
    FusionInputError,
    check_gamma,
    check_log_prior,
    check_logits,
    result_dtype,
    to_tensor,
)
from .fast import fast_apply
from .gram import GramFactor, factor_gram
from .implicit import implicit_apply
from .solver import dense_weights, flush_tiny, structured_weights
from .statistical import combine_logits

Solver = Literal["exact", "dense", "fast", "auto"]
SOLVERS: tuple[str, ...] = ("exact", "dense", "fast", "auto")
DEFAULT_TOL = 1e-6
"""Default bound on max |p - p_exact| for the fast solver."""
AUTO_FAST_MIN_K = 48
"""``auto`` uses the fast solver from this many classes on (below it the exact one is as fast)."""


def _check_solver(solver: str) -> None:
    if solver not in SOLVERS:
        raise FusionInputError(f"solver must be one of {', '.join(SOLVERS)}; got {solver!r}")


def _as_factor(gram: ArrayLike | GramFactor, num_classes: int, name: str) -> GramFactor:
    factor = gram if isinstance(gram, GramFactor) else factor_gram(gram, name)
    if factor.num_classes != num_classes:
        raise FusionInputError(
            f"{name} must have shape ({num_classes}, {num_classes}) to match K, "
            f"got ({factor.num_classes}, {factor.num_classes})"
        )
    return factor


def _check_probabilities(p: ArrayLike) -> torch.Tensor:
    t = to_tensor(p, "p", device=None, dtype=None)
    if t.ndim != 2 or t.shape[1] < 2:
        raise FusionInputError(f"p must have shape (N, K) with K >= 2, got {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise FusionInputError("empty batch: p has N=0 samples")
    if not bool(torch.isfinite(t).all()):
        raise FusionInputError("p contains non-finite values (NaN or Inf)")
    tol = 1e-4 if t.dtype == torch.float32 else 1e-8
    if bool((t < -tol).any()):
        raise FusionInputError("p must be probabilities: found negative entries")
    worst = float((t.sum(dim=-1) - 1.0).abs().max())
    if worst > tol * t.shape[1]:
        raise FusionInputError(f"p must be probabilities: rows sum to 1 +- {worst:.3g}")
    return t


def solve_jacobian_weights(
    p: ArrayLike, gram: ArrayLike | GramFactor, gamma: float, *, solver: Solver = "exact"
) -> torch.Tensor:
    """Minimisers W_a of the relaxed Jacobian loss (Eq. 5) for a batch of fused predictions.

    Solves, per sample, the Sylvester equation (S3) written without inverting the Gram matrix:

        (1/gamma - 1) J^2 W_a G + W_a = I,   J = p p^T - Diag(p)  (Eq. 4),  G = W_A W_A^T,

    which is well posed for every PSD G, singular G included (K larger than the feature width H).

    Args:
        p: fused predictions, shape (N, K), rows on the probability simplex.
        gram: G of shape (K, K) (or a :class:`GramFactor` of it).
        gamma: 0 < gamma <= 1; gamma = 1 gives W_a = I.
        solver: ``"exact"`` (O(K^2) structured Woodbury form; the default) or ``"dense"``
            (eigendecompositions of J and G; O(K^3) per sample, a reference).

    Returns:
        W_a, shape (N, K, K), on p's device; float64 for float64 p, float32 otherwise.
    """
    if solver not in ("exact", "dense"):
        raise FusionInputError(
            f"solve_jacobian_weights supports solver 'exact' or 'dense' (the fast solver never "
            f"forms W); got {solver!r}"
        )
    probs = _check_probabilities(p)
    g = check_gamma(gamma)
    factor = _as_factor(gram, probs.shape[1], "gram").to(probs.device)
    p64 = flush_tiny(probs.to(torch.float64))
    kappa = 1.0 / g - 1.0
    weights = (
        structured_weights(p64, factor, kappa)
        if solver == "exact"
        else dense_weights(p64, factor, kappa)
    )
    return weights.to(result_dtype(probs))


def _per_modality_gamma(gamma: float | Sequence[float], num_modalities: int) -> list[float]:
    if isinstance(gamma, (int, float)):
        return [check_gamma(gamma)] * num_modalities
    values = list(gamma)
    if len(values) != num_modalities:
        raise FusionInputError(
            f"gamma must be one value or one per modality ({num_modalities}); got {len(values)}"
        )
    return [check_gamma(v, f"gamma[{m}]") for m, v in enumerate(values)]


def _regularized_indices(
    regularize: Sequence[int] | None,
    grams: Sequence[ArrayLike | GramFactor | None],
) -> list[int]:
    num = len(grams)
    if regularize is None:
        return [m for m, g in enumerate(grams) if g is not None]
    indices: list[int] = []
    for m in regularize:
        if isinstance(m, bool) or not isinstance(m, int):
            raise FusionInputError(f"regularize must list modality indices (ints); got {m!r}")
        if not 0 <= m < num:
            raise FusionInputError(
                f"regularize names modality {m}, but only {num} modalities were given "
                f"(valid indices 0..{num - 1})"
            )
        if grams[m] is None:
            raise FusionInputError(f"regularize names modality {m}, but grams[{m}] is None")
        if m in indices:
            raise FusionInputError(f"regularize names modality {m} twice")
        indices.append(m)
    return indices


def jacobian_fusion(
    logits: Sequence[ArrayLike],
    grams: Sequence[ArrayLike | GramFactor | None],
    log_prior: ArrayLike | None = None,
    gamma: float | Sequence[float] = 0.5,
    regularize: Sequence[int] | None = None,
    iterations: int = 1,
    *,
    solver: Solver = "auto",
    tol: float = DEFAULT_TOL,
    center_logits: bool = False,
) -> torch.Tensor:
    """Algorithm 1 for M modalities: statistical fusion with sample-wise Jacobian regularization.

    p^(0) is statistical fusion (Lemma 1). Each of the ``iterations`` (t_max) steps computes
    J^(t) = p^(t) p^(t)T - Diag(p^(t)), solves (S3) for every regularized modality m from that
    same J^(t), and recomputes (Eq. 3 in the form of Lemma 1)

        p^(t+1) = softmax( sum_m W_m z_m - (M - 1) ln freq ),   W_m = I if m is not regularized.

    gamma = 1 leaves z_m untouched, so the result is exactly statistical fusion.

    Differentiable: with the exact solver, gradients flow through the solve by implicit
    differentiation of (S3) (see :mod:`jacfusion_fed.fusion.implicit`), which stays correct when
    p has tied entries.

    Args:
        logits: M arrays of shape (N, K), raw logits z_m.
        grams: M entries; grams[m] is modality m's Gram matrix W_m W_m^T (K, K), a
            :class:`GramFactor`, or None for a modality that is not regularized.
        log_prior: ln freq, shape (K,); None for a uniform prior.
        gamma: one value in (0, 1] or one per modality.
        regularize: indices of the modalities that get a W_m (default: all with a Gram matrix).
        iterations: t_max >= 0 (the paper uses 1; 0 returns statistical fusion).
        solver: ``"exact"`` (structured Woodbury form, O(K^2) per sample, exact up to rounding),
            ``"dense"`` (eigendecompositions, O(K^3) per sample, a reference), ``"fast"``
            (support truncation with a rigorous bound: max |p - p_exact| <= ``tol``; see
            :mod:`jacfusion_fed.fusion.fast`; samples it cannot bound, and every run with
            iterations > 1, use the exact solver) or ``"auto"`` (``fast`` for K >= 48 and
            iterations == 1 when no gradient is needed, else ``exact``).
        tol: the bound for ``fast``/``auto`` on max |p - p_exact| of the fused probabilities.

    Returns:
        Fused probabilities p^(t_max), shape (N, K), on the first array's device; float64 for
        float64 logits, float32 otherwise.
    """
    _check_solver(solver)
    if not (isinstance(tol, (int, float)) and tol > 0 and tol == tol):
        raise FusionInputError(f"tol must be a positive number, got {tol!r}")
    zs = check_logits(logits)
    if not isinstance(center_logits, bool):
        raise FusionInputError(f"center_logits must be True or False, got {center_logits!r}")
    if center_logits:
        zs = [z - z.mean(dim=-1, keepdim=True) for z in zs]
    num_modalities, num_classes = len(zs), zs[0].shape[1]
    if isinstance(grams, (torch.Tensor, GramFactor)) or len(grams) != num_modalities:
        got = "a single matrix" if isinstance(grams, (torch.Tensor, GramFactor)) else len(grams)
        raise FusionInputError(
            f"grams must have one entry per modality ({num_modalities}, None where not "
            f"regularized); got {got}"
        )
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise FusionInputError(f"iterations must be an integer >= 0, got {iterations!r}")
    gammas = _per_modality_gamma(gamma, num_modalities)
    indices = _regularized_indices(regularize, grams)
    prior = check_log_prior(log_prior, num_classes, zs[0])
    device = zs[0].device

    factors: dict[int, GramFactor] = {}
    for m in indices:
        gram_m = grams[m]
        assert gram_m is not None  # guaranteed by _regularized_indices
        factors[m] = _as_factor(gram_m, num_classes, f"grams[{m}]").to(device)

    active = [m for m in indices if gammas[m] < 1.0]
    if not active or iterations == 0:
        # Nothing to regularize: the very same computation as statistical_fusion.
        return torch.softmax(combine_logits(zs, prior), dim=-1)
    z64 = [z.to(torch.float64) for z in zs]
    prior64 = prior.to(torch.float64) if prior is not None else None
    p = torch.softmax(combine_logits(z64, prior64), dim=-1)
    if solver == "auto":
        wants_grad = torch.is_grad_enabled() and any(z.requires_grad for z in zs)
        solver = "fast" if num_classes >= AUTO_FAST_MIN_K and not wants_grad else "exact"
    if solver == "fast" and iterations > 1:
        solver = "exact"  # the fast solver's bound covers one step of Algorithm 1
    for _ in range(iterations):
        p = flush_tiny(p)
        effective = list(z64)
        kappas = [1.0 / gammas[m] - 1.0 for m in active]
        if solver == "fast":
            solved, _report = fast_apply(
                p, [z64[m] for m in active], [factors[m] for m in active], kappas, tol=tol
            )
            for m, z_m in zip(active, solved, strict=True):
                effective[m] = z_m
        else:
            for m, kappa in zip(active, kappas, strict=True):
                if solver == "exact":
                    effective[m] = implicit_apply(p, z64[m], factors[m], kappa)
                else:
                    w = dense_weights(p, factors[m], kappa)
                    effective[m] = (w @ z64[m].unsqueeze(-1)).squeeze(-1)
        p = torch.softmax(combine_logits(effective, prior64), dim=-1)
    return p.to(zs[0].dtype)
