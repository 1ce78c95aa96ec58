"""Issue 19: the AV-Digits tables of ONE training seed, in its own process.

Usage::

    python benchmarks/evaluate_seed_tables.py SEED OUT.json   # one process per seed, in parallel
    python benchmarks/merge_seed_tables.py docs/results seed0.json seed1.json seed2.json

The same TableRun per seed as ``run_evaluation`` (data of seed 0, nets from the model cache or
trained, torch pinned to one thread); ``merge_seed_tables.py`` merges the seeds with
``merge_seeds`` and writes the reports. This is how the committed ``docs/results/avdigits.*``
were computed (the three seeds in parallel on a shared 2-core machine); running
``evaluate_paper_results.py`` computes the same tables in one process.
"""

import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from jacfusion_fed.evaluation.config import METHOD_ABBREV, PRESETS, EvaluationConfig
from jacfusion_fed.evaluation.nets import NetZoo
from jacfusion_fed.evaluation.pipeline import TableRun
from jacfusion_fed.evaluation.results import EvaluationResult
from jacfusion_fed.evaluation.runner import _jobs, _load_data

t = int(sys.argv[1])
out = Path(sys.argv[2])
torch.set_num_threads(1)
config = EvaluationConfig(dataset="avdigits", seeds=3)
preset = PRESETS["avdigits"]
repeats = preset.repeats
start = time.perf_counter()
cpu0 = time.process_time()
data = _load_data(config)
zoo = NetZoo(preset, replace(config, seed=t), data)
zoo.prefetch(_jobs(preset, config))
tables, curves, timings = [], [], {}
for perturbed in tuple(preset.tables):
    tp = preset.tables[perturbed]
    names = [f"0: {preset.abbrev[tp.clean]}-regT"] + [
        f"{i}: {preset.abbrev[perturbed]}-{METHOD_ABBREV[m]}"
        for i, m in enumerate(config.methods, start=1)
    ]
    run = TableRun(
        tp,
        data,
        zoo.get(tp.clean, "regular"),
        [zoo.get(perturbed, m) for m in config.methods],
        names,
        seed=t,
        repeats=repeats,
        attack_repeats=config.attack_repeats,
        gamma=config.gamma,
        candidates=config.gamma_candidates,
        dataset=config.dataset,
    )
    t0 = time.perf_counter()
    tables.append(run.table(adaptive=config.adaptive))
    timings[f"table_{perturbed}_s"] = time.perf_counter() - t0
    if t == 0:
        t0 = time.perf_counter()
        pair = config.methods.index("regular")
        curves += run.curves(tp.sweeps, pair)
        timings[f"curves_{perturbed}_s"] = time.perf_counter() - t0
timings["total_s"] = time.perf_counter() - start
timings["cpu_main_s"] = time.process_time() - cpu0
res = EvaluationResult(config={}, tables=tables, curves=curves, timings=timings, models=zoo.info)
out.write_text(json.dumps({**res.to_json_dict(), "load": os.getloadavg()}))
print("done", t, timings)
