"""What if the owners trained robust nets? (issue 20)

A detector that an attack at distance eps cannot move yields a (computationally inefficient)
classifier robust at eps/2 (Tramèr, ICML 2022), so the robust-detection route ends at robust
owners' nets. This measures the direct form of that route with what the project has: the
AV-Digits "perturbed modality unknown" table (``run_unknown``: 3 training seeds,
hyperparameters selected per test column on validation without the column's perturbation
type, attacked columns end to end through each row, robust + detectors also through the
detector-aware attack) run twice in this process, once with the owners' regular nets (the
table) and once with nets the owners adversarially trained (the ``adversarial`` add-on of
``jacfusion_fed.training``: PGD training at eps 0.03, alpha 0.01, 7 steps, the paper's
Section 5.1 recipe), everything else the same.

Reported per row: the mean over the settings, every column, the difference (adversarial -
regular) per test sample (cluster bootstrap, seeds kept together), the clean column against
Stat-w/o, and both runs' targets with their own bars (the best clean modality alone and the
oracle Stat-w/ are measured on each run's nets).

Run:  python benchmarks/robust_owners.py --out docs/results/avdigits-robust-owners.json
      (about 5 minutes on 2 cores; about 3 more the first time, to train the nets)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from jacfusion_fed.evaluation.analysis import arguments, write_result
from jacfusion_fed.evaluation.variants import run_variants
from jacfusion_fed.training import resolve_params

ROWS = ("robust", "robust_detect")
METHODS = ("regular", "adversarial")


def trust(hp: Mapping[str, Any]) -> str:
    """The selected (floor, trust level), as ``floor/trust``."""
    return f"{float(hp['floor']):g}/{float(hp['trust_level']):g}"


def run(seeds: list[int]) -> dict[str, Any]:
    variants = {m: {"method": m} for m in METHODS}
    return {
        **run_variants(("avdigits",), seeds, variants, ROWS, trust),
        "methods": {m: resolve_params(m, {}) for m in METHODS},
    }


def summary(res: dict[str, Any]) -> Iterator[str]:
    d = res["datasets"]["avdigits"]
    for method, t in d["targets"].items():
        m = t["mean"]
        yield (
            f"{method:11s} owners: best clean alone {m['best_clean_alone']:.1f}, Stat-w/ (oracle) "
            f"{m['jac_oracle']:.1f}, Stat-w/o {m['stat']:.1f}, robust {m['robust']:.1f}"
        )
    for row, r in d["rows"].items():
        x = r["mean_adversarial_minus_regular"]
        yield (
            f"  {row:14s} mean {r['mean']['regular']:.1f} -> {r['mean']['adversarial']:.1f}  "
            f"{x['mean']:+.1f} [{x['low']:+.1f}, {x['high']:+.1f}]"
        )


def main() -> None:
    args = arguments(__doc__).parse_args()
    res = run(list(range(args.seeds)))
    write_result(args.out, res, summary(res))


if __name__ == "__main__":
    main()
