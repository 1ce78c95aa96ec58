"""The online path end to end: two owners and the coordinator as real processes on 127.0.0.1,
started through the CLI with mTLS, called through the generated client.

Order matters inside this module (one deployment, started once): the tests that change the
deployment (a new model version, a coordinator restart, a killed owner) come last.
"""

from __future__ import annotations

import json
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from helpers_services import (
    MODALITIES,
    NUM_CLASSES,
    TIMEOUT,
    Fed,
    build_fed,
    foreign_certs,
    rpc_error,
)
from helpers_wait import wait_until
from typer.testing import CliRunner

from jacfusion_fed.cli import app
from jacfusion_fed.privacy.certs import owner_server_name
from jacfusion_fed.rpc.auth import connect_owner
from jacfusion_fed.rpc.fusion_codec import answer_from_proto
from jacfusion_fed.rpc.jacfusion.v1 import fusion_pb2, modality_pb2, modality_pb2_grpc
from jacfusion_fed.rpc.matrix import decode_matrix
from jacfusion_fed.rpc.tls import TlsFiles, create_channel
from jacfusion_fed.server.coordinator import Coordinator
from jacfusion_fed.server.predict_types import OwnerEndpoint

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
import fed_procs

pytestmark = pytest.mark.e2e  # owners and coordinator as processes

MAX_BATCH = 64
TOL = 1e-12

METHOD = {
    "statistical": fusion_pb2.FUSION_METHOD_STATISTICAL,
    "jacobian": fusion_pb2.FUSION_METHOD_JACOBIAN,
    "mean": fusion_pb2.FUSION_METHOD_MEAN,
    "confidence_mean": fusion_pb2.FUSION_METHOD_CONFIDENCE_MEAN,
}


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fed]:
    fed = build_fed(tmp_path_factory.mktemp("services"))
    try:
        fed.start_owners(MODALITIES)
        fed.start_coordinator("--max-batch", str(MAX_BATCH), "--owner-timeout", "3")
        fed.wait_registered()
        yield fed
    finally:
        fed.procs.stop_all()


def predict(fed: Fed, ids: list[str], **options: Any) -> Any:
    request = fusion_pb2.PredictRequest(sample_ids=ids, options=fusion_pb2.FusionOptions(**options))
    return answer_from_proto(fed.stub().Predict(request, timeout=TIMEOUT).predictions)


# --- correct output ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(METHOD))
def test_fused_output_matches_the_library(fed: Fed, method: str) -> None:
    ids = fed.ids[5:45]
    got = predict(fed, ids, method=METHOD[method])
    want = fed.reference(ids, method)
    assert got.sample_ids == ids
    assert got.method == method
    np.testing.assert_allclose(got.probabilities, want, rtol=0, atol=TOL)
    np.testing.assert_array_equal(got.labels, want.argmax(axis=1))
    assert [c.modality for c in got.modalities] == list(MODALITIES)
    for c in got.modalities:
        assert c.used_mask.all() and c.error == ""
        assert c.model_version == fed.workspaces[c.modality].current_version()
        assert c.owner == f"{c.modality}-co"
        assert c.regularized == (method == "jacobian")


def test_jacobian_options_match_the_library(fed: Fed) -> None:
    ids = fed.ids[:30]
    got = predict(
        fed,
        ids,
        method=METHOD["jacobian"],
        gammas={"audio": 0.2},
        default_gamma=0.7,
        regularize=["audio"],
        iterations=2,
    )
    want = fed.reference(ids, gammas=[0.2, 0.7], regularize=["audio"], iterations=2)
    np.testing.assert_allclose(got.probabilities, want, rtol=0, atol=TOL)
    by_name = {c.modality: c for c in got.modalities}
    assert by_name["audio"].regularized and not by_name["image"].regularized
    assert (by_name["audio"].gamma, by_name["image"].gamma) == (0.2, 0.7)
    # gamma = 1 for every modality is exactly statistical fusion (the coordinator's default
    # method is jacobian, so this also checks UNSPECIFIED -> default).
    got = predict(fed, ids, default_gamma=1.0)
    np.testing.assert_allclose(got.probabilities, fed.reference(ids, "statistical"), atol=TOL)
    # One modality only.
    got = predict(fed, ids, modalities=["image"], method=METHOD["statistical"])
    want = fed.reference(ids, "statistical", modalities=["image"])
    np.testing.assert_allclose(got.probabilities, want, rtol=0, atol=TOL)
    assert [c.modality for c in got.modalities] == ["image"]


