"""TwoMoon heatmaps of Figures 2-3: ``||J W||_F`` (and ``||J' W_x W||_F``) over the 2D plane.

Unimodal (Figure 2): one net on both coordinates; ``p = softmax(z)`` at every grid point, then
for gamma < 1 the sample-wise ``W_x`` of (S3) (one modality, Algorithm 1 with t_max = 1) gives
``p' = softmax(W_x z)`` and the heat ``||J(p') W_x W||_F``; gamma = 1 is plain ``||J(p) W||_F``.

Multimodal (Figure 3): a net on X, a net on Y, statistical fusion; only Y is perturbed and
regularized, so the heat is ``||J(p') W_a W_Y||_F`` with ``p'`` the Jacobian-fused prediction.

``||J W_a W||_F^2 = tr(J W_a G W_a^T J)`` needs only the Gram matrix ``G = W W^T``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from jacfusion_fed.fusion import gram_of, jacobian_fusion, solve_jacobian_weights
from jacfusion_fed.models import UnimodalNet
from jacfusion_fed.robustness import Corruption
from jacfusion_fed.training import predict_logits

__all__ = ["jacobian_norm", "multimodal_heatmaps", "unimodal_heatmaps"]


def _jmat(p: torch.Tensor) -> torch.Tensor:
    return p.unsqueeze(-1) * p.unsqueeze(-2) - torch.diag_embed(p)


def jacobian_norm(
    p: torch.Tensor, gram: torch.Tensor, w: torch.Tensor | None = None
) -> torch.Tensor:
    """``||J(p) W_a W||_F`` per row for ``W W^T = gram`` (``W_a = I`` when ``w`` is None)."""
    p64, g = p.to(torch.float64), gram.to(torch.float64)
    jw = _jmat(p64) if w is None else _jmat(p64) @ w.to(torch.float64)
    sq = torch.einsum("nij,jk,nlk->nil", jw, g, jw).diagonal(dim1=-2, dim2=-1).sum(-1)
    return sq.clamp_min(0.0).sqrt()


def _grid(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    axis = np.linspace(0.0, 1.0, resolution)
    gx, gy = np.meshgrid(axis, axis)
    return gx, gy


#: ``predict(inputs, gamma) -> (p', W_x)``: the (fused) prediction of a panel and its
#: sample-wise weights (None at gamma = 1, where ``p'`` is the plain prediction).
_Predict = Callable[[tuple[torch.Tensor, ...], float], tuple[torch.Tensor, torch.Tensor | None]]


def _panels(
    predict: _Predict,
    gram: torch.Tensor,
    inputs: Mapping[str, tuple[torch.Tensor, ...]],
    points: tuple[np.ndarray, np.ndarray],
    labels: np.ndarray,
    gammas: Sequence[float],
    grid: tuple[np.ndarray, np.ndarray],
) -> dict[str, Any]:
    """The ``"clean"`` panel, then one per gamma with the noisy test points.

    ``inputs`` holds the model inputs at the grid points (``"grid"``) and at the clean and
    noisy test points (``"clean"``, ``"noisy"``); ``points`` the clean and noisy test points
    drawn on the panels; ``gram`` the ``W W^T`` of the regularized head; ``grid`` the
    panels' coordinates (:func:`_grid`).
    """
    gx, gy = grid
    y = torch.from_numpy(labels)

    def accuracy(which: str, gamma: float) -> float:
        return float((predict(inputs[which], gamma)[0].argmax(1) == y).double().mean())

    p0, _ = predict(inputs["grid"], 1.0)
    heat0 = jacobian_norm(p0, gram)
    panels = {"clean": _panel(gx, gy, heat0, points[0], labels, accuracy("clean", 1.0), None, None)}
    for gamma in gammas:
        pg, wg = predict(inputs["grid"], gamma)
        panels[f"gamma={gamma:g}"] = _panel(
            gx,
            gy,
            jacobian_norm(pg, gram, wg),
            points[1],
            labels,
            accuracy("clean", gamma),
            accuracy("noisy", gamma),
            gamma,
        )
    return panels


def _uni_predict(
    net: UnimodalNet, x: torch.Tensor, gamma: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    z = predict_logits(net, x).to(torch.float64)
    p = torch.softmax(z, dim=-1)
    if gamma >= 1.0:
        return p, None
    w = solve_jacobian_weights(p, gram_of(net.head.weight.detach().double()), gamma)
    return torch.softmax((w @ z.unsqueeze(-1)).squeeze(-1), dim=-1), w


def unimodal_heatmaps(
    net: UnimodalNet,
    test_xy: np.ndarray,
    labels: np.ndarray,
    noise: Corruption,
    gammas: Sequence[float] = (1.0, 0.5, 0.1),
    *,
    resolution: int = 120,
    generator: torch.Generator | None = None,
) -> dict[str, Any]:
    """Figure 2 panels: ``"clean"`` then one per gamma with noisy test points."""
    gx, gy = _grid(resolution)
    grid = torch.from_numpy(np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.float32))
    x_clean = torch.from_numpy(test_xy)
    x_noisy = noise(x_clean, generator)
    return _panels(
        lambda xs, gamma: _uni_predict(net, xs[0], gamma),
        gram_of(net.head.weight.detach().double()),
        {"grid": (grid,), "clean": (x_clean,), "noisy": (x_noisy,)},
        (test_xy, x_noisy.numpy()),
        labels,
        gammas,
        (gx, gy),
    )


def _fused(
    nets: tuple[UnimodalNet, UnimodalNet],
    xs: tuple[torch.Tensor, ...],
    log_prior: torch.Tensor,
    gamma: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    zx = predict_logits(nets[0], xs[0]).to(torch.float64)
    zy = predict_logits(nets[1], xs[1]).to(torch.float64)
    gram = gram_of(nets[1].head.weight.detach().double())
    if gamma >= 1.0:
        return torch.softmax(zx + zy - log_prior, dim=-1), None
    p0 = torch.softmax(zx + zy - log_prior, dim=-1)
    w = solve_jacobian_weights(p0, gram, gamma)
    p = jacobian_fusion([zx, zy], [None, gram], log_prior, gamma=gamma, regularize=[1])
    return p, w


def multimodal_heatmaps(
    nets: tuple[UnimodalNet, UnimodalNet],
    test_x: np.ndarray,
    test_y: np.ndarray,
    labels: np.ndarray,
    log_prior: torch.Tensor,
    noise: Corruption,
    gammas: Sequence[float] = (1.0, 0.5, 0.1),
    *,
    resolution: int = 120,
    generator: torch.Generator | None = None,
) -> dict[str, Any]:
    """Figure 3 panels for one noise level; only the Y coordinate (``nets[1]``) is perturbed."""
    gx, gy = _grid(resolution)
    grid_x = torch.from_numpy(gx.reshape(-1, 1).astype(np.float32))
    grid_y = torch.from_numpy(gy.reshape(-1, 1).astype(np.float32))
    tx, ty = torch.from_numpy(test_x), torch.from_numpy(test_y)
    ty_noisy = noise(ty, generator)
    return _panels(
        lambda xs, gamma: _fused(nets, xs, log_prior, gamma),
        gram_of(nets[1].head.weight.detach().double()),
        {"grid": (grid_x, grid_y), "clean": (tx, ty), "noisy": (tx, ty_noisy)},
        (
            np.concatenate([test_x, test_y], axis=1),
            np.concatenate([test_x, ty_noisy.numpy()], axis=1),
        ),
        labels,
        gammas,
        (gx, gy),
    )


def _panel(
    gx: np.ndarray,
    gy: np.ndarray,
    heat: torch.Tensor,
    points: np.ndarray,
    labels: np.ndarray,
    clean_acc: float,
    noisy_acc: float | None,
    gamma: float | None,
) -> dict[str, Any]:
    return {
        "grid_x": gx,
        "grid_y": gy,
        "heat": heat.numpy().reshape(gx.shape),
        "points": np.asarray(points),
        "labels": np.asarray(labels),
        "clean_acc": clean_acc,
        "noisy_acc": noisy_acc,
        "gamma": gamma,
    }
