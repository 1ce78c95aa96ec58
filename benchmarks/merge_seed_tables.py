"""Issue 19: merge the per-seed results of ``benchmarks/evaluate_seed_tables.py`` into the
AV-Digits reports (``merge_seeds``, the table notes of ``run_evaluation``, ``write_reports``).

Usage: ``python benchmarks/merge_seed_tables.py OUT_DIR seed0.json seed1.json seed2.json``
"""

import json
import platform
import sys
from pathlib import Path

import torch

from jacfusion_fed.evaluation import EvaluationResult, write_reports
from jacfusion_fed.evaluation.config import PRESETS, EvaluationConfig
from jacfusion_fed.evaluation.provenance import provenance
from jacfusion_fed.evaluation.runner import _config_dict, _load_data, _table_notes, merge_seeds

parts = [EvaluationResult.from_json_dict(json.loads(Path(p).read_text())) for p in sys.argv[2:5]]
raw = [json.loads(Path(p).read_text()) for p in sys.argv[2:5]]
config = EvaluationConfig(dataset="avdigits", seeds=3)
repeats = PRESETS["avdigits"].repeats
tables = []
for i in range(len(parts[0].tables)):
    tb = merge_seeds([p.tables[i] for p in parts])
    tb.notes = [
        *_table_notes(config, repeats, [0, 1, 2]),
        "The three training seeds were computed in three processes in parallel (one per seed, "
        "the same TableRun and merge_seeds as run_evaluation).",
    ]
    tables.append(tb)
timings = {}
for t, p in enumerate(parts):
    for k, v in p.timings.items():
        timings[f"seed{t}_{k}"] = v
timings["total_s"] = max(p.timings["total_s"] for p in parts)
timings["cpu_main_s"] = sum(p.timings["cpu_main_s"] for p in parts)
timings["cpu_workers_s"] = 0.0
models = {
    **parts[0].models,
    **{f"seed {t}: {k}": v for t in (1, 2) for k, v in parts[t].models.items()},
}
data = _load_data(config)
res = EvaluationResult(
    config=_config_dict(config, repeats),
    tables=tables,
    curves=parts[0].curves,
    timings=timings,
    models=models,
    environment={
        "torch": torch.__version__,
        "threads": 1,
        "python": platform.python_version(),
        "machine": platform.machine(),
        **provenance(data),
        "load_at_end": [r["load"] for r in raw],
    },
)
write_reports(res, Path(sys.argv[1]))
print("merged", timings)
