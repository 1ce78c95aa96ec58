"""An owner's feature detector: one conformal p-value per requested sample (issue 20).

For each model version the owner fits :func:`jacfusion_fed.fusion.fit_feature_detector` (a
class-conditional Mahalanobis score on its net's penultimate features, split-conformal with
disjoint fit and reference halves) on its own clean validation split (``"val"``), once. For a
requested sample it computes the features of the input it holds (or of the perturbed input,
in the robustness evaluation) and publishes **only the p-value** next to the logits: the
``pvalues`` of ``LogitsBatch`` (gRPC) and the ``u{i}`` arrays of the Flower query reply.
Neither the features, nor the detector's statistics, nor the inputs leave the owner (what a
p-value reveals: ``docs/calibration.md``).

Built-in nets (:class:`~jacfusion_fed.models.UnimodalNet`) expose ``features``. Imported models
(:class:`~jacfusion_fed.owner.importing.ImportedModel`) are not wired yet: their features are
recoverable by the import's head probe (H / K forward passes with the head's weights swapped,
which is not safe while other requests run on the same module), so they publish no p-value
(the field stays empty; the coordinator then uses the logits-only signals).
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from jacfusion_fed.fusion import FeatureDetector, FusionInputError, fit_feature_detector
from jacfusion_fed.fusion.detection import feature_pvalues

from .calibration import CALIBRATION_SPLIT

if TYPE_CHECKING:
    from .workspace import OwnerWorkspace

__all__ = ["model_features", "pvalues_of_inputs", "workspace_detector"]

log = logging.getLogger(__name__)

_lock = threading.Lock()
_cache: weakref.WeakKeyDictionary[OwnerWorkspace, dict[str, FeatureDetector | None]] = (
    weakref.WeakKeyDictionary()
)


def model_features(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor | None:
    """Penultimate features (N, H) float64 of ``x``, or None when the model exposes none."""
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Module):
        return None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            xt = x.to(torch.float32)
            outs = [features(xt[i : i + batch_size]) for i in range(0, len(xt), batch_size)]
    finally:
        model.train(was_training)
    if not outs:
        return torch.zeros((0, 0), dtype=torch.float64)
    return torch.cat(outs).flatten(1).to(torch.float64)


def workspace_detector(ws: OwnerWorkspace, version: str | None = None) -> FeatureDetector | None:
    """The detector of model ``version`` (current if None), fitted once per version on the
    owner's validation split; None without a usable split or features."""
    version = version or ws.current_version()
    with _lock:
        known = _cache.setdefault(ws, {})
        if version in known:
            return known[version]
    det: FeatureDetector | None = None
    split = ws.records.get(CALIBRATION_SPLIT)
    if split is not None and len(split.labels):
        _, model = ws.load_model(version)
        x, y = split.tensors(ws.modality)
        feats = model_features(model, x)
        if feats is not None:
            try:
                det = fit_feature_detector(feats, y, int(model.head.out_features))
            except FusionInputError as exc:
                log.warning("owner of %r publishes no detector p-values: %s", ws.modality, exc)
    with _lock:
        _cache.setdefault(ws, {})[version] = det
    return det


def pvalues_of_inputs(
    ws: OwnerWorkspace, version: str, model: nn.Module, x: torch.Tensor
) -> np.ndarray | None:
    """Exact conformal p-values (N,) float64 of inputs ``x`` under ``version``'s detector;
    None when the owner has no detector."""
    det = workspace_detector(ws, version)
    if det is None:
        return None
    feats = model_features(model, x)
    if feats is None or feats.shape[1] != det.feature_dim:
        return None
    if feats.shape[0] == 0:
        return np.zeros(0, dtype=np.float64)
    out: np.ndarray = feature_pvalues(det, feats).numpy().astype(np.float64)
    return out
