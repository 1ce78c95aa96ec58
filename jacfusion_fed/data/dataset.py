"""The in-memory multimodal dataset every layer above ``data`` works with."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["MultimodalDataset"]


@dataclass
class MultimodalDataset:
    """Aligned samples of several modalities sharing labels and local sample ids.

    Attributes:
        modalities: modality name -> float32 array whose first axis is the sample axis.
        labels: int64 array of shape ``(N,)`` with values in ``[0, num_classes)``.
        sample_ids: one unique local (patient) id per sample, e.g. ``"avdigits-test-000042"``.
        num_classes: number of classes ``K``.
        class_names: ``K`` names (defaults to ``"0".."K-1"``).
        name: dataset name.
        sample_meta: optional per-sample arrays (first axis = sample), e.g. the voice of a clip;
            they are subset together with the samples.
        info: optional dataset-level facts (generator version, cache path, ...).

    ``__post_init__`` coerces arrays to float32 / int64 and raises ``ValueError`` naming the
    problem for differing lengths, NaN or infinite values, labels out of range, duplicate ids,
    or a wrong number of class names.
    """

    modalities: dict[str, np.ndarray]
    labels: np.ndarray
    sample_ids: list[str]
    num_classes: int
    class_names: list[str] = field(default_factory=list)
    name: str = "dataset"
    sample_meta: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.modalities:
            raise ValueError(f"{self.name}: a dataset needs at least one modality")
        self.labels = _as_labels(self.labels, self.name)
        n = len(self.labels)
        mods: dict[str, np.ndarray] = {}
        for key, arr in self.modalities.items():
            x = np.asarray(arr)
            if x.ndim == 0:
                raise ValueError(f"{self.name}: modality {key!r} is a scalar, expected (N, ...)")
            if x.dtype != np.float32:
                x = x.astype(np.float32)
            if not np.isfinite(x).all():
                raise ValueError(f"{self.name}: modality {key!r} contains NaN or infinite values")
            mods[str(key)] = x
        self.modalities = mods
        lengths = {k: len(v) for k, v in mods.items()}
        lengths["labels"] = n
        lengths["sample_ids"] = len(self.sample_ids)
        if len(set(lengths.values())) != 1:
            raise ValueError(f"{self.name}: lengths differ: {lengths}")
        self.sample_ids = [str(s) for s in self.sample_ids]
        dupes = [s for s, c in Counter(self.sample_ids).items() if c > 1]
        if dupes:
            raise ValueError(f"{self.name}: duplicate sample ids, e.g. {dupes[:5]}")
        if int(self.num_classes) < 1:
            raise ValueError(f"{self.name}: num_classes must be >= 1, got {self.num_classes}")
        self.num_classes = int(self.num_classes)
        if n and (self.labels.min() < 0 or self.labels.max() >= self.num_classes):
            raise ValueError(
                f"{self.name}: labels out of range [0, {self.num_classes}): "
                f"min {self.labels.min()}, max {self.labels.max()}"
            )
        if not self.class_names:
            self.class_names = [str(k) for k in range(self.num_classes)]
        if len(self.class_names) != self.num_classes:
            raise ValueError(
                f"{self.name}: {len(self.class_names)} class names for {self.num_classes} classes"
            )
        for key, arr in self.sample_meta.items():
            if len(arr) != n:
                raise ValueError(f"{self.name}: sample_meta {key!r} has {len(arr)} rows, not {n}")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def modality_names(self) -> list[str]:
        """Modality names in insertion order."""
        return list(self.modalities)

    def subset(self, indices: Sequence[int] | np.ndarray) -> MultimodalDataset:
        """A new dataset with the samples at ``indices`` (in that order), arrays copied."""
        idx = np.asarray(indices)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise ValueError(
                    f"{self.name}: boolean mask of shape {idx.shape}, need ({len(self)},)"
                )
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64).reshape(-1)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise ValueError(f"{self.name}: subset indices out of range for {len(self)} samples")
        return MultimodalDataset(
            modalities={k: v[idx] for k, v in self.modalities.items()},
            labels=self.labels[idx],
            sample_ids=[self.sample_ids[i] for i in idx],
            num_classes=self.num_classes,
            class_names=list(self.class_names),
            name=self.name,
            sample_meta={k: np.asarray(v)[idx] for k, v in self.sample_meta.items()},
            info=dict(self.info),
        )

    def class_counts(self) -> np.ndarray:
        """Number of samples per class, shape ``(K,)``, int64."""
        return np.bincount(self.labels, minlength=self.num_classes).astype(np.int64)

    def tensors(self, modality: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` as torch tensors (float32, int64) for one modality (shares memory)."""
        if modality not in self.modalities:
            raise ValueError(
                f"{self.name}: unknown modality {modality!r}; have {self.modality_names}"
            )
        return torch.from_numpy(self.modalities[modality]), torch.from_numpy(self.labels)

    def in_unit_range(self) -> bool:
        """Whether every modality lies in [0, 1] (the convention of the attack layer)."""
        return all(
            v.size == 0 or (v.min() >= 0.0 and v.max() <= 1.0) for v in self.modalities.values()
        )


def _as_labels(labels: Any, name: str) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"{name}: labels must have shape (N,), got {y.shape}")
    integral = np.issubdtype(y.dtype, np.integer) or (
        np.issubdtype(y.dtype, np.floating) and bool(np.all(np.mod(y, 1) == 0))
    )
    if y.size and not integral:
        raise ValueError(f"{name}: labels must be integers, got dtype {y.dtype}")
    return y.astype(np.int64)
