"""Robust's Jacobian term at its own level, or only where the gate distrusts? (issue 20)

``robust_fusion(jacobian_level=l)`` moves a modality's logits towards the paper's Stat-w/
where its reliability r is below l (s = min(1, r / l)). The reliability of a clean sample is a
p-value, so a level of 0.3 regularizes about 30 % of the clean samples by construction. Issue
20 asks that the regularization apply "only where the combined evidence says so" and that the
clean loss disappear. The tables select the level from levels of its own up to 0.6
(``unknown.JACOBIAN_GRID``); ``unknown.TIED_JACOBIAN_GRID`` ties it to the gate's trust level
(off, or level = trust level with gamma 0.1 or 0.5), so the term acts only where the gate
distrusts a modality.

For each dataset the whole "perturbed modality unknown" table (``run_unknown``: 3 training
seeds, hyperparameters selected per test column on validation without the column's
perturbation type, attacked columns end to end through each row) is run with both grids in
this process, everything else the same. Reported per dataset and row: the mean over the
settings, the clean column, every column, the difference (tied - own levels) per sample
(cluster bootstrap over test samples, seeds kept together), the difference to Stat-w/o on
clean data, the issue's bars, which (jacobian_level, gamma) the selection chose, and both
runs' targets (issues 11 and 20) as the tables state them.

Run:  python benchmarks/jacobian_evidence.py --out docs/results/jacobian-evidence.json
      (about 4 minutes on 2 cores with the nets in the model cache)
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
from jacfusion_fed.evaluation.unknown import JACOBIAN_GRID, TIED_JACOBIAN_GRID
from jacfusion_fed.evaluation.unknown_report import per_sample_correct, run_unknown
from jacfusion_fed.evaluation.unknown_targets import best_clean_alone, targets

DATASETS = ("avdigits", "twomoon", "emergency")
ROWS = ("robust", "robust_detect")
GRIDS = {"own_levels": JACOBIAN_GRID, "tied": TIED_JACOBIAN_GRID}


def _chosen(result: dict[str, Any], row: str) -> dict[str, int]:
    """How often the selection chose each (jacobian_level, gamma), over seeds and columns."""
    counts = Counter(
        f"{float(p[row]['jacobian_level']):g}/{float(p[row]['gamma']):g}"
        for s in result["seeds"]
        for p in result["per_seed"][str(s)]["params"].values()
    )
    return dict(sorted(counts.items()))


def compare(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    old, new = runs["own_levels"], runs["tied"]
    settings = new["settings"]
    out: dict[str, Any] = {
        "best_clean_alone_mean": float(np.mean([best_clean_alone(new, k) for k in settings])),
        "jac_oracle_mean": float(new["mean"]["jac_oracle"]),
        "stat_mean": float(new["mean"]["stat"]),
        "stat_clean": float(new["pooled"]["clean"]["stat"]),
        # issue 11's and issue 20's targets of each run, as the tables state them
        "targets": {g: targets(r) for g, r in runs.items()},
        "robust_minus_stat": {
            g: {k: r["pooled"][k]["robust-stat"] for k in settings} for g, r in runs.items()
        },
        "rows": {},
    }
    for row in ROWS:
        out["rows"][row] = {
            "mean": {g: float(r["mean"][row]) for g, r in runs.items()},
            "clean": {g: float(r["pooled"]["clean"][row]) for g, r in runs.items()},
            "per_setting": {
                k: {g: float(r["pooled"][k][row]) for g, r in runs.items()} for k in settings
            },
            "mean_tied_minus_own_levels": cluster_bootstrap(
                per_sample_correct(new, row, None), per_sample_correct(old, row, None)
            ),
            "per_setting_tied_minus_own_levels": {
                k: cluster_bootstrap(
                    per_sample_correct(new, row, k), per_sample_correct(old, row, k)
                )
                for k in settings
            },
            "clean_minus_stat": {
                g: cluster_bootstrap(
                    per_sample_correct(r, row, "clean"), per_sample_correct(r, "stat", "clean")
                )
                for g, r in runs.items()
            },
            "chosen": {g: _chosen(r, row) for g, r in runs.items()},
        }
    return out


def run(datasets: tuple[str, ...], seeds: list[int]) -> dict[str, Any]:
    start = time.perf_counter()
    results: dict[str, Any] = {}
    env: dict[str, Any] = {}
    for ds in datasets:
        runs = {g: run_unknown(ds, seeds, jacobian_grid=grid) for g, grid in GRIDS.items()}
        env.setdefault(ds, {**runs["tied"]["environment"], "threads": runs["tied"]["threads"]})
        results[ds] = {
            **compare(runs),
            "seconds": {g: r["seconds"] for g, r in runs.items()},
        }
    return {
        "seeds": seeds,
        "grids": {
            g: [["trust_level" if j is None else j, gamma] for j, gamma in grid]
            for g, grid in GRIDS.items()
        },
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
            x = r["mean_tied_minus_own_levels"]
            c = {g: v["mean"] for g, v in r["clean_minus_stat"].items()}
            print(
                f"  {row:14s} mean {r['mean']['own_levels']:.1f} -> {r['mean']['tied']:.1f}  "
                f"{x['mean']:+.1f} [{x['low']:+.1f}, {x['high']:+.1f}]  clean - Stat-w/o "
                f"{c['own_levels']:+.1f} -> {c['tied']:+.1f}"
            )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
