"""What an ``access`` entry says, built in one place for every writer (gRPC interceptor, the
Flower ServerApp, the owner's CLI commands).

Fields: ``event`` (the RPC's short name, e.g. ``GetLogits``, or the action: ``ImportModel``,
``Rekey``, ``RegisterHead``, ``flower:query``), ``rpc`` (the full gRPC method, or null),
``peer`` (who asked: certificate CN, role, modality and SHA-256 fingerprint; for local CLI
commands the operating-system user and host), ``n_ids`` (ids in the request),
``pseudonyms`` (those ids, deduplicated, and only those that are pseudonyms: a raw id is never
written, only counted in ``n_not_pseudonym``), ``model_versions`` (modality -> version),
``status`` (gRPC status name, ``OK`` or the error), ``trace_id`` (the request's trace id when
it carries one, else null) and ``detail`` (small counts, never inputs, logits or raw ids).
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from jacfusion_fed.privacy.pseudonyms import is_pseudonym

from .log import AuditLog, AuditUnavailable

__all__ = ["Peer", "access_fields", "head_registrations", "local_peer", "service_identity"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Peer:
    """Who made a call: from its certificate (or the local user for CLI commands)."""

    cn: str | None
    role: str | None = None
    modality: str | None = None
    fingerprint: str | None = None
    node_id: int | None = None
    user: str | None = None
    host: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if v is not None}


def local_peer() -> Peer:
    """The operator running a CLI command on this machine (user name and host)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return Peer(cn=None, role="operator", user=user, host=socket.gethostname())


def service_identity(role: str, name: str, modality: str | None = None) -> dict[str, str]:
    """The ``service`` field: who writes the log."""
    out = {"role": role, "name": name}
    if modality:
        out["modality"] = modality
    return out


def _pseudonyms(ids: Iterable[object]) -> tuple[int, list[str], int]:
    seen: dict[str, None] = {}
    n = bad = 0
    for value in ids:
        n += 1
        if is_pseudonym(value):
            seen.setdefault(str(value), None)
        else:
            bad += 1
    return n, list(seen), bad


def access_fields(
    event: str,
    *,
    peer: Peer,
    rpc: str | None = None,
    ids: Iterable[object] = (),
    model_versions: Mapping[str, str] | None = None,
    status: str = "OK",
    trace_id: str | None = None,
    detail: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The fields of one ``access`` entry (see the module docstring)."""
    n, pseudonyms, bad = _pseudonyms(ids)
    fields: dict[str, Any] = {
        "event": event,
        "rpc": rpc,
        "peer": peer.to_json(),
        "n_ids": n,
        "pseudonyms": pseudonyms,
        "model_versions": {str(k): str(v) for k, v in (model_versions or {}).items() if v},
        "status": status,
        "trace_id": trace_id,
    }
    if bad:
        fields["n_not_pseudonym"] = bad
    if detail:
        fields["detail"] = dict(detail)
    return fields


def head_registrations(
    audit: AuditLog, current: Callable[[], Mapping[str, tuple[str, str]]]
) -> Callable[[], None]:
    """A listener for head changes: logs ``RegisterHead`` (modality, owner, version) for
    every head ``current()`` (modality -> (owner, version)) shows that it did not before.
    Heads present when it is made (loaded from the registry) are not logged again."""
    seen = dict(current())
    lock = threading.Lock()

    def listener() -> None:
        with lock:
            for modality, (owner, version) in sorted(current().items()):
                if seen.get(modality) == (owner, version):
                    continue
                seen[modality] = (owner, version)
                try:
                    audit.access(
                        access_fields(
                            "RegisterHead",
                            peer=Peer(owner, "owner", modality),
                            model_versions={modality: version},
                        )
                    )
                except AuditUnavailable as exc:  # registered already; say it was not logged
                    log.error("head registration of %r not recorded: %s", modality, exc)

    return listener
