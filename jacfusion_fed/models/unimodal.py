"""Unimodal networks: a feature extractor followed by one last ``nn.Linear`` head."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["UnimodalNet"]


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

    @property
    def feature_dim(self) -> int:
        """``H``, the width of the features the head acts on."""
        return int(self.head.in_features)

    @property
    def num_classes(self) -> int:
        """``K``."""
        return int(self.head.out_features)
