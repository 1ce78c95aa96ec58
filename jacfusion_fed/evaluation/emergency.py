"""The project's three-modality example as an evaluation dataset (M = 3).

``examples/three_modalities.py`` simulates an emergency department whose patients have a
vital-signs vector (``vitals``, 12 features), a lab panel (``labs``, 24) and a small scan
(``scan``, 1x8x8), each held by a different owner, 4 classes. :func:`make_emergency` draws the
very same arrays (same generator, same seed, same order of random draws; a test checks it
against the example's ``.npz`` files), so the "perturbed modality unknown" table
(``run_unknown("emergency", ...)``) reports on the example's data:

    x_m = sigmoid(prototype_m[y] + 2 * noise),  prototype_m ~ N(0, 1) per class, noise ~ N(0, 1)

Every modality is perturbed in turn (one table preset each): Gaussian noise, missing entries,
FGSM and PGD, at the example's sizes (missing entries scaled to each modality's length).
"""

from __future__ import annotations

import numpy as np

from jacfusion_fed.data import MultimodalDataset
from jacfusion_fed.robustness import AttackSpec, GaussianNoise
from jacfusion_fed.robustness import MissingEntries as Missing

from .config import ColumnSpec, DatasetPreset, TablePreset

__all__ = ["EMERGENCY", "EMERGENCY_SHAPES", "EMERGENCY_SPLITS", "make_emergency"]

EMERGENCY_SHAPES: dict[str, tuple[int, ...]] = {"vitals": (12,), "labs": (24,), "scan": (1, 8, 8)}
EMERGENCY_SPLITS: dict[str, int] = {"train": 600, "val": 150, "test": 250}
_CLASSES = 4
_SEED = 1  # the example's default


def make_emergency(split: str, seed: int = _SEED) -> MultimodalDataset:
    """One split of the three-modality example's data (see the module docstring).

    Raises:
        ValueError: unknown ``split``.
    """
    if split not in EMERGENCY_SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(EMERGENCY_SPLITS)}")
    rng = np.random.default_rng(seed)
    prototypes = {m: rng.normal(size=(_CLASSES, *s)) for m, s in EMERGENCY_SHAPES.items()}
    start = 0
    for name, n in EMERGENCY_SPLITS.items():  # draw in the example's order, keep ``split``
        y = rng.integers(0, _CLASSES, n)
        xs = {
            m: 1 / (1 + np.exp(-(prototypes[m][y] + 2.0 * rng.normal(size=(n, *shape)))))
            for m, shape in EMERGENCY_SHAPES.items()
        }
        if name == split:
            return MultimodalDataset(
                modalities={m: x.astype(np.float32) for m, x in xs.items()},
                labels=y.astype(np.int64),
                sample_ids=[f"ed-{start + i:05d}" for i in range(n)],
                num_classes=_CLASSES,
                name="emergency",
                info={"seed": seed, "split": split, "source": "examples/three_modalities.py"},
            )
        start += n
    raise AssertionError("unreachable")  # pragma: no cover


def _table(modality: str, missing: int) -> TablePreset:
    fgsm, pgd = AttackSpec("fgsm", 0.1), AttackSpec("pgd", 0.1, 0.02, 20)
    return TablePreset(
        title=f"Emergency example, {modality} perturbed",
        perturbed=modality,
        clean="",  # every other modality is clean (M = 3)
        columns=(
            ColumnSpec("clean", "clean"),
            ColumnSpec("w0", "corruption", corruption=GaussianNoise(1.5)),
            ColumnSpec("w1", "corruption", corruption=Missing(missing)),
            ColumnSpec("fgsm", "attack", attack=fgsm),
            ColumnSpec("pgd", "attack", attack=pgd),
        ),
    )


EMERGENCY = DatasetPreset(
    name="emergency",
    abbrev={"vitals": "Vit", "labs": "Lab", "scan": "Scan"},
    archs={"vitals": "mlp", "labs": "mlp", "scan": "image_cnn"},
    epochs={"vitals": 20, "labs": 20, "scan": 20},
    quick_epochs={"vitals": 10, "labs": 10, "scan": 10},
    lr=3e-3,
    batch_size=32,
    tables={"vitals": _table("vitals", 6), "labs": _table("labs", 12), "scan": _table("scan", 4)},
)
"""Nets and columns of the three-modality example (the example's epochs, w0 = 1.5, FGSM / PGD
w4 = 0.1, w5 = 0.02; missing entries: half of each vector, 4 of 8 columns of the scan)."""
