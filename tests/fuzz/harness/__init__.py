"""Fuzz harness (one module per target) shared by the atheris targets
(``tests/fuzz/fuzz_*.py``) and the hypothesis properties (``tests/test_reliability_fuzz.py``).

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

Modules: :mod:`.draw` (choosers), :mod:`.inprocess` (servers without sockets), :mod:`.owners`
(fake owners, :class:`CoordinatorHarness`), one module per target (:mod:`.fusion_target`,
:mod:`.owner_target`, :mod:`.reply_target`) and :mod:`.deployment` (certificates, workspace).
"""

from __future__ import annotations

from .deployment import deployment_pems, time_budget, tiny_workspace
from .draw import (
    HANG_S,
    MODALITIES,
    SPECIAL_FLOATS,
    Chooser,
    FdpChooser,
    Finding,
    HypothesisChooser,
    K,
    a_float,
    choice,
)
from .fusion_target import FusionTarget, draw_fusion_call, draw_id, draw_options, mangle
from .inprocess import Aborted, FakeContext, InProcessServer, Outcome, check_clear
from .owner_target import OwnerTarget, draw_owner_call
from .owners import (
    CoordinatorHarness,
    FakeOwnerStub,
    FakeRpcError,
    GoodOwner,
    good_stub,
    make_good_owners,
    pool_ids,
)
from .reply_target import ReplyPlan, ReplyTarget, draw_reply_plan

__all__ = [
    "HANG_S",
    "MODALITIES",
    "SPECIAL_FLOATS",
    "Aborted",
    "Chooser",
    "CoordinatorHarness",
    "FakeContext",
    "FakeOwnerStub",
    "FakeRpcError",
    "FdpChooser",
    "Finding",
    "FusionTarget",
    "GoodOwner",
    "HypothesisChooser",
    "InProcessServer",
    "K",
    "Outcome",
    "OwnerTarget",
    "ReplyPlan",
    "ReplyTarget",
    "a_float",
    "check_clear",
    "choice",
    "deployment_pems",
    "draw_fusion_call",
    "draw_id",
    "draw_options",
    "draw_owner_call",
    "draw_reply_plan",
    "good_stub",
    "make_good_owners",
    "mangle",
    "pool_ids",
    "time_budget",
    "tiny_workspace",
]
