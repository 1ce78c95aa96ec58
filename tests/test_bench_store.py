"""``jacfusion-fed bench store``: a small run through the CLI writes every figure and a verdict
per target, and the README's table quotes the committed docs/results/bench-store.json."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from jacfusion_fed.bench.store import TARGETS, summary_rows
from jacfusion_fed.cli import app

ROOT = Path(__file__).resolve().parents[1]


def test_bench_store_writes_its_figures(tmp_path: Path) -> None:
    out = tmp_path / "store.json"
    args = ["bench", "store", "--records", "2048", "--sizes", "3000", "--no-services"]
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["direct"]["records"] == 2048 and data["direct"]["records_per_s"] > 0
    assert data["old_file_layout"]["records"] == 2000
    assert 1.0 < data["disk"]["3000"]["disk_ratio"] < 3.0
    assert set(data["targets"]) == set(TARGETS)
    assert data["targets"]["grpc_records_per_s"]["met"] is None  # not measured here
    assert len(data["load_average_before"]) == 3


def _readme_rows() -> list[tuple[str, str, str]]:
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index("| record store | measured | target |")
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        a, b, c = (cell.strip() for cell in line.strip().strip("|").split("|"))
        rows.append((a, b, c))
    return rows


def test_readme_quotes_the_committed_figures() -> None:
    data = json.loads((ROOT / "docs" / "results" / "bench-store.json").read_text())
    assert _readme_rows() == summary_rows(data)
    assert "1000000" in data["disk"] and "submit_cli" in data["services"]
