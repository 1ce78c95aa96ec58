"""Robust fusion end to end over mTLS (issue 11): two owners with a clean validation split
publish their calibration next to their head, the coordinator keeps it in the head registry,
and ``FusionService.Predict`` with method robust answers what
:func:`jacfusion_fed.fusion.robust_fusion` says on the same logits, calibrations and prior:
probabilities, each modality's reliability, the prediction set and the abstain flag, through
the Python client (:class:`Requester`) and ``jacfusion-fed predict --method robust``.

In-process servers (one process), so this is a fast test: about 15 s on 2 shared cores.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from jacfusion_fed.clients.serve import OwnerServer, serve_owner
from jacfusion_fed.fusion import RobustFusion, log_prior_from_counts, robust_fusion
from jacfusion_fed.owner import OwnerWorkspace
from jacfusion_fed.owner.calibration import workspace_calibration
from jacfusion_fed.privacy.certs import DeploymentCerts, generate_deployment_certs
from jacfusion_fed.privacy.pseudonyms import Pseudonymizer, write_key
from jacfusion_fed.requester import Requester
from jacfusion_fed.rpc.tls import TlsFiles
from jacfusion_fed.server.coordinator import Coordinator
from jacfusion_fed.server.predict_types import OwnerEndpoint
from jacfusion_fed.server.serve import CoordinatorServer, serve_coordinator

K = 3
KEY = b"r" * 32
OWNERS = {"image": "img-co", "audio": "aud-co"}
SIZES = {"train": 150, "val": 90, "test": 24}


def _write_data(root: Path) -> dict[str, Path]:
    """Per modality an npz with train/val/test splits: class-dependent Gaussian features
    (the audio ones noisier), one set of local patient ids shared by both owners."""
    rng = np.random.default_rng(11)
    labels = {s: np.arange(n) % K for s, n in SIZES.items()}
    out = {}
    for j, (modality, noise) in enumerate((("image", 0.8), ("audio", 1.6))):
        centers = rng.normal(scale=2.0, size=(K, 6))
        arrays: dict[str, np.ndarray] = {}
        for split, y in labels.items():
            arrays[f"x_{split}"] = (centers[y] + rng.normal(scale=noise, size=(len(y), 6))).astype(
                np.float32
            )
            arrays[f"y_{split}"] = y.astype(np.int64)
            arrays[f"ids_{split}"] = np.array([f"{split} patient {i}" for i in range(len(y))])
        out[modality] = root / f"data-{j}.npz"
        np.savez(out[modality], **arrays)  # type: ignore[arg-type]
    return out


@dataclass
class Deployment:
    certs: DeploymentCerts
    workspaces: dict[str, OwnerWorkspace]
    owners: dict[str, OwnerServer]
    coordinator: CoordinatorServer
    key: Path

    def requester(self) -> Requester:
        return Requester(
            self.coordinator.target,
            tls=TlsFiles.from_dir(self.certs.requester_dirs["alice"]),
            pseudonym_key=KEY,
        )

    def reference(self, local_ids: list[str]) -> RobustFusion:
        pz = Pseudonymizer(KEY)
        logits = [ws.logits(pz.many(local_ids)).logits for ws in self.workspaces.values()]
        cals = [workspace_calibration(ws) for ws in self.workspaces.values()]
        assert all(c is not None for c in cals)
        counts = np.sum([ws.class_counts() for ws in self.workspaces.values()], axis=0)
        return robust_fusion(logits, cals, log_prior_from_counts(counts))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("robust")
    certs = generate_deployment_certs(root / "certs", {v: k for k, v in OWNERS.items()}, ["alice"])
    data = _write_data(root)
    workspaces = {
        m: OwnerWorkspace(root / f"ws-{m}", m, f"npz:{data[m]}", Pseudonymizer(KEY)) for m in OWNERS
    }
    owners = {}
    for m, ws in workspaces.items():
        ws.train(epochs=3, seed=0)
        owners[m] = serve_owner(ws, TlsFiles.from_dir(certs.owner_dirs[OWNERS[m]]))
    coordinator = Coordinator(
        root / "registry",
        [OwnerEndpoint(m, s.target) for m, s in owners.items()],
        TlsFiles.from_dir(certs.coordinator_dir),
    )
    served = serve_coordinator(coordinator, TlsFiles.from_dir(certs.coordinator_dir))
    assert coordinator.sync() == {m: "" for m in OWNERS}
    dep = Deployment(certs, workspaces, owners, served, write_key(root / "k.key", KEY))
    yield dep
    served.stop(0)
    for server in owners.values():
        server.stop(0)


def _test_ids(n: int = SIZES["test"]) -> list[str]:
    return [f"test patient {i}" for i in range(n)]


def test_registry_keeps_each_owners_calibration(dep: Deployment) -> None:
    from jacfusion_fed.store import HeadRegistry

    registry = HeadRegistry(dep.coordinator.coordinator.registry.root)
    for m, ws in dep.workspaces.items():
        cal = workspace_calibration(ws)
        assert cal is not None
        kept = registry.get(m).calibration
        assert kept is not None
        for name, values in cal.to_arrays().items():
            np.testing.assert_array_equal(kept[name], values)


def test_client_predict_robust_is_robust_fusion(dep: Deployment) -> None:
    ids = _test_ids()
    want = dep.reference(ids)
    with dep.requester() as client:
        got = client.predict(ids, method="robust")
    assert got.method == "robust" and got.ids == ids
    assert float(want.reliability.std()) > 0.01  # a non-trivial case: modalities differ
    np.testing.assert_allclose(got.probabilities, want.p.numpy(), rtol=0, atol=1e-12)
    assert got.prediction_sets is not None and got.abstain is not None
    np.testing.assert_array_equal(got.prediction_sets, want.prediction_set.numpy())
    np.testing.assert_array_equal(got.abstain, want.abstain.numpy())
    assert got.robust is not None
    for i in range(len(got.ids)):
        per_modality = got.reliability(i)
        assert list(per_modality) == list(OWNERS)
        np.testing.assert_allclose(
            list(per_modality.values()), want.reliability[i].numpy(), rtol=0, atol=1e-12
        )
    # every answer's label is in its set unless the sample abstains
    for i, label in enumerate(got.labels):
        assert got.prediction_sets[i, label] or got.abstain[i]


def test_other_methods_carry_no_robust_fields(dep: Deployment) -> None:
    with dep.requester() as client:
        got = client.predict(_test_ids(4), method="statistical")
    assert got.robust is None and got.prediction_sets is None and got.abstain is None
    assert all(c.reliability is None for c in got.modalities)


def test_cli_predict_method_robust(dep: Deployment) -> None:
    from typer.testing import CliRunner

    from jacfusion_fed.cli import app

    ids = _test_ids(5)
    want = dep.reference(ids)
    base = [
        "predict",
        *ids,
        "--coordinator",
        dep.coordinator.target,
        "--tls",
        str(dep.certs.requester_dirs["alice"]),
        "--pseudonym-key",
        str(dep.key),
        "--method",
        "robust",
    ]
    result = CliRunner().invoke(app, [*base, "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["method"] == "robust"
    for i, sample in enumerate(payload["samples"]):
        assert sample["local_id"] == ids[i]
        assert sample["abstain"] == bool(want.abstain[i])
        assert sample["prediction_set"] == [
            str(k) for k in np.flatnonzero(want.prediction_set[i].numpy())
        ]
        np.testing.assert_allclose(
            [sample["reliability"][m] for m in OWNERS], want.reliability[i].numpy(), atol=1e-12
        )
    table = CliRunner().invoke(app, base)
    assert table.exit_code == 0, table.output
    assert "robust fusion" in table.output and "abstain" in table.output
    assert ids[0] in table.output


def test_robust_needs_two_modalities(dep: Deployment) -> None:
    """Robust fusion judges each modality against the others: one modality alone is refused
    with a clear FAILED_PRECONDITION (never answered without that check)."""
    with dep.requester() as client, pytest.raises(grpc.RpcError) as caught:
        client.predict(_test_ids(2), method="robust", modalities=["audio"])
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "at least two modalities" in (caught.value.details() or "")
