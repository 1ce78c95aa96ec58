"""Inference helpers: logits and accuracy in eval mode, batched, without gradients."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

__all__ = [
    "as_tensor",
    "evaluate_accuracy",
    "model_device",
    "predict_features",
    "predict_layers",
    "predict_logits",
]

R = TypeVar("R")


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameterless module)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def as_tensor(value: Any, dtype: torch.dtype) -> torch.Tensor:
    """numpy array / tensor / nested list -> tensor of ``dtype`` (no copy when possible)."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype)
    return torch.as_tensor(np.asarray(value)).to(dtype)


def _eval_batches(
    model: nn.Module,
    x: Any,
    fn: Callable[[torch.Tensor], R],
    batch_size: int,
    device: torch.device | str | None = None,
) -> list[R]:
    """``fn`` of each batch of ``x`` (float32, on the model's device), in eval mode and without
    gradients; the model's mode is restored."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = torch.device(device) if device is not None else model_device(model)
    xt = as_tensor(x, torch.float32)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return [fn(xt[i : i + batch_size].to(dev)) for i in range(0, len(xt), batch_size)]
    finally:
        model.train(was_training)


def predict_logits(
    model: nn.Module, x: Any, batch_size: int = 512, device: torch.device | str | None = None
) -> torch.Tensor:
    """Logits ``(N, K)`` on the CPU, computed in eval mode (the model's mode is restored)."""
    outs = _eval_batches(model, x, lambda b: model(b).cpu(), batch_size, device)
    if not outs:
        k = getattr(model, "num_classes", 0)
        return torch.zeros((0, int(k)), dtype=torch.float32)
    return torch.cat(outs)


def evaluate_accuracy(
    model: nn.Module,
    x: Any,
    y: Any,
    batch_size: int = 512,
    device: torch.device | str | None = None,
) -> float:
    """Fraction of samples whose arg-max logit equals the label (``nan`` for no samples)."""
    yt = as_tensor(y, torch.int64)
    if len(yt) == 0:
        return float("nan")
    logits = predict_logits(model, x, batch_size, device)
    if len(logits) != len(yt):
        raise ValueError(f"{len(logits)} inputs but {len(yt)} labels")
    return float((logits.argmax(dim=1) == yt).float().mean())


def predict_features(model: nn.Module, x: Any, batch_size: int = 512) -> torch.Tensor | None:
    """Penultimate features ``(N, H)`` float64 on the CPU (``model.features``, eval mode; an
    imported model's ``recover_features``), or None when the model exposes neither (or an
    imported archive whose features cannot be read)."""
    features = getattr(model, "features", None)
    recover = getattr(model, "recover_features", None)
    if not isinstance(features, nn.Module):
        if not callable(recover):
            return None
        xt = as_tensor(x, torch.float32)
        parts = [recover(xt[i : i + batch_size]) for i in range(0, len(xt), batch_size)]
        if any(p is None for p in parts):
            return None
        if not parts:
            return torch.zeros((0, 0), dtype=torch.float64)
        return torch.cat(parts).to(torch.float64)
    outs = _eval_batches(model, x, lambda b: features(b).cpu(), batch_size)
    if not outs:
        return torch.zeros((0, 0), dtype=torch.float64)
    return torch.cat(outs).flatten(1).to(torch.float64)


def predict_layers(model: nn.Module, x: Any, batch_size: int = 512) -> list[torch.Tensor] | None:
    """Every layer's activations, a list of ``(N, D_l)`` float64 on the CPU, the penultimate
    features last: ``model.layers`` in eval mode (built-in nets,
    :meth:`~jacfusion_fed.models.UnimodalNet.layers`), else ``[predict_features(...)]``
    (imported models: the head's input only); None when the model exposes no features."""
    layers = getattr(model, "layers", None)
    if not callable(layers) or not isinstance(getattr(model, "features", None), nn.Module):
        feats = predict_features(model, x, batch_size)
        return None if feats is None else [feats]
    parts = _eval_batches(model, x, lambda b: [h.cpu() for h in layers(b)], batch_size)
    if not parts:
        return None
    return [torch.cat(col).to(torch.float64) for col in zip(*parts, strict=True)]
