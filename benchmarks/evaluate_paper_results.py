"""Regenerate ``docs/results/``: the AV-Digits and TwoMoon tables, curves and heatmaps.

Usage::

    python benchmarks/evaluate_paper_results.py [--out docs/results] [--quick] [--cold] [--seeds 3]

``--cold`` trains every net into a fresh temporary cache (the run time then includes training);
by default the model cache (``$JACFUSION_CACHE/models``) is used. Prints the wall time of each
dataset, which ``docs/results/README.md`` quotes.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from jacfusion_fed.evaluation import EvaluationConfig, run_evaluation, write_reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cold", action="store_true", help="train into a fresh cache")
    parser.add_argument("--datasets", nargs="+", default=["avdigits", "twomoon"])
    parser.add_argument("--seeds", type=int, default=3, help="training seeds 0..N-1")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="jf-models-") as tmp:
        cache = Path(tmp) if args.cold else None
        for dataset in args.datasets:
            start = time.perf_counter()
            result = run_evaluation(
                EvaluationConfig(
                    dataset=dataset, quick=args.quick, cache_dir=cache, seeds=args.seeds
                )
            )
            elapsed = time.perf_counter() - start
            write_reports(result, args.out)
            cached = sum(bool(i.get("cached")) for i in result.models.values())
            print(
                f"{dataset}: {elapsed:.1f} s wall ({cached}/{len(result.models)} nets cached); "
                + ", ".join(f"{k} {v:.1f}" for k, v in result.timings.items())
            )


if __name__ == "__main__":
    main()
