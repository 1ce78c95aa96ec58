"""The benchmark deployment shared by ``bench serve``, ``bench load`` and ``bench replicas``:
its settings, the synthetic data, certificates and pseudonym key, the real owner and
coordinator processes (started through the one process manager) and the bare gRPC echo
server that ``bench serve`` measures against.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jacfusion_fed.processes import ProcessSet

__all__ = [
    "CLI_ENTRY",
    "ECHO_METHOD",
    "MODALITIES",
    "BenchSetup",
    "ServeBenchConfig",
    "bench_setup",
    "coordinator_serve_args",
    "make_dataset",
    "modality_names",
    "owner_serve_args",
    "python_procs",
    "serve_echo",
    "start_coordinator",
    "start_deployment",
    "start_owners",
    "wait_serving",
]

ECHO_METHOD = "/jacfusion.bench.Echo/Echo"
MODALITIES = ("audio", "image")


def modality_names(owners: int) -> tuple[str, ...]:
    """The modalities of a benchmark deployment of ``owners`` owners (one site each):
    :data:`MODALITIES`, then synthetic ones (``synth3``, ``synth4``, ...)."""
    if owners < 1:
        raise ValueError(f"owners must be at least 1, got {owners}")
    extra = tuple(f"synth{j + 1}" for j in range(len(MODALITIES), owners))
    return (MODALITIES + extra)[:owners]


CLI_ENTRY = "from jacfusion_fed.cli import main; main()"


@dataclass(frozen=True)
class ServeBenchConfig:
    samples: int = 4096
    classes: int = 10
    features: int = 32
    batch: int = 1024
    latency_requests: int = 2000
    duration_s: float = 8.0
    clients: int = 2
    method: str = "jacobian"
    uncached: bool = True
    epochs: int = 3
    seed: int = 0
    block: int = 100
    owners: int = 2


# --- echo server -------------------------------------------------------------------------------


def serve_echo(tls_dir: Path, port_file: Path | None = None, max_workers: int = 16) -> None:
    """Serve ``/jacfusion.bench.Echo/Echo`` with the coordinator's server settings until
    SIGTERM/SIGINT (the services' one stop: :func:`jacfusion_fed.rpc.serving.serve_until_signal`,
    port file written once the signals are handled, exit within a second)."""
    import grpc

    from jacfusion_fed.privacy.certs import ROLES
    from jacfusion_fed.rpc.auth import AuthInterceptor, RpcPolicy
    from jacfusion_fed.rpc.serving import serve_until_signal, write_port_file
    from jacfusion_fed.rpc.tls import TlsFiles, create_server

    policy = RpcPolicy.of({"/jacfusion.bench.Echo/*": set(ROLES)})
    server, port = create_server(
        TlsFiles.from_dir(tls_dir), max_workers=max_workers, interceptors=[AuthInterceptor(policy)]
    )
    handler = grpc.method_handlers_generic_handler(
        "jacfusion.bench.Echo",
        {"Echo": grpc.unary_unary_rpc_method_handler(lambda request, context: request)},
    )
    server.add_generic_rpc_handlers((handler,))
    server.start()

    def stop(grace: float) -> None:
        server.stop(grace).wait()
        if port_file is not None:
            port_file.unlink(missing_ok=True)

    serve_until_signal(
        stop,
        "echo server",
        ready=lambda: write_port_file(port_file, port),
    )


# --- processes ---------------------------------------------------------------------------------


def python_procs(logdir: Path) -> ProcessSet:
    """Python child processes (``python ARGS``) of the benchmarks, stopped by PID."""
    return ProcessSet(logdir, prefix=(sys.executable,))


def wait_serving(channel: Any, timeout: float = 180.0) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
            last = status
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"not SERVING after {timeout} s (last: {last})")


# --- data ------------------------------------------------------------------------------------


def make_dataset(out_dir: Path, cfg: ServeBenchConfig) -> dict[str, Path]:
    """One ``.npz`` per modality (``cfg.owners`` of them, :func:`modality_names`) of a
    synthetic K-class dataset with shared patient ids."""
    rng = np.random.default_rng(cfg.seed)
    n = cfg.samples
    labels = rng.integers(0, cfg.classes, n)
    ids = np.array([f"patient-{i:07d}" for i in range(n)])
    n_train = max(n // 2, cfg.classes)
    splits = {"train": slice(0, n_train), "test": slice(n_train, n)}
    paths = {}
    for j, modality in enumerate(modality_names(cfg.owners)):
        means = rng.normal(0.0, 1.0, (cfg.classes, cfg.features))
        noise = 1.5 + (j if j < len(MODALITIES) else j % 2)
        x = means[labels] + rng.normal(0.0, noise, (n, cfg.features))
        arrays: dict[str, np.ndarray] = {}
        for split, sl in splits.items():
            arrays[f"x_{split}"] = x[sl].astype(np.float32)
            arrays[f"y_{split}"] = labels[sl]
            arrays[f"ids_{split}"] = ids[sl]
        path = out_dir / f"{modality}.npz"
        np.savez(path, **arrays)  # type: ignore[arg-type]
        paths[modality] = path
    return paths


@dataclass
class BenchSetup:
    """What every loopback benchmark deployment needs before its processes start."""

    root: Path
    certs: Any  # jacfusion_fed.privacy.certs.DeploymentCerts
    key_path: Path
    data: dict[str, Path]
    ids: list[str]
    requester: Any  # jacfusion_fed.rpc.tls.TlsFiles


@contextlib.contextmanager
def bench_setup(
    workdir: Path | None,
    data_cfg: ServeBenchConfig,
    requester: str,
    progress: Callable[[str], None],
) -> Iterator[BenchSetup]:
    """Certificates (two owners, the coordinator, ``requester``), a pseudonym key, the synthetic
    owners' data and the requester's pseudonymous ids, in ``workdir`` (a temporary folder,
    removed afterwards, when None)."""
    from jacfusion_fed.privacy.certs import generate_deployment_certs
    from jacfusion_fed.privacy.pseudonyms import Pseudonymizer, generate_key, write_key
    from jacfusion_fed.rpc.tls import TlsFiles

    with contextlib.ExitStack() as stack:
        if workdir is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="jacfusion-bench-")))
        else:
            root = Path(workdir)
            root.mkdir(parents=True, exist_ok=True)
        progress("certificates, pseudonym key and data")
        certs = generate_deployment_certs(
            root / "certs", {f"{m}-co": m for m in modality_names(data_cfg.owners)}, [requester]
        )
        key_path = root / "pseudonym.key"
        if not key_path.exists():
            write_key(key_path, generate_key())
        data = make_dataset(root, data_cfg)
        ids = Pseudonymizer.from_file(key_path).many(
            [f"patient-{i:07d}" for i in range(data_cfg.samples)]
        )
        requester_tls = TlsFiles.from_dir(certs.requester_dirs[requester])
        try:
            yield BenchSetup(root, certs, key_path, data, ids, requester_tls)
        except BaseException:
            if workdir is None:  # the folder goes: keep the servers' logs for the diagnosis
                kept = keep_logs(root)
                if kept is not None:
                    progress(f"failed; the servers' logs are kept in {kept}")
            raise


def keep_logs(root: Path) -> Path | None:
    """Copy the ``*.log`` files under ``root`` (the servers' logs, nothing else: no keys, no
    certificates) to a new folder in the system's temporary folder; None when there are none."""
    import shutil

    logs = sorted(root.rglob("*.log"))
    if not logs:
        return None
    out = Path(tempfile.mkdtemp(prefix="jacfusion-bench-logs-"))
    for path in logs:
        dest = out / path.relative_to(root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest)
    return out


