"""Beyond one machine: per-host certificates, the bind-host check, replica channels."""

from __future__ import annotations

import ipaddress
import json
import logging
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from typer.testing import CliRunner

from jacfusion_fed.cli import app
from jacfusion_fed.privacy.certs import (
    COORDINATOR_SERVER_NAME,
    generate_deployment_certs,
    load_certificate,
    owner_server_name,
    validate_host,
)
from jacfusion_fed.rpc.bind import check_bind_host, connect_host
from jacfusion_fed.rpc.channels import (
    FUSION_IDEMPOTENT_METHODS,
    RetryPolicy,
    replica_target,
    retry_service_config,
)
from jacfusion_fed.rpc.tls import TlsFiles, create_server, is_wildcard

runner = CliRunner()


def _sans(cert_pem: Path) -> tuple[set[str], set[str]]:
    san = (
        load_certificate(cert_pem)
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value
    )
    dns = set(san.get_values_for_type(x509.DNSName))
    ips = {str(i) for i in san.get_values_for_type(x509.IPAddress)}
    return dns, ips


# --- certificates per host ----------------------------------------------------------------


def test_each_identity_gets_only_its_own_hosts(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "certs",
            "--out",
            str(tmp_path / "pki"),
            "--coordinator-name",
            "coordinator@coord.example.org,10.77.0.1",
            "--owner",
            "vision-co=image@img.example.org,10.0.0.2",
            "--owner",
            "audio-co=audio@10.0.0.3",
            "--requester",
            "hospital",
        ],
    )
    assert result.exit_code == 0, result.output
    pki = tmp_path / "pki"
    assert _sans(pki / "coordinator" / "cert.pem") == (
        {"coord.example.org", COORDINATOR_SERVER_NAME},
        {"10.77.0.1"},
    )
    assert _sans(pki / "owners" / "vision-co" / "cert.pem") == (
        {"img.example.org", owner_server_name("image")},
        {"10.0.0.2"},
    )
    assert _sans(pki / "owners" / "audio-co" / "cert.pem") == (
        {owner_server_name("audio")},
        {"10.0.0.3"},
    )
    assert _sans(pki / "requesters" / "hospital" / "cert.pem") == (set(), set())
    manifest = json.loads((pki / "manifest.json").read_text())
    assert {p["name"]: p["hosts"] for p in manifest["principals"]}["vision-co"] == [
        "img.example.org",
        "10.0.0.2",
    ]


def test_loopback_is_kept_only_when_asked(tmp_path: Path) -> None:
    single = runner.invoke(app, ["certs", "--out", str(tmp_path / "a"), "--owner", "o=image"])
    assert single.exit_code == 0, single.output
    assert _sans(tmp_path / "a" / "coordinator" / "cert.pem")[1] == {"127.0.0.1"}
    multi = ["--coordinator-name", "coordinator@10.77.0.1", "--owner", "o=image@10.77.0.2"]
    result = runner.invoke(app, ["certs", "--out", str(tmp_path / "b"), *multi])
    assert result.exit_code == 0, result.output
    dns, ips = _sans(tmp_path / "b" / "coordinator" / "cert.pem")
    assert "localhost" not in dns and ips == {"10.77.0.1"}
    result = runner.invoke(app, ["certs", "--out", str(tmp_path / "c"), *multi, "--loopback"])
    assert result.exit_code == 0, result.output
    dns, ips = _sans(tmp_path / "c" / "coordinator" / "cert.pem")
    assert "localhost" in dns and ips == {"10.77.0.1", "127.0.0.1"}


def test_host_option_adds_to_loopback_instead_of_replacing(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        ["certs", "--out", str(tmp_path / "p"), "--owner", "o=image", "--host", "10.1.2.3"],
    )
    assert result.exit_code == 0, result.output
    for cert in ("coordinator/cert.pem", "owners/o/cert.pem"):
        assert _sans(tmp_path / "p" / cert)[1] == {"127.0.0.1", "10.1.2.3"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--owner", "o=image@"], "NAME@HOST"),
        (["--owner", "o=image@bad_host!"], "invalid host"),
        (["--owner", "o=image", "--coordinator-name", "c@999.1.1.1"], "malformed IP"),
    ],
)
def test_bad_hosts_are_refused_in_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["certs", "--out", str(tmp_path / "x"), *args])
    assert result.exit_code == 2
    assert message in result.output


