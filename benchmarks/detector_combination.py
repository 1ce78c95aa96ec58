"""Does the way the detectors' p-values are combined change what they buy? (issue 20)

For every training seed of the AV-Digits "perturbed modality unknown" table and every setting
(non-adaptive: setting-1 attacks, the first draw of each random corruption), the accuracy of
``robust`` at floor 0.05 and two trust levels (0.05, 0.01), without detectors and with the
owners' feature p-values and the cross-modal consistency combined with the typicality p-value
by Fisher's method (assumes independent p-values) or by the Cauchy combination (valid under
dependence). Means over the settings per seed, and the cluster bootstrap (test samples, seeds
kept together) of each combination minus "no detectors" at the same trust level.

Run:  python benchmarks/detector_combination.py --out docs/results/avdigits-combination.json
      (about 1 minute with the nets in the model cache)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from jacfusion_fed.evaluation.analysis import arguments, stamp, write_result
from jacfusion_fed.evaluation.provenance import provenance
from jacfusion_fed.evaluation.stats import cluster_bootstrap
from jacfusion_fed.evaluation.unknown import SeedRun
from jacfusion_fed.fusion import robust_fusion

COMBINATIONS = ("none", "fisher", "cauchy")
TRUST_LEVELS = (0.05, 0.01)


def run(seeds: list[int]) -> dict[str, Any]:
    start = time.perf_counter()
    torch.set_num_threads(1)
    correct: dict[str, list[np.ndarray]] = {}  # "comb@trust" -> per seed (N,) mean over settings
    per_seed: dict[str, Any] = {}
    env: dict[str, Any] = {}
    for seed in seeds:
        r = SeedRun("avdigits", seed)
        env = env or {**provenance(r.data), "threads": 1}
        sig = r.signals()
        y = r.y["test"]
        cells: dict[str, dict[str, float]] = {}
        sums: dict[str, list[np.ndarray]] = {}
        for s in r.settings:
            xs, zs = r.inputs(s, "test", 0)
            extra = sig.extra(zs, xs)
            for comb in COMBINATIONS:
                for tl in TRUST_LEVELS:
                    p = robust_fusion(
                        zs,
                        r.calibrations,
                        r.log_prior,
                        floor=0.05,
                        trust_level=tl,
                        pvalues=None if comb == "none" else extra,
                        combine="fisher" if comb == "none" else comb,
                    ).p
                    right = (p.argmax(1) == y).double().numpy()
                    key = f"{comb}@{tl:g}"
                    cells.setdefault(key, {})[s.key] = 100 * float(right.mean())
                    sums.setdefault(key, []).append(right)
        for key, v in sums.items():
            correct.setdefault(key, []).append(np.mean(v, axis=0))
        per_seed[str(seed)] = cells
    summary: dict[str, Any] = {}
    for comb in COMBINATIONS:
        for tl in TRUST_LEVELS:
            key, base = f"{comb}@{tl:g}", f"none@{tl:g}"
            summary[key] = {
                "mean": 100 * float(np.mean(correct[key])),
                "minus_none": None
                if comb == "none"
                else cluster_bootstrap(np.stack(correct[key]), np.stack(correct[base])),
            }
    return {
        "dataset": "avdigits",
        "seeds": seeds,
        "floor": 0.05,
        "summary": summary,
        "per_seed": per_seed,
        "environment": env,
        **stamp(start),
    }


def summary(res: dict[str, Any]) -> Iterator[str]:
    for key, v in res["summary"].items():
        d = v["minus_none"]
        diff = "" if d is None else f"  − none {d['mean']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}]"
        yield f"{key:12s} mean {v['mean']:.1f}{diff}"


def main() -> None:
    args = arguments(__doc__).parse_args()
    res = run(list(range(args.seeds)))
    write_result(args.out, res, summary(res))


if __name__ == "__main__":
    main()
