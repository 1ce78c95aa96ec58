"""Coverage-guided fuzzing of ModalityService requests (GetInfo, GetHead, GetLogits,
StreamLogits): raw or structured request bytes, through an owner's real interceptor,
servicer, workspace and model store.

    python tests/fuzz/fuzz_owner_requests.py -atheris_runs=20000
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
    root = Path(tempfile.mkdtemp(prefix="jf-fuzz-owner-"))
    atexit.register(shutil.rmtree, root, True)
    target = H.OwnerTarget(H.tiny_workspace(root / "owner"), H.deployment_pems(root / "certs"))
    count = _common.Counter("fuzz_owner_requests")

    def one_input(data: bytes) -> None:
        ch = H.FdpChooser(atheris.FuzzedDataProvider(data))
        method, request, role = H.draw_owner_call(ch, target)
        outcome = target.run(method, request, role)
        count.add(f"{method}:{outcome.code.name}")

    _common.fuzz(one_input)


if __name__ == "__main__":
    sys.exit(main())
