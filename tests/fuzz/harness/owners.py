"""Fake owners for a real coordinator: well-behaved :class:`GoodOwner` data, a
:class:`FakeOwnerStub`, and :class:`CoordinatorHarness`, which injects the stubs through
``Coordinator(connect=...)``."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from jacfusion_fed.reliability.reference import OwnerSnapshot
from jacfusion_fed.rpc.jacfusion.v1 import modality_pb2
from jacfusion_fed.rpc.matrix import encode_matrix
from jacfusion_fed.rpc.tls import INSECURE
from jacfusion_fed.server.coordinator import Coordinator
from jacfusion_fed.server.owner_channel import OwnerChannel
from jacfusion_fed.server.predict_types import (
    CoordinatorConfig,
    OwnerEndpoint,
)

from .draw import MODALITIES, K


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
            self.modality,
            self.version,
            self.gram,
            self.class_counts,
            self.logits,
            self.owner or f"{self.modality}-co",
        )

    def info(self) -> modality_pb2.GetInfoResponse:
        return modality_pb2.GetInfoResponse(
            modality=self.modality,
            owner=self.owner or f"{self.modality}-co",
            model_version=self.version,
            num_classes=self.gram.shape[0],
            feature_dim=8,
            class_counts=[int(c) for c in self.class_counts],
            shareable_head_kinds=[modality_pb2.HEAD_KIND_GRAM],
        )

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
                sample_ids=known,
                logits=encode_matrix(values),
                unknown_sample_ids=[i for i in ids if i not in self.logits],
            ),
        )


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
