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
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from jacfusion_fed.fusion import FusionInputError, LayeredDetector, fit_layered_detector
from jacfusion_fed.fusion.detection import layered_pvalues
from jacfusion_fed.training import predict_layers

#: The split the detector is fitted on: the calibration's (``owner.calibration.CALIBRATION_SPLIT``,
#: not imported: that module imports the workspace, which imports this one).
DETECTOR_SPLIT = "val"


class DetectorWorkspace(Protocol):
    """What the detector needs of :class:`~jacfusion_fed.owner.workspace.OwnerWorkspace`
    (a protocol: the workspace imports this module)."""

    @property
    def modality(self) -> str: ...

    @property
    def records(self) -> Mapping[str, Any]: ...

    def current_version(self) -> str: ...

    def load_model(self, version: str | None = None) -> tuple[str, Any]: ...


__all__ = ["DETECTOR_SPLIT", "DetectorWorkspace", "pvalues_of_inputs", "workspace_detector"]

log = logging.getLogger(__name__)

_lock = threading.Lock()
_cache: weakref.WeakKeyDictionary[DetectorWorkspace, dict[str, LayeredDetector | None]] = (
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


def pvalues_of_inputs(
    ws: DetectorWorkspace, version: str, model: nn.Module, x: torch.Tensor
) -> np.ndarray | None:
    """Exact conformal p-values (N,) float64 of inputs ``x`` under ``version``'s detector;
    None when the owner has no detector."""
    det = workspace_detector(ws, version)
    if det is None:
        return None
    if len(x) == 0:
        return np.zeros(0, dtype=np.float64)
    layers = predict_layers(model, x)
    if layers is None or tuple(h.shape[1] for h in layers) != det.layer_dims:
        return None
    out: np.ndarray = layered_pvalues(det, layers).numpy().astype(np.float64)
    return out
