"""The audit trail end to end, through the CLI as the README writes it: two owners and a
coordinator serve with ``--audit-log``; a hospital submits a new patient's records, predicts
and has the patient forgotten; the services stop; ``audit verify --cert`` passes on every
log and fails on four corrupted copies naming the line; no raw id or input is in any audit
file; ``audit show`` with the hospital's key lists who accessed the patient."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers_audit import CORRUPTIONS, corrupt
from helpers_services import MODALITIES, OWNER_NAMES, build_fed
from typer.testing import CliRunner

from jacfusion_fed.cli import app

PATIENT = "Jane Doe 1970-01-01"
OTHER = "John Roe 1980-02-02"

pytestmark = pytest.mark.e2e


def _cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_audit_trail_end_to_end(tmp_path: Path) -> None:
    fed = build_fed(tmp_path)
    logs = {m: tmp_path / "audit" / f"owner-{m}.jsonl" for m in MODALITIES}
    logs["coordinator"] = tmp_path / "audit" / "coordinator.jsonl"
    rng = np.random.default_rng(7)
    inputs: dict[str, np.ndarray] = {}
    with fed.procs:
        for m in MODALITIES:
            port_file = tmp_path / f"owner-{m}.port"
            fed.procs.start(
                f"owner-{m}",
                [*fed.owner_args(m), "--port-file", str(port_file), "--audit-log", str(logs[m])],
            )
        for m in MODALITIES:
            port = fed.procs.wait_port(f"owner-{m}", tmp_path / f"owner-{m}.port")
            fed.owner_targets[m] = f"127.0.0.1:{port}"
        fed.start_coordinator("--audit-log", str(logs["coordinator"]))
        fed.wait_registered()
        who = ["--tls", str(fed.certs.requester_dirs["alice"]), "--pseudonym-key", str(fed.key)]
        for m in MODALITIES:
            inputs[m] = rng.normal(size=(2, 8)).astype(np.float32)
            npz = tmp_path / f"{m}-records.npz"
            np.savez(npz, ids=np.array([PATIENT, OTHER]), x=inputs[m])
            out = _cli(
                "submit",
                "--owner",
                fed.owner_targets[m],
                "--modality",
                m,
                *who,
                "--inputs",
                str(npz),
            )
            assert "2 new" in out
        out = _cli(
            "predict",
            PATIENT,
            OTHER,
            "patient-0000001",
            "--coordinator",
            fed.coordinator,
            *who,
            "--json",
        )
        predicted = json.loads(out)
        owners = [a for m in MODALITIES for a in ("--owner", fed.owner_targets[m])]
        out = _cli("forget", PATIENT, *owners, *who)
        assert "erased 1" in out
        fed.procs.stop_all()  # SIGTERM: each service logs its stop and a final checkpoint

    certs = {m: fed.certs.owner_dirs[OWNER_NAMES[m]] for m in MODALITIES}
    certs["coordinator"] = fed.certs.coordinator_dir
    for name, path in logs.items():
        out = _cli("audit", "verify", str(path), "--cert", str(certs[name]))
        assert out.startswith("intact:") and "signatures verified" in out, out
        assert "--expect-head" in out  # says what it cannot detect, and how to close the gap

    # no raw id, no input value, no probability in any audit file
    text = "\n".join(p.read_text() for p in logs.values())
    for raw in (PATIENT, OTHER, "patient-0000001", "Jane", "Doe"):
        assert raw not in text
    for m in MODALITIES:
        for value in inputs[m].ravel():
            assert repr(float(value))[:9] not in text
    probabilities = [p for row in predicted["samples"] for p in row["probabilities"]]
    assert len(probabilities) == 3 * 4
    for p in probabilities:
        assert repr(float(p))[:9] not in text

    # what each service logged
    entries = {n: [json.loads(x) for x in p.read_text().splitlines()] for n, p in logs.items()}
    owner_events = [e.get("event") for e in entries["audio"] if e["kind"] == "access"]
    for event in ("GetHead", "PutRecords", "GetLogits", "DeleteRecords"):
        assert event in owner_events, owner_events
    coord = [e for e in entries["coordinator"] if e["kind"] == "access"]
    predict = [e for e in coord if e["event"] == "Predict"]
    assert len(predict) == 1 and predict[0]["n_ids"] == 3 and predict[0]["status"] == "OK"
    assert predict[0]["peer"]["cn"] == "alice" and predict[0]["peer"]["role"] == "requester"
    assert predict[0]["peer"]["fingerprint"].startswith("sha256:")
    assert set(predict[0]["model_versions"]) == set(MODALITIES)
    assert {e["event"] for e in coord} >= {"RegisterHead"}

    # audit show with the hospital's key: who accessed Jane, at the owner and the coordinator
    show = ["audit", "show", "--pseudonym-key", str(fed.key), "--id", PATIENT]
    out = _cli(*show, str(logs["audio"]), "--json")
    shown = json.loads(out)
    assert shown["log_intact"]
    calls = [(a["event"], a["peer"]["role"], a["status"]) for a in shown["accesses"]]
    assert ("PutRecords", "requester", "OK") in calls
    assert ("GetLogits", "coordinator", "OK") in calls
    assert ("DeleteRecords", "requester", "OK") in calls
    out = _cli(*show, str(logs["coordinator"]))
    assert "Predict" in out and "alice" in out

    # four corrupted copies: verify fails on each, naming the line
    src = logs["audio"]
    middle = len(src.read_text().splitlines()) // 2
    for how in CORRUPTIONS:
        copy = tmp_path / f"corrupt-{how}.jsonl"
        line = corrupt(src, copy, how, middle)
        result = CliRunner().invoke(
            app, ["audit", "verify", str(copy), "--cert", str(certs["audio"])]
        )
        assert result.exit_code == 1, (how, result.output)
        assert f"line {line}:" in result.output, (how, result.output)
