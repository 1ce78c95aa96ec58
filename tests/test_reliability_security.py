"""Security matrix against real server processes (CLI, mTLS, 127.0.0.1), the cells that
``test_services.py`` / ``test_rpc_auth.py`` / ``test_rpc_tls.py`` / ``test_privacy_*.py`` do
not cover already (the full matrix, with the test of every cell, is in docs/reliability.md):

* no client certificate, against an owner process;
* expired certificates: a requester's against the coordinator, the coordinator's against an
  owner, an owner's server certificate against the coordinator;
* a requester certificate serving logits (the CLI refuses it; a server built around the CLI
  is refused by the coordinator);
* an owner whose certificate names its modality but which serves another one;
* key files written owner-only through the CLI (``certs``, ``deploy key``), even under a
  permissive umask;
* message-size limits set on every server process: a request over 64 MiB is refused with
  RESOURCE_EXHAUSTED and the server keeps serving; batches over the id limit are refused
  with INVALID_ARGUMENT;
* nothing secret (private keys, the HMAC pseudonym key, raw patient ids) in the logs of the
  server processes, run at debug level (gRPC core too) through all of the above.
"""

from __future__ import annotations

import base64
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from helpers_reliability import Deployment
from helpers_services import MODALITIES, OWNER_NAMES, TIMEOUT, rpc_error
from typer.testing import CliRunner

from jacfusion_fed.cli import app
from jacfusion_fed.clients.modality_service import ModalityServicer
from jacfusion_fed.privacy.certs import CertificateAuthority, write_credentials
from jacfusion_fed.privacy.pseudonyms import load_key
from jacfusion_fed.rpc.auth import AuthInterceptor, connect_owner
from jacfusion_fed.rpc.channels import connect_coordinator
from jacfusion_fed.rpc.jacfusion.v1 import (
    fusion_pb2,
    fusion_pb2_grpc,
    modality_pb2,
    modality_pb2_grpc,
)
from jacfusion_fed.rpc.policies import MODALITY_SERVICE_POLICY
from jacfusion_fed.rpc.tls import (
    DEFAULT_MAX_MESSAGE_BYTES,
    TlsFiles,
    TransportOptions,
    create_channel,
    create_server,
)
from jacfusion_fed.server.coordinator import Coordinator
from jacfusion_fed.server.predict_types import CoordinatorConfig, OwnerEndpoint, PredictError


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """Server processes at debug level, gRPC core included (handshakes, TLS, API calls)."""
    env = {"GRPC_VERBOSITY": "debug", "GRPC_TRACE": "api,handshaker,tsi"}
    d = Deployment(tmp_path_factory.mktemp("security"), proxies=False, log_level="debug", env=env)
    try:
        d.start()
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="module")
def ca_extra(dep: Deployment) -> dict[str, TlsFiles]:
    """Expired and misused certificates issued by the deployment's own CA."""
    root = dep.fed.root / "extra-certs"
    ca_dir = dep.fed.certs.ca_dir
    ca = CertificateAuthority.load(ca_dir / "ca.pem", ca_dir / "ca.key")
    out = {}
    for name, issued in {
        "expired_requester": ca.issue("requester", "old-alice", expired=True),
        "expired_coordinator": ca.issue("coordinator", "coordinator", expired=True),
        "expired_owner": ca.issue("owner", "audio-co", modality="audio", expired=True),
    }.items():
        write_credentials(root / name, issued, ca)
        out[name] = TlsFiles.from_dir(root / name)
    return out


def owner_target(dep: Deployment, modality: str = "audio") -> str:
    return f"127.0.0.1:{dep.owner_ports[modality]}"


# --- handshake refusals against real processes --------------------------------------------------


@pytest.mark.e2e
def test_no_client_certificate_against_an_owner_process(dep: Deployment) -> None:
    channel = create_channel(
        owner_target(dep),
        dep.fed.coordinator_tls,
        server_name="audio.owner.jacfusion.internal",
        client_certificate=False,
    )
    stub = modality_pb2_grpc.ModalityServiceStub(channel)
    code, _ = rpc_error(lambda: stub.GetInfo(modality_pb2.GetInfoRequest(), timeout=5))
    assert code == grpc.StatusCode.UNAVAILABLE  # refused in the TLS handshake


