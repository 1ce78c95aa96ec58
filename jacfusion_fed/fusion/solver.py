"""Batched solvers for the relaxed Jacobian loss (Eq. 5) via its Sylvester form (S3).

For one sample with fused prediction p in R^K, J = p p^T - Diag(p) (Eq. 4), a Gram matrix
G = W_A W_A^T and kappa = 1/gamma - 1, the minimiser W_a of Eq. (5) solves (S3) written without
inverting G:

    kappa J^2 W_a G + W_a = I.                                                     (S3')

With G = V Diag(sigma) V^T (shared by the batch) and x_j = W_a v_j, (S3') splits into K
independent K x K systems,

    (I + a_j J^2) x_j = v_j,   a_j = kappa sigma_j >= 0,

each symmetric positive definite with eigenvalues >= 1, so the solution exists and is unique for
every p and every PSD G, singular G included (a_j = 0 gives x_j = v_j).

``exact`` solver (O(K^2) per sample, no per-sample eigendecomposition): J is diagonal plus rank
one, hence J^2 = P^2 + U C U^T with P = Diag(p), U = [p, p*p] (K x 2) and
C = [[s, -1], [-1, 0]], s = p^T p. With D_j = I + a_j P^2 (diagonal), Woodbury's identity gives

    x_j = D_j^{-1} v_j - D_j^{-1} U c_j,
    c_j = (I_2 + a_j C U^T D_j^{-1} U)^{-1} a_j C U^T D_j^{-1} v_j,

so W_a = X V^T with X = R o (V - p c_1^T - (p*p) c_2^T), R_ij = 1 / (1 + a_j p_i^2).
Applied to a logit vector z, W_a z = X (V^T z) needs only matrix-vector products.

``dense`` solver (reference, O(K^3) per sample): J = Q Diag(lambda) Q^T, then
W_a = Q [ (Q^T V) / (1 + kappa lambda_i^2 sigma_j) ] V^T.

Both work in float64 whatever the input dtype: J^2 for a nearly one-hot p is a small difference
of O(1) terms, and float32 loses it (float32 eigh may not even converge there).

Memory: without autograd, the exact solver works in chunks whose temporaries (two (n, K, kb)
arrays, R and R o V, plus O(n K) ones) are views of a reused workspace (:mod:`.scratch`), at
most :func:`.scratch.scratch_budget` bytes whatever N is; for very large K the K systems are
taken kb at a time. With autograd recording (or ``JACFUSION_SOLVER_SCRATCH=fresh``) it runs the
allocating form below (:func:`_structured_parts`), whose graph keeps its temporaries anyway.
"""

from __future__ import annotations

import math

import torch

from .gram import GramFactor
from .scratch import borrow, plan_chunk, reuse_enabled, scratch_budget

_CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 27}
"""The allocating paths (autograd, dense form, backward pass) process samples in chunks of about
this many (N x K x K) elements."""


_TINY_PROBABILITY = 1e-60
"""Probabilities below this are set to 0 before the solve: p^4 then stays a normal float64
(denormals slow CPU arithmetic down a hundredfold) and the change is far below rounding."""


def flush_tiny(p: torch.Tensor) -> torch.Tensor:
    """p with entries below 1e-60 set to 0 (the J it defines changes by < 1e-60)."""
    return torch.where(p < _TINY_PROBABILITY, torch.zeros_like(p), p)