def test_host_map_names_only_known_principals(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown principals"):
        generate_deployment_certs(tmp_path, {"o": "m"}, host_map={"nobody": ["10.0.0.9"]})


def test_validate_host() -> None:
    assert validate_host("[::1]") == "::1"
    assert validate_host("Img.Example.org.") == "img.example.org"
    for bad in ("", "a..b", "-a.org", "a b", "x" * 64):
        with pytest.raises(ValueError):
            validate_host(bad)


# --- binding ------------------------------------------------------------------------------


def test_check_bind_host_warns_once_when_not_loopback(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="jacfusion_fed.rpc.bind")
    assert check_bind_host("127.0.0.1") == "127.0.0.1"
    assert check_bind_host("localhost") == "localhost"
    assert not caplog.records
    assert check_bind_host("0.0.0.0", what="owner") == "0.0.0.0"
    assert check_bind_host("[::]") == "::"
    assert check_bind_host("10.77.0.2") == "10.77.0.2"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and all("\n" not in m for m in lines)
    assert "owner listens on every interface" in lines[0]
    with pytest.raises(ValueError, match="cannot bind fault proxy"):
        check_bind_host("not a host", what="fault proxy")


def test_connect_host_and_wildcards() -> None:
    assert is_wildcard("0.0.0.0") and is_wildcard("::") and not is_wildcard("10.0.0.1")
    assert connect_host("0.0.0.0") == "127.0.0.1"
    assert connect_host("::") == "::1"
    assert connect_host("10.0.0.1") == "10.0.0.1"


def test_an_explicit_wildcard_binds(tmp_path: Path) -> None:
    pki = generate_deployment_certs(tmp_path, {"o": "image"})
    tls = TlsFiles.from_dir(pki.coordinator_dir)
    host = check_bind_host("0.0.0.0")
    with pytest.raises(ValueError, match="wildcard"):  # the library never binds it unasked
        create_server(tls, host=host)
    server, port = create_server(tls, host=host, allow_all_interfaces=is_wildcard(host))
    assert port > 0
    server.stop(0)


def test_cli_servers_refuse_a_bad_host_and_predict_needs_a_coordinator(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "coordinator",
            "serve",
            "--registry",
            str(tmp_path / "r"),
            "--owner",
            "a=h:1",
            "--insecure",
            "--host",
            "no such host",
        ],
    )
    assert result.exit_code == 2 and "cannot bind coordinator FusionService" in result.output
    result = runner.invoke(app, ["predict", "x", "--pseudonyms", "--insecure"])
    assert result.exit_code == 2 and "--coordinator" in result.output
    result = runner.invoke(
        app, ["predict", "x", "--pseudonyms", "--insecure", "--coordinator", "a:1,b:2"]
    )
    flat = " ".join(result.output.replace("│", " ").split())  # rich wraps the message
    assert result.exit_code == 2 and "must be given as IP addresses" in flat


# --- replica channels ---------------------------------------------------------------------


def test_replica_targets() -> None:
    assert replica_target("10.0.0.1:50050") == "10.0.0.1:50050"
    assert replica_target("coord.example.org:50050") == "coord.example.org:50050"
    assert replica_target("10.0.0.1:1,10.0.0.2:2") == "ipv4:10.0.0.1:1,10.0.0.2:2"
    assert replica_target(["[::1]:1", "[fd00::2]:2"]) == "ipv6:[::1]:1,[fd00::2]:2"
    for bad, message in [
        ("a.org:1,b.org:2", "IP addresses"),
        ("10.0.0.1:1,[::1]:2", "mix IPv4 and IPv6"),
        ("10.0.0.1", "HOST:PORT"),
        ("10.0.0.1:1,", "empty address"),
    ]:
        with pytest.raises(ValueError, match=message):
            replica_target(bad)
    assert ipaddress.ip_address("10.0.0.1")  # the parser's own dependency is sane


def test_service_config_retries_only_idempotent_methods_on_unavailable() -> None:
    config = json.loads(
        retry_service_config("jacfusion.v1.FusionService", FUSION_IDEMPOTENT_METHODS)
    )
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    (method,) = config["methodConfig"]
    assert {n["method"] for n in method["name"]} == {"Predict", "PredictStream", "GetModelInfo"}
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert method["retryPolicy"]["maxAttempts"] == 5
    with pytest.raises(ValueError, match=r"2\.\.5"):
        RetryPolicy(max_attempts=9)
    # gRPC itself accepts the config (a malformed one fails channel creation)
    channel = grpc.insecure_channel(
        replica_target("127.0.0.1:1,127.0.0.1:2"),
        options=[("grpc.service_config", retry_service_config("x.Y", ["Z"]))],
    )
    channel.close()


def test_local_deployment_binds_the_host_it_is_given(tmp_path: Path) -> None:
    from jacfusion_fed.federation.deployment import LocalDeployment

    with LocalDeployment(tmp_path / "a", insecure=True, node_auth=False, host="0.0.0.0") as dep:
        assert (dep.host, dep.dial_host) == ("0.0.0.0", "127.0.0.1")
        dep.superlink_port = 9093
        assert dep.address == "127.0.0.1:9093"  # what SuperNodes and the CLI dial
    with LocalDeployment(tmp_path / "b", insecure=True, node_auth=False, host="::1") as dep:
        dep.superlink_port = 9093
        assert dep.address == "[::1]:9093"
    with pytest.raises(ValueError, match="cannot bind Flower SuperLink"):
        LocalDeployment(tmp_path / "c", insecure=True, node_auth=False, host="bad host")


def test_deploy_local_refuses_a_bad_host() -> None:
    result = runner.invoke(app, ["deploy", "local", "--host", "bad host"])
    assert result.exit_code == 2 and "cannot bind" in result.output


def test_fault_proxy_listens_on_its_host() -> None:
    from jacfusion_fed.reliability.proxy import FaultProxy

    with FaultProxy("127.0.0.1:9", host="0.0.0.0") as proxy:
        assert proxy.target == f"127.0.0.1:{proxy.port}"
    with pytest.raises(ValueError, match="cannot bind fault proxy"):
        FaultProxy("127.0.0.1:9", host="")
