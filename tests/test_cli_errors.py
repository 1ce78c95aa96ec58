"""Every CLI mistake is exactly one ``error:`` line on stderr and a non-zero exit, no traceback
(unless ``--log-level debug``), and no gRPC core log lines.

Each case runs the installed entry point (``jacfusion_fed.cli.main``) in a subprocess, as a user
would. The servers it talks to are small in-process gRPC servers: a TLS server with the
coordinator's certificate (for handshake mismatches) and a plain-text FusionService that
answers NOT_FOUND the way the coordinator does (for unknown ids). Nothing here imports torch.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from jacfusion_fed.privacy.certs import DeploymentCerts, generate_deployment_certs
from jacfusion_fed.privacy.pseudonyms import Pseudonymizer, generate_key, write_key
from jacfusion_fed.rpc.jacfusion.v1 import fusion_pb2, fusion_pb2_grpc
from jacfusion_fed.rpc.tls import TlsFiles, server_credentials

CLI = "from jacfusion_fed.cli import main; main()"
# `predict` and `coordinator info` require --coordinator (no hidden default address); the checks
# below all fail before any connection is made, so the address is never dialled.
COORD = ("--coordinator", "127.0.0.1")


@dataclass
class Run:
    code: int
    stdout: str
    stderr: list[str]


def cli(*args: str, cwd: Path | None = None) -> Run:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRPC_")}
    proc = subprocess.run(
        [sys.executable, "-c", CLI, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=cwd,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr.splitlines())


def one_error(run: Run, code: int, *words: str) -> str:
    """The single stderr line, after checking it, the exit code and the key words."""
    assert run.code == code, run
    assert len(run.stderr) == 1, run.stderr
    line = run.stderr[0]
    assert line.startswith("error: "), line
    for word in words:
        assert word in line, (word, line)
    assert "Traceback" not in line
    return line


class _NotFound(fusion_pb2_grpc.FusionServiceServicer):
    """Answers Predict like the coordinator does for ids no owner holds."""

    def Predict(
        self, request: fusion_pb2.PredictRequest, context: grpc.ServicerContext
    ) -> fusion_pb2.PredictResponse:
        ids = list(request.sample_ids)
        context.abort(
            grpc.StatusCode.NOT_FOUND,
            f"{len(ids)} unknown sample id(s), not held by any owner: {', '.join(ids)}",
        )
        raise AssertionError("unreachable")


@dataclass
class World:
    root: Path
    key: Path
    certs: DeploymentCerts
    foreign: DeploymentCerts
    tls_target: str
    plain_target: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("cli-errors")
    key = root / "pseudonym.key"
    write_key(key, generate_key())
    certs = generate_deployment_certs(root / "pki", {"a-co": "audio"}, ["alice"])
    foreign = generate_deployment_certs(root / "pki-foreign", {"a-co": "audio"}, ["alice"])
    tls_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    tls_port = tls_server.add_secure_port(
        "127.0.0.1:0", server_credentials(TlsFiles.from_dir(certs.coordinator_dir))
    )
    plain_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    fusion_pb2_grpc.add_FusionServiceServicer_to_server(_NotFound(), plain_server)
    plain_port = plain_server.add_insecure_port("127.0.0.1:0")
    tls_server.start()
    plain_server.start()
    try:
        yield World(root, key, certs, foreign, f"127.0.0.1:{tls_port}", f"127.0.0.1:{plain_port}")
    finally:
        tls_server.stop(0)
        plain_server.stop(0)


# --- files ---


def test_missing_file(world: World) -> None:
    missing = world.root / "nope.key"
    run = cli("predict", "p-1", "--pseudonym-key", str(missing), "--insecure", *COORD)
    one_error(run, 2, "file not found", str(missing))


def test_unreadable_file(world: World) -> None:
    run = cli("predict", "--ids-file", str(world.root), "--pseudonyms", "--insecure", *COORD)
    one_error(run, 2, str(world.root), "is a directory")


def test_loose_key_permissions(world: World, tmp_path: Path) -> None:
    key = tmp_path / "shared.key"
    write_key(key, generate_key())
    key.chmod(0o644)
    run = cli("predict", "p-1", "--pseudonym-key", str(key), "--insecure", *COORD)
    one_error(run, 2, "0644", f"chmod 600 {key}")


def test_missing_tls_directory(world: World) -> None:
    run = cli("coordinator", "info", "--tls", str(world.root / "no-certs"), *COORD)
    one_error(run, 2, "--tls", "no such directory")


# --- ports ---


def test_input_test_needs_data_and_image_like_records(world: World, tmp_path: Path) -> None:
    owner = [
        *("owner", "serve", "--workspace", str(tmp_path / "ws"), "--modality", "y"),
        *("--pseudonym-key", str(world.key), "--insecure", "--port", "0", "--input-test"),
    ]
    one_error(cli(*owner), 2, "--input-test", "needs --data")
    run = cli(*owner, "--data", "builtin:twomoon?quick=1", "--train-if-missing", "--epochs", "1")
    assert run.code == 2, run
    line = run.stderr[-1]
    assert line.startswith("error: --input-test:") and "(C, H, W) records" in line, run.stderr
    assert "'y' records have shape (1,)" in line, line
    assert "Traceback" not in "\n".join(run.stderr)
    assert not any("accuracy" in ln for ln in run.stderr), "it trained before checking"


def test_port_in_use_is_found_before_training(world: World, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        workspace = tmp_path / "empty-workspace"
        owner = [
            *("owner", "serve", "--workspace", str(workspace), "--modality", "audio"),
            *("--data", "builtin:twomoon", "--pseudonym-key", str(world.key), "--insecure"),
            "--train-if-missing",
        ]
        run = cli(*owner, "--port", str(port))
        one_error(run, 2, f"port {port}", "in use", "--port")
        assert not workspace.exists(), "the owner trained (or opened its workspace) first"
        run = cli(*owner, "--port", "0", "--metrics-port", str(port))
        one_error(run, 2, f"port {port}", "in use", "--metrics-port")
        assert not workspace.exists(), "the owner trained before checking --metrics-port"
        run = cli(
            "coordinator",
            "serve",
            "--registry",
            str(tmp_path / "r"),
            "--owner",
            "a=h:1",
            "--insecure",
            "--port",
            str(port),
        )
        one_error(run, 2, f"port {port}", "in use")


# --- TLS mismatches: the likely cause from local checks ---


def test_plaintext_against_tls(world: World) -> None:
    run = cli("predict", "p-1", "--pseudonyms", "--insecure", "--coordinator", world.tls_target)
    one_error(run, 1, "UNAVAILABLE", "speaks TLS", "--tls")


def test_tls_against_plaintext(world: World) -> None:
    alice = world.certs.requester_dirs["alice"]
    run = cli(
        "predict", "p-1", "--pseudonyms", "--tls", str(alice), "--coordinator", world.plain_target
    )
    one_error(run, 1, "UNAVAILABLE", "plain text", "--insecure")


def test_foreign_ca(world: World) -> None:
    alice = world.foreign.requester_dirs["alice"]
    run = cli("coordinator", "info", "--tls", str(alice), "--coordinator", world.tls_target)
    one_error(run, 1, "UNAVAILABLE", "another CA", "ca.pem")


def test_certificate_from_another_deployment_than_the_ca(world: World, tmp_path: Path) -> None:
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    alice = world.certs.requester_dirs["alice"]
    for name in ("cert.pem", "key.pem"):
        (mixed / name).write_bytes((alice / name).read_bytes())
    (mixed / "key.pem").chmod(0o600)
    (mixed / "ca.pem").write_bytes((world.foreign.requester_dirs["alice"] / "ca.pem").read_bytes())
    run = cli(
        "predict", "p-1", "--pseudonyms", "--tls", str(mixed), "--coordinator", world.tls_target
    )
    one_error(run, 1, "not issued by the CA", "two deployments")


def test_address_of_another_service(world: World) -> None:
    """The requester's certificate against a server holding an owner's certificate."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    owner_dir = world.certs.owner_dirs["a-co"]
    port = server.add_secure_port("127.0.0.1:0", server_credentials(TlsFiles.from_dir(owner_dir)))
    server.start()
    try:
        alice = world.certs.requester_dirs["alice"]
        run = cli("coordinator", "info", "--tls", str(alice), "--coordinator", f"127.0.0.1:{port}")
        one_error(run, 1, "owner 'a-co'", "not the coordinator", "wrong address")
    finally:
        server.stop(0)


