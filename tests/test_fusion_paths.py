"""`simulate` and `coordinator serve` fuse the same heads, class counts and logits to the same
probabilities, an empty class included.

`simulate`'s fusion is the federated evaluation's (:mod:`jacfusion_fed.server.federated_eval`:
the prior from the registered heads' class counts, the table's fusion of each cell);
`coordinator serve`'s is :meth:`Coordinator.predict` (fake owners injected through
``connect``, so the real planning, fan-out, fusion and assembly run). Both must go through
the fusion registry's one prior rule: before it, the evaluation clipped the prior at 1e-6
while the coordinator smoothed it, and an empty class gave different answers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from jacfusion_fed.fusion import (
    METHODS,
    ModalityCalibration,
    factor_gram,
    fit_calibration,
    log_prior_from_counts,
    prior_from_counts,
    robust_fusion,
)
from jacfusion_fed.rpc.calibration_codec import encode_calibration
from jacfusion_fed.rpc.fusion_codec import PredictOptions
from jacfusion_fed.rpc.jacfusion.v1 import modality_pb2
from jacfusion_fed.rpc.matrix import encode_matrix
from jacfusion_fed.rpc.tls import INSECURE
from jacfusion_fed.server.coordinator import Coordinator
from jacfusion_fed.server.federated_eval import eval_prior, fused_probabilities
from jacfusion_fed.server.owner_channel import OwnerChannel
from jacfusion_fed.server.predict_types import CoordinatorConfig, OwnerEndpoint
from jacfusion_fed.store import HeadRegistry

K = 4
ORDER = ("audio", "image")  # the table's order: the perturbed (regularized) modality last
IDS = [f"{i:064x}" for i in range(12)]
GAMMA = 0.3


class _Owner:
    """A fake ``ModalityServiceStub`` serving one head and fixed logits."""

    def __init__(self, modality: str, gram: np.ndarray, counts: list[int], z: np.ndarray):
        self.modality, self.gram, self.counts, self.z = modality, gram, counts, z
        # its calibration, on validation logits near its test logits (for robust fusion)
        rng = np.random.default_rng(len(modality))
        self.calibration = fit_calibration(
            rng.normal(scale=3.0, size=(80, K)) + 2.0 * np.eye(K)[np.arange(80) % K],
            np.arange(80) % K,
        )

    def GetInfo(self, request: Any, timeout: float | None = None) -> Any:
        return modality_pb2.GetInfoResponse(
            modality=self.modality,
            owner=f"{self.modality}-co",
            model_version="v1",
            num_classes=K,
            feature_dim=3,
            class_counts=self.counts,
            shareable_head_kinds=[modality_pb2.HEAD_KIND_GRAM],
        )

    def GetHead(self, request: Any, timeout: float | None = None) -> Any:
        out = modality_pb2.GetHeadResponse(model_version="v1", num_classes=K)
        out.gram.gram.CopyFrom(encode_matrix(self.gram))
        out.calibration.CopyFrom(encode_calibration(self.calibration.to_arrays()))
        return out

    def GetLogits(self, request: Any, timeout: float | None = None) -> Any:
        rows = [IDS.index(i) for i in request.sample_ids]
        return modality_pb2.GetLogitsResponse(
            model_version="v1",
            batch=modality_pb2.LogitsBatch(
                sample_ids=list(request.sample_ids), logits=encode_matrix(self.z[rows])
            ),
        )


@pytest.fixture
def setup(tmp_path: Path) -> Any:
    rng = np.random.default_rng(7)
    # Class 2 has no training sample at either owner.
    counts = {"audio": [5, 9, 0, 3], "image": [4, 11, 0, 2]}
    owners = {}
    for m in ORDER:
        w = rng.normal(size=(K, 3))
        owners[m] = _Owner(m, w @ w.T, counts[m], rng.normal(scale=3.0, size=(len(IDS), K)))
    coordinator = Coordinator(
        tmp_path / "registry",
        [OwnerEndpoint(m, f"127.0.0.1:{9 + j}") for j, m in enumerate(ORDER)],
        INSECURE,
        CoordinatorConfig(device="cpu", default_gamma=GAMMA),
        connect=lambda endpoint: OwnerChannel(owners[endpoint.modality]),
    )
    assert coordinator.sync() == {m: "" for m in ORDER}
    yield owners, coordinator
    coordinator.close()


def test_prior_rule_is_add_one_smoothing() -> None:
    np.testing.assert_allclose(prior_from_counts([3, 0, 1]), [4 / 7, 1 / 7, 2 / 7], atol=0)
    np.testing.assert_allclose(log_prior_from_counts([2, 2]), np.log([0.5, 0.5]), atol=0)
    assert np.isfinite(log_prior_from_counts([0, 0, 5])).all()


@pytest.mark.parametrize("method", METHODS)
def test_simulate_and_serve_fuse_identically(setup: Any, method: str) -> None:
    owners, coordinator = setup
    registry = HeadRegistry(coordinator.registry.root)
    records = {m: registry.get(m) for m in ORDER}
    prior, log_prior = eval_prior(records, ORDER)
    # The coordinator reports (and fuses with) the same prior, the empty class included.
    np.testing.assert_array_equal(coordinator.model_info().class_prior, prior)
    assert prior[2] > 0
    factors = [factor_gram(records[m].gram_matrix()) for m in ORDER]
    # the registry kept each owner's calibration with its head
    cals = [ModalityCalibration.from_arrays(records[m].calibration or {}) for m in ORDER]
    simulated = fused_probabilities(
        method, [owners[m].z for m in ORDER], factors, log_prior, GAMMA, [len(ORDER) - 1], cals
    ).numpy()
    takes_jacobian_options = method == "jacobian"
    options = PredictOptions(
        method=method,
        regularize=(ORDER[-1],) if takes_jacobian_options else (),
    )
    served = coordinator.predict(IDS, options).probabilities
    np.testing.assert_allclose(served, simulated, rtol=0, atol=1e-12)
    # Regularized Jacobian fusion and the statistical rule use the prior: an unsmoothed or
    # clipped prior (the old rules) would give other probabilities here.
    if method in ("statistical", "jacobian"):
        clipped = np.log(np.clip(np.sum([owners[m].counts for m in ORDER], 0) / 34, 1e-6, None))
        other = fused_probabilities(
            method, [owners[m].z for m in ORDER], factors, clipped, GAMMA, [len(ORDER) - 1]
        ).numpy()
        assert np.abs(other - served).max() > 1e-3


def test_robust_answer_is_robust_fusion_of_the_same_logits(setup: Any) -> None:
    """The coordinator's robust answer carries, per sample, what ``robust_fusion`` says on
    the same logits, calibrations and prior: probabilities, each modality's reliability, the
    prediction set and the abstain flag (and encodes and decodes them losslessly)."""
    from jacfusion_fed.rpc.fusion_codec import answer_from_proto, predictions_to_proto

    owners, coordinator = setup
    registry = HeadRegistry(coordinator.registry.root)
    _, log_prior = eval_prior({m: registry.get(m) for m in ORDER}, ORDER)
    want = robust_fusion(
        [owners[m].z for m in ORDER], [owners[m].calibration for m in ORDER], log_prior
    )
    got = coordinator.predict(IDS, PredictOptions(method="robust"))
    assert got.method == "robust" and got.prediction_sets is not None
    np.testing.assert_allclose(got.probabilities, want.p.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(got.prediction_sets, want.prediction_set.numpy())
    np.testing.assert_array_equal(got.abstain, want.abstain.numpy())
    for j, c in enumerate(got.modalities):
        np.testing.assert_allclose(c.reliability, want.reliability[:, j].numpy(), atol=1e-12)
    wire = answer_from_proto(predictions_to_proto(got))
    np.testing.assert_array_equal(wire.prediction_sets, got.prediction_sets)
    np.testing.assert_array_equal(wire.abstain, got.abstain)
    assert [c.reliability for c in wire.modalities] == [c.reliability for c in got.modalities]
