"""Shared start-up of the atheris targets: instrumentation, counting, the summary line."""

from __future__ import annotations

import atexit
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))

with atheris.instrument_imports(include=["jacfusion_fed", "harness"]):
    import harness  # noqa: F401  (instrumented with the project's modules)


class Counter:
    """Inputs tried and outcomes, printed at exit (``-atheris_runs=N`` ends with sys.exit)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.inputs = 0
        self.outcomes: dict[str, int] = {}
        self.t0 = time.monotonic()
        atexit.register(self.report)

    def add(self, label: str) -> None:
        self.inputs += 1
        self.outcomes[label] = self.outcomes.get(label, 0) + 1

    def report(self) -> None:
        seconds = time.monotonic() - self.t0
        top = sorted(self.outcomes.items(), key=lambda kv: -kv[1])[:12]
        print(
            f"\n[{self.name}] inputs tried: {self.inputs} in {seconds:.0f} s; outcomes: "
            + ", ".join(f"{k}={v}" for k, v in top),
            file=sys.stderr,
            flush=True,
        )


def fuzz(one_input: Callable[[bytes], Any]) -> None:
    """Run libFuzzer; inputs of up to 4 KiB from the start (``-max_len``/``-len_control``
    given on the command line win)."""
    argv = list(sys.argv)
    if not any(a.startswith("-max_len=") for a in argv):
        argv.append("-max_len=4096")
    if not any(a.startswith("-len_control=") for a in argv):
        argv.append("-len_control=0")
    atheris.Setup(argv, one_input)
    atheris.Fuzz()
