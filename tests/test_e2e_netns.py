"""The README's multi-host walkthrough, run across Linux network namespaces.

Six "machines" on a private range this test owns, 10.77.0.0/24 (nothing else routes there):

    coordinator 10.77.0.1   flower-superlink, flwr CLI, coordinator serve (replica 1)
    owner x     10.77.0.2   flower-supernode, owner serve (binds 10.77.0.2)
    owner y     10.77.0.3   flower-supernode, owner serve (binds 0.0.0.0)
    hospital    10.77.0.4   predict, coordinator info
    database    10.77.0.5   PostgreSQL: the head registry both replicas share
    replica 2   10.77.0.6   coordinator serve (replica 2)

Each is a namespace with one veth into a bridge that lives in a fifth namespace, so nothing
is created in the host's own namespace and no packet can leave: the namespaces have no route
but 10.77.0.0/24 and their own loopback. The commands are the README's (same arguments;
those that need no network run in this process; TwoMoon instead of AV-Digits to keep it
short): certificates per host (no loopback names), the pseudonym key and labels, the
SuperLink with TLS and SuperNode authentication, registered SuperNodes, ``flwr run`` with a
run config file, then online inference from the hospital through two coordinator replicas on
two hosts that share one PostgreSQL registry (``--registry postgresql://...``): replica 2,
started after replica 1 registered the heads, serves that registration (the same registration
times) rather than making its own.
Every process is stopped by PID and every namespace deleted in ``finally``; every wait is
bounded. Needs root and ``ip netns``; skipped otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from jacfusion_fed.federation._env import child_env
from jacfusion_fed.federation.flwr_cli import flower_executable
from jacfusion_fed.processes import ManagedProcess, stop_all
from jacfusion_fed.reliability.postgres import PostgresCluster, postgres_missing

pytestmark = pytest.mark.e2e

SUBNET = "10.77.0"
HOSTS = {
    "co": f"{SUBNET}.1",
    "x": f"{SUBNET}.2",
    "y": f"{SUBNET}.3",
    "hosp": f"{SUBNET}.4",
    "db": f"{SUBNET}.5",
    "co2": f"{SUBNET}.6",
}
DATA = "builtin:twomoon?seed=0&quick=1"
CLI = [sys.executable, "-c", "from jacfusion_fed.cli import main; main()"]
_PROXY_VARS = ("http_proxy", "https_proxy", "grpc_proxy", "all_proxy")


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("ip") is None:
        return "needs the `ip` tool (iproute2)"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        return f"`ip netns` does not work here: {probe.stderr.strip()}"
    return postgres_missing()


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")


class Net:
    """The namespaces and links of this test; ``close`` deletes everything it created."""

    def __init__(self) -> None:
        self.prefix = f"jfh{os.getpid() % 100000}"
        self.created: list[str] = []

    def ns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def up(self) -> None:
        bridge = self.ns("br")
        _ip("netns", "add", bridge)
        self.created.append(bridge)
        _ip("-n", bridge, "link", "add", "br0", "type", "bridge")
        _ip("-n", bridge, "link", "set", "br0", "up")
        for host, addr in HOSTS.items():
            ns = self.ns(host)
            _ip("netns", "add", ns)
            self.created.append(ns)
            # the veth is created inside the bridge namespace, its peer moved into `ns`
            _ip(
                "-n",
                bridge,
                "link",
                "add",
                f"v{host}",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns,
            )
            _ip("-n", bridge, "link", "set", f"v{host}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def close(self) -> None:
        for ns in reversed(self.created):  # deleting a namespace removes its links too
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30, check=False)
        self.created.clear()


class Machines:
    """Processes started inside the namespaces (``ip netns exec``), stopped by PID."""

    def __init__(self, net: Net, root: Path) -> None:
        self.net, self.root = net, root
        self.procs: dict[str, ManagedProcess] = {}
        self.cleanups: list[Callable[[], None]] = []  # e.g. the PostgreSQL server, by PID

    def env(self, flwr_home: Path) -> dict[str, str]:
        # Flower's SuperExec polls for tasks every 1 s by default; 0.25 s as `deploy local`
        env = child_env(flwr_home, {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.25"})
        for var in _PROXY_VARS:  # our 10.77.0.0/24 addresses must never go to a proxy
            env.pop(var, None)
            env.pop(var.upper(), None)
        return env

    def argv(self, host: str, cmd: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.net.ns(host), *cmd]

    def run(self, host: str, cmd: Sequence[str], timeout: float = 120.0) -> str:
        home = self.root / "flwr-homes" / host
        home.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            self.argv(host, cmd),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env(home),
            cwd=self.root,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{cmd[:3]} on {host} exited {proc.returncode}:\n{proc.stderr}")
        return proc.stdout

    def spawn(self, name: str, host: str, cmd: Sequence[str], flwr_home: Path) -> ManagedProcess:
        proc = ManagedProcess(
            name,
            self.argv(host, cmd),
            env=self.env(flwr_home),
            cwd=self.root / name,
            log_path=self.root / "logs" / f"{name}.log",
        )
        self.procs[name] = proc
        return proc

    def wait_listening(self, name: str, host: str, addr: str, port: int, timeout: float) -> None:
        """Until ``addr:port`` accepts a TCP connection from ``host`` (bash /dev/tcp)."""
        deadline = time.monotonic() + timeout
        probe = f"exec 3<>/dev/tcp/{addr}/{port}"
        while time.monotonic() < deadline:
            if self.procs[name].exit_code() is not None:
                raise RuntimeError(f"{name} exited:\n{self.procs[name].log_text(3000)}")
            ok = subprocess.run(
                self.argv(host, ["bash", "-c", probe]), capture_output=True, timeout=10, check=False
            )
            if ok.returncode == 0:
                return
            time.sleep(0.3)
        raise TimeoutError(
            f"{name} not listening on {addr}:{port}:\n{self.procs[name].log_text(3000)}"
        )

    def stop(self) -> None:
        try:
            stop_all(list(self.procs.values()), grace=5.0)
        finally:
            for cleanup in reversed(self.cleanups):
                cleanup()


@pytest.fixture
def machines(tmp_path: Path) -> Iterator[Machines]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    net = Net()
    m = Machines(net, tmp_path)
    try:
        net.up()
        yield m
    finally:
        try:
            m.stop()
        finally:
            net.close()
    leftover = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    assert net.prefix not in leftover.stdout


def _cli(args: Sequence[str]) -> None:
    from typer.testing import CliRunner

    from jacfusion_fed.cli import app

    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output


def _flwr(m: Machines, args: Sequence[str]) -> dict[str, object]:
    out = m.run("co", [flower_executable("flwr"), *args, "--format", "json"], timeout=60)
    data = json.loads(out[out.index("{") :])
    assert data.get("success", True), data
    return data  # type: ignore[no-any-return]


def _coordinator_args(registry: str, pki: Path, host: str) -> list[str]:
    return [
        "coordinator",
        "serve",
        "--registry",
        registry,
        "--owner",
        f"x={HOSTS['x']}:50061",
        "--owner",
        f"y={HOSTS['y']}:50062",
        "--tls",
        str(pki / "coordinator"),
        "--host",
        host,
        "--port",
        "50050",
    ]


def _predict_eventually(m: Machines, pki: Path, hosp: Path, coordinator: str) -> dict[str, Any]:
    """The hospital's ``predict`` until it answers (the coordinator may still fetch heads)."""
    predict = [
        *CLI,
        "predict",
        "twomoon-test-000000",
        "twomoon-test-000001",
        "--coordinator",
        coordinator,
        "--tls",
        str(pki / "requesters" / "hospital"),
        "--pseudonym-key",
        str(hosp / "pseudonym.key"),
        "--json",
        "--require-all",
    ]
    deadline, last = time.monotonic() + 90, ""
    while time.monotonic() < deadline:
        try:
            answer: dict[str, Any] = json.loads(m.run("hosp", predict, timeout=60))
            return answer
        except RuntimeError as exc:
            last = str(exc)
            time.sleep(1)
    raise AssertionError(f"predict through {coordinator} never answered: {last}")


