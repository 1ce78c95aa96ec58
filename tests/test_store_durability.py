"""Durability under SIGKILL (issue 21): an owner killed during a stream of submit batches, a
process killed inside ``RecordStore.put``, and registrations on the PostgreSQL registry with the
registering process killed and the server crashed. Every batch whole or absent, nothing corrupt,
no acknowledged write lost, resubmission idempotent (``jacfusion_fed.reliability.store_crash``,
``registry_crash``). The committed figures (docs/results/durability-store.json, written by
``python -m jacfusion_fed.reliability.store_crash``) are quoted in docs/reliability.md;
``test_quoted_figures_match_results`` (default suite) checks the quote."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from jacfusion_fed.reliability.postgres import postgres_missing
from jacfusion_fed.reliability.store_crash import CrashConfig, owner_crash_run, store_crash_run

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results" / "durability-store.json"


def _no_damage(run: dict[str, Any]) -> None:
    for key in ("partial_batches", "lost_acknowledged_batches", "corrupt_records"):
        assert run[key] == 0, (key, run)
    assert run["integrity_checks_not_ok"] == 0, run


@pytest.mark.e2e
def test_owner_killed_during_a_stream_of_submit_batches(tmp_path: Path) -> None:
    cfg = CrashConfig(batches=100, batch_records=32, owner_kills=3)
    run = owner_crash_run(tmp_path, cfg)
    assert run["kills"] == 3 and run["kills_with_a_batch_in_flight"] == 3
    _no_damage(run)
    total = cfg.batches * cfg.batch_records
    first, second = run["resubmit"], run["second_resubmit"]
    assert first["replaced"] == 0 and first["stored"] + first["unchanged"] == total
    assert first["unchanged"] >= run["acknowledged_batches"] * cfg.batch_records
    assert second == {"stored": 0, "unchanged": total, "replaced": 0}
    assert run["batches_present_at_end"] == cfg.batches


@pytest.mark.e2e
def test_process_killed_inside_record_store_put(tmp_path: Path) -> None:
    run = store_crash_run(tmp_path, CrashConfig(store_kills=4))
    assert run["kills"] == 4 and run["acknowledged_batches"] > 0
    _no_damage(run)


@pytest.mark.e2e
def test_postgres_registrations_survive_killed_clients_and_a_crashed_server() -> None:
    reason = postgres_missing()
    if reason:
        pytest.skip(reason)
    from jacfusion_fed.reliability.registry_crash import registry_crash_run

    run = registry_crash_run(client_kills=3, server_crashes=1)
    assert run["acknowledged_registrations"] > 0
    assert run["entries"] >= run["acknowledged_registrations"]
    for key in ("gaps", "duplicates", "torn_or_wrong", "corrupt", "lost_acknowledged"):
        assert run[key] == 0, (key, run)
    assert run["reregister_added"] == 0


def _quoted() -> dict[str, float]:
    """``<!-- durability:owner_sigkill.kills --> 12`` markers of docs/reliability.md."""
    text = (ROOT / "docs" / "reliability.md").read_text()
    pairs = re.findall(r"<!-- durability:([\w.]+) -->\s*([\d,]+(?:\.\d+)?)", text)
    return {key: float(value.replace(",", "")) for key, value in pairs}


def test_quoted_figures_match_results() -> None:
    data = json.loads(RESULTS.read_text())
    quoted = _quoted()
    assert len(quoted) >= 10, "docs/reliability.md quotes too few durability figures"
    for key, value in quoted.items():
        node: Any = data
        for part in key.split("."):
            node = node[part]
        assert value == pytest.approx(float(node)), key
    for run in ("owner_sigkill", "store_sigkill"):  # what the committed run showed
        _no_damage(data[run])
    registry = data["registry_postgres"]
    assert registry["lost_acknowledged"] == registry["torn_or_wrong"] == registry["corrupt"] == 0
