"""Fuzz harness shared by the atheris targets (``tests/fuzz/fuzz_*.py``) and the hypothesis
properties (``tests/test_reliability_fuzz.py``).

Everything runs in-process, through the same code a real server runs, minus the socket:

* :class:`InProcessServer` takes the handlers the generated ``add_*Servicer_to_server``
  registers, wraps them with the server's own :class:`AuthInterceptor` (so request bytes are
  parsed where the real server parses them, after authorisation) and calls them with raw
  request bytes and a :class:`FakeContext` presenting a real certificate of the deployment.
* :class:`FakeOwnerStub` stands in for an owner's ``ModalityService`` stub inside a real
  :class:`Coordinator`: it answers from a :class:`ReplySpec` (which a fuzzer draws), so the
  coordinator parses arbitrary owner replies exactly as it parses real ones.

Oracles: a call either returns a well-formed answer that the
:class:`~jacfusion_fed.reliability.Reference` classifies as ``correct``/``partial`` or aborts
with a clear status (not ``INTERNAL``/``UNKNOWN``); anything else (another exception, a hang,
a silently wrong answer) raises :class:`Finding`.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc
import numpy as np

from jacfusion_fed.clients.modality_service import ModalityServicer
from jacfusion_fed.clients.serve import owner_policy
from jacfusion_fed.reliability.reference import (
    CLEAR_ERROR_CODES,
    OwnerSnapshot,
    Reference,
    Verdict,
)
from jacfusion_fed.rpc.auth import AuthInterceptor
from jacfusion_fed.rpc.jacfusion.v1 import (
    fusion_pb2,
    fusion_pb2_grpc,
    modality_pb2,
    modality_pb2_grpc,
)
from jacfusion_fed.rpc.matrix import decode_matrix, encode_matrix
from jacfusion_fed.rpc.tls import INSECURE
from jacfusion_fed.server.coordinator import Coordinator
from jacfusion_fed.server.fusion_service import FusionServicer, decode_predictions
from jacfusion_fed.server.owner_channel import OwnerChannel
from jacfusion_fed.server.predict_types import (
    MAX_ABS_OWNER_VALUE,
    CoordinatorConfig,
    OwnerEndpoint,
    PredictError,
    PredictOptions,
)
from jacfusion_fed.server.serve import fusion_policy

K = 4
MODALITIES = ("audio", "image")
#: Longest a single in-process call may take before it counts as a hang.
HANG_S = 5.0


class Finding(AssertionError):
    """A crash, hang, imprecise status or silently wrong answer."""


# --- drawing values -------------------------------------------------------------------------


class Chooser(Protocol):
    def int(self, lo: int, hi: int) -> int: ...
    def bool(self) -> bool: ...
    def float(self) -> float: ...
    def bytes(self, max_len: int) -> bytes: ...
    def text(self, max_len: int) -> str: ...


def choice(ch: Chooser, items: Sequence[Any]) -> Any:
    return items[ch.int(0, len(items) - 1)]


class HypothesisChooser:
    """Draws through hypothesis' ``st.data()``."""

    def __init__(self, data: Any) -> None:
        from hypothesis import strategies as st

        self._d = data
        self._st = st

    def int(self, lo: int, hi: int) -> int:
        return int(self._d.draw(self._st.integers(lo, hi)))

    def bool(self) -> bool:
        return bool(self._d.draw(self._st.booleans()))

    def float(self) -> float:
        return float(self._d.draw(self._st.floats(allow_nan=True, allow_infinity=True)))

    def bytes(self, max_len: int) -> bytes:
        return bytes(self._d.draw(self._st.binary(max_size=max_len)))

    def text(self, max_len: int) -> str:
        return str(self._d.draw(self._st.text(max_size=max_len)))


class FdpChooser:
    """Draws through atheris' ``FuzzedDataProvider``."""

    def __init__(self, fdp: Any) -> None:
        self._f = fdp

    def int(self, lo: int, hi: int) -> int:
        return int(self._f.ConsumeIntInRange(lo, hi))

    def bool(self) -> bool:
        return bool(self._f.ConsumeBool())

    def float(self) -> float:
        return float(
            self._f.ConsumeRegularFloat() if self._f.ConsumeBool() else self._f.ConsumeFloat()
        )

    def bytes(self, max_len: int) -> bytes:
        return bytes(self._f.ConsumeBytes(self._f.ConsumeIntInRange(0, max_len)))

    def text(self, max_len: int) -> str:
        return str(self._f.ConsumeUnicodeNoSurrogates(self._f.ConsumeIntInRange(0, max_len)))


SPECIAL_FLOATS = (
    0.0, -0.0, 1.0, -1.0, 0.5, 1e-300, 5e-324, 1e300, -1e300, 1.7976931348623157e308,
    math.nan, math.inf, -math.inf, 1e-9, 1 - 1e-16, 1 + 1e-16, 2.0, 40.0, -40.0, 745.0,
)  # fmt: skip


def a_float(ch: Chooser) -> float:
    return choice(ch, SPECIAL_FLOATS) if ch.bool() else ch.float()