@pytest.mark.e2e
def test_expired_requester_certificate_against_the_coordinator(
    dep: Deployment, ca_extra: dict[str, TlsFiles]
) -> None:
    stub = fusion_pb2_grpc.FusionServiceStub(
        connect_coordinator(dep.fed.coordinator, ca_extra["expired_requester"])
    )
    request = fusion_pb2.PredictRequest(sample_ids=dep.fed.ids[:1])
    code, _ = rpc_error(lambda: stub.Predict(request, timeout=5))
    assert code == grpc.StatusCode.UNAVAILABLE


@pytest.mark.e2e
def test_expired_coordinator_certificate_against_an_owner_process(
    dep: Deployment, ca_extra: dict[str, TlsFiles]
) -> None:
    channel = connect_owner(
        owner_target(dep), ca_extra["expired_coordinator"], "audio", verify_now=False
    )
    stub = modality_pb2_grpc.ModalityServiceStub(channel)
    request = modality_pb2.GetLogitsRequest(sample_ids=dep.fed.ids[:1])
    code, _ = rpc_error(lambda: stub.GetLogits(request, timeout=5))
    assert code == grpc.StatusCode.UNAVAILABLE


def _rogue_owner(tls: TlsFiles, workspace: Any, name: str) -> tuple[grpc.Server, str]:
    """A ModalityService built around the CLI's start-up checks."""
    server, port = create_server(tls, interceptors=[AuthInterceptor(MODALITY_SERVICE_POLICY)])
    modality_pb2_grpc.add_ModalityServiceServicer_to_server(
        ModalityServicer(workspace, name), server
    )
    server.start()
    return server, f"127.0.0.1:{port}"


def _coordinator_against(dep: Deployment, modality: str, target: str, tmp: Path) -> Coordinator:
    return Coordinator(
        tmp / "registry",
        [OwnerEndpoint(modality, target)],
        dep.fed.coordinator_tls,
        CoordinatorConfig(registration_timeout_s=3.0),
    )


@pytest.mark.e2e
def test_expired_owner_certificate_is_refused_by_the_coordinator(
    dep: Deployment, ca_extra: dict[str, TlsFiles], tmp_path: Path
) -> None:
    server, target = _rogue_owner(ca_extra["expired_owner"], dep.fed.workspaces["audio"], "x")
    coordinator = _coordinator_against(dep, "audio", target, tmp_path)
    try:
        error = coordinator.sync()["audio"]
        assert error.startswith("UNAVAILABLE") and "expired" in error, error
        with pytest.raises(PredictError) as info:
            coordinator.predict(dep.fed.ids[:2])
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        coordinator.close()
        server.stop(0)


# --- certificates used for the wrong role or modality --------------------------------------------


@pytest.mark.e2e
def test_requester_certificate_cannot_serve_logits(dep: Deployment, tmp_path: Path) -> None:
    fed = dep.fed
    requester_dir = fed.certs.requester_dirs["alice"]
    # The CLI refuses to serve under it ...
    args = [*fed.owner_args("audio"), "--tls", str(requester_dir)]
    proc = fed.procs.start("owner-with-requester-cert", args)
    assert proc.wait(60) == 2
    fed.procs.stop("owner-with-requester-cert")
    assert "expected owner for modality 'audio'" in " ".join(
        fed.procs.log("owner-with-requester-cert").split()
    )
    # ... and a server built around the CLI is refused by the coordinator.
    server, target = _rogue_owner(TlsFiles.from_dir(requester_dir), fed.workspaces["audio"], "x")
    coordinator = _coordinator_against(dep, "audio", target, tmp_path)
    try:
        error = coordinator.sync()["audio"]
        # A requester certificate is for client authentication only: the handshake fails.
        assert error.startswith("UNAVAILABLE") and "certificate" in error, error
        assert coordinator.head("audio") is None
        with pytest.raises(PredictError) as info:
            coordinator.predict(fed.ids[:2])
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        coordinator.close()
        server.stop(0)


