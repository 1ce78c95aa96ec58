"""Random corruptions of Supplementary B.1: Gaussian noise (w0), missing entries (w1), bias noise
(w2, w3).

Pure functions on torch batches, either images / spectrograms of shape ``(N, C, H, W)`` or
feature vectors of shape ``(N, D)``. All randomness comes from the ``generator`` argument (a CPU
``torch.Generator``), so a seeded generator reproduces a draw exactly.

Range: outputs are **not** clipped to [0, 1]. The paper does not clip (``x (1 + eps)`` with
``w0 = 1`` leaves the unit range for roughly a third of the non-zero entries, and a bias patch
with ``w3 = 2`` triples intensities), so we reproduce its definitions literally; a caller that
needs [0, 1] inputs (e.g. to attack the corrupted input) must clip explicitly.

Bad parameters raise ``ValueError`` naming the parameter; nothing is clamped silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = [
    "BiasNoise",
    "Corruption",
    "GaussianNoise",
    "MissingEntries",
    "bias_noise",
    "gaussian_noise",
    "missing_entries",
]

Axis = Literal["time", "frequency"]
"""For ``(N, C, H, W)`` spectrograms: ``"time"`` = columns (last axis), ``"frequency"`` = rows."""


def _check_batch(x: torch.Tensor, ranks: tuple[int, ...], what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim not in ranks:
        shapes = " or ".join("(N, D)" if r == 2 else "(N, C, H, W)" for r in ranks)
        raise ValueError(f"{what} needs x of shape {shapes}; got rank {x.ndim} {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating tensor, got dtype {x.dtype}")


def _check_size(value: object, name: str, upper: int, upper_name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    if value > upper:
        raise ValueError(f"{name}={value} is larger than the input's {upper_name} ({upper})")
    return value


def _check_real(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    return float(value)


def _starts(n: int, span: int, generator: torch.Generator | None) -> torch.Tensor:
    """One uniform start index in [0, span] per sample (CPU int64)."""
    return torch.randint(0, span + 1, (n,), generator=generator)


def gaussian_noise(
    x: torch.Tensor, w0: float, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Multiplicative Gaussian noise: ``x * (1 + eps)``, eps ~ N(0, w0^2) i.i.d. per element.

    Entries equal to 0 stay 0. Not clipped (see the module docstring).

    Args:
        x: ``(N, C, H, W)`` or ``(N, D)`` float tensor.
        w0: standard deviation of eps, ``>= 0`` (0 returns a copy of ``x``).
        generator: CPU generator for the draw.
    """
    _check_batch(x, (2, 4), "gaussian_noise")
    sigma = _check_real(w0, "w0")
    if sigma < 0:
        raise ValueError(f"w0 must be >= 0, got {w0}")
    eps = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    return x * (1.0 + sigma * eps)


def missing_entries(
    x: torch.Tensor, w1: int, *, axis: Axis = "time", generator: torch.Generator | None = None
) -> torch.Tensor:
    """Zero ``w1`` consecutive columns (``axis="time"``) or rows (``"frequency"``) per sample.

    The start is uniform over the ``L - w1 + 1`` valid positions, drawn independently for each
    sample and shared by all channels of that sample. For ``(N, D)`` inputs, ``w1`` consecutive
    features are zeroed (only ``axis="time"`` applies there).

    Args:
        x: ``(N, C, H, W)`` or ``(N, D)`` float tensor.
        w1: number of consecutive rows / columns, ``0 <= w1 <= L`` (L the length of the axis).
        axis: ``"time"`` (columns, the last axis) or ``"frequency"`` (rows, ``H``).
        generator: CPU generator for the positions.
    """
    _check_batch(x, (2, 4), "missing_entries")
    if axis not in ("time", "frequency"):
        raise ValueError(f"axis must be 'time' (columns) or 'frequency' (rows), got {axis!r}")
    if axis == "frequency" and x.ndim == 2:
        raise ValueError("axis='frequency' (rows) needs (N, C, H, W) input; got (N, D)")
    dim = x.ndim - 1 if axis == "time" else x.ndim - 2
    length = x.shape[dim]
    width = _check_size(w1, "w1", length, f"{axis} axis length")
    out = x.clone()
    if width == 0 or x.shape[0] == 0:
        return out
    starts = _starts(x.shape[0], length - width, generator).to(x.device)
    pos = torch.arange(length, device=x.device)
    hit = (pos[None, :] >= starts[:, None]) & (pos[None, :] < starts[:, None] + width)  # (N, L)
    shape = [x.shape[0]] + [1] * (x.ndim - 1)
    shape[dim] = length
    return out.masked_fill(hit.view(shape), 0.0)


