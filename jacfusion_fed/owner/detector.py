"""An owner's feature detector: one conformal p-value per requested sample (issue 20).

For each model version the owner fits :func:`jacfusion_fed.fusion.fit_layered_detector` (a
class-conditional Mahalanobis score on each layer of its net, the penultimate features last,
split-conformal with disjoint fit and reference halves, the layers' p-values combined by
Cauchy) on its own clean validation split (``"val"``), once. For a requested sample it
computes the activations of the input it holds (or of the perturbed input, in the robustness
evaluation) and publishes **only the p-value** next to the logits: the
``pvalues`` of ``LogitsBatch`` (gRPC) and the ``u{i}`` arrays of the Flower query reply.
Neither the features, nor the detector's statistics, nor the inputs leave the owner (what a
p-value reveals: ``docs/calibration.md``).

Built-in nets (:class:`~jacfusion_fed.models.UnimodalNet`) expose every block's activations
(``layers``). Imported models
(:class:`~jacfusion_fed.owner.importing.ImportedModel`) give the head's input through
``recover_features``: a per-thread forward pre-hook on the head for a plain module built by a
factory (safetensors); for TorchScript and export archives (no hooks) the import's head probe
(ceil(H / K) forward passes with unit rows as the head's weights) on a private copy of the
module loaded from the stored archive, one probe at a time, so the serving module is never
modified; for them the detector has one layer, the penultimate features.

**The input test (opt-in).** An owner whose records are images or spectrograms ((C, H, W)
inputs) can also fit the attack-free input test of
:mod:`jacfusion_fed.training.input_detector` (a small CNN telling its clean training inputs
from the same inputs with random sign noise; its clean validation inputs are the conformal
reference): ``owner serve --input-test`` fits it once, before serving, and keeps it in the
workspace (``input-test.safetensors``, with a fingerprint of the inputs it was fitted on and
the hyperparameters). It depends on the data, not on the model version. From then on the
published p-value, on every transport (gRPC, the Flower query reply), is the Bonferroni
combination ``min(1, 2 min(u_F, u_I))`` of the feature p-value u_F and the input test's u_I:
still one number per sample. A stored input test whose fingerprint no longer matches the
data is not used (logged).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_tensors
from torch import nn

from jacfusion_fed.atomicio import atomic_write_bytes
from jacfusion_fed.fusion import (
    FusionInputError,
    LayeredDetector,
    combine_pvalues,
    fit_layered_detector,
)
from jacfusion_fed.fusion.detection import layered_pvalues
from jacfusion_fed.training import input_detector, predict_layers
from jacfusion_fed.training.input_detector import InputDetector

#: The split the detector is fitted on: the calibration's (``owner.calibration.CALIBRATION_SPLIT``,
#: not imported: that module imports the workspace, which imports this one).
DETECTOR_SPLIT = "val"


class DetectorWorkspace(Protocol):
    """What the detector needs of :class:`~jacfusion_fed.owner.workspace.OwnerWorkspace`
    (a protocol: the workspace imports this module)."""

    @property
    def modality(self) -> str: ...

    @property
    def root(self) -> Path: ...

    @property
    def records(self) -> Mapping[str, Any]: ...

    def current_version(self) -> str: ...

    def load_model(self, version: str | None = None) -> tuple[str, Any]: ...


__all__ = [
    "DETECTOR_SPLIT",
    "INPUT_TEST_FILE",
    "DetectorWorkspace",
    "fit_workspace_input_test",
    "pvalues_of_inputs",
    "workspace_detector",
    "workspace_input_test",
]

#: Where ``owner serve --input-test`` keeps the fitted input test, in the workspace root.
INPUT_TEST_FILE = "input-test.safetensors"

log = logging.getLogger(__name__)

_lock = threading.Lock()
_cache: weakref.WeakKeyDictionary[DetectorWorkspace, dict[str, LayeredDetector | None]] = (
    weakref.WeakKeyDictionary()
)
_inputs: weakref.WeakKeyDictionary[DetectorWorkspace, InputDetector | None] = (
    weakref.WeakKeyDictionary()
)


def workspace_detector(ws: DetectorWorkspace, version: str | None = None) -> LayeredDetector | None:
    """The detector of model ``version`` (current if None), fitted once per version on the
    owner's validation split; None without a usable split or features."""
    version = version or ws.current_version()
    with _lock:
        known = _cache.setdefault(ws, {})
        if version in known:
            return known[version]
    det: LayeredDetector | None = None
    split = ws.records.get(DETECTOR_SPLIT)
    if split is not None and len(split.labels):
        _, model = ws.load_model(version)
        x, y = split.tensors(ws.modality)
        layers = predict_layers(model, x)
        if layers is not None:
            try:
                det = fit_layered_detector(layers, y, int(model.head.out_features))
            except FusionInputError as exc:
                log.warning("owner of %r publishes no detector p-values: %s", ws.modality, exc)
    with _lock:
        _cache.setdefault(ws, {})[version] = det
    return det