def owner_serve_args(
    workspace: Path,
    modality: str,
    data: Path,
    key: Path,
    tls_dir: Path,
    port_file: Path,
    *,
    epochs: int,
) -> list[str]:
    """``python`` arguments of one benchmark owner: ``owner serve`` on loopback, any free
    port (written to ``port_file``), training ``epochs`` epochs when the workspace is new."""
    return [
        "-c",
        CLI_ENTRY,
        "owner",
        "serve",
        "--workspace",
        str(workspace),
        "--modality",
        modality,
        "--data",
        f"npz:{data}",
        "--pseudonym-key",
        str(key),
        "--host",
        "127.0.0.1",
        "--tls",
        str(tls_dir),
        "--port",
        "0",
        "--port-file",
        str(port_file),
        "--train-if-missing",
        "--epochs",
        str(epochs),
        "--log-level",
        "warning",
    ]


def coordinator_serve_args(
    registry: Path, tls_dir: Path, port_file: Path, owners: dict[str, str]
) -> list[str]:
    """``python`` arguments of a benchmark coordinator on loopback (any free port)."""
    return [
        "-c",
        CLI_ENTRY,
        "coordinator",
        "serve",
        "--registry",
        str(registry),
        "--tls",
        str(tls_dir),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--port-file",
        str(port_file),
        "--log-level",
        "warning",
        *[a for m, t in owners.items() for a in ("--owner", f"{m}={t}")],
    ]


@contextlib.contextmanager
def start_owners(
    procs: ProcessSet,
    root: Path,
    certs: Any,
    data: dict[str, Path],
    key: Path,
    tag: str,
    *,
    cached: bool,
) -> Iterator[dict[str, str]]:
    """Start one owner per modality of ``data`` (in parallel); yield modality -> target; stop
    them."""
    names = []
    try:
        for modality in data:
            name = f"{tag}-owner-{modality}"
            port_file = root / f"{name}.port"
            args = owner_serve_args(
                root / f"ws-{modality}",
                modality,
                data[modality],
                key,
                certs.owner_dirs[f"{modality}-co"],
                port_file,
                epochs=3,
            )
            if not cached:
                args.append("--no-logit-cache")
            procs.start_serving(name, args, port_file)
            names.append((name, port_file))
        yield {
            modality: f"127.0.0.1:{procs.wait_port(name, port_file)}"
            for (name, port_file), modality in zip(names, data, strict=True)
        }
    finally:
        for name, _ in names:
            procs.stop(name)


@contextlib.contextmanager
def start_coordinator(
    procs: ProcessSet, root: Path, certs: Any, tag: str, owner_targets: dict[str, str]
) -> Iterator[str]:
    """Start a coordinator of ``owner_targets`` (modality -> target); yield its target; stop
    it."""
    coord = f"{tag}-coordinator"
    coord_port = root / f"{coord}.port"
    procs.start_serving(
        coord,
        coordinator_serve_args(
            root / f"registry-{tag}", certs.coordinator_dir, coord_port, owner_targets
        ),
        coord_port,
    )
    try:
        yield f"127.0.0.1:{procs.wait_port(coord, coord_port)}"
    finally:
        procs.stop(coord)


@contextlib.contextmanager
def start_deployment(
    procs: ProcessSet,
    root: Path,
    certs: Any,
    data: dict[str, Path],
    key: Path,
    tag: str,
    *,
    cached: bool,
) -> Iterator[dict[str, Any]]:
    """Start one owner per modality of ``data`` and a coordinator; yield their targets; stop
    them."""
    with (
        start_owners(procs, root, certs, data, key, tag, cached=cached) as owner_targets,
        start_coordinator(procs, root, certs, tag, owner_targets) as coordinator,
    ):
        yield {"owners": owner_targets, "coordinator": coordinator}
