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

from collections.abc import Iterator, Mapping
from typing import Any

from jacfusion_fed.evaluation.analysis import arguments, write_result
from jacfusion_fed.evaluation.unknown import JACOBIAN_GRID, TIED_JACOBIAN_GRID
from jacfusion_fed.evaluation.variants import run_variants

DATASETS = ("avdigits", "twomoon", "emergency")
ROWS = ("robust", "robust_detect")
GRIDS = {"own_levels": JACOBIAN_GRID, "tied": TIED_JACOBIAN_GRID}


def level(hp: Mapping[str, Any]) -> str:
    """The selected (jacobian_level, gamma), as ``level/gamma``."""
    return f"{float(hp['jacobian_level']):g}/{float(hp['gamma']):g}"


def run(datasets: tuple[str, ...], seeds: list[int]) -> dict[str, Any]:
    variants = {g: {"jacobian_grid": grid} for g, grid in GRIDS.items()}
    return {
        **run_variants(datasets, seeds, variants, ROWS, level),
        "grids": {
            g: [["trust_level" if j is None else j, gamma] for j, gamma in grid]
            for g, grid in GRIDS.items()
        },
    }


def summary(res: dict[str, Any]) -> Iterator[str]:
    for ds, d in res["datasets"].items():
        yield (
            f"{ds}: best clean alone {d['best_clean_alone_mean']:.1f}, "
            f"Stat-w/ (oracle) {d['jac_oracle_mean']:.1f}"
        )
        for row, r in d["rows"].items():
            x = r["mean_tied_minus_own_levels"]
            c = {g: v["mean"] for g, v in r["clean_minus_stat"].items()}
            yield (
                f"  {row:14s} mean {r['mean']['own_levels']:.1f} -> {r['mean']['tied']:.1f}  "
                f"{x['mean']:+.1f} [{x['low']:+.1f}, {x['high']:+.1f}]  clean - Stat-w/o "
                f"{c['own_levels']:+.1f} -> {c['tied']:+.1f}"
            )


def main() -> None:
    ap = arguments(__doc__)
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    args = ap.parse_args()
    res = run(tuple(args.datasets), list(range(args.seeds)))
    write_result(args.out, res, summary(res))


if __name__ == "__main__":
    main()
