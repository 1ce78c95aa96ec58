"""Property-based fuzzing (hypothesis) of every RPC's request messages and of the owners'
replies as the coordinator parses them. No crash, no hang, always a precise status, and every
answer equal to the fusion library on what the owners served.

Two layers:

* in-process (fast, many inputs): raw or structured request bytes through the real
  interceptor and servicers (``tests/fuzz/harness/``); owner replies from fake owner stubs
  inside a real :class:`Coordinator`;
* over real sockets: owners and coordinator as gRPC servers with mTLS on 127.0.0.1, fed raw
  and structured request bytes through a generic channel.

The same harness backs the coverage-guided atheris targets (``tests/fuzz/fuzz_*.py``). The
number of inputs tried per property is printed at the end of the module (``pytest -s``) and
written to ``$JF_RELIABILITY_REPORT`` (JSON lines) when that is set.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from helpers_services import MODALITIES, Fed, build_fed
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jacfusion_fed.clients.serve import serve_owner
from jacfusion_fed.reliability import Reference, snapshot_workspace
from jacfusion_fed.reliability.reference import CLEAR_ERROR_CODES
from jacfusion_fed.rpc.auth import connect_owner
from jacfusion_fed.rpc.channels import connect_coordinator
from jacfusion_fed.rpc.fusion_codec import answer_from_proto
from jacfusion_fed.rpc.jacfusion.v1 import fusion_pb2
from jacfusion_fed.rpc.matrix import decode_matrix
from jacfusion_fed.server.coordinator import Coordinator
from jacfusion_fed.server.predict_types import CoordinatorConfig, OwnerEndpoint
from jacfusion_fed.server.serve import serve_coordinator

sys.path.insert(0, str(Path(__file__).parent / "fuzz"))
import harness as H

FAST = 200  # in-process examples per property in the default run
SLOW = 3000  # ... with -m slow
SOCKET_FAST = 100  # examples over real sockets
SOCKET_SLOW = 600

COUNTS: dict[str, int] = {}


def _record(name: str, n: int = 1) -> None:
    COUNTS[name] = COUNTS.get(name, 0) + n


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    t0 = time.monotonic()
    yield
    lines = [f"{k}: {v} inputs" for k, v in sorted(COUNTS.items())]
    print(f"\nfuzz inputs tried ({time.monotonic() - t0:.0f} s):\n  " + "\n  ".join(lines))
    out = os.environ.get("JF_RELIABILITY_REPORT")
    if out:
        with open(out, "a") as fh:
            fh.write(json.dumps({"fuzz_inputs": COUNTS}) + "\n")


def _settings(n: int) -> Any:
    return settings(
        max_examples=n,
        deadline=None,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.function_scoped_fixture,
        ],
    )


# --- in-process targets ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pems(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    return H.deployment_pems(tmp_path_factory.mktemp("fuzz-certs"))


@pytest.fixture(scope="module")
def fusion_target(pems: dict[str, bytes]) -> Iterator[H.FusionTarget]:
    target = H.FusionTarget(pems)
    yield target
    target.close()


@pytest.fixture(scope="module")
def owner_target(pems: dict[str, bytes], tmp_path_factory: pytest.TempPathFactory) -> H.OwnerTarget:
    return H.OwnerTarget(H.tiny_workspace(tmp_path_factory.mktemp("fuzz-owner")), pems)


@pytest.fixture(scope="module")
def reply_target() -> H.ReplyTarget:
    return H.ReplyTarget()


def _fusion_requests(target: H.FusionTarget, data: Any, name: str) -> None:
    method, request, role, must = H.draw_fusion_call(H.HypothesisChooser(data), target)
    _record(name)
    target.run(method, request, role, must_answer=must)


def _owner_requests(target: H.OwnerTarget, data: Any, name: str) -> None:
    method, request, role = H.draw_owner_call(H.HypothesisChooser(data), target)
    _record(name)
    target.run(method, request, role)


def _owner_replies(target: H.ReplyTarget, data: Any, name: str) -> None:
    _record(name)
    target.run(H.HypothesisChooser(data))


@_settings(FAST)
@given(data=st.data())
def test_fusion_service_requests(fusion_target: H.FusionTarget, data: Any) -> None:
    """Predict / PredictStream / GetModelInfo: garbage, truncated, unicode, oversized,
    invalid options, wrong callers; valid requests must be answered, correctly."""
    _fusion_requests(fusion_target, data, "hypothesis fusion requests (in-process)")


@_settings(FAST)
@given(data=st.data())
def test_modality_service_requests(owner_target: H.OwnerTarget, data: Any) -> None:
    """GetInfo / GetHead / GetLogits / StreamLogits of a real owner workspace."""
    _owner_requests(owner_target, data, "hypothesis owner requests (in-process)")


@_settings(FAST)
@given(data=st.data())
def test_owner_replies_as_the_coordinator_parses_them(
    reply_target: H.ReplyTarget, data: Any
) -> None:
    """NaN/Inf and huge logits, wrong K, truncated/padded matrices, doubled/foreign/missing
    ids, versions that disagree, bad Gram matrices, owner errors, late owners."""
    _owner_replies(reply_target, data, "hypothesis owner replies (in-process)")


@pytest.mark.slow
@_settings(SLOW)
@given(data=st.data())
def test_fusion_service_requests_long(fusion_target: H.FusionTarget, data: Any) -> None:
    _fusion_requests(fusion_target, data, "hypothesis fusion requests (in-process)")


@pytest.mark.slow
@_settings(SLOW)
@given(data=st.data())
def test_modality_service_requests_long(owner_target: H.OwnerTarget, data: Any) -> None:
    _owner_requests(owner_target, data, "hypothesis owner requests (in-process)")


@pytest.mark.slow
@_settings(SLOW)
@given(data=st.data())
def test_owner_replies_long(reply_target: H.ReplyTarget, data: Any) -> None:
    _owner_replies(reply_target, data, "hypothesis owner replies (in-process)")


def test_known_request_findings_stay_fixed(
    fusion_target: H.FusionTarget, owner_target: H.OwnerTarget
) -> None:
    """Request-side inputs that failed before the fixes of issue #7, replayed."""
    # 1. undecodable bytes: INTERNAL from gRPC before; parsed only after authorisation now
    for garbage in (b"\xff\xff\xff", b"\x0a\x05abc"):
        out = fusion_target.run("Predict", garbage)
        assert out.code == grpc.StatusCode.INVALID_ARGUMENT
        assert out.details.startswith("malformed request message")
    out = owner_target.run("GetLogits", b"\xff\xff", role="requester")
    assert out.code == grpc.StatusCode.PERMISSION_DENIED
    # 2. an owner_timeout that overflows gRPC's deadline made every owner call fail
    request = fusion_pb2.PredictRequest(sample_ids=fusion_target.ids[5:7])
    request.options.owner_timeout.seconds = 100_000_000_000
    out = fusion_target.run("Predict", request.SerializeToString())
    assert out.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "owner_timeout must be at most 3600 s" in out.details


