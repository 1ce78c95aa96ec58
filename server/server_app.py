"""The coordinator as a Flower ``ServerApp`` (Message API): a thin main around
:func:`jacfusion_fed.server.federated.run_coordinator` (discover owners, train / FedAvg,
register heads, gather logits, fuse, evaluate, write results).

Run it the Flower way (``flwr run .``, ``[tool.flwr.app.components]`` of ``pyproject.toml``)
or through ``jacfusion-fed simulate``. It reads only the run config (as one typed
:class:`~jacfusion_fed.federation.run_config.RunConfig`, checked once at the start): never a
node config and never the pseudonym key. At the end it logs the robustness table it wrote and
where the reports lie (``flwr run --stream`` / ``flwr log`` show it), so a deployment's
operator sees the same table ``simulate`` prints.
"""

from __future__ import annotations

from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from jacfusion_fed.server.federated import run_coordinator

app = ServerApp()


def outcome_lines(results: dict[str, Any]) -> list[str]:
    """What the run wrote, for the log: the table (Markdown, as in the report) and paths."""
    reports = [Path(p) for p in results.get("reports", [])]
    lines: list[str] = []
    summary_name = f"{results.get('dataset', '')}.md"  # <ds>.md; tables are <ds>-<mod>.md
    tables = [p for p in reports if p.suffix == ".md" and p.name != summary_name]
    for path in tables:
        try:
            lines += ["", *path.read_text(encoding="utf-8").rstrip().splitlines(), ""]
        except OSError as exc:  # the report is what counts; say why it is not shown
            lines.append(f"(cannot read {path}: {exc})")
    if not results.get("evaluation"):
        lines.append("No evaluation (no labels-file in the run config): heads registered only.")
    summary = [p for p in reports if p.name == summary_name]
    if summary:
        lines.append(f"Report: {summary[0]} (tables, timings, nets); all: {summary[0].parent}")
    if results.get("registry_dir"):
        lines.append(f"Head registry: {results['registry_dir']}")
    return lines


@app.main()
def main(grid: Grid, context: Context) -> None:
    results = run_coordinator(grid, context)
    for line in outcome_lines(results):
        log(INFO, "%s", line)
