"""The built-in architectures and the registry that builds them by name."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .unimodal import UnimodalNet

__all__ = ["ARCHS", "build_from_spec", "build_model", "default_arch", "model_spec"]


def _mlp(input_shape: tuple[int, ...], hidden: int = 64) -> nn.Module:
    """Two hidden FC layers (the head is the third FC layer, as in the paper's TwoMoon nets)."""
    d = 1
    for s in input_shape:
        d *= s
    return nn.Sequential(
        nn.Flatten(), nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
    )


def _image_cnn(input_shape: tuple[int, ...], hidden: int = 84) -> nn.Module:
    """LeNet-5 style for small images: two conv+pool stages, then FC 120 -> FC ``hidden``."""
    c = input_shape[0]
    conv = nn.Sequential(
        nn.Conv2d(c, 6, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
    )
    flat = _flat_dim(conv, input_shape)
    return nn.Sequential(conv, nn.Linear(flat, 120), nn.ReLU(), nn.Linear(120, hidden), nn.ReLU())


def _spectrogram_cnn(input_shape: tuple[int, ...], width: int = 16, hidden: int = 64) -> nn.Module:
    """Small CNN for ``(C, mels, frames)`` spectrograms: three conv+pool stages, then FC."""
    c, w = input_shape[0], width
    conv = nn.Sequential(
        nn.Conv2d(c, w, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(w, 2 * w, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(2 * w, 2 * w, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
    )
    flat = _flat_dim(conv, input_shape)
    return nn.Sequential(conv, nn.Linear(flat, hidden), nn.ReLU())


def _flat_dim(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    with torch.no_grad():
        return int(module(torch.zeros(1, *input_shape)).shape[1])


ARCHS: dict[str, Callable[..., nn.Module]] = {
    "mlp": _mlp,
    "image_cnn": _image_cnn,
    "spectrogram_cnn": _spectrogram_cnn,
}
_MIN_DIMS = {"mlp": 1, "image_cnn": 3, "spectrogram_cnn": 3}
_DEFAULTS = {
    ("twomoon", "x"): "mlp",
    ("twomoon", "y"): "mlp",
    ("avdigits", "image"): "image_cnn",
    ("avdigits", "audio"): "spectrogram_cnn",
}


def build_model(
    arch: str, input_shape: Sequence[int], num_classes: int, **kwargs: Any
) -> UnimodalNet:
    """Build a :class:`UnimodalNet` of a named architecture.

    Args:
        arch: ``"mlp"`` (any shape, flattened), ``"image_cnn"`` (``(C, H, W)``, H, W >= 4) or
            ``"spectrogram_cnn"`` (``(C, mels, frames)``, both >= 4).
        input_shape: shape of one sample (without the batch axis).
        num_classes: ``K``, the head's output width.
        kwargs: architecture options (``hidden`` for all; ``width`` for ``spectrogram_cnn``).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}")
    shape = tuple(int(s) for s in input_shape)
    if len(shape) < _MIN_DIMS[arch] or any(s < 1 for s in shape):
        raise ValueError(f"arch {arch!r} cannot take input shape {shape}")
    if arch != "mlp" and len(shape) != 3:
        raise ValueError(f"arch {arch!r} needs a (C, H, W) input shape, got {shape}")
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    try:
        features = ARCHS[arch](shape, **kwargs)
        dim = _flat_dim(features, shape)
    except TypeError as exc:
        raise ValueError(f"bad options for arch {arch!r}: {exc}") from exc
    except RuntimeError as exc:
        raise ValueError(f"arch {arch!r} cannot take input shape {shape}: {exc}") from exc
    return UnimodalNet(
        features,
        nn.Linear(dim, int(num_classes)),
        arch=arch,
        input_shape=shape,
        build_kwargs=kwargs,
    )


def default_arch(dataset: str, modality: str) -> str:
    """The architecture used for a built-in dataset's modality."""
    try:
        return _DEFAULTS[(dataset, modality)]
    except KeyError:
        known = ", ".join(f"{d}/{m}" for d, m in _DEFAULTS)
        raise ValueError(f"no default arch for {dataset}/{modality}; known: {known}") from None


def model_spec(model: UnimodalNet) -> dict[str, Any]:
    """A JSON-serializable description that :func:`build_from_spec` turns back into the net."""
    if not isinstance(model, UnimodalNet) or model.arch not in ARCHS:
        raise ValueError("model_spec needs a UnimodalNet made by build_model")
    return {
        "arch": model.arch,
        "input_shape": list(model.input_shape),
        "num_classes": model.num_classes,
        "kwargs": dict(model.build_kwargs),
    }


def build_from_spec(spec: dict[str, Any]) -> UnimodalNet:
    """Rebuild a freshly initialized net from :func:`model_spec`'s output (load the state dict
    afterwards)."""
    missing = {"arch", "input_shape", "num_classes"} - set(spec)
    if missing:
        raise ValueError(f"model spec lacks {sorted(missing)}")
    return build_model(
        spec["arch"], spec["input_shape"], spec["num_classes"], **dict(spec.get("kwargs") or {})
    )