def test_known_findings_stay_fixed(reply_target: H.ReplyTarget, pems: dict[str, bytes]) -> None:
    """The inputs that failed before the fixes of issue #7, replayed."""
    from jacfusion_fed.rpc.fusion_codec import PredictOptions
    from jacfusion_fed.rpc.matrix import encode_matrix
    from jacfusion_fed.server.predict_types import PredictError

    owners = H.make_good_owners(seed=3)
    good = owners["audio"]
    ids = list(good.logits)[3:6]

    def run(logits: Any, info: Any = None, **options: Any) -> Any:
        def answer(request: Any) -> Any:
            out = logits(request)
            if isinstance(out, H.FakeRpcError):
                raise out
            return out

        def info_answer(_r: Any) -> Any:
            if isinstance(info, H.FakeRpcError):
                raise info
            return good.info()

        audio = H.FakeOwnerStub(info_answer, good.head, answer)
        stubs = {"audio": audio, "image": H.good_stub(owners["image"])}
        with H.CoordinatorHarness(stubs) as h:
            try:
                return h.coordinator.predict(ids, PredictOptions(**options))
            except PredictError as exc:
                return exc

    # 1. logits whose data length is not a multiple of 8 crashed with ValueError (INTERNAL)
    def odd(r: Any) -> Any:
        resp = good.batch(list(r.sample_ids))
        resp.batch.logits.data = resp.batch.logits.data[:-3]
        return resp

    got = run(odd, modalities=("audio",))
    assert isinstance(got, PredictError) and got.code == grpc.StatusCode.DATA_LOSS
    assert "needs 96 bytes, got 93" in got.message

    # 2. a reply listing a held id as unknown as well was accepted
    def both(r: Any) -> Any:
        resp = good.batch(list(r.sample_ids))
        resp.batch.unknown_sample_ids.append(resp.batch.sample_ids[0])
        return resp

    got = run(both)
    audio = got.modalities[0]
    assert audio.error.startswith("DATA_LOSS") and "accounted for 4" in audio.error
    # 3. an owner's own INTERNAL became the coordinator's INTERNAL
    got = run(lambda r: H.FakeRpcError(grpc.StatusCode.INTERNAL, "boom"), modalities=("audio",))
    assert isinstance(got, PredictError) and got.code == grpc.StatusCode.UNAVAILABLE
    assert "INTERNAL: owner of 'audio'" in got.message

    # 4. finite but huge logits fused into NaN probabilities, answered as if fine
    def huge(r: Any) -> Any:
        resp = good.batch(list(r.sample_ids))
        values = decode_matrix(resp.batch.logits)
        values[0, 3] = 1e308
        resp.batch.logits.CopyFrom(encode_matrix(values))
        return resp

    got = run(huge)
    assert not isinstance(got, PredictError), got
    assert (
        got.modalities[0].error.startswith("DATA_LOSS") and "magnitude" in got.modalities[0].error
    )
    assert np.isfinite(got.probabilities).all()
    # 5. a tiny gamma with a real Gram matrix gave NaN probabilities; since the exact solver
    # switches to the dense form for large kappa * sigma_max it is a finite, correct answer
    got = run(lambda r: good.batch(list(r.sample_ids)), default_gamma=1e-300)
    assert not isinstance(got, PredictError), got
    assert np.isfinite(got.probabilities).all()
    np.testing.assert_allclose(got.probabilities.sum(axis=1), 1.0, atol=1e-9)