def test_no_client_certificate(world: World, tmp_path: Path) -> None:
    only_ca = tmp_path / "only-ca"
    only_ca.mkdir()
    (only_ca / "ca.pem").write_bytes((world.certs.coordinator_dir / "ca.pem").read_bytes())
    run = cli("predict", "p-1", "--pseudonyms", "--tls", str(only_ca), *COORD)
    one_error(run, 2, "TLS file not found", str(only_ca / "cert.pem"))


def test_nothing_listening(world: World) -> None:
    target = f"127.0.0.1:{_free_port()}"
    run = cli("predict", "p-1", "--pseudonyms", "--insecure", "--coordinator", target)
    one_error(run, 1, "UNAVAILABLE", "nothing is listening", target)


# --- unknown ids, named as typed ---


def test_unknown_ids_are_named_as_typed(world: World) -> None:
    run = cli(
        "predict",
        "patient-7",
        "patient-8",
        "--pseudonym-key",
        str(world.key),
        "--insecure",
        "--coordinator",
        world.plain_target,
    )
    line = one_error(run, 1, "NOT_FOUND", "2 unknown", "patient-7, patient-8", "--skip-unknown")
    assert "--pseudonym-key" in line  # the other likely cause: a key of another deployment
    hmac = Pseudonymizer.from_file(world.key)("patient-7")
    assert hmac not in line


