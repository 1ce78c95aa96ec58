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

import math
from dataclasses import dataclass

import torch

from .gram import GramFactor
from .implicit import implicit_apply
from .scratch import Workspace, borrow, reuse_enabled, scratch_budget
from .solver import (
    budget_rows,
    capacitance_solve_into,
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


def _choice_elements(k: int, cap: int, modalities: int) -> int:
    """float64 temporaries per sample of :func:`_choose_plans`: |y|, top-k, eta, and the bounds
    per (order, candidate support), per modality."""
    grid = len(_candidate_supports(cap)) * len(SERIES_ORDERS)
    return 2 * k + 3 * cap + (12 + modalities) * grid


def _choice_rows(k: int, cap: int, modalities: int, p: torch.Tensor) -> int:
    """Samples per :func:`_choose_plans` call: within a quarter of the scratch budget, or the
    pre-workspace rule when ``JACFUSION_SOLVER_SCRATCH=fresh``."""
    if reuse_enabled():
        return budget_rows(k, 4 * _choice_elements(k, cap, modalities), 0, p.device)
    return chunk_rows(k * (len(_candidate_supports(cap)) + 3), p.device)


def _chunk_shapes(n: int, k: int, support: int, q: int) -> dict[str, tuple[int, ...]]:
    """The workspace views of :func:`_fast_apply_chunk` for n samples (names -> shapes)."""
    s = max(support, 1)
    return {
        "p": (n, k), "z": (n, k), "y": (n, k), "w": (n, k), "s": (n, 1), "tail": (n, k),
        "pw": (n, 2 * q + 2, k), "pw_hi": (n, 2, k), "vt_pow": (n, 2 * q + 2, k),
        "ay": (n, q, k), "vay": (n, q, k), "psum": (n, 2 * q + 3), "mb": (n, 5, k),
        "prod": (n, q + 1, k), "cy": (n, k), "g": (n, 2, q + 1), "nw": (n, k), "nwr": (n, k),
        "term": (n, k), "tmp": (n, k), "out": (n, k),
        "us": (n, 2, s), "l3": (n, 3, s), "v_s": (n, s, k), "r_s": (n, s, k), "rv_s": (n, s, k),
        "m_s": (n, 3, k), "b_s": (n, 2, k), "gs": (n, k, 2), "corr": (n, s, 2), "first": (n, s),
        "tmp_s": (n, s), "cap": (n, 10, k),
    }  # fmt: skip


def _chunk_elements(k: int, support: int, q: int) -> int:
    """float64 elements per sample of :func:`_fast_apply_chunk`: its workspace views and the
    small copies (at most 8 K) that strided GEMM inputs make outside them."""
    views = sum(math.prod(shape) for shape in _chunk_shapes(1, k, support, q).values())
    return views + 8 * k


def _rows_per_chunk(k: int, support: int, q: int, p: torch.Tensor) -> int:
    """Samples per fast chunk: within the scratch budget, or the pre-workspace rule when
    ``JACFUSION_SOLVER_SCRATCH=fresh`` (a baseline). Its GEMMs stream V once per chunk, so
    larger chunks pay off at large K."""
    if reuse_enabled():
        return budget_rows(k, _chunk_elements(k, support, q), 0, p.device)
    return chunk_rows(k * (4 * max(support, 1) + 6 * (q + 1)), p.device)


def _fast_apply_chunk(
    ws: Workspace,
    rows: torch.Tensor,
    p: torch.Tensor,
    z: torch.Tensor,
    y: torch.Tensor,
    factor: GramFactor,
    kappa: float,
    support: int,
    q: int,
) -> torch.Tensor:
    """W~ z for the samples ``rows`` of p, z and y = V^T z, which all meet the bound with
    ``support`` exact classes and series order ``q``: an (n, K) view into ``ws``.

    Every (n, ...) temporary is a view of ``ws`` (:func:`_chunk_shapes`), written with out= and
    in-place ops; the operations and their order are those of the series form of the module
    docstring.
    """
    vectors = factor.eigenvectors
    a = kappa * factor.eigenvalues
    n, k = rows.numel(), p.shape[1]
    shapes = _chunk_shapes(n, k, support, q)
    v = dict(zip(shapes, ws.views(*shapes.values()), strict=True))
    u, zc, yc = v["p"], v["z"], v["y"]
    torch.index_select(p, 0, rows, out=u)
    torch.index_select(z, 0, rows, out=zc)
    torch.index_select(y, 0, rows, out=yc)
    w = torch.mul(u, u, out=v["w"])
    s = torch.sum(w, dim=-1, keepdim=True, out=v["s"])
    a_pow = torch.stack(_powers(a, q), dim=-1)  # a^r, (K, q+1)
    sign = torch.tensor([(-1.0) ** r for r in range(q + 1)], dtype=p.dtype, device=p.device)
    coef_t = (sign * a_pow).T  # (-a_j)^r, (q+1, K)
    tail = v["tail"].copy_(u)
    if support > 0:
        idx = torch.topk(u, support, dim=-1).indices  # (n, s)
        # The series is summed over the tail only: on the support t = a p^2 can be >> 1.
        tail.scatter_(1, idx, 0.0)
    pw, hi = v["pw"], v["pw_hi"]  # p_T^k for k = 1 .. 2q+2, and k = 2q+3, 2q+4
    pw[:, 0].copy_(tail)
    for r in range(1, 2 * q + 2):
        torch.mul(pw[:, r - 1], tail, out=pw[:, r])
    torch.mul(pw[:, 2 * q + 1], tail, out=hi[:, 0])
    torch.mul(hi[:, 0], tail, out=hi[:, 1])
    # GEMMs: V^T p_T^k for k = 1 .. 2q+2 and V (a^r o y) for r = 1 .. q.
    vt_pow = v["vt_pow"]  # (n, 2q+2, K): [V^T p_T^k]_j
    torch.mm(pw.view(-1, k), vectors, out=vt_pow.view(-1, k))
    torch.mul(yc.unsqueeze(1), a_pow.T[1:].unsqueeze(0), out=v["ay"])
    vay = v["vay"]  # (n, q, K)
    torch.mm(v["ay"].view(-1, k), vectors.T, out=vay.view(-1, k))
    # Tail power sums sum_{i in T} p_i^k, k = 2 .. 2q+4, give the tail part of M_j:
    # M_j = sum_r (-a_j)^r (sum_T p^{2r+2}, sum_T p^{2r+3}, sum_T p^{2r+4}).
    psum = v["psum"]
    for j in range(2 * q + 1):
        torch.sum(pw[:, j + 1], dim=-1, out=psum[:, j])
    torch.sum(hi, dim=-1, out=psum[:, 2 * q + 1 :])
    mb = v["mb"]  # M11, M12, M22, b1, b2 per column j, (n, 5, K)
    for j in range(3):
        torch.mm(psum[:, j : j + 2 * q + 1 : 2], coef_t, out=mb[:, j])
    # b_j = sum_r (-a_j)^r (V^T p_T^{2r+1}, V^T p_T^{2r+2}).
    for j in range(2):
        torch.sum(torch.mul(vt_pow[:, j::2], coef_t, out=v["prod"]), dim=1, out=mb[:, 3 + j])
    if support > 0:
        us, l3, r_s, rv_s = v["us"], v["l3"], v["r_s"], v["rv_s"]  # us = (u_s, w_s)
        u_s, w_s = us[:, 0], us[:, 1]
        torch.gather(u, 1, idx, out=u_s)
        torch.mul(u_s, u_s, out=w_s)
        v_s = v["v_s"]
        torch.index_select(vectors, 0, idx.view(-1), out=v_s.view(-1, k))  # (n, s, K)
        torch.mul(w_s.unsqueeze(-1), a, out=r_s)
        r_s.add_(1.0).reciprocal_()  # exact R on the support
        torch.mul(u_s, u_s, out=l3[:, 0])
        torch.mul(u_s, w_s, out=l3[:, 1])
        torch.mul(w_s, w_s, out=l3[:, 2])
        mb[:, :3].add_(torch.bmm(l3, r_s, out=v["m_s"]))
        mb[:, 3:].add_(torch.bmm(us, torch.mul(r_s, v_s, out=rv_s), out=v["b_s"]))
    m3, b2 = (mb[:, 0], mb[:, 1], mb[:, 2]), (mb[:, 3], mb[:, 4])
    c1, c2 = capacitance_solve_into(a, s, m3, b2, v["cap"])
    # Every row with the series: x_i = sum_r (-p_i^2)^r [ (V(a^r o y))_i - u_i g1_r - w_i g2_r ].
    g, cy = v["g"], v["cy"]  # g1, g2 (n, q+1): sum_j a_j^r c_j y_j
    torch.mm(torch.mul(c1, yc, out=cy), a_pow, out=g[:, 0])
    torch.mm(torch.mul(c2, yc, out=cy), a_pow, out=g[:, 1])
    out, term, tmp, nw, nwr = v["out"], v["term"], v["tmp"], v["nw"], v["nwr"]
    torch.neg(w, out=nw)
    for r in range(q + 1):
        torch.sub(
            zc if r == 0 else vay[:, r - 1], torch.mul(u, g[:, 0, r : r + 1], out=tmp), out=term
        )
        term.sub_(torch.mul(w, g[:, 1, r : r + 1], out=tmp))
        if r == 0:
            out.copy_(term)
            continue
        if r == 1:
            nwr.copy_(nw)
        else:
            nwr.mul_(nw)  # (-p_i^2)^r
        out.add_(term.mul_(nwr))
    if support > 0:
        gs, first, tmp_s = v["gs"], v["first"], v["tmp_s"]
        torch.mul(c1, yc, out=gs[..., 0])
        torch.mul(c2, yc, out=gs[..., 1])
        torch.bmm(rv_s, yc.unsqueeze(-1), out=first.unsqueeze(-1))
        corr = torch.bmm(r_s, gs, out=v["corr"])
        first.sub_(torch.mul(u_s, corr[..., 0], out=tmp_s))
        first.sub_(torch.mul(w_s, corr[..., 1], out=tmp_s))
        out.scatter_(1, idx, first)
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

    Memory: rows go in blocks whose y = V^T z fill a quarter of
    :func:`.scratch.scratch_budget`, and each chunk of the series form is a set of views of a
    reused workspace within the budget, so scratch stays bounded whatever N is. When autograd
    records (p or a z requires grad), every sample takes the exact solver's differentiable
    path (:func:`.implicit.implicit_apply`) instead.
    """
    n, k = p.shape
    if not all(woodbury_is_accurate(f, kappa) for f, kappa in zip(factors, kappas, strict=True)):
        # Tiny gamma: the exact solver switches to the dense form; the series has no advantage.
        outs = [
            structured_apply(p, z, f, kappa)
            for z, f, kappa in zip(zs, factors, kappas, strict=True)
        ]
        return outs, FastSolveReport(fast_samples=0, exact_samples=n, max_support=0, tol=tol)
    tensors = (p, *zs, *(t for f in factors for t in (f.eigenvalues, f.eigenvectors)))
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        # A graph to record: the exact solver's implicit gradients (no out=/in-place ops).
        outs = [
            implicit_apply(p, z, f, kappa) for z, f, kappa in zip(zs, factors, kappas, strict=True)
        ]
        return outs, FastSolveReport(fast_samples=0, exact_samples=n, max_support=0, tol=tol)
    cap = max(1, k // 4) if max_support is None else min(max_support, k)
    plans = _plans(k, cap)
    outs = [torch.empty((n, k), dtype=z.dtype, device=z.device) for z in zs]
    # Blocks of rows whose y = V^T z per modality take a quarter of the scratch budget (the
    # whole batch at once with JACFUSION_SOLVER_SCRATCH=fresh, as before the workspace).
    block = max(1, scratch_budget(p.device) // (32 * k * len(zs))) if reuse_enabled() else n
    step = _choice_rows(k, cap, len(zs), p)
    exact_count = max_seen = 0
    with borrow(p.device, p.dtype) as ws_y, borrow(p.device, p.dtype) as ws:
        for b0 in range(0, n, block):
            blk = slice(b0, b0 + block)
            pb, zb = p[blk], [z[blk] for z in zs]
            ys = ws_y.views(*[(pb.shape[0], k)] * len(zs))
            for y, z, f in zip(ys, zb, factors, strict=True):
                torch.mm(z, f.eigenvectors, out=y)  # y = V^T z
            choice = torch.cat(
                [
                    _choose_plans(pb[i : i + step], [y[i : i + step] for y in ys], factors,
                                  kappas, tol, cap)
                    for i in range(0, pb.shape[0], step)
                ]
            )  # fmt: skip
            exact_idx = (choice < 0).nonzero().squeeze(-1)
            exact_count += int(exact_idx.numel())
            if exact_idx.numel():
                for out, z, factor, kappa in zip(outs, zb, factors, kappas, strict=True):
                    out[blk][exact_idx] = structured_apply(
                        pb[exact_idx], z[exact_idx], factor, kappa
                    )
            # One chunked pass per plan (a short list); only the group sizes come back to the
            # host, the batch itself stays on its device.
            for plan_id, (q, support) in enumerate(plans):
                rows_all = (choice == plan_id).nonzero().squeeze(-1)
                if rows_all.numel() == 0:
                    continue
                max_seen = max(max_seen, support)
                per_chunk = _rows_per_chunk(k, support, q, p)
                for start in range(0, rows_all.numel(), per_chunk):
                    rows = rows_all[start : start + per_chunk]
                    for out, z, y, f, kappa in zip(outs, zb, ys, factors, kappas, strict=True):
                        solved = _fast_apply_chunk(ws, rows, pb, z, y, f, kappa, support, q)
                        out[blk].index_copy_(0, rows, solved)
    report = FastSolveReport(
        fast_samples=n - exact_count,
        exact_samples=exact_count,
        max_support=max_seen,
        tol=tol,
    )
    return outs, report
