"""Checking an audit log (``jacfusion-fed audit verify``) and what it cannot detect.

:func:`verify` reads every file of the log (rotated ones first) and stops at the first line
that is not exactly what the writer wrote:

- not JSON, not an entry, or not byte-for-byte canonical JSON: the line was edited;
- its ``hash`` does not match its content: the line was edited;
- its ``prev`` is not the hash of the line before: a line was deleted (``seq`` jumps),
  inserted (the line after it follows the line before it), or lines were reordered;
- the first entry is not the first ever (``seq`` 0 after :data:`~.chain.GENESIS`): earlier
  files or lines are missing;
- with a certificate: a checkpoint whose signature does not verify, or that is unsigned.

What no check of the file alone can detect is listed in :attr:`VerifyReport.limits`: a log
cut short (any tail removed) verifies as intact unless the head recorded earlier elsewhere is
given (``expect_head``); without the certificate, a rewrite of every line after an edit; with
it, a rewrite of the entries after the last checkpoint; and calls the service never logged.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from .chain import FORMAT_VERSION, GENESIS, KINDS, canonical, entry_hash, segments
from .signing import certificate_fingerprint, verify_signature

__all__ = ["Problem", "VerifyReport", "iter_entries", "verify"]

_REQUIRED = ("v", "seq", "time", "kind", "prev", "hash")


@dataclass(frozen=True)
class Problem:
    """The first bad line: file, line number (from 1) and what is wrong."""

    file: Path
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file} line {self.line}: {self.reason}"


@dataclass
class VerifyReport:
    files: list[Path]
    entries: int = 0
    checkpoints: int = 0
    signatures_checked: int = 0
    head_seq: int = -1
    head_hash: str = GENESIS
    after_last_checkpoint: int = 0
    expect_head_found: bool | None = None
    problem: Problem | None = None
    limits: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.problem is None

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "files": [str(p) for p in self.files],
            "entries": self.entries,
            "checkpoints": self.checkpoints,
            "signatures_checked": self.signatures_checked,
            "head": {"seq": self.head_seq, "hash": self.head_hash},
            "entries_after_last_checkpoint": self.after_last_checkpoint,
            "expect_head_found": self.expect_head_found,
            "problem": None
            if self.problem is None
            else {
                "file": str(self.problem.file),
                "line": self.problem.line,
                "reason": self.problem.reason,
            },
            "cannot_detect": self.limits,
        }


def iter_entries(path: Path) -> Iterator[tuple[Path, int, bytes, bool]]:
    """``(file, line number, raw line, ends with newline)`` over every file of the log."""
    for file in segments(Path(path)):
        with open(file, "rb") as fh:
            for number, raw in enumerate(fh, start=1):
                complete = raw.endswith(b"\n")
                yield file, number, raw[:-1] if complete else raw, complete


def _parse(raw: bytes, complete: bool) -> tuple[dict[str, Any] | None, str]:
    if not complete:
        return None, "the last line is incomplete (a write was cut, or the file was truncated)"
    try:
        entry = json.loads(raw)
    except ValueError:
        return None, "not valid JSON: the line was edited or damaged"
    if not isinstance(entry, dict) or any(k not in entry for k in _REQUIRED):
        return None, "not an audit entry (fields missing): the line was edited or inserted"
    if entry["v"] != FORMAT_VERSION or entry["kind"] not in KINDS:
        return None, f"unknown format {entry['v']!r} or kind {entry['kind']!r}"
    if not isinstance(entry["seq"], int) or not isinstance(entry["hash"], str):
        return None, "seq or hash has the wrong type: the line was edited"
    try:
        if canonical(entry) != raw:
            return None, "not in canonical form: the line was edited"
    except ValueError:
        return None, "not serialisable: the line was edited"
    if entry_hash(entry) != entry["hash"]:
        return None, "its hash does not match its content: the line was edited"
    return entry, ""


class _Walk:
    """State of the chain walk: the last two entries' hashes and positions."""

    def __init__(self) -> None:
        self.hashes: list[str] = []
        self.positions: list[tuple[Path, int]] = []
        self.seq = -1

    def link_problem(self, entry: dict[str, Any], file: Path, line: int) -> Problem | None:
        prev, seq = entry["prev"], entry["seq"]
        if not self.hashes:
            if prev != GENESIS or seq != 0:
                return Problem(
                    file,
                    line,
                    f"the log starts at seq {seq}, not at the first entry: earlier files or "
                    "lines are missing",
                )
            return None
        if prev == self.hashes[-1]:
            if seq != self.seq + 1:
                return Problem(file, line, f"seq {seq} after seq {self.seq}: the line was edited")
            return None
        if len(self.hashes) >= 2 and prev == self.hashes[-2]:
            where = self.positions[-1]
            return Problem(
                where[0],
                where[1],
                "this line was inserted: the line after it follows the line before it",
            )
        if seq > self.seq + 1:
            return Problem(
                file,
                line,
                f"expected seq {self.seq + 1}, found {seq}: {seq - self.seq - 1} entr"
                f"{'y' if seq - self.seq == 2 else 'ies'} before this line are missing "
                "(deleted) or the lines were reordered",
            )
        if seq <= self.seq:
            return Problem(
                file, line, f"seq {seq} after seq {self.seq}: the lines were reordered or copied"
            )
        return Problem(
            file,
            line,
            "does not follow the line before it (prev hash differs): a line before it was "
            "changed, removed or inserted",
        )

    def push(self, entry: dict[str, Any], file: Path, line: int) -> None:
        self.hashes = [*self.hashes[-1:], entry["hash"]]
        self.positions = [*self.positions[-1:], (file, line)]
        self.seq = entry["seq"]


