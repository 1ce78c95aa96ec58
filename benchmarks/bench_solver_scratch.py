"""Scratch memory and kernel time of the solvers, reused workspace vs fresh allocations.

python benchmarks/bench_solver_scratch.py --out docs/results/bench-solver-scratch.json
python benchmarks/bench_solver_scratch.py --plan 10:2000,100:500 --solvers exact --out /tmp/s.json

Each (K, N, solver, mode) runs in its own child process (see
jacfusion_fed.bench.solver_scratch); the JSON records the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jacfusion_fed.atomicio import atomic_write_bytes
from jacfusion_fed.bench.solver_scratch import DEFAULT_PLAN, SOLVERS, bench_solver_scratch


def _plan(text: str) -> list[tuple[int, int]]:
    pairs = []
    for item in text.split(","):
        k, _, n = item.partition(":")
        if not (k.isdigit() and n.isdigit() and int(k) >= 2 and int(n) >= 2):
            raise SystemExit(f"error: --plan wants K:N pairs with K >= 2 and N >= 2, got {item!r}")
        pairs.append((int(k), int(n)))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = ",".join(f"{k}:{n}" for k, n in DEFAULT_PLAN)
    parser.add_argument("--plan", default=default, help="K:N pairs (default %(default)s)")
    parser.add_argument("--solvers", default="exact,fast", help="exact and/or fast")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per child")
    parser.add_argument("--out", type=Path, required=True, help="JSON results file")
    args = parser.parse_args()
    solvers = [s for s in args.solvers.split(",") if s]
    if not solvers or any(s not in SOLVERS for s in solvers):
        raise SystemExit(f"error: --solvers takes {', '.join(SOLVERS)}; got {args.solvers!r}")
    if args.threads < 1:
        raise SystemExit("error: --threads must be >= 1")
    result = bench_solver_scratch(
        _plan(args.plan),
        solvers,
        threads=args.threads,
        progress=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    atomic_write_bytes(args.out, (json.dumps(result, indent=2) + "\n").encode())
    for row in result["rows"]:
        for mode in ("fresh", "reuse"):
            r = row[mode]
            share, peak = r["kernel_time_share"], r["peak_scratch_mib"]
            print(
                f"K={row['num_classes']:5d} N={row['samples']:7d} {row['solver']:5s} {mode:5s} "
                f"{r['samples_per_s']:10,.0f}/s  user {r['user_cpu_s']:7.2f}s  "
                f"sys {r['system_cpu_s']:6.2f}s "
                f"({'-' if share is None else f'{100 * share:4.1f}%'})  "
                f"peak scratch {'-' if peak is None else f'{peak:7.1f} MiB'}"
            )
    print(f"targets: {json.dumps(result['targets'])}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
