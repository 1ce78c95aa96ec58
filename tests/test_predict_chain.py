"""The online path stays a straight line: a real ``Predict`` (in-process gRPC FusionService over
fake owners) reaches ``jacobian_fusion`` through at most five project frames, and exactly
through the chain that ``docs/architecture.md`` shows (file and function per hop)."""

from __future__ import annotations

import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from jacfusion_fed.fusion.jacobian import jacobian_fusion
from jacfusion_fed.rpc.jacfusion.v1 import fusion_pb2, fusion_pb2_grpc
from jacfusion_fed.rpc.tls import INSECURE, create_channel
from jacfusion_fed.server.predict_types import CoordinatorConfig
from jacfusion_fed.server.serve import serve_coordinator

sys.path.insert(0, str(Path(__file__).parent / "fuzz"))
import harness as H

ROOT = Path(__file__).resolve().parents[1]
#: Most project frames between the servicer's Predict and the solver (issue 24).
MAX_HOPS = 5


def _where(frame: FrameType) -> str:
    """``path/in/repo.py:Qualified.name`` of a frame (paths of the repository's own files)."""
    code = frame.f_code
    path = Path(code.co_filename).resolve()
    rel = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name
    return f"{rel}:{getattr(code, 'co_qualname', code.co_name)}"


def _is_project(frame: FrameType) -> bool:
    path = Path(frame.f_code.co_filename).resolve()
    return path.is_relative_to(ROOT) and ".venv" not in path.parts


def _documented_chain() -> list[str]:
    """The chain in docs/architecture.md: the ``file.py:function`` lines of its chain block."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- predict-chain -->\s*```text\n(.*?)```", text, re.S)
    assert block, "docs/architecture.md lost its predict-chain block"
    return re.findall(r"^\s*\d+\.\s+(\S+\.py:\S+)", block.group(1), re.M)


@pytest.fixture
def served() -> Iterator[tuple[fusion_pb2_grpc.FusionServiceStub, list[str]]]:
    owners = H.make_good_owners()
    stubs = {m: H.good_stub(o) for m, o in owners.items()}
    with H.CoordinatorHarness(stubs, CoordinatorConfig()) as h:
        assert h.coordinator.sync() == {m: "" for m in owners}
        server = serve_coordinator(h.coordinator, INSECURE, port=0, sync=False)
        channel = create_channel(f"127.0.0.1:{server.port}", INSECURE)
        both = [i for i in H.pool_ids(owners) if all(i in o.logits for o in owners.values())]
        try:
            yield fusion_pb2_grpc.FusionServiceStub(channel), both
        finally:
            channel.close()
            server.stop(0)


def _stacks_at_solver(run: Any) -> list[list[FrameType]]:
    """Run ``run()`` and return the stack (outermost first) of every call of the solver,
    on whatever thread it ran (gRPC's handler threads are started after the hook is set)."""
    stacks: list[list[FrameType]] = []
    target = jacobian_fusion.__code__

    def hook(frame: FrameType, event: str, _arg: Any) -> None:
        if event == "call" and frame.f_code is target:
            chain, f = [], frame
            while f is not None:
                chain.append(f)
                f = f.f_back  # type: ignore[assignment]
            stacks.append(chain[::-1])

    threading.setprofile(hook)
    sys.setprofile(hook)
    try:
        run()
    finally:
        sys.setprofile(None)
        threading.setprofile(None)  # type: ignore[arg-type]
    return stacks


def _hops(stack: list[FrameType]) -> list[str]:
    """The project frames from the servicer's Predict to the solver, both included."""
    names = [_where(f) for f in stack]
    start = max(
        i for i, n in enumerate(names) if n == "server/fusion_service.py:FusionServicer.Predict"
    )
    return [names[i] for i in range(start, len(stack)) if _is_project(stack[i])]


def test_predict_reaches_the_solver_in_a_straight_line(
    served: tuple[fusion_pb2_grpc.FusionServiceStub, list[str]],
) -> None:
    stub, ids = served
    request = fusion_pb2.PredictRequest(sample_ids=ids[:4])
    stacks = _stacks_at_solver(lambda: stub.Predict(request, timeout=30))
    assert len(stacks) == 1
    hops = _hops(stacks[0])
    assert len(hops) - 2 <= MAX_HOPS, hops
    assert hops == _documented_chain(), "docs/architecture.md shows another chain"


def test_batched_requests_still_fuse_under_a_predict(
    served: tuple[fusion_pb2_grpc.FusionServiceStub, list[str]],
) -> None:
    """Leader/follower batching: whichever request fuses the batch, the solver runs on the
    thread of a Predict, through the same chain."""
    stub, ids = served
    errors: list[BaseException] = []

    def many() -> None:
        def one(j: int) -> None:
            try:
                for _ in range(5):
                    stub.Predict(fusion_pb2.PredictRequest(sample_ids=ids[j : j + 3]), timeout=30)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=one, args=(j,)) for j in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)

    stacks = _stacks_at_solver(many)
    assert not errors, errors[0]
    assert 1 <= len(stacks) <= 20
    for stack in stacks:
        assert _hops(stack) == _documented_chain()
