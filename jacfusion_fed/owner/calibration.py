"""An owner's clean calibration statistics, published next to its head (issue 11).

For each model version the owner fits :func:`jacfusion_fed.fusion.fit_calibration` on the
logits of its own clean validation split (``"val"`` of its data source): class-mean logits,
their pooled precision and two sorted score lists (what they reveal: ``docs/calibration.md``).
Both publication paths use :func:`workspace_calibration`: the gRPC ``GetHead`` answer
(``GetHeadResponse.calibration``) and the Flower head reply (the ``"calibration"`` record).

An owner without a validation split (live records only, an imported model without data) or
whose split cannot be fitted (a class missing, fewer samples than classes) publishes none;
the coordinator then refuses the ``robust`` method for its modality with a clear message.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import TYPE_CHECKING

import torch

from jacfusion_fed.fusion import FusionInputError, ModalityCalibration, fit_calibration
from jacfusion_fed.training import predict_logits

if TYPE_CHECKING:
    from .workspace import OwnerWorkspace

__all__ = ["CALIBRATION_SPLIT", "workspace_calibration"]

log = logging.getLogger(__name__)

#: The data-source split an owner calibrates on (clean, labelled, not used for training).
CALIBRATION_SPLIT = "val"

_lock = threading.Lock()
_cache: weakref.WeakKeyDictionary[OwnerWorkspace, dict[str, ModalityCalibration | None]] = (
    weakref.WeakKeyDictionary()
)


def workspace_calibration(
    ws: OwnerWorkspace, version: str | None = None
) -> ModalityCalibration | None:
    """The calibration of model ``version`` (current if None) on the owner's validation
    split, fitted once per version; None when the owner has no usable validation split."""
    version = version or ws.current_version()
    with _lock:
        known = _cache.setdefault(ws, {})
        if version in known:
            return known[version]
    cal: ModalityCalibration | None = None
    split = ws.records.get(CALIBRATION_SPLIT)
    if split is not None and len(split.labels):
        _, model = ws.load_model(version)
        x, y = split.tensors(ws.modality)
        try:
            cal = fit_calibration(predict_logits(model, x).to(torch.float64), y)
        except FusionInputError as exc:
            log.warning("owner of %r publishes no calibration: %s", ws.modality, exc)
    with _lock:
        _cache.setdefault(ws, {})[version] = cal
    return cal
