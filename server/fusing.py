"""Step 4 of a Predict, fusing: :meth:`Fuser.fuse` fuses every :class:`Group` of a
:class:`Grouped` through the registry's :func:`jacfusion_fed.fusion.fuse_full`, on the fusion
device, with the class prior of the registered heads, and returns the :class:`Fused` groups.

Batching across concurrent requests (leader/follower, no thread of its own)
    The first request to arrive fuses its groups at once, on its own thread (a lone request
    waits for nothing). Requests arriving meanwhile queue up; when the leader is done, the
    oldest queued request's thread takes over and fuses everything queued by then, grouped by
    :class:`FusionKey`, in one call per key and at most ``max_rows`` rows. So the solver always
    runs on the thread of some request's ``Predict``, and a fusion call's fixed cost (CUDA
    launches and transfers; validation and small-tensor overhead on CPU) is shared.

A fusion whose result would not be finite in float64 (e.g. a tiny gamma with a large Gram
matrix) fails with ``DATA_LOSS`` instead of answering NaN; bad input to the fusion math is
``INVALID_ARGUMENT``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import torch

from jacfusion_fed.fusion import FusionInputError, fuse_full

from .grouping import CalibrationInputs, FusionKey, GramInputs, Group, Grouped
from .predict_types import PredictError

__all__ = ["Fused", "FusedGroup", "Fuser"]


@dataclass(frozen=True)
class FusedGroup:
    """What the method says about a group's samples (numpy; the last three ``robust`` only).

    Attributes:
        p: (n, K) float64 probabilities.
        reliability: (n, M) float64, members in the group's order.
        prediction_set: (n, K) bool.
        abstain: (n,) bool.
    """

    p: np.ndarray
    reliability: np.ndarray | None = None
    prediction_set: np.ndarray | None = None
    abstain: np.ndarray | None = None

    def rows(self, start: int, stop: int) -> FusedGroup:
        def cut(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[start:stop]

        p = self.p[start:stop]
        return FusedGroup(p, cut(self.reliability), cut(self.prediction_set), cut(self.abstain))


@dataclass(frozen=True)
class Fused:
    """One :class:`FusedGroup` per group of ``grouped``, in the same order."""

    grouped: Grouped
    groups: list[FusedGroup]


class _Job:
    """One group waiting to be fused (its result or error is set by whoever leads)."""

    __slots__ = ("error", "group", "result")

    def __init__(self, group: Group) -> None:
        self.group = group
        self.result: FusedGroup | None = None
        self.error: BaseException | None = None


class _Ticket:
    """One request's jobs in the queue."""

    __slots__ = ("event", "jobs", "lead")

    def __init__(self, jobs: list[_Job]) -> None:
        self.jobs = jobs
        self.event = threading.Event()
        self.lead = False


#: ``fuse_full(method, logits, grams, log_prior, options, calibrations=)``: the registry's.
FuseFull = Callable[..., Any]


