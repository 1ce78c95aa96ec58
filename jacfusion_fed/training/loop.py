"""Training loops: ``train_model`` on arrays and ``train_epochs`` for federated rounds."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn
from torch.utils.data import DataLoader

from .evaluate import as_tensor, evaluate_accuracy, model_device
from .methods import StepState, resolve_params, train_step

__all__ = ["TrainReport", "train_epochs", "train_model"]

Batches = DataLoader[Any] | Iterable[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class TrainReport:
    """What one call trained: per-epoch mean losses, final clean train accuracy, time."""

    method: str
    params: dict[str, Any]
    losses: list[float] = field(default_factory=list)
    train_accuracy: float = float("nan")
    seconds: float = 0.0
    epochs: int = 0
    num_samples: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable form (training metrics may leave the owner)."""
        return asdict(self)


def train_model(
    model: nn.Module,
    x: Any,
    y: Any,
    *,
    method: str = "regular",
    epochs: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
    device: torch.device | str | None = None,
    num_threads: int | None = None,
    **method_params: Any,
) -> TrainReport:
    """Train ``model`` on arrays ``x`` (N, ...) in [0, 1] and labels ``y`` (N,) with Adam.

    ``method`` is one of ``regular``, ``adversarial``, ``free``, ``stability``, ``mixup`` (see
    :mod:`.methods` for their parameters and defaults, passed as keyword arguments).  Training
    is reproducible for a given ``seed`` (global RNG state is saved and restored).
    """
    return train_epochs(
        model,
        (x, y),
        method,
        epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        progress=progress,
        device=device,
        num_threads=num_threads,
        **method_params,
    )


def train_epochs(
    model: nn.Module,
    data: tuple[Any, Any] | Batches,
    method: str = "regular",
    epochs: int = 1,
    *,
    batch_size: int = 64,
    lr: float = 1e-3,
    optimizer: torch.optim.Optimizer | None = None,
    seed: int = 0,
    progress: bool = False,
    device: torch.device | str | None = None,
    num_threads: int | None = None,
    **method_params: Any,
) -> TrainReport:
    """Run ``epochs`` passes of ``method`` over ``data``; callable once per federated round.

    Args:
        data: ``(x, y)`` arrays (shuffled each epoch with ``seed``) or a ``DataLoader`` /
            re-iterable of ``(x, y)`` batches (used as it is).  Pass another ``seed`` per
            round for another shuffle.
        optimizer: keep one across rounds if you like; default a fresh ``Adam(lr)``.
        device: default the model's device; the model is moved there.
        num_threads: torch CPU threads during this call (restored afterwards).  The small nets
            here train fastest on 1 thread when other processes share the cores (measured: 7x
            faster than 2 threads on 2 busy cores); default: leave torch's setting alone.

    Raises ``ValueError`` for an unknown method, a bad method parameter, ``epochs < 1``,
    ``batch_size < 1``, ``lr <= 0`` or mismatched ``x`` / ``y`` lengths.
    """
    params = resolve_params(method, method_params)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if num_threads is not None and (isinstance(num_threads, bool) or num_threads < 1):
        raise ValueError(f"num_threads must be an integer >= 1, got {num_threads!r}")
    dev = torch.device(device) if device is not None else model_device(model)
    model.to(dev)
    opt = optimizer or torch.optim.Adam(model.parameters(), lr=lr)
    arrays = _as_arrays(data)
    report = TrainReport(
        method=method,
        params={**params, "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed},
    )
    t0 = time.perf_counter()
    devices = [dev.index or 0] if dev.type == "cuda" else []
    with _torch_threads(num_threads), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        state = StepState(rng=np.random.default_rng(seed))
        n_batches = _num_batches(data, arrays, batch_size)
        with _progress_bar(progress, method, epochs * n_batches) as advance:
            model.train()
            for epoch in range(epochs):
                total, count = 0.0, 0
                for xb, yb in _batches(data, arrays, batch_size, gen):
                    xb, yb = xb.to(dev), yb.to(dev)
                    loss = train_step(method, model, xb, yb, opt, params, state)
                    total, count = total + loss * len(xb), count + len(xb)
                    advance(f"{method} epoch {epoch + 1}/{epochs} loss {loss:.3f}")
                report.losses.append(total / max(count, 1))
                report.num_samples = count
        report.train_accuracy = _clean_accuracy(model, data, arrays)
    report.epochs = epochs
    report.seconds = time.perf_counter() - t0
    return report


def _as_arrays(data: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    if not (isinstance(data, tuple) and len(data) == 2):
        return None
    x, y = as_tensor(data[0], torch.float32), as_tensor(data[1], torch.int64)
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
    if len(x) == 0:
        raise ValueError("cannot train on an empty dataset")
    return x, y


def _num_batches(data: Any, arrays: Any, batch_size: int) -> int:
    if arrays is not None:
        return -(-len(arrays[0]) // batch_size)
    try:
        return len(data)
    except TypeError:
        return 0


def _batches(
    data: Any, arrays: Any, batch_size: int, gen: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    if arrays is None:
        for xb, yb in data:
            yield as_tensor(xb, torch.float32), as_tensor(yb, torch.int64)
        return
    x, y = arrays
    order = torch.randperm(len(x), generator=gen)
    for i in range(0, len(x), batch_size):
        idx = order[i : i + batch_size]
        yield x[idx], y[idx]


def _clean_accuracy(model: nn.Module, data: Any, arrays: Any) -> float:
    if arrays is not None:
        return evaluate_accuracy(model, *arrays)
    correct, total = 0.0, 0
    for xb, yb in data:
        yt = as_tensor(yb, torch.int64)
        acc = evaluate_accuracy(model, xb, yt)
        correct, total = correct + acc * len(yt), total + len(yt)
    return correct / total if total else float("nan")


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _progress_bar(enabled: bool, method: str, total: int) -> Iterator[Any]:
    if not enabled:
        yield lambda _desc: None
        return
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
    ) as bar:
        task = bar.add_task(method, total=total or None)

        def advance(desc: str) -> None:
            bar.update(task, advance=1, description=desc)

        yield advance