# --- in-process servers ---------------------------------------------------------------------


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class FakeContext:
    """The parts of ``grpc.ServicerContext`` the servicers and the interceptor use."""

    def __init__(self, pem: bytes | None, timeout: float | None = None) -> None:
        self._auth = {"transport_security_type": [b"ssl"]}
        if pem is not None:
            self._auth["x509_pem_cert"] = [pem]
        self._deadline = None if timeout is None else time.monotonic() + timeout

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(self._deadline - time.monotonic(), 0.0)

    def is_active(self) -> bool:
        return True

    def invocation_metadata(self) -> tuple[Any, ...]:
        return ()

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def set_code(self, code: Any) -> None:
        pass

    def set_details(self, details: Any) -> None:
        pass

    def add_callback(self, callback: Any) -> bool:
        return True


class _Capture:
    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.handlers.update({f"/{service}/{name}": h for name, h in handlers.items()})


class _Details:
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str = ""
    responses: list[Any] = field(default_factory=list)


class InProcessServer:
    """A servicer behind the real interceptor, called with raw request bytes."""

    def __init__(self, add: Callable[[Any, Any], None], servicer: Any, policy: Any) -> None:
        capture = _Capture()
        add(servicer, capture)
        self.handlers = capture.handlers
        self.interceptor = AuthInterceptor(policy)

    def call(
        self, method: str, request: bytes, pem: bytes | None, *, timeout: float | None = None
    ) -> Outcome:
        handler = self.interceptor.intercept_service(
            lambda d: self.handlers.get(d.method), _Details(method)
        )
        if handler is None:
            return Outcome(grpc.StatusCode.UNIMPLEMENTED, "unknown method")
        context = FakeContext(pem, timeout)
        if handler.request_deserializer is not None:
            try:  # what grpc itself does with bytes that do not parse
                message: Any = handler.request_deserializer(request)
            except Exception:
                return Outcome(grpc.StatusCode.INTERNAL, "Exception deserializing request!")
        else:
            message = request
        t0 = time.monotonic()
        try:
            if handler.unary_unary is not None:
                responses = [handler.unary_unary(message, context)]
            else:
                responses = list(handler.unary_stream(message, context))
        except Aborted as exc:
            return Outcome(exc.code, exc.details)
        finally:
            if time.monotonic() - t0 > HANG_S:
                raise Finding(f"{method} took {time.monotonic() - t0:.1f} s (hang)")
        out = []
        for r in responses:  # the real server serializes every response
            out.append(type(r).FromString(handler.response_serializer(r)))
        return Outcome(grpc.StatusCode.OK, "", out)


def check_clear(outcome: Outcome, what: str) -> None:
    if outcome.code != grpc.StatusCode.OK and (
        outcome.code not in CLEAR_ERROR_CODES or not outcome.details
    ):
        raise Finding(f"{what}: imprecise status {outcome.code.name}: {outcome.details!r}")


# --- fake owners for a real coordinator -----------------------------------------------------


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@dataclass
class GoodOwner:
    """A well-behaved owner: fixed logits for the ids it holds."""

    modality: str
    version: str
    gram: np.ndarray
    class_counts: np.ndarray
    logits: dict[str, np.ndarray]
    owner: str = ""

    def snapshot(self) -> OwnerSnapshot:
        return OwnerSnapshot(
            self.modality, self.version, self.gram, self.class_counts, self.logits,
            self.owner or f"{self.modality}-co",
        )  # fmt: skip

    def info(self) -> modality_pb2.GetInfoResponse:
        return modality_pb2.GetInfoResponse(
            modality=self.modality, owner=self.owner or f"{self.modality}-co",
            model_version=self.version, num_classes=self.gram.shape[0], feature_dim=8,
            class_counts=[int(c) for c in self.class_counts],
            shareable_head_kinds=[modality_pb2.HEAD_KIND_GRAM],
        )  # fmt: skip

    def head(self, request: Any) -> modality_pb2.GetHeadResponse:
        if request.expected_model_version and request.expected_model_version != self.version:
            raise FakeRpcError(grpc.StatusCode.FAILED_PRECONDITION, "version moved on")
        out = modality_pb2.GetHeadResponse(
            model_version=self.version, num_classes=self.gram.shape[0]
        )
        out.gram.gram.CopyFrom(encode_matrix(self.gram))
        return out

    def batch(self, ids: Sequence[str]) -> modality_pb2.GetLogitsResponse:
        known = [i for i in ids if i in self.logits]
        values = (
            np.stack([self.logits[i] for i in known]) if known else np.zeros((0, len(self.gram)))
        )
        return modality_pb2.GetLogitsResponse(
            model_version=self.version,
            batch=modality_pb2.LogitsBatch(
                sample_ids=known, logits=encode_matrix(values),
                unknown_sample_ids=[i for i in ids if i not in self.logits],
            ),
        )  # fmt: skip


