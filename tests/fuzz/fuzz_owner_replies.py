"""Coverage-guided fuzzing of the owners' replies as the coordinator parses them: one owner
answers GetInfo, GetHead and GetLogits with fuzzed (often malformed) messages -- NaN/Inf,
wrong K, truncated or padded matrices, ids missing, doubled or foreign, versions that
disagree, errors -- next to a well-behaved owner; every answer of the coordinator is checked
against the fusion library on what was served.

    python tests/fuzz/fuzz_owner_replies.py -atheris_runs=20000

(Late owners are left to the hypothesis tests: a sleep per input would slow the search.)
"""

from __future__ import annotations

import sys

import _common
import atheris

H = _common.harness


def main() -> None:
    target = H.ReplyTarget()
    count = _common.Counter("fuzz_owner_replies")

    def one_input(data: bytes) -> None:
        ch = H.FdpChooser(atheris.FuzzedDataProvider(data))
        count.add(target.run(ch, allow_sleep=False))

    _common.fuzz(one_input)


if __name__ == "__main__":
    sys.exit(main())
