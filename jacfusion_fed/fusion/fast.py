"""A fast solver for large K: exact rows on the probability support, a series on the tail.

The exact solver (``solver.py``) costs O(K^2) elementwise work per sample because of
R_ij = 1/(1 + a_j p_i^2), one entry per (class i, Gram eigenvector j). For a class with small
p_i, t_ij = a_j p_i^2 is small and R_ij = sum_{r=0}^{q} (-t_ij)^r up to t_ij^(q+1). Each term of
that series is an outer product (p_i^(2r) times a_j^r), so on the tail T every sum over i or j
in the Woodbury form collapses to a matrix-vector product with V (one batched GEMM per power)
or to a power sum of p. The support S (the classes carrying probability mass) keeps the exact
R. Cost: O(|S| K) elementwise plus about 3q + 3 GEMM rows of length K per sample.

Why this is still an exact solve of nearby equations: the Woodbury form is exact for any
diagonal D_j, so replacing R by its truncated series R~ on T solves exactly

    (I + a_j A~_j) x_j = v_j,   A~_j = A + Diag((1/R~_ij - 1/R_ij) / a_j)  (zero on S).

Error bound (rigorous, per regularized modality): with t_j = a_j eta, eta = max_{i in T} p_i^2,
||A - A~_j||_2 <= tau_j / a_j where tau_j = (1 + t_j) t_j^(q+1) / (1 - t_j^(q+1)). From
(I + a A) (x - x~) = -a (A - A~) x~, ||(I + a A)^{-1}||_2 <= 1 and ||x~||_2 <= 1/(1 - tau),

    ||W z - W~ z||_2 <= sum_j |y_j| tau_j / (1 - tau_j),   y = V^T z.

The softmax is 1/2-Lipschitz from l_inf to l_inf (max_k sum_j |dp_k/dl_j| = max_k 2 p_k (1-p_k)
<= 1/2), so after one step of Algorithm 1, max_k |p_k - p~_k| <= 1/2 sum_m ||W_m z_m - W~_m z_m||_2.
Per sample the smallest support (from a doubling grid) that makes this <= ``tol`` is used;
samples needing more than ``max_support`` classes go to the exact solver. The bound covers one
step (t_max = 1, the paper's setting); for more iterations the caller uses the exact solver.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .gram import GramFactor
from .solver import chunk_rows, structured_apply

SERIES_ORDER = 3
"""q: terms t^0..t^q of 1/(1+t) are kept on the tail (the error is O(t^(q+1)))."""


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


def _bound(y_abs: torch.Tensor, a: torch.Tensor, eta: torch.Tensor, q: int) -> torch.Tensor:
    """sum_j |y_j| tau_j / (1 - tau_j) for each eta: y_abs (n, K), eta (n, G) -> (n, G)."""
    t = eta.unsqueeze(-1) * a  # (n, G, K)
    tq = t.pow(q + 1)
    tau = (1.0 + t) * tq / (1.0 - tq).clamp(min=1e-300)
    per_mode = torch.where(tau < 0.5, tau / (1.0 - tau), torch.full_like(tau, float("inf")))
    return (y_abs.unsqueeze(1) * per_mode).sum(dim=-1)


def _support_sizes(
    p: torch.Tensor,
    ys: list[torch.Tensor],
    factors: list[GramFactor],
    kappas: list[float],
    tol: float,
    cap: int,
    q: int,
) -> torch.Tensor:
    """Smallest support per sample meeting the bound, or cap + 1 when none does. (N,) int64."""
    candidates = _candidate_supports(cap)
    top = torch.topk(p, min(cap + 1, p.shape[1]), dim=-1).values  # descending
    pad = torch.zeros(p.shape[0], 1, dtype=p.dtype, device=p.device)
    top = torch.cat((top, pad), dim=-1)  # eta = 0 when everything is in the support
    eta = top[:, candidates].square()  # (n, G): max tail p^2 for each candidate support
    total = torch.zeros_like(eta)
    for y, factor, kappa in zip(ys, factors, kappas, strict=True):
        total += _bound(y.abs(), kappa * factor.eigenvalues, eta, q)
    ok = 0.5 * total <= tol
    sizes = torch.tensor([*candidates, cap + 1], device=p.device)
    first_ok = torch.where(
        ok.any(dim=-1),
        ok.to(torch.int64).argmax(dim=-1),
        torch.full_like(ok[:, 0], len(candidates), dtype=torch.int64),
    )
    return sizes[first_ok]


def _series(x: torch.Tensor, q: int) -> torch.Tensor:
    """(-x)^r for r = 0..q stacked on a new last axis."""
    return torch.stack([(-x).pow(r) for r in range(q + 1)], dim=-1)


def _fast_apply_chunk(
    p: torch.Tensor,
    z: torch.Tensor,
    factor: GramFactor,
    kappa: float,
    support: int,
    q: int,
) -> torch.Tensor:
    """W~ z for a chunk whose samples all need at most ``support`` exact classes."""
    vectors = factor.eigenvectors
    a = kappa * factor.eigenvalues
    u = p
    w = p * p
    s = w.sum(dim=-1, keepdim=True)
    y = z @ vectors  # V^T z
    a_pow = _series(a, q).abs()  # a^r, (K, q+1)
    sign = torch.tensor([(-1.0) ** r for r in range(q + 1)], dtype=p.dtype, device=p.device)
    coef = sign * a_pow  # (-a_j)^r, (K, q+1)
    if support > 0:
        idx = torch.topk(p, support, dim=-1).indices  # (n, s)
        # The series is summed over the tail only: on the support t = a p^2 can be >> 1.
        tail = p.scatter(1, idx, 0.0)
    else:
        tail = p
    # GEMMs: V^T p_T^k for k = 1 .. 2q+2 and V (a^r o y) for r = 1 .. q.
    powers = torch.stack([tail.pow(k) for k in range(1, 2 * q + 3)], dim=1)  # (n, 2q+2, K)
    vt_pow = powers @ vectors  # (n, 2q+2, K): [V^T p_T^k]_j
    v_ay = (y.unsqueeze(1) * a_pow.T[1:].unsqueeze(0)) @ vectors.T  # (n, q, K)
    # Tail power sums sum_{i in T} p_i^k for k = 2 .. 2q+4 give the tail part of M_j.
    psum = torch.stack([tail.pow(k).sum(-1) for k in range(2, 2 * q + 5)], dim=-1)
    # M_j and b_j: sum over T of R~_ij (...) = sum_r (-a_j)^r (tail power sums / GEMMs).
    m11 = sum(coef[:, r] * psum[:, 2 * r : 2 * r + 1] for r in range(q + 1))  # p^{2r+2}
    m12 = sum(coef[:, r] * psum[:, 2 * r + 1 : 2 * r + 2] for r in range(q + 1))  # p^{2r+3}
    m22 = sum(coef[:, r] * psum[:, 2 * r + 2 : 2 * r + 3] for r in range(q + 1))  # p^{2r+4}
    b1 = sum(coef[:, r] * vt_pow[:, 2 * r] for r in range(q + 1))  # V^T p_T^{2r+1}
    b2 = sum(coef[:, r] * vt_pow[:, 2 * r + 1] for r in range(q + 1))  # V^T p_T^{2r+2}
    if support > 0:
        u_s = torch.gather(p, 1, idx)
        w_s = u_s * u_s
        v_s = vectors[idx]  # (n, s, K)
        r_s = torch.reciprocal(1.0 + w_s.unsqueeze(-1) * a)  # exact R on the support
        m_s = torch.bmm(torch.stack((u_s * u_s, u_s * w_s, w_s * w_s), dim=1), r_s)
        b_s = torch.bmm(torch.stack((u_s, w_s), dim=1), r_s * v_s)
        m11, m12, m22 = m11 + m_s[:, 0], m12 + m_s[:, 1], m22 + m_s[:, 2]
        b1, b2 = b1 + b_s[:, 0], b2 + b_s[:, 1]
    t11 = 1.0 + a * (s * m11 - m12)
    t12 = a * (s * m12 - m22)
    t21 = -a * m11
    t22 = 1.0 - a * m12
    r1 = a * (s * b1 - b2)
    r2 = -a * b1
    det = t11 * t22 - t12 * t21
    c1 = (t22 * r1 - t12 * r2) / det
    c2 = (t11 * r2 - t21 * r1) / det
    # Every row with the series: x_i = sum_r (-p_i^2)^r [ (V(a^r o y))_i - u_i g1_r - w_i g2_r ].
    g1 = (c1 * y) @ a_pow  # (n, q+1): sum_j a_j^r c1_j y_j
    g2 = (c2 * y) @ a_pow
    neg_w = _series(w, q)  # (n, K, q+1): (-p_i^2)^r
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
    series_order: int = SERIES_ORDER,
) -> tuple[list[torch.Tensor], FastSolveReport]:
    """W_m z_m for every regularized modality m, within the bound of the module docstring.

    Args:
        p: (N, K) float64 fused prediction shared by all modalities (one step of Algorithm 1).
        zs, factors, kappas: per regularized modality, logits (N, K) float64, Gram factor and
            kappa = 1/gamma - 1.
        tol: bound on max |p~ - p| of the fused prediction after this step.
        max_support: samples needing more exact classes use the exact solver (default K // 4).
        series_order: q, the number of series terms beyond the first on the tail.

    Returns:
        The regularized logits per modality, and a :class:`FastSolveReport`.
    """
    n, k = p.shape
    cap = max(1, k // 4) if max_support is None else min(max_support, k)
    q = series_order
    ys = [z @ f.eigenvectors for z, f in zip(zs, factors, strict=True)]
    sizes = torch.empty(n, dtype=torch.int64, device=p.device)
    step = chunk_rows(k * (len(_candidate_supports(cap)) + 2), p.device)
    for start in range(0, n, step):
        sl = slice(start, start + step)
        sizes[sl] = _support_sizes(p[sl], [y[sl] for y in ys], factors, kappas, tol, cap, q)
    exact_mask = sizes > cap
    outs = [torch.empty_like(z) for z in zs]
    exact_idx = exact_mask.nonzero().squeeze(-1)
    if exact_idx.numel():
        for out, z, factor, kappa in zip(outs, zs, factors, kappas, strict=True):
            out[exact_idx] = structured_apply(p[exact_idx], z[exact_idx], factor, kappa)
    max_seen = 0
    # Group samples by their support size (a short doubling grid): per group one chunked pass.
    # Only the group sizes come back to the host; the batch itself stays on its device.
    for support in _candidate_supports(cap):
        rows_all = (sizes == support).nonzero().squeeze(-1)
        if rows_all.numel() == 0:
            continue
        max_seen = max(max_seen, support)
        rows_per_chunk = chunk_rows(k * (4 * max(support, 1) + 6 * (q + 1)), p.device)
        for start in range(0, rows_all.numel(), rows_per_chunk):
            rows = rows_all[start : start + rows_per_chunk]
            for out, z, factor, kappa in zip(outs, zs, factors, kappas, strict=True):
                out[rows] = _fast_apply_chunk(p[rows], z[rows], factor, kappa, support, q)
    report = FastSolveReport(
        fast_samples=n - int(exact_idx.numel()),
        exact_samples=int(exact_idx.numel()),
        max_support=max_seen,
        tol=tol,
    )
    return outs, report