def _input_splits(ws: DetectorWorkspace) -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs the input test is fitted on (training split) and referenced to (validation
    split); ValueError naming what is missing."""
    train, val = ws.records.get("train"), ws.records.get(DETECTOR_SPLIT)
    if train is None or val is None or len(val.labels) < 2:
        raise ValueError(
            f"the input test needs the owner's train and {DETECTOR_SPLIT} splits (--data)"
        )
    x_fit, x_ref = train.tensors(ws.modality)[0], val.tensors(ws.modality)[0]
    if not input_detector.applies(x_fit):
        raise ValueError(
            f"the input test needs (C, H, W) records (images, spectrograms); {ws.modality!r} "
            f"records have shape {tuple(x_fit.shape[1:])}"
        )
    return x_fit, x_ref


def _fingerprint(x_fit: torch.Tensor, x_ref: torch.Tensor) -> str:
    """sha256 of the inputs and the input test's hyperparameters (seed 0)."""
    h = hashlib.sha256()
    for x in (x_fit, x_ref):
        h.update(repr((tuple(x.shape), str(x.dtype))).encode())
        h.update(x.detach().contiguous().numpy().tobytes())
    hp = (input_detector.LOW, input_detector.HIGH, input_detector.EPOCHS, input_detector.BATCH)
    h.update(repr(hp).encode())
    return h.hexdigest()


def fit_workspace_input_test(
    ws: DetectorWorkspace, on_fit: Callable[[int], None] | None = None
) -> tuple[bool, float]:
    """Fit the owner's input test and keep it in the workspace (:data:`INPUT_TEST_FILE`),
    unless the stored one was fitted on the same inputs. Returns ``(fitted, seconds)``:
    whether it was fitted now. ``on_fit(n)`` is called just before a fit on n training
    records (it takes a while). ValueError naming what is missing (no splits, vector
    records)."""
    x_fit, x_ref = _input_splits(ws)
    fingerprint = _fingerprint(x_fit, x_ref)
    path = Path(ws.root) / INPUT_TEST_FILE
    kept = _load_input_test(path, fingerprint)
    if kept is not None:
        with _lock:  # what workspace_input_test would load: not read and hashed again
            _inputs[ws] = kept
        return False, 0.0
    if on_fit is not None:
        on_fit(len(x_fit))
    start = time.perf_counter()
    det = input_detector.fit_input_detector(x_fit, x_ref, seed=0)
    meta = {"fingerprint": fingerprint, "fit_samples": str(len(x_fit))}
    atomic_write_bytes(path, save_tensors(input_detector.to_tensors(det), metadata=meta))
    with _lock:
        _inputs[ws] = det
    return True, time.perf_counter() - start


def _load_input_test(path: Path, fingerprint: str) -> InputDetector | None:
    """The stored input test if it exists and was fitted on the inputs ``fingerprint``
    names; None otherwise (a mismatch or a damaged file is logged)."""
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        det = input_detector.from_tensors(tensors)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        log.warning("%s is not used: %s", path, exc)
        return None
    if meta.get("fingerprint") != fingerprint:
        log.warning(
            "%s is not used: it was fitted on other records (owner serve --input-test refits)",
            path,
        )
        return None
    return det


def workspace_input_test(ws: DetectorWorkspace) -> InputDetector | None:
    """The owner's stored input test (module docstring), loaded once per workspace; None
    when it has none (the default) or the stored one does not match its records."""
    with _lock:
        if ws in _inputs:
            return _inputs[ws]
    det: InputDetector | None = None
    path = Path(ws.root) / INPUT_TEST_FILE
    if path.exists():
        try:
            x_fit, x_ref = _input_splits(ws)
        except ValueError as exc:
            log.warning("%s is not used: %s", path, exc)
        else:
            det = _load_input_test(path, _fingerprint(x_fit, x_ref))
    with _lock:
        _inputs[ws] = det
    return det


def pvalues_of_inputs(
    ws: DetectorWorkspace, version: str, model: nn.Module, x: torch.Tensor
) -> np.ndarray | None:
    """Exact conformal p-values (N,) float64 of inputs ``x``: ``version``'s feature detector,
    combined (Bonferroni) with the owner's input test when it has one; None when the owner
    has neither."""
    det, inp = workspace_detector(ws, version), workspace_input_test(ws)
    if det is None and inp is None:
        return None
    if len(x) == 0:
        return np.zeros(0, dtype=np.float64)
    parts = []
    if det is not None:
        layers = predict_layers(model, x)
        if layers is None or tuple(h.shape[1] for h in layers) != det.layer_dims:
            return None
        parts.append(layered_pvalues(det, layers))
    if inp is not None:
        parts.append(input_detector.input_pvalues(inp, x))
    both = combine_pvalues(torch.stack(parts, dim=-1), "bonferroni")
    out: np.ndarray = both.numpy().astype(np.float64)
    return out
