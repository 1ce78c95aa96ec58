"""One paper-style table: logits under every perturbation, fusion rows, gamma selection, sweeps.

Fusion order is ``[clean modality, perturbed modality]``, so ``MM (0, i)`` fuses the clean
modality's regular net (row 0) with the perturbed modality's net ``i``. Random draws are paired:
within a repeat, every net of the perturbed modality sees the same corrupted inputs.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from jacfusion_fed.data import MultimodalDataset
from jacfusion_fed.fusion import GramFactor, factor_gram, gram_of, log_prior_from_counts
from jacfusion_fed.models import UnimodalNet
from jacfusion_fed.robustness import (
    AttackSpec,
    Corruption,
    FusionRule,
    attack_fused,
    worst_case_logits,
)
from jacfusion_fed.training import predict_logits

from .config import ColumnSpec, SweepSpec, TablePreset
from .gamma import select_gamma
from .results import MM_ROW_KINDS, ROW_NAMES, Column, Curve, Row, Table

__all__ = ["E2E_SUFFIX", "TableRun"]

E2E_SUFFIX = ":e2e_only"
"""Row.acc key suffix of the pure end-to-end attack (adaptive columns hold the per-sample worst
case of it and the setting-1 attack)."""

Perturbation = Corruption | AttackSpec
_REGULARIZE = {
    "jacobian": (1,),
    "jacobian_centered": (1,),
    "jacobian_clean": (0,),
    "jacobian_all": (0, 1),
}
_PER_SAMPLE = ("statistical", "jacobian", "jacobian_centered")
"""Rows whose per-sample correctness is kept (the tables mark their paired difference)."""


def _accuracy(probs: torch.Tensor, y: torch.Tensor) -> float:
    return float((probs.argmax(dim=1) == y).double().mean())


def _correct(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (probs.argmax(dim=1) == y).double()


def _keep_correct(row: Row, key: str, per_draw: list[torch.Tensor]) -> None:
    """Store the per-sample correctness of ``row`` in column ``key`` (mean over the draws)."""
    if row.kind in _PER_SAMPLE and per_draw:
        row.correct[key] = [round(float(v), 6) for v in torch.stack(per_draw).mean(0)]


@dataclass
class _Split:
    x: torch.Tensor  # perturbed modality's inputs
    y: torch.Tensor
    z_clean: torch.Tensor  # clean modality's logits (never perturbed)
    z_pert: list[torch.Tensor]  # clean logits of each perturbed-modality net


class TableRun:
    """Computes one :class:`Table` (and its sweep curves) for a fixed set of trained nets.

    Args:
        preset: the table's columns and sweeps.
        data: ``{"train", "val", "test"}`` splits.
        clean_net: the clean modality's regular net (row 0).
        nets: the perturbed modality's nets (rows 1..n), named by ``names``.
        names: row names ``["0: Img-regT", "1: Aud-regT", ...]`` (clean first).
        seed: base seed of every random draw.
        repeats: test-time draws of every random corruption.
        attack_repeats: draws of PGD's random start.
        gamma: fixed gamma, or None to select from ``candidates`` on the validation split.
    """

    def __init__(
        self,
        preset: TablePreset,
        data: dict[str, MultimodalDataset],
        clean_net: UnimodalNet,
        nets: Sequence[UnimodalNet],
        names: Sequence[str],
        *,
        seed: int,
        repeats: int,
        attack_repeats: int = 1,
        gamma: float | None,
        candidates: Sequence[float],
        dataset: str,
    ) -> None:
        self.preset = preset
        self.nets = list(nets)
        self.names = list(names)
        self.seed, self.repeats, self.attack_repeats = seed, repeats, attack_repeats
        self.gamma, self.candidates = gamma, tuple(candidates)
        self.dataset = dataset
        self.splits = {
            split: _Split(
                x=torch.from_numpy(data[split].modalities[preset.perturbed]),
                y=torch.from_numpy(data[split].labels),
                z_clean=predict_logits(clean_net, data[split].modalities[preset.clean]),
                z_pert=[predict_logits(n, data[split].modalities[preset.perturbed]) for n in nets],
            )
            for split in ("val", "test")
        }
        self.log_prior = torch.from_numpy(log_prior_from_counts(data["train"].class_counts()))
        self.factor_clean = _factor(clean_net)
        self.factors = [_factor(n) for n in nets]
        self.clean_test_acc = _accuracy(self.splits["test"].z_clean, self.splits["test"].y)
        self._cache: dict[tuple[object, ...], torch.Tensor] = {}
        self._inputs_key: tuple[object, ...] | None = None
        self._inputs = torch.empty(0)
        self._gammas: dict[tuple[object, ...], float] = {}

    # ----------------------------------------------------------------------------- plumbing
    def _generator(self, *parts: object) -> torch.Generator:
        key = repr((self.dataset, self.preset.perturbed, *parts)).encode()
        return torch.Generator().manual_seed((zlib.crc32(key) << 20) ^ self.seed)

    def rule(self, i: int, kind: str, gamma: float = 1.0) -> FusionRule:
        """The fusion rule of row ``kind`` for pair ``MM (0, i + 1)``."""
        if kind in ("mean", "confidence_mean"):
            return FusionRule(kind)
        if kind == "statistical":
            return FusionRule("statistical", log_prior=self.log_prior)
        return FusionRule(
            "jacobian",
            (self.factor_clean, self.factors[i]),
            self.log_prior,
            gamma,
            _REGULARIZE[kind],
            center_logits=kind == "jacobian_centered",
        )

    def draws(self, spec: Perturbation | None) -> int:
        if spec is None:
            return 1
        if isinstance(spec, AttackSpec):
            return 1 if spec.deterministic else self.attack_repeats
        return self.repeats

    def perturbed_logits(
        self, spec: Perturbation | None, split: str, draw: int, nets: Sequence[int] | None = None
    ) -> list[torch.Tensor]:
        """Logits of the perturbed-modality nets (all, or the indices ``nets``) under ``spec``
        (setting 1 for attacks). Every (spec, split, draw, net) is computed once per run."""
        s = self.splits[split]
        indices = range(len(self.nets)) if nets is None else nets
        if spec is None:
            return [s.z_pert[i] for i in indices]
        out = []
        for i in indices:
            key = (spec, split, draw, i)
            if key not in self._cache:
                net = self.nets[i]
                if isinstance(spec, AttackSpec):
                    gen = self._generator("attack", spec, split, draw, i)
                    self._cache[key] = predict_logits(net, spec.build(net)(s.x, s.y, gen))
                else:
                    self._cache[key] = predict_logits(net, self._corrupted(spec, split, draw))
            out.append(self._cache[key])
        return out

    def _corrupted(self, spec: Corruption, split: str, draw: int) -> torch.Tensor:
        """The corrupted inputs of one draw, shared by all nets (the last one is kept)."""
        key = (spec, split, draw)
        if self._inputs_key != key:
            self._inputs = spec(self.splits[split].x, self._generator("corrupt", spec, split, draw))
            self._inputs_key = key
        return self._inputs

    def gamma_for(self, spec: Perturbation | None, i: int, kind: str) -> float:
        """gamma of a Jacobian row: fixed, or selected on validation under ``spec``."""
        if self.gamma is not None:
            return self.gamma
        key = (spec, i, kind)
        if key not in self._gammas:
            val = self.splits["val"]

            def views(draw: int) -> list[torch.Tensor]:
                return [val.z_clean, self.perturbed_logits(spec, "val", draw, [i])[0]]

            factors: list[GramFactor | None] = [self.factor_clean, self.factors[i]]
            self._gammas[key] = select_gamma(
                [val.z_clean, val.z_pert[i]],
                factors,
                val.y,
                None if spec is None else views,
                self.candidates,
                log_prior=self.log_prior,
                regularize=_REGULARIZE[kind],
                center_logits=kind == "jacobian_centered",
            )
        return self._gammas[key]

    # ----------------------------------------------------------------------------- the table
    def table(self, adaptive: bool = True) -> Table:
        columns = [c for c in self.preset.columns if adaptive or c.kind != "adaptive"]
        rows = [Row("UM", self.names[0], "unimodal")]
        rows += [Row("UM", n, "unimodal") for n in self.names[1:]]
        mm: dict[tuple[int, str], Row] = {}
        for i in range(len(self.nets)):
            for kind in MM_ROW_KINDS:
                mm[(i, kind)] = Row(f"MM (0, {i + 1})", ROW_NAMES[kind], kind)
        for col in columns:
            rows[0].acc[col.key] = [self.clean_test_acc]
            if col.kind == "adaptive":
                self._adaptive_column(col, rows, mm)
            else:
                self._column(col, rows, mm)
        return Table(
            title=self.preset.title,
            dataset=self.dataset,
            perturbed=self.preset.perturbed,
            clean=self.preset.clean,
            columns=[Column(c.key, c.label, c.kind) for c in columns],
            rows=rows + [mm[(i, k)] for i in range(len(self.nets)) for k in MM_ROW_KINDS],
            repeats=self.repeats,
        )

    def _spec(self, col: ColumnSpec) -> Perturbation | None:
        return col.corruption if col.corruption is not None else col.attack

    def _column(self, col: ColumnSpec, rows: list[Row], mm: dict[tuple[int, str], Row]) -> None:
        spec = self._spec(col)
        test = self.splits["test"]
        for i in range(len(self.nets)):
            for kind in _REGULARIZE:
                mm[(i, kind)].gamma[col.key] = self.gamma_for(spec, i, kind)
        per_draw: dict[tuple[int, str], list[torch.Tensor]] = {k: [] for k in mm}
        for draw in range(self.draws(spec)):
            logits = self.perturbed_logits(spec, "test", draw)
            for i, z in enumerate(logits):
                rows[i + 1].acc.setdefault(col.key, []).append(_accuracy(z, test.y))
                for kind in MM_ROW_KINDS:
                    row = mm[(i, kind)]
                    rule = self.rule(i, kind, row.gamma.get(col.key, 1.0))
                    right = _correct(rule([test.z_clean, z]), test.y)
                    row.acc.setdefault(col.key, []).append(float(right.mean()))
                    per_draw[(i, kind)].append(right)
        for key, values in per_draw.items():
            _keep_correct(mm[key], col.key, values)

    def _adaptive_column(
        self, col: ColumnSpec, rows: list[Row], mm: dict[tuple[int, str], Row]
    ) -> None:
        spec = col.attack
        assert spec is not None
        test = self.splits["test"]
        for draw in range(self.draws(spec)):  # unimodal: the adaptive attack is setting 1
            for i, z in enumerate(self.perturbed_logits(spec, "test", draw)):
                rows[i + 1].acc.setdefault(col.key, []).append(_accuracy(z, test.y))
        for i, net in enumerate(self.nets):
            for kind in MM_ROW_KINDS:
                row = mm[(i, kind)]
                if kind in _REGULARIZE:
                    row.gamma[col.key] = self.gamma_for(spec, i, kind)
                rule = self.rule(i, kind, row.gamma.get(col.key, 1.0))
                per_draw: list[torch.Tensor] = []
                for draw in range(self.draws(spec)):
                    x_adv = attack_fused(
                        spec.build,
                        net,
                        test.x,
                        test.y,
                        [test.z_clean, test.z_pert[i]],
                        1,
                        rule,
                        generator=self._generator("adaptive", spec, kind, draw, i),
                    )
                    z_e2e = predict_logits(net, x_adv)
                    z_set1 = self.perturbed_logits(spec, "test", draw, [i])[0]
                    z = worst_case_logits(rule, [test.z_clean, z_e2e], 1, [z_e2e, z_set1], test.y)
                    right = _correct(rule([test.z_clean, z]), test.y)
                    row.acc.setdefault(col.key, []).append(float(right.mean()))
                    per_draw.append(right)
                    row.acc.setdefault(col.key + E2E_SUFFIX, []).append(
                        _accuracy(rule([test.z_clean, z_e2e]), test.y)
                    )
                _keep_correct(row, col.key, per_draw)

    # ----------------------------------------------------------------------------- sweeps
    def curves(self, sweeps: Sequence[SweepSpec], pair: int = 0) -> list[Curve]:
        """Figure 4 curves for ``MM (0, pair + 1)``: Stat-w/o and Stat-w/ at every candidate
        gamma (fixed, not selected) against the size of each sweep's perturbation."""
        test = self.splits["test"]
        out: list[Curve] = []
        for sweep in sweeps:
            keys: list[tuple[str, float | None]] = [("statistical", None)]
            keys += [("jacobian", g) for g in self.candidates]
            lines: dict[tuple[str, float | None], list[list[float]]] = {k: [] for k in keys}
            for size in sweep.sizes:
                spec = None if size == 0 else sweep.make(size)
                accs: dict[tuple[str, float | None], list[float]] = {k: [] for k in lines}
                for draw in range(self.draws(spec)):
                    z = self.perturbed_logits(spec, "test", draw, [pair])[0]
                    for method, g in lines:
                        kind = "statistical" if method == "statistical" else "jacobian"
                        rule = self.rule(pair, kind, g or 1.0)
                        accs[(method, g)].append(_accuracy(rule([test.z_clean, z]), test.y))
                for k, v in accs.items():
                    lines[k].append(v)
            for (method, g), acc in lines.items():
                out.append(
                    Curve(
                        table=self.preset.title,
                        perturbation=sweep.name,
                        parameter=sweep.parameter,
                        method=method,
                        gamma=g,
                        sizes=[float(s) for s in sweep.sizes],
                        acc=acc,
                    )
                )
        return out


def _factor(net: UnimodalNet) -> GramFactor:
    return factor_gram(gram_of(net.head.weight.detach().to(torch.float64)))