class FakeOwnerStub:
    """``ModalityServiceStub`` look-alike answering from callables; records what it served."""

    def __init__(
        self,
        info: Callable[[Any], Any],
        head: Callable[[Any], Any],
        logits: Callable[[Any], Any],
    ) -> None:
        self._info, self._head, self._logits = info, head, logits
        self.served_logits: list[Any] = []
        self.served_heads: list[Any] = []
        self.served_infos: list[Any] = []

    def GetInfo(self, request: Any, timeout: float | None = None) -> Any:
        out = self._info(request)
        self.served_infos.append(out)
        return out

    def GetHead(self, request: Any, timeout: float | None = None) -> Any:
        out = self._head(request)
        self.served_heads.append(out)
        return out

    def GetLogits(self, request: Any, timeout: float | None = None) -> Any:
        out = self._logits(request)
        if isinstance(out, float):  # a late owner: gRPC gives up at the timeout
            time.sleep(min(out, timeout if timeout is not None else out))
            raise FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
        self.served_logits.append(out)
        return out


def make_good_owners(seed: int = 0, n: int = 24, k: int = K) -> dict[str, GoodOwner]:
    """Two owners over a pool of ``n`` hex ids: audio holds all but the last 3, image all but
    the first 2 (so some ids are held by one owner only)."""
    rng = np.random.default_rng(seed)
    ids = [f"{i:064x}" for i in range(1, n + 1)]
    held = {"audio": ids[: n - 3], "image": ids[2:]}
    owners = {}
    for j, m in enumerate(MODALITIES):
        w = rng.normal(size=(k, 6))
        owners[m] = GoodOwner(
            modality=m,
            version=f"{j + 1:016x}",
            gram=w @ w.T,
            class_counts=rng.integers(1, 50, size=k).astype(np.float64),
            logits={i: rng.normal(scale=3.0, size=k) for i in held[m]},
        )
    return owners


def pool_ids(owners: dict[str, GoodOwner]) -> list[str]:
    seen: dict[str, None] = {}
    for o in owners.values():
        seen.update(dict.fromkeys(o.logits))
    return sorted(seen)


class CoordinatorHarness:
    """A real :class:`Coordinator` over fake owner stubs (no sockets; INSECURE, so no TLS
    identity check), with its head registry in a temporary directory."""

    def __init__(
        self, stubs: dict[str, FakeOwnerStub], config: CoordinatorConfig | None = None
    ) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="jf-fuzz-", dir=_fast_tmp()))
        self.coordinator = Coordinator(
            self.tmp / "registry",
            [OwnerEndpoint(m, f"127.0.0.1:{9 + j}") for j, m in enumerate(stubs)],
            INSECURE,
            config or CoordinatorConfig(owner_timeout_s=0.25, registration_timeout_s=0.5),
            connect=lambda endpoint: OwnerChannel(stubs[endpoint.modality]),
        )

    def close(self) -> None:
        self.coordinator.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> CoordinatorHarness:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _fast_tmp() -> str | None:
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() else None


def good_stub(owner: GoodOwner) -> FakeOwnerStub:
    return FakeOwnerStub(
        lambda _r: owner.info(),
        owner.head,
        lambda r: owner.batch(list(r.sample_ids)),
    )


# --- target 1: FusionService requests -------------------------------------------------------


class FusionTarget:
    """FusionService (Predict, PredictStream, GetModelInfo) of a real coordinator whose two
    owners are well-behaved fakes; requests arrive as raw bytes through the interceptor."""

    METHODS = ("Predict", "PredictStream", "GetModelInfo")

    def __init__(self, pems: dict[str, bytes], *, max_batch: int = 64) -> None:
        self.owners = make_good_owners()
        self.ids = pool_ids(self.owners)
        self.pems = pems
        stubs = {m: good_stub(o) for m, o in self.owners.items()}
        self.harness = CoordinatorHarness(
            stubs,
            CoordinatorConfig(max_batch=max_batch, max_stream_batch=4 * max_batch, stream_chunk=7),
        )
        self.coordinator = self.harness.coordinator
        if self.coordinator.sync() != {m: "" for m in MODALITIES}:
            raise RuntimeError("fake owners did not register")
        self.reference = Reference([o.snapshot() for o in self.owners.values()])
        self.server = InProcessServer(
            fusion_pb2_grpc.add_FusionServiceServicer_to_server,
            FusionServicer(self.coordinator),
            fusion_policy(),
        )
        self.calls = 0

    def close(self) -> None:
        self.harness.close()

    def run(self, method: str, request: bytes, role: str = "requester",
            *, must_answer: bool = False) -> Outcome:  # fmt: skip
        """One call; raises :class:`Finding` on a crash, an imprecise status or a wrong answer.

        ``must_answer``: the request is valid and all its ids are held (an error is wrong).
        """
        self.calls += 1
        try:
            outcome = self.server.call(
                f"/jacfusion.v1.FusionService/{method}", request, self.pems[role]
            )
        except Finding:
            raise
        except Exception as exc:
            raise Finding(f"{method} crashed: {exc!r}") from exc
        check_clear(outcome, method)
        if role != "requester" and method != "GetModelInfo":
            if outcome.code != grpc.StatusCode.PERMISSION_DENIED:
                raise Finding(f"{role} called {method}: {outcome.code.name}")
            return outcome
        if outcome.code != grpc.StatusCode.OK:
            if must_answer:
                raise Finding(f"valid {method} refused: {outcome.code.name}: {outcome.details}")
            return outcome
        self._check_answer(method, request, outcome)
        return outcome

    def _check_answer(self, method: str, request: bytes, outcome: Outcome) -> None:
        if method == "GetModelInfo":
            (info,) = outcome.responses
            if info.num_classes != K or len(info.modalities) != len(MODALITIES):
                raise Finding(f"GetModelInfo: {info}")
            prior = np.exp(self.reference.log_prior())
            if np.abs(np.asarray(info.class_prior) - prior).max() > 1e-12:
                raise Finding("GetModelInfo: wrong class prior")
            return
        if method == "Predict":
            req = fusion_pb2.PredictRequest.FromString(request)
            chunks = [(list(req.sample_ids), outcome.responses[0].predictions)]
        else:
            req = fusion_pb2.PredictStreamRequest.FromString(request)
            ids = list(req.sample_ids)
            size = min(int(req.chunk_size) or 7, 64)
            parts = [ids[s : s + size] for s in range(0, len(ids), size)]
            if len(parts) != len(outcome.responses):
                raise Finding(f"PredictStream: {len(outcome.responses)} chunks for {len(parts)}")
            chunks = list(zip(parts, [r.predictions for r in outcome.responses], strict=True))
        for ids, predictions in chunks:
            try:
                decoded = decode_predictions(predictions)
            except ValueError as exc:
                raise Finding(f"{method}: malformed Predictions: {exc}") from exc
            verdict = self.reference.classify(ids, decoded, req.options)
            if not verdict.ok:
                raise Finding(f"{method}: {verdict.detail}")