# --- bad option values, and the traceback only on request ---


PREDICT = ["predict", "p-1", *COORD]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ([*PREDICT, "--pseudonyms", "--insecure", "--timeout", "soon"], ["--timeout"]),
        ([*PREDICT, "--pseudonyms", "--insecure", "--method", "median"], ["--method"]),
        ([*PREDICT, "--pseudonyms", "--insecure", "--gamma", "2"], ["--gamma", "(0, 1]"]),
        ([*PREDICT, "--pseudonyms", "--log-level", "loud"], ["--log-level", "debug"]),
        ([*PREDICT, "--insecure"], ["--pseudonym-key", "--pseudonyms"]),
        (["predict", "p-1", "--pseudonyms", "--insecure"], ["--coordinator"]),
        (["coordinator", "info", "--insecure"], ["--coordinator"]),
        (["simulate", "--dataset", "mnist"], ["--dataset", "avdigits"]),
        (["evaluate", "--gamma-grid", "0.2,7"], ["--gamma-grid", "'7'"]),
        (["predictt"], ["predict"]),
    ],
)
def test_bad_option_values(args: list[str], words: list[str]) -> None:
    one_error(cli(*args), 2, *words)


def test_traceback_only_with_debug(world: World) -> None:
    missing = str(world.root / "nope.key")
    quiet = cli("predict", "p-1", "--pseudonym-key", missing, "--insecure", *COORD)
    one_error(quiet, 2, "file not found")
    loud = cli(
        "predict", "p-1", "--pseudonym-key", missing, "--insecure", *COORD, "--log-level", "debug"
    )
    assert loud.code == 2
    assert loud.stderr[0].startswith("Traceback") and loud.stderr[-1].startswith("error: ")