@pytest.mark.e2e
def test_owner_serving_a_modality_other_than_its_own(dep: Deployment, tmp_path: Path) -> None:
    """An owner with the audio certificate whose service answers for the image workspace."""
    fed = dep.fed
    server, target = _rogue_owner(fed.owner_tls("audio"), fed.workspaces["image"], "audio-co")
    coordinator = _coordinator_against(dep, "audio", target, tmp_path)
    try:
        error = coordinator.sync()["audio"]
        assert error.startswith("PERMISSION_DENIED")
        assert "serves modality 'image', expected 'audio'" in error
        assert coordinator.head("audio") is None
    finally:
        coordinator.close()
        server.stop(0)


# --- key files ----------------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_cli_writes_keys_owner_only_even_with_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        runner = CliRunner()
        result = runner.invoke(
            app,
            [
                "certs",
                "--out",
                str(tmp_path / "certs"),
                "--owner",
                "a-co=audio",
                "--requester",
                "alice",
            ],
        )
        assert result.exit_code == 0, result.output
        result = runner.invoke(app, ["deploy", "key", "--out", str(tmp_path / "hmac.key")])
        assert result.exit_code == 0, result.output
    finally:
        os.umask(old)
    keys = [
        tmp_path / "hmac.key",
        *(tmp_path / "certs").rglob("*.key"),
        *(tmp_path / "certs").rglob("key.pem"),
    ]
    assert len(keys) >= 5
    for key in keys:
        assert _mode(key) == 0o600, key
    for d in [p for p in (tmp_path / "certs").rglob("*") if p.is_dir()]:
        assert _mode(d) & 0o077 == 0, d


# --- message-size limits ------------------------------------------------------------------------


