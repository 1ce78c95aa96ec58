"""The training recipe of ``owner serve --train-if-missing``: the simulation's own.

A built-in dataset is trained with the hyper-parameters of its federated simulation preset
(:data:`jacfusion_fed.data.presets.BUILTIN_PRESETS`: for AV-Digits 15 epochs, 20 on
the quick variant, lr 3e-3, batch 32), so an online owner reaches the accuracy the simulation
reaches on the same data; other data gets the AV-Digits settings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from jacfusion_fed.data.presets import BUILTIN_PRESETS
from jacfusion_fed.training import predict_logits

from .workspace import OwnerWorkspace

__all__ = ["Recipe", "recipe_for", "train_recommended"]


@dataclass(frozen=True)
class Recipe:
    """Regular training with these settings."""

    epochs: int
    lr: float
    batch_size: int


def recipe_for(workspace: OwnerWorkspace) -> Recipe:
    """The simulation's settings for the workspace's data source."""
    source = workspace.source
    name = source.location if source is not None and source.kind == "builtin" else "avdigits"
    preset = BUILTIN_PRESETS.get(name, BUILTIN_PRESETS["avdigits"])
    quick = source is not None and source.quick
    epochs = preset.quick_epochs if quick else preset.epochs
    return Recipe(epochs, preset.lr, preset.batch_size)


def train_recommended(
    workspace: OwnerWorkspace, *, epochs: int | None = None, seed: int = 0, progress: bool = False
) -> dict[str, float]:
    """Train and publish with :func:`recipe_for` (``epochs`` overrides); returns the metrics
    with the accuracy on every split of the data source (``<split>_accuracy``)."""
    if workspace.source is None:
        raise ValueError("training needs a data source (--data); or import a model instead")
    recipe = recipe_for(workspace)
    model, metrics = workspace.train(
        epochs=epochs or recipe.epochs,
        lr=recipe.lr,
        batch_size=recipe.batch_size,
        seed=seed,
        progress=progress,
    )
    for split, ds in workspace.records.items():
        x, y = ds.tensors(workspace.modality)
        pred = predict_logits(model, x).argmax(1)
        metrics[f"{split}_accuracy"] = float((pred == y).to(torch.float64).mean())
    return metrics
