"""The "perturbed modality unknown" table (issue 11): one column per setting (clean, then each
perturbation of each modality), rows for every fusion rule, every hyperparameter chosen once on
validation over all settings (the user does not know the column).

Per training seed (the data stay those of data seed 0), :class:`SeedRun` computes the logits of
every modality under every setting, selects hyperparameters on the validation split and then
measures per-sample correctness on the test split. Attacked columns are adaptive: for every
fusion row the worst case, per sample, of the setting-1 attack (on the modality's own net) and
an end-to-end attack through that row's fusion; ``robust`` also faces the detector-aware attack
(:class:`~jacfusion_fed.robustness.detector_aware.DetectorAwarePGD`).

``robust_detect`` (issue 20) is ``robust`` with the detectors of :mod:`.signals` as extra
p-values: each owner's feature p-value of the input it holds (under the setting: of the
perturbed input) and the cross-modal consistency of the logits, combined with the typicality
p-value by Fisher's or the Cauchy method. Its hyperparameters, the combination included, are
selected like robust's (robust's grid times :data:`COMBINATIONS`, the same
leave-the-test's-type-out rule, the validation p-values computed from the perturbed
validation inputs), and in attacked columns it faces, per sample, the worst of the setting-1
attack, the end-to-end attack through its own fusion and detectors
(:class:`~.signals.SignalAwarePGD` with lam = 0) and the detector-aware attack on them (lam of
the run). It answers every sample (no abstention, no conformal set).
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from jacfusion_fed.data import MultimodalDataset, load_builtin
from jacfusion_fed.fusion import (
    GramFactor,
    ModalityCalibration,
    aps_scores,
    aps_sets,
    calibration_split,
    factor_gram,
    fit_calibration,
    gram_of,
    jacobian_fusion,
    robust_fusion,
    statistical_fusion,
)
from jacfusion_fed.models import UnimodalNet
from jacfusion_fed.robustness import AttackSpec, Corruption, attack_fused, worst_case_logits
from jacfusion_fed.robustness.detector_aware import DetectorAwarePGD
from jacfusion_fed.training import predict_logits
from jacfusion_fed.training.input_detector import InputDetector, applies, fit_input_detector

from .config import PRESETS, DatasetPreset, config_from_options
from .emergency import EMERGENCY, make_emergency
from .nets import NetZoo
from .signals import SignalAwarePGD, Signals, robust_with

__all__ = [
    "DATASETS",
    "JACOBIAN_GRID",
    "RETAINS",
    "ROBUST_GRID",
    "ROWS",
    "TIED_JACOBIAN_GRID",
    "TRUST",
    "SeedRun",
    "Setting",
    "robust_candidates",
    "settings_for",
]

DATASETS: tuple[str, ...] = ("avdigits", "twomoon", "emergency")
"""Datasets of the table: the two built-ins and the three-modality example (M = 3)."""

Rule = Callable[[Sequence[torch.Tensor]], torch.Tensor]
ROWS: tuple[str, ...] = ("stat", "jac_oracle", "jac_all", "robust", "robust_detect")
ROW_LABELS = {
    "stat": "Stat-w/o",
    "jac_oracle": "Stat-w/ (oracle: knows the perturbed modality)",
    "jac_all": "Stat-w/ on all modalities",
    "robust": "robust",
    "robust_detect": "robust + detectors (owners' feature p-values, consistency)",
}
GAMMAS: tuple[float, ...] = (0.1, 0.5, 0.9)
ROBUST_GRID: dict[str, tuple[float, ...]] = {
    "floor": (0.0, 0.01, 0.05),
    "trust_level": (0.005, 0.02, 0.1),
}
RETAINS: tuple[float, ...] = (0.0,)
"""The share of its evidence a distrusted modality keeps (``robust_fusion(retain=)``) that the
tables select from: 0 only, robust drops a distrusted modality. A wider grid is measured in
``benchmarks/retain_selection.py`` (``docs/results/retain-selection.json``)."""
JACOBIAN_GRID: tuple[tuple[float | None, float], ...] = (
    (0.0, 1.0),
    (0.1, 0.1),
    (0.3, 0.1),
    (0.3, 0.5),
    (0.6, 0.5),
)
"""(jacobian_level, gamma) of robust's reliability-driven Jacobian regularization; (0, 1): off.
A level of :data:`TRUST` is the candidate's trust level (:data:`TIED_JACOBIAN_GRID`)."""
TRUST = None
"""A ``jacobian_level`` that is the candidate's trust level."""
TIED_JACOBIAN_GRID: tuple[tuple[float | None, float], ...] = (
    (0.0, 1.0),
    (TRUST, 0.1),
    (TRUST, 0.5),
)
"""The Jacobian term only where the gate distrusts a modality, on the same ramp (issue 20: "the
regularization applies only where the evidence says so"). A clean sample's reliability is a
p-value, so a level of 0.3 regularizes about 30 % of the clean samples by construction; the
trust levels of :data:`ROBUST_GRID` are 0.005-0.1. Not the tables' grid:
``benchmarks/jacobian_evidence.py`` (``docs/results/jacobian-evidence.json``) measures it
against :data:`JACOBIAN_GRID`; it removes AV-Digits' clean loss and costs attacked columns."""
COMBINATIONS: tuple[str, ...] = ("fisher", "cauchy")
"""How robust + detectors combines the p-values (selected with its other hyperparameters)."""
RAPS_LAMBDAS: tuple[float, ...] = (0.0, 0.01, 0.1, 0.5)
"""RAPS size penalties robust's fused conformal set chooses from (0: plain APS)."""
CONFIDENCES: tuple[float, ...] = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9)
MIN_ANSWERED = 0.85
"""Abstention threshold: the largest validation accuracy on answered samples among thresholds
that answer at least this fraction of the validation samples on average over all settings."""


