"""Real gRPC servers on 127.0.0.1 with mutual TLS: who gets in, and with which status code
(authorisation by :mod:`jacfusion_fed.rpc.auth`; the transport itself: ``test_rpc_tls.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from helpers_tls import (
    TIMEOUT,
    Deployment,
    FakeFusion,
    FakeOwner,
    Running,
    get_info,
    make_deployment,
    owner_stub,
    serving_fusion,
    serving_owner,
    start_owner,
    status_of,
)

from jacfusion_fed.privacy.certs import CertificateAuthority, owner_server_name
from jacfusion_fed.rpc.auth import (
    AuthInterceptor,
    RpcPolicy,
    check_own_certificate,
    connect_owner,
    fetch_server_principal,
    require_roles,
)
from jacfusion_fed.rpc.identity import AuthError, Principal
from jacfusion_fed.rpc.jacfusion.v1 import (
    fusion_pb2,
    fusion_pb2_grpc,
    modality_pb2,
    modality_pb2_grpc,
)
from jacfusion_fed.rpc.matrix import decode_matrix
from jacfusion_fed.rpc.policies import MODALITY_SERVICE_POLICY
from jacfusion_fed.rpc.tls import INSECURE, create_channel, create_server


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    return make_deployment(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def owner(dep: Deployment) -> Iterator[Running]:
    with serving_owner(dep.owners["ecg"]) as running:
        yield running


@pytest.fixture(scope="module")
def fusion(dep: Deployment) -> Iterator[Running]:
    with serving_fusion(dep.coordinator) as running:
        yield running


# -- accepted ---------------------------------------------------------------------------------


def test_coordinator_reaches_owner(dep: Deployment, owner: Running) -> None:
    stub = owner_stub(owner.target, dep.coordinator, server_name=owner_server_name("ecg"))
    assert get_info(stub).modality == "ecg"
    assert owner.servicer.calls[-1] == Principal("coordinator", "coordinator")

    head = stub.GetHead(modality_pb2.GetHeadRequest(), timeout=TIMEOUT)
    assert head.WhichOneof("head") == "gram"
    np.testing.assert_array_equal(decode_matrix(head.gram.gram, shape=(4, 4)), np.eye(4))
    code, _ = status_of(
        lambda: stub.GetHead(
            modality_pb2.GetHeadRequest(kind=modality_pb2.HEAD_KIND_FULL), timeout=TIMEOUT
        )
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED

    resp = stub.GetLogits(
        modality_pb2.GetLogitsRequest(sample_ids=["id2", "nope", "id0"]), timeout=TIMEOUT
    )
    assert list(resp.batch.sample_ids) == ["id2", "id0"]
    assert list(resp.batch.unknown_sample_ids) == ["nope"]
    np.testing.assert_array_equal(
        decode_matrix(resp.batch.logits), np.stack([np.arange(4.0) + 2, np.arange(4.0)])
    )
    chunks = list(
        stub.StreamLogits(
            modality_pb2.StreamLogitsRequest(sample_ids=["id0", "id1", "id2"], chunk_size=2),
            timeout=TIMEOUT,
        )
    )
    assert [list(c.batch.sample_ids) for c in chunks] == [["id0", "id1"], ["id2"]]

    code, _ = status_of(
        lambda: stub.GetLogits(
            modality_pb2.GetLogitsRequest(sample_ids=["id0"], expected_model_version="ffff"),
            timeout=TIMEOUT,
        )
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION


def test_connect_owner_pins_the_modality(dep: Deployment, owner: Running) -> None:
    assert fetch_server_principal(owner.target, dep.coordinator) == Principal(
        "owner", "cardiology", "ecg"
    )
    channel = connect_owner(owner.target, dep.coordinator, "ecg")
    assert get_info(modality_pb2_grpc.ModalityServiceStub(channel)).modality == "ecg"
    with pytest.raises(AuthError) as info:
        connect_owner(owner.target, dep.coordinator, "x_ray")
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "expected the owner of modality 'x_ray'" in info.value.details
    assert "owner 'cardiology' (modality 'ecg')" in info.value.details
    # Without the early check, gRPC's own handshake still refuses the wrong server.
    channel = connect_owner(owner.target, dep.coordinator, "x_ray", verify_now=False)
    code, _ = status_of(lambda: get_info(modality_pb2_grpc.ModalityServiceStub(channel)))
    assert code == grpc.StatusCode.UNAVAILABLE


def test_requester_predicts(dep: Deployment, fusion: Running) -> None:
    stub = fusion_pb2_grpc.FusionServiceStub(create_channel(fusion.target, dep.requester))
    resp = stub.Predict(fusion_pb2.PredictRequest(sample_ids=["a", "b"]), timeout=TIMEOUT)
    assert list(resp.predictions.sample_ids) == ["a", "b"]
    chunks = list(
        stub.PredictStream(fusion_pb2.PredictStreamRequest(sample_ids=["a", "b"]), timeout=5)
    )
    assert len(chunks) == 2
    info = stub.GetModelInfo(fusion_pb2.GetModelInfoRequest(), timeout=TIMEOUT)
    assert info.num_classes == 2


# -- authenticated but not allowed: PERMISSION_DENIED ------------------------------------------


def test_requester_may_not_call_owner(dep: Deployment, owner: Running) -> None:
    code, details = status_of(lambda: get_info(owner_stub(owner.target, dep.requester)))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "requester 'alice'" in details
    assert "/jacfusion.v1.ModalityService/GetInfo" in details
    assert "allowed roles: coordinator" in details


def test_owner_may_not_call_another_owner(dep: Deployment, owner: Running) -> None:
    stub = owner_stub(owner.target, dep.owners["x_ray"])
    code, details = status_of(
        lambda: list(
            stub.StreamLogits(modality_pb2.StreamLogitsRequest(sample_ids=["id0"]), timeout=5)
        )
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "owner 'radiology' (modality 'x_ray')" in details


@pytest.mark.parametrize("who", ["coordinator", "owner"])
def test_only_requesters_predict(dep: Deployment, fusion: Running, who: str) -> None:
    tls = dep.coordinator if who == "coordinator" else dep.owners["ecg"]
    stub = fusion_pb2_grpc.FusionServiceStub(create_channel(fusion.target, tls))
    before = fusion.servicer.calls
    code, details = status_of(
        lambda: stub.Predict(fusion_pb2.PredictRequest(sample_ids=["a"]), timeout=TIMEOUT)
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "/jacfusion.v1.FusionService/Predict" in details and "requester" in details
    code, _ = status_of(
        lambda: list(
            stub.PredictStream(fusion_pb2.PredictStreamRequest(sample_ids=["a"]), timeout=5)
        )
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert fusion.servicer.calls == before


def test_owner_may_not_read_modelget_info(dep: Deployment, fusion: Running) -> None:
    stub = fusion_pb2_grpc.FusionServiceStub(create_channel(fusion.target, dep.owners["ecg"]))
    code, _ = status_of(lambda: stub.GetModelInfo(fusion_pb2.GetModelInfoRequest(), timeout=5))
    assert code == grpc.StatusCode.PERMISSION_DENIED


def test_policy_fails_closed(dep: Deployment) -> None:
    policy = RpcPolicy.of({"/jacfusion.v1.FusionService/Predict": {"requester"}})
    server, port = create_server(dep.coordinator, interceptors=[AuthInterceptor(policy)])
    fusion_pb2_grpc.add_FusionServiceServicer_to_server(FakeFusion(), server)
    server.start()
    try:
        stub = fusion_pb2_grpc.FusionServiceStub(create_channel(f"127.0.0.1:{port}", dep.requester))
        code, details = status_of(
            lambda: stub.GetModelInfo(fusion_pb2.GetModelInfoRequest(), timeout=TIMEOUT)
        )
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert "not open to any caller" in details
    finally:
        server.stop(0)


# -- no usable identity: UNAUTHENTICATED -------------------------------------------------------


def test_tls_without_client_auth_is_unauthenticated(dep: Deployment) -> None:
    running = start_owner(dep.owners["ecg"], require_client_auth=False)
    try:
        stub = owner_stub(running.target, dep.coordinator, client_certificate=False)
        code, details = status_of(lambda: get_info(stub))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert "no client certificate presented" in details
        assert "/jacfusion.v1.ModalityService/GetInfo" in details
    finally:
        running.server.stop(0)


def test_certificate_without_role_is_unauthenticated(dep: Deployment, owner: Running) -> None:
    code, details = status_of(lambda: get_info(owner_stub(owner.target, dep.no_role)))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "CN='mallory'" in details and "jacfusion:// SAN URI" in details


def test_reverification_against_another_ca(dep: Deployment) -> None:
    other = CertificateAuthority.create("other CA")
    interceptor = AuthInterceptor(MODALITY_SERVICE_POLICY, ca_certificate=other.certificate)
    running = start_owner(dep.owners["ecg"], interceptors=[interceptor])
    try:
        code, details = status_of(lambda: get_info(owner_stub(running.target, dep.coordinator)))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert "failed verification" in details
    finally:
        running.server.stop(0)
    interceptor = AuthInterceptor(MODALITY_SERVICE_POLICY, ca_certificate=dep.ca.cert_pem)
    running = start_owner(dep.owners["ecg"], interceptors=[interceptor])
    try:
        assert get_info(owner_stub(running.target, dep.coordinator)).modality == "ecg"
    finally:
        running.server.stop(0)


def test_insecure_mode_is_explicit(dep: Deployment) -> None:
    running = start_owner(INSECURE)
    try:
        stub = owner_stub(running.target, INSECURE)
        code, details = status_of(lambda: get_info(stub))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert "not TLS-protected" in details
    finally:
        running.server.stop(0)
    dev = AuthInterceptor(
        MODALITY_SERVICE_POLICY, insecure_principal=Principal("coordinator", "dev")
    )
    running = start_owner(INSECURE, interceptors=[dev])
    try:
        assert get_info(owner_stub(running.target, INSECURE)).modality == "ecg"
        assert running.servicer.calls == [Principal("coordinator", "dev")]
    finally:
        running.server.stop(0)


# -- decorator and own certificate ------------------------------------------------------------


class DecoratedOwner(FakeOwner):
    @require_roles("coordinator")
    def GetInfo(self, request: Any, context: grpc.ServicerContext) -> Any:
        return super().GetInfo(request, context)


def test_require_roles_decorator(dep: Deployment) -> None:
    server, port = create_server(dep.owners["ecg"])
    modality_pb2_grpc.add_ModalityServiceServicer_to_server(DecoratedOwner("ecg"), server)
    server.start()
    try:
        target = f"127.0.0.1:{port}"
        assert get_info(owner_stub(target, dep.coordinator)).modality == "ecg"
        code, details = status_of(lambda: get_info(owner_stub(target, dep.requester)))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "GetInfo" in details
    finally:
        server.stop(0)


def test_check_own_certificate(dep: Deployment) -> None:
    assert check_own_certificate(dep.owners["ecg"], "owner", "ecg").name == "cardiology"
    with pytest.raises(ValueError, match="expected owner for modality 'x_ray'"):
        check_own_certificate(dep.owners["ecg"], "owner", "x_ray")
    with pytest.raises(ValueError, match="expected coordinator"):
        check_own_certificate(dep.requester, "coordinator")
