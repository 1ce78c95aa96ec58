"""Unimodal networks: a feature extractor followed by one last ``nn.Linear`` head."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["MAX_LAYER_DIM", "UnimodalNet"]

MAX_LAYER_DIM = 1024
"""Widest intermediate layer :meth:`UnimodalNet.layers` returns (a class-conditional Gaussian
of a wider layer needs more validation samples than an owner has)."""


class UnimodalNet(nn.Module):
    """``forward(x) = head(features(x))`` with ``head = nn.Linear(H, K)``.

    The head is what the coordinator sees (its Gram matrix ``W W^T`` by default), so it must be
    the network's last layer and act on the features directly.  ``arch``, ``input_shape`` and
    ``build_kwargs`` record how the net was built (see :func:`model_spec`).
    """

    def __init__(
        self,
        features: nn.Module,
        head: nn.Linear,
        *,
        arch: str = "custom",
        input_shape: tuple[int, ...] = (),
        build_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(head, nn.Linear):
            raise ValueError(f"head must be nn.Linear, got {type(head).__name__}")
        self.features = features
        self.head = head
        self.arch = arch
        self.input_shape = tuple(int(d) for d in input_shape)
        self.build_kwargs = dict(build_kwargs or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, K)``."""
        logits: torch.Tensor = self.head(self.features(x))
        return logits

    def layers(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Activations (N, D_l) of every block of ``features`` (each child of an
        ``nn.Sequential``, flattened; intermediate ones wider than :data:`MAX_LAYER_DIM` left
        out), the penultimate features (N, H) last. Differentiable."""
        if not isinstance(self.features, nn.Sequential):
            return [self.features(x).flatten(1)]
        out: list[torch.Tensor] = []
        h = x
        children = list(self.features)
        for i, block in enumerate(children):
            h = block(h)
            flat = h.flatten(1)
            if i == len(children) - 1 or flat.shape[1] <= MAX_LAYER_DIM:
                out.append(flat)
        return out

    @property
    def feature_dim(self) -> int:
        """``H``, the width of the features the head acts on."""
        return int(self.head.in_features)

    @property
    def num_classes(self) -> int:
        """``K``."""
        return int(self.head.out_features)
