"""Deployment end to end with real processes on 127.0.0.1: a SuperLink with TLS and
SuperNode authentication, two registered SuperNodes (one modality each, via
``--node-config``), the fixture app submitted with ``flwr run``, train + query messages,
results back through ``run-dir``; a SuperNode with an unregistered key is refused; every
process is stopped by PID at the end."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_APP = FIXTURES / "fedapp"
sys.path[:0] = [str(FIXTURES), str(FIXTURE_APP)]

import fed_certs  # noqa: E402
import fed_procs  # noqa: E402
from helpers_wait import wait_until  # noqa: E402
from jf_fedapp_fixture import apps as fx  # noqa: E402

from jacfusion_fed.federation import (  # noqa: E402
    DeploymentError,
    FlwrCliError,
    LocalDeployment,
    NodeKeys,
    TlsFiles,
    read_run_results,
)

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")

K = 4  # the app's default is 3: width-4 logits prove `flwr run -c` reached the ClientApps
MODALITIES = ("audio", "video")


@pytest.mark.e2e
def test_deployment_tls_node_auth_round_trip(tmp_path: Path) -> None:
    t_start = time.perf_counter()
    pki = tmp_path / "pki"
    tls = TlsFiles(**fed_certs.make_tls_files(pki))
    keys = {m: NodeKeys(*fed_certs.make_node_auth_keys(pki, f"node-{m}")) for m in MODALITIES}
    rogue_keys = NodeKeys(*fed_certs.make_node_auth_keys(pki, "rogue"))
    results_dir = tmp_path / "results"
    run_config = {"run-dir": str(results_dir), "num-classes": K}

    with LocalDeployment(tmp_path / "deploy", tls=tls) as dep:
        superlink = dep.start_superlink()
        assert "--enable-supernode-auth" in superlink.argv
        assert "--disable-runtime-dependency-installation" in superlink.argv
        nodes = {
            m: dep.start_supernode(
                m,
                {"modality": m, "state-dir": str(tmp_path / f"state-{m}")},
                keys=keys[m],
                wait=(m == MODALITIES[0]),  # one waits for its port; wait_online covers both
            )
            for m in MODALITIES
        }
        node_of = {h.node_id: m for m, h in nodes.items()}  # known at registration time
        assert None not in node_of and len(node_of) == 2
        rogue = dep.start_supernode(
            "rogue",
            {"modality": "audio", "state-dir": str(tmp_path / "state-rogue")},
            keys=rogue_keys,
            register=False,
            wait=False,
        )
        dep.wait_online(list(node_of), timeout=90)

        t_run = time.perf_counter()
        info = dep.run_app(FIXTURE_APP, run_config, timeout=300)
        run_wall = time.perf_counter() - t_run
        assert info.completed, info

        # the processes we started (SuperLink, SuperNodes, their SuperExecs) while up
        tree = fed_procs.descendants(os.getpid()) - {os.getpid()}
        sockets = fed_procs.tcp_sockets(tree)
        rogue_rc = rogue.process.wait(60)
        statuses = dep.list_supernodes()
        superlink_log = superlink.log_text()
        pids = [p.pid for p in dep.processes()]

    # --- every process stopped, by PID, with everything it spawned
    assert fed_procs.alive(tree) == []
    # nothing left in their process groups either (spawned after the snapshot)
    assert fed_procs.alive(fed_procs.pids_in_groups(set(pids)), timeout=0) == []

    # --- loopback only
    assert any(s.state == "LISTEN" and s.local[1] == dep.superlink_port for s in sockets)
    assert fed_procs.non_loopback(sockets) == []

    # --- unregistered key refused
    assert rogue_rc not in (None, 0), rogue.process.log_text()
    assert "Failed to activate SuperNode" in rogue.process.log_text()
    assert "No SuperNode found with the given public key" in superlink_log
    assert sorted(statuses) == sorted(node_of)
    assert set(statuses.values()) == {"online"}

    # --- results came back from the ServerApp through run-dir
    res = read_run_results(results_dir)
    assert res["run_config"]["num-classes"] == K
    assert sorted(int(n) for n in res["nodes"]) == sorted(node_of)
    for node_id, node in res["nodes"].items():
        modality = node_of[int(node_id)]
        assert node["modality"] == modality  # --node-config reached that node's ClientApp
        w, _ = fx.make_head(modality, 1, K)
        np.testing.assert_allclose(node["gram"], w @ w.T)
        np.testing.assert_allclose(
            node["logits"], fx.expected_logits(modality, 1, fx.SAMPLE_IDS, K), rtol=1e-6
        )
        assert node["train_version"] == node["query_version"]
        # a fresh ClientApp process per message: state lives on node-local disk
        assert node["train_pid"] != node["query_pid"]
    leaky, boom = res["probe"]["leaky"], res["probe"]["boom"]
    assert leaky["error"]["code_name"] == "REPLY_NOT_ALLOWED"
    assert "'features'" in leaky["error"]["reason"]
    assert boom["error"]["code_name"] == "CLIENT_APP_RAISED_EXCEPTION"
    assert f"boom from {node_of[boom['node']]}" in boom["error"]["reason"]

    t = res["timings"]
    print(
        f"\n[deploy] total {time.perf_counter() - t_start:.1f} s; superlink start "
        f"{dep.timings['superlink_start_s']:.1f} s; supernodes online "
        f"{dep.timings['supernodes_online_s']:.1f} s; flwr run -> completed {run_wall:.1f} s "
        f"(run elapsed {info.elapsed_s:.1f} s); round trips: train "
        f"{t['train_round_trip_s']:.1f} s, query {t['query_round_trip_s']:.1f} s, probe "
        f"{t['probe_round_trip_s']:.1f} s"
    )


def test_deployment_refuses_bad_setups(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    tls = TlsFiles(**fed_certs.make_tls_files(pki))
    with pytest.raises(ValueError, match="TLS files are required"):
        LocalDeployment(tmp_path / "d0")
    with pytest.raises(ValueError, match="needs TLS"):
        LocalDeployment(tmp_path / "d1", insecure=True)
    with pytest.raises(FileNotFoundError):
        TlsFiles(pki / "ca.crt", pki / "server.pem", pki / "missing.key")

    legacy = tmp_path / "legacy-app"
    legacy.mkdir()
    (legacy / "pyproject.toml").write_text("[tool.flwr.federations]\ndefault = 'x'\n")
    with LocalDeployment(tmp_path / "d2", tls=tls) as dep:
        with pytest.raises(DeploymentError, match="start the SuperLink first"):
            dep.start_supernode("n", {}, keys=None)
        with pytest.raises(DeploymentError, match=r"flwr run` would rewrite"):
            dep.submit_run(legacy)
        assert dep.processes() == []
    assert "default = 'x'" in (legacy / "pyproject.toml").read_text()


@pytest.mark.e2e
def test_deployment_close_stops_a_running_serverapp(tmp_path: Path) -> None:
    """Closing mid-run (e.g. a failing test) stops the ServerApp too, although Flower's
    SuperLink runs its SuperExec (and so the ServerApp) in a session of its own."""
    tls = TlsFiles(**fed_certs.make_tls_files(tmp_path / "pki"))
    with LocalDeployment(tmp_path / "deploy", tls=tls) as dep:
        dep.start_superlink()
        # run config keys must be declared in the app's [tool.flwr.app.config]
        with pytest.raises(FlwrCliError, match="Invalid run configuration"):
            dep.submit_run(FIXTURE_APP, {"undeclared-key": 1})
        # no SuperNode will come: the ServerApp sits in wait_for_nodes
        run_id = dep.submit_run(
            FIXTURE_APP, {"run-dir": str(tmp_path / "results"), "expected-nodes": 3}
        )
        tree: set[int] = set()

        def serverapps() -> list[int]:
            tree.clear()
            tree.update(fed_procs.descendants(os.getpid()) - {os.getpid()})
            return [p for p in tree if fed_procs.comm_of(p).startswith("flwr-serverapp")]

        seen = lambda: f"a ServerApp among {[fed_procs.describe(p) for p in tree]}"  # noqa: E731
        wait_until(serverapps, seen, timeout=60, interval=0.3)
        assert dep.run_info(run_id).status in ("starting", "running")
    assert fed_procs.alive(tree) == []
    assert not (tmp_path / "results").exists()


@pytest.mark.e2e
def test_deployment_insecure_only_when_asked(tmp_path: Path) -> None:
    with LocalDeployment(tmp_path / "deploy", insecure=True, node_auth=False) as dep:
        link = dep.start_superlink()
        assert "--insecure" in link.argv
        assert not any(a.startswith("--ssl") or "auth" in a for a in link.argv)
        node = dep.start_supernode("plain", {"modality": "audio"})
        assert "--insecure" in node.process.argv
        assert "--node-config" in node.process.argv
        with contextlib.suppress(TimeoutError):  # asserted just below, with what was seen
            wait_until(
                lambda: list(dep.list_supernodes().values()) == ["online"],
                "the SuperNode to be online",
                timeout=60,
                interval=0.5,
            )
        assert list(dep.list_supernodes().values()) == ["online"]
        assert "insecure = true" in (dep.cli_home / "config.toml").read_text()
