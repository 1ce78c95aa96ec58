"""Simulation end to end: the fixture Flower app under Flower's Simulation Engine (Ray),
started by ``run_simulation_app`` with per-node configs, a run config, Ray on loopback
with its temp dir inside the run dir, results back through ``run-dir``."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

FIXTURES = Path(__file__).parent / "fixtures"
sys.path[:0] = [str(FIXTURES), str(FIXTURES / "fedapp")]  # Ray workers get sys.path too

import fed_procs  # noqa: E402
from helpers_wait import wait_until  # noqa: E402
from jf_fedapp_fixture import apps as fx  # noqa: E402

from jacfusion_fed.federation import (  # noqa: E402
    load_app_run_config,
    read_run_results,
    run_simulation_app,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc"),
]

K = 4  # not the ClientApp's default (3): logits of width 4 prove the run config got there


def _ray_processes() -> list[str]:
    names = {"raylet", "gcs_server"}
    return [
        fed_procs.comm_of(p)
        for p in fed_procs.descendants(os.getpid())
        if fed_procs.comm_of(p) in names
    ]


def test_simulation_end_to_end(tmp_path: Path) -> None:
    sockets: list[fed_procs.Sock] = []
    probe = ServerApp()

    @probe.main()
    def main(grid: Grid, context: Context) -> None:
        fx.server_app(grid, context)
        # Ray (GCS, raylet, actors, this driver) is fully up now: look at its sockets.
        sockets.extend(fed_procs.tcp_sockets(fed_procs.descendants(os.getpid())))

    run_dir = tmp_path / "run"
    node_configs = [
        {"modality": "audio", "state-dir": str(tmp_path / "node-audio")},
        {"modality": "video", "state-dir": str(tmp_path / "node-video")},
    ]
    # the same run config a deployment would see: app defaults + overrides
    run_config = load_app_run_config(
        FIXTURES / "fedapp", {"run-dir": str(run_dir / "results"), "num-classes": K}
    )
    pythonpath = os.environ.get("PYTHONPATH")

    t0 = time.perf_counter()
    result = run_simulation_app(probe, fx.client_app, 2, node_configs, run_config, run_dir)
    wall = time.perf_counter() - t0
    assert os.environ.get("PYTHONPATH") == pythonpath  # Flower's RayBackend would change it

    # --- results came back from the ServerApp through run-dir
    res = read_run_results(run_dir / "results")
    assert res["run_config"]["num-classes"] == K
    nodes = res["nodes"]
    assert sorted(n["modality"] for n in nodes.values()) == ["audio", "video"]
    for node in nodes.values():
        w, _ = fx.make_head(node["modality"], 1, K)
        np.testing.assert_allclose(node["gram"], w @ w.T)
        np.testing.assert_allclose(
            node["logits"], fx.expected_logits(node["modality"], 1, fx.SAMPLE_IDS, K), rtol=1e-6
        )
        # the query was answered from the model the train message left on node-local disk
        assert node["train_version"] == node["query_version"]
        assert node["metrics"] == {"train-loss": 0.5, "num-examples": 100}
    for cfg in node_configs:
        assert (Path(cfg["state-dir"]) / "model.npz").is_file()

    # --- error paths: allow-list rejection and a ClientApp exception, by node
    leaky, boom = res["probe"]["leaky"], res["probe"]["boom"]
    assert leaky["error"]["code_name"] == "REPLY_NOT_ALLOWED"
    assert "record 'features' (ArrayRecord) is not in the allow-list" in leaky["error"]["reason"]
    assert boom["error"]["code_name"] == "CLIENT_APP_RAISED_EXCEPTION"
    assert f"boom from {nodes[str(boom['node'])]['modality']}" in boom["error"]["reason"]
    assert "\x1b[" not in boom["error"]["reason"]

    # --- Ray: loopback only, temp dir in the run dir, shut down afterwards
    listening = [s for s in sockets if s.state == "LISTEN"]
    assert len({s.pid for s in listening}) >= 3, sockets  # driver, raylet, gcs, actors...
    assert fed_procs.non_loopback(sockets) == []
    assert any(result.ray_temp_dir.glob("session_*/sockets")), list(run_dir.iterdir())
    assert result.ray_temp_dir == run_dir / "ray"
    import ray

    assert not ray.is_initialized()
    with contextlib.suppress(TimeoutError):  # asserted just below, naming what is left
        wait_until(lambda: not _ray_processes(), "Ray to stop", timeout=15, interval=0.2)
    assert _ray_processes() == []

    timings = res["timings"]
    print(
        f"\n[sim] wall {wall:.1f} s, ray start {result.ray_start_s:.1f} s, "
        f"run {result.run_s:.1f} s, train round trip {timings['train_round_trip_s']:.2f} s, "
        f"query round trip {timings['query_round_trip_s']:.2f} s"
    )
    assert result.server_context is not None
    assert result.server_context.run_config["run-dir"] == run_config["run-dir"]


def test_simulation_serverapp_error_propagates_and_ray_stops(tmp_path: Path) -> None:
    failing = ServerApp()

    @failing.main()
    def main(grid: Grid, context: Context) -> None:
        raise LookupError(f"coordinator failed, run-dir={context.run_config['run-dir']}")

    with pytest.raises(LookupError, match="coordinator failed, run-dir=/nowhere"):
        run_simulation_app(
            failing,
            fx.client_app,
            1,
            [{"modality": "audio", "state-dir": str(tmp_path / "n")}],
            {"run-dir": "/nowhere"},
            tmp_path / "a" / ("deep-" * 12),  # too long for Ray's sockets: short symlink used
        )
    import ray

    assert not ray.is_initialized()
    assert any((tmp_path / "a" / ("deep-" * 12) / "ray").glob("session_*"))
    assert not [p for p in Path("/tmp").glob("jfray-*") if p.resolve().is_relative_to(tmp_path)]