def test_center_logits_option_matches_the_library(fed: Fed) -> None:
    """FusionOptions.center_logits (issue 19) reaches jacobian_fusion's option; unset and
    false are the paper's method."""
    ids = fed.ids[:30]
    got = predict(fed, ids, method=METHOD["jacobian"], center_logits=True)
    want = fed.reference(ids, center_logits=True)
    np.testing.assert_allclose(got.probabilities, want, rtol=0, atol=TOL)
    assert np.abs(want - fed.reference(ids)).max() > 0  # a different method
    for options in ({}, {"center_logits": False}):
        got = predict(fed, ids, method=METHOD["jacobian"], **options)
        np.testing.assert_allclose(got.probabilities, fed.reference(ids), rtol=0, atol=TOL)


def test_stream_matches_predict(fed: Fed) -> None:
    ids = fed.ids[:150]  # more than MAX_BATCH: only the stream takes it
    request = fusion_pb2.PredictStreamRequest(sample_ids=ids, chunk_size=40)
    chunks = [answer_from_proto(r.predictions) for r in fed.stub().PredictStream(request)]
    assert [len(c.sample_ids) for c in chunks] == [40, 40, 40, 30]
    assert [sid for c in chunks for sid in c.sample_ids] == ids
    probs = np.concatenate([c.probabilities for c in chunks])
    np.testing.assert_allclose(probs, fed.reference(ids), rtol=0, atol=TOL)