def robust_candidates(
    gate: Mapping[str, Sequence[float]], jacobian_grid: Sequence[tuple[float | None, float]]
) -> list[dict[str, Any]]:
    """robust's hyperparameter candidates: every combination of the ``gate`` values (floor,
    trust_level, retain) times every (jacobian_level, gamma) pair, a level of :data:`TRUST`
    replaced by the candidate's trust level; Jacobian pairs outermost (the grid order ties
    are broken in)."""
    out = []
    for level, gamma in jacobian_grid:
        for values in itertools.product(*gate.values()):
            hp = dict(zip(gate, values, strict=True))
            tied = hp["trust_level"] if level is TRUST else level
            out.append({**hp, "jacobian_level": tied, "gamma": gamma})
    return out


@dataclass(frozen=True)
class Setting:
    """One column: ``spec`` applied to modality ``perturbed`` (None: clean)."""

    key: str
    label: str
    perturbed: str | None
    spec: Corruption | AttackSpec | None


def settings_for(preset: DatasetPreset) -> list[Setting]:
    """Clean, then every corruption and attack of every perturbed-modality table."""
    out = [Setting("clean", "Clean", None, None)]
    for modality, table in preset.tables.items():
        for col in table.columns:
            spec = col.corruption if col.corruption is not None else col.attack
            if col.kind in ("corruption", "attack") and spec is not None:
                name = preset.abbrev[modality]
                out.append(Setting(f"{modality}:{col.key}", f"{name} {spec.label}", modality, spec))
    return out


def perturbation_type(setting: Setting) -> str | None:
    """The kind of a setting's perturbation, whichever modality it hits (None: clean):
    ``"fgsm"`` / ``"pgd"`` for attacks, the corruption's class name otherwise."""
    spec = setting.spec
    if spec is None:
        return None
    return spec.kind if isinstance(spec, AttackSpec) else type(spec).__name__


