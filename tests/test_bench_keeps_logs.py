"""A benchmark that fails keeps its servers' logs (its temporary folder is removed), and says
where; nothing else of the folder (keys, certificates) is copied."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from jacfusion_fed.bench.deployment import ServeBenchConfig, bench_setup


def test_a_failed_benchmark_keeps_the_servers_logs() -> None:
    said: list[str] = []
    cfg = ServeBenchConfig(samples=64, classes=3, features=4)
    root: Path | None = None
    with (
        pytest.raises(RuntimeError, match="coordinator died"),
        bench_setup(None, cfg, "requester", said.append) as setup,
    ):
        root = setup.root
        (root / "coordinator.log").write_text("Traceback: INTERNAL\n")
        (root / "owners").mkdir()
        (root / "owners" / "image.log").write_text("serving\n")
        raise RuntimeError("coordinator died")
    assert root is not None and not root.exists()  # the temporary folder is gone
    kept = Path(said[-1].split("kept in ", 1)[1])
    try:
        assert (kept / "coordinator.log").read_text() == "Traceback: INTERNAL\n"
        assert (kept / "owners" / "image.log").read_text() == "serving\n"
        assert not list(kept.rglob("*.key")) and not list(kept.rglob("*.pem"))
        assert sorted(p.name for p in kept.rglob("*") if p.is_file()) == [
            "coordinator.log",
            "image.log",
        ]
    finally:
        shutil.rmtree(kept)


def test_a_benchmark_that_succeeds_keeps_nothing() -> None:
    said: list[str] = []
    cfg = ServeBenchConfig(samples=64, classes=3, features=4)
    with bench_setup(None, cfg, "requester", said.append) as setup:
        (setup.root / "coordinator.log").write_text("ok\n")
    assert not any("kept in" in s for s in said)
