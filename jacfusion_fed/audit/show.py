"""Who accessed a patient (``jacfusion-fed audit show``): the ``access`` entries whose
pseudonyms include the patient's.

The hospital finds its own patient with its pseudonym key: the pseudonym of ``"Jane Doe
1970-01-01"`` is computed here (:func:`pseudonyms_of`, both encodings) and never written
anywhere; nobody without the key can link an entry to a patient.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

from jacfusion_fed.privacy.pseudonyms import Pseudonymizer

from .verify import iter_entries

__all__ = ["accesses", "pseudonyms_of"]


def pseudonyms_of(key_file: Path, patient_id: str) -> set[str]:
    """The patient's pseudonyms under the key (hex and base32 renderings)."""
    return {
        Pseudonymizer.from_file(key_file, encoding=enc)(patient_id) for enc in ("hex", "base32")
    }


def accesses(path: Path, pseudonyms: Collection[str]) -> Iterator[dict[str, Any]]:
    """The access entries naming any of ``pseudonyms``, oldest first, each without the other
    patients' pseudonyms (``n_ids`` says how many ids the call carried) and with the file and
    line it came from. Lines that do not parse are skipped (``audit verify`` reports them)."""
    wanted = set(pseudonyms)
    for file, number, raw, _complete in iter_entries(Path(path)):
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(entry, dict) or entry.get("kind") != "access":
            continue
        listed = entry.get("pseudonyms")
        if not isinstance(listed, list) or wanted.isdisjoint(listed):
            continue
        out = {k: v for k, v in entry.items() if k not in ("pseudonyms", "prev")}
        out["pseudonym"] = next(p for p in listed if p in wanted)
        out["file"], out["line"] = str(file), number
        yield out
