"""Train nets into the model cache in a separate process (used by the parallel prefetch).

Run as ``python -m jacfusion_fed.evaluation._train_worker JOB_DIR [JOB_DIR ...]``; each
``JOB_DIR`` holds ``job.json`` (recipe, num_classes, cache_dir, retrain) and ``data.npz``
(x, y); the jobs run one after the other. A plain subprocess (not multiprocessing) never
re-imports the caller's main module, so library users need no ``if __name__ == "__main__"``
guard.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from .zoo import ModelRecipe, load_or_train


def main(job_dir: str) -> None:
    folder = Path(job_dir)
    job = json.loads((folder / "job.json").read_text())
    with np.load(folder / "data.npz") as data:
        x, y = data["x"], data["y"]
    torch.set_num_threads(1)
    cache_dir = Path(job["cache_dir"]) if job["cache_dir"] else None
    load_or_train(
        ModelRecipe(**job["recipe"]),
        x,
        y,
        int(job["num_classes"]),
        cache_dir=cache_dir,
        retrain=bool(job["retrain"]),
    )


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        main(arg)
