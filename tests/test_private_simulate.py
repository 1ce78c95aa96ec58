"""``jacfusion-fed simulate --secagg --dp-clip --dp-noise --audit-log`` through the CLI (Ray,
four simulated owners, two sites per modality): the run completes with the table; every reply
the coordinator checked was a masked SecAgg+ record, never a plain model; the ServerApp's audit
log verifies and holds no raw id; the DP cost table in the README is the results file's."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from jacfusion_fed.cli import app

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results" / "private-fedavg.json"


@pytest.mark.e2e
def test_simulate_secagg_dp_with_audit(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    args = ["simulate", "--dataset", "twomoon", "--quick", "--sites-per-modality", "2"]
    args += ["--fedavg-rounds", "2", "--secagg", "--dp-clip", "1.0", "--dp-noise", "0.1"]
    args += ["--columns", "clean", "--audit-log", str(audit), "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "FedAvg, 2 sites" in result.output
    results = json.loads((tmp_path / "run" / "coordinator" / "results.json").read_text())
    assert results["status"] == "completed"
    seen = set(results["privacy"]["reply_records_seen"])
    assert "secaggplus_configs" in seen and "model" not in seen  # no round sent a plain model
    assert results["run_config"]["secagg"] is True

    verified = CliRunner().invoke(app, ["audit", "verify", str(audit)])
    assert verified.exit_code == 0, verified.output
    entries = [json.loads(line) for line in audit.read_text().splitlines()]
    events = {e.get("event") for e in entries if e["kind"] == "access"}
    assert {"flower:train", "flower:query", "flower:RegisterHead"} <= events
    stages = {e["detail"].get("secagg") for e in entries if e.get("event") == "flower:train"}
    assert {"setup", "share_keys", "collect_masked_vectors", "unmask"} <= stages
    assert "twomoon-" not in audit.read_text()  # no raw (local) patient id


def test_readme_quotes_the_private_fedavg_table() -> None:
    results = json.loads(RESULTS.read_text())
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Private FedAvg within a modality") :]
    assert results["markdown"] in section
    names = [row["name"] for row in results["settings"]]
    assert names[0] == "FedAvg" and sum("DP sigma" in n for n in names) == 2
    assert len(results["seeds"]) >= 3 and "load_before" in results["environment"]
    for row in results["settings"]:  # the table is rendered from the runs it summarizes
        for column, summary in row["summary"].items():
            values = [run[column] for run in row["runs"]]
            assert summary["mean"] == pytest.approx(sum(values) / len(values))
    reading = section[section.index("In this run") : section.index("The guarantee")]
    for number in re.findall(r"(\d+\.\d) %", reading):  # the reading quotes the table
        assert f"{number} ±" in results["markdown"], number
    load = max(results["environment"]["load_before"] + results["environment"]["load_after"])
    said = re.search(r"load average about (\d+)", reading)
    assert said and abs(int(said.group(1)) - load) <= 0.25 * load
    quoted = re.findall(r"sigma=(\d+(?:\.\d+)?)", section)
    assert {float(q) for q in quoted} >= {row["dp_noise"] for row in results["settings"][2:]}
