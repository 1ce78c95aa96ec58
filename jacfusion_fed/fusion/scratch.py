"""Reusable scratch memory for the chunked solvers: one workspace per concurrent solve.

A solve of N samples runs in chunks of n rows (and, for very large K, blocks of kb Gram
eigenvectors); each chunk needs a few (n, K, kb) float64 temporaries (R_ij = 1/(1 + a_j p_i^2),
R o V, ...) and some (n, K)-sized ones. Allocated afresh per chunk, such blocks come from mmap and
go back to the OS when freed, so every chunk pays a page fault per 4 KiB page it touches. A
:class:`Workspace` instead hands out views of one flat buffer it keeps, so a solve touches new
memory at most once, and the pool (:func:`borrow`) lends one workspace per call, so concurrent
calls (threads) never share one; it keeps up to four idle ones per device, dtype and CUDA stream.

Budget: the caller lists every temporary a chunk needs (:func:`plan_chunk` sizes the chunk from
the bytes per row and per eigenvector column); a workspace never holds more than
:func:`scratch_budget` bytes, whatever N is.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

SCRATCH_BYTES = {"cpu": 16 << 20, "cuda": 1 << 30}
"""Most scratch bytes one solve holds per device type (counting every chunk temporary). On the
CPU, 16 MiB keeps a chunk within the last-level cache's reach while the per-chunk Python
overhead stays small (smaller budgets were slower at K = 10 to 1000, larger ones no faster);
a GPU wants large chunks to fill its cores."""

SCRATCH_ENV = "JACFUSION_SOLVER_SCRATCH"
"""Environment switch: ``fresh`` runs the allocating path of before the workspace (every chunk
allocates its temporaries; a baseline for benchmarks). Anything else (default): reuse."""

_MAX_IDLE = 4
"""Workspaces the pool keeps per device and stream once their solve has returned."""

_ALIGN = 8
"""Views start at multiples of 8 float64 elements (64 bytes, one cache line)."""


def scratch_budget(device: torch.device) -> int:
    """Scratch bytes a solve on this device may hold."""
    return SCRATCH_BYTES.get(device.type, SCRATCH_BYTES["cpu"])


def reuse_enabled() -> bool:
    """False when :data:`SCRATCH_ENV` asks for the allocating (pre-workspace) path."""
    return os.environ.get(SCRATCH_ENV, "") != "fresh"


def plan_chunk(num_classes: int, per_row: int, per_cell: int, budget: int) -> tuple[int, int]:
    """(rows n, eigenvector columns kb) per chunk so that the chunk's temporaries fit the budget.

    A chunk of n rows and kb columns needs 8 * n * (per_row + per_cell * K * kb) bytes: per_row
    float64 elements per sample (the (n, c*K) temporaries) and per_cell per (sample, class,
    column) (the (n, K, kb) ones). All K columns at once when one row fits, else one row and
    as many columns as fit (at least 1).
    """
    k = num_classes
    row_bytes = 8 * (per_row + per_cell * k * k)
    if row_bytes <= budget:
        return max(1, budget // row_bytes), k
    cols = (budget // 8 - per_row) // max(1, per_cell * k)
    return 1, int(min(k, max(1, cols)))


class Workspace:
    """Views of one flat buffer, handed out per chunk; grows to the largest chunk, never shrinks.

    Not thread-safe: one solve uses it at a time (see :func:`borrow`). With ``reuse=False``
    every :meth:`views` call allocates afresh (the baseline of ``JACFUSION_SOLVER_SCRATCH=fresh``).
    """

    def __init__(
        self, device: torch.device, dtype: torch.dtype = torch.float64, *, reuse: bool = True
    ) -> None:
        self.device = device
        self.dtype = dtype
        self.reuse = reuse
        with torch.inference_mode(False):
            self._flat = torch.empty(0, dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        """Bytes the workspace holds now."""
        return self._flat.numel() * self._flat.element_size()

    def views(self, *shapes: Sequence[int]) -> list[torch.Tensor]:
        """Contiguous, non-overlapping tensors of these shapes (uninitialised contents).

        They alias the views of the previous call: a chunk takes all its views at once.
        """
        sizes = [math.prod(s) for s in shapes]
        offsets, total = [], 0
        for size in sizes:
            offsets.append(total)
            total += -(-size // _ALIGN) * _ALIGN
        if self._flat.numel() < total or not self.reuse:
            # A normal tensor even under inference_mode: in-place updates of an inference
            # tensor would fail in a later call made outside it.
            with torch.inference_mode(False):
                self._flat = torch.empty(total, dtype=self.dtype, device=self.device)
        return [
            self._flat[o : o + size].view(tuple(s))
            for o, size, s in zip(offsets, sizes, shapes, strict=True)
        ]


_PoolKey = tuple[str, torch.dtype, int]
_POOL: dict[_PoolKey, list[Workspace]] = {}
_POOL_LOCK = threading.Lock()


def _pool_key(device: torch.device, dtype: torch.dtype) -> _PoolKey:
    if device.type == "cuda":  # stream-ordered reuse: a workspace stays with its stream
        return str(device), dtype, int(torch.cuda.current_stream(device).stream_id)
    return str(device), dtype, 0


@contextmanager
def borrow(device: torch.device, dtype: torch.dtype = torch.float64) -> Iterator[Workspace]:
    """A workspace for the duration of one solve; no other caller gets it meanwhile."""
    if not reuse_enabled():
        yield Workspace(device, dtype, reuse=False)
        return
    key = _pool_key(device, dtype)
    with _POOL_LOCK:
        idle = _POOL.get(key)
        ws = idle.pop() if idle else Workspace(device, dtype)
    try:
        yield ws
    finally:
        with _POOL_LOCK:
            idle = _POOL.setdefault(key, [])
            if len(idle) < _MAX_IDLE:
                idle.append(ws)


def release_idle() -> None:
    """Drop every idle workspace (their memory goes back to the allocator)."""
    with _POOL_LOCK:
        _POOL.clear()


def pooled_bytes() -> int:
    """Bytes held by idle workspaces (diagnostics and tests)."""
    with _POOL_LOCK:
        return sum(ws.nbytes for idle in _POOL.values() for ws in idle)
