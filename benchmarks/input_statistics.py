"""Would an input-statistics test see the attacks the owners' nets do not? (issue 20)

Issue 20 asks the owner for "an input-statistics test where the input allows one" next to the
feature detector. The owner's detector reads every layer of its net
(``docs/results/avdigits-detection.md``): it sees the AV-Digits image attacks (AUROC about 94)
but not the audio ones (about 55 and 51). This measures two label-free statistics of the raw
input itself, for every AV-Digits setting, 3 training seeds (the attacks depend on the nets),
against the same clean test samples:

* ``roughness``: the mean squared difference of neighbouring input entries along each axis
  (a sign-gradient attack adds high-frequency energy);
* ``input_mahalanobis``: the owner's class-conditional Mahalanobis detector
  (:func:`~jacfusion_fed.fusion.fit_feature_detector`) fitted on the flattened clean
  validation inputs, min over classes (the input as one more "layer").

AUROC for "this input is perturbed" (higher score = more perturbed), mean over seeds, with the
detection table's cluster bootstrap interval over test samples (seeds kept together); and the
attack's size next to the input's spread (the L-infinity budget and RMS of the perturbation,
the RMS of the clean input).

Run:  python benchmarks/input_statistics.py --out docs/results/avdigits-input-statistics.json
      (under a minute with the nets in the model cache)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jacfusion_fed.evaluation.detection import auroc_interval
from jacfusion_fed.evaluation.provenance import provenance
from jacfusion_fed.evaluation.unknown import SeedRun, perturbation_type
from jacfusion_fed.fusion.detection import feature_scores, fit_feature_detector

STATISTICS = ("roughness", "input_mahalanobis")


def roughness(x: torch.Tensor) -> np.ndarray:
    """(N,) mean squared difference of neighbouring entries along each of the last two axes
    (the last axis only for flat inputs)."""
    x = x.double().reshape(x.shape[0], -1, x.shape[-1]) if x.ndim > 2 else x.double()
    if x.ndim == 2:
        return ((x[:, 1:] - x[:, :-1]) ** 2).mean(1).numpy()
    rows = ((x[:, 1:, :] - x[:, :-1, :]) ** 2).mean((1, 2))
    cols = ((x[:, :, 1:] - x[:, :, :-1]) ** 2).mean((1, 2))
    return (rows + cols).numpy()


def run(seeds: list[int], resamples: int) -> dict[str, Any]:
    start = time.perf_counter()
    torch.set_num_threads(1)
    pos: dict[str, dict[str, list[np.ndarray]]] = {}  # setting -> statistic -> per seed (1, N)
    neg: dict[str, dict[str, list[np.ndarray]]] = {}
    size: dict[str, dict[str, list[float]]] = {}
    labels: dict[str, dict[str, Any]] = {}
    env: dict[str, Any] = {}
    for seed in seeds:
        r = SeedRun("avdigits", seed)
        env = env or {**provenance(r.data), "threads": 1}
        for m, name in enumerate(r.modalities):
            x_val, x_test = r.x["val"][m].double(), r.x["test"][m].double()
            det = fit_feature_detector(x_val.reshape(len(x_val), -1), r.y["val"], 10)

            def scores(x: torch.Tensor, det: Any = det) -> dict[str, np.ndarray]:
                flat = x.double().reshape(len(x), -1)
                return {
                    "roughness": roughness(x),
                    "input_mahalanobis": feature_scores(det, flat).numpy(),
                }

            clean = scores(x_test)
            for s in r.settings:
                if s.perturbed != name:
                    continue
                xs, _ = r.inputs(s, "test", 0)
                pert = scores(xs[m])
                d = (xs[m].double() - x_test).reshape(len(x_test), -1)
                labels[s.key] = {"label": s.label, "type": perturbation_type(s), "modality": name}
                for stat in STATISTICS:
                    pos.setdefault(s.key, {}).setdefault(stat, []).append(pert[stat][None, :])
                    neg.setdefault(s.key, {}).setdefault(stat, []).append(clean[stat])
                cell = size.setdefault(s.key, {"linf": [], "rms": [], "input_rms": []})
                cell["linf"].append(float(d.abs().max()))
                cell["rms"].append(float(d.pow(2).mean().sqrt()))
                cell["input_rms"].append(float(x_test.std()))
    table: dict[str, Any] = {}
    for key, lab in labels.items():
        intervals = {
            stat: auroc_interval(pos[key][stat], neg[key][stat], resamples=resamples)
            for stat in STATISTICS
        }
        table[key] = {
            **lab,
            "auroc": {stat: intervals[stat]["mean"] for stat in STATISTICS},  # mean over seeds
            "auroc_interval": intervals,
            "perturbation": {k: float(np.mean(v)) for k, v in size[key].items()},
        }
    return {
        "dataset": "avdigits",
        "seeds": seeds,
        "statistics": list(STATISTICS),
        "table": table,
        "resamples": resamples,
        "environment": env,
        "load_average": list(os.getloadavg()),
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--resamples", type=int, default=2000)
    args = ap.parse_args()
    res = run(list(range(args.seeds)), args.resamples)
    args.out.write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
    for c in res["table"].values():
        aucs = "  ".join(
            f"{s} {100 * c['auroc'][s]:5.1f} [{100 * c['auroc_interval'][s]['low']:.1f}, "
            f"{100 * c['auroc_interval'][s]['high']:.1f}]"
            for s in STATISTICS
        )
        p = c["perturbation"]
        print(
            f"{c['label']:18s} {aucs}  |dx|inf {p['linf']:.3f} rms {p['rms']:.3f} "
            f"(input rms {p['input_rms']:.3f})"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
