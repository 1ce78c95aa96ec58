"""Two real audio sites and an image owner, in-process servers with mTLS on 127.0.0.1: each
patient's audio logits come from the site that holds its record, and stopping one site
removes only its patients, named in the answer.

The sites share one model (the state after FedAvg: one trained store, copied), each with its
own records and its own certificate for the modality.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from jacfusion_fed.bench.deployment import ServeBenchConfig, make_dataset
from jacfusion_fed.clients.serve import OwnerServer, serve_owner
from jacfusion_fed.fusion import mean_fusion
from jacfusion_fed.owner import OwnerWorkspace
from jacfusion_fed.privacy.certs import generate_deployment_certs
from jacfusion_fed.privacy.pseudonyms import Pseudonymizer, generate_key
from jacfusion_fed.rpc.fusion_codec import PredictOptions
from jacfusion_fed.rpc.tls import TlsFiles
from jacfusion_fed.server.coordinator import Coordinator
from jacfusion_fed.server.predict_types import CoordinatorConfig, OwnerEndpoint

SITES = {"north": "audio-north", "south": "audio-south"}


@dataclass
class Deployment:
    workspaces: dict[str, OwnerWorkspace]  # north, south, image
    servers: dict[str, OwnerServer]
    coordinator: Coordinator
    ids: dict[str, list[str]]  # site -> pseudonyms of the patients whose audio it holds


def _split(path: Path, keep: int, out: Path) -> None:
    """The records of every other patient (``keep`` 0 or 1) of an npz data source."""
    data = dict(np.load(path))
    for split in ("train", "test"):
        rows = np.arange(len(data[f"ids_{split}"])) % 2 == keep
        for what in ("x", "y", "ids"):
            data[f"{what}_{split}"] = data[f"{what}_{split}"][rows]
    np.savez(out, **data)


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("sites")
    certs = generate_deployment_certs(
        root / "certs", {"audio-north": "audio", "audio-south": "audio", "image-co": "image"}, []
    )
    data = make_dataset(root, ServeBenchConfig(samples=80, classes=3, features=8))
    pz = Pseudonymizer(generate_key())
    for j, site in enumerate(SITES):
        _split(data["audio"], j, root / f"audio-{site}.npz")
    north = OwnerWorkspace(root / "ws-north", "audio", f"npz:{root / 'audio-north.npz'}", pz)
    north.train(epochs=1, seed=0)
    shutil.copytree(root / "ws-north", root / "ws-south")  # one model after FedAvg
    workspaces = {
        "north": north,
        "south": OwnerWorkspace(root / "ws-south", "audio", f"npz:{root / 'audio-south.npz'}", pz),
        "image": OwnerWorkspace(root / "ws-image", "image", f"npz:{data['image']}", pz),
    }
    workspaces["image"].train(epochs=1, seed=0)
    names = {**SITES, "image": "image-co"}
    servers = {
        s: serve_owner(ws, TlsFiles.from_dir(certs.owner_dirs[names[s]]))
        for s, ws in workspaces.items()
    }
    coordinator = Coordinator(
        root / "registry",
        [OwnerEndpoint(ws.modality, servers[s].target) for s, ws in workspaces.items()],
        TlsFiles.from_dir(certs.coordinator_dir),
        CoordinatorConfig(device="cpu", owner_timeout_s=2.0),
    )
    ids = {s: pz.many(sorted(workspaces[s].records["test"].sample_ids)) for s in SITES}
    yield Deployment(workspaces, servers, coordinator, ids)
    coordinator.close()
    for server in servers.values():
        server.stop(0)


def test_each_patient_from_its_own_site(dep: Deployment) -> None:
    assert dep.coordinator.sync() == {"audio": "", "image": ""}
    head = dep.coordinator.head("audio")
    assert head is not None and head.record.owner == "audio-north+audio-south"
    ids = dep.ids["north"] + dep.ids["south"]
    got = dep.coordinator.predict(ids, PredictOptions(method="mean"))
    assert got.sample_ids == ids
    audio = np.concatenate([dep.workspaces[s].logits(dep.ids[s]).logits for s in SITES])
    image = dep.workspaces["image"].logits(ids).logits
    want = mean_fusion([audio, image]).numpy()
    np.testing.assert_allclose(got.probabilities, want, rtol=1e-9, atol=1e-12)
    contribution = got.modalities[0]
    assert [(s.target, s.samples, s.error) for s in contribution.sites] == [
        (dep.servers[s].target, len(dep.ids[s]), "") for s in SITES
    ]


def test_a_stopped_site_removes_only_its_patients(dep: Deployment) -> None:
    dep.servers["south"].stop(0)
    ids = dep.ids["north"] + dep.ids["south"]
    got = dep.coordinator.predict(ids, PredictOptions(method="mean"))
    assert got.sample_ids == ids  # image holds every patient: all are predicted
    north = np.arange(len(ids)) < len(dep.ids["north"])
    audio = got.modalities[0]
    np.testing.assert_array_equal(audio.used, north)
    assert audio.error == ""
    north_site, south_site = audio.sites
    assert north_site.error == "" and north_site.samples == len(dep.ids["north"])
    assert south_site.target == dep.servers["south"].target
    assert south_site.error.startswith("UNAVAILABLE: ") and south_site.samples == 0
    # The north site's patients are fused from both modalities, the south's from image alone.
    image = dep.workspaces["image"].logits(ids).logits
    audio_north = dep.workspaces["north"].logits(dep.ids["north"]).logits
    np.testing.assert_allclose(
        got.probabilities[north], mean_fusion([audio_north, image[north]]).numpy(), atol=1e-12
    )
    np.testing.assert_allclose(
        got.probabilities[~north], mean_fusion([image[~north]]).numpy(), atol=1e-12
    )
