"""Messages of the coordinator's flow (:mod:`jacfusion_fed.server.federated`) to the owners.

:class:`_Exchange` sends one message per node and checks every reply by `check_reply_allowed`
against the allow-list of its message (:mod:`jacfusion_fed.federation.protocol`) before
anything reads it; a reply with any other record, field, dtype or shape is rejected and the
run fails naming it (:class:`CoordinatorError`, the error of every step of the flow).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from jacfusion_fed.audit import AuditLog, Peer, access_fields
from jacfusion_fed.federation import (
    NOT_ALLOWED_CODE,
    RecordSpec,
    ReplyError,
    ReplyNotAllowedError,
    check_reply_allowed,
    error_code_name,
    send_and_collect,
)
from jacfusion_fed.federation.protocol import app_error_name

__all__ = ["CoordinatorError", "OwnerInfo"]


class CoordinatorError(RuntimeError):
    """The run cannot go on (an owner failed or sent something not allowed, bad config)."""


# ------------------------------------------------------------------------ messaging
@dataclass(frozen=True)
class OwnerInfo:
    node_id: int
    modality: str
    owner: str
    num_classes: int
    version: str
    model_spec: dict[str, Any]


@dataclass
class _Exchange:
    """Sends one message per node and checks every reply against that node's allow-list."""

    grid: Grid
    timeout: float
    owners: dict[int, OwnerInfo] = field(default_factory=dict)
    replies_checked: int = 0
    record_names: set[str] = field(default_factory=set)
    round_trips: int = 0
    audit: AuditLog | None = None

    def record(self, node_id: int, event: str, request: RecordDict, **fields: Any) -> None:
        """One audit entry for a message to ``node_id`` (no-op without an audit log): the
        owner (its name, modality and node id: Flower gives the ServerApp no certificate)
        and the pseudonyms of a query."""
        if self.audit is None:
            return
        info = self.owners.get(node_id)
        peer = Peer(info.owner if info else None, "owner", info.modality if info else None)
        query = request.get("query") if "query" in request else None
        ids = query.get("sample-ids", []) if isinstance(query, ConfigRecord) else []
        fields.setdefault("detail", {})["node_id"] = node_id
        self.audit.access(access_fields(f"flower:{event}", peer=peer, ids=ids, **fields))  # type: ignore[arg-type]

    def who(self, node_id: int) -> str:
        info = self.owners.get(node_id)
        return f"node {node_id}" + (f" ({info.owner}, {info.modality})" if info else "")

    def __call__(
        self,
        what: str,
        outgoing: Mapping[int, tuple[Message, Mapping[str, RecordSpec], Mapping[str, int]]],
    ) -> dict[int, RecordDict]:
        if not outgoing:
            return {}
        self.round_trips += 1
        raw = send_and_collect(
            self.grid, [m for m, _, _ in outgoing.values()], self.timeout, on_error="return"
        )
        good: dict[int, RecordDict] = {}
        errors: dict[int, ReplyError] = {}
        for node_id, reply in raw.items():
            if isinstance(reply, ReplyError):
                errors[node_id] = reply
                continue
            _, allowed, dims = outgoing[node_id]
            try:  # nothing reads a reply before this check
                check_reply_allowed(reply, allowed, dims)
            except ReplyNotAllowedError as exc:
                errors[node_id] = ReplyError(node_id, what, NOT_ALLOWED_CODE, str(exc))
                continue
            self.replies_checked += 1
            self.record_names.update(reply.keys())
            good[node_id] = reply
        for node_id, (msg, _, _) in outgoing.items():
            reply_info = good[node_id].get("info") if node_id in good else None
            version = reply_info.get("version", "") if isinstance(reply_info, ConfigRecord) else ""
            info = self.owners.get(node_id)
            self.record(
                node_id,
                msg.metadata.message_type,
                msg.content,
                model_versions={info.modality if info else "model": str(version)},
                status="OK" if node_id in good else errors_name(errors.get(node_id)),
            )
        if errors:
            lines = []
            for node_id, err in sorted(errors.items()):
                name = app_error_name(err.code) if err.code >= 100 else error_code_name(err.code)
                lines.append(f"  - {self.who(node_id)}: {name} [{err.code}]: {err.reason}")
            raise CoordinatorError(
                f"{what}: {len(errors)} of {len(outgoing)} owners failed:\n" + "\n".join(lines)
            )
        return good


def errors_name(err: ReplyError | None) -> str:
    if err is None:
        return "UNKNOWN"
    return app_error_name(err.code) if err.code >= 100 else error_code_name(err.code)


def _message(node_id: int, message_type: str, content: RecordDict) -> Message:
    return Message(content, dst_node_id=node_id, message_type=message_type)
