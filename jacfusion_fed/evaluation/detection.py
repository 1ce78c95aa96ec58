"""Detection table (issue 20): how well each reliability signal says "this modality is
perturbed", as AUROC per setting (perturbation type and modality), non-adaptive and adaptive.

For each training seed (:class:`~jacfusion_fed.evaluation.unknown.SeedRun`: the nets, data
and perturbations of the "perturbed modality unknown" table, setting-1 attacks on the
modality's own net), for every setting that perturbs modality m, the positives are the test
samples under the setting and the negatives the same test samples clean; the score of a
sample is 1 - u, where u is one of the p-values of modality m:

* ``typicality``: the logits-only typicality p-value already used by ``robust`` (issue 11);
* ``feature``: the owner's feature-detector p-value
  (:func:`~jacfusion_fed.fusion.detection.feature_pvalues`, penultimate features of the
  perturbed input, computed as the owner computes it);
* ``consistency``: cross-modal consistency from logits alone
  (:func:`~jacfusion_fed.fusion.detection.consistency_pvalues`, fitted on paired clean
  validation logits);
* ``fisher`` / ``cauchy``: the three combined (:func:`~jacfusion_fed.fusion.combine_pvalues`),
  the reliability ``robust_fusion`` gets with ``pvalues=[feature, consistency]``.

AUROC = P(score of a perturbed sample > score of a clean one) + 1/2 P(tie) (Mann-Whitney).
Accuracy of ``robust`` at fixed default hyperparameters (not selected; floor 0.05,
trust_level 0.05, no Jacobian term) with and without the new p-values is reported alongside,
as an indication only: the selected-hyperparameter table is ``evaluate --unknown``'s.
**Adaptive** (``adaptive=True``): for every attack setting, the detector-aware attack extended
to the new signals (:class:`SignalAwarePGD`): white box, it maximises
CE(robust fused with the detectors) + lam ln r_a, where r_a is the Fisher combination of the
attacked modality's typicality, feature (through the owner's net: features of x') and
consistency p-values (smooth interpolations, differentiable), same budget, step and steps as
the setting. Its AUROC (Fisher) and the accuracy of ``robust`` + detectors under it are the
honest figures.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jacfusion_fed.atomicio import atomic_write_bytes
from jacfusion_fed.fusion import (
    combine_pvalues,
    consistency_pvalues,
    feature_pvalues,
    fit_consistency,
    fit_feature_detector,
    robust_fusion,
)
from jacfusion_fed.fusion.robust import _typicality as typicality_scores
from jacfusion_fed.fusion.robust import conformal_pvalues
from jacfusion_fed.robustness import AttackSpec
from jacfusion_fed.robustness.detector_aware import DetectorAwarePGD
from jacfusion_fed.training import predict_features, predict_logits

from .unknown import SeedRun, Setting, perturbation_type

__all__ = [
    "SIGNALS",
    "SignalAwarePGD",
    "auroc",
    "detection_markdown",
    "run_detection",
    "write_detection",
]

SIGNALS: tuple[str, ...] = ("typicality", "feature", "consistency", "fisher", "cauchy")


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


def _features(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    feats = predict_features(net, x)
    if feats is None:  # the built-in nets always expose them
        raise ValueError("the detection table needs nets that expose their features")
    return feats


class _Signals:
    """The detectors of one seed, fitted on its clean validation split."""

    def __init__(self, run: SeedRun) -> None:
        self.run = run
        feats_val = [_features(net, x) for net, x in zip(run.nets, run.x["val"], strict=True)]
        k = int(run.nets[0].head.out_features)
        self.detectors = [fit_feature_detector(f, run.y["val"], k) for f in feats_val]
        self.consistency = fit_consistency(run.clean["val"], run.y["val"], run.log_prior)
        self.clean_feature = torch.stack(  # (N test, M): the fixed modalities' own p-values
            [
                feature_pvalues(d, _features(net, x), smooth=True)
                for d, net, x in zip(self.detectors, run.nets, run.x["test"], strict=True)
            ],
            dim=1,
        )

    def smooth_pvalues(
        self, zs: Sequence[torch.Tensor], feats_m: torch.Tensor, m: int
    ) -> torch.Tensor:
        """Differentiable (feature, consistency) p-values (N, M, 2); modality m's feature
        p-value from ``feats_m``, the others' those of their clean test inputs (fixed)."""
        cons = consistency_pvalues(list(zs), self.consistency, smooth=True)
        feat = self.clean_feature
        feat_m = feature_pvalues(self.detectors[m], feats_m, smooth=True)
        feat = torch.cat([feat[:, :m], feat_m[:, None], feat[:, m + 1 :]], dim=1)
        return torch.stack([feat, cons], dim=2)

    def pvalues(
        self, zs: Sequence[torch.Tensor], xs: Sequence[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Every signal's exact p-values (N, M) for logits ``zs`` of inputs ``xs``."""
        typ = torch.stack(
            [
                conformal_pvalues(
                    typicality_scores(z.to(torch.float64), c.class_means, c.precision),
                    c.typicality_scores,
                )
                for z, c in zip(zs, self.run.calibrations, strict=True)
            ],
            dim=1,
        )
        feat = torch.stack(
            [
                feature_pvalues(d, _features(net, x))
                for d, net, x in zip(self.detectors, self.run.nets, xs, strict=True)
            ],
            dim=1,
        )
        cons = consistency_pvalues(list(zs), self.consistency, smooth=False)
        three = torch.stack([typ, feat, cons], dim=2)
        return {
            "typicality": typ,
            "feature": feat,
            "consistency": cons,
            "fisher": combine_pvalues(three, "fisher"),
            "cauchy": combine_pvalues(three, "cauchy"),
        }


class SignalAwarePGD(DetectorAwarePGD):
    """:class:`DetectorAwarePGD` whose reliability term is the Fisher combination of the
    attacked modality's typicality, feature and consistency p-values (module docstring)."""

    def __init__(self, signals: _Signals, position: int, *, lam: float, spec: AttackSpec) -> None:
        run = signals.run
        net = run.nets[position]
        steps = 1 if spec.kind == "fgsm" else spec.w6
        step = spec.w4 if spec.kind == "fgsm" else spec.w5
        super().__init__(
            net,
            run.clean["test"],
            position,
            lambda z: (torch.zeros(0), torch.zeros(0)),  # unused: objective is overridden
            eps=spec.w4,
            alpha=step,
            steps=steps,
            lam=lam,
            random_start=spec.kind == "pgd",
        )
        self.signals = signals
        self.unet = net  # the built-in net: features and head

    def objective(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        run, m = self.signals.run, self.position
        feats = self.unet.features(x).flatten(1).to(torch.float64)
        logits = list(self.fixed)
        logits[m] = self.unet.head(feats.to(torch.float32)).to(torch.float64)
        pv = self.signals.smooth_pvalues(logits, feats, m)
        out = robust_fusion(
            logits, run.calibrations, run.log_prior, floor=0.05, trust_level=0.05, pvalues=pv
        )
        ce = -torch.log(out.p.gather(1, y[:, None]).squeeze(1).clamp_min(1e-300))
        return ce + self.lam * torch.log(out.reliability[:, m].clamp_min(1e-300))


def _perturbed_input(run: SeedRun, setting: Setting, draw: int) -> torch.Tensor:
    """The perturbed test inputs of the setting's modality (the draw ``SeedRun.logits`` uses)."""
    i = run.position(setting)
    x, net, gen = run.x["test"][i], run.nets[i], run._gen(setting.key, "test", draw)
    if isinstance(setting.spec, AttackSpec):
        return setting.spec.build(net)(x, run.y["test"], gen)
    assert setting.spec is not None
    return setting.spec(x, gen)


def _robust_correct(
    run: SeedRun, zs: Sequence[torch.Tensor], extra: torch.Tensor | None
) -> torch.Tensor:
    out = robust_fusion(
        list(zs), run.calibrations, run.log_prior, floor=0.05, trust_level=0.05, pvalues=extra
    )
    return out.p.argmax(dim=1) == run.y["test"]


def _robust_acc(run: SeedRun, zs: Sequence[torch.Tensor], extra: torch.Tensor | None) -> float:
    return float(_robust_correct(run, zs, extra).double().mean())


def run_detection(
    dataset: str = "avdigits",
    seeds: Sequence[int] = (0, 1, 2),
    *,
    quick: bool = False,
    adaptive: bool = True,
    lam: float = 1.0,
) -> dict[str, Any]:
    """AUROC of every signal per setting, averaged over ``seeds`` (module docstring)."""
    start = time.perf_counter()
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    per_seed: dict[str, dict[str, Any]] = {}
    labels: dict[str, dict[str, Any]] = {}
    try:
        for seed in seeds:
            run = SeedRun(dataset, seed, quick=quick)
            sig = _Signals(run)
            clean_p = sig.pvalues(run.clean["test"], run.x["test"])
            cells: dict[str, Any] = {}
            clean_extra = torch.stack([clean_p["feature"], clean_p["consistency"]], dim=2)
            cells["clean"] = {
                "robust_acc": _robust_acc(run, run.clean["test"], None),
                "robust_acc_detect": _robust_acc(run, run.clean["test"], clean_extra),
                # per modality (by name): the share of clean test samples with p <= 0.05
                "false_alarm_0.05": {
                    s: {
                        name: float((clean_p[s][:, m] <= 0.05).double().mean())
                        for m, name in enumerate(run.modalities)
                    }
                    for s in SIGNALS
                },
            }
            labels["clean"] = {"label": "Clean", "type": None, "modality": None}
            for setting in run.settings:
                if setting.perturbed is None:
                    continue
                m = run.position(setting)
                aucs: dict[str, list[float]] = {s: [] for s in SIGNALS}
                aucs_flipped: dict[str, list[float]] = {s: [] for s in SIGNALS}
                flipped_frac: list[float] = []
                accs: list[float] = []
                accs_detect: list[float] = []
                for draw in range(run.draws(setting)):
                    x_m = _perturbed_input(run, setting, draw)
                    zs = list(run.clean["test"])
                    zs[m] = predict_logits(run.nets[m], x_m)
                    xs = list(run.x["test"])
                    xs[m] = x_m
                    pert_p = sig.pvalues(zs, xs)
                    # samples whose own-modality prediction the perturbation changed
                    flipped = (zs[m].argmax(1) != run.clean["test"][m].argmax(1)).numpy()
                    flipped_frac.append(float(flipped.mean()))
                    for s in SIGNALS:
                        pos, neg = 1 - pert_p[s][:, m].numpy(), 1 - clean_p[s][:, m].numpy()
                        aucs[s].append(auroc(pos, neg))
                        if flipped.any():
                            aucs_flipped[s].append(auroc(pos[flipped], neg))
                    extra = torch.stack([pert_p["feature"], pert_p["consistency"]], dim=2)
                    accs.append(_robust_acc(run, zs, None))
                    correct_detect = _robust_correct(run, zs, extra)
                    accs_detect.append(float(correct_detect.double().mean()))
                adaptive_cell: dict[str, Any] | None = None
                if adaptive and isinstance(setting.spec, AttackSpec):
                    attack = SignalAwarePGD(sig, m, lam=lam, spec=setting.spec)
                    x_m = attack(run.x["test"][m], run.y["test"], run._gen("h20", setting.key))
                    zs = list(run.clean["test"])
                    zs[m] = predict_logits(run.nets[m], x_m)
                    xs = list(run.x["test"])
                    xs[m] = x_m
                    adv_p = sig.pvalues(zs, xs)
                    extra = torch.stack([adv_p["feature"], adv_p["consistency"]], dim=2)
                    adaptive_cell = {
                        "auroc": {
                            s: auroc(1 - adv_p[s][:, m].numpy(), 1 - clean_p[s][:, m].numpy())
                            for s in SIGNALS
                        },
                        "robust_acc_detect": _robust_acc(run, zs, extra),
                        # per sample the worse of this and the setting-1 attack (one draw)
                        "robust_acc_detect_worst": float(
                            (correct_detect & _robust_correct(run, zs, extra)).double().mean()
                        ),
                    }
                cells[setting.key] = {
                    **({"adaptive": adaptive_cell} if adaptive_cell is not None else {}),
                    "auroc": {s: float(np.mean(v)) for s, v in aucs.items()},
                    "auroc_flipped": {
                        s: float(np.mean(v)) if v else float("nan") for s, v in aucs_flipped.items()
                    },
                    "flipped": float(np.mean(flipped_frac)),
                    "robust_acc": float(np.mean(accs)),
                    "robust_acc_detect": float(np.mean(accs_detect)),
                }
                labels[setting.key] = {
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
            for a in ("auroc", "auroc_flipped"):
                cell[a] = {s: float(np.mean([c[a][s] for c in cols])) for s in SIGNALS}
            cell["flipped"] = float(np.mean([c["flipped"] for c in cols]))
        if "adaptive" in cols[0]:
            cell["adaptive"] = {
                "auroc": {
                    s: float(np.mean([c["adaptive"]["auroc"][s] for c in cols])) for s in SIGNALS
                },
                **{
                    k: float(np.mean([c["adaptive"][k] for c in cols]))
                    for k in ("robust_acc_detect", "robust_acc_detect_worst")
                },
            }
        for a in ("robust_acc", "robust_acc_detect"):
            cell[a] = float(np.mean([c[a] for c in cols]))
        table[key] = cell
    return {
        "dataset": dataset,
        "seeds": [int(s) for s in seeds],
        "quick": quick,
        "signals": list(SIGNALS),
        "settings": keys,
        "table": table,
        "per_seed": per_seed,
        "adaptive_attack": {"done": adaptive, "lam": lam},
        "load_average": list(os.getloadavg()),
        "seconds": time.perf_counter() - start,
    }


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
        "Signals: typicality (logits, issue 11), feature (owner's Mahalanobis on penultimate "
        "features), consistency (logits of both modalities), fisher / cauchy (the three "
        "combined). flipped %: test samples whose own-modality prediction the perturbation "
        'changed; "fisher, flipped only": AUROC of the Fisher combination over those '
        "against all clean samples. robust acc: fixed default hyperparameters (floor 0.05, "
        "trust_level 0.05, "
        'no Jacobian term), not selected; "+ detectors" adds the feature and consistency '
        "p-values (Fisher). adaptive: white-box PGD (the setting's budget, step and steps) on "
        "CE(robust + detectors) + lam ln(Fisher reliability of the attacked modality), through "
        f"the owner's features, lam {result['adaptive_attack']['lam']:g}; its Fisher AUROC and "
        "the accuracy of robust + detectors under it, and per sample under the worse of it "
        "and the setting-1 attack. "
        f"{result['seconds']:.0f} s, load average {result['load_average'][0]:.1f}.",
    ]
    return "\n".join(lines) + "\n"


def write_detection(result: dict[str, Any], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{result['dataset']}-detection"
    md, js = out_dir / f"{stem}.md", out_dir / f"{stem}.json"
    atomic_write_bytes(md, detection_markdown(result).encode())
    atomic_write_bytes(js, (json.dumps(result, sort_keys=True, indent=1) + "\n").encode())
    return [md, js]
