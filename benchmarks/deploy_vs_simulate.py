"""Does a deployment (SuperLink, SuperNodes, ``flwr run``) give the table ``simulate`` gives?

Runs ``jacfusion-fed simulate --quick`` (Flower's Simulation Engine, Ray) and ``jacfusion-fed
deploy local --quick`` (a real SuperLink and one SuperNode per owner on loopback, TLS and node
authentication, ``flwr run``: the multi-host walkthrough's processes on one machine) with the
same run config, and compares what each coordinator wrote: every owner's model version (a
content hash of the trained weights) and every cell of the table.

Run:  python benchmarks/deploy_vs_simulate.py --out docs/results/deploy-vs-simulate.json
      (about 4 minutes on 2 shared CPU cores)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

CLI = (sys.executable, "-c", "from jacfusion_fed.cli import main; main()")
COMMAND = "python benchmarks/deploy_vs_simulate.py --out docs/results/deploy-vs-simulate.json"
RUNS = {
    "simulate": ["simulate", "--quick"],
    "deploy_local": ["deploy", "local", "--quick"],
}


def _table(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Row name -> column key -> accuracy (%, one draw), as the table prints it."""
    table = results["evaluation"]["table"]
    return {
        row["name"]: {key: round(100 * vals[0], 1) for key, vals in row["acc"].items()}
        for row in table["rows"]
    }


def run(root: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": {}}
    for name, args in RUNS.items():
        folder = root / name
        t0 = time.perf_counter()
        done = subprocess.run(
            [*CLI, *args, "--out", str(folder)], capture_output=True, text=True, timeout=3600
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {done.stderr[-3000:]}")
        results = json.loads((folder / "coordinator" / "results.json").read_text())
        out["runs"][name] = {
            "command": "jacfusion-fed " + " ".join(args),
            "wall_s": round(time.perf_counter() - t0, 1),
            "model_versions": {m: h["version"] for m, h in results["heads"].items()},
            "table": _table(results),
            "gamma": {
                row["name"]: row["gamma"]
                for row in results["evaluation"]["table"]["rows"]
                if row.get("gamma")
            },
        }
    sim, dep = out["runs"]["simulate"], out["runs"]["deploy_local"]
    out["same_model_versions"] = sim["model_versions"] == dep["model_versions"]
    out["same_table"] = sim["table"] == dep["table"]
    out["differing_cells"] = [
        {"row": row, "column": col, "simulate": value, "deploy_local": dep["table"][row][col]}
        for row, cells in sim["table"].items()
        for col, value in cells.items()
        if dep["table"].get(row, {}).get(col) != value
    ]
    out["environment"] = {
        "python": platform.python_version(),
        "torch": version("torch"),
        "flwr": version("flwr"),
        "cpu_count": os.cpu_count(),
        "load_avg_after": list(os.getloadavg()),
    }
    out["command"] = COMMAND
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("deploy-vs-simulate.json"))
    parser.add_argument("--workdir", type=Path, help="keep both run folders here")
    args = parser.parse_args()
    if args.workdir is not None:
        results = run(args.workdir)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            results = run(Path(tmp))
    args.out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(
        f"same model versions: {results['same_model_versions']}, same table: "
        f"{results['same_table']} ({len(results['differing_cells'])} cells differ)"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
