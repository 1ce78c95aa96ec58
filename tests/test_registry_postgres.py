"""Coordinator replicas sharing one PostgreSQL head registry (``coordinator serve --registry
postgresql://...``), as processes started through the CLI against a throwaway cluster.

Replica A registers the owners' heads; replica B, started afterwards with owner addresses
where nothing listens, can only know those heads from the shared registry: it serves A's
registration (same versions, same registration time) and adds nothing to the history."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers_postgres import cluster, fresh_database
from helpers_services import MODALITIES, TIMEOUT, build_fed
from helpers_wait import wait_until

from jacfusion_fed.reliability.postgres import PostgresCluster
from jacfusion_fed.rpc.channels import connect_coordinator
from jacfusion_fed.rpc.jacfusion.v1 import fusion_pb2, fusion_pb2_grpc
from jacfusion_fed.store import HeadRegistry

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresCluster]:
    yield from cluster()


def _info(target: str, tls: object) -> fusion_pb2.GetModelInfoResponse:
    stub = fusion_pb2_grpc.FusionServiceStub(connect_coordinator(target, tls))
    return stub.GetModelInfo(fusion_pb2.GetModelInfoRequest(), timeout=TIMEOUT)


def _heads(info: fusion_pb2.GetModelInfoResponse) -> dict[str, tuple[str, str]]:
    return {m.modality: (m.model_version, m.registered_at.ToJsonString()) for m in info.modalities}


def test_a_registration_by_one_replica_is_served_by_another(
    tmp_path: Path, postgres: PostgresCluster
) -> None:
    fed = build_fed(tmp_path)
    uri = fresh_database(postgres)
    try:
        fed.start_owners()
        fed.start_coordinator("--registry", uri, name="replica-a")
        info_a = fed.wait_registered()
        heads_a = _heads(info_a)
        assert sorted(heads_a) == sorted(MODALITIES)
        port_file = tmp_path / "replica-b.port"
        fed.procs.start(
            "replica-b",
            [
                "coordinator",
                "serve",
                "--registry",
                uri,
                "--tls",
                str(fed.certs.coordinator_dir),
                "--port",
                "0",
                "--port-file",
                str(port_file),
                "--log-level",
                "warning",
                *[a for m in MODALITIES for a in ("--owner", f"{m}=127.0.0.1:9")],
            ],
        )
        replica_b = f"127.0.0.1:{fed.procs.wait_port('replica-b', port_file)}"
        got: list[dict[str, tuple[str, str]]] = [{}]

        def served() -> bool:
            got[0] = _heads(_info(replica_b, fed.requester))
            return got[0] == heads_a

        wait_until(served, lambda: f"replica B to serve {heads_a} (serves {got[0]})", timeout=30)
        registry = HeadRegistry(uri)
        assert {m: len(registry.history(m)) for m in MODALITIES} == dict.fromkeys(MODALITIES, 1)
        registry.close()
    finally:
        fed.procs.stop_all()
