"""The README's multi-host walkthrough and the scaling figures agree with the code and files."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from typer.testing import CliRunner

from jacfusion_fed.cli import app
from jacfusion_fed.federation.scenario import DEFAULT_RUN_CONFIG, Scenario

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
ARCHITECTURE = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
VARIABLES = {"$COORD": "10.0.0.1", "$IMG": "10.0.0.2", "$AUD": "10.0.0.3", "$PWD": "/abs"}


def _walkthrough() -> str:
    start = README.index("### Deployment across machines")
    return README[start : README.index("## Online inference", start)]


def _expand(text: str) -> str:
    for var, value in VARIABLES.items():
        text = text.replace(var, value)
    return text


def test_readme_run_toml_gives_simulate_quick_settings() -> None:
    block = re.search(r"cat > run.toml <<TOML\n(.*?)\nTOML", _walkthrough(), re.S)
    assert block is not None
    documented = {**DEFAULT_RUN_CONFIG, **tomllib.loads(_expand(block.group(1)))}
    scenario = Scenario.builtin("avdigits", quick=True)
    simulate = {**DEFAULT_RUN_CONFIG, **scenario.run_config}
    paths = {"run-dir", "labels-file", "registry-dir", "expected-nodes"}
    assert {k: v for k, v in documented.items() if k not in paths} == {
        k: v for k, v in simulate.items() if k not in paths
    }
    data = re.search(r"DATA='([^']+)'", _walkthrough())
    assert data is not None and {o.data for o in scenario.owners} == {data.group(1)}


def test_readme_certs_command_issues_per_host_certificates(tmp_path: Path) -> None:
    match = re.search(r"jacfusion-fed certs --out pki (.*?)\n#", _walkthrough(), re.S)
    assert match is not None
    args = _expand(match.group(1).replace("\\\n", " ").replace('"', "")).split()
    result = CliRunner().invoke(app, ["certs", "--out", str(tmp_path / "pki"), *args])
    assert result.exit_code == 0, result.output
    assert "deprecated" not in result.output  # the README uses the current option names
    manifest = json.loads((tmp_path / "pki" / "manifest.json").read_text())
    hosts = {p["name"]: p["hosts"] for p in manifest["principals"]}
    assert hosts == {
        "coordinator": ["10.0.0.1"],
        "vision-co": ["10.0.0.2"],
        "audio-co": ["10.0.0.3"],
        "hospital": [],
    }


def test_architecture_quotes_the_replica_results_file() -> None:
    results = json.loads((ROOT / "docs" / "results" / "replicas.json").read_text())
    section = ARCHITECTURE[ARCHITECTURE.index("### Coordinator replicas") :]
    with_retries = results["failover"]["with_retries"]
    without = results["failover"]["without_retries"]
    ratio = results["throughput"]["ratio_two_vs_one"]
    assert (
        f"through {with_retries['requests']} requests from {results['config']['clients']} threads"
        in (" ".join(section.split()))
    )
    assert f"failed **{with_retries['failed']}** requests" in " ".join(section.split())
    assert f"against **{without['failed']}** in the same run" in " ".join(section.split())
    assert f"**{ratio:.2f}x**" in section
    assert f"load average {results['load_average'][0]:.0f}" in section
    assert with_retries["failed"] == 0 and with_retries["succeeded"] == with_retries["requests"]
