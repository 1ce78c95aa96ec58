"""The container files, checked without Docker (the default run): the image's health probe,
compose.yaml's promises (one image, read-only, non-root, nothing in plain text across a
network, one network per party) and the certificates `setup` makes for the compose service
names. `make test-containers` (tests/containers) runs all of it for real."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from cryptography import x509

ROOT = Path(__file__).resolve().parents[1]
PARTY_SERVERS = {"image-owner": "image", "audio-owner": "audio"}


def _healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("healthcheck", ROOT / "scripts/healthcheck.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["healthcheck"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return data


def _services() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = _compose()["services"]
    return services


def _option(command: list[str], name: str) -> str | None:
    for arg in command:
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
    return None


# --- the health probe ----------------------------------------------------------------------


def test_health_probe_finds_each_service_from_its_command_line(tmp_path: Path) -> None:
    hc = _healthcheck()
    venv = ["/opt/jacfusion/bin/python3", "/opt/jacfusion/bin/jacfusion-fed"]
    owner = hc.target_of([*venv, "owner", "serve", "--modality=image", "--tls", "/data/pki"])
    assert owner == hc.Target(
        "owner", "127.0.0.1:50051", "/data/pki", "image.owner.jacfusion.internal"
    )
    port_file = tmp_path / "port"
    port_file.write_text("41234\n")
    argv = ["coordinator", "serve", "--host=10.0.0.1", "--port", "0", "--port-file"]
    coord = hc.target_of([*venv, *argv, str(port_file), "--tls=/pki"])
    assert coord == hc.Target(
        "coordinator", "10.0.0.1:41234", "/pki", "coordinator.jacfusion.internal"
    )
    plain = hc.target_of([*venv, "owner", "serve", "--modality", "x", "--insecure", "--port=7"])
    assert plain == hc.Target("owner", "127.0.0.1:7")
    link = hc.target_of(["python", "/bin/flower-superlink", "--health-server-address=127.0.0.1:9"])
    assert link == hc.Target("superlink", "127.0.0.1:9")
    assert hc.target_of(["python", "/bin/flower-supernode", "--superlink", "x:1"]) is None
    assert hc.target_of([*venv, "predict", "a", "--coordinator", "c:1"]) is None
    assert hc.target_of([*venv, "owner", "import-model", "--workspace", "w"]) is None
    assert hc.target_of(["sh", "-c", "jacfusion-fed owner serve"]) is None


# --- compose.yaml ----------------------------------------------------------------------------


def test_every_service_runs_the_one_image_read_only_and_unprivileged() -> None:
    for name, svc in _services().items():
        assert svc["image"] == "${JACFUSION_IMAGE:-jacfusion-fed:latest}", name
        assert svc["read_only"] is True, name
        assert svc["tmpfs"] == ["/tmp"], name
        assert svc["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in svc["security_opt"], name
        if name == "setup":  # root only to chown the fresh volumes, then setpriv to 10001
            assert "exec setpriv --reuid=10001 --regid=10001" in " ".join(svc["command"])
        else:
            assert "user" not in svc and "cap_add" not in svc, name


def test_nothing_crosses_a_network_in_plain_text() -> None:
    services = _services()
    for name, svc in services.items():
        command = svc["command"]
        assert not any("insecure" in arg for arg in command), name
        health = _option(command, "--health-server-address")
        assert health is None or health.startswith("127.0.0.1:"), name  # plain, loopback
    link = services["superlink"]["command"]
    for opt in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile"):
        assert _option(link, opt), opt
    assert "--enable-supernode-auth" in link
    for name in ("image-supernode", "audio-supernode"):
        command = services[name]["command"]
        assert _option(command, "--root-certificates") and _option(command, "--host") == "127.0.0.1"
        assert _option(command, "--auth-supernode-private-key")
    for name in ("image-owner", "audio-owner", "coordinator", "requester"):
        assert _option(services[name]["command"], "--tls") == "/data/pki", name


def test_one_internal_network_per_party() -> None:
    compose, services = _compose(), _services()
    assert set(compose["networks"]) == {"coordinator", "image-owner", "audio-owner", "hospital"}
    assert all(n["internal"] is True for n in compose["networks"].values())
    members: dict[str, set[str]] = {}
    for name, svc in services.items():
        for net in svc.get("networks", []):
            members.setdefault(net, set()).add(name)
    # an owner's network: its own services and the coordinator that dials its server
    assert members["image-owner"] == {"image-owner", "image-supernode", "coordinator"}
    assert members["audio-owner"] == {"audio-owner", "audio-supernode", "coordinator"}
    assert members["hospital"] == {"requester"}
    assert services["setup"]["network_mode"] == "none"
    # each party's state in its own volume: an owner's volume only in that owner's services
    for party in PARTY_SERVERS:
        users = {n for n, s in services.items() if f"{party}:/data" in s.get("volumes", [])} | {
            n for n, s in services.items() if f"{party}:/parties/{party}" in s.get("volumes", [])
        }
        assert users == {"setup", party, party.replace("owner", "supernode")}


def _certs_command() -> list[str]:
    """The `jacfusion-fed certs` command of scripts/compose/setup.sh, as its words."""
    text = (ROOT / "scripts/compose/setup.sh").read_text().replace("\\\n", " ")
    (line,) = [x for x in text.splitlines() if x.strip().startswith("jacfusion-fed certs")]
    return shlex.split(line.replace('"$work/pki"', "PKI"))


def test_certificates_name_the_compose_services(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from jacfusion_fed.cli import app

    args = [tmp_path / "pki" if a == "PKI" else a for a in _certs_command()[1:]]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    services = _services()

    def names(path: Path) -> set[str]:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return {str(v) for v in san.get_values_for_type(x509.DNSName)} | {
            str(v) for v in san.get_values_for_type(x509.IPAddress)
        }

    coordinator = names(tmp_path / "pki/coordinator/cert.pem")
    # Flower checks the name it dials: the SuperNodes' --superlink host, and 127.0.0.1 for the
    # SuperLink's own SuperExec (it binds 0.0.0.0); the flwr CLI's address (setup.sh) too
    for node in ("image-supernode", "audio-supernode"):
        host = _option(services[node]["command"], "--superlink")
        assert host and host.split(":")[0] in coordinator
    assert _option(services["superlink"]["command"], "--host") == "0.0.0.0"
    assert "127.0.0.1" in coordinator
    setup = (ROOT / "scripts/compose/setup.sh").read_text()
    (address,) = re.findall(r'address = "([^":]+):9093"', setup)
    assert address in coordinator
    # our gRPC clients check the fixed internal names; each owner's certificate also names the
    # service the coordinator dials, and no certificate names loopback but the SuperLink's
    coordinator_cmd = services["coordinator"]["command"]
    owner_args = [a.removeprefix("--owner=") for a in coordinator_cmd if a.startswith("--owner=")]
    dialled = dict(a.split("=", 1) for a in owner_args)  # modality -> host:port
    for owner, modality in PARTY_SERVERS.items():
        owner_names = names(tmp_path / f"pki/owners/{owner}/cert.pem")
        assert f"{modality}.owner.jacfusion.internal" in owner_names
        assert dialled[modality] == f"{owner}:50051"
        assert owner in owner_names and "127.0.0.1" not in owner_names
    assert "coordinator.jacfusion.internal" in coordinator
    requester = services["requester"]["command"]
    assert _option(requester, "--coordinator") == "coordinator:50060"


@pytest.mark.parametrize("script", ["setup.sh", "register.sh", "train.sh"])
def test_compose_jobs_fail_on_errors(script: str) -> None:
    text = (ROOT / "scripts/compose" / script).read_text()
    assert "set -eu" in text.splitlines()[:20]


# --- the README's figures --------------------------------------------------------------------


def test_readme_quotes_the_measured_figures() -> None:
    """Deploy with containers: the image size and the times come from the results file that
    `make test-containers` writes (CONTAINERS_RESULTS), one run from nothing, one with cache."""
    runs = json.loads((ROOT / "docs/results/containers.json").read_text())["runs"]
    cold, cached = runs["cold"], runs["cached"]
    assert cold["checks"]["verdict"] == "correct" and cold["checks"]["samples"] == 100
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Deploy with containers", 1)[1].split("\n## ", 1)[0]
    text = " ".join(section.split())
    expected = (
        f"image {cold['image_size_bytes'] / 1e6:,.0f} MB; "
        f"build from nothing {cold['build_s']:.0f} s (the offline base and pip's downloads "
        f"included), with the build cache {cached['build_s']:.0f} s; the deployment (`up` with "
        f"training, `predict`, `down -v`) {cold['compose_run_s']:.0f} s; the whole `make "
        f"test-containers` from nothing {cold['total_s']:.0f} s (removing the previous image "
        f"and build cache first included), with the build cache {cached['total_s']:.0f} s"
    )
    assert expected in text, expected
    load = max(cold["load_avg_before"][0], cold["load_avg_after"][0])
    assert f"load average up to {load:.0f} " in text
