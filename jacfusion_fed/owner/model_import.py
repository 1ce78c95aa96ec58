"""Publish an externally trained model as a new version of an owner's store (no training).

``jacfusion-fed owner import-model`` calls :func:`import_model`. The new version becomes
current exactly like a retrain: the coordinator notices the new version in the owner's next
answer, fetches that version's head, and never fuses logits with the head of another version.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from jacfusion_fed.training import predict_logits

from .importing import ModelImportError, imported_model, load_model_file
from .input_spec import InputSpec
from .workspace import OwnerWorkspace

__all__ = ["ImportReport", "import_model", "load_class_counts"]

_PROBE_RECORDS = 64


@dataclass(frozen=True)
class ImportReport:
    """What :func:`import_model` published."""

    version: str
    format: str
    head: str
    num_classes: int
    feature_dim: int
    probe_max_error: float
    class_counts: tuple[int, ...]
    input_spec: InputSpec
    accuracy: dict[str, float]  # per data-source split, when the owner has labelled data


def load_class_counts(path: str | Path) -> list[int]:
    """A JSON list of K non-negative integers (the owner's training label counts)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"class counts file {path}: {exc}") from exc
    if (
        not isinstance(data, list)
        or len(data) < 2
        or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in data)
    ):
        raise ValueError(f"class counts file {path} must hold a JSON list of K >= 2 integers >= 0")
    return [int(c) for c in data]


def _data_spec(workspace: OwnerWorkspace) -> tuple[InputSpec, torch.Tensor]:
    train = workspace.records["train"]
    x = train.modalities[workspace.modality]
    lo, hi = float(np.min(x)), float(np.max(x))
    spec = InputSpec.create(x.shape[1:], "float32", (lo, hi) if lo < hi else None)
    return spec, torch.from_numpy(np.ascontiguousarray(x[:_PROBE_RECORDS], dtype=np.float32))


def import_model(
    workspace: OwnerWorkspace,
    model_file: str | Path,
    *,
    factory: str | None = None,
    head: str | None = None,
    class_counts: Sequence[int] | None = None,
    input_spec: InputSpec | None = None,
    spec_from_shape: Callable[[tuple[int, ...]], InputSpec] | None = None,
) -> ImportReport:
    """Load, check and publish ``model_file`` as the current version of ``workspace``.

    Without ``input_spec`` it is taken from the owner's data source (shape, float32, the
    training inputs' range), and the probe batch is made of real training records; else, for a
    ``torch.export`` archive, from the sample shape the export records (through
    ``spec_from_shape``, default: that shape, float32). Without ``class_counts`` they are
    counted in the data source's train split.

    Raises:
        ModelImportError: the file, the head or the probe check is refused (clear message).
        ValueError: class counts or input spec missing or inconsistent with the model.
    """
    has_data = workspace.source is not None and "train" in workspace.records
    probe = None
    if has_data:
        data_spec, probe = _data_spec(workspace)
        if input_spec is None:
            input_spec = data_spec
        elif input_spec.shape != data_spec.shape:
            raise ValueError(
                f"input shape {input_spec.shape} differs from the data source's {data_spec.shape}"
            )
    loaded = load_model_file(model_file, factory=factory)
    if input_spec is None and loaded.sample_shape is not None:
        make = spec_from_shape or (lambda shape: InputSpec.create(list(shape)))
        input_spec = make(tuple(loaded.sample_shape))
    if input_spec is None:
        raise ValueError(
            f"{Path(model_file).name} ({loaded.format}) records no input shape: pass "
            "--input-shape (one record's shape, e.g. 1,8,8) or --data"
        )
    if probe is not None:
        probe = probe.to(getattr(torch, input_spec.dtype))
    model, err = imported_model(loaded, input_spec, head=head, probe=probe)
    k = model.num_classes
    if class_counts is None:
        if not has_data:
            raise ValueError("pass class counts (a JSON list of K integers) or a data source")
        class_counts = [int(c) for c in workspace.records["train"].class_counts()]
    counts = tuple(int(c) for c in class_counts)
    if len(counts) != k:
        raise ModelImportError(f"the model has K={k} classes but {len(counts)} class counts")
    if has_data and workspace.records["train"].num_classes != k:
        raise ModelImportError(
            f"the model has K={k} classes, the data source {workspace.records['train'].num_classes}"
        )
    accuracy: dict[str, float] = {}
    if has_data:
        for split, ds in workspace.records.items():
            x = torch.from_numpy(ds.modalities[workspace.modality].astype(np.float32))
            pred = predict_logits(model, x).argmax(1).numpy()
            accuracy[split] = float((pred == ds.labels).mean()) if len(pred) else float("nan")
    version = workspace.publish(
        model,
        {
            "method": "imported",
            "source_file": Path(model_file).name,
            "format": loaded.format,
            "class_counts": list(counts),
            "probe_max_error": err,
            "imported_at": dt.datetime.now(dt.timezone.utc).isoformat(),
            "accuracy": accuracy,
        },
    )
    return ImportReport(
        version,
        loaded.format,
        model.head_name,
        k,
        model.feature_dim,
        err,
        counts,
        input_spec,
        accuracy,
    )
