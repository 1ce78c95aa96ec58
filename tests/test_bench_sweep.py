"""``bench serve --owners N`` and ``bench sweep``: the owners' modalities, the targets' verdicts
from the measured figures, the plot, and both commands end to end at a tiny scale."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from jacfusion_fed.bench.deployment import (
    MODALITIES,
    ServeBenchConfig,
    make_dataset,
    modality_names,
)
from jacfusion_fed.bench.sweep import OWNER_SCALING_TARGET, plot_sweep, sweep_targets
from jacfusion_fed.cli import app


def test_modality_names_keep_the_two_and_add_synthetic_ones() -> None:
    assert modality_names(2) == MODALITIES
    assert modality_names(4) == (*MODALITIES, "synth3", "synth4")
    assert len(set(modality_names(8))) == 8
    with pytest.raises(ValueError, match="at least 1"):
        modality_names(0)


def test_make_dataset_has_one_file_per_owner_and_the_first_two_unchanged(
    tmp_path: Path,
) -> None:
    two = make_dataset(tmp_path / "a", _mkdir(tmp_path / "a", ServeBenchConfig(samples=64)))
    four = make_dataset(
        tmp_path / "b", _mkdir(tmp_path / "b", ServeBenchConfig(samples=64, owners=4))
    )
    assert list(four) == list(modality_names(4))
    for m in MODALITIES:  # bench serve's default data is what it was before --owners
        np.testing.assert_array_equal(np.load(two[m])["x_train"], np.load(four[m])["x_train"])


def _mkdir(path: Path, cfg: ServeBenchConfig) -> ServeBenchConfig:
    path.mkdir()
    return cfg


def _row(k: int, owners: int, ratio: float, rate: float) -> dict[str, Any]:
    return {
        "classes": k,
        "owners": owners,
        "latency": {
            "predict": {"p50_us": 2000.0 * ratio},
            "echo": {"p50_us": 1000.0},
            "p50_ratio_vs_two_echo": ratio,
        },
        "throughput": {"samples_per_s": rate},
        "load_avg_before": [1.0, 1.0, 1.0],
    }


def test_targets_are_judged_from_the_rows() -> None:
    rows = [
        _row(10, 2, 2.1, 260_000),
        _row(10, 8, 2.5, 100_000),
        _row(100, 2, 3.5, 70_000),
        _row(100, 8, 4.0, 40_000),
    ]
    got = {(t["what"], t["classes"]): (t["measured"], t["met"]) for t in sweep_targets(rows)}
    assert got[("p50_ratio_vs_two_echo", 10)] == (2.1, True)
    assert got[("samples_per_s", 10)] == (260_000, True)
    assert got[("p50_ratio_vs_two_echo", 100)] == (3.5, False)
    assert got[("samples_per_s", 100)] == (70_000, True)
    assert got[("samples_per_s_8_over_2_owners", 10)] == (100_000 / 260_000, False)
    scaling = 40_000 / 70_000
    assert got[("samples_per_s_8_over_2_owners", 100)] == (scaling, scaling >= OWNER_SCALING_TARGET)
    assert sweep_targets([]) == []


def test_plot_is_written(tmp_path: Path) -> None:
    results = {
        "config": {"batch": 1024},
        "environment": {"cpu_count": 2, "load_avg_before": [1.0], "load_avg_after": [1.0]},
        "rows": [_row(10, 2, 2.0, 2e5), _row(100, 2, 3.0, 5e4), {"error": "x"}],
    }
    for name in ("sweep.png", "sweep.svg"):
        plot_sweep(results, tmp_path / name)
        assert (tmp_path / name).stat().st_size > 1000


def test_sweep_refuses_a_bad_plot_name(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["bench", "sweep", "--plot", str(tmp_path / "x.pdf"), "--out", str(tmp_path / "s")]
    )
    assert result.exit_code != 0
    assert "--plot must end in .png or .svg" in result.output


@pytest.mark.slow
def test_bench_serve_with_three_owners_keeps_every_field(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = ["bench", "serve", "--samples", "1024", "--batch", "256", "--latency-requests", "30"]
    args += ["--duration", "1", "--no-uncached", "--owners", "3", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "3 owners" in result.output
    payload = json.loads(out.read_text())
    assert payload["config"]["owners"] == 3
    for key in ("python", "grpcio", "torch", "cpu_count", "fusion_device", "load_avg_before"):
        assert key in payload["environment"]
    assert {"load_avg_after", "machine", "os", "torch_threads"} <= set(payload["environment"])
    assert payload["cached"]["latency"]["p50_ratio_vs_two_echo"] > 0
    assert payload["cached"]["throughput"]["samples_per_s"] > 0
    assert "targets" in payload


@pytest.mark.slow
def test_bench_sweep_runs(tmp_path: Path) -> None:
    out = tmp_path / "sweep.json"
    args = ["bench", "sweep", "--ks", "10", "--owners", "2,3", "--samples", "1024"]
    args += ["--batch", "256", "--latency-requests", "30", "--duration", "1", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    assert [(r["classes"], r["owners"]) for r in payload["rows"]] == [(10, 2), (10, 3)]
    assert all(r["throughput"]["samples_per_s"] > 0 for r in payload["rows"])
    assert {t["what"] for t in payload["targets"]} == {
        "p50_ratio_vs_two_echo",
        "samples_per_s",
        "samples_per_s_3_over_2_owners",
    }
    assert out.with_suffix(".png").stat().st_size > 1000
