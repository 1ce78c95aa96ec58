"""The mutual-TLS transport: handshakes refused before any servicer runs, binding rules,
transport options and limits (who may call what: ``test_rpc_auth.py``).
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from helpers_tls import (
    TIMEOUT,
    Deployment,
    Running,
    get_info,
    make_deployment,
    owner_stub,
    serving_owner,
    start_owner,
    status_of,
)

from jacfusion_fed.rpc.auth import fetch_server_principal
from jacfusion_fed.rpc.jacfusion.v1 import modality_pb2
from jacfusion_fed.rpc.tls import (
    INSECURE,
    TlsFiles,
    TransportOptions,
    create_channel,
    create_server,
)


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    return make_deployment(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def owner(dep: Deployment) -> Iterator[Running]:
    with serving_owner(dep.owners["ecg"]) as running:
        yield running


# -- refused at the TLS handshake -------------------------------------------------------------


@pytest.mark.parametrize("which", ["no_client_cert", "foreign_coordinator", "expired_coordinator"])
def test_handshake_refuses_bad_client_certs(dep: Deployment, owner: Running, which: str) -> None:
    before = len(owner.servicer.calls)
    tls = getattr(dep, which)
    stub = owner_stub(owner.target, tls, client_certificate=(which != "no_client_cert"))
    code, _ = status_of(lambda: get_info(stub))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert len(owner.servicer.calls) == before, "the servicer must never run"


def test_client_refuses_expired_server_cert(dep: Deployment) -> None:
    running = start_owner(dep.expired_owner)
    try:
        code, _ = status_of(lambda: get_info(owner_stub(running.target, dep.coordinator)))
        assert code == grpc.StatusCode.UNAVAILABLE
        assert running.servicer.calls == []
        with pytest.raises(ssl.SSLError):
            fetch_server_principal(running.target, dep.coordinator)
    finally:
        running.server.stop(0)


# -- binding, transport options and limits --------------------------------------------------


def test_binding_rules(dep: Deployment) -> None:
    with pytest.raises(ValueError, match="wildcard"):
        create_server(dep.coordinator, host="0.0.0.0")
    with pytest.raises(ValueError, match="wildcard"):
        create_server(dep.coordinator, host="::")
    with pytest.raises(ValueError, match="loopback"):
        create_server(INSECURE, host="10.1.2.3")
    with pytest.raises(ValueError, match="server_name requires TLS"):
        create_channel("127.0.0.1:1", INSECURE, server_name="x")
    server, port = create_server(dep.coordinator)
    assert port > 0
    with pytest.raises(OSError, match="could not bind"):
        create_server(dep.coordinator, port=port)  # SO_REUSEPORT is off
    server.stop(0)


def test_transport_options_validation() -> None:
    with pytest.raises(ValueError, match="max_receive_message_bytes"):
        TransportOptions(max_receive_message_bytes=0)
    with pytest.raises(ValueError, match="too_many_pings"):
        TransportOptions(keepalive_time_ms=1000, server_min_ping_interval_ms=5000)


def test_message_size_limit(dep: Deployment) -> None:
    running = start_owner(
        dep.owners["ecg"], options=TransportOptions(max_receive_message_bytes=1024)
    )
    try:
        stub = owner_stub(running.target, dep.coordinator)
        big = modality_pb2.GetLogitsRequest(sample_ids=["x" * 64] * 100)
        code, _ = status_of(lambda: stub.GetLogits(big, timeout=TIMEOUT))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        running.server.stop(0)


def test_missing_tls_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"ca\.pem"):
        create_server(TlsFiles.from_dir(tmp_path))
