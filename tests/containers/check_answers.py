"""Check the hospital's answer in the compose deployment against an independent reference.

Run by ``test_compose.py`` inside the image (for the library), with every party's volume
mounted under ``/parties/<party>`` (read-only but the owners', whose stores are SQLite; a
test's view: no party of the deployment sees another's volume) and the requester's
``predict --json`` output on stdin:

    python check_answers.py /parties < answer.json

1. **The fused answers.** The reference is the fusion library called directly
   (:class:`jacfusion_fed.reliability.reference.Reference`) on each owner's own state: logits
   recomputed by each owner's stored model on its own data (no logit cache read), the head and
   class counts from its model store. Every probability of the answer must equal the
   reference's within the oracle's tolerance, the labels be their arg-max, every sample use
   both modalities (``--require-all``), in request order.
2. **Flower trained them.** The model versions answered are the heads the ``flwr run``
   registered (``results.json`` in the coordinator's volume).
3. **Accuracy on the hospital's labels**, recomputed here from the answer (the requester
   prints the same figure on stderr), and each modality's accuracy alone on the same ids.
4. **Privacy of the coordinator's volume**: no file holds the pseudonym key, and no data
   cache is there.

Prints one JSON object (the figures); exits 1 with ``error: ...`` when a check fails.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

DATA = "builtin:avdigits?seed=0&quick=1"
MODALITIES = {"image": "image-owner", "audio": "audio-owner"}  # coordinator's --owner order


class CheckFailed(Exception):
    pass


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def snapshot(root: Path, modality: str, pseudonyms: list[str]) -> Any:
    """An owner's logits recomputed by its stored model (``cache=False``), its head and counts."""
    from jacfusion_fed.owner import OwnerWorkspace
    from jacfusion_fed.privacy.pseudonyms import Pseudonymizer
    from jacfusion_fed.reliability.reference import OwnerSnapshot

    party = root / MODALITIES[modality]
    ws = OwnerWorkspace(
        party / "workspace", modality, DATA, Pseudonymizer.from_file(party / "pseudonym.key")
    )
    answer = ws.logits(pseudonyms, cache=False)
    _check(not answer.unknown_ids, f"{modality}: the owner lacks {answer.unknown_ids[:3]}")
    return OwnerSnapshot(
        modality=modality,
        version=answer.version,
        gram=np.asarray(ws.head(answer.version).gram, dtype=np.float64),
        class_counts=np.asarray(ws.class_counts(), dtype=np.float64),
        logits=dict(zip(answer.sample_ids, np.asarray(answer.logits, np.float64), strict=True)),
        owner=MODALITIES[modality],
    )


def decoded(answer: dict[str, Any]) -> SimpleNamespace:
    """The ``predict --json`` document as the answer object the reference classifies (the
    attributes it reads: ids, probabilities, labels, method, per-modality flags and versions)."""
    samples = answer["samples"]
    return SimpleNamespace(
        sample_ids=[s["sample_id"] for s in samples],
        probabilities=np.asarray([s["probabilities"] for s in samples], dtype=np.float64),
        labels=np.asarray([s["label_index"] for s in samples], dtype=np.int64),
        modalities=[
            SimpleNamespace(
                modality=m["modality"],
                owner=m["owner"],
                model_version=m["model_version"],
                used=np.asarray([m["modality"] in s["modalities"] for s in samples], dtype=bool),
                error=m["error"],
            )
            for m in answer["modalities"]
        ],
        unpredicted_sample_ids=list(answer["unpredicted_sample_ids"]),
        method=answer["method"],
    )


def load_labels(path: Path) -> dict[str, int]:
    """Pseudonym -> label of every split of the hospital's labels file (`deploy labels`)."""
    data = json.loads(path.read_text())
    out: dict[str, int] = {}
    for split in data["splits"].values():
        out.update(zip(split["ids"], (int(v) for v in split["labels"]), strict=True))
    return out


def check(root: Path, answer: dict[str, Any]) -> dict[str, Any]:
    from jacfusion_fed.privacy.pseudonyms import Pseudonymizer
    from jacfusion_fed.reliability.reference import Reference

    hospital = root / "hospital"
    local_ids = (hospital / "test-ids.txt").read_text().split()
    pseudonyms = Pseudonymizer.from_file(hospital / "pseudonym.key").many(local_ids)
    samples = answer["samples"]
    _check(
        [s.get("local_id") for s in samples] == local_ids,
        "the answer's samples are not the requested ids in request order",
    )
    # 1. the fused answers against the library on the owners' own state
    owners = [snapshot(root, m, pseudonyms) for m in MODALITIES]
    reference = Reference(owners)
    options = SimpleNamespace(require_all=True)  # as the requester asked (--require-all)
    verdict = reference.classify(pseudonyms, decoded(answer), options)
    _check(verdict.kind == "correct", f"fused answers: {verdict.label}: {verdict.detail}")
    # 2. the versions are the heads the Flower run registered
    results = json.loads((root / "coordinator" / "results" / "results.json").read_text())
    _check(results.get("status") == "completed", f"flwr run: {results.get('status')}")
    trained = {m: h["version"] for m, h in results["heads"].items()}
    answered = {m["modality"]: m["model_version"] for m in answer["modalities"]}
    _check(answered == trained, f"answered versions {answered} != trained {trained}")
    # 3. accuracy on the hospital's labels, fused and per modality
    truth = load_labels(hospital / "eval-labels.json")
    labels = np.asarray([truth[p] for p in pseudonyms])
    fused = float(np.mean(np.asarray([s["label_index"] for s in samples]) == labels))
    alone = {
        o.modality: float(
            np.mean(np.stack([o.logits[p] for p in pseudonyms]).argmax(axis=1) == labels)
        )
        for o in owners
    }
    # 4. the coordinator's volume: no pseudonym key, no data
    key = (hospital / "pseudonym.key").read_bytes().strip()
    coordinator_files = [p for p in (root / "coordinator").rglob("*") if p.is_file()]
    leaked = [str(p) for p in coordinator_files if key in p.read_bytes()]
    _check(not leaked, f"the pseudonym key is in the coordinator's volume: {leaked}")
    _check(
        not (root / "coordinator" / ".cache" / "jacfusion-fed").exists(),
        "a data cache is in the coordinator's volume",
    )
    return {
        "samples": len(samples),
        "verdict": verdict.label,
        "max_abs_dp": verdict.detail,
        "tolerance": reference.tolerance,
        "model_versions": answered,
        "accuracy_fused": fused,
        "accuracy_alone": alone,
        "coordinator_files_checked": len(coordinator_files),
    }


def main() -> int:
    root = Path(sys.argv[1])
    try:
        summary = check(root, json.loads(sys.stdin.read()))
    except CheckFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