def draw_id(ch: Chooser, pool: Sequence[str]) -> str:
    kind = ch.int(0, 9)
    if kind <= 5:
        return str(choice(ch, pool))
    if kind == 6:
        return ch.text(24)  # unicode, possibly empty
    if kind == 7:
        return "x" * choice(ch, [255, 256, 257, 4096])
    if kind == 8:
        return str(choice(ch, pool)).upper()  # looks like a pseudonym, is not one
    return "\u00e9\u0301\U0001f600" + ch.text(4)


def draw_options(ch: Chooser, *, valid: bool) -> fusion_pb2.FusionOptions:
    """FusionOptions; with ``valid`` only combinations the coordinator must accept."""
    opts = fusion_pb2.FusionOptions()
    names = list(MODALITIES)
    if valid:
        method = choice(ch, [0, 1, 2, 3, 4])
        opts.method = method
        selected = [m for m in names if ch.bool()] if ch.bool() else []
        opts.modalities.extend(selected)
        sel = selected or names
        if method in (0, 2):  # jacobian (the default)
            if ch.bool():
                opts.default_gamma = choice(ch, [1e-6, 0.1, 0.5, 0.9, 1.0])
            for m in sel:
                if ch.bool():
                    opts.gammas[m] = choice(ch, [0.05, 0.3, 1.0])
            if ch.bool():
                opts.regularize.extend([m for m in sel if ch.bool()])
            opts.iterations = ch.int(0, 3)
        opts.require_all = ch.bool()
        opts.skip_unknown_ids = ch.bool()
        if ch.bool():
            opts.owner_timeout.FromNanoseconds(ch.int(50, 2000) * 1_000_000)
        return opts
    opts.method = choice(ch, [0, 1, 2, 3, 4, 5, 99, 2**31 - 1, -1])
    for _ in range(ch.int(0, 3)):
        opts.modalities.append(choice(ch, [*names, "ecg", "", "AUDIO", ch.text(8)]))
    if ch.bool():
        opts.default_gamma = a_float(ch)
    for _ in range(ch.int(0, 3)):
        opts.gammas[choice(ch, [*names, "ecg", ch.text(6)])] = a_float(ch)
    for _ in range(ch.int(0, 3)):
        opts.regularize.append(choice(ch, [*names, "ecg", ch.text(6)]))
    opts.iterations = choice(ch, [0, 1, 2, 16, 17, 2**32 - 1])
    opts.require_all = ch.bool()
    opts.skip_unknown_ids = ch.bool()
    if ch.bool():
        opts.owner_timeout.seconds = choice(
            ch, [0, 1, -1, 3600, 3601, 10**10, 2**63 - 1, -(2**63), 315_576_000_000]
        )
        opts.owner_timeout.nanos = choice(ch, [0, 1, -1, 999_999_999, 2**31 - 1, -(2**31)])
    return opts


def draw_fusion_call(ch: Chooser, target: FusionTarget) -> tuple[str, bytes, str, bool]:
    """(method, request bytes, role, must_answer)."""
    method = choice(ch, FusionTarget.METHODS)
    role = "requester" if ch.int(0, 9) else choice(ch, ["owner", "coordinator"])
    mode = ch.int(0, 9)
    if mode == 0:  # raw garbage
        return method, ch.bytes(200), role, False
    valid = mode >= 5
    if valid:
        n = ch.int(1, 12)
        ids = [choice(ch, target.ids) for _ in range(n)]
        ids = list(dict.fromkeys(ids))
    else:
        ids = [draw_id(ch, target.ids) for _ in range(ch.int(0, 12))]
        if ch.int(0, 19) == 0:
            ids = [f"{i:064x}" for i in range(ch.int(60, 300))]  # over the limit
    options = draw_options(ch, valid=valid)
    if method == "Predict":
        msg: Any = fusion_pb2.PredictRequest(sample_ids=ids, options=options)
    elif method == "PredictStream":
        msg = fusion_pb2.PredictStreamRequest(
            sample_ids=ids, options=options,
            chunk_size=choice(ch, [0, 1, 3, 7, 64, 65, 2**32 - 1]),
        )  # fmt: skip
    else:
        msg = fusion_pb2.GetModelInfoRequest()
    data = mangle(ch, msg.SerializeToString(), mode)
    must = valid and role == "requester" and mode > 2 and _answerable(target, ids, options)
    return method, data, role, must


