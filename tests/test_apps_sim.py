"""The jacfusion Flower app end to end under the Simulation Engine (Ray on 127.0.0.1):
owners train, heads are registered, logits gathered, the fused robustness table produced.

- ``test_simulation_end_to_end_privacy``: wraps the coordinator's grid and inspects *every*
  reply it receives: only allow-listed records, no array shaped like inputs or features, no
  local patient id anywhere; the coordinator never had the pseudonym key.
- ``test_multi_site_fedavg_then_restart``: two sites of one modality train with FedAvg through
  Flower (``jacfusion-fed simulate --sites-per-modality 2``); a second run on the same owner
  workspaces with ``train = false`` (everything restarted) gets the same model versions.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from typer.testing import CliRunner

from jacfusion_fed.cli import app as cli_app
from jacfusion_fed.evaluation.results import PAPER_MM_KINDS
from jacfusion_fed.federation.scenario import Scenario, requester_splits, run_scenario
from jacfusion_fed.server.federated import run_coordinator
from jacfusion_fed.store import HeadRegistry, ModelStore

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc"),
]

K = 2
ALLOWED_RECORDS = {"info", "head", "metrics", "logits", "calibration"}
COLUMNS = "clean; gaussian w0=0.5; fgsm w4=0.1; pgd w4=0.1 w5=0.02 w6=5"


class RecordingGrid:
    """The coordinator's grid, recording every message it pulls (i.e. every reply)."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.replies: list[Message] = []

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        out = list(self._grid.pull_messages(message_ids))
        self.replies.extend(out)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


def test_simulation_end_to_end_privacy(tmp_path: Path) -> None:
    grids: list[RecordingGrid] = []
    recording = ServerApp()

    @recording.main()
    def main(grid: Grid, context: Context) -> None:
        grids.append(RecordingGrid(grid))
        run_coordinator(grids[0], context)  # type: ignore[arg-type]

    scenario = Scenario.builtin("twomoon", quick=True, epochs=20, columns=COLUMNS)
    result = run_scenario(scenario, tmp_path / "run", server_app=recording)
    res = result.results
    assert res["status"] == "completed", res.get("error")

    # --- owners trained, heads registered (persisted, versioned), logits gathered, table
    registry = HeadRegistry(result.prepared.coordinator_dir / "registry")
    assert registry.modalities() == ["x", "y"]
    for modality, head in res["heads"].items():
        record = registry.get(modality)
        assert record.model_version == head["version"] and record.head_kind == "gram"
        assert record.owner == f"{modality}-owner" and sum(record.class_counts) == 200
        store = tmp_path / "run" / "owners" / f"{modality}-owner" / "store"
        assert (store / "models" / f"{head['version']}.model").is_file()
    evaluation = res["evaluation"]
    assert (evaluation["num_val"], evaluation["num_test"]) == (100, 200)
    table = result.table()
    assert [c.key for c in table.columns] == ["clean", "w0", "fgsm", "pgd"]
    # every owner published a calibration: the table has the robust row (issue 11)
    assert [r.kind for r in table.rows] == ["unimodal", "unimodal", *PAPER_MM_KINDS, "robust"]
    assert all(registry.get(m).calibration is not None for m in ("x", "y"))
    assert [r.name for r in table.rows[:2]] == ["0: X-regT", "1: Y-regT"]
    for row in table.rows:
        for col in table.columns:
            assert 0.0 <= row.mean(col.key) <= 1.0
    y_row, stat_wo = table.rows[1], table.row("MM (0, 1)", "statistical")
    assert y_row.mean("clean") > 0.6 and stat_wo.mean("clean") > 0.6
    assert y_row.mean("fgsm") < y_row.mean("clean")  # the owner really attacked its net
    assert set(table.row("MM (0, 1)", "jacobian").gamma.values()) <= {0.1, 0.5, 0.9}
    reports = result.prepared.coordinator_dir / "reports"
    assert (reports / "twomoon-y.md").is_file() and (reports / "twomoon-y.csv").is_file()

    # --- every reply the coordinator received: allow-listed records, no input/feature shapes
    replies = grids[0].replies
    assert len(replies) == 6 == res["privacy"]["replies_checked"]  # describe, train, query x 2
    n_eval = 300
    allowed_shapes = {(K, K), (K,), (n_eval, K), (n_eval,)}
    splits = requester_splits("builtin:twomoon?quick=1", "x")
    local_ids = {i for ds in splits.values() for i in ds.sample_ids}
    for reply in replies:
        assert not reply.has_error(), reply.error
        assert set(reply.content.keys()) <= ALLOWED_RECORDS, reply.content.keys()
        for name, record in reply.content.items():
            if isinstance(record, ArrayRecord) and name == "calibration":  # aggregates only
                shapes = {f: tuple(a.shape) for f, a in record.items()}
                assert shapes["class-means"] == shapes["precision"] == (K, K)
                assert shapes["typicality-scores"] == shapes["conformity-scores"]
                assert len(shapes["typicality-scores"]) == 1
            elif isinstance(record, ArrayRecord):
                assert name in ("head", "logits")
                for field, arr in record.items():
                    assert isinstance(arr, Array)
                    assert tuple(arr.shape) in allowed_shapes, (name, field, arr.shape)
            elif isinstance(record, MetricRecord):
                assert name == "metrics"
                assert set(record) <= {"train-loss", "train-accuracy", "num-examples", "seconds"}
            else:
                assert isinstance(record, ConfigRecord) and name == "info"
                assert set(record) <= {"modality", "owner", "version", "num-classes", "model-spec"}
                for value in record.values():
                    for text in _strings(value):
                        assert text not in local_ids and "twomoon-" not in text
    # logits replies: one matrix per requested setting, for exactly the requested ids
    query_replies = [r for r in replies if "logits" in r.content]
    widths = sorted(len(r.content["logits"]) for r in query_replies)
    # known + clean (+ its detector p-values, issue 20) for x; known + clean, w0, fgsm, pgd
    # (+ one p-value array each) for y
    assert widths == [1 + 2 * 1, 1 + 2 * 4]
    for r in query_replies:  # the p-values: one float64 in (0, 1] per requested id, nothing else
        record = r.content["logits"]
        for field in (f for f in record if f.startswith("u")):
            u = record[field].numpy()
            assert u.dtype == np.float64 and u.shape == (n_eval,)
            assert ((u > 0) & (u <= 1)).all()

    # --- the coordinator never held the key, never saw a local patient id
    key_file = result.prepared.key_file
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    server_config = result.simulation.server_context.run_config  # type: ignore[union-attr]
    assert all(
        str(key_file) not in str(v) and "secrets" not in str(v) for v in server_config.values()
    )
    assert "key-file" not in server_config
    for path in result.prepared.coordinator_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert b"twomoon-train-" not in data and b"twomoon-test-" not in data, path
    labels = json.loads(result.prepared.labels_file.read_text())
    assert set(labels["splits"]) == {"val", "test"}
    assert not set(labels["splits"]["test"]["ids"]) & local_ids

    # --- Ray: temp files in the run folder
    assert any((tmp_path / "run" / "ray").glob("session_*"))


