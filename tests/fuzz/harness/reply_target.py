"""Target 3: owners' replies as the coordinator parses them."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from jacfusion_fed.reliability.reference import (
    OwnerSnapshot,
    Reference,
    Verdict,
)
from jacfusion_fed.rpc.fusion_codec import PredictOptions
from jacfusion_fed.rpc.jacfusion.v1 import modality_pb2
from jacfusion_fed.rpc.matrix import decode_matrix, encode_matrix
from jacfusion_fed.server.coordinator import Coordinator
from jacfusion_fed.server.predict_types import (
    MAX_ABS_OWNER_VALUE,
    PredictError,
)

from .draw import HANG_S, Chooser, Finding, K, choice
from .owners import (
    CoordinatorHarness,
    FakeOwnerStub,
    FakeRpcError,
    GoodOwner,
    good_stub,
    make_good_owners,
    pool_ids,
)


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
        codes = [
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.INTERNAL,
            grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.UNKNOWN,
        ]
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
        ch,
        [
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.INTERNAL,
            grpc.StatusCode.DATA_LOSS,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.UNKNOWN,
        ],
    )
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
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.DATA_LOSS,
            grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.ABORTED,
        }
    )
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

    def _judge(
        self,
        ids: list[str],
        result: Any,
        options: PredictOptions,
        plan: ReplyPlan,
        audio: FakeOwnerStub,
        c: Coordinator,
    ) -> str:
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
        )
        reference = Reference(
            [audio_snap, self.owners["image"].snapshot()],
            prior_modalities=["audio", "image"] if head is not None else ["image"],
        )
        verdict: Verdict = reference.classify(ids, result, options)
        if not verdict.ok:
            raise Finding(f"{verdict.detail} ({plan.why or 'well-formed'})")
        return verdict.label
