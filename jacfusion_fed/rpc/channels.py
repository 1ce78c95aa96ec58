"""Client channels to several replicas of one service, with gRPC's own balancing and retries.

A requester given several coordinator addresses (``predict --coordinator a,b``) gets ONE
channel whose target lists them all (``ipv4:10.0.0.1:50050,10.0.0.2:50050``, or one DNS name
with several A records), with a service config that

* spreads calls over the replicas (``round_robin``: one subchannel per address; a replica
  that goes away leaves the rotation until it reconnects), and
* retries calls that failed with ``UNAVAILABLE`` on another attempt (``retryPolicy``), only
  for methods that are idempotent: Predict, PredictStream and GetModelInfo read the head
  registry and the owners' logits and change nothing, so running one twice is harmless.

No hand-written retry loop: gRPC decides when a call may be retried (for a stream, only
before the first response arrived) and backs off with jitter. gRPC also caps the attempts
at 5 whatever the config says.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
from collections.abc import Sequence
from typing import Any

from jacfusion_fed.privacy.cert_names import COORDINATOR_SERVER_NAME
from jacfusion_fed.rpc.policies import FUSION_SERVICE
from jacfusion_fed.rpc.tls import Insecure, TransportOptions, create_channel

__all__ = [
    "FUSION_IDEMPOTENT_METHODS",
    "RetryPolicy",
    "connect_coordinator",
    "replica_target",
    "retry_service_config",
    "with_replica_config",
]

#: FusionService methods that change nothing on the server (safe to retry).
FUSION_IDEMPOTENT_METHODS: tuple[str, ...] = ("Predict", "PredictStream", "GetModelInfo")


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """gRPC ``retryPolicy`` fields (see gRFC A6); ``max_attempts`` counts the first try."""

    max_attempts: int = 5
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 1.0
    backoff_multiplier: float = 2.0
    retryable_status_codes: tuple[str, ...] = ("UNAVAILABLE",)

    def __post_init__(self) -> None:
        if not 2 <= self.max_attempts <= 5:
            raise ValueError(f"max_attempts must be in 2..5 (gRPC's cap), got {self.max_attempts}")
        if self.initial_backoff_s <= 0 or self.max_backoff_s < self.initial_backoff_s:
            raise ValueError("need 0 < initial_backoff_s <= max_backoff_s")

    def as_json(self) -> dict[str, Any]:
        return {
            "maxAttempts": self.max_attempts,
            "initialBackoff": f"{self.initial_backoff_s:g}s",
            "maxBackoff": f"{self.max_backoff_s:g}s",
            "backoffMultiplier": self.backoff_multiplier,
            "retryableStatusCodes": list(self.retryable_status_codes),
        }


def retry_service_config(
    service: str, methods: Sequence[str], policy: RetryPolicy | None = None
) -> str:
    """The ``grpc.service_config`` JSON: round_robin over every address, ``policy`` for
    ``methods`` of ``service`` (fully qualified, e.g. ``jacfusion.v1.FusionService``)."""
    if not methods:
        raise ValueError("name at least one idempotent method to retry")
    config = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": [{"service": service, "method": m} for m in methods],
                "retryPolicy": (policy or RetryPolicy()).as_json(),
            }
        ],
    }
    return json.dumps(config, separators=(",", ":"))


def _split_address(address: str) -> tuple[str, str]:
    text = address.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address {address!r} must look like HOST:PORT (IPv6: [ADDR]:PORT)")
    return host, port


def replica_target(addresses: str | Sequence[str]) -> str:
    """One gRPC target naming every replica.

    ``addresses`` is ``"h1:p1,h2:p2"`` or a list of ``HOST:PORT``. One address is returned
    unchanged (gRPC resolves a DNS name, and balances over all of its A records). Several
    must all be IPv4 or all IPv6 literals (gRPC's ``ipv4:``/``ipv6:`` schemes); several
    DNS names cannot share one channel: give one name with several A records instead.
    """
    if isinstance(addresses, str):
        items = [a.strip() for a in addresses.split(",")]
    else:
        items = [a.strip() for a in addresses]
    if not items or not all(items):
        raise ValueError(f"empty address in {addresses!r}")
    parsed = [_split_address(a) for a in items]
    if len(parsed) == 1:
        return items[0]
    versions = set()
    for host, _ in parsed:
        try:
            versions.add(ipaddress.ip_address(host).version)
        except ValueError:
            raise ValueError(
                f"several replicas must be given as IP addresses, not {host!r} (or give one "
                "DNS name that resolves to every replica)"
            ) from None
    if len(versions) != 1:
        raise ValueError("replica addresses mix IPv4 and IPv6; use one family")
    if versions == {4}:
        return "ipv4:" + ",".join(f"{h}:{p}" for h, p in parsed)
    return "ipv6:" + ",".join(f"[{h}]:{p}" for h, p in parsed)


def with_replica_config(
    options: Any, service: str, methods: Sequence[str], policy: RetryPolicy | None = None
) -> Any:
    """``options`` (a :class:`~jacfusion_fed.rpc.tls.TransportOptions` or None) plus the
    service config of :func:`retry_service_config` and retries switched on."""
    base = options or TransportOptions()
    extra = [
        (k, v) for k, v in base.extra if k not in ("grpc.service_config", "grpc.enable_retries")
    ]
    extra += [
        ("grpc.service_config", retry_service_config(service, methods, policy)),
        ("grpc.enable_retries", 1),
    ]
    return dataclasses.replace(base, extra=tuple(extra))


def connect_coordinator(target: str | Sequence[str], security: Any, *, options: Any = None) -> Any:
    """A requester's ``grpc.Channel`` to the coordinator at ``target``.

    ``target`` may name several replicas (``"10.0.0.1:50060,10.0.0.2:50060"`` or a list): one
    channel balances over them and retries idempotent calls that fail with UNAVAILABLE. With
    TLS the server certificate must name the coordinator
    (:data:`jacfusion_fed.privacy.certs.COORDINATOR_SERVER_NAME`), so an owner's (or anyone
    else's) certificate from the same CA is refused. Imports only gRPC and this package's
    small modules, so a requester command starts fast.
    """
    options = with_replica_config(options, FUSION_SERVICE, FUSION_IDEMPOTENT_METHODS)
    name = None if isinstance(security, Insecure) else COORDINATOR_SERVER_NAME
    return create_channel(replica_target(target), security, server_name=name, options=options)
