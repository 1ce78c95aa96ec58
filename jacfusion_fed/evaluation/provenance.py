"""What a results file must record to be reproducible elsewhere: package versions, the eSpeak
NG version that synthesized AV-Digits' audio (the audio, hence every AV-Digits number, depends
on it) and a hash of the generated data."""

from __future__ import annotations

import hashlib
import platform
from collections.abc import Mapping
from importlib import metadata
from typing import Any

import numpy as np

from jacfusion_fed.data import MultimodalDataset

__all__ = ["PACKAGES", "data_hash", "provenance"]

PACKAGES: tuple[str, ...] = (
    "jacfusion-fed",
    "torch",
    "numpy",
    "scipy",
    "scikit-learn",
    "torchattacks",
    "flwr",
    "espeakng-loader",
)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def data_hash(splits: Mapping[str, MultimodalDataset]) -> str:
    """SHA-256 over every split's modality arrays and labels (names, shapes, dtypes, bytes)."""
    digest = hashlib.sha256()
    for split in sorted(splits):
        ds = splits[split]
        arrays = {**{f"x.{k}": v for k, v in ds.modalities.items()}, "labels": ds.labels}
        for name in sorted(arrays):
            arr = np.ascontiguousarray(arrays[name])
            digest.update(f"{split}/{name}/{arr.dtype.str}/{arr.shape}".encode())
            digest.update(arr.tobytes())
    return digest.hexdigest()


def provenance(splits: Mapping[str, MultimodalDataset]) -> dict[str, Any]:
    """Package versions, Python, the eSpeak NG version (AV-Digits) and the data hash."""
    first = next(iter(splits.values()))
    return {
        "packages": {p: _version(p) for p in PACKAGES},
        "python": platform.python_version(),
        "espeak_ng_version": first.info.get("espeak_version"),
        "speech_backend": first.info.get("speech_backend"),
        "data_sha256": data_hash(splits),
    }
