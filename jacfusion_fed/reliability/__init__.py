"""Reliability tooling: the correctness oracle, a fault-injecting loopback TCP proxy and a
bounded load generator (behind ``jacfusion-fed bench load``).

* :mod:`.reference` -- what a fused answer must be: the fusion library called directly on the
  logits, heads and class counts the owners serve (read through ``ModalityService`` as the
  coordinator does, or from their workspaces), and a classifier for every answer of the
  coordinator: ``correct``, ``partial`` (a modality left out *and said so*), ``error`` (a
  precise gRPC status) or ``neither`` (anything else; must never happen).
* :mod:`.proxy` -- :class:`FaultProxy`, a TCP proxy on 127.0.0.1 that delays, stalls
  (blackholes), drops chunks of, or cuts the connections it carries.
* :mod:`.load` -- :func:`run_load`, a fixed number of requests from many concurrent clients,
  every answer classified, with latency percentiles and the coordinator's RSS from /proc.
"""

from __future__ import annotations

from .load import LoadConfig, LoadResult, rss_bytes, run_load
from .proxy import FaultProxy
from .reference import (
    CLEAR_ERROR_CODES,
    TOLERANCE,
    OwnerSnapshot,
    Reference,
    Verdict,
    snapshot_owner,
    snapshot_workspace,
)

__all__ = [
    "CLEAR_ERROR_CODES",
    "TOLERANCE",
    "FaultProxy",
    "LoadConfig",
    "LoadResult",
    "OwnerSnapshot",
    "Reference",
    "Verdict",
    "rss_bytes",
    "run_load",
    "snapshot_owner",
    "snapshot_workspace",
]