def bias_noise(
    x: torch.Tensor, w2: int, w3: float, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Illumination change: one random ``w2 x w2`` patch per image is multiplied by ``1 + w3``.

    The patch position is uniform over all positions fully inside the image, drawn per sample and
    shared by all channels. ``w3 = -1`` blacks the patch out; ``w3 = 2`` triples it. Not clipped.

    Args:
        x: ``(N, C, H, W)`` float tensor.
        w2: patch side, ``0 <= w2 <= min(H, W)`` (0 returns a copy).
        w3: relative intensity change, any finite real.
        generator: CPU generator for the positions.
    """
    _check_batch(x, (4,), "bias_noise")
    height, width = x.shape[-2], x.shape[-1]
    side = _check_size(w2, "w2", min(height, width), "smaller image side")
    scale = 1.0 + _check_real(w3, "w3")
    out = x.clone()
    if side == 0 or x.shape[0] == 0:
        return out
    top = _starts(x.shape[0], height - side, generator).to(x.device)
    left = _starts(x.shape[0], width - side, generator).to(x.device)
    rows = torch.arange(height, device=x.device)[None, :]
    cols = torch.arange(width, device=x.device)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < top[:, None] + side)  # (N, H)
    in_cols = (cols >= left[:, None]) & (cols < left[:, None] + side)  # (N, W)
    patch = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # (N, 1, H, W)
    return torch.where(patch, out * scale, out)


@dataclass(frozen=True)
class Corruption:
    """A random corruption with fixed parameters: ``corruption(x, generator) -> x_noisy``."""

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    @property
    def label(self) -> str:
        """Column label in the paper's notation, e.g. ``"w0=1.0"``."""
        raise NotImplementedError

    def validate(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` if the parameters do not fit ``x`` (corrupts its first row)."""
        self(x[:1], torch.Generator().manual_seed(0))


@dataclass(frozen=True)
class GaussianNoise(Corruption):
    """:func:`gaussian_noise` with standard deviation ``w0``."""

    w0: float

    def __post_init__(self) -> None:
        if _check_real(self.w0, "w0") < 0:
            raise ValueError(f"w0 must be >= 0, got {self.w0}")

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return gaussian_noise(x, self.w0, generator=generator)

    @property
    def label(self) -> str:
        return f"w0={self.w0:g}"


@dataclass(frozen=True)
class MissingEntries(Corruption):
    """:func:`missing_entries` of ``w1`` consecutive time frames or frequency rows."""

    w1: int
    axis: Axis = "time"

    def __post_init__(self) -> None:
        _check_size(self.w1, "w1", 2**62, "maximum")
        if self.axis not in ("time", "frequency"):
            raise ValueError(f"axis must be 'time' or 'frequency', got {self.axis!r}")

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return missing_entries(x, self.w1, axis=self.axis, generator=generator)

    @property
    def label(self) -> str:
        return f"w1={self.w1}" + (" (freq)" if self.axis == "frequency" else "")


@dataclass(frozen=True)
class BiasNoise(Corruption):
    """:func:`bias_noise` on a ``w2 x w2`` patch with factor ``1 + w3``."""

    w2: int
    w3: float

    def __post_init__(self) -> None:
        _check_size(self.w2, "w2", 2**62, "maximum")
        _check_real(self.w3, "w3")

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return bias_noise(x, self.w2, self.w3, generator=generator)

    @property
    def label(self) -> str:
        return f"w2,3={self.w2},{self.w3:g}"
