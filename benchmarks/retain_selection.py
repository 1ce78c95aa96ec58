"""Should robust keep a share of a distrusted modality's evidence? (issue 20)

``robust_fusion(retain=kappa)`` contaminates a distrusted modality's likelihood ratio with
l^kappa instead of 1, so a modality the gate does not trust keeps kappa of its evidence
instead of being dropped. With a perfect detector that lifts the ceiling of the gate (the
oracle bound of ``docs/results/avdigits-detection.md``); here is what it does in the "perturbed
modality unknown" tables, where nothing is known about the perturbation.

For each dataset the whole table (``run_unknown``: 3 training seeds, hyperparameters selected
per test column on validation without the column's perturbation type, attacked columns end
to end through each row) is run twice in this process: robust and robust + detectors
selecting ``retain`` from {0} (the committed tables) and from {0, 0.25, 0.5} (everything
else the same). Reported per dataset and row: the mean over the settings, the clean column,
every column, the difference wide - {0} per sample (cluster bootstrap over test samples,
seeds kept together), the difference to Stat-w/o on clean data, the issue's bars (best clean
modality alone, Stat-w/ with the oracle), and which ``retain`` the selection chose.

Run:  python benchmarks/retain_selection.py --out docs/results/retain-selection.json
      (about 8 minutes on 2 cores with the nets in the model cache)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from jacfusion_fed.evaluation.stats import cluster_bootstrap
from jacfusion_fed.evaluation.unknown import RETAINS
from jacfusion_fed.evaluation.unknown_report import per_sample_correct, run_unknown
from jacfusion_fed.evaluation.unknown_targets import best_clean_alone

DATASETS = ("avdigits", "twomoon", "emergency")
WIDE: tuple[float, ...] = (0.0, 0.25, 0.5)
ROWS = ("robust", "robust_detect")


def compare(base: dict[str, Any], wide: dict[str, Any]) -> dict[str, Any]:
    settings = base["settings"]
    out: dict[str, Any] = {
        "best_clean_alone_mean": float(np.mean([best_clean_alone(wide, k) for k in settings])),
        "jac_oracle_mean": float(wide["mean"]["jac_oracle"]),
        "stat_mean": float(wide["mean"]["stat"]),
        "stat_clean": float(wide["pooled"]["clean"]["stat"]),
        "rows": {},
    }
    for row in ROWS:
        chosen = Counter(
            float(p[row].get("retain", 0.0))
            for s in wide["seeds"]
            for p in wide["per_seed"][str(s)]["params"].values()
        )
        out["rows"][row] = {
            "mean": {"base": float(base["mean"][row]), "wide": float(wide["mean"][row])},
            "per_setting": {
                k: {"base": float(base["pooled"][k][row]), "wide": float(wide["pooled"][k][row])}
                for k in settings
            },
            "mean_wide_minus_base": cluster_bootstrap(
                per_sample_correct(wide, row, None), per_sample_correct(base, row, None)
            ),
            "per_setting_wide_minus_base": {
                k: cluster_bootstrap(
                    per_sample_correct(wide, row, k), per_sample_correct(base, row, k)
                )
                for k in settings
            },
            "clean_minus_stat": {
                "base": cluster_bootstrap(
                    per_sample_correct(base, row, "clean"),
                    per_sample_correct(base, "stat", "clean"),
                ),
                "wide": cluster_bootstrap(
                    per_sample_correct(wide, row, "clean"),
                    per_sample_correct(wide, "stat", "clean"),
                ),
            },
            # (seed, test column) choices of the selection, by retain value
            "retain_chosen": {f"{r:g}": int(c) for r, c in sorted(chosen.items())},
        }
    return out


def run(datasets: tuple[str, ...], seeds: list[int]) -> dict[str, Any]:
    start = time.perf_counter()
    results: dict[str, Any] = {}
    env: dict[str, Any] = {}
    for ds in datasets:
        base = run_unknown(ds, seeds, retains=RETAINS)
        wide = run_unknown(ds, seeds, retains=WIDE)
        env.setdefault(ds, {**base["environment"], "threads": base["threads"]})
        results[ds] = {
            **compare(base, wide),
            "seconds": {"base": base["seconds"], "wide": wide["seconds"]},
        }
    return {
        "seeds": seeds,
        "retains": {"base": list(RETAINS), "wide": list(WIDE)},
        "datasets": results,
        "environment": env,
        "load_average": list(os.getloadavg()),
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    args = ap.parse_args()
    res = run(tuple(args.datasets), list(range(args.seeds)))
    args.out.write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
    for ds, d in res["datasets"].items():
        print(
            f"{ds}: best clean alone {d['best_clean_alone_mean']:.1f}, "
            f"Stat-w/ (oracle) {d['jac_oracle_mean']:.1f}"
        )
        for row, r in d["rows"].items():
            x = r["mean_wide_minus_base"]
            print(
                f"  {row:14s} mean {r['mean']['base']:.1f} -> {r['mean']['wide']:.1f}  "
                f"{x['mean']:+.1f} [{x['low']:+.1f}, {x['high']:+.1f}]  chosen {r['retain_chosen']}"
            )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
