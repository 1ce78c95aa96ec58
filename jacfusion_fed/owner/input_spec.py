"""What a model version accepts as one record: shape, dtype, value range, normalisation.

Every imported (or trained) model version records an :class:`InputSpec`; live records sent
with ``PutRecords`` are validated against it as a whole batch before anything is stored, and
the owner applies the optional normalisation ``x' = (x - mean) / std`` (per channel, i.e.
along the first axis of one record, or one scalar) just before the forward pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["DTYPES", "InputSpec", "RecordError"]

#: Input dtypes a spec may name.
DTYPES = ("float32", "float64", "float16", "int64", "int32", "uint8")


class RecordError(ValueError):
    """A record of a batch violates the input spec; ``index`` is its position in the batch."""

    def __init__(self, index: int, problem: str) -> None:
        super().__init__(f"record {index}: {problem}")
        self.index = index
        self.problem = problem


def _floats(value: Any, name: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    arr = np.atleast_1d(np.asarray(value, dtype=np.float64))
    if arr.ndim != 1 or arr.size == 0 or not np.isfinite(arr).all():
        raise ValueError(f"{name} must be one finite number or a list of them, got {value!r}")
    return tuple(float(v) for v in arr)


@dataclass(frozen=True)
class InputSpec:
    """One record's shape (without the batch axis), dtype, value range and normalisation."""

    shape: tuple[int, ...]
    dtype: str = "float32"
    value_range: tuple[float, float] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not self.shape or any(int(d) < 1 for d in self.shape):
            raise ValueError(f"input shape must be positive sizes, got {self.shape}")
        if self.dtype not in DTYPES:
            raise ValueError(f"input dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.value_range is not None:
            lo, hi = self.value_range
            if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
                raise ValueError(f"value range must be finite with low < high, got {lo}, {hi}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("normalisation needs both mean and std")
        if self.mean is not None and self.std is not None:
            channels = self.shape[0]
            for name, vals in (("mean", self.mean), ("std", self.std)):
                if len(vals) not in (1, channels):
                    raise ValueError(
                        f"normalisation {name} must have 1 or {channels} values (the first axis "
                        f"of a record), got {len(vals)}"
                    )
            if min(self.std) <= 0:
                raise ValueError(f"normalisation std must be > 0, got {self.std}")

    # --- (de)serialisation -----------------------------------------------------------------

    @classmethod
    def create(
        cls,
        shape: Sequence[int],
        dtype: str = "float32",
        value_range: Sequence[float] | None = None,
        mean: Any = None,
        std: Any = None,
    ) -> InputSpec:
        rng = _floats(value_range, "value range")
        if rng is not None and len(rng) != 2:
            raise ValueError(f"value range must be two numbers (low, high), got {value_range!r}")
        return cls(
            tuple(int(d) for d in shape),
            str(dtype),
            None if rng is None else (rng[0], rng[1]),
            _floats(mean, "mean"),
            _floats(std, "std"),
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InputSpec:
        return cls.create(
            data["shape"],
            data.get("dtype", "float32"),
            data.get("value_range"),
            data.get("mean"),
            data.get("std"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "dtype": self.dtype,
            "value_range": None if self.value_range is None else list(self.value_range),
            "mean": None if self.mean is None else list(self.mean),
            "std": None if self.std is None else list(self.std),
        }

    # --- records ---------------------------------------------------------------------------

    def validate_batch(self, x: np.ndarray, *, max_records: int | None = None) -> np.ndarray:
        """Check a whole batch ``(N, *shape)``; return it as a C-contiguous array of ``dtype``.

        Raises :class:`RecordError` naming the first bad record, or ``ValueError`` for a
        batch-level problem (wrong rank, too many records). Integers are accepted for a float
        spec when they convert exactly; floats are never truncated to an integer dtype.
        """
        arr = np.asarray(x)
        if arr.ndim != len(self.shape) + 1:
            raise ValueError(
                f"inputs must have shape (N, {', '.join(map(str, self.shape))}), got {arr.shape}"
            )
        if max_records is not None and arr.shape[0] > max_records:
            raise ValueError(f"batch of {arr.shape[0]} records exceeds the limit {max_records}")
        n = arr.shape[0]
        if n:  # the checks of validate_record, on every record at once (same first error)
            if tuple(arr.shape[1:]) != self.shape or arr.dtype.kind not in "fiu":
                self.validate_record(arr[0], 0)
            self._check_values(arr.reshape(n, -1))
        return np.ascontiguousarray(arr.astype(np.dtype(self.dtype), copy=False))

    def _check_values(self, flat: np.ndarray) -> None:
        """Vectorized value checks of a batch (rows = records), in validate_record's order."""
        want = np.dtype(self.dtype)
        if want.kind in "iu" and flat.dtype.kind == "f":
            raise RecordError(0, f"dtype {flat.dtype}, expected {self.dtype} (integers)")
        n = flat.shape[0]
        bad_finite = n
        if flat.dtype.kind == "f":
            finite = np.isfinite(flat).all(axis=1)
            if not finite.all():
                bad_finite = int(np.argmin(finite))
        bad_range = n
        if self.value_range is not None and flat.shape[1]:
            lo, hi = self.value_range
            mins, maxs = flat.min(axis=1), flat.max(axis=1)
            outside = (mins < lo) | (maxs > hi)
            if outside.any():
                bad_range = int(np.argmax(outside))
        first = min(bad_finite, bad_range)
        if first < n:  # that record's own checks, in their order, name the problem
            self.validate_record(flat[first].reshape(self.shape), first)

    def validate_record(self, x: np.ndarray, index: int = 0) -> None:
        """Raise :class:`RecordError` unless ``x`` (one record) fits this spec."""
        if tuple(x.shape) != self.shape:
            raise RecordError(index, f"shape {tuple(x.shape)}, expected {self.shape}")
        want = np.dtype(self.dtype)
        if x.dtype.kind not in "fiu":
            raise RecordError(index, f"dtype {x.dtype} is not numeric")
        if want.kind in "iu" and x.dtype.kind == "f":
            raise RecordError(index, f"dtype {x.dtype}, expected {self.dtype} (integers)")
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            raise RecordError(index, "contains NaN or infinite values")
        if self.value_range is not None and x.size:
            lo, hi = self.value_range
            xmin, xmax = float(x.min()), float(x.max())
            if xmin < lo or xmax > hi:
                raise RecordError(
                    index, f"values span [{xmin:g}, {xmax:g}], outside the range [{lo:g}, {hi:g}]"
                )

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std`` per channel (axis 1 of a batch); ``x`` as float when not set."""
        x = x if x.is_floating_point() else x.to(torch.float32)
        if self.mean is None or self.std is None:
            return x
        view = (1, -1) + (1,) * (len(self.shape) - 1)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).reshape(view)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).reshape(view)
        return (x - mean) / std

    def probe(self, n: int, seed: int = 0) -> torch.Tensor:
        """A random batch ``(n, *shape)`` inside the value range ([0, 1] when unset)."""
        lo, hi = self.value_range or (0.0, 1.0)
        gen = torch.Generator().manual_seed(seed)
        x = lo + (hi - lo) * torch.rand((n, *self.shape), generator=gen, dtype=torch.float64)
        if np.dtype(self.dtype).kind in "iu":
            return x.round().to(getattr(torch, self.dtype))
        return x.to(getattr(torch, self.dtype))
