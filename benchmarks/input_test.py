"""What if each owner's p-value included its attack-free input test? (issue 20)

``benchmarks/supervised_detectors.py`` found one detector that sees the AV-Digits audio
attacks: a small CNN on the input, trained by the owner on clean inputs against the same
inputs plus random sign noise (no attack, no label). Here it becomes part of what the owner
would publish (:mod:`jacfusion_fed.training.input_detector`): fitted on the owner's training
split, its clean validation split the conformal reference, and the owner's p-value is the
Bonferroni combination of its layered feature p-value and the input test's
(``Signals(input_detectors=)``; every modality with (C, H, W) inputs, so both AV-Digits
owners). Nothing else changes, and the detector-aware attacks go through it (it is
differentiable from the input).

Two measurements, 3 training seeds:

* ``detection``: the detection table (``run_detection(input_test=True)``): AUROC per signal
  and setting, non-adaptive and under the detector-aware attack (Fisher reliability, fixed
  hyperparameters), with ``input`` (the input test alone) next to ``feature`` (what the owner
  would publish); cluster bootstrap intervals over test samples;
* ``unknown``: the AV-Digits "perturbed modality unknown" table (``run_unknown``:
  hyperparameters selected per test column on validation without the column's perturbation
  type; attacked columns end to end through each row; robust + detectors also through the
  detector-aware attack on the new signals) run twice in this process, without input tests
  (the committed table) and with them (``jacfusion_fed.evaluation.variants``): per row the
  mean, every column, the per-sample difference, clean against Stat-w/o and both runs'
  targets.

Run:  python benchmarks/input_test.py --out docs/results/avdigits-input-test.json
      (about 9 minutes on 2 cores with the nets in the model cache: 533 s for the committed run)
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import Any

from jacfusion_fed.evaluation.analysis import arguments, stamp, write_result
from jacfusion_fed.evaluation.detection import run_detection
from jacfusion_fed.evaluation.variants import run_variants
from jacfusion_fed.training import input_detector

ROWS = ("robust", "robust_detect")
DETECTION_KEYS = ("dataset", "seeds", "signals", "settings", "table", "environment", "seconds")


def gate(hp: Mapping[str, Any]) -> str:
    """The selected (floor, trust level, retain), as ``floor/trust/retain``."""
    return f"{float(hp['floor']):g}/{float(hp['trust_level']):g}/{float(hp.get('retain', 0)):g}"


def run(seeds: list[int], resamples: int) -> dict[str, Any]:
    start = time.perf_counter()
    det = run_detection("avdigits", seeds, input_test=True, resamples=resamples)
    variants = {"tables": {}, "input_test": {"input_test": True}}
    unknown = run_variants(("avdigits",), seeds, variants, ROWS, gate)
    return {
        "input_detector": {
            "noise": [input_detector.LOW, input_detector.HIGH],
            "epochs": input_detector.EPOCHS,
            "batch": input_detector.BATCH,
            "combination": "bonferroni",
        },
        "detection": {k: det[k] for k in DETECTION_KEYS},
        "unknown": unknown,
        **stamp(start),
    }


def summary(res: dict[str, Any]) -> Iterator[str]:
    for cell in res["detection"]["table"].values():
        if "auroc" not in cell:
            continue
        a = cell["auroc"]
        line = (
            f"{cell['label']:18s} input {100 * a['input']:5.1f}  feature {100 * a['feature']:5.1f}"
            f"  fisher {100 * a['fisher']:5.1f}"
        )
        if "adaptive" in cell:
            b = cell["adaptive"]["auroc"]
            line += (
                f"  | adaptive: input {100 * b['input']:5.1f}  feature {100 * b['feature']:5.1f}"
                f"  fisher {100 * b['fisher']:5.1f}"
            )
        yield line
    d = res["unknown"]["datasets"]["avdigits"]
    yield (
        f"best clean alone {d['best_clean_alone_mean']:.1f}, Stat-w/ (oracle) "
        f"{d['jac_oracle_mean']:.1f}, Stat-w/o {d['stat_mean']:.1f}"
    )
    for row, r in d["rows"].items():
        x = r["mean_input_test_minus_tables"]
        c = r["clean_minus_stat"]["input_test"]
        yield (
            f"  {row:14s} mean {r['mean']['tables']:.1f} -> {r['mean']['input_test']:.1f}  "
            f"{x['mean']:+.1f} [{x['low']:+.1f}, {x['high']:+.1f}]; clean - Stat-w/o "
            f"{c['mean']:+.1f} [{c['low']:+.1f}, {c['high']:+.1f}]"
        )


def main() -> None:
    args = arguments(__doc__, resamples=2000).parse_args()
    res = run(list(range(args.seeds)), args.resamples)
    write_result(args.out, res, summary(res))


if __name__ == "__main__":
    main()
