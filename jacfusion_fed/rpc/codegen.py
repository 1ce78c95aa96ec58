"""Regenerate, check and lint the gRPC API code from ``proto/``.

Usage::

    python -m jacfusion_fed.rpc.codegen            # regenerate jacfusion_fed/rpc/jacfusion/v1/
    python -m jacfusion_fed.rpc.codegen --check    # exit 1 with a diff summary if stale
    python -m jacfusion_fed.rpc.codegen --lint     # buf lint (STANDARD rules, see buf.yaml)
    python -m jacfusion_fed.rpc.codegen --install-buf   # npm install buf into .tools/

Generation runs ``grpc_tools.protoc`` (``--python_out``, ``--grpc_python_out``) with the
mypy-protobuf plugins (``--mypy_out``, ``--mypy_grpc_out``) for type stubs, with ``-I proto``
so that descriptors keep their canonical file names (``jacfusion/v1/fusion.proto``), then
rewrites the generated imports ``from jacfusion.v1 import ...`` to
``from jacfusion_fed.rpc.jacfusion.v1 import ...``. The output depends only on the ``.proto``
files and the pinned tool versions (grpcio-tools, mypy-protobuf), so a rerun is byte-identical.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

__all__ = [
    "BUF_VERSION",
    "GENERATED_SUFFIXES",
    "check",
    "default_out_dir",
    "default_proto_root",
    "find_buf",
    "generate",
    "generate_into",
    "install_buf",
    "lint",
    "main",
    "repo_root",
    "tool_versions",
]

#: The buf release installed by ``--install-buf`` (npm package ``@bufbuild/buf``).
BUF_VERSION = "1.75.0"

#: Suffixes of the files this module owns in the output directory.
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")

_PROTO_PACKAGE_DIR = Path("jacfusion") / "v1"
_PYTHON_PACKAGE = "jacfusion_fed.rpc.jacfusion.v1"
_IMPORT_RE = re.compile(r"^(\s*)from jacfusion\.v1 import ", re.MULTILINE)
_BAD_IMPORT_RE = re.compile(r"^\s*(?:import jacfusion\b|from jacfusion\b(?!_fed))", re.MULTILINE)


def repo_root() -> Path:
    """The repository root (two levels above this package)."""
    return Path(__file__).resolve().parents[2]


def default_proto_root() -> Path:
    """``<repo>/proto``: the ``-I`` root of the API's ``.proto`` files."""
    return repo_root() / "proto"


def default_out_dir() -> Path:
    """``<repo>/jacfusion_fed/rpc/jacfusion/v1``: where the generated modules live."""
    return Path(__file__).resolve().parent / _PROTO_PACKAGE_DIR


def _proto_files(proto_root: Path) -> list[Path]:
    files = sorted((proto_root / _PROTO_PACKAGE_DIR).glob("*.proto"))
    if not files:
        raise FileNotFoundError(f"no .proto files under {proto_root / _PROTO_PACKAGE_DIR}")
    return files


