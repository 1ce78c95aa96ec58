"""The owner's records move from the old one-file-per-record layout into SQLite: with
``jacfusion-fed owner migrate-store`` (what it says, a damaged file refused, a second run a
no-op), and automatically when an owner starts on such a workspace (then a requester's resend
of a migrated record is "unchanged" through gRPC)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from helpers_legacy_store import write_legacy_store
from torch import nn
from typer.testing import CliRunner

from jacfusion_fed.cli import app
from jacfusion_fed.clients.serve import serve_owner
from jacfusion_fed.owner import OwnerWorkspace
from jacfusion_fed.owner.input_spec import InputSpec
from jacfusion_fed.owner.model_import import import_model
from jacfusion_fed.privacy.certs import generate_deployment_certs
from jacfusion_fed.privacy.pseudonyms import Pseudonymizer, generate_key, write_key
from jacfusion_fed.requester import Requester
from jacfusion_fed.rpc.tls import TlsFiles
from jacfusion_fed.store.record_store import DB_NAME

PATIENTS = [f"patient {i}" for i in range(30)]


def _legacy_workspace(root: Path, key: Path) -> tuple[OwnerWorkspace, np.ndarray]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    torch.jit.save(torch.jit.script(net), root / "net.pt")
    pz = Pseudonymizer.from_file(key)
    ws = OwnerWorkspace(root / "ws", "ecg", None, pz)
    import_model(ws, root / "net.pt", class_counts=[3, 4], input_spec=InputSpec.create((5,)))
    x = np.random.default_rng(3).random((len(PATIENTS), 5)).astype(np.float32)
    write_legacy_store(
        root / "ws" / "live", pz.fingerprint, dict(zip(pz.many(PATIENTS), x, strict=True))
    )
    return OwnerWorkspace(root / "ws", "ecg", None, pz), x


def test_migrate_store_command(tmp_path: Path) -> None:
    key = write_key(tmp_path / "k.key", generate_key())
    ws, x = _legacy_workspace(tmp_path, key)
    damaged = next((tmp_path / "ws" / "live" / "records").iterdir())
    original = damaged.read_bytes()
    damaged.write_bytes(original[:-3])
    runner = CliRunner()
    args = ["owner", "migrate-store", "--workspace", str(tmp_path / "ws")]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "damaged file, not used" in result.output and damaged.name in result.output
    assert len(list((tmp_path / "ws" / "live" / "records").iterdir())) == len(PATIENTS)
    damaged.write_bytes(original)
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    assert f"migrated {len(PATIENTS)} live record(s), 0 cached logit row(s)" in flat
    assert str(tmp_path / "ws" / "live" / DB_NAME) in flat
    assert (
        sorted(
            p.name for p in (tmp_path / "ws" / "live").iterdir() if not p.name.startswith(DB_NAME)
        )
        == []
    )
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and "nothing to migrate" in result.output
    ids = Pseudonymizer.from_file(key).many(PATIENTS)
    answer = ws.logits(ids)
    assert answer.unknown_ids == [] and answer.logits.shape == (len(PATIENTS), 2)
    got = ws.live.store.get_many(ids)
    np.testing.assert_array_equal(np.stack([got[s] for s in ids]), x)


def test_an_owner_migrates_when_it_starts(tmp_path: Path) -> None:
    key = write_key(tmp_path / "k.key", generate_key())
    ws, x = _legacy_workspace(tmp_path, key)
    certs = generate_deployment_certs(tmp_path / "certs", {"ecg-co": "ecg"}, ["alice"])
    server = serve_owner(ws, TlsFiles.from_dir(certs.owner_dirs["ecg-co"]))
    try:
        assert not (tmp_path / "ws" / "live" / "records").exists()
        with Requester(
            owners={"ecg": server.target}, tls=certs.requester_dirs["alice"], pseudonym_key=key
        ) as req:
            again = req.submit("ecg", PATIENTS, x)
        assert (again.stored, again.unchanged) == (0, len(PATIENTS))
    finally:
        server.stop(0)
