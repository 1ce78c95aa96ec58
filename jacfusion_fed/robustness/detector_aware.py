"""A detector-aware adaptive attack on reliability-gated fusion (issue 11).

White-box and end to end: the attacker knows the fusion rule, every owner's published
calibration and the other modalities' logits, and differentiates through the gating. It
maximises

    L(x') = CE(p_fused(x'), y) + lam * ln r_a(x')

under ||x' - x||_inf <= eps, x' in [0, 1]: it raises the fused loss while keeping the attacked
modality a's reliability score high, so the detector keeps trusting it. PGD with signed
gradient steps (Madry et al.), the interface of torchattacks' attacks: ``attack(x, y)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["DetectorAwarePGD", "GatedFusion"]

GatedFusion = Callable[[Sequence[torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]
"""``logits (M x (N, K)) -> (p (N, K), reliability (N, M))``, differentiable."""

_FLOOR = 1e-300


class DetectorAwarePGD:
    """L_inf PGD on CE(fused) + lam ln(reliability of the attacked modality).

    Args:
        net: the attacked modality's network (inputs in [0, 1] -> logits).
        other_logits: every modality's logits in fusion order (entry ``position`` ignored).
        position: index of the attacked modality.
        fusion: the gated fusion rule, returning probabilities and reliabilities.
        eps: L_inf budget; alpha: step size; steps: iterations (> 0 each).
        lam: weight of the reliability term (>= 0; 0 is plain end-to-end PGD).
        random_start: start from a uniform point of the eps-ball.
    """

    def __init__(
        self,
        net: nn.Module,
        other_logits: Sequence[torch.Tensor],
        position: int,
        fusion: GatedFusion,
        *,
        eps: float,
        alpha: float,
        steps: int = 20,
        lam: float = 1.0,
        random_start: bool = True,
    ) -> None:
        if not 0 <= position < len(other_logits):
            raise ValueError(f"position {position} outside 0..{len(other_logits) - 1}")
        if eps < 0 or alpha <= 0 or steps < 1 or lam < 0:
            raise ValueError(
                f"need eps >= 0, alpha > 0, steps >= 1, lam >= 0; got {eps}, {alpha}, {steps}, "
                f"{lam}"
            )
        self.net, self.position, self.fusion = net, position, fusion
        self.fixed = [z.detach().to(torch.float64) for z in other_logits]
        self.eps, self.alpha, self.steps, self.lam = eps, alpha, steps, lam
        self.random_start = random_start

    def objective(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample CE(p_fused, y) + lam ln r_a, shape (N,)."""
        logits = list(self.fixed)
        logits[self.position] = self.net(x).to(torch.float64)
        p, rel = self.fusion(logits)
        ce = -torch.log(p.gather(1, y[:, None]).squeeze(1).clamp_min(_FLOOR))
        return ce + self.lam * torch.log(rel[:, self.position].clamp_min(_FLOOR))

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        was_training = self.net.training
        self.net.eval()
        x = x.detach()
        adv = x.clone()
        if self.random_start:
            noise = torch.rand(x.shape, generator=generator, dtype=x.dtype) * 2 - 1
            adv = (x + self.eps * noise.to(x.device)).clamp(0.0, 1.0)
        try:
            for _ in range(self.steps):
                adv.requires_grad_(True)
                (grad,) = torch.autograd.grad(self.objective(adv, y).sum(), adv)
                adv = adv.detach() + self.alpha * grad.sign()
                adv = (x + (adv - x).clamp(-self.eps, self.eps)).clamp(0.0, 1.0)
        finally:
            self.net.train(was_training)
        return adv.detach()
