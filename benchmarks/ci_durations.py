"""Wall time of the README's commands, measured by running them in a checkout.

Runs, in order and each once: ``make demo`` (set-up on first use, then ``simulate --quick``),
``make test`` (lint, types, generated-code check, buf lint, the fast tests),
``make test-e2e`` (the end-to-end tests) and ``make test-readme`` (the README run as written),
and writes their wall times with what they depend
on (machine, load, package versions, git commit) as JSON. The README quotes that file, and
``tests/test_docs_results_consistency.py`` checks the quotes.

Run from a clean clone (the set-up then happens inside ``make demo``):

    python3 benchmarks/ci_durations.py --out docs/results/ci-durations.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

STEPS = (
    ("make demo", ["make", "demo"]),
    ("make test", ["make", "test"]),
    ("make test-e2e", ["make", "test-e2e"]),
    ("make test-readme", ["make", "test-readme"]),
)


def _run(argv: list[str], log: Path) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    start = time.monotonic()
    with log.open("wb") as out:
        code = subprocess.call(argv, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.monotonic() - start
    tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
    return {
        "seconds": round(seconds, 1),
        "exit_code": code,
        "load_average_before": round(load_before, 2),
        "last_line": tail[0][-200:],
    }


def _versions() -> dict[str, str]:
    python = Path(".venv/bin/python")
    if not python.exists():
        return {}
    code = (
        "import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
        "('torch', 'flwr', 'grpcio', 'protobuf', 'numpy', 'pytest')}))"
    )
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=False)
    return dict(json.loads(out.stdout)) if out.returncode == 0 else {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--logs", type=Path, default=Path("runs/ci-durations"))
    args = parser.parse_args()
    args.logs.mkdir(parents=True, exist_ok=True)
    steps: dict[str, Any] = {}
    for name, argv in STEPS:
        print(f"{name} ...", flush=True)
        steps[name] = _run(argv, args.logs / f"{argv[-1]}.log")
        print(f"{name}: {steps[name]['seconds']} s, exit {steps[name]['exit_code']}", flush=True)
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    result = {
        "steps": steps,
        "commit": commit,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
        },
        "versions": _versions(),
        "note": "wall times of one run each; the first step includes the .venv set-up",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(s["exit_code"] == 0 for s in steps.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
