"""Faults and edge cases of the online path, with in-process servers (mTLS on 127.0.0.1):
owners that send non-finite logits, answer late, disagree on K, hold only some patients, or
change their model version under the coordinator; fusion batching; health; insecure mode."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
import numpy as np
import pytest
import torch
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers_services import MODALITIES, OWNER_NAMES, TIMEOUT, Fed, build_fed, rpc_error
from helpers_wait import wait_until
from typer.testing import CliRunner

from jacfusion_fed.bench.deployment import ServeBenchConfig, make_dataset
from jacfusion_fed.cli import app
from jacfusion_fed.clients.modality_service import ModalityServicer
from jacfusion_fed.clients.serve import serve_owner
from jacfusion_fed.fusion import Fused
from jacfusion_fed.owner import OwnerWorkspace
from jacfusion_fed.privacy.pseudonyms import Pseudonymizer
from jacfusion_fed.rpc.auth import AuthInterceptor
from jacfusion_fed.rpc.channels import connect_coordinator
from jacfusion_fed.rpc.fusion_codec import PredictOptions, answer_from_proto
from jacfusion_fed.rpc.jacfusion.v1 import fusion_pb2, modality_pb2_grpc
from jacfusion_fed.rpc.matrix import decode_matrix, encode_matrix
from jacfusion_fed.rpc.policies import MODALITY_SERVICE_POLICY
from jacfusion_fed.rpc.tls import INSECURE, create_channel, create_server
from jacfusion_fed.server.coordinator import Coordinator
from jacfusion_fed.server.fusing import Fuser
from jacfusion_fed.server.grouping import FusionKey, Group, Grouped
from jacfusion_fed.server.predict_types import (
    CoordinatorConfig,
    OwnerEndpoint,
    PredictError,
)
from jacfusion_fed.server.serve import serve_coordinator

TOL = 1e-12


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Fed:
    return build_fed(tmp_path_factory.mktemp("faults"))


@dataclass
class Running:
    server: grpc.Server
    target: str

    def stop(self) -> None:
        self.server.stop(0).wait()


def start_owner(
    fed: Fed,
    modality: str,
    servicer_cls: type[ModalityServicer] | None = None,
    workspace: OwnerWorkspace | None = None,
) -> Running:
    ws = workspace or fed.workspaces[modality]
    if servicer_cls is None:
        running = serve_owner(ws, fed.owner_tls(modality), health_interval=0.1)
        return Running(running.server, running.target)
    server, port = create_server(
        fed.owner_tls(modality),
        interceptors=[AuthInterceptor(MODALITY_SERVICE_POLICY)],
        max_workers=4,
    )
    servicer = servicer_cls(ws, OWNER_NAMES[modality])
    modality_pb2_grpc.add_ModalityServiceServicer_to_server(servicer, server)
    server.start()
    return Running(server, f"127.0.0.1:{port}")


@pytest.fixture
def owners(fed: Fed) -> Iterator[dict[str, Running]]:
    running = {m: start_owner(fed, m) for m in MODALITIES}
    yield running
    for r in running.values():
        r.stop()


def coordinator(fed: Fed, targets: dict[str, str], tmp_path: Path, **config: Any) -> Coordinator:
    return Coordinator(
        tmp_path / "registry",
        [OwnerEndpoint(m, t) for m, t in targets.items()],
        fed.coordinator_tls,
        CoordinatorConfig(**config),
    )


class NanOwner(ModalityServicer):
    def GetLogits(self, request: Any, context: grpc.ServicerContext) -> Any:
        response = super().GetLogits(request, context)
        values = decode_matrix(response.batch.logits)
        values[-1, 0] = np.nan
        response.batch.logits.CopyFrom(encode_matrix(values))
        return response


class SlowOwner(ModalityServicer):
    def GetLogits(self, request: Any, context: grpc.ServicerContext) -> Any:
        time.sleep(1.0)  # the fault under test: an owner 1 s late, past every deadline here
        return super().GetLogits(request, context)


class MovingOwner(ModalityServicer):
    """Tags its logits with a version it no longer has as its current one."""

    def GetLogits(self, request: Any, context: grpc.ServicerContext) -> Any:
        response = super().GetLogits(request, context)
        response.model_version = "f" * 16
        return response


def test_nonfinite_logits_are_never_fused(fed: Fed, tmp_path: Path) -> None:
    bad = start_owner(fed, "audio", NanOwner)
    good = start_owner(fed, "image")
    c = coordinator(fed, {"audio": bad.target, "image": good.target}, tmp_path)
    try:
        ids = fed.ids[:6]
        got = c.predict(ids)
        audio, image = got.modalities
        assert audio.error.startswith("DATA_LOSS") and "non-finite" in audio.error
        assert ids[-1] in audio.error and not audio.used_mask.any() and image.used_mask.all()
        np.testing.assert_allclose(
            got.probabilities, fed.reference(ids, modalities=["image"]), rtol=0, atol=TOL
        )
        with pytest.raises(PredictError) as info:
            c.predict(ids, PredictOptions(require_all=True))
        assert info.value.code == grpc.StatusCode.DATA_LOSS
        with pytest.raises(PredictError) as info:
            c.predict(ids, PredictOptions(modalities=("audio",)))
        assert info.value.code == grpc.StatusCode.DATA_LOSS
        assert "no selected owner answered" in info.value.message
    finally:
        c.close()
        bad.stop()
        good.stop()


def test_late_owner_is_left_out_and_deadlines_hold(fed: Fed, tmp_path: Path) -> None:
    slow = start_owner(fed, "audio", SlowOwner)
    good = start_owner(fed, "image")
    c = coordinator(
        fed, {"audio": slow.target, "image": good.target}, tmp_path, owner_timeout_s=0.3
    )
    served = serve_coordinator(c, fed.coordinator_tls, sync=False)
    try:
        ids = fed.ids[:4]
        c.sync("image")
        t0 = time.monotonic()
        got = c.predict(ids)
        assert time.monotonic() - t0 < 0.9
        audio, image = got.modalities
        assert audio.error.startswith("DEADLINE_EXCEEDED") and not audio.used_mask.any()
        assert image.used_mask.all()
        np.testing.assert_allclose(
            got.probabilities, fed.reference(ids, modalities=["image"]), rtol=0, atol=TOL
        )
        with pytest.raises(PredictError) as info:
            c.predict(ids, PredictOptions(require_all=True))
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        # Through gRPC: the request's own deadline caps the owner timeout.
        stub = fusion_pb2_grpc_stub(connect_coordinator(served.target, fed.requester))
        request = fusion_pb2.PredictRequest(
            sample_ids=ids, options=fusion_pb2.FusionOptions(owner_timeout=Duration(seconds=5))
        )
        stub.GetModelInfo(fusion_pb2.GetModelInfoRequest(), timeout=TIMEOUT)  # connect first
        t0 = time.monotonic()
        response = stub.Predict(request, timeout=0.6)  # the slow owner takes 1 s
        assert time.monotonic() - t0 < 0.6
        assert [list(m.used) for m in response.predictions.modalities] == [[False] * 4, [True] * 4]
    finally:
        served.stop(0)
        slow.stop()
        good.stop()


def fusion_pb2_grpc_stub(channel: grpc.Channel) -> Any:
    from jacfusion_fed.rpc.jacfusion.v1 import fusion_pb2_grpc

    return fusion_pb2_grpc.FusionServiceStub(channel)


def test_k_mismatch_between_owners(fed: Fed, tmp_path: Path) -> None:
    data = make_dataset(tmp_path, ServeBenchConfig(samples=120, classes=3, features=8))
    ws3 = OwnerWorkspace(
        tmp_path / "ws3", "audio", f"npz:{data['audio']}", Pseudonymizer.from_file(fed.key)
    )
    ws3.train(epochs=1)
    three = start_owner(fed, "audio", workspace=ws3)
    good = start_owner(fed, "image")
    c = coordinator(fed, {"image": good.target, "audio": three.target}, tmp_path)
    try:
        assert c.sync("image") == {"image": ""}
        error = c.sync("audio")["audio"]
        assert error.startswith("FAILED_PRECONDITION") and "K mismatch" in error
        assert "K=3" in error and "K=4" in error
        ids = fed.ids[:3]
        got = c.predict(ids)
        audio = next(m for m in got.modalities if m.modality == "audio")
        assert "K mismatch" in audio.error and not audio.used_mask.any()
        with pytest.raises(PredictError) as info:
            c.predict(ids, PredictOptions(modalities=("audio",)))
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        c.close()
        three.stop()
        good.stop()


def test_owner_holding_some_patients(fed: Fed, tmp_path: Path) -> None:
    """The audio owner holds every other patient: the rest is fused from image alone."""
    half = OwnerWorkspace(
        tmp_path / "ws-half",
        "audio",
        f"npz:{fed.data['audio']}?site=0&sites=2",
        Pseudonymizer.from_file(fed.key),
    )
    half.train(epochs=1)
    owner = start_owner(fed, "audio", workspace=half)
    good = start_owner(fed, "image")
    c = coordinator(fed, {"audio": owner.target, "image": good.target}, tmp_path)
    try:
        ids = fed.ids[:10]
        got = c.predict(ids, PredictOptions(method="statistical"))
        audio, image = got.modalities
        held = np.array([half.logits([i]).unknown_ids == [] for i in ids])
        assert held.any() and not held.all()
        np.testing.assert_array_equal(audio.used, held)
        assert image.used_mask.all() and audio.error == ""
        counts = half.class_counts() + fed.workspaces["image"].class_counts()
        from jacfusion_fed.fusion import log_prior_from_counts, statistical_fusion

        log_prior = log_prior_from_counts(counts)

        for row, sid in enumerate(ids):
            logits = [fed.workspaces["image"].logits([sid]).logits]
            if held[row]:
                logits.insert(0, half.logits([sid]).logits)
            want = statistical_fusion(logits, log_prior).numpy()[0]
            np.testing.assert_allclose(got.probabilities[row], want, rtol=0, atol=TOL)
        # With require_all, the patients audio lacks cannot be predicted.
        with pytest.raises(PredictError) as info:
            c.predict(ids, PredictOptions(require_all=True))
        assert info.value.code == grpc.StatusCode.NOT_FOUND
        strict = c.predict(ids, PredictOptions(require_all=True, skip_unknown_ids=True))
        assert strict.sample_ids == [i for i, h in zip(ids, held, strict=True) if h]
        assert strict.unpredicted_sample_ids == [i for i, h in zip(ids, held, strict=True) if not h]
    finally:
        c.close()
        owner.stop()
        good.stop()


def test_version_that_moved_on_is_not_fused(fed: Fed, tmp_path: Path) -> None:
    moving = start_owner(fed, "audio", MovingOwner)
    good = start_owner(fed, "image")
    c = coordinator(fed, {"audio": moving.target, "image": good.target}, tmp_path)
    try:
        got = c.predict(fed.ids[:3])
        audio = got.modalities[0]
        assert audio.error.startswith("ABORTED") and "f" * 16 in audio.error
        assert not audio.used_mask.any()
        assert c.head("audio") is not None  # the real current head got registered meanwhile
        assert c.head("audio").version == fed.workspaces["audio"].current_version()
    finally:
        c.close()
        moving.stop()
        good.stop()


def test_fusion_batches_concurrent_requests_on_their_own_threads() -> None:
    """Leader/follower: the first request fuses at once; the six arriving meanwhile queue
    and are fused by one of their own threads, one call per key (no thread of the Fuser's)."""
    calls: list[tuple[int, str]] = []
    gate = threading.Event()

    def slow_fuse(method: str, zs: list[Any], *_: Any, **__: Any) -> Fused:
        calls.append((zs[0].shape[0], threading.current_thread().name))
        gate.wait(5)
        return Fused(zs[0] * 2.0)

    fuser = Fuser(torch.device("cpu"), lambda: None, fuse_full=slow_fuse)
    key = FusionKey("mean", ("a",), ("v",))
    other = FusionKey("statistical", ("a",), ("v",))
    results: dict[int, np.ndarray] = {}

    def run(i: int, k: FusionKey) -> None:
        group = Group(k, ("a",), None, (np.full((i + 1, 3), float(i)),), None)
        grouped = Grouped(cast(Any, None), 3, None, {}, [], [group])
        results[i] = fuser.fuse(grouped).groups[0].p

    threads = [
        threading.Thread(target=run, args=(i, key if i < 5 else other), name=f"request-{i}")
        for i in range(7)
    ]
    threads[0].start()
    wait_until(lambda: calls, "the first job to reach the fusion call", interval=0.001)
    for t in threads[1:]:
        t.start()
    wait_until(lambda: fuser.queued == 6, "six jobs queued behind the first", interval=0.01)
    gate.set()
    for t in threads:
        t.join(5)
    for i in range(7):
        np.testing.assert_array_equal(results[i], np.full((i + 1, 3), 2.0 * i))
    assert calls[0] == (1, "request-0")
    assert sorted(n for n, _ in calls[1:]) == sorted([2 + 3 + 4 + 5, 6 + 7])
    assert {name for _, name in calls[1:]} <= {f"request-{i}" for i in range(1, 7)}
    assert fuser.jobs == 7 and fuser.calls == 3


def test_concurrent_requests_are_fused_correctly(
    fed: Fed, owners: dict[str, Running], tmp_path: Path
) -> None:
    c = coordinator(fed, {m: r.target for m, r in owners.items()}, tmp_path)
    try:
        c.sync()
        errors: list[BaseException] = []

        def worker(start: int) -> None:
            try:
                for j in range(5):
                    ids = fed.ids[start + j : start + j + 3 + start % 4]
                    got = c.predict(ids)
                    np.testing.assert_allclose(
                        got.probabilities, fed.reference(ids), rtol=0, atol=TOL
                    )
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(10 * i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors[0]
        assert c.batcher.jobs == 30
    finally:
        c.close()


def test_large_batches_are_split_across_owner_calls(
    fed: Fed, owners: dict[str, Running], tmp_path: Path
) -> None:
    c = coordinator(fed, {m: r.target for m, r in owners.items()}, tmp_path, owner_chunk=7)
    try:
        ids = [*fed.ids[:30], "e" * 64]
        got = c.predict(ids, PredictOptions(skip_unknown_ids=True))
        assert got.sample_ids == ids[:30] and got.unpredicted_sample_ids == ["e" * 64]
        np.testing.assert_allclose(got.probabilities, fed.reference(ids[:30]), rtol=0, atol=TOL)
        chunks = list(c.predict_stream(fed.ids[:50], chunk_size=12))
        assert [len(r.sample_ids) for r in chunks] == [12, 12, 12, 12, 2]
        probs = np.concatenate([r.probabilities for r in chunks])
        np.testing.assert_allclose(probs, fed.reference(fed.ids[:50]), rtol=0, atol=TOL)
    finally:
        c.close()


def test_health_follows_models_and_heads(fed: Fed, tmp_path: Path) -> None:
    empty = OwnerWorkspace(
        tmp_path / "ws-empty",
        "audio",
        f"npz:{fed.data['audio']}",
        Pseudonymizer.from_file(fed.key),
    )
    owner = serve_owner(empty, fed.owner_tls("audio"), health_interval=0.05)
    c = coordinator(fed, {"audio": owner.target}, tmp_path, retry_interval_s=0.1)
    served = serve_coordinator(c, fed.coordinator_tls)
    try:

        def status(target: str) -> int:
            stub = health_pb2_grpc.HealthStub(create_channel(target, fed.requester))
            return stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status  # type: ignore[no-any-return]

        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        assert status(owner.target) == not_serving
        assert status(served.target) == not_serving
        stub = modality_pb2_grpc.ModalityServiceStub(
            create_channel(owner.target, fed.coordinator_tls)
        )
        from jacfusion_fed.rpc.jacfusion.v1 import modality_pb2

        code, details = rpc_error(
            lambda: stub.GetLogits(modality_pb2.GetLogitsRequest(sample_ids=fed.ids[:1]))
        )
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "no trained model" in details
        empty.train(epochs=1)
        wait_until(
            lambda: status(served.target) == health_pb2.HealthCheckResponse.SERVING,
            "the coordinator to become SERVING",
            timeout=20,
        )
        assert status(owner.target) == health_pb2.HealthCheckResponse.SERVING
    finally:
        served.stop(0)
        owner.stop(0)


def test_registry_reloads_without_owners(
    fed: Fed, owners: dict[str, Running], tmp_path: Path
) -> None:
    c = coordinator(fed, {m: r.target for m, r in owners.items()}, tmp_path)
    assert c.sync() == {"audio": "", "image": ""}
    info = c.model_info()
    c.close()
    # A new coordinator on the same registry, owners unreachable: the heads are still known.
    again = coordinator(fed, {m: "127.0.0.1:9" for m in MODALITIES}, tmp_path)
    try:
        assert again.has_heads()
        reloaded = again.model_info()
        assert [(h.modality, h.model_version, h.registered_at) for h in reloaded.heads] == [
            (h.modality, h.model_version, h.registered_at) for h in info.heads
        ]
        np.testing.assert_allclose(reloaded.class_prior, np.exp(fed.log_prior()))
        with pytest.raises(PredictError) as exc:
            again.predict(fed.ids[:1])
        assert exc.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        again.close()


def test_insecure_only_when_explicit(fed: Fed, tmp_path: Path) -> None:
    owner = serve_owner(fed.workspaces["image"], INSECURE)
    c = Coordinator(tmp_path / "reg", [OwnerEndpoint("image", owner.target)], INSECURE)
    served = serve_coordinator(c, INSECURE, sync=False)
    try:
        stub = fusion_pb2_grpc_stub(connect_coordinator(served.target, INSECURE))
        response = stub.Predict(fusion_pb2.PredictRequest(sample_ids=fed.ids[:2]), timeout=TIMEOUT)
        got = answer_from_proto(response.predictions)
        np.testing.assert_allclose(
            got.probabilities, fed.reference(fed.ids[:2], modalities=["image"]), atol=TOL
        )
        with pytest.raises(ValueError, match="loopback"):
            serve_owner(fed.workspaces["image"], INSECURE, host="10.1.2.3")
    finally:
        served.stop(0)
        owner.stop(0)
    result = CliRunner().invoke(
        app, ["coordinator", "serve", "--registry", str(tmp_path / "r"), "--owner", "a=h:1"]
    )
    assert result.exit_code != 0 and "--insecure" in result.output


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fusion_on_cuda_matches_cpu(fed: Fed, owners: dict[str, Running], tmp_path: Path) -> None:
    targets = {m: r.target for m, r in owners.items()}
    gpu = coordinator(fed, targets, tmp_path / "gpu", device="cuda")
    cpu = coordinator(fed, targets, tmp_path / "cpu", device="cpu")
    try:
        assert gpu.device.type == "cuda"
        ids = fed.ids[:50]
        for method in ("jacobian", "statistical", "mean", "confidence_mean"):
            a = gpu.predict(ids, PredictOptions(method=method)).probabilities
            b = cpu.predict(ids, PredictOptions(method=method)).probabilities
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-10)
    finally:
        gpu.close()
        cpu.close()
