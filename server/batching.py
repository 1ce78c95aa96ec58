"""Fusion batched across concurrent requests: :class:`FusionBatcher` fuses the jobs of
concurrent requests with the same options (:class:`FusionKey`) in one call."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["FusionBatcher", "FusionKey"]


@dataclass(frozen=True)
class FusionKey:
    """Everything that must agree for two jobs to be fused in one call: the registry method,
    the modalities (in fusion order) with their head versions, and the method's options as
    sorted ``(name, value)`` pairs (hashable values: tuples, not lists)."""

    method: str
    modalities: tuple[str, ...]
    versions: tuple[str, ...]
    options: tuple[tuple[str, Any], ...] = ()


class _Job:
    __slots__ = ("error", "event", "key", "lead", "logits", "result", "rows", "spec")

    def __init__(self, key: FusionKey, logits: list[np.ndarray], spec: Any) -> None:
        self.key = key
        self.logits = logits
        self.spec = spec
        self.rows = logits[0].shape[0]
        self.result: np.ndarray | None = None
        self.error: BaseException | None = None
        self.event = threading.Event()
        self.lead = False

    def outcome(self) -> np.ndarray:
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


class FusionBatcher:
    """Fuses concurrent jobs with equal keys in one call (leader/follower, no extra thread).

    The first caller computes at once (no waiting window, so a lone request pays nothing);
    requests arriving while it computes queue up, and when it is done the oldest waiting
    caller takes over and fuses everything queued by then, grouped by key, in one call per
    group of at most ``max_rows`` rows. This helps where a fusion call has a fixed cost
    (CUDA launches and transfers; validation and small-tensor overhead on CPU).

    Args:
        compute: ``compute(key, logits, spec) -> probs (n, K)`` for concatenated inputs.
        enabled: with False every job is computed on its own, by its caller.
        max_rows: largest concatenated batch.
    """

    def __init__(
        self,
        compute: Callable[[FusionKey, list[np.ndarray], Any], np.ndarray],
        *,
        enabled: bool = True,
        max_rows: int = 65_536,
    ) -> None:
        self._compute = compute
        self._observers: list[Callable[[str, float], None]] = []
        self.enabled = enabled
        self.max_rows = max_rows
        self._lock = threading.Lock()
        self._queue: list[_Job] = []
        self._busy = False
        self.calls = 0  # fusion calls made (for tests and benchmarks)
        self.jobs = 0

    def on_fused(self, callback: Callable[[str, float], None]) -> None:
        """Call ``callback(method, seconds)`` after every fusion computation (metrics)."""
        self._observers.append(callback)

    def _compute_timed(self, key: FusionKey, logits: list[np.ndarray], spec: Any) -> np.ndarray:
        start = time.perf_counter()
        try:
            return self._compute(key, logits, spec)
        finally:
            for callback in self._observers:
                callback(key.method, time.perf_counter() - start)

    def run(self, key: FusionKey, logits: list[np.ndarray], spec: Any) -> np.ndarray:
        job = _Job(key, logits, spec)
        if not self.enabled:
            self._process([job])
            return job.outcome()
        with self._lock:
            self._queue.append(job)
            lead = not self._busy
            self._busy = True
        if not lead:
            job.event.wait()
            if not job.lead:
                return job.outcome()
        with self._lock:
            jobs, self._queue = self._queue, []
        try:
            self._process(jobs)
        finally:
            with self._lock:
                if self._queue:
                    successor = self._queue[0]
                    successor.lead = True
                    successor.event.set()
                else:
                    self._busy = False
        return job.outcome()

    def _process(self, jobs: list[_Job]) -> None:
        groups: dict[FusionKey, list[_Job]] = {}
        for job in jobs:
            groups.setdefault(job.key, []).append(job)
        for key, members in groups.items():
            start = 0
            while start < len(members):
                batch, rows = [members[start]], members[start].rows
                start += 1
                while start < len(members) and rows + members[start].rows <= self.max_rows:
                    batch.append(members[start])
                    rows += members[start].rows
                    start += 1
                self._run_batch(key, batch)
        for job in jobs:
            job.event.set()

    def _run_batch(self, key: FusionKey, batch: list[_Job]) -> None:
        try:
            if len(batch) == 1:
                logits = batch[0].logits
            else:
                logits = [
                    np.concatenate([job.logits[m] for job in batch])
                    for m in range(len(batch[0].logits))
                ]
            probs = self._compute_timed(key, logits, batch[0].spec)
            self.calls += 1
            self.jobs += len(batch)
            offset = 0
            for job in batch:
                job.result = probs[offset : offset + job.rows]
                offset += job.rows
        except BaseException as exc:  # delivered to every caller of the batch
            for job in batch:
                job.error = exc