# --- over real sockets (mTLS on 127.0.0.1) -------------------------------------------------------


class Sockets:
    def __init__(self, fed: Fed) -> None:
        self.fed = fed
        self.owners = {m: serve_owner(fed.workspaces[m], fed.owner_tls(m)) for m in MODALITIES}
        self.coordinator = Coordinator(
            fed.root / "fuzz-registry",
            [OwnerEndpoint(m, o.target) for m, o in self.owners.items()],
            fed.coordinator_tls,
            CoordinatorConfig(max_batch=64),
        )
        self.server = serve_coordinator(self.coordinator, fed.coordinator_tls, sync=False)
        assert self.coordinator.sync() == {m: "" for m in MODALITIES}
        channel = connect_coordinator(self.server.target, fed.requester)
        self.fusion = {
            m: channel.unary_unary(f"/jacfusion.v1.FusionService/{m}")
            for m in ("Predict", "GetModelInfo")
        }
        self.stream = channel.unary_stream("/jacfusion.v1.FusionService/PredictStream")
        owner_channel = connect_owner(
            self.owners["audio"].target, fed.coordinator_tls, "audio", verify_now=False
        )
        self.owner = {
            m: owner_channel.unary_unary(f"/jacfusion.v1.ModalityService/{m}")
            for m in ("GetInfo", "GetHead", "GetLogits")
        }
        self.owner_stream = owner_channel.unary_stream("/jacfusion.v1.ModalityService/StreamLogits")
        self.reference = Reference(
            [snapshot_workspace(fed.workspaces[m], fed.ids) for m in MODALITIES]
        )
        self.pool = fed.ids[:40]

    def stop(self) -> None:
        self.server.stop(0)
        for o in self.owners.values():
            o.stop(0)


