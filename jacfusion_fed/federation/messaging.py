"""ServerApp-side helpers: wait for SuperNodes, send a batch of messages, collect replies.

Works with every Flower ``Grid`` (the in-memory one of the Simulation Engine and the HTTP
one of a deployed SuperLink): only ``get_node_ids``, ``push_messages`` and
``pull_messages`` are used. Polling is done here with a short sleep, instead of
``Grid.send_and_receive`` whose HTTP implementation sleeps 3 s between pulls.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, overload

from flwr.app import Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from .allowlist import RecordSpec, ReplyNotAllowedError, check_reply_allowed

__all__ = [
    "NOT_ALLOWED_CODE",
    "NO_REPLY_CODE",
    "NodeReplyError",
    "ReplyError",
    "error_code_name",
    "send_and_collect",
    "wait_for_nodes",
]

#: Codes of errors raised here, not by Flower (Flower's codes are >= 0).
NO_REPLY_CODE = -1
NOT_ALLOWED_CODE = -2

_ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

_FLWR_CODE_NAMES = {
    value: name
    for name, value in vars(ErrorCode).items()
    if name.isupper() and isinstance(value, int)
}


def error_code_name(code: int) -> str:
    """Readable name of a Flower ``ErrorCode`` or of this module's own codes."""
    if code == NO_REPLY_CODE:
        return "NO_REPLY"
    if code == NOT_ALLOWED_CODE:
        return "REPLY_NOT_ALLOWED"
    return _FLWR_CODE_NAMES.get(code, f"CODE_{code}")


@dataclass(frozen=True)
class ReplyError:
    """Why one node gave no usable reply."""

    node_id: int
    message_type: str
    code: int
    reason: str

    @property
    def code_name(self) -> str:
        return error_code_name(self.code)

    def __str__(self) -> str:
        return (
            f"node {self.node_id} ({self.message_type}): {self.code_name} "
            f"[{self.code}]: {self.reason}"
        )


class NodeReplyError(RuntimeError):
    """Some nodes failed; ``errors`` says why, ``replies`` holds the usable ones."""

    def __init__(self, errors: Mapping[int, ReplyError], replies: Mapping[int, RecordDict]):
        self.errors = dict(errors)
        self.replies = dict(replies)
        lines = "\n".join(f"  - {err}" for err in self.errors.values())
        super().__init__(
            f"{len(self.errors)} of {len(self.errors) + len(self.replies)} nodes failed:\n{lines}"
        )


def wait_for_nodes(grid: Grid, n: int, timeout: float, *, poll_interval: float = 0.5) -> list[int]:
    """Poll until at least ``n`` nodes are connected; return the sorted node ids.

    ``grid.get_node_ids()`` can be empty right after a start. Raises ``TimeoutError`` with
    the count seen when ``timeout`` (seconds) passes first.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    deadline = time.monotonic() + timeout
    while True:
        node_ids = sorted(int(i) for i in grid.get_node_ids())
        if len(node_ids) >= n:
            return node_ids
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"only {len(node_ids)} of {n} nodes connected after {timeout:.1f} s "
                f"(node ids: {node_ids})"
            )
        time.sleep(poll_interval)


@overload
def send_and_collect(
    grid: Grid,
    messages: Iterable[Message],
    timeout: float,
    *,
    on_error: Literal["raise"] = "raise",
    allowed: Mapping[str, RecordSpec] | None = None,
    dims: Mapping[str, int] | None = None,
    poll_interval: float = 0.25,
) -> dict[int, RecordDict]: ...


@overload
def send_and_collect(
    grid: Grid,
    messages: Iterable[Message],
    timeout: float,
    *,
    on_error: Literal["return"],
    allowed: Mapping[str, RecordSpec] | None = None,
    dims: Mapping[str, int] | None = None,
    poll_interval: float = 0.25,
) -> dict[int, RecordDict | ReplyError]: ...


def send_and_collect(
    grid: Grid,
    messages: Iterable[Message],
    timeout: float,
    *,
    on_error: Literal["raise", "return"] = "raise",
    allowed: Mapping[str, RecordSpec] | None = None,
    dims: Mapping[str, int] | None = None,
    poll_interval: float = 0.25,
) -> dict[int, RecordDict] | dict[int, RecordDict | ReplyError]:
    """Push one message per node, pull the replies, return them keyed by node id.

    - A reply with ``has_error()`` becomes a `ReplyError` (Flower's code and reason).
    - A node that has not replied after ``timeout`` seconds gets a `ReplyError` with
      code `NO_REPLY_CODE`.
    - With ``allowed``, each reply's content goes through `check_reply_allowed` (with
      ``dims``, the same for every node); a rejected reply is dropped and becomes a
      `ReplyError` with code `NOT_ALLOWED_CODE`, its content never returned.

    ``on_error="raise"`` (default) raises `NodeReplyError` if any node failed (its
    ``replies`` attribute still holds the good ones); ``on_error="return"`` puts the
    `ReplyError` objects into the returned dict instead.
    """
    if on_error not in ("raise", "return"):
        raise ValueError(f"on_error must be 'raise' or 'return', got {on_error!r}")
    msgs = list(messages)
    if not msgs:
        return {}
    dst_types: dict[int, str] = {}
    for msg in msgs:
        dst = int(msg.metadata.dst_node_id)
        if dst in dst_types:
            raise ValueError(f"more than one message for node {dst}; send one per node")
        dst_types[dst] = msg.metadata.message_type

    sent_ids = [str(i) for i in grid.push_messages(msgs)]
    if len(sent_ids) != len(msgs) or any(not i for i in sent_ids):
        raise RuntimeError(
            f"the grid accepted {sum(1 for i in sent_ids if i)} of {len(msgs)} messages"
        )
    node_of_msg = {mid: int(m.metadata.dst_node_id) for mid, m in zip(sent_ids, msgs, strict=True)}
    pending = set(sent_ids)
    replies: dict[int, RecordDict] = {}
    errors: dict[int, ReplyError] = {}
    deadline = time.monotonic() + timeout
    while pending:
        for reply in grid.pull_messages(set(pending)):
            mid = reply.metadata.reply_to_message_id
            if mid not in pending:
                continue
            pending.discard(mid)
            node = node_of_msg[mid]
            mtype = dst_types[node]
            if reply.has_error():
                err = reply.error
                reason = _ANSI_RE.sub("", str(err.reason or ""))
                errors[node] = ReplyError(node, mtype, int(err.code), reason)
                continue
            src = int(reply.metadata.src_node_id)
            if src != node:
                errors[node] = ReplyError(
                    node, mtype, NOT_ALLOWED_CODE, f"reply came from node {src}"
                )
                continue
            content = reply.content
            if allowed is not None:
                try:
                    check_reply_allowed(content, allowed, dims)
                except ReplyNotAllowedError as exc:
                    errors[node] = ReplyError(node, mtype, NOT_ALLOWED_CODE, str(exc))
                    continue
            replies[node] = content
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(poll_interval)
    for mid in sorted(pending):
        node = node_of_msg[mid]
        errors[node] = ReplyError(
            node, dst_types[node], NO_REPLY_CODE, f"no reply within {timeout:.1f} s"
        )

    if on_error == "raise":
        if errors:
            raise NodeReplyError(errors, replies)
        return replies
    out: dict[int, RecordDict | ReplyError] = dict(replies)
    out.update(errors)
    return out