def _oversized() -> bytes:
    """A syntactically valid request (field 1: repeated string) just over 64 MiB."""
    entry = b"\x0a\x40" + b"a" * 64
    return entry * (DEFAULT_MAX_MESSAGE_BYTES // len(entry) + 2)


@pytest.mark.e2e
def test_message_size_limit_on_every_server_process(dep: Deployment) -> None:
    big = TransportOptions(max_send_message_bytes=2**31 - 1)
    payload = _oversized()
    assert len(payload) > DEFAULT_MAX_MESSAGE_BYTES
    coordinator = connect_coordinator(dep.fed.coordinator, dep.fed.requester, options=big)
    for m in MODALITIES:
        owner = connect_owner(
            owner_target(dep, m), dep.fed.coordinator_tls, m, options=big, verify_now=False
        )
        call = owner.unary_unary("/jacfusion.v1.ModalityService/GetLogits")
        code, details = rpc_error(lambda c=call: c(payload, timeout=60))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (m, details)
        info = modality_pb2_grpc.ModalityServiceStub(owner).GetInfo(
            modality_pb2.GetInfoRequest(), timeout=TIMEOUT
        )
        assert info.modality == m  # still serving
        owner.close()
    call = coordinator.unary_unary("/jacfusion.v1.FusionService/Predict")
    code, details = rpc_error(lambda: call(payload, timeout=60))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    stub = fusion_pb2_grpc.FusionServiceStub(coordinator)
    assert stub.GetModelInfo(fusion_pb2.GetModelInfoRequest(), timeout=TIMEOUT).num_classes
    coordinator.close()


@pytest.mark.e2e
def test_huge_batches_are_refused_precisely(dep: Deployment) -> None:
    ids = [f"{i:064x}" for i in range(65_537)]  # 4.3 MB: under the size limit, over the id limit
    stub = dep.stub()
    code, details = rpc_error(
        lambda: stub.Predict(fusion_pb2.PredictRequest(sample_ids=ids), timeout=30)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "exceeds the limit of 65536 (use PredictStream" in details
    owner = modality_pb2_grpc.ModalityServiceStub(
        connect_owner(owner_target(dep), dep.fed.coordinator_tls, "audio", verify_now=False)
    )
    code, details = rpc_error(
        lambda: owner.GetLogits(modality_pb2.GetLogitsRequest(sample_ids=ids), timeout=30)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "use StreamLogits" in details


# --- secrets in logs (keep last: it reads the logs of everything above) -------------------------


def _private_needles(path: Path) -> list[str]:
    """Strings that only a leak of this private key can produce: the private scalar (hex,
    base64) and, for PKCS#8 PEM, the two base64 lines that carry it (the last line encodes
    the public key, which certificates -- printed by gRPC's TLS trace -- contain too)."""
    from cryptography.hazmat.primitives import serialization

    data = path.read_bytes()
    if b"OPENSSH PRIVATE KEY" in data:
        key: Any = serialization.load_ssh_private_key(data, password=None)
        needles = []
    else:
        key = serialization.load_pem_private_key(data, password=None)
        body = [ln for ln in data.decode().splitlines() if ln and not ln.startswith("-----")]
        needles = body[:2]
    value = key.private_numbers().private_value
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return [*needles, raw.hex(), raw.hex().upper(), base64.b64encode(raw).decode()]


def _secrets(dep: Deployment) -> dict[str, list[str]]:
    fed = dep.fed
    out: dict[str, list[str]] = {"private keys": ["PRIVATE KEY"], "pseudonym key": []}
    for key in [*fed.certs.root.rglob("*.key"), *fed.certs.root.rglob("key.pem")]:
        out["private keys"] += _private_needles(key)
    key_bytes = load_key(fed.key)
    hex_key = key_bytes.hex()
    out["pseudonym key"] += [hex_key, hex_key.upper(), base64.b64encode(key_bytes).decode()]
    out["raw patient ids"] = ["patient-"]
    return out


@pytest.mark.e2e
def test_no_secret_in_server_logs(dep: Deployment) -> None:
    fed = dep.fed
    # Exercise error paths that log: bad bytes, unknown ids, refused callers, a bad owner.
    stub = dep.stub()
    rpc_error(lambda: stub.Predict(fusion_pb2.PredictRequest(sample_ids=["nope"]), timeout=5))
    raw = connect_coordinator(fed.coordinator, fed.requester).unary_unary(
        "/jacfusion.v1.FusionService/Predict"
    )
    rpc_error(lambda: raw(b"\xff\x00garbage", timeout=5))
    owner_stub = fusion_pb2_grpc.FusionServiceStub(
        connect_coordinator(fed.coordinator, fed.owner_tls("image"))
    )
    rpc_error(lambda: owner_stub.Predict(fusion_pb2.PredictRequest(sample_ids=["x"]), timeout=5))
    stub.Predict(fusion_pb2.PredictRequest(sample_ids=fed.ids[:5]), timeout=TIMEOUT)
    logs = {
        name: fed.procs.log(name) for name in ("coordinator", *(f"owner-{m}" for m in MODALITIES))
    }
    assert all(len(t) > 10_000 for t in logs.values()), "expected debug logs to check"
    for name, text in logs.items():
        for kind, needles in _secrets(dep).items():
            for needle in needles:
                assert needle not in text, f"{kind} found in the log of {name}"
    # The owners' certificate names are public; make sure the check would see a leak.
    assert OWNER_NAMES["audio"] in logs["owner-audio"]


@pytest.mark.e2e
def test_log_check_would_catch_a_leak(dep: Deployment) -> None:
    """The needles are right: each secret really is in its file (guards the test above)."""
    secrets = _secrets(dep)
    key_text = dep.fed.key.read_text()
    assert any(n in key_text for n in secrets["pseudonym key"])
    pem = (dep.fed.certs.coordinator_dir / "key.pem").read_text()
    assert sum(n in pem for n in secrets["private keys"]) >= 3
    ssh = next(dep.fed.certs.root.rglob("supernode_auth.key"))
    assert len(_private_needles(ssh)) == 3