def mangle(ch: Chooser, data: bytes, mode: int) -> bytes:
    """Mode 1: truncated; mode 2: one byte flipped; otherwise unchanged."""
    if mode not in (1, 2) or not data:
        return data
    cut = ch.int(0, len(data) - 1)
    if mode == 1:
        return data[:cut]
    return data[:cut] + bytes([data[cut] ^ 0xFF]) + data[cut + 1 :]


def _answerable(target: FusionTarget, ids: list[str], options: Any) -> bool:
    """Whether a valid request must be answered: every id predictable (or skipped)."""
    if options.skip_unknown_ids:
        return True
    selected = list(options.modalities) or list(MODALITIES)
    held = [[i in target.owners[m].logits for m in selected] for i in ids]
    return all(all(h) if options.require_all else any(h) for h in held)


# --- target 2: ModalityService requests -----------------------------------------------------


class OwnerTarget:
    """A real owner's ModalityService (real workspace and model store) behind the interceptor."""

    METHODS = ("GetInfo", "GetHead", "GetLogits", "StreamLogits")

    def __init__(self, workspace: Any, pems: dict[str, bytes], *, max_batch: int = 64) -> None:
        self.workspace = workspace
        self.servicer = ModalityServicer(
            workspace, "audio-co", max_batch=max_batch, max_stream_batch=4 * max_batch,
            stream_chunk=5,
        )  # fmt: skip
        self.server = InProcessServer(
            modality_pb2_grpc.add_ModalityServiceServicer_to_server, self.servicer, owner_policy()
        )
        self.pems = pems
        self.version = workspace.current_version()
        self.ids = workspace.pseudonyms("train")[:20] + workspace.pseudonyms("test")[:20]
        answer = workspace.logits(self.ids)
        self.table = dict(zip(answer.sample_ids, answer.logits, strict=True))
        self.gram = workspace.head().gram
        self.calls = 0

    def run(self, method: str, request: bytes, role: str = "coordinator") -> Outcome:
        self.calls += 1
        try:
            outcome = self.server.call(
                f"/jacfusion.v1.ModalityService/{method}", request, self.pems[role]
            )
        except Finding:
            raise
        except Exception as exc:
            raise Finding(f"{method} crashed: {exc!r}") from exc
        check_clear(outcome, method)
        if role != "coordinator":
            if outcome.code != grpc.StatusCode.PERMISSION_DENIED:
                raise Finding(f"{role} called {method}: {outcome.code.name}")
            return outcome
        if outcome.code == grpc.StatusCode.OK:
            self._check_answer(method, request, outcome)
        return outcome

    def _check_answer(self, method: str, request: bytes, outcome: Outcome) -> None:
        if method == "GetInfo":
            (info,) = outcome.responses
            if (info.modality, info.model_version, info.num_classes) != (
                "audio", self.version, K,
            ):  # fmt: skip
                raise Finding(f"GetInfo: {info}")
            return
        if method == "GetHead":
            (head,) = outcome.responses
            got = decode_matrix(head.gram.gram, shape=(K, K))
            if head.model_version != self.version or not np.array_equal(got, self.gram):
                raise Finding("GetHead: wrong head")
            return
        cls = (
            modality_pb2.GetLogitsRequest
            if method == "GetLogits"
            else modality_pb2.StreamLogitsRequest
        )
        req = cls.FromString(request)
        ids = list(req.sample_ids)
        known, unknown, rows = [], [], []
        for r in outcome.responses:
            if r.model_version != self.version:
                raise Finding(f"{method}: version {r.model_version}")
            values = decode_matrix(r.batch.logits, shape=(len(r.batch.sample_ids), K))
            known += list(r.batch.sample_ids)
            unknown += list(r.batch.unknown_sample_ids)
            rows.append(values)
        if sorted(known + unknown) != sorted(ids):
            raise Finding(f"{method}: ids not accounted for")
        table = self.workspace.logits(known)
        got = np.concatenate(rows) if rows else np.zeros((0, K))
        if table.sample_ids != known or not np.array_equal(got, table.logits):
            raise Finding(f"{method}: logits differ from the workspace")
        if set(unknown) & set(self.workspace.logits(unknown).sample_ids):
            raise Finding(f"{method}: a held id reported unknown")


