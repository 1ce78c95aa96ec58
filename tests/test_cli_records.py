"""CLI: owner import-model, submit, forget, rekey-map and owner rekey (owner served in-process)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn
from typer.testing import CliRunner

from jacfusion_fed.cli import app
from jacfusion_fed.clients.serve import serve_owner
from jacfusion_fed.owner import OwnerWorkspace
from jacfusion_fed.privacy.certs import generate_deployment_certs
from jacfusion_fed.privacy.pseudonyms import Pseudonymizer, generate_key, write_key
from jacfusion_fed.rpc.tls import TlsFiles

IDS = ["Jane Doe 1970-01-01", "John Roe 1980-02-02"]


def test_import_submit_forget_rekey(tmp_path: Path) -> None:
    runner = CliRunner()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    model = tmp_path / "net.pt"
    torch.jit.save(torch.jit.script(net), model)
    counts = tmp_path / "counts.json"
    counts.write_text("[5, 6, 7]")
    ws_dir = tmp_path / "ws"
    base = ["owner", "import-model", "--workspace", str(ws_dir), "--modality", "ecg"]
    result = runner.invoke(app, [*base, "--model", str(model), "--class-counts", str(counts)])
    assert result.exit_code == 2 and "--input-shape" in result.output
    result = runner.invoke(
        app,
        [
            *base,
            "--model",
            str(model),
            "--class-counts",
            str(counts),
            "--input-shape",
            "6",
            "--value-range",
            "0,1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "head '2'" in result.output and "K=3" in result.output

    certs = generate_deployment_certs(tmp_path / "certs", {"ecg-co": "ecg"}, ["alice"])
    key = write_key(tmp_path / "k.key", generate_key())
    ws = OwnerWorkspace(ws_dir, "ecg", None, Pseudonymizer.from_file(key))
    server = serve_owner(ws, TlsFiles.from_dir(certs.owner_dirs["ecg-co"]))
    try:
        x = np.random.default_rng(0).random((2, 6)).astype(np.float32)
        inputs = tmp_path / "in.npz"
        np.savez(inputs, ids=np.array(IDS), x=x)
        who = ["--tls", str(certs.requester_dirs["alice"]), "--pseudonym-key", str(key)]
        result = runner.invoke(
            app,
            [
                "submit",
                "--owner",
                server.target,
                "--modality",
                "ecg",
                *who,
                "--inputs",
                str(inputs),
            ],
        )
        assert result.exit_code == 0, result.output
        assert "2 new" in result.output
        pz = Pseudonymizer.from_file(key)
        answer = ws.logits(pz.many(IDS))
        with torch.no_grad():
            np.testing.assert_allclose(answer.logits, net(torch.from_numpy(x)).double(), rtol=1e-5)
        result = runner.invoke(app, ["forget", IDS[0], "--owner", server.target, *who])
        assert result.exit_code == 0, result.output
        assert f"ecg ({server.target}): erased 1" in result.output
        assert ws.logits(pz.many(IDS)).unknown_ids == [pz(IDS[0])]
    finally:
        server.stop(0)

    new_key = write_key(tmp_path / "new.key", generate_key())
    (tmp_path / "keep.txt").write_text(IDS[1] + "\n")
    out = tmp_path / "map.json"
    result = runner.invoke(
        app,
        [
            "rekey-map",
            "--old-key",
            str(key),
            "--new-key",
            str(new_key),
            "--ids-file",
            str(tmp_path / "keep.txt"),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text()) == {pz(IDS[1]): Pseudonymizer.from_file(new_key)(IDS[1])}
    result = runner.invoke(
        app,
        [
            "owner",
            "rekey",
            "--workspace",
            str(ws_dir),
            "--modality",
            "ecg",
            "--old-key",
            str(key),
            "--new-key",
            str(new_key),
            "--map",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "1 live record(s) renamed" in result.output
    rekeyed = OwnerWorkspace(ws_dir, "ecg", None, Pseudonymizer.from_file(new_key))
    assert rekeyed.logits([Pseudonymizer.from_file(new_key)(IDS[1])]).unknown_ids == []


def test_labels_file_and_accuracy(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from jacfusion_fed.answer import FusedAnswer
    from jacfusion_fed.federation.scenario import write_eval_labels
    from jacfusion_fed.requester import load_labels

    pz = Pseudonymizer(b"z" * 32)
    test = SimpleNamespace(sample_ids=["a", "b"], labels=np.array([0, 2]))
    path = write_eval_labels(tmp_path / "labels.json", pz, {"test": test})
    labels = load_labels(path)
    assert labels == {pz("a"): 0, pz("b"): 2}
    sent = pz.many(["a", "b", "c"])
    pred = FusedAnswer(
        method="statistical",
        num_classes=3,
        sample_ids=sent,
        probability_data=np.eye(3).astype("<f8").tobytes(),
        predicted_labels=[0, 1, 2],
        modalities=[],
        local_ids=dict(zip(sent, ["a", "b", "c"], strict=True)),
    )
    assert pred.accuracy(labels) == 0.5  # keyed by pseudonym; "c" has no label
    assert pred.accuracy({"c": 2, "b": 1}) == 1.0  # keyed by local id
