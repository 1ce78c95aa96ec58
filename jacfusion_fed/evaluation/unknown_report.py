"""Run the "perturbed modality unknown" table over several training seeds and write it
(Markdown + JSON), with paired bootstrap intervals for the marked differences."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jacfusion_fed.atomicio import atomic_write_bytes

from .provenance import provenance
from .stats import cluster_bootstrap, holm_marks, paired_bootstrap, seed_spread
from .unknown import JACOBIAN_GRID, RETAINS, ROW_LABELS, ROWS, SeedRun
from .unknown_targets import targets_markdown

__all__ = [
    "paired_bootstrap",
    "per_sample_correct",
    "run_unknown",
    "unknown_markdown",
    "write_unknown",
]

MARKED = (("jac_oracle", "stat"), ("robust", "stat"), ("robust_detect", "stat"))
"""Differences the table marks: Stat-w/ (oracle), robust and robust + detectors - Stat-w/o."""
COMPARED = (("robust_detect", "robust"),)
"""Differences with an interval but no mark (outside the Holm family): what the detectors add."""


def per_sample_correct(result: dict[str, Any], row: str, key: str | None = None) -> np.ndarray:
    """Per-sample correctness (S, N) of ``row`` in setting ``key`` of a :func:`run_unknown`
    result, one row per training seed (``key`` None: the mean over every setting)."""
    keys = result["settings"] if key is None else [key]
    return np.stack(
        [
            np.mean([result["per_seed"][str(s)]["table"][k]["correct"][row] for k in keys], axis=0)
            for s in result["seeds"]
        ]
    )


def run_unknown(
    dataset: str,
    seeds: Sequence[int],
    *,
    quick: bool = False,
    repeats: int = 2,
    alpha: float = 0.1,
    threads: int = 1,
    retains: Sequence[float] = RETAINS,
    jacobian_grid: Sequence[tuple[float | None, float]] = JACOBIAN_GRID,
    method: str = "regular",
    input_test: bool = False,
) -> dict[str, Any]:
    """Every seed's :meth:`SeedRun.evaluate`, per-seed means, their spread, and cluster
    bootstrap intervals over test samples (seeds kept together), Holm-corrected marks.
    ``threads``: torch threads for the whole run (pinned: training depends on it);
    ``retains``: the ``retain`` values robust selects from (:data:`~.unknown.RETAINS`);
    ``jacobian_grid``: its (jacobian_level, gamma) pairs (:data:`~.unknown.JACOBIAN_GRID`);
    ``method``: how the owners train their nets (``"regular"``: the tables');
    ``input_test``: the owners' p-values include their input tests (:class:`SeedRun`)."""
    start = time.perf_counter()
    per_seed: dict[str, Any] = {}
    runs = []
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)  # training and attacks: the same numbers on any machine
    try:
        for seed in seeds:
            run = SeedRun(
                dataset,
                seed,
                quick=quick,
                repeats=repeats,
                alpha=alpha,
                retains=retains,
                jacobian_grid=jacobian_grid,
                method=method,
                input_test=input_test,
            )
            params = run.select()
            per_seed[str(seed)] = {"params": params, "models": run.models, "table": run.evaluate()}
            runs.append(run)
    finally:
        torch.set_num_threads(prev_threads)
    settings = [s.key for s in runs[0].settings]
    labels = {s.key: s.label for s in runs[0].settings}
    rows = [f"alone:{m}" for m in runs[0].modalities] + list(ROWS)
    pooled: dict[str, dict[str, Any]] = {}
    extra_keys = ("coverage", "set_size", "empty_sets", "raps_lambda", "answered", "acc_answered")
    for key in settings:
        cols = [per_seed[str(s)]["table"][key] for s in seeds]
        cell: dict[str, Any] = {"label": labels[key]}
        for r in rows:
            per = [100 * float(np.mean(c["correct"][r])) for c in cols]
            cell[r] = float(np.mean(per))
            cell[f"{r}:seed_sd"] = seed_spread(per)
        for k in extra_keys:
            cell[k] = float(np.mean([c.get(k, 0.0) for c in cols]))
        for a, b in MARKED + COMPARED:  # (seeds, N): samples resampled with their seeds together
            ca = np.stack([c["correct"][a] for c in cols])
            cb = np.stack([c["correct"][b] for c in cols])
            cell[f"{a}-{b}"] = cluster_bootstrap(ca, cb)
        attacks: dict[str, list[float]] = {}
        for c in cols:
            for name, entries in c.get("robust_attacks", {}).items():
                for e in entries:
                    attacks.setdefault(name, []).append(e["acc"])
                    attacks.setdefault(name + ":reliability", []).append(e["reliability"])
        cell["robust_attacks"] = {k: float(np.mean(v)) for k, v in attacks.items()}
        detect: dict[str, list[float]] = {}
        for c in cols:
            for name, accs in c.get("robust_detect_attacks", {}).items():
                detect.setdefault(name, []).extend(accs)
        cell["robust_detect_attacks"] = {k: float(np.mean(v)) for k, v in detect.items()}
        pooled[key] = cell
    mean_cell: dict[str, Any] = {"label": "Mean"}
    for r in rows:
        mean_cell[r] = float(np.mean([pooled[k][r] for k in settings]))
        per = [
            100
            * float(
                np.mean([np.mean(per_seed[str(s)]["table"][k]["correct"][r]) for k in settings])
            )
            for s in seeds
        ]
        mean_cell[f"{r}:seed_sd"] = seed_spread(per)
    for a, b in MARKED + COMPARED:  # per sample: mean over the settings, then clustered
        ca, cb = (
            np.stack(
                [
                    np.mean([per_seed[str(s)]["table"][k]["correct"][x] for k in settings], axis=0)
                    for s in seeds
                ]
            )
            for x in (a, b)
        )
        mean_cell[f"{a}-{b}"] = cluster_bootstrap(ca, cb)
    for k in extra_keys:
        mean_cell[k] = float(np.mean([pooled[s][k] for s in settings]))
    tests = {
        (c, f"{a}-{b}"): cell[f"{a}-{b}"]
        for c, cell in [*pooled.items(), ("mean", mean_cell)]
        for a, b in MARKED
    }
    for (c, name), m in holm_marks(tests).items():
        (mean_cell if c == "mean" else pooled[c])[f"{name}:mark"] = m
    return {
        "dataset": dataset,
        "data_seed": 1 if dataset == "emergency" else 0,  # the example's seed
        "seeds": list(seeds),
        "quick": quick,
        "repeats": repeats,
        "alpha": alpha,
        "threads": threads,
        **({"input_test": True} if input_test else {}),
        "retains": [float(r) for r in retains],
        "jacobian_grid": [
            ["trust_level" if j is None else float(j), float(g)] for j, g in jacobian_grid
        ],
        "settings": settings,
        "rows": rows,
        "pooled": pooled,
        "mean": mean_cell,
        "per_seed": per_seed,
        "environment": provenance(runs[0].data),
        "seconds": time.perf_counter() - start,
    }


