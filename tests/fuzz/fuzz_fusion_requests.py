"""Coverage-guided fuzzing of FusionService requests (Predict, PredictStream, GetModelInfo):
raw or structured request bytes, through the coordinator's real interceptor, servicer and
coordinator, two well-behaved owners behind it.

    python tests/fuzz/fuzz_fusion_requests.py -atheris_runs=20000

A finding (crash, imprecise status, wrong answer, hang) stops the run with a traceback and
the input that caused it (libFuzzer writes it to ``crash-<sha1>``).
"""

from __future__ import annotations

import atexit
import shutil
import sys
import tempfile
from pathlib import Path

import _common
import atheris

H = _common.harness


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="jf-fuzz-fusion-"))
    atexit.register(shutil.rmtree, root, True)
    target = H.FusionTarget(H.deployment_pems(root / "certs"))
    atexit.register(target.close)  # its head registry lives in a temporary directory
    count = _common.Counter("fuzz_fusion_requests")

    def one_input(data: bytes) -> None:
        ch = H.FdpChooser(atheris.FuzzedDataProvider(data))
        method, request, role, must = H.draw_fusion_call(ch, target)
        outcome = target.run(method, request, role, must_answer=must)
        count.add(f"{method}:{outcome.code.name}")

    _common.fuzz(one_input)


if __name__ == "__main__":
    sys.exit(main())
