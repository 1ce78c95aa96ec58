"""Tracing off costs nothing and fails nothing; the OTEL_* variables that turn it on; a bad
exporter setting is one line. (The trace across the parties: tests/test_tracing_e2e.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from jacfusion_fed.rpc.tracing import configure, env_requests_export

OFF = """
import sys
import grpc
from jacfusion_fed.rpc import tracing
from jacfusion_fed.rpc.identity import Principal
from jacfusion_fed.rpc.policies import FUSION_SERVICE, FUSION_SERVICE_POLICY
from jacfusion_fed.rpc.serving import start_server
from jacfusion_fed.rpc.tls import INSECURE

assert tracing.configure("test", None) is False
running = start_server(
    INSECURE, policy=FUSION_SERVICE_POLICY,
    insecure_principal=Principal("requester", "insecure-requester"),
    services=(FUSION_SERVICE,), add_servicers=lambda server: None, serving=True,
)
with grpc.insecure_channel(running.target) as channel:
    with tracing.client_call("jacfusion.v1.FusionService/Predict") as metadata:
        assert metadata is None
        try:
            channel.unary_unary("/jacfusion.v1.FusionService/Predict")(b"", timeout=5)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNIMPLEMENTED, exc
    with tracing.span("plan"):
        pass
running.stop(0)
print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))
"""


def test_off_imports_no_opentelemetry(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}  # no OTEL_* variable
    done = subprocess.run(
        [sys.executable, "-c", OFF], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("env", "wanted"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4317"}, True),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "x"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "x", "OTEL_SDK_DISABLED": "true"}, False),
    ],
)
def test_which_environment_asks_for_spans(env: dict[str, str], wanted: bool) -> None:
    assert env_requests_export(env) is wanted


def test_a_bad_exporter_setting_fails_before_any_change() -> None:
    with pytest.raises(ValueError, match="OTEL_TRACES_EXPORTER=zipkin"):
        configure("test", None, environ={"OTEL_TRACES_EXPORTER": "zipkin"})
    with pytest.raises(ValueError, match="only grpc"):
        configure(
            "test",
            None,
            environ={"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
        )


def test_cli_says_a_bad_exporter_setting_in_one_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from jacfusion_fed.cli import app

    result = CliRunner().invoke(
        app,
        ["predict", "x", "--coordinator", "127.0.0.1:1", "--insecure", "--pseudonyms"],
        env={"OTEL_TRACES_EXPORTER": "zipkin"},
    )
    assert result.exit_code == 2, result.output
    assert "error: OTEL_TRACES_EXPORTER=zipkin: expected otlp, console or none" in result.output


ON = """
import sys
from pathlib import Path
import grpc
from jacfusion_fed.rpc import tracing
from jacfusion_fed.rpc.identity import Principal
from jacfusion_fed.rpc.policies import FUSION_SERVICE, FUSION_SERVICE_POLICY
from jacfusion_fed.rpc.serving import start_server
from jacfusion_fed.rpc.status_details import abort_with_violations
from jacfusion_fed.rpc.tls import INSECURE

assert tracing.configure("test-service", Path(sys.argv[1])) is True


def refuse(request, context):
    abort_with_violations(context, "bad id", [("sample_ids[1]", "not a pseudonym")])


def add(server):
    handler = grpc.unary_unary_rpc_method_handler(refuse)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(FUSION_SERVICE, {"Predict": handler}),)
    )


running = start_server(
    INSECURE, policy=FUSION_SERVICE_POLICY,
    insecure_principal=Principal("requester", "insecure-requester"),
    services=(FUSION_SERVICE,), add_servicers=add, serving=True,
)
with grpc.insecure_channel(running.target) as channel:
    try:
        with tracing.client_call("jacfusion.v1.FusionService/Predict") as metadata:
            channel.unary_unary("/jacfusion.v1.FusionService/Predict")(
                b"", timeout=5, metadata=metadata
            )
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
running.stop(0)
tracing.shutdown()
"""


def test_a_refused_call_is_an_error_span_on_both_sides(tmp_path: Path) -> None:
    import json

    path = tmp_path / "spans.jsonl"
    done = subprocess.run(
        [sys.executable, "-c", ON, str(path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    spans = [
        span
        for line in path.read_text().splitlines()
        for resource in json.loads(line)["resourceSpans"]
        for scope in resource["scopeSpans"]
        for span in scope["spans"]
    ]
    by_kind = {span["kind"]: span for span in spans}
    server, client = by_kind[2], by_kind[3]
    assert server["parentSpanId"] == client["spanId"] and server["traceId"] == client["traceId"]
    for span in (server, client):
        assert span["status"]["code"] == 2, span  # STATUS_CODE_ERROR
        attrs = {a["key"]: a["value"] for a in span["attributes"]}
        assert attrs["rpc.grpc.status_code"] == {"intValue": "3"}  # INVALID_ARGUMENT
    assert len(spans) == 2  # health checks and reflection are not traced
