"""Accuracy cost of private FedAvg within a modality: ``simulate`` on TwoMoon (quick, two
sites per modality, 3 FedAvg rounds) with plain FedAvg, with SecAgg+, and with SecAgg+ plus
central DP (each site's update clipped to L2 norm ``CLIP``, Gaussian noise multiplier sigma at
two levels), over several seeds (each seed draws other data, initial weights, training order
and DP noise). Reports the clean test accuracy of each modality's FedAvg net and of the fused
answer (statistical fusion with the Jacobian, gamma chosen on validation).

Run:  python benchmarks/private_fedavg.py --out docs/results/private-fedavg.json
      (12 simulations, about 20 minutes on 2 shared CPU cores)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

CLIP = 1.0
SETTINGS: tuple[dict[str, Any], ...] = (
    {"name": "FedAvg", "secagg": False, "dp_clip": 0.0, "dp_noise": 0.0},
    {"name": "FedAvg + SecAgg+", "secagg": True, "dp_clip": 0.0, "dp_noise": 0.0},
    {"name": "SecAgg+ + DP sigma=0.1", "secagg": True, "dp_clip": CLIP, "dp_noise": 0.1},
    {"name": "SecAgg+ + DP sigma=1", "secagg": True, "dp_clip": CLIP, "dp_noise": 1.0},
)
FUSED_ROW = "Stat-w/ (ours)"
# two-sided 95% Student t quantiles by degrees of freedom
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306}


def one_run(setting: dict[str, Any], seed: int, root: Path) -> dict[str, float]:
    """One simulation; returns the clean test accuracy of each modality and of the fusion."""
    from jacfusion_fed.federation.scenario import Scenario, run_scenario

    scenario = Scenario.builtin(
        "twomoon",
        quick=True,
        sites_per_modality=2,
        seed=seed,
        columns="clean",
        fedavg_rounds=3,
        secagg=setting["secagg"],
        dp_clip=setting["dp_clip"],
        dp_noise=setting["dp_noise"],
    )
    result = run_scenario(scenario, root)
    evaluation = result.results["evaluation"]
    out = {m: float(v) for m, v in evaluation["clean_test_accuracy"].items()}
    rows = evaluation["table"]["rows"]
    fused = next(r for r in rows if r["name"] == FUSED_ROW)
    out["fused"] = float(statistics.fmean(fused["acc"]["clean"]))
    return out


def summarize(values: list[float]) -> dict[str, float]:
    """Mean and the half-width of its 95% t-interval over the seeds."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": mean, "ci95": math.nan}
    half = _T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return {"mean": mean, "ci95": half}


def render(results: dict[str, Any]) -> str:
    """The Markdown table the README quotes."""
    columns = results["columns"]
    lines = [
        "| setting | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for row in results["settings"]:
        cells = [
            f"{100 * row['summary'][c]['mean']:.1f} ± {100 * row['summary'][c]['ci95']:.1f}"
            for c in columns
        ]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def measure(root: Path, seeds: list[int]) -> dict[str, Any]:
    import flwr
    import torch

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    rows = []
    for setting in SETTINGS:
        runs = []
        for seed in seeds:
            folder = root / f"{setting['name'].replace(' ', '_').replace('+', 'p')}-{seed}"
            runs.append({"seed": seed, **one_run(setting, seed, folder)})
        columns = [k for k in runs[0] if k != "seed"]
        summary = {c: summarize([r[c] for r in runs]) for c in columns}
        rows.append({**setting, "runs": runs, "summary": summary})
    return {
        "what": "clean test accuracy (fraction) of each modality's FedAvg net and of the fused "
        "answer (statistical fusion with the Jacobian); mean and 95% t-interval half-width "
        "over seeds",
        "dataset": "twomoon (quick), 2 sites per modality, 3 FedAvg rounds",
        "dp": {"clip": CLIP, "kind": "central DP, client-side fixed clipping (Flower)"},
        "seeds": seeds,
        "columns": columns,
        "settings": rows,
        "environment": {
            "flwr": flwr.__version__ if hasattr(flwr, "__version__") else "",
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "load_before": load_before,
            "load_after": os.getloadavg(),
            "seconds": time.perf_counter() - t0,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="results JSON to write")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory(prefix="private-fedavg-") as tmp:
        results = measure(Path(tmp), seeds)
    results["markdown"] = render(results)
    from jacfusion_fed.atomicio import atomic_write_bytes

    atomic_write_bytes(args.out, (json.dumps(results, indent=2) + "\n").encode("utf-8"))
    print(results["markdown"])


if __name__ == "__main__":
    main()
