"""Send any number of records to an owner: ``PutRecords`` batches under the server's limits.

:func:`put_in_batches` is what ``jacfusion-fed submit`` and ``Requester.submit`` call:

* **Splitting.** Records go in batches of at most ``batch_size`` records (default 1,024, under
  the owners' default limit of 4,096 per call) and ``max_batch_bytes`` of tensor data (default
  8 MiB, under gRPC's 64 MiB message limit). A server that answers ``INVALID_ARGUMENT ...
  exceeds the limit of N`` (an owner configured lower) has stored nothing of that batch, so
  the batch is sent again in pieces of N.
* **Streaming.** Batches are built one at a time from the caller's arrays (ids pseudonymized
  and inputs encoded per batch, so memory holds a couple of batches, not a second copy of the
  file) and ``depth`` calls (default 2) are in flight at once, so the requester encodes the
  next batch while the owner stores the previous one.
* **Failures.** Every batch is one transaction at the owner: whole or absent. The first
  failure stops sending new batches; :class:`SubmitError` (a ``grpc.RpcError`` with the
  server's status code) names the failing batch, the first record the server named (its
  position in the whole input), and which batches were stored. Sending the same records
  again is idempotent (stored batches answer "unchanged"), so rerunning finishes the job.
  ``UNAVAILABLE`` is retried (``retries`` times, with backoff) since a resend changes nothing.
* **Progress.** ``progress(done, total)`` after each batch; :func:`terminal_progress` draws a
  rich progress bar on stderr when it is a terminal.
"""

from __future__ import annotations

import re
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
import numpy as np

from jacfusion_fed.rpc.jacfusion.v1 import modality_pb2
from jacfusion_fed.rpc.status_details import read_details
from jacfusion_fed.rpc.tensor import encode_tensor

__all__ = [
    "DEFAULT_BATCH_BYTES",
    "DEFAULT_BATCH_SIZE",
    "PutTotals",
    "SubmitError",
    "put_in_batches",
    "terminal_progress",
]

#: Records per PutRecords call (the owners accept up to 4,096 by default).
DEFAULT_BATCH_SIZE = 1_024
#: Most tensor bytes per call (gRPC's message limit is 64 MiB).
DEFAULT_BATCH_BYTES = 8 * 1024 * 1024
_LIMIT_RE = re.compile(r"exceeds the limit of (\d+)")
_RECORD_RE = re.compile(r"\b(?:record|position) (\d+)\b")
_RETRIED = (grpc.StatusCode.UNAVAILABLE,)

_INDEX_RE = re.compile(r"^(sample_ids|inputs)\[(\d+)\]")

Progress = Callable[[int, int], None]


def _shift_index(field_path: str, start: int) -> str:
    """``inputs[2]`` of a batch starting at record ``start`` -> ``inputs[start + 2]``."""
    m = _INDEX_RE.match(field_path)
    if m is None:
        return field_path
    return f"{m.group(1)}[{start + int(m.group(2))}]" + field_path[m.end() :]


class _Future(Protocol):
    def result(self, timeout: float | None = None) -> Any: ...


class PutCall(Protocol):
    """``stub.PutRecords``: called for one answer, or ``.future`` for a pending one."""

    def future(self, request: Any, timeout: float | None = None) -> _Future: ...


@dataclass
class PutTotals:
    """What the owner did with all batches."""

    stored: int = 0
    replaced: int = 0
    unchanged: int = 0
    model_version: str = ""
    batches: int = 0
    records: int = 0


def _ranges(done: Sequence[tuple[int, int]]) -> str:
    """``[(0, 1024), (1024, 2048), (4096, 5120)]`` -> ``records 0-2047, 4096-5119``."""
    merged: list[list[int]] = []
    for start, stop in sorted(done):
        if merged and merged[-1][1] == start:
            merged[-1][1] = stop
        else:
            merged.append([start, stop])
    return ", ".join(f"{a}-{b - 1}" for a, b in merged)


@dataclass(eq=False)
class SubmitError(grpc.RpcError):  # type: ignore[misc]
    """A batch was refused or failed; nothing of it was stored (see the module docstring)."""

    status: grpc.StatusCode
    server_details: str
    batch: int  # 1-based
    batches: int
    start: int  # first record of the failing batch
    stop: int
    record: int | None  # position of the record the server named, in the whole input
    stored: list[tuple[int, int]] = field(default_factory=list)  # record ranges stored
    #: The server's field violations (google.rpc.BadRequest), indices in the whole input.
    violations: tuple[tuple[str, str], ...] = ()

    def code(self) -> grpc.StatusCode:
        return self.status

    def details(self) -> str:
        where = f"record {self.record} (" if self.record is not None else "("
        stored = (
            f"stored so far: {len(self.stored)} batch(es), records {_ranges(self.stored)}"
            if self.stored
            else "nothing stored so far"
        )
        fields = (
            " (" + "; ".join(f"{name}: {text}" for name, text in self.violations) + ")"
            if self.violations
            else ""
        )
        return (
            f"PutRecords batch {self.batch} of {self.batches} failed at {where}records "
            f"{self.start}-{self.stop - 1}): {self.server_details}{fields}; {stored}; every "
            "batch is whole or absent, so sending the same records again finishes the job"
        )

    def __str__(self) -> str:
        return f"{self.status.name}: {self.details()}"