@pytest.fixture(scope="module")
def sockets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sockets]:
    s = Sockets(build_fed(tmp_path_factory.mktemp("fuzz-sockets")))
    yield s
    s.stop()


def _call(fn: Any, payload: bytes, stream: bool = False) -> tuple[grpc.StatusCode, Any]:
    try:
        out = list(fn(payload, timeout=10)) if stream else fn(payload, timeout=10)
        return grpc.StatusCode.OK, out
    except grpc.RpcError as exc:
        return exc.code(), exc.details()


def _socket_fuzz(s: Sockets, data: Any) -> None:
    ch = H.HypothesisChooser(data)
    mode = ch.int(0, 9)
    if mode <= 1:  # ModalityService of a real owner, as the coordinator
        method = H.choice(ch, ["GetInfo", "GetHead", "GetLogits", "StreamLogits"])
        payload = (
            ch.bytes(300)
            if mode == 0
            else H.mangle(
                ch,
                fusion_pb2.PredictRequest(
                    sample_ids=[H.draw_id(ch, s.pool) for _ in range(ch.int(0, 8))]
                ).SerializeToString(),  # field 1 = repeated string ids in every request
                ch.int(0, 3),
            )
        )
        if method == "StreamLogits":
            code, out = _call(s.owner_stream, payload, stream=True)
        else:
            code, out = _call(s.owner[method], payload)
        _record("hypothesis owner requests (sockets)")
        if code != grpc.StatusCode.OK:
            assert code in CLEAR_ERROR_CODES and out, (method, code, out)
        return
    # FusionService of a real coordinator, as a requester
    ids = [H.draw_id(ch, s.pool) for _ in range(ch.int(0, 10))]
    options = H.draw_options(ch, valid=ch.bool())
    method = H.choice(ch, ["Predict", "PredictStream", "GetModelInfo"])
    if method == "GetModelInfo":
        payload = ch.bytes(40)
    elif method == "Predict":
        payload = fusion_pb2.PredictRequest(sample_ids=ids, options=options).SerializeToString()
    else:
        chunk = ch.int(0, 8)
        payload = fusion_pb2.PredictStreamRequest(
            sample_ids=ids, options=options, chunk_size=chunk
        ).SerializeToString()
    payload = H.mangle(ch, payload, ch.int(0, 4)) if ch.bool() else payload
    _record("hypothesis fusion requests (sockets)")
    if method == "PredictStream":
        code, out = _call(s.stream, payload, stream=True)
    else:
        code, out = _call(s.fusion[method], payload)
    if code != grpc.StatusCode.OK:
        assert code in CLEAR_ERROR_CODES and out, (method, code, out)
        return
    if method == "Predict":
        request = fusion_pb2.PredictRequest.FromString(payload)
        predictions = fusion_pb2.PredictResponse.FromString(out).predictions
        verdict = s.reference.classify(
            list(request.sample_ids), answer_from_proto(predictions), request.options
        )
        assert verdict.ok, verdict.detail
    elif method == "PredictStream":
        request = fusion_pb2.PredictStreamRequest.FromString(payload)
        ids_all = list(request.sample_ids)
        size = min(int(request.chunk_size) or 4096, 64)
        for j, raw in enumerate(out):
            predictions = fusion_pb2.PredictStreamResponse.FromString(raw).predictions
            part = ids_all[j * size : (j + 1) * size]
            verdict = s.reference.classify(part, answer_from_proto(predictions), request.options)
            assert verdict.ok, verdict.detail


@_settings(SOCKET_FAST)
@given(data=st.data())
def test_requests_over_real_sockets(sockets: Sockets, data: Any) -> None:
    """Raw and structured request bytes to real mTLS servers: a clear status or a correct
    answer (checked against the library on the owners' logits)."""
    _socket_fuzz(sockets, data)


@pytest.mark.slow
@_settings(SOCKET_SLOW)
@given(data=st.data())
def test_requests_over_real_sockets_long(sockets: Sockets, data: Any) -> None:
    _socket_fuzz(sockets, data)
