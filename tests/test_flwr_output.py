"""`flwr run` output: the ServerApp's log lines, the default perturbed modality, label names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from jacfusion_fed.server.federated_eval import _default_perturbed
from jacfusion_fed.server.server_app import outcome_lines
from jacfusion_fed.store import HeadRegistry


def test_server_app_logs_the_table_and_where_the_reports_lie(tmp_path: Path) -> None:
    summary, table = tmp_path / "avdigits.md", tmp_path / "avdigits-audio.md"
    summary.write_text("# summary\n")
    table.write_text("| UM / MM | Model | Clean |\n|---|---|---|\n| MM | Stat-w/ (ours) | 88.0 |\n")
    lines = outcome_lines(
        {
            "dataset": "avdigits",
            "evaluation": {"table": {}},
            "reports": [str(summary), str(table), str(tmp_path / "avdigits-audio.csv")],
            "registry_dir": str(tmp_path / "registry"),
        }
    )
    assert "| MM | Stat-w/ (ours) | 88.0 |" in lines
    assert "# summary" not in lines  # the table, not the whole summary
    assert any(line.startswith(f"Report: {summary}") for line in lines)
    assert f"Head registry: {tmp_path / 'registry'}" in lines
    bare = outcome_lines({"dataset": "avdigits", "reports": []})
    assert any("no labels-file" in line for line in bare)


def test_empty_perturbed_means_the_datasets_choice_as_in_simulate() -> None:
    assert _default_perturbed("avdigits", ["image", "audio"]) == "audio"  # not "image" by name
    assert _default_perturbed("twomoon", ["x", "y"]) == "y"
    assert _default_perturbed("npz-data", ["b", "a"]) == "b"
    assert _default_perturbed("avdigits", ["image", "ecg"]) == "image"


def test_registry_keeps_class_names_for_every_reader(tmp_path: Path) -> None:
    reg = HeadRegistry(tmp_path)
    reg.register(
        "audio", "site", "v1", class_counts=[1, 2], gram=np.eye(2), class_names=["no", "yes"]
    )
    assert HeadRegistry(tmp_path).get("audio").class_names == ("no", "yes")
    reg.register("image", "site", "v1", class_counts=[1, 2], gram=np.eye(2))
    assert reg.get("image").class_names == ()  # a Flower registration carries none
    with pytest.raises(ValueError, match="class_names must have length K=2"):
        reg.register("ecg", "s", "v1", class_counts=[1, 2], gram=np.eye(2), class_names=["a"])
