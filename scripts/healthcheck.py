#!/usr/bin/env python3
"""The container image's HEALTHCHECK: gRPC health (``grpc.health.v1.Health/Check``) of the
service this container runs, found from its command line.

* ``jacfusion-fed owner serve`` / ``coordinator serve``: the server's own port (``--port``,
  ``--port-file``; the defaults 50051 / 50060) over mTLS with the server's own certificate
  directory (``--tls``), checking the fixed internal name the deployment's clients check
  (``<modality>.owner.jacfusion.internal``, ``coordinator.jacfusion.internal``);
  ``--insecure`` servers in plain text on loopback.
* ``flower-superlink`` / ``flower-supernode``: Flower's own health server, plain text, at its
  ``--health-server-address`` (compose.yaml binds it to the container's loopback only).
* anything else (a CLI command, a one-shot job): nothing to check, healthy.

Exit 0 when the service answers SERVING, else 1 with one line on stderr. The first process
(lowest PID) that matches is checked; run in the container, so it sees only its own processes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PORTS = {"owner": 50051, "coordinator": 50060}
TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Target:
    """Where and how to ask for health."""

    service: str  # owner, coordinator, superlink or supernode
    address: str  # host:port
    tls_dir: str | None = None  # mTLS with this directory's ca.pem, cert.pem, key.pem
    server_name: str | None = None  # the name the server's certificate is checked for


def _option(argv: Sequence[str], name: str) -> str | None:
    """The value of ``--name VALUE`` or ``--name=VALUE`` (the last one given), else None."""
    value = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def _dial_host(host: str | None) -> str:
    """The address to dial for a server bound to ``host`` (a wildcard: loopback)."""
    if not host or host in ("0.0.0.0", "::", "[::]", "localhost"):
        return "127.0.0.1"
    return host


def target_of(argv: Sequence[str]) -> Target | None:
    """The health target of a process started with ``argv``, or None if it serves none."""
    names = [Path(a).name for a in argv]
    if any(n in ("flower-superlink", "flower-supernode") for n in names[:3]):
        address = _option(argv, "--health-server-address")
        service = "superlink" if "flower-superlink" in names[:3] else "supernode"
        return Target(service, address) if address else None
    if "jacfusion-fed" not in names[:3]:
        return None
    for role in ("owner", "coordinator"):
        if role in argv and "serve" in argv and argv.index("serve") == argv.index(role) + 1:
            break
    else:
        return None
    port = _option(argv, "--port")
    port_file = _option(argv, "--port-file")
    if port_file and (port is None or int(port) == 0):
        port = Path(port_file).read_text().strip()
    address = f"{_dial_host(_option(argv, '--host'))}:{port or DEFAULT_PORTS[role]}"
    if "--insecure" in argv:
        return Target(role, address)
    tls = _option(argv, "--tls")
    if role == "owner":
        from jacfusion_fed.privacy.cert_names import owner_server_name

        return Target(role, address, tls, owner_server_name(_option(argv, "--modality") or ""))
    from jacfusion_fed.privacy.cert_names import COORDINATOR_SERVER_NAME

    return Target(role, address, tls, COORDINATOR_SERVER_NAME)


def _processes() -> list[list[str]]:
    """Command lines of this container's processes (lowest PID first), this one excluded."""
    out = []
    pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    for pid in pids:
        if pid == os.getpid():
            continue
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if raw:
            out.append([a.decode(errors="replace") for a in raw.rstrip(b"\0").split(b"\0")])
    return out


def check(target: Target) -> str:
    """The health status name the target answers (raises ``grpc.RpcError`` on failure)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if target.tls_dir is None:
        channel = grpc.insecure_channel(target.address)
    else:
        d = Path(target.tls_dir)
        creds = grpc.ssl_channel_credentials(
            root_certificates=(d / "ca.pem").read_bytes(),
            private_key=(d / "key.pem").read_bytes(),
            certificate_chain=(d / "cert.pem").read_bytes(),
        )
        options = [("grpc.ssl_target_name_override", target.server_name or "")]
        channel = grpc.secure_channel(target.address, creds, options=options)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_S)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def main() -> int:
    for argv in _processes():
        try:
            target = target_of(argv)
        except (OSError, ValueError) as exc:  # e.g. a port file not written yet
            print(f"unhealthy: {' '.join(argv[:4])}: {exc}", file=sys.stderr)
            return 1
        if target is None:
            continue
        try:
            status = check(target)
        except Exception as exc:  # grpc.RpcError and unreadable certificates alike
            details = getattr(exc, "details", None)
            detail = (details() if callable(details) else "") or str(exc) or type(exc).__name__
            print(f"unhealthy: {target.service} at {target.address}: {detail}", file=sys.stderr)
            return 1
        if status != "SERVING":
            print(f"unhealthy: {target.service} at {target.address}: {status}", file=sys.stderr)
            return 1
        print(f"healthy: {target.service} at {target.address}")
        return 0
    print("healthy: no service in this container (a CLI command or a one-shot job)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