def _plugin(name: str) -> str:
    """Path of a protoc plugin executable installed next to the running interpreter."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(
            f"protoc plugin {name!r} not found; install the dev extras (mypy-protobuf)"
        )
    return found


def _fix_imports(text: str, name: str) -> str:
    text = _IMPORT_RE.sub(rf"\1from {_PYTHON_PACKAGE} import ", text)
    bad = _BAD_IMPORT_RE.search(text)
    if bad is not None:
        raise RuntimeError(f"{name}: unexpected import left after rewriting: {bad.group(0)!r}")
    return text.replace("\r\n", "\n")


def generate_into(out_dir: Path, proto_root: Path | None = None) -> list[Path]:
    """Generate the Python modules and stubs into ``out_dir`` (created if missing).

    Only files with one of :data:`GENERATED_SUFFIXES` are written; stale ones of that kind in
    ``out_dir`` are removed, other files (``__init__.py``) are left alone. Returns the written
    paths, sorted.
    """
    import grpc_tools

    proto_root = (proto_root or default_proto_root()).resolve()
    protos = _proto_files(proto_root)
    wkt = Path(grpc_tools.__file__).resolve().parent / "_proto"
    with tempfile.TemporaryDirectory(prefix="jacfusion-codegen-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{proto_root}",
            f"-I{wkt}",
            f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
            f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--mypy_out={tmp}",
            f"--mypy_grpc_out={tmp}",
            *(p.relative_to(proto_root).as_posix() for p in protos),
        ]
        proc = subprocess.run(cmd, cwd=proto_root, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"protoc failed ({proc.returncode}):\n{proc.stderr}")
        produced = sorted(
            p
            for p in (Path(tmp) / _PROTO_PACKAGE_DIR).iterdir()
            if p.name.endswith(GENERATED_SUFFIXES)
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        names = {p.name for p in produced}
        for old in out_dir.iterdir():
            if old.name.endswith(GENERATED_SUFFIXES) and old.name not in names:
                old.unlink()
        for src in produced:
            text = _fix_imports(src.read_text(encoding="utf-8"), src.name)
            dest = out_dir / src.name
            data = text.encode("utf-8")
            if not dest.exists() or dest.read_bytes() != data:
                dest.write_bytes(data)
            written.append(dest)
    return written


def generate(proto_root: Path | None = None, out_dir: Path | None = None) -> list[Path]:
    """Regenerate the checked-in code (default: ``jacfusion_fed/rpc/jacfusion/v1``)."""
    return generate_into(out_dir or default_out_dir(), proto_root)


def _generated_files(directory: Path) -> dict[str, bytes]:
    if not directory.is_dir():
        return {}
    return {
        p.name: p.read_bytes()
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name.endswith(GENERATED_SUFFIXES)
    }


def check(
    proto_root: Path | None = None, out_dir: Path | None = None, max_diff_lines: int = 40
) -> list[str]:
    """Compare the checked-in code with a fresh generation; return problems (empty if fresh).

    Each problem is one human-readable line block: a missing, extra or differing file, the
    latter with the start of a unified diff.
    """
    out_dir = out_dir or default_out_dir()
    with tempfile.TemporaryDirectory(prefix="jacfusion-codegen-check-") as tmp:
        generate_into(Path(tmp), proto_root)
        fresh = _generated_files(Path(tmp))
    current = _generated_files(out_dir)
    problems: list[str] = []
    for name in sorted(fresh.keys() - current.keys()):
        problems.append(f"missing: {out_dir / name} (not generated yet)")
    for name in sorted(current.keys() - fresh.keys()):
        problems.append(f"stale: {out_dir / name} (no longer generated)")
    for name in sorted(fresh.keys() & current.keys()):
        if fresh[name] == current[name]:
            continue
        diff = list(
            difflib.unified_diff(
                current[name].decode("utf-8", "replace").splitlines(),
                fresh[name].decode("utf-8", "replace").splitlines(),
                fromfile=f"checked-in/{name}",
                tofile=f"regenerated/{name}",
                lineterm="",
                n=1,
            )
        )
        shown = diff[:max_diff_lines]
        if len(diff) > max_diff_lines:
            shown.append(f"... ({len(diff) - max_diff_lines} more diff lines)")
        problems.append(f"differs: {out_dir / name}\n" + "\n".join(shown))
    return problems


def tool_versions() -> str:
    """Versions of the code generators, which the output depends on."""
    parts = []
    for dist in ("grpcio-tools", "mypy-protobuf", "protobuf"):
        try:
            parts.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            parts.append(f"{dist} missing")
    return ", ".join(parts)


def find_buf() -> str | None:
    """The ``buf`` executable: ``$BUF``, ``<repo>/.tools/node_modules/.bin/buf``, or PATH."""
    env = os.environ.get("BUF")
    if env:
        return env
    local = repo_root() / ".tools" / "node_modules" / ".bin" / "buf"
    if local.exists():
        return str(local)
    return shutil.which("buf")


def install_buf(version: str = BUF_VERSION) -> int:
    """``npm install --prefix <repo>/.tools @bufbuild/buf@<version>``; returns npm's status.

    The npm package pulls the platform binary (``@bufbuild/buf-linux-x64`` etc.) from the npm
    registry as an optional dependency, so no other download is needed.
    """
    npm = shutil.which("npm")
    if npm is None:
        print("npm not found; install Node.js/npm or put buf on PATH", file=sys.stderr)
        return 2
    tools = repo_root() / ".tools"
    cmd = [npm, "install", "--no-audit", "--no-fund", "--prefix", str(tools)]
    return subprocess.call([*cmd, f"@bufbuild/buf@{version}"])


def lint() -> int:
    """Run ``buf lint`` at the repository root (buf.yaml: module ``proto``, STANDARD rules)."""
    buf = find_buf()
    if buf is None:
        print(
            "buf not found: run `python -m jacfusion_fed.rpc.codegen --install-buf` "
            "(npm install into .tools/) or set $BUF",
            file=sys.stderr,
        )
        return 2
    status = subprocess.call([buf, "lint"], cwd=repo_root())
    if status == 0:
        print("buf lint: OK")
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m jacfusion_fed.rpc.codegen", description=__doc__.split("\n")[0]
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="fail if the checked-in code is stale")
    mode.add_argument("--lint", action="store_true", help="run buf lint on proto/")
    mode.add_argument("--install-buf", action="store_true", help="npm install buf into .tools/")
    parser.add_argument("--proto-root", type=Path, default=None, help="-I root (default proto/)")
    parser.add_argument("--out", type=Path, default=None, help="output dir (default: in package)")
    args = parser.parse_args(argv)
    if args.lint:
        return lint()
    if args.install_buf:
        return install_buf()
    if args.check:
        problems = check(args.proto_root, args.out)
        if problems:
            print(
                "generated gRPC code is stale; run `make proto` "
                f"(this environment: {tool_versions()}):",
                file=sys.stderr,
            )
            for problem in problems:
                print(problem, file=sys.stderr)
            return 1
        print("generated gRPC code is up to date")
        return 0
    written = generate(args.proto_root, args.out)
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
