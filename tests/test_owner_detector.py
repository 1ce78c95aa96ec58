"""Issue 20: an owner's detector p-values next to its logits (gRPC), and the coordinator's
check of them. (The Flower query reply and its allow-list: tests/test_apps_client.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from jacfusion_fed.clients.modality_service import ModalityServicer
from jacfusion_fed.fusion import combine_pvalues, fit_feature_detector, fit_layered_detector
from jacfusion_fed.fusion.detection import feature_pvalues
from jacfusion_fed.owner import OwnerWorkspace
from jacfusion_fed.owner.detector import workspace_detector
from jacfusion_fed.privacy import Pseudonymizer
from jacfusion_fed.robustness.perturbations import GaussianNoise
from jacfusion_fed.rpc.jacfusion.v1 import modality_pb2
from jacfusion_fed.rpc.matrix import encode_matrix
from jacfusion_fed.server.fanout import OwnerFailure, logits_of
from jacfusion_fed.training import predict_features, predict_layers

DATA = "builtin:twomoon?quick=1&seed=0"


class _Context:
    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise AssertionError(f"aborted: {code} {details}")


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> OwnerWorkspace:
    root: Path = tmp_path_factory.mktemp("owner")
    workspace = OwnerWorkspace(root / "ws", "y", DATA, Pseudonymizer(b"k" * 32))
    workspace.train(epochs=2, seed=0)
    return workspace


def test_get_logits_carries_one_pvalue_per_row(ws: OwnerWorkspace) -> None:
    ids = ws.pseudonyms("test")[:40]
    servicer = ModalityServicer(ws, "y-owner")
    resp = servicer.GetLogits(modality_pb2.GetLogitsRequest(sample_ids=ids), _Context())  # type: ignore[arg-type]
    batch = resp.batch
    pv = np.array(batch.pvalues)
    assert pv.shape == (len(batch.sample_ids),) == (40,)
    assert ((pv > 0) & (pv <= 1)).all()
    # the same numbers as the layered detector fitted here on the owner's validation split:
    # one Mahalanobis p-value per layer of the net, combined by Cauchy
    version, model = ws.load_model()
    val = ws.records["val"]
    x_val, y_val = val.tensors("y")
    layers_val = predict_layers(model, x_val)
    assert layers_val is not None and len(layers_val) >= 2  # every block, not only the last
    det = fit_layered_detector(layers_val, y_val, 2)
    x = torch.from_numpy(ws.records["test"].modalities["y"][:40])
    layers = predict_layers(model, x)
    assert layers is not None
    np.testing.assert_allclose(layers[-1].numpy(), predict_features(model, x).numpy())
    per_layer = torch.stack(
        [feature_pvalues(d, h) for d, h in zip(det.layers, layers, strict=True)], 1
    )
    np.testing.assert_allclose(pv, combine_pvalues(per_layer, "cauchy").numpy())
    # the response holds nothing else about the features (the proto's fields, by name)
    assert {f.name for f in batch.DESCRIPTOR.fields} == {
        "sample_ids",
        "logits",
        "unknown_sample_ids",
        "pvalues",
    }
    # a second call (the per-version memo) answers the same
    again = servicer.GetLogits(modality_pb2.GetLogitsRequest(sample_ids=ids), _Context())  # type: ignore[arg-type]
    assert list(again.batch.pvalues) == list(batch.pvalues)
    assert workspace_detector(ws, version) is not None


def test_perturbed_inputs_get_their_own_pvalues(ws: OwnerWorkspace) -> None:
    ids = ws.pseudonyms("test")[:60]
    clean = ws.detection_pvalues(ids, ws.current_version())
    noisy = ws.perturbed_logits(ids, GaussianNoise(0.5), generator=torch.Generator().manual_seed(0))
    assert clean is not None and noisy.pvalues is not None
    assert noisy.pvalues.shape == (60,)
    assert float(np.median(noisy.pvalues)) < float(np.median(clean))


def _batch(rows: int, pvalues: list[float]) -> Any:
    ids = [f"{i:064x}" for i in range(rows)]
    return modality_pb2.LogitsBatch(
        sample_ids=ids, logits=encode_matrix(np.zeros((rows, 2))), pvalues=pvalues
    )


def test_coordinator_checks_the_pvalues() -> None:
    assert logits_of("y", _batch(3, []), 3, 2, "v").shape == (3, 2)  # none: fine
    assert logits_of("y", _batch(3, [0.1, 1.0, 0.5]), 3, 2, "v").shape == (3, 2)
    for bad in ([0.1, 0.2], [0.1, 0.2, 0.0], [0.1, 0.2, 1.5], [0.1, 0.2, float("nan")]):
        with pytest.raises(OwnerFailure) as info:
            logits_of("y", _batch(3, bad), 3, 2, "v")
        assert info.value.code == grpc.StatusCode.DATA_LOSS
        assert "detector p-values" in str(info.value)


def test_detector_split_is_the_calibration_split() -> None:
    from jacfusion_fed.owner.calibration import CALIBRATION_SPLIT
    from jacfusion_fed.owner.detector import DETECTOR_SPLIT

    assert DETECTOR_SPLIT == CALIBRATION_SPLIT


def test_logits_batch_change_is_additive() -> None:
    fields = [
        (f.name, f.number, f.type, f.is_repeated)
        for f in modality_pb2.LogitsBatch.DESCRIPTOR.fields
    ]
    assert fields == [
        ("sample_ids", 1, 9, True),
        ("logits", 2, 11, False),
        ("unknown_sample_ids", 3, 9, True),
        ("pvalues", 4, 1, True),  # repeated double, new in issue 20
    ]


def test_live_records_get_pvalues_of_their_current_content(ws: OwnerWorkspace) -> None:
    pz = Pseudonymizer(b"k" * 32)
    ids = [pz(f"live-{i}") for i in range(4)]
    x = ws.records["test"].modalities["y"][:4].copy()
    ws.put_records(ids, x)
    version = ws.current_version()
    servicer = ModalityServicer(ws, "y-owner")
    resp = servicer.GetLogits(modality_pb2.GetLogitsRequest(sample_ids=ids), _Context())  # type: ignore[arg-type]
    first = np.array(resp.batch.pvalues)
    src = ws.detection_pvalues(ws.pseudonyms("test")[:4], version)
    np.testing.assert_allclose(first, src)  # same inputs, same p-values
    far = np.clip(x + 0.9 * np.sign(0.5 - x), 0, 1).astype(x.dtype)  # very different content
    ws.put_records(ids, far, replace=True)
    again = ws.detection_pvalues(ids, version)
    assert again is not None and not np.allclose(again, first)  # nothing stale


def test_an_imported_torchscript_archive_publishes_pvalues(
    ws: OwnerWorkspace, tmp_path: Path
) -> None:
    """Issue 20 for imported models: an archive (no hooks) gets its features from the head
    probe on a private copy, so its GetLogits carries p-values like a built-in net's."""
    from jacfusion_fed.owner.model_import import import_model

    _, net = ws.load_model()
    archive = tmp_path / "net.pt"
    torch.jit.save(torch.jit.script(net.eval()), archive)
    imported = OwnerWorkspace(tmp_path / "imp", "y", DATA, Pseudonymizer(b"k" * 32))
    import_model(imported, archive)
    ids = imported.pseudonyms("test")[:30]
    resp = ModalityServicer(imported, "y-owner").GetLogits(
        modality_pb2.GetLogitsRequest(sample_ids=ids),
        _Context(),  # type: ignore[arg-type]
    )
    got = np.array(resp.batch.pvalues)
    assert got.shape == (30,) and bool(((got > 0) & (got <= 1)).all())
    # an archive exposes the head's input only: a one-layer detector on the penultimate
    # features of the same net, fitted on the same validation split
    x_val, y_val = ws.records["val"].tensors("y")
    det = fit_feature_detector(predict_features(net, x_val), y_val, 2)
    x = torch.from_numpy(ws.records["test"].modalities["y"][:30])
    want = feature_pvalues(det, predict_features(net, x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_input_test_joins_the_pvalues_of_every_path_and_is_refused_when_stale(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The opt-in input test (``owner serve --input-test``, tests/test_cli_serve_lines.py):
    once fitted, detection_pvalues (the gRPC and Flower clean replies) and perturbed_logits
    (the Flower perturbed replies) both publish min(1, 2 min(feature, input)); a stored one
    fitted on other records is not used, and says so."""
    from jacfusion_fed.owner.detector import INPUT_TEST_FILE, workspace_input_test
    from jacfusion_fed.training.input_detector import input_pvalues

    data = "builtin:avdigits?quick=1"
    ws = OwnerWorkspace(tmp_path / "ws", "image", data, Pseudonymizer(b"k" * 32))
    ws.train(epochs=1, seed=0)
    version = ws.current_version()
    ids = ws.pseudonyms("test")[:30]
    feature = ws.detection_pvalues(ids, version)
    noise = GaussianNoise(0.3)
    gen = torch.Generator().manual_seed(0)
    feature_perturbed = ws.perturbed_logits(ids, noise, version, generator=gen).pvalues
    assert feature is not None and feature_perturbed is not None
    assert workspace_input_test(ws) is None  # opt-in: nothing until it is fitted
    assert ws.fit_input_test()[0] is True
    assert ws.fit_input_test()[0] is False  # kept: the same records are not fitted twice
    det = workspace_input_test(ws)
    assert det is not None
    x = torch.from_numpy(ws.records["test"].modalities["image"][:30])
    both = combine_pvalues(
        torch.stack([torch.from_numpy(feature), input_pvalues(det, x)], -1), "bonferroni"
    )
    assert np.allclose(ws.detection_pvalues(ids, version), both.numpy())  # memo dropped
    gen = torch.Generator().manual_seed(0)
    perturbed = ws.perturbed_logits(ids, noise, version, generator=gen).pvalues
    x_p = noise(x, torch.Generator().manual_seed(0))
    expect = combine_pvalues(
        torch.stack([torch.from_numpy(feature_perturbed), input_pvalues(det, x_p)], -1),
        "bonferroni",
    )
    assert np.allclose(perturbed, expect.numpy())
    # the same file under records it was not fitted on: not used, and logged
    other = OwnerWorkspace(tmp_path / "other", "audio", data, Pseudonymizer(b"k" * 32))
    (tmp_path / "other").mkdir(exist_ok=True)
    (tmp_path / "other" / INPUT_TEST_FILE).write_bytes(
        (tmp_path / "ws" / INPUT_TEST_FILE).read_bytes()
    )
    with caplog.at_level("WARNING"):
        assert workspace_input_test(other) is None
    assert "fitted on other records" in caplog.text
    # a damaged file: not used, logged; fitting again replaces it
    (tmp_path / "ws" / INPUT_TEST_FILE).write_bytes(b"not a safetensors file" * 4)
    fresh = OwnerWorkspace(tmp_path / "ws", "image", data, Pseudonymizer(b"k" * 32))
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert workspace_input_test(fresh) is None
        assert fresh.detection_pvalues(ids, version) is not None  # the feature p-value alone
    assert f"{INPUT_TEST_FILE} is not used" in caplog.text
    assert fresh.fit_input_test()[0] is True and workspace_input_test(fresh) is not None
