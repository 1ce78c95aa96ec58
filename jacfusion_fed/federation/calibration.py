"""Owner-published calibration statistics for robust fusion (issue 11).

Each owner computes :class:`~jacfusion_fed.fusion.ModalityCalibration` on its own clean
validation split and publishes it next to its head as one ``ArrayRecord`` named
``"calibration"``: aggregates only (what they reveal: ``docs/calibration.md``).

The allow-list entry binds ``K`` (the head's classes) and ``V`` (the owner's number of
validation samples; both score arrays must have that one length):

    calibration: class-means (K, K), precision (K, K), typicality-scores (V,),
                 conformity-scores (V,), all float64

The coordinator checks a reply with ``check_reply_allowed(reply, {**head_spec,
**calibration_reply_spec()})`` (the allow-list entry lives in :mod:`.protocol` with the other
reply specs, and is re-exported here) and rebuilds the calibration with
:func:`calibration_from_record` (which also refuses unsorted scores: sorted, they carry no
per-sample order).
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord

from jacfusion_fed.fusion import ModalityCalibration, fit_calibration
from jacfusion_fed.training import predict_logits

from .protocol import CALIBRATION_RECORD, CALIBRATION_WIRE, arrays_record, calibration_reply_spec

__all__ = [
    "CALIBRATION_RECORD",
    "calibration_from_record",
    "calibration_record",
    "calibration_reply_spec",
    "owner_calibration",
]

_WIRE = CALIBRATION_WIRE


def calibration_record(cal: ModalityCalibration) -> ArrayRecord:
    """The published ``ArrayRecord`` (float64 arrays, wire names with hyphens)."""
    return arrays_record({_WIRE[f]: a.astype(np.float64) for f, a in cal.to_arrays().items()})


def calibration_from_record(record: ArrayRecord) -> ModalityCalibration:
    """Rebuild and validate a calibration from an (allow-listed) record."""
    back = {v: k for k, v in _WIRE.items()}
    arrays = {back.get(name, name): arr.numpy() for name, arr in record.items()}
    return ModalityCalibration.from_arrays(arrays)


def owner_calibration(
    model: torch.nn.Module, x_val: np.ndarray | torch.Tensor, y_val: np.ndarray
) -> ModalityCalibration:
    """What an owner publishes: :func:`fit_calibration` of its net on its clean validation
    split (the owner's own records; nothing per sample leaves except sorted scores)."""
    return fit_calibration(predict_logits(model, x_val).to(torch.float64), y_val)
