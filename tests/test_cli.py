"""The one CLI: every documented command group is there, and evaluate runs end to end."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from jacfusion_fed.cli import app

runner = CliRunner()


def test_all_command_groups_are_registered() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in ("simulate", "owner", "coordinator", "predict", "certs", "evaluate", "bench"):
        assert name in result.output


def test_evaluate_twomoon_quick_writes_reports(tmp_path: Path) -> None:
    out = tmp_path / "ev"
    result = runner.invoke(
        app, ["evaluate", "--dataset", "twomoon", "--quick", "--no-adaptive", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    payload = json.loads((out / "twomoon.json").read_text())
    assert payload["tables"], "no table written"
    assert any(p.suffix == ".png" for p in out.iterdir())
    # issue 19: three training seeds by default, each cell with its per-seed means
    assert payload["config"]["seeds"] == 3
    ours = next(r for r in payload["tables"][0]["rows"] if r["kind"] == "jacobian")
    assert all(len(v) == 3 for v in ours["seed_acc"].values())
    assert all(len(v) == 3 for v in ours["correct_seeds"].values())
    assert any(r["kind"] == "jacobian_centered" for r in payload["tables"][0]["rows"])


def test_evaluate_rejects_unknown_dataset(tmp_path: Path) -> None:
    result = runner.invoke(app, ["evaluate", "--dataset", "mnist", "--out", str(tmp_path)])
    assert result.exit_code != 0
    assert "unknown dataset" in result.output


def test_bench_fusion_small_run_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    result = runner.invoke(
        app,
        [
            "bench",
            "fusion",
            "--ks",
            "10",
            "--samples",
            "200",
            "--budget",
            "0.05",
            "--no-forward",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    methods = rows[0]["methods"]
    assert {"scipy_loop", "exact", "fast"} <= set(methods)
    assert methods["exact"]["max_abs_diff_vs_reference"] < 1e-10
