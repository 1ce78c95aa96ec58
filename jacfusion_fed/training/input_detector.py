"""An owner's input test (issue 20): a noise-contrast detector on the inputs it holds.

A small convolutional net d: R^(C x H x W) -> R (three 3x3 convolutions, 16-32-32 channels, a
2x2 max-pool after the second, global average pooling, one linear output) is fitted on the
owner's clean inputs x (its training split) against the same inputs with random sign noise,

    x~ = clip(x + a s, 0, 1),   s_j uniform in {-1, +1} per entry,   a ~ U[low, high] per sample,

by the logistic loss (label 1 for x~; Adam, lr 1e-3, batch 64, ``epochs`` passes). No attack
and no label is involved: it is a perturbation any owner can draw, of none of the evaluation's
types. The score of an input is s = d(x); the reference is the sorted scores of the owner's
clean held-out inputs (its validation split, disjoint from the fit), and a sample's p-value is
the split-conformal

    u_I = (1 + #{c_i >= s}) / (n + 1),

valid (P(u_I <= a) <= a) for a clean input exchangeable with the reference. Inputs must be
(N, C, H, W) in [0, 1] (images, spectrograms: :func:`applies`); vector inputs get no input
test.

``benchmarks/supervised_detectors.py`` measured this detector (fitted on training and
validation inputs, a ~ U[0.01, 0.04]) on the AV-Digits audio attacks: AUROC about 0.9 where
every label-free score stayed near 0.55.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from jacfusion_fed.fusion.robust import conformal_pvalues, smooth_pvalues

__all__ = [
    "InputDetector",
    "applies",
    "detector_net",
    "fit_input_detector",
    "from_tensors",
    "input_pvalues",
    "input_scores",
    "sign_noise",
    "to_tensors",
]

LOW, HIGH = 0.01, 0.04
"""The noise amplitude range a ~ U[LOW, HIGH] (the AV-Digits audio attacks' budget is 0.03)."""
EPOCHS = 40
BATCH = 64


@dataclass(frozen=True)
class InputDetector:
    """A fitted input test: the net d (eval mode, float32) and the ascending reference
    scores (n,) float64 of the clean held-out inputs."""

    net: nn.Module
    reference_scores: torch.Tensor


def to_tensors(detector: InputDetector) -> dict[str, torch.Tensor]:
    """The detector as named tensors (the net's weights, ``reference_scores``): what
    :func:`from_tensors` reads back (safetensors)."""
    return {
        **{f"net.{k}": v.detach().clone() for k, v in detector.net.state_dict().items()},
        "reference_scores": detector.reference_scores.clone(),
    }


def from_tensors(tensors: dict[str, torch.Tensor]) -> InputDetector:
    """The detector :func:`to_tensors` wrote; ValueError naming what is missing or wrong."""
    if "reference_scores" not in tensors or "net.0.weight" not in tensors:
        raise ValueError("not an input test: reference_scores or net.0.weight is missing")
    net = detector_net(int(tensors["net.0.weight"].shape[1]))
    state = {k.removeprefix("net."): v for k, v in tensors.items() if k.startswith("net.")}
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"not an input test: {str(exc).splitlines()[0]}") from None
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    ref = tensors["reference_scores"].to(torch.float64)
    if ref.ndim != 1 or len(ref) < 2 or not bool((ref[1:] >= ref[:-1]).all()):
        raise ValueError("not an input test: reference_scores must be ascending, (n >= 2,)")
    return InputDetector(net, ref)


def applies(x: torch.Tensor) -> bool:
    """Whether inputs ``x`` take an input test: (N, C, H, W) with H, W >= 2."""
    return x.ndim == 4 and x.shape[2] >= 2 and x.shape[3] >= 2


def sign_noise(x: torch.Tensor, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    """``clip(x + a s, 0, 1)`` (module docstring), s and a drawn from ``gen``."""
    signs = torch.randint(0, 2, x.shape, generator=gen).to(x.dtype) * 2 - 1
    shape = (len(x),) + (1,) * (x.ndim - 1)
    a = low + (high - low) * torch.rand(shape, generator=gen, dtype=x.dtype)
    return (x + a * signs).clamp(0.0, 1.0)


def detector_net(channels: int) -> nn.Module:
    """The input test's CNN d (module docstring), freshly initialized from torch's global
    generator: ``channels`` input channels, one output (the logit of "noised")."""
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 1),
    )


def fit_input_detector(
    x_fit: torch.Tensor,
    x_ref: torch.Tensor,
    *,
    seed: int = 0,
    low: float = LOW,
    high: float = HIGH,
    epochs: int = EPOCHS,
) -> InputDetector:
    """Fit d on ``x_fit`` (N, C, H, W) against its sign-noised copy and score the clean
    held-out ``x_ref`` (n, C, H, W) as the reference (module docstring).

    Deterministic in ``seed`` and torch's thread count; torch's global random state is left
    as it was.
    """
    for name, x in (("x_fit", x_fit), ("x_ref", x_ref)):
        if not applies(x):
            raise ValueError(f"{name} must be (N, C, H, W) inputs, got shape {tuple(x.shape)}")
    if x_fit.shape[1:] != x_ref.shape[1:]:
        raise ValueError(
            f"x_fit and x_ref must have the same sample shape, got {tuple(x_fit.shape[1:])} "
            f"and {tuple(x_ref.shape[1:])}"
        )
    if len(x_ref) < 2:
        raise ValueError(f"x_ref must hold at least 2 inputs, got {len(x_ref)}")
    if not 0 <= low <= high:
        raise ValueError(f"need 0 <= low <= high, got low={low}, high={high}")
    gen = torch.Generator().manual_seed(seed)
    x = x_fit.detach().float()
    xs = torch.cat([x, sign_noise(x, low, high, gen)])
    ys = torch.cat([torch.zeros(len(x)), torch.ones(len(x))])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = detector_net(int(x.shape[1]))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(xs), generator=gen)
        for i in range(0, len(xs), BATCH):
            b = perm[i : i + BATCH]
            loss = nn.functional.binary_cross_entropy_with_logits(net(xs[b])[:, 0], ys[b])
            opt.zero_grad()
            torch.autograd.backward(loss)
            opt.step()
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        ref = net(x_ref.detach().float())[:, 0].to(torch.float64).sort().values
    return InputDetector(net, ref)


def input_scores(detector: InputDetector, x: torch.Tensor) -> torch.Tensor:
    """s = d(x) (N,) float64, differentiable in ``x`` (N, C, H, W)."""
    out: torch.Tensor = detector.net(x.float())[:, 0].to(torch.float64)
    return out


def input_pvalues(
    detector: InputDetector, x: torch.Tensor, *, smooth: bool = False
) -> torch.Tensor:
    """u_I (N,) in (0, 1] of inputs ``x``; ``smooth``: the differentiable interpolation (for
    attacks), else the exact conformal p-values (what is published)."""
    if not applies(x):
        raise ValueError(f"x must be (N, C, H, W) inputs, got shape {tuple(x.shape)}")
    if smooth:
        return smooth_pvalues(input_scores(detector, x), detector.reference_scores)
    with torch.no_grad():
        return conformal_pvalues(input_scores(detector, x), detector.reference_scores)
