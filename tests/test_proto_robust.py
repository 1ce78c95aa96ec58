"""The robust method's additions to ``jacfusion.v1`` are additive (issue 11): every field and
enum value the touched messages had before keeps its name, number, type and label, and the
new ones use new numbers. (``buf breaking`` against the previous proto/ checks the whole API
where buf is installed; this test runs everywhere.)"""

from __future__ import annotations

from typing import Any

import pytest

from jacfusion_fed.rpc.jacfusion.v1 import fusion_pb2, modality_pb2

# (name, number, type, label) before the robust method; types/labels as in descriptor.proto
# (9 string, 11 message, 13 uint32, 14 enum, 8 bool, 1 double; label 1 optional, 3 repeated)
BEFORE: dict[str, tuple[Any, list[tuple[str, int, int, int]]]] = {
    "Predictions": (
        fusion_pb2.Predictions,
        [
            ("sample_ids", 1, 9, 3),
            ("probabilities", 2, 11, 1),
            ("predicted_labels", 3, 13, 3),
            ("modalities", 4, 11, 3),
            ("unpredicted_sample_ids", 5, 9, 3),
            ("method", 6, 14, 1),
        ],
    ),
    "ModalityContribution": (
        fusion_pb2.ModalityContribution,
        [
            ("modality", 1, 9, 1),
            ("owner", 2, 9, 1),
            ("model_version", 3, 9, 1),
            ("used", 4, 8, 3),
            ("gamma", 5, 1, 1),
            ("regularized", 6, 8, 1),
            ("error", 7, 9, 1),
        ],
    ),
    "GetHeadResponse": (
        modality_pb2.GetHeadResponse,
        [
            ("model_version", 1, 9, 1),
            ("num_classes", 2, 13, 1),
            ("gram", 3, 11, 1),
            ("full", 4, 11, 1),
        ],
    ),
}
ADDED = {
    "Predictions": {("prediction_sets", 7, 11, 3), ("abstain", 8, 8, 3)},
    "ModalityContribution": {
        ("sites", 8, 11, 3),
        ("ambiguous_sample_ids", 9, 9, 3),
        ("reliability", 10, 1, 3),
    },
    "GetHeadResponse": {("calibration", 5, 11, 1)},
}


def _fields(message: Any) -> list[tuple[str, int, int, int]]:
    return [(f.name, f.number, f.type, f.label) for f in message.DESCRIPTOR.fields]


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_old_fields_unchanged_new_fields_added(name: str) -> None:
    message, before = BEFORE[name]
    now = _fields(message)
    assert now[: len(before)] == before
    assert set(now[len(before) :]) == ADDED[name]
    assert min(n for _, n, _, _ in ADDED[name]) > max(n for _, n, _, _ in before)


def test_fusion_method_values_kept_and_robust_added() -> None:
    values = [(v.name, v.number) for v in fusion_pb2.FusionMethod.DESCRIPTOR.values]
    assert values == [
        ("FUSION_METHOD_UNSPECIFIED", 0),
        ("FUSION_METHOD_STATISTICAL", 1),
        ("FUSION_METHOD_JACOBIAN", 2),
        ("FUSION_METHOD_MEAN", 3),
        ("FUSION_METHOD_CONFIDENCE_MEAN", 4),
        ("FUSION_METHOD_ROBUST", 5),
    ]


def test_every_registered_fusion_method_has_its_enum_value() -> None:
    from jacfusion_fed.fusion import METHODS
    from jacfusion_fed.rpc.fusion_codec import METHOD_TO_PROTO

    assert set(METHODS) == set(METHOD_TO_PROTO)
