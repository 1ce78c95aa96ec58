"""Matplotlib figures (Agg backend, PNG): Figure 4/6/7 curves and Figure 2/3 heatmaps."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from .results import Curve

__all__ = ["plot_curves", "plot_heatmaps"]

_TITLES = {"gaussian": "Gaussian noise", "missing": "Missing entries", "fgsm": "FGSM"}


def _sweep_title(name: str) -> str:
    if name.startswith("pgd:"):
        return f"PGD (w4={name.split(':')[1]}, 20 steps)"
    if name.startswith("bias:"):
        return f"Bias noise (w3={name.split(':')[1]})"
    return _TITLES.get(name, name)


def plot_curves(curves: Sequence[Curve], path: Path, title: str) -> Path:
    """Rows: gamma values; columns: perturbation families; Stat-w/o (blue) vs Stat-w/ (orange),
    mean line and shaded +- std over repeats (Figure 4 layout)."""
    sweeps = list(dict.fromkeys(c.perturbation for c in curves))
    gammas = sorted({c.gamma for c in curves if c.method == "jacobian" and c.gamma is not None})
    fig, axes = plt.subplots(
        len(gammas), len(sweeps), figsize=(3.2 * len(sweeps), 2.6 * len(gammas)), squeeze=False
    )
    for col, sweep in enumerate(sweeps):
        base = next(c for c in curves if c.perturbation == sweep and c.method == "statistical")
        for row, gamma in enumerate(gammas):
            ax = axes[row][col]
            ours = next(
                c
                for c in curves
                if c.perturbation == sweep and c.method == "jacobian" and c.gamma == gamma
            )
            for curve, color, label in (
                (base, "tab:blue", "Stat-w/o"),
                (ours, "tab:orange", f"Stat-w/ (γ={gamma:g})"),
            ):
                mean = np.array([100 * np.mean(a) for a in curve.acc])
                std = np.array([100 * np.std(a) for a in curve.acc])
                ax.plot(curve.sizes, mean, color=color, marker="o", ms=3, label=label)
                ax.fill_between(curve.sizes, mean - std, mean + std, color=color, alpha=0.25)
            ax.set_xlabel(base.parameter)
            ax.grid(alpha=0.3)
            if col == 0:
                ax.set_ylabel("accuracy (%)")
            if row == 0:
                ax.set_title(_sweep_title(sweep), fontsize=10)
            ax.legend(fontsize=7, loc="lower left")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_heatmaps(
    panels: dict[str, dict[str, Any]], path: Path, title: str, rows: Sequence[str]
) -> Path:
    """Heatmap grid: one row per prefix in ``rows`` (e.g. ``"unimodal"``), panels in insertion
    order; test points coloured by label (red: 0, blue: 1); accuracies in the corners."""
    layout = [[k for k in panels if k.split("/")[0] == r] for r in rows]
    ncols = max(len(r) for r in layout)
    fig, axes = plt.subplots(
        len(rows),
        ncols,
        figsize=(3.1 * ncols + 1.0, 3.1 * len(rows) + 0.4),
        squeeze=False,
        layout="constrained",
    )
    vmax = max(float(np.max(p["heat"])) for p in panels.values()) or 1.0
    for r, keys in enumerate(layout):
        for c, key in enumerate(keys):
            p, ax = panels[key], axes[r][c]
            mesh = ax.pcolormesh(
                p["grid_x"],
                p["grid_y"],
                p["heat"],
                cmap="Greens",
                vmin=0.0,
                vmax=vmax,
                shading="auto",
            )
            pts, lab = p["points"], p["labels"]
            ax.scatter(pts[lab == 0, 0], pts[lab == 0, 1], s=4, c="tab:red")
            ax.scatter(pts[lab == 1, 0], pts[lab == 1, 1], s=4, c="tab:blue")
            ax.set_xlim(-0.05, 1.05)
            ax.set_ylim(-0.05, 1.05)
            ax.text(
                0.02,
                0.97,
                f"clean {100 * p['clean_acc']:.2f}%",
                transform=ax.transAxes,
                va="top",
                fontsize=8,
            )
            if p["noisy_acc"] is not None:
                ax.text(
                    0.98,
                    0.03,
                    f"noisy {100 * p['noisy_acc']:.2f}%",
                    transform=ax.transAxes,
                    ha="right",
                    fontsize=8,
                )
            name = key.split("/", 1)[1]
            extra = f" ({p['noise']})" if p.get("noise") and p["gamma"] is not None else ""
            ax.set_title(
                ("clean" if name == "clean" else f"γ = {p['gamma']:g}") + extra, fontsize=9
            )
        for c in range(len(keys), ncols):
            axes[r][c].axis("off")
    fig.colorbar(mesh, ax=axes, shrink=0.8, label="||J W||_F  (||J W_a W||_F for γ < 1)")
    fig.suptitle(title, fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
