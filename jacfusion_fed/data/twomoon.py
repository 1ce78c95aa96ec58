"""TwoMoon (paper Section 4): horizontal and vertical coordinates as two modalities."""

from __future__ import annotations

import numpy as np
from sklearn.datasets import make_moons

from .dataset import MultimodalDataset

__all__ = ["TWOMOON_SIZES", "make_twomoon"]

TWOMOON_SIZES: dict[bool, dict[str, int]] = {
    False: {"train": 1000, "val": 200, "test": 400},
    True: {"train": 200, "val": 100, "test": 200},
}
"""Samples per split, keyed by ``quick``."""


def make_twomoon(
    split: str, seed: int = 0, *, quick: bool = False, noise: float = 0.1
) -> MultimodalDataset:
    """One split of TwoMoon: modality ``"x"`` and ``"y"``, each ``(N, 1)`` in [0, 1].

    All splits are drawn together by ``make_moons(noise=noise, random_state=seed)`` and shuffled
    into train/val/test; the min-max scaling of each coordinate is fitted on train (val/test are
    clipped into [0, 1]).  Label 0 is the upper moon, label 1 the lower one.
    """
    sizes = TWOMOON_SIZES[quick]
    total = sum(sizes.values())
    points, labels = make_moons(n_samples=total, noise=noise, shuffle=True, random_state=seed)
    start, bounds = 0, {}
    for name, size in sizes.items():
        bounds[name] = (start, start + size)
        start += size
    lo_tr, hi_tr = bounds["train"]
    lo = points[lo_tr:hi_tr].min(axis=0)
    hi = points[lo_tr:hi_tr].max(axis=0)
    a, b = bounds[split]
    scaled = np.clip((points[a:b] - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    return MultimodalDataset(
        modalities={"x": scaled[:, :1].copy(), "y": scaled[:, 1:].copy()},
        labels=labels[a:b].astype(np.int64),
        sample_ids=[f"twomoon-{split}-{i:06d}" for i in range(b - a)],
        num_classes=2,
        class_names=["upper", "lower"],
        name="twomoon",
        info={
            "seed": seed,
            "quick": quick,
            "noise": noise,
            "split": split,
            "scale_min": lo.tolist(),
            "scale_max": hi.tolist(),
        },
    )
