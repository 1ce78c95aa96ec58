"""Accountable access: a tamper-evident audit trail of every call that touches patient data
or a model (``owner serve``, ``coordinator serve``, the Flower ServerApp, and the owner's
``import-model`` and ``rekey`` commands).

- :mod:`.chain`: the line format (canonical JSON) and the hash chain across rotated files;
- :mod:`.log`: :class:`AuditLog`, the writer (locking, durability, rotation, checkpoints,
  refusal on a full disk);
- :mod:`.signing`: checkpoints signed with the service's TLS key;
- :mod:`.events`: what an access entry says (pseudonyms only, never raw ids or data);
- :mod:`.interceptor`: the gRPC server interceptor;
- :mod:`.verify` and :mod:`.show`: ``jacfusion-fed audit verify`` / ``audit show``.
"""

from __future__ import annotations

from .chain import GENESIS, segments
from .events import Peer, access_fields, local_peer, service_identity
from .log import AuditLog, AuditUnavailable, Rotation
from .show import accesses, pseudonyms_of
from .signing import Signer, load_cert
from .verify import Problem, VerifyReport, verify

__all__ = [
    "GENESIS",
    "AuditLog",
    "AuditUnavailable",
    "Peer",
    "Problem",
    "Rotation",
    "Signer",
    "VerifyReport",
    "access_fields",
    "accesses",
    "load_cert",
    "local_peer",
    "pseudonyms_of",
    "segments",
    "service_identity",
    "verify",
]
