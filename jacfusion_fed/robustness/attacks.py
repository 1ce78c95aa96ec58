"""l_inf adversarial attacks of Supplementary B.1 (FGSM: w4; PGD: w4, w5, w6) via torchattacks.

Every attack is an :class:`Attack`: built around the model to attack and called as
``attack(x, y) -> x_adv``. Inputs must lie in [0, 1] (torchattacks clamps adversarial inputs to
that box, so a wider input would be changed silently; we refuse it instead); epsilons and step
sizes are in units of that range.

Setting 1 of the paper attacks the perturbed modality's own unimodal network (pass that network);
setting 2 (adaptive) attacks the fused prediction end to end: pass a
:class:`~jacfusion_fed.robustness.adaptive.FusedLogProbs` wrapper instead.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

import torch
import torchattacks
from torch import nn

__all__ = ["FGSM", "PGD", "Attack", "AttackSpec", "check_unit_range"]

_RANGE_TOL = 1e-6


def check_unit_range(x: torch.Tensor, name: str = "x") -> None:
    """Raise ``ValueError`` unless every entry of ``x`` lies in [0, 1] (up to 1e-6)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"{name} must be a floating torch.Tensor")
    if x.numel() and (float(x.min()) < -_RANGE_TOL or float(x.max()) > 1 + _RANGE_TOL):
        raise ValueError(
            f"{name} must lie in [0, 1] (the attacks' input convention); got range "
            f"[{float(x.min()):.3g}, {float(x.max()):.3g}]. Scale inputs first."
        )


def _check_nonneg(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return float(value)


def _check_model(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if next(model.parameters(), None) is None:
        raise ValueError("model must have at least one parameter (torchattacks reads its device)")
    return model


class Attack(ABC):
    """An attack bound to one model: ``attack(x, y) -> x_adv`` (same shape, within [0, 1]).

    Attributes:
        model: the network attacked (its outputs are treated as logits; log-probabilities work
            as well, the cross-entropy is unchanged by the log-sum-exp shift).
        batch_size: samples per torchattacks call (memory bound only; results do not depend on
            it, except through PGD's random starts).
    """

    deterministic: bool = True

    def __init__(self, model: nn.Module, *, batch_size: int = 512) -> None:
        self.model = _check_model(model)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.batch_size = batch_size

    @property
    @abstractmethod
    def label(self) -> str:
        """Column label in the paper's notation, e.g. ``"FGSM w4=0.03"``."""

    @abstractmethod
    def _torchattack(self) -> torchattacks.attack.Attack:
        """The configured torchattacks object."""

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Adversarial version of ``x`` (labels ``y``); ``generator`` seeds random starts."""
        check_unit_range(x)
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
        atk = self._torchattack()
        seed = int(torch.randint(0, 2**62, (1,), generator=generator)) if generator else None
        chunks = []
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            for start in range(0, x.shape[0], self.batch_size):
                sl = slice(start, start + self.batch_size)
                chunks.append(atk(x[sl], y[sl]).detach())
        if not chunks:
            return x.clone()
        return torch.cat(chunks).to(dtype=x.dtype)


class FGSM(Attack):
    """Fast gradient sign method, l_inf budget ``w4`` (one step of size ``w4``)."""

    def __init__(self, model: nn.Module, w4: float, *, batch_size: int = 512) -> None:
        super().__init__(model, batch_size=batch_size)
        self.w4 = _check_nonneg(w4, "w4")

    @property
    def label(self) -> str:
        return f"FGSM w4={self.w4:g}"

    def _torchattack(self) -> torchattacks.attack.Attack:
        return torchattacks.FGSM(self.model, eps=self.w4)


class PGD(Attack):
    """Projected gradient descent, l_inf ball ``w4``, step ``w5``, ``w6`` steps (default 20).

    ``random_start=True`` (the cleverhans default the paper used) starts from a uniform point of
    the ``w4`` ball, so PGD is random: pass a generator to reproduce it.
    """

    def __init__(
        self,
        model: nn.Module,
        w4: float,
        w5: float,
        w6: int = 20,
        *,
        random_start: bool = True,
        batch_size: int = 512,
    ) -> None:
        super().__init__(model, batch_size=batch_size)
        self.w4 = _check_nonneg(w4, "w4")
        self.w5 = _check_nonneg(w5, "w5")
        if isinstance(w6, bool) or not isinstance(w6, int) or w6 < 1:
            raise ValueError(f"w6 (number of PGD steps) must be an integer >= 1, got {w6!r}")
        self.w6 = w6
        self.random_start = bool(random_start)
        self.deterministic = not (self.random_start and self.w4 > 0)

    @property
    def label(self) -> str:
        return f"PGD w4={self.w4:g} w5={self.w5:g} w6={self.w6}"

    def _torchattack(self) -> torchattacks.attack.Attack:
        return torchattacks.PGD(
            self.model, eps=self.w4, alpha=self.w5, steps=self.w6, random_start=self.random_start
        )


@dataclass(frozen=True)
class AttackSpec:
    """An attack's parameters without a model: ``spec.build(model) -> Attack``.

    Attributes:
        kind: ``"fgsm"`` or ``"pgd"``.
        w4: l_inf budget; w5: PGD step; w6: PGD steps; random_start: PGD's uniform start.
    """

    kind: Literal["fgsm", "pgd"]
    w4: float
    w5: float = 0.0
    w6: int = 20
    random_start: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ("fgsm", "pgd"):
            raise ValueError(f"attack kind must be 'fgsm' or 'pgd', got {self.kind!r}")
        # Validate eagerly (the same checks as the attack classes), against a throwaway module.
        self.build(nn.Linear(1, 2))

    @property
    def deterministic(self) -> bool:
        return self.kind == "fgsm" or not (self.random_start and self.w4 > 0)

    @property
    def label(self) -> str:
        if self.kind == "fgsm":
            return f"FGSM w4={self.w4:g}"
        return f"PGD w5={self.w5:g}"

    def build(self, model: nn.Module, *, batch_size: int = 512) -> Attack:
        if self.kind == "fgsm":
            return FGSM(model, self.w4, batch_size=batch_size)
        return PGD(
            model, self.w4, self.w5, self.w6, random_start=self.random_start, batch_size=batch_size
        )