def test_owner_stream_logits(fed: Fed) -> None:
    channel = connect_owner(fed.owner_targets["audio"], fed.coordinator_tls, "audio")
    stub = modality_pb2_grpc.ModalityServiceStub(channel)
    ids = [*fed.ids[:9], "e" * 64]
    chunks = list(
        stub.StreamLogits(modality_pb2.StreamLogitsRequest(sample_ids=ids, chunk_size=4), timeout=5)
    )
    assert [list(c.batch.sample_ids) for c in chunks] == [ids[0:4], ids[4:8], [ids[8]]]
    assert list(chunks[-1].batch.unknown_sample_ids) == ["e" * 64]
    values = np.concatenate([decode_matrix(c.batch.logits) for c in chunks])
    np.testing.assert_array_equal(values, fed.workspaces["audio"].logits(ids[:9]).logits)
    assert {c.model_version for c in chunks} == {fed.workspaces["audio"].current_version()}
    info = stub.GetInfo(modality_pb2.GetInfoRequest(), timeout=5)
    assert (info.modality, info.owner, info.num_classes) == ("audio", "audio-co", NUM_CLASSES)
    code, details = rpc_error(
        lambda: stub.GetHead(modality_pb2.GetHeadRequest(kind=modality_pb2.HEAD_KIND_FULL))
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED and "Gram matrix" in details
    code, details = rpc_error(
        lambda: stub.GetLogits(
            modality_pb2.GetLogitsRequest(sample_ids=ids, expected_model_version="0" * 16)
        )
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "0" * 16 in details


def test_model_info(fed: Fed) -> None:
    info = fed.stub().GetModelInfo(fusion_pb2.GetModelInfoRequest(), timeout=TIMEOUT)
    assert info.num_classes == NUM_CLASSES
    np.testing.assert_allclose(np.log(info.class_prior), fed.log_prior(), atol=1e-12)
    assert info.default_method == fusion_pb2.FUSION_METHOD_JACOBIAN
    assert sorted(m.modality for m in info.modalities) == sorted(MODALITIES)
    for m in info.modalities:
        assert m.model_version == fed.workspaces[m.modality].current_version()
        assert m.head_kind == modality_pb2.HEAD_KIND_GRAM
        assert list(m.class_counts) == fed.workspaces[m.modality].class_counts().tolist()


# --- validation ----------------------------------------------------------------------------------


BAD = grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("ids", "options", "code", "fragment"),
    [
        ([], {}, BAD, "empty batch"),
        ("many", {}, BAD, f"exceeds the limit of {MAX_BATCH}"),
        ("dup", {}, BAD, "duplicate sample ids"),
        (None, {"default_gamma": 0.0}, BAD, "(0, 1]"),
        (None, {"gammas": {"audio": 1.5}}, BAD, "gamma of modality 'audio' must lie in (0, 1]"),
        (None, {"gammas": {"ecg": 0.5}}, BAD, "unknown modality 'ecg'"),
        (None, {"method": 99}, BAD, "unknown fusion method 99"),
        (None, {"modalities": ["ecg"]}, BAD, "unknown modality 'ecg'; registered: audio, image"),
        (None, {"regularize": ["ecg"]}, BAD, "unknown modality 'ecg'"),
        (None, {"iterations": 100}, BAD, "iterations must be in 1..16"),
        (None, {"method": 1, "default_gamma": 0.5}, BAD, "only apply to the jacobian method"),
        (None, {"method": 1, "center_logits": True}, BAD, "only apply to the jacobian method"),
        (["e" * 64, "f" * 64], {}, grpc.StatusCode.NOT_FOUND, "2 unknown sample id(s)"),
    ],
)
def test_validation(
    fed: Fed, ids: Any, options: dict[str, Any], code: grpc.StatusCode, fragment: str
) -> None:
    if ids is None:
        ids = fed.ids[:3]
    elif ids == "many":
        ids = fed.ids[: MAX_BATCH + 1]
    elif ids == "dup":
        ids = [fed.ids[0], fed.ids[1], fed.ids[0]]
    got_code, details = rpc_error(lambda: predict(fed, ids, **options))
    assert got_code == code
    assert fragment in details


def test_unknown_ids_are_listed_or_skipped(fed: Fed) -> None:
    ids = [fed.ids[0], "e" * 64, fed.ids[1], "f" * 64]
    code, details = rpc_error(lambda: predict(fed, ids))
    assert code == grpc.StatusCode.NOT_FOUND
    assert "e" * 64 in details and "f" * 64 in details and fed.ids[0] not in details
    got = predict(fed, ids, skip_unknown_ids=True)
    assert got.sample_ids == [fed.ids[0], fed.ids[1]]
    assert got.unpredicted_sample_ids == ["e" * 64, "f" * 64]
    np.testing.assert_allclose(got.probabilities, fed.reference(got.sample_ids), atol=TOL)


# --- CLI, health, reflection -------------------------------------------------------------------


def test_cli_predict_and_info(fed: Fed) -> None:
    runner = CliRunner()
    tls = ["--coordinator", fed.coordinator, "--tls", str(fed.certs.requester_dirs["alice"])]
    local = ["patient-0000003", "patient-0000004"]
    result = runner.invoke(
        app, ["predict", *local, *tls, "--pseudonym-key", str(fed.key), "--json"]
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert [s["local_id"] for s in payload["samples"]] == local
    want = fed.reference(fed.ids[3:5])
    np.testing.assert_allclose([s["probabilities"] for s in payload["samples"]], want, atol=TOL)
    assert payload["samples"][0]["modalities"] == list(MODALITIES)

    result = runner.invoke(
        app,
        [
            "predict",
            "patient-0000003",
            *tls,
            "--pseudonym-key",
            str(fed.key),
            "--method",
            "statistical",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "patient-0000003" in result.stdout and "audio, image" in result.stdout

    result = runner.invoke(app, ["predict", "patient-0000003", *tls])  # no key, no --pseudonyms
    assert result.exit_code != 0 and "raw patient ids are never sent" in _flat(result.output)

    result = runner.invoke(app, ["predict", "e" * 64, *tls, "--pseudonyms"])
    assert result.exit_code == 1 and "NOT_FOUND" in result.output

    result = runner.invoke(app, ["coordinator", "info", *tls, "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["num_classes"] == NUM_CLASSES
    assert {m["modality"] for m in info["modalities"]} == set(MODALITIES)


def _flat(text: str) -> str:
    """CLI output without rich's box drawing and line wrapping."""
    return " ".join(re.sub(r"[\u2500-\u257f]", " ", text).split())


def test_health_and_reflection(fed: Fed) -> None:
    targets = {
        "coordinator": (fed.coordinator, "jacfusion.v1.FusionService"),
        **{m: (t, "jacfusion.v1.ModalityService") for m, t in fed.owner_targets.items()},
    }
    for target, service in targets.values():
        channel = create_channel(target, fed.requester)
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", service):
            status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
        assert set(services) >= {service, "grpc.health.v1.Health"}


def test_processes_use_loopback_only(fed: Fed) -> None:
    socks = fed_procs.tcp_sockets(fed.procs.pids)
    assert any(s.state == "LISTEN" for s in socks)
    assert fed_procs.non_loopback(socks) == []


# --- mTLS and authorisation --------------------------------------------------------------------


def test_wrong_ca_and_missing_certificate_are_refused(fed: Fed, tmp_path: Path) -> None:
    foreign = foreign_certs(tmp_path / "foreign")
    mallory = TlsFiles.from_dir(foreign.requester_dirs["mallory"])
    request = fusion_pb2.PredictRequest(sample_ids=fed.ids[:1])
    stub = fed.stub(mallory)
    code, _ = rpc_error(lambda: stub.Predict(request, timeout=5))
    assert code == grpc.StatusCode.UNAVAILABLE  # refused in the TLS handshake
    # A client presenting no certificate at all.
    channel = create_channel(
        fed.coordinator,
        fed.requester,
        server_name="coordinator.jacfusion.internal",
        client_certificate=False,
    )
    code, _ = rpc_error(lambda: fusion_pb2_grpc_stub(channel).Predict(request, timeout=5))
    assert code == grpc.StatusCode.UNAVAILABLE
    # The same against an owner (only the coordinator's certificate gets in).
    foreign_coord = TlsFiles.from_dir(foreign.coordinator_dir)
    owner = modality_pb2_grpc.ModalityServiceStub(
        create_channel(fed.owner_targets["audio"], foreign_coord)
    )
    code, _ = rpc_error(lambda: owner.GetInfo(modality_pb2.GetInfoRequest(), timeout=5))
    assert code == grpc.StatusCode.UNAVAILABLE


def fusion_pb2_grpc_stub(channel: grpc.Channel) -> Any:
    from jacfusion_fed.rpc.jacfusion.v1 import fusion_pb2_grpc

    return fusion_pb2_grpc.FusionServiceStub(channel)


@pytest.mark.parametrize("who", ["owner", "coordinator"])
def test_only_requesters_predict(fed: Fed, who: str) -> None:
    tls = fed.owner_tls("audio") if who == "owner" else fed.coordinator_tls
    request = fusion_pb2.PredictRequest(sample_ids=fed.ids[:1])
    code, details = rpc_error(lambda: fed.stub(tls).Predict(request, timeout=5))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "allowed roles: requester" in details


def test_requesters_and_owners_may_not_call_owners(fed: Fed) -> None:
    for tls in (fed.requester, fed.owner_tls("image")):
        stub = modality_pb2_grpc.ModalityServiceStub(
            create_channel(fed.owner_targets["audio"], tls)
        )
        request = modality_pb2.GetLogitsRequest(sample_ids=fed.ids[:1])
        code, details = rpc_error(lambda s=stub, r=request: s.GetLogits(r, timeout=5))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert "allowed roles: coordinator" in details


def test_owner_refuses_a_certificate_of_another_modality(fed: Fed) -> None:
    args = fed.owner_args("audio", tls_dir=fed.certs.owner_dirs["image-co"])
    proc = fed.procs.start("owner-wrong-cert", args)
    assert proc.wait(60) == 2
    fed.procs.stop("owner-wrong-cert")
    assert "expected owner for modality 'audio'" in _flat(fed.procs.log("owner-wrong-cert"))


def test_coordinator_refuses_an_owner_of_another_modality(fed: Fed, tmp_path: Path) -> None:
    """The coordinator is told the image owner's address for 'audio'."""
    coordinator = Coordinator(
        tmp_path / "registry",
        [OwnerEndpoint("audio", fed.owner_targets["image"])],
        fed.coordinator_tls,
    )
    try:
        error = coordinator.sync()["audio"]
        assert error.startswith("PERMISSION_DENIED")
        assert "owner 'image-co' (modality 'image')" in error
        # Even without the explicit check, the pinned TLS name refuses the handshake.
        pinned = connect_owner(
            fed.owner_targets["image"], fed.coordinator_tls, "audio", verify_now=False
        )
        stub = modality_pb2_grpc.ModalityServiceStub(pinned)
        code, _ = rpc_error(lambda: stub.GetInfo(modality_pb2.GetInfoRequest(), timeout=5))
        assert code == grpc.StatusCode.UNAVAILABLE
        assert owner_server_name("audio") == "audio.owner.jacfusion.internal"
    finally:
        coordinator.close()


# --- changes to the deployment (keep these last) ------------------------------------------------


def test_new_model_version_refreshes_the_head(fed: Fed) -> None:
    ws = fed.workspaces["audio"]
    old = ws.current_version()
    ws.train(epochs=1, seed=7)  # publishes a new version while the owner process serves
    new = ws.current_version()
    assert new != old
    ids = fed.ids[10:20]
    want = fed.reference(ids)  # also writes the new version's logit cache first
    got = predict(fed, ids)
    by_name = {c.modality: c for c in got.modalities}
    assert by_name["audio"].model_version == new and by_name["audio"].used_mask.all()
    np.testing.assert_allclose(got.probabilities, want, rtol=0, atol=TOL)
    info = fed.stub().GetModelInfo(fusion_pb2.GetModelInfoRequest(), timeout=TIMEOUT)
    assert {m.modality: m.model_version for m in info.modalities}["audio"] == new


def test_coordinator_restart_reloads_the_registry(fed: Fed) -> None:
    before = fed.stub().GetModelInfo(fusion_pb2.GetModelInfoRequest(), timeout=TIMEOUT)
    assert fed.procs.stop("coordinator") == 0
    fed.start_coordinator("--max-batch", str(MAX_BATCH))
    after = fed.stub().GetModelInfo(fusion_pb2.GetModelInfoRequest(), timeout=TIMEOUT)
    assert [(m.modality, m.model_version, m.registered_at) for m in after.modalities] == [
        (m.modality, m.model_version, m.registered_at) for m in before.modalities
    ]
    np.testing.assert_allclose(predict(fed, fed.ids[:5]).probabilities, fed.reference(fed.ids[:5]))


def test_owner_killed_mid_run(fed: Fed) -> None:
    ids = fed.ids[:8]
    both = fed.reference(ids)
    image_only = fed.reference(ids, modalities=["image"])
    seen: list[Any] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def hammer() -> None:
        stub = fed.stub()
        request = fusion_pb2.PredictRequest(sample_ids=ids)
        while not stop.is_set():
            try:
                seen.append(answer_from_proto(stub.Predict(request, timeout=5).predictions))
            except BaseException as exc:  # none expected: image still answers
                errors.append(exc)

    def answered(full: bool, since: int = 0) -> bool:
        """Whether an answer in full (or a partial one) came after ``seen[since]``."""
        return bool(errors) or any(
            all(c.used_mask.all() for c in got.modalities) == full for got in seen[since:]
        )

    worker = threading.Thread(target=hammer)
    worker.start()
    try:
        wait_until(lambda: answered(True), "an answer in full before the owner is killed")
        port = int(fed.owner_targets["audio"].rsplit(":", 1)[1])
        fed.procs.kill("owner-audio")
        since = len(seen)
        wait_until(lambda: answered(False, since), "a partial answer after the owner is killed")
    finally:
        stop.set()
        worker.join(30)
    assert not errors, errors[:1]
    partial = 0
    for got in seen:  # never a silently wrong answer
        by_name = {c.modality: c for c in got.modalities}
        assert by_name["image"].used_mask.all()
        if by_name["audio"].used_mask.all():
            np.testing.assert_allclose(got.probabilities, both, rtol=0, atol=TOL)
        else:
            partial += 1
            assert not by_name["audio"].used_mask.any()
            assert by_name["audio"].error.startswith(("UNAVAILABLE", "DEADLINE_EXCEEDED"))
            np.testing.assert_allclose(got.probabilities, image_only, rtol=0, atol=TOL)
    assert partial > 0 and len(seen) > partial

    code, details = rpc_error(lambda: predict(fed, ids, require_all=True))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert "require_all" in details and "'audio'" in details

    fed.start_owner("audio", port=port)  # back on the same address: the coordinator recovers

    def recovered() -> Any:
        got = predict(fed, ids)
        return got if all(c.used_mask.all() for c in got.modalities) else None

    got = wait_until(recovered, "the coordinator to recover the owner", timeout=30, interval=0.2)
    np.testing.assert_allclose(got.probabilities, both, rtol=0, atol=TOL)


@pytest.mark.slow
def test_bench_serve_runs(tmp_path: Path) -> None:
    """``jacfusion-fed bench serve`` end to end, at a tiny scale (figures not checked)."""
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "serve",
            "--samples",
            "1024",
            "--batch",
            "256",
            "--latency-requests",
            "50",
            "--duration",
            "1",
            "--workdir",
            str(tmp_path / "work"),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    for tag in ("cached", "uncached"):
        assert payload[tag]["latency"]["predict"]["p50_us"] > 0
        assert payload[tag]["throughput"]["samples_per_s"] > 0
