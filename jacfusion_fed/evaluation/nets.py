"""The nets of one evaluation: recipes from the presets, parallel training into the model cache
(plain worker subprocesses, see ``_train_worker``), and loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from jacfusion_fed.data import MultimodalDataset
from jacfusion_fed.models import UnimodalNet
from jacfusion_fed.training import evaluate_accuracy

from .config import METHOD_ABBREV, DatasetPreset, EvaluationConfig
from .zoo import ModelRecipe, is_cached, load_or_train, recipe_key

__all__ = ["NetZoo", "recipe_for"]

_COST = {"adversarial": 8.0, "free": 4.0, "stability": 2.0}
"""Relative training cost per epoch (PGD-7 inner loop, m = 4 replays, two forward passes)."""


def recipe_for(
    preset: DatasetPreset, config: EvaluationConfig, modality: str, method: str
) -> ModelRecipe:
    epochs = config.epochs or (preset.quick_epochs if config.quick else preset.epochs)[modality]
    return ModelRecipe(
        dataset=preset.name,
        modality=modality,
        method=method,
        arch=preset.archs[modality],
        epochs=epochs,
        lr=preset.lr,
        batch_size=preset.batch_size,
        seed=config.seed,
        quick=config.quick,
        method_params=dict(preset.method_params.get(method, {})),
    )


def _train_in_subprocesses(
    todo: list[tuple[ModelRecipe, np.ndarray]],
    y: np.ndarray,
    num_classes: int,
    cache_dir: Path | None,
    retrain: bool,
    workers: int,
) -> None:
    """Train ``todo`` in at most ``workers`` processes (see ``_train_worker``), each taking a
    share of the jobs balanced by estimated cost (longest first to the least loaded worker)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    shares: list[list[int]] = [[] for _ in range(min(workers, len(todo)))]
    loads = [0.0] * len(shares)
    for idx in sorted(range(len(todo)), key=lambda k: -_cost(*todo[k])):
        w = loads.index(min(loads))
        shares[w].append(idx)
        loads[w] += _cost(*todo[idx])
    with tempfile.TemporaryDirectory(prefix="jf-train-") as tmp:
        procs = []
        for w, share in enumerate(shares):
            dirs = []
            for idx in share:
                recipe, x = todo[idx]
                job = Path(tmp) / str(idx)
                job.mkdir()
                np.savez(job / "data.npz", x=x, y=y)
                spec = {
                    "recipe": asdict(recipe),
                    "num_classes": num_classes,
                    "cache_dir": str(cache_dir) if cache_dir else None,
                    "retrain": retrain,
                }
                (job / "job.json").write_text(json.dumps(spec))
                dirs.append(str(job))
            cmd = [sys.executable, "-m", "jacfusion_fed.evaluation._train_worker", *dirs]
            with open(Path(tmp) / f"stderr-{w}.txt", "wb") as err:
                procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err))
        errors = []
        for w, proc in enumerate(procs):
            if proc.wait() != 0:
                text = (Path(tmp) / f"stderr-{w}.txt").read_text(errors="replace").strip()
                errors.append(text[-2000:])
        if errors:
            raise RuntimeError("training worker failed:\n" + "\n".join(errors))


def _cost(recipe: ModelRecipe, x: np.ndarray) -> float:
    """Relative training cost: epochs x input size x per-method factor."""
    return _COST.get(recipe.method, 1.0) * recipe.epochs * float(x.size)


class NetZoo:
    """Nets of one run, each trained (or loaded) once and shared by all tables.

    ``info`` maps a net's name (e.g. ``"Aud-advT"``) to its cache info and test accuracy.
    """

    def __init__(
        self, preset: DatasetPreset, config: EvaluationConfig, data: dict[str, MultimodalDataset]
    ) -> None:
        self.preset, self.config, self.data = preset, config, data
        self.nets: dict[tuple[str, str], UnimodalNet] = {}
        self.info: dict[str, dict[str, Any]] = {}
        self._fresh: set[str] = set()  # cache keys trained by this run (prefetch or get)

    def _x(self, modality: str) -> np.ndarray:
        train: MultimodalDataset = self.data["train"]
        if modality in self.preset.derived:  # e.g. TwoMoon's "xy": both coordinates
            parts = self.preset.derived[modality]
            return np.concatenate([train.modalities[m] for m in parts], axis=1)
        return train.modalities[modality]

    def prefetch(self, jobs: list[tuple[str, str]]) -> None:
        """Train the missing nets of ``jobs`` in ``config.workers`` processes (most expensive
        first); nets already cached are left alone."""
        if self.config.workers < 2 or len(jobs) < 2:
            return
        train = self.data["train"]
        todo = []
        for modality, method in jobs:
            recipe = recipe_for(self.preset, self.config, modality, method)
            x = self._x(modality)
            if self.config.retrain or not is_cached(
                recipe, x, train.labels, train.num_classes, self.config.cache_dir
            ):
                todo.append((recipe, x))
        if len(todo) < 2:
            return
        _train_in_subprocesses(
            todo,
            train.labels,
            train.num_classes,
            self.config.cache_dir,
            self.config.retrain,
            self.config.workers,
        )
        self._fresh |= {recipe_key(r, x, train.labels, train.num_classes) for r, x in todo}

    def get(self, modality: str, method: str) -> UnimodalNet:
        if (modality, method) not in self.nets:
            train, test = self.data["train"], self.data["test"]
            x_train = self._x(modality)
            recipe = recipe_for(self.preset, self.config, modality, method)
            key = recipe_key(recipe, x_train, train.labels, train.num_classes)
            net, info = load_or_train(
                recipe,
                x_train,
                train.labels,
                train.num_classes,
                cache_dir=self.config.cache_dir,
                retrain=self.config.retrain and key not in self._fresh,
            )
            if key in self._fresh:
                info["cached"] = False  # trained by this run's worker pool
            name = f"{self.preset.abbrev[modality]}-{METHOD_ABBREV[method]}"
            if modality in test.modalities:
                info["test_accuracy"] = evaluate_accuracy(
                    net, test.modalities[modality], test.labels
                )
            self.info[name] = info
            self.nets[(modality, method)] = net
        return self.nets[(modality, method)]