def test_multi_site_fedavg_then_restart(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cli = CliRunner().invoke(
        cli_app,
        [
            "simulate",
            "--dataset",
            "twomoon",
            "--quick",
            "--sites-per-modality",
            "2",
            "--fedavg-rounds",
            "2",
            "--epochs",
            "8",
            "--columns",
            "clean; gaussian w0=0.5",
            "--run-dir",
            str(run_dir),
        ],
    )
    assert cli.exit_code == 0, cli.output + repr(cli.exception)
    assert "Stat-w/" in cli.output and "Wall time" in cli.output
    res = json.loads((run_dir / "coordinator" / "results.json").read_text())
    assert res["status"] == "completed"
    assert len(res["owners"]) == 4
    heads = res["heads"]
    for modality in ("x", "y"):
        head = heads[modality]
        assert head["sites"] == 2 and head["fedavg_rounds"] == 2
        assert head["owner"] == f"{modality}-owner-site0+{modality}-owner-site1"
        assert sum(head["class_counts"]) == 200  # both sites' patients
        # both sites published the same (content-hashed) FedAvg model
        for site in (0, 1):
            store = ModelStore(run_dir / "owners" / f"{modality}-owner-site{site}" / "store")
            assert store.current_version() == head["version"]
    table = res["evaluation"]["table"]
    assert "(FedAvg, 2 sites)" in table["rows"][1]["name"]
    assert res["evaluation"]["num_test"] == 200  # every test id found at exactly one site

    # restart everything (new Ray, new processes): the owners serve the same versions
    scenario = Scenario.builtin(
        "twomoon", quick=True, sites_per_modality=2, train=False, columns="clean"
    )
    again = run_scenario(scenario, run_dir)
    assert again.results["status"] == "completed"
    for modality in ("x", "y"):
        assert again.results["heads"][modality]["version"] == heads[modality]["version"]
    acc_before = table["rows"][-1]["acc"]["clean"]
    acc_after = again.results["evaluation"]["table"]["rows"][-1]["acc"]["clean"]
    np.testing.assert_allclose(acc_after, acc_before)
    registry = HeadRegistry(run_dir / "coordinator" / "registry")
    assert len(registry.history("x")) == 1  # same head again: no new registry entry
    assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0"