def _limit(details: str) -> int | None:
    m = _LIMIT_RE.search(details)
    return int(m.group(1)) if m else None


def _plan(n: int, row_bytes: int, batch_size: int, max_bytes: int) -> list[tuple[int, int]]:
    per = max(1, min(batch_size, max_bytes // max(1, row_bytes)))
    return [(s, min(n, s + per)) for s in range(0, n, per)]


def put_in_batches(
    call: PutCall,
    ids: Sequence[str],
    x: Any,
    *,
    pseudonymize: Callable[[Sequence[str]], list[str]] = list,
    replace: bool = False,
    key_fingerprint: str = "",
    timeout: float = 30.0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_batch_bytes: int = DEFAULT_BATCH_BYTES,
    depth: int = 2,
    retries: int = 3,
    progress: Progress | None = None,
) -> PutTotals:
    """Send ``x[i]`` under ``pseudonymize(ids)[i]`` in batches (see the module docstring).

    ``x`` is any array (a numpy memmap streams from disk). Raises :class:`SubmitError` on the
    first failing batch, ``ValueError`` for inputs that do not match ``ids``.
    """
    if batch_size < 1 or depth < 1:
        raise ValueError("batch_size and depth must be at least 1")
    if isinstance(ids, str):
        raise TypeError("pass a list of ids, not one string")
    shape = tuple(np.shape(x)) if not hasattr(x, "shape") else tuple(x.shape)
    if len(shape) < 1 or shape[0] != len(ids):
        raise ValueError(f"{len(ids)} ids but inputs of shape {shape}")
    n = len(ids)
    if n == 0:
        raise ValueError("no records to send (no ids)")
    itemsize = np.dtype(getattr(x, "dtype", np.asarray(x[:1]).dtype)).itemsize
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * itemsize
    todo = deque(_plan(n, row_bytes, batch_size, max_batch_bytes))
    totals, stored = PutTotals(records=n), list[tuple[int, int]]()
    pending: deque[tuple[int, int, int, _Future]] = deque()
    number = 0

    def request(start: int, stop: int) -> Any:
        return modality_pb2.PutRecordsRequest(
            sample_ids=pseudonymize(ids[start:stop]),
            inputs=encode_tensor(np.asarray(x[start:stop])),
            replace=replace,
            key_fingerprint=key_fingerprint,
        )

    def send(start: int, stop: int, number: int) -> None:
        pending.append((number, start, stop, call.future(request(start, stop), timeout=timeout)))

    def fail(exc: grpc.RpcError, number: int, start: int, stop: int) -> SubmitError:
        details = exc.details() or "" if hasattr(exc, "details") else str(exc)
        m = _RECORD_RE.search(details)
        violations = tuple(
            (_shift_index(name, start), text) for name, text in read_details(exc).violations
        )
        return SubmitError(
            exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN,
            details,
            number,
            number + len(todo) + len(pending),
            start,
            stop,
            None if m is None else start + int(m.group(1)),
            list(stored),
            violations,
        )

    failure: SubmitError | None = None
    while todo or pending:
        while todo and len(pending) < depth and failure is None:
            number += 1
            send(*todo.popleft(), number)
        if not pending:
            break
        num, start, stop, future = pending.popleft()
        for attempt in range(retries + 1):
            try:
                resp = future.result()
                break
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details() or ""
                smaller = _limit(details) if code == grpc.StatusCode.INVALID_ARGUMENT else None
                if smaller is not None and smaller < stop - start and failure is None:
                    pieces = _plan(stop - start, row_bytes, smaller, max_batch_bytes)
                    todo.extendleft(reversed([(start + a, start + b) for a, b in pieces]))
                    resp = None
                    break
                if code in _RETRIED and attempt < retries:
                    time.sleep(0.2 * 2**attempt)
                    future = call.future(request(start, stop), timeout=timeout)
                    continue
                failure = failure or fail(exc, num, start, stop)
                resp = None
                break
        if resp is None:
            continue
        stored.append((start, stop))
        totals.batches += 1
        totals.stored += resp.stored
        totals.replaced += resp.replaced
        totals.unchanged += resp.unchanged
        totals.model_version = resp.model_version or totals.model_version
        if progress is not None:
            progress(sum(b - a for a, b in stored), n)
    if failure is not None:
        failure.stored = sorted(stored)
        raise failure
    return totals


@contextmanager
def terminal_progress(description: str, enabled: bool | None = None) -> Iterator[Progress | None]:
    """A rich progress bar on stderr when it is a terminal (or ``enabled``); yields the
    ``progress(done, total)`` callback, or ``None`` when no bar is drawn."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update
