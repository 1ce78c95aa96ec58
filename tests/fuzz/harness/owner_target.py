"""Target 2: ModalityService requests of a real owner servicer."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np

from jacfusion_fed.clients.modality_service import ModalityServicer
from jacfusion_fed.rpc.jacfusion.v1 import (
    modality_pb2,
    modality_pb2_grpc,
)
from jacfusion_fed.rpc.matrix import decode_matrix
from jacfusion_fed.rpc.policies import MODALITY_SERVICE_POLICY

from .draw import Chooser, Finding, K, choice
from .fusion_target import draw_id, mangle
from .inprocess import InProcessServer, Outcome, check_clear


class OwnerTarget:
    """A real owner's ModalityService (real workspace and model store) behind the interceptor."""

    METHODS = ("GetInfo", "GetHead", "GetLogits", "StreamLogits")

    def __init__(self, workspace: Any, pems: dict[str, bytes], *, max_batch: int = 64) -> None:
        self.workspace = workspace
        self.servicer = ModalityServicer(
            workspace,
            "audio-co",
            max_batch=max_batch,
            max_stream_batch=4 * max_batch,
            stream_chunk=5,
        )
        self.server = InProcessServer(
            modality_pb2_grpc.add_ModalityServiceServicer_to_server,
            self.servicer,
            MODALITY_SERVICE_POLICY,
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
                "audio",
                self.version,
                K,
            ):
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
            sample_ids=ids,
            expected_model_version=version,
            chunk_size=choice(ch, [0, 1, 2, 5, 64, 2**32 - 1]),
        )
    return method, mangle(ch, msg.SerializeToString(), mode), role
