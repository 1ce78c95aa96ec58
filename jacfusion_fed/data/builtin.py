"""``load_builtin``: the datasets that ship with the package (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

from .avdigits import SPLITS, make_avdigits
from .dataset import MultimodalDataset
from .twomoon import make_twomoon

__all__ = ["BUILTIN_DATASETS", "SPLITS", "load_builtin"]

BUILTIN_DATASETS = ("twomoon", "avdigits")


def load_builtin(
    name: str,
    split: str = "train",
    seed: int = 0,
    *,
    quick: bool = False,
    cache_dir: Path | None = None,
) -> MultimodalDataset:
    """Load one split of a built-in dataset.

    Args:
        name: ``"twomoon"`` (modalities ``"x"``, ``"y"``) or ``"avdigits"`` (``"image"``,
            ``"audio"``).
        split: ``"train"``, ``"val"`` or ``"test"``.
        seed: randomness of the generated data (TwoMoon points; AV-Digits audio).
        quick: a smaller version for tests and demos (a few hundred samples).
        cache_dir: where generated AV-Digits arrays are cached (default ``$JACFUSION_CACHE`` or
            ``~/.cache/jacfusion-fed``); TwoMoon is generated in milliseconds and not cached.

    Raises:
        ValueError: unknown ``name`` or ``split`` (the message lists the valid ones), or a seed
            that is not an integer in [0, 2**32).
        SpeechUnavailableError: AV-Digits must be generated and eSpeak NG is missing.
    """
    if name not in BUILTIN_DATASETS:
        raise ValueError(f"unknown built-in dataset {name!r}; valid: {', '.join(BUILTIN_DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    if name == "twomoon":
        return make_twomoon(split, seed, quick=quick)
    return make_avdigits(split, seed, quick=quick, cache_dir=cache_dir)
