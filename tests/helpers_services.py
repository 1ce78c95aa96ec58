"""Shared helpers of the online-inference tests: data, trained owners, server processes.

Server processes are started through the real CLI (``jacfusion-fed owner serve`` /
``coordinator serve``) on 127.0.0.1, each in its own session, and stopped by PID (SIGTERM,
then SIGKILL) by whoever started them, also when a test fails.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from helpers_wait import wait_until

from jacfusion_fed.bench.deployment import MODALITIES, ServeBenchConfig, make_dataset
from jacfusion_fed.fusion import (
    confidence_mean_fusion,
    jacobian_fusion,
    log_prior_from_counts,
    mean_fusion,
    statistical_fusion,
)
from jacfusion_fed.owner import OwnerWorkspace
from jacfusion_fed.privacy.certs import DeploymentCerts, generate_deployment_certs
from jacfusion_fed.privacy.pseudonyms import Pseudonymizer, generate_key, write_key
from jacfusion_fed.processes import ProcessSet
from jacfusion_fed.rpc.channels import connect_coordinator
from jacfusion_fed.rpc.jacfusion.v1 import fusion_pb2, fusion_pb2_grpc
from jacfusion_fed.rpc.tls import TlsFiles

__all__ = [
    "MODALITIES",
    "NUM_CLASSES",
    "NUM_SAMPLES",
    "OWNER_NAMES",
    "TIMEOUT",
    "Fed",
    "Procs",
    "build_fed",
    "foreign_certs",
    "rpc_error",
]

CLI = "from jacfusion_fed.cli import main; main()"
TIMEOUT = 10.0
OWNER_NAMES = {m: f"{m}-co" for m in MODALITIES}
NUM_CLASSES = 4
NUM_SAMPLES = 240


class Procs(ProcessSet):
    """``jacfusion-fed`` CLI processes of a test module (:class:`ProcessSet`: own sessions,
    logs in ``<logdir>/<name>.log``, stopped by PID)."""

    def __init__(self, logdir: Path) -> None:
        super().__init__(logdir, prefix=(sys.executable, "-c", CLI))


@dataclass
class Fed:
    """A deployment on loopback: certificates, key, data, trained owners, processes."""

    root: Path
    certs: DeploymentCerts
    key: Path
    data: dict[str, Path]
    workspaces: dict[str, OwnerWorkspace]
    procs: Procs
    ids: list[str]
    owner_targets: dict[str, str] = field(default_factory=dict)
    coordinator: str = ""

    @property
    def requester(self) -> TlsFiles:
        return TlsFiles.from_dir(self.certs.requester_dirs["alice"])

    @property
    def coordinator_tls(self) -> TlsFiles:
        return TlsFiles.from_dir(self.certs.coordinator_dir)

    def owner_tls(self, modality: str) -> TlsFiles:
        return TlsFiles.from_dir(self.certs.owner_dirs[OWNER_NAMES[modality]])

    def stub(self, tls: TlsFiles | None = None) -> fusion_pb2_grpc.FusionServiceStub:
        channel = connect_coordinator(self.coordinator, tls or self.requester)
        return fusion_pb2_grpc.FusionServiceStub(channel)

    def owner_args(self, modality: str, *, tls_dir: Path | None = None) -> list[str]:
        return [
            "owner",
            "serve",
            "--workspace",
            str(self.root / f"ws-{modality}"),
            "--modality",
            modality,
            "--data",
            f"npz:{self.data[modality]}",
            "--pseudonym-key",
            str(self.key),
            "--tls",
            str(tls_dir or self.certs.owner_dirs[OWNER_NAMES[modality]]),
            "--port",  # any free port (not the owners' default 50051); a later --port wins
            "0",
            "--log-level",
            "warning",
        ]

    def start_owner(self, modality: str, *, port: int = 0, name: str | None = None) -> str:
        return self.start_owners([modality], port=port, name=name)[modality]

    def start_owners(
        self, modalities: Sequence[str] = MODALITIES, *, port: int = 0, name: str | None = None
    ) -> dict[str, str]:
        """Start owner processes together (their start-ups overlap), then wait for each."""
        if name is not None and len(modalities) != 1:
            raise ValueError("a process name is for one owner only")
        started = {}
        for modality in modalities:
            proc = name or f"owner-{modality}"
            port_file = self.root / f"{proc}.port"
            port_file.unlink(missing_ok=True)
            args = [*self.owner_args(modality), "--port", str(port), "--port-file", str(port_file)]
            self.procs.start(proc, args)
            started[modality] = (proc, port_file)
        for modality, (proc, port_file) in started.items():
            self.owner_targets[modality] = f"127.0.0.1:{self.procs.wait_port(proc, port_file)}"
        return {m: self.owner_targets[m] for m in modalities}

    def start_coordinator(self, *extra: str, name: str = "coordinator") -> str:
        port_file = self.root / f"{name}.port"
        port_file.unlink(missing_ok=True)
        owners = [a for m, t in self.owner_targets.items() for a in ("--owner", f"{m}={t}")]
        self.procs.start(
            name,
            [
                "coordinator",
                "serve",
                "--registry",
                str(self.root / "registry"),
                "--tls",
                str(self.certs.coordinator_dir),
                "--port",
                "0",
                "--port-file",
                str(port_file),
                "--log-level",
                "warning",
                *owners,
                *extra,
            ],
        )
        self.coordinator = f"127.0.0.1:{self.procs.wait_port(name, port_file)}"
        return self.coordinator

    def wait_registered(self, timeout: float = 60.0) -> fusion_pb2.GetModelInfoResponse:
        """Until the coordinator has the current head of every owner."""
        stub = self.stub()
        want = {m: ws.current_version() for m, ws in self.workspaces.items()}
        last: list[object] = ["no answer"]  # what the coordinator said last
        got: list[fusion_pb2.GetModelInfoResponse] = []

        def registered() -> bool:
            try:
                info: fusion_pb2.GetModelInfoResponse = stub.GetModelInfo(
                    fusion_pb2.GetModelInfoRequest(), timeout=TIMEOUT
                )
            except grpc.RpcError as exc:
                last[0] = exc
                return False
            have = {m.modality: m.model_version for m in info.modalities}
            last[0] = have
            got[:] = [info]
            return have == want

        wait_until(
            registered,
            lambda: f"the coordinator to register {want} (last: {last[0]})",
            timeout=timeout,
            interval=0.1,
        )
        return got[0]

    # --- the library, called directly on the same logits ------------------------------------

    def log_prior(self) -> np.ndarray:
        counts = np.sum([ws.class_counts() for ws in self.workspaces.values()], axis=0)
        return log_prior_from_counts(counts)  # the one prior rule (add-one smoothing)

    def reference(
        self,
        ids: list[str],
        method: str = "jacobian",
        *,
        modalities: Sequence[str] = MODALITIES,
        gammas: Sequence[float] | None = None,
        regularize: Sequence[str] | None = None,
        iterations: int = 1,
        center_logits: bool = False,
    ) -> np.ndarray:
        logits = [self.workspaces[m].logits(ids).logits for m in modalities]
        if method == "statistical":
            return statistical_fusion(logits, self.log_prior()).numpy()
        if method == "mean":
            return mean_fusion(logits).numpy()
        if method == "confidence_mean":
            return confidence_mean_fusion(logits).numpy()
        reg = list(modalities) if regularize is None else list(regularize)
        grams = [self.workspaces[m].head().gram if m in reg else None for m in modalities]
        return jacobian_fusion(
            logits,
            grams,
            self.log_prior(),
            gamma=list(gammas) if gammas is not None else 0.5,
            regularize=[j for j, m in enumerate(modalities) if m in reg],
            iterations=iterations,
            center_logits=center_logits,
        ).numpy()


def build_fed(root: Path, *, train: bool = True) -> Fed:
    """Certificates (through ``jacfusion-fed certs``), key, data and trained workspaces."""
    from typer.testing import CliRunner

    from jacfusion_fed.cli import app

    args = ["certs", "--out", str(root / "certs"), "--requester", "alice"]
    for modality, name in OWNER_NAMES.items():
        args += ["--owner", f"{name}={modality}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    certs = _certs_at(root / "certs")
    key = write_key(root / "pseudonym.key", generate_key())
    data = make_dataset(
        root, ServeBenchConfig(samples=NUM_SAMPLES, classes=NUM_CLASSES, features=8)
    )
    pz = Pseudonymizer.from_file(key)
    workspaces = {m: OwnerWorkspace(root / f"ws-{m}", m, f"npz:{data[m]}", pz) for m in MODALITIES}
    if train:
        for ws in workspaces.values():
            ws.train(epochs=2, seed=0)
    ids = pz.many([f"patient-{i:07d}" for i in range(NUM_SAMPLES)])
    if train:  # compute and cache every logit before any server process reads the store
        for ws in workspaces.values():
            ws.logits(ids)
    procs = Procs(root)
    return Fed(root, certs, key, data, workspaces, procs, ids)


def _certs_at(root: Path) -> DeploymentCerts:
    owners = {name: root / "owners" / name for name in OWNER_NAMES.values()}
    return DeploymentCerts(
        root,
        root / "ca",
        root / "coordinator",
        owners,
        {"alice": root / "requesters" / "alice"},
        root / "manifest.json",
    )


def foreign_certs(root: Path) -> DeploymentCerts:
    """A second deployment with its own CA (for wrong-CA tests)."""
    return generate_deployment_certs(root, {"mallory-co": "audio"}, ["mallory"])


def rpc_error(call: object) -> tuple[grpc.StatusCode, str]:
    """Run ``call()``; return the status code and details of the RpcError it raises."""
    try:
        call()  # type: ignore[operator]
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    raise AssertionError("the call succeeded; expected an RpcError")
