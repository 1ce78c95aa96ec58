"""The generated gRPC code: reproducible, fresh, importable, and the API follows Buf's style."""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jacfusion_fed.rpc import codegen

PROTO_FILES = ("common.proto", "fusion.proto", "modality.proto")
MODULES = [
    f"jacfusion_fed.rpc.jacfusion.v1.{stem}{suffix}"
    for stem in ("common", "fusion", "modality")
    for suffix in ("_pb2", "_pb2_grpc")
]


def _files(directory: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in sorted(directory.iterdir())
        if p.name.endswith(codegen.GENERATED_SUFFIXES)
    }


def test_proto_files_present() -> None:
    root = codegen.default_proto_root() / "jacfusion" / "v1"
    assert sorted(p.name for p in root.glob("*.proto")) == sorted(PROTO_FILES)


def test_checked_in_code_is_fresh() -> None:
    assert codegen.check() == []


def test_generation_is_byte_identical(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    codegen.generate_into(a)
    codegen.generate_into(b)
    files_a, files_b = _files(a), _files(b)
    assert files_a == files_b
    assert files_a == _files(codegen.default_out_dir())
    assert {n for n in files_a} >= {f"{s}_pb2.py" for s in ("common", "fusion", "modality")}
    assert {n for n in files_a} >= {f"{s}_pb2.pyi" for s in ("common", "fusion", "modality")}
    assert {"fusion_pb2_grpc.pyi", "modality_pb2_grpc.pyi"} <= set(files_a)


def test_generated_imports_are_package_absolute() -> None:
    for name, data in _files(codegen.default_out_dir()).items():
        text = data.decode()
        assert not re.search(r"^\s*(from|import) jacfusion\.v1\b", text, re.M), name
        if "jacfusion_dot_v1" in text or "_common_pb2" in text:
            assert "from jacfusion_fed.rpc.jacfusion.v1 import" in text, name


def _copy_protos(tmp_path: Path) -> Path:
    root = tmp_path / "proto"
    shutil.copytree(codegen.default_proto_root(), root)
    return root


def test_check_detects_modified_proto(tmp_path: Path) -> None:
    root = _copy_protos(tmp_path)
    assert codegen.check(proto_root=root) == []
    path = root / "jacfusion" / "v1" / "modality.proto"
    text = path.read_text()
    path.write_text(
        text.replace("uint32 feature_dim = 5;", "uint32 feature_dim = 5;\n  bool x = 99;")
    )
    problems = codegen.check(proto_root=root)
    assert problems, "a changed proto must make --check fail"
    assert any("modality_pb2.py" in p and "differs" in p for p in problems)

    proc = subprocess.run(
        [sys.executable, "-m", "jacfusion_fed.rpc.codegen", "--check", "--proto-root", str(root)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert "stale" in proc.stderr and "modality_pb2.py" in proc.stderr


def test_check_detects_missing_and_extra_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    codegen.generate_into(out)
    (out / "fusion_pb2.py").unlink()
    (out / "old_pb2.py").write_text("# stale\n")
    problems = codegen.check(out_dir=out)
    assert any(p.startswith("missing:") and "fusion_pb2.py" in p for p in problems)
    assert any(p.startswith("stale:") and "old_pb2.py" in p for p in problems)
    codegen.generate_into(out)
    assert not (out / "old_pb2.py").exists()
    assert codegen.check(out_dir=out) == []


def test_check_cli_passes() -> None:
    assert codegen.main(["--check"]) == 0


@pytest.mark.parametrize("module", MODULES)
def test_generated_modules_import(module: str) -> None:
    mod = importlib.import_module(module)
    assert mod.__name__ == module


def test_descriptors_keep_canonical_names() -> None:
    from jacfusion_fed.rpc.jacfusion.v1 import fusion_pb2, modality_pb2

    assert fusion_pb2.DESCRIPTOR.name == "jacfusion/v1/fusion.proto"
    assert fusion_pb2.DESCRIPTOR.package == "jacfusion.v1"
    assert modality_pb2.DESCRIPTOR.services_by_name["ModalityService"].full_name == (
        "jacfusion.v1.ModalityService"
    )


def test_api_follows_buf_standard_style() -> None:
    """The parts of Buf's STANDARD rules that matter most, checked without buf."""
    from jacfusion_fed.rpc.jacfusion.v1 import common_pb2, fusion_pb2, modality_pb2

    seen_types: set[str] = set()
    for fd in (common_pb2.DESCRIPTOR, fusion_pb2.DESCRIPTOR, modality_pb2.DESCRIPTOR):
        for service in fd.services_by_name.values():
            assert service.name.endswith("Service")
            for m in service.methods:
                assert m.input_type.name == f"{m.name}Request"
                assert m.output_type.name == f"{m.name}Response"
                for t in (m.input_type.full_name, m.output_type.full_name):
                    assert t not in seen_types
                    seen_types.add(t)
        for enum in fd.enum_types_by_name.values():
            prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"
            assert enum.values[0].number == 0
            assert enum.values[0].name == f"{prefix}UNSPECIFIED"
            assert all(v.name.startswith(prefix) for v in enum.values)
        for msg in fd.message_types_by_name.values():
            for field in msg.fields:
                assert re.fullmatch(r"[a-z][a-z0-9_]*", field.name), (msg.name, field.name)


def test_rpc_shapes() -> None:
    from jacfusion_fed.rpc.jacfusion.v1 import fusion_pb2, modality_pb2

    modality = modality_pb2.DESCRIPTOR.services_by_name["ModalityService"].methods_by_name
    assert set(modality) == {
        "GetInfo",
        "GetHead",
        "GetLogits",
        "StreamLogits",
        "PutRecords",
        "DeleteRecords",
    }
    assert modality["StreamLogits"].server_streaming and not modality["GetLogits"].server_streaming
    fusion = fusion_pb2.DESCRIPTOR.services_by_name["FusionService"].methods_by_name
    assert set(fusion) == {"Predict", "PredictStream", "GetModelInfo"}
    assert fusion["PredictStream"].server_streaming
    assert not fusion["PredictStream"].client_streaming
    assert [v.name for v in fusion_pb2.FusionMethod.DESCRIPTOR.values] == [
        "FUSION_METHOD_UNSPECIFIED",
        "FUSION_METHOD_STATISTICAL",
        "FUSION_METHOD_JACOBIAN",
        "FUSION_METHOD_MEAN",
        "FUSION_METHOD_CONFIDENCE_MEAN",
        "FUSION_METHOD_ROBUST",
    ]
    assert modality_pb2.HEAD_KIND_GRAM == 1 and modality_pb2.HEAD_KIND_FULL == 2


def test_buf_lint() -> None:
    buf = codegen.find_buf()
    if buf is None:
        pytest.skip("buf not installed (python -m jacfusion_fed.rpc.codegen --install-buf)")
    proc = subprocess.run(
        [buf, "lint"], cwd=codegen.repo_root(), capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
