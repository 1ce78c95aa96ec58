"""Where a server listens: the one check behind every ``--host`` of this project.

``owner serve``, ``coordinator serve``, ``deploy local`` (the SuperLink and SuperNodes),
:class:`~jacfusion_fed.federation.deployment.LocalDeployment` and ``reliability proxy`` all
call :func:`check_bind_host` on the address they are told to bind:

* any IP address or DNS host name is accepted, ``0.0.0.0`` and ``::`` (all interfaces)
  included; anything else is refused with a one-line ``ValueError``;
* an address that is not loopback gets a one-line warning (logger ``jacfusion_fed.rpc.bind``;
  Python prints it on stderr even when logging is not configured), because the port is then
  reachable from other machines and only TLS and the firewall stand in front of it.

An explicit host given to :func:`jacfusion_fed.rpc.serving.start_server` is the operator's
choice, ``0.0.0.0`` included; :func:`jacfusion_fed.rpc.tls.create_server` alone keeps refusing
wildcards that nobody asked for (``allow_all_interfaces``).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable

from jacfusion_fed.privacy.cert_names import validate_host
from jacfusion_fed.rpc.tls import is_loopback, is_wildcard

__all__ = ["LOOPBACK", "check_bind_host", "connect_host"]

LOOPBACK = "127.0.0.1"
log = logging.getLogger(__name__)


def _bare(host: str) -> str:
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def check_bind_host(
    host: str, *, what: str = "server", warn: Callable[[str], None] | None = None
) -> str:
    """Validate an address to bind; warn in one line when it is not loopback.

    Args:
        host: an IP address (IPv6 with or without brackets) or a DNS host name.
        what: the server's name in the warning, e.g. ``"owner ModalityService"``.
        warn: where the warning goes (default: ``logging.warning`` of this module).

    Returns:
        The normalized address (IPv6 without brackets, DNS names lowercase).

    Raises:
        ValueError: ``host`` is empty or neither an IP address nor a DNS name.
    """
    try:
        normalized = validate_host(host)
    except ValueError as exc:
        raise ValueError(f"cannot bind {what}: {exc}") from None
    if not is_loopback(normalized):
        where = "every interface" if is_wildcard(normalized) else normalized
        (warn or log.warning)(
            f"warning: {what} listens on {where}, reachable from other machines: "
            "allow only its peers through the firewall"
        )
    return normalized


def connect_host(bind_host: str) -> str:
    """The address a process on the same machine dials to reach a server bound to
    ``bind_host``: loopback for a wildcard (as Flower's SuperLink does for its SuperExec)."""
    if is_wildcard(bind_host):
        return "::1" if ipaddress.ip_address(_bare(bind_host)).version == 6 else LOOPBACK
    return _bare(bind_host)
