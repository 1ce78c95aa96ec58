"""One trace across the three parties, through the CLI as the README writes it: two owners
and a coordinator serve with ``--trace-file``, ``jacfusion-fed predict --trace-file`` asks
once; the services stop (SIGTERM). The four OTLP JSON line files hold one trace id that links
the requester's client span, the coordinator's Predict server span with its steps (plan,
gather, group, fuse, finish), one GetLogits client span per owner under ``gather``, and each
owner's GetLogits server span whose parent chain leads to that ``gather`` span."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers_services import CLI, MODALITIES, build_fed

pytestmark = pytest.mark.e2e


def _spans(path: Path) -> list[dict[str, Any]]:
    """Every span of an OTLP JSON lines file, with its service name."""
    out = []
    for line in path.read_text().splitlines():
        for resource in json.loads(line)["resourceSpans"]:
            attrs = {a["key"]: a["value"] for a in resource["resource"]["attributes"]}
            service = attrs["service.name"]["stringValue"]
            for scope in resource["scopeSpans"]:
                for span in scope["spans"]:
                    out.append({**span, "service": service})
    return out


def test_one_trace_links_requester_coordinator_and_each_owner(tmp_path: Path) -> None:
    fed = build_fed(tmp_path)
    files = {name: tmp_path / "traces" / f"{name}.jsonl" for name in (*MODALITIES, "coordinator")}
    files["requester"] = tmp_path / "traces" / "requester.jsonl"
    with fed.procs:
        for m in MODALITIES:
            port_file = tmp_path / f"owner-{m}.port"
            fed.procs.start(
                f"owner-{m}",
                [*fed.owner_args(m), "--port-file", str(port_file), "--trace-file", str(files[m])],
            )
        for m in MODALITIES:
            port = fed.procs.wait_port(f"owner-{m}", tmp_path / f"owner-{m}.port")
            fed.owner_targets[m] = f"127.0.0.1:{port}"
        fed.start_coordinator("--trace-file", str(files["coordinator"]))
        fed.wait_registered()
        predict = subprocess.run(
            [
                sys.executable,
                "-c",
                CLI,
                "predict",
                "patient-0000001",
                "patient-0000002",
                "--coordinator",
                fed.coordinator,
                "--tls",
                str(fed.certs.requester_dirs["alice"]),
                "--pseudonym-key",
                str(fed.key),
                "--trace-file",
                str(files["requester"]),
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert predict.returncode == 0, predict.stderr
        assert json.loads(predict.stdout)["method"] == "jacobian"
        fed.procs.stop_all()

    spans = {name: _spans(path) for name, path in files.items()}
    [client] = [s for s in spans["requester"] if s["name"] == "jacfusion.v1.FusionService/Predict"]
    assert client["kind"] == 3 and client["service"] == "jacfusion-requester"  # CLIENT
    trace_id = client["traceId"]
    every = [s for group in spans.values() for s in group if s["traceId"] == trace_id]
    by_id = {s["spanId"]: s for s in every}

    [server] = [s for s in spans["coordinator"] if s["traceId"] == trace_id and s["kind"] == 2]
    assert server["name"] == "jacfusion.v1.FusionService/Predict"
    assert server["parentSpanId"] == client["spanId"]
    steps = {
        s["name"]: s for s in spans["coordinator"] if s.get("parentSpanId") == server["spanId"]
    }
    assert set(steps) == {"plan", "gather", "group", "fuse", "finish"}
    gather = steps["gather"]
    calls = [s for s in spans["coordinator"] if s.get("parentSpanId") == gather["spanId"]]
    assert sorted(c["name"] for c in calls) == ["jacfusion.v1.ModalityService/GetLogits"] * 2
    modality_of = {
        c["spanId"]: next(
            a["value"]["stringValue"] for a in c["attributes"] if a["key"] == "jacfusion.modality"
        )
        for c in calls
    }
    assert sorted(modality_of.values()) == sorted(MODALITIES)

    def chain(span: dict[str, Any]) -> list[str]:
        names = []
        while span.get("parentSpanId"):
            span = by_id[span["parentSpanId"]]  # KeyError: a parent outside the trace's files
            names.append(span["spanId"])
        return names

    for m in MODALITIES:
        [owner] = [s for s in spans[m] if s["traceId"] == trace_id]
        assert owner["name"] == "jacfusion.v1.ModalityService/GetLogits"
        assert owner["kind"] == 2 and owner["service"] == "jacfusion-owner"  # SERVER
        assert modality_of[owner["parentSpanId"]] == m  # the call the coordinator made to m
        ancestors = chain(owner)
        assert gather["spanId"] in ancestors and client["spanId"] == ancestors[-1]
        assert not owner["status"].get("code"), owner["status"]  # not an error
