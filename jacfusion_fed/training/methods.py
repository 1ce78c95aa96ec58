"""The robust add-ons of the paper's Section 5.1, each as one optimizer step on a minibatch.

Inputs are assumed to lie in [0, 1] (torchattacks' convention); every epsilon is in units of
that range.

* ``regular``: cross-entropy.
* ``adversarial``: PGD adversarial training (Madry et al. 2018): train on
  ``torchattacks.PGD(eps, alpha, steps, random_start)`` examples.  Params ``eps=0.03``,
  ``alpha=0.01``, ``steps=7``, ``random_start=True``.
* ``free``: free-m adversarial training (Shafahi et al. 2019): every minibatch is replayed ``m``
  times; each replay's single backward pass updates the weights and, through the input gradient,
  the perturbation ``delta <- clip(delta + eps * sign(grad), -eps, eps)``, which is carried over
  to the next minibatch.  Params ``eps=0.03``, ``m=4``.  (Each epoch costs ``m`` passes; divide
  the epochs by ``m`` for the paper's equal-cost comparison.)
* ``stability``: stability training (Zheng et al. 2016):
  ``CE(f(x), y) + alpha * KL(p(x) || p(x'))``, ``x' = clip(x + sigma * N(0, 1), 0, 1)``.
  Params ``alpha=1.0``, ``sigma=0.1``.
* ``mixup``: mixup (Zhang et al. 2018): convex combinations of shuffled pairs with
  ``lam ~ Beta(alpha, alpha)``.  Param ``alpha=0.2``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchattacks
from torch import nn

__all__ = ["METHODS", "StepState", "resolve_params", "train_step"]

_DEFAULTS: dict[str, dict[str, Any]] = {
    "regular": {},
    "adversarial": {"eps": 0.03, "alpha": 0.01, "steps": 7, "random_start": True},
    "free": {"eps": 0.03, "m": 4},
    "stability": {"alpha": 1.0, "sigma": 0.1},
    "mixup": {"alpha": 0.2},
}
METHODS = tuple(_DEFAULTS)


def _number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def _positive(v: Any) -> bool:
    return _number(v) and float(v) > 0


def _non_negative(v: Any) -> bool:
    return _number(v) and float(v) >= 0


def _count(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and int(v) >= 1


_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "eps": (_positive, "a positive number"),
    "alpha": (_positive, "a positive number"),
    "steps": (_count, "an integer >= 1"),
    "m": (_count, "an integer >= 1"),
    "sigma": (_non_negative, "a number >= 0"),
    "random_start": (lambda v: isinstance(v, bool), "a bool"),
}


def resolve_params(method: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults of ``method`` overridden by ``params``; ``ValueError`` names any problem."""
    if method not in _DEFAULTS:
        raise ValueError(f"unknown training method {method!r}; valid: {', '.join(METHODS)}")
    defaults = _DEFAULTS[method]
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        valid = ", ".join(defaults) or "none"
        raise ValueError(f"unknown parameter(s) {unknown} for method {method!r}; valid: {valid}")
    out = {**defaults, **params}
    for key, value in out.items():
        check, what = _CHECKS[key]
        if not check(value):
            raise ValueError(f"method {method!r}: parameter {key!r} must be {what}, got {value!r}")
    return out


@dataclass
class StepState:
    """Per-run state the steps carry across minibatches (free-m's delta, mixup's RNG)."""

    rng: np.random.Generator
    delta: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _update(opt: torch.optim.Optimizer, loss: torch.Tensor) -> float:
    """Zero the gradients, backpropagate ``loss``, step; return the loss value."""
    opt.zero_grad(set_to_none=True)
    torch.autograd.backward(loss)
    opt.step()
    return float(loss.detach())


def _regular(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    opt: torch.optim.Optimizer,
    p: dict[str, Any],
    st: StepState,
) -> float:
    loss = F.cross_entropy(model(x), y)
    return _update(opt, loss)


def _adversarial(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    opt: torch.optim.Optimizer,
    p: dict[str, Any],
    st: StepState,
) -> float:
    attack = st.extra.get("pgd")
    if attack is None:
        attack = torchattacks.PGD(
            model, eps=p["eps"], alpha=p["alpha"], steps=p["steps"], random_start=p["random_start"]
        )
        st.extra["pgd"] = attack
    x_adv = attack(x, y)
    return _regular(model, x_adv, y, opt, p, st)


def _free(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    opt: torch.optim.Optimizer,
    p: dict[str, Any],
    st: StepState,
) -> float:
    eps, n = float(p["eps"]), len(x)
    if st.delta is None or st.delta.shape[1:] != x.shape[1:] or len(st.delta) < n:
        st.delta = torch.zeros_like(x)
    total = 0.0
    for _ in range(int(p["m"])):
        delta = st.delta[:n].clone().requires_grad_(True)
        loss = F.cross_entropy(model(torch.clamp(x + delta, 0.0, 1.0)), y)
        _update(opt, loss)  # the same backward pass fills delta.grad
        grad = delta.grad
        if grad is None:  # pragma: no cover - the model ignored its input
            raise RuntimeError("free-m: no input gradient (does the model use its input?)")
        st.delta[:n] = torch.clamp(delta.detach() + eps * grad.sign(), -eps, eps)
        total += float(loss.detach())
    return total / int(p["m"])


def _stability(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    opt: torch.optim.Optimizer,
    p: dict[str, Any],
    st: StepState,
) -> float:
    noisy = torch.clamp(x + p["sigma"] * torch.randn_like(x), 0.0, 1.0)
    logits = model(torch.cat([x, noisy]))
    clean, pert = logits[: len(x)], logits[len(x) :]
    kl = F.kl_div(
        F.log_softmax(pert, dim=1),
        F.log_softmax(clean, dim=1),
        log_target=True,
        reduction="batchmean",
    )
    loss = F.cross_entropy(clean, y) + p["alpha"] * kl
    return _update(opt, loss)


def _mixup(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    opt: torch.optim.Optimizer,
    p: dict[str, Any],
    st: StepState,
) -> float:
    lam = float(st.rng.beta(p["alpha"], p["alpha"]))
    perm = torch.from_numpy(st.rng.permutation(len(x))).to(x.device)
    logits = model(lam * x + (1.0 - lam) * x[perm])
    loss = lam * F.cross_entropy(logits, y) + (1.0 - lam) * F.cross_entropy(logits, y[perm])
    return _update(opt, loss)


_STEPS = {
    "regular": _regular,
    "adversarial": _adversarial,
    "free": _free,
    "stability": _stability,
    "mixup": _mixup,
}


def train_step(
    method: str,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    opt: torch.optim.Optimizer,
    params: dict[str, Any],
    state: StepState,
) -> float:
    """One minibatch update of ``method`` (params already resolved); returns the mean loss."""
    return _STEPS[method](model, x, y, opt, params, state)
