"""Where a modality owner's local records come from: a built-in dataset or the user's own file.

A source is written as one string so it fits a Flower node config or a CLI flag:

    builtin:avdigits                       every split of AV-Digits
    builtin:twomoon?seed=3&quick=1         TwoMoon, seed 3, the small variant
    builtin:avdigits?site=0&sites=2        site 0 of 2: a disjoint half of the patients
    npz:/data/audio.npz                    the user's own arrays (see :func:`load_npz_records`)

The owner sees only its own modality of the records; the other modalities of a built-in
dataset are dropped on load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl

import numpy as np

from jacfusion_fed.data import SPLITS, MultimodalDataset, from_arrays, load_builtin

_BOOL_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class DataSource:
    """A parsed source string (see the module docstring)."""

    kind: str
    location: str
    seed: int = 0
    quick: bool = False
    site: int = 0
    sites: int = 1
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> DataSource:
        kind, sep, rest = text.partition(":")
        if not sep or kind not in ("builtin", "npz"):
            raise ValueError(
                f"data source {text!r} must look like 'builtin:<name>[?k=v&...]' or 'npz:<path>'"
            )
        location, _, query = rest.partition("?")
        params = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
        try:
            seed = int(params.pop("seed", 0))
            site = int(params.pop("site", 0))
            sites = int(params.pop("sites", 1))
        except ValueError as exc:
            raise ValueError(f"data source {text!r}: seed/site/sites must be integers") from exc
        quick = params.pop("quick", "0").lower() in _BOOL_TRUE
        if sites < 1 or not 0 <= site < sites:
            raise ValueError(f"data source {text!r}: need 0 <= site < sites, got {site}/{sites}")
        if not location:
            raise ValueError(f"data source {text!r} names no dataset or file")
        return cls(kind, location, seed, quick, site, sites, params)

    def __str__(self) -> str:
        query: dict[str, object] = {"seed": self.seed, "quick": int(self.quick), "site": self.site}
        query |= {"sites": self.sites, **self.extra}
        return f"{self.kind}:{self.location}?" + "&".join(f"{k}={v}" for k, v in query.items())


def _site_slice(dataset: MultimodalDataset, site: int, sites: int) -> MultimodalDataset:
    """A disjoint share of the patients: every ``sites``-th record starting at ``site``."""
    if sites == 1:
        return dataset
    return dataset.subset(np.arange(site, len(dataset), sites))


def load_npz_records(path: Path, modality: str) -> dict[str, MultimodalDataset]:
    """The user's own records: an ``.npz`` with, per split s in train/val/test, the arrays
    ``x_<s>`` (inputs, first axis = record), ``y_<s>`` (int labels) and optionally ``ids_<s>``
    (local patient ids, strings). A ``train`` split is required; others are optional."""
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    with np.load(path, allow_pickle=False) as arrays:
        splits: dict[str, MultimodalDataset] = {}
        for split in SPLITS:
            if f"x_{split}" not in arrays:
                continue
            ids = arrays.get(f"ids_{split}")
            splits[split] = from_arrays(
                {modality: arrays[f"x_{split}"].astype(np.float32)},
                arrays[f"y_{split}"],
                sample_ids=None if ids is None else [str(i) for i in ids],
                name=path.stem,
            )
    if "train" not in splits:
        raise ValueError(f"{path} has no x_train/y_train arrays")
    return splits


def load_records(source: DataSource, modality: str) -> dict[str, MultimodalDataset]:
    """All local splits of ``modality`` from ``source``, keyed by split name."""
    if source.kind == "npz":
        splits = load_npz_records(Path(source.location), modality)
    else:
        splits = {}
        for split in SPLITS:
            full = load_builtin(source.location, split, source.seed, quick=source.quick)
            if modality not in full.modalities:
                raise ValueError(
                    f"dataset {source.location!r} has modalities {full.modality_names}; "
                    f"this owner was configured for {modality!r}"
                )
            splits[split] = MultimodalDataset(
                modalities={modality: full.modalities[modality]},
                labels=full.labels,
                sample_ids=full.sample_ids,
                num_classes=full.num_classes,
                class_names=full.class_names,
                name=full.name,
            )
    return {name: _site_slice(ds, source.site, source.sites) for name, ds in splits.items()}
