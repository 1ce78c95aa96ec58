"""The audit interceptor on a real owner server (in-process, mTLS): what a call records, the
trace id, calls refused by authorisation, and a full disk answering UNAVAILABLE instead of
serving unrecorded; the owner's CLI commands (import-model, rekey) writing to the log."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from jacfusion_fed.audit import AuditLog, Signer, load_cert, verify
from jacfusion_fed.cli import app
from jacfusion_fed.clients.serve import OwnerServer, serve_owner
from jacfusion_fed.owner import OwnerWorkspace
from jacfusion_fed.privacy.cert_names import owner_server_name
from jacfusion_fed.privacy.certs import DeploymentCerts, generate_deployment_certs
from jacfusion_fed.privacy.pseudonyms import Pseudonymizer, generate_key, write_key
from jacfusion_fed.rpc.jacfusion.v1 import modality_pb2, modality_pb2_grpc
from jacfusion_fed.rpc.tensor import encode_tensor
from jacfusion_fed.rpc.tls import TlsFiles, create_channel

SERVICE = {"role": "owner", "name": "ecg-co", "modality": "ecg"}
IDS = ["Jane Doe 1970-01-01", "John Roe 1980-02-02"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, DeploymentCerts]]:
    root = tmp_path_factory.mktemp("audit-owner")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    torch.jit.save(torch.jit.script(net), root / "net.pt")
    (root / "counts.json").write_text("[5, 6, 7]")
    certs = generate_deployment_certs(root / "certs", {"ecg-co": "ecg"}, ["alice"])
    write_key(root / "k.key", generate_key())
    yield root, certs


def _import(root: Path, ws: Path, *extra: str) -> None:
    args = ["owner", "import-model", "--workspace", str(ws), "--modality", "ecg"]
    args += ["--model", str(root / "net.pt"), "--class-counts", str(root / "counts.json")]
    result = CliRunner().invoke(app, [*args, "--input-shape", "6", *extra])
    assert result.exit_code == 0, result.output


def _serve(root: Path, certs: DeploymentCerts, ws: Path, audit: AuditLog) -> OwnerServer:
    workspace = OwnerWorkspace(ws, "ecg", None, Pseudonymizer.from_file(root / "k.key"))
    return serve_owner(workspace, TlsFiles.from_dir(certs.owner_dirs["ecg-co"]), audit=audit)


def _stub(target: str, tls_dir: Path) -> modality_pb2_grpc.ModalityServiceStub:
    channel = create_channel(
        target, TlsFiles.from_dir(tls_dir), server_name=owner_server_name("ecg")
    )
    return modality_pb2_grpc.ModalityServiceStub(channel)


def test_calls_are_recorded(tmp_path: Path, setup: tuple[Path, DeploymentCerts]) -> None:
    root, certs = setup
    ws, path = tmp_path / "ws", tmp_path / "audit.jsonl"
    owner_dir = certs.owner_dirs["ecg-co"]
    _import(root, ws, "--audit-log", str(path), "--tls", str(owner_dir))
    signer = Signer.from_files(owner_dir / "cert.pem", owner_dir / "key.pem")
    server = _serve(root, certs, ws, AuditLog(path, service=SERVICE, signer=signer).start())
    pz = Pseudonymizer.from_file(root / "k.key")
    ids = pz.many(IDS)
    try:
        requester = _stub(server.target, certs.requester_dirs["alice"])
        x = np.random.default_rng(0).random((2, 6)).astype(np.float32)
        requester.PutRecords(
            modality_pb2.PutRecordsRequest(sample_ids=ids, inputs=encode_tensor(x)), timeout=10
        )
        coordinator = _stub(server.target, certs.coordinator_dir)
        trace = "4bf92f3577b34da6a3ce929d0e0e4736"
        coordinator.GetLogits(
            modality_pb2.GetLogitsRequest(sample_ids=ids),
            metadata=[("traceparent", f"00-{trace}-00f067aa0ba902b7-01")],
            timeout=10,
        )
        with pytest.raises(grpc.RpcError) as denied:  # a requester may not read logits
            requester.GetLogits(modality_pb2.GetLogitsRequest(sample_ids=ids), timeout=10)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as bad:  # a raw id: refused, recorded without it
            coordinator.GetLogits(modality_pb2.GetLogitsRequest(sample_ids=[IDS[0]]), timeout=10)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        list(coordinator.StreamLogits(modality_pb2.StreamLogitsRequest(sample_ids=ids), timeout=10))
    finally:
        server.stop(0)
    assert verify(path, cert=load_cert(owner_dir)).ok
    text = path.read_text()
    assert all(raw not in text for raw in IDS)
    entries = [json.loads(x) for x in text.splitlines() if '"kind":"access"' in x]
    assert [e["event"] for e in entries] == [
        "ImportModel",
        "PutRecords",
        "GetLogits",
        "GetLogits",
        "StreamLogits",
    ]
    imported, put, logits, refused, stream = entries
    assert imported["peer"]["role"] == "operator" and imported["status"] == "OK"
    assert put["peer"]["cn"] == "alice" and put["pseudonyms"] == ids
    assert put["detail"] == {"stored": 2, "replaced": 0, "unchanged": 0}
    assert logits["trace_id"] == trace and logits["peer"]["role"] == "coordinator"
    assert logits["model_versions"] == {"ecg": imported["model_versions"]["ecg"]}
    assert logits["peer"]["fingerprint"].startswith("sha256:")
    assert refused["status"] == "INVALID_ARGUMENT" and refused["pseudonyms"] == []
    assert refused["n_not_pseudonym"] == 1
    assert stream["status"] == "OK" and stream["n_ids"] == 2


def test_full_disk_answers_unavailable(tmp_path: Path, setup: tuple[Path, DeploymentCerts]) -> None:
    """The log sits on a device whose every write fails with ENOSPC (/dev/full): the call is
    refused with UNAVAILABLE and no logits leave the owner; the owner keeps running."""
    root, certs = setup
    ws = tmp_path / "ws"
    _import(root, ws)
    server = _serve(root, certs, ws, AuditLog(Path("/dev/full"), service=SERVICE, reserve_bytes=0))
    ids = Pseudonymizer.from_file(root / "k.key").many(IDS)
    try:
        requester = _stub(server.target, certs.requester_dirs["alice"])
        x = np.random.default_rng(0).random((2, 6)).astype(np.float32)
        request = modality_pb2.PutRecordsRequest(sample_ids=ids, inputs=encode_tensor(x))
        with pytest.raises(grpc.RpcError) as put:
            requester.PutRecords(request, timeout=10)
        assert put.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "audit log" in (put.value.details() or "")
        coordinator = _stub(server.target, certs.coordinator_dir)
        for call in (
            lambda: coordinator.GetLogits(modality_pb2.GetLogitsRequest(sample_ids=ids)),
            lambda: list(
                coordinator.StreamLogits(modality_pb2.StreamLogitsRequest(sample_ids=ids))
            ),
        ):
            with pytest.raises(grpc.RpcError) as refused:
                call()
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(0)


def test_nearly_full_disk_refuses_before_any_change(
    tmp_path: Path, setup: tuple[Path, DeploymentCerts]
) -> None:
    """Below the free-space reserve a call is refused before the servicer runs: PutRecords
    stores nothing (a real full disk shows in statvfs; /dev/full above does not)."""
    root, certs = setup
    ws = tmp_path / "ws"
    _import(root, ws)
    audit = AuditLog(tmp_path / "audit.jsonl", service=SERVICE, reserve_bytes=1 << 62)
    server = _serve(root, certs, ws, audit)
    pz = Pseudonymizer.from_file(root / "k.key")
    ids = pz.many(IDS)
    try:
        requester = _stub(server.target, certs.requester_dirs["alice"])
        x = np.random.default_rng(0).random((2, 6)).astype(np.float32)
        with pytest.raises(grpc.RpcError) as put:
            requester.PutRecords(
                modality_pb2.PutRecordsRequest(sample_ids=ids, inputs=encode_tensor(x)), timeout=10
            )
        assert put.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "bytes free" in (put.value.details() or "")
        assert server.servicer.workspace.logits(ids).unknown_ids == ids  # nothing stored
    finally:
        server.stop(0)


def test_rekey_is_recorded(tmp_path: Path, setup: tuple[Path, DeploymentCerts]) -> None:
    root, _ = setup
    ws, path = tmp_path / "ws", tmp_path / "audit.jsonl"
    _import(root, ws)
    new_key = write_key(tmp_path / "new.key", generate_key())
    args = ["owner", "rekey", "--workspace", str(ws), "--modality", "ecg"]
    args += ["--old-key", str(root / "k.key"), "--new-key", str(new_key)]
    result = CliRunner().invoke(app, [*args, "--audit-log", str(path)])
    assert result.exit_code == 0, result.output
    assert verify(path).ok
    entry = json.loads(path.read_text().splitlines()[0])
    assert entry["event"] == "Rekey" and entry["peer"]["role"] == "operator"
    assert (
        entry["detail"]["renamed"] == 0 and entry["detail"]["new_key"] != entry["detail"]["old_key"]
    )
    result = CliRunner().invoke(app, [*args, "--audit-log", str(path)])  # old key refused now
    assert result.exit_code == 2
    failed = json.loads(path.read_text().splitlines()[2])
    assert failed["event"] == "Rekey" and failed["status"] == "FAILED"
    assert verify(path).ok