def draw_owner_call(ch: Chooser, target: OwnerTarget) -> tuple[str, bytes, str]:
    method = choice(ch, OwnerTarget.METHODS)
    role = "coordinator" if ch.int(0, 9) else choice(ch, ["owner", "requester"])
    mode = ch.int(0, 9)
    if mode == 0:
        return method, ch.bytes(200), role
    ids = [draw_id(ch, target.ids) for _ in range(ch.int(0, 12))]
    if ch.int(0, 19) == 0:
        ids = [f"{i:064x}" for i in range(ch.int(60, 300))]
    version = choice(ch, ["", target.version, "0" * 16, ch.text(20)])
    if method == "GetInfo":
        msg: Any = modality_pb2.GetInfoRequest()
    elif method == "GetHead":
        msg = modality_pb2.GetHeadRequest(
            kind=choice(ch, [0, 1, 2, 3, 2**31 - 1, -5]), expected_model_version=version
        )
    elif method == "GetLogits":
        msg = modality_pb2.GetLogitsRequest(sample_ids=ids, expected_model_version=version)
    else:
        msg = modality_pb2.StreamLogitsRequest(
            sample_ids=ids, expected_model_version=version,
            chunk_size=choice(ch, [0, 1, 2, 5, 64, 2**32 - 1]),
        )  # fmt: skip
    return method, mangle(ch, msg.SerializeToString(), mode), role


# --- target 3: owners' replies as the coordinator parses them --------------------------------


@dataclass
class ReplyPlan:
    """How the fuzzed owner (audio) answers; the image owner is always well-behaved.

    ``reasons`` lists what is wrong with the replies (filled in as they are produced, so only
    mutations that really happened count); a reply is well-formed when it is empty and the
    versions of GetInfo, GetHead and GetLogits agree.
    """

    info: Any  # GetInfoResponse | FakeRpcError
    head: Any  # GetHeadResponse | FakeRpcError
    logits: Callable[[list[str]], Any]  # ids -> GetLogitsResponse | FakeRpcError | float
    reasons: list[str]
    served_version: list[str] = field(default_factory=list)

    @property
    def versions(self) -> set[str]:
        out = set(self.served_version)
        for msg in (self.info, self.head):
            if not isinstance(msg, FakeRpcError):
                out.add(msg.model_version)
        return out

    @property
    def why(self) -> str:
        extra = ["versions differ"] if len(self.versions) > 1 else []
        return "; ".join(dict.fromkeys([*self.reasons, *extra]))

    @property
    def well_formed(self) -> bool:
        return not self.why


def _mangle_matrix(ch: Any, m: Any, mode: int, extra: bytes) -> str:
    """Damage a Matrix in place; returns what was done ('' for nothing)."""
    if mode == 0:
        m.data = m.data[:-1] if m.data else b"\x01"
        return "matrix data truncated"
    if mode == 1:
        m.data = m.data + (extra or b"\x00")
        return "matrix data padded"
    if mode == 2:
        m.rows = int(m.rows) + 1 + ch.int(0, 3)
        return "matrix rows"
    if mode == 3:
        m.cols = choice(ch, [0, 1, 3, 5, 2**32 - 1])
        return "matrix cols"
    if mode == 4:
        m.data = m.data[:-3] if len(m.data) >= 3 else b"\x01"
        return "matrix data odd length"
    return ""


class _FixedChooser:
    """Deterministic draws inside the reply callback (every reply of a plan is alike)."""

    def __init__(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)

    def int(self, lo: int, hi: int) -> int:
        return int(self._rng.integers(lo, hi + 1))


