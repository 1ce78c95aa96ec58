"""Input checks for the fusion API: the one place that turns bad input into a clear error.

Servicers and apps call the fusion functions and translate :class:`FusionInputError` into their
own status codes instead of re-checking.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray
"""What every fusion function accepts: a torch tensor or a numpy array."""


class FusionInputError(ValueError):
    """Bad input to a fusion function; the message names the argument and the problem."""


def result_dtype(x: ArrayLike) -> torch.dtype:
    """float64 stays float64; everything else computes in float32."""
    if isinstance(x, torch.Tensor):
        return torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.float64 if np.asarray(x).dtype == np.float64 else torch.float32


def to_tensor(
    x: Any, name: str, *, device: torch.device | None, dtype: torch.dtype | None
) -> torch.Tensor:
    """Convert a tensor or array-like to a floating tensor on ``device``; reject non-numeric."""
    if isinstance(x, torch.Tensor):
        t = x
    else:
        try:
            arr = np.asarray(x)
        except (TypeError, ValueError) as exc:
            raise FusionInputError(f"{name} is not array-like: {exc}") from exc
        if arr.dtype == object or not (
            np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.bool_)
        ):
            raise FusionInputError(f"{name} must be numeric, got dtype {arr.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.is_complex():
        raise FusionInputError(f"{name} must be real, got dtype {t.dtype}")
    target = dtype if dtype is not None else result_dtype(t)
    return t.to(device=device if device is not None else t.device, dtype=target)


def _check_finite(t: torch.Tensor, name: str) -> None:
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        count = int(bad.sum())
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise FusionInputError(
            f"{name} contains {count} non-finite value(s) (NaN or Inf), first at index {first}"
        )


def check_logits(logits: Sequence[ArrayLike]) -> list[torch.Tensor]:
    """Validate M >= 1 logit arrays of one shape (N, K) with N >= 1, K >= 2, all finite.

    Returns them as tensors on the first array's device, in the common result dtype.
    """
    if isinstance(logits, (torch.Tensor, np.ndarray)):
        raise FusionInputError(
            "logits must be a sequence of M arrays of shape (N, K), one per modality; "
            "got a single array (wrap it in a list)"
        )
    if not isinstance(logits, Sequence) or len(logits) == 0:
        raise FusionInputError("logits must be a non-empty sequence of (N, K) arrays")
    first = logits[0]
    device = first.device if isinstance(first, torch.Tensor) else torch.device("cpu")
    dtype = torch.float64 if any(result_dtype(z) == torch.float64 for z in logits) else None
    dtype = dtype or torch.float32
    out: list[torch.Tensor] = []
    for m, z in enumerate(logits):
        t = to_tensor(z, f"logits[{m}]", device=device, dtype=dtype)
        if t.ndim != 2:
            raise FusionInputError(
                f"logits[{m}] must have shape (N, K), got {tuple(t.shape)} ({t.ndim} dims)"
            )
        if t.shape[0] == 0:
            raise FusionInputError(f"empty batch: logits[{m}] has N=0 samples")
        if t.shape[1] < 2:
            raise FusionInputError(f"logits[{m}] has K={t.shape[1]} classes; need K >= 2")
        if out and t.shape != out[0].shape:
            n0, k0 = out[0].shape
            n, k = t.shape
            if k != k0:
                raise FusionInputError(
                    f"K mismatch across modalities: logits[{m}] has K={k} classes "
                    f"but logits[0] has K={k0}"
                )
            raise FusionInputError(
                f"batch size mismatch: logits[{m}] has N={n} samples but logits[0] has N={n0}"
            )
        _check_finite(t, f"logits[{m}]")
        out.append(t)
    return out


def check_log_prior(
    log_prior: ArrayLike | None, num_classes: int, like: torch.Tensor
) -> torch.Tensor | None:
    """Validate ln freq of shape (K,), finite (every class must have a positive frequency)."""
    if log_prior is None:
        return None
    t = to_tensor(log_prior, "log_prior", device=like.device, dtype=like.dtype)
    if t.shape != (num_classes,):
        raise FusionInputError(
            f"log_prior must have shape ({num_classes},) to match K, got {tuple(t.shape)}"
        )
    _check_finite(t, "log_prior (ln freq; every class needs a positive frequency)")
    return t


def check_gamma(gamma: float, name: str = "gamma") -> float:
    """0 < gamma <= 1 (gamma = 1 switches the regularization off)."""
    try:
        g = float(gamma)
    except (TypeError, ValueError) as exc:
        raise FusionInputError(f"{name} must be a number in (0, 1], got {gamma!r}") from exc
    if not (0.0 < g <= 1.0):  # also rejects NaN
        raise FusionInputError(f"{name} must lie in (0, 1], got {g}")
    return g


def check_gram(gram: ArrayLike, num_classes: int, name: str, like: torch.Tensor) -> torch.Tensor:
    """A K x K symmetric positive semi-definite Gram matrix W W^T, finite."""
    t = to_tensor(gram, name, device=like.device, dtype=torch.float64)
    if t.shape != (num_classes, num_classes):
        raise FusionInputError(
            f"{name} must have shape ({num_classes}, {num_classes}) to match K, "
            f"got {tuple(t.shape)}"
        )
    _check_finite(t, name)
    scale = float(t.abs().max()) if t.numel() else 0.0
    asym = float((t - t.T).abs().max())
    if asym > 1e-6 * max(scale, 1.0):
        raise FusionInputError(
            f"{name} must be symmetric (a Gram matrix W W^T); max |G - G^T| = {asym:.3g}"
        )
    return t
