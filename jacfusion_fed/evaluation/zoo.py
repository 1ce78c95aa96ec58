"""Trained unimodal nets for an evaluation, cached on disk so reruns skip training.

A cache entry is keyed by a SHA-256 over everything that determines the trained weights: dataset,
modality, training method and its parameters, seed, epochs, architecture, a hash of the training
arrays, and a hash of the source of :mod:`jacfusion_fed.models` and :mod:`jacfusion_fed.training`
(so a code change retrains instead of loading stale weights). Entries are written with
:func:`jacfusion_fed.data.cache.write_arrays` (atomic, hash-verified); a corrupt entry is
reported, deleted and retrained, never loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

import jacfusion_fed.models as models_pkg
import jacfusion_fed.training as training_pkg
from jacfusion_fed.data.cache import (
    CacheCorruptError,
    content_key,
    default_cache_dir,
    read_arrays,
    write_arrays,
)
from jacfusion_fed.models import UnimodalNet, build_from_spec, build_model, model_spec
from jacfusion_fed.training import train_model

__all__ = [
    "ZOO_VERSION",
    "ModelRecipe",
    "is_cached",
    "load_or_train",
    "model_cache_dir",
    "recipe_key",
]

ZOO_VERSION = 1
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelRecipe:
    """How to train one unimodal net (everything here enters the cache key).

    Attributes:
        dataset, modality, method: what is trained and with which robust add-on.
        arch: architecture name for :func:`jacfusion_fed.models.build_model`.
        epochs, lr, batch_size, seed: optimizer settings (seed also initializes the weights).
        method_params: parameters of the training method (see ``jacfusion_fed.training``).
        quick: whether the quick variant of the dataset is used.
    """

    dataset: str
    modality: str
    method: str
    arch: str
    epochs: int
    lr: float = 1e-3
    batch_size: int = 64
    seed: int = 0
    quick: bool = False
    method_params: dict[str, Any] = field(default_factory=dict)

    def __hash__(self) -> int:
        return hash(json.dumps(asdict(self), sort_keys=True, default=str))


def model_cache_dir(cache_dir: Path | None = None) -> Path:
    """``cache_dir`` or ``<default data cache>/models``."""
    return Path(cache_dir) if cache_dir is not None else default_cache_dir() / "models"


@cache
def _code_hash() -> str:
    digest = hashlib.sha256()
    for pkg in (models_pkg, training_pkg):
        root = Path(str(pkg.__file__)).parent
        for path in sorted(root.glob("*.py")):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _data_hash(x: np.ndarray, y: np.ndarray) -> str:
    digest = hashlib.sha256()
    for arr in (x, y):
        a = np.ascontiguousarray(arr)
        digest.update(str((a.dtype.str, a.shape)).encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def _key(recipe: ModelRecipe, x: np.ndarray, y: np.ndarray, num_classes: int) -> str:
    return content_key(
        {
            "zoo_version": ZOO_VERSION,
            "num_classes": num_classes,
            "recipe": asdict(recipe),
            "data": _data_hash(x, y),
            "code": _code_hash(),
            "torch": torch.__version__.split("+")[0],
        }
    )


def recipe_key(recipe: ModelRecipe, x: np.ndarray, y: np.ndarray, num_classes: int) -> str:
    """The cache key (SHA-256 hex) of ``recipe`` trained on ``(x, y)``."""
    return _key(recipe, x, y, num_classes)


def _path(recipe: ModelRecipe, key: str, cache_dir: Path | None) -> Path:
    name = f"{recipe.dataset}-{recipe.modality}-{recipe.method}-{key[:24]}.jfmodel"
    return model_cache_dir(cache_dir) / name


def is_cached(
    recipe: ModelRecipe,
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    cache_dir: Path | None = None,
) -> bool:
    """Whether a cache entry exists for ``recipe`` on ``(x, y)`` (not verified here)."""
    return _path(recipe, _key(recipe, x, y, num_classes), cache_dir).exists()


def _save(path: Path, net: UnimodalNet, info: dict[str, Any]) -> None:
    arrays = {f"param/{k}": v.detach().cpu().numpy() for k, v in net.state_dict().items()}
    arrays["meta"] = np.array(json.dumps({"spec": model_spec(net), "info": info}))
    write_arrays(path, arrays)


def _load(path: Path) -> tuple[UnimodalNet, dict[str, Any]]:
    arrays = read_arrays(path)
    meta = json.loads(str(arrays.pop("meta")))
    net = build_from_spec(meta["spec"])
    state = {k.removeprefix("param/"): torch.from_numpy(v) for k, v in arrays.items()}
    net.load_state_dict(state)
    net.eval()
    return net, meta["info"]


def load_or_train(
    recipe: ModelRecipe,
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    *,
    cache_dir: Path | None = None,
    retrain: bool = False,
) -> tuple[UnimodalNet, dict[str, Any]]:
    """The net of ``recipe`` trained on ``(x, y)`` (K = ``num_classes``): from the cache, or
    trained and cached.

    Returns:
        ``(net in eval mode, info)``; info holds ``key``, ``cached`` (bool), ``train_seconds``,
        ``train_accuracy`` and the recipe.
    """
    key = _key(recipe, x, y, num_classes)
    path = _path(recipe, key, cache_dir)
    if path.exists() and not retrain:
        try:
            net, info = _load(path)
            return net, {**info, "cached": True}
        except (CacheCorruptError, KeyError, RuntimeError, ValueError) as exc:
            _log.warning("model cache entry %s unusable (%s); retraining", path, exc)
            path.unlink(missing_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        net = build_model(recipe.arch, x.shape[1:], num_classes)
    start = time.perf_counter()
    report = train_model(
        net,
        x,
        y,
        method=recipe.method,
        epochs=recipe.epochs,
        batch_size=recipe.batch_size,
        lr=recipe.lr,
        seed=recipe.seed,
        progress=False,
        **recipe.method_params,
    )
    info = {
        "key": key,
        "recipe": asdict(recipe),
        "train_seconds": time.perf_counter() - start,
        "train_accuracy": report.train_accuracy,
    }
    net.eval()
    _save(path, net, info)
    return net, {**info, "cached": False}