def draw_reply_plan(ch: Chooser, good: GoodOwner, *, allow_sleep: bool = True) -> ReplyPlan:
    """A (possibly malformed) behaviour of the audio owner."""
    reasons: list[str] = []
    k = K
    # GetInfo
    info_mode = ch.int(0, 9)
    if info_mode == 0:
        codes = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL,
                 grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNKNOWN]  # fmt: skip
        info: Any = FakeRpcError(choice(ch, codes), "owner down")
        reasons.append("info error")
    else:
        info = good.info()
        if info_mode == 1:
            info.modality = choice(ch, ["image", "", "Audio", ch.text(6)])
            if info.modality != "audio":
                reasons.append("info modality")
        elif info_mode == 2:
            info.num_classes = choice(ch, [0, 1, 3, 5, 2**32 - 1])
            reasons.append("info K")
        elif info_mode == 3:
            del info.class_counts[:]
            info.class_counts.extend([ch.int(0, 2**64 - 1) for _ in range(ch.int(0, 6))])
            if len(info.class_counts) != k:
                reasons.append("class counts")
        elif info_mode == 4:
            info.model_version = choice(ch, ["", "f" * 16, ch.text(10)])
            if not info.model_version:
                reasons.append("empty version")
    version = good.version if isinstance(info, FakeRpcError) else info.model_version
    # GetHead
    head_mode = ch.int(0, 15)  # 8..15: a plain Gram matrix
    if head_mode == 0:
        codes = [grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAVAILABLE]
        head: Any = FakeRpcError(choice(ch, codes), "no")
        reasons.append("head error")
    else:
        gram = good.gram.copy()
        head = modality_pb2.GetHeadResponse(model_version=version, num_classes=k)
        if head_mode == 1:
            gram[0, 1] += 1.0
            reasons.append("gram asymmetric")
        elif head_mode == 2:
            gram = -gram - np.eye(k)
            reasons.append("gram not PSD")
        elif head_mode == 3:
            gram[ch.int(0, k - 1), ch.int(0, k - 1)] = choice(ch, [math.nan, math.inf])
            reasons.append("gram non-finite")
        elif head_mode == 4:
            gram = gram * choice(ch, [0.0, 1e-300, 1e3, 1e6, 1e150, 1e300])
            if np.abs(gram).max() > MAX_ABS_OWNER_VALUE:
                reasons.append("gram out of range")
        matrix = encode_matrix(gram)
        what = _mangle_matrix(ch, matrix, ch.int(0, 19), ch.bytes(16))
        if what:
            reasons.append(f"gram {what}")
        if head_mode == 5:
            head.full.weight.CopyFrom(encode_matrix(np.ones((k, 3))))
            head.full.bias.CopyFrom(encode_matrix(np.ones(k)))
            reasons.append("full head")
        elif head_mode == 6:
            head.model_version = choice(ch, ["", "e" * 16])
            head.gram.gram.CopyFrom(matrix)
            reasons.append("head version")
        elif head_mode == 7:
            reasons.append("no head")
        else:
            head.gram.gram.CopyFrom(matrix)
    # GetLogits: everything drawn now, applied to each request's reply
    logit_mode = ch.int(0, 14)
    err_code = choice(
        ch, [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS,
             grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNKNOWN],
    )  # fmt: skip
    bad_value = choice(ch, [math.nan, math.inf, -math.inf])
    big_value = choice(ch, [1e308, -1e308, 1e-320, 745.2, -745.2, 1e15, 1e8, -1e8])
    pick = ch.int(0, 2**16)
    foreign = ch.text(10) or "zzz"
    resp_version = choice(ch, ["", "f" * 16, version])
    matrix_mode = ch.int(0, 4)
    extra = ch.bytes(16)
    sub = _FixedChooser(pick)
    plan = ReplyPlan(info, head, lambda ids: None, reasons)

    def logits(ids: list[str]) -> Any:
        if logit_mode == 0:
            plan.reasons.append("logits error")
            return FakeRpcError(err_code, "owner failed")
        if logit_mode == 1 and allow_sleep:
            plan.reasons.append("late")
            return 0.6  # seconds: past the 0.25 s owner timeout
        resp = good.batch(ids)
        resp.model_version = version
        b = resp.batch
        n = len(b.sample_ids)
        rng = np.random.default_rng(pick)
        if logit_mode == 2 and n:
            values = decode_matrix(b.logits)
            values.flat[rng.integers(0, values.size)] = bad_value
            b.logits.CopyFrom(encode_matrix(values))
            plan.reasons.append("non-finite logits")
        elif logit_mode == 3 and n:  # extreme but finite: legal up to the bound
            values = decode_matrix(b.logits)
            values.flat[rng.integers(0, values.size)] = big_value
            b.logits.CopyFrom(encode_matrix(values))
            if abs(big_value) > MAX_ABS_OWNER_VALUE:
                plan.reasons.append("logits out of range")
        elif logit_mode == 4:
            resp.model_version = resp_version
        elif logit_mode == 5 and n > 1:  # rows in another order than the ids: legal
            b.logits.CopyFrom(encode_matrix(decode_matrix(b.logits)[::-1]))
        elif logit_mode == 6 and n:
            b.sample_ids.append(b.sample_ids[0])
            plan.reasons.append("id listed twice")
        elif logit_mode == 7 and n:
            b.sample_ids[0] = foreign
            plan.reasons.append("id not requested")
        elif logit_mode == 8 and n:
            b.unknown_sample_ids.append(b.sample_ids[0])
            plan.reasons.append("held id also unknown")
        elif logit_mode == 9 and n > 1:  # ids (with their rows) in another order: legal
            order = rng.permutation(n)
            values = decode_matrix(b.logits)[order]
            ids_now = [b.sample_ids[i] for i in order]
            del b.sample_ids[:]
            b.sample_ids.extend(ids_now)
            b.logits.CopyFrom(encode_matrix(values))
        elif logit_mode == 10:
            what = _mangle_matrix(sub, b.logits, matrix_mode, extra)
            if what == "matrix cols" and b.logits.cols == K:
                what = ""
            if not n:
                what = ""  # no known id: the coordinator reads no logits (harmless)
            if what:
                plan.reasons.append(f"logits {what}")
        plan.served_version.append(resp.model_version)
        return resp

    plan.logits = logits
    return plan


