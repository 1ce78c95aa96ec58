"""Per built-in dataset, the settings of its federated simulation (``BUILTIN_PRESETS``): the
modalities and their owners, the perturbed modality, the table's columns, and the training
hyper-parameters. The simulation (``jacfusion_fed.federation.scenario``), the owners' training
recipe (``jacfusion_fed.owner.recipe``) and the federated evaluation all read them here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = ["AVDIGITS_COLUMNS", "BUILTIN_PRESETS", "BuiltinPreset"]

#: Table 1 of the paper: audio perturbed (w0 = 1, w1 = 8, FGSM / PGD w4 = 0.03, w5 = 0.001).
AVDIGITS_COLUMNS: Final = (
    "clean; gaussian w0=1; missing w1=8; fgsm w4=0.03; pgd w4=0.03 w5=0.001 w6=20"
)


@dataclass(frozen=True)
class BuiltinPreset:
    """Per built-in dataset: modalities, owner names, the perturbed one, columns, training."""

    modalities: tuple[str, ...]
    owners: tuple[str, ...]
    perturbed: str
    columns: str
    epochs: int
    quick_epochs: int
    lr: float
    batch_size: int
    repeats: int


BUILTIN_PRESETS: Final[dict[str, BuiltinPreset]] = {
    "avdigits": BuiltinPreset(
        modalities=("image", "audio"),
        owners=("vision-co", "audio-co"),
        perturbed="audio",
        columns=AVDIGITS_COLUMNS,
        epochs=15,
        quick_epochs=20,
        lr=0.003,
        batch_size=32,
        repeats=3,
    ),
    "twomoon": BuiltinPreset(
        modalities=("x", "y"),
        owners=("x-owner", "y-owner"),
        perturbed="y",
        columns="clean; gaussian w0=0.5; missing w1=1; fgsm w4=0.1; pgd w4=0.1 w5=0.01 w6=20",
        epochs=60,
        quick_epochs=40,
        lr=0.01,
        batch_size=32,
        repeats=3,
    ),
}
