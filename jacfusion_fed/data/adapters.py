"""Turn user data (numpy arrays or torch datasets) into a :class:`MultimodalDataset`."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .dataset import MultimodalDataset

__all__ = ["from_arrays", "from_torch_datasets", "minmax_scale"]


def minmax_scale(x: np.ndarray) -> np.ndarray:
    """Scale an array globally into [0, 1] (a constant array becomes all zeros)."""
    x = np.asarray(x, dtype=np.float32)
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 1.0)
    return ((x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)).astype(np.float32)


def from_arrays(
    modalities: Mapping[str, Any],
    labels: Any,
    sample_ids: Sequence[str] | None = None,
    *,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    name: str = "user",
    rescale: bool = False,
) -> MultimodalDataset:
    """Build a dataset from index-aligned arrays (numpy, torch or nested lists).

    Args:
        modalities: modality name -> array with the sample axis first.
        labels: ``(N,)`` integer class labels.
        sample_ids: local ids; default ``"{name}-000000"``, ``"{name}-000001"``, ...
        num_classes: default ``max(labels) + 1`` (or ``len(class_names)``).
        rescale: min-max scale each modality into [0, 1] (the attack layer's convention).
    """
    mods = {str(k): _to_numpy(v, k) for k, v in modalities.items()}
    y = _to_numpy(labels, "labels")
    if sample_ids is None:
        sample_ids = [f"{name}-{i:06d}" for i in range(len(y))]
    if rescale:
        mods = {k: minmax_scale(v) for k, v in mods.items()}
    if num_classes is None:
        num_classes = len(class_names) if class_names else (int(y.max()) + 1 if y.size else 1)
    return MultimodalDataset(
        modalities=mods,
        labels=y,
        sample_ids=list(sample_ids),
        num_classes=num_classes,
        class_names=list(class_names or []),
        name=name,
    )


def from_torch_datasets(
    datasets: Mapping[str, Dataset[Any]],
    labels: Mapping[str, int] | Sequence[int] | None = None,
    ids: Mapping[str, Sequence[str]] | Sequence[str] | None = None,
    *,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    name: str = "user",
    rescale: bool = False,
) -> MultimodalDataset:
    """Build a dataset from one torch ``Dataset`` per modality, aligned by sample id.

    Each item of a dataset may be ``x``, ``(x, y)``, ``(x, y, sample_id)`` or a mapping with keys
    ``"x"`` and optionally ``"y"`` and ``"id"``.  Ids come from the items, else from ``ids``
    (one list per modality, or one list shared by all), else from the position (then all datasets
    must have the same length).  Samples are ordered as in the first modality.

    Labels come from the items (they must agree across modalities for the same id), else from
    ``labels`` (a mapping id -> label, or a sequence in the first modality's order).

    Raises ``ValueError`` when the id sets differ between modalities (naming the missing and
    extra ids), when an id repeats inside a modality, or when labels are missing or conflict.
    """
    if not datasets:
        raise ValueError("from_torch_datasets needs at least one dataset")
    per_mod: dict[str, tuple[list[str], list[np.ndarray], list[int | None]]] = {}
    for mod, ds in datasets.items():
        items = [_split_item(ds[i], mod, i) for i in range(len(ds))]  # type: ignore[arg-type]
        given = ids.get(mod) if isinstance(ids, Mapping) else ids
        if given is not None and len(given) != len(items):
            raise ValueError(f"{mod}: {len(given)} ids for {len(items)} items")
        fallback = [str(s) for s in given] if given is not None else None
        mod_ids = [
            it[2] if it[2] is not None else (fallback[i] if fallback else f"{name}-{i:06d}")
            for i, it in enumerate(items)
        ]
        dupes = sorted(s for s, c in Counter(mod_ids).items() if c > 1)
        if dupes:
            raise ValueError(f"{mod}: duplicate sample ids, e.g. {dupes[:5]}")
        per_mod[str(mod)] = (mod_ids, [it[0] for it in items], [it[1] for it in items])

    first, (order, _, _) = next(iter(per_mod.items()))
    for mod, (mod_ids, _, _) in per_mod.items():
        missing, extra = set(order) - set(mod_ids), set(mod_ids) - set(order)
        if missing or extra:
            raise ValueError(
                f"sample ids of {mod!r} do not match those of {first!r}: "
                f"{len(missing)} missing (e.g. {sorted(missing)[:5]}), "
                f"{len(extra)} extra (e.g. {sorted(extra)[:5]})"
            )

    mods: dict[str, np.ndarray] = {}
    found: dict[str, int] = {}
    for mod, (mod_ids, xs, ys) in per_mod.items():
        pos = {s: i for i, s in enumerate(mod_ids)}
        mods[mod] = np.stack([xs[pos[s]] for s in order]) if order else np.zeros((0,), np.float32)
        for s, y in zip(mod_ids, ys, strict=True):
            if y is None:
                continue
            if s in found and found[s] != y:
                raise ValueError(f"conflicting labels for sample id {s!r}: {found[s]} vs {y}")
            found[s] = y
    y_arr = _resolve_labels(order, found, labels)
    return from_arrays(
        mods,
        y_arr,
        order,
        num_classes=num_classes,
        class_names=class_names,
        name=name,
        rescale=rescale,
    )


def _resolve_labels(
    order: list[str], found: dict[str, int], labels: Mapping[str, int] | Sequence[int] | None
) -> np.ndarray:
    if labels is not None:
        if isinstance(labels, Mapping):
            missing = [s for s in order if s not in labels]
            if missing:
                raise ValueError(f"labels missing for {len(missing)} ids, e.g. {missing[:5]}")
            given = [int(labels[s]) for s in order]
        else:
            given = [int(v) for v in labels]
            if len(given) != len(order):
                raise ValueError(f"{len(given)} labels for {len(order)} samples")
        clash = [s for s, v in zip(order, given, strict=True) if s in found and found[s] != v]
        if clash:
            raise ValueError(f"labels argument disagrees with dataset labels for ids {clash[:5]}")
        return np.asarray(given, dtype=np.int64)
    missing = [s for s in order if s not in found]
    if missing:
        raise ValueError(
            f"no label for {len(missing)} sample ids (e.g. {missing[:5]}): return (x, y) items "
            "or pass labels="
        )
    return np.asarray([found[s] for s in order], dtype=np.int64)


def _split_item(item: Any, mod: str, index: int) -> tuple[np.ndarray, int | None, str | None]:
    if isinstance(item, Mapping):
        if "x" not in item:
            raise ValueError(f"{mod}[{index}]: mapping items need an 'x' key")
        x, y, sid = item["x"], item.get("y"), item.get("id")
    elif isinstance(item, tuple | list):
        if not 1 <= len(item) <= 3:
            raise ValueError(f"{mod}[{index}]: expected x, (x, y) or (x, y, id), got {len(item)}")
        x, y, sid = (*item, None, None)[:3]
    else:
        x, y, sid = item, None, None
    y_int = None if y is None else int(y.item() if isinstance(y, torch.Tensor) else y)
    return _to_numpy(x, mod), y_int, None if sid is None else str(sid)


def _to_numpy(value: Any, what: object) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except Exception as exc:
        raise ValueError(f"{what}: cannot convert {type(value).__name__} to an array") from exc