class ReplyTarget:
    """The coordinator parsing one fuzzed owner (audio) next to a well-behaved one (image)."""

    #: Codes a Predict may fail with when every selected owner failed (fusion.proto).
    ALL_FAILED_CODES = frozenset(
        {
            grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.DATA_LOSS, grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.ABORTED,
        }
    )  # fmt: skip
    #: Malformations that the coordinator may accept without harm.
    HARMLESS = frozenset({"gram extreme", "late", "logits error"})

    def __init__(self) -> None:
        self.owners = make_good_owners(seed=1)
        self.ids = pool_ids(self.owners)
        self.calls = 0

    def run(self, ch: Chooser, *, allow_sleep: bool = True) -> str:
        """One fuzzed exchange; returns the verdict label; raises :class:`Finding`."""
        self.calls += 1
        plan = draw_reply_plan(ch, self.owners["audio"], allow_sleep=allow_sleep)

        def answer(x: Any) -> Any:
            if isinstance(x, FakeRpcError):
                raise x
            return x

        audio = FakeOwnerStub(
            lambda _r: answer(plan.info),
            lambda _r: answer(plan.head),
            lambda r: answer(plan.logits(list(r.sample_ids))),
        )
        image = good_stub(self.owners["image"])
        only_audio = ch.int(0, 3) == 0
        pool = list(self.owners["audio" if only_audio else "image"].logits)
        ids = list(dict.fromkeys(choice(ch, pool) for _ in range(ch.int(1, 10))))
        method = choice(ch, ["jacobian", "statistical", "mean", "confidence_mean"])
        options = PredictOptions(
            method=method, skip_unknown_ids=True, modalities=("audio",) if only_audio else ()
        )
        with CoordinatorHarness({"audio": audio, "image": image}) as h:
            c = h.coordinator
            t0 = time.monotonic()
            try:
                result = c.predict(ids, options)
                error: PredictError | None = None
            except PredictError as exc:
                result, error = None, exc
            except Exception as exc:
                raise Finding(f"predict crashed ({plan.why}): {exc!r}") from exc
            if time.monotonic() - t0 > HANG_S:
                raise Finding(f"predict took {time.monotonic() - t0:.1f} s ({plan.why})")
            if error is not None:
                if not only_audio:  # image answers and holds every id: must be answered
                    raise Finding(f"predict failed ({plan.why}): {error}")
                if plan.well_formed:
                    raise Finding(f"well-formed audio refused: {error}")
                if error.code not in self.ALL_FAILED_CODES or not error.message:
                    raise Finding(f"imprecise status {error.code.name} ({plan.why}): {error}")
                return f"error:{error.code.name}"
            return self._judge(ids, result, options, plan, audio, c)

    def _judge(self, ids: list[str], result: Any, options: PredictOptions, plan: ReplyPlan,
               audio: FakeOwnerStub, c: Coordinator) -> str:  # fmt: skip
        contrib = {m.modality: m for m in result.modalities}
        audio_used = "audio" in contrib and not contrib["audio"].error
        if audio_used and not set(plan.why.split("; ")) <= self.HARMLESS | {""}:
            raise Finding(f"accepted a malformed audio reply ({plan.why})")
        if not audio_used and plan.well_formed:
            raise Finding(f"refused a well-formed audio reply: {contrib['audio'].error}")
        # The reference: what the owners actually served (audio: the head the coordinator
        # registered, which must be the served one, and the logits of its last reply).
        head = c.head("audio")
        table: dict[str, np.ndarray] = {}
        if audio_used:
            if head is None:
                raise Finding("audio used without a registered head")
            served_gram = decode_matrix(plan.head.gram.gram, shape=(K, K))
            if not np.array_equal(head.record.gram_matrix(), served_gram):
                raise Finding("registered Gram matrix differs from the one served")
            served = audio.served_logits[-1]
            if served.batch.sample_ids:  # (no known id: the logits field is not read)
                values = decode_matrix(served.batch.logits)
                table = dict(zip(served.batch.sample_ids, values, strict=True))
        audio_snap = OwnerSnapshot(
            "audio",
            head.version if head is not None else "",
            head.record.gram_matrix() if head is not None else self.owners["audio"].gram,
            np.asarray(head.record.class_counts if head is not None else np.zeros(K), float),
            table,
        )  # fmt: skip
        reference = Reference(
            [audio_snap, self.owners["image"].snapshot()],
            prior_modalities=["audio", "image"] if head is not None else ["image"],
        )
        verdict: Verdict = reference.classify(ids, result, options)
        if not verdict.ok:
            raise Finding(f"{verdict.detail} ({plan.why or 'well-formed'})")
        return verdict.label


# --- certificates ---------------------------------------------------------------------------


def deployment_pems(root: Path) -> dict[str, bytes]:
    """Certificates (PEM) of one requester, one owner and the coordinator of a new CA."""
    from jacfusion_fed.privacy.certs import generate_deployment_certs

    certs = generate_deployment_certs(root, {"audio-co": "audio"}, ["alice"])
    return {
        "requester": (certs.requester_dirs["alice"] / "cert.pem").read_bytes(),
        "owner": (certs.owner_dirs["audio-co"] / "cert.pem").read_bytes(),
        "coordinator": (certs.coordinator_dir / "cert.pem").read_bytes(),
    }


def tiny_workspace(root: Path) -> Any:
    """A trained owner workspace (audio, K=4, 240 records) for the owner target."""
    from jacfusion_fed.bench.serve import ServeBenchConfig, make_dataset
    from jacfusion_fed.owner import OwnerWorkspace
    from jacfusion_fed.privacy.pseudonyms import Pseudonymizer, generate_key

    root.mkdir(parents=True, exist_ok=True)
    data = make_dataset(root, ServeBenchConfig(samples=240, classes=K, features=8))
    ws = OwnerWorkspace(root / "ws", "audio", f"npz:{data['audio']}", Pseudonymizer(generate_key()))
    ws.train(epochs=1, seed=0)
    ws.logits(ws.pseudonyms("train"))  # fill the logit cache
    return ws


def time_budget(seconds: float) -> Iterator[int]:
    """0, 1, 2, ... until ``seconds`` have passed."""
    t0 = time.monotonic()
    i = 0
    while time.monotonic() - t0 < seconds:
        yield i
        i += 1