def _acc(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (probs.argmax(dim=1) == y).to(torch.float64)


class SeedRun:
    """All rows and columns of the table for one training seed.

    Args:
        dataset: one of :data:`DATASETS` (``"emergency"``: the three-modality example).
        seed: training seed (weights, training order, perturbation draws).
        quick: the quick data and epochs.
        repeats: draws of every random corruption on the test split.
        alpha: miscoverage level of the conformal sets.
        lam: weight of the reliability term of the detector-aware attack.
        retains: the values of ``retain`` robust and robust + detectors select from.
        jacobian_grid: the (jacobian_level, gamma) pairs they select from
            (:data:`JACOBIAN_GRID`; a level of :data:`TRUST`: the candidate's trust level).
        method: how the owners train their nets (``"regular"``, the tables'; or a robust
            add-on of :data:`~jacfusion_fed.training.METHODS`, e.g. ``"adversarial"``).
        input_test: the owners' published p-values include their input tests
            (:mod:`~jacfusion_fed.training.input_detector`, fitted on the training split's
            inputs, the validation split's as the reference; modalities with (C, H, W) inputs
            only). False: the tables'.
    """

    def __init__(
        self,
        dataset: str,
        seed: int,
        *,
        quick: bool = False,
        repeats: int = 2,
        alpha: float = 0.1,
        lam: float = 1.0,
        retains: Sequence[float] = RETAINS,
        jacobian_grid: Sequence[tuple[float | None, float]] = JACOBIAN_GRID,
        method: str = "regular",
        input_test: bool = False,
    ) -> None:
        if dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}")
        self.seed, self.repeats, self.alpha, self.lam = seed, repeats, alpha, lam
        self.input_test = input_test
        self.retains = tuple(float(r) for r in retains)
        self.jacobian_grid = tuple(jacobian_grid)
        splits = ("train", "val", "test")
        if dataset == "emergency":  # not a built-in: the example's generator (no quick form)
            self.preset = EMERGENCY
            self.data: dict[str, MultimodalDataset] = {s: make_emergency(s) for s in splits}
        else:
            self.preset = PRESETS[dataset]
            self.data = {s: load_builtin(dataset, s, 0, quick=quick) for s in splits}
        # the zoo reads seed, quick, epochs and the cache from the config, the rest (name,
        # archs, epochs, lr) from self.preset
        base = "twomoon" if dataset == "emergency" else dataset
        config = replace(config_from_options(base, quick=quick, seed=seed), workers=1)
        zoo = NetZoo(self.preset, config, self.data)
        self.modalities = [m for m in self.preset.abbrev if m not in self.preset.derived]
        # the nets train in this process: pin torch's threads (config.threads), or the weights
        # depend on how many cores the machine happens to have
        prev_threads = torch.get_num_threads()
        torch.set_num_threads(config.threads or 1)
        try:
            self.nets: list[UnimodalNet] = [zoo.get(m, method) for m in self.modalities]
        finally:
            torch.set_num_threads(prev_threads)
        self.models = zoo.info
        self.settings = settings_for(self.preset)
        counts = np.maximum(self.data["train"].class_counts().astype(np.float64), 1.0)
        self.log_prior = torch.from_numpy(np.log(counts / counts.sum()))
        self.factors: list[GramFactor | None] = [
            factor_gram(gram_of(n.head.weight.detach().to(torch.float64))) for n in self.nets
        ]
        self.x = {
            s: [torch.from_numpy(self.data[s].modalities[m]) for m in self.modalities]
            for s in ("val", "test")
        }
        self.y = {s: torch.from_numpy(self.data[s].labels) for s in ("val", "test")}
        self.clean = {
            s: [predict_logits(n, x) for n, x in zip(self.nets, self.x[s], strict=True)]
            for s in ("val", "test")
        }
        self.calibrations: list[ModalityCalibration] = [
            fit_calibration(z, self.y["val"]) for z in self.clean["val"]
        ]
        self.params: dict[str, Any] = {}
        self.params_by_setting: dict[str, dict[str, Any]] = {}
        self._aps: dict[tuple[tuple[str, float], ...], dict[str, Any]] = {}
        self.attack_log: dict[str, dict[str, list[dict[str, float]]]] = {}
        self.detect_attack_log: dict[str, dict[str, list[float]]] = {}
        self._signals: Signals | None = None

    # ------------------------------------------------------------------------- logits
    def _gen(self, *parts: object) -> torch.Generator:
        key = repr((self.preset.name, *parts)).encode()
        return torch.Generator().manual_seed((zlib.crc32(key) << 20) ^ self.seed)

    def position(self, setting: Setting) -> int:
        assert setting.perturbed is not None
        return self.modalities.index(setting.perturbed)

    def logits(self, setting: Setting, split: str, draw: int) -> list[torch.Tensor]:
        """Every modality's logits under ``setting`` (setting-1 attack for attacks)."""
        return self.inputs(setting, split, draw)[1]

    def inputs(
        self, setting: Setting, split: str, draw: int
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Every modality's inputs and logits under ``setting`` (setting-1 attack for
        attacks): ``(xs, zs)``."""
        xs, zs = list(self.x[split]), list(self.clean[split])
        if setting.spec is None:
            return xs, zs
        i = self.position(setting)
        x, net, gen = self.x[split][i], self.nets[i], self._gen(setting.key, split, draw)
        if isinstance(setting.spec, AttackSpec):
            xs[i] = setting.spec.build(net)(x, self.y[split], gen)
        else:
            xs[i] = setting.spec(x, gen)
        zs[i] = predict_logits(net, xs[i])
        return xs, zs

    def signals(self) -> Signals:
        """The seed's detectors (:class:`~.signals.Signals`), fitted on the clean validation
        split once."""
        if self._signals is None:
            inputs: list[InputDetector | None] | None = None
            if self.input_test:
                train = [
                    torch.from_numpy(self.data["train"].modalities[m]) for m in self.modalities
                ]
                inputs = [
                    fit_input_detector(x, x_val, seed=self.seed) if applies(x) else None
                    for x, x_val in zip(train, self.x["val"], strict=True)
                ]
            self._signals = Signals(
                self.nets,
                self.x["val"],
                self.y["val"],
                self.clean["val"],
                self.x["test"],
                self.calibrations,
                self.log_prior,
                inputs,
            )
        return self._signals

    def robust_detect(
        self, zs: Sequence[torch.Tensor], xs: Sequence[torch.Tensor], **hp: Any
    ) -> Any:
        """robust + detectors (module docstring) with the selected (or given) hyperparameters."""
        hp = {**self.params.get("robust_detect", {}), **hp}
        extra = self.signals().extra(zs, xs)
        return robust_with(zs, self.calibrations, self.log_prior, self.factors, extra, hp)

    def draws(self, setting: Setting) -> int:
        spec = setting.spec
        if spec is None or (isinstance(spec, AttackSpec) and spec.deterministic):
            return 1
        return 1 if isinstance(spec, AttackSpec) else self.repeats

    # ------------------------------------------------------------------------- rules
    def rule(self, row: str, setting: Setting | None = None, **hp: float) -> Rule:
        """The fusion of ``row`` with hyperparameters ``hp`` (selected ones by default)."""
        hp = {**self.params.get(row, {}), **hp}
        if row == "stat" or (row == "jac_oracle" and (setting is None or not setting.perturbed)):
            return lambda zs: statistical_fusion(zs, self.log_prior)
        if row in ("jac_oracle", "jac_all"):
            reg = (
                tuple(range(len(self.nets))) if row == "jac_all" else (self.position(setting),)  # type: ignore[arg-type]
            )
            gamma = hp["gamma"]
            return lambda zs: jacobian_fusion(
                zs, self.factors, self.log_prior, gamma=gamma, regularize=reg
            )
        return lambda zs: self.robust(zs, **hp).p

    def robust(self, zs: Sequence[torch.Tensor], **hp: Any) -> Any:
        """robust_fusion with the selected (or given) hyperparameters and, unless ``aps=False``
        is given, the fused RAPS set calibrated by :meth:`_raps`."""
        aps = bool(hp.pop("aps", True))
        hp = {**self.params.get("robust", {}), **hp}
        return robust_fusion(
            zs,
            self.calibrations,
            self.log_prior,
            self.factors,
            alpha=self.alpha,
            floor=hp["floor"],
            trust_level=hp["trust_level"],
            confidence=hp.get("confidence", 0.5),
            jacobian_level=hp.get("jacobian_level", 0.0),
            gamma=hp.get("gamma", 1.0),
            retain=hp.get("retain", 0.0),
            **(self._raps(hp) if aps else {}),
        )

    def _raps(self, hp: dict[str, float]) -> dict[str, Any]:
        """RAPS calibration of robust's fused probabilities with ``hp`` on the clean validation
        split (labelled, no modality perturbed: the calibration does not know which one will
        be broken). The split is halved (:func:`calibration_split`): the size penalty is the
        one of :data:`RAPS_LAMBDAS` with the smallest mean set size on the first half when
        calibrated on the second; the scores are those of the second half."""
        key = tuple(sorted((k, float(v)) for k, v in hp.items() if k != "confidence"))
        if key not in self._aps:
            p = self.robust(self.clean["val"], aps=False, **hp).p.detach()
            y = self.y["val"]
            tune, cal = calibration_split(y)

            def size(lam: float) -> float:
                scores = aps_scores(p[cal], y[cal], raps_lambda=lam)
                sets = aps_sets(p[tune], scores, self.alpha, raps_lambda=lam)
                return float(sets.double().sum(1).mean())

            lam = min(RAPS_LAMBDAS, key=lambda v: (size(v), v))
            self._aps[key] = {
                "fused_scores": aps_scores(p[cal], y[cal], raps_lambda=lam),
                "raps_lambda": lam,
            }
        return self._aps[key]

    def select(self) -> dict[str, Any]:
        """Choose every row's hyperparameters per test column on validation without that
        column's perturbation type: by mean validation accuracy over the validation settings
        whose perturbation type differs from the column's (the clean column: over all
        settings; setting-1 attacks on validation; ties: the first in grid order). Returns
        the choice of each column (also in :attr:`params_by_setting`)."""
        val_inputs = {s.key: self.inputs(s, "val", 0) for s in self.settings}
        val = {k: v[1] for k, v in val_inputs.items()}
        val_extra = {k: self.signals().extra(zs, xs) for k, (xs, zs) in val_inputs.items()}
        y = self.y["val"]
        keys = [s.key for s in self.settings]

        def scores(row: str, **hp: float) -> np.ndarray:
            return np.array(
                [float(_acc(self.rule(row, s, **hp)(val[s.key]), y).mean()) for s in self.settings]
            )

        grid = robust_candidates({**ROBUST_GRID, "retain": self.retains}, self.jacobian_grid)
        per_row: dict[str, tuple[list[dict[str, Any]], np.ndarray]] = {
            row: ([{"gamma": g} for g in GAMMAS], np.stack([scores(row, gamma=g) for g in GAMMAS]))
            for row in ("jac_oracle", "jac_all")
        }
        per_row["robust"] = (grid, np.stack([scores("robust", **hp) for hp in grid]))

        def detect_scores(hp: dict[str, Any]) -> np.ndarray:
            return np.array(
                [
                    float(
                        _acc(
                            robust_with(
                                val[k],
                                self.calibrations,
                                self.log_prior,
                                self.factors,
                                val_extra[k],
                                hp,
                            ).p,
                            y,
                        ).mean()
                    )
                    for k in keys
                ]
            )

        detect_grid = [{**hp, "combine": c} for c in COMBINATIONS for hp in grid]
        per_row["robust_detect"] = (
            detect_grid,
            np.stack([detect_scores(hp) for hp in detect_grid]),
        )
        for s in self.settings:
            allowed = np.array(
                [
                    s.spec is None or perturbation_type(o) != perturbation_type(s)
                    for o in self.settings
                ]
            )
            chosen: dict[str, Any] = {}
            for row, (cands, table) in per_row.items():
                mean = table[:, allowed].mean(axis=1)
                if row in ("robust", "robust_detect"):
                    chosen[row] = dict(cands[int(np.argmax(mean))])
                else:  # ties: the larger gamma
                    chosen[row] = {"gamma": max(zip(mean.tolist(), GAMMAS, strict=True))[1]}
            self.params = chosen
            chosen["robust"]["confidence"] = self._select_confidence(
                val, [o for o, ok in zip(self.settings, allowed, strict=True) if ok]
            )
            self.params_by_setting[s.key] = chosen
        self.params = self.params_by_setting[keys[0]]
        return self.params_by_setting

    def _select_confidence(
        self, val: dict[str, list[torch.Tensor]], settings: Sequence[Setting]
    ) -> float:
        best, best_acc = 0.0, -1.0
        for c in CONFIDENCES:
            answered, acc = [], []
            for s in settings:
                out = self.robust(val[s.key], confidence=c)
                keep = ~out.abstain
                answered.append(float(keep.double().mean()))
                right = _acc(out.p, self.y["val"])[keep]
                acc.append(float(right.mean()) if right.numel() else 0.0)
            if np.mean(answered) >= MIN_ANSWERED and np.mean(acc) > best_acc:
                best, best_acc = c, float(np.mean(acc))
        return best

    # ------------------------------------------------------------------------- test
    def evaluate(self) -> dict[str, Any]:
        """Per setting: per-sample correctness (mean over draws) of every row, plus the robust
        row's coverage, set size, abstention; returned as plain lists (JSON-ready)."""
        if not self.params_by_setting:
            self.select()
        y = self.y["test"]
        out: dict[str, Any] = {}
        for s in self.settings:
            self.params = self.params_by_setting[s.key]  # chosen without s's perturbation type
            rows: dict[str, list[torch.Tensor]] = {}
            extra: dict[str, list[float]] = {
                "coverage": [],
                "set_size": [],
                "empty_sets": [],
                "raps_lambda": [],
                "answered": [],
                "acc_answered": [],
            }
            for draw in range(self.draws(s)):
                xs, zs = self.inputs(s, "test", draw)
                for m, name in enumerate(self.modalities):
                    rows.setdefault(f"alone:{name}", []).append(_acc(zs[m], y))
                for row in ROWS:
                    if row == "robust_detect":
                        rows.setdefault(row, []).append(self._detect_correct(s, xs, zs, draw))
                        continue
                    z_row = self._adaptive(row, s, zs, draw) if self._attacked(s) else zs
                    rows.setdefault(row, []).append(_acc(self.rule(row, s)(z_row), y))
                    if row == "robust":
                        res = self.robust(z_row)
                        keep = ~res.abstain
                        extra["coverage"].append(
                            float(res.prediction_set[torch.arange(len(y)), y].double().mean())
                        )
                        sizes = res.prediction_set.double().sum(1)
                        extra["set_size"].append(float(sizes.mean()))
                        extra["empty_sets"].append(float((sizes == 0).double().mean()))
                        extra["raps_lambda"].append(
                            self._raps(self.params["robust"])["raps_lambda"]
                        )
                        extra["answered"].append(float(keep.double().mean()))
                        right = _acc(res.p, y)[keep]
                        extra["acc_answered"].append(float(right.mean()) if right.numel() else 0)
                        rows.setdefault("robust_answered_mask", []).append(keep.double())
                        rows.setdefault("robust_answered_right", []).append(_acc(res.p, y) * keep)
            out[s.key] = {
                "label": s.label,
                "robust_attacks": self.attack_log.get(s.key, {}),
                "robust_detect_attacks": self.detect_attack_log.get(s.key, {}),
                "correct": {r: torch.stack(v).mean(0).tolist() for r, v in rows.items()},
                **{k: float(np.mean(v)) for k, v in extra.items()},
            }
        return out

    @staticmethod
    def _attacked(s: Setting) -> bool:
        return isinstance(s.spec, AttackSpec)

    def _adaptive(
        self, row: str, s: Setting, zs: list[torch.Tensor], draw: int
    ) -> list[torch.Tensor]:
        """Per sample the worst for ``row`` of setting 1, end-to-end PGD/FGSM through the row's
        fusion and (robust) the detector-aware attack."""
        spec = s.spec
        assert isinstance(spec, AttackSpec)
        i, y = self.position(s), self.y["test"]
        net, x = self.nets[i], self.x["test"][i]
        rule = self.rule(row, s)
        clean = self.clean["test"]
        gen = self._gen("adaptive", row, s.key, draw)
        x_e2e = attack_fused(spec.build, net, x, y, clean, i, rule, generator=gen)  # type: ignore[arg-type]
        candidates = [zs[i], predict_logits(net, x_e2e)]
        if row == "robust":
            steps = 1 if spec.kind == "fgsm" else spec.w6
            step = spec.w4 if spec.kind == "fgsm" else spec.w5
            attack = DetectorAwarePGD(
                net,
                clean,
                i,
                lambda z: self._gated(z),
                eps=spec.w4,
                alpha=step,
                steps=steps,
                lam=self.lam,
                random_start=spec.kind == "pgd",
            )
            candidates.append(predict_logits(net, attack(x, y, self._gen("da", s.key, draw))))
        if row == "robust":  # each attack alone: accuracy and the attacked modality's reliability
            for name, z in zip(("setting1", "e2e", "detector_aware"), candidates, strict=True):
                zs_c = list(clean)
                zs_c[i] = z
                res = self.robust(zs_c)
                self.attack_log.setdefault(s.key, {}).setdefault(name, []).append(
                    {
                        "acc": float(_acc(res.p, y).mean()),
                        "reliability": float(res.reliability[:, i].mean()),
                    }
                )
        worst = worst_case_logits(rule, clean, i, candidates, y)  # type: ignore[arg-type]
        out = list(clean)
        out[i] = worst
        return out

    def _detect_correct(
        self, s: Setting, xs: list[torch.Tensor], zs: list[torch.Tensor], draw: int
    ) -> torch.Tensor:
        """Per-sample correctness (N,) of robust + detectors; in attacked columns the worst,
        per sample, of the setting-1 attack, the end-to-end attack through robust + detectors
        and the detector-aware attack on them (module docstring)."""
        y = self.y["test"]
        right = _acc(self.robust_detect(zs, xs).p, y)
        if not self._attacked(s):
            return right
        spec = s.spec
        assert isinstance(spec, AttackSpec)
        i, clean = self.position(s), self.clean["test"]
        log = self.detect_attack_log.setdefault(s.key, {})
        log.setdefault("setting1", []).append(float(right.mean()))
        for name, lam in (("e2e", 0.0), ("detector_aware", self.lam)):
            attack = SignalAwarePGD(
                self.signals(),
                clean,
                i,
                lam=lam,
                spec=spec,
                hp=self.params["robust_detect"],
                factors=self.factors,
            )
            x_adv = attack(self.x["test"][i], y, self._gen("h20", name, s.key, draw))
            xs_a, zs_a = list(self.x["test"]), list(clean)
            xs_a[i], zs_a[i] = x_adv, predict_logits(self.nets[i], x_adv)
            r = _acc(self.robust_detect(zs_a, xs_a).p, y)
            log.setdefault(name, []).append(float(r.mean()))
            right = right * r
        return right

    def _gated(self, zs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        res = self.robust(zs)
        return res.p, res.reliability
