"""The online walkthrough's accuracy: the README quotes the committed results file, and (slow)
following the walkthrough again gives a fused answer at least as good as the best modality."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results" / "walkthrough.json"


def _bench() -> ModuleType:
    path = ROOT / "benchmarks" / "walkthrough_accuracy.py"
    spec = importlib.util.spec_from_file_location("walkthrough_accuracy", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pct(value: float) -> str:
    return f"{100 * value:.0f} %"


def test_readme_quotes_the_results_file() -> None:
    results = json.loads(RESULTS.read_text())
    acc = results["accuracy"]
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Online inference") : readme.index("## Robustness lab")]
    quoted = re.search(
        r"image alone \*\*(\d+) %\*\*, audio alone \*\*(\d+) %\*\*, fused \*\*(\d+) %\*\*\s*"
        r"\(Jacobian, the default\) and (\d+) % \(statistical\)",
        section,
    )
    assert quoted, "the online section must quote the walkthrough's measured accuracy"
    want = [acc[k] for k in ("image", "audio", "fused_jacobian", "fused_statistical")]
    assert [f"{g} %" for g in quoted.groups()] == [_pct(v) for v in want]
    assert f"{results['samples']} test patients" in section
    assert acc["fused_jacobian"] >= max(acc["image"], acc["audio"])


@pytest.mark.slow
def test_walkthrough_accuracy(tmp_path: Path) -> None:
    results = _bench().measure(tmp_path)
    acc = results["accuracy"]
    assert results["samples"] == 100
    assert acc["fused_jacobian"] >= max(acc["image"], acc["audio"])
    assert acc["image"] >= 0.7  # today's recipe; the old 8-epoch one reached 58 %
    recorded = json.loads(RESULTS.read_text())["accuracy"]
    for name, value in acc.items():  # same data, same seeds: the committed figures again
        assert value == pytest.approx(recorded[name], abs=0.05), name


@pytest.mark.slow
def test_new_patient_example(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = ROOT / "examples" / "new_patient.py"
    spec = importlib.util.spec_from_file_location("new_patient_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    accuracy = module.main(tmp_path)
    out = capsys.readouterr().out
    assert "(torchscript, head 'fc')" in out and "(safetensors, head '10')" in out
    assert "modalities used ['image', 'audio']" in out
    assert "after forget: NOT_FOUND" in out
    assert "Jane" not in out.split("after forget:")[1].splitlines()[0]
    assert min(accuracy.values()) > 0.3 and accuracy["fused (Jacobian)"] > 0.7
