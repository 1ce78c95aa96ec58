"""Target 1: FusionService requests (Predict, PredictStream, GetModelInfo) of a real
coordinator with two well-behaved fake owners."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np

from jacfusion_fed.reliability.reference import Reference
from jacfusion_fed.rpc.fusion_codec import answer_from_proto
from jacfusion_fed.rpc.jacfusion.v1 import (
    fusion_pb2,
    fusion_pb2_grpc,
)
from jacfusion_fed.rpc.policies import FUSION_SERVICE_POLICY
from jacfusion_fed.server.fusion_service import FusionServicer
from jacfusion_fed.server.predict_types import CoordinatorConfig

from .draw import MODALITIES, Chooser, Finding, K, a_float, choice
from .inprocess import InProcessServer, Outcome, check_clear
from .owners import CoordinatorHarness, good_stub, make_good_owners, pool_ids


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
            FUSION_SERVICE_POLICY,
        )
        self.calls = 0

    def close(self) -> None:
        self.harness.close()

    def run(
        self, method: str, request: bytes, role: str = "requester", *, must_answer: bool = False
    ) -> Outcome:
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
                decoded = answer_from_proto(predictions)
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
            sample_ids=ids,
            options=options,
            chunk_size=choice(ch, [0, 1, 3, 7, 64, 65, 2**32 - 1]),
        )
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
