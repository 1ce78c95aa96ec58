"""Shared by the audit tests: corrupt a copy of an audit log in the four ways the issue names
(edit one byte, delete a line, swap two lines, insert a forged line) and say which line
``audit verify`` must name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from jacfusion_fed.audit.chain import seal

CORRUPTIONS = ("edit", "delete", "swap", "insert")


def corrupt(src: Path, dst: Path, how: str, line: int) -> int:
    """Copy ``src`` to ``dst`` corrupted ``how`` around ``line`` (from 1); return the line
    number ``verify`` must name."""
    shutil.copyfile(src, dst)
    lines = dst.read_bytes().splitlines(keepends=True)
    assert 2 <= line < len(lines) - 1, f"line {line} of {len(lines)}"
    i = line - 1
    if how == "edit":  # one byte of the time stamp: still valid, canonical JSON
        pos = lines[i].index(b'"time":"') + len(b'"time":"') + 3
        old = lines[i][pos : pos + 1]
        new = b"7" if old != b"7" else b"8"
        lines[i] = lines[i][:pos] + new + lines[i][pos + 1 :]
        named = line
    elif how == "delete":
        del lines[i]
        named = line
    elif how == "swap":
        lines[i], lines[i + 1] = lines[i + 1], lines[i]
        named = line
    elif how == "insert":  # a well-formed forgery: right prev, right seq, right hash
        before = json.loads(lines[i - 1])
        forged = dict(json.loads(lines[i]))
        forged.pop("hash")
        forged.update(seq=before["seq"] + 1, prev=before["hash"], status="OK", n_ids=0)
        lines.insert(i, seal(forged))
        named = line
    else:
        raise ValueError(how)
    dst.write_bytes(b"".join(lines))
    return named
