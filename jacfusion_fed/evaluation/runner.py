"""``run_evaluation``: train (or load cached) nets, then measure the paper's tables and figures."""

from __future__ import annotations

import platform
import resource
import time
from dataclasses import asdict, replace
from typing import Any

import numpy as np
import torch

from jacfusion_fed.data import MultimodalDataset, load_builtin
from jacfusion_fed.fusion import log_prior_from_counts
from jacfusion_fed.robustness import GaussianNoise
from jacfusion_fed.training import evaluate_accuracy

from .config import METHOD_ABBREV, PRESETS, DatasetPreset, EvaluationConfig
from .heatmaps import multimodal_heatmaps, unimodal_heatmaps
from .nets import NetZoo
from .pipeline import TableRun
from .provenance import provenance
from .results import EvaluationResult, Table

__all__ = ["run_evaluation"]

TWOMOON_NOISE = (GaussianNoise(0.5), GaussianNoise(1.5))
"""Figure 3's small and large noise on the Y coordinate (Figure 2 uses the small one on both)."""


def merge_seeds(tables: list[Table]) -> Table:
    """One table from the same table of several training seeds (same rows, columns, data):
    per cell the repeats of every seed, each seed's mean (``seed_acc``), the per-sample
    correctness per seed (``correct_seeds``, for the cluster bootstrap) and its mean over the
    seeds (``correct``); the gammas are the first seed's."""
    first = tables[0]
    if len(tables) == 1:
        for row in first.rows:
            row.seed_acc = {k: [float(np.mean(v))] for k, v in row.acc.items() if v}
            row.correct_seeds = {k: [v] for k, v in row.correct.items()}
        return first
    for j, row in enumerate(first.rows):
        others = [t.rows[j] for t in tables]
        assert all((r.group, r.kind, r.name) == (row.group, row.kind, row.name) for r in others)
        row.seed_acc = {
            k: [float(np.mean(r.acc[k])) for r in others] for k in row.acc if row.acc[k]
        }
        row.acc = {k: [a for r in others for a in r.acc[k]] for k in row.acc}
        row.correct_seeds = {k: [r.correct[k] for r in others] for k in row.correct}
        row.correct = {
            k: [round(float(x), 6) for x in np.mean(v, axis=0)]
            for k, v in row.correct_seeds.items()
        }
    return first


def _table_notes(config: EvaluationConfig, repeats: int, seeds: list[int]) -> list[str]:
    gamma = (
        f"gamma fixed at {config.gamma:g}"
        if config.gamma is not None
        else "gamma selected per pair, row and column from "
        f"{{{', '.join(f'{g:g}' for g in config.gamma_candidates)}}} by validation accuracy "
        "under the same perturbation (ties: larger gamma); adaptive columns reuse the gamma "
        "selected under the setting-1 attack of the same budget"
    )
    return [
        f"Accuracy in %, mean ± std over {repeats} test-time draws of the random corruptions "
        f"(Gaussian noise, missing entries, bias patches) and {config.attack_repeats} draw(s) "
        f"of PGD's random start, per training seed; nets are trained once per training seed "
        f"{seeds} (data of seed {config.seed}; torch threads pinned to {config.threads}); "
        "FGSM is deterministic and computed once per seed. With several seeds a cell shows "
        "the mean over the seeds ± the seed spread (sd of the per-seed means); gammas shown "
        "are the first seed's.",
        gamma + ".",
        "Setting 1 (FGSM, PGD): attack computed on the perturbed modality's own net. Adaptive: "
        "white-box attack through the whole fused prediction of each row (Jacobian solve "
        "included, other modality fixed, same budget), combined per sample with the setting-1 "
        "attack (the worse of the two for the defender counts); the pure end-to-end numbers are "
        "in the JSON under '<column>:e2e_only'.",
        "Corrupted inputs are not clipped to [0, 1] (as in the paper); attacked inputs are.",
    ]


def _load_data(config: EvaluationConfig) -> dict[str, MultimodalDataset]:
    return {
        s: load_builtin(config.dataset, s, config.seed, quick=config.quick)
        for s in ("train", "val", "test")
    }


def run_evaluation(config: EvaluationConfig) -> EvaluationResult:
    """Measure the paper's tables (and curves / heatmaps) for ``config.dataset``.

    Steps: load the built-in dataset (train / val / test); train each unimodal net once per
    seed or load it from the model cache; for every perturbed modality build one table (rows:
    the unimodal nets, then per pair Mean-w/o, Mean-w/, Stat-w/o, Stat-w/ (ours) and the extra
    rows Stat-w/ on the clean modality / on all modalities; columns: clean, corruptions,
    setting-1 and adaptive attacks); then the Figure 4-style sweeps and, for TwoMoon, the
    Figure 2-3 heatmaps. Write the result with :func:`write_reports`.
    """
    start = time.perf_counter()
    prev_threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _run(config, start)
    finally:
        torch.set_num_threads(prev_threads)


