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
modality alone, Stat-w/ with the oracle), which ``retain`` the selection chose, and both
runs' targets (issues 11 and 20) (``jacfusion_fed.evaluation.variants``).

Run:  python benchmarks/retain_selection.py --out docs/results/retain-selection.json
      (about 8 minutes on 2 cores with the nets in the model cache)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from jacfusion_fed.evaluation.analysis import arguments, write_result
from jacfusion_fed.evaluation.unknown import RETAINS
from jacfusion_fed.evaluation.variants import run_variants

DATASETS = ("avdigits", "twomoon", "emergency")
WIDE: tuple[float, ...] = (0.0, 0.25, 0.5)
ROWS = ("robust", "robust_detect")


def retain(hp: Mapping[str, Any]) -> str:
    """The selected retain value."""
    return f"{float(hp.get('retain', 0.0)):g}"


def run(datasets: tuple[str, ...], seeds: list[int]) -> dict[str, Any]:
    variants = {"base": {"retains": RETAINS}, "wide": {"retains": WIDE}}
    return {
        **run_variants(datasets, seeds, variants, ROWS, retain),
        "retains": {"base": list(RETAINS), "wide": list(WIDE)},
    }


def summary(res: dict[str, Any]) -> Iterator[str]:
    for ds, d in res["datasets"].items():
        yield (
            f"{ds}: best clean alone {d['best_clean_alone_mean']:.1f}, "
            f"Stat-w/ (oracle) {d['jac_oracle_mean']:.1f}"
        )
        for row, r in d["rows"].items():
            x = r["mean_wide_minus_base"]
            yield (
                f"  {row:14s} mean {r['mean']['base']:.1f} -> {r['mean']['wide']:.1f}  "
                f"{x['mean']:+.1f} [{x['low']:+.1f}, {x['high']:+.1f}]  "
                f"chosen {r['chosen']['wide']}"
            )


def main() -> None:
    ap = arguments(__doc__)
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    args = ap.parse_args()
    res = run(tuple(args.datasets), list(range(args.seeds)))
    write_result(args.out, res, summary(res))


if __name__ == "__main__":
    main()