def test_multi_host_walkthrough(machines: Machines, tmp_path: Path) -> None:
    m, root = machines, tmp_path
    t0, phases = time.monotonic(), {}
    co, hx, hy = HOSTS["co"], HOSTS["x"], HOSTS["y"]
    pki, hosp = root / "pki", root / "hospital"
    # --- the coordinator's operator: certificates for each machine's own address ---------
    # (no network involved: run in this process, which is quicker than a CLI start-up)
    _cli(
        [
            "certs",
            "--out",
            str(pki),
            "--coordinator-name",
            f"coordinator@{co},{HOSTS['co2']}",
            "--owner",
            f"x-owner=x@{hx}",
            "--owner",
            f"y-owner=y@{hy}",
            "--requester",
            "hospital",
        ]
    )
    # --- the hospital: pseudonym key (copied to each owner) and evaluation labels -------------
    _cli(["deploy", "key", "--out", str(hosp / "pseudonym.key")])
    _cli(
        [
            "deploy",
            "labels",
            "--data",
            DATA,
            "--modality",
            "x",
            "--pseudonym-key",
            str(hosp / "pseudonym.key"),
            "--out",
            str(hosp / "eval-labels.json"),
        ]
    )
    for owner in ("x-owner", "y-owner"):
        (root / owner).mkdir(mode=0o700)
        shutil.copy2(hosp / "pseudonym.key", root / owner / "pseudonym.key")
    # --- coordinator: SuperLink (TLS + SuperNode auth) and the flwr CLI connection ----------
    c = pki / "coordinator"
    m.spawn(
        "superlink",
        "co",
        [
            flower_executable("flower-superlink"),
            "--host",
            co,
            "--port",
            "9093",
            "--disable-runtime-dependency-installation",
            "--ssl-ca-certfile",
            str(c / "ca.pem"),
            "--ssl-certfile",
            str(c / "cert.pem"),
            "--ssl-keyfile",
            str(c / "key.pem"),
            "--enable-supernode-auth",
        ],
        root / "flwr-homes" / "superlink",
    )
    m.wait_listening("superlink", "co", co, 9093, timeout=60)
    cli_home = root / "flwr-homes" / "co"
    cli_home.mkdir(parents=True, exist_ok=True)
    (cli_home / "config.toml").write_text(
        '[superlink]\ndefault = "hospital-fed"\n\n[superlink.hospital-fed]\n'
        f'address = "{co}:9093"\nroot-certificates = "{pki / "ca" / "ca.pem"}"\n'
    )
    for owner in ("x-owner", "y-owner"):
        _flwr(
            m,
            [
                "supernode",
                "register",
                str(pki / "owners" / owner / "supernode_auth.pub"),
                "hospital-fed",
            ],
        )
    # --- each owner's machine: one SuperNode ------------------------------------------------
    for owner, host in (("x-owner", "x"), ("y-owner", "y")):
        d, ws = pki / "owners" / owner, root / owner
        node_config = (
            f"owner='{owner}' modality='{host}' data='{DATA}' workdir='{ws}' "
            f"key-file='{ws / 'pseudonym.key'}'"
        )
        m.spawn(
            f"supernode-{host}",
            host,
            [
                flower_executable("flower-supernode"),
                "--superlink",
                f"{co}:9093",
                "--host",
                "127.0.0.1",
                "--port",
                "9094",
                "--root-certificates",
                str(d / "ca.pem"),
                "--auth-supernode-private-key",
                str(d / "supernode_auth.key"),
                "--node-config",
                node_config,
            ],
            root / "flwr-homes" / f"supernode-{host}",
        )
    phases["setup_s"] = time.monotonic() - t0
    # --- coordinator: the app folder, the run config file, flwr run ----------------------------
    _cli(["deploy", "app", "--out", str(root / "app")])
    results = root / "coordinator"
    (root / "run.toml").write_text(
        f'run-dir = "{results}"\nlabels-file = "{hosp / "eval-labels.json"}"\n'
        'dataset = "twomoon"\nperturbed = "y"\nepochs = 10\nlr = 0.01\nrepeats = 1\n'
        'columns = "clean; gaussian w0=0.5; missing w1=1"\n'
    )
    run_id = int(
        _flwr(
            m, ["run", str(root / "app"), "hospital-fed", "--run-config", str(root / "run.toml")]
        )["run-id"]
    )  # type: ignore[call-overload]
    deadline, status = time.monotonic() + 240, ""
    while time.monotonic() < deadline:
        runs = _flwr(m, ["list", "hospital-fed", "--run-id", str(run_id)])["runs"]
        status = str(runs[0]["status"])  # type: ignore[index]
        if status.startswith("finished"):
            break
        time.sleep(1)
    phases["flwr_run_s"] = time.monotonic() - t0 - phases["setup_s"]
    logs = m.run("co", [flower_executable("flwr"), "log", str(run_id), "hospital-fed", "--show"])
    assert status == "finished:completed", f"{status}\n{logs[-4000:]}"
    written = json.loads((results / "results.json").read_text())
    assert written["status"] == "completed"
    assert written["evaluation"]["table"]["rows"], written["evaluation"]
    assert "Report:" in logs and "Stat-w/" in logs  # the ServerApp logged the table
    # --- online inference: owners on their own addresses, coordinator, hospital's predict ----
    for host, bind, port in (("x", hx, 50061), ("y", "0.0.0.0", 50062)):
        owner = f"{host}-owner"
        m.spawn(
            f"owner-{host}",
            host,
            [
                *CLI,
                "owner",
                "serve",
                "--workspace",
                str(root / owner),
                "--modality",
                host,
                "--data",
                DATA,
                "--pseudonym-key",
                str(root / owner / "pseudonym.key"),
                "--tls",
                str(pki / "owners" / owner),
                "--host",
                bind,
                "--port",
                str(port),
            ],
            root / "flwr-homes" / f"owner-{host}",
        )
    # the head registry both coordinator replicas share: PostgreSQL on its own host
    pg = PostgresCluster(HOSTS["db"], 5432, admit=f"{SUBNET}.0/24", wrap=m.argv("db", []))
    m.cleanups.append(pg.stop)
    registry = pg.start()
    for name, host in (("coordinator", "co"), ("replica-2", "co2")):
        m.spawn(
            name,
            host,
            [*CLI, *_coordinator_args(registry, pki, HOSTS[host])],
            root / "flwr-homes" / name,
        )
        if name == "coordinator":  # replica 2 starts once replica 1 has registered the heads
            m.wait_listening("coordinator", "hosp", co, 50050, timeout=90)
            _predict_eventually(m, pki, hosp, f"{co}:50050")
    assert "reachable from other machines" in m.procs["owner-y"].log_text()
    m.wait_listening("replica-2", "hosp", HOSTS["co2"], 50050, timeout=90)
    infos = [
        json.loads(
            m.run(
                "hosp",
                [
                    *CLI,
                    "coordinator",
                    "info",
                    "--coordinator",
                    f"{addr}:50050",
                    "--tls",
                    str(pki / "requesters" / "hospital"),
                    "--json",
                ],
            )
        )
        for addr in (co, HOSTS["co2"])
    ]
    registered = [
        {x["modality"]: (x["model_version"], x["registered_at"]) for x in info["modalities"]}
        for info in infos
    ]
    assert sorted(registered[0]) == ["x", "y"]
    assert registered[1] == registered[0]  # replica 2 serves replica 1's registration
    answer = _predict_eventually(m, pki, hosp, f"{co}:50050,{HOSTS['co2']}:50050")
    phases["online_s"] = time.monotonic() - t0 - phases["setup_s"] - phases["flwr_run_s"]
    print("phases:", {k: round(v, 1) for k, v in phases.items()})
    assert [x["local_id"] for x in answer["samples"]] == [
        "twomoon-test-000000",
        "twomoon-test-000001",
    ]
    assert all(sorted(x["modalities"]) == ["x", "y"] for x in answer["samples"])
    # online inference fuses with the heads the Flower run trained and registered
    versions = {x["modality"]: x["model_version"] for x in answer["modalities"]}
    assert versions == {k: v["version"] for k, v in written["heads"].items()}
