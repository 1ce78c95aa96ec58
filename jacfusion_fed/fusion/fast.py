"""A fast solver for large K: exact rows on the probability support, a series on the tail.

The exact solver (``solver.py``) costs O(K^2) elementwise work per sample because of
R_ij = 1/(1 + a_j p_i^2), one entry per (class i, Gram eigenvector j). For a class with small
p_i, t_ij = a_j p_i^2 is small and R_ij = sum_{r=0}^{q} (-t_ij)^r up to t_ij^(q+1). Each term of
that series is an outer product (p_i^(2r) times a_j^r), so on the tail T every sum over i or j
in the Woodbury form collapses to a matrix-vector product with V (one batched GEMM per power)
or to a power sum of p. The support S (the classes carrying probability mass) keeps the exact
R. Cost: O(|S| K) elementwise plus 3q + 3 GEMM rows of length K per sample; per sample the
cheapest (q in 1..3, |S| on a doubling grid) that meets the bound below is used.

Why this is still an exact solve of nearby equations: the Woodbury form is exact for any
diagonal D_j, so replacing R by its truncated series R~ on T solves exactly

    (I + a_j A~_j) x_j = v_j,   A~_j = A + Diag((1/R~_ij - 1/R_ij) / a_j)  (zero on S).

Error bound (rigorous, per regularized modality): with t_j = a_j eta, eta = max_{i in T} p_i^2,
||A - A~_j||_2 <= tau_j / a_j where tau_j = (1 + t_j) t_j^(q+1) / (1 - t_j^(q+1)). From
(I + a A) (x - x~) = -a (A - A~) x~, ||(I + a A)^{-1}||_2 <= 1 and ||x~||_2 <= 1/(1 - tau),

    ||W z - W~ z||_2 <= sum_j |y_j| tau_j / (1 - tau_j),   y = V^T z.

The softmax is 1/2-Lipschitz from l_inf to l_inf (max_k sum_j |dp_k/dl_j| = max_k 2 p_k (1-p_k)
<= 1/2), so after one step of Algorithm 1, max_k |p_k - p~_k| <= 1/2 sum_m ||W_m z_m - W~_m z_m||_2.
Only plans that make this <= ``tol`` are used; samples for which no plan with at most
``max_support`` exact classes does go to the exact solver. The bound covers one
step (t_max = 1, the paper's setting); for more iterations the caller uses the exact solver.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .gram import GramFactor
from .scratch import reuse_enabled
from .solver import (
    budget_rows,
    capacitance_solve,
    chunk_rows,
    structured_apply,
    woodbury_is_accurate,
)

SERIES_ORDERS = (1, 2, 3)
"""q: terms t^0..t^q of 1/(1+t) kept on the tail (error O(t^(q+1))); chosen per sample."""
_GEMM_WEIGHT = 0.1
"""Relative cost of one GEMM row of length K per series order against one exact support row
(BLAS runs about ten times more flops per second than elementwise passes)."""


@dataclass(frozen=True)
class FastSolveReport:
    """How a fast solve went: samples on each path, the largest support used, the bound."""

    fast_samples: int
    exact_samples: int
    max_support: int
    tol: float


def _candidate_supports(cap: int) -> list[int]:
    sizes, s = [0], 1
    while s < cap:
        sizes.append(s)
        s *= 2
    sizes.append(cap)
    return sizes


def _bounds(y_abs: torch.Tensor, a: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
    """An upper bound on sum_j |y_j| tau_j / (1 - tau_j) per series order q and candidate eta.

    With t_j = a_j eta <= t_max = a_max eta, tau_j / (1 - tau_j) <= t_j^(q+1) C_q(t_max) where
    C_q(t) = (1 + t) / ((1 - t^(q+1)) (1 - tau(t))) is increasing in t, so the sum is at most
    eta^(q+1) C_q(t_max) sum_j |y_j| a_j^(q+1): O(K) per sample and q, O(1) per candidate.

    y_abs (n, K), a (K,), eta (n, G) -> (Q, n, G) for q in :data:`SERIES_ORDERS`.
    """
    a_max = float(a.max()) if a.numel() else 0.0
    t_max = eta * a_max
    out = []
    for q in SERIES_ORDERS:
        weighted = y_abs @ a.pow(q + 1)  # sum_j |y_j| a_j^(q+1), (n,)
        tq = t_max.pow(q + 1)
        tau = (1.0 + t_max) * tq / (1.0 - tq).clamp(min=1e-300)
        c = (1.0 + t_max) / ((1.0 - tq) * (1.0 - tau)).clamp(min=1e-300)
        bound = eta.pow(q + 1) * c * weighted.unsqueeze(-1)
        feasible = (t_max < 1.0) & (tau < 0.5)
        out.append(torch.where(feasible, bound, torch.full_like(bound, float("inf"))))
    return torch.stack(out)


def _plans(k: int, cap: int) -> list[tuple[int, int]]:
    """Every (series order q, support size) a sample may be assigned, cheapest first."""
    combos = [(q, s) for q in SERIES_ORDERS for s in _candidate_supports(cap)]
    return sorted(combos, key=lambda qs: _GEMM_WEIGHT * (3 * qs[0] + 3) * k + qs[1])


def _choose_plans(
    p: torch.Tensor,
    ys: list[torch.Tensor],
    factors: list[GramFactor],
    kappas: list[float],
    tol: float,
    cap: int,
) -> torch.Tensor:
    """Per sample, the index into ``_plans(K, cap)`` of the cheapest plan meeting the bound,
    or -1 when none does (the sample goes to the exact solver). Shape (N,) int64."""
    candidates = _candidate_supports(cap)
    top = torch.topk(p, min(cap + 1, p.shape[1]), dim=-1).values  # descending
    pad = torch.zeros(p.shape[0], 1, dtype=p.dtype, device=p.device)
    top = torch.cat((top, pad), dim=-1)  # eta = 0 when everything is in the support
    eta = top[:, candidates].square()  # (n, G): max tail p^2 for each candidate support
    total = torch.zeros((len(SERIES_ORDERS), *eta.shape), dtype=p.dtype, device=p.device)
    for y, factor, kappa in zip(ys, factors, kappas, strict=True):
        total += _bounds(y.abs(), kappa * factor.eigenvalues, eta)
    ok = 0.5 * total <= tol  # (Q, n, G)
    plans = _plans(p.shape[1], cap)
    q_index = {q: i for i, q in enumerate(SERIES_ORDERS)}
    s_index = {s: i for i, s in enumerate(candidates)}
    # ok flattened in plan order (cheapest first): the first True is the cheapest feasible plan.
    ordered = torch.stack([ok[q_index[q], :, s_index[s]] for q, s in plans], dim=-1)
    first = ordered.to(torch.int64).argmax(dim=-1)
    return torch.where(ordered.any(dim=-1), first, torch.full_like(first, -1))


def _powers(x: torch.Tensor, top: int) -> list[torch.Tensor]:
    """[x^0, x^1, ..., x^top] by repeated multiplication."""
    out = [torch.ones_like(x), x]
    for _ in range(top - 1):
        out.append(out[-1] * x)
    return out


def _rows(k: int, elements: int, legacy_elements: int, p: torch.Tensor) -> int:
    """Samples per chunk: ``elements`` float64 temporaries per sample within the scratch
    budget, or the pre-workspace rule when ``JACFUSION_SOLVER_SCRATCH=fresh`` (a baseline)."""
    if reuse_enabled():
        return budget_rows(k, elements, 0, p.device)
    return chunk_rows(legacy_elements, p.device)


def _choice_elements(k: int, cap: int, modalities: int) -> int:
    """float64 temporaries per sample of :func:`_choose_plans`: |y|, top-k, eta, and the bounds
    per (order, candidate support), per modality."""
    grid = len(_candidate_supports(cap)) * len(SERIES_ORDERS)
    return 2 * k + 3 * cap + (12 + modalities) * grid


def _chunk_elements(k: int, support: int, q: int) -> int:
    """float64 temporaries per sample of :func:`_fast_apply_chunk` (and the gathered rows):
    powers of p_T and of -p^2 (3q + 6 rows of K), the GEMM inputs and outputs (6q + 4), the
    series terms (5 (q + 1)), the capacitance solve (16), and 5 (support, K) arrays."""
    return k * (3 * q + 6 + 6 * q + 4 + 5 * (q + 1) + 16 + 8) + 5 * support * k


def _fast_apply_chunk(
    p: torch.Tensor,
    z: torch.Tensor,
    y: torch.Tensor,
    factor: GramFactor,
    kappa: float,
    support: int,
    q: int,
) -> torch.Tensor:
    """W~ z for a chunk whose samples all meet the bound with ``support`` exact classes and
    series order ``q``; ``y`` = V^T z."""
    vectors = factor.eigenvectors
    a = kappa * factor.eigenvalues
    u = p
    w = p * p
    s = w.sum(dim=-1, keepdim=True)
    a_pow = torch.stack(_powers(a, q), dim=-1)  # a^r, (K, q+1)
    sign = torch.tensor([(-1.0) ** r for r in range(q + 1)], dtype=p.dtype, device=p.device)
    coef = sign * a_pow  # (-a_j)^r, (K, q+1)
    if support > 0:
        idx = torch.topk(p, support, dim=-1).indices  # (n, s)
        # The series is summed over the tail only: on the support t = a p^2 can be >> 1.
        tail = p.scatter(1, idx, 0.0)
    else:
        tail = p
    pw = _powers(tail, 2 * q + 4)  # p_T^k, k = 0 .. 2q+4
    # GEMMs: V^T p_T^k for k = 1 .. 2q+2 and V (a^r o y) for r = 1 .. q.
    vt_pow = torch.stack(pw[1 : 2 * q + 3], dim=1) @ vectors  # (n, 2q+2, K): [V^T p_T^k]_j
    v_ay = (y.unsqueeze(1) * a_pow.T[1:].unsqueeze(0)) @ vectors.T  # (n, q, K)
    # Tail power sums sum_{i in T} p_i^k, k = 2 .. 2q+4, give the tail part of M_j:
    # M_j = sum_r (-a_j)^r (sum_T p^{2r+2}, sum_T p^{2r+3}, sum_T p^{2r+4}).
    psum = torch.stack([x.sum(-1) for x in pw[2:]], dim=-1)  # (n, 2q+3)
    coef_t = coef.T  # (q+1, K)
    m11 = psum[:, 0 : 2 * q + 1 : 2] @ coef_t
    m12 = psum[:, 1 : 2 * q + 2 : 2] @ coef_t
    m22 = psum[:, 2 : 2 * q + 3 : 2] @ coef_t
    # b_j = sum_r (-a_j)^r (V^T p_T^{2r+1}, V^T p_T^{2r+2}).
    b1 = (vt_pow[:, 0::2] * coef_t).sum(dim=1)
    b2 = (vt_pow[:, 1::2] * coef_t).sum(dim=1)
    if support > 0:
        u_s = torch.gather(p, 1, idx)
        w_s = u_s * u_s
        v_s = vectors[idx]  # (n, s, K)
        r_s = torch.reciprocal(1.0 + w_s.unsqueeze(-1) * a)  # exact R on the support
        m_s = torch.bmm(torch.stack((u_s * u_s, u_s * w_s, w_s * w_s), dim=1), r_s)
        b_s = torch.bmm(torch.stack((u_s, w_s), dim=1), r_s * v_s)
        m11, m12, m22 = m11 + m_s[:, 0], m12 + m_s[:, 1], m22 + m_s[:, 2]
        b1, b2 = b1 + b_s[:, 0], b2 + b_s[:, 1]
    c1, c2 = capacitance_solve(a, s, (m11, m12, m22), (b1, b2))
    # Every row with the series: x_i = sum_r (-p_i^2)^r [ (V(a^r o y))_i - u_i g1_r - w_i g2_r ].
    g1 = (c1 * y) @ a_pow  # (n, q+1): sum_j a_j^r c1_j y_j
    g2 = (c2 * y) @ a_pow
    neg_w = torch.stack(_powers(-w, q), dim=-1)  # (n, K, q+1): (-p_i^2)^r
    v_terms = torch.cat((z.unsqueeze(-1), v_ay.transpose(1, 2)), dim=-1)  # (n, K, q+1)
    out = (
        neg_w * (v_terms - u.unsqueeze(-1) * g1.unsqueeze(1) - w.unsqueeze(-1) * g2.unsqueeze(1))
    ).sum(-1)
    if support > 0:
        first = torch.bmm(r_s * v_s, y.unsqueeze(-1)).squeeze(-1)
        corr = torch.bmm(r_s, torch.stack((c1 * y, c2 * y), dim=-1))
        rows = first - u_s * corr[..., 0] - w_s * corr[..., 1]
        out = out.scatter(1, idx, rows)
    return out


def fast_apply(
    p: torch.Tensor,
    zs: list[torch.Tensor],
    factors: list[GramFactor],
    kappas: list[float],
    *,
    tol: float,
    max_support: int | None = None,
) -> tuple[list[torch.Tensor], FastSolveReport]:
    """W_m z_m for every regularized modality m, within the bound of the module docstring.

    Args:
        p: (N, K) float64 fused prediction shared by all modalities (one step of Algorithm 1).
        zs, factors, kappas: per regularized modality, logits (N, K) float64, Gram factor and
            kappa = 1/gamma - 1.
        tol: bound on max |p~ - p| of the fused prediction after this step.
        max_support: samples needing more exact classes use the exact solver (default K // 4).

    Returns:
        The regularized logits per modality, and a :class:`FastSolveReport`.
    """
    n, k = p.shape
    if not all(woodbury_is_accurate(f, kappa) for f, kappa in zip(factors, kappas, strict=True)):
        # Tiny gamma: the exact solver switches to the dense form; the series has no advantage.
        outs = [
            structured_apply(p, z, f, kappa)
            for z, f, kappa in zip(zs, factors, kappas, strict=True)
        ]
        return outs, FastSolveReport(fast_samples=0, exact_samples=n, max_support=0, tol=tol)
    cap = max(1, k // 4) if max_support is None else min(max_support, k)
    ys = [z @ f.eigenvectors for z, f in zip(zs, factors, strict=True)]  # y = V^T z
    plans = _plans(k, cap)
    choice = torch.empty(n, dtype=torch.int64, device=p.device)
    step = _rows(k, _choice_elements(k, cap, len(zs)), k * (len(_candidate_supports(cap)) + 3), p)
    for start in range(0, n, step):
        sl = slice(start, start + step)
        choice[sl] = _choose_plans(p[sl], [y[sl] for y in ys], factors, kappas, tol, cap)
    outs = [torch.empty_like(z) for z in zs]
    exact_idx = (choice < 0).nonzero().squeeze(-1)
    if exact_idx.numel():
        for out, z, factor, kappa in zip(outs, zs, factors, kappas, strict=True):
            out[exact_idx] = structured_apply(p[exact_idx], z[exact_idx], factor, kappa)
    max_seen = 0
    # One chunked pass per plan (a short list); only the group sizes come back to the host,
    # the batch itself stays on its device.
    for plan_id, (q, support) in enumerate(plans):
        rows_all = (choice == plan_id).nonzero().squeeze(-1)
        if rows_all.numel() == 0:
            continue
        max_seen = max(max_seen, support)
        legacy = k * (4 * max(support, 1) + 6 * (q + 1))
        rows_per_chunk = _rows(k, _chunk_elements(k, support, q), legacy, p)
        for start in range(0, rows_all.numel(), rows_per_chunk):
            rows = rows_all[start : start + rows_per_chunk]
            for out, z, y, factor, kappa in zip(outs, zs, ys, factors, kappas, strict=True):
                out[rows] = _fast_apply_chunk(p[rows], z[rows], y[rows], factor, kappa, support, q)
    report = FastSolveReport(
        fast_samples=n - int(exact_idx.numel()),
        exact_samples=int(exact_idx.numel()),
        max_support=max_seen,
        tol=tol,
    )
    return outs, report