def _run(config: EvaluationConfig, start: float) -> EvaluationResult:
    cpu_start = time.process_time()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_children_start = usage.ru_utime + usage.ru_stime
    preset = PRESETS[config.dataset]
    repeats = config.repeats or (preset.quick_repeats if config.quick else preset.repeats)
    timings: dict[str, float] = {}
    data = _load_data(config)
    timings["data_s"] = time.perf_counter() - start
    seeds = [config.seed + i for i in range(config.seeds)]
    zoos = {t: NetZoo(preset, replace(config, seed=t), data) for t in seeds}
    zoo = zoos[seeds[0]]
    t0 = time.perf_counter()
    for z in zoos.values():
        z.prefetch(_jobs(preset, config))
    timings["train_parallel_s"] = time.perf_counter() - t0
    tables: list[Table] = []
    curves = []
    for perturbed in config.perturbed or tuple(preset.tables):
        tp = preset.tables[perturbed]
        names = [f"0: {preset.abbrev[tp.clean]}-regT"] + [
            f"{i}: {preset.abbrev[perturbed]}-{METHOD_ABBREV[m]}"
            for i, m in enumerate(config.methods, start=1)
        ]
        per_seed: list[Table] = []
        for t in seeds:
            t0 = time.perf_counter()
            clean_net = zoos[t].get(tp.clean, "regular")
            nets = [zoos[t].get(perturbed, m) for m in config.methods]
            timings[f"train_{perturbed}_s"] = timings.get(f"train_{perturbed}_s", 0.0) + (
                time.perf_counter() - t0
            )
            run = TableRun(
                tp,
                data,
                clean_net,
                nets,
                names,
                seed=t,
                repeats=repeats,
                attack_repeats=config.attack_repeats,
                gamma=config.gamma,
                candidates=config.gamma_candidates,
                dataset=config.dataset,
            )
            t0 = time.perf_counter()
            per_seed.append(run.table(adaptive=config.adaptive))
            timings[f"table_{perturbed}_s"] = timings.get(f"table_{perturbed}_s", 0.0) + (
                time.perf_counter() - t0
            )
            if config.curves and t == seeds[0]:
                t0 = time.perf_counter()
                pair = config.methods.index("regular") if "regular" in config.methods else 0
                curves += run.curves(tp.quick_sweeps if config.quick else tp.sweeps, pair)
                timings[f"curves_{perturbed}_s"] = time.perf_counter() - t0
        table = merge_seeds(per_seed)
        table.notes = _table_notes(config, repeats, seeds)
        tables.append(table)
    heatmaps: dict[str, Any] = {}
    if config.heatmaps and config.dataset == "twomoon":
        t0 = time.perf_counter()
        heatmaps = _twomoon_heatmaps(zoo, data, config)
        timings["heatmaps_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - start
    # CPU seconds (immune to other load on the machine): this process and finished workers.
    timings["cpu_main_s"] = time.process_time() - cpu_start
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    timings["cpu_workers_s"] = children.ru_utime + children.ru_stime - cpu_children_start
    return EvaluationResult(
        config=_config_dict(config, repeats),
        tables=tables,
        curves=curves,
        timings=timings,
        models={
            **zoo.info,
            **{f"seed {t}: {k}": v for t in seeds[1:] for k, v in zoos[t].info.items()},
        },
        heatmaps=heatmaps,
        environment={
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "machine": platform.machine(),
            **provenance(data),  # package versions, eSpeak NG version, data hash
        },
    )


def _jobs(preset: DatasetPreset, config: EvaluationConfig) -> list[tuple[str, str]]:
    jobs: list[tuple[str, str]] = []
    for perturbed in config.perturbed or tuple(preset.tables):
        clean = preset.tables[perturbed].clean
        jobs += [(clean, "regular")] + [(perturbed, m) for m in config.methods]
    if config.heatmaps and config.dataset == "twomoon":
        jobs += [("xy", "regular"), ("x", "regular"), ("y", "regular")]
    return list(dict.fromkeys(jobs))


def _config_dict(config: EvaluationConfig, repeats: int) -> dict[str, Any]:
    out = asdict(replace(config, repeats=repeats))
    out["cache_dir"] = str(config.cache_dir) if config.cache_dir else None
    return out


def _twomoon_heatmaps(
    zoo: NetZoo, data: dict[str, MultimodalDataset], config: EvaluationConfig
) -> dict[str, Any]:
    train, test = data["train"], data["test"]
    xy_test = np.concatenate([test.modalities["x"], test.modalities["y"]], axis=1)
    uni = zoo.get("xy", "regular")
    zoo.info["XY-regT"]["test_accuracy"] = evaluate_accuracy(uni, xy_test, test.labels)
    nets = (zoo.get("x", "regular"), zoo.get("y", "regular"))
    log_prior = torch.from_numpy(log_prior_from_counts(train.class_counts()))
    out: dict[str, Any] = {}
    gen = torch.Generator().manual_seed(config.seed)
    for name, panel in unimodal_heatmaps(
        uni, xy_test, test.labels, TWOMOON_NOISE[0], generator=gen
    ).items():
        out[f"unimodal/{name}"] = panel
    for level, noise in zip(("small", "large"), TWOMOON_NOISE, strict=True):
        gen = torch.Generator().manual_seed(config.seed + 1)
        panels = multimodal_heatmaps(
            nets,
            test.modalities["x"],
            test.modalities["y"],
            test.labels,
            log_prior,
            noise,
            generator=gen,
        )
        for name, panel in panels.items():
            out[f"multimodal-{level}/{name}"] = {**panel, "noise": noise.label}
    return out
