"""The audit log's line format and hash chain (shared by the writer, ``verify`` and ``show``).

One line per entry, UTF-8, ``\\n``-terminated, in *canonical* JSON (keys sorted, no spaces,
ASCII only: :func:`canonical`), so that every byte of a line is covered by its hash: a line
that parses but is not byte-for-byte its own canonical form has been edited.

Every entry carries:

- ``v`` (format version, :data:`FORMAT_VERSION`), ``seq`` (0, 1, 2, ... across rotated
  files), ``time`` (UTC, ISO 8601 with microseconds and ``Z``), ``kind`` (:data:`KINDS`);
- ``prev``: the ``hash`` of the entry before it (:data:`GENESIS` for the first entry ever);
- ``hash``: SHA-256 (hex) of the canonical JSON of the entry *without* its ``hash`` field
  (:func:`entry_hash`).

So an edited line no longer matches its hash, and a deleted, inserted or moved line breaks
the ``prev`` link (and ``seq``) of the line after it. Signed checkpoints (:mod:`.signing`) bind
the chain's head to the service's TLS key, so that a rewrite of the chain after an edit is
caught too (see :mod:`.verify` for what is not).

Rotated files (:func:`segments`): ``<log>.000001``, ``<log>.000002``, ... (older to newer),
then ``<log>`` itself, the file being written; the chain runs through them in that order.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Final

__all__ = [
    "FORMAT_VERSION",
    "GENESIS",
    "KINDS",
    "canonical",
    "entry_hash",
    "seal",
    "segment_path",
    "segments",
    "utc_now",
]

FORMAT_VERSION: Final = 1
#: ``prev`` of the very first entry.
GENESIS: Final = "0" * 64
#: ``access``: a call that touched patient data or a model; ``checkpoint``: a signed head;
#: ``service``: the service started, stopped, rotated its file or repaired a partial line.
KINDS: Final = ("access", "checkpoint", "service")
_SEGMENT_RE = re.compile(r"^\.(\d{6,})$")


def canonical(obj: Mapping[str, Any]) -> bytes:
    """The one serialisation of an entry: sorted keys, no whitespace, ASCII."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def entry_hash(entry: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of ``entry`` without its ``hash`` field."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(canonical(body)).hexdigest()


def seal(entry: dict[str, Any]) -> bytes:
    """Set ``entry["hash"]`` and return its line (canonical JSON plus ``\\n``)."""
    entry["hash"] = entry_hash(entry)
    return canonical(entry) + b"\n"


def utc_now() -> str:
    """``2026-01-01T12:00:00.123456Z``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def segment_path(path: Path, number: int) -> Path:
    """The ``number``-th rotated file of the log at ``path``."""
    return path.with_name(f"{path.name}.{number:06d}")


def segments(path: Path) -> list[Path]:
    """The files of the log at ``path``, oldest first: rotated ones, then ``path`` if present."""
    path = Path(path)
    numbered: list[tuple[int, Path]] = []
    if path.parent.is_dir():
        for child in path.parent.iterdir():
            if child.name.startswith(path.name):
                match = _SEGMENT_RE.match(child.name[len(path.name) :])
                if match:
                    numbered.append((int(match.group(1)), child))
    out = [p for _, p in sorted(numbered)]
    if path.exists():
        out.append(path)
    return out
