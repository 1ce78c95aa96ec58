"""One typed run config: defaults written once, validated once, one error type."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from jacfusion_fed.federation import load_app_run_config
from jacfusion_fed.federation.run_config import (
    DEFAULT_COLUMNS,
    TRAINING_METHODS,
    RunConfig,
    RunConfigError,
)
from jacfusion_fed.federation.scenario import DEFAULT_RUN_CONFIG, Scenario

REPO = Path(__file__).resolve().parents[1]


def test_pyproject_declares_exactly_the_defaults() -> None:
    with (REPO / "pyproject.toml").open("rb") as fh:
        table = tomllib.load(fh)["tool"]["flwr"]["app"]["config"]
    assert table == RunConfig().to_mapping()
    assert list(table) == list(RunConfig.keys())  # same order: easy to compare by eye
    assert load_app_run_config(REPO) == RunConfig().to_mapping() == DEFAULT_RUN_CONFIG


def test_round_trip_and_partial_mappings() -> None:
    default = RunConfig()
    assert RunConfig.from_mapping(default.to_mapping()) == default
    assert RunConfig.from_mapping({}) == default
    cfg = RunConfig.from_mapping({"gamma": "0.25", "batch-size": 8, "train": "false"})
    assert (cfg.gamma, cfg.batch_size, cfg.train) == (0.25, 8, False)
    assert cfg.to_mapping()["gamma"] == "0.25"
    assert RunConfig.from_mapping(cfg.to_mapping()) == cfg
    # Flower's `-c gamma=0.5` arrives as a float, the manifest's "auto" as a string
    assert RunConfig.from_mapping({"gamma": 0.5}).gamma == 0.5
    assert RunConfig.from_mapping({"gamma": "auto"}).gamma is None
    assert RunConfig.from_mapping({"gamma-candidates": ""}).gamma_candidates == (0.1, 0.5, 0.9)
    assert cfg.replace(seed=3).seed == 3 and cfg.updated({"seed": 4}).seed == 4


@pytest.mark.parametrize(
    ("mapping", "words"),
    [
        ({"gamma": 1.5}, ["'gamma'", "1.5", "(0, 1]"]),
        ({"gamma": "0"}, ["'gamma' = '0'", "(0, 1]"]),
        ({"gamma": "big"}, ["'gamma'", "'big'", "auto"]),
        ({"gamma-candidates": "0.1,2"}, ["'gamma-candidates'", "2.0"]),
        ({"head-kind": "weights"}, ["'head-kind'", "'weights'", "gram"]),
        ({"training": "magic"}, ["'training'", "'magic'", "mixup"]),
        ({"epochs": 0}, ["'epochs'", "0", ">= 1"]),
        ({"epochs": 2.5}, ["'epochs'", "2.5", "integer"]),
        ({"lr": "fast"}, ["'lr'", "'fast'", "number"]),
        ({"train": "maybe"}, ["'train'", "'maybe'", "true or false"]),
        ({"run-dir": "relative/dir"}, ["'run-dir'", "relative/dir", "absolute"]),
        ({"columns": "clean; blur r=2"}, ["'columns'", "blur"]),
        ({"bogus": 1}, ["'bogus'", "unknown"]),
    ],
)
def test_bad_values_raise_one_error_type_in_one_line(
    mapping: dict[str, object], words: list[str]
) -> None:
    with pytest.raises(RunConfigError) as info:
        RunConfig.from_mapping(mapping)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    assert isinstance(info.value, ValueError)


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(RunConfigError, match=r"'gamma' = 2\.0"):
        RunConfig(gamma=2.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        RunConfig().gamma = 0.5  # type: ignore[misc]


def test_lists_kept_here_match_the_library() -> None:
    from jacfusion_fed.evaluation import GAMMA_CANDIDATES
    from jacfusion_fed.server.federated import parse_columns
    from jacfusion_fed.training.methods import METHODS

    assert TRAINING_METHODS == METHODS
    assert RunConfig().gamma_candidates == GAMMA_CANDIDATES
    assert len(parse_columns(DEFAULT_COLUMNS)) == 5  # the default skips the columns check


def test_scenario_refuses_a_bad_value_before_any_run() -> None:
    with pytest.raises(RunConfigError, match="'gamma' = '7'"):
        Scenario.builtin("twomoon", quick=True, gamma="7")
    with pytest.raises(KeyError, match="unknown run config keys"):
        Scenario.builtin("twomoon", quick=True, bogus_key=1)


def test_both_apps_read_the_same_typed_config() -> None:
    from flwr.app import Context, RecordDict

    from jacfusion_fed.clients.task import run_config
    from jacfusion_fed.server.federated import FlowConfig

    mapping = {**DEFAULT_RUN_CONFIG, "gamma": "0.3", "run-dir": "/tmp/x", "fedavg-rounds": 2}
    context = Context(
        run_id=7, node_id=1, node_config={}, state=RecordDict(), run_config=dict(mapping)
    )
    assert run_config(context).fedavg_rounds == 2
    flow = FlowConfig.from_context(context)
    assert (flow.gamma, flow.fedavg_rounds, flow.run_dir) == (0.3, 2, Path("/tmp/x"))
    assert flow.registry_dir == Path("/tmp/x/registry")
    context.run_config["gamma"] = "1.2"
    with pytest.raises(RunConfigError, match=r"'gamma' = '1\.2'"):
        FlowConfig.from_context(context)
    with pytest.raises(RunConfigError, match=r"'gamma' = '1\.2'"):
        run_config(context)


def test_cli_simulate_reports_a_bad_gamma_in_one_line() -> None:
    from typer.testing import CliRunner

    from jacfusion_fed.cli import app

    result = CliRunner().invoke(app, ["simulate", "--dataset", "twomoon", "--gamma", "1.5"])
    assert result.exit_code == 2, result.output
    assert "gamma" in result.output and "1.5" in result.output
