"""Setting 2 (adaptive, white-box) attacks: attack the fused prediction end to end.

:class:`FusionRule` names one late-fusion rule of the paper's tables (Mean-w/o, Mean-w/,
Stat-w/o, Stat-w/) with its fixed parameters. :class:`FusedLogProbs` turns one modality's
network plus the other modalities' (fixed) logits into an ``nn.Module`` from that modality's input
to ``log p`` of the fused prediction, so torchattacks can attack the whole fused pipeline,
Jacobian solve included (gradients flow through it by implicit differentiation,
:mod:`jacfusion_fed.fusion.implicit`). :func:`attack_fused` runs an attack through it in chunks.

A gradient attack on the fused loss alone can be *weaker* than the per-modality attack against
Jacobian fusion: the sample-wise W_a damps the attacked logits more the less certain the fused
prediction gets, so the fused loss is not monotone along the path that flips the unimodal
prediction and PGD on it stalls. An adaptive attacker knows every candidate attack, so
:func:`worst_case_logits` keeps, per sample, the candidate that hurts the fused prediction most
(misclassified first, then the higher fused cross-entropy), as ensemble evaluations such as
AutoAttack do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from jacfusion_fed.fusion import METHODS, GramFactor, fuse, get_method

from .attacks import Attack

__all__ = ["FUSION_METHODS", "FusedLogProbs", "FusionRule", "attack_fused", "worst_case_logits"]

#: The fusion registry's method names (:data:`jacfusion_fed.fusion.METHODS`).
FUSION_METHODS: tuple[str, ...] = METHODS
_LOG_FLOOR = 1e-300


@dataclass(frozen=True)
class FusionRule:
    """One fusion rule with fixed parameters: ``rule(logits) -> probabilities (N, K)``.

    Attributes:
        method: a registered fusion method (:data:`jacfusion_fed.fusion.METHODS`):
            ``"mean"`` (Mean-w/o), ``"confidence_mean"`` (Mean-w/), ``"statistical"``
            (Stat-w/o) or ``"jacobian"`` (Stat-w/).
        factors: per modality a :class:`GramFactor` (or None); used by ``"jacobian"`` only.
        log_prior: ln freq (K,) or None; used by the statistical rules only.
        gamma: gamma of the Jacobian rule.
        regularize: modality indices given a W_m (``"jacobian"`` only).
        center_logits: ``"jacobian"`` only: subtract each modality's mean logit first.
    """

    method: str
    factors: tuple[GramFactor | None, ...] = ()
    log_prior: torch.Tensor | None = None
    gamma: float = 0.5
    regularize: tuple[int, ...] = field(default=())
    center_logits: bool = False

    def __post_init__(self) -> None:
        if self.method not in FUSION_METHODS:
            raise ValueError(f"method must be one of {FUSION_METHODS}, got {self.method!r}")
        if self.method == "jacobian" and not self.regularize:
            raise ValueError("a 'jacobian' rule needs regularize (the modalities given a W_m)")

    def __call__(self, logits: Sequence[torch.Tensor]) -> torch.Tensor:
        rule = get_method(self.method)
        options = rule.pick(
            gamma=self.gamma, regularize=list(self.regularize), center_logits=self.center_logits
        )
        grams = list(self.factors) if self.factors else None
        return fuse(rule, logits, grams, self.log_prior, options)


class FusedLogProbs(nn.Module):
    """``x_m -> log p_fused`` with modality ``position``'s net live and every other input fixed.

    Args:
        net: the attacked modality's network (input -> logits (N, K)).
        other_logits: logits of all modalities, shape (N, K) each, in fusion order; the entry at
            ``position`` is ignored (replaced by ``net(x)``). The batch passed to ``forward``
            must be the same N samples in the same order.
        position: index of the attacked modality in the fusion order.
        rule: the fusion rule attacked (gamma, Gram factors and prior fixed).

    The output is ``log`` of the fused probabilities in float64 (floored at 1e-300), which
    torchattacks' cross-entropy treats as logits (the log-sum-exp of log-probabilities is 0).
    """

    def __init__(
        self,
        net: nn.Module,
        other_logits: Sequence[torch.Tensor],
        position: int,
        rule: FusionRule | Callable[[Sequence[torch.Tensor]], torch.Tensor],
    ) -> None:
        super().__init__()
        if not 0 <= position < len(other_logits):
            raise ValueError(f"position {position} outside 0..{len(other_logits) - 1}")
        self.net = net
        self.position = position
        self.rule = rule
        self._fixed = [z.detach().to(torch.float64) for z in other_logits]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != self._fixed[0].shape[0]:
            raise ValueError(
                f"FusedLogProbs was built for {self._fixed[0].shape[0]} samples, got {x.shape[0]}"
            )
        logits = list(self._fixed)
        logits[self.position] = self.net(x).to(torch.float64)
        probs = self.rule(logits)
        return torch.log(probs.clamp_min(_LOG_FLOOR))


def attack_fused(
    make_attack: Callable[[nn.Module], Attack],
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    other_logits: Sequence[torch.Tensor],
    position: int,
    rule: FusionRule,
    *,
    generator: torch.Generator | None = None,
    batch_size: int = 512,
) -> torch.Tensor:
    """Adversarial ``x`` for modality ``position`` against the fused prediction of ``rule``.

    ``make_attack(model)`` builds the attack (e.g. ``lambda m: PGD(m, 0.03, 0.001)``); it is
    applied to a :class:`FusedLogProbs` per chunk of ``batch_size`` samples.
    """
    out = []
    for start in range(0, x.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        target = FusedLogProbs(net, [z[sl] for z in other_logits], position, rule)
        attack = make_attack(target)
        attack.batch_size = max(attack.batch_size, x.shape[0])
        out.append(attack(x[sl], y[sl], generator))
    return torch.cat(out) if out else x.clone()


def worst_case_logits(
    rule: FusionRule,
    fixed_logits: Sequence[torch.Tensor],
    position: int,
    candidates: Sequence[torch.Tensor],
    y: torch.Tensor,
) -> torch.Tensor:
    """Per sample, the candidate logits of modality ``position`` that are worst for ``rule``.

    Args:
        rule: the fusion rule attacked.
        fixed_logits: logits of all modalities (entry ``position`` is replaced by candidates).
        position: the attacked modality.
        candidates: (N, K) logits of the attacked modality under each candidate attack.
        y: true labels (N,).

    Returns:
        (N, K) logits: for each sample the candidate that the fused prediction misclassifies
        (if any), ties broken by the larger fused cross-entropy.
    """
    if not candidates:
        raise ValueError("worst_case_logits needs at least one candidate")
    scores = []
    with torch.no_grad():
        for z in candidates:
            logits = list(fixed_logits)
            logits[position] = z
            probs = rule(logits).to(torch.float64)
            wrong = (probs.argmax(dim=1) != y).to(torch.float64)
            loss = -torch.log(probs.gather(1, y[:, None]).squeeze(1).clamp_min(_LOG_FLOOR))
            scores.append(wrong * 1e6 + loss.clamp_max(1e5))
        best = torch.stack(scores).argmax(dim=0)  # (N,)
        stacked = torch.stack(list(candidates))  # (C, N, K)
        return stacked[best, torch.arange(stacked.shape[1])]
