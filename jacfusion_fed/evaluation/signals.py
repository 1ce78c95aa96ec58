"""Issue 20's detectors in the evaluation: the owners' feature p-values and the coordinator's
cross-modal consistency, fitted on one seed's clean validation split, and the detector-aware
attack on them (:class:`SignalAwarePGD`).

Used by the detection table (:mod:`.detection`) and by the ``robust + detectors`` row of the
"perturbed modality unknown" table (:mod:`.unknown`). Shapes: N samples, M modalities,
K classes; p-values lie in (0, 1].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from jacfusion_fed.fusion import (
    GramFactor,
    ModalityCalibration,
    combine_pvalues,
    consistency_pvalues,
    feature_pvalues,
    fit_consistency,
    fit_layered_detector,
    layered_pvalues,
    robust_fusion,
)
from jacfusion_fed.fusion.robust import typicality_pvalues
from jacfusion_fed.models import UnimodalNet
from jacfusion_fed.robustness import AttackSpec
from jacfusion_fed.robustness.detector_aware import DetectorAwarePGD
from jacfusion_fed.training import predict_layers
from jacfusion_fed.training.input_detector import InputDetector, input_pvalues

__all__ = ["DEFAULT_HP", "SIGNALS", "SignalAwarePGD", "Signals", "layers", "robust_with"]

SIGNALS: tuple[str, ...] = (
    "typicality",
    "penultimate",
    "feature",
    "consistency",
    "fisher",
    "cauchy",
)
"""The detection table's signals: ``penultimate`` (the owner's detector on the penultimate
features alone) is a diagnostic, not published; ``fisher`` / ``cauchy`` combine typicality,
feature (every layer; with input tests, Bonferroni with the owner's input p-value) and
consistency. With input tests :attr:`Signals.names` adds ``input``, the input test alone (a
diagnostic too: the owner publishes it combined into ``feature``)."""
DEFAULT_HP: dict[str, Any] = {"floor": 0.05, "trust_level": 0.05}
"""robust's fixed hyperparameters in the detection table (not selected)."""


def layers(net: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's activations (N, D_l) of ``x``, the penultimate features last (what the
    owner's detector reads, :func:`~jacfusion_fed.training.predict_layers`)."""
    acts = predict_layers(net, x)
    if acts is None:
        raise ValueError("the detectors need nets that expose their features")
    return acts


def robust_with(
    zs: Sequence[torch.Tensor],
    calibrations: Sequence[ModalityCalibration],
    log_prior: torch.Tensor,
    factors: Sequence[GramFactor | None] | None,
    extra: torch.Tensor | None,
    hp: Mapping[str, Any],
) -> Any:
    """``robust_fusion`` of logits ``zs`` with detection p-values ``extra`` (N, M, S) and
    hyperparameters ``hp`` (floor, trust_level, optional jacobian_level, gamma and combine:
    ``"fisher"`` by default, or ``"cauchy"``)."""
    level = float(hp.get("jacobian_level", 0.0))
    return robust_fusion(
        list(zs),
        calibrations,
        log_prior,
        factors if level > 0 else None,
        floor=float(hp["floor"]),
        trust_level=float(hp["trust_level"]),
        jacobian_level=level,
        gamma=float(hp.get("gamma", 1.0)),
        pvalues=extra,
        combine=str(hp.get("combine", "fisher")),
        retain=float(hp.get("retain", 0.0)),
    )


class Signals:
    """The detectors of one seed, fitted on its clean validation split: per modality the
    owner's layered feature detector (class-conditional Mahalanobis on every layer, split
    conformal, Cauchy over the layers), and the cross-modal consistency of the paired
    validation logits.

    Args:
        nets: the M owners' nets.
        x_val, y_val, z_val: the clean validation inputs (per modality), labels (N_val,) and
            logits (per modality, (N_val, K)).
        x_test: the clean test inputs (per modality): the fixed modalities' own feature
            p-values in :meth:`smooth_pvalues`.
        calibrations, log_prior: robust's typicality calibration and ln freq (K,).
        input_detectors: per modality, the owner's input test
            (:mod:`~jacfusion_fed.training.input_detector`) or None; with one, modality m's
            feature p-value is the Bonferroni combination of its layered p-value and its input
            p-value (what the owner publishes). None: no input tests (the tables').
    """

    def __init__(
        self,
        nets: Sequence[UnimodalNet],
        x_val: Sequence[torch.Tensor],
        y_val: torch.Tensor,
        z_val: Sequence[torch.Tensor],
        x_test: Sequence[torch.Tensor],
        calibrations: Sequence[ModalityCalibration],
        log_prior: torch.Tensor,
        input_detectors: Sequence[InputDetector | None] | None = None,
    ) -> None:
        self.nets, self.calibrations, self.log_prior = list(nets), list(calibrations), log_prior
        self.inputs = list(input_detectors) if input_detectors else [None] * len(self.nets)
        if len(self.inputs) != len(self.nets):
            raise ValueError(
                f"input_detectors must have one entry per modality ({len(self.nets)}), "
                f"got {len(self.inputs)}"
            )
        self.names: tuple[str, ...] = SIGNALS + (
            ("input",) if any(d is not None for d in self.inputs) else ()
        )
        k = int(self.nets[0].head.out_features)
        self.detectors = [
            fit_layered_detector(layers(net, x), y_val, k)
            for net, x in zip(self.nets, x_val, strict=True)
        ]
        self.consistency = fit_consistency(list(z_val), y_val, log_prior)
        self.clean_feature = torch.stack(  # (N test, M): the fixed modalities' own p-values
            [
                self._owner(i, layers(net, x), self._input(i, x, smooth=True), smooth=True)
                for i, (net, x) in enumerate(zip(self.nets, x_test, strict=True))
            ],
            dim=1,
        )

    def _input(self, m: int, x: torch.Tensor, *, smooth: bool) -> torch.Tensor | None:
        """Modality m's input-test p-values (N,) of inputs ``x``; None without an input test."""
        det = self.inputs[m]
        return None if det is None else input_pvalues(det, x, smooth=smooth)

    def _owner(
        self, m: int, acts: Sequence[torch.Tensor], u_input: torch.Tensor | None, *, smooth: bool
    ) -> torch.Tensor:
        """Modality m's published p-value (N,): its layered feature p-value of activations
        ``acts``, combined with its input-test p-values ``u_input`` if it has them
        (Bonferroni: :mod:`jacfusion_fed.fusion.pvalues` says why not Cauchy)."""
        feat = layered_pvalues(self.detectors[m], acts, smooth=smooth)
        if u_input is None:
            return feat
        return combine_pvalues(torch.stack([feat, u_input], dim=-1), "bonferroni")

    def smooth_pvalues(
        self,
        zs: Sequence[torch.Tensor],
        layers_m: Sequence[torch.Tensor],
        m: int,
        x_m: torch.Tensor,
    ) -> torch.Tensor:
        """Differentiable (feature, consistency) p-values (N, M, 2) of the test samples;
        modality m's feature p-value from its activations ``layers_m`` (and inputs ``x_m``,
        for its input test), the others' those of their clean test inputs (fixed)."""
        cons = consistency_pvalues(list(zs), self.consistency, smooth=True)
        feat = self.clean_feature
        feat_m = self._owner(m, layers_m, self._input(m, x_m, smooth=True), smooth=True)
        feat = torch.cat([feat[:, :m], feat_m[:, None], feat[:, m + 1 :]], dim=1)
        return torch.stack([feat, cons], dim=2)

    def pvalues(
        self, zs: Sequence[torch.Tensor], xs: Sequence[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Every signal's exact p-values (N, M) for logits ``zs`` of inputs ``xs``."""
        typ = torch.stack(
            [
                typicality_pvalues(z.to(torch.float64), c)
                for z, c in zip(zs, self.calibrations, strict=True)
            ],
            dim=1,
        )
        u_input = [self._input(m, x, smooth=False) for m, x in enumerate(xs)]
        feat, acts = self._feature(xs, u_input)
        last = torch.stack(
            [
                feature_pvalues(d.layers[-1], a[-1])
                for d, a in zip(self.detectors, acts, strict=True)
            ],
            dim=1,
        )
        cons = consistency_pvalues(list(zs), self.consistency, smooth=False)
        three = torch.stack([typ, feat, cons], dim=2)
        out = {
            "typicality": typ,
            "penultimate": last,
            "feature": feat,
            "consistency": cons,
            "fisher": combine_pvalues(three, "fisher"),
            "cauchy": combine_pvalues(three, "cauchy"),
        }
        if "input" in self.names:  # 1 (uninformative) where a modality has no input test
            out["input"] = torch.stack(
                [
                    torch.ones(len(x), dtype=torch.float64) if u is None else u
                    for u, x in zip(u_input, xs, strict=True)
                ],
                dim=1,
            )
        return out

    def _feature(
        self, xs: Sequence[torch.Tensor], u_input: Sequence[torch.Tensor | None]
    ) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
        """The owners' published p-values (N, M) of inputs ``xs`` (with their input-test
        p-values ``u_input``), and every modality's activations."""
        acts = [layers(net, x) for net, x in zip(self.nets, xs, strict=True)]
        pairs = enumerate(zip(acts, u_input, strict=True))
        feat = [self._owner(m, a, u, smooth=False) for m, (a, u) in pairs]
        return torch.stack(feat, dim=1), acts

    def extra(self, zs: Sequence[torch.Tensor], xs: Sequence[torch.Tensor]) -> torch.Tensor:
        """The (feature, consistency) p-values (N, M, 2) ``robust_fusion`` takes as
        ``pvalues``."""
        cons = consistency_pvalues(list(zs), self.consistency, smooth=False)
        u_input = [self._input(m, x, smooth=False) for m, x in enumerate(xs)]
        return torch.stack([self._feature(xs, u_input)[0], cons], dim=2)


class SignalAwarePGD(DetectorAwarePGD):
    """:class:`DetectorAwarePGD` on ``robust`` + detectors: white box, it maximises
    CE(robust fused with the detectors) + lam ln r_m, where r_m is the combination (``hp``'s
    ``combine``, Fisher by default) of the attacked modality m's typicality, feature (through
    the owner's net: every layer of x') and consistency p-values (smooth interpolations,
    differentiable), at the setting's budget, step and steps. lam = 0 is the end-to-end attack
    through that fusion.

    Args:
        signals: the seed's detectors.
        clean: every modality's clean test logits (the others stay fixed).
        position: the attacked modality m.
        lam: weight of the reliability term.
        spec: the setting's attack (budget w4, step w5, steps w6).
        hp: robust's hyperparameters (:func:`robust_with`), ``factors`` its Gram factors.
    """

    def __init__(
        self,
        signals: Signals,
        clean: Sequence[torch.Tensor],
        position: int,
        *,
        lam: float,
        spec: AttackSpec,
        hp: Mapping[str, Any] = DEFAULT_HP,
        factors: Sequence[GramFactor | None] | None = None,
    ) -> None:
        net = signals.nets[position]
        steps = 1 if spec.kind == "fgsm" else spec.w6
        step = spec.w4 if spec.kind == "fgsm" else spec.w5
        super().__init__(
            net,
            clean,
            position,
            lambda z: (torch.zeros(0), torch.zeros(0)),  # unused: objective is overridden
            eps=spec.w4,
            alpha=step,
            steps=steps,
            lam=lam,
            random_start=spec.kind == "pgd",
        )
        self.signals, self.hp, self.factors = signals, dict(hp), factors
        self.unet = net  # the built-in net: features and head

    def objective(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        sig, m = self.signals, self.position
        acts = self.unet.layers(x)
        logits = list(self.fixed)
        logits[m] = self.unet.head(acts[-1]).to(torch.float64)
        pv = sig.smooth_pvalues(logits, [h.to(torch.float64) for h in acts], m, x)
        out = robust_with(logits, sig.calibrations, sig.log_prior, self.factors, pv, self.hp)
        ce = -torch.log(out.p.gather(1, y[:, None]).squeeze(1).clamp_min(1e-300))
        if self.lam == 0:
            return ce
        return ce + self.lam * torch.log(out.reliability[:, m].clamp_min(1e-300))
