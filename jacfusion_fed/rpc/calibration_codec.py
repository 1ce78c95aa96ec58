"""An owner's calibration (``jacfusion.v1.Calibration``, in ``GetHeadResponse``) <-> arrays.

The arrays are those of :meth:`jacfusion_fed.fusion.ModalityCalibration.to_arrays`:
``class_means`` (K, K), ``precision`` (K, K), ``typicality_scores`` (V,) and
``conformity_scores`` (V,), float64. Decoding checks sizes, shapes and finite values here;
the fusion package's :meth:`~jacfusion_fed.fusion.ModalityCalibration.from_arrays` checks the
rest (sorted scores, a symmetric precision) when the coordinator rebuilds it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from jacfusion_fed.rpc.jacfusion.v1 import modality_pb2
from jacfusion_fed.rpc.matrix import MatrixDecodeError, decode_matrix, encode_matrix

__all__ = ["decode_calibration", "encode_calibration"]


def encode_calibration(arrays: Mapping[str, np.ndarray]) -> modality_pb2.Calibration:
    """The ``Calibration`` message of an owner's calibration arrays."""
    return modality_pb2.Calibration(
        class_means=encode_matrix(arrays["class_means"]),
        precision=encode_matrix(arrays["precision"]),
        typicality_scores=np.asarray(arrays["typicality_scores"], dtype=np.float64).tolist(),
        conformity_scores=np.asarray(arrays["conformity_scores"], dtype=np.float64).tolist(),
    )


def decode_calibration(
    head: modality_pb2.GetHeadResponse, k: int, name: str
) -> dict[str, np.ndarray] | None:
    """The calibration arrays of a ``GetHead`` answer, None when the owner sent none;
    :class:`~jacfusion_fed.rpc.matrix.MatrixDecodeError` naming ``name`` when malformed."""
    if not head.HasField("calibration"):
        return None
    msg = head.calibration
    typicality = np.asarray(msg.typicality_scores, dtype=np.float64)
    conformity = np.asarray(msg.conformity_scores, dtype=np.float64)
    if typicality.size < 1 or typicality.shape != conformity.shape:
        raise MatrixDecodeError(
            f"{name}: {typicality.size} typicality and {conformity.size} conformity scores "
            "(need one length V >= 1)"
        )
    if not (np.isfinite(typicality).all() and np.isfinite(conformity).all()):
        raise MatrixDecodeError(f"{name}: scores contain NaN or infinite values")
    return {
        "class_means": decode_matrix(msg.class_means, shape=(k, k), name=f"{name} class means"),
        "precision": decode_matrix(msg.precision, shape=(k, k), name=f"{name} precision"),
        "typicality_scores": typicality,
        "conformity_scores": conformity,
    }