def _mark(cell: dict[str, Any], name: str) -> str:
    return " " + str(cell[f"{name}:mark"])


def _ci(t: dict[str, float]) -> str:
    return f"{t['mean']:+.1f} [{t['low']:+.1f}, {t['high']:+.1f}] (seed sd {t['seed_sd']:.1f})"


def unknown_markdown(result: dict[str, Any]) -> str:
    """The table: rows x (settings + mean), coverage / set size / abstention lines, notes."""
    cols = [result["pooled"][k] for k in result["settings"]] + [result["mean"]]
    head = "| Row | " + " | ".join(c["label"] for c in cols) + " |"
    lines = [head, "|---|" + ":---:|" * len(cols)]
    for r in result["rows"]:
        label = f"{r.split(':', 1)[1]} alone" if r.startswith("alone:") else ROW_LABELS[r]
        cells = []
        for c in cols:
            mark = next((_mark(c, f"{a}-{b}") for a, b in MARKED if a == r), "")
            cells.append(f"{c[r]:.1f} ±{c[f'{r}:seed_sd']:.1f}{mark}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    fmt: dict[str, Callable[[dict[str, Any]], str]] = {
        "robust with abstention: acc. on answered": lambda c: f"{100 * c['acc_answered']:.1f}",
        "robust with abstention: fraction answered": lambda c: f"{100 * c['answered']:.1f}",
        f"conformal coverage (alpha = {result['alpha']})": lambda c: f"{100 * c['coverage']:.1f}",
        "mean set size": lambda c: f"{c['set_size']:.2f}",
        "empty-set rate %": lambda c: f"{100 * c['empty_sets']:.1f}",
        "RAPS size penalty (validation, mean over seeds)": lambda c: f"{c['raps_lambda']:.2f}",
    }
    for name, f in fmt.items():
        lines.append(f"| {name} | " + " | ".join(f(c) for c in cols) + " |")
    ci_lines = []
    for c in cols:
        parts = [f"{a} − {b} {_ci(c[f'{a}-{b}'])}" for a, b in MARKED + COMPARED if f"{a}-{b}" in c]
        ci_lines.append(f"- {c['label']}: " + "; ".join(parts))
    att = [(c["label"], c.get("robust_attacks", {})) for c in cols[:-1]]
    det = [(c["label"], c.get("robust_detect_attacks", {})) for c in cols[:-1]]
    det_lines = [
        f"- {label}: "
        + "; ".join(
            f"{n} {100 * a[n]:.1f} %" for n in ("setting1", "e2e", "detector_aware") if n in a
        )
        for label, a in det
        if a
    ]
    att_lines = [
        f"- {label}: "
        + "; ".join(
            f"{n} {100 * a[n]:.1f} % (attacked modality's reliability {a[n + ':reliability']:.2f})"
            for n in ("setting1", "e2e", "detector_aware")
            if n in a
        )
        for label, a in att
        if a
    ]
    env = result["environment"]
    notes = [
        "",
        f"Accuracy %, mean over training seeds {result['seeds']} (data seed "
        f"{result.get('data_seed', 1 if result['dataset'] == 'emergency' else 0)}"
        f"{', quick data' if result['quick'] else ''}), {result['repeats']} draw(s) of each "
        "random corruption. Attacked columns: per sample the worst of the setting-1 attack and "
        "an end-to-end attack through the row's fusion (robust also: the detector-aware "
        "attack; robust + detectors: through its detectors too, and the detector-aware attack "
        "on them). robust + detectors adds each owner's feature-detector p-value and the "
        "cross-modal consistency p-value to robust's typicality (Fisher or Cauchy, selected "
        "with the rest). Hyperparameters "
        "chosen once per seed and test column on validation, "
        "leaving out every validation setting of the column's perturbation type (the clean "
        "column: all settings); robust's conformal set is RAPS on the fused probabilities "
        "(the arg-max always in), its size penalty and calibration from two halves of the clean "
        "validation data. Cells: mean over seeds ± the seed spread (sd).",
        "Marks: the cluster bootstrap over test samples (every seed of a sample kept together) "
        "of the difference to Stat-w/o; ↑ / ↓ when its Holm-adjusted p-value over all "
        f"{len(MARKED) * len(cols)} marks of this table is below 0.05, = otherwise (a tie). "
        "Intervals (points, 95 %, not adjusted) and the seed spread of the difference "
        "(robust_detect − robust: what the detectors add, not marked):",
        *ci_lines,
        "",
        *targets_markdown(result),
        "",
        "robust under each attack alone (accuracy, mean reliability of the attacked modality; "
        "the table takes the per-sample worst of the three):",
        *att_lines,
        "",
        "robust + detectors under each attack alone (accuracy; the table takes the per-sample "
        "worst of the three: setting 1, end to end through robust + detectors, detector-aware "
        "on the detectors):",
        *det_lines,
        "",
        (f"eSpeak NG {env['espeak_ng_version']}, " if env.get("espeak_ng_version") else "")
        + f"data sha256 {env['data_sha256'][:16]}…, "
        f"torch {env['packages'].get('torch')}; {result['seconds']:.0f} s.",
    ]
    return "\n".join(lines + notes) + "\n"


def write_unknown(result: dict[str, Any], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{result['dataset']}-unknown"
    md, js = out_dir / f"{stem}.md", out_dir / f"{stem}.json"
    atomic_write_bytes(md, unknown_markdown(result).encode())
    text = json.dumps(result, sort_keys=True, separators=(",", ":"))  # per-sample lists: compact
    atomic_write_bytes(js, (text + "\n").encode())
    return [md, js]
