"""The jacfusion Flower app deployed for real on 127.0.0.1: a SuperLink (the coordinator's
side) with TLS and SuperNode authentication, two SuperNodes (one owner each, certificates and
keys from `generate_deployment_certs`, what ``jacfusion-fed certs`` writes), the app submitted
with ``flwr run`` from the repository root (the FAB is only ``pyproject.toml``; the code comes
from the installed package); the owners train and answer logit queries, the coordinator fuses;
a SuperNode with an unregistered key is refused. Every process is stopped by PID."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(FIXTURES))

import fed_procs  # noqa: E402

from jacfusion_fed.federation import LocalDeployment, NodeKeys, TlsFiles, read_run_results  # noqa: E402
from jacfusion_fed.federation.scenario import requester_splits, write_eval_labels  # noqa: E402
from jacfusion_fed.privacy import (  # noqa: E402
    Pseudonymizer,
    generate_deployment_certs,
    generate_key,
    generate_supernode_auth_keys,
    write_key,
)
from jacfusion_fed.store import HeadRegistry  # noqa: E402

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")

REPO = Path(__file__).resolve().parents[1]
DATA = "builtin:twomoon?quick=1&seed=0"
OWNERS = {"x-owner": "x", "y-owner": "y"}


@pytest.mark.e2e
@pytest.mark.slow
def test_deployment_tls_node_auth_train_query(tmp_path: Path) -> None:
    t_start = time.perf_counter()
    pki = generate_deployment_certs(tmp_path / "pki", OWNERS, ["hospital"])
    coord = pki.coordinator_dir
    tls = TlsFiles(coord / "ca.pem", coord / "cert.pem", coord / "key.pem")
    keys = {
        name: NodeKeys(d / "supernode_auth.key", d / "supernode_auth.pub")
        for name, d in pki.owner_dirs.items()
    }
    rogue_pair = generate_supernode_auth_keys()
    (tmp_path / "rogue.key").write_bytes(rogue_pair.private_openssh)
    (tmp_path / "rogue.key").chmod(0o600)
    (tmp_path / "rogue.pub").write_bytes(rogue_pair.public_openssh)
    rogue_keys = NodeKeys(tmp_path / "rogue.key", tmp_path / "rogue.pub")

    # the owners' and the requester's shared pseudonym key; the coordinator never gets it
    key_file = tmp_path / "owners-secret" / "pseudonym.key"
    key_file.parent.mkdir(mode=0o700)
    write_key(key_file, generate_key())
    labels_file = write_eval_labels(
        tmp_path / "hospital" / "eval-labels.json",
        Pseudonymizer.from_file(key_file),
        requester_splits(DATA, "x"),
    )
    results_dir = tmp_path / "coordinator"
    run_config = {
        "run-dir": str(results_dir),
        "labels-file": str(labels_file),
        "dataset": "twomoon",
        "epochs": 10,
        "lr": 0.01,
        "perturbed": "y",
        "columns": "clean; gaussian w0=0.5; fgsm w4=0.1",
    }

    with LocalDeployment(tmp_path / "deploy", tls=tls) as dep:
        superlink = dep.start_superlink()
        assert "--enable-supernode-auth" in superlink.argv
        nodes = {
            name: dep.start_supernode(
                name,
                {
                    "owner": name,
                    "modality": modality,
                    "data": DATA,
                    "workdir": str(tmp_path / "nodes" / name),
                    "key-file": str(key_file),
                },
                keys=keys[name],
                wait=False,
            )
            for name, modality in OWNERS.items()
        }
        rogue = dep.start_supernode(
            "rogue",
            {
                "owner": "rogue",
                "modality": "y",
                "data": DATA,
                "workdir": str(tmp_path / "r"),
                "key-file": str(key_file),
            },
            keys=rogue_keys,
            register=False,
            wait=False,
        )
        dep.wait_online([h.node_id for h in nodes.values()], timeout=120)  # type: ignore[misc]
        t_run = time.perf_counter()
        info = dep.run_app(REPO, run_config, timeout=420)
        run_wall = time.perf_counter() - t_run
        assert info.completed, info
        tree = fed_procs.descendants(os.getpid()) - {os.getpid()}
        sockets = fed_procs.tcp_sockets(tree)
        rogue_rc = rogue.process.wait(60)
        superlink_log = superlink.log_text()
        statuses = dep.list_supernodes()
        supernode_logs = {n: h.process.log_text() for n, h in nodes.items()}

    # --- every process stopped; loopback only
    assert fed_procs.alive(tree) == []
    assert fed_procs.non_loopback(sockets) == []

    # --- unregistered SuperNode refused
    assert rogue_rc not in (None, 0), rogue.process.log_text()
    assert "No SuperNode found with the given public key" in superlink_log
    assert sorted(statuses) == sorted(h.node_id for h in nodes.values())

    # --- owners trained (node configs reached them), heads registered, logits gathered, fused
    res = read_run_results(results_dir)
    assert res["status"] == "completed", res.get("error")
    assert sorted(o["owner"] for o in res["owners"]) == sorted(OWNERS)
    registry = HeadRegistry(results_dir / "registry")
    for name, modality in OWNERS.items():
        head = res["heads"][modality]
        assert head["owner"] == name and head["head_kind"] == "gram"
        assert registry.get(modality).model_version == head["version"]
        # the query (a fresh ClientApp process) was answered from the trained model's store
        assert (
            tmp_path / "nodes" / name / "store" / "models" / f"{head['version']}.model"
        ).exists()
    table = res["evaluation"]["table"]
    assert [c["key"] for c in table["columns"]] == ["clean", "w0", "fgsm"]
    stat_w = table["rows"][-1]
    assert stat_w["name"].startswith("Stat-w/") and stat_w["acc"]["clean"][0] > 0.6
    assert res["privacy"]["round_trips"] == 3  # describe, train, one query for all settings
    assert "pseudonym.key" not in str(res["run_config"])
    for log in supernode_logs.values():
        assert "Traceback" not in log

    print(
        f"\n[deploy apps] total {time.perf_counter() - t_start:.1f} s; flwr run -> completed "
        f"{run_wall:.1f} s; coordinator timings "
        + ", ".join(f"{k} {v:.1f}" for k, v in res["timings"].items())
    )
