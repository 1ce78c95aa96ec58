"""Server reflection v1 next to v1alpha: a v1 client, compiled here from the v1 proto
(tests/fixtures/reflection_v1) and run in its own process (its descriptors never meet the
server's), lists the services of a running server and fetches the file of FusionService; the
v1alpha client of grpcio-reflection still works on the same server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from jacfusion_fed.rpc.identity import Principal
from jacfusion_fed.rpc.policies import FUSION_SERVICE, FUSION_SERVICE_POLICY
from jacfusion_fed.rpc.serving import start_server
from jacfusion_fed.rpc.tls import INSECURE

FIXTURE = Path(__file__).parent / "fixtures" / "reflection_v1"

CLIENT = """
import json, sys
import grpc
import reflection_pb2 as pb
import reflection_pb2_grpc as pb_grpc
from google.protobuf import descriptor_pb2

stub = pb_grpc.ServerReflectionStub(grpc.insecure_channel(sys.argv[1]))
requests = [
    pb.ServerReflectionRequest(list_services=""),
    pb.ServerReflectionRequest(file_containing_symbol="jacfusion.v1.FusionService"),
    pb.ServerReflectionRequest(file_containing_symbol="no.such.Service"),
]
listed, files, error = None, None, None
for reply in stub.ServerReflectionInfo(iter(requests), timeout=10):
    kind = reply.WhichOneof("message_response")
    if kind == "list_services_response":
        listed = [s.name for s in reply.list_services_response.service]
    elif kind == "file_descriptor_response":
        files = [
            descriptor_pb2.FileDescriptorProto.FromString(raw).name
            for raw in reply.file_descriptor_response.file_descriptor_proto
        ]
    else:
        error = reply.error_response.error_code
print(json.dumps({"services": listed, "files": files, "error": error}))
"""


def _v1_client(tmp_path: Path, target: str) -> dict[str, object]:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{FIXTURE}",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            str(FIXTURE / "reflection.proto"),
        ],
        check=True,
    )
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    done = subprocess.run(
        [sys.executable, str(script), target],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_reflection_v1_lists_services_and_describes_them(tmp_path: Path) -> None:
    from jacfusion_fed.rpc.jacfusion.v1 import fusion_pb2  # noqa: F401  (descriptor in the pool)

    running = start_server(
        INSECURE,
        policy=FUSION_SERVICE_POLICY,
        insecure_principal=Principal("requester", "insecure-requester"),
        services=(FUSION_SERVICE,),
        add_servicers=lambda _server: None,
        serving=True,
    )
    try:
        result = _v1_client(tmp_path, running.target)
        assert set(result["services"]) == {  # type: ignore[arg-type]
            FUSION_SERVICE,
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        }
        assert result["files"] and "jacfusion/v1/fusion.proto" in result["files"]  # type: ignore[operator]
        assert result["error"] == grpc.StatusCode.NOT_FOUND.value[0]
        # the v1alpha client of grpcio-reflection, on the same server
        with grpc.insecure_channel(running.target) as channel:
            alpha = ProtoReflectionDescriptorDatabase(channel)
            assert FUSION_SERVICE in alpha.get_services()
    finally:
        running.stop(0)
