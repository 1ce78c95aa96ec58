"""The Gram matrix W W^T of a last linear layer, and its eigendecomposition shared by a batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._validation import ArrayLike, FusionInputError, check_gram, to_tensor


def gram_of(weight: ArrayLike) -> torch.Tensor:
    """Gram matrix G = W W^T of a last-layer weight W of shape (K, H).

    G (K x K, symmetric positive semi-definite) is all the Jacobian regularization needs from a
    modality's head (Eq. 5 and (S3) involve W_A only through W_A W_A^T), so an owner can share G
    instead of W. G is singular when K > H.

    Returns:
        (K, K) tensor on the weight's device, float64 for float64 input, float32 otherwise.
    """
    w = to_tensor(weight, "weight", device=None, dtype=None)
    if w.ndim != 2:
        raise FusionInputError(f"weight must have shape (K, H), got {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise FusionInputError("weight contains non-finite values (NaN or Inf)")
    return w @ w.T


@dataclass(frozen=True)
class GramFactor:
    """G = V diag(sigma) V^T for one modality, computed once and shared by every sample.

    Attributes:
        eigenvalues: sigma, shape (K,), float64, clipped at 0 (G is PSD; rounding can dip below).
        eigenvectors: V, shape (K, K), float64, orthonormal columns.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor

    @property
    def num_classes(self) -> int:
        return int(self.eigenvalues.shape[0])

    def to(self, device: torch.device) -> GramFactor:
        if self.eigenvalues.device == device:
            return self
        return GramFactor(self.eigenvalues.to(device), self.eigenvectors.to(device))


def factor_gram(gram: ArrayLike, name: str = "gram") -> GramFactor:
    """Eigendecompose a Gram matrix in float64 (once per head, O(K^3)).

    Negative eigenvalues beyond rounding (relative 1e-8) mean the matrix is not a Gram matrix
    and are rejected; smaller ones are clipped to 0.
    """
    g = to_tensor(gram, name, device=None, dtype=torch.float64)
    if g.ndim != 2 or g.shape[0] != g.shape[1]:
        raise FusionInputError(f"{name} must be a square (K, K) matrix, got {tuple(g.shape)}")
    g = check_gram(g, g.shape[0], name, g)
    sigma, vectors = torch.linalg.eigh(0.5 * (g + g.T))
    scale = max(float(sigma.abs().max()), 1e-300)
    if float(sigma.min()) < -1e-8 * scale:
        raise FusionInputError(
            f"{name} must be positive semi-definite (a Gram matrix W W^T); "
            f"smallest eigenvalue {float(sigma.min()):.3g}"
        )
    # Eigenvalues at rounding level are zero (and would otherwise make denormals downstream).
    sigma = torch.where(sigma < 1e-13 * scale, torch.zeros_like(sigma), sigma)
    return GramFactor(sigma, vectors)