def chunk_rows(elements_per_sample: int, device: torch.device) -> int:
    """How many samples the allocating paths process at once when each needs this many
    elements per (N x ...) temporary (the pre-workspace rule; see :data:`_CHUNK_ELEMENTS`)."""
    budget = _CHUNK_ELEMENTS.get(device.type, 1 << 22)
    return max(1, budget // max(1, elements_per_sample))


def chunk_size(num_classes: int, device: torch.device) -> int:
    return chunk_rows(num_classes * num_classes, device)


def budget_rows(num_classes: int, per_row: int, per_cell: int, device: torch.device) -> int:
    """Samples per chunk for an allocating path whose chunk holds per_row (n, 1) float64
    elements and per_cell (n, K, K) ones per sample, within :func:`.scratch.scratch_budget`
    (at least 1 sample)."""
    return plan_chunk(num_classes, per_row, per_cell, scratch_budget(device))[0]


def _structured_parts(
    p: torch.Tensor, a: torch.Tensor, rhs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Woodbury pieces for the K systems (I + a_j J^2) x_j = rhs[:, j] of a chunk.

    Args:
        p: (n, K) probabilities; a: (K,) = kappa sigma; rhs: (K, K) shared or (n, K, K).

    Returns:
        R (n, K, K) with R_ij = 1/(1 + a_j p_i^2), R o rhs, c_1 and c_2 (n, K), so that
        x_j = (R o rhs)[:, j] - R[:, j] o (p c_1j + p^2 c_2j).
    """
    u = p
    w = p * p
    s = w.sum(dim=-1, keepdim=True)  # (n, 1)
    r = torch.reciprocal(1.0 + w.unsqueeze(-1) * a)  # (n, K, K)
    r_rhs = r * rhs
    # M_j = U^T D_j^{-1} U (2 x 2, symmetric) and b_j = U^T D_j^{-1} rhs_j, for all j at once.
    m = torch.bmm(torch.stack((u * u, u * w, w * w), dim=1), r)  # (n, 3, K)
    b = torch.bmm(torch.stack((u, w), dim=1), r_rhs)  # (n, 2, K)
    m11, m12, m22 = m.unbind(dim=1)
    b1, b2 = b.unbind(dim=1)
    c1, c2 = capacitance_solve(a, s, (m11, m12, m22), (b1, b2))
    return r, r_rhs, c1, c2


def capacitance_solve(
    a: torch.Tensor,
    s: torch.Tensor,
    m: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    b: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """c_j = (I_2 + a_j C M_j)^{-1} a_j C b_j for every j, C = [[s, -1], [-1, 0]].

    ``m`` holds the entries (M11, M12, M22) of the symmetric 2 x 2 M_j = U^T D_j^{-1} U and
    ``b`` the entries of b_j = U^T D_j^{-1} rhs_j, each (n, K); the 2 x 2 solve is Cramer's rule.
    """
    m11, m12, m22 = m
    b1, b2 = b
    t11 = 1.0 + a * (s * m11 - m12)
    t12 = a * (s * m12 - m22)
    t21 = -a * m11
    t22 = 1.0 - a * m12
    r1 = a * (s * b1 - b2)
    r2 = -a * b1
    det = t11 * t22 - t12 * t21
    return (t22 * r1 - t12 * r2) / det, (t11 * r2 - t21 * r1) / det


def capacitance_solve_into(
    a: torch.Tensor,
    s: torch.Tensor,
    m: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    b: tuple[torch.Tensor, torch.Tensor],
    scratch: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`capacitance_solve` written into ``scratch`` (n, 10, kb), no allocation of (n, kb)
    arrays: the same operations in the same order (bit-identical results; no autograd).

    Returns c_1, c_2 as views of ``scratch`` (rows 8 and 9).
    """
    m11, m12, m22 = m
    b1, b2 = b
    t11, t12, t21, t22, r1, r2, det, tmp, c1, c2 = scratch.unbind(dim=1)
    neg_a = -a
    torch.mul(s, m11, out=t11).sub_(m12).mul_(a).add_(1.0)  # 1 + a (s M11 - M12)
    torch.mul(s, m12, out=t12).sub_(m22).mul_(a)  # a (s M12 - M22)
    torch.mul(neg_a, m11, out=t21)  # -a M11
    torch.mul(a, m12, out=t22).neg_().add_(1.0)  # 1 - a M12
    torch.mul(s, b1, out=r1).sub_(b2).mul_(a)  # a (s b1 - b2)
    torch.mul(neg_a, b1, out=r2)  # -a b1
    torch.mul(t11, t22, out=det).sub_(torch.mul(t12, t21, out=tmp))
    torch.mul(t22, r1, out=c1).sub_(torch.mul(t12, r2, out=tmp)).div_(det)
    torch.mul(t11, r2, out=c2).sub_(torch.mul(t21, r1, out=tmp)).div_(det)
    return c1, c2


def structured_solutions(p: torch.Tensor, a: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """X with columns x_j = (I + a_j J^2)^{-1} rhs[:, j], shape (n, K, K), for a chunk."""
    r, r_rhs, c1, c2 = _structured_parts(p, a, rhs)
    return r_rhs - r * (p.unsqueeze(-1) * c1.unsqueeze(1) + (p * p).unsqueeze(-1) * c2.unsqueeze(1))


WOODBURY_MAX_GAIN = 1e5
"""Largest kappa * sigma_max for the Woodbury form: its rounding error grows like
1e-16 * kappa * sigma_max (measured against 60-digit arithmetic: 1e-13 at 1e4, 4e-9 at 1e8),
while the dense form's stays near 1e-11 up to 1e14. Beyond it the exact solver uses the dense
form (gamma this small is rare: it means kappa = 1/gamma - 1 > 1e5 / sigma_max)."""


def woodbury_is_accurate(factor: GramFactor, kappa: float) -> bool:
    """Whether the O(K^2) Woodbury form is accurate for this head and kappa."""
    sigma_max = float(factor.eigenvalues.max()) if factor.eigenvalues.numel() else 0.0
    return kappa * sigma_max <= WOODBURY_MAX_GAIN


def dense_apply(p: torch.Tensor, z: torch.Tensor, factor: GramFactor, kappa: float) -> torch.Tensor:
    """W_a z via :func:`dense_weights`, chunked: (N, K) float64 -> (N, K) float64. O(N K^3)."""
    out = torch.empty_like(z)
    k = p.shape[1]
    step = budget_rows(k, 4 * k, 8, p.device)  # J, Q, Q^T V, the ratio, two products, W
    for start in range(0, p.shape[0], step):
        sl = slice(start, start + step)
        out[sl] = (dense_weights(p[sl], factor, kappa) @ z[sl].unsqueeze(-1)).squeeze(-1)
    return out


def _reusable(*tensors: torch.Tensor) -> bool:
    """Whether the workspace path may run: reuse is on, autograd records nothing on these
    tensors (out=/in-place ops would break the graph), and they share one dtype."""
    if not reuse_enabled():
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return len({t.dtype for t in tensors}) == 1


def structured_apply(
    p: torch.Tensor, z: torch.Tensor, factor: GramFactor, kappa: float
) -> torch.Tensor:
    """W_a z for every sample: p, z of shape (N, K) float64 -> (N, K) float64. O(N K^2).

    Uses the dense form instead when kappa * sigma_max exceeds :data:`WOODBURY_MAX_GAIN`.
    Scratch memory is bounded by :func:`.scratch.scratch_budget` (reused between chunks)
    unless autograd records the call.
    """
    if kappa == 0.0:
        return z.clone()
    if not woodbury_is_accurate(factor, kappa):
        return dense_apply(p, z, factor, kappa)
    vectors = factor.eigenvectors
    a = kappa * factor.eigenvalues
    if _reusable(p, z, vectors, a):
        return _workspace_apply(p, z, a, vectors)
    out = torch.empty_like(z)
    step = chunk_size(p.shape[1], p.device)
    for start in range(0, p.shape[0], step):
        pc = p[start : start + step]
        r, rv, c1, c2 = _structured_parts(pc, a, vectors)
        y = z[start : start + step] @ vectors  # y = V^T z, (n, K)
        # X y = (R o V) y - p o (R (c_1 o y)) - (p*p) o (R (c_2 o y))
        first = torch.bmm(rv, y.unsqueeze(-1)).squeeze(-1)
        corr = torch.bmm(r, torch.stack((c1 * y, c2 * y), dim=-1))  # (n, K, 2)
        out[start : start + step] = first - pc * corr[..., 0] - pc * pc * corr[..., 1]
    return out


_APPLY_PER_ROW = 9
"""(n, K)-sized temporaries per row of :func:`_workspace_apply` (y, 5 rows of U-products,
X y's two correction columns and its first term), in units of K."""
_APPLY_PER_COL = 17
"""(n, kb)-sized ones (M 3, b 2, c o y 2, 10 for :func:`capacitance_solve_into`), in units of K."""


def _heads(
    buffers: tuple[torch.Tensor, ...], shapes: tuple[tuple[int, ...], ...]
) -> list[torch.Tensor]:
    """The first prod(shape) elements of each contiguous buffer, viewed with that shape (a
    block of kb <= cols eigenvectors inside buffers sized for cols)."""
    return [t.view(-1)[: math.prod(s)].view(s) for t, s in zip(buffers, shapes, strict=True)]


def _u_products(p: torch.Tensor, lhs: torch.Tensor, s: torch.Tensor) -> None:
    """Fill lhs (n, 5, K) with rows u, w, w, u w, w w (u = p, w = p*p; rows 0:2 are U^T,
    rows 2:5 give M_j) and s (n, 1) with p^T p, for a chunk of p (n, K)."""
    torch.mul(p, p, out=lhs[:, 1])
    lhs[:, 0].copy_(p)
    lhs[:, 2].copy_(lhs[:, 1])
    torch.mul(p, lhs[:, 1], out=lhs[:, 3])
    torch.mul(lhs[:, 1], lhs[:, 1], out=lhs[:, 4])
    torch.sum(lhs[:, 1], dim=-1, keepdim=True, out=s)


def _woodbury_block(
    lhs: torch.Tensor,
    s: torch.Tensor,
    a: torch.Tensor,
    vectors: torch.Tensor,
    r: torch.Tensor,
    rv: torch.Tensor,
    m: torch.Tensor,
    b: torch.Tensor,
    cap: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """R, R o V (into ``r``, ``rv``, (n, K, kb)) and c_1, c_2 (n, kb, views of ``cap``) for
    columns a (kb,), vectors (K, kb) of one chunk; ``m`` (n, 3, kb), ``b`` (n, 2, kb) and
    ``cap`` (n, 10, kb) are scratch."""
    torch.mul(lhs[:, 1].unsqueeze(-1), a, out=r)
    r.add_(1.0).reciprocal_()  # R_ij = 1 / (1 + a_j p_i^2)
    torch.bmm(lhs[:, 2:], r, out=m)  # M_j = U^T D_j^{-1} U, entries (11, 12, 22)
    torch.mul(r, vectors, out=rv)
    torch.bmm(lhs[:, :2], rv, out=b)  # b_j = U^T D_j^{-1} v_j
    return capacitance_solve_into(a, s, (m[:, 0], m[:, 1], m[:, 2]), (b[:, 0], b[:, 1]), cap)


def _workspace_apply(
    p: torch.Tensor, z: torch.Tensor, a: torch.Tensor, vectors: torch.Tensor
) -> torch.Tensor:
    """:func:`structured_apply`'s Woodbury form with reused scratch (no autograd).

    Per chunk of n rows and block J of kb eigenvectors, with y = V^T z (n, K):
        W_a z += (R_J o V_J) y_J - p o (R_J (c_1J o y_J)) - (p*p) o (R_J (c_2J o y_J)),
    R_J (n, K, kb); all of it inside :func:`.scratch.scratch_budget` bytes.
    """
    n_all, k = p.shape
    out = torch.empty((n_all, k), dtype=z.dtype, device=z.device)  # contiguous rows
    rows, cols = plan_chunk(
        k, _APPLY_PER_ROW * k + _APPLY_PER_COL * k + 8, 2, scratch_budget(p.device)
    )
    with borrow(p.device, p.dtype) as ws:
        for start in range(0, n_all, rows):
            pc = p[start : start + rows]
            n = pc.shape[0]
            views = ws.views(
                (n, k), (n, 5, k), (n, 1), (n, k, cols), (n, k, cols), (n, 3, cols),
                (n, 2, cols), (n, cols, 2), (n, k, 2), (n, k), (n, 10, cols),
            )  # fmt: skip
            y, lhs, s, r_buf, rv_buf, m_buf, b_buf, g_buf, corr, first, cap_buf = views
            torch.mm(z[start : start + rows], vectors, out=y)  # y = V^T z
            _u_products(pc, lhs, s)
            acc = out[start : start + rows]
            for j0 in range(0, k, cols):
                kb = min(cols, k - j0)
                cut = slice(j0, j0 + kb)
                r, rv, m, b, g, cap = _heads(
                    (r_buf, rv_buf, m_buf, b_buf, g_buf, cap_buf),
                    ((n, k, kb), (n, k, kb), (n, 3, kb), (n, 2, kb), (n, kb, 2), (n, 10, kb)),
                )
                c1, c2 = _woodbury_block(lhs, s, a[cut], vectors[:, cut], r, rv, m, b, cap)
                yj = y[:, cut]
                torch.mul(c1, yj, out=g[..., 0])
                torch.mul(c2, yj, out=g[..., 1])
                torch.bmm(r, g, out=corr)  # (n, K, 2)
                if j0 == 0:
                    torch.bmm(rv, yj.unsqueeze(-1), out=acc.unsqueeze(-1))
                else:
                    torch.bmm(rv, yj.unsqueeze(-1), out=first.unsqueeze(-1))
                    acc.add_(first)
                # (not addcmul_: its fused rounding would differ from the allocating path)
                acc.sub_(torch.mul(pc, corr[..., 0], out=first))
                acc.sub_(torch.mul(lhs[:, 1], corr[..., 1], out=first))
    return out


def structured_weights(p: torch.Tensor, factor: GramFactor, kappa: float) -> torch.Tensor:
    """The full W_a for every sample, (N, K, K) float64, via the Woodbury form (the dense
    form beyond :data:`WOODBURY_MAX_GAIN`)."""
    n, k = p.shape
    eye = torch.eye(k, dtype=p.dtype, device=p.device)
    if kappa == 0.0:
        return eye.expand(n, k, k).clone()
    if not woodbury_is_accurate(factor, kappa):
        return dense_weights(p, factor, kappa)
    vectors = factor.eigenvectors
    a = kappa * factor.eigenvalues
    if _reusable(p, vectors, a):
        return _workspace_weights(p, a, vectors)
    out = torch.empty((n, k, k), dtype=p.dtype, device=p.device)
    step = chunk_size(k, p.device)
    for start in range(0, n, step):
        x = structured_solutions(p[start : start + step], a, vectors)
        out[start : start + step] = x @ vectors.T
    return out


def _workspace_weights(p: torch.Tensor, a: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """:func:`structured_weights`' Woodbury form with reused scratch (no autograd).

    Per chunk and block J: X_J = R_J o (V_J - [p, p*p] [c_1J; c_2J]) (n, K, kb), written over
    R_J o V_J once b_J is known, and W_a += X_J V_J^T.
    """
    n_all, k = p.shape
    out = torch.empty((n_all, k, k), dtype=p.dtype, device=p.device)
    rows, cols = plan_chunk(k, 7 * k + _APPLY_PER_COL * k + 8, 2, scratch_budget(p.device))
    with borrow(p.device, p.dtype) as ws:
        for start in range(0, n_all, rows):
            pc = p[start : start + rows]
            n = pc.shape[0]
            views = ws.views(
                (n, 5, k), (n, 1), (n, k, cols), (n, k, cols), (n, 3, cols), (n, 2, cols),
                (n, 2, cols), (n, k, 2), (n, 10, cols),
            )  # fmt: skip
            lhs, s, r_buf, rv_buf, m_buf, b_buf, c_buf, uw, cap_buf = views
            _u_products(pc, lhs, s)
            uw.copy_(lhs[:, :2].transpose(1, 2))  # [p, p*p], (n, K, 2)
            acc = out[start : start + rows].view(n * k, k)
            for j0 in range(0, k, cols):
                kb = min(cols, k - j0)
                cut = slice(j0, j0 + kb)
                r, x, m, b, c, cap = _heads(
                    (r_buf, rv_buf, m_buf, b_buf, c_buf, cap_buf),
                    ((n, k, kb), (n, k, kb), (n, 3, kb), (n, 2, kb), (n, 2, kb), (n, 10, kb)),
                )
                v_j = vectors[:, cut]
                c1, c2 = _woodbury_block(lhs, s, a[cut], v_j, r, x, m, b, cap)
                c[:, 0].copy_(c1)
                c[:, 1].copy_(c2)
                torch.baddbmm(v_j.expand(n, k, kb), uw, c, alpha=-1.0, out=x)
                x.mul_(r)  # X_J
                if j0 == 0:
                    torch.mm(x.view(n * k, kb), v_j.T, out=acc)
                else:
                    acc.addmm_(x.view(n * k, kb), v_j.T)
    return out


def dense_weights(p: torch.Tensor, factor: GramFactor, kappa: float) -> torch.Tensor:
    """Reference closed form via eigendecompositions of J and G, (N, K, K) float64. O(N K^3)."""
    jac = p.unsqueeze(-1) * p.unsqueeze(-2) - torch.diag_embed(p)
    lam, q = torch.linalg.eigh(jac)
    vectors = factor.eigenvectors
    qv = q.transpose(-1, -2) @ vectors
    denom = 1.0 + kappa * (lam * lam).unsqueeze(-1) * factor.eigenvalues
    weights: torch.Tensor = q @ (qv / denom) @ vectors.T
    return weights