class Fuser:
    """The fusion step (see the module docstring).

    Args:
        device: the fusion device.
        log_prior: returns the current ln prior on ``device`` (or None before any head).
        enabled: batch concurrent requests; with False each request fuses its own groups.
        max_rows: largest batch fused in one call.
        fuse_full: the fusion call (default: the registry's; tests slow it down).
    """

    def __init__(
        self,
        device: torch.device,
        log_prior: Callable[[], torch.Tensor | None],
        *,
        enabled: bool = True,
        max_rows: int = 65_536,
        fuse_full: FuseFull = fuse_full,
    ) -> None:
        self.device = device
        self._log_prior = log_prior
        self._fuse_full = fuse_full
        self.enabled = enabled
        self.max_rows = max_rows
        self._observers: list[Callable[[str, float], None]] = []
        self._lock = threading.Lock()
        self._queue: list[_Ticket] = []
        self._busy = False
        self.calls = 0  # fusion calls made (for tests and benchmarks)
        self.jobs = 0  # groups fused

    def on_fused(self, callback: Callable[[str, float], None]) -> None:
        """Call ``callback(method, seconds)`` after every fusion computation (metrics)."""
        self._observers.append(callback)

    @property
    def queued(self) -> int:
        """Groups waiting for the current leader (for tests)."""
        with self._lock:
            return sum(len(t.jobs) for t in self._queue)

    def fuse(self, grouped: Grouped) -> Fused:
        """Fuse every group of ``grouped``, batched with concurrent requests."""
        ticket = _Ticket([_Job(g) for g in grouped.groups])
        lead = True
        if self.enabled:
            with self._lock:
                self._queue.append(ticket)
                lead = not self._busy
                self._busy = True
            if not lead:
                ticket.event.wait()
                lead = ticket.lead
        if lead:
            if self.enabled:
                with self._lock:
                    tickets, self._queue = self._queue, []
            else:
                tickets = [ticket]
            try:
                # Per key, batches of at most max_rows rows (a larger job alone), in order.
                batches: dict[FusionKey, list[tuple[int, list[_Job]]]] = {}
                for job in [j for t in tickets for j in t.jobs]:
                    runs = batches.setdefault(job.group.key, [])
                    n = len(job.group.logits[0])
                    if runs and runs[-1][0] + n <= self.max_rows:
                        runs[-1] = (runs[-1][0] + n, [*runs[-1][1], job])
                    else:
                        runs.append((n, [job]))
                for runs in batches.values():
                    for _rows, batch in runs:
                        self._fuse_batch(batch)
            finally:
                if self.enabled:
                    with self._lock:
                        if self._queue:
                            self._queue[0].lead = True
                            self._queue[0].event.set()
                        else:
                            self._busy = False
                for other in tickets:
                    if other is not ticket:
                        other.event.set()
        return Fused(grouped, [_outcome(grouped, job) for job in ticket.jobs])

    def _fuse_batch(self, batch: list[_Job]) -> None:
        """One fusion call for jobs of one key (their inputs concatenated by rows)."""
        first = batch[0].group
        start = time.perf_counter()
        try:
            if len(batch) == 1:
                logits = list(first.logits)
            else:
                logits = [
                    np.concatenate([job.group.logits[m] for job in batch])
                    for m in range(len(first.logits))
                ]
            zs = [torch.from_numpy(np.ascontiguousarray(z)).to(self.device) for z in logits]
            options = {k: list(v) if isinstance(v, tuple) else v for k, v in first.key.options}
            grams: Any = None
            cals: Any = None
            match first.inputs:
                case GramInputs(factors):
                    grams = list(factors)
                case CalibrationInputs(calibrations):
                    cals = list(calibrations)
            with torch.inference_mode():
                out = self._fuse_full(
                    first.key.method, zs, grams, self._log_prior(), options, calibrations=cals
                )
            fused = FusedGroup(
                out.p.to(torch.float64).cpu().numpy(),
                None if out.reliability is None else out.reliability.double().cpu().numpy(),
                None if out.prediction_set is None else out.prediction_set.cpu().numpy(),
                None if out.abstain is None else out.abstain.cpu().numpy(),
            )
            self.calls += 1
            self.jobs += len(batch)
            offset = 0
            for job in batch:
                rows = len(job.group.logits[0])
                job.result = fused.rows(offset, offset + rows) if len(batch) > 1 else fused
                offset += rows
        except BaseException as exc:  # delivered to every request of the batch
            for job in batch:
                job.error = exc
        finally:
            for callback in self._observers:
                callback(first.key.method, time.perf_counter() - start)


def _outcome(grouped: Grouped, job: _Job) -> FusedGroup:
    """A job's result, or its error as the request's :class:`PredictError`."""
    if isinstance(job.error, FusionInputError):
        raise PredictError(grpc.StatusCode.INVALID_ARGUMENT, str(job.error)) from job.error
    if job.error is not None:
        raise job.error
    if job.result is None:  # the leading thread was interrupted before it reached this job
        raise PredictError(grpc.StatusCode.UNAVAILABLE, "the fusion was interrupted; retry")
    probs = job.result.p
    if not np.isfinite(probs).all():
        # Never answer with NaN: the inputs are beyond float64's range for this fusion
        # (e.g. a tiny gamma with a large Gram matrix).
        plan, members = grouped.plan, job.group.members
        bad = int((~np.isfinite(probs).all(axis=1)).sum())
        gammas = (
            ", ".join(f"{m}={plan.gammas[m]:g}" for m in members)
            if plan.rule.takes("gamma")
            else "-"
        )
        raise PredictError(
            grpc.StatusCode.DATA_LOSS,
            f"{plan.method} fusion of {', '.join(members)} is not finite in float64 for "
            f"{bad} sample(s) (gammas {gammas}): the owners' logits or Gram matrices are "
            "too large for these settings (a larger gamma may help)",
        )
    return job.result
