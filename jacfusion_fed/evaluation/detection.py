"""Detection table (issue 20): how well each reliability signal says "this modality is
perturbed", as AUROC per setting (perturbation type and modality), non-adaptive and adaptive.

For each training seed (:class:`~jacfusion_fed.evaluation.unknown.SeedRun`: the nets, data
and perturbations of the "perturbed modality unknown" table, setting-1 attacks on the
modality's own net), for every setting that perturbs modality m, the positives are the test
samples under the setting and the negatives the same test samples clean; the score of a
sample is 1 - u, where u is one of the p-values of modality m:

* ``typicality``: the logits-only typicality p-value already used by ``robust`` (issue 11);
* ``penultimate``: the owner's detector on the penultimate features alone (a diagnostic: what
  the last layer sees; not published);
* ``feature``: the owner's feature-detector p-value
  (:func:`~jacfusion_fed.fusion.detection.layered_pvalues`: Mahalanobis on every layer of the
  owner's net, the penultimate features last, Cauchy over the layers; activations of the
  perturbed input, computed as the owner computes it);
* ``consistency``: cross-modal consistency from logits alone
  (:func:`~jacfusion_fed.fusion.detection.consistency_pvalues`, fitted on paired clean
  validation logits);
* ``fisher`` / ``cauchy``: the three combined (:func:`~jacfusion_fed.fusion.combine_pvalues`),
  the reliability ``robust_fusion`` gets with ``pvalues=[feature, consistency]``.
* ``input`` (only with ``input_test=True``, ``benchmarks/input_test.py``): the owner's opt-in
  input test alone (:mod:`jacfusion_fed.training.input_detector`); ``feature`` is then the
  Bonferroni combination of the layered p-value and it, what such an owner publishes.

AUROC = P(score of a perturbed sample > score of a clean one) + 1/2 P(tie) (Mann-Whitney).
Accuracy of ``robust`` at fixed default hyperparameters (not selected; floor 0.05,
trust_level 0.05, no Jacobian term) with and without the new p-values is reported alongside,
as an indication only: the selected-hyperparameter table is ``evaluate --unknown``'s.
**Adaptive** (``adaptive=True``): for every attack setting, the detector-aware attack extended
to the new signals (:class:`SignalAwarePGD`): white box, it maximises
CE(robust fused with the detectors) + lam ln r_a, where r_a is the Fisher combination of the
attacked modality's typicality, feature (through the owner's net: every layer of x') and
consistency p-values (smooth interpolations, differentiable), same budget, step and steps as
the setting. Its AUROC (Fisher) and the accuracy of ``robust`` + detectors under it are the
honest figures.

**Intervals.** Every AUROC and accuracy difference gets a 95 % cluster bootstrap interval over
test samples (:mod:`~jacfusion_fed.evaluation.stats`): a resample draws N test samples with
replacement and keeps, for each, its clean and perturbed scores and every training seed
together (the positives and negatives of one AUROC are the same test samples, so they are
resampled as pairs); the statistic is the mean over seeds (and draws) of the per-seed AUROC.

**What a better detector would buy (the oracle bound).** A synthetic detector of AUROC a
publishes, per sample, u ~ U(0, 1) for every modality that is not perturbed and
u = V^c, V ~ U(0, 1), c = a / (1 - a), for the perturbed one (a = 1: u = 0, the oracle that
knows the perturbed modality), so that P(1 - u_perturbed > 1 - u_clean) = c / (c + 1) = a.
``robust`` (the same fixed hyperparameters) gets it as its extra p-value
(:func:`synthetic_pvalues`); its mean accuracy over the settings is compared with the best
clean modality alone (the issue's oracle) in the same run, per sample, with the cluster
bootstrap. The synthetic p-values are drawn independently of the input, so this measures the
gate, not a detector: how good a detector must be before gating on it beats the oracle. The
bound is computed for robust's gate (a distrusted modality dropped) and for gates that keep a
share kappa of a distrusted modality's evidence (:data:`SYNTHETIC_RETAINS`,
``robust_fusion(retain=kappa)``), on the same draws.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jacfusion_fed.atomicio import atomic_write_bytes
from jacfusion_fed.robustness import AttackSpec
from jacfusion_fed.training import predict_logits

from .provenance import provenance
from .signals import DEFAULT_HP, SIGNALS, SignalAwarePGD, robust_with
from .stats import cluster_bootstrap
from .unknown import SeedRun, perturbation_type

__all__ = [
    "SIGNALS",
    "SYNTHETIC_AUROCS",
    "SYNTHETIC_RETAINS",
    "SignalAwarePGD",
    "auroc",
    "auroc_interval",
    "detection_markdown",
    "run_detection",
    "synthetic_pvalues",
    "write_detection",
]

SYNTHETIC_AUROCS: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
SYNTHETIC_RETAINS: tuple[float, ...] = (0.0, 0.25, 0.5)
"""Gates of the bound: the share of its evidence a distrusted modality keeps
(``robust_fusion(retain=)``; 0 drops it, robust's gate in the tables)."""
RESAMPLES = 2000


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(s+ > s-) + 1/2 P(s+ = s-) of two score samples (Mann-Whitney U / (n+ n-))."""
    pos, neg = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
    if pos.size == 0 or neg.size == 0:
        raise ValueError("auroc needs at least one positive and one negative score")
    allv = np.concatenate([pos, neg])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(allv.size, np.float64)
    sorted_v = allv[order]
    # average ranks of ties
    starts = np.flatnonzero(np.r_[True, sorted_v[1:] != sorted_v[:-1]])
    ends = np.r_[starts[1:], allv.size]
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + e + 1) / 2.0
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


def _aurocs_batch(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Row-wise AUROC of ``pos`` (B, P) against ``neg`` (B, Q), ties counted one half."""
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    p = pos.shape[1]
    u = ranks[:, :p].sum(axis=1) - p * (p + 1) / 2.0
    return np.asarray(u / (p * neg.shape[1]), np.float64)


def auroc_interval(
    positive: Sequence[np.ndarray],
    negative: Sequence[np.ndarray],
    *,
    resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, float]:
    """Mean over seeds (and draws) of the AUROC and its cluster bootstrap interval.

    Args:
        positive: per seed, the perturbed samples' scores, (D, N) for D draws or (N,).
        negative: per seed, the same N test samples' clean scores, (N,).
        resamples: bootstrap resamples (fixed ``seed``: reproducible).

    Returns:
        ``{"mean", "low", "high", "seed_sd"}`` as fractions in [0, 1]; a resample draws N test
        sample indices with replacement, shared by the positives, negatives and every seed.
    """
    pos = [np.atleast_2d(np.asarray(p, np.float64)) for p in positive]
    neg = [np.asarray(q, np.float64) for q in negative]
    if not pos or len(pos) != len(neg):
        raise ValueError("auroc_interval needs one (positive, negative) pair per seed")
    n = neg[0].shape[0]
    if any(p.shape[1] != n for p in pos) or any(q.shape != (n,) for q in neg):
        raise ValueError("every seed's positives and negatives must score the same N samples")
    per_seed = [float(np.mean([auroc(d, q) for d in p])) for p, q in zip(pos, neg, strict=True)]
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    boot = np.zeros(resamples)
    for p, q in zip(pos, neg, strict=True):
        boot += np.mean([_aurocs_batch(d[idx], q[idx]) for d in p], axis=0)
    boot /= len(pos)
    lo, hi = np.quantile(boot, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {
        "mean": float(np.mean(per_seed)),
        "low": float(lo),
        "high": float(hi),
        "seed_sd": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0,
    }


def synthetic_pvalues(
    n: int, m_count: int, perturbed: int | None, a: float, gen: torch.Generator
) -> torch.Tensor:
    """p-values (N, M) of a synthetic detector of AUROC ``a`` in [0.5, 1] (module docstring):
    U(0, 1) for every modality but ``perturbed``, V^(a / (1 - a)) for it (0 when a = 1)."""
    if not 0.5 <= a <= 1.0:
        raise ValueError(f"a synthetic detector's AUROC must lie in [0.5, 1], got {a}")
    u = torch.rand(n, m_count, generator=gen, dtype=torch.float64)
    if perturbed is not None:
        u[:, perturbed] = 0.0 if a == 1.0 else u[:, perturbed] ** (a / (1.0 - a))
    return u


def _right(run: SeedRun, p: torch.Tensor) -> np.ndarray:
    """Per-sample correctness (N,) float64 of probabilities or logits ``p`` on the test split."""
    return (p.argmax(dim=1) == run.y["test"]).double().numpy()


def _robust_right(
    run: SeedRun, zs: Sequence[torch.Tensor], extra: torch.Tensor | None, retain: float = 0.0
) -> np.ndarray:
    """Per-sample correctness of robust at the fixed defaults (and ``retain``), with detection
    p-values ``extra`` (N, M, S) or without (None)."""
    hp = {**DEFAULT_HP, "retain": retain}
    return _right(run, robust_with(zs, run.calibrations, run.log_prior, None, extra, hp).p)


def _extra(p: dict[str, torch.Tensor]) -> torch.Tensor:
    """The (feature, consistency) p-values (N, M, 2) robust gets, from :meth:`Signals.pvalues`."""
    return torch.stack([p["feature"], p["consistency"]], dim=2)


def _synthetic(
    run: SeedRun, zs: Sequence[torch.Tensor], m: int | None, key: str, draw: int
) -> dict[tuple[float, float], np.ndarray]:
    """Per-sample correctness of robust (fixed hyperparameters) with a synthetic detector of
    every AUROC in :data:`SYNTHETIC_AUROCS`, for every gate in :data:`SYNTHETIC_RETAINS`
    (module docstring), by ``(retain, a)``; every gate sees the same draws."""
    n, m_count = int(zs[0].shape[0]), len(zs)
    out = {}
    for a in SYNTHETIC_AUROCS:
        u = synthetic_pvalues(n, m_count, m, a, run._gen("h20-synthetic", key, draw, a))
        for retain in SYNTHETIC_RETAINS:
            out[(retain, a)] = _robust_right(run, zs, u, retain)
    return out


def run_detection(
    dataset: str = "avdigits",
    seeds: Sequence[int] = (0, 1, 2),
    *,
    quick: bool = False,
    adaptive: bool = True,
    lam: float = 1.0,
    resamples: int = RESAMPLES,
    input_test: bool = False,
) -> dict[str, Any]:
    """AUROC of every signal per setting, averaged over ``seeds``, with cluster bootstrap
    intervals, and the synthetic-detector bound (module docstring); ``input_test``: the owners'
    feature p-values include their input tests, and the input test alone is reported as the
    signal ``input`` (:class:`~.unknown.SeedRun`)."""
    start = time.perf_counter()
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    per_seed: dict[str, dict[str, Any]] = {}
    labels: dict[str, dict[str, Any]] = {}
    environment: dict[str, Any] = {}
    # per-sample values behind the intervals, per setting key, one entry per seed
    pos: dict[str, dict[str, list[np.ndarray]]] = {}  # perturbed scores (D, N)
    adv: dict[str, dict[str, list[np.ndarray]]] = {}  # adaptive attack's scores (N,)
    neg_m: dict[str, dict[str, list[np.ndarray]]] = {}  # clean scores (N,) of its modality
    correct: dict[str, dict[str, list[np.ndarray]]] = {}  # row -> per seed (N,)
    synth: dict[str, dict[tuple[float, float], list[np.ndarray]]] = {}
    best_alone: dict[str, list[list[np.ndarray]]] = {}  # per seed, the unperturbed modalities
    names: tuple[str, ...] = SIGNALS  # the seeds' Signals.names (with input tests: + "input")
    try:
        for seed in seeds:
            run = SeedRun(dataset, seed, quick=quick, input_test=input_test)
            environment = environment or {**provenance(run.data), "threads": 1}
            sig = run.signals()
            names = sig.names
            clean_p = sig.pvalues(run.clean["test"], run.x["test"])
            cells: dict[str, Any] = {}
            rows = correct.setdefault("clean", {})
            rows.setdefault("robust", []).append(_robust_right(run, run.clean["test"], None))
            rows.setdefault("robust_detect", []).append(
                _robust_right(run, run.clean["test"], _extra(clean_p))
            )
            cells["clean"] = {
                "robust_acc": float(rows["robust"][-1].mean()),
                "robust_acc_detect": float(rows["robust_detect"][-1].mean()),
                # per modality (by name): the share of clean test samples with p <= 0.05
                "false_alarm_0.05": {
                    s: {
                        name: float((clean_p[s][:, m] <= 0.05).double().mean())
                        for m, name in enumerate(run.modalities)
                    }
                    for s in names
                },
            }
            labels["clean"] = {"label": "Clean", "type": None, "modality": None}
            alone_clean = [_right(run, z) for z in run.clean["test"]]
            best_alone.setdefault("clean", []).append(alone_clean)
            for a, c in _synthetic(run, run.clean["test"], None, "clean", 0).items():
                synth.setdefault("clean", {}).setdefault(a, []).append(c)
            for setting in run.settings:
                if setting.perturbed is None:
                    continue
                key = setting.key
                m = run.position(setting)
                aucs: dict[str, list[float]] = {s: [] for s in names}
                aucs_flipped: dict[str, list[float]] = {s: [] for s in names}
                flipped_frac: list[float] = []
                draws_pos: dict[str, list[np.ndarray]] = {s: [] for s in names}
                draws_correct: dict[str, list[np.ndarray]] = {"robust": [], "robust_detect": []}
                draws_synth: dict[tuple[float, float], list[np.ndarray]] = {}
                for draw in range(run.draws(setting)):
                    xs, zs = run.inputs(setting, "test", draw)
                    pert_p = sig.pvalues(zs, xs)
                    # samples whose own-modality prediction the perturbation changed
                    flipped = (zs[m].argmax(1) != run.clean["test"][m].argmax(1)).numpy()
                    flipped_frac.append(float(flipped.mean()))
                    for s in names:
                        p_s, n_s = 1 - pert_p[s][:, m].numpy(), 1 - clean_p[s][:, m].numpy()
                        aucs[s].append(auroc(p_s, n_s))
                        draws_pos[s].append(p_s)
                        if flipped.any():
                            aucs_flipped[s].append(auroc(p_s[flipped], n_s))
                    draws_correct["robust"].append(_robust_right(run, zs, None))
                    draws_correct["robust_detect"].append(_robust_right(run, zs, _extra(pert_p)))
                    for a, c in _synthetic(run, zs, m, key, draw).items():
                        draws_synth.setdefault(a, []).append(c)
                for s in names:
                    pos.setdefault(key, {}).setdefault(s, []).append(np.stack(draws_pos[s]))
                    neg_m.setdefault(key, {}).setdefault(s, []).append(1 - clean_p[s][:, m].numpy())
                for r, v in draws_correct.items():
                    correct.setdefault(key, {}).setdefault(r, []).append(np.mean(v, axis=0))
                for a, v in draws_synth.items():
                    synth.setdefault(key, {}).setdefault(a, []).append(np.mean(v, axis=0))
                best_alone.setdefault(key, []).append(
                    [c for i, c in enumerate(alone_clean) if i != m]
                )
                adaptive_cell: dict[str, Any] | None = None
                if adaptive and isinstance(setting.spec, AttackSpec):
                    attack = SignalAwarePGD(sig, run.clean["test"], m, lam=lam, spec=setting.spec)
                    x_m = attack(run.x["test"][m], run.y["test"], run._gen("h20", key))
                    zs = list(run.clean["test"])
                    zs[m] = predict_logits(run.nets[m], x_m)
                    xs = list(run.x["test"])
                    xs[m] = x_m
                    adv_p = sig.pvalues(zs, xs)
                    adv_right = _robust_right(run, zs, _extra(adv_p))
                    for s in names:
                        adv.setdefault(key, {}).setdefault(s, []).append(1 - adv_p[s][:, m].numpy())
                    worst = draws_correct["robust_detect"][-1] * adv_right
                    adaptive_cell = {
                        "auroc": {
                            s: auroc(1 - adv_p[s][:, m].numpy(), 1 - clean_p[s][:, m].numpy())
                            for s in names
                        },
                        "robust_acc_detect": float(adv_right.mean()),
                        # per sample the worse of this and the setting-1 attack (last draw)
                        "robust_acc_detect_worst": float(worst.mean()),
                    }
                cells[key] = {
                    **({"adaptive": adaptive_cell} if adaptive_cell is not None else {}),
                    "auroc": {s: float(np.mean(v)) for s, v in aucs.items()},
                    "auroc_flipped": {
                        s: float(np.mean(v)) if v else float("nan") for s, v in aucs_flipped.items()
                    },
                    "flipped": float(np.mean(flipped_frac)),
                    "robust_acc": float(np.mean(np.mean(draws_correct["robust"], axis=0))),
                    "robust_acc_detect": float(
                        np.mean(np.mean(draws_correct["robust_detect"], axis=0))
                    ),
                }
                labels[key] = {
                    "label": setting.label,
                    "type": perturbation_type(setting),
                    "modality": setting.perturbed,
                }
            per_seed[str(seed)] = cells
    finally:
        torch.set_num_threads(prev)
    keys = list(labels)
    table: dict[str, Any] = {}
    for key in keys:
        cols = [per_seed[str(s)][key] for s in seeds]
        cell: dict[str, Any] = dict(labels[key])
        if "auroc" in cols[0]:
            for field in ("auroc", "auroc_flipped"):
                cell[field] = {s: float(np.mean([c[field][s] for c in cols])) for s in names}
            cell["flipped"] = float(np.mean([c["flipped"] for c in cols]))
            cell["auroc_interval"] = {
                s: auroc_interval(pos[key][s], neg_m[key][s], resamples=resamples) for s in names
            }
        if "adaptive" in cols[0]:
            cell["adaptive"] = {
                "auroc": {
                    s: float(np.mean([c["adaptive"]["auroc"][s] for c in cols])) for s in names
                },
                "auroc_interval": {
                    s: auroc_interval(adv[key][s], neg_m[key][s], resamples=resamples)
                    for s in names
                },
                **{
                    k: float(np.mean([c["adaptive"][k] for c in cols]))
                    for k in ("robust_acc_detect", "robust_acc_detect_worst")
                },
            }
        for field in ("robust_acc", "robust_acc_detect"):
            cell[field] = float(np.mean([c[field] for c in cols]))
        # robust + detectors - robust, points, per sample, seeds kept together
        cell["detect_minus_plain"] = cluster_bootstrap(
            np.stack(correct[key]["robust_detect"]),
            np.stack(correct[key]["robust"]),
            resamples=resamples,
        )
        table[key] = cell
    return {
        "dataset": dataset,
        "seeds": [int(s) for s in seeds],
        "quick": quick,
        "signals": list(names),
        **({"input_test": True} if input_test else {}),
        "settings": keys,
        "table": table,
        "per_seed": per_seed,
        "synthetic": _synthetic_summary(
            keys, synth, best_alone, np.stack(correct["clean"]["robust"]), resamples
        ),
        "adaptive_attack": {"done": adaptive, "lam": lam},
        "resamples": resamples,
        "environment": environment,
        "load_average": list(os.getloadavg()),
        "seconds": time.perf_counter() - start,
    }


def _synthetic_summary(
    keys: Sequence[str],
    synth: dict[str, dict[tuple[float, float], list[np.ndarray]]],
    best_alone: dict[str, list[list[np.ndarray]]],
    clean_robust: np.ndarray,
    resamples: int,
) -> dict[str, Any]:
    """Mean accuracy (%) of robust with each synthetic detector, per setting and over the
    settings, and its difference to the best clean modality alone (module docstring):
    ``rows`` for robust's gate (retain 0), ``retain_rows[retain]`` for the others of
    :data:`SYNTHETIC_RETAINS`."""

    def best(key: str) -> np.ndarray:  # (S, N): the best unperturbed modality, pooled over seeds
        per_seed = best_alone[key]  # per seed: a list of (N,) per candidate modality
        accs = [np.mean([c[i] for c in per_seed]) for i in range(len(per_seed[0]))]
        i = int(np.argmax(accs))
        return np.stack([c[i] for c in per_seed])

    alone = {k: best(k) for k in keys}
    alone_mean = np.mean([alone[k] for k in keys], axis=0)  # (S, N): mean over settings
    out: dict[str, Any] = {
        "aurocs": list(SYNTHETIC_AUROCS),
        "best_clean_alone": {k: 100 * float(alone[k].mean()) for k in keys},
        "best_clean_alone_mean": 100 * float(alone_mean.mean()),
        "retains": list(SYNTHETIC_RETAINS),
        "rows": {},
        "retain_rows": {f"{r:g}": {} for r in SYNTHETIC_RETAINS if r != 0.0},
    }
    for retain, a in itertools.product(SYNTHETIC_RETAINS, SYNTHETIC_AUROCS):
        acc = {k: np.stack(synth[k][(retain, a)]) for k in keys}
        mean = np.mean([acc[k] for k in keys], axis=0)
        rows = out["rows"] if retain == 0.0 else out["retain_rows"][f"{retain:g}"]
        rows[f"{a:g}"] = {
            "per_setting": {k: 100 * float(acc[k].mean()) for k in keys},
            "mean": 100 * float(mean.mean()),
            "mean_minus_best_clean_alone": cluster_bootstrap(mean, alone_mean, resamples=resamples),
            # the clean column's cost of the detector's false alarms, against robust alone
            "clean_minus_robust": cluster_bootstrap(
                acc["clean"], clean_robust, resamples=resamples
            ),
        }
    return out


def detection_markdown(result: dict[str, Any]) -> str:
    seeds = ", ".join(str(s) for s in result["seeds"])
    head = [
        "Setting",
        "type",
        *result["signals"],
        "flipped %",
        "fisher, flipped only",
        "robust acc",
        "robust acc + detectors",
        "adaptive: fisher",
        "adaptive: robust acc + detectors",
        "worst of both: robust acc + detectors",
    ]
    lines = [
        f'Detection AUROC (x100) of "this modality is perturbed", {result["dataset"]}, '
        f"training seed(s) {seeds}; non-adaptive (setting-1 attacks on the modality's own net) "
        "and, last three columns, the detector-aware attack on the new signals.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for key in result["settings"]:
        cell = result["table"][key]
        auc = cell.get("auroc")
        vals = [f"{100 * auc[s]:.1f}" if auc else "-" for s in result["signals"]]
        lines.append(
            "| "
            + " | ".join(
                [
                    cell["label"],
                    cell["type"] or "-",
                    *vals,
                    f"{100 * cell['flipped']:.1f}" if auc else "-",
                    f"{100 * cell['auroc_flipped']['fisher']:.1f}" if auc else "-",
                    f"{100 * cell['robust_acc']:.1f}",
                    f"{100 * cell['robust_acc_detect']:.1f}",
                    *(
                        [
                            f"{100 * cell['adaptive']['auroc']['fisher']:.1f}",
                            f"{100 * cell['adaptive']['robust_acc_detect']:.1f}",
                            f"{100 * cell['adaptive']['robust_acc_detect_worst']:.1f}",
                        ]
                        if "adaptive" in cell
                        else ["-", "-", "-"]
                    ),
                ]
            )
            + " |"
        )
    lines += [
        "",
        "Signals: typicality (logits, issue 11), penultimate (the owner's Mahalanobis on its "
        "penultimate features alone: a diagnostic, not published), feature (the owner's "
        "Mahalanobis on every layer of its net, Cauchy over the layers: what it publishes), "
        "consistency (logits of both modalities), "
        "fisher / cauchy (the three combined). flipped %: test samples whose own-modality "
        'prediction the perturbation changed; "fisher, flipped only": AUROC of the Fisher '
        "combination over those against all clean samples. robust acc: fixed default "
        "hyperparameters (floor 0.05, trust_level 0.05, "
        'no Jacobian term), not selected; "+ detectors" adds the feature and consistency '
        "p-values (Fisher). adaptive: white-box PGD (the setting's budget, step and steps) on "
        "CE(robust + detectors) + lam ln(Fisher reliability of the attacked modality), through "
        f"every layer of the owner's net, lam {result['adaptive_attack']['lam']:g}; its Fisher "
        "AUROC and the accuracy of robust + detectors under it, and per sample under the "
        "worse of it and the setting-1 attack. "
        f"{result['seconds']:.0f} s, load average {result['load_average'][0]:.1f}.",
    ]
    if "synthetic" in result:
        lines += _intervals_markdown(result) + _synthetic_markdown(result)
    return "\n".join(lines) + "\n"


def _ci(x: dict[str, float], scale: float = 100.0, sign: str = "") -> str:
    f = f"{{:{sign}.1f}}"
    return (
        f"{f.format(scale * x['mean'])} [{f.format(scale * x['low'])}, "
        f"{f.format(scale * x['high'])}] (seed sd {scale * x['seed_sd']:.1f})"
    )


def _intervals_markdown(result: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "Intervals: 95 % cluster bootstrap over test samples (each sample's clean and perturbed "
        f"scores and all seeds kept together, {result['resamples']} resamples), with the spread "
        "over training seeds. Fisher AUROC (x100) non-adaptive; under the adaptive attack; and "
        "robust + detectors − robust (accuracy points, same samples):",
    ]
    for key in result["settings"]:
        cell = result["table"][key]
        parts = []
        if "auroc_interval" in cell:
            parts.append(f"Fisher {_ci(cell['auroc_interval']['fisher'])}")
        if "adaptive" in cell:
            parts.append(f"adaptive {_ci(cell['adaptive']['auroc_interval']['fisher'])}")
        parts.append(f"+ detectors {_ci(cell['detect_minus_plain'], 1.0, '+')}")
        lines.append(f"- {cell['label']}: " + "; ".join(parts))
    return lines


def _synthetic_markdown(result: dict[str, Any]) -> list[str]:
    syn = result["synthetic"]
    keys = result["settings"]
    labels = [result["table"][k]["label"] for k in keys]
    head = ["detector AUROC", *labels, "Mean", "Mean − best clean alone", "Clean − robust"]
    table_head = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines = [
        "",
        "What a better detector would buy: robust (same fixed hyperparameters) given a synthetic "
        "detector of AUROC a as its extra p-value (the perturbed modality's u = V^(a/(1-a)), "
        "the others' uniform; a = 1 is the oracle that knows the perturbed modality). Accuracy "
        "%, mean over seeds; the last two columns: points, 95 % cluster bootstrap interval.",
        "",
        *table_head,
        "| best clean modality alone | "
        + " | ".join(f"{syn['best_clean_alone'][k]:.1f}" for k in keys)
        + f" | {syn['best_clean_alone_mean']:.1f} | - | - |",
    ]
    gates = [("", syn["rows"])] + [
        (f", retain {r}", rows) for r, rows in syn.get("retain_rows", {}).items()
    ]
    for i, (gate, rows) in enumerate(gates):
        if i == 1:
            lines += [
                "",
                "The same synthetic detectors with a gate that keeps the share kappa of a "
                "distrusted modality's evidence (`robust_fusion(retain=kappa)`: contamination "
                "by l^kappa instead of 1; robust's gate above drops it, kappa = 0). Same "
                "draws, same columns.",
                "",
                *table_head,
            ]
        for a in syn["aurocs"]:
            row = rows[f"{a:g}"]
            name = ("1 (oracle)" if a == 1.0 else f"{a:g}") + gate
            lines.append(
                f"| {name} | "
                + " | ".join(f"{row['per_setting'][k]:.1f}" for k in keys)
                + f" | {row['mean']:.1f} | {_ci(row['mean_minus_best_clean_alone'], 1.0, '+')}"
                + f" | {_ci(row['clean_minus_robust'], 1.0, '+')} |"
            )
    return lines


def write_detection(result: dict[str, Any], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{result['dataset']}-detection"
    md, js = out_dir / f"{stem}.md", out_dir / f"{stem}.json"
    atomic_write_bytes(md, detection_markdown(result).encode())
    atomic_write_bytes(js, (json.dumps(result, sort_keys=True, indent=1) + "\n").encode())
    return [md, js]
