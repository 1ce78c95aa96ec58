"""The README's `bench sweep` tables and load sentence, from the sweep's JSON, to paste after a
rerun (``tests/test_docs_results_consistency.py`` checks the README against the JSON).

python benchmarks/sweep_readme_tables.py docs/results/bench-serve-sweep.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def tables(data: dict) -> str:  # type: ignore[type-arg]
    rows = [r for r in data["rows"] if "error" not in r]
    fewest = min(r["owners"] for r in rows)
    out = [
        "| K | owners | Predict p50 (ms) | echo p50 (ms) | p50 / two echo | samples/s "
        "| load (1 min) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lat, thr = r["latency"], r["throughput"]
        out.append(
            f"| {r['classes']} | {r['owners']} | {lat['predict']['p50_us'] / 1e3:.2f} "
            f"| {lat['echo']['p50_us'] / 1e3:.2f} | {lat['p50_ratio_vs_two_echo']:.2f}x "
            f"| {thr['samples_per_s']:,.0f} | {r['load_avg_before'][0]:.2f} |"
        )
    out += ["", "| target (issue 24) | measured | |", "|---|---:|---|"]
    for t in data["targets"]:
        k, n = t["classes"], t["owners"]
        if t["what"] == "p50_ratio_vs_two_echo":
            label = f"K = {k}, {n} owners: p50 ≤ {t['target']:g}x two echo round trips"
            measured = f"{t['measured']:.2f}x"
        elif t["what"] == "samples_per_s":
            label = f"K = {k}, {n} owners: ≥ {t['target']:,.0f} samples/s"
            measured = f"{t['measured']:,.0f}"
        else:
            label = f"K = {k}: {n} owners ≥ {t['target']:g}x the samples/s of {fewest}"
            measured = f"{t['measured']:.2f}x"
        out.append(f"| {label} | {measured} | {'met' if t['met'] else 'missed'} |")
    env = data["environment"]
    out += [
        "",
        f"(load average {env['load_avg_before'][0]:.2f} before and "
        f"{env['load_avg_after'][0]:.2f} after)",
    ]
    return "\n".join(out)


if __name__ == "__main__":
    print(tables(json.loads(Path(sys.argv[1]).read_text())))