def verify(
    path: Path, *, cert: x509.Certificate | None = None, expect_head: str | None = None
) -> VerifyReport:
    """Check the log at ``path`` (and its rotated files); see the module docstring."""
    report = VerifyReport(files=segments(Path(path)))
    if not report.files:
        report.problem = Problem(Path(path), 0, "no such audit log")
        return report
    walk = _Walk()
    for file, number, raw, complete in iter_entries(path):
        entry, why = _parse(raw, complete)
        if entry is None:
            report.problem = Problem(file, number, why)
            break
        report.problem = walk.link_problem(entry, file, number)
        if report.problem is not None:
            break
        if entry["kind"] == "checkpoint":
            report.checkpoints += 1
            report.after_last_checkpoint = 0
            if cert is not None:
                bad = verify_signature(cert, entry)
                if bad is not None:
                    report.problem = Problem(file, number, f"checkpoint: {bad}")
                    break
                report.signatures_checked += 1
        else:
            report.after_last_checkpoint += 1
        if expect_head is not None and entry["hash"] == expect_head:
            report.expect_head_found = True
        walk.push(entry, file, number)
        report.entries += 1
        report.head_seq, report.head_hash = entry["seq"], entry["hash"]
    if expect_head is not None and report.ok and not report.expect_head_found:
        report.expect_head_found = False
        report.problem = Problem(
            report.files[-1],
            report.entries,
            f"the expected head {expect_head} is not in the log: it was cut short or rewritten",
        )
    report.limits = _limits(report, cert, expect_head)
    return report


def _limits(report: VerifyReport, cert: x509.Certificate | None, expect: str | None) -> list[str]:
    out = []
    if expect is None:
        out.append(
            "a log cut short (its last entries removed, at any line) verifies as intact; "
            "record the head printed here somewhere else and pass it later as "
            "--expect-head HASH to detect that"
        )
    else:
        out.append(
            "entries written after the expected head could still have been removed "
            "(record a newer head to cover them)"
        )
    if cert is None:
        out.append(
            "checkpoint signatures were not checked (pass --cert): without them, whoever can "
            "write the file can rewrite every line from an edit on, recomputing the hashes"
        )
    else:
        fp = certificate_fingerprint(cert.public_bytes(Encoding.DER))
        out.append(
            f"{report.after_last_checkpoint} entr"
            f"{'y' if report.after_last_checkpoint == 1 else 'ies'} after the last checkpoint "
            f"signed by {fp} are covered by the hash chain only (a rewrite of them from an "
            "edit on is not detected)"
        )
    out.append("calls the service never logged (e.g. a compromised service) leave no trace here")
    return out
