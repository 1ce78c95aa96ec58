"""What every analysis script in ``benchmarks/`` shares: its command line (``--out``, ``--seeds``),
the machine state a result records next to its figures, and how the result is written.

A script adds its own options to :func:`arguments`, puts ``**stamp(start)`` in its result and
ends with :func:`write_result`, which writes the JSON and prints the script's summary lines.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from jacfusion_fed.atomicio import atomic_write_bytes

__all__ = ["arguments", "stamp", "write_result"]


def arguments(
    doc: str | None, seeds: int = 3, resamples: int | None = None
) -> argparse.ArgumentParser:
    """A parser described by the first line of ``doc`` with ``--out`` (the JSON file, required)
    and ``--seeds`` (how many training seeds, from 0; default ``seeds``); with ``resamples``,
    also ``--resamples`` (bootstrap resamples of the intervals, that default)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    ap.add_argument("--seeds", type=int, default=seeds, help="training seeds 0..N-1")
    if resamples is not None:
        ap.add_argument(
            "--resamples", type=int, default=resamples, help="bootstrap resamples per interval"
        )
    return ap


def stamp(start: float) -> dict[str, Any]:
    """``load_average`` (the machine's, now) and ``seconds`` since ``start``
    (:func:`time.perf_counter`): what a timing in the result depends on."""
    return {"load_average": list(os.getloadavg()), "seconds": time.perf_counter() - start}


def write_result(path: Path, result: dict[str, Any], summary: Iterable[str]) -> None:
    """Write ``result`` to ``path`` as JSON (indent 1, sorted keys, atomically: a reader never
    sees half a file), then print each ``summary`` line and where the file went."""
    atomic_write_bytes(path, (json.dumps(result, indent=1, sort_keys=True) + "\n").encode())
    for line in summary:
        print(line)
    print(f"wrote {path}")
