"""Gradients of W_a z through the Sylvester equation (S3) by implicit differentiation.

An end-to-end (adaptive) attack differentiates the fused prediction through the solve. Going
through eigenvectors of J breaks on repeated eigenvalues (ties in p), so the backward pass here
never touches an eigendecomposition that depends on p. With A = J^2 and the operator
L(X) = kappa A X G + X, which is self-adjoint for the Frobenius inner product (A and G are
symmetric), differentiating L(W_a) = I gives dW_a = -L^{-1}(kappa dA W_a G). For o = W_a z and an
upstream gradient g = dLoss/do:

    dLoss/dz = W_a^T g,
    dLoss/dA = -kappa Lambda G W_a^T,   Lambda = L^{-1}(g z^T)        (the adjoint equation),
    dLoss/dJ = S = H J + J H,           H = dLoss/dA,
    dLoss/dp = S p + S^T p - diag(S)    (J = p p^T - Diag(p)).

In the eigenbasis of G, W_a = X V^T and Lambda = X_g Diag(V^T z) V^T where the columns of X and
X_g solve (I + a_j A) x = v_j and (I + a_j A) x = g (the structured solver), so
H = -kappa X_g Diag(y o sigma) X^T with y = V^T z and every term above costs O(K^2) per sample.
"""

from __future__ import annotations

from typing import Any

import torch

from .gram import GramFactor
from .solver import budget_rows, structured_apply, structured_solutions


def _jvec(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """J q for J = p p^T - Diag(p), batched: (n, K) x (n, K) -> (n, K)."""
    return p * (p * q).sum(dim=-1, keepdim=True) - p * q


class _ImplicitApply(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        p: torch.Tensor,
        z: torch.Tensor,
        sigma: torch.Tensor,
        vectors: torch.Tensor,
        kappa: float,
    ) -> torch.Tensor:
        ctx.save_for_backward(p, z, sigma, vectors)
        ctx.kappa = kappa
        return structured_apply(p, z, GramFactor(sigma, vectors), kappa)

    @staticmethod
    def backward(
        ctx: Any, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None]:
        p, z, sigma, vectors = ctx.saved_tensors
        kappa: float = ctx.kappa
        a = kappa * sigma
        grad_p = torch.empty_like(p)
        grad_z = torch.empty_like(z)
        k = p.shape[1]
        # Per sample: X, X_g, Y and their products (n, K, K), plus O(K) vectors.
        step = budget_rows(k, 16 * k, 8, p.device)
        for start in range(0, p.shape[0], step):
            sl = slice(start, start + step)
            pc, zc, gc = p[sl], z[sl], grad_out[sl]
            x = structured_solutions(pc, a, vectors)  # W_a = X V^T
            x_g = structured_solutions(pc, a, gc.unsqueeze(-1))  # columns (I + a_j A)^{-1} g
            y = zc @ vectors  # V^T z
            # dLoss/dz = W_a^T g = V X^T g
            grad_z[sl] = (x.transpose(1, 2) @ gc.unsqueeze(-1)).squeeze(-1) @ vectors.T
            # H = -kappa Y X^T with Y = X_g Diag(y o sigma); apply H, H^T, diag(H) in O(K^2).
            yy = x_g * (y * sigma).unsqueeze(1)

            def h_apply(
                q: torch.Tensor, yy: torch.Tensor = yy, x: torch.Tensor = x
            ) -> torch.Tensor:
                return -kappa * (yy @ (x.transpose(1, 2) @ q.unsqueeze(-1))).squeeze(-1)

            def ht_apply(
                q: torch.Tensor, yy: torch.Tensor = yy, x: torch.Tensor = x
            ) -> torch.Tensor:
                return -kappa * (x @ (yy.transpose(1, 2) @ q.unsqueeze(-1))).squeeze(-1)

            h_diag = -kappa * (yy * x).sum(dim=-1)
            jp = _jvec(pc, pc)
            hp, htp = h_apply(pc), ht_apply(pc)
            s_p = h_apply(jp) + _jvec(pc, hp)  # S p = H J p + J H p
            st_p = ht_apply(jp) + _jvec(pc, htp)  # S^T p = H^T J p + J H^T p
            s_diag = pc * hp + pc * htp - 2.0 * pc * h_diag  # (HJ)_kk + (JH)_kk
            grad_p[sl] = s_p + st_p - s_diag
        return grad_p, grad_z, None, None, None


def implicit_apply(
    p: torch.Tensor, z: torch.Tensor, factor: GramFactor, kappa: float
) -> torch.Tensor:
    """W_a z (as :func:`structured_apply`) with gradients by implicit differentiation of (S3).

    Args:
        p: (N, K) float64 fused predictions; z: (N, K) float64 logits of the modality.
        factor: eigendecomposition of the modality's Gram matrix; kappa = 1/gamma - 1.
    """
    if kappa == 0.0:
        return z
    if not (torch.is_grad_enabled() and (p.requires_grad or z.requires_grad)):
        return structured_apply(p, z, factor, kappa)  # no graph to record: skip autograd
    out: torch.Tensor = _ImplicitApply.apply(  # type: ignore[no-untyped-call]
        p, z, factor.eigenvalues, factor.eigenvectors, kappa
    )
    return out
